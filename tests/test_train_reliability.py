"""The trainer never ends silently wrong: divergence stops the run without writing non-finite weights, resuming says
what it resumes (or refuses), and the metrics rows survive kills and mid-epoch resumes."""
import csv
import math
import os
import shutil
import warnings

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from test_train import TINY_MODEL, _overrides, _write_folder, interrupt_loss_at

from s4nd_vision.cli import tool_main
from s4nd_vision.layers import ssm_parameters
from s4nd_vision.train import (
    ConfigError,
    RunFolderInUse,
    Trainer,
    TrainingDiverged,
    checkpoint,
    latest_checkpoint,
    load_config,
)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp('stripes'))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    _reset()


def _reset():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _rows(out):
    with open(os.path.join(out, 'metrics.csv'), newline='') as f:
        return list(csv.DictReader(f))


class _NanLossAt:
    """The trainer's loss, made NaN at the given updates (as a diverging run would)."""

    def __init__(self, trainer: Trainer, updates):
        self.trainer, self.loss, self.updates = trainer, trainer.train_loss, set(updates)

    def __call__(self, logits, target):
        loss = self.loss(logits, target)
        return loss * math.nan if self.trainer.state.update in self.updates else loss


class _NanGradAt(_NanLossAt):
    """The trainer's loss, finite, but with NaN gradients at the given updates (as an overflowing backward)."""

    def __call__(self, logits, target):
        if self.trainer.state.update in self.updates:
            logits.register_hook(lambda grad: grad * math.nan)
        return self.loss(logits, target)


class _InfLossAt(_NanLossAt):
    """The trainer's loss made infinite at the given updates, its gradients still finite (an infinite constant added):
    only the loss tells that the update is to be skipped."""

    def __call__(self, logits, target):
        loss = self.loss(logits, target)
        return loss + math.inf if self.trainer.state.update in self.updates else loss


def _all_finite(path) -> bool:
    return all(torch.isfinite(v).all() for v in load_file(str(path)).values())


# ------------------------------------------------------------------------------------------ divergence

@pytest.mark.parametrize('fault, clip', [(_NanLossAt, 'null'), (_InfLossAt, 'null'), (_NanGradAt, 'null'),
                                         (_NanGradAt, '1.0')])
def test_stray_non_finite_steps_are_skipped_and_counted(tmp_path, folder, fault, clip):
    """(With optim.clip_grad the clipping's norm is the one checked.)"""
    cfg = load_config(None, _overrides(folder, tmp_path, 'train.epochs=2', 'train.max_nonfinite_steps=1',
                                       'train.ema_decay=0.9', f'optim.clip_grad={clip}'))
    trainer = Trainer(cfg)
    trainer.train_loss = fault(trainer, {1, 5})  # isolated: tolerated
    trainer.fit()
    rows = _rows(tmp_path)
    assert [int(r['nonfinite_steps']) for r in rows] == [1, 1]
    assert all(math.isfinite(float(r['train_loss'])) for r in rows)  # the skipped losses are left out
    for name in ('last', 'last_ema', 'best'):
        assert _all_finite(tmp_path / f'{name}.safetensors')


def test_a_skipped_update_of_a_batchnorm_model_leaves_its_running_statistics_as_they_were(tmp_path, folder):
    """A non-finite forward pass (here a NaN input) makes BatchNorm's running statistics non-finite before the loss
    is checked: the skipped update restores them, so the stray update is tolerated as in a model without BatchNorm
    (it stopped the run at the next checkpoint: 'the weights hold non-finite values ... a lower optim.lr')."""
    cfg = load_config(None, _overrides(folder, tmp_path, 'model.name=test_resnet', 'model.kwargs={}',
                                       'train.epochs=1', 'train.max_steps_per_epoch=2', 'data.batch_size=2',
                                       'train.max_nonfinite_steps=1'))
    trainer = Trainer(cfg)
    model = trainer.accelerator.unwrap_model(trainer.model)
    statistics = []

    def nan_input_at_update_1(module, args):
        if trainer.state.update == 1:
            statistics.append({k: b.clone() for k, b in module.named_buffers()})
            return (args[0] * math.nan,)

    model.register_forward_pre_hook(nan_input_at_update_1)
    trainer.fit()
    assert [int(r['nonfinite_steps']) for r in _rows(tmp_path)] == [1]
    for name in ('last', 'best'):
        assert _all_finite(tmp_path / f'{name}.safetensors')
    restored = load_file(str(tmp_path / 'checkpoints' / 'step-00000002' / 'model.safetensors'))
    for key, value in statistics[0].items():  # (the epoch's end: update 1 skipped, its statistics undone)
        assert torch.equal(restored[key], value), key


def test_an_epoch_of_skipped_updates_reports_no_train_loss(tmp_path, folder):
    """Every update of an epoch skipped (within train.max_nonfinite_steps): its train_loss is NaN, not 0."""
    cfg = load_config(None, _overrides(folder, tmp_path, 'train.epochs=2', 'train.max_nonfinite_steps=100'))
    trainer = Trainer(cfg)
    per_epoch = trainer.updates_per_epoch
    trainer.train_loss = _NanLossAt(trainer, range(per_epoch, 2 * per_epoch))
    trainer.fit()
    rows = _rows(tmp_path)
    assert int(rows[1]['nonfinite_steps']) == per_epoch and math.isnan(float(rows[1]['train_loss']))
    assert math.isfinite(float(rows[0]['train_loss']))


def test_a_diverged_run_stops_and_writes_nothing_non_finite(tmp_path, folder):
    cfg = load_config(None, _overrides(folder, tmp_path, 'train.epochs=3', 'train.max_nonfinite_steps=2',
                                       'train.checkpoint_every_steps=1'))
    trainer = Trainer(cfg)
    per_epoch = trainer.updates_per_epoch
    trainer.train_loss = _NanLossAt(trainer, range(per_epoch + 1, 10 ** 6))  # diverges in epoch 1, for good
    with pytest.raises(TrainingDiverged, match=r'not finite in 3 updates in a row .*max_nonfinite_steps=2.*last '
                                               r'good checkpoint is .*step-'):
        trainer.fit()
    latest = latest_checkpoint(str(tmp_path))
    assert latest.endswith(f'step-{per_epoch + 1:08d}')  # nothing checkpointed after the first NaN
    assert _all_finite(os.path.join(latest, 'model.safetensors'))
    assert [r['epoch'] for r in _rows(tmp_path)] == ['0']
    assert _all_finite(tmp_path / 'last.safetensors') and _all_finite(tmp_path / 'best.safetensors')


def test_a_resumed_run_counts_a_non_finite_streak_afresh(tmp_path, folder):
    """The epoch-end checkpoint is written within a non-finite streak too (its weights are the last good update's),
    and a divergence names it as the last good checkpoint: resumed from it, one more non-finite update must not
    stop the run at once."""
    overrides = _overrides(folder, tmp_path, 'train.max_nonfinite_steps=1')
    trainer = Trainer(load_config(None, [*overrides, 'train.epochs=1']))
    per_epoch = trainer.updates_per_epoch
    trainer.train_loss = _NanLossAt(trainer, {per_epoch - 1})  # the epoch's last update
    trainer.fit()
    _reset()
    with warnings.catch_warnings():  # (train.epochs changed)
        warnings.simplefilter('ignore')
        trainer = Trainer(load_config(None, [*overrides, 'train.epochs=2']), resume=True)
    trainer.train_loss = _NanLossAt(trainer, {per_epoch})  # the next epoch's first update
    trainer.fit()
    assert [r['nonfinite_steps'] for r in _rows(tmp_path)] == ['1', '1']


def test_non_finite_weights_are_never_written(tmp_path, folder):
    cfg = load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', 'train.max_nonfinite_steps=100'))
    trainer = Trainer(cfg)
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = math.inf
    with pytest.raises(TrainingDiverged, match='weights hold non-finite values .*nothing was written'):
        trainer.fit()
    assert not (tmp_path / 'last.safetensors').exists() and not (tmp_path / 'best.safetensors').exists()
    assert latest_checkpoint(str(tmp_path)) is None


def test_cli_exits_non_zero_on_divergence(tmp_path, folder, capsys):
    """A learning rate finite but far too large: the loss turns non-finite, the CLI stops with exit status 3."""
    args = _overrides(folder, tmp_path, 'train.epochs=3', 'optim.opt=sgd', 'optim.lr=1e30',
                      'train.max_nonfinite_steps=0')
    with pytest.raises(SystemExit) as info:
        tool_main('train', args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 3 and lines[-1].startswith('error: ') and 'finite' in lines[-1], lines
    for name in ('last', 'best'):
        path = tmp_path / f'{name}.safetensors'
        assert not path.exists() or _all_finite(path)


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Accelerate's fp16 on the CPU as on a GPU: autocast to float16 and a GradScaler (initial scale 4)."""
    from accelerate import Accelerator
    init = Accelerator.__init__

    def fp16_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.mixed_precision == 'fp16':
            self.native_amp, self.scaler = True, torch.amp.GradScaler('cpu', init_scale=4.0)
    monkeypatch.setattr(Accelerator, '__init__', fp16_init)


def test_fp16_skips_a_non_finite_loss_after_clipping(tmp_path, folder, fp16_on_cpu):
    """The clipping unscales the gradients: a skipped update then updates the GradScaler itself (else the next
    update's unscaling raises)."""
    cfg = load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', 'train.mixed_precision=fp16',
                                       'optim.clip_grad=1.0'))
    trainer = Trainer(cfg)
    trainer.train_loss = _NanLossAt(trainer, {1})
    trainer.fit()
    assert [int(r['nonfinite_steps']) for r in _rows(tmp_path)] == [1]
    assert trainer.accelerator.scaler.get_scale() < 4.0 and _all_finite(tmp_path / 'last.safetensors')


@pytest.mark.parametrize('clip', ['null', '1.0'])
def test_fp16_gradients_never_finite_stop_the_run(tmp_path, folder, fp16_on_cpu, clip):
    """fp16 overflows at loss scales 4, 2 and 1 are the GradScaler's back-off; below 1 they count as non-finite."""
    cfg = load_config(None, _overrides(folder, tmp_path, 'train.epochs=10', 'train.mixed_precision=fp16',
                                       'train.max_nonfinite_steps=1', f'optim.clip_grad={clip}'))
    trainer = Trainer(cfg)
    trainer.train_loss = _NanGradAt(trainer, range(10 ** 6))
    with pytest.raises(TrainingDiverged, match=r'not finite in 2 updates in a row'):
        trainer.fit()
    assert trainer.state.update == 3 + 2 and trainer.accelerator.scaler.get_scale() == 0.125


def test_fp16_gradients_of_an_engine_that_scales_its_own_loss_are_left_to_it(tmp_path, folder, fp16_on_cpu):
    """Without Accelerate's GradScaler (DeepSpeed scales the loss and skips its own overflows) the gradients are
    scaled: an overflow there is not the run's divergence. With the scaler, the same gradients are its back-off."""
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'train.mixed_precision=fp16')))
    model = trainer.model
    for scaler, expected in ((None, None), (trainer.accelerator.scaler, 'overflow')):
        trainer.accelerator.scaler = scaler
        if scaler is not None:
            scaler.scale(torch.ones(()))  # (its scale starts with the first scaled loss)
        for p in model.parameters():
            p.grad = torch.full_like(p, math.inf)
        assert trainer._skip_update(torch.zeros((), dtype=torch.bool)) == expected
    _reset()


def test_fp16_resumes_a_checkpoint_without_gradient_scaler_state(tmp_path, folder, fp16_on_cpu):
    """A bf16 or float32 run's checkpoint holds no scaler.pt: an fp16 run resumes it with a fresh GradScaler (not
    a checkpoint refused as damaged), and its own checkpoints hold the scaler's state."""
    Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', 'train.mixed_precision=bf16'))).fit()
    _reset()
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=2', 'train.mixed_precision=fp16')),
                      resume=True)
    assert trainer.state.epoch == 1 and trainer.accelerator.scaler is not None
    trainer.fit()
    assert [r['epoch'] for r in _rows(tmp_path)] == ['0', '1']
    assert os.path.isfile(os.path.join(latest_checkpoint(str(tmp_path)), 'scaler.pt'))
    # an fp16 checkpoint (its config says so) without scaler.pt is damaged, not resumed with a fresh scaler
    os.remove(os.path.join(latest_checkpoint(str(tmp_path)), 'scaler.pt'))
    _reset()
    with pytest.raises(ConfigError, match=r'is damaged \(scaler.pt is missing\)'):
        Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=3', 'train.mixed_precision=fp16')),
                resume=True)


def test_a_min_lr_above_a_scaled_lr_is_refused(tmp_path, folder):
    """timm's schedules take each group from its LR to sched.min_lr: a group's LR scaled below it would rise."""
    _reset()
    with pytest.raises(ConfigError, match=r'sched.min_lr \(1e-05\) must be at most optim.ssm_lr at this global '
                                          r'batch \(0.0001 x 4 / optim.lr_base_batch 512 = 7.81e-07\)'):
        Trainer(load_config(None, _overrides(folder, tmp_path, 'optim.ssm_lr=1e-4', 'optim.lr_base_batch=512',
                                             'optim.lr=2.0', 'sched.min_lr=1e-5')))
    _reset()
    # below it, the optimizer's groups start from the scaled LRs (x 4 / 512), the SSM parameters' from optim.ssm_lr's
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / 'scaled', 'optim.ssm_lr=1e-4',
                                                   'optim.lr_base_batch=512', 'optim.lr=2.0', 'sched.min_lr=1e-7')))
    ssm = {id(p) for _, p in ssm_parameters(trainer.accelerator.unwrap_model(trainer.model))}
    starts = {id(p) in ssm: g['initial_lr'] for g in trainer.optimizer.param_groups for p in g['params']}
    assert starts == {True: pytest.approx(1e-4 * 4 / 512), False: pytest.approx(2.0 * 4 / 512)}
    _reset()


def test_layer_decay_scales_every_groups_scheduled_lr_in_training(tmp_path, folder):
    """optim.layer_decay in a run: every update's lr is the cosine schedule of its group's own start (optim.lr, or
    optim.ssm_lr for the SSM parameters) times its depth's lr_scale, from the first update (warm-up too) to the last;
    the head trains at the full lr, the stem at layer_decay ** (depth)."""
    trainer = Trainer(load_config(None, _overrides(
        folder, tmp_path, 'optim.layer_decay=0.5', 'optim.ssm_lr=1e-3', 'train.epochs=2', 'sched.warmup_epochs=1',
        'sched.warmup_lr=1e-5', 'train.max_steps_per_epoch=2')))
    model = trainer.accelerator.unwrap_model(trainer.model)
    ssm = {id(p) for _, p in ssm_parameters(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []

    def schedule(t, base):  # warm-up over the first epoch's 2 updates, then cosine over all 4 (timm's, not prefixed)
        return 1e-5 + t * (base - 1e-5) / 2 if t < 2 else 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * t / 4))

    step = trainer.optimizer.step

    def checked_step(*args, **kwargs):
        if trainer.accelerator.sync_gradients:
            t = trainer.state.update
            for g in trainer.optimizer.param_groups:
                is_ssm = {id(p) in ssm for p in g['params']}
                assert len(is_ssm) == 1
                base = 1e-3 if is_ssm.pop() else 2e-3
                assert g['lr'] == pytest.approx(schedule(t, base) * g['lr_scale']), (t, names[id(g['params'][0])])
            seen.append(t)
        return step(*args, **kwargs)

    trainer.optimizer.step = checked_step
    trainer.fit()
    assert seen == [0, 1, 2, 3]
    scales = {names[id(p)].split('.')[0]: g['lr_scale'] for g in trainer.optimizer.param_groups for p in g['params']}
    assert scales['head'] == 1.0 and scales['stem'] == 0.5 ** 5  # (TINY_MODEL: stem, 4 stages of 1 block, head)


# ------------------------------------------------------------------------------------------ resuming

def test_resume_without_a_checkpoint_is_refused_unless_allowed(tmp_path, folder, capsys):
    args = _overrides(folder, tmp_path / 'typo', 'train.epochs=1')
    with pytest.raises(SystemExit) as info:
        tool_main('train', [*args, '--resume'])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: --resume: no checkpoint in ") and '--allow-fresh' in err
    assert not os.path.exists(tmp_path / 'typo' / 'metrics.csv')
    _reset()
    tool_main('train', [*args, '--resume', '--allow-fresh'])
    assert 'starting a fresh run' in capsys.readouterr().out
    assert [r['epoch'] for r in _rows(tmp_path / 'typo')] == ['0']
    _reset()
    # overrides after --resume, not a CHECKPOINT, in their order: the last one for a key wins; a weights file's
    # temporary left by a kill mid-write (full size) is removed
    (tmp_path / 'typo' / '.last.safetensors.k1ll3d_0.tmp').write_bytes(b'partial')
    tool_main('train', ['--resume', 'train.epochs=3', *args, 'train.epochs=2'])
    assert [r['epoch'] for r in _rows(tmp_path / 'typo')] == ['0', '1']
    assert not [name for name in os.listdir(tmp_path / 'typo') if name.endswith('.tmp')]
    _reset()
    # overrides on both sides of --resume (the first run of them is argparse's positional): all taken, in order;
    # anything else after them is still refused
    with pytest.raises(SystemExit) as info:
        tool_main('train', [*args, '--resume', '--allow-fresh', 'train.epochs=3', '--bogus'])
    assert info.value.code == 2 and 'unrecognized arguments: --bogus' in capsys.readouterr().err
    tool_main('train', [*args, '--resume', '--allow-fresh', 'train.epochs=4', 'train.epochs=3'])
    assert [r['epoch'] for r in _rows(tmp_path / 'typo')] == ['0', '1', '2']


def test_allow_fresh_goes_with_a_resume_that_took_an_override(monkeypatch):
    """`--allow-fresh --resume optim.lr=1e-4` is a plain --resume and an override, not a --resume CHECKPOINT that
    --allow-fresh would refuse."""
    from s4nd_vision.train import cli as train_cli
    seen = []

    def load_config(config, overrides):  # (what reaches the config is what matters, not the training)
        seen.append(list(overrides))
        raise ConfigError('stop here')

    monkeypatch.setattr(train_cli, 'load_config', load_config)
    with pytest.raises(SystemExit):
        tool_main('train', ['--config', 'X', '--allow-fresh', '--resume', 'optim.lr=1e-4'])
    assert seen == [['optim.lr=1e-4']]


def test_overrides_around_resume_keep_their_command_line_order(monkeypatch, capsys):
    """An override --resume took goes back in its place among all the others, those argparse leaves unparsed too:
    the last one for a key wins (c=3 went before b=2 when an option separated a=1 and b=2)."""
    from s4nd_vision.cli import main
    from s4nd_vision.train import cli as train_cli
    seen = []

    def load_config(config, overrides):  # (the order reaching the config is what matters, not the training)
        seen.append(list(overrides))
        raise ConfigError('stop here')

    monkeypatch.setattr(train_cli, 'load_config', load_config)
    for argv in (['a=1', '--config', 'X', 'b=2', '--resume', 'c=3'], ['a=1', '--config', 'X', 'b=2', '--res=c=3'],
                 ['a=1', '--config', 'X', '--resume', 'b=2', 'c=3'],
                 ['--resume', 'a=1', '--config', 'X', 'b=2', 'c=3']):
        with pytest.raises(SystemExit):
            main(['train', *argv])
    assert seen == [['a=1', 'b=2', 'c=3']] * 4


def test_resume_says_what_changed_and_refuses_another_model(tmp_path, folder):
    Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=1'))).fit()
    _reset()
    other = [o.replace('dims: [8, 16, 16, 16]', 'dims: [8, 16, 16, 24]') for o in _overrides(folder, tmp_path)]
    with pytest.raises(ConfigError, match=r"checkpoint .* belongs to model 'convnext_s4nd_atto' with model.kwargs "
                                          r".*16, 16, 16.*this run builds 'convnext_s4nd_atto' with .*16, 16, 24"):
        Trainer(load_config(None, [*other, 'train.epochs=2']), resume=True)
    _reset()
    with pytest.warns(UserWarning, match=r'changed config .*data.batch_size: 4 -> 2; train.epochs: 1 -> 2; '
                                         r'train.grad_accum_steps: 1 -> 2'):  # (the same global batch)
        Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=2', 'data.batch_size=2',
                                             'train.grad_accum_steps=2')), resume=True)
    _reset()
    # a checkpoint without its config (written before checkpoints held one): the load error, on one line
    os.remove(os.path.join(latest_checkpoint(str(tmp_path)), 'config.yaml'))
    with pytest.raises(ConfigError, match=r'does not fit the model .* \(a checkpoint of another model\?\)') as info:
        Trainer(load_config(None, [*other, 'train.epochs=2']), resume=True)
    assert '\n' not in str(info.value)


def test_resume_applies_the_changed_hyperparameters(tmp_path, folder):
    """The checkpoint restores weights, optimizer moments and position; the resumed run's config sets lr, weight
    decay and schedule length (what the divergence error advises: resume with a lower optim.lr), exactly as a
    fresh run of that config would have them at the same update."""
    Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', 'optim.opt=lookahead_adamw'))).fit()
    _reset()
    changed = ['optim.opt=lookahead_adamw', 'train.epochs=3', 'optim.lr=1e-4', 'optim.ssm_lr=3e-5',
               'optim.weight_decay=0.01']
    with pytest.warns(UserWarning, match='the new values apply'):
        resumed = Trainer(load_config(None, _overrides(folder, tmp_path, *changed)), resume=True)
    _reset()
    fresh = Trainer(load_config(None, _overrides(folder, tmp_path / 'fresh', *changed)))
    fresh.scheduler.step_update(num_updates=resumed.state.update)
    assert resumed.state.update == fresh.updates_per_epoch
    # the optimizer's own counters in its groups come from the checkpoint (lookahead's step: the slow-weight sync)
    assert {g['lookahead_step'] for g in resumed.optimizer.param_groups} == {resumed.state.update}
    for g in fresh.optimizer.param_groups:
        g['lookahead_step'] = resumed.state.update
    hyper = [{k: v for k, v in g.items() if k != 'params'} for g in fresh.optimizer.param_groups]
    assert [{k: v for k, v in g.items() if k != 'params'} for g in resumed.optimizer.param_groups] == hyper
    assert {g['weight_decay'] for g in hyper} >= {0.01} and max(g['initial_lr'] for g in hyper) == 1e-4
    assert resumed.scheduler.t_initial == fresh.scheduler.t_initial == 3 * fresh.updates_per_epoch


def test_fp16_is_refused_where_accelerate_would_train_in_float32(tmp_path, folder):
    """Accelerate runs fp16 autocast and its GradScaler on GPUs only: on the CPU the run would silently be float32.
    The refused run leaves the process as it found it: the corrected run in it (a notebook's) is not refused as
    one after an fp16 run."""
    _reset()
    with pytest.raises(ConfigError, match=r'train.mixed_precision .* is fp16, which runs on GPUs only: on cpu '
                                          r'Accelerate would train in float32; use bf16 or no'):
        Trainer(load_config(None, _overrides(folder, tmp_path, 'train.mixed_precision=fp16')))
    for value in ('null', 'bf16'):
        assert Trainer(load_config(None, _overrides(folder, tmp_path / value, f'train.mixed_precision={value}'))
                       ).accelerator.mixed_precision == ('no' if value == 'null' else value)
        _reset()


def test_a_later_run_in_the_same_process_does_not_inherit_its_mixed_precision(tmp_path, folder):
    """Accelerate keeps the first Accelerator's mixed precision for the whole process: a later run (a notebook's
    sweep) whose config leaves it null, float32 without a launcher, would silently train in the earlier bf16."""
    _reset()
    assert Trainer(load_config(None, _overrides(folder, tmp_path / 'bf16', 'train.mixed_precision=bf16'))
                   ).accelerator.mixed_precision == 'bf16'
    for value in ('null', 'no'):
        with pytest.raises(ConfigError, match=r'train.mixed_precision is (null|no) \(here: no\), but an earlier run '
                                              r'in this Python process trained with bf16'):
            Trainer(load_config(None, _overrides(folder, tmp_path / value, f'train.mixed_precision={value}')))
    _reset()
    assert Trainer(load_config(None, _overrides(folder, tmp_path / 'fresh'))).accelerator.mixed_precision == 'no'
    _reset()


def test_the_launchers_mixed_precision_is_recorded_and_a_resume_in_another_is_warned_of(tmp_path, folder,
                                                                                          monkeypatch):
    """train.mixed_precision null takes `accelerate launch --mixed_precision` (ACCELERATE_MIXED_PRECISION): the run's
    config.yaml records what it trained in (it said null), so a resume launched without the flag (float32) is
    warned about; a value in the config wins over the launcher's."""
    _reset()
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')
    Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=1'))).fit()
    assert load_config(str(tmp_path / 'config.yaml')).train.mixed_precision == 'bf16'
    _reset()
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'no')
    with pytest.warns(UserWarning, match=r"changed config .*train.mixed_precision: 'bf16' -> 'no'"):
        Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=2')), resume=True)
    _reset()
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / 'set', 'train.mixed_precision=bf16')))
    assert trainer.accelerator.mixed_precision == trainer.cfg.train.mixed_precision == 'bf16'
    _reset()
    # a set value that differs from the launcher's (e.g. a CPU run's recorded 'no' reused on GPUs) is warned of
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')
    with pytest.warns(UserWarning, match=r"train.mixed_precision=no overrides the launcher's --mixed_precision bf16"):
        trainer = Trainer(load_config(None, _overrides(folder, tmp_path / 'no', 'train.mixed_precision=no')))
    assert trainer.accelerator.mixed_precision == 'no'
    _reset()


def test_poly_schedule_takes_its_power_from_the_config(tmp_path, folder):
    """sched.decay_rate is the poly schedule's power (timm's decay_rate), 0.1 by default as in timm's train.py."""
    for extra, power in (((), 0.1), (('sched.decay_rate=1.0',), 1.0)):
        _reset()
        trainer = Trainer(load_config(None, _overrides(folder, tmp_path / str(power), 'sched.sched=poly', *extra)))
        assert trainer.scheduler.power == power


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, folder):
    """Resuming from an earlier checkpoint starts a new branch: a later plain --resume must continue it, not the
    abandoned run's higher step. Resuming from a folder that is not a checkpoint, switching the EMA on or off, or
    changing the optimizer or its parameter groups (whose saved state would not fit) is a one-line error."""
    Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=2', 'train.keep_checkpoints=3'))).fit()
    root = tmp_path / 'checkpoints'
    first, second = sorted(p.name for p in root.iterdir())
    _reset()
    for bad in (str(tmp_path), str(root)):
        with pytest.raises(ConfigError, match='is not a checkpoint folder'):
            Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=2')), resume=bad)
        _reset()
    with pytest.raises(ConfigError, match=r"is a file, not a checkpoint folder .*model.pretrained_file=.*best"):
        Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=2')),
                resume=str(tmp_path / 'best.safetensors'))  # (the weights a user may take for a checkpoint)
    _reset()
    with pytest.raises(ConfigError, match=r"model.pretrained_file must be a weights file, got the folder .*step-"):
        Trainer(load_config(None, _overrides(folder, tmp_path / 'fine-tuned', f'model.pretrained_file={root / first}')))
    _reset()
    for changed, message in (('train.ema_decay=0.99', r'written without a model EMA .*train.ema_decay=0.99'),
                             ('optim.opt=sgd', r"written with optim.opt='adamw', this run has 'sgd'"),
                             ('optim.layer_decay=0.8', 'other parameter groups than this run')):
        with pytest.raises(ConfigError, match=message):  # (Accelerate's or torch's traceback before)
            Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=2', changed)), resume=True)
        _reset()
    assert latest_checkpoint(str(tmp_path)).endswith(second)
    Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=2', 'optim.clip_grad=0.5')),
            resume=str(root / first))
    assert latest_checkpoint(str(tmp_path)).endswith(first)
    assert [p.name for p in root.iterdir() if p.name.startswith('abandoned-')][0].endswith(second)


def _scored(trainer: Trainer, top1_by_epoch) -> Trainer:
    """`trainer`, its evaluation reporting the given top-1 for each epoch."""
    evaluate = trainer.evaluate
    trainer.evaluate = lambda model=None: dict(evaluate(model), top1=top1_by_epoch[trainer.state.epoch])
    return trainer


def test_a_branch_keeps_the_best_weights_its_checkpoint_records(tmp_path, folder, capsys):
    """Resumed from an earlier checkpoint, the run's best accuracy is that checkpoint's: the abandoned run's later
    best.safetensors is set aside and the checkpoint's copy takes its place, so a branch that never beats it ends
    with the weights its summary names (it ended with no best.safetensors, printing a call that loads it)."""
    overrides = _overrides(folder, tmp_path, 'train.epochs=2', 'train.keep_checkpoints=2')
    _scored(Trainer(load_config(None, overrides)), [50.0, 90.0]).fit()
    epoch0 = sorted((tmp_path / 'checkpoints').iterdir())[0]
    _reset()
    summary = _scored(Trainer(load_config(None, overrides), resume=str(epoch0)), [None, 40.0]).fit()
    assert (summary['best_top1'], summary['best_epoch']) == (50.0, 0)
    best, at_epoch0 = load_file(str(tmp_path / 'best.safetensors')), load_file(str(epoch0 / 'model.safetensors'))
    assert best.keys() == at_epoch0.keys() and all(torch.equal(best[k], at_epoch0[k]) for k in best)
    assert f"file='{tmp_path / 'best.safetensors'}'" in capsys.readouterr().out


def _logged_scalars(logs, tag='top1'):
    """(step, value) of every `tag` scalar in the TensorBoard event files under `logs`, oldest file first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = []
    for path in sorted(logs.rglob('events.out.tfevents*')):
        events = EventAccumulator(str(path))
        events.Reload()
        scalars += [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()['scalars'] else []
    return scalars


def test_a_branch_sets_the_tracker_logs_aside_and_logs_each_epoch_once(tmp_path, folder):
    """The tracker logs of the abandoned branch go aside with its checkpoints (as 'abandoned-<time>-logs'): kept,
    TensorBoard showed the redone epochs twice, both branches interleaved. The new logs get the checkpoint's rows
    again, then the branch's own: each epoch once, as in metrics.csv."""
    overrides = _overrides(folder, tmp_path, 'train.epochs=2', 'train.keep_checkpoints=2',
                           'train.trackers=[tensorboard]')
    Trainer(load_config(None, overrides)).fit()
    epoch0 = sorted((tmp_path / 'checkpoints').iterdir())[0]
    _reset()
    Trainer(load_config(None, overrides), resume=str(epoch0)).fit()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith('abandoned-') and p.name.endswith('-logs')]
    assert [step for step, _ in _logged_scalars(aside)] == [0, 1]
    logged = _logged_scalars(tmp_path / 'logs' / 's4nd_vision')  # (train.tracker_project)
    assert [step for step, _ in logged] == [0, 1] == [int(r['epoch']) for r in _rows(tmp_path)]
    assert [value for _, value in logged] == pytest.approx([float(r['top1']) for r in _rows(tmp_path)])


def test_a_resume_with_nothing_left_to_train_is_refused_unless_the_run_is_complete(tmp_path, folder, capsys):
    """A checkpoint at or past train.epochs, or past the end of its last epoch, is a one-line error saying what to give
    instead (the run trained nothing, or dropped the rest of an epoch, and ended as a success); nothing is set aside.
    A run resumed at its own completed end just says it is complete."""
    overrides = _overrides(folder, tmp_path, 'train.max_steps_per_epoch=3', 'train.checkpoint_every_steps=1',
                           'train.keep_checkpoints=10')
    Trainer(load_config(None, [*overrides, 'train.epochs=2'])).fit()
    root, rows = tmp_path / 'checkpoints', _rows(tmp_path)
    for resume, extra, message in (
            (True, 'train.epochs=1', r'is at epoch 2 \(update 6, 0 into the epoch\); train.epochs=1 leaves nothing '
                                     r'to train: give train.epochs > 2, or resume an earlier checkpoint'),
            (root / 'step-00000005', 'train.epochs=1', 'is at epoch 1 .*train.epochs=1 leaves nothing to train'),
            (root / 'step-00000003', 'train.epochs=1', 'is at epoch 1 .*give train.epochs > 1'),  # (not the run's end)
            (root / 'step-00000005', 'train.max_steps_per_epoch=1',
             r'2 into the epoch\), past the end of the last epoch \(train.epochs=2\), which has 1 updates now '
             r'.*give train.epochs > 2 or train.max_steps_per_epoch >= 2')):
        _reset()
        with pytest.raises(ConfigError, match=message):
            Trainer(load_config(None, [*overrides, 'train.epochs=2', extra]), resume=resume if resume is True else
                    str(resume))
    assert not [p for p in [*tmp_path.iterdir(), *root.iterdir()] if p.name.startswith('abandoned-')]
    _reset()
    capsys.readouterr()
    summary = Trainer(load_config(None, [*overrides, 'train.epochs=2']), resume=True).fit()
    assert 'the run is complete' in capsys.readouterr().out and summary['last']['epoch'] == 1  # (the last row)
    assert _rows(tmp_path) == rows


def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_one_before(tmp_path, folder):
    """A truncated or missing file in the latest checkpoint (a full disk, a bad copy) ends the resume with one line
    naming the checkpoint and the --resume of the one before it (a traceback before, or a pytorch_model.bin that
    the trainer never writes)."""
    run = tmp_path / 'run'
    Trainer(load_config(None, _overrides(folder, run, 'train.epochs=2', 'train.keep_checkpoints=2'))).fit()
    first, second = sorted((run / 'checkpoints').iterdir())
    for damage, reason in (('model.safetensors', 'incomplete metadata'), ('optimizer.bin', 'PytorchStreamReader'),
                           ('custom_checkpoint_0.pkl', 'PytorchStreamReader'), (None, 'model.safetensors is missing'),
                           ('metrics.csv', 'metrics.csv is cut short'), ('config.yaml', 'config.yaml is cut short')):
        _reset()
        out = tmp_path / str(damage)
        shutil.copytree(run, out)
        latest = out / 'checkpoints' / second.name
        if damage is None:
            os.remove(latest / 'model.safetensors')
        else:
            with open(latest / damage, 'r+b') as f:
                f.truncate(os.path.getsize(latest / damage) // 2)
        with warnings.catch_warnings():  # (train.output_dir changed)
            warnings.simplefilter('ignore')
            with pytest.raises(ConfigError, match=rf"checkpoint '{latest}' is damaged \(.*{reason}.*\); resume from "
                                                  rf"the checkpoint before it with --resume {out}/checkpoints/"
                                                  rf"{first.name}$"):
                Trainer(load_config(None, _overrides(folder, out, 'train.epochs=2')), resume=True)
    _reset()
    shutil.rmtree(out / 'checkpoints' / first.name)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ConfigError, match='is damaged .*; no earlier checkpoint is kept: start a fresh run'):
            Trainer(load_config(None, _overrides(folder, out, 'train.epochs=2')), resume=True)


def test_a_checkpoint_written_with_or_without_fsdp_is_refused_by_the_other_kind_of_run(tmp_path, folder):
    """FSDP writes its model's state in other files (pytorch_model_fsdp.bin, or the folder pytorch_model_fsdp_0,
    by fsdp_state_dict_type) than a run without it (model.safetensors), and each reads its own only: an FSDP run's
    checkpoint resumed by DDP, or one process, was 'damaged (model.safetensors is missing)', with the advice to
    resume the checkpoint before it (written the same way) or start a fresh run. Here a plain run's checkpoint with
    its model file renamed as FSDP's; the other directions with a fake FSDP accelerator."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import StateDictType
    run = tmp_path / 'run'
    Trainer(load_config(None, _overrides(folder, run, 'train.epochs=1'))).fit()
    latest = latest_checkpoint(str(run))
    os.rename(os.path.join(latest, 'model.safetensors'), os.path.join(latest, 'pytorch_model_fsdp.bin'))
    _reset()
    with pytest.raises(ConfigError, match=rf"checkpoint '{latest}' was written by an FSDP run with "
                                          rf"fsdp_state_dict_type FULL_STATE_DICT \(pytorch_model_fsdp.bin\), which "
                                          rf"this run, a run without FSDP \(DDP or one process\), cannot read"):
        Trainer(load_config(None, _overrides(folder, run, 'train.epochs=2')), resume=True)
    from s4nd_vision.train.checkpoint import _check_model_layout

    def fsdp(kind):
        plugin = SimpleNamespace(state_dict_type=kind)
        return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    _check_model_layout(fsdp(StateDictType.FULL_STATE_DICT), latest)  # (its own: the load goes on)
    with pytest.raises(ConfigError, match=r'written by an FSDP run with fsdp_state_dict_type FULL_STATE_DICT .*, '
                                          r'which this run, an FSDP run with fsdp_state_dict_type SHARDED_STATE_DICT,'):
        _check_model_layout(fsdp(StateDictType.SHARDED_STATE_DICT), latest)
    os.rename(os.path.join(latest, 'pytorch_model_fsdp.bin'), os.path.join(latest, 'model.safetensors'))
    with pytest.raises(ConfigError, match=r'written by a run without FSDP \(DDP or one process\) '
                                          r'\(model.safetensors\), which this run, an FSDP run'):
        _check_model_layout(fsdp(StateDictType.FULL_STATE_DICT), latest)
    os.remove(os.path.join(latest, 'model.safetensors'))  # (none of them: damaged, left to the load's error)
    _check_model_layout(fsdp(StateDictType.FULL_STATE_DICT), latest)


def test_damaged_best_weights_are_a_one_line_error_naming_the_file(tmp_path, folder):
    """A best.safetensors cut short in train.output_dir (read for the update it records) or in the checkpoint (put
    back as the run's best where the folder has none): one line naming it (a SafetensorError naming no file, or
    the damaged copy taken as the run's best weights)."""
    extra = ('train.epochs=1', 'train.max_steps_per_epoch=1', 'data.batch_size=2')
    run = tmp_path / 'run'
    Trainer(load_config(None, _overrides(folder, run, *extra))).fit()
    latest = run / 'checkpoints' / 'step-00000001'
    for damaged in (run / 'best.safetensors', latest / 'best.safetensors'):
        _reset()
        data = (run / 'best.safetensors').read_bytes()
        os.remove(run / 'best.safetensors')  # (a hard link to the checkpoint's copy: each damaged on its own)
        (run / 'best.safetensors').write_bytes(data)
        if damaged != run / 'best.safetensors':
            os.remove(run / 'best.safetensors')
        damaged.write_bytes(data[:len(data) // 2])
        message = (rf"{run}/best.safetensors is damaged \(.*\): move it away" if damaged == run / 'best.safetensors'
                   else rf"checkpoint '{latest}' is damaged \(best.safetensors is cut short\)")
        with pytest.raises(ConfigError, match=message):
            Trainer(load_config(None, _overrides(folder, run, *extra)), resume=True)
        damaged.write_bytes(data)


def test_a_resume_puts_back_a_checkpoint_a_save_of_its_update_set_aside(tmp_path, folder):
    """Killed between the renames of a save of an update saved before (`.old-step-N` set aside, the new one not in
    place): `--resume` resumes that checkpoint, where it found none (or an earlier one)."""
    extra = ('train.epochs=1', 'train.max_steps_per_epoch=1', 'data.batch_size=2')
    Trainer(load_config(None, _overrides(folder, tmp_path, *extra))).fit()
    _reset()
    root = tmp_path / 'checkpoints'
    os.replace(root / 'step-00000001', root / '.old-step-00000001')
    resumed = Trainer(load_config(None, _overrides(folder, tmp_path, *extra)), resume=True)
    assert resumed.resumed_from == str(root / 'step-00000001') and resumed.state.update == 1


def test_the_metrics_row_survives_a_kill_between_checkpoint_and_csv(tmp_path, folder):
    Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=2'))).fit()
    rows = _rows(tmp_path)
    with open(tmp_path / 'metrics.csv', 'w', newline='') as f:  # as if killed before the last row was written
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow(rows[0])
    _reset()
    with pytest.warns(UserWarning, match='train.epochs: 2 -> 3'):
        Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=3')), resume=True).fit()
    after = _rows(tmp_path)
    assert [r['epoch'] for r in after] == ['0', '1', '2']
    assert after[1] == rows[1]  # the row the interrupted run never wrote, from the checkpoint


def test_a_fit_after_an_interrupted_one_keeps_the_rows_since_the_resume(tmp_path, folder):
    """A resumed trainer's fit() interrupted (Ctrl-C in a notebook) and called again: the rows of the epochs it
    completed stay (the checkpoint's rows, which end before them, replaced metrics.csv at the second fit())."""
    extra = ('train.max_steps_per_epoch=1', 'data.batch_size=2')
    Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', *extra))).fit()
    _reset()
    with pytest.warns(UserWarning, match='train.epochs: 1 -> 4'):
        trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=4', *extra)), resume=True)
    train_one_epoch = trainer.train_one_epoch

    def interrupted_at_epoch_2(epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return train_one_epoch(epoch)

    trainer.train_one_epoch = interrupted_at_epoch_2
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert [r['epoch'] for r in _rows(tmp_path)] == ['0', '1']
    trainer.train_one_epoch = train_one_epoch
    trainer.fit()
    assert [r['epoch'] for r in _rows(tmp_path)] == ['0', '1', '2', '3']


@pytest.mark.parametrize('step', ['_export', '_save_checkpoint', 'log'])
def test_a_fit_after_one_interrupted_at_the_epochs_end_redoes_it(tmp_path, folder, step):
    """Ctrl-C (a notebook's) at the end of an epoch, in the best weights' export, the checkpoint's write, or just
    after the row was logged, then `fit()` again: the epoch's end is done again, once. (The state moved on in it: the
    next fit() took the epoch as done, without its row and checkpoint, or took the interrupted best.safetensors as
    written.)"""
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', 'train.max_steps_per_epoch=1',
                                                   'data.batch_size=2')))
    owner = trainer.log if step == 'log' else trainer
    original = getattr(owner, step)

    def interrupted(*args, **kwargs):
        if step == 'log':
            original(*args, **kwargs)  # (the row written, the process interrupted before it went on)
        raise KeyboardInterrupt

    setattr(owner, step, interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    setattr(owner, step, original)
    summary = trainer.fit()
    assert [r['epoch'] for r in _rows(tmp_path)] == ['0']
    assert summary['best_epoch'] == 0 and (tmp_path / 'best.safetensors').is_file()
    assert checkpoint._exported_update(str(tmp_path / 'best.safetensors')) == 1
    end = latest_checkpoint(str(tmp_path))
    assert os.path.basename(end) == 'step-00000001' and [r['epoch'] for r in _rows(end)] == ['0']


@pytest.mark.parametrize('model', [(), ('model.name=test_resnet', 'model.kwargs={}')])
def test_a_fit_after_one_interrupted_mid_update_ends_as_an_uninterrupted_run(tmp_path, folder, model):
    """Ctrl-C (a notebook's) during an update's micro-batches, then `fit()` again: the update starts afresh, without
    the interrupted micro-batches' gradients and with Accelerate's micro-step count at the update's start (it synced
    on the wrong micro-batches after it), and BatchNorm's running statistics as they were before it (the interrupted
    micro-batches' forward passes counted twice), so the weights are the uninterrupted run's; the epoch's row counts
    the updates before the interrupt too; the second fit() holds the run folder again (the first released it)."""
    extra = ('train.epochs=1', 'data.batch_size=2', 'train.grad_accum_steps=3', 'train.max_steps_per_epoch=2', *model)
    Trainer(load_config(None, _overrides(folder, tmp_path / 'straight', *extra))).fit()
    _reset()
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / 'interrupted', *extra)))
    loss = interrupt_loss_at(trainer, 5)  # the second micro-batch of update 2, after the first's backward
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state.update == 1
    trainer.train_loss = loss
    held = []
    trainer.model.register_forward_pre_hook(
        lambda m, args: held.append(os.path.realpath(tmp_path / 'interrupted') in checkpoint._HELD))
    trainer.fit()
    assert held and all(held)
    a, b = (load_file(str(tmp_path / name / 'last.safetensors')) for name in ('interrupted', 'straight'))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    expected, row = _rows(tmp_path / 'straight')[0], _rows(tmp_path / 'interrupted')[0]
    assert float(row['train_loss']) == pytest.approx(float(expected['train_loss']), rel=1e-6)


@pytest.mark.parametrize('clip', ['null', '1.0'])
def test_fp16_fit_after_one_interrupted_between_unscaling_and_step_trains_on(tmp_path, folder, fp16_on_cpu, clip):
    """Ctrl-C (a notebook's) in an fp16 update after its gradients were unscaled (the clipping's, or the check's) and
    before its step, e.g. in the all-reduce of the finite check, where the process waits for the GPU: the next
    `fit()` raised 'unscale_() has already been called on this optimizer since the last update()', the GradScaler
    still holding the interrupted update's unscaling. The update starts afresh, as in float32, and ends as the
    uninterrupted run does."""
    extra = ('train.epochs=1', 'train.mixed_precision=fp16', f'optim.clip_grad={clip}', 'train.max_steps_per_epoch=2')
    Trainer(load_config(None, _overrides(folder, tmp_path / 'straight', *extra))).fit()
    _reset()
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / 'interrupted', *extra)))
    acc, reduce, calls = trainer.accelerator, trainer.accelerator.reduce, []

    def interrupted_at_the_second_check(tensor, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return reduce(tensor, **kwargs)

    acc.reduce = interrupted_at_the_second_check
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state.update == 1
    acc.reduce = reduce
    trainer.fit()
    assert trainer.state.update == 2
    a, b = (load_file(str(tmp_path / name / 'last.safetensors')) for name in ('interrupted', 'straight'))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_mid_epoch_resume_reports_the_uninterrupted_epoch_row(tmp_path):
    root = _write_folder(tmp_path / 'data', n_train=7, n_val=2)
    (tmp_path / 'data' / 'train' / 'vertical' / 'corrupt.png').write_bytes(b'not an image')
    extra = ('train.epochs=1', 'train.checkpoint_every_steps=1', 'train.keep_checkpoints=4', 'aug.mixup=0.5')
    straight = tmp_path / 'straight'
    with pytest.warns(RuntimeWarning, match='skipped unreadable image'):
        Trainer(load_config(None, _overrides(root, straight, *extra))).fit()
    expected = _rows(straight)[0]
    for update in (1, 2):  # resume from a copy of a mid-epoch checkpoint, as after a kill there
        _reset()
        resumed = tmp_path / f'resumed-{update}'
        shutil.copytree(straight / 'checkpoints' / f'step-{update:08d}', resumed / 'checkpoints' / f'step-{update:08d}')
        with warnings.catch_warnings():  # the corrupt image (if after the resume point), the changed output_dir
            warnings.simplefilter('ignore')
            trainer = Trainer(load_config(None, _overrides(root, resumed, *extra)), resume=True)
            assert trainer.state.step_in_epoch == update
            trainer.fit()
        row = _rows(resumed)[0]
        assert float(row['train_loss']) == pytest.approx(float(expected['train_loss']), rel=1e-12, abs=0)
        for key in ('skipped_images', 'nonfinite_steps', 'top1', 'val_loss'):
            assert row[key] == expected[key], key


@pytest.mark.parametrize('writer', ['exported weights', 'accelerate.utils.other.safe_save_file'])
def test_a_full_disk_is_a_one_line_error(tmp_path, folder, capsys, monkeypatch, writer):
    """A full disk ends the run with one error line naming the file, keeping the message (a traceback before):
    exported weights (our writer: the write of the serialized bytes fails) and checkpoints (Accelerate's, through
    safetensors, which reports it as a SafetensorError, not an OSError)."""
    import builtins
    import errno

    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    class FullFile:  # (a file on a full disk: opens, and refuses the write)
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_open(file, mode='r', *args, **kwargs):
        opened = builtins.open(file, mode, *args, **kwargs)
        return FullFile(opened) if mode == 'wb' else opened
    if writer == 'exported weights':
        monkeypatch.setattr('s4nd_vision.utils.files.open', full_open, raising=False)
    else:
        monkeypatch.setattr(writer, full)
    with pytest.raises(SystemExit) as info:
        tool_main('train', _overrides(folder, tmp_path, 'train.epochs=1', 'train.checkpoint_every_steps=1'))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and last.startswith('error: [Errno 28] writing ') and 'No space left' in last, last


# ------------------------------------------------------------------------------------------ one run per folder

def test_a_folder_a_live_run_writes_to_is_refused(tmp_path, folder):
    """Another process holding the run folder (e.g. the orphaned workers of a launcher killed with kill -9) makes
    a new run, fresh or resumed, refuse it before reading or writing anything; it is free once that run ends."""
    import subprocess
    import sys
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); '
         'fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b"pid 1234 on elsewhere"); print("held", flush=True); '
         'time.sleep(60)', str(tmp_path / '.lock')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        cfg = load_config(None, _overrides(folder, tmp_path, 'train.epochs=1'))
        for resume in (False, True):
            with pytest.raises(RunFolderInUse, match=r"train.output_dir '.*' is in use by another run \(pid 1234 on "
                                                  r"elsewhere\).*kill -9"):
                Trainer(cfg, resume=resume, allow_fresh=True)
            _reset()
        assert sorted(os.listdir(tmp_path)) == ['.lock']
    finally:
        holder.kill()
        holder.wait()
    Trainer(cfg).fit()  # the holder is gone: the folder is free again
    _reset()
    Trainer(cfg, resume=True)  # and a later run in the same process takes it again
    assert (tmp_path / 'best.safetensors').is_file()


def test_without_fcntl_runs_train_and_resume_in_an_unlocked_folder(tmp_path, folder, monkeypatch):
    """Windows has no `fcntl`: a run there trains and resumes as elsewhere, the folder unlocked (no .lock file), as
    the README says."""
    monkeypatch.setattr('s4nd_vision.train.checkpoint.fcntl', None)
    cfg = load_config(None, _overrides(folder, tmp_path, 'train.epochs=2', 'train.max_steps_per_epoch=1'))
    trainer = Trainer(cfg)
    interrupt_loss_at(trainer, 2)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert Trainer(cfg, resume=True).fit()['last']['epoch'] == 1  # (a second Trainer of the process, resumed)
    assert not (tmp_path / '.lock').exists() and (tmp_path / 'best.safetensors').is_file()


def _free(folder) -> bool:
    """Whether another process can take the run folder's lock now."""
    import subprocess
    import sys
    probe = ('import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); '
             'fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)')
    return subprocess.run([sys.executable, '-c', probe, str(folder / '.lock')]).returncode == 0


def test_a_batch_larger_than_a_process_epoch_names_the_samples_it_draws(tmp_path):
    """Under repeated augmentation an epoch draws fewer samples than the dataset holds (3840 of MNIST-5k's 4000 on
    one process): a batch between the two trains nothing, and the error says so with the draws, not the 4000
    (it read '3900 ... is more than the 4000 training images')."""
    with pytest.raises(ConfigError, match=r'data.batch_size=3900 x 1 accumulation steps is more than the 3840 '
                                          r'training samples each of the 1 process\(es\) draws per epoch \(of 4000'):
        Trainer(load_config(None, [*TINY_MODEL, 'data.dataset=mnist', 'data.in_chans=1', 'data.img_size=32',
                                   'data.workers=0', 'aug.repeated_aug=3', 'data.batch_size=3900',
                                   f'train.output_dir={tmp_path}', 'train.epochs=1']))


def test_a_run_that_fails_frees_its_folder(tmp_path, folder):
    """A run that fails to start, or diverges, does not keep its folder from the next run of the same process's
    lifetime (a notebook, the zero-shot study, which goes on after a diverged run)."""
    with pytest.raises(ConfigError, match='is more than the'):
        Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', 'data.batch_size=100000')))
    assert _free(tmp_path)
    _reset()
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', 'train.max_nonfinite_steps=0')))
    assert not _free(tmp_path)  # (held while the run lives)
    trainer.train_loss = _NanLossAt(trainer, {1})
    with pytest.raises(TrainingDiverged):
        trainer.fit()
    assert _free(tmp_path)


def test_a_checkpoint_written_before_use_fallback_resumes_with_it(tmp_path, folder):
    """The SSM groups' `use_fallback` (Muon trains them with AdamW) is set by this code, not saved state: a Muon
    checkpoint written before the groups said it (the optimizer's groups restored from it) still resumes with it."""
    Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', 'optim.opt=muon'))).fit()
    _reset()
    path = os.path.join(latest_checkpoint(str(tmp_path)), 'optimizer.bin')
    state = torch.load(path, weights_only=False)
    assert any(g.pop('use_fallback', False) for g in state['param_groups'])
    torch.save(state, path)
    with pytest.warns(UserWarning, match='the new values apply'):
        resumed = Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=2', 'optim.opt=muon')),
                          resume=True)
    own = {id(p) for _, p in ssm_parameters(resumed.accelerator.unwrap_model(resumed.model))}
    groups = [g for g in resumed.optimizer.param_groups if own & {id(p) for p in g['params']}]
    assert groups and all(g['use_fallback'] for g in groups)
