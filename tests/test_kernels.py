"""Per-axis kernels against their definitions: S4D-LegS from the HiPPO-LegS decomposition, the S4 (DPLR)
kernel against matrix powers of the dense discretized system, and the SGConv kernel's structure."""
import contextlib
import copy
import math

import pytest
import torch

from s4nd_vision.layers import SSMKernel
from s4nd_vision.layers.hippo import hippo_legs, legs_nplr
from s4nd_vision.layers.s4_kernel import S4Kernel
from s4nd_vision.layers.sgconv_kernel import SGConvKernel
from s4nd_vision.layers.ssm_kernel import per_kernel, ssm_kernels


def _zoh_dense_kernel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dt: float, length: int) -> torch.Tensor:
    """K[l] = c^T exp(dt A)^l A^-1 (exp(dt A) - I) b of a dense real system (ZOH), (length,) float64."""
    d_a = torch.linalg.matrix_exp(dt * a)
    d_b = torch.linalg.solve(a, (d_a - torch.eye(a.shape[0], dtype=a.dtype)) @ b)
    out, state = [], d_b
    for _ in range(length):
        out.append(c @ state)
        state = d_a @ state
    return torch.stack(out)


@pytest.mark.parametrize('d_state', [8, 16, 64])
def test_legs_nplr_is_the_hippo_decomposition(d_state):
    """Lambda, V^H B and V^H P rebuild HiPPO-LegS's A and B exactly (with the conjugate half)."""
    a, b, p = hippo_legs(d_state)
    lam, vb, vp, v = legs_nplr(d_state)
    v_full = torch.cat([v, v.conj()], dim=1)
    lam_full, vp_full, vb_full = (torch.cat([t, t.conj()]) for t in (lam, vp, vb))
    torch.testing.assert_close(v_full.conj().T @ v_full, torch.eye(d_state, dtype=v.dtype))  # unitary
    dplr = torch.diag(lam_full) - vp_full[:, None] * vp_full.conj()[None, :]
    torch.testing.assert_close(v_full @ dplr @ v_full.conj().T, a.to(v.dtype), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(v_full @ vb_full, b.to(v.dtype))
    # the eigenvalues of A's normal part, independently of our eigenvector basis
    eig = torch.linalg.eigvals(a + p[:, None] * p[None, :])
    expected = eig[eig.imag > 0].imag.sort().values
    torch.testing.assert_close(lam.imag, expected)
    torch.testing.assert_close(lam.real, torch.full_like(lam.real, -0.5))


def test_hippo_functions_refuse_bad_state_sizes():
    """A float state size made the matrices of arange(2.5) (3 x 3) silently, or failed in slicing (4.0)."""
    for bad in (2.5, 0, -1, True):
        with pytest.raises(ValueError, match='d_state must be a positive integer'):
            hippo_legs(bad)
    for bad in (4.0, 3, 0, True, '4'):
        with pytest.raises(ValueError, match='d_state must be a positive even integer'):
            legs_nplr(bad)
    assert hippo_legs(3)[0].shape == (3, 3) and legs_nplr(2)[0].shape == (1,)


def _capped_legs_b(d_state: int) -> torch.Tensor:
    """HiPPO-LegS's B with its eigenbasis coordinates V^H B capped at magnitude 2 (the original's B_clip), as a
    real N-vector: V_full is unitary, so b = 2 Re(V (V^H b)) over the half with Im > 0."""
    _, vb, _, v = legs_nplr(d_state)
    capped = vb * (2.0 / vb.abs()).clamp(max=1.0)
    return 2 * (v @ capped).real


def test_s4d_legs_init_is_the_normal_part_of_hippo_legs():
    """init='legs': A and B are HiPPO-LegS's normal part in its eigenbasis, B's coordinates capped at magnitude 2
    as in the original code (NOTES.md: about 0.7-2.0 at N = 16), so with C = V^H c the diagonal SSM's kernel is the
    kernel of the real dense system (S = A + P P^T, capped B, c)."""
    d_state, dt, length = 16, 0.05, 40
    kernel = SSMKernel(1, d_state=d_state, num_kernels=1, init='legs', dtype=torch.float64)
    a, b, p = hippo_legs(d_state)
    lam, vb, vp, v = legs_nplr(d_state)
    torch.testing.assert_close(torch.complex(-kernel.log_a_real.exp(), kernel.a_imag)[0], lam)
    magnitudes = torch.view_as_complex(kernel.b.detach())[0].abs()
    assert 0.6 < magnitudes.min() < 0.8 and magnitudes.max() == 2.0 and vb.abs().max() > 10
    small = vb.abs() < 2  # the slower modes keep HiPPO-LegS's B exactly
    assert small.sum() == 5
    torch.testing.assert_close(torch.view_as_complex(kernel.b.detach())[0][small], vb[small])
    b = _capped_legs_b(d_state)
    c = torch.randn(d_state, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kernel.log_dt.fill_(math.log(dt))
        # y = c^T x = c^T V_full x~: the half with Im > 0 carries C = V^T c (its conjugate the other half)
        kernel.c_pairs.copy_(torch.view_as_real(v.T @ c.to(v.dtype))[None, None])
    expected = _zoh_dense_kernel(a + p[:, None] * p[None, :], b, c, dt, length)
    torch.testing.assert_close(kernel(length, dtype=torch.float64)[0, 0], expected)


def _bilinear_dense_kernel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dt, length: int) -> torch.Tensor:
    """K[k, h, l] = Re(c[k, h]^T A~^l B~) for dense systems A (H, N, N), b (H, N), c (K, H, N), dt (H,): bilinear,
    by explicit matrix powers."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    half = (dt / 2).to(a.dtype)[:, None, None] * a
    a_disc = torch.linalg.solve(eye - half, eye + half)
    state = torch.linalg.solve(eye - half, dt.to(a.dtype)[:, None] * b)  # B~
    out = []
    for _ in range(length):
        out.append(torch.einsum('khn,hn->kh', c, state).real)
        state = (a_disc @ state[..., None])[..., 0]
    return torch.stack(out, dim=-1)


def _randomize_s4(kernel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in kernel.named_parameters():
            scale = 0.3 if name in ('log_dt', 'log_a_real') else 0.5
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize('randomized', [False, True])
@pytest.mark.parametrize('length', [1, 2, 7, 12])
def test_s4_kernel_equals_matrix_powers(randomized, length):
    """Cauchy + Woodbury in the frequency domain == C^T A~^l B~ with the dense bilinear A~, at several rates."""
    torch.manual_seed(0)
    kernel = S4Kernel(3, d_state=8, num_kernels=2, dt_min=0.05, dt_max=0.5, dtype=torch.float64)
    if randomized:
        _randomize_s4(kernel)
    a, b, c = kernel.dense()
    # the conjugate-symmetric system is real: A is similar to a real matrix, the kernel has no imaginary part
    for rate in (1.0, 0.5, 2.0):
        dt = kernel.log_dt.detach().exp() * rate
        expected = _bilinear_dense_kernel(a.detach(), b.detach(), c.detach(), dt, length)
        torch.testing.assert_close(kernel(length, rate=rate, dtype=torch.float64), expected)


def test_s4_init_is_hippo_legs():
    """At initialization the S4 kernel is the kernel of HiPPO-LegS (the real dense A; B with its eigenbasis
    coordinates capped at magnitude 2, as the original's B_clip) with C = V^T c."""
    d_state, dt, length = 16, 0.05, 30
    kernel = S4Kernel(1, d_state=d_state, dtype=torch.float64)
    a, _, _ = hippo_legs(d_state)
    b = _capped_legs_b(d_state)
    v = legs_nplr(d_state)[3]
    c = torch.randn(d_state, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kernel.log_dt.fill_(math.log(dt))
        kernel.c_pairs.copy_(torch.view_as_real(v.T @ c.to(v.dtype))[None, None])
    expected = _bilinear_dense_kernel(a[None], b[None], c[None, None], torch.tensor([dt], dtype=torch.float64), length)
    torch.testing.assert_close(kernel(length, dtype=torch.float64), expected)


def test_s4_kernel_gradcheck():
    torch.manual_seed(0)
    kernel = S4Kernel(2, d_state=4, num_kernels=2, dt_min=0.1, dt_max=0.5, dtype=torch.float64)
    _randomize_s4(kernel)
    names, params = zip(*kernel.named_parameters())
    for length, rate in ((5, 1.0), (6, 0.5)):
        def fn(*values):
            return torch.func.functional_call(kernel, dict(zip(names, values)), (length, rate, torch.float64))
        assert torch.autograd.gradcheck(fn, tuple(p.detach().requires_grad_() for p in params))


def test_s4_kernel_errors_and_float32():
    with pytest.raises(ValueError, match='init'):
        S4Kernel(2, init='lin')
    with pytest.raises(ValueError, match='d_state'):
        S4Kernel(2, d_state=5)
    torch.manual_seed(0)
    kernel = S4Kernel(4, d_state=64, num_kernels=2, dt_min=0.1, dt_max=1.0)
    k32 = kernel(56)
    assert k32.dtype == torch.float32 and k32.shape == (2, 4, 56)
    k64 = kernel(56, dtype=torch.float64)
    assert ((k32.double() - k64).norm() / k64.norm()) < 1e-4


@pytest.mark.parametrize('init', ['lin', 'inv'])
def test_s4d_kernels_in_float32_stay_accurate_at_long_lengths(init):
    """65536 taps at small steps, where |z| = |exp(dt A)| is near 1: the float32 kernels and their gradients stay
    near float64's (repeated doubling of float32 powers all the way drifted to 4e-4 of the largest tap here, the
    gradients to 2e-3)."""
    torch.manual_seed(0)
    kernel = SSMKernel(4, d_state=64, num_kernels=2, init=init, dt_min=1e-6, dt_max=1e-4)
    kernel64 = copy.deepcopy(kernel).double()
    g = torch.randn(2, 4, 65536, dtype=torch.float64)
    k64 = kernel64(65536, dtype=torch.float64)
    k64.backward(g)
    k32 = kernel(65536)
    k32.backward(g.float())
    assert ((k32.double() - k64).abs().max() / k64.abs().max()) < 2e-5
    for p, p64 in zip(kernel.parameters(), kernel64.parameters()):
        assert ((p.grad.double() - p64.grad).abs().max() / p64.grad.abs().max()) < 1e-4


def _sgconv_reference(weight: torch.Tensor, size: int, decay: float, length: int) -> torch.Tensor:
    """SGConv's rate-1 kernel as its definition reads: each sub-kernel linearly interpolated (half-pixel centres,
    edges clamped) to 2^max(0, i-1) times its size, times decay^i, concatenated; unnormalized. Interpolation is
    sampled on a 64x finer grid and averaged over each tap's cell, the cell integral of the layer's kernel."""
    fine = 64
    parts = []
    for i in range(weight.shape[-2]):
        stretch = 2 ** max(0, i - 1)
        parts.append(decay ** i * torch.nn.functional.interpolate(
            weight[..., i, :].reshape(-1, 1, size), scale_factor=stretch * fine, mode='linear', align_corners=False))
    k = torch.cat(parts, dim=-1).reshape(weight.shape[:-2] + (-1,))
    return k[..., : length * fine].unflatten(-1, (length, fine)).mean(-1)


def test_sgconv_kernel_is_the_dyadic_concatenation():
    torch.manual_seed(0)
    kernel = SGConvKernel(3, l_ref=100, num_kernels=2, size=8, dtype=torch.float64)
    assert kernel.n_scales == 1 + math.ceil(math.log2(100 / 8)) == 5 and kernel.support == 128
    k = kernel(128, dtype=torch.float64) * kernel.norm
    expected = _sgconv_reference(per_kernel(kernel.weight.detach(), 3), 8, 0.5, 128)
    torch.testing.assert_close(k, expected, atol=2e-3 * expected.abs().max(), rtol=0)
    # normalized once at initialization: unit norm at rate 1 over the covered length, fixed afterwards
    torch.testing.assert_close(kernel(128, dtype=torch.float64).norm(dim=-1), torch.ones(2, 3, dtype=torch.float64))
    with torch.no_grad():
        kernel.weight.mul_(3)
    three = torch.full((2, 3), 3.0, dtype=torch.float64)
    torch.testing.assert_close(kernel(128, dtype=torch.float64).norm(dim=-1), three)
    assert 'norm' in kernel.state_dict() and kernel.norm.requires_grad is False


def test_sgconv_kernel_decays_by_dyadic_range():
    size, decay = 16, 0.5
    kernel = SGConvKernel(2, l_ref=256, size=size, decay=decay, dtype=torch.float64)
    with torch.no_grad():
        kernel.weight.fill_(1.0)
    k = kernel(256, dtype=torch.float64)[0, 0] * kernel.norm[0, 0]
    torch.testing.assert_close(k[:size], torch.ones(size, dtype=torch.float64))
    for i in range(1, kernel.n_scales):
        lo, hi = size * 2 ** (i - 1), size * 2 ** i
        torch.testing.assert_close(k[lo:hi], torch.full((hi - lo,), decay ** i, dtype=torch.float64))
    # random sub-kernels: the mean magnitude halves from one dyadic range to the next
    torch.manual_seed(0)
    k = SGConvKernel(512, l_ref=256, size=size, decay=decay, dtype=torch.float64)(256, dtype=torch.float64)
    ranges = [(0, size)] + [(size * 2 ** (i - 1), size * 2 ** i) for i in (1, 2, 3, 4)]
    means = [k[..., lo:hi].abs().mean() for lo, hi in ranges]
    for a, b in zip(means, means[1:]):
        assert 0.4 < (b / a).item() < 0.6


def test_sgconv_parameter_count_is_sublinear():
    counts = {}
    for l_ref in (32, 64, 128, 1024, 8192):
        kernel = SGConvKernel(4, l_ref=l_ref, num_kernels=2, size=32)
        counts[l_ref] = sum(p.numel() for p in kernel.parameters())
        assert counts[l_ref] == 2 * 4 * 32 * (1 + int(math.log2(l_ref / 32)))
        assert kernel(l_ref).shape == (2, 4, l_ref)
    assert counts[8192] < 8192  # fewer values per channel and direction than taps (9 x 32)
    assert counts[8192] - counts[1024] == 3 * 2 * 4 * 32  # each doubling of the length adds one sub-kernel
    assert SGConvKernel(4, l_ref=7, size=32).weight.shape == (4 * 1, 1, 7)  # no values beyond the reference length


def test_sgconv_kernel_follows_the_rate():
    """The kernel at rate r integrates the same continuous kernel over cells of width r: integer rates are box
    sums of the rate-1 taps, finer rates split them, and the covered offsets stay the same."""
    torch.manual_seed(0)
    kernel = SGConvKernel(3, l_ref=40, num_kernels=2, size=8, dtype=torch.float64)
    k1 = kernel(64, dtype=torch.float64)
    torch.testing.assert_close(kernel(32, rate=2.0, dtype=torch.float64), k1[..., 0::2] + k1[..., 1::2])
    k_half = kernel(128, rate=0.5, dtype=torch.float64)
    torch.testing.assert_close(k_half[..., 0::2] + k_half[..., 1::2], k1)
    k_third = kernel(96, rate=2 / 3, dtype=torch.float64)
    torch.testing.assert_close(k_third.unflatten(-1, (32, 3)).sum(-1), kernel(32, rate=2.0, dtype=torch.float64))
    # zero beyond the covered length (64 taps at rate 1), at every rate
    assert kernel(80, dtype=torch.float64)[..., 64:].abs().max() == 0
    assert kernel(100, rate=0.5, dtype=torch.float64)[..., :128].abs().amax(-1).min() > 0


def test_sgconv_kernel_errors():
    for bad in (dict(l_ref=0), dict(l_ref=8, size=0), dict(l_ref=8, decay=0.0), dict(l_ref=8, decay=1.5),
                dict(l_ref=8, decay=True)):  # (a bool passed as 1)
        with pytest.raises(ValueError, match=next(iter(k for k in bad if k != 'l_ref'), 'l_ref')):
            SGConvKernel(2, **bad)


@pytest.mark.parametrize('make', [
    lambda **kw: SSMKernel(kw.pop('dim', 4), **kw),
    lambda **kw: S4Kernel(kw.pop('dim', 4), **kw),
    lambda **kw: SGConvKernel(kw.pop('dim', 4), l_ref=8, **kw),
], ids=['s4d', 's4', 'sgconv'])
def test_kernel_modules_refuse_bad_sizes_and_generation_arguments(make):
    """Each kernel module, used on its own, names the bad argument (not a torch error deep inside, not a silently
    all-zero kernel at rate 0)."""
    for name, bad in (('dim', 0), ('dim', -1), ('dim', 2.0), ('num_kernels', 0)):
        with pytest.raises(ValueError, match=f'{name} must be a positive integer'):
            make(**{name: bad})
    # (a complex dtype made complex step sizes and weights whose imaginary parts generation dropped, an integer one
    # failed in torch naming no argument; S4ND refused both already)
    for dtype in (torch.complex64, torch.int64, 'float32'):
        with pytest.raises(ValueError, match=r'dtype must be a real floating-point dtype \(or None\)'):
            make(dtype=dtype)
    kernel = make()
    for length in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match='length must be a positive integer'):
            kernel(length)
    for rate in (0.0, -1.0, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='rate must be finite and positive'):
            kernel(8, rate=rate)
    with pytest.raises(ValueError, match='dtype must be torch.float32 or torch.float64'):
        kernel(8, dtype=torch.float16)
    assert kernel(8, dtype=torch.float64).shape == (1, 4, 8)
    # the same through the stacked generation of several kernels (the layers' path)
    for lengths, rates, message in (([0], [1.0], 'length must be a positive integer'),
                                    ([8], [-1.0], 'rate must be finite and positive'),
                                    ([8], [1.0, 2.0], 'one entry per kernel, got 1, 1 and 2')):
        with pytest.raises(ValueError, match=message):
            ssm_kernels([kernel], lengths, rates)
    with pytest.raises(ValueError, match='dtype must be torch.float32 or torch.float64'):
        ssm_kernels([kernel], [8], [1.0], torch.bfloat16)


def test_ssm_step_sizes_must_be_real_numbers():
    for bad in (dict(dt_min='a'), dict(dt_max=True), dict(dt_min=0.5, dt_max=0.1)):
        with pytest.raises(ValueError, match='dt_min <= dt_max'):
            SSMKernel(4, **bad)


def test_reference_generation_groups_kernels_of_one_length_only_at_one_rate(monkeypatch):
    """Under export or compilation S4D kernels of one state size and length share one real-arithmetic generation
    (`_reference_kernels`); the two axes of a square input at rates (1, 2) must not share it, whose rate is one."""
    from s4nd_vision.layers import ssm_kernel
    torch.manual_seed(0)
    kernels = [SSMKernel(3, 8, dt_min=0.05, dt_max=0.5).double() for _ in range(3)]
    lengths, rates = [7, 7, 7], [1.0, 2.0, 1.0]
    alone = [k(n, rate=r, dtype=torch.float64) for k, n, r in zip(kernels, lengths, rates)]
    monkeypatch.setattr(ssm_kernel, 'use_reference', lambda: True)  # (as under torch.compile or torch.export)
    runs = ssm_kernel.ssm_kernel_runs(kernels, lengths, rates, torch.float64)
    assert sorted(sorted(members) for members, _ in runs) == [[0, 2], [1]]
    for got, expected in zip(ssm_kernels(kernels, lengths, rates, torch.float64), alone):
        torch.testing.assert_close(got, expected)


def _s4d_kernel_by_the_formula(kernel: SSMKernel, length: int) -> torch.Tensor:
    """NOTES.md's S4D kernel, K[l] = 2 Re(sum_n C_n B_n (exp(dt A_n) - 1) / A_n exp(dt A_n l)), in float64 Python
    complex arithmetic, with (exp(Z) - 1) / A = dt sum_j Z^j / (j + 1)! (Z = dt A): exact where A underflows to 0."""
    import cmath
    b = torch.view_as_complex(kernel.b.detach().double().contiguous())
    c = torch.view_as_complex(kernel.c_pairs.detach().double().contiguous())
    out = torch.zeros(c.shape[0], kernel.dim, length, dtype=torch.float64)
    for h in range(kernel.dim):
        dt = math.exp(kernel.log_dt[h].item())
        for n in range(b.shape[1]):
            a = complex(-math.exp(kernel.log_a_real[h, n].item()), kernel.a_imag[h, n].item())
            z = dt * a
            e = dt * sum(z ** j / math.factorial(j + 1) for j in range(40)) if abs(z) < 1 else (cmath.exp(z) - 1) / a
            for k in range(c.shape[0]):
                for step in range(length):
                    out[k, h, step] += 2 * (c[k, h, n].item() * b[h, n].item() * e * cmath.exp(z * step)).real
    return out


@pytest.mark.parametrize('log_a_real', [-0.7, -90.0, -104.0, -110.0, -200.0, -1000.0])
def test_s4d_kernel_of_a_mode_whose_decay_underflows(log_a_real):
    """Re A = -exp(log_a_real) underflows in float32 below about -88 (and to 0 below -104): on S4D-Lin's first mode
    (Im A = 0) the kernel was NaN (1 / A overflowed, then 0 / 0). The fast path in float32 and float64, and the
    reference formulation, now give the formula's values (a mode that does not decay: e = dt), with finite
    gradients."""
    from s4nd_vision.layers.reference import reference_formulation
    torch.manual_seed(0)
    kernel = SSMKernel(2, d_state=4, num_kernels=2, init='lin', dt_min=0.1, dt_max=0.2)
    with torch.no_grad():
        kernel.log_a_real[:, 0] = log_a_real
    expected = _s4d_kernel_by_the_formula(kernel, 6)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        for reference in (False, True):
            with reference_formulation() if reference else contextlib.nullcontext():
                out = kernel(6, 1.0, dtype=dtype)
                torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
                grads = torch.autograd.grad(out.sum(), list(kernel.parameters()))
            assert all(g.isfinite().all() for g in grads), (dtype, reference)
