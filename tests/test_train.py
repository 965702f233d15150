"""The trainer: config validation, a real run, progressive resizing, corrupt images, kill-and-resume, two processes."""
import copy
import csv
import json
import math
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
import types
import warnings
from functools import partial

import numpy as np
import pytest
import timm
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import is_compiled_module
from memory_format_runs import train_in_both_memory_formats
from PIL import Image
from safetensors.torch import load_file
from timm.data import resolve_model_data_config
from timm.data.transforms import str_to_interp_mode
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import s4nd_vision  # noqa: F401
from s4nd_vision.data.images import EpochSeeded, ResumableSampler
from s4nd_vision.data.transforms import model_data_config
from s4nd_vision.eval.resolution import eval_resolution
from s4nd_vision.layers import sgconv_weights, ssm_parameters
from s4nd_vision.train import ConfigError, Trainer, latest_checkpoint, load_config
from s4nd_vision.train.optim import param_groups_ssm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a very small ConvNeXt-S4ND: fast enough for a few dozen steps on 2 cores
TINY_MODEL = [
    'model.name=convnext_s4nd_atto',
    'model.kwargs={depths: [1, 1, 1, 1], dims: [8, 16, 16, 16], d_state: 8, stem_chs: 8}',
]


def _write_folder(root, n_train: int = 8, n_val: int = 4, size: int = 32) -> str:
    """Two classes (horizontal / vertical stripes) with random phase and noise, ImageFolder layout."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for c, name in enumerate(('horizontal', 'vertical')):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                stripes = ((np.arange(size) + rng.integers(0, 8)) // 4 % 2 * 200 + 30)
                img = np.broadcast_to(stripes[:, None] if c == 0 else stripes[None, :], (size, size))
                img = np.clip(img[..., None] + rng.integers(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(folder, f'{i}.png'))
    return str(root)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp('stripes'))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each Trainer builds its own Accelerator; the process-wide accelerate state must not leak between tests."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tool_main(name: str):
    """tools/<name>.py's main, loaded in this process (the installed console script's run: tests/test_packaging.py)."""
    return runpy.run_path(os.path.join(ROOT, 'tools', f'{name}.py'))['main']


def interrupt_loss_at(trainer: Trainer, call: int, tick=None):
    """Make `trainer`'s loss raise KeyboardInterrupt (Ctrl-C) at its `call`-th call (`tick()` first at every call);
    returns the loss it wraps."""
    loss, calls = trainer.train_loss, []

    def interrupted(logits, target):
        if tick is not None:
            tick()
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return loss(logits, target)

    trainer.train_loss = interrupted
    return loss


def _overrides(folder, out, *extra):
    return [*TINY_MODEL, f'data.root={folder}', 'data.img_size=32', 'data.batch_size=4', 'data.workers=0',
            'data.interpolation=bilinear', f'train.output_dir={out}', 'optim.lr=2e-3', 'sched.warmup_epochs=0',
            *extra]


# ------------------------------------------------------------------------------------------- config


class _AlwaysFirstClass(torch.nn.Module):
    """Scores class 0 first for every image."""

    def forward(self, x):
        return torch.tensor([1.0, 0.0], device=x.device).expand(len(x), 2).clone()


def test_evaluation_counts_top5_apart_from_top1(folder, tmp_path):
    """The validation's top-5 is its own count: of two classes, a model that always says the first is right on
    half of the images (top-1 50) and has every label among its two (top-5 100)."""
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / 'run', 'train.epochs=1')))
    metrics = trainer.evaluate(_AlwaysFirstClass())
    assert (metrics['top1'], metrics['top5']) == (50, 100)

def test_config_errors_name_the_key(tmp_path, folder):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean optim.lr\?\)"):
        load_config(None, _overrides(folder, tmp_path, 'optim.lrr=0.1'))
    with pytest.raises(ConfigError, match=r'unknown config key .*trian'):
        load_config(None, _overrides(folder, tmp_path, 'trian.epochs=3'))
    with pytest.raises(ConfigError, match='optim.lr must be positive, got -0.1'):
        load_config(None, _overrides(folder, tmp_path, 'optim.lr=-0.1'))
    with pytest.raises(ConfigError, match='data.root must be an existing folder'):
        load_config(None, _overrides(tmp_path / 'missing', tmp_path))
    with pytest.raises(ConfigError, match='train.epochs must be int'):
        load_config(None, _overrides(folder, tmp_path, 'train.epochs=three'))
    with pytest.raises(ConfigError, match='increasing epoch order'):
        stages = 'train.progressive=[{epoch: 0, img_size: 32}, {epoch: 0, img_size: 64}]'
        load_config(None, _overrides(folder, tmp_path, stages))
    with pytest.raises(ConfigError, match='config file not found'):
        load_config(str(tmp_path / 'nope.yaml'))
    # values that timm would refuse only once training runs (a bare AssertionError, or a RuntimeError mid-step)
    for override, message in [
            ('data.mean=[0.5, 0.5]', r'data.mean must be null or one value per channel \(data.in_chans=3\)'),
            ('data.std=[0.2, 0, 0.2]', 'data.std must be positive values'),
            ('model.drop_path_rate=1.5', r'model.drop_path_rate must be in \[0, 1\)'),
            ('aug.cutmix=1.0', 'data.batch_size must be even with aug.mixup or aug.cutmix on, got 3'),
            # (Accelerate's set_seed seeds NumPy, which takes 32-bit seeds)
            ('train.seed=4294967296', r'train.seed must be in \[0, 2\*\*32\)'),
            # (images are read as grayscale or RGB)
            ('data.in_chans=4', r'data.in_chans must be 1 \(images read as grayscale\) or 3 \(RGB\) for '
                                r'data.dataset imagefolder, got 4'),
            ('optim.ssm_lr=1e-7', r'sched.min_lr must be at most optim.ssm_lr \(1e-07\)')]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, _overrides(folder, tmp_path, override, 'data.batch_size=3'))
    with pytest.raises(ConfigError, match='train.progressive changes the training size, but vit_tiny_patch16_224 has '
                                          'a fixed input size .*dynamic_img_size: true'):
        load_config(None, _overrides(folder, tmp_path, 'model.name=vit_tiny_patch16_224', 'model.kwargs={}',
                                     'train.progressive=[{epoch: 0, img_size: 32}, {epoch: 1, img_size: 48}]'))
    # a stage's band-limit checked at load (not when the stage starts, epochs later)
    stages = 'train.progressive=[{epoch: 0, img_size: 32}, {epoch: 1, img_size: 32, bandlimit: 0.5}]'
    for model, message in [
            (['model.name=convnext_sgconv_atto', 'model.kwargs={depths: [1, 1, 1, 1], dims: [8, 16, 16, 16]}'],
             r"train.progressive\[1\].bandlimit: band-limiting applies to the SSM kernels \('s4d', 's4'\); the "
             r"module has SGConvKernels"),
            (['model.name=convnext_atto', 'model.kwargs={}'],
             r"train.progressive\[1\].bandlimit is 0.5, but convnext_atto has no SSM kernels .* leave it null")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, _overrides(folder, tmp_path, *model, stages))
    cfg = load_config(None, _overrides(folder, tmp_path, 'optim.lr=4e-3', 'aug.scale=[0.5, 1]'))
    assert cfg.optim.lr == 4e-3 and cfg.aug.scale == (0.5, 1.0) and cfg.model.kwargs['dims'] == [8, 16, 16, 16]


@pytest.mark.parametrize('path', sorted(
    os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, 's4nd_vision', 'configs'))
    for f in files if f.endswith('.yaml')))
def test_shipped_configs_load(path, folder):
    data = {'imagenet': [f'data.root={folder}'], 'hmdb51': [f'data.root={folder}', f'data.split_dir={folder}']}
    cfg = load_config(path, data.get(os.path.basename(os.path.dirname(path)), []))
    assert timm.is_model(cfg.model.name)


# the global batch of each published recipe: ConvNeXt's (the S4ND paper's ConvNeXt runs), DeiT's, the HMDB-51 runs'
PUBLISHED_GLOBAL_BATCH = {'imagenet/convnext': 4096, 'imagenet/vit': 1024, 'hmdb51/': 64}


@pytest.mark.parametrize('name', [n for n in s4nd_vision.train.config.packaged_configs()
                                  if not n.startswith('demo/')])
def test_shipped_launch_command_trains_at_the_published_global_batch(name, folder):
    """The `accelerate launch` command in a recipe's header trains at the recipe's global batch (data.batch_size x
    --num_processes x train.grad_accum_steps), the lr as the file gives it: the ConvNeXt configs' 8-process command
    trained at 1024 (no accumulation), a quarter of ConvNeXt's 4096, with the lr scaled down to 1e-3. The header
    names where the research code's runs differed, as the README says of every recipe."""
    from s4nd_vision.train.config import _read_config
    header = _read_config(name)
    processes = [int(n) for n in re.findall(r'--num_processes (\d+)', header)]
    assert len(processes) == 1, processes
    cfg = load_config(name, [f'data.root={folder}', f'data.split_dir={folder}'] if name.startswith('hmdb51/') else
                      [f'data.root={folder}'])
    (published,) = [b for prefix, b in PUBLISHED_GLOBAL_BATCH.items() if name.startswith(prefix)]
    assert cfg.data.batch_size * processes[0] * cfg.train.grad_accum_steps == published
    assert f'global batch {published} ' in ' '.join(header.lower().split())  # (the header states it)
    # (the README: each recipe's header names where the research code's own runs differed; the HMDB-51 ones did not)
    assert "the research code's" in ' '.join(header.split()).lower()


def test_cli_bad_config_is_one_line_error(tmp_path, folder, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool_main('train')(_overrides(folder, tmp_path, 'optim.lr=-1'))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == 'error: optim.lr must be positive, got -1.0'


# ------------------------------------------------------------------------------------------ training

def test_single_process_run_exports_loadable_weights(tmp_path, folder, capsys):
    cfg = load_config(None, _overrides(
        folder, tmp_path / 'run', 'train.epochs=2', 'train.ema_decay=0.9', 'aug.mixup=0.8', 'aug.cutmix=1.0',
        'aug.smoothing=0.1', 'optim.ssm_lr=1e-3', 'optim.clip_grad=1.0', 'train.trackers=[tensorboard]'))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit()
    out = tmp_path / 'run'
    lines = (out / 'metrics.csv').read_text().splitlines()
    header = lines[0].split(',')
    for column in ('epoch', 'train_loss', 'top1', 'top5', 'img_per_s', 'lr', 'peak_mem_mb', 'ema_top1',
                   'skipped_images'):
        assert column in header
    assert len(lines) == 3 and summary['best_epoch'] in (0, 1)
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the SSM group got its own lr through the whole schedule; the scheduler reached min_lr at the end
    lrs = sorted({g['lr'] for g in trainer.optimizer.param_groups})
    assert lrs[0] < 2e-5

    weights = load_file(str(out / 'last.safetensors'))
    assert set(weights) == set(after)
    # S4ND kernels are referenced to the training resolution: create the model for it (img_size=32)
    model = timm.create_model('convnext_s4nd_atto', pretrained=True, num_classes=2, img_size=32,
                              pretrained_cfg_overlay=dict(file=str(out / 'last.safetensors'), num_classes=2),
                              **cfg.model.kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.model(x))
    assert (out / 'best.safetensors').is_file() and (out / 'last_ema.safetensors').is_file()
    # the call the run prints rebuilds the model (its architecture kwargs included) and loads the best weights
    prefix = 'load the weights with '
    call = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(prefix))[len(prefix):]
    printed, best = eval(call, {'timm': timm}), load_file(str(out / 'best.safetensors'))
    assert all(torch.equal(printed.state_dict()[k], best[k]) for k in best)
    assert list(out.glob('**/events.out.tfevents.*')), 'no TensorBoard event file'
    assert latest_checkpoint(str(out)).endswith(f'step-{2 * trainer.updates_per_epoch:08d}')
    # a fresh (non-resume) run into a folder that holds checkpoints is refused, not silently mixed
    with pytest.raises(ConfigError, match='--resume'):
        Trainer(cfg)


def test_the_progress_bar_redraws_once_a_minute_into_a_log(tmp_path, folder, capsys, monkeypatch):
    """A log file or pipe (nohup, a batch job's log) got every redraw of the epoch's bar, several a second for the
    whole run: there it redraws once a minute at most (on a terminal, tqdm's ten a second). The loss it shows is read
    at a redraw only (`loss.item()` waits for the device)."""
    from s4nd_vision.train import trainer as trainer_module
    from s4nd_vision.utils.runtime import LOG_REFRESH_S, progress_refresh_s
    for terminal in (False, True):
        monkeypatch.setattr(sys.stderr, 'isatty', lambda: terminal)  # (capsys's stderr: no terminal)
        assert progress_refresh_s() == (0.1 if terminal else LOG_REFRESH_S) and LOG_REFRESH_S == 60
    for refresh_s in (LOG_REFRESH_S, 0):  # (a run of seconds: its first draw only; a redraw at every update)
        monkeypatch.setattr(trainer_module, 'progress_refresh_s', lambda: refresh_s)
        Trainer(load_config(None, _overrides(folder, tmp_path / str(refresh_s), 'train.epochs=1'))).fit()
        captured = capsys.readouterr()
        assert 'epoch 0 @32px' in captured.err and 'top1' in captured.out
        assert ('loss=' in captured.err) == (refresh_s == 0), captured.err
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_an_epoch_interrupted_in_a_notebook_reports_its_whole_time(tmp_path, folder, monkeypatch):
    """Ctrl-C (a notebook's) within an epoch, then `fit()` again: the epoch's epoch_time_s counts the seconds of the
    interrupted fit() as its img_per_s does (it counted those of the second fit() only: 600 s of 800, while img_per_s
    said 16 images in 800 s). A clock that advances 100 s a micro-batch, nothing else."""
    from s4nd_vision.train import trainer as trainer_module
    clock = [0.0]
    monkeypatch.setattr(trainer_module, 'time', types.SimpleNamespace(perf_counter=lambda: clock[0]))
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', 'data.batch_size=2')))
    # interrupted in the third micro-batch, after two updates (200 s)
    interrupt_loss_at(trainer, 3, tick=lambda: clock.__setitem__(0, clock[0] + 100.0))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state.update == 2 and trainer.updates_per_epoch == 8
    trainer.fit()
    row = list(csv.DictReader((tmp_path / 'metrics.csv').read_text().splitlines()))[0]
    assert float(row['img_per_s']) == pytest.approx(16 / 800) and float(row['epoch_time_s']) == pytest.approx(800)


def test_an_epochs_sums_are_float32_on_mps_which_has_no_float64(tmp_path, folder, monkeypatch):
    """Apple's MPS has no float64 (a float64 tensor there raises TypeError, so training on a Mac, where Accelerate
    picks MPS, stopped before its first step): the epoch's running sums are float32 there, and its row is the same to
    float32 rounding (the CPU runs the float32 sums in MPS's place)."""
    from s4nd_vision.train import trainer as trainer_module
    assert trainer_module.sum_dtype(torch.device('mps')) == torch.float32
    assert trainer_module.sum_dtype(torch.device('cpu')) == trainer_module.sum_dtype('cuda:0') == torch.float64
    rows = []
    for dtype in (torch.float64, torch.float32):
        monkeypatch.setattr(trainer_module, 'sum_dtype', lambda device, dtype=dtype: dtype)
        out = tmp_path / str(dtype)
        Trainer(load_config(None, _overrides(folder, out, 'train.epochs=1'))).fit()
        with open(out / 'metrics.csv', newline='') as f:
            rows.append(next(csv.DictReader(f)))
    assert float(rows[1]['train_loss']) == pytest.approx(float(rows[0]['train_loss']), rel=1e-6)


def test_single_channel_run_prints_a_call_that_loads_its_weights_as_they_are(tmp_path, folder, capsys, caplog):
    """The printed call states the file's channels, so timm neither adapts the first conv nor warns that the
    registry's RGB cfg disagrees with the weights."""
    Trainer(load_config(None, _overrides(folder, tmp_path / 'run', 'train.epochs=1', 'data.in_chans=1'))).fit()
    prefix = 'load the weights with '
    call = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(prefix))[len(prefix):]
    caplog.clear()
    printed, best = eval(call, {'timm': timm}), load_file(str(tmp_path / 'run' / 'best.safetensors'))
    assert printed.in_chans == 1 and all(torch.equal(printed.state_dict()[k], best[k]) for k in best)
    assert not [r for r in caplog.records if 'channels' in r.getMessage()]


def test_a_timm_vit_run_prints_a_call_that_rebuilds_it_at_the_training_size(tmp_path, folder, capsys):
    """Other timm models are set to the training size (`set_input_size`): the printed call states it, and the
    preprocessing the run used (the MNIST-style mean/std given in data.*), which the loaded model's data config
    then gives."""
    vit = ['model.name=vit_tiny_patch16_224', 'model.kwargs={depth: 1, embed_dim: 16, num_heads: 1}']
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / 'run', 'train.epochs=1', *vit,
                                                   'data.mean=[0.5, 0.4, 0.3]', 'data.std=[0.2, 0.2, 0.2]')))
    trainer.fit()
    prefix = 'load the weights with '
    call = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(prefix))[len(prefix):]
    printed = eval(call, {'timm': timm}).eval()
    trainer.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(printed(x), trainer.model(x))
    config = resolve_model_data_config(printed)
    assert config['input_size'] == (3, 32, 32)
    for key in ('mean', 'std', 'crop_pct', 'interpolation'):
        assert config[key] == trainer.data.data_config[key], key


def test_the_trained_model_states_the_preprocessing_it_trains_with(tmp_path, folder):
    """timm's data config of `trainer.model` (what `eval_resolution` of it in a notebook uses) is the run's, as the
    printed call's model states it, not the registry's (ImageNet's mean and std, RGB, 224 px)."""
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / 'run', 'train.epochs=1', 'data.in_chans=1',
                                                   'data.mean=[0.1307]', 'data.std=[0.3081]', 'data.crop_pct=1.0',
                                                   'train.ema_decay=0.9')))
    for model in (trainer.model, trainer.ema.module):
        config = model_data_config(model)
        assert config['input_size'] == (1, 32, 32)
        for key in ('mean', 'std', 'crop_pct', 'interpolation'):
            assert config[key] == trainer.data.data_config[key], key
    assert trainer.registered_cfg['mean'] == (0.485, 0.456, 0.406)  # (the printed call's overlay states the run's)
    (row,) = eval_resolution({'run': trainer.model}, folder, [32], split='val', progress=False)
    assert (row['top1'], row['top5']) == pytest.approx(tuple(trainer.evaluate()[k] for k in ('top1', 'top5')))


def test_the_trainer_keeps_the_config_it_was_given(tmp_path, folder):
    """Changing the config object after building the Trainer (a notebook preparing its next run) changes nothing of
    this run: not some keys only (optim.clip_grad, read at every update, but not optim.lr, already in the optimizer),
    nor config.yaml, which would record values the run never trained with."""
    cfg = load_config(None, _overrides(folder, tmp_path / 'run', 'train.epochs=1', 'optim.clip_grad=1.0'))
    trainer = Trainer(cfg)
    cfg.optim.lr, cfg.optim.clip_grad, cfg.aug.smoothing, cfg.train.epochs = 0.5, 0.1, 0.2, 3
    assert (trainer.cfg.optim.lr, trainer.cfg.optim.clip_grad, trainer.cfg.aug.smoothing, trainer.cfg.train.epochs
            ) == (2e-3, 1.0, 0.0, 1)


def test_the_summary_of_a_resumed_complete_run_has_its_last_row(tmp_path, folder):
    """fit() of a finished run resumed at its end (a job script's `resume=True, allow_fresh=True` run again, or a
    notebook's second fit()) trains nothing: its summary['last'] is the run's last metrics row still, not {}."""
    cfg = load_config(None, _overrides(folder, tmp_path, 'train.epochs=1', 'train.max_steps_per_epoch=1'))
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary['last']['epoch'] == 0 and trainer.fit()['last'] == summary['last']
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert Trainer(cfg, resume=True).fit()['last'] == summary['last']


def test_eval_crop_is_the_models_unless_given(tmp_path, folder):
    """data.crop_pct unset: the model's pretrained cfg's, as eval-resolution and timm's validate.py use for the
    same weights (so the run's top-1 and theirs come from the same crop). data.interpolation resamples in the
    training transform's random resized crop as in the evaluation's resize."""
    for extra, expected, interpolation in (((), 0.9, 'bilinear'),
                                           (('data.crop_pct=0.8', 'data.interpolation=bicubic'), 0.8, 'bicubic')):
        trainer = Trainer(load_config(None, _overrides(folder, tmp_path / str(expected), 'train.epochs=1', *extra)))
        assert trainer.registered_cfg['crop_pct'] == 0.9
        assert trainer.data.data_config['crop_pct'] == trainer.model.pretrained_cfg['crop_pct'] == expected
        crop = next(t for t in trainer.data.transform(32, training=False).transforms if hasattr(t, 'size'))
        assert crop.size == math.floor(32 / expected)  # the resize before the 32 px centre crop
        assert crop.interpolation == str_to_interp_mode(interpolation)
        train_crop = trainer.data.transform(32, training=True).transforms[0]
        assert type(train_crop).__name__ == 'RandomResizedCropAndInterpolation'
        assert train_crop.interpolation == str_to_interp_mode(interpolation)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_no_aug_trains_on_the_evaluation_crop_and_refuses_the_augmentation_it_skips(tmp_path, folder):
    """aug.no_aug (resize and centre crop only): training sees what evaluation sees (timm's no_aug squashed the whole
    image to the square, neither cropping at crop_pct nor keeping the aspect ratio: another scale and shape than
    evaluated), as the clips' no_aug does; the image augmentation settings it skips are refused, not ignored."""
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'aug.no_aug=true', 'data.crop_pct=0.8')))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))  # (not square)
    train, val = (trainer.data.transform(32, training=t) for t in (True, False))
    assert torch.equal(train(img), val(img))
    with pytest.raises(ConfigError, match=r'aug.hflip must be left at 0.5 with aug.no_aug .*, got 0.0'):
        load_config(None, _overrides(folder, tmp_path, 'aug.no_aug=true', 'aug.hflip=0'))


def test_the_ema_holds_no_inference_operators_while_training(tmp_path, folder):
    """The EMA's weights change at every update: the operators its evaluation cached would never serve again, only
    hold their memory through the next epoch."""
    trainer = Trainer(load_config(None, _overrides(
        folder, tmp_path, 'train.epochs=2', 'train.max_steps_per_epoch=1', 'train.ema_decay=0.9')))
    layers = [m for m in trainer.ema.module.modules() if isinstance(m, s4nd_vision.layers.S4ND)]
    held = []  # per training step: whether an EMA layer holds cached operators
    trainer.model.register_forward_pre_hook(
        lambda m, args: held.append(any(layer._kernel_cache is not None for layer in layers)) if m.training else None)
    trainer.fit()
    assert layers and held == [False, False]
    assert all(layer._kernel_cache is None for layer in layers)


def test_progressive_resizing_changes_resolution_without_recreating_the_model(tmp_path, folder):
    cfg = load_config(None, _overrides(
        folder, tmp_path, 'train.epochs=3', 'train.max_steps_per_epoch=2', 'data.img_size=48', 'train.ema_decay=0.9',
        'train.progressive=[{epoch: 0, img_size: 32}, {epoch: 2, img_size: 48, bandlimit: 0.5}]'))
    trainer = Trainer(cfg)
    model = trainer.model
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append((m.training, tuple(args[0].shape[-2:]))))
    trainer.fit()
    hook.remove()
    train_sizes = [size for training, size in seen if training]
    assert train_sizes == [(32, 32)] * 4 + [(48, 48)] * 2
    assert all(size == (48, 48) for training, size in seen if not training)  # evaluation at data.img_size
    assert trainer.model is model
    kernels = [m for m in model.modules() if isinstance(m, s4nd_vision.layers.SSMKernel)]
    assert kernels and all(k.bandlimit == 0.5 for k in kernels)
    # the EMA model runs the stage's cut-off too, and its exported weights say so
    ema_kernels = [m for m in trainer.ema.module.modules() if isinstance(m, s4nd_vision.layers.SSMKernel)]
    assert ema_kernels and all(k.bandlimit == 0.5 for k in ema_kernels)
    ema_weights = load_file(str(tmp_path / 'last_ema.safetensors'))
    assert ema_weights['stem.1.kernels.0.bandlimit'].view(torch.float64).item() == 0.5
    stem = trainer.accelerator.unwrap_model(model).stem[1]
    assert stem.l_ref == (48, 48)  # the reference grid is the final resolution: rate 1.5 at 32 px


def test_a_run_resumed_after_a_band_limit_stage_keeps_its_cut_off(tmp_path, folder, monkeypatch):
    """A stage without a band-limit keeps an earlier stage's, also in a run resumed in it from a checkpoint that does
    not hold the kernels' cut-off (FSDP's, made here with `state_dict_without_records`): the resumed model is rebuilt
    with its own (1.0), and trained and exported with it, unlike the uninterrupted run."""
    import s4nd_vision.train.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, '_fsdp_records', lambda acc: s4nd_vision.layers.state_dict_without_records())

    class StoppedAfterFirstEpoch(Trainer):
        def train_one_epoch(self, epoch):
            if epoch == 1:
                raise KeyboardInterrupt
            return super().train_one_epoch(epoch)

    def trainer(cls, out, resume=False):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return cls(load_config(None, _overrides(
            folder, out, 'train.epochs=2', 'train.max_steps_per_epoch=1', 'data.img_size=48', 'train.ema_decay=0.9',
            'train.progressive=[{epoch: 0, img_size: 32, bandlimit: 0}, {epoch: 1, img_size: 48}]')), resume=resume)

    trainer(Trainer, tmp_path / 'straight').fit()
    with pytest.raises(KeyboardInterrupt):
        trainer(StoppedAfterFirstEpoch, tmp_path / 'resumed').fit()
    resumed = trainer(Trainer, tmp_path / 'resumed', resume=True)
    assert resumed.state.epoch == 1
    resumed.fit()
    for name in ('last', 'last_ema'):
        a, b = (load_file(str(tmp_path / run / f'{name}.safetensors')) for run in ('resumed', 'straight'))
        cut_offs = [k for k in b if k.endswith('.bandlimit')]
        assert cut_offs and all(a[k].item() == b[k].item() == 0 for k in cut_offs), name  # off, as stage 0 set it
        for k in b:
            assert torch.equal(a[k], b[k]), f'{name}: {k} differs after resume'


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = _write_folder(tmp_path / 'data', n_train=7, n_val=4)
    (tmp_path / 'data' / 'train' / 'vertical' / 'corrupt.png').write_bytes(b'not an image at all')
    good = (tmp_path / 'data' / 'train' / 'horizontal' / '0.png').read_bytes()
    (tmp_path / 'data' / 'train' / 'horizontal' / 'truncated.png').write_bytes(good[: len(good) // 2])
    (tmp_path / 'data' / 'val' / 'vertical' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff garbage')
    cfg = load_config(None, _overrides(root, tmp_path / 'run', 'train.epochs=1'))
    trainer = Trainer(cfg)
    with pytest.warns(RuntimeWarning, match='skipped unreadable image') as record:
        trainer.fit()
    messages = ' '.join(str(w.message) for w in record)
    assert 'corrupt.png' in messages and 'truncated.png' in messages and 'corrupt.jpg' in messages
    header, row = (tmp_path / 'run' / 'metrics.csv').read_text().splitlines()
    row = dict(zip(header.split(','), row.split(',')))
    assert int(row['skipped_images']) == 2  # 16 files, batch 4: every file is drawn once per epoch
    assert int(row['val_skipped_images']) == 1

    # validation scores the 8 readable images only (the corrupt one's stand-in is not scored)
    model, transform = trainer.accelerator.unwrap_model(trainer.model).eval(), trainer.data.transform(32, False)
    x, y = [], []
    for label, name in enumerate(('horizontal', 'vertical')):
        for path in sorted((tmp_path / 'data' / 'val' / name).glob('*.png')):
            x.append(transform(Image.open(path).convert('RGB')))
            y.append(label)
    with torch.no_grad():
        logits = model(torch.stack(x))
    with pytest.warns(RuntimeWarning, match='corrupt.jpg'):
        metrics = trainer.evaluate()
    assert metrics['top1'] == 100 * int((logits.argmax(1) == torch.tensor(y)).sum()) / len(y)  # (from the counts)
    assert metrics['val_loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(y)).item(),
                                                rel=1e-5)


def test_val_classes_must_be_training_classes_and_keep_their_numbers(tmp_path):
    root = _write_folder(tmp_path / 'data', n_train=2, n_val=2)
    (tmp_path / 'data' / 'val' / 'vertical').rename(tmp_path / 'data' / 'val' / 'diagonal')
    with pytest.raises(ConfigError, match=r"'val' holds images of classes 'train' has none of: \['diagonal'\]"):
        Trainer(load_config(None, _overrides(root, tmp_path / 'run', 'train.epochs=1')))
    # a class without validation images (an empty folder, or none): the others keep the training numbers
    for path in (tmp_path / 'data' / 'val' / 'diagonal').iterdir():
        path.unlink()
    (tmp_path / 'data' / 'val' / 'diagonal').rmdir()
    (tmp_path / 'data' / 'val' / 'horizontal').rename(tmp_path / 'data' / 'val' / 'vertical')
    data = Trainer(load_config(None, _overrides(root, tmp_path / 'run', 'train.epochs=1'))).data
    assert data.num_classes == 2 and [t for _, t in data.val_set.reader.samples] == [1, 1]  # (vertical: 1)


def test_sampler_resumes_mid_epoch_and_shards_ranks():
    data = list(range(20))
    full = list(ResumableSampler(data, epoch=3, seed=1))
    assert [e for e, _, _ in full] == [3] * 20 and sorted(i for _, i, _ in full) == data
    assert all(repeat == 0 for _, _, repeat in full)
    assert list(ResumableSampler(data, epoch=3, seed=1, start=8)) == full[8:]
    assert full != list(ResumableSampler(data, epoch=4, seed=1))
    ranks = [[i for _, i, _ in ResumableSampler(data, 0, num_replicas=2, rank=r)] for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 10
    repeated = [i for _, i, _ in ResumableSampler(data, 0, num_replicas=2, rank=0, repeats=3)]
    assert len(repeated) == 10 and len(set(repeated)) < 10  # repeated augmentation: samples recur


def test_train_seed_sets_the_sample_order_and_the_augmentation():
    """train.seed, not only the epoch, decides each epoch's sample order and each sample's augmentation draws: runs
    of other seeds (a seed study) see other orders and augmentations, runs of one seed the same."""
    class Draws:  # a sample's "augmentation": a draw from the global generator
        def __len__(self):
            return 20

        def __getitem__(self, index):
            return torch.rand(()).item()

    orders = [[i for _, i, _ in ResumableSampler(list(range(20)), epoch=3, seed=s)] for s in (1, 1, 2)]
    assert orders[0] == orders[1] != orders[2]
    draws = [EpochSeeded(Draws(), seed=s)[(3, 5, 0)] for s in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2]


@pytest.mark.parametrize('data', [['aug.auto_augment=rand-m9-mstd0.5-inc1', 'aug.reprob=0.5', 'aug.repeated_aug=2'],
                                  ['data.dataset=mnist', 'data.root=null', 'data.in_chans=1']])
def test_the_loaders_datasets_pickle_as_spawned_workers_take_them(tmp_path, folder, data):
    """DataLoader workers started by spawn (macOS' and Windows' default) get the training and validation datasets,
    their transforms included, pickled: they pickle, and the copies give the samples (the augmentation of each
    seeded as in this process) the process itself reads."""
    import pickle
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, *data)))
    loader = trainer.data.train_batches(0, 32, 0, 2)
    trainer.data.prepare_evaluation()
    for dataset, key in ((loader.dataset, next(iter(loader.sampler))), (trainer.data.val_loader.dataset, 1)):
        copy_ = pickle.loads(pickle.dumps(dataset))
        (x, *rest), (x_copy, *rest_copy) = dataset[key], copy_[key]
        assert torch.equal(x, x_copy) and rest == rest_copy


def test_killed_run_resumes_to_the_same_weights(tmp_path, folder):
    """A real SIGKILL after the first checkpoint, then --resume: the same weights (and EMA) as an uninterrupted run."""
    extra = ('train.epochs=5', 'train.checkpoint_every_steps=3', 'train.ema_decay=0.8', 'aug.mixup=0.5',
             'model.drop_path_rate=0.1', 'aug.auto_augment=rand-m9-mstd0.5')
    killed = tmp_path / 'killed'
    command = [sys.executable, os.path.join(ROOT, 'tools', 'train.py'), *_overrides(folder, killed, *extra)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while latest_checkpoint(str(killed)) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, f'the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}'
    interrupted_at = latest_checkpoint(str(killed))
    assert interrupted_at is not None

    resumed = Trainer(load_config(None, _overrides(folder, killed, *extra)), resume=True)
    assert 0 < resumed.state.update < 5 * resumed.updates_per_epoch
    resumed.fit()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    Trainer(load_config(None, _overrides(folder, tmp_path / 'straight', *extra))).fit()

    for name in ('last', 'last_ema'):
        a = load_file(str(killed / f'{name}.safetensors'))
        b = load_file(str(tmp_path / 'straight' / f'{name}.safetensors'))
        for k in b:
            assert torch.equal(a[k], b[k]), f'{name}: {k} differs after resume'
    rows = (killed / 'metrics.csv').read_text().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['0', '1', '2', '3', '4']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_image_evaluation_of_uneven_splits_is_in_step_and_exact(folder, tmp_path):
    """Validation sets of 1, 3 and 5 images over 2 processes in batches of 1 and 2 (one process has no image of its
    own; a partial last batch), with an unreadable image: every process makes as many forwards (an FSDP2-sharded
    model's forwards are collectives: one more on a process hangs the run), and the images the loader repeats to
    even out the processes are not scored twice (top-1 from the images themselves)."""
    out = tmp_path / 'cases.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()),
           os.path.join(ROOT, 'tests', 'dist_image_eval_script.py'), str(out), *_overrides(folder, tmp_path)]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads(out.read_text())
    assert len(cases) == 8
    for case in cases:
        assert case['forwards'][0] == case['forwards'][1] > 0, case
        assert case['metrics']['top1'] == pytest.approx(case['expected_top1']), case
        assert case['metrics']['val_skipped_images'] == case['unreadable'], case


@pytest.fixture(scope='module')
def two_process_runs(tmp_path_factory, folder):
    """One `accelerate launch` of two CPU processes (gloo) running tests/dist_train_script.py's four runs one after
    the other: 'sync' (rank 1's loss NaN at update 1; a checkpoint at every update), 'resumed' (resumes 'sync' from
    its checkpoint within the last epoch, into a folder of its own), 'bn_ema' (a BatchNorm model with an EMA), and
    last a run whose train.output_dir is a folder of each process's own ('node{rank}'), which must stop both
    processes (so the launch fails). (One launch: each process imports torch, timm and accelerate once for the
    four.) Returns the folder of the runs and the launch's result (unbuffered output: each rank prints 'run <i> of 4'
    as run i starts)."""
    tmp = tmp_path_factory.mktemp('two_process')
    sync = ('train.epochs=2', 'train.ema_decay=0.9', 'train.checkpoint_every_steps=1')
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    cmd = ['accelerate', 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(_free_port()),
           os.path.join(ROOT, 'tests', 'dist_train_script.py'),
           '--nan-on-rank1-at=1', *_overrides(folder, tmp / 'sync', *sync),
           '--then', f'--resume={tmp / "sync" / "checkpoints" / "step-00000003"}', *_overrides(folder, tmp / 'resumed',
                                                                                              *sync),
           '--then', *_overrides(folder, tmp / 'bn_ema', 'model.name=test_resnet', 'model.kwargs={}', 'train.epochs=1',
                                 'train.ema_decay=0.5', 'data.batch_size=2'),
           '--then', *_overrides(folder, tmp / 'node{rank}', 'train.epochs=1')]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return tmp, result


def _finished(tmp, name, result):
    """The launch's run `name` trained to its end on both ranks (the script writes rank<r>.safetensors last)."""
    assert all((tmp / name / f'rank{r}.safetensors').is_file() for r in (0, 1)), result.stderr[-3000:]


@pytest.mark.xdist_group('two_process_runs')  # (shares its module fixture's run: one process)
def test_two_process_run_synchronizes_gradients(two_process_runs):
    """Also: an update skipped for a NaN loss on rank 1 is counted once, and none of its losses (rank 0's finite
    ones included) enter train_loss."""
    tmp, result = two_process_runs
    _finished(tmp, 'sync', result)
    out = tmp / 'sync'
    assert 'training convnext_s4nd_atto on 2 process(es), global batch 8' in result.stdout  # (run 2: test_resnet)
    ranks = [load_file(str(out / f'rank{r}.safetensors')) for r in (0, 1)]
    initial = load_file(str(out / 'rank0_initial.safetensors'))
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), f'{k} differs between ranks: gradients were not synchronized'
    assert any(not torch.equal(ranks[0][k], initial[k]) for k in initial)
    shards = [set(map(int, (out / f'rank{r}_indices.txt').read_text().split())) for r in (0, 1)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]  # each rank trained on its own half

    rows = list(csv.DictReader((out / 'metrics.csv').read_text().splitlines()))
    assert [int(r['nonfinite_steps']) for r in rows] == [1, 0]
    logged = [line.split() for r in (0, 1) for line in (out / f'rank{r}_losses.txt').read_text().splitlines()]
    applied = [(float(loss), int(n)) for update, loss, n in logged if int(update) < 2 and update != '1']
    assert float(rows[0]['train_loss']) == pytest.approx(sum(v * n for v, n in applied) / sum(n for _, n in applied))
    # `evaluate` after `fit` (whose process group stays up) scores the final model as the last row does
    evaluation = json.loads((out / 'evaluate_after_fit.json').read_text())
    assert evaluation['top1'] == pytest.approx(float(rows[-1]['top1']))
    assert evaluation['val_loss'] == pytest.approx(float(rows[-1]['val_loss']))


@pytest.mark.xdist_group('two_process_runs')  # (shares its module fixture's run: one process)
def test_two_process_run_resumed_within_an_epoch_ends_as_the_uninterrupted_run(two_process_runs):
    """Two processes resumed from a checkpoint within the last epoch (after the skipped update of epoch 0): the
    same weights, EMA and metrics rows (the earlier epoch's from the checkpoint, the resumed epoch's from its
    carried sums) as the run that went through."""
    tmp, result = two_process_runs
    _finished(tmp, 'resumed', result)
    for name in ('last', 'last_ema'):
        a, b = (load_file(str(tmp / run / f'{name}.safetensors')) for run in ('resumed', 'sync'))
        for k in b:
            assert torch.equal(a[k], b[k]), f'{name}: {k} differs after the two-process resume'
    timed = ('img_per_s', 'epoch_time_s', 'peak_mem_mb')
    rows = [[{k: v for k, v in r.items() if k not in timed} for r in csv.DictReader((tmp / run / 'metrics.csv')
                                                                                   .read_text().splitlines())]
            for run in ('resumed', 'sync')]
    assert [r['epoch'] for r in rows[0]] == ['0', '1'] and rows[0] == rows[1]


@pytest.mark.xdist_group('two_process_runs')  # (shares its module fixture's run: one process)
def test_two_process_ema_of_a_batchnorm_model_is_the_same_on_every_process(two_process_runs):
    """Each process's EMA averages its own BatchNorm statistics (DDP broadcasts only the model's): the EMA evaluated
    on every process is the main process's, the one last_ema.safetensors holds."""
    tmp, result = two_process_runs
    _finished(tmp, 'bn_ema', result)
    out = tmp / 'bn_ema'
    emas = [load_file(str(out / f'rank{r}_ema.safetensors')) for r in (0, 1)]
    exported = load_file(str(out / 'last_ema.safetensors'))
    assert any('running_mean' in k for k in exported)
    for k in exported:
        assert torch.equal(emas[0][k], exported[k]) and torch.equal(emas[1][k], exported[k]), k


@pytest.mark.xdist_group('two_process_runs')  # (shares its module fixture's run: one process)
def test_output_folder_must_be_the_same_on_every_process(two_process_runs):
    """A train.output_dir on each machine's own disk (here: one folder per process) is refused by every process
    before any training: the other machines would not see the main one's checkpoints when resuming. (The launch's
    last run: the runs before it finished, so this one's error is what ends the launch.)"""
    tmp, result = two_process_runs
    _finished(tmp, 'bn_ema', result)
    assert result.returncode != 0
    message = 'is not the same folder on every process: 1 of 2 processes do not see what the main process writes'
    assert result.stderr.count(message) == 2, result.stderr[-3000:]  # both processes stop, none waits for the other
    # nothing trained after a process started the last run (its first collective waits for both processes)
    assert 'run 4 of 4' in result.stdout, result.stderr[-3000:]
    assert 'training convnext_s4nd_atto' not in result.stdout[result.stdout.index('run 4 of 4'):]
    assert os.listdir(tmp / 'node0') == []  # the marker is gone


def _two_machines(overrides, timeout: float = 240):
    """`tools/train.py` as two machines of one process each (two `accelerate launch --num_machines 2`, gloo on this
    host), machine r with its own `overrides[r]`: [(exit status, stdout, stderr)] of each launcher; both are stopped
    after `timeout` seconds (status None)."""
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    port = str(_free_port())
    launchers = [subprocess.Popen(
        ['accelerate', 'launch', '--multi_gpu', '--num_machines', '2', '--machine_rank', str(rank),
         '--main_process_ip', '127.0.0.1', '--main_process_port', port, '--num_processes', '2',
         '--mixed_precision', 'no', '--dynamo_backend', 'no', os.path.join(ROOT, 'tools', 'train.py'), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank, args in enumerate(overrides)]
    deadline, results = time.monotonic() + timeout, []
    for launcher in launchers:
        try:
            out, err = launcher.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((launcher.returncode, out, err))
        except subprocess.TimeoutExpired:
            launcher.terminate()  # (torchrun stops its worker on SIGTERM; a killed launcher would leave it running)
            out, err = launcher.communicate(timeout=60)
            results.append((None, out, err))
    return results


@pytest.mark.parametrize('differ', ['config', 'data'])
def test_machines_that_differ_are_refused_by_every_process(tmp_path, folder, differ):
    """Each machine builds its model, optimizer and data from its own command line and files: a learning rate,
    model.kwargs or data copy of its own would silently train other weights, or deadlock with other updates per
    epoch. The run's start compares them (data.root may differ: its contents are compared) and stops every process,
    naming the keys and the processes that hold each value."""
    if differ == 'config':
        own = ['optim.lr=3e-3', 'model.kwargs={depths: [1, 1, 1, 1], dims: [8, 16, 16, 16], d_state: 8, '
                                'stem_chs: 8, bandlimit: 0.3}']
        expected = ['optim.lr is 0.002 on process 0 of 2 (host ', '0.003 on process 1 of 2 (host ',
                    "model.kwargs is {'d_state': 8, 'depths': [1, 1, 1, 1], 'dims': [8, 16, 16, 16], 'stem_chs': 8} on "
                    "process 0 of 2 (host ", "{'bandlimit': 0.3, 'd_state': 8"]
    else:  # a stale copy of the data on machine 1 (other images: the same labels and names, fewer of them)
        own = [f'data.root={_write_folder(tmp_path / "stale", n_train=6)}']
        expected = ['training images is 16 on process 0 of 2 (host ', '12 on process 1 of 2 (host ',
                    'micro-batches per process and epoch is 2 on process 0 of 2']
    results = _two_machines([_overrides(folder, tmp_path / 'run', 'train.epochs=1'),
                             _overrides(folder, tmp_path / 'run', 'train.epochs=1', *own)])
    for status, out, err in results:
        assert status not in (0, None), err[-3000:]
        assert 'error: the processes of this run differ (every machine must run the same config' in err, err[-3000:]
        for text in expected:
            assert text in err, err[-3000:]
        assert 'training convnext_s4nd_atto' not in out


def test_a_config_error_on_one_machine_stops_every_machine(tmp_path, folder):
    """A config that fails on one machine only (here its data missing; a typo in its command line is the same
    ConfigError of load_config, whose message test_config_errors_name_the_key checks) stops that process before it
    joins the others; they learn it at their first collective and stop too, each naming the process and its error,
    instead of waiting for it until the process group's timeout (30 minutes)."""
    own = f'data.root={tmp_path / "missing"}'
    expected = 'data.root must be an existing folder'
    results = _two_machines([_overrides(folder, tmp_path / 'run', 'train.epochs=1'),
                             _overrides(folder, tmp_path / 'run', 'train.epochs=1', own)])
    for status, out, err in results:
        assert status not in (0, None), err[-3000:]
        assert 'error: process 1 of 2 (host ' in err and expected in err, err[-3000:]
        assert 'training convnext_s4nd_atto' not in out


def test_a_run_folder_the_main_process_cannot_create_stops_every_machine(tmp_path, folder):
    """Only the main process creates train.output_dir: where it cannot (here a file stands in its path; a read-only
    mount, a full disk), every process stops naming the error, where the others waited for it in their next
    collective (NCCL: until the process group's timeout; gloo: a crashed peer, unnamed)."""
    (tmp_path / 'file').write_text('')
    results = _two_machines([_overrides(folder, tmp_path / 'file' / 'run', 'train.epochs=1')] * 2)
    for status, out, err in results:
        assert status not in (0, None), err[-3000:]
        assert 'error: process 0 of 2 (host ' in err and 'Not a directory' in err, err[-3000:]
        assert 'training convnext_s4nd_atto' not in out


def test_a_run_folder_the_main_process_cannot_write_stops_every_process(tmp_path, monkeypatch):
    """`check_shared_folder`'s marker, written by the main process alone: where it cannot be (a read-only mount;
    here a file stands in the folder's place), the error reaches every process (process 1 here: the exchange's
    other entry), which waited for it before. (Two processes as the collectives see them, from process 0.)"""
    from s4nd_vision.train import checkpoint

    gathered = []

    def gather(local):
        gathered.append(local[0])
        return local + [(None, {}, 'b')]

    monkeypatch.setattr(checkpoint, 'gather_object', gather)
    monkeypatch.setattr(checkpoint, 'broadcast_object_list', lambda objects: objects)
    main = type('Main', (), {'num_processes': 2, 'is_main_process': True})()
    (tmp_path / 'file').write_text('')
    with pytest.raises(ConfigError, match=r'^process 0 of 2 \(host .*\): \[Errno 20\] Not a directory'):
        checkpoint.check_shared_folder(main, str(tmp_path / 'file'))
    assert len(gathered) == 1 and 'Not a directory' in gathered[0][0]


def test_a_data_folder_refused_on_one_machine_stops_every_machine(tmp_path, folder, monkeypatch):
    """The image folder's refusals are ValueErrors (here a `__MACOSX` folder in one machine's copy of the data): the
    start-up exchange passes them to every process as it passes a ConfigError, where the process stopped alone and
    the others waited in their gather (NCCL: until the process group's timeout; gloo: a crashed peer, unnamed).
    (Two processes as the exchange sees them: this one, 0, and process 1 on host b, whose data is fine.)"""
    import shutil

    from s4nd_vision.data.images import ImageFolderDataset
    from s4nd_vision.train import checkpoint

    root = shutil.copytree(os.path.join(folder, 'train'), tmp_path / 'train')
    os.makedirs(root / '__MACOSX' / 'vertical')
    shutil.copy(root / 'vertical' / '0.png', root / '__MACOSX' / 'vertical' / '._0.png')
    gathered = []

    def gather(local):
        gathered.append(local[0])
        return local + [(None, {'optim.lr': 0.002}, 'b')]

    monkeypatch.setattr(checkpoint, 'gather_object', gather)
    two = type('State', (), {'num_processes': 2})()
    with pytest.raises(ConfigError, match=r"^process 0 of 2 \(host .*\): .*is in '__MACOSX' of .*, a hidden folder"):
        with checkpoint.same_on_every_process(two) as facts:
            facts['optim.lr'] = 0.002
            ImageFolderDataset(str(root))
    assert len(gathered) == 1 and "is in '__MACOSX'" in gathered[0][0]  # the other process learns it too


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, folder):
    """2 micro-batches of 2 with accumulation == 1 batch of 4 (same samples, same augmentations, no drop path)."""
    runs = {}
    for name, batch, accum in (('big', 4, 1), ('accum', 2, 2)):
        cfg = load_config(None, _overrides(folder, tmp_path / name, 'train.epochs=1', f'data.batch_size={batch}',
                                           f'train.grad_accum_steps={accum}', 'train.max_steps_per_epoch=2'))
        trainer = Trainer(cfg)
        assert trainer.global_batch == 4 and trainer.updates_per_epoch == 2
        trainer.fit()
        runs[name] = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    for k, v in runs['big'].items():
        torch.testing.assert_close(runs['accum'][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize('mixup', [False, True])
def test_a_run_takes_the_updates_of_a_hand_written_timm_loop(tmp_path, folder, mixup):
    """The training step against timm's train.py written out by hand on the batches the run drew: each micro-batch's
    loss (timm's choice: SoftTargetCrossEntropy on Mixup/CutMix's smoothed targets, else LabelSmoothingCrossEntropy)
    divided by the accumulation steps, the accumulated gradient clipped by its norm, then the optimizer step (SSM
    lr, layer decay), the schedule stepped per update (half an epoch of warmup) and the EMA updated; the epoch's
    train_loss is the per-sample mean of its losses and its lr the largest group's after its last update."""
    smoothing = 0.1
    extra = ['train.epochs=2', 'data.batch_size=2', 'train.grad_accum_steps=2', 'train.max_steps_per_epoch=2',
             'sched.warmup_epochs=0.5', 'optim.clip_grad=0.05', 'optim.ssm_lr=5e-4', 'optim.layer_decay=0.6',
             'train.ema_decay=0.8', f'aug.smoothing={smoothing}']
    if mixup:
        extra += ['aug.mixup=0.8', 'aug.cutmix=1.0']
    cfg = load_config(None, _overrides(folder, tmp_path / 'run', *extra))
    trainer = Trainer(cfg)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    reference = copy.deepcopy(unwrapped)
    assert type(trainer.train_loss) is (SoftTargetCrossEntropy if mixup else LabelSmoothingCrossEntropy)
    batches, inputs, train_loss = [], [], trainer.train_loss
    hook = unwrapped.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()) if m.training else None)

    def recording_loss(logits, target):
        batches.append((inputs[-1], target.clone()))
        return train_loss(logits, target)

    clip_norms, clip = [], trainer.accelerator.clip_grad_norm_

    def recording_clip(*args, **kwargs):  # (the norm of the accumulated gradient, which AdamW and clipping hide)
        norm = clip(*args, **kwargs)
        clip_norms.append(float(norm))
        return norm

    trainer.train_loss, trainer.accelerator.clip_grad_norm_ = recording_loss, recording_clip
    trainer.fit()
    hook.remove()
    rows = list(csv.DictReader((tmp_path / 'run' / 'metrics.csv').read_text().splitlines()))
    accum, per_epoch = 2, trainer.updates_per_epoch
    assert per_epoch == 2 and len(batches) == cfg.train.epochs * per_epoch * accum
    assert all(target.ndim == (2 if mixup else 1) for _, target in batches)
    if mixup:  # Mixup's targets, smoothed: each class at least smoothing / classes, summing to 1
        targets = torch.cat([target for _, target in batches])
        assert targets.min() >= smoothing / 2 - 1e-6
        torch.testing.assert_close(targets.sum(1), torch.ones(len(targets)))

    loss_fn = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(smoothing)
    optimizer = create_optimizer_v2(reference, 'adamw', lr=2e-3, weight_decay=0.05, param_group_fn=partial(
        param_groups_ssm, weight_decay=0.05, ssm_lr=5e-4, layer_decay=0.6))
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=2, warmup_epochs=0.5, warmup_lr=1e-6,
                                       min_lr=1e-6, step_on_epochs=False, updates_per_epoch=per_epoch)
    ema = ModelEmaV3(reference, decay=0.8)
    reference.train()
    norms, epoch_losses, epoch_lrs = [], [[] for _ in rows], []
    for update in range(cfg.train.epochs * per_epoch):
        for x, target in batches[update * accum:(update + 1) * accum]:
            loss = loss_fn(reference(x), target)
            (loss / accum).backward()
            epoch_losses[update // per_epoch].append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)))
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step_update(num_updates=update + 1)
        ema.update(reference, step=update + 1)
        if (update + 1) % per_epoch == 0:
            epoch_lrs.append(max(g['lr'] for g in optimizer.param_groups))
    for row, losses, lr in zip(rows, epoch_losses, epoch_lrs, strict=True):
        assert float(row['train_loss']) == pytest.approx(np.mean(losses), rel=1e-6), row
        assert float(row['lr']) == pytest.approx(lr, rel=1e-9), row
    assert min(norms) > 0.05  # (every update clipped)
    assert clip_norms == pytest.approx(norms, rel=1e-5)
    for name, got, want in (('model', unwrapped, reference), ('ema', trainer.ema.module, ema.module)):
        want = want.state_dict()
        for key, value in got.state_dict().items():
            torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=f'{name}: {key}')


def test_a_partial_last_accumulation_window_is_warned_about(tmp_path, folder):
    """An epoch makes whole updates (resumption counts them): 8 micro-batches of 2 per epoch in updates of 3 leave
    the last 2 out, which the run says at its start; not when the steps divide them or train.max_steps_per_epoch
    ends the epoch before them anyway."""
    for extra, warned in ((('train.grad_accum_steps=3',), True), (('train.grad_accum_steps=2',), False),
                          (('train.grad_accum_steps=3', 'train.max_steps_per_epoch=1'), False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            Trainer(load_config(None, _overrides(folder, tmp_path / '-'.join(extra), 'data.batch_size=2', *extra)))
        messages = [str(w.message) for w in caught if 'does not divide' in str(w.message)]
        if warned:
            assert len(messages) == 1 and messages[0].startswith(
                'train.grad_accum_steps=3 does not divide the 8 micro-batches (data.batch_size=2) of an epoch per '
                'process: the last 2 are left out, 4 of the 16 images an epoch draws'), messages
        else:
            assert not messages, extra
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_accumulation_steps_set_by_the_launcher_must_match_the_config(tmp_path, folder, monkeypatch):
    """Accelerate takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS over its argument; the loop counts updates by the
    config: a difference would silently change the batch, the lr scaling and the schedule."""
    monkeypatch.setenv('ACCELERATE_GRADIENT_ACCUMULATION_STEPS', '4')
    with pytest.raises(ConfigError, match=r'train.grad_accum_steps is 2 .* sets 4'):
        Trainer(load_config(None, _overrides(folder, tmp_path, 'train.grad_accum_steps=2')))


def test_processes_launched_without_a_process_group_are_refused(tmp_path, folder, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2` where no GPU is visible (and no ACCELERATE_USE_CPU=1):
    torchrun starts 2 workers (WORLD_SIZE=2) that Accelerate runs as single processes, each training alone; one
    used to stop with 'train.output_dir is in use by another run', naming its sibling. Accelerate's
    `notebook_launcher(num_processes=2)` on CPUs does the same: the message says what a notebook sets."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(ConfigError, match=r'the launcher started 2 processes .* ACCELERATE_USE_CPU=1 .*in a notebook, '
                                          r"os.environ\['ACCELERATE_USE_CPU'\] = '1' before notebook_launcher"):
        Trainer(load_config(None, _overrides(folder, tmp_path / 'run')))
    assert not (tmp_path / 'run').exists()


def test_an_fsdp_launch_that_accelerate_runs_without_fsdp_is_refused(tmp_path, folder, monkeypatch):
    """`accelerate launch --config_file` with `distributed_type: FSDP` and ACCELERATE_USE_CPU=1: the launcher sets
    ACCELERATE_USE_FSDP, but Accelerate enables FSDP for GPU processes only and trained these with DDP instead,
    without a word. Here one CPU process with the launcher's variables (FSDP2's: FSDP1's plugin refuses CPUs itself).
    DeepSpeed's launch likewise: tests/test_train_parts.py."""
    monkeypatch.setenv('ACCELERATE_USE_FSDP', 'true')
    monkeypatch.setenv('FSDP_VERSION', '2')
    with pytest.raises(ConfigError, match=r'asks for FSDP \(ACCELERATE_USE_FSDP=true\), but Accelerate runs these 1 '
                                          r'process\(es\) on cpu without it \(FSDP on GPUs only\): they would train '
                                          r'as one process'):
        Trainer(load_config(None, _overrides(folder, tmp_path / 'run')))
    assert not (tmp_path / 'run').exists()


def test_layer_decay_groups_keep_the_ssm_lr():
    model = timm.create_model('convnext_s4nd_atto')
    opt = create_optimizer_v2(model, 'adamw', lr=1e-2, param_group_fn=partial(
        param_groups_ssm, weight_decay=0.05, ssm_lr=1e-3, layer_decay=0.5))
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert len(scales) > 3 and scales[-1] == 1.0 and scales[0] < 0.01
    ssm_ids = {id(p) for _, p in ssm_parameters(model)}
    for g in opt.param_groups:
        ssm = [id(p) in ssm_ids for p in g['params']]
        assert all(ssm) or not any(ssm)
        if all(ssm):
            assert g['lr'] == 1e-3 and g['weight_decay'] == 0.0
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize('layer_decay', [None, 0.5])
def test_ssm_parameters_take_the_ssm_weight_decay(layer_decay):
    """SSM parameters get optim.ssm_weight_decay (default 0), not the weight decay of the other weights, also when
    the optimizer is created with that weight decay (as the trainer creates it), with or without layer decay."""
    model = timm.create_model('convnext_s4nd_atto')
    ssm_ids = {id(p) for _, p in ssm_parameters(model)}
    for ssm_weight_decay in (0.0, 0.01):
        opt = create_optimizer_v2(model, 'adamw', lr=1e-2, weight_decay=0.05, param_group_fn=partial(
            param_groups_ssm, weight_decay=0.05, ssm_lr=1e-3, ssm_weight_decay=ssm_weight_decay,
            layer_decay=layer_decay))
        decays = {g['weight_decay'] for g in opt.param_groups for p in g['params'] if id(p) in ssm_ids}
        assert decays == {ssm_weight_decay}, ssm_weight_decay


@pytest.mark.parametrize('layer_decay', [None, 0.5])
def test_sgconv_weights_take_the_ssm_lr_with_weight_decay(layer_decay):
    """The SGConv code trains its sub-kernel weights at lr 0.001 (its `_optim` sets only that): with `ssm_lr` they
    get it, with the decay the other weights get; nothing else changes group."""
    model = timm.create_model('convnext_sgconv_atto')
    kernels = {id(p) for _, p in sgconv_weights(model)}
    assert kernels
    opt = create_optimizer_v2(model, 'adamw', lr=1e-2, param_group_fn=partial(
        param_groups_ssm, weight_decay=0.05, ssm_lr=1e-3, layer_decay=layer_decay))
    for g in opt.param_groups:
        ids = {id(p) for p in g['params']}
        assert ids <= kernels or not ids & kernels
        if ids <= kernels:
            assert g['lr'] == 1e-3 and g['weight_decay'] == 0.05
        else:
            assert g['lr'] == 1e-2
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


def test_ssm_groups_keep_the_models_no_weight_decay():
    """timm's factory never gives a param_group_fn the model's no_weight_decay(): param_groups_ssm reads it itself,
    so the README's recipe decays what plain create_optimizer_v2 decays (not a ViT's pos_embed and cls_token)."""
    model = timm.create_model('vit_tiny_patch16_224', depth=1, img_size=32)
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(opt):
        return {names[id(p)] for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}

    plain = decayed(create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05))
    assert not plain & {'pos_embed', 'cls_token'}
    for layer_decay in (None, 0.75):
        assert decayed(create_optimizer_v2(model, 'adamw', lr=1e-3, param_group_fn=partial(
            param_groups_ssm, weight_decay=0.05, ssm_lr=1e-3, layer_decay=layer_decay))) == plain, layer_decay


@pytest.mark.parametrize('layer_decay', [None, 0.5])
def test_ssm_groups_take_the_optimizers_weight_decay_unless_given_their_own(layer_decay):
    """`param_groups_ssm` without `weight_decay` leaves the decayed groups to the optimizer's weight decay: a
    `partial(param_groups_ssm, ssm_lr=...)` given to `create_optimizer_v2(..., weight_decay=0.3)` decayed them at 0.05
    (its default then), and at 0.05 with the optimizer's weight_decay=0 too, without a word."""
    model = timm.create_model('convnext_sgconv_atto', depths=(1, 1), dims=(8, 16), img_size=32)
    kernels = {id(p) for _, p in sgconv_weights(model)}
    for weight_decay in (0.3, 0.0):
        opt = create_optimizer_v2(model, 'adamw', lr=1e-2, weight_decay=weight_decay, param_group_fn=partial(
            param_groups_ssm, ssm_lr=1e-3, layer_decay=layer_decay))
        decays = {(any(id(p) in kernels for p in g['params']), g['weight_decay']) for g in opt.param_groups
                  if any(p.ndim > 1 for p in g['params'])}
        assert decays == {(True, weight_decay), (False, weight_decay)}, weight_decay
    # given, it is the decay of those groups, whatever the optimizer's
    opt = create_optimizer_v2(model, 'adamw', lr=1e-2, weight_decay=0.3, param_group_fn=partial(
        param_groups_ssm, weight_decay=0.05, ssm_lr=1e-3, layer_decay=layer_decay))
    assert {g['weight_decay'] for g in opt.param_groups} == {0.0, 0.05}


@pytest.mark.parametrize('opt_name', ['muon', 'adamuon'])
def test_hybrid_optimizers_train_the_ssm_parameters_with_their_fallback(opt_name):
    """timm's Muon orthogonalizes the update of every parameter that has the shape of a matrix, unless its group says
    `use_fallback`: the SSM parameters A and B ((H, N), (H, N, 2)) and SGConv's sub-kernels ((H, scales, size),
    per-channel values like a depthwise conv's, which Muon leaves to its fallback) were updated as weight matrices
    at `ssm_lr`. Their groups go to the fallback (AdamW), which the S4 and SGConv code trains them with."""
    for name in ('convnext_s4nd_atto', 'convnext_sgconv_atto'):
        model = timm.create_model(name, depths=(1, 1), dims=(8, 16), d_state=8, img_size=32, num_classes=2)
        own = {id(p) for _, p in ssm_parameters(model)} | {id(p) for _, p in sgconv_weights(model)}
        opt = create_optimizer_v2(model, opt_name, lr=1e-2, weight_decay=0.05, param_group_fn=partial(
            param_groups_ssm, weight_decay=0.05, ssm_lr=1e-3))
        model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
        opt.step()
        routed = {id(p): opt.state[p]['use_muon'] for g in opt.param_groups for p in g['params'] if p in opt.state}
        assert own and own <= routed.keys() and not any(routed[i] for i in own), name
        assert any(routed.values()), name  # (the other weight matrices still take Muon's update)


def test_the_model_is_built_for_the_training_size(tmp_path, folder):
    """S4ND models are created at data.img_size (their kernels' reference grids), not moved there afterwards;
    their data config says it."""
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path)))
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.img_size == (32, 32) and model.stem[1].l_ref == (32, 32)
    assert model.stages[3].blocks[0].conv_dw.l_ref == (1, 1)
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)
    assert trainer.data.rebuild_kwargs('convnext_s4nd_atto', model) == dict(img_size=32)
    assert trainer.data.rebuild_kwargs('convnext_atto', timm.create_model('convnext_atto')) == {}


def test_channels_last_run(tmp_path, folder):
    train_in_both_memory_formats(tmp_path, partial(_overrides, folder), torch.channels_last)


def test_run_compiled_by_accelerate_trains_and_exports_like_an_eager_run(tmp_path, folder, monkeypatch):
    """`accelerate launch --dynamo_backend ...` compiles the model in `prepare`: the run trains as the eager run does
    and writes its weights (the EMA's too) with the plain model's keys, not the compiled wrapper's '_orig_mod.'.
    (A one-stage ConvNeXt-S4ND: S4ND stem, block and head as in TINY_MODEL, a graph a quarter the size to compile.)"""
    extra = ('train.epochs=1', 'train.ema_decay=0.9', 'model.kwargs={depths: [1], dims: [8], d_state: 8, stem_chs: 8}')
    Trainer(load_config(None, _overrides(folder, tmp_path / 'eager', *extra))).fit()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    monkeypatch.setenv('ACCELERATE_DYNAMO_BACKEND', 'AOT_EAGER')  # dynamo and AOT autograd without code generation
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / 'compiled', *extra)))
    assert is_compiled_module(trainer.model) and not is_compiled_module(trainer.ema.module)
    trainer.fit()
    for name in ('last', 'last_ema', 'best'):
        eager, compiled = (load_file(str(tmp_path / run / f'{name}.safetensors')) for run in ('eager', 'compiled'))
        assert compiled.keys() == eager.keys(), name
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=f'{name}: {key}')


def test_resume_keeps_the_global_batch(tmp_path, folder):
    """A resumed run must update with the checkpoint's global batch (processes x batch x accumulation): a run restarted
    on half the processes keeps it with twice the accumulation, and then ends as the uninterrupted run does; another
    global batch (the lr scaling, the schedule and the data position are counted in its updates) is refused."""
    class StoppedAfterFirstEpoch(Trainer):
        def train_one_epoch(self, epoch):
            if epoch == 1:
                raise KeyboardInterrupt
            return super().train_one_epoch(epoch)

    def trainer(cls, out, *extra, resume=False):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        # 3 updates an epoch: the checkpoint's update (3) is not a multiple of the resumed run's accumulation (2)
        return cls(load_config(None, _overrides(folder, out, 'train.epochs=2', 'train.max_steps_per_epoch=3', *extra)),
                   resume=resume)

    trainer(Trainer, tmp_path / 'straight').fit()
    with pytest.raises(KeyboardInterrupt):
        trainer(StoppedAfterFirstEpoch, tmp_path / 'resumed').fit()
    with pytest.raises(ConfigError, match=r'4 images per update; this run has 1 process\(es\) x data.batch_size=2 '
                                          r'x train.grad_accum_steps=1 = 2. Keep 4 \(e.g. train.grad_accum_steps=2\)'):
        trainer(Trainer, tmp_path / 'resumed', 'data.batch_size=2', resume=True)
    resumed = trainer(Trainer, tmp_path / 'resumed', 'data.batch_size=2', 'train.grad_accum_steps=2', resume=True)
    assert resumed.state.update == resumed.updates_per_epoch
    resumed.fit()
    a, b = (load_file(str(tmp_path / name / 'last.safetensors')) for name in ('resumed', 'straight'))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
