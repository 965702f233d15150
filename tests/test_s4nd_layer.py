"""The S4ND layer against direct references: SSM recurrence, direct convolution, ZOH consistency."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from s4nd_vision.layers import S4ND, SSMKernel, ops, ssm_init_imag


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Move parameters away from their structured init so the tests see generic values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(('log_dt', 'log_a_real')):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _recurrence_kernel(kernel: SSMKernel, length: int, rate: float = 1.0) -> torch.Tensor:
    """Impulse response of the discretized SSM run step by step (no Vandermonde): (K, H, L)."""
    dt = kernel.log_dt.detach().double().exp() * rate
    a = torch.complex(-kernel.log_a_real.detach().double().exp(), kernel.a_imag.detach().double())
    b = torch.view_as_complex(kernel.b.detach().double().contiguous())
    c = torch.view_as_complex(kernel.c.detach().double().contiguous()) * kernel.mode_mask()
    d_a = torch.exp(dt[:, None] * a)
    d_b = (d_a - 1) / a * b
    state = d_b.clone()  # state after the unit impulse at step 0
    out = []
    for _ in range(length):
        out.append(2 * (c * state).sum(-1).real)
        state = d_a * state
    return torch.stack(out, dim=-1)


def _direct_reference(layer: S4ND, x: torch.Tensor, rate=None) -> torch.Tensor:
    """Direct (non-FFT) float64 convolution with the explicitly assembled N-D kernel, plus D x."""
    sizes = x.shape[2:]
    rates = layer.resolve_rate(sizes, rate)
    lengths = layer.kernel_lengths(sizes, rates)
    full = []  # per axis: (channels, H, 2n - 1) over offsets -(n-1)..(n-1), assembled tap by tap
    for kernel, bi, n, length, r in zip(layer.kernels, layer.bidirectional, sizes, lengths, rates):
        k = kernel(length, rate=r, dtype=torch.float64)
        taps = torch.zeros(layer.channels, layer.dim, 2 * n - 1, dtype=torch.float64)
        for offset in range(-(n - 1), n):
            if 0 <= offset < length:
                taps[..., offset + n - 1] = k[: layer.channels, :, offset]
            elif offset < 0 and bi and -offset - 1 < length:
                taps[..., offset + n - 1] = k[layer.channels:, :, -offset - 1]
        full.append(taps)
    kernel_nd = 0
    for term in range(layer.channels):  # sum of rank-1 (outer product) terms
        outer = full[0][term]
        for taps in full[1:]:
            outer = outer[..., None] * taps[term].reshape((taps.shape[1],) + (1,) * (outer.ndim - 1) + (-1,))
        kernel_nd = kernel_nd + outer
    conv = (F.conv1d, F.conv2d, F.conv3d)[layer.ndim - 1]
    # y[i] = sum_j K[i - j] x[j] is a cross-correlation with the flipped kernel
    weight = kernel_nd.flip(list(range(1, layer.ndim + 1)))[:, None]
    y = conv(x.double(), weight, padding=[n - 1 for n in sizes], groups=layer.dim)
    y = y + layer.D.detach().double().reshape((-1,) + (1,) * layer.ndim) * x.double()
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[layer.ndim - 1]
    return pool(y, kernel_size=layer.pool)


@pytest.mark.parametrize('init', ['lin', 'inv', 'legs'])
def test_kernel_matches_ssm_recurrence(init):
    torch.manual_seed(0)
    kernel = SSMKernel(3, d_state=8, num_kernels=2, init=init, dt_min=0.05, dt_max=0.5).double()
    _randomize(kernel)
    for rate in (1.0, 0.5, 2.0):
        torch.testing.assert_close(kernel(11, rate=rate, dtype=torch.float64), _recurrence_kernel(kernel, 11, rate))


def test_inits():
    assert torch.allclose(ssm_init_imag('lin', 8), math.pi * torch.arange(4, dtype=torch.float64))
    assert torch.allclose(ssm_init_imag('inv', 8), 8 / math.pi * (8 / (2 * torch.arange(4.) + 1) - 1).double())
    legs = ssm_init_imag('legs', 64)
    assert legs.shape == (32,) and bool((legs > 0).all()) and bool((legs.diff() > 0).all())
    # HiPPO-LegS normal part: Re(eig) = -1/2 for every eigenvalue
    kernel = SSMKernel(2, d_state=64, init='legs')
    assert torch.allclose(-kernel.log_a_real.exp(), torch.full((2, 32), -0.5))
    with pytest.raises(ValueError, match='init'):
        SSMKernel(2, init='hippo')


CASES = [
    # ndim, sizes, l_ref, l_max, bidirectional, channels, pool
    (1, (9,), None, None, True, 1, 1),
    (1, (12,), 6, 4, False, 2, 1),
    (1, (11,), 11, None, True, 1, 3),
    (2, (7, 10), (7, 10), None, True, 1, 1),
    (2, (9, 6), (4, 4), (3, 5), (True, False), 2, 1),
    (2, (9, 8), (9, 8), None, True, 1, (4, 2)),
    (3, (3, 5, 4), None, (2, 9, 3), (False, True, True), 1, 1),
    (3, (4, 5, 6), (4, 5, 6), None, True, 2, 2),
]


@pytest.mark.parametrize('algorithm', ['toeplitz', 'fft'])
@pytest.mark.parametrize('ndim,sizes,l_ref,l_max,bidirectional,channels,pool', CASES)
def test_layer_equals_direct_convolution(monkeypatch, algorithm, ndim, sizes, l_ref, l_max, bidirectional, channels, pool):
    monkeypatch.setattr(ops, 'FORCE_ALGORITHM', algorithm)
    torch.manual_seed(0)
    layer = S4ND(3, ndim=ndim, d_state=8, channels=channels, bidirectional=bidirectional,
                 l_ref=l_ref, l_max=l_max, pool=pool, dt_min=0.05, dt_max=0.5).double()
    _randomize(layer)
    x = torch.randn(2, 3, *sizes, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _direct_reference(layer, x))
    torch.testing.assert_close(layer(x, rate=1.7), _direct_reference(layer, x, rate=1.7))


@pytest.mark.parametrize('algorithm', ['toeplitz', 'fft'])
def test_no_circular_wraparound(monkeypatch, algorithm):
    """A causal kernel cannot move an impulse at the end of an axis back to its start."""
    monkeypatch.setattr(ops, 'FORCE_ALGORITHM', algorithm)
    layer = S4ND(2, ndim=1, d_state=4, bidirectional=False, dt_min=0.01, dt_max=0.02).double()
    x = torch.zeros(1, 2, 16, dtype=torch.float64)
    x[..., -1] = 1.0
    y = layer(x)
    assert y[..., :-1].abs().max() < 1e-12  # FFT round-off only
    # and the kernel really is long: an impulse at the start reaches the end
    assert layer(x.flip(-1))[..., -1].abs().min() > 1e-3


def test_rate_two_kernel_is_box_sum_of_rate_one():
    torch.manual_seed(0)
    kernel = SSMKernel(4, d_state=16, num_kernels=2, dt_min=0.02, dt_max=0.3, bandlimit=0.8).double()
    _randomize(kernel)
    k1 = kernel(20, rate=1.0, dtype=torch.float64)
    k2 = kernel(10, rate=2.0, dtype=torch.float64)
    torch.testing.assert_close(k2, k1[..., 0::2] + k1[..., 1::2])


def _smooth_image(n: int, channels: int) -> torch.Tensor:
    """A smooth function on the unit square, averaged over the cells of an n x n grid."""
    s = 8
    t = (torch.arange(n * s, dtype=torch.float64) + 0.5) / (n * s)
    f = torch.sin(2 * math.pi * t)[:, None] * torch.cos(3 * t)[None, :] + t[:, None] ** 2
    return F.avg_pool2d(f[None, None], s).expand(1, channels, n, n).clone()


def test_smooth_image_at_double_resolution_matches():
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=16, l_ref=16, dt_min=0.05, dt_max=0.5, bandlimit=0.5).double()
    with torch.no_grad():
        layer.D.zero_()  # the skip term passes each grid's own samples; compare the convolution
    with torch.no_grad():
        y1 = layer(_smooth_image(16, 4))
        y2 = layer(_smooth_image(32, 4))  # automatic rate 16 / 32
        y2_fixed = layer(_smooth_image(32, 4), rate=1.0)
    # ZOH output i is the continuous output at the right edge of cell i: fine cell 2i + 1
    rel = lambda a: ((a[..., 1::2, 1::2] - y1).norm() / y1.norm()).item()
    assert rel(y2) < 0.03
    assert rel(y2_fixed) > 10 * rel(y2)  # without the rate the kernel is twice as short: not a match


def test_bandlimit_masks_exactly_the_modes_above_cutoff():
    torch.manual_seed(0)
    kernel = SSMKernel(3, d_state=16, num_kernels=2, init='lin', dt_min=0.05, dt_max=0.4, bandlimit=0.3).double()
    freq = kernel.log_dt.exp()[:, None] * kernel.a_imag.abs() / (2 * math.pi)
    expected = freq < 0.15
    assert 0 < expected.sum() < expected.numel()  # some kept, some removed
    assert torch.equal(kernel.mode_mask(), expected)
    manual = SSMKernel(3, d_state=16, num_kernels=2, init='lin').double()
    manual.load_state_dict(kernel.state_dict())
    with torch.no_grad():
        manual.c.mul_(expected[None, ..., None])
    for rate in (1.0, 0.5):
        torch.testing.assert_close(kernel(12, rate=rate, dtype=torch.float64),
                                   manual(12, rate=rate, dtype=torch.float64))
    # and the masking did something: the same parameters without band-limiting give another kernel
    assert not torch.allclose(kernel(12, dtype=torch.float64), _unmasked(kernel)(12, dtype=torch.float64))


def _unmasked(kernel: SSMKernel) -> SSMKernel:
    """The same parameters without band-limiting."""
    other = SSMKernel(kernel.dim, d_state=kernel.d_state, num_kernels=kernel.num_kernels).double()
    other.load_state_dict(kernel.state_dict())
    return other


@pytest.mark.parametrize('algorithm', ['toeplitz', 'fft'])
def test_gradcheck(monkeypatch, algorithm):
    monkeypatch.setattr(ops, 'FORCE_ALGORITHM', algorithm)
    torch.manual_seed(0)
    layer = S4ND(2, ndim=2, d_state=4, channels=2, bidirectional=(True, False), l_ref=(3, 4),
                 pool=(1, 2), dt_min=0.1, dt_max=0.5, bandlimit=2.0).double()
    names, params = zip(*layer.named_parameters())
    x = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)

    def fn(x, *p):
        return torch.func.functional_call(layer, dict(zip(names, p)), (x,))

    assert torch.autograd.gradcheck(fn, (x,) + tuple(p.detach().requires_grad_() for p in params))


def test_bf16_autocast_close_to_float32():
    torch.manual_seed(0)
    layer = S4ND(8, ndim=2, l_ref=12)
    x = torch.randn(2, 8, 12, 12)
    ref = layer(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    assert ((y.float() - ref).norm() / ref.norm()) < 2e-2


def test_bad_input_errors():
    layer = S4ND(4, ndim=2, l_ref=8)
    with pytest.raises(ValueError, match='spatial dims'):
        layer(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match='4 input channels'):
        layer(torch.randn(1, 3, 8, 8))
    for bad in (0.0, -1.0, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='rate'):
            layer(torch.randn(1, 4, 8, 8), rate=bad)
    with pytest.raises(ValueError, match='rate needs one value per spatial axis'):
        layer(torch.randn(1, 4, 8, 8), rate=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match='empty spatial axis'):
        layer(torch.randn(1, 4, 0, 8))
    with pytest.raises(ValueError, match='at least pool'):
        S4ND(4, ndim=2, pool=4)(torch.randn(1, 4, 8, 3))
    with pytest.raises(ValueError, match='pool'):
        S4ND(4, ndim=2, pool=0)
    with pytest.raises(ValueError, match='ndim'):
        S4ND(4, ndim=4)
    with pytest.raises(ValueError, match='l_ref'):
        S4ND(4, ndim=2, l_ref=(8, 0))
    with pytest.raises(ValueError, match='d_state'):
        S4ND(4, d_state=7)


def test_kernel_cache_in_inference_is_invalidated_by_every_change():
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=8, l_ref=8).eval()
    x8, x12 = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 12, 12)

    def check(x, **kw):
        """Cached output (after a call that filled the cache) equals a cache-free copy's output."""
        with torch.enable_grad():
            expected = copy.deepcopy(layer)(x, **kw).detach()
        torch.testing.assert_close(layer(x, **kw), expected)

    with torch.no_grad():
        check(x8)
        first = layer._kernel_cache[1]
        layer(x8)
        assert layer._kernel_cache[1] is first  # reused while nothing changed
        check(x12)  # new resolution
        check(x12, rate=2.0)  # explicit rate
        layer.kernels[0].log_dt.add_(0.5)  # in-place parameter update (optimizer step)
        check(x12)
        layer.load_state_dict({k: v + 0.1 for k, v in layer.state_dict().items()})
        check(x12)
        layer.kernels[1].bandlimit = 0.5
        check(x12)
        layer.double()
        check(x12.double())
    # with autograd on, kernels are rebuilt every call (and carry gradients)
    layer(x12.double()).sum().backward()
    assert layer._kernel_cache is None and layer.kernels[0].c.grad is not None


def test_algorithm_rule():
    # 2D images: every axis matrix is shared by (batch x other axis) rows -> Toeplitz up to 256
    assert ops.choose_algorithm(56, 8 * 56) == 'toeplitz'
    assert ops.choose_algorithm(7, 8 * 7) == 'toeplitz'
    assert ops.choose_algorithm(300, 8 * 300) == 'fft'
    # a 1D raster sequence with a small batch: building the n x n matrix would dominate
    assert ops.choose_algorithm(196, 8) == 'fft'
