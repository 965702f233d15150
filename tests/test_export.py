"""Export and compilation: the real-arithmetic reference path equals the fast path, and whole models export
to torch.export / ONNX with dynamic H and W and compile once for every size."""
import onnxruntime as ort
import pytest
import timm
import torch
from torch.export import Dim

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.layers import S4ND, SSMKernel, ops
from s4nd_vision.layers.reference import separable_conv_reference, ssm_kernel_reference
from s4nd_vision.layers.ssm_kernel import ssm_kernels


def _params(kernel: SSMKernel):
    return kernel.log_dt, kernel.log_a_real, kernel.a_imag, kernel.b, kernel.c


@pytest.mark.parametrize('init', ['lin', 'inv', 'legs'])
@pytest.mark.parametrize('bandlimit', [None, 0.5])
def test_reference_kernel_equals_fast_kernel_and_its_gradients(init, bandlimit):
    torch.manual_seed(0)
    kernel = SSMKernel(5, d_state=8, num_kernels=2, init=init, dt_min=0.05, dt_max=0.5, bandlimit=bandlimit).double()
    with torch.no_grad():
        kernel.b.add_(0.3 * torch.randn_like(kernel.b))
    for length, rate in [(9, 1.0), (17, 0.45)]:
        fast = ssm_kernels([kernel], [length], [rate], torch.float64)[0]
        mask = None if bandlimit is None else kernel.mode_mask().double()
        ref = ssm_kernel_reference(*_params(kernel), length, rate, mask=mask)
        torch.testing.assert_close(ref, fast, rtol=1e-10, atol=1e-12)
        weight = torch.randn_like(fast)
        grads_fast = torch.autograd.grad((fast * weight).sum(), _params(kernel))
        grads_ref = torch.autograd.grad((ref * weight).sum(), _params(kernel))
        for g_ref, g_fast in zip(grads_ref, grads_fast):
            torch.testing.assert_close(g_ref, g_fast, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('ndim,sizes,pool', [
    (1, (13,), (1,)), (1, (12,), (3,)), (2, (6, 9), (1, 1)), (2, (8, 7), (2, 2)), (3, (4, 5, 6), (1, 2, 2))])
def test_reference_conv_equals_separable_conv(ndim, sizes, pool):
    torch.manual_seed(0)
    u = ops.channel_major(torch.randn(2, 3, *sizes, dtype=torch.float64))
    kernels = [torch.randn(2, 3, 2 * n - 1, dtype=torch.float64) for n in sizes]
    skip = torch.randn(3, dtype=torch.float64)
    dims = list(range(1, ndim)) + [ndim + 1]
    expected = ops.separable_conv(u, kernels, pool, skip=skip)
    torch.testing.assert_close(separable_conv_reference(u, kernels, dims, pool, skip=skip), expected)


def test_compiled_layer_and_model_trace_one_graph_for_every_size():
    """torch.compile(dynamic=True) runs three sizes with no recompilation, and matches eager.

    Like for any CNN, some size changes still recompile on the CPU, for reasons outside S4ND: a first
    square input (duck sizing guards H == W), a stage grid of 1 or 2 (0/1 specialization of n - 1), and
    PyTorch's CPU conv backend choice, which guards on C * H * W <= 20480 for timm's strided convs; the
    sizes here stay on one side of all three."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=64).eval()
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for size in ((256, 288), (320, 256), (288, 352)):
            x = torch.randn(1, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert len(frames) == 1


def test_inductor_compiles_the_layer_without_complex_ops():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=8, l_ref=8, pool=2)
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    x = torch.randn(2, 4, 8, 10, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    expected = torch.autograd.grad(layer(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name,stride', [('convnext_s4nd_atto', 32), ('vit_s4nd_atto_patch16_224', 16)])
def test_onnx_export_with_dynamic_height_and_width(tmp_path, name, stride):
    """The dynamo ONNX exporter (torch.export underneath) gives one graph that onnxruntime runs at the traced
    size and at another one, equal to PyTorch's outputs."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64).eval()
    h, w = stride * Dim('h', min=3, max=16), stride * Dim('w', min=3, max=16)
    program = torch.onnx.export(
        model, (torch.randn(1, 3, 4 * stride, 4 * stride),), dynamo=True, dynamic_shapes=({2: h, 3: w},),
        verbose=False)
    path = tmp_path / 'model.onnx'
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for size in [(4 * stride, 4 * stride), (3 * stride, 5 * stride)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = model(x)
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)
