"""Exact non-circular depthwise convolution with separable (per-axis) kernels.

A two-sided kernel for an axis of length n holds offsets -(n-1)..(n-1) (length 2n - 1, offset o at
index o + n - 1): y[i] = sum_j k[i - j] x[j]. Two exact algorithms, chosen per axis length:
a Toeplitz matrix product (GEMM speed, best for short axes shared by many rows) and a zero-padded
FFT (N log N), chosen per axis by `choose_algorithm`.
"""
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ['two_sided_kernel', 'channel_major', 'channels_first', 'separable_conv', 'avg_pool_axes', 'choose_algorithm']

# Algorithm rule, measured on this CPU (fwd+bwd of one axis, 128 channels, 1 thread): the Toeplitz
# product was 3-5x faster than the FFT at lengths 64..256 when the matrix of each channel is shared
# by many rows (the other axes times the batch: 2D images), but up to 17x slower when few rows share
# it (a 1D sequence of 196 with batch 4: building the n x n matrix dominates). Toeplitz/FFT time was
# 1.12 at rows = n/2 (n=32), 0.72 at rows = n (n=64), 1.13 at rows = n/3 and 0.28 at rows = 1.3 n (n=196).
TOEPLITZ_MAX_LEN = 256  # longer axes always use the FFT
TOEPLITZ_MIN_ROWS = 0.75  # Toeplitz needs at least this many rows per matrix, per unit of axis length
FORCE_ALGORITHM: Optional[str] = None  # 'toeplitz' or 'fft' for every axis (tests, benchmarks); None = the rule


def choose_algorithm(n: int, rows: int) -> str:
    """'toeplitz' or 'fft' for an axis of length `n` whose per-channel matrix multiplies `rows` vectors."""
    if FORCE_ALGORITHM is not None:
        return FORCE_ALGORITHM
    return 'toeplitz' if n <= TOEPLITZ_MAX_LEN and rows >= TOEPLITZ_MIN_ROWS * n else 'fft'


def two_sided_kernel(k_fwd: torch.Tensor, k_bwd: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Place kernels on offsets -(n-1)..(n-1) of an axis of length n.

    Args:
        k_fwd: (..., L) taps for offsets 0..L-1.
        k_bwd: (..., L) taps for offsets -1..-L, or None for a causal kernel.
        n: axis length; taps beyond offset n - 1 never touch the input and are dropped.

    Returns:
        (..., 2n - 1) kernel, offset o at index o + n - 1.
    """
    right = F.pad(k_fwd[..., :n], (0, n - min(k_fwd.shape[-1], n)))
    if k_bwd is None:
        left = right.new_zeros(right.shape[:-1] + (n - 1,))
    else:
        left = F.pad(k_bwd[..., : n - 1], (0, n - 1 - min(k_bwd.shape[-1], n - 1))).flip(-1)
    return torch.cat([left, right], dim=-1)


def _toeplitz_index(n: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return i[:, None] - i[None, :] + (n - 1)


def _avg_pool_axis(y: torch.Tensor, dim: int, pool: int) -> torch.Tensor:
    """Average non-overlapping windows of `pool` along `dim` (a trailing remainder is dropped, like AvgPool)."""
    if pool == 1:
        return y
    m = y.shape[dim] // pool
    return y.narrow(dim, 0, m * pool).unflatten(dim, (m, pool)).mean(dim + 1)


def _toeplitz_conv(u: torch.Tensor, k: torch.Tensor, dim: int, pool: int = 1) -> torch.Tensor:
    """Along `dim` of a channel-major u (C, ...) with k (C, 2n - 1), then average pooling by `pool`,
    as one batched GEMM (the pooling folds into the Toeplitz matrix: fewer rows, less work)."""
    c, n = u.shape[0], u.shape[dim]
    prefix = math.prod(u.shape[1:dim])
    suffix = math.prod(u.shape[dim + 1:])
    t = _avg_pool_axis(k[:, _toeplitz_index(n, k.device)], 1, pool)  # (C, m, n), t[c, i, j] = k[c, i - j] pooled over i
    m = t.shape[1]
    if suffix == 1:  # last axis: (C, P, n) @ (C, m, n)^T
        y = torch.bmm(u.reshape(c, prefix, n), t.transpose(1, 2))
    else:  # (C * P, m, n) @ (C * P, n, Q); T repeats over P (small, and only for middle axes of 3D inputs)
        if prefix > 1:
            t = t[:, None].expand(c, prefix, m, n).reshape(c * prefix, m, n)
        y = torch.bmm(t, u.reshape(c * prefix, n, suffix))
    return y.view(u.shape[:dim] + (m,) + u.shape[dim + 1:])


def _fft_conv(u: torch.Tensor, k: torch.Tensor, dim: int, pool: int = 1) -> torch.Tensor:
    """Along `dim` of a channel-major u (C, ...) with k (C, 2n - 1) by a zero-padded FFT, then pooling by `pool`."""
    n = u.shape[dim]
    m = 2 * n  # >= (2n - 1 taps) + (n inputs) - 1: no circular wrap-around
    # circular layout: offsets 0..n-1 at 0..n-1, offset -n (zero) at n, offsets -(n-1)..-1 at n+1..2n-1
    k_circ = torch.cat([k[:, n - 1:], k.new_zeros(k.shape[0], 1), k[:, : n - 1]], dim=-1)
    k_f = torch.fft.rfft(k_circ, n=m)  # (C, m // 2 + 1)
    k_f = k_f.reshape(k_f.shape[:1] + (1,) * (dim - 1) + k_f.shape[1:] + (1,) * (u.ndim - dim - 1))
    y = torch.fft.irfft(torch.fft.rfft(u, n=m, dim=dim) * k_f, n=m, dim=dim)
    return _avg_pool_axis(y.narrow(dim, 0, n), dim, pool)


def channel_major(x: torch.Tensor) -> torch.Tensor:
    """(B, C, S_1, ..., S_N) -> contiguous (C, S_1, ..., S_{N-1}, B, S_N), the working layout in which
    the contractions along the first and the last spatial axis are single batched GEMMs (or FFTs)."""
    nd = x.ndim - 2
    return x.permute([1] + list(range(2, nd + 1)) + [0, nd + 1]).contiguous()


def channels_first(u: torch.Tensor) -> torch.Tensor:
    """Inverse of `channel_major` (a view): (C, S_1, ..., S_{N-1}, B, S_N) -> (B, C, S_1, ..., S_N)."""
    nd = u.ndim - 2
    return u.permute([nd, 0] + list(range(1, nd)) + [nd + 1])


def _spatial_dims(u: torch.Tensor) -> List[int]:
    """Positions of the spatial axes 1..N in the channel-major layout."""
    nd = u.ndim - 2
    return list(range(1, nd)) + [nd + 1]


def avg_pool_axes(u: torch.Tensor, pools: Sequence[int]) -> torch.Tensor:
    """Average pooling of a channel-major tensor by pools[a] along spatial axis a."""
    for dim, pool in zip(_spatial_dims(u), pools):
        u = _avg_pool_axis(u, dim, pool)
    return u


def separable_conv(
        u: torch.Tensor,
        kernels: Sequence[torch.Tensor],
        pools: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Depthwise N-D convolution with a sum of separable (outer product) kernels, optionally average-pooled.

    Args:
        u: channel-major input (see `channel_major`), N spatial axes.
        kernels: per axis, (R, C, 2n - 1) two-sided kernels of R rank-1 terms.
        pools: per axis, average pooling window (and stride) applied to the result; None = no pooling.

    Returns:
        Channel-major result, spatial sizes s // pool: the sum over r of u convolved with
        kernels[0][r] (x) ... (x) kernels[N-1][r].
    """
    pools = pools or (1,) * len(kernels)
    y = None
    for term in range(kernels[0].shape[0]):
        z = u
        for dim, k, pool in zip(_spatial_dims(u), kernels, pools):
            n = z.shape[dim]
            conv = _toeplitz_conv if choose_algorithm(n, z.numel() // (z.shape[0] * n)) == 'toeplitz' else _fft_conv
            z = conv(z, k[term], dim, pool)
        y = z if y is None else y + z
    return y
