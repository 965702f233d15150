"""The plain reference formulation of S4ND, in real arithmetic: the path for export and compilation.

The fast paths (`ssm_kernel._SSMKernelFn`, `ops._SeparableConv`) use complex tensors, hand-written
backward passes, cached operators and a size-dependent choice between Toeplitz GEMMs and FFTs. None
of that survives export: ONNX has no complex type, `torch.export` needs shapes that stay symbolic,
and inductor generates no code for complex operators. Here the same math is written with real
tensors and shape-generic ops only (exp, cos, sin, gather, matmul), so `torch.export` with dynamic
spatial sizes, the ONNX exporters and `torch.compile(dynamic=True)` trace one graph for every size.

Kernel of one axis (zero-order hold, see `ssm_kernel`), with dt A = x + i y and C~ = C B expm1(dt A) / A:

    K[l] = 2 Re( sum_n C~_n exp(dt A_n l) ) = 2 sum_n exp(x_n l) (Re C~_n cos(y_n l) - Im C~_n sin(y_n l)).

The convolution applies each axis' two-sided kernel as a Toeplitz matrix gathered from the taps (averaged
first in sliding windows of the pooling size, which averages the matrix's rows by the pooling window), one
matrix product per axis and rank-1 term, on the channel-major tensor as it is where the axis is the first or the
last (no transposing copies: the graph is also what onnxruntime runs).
"""
import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

__all__ = ['use_reference', 'reference_formulation', 'ssm_kernel_reference', 'separable_conv_reference']

_FORCED: ContextVar[bool] = ContextVar('s4nd_reference_formulation', default=False)

# Every S4D generation takes Re A = -exp(max(log_a_real, LOG_A_REAL_MIN)): below about -88 (float32) exp(log_a_real)
# is a denormal or 0, whose reciprocal in e = expm1(dt A) / A overflowed, and on a mode with Im A = 0 (S4D-Lin's
# first) the kernel was NaN (0 / 0). At the bound A = -8.7e-27 is negligible beside any dt's rounding: dt A and
# l dt A round as for the exact A, in float64 too (e = dt (1 + dt A / 2 + ...)), so the kernel is the formula's.
LOG_A_REAL_MIN = -60.0


@contextlib.contextmanager
def reference_formulation() -> Iterator[None]:
    """Within this context S4ND runs its reference formulation in eager mode too (plain differentiable ops on every
    device): for higher-order gradients, e.g. a gradient penalty (`torch.autograd.grad(..., create_graph=True)`
    and a backward pass through that gradient), which the fast paths' closed-form backward passes refuse (they
    compute first-order gradients only; torch.func transforms take the reference formulation by themselves).
    Slower than the fast paths, and without their inference caches."""
    token = _FORCED.set(True)
    try:
        yield
    finally:
        _FORCED.reset(token)


def use_reference() -> bool:
    """True while a graph is being captured for export or compilation (torch.export, torch.compile,
    the TorchScript ONNX exporter), under a torch.func transform (grad, vmap, jacrev, ...: the fast paths'
    autograd Functions have no functorch rules), within a forward-mode AD level (`torch.autograd.forward_ad`:
    they have no jvp, and cached operators would carry no tangent of the parameters) or within
    `reference_formulation()` (higher-order gradients): S4ND then runs the reference formulation."""
    return (torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
            or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
            or _FORCED.get())  # (read in eager mode only: a graph capture answers True first)


def ssm_kernel_reference(
        log_dt: torch.Tensor,
        log_a_real: torch.Tensor,
        a_imag: torch.Tensor,
        b: torch.Tensor,
        c: torch.Tensor,
        length,
        rate=1.0,
        mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """S4D kernels from the parameters of one `SSMKernel` (complex values as trailing (re, im) pairs).

    Args:
        log_dt: (H,) log step sizes.
        log_a_real, a_imag: (H, N2) with A = -exp(log_a_real) + i a_imag.
        b: (H, N2, 2); c: (K, H, N2, 2).
        length: taps L (an int, or a symbolic size while exporting).
        rate: the step is dt * rate.
        mask: optional (H, N2) band-limiting mask applied to C.

    Returns:
        (K, H, L) real kernels.
    """
    dt = log_dt.exp()[:, None] * rate  # (H, 1)
    a_re, a_im = -log_a_real.clamp(min=LOG_A_REAL_MIN).exp(), a_imag  # (see LOG_A_REAL_MIN)
    x, y = dt * a_re, dt * a_im  # dt A
    # expm1(x + iy) = expm1(x) cos y - 2 sin^2(y / 2) + i exp(x) sin y, divided by A
    s = (0.5 * y).sin()
    n_re, n_im = torch.expm1(x) * y.cos() - 2 * s * s, x.exp() * y.sin()
    # n / A = n conj(A) / |A|^2 with A scaled by |Re A| + |Im A| first: |A|^2 underflows in float32 where |A| < 1e-19
    # (a decay rate that small on a mode with Im A = 0, S4D-Lin's first), which the fast path's complex division
    # does not
    scale = a_im.abs() - a_re  # (Re A < 0)
    u_re, u_im = a_re / scale, a_im / scale
    norm = (u_re * u_re + u_im * u_im) * scale
    e_re, e_im = (n_re * u_re + n_im * u_im) / norm, (n_im * u_re - n_re * u_im) / norm
    q_re = b[..., 0] * e_re - b[..., 1] * e_im  # B e
    q_im = b[..., 0] * e_im + b[..., 1] * e_re
    c_re, c_im = c[..., 0], c[..., 1]
    if mask is not None:
        c_re, c_im = c_re * mask, c_im * mask
    ct_re, ct_im = c_re * q_re - c_im * q_im, c_re * q_im + c_im * q_re  # (K, H, N2)
    steps = torch.arange(length, device=log_dt.device, dtype=log_dt.dtype)
    mag = (x[..., None] * steps).exp()  # (H, N2, L)
    phase = y[..., None] * steps
    return 2 * (torch.einsum('khn,hnl->khl', ct_re, mag * phase.cos())
                - torch.einsum('khn,hnl->khl', ct_im, mag * phase.sin()))


def _toeplitz(k: torch.Tensor, n, pool: int, transposed: bool = False) -> torch.Tensor:
    """(C, n // pool, n) matrices T[c, i, j] = mean over r < pool of k[c, pool i + r - j + n - 1] of the
    (C, 2n - 1) two-sided taps (the rows of the Toeplitz matrix averaged in windows of `pool`, a trailing remainder
    dropped, like AvgPool), gathered from the taps averaged in sliding windows of `pool`; (C, n, n // pool) with
    `transposed`."""
    if pool > 1:
        k = F.avg_pool1d(k.unsqueeze(1), pool, stride=1).squeeze(1)  # (C, 2n - pool)
    rows = torch.arange(n // pool, device=k.device) * pool
    cols = torch.arange(n, device=k.device)
    index = rows[None, :] - cols[:, None] if transposed else rows[:, None] - cols[None, :]
    return k[:, index + (n - 1)]


def _apply_axis(z: torch.Tensor, k: torch.Tensor, dim: int, pool: int) -> torch.Tensor:
    """The two-sided taps k (C, 2n - 1) applied along `dim` (length n) of a (C, ...) tensor z as a Toeplitz
    product, pooled by `pool`: on the first axis after the channels and on the last one a batched product with z
    as it is (no transposing copy in or out), elsewhere with that axis moved last."""
    n = z.shape[dim]
    if dim == 1 and dim < z.ndim - 1:
        t = _toeplitz(k, n, pool)
        return torch.matmul(t, z.flatten(2)).reshape(z.shape[:1] + (t.shape[1],) + z.shape[2:])
    t = _toeplitz(k, n, pool, transposed=True)
    moved = z.movedim(dim, -1)  # (a view, no copy, on the last axis)
    y = torch.matmul(moved.flatten(1, -2), t)
    return y.reshape(moved.shape[:-1] + (t.shape[2],)).movedim(-1, dim)


def _avg_pool(z: torch.Tensor, dim: int, pool: int) -> torch.Tensor:
    """Average pooling by `pool` (window = stride, a trailing remainder dropped) along `dim`, as a mean over a
    split axis (no transposing copy)."""
    if pool == 1:
        return z
    windows = z.shape[dim] // pool
    return z.narrow(dim, 0, windows * pool).unflatten(dim, (windows, pool)).mean(dim + 1)


def separable_conv_reference(
        u: torch.Tensor,
        kernels: Sequence[torch.Tensor],
        dims: Sequence[int],
        pools: Sequence[int],
        skip: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """sum_r (k_1[r] (x) ... (x) k_N[r]) * u + skip * pool(u), pooled, for u of shape (C, ...) whose spatial
    axes are `dims` (same math as `ops.separable_conv`, any layout with channels first).

    Args:
        kernels: per axis, (R, C, 2n - 1) two-sided kernels.
        pools: per axis, the average pooling window (and stride).
        skip: optional (C,) skip weights.
    """
    y = None
    if skip is not None:
        y = u
        for dim, pool in zip(dims, pools):
            y = _avg_pool(y, dim, pool)
        y = skip.reshape((-1,) + (1,) * (u.ndim - 1)) * y
    for r in range(kernels[0].shape[0]):
        z = u
        for dim, k, pool in zip(dims, kernels, pools):
            z = _apply_axis(z, k[r], dim, pool)
        y = z if y is None else y + z
    return y
