"""FLOP counting: the fvcore handles of s4nd_vision.bench.flops against counts worked out by hand.

Unit: one multiply-add (fvcore's). A real FFT of N points costs 1.25 N log2 N, a complex one
2.5 N log2 N; a complex x complex product 4 per element. Sizes are powers of two so log2 is exact.
"""
import logging
import math

import pytest
import timm
import torch
import torch.nn as nn
from fvcore.nn import FlopCountAnalysis

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.bench.flops import count_flops
from s4nd_vision.layers import S4ND, ops


@pytest.fixture(autouse=True)
def _quiet_fvcore():
    logger = logging.getLogger('fvcore')
    level = logger.level
    logger.setLevel(logging.ERROR)  # fvcore logs every op it does not count
    yield
    logger.setLevel(level)


class _Apply(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _counts(fn, *inputs):
    return count_flops(_Apply(fn), inputs).by_operator()


def test_fft_ops():
    x = torch.randn(2, 3, 4, 8)  # 24 rows of 8, or 6 planes of 4 x 8
    # rfft padded to n = 16 (a length computed in the trace): 24 real transforms of 16 points, 1.25 * 16 * 4 each
    assert _counts(lambda x: torch.fft.rfft(x, n=2 * x.shape[-1]), x) == {'fft_rfft': 24 * 80}
    # without n: 24 transforms of 8 points, 1.25 * 8 * 3 each
    assert _counts(lambda x: torch.fft.rfft(x), x) == {'fft_rfft': 24 * 30}
    # along dim 2 (length 4, padded to 8): 2 * 3 * 8 = 48 transforms of 8 points
    assert _counts(lambda x: torch.fft.rfft(x, n=8, dim=2), x) == {'fft_rfft': 48 * 30}
    # irfft to 16 real points from 9 bins
    z = torch.randn(2, 3, 4, 9, dtype=torch.complex64)
    assert _counts(lambda z: torch.fft.irfft(z, n=16), z) == {'fft_irfft': 24 * 80}
    # rfftn / irfftn over the last two axes padded to 8 x 16 = 128 points: 6 transforms, 1.25 * 128 * 7 each
    assert _counts(lambda x: torch.fft.rfftn(x, s=(8, 16)), x) == {'fft_rfftn': 6 * 1120}
    assert _counts(lambda x: torch.fft.irfftn(torch.fft.rfftn(x, dim=(2, 3)), s=(4, 8)), x) == {
        'fft_rfftn': 6 * 200, 'fft_irfftn': 6 * 200}  # 32 points: 1.25 * 32 * 5
    # rfftn without s or dim transforms every axis: one transform of 2 * 3 * 4 * 8 = 192 points
    assert _counts(lambda x: torch.fft.rfftn(x), x) == {'fft_rfftn': round(1.25 * 192 * math.log2(192))}
    # complex transform: fft2 of 4 x 8 = 32 points, 2.5 * 32 * 5 each
    assert _counts(lambda x: torch.fft.fft2(x), x) == {'fft_fft2': 6 * 400}
    # a length that is not a power of two: 2 * 4 * 9 = 72 transforms of 3 points, 2.5 * 3 * log2(3) each
    assert _counts(lambda z: torch.fft.ifft(z, dim=1), z) == {'fft_ifft': 856}


def test_complex_products():
    a, b = torch.randn(4, 8, dtype=torch.complex64), torch.randn(8, 5, dtype=torch.complex64)
    r = torch.randn(4, 8)
    # fvcore counts these as real: 4 * 8 * 5 multiply-adds; complex ones cost 4 real multiply-adds each
    assert _counts(lambda a, b: torch.einsum('ij,jk->ik', a, b), a, b) == {'einsum': 4 * 160}
    assert _counts(lambda a, b: torch.bmm(a[None], b[None]), a, b) == {'bmm': 4 * 160}
    acc = torch.zeros(1, 4, 5, dtype=a.dtype)
    assert _counts(lambda a, b: torch.baddbmm(acc, a[None], b[None]), a, b) == {'baddbmm': 4 * 160}
    assert _counts(lambda a, b: torch.matmul(a, b), a, b) == {'matmul': 4 * 160}
    assert _counts(lambda r, b: torch.mm(r, b.real), r, b) == {'mm': 160}  # real ones as fvcore counts them
    # elementwise: complex x complex 4, complex x real 2, real x real not counted (fvcore's convention)
    assert _counts(lambda a, r: a * a, a, r) == {'mul': 4 * 32}
    assert _counts(lambda a, r: a * r, a, r) == {'mul': 2 * 32}
    assert _counts(lambda a, r: r * r + r, a, r) == {}
    # division by a complex number: product with the conjugate (4) plus |z|^2 and two divisions (4)
    assert _counts(lambda a, r: a / a, a, r) == {'div': 8 * 32}
    assert _counts(lambda a, r: a / r, a, r) == {'div': 2 * 32}


def test_attention_counts_its_two_products():
    """timm's attention (scaled_dot_product_attention, 0 in plain fvcore): q k^T and the weights times v, as fvcore
    counts the same products written out."""
    import torch.nn.functional as F
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    assert _counts(F.scaled_dot_product_attention, q, k, v) == {'scaled_dot_product_attention': 2 * 3 * 5 * 7 * 12}
    written_out = _counts(lambda q, k, v: torch.matmul(torch.matmul(q, k.transpose(-2, -1)).softmax(-1), v), q, k, v)
    assert sum(written_out.values()) == 2 * 3 * 5 * 7 * 12
    # grouped-query attention: 6 query heads share 3 key/value heads, every query head costs its products
    q6 = torch.randn(2, 6, 5, 8)
    assert _counts(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q6, k, v) == {
        'scaled_dot_product_attention': 2 * 6 * 5 * 7 * 12}


def _conv_counts(layer: S4ND, x: torch.Tensor):
    """Counts of the layer's convolution: the whole layer minus its kernel generation."""
    analysis = count_flops(layer, (x,))
    assert analysis.total('kernels') > 0  # kernel generation is traced and counted too
    return analysis.by_operator('') - analysis.by_operator('kernels')


C, B, H, W = 3, 2, 4, 8


def test_s4nd_fft_counts():
    with ops.conv_algorithm('fft'):
        counts = _conv_counts(S4ND(C, ndim=2, d_state=4), torch.randn(B, C, H, W))
        # per axis of length n: zero padding to 2n, FFT of the input rows and of the C two-sided kernels,
        # product with the spectrum (n + 1 bins), inverse FFT
        # axis H: 2n = 8 (30 per transform), C * B * W = 48 rows;
        # axis W: 2n = 16 (80 per transform), C * B * H = 24 rows
        assert counts == {
            'fft_rfft': 48 * 30 + C * 30 + 24 * 80 + C * 80,
            'mul': 4 * 48 * (H + 1) + 4 * 24 * (W + 1),
            'fft_irfft': 48 * 30 + 24 * 80,
        }


def test_kernel_generation_is_counted_under_no_grad_too():
    """The module doc said cached kernels count as 0 under no_grad: a traced layer always generates them, so the
    count is the same, and an inference count subtracts the `kernels` entries."""
    layer, x = S4ND(C, ndim=2, d_state=4).eval(), torch.randn(B, C, H, W)
    with_grad = count_flops(layer, (x,))
    with torch.no_grad():
        layer(x)  # (caches the kernels for this size)
        inference = count_flops(layer, (x,))
    assert inference.total() == with_grad.total() and inference.total('kernels') == with_grad.total('kernels') > 0


@pytest.mark.parametrize('pool', [1, 2])
def test_s4nd_toeplitz_counts(pool):
    with ops.conv_algorithm('toeplitz'):
        counts = _conv_counts(S4ND(C, ndim=2, d_state=4, pool=pool), torch.randn(B, C, H, W))
        # axis H: a (H / pool) x H matrix per channel times B * W columns; then axis W: a (W / pool) x W matrix
        # per channel times B * H / pool rows (the pooling folds into the matrices)
        expected = C * B * W * (H // pool) * H + C * B * (H // pool) * (W // pool) * W
        assert counts['bmm'] + counts['baddbmm_'] == expected  # the skip term accumulates into the last product
        assert not any(op.startswith('fft') for op in counts)


def test_model_count_adds_the_fft_cost():
    with ops.conv_algorithm('fft'):
        model = timm.create_model(
            'convnext_s4nd_atto', depths=(1, 1, 1, 1), dims=(16, 16, 16, 16), d_state=8, img_size=32).eval()
        x = torch.randn(1, 3, 32, 32)
        counted = count_flops(model, (x,))
        plain = FlopCountAnalysis(model, (x,))
        ours, theirs = counted.by_operator(), plain.by_operator()
        assert all(ours[op] == theirs[op] for op in theirs)  # real convs, matmuls and norms as fvcore counts them
        assert ours['fft_rfft'] > 0 and ours['fft_irfft'] > 0 and ours['mul'] > 0
        assert counted.total() > plain.total()
        assert 'aten::fft_rfft' in plain.unsupported_ops()
        assert not any('fft' in op or op in ('aten::mul', 'aten::div') for op in counted.unsupported_ops())


def test_command_counts_a_model_built_with_its_arguments(capsys):
    """`s4nd-vision flops NAME,key=value,...`: the model as built with them, on an input of its own channels."""
    from s4nd_vision.cli import main
    spec = 'convnext_s4nd_atto,depths=[1,1,1,1],dims=[16,16,16,16],d_state=8,in_chans=1'
    main(['flops', spec, '--img-size', '64'])
    out = capsys.readouterr().out
    model = timm.create_model('convnext_s4nd_atto', depths=(1, 1, 1, 1), dims=(16, 16, 16, 16), d_state=8,
                              in_chans=1, img_size=64).eval()
    total = count_flops(model, (torch.randn(1, 1, 64, 64),)).total()
    assert out.startswith(f'{spec} @ 64x64, batch 1, algorithm rule: {total / 1e9:.3f} GMACs')


def test_command_counts_video_and_sequence_models_on_their_own_inputs(capsys):
    """A clip of the video model's frames at --img-size, a sequence of the sequence model's length (a video model of
    one stage of one block, as wide as to count 0.022 GMACs on 4 frames and 0.012 on 2: the input the command builds
    is checked, not the atto model's count)."""
    from s4nd_vision.cli import main
    video = 'convnext_s4nd_3d_atto,num_frames=4,depths=[1],dims=[128]'
    main(['flops', video, 's4nd_seq_atto,seq_len=64', '--img-size', '32'])
    lines = [line for line in capsys.readouterr().out.splitlines() if ' @ ' in line]
    clip = timm.create_model('convnext_s4nd_3d_atto', num_frames=4, depths=[1], dims=[128], img_size=32).eval()
    seq = timm.create_model('s4nd_seq_atto', seq_len=64).eval()
    totals = [count_flops(m, (x,)).total() for m, x in ((clip, torch.randn(1, 3, 4, 32, 32)),
                                                        (seq, torch.randn(1, 1, 64)))]
    assert lines[0].startswith(f'{video} @ 4x32x32, batch 1, algorithm rule: {totals[0] / 1e9:.3f} GMACs')
    assert lines[1].startswith(f's4nd_seq_atto,seq_len=64 @ 64, batch 1, algorithm rule: {totals[1] / 1e9:.3f} GMACs')


def test_command_error_is_one_line_without_fvcores_import_warning():
    """`s4nd-vision flops` with a mistyped model ends with one `error: ...` line, as every command does: importing
    fvcore (which scripts its focal loss) used to print torch's `torch.jit.script` deprecation warning first, which
    reads as if this package scripted its models (it refuses TorchScript)."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, '-m', 's4nd_vision', 'flops', 'convnext_s4nd_atoo'],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: 'convnext_s4nd_atoo' is not a timm model (did you mean convnext_s4nd_atto?)"], done.stderr
