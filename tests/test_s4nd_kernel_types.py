"""The S4ND layer with its other per-axis kernels ('s4', 'sgconv'): direct N-D convolution reference, inference
cache, stacked generation and resolution, as test_s4nd_layer.py checks for 's4d'."""
import copy
import math
import os

import pytest
import torch
from test_s4nd_layer import CASES, _direct_reference, _randomize, _smooth_image

from s4nd_vision.layers import S4ND, S4Kernel, SGConvKernel, SSMKernel, ops, prepare_kernels, set_bandlimit
from s4nd_vision.layers.ssm_kernel import ssm_kernels


def _layer(kernel: str, dim: int, ndim: int, sizes, l_ref=None, **kw) -> S4ND:
    if kernel == 'sgconv':
        kw.setdefault('sgconv_size', 2)  # several dyadic ranges at these small sizes
        if l_ref is None and kw.get('l_max') is None:
            l_ref = tuple(sizes)
    else:
        kw = dict(dict(d_state=8, dt_min=0.05, dt_max=0.5), **kw)
    return S4ND(dim, ndim=ndim, kernel=kernel, l_ref=l_ref, **kw)


@pytest.mark.parametrize('algorithm', ['toeplitz', 'fft'])
@pytest.mark.parametrize('kernel', ['s4', 'sgconv'])
@pytest.mark.parametrize('ndim,sizes,l_ref,l_max,bidirectional,rank,pool', CASES)
def test_layer_equals_direct_convolution(kernel, algorithm, ndim, sizes, l_ref, l_max, bidirectional,
                                         rank, pool):
    """Outer product of the per-axis kernels, the same separable convolution, pooling and skip as 's4d'."""
    with ops.conv_algorithm(algorithm):
        torch.manual_seed(0)
        layer = _layer(kernel, 3, ndim, sizes, l_ref=l_ref, l_max=l_max, rank=rank, bidirectional=bidirectional,
                       pool=pool).double()
        _randomize(layer)
        assert all(type(k) is {'s4': S4Kernel, 'sgconv': SGConvKernel}[kernel] for k in layer.kernels)
        x = torch.randn(2, 3, *sizes, dtype=torch.float64)
        torch.testing.assert_close(layer(x), _direct_reference(layer, x))
        torch.testing.assert_close(layer(x, rate=1.7), _direct_reference(layer, x, rate=1.7))


@pytest.mark.parametrize('kernel', ['s4', 'sgconv'])
def test_inference_cache_equals_training_path(kernel):
    """Without autograd the layer caches its convolution operators; they give the training path's output and are
    rebuilt after parameter (and, for SGConv, norm buffer) changes."""
    torch.manual_seed(0)
    layer = _layer(kernel, 4, 2, (8, 8), l_ref=8, pool=(1, 2)).eval()
    x8, x12 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 12, 12)

    def check(x):
        expected = layer(x)  # autograd on: kernels generated, no cache
        assert layer._kernel_cache is None
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected.detach())
            assert layer._kernel_cache is not None

    check(x8)
    check(x12)
    with torch.no_grad():
        cached = layer(x12)
        layer.load_state_dict({k: v * 1.5 if v.is_floating_point() else v for k, v in layer.state_dict().items()})
        changed = layer(x12)
    assert not torch.allclose(cached, changed)
    torch.testing.assert_close(changed, copy.deepcopy(layer)(x12).detach())
    if kernel == 'sgconv':  # a hyper-parameter of the kernels, not a tensor: part of the cache's key
        with torch.no_grad():
            for k in layer.kernels:
                k.decay = 0.9
            decayed = layer(x12)
        assert not torch.allclose(decayed, changed)
        torch.testing.assert_close(decayed, copy.deepcopy(layer)(x12).detach())


def test_stacked_generation_with_mixed_kernel_types():
    """`prepare_kernels` over layers of all three kernel types and both directions gives each layer the kernels it
    makes itself: same outputs and gradients as layer-by-layer generation."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        [_layer(k, 3, 2, (6, 5), l_ref=(6, 5)) for k in ('s4d', 's4', 'sgconv')]
        + [_layer('s4d', 3, 2, (6, 5), l_ref=(3, 5), rank=2)]
        # (a causal rank-2 layer stacks with the first's bidirectional rank-1 kernels: both have 2 per channel)
        + [_layer('s4d', 3, 2, (6, 5), l_ref=(6, 5), rank=2, bidirectional=False)])
    x = torch.randn(2, 3, 6, 5)
    results = []
    for stacked in (True, False):
        layers.zero_grad()
        if stacked:
            prepare_kernels([(layer, (6, 5)) for layer in layers])
            assert all(layer._prepared is not None for layer in layers)
        out = torch.stack([layer(x) for layer in layers])
        assert all(layer._prepared is None for layer in layers)  # used once
        out.square().sum().backward()
        results.append([out] + [p.grad.clone() for p in layers.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('kernel', ['s4', 'sgconv'])
def test_smooth_image_at_double_resolution_matches(kernel):
    """A layer referenced to 16x16 sees a smooth image at 32x32 through the same continuous kernel (the rate
    follows the input); without the rate it does not."""
    torch.manual_seed(0)
    # (S4 has no band-limiting: modes far above either grid's Nyquist frequency alias differently on each, so the
    # state is small and the steps short here; HiPPO-LegS's top frequency grows ~ N^2)
    kw = dict(sgconv_size=4) if kernel == 'sgconv' else dict(d_state=8, dt_min=0.01, dt_max=0.1)
    layer = S4ND(4, ndim=2, kernel=kernel, l_ref=16, **kw).double()
    with torch.no_grad():
        layer.D.zero_()
        y1 = layer(_smooth_image(16, 4))
        y2 = layer(_smooth_image(32, 4))  # automatic rate 16 / 32
        y2_fixed = layer(_smooth_image(32, 4), rate=1.0)
    # output i is the continuous output at the right edge of cell i: fine cell 2i + 1
    def rel(a):
        return ((a[..., 1::2, 1::2] - y1).norm() / y1.norm()).item()

    assert rel(y2) < 0.06
    assert rel(y2_fixed) > 5 * rel(y2)


def test_sgconv_kernel_first_made_under_inference_mode_trains():
    """SGConv's matrix for a (length, rate) is cached: made first under inference_mode, it must not be an inference
    tensor that a later training step at that length saves for backward (float64 reuses it without a copy)."""
    layer = S4ND(4, ndim=1, kernel='sgconv', l_ref=37).double()
    x = torch.randn(2, 4, 37, dtype=torch.float64)
    with torch.inference_mode():
        expected = layer(x)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), expected)
    assert layer.kernels[0].weight.grad is not None


def test_kernel_type_errors():
    with pytest.raises(ValueError, match='kernel must be one of'):
        S4ND(4, kernel='s5')
    with pytest.raises(ValueError, match=r"bandlimit applies to the SSM kernels \('s4d', 's4'\), got kernel='sgconv'"):
        S4ND(4, kernel='sgconv', l_ref=8, bandlimit=0.5)
    with pytest.raises(ValueError, match='init applies'):
        S4ND(4, kernel='sgconv', l_ref=8, init='lin')
    with pytest.raises(ValueError, match='needs l_ref or l_max'):
        S4ND(4, kernel='sgconv')
    with pytest.raises(ValueError, match=r"init must be one of \('legs',\) for kernel='s4'"):
        S4ND(4, kernel='s4', init='lin')
    assert isinstance(S4ND(4, init='legs').kernels[0], SSMKernel)
    assert S4ND(4, kernel='sgconv', l_ref=(40, 9), l_max=(16, 30)).kernels[0].l_ref == 16  # min(l_ref, l_max)
    with pytest.raises(ValueError, match='band-limiting applies to the SSM kernels'):
        set_bandlimit(torch.nn.Sequential(S4ND(4, kernel='sgconv', l_ref=8)), 0.5)
    assert set_bandlimit(torch.nn.Sequential(S4ND(4, kernel='s4')), 0.5) == 2  # (one kernel per axis)
    # every kernel's arguments are checked whichever kernel is built
    with pytest.raises(ValueError, match='need finite 0 < dt_min <= dt_max'):
        S4ND(4, kernel='sgconv', l_ref=8, dt_min=-1)
    for bad in (5, True):  # (True passed as 1)
        with pytest.raises(ValueError, match='sgconv_decay must be in'):
            S4ND(4, sgconv_decay=bad)


@pytest.mark.parametrize('rate', [1.0, 0.1])
def test_s4_float32_kernel_keeps_its_accuracy_at_a_small_step(rate):
    """At dt * rate ~ 1e-5 the bilinear A~ = I + O(dt A) rounded to float32 lost the truncation term's accuracy,
    which the power A~^L amplifies (3e-4 to 1e-2 of the largest tap): A~ and its power are kept as their differences
    from I (`s4_kernel._power_minus_identity`)."""
    torch.manual_seed(0)
    kernel = S4Kernel(4, d_state=16, num_kernels=2, dt_min=1e-5, dt_max=1e-5)
    with torch.no_grad():
        got, want = kernel(64, rate=rate), kernel(64, rate=rate, dtype=torch.float64)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()


def test_s4_float32_kernel_keeps_its_accuracy_at_long_lengths():
    """At 16k taps 1 - z rounded to float32 lost its real part 1 - cos(2 pi m / L), as large as the dt term at small
    dt (1e-4 of the largest tap, 5e-4 of a channel's own): it is formed from the half angle."""
    torch.manual_seed(0)
    kernel = S4Kernel(4, d_state=32, dt_min=1e-7, dt_max=1e-5)
    with torch.no_grad():
        got, want = kernel(16384).double(), kernel(16384, dtype=torch.float64)
    assert ((got - want).abs().amax(-1) / want.abs().amax(-1)).max() < 2e-5



@pytest.mark.parametrize('dt', [1e-5, 1e-4])
def test_s4_float32_gradients_keep_their_accuracy_at_a_small_step(dt):
    """The kernel's zero frequency, its sum, came from the Cauchy form as C^T (I - A~^L) (I - A~)^-1 B~: factors
    O(L dt A) and O(1 / (dt A)) whose gradients with respect to A cancel to the much smaller dependence of the sum on
    A, so float32 lost A's gradients at small L dt (32 taps, d_state 16: 4e-3 to 2e-2 of the largest at dt 1e-5, 2e-4
    at 1e-4; now under 1e-6). It is the dense sum C^T (I + A~ + ... + A~^(L-1)) B~ from the repeated squaring."""
    torch.manual_seed(0)
    k32 = S4Kernel(4, d_state=16, num_kernels=2, dt_min=dt, dt_max=dt)
    k64 = copy.deepcopy(k32).double()
    weight = torch.randn(2, 4, 32, dtype=torch.float64)
    for kernel, dtype in ((k32, torch.float32), (k64, torch.float64)):
        (kernel(32, dtype=dtype) * weight.to(dtype)).sum().backward()
    for name in ('log_dt', 'log_a_real', 'a_imag', 'p', 'b', 'c'):
        got, want = getattr(k32, name).grad.double(), getattr(k64, name).grad
        assert (got - want).abs().max() < 1e-5 * want.abs().max(), name


def test_s4_generation_reads_nothing_back_from_the_device():
    """The S4 kernel's bilinear discretization solves (I - dt/2 A) X = B without `torch.linalg.solve`'s error check,
    which reads a flag back from the device: on a GPU a host synchronization per kernel generation (per layer and
    axis, forward), and an error while a CUDA graph is captured. Its kernels and gradients are the solve's (against
    float64), forward, backward and the recurrent view's discretization."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    kernel = S4Kernel(4, d_state=8, num_kernels=2, dt_min=0.01, dt_max=0.1)
    reference = copy.deepcopy(kernel).double()
    with Ops() as ops:
        k = kernel(16, rate=0.5)
        k.square().sum().backward()
        kernel.discretize(rate=0.5)
    reads = [op for op in ops.ops if op in ('aten._linalg_check_errors.default', 'aten._local_scalar_dense.default')]
    assert not reads, reads
    want = reference(16, rate=0.5, dtype=torch.float64)
    want.square().sum().backward()
    assert (k.double() - want).abs().max() < 1e-5 * want.abs().max()
    for p, q in zip(kernel.parameters(), reference.parameters()):
        assert (p.grad.double() - q.grad).norm() < 1e-4 * q.grad.norm()

def test_s4_band_limit_masks_c_on_the_modes_of_lambda():
    """As the original code's DPLR kernel: the modes of Lambda at or above the cut-off (base dt) get C = 0, at
    every rate; the band-limit is saved with the weights; the recurrent view is masked alike."""
    from s4nd_vision.layers import S4NDRecurrence
    torch.manual_seed(0)
    cut = S4Kernel(3, d_state=16, num_kernels=2, dt_min=0.05, dt_max=0.5, bandlimit=0.5).double()
    freq = cut.log_dt.exp()[:, None] * cut.a_imag.abs() / (2 * math.pi)
    kept = freq < 0.25
    assert kept.any() and not kept.all()
    full = S4Kernel(3, d_state=16, num_kernels=2).double()
    full.load_state_dict(cut.state_dict())
    assert cut.bandlimit == full.bandlimit == 0.5  # (the record travels with the weights)
    full.bandlimit = None
    with torch.no_grad():
        full.c_pairs.mul_(kept[..., None])
    for length, rate in ((20, 1.0), (41, 0.5), (9, 2.0)):
        torch.testing.assert_close(cut(length, rate, torch.float64), full(length, rate, torch.float64))
        assert not torch.allclose(cut(length, rate, torch.float64), S4Kernel.forward(
            _unmasked(cut), length, rate, torch.float64))
    layer = S4ND(3, ndim=1, kernel='s4', d_state=16, bidirectional=False, dt_min=0.1, dt_max=0.5,
                 bandlimit=0.5).double()
    u = torch.randn(2, 3, 12, dtype=torch.float64)
    rec, steps = S4NDRecurrence(layer), []
    state = rec.default_state(2)
    for t in range(12):
        y, state = rec.step(u[..., t], state)
        steps.append(y)
    with torch.no_grad():
        y = layer(u)
        set_bandlimit(layer, None)
        unmasked = layer(u)
    torch.testing.assert_close(torch.stack(steps, -1), y, rtol=1e-5, atol=1e-6)  # (the layer convolves in float32)
    assert (y - unmasked).abs().max() > 1e-3


def _unmasked(kernel):
    other = copy.deepcopy(kernel)
    other.bandlimit = None
    return other


@pytest.mark.parametrize('kernel', ['s4', 'sgconv'])
def test_gradcheck(kernel):
    """Gradients through kernel generation and the separable convolution, every parameter, two rank-1 terms."""
    torch.manual_seed(0)
    kw = dict(d_state=2) if kernel == 's4' else {}  # (one conjugate pair: gradcheck's cost grows with d_state)
    layer = _layer(kernel, 2, 2, (3, 4), l_ref=(4, 3), rank=2, bidirectional=(True, False), pool=(1, 2), **kw).double()
    names, params = zip(*layer.named_parameters())
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *p):
        return torch.func.functional_call(layer, dict(zip(names, p)), (x,))

    assert torch.autograd.gradcheck(fn, (x,) + tuple(p.detach().requires_grad_() for p in params))


@pytest.mark.parametrize('kernel', ['s4d', 's4', 'sgconv'])
def test_kernel_generation_ignores_autocast(kernel):
    """Kernels come in the dtype asked for also inside an autocast region (CPU autocast runs GEMMs in bfloat16):
    through the layer's `axis_kernels`, `ssm_kernels` and each kernel module."""
    torch.manual_seed(0)
    layer = _layer(kernel, 4, 2, (8, 6), l_ref=(8, 6))
    plain = [layer.axis_kernels((8, 6)), ssm_kernels(list(layer.kernels), [8, 6], [1.0, 1.0]), layer.kernels[0](8)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cast = [layer.axis_kernels((8, 6)), ssm_kernels(list(layer.kernels), [8, 6], [1.0, 1.0]), layer.kernels[0](8)]
    for a, b in zip(torch.utils._pytree.tree_leaves(cast), torch.utils._pytree.tree_leaves(plain)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('kernel', ['s4d', 'sgconv', 's4'])
def test_compiled_layer_follows_sizes_and_rates(kernel):
    """torch.compile (dynamic sizes, as at a second size or with dynamic=True) traces every kernel type, also with a
    changing explicit rate: the eager-mode value checks must not stop the trace on a symbolic rate. (A per-axis
    rate tuple once, with dynamic=True: after a second size the sizes are as symbolic, and each graph costs a trace.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, kernel=kernel, l_ref=16, d_state=8).eval()
    for dynamic, rates in ((None, (0.5, 0.7)), (True, (0.5, 0.7, (0.7, 0.8)))):
        compiled = torch.compile(layer, fullgraph=True, backend='eager', dynamic=dynamic)
        with torch.no_grad():
            for side in (16, 20, 24):
                x = torch.randn(1, 4, side, side)
                torch.testing.assert_close(compiled(x), layer(x))
            x = torch.randn(1, 4, 16, 16)
            for rate in rates:  # (dynamic=None: 0.5 traced as a constant, then 0.7 as a symbolic rate)
                torch.testing.assert_close(compiled(x, rate=rate), layer(x, rate=rate))
        torch._dynamo.reset()


def test_layer_api_edges_a_standalone_user_meets():
    """An empty batch gives every parameter a (zero) gradient, as a convolution does (DDP waits for all of them);
    kernels prepared without autograd are not used by a forward with it; complex dtypes are refused; the Triton path
    forced on CPU tensors without Triton's interpreter falls back instead of failing in Triton."""
    layer = S4ND(4, ndim=2, l_ref=8)
    layer(torch.zeros(0, 4, 8, 8)).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    layer.zero_grad(set_to_none=True)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        prepare_kernels([(layer, (8, 8))])
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.kernels.parameters())
    with pytest.raises(ValueError, match='dtype must be a real floating-point dtype'):
        S4ND(4, ndim=2, dtype=torch.complex64)
    with pytest.raises(ValueError, match="dtype must be a real floating-point dtype \\(or None\\), got float32"):
        S4ND(4, ndim=2, dtype='float32')  # (an AttributeError on str before)
    with pytest.raises(ValueError, match=r'layers: the sizes of each layer need one entry per spatial axis of the '
                                         r'layer \(2\), got \(8,\)'):
        prepare_kernels([(layer, (8,))])
    from s4nd_vision.layers import dispatch
    if os.environ.get('TRITON_INTERPRET', '0') in ('', '0'):
        with dispatch.force_path('triton'):
            torch.testing.assert_close(layer(x), layer(x))


def test_prepared_kernels_serve_the_next_call_only():
    """Kernels prepared for a call that did not use them (the depthwise path's, or one refused for its input) are
    dropped, not taken by a later call after the parameters changed."""
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=8).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        prepare_kernels([(layer, (8, 8))])
        layer(x.contiguous(memory_format=torch.channels_last))  # (the CPU's depthwise path in inference)
        layer.kernels[0].c.mul_(-3.0)
        torch.testing.assert_close(layer(x), copy.deepcopy(layer)(x))
    layer.train()
    prepare_kernels([(layer, (8, 8))])
    with pytest.raises(ValueError, match='expects 4 input channels'):
        layer(torch.randn(2, 5, 8, 8))
    with torch.no_grad():
        layer.kernels[1].c.mul_(-3.0)
    torch.testing.assert_close(layer(x), copy.deepcopy(layer)(x))


def test_sgconv_decay_is_saved_with_the_weights():
    """The decay shapes the kernel: weights loaded into a layer built with another keep their function."""
    torch.manual_seed(0)
    source = S4ND(4, ndim=2, kernel='sgconv', l_ref=16, sgconv_decay=0.5)
    target = S4ND(4, ndim=2, kernel='sgconv', l_ref=16, sgconv_decay=0.9)
    x = torch.randn(1, 4, 16, 16)
    target.load_state_dict(source.state_dict())
    assert [k.decay for k in target.kernels] == [0.5, 0.5]
    torch.testing.assert_close(target(x), source(x))
    state = source.state_dict()
    state['kernels.0.decay'] = torch.tensor(1.5, dtype=torch.float64).view(torch.int64)
    with pytest.raises(RuntimeError, match=r'kernels.0.decay: expected the decay in \(0, 1\]'):
        target.load_state_dict(state)
    del state['kernels.0.decay'], state['kernels.1.decay']  # (files written before it was saved: the layer's own)
    target.load_state_dict(state)


def test_sgconv_weights_of_another_layout_load_into_the_same_parameter():
    """Weights of another sub-kernel layout (a layer built for another length) load into the layer's own
    Parameter: an optimizer made before the load trains them, and with the optimizer's state saved alongside
    (a resume) it steps on as the source's would."""
    torch.manual_seed(0)
    source = S4ND(4, ndim=1, kernel='sgconv', l_ref=64, sgconv_size=8)
    target = S4ND(4, ndim=1, kernel='sgconv', l_ref=16, sgconv_size=8)
    x = torch.randn(2, 4, 32)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (source, target)]
    for model, optimizer in zip((source, target), optimizers):  # both optimizers hold state of their own shapes
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    weight = target.kernels[0].weight
    target.load_state_dict(source.state_dict())
    optimizers[1].load_state_dict(copy.deepcopy(optimizers[0].state_dict()))
    assert target.kernels[0].weight is weight and weight.shape == source.kernels[0].weight.shape
    loaded = weight.detach().clone()
    for model, optimizer in zip((source, target), optimizers):
        model(x).square().sum().backward()
        optimizer.step()
    assert not torch.equal(weight, loaded)
    torch.testing.assert_close(target(x), source(x))


def test_sgconv_refused_load_leaves_the_kernel_as_it_was():
    """A load refused for the weights' channels or decay does not take their layout or decay first (the layer kept
    a new, uninitialized weight); weights of other channels leave the kernel unchanged."""
    torch.manual_seed(0)
    kernel = SGConvKernel(4, l_ref=64, size=8, decay=0.9)
    weight, saved, expected = kernel.weight, kernel.weight.detach().clone(), kernel(64)
    wrong_channels = SGConvKernel(8, l_ref=128, size=8, decay=0.5).state_dict()
    with pytest.raises(RuntimeError, match='size mismatch for weight'):
        kernel.load_state_dict(wrong_channels)
    assert (kernel.n_scales, kernel.size, kernel.l_ref, kernel.decay) == (4, 8, 64, 0.9) and kernel.weight is weight
    torch.testing.assert_close(kernel(64), expected)
    bad_decay = dict(SGConvKernel(4, l_ref=128, size=8).state_dict(),
                     decay=torch.tensor(1.5, dtype=torch.float64).view(torch.int64))
    with pytest.raises(RuntimeError, match=r'decay: expected the decay in \(0, 1\]'):
        kernel.load_state_dict(bad_decay)
    assert (kernel.n_scales, kernel.size, kernel.l_ref, kernel.decay) == (4, 8, 64, 0.9)
    assert kernel.weight is weight and torch.equal(weight, saved)
    # the whole layer: its reference grid stays too (the input would otherwise run at another rate)
    layer = S4ND(4, ndim=1, kernel='sgconv', l_ref=64)
    x = torch.randn(1, 4, 64)
    expected = layer(x)
    with pytest.raises(RuntimeError, match='size mismatch'):
        layer.load_state_dict(S4ND(8, ndim=1, kernel='sgconv', l_ref=128).state_dict())
    assert layer.l_ref == (64,)
    torch.testing.assert_close(layer(x), expected)


def test_sgconv_interpolation_cache_is_bounded_in_bytes(monkeypatch):
    """A 1D layer fed many long sequence lengths keeps at most `_CACHE_BYTES` of interpolation matrices."""
    from s4nd_vision.layers import sgconv_kernel
    monkeypatch.setattr(sgconv_kernel, '_CACHE_BYTES', 2 ** 20)
    monkeypatch.setattr(sgconv_kernel, '_cache', type(sgconv_kernel._cache)())
    kernel = SGConvKernel(2, l_ref=256, size=32)
    for length in range(300, 600, 10):
        kernel(length, 256 / length)
    held = sum(t.nbytes for t in sgconv_kernel._cache.values())
    assert 0 < held <= 2 ** 20 and len(sgconv_kernel._cache) < 30
    torch.testing.assert_close(kernel(590, 256 / 590), kernel(590, 256 / 590))  # (a hit)
    # of the matrices above _CACHE_MATRIX_BYTES (long sequences') only the last two are kept, not churned through the
    # cache: a run alternating between a training and an evaluation length reuses both
    monkeypatch.setattr(sgconv_kernel, '_CACHE_MATRIX_BYTES', 256 * 1024)
    monkeypatch.setattr(sgconv_kernel, '_cache', type(sgconv_kernel._cache)())
    monkeypatch.setattr(sgconv_kernel, '_large', type(sgconv_kernel._large)())
    kernel(100, 256 / 100)
    held = {}
    for length in (2000, 3000, 2000, 3000, 4000):
        kernel(length, 256 / length)
        assert [key[2] for key in sgconv_kernel._cache] == [100] and len(sgconv_kernel._large) <= 2
        held.setdefault(length, next(m for key, m in sgconv_kernel._large.items() if key[2] == length))
    assert [key[2] for key in sgconv_kernel._large] == [3000, 4000]
    assert all(m is held[key[2]] for key, m in sgconv_kernel._large.items())  # (reused, not rebuilt)


def test_sgconv_interpolation_cache_holds_matrices_in_the_weights_dtype(monkeypatch):
    """The cache keeps each matrix on the weights' device in their dtype: a call converts nothing (on a GPU, no copy
    from the host per step), and float32 and float64 generation each get their own."""
    from s4nd_vision.layers import sgconv_kernel
    monkeypatch.setattr(sgconv_kernel, '_cache', type(sgconv_kernel._cache)())
    kernel = SGConvKernel(2, l_ref=64, size=8)
    kernel(64)
    kernel(64, dtype=torch.float64)
    (key32, m32), (key64, m64) = sgconv_kernel._cache.items()
    assert (m32.dtype, m64.dtype) == (torch.float32, torch.float64) and key32[-1:] == (torch.float32,)
    kernel(64)
    assert sgconv_kernel._cache[key32] is m32 and len(sgconv_kernel._cache) == 2
    torch.testing.assert_close(kernel(64), kernel(64, dtype=torch.float64).float())


@pytest.mark.parametrize('kernel', ['s4d', 's4'])
def test_ssm_stays_stable_after_large_optimizer_steps(kernel):
    """Re(A) = -exp(log_a_real) < 0 and dt = exp(log_dt) > 0 whatever the values, and S4's A = Lambda - P P^* is
    stable for every P (its Hermitian part Re(Lambda) - P P^* is negative definite): AdamW steps at lr 1 that ascend
    the output's energy (towards slower decay) move the parameters far from their init and keep every pole in the
    stable half-plane, every discrete pole inside the unit circle, and the kernels finite."""
    torch.manual_seed(0)
    layer = _layer(kernel, 3, 1, (16,), l_ref=16).double()
    start = copy.deepcopy(layer)
    opt = torch.optim.AdamW(layer.parameters(), lr=1.0, weight_decay=0.0)
    x = torch.randn(4, 3, 16, dtype=torch.float64)
    for _ in range(10):
        opt.zero_grad()
        (-layer(x).square().mean()).backward()
        opt.step()
    k, k0 = layer.kernels[0], start.kernels[0]
    assert (k.log_a_real - k0.log_a_real).abs().max() > 3 and (k.log_dt - k0.log_dt).abs().max() > 2
    with torch.no_grad():
        if kernel == 's4':
            a = k.dense()[0]
            a_disc = k.discretize(rate=1.0, dtype=torch.float64)[0]
        else:
            a = torch.diag_embed(torch.complex(-k.log_a_real.exp(), k.a_imag))
            a_disc = torch.diag_embed(torch.exp(k.log_dt.exp()[:, None] * a.diagonal(dim1=-2, dim2=-1)))
        assert torch.linalg.eigvals(a).real.max() < 0
        assert torch.linalg.eigvals(a_disc).abs().max() < 1
        assert (k.log_dt.exp() > 0).all()
        for rate in (1.0, 0.5, 2.0):
            assert torch.isfinite(k(16, rate=rate, dtype=torch.float64)).all()
            assert torch.isfinite(layer(x, rate=rate)).all()
