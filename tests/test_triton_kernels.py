"""Fused S4D kernel generation (`layers.triton_kernels`) under Triton's CPU interpreter: many (layer, axis)
entries with different lengths, rates, initializations and band limits in one launch, against `ssm_kernels`
in float64 (values and the gradients of every parameter).

TRITON_INTERPRET must be set before `triton_kernels` is imported (see tests/test_triton_conv.py)."""
import contextlib
import os

os.environ['TRITON_INTERPRET'] = '1'

import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.layers import triton_kernels
from s4nd_vision.layers.ssm_kernel import SSMKernel, ssm_kernels


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _entries():
    torch.manual_seed(0)
    kernels = [
        SSMKernel(3, d_state=8, num_kernels=2, init='lin', dt_min=0.05, dt_max=0.5),
        SSMKernel(4, d_state=8, num_kernels=2, init='legs', dt_min=0.05, dt_max=0.5, bandlimit=0.5),
        SSMKernel(2, d_state=8, num_kernels=2, init='inv', dt_min=0.05, dt_max=0.5),
    ]
    with torch.no_grad():
        for k in kernels:
            k.b.add_(0.3 * torch.randn_like(k.b))
    return kernels, [7, 70, 5], [1.0, 0.5, 2.0]  # 70 taps: more than one block of taps


def test_fused_generation_equals_ssm_kernels_values_and_gradients():
    kernels, lengths, rates = _entries()
    ref = [ssm_kernels([k.double()], [n], [r], torch.float64)[0] for k, n, r in zip(kernels, lengths, rates)]
    weights = [torch.randn_like(r) for r in ref]
    params = [p for k in kernels for p in k.parameters()]
    grads_ref = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), params)
    for k in kernels:
        k.float()
    params = [p for k in kernels for p in k.parameters()]
    out = triton_kernels.ssm_kernels_fused(kernels, lengths, rates)
    assert [tuple(o.shape) for o in out] == [tuple(r.shape) for r in ref]
    assert all(o.dtype == torch.float32 for o in out)
    for o, r in zip(out, ref):
        assert _rel(o, r) < 1e-5, _rel(o, r)
    grads = torch.autograd.grad(sum((o * w.float()).sum() for o, w in zip(out, weights)), params)
    for g, r in zip(grads, grads_ref):
        assert g.shape == r.shape and _rel(g, r) < 2e-5, (tuple(g.shape), _rel(g, r))


def test_vandermonde_op_is_zero_beyond_each_length_and_traces_in_compile():
    torch.manual_seed(1)
    x, y = -torch.rand(3, 4), torch.randn(3, 4)
    c_re, c_im = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    lengths = torch.tensor([5, 9, 2], dtype=torch.int32)
    out = triton_kernels.vandermonde(x, y, c_re, c_im, lengths, 9)
    assert out.shape == (2, 3, 9)
    for r, n in enumerate(lengths.tolist()):
        assert torch.all(out[:, r, n:] == 0)
        steps = torch.arange(n, dtype=torch.float64)
        mag = (x[r].double()[:, None] * steps).exp()
        phase = y[r].double()[:, None] * steps
        expected = 2 * (c_re[:, r].double() @ (mag * phase.cos()) - c_im[:, r].double() @ (mag * phase.sin()))
        torch.testing.assert_close(out[:, r, :n].double(), expected, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(triton_kernels._vandermonde_op, (x, y, c_re, c_im, lengths, 9))
    compiled = torch.compile(lambda *a: triton_kernels.vandermonde(*a, lengths, 9).sum(), fullgraph=True,
                             backend='aot_eager')
    torch.testing.assert_close(compiled(x, y, c_re, c_im), out.sum())


@pytest.mark.parametrize('bidirectional', [True, False], ids=['bidirectional', 'causal'])
def test_two_sided_index_op_equals_the_kept_index(bidirectional):
    """The gather index as one operator (what torch.compile traces, sizes possibly symbolic) equals the kept one,
    is a tensor of its own (not the kept one), and its fake implementation gives its size."""
    args = (4, [3, 2, 5], [6, 4, 1], bidirectional, 7)
    like = torch.zeros(1)
    kept = triton_kernels._two_sided_index(4, (3, 2, 5), (6, 4, 1), bidirectional, 7, like=like)
    index = triton_kernels._two_sided_index_op(*args, like)
    assert torch.equal(index, kept) and index.data_ptr() != kept.data_ptr()
    assert index.numel() == (2 if bidirectional else 4) * (3 * 11 + 2 * 7 + 5 * 1)
    torch.library.opcheck(triton_kernels._two_sided_index_op, args + (like,))


def test_row_constants_op_equals_the_kept_constants():
    """The per-row rates and lengths as one operator (what torch.compile traces) equal the kept ones and are
    tensors of their own."""
    args = ([3, 2, 5], [6, 4, 1], [1.0, 0.5, 2.0])
    like = torch.zeros(1)
    kept = triton_kernels._row_constants((3, 2, 5), (6, 4, 1), (1.0, 0.5, 2.0), like=like)
    made = triton_kernels._row_constants_op(*args, like)
    for a, b in zip(made, kept):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.data_ptr() != b.data_ptr()
    assert made[1].tolist() == [6] * 3 + [4] * 2 + [1] * 5 and made[0].tolist() == [1.0] * 3 + [0.5] * 2 + [2.0] * 5
    torch.library.opcheck(triton_kernels._row_constants_op, args + (like,))


def test_triton_ops_make_their_tensors_gpu_current(monkeypatch):
    """Triton launches on the current GPU, not on the tensors': every op that launches kernels first makes its
    tensors' GPU current (a model on cuda:1 while cuda:0 is current); off CUDA nothing is switched."""
    from s4nd_vision.layers import triton_conv
    entered = []

    @contextlib.contextmanager
    def current(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, 'device', current)
    with FakeTensorMode():
        x = torch.empty(3, device='cuda:1')
    launch = triton_kernels.on_tensor_device(lambda n, t=None: (n, t.shape, list(entered)))
    assert launch(2, x) == (2, (3,), [torch.device('cuda:1')])  # (the GPU is current while the launch runs)
    assert launch(2, t=x) == (2, (3,), [torch.device('cuda:1')] * 2)  # (a tensor passed by keyword)
    assert launch(2, torch.zeros(1)) == (2, (1,), [torch.device('cuda:1')] * 2)  # a CPU tensor: nothing switched
    launching = [triton_conv._conv_op, triton_conv._conv_backward_op, triton_conv._axis_op,
                 triton_conv._axis_backward_op, triton_kernels._vandermonde_op, triton_kernels._vandermonde_backward_op,
                 triton_kernels._discretize_op, triton_kernels._discretize_backward_op]
    assert all(op._init_fn.__code__ is launch.__code__ for op in launching)  # (the same wrapper's code)


def test_fused_generation_rejects_mixed_state_sizes():
    kernels = [SSMKernel(2, d_state=4), SSMKernel(2, d_state=8)]
    with pytest.raises(ValueError, match='d_state'):
        triton_kernels.ssm_kernels_fused(kernels, [5, 5], [1.0, 1.0])



@pytest.mark.parametrize('lengths, rates, match', [
    ([5, 5], [1.0], 'one entry per kernel'),  # (a rate read beyond the rows' before)
    ([5], [1.0, 1.0], 'one entry per kernel'),  # (the second kernel silently dropped before)
    ([5, 0], [1.0, 1.0], 'length must be a positive integer'),
    ([5, 5], [1.0, 0.0], 'rate must be finite and positive'),  # (all-zero kernels before)
    ([5, 5], [1.0, float('nan')], 'rate must be finite and positive'),  # (NaN kernels before)
])
def test_fused_generation_checks_lengths_and_rates_as_ssm_kernels_does(lengths, rates, match):
    """The fused generation refuses what `ssm_kernels` (the CPU's generation) refuses, with its message, and axis
    sizes that do not match the kernels, instead of making zero, NaN or missing kernels."""
    kernels = [SSMKernel(2, d_state=4), SSMKernel(2, d_state=4)]
    for generate in (ssm_kernels, triton_kernels.ssm_kernels_fused):
        with pytest.raises(ValueError, match=match):
            generate(kernels, lengths, rates)
    with pytest.raises(ValueError, match=match):
        triton_kernels.two_sided_kernels_fused(kernels, lengths, rates, [5, 5], True)
    for sizes in ([5], [5, 0]):  # (the second kernel silently dropped, or a RuntimeError of torch.arange, before)
        with pytest.raises(ValueError, match='one positive axis size per kernel'):
            triton_kernels.two_sided_kernels_fused(kernels, [5, 5], [1.0, 1.0], sizes, True)

class _Ops(TorchDispatchMode):
    """Records the non-view operators dispatched inside it, with the device types of their tensors."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.namespace != 'prim':
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.ops.append((str(func), {t.device.type for t in tensors}))
        return out


def test_fused_generation_issues_the_same_ops_for_any_number_of_entries():
    """A training step generates every (layer, axis) kernel in one call: its host work (launches) must not
    grow with the entries, band-limited ones included (one stacked mode mask, row constants and gather index kept),
    forward nor backward."""
    counts = []
    for n in (2, 8):
        torch.manual_seed(0)
        kernels = [SSMKernel(3 + i, d_state=8, num_kernels=2, bandlimit=0.5) for i in range(n)]
        args = [5 + i for i in range(n)], [1.0 + 0.25 * i for i in range(n)], [6 + i for i in range(n)], True
        triton_kernels.two_sided_kernels_fused(kernels, *args)
        with _Ops() as forward:
            out = triton_kernels.two_sided_kernels_fused(kernels, *args)
        grads = [torch.randn_like(o) for o in out]
        with _Ops() as backward:
            torch.autograd.backward(out, grads)
        counts.append((len(forward.ops), len(backward.ops)))
    assert counts[0] == counts[1], counts



def test_fused_generation_under_non_reentrant_checkpointing():
    """Fused generation inside non-reentrant activation checkpointing (timm's `set_grad_checkpointing`, under which
    every checkpointed block generates its own kernels, fused on a GPU; FSDP's `apply_activation_checkpointing`):
    its backward unpacks each saved tensor once (checkpointing refuses a second unpack) and gives the gradients of
    the call without checkpointing."""
    kernels, lengths, rates = _entries()
    params = [p for k in kernels for p in k.parameters()]
    weights = [torch.randn(k.num_kernels, k.dim, n) for k, n in zip(kernels, lengths)]

    def loss() -> torch.Tensor:
        out = triton_kernels.ssm_kernels_fused(kernels, lengths, rates)
        return sum((o * w).sum() for o, w in zip(out, weights))
    expected = torch.autograd.grad(loss(), params)
    checkpointed = torch.utils.checkpoint.checkpoint(loss, use_reentrant=False)
    for g, r in zip(torch.autograd.grad(checkpointed, params), expected, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)

@pytest.mark.parametrize('training, img_size, triton_layers', [
    (True, 64, 2 + 2 + 6 + 2 + 3), (False, 64, 2 + 2 + 6 + 2 + 3), (True, 128, 2 + 6 + 2 + 2),
    (False, 128, 2 + 2 + 6 + 2 + 3)], ids=['training-all-triton', 'inference', 'training-mixed', 'inference-128'])
def test_cuda_path_keeps_every_tensor_on_the_device(training, img_size, triton_layers):
    """On CUDA tensors (fake ones: no GPU needed) a model's forward takes the Triton ops where they are faster
    (`dispatch.TRITON_FASTER_SIDE`: at 64 px every block and downsampling; at 128 px the first stage's sides of 32
    take the fast path in training, the Triton ops in inference), generating the kernels of all its layers in one
    fused call (in inference too), with no host-to-device copy and no host sync on either path: what capturing a
    step in a CUDA graph needs."""
    model = timm.create_model('convnext_s4nd_atto', img_size=img_size).train(training)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to('cuda')
        x = torch.randn(2, 3, img_size, img_size, device='cuda')
        with _Ops() as ops, torch.set_grad_enabled(training):
            model(x)
    names = [name for name, _ in ops.ops]
    assert names.count('s4nd_vision.ssm_discretize.default') == names.count('s4nd_vision.ssm_vandermonde.default') == 1
    # the blocks and the downsampling layers on the Triton path (the stem keeps its fused projection on the fast
    # path), stages 1-4 with 2, 2, 6, 2 blocks, then the 3 downsampling layers; at 128 px in training stage 1's 2
    # blocks and the first downsampling (input sides 32) run the fast path
    assert names.count('s4nd_vision.separable_conv2d_cl.default') == triton_layers
    assert not [op for op in ops.ops if 'cpu' in op[1]]
    assert 'aten._local_scalar_dense.default' not in names



def _cuda_autocast(dtype: torch.dtype) -> torch.autocast:
    """`torch.autocast('cuda', dtype)` where no GPU is visible (fake CUDA tensors): PyTorch turns CUDA autocast off
    with a warning there, so it is made as if CUDA (and bf16 on it) were available; entered, it is autocast's real
    dispatch state, which the fake tensors go through."""
    from unittest import mock
    with mock.patch('torch.cuda.is_available', lambda: True), \
            mock.patch('torch.cuda.is_bf16_supported', lambda *args, **kwargs: True):
        return torch.autocast('cuda', dtype=dtype)


@pytest.mark.parametrize('amp', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('training', [True, False], ids=['training', 'inference'])
def test_cuda_path_under_autocast(amp, training):
    """A model's forward on CUDA tensors (fake ones: no GPU needed) under CUDA autocast, how the README's GPU numbers
    were trained (bf16; fp16 with a gradient scaler): the fast path's Toeplitz GEMMs (at 128 px the stem and, in
    training, stage 1) multiply in the autocast dtype, the Triton layers get it as their `operands` for a float32
    input, the kernels are generated in float32 (one fused call), and nothing touches a CPU tensor or synchronizes."""
    model = timm.create_model('convnext_s4nd_atto', img_size=128).train(training)
    convs, gemms = [], []

    class Record(_Ops):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) == 's4nd_vision.separable_conv2d_cl.default':
                convs.append((args[0].dtype, args[1].dtype, args[-1]))
            elif str(func) in ('aten.bmm.default', 'aten.baddbmm_.default'):
                gemms.append({t.dtype for t in tree_leaves(args) if isinstance(t, torch.Tensor)})
            return super().__torch_dispatch__(func, types, args, kwargs)

    autocast = _cuda_autocast(amp)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to('cuda')
        x = torch.randn(4, 3, 128, 128, device='cuda')  # (batch 4: every axis of the stem a Toeplitz GEMM)
        with Record() as ops, torch.set_grad_enabled(training), autocast:
            y = model(x)
    names = [name for name, _ in ops.ops]
    assert y.dtype == amp
    assert gemms and all(dtypes == {amp} for dtypes in gemms), gemms
    assert not [name for name in names if 'fft' in name]
    # every block and downsampling layer at sides up to 16 (32 in inference) on the fused kernels: a float32 input
    # multiplied in the autocast dtype, a 16-bit one (after a downsampling's projection) in its own; float32 kernels
    assert len(convs) == (12 if training else 15)
    for x_dtype, kernel_dtype, operands in convs:
        assert kernel_dtype == torch.float32
        assert operands == (amp if x_dtype == torch.float32 else None), convs
    assert names.count('s4nd_vision.ssm_discretize.default') == names.count('s4nd_vision.ssm_vandermonde.default') == 1
    assert not [op for op in ops.ops if 'cpu' in op[1]]
    assert 'aten._local_scalar_dense.default' not in names


@pytest.mark.parametrize('masked', [False, True], ids=['all-modes', 'band-limited'])
def test_discretize_op_equals_the_complex_formulation(masked):
    """The discretization kernel and its closed-form backward against complex PyTorch in float64 (autograd),
    at step sizes where expm1 needs its series (|dt A| < 0.5) and where it does not."""
    torch.manual_seed(0)
    rows, n2, k = 37, 6, 2
    log_dt = torch.rand(rows, dtype=torch.float64) * 6 - 7  # dt from 1e-3 to 0.37
    rate = torch.rand(rows, dtype=torch.float64) + 0.5
    log_a_real = torch.randn(rows, n2, dtype=torch.float64) * 0.5 - 0.7
    a_imag = torch.randn(rows, n2, dtype=torch.float64) * 30
    b, c = torch.randn(rows, n2, 2, dtype=torch.float64), torch.randn(rows, k, n2, 2, dtype=torch.float64)
    mask = (torch.rand(rows, n2) > 0.3).double() if masked else None
    params = [t.requires_grad_() for t in (log_dt, log_a_real, a_imag, b, c)]
    a = torch.complex(-log_a_real.exp(), a_imag)
    dta = (log_dt.exp() * rate)[:, None] * a
    assert (dta.abs() < 0.5).any() and (dta.abs() > 0.5).any()
    q = torch.view_as_complex(b) * torch.expm1(dta) / a * (1 if mask is None else mask)
    ct = torch.view_as_complex(c).transpose(0, 1) * q
    expected = (dta.real, dta.imag, ct.real, ct.imag)
    inputs = [t.detach().float() for t in (log_dt, rate, log_a_real, a_imag, b, c)]
    inputs = [t.requires_grad_(i != 1) for i, t in enumerate(inputs)]
    out = triton_kernels.discretize(*inputs, None if mask is None else mask.float())
    for o, e in zip(out, expected):
        assert _rel(o, e) < 1e-6, _rel(o, e)
    grads_out = [torch.randn_like(e) for e in expected]
    grads_ref = torch.autograd.grad(expected, params, grads_out)
    grads = torch.autograd.grad(out, [t for i, t in enumerate(inputs) if i != 1], [g.float() for g in grads_out])
    for g, r in zip(grads, grads_ref):
        assert _rel(g, r) < 1e-5, _rel(g, r)
    torch.library.opcheck(triton_kernels._discretize_op, [t.detach() for t in inputs] + [
        None if mask is None else mask.float()])


def test_fused_generation_of_a_very_stiff_kernel_overflows_nowhere():
    """An inflated identity time kernel has dt A near -1e9 (`models.inflate`): exp(dt A) - 1's series, which only
    small |dt A| use, must not be evaluated into inf elsewhere (the interpreter raises on any overflow here)."""
    import numpy as np
    kernel = SSMKernel(2, d_state=4, num_kernels=1, init='lin', dt_min=0.5, dt_max=0.5)
    with torch.no_grad():
        kernel.log_a_real.fill_(21.0)  # Re(A) = -1.3e9
    with np.errstate(over='raise', invalid='raise'):
        (out,) = triton_kernels.ssm_kernels_fused([kernel], [6], [0.1])
        out.sum().backward()
    ref = ssm_kernels([kernel.double()], [6], [0.1], torch.float64)[0]
    assert _rel(out, ref) < 1e-5 and all(torch.isfinite(p.grad).all() for p in kernel.parameters())


def _finite_difference_grads(kernel, length, weight, h=1e-6):
    """d sum(weight * kernel) / d parameter by central differences of the float64 kernels, entry by entry."""
    def value():
        return (ssm_kernels([kernel], [length], [1.0], torch.float64)[0] * weight).sum().item()
    grads = []
    with torch.no_grad():
        for p in kernel.parameters():
            g = torch.empty_like(p)
            for i in range(p.numel()):
                p.view(-1)[i] += h
                up = value()
                p.view(-1)[i] -= 2 * h
                g.view(-1)[i] = (up - value()) / (2 * h)
                p.view(-1)[i] += h
            grads.append(g)
    return grads


@pytest.mark.parametrize('log_a_real', [-50.0, -60.0, -110.0])
def test_fused_generation_of_a_mode_with_tiny_a(log_a_real):
    """S4D-Lin's first mode has Im A = 0; with a tiny decay rate |A|^2 underflows in float32 (|A| < 1e-19), so the
    discretization divides by A scaled first, as `reference.ssm_kernel_reference` does, and the backward takes
    d(expm1(dt A) / A)/dA from its series, not from a difference of two terms of size 1 / A. Values and gradients
    stay those of float64 (before: wrong kernels at -50, NaN at -60, and a gradient of 1e9 for Im A). The
    gradients are finite differences: float64 autograd cancels there too. At -110 Re A underflows to 0 in float32
    (NaN before: 0 / 0): every path bounds log_a_real below (`reference.LOG_A_REAL_MIN`)."""
    torch.manual_seed(0)
    kernel = SSMKernel(2, d_state=4, num_kernels=1, init='lin', dt_min=0.1, dt_max=0.1).double()
    with torch.no_grad():
        kernel.log_a_real[:, 0] = log_a_real
    ref = ssm_kernels([kernel], [6], [1.0], torch.float64)[0].detach()
    weight = torch.randn_like(ref)
    grads_ref = _finite_difference_grads(kernel, 6, weight)
    kernel.float()
    (out,) = triton_kernels.ssm_kernels_fused([kernel], [6], [1.0])
    assert _rel(out, ref) < 1e-6, _rel(out, ref)
    grads = torch.autograd.grad((out * weight.float()).sum(), list(kernel.parameters()))
    for g, r in zip(grads, grads_ref):
        assert _rel(g, r) < 1e-5, (tuple(g.shape), _rel(g, r))


def test_fused_generation_at_coarse_steps_where_dt_a_leaves_the_expm1_series():
    """dt * rate * Re(A) from -0.5 down to about -8 (a coarse rate: a small input of a layer made for a large grid):
    the fused kernel's exp(dt A) - 1 leaves its series there, as it must (the series is accurate only near 0)."""
    torch.manual_seed(0)
    kernel = SSMKernel(2, d_state=8, init='inv', dt_min=0.5, dt_max=0.5)
    with torch.no_grad():
        kernel.log_a_real.copy_(torch.linspace(0.125, 2.0, 4).log().expand(2, 4))  # -Re(A); dt * rate = 4
    ref = ssm_kernels([kernel.double()], [9], [8.0], torch.float64)[0]
    out = triton_kernels.ssm_kernels_fused([kernel.float()], [9], [8.0])[0]
    assert _rel(out, ref) < 1e-5, _rel(out, ref)
