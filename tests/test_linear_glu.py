"""`layers.linear_glu`: the projection + GLU that recomputes its projection in the backward pass (the default off the
CPU) equals the plain ops, in values and gradients, and keeps only its input for the backward pass."""
import pytest
import torch
import torch.nn.functional as F

from s4nd_vision.bench.benchmark import saved_activation_mb
from s4nd_vision.layers import linear_glu, ops


def _inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 3, 5, generator=gen, dtype=dtype).movedim(1, -1)  # a permuted view, as in the models
    weight = torch.randn(8, 6, generator=gen, dtype=dtype)
    bias = torch.randn(8, generator=gen, dtype=dtype)
    return [t.detach().requires_grad_() for t in (x, weight, bias)]


def test_gradcheck():
    x, weight, bias = _inputs()
    assert torch.autograd.gradcheck(lambda *a: linear_glu(*a, recompute=True), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, w: linear_glu(a, w, None, recompute=True), (x, weight))


def test_float64_gradients_stay_float64():
    """In float64 the backward pass computes in float64, as the plain ops do (it rounded the GLU's gradient to float32:
    gradients 1e-7 off, within gradcheck's tolerance)."""
    inputs = _inputs()
    grad = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    ref_grads = torch.autograd.grad(F.glu(F.linear(*inputs), dim=-1), inputs, grad)
    grads = torch.autograd.grad(linear_glu(*inputs, recompute=True), inputs, grad)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('needs', [(True, True, True), (False, True, True), (True, False, False)])
def test_equals_the_plain_ops(needs):
    inputs = [t.float().detach().requires_grad_(n) for t, n in zip(_inputs(), needs)]
    grad = torch.randn(2, 3, 5, 4)
    ref = F.glu(F.linear(*inputs), dim=-1)
    ref_grads = torch.autograd.grad(ref, [t for t in inputs if t.requires_grad], grad)
    out = linear_glu(*inputs, recompute=True)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_keeps_only_its_input():
    x = torch.randn(4, 64, 64, 32, requires_grad=True)
    weight, bias = torch.nn.Parameter(torch.randn(192, 32)), torch.nn.Parameter(torch.randn(192))
    plain = saved_activation_mb(lambda: linear_glu(x, weight, bias, recompute=False))
    recomputed = saved_activation_mb(lambda: linear_glu(x, weight, bias, recompute=True))
    input_mb = x.numel() * 4 / 2 ** 20
    assert recomputed == pytest.approx(input_mb, rel=0.01)  # x only (parameters are not counted)
    assert plain == pytest.approx(input_mb * 7, rel=0.01)  # x and the 6x wider projection


def test_autocast_recomputes_in_the_forward_dtype(monkeypatch):
    """Under bf16 autocast the backward recomputes the projection in bf16, as the forward ran it, and its gradients
    are within bf16 error of the float64 ones, as the plain ops' are. The error is norm-relative: element by element
    the two bf16 results round differently, and a fixed elementwise tolerance failed for about 1 gradient in 5."""
    x, weight, bias = [t.float().detach().requires_grad_() for t in _inputs()]
    grad = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ref = F.glu(F.linear(x, weight, bias), dim=-1)
        out = linear_glu(x, weight, bias, recompute=True)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    ref_grads = torch.autograd.grad(ref, (x, weight, bias), grad)
    recomputed, linear = [], F.linear
    monkeypatch.setattr(F, 'linear', lambda *args: recomputed.append(linear(*args)) or recomputed[-1])
    grads = torch.autograd.grad(out, (x, weight, bias), grad)
    monkeypatch.undo()
    assert [h.dtype for h in recomputed] == [torch.bfloat16]  # recomputed outside autocast, in the forward's dtype
    exact = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    exact_grads = torch.autograd.grad(F.glu(F.linear(*exact), dim=-1), exact, grad.double())
    for g, r, e, t in zip(grads, ref_grads, exact_grads, (x, weight, bias)):
        assert g.dtype == t.dtype
        error, ref_error = [((a.double() - e).norm() / e.norm()).item() for a in (g, r)]
        assert error < 2e-2 and ref_error < 2e-2, (error, ref_error)


def test_plain_ops_without_gradients_and_on_the_cpu_by_default(monkeypatch):
    x, weight, bias = _inputs()
    assert linear_glu(x, weight, bias).grad_fn.name() == 'GluBackward0'
    monkeypatch.setattr(ops, 'recompute_for_memory', lambda device: True)  # as off the CPU
    assert 'LinearGLU' in linear_glu(x, weight, bias).grad_fn.name()
    assert 'LinearGLU' in linear_glu(x, weight, bias, recompute=True).grad_fn.name()
    with torch.no_grad():
        assert linear_glu(x, weight, bias, recompute=True).grad_fn is None


@pytest.mark.parametrize('shape', [(2, 6, 3, 5), (2, 6, 4, 3, 5), (2, 6, 5)])  # (B, C_in, *spatial), as a permuted view
@pytest.mark.parametrize('with_bias', [True, False])
def test_inference_on_the_cpu_runs_a_onednn_convolution_equal_to_the_projection(monkeypatch, shape, with_bias):
    """Without gradients, float32 rows on the CPU go through oneDNN's 1x1 convolution (`_project_rows_onednn`),
    whose result equals the float64 projection; float64, 2-D inputs and inputs needing gradients do not."""
    from s4nd_vision.layers import glu
    if not torch.backends.mkldnn.is_available():
        pytest.skip('this PyTorch build has no oneDNN')
    calls, original = [], glu._project_rows_onednn
    monkeypatch.setattr(glu, '_project_rows_onednn', lambda *a: calls.append(1) or original(*a))
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64).movedim(1, -1)
    w64, b64 = torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    b64 = b64 if with_bias else None
    expected = F.glu(F.linear(x64, w64, b64), dim=-1)
    with torch.no_grad():
        out = linear_glu(x64.float(), w64.float(), None if b64 is None else b64.float())
    assert calls == [1] and out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        linear_glu(x64, w64, b64)  # float64: F.linear
        linear_glu(x64.float().reshape(-1, 6), w64.float())  # rows without a spatial axis
    x = x64.float().requires_grad_()
    linear_glu(x, w64.float(), None).sum().backward()  # training: F.linear (autograd)
    assert calls == [1] and x.grad is not None


def test_inference_projection_runs_onednn_on_one_thread():
    """On one thread too, the inference projection is oneDNN's convolution: F.conv2d sends a 1x1 convolution of one
    image to PyTorch's own GEMM (`_slow_conv2d_forward`, about twice oneDNN's time at the models' shapes) when
    PyTorch runs on one thread, as with OMP_NUM_THREADS=1 or in a DataLoader worker."""
    from torch.profiler import ProfilerActivity, profile
    if not torch.backends.mkldnn.is_available():
        pytest.skip('this PyTorch build has no oneDNN')
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 4, 5, 6, generator=gen), torch.randn(8, 6, generator=gen), torch.randn(8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            out = linear_glu(x, weight, bias)
    finally:
        torch.set_num_threads(threads)
    ops_run = {e.key for e in prof.key_averages()}
    assert 'aten::mkldnn_convolution' in ops_run and 'aten::_slow_conv2d_forward' not in ops_run, sorted(ops_run)
    torch.testing.assert_close(out, F.glu(F.linear(x, weight, bias), dim=-1))
