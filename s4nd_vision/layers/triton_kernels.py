"""S4D kernel generation of many (layer, axis) entries in one Triton launch (and one for the backward).

Every entry (an `SSMKernel` with its own length and rate) contributes its channels as rows of one packed
problem. The per-mode discretization is a handful of elementwise ops on the stacked (rows, N/2) parameters,
the same number whatever the number of entries (differentiated by autograd); the heavy part, the sum over
modes for every tap (zero-order hold, see `ssm_kernel` and `reference.ssm_kernel_reference`),

    K[k, r, l] = 2 sum_n exp(x[r, n] l) (Re C~[k, r, n] cos(y[r, n] l) - Im C~[k, r, n] sin(y[r, n] l)),
    x + i y = dt A (dt including the entry's rate), l < length[r],

is one Triton kernel over (row, block of taps), written into a (K, rows, max length) buffer zero beyond each
row's length, and its backward (the gradients of x, y and C~, sums over the taps) one more.
"""
import functools
import math
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from .ssm_kernel import SSMKernel, mode_masks, per_kernel

__all__ = ['ssm_kernels_fused', 'two_sided_kernels_fused', 'vandermonde']


@triton.jit
def _vandermonde_fwd(x_ptr, y_ptr, cre_ptr, cim_ptr, len_ptr, out_ptr, R, N2, LMAX, K,
                     BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N2
    length = tl.load(len_ptr + row)
    x = tl.load(x_ptr + row * N2 + n, mask=n_ok, other=0.0)
    y = tl.load(y_ptr + row * N2 + n, mask=n_ok, other=0.0)
    lf = l.to(tl.float32)[:, None]
    mag = tl.exp(x[None, :] * lf)
    cos = mag * tl.cos(y[None, :] * lf)
    sin = mag * tl.sin(y[None, :] * lf)
    inside = l < length
    for k in range(K):
        c_re = tl.load(cre_ptr + (k * R + row) * N2 + n, mask=n_ok, other=0.0)
        c_im = tl.load(cim_ptr + (k * R + row) * N2 + n, mask=n_ok, other=0.0)
        val = 2 * tl.sum(c_re[None, :] * cos - c_im[None, :] * sin, axis=1)
        tl.store(out_ptr + (k * R + row) * LMAX + l, tl.where(inside, val, 0.0), mask=l < LMAX)


@triton.jit
def _vandermonde_bwd(x_ptr, y_ptr, cre_ptr, cim_ptr, len_ptr, g_ptr, gx_ptr, gy_ptr, gcre_ptr, gcim_ptr,
                     R, N2, LMAX, K, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N2
    length = tl.load(len_ptr + row)
    x = tl.load(x_ptr + row * N2 + n, mask=n_ok, other=0.0)
    y = tl.load(y_ptr + row * N2 + n, mask=n_ok, other=0.0)
    g_x = tl.zeros([BLOCK_N], dtype=tl.float32)
    g_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(K):
        c_re = tl.load(cre_ptr + (k * R + row) * N2 + n, mask=n_ok, other=0.0)
        c_im = tl.load(cim_ptr + (k * R + row) * N2 + n, mask=n_ok, other=0.0)
        s_cos = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_l g l^0 mag cos, and with l^1
        s_sin = tl.zeros([BLOCK_N], dtype=tl.float32)
        t_cos = tl.zeros([BLOCK_N], dtype=tl.float32)
        t_sin = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, length, BLOCK_L):
            l = start + tl.arange(0, BLOCK_L)
            g = tl.load(g_ptr + (k * R + row) * LMAX + l, mask=l < length, other=0.0).to(tl.float32)
            lf = l.to(tl.float32)[:, None]
            mag = tl.exp(x[None, :] * lf)
            cos = g[:, None] * mag * tl.cos(y[None, :] * lf)
            sin = g[:, None] * mag * tl.sin(y[None, :] * lf)
            s_cos += tl.sum(cos, axis=0)
            s_sin += tl.sum(sin, axis=0)
            t_cos += tl.sum(cos * lf, axis=0)
            t_sin += tl.sum(sin * lf, axis=0)
        tl.store(gcre_ptr + (k * R + row) * N2 + n, 2 * s_cos, mask=n_ok)
        tl.store(gcim_ptr + (k * R + row) * N2 + n, -2 * s_sin, mask=n_ok)
        # d/dx of exp(x l) (...) is l times it; d/dy of (c_re cos - c_im sin) is -(c_re sin + c_im cos), times l
        g_x += 2 * (c_re * t_cos - c_im * t_sin)
        g_y -= 2 * (c_re * t_sin + c_im * t_cos)
    tl.store(gx_ptr + row * N2 + n, g_x, mask=n_ok)
    tl.store(gy_ptr + row * N2 + n, g_y, mask=n_ok)


def _blocks(n2: int, lmax: int):
    return min(64, triton.next_power_of_2(max(lmax, 1))), triton.next_power_of_2(n2)


@torch.library.custom_op('s4nd_vision::ssm_vandermonde', mutates_args=())
def _vandermonde_op(x: torch.Tensor, y: torch.Tensor, c_re: torch.Tensor, c_im: torch.Tensor,
                    lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    k, r, n2 = c_re.shape
    out = torch.empty((k, r, max_length), device=x.device, dtype=torch.float32)
    block_l, block_n = _blocks(n2, max_length)
    _vandermonde_fwd[(r, triton.cdiv(max_length, block_l))](
        x, y, c_re, c_im, lengths, out, r, n2, max_length, k, BLOCK_L=block_l, BLOCK_N=block_n)
    return out


@_vandermonde_op.register_fake
def _(x, y, c_re, c_im, lengths, max_length):
    return x.new_empty((c_re.shape[0], c_re.shape[1], max_length))


@torch.library.custom_op('s4nd_vision::ssm_vandermonde_backward', mutates_args=())
def _vandermonde_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c_re: torch.Tensor,
                             c_im: torch.Tensor, lengths: torch.Tensor
                             ) -> List[torch.Tensor]:
    k, r, n2 = c_re.shape
    grad = grad.contiguous()
    g_x, g_y = torch.empty_like(x), torch.empty_like(y)
    g_re, g_im = torch.empty_like(c_re), torch.empty_like(c_im)
    block_l, block_n = _blocks(n2, grad.shape[-1])
    _vandermonde_bwd[(r,)](x, y, c_re, c_im, lengths, grad, g_x, g_y, g_re, g_im, r, n2, grad.shape[-1], k,
                           BLOCK_L=block_l, BLOCK_N=block_n)
    return [g_x, g_y, g_re, g_im]


@_vandermonde_backward_op.register_fake
def _(grad, x, y, c_re, c_im, lengths):
    return [torch.empty_like(x), torch.empty_like(y), torch.empty_like(c_re), torch.empty_like(c_im)]


def _setup_context(ctx, inputs, output):
    x, y, c_re, c_im, lengths, _ = inputs
    ctx.save_for_backward(x, y, c_re, c_im, lengths)


def _backward(ctx, grad):
    g_x, g_y, g_re, g_im = _vandermonde_backward_op(grad, *ctx.saved_tensors)
    return g_x, g_y, g_re, g_im, None, None


_vandermonde_op.register_autograd(_backward, setup_context=_setup_context)


def vandermonde(x: torch.Tensor, y: torch.Tensor, c_re: torch.Tensor, c_im: torch.Tensor,
                lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """K[k, r, l] = 2 sum_n exp(x l) (c_re cos(y l) - c_im sin(y l)) for l < lengths[r], else 0.

    Args:
        x, y: (R, N2) float32, dt A per row (real and imaginary parts).
        c_re, c_im: (K, R, N2) float32, C~ = C B expm1(dt A) / A.
        lengths: (R,) int32 taps per row; max_length: the output's last size (>= every length).

    Returns:
        (K, R, max_length) float32.
    """
    tensors = [t.float().contiguous() for t in (x, y, c_re, c_im)]
    return _vandermonde_op(*tensors, lengths.to(torch.int32).contiguous(), int(max_length))


def _kept(make):
    """`make(*key, device)` kept per (key, device) for the next steps: constants a step needs on its device, made
    there (no host-to-device copy, so a training step stays capturable in a CUDA graph). Not kept while a CUDA
    graph is captured (its kernels only run at replay) nor for fake tensors (tracing); `like` gives the device."""
    cached = functools.lru_cache(maxsize=64)(make)

    def get(*key, like: torch.Tensor):
        capturing = like.is_cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        return (make if capturing or is_fake(like) else cached)(*key, like.device)
    return get


@_kept
def _row_constants(dims: Tuple[int, ...], lengths: Tuple[int, ...], rates: Tuple[float, ...],
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per packed row, the entry's rate (float32) and length (int32)."""
    rate = torch.cat([torch.full((d,), r, device=device, dtype=torch.float32) for d, r in zip(dims, rates)])
    row_lengths = torch.cat([torch.full((d,), n, device=device, dtype=torch.int32) for d, n in zip(dims, lengths)])
    return rate, row_lengths


@_kept
def _two_sided_index(num_kernels: int, dims: Tuple[int, ...], sizes: Tuple[int, ...], bidirectional: bool,
                     max_length: int, device: torch.device) -> torch.Tensor:
    """Where each value of the entries' two-sided kernels (`ops.two_sided_kernel`), laid out one after another
    (rank, dim, 2 n - 1) each, is in the flattened (num_kernels, rows, max_length) generation buffer followed by
    one zero (index num_kernels * rows * max_length). Offset o >= 0 is tap o of a forward kernel (the first rank),
    o < 0 tap -o - 1 of the backward one (the others), zero for a causal kernel or beyond the buffer."""
    rank, rows = num_kernels // 2 if bidirectional else num_kernels, sum(dims)
    zero = num_kernels * rows * max_length
    parts, first_row = [], 0
    for dim, n in zip(dims, sizes):
        j = torch.arange(rank, device=device)[:, None, None]
        r = first_row + torch.arange(dim, device=device)[None, :, None]
        o = torch.arange(2 * n - 1, device=device)[None, None, :] - (n - 1)
        tap = torch.where(o >= 0, o, -o - 1)
        k = torch.where(o >= 0, j, j + rank)
        ok = (tap < max_length) & ((o >= 0) | bidirectional)
        parts.append(torch.where(ok, (k * rows + r) * max_length + tap, zero).flatten())
        first_row += dim
    return torch.cat(parts)


def _generate(kernels: Sequence[SSMKernel], lengths: Sequence[int], rates: Sequence[float]) -> torch.Tensor:
    """The packed (num_kernels, rows, max length) float32 kernels of every entry (rows: the entries' channels in
    order), zero beyond each entry's length."""
    first = kernels[0]
    if any(not isinstance(k, SSMKernel) for k in kernels):
        raise ValueError('fused kernel generation takes SSMKernel (S4D) entries only')
    if any((k.d_state, k.num_kernels) != (first.d_state, first.num_kernels) for k in kernels):
        raise ValueError('fused kernel generation needs one d_state and one num_kernels for every entry, got '
                         f'{[(k.d_state, k.num_kernels) for k in kernels]}')
    f32 = torch.float32
    dims = [k.dim for k in kernels]
    log_dt = torch.cat([k.log_dt.to(f32) for k in kernels])
    rate, row_lengths = _row_constants(tuple(dims), tuple(int(n) for n in lengths), tuple(float(r) for r in rates),
                                       like=log_dt)
    a_re = -torch.cat([k.log_a_real.to(f32) for k in kernels]).exp()
    a_im = torch.cat([k.a_imag.to(f32) for k in kernels])
    b = torch.cat([k.b.to(f32) for k in kernels])
    c = per_kernel(torch.cat([k.c.to(f32) for k in kernels]), sum(dims))  # (K, rows, N2, 2)
    mask = mode_masks(kernels)
    if mask is not None:
        c = c * mask.to(f32)[None, :, :, None]
    dt = (log_dt.exp() * rate)[:, None]
    x, y = dt * a_re, dt * a_im
    # e = expm1(dt A) / A, with expm1(x + iy) = expm1(x) cos y - 2 sin^2(y / 2) + i exp(x) sin y
    s = (0.5 * y).sin()
    n_re, n_im = torch.expm1(x) * y.cos() - 2 * s * s, x.exp() * y.sin()
    norm = a_re * a_re + a_im * a_im
    e_re, e_im = (n_re * a_re + n_im * a_im) / norm, (n_im * a_re - n_re * a_im) / norm
    q_re, q_im = b[..., 0] * e_re - b[..., 1] * e_im, b[..., 0] * e_im + b[..., 1] * e_re
    ct_re = c[..., 0] * q_re - c[..., 1] * q_im
    ct_im = c[..., 0] * q_im + c[..., 1] * q_re
    return vandermonde(x, y, ct_re, ct_im, row_lengths, max(lengths))


def ssm_kernels_fused(
        kernels: Sequence[SSMKernel],
        lengths: Sequence[int],
        rates: Sequence[float],
        dtype: torch.dtype = torch.float32,
) -> List[torch.Tensor]:
    """`ssm_kernel.ssm_kernels` for S4D kernels sharing d_state and num_kernels, generated in one launch.

    Returns:
        per entry, a (num_kernels, dim, length) tensor of `dtype` (computed in float32).
    """
    if not kernels:
        return []
    out = _generate(kernels, lengths, rates)
    return [o[..., :n].to(dtype) for o, n in zip(out.split([k.dim for k in kernels], dim=1), lengths)]


def two_sided_kernels_fused(
        kernels: Sequence[SSMKernel],
        lengths: Sequence[int],
        rates: Sequence[float],
        sizes: Sequence[int],
        bidirectional: bool,
        dtype: torch.dtype = torch.float32,
) -> List[torch.Tensor]:
    """The two-sided kernels (`ops.two_sided_kernel`) of S4D kernels sharing d_state, num_kernels and direction,
    on axes of `sizes`: one generation launch and one gather for all entries, forward and backward (a number of
    ops that does not grow with the entries). Bidirectional entries hold rank forward then rank backward kernels.

    Returns:
        per entry, a (rank, dim, 2 n - 1) tensor of `dtype` (computed in float32).
    """
    if not kernels:
        return []
    out = _generate(kernels, lengths, rates)
    dims, num_kernels = tuple(k.dim for k in kernels), kernels[0].num_kernels
    index = _two_sided_index(num_kernels, dims, tuple(int(n) for n in sizes), bool(bidirectional), out.shape[-1],
                             like=out)
    packed = torch.cat([out.flatten(), out.new_zeros(1)])[index].to(dtype)
    rank = num_kernels // 2 if bidirectional else num_kernels
    shapes = [(rank, d, 2 * n - 1) for d, n in zip(dims, sizes)]
    return [p.view(shape) for p, shape in zip(packed.split([math.prod(s) for s in shapes]), shapes)]
