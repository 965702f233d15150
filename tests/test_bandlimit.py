"""Band-limiting: which modes the mask keeps, that the kept set is the same at every rate, that masked modes
learn nothing, and the kernel report (`s4nd_vision.eval.kernel_report`) that measures what it removes."""
import csv
import math
import re
import warnings

import pytest
import timm
import torch

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.eval.kernel_report import (
    format_report,
    format_summary,
    kernel_bandlimit,
    kernel_report,
    plot_layer_kernels,
    summarize,
)
from s4nd_vision.layers import S4ND, SSMKernel, set_bandlimit
from s4nd_vision.layers.reference import ssm_kernel_reference
from s4nd_vision.layers.ssm_kernel import _kept_modes, mode_masks, per_kernel, ssm_kernels


def _expected_mask(kernel: SSMKernel, bandlimit: float) -> torch.Tensor:
    """The kept modes computed one by one in Python floats: frequency dt |Im A| / 2pi below bandlimit / 2."""
    dts = [math.exp(v) for v in kernel.log_dt.tolist()]
    rows = [[dt * abs(a) / (2 * math.pi) < bandlimit / 2 for a in row] for dt, row in zip(dts, kernel.a_imag.tolist())]
    return torch.tensor(rows)


def _kept_only(kernel: SSMKernel, mask: torch.Tensor) -> SSMKernel:
    """The same parameters without band-limiting, C zeroed on the modes `mask` removes."""
    other = SSMKernel(kernel.dim, d_state=kernel.d_state, num_kernels=kernel.num_kernels).to(kernel.c.dtype)
    other.load_state_dict(kernel.state_dict(), strict=False)
    set_bandlimit(other, None)
    with torch.no_grad():
        other.c_pairs.mul_(mask[None, :, :, None].to(other.c.dtype))
    return other


def _boundary_kernel() -> SSMKernel:
    """S4D-Lin modes at dt = 1 (frequency n / 2 exactly) and modes a rounding step either side of 1/2."""
    kernel = SSMKernel(3, d_state=8, num_kernels=2, init='lin', bandlimit=1.0).double()
    with torch.no_grad():
        kernel.log_dt.zero_()  # dt = 1 exactly
        below, above = math.nextafter(math.pi, 0.0), math.nextafter(math.pi, 4.0)
        kernel.a_imag[1] = torch.tensor([0.0, below, math.pi, above], dtype=torch.float64)
        kernel.a_imag[2] = -kernel.a_imag[1]  # the sign of Im A does not matter
    return kernel


def test_mask_keeps_exactly_the_modes_below_the_cutoff_at_the_boundary():
    kernel = _boundary_kernel()
    mask = kernel.mode_mask()
    # S4D-Lin at dt = 1: frequency n / 2; n = 1 sits exactly on the cut-off 1/2 and is removed (at or above)
    assert mask[0].tolist() == [True, False, False, False]
    assert mask[1].tolist() == mask[2].tolist() == [True, True, False, False]  # just below kept, at / above not
    assert torch.equal(mask, _expected_mask(kernel, 1.0))
    set_bandlimit(kernel, 2.0)  # cut-off at 1 cycle per step: n = 0, 1 kept, n = 2 on the cut-off removed
    assert kernel.mode_mask()[0].tolist() == [True, True, False, False]


@pytest.mark.parametrize('init', ['lin', 'inv', 'legs'])
@pytest.mark.parametrize('bandlimit', [1.0, 0.5, 0.3])
def test_mask_matches_an_independent_computation(init, bandlimit):
    torch.manual_seed(0)
    kernel = SSMKernel(16, d_state=32, num_kernels=2, init=init, dt_min=0.01, dt_max=1.0, bandlimit=bandlimit)
    with torch.no_grad():  # trained-looking parameters: Im A moved off the init
        kernel.a_imag.mul_(1 + 0.1 * torch.randn_like(kernel.a_imag))
    expected = _expected_mask(kernel, bandlimit)
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(kernel.mode_mask(), expected)


def test_kernels_of_different_cutoffs_generated_together_keep_their_own_modes():
    """Kernels of different cut-offs (and one without) stacked in one generation call (`mode_masks`, one mask for
    the group): each keeps exactly the modes of its own cut-off, and its kernel equals the one made alone."""
    torch.manual_seed(0)
    kernels = [SSMKernel(4, d_state=16, num_kernels=2, init='lin', dt_min=0.01, dt_max=1.0, bandlimit=cut).double()
               for cut in (1.0, None, 0.3)]
    masks = mode_masks(kernels).split([k.dim for k in kernels])
    for kernel, mask, cut in zip(kernels, masks, (1.0, None, 0.3)):
        expected = _expected_mask(kernel, math.inf if cut is None else cut)
        assert cut is None or 0 < expected.sum() < expected.numel()
        assert torch.equal(mask, expected)
    together = ssm_kernels(kernels, [9, 9, 9], [1.0, 1.0, 1.0], torch.float64)
    for kernel, k in zip(kernels, together):
        torch.testing.assert_close(k, kernel(9, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_parameters_keep_the_modes_of_their_values(dtype):
    """`model.to(bfloat16)`: the mask is computed in float32 like the kernels, not in the parameters' dtype, whose
    rounding of dt |Im A| flipped the modes near the cut-off (a tenth of the kernel)."""
    torch.manual_seed(0)
    kernel = SSMKernel(256, d_state=64, num_kernels=2, init='inv', bandlimit=1.0).to(dtype)
    full = SSMKernel(256, d_state=64, num_kernels=2, init='inv', bandlimit=1.0).double()
    full.load_state_dict(kernel.state_dict())  # the same values, in float64
    assert torch.equal(kernel.mode_mask(), full.mode_mask())
    with torch.no_grad():
        expected = full(16, dtype=torch.float64)
        torch.testing.assert_close(kernel(16).double(), expected, atol=1e-5 * expected.abs().max(), rtol=0)


def test_kept_set_is_the_same_at_every_rate():
    torch.manual_seed(0)
    kernel = SSMKernel(6, d_state=16, num_kernels=2, init='lin', dt_min=0.05, dt_max=0.5, bandlimit=1.0).double()
    mask = kernel.mode_mask()
    kept_only = _kept_only(kernel, mask)
    lin_freq = kernel.log_dt.exp()[:, None] * kernel.a_imag.abs() / (2 * math.pi)
    # at rate 2 some kept modes are above the coarse grid's Nyquist frequency: the set is not recomputed per rate
    assert (mask & (2 * lin_freq >= 0.5)).any()
    for rate, length in ((1.0, 12), (0.5, 24), (2.0, 6)):
        assert torch.equal(kernel.mode_mask(), mask)
        torch.testing.assert_close(kernel(length, rate=rate, dtype=torch.float64),
                                   kept_only(length, rate=rate, dtype=torch.float64))
        # the recurrent view masks the same C
        torch.testing.assert_close(kernel.discretize(rate, dtype=torch.float64)[2],
                                   kept_only.discretize(rate, dtype=torch.float64)[2])
    # stacked with other kernels (one generation call), at per-kernel rates
    other = SSMKernel(6, d_state=16, num_kernels=2, init='inv', dt_min=0.05, dt_max=0.5).double()
    stacked = ssm_kernels([kernel, other], [10, 10], [2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(stacked[0], kept_only(10, rate=2.0, dtype=torch.float64))
    torch.testing.assert_close(stacked[1], other(10, rate=0.5, dtype=torch.float64))


def test_layer_kernels_at_other_input_sizes_use_the_kept_modes():
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=16, l_ref=16, dt_min=0.05, dt_max=0.5, bandlimit=0.5).double()
    plain = S4ND(4, ndim=2, d_state=16, l_ref=16).double()
    plain.load_state_dict(layer.state_dict())
    for src, dst in zip(layer.kernels, plain.kernels):
        dst.load_state_dict(_kept_only(src, src.mode_mask()).state_dict())
    for size in (16, 32, 8):  # rates 1, 1/2, 2
        for a, b in zip(layer.axis_kernels((size, size), dtype=torch.float64),
                        plain.axis_kernels((size, size), dtype=torch.float64)):
            torch.testing.assert_close(a, b)


def test_masked_modes_get_zero_gradient():
    torch.manual_seed(0)
    kernel = SSMKernel(8, d_state=16, num_kernels=2, init='legs', dt_min=0.05, dt_max=0.5, bandlimit=0.5).double()
    mask = kernel.mode_mask()
    assert 0 < mask.sum() < mask.numel()
    for rate in (1.0, 0.5):
        kernel.zero_grad()
        (kernel(12, rate=rate, dtype=torch.float64) * torch.randn(2, 8, 12, dtype=torch.float64)).sum().backward()
        for name in ('c', 'b', 'a_imag', 'log_a_real'):
            per_mode = getattr(kernel, name).grad.abs()  # -> (dim, N/2)
            if name == 'c':
                per_mode = per_kernel(per_mode, kernel.dim).sum(0)
            if name in ('c', 'b'):
                per_mode = per_mode.sum(-1)
            assert (per_mode[~mask] == 0).all(), name
            assert (per_mode[mask] > 0).all(), name
        assert (kernel.log_dt.grad != 0).all()


@pytest.mark.parametrize('rows, window', [
    ([[5, 1, 2, 5, 5, 5], [5, 5, 1, 2, 5, 5], [5, 1, 5, 5, 5, 5]], slice(1, 4)),  # kept: modes 1-3
    ([[5, 1, 5, 5, 2, 5], [5, 5, 5, 5, 5, 5], [5, 5, 2, 5, 5, 5]], slice(1, 5)),  # 1-4, masked ones inside
    ([[5] * 6] * 3, slice(0, 1)),  # nothing kept: a zero kernel
    ([[1, 5, 5, 5, 5, 2], [5] * 6, [5] * 6], None),  # the first and the last mode: all of them
])
def test_generation_runs_over_the_modes_some_channel_keeps(rows, window):
    """On the CPU, generation runs over the modes from the first to the last that any channel keeps
    (`ssm_kernel._kept_modes`): the kernels and the gradients of the kept modes equal those of generation over
    all modes with C zeroed on the masked ones, and every masked mode gets a zero gradient."""
    torch.manual_seed(0)
    kernel = SSMKernel(3, d_state=12, num_kernels=2, init='lin', bandlimit=1.0).double()
    with torch.no_grad():
        kernel.log_dt.zero_()  # dt = 1: mode n is kept where |Im A| < pi
        kernel.a_imag.copy_(torch.tensor(rows, dtype=torch.float64))
        kernel.b.add_(0.3 * torch.randn_like(kernel.b))
    mask = kernel.mode_mask()
    assert _kept_modes(mask.double()) == window
    other = _kept_only(kernel, mask)
    for rate in (1.0, 0.6):
        k, expected = (ssm_kernels([m], [10], [rate], torch.float64)[0] for m in (kernel, other))
        torch.testing.assert_close(k, expected, rtol=1e-12, atol=1e-14)
        weight = torch.randn_like(k)
        names = ('log_dt', 'log_a_real', 'a_imag', 'b', 'c')
        grads, expected_grads = (
            torch.autograd.grad((g * weight).sum(), [getattr(m, n) for n in names]) for m, g in
            ((kernel, k), (other, expected)))
        for name, got, want in zip(names, grads, expected_grads):
            if name == 'c':
                got, want = per_kernel(got, kernel.dim), per_kernel(want, kernel.dim)
                assert (got[:, ~mask] == 0).all()
                got, want = got[:, mask], want[:, mask]
            elif name != 'log_dt':
                assert (got[~mask] == 0).all(), name
                got, want = got[mask], want[mask]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize('name', ['log_a_real', 'a_imag', 'b', 'c'])
@pytest.mark.parametrize('bad', [math.nan, math.inf])
def test_a_non_finite_parameter_of_a_mode_left_out_is_not_hidden(name, bad):
    """A NaN or infinity in a parameter of a mode that band-limiting masks in every channel, which CPU generation
    leaves out (`_kept_modes`), makes that channel's kernel NaN, as generation over all modes does (the reference
    formulation, and CUDA: 0 * NaN), so a broken model is not silently finite on the CPU only. The other channels
    keep their kernels."""
    torch.manual_seed(0)
    kernel = SSMKernel(3, d_state=12, num_kernels=2, init='lin', bandlimit=1.0)
    with torch.no_grad():
        kernel.log_dt.zero_()  # dt = 1: S4D-Lin's mode n (Im A = pi n) is kept for n = 0 only
    clean = kernel(10)
    with torch.no_grad():
        values = kernel.c_pairs[1] if name == 'c' else getattr(kernel, name)  # (channel 1 of the second kernel)
        values[1, 3] = bad
    mask = kernel.mode_mask()
    assert not mask[:, 3].any() and _kept_modes(mask.float()) == slice(0, 1)
    reference = ssm_kernel_reference(kernel.log_dt, kernel.log_a_real, kernel.a_imag, kernel.b, kernel.c_pairs, 10,
                                     mask=mask.float())
    for k in (kernel(10), reference):
        assert (k[1, 1] if name == 'c' else k[:, 1]).isnan().all()  # (C: the second kernel's, at least)
        torch.testing.assert_close(k[:, [0, 2]], clean[:, [0, 2]].detach())


def test_large_finite_parameters_of_modes_left_out_do_not_poison_the_kernel():
    """The finiteness check over the modes left out must not overflow where every value is finite (B of 2e38 on
    several modes sums past float32's range): generation over all modes stays finite there."""
    torch.manual_seed(0)
    kernel = SSMKernel(3, d_state=12, init='lin', bandlimit=1.0)
    with torch.no_grad():
        kernel.log_dt.zero_()
        kernel.b[:, 2:5] = 2e38
    assert _kept_modes(kernel.mode_mask().float()) == slice(0, 1)
    assert kernel(10).isfinite().all()


def test_a_mode_left_out_with_log_a_real_minus_inf_keeps_the_kernel_finite():
    """log_a_real = -inf is bounded to LOG_A_REAL_MIN in every path (a finite mode): where band-limiting masks it
    in every channel, the CPU's finiteness check over the modes left out must not make that channel NaN (-inf * 0),
    as generation over all modes (the reference formulation, CUDA) gives it a finite kernel."""
    torch.manual_seed(0)
    kernel = SSMKernel(3, d_state=12, init='lin', bandlimit=1.0)
    with torch.no_grad():
        kernel.log_dt.zero_()
        kernel.log_a_real[1, 3] = -math.inf
    mask = kernel.mode_mask()
    assert not mask[:, 3].any() and _kept_modes(mask.float()) == slice(0, 1)
    reference = ssm_kernel_reference(kernel.log_dt, kernel.log_a_real, kernel.a_imag, kernel.b, kernel.c_pairs, 10,
                                     mask=mask.float())
    assert reference.isfinite().all()
    torch.testing.assert_close(kernel(10), reference)


def test_masked_modes_get_zero_gradient_in_a_model():
    """Through ConvNeXt-S4ND's stacked generation (all layers' kernels in a few calls)."""
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=32, num_classes=3, in_chans=1, bandlimit=1.0,
                              depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stem_chs=4, d_state=8)
    model(torch.randn(2, 1, 32, 32)).square().sum().backward()
    kernels = [m for m in model.modules() if isinstance(m, SSMKernel)]
    assert kernels
    for k in kernels:
        masked = ~k.mode_mask()
        assert masked.any()
        assert (per_kernel(k.c.grad, k.dim)[:, masked] == 0).all()
        assert (k.a_imag.grad[masked] == 0).all()
        assert (k.b.grad[masked] == 0).all() and (k.log_a_real.grad[masked] == 0).all()


def test_kernel_report_measures_the_mask():
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=64, num_classes=3, in_chans=1, bandlimit=0,
                              depths=(1, 1, 1, 1), dims=(8, 16, 8, 8), stem_chs=4, d_state=16)  # (blocks of 2 widths)
    rows = kernel_report(model, bandlimit=1.0, progress=False)
    # stem at 64, stage blocks at 16/8/4/2, downsampling at the previous stage's grid; two axes each
    assert [(r['kind'], r['grid']) for r in rows[::2]] == [
        ('stem', 64), ('block', 16), ('downsample', 16), ('block', 8), ('downsample', 8), ('block', 4),
        ('downsample', 4), ('block', 2)]
    by_kind = {}  # kind -> (modes masked, modes, energy kept) per layer and axis
    for r in rows:
        layer = model.get_submodule(r['layer'])
        kernel = layer.kernels[r['axis']]
        mask = _expected_mask(kernel, 1.0)
        assert r['masked'] == pytest.approx(1 - mask.double().mean().item())
        full = kernel(r['grid'], dtype=torch.float64)
        kept = _kept_only(kernel, mask)(r['grid'], dtype=torch.float64)
        assert r['energy_kept'] == pytest.approx((kept.square().sum() / full.square().sum()).item(), rel=1e-6)
        assert r['energy_kept'] > 0  # (can exceed 1: removed modes may have cancelled kept ones)
        per_channel = kept.square().sum(dim=(0, 2)) / full.square().sum(dim=(0, 2))
        assert r['energy_kept_median'] == pytest.approx(per_channel.median().item(), rel=1e-6)
        by_kind.setdefault(r['kind'], []).append((int((~mask).sum()), mask.numel(), r['energy_kept']))
    assert kernel_bandlimit(model.stem[1].kernels[0]) is None  # measured, not changed
    off = kernel_report(model, progress=False)  # the model's own cut-off: none
    assert all(r['masked'] == 0 and r['energy_kept'] == 1 and r['bandlimit'] is None for r in off)
    summary = summarize(rows)
    assert [s['kind'] for s in summary] == ['stem', 'downsample', 'block']
    assert summary[2]['grids'] == [16, 8, 4, 2]
    for s in summary:  # the fraction of all the kind's modes (layers of other widths), the mean and lowest energy
        masked, modes, energies = zip(*by_kind[s['kind']])
        assert s['masked'] == pytest.approx(sum(masked) / sum(modes))
        assert s['energy_kept'] == pytest.approx(sum(energies) / len(energies))
        assert s['energy_kept_min'] == min(energies)
    assert '| stem.1 | stem | 0 | 64 | 1 |' in format_report(rows) and '| block | 4 |' in format_summary(summary)


def test_kernel_report_of_s4_kernels():
    """S4 (DPLR) kernels band-limit too (the modes of A's diagonal part): the report measures them as S4D's, where
    it refused such models ('no S4ND layer with S4D kernels'); SGConv layers, without modes, are left out."""
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=32, num_classes=3, kernel='s4', bandlimit=0,
                              depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stem_chs=4, d_state=8)
    rows = kernel_report(model, bandlimit=1.0, progress=False)
    assert len(rows) == 16 and rows[0]['layer'] == 'stem.1'
    for r in rows:
        kernel = model.get_submodule(r['layer']).kernels[r['axis']]
        assert r['masked'] == pytest.approx(1 - _expected_mask(kernel, 1.0).double().mean().item())
        full = kernel(r['grid'], dtype=torch.float64)
        set_bandlimit(kernel, 1.0)
        kept = kernel(r['grid'], dtype=torch.float64)
        set_bandlimit(kernel, None)
        assert r['energy_kept'] == pytest.approx((kept.square().sum() / full.square().sum()).item(), rel=1e-6)
    assert any(r['masked'] > 0 for r in rows)
    sgconv = timm.create_model('convnext_sgconv_atto', img_size=32, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    with pytest.raises(ValueError, match='no S4ND layer with SSM kernels'):
        kernel_report(sgconv, progress=False)


def test_kernel_plot(tmp_path):
    from PIL import Image
    model = timm.create_model('convnext_s4nd_atto', img_size=64, num_classes=3, in_chans=1,
                              depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stem_chs=4, d_state=16)
    path = plot_layer_kernels(model, 'stages.3.downsample.1', str(tmp_path / 'k.png'), bandlimit=1.0,
                              channels=(0, 3))
    with Image.open(path) as img:
        assert img.format == 'PNG'
    with pytest.raises(ValueError, match='layer must name'):
        plot_layer_kernels(model, 'stages.9', str(tmp_path / 'x.png'))
    with pytest.raises(ValueError, match='channels must be'):
        plot_layer_kernels(model, 'stem.1', str(tmp_path / 'x.png'), channels=(99,))


def test_kernel_plot_puts_both_samplings_on_one_curve(tmp_path, monkeypatch):
    """A tap integrates the kernel over its cell (rate 1: tap l is the mean of rate-1/2 taps 2l and 2l + 1), so the
    plot draws it at the cell's centre, (l + 1/2) * rate: there the two samplings of a smooth (band-limited) kernel
    lie on one curve, where at the cells' starts they were a quarter step apart."""
    import numpy as np
    from matplotlib.axes import Axes
    lines = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, 'plot', lambda ax, x, y, **kw: lines.append((kw['label'], np.asarray(x),
                                                                          np.asarray(y))) or plot(ax, x, y, **kw))
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=64, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8),
                              stem_chs=4, d_state=16)
    plot_layer_kernels(model, 'stem.1', str(tmp_path / 'k.png'), bandlimit=1.0, channels=(0,))
    (_, x1, k1), (_, x05, k05) = lines[2:4]  # the masked panel: rate 1, then rate 1/2 (as a density)
    assert np.allclose(x1, np.arange(len(x1)) + 0.5) and np.allclose(x05, (np.arange(len(x05)) + 0.5) * 0.5)
    assert np.allclose(k1, (k05[0::2] + k05[1::2]) / 2)  # the cells' integrals
    gap = np.abs(np.interp(x1[2:40], x05, k05) - k1[2:40]).mean() / np.abs(k1).max()
    assert gap < 0.005, gap


def test_kernel_report_command(tmp_path, capsys):
    from s4nd_vision.cli import main
    main(['kernel-report', '--model-kwargs', 'depths=(1,1,1,1)', 'dims=(8,8,8,8)', 'stem_chs=4', 'd_state=16',
          '--img-size', '64', '--bandlimits', '1.0', '0.5', '--plot-layer', 'stages.1.downsample.1',
          '--out', str(tmp_path)])
    out = capsys.readouterr().out
    assert 'bandlimit 1.0:' in out and 'bandlimit 0.5:' in out and '| downsample | 3 | 16/8/4 |' in out
    with open(tmp_path / 'kernel_report.csv') as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + 2 * 2 * 8  # two cut-offs, 8 layers, 2 axes
    assert (tmp_path / 'kernels_stages.1.downsample.1.png').is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(['kernel-report', '--model-kwargs', 'depths=(1,1,1,1)', 'dims=(8,8,8,8)', '--img-size', '64',
              '--plot-layer', 'head', '--out', str(tmp_path)])
    assert exit_info.value.code == 2 and 'layer must name' in capsys.readouterr().err
    fresh = tmp_path / 'fresh'
    for bad in (['--axis', '2'], ['--channels', '0', '99']):  # found before the report: no CSV left behind
        with pytest.raises(SystemExit) as exit_info:
            main(['kernel-report', '--model-kwargs', 'depths=(1,1,1,1)', 'dims=(8,8,8,8)', '--img-size', '64',
                  *bad, '--out', str(fresh)])
        assert exit_info.value.code == 2 and '--plot-layer/--axis/--channels' in capsys.readouterr().err
        assert not fresh.exists()


def test_kernel_report_stopped_before_its_plot_leaves_no_earlier_plot(tmp_path, monkeypatch, capsys):
    """The CSV is written before the plot: a run stopped between them (Ctrl-C, a kill, a plotting error) leaves its
    CSV alone, not beside an earlier run's plot of that layer (of another model or checkpoint)."""
    from s4nd_vision.cli import main
    from s4nd_vision.eval import kernel_report as report
    args = ['kernel-report', '--model-kwargs', 'depths=(1,1,1,1)', 'dims=(8,8,8,8)', 'stem_chs=4', 'd_state=16',
            '--img-size', '64', '--out', str(tmp_path)]
    main(args)
    plot, = tmp_path.glob('kernels_*.png')

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, 'plot_layer_kernels', stopped)
    with pytest.raises(SystemExit) as exit_info:  # (Ctrl-C: the command's exit status 130)
        main(args)
    assert exit_info.value.code == 130
    assert (tmp_path / 'kernel_report.csv').is_file() and not plot.exists()


def test_kernel_report_command_takes_model_specs_and_off(tmp_path, capsys, monkeypatch):
    """--model NAME,key=value as the other commands take it, and --bandlimits off (nothing masked) beside a cut-off;
    the plot shows the cut-off's mask (not the first value's: off), and with off alone says nothing is masked."""
    from matplotlib.axes import Axes

    from s4nd_vision.cli import main
    titles = []
    set_title = Axes.set_title
    monkeypatch.setattr(Axes, 'set_title', lambda ax, text, **kw: titles.append(text) or set_title(ax, text, **kw))
    main(['kernel-report', '--model', 'convnext_s4nd_atto,depths=[1,1,1,1],dims=[8,8,8,8],stem_chs=4,d_state=16',
          '--img-size', '64', '--bandlimits', 'off', '1.0', '--out', str(tmp_path)])
    out = capsys.readouterr().out
    assert 'bandlimit off:' in out and 'bandlimit 1.0:' in out and '| stem.1 | stem | 0 | 64 | off | 0.0% |' in out
    with open(tmp_path / 'kernel_report.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 8  # two cut-offs, 8 layers (the spec's depths), 2 axes
    assert all(r['masked'] == '0.0' for r in rows if r['bandlimit'] == '')
    assert {r['bandlimit'] for r in rows} == {'', '1.0'}
    assert titles == ['stem.1 axis 0: no mask', 'stem.1 axis 0: masked, bandlimit 1']
    titles.clear()
    main(['kernel-report', '--model', 'convnext_s4nd_atto,depths=[1,1,1,1],dims=[8,8,8,8],stem_chs=4,d_state=16',
          '--img-size', '64', '--bandlimits', 'off', '--out', str(tmp_path / 'off')])
    assert titles == ['stem.1 axis 0: no mask', 'stem.1 axis 0: no band-limit: nothing masked']
    capsys.readouterr()
    # a None argument would be dropped by timm.create_model (the model's default band-limit, not off): refused
    for args in (['--model', 'convnext_s4nd_atto,bandlimit=null'], ['--model-kwargs', 'bandlimit=None']):
        with pytest.raises(SystemExit) as exit_info:
            main(['kernel-report', *args, '--out', str(tmp_path / 'none')])
        assert exit_info.value.code == 2 and 'timm.create_model drops null (None)' in capsys.readouterr().err


def test_kernel_report_refuses_a_model_argument_given_twice_differently(tmp_path, capsys):
    """A model argument set two ways to different values (NAME,key=value and --model-kwargs, or --img-size /
    --num-classes and --model-kwargs) is refused, naming it, instead of one silently winning (another model)."""
    from s4nd_vision.cli import main
    for args in (['--model', 'convnext_s4nd_atto,ssm_init=lin', '--model-kwargs', 'ssm_init=legs'],
                 ['--model-kwargs', 'img_size=32', '--img-size', '64'],
                 ['--model-kwargs', 'num_classes=3', '--num-classes', '5']):
        with pytest.raises(SystemExit) as exit_info:
            main(['kernel-report', *args, '--out', str(tmp_path / 'out')])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and ('ssm_init to different values' in err or 'disagree' in err), err
        assert not (tmp_path / 'out').exists()


def test_kernel_report_takes_one_img_size_however_spelt(tmp_path, capsys):
    """NAME,img_size=64 and --model-kwargs img_size=[64,64] (or (64,64)) name one size: taken, not refused as two
    different values; another size given the other way is still refused, naming the argument."""
    from s4nd_vision.cli import main
    model = 'convnext_s4nd_atto,depths=[1,1,1,1],dims=[8,8,8,8],stem_chs=4,d_state=8,img_size=64'
    for other in ('img_size=[64,64]', 'img_size=(64,64)'):
        main(['kernel-report', '--model', model, '--model-kwargs', other, '--out', str(tmp_path)])
        assert '| stem.1 | stem | 0 | 64 |' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(['kernel-report', '--model', model, '--model-kwargs', 'img_size=[32,32]', '--out', str(tmp_path / 'no')])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and 'img_size to different values' in err, err


def test_kernel_report_of_a_sequence_model(tmp_path, capsys):
    """A sequence model's reference length is its seq_len (--img-size is refused for it, not ignored)."""
    from s4nd_vision.cli import main
    main(['kernel-report', '--model', 's4nd_seq_atto', '--model-kwargs', 'seq_len=100', '--out', str(tmp_path)])
    with open(tmp_path / 'kernel_report.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r['grid'] for r in rows} == {'100'}  # 4 blocks, one axis each
    with pytest.raises(SystemExit) as exit_info:
        main(['kernel-report', '--model', 's4nd_seq_atto', '--img-size', '64', '--out', str(tmp_path)])
    assert exit_info.value.code == 2 and 'seq_len=N' in capsys.readouterr().err


def test_kernel_report_of_shared_weights_refuses_img_size_saying_why(tmp_path, capsys):
    """--img-size with 'local-dir:'/'hf-hub:' weights was refused as 'not one of our image models' (they may well
    be): the error now says they hold their training resolution, which the report measures without it."""
    from s4nd_vision.cli import main
    from s4nd_vision.deploy.hub import save_for_hf
    model = timm.create_model('convnext_s4nd_atto', depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stem_chs=4, d_state=8,
                              img_size=48)
    save_for_hf(model, str(tmp_path / 'shared'), safe_serialization=True)
    name = f'local-dir:{tmp_path / "shared"}'
    with pytest.raises(SystemExit) as exit_info:
        main(['kernel-report', '--model', name, '--img-size', '64', '--out', str(tmp_path / 'no')])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and 'is shared weights, which hold the resolution they were trained at' in err
    assert 'leave --img-size out' in err and 'not one of our image models' not in err, err
    main(['kernel-report', '--model', name, '--out', str(tmp_path / 'out')])
    assert '| stem.1 | stem | 0 | 48 |' in capsys.readouterr().out


def test_kernel_report_of_trained_weights(tmp_path):
    """--checkpoint: the report reads the weights' step sizes (here all dt = 1: S4D-Lin keeps only mode 0)."""
    from safetensors.torch import save_file

    from s4nd_vision.cli import main
    kwargs = dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stem_chs=4, d_state=16, ssm_init='lin')
    model = timm.create_model('convnext_s4nd_atto', img_size=64, num_classes=3, in_chans=1, **kwargs)
    with torch.no_grad():
        for k in model.modules():
            if isinstance(k, SSMKernel):
                k.log_dt.zero_()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / 'w.safetensors'))
    main(['kernel-report', '--checkpoint', str(tmp_path / 'w.safetensors'), '--num-classes', '3', '--in-chans', '1',
          '--img-size', '64', '--bandlimits', '1.0', '--out', str(tmp_path), '--model-kwargs',
          *[f'{k}={v}'.replace(' ', '') for k, v in kwargs.items()]])
    with open(tmp_path / 'kernel_report.csv') as f:
        masked = [float(r['masked']) for r in csv.DictReader(f)]
    assert len(masked) == 16 and all(m == pytest.approx(7 / 8) for m in masked)


def _cuts(model) -> list:
    return [k.bandlimit for k in model.modules() if isinstance(k, SSMKernel)]


def test_the_band_limit_is_saved_with_the_weights():
    """A model trained with one cut-off and loaded into one built with another keeps its function: the cut-off
    travels in the state dict (`<kernel>.bandlimit`, 0 for off)."""
    torch.manual_seed(0)
    kwargs = dict(img_size=64, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stem_chs=4, d_state=16)
    trained = timm.create_model('convnext_s4nd_atto', bandlimit=0.5, **kwargs).eval()
    state = trained.state_dict()
    record = state['stem.1.kernels.0.bandlimit']
    # not floating, so EMA and checkpoint averaging copy it instead of interpolating it; exact float64 bits
    assert record.dtype == torch.int64 and record.shape == () and record.view(torch.float64).item() == 0.5
    other = timm.create_model('convnext_s4nd_atto', bandlimit=0, **kwargs).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        other.load_state_dict(state)
        assert set(_cuts(other)) == {0.5}
        torch.testing.assert_close(other(x), trained(x), atol=0, rtol=0)
        set_bandlimit(trained, None)  # off is saved as 0 and loads as None
        off = trained.state_dict()
        assert off['stem.1.kernels.0.bandlimit'] == 0
        other.load_state_dict(off)
        assert set(_cuts(other)) == {None}
        torch.testing.assert_close(other(x), trained(x), atol=0, rtol=0)
    key = 'stages.0.blocks.0.conv_dw.kernels.1.bandlimit'
    for value in (torch.tensor([1.0, 2.0]), torch.tensor(0.5, dtype=torch.float64),
                  torch.tensor(-1.0, dtype=torch.float64).view(torch.int64)):
        with pytest.raises(RuntimeError, match=rf'{re.escape(key)}: expected the band-limit cut-off as float64 bits'):
            other.load_state_dict(dict(state, **{key: value}))
    # a file written before the cut-off was saved: the model's own is kept, with a warning that says so
    old = {k: v for k, v in state.items() if not k.endswith('.bandlimit')}
    fresh = timm.create_model('convnext_s4nd_atto', **kwargs)
    with pytest.warns(UserWarning, match=r"without a band-limit record.*own bandlimit=1\.0 is kept"):
        fresh.load_state_dict(old)
    assert set(_cuts(fresh)) == {1.0}
    # a model built without band-limit says so as models take it (0), not as None (which means the default, 1.0)
    unlimited = timm.create_model('convnext_s4nd_atto', **dict(kwargs, bandlimit=0))
    with pytest.warns(UserWarning, match=r"own bandlimit=0 \(off\) is kept"):
        unlimited.load_state_dict(old)
    assert set(_cuts(unlimited)) == {None}
    # a file of another model (a plain timm ConvNeXt, no kernel weights at all): its missing-keys error, no warnings
    plain = timm.create_model('convnext_atto', depths=(1, 1, 1, 1), dims=(8, 8, 8, 8)).state_dict()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match='Missing key'):
        warnings.simplefilter('always')
        fresh.load_state_dict(plain)
    assert not [w for w in caught if 'band-limit record' in str(w.message)]


def test_weights_averaged_in_floating_point_load_with_their_records():
    """timm's avg_checkpoints.py averages every entry of the state dicts in float64 and writes float32, the int64
    records too (reference grids, band-limits, SGConv decays): such a file loads with its function, not with an
    error per record."""
    torch.manual_seed(0)
    kwargs = dict(img_size=32, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stem_chs=4, d_state=16)
    x = torch.randn(2, 3, 48, 40)
    for extra in (dict(bandlimit=0.3), dict(kernel='sgconv')):
        trained = timm.create_model('convnext_s4nd_atto', **kwargs, **extra).eval()
        averaged = {k: v.to(torch.float64).to(torch.float32) for k, v in trained.state_dict().items()}
        same = timm.create_model('convnext_s4nd_atto', **kwargs, **extra).eval()
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            same.load_state_dict(averaged)
        with torch.no_grad():
            torch.testing.assert_close(same(x), trained(x), atol=0, rtol=0)
    # a model built for another size and cut-off takes the file's grid, and its cut-off to float32's precision
    trained = timm.create_model('convnext_s4nd_atto', bandlimit=0.3, **kwargs)
    averaged = {k: v.to(torch.float64).to(torch.float32) for k, v in trained.state_dict().items()}
    other = timm.create_model('convnext_s4nd_atto', **dict(kwargs, img_size=64, bandlimit=0.5))
    with pytest.warns(UserWarning, match=r'bandlimit records.* converted to torch\.float32 .*read as 0\.3000'):
        other.load_state_dict(averaged)
    assert all(math.isclose(cut, 0.3, rel_tol=1e-3) for cut in _cuts(other))
    assert {m.l_ref for m in other.modules() if isinstance(m, S4ND)} == {tuple(m.l_ref) for m in trained.modules()
                                                                          if isinstance(m, S4ND)}


def test_inflation_carries_the_2d_band_limit():
    """2D -> 3D: the H and W kernels keep the cut-off they were trained with, the new time kernel the 3D
    model's; a 2D file without cut-offs inflates with the 3D model's own."""
    from s4nd_vision.models.inflate import inflate_state_dict
    torch.manual_seed(0)
    kwargs = dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stem_chs=4, d_state=16)
    source = timm.create_model('convnext_s4nd_atto', img_size=64, bandlimit=0, **kwargs)
    target = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=4, **kwargs)  # default 1.0
    target.load_state_dict(inflate_state_dict(source.state_dict(), target), strict=False)
    layer = target.stages[1].blocks[0].conv_dw
    assert [k.bandlimit for k in layer.kernels] == [1.0, None, None]
    old = {k: v for k, v in source.state_dict().items() if not k.endswith('.bandlimit')}
    target = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=4, **kwargs)
    target.load_state_dict(inflate_state_dict(old, target), strict=False)
    assert set(_cuts(target)) == {1.0}
    # a record cast to a floating dtype with the rest of a file (as timm's checkpoint averaging does) is read by its
    # bits, not converted by value into another cut-off: the 2D file's (off) for H and W (a record that cannot be
    # bits, e.g. the cut-off's value as a float, is refused: `test_the_band_limit_is_saved_with_the_weights`)
    # (0, off, converts exactly: no warning that its bits were rounded, nor to rebuild the model to load it exactly)
    for dtype in (torch.float64, torch.float32):
        cast = {k: v.to(dtype) if k.endswith('.bandlimit') else v for k, v in source.state_dict().items()}
        target = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=4, **kwargs)  # default 1.0
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            target.load_state_dict(inflate_state_dict(cast, target), strict=False)
        assert [k.bandlimit for k in target.stages[1].blocks[0].conv_dw.kernels] == [1.0, None, None]


def test_zero_and_none_are_off_everywhere():
    """0 and None both mean no band-limit for the layers, `set_bandlimit` (progressive stages) and the isotropic and
    ViT models (0 is how to say it through `timm.create_model`, which drops None)."""
    assert SSMKernel(4, bandlimit=0).bandlimit is None
    assert S4ND(4, kernel='s4', bandlimit=0).kernels[0].bandlimit is None
    model = timm.create_model('s4nd_iso_tiny', img_size=16, depth=1, dim=8, d_state=8, bandlimit=0)
    assert set(_cuts(model)) == {None}
    model = timm.create_model('vit_s4nd_atto_patch16_224', img_size=32, depth=1, bandlimit=0.5)
    assert set(_cuts(model)) == {0.5}
    assert set_bandlimit(model, 0) > 0 and set(_cuts(model)) == {None}
    for bad in (-0.5, float('nan')):
        with pytest.raises(ValueError, match='bandlimit must be a positive cut-off, or 0 or None for off'):
            SSMKernel(4, bandlimit=bad)
        with pytest.raises(ValueError, match='bandlimit must be a positive cut-off, or 0 or None for off'):
            set_bandlimit(model, bad)
