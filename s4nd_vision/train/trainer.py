"""The Accelerate-driven trainer: one class, the same code single-process, multi-process and multi-node.

Accelerate owns devices, distribution (DDP/FSDP from `accelerate launch` and its configs), mixed
precision, gradient accumulation and checkpoint state; timm owns the model registry, transforms,
Mixup/CutMix, losses, optimizer and scheduler factories and the EMA. The data (`train.data`: image
folders, MNIST-5k, HMDB-51 clips), checkpoints (`train.checkpoint`) and the run's records
(`train.metrics`) live in modules of their own; this one is the loop.

Determinism and resumption: the data repeats its batches and augmentation for a given (seed, epoch)
from any micro-batch on, and every micro-step reseeds the global generators from (seed, step, rank)
(Mixup, drop path), so a run resumed from a checkpoint, even mid-epoch, repeats the uninterrupted
run exactly; the checkpoint carries the epoch's running sums, so its metrics row is the same too.

Divergence: every update checks that the loss and the gradients were finite on every process (one
scalar all-reduce). An update with a non-finite loss or gradient is skipped (no optimizer step, no EMA
update, what its forward passes changed in the buffers, BatchNorm's running statistics, undone, left out of
`train_loss`, counted in `nonfinite_steps`); more than `train.max_nonfinite_steps`
of them in a row stop the run with `TrainingDiverged`. Weights and checkpoints are written only when
every value in them is finite, so the last checkpoint is always one to resume from.
"""
import copy
import dataclasses
import math
import multiprocessing
import os
import time
import warnings
from functools import partial
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.tracking import get_available_trackers
from accelerate.utils import (
    DistributedType,
    ProjectConfiguration,
    parse_choice_from_env,
    parse_flag_from_env,
    set_seed,
)
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from ..layers import drop_inference_caches, set_bandlimit
from ..models._checkpoint import WEIGHTS_FILE_HINT, weights_num_classes
from ..utils.files import remove_temporaries
from ..utils.runtime import progress_refresh_s
from ..utils.seeding import seed_all, seed_from
from .checkpoint import (
    BEST_FILE,
    LOGS_DIR,
    METRICS_FILE,
    TrainState,
    all_finite,
    check_shared_folder,
    checkpoint_to_resume,
    export_weights,
    flat_config,
    latest_checkpoint,
    load_checkpoint,
    local_shards,
    lock_run_folder,
    recover_replaced_checkpoints,
    release_run_folder,
    restore_best_weights,
    same_on_every_process,
    save_checkpoint,
    set_aside_newer,
)
from .config import Config, ConfigError, config_to_dict
from .data import create_train_data
from .metrics import MetricsLog, last_row, peak_memory_mb, reset_peak_memory
from .optim import param_groups_ssm

__all__ = ['Trainer', 'TrainingDiverged']


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The 2-norm of this process's gradients of `model` (its shards under FSDP; 0 without any): not finite when any
    of them is not. A plain tensor, for the all-reduce that tells every process whether some gradient is not."""
    grads = local_shards(p.grad for p in model.parameters() if p.grad is not None)
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def warn_fsdp_parameter_cast(accelerator: Accelerator) -> None:
    """Warn where FSDP's mixed precision casts the parameters (Accelerate's FSDP with bf16 or fp16): the SSM's are
    rounded before kernel generation, which autocast alone keeps in float32."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    dtype = getattr(accelerator.state.fsdp_plugin.mixed_precision_policy, 'param_dtype', None)
    if dtype is not None and dtype != torch.float32:
        warnings.warn(
            f'FSDP mixed precision casts every parameter to {dtype} before the forward, the S4ND layers\' SSM '
            f'parameters (log dt, A, B, C) and SGConv sub-kernels too: kernel generation (float32) then starts from '
            f'rounded values (Im A, up to about 1e3, moves by up to about 3; a layer\'s output changes by a few '
            f'percent). To keep them float32, train with DDP, or FSDP with mixed precision no', UserWarning,
            stacklevel=2)


def check_launched_engine(accelerator: Accelerator) -> None:
    """Refuse a launch whose config asks for FSDP or DeepSpeed (`accelerate launch` sets ACCELERATE_USE_FSDP or
    ACCELERATE_USE_DEEPSPEED) where Accelerate runs without it: on CPU processes (ACCELERATE_USE_CPU=1) Accelerate
    enables neither and trains with DDP instead, without a word (whole weights on every process, other checkpoints)."""
    for engine, kind in (('FSDP', DistributedType.FSDP), ('DEEPSPEED', DistributedType.DEEPSPEED)):
        if parse_flag_from_env(f'ACCELERATE_USE_{engine}') and accelerator.distributed_type != kind:
            name = 'DeepSpeed' if engine == 'DEEPSPEED' else engine
            plain = 'as one process' if accelerator.num_processes == 1 else 'with DDP (whole weights on each)'
            raise ConfigError(
                f'the launcher\'s config asks for {name} (ACCELERATE_USE_{engine}=true), but Accelerate runs these '
                f'{accelerator.num_processes} process(es) on {accelerator.device.type} without it ({name} on GPUs '
                f'only): they would train {plain}. Launch CPU processes with --multi_gpu (DDP; README: two CPU '
                f'processes), or {name} on GPUs')


def check_deepspeed_config(accelerator: Accelerator, clip_grad: Optional[float], grad_accum_steps: int) -> None:
    """Under DeepSpeed, refuse a DeepSpeed config that `prepare` would apply over the run's config without a word:
    its `gradient_clipping` (`accelerate launch --gradient_clipping`; 'auto' is Accelerate's 1.0, none DeepSpeed's 0,
    off) other than optim.clip_grad, since DeepSpeed clips the gradients itself (Accelerate's `clip_grad_norm_` only
    reads the norm there), and its `gradient_accumulation_steps` (1 where a config file gives none) other than
    train.grad_accum_steps, which Accelerate then syncs by while the loop counts updates by the config."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    value = config.get('gradient_clipping')
    applied = 1.0 if value == 'auto' else float(value or 0.0)
    if applied != (clip_grad or 0.0):
        raise ConfigError(
            f'optim.clip_grad is {clip_grad if clip_grad is not None else "null"}, but DeepSpeed, which clips the '
            f'gradients itself, clips them at {applied or "none"} (gradient_clipping {value!r} in its config; '
            f"'auto' is Accelerate's 1.0): give the same in both (DeepSpeed's gradient_clipping 0 for null)")
    steps = config.get('gradient_accumulation_steps', 'auto')
    if steps != 'auto' and int(steps) != grad_accum_steps:
        raise ConfigError(
            f'train.grad_accum_steps is {grad_accum_steps}, but the DeepSpeed config accumulates over {steps} '
            f'micro-batches (gradient_accumulation_steps; 1 where the file gives none), which Accelerate would take '
            f"instead: give the same in both, or 'auto' in DeepSpeed's")


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of an epoch's running loss and sample sums on `device`: float64 (no rounding drift over an epoch),
    float32 on Apple's MPS, which has no float64 (creating one there raises TypeError; float32 counts exactly up to
    2 ** 24 samples per process and epoch)."""
    return torch.float32 if torch.device(device).type == 'mps' else torch.float64


class TrainingDiverged(RuntimeError):
    """The loss (or the weights) stopped being finite; nothing non-finite was written."""


# the parameter-group entries a config or this code sets (lr and its schedule's base, layer decay's scale, weight
# decay, the optimizer's own settings, and which groups a hybrid optimizer such as Muon trains with AdamW); a resumed
# run takes these from its config and everything else from the checkpoint
_CONFIG_GROUP_KEYS = ('lr', 'initial_lr', 'lr_scale', 'weight_decay', 'betas', 'eps', 'use_fallback')
# the config keys that may differ between the machines of a run: paths, as each machine mounts the data, the run
# folder and the weights where it does (the data's contents are compared instead, and `check_shared_folder` checks
# the run folder), and the loader processes each machine can afford
_MACHINE_LOCAL_KEYS = ('data.root', 'data.split_dir', 'model.pretrained_file', 'train.output_dir', 'data.workers')


class Trainer:
    """Trains a timm model as `cfg` says. `fit()` runs (or resumes) the whole schedule.

    Args:
        cfg: a validated `Config` (copied: changing it afterwards leaves this Trainer as it is).
        resume: True = continue from the latest checkpoint in `cfg.train.output_dir`, a path =
            continue from that checkpoint, False = fresh start.
        allow_fresh: with `resume=True`, start fresh when there is no checkpoint (refused otherwise).
    """

    def __init__(self, cfg: Config, resume=False, allow_fresh: bool = False):
        # (the check Python makes before starting a process from a process that is still starting)
        if getattr(multiprocessing.current_process(), '_inheriting', False):
            raise RuntimeError(
                'Trainer: built while a starting worker process imports the main script (DataLoader workers that '
                "start by forkserver or spawn, as video workers do, import it): put the training under `if __name__ "
                "== '__main__':`")
        fresh = not AcceleratorState._shared_state  # (no Accelerator in this process yet: this run sets its state)
        try:
            self._start(cfg, resume, allow_fresh)
        except BaseException:
            if fresh:  # a run that fails to start (a ConfigError) leaves the process as it was: the next Trainer in
                # it (e.g. a notebook's, with the config corrected) may take another precision, as a new process can
                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()
            raise

    def _start(self, cfg: Config, resume, allow_fresh: bool) -> None:
        """The Accelerator, the checks of the launch, the run folder, then the run (`_build`)."""
        # a copy: the run and its records (config.yaml, the checkpoints' configs) keep the config as given here; a
        # later change to the caller's object (a notebook editing it for its next run) would apply in part, e.g.
        # optim.clip_grad but not optim.lr, while config.yaml recorded the new values
        self.cfg = cfg = copy.deepcopy(cfg)
        tc = cfg.train
        # null: the launcher's (accelerate launch --mixed_precision), resolved as Accelerate resolves it in a fresh
        # process; passed explicitly, since Accelerate would otherwise keep the precision of an earlier run in
        # this process (e.g. a notebook's bf16 run before) without a word
        launched = parse_choice_from_env('ACCELERATE_MIXED_PRECISION', 'no')
        precision = tc.mixed_precision or launched
        try:
            self.accelerator = Accelerator(
                mixed_precision=precision,
                gradient_accumulation_steps=tc.grad_accum_steps,
                log_with=tc.trackers or None,
                # (the trackers' logs in their own folder, which a new branch sets aside: `set_aside_newer`)
                project_config=ProjectConfiguration(project_dir=tc.output_dir,
                                                    logging_dir=os.path.join(tc.output_dir, LOGS_DIR)),
                step_scheduler_with_optimizer=False,
            )
        except ValueError as e:
            if 'already been initialized' not in str(e):
                raise
            raise ConfigError(
                f'train.mixed_precision is {tc.mixed_precision or "null"} (here: {precision}), but an earlier run '
                f'in this Python process trained with {AcceleratorState._shared_state.get("_mixed_precision")}, '
                f'which Accelerate keeps for the whole process: give train.mixed_precision that value, or start '
                f'this run in a new process') from None
        acc = self.accelerator
        if acc.is_main_process and tc.mixed_precision is not None and launched not in ('no', tc.mixed_precision):
            # (Accelerate says nothing; e.g. a CPU run's config.yaml, which records 'no', launched with bf16)
            warnings.warn(f'train.mixed_precision={tc.mixed_precision} overrides the launcher\'s --mixed_precision '
                          f'{launched} (set train.mixed_precision to null to take the launcher\'s)', stacklevel=2)
        # the precision the run trains in, also where the launcher chose it (null): config.yaml, the checkpoints'
        # configs and the trackers state it, and a resume in another precision is warned of as a changed key
        self.cfg = cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, mixed_precision=acc.mixed_precision))
        tc = cfg.train
        # the first collective: a process whose config failed to load joins it with its error (`cli.run`)
        with same_on_every_process(acc) as facts:
            facts.update((key, value) for key, value in flat_config(config_to_dict(cfg)).items()
                         if key not in _MACHINE_LOCAL_KEYS)
            # a checkpoint by its folder's name (the machines may mount the run folder at other paths)
            facts['--resume'] = os.path.basename(os.path.normpath(resume)) if isinstance(resume, str) else resume
            facts['--allow-fresh'] = allow_fresh
            launched = int(os.environ.get('WORLD_SIZE', '1'))
            if launched > 1 and acc.num_processes == 1:  # e.g. `accelerate launch --multi_gpu` with no GPU visible
                raise ConfigError(
                    f'the launcher started {launched} processes (WORLD_SIZE={launched}), but Accelerate runs each as '
                    f'a run of its own (on {acc.device.type}, without a process group), which would train alone: on '
                    f'CPUs launch with ACCELERATE_USE_CPU=1 (accelerate launch --multi_gpu ...; in a notebook, '
                    f'os.environ[\'ACCELERATE_USE_CPU\'] = \'1\' before notebook_launcher), on GPUs check that '
                    f'every process sees its GPU (torch.cuda.is_available(), CUDA_VISIBLE_DEVICES)')
            installed = {t.value for t in get_available_trackers()}
            missing = [t for t in tc.trackers if t != 'all' and t not in installed]
            if missing and acc.is_main_process:  # (it logs; Accelerate leaves a tracker out without a word)
                raise ConfigError(f'train.trackers: {missing} not installed here (installed: {sorted(installed)}), '
                                  f'so the run would log nothing there: pip install {" ".join(missing)}, or '
                                  f'remove them from train.trackers')
            if acc.mixed_precision == 'fp16' and not acc.native_amp:  # (Accelerate runs fp16 on accelerators only)
                raise ConfigError(f'train.mixed_precision (or accelerate launch --mixed_precision) is fp16, which runs '
                                  f'on GPUs only: on {acc.device.type} Accelerate would train in float32; use bf16 or '
                                  f'no')
            if acc.gradient_accumulation_steps != tc.grad_accum_steps:  # the environment overrides the argument
                raise ConfigError(
                    f'train.grad_accum_steps is {tc.grad_accum_steps} but ACCELERATE_GRADIENT_ACCUMULATION_STEPS '
                    f'(accelerate launch with DeepSpeed) sets {acc.gradient_accumulation_steps}: give the same number '
                    f'in both')
            check_launched_engine(acc)
            check_deepspeed_config(acc, cfg.optim.clip_grad, tc.grad_accum_steps)
        if acc.is_main_process:
            warn_fsdp_parameter_cast(acc)
        self.out_dir = tc.output_dir
        # (a folder the main process cannot create, e.g. on a read-only mount: every process stops, naming it)
        with same_on_every_process(acc):
            if acc.is_main_process:
                os.makedirs(self.out_dir, exist_ok=True)
        if acc.num_processes > 1:
            check_shared_folder(acc, self.out_dir)
        lock_run_folder(acc, self.out_dir)  # before anything in it is read or moved
        if acc.is_main_process:  # (weights, metrics rows, config of a run killed mid-write: full size each)
            remove_temporaries(self.out_dir)
            recover_replaced_checkpoints(self.out_dir)  # (before `_build` looks for the checkpoint to resume)
        try:
            self._build(resume, allow_fresh)
        except BaseException:
            release_run_folder(self.out_dir)  # (a run that fails to start holds the folder no longer)
            raise

    def _build(self, resume, allow_fresh: bool) -> None:
        """Data, model, optimizer, schedule, EMA, loss and the resumed state (the folder is this run's)."""
        cfg, acc = self.cfg, self.accelerator
        tc = cfg.train
        set_seed(tc.seed)

        with same_on_every_process(acc) as facts:  # (machine-local too: the data's folders, model.pretrained_file)
            self.data = create_train_data(cfg, acc)
            self.num_classes = self.data.num_classes
            self.model = self._model().to(memory_format=self.data.memory_format)
            self.data.bind(self.model)
            self._state_preprocessing(self.model)
            self.micro_per_epoch = self.data.samples_per_rank() // cfg.data.batch_size
            facts.update(self.data.fingerprint())
            facts['micro-batches per process and epoch'] = self.micro_per_epoch

        self.global_batch = cfg.data.batch_size * acc.num_processes * tc.grad_accum_steps
        scale = self.global_batch / cfg.optim.lr_base_batch if cfg.optim.lr_base_batch else 1.0
        self.lr = cfg.optim.lr * scale
        ssm_lr = cfg.optim.ssm_lr * scale if cfg.optim.ssm_lr is not None else None
        for key, base in (('lr', cfg.optim.lr), ('ssm_lr', cfg.optim.ssm_lr)):
            if base is not None and base * scale < cfg.sched.min_lr:  # (timm's schedules would raise the LR to it)
                at = f' x {self.global_batch} / optim.lr_base_batch {cfg.optim.lr_base_batch}' if scale != 1 else ''
                raise ConfigError(f'sched.min_lr ({cfg.sched.min_lr}) must be at most optim.{key} at this global batch '
                                  f'({base}{at} = {base * scale:.3g}): the schedule decays to it, and would raise '
                                  f'the LR instead')
        # betas and eps only where set, as timm's train.py: each optimizer keeps its own defaults
        own = {key: getattr(cfg.optim, key) for key in ('betas', 'eps') if getattr(cfg.optim, key) is not None}
        try:
            optimizer = create_optimizer_v2(
                self.model, cfg.optim.opt, lr=self.lr, weight_decay=cfg.optim.weight_decay, **own,
                param_group_fn=partial(
                    param_groups_ssm, weight_decay=cfg.optim.weight_decay, ssm_lr=ssm_lr,
                    ssm_weight_decay=cfg.optim.ssm_weight_decay, layer_decay=cfg.optim.layer_decay))
        except (AssertionError, ImportError, ValueError) as e:  # e.g. CUDA-only (bitsandbytes, APEX), not installed
            raise ConfigError(f'optim.opt {cfg.optim.opt!r} cannot be created here: {type(e).__name__}: '
                              f'{" ".join(str(e).split())}') from None

        full_updates = self.micro_per_epoch // tc.grad_accum_steps
        self.updates_per_epoch = min(full_updates, tc.max_steps_per_epoch or full_updates)
        if self.updates_per_epoch < 1:
            # (the samples of one process's epoch: the dataset's share per process, fewer under aug.repeated_aug)
            raise ConfigError(
                f'data.batch_size={cfg.data.batch_size} x {tc.grad_accum_steps} accumulation steps is more than the '
                f'{self.data.samples_per_rank()} training samples each of the {acc.num_processes} process(es) draws '
                f'per epoch (of {self.data.num_train_samples} training {self.data.unit}): no update would run')
        left_out = self.micro_per_epoch - full_updates * tc.grad_accum_steps
        if left_out and self.updates_per_epoch == full_updates and acc.is_main_process:
            # (positions are counted in whole updates, so an epoch has no shorter last one, as timm's train.py has)
            batch = cfg.data.batch_size * acc.num_processes
            warnings.warn(
                f'train.grad_accum_steps={tc.grad_accum_steps} does not divide the {self.micro_per_epoch} '
                f'micro-batches (data.batch_size={cfg.data.batch_size}) of an epoch per process: the last {left_out} '
                f'are left out, {left_out * batch} of the {self.micro_per_epoch * batch} {self.data.unit} an epoch '
                f'draws (others each epoch, as they are shuffled); choose data.batch_size or train.grad_accum_steps '
                f'so that it divides them')
        self.scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched.sched, num_epochs=tc.epochs, warmup_epochs=cfg.sched.warmup_epochs,
            warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr, decay_rate=cfg.sched.decay_rate,
            step_on_epochs=False, updates_per_epoch=self.updates_per_epoch)

        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.ema = None
        if tc.ema_decay is not None:
            if acc.distributed_type == DistributedType.FSDP:  # the unwrapped module holds only this rank's shard
                raise ConfigError('train.ema_decay: model EMA needs whole weights on every process (DDP or one '
                                  'process), not FSDP; set it to null')
            # a copy of the plain module (not of a `--dynamo_backend` compiled wrapper, whose keys gain '_orig_mod.')
            self.ema = ModelEmaV3(acc.unwrap_model(self.model, keep_torch_compile=False), decay=tc.ema_decay,
                                  device=acc.device)
            acc.register_for_checkpointing(self.ema)
        self.state = TrainState(global_batch=self.global_batch)
        acc.register_for_checkpointing(self.scheduler, self.state)

        self.mixup = None
        if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
                switch_prob=cfg.aug.mixup_switch_prob, label_smoothing=cfg.aug.smoothing,
                num_classes=self.num_classes)
            self.train_loss = SoftTargetCrossEntropy()
        elif cfg.aug.smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(cfg.aug.smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()
        self.data.prepare_evaluation()

        self.logs_set_aside = False
        self.fit_started = False  # (a later fit() goes on from this one's metrics rows, not the checkpoint's)
        self.epoch_progress = None  # (`train_one_epoch`'s sums at its last update, for a fit() after an interrupt)
        self.update_buffers = None  # (the update in progress and the model's buffers before it, for the same)
        self.resumed_from = checkpoint_to_resume(self.out_dir, resume, allow_fresh, say=acc.print)
        if self.resumed_from is not None:
            # this run's config sets the hyperparameters (lr, weight decay, schedule length, ...): the checkpoint
            # restores the weights, the optimizer's moments and the position, and the schedule goes on from there
            # (only the config's values: optimizers also keep counters in their groups, e.g. lookahead_step)
            fresh_groups = [{k: g[k] for k in _CONFIG_GROUP_KEYS if k in g} for g in self.optimizer.param_groups]
            fresh_schedule = self.scheduler.state_dict()  # (cosine, tanh, poly: a function of the config alone)
            load_checkpoint(acc, self.resumed_from, self.state, config_to_dict(cfg))
            # a non-finite streak counts afresh: the epoch-end checkpoint is written within one too (its weights are
            # the last good update's), and it is resumed as the last good checkpoint, e.g. with a lower optim.lr
            self.state.nonfinite_in_a_row = 0
            for group, fresh in zip(self.optimizer.param_groups, fresh_groups):
                group.update(fresh)
            self.scheduler.load_state_dict(fresh_schedule)
            self.scheduler.step_update(num_updates=self.state.update)
            if self.state.global_batch not in (0, self.global_batch):  # e.g. restarted on fewer GPUs
                factor = self.state.global_batch / self.global_batch
                hint = (f'train.grad_accum_steps={tc.grad_accum_steps * factor:g}' if factor == int(factor) else
                        f'data.batch_size={cfg.data.batch_size * factor:g}' if cfg.data.batch_size * factor % 1 == 0
                        else 'processes x data.batch_size x train.grad_accum_steps')
                raise ConfigError(
                    f'--resume: {self.resumed_from} was written by a run of {self.state.global_batch} {self.data.unit} '
                    f'per update; this run has {acc.num_processes} process(es) x data.batch_size={cfg.data.batch_size}'
                    f' x train.grad_accum_steps={tc.grad_accum_steps} = {self.global_batch}. Keep '
                    f'{self.state.global_batch} (e.g. {hint}): the learning rate, its schedule and the position in '
                    f'the epoch are counted in updates of that size')
            self.state.global_batch = self.global_batch  # (a checkpoint written before it was recorded)
            self._check_epochs_left()  # (before anything is set aside)
            moved = set_aside_newer(acc, self.out_dir, self.state.update)
            # (main process) the trackers' logs went with the abandoned branch: the new ones get the checkpoint's rows
            self.logs_set_aside = any(os.path.basename(p).endswith(f'-{LOGS_DIR}') for p in moved)
            if not restore_best_weights(acc, self.out_dir, self.resumed_from):  # the branch exports its own best
                fresh = TrainState()
                self.state.best_top1, self.state.best_epoch = fresh.best_top1, fresh.best_epoch
        self.log = MetricsLog(acc, cfg)
        # the last epoch's row, `fit`'s summary['last']: the checkpoint's where a resumed run trains no further epoch
        self.last_row = last_row(os.path.join(self.resumed_from, METRICS_FILE)) if self.resumed_from else {}

    def _model(self) -> nn.Module:
        mc, data = self.cfg.model, self.cfg.data
        kwargs = dict(mc.kwargs, num_classes=self.num_classes, in_chans=data.in_chans,
                      drop_rate=mc.drop_rate, drop_path_rate=mc.drop_path_rate)
        kwargs.update(self.data.input_size_kwargs(mc.name))  # built for it: the S4ND kernels' reference grids
        if mc.pretrained_file:
            if os.path.isdir(mc.pretrained_file):  # (e.g. a training checkpoint, step-N)
                raise ConfigError(f'model.pretrained_file must be a weights file, got the folder {mc.pretrained_file}:'
                                  f' {WEIGHTS_FILE_HINT} (--resume continues a run from its checkpoint folder)')
            if not os.path.isfile(mc.pretrained_file):
                raise ConfigError(f'model.pretrained_file not found: {mc.pretrained_file}')
            overlay = dict(file=mc.pretrained_file)
            classes = weights_num_classes(mc.name, mc.pretrained_file)
            if classes is not None:  # timm then keeps the file's classifier where it fits
                overlay.update(num_classes=classes)
            kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        try:
            return timm.create_model(mc.name, **kwargs)
        except RuntimeError as e:
            if 'Unknown model' in str(e):
                raise ConfigError(f'model.name: {e}') from None
            raise

    def _state_preprocessing(self, model: nn.Module) -> None:
        """Give `model` a pretrained cfg stating the preprocessing it trains with (channels and size, mean, std,
        crop, interpolation: `data.data_config`), as the weights loaded with the printed call state it: timm's data
        config of `trainer.model` (`resolve_model_data_config`, `eval_resolution`) then gives the training one, not
        the registry's (e.g. ImageNet's mean and std for MNIST). The registry's is kept for that call."""
        self.registered_cfg = dict(model.pretrained_cfg)
        trained = {key: self.data.data_config[key] for key in ('mean', 'std', 'crop_pct', 'interpolation')}
        if len(self.registered_cfg.get('input_size') or ()) == 3:  # (video models keep their (C, T, H, W))
            trained['input_size'] = (self.cfg.data.in_chans, self.cfg.data.img_size, self.cfg.data.img_size)
        model.pretrained_cfg = model.default_cfg = dict(self.registered_cfg, **trained)

    def _broadcast_ema_buffers(self) -> None:
        """Give every process the main process's EMA buffers, the ones `last_ema.safetensors` holds, before the EMA is
        evaluated: DDP broadcasts the model's buffers from the main process at each forward, not the EMA's, so with
        BatchNorm each process's EMA averages its own running statistics, and the processes would score their shares
        of the validation set with different EMA models (`ema_*` then the metric of none of them)."""
        if self.accelerator.num_processes > 1:
            for buffer in self.ema.module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _save_checkpoint(self, row: Optional[Dict[str, Any]] = None) -> None:
        """A checkpoint at the current update, with the config and the metrics rows (and `row`, the epoch it
        completes); refused when any weight is not finite."""
        self._check_finite_weights()
        save_checkpoint(self.accelerator, self.out_dir, self.state.update, self.cfg.train.keep_checkpoints,
                        write_extra=lambda folder: self.log.snapshot(folder, row))

    def _export(self, name: str, model: nn.Module) -> str:
        """Weights as `output_dir/<name>.safetensors` (see `checkpoint.export_weights`), if all finite."""
        self._check_finite_weights()
        return export_weights(self.accelerator, model, os.path.join(self.out_dir, f'{name}.safetensors'),
                              update=self.state.update)

    def _check_finite_weights(self) -> None:
        modules = [self.model] + ([self.ema.module] if self.ema is not None else [])
        if not all_finite(self.accelerator, *modules):
            raise TrainingDiverged(
                f'the weights hold non-finite values at update {self.state.update} (epoch {self.state.epoch}): '
                f'nothing was written; {self._last_good()}')

    def _nonfinite_update(self) -> None:
        """Count an update skipped for a non-finite loss or gradient; raise TrainingDiverged past
        train.max_nonfinite_steps."""
        state, limit = self.state, self.cfg.train.max_nonfinite_steps
        state.nonfinite_in_a_row += 1
        self.accelerator.print(f'update {state.update}: the loss or a gradient is not finite on some process; '
                               f'update skipped ({state.nonfinite_in_a_row} in a row, '
                               f'train.max_nonfinite_steps={limit})')
        if state.nonfinite_in_a_row > limit:
            raise TrainingDiverged(
                f'training diverged: the loss or a gradient was not finite in {state.nonfinite_in_a_row} updates in '
                f'a row (epoch {state.epoch}, update {state.update}; train.max_nonfinite_steps={limit}); those updates '
                f'were skipped and nothing was written from them; {self._last_good()}')

    def _check_epochs_left(self) -> None:
        """A resumed checkpoint at or past train.epochs, or past the end of its last epoch, is a ConfigError saying
        what to give instead: the run would train nothing (or drop the rest of an epoch) and still end as a success.
        Only a run resumed exactly at its completed end (its latest checkpoint, at the end of its last epoch) goes on:
        nothing to train, `fit` says the run is complete."""
        state, epochs, checkpoint = self.state, self.cfg.train.epochs, self.resumed_from
        latest = latest_checkpoint(self.out_dir)
        if (state.epoch == epochs and not state.step_in_epoch and latest is not None
                and os.path.realpath(latest) == os.path.realpath(checkpoint)):
            return
        at = (f'--resume: {checkpoint} is at epoch {state.epoch} (update {state.update}, {state.step_in_epoch} into '
              f'the epoch)')
        earlier = f'resume an earlier checkpoint (--resume {os.path.join(self.out_dir, "checkpoints", "step-N")})'
        if state.epoch >= epochs:
            raise ConfigError(f'{at}; train.epochs={epochs} leaves nothing to train: give train.epochs > '
                              f'{state.epoch}, or {earlier}')
        if state.epoch == epochs - 1 and state.step_in_epoch > self.updates_per_epoch:
            raise ConfigError(f'{at}, past the end of the last epoch (train.epochs={epochs}), which has '
                              f'{self.updates_per_epoch} updates now (train.max_steps_per_epoch='
                              f'{self.cfg.train.max_steps_per_epoch}): give train.epochs > {epochs} or '
                              f'train.max_steps_per_epoch >= {state.step_in_epoch}, or {earlier}')

    def _epoch_seconds_so_far(self, epoch: int) -> float:
        """The seconds `epoch` trained before this fit() (0 at its start): those of a fit() interrupted within it
        (Ctrl-C in a notebook), whose sums `train_one_epoch` goes on from, else the resumed checkpoint's (which hold
        those up to the last checkpoint only, not the interrupted fit()'s since)."""
        state, progress = self.state, self.epoch_progress
        if state.epoch != epoch or not state.step_in_epoch:
            return 0.0
        if progress is not None and progress[:2] == (epoch, state.update):
            return progress[3]
        return state.epoch_seconds

    def _last_good(self) -> str:
        latest = latest_checkpoint(self.out_dir)
        if latest is None:
            return 'no checkpoint was written before (start again with, e.g., a lower optim.lr)'
        return f'the last good checkpoint is {latest} (resume from it with, e.g., a lower optim.lr)'

    def _skip_update(self, bad: torch.Tensor) -> Optional[str]:
        """At the last micro-step of an update, after clipping the gradients (`optim.clip_grad`): why the update is
        skipped, or None. 'nonfinite': some process saw a non-finite loss (`bad`) or gradient. 'overflow' (fp16): only
        the gradients were not finite, at a GradScaler loss scale of at least 1: the scaler's normal back-off (it
        halves the scale), not counted as divergence. Below scale 1 the gradients overflow or are NaN unscaled."""
        acc, clip = self.accelerator, self.cfg.optim.clip_grad
        scaler = acc.scaler if acc.mixed_precision == 'fp16' else None
        # the clipping's norm where it clips; fp16: the gradients unscaled (by the clipping, or here) to be checked
        norm = acc.clip_grad_norm_(self.model.parameters(), clip) if clip is not None else None
        if scaler is not None and norm is None:
            acc.unscale_gradients()
        if acc.mixed_precision == 'fp16' and scaler is None:
            # an engine that scales the loss itself (DeepSpeed): its gradients are scaled, and it skips its overflows
            grad_bad = torch.zeros_like(bad)
        else:
            grad_bad = ~torch.isfinite(grad_norm(self.model) if norm is None else norm)
        loss_bad, grad_bad = (acc.reduce(torch.stack([bad, grad_bad]).float(), reduction='sum') > 0).tolist()
        if not (loss_bad or grad_bad):
            return None
        if scaler is not None:  # the step is skipped, so the scaler updates here (it halves the scale on inf/NaN)
            scale = scaler.get_scale()
            scaler.update()
            if not loss_bad and scale >= 1:
                return 'overflow'
        return 'nonfinite'

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        acc, cfg, state = self.accelerator, self.cfg, self.state
        stage = cfg.stage_at(epoch)
        model = self.model
        unwrapped = acc.unwrap_model(model, keep_torch_compile=False)
        bandlimit = cfg.bandlimit_at(epoch)  # (an earlier stage's too: a resumed model may not hold it)
        if bandlimit is not None:  # the EMA model too: it is evaluated and exported with its own cut-off
            for m in [unwrapped] + ([self.ema.module] if self.ema is not None else []):
                set_bandlimit(m, bandlimit)
        start = state.step_in_epoch if state.epoch == epoch else 0
        accum = cfg.train.grad_accum_steps
        # Accelerate's micro-batch count decides when gradients sync: counted in this run's accumulation, so that a
        # resumed checkpoint's (Accelerate restores its own: one written without accumulation would shift every
        # update) and a fit() before interrupted within an update (e.g. Ctrl-C in a notebook: its micro-batches'
        # gradients would add to this one's) start the update afresh
        acc.step = state.update * accum
        model.zero_grad(set_to_none=True)
        scaler = acc.scaler if acc.mixed_precision == 'fp16' else None
        if scaler is not None and hasattr(scaler, '_per_optimizer_states'):
            # (fp16) and the GradScaler forgets an unscaling of it (interrupted between `_skip_update` and the step):
            # its next one would raise 'unscale_() has already been called on this optimizer since the last update()'
            scaler._per_optimizer_states.clear()
        loader = self.data.train_batches(epoch, stage.img_size, start * accum, self.updates_per_epoch * accum)
        model.train()
        # the buffers as they were before the update in progress: a forward pass changes some (BatchNorm's running
        # statistics), and a skipped update gets them back (a non-finite forward left them non-finite, and every
        # later evaluation and checkpoint then: the run stopped as if its weights had diverged)
        buffers = list(unwrapped.buffers())
        if buffers and self.update_buffers is not None and self.update_buffers[0] == state.update:
            # a fit() interrupted within this update (Ctrl-C in a notebook): its micro-batches' passes count no more
            with torch.no_grad():
                for buffer, saved in zip(buffers, self.update_buffers[1]):
                    buffer.copy_(saved)
        before = [b.detach().clone() for b in buffers]
        total_micro = (self.updates_per_epoch - start) * accum
        # the epoch's sums over all processes up to `start` (a mid-epoch resume), then this process's own
        carried = list(state.epoch_sums) if start else [0.0] * 5
        carried_seconds = state.epoch_seconds if start else 0.0
        sums = sum_dtype(acc.device)
        loss_sum = torch.zeros((), device=acc.device, dtype=sums)
        n_finite = torch.zeros((), device=acc.device, dtype=sums)  # samples with a finite loss
        update_loss, update_n = torch.zeros_like(loss_sum), torch.zeros_like(n_finite)  # this update's, until applied
        bad = torch.zeros((), device=acc.device, dtype=torch.bool)  # a non-finite loss in this update
        seen = skipped = nonfinite = 0
        if start and self.epoch_progress is not None and self.epoch_progress[:2] == (epoch, state.update):
            # a fit() interrupted within this epoch (e.g. Ctrl-C in a notebook): its sums go on, as a checkpoint's do
            carried, carried_seconds, loss_sum, n_finite, seen, skipped, nonfinite = self.epoch_progress[2:]
            loss_sum, n_finite = loss_sum.clone(), n_finite.clone()
        bar = tqdm(total=self.updates_per_epoch, initial=start, desc=f'epoch {epoch} @{stage.img_size}px',
                   disable=not acc.is_local_main_process, mininterval=progress_refresh_s(), dynamic_ncols=True,
                   leave=False)
        t0 = time.perf_counter()

        def epoch_sums() -> List[float]:  # a collective: every process calls it
            local = torch.stack([loss_sum, n_finite, torch.tensor(float(seen), dtype=sums, device=acc.device),
                                 torch.tensor(float(skipped), dtype=sums, device=acc.device),
                                 # every process counts the same skipped updates: the main process's count
                                 torch.tensor(float(nonfinite if acc.is_main_process else 0), dtype=sums,
                                              device=acc.device)])
            return [c + t for c, t in zip(carried, acc.reduce(local, reduction='sum').tolist())]

        try:
            for micro, (x, y, n_skipped) in enumerate(loader):
                if micro >= total_micro:
                    break
                x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
                seed_all(seed_from(cfg.train.seed, 'step', state.update, micro % accum, acc.process_index))
                if self.mixup is not None:  # a clip mixes as a (C * T, H, W) image: one lambda and CutMix box per clip
                    shape = x.shape
                    x, y = self.mixup(x.flatten(1, -3), y)
                    x = x.view(shape)
                x = x.contiguous(memory_format=self.data.memory_format)
                if buffers and micro % accum == 0:  # (an update's first micro-batch)
                    with torch.no_grad():
                        for saved, buffer in zip(before, buffers):
                            saved.copy_(buffer)
                    self.update_buffers = (state.update, before)
                with acc.accumulate(model):
                    loss = self.train_loss(model(x), y)
                    acc.backward(loss)
                    finite = torch.isfinite(loss.detach())
                    bad |= ~finite
                    # per sample: a mid-epoch resume may split the same update into other micro-batches
                    update_loss += torch.where(finite, loss.detach().to(sums) * x.shape[0], 0.0)
                    update_n += finite * x.shape[0]
                    skip = None
                    if acc.sync_gradients:  # the last micro-step of an update
                        skip = self._skip_update(bad)
                        bad.zero_()
                        if skip:
                            with torch.no_grad():
                                for saved, buffer in zip(before, buffers):
                                    buffer.copy_(saved)
                        if not skip:  # a skipped update's finite losses stay out of train_loss too
                            loss_sum += update_loss
                            n_finite += update_n
                        update_loss.zero_()
                        update_n.zero_()
                    if not skip:
                        self.optimizer.step()  # Accelerate steps only when gradients sync
                    self.optimizer.zero_grad(set_to_none=True)
                seen += x.shape[0]
                skipped += int(n_skipped.sum())
                if (micro + 1) % accum == 0:  # an update happened (or was skipped)
                    state.update += 1
                    state.step_in_epoch += 1
                    self.scheduler.step_update(num_updates=state.update)
                    if skip:
                        nonfinite += 1
                        if skip == 'nonfinite':  # (an fp16 overflow neither counts nor ends a non-finite streak)
                            self._nonfinite_update()
                    else:
                        state.nonfinite_in_a_row = 0
                        if self.ema is not None:
                            self.ema.update(unwrapped, step=state.update)
                    self.epoch_progress = (epoch, state.update, carried, carried_seconds + time.perf_counter() - t0,
                                           loss_sum.clone(), n_finite.clone(), seen, skipped, nonfinite)
                    if bar.update(1):  # (a redraw: the next one shows these; loss.item() waits for the device)
                        bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{self.optimizer.param_groups[-1]["lr"]:.2e}',
                                        refresh=False)
                    every = cfg.train.checkpoint_every_steps
                    if (every and state.update % every == 0 and state.step_in_epoch < self.updates_per_epoch
                            and not state.nonfinite_in_a_row):  # the last checkpoint precedes a non-finite streak
                        state.epoch_sums = epoch_sums()
                        state.epoch_seconds = carried_seconds + time.perf_counter() - t0
                        self._save_checkpoint()
        finally:
            bar.close()
        elapsed = carried_seconds + time.perf_counter() - t0
        loss_total, finite_total, seen_total, skipped_total, nonfinite_total = epoch_sums()
        exact = self.data.skipped_in_epoch()  # counted over the whole epoch, also across a mid-epoch resume
        if exact is not None:
            skipped_total = exact
        state.epoch_sums, state.epoch_seconds = [0.0] * 5, 0.0  # the next checkpoint starts a new epoch
        return {
            'train_loss': loss_total / finite_total if finite_total else math.nan,  # (every update skipped: no loss)
            self.data.rate_name: seen_total / max(elapsed, 1e-9),
            f'skipped_{self.data.unit}': int(skipped_total),
            'nonfinite_steps': int(nonfinite_total),
            'lr': max(g['lr'] for g in self.optimizer.param_groups),
            'train_img_size': stage.img_size,
        }

    def evaluate(self, model: Optional[nn.Module] = None) -> Dict[str, float]:
        """Top-1/top-5 and loss on the validation split at data.img_size, over all processes (video: per video)."""
        return self.data.evaluate(model if model is not None else self.model)

    def fit(self) -> Dict[str, Any]:
        """Train from the current state to the last epoch; returns the final summary. The run folder is free again
        afterwards, also when training fails (divergence, an interrupt). The trackers are finished; the process group
        of a multi-process run stays up, for `evaluate` after it: end a script with `accelerator.end_training()`.
        A fit() after an interrupted one (Ctrl-C in a notebook) goes on where it stopped, holding the folder again."""
        lock_run_folder(self.accelerator, self.out_dir)  # (held since __init__ at the first fit(): a no-op there)
        try:
            return self._fit()
        finally:
            release_run_folder(self.out_dir)

    def _fit(self) -> Dict[str, Any]:
        acc, cfg, state = self.accelerator, self.cfg, self.state
        # the checkpoint's rows at the first fit() only: a fit() after an interrupted one keeps the rows written since
        self.log.begin(state.epoch, None if self.fit_started else self.resumed_from,
                       new_logs=self.logs_set_aside and not self.fit_started)
        self.fit_started = True
        reset_peak_memory(acc.device)
        if state.epoch == cfg.train.epochs:  # (resumed at its completed end: `_check_epochs_left`)
            acc.print(f'--resume: the run is complete ({self.resumed_from} ends epoch {state.epoch - 1}, the last of '
                      f'train.epochs={cfg.train.epochs}): nothing to train; give train.epochs > {cfg.train.epochs} '
                      f'to train on')
        else:
            acc.print(f'training {cfg.model.name} on {acc.num_processes} process(es), global batch '
                      f'{self.global_batch}, lr {self.lr:.3g}, {self.updates_per_epoch} updates/epoch, '
                      f'epochs {state.epoch}..{cfg.train.epochs - 1}')
        t_start = time.perf_counter()
        for epoch in range(state.epoch, cfg.train.epochs):
            # (an epoch resumed mid-way: the seconds before the interruption count, as in its img_per_s)
            t0 = time.perf_counter() - self._epoch_seconds_so_far(epoch)
            row = dict(epoch=epoch, **self.train_one_epoch(epoch))
            # the epoch's end (evaluation, best weights, exports, checkpoint, row) changes the state only for good:
            # interrupted in it (Ctrl-C in a notebook, e.g. during a checkpoint's write), the state is the epoch's
            # last update again, so the next fit() redoes it, where it would skip the epoch's row and checkpoint, or
            # keep the earlier best.safetensors as this epoch's best (`MetricsLog.begin` drops a row logged in part)
            before = (state.epoch, state.step_in_epoch, state.best_top1, state.best_epoch)
            try:
                last = epoch == cfg.train.epochs - 1
                if last or (epoch + 1) % cfg.train.eval_every_epochs == 0:
                    row.update(self.evaluate())
                    if self.ema is not None:
                        self._broadcast_ema_buffers()
                        row.update({f'ema_{k}': v for k, v in self.evaluate(self.ema.module).items()
                                    if not k.startswith(('val_skipped', 'val_videos'))})
                        # (its weights change at every update: the next evaluation rebuilds them anyway)
                        drop_inference_caches(self.ema.module)
                    if row['top1'] > state.best_top1:
                        state.best_top1, state.best_epoch = row['top1'], epoch
                        self._export('best', self.model)
                row.update(peak_mem_mb=peak_memory_mb(acc.device), epoch_time_s=time.perf_counter() - t0)
                state.epoch, state.step_in_epoch = epoch + 1, 0
                self._export('last', self.model)
                if self.ema is not None:
                    self._export('last_ema', self.ema.module)
                self._save_checkpoint(row)  # the row is part of the checkpoint: a resume restores it
                self.log.log(row, epoch)
                self.last_row = row
            except BaseException:
                state.epoch, state.step_in_epoch, state.best_top1, state.best_epoch = before
                raise
        for tracker in acc.trackers:  # (not `end_training`: it ends the process group, which `evaluate` still needs)
            tracker.finish()
        summary = dict(best_top1=state.best_top1, best_epoch=state.best_epoch, last=self.last_row,
                       minutes=(time.perf_counter() - t_start) / 60, output_dir=self.out_dir)
        best = os.path.join(self.out_dir, BEST_FILE)
        if not os.path.isfile(best):  # (a branch resumed at its last epoch, from a checkpoint that kept no best)
            acc.print(f'done: {cfg.model.name}; no {BEST_FILE} in {self.out_dir}: this branch evaluated no epoch')
            return summary
        # the call that rebuilds this model: its own arguments too (channels, architecture kwargs, training size)
        unwrapped = acc.unwrap_model(self.model, keep_torch_compile=False)
        build = dict(cfg.model.kwargs, **({} if cfg.data.in_chans == 3 else {'in_chans': cfg.data.in_chans}),
                     **self.data.rebuild_kwargs(cfg.model.name, unwrapped))
        build_kwargs = ''.join(f'{k}={v!r}, ' for k, v in build.items())
        # the file's channels and size where they are not the registry cfg's (timm would warn that the channels
        # differ; a timm ViT's cfg keeps 224), and the preprocessing it was trained with where it is not the
        # model's default: timm's data config of the loaded model then gives them
        size, source = cfg.data.img_size, ''
        trained = (cfg.data.in_chans, size, size)
        registered = tuple(self.registered_cfg['input_size'])
        if len(registered) == 3 and registered != trained:
            source = f', input_size={trained!r}'  # (images: video models are built for their clips, RGB only)
        for key in ('mean', 'std', 'crop_pct', 'interpolation'):
            value = self.data.data_config[key]
            value = tuple(value) if isinstance(value, (list, tuple)) else value
            default = self.registered_cfg.get(key)
            if value != (tuple(default) if isinstance(default, (list, tuple)) else default):
                source += f', {key}={value!r}'
        acc.print(f'done: {cfg.model.name} best top-1 {state.best_top1:.2f}% (epoch {state.best_epoch}) in '
                  f'{summary["minutes"]:.1f} min; metrics {self.log.path}\n'
                  f'load the weights with timm.create_model({cfg.model.name!r}, pretrained=True, '
                  f'num_classes={self.num_classes}, {build_kwargs}'
                  f'pretrained_cfg_overlay=dict(file={best!r}, num_classes={self.num_classes}{source}))')
        return summary
