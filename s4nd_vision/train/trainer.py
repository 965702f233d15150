"""The Accelerate-driven trainer: one class, the same code single-process, multi-process and multi-node.

Accelerate owns devices, distribution (DDP/FSDP from `accelerate launch` and its configs), mixed
precision, gradient accumulation and checkpoint state; timm owns the model registry, transforms,
Mixup/CutMix, losses, optimizer and scheduler factories and the EMA.

Determinism and resumption: sample order depends only on (seed, epoch), each sample's augmentation
is seeded from (seed, epoch, index) and every micro-step reseeds the global generators from
(seed, step, rank) (Mixup, drop path), so a run resumed from a checkpoint, even mid-epoch, repeats
the uninterrupted run exactly. Checkpoints are written to a temporary folder and renamed when every
process has finished writing, so a run killed at any moment leaves only complete checkpoints.

Video (`data.dataset: hmdb51`, models taking (B, C, T, H, W) clips): each process reads its own
shard of the videos (`Hmdb51Clips(num_shards=num_processes, shard_id=rank)`; Accelerate does not
shard the iterable dataset, which would make every rank decode every video). Every rank runs
exactly the epoch's number of updates, computed from the shard size: a rank left short of clips
by unreadable videos starts another pass over its shard, so DDP never waits on a rank that ran
out. Each batch's random clips and augmentation are seeded from (seed, epoch, rank, batch) (with
`data.workers > 0`, the workers' generators from (seed, epoch, rank)), so resuming at an epoch
boundary (with the same `data.workers`) repeats the uninterrupted run exactly. An iterable dataset cannot seek: a mid-epoch
resume decodes and discards the batches this rank had already trained on in that epoch, then
continues with the same batches, so it too repeats the uninterrupted run (at the cost of decoding
up to an epoch of clips). Evaluation scores `data.clips_per_video` clips per test video on each
rank's shard with the unwrapped model, gathers the scores, counts videos repeated to even out the
shards once, and reports clip top-1 and video top-1/top-5 (the mean softmax of a video's clips).
"""
import csv
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from safetensors.torch import save_file
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.images import EpochSeeded, ImageFolderDataset, ResumableSampler, seed_all, seed_from
from ..layers import set_bandlimit
from .optim import param_groups_ssm
from .config import Config, ConfigError, config_to_dict

__all__ = ['Trainer', 'TrainState', 'latest_checkpoint']

_CKPT_RE = re.compile(r'^step-(\d+)$')


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint (registered with Accelerate)."""
    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # optimizer updates done in that epoch
    update: int = 0  # optimizer updates done in total
    best_top1: float = -1.0
    best_epoch: int = -1

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The most advanced complete checkpoint under output_dir/checkpoints (None if there is none)."""
    root = os.path.join(output_dir, 'checkpoints')
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _CKPT_RE.match(name))]
    return os.path.join(root, max(steps)[1]) if steps else None


class _WithSkipCount(Dataset):
    """Adds a zero skip count to (image, target) samples of datasets that cannot fail to read."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        img, target = self.dataset[index][:2]
        return img, target, 0


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux: KiB -> MiB (process peak RSS)


def _atomic_save_file(state: Dict[str, torch.Tensor], path: str) -> None:
    tmp = path + '.tmp'
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


class Trainer:
    """Trains a timm model as `cfg` says. `fit()` runs (or resumes) the whole schedule.

    Args:
        cfg: a validated `Config`.
        resume: True = continue from the latest checkpoint in `cfg.train.output_dir` (fresh
            start if there is none), a path = continue from that checkpoint, False = fresh start.
    """

    def __init__(self, cfg: Config, resume=False):
        self.cfg = cfg
        tc = cfg.train
        self.accelerator = Accelerator(
            mixed_precision=tc.mixed_precision,
            gradient_accumulation_steps=tc.grad_accum_steps,
            log_with=tc.trackers or None,
            project_dir=tc.output_dir,
            step_scheduler_with_optimizer=False,
        )
        acc = self.accelerator
        self.out_dir = tc.output_dir
        if acc.is_main_process:
            os.makedirs(self.out_dir, exist_ok=True)
        set_seed(tc.seed)

        self.video = cfg.data.dataset == 'hmdb51'
        self.train_set, self.val_set, self.num_classes = self._datasets()
        self.model = self._model()
        self.data_config = resolve_data_config(
            dict(mean=cfg.data.mean, std=cfg.data.std, crop_pct=cfg.data.crop_pct, interpolation=cfg.data.interpolation),
            model=self.model)
        for key in ('mean', 'std'):  # a 3-channel default for a model trained on fewer channels: average it
            if len(self.data_config[key]) != cfg.data.in_chans:
                avg = sum(self.data_config[key]) / len(self.data_config[key])
                self.data_config[key] = (avg,) * cfg.data.in_chans

        self.global_batch = cfg.data.batch_size * acc.num_processes * tc.grad_accum_steps
        scale = self.global_batch / cfg.optim.lr_base_batch if cfg.optim.lr_base_batch else 1.0
        self.lr = cfg.optim.lr * scale
        ssm_lr = cfg.optim.ssm_lr * scale if cfg.optim.ssm_lr is not None else None
        optimizer = create_optimizer_v2(
            self.model, cfg.optim.opt, lr=self.lr, weight_decay=cfg.optim.weight_decay,
            betas=cfg.optim.betas, eps=cfg.optim.eps,
            param_group_fn=partial(
                param_groups_ssm, weight_decay=cfg.optim.weight_decay, ssm_lr=ssm_lr,
                ssm_weight_decay=cfg.optim.ssm_weight_decay, layer_decay=cfg.optim.layer_decay,
                no_weight_decay_list=tuple(getattr(self.model, 'no_weight_decay', lambda: ())())))

        if self.video:  # Hmdb51Clips is this rank's shard already; every shard holds as many videos
            per_rank = len(self.train_set)
        else:
            per_rank = len(ResumableSampler(
                self.train_set, 0, acc.num_processes, acc.process_index, tc.seed, repeats=cfg.aug.repeated_aug))
        self.micro_per_epoch = per_rank // cfg.data.batch_size
        self.updates_per_epoch = self.micro_per_epoch // tc.grad_accum_steps
        if tc.max_steps_per_epoch:
            self.updates_per_epoch = min(self.updates_per_epoch, tc.max_steps_per_epoch)
        if self.updates_per_epoch < 1:
            total = self.train_set.num_videos if self.video else len(self.train_set)
            raise ConfigError(
                f'data.batch_size={cfg.data.batch_size} x {acc.num_processes} processes x '
                f'{tc.grad_accum_steps} accumulation steps is more than the {total} training '
                f'{"videos" if self.video else "images"}')
        self.scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched.sched, num_epochs=tc.epochs, warmup_epochs=cfg.sched.warmup_epochs,
            warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr, step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch)

        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.ema = None
        if tc.ema_decay is not None:
            if acc.distributed_type == DistributedType.FSDP:  # the unwrapped module holds only this rank's shard
                raise ConfigError('train.ema_decay: model EMA needs whole weights on every process (DDP or one '
                                  'process), not FSDP; set it to null')
            self.ema = ModelEmaV3(acc.unwrap_model(self.model), decay=tc.ema_decay, device=acc.device)
            acc.register_for_checkpointing(self.ema)
        self.state = TrainState()
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
        self.val_loader = self._val_loader()

        latest = latest_checkpoint(self.out_dir)
        if resume:
            path = resume if isinstance(resume, str) else latest
            if path is not None:
                self._load_checkpoint(path)
        elif latest is not None:
            raise ConfigError(f'train.output_dir {self.out_dir!r} already holds checkpoints ({latest}): '
                              'pass --resume to continue that run, or choose another output_dir')
        if tc.trackers:
            acc.init_trackers('logs', config=_flat(config_to_dict(cfg)))

    # ----------------------------------------------------------------------------------------- setup

    def _datasets(self) -> Tuple[Dataset, Dataset, int]:
        data = self.cfg.data
        if self.video:
            from ..data.video import Hmdb51Clips  # pytorchvideo is heavy: imported for video only
            acc = self.accelerator
            common = dict(video_dir=data.root, split_dir=data.split_dir, split_id=data.split,
                          clip_duration=data.clip_duration, num_shards=acc.num_processes, shard_id=acc.process_index,
                          seed=self.cfg.train.seed)
            try:
                train = Hmdb51Clips(split='train', **common)
                val = Hmdb51Clips(split='test', clips_per_video=data.clips_per_video, with_video_index=True, **common)
            except (OSError, ValueError) as e:
                raise ConfigError(f'data.root / data.split_dir (HMDB-51): {e}') from None
            return train, val, len(train.classes)
        if data.dataset == 'mnist':
            from ..data.mnist import MNIST5k
            # 28 px originals as tensors; the transforms resample them to each stage's resolution
            train = MNIST5k('train', img_size=28, in_chans=data.in_chans)
            val = MNIST5k('val', img_size=28, in_chans=data.in_chans)
            return _WithSkipCount(train), _WithSkipCount(val), 10
        mode = 'L' if data.in_chans == 1 else 'RGB'
        splits = []
        for split in (data.train_split, data.val_split):
            folder = os.path.join(data.root, split)
            if not os.path.isdir(folder):
                raise ConfigError(f'data.root: no {split!r} folder in {data.root!r} (expected {split}/<class>/<image>)')
            splits.append(ImageFolderDataset(folder, input_img_mode=mode))
        train, val = splits
        if train.reader.class_to_idx != val.reader.class_to_idx:
            raise ConfigError(f'data.root: {data.train_split!r} and {data.val_split!r} hold different class folders')
        return train, val, len(train.reader.class_to_idx)

    def _model(self) -> nn.Module:
        mc, data = self.cfg.model, self.cfg.data
        kwargs = dict(mc.kwargs, num_classes=self.num_classes, in_chans=data.in_chans,
                      drop_rate=mc.drop_rate, drop_path_rate=mc.drop_path_rate)
        if mc.pretrained_file:
            if not os.path.isfile(mc.pretrained_file):
                raise ConfigError(f'model.pretrained_file not found: {mc.pretrained_file}')
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=mc.pretrained_file))
        try:
            model = timm.create_model(mc.name, **kwargs)
        except RuntimeError as e:
            if 'Unknown model' in str(e):
                raise ConfigError(f'model.name: {e}') from None
            raise
        if self.video:  # the training clip is the kernels' reference, in time too
            if len(model.pretrained_cfg.get('input_size', ())) != 4:  # video models state (C, T, H, W)
                raise ConfigError(f'model.name: {mc.name} takes images; data.dataset hmdb51 needs a video model '
                                  'taking (B, C, T, H, W) clips, e.g. convnext_s4nd_3d_tiny')
            model.set_input_size(data.img_size, num_frames=data.num_frames)
        elif hasattr(model, 'set_input_size'):  # S4ND models: the training grid is the kernels' reference
            model.set_input_size(data.img_size)
        return model

    def _transform(self, img_size: int, training: bool):
        data, aug = self.cfg.data, self.cfg.aug
        dc = self.data_config
        if self.video:
            from ..data.video import VideoTransform
            randaugment = aug.video_randaugment()
            ops, magnitude = randaugment if randaugment else (2, None)
            return VideoTransform(
                train=training and not aug.no_aug, num_frames=data.num_frames, img_size=img_size,
                crop_pct=dc['crop_pct'], randaugment_ops=ops, randaugment_magnitude=magnitude, mean=dc['mean'],
                std=dc['std'])
        if data.dataset == 'mnist':  # digits: resample to the stage's size, no crops or flips
            return create_transform((data.in_chans, img_size, img_size), is_training=False, crop_pct=1.0,
                                    interpolation=dc['interpolation'], mean=dc['mean'], std=dc['std'])
        if not training:
            return create_transform((data.in_chans, img_size, img_size), is_training=False, crop_pct=dc['crop_pct'],
                                    interpolation=dc['interpolation'], mean=dc['mean'], std=dc['std'])
        return create_transform(
            (data.in_chans, img_size, img_size), is_training=True, no_aug=aug.no_aug, scale=aug.scale,
            hflip=aug.hflip, color_jitter=aug.color_jitter, auto_augment=aug.auto_augment,
            interpolation=dc['interpolation'], mean=dc['mean'], std=dc['std'], re_prob=aug.reprob)

    def _set_transform(self, dataset: Dataset, transform) -> None:
        inner = dataset.dataset if isinstance(dataset, _WithSkipCount) else dataset
        inner.transform = transform

    def _train_loader(self, epoch: int, img_size: int, start_update: int) -> Iterable:
        acc, cfg = self.accelerator, self.cfg
        self._set_transform(self.train_set, self._transform(img_size, training=True))
        if self.video:
            return self._video_batches(epoch, start_update * cfg.train.grad_accum_steps)
        sampler = ResumableSampler(
            self.train_set, epoch, acc.num_processes, acc.process_index, cfg.train.seed,
            start=start_update * cfg.train.grad_accum_steps * cfg.data.batch_size, repeats=cfg.aug.repeated_aug)
        return DataLoader(
            EpochSeeded(self.train_set, cfg.train.seed), batch_size=cfg.data.batch_size, sampler=sampler,
            num_workers=cfg.data.workers, drop_last=True, pin_memory=acc.device.type == 'cuda',
            persistent_workers=False)

    def _video_batches(self, epoch: int, start: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches `start`.. of `epoch`'s clips: as many as every rank trains on, whatever was
        skipped (another pass over the shard when one runs short); the first `start` are decoded and discarded."""
        acc, cfg = self.accelerator, self.cfg
        self.train_set.set_epoch(epoch)
        seed = partial(seed_from, cfg.train.seed, 'video', epoch, acc.process_index)
        loader = DataLoader(
            self.train_set, batch_size=cfg.data.batch_size, num_workers=cfg.data.workers, drop_last=True,
            pin_memory=acc.device.type == 'cuda', generator=torch.Generator().manual_seed(seed('workers')))
        stop, micro = self.updates_per_epoch * cfg.train.grad_accum_steps, 0
        while micro < stop:
            batches, first = iter(loader), micro
            while micro < stop:
                seed_all(seed(micro))  # data.workers=0: the clips and augmentation of each batch from its own seed
                batch = next(batches, None)
                if batch is None:
                    break
                if micro >= start:
                    yield batch
                micro += 1
            if micro == first:
                raise RuntimeError(f'process {acc.process_index}: fewer readable training clips than data.batch_size '
                                   f'in its {len(self.train_set)} videos')

    def _val_loader(self) -> DataLoader:
        self._set_transform(self.val_set, self._transform(self.cfg.data.img_size, training=False))
        loader = DataLoader(self.val_set, batch_size=self.cfg.data.batch_size, shuffle=False,
                            num_workers=self.cfg.data.workers, pin_memory=self.accelerator.device.type == 'cuda')
        return loader if self.video else self.accelerator.prepare(loader)  # video: sharded by Hmdb51Clips

    # ------------------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(self) -> None:
        """accelerator.save_state into a temporary folder, renamed once every process has written its part."""
        acc = self.accelerator
        root = os.path.join(self.out_dir, 'checkpoints')
        final = os.path.join(root, f'step-{self.state.update:08d}')
        tmp = os.path.join(root, f'.tmp-step-{self.state.update:08d}')
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(root, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            done = sorted((int(m.group(1)), n) for n in os.listdir(root) if (m := _CKPT_RE.match(n)))
            for _, name in done[:-self.cfg.train.keep_checkpoints]:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        acc.wait_for_everyone()

    def _load_checkpoint(self, path: str) -> None:
        if not os.path.isdir(path):
            raise ConfigError(f'--resume: no checkpoint folder {path!r}')
        self.accelerator.load_state(path)
        self.accelerator.print(
            f'resumed from {path}: epoch {self.state.epoch}, update {self.state.update} '
            f'({self.state.step_in_epoch} into the epoch)')

    def _export(self, name: str, model: nn.Module) -> str:
        """Weights as safetensors, loadable with timm.create_model(..., pretrained_cfg_overlay=dict(file=...))."""
        state = self.accelerator.get_state_dict(model)
        path = os.path.join(self.out_dir, f'{name}.safetensors')
        if self.accelerator.is_main_process:
            _atomic_save_file(state, path)
        return path

    # ------------------------------------------------------------------------------------------ loops

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        acc, cfg, state = self.accelerator, self.cfg, self.state
        stage = cfg.stage_at(epoch)
        model = self.model
        unwrapped = acc.unwrap_model(model)
        if stage.bandlimit is not None:
            set_bandlimit(unwrapped, stage.bandlimit)
        start = state.step_in_epoch if state.epoch == epoch else 0
        loader = self._train_loader(epoch, stage.img_size, start)
        model.train()
        accum = cfg.train.grad_accum_steps
        total_micro = (self.updates_per_epoch - start) * accum
        loss_sum = torch.zeros((), device=acc.device)
        n_micro = seen = skipped = 0
        bar = tqdm(total=self.updates_per_epoch, initial=start, desc=f'epoch {epoch} @{stage.img_size}px',
                   disable=not acc.is_local_main_process, dynamic_ncols=True, leave=False)
        t0 = time.perf_counter()
        for micro, (x, y, n_skipped) in enumerate(loader):
            if micro >= total_micro:
                break
            x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
            seed_all(seed_from(cfg.train.seed, 'step', state.update, micro % accum, acc.process_index))
            if self.mixup is not None:  # a clip mixes as a (C * T, H, W) image: one lambda and CutMix box per clip
                shape = x.shape
                x, y = self.mixup(x.flatten(1, -3), y)
                x = x.view(shape)
            with acc.accumulate(model):
                loss = self.train_loss(model(x), y)
                acc.backward(loss)
                if acc.sync_gradients and cfg.optim.clip_grad is not None:
                    acc.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            n_micro += 1
            seen += x.shape[0]
            skipped += int(n_skipped.sum())
            if (micro + 1) % accum == 0:  # an optimizer update happened
                state.update += 1
                state.step_in_epoch += 1
                self.scheduler.step_update(num_updates=state.update)
                if self.ema is not None:
                    self.ema.update(unwrapped, step=state.update)
                bar.update(1)
                if acc.is_local_main_process:
                    bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{self.optimizer.param_groups[-1]["lr"]:.2e}')
                every = cfg.train.checkpoint_every_steps
                if every and state.update % every == 0 and state.step_in_epoch < self.updates_per_epoch:
                    self._save_checkpoint()
        bar.close()
        elapsed = time.perf_counter() - t0
        totals = acc.reduce(torch.tensor([loss_sum.item(), n_micro, seen, skipped],
                                         device=acc.device, dtype=torch.float64), reduction='sum')
        unit = 'videos' if self.video else 'images'
        return {
            'train_loss': (totals[0] / max(totals[1], 1)).item(),
            'clips_per_s' if self.video else 'img_per_s': totals[2].item() / max(elapsed, 1e-9),
            f'skipped_{unit}': int(totals[3].item()),
            'lr': max(g['lr'] for g in self.optimizer.param_groups),
            'train_img_size': stage.img_size,
        }

    @torch.no_grad()
    def evaluate(self, model: Optional[nn.Module] = None) -> Dict[str, float]:
        """Top-1/top-5 and loss on the validation split at data.img_size, over all processes (video: per video)."""
        acc = self.accelerator
        model = model if model is not None else self.model
        if self.video:
            return self._evaluate_video(acc.unwrap_model(model))
        was_training = model.training
        model.eval()
        correct1, correct5, losses, skipped = [], [], [], 0
        for x, y, n_skipped in self.val_loader:
            with acc.autocast():
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y, reduction='none')
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == y[:, None]
            c1, c5, loss, n_skipped = acc.gather_for_metrics((hit[:, 0], hit.any(1), loss, n_skipped))
            correct1.append(c1)
            correct5.append(c5)
            losses.append(loss)
            skipped += int(n_skipped.sum())
        model.train(was_training)
        c1, c5, loss = torch.cat(correct1).float(), torch.cat(correct5).float(), torch.cat(losses)
        return dict(top1=100 * c1.mean().item(), top5=100 * c5.mean().item(), val_loss=loss.mean().item(),
                    val_skipped_images=skipped)

    @torch.no_grad()
    def _evaluate_video(self, model: nn.Module) -> Dict[str, float]:
        """Video top-1/top-5 (the mean softmax of a video's clips), clip top-1 and loss on the test split.

        `model` is unwrapped: ranks score their shards without collectives (unreadable videos can leave
        them with different clip counts), then gather the scores; a video repeated to even out the
        shards counts once (the copy of the lowest rank).
        """
        acc = self.accelerator
        was_training = model.training
        model.eval()
        logits, labels, videos = [torch.empty(0, self.num_classes)], [torch.empty(0, dtype=torch.long)], []
        skipped = 0
        for x, y, n_skipped, video in self.val_loader:
            with acc.autocast():
                logits.append(model(x.to(acc.device)).float().cpu())
            labels.append(y)
            videos += video.tolist()
            skipped += int(n_skipped.sum())
        model.train(was_training)
        shards = gather_object([(torch.cat(logits), torch.cat(labels), videos, skipped)])
        seen, keep = set(), []
        for shard_logits, shard_labels, shard_videos, _ in shards:
            first = torch.tensor([v not in seen for v in shard_videos], dtype=torch.bool)
            keep.append((shard_logits[first], shard_labels[first], torch.tensor(shard_videos, dtype=torch.long)[first]))
            seen.update(shard_videos)
        logits, labels, videos = (torch.cat(t) for t in zip(*keep))
        if len(labels) == 0:
            raise RuntimeError('no readable test video: nothing to evaluate')
        ids, video_of_clip = torch.unique(videos, return_inverse=True)
        # summed softmax per video (ranks classes as the mean does) and each video's label
        scores = torch.zeros(len(ids), self.num_classes).index_add_(0, video_of_clip, logits.softmax(1))
        video_labels = torch.zeros(len(ids), dtype=torch.long).scatter_(0, video_of_clip, labels)
        hit = scores.topk(min(5, self.num_classes), dim=1).indices == video_labels[:, None]
        return dict(
            top1=100 * hit[:, 0].float().mean().item(), top5=100 * hit.any(1).float().mean().item(),
            clip_top1=100 * (logits.argmax(1) == labels).float().mean().item(),
            val_loss=nn.functional.cross_entropy(logits, labels).item(), val_videos=len(ids),
            val_skipped_videos=sum(shard[3] for shard in shards))

    def fit(self) -> Dict[str, Any]:
        """Train from the current state to the last epoch; returns the final summary."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        metrics_path = os.path.join(self.out_dir, 'metrics.csv')
        if acc.is_main_process:
            _truncate_csv(metrics_path, before_epoch=state.epoch)
            with open(os.path.join(self.out_dir, 'config.yaml'), 'w') as f:
                yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        if acc.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(acc.device)
        acc.print(f'training {cfg.model.name} on {acc.num_processes} process(es), global batch {self.global_batch}, '
                  f'lr {self.lr:.3g}, {self.updates_per_epoch} updates/epoch, epochs {state.epoch}..{cfg.train.epochs - 1}')
        row: Dict[str, Any] = {}
        t_start = time.perf_counter()
        for epoch in range(state.epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            row = dict(epoch=epoch, **self.train_one_epoch(epoch))
            last = epoch == cfg.train.epochs - 1
            if last or (epoch + 1) % cfg.train.eval_every_epochs == 0:
                row.update(self.evaluate())
                if self.ema is not None:
                    row.update({f'ema_{k}': v for k, v in self.evaluate(self.ema.module).items()
                                if not k.startswith(('val_skipped', 'val_videos'))})
                if row['top1'] > state.best_top1:
                    state.best_top1, state.best_epoch = row['top1'], epoch
                    self._export('best', self.model)
            row.update(peak_mem_mb=_peak_memory_mb(acc.device), epoch_time_s=time.perf_counter() - t0)
            state.epoch, state.step_in_epoch = epoch + 1, 0
            self._export('last', self.model)
            if self.ema is not None:
                self._export('last_ema', self.ema.module)
            self._save_checkpoint()
            if acc.is_main_process:
                _append_csv(metrics_path, row)
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
            acc.print(_format_row(row))
        acc.end_training()
        summary = dict(best_top1=state.best_top1, best_epoch=state.best_epoch, last=row,
                       minutes=(time.perf_counter() - t_start) / 60, output_dir=self.out_dir)
        best = os.path.join(self.out_dir, 'best.safetensors')
        acc.print(f'done: {cfg.model.name} best top-1 {state.best_top1:.2f}% (epoch {state.best_epoch}) in '
                  f'{summary["minutes"]:.1f} min; metrics {metrics_path}\n'
                  f'load the weights with timm.create_model({cfg.model.name!r}, pretrained=True, '
                  f'num_classes={self.num_classes}, {self._size_kwarg()}'
                  f'pretrained_cfg_overlay=dict(file={best!r}, num_classes={self.num_classes}))')
        return summary


    def _size_kwarg(self) -> str:
        """`img_size=N, ` for models whose kernels are referenced to the training resolution (video models:
        `img_size=N, num_frames=T, `), else ''."""
        if self.video:
            return f'img_size={self.cfg.data.img_size}, num_frames={self.cfg.data.num_frames}, '
        return f'img_size={self.cfg.data.img_size}, ' if hasattr(self.accelerator.unwrap_model(self.model), 'set_input_size') else ''


def _flat(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """Nested config -> flat {section/key: scalar} for trackers' hyper-parameter tables."""
    out = {}
    for k, v in tree.items():
        key = f'{prefix}{k}'
        if isinstance(v, dict):
            out.update(_flat(v, key + '/'))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _format_row(row: Dict[str, Any]) -> str:
    return '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items())


def _append_csv(path: str, row: Dict[str, Any]) -> None:
    rows = []
    if os.path.isfile(path):
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    rows.append(row)
    fields: List[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _truncate_csv(path: str, before_epoch: int) -> None:
    """Drop rows of epochs a resumed run will redo (written by the interrupted run after its checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if int(r['epoch']) < before_epoch]
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields or ['epoch'])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
