"""The fused Triton separable convolution (`layers.triton_conv`) under Triton's CPU interpreter, against the
float64 reference, and the dispatch (`layers.dispatch`) that decides which implementation runs.

TRITON_INTERPRET must be set before `triton_conv` is imported (Triton reads it when a kernel is decorated);
nothing in the package imports `triton_conv` on the CPU, so setting it here, at collection, is early enough.
"""
import os

os.environ['TRITON_INTERPRET'] = '1'

import pytest
import torch

from s4nd_vision.layers import S4ND, dispatch, ops, triton_conv, triton_kernels
from s4nd_vision.layers.reference import separable_conv_reference
from s4nd_vision.layers.ssm_kernel import SSMKernel, ssm_kernels


def test_kernels_run_in_the_interpreter():
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(triton_conv._conv_kernel, InterpretedFunction), 'triton_conv was imported before TRITON_INTERPRET'


def _reference(x, kh, kw, skip, pools):
    """(B, H, W, C) -> (B, H // ph, W // pw, C) by the reference formulation on channel-first (C, B, H, W)."""
    y = separable_conv_reference(x.permute(3, 0, 1, 2), [kh, kw], [2, 3], pools, skip)
    return y.permute(1, 2, 3, 0)


def _inputs(b, h, w, c, rank, skip, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64)
    kh = torch.randn(rank, c, 2 * h - 1, generator=gen, dtype=torch.float64)
    kw = torch.randn(rank, c, 2 * w - 1, generator=gen, dtype=torch.float64)
    d = torch.randn(c, generator=gen, dtype=torch.float64) if skip else None
    return [t for t in (x, kh, kw, d)]


def _grads(fn, tensors, grad_out):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    return y.detach(), torch.autograd.grad(y, present, grad_out.to(y.dtype))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('rows', [None, 2])  # rows per program (both kernels): all in one, or blocks of 2
@pytest.mark.parametrize('b,h,w,c,rank,pools,skip', [
    (2, 5, 4, 6, 1, (1, 1), True),  # odd sizes, channels not a power of two
    (2, 5, 5, 3, 2, (2, 2), True),  # rank 2, pooled with a dropped remainder
    (1, 8, 4, 3, 1, (4, 1), False),  # pool 4 on one axis, no skip
    (1, 8, 4, 3, 1, (4, 2), True),  # pooled unequally with D: the skip's window of PH x PW
])
def test_triton_conv_equals_reference_fp32(b, h, w, c, rank, pools, skip, rows, monkeypatch):
    if rows is not None:  # (the kernel gradient takes half the convolution's rows: blocks of 1)
        monkeypatch.setattr(triton_conv, '_conv_rows', lambda *args: rows)
    tensors = _inputs(b, h, w, c, rank, skip)
    y_ref = _reference(*tensors, pools)
    grad_out = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_ref, g_ref = _grads(lambda x, kh, kw, d: _reference(x, kh, kw, d, pools), tensors, grad_out)
    with triton_conv.fused_algorithm('sum'):  # (images default to 'dot', tested below)
        y, g = _grads(lambda x, kh, kw, d: triton_conv.separable_conv2d_cl(x, (kh, kw), pools, d),
                      [t.float() if t is not None else None for t in tensors], grad_out)
    assert y.dtype == torch.float32 and y.shape == (b, h // pools[0], w // pools[1], c)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert len(g) == len(g_ref) == (4 if skip else 3)
    for name, a, r in zip(['x', 'kh', 'kw', 'D'], g, g_ref):
        assert a.dtype == torch.float32, name
        assert _rel(a, r) < 1e-5, (name, _rel(a, r))


@pytest.mark.parametrize('b,h,w,c,rank,pools,skip', [
    (2, 5, 4, 6, 1, (1, 1), True),  # odd sizes, channels not a power of two
    (2, 5, 5, 5, 2, (2, 2), True),  # rank 2, pooled with a dropped remainder, two channel blocks (4 + 1, masked)
    (1, 8, 4, 3, 1, (4, 1), False),  # pool 4 on one axis, no skip
    (1, 16, 16, 4, 1, (2, 4), True),  # the largest side of 16 x 16 tiles, pooled unequally
    (1, 20, 9, 3, 1, (2, 1), True),  # 32 x 32 tiles (one channel per program: 2D products)
    (1, 33, 60, 2, 2, (1, 4), True),  # 64 x 64 tiles, the largest (sides up to 64, stage 1 of ConvNeXt-T)
    (1, 9, 20, 3, 1, (1, 1), True),  # 32 x 32 tiles unpooled with D: its gradient from the blocks of x's columns
])
def test_dot_algorithm_equals_reference(b, h, w, c, rank, pools, skip):
    """The tensor-core formulation (`fused_algorithm('dot')`: per-channel Toeplitz matrix products, the taps'
    gradients as diagonal sums) against the float64 reference: fp32 (three TF32 products on a GPU) and bf16."""
    tensors = _inputs(b, h, w, c, rank, skip)
    grad_out = torch.randn((b, h // pools[0], w // pools[1], c), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    y_ref, g_ref = _grads(lambda x, kh, kw, d: _reference(x, kh, kw, d, pools), tensors, grad_out)
    with triton_conv.fused_algorithm('dot'):
        y, g = _grads(lambda x, kh, kw, d: triton_conv.separable_conv2d_cl(x, (kh, kw), pools, d),
                      [t.float() if t is not None else None for t in tensors], grad_out)
        y16, g16 = _grads(lambda x, kh, kw, d: triton_conv.separable_conv2d_cl(x, (kh, kw), pools, d),
                          [tensors[0].bfloat16()] + [t.float() if t is not None else None for t in tensors[1:]],
                          grad_out)
    assert y.dtype == torch.float32 and y16.dtype == torch.bfloat16 and y.shape == y_ref.shape
    assert _rel(y, y_ref) < 1e-5, _rel(y, y_ref)
    assert _rel(y16, _reference(tensors[0].bfloat16().double(), *tensors[1:], pools)) < 1e-2
    for name, a, a16, r in zip(['x', 'kh', 'kw', 'D'], g, g16, g_ref):
        assert a.dtype == torch.float32, name
        assert _rel(a, r) < 1e-5, (name, _rel(a, r))
        assert _rel(a16, r) < 2e-2, (name, _rel(a16, r))


@pytest.mark.parametrize('rank,pools,skip', [(1, (1, 1), True), (2, (2, 2), True), (1, (2, 1), False)])
def test_dot_kernels_with_several_images_per_program(rank, pools, skip, monkeypatch):
    """Programs of the tensor-core kernels that loop over a group of images (the operators built, and their
    gradients reduced to taps, once per group; a last group not full): equal to the float64 reference."""
    monkeypatch.setattr(triton_conv, '_dot_images', lambda b: 3)
    test_dot_algorithm_equals_reference(4, 5, 6, 5, rank, pools, skip)  # groups of 3 and 1 images (fp32, bf16)


@pytest.mark.parametrize('settings', [dict(DOT_GRAD_BLOCK=64), dict(DOT_GRAD_TILE=1024, DOT_TILE=4096)])
def test_dot_kernels_with_other_tiles(settings, monkeypatch):
    """The tensor-core kernels with the settings `gpu_check` times beside the landed ones: the kernel gradient's
    products whole (no blocks), and programs of several channels in the kernel gradient (3D products, 16 x 16
    tiles) and of more channels in the forward: equal to the float64 reference."""
    for name, value in settings.items():
        monkeypatch.setattr(triton_conv, name, value)
    test_dot_algorithm_equals_reference(2, 5, 5, 5, 2, (2, 2), True)  # (16 x 16: 4 + 1 channels in the gradient)
    test_dot_algorithm_equals_reference(1, 20, 9, 3, 1, (2, 1), True)  # (32 x 32: the gradient's blocks whole)


def test_dot_grad_blocks_of_16_or_more(monkeypatch):
    """The kernel gradient contracts in blocks of `DOT_GRAD_BLOCK` (16: S = 64 in 4 blocks, S = 16 whole), never
    below tl.dot's 16 (a smaller setting compiles to an error on the GPU, not in the interpreter)."""
    assert [triton_conv._dot_grad_split(s) for s in (16, 32, 64)] == [1, 2, 4]
    monkeypatch.setattr(triton_conv, 'DOT_GRAD_BLOCK', 8)
    assert [triton_conv._dot_grad_split(s) for s in (16, 32, 64)] == [1, 2, 4]
    monkeypatch.setattr(triton_conv, 'DOT_GRAD_BLOCK', 64)
    assert [triton_conv._dot_grad_split(s) for s in (16, 32, 64)] == [1, 1, 1]


def test_dot_warps_one_per_16_rows_when_asked(monkeypatch):
    """`DOT_WARPS` warps per program, or with 0 one warp per 16 rows of its (BLOCK_C, S, S) tiles, at most 8."""
    assert triton_conv._dot_warps(64, 1) == triton_conv.DOT_WARPS == 8
    monkeypatch.setattr(triton_conv, 'DOT_WARPS', 0)
    assert [triton_conv._dot_warps(s, c) for s, c in ((16, 4), (16, 1), (32, 1), (64, 1), (32, 8))] == [4, 1, 2, 4, 8]


def test_dot_images_per_program_keep_the_gpu_filled():
    """At least 16 programs per channel block, at most `DOT_IMAGES` images each (ConvNeXt-T's batch of 128: 8)."""
    assert [triton_conv._dot_images(b) for b in (1, 8, 31, 32, 64, 128, 1024)] == [1, 1, 1, 2, 4, 8, 8]


def test_dot_algorithm_runs_its_kernels_at_every_side(monkeypatch):
    """'dot' (the default for images, `DEFAULT_KERNEL_ALGORITHM`) launches the tensor-core kernels at every side the
    kernels take (up to `MAX_SIDE`); 'sum' (the default for clips' frames) never launches them."""
    calls = []
    for name in ('_dot_conv_kernel', '_dot_grad_kernel', '_conv_kernel', '_kernel_grad_kernel'):
        kernel = getattr(triton_conv, name)
        monkeypatch.setattr(triton_conv, name, _Counting(kernel, name, calls))
    dot, sums = ['_dot_conv_kernel', '_dot_conv_kernel', '_dot_grad_kernel'], ['_conv_kernel', '_conv_kernel',
                                                                               '_kernel_grad_kernel']
    for side, algorithm, expected in ((32, 'dot', dot), (33, 'dot', dot), (8, None, dot), (64, None, dot),
                                      (8, 'sum', sums), (64, 'sum', sums)):
        calls.clear()
        x, kh, kw, d = [t.float() if t is not None else None for t in _inputs(1, side, 3, 2, 1, True)]
        x.requires_grad_()
        with triton_conv.fused_algorithm(algorithm):
            triton_conv.separable_conv2d_cl(x, (kh, kw), (1, 1), d).sum().backward()
        assert calls == expected, (side, algorithm, calls)  # forward, then the input and the kernel gradients
    for algorithm, expected in ((None, sums), ('dot', dot)):  # a clip's frames (2 frames: one 2D launch each way)
        calls.clear()
        x = torch.randn(1, 2, 8, 3, 2, requires_grad=True)
        kernels = [torch.randn(1, 2, 2 * n - 1) for n in (2, 8, 3)]
        with triton_conv.fused_algorithm(algorithm):
            triton_conv.separable_conv3d_cl(x, kernels).sum().backward()
        assert calls == expected, ('3D', algorithm, calls)
    with pytest.raises(ValueError, match='algorithm must be one of'):
        with triton_conv.fused_algorithm('fft'):
            pass


class _Counting:
    def __init__(self, kernel, name, calls):
        self.kernel, self.name, self.calls = kernel, name, calls

    def __getitem__(self, grid):
        self.calls.append(self.name)
        return self.kernel[grid]


@pytest.mark.parametrize('algorithm, roundings', [('sum', 1.05), ('dot', 3)])
def test_triton_conv_reads_a_strided_skip_and_sums_ranks_in_fp32(algorithm, roundings):
    """D may be a strided view (e.g. a parameter loaded with assign=True); a 16-bit output of several rank-1
    terms is rounded once (their partial sums are float32): 'sum' as one rounding of the exact result; 'dot'
    within three (its tensor-core operands, the kernels and the first axis' result, are 16-bit too)."""
    with triton_conv.fused_algorithm(algorithm):
        _strided_skip_and_fp32_rank_sums(roundings)


def _strided_skip_and_fp32_rank_sums(roundings):
    x, kh, kw, d = _inputs(2, 6, 5, 8, 4, True, seed=4)
    strided = torch.stack([d.float(), torch.full_like(d.float(), 99.0)], 1)[:, 0]  # stride 2
    assert strided.stride() == (2,)
    y_ref, g_ref = _grads(lambda x, d: _reference(x, kh, kw, d, (1, 1)), [x, d], torch.ones(2, 6, 5, 8))
    y, g = _grads(lambda x, d: triton_conv.separable_conv2d_cl(x, (kh.float(), kw.float()), (1, 1), d),
                  [x.float(), strided], torch.ones(2, 6, 5, 8))
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g, g_ref):
        assert _rel(a, r) < 1e-5
    x16 = x.bfloat16()
    exact = _reference(x16.double(), kh, kw, d, (1, 1))
    y16 = triton_conv.separable_conv2d_cl(x16, (kh.float(), kw.float()), (1, 1), d.float())
    assert y16.dtype == torch.bfloat16 and _rel(y16, exact) <= roundings * _rel(exact.bfloat16(), exact)


def test_triton_conv_bf16_input_accumulates_in_fp32():
    tensors = _inputs(2, 4, 5, 8, 1, True, seed=2)
    pools = (2, 2)
    y_ref = _reference(*tensors, pools)
    grad_out = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, g_ref = _grads(lambda x, kh, kw, d: _reference(x, kh, kw, d, pools), tensors, grad_out)
    x, kh, kw, d = tensors
    # bf16 activation, float32 kernels and D (as S4ND passes them)
    y, g = _grads(lambda x, kh, kw, d: triton_conv.separable_conv2d_cl(x, (kh, kw), pools, d),
                  [x.bfloat16(), kh.float(), kw.float(), d.float()], grad_out)
    assert y.dtype == torch.bfloat16 and g[0].dtype == torch.bfloat16 and g[1].dtype == torch.float32
    x_rounded = x.bfloat16().double()  # the error of the rounded input is not the kernel's
    assert _rel(y, _reference(x_rounded, kh, kw, d, pools)) < 1e-2
    for name, a, r in zip(['x', 'kh', 'kw', 'D'], g, g_ref):
        assert _rel(a, r) < 2e-2, (name, _rel(a, r))


def test_triton_conv_custom_op_traces_in_compile_fullgraph():
    x, kh, kw, d = [t.float() for t in _inputs(1, 2, 3, 2, 1, True, seed=4)]
    for dot, operands in ((False, None), (True, None), (True, torch.bfloat16)):
        torch.library.opcheck(triton_conv._conv_op, (x, kh, kw, d, 2, 1, dot, operands))

    def step(x, kh, kw, d):
        return (triton_conv.separable_conv2d_cl(x, (kh, kw), (2, 1), d) * 2).sum()

    leaves = [t.clone().requires_grad_() for t in (x, kh, kw, d)]
    eager = torch.autograd.grad(step(*leaves), leaves)
    compiled = torch.compile(step, fullgraph=True, backend='aot_eager')
    leaves_c = [t.clone().requires_grad_() for t in (x, kh, kw, d)]
    out = compiled(*leaves_c)
    torch.testing.assert_close(out, step(*leaves).detach())
    for a, b in zip(torch.autograd.grad(out, leaves_c), eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('algorithm', ['sum', 'dot'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_triton_conv_edges_strided_views_and_float16(algorithm, dtype):
    """Shapes the models reach that the cases above do not: sides 1 and 2 (the last stages at small resolutions, a
    side pooled to 1), one channel past a channel block ('sum': 32, 'dot': 8 at 16 x 16 tiles); an input that is a
    view with gaps (a slice of wider columns and channels: C contiguous, read through its strides), an output
    gradient with a zero batch stride (of a sum over the batch), float16: output and every gradient against the
    float64 reference of the same (rounded) input."""
    block = 32 if algorithm == 'sum' else 8
    for b, h, w, c, pools in ((1, 1, 1, 3, (1, 1)), (2, 2, 2, block + 1, (2, 2)), (2, 1, 2, 2, (1, 2))):
        x64, kh, kw, d = _inputs(b, h, w, c, 1, True, seed=h + w)
        wide = torch.zeros(b, h, w + 2, c + 3, dtype=dtype)
        wide[:, :, 1:w + 1, :c] = x64.to(dtype)
        wide.requires_grad_()
        x = wide[:, :, 1:w + 1, :c]  # (a view: stride 1 over C, gaps between pixels and rows)
        assert x.stride(-1) == 1 and x.is_contiguous() == (h * w == 1)  # (sizes of 1 have no gaps)
        leaves = [t.float().requires_grad_() for t in (kh, kw, d)]
        with triton_conv.fused_algorithm(algorithm):
            y = triton_conv.separable_conv2d_cl(x, leaves[:2], pools, leaves[2])
        ref_leaves = [t.clone().requires_grad_() for t in (x.detach().double(), kh, kw, d)]
        y_ref = _reference(*ref_leaves, pools)
        grad_out = torch.randn(y_ref.shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        grads = torch.autograd.grad(y.sum(0), [wide] + leaves, grad_out.to(dtype))  # (grad: batch stride 0)
        grads_ref = torch.autograd.grad(y_ref.sum(0), ref_leaves, grad_out)
        assert y.dtype == dtype and y.shape == (b, h // pools[0], w // pools[1], c)
        limit = 1e-5 if dtype == torch.float32 else 5e-3
        assert _rel(y, y_ref) < limit, (b, h, w, c, _rel(y, y_ref))
        assert torch.all(grads[0][:, :, 0] == 0) and torch.all(grads[0][..., c:] == 0)  # (the gaps: no gradient)
        grads = [grads[0][:, :, 1:w + 1, :c]] + list(grads[1:])
        for name, a, r in zip(['x', 'kh', 'kw', 'D'], grads, grads_ref):
            assert _rel(a, r) < limit, (b, h, w, c, name, _rel(a, r))


def test_triton_conv_copies_a_view_that_spans_more_than_int32_offsets_reach(monkeypatch):
    """The kernels index in int32 (`MAX_ELEMENTS`, which `supported` checks against the elements): a view with gaps
    (a slice of wider channels) can span more memory than that while holding fewer elements, and its offsets would
    wrap (wrong values, or an illegal address on a GPU). Such an input, and such an output gradient, reaches the
    kernels as a contiguous copy; a view within the limit as it is (no copy). `MAX_ELEMENTS` is lowered here."""
    received = []  # what each launch reads (forward: the input; the input gradient's: the output gradient)
    for name in ('_launch_conv', '_launch_axis'):
        launch = getattr(triton_conv, name)
        monkeypatch.setattr(triton_conv, name,
                            lambda *a, launch=launch, **kw: received.append(a[0]) or launch(*a, **kw))
    monkeypatch.setattr(triton_conv, 'MAX_ELEMENTS', 80)
    gen = torch.Generator().manual_seed(8)
    for shape in ((1, 2, 3, 2), (1, 2, 2, 3, 2)):  # 12 and 24 elements, spanning 82 and 162 in 16 channels
        wide = torch.randn(*shape[:-1], 16, generator=gen)
        x, kernels = wide[..., :2], [torch.randn(1, 2, 2 * n - 1, generator=gen) for n in shape[1:-1]]
        conv = triton_conv.separable_conv2d_cl if len(shape) == 4 else triton_conv.separable_conv3d_cl
        grad = torch.randn(shape[:-1] + (16,), generator=gen)[..., :2]  # (spans as much)
        expected = conv(x.contiguous(), kernels)
        received.clear()
        y = conv(x.requires_grad_(), kernels)
        (g,) = torch.autograd.grad(y, x, grad)
        assert len(received) >= 2 and all(t.is_contiguous() for t in received), [t.stride() for t in received]
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(g, torch.autograd.grad(conv(x, kernels), x, grad.contiguous())[0])
    monkeypatch.setattr(triton_conv, 'MAX_ELEMENTS', 2 ** 31 - 1)
    received.clear()
    triton_conv.separable_conv2d_cl(x.detach()[0], kernels[1:])
    assert received[0].stride() == (96, 48, 16, 1) and received[0].data_ptr() == wide.data_ptr()  # (a frame's)


def test_triton_conv_backward_op_passes_opcheck():
    """The input and kernel gradients' custom op (what torch.compile traces for the backward pass): its fake
    implementation against the kernels, with and without D (whose gradient is then an empty float32 tensor), fp32
    and bf16 inputs, by either algorithm."""
    x, kh, kw, d = [t.float() for t in _inputs(2, 3, 4, 5, 2, True, seed=6)]
    grad = torch.randn(2, 1, 4, 5, generator=torch.Generator().manual_seed(7))
    for dtype, dot, skip in ((torch.bfloat16, False, None), (torch.float32, True, d)):
        args = (grad.to(dtype), x.to(dtype), kh, kw, skip, 2, 1, dot, None)
        torch.library.opcheck(triton_conv._conv_backward_op, args)


def test_triton_conv_rejects_bad_input():
    x = torch.randn(1, 4, 4, 3)
    with pytest.raises(ValueError, match='kernels must be'):
        triton_conv.separable_conv2d_cl(x, (torch.randn(1, 3, 7), torch.randn(1, 3, 5)))
    with pytest.raises(ValueError, match='pools'):
        triton_conv.separable_conv2d_cl(x, (torch.randn(1, 3, 7), torch.randn(1, 3, 7)), (3, 1))
    with pytest.raises(ValueError, match='dtype'):
        triton_conv.separable_conv2d_cl(x.double(), (torch.randn(1, 3, 7), torch.randn(1, 3, 7)))
    with pytest.raises(ValueError, match="kernels and skip must be on the input's device cpu"):  # (not launched)
        triton_conv.separable_conv2d_cl(x, (torch.randn(1, 3, 7),) * 2, skip=torch.ones(3, device='meta'))
    # no rank-1 term ('sum' wrote no output: uninitialized memory) and no channel ('sum' divided by zero)
    with pytest.raises(ValueError, match=r'with R >= 1, got \(0, 3, 7\)'):
        triton_conv.separable_conv2d_cl(x, (torch.randn(0, 3, 7),) * 2, skip=torch.ones(3))
    with pytest.raises(ValueError, match='needs at least one channel'):
        triton_conv.separable_conv2d_cl(x[..., :0], (torch.randn(1, 0, 7),) * 2)
    with pytest.raises(ValueError, match='kernels must be 2 tensors'):
        triton_conv.separable_conv2d_cl(x, (torch.randn(1, 3, 7),) * 3)


def test_triton_functions_refuse_tensors_triton_cannot_launch_on(monkeypatch):
    """CPU tensors without Triton's interpreter: Triton itself would fail with a driver error ("0 active drivers")
    naming neither the function nor the device; every public function says which and where."""
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    x, k = torch.randn(1, 3, 3, 2), torch.randn(1, 2, 5)
    kernel = SSMKernel(2, d_state=4)
    calls = {
        'separable_conv2d_cl': lambda: triton_conv.separable_conv2d_cl(x, (k, k)),
        'separable_conv3d_cl': lambda: triton_conv.separable_conv3d_cl(x[None], (k[..., :1], k, k)),
        'ssm_kernels_fused': lambda: triton_kernels.ssm_kernels_fused([kernel], [5], [1.0]),
        'two_sided_kernels_fused': lambda: triton_kernels.two_sided_kernels_fused([kernel], [5], [1.0], [3], False),
        'discretize': lambda: triton_kernels.discretize(*(torch.zeros(s) for s in ((2,), (2,), (2, 2), (2, 2),
                                                                                    (2, 2, 2), (2, 1, 2, 2)))),
        'vandermonde': lambda: triton_kernels.vandermonde(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(1, 2, 2),
                                                          torch.zeros(1, 2, 2), torch.tensor([3, 3]), 3),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf'{name} needs tensors on an NVIDIA GPU .* got tensors on cpu'):
            call()


def _reference3d(x, kt, kh, kw, skip, pools):
    """(B, T, H, W, C) -> pooled, by the reference formulation on channel-first (C, B, T, H, W)."""
    y = separable_conv_reference(x.permute(4, 0, 1, 2, 3), [kt, kh, kw], [2, 3, 4], pools, skip)
    return y.permute(1, 2, 3, 4, 0)


@pytest.mark.parametrize('b,t,h,w,c,rank,pools,skip', [
    (2, 4, 5, 3, 6, 1, (1, 1, 1), True),  # odd sizes, channels not a power of two, no pooling (the blocks)
    (1, 5, 4, 4, 3, 2, (2, 2, 1), True),  # rank 2, time pooled with a dropped remainder
    (2, 4, 3, 5, 5, 1, (4, 1, 1), False),  # pool 4 on the time axis, no skip
])
@pytest.mark.parametrize('algorithm', ['sum', 'dot'])
def test_triton_conv3d_equals_reference_fp32(b, t, h, w, c, rank, pools, skip, algorithm, monkeypatch):
    """The 3D composition (time axis kernel, then the fused 2D kernel per frame, by either algorithm, skip by
    PyTorch ops): outputs and every gradient against float64; small plane chunks so that the tap gradient sums
    several programs' slices."""
    monkeypatch.setattr(triton_conv, 'AXIS_BLOCK_S', 4)
    monkeypatch.setattr(triton_conv, 'AXIS_GRAD_CHUNKS', 3)  # chunks of 5 or 6 positions: the last block masked
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, h, w, c, generator=gen, dtype=torch.float64)
    kernels = [torch.randn(rank, c, 2 * n - 1, generator=gen, dtype=torch.float64) for n in (t, h, w)]
    d = torch.randn(c, generator=gen, dtype=torch.float64) if skip else None
    tensors = [x, *kernels, d]
    y_ref = _reference3d(*tensors, pools)
    grad_out = torch.randn(y_ref.shape, dtype=torch.float64, generator=gen)
    y_ref, g_ref = _grads(lambda x, kt, kh, kw, d: _reference3d(x, kt, kh, kw, d, pools), tensors, grad_out)
    with triton_conv.fused_algorithm(algorithm):
        y, g = _grads(lambda x, kt, kh, kw, d: triton_conv.separable_conv3d_cl(x, (kt, kh, kw), pools, d),
                      [v.float() if v is not None else None for v in tensors], grad_out)
    assert y.dtype == torch.float32 and y.shape == (b, t // pools[0], h // pools[1], w // pools[2], c)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert len(g) == len(g_ref) == (5 if skip else 4)
    for name, a, r in zip(['x', 'kt', 'kh', 'kw', 'D'], g, g_ref):
        assert a.dtype == torch.float32, name
        assert _rel(a, r) < 1e-5, (name, _rel(a, r))


def test_triton_axis_custom_ops_pass_opcheck_and_compile():
    gen = torch.Generator().manual_seed(5)
    x, k = torch.randn(2, 4, 6, 3, generator=gen), torch.randn(3, 7, generator=gen)
    torch.library.opcheck(triton_conv._axis_op, (x, k, 2))
    torch.library.opcheck(triton_conv._axis_backward_op, (torch.randn(2, 2, 6, 3, generator=gen), x, k, 2))
    clip = torch.randn(1, 4, 3, 3, 2, generator=gen)
    kernels = [torch.randn(1, 2, 2 * n - 1, generator=gen) for n in (4, 3, 3)]
    d = torch.randn(2, generator=gen)

    def step(x, kt, kh, kw, d):
        return (triton_conv.separable_conv3d_cl(x, (kt, kh, kw), (2, 1, 1), d) * 2).sum()

    leaves = [v.clone().requires_grad_() for v in (clip, *kernels, d)]
    eager = torch.autograd.grad(step(*leaves), leaves)
    compiled = torch.compile(step, fullgraph=True, backend='aot_eager')
    leaves_c = [v.clone().requires_grad_() for v in (clip, *kernels, d)]
    for a, b in zip(torch.autograd.grad(compiled(*leaves_c), leaves_c), eager):
        torch.testing.assert_close(a, b)


def test_deterministic_algorithms_run_the_dot_kernel_gradient(monkeypatch):
    """Under torch.use_deterministic_algorithms clips run 'dot' (whose kernel gradient sums per program group,
    then in PyTorch) instead of their default 'sum' (atomic adds): two backward passes give identical gradients; a
    forced 'sum' is refused as PyTorch refuses its nondeterministic operators, or warns with warn_only."""
    launched = []
    dot_grad = triton_conv._dot_kernel_grads
    monkeypatch.setattr(triton_conv, '_dot_kernel_grads', lambda *a: launched.append('dot') or dot_grad(*a))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4, 3, 2, generator=gen, requires_grad=True)  # (2 frames: 2 program groups)
    kernels = [torch.randn(1, 2, 2 * n - 1, generator=gen, requires_grad=True) for n in (2, 4, 3)]
    d = torch.randn(2, generator=gen, requires_grad=True)

    def grads():
        y = triton_conv.separable_conv3d_cl(x, kernels, (1, 1, 1), d)
        return torch.autograd.grad((y * y).sum(), [x, *kernels, d])

    assert triton_conv.DEFAULT_KERNEL_ALGORITHM[3] == 'sum'
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first, second = grads(), grads()
        assert launched == ['dot', 'dot'] and all(torch.equal(a, b) for a, b in zip(first, second))
        with triton_conv.fused_algorithm('sum'), pytest.raises(RuntimeError, match='not deterministic'):
            grads()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with triton_conv.fused_algorithm('sum'), pytest.warns(UserWarning, match='not deterministic'):
            grads()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    grads()  # outside: the default 'sum' again
    assert launched == ['dot', 'dot']


def test_triton_conv3d_rejects_bad_input():
    x = torch.randn(1, 4, 4, 4, 3)
    with pytest.raises(ValueError, match=r'kernels must be .* \(R, 3, 7\), \(R, 3, 7\) and \(R, 3, 7\)'):
        triton_conv.separable_conv3d_cl(x, (torch.randn(1, 3, 5), torch.randn(1, 3, 7), torch.randn(1, 3, 7)))
    with pytest.raises(ValueError, match='pools'):
        triton_conv.separable_conv3d_cl(x, [torch.randn(1, 3, 7)] * 3, (3, 1, 1))
    with pytest.raises(ValueError, match=r'\(B, T, H, W, C\)'):
        triton_conv.separable_conv3d_cl(x[0], [torch.randn(1, 3, 7)] * 3)
    with pytest.raises(ValueError, match="kernels and skip must be on the input's device"):
        triton_conv.separable_conv3d_cl(x, [torch.randn(1, 3, 7)] * 2 + [torch.randn(1, 3, 7, device='meta')])
    with pytest.raises(ValueError, match='with one R >= 1'):
        triton_conv.separable_conv3d_cl(x, [torch.randn(0, 3, 7)] * 3)
    with pytest.raises(ValueError, match='kernels must be 3 tensors'):
        triton_conv.separable_conv3d_cl(x, [torch.randn(1, 3, 7)] * 2)


def test_s4nd_layer_on_the_triton_path_equals_the_fast_path(monkeypatch):
    """The layer's wiring (kernel generation, channels-last view, D, pooling, dtypes) with the Triton path forced
    on the CPU, against the same layer on the fast path: outputs and every gradient."""
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=4, pool=2, l_ref=(5, 4))
    x = torch.randn(2, 4, 5, 4).to(memory_format=torch.channels_last)
    calls, generated = [], []
    fused = triton_conv.separable_conv2d_cl
    monkeypatch.setattr(triton_conv, 'separable_conv2d_cl', lambda *args, **kw: calls.append(1) or fused(*args, **kw))
    fused_gen = triton_kernels.two_sided_kernels_fused
    monkeypatch.setattr(triton_kernels, 'two_sided_kernels_fused',
                        lambda *a, **kw: generated.append(1) or fused_gen(*a, **kw))
    results = []
    for path in ('fast', 'triton'):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with dispatch.force_path(path):
            y = layer(xi)
            y.square().sum().backward()
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
    assert len(calls) == 1 and len(generated) == 1  # the fused ops ran on the 'triton' pass only (both axes at once)
    (y_fast, dx_fast, dp_fast), (y_tri, dx_tri, dp_tri) = results
    assert y_tri.shape == (2, 4, 2, 2) and y_tri.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_tri, y_fast, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_tri, dx_fast, rtol=1e-5, atol=1e-5)
    for a, b in zip(dp_tri, dp_fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_autocast_runs_the_tensor_core_kernels_in_its_dtype(monkeypatch):
    """Under autocast the layer's float32 input is read as it is (no cast copy) and the tensor-core kernels multiply
    in the autocast dtype (bfloat16: one product per pair, Triton's 'ieee', not three TF32 ones), forward and
    backward, like the fast path's GEMMs; the result stays float32. Outside autocast they multiply in float32."""
    launches = []
    for name in ('_dot_conv_kernel', '_dot_grad_kernel'):
        monkeypatch.setattr(triton_conv, name, _Recording(getattr(triton_conv, name), name, launches))
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=4)
    x = torch.randn(2, 4, 6, 5).to(memory_format=torch.channels_last)
    outputs = []
    for amp, precision in ((False, 'tf32x3'), (True, 'ieee')):
        launches.clear()
        xi = x.clone().requires_grad_()
        with dispatch.force_path('triton'), torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            y = layer(xi)
        y.sum().backward()
        assert y.dtype == torch.float32 and xi.grad.dtype == torch.float32
        assert [(name, kw['PRECISION']) for name, kw in launches] == [
            ('_dot_conv_kernel', precision), ('_dot_conv_kernel', precision), ('_dot_grad_kernel', precision)]
        outputs.append(y.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-2, atol=1e-2)

    def amp_forward(x):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return layer(x)
    with dispatch.force_path('triton'):  # torch.compile traces the autocast query (fullgraph: no graph break)
        compiled = torch.compile(amp_forward, fullgraph=True, backend='aot_eager')(x)
    torch.testing.assert_close(compiled, outputs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match='operands must be one of'):
        triton_conv.separable_conv2d_cl(x.permute(0, 2, 3, 1), layer.axis_kernels((6, 5)), operands=torch.int8)


class _Recording:
    """Stands in for a Triton kernel: records each launch's keyword arguments (constexprs), then launches it."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append((self.name, kwargs))
            return launch(*args, **kwargs)
        return run


def test_model_on_the_triton_path_equals_the_fast_path(monkeypatch):
    """A whole ConvNeXt-S4ND (stem, blocks, downsampling, stacked kernel generation, the GLU projections that
    recompute off the CPU) with the Triton path forced, eager and compiled as one graph, against the fast path:
    logits and every gradient."""
    import timm

    from s4nd_vision.layers import ops
    monkeypatch.setattr(ops, 'recompute_for_memory', lambda device: True)  # as on a GPU
    calls = []
    fused = triton_conv.separable_conv2d_cl
    monkeypatch.setattr(triton_conv, 'separable_conv2d_cl', lambda *args, **kw: calls.append(1) or fused(*args, **kw))
    torch.manual_seed(0)
    # (two stages: the stem, a block, a downsampling and a block are every module kind the full model has)
    model = timm.create_model('convnext_s4nd_atto', img_size=16, depths=(1, 1), dims=(8, 16))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    results, graphs = [], []

    def backend(gm, example_inputs):  # aot_eager, keeping the graph dynamo captured
        from torch._dynamo.backends.debugging import aot_eager
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)  # (one graph: the custom ops trace)
    for path, run in (('fast', model), ('triton', model), ('triton', compiled)):
        model.zero_grad()
        with dispatch.force_path(path):
            y = run(x)
            y.square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
        if len(results) == 2:
            assert len(calls) == 3  # 2 blocks, 1 downsampling (the stem, its projection fused, runs the fast path)
    (y_fast, grads_fast), *triton_results = results
    for y_tri, grads_tri in triton_results:
        torch.testing.assert_close(y_tri, y_fast, rtol=1e-4, atol=1e-5)
        for a, b in zip(grads_tri, grads_fast):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # the compiled graph runs the fused kernel generation, once for every layer (stacked, as in eager), and the
    # fused convolution, not the reference formulation; the generation's gather index is one operator, not a
    # dozen per entry
    (graph,) = graphs
    ops = [str(n.target) for n in graph.graph.nodes if n.op == 'call_function']
    assert ops.count('s4nd_vision.ssm_discretize.default') == ops.count('s4nd_vision.ssm_vandermonde.default') == 1
    assert ops.count('s4nd_vision.separable_conv2d_cl.default') == 3
    assert ops.count('s4nd_vision.two_sided_index.default') == ops.count('s4nd_vision.row_constants.default') == 1
    made = [n for n in graph.graph.nodes if n.op == 'call_function' and 'triton_kernels.py' in n.meta.get(
        'stack_trace', '') and any(name in str(n.target) for name in ('arange', 'where', 'full'))]
    assert not made and any('arange' in op for op in ops)  # (the stem's reference Toeplitz makes its indices)


def test_video_model_on_the_triton_path_equals_the_fast_path(monkeypatch):
    """A 3D ConvNeXt-S4ND (its blocks and downsampling on the Triton path: time axis kernel, fused 2D kernel per
    frame) with the Triton path forced, against the fast path: logits and every gradient."""
    import timm

    from s4nd_vision.layers import ops
    monkeypatch.setattr(ops, 'recompute_for_memory', lambda device: True)  # as on a GPU
    calls = []
    fused = triton_conv.separable_conv3d_cl
    monkeypatch.setattr(triton_conv, 'separable_conv3d_cl', lambda *args, **kw: calls.append(1) or fused(*args, **kw))
    torch.manual_seed(0)
    # (two stages: the stem, a block, a downsampling and a block are every module kind the full model has)
    model = timm.create_model('convnext_s4nd_3d_atto', img_size=16, num_frames=4, depths=(1, 1), dims=(8, 16))
    model = model.to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 3, 4, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    results = []
    for path in ('fast', 'triton'):
        model.zero_grad()
        with dispatch.force_path(path):
            y = model(x)
            y.square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 3  # 2 blocks, 1 downsampling (the stem, its projection fused, runs the fast path)
    (y_fast, grads_fast), (y_tri, grads_tri) = results
    torch.testing.assert_close(y_tri, y_fast, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_tri, grads_fast):
        # (an entry far below its tensor's largest is float32 rounding of a cancelling sum, which the two paths'
        # different generation formulas round differently)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 + 1e-6 * b.abs().max().item())


# ----- dispatch (no CUDA needed: the choice depends on the device type, shape and dtype only) -----

CUDA = torch.device('cuda')


def test_dispatch_cpu_runs_the_fast_path():
    assert dispatch.conv_path(torch.device('cpu'), (8, 96, 56, 56), (1, 1), torch.float32) == 'fast'


def test_dispatch_cuda_runs_triton_when_available_and_supported(monkeypatch):
    monkeypatch.setattr(dispatch, 'triton_available', lambda: True)
    assert dispatch.conv_path(CUDA, (128, 384, 14, 14), (1, 1), torch.bfloat16) == 'triton'
    assert dispatch.conv_path(CUDA, (128, 384, 14, 14), (2, 2), torch.float32) == 'triton'
    # supported, but measured slower than the fast path (`dispatch.TRITON_FASTER_SIDE`); forcing still runs it
    assert dispatch.conv_path(CUDA, (128, 96, 56, 56), (1, 1), torch.bfloat16) == 'fast'
    assert dispatch.conv_path(CUDA, (128, 192, 28, 28), (2, 2), torch.bfloat16) == 'fast'
    with torch.no_grad():  # inference: the kernels' forward measured faster up to `TRITON_FASTER_SIDE_INFERENCE`
        assert dispatch.conv_path(CUDA, (128, 192, 28, 28), (2, 2), torch.bfloat16) == 'triton'
        assert dispatch.conv_path(CUDA, (128, 96, 56, 56), (1, 1), torch.bfloat16) == 'fast'
    with dispatch.force_path('triton'):
        assert dispatch.conv_path(CUDA, (128, 96, 56, 56), (1, 1), torch.bfloat16) == 'triton'
    assert dispatch.conv_path(CUDA, (128, 32, 224, 224), (4, 4), torch.float32) == 'fast'  # too long for registers
    assert dispatch.conv_path(CUDA, (8, 192, 16, 28, 28), (2, 1, 1), torch.float32) == 'triton'  # 3D
    assert dispatch.conv_path(CUDA, (8, 96, 16, 56, 56), (1, 1, 1), torch.float32) == 'fast'  # 3D, measured slower
    assert dispatch.conv_path(CUDA, (8, 32, 16, 112, 112), (1, 1, 1), torch.float32) == 'fast'  # 3D, too long
    assert dispatch.conv_path(CUDA, (8, 96, 300), (1,), torch.float32) == 'fast'  # 1D
    assert dispatch.conv_path(CUDA, (8, 96, 14, 14), (1, 1), torch.float64) == 'fast'
    assert dispatch.conv_path(CUDA, (8, 96, 14, 14), (3, 3), torch.float32) == 'fast'
    # beyond int32 offsets (the kernels' indices): the fast path
    largest = triton_conv.MAX_ELEMENTS // (384 * 14 * 14)
    assert dispatch.conv_path(CUDA, (largest, 384, 14, 14), (1, 1), torch.bfloat16) == 'triton'
    assert dispatch.conv_path(CUDA, (largest + 1, 384, 14, 14), (1, 1), torch.bfloat16) == 'fast'
    assert 'int32' in triton_conv.supported((largest + 1, 14, 14, 384), (1, 1), torch.bfloat16)


def test_dispatch_falls_back_when_triton_is_missing(monkeypatch):
    monkeypatch.setattr(dispatch, 'triton_available', lambda: False)
    assert dispatch.conv_path(CUDA, (128, 384, 14, 14), (1, 1), torch.float32) == 'fast'
    with dispatch.force_path('triton'):
        assert dispatch.conv_path(torch.device('cpu'), (2, 6, 6, 5), (1, 1), torch.float32) == 'fast'


def test_dispatch_keeps_gpus_older_than_the_kernels_support_on_the_fast_path(monkeypatch):
    """On a GPU below `dispatch.MIN_CAPABILITY` (a P100: ptxas refuses the kernels' atomics) every layer runs the
    fast path and the unfused kernel generation, forced or not, eager or compiled; from it on, the Triton path; on
    AMD GPUs (ROCm) the fast path."""
    monkeypatch.setattr(dispatch, 'triton_available', lambda: True)
    shape, pools = (128, 384, 14, 14), (1, 1)

    def path_code(x):
        return x + dispatch.PATHS.index(dispatch.conv_path(CUDA, shape, pools, torch.float32))

    for capability, path in (((6, 0), 'fast'), ((7, 0), 'triton'), ((9, 0), 'triton')):
        monkeypatch.setattr(dispatch, '_capability', lambda device: capability)
        assert dispatch.conv_path(CUDA, shape, pools, torch.float32) == path
        with dispatch.force_path('triton'):
            assert dispatch.conv_path(CUDA, shape, pools, torch.float32) == path
        assert dispatch.fused_generation(CUDA, torch.float32) == (path == 'triton')
        torch.compiler.reset()
        compiled = torch.compile(path_code, fullgraph=True, backend='eager')(torch.zeros(1)).item()
        assert compiled == dispatch.PATHS.index('triton' if path == 'triton' else 'reference')
    monkeypatch.setattr(torch.version, 'hip', '6.4')  # a ROCm build (AMD GPUs): the kernels are not built for it
    assert dispatch.conv_path(CUDA, shape, pools, torch.float32) == 'fast'
    assert not dispatch.fused_generation(CUDA, torch.float32)


def test_capability_is_asked_per_gpu(monkeypatch):
    """On a machine with two kinds of GPU each one's capability decides, 'cuda' (no index) the current one's: the
    cache was keyed by the device, so 'cuda' kept the answer of the GPU current when it was first asked (an old GPU
    then got the Triton path, or a new one the fast path)."""
    capabilities = {0: (9, 0), 1: (6, 0)}  # an H100 and a P100
    current = [0]
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: current[0])

    def device_capability(device):  # (as torch's: an index or a device, no index meaning the current one)
        index = device if isinstance(device, int) else torch.device(device).index
        return capabilities[current[0] if index is None else index]

    monkeypatch.setattr(torch.cuda, 'get_device_capability', device_capability)
    monkeypatch.setattr(torch.version, 'hip', None)
    dispatch._device_capability.cache_clear()
    try:
        assert dispatch._capability(torch.device('cuda:0')) == (9, 0)
        assert dispatch._capability(torch.device('cuda:1')) == (6, 0)
        assert dispatch._capability(torch.device('cuda')) == (9, 0) and dispatch._triton_device(torch.device('cuda'))
        current[0] = 1
        assert dispatch._capability(torch.device('cuda')) == (6, 0)
        assert not dispatch._triton_device(torch.device('cuda'))
    finally:
        dispatch._device_capability.cache_clear()  # (no fake answer left for the other tests)


def test_dispatch_while_compiling_exporting_and_tracing(monkeypatch):
    """torch.compile on CUDA takes the Triton custom ops (their fake implementations trace); torch.export gets the
    portable reference, and so does compilation on the CPU unless 'triton' is forced; jit tracing (FLOP counts)
    the fast path."""
    monkeypatch.setattr(dispatch, 'triton_available', lambda: True)

    def path_code(x, device=CUDA):
        path = dispatch.conv_path(device, (128, 384, 14, 14), (1, 1), torch.float32)
        return x + dispatch.PATHS.index(path)

    assert path_code(torch.zeros(1)).item() == dispatch.PATHS.index('triton')
    compiled = torch.compile(path_code, fullgraph=True, backend='eager')
    assert compiled(torch.zeros(1)).item() == dispatch.PATHS.index('triton')
    on_cpu = torch.compile(lambda x: path_code(x, torch.device('cpu')), fullgraph=True, backend='eager')
    assert on_cpu(torch.zeros(1)).item() == dispatch.PATHS.index('reference')

    class Module(torch.nn.Module):
        def forward(self, x):
            return path_code(x)

    exported = torch.export.export(Module(), (torch.zeros(1),))
    assert exported.module()(torch.zeros(1)).item() == dispatch.PATHS.index('reference')
    traced = torch.jit.trace(path_code, torch.zeros(1), check_trace=False)
    assert traced(torch.zeros(1)).item() == dispatch.PATHS.index('fast')
    monkeypatch.setattr(dispatch, 'triton_available', lambda: False)  # no Triton: the reference
    torch.compiler.reset()
    assert torch.compile(path_code, fullgraph=True, backend='eager')(torch.zeros(1)).item() == \
        dispatch.PATHS.index('reference')


def test_compiled_layer_runs_the_triton_ops_and_equals_the_fast_path(monkeypatch):
    """A layer under torch.compile(fullgraph=True) with the Triton path (forced here, on the CPU's interpreter): the
    custom ops run inside the graph, forward and backward, and give the fast path's values and gradients."""
    launches = []
    launch = triton_conv._launch_conv
    monkeypatch.setattr(triton_conv, '_launch_conv',
                        lambda *a, **kw: launches.append(kw['transpose']) or launch(*a, **kw))
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=4, l_ref=(6, 5), pool=(2, 1))
    x = torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    results = []
    for path in ('fast', 'triton'):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with dispatch.force_path(path):
            y = (layer if path == 'fast' else torch.compile(layer, fullgraph=True, backend='aot_eager'))(xi)
            y.square().sum().backward()
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
    assert launches == [False, True]  # forward, then the input gradient: the compiled graph ran the custom ops
    (y_fast, dx_fast, dp_fast), (y_tri, dx_tri, dp_tri) = results
    torch.testing.assert_close(y_tri, y_fast, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_tri, dx_fast, rtol=1e-5, atol=1e-5)
    for a, b in zip(dp_tri, dp_fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_training_step_after_an_inference_mode_pass_on_the_triton_path():
    """A validation loop under torch.inference_mode, then training at the same size: the fused generation's kept
    constants (made in the first pass) must be normal tensors, which autograd can save."""
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=4, l_ref=(6, 7))  # (a size no other test of this process keeps constants of)
    x = torch.randn(2, 4, 6, 7).contiguous(memory_format=torch.channels_last)
    with dispatch.force_path('triton'):
        with torch.inference_mode():
            expected = layer.eval()(x)
        y = layer.train()(x)
        y.square().sum().backward()
    torch.testing.assert_close(y.detach(), expected)
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize('dynamic', [None, True])
def test_compiled_layer_with_dynamic_shapes_keeps_the_triton_ops(dynamic):
    """A compiled training loop meets a smaller last batch and another resolution: torch.compile then makes the
    sizes symbolic (dynamic=None after a change, or from the start) and the dispatch must trace with them."""
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=4, l_ref=(6, 5))
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager', dynamic=dynamic)
    for shape in ((3, 4, 6, 5), (2, 4, 6, 5), (2, 4, 8, 7)):
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        with dispatch.force_path('triton'):
            y = compiled(x)
        with torch.no_grad(), dispatch.force_path('fast'):
            torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


def test_dispatch_generates_kernels_with_ssm_kernels_on_the_cpu_and_fused_when_forced(monkeypatch):
    """Two-sided kernels, bidirectional or causal, with lengths below, at and above the axis size: on the CPU
    exactly `ops.two_sided_kernel` of `ssm_kernels`; forced to Triton one fused launch and gather per (d_state,
    num_kernels, direction) group, equal to it, gradients included."""
    torch.manual_seed(0)
    kernels = [SSMKernel(3, d_state=4, num_kernels=2), SSMKernel(2, d_state=4, num_kernels=2), SSMKernel(2, d_state=6),
               SSMKernel(4, d_state=4, num_kernels=2), SSMKernel(2, d_state=4, num_kernels=2, bandlimit=0.5)]
    lengths, rates, sizes = [5, 8, 3, 6, 2], [1.0, 0.5, 2.0, 1.5, 1.0], [5, 6, 4, 6, 3]
    bidirectional = [True, True, False, False, True]
    generated = ssm_kernels(kernels, lengths, rates)
    expected = [ops.two_sided_kernel(k[: k.shape[0] // 2], k[k.shape[0] // 2:], n) if bi else
                ops.two_sided_kernel(k, None, n) for k, n, bi in zip(generated, sizes, bidirectional)]
    cpu = dispatch.generate_two_sided(kernels, lengths, rates, sizes, bidirectional)
    assert all(torch.equal(a, b) for a, b in zip(cpu, expected))  # the CPU: exactly `ssm_kernels`
    groups = []
    fused_gen = triton_kernels.two_sided_kernels_fused
    monkeypatch.setattr(triton_kernels, 'two_sided_kernels_fused',
                        lambda k, *a: groups.append(len(k)) or fused_gen(k, *a))
    with dispatch.force_path('triton'):
        forced = dispatch.generate_two_sided(kernels, lengths, rates, sizes, bidirectional)
    assert sorted(groups) == [1, 1, 3]  # one launch per (d_state, num_kernels, direction) group
    weights = [torch.randn_like(e) for e in expected]
    params = [p for k in kernels for p in k.parameters()]
    grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), params)
             for out in (expected, forced)]
    for a, b in zip(forced, expected):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with dispatch.force_path('triton'):
        f64 = dispatch.generate_two_sided(kernels, lengths, rates, sizes, bidirectional, torch.float64)
        assert f64[0].dtype == torch.float64
    assert sorted(groups) == [1, 1, 3]  # float64 stays on `ssm_kernels`
    dispatch.generate_two_sided(kernels, lengths, rates, sizes, bidirectional)
    assert sorted(groups) == [1, 1, 3]  # outside the context: the CPU rule again


def test_dispatch_rejects_unknown_forced_path():
    with pytest.raises(ValueError, match="path must be 'triton', 'fast' or None"):
        with dispatch.force_path('cuda'):
            pass
    assert dispatch.conv_path(CUDA, (8, 96, 56, 56), (1, 1), torch.float64) == 'fast'  # nothing left forced


def test_forced_choices_under_compile_follow_their_context():
    """`force_path` and `ops.conv_algorithm` inside a graph torch.compile captures (fullgraph): the graph takes the
    forced value and is recompiled when the context forces another (dynamo guards on the mirror that compiled
    code reads instead of the ContextVar, which dynamo before torch 2.14 cannot trace); nested contexts restore
    the outer value, in eager code and compiled."""
    def code(x):
        path, algorithm = dispatch._FORCED_PATH.get(), ops._FORCED_ALGORITHM.get()
        return x + (dispatch.PATHS.index(path) if path else -1) + 10 * ops.ALGORITHMS.index(algorithm or 'fft')

    compiled = torch.compile(code, fullgraph=True, backend='eager')
    x = torch.zeros(1)
    assert compiled(x).item() == 9
    with dispatch.force_path('fast'):
        assert compiled(x).item() == code(x).item() == 10 + 3
        with dispatch.force_path('triton'), ops.conv_algorithm('toeplitz'):
            assert compiled(x).item() == code(x).item() == 1
        assert compiled(x).item() == code(x).item() == 13
    assert compiled(x).item() == code(x).item() == 9
    assert dispatch._FORCED_PATH.value is None and ops._FORCED_ALGORITHM.value is None


def test_s4nd_layer_on_cpu_never_imports_triton_path(monkeypatch):
    """On the CPU the layer's result is the fast path's, bit for bit (the dispatch changes nothing there)."""
    monkeypatch.setattr(dispatch, 'triton_available', lambda: True)
    monkeypatch.setattr(triton_conv, 'separable_conv2d_cl', None)  # would raise if called
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=4)
    x = torch.randn(2, 4, 5, 6)
    u = ops.channel_major(x)
    expected = ops.channels_first(layer.forward_channel_major(u))
    assert torch.equal(layer(x), expected)
