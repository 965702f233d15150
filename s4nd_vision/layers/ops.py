"""Exact non-circular depthwise convolution with separable (per-axis) kernels.

A two-sided kernel for an axis of length n holds offsets -(n-1)..(n-1) (length 2n - 1, offset o at
index o + n - 1): y[i] = sum_j k[i - j] x[j]. Two exact algorithms, chosen per axis length:
a Toeplitz matrix product (GEMM speed, best for short axes shared by many rows) and a zero-padded
FFT (N log N), chosen per axis by `choose_algorithm`.
"""
import contextlib
import functools
import math
import numbers
import threading
from contextvars import ContextVar
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .reference import separable_conv_reference, use_reference

__all__ = [
    'two_sided_kernel', 'channel_major', 'channels_first', 'channel_major_memory', 'separable_conv', 'project',
    'conv_algorithms', 'conv_operators', 'apply_operators', 'avg_pool_axes', 'choose_algorithm', 'conv_algorithm',
    'forced_algorithm', 'ALGORITHMS', 'DepthwiseConv', 'DEPTHWISE_MAX_LEN', 'projection_chunks',
    'PROJECTION_CHUNK_BYTES', 'FFT_CHUNK_BYTES', 'autocast_off', 'autocast_enabled',
    'recompute_for_memory', 'backward_without_autocast', 'first_order_backward', 'module_parameter',
]

# The per-axis rule. Building an n x n Toeplitz matrix per channel costs O(n^2) and pays off only when
# many rows share it (the other axes times the batch: 2D images), where the GEMM beats the FFT; with few
# rows per matrix (a long 1D sequence, a small batch) building the matrix dominates and the FFT wins.
# Beyond a few hundred taps the FFT's n log n wins whatever the rows.
ALGORITHMS = ('toeplitz', 'fft')
TOEPLITZ_MAX_LEN = 256  # longer axes always use the FFT
TOEPLITZ_MIN_ROWS = 0.75  # Toeplitz needs at least this many rows per matrix, per unit of axis length
# CPU inference on 2D or 3D channels-last input: `DepthwiseConv` up to this side where PyTorch's CPU kernels use
# AVX-512, where it beat the Toeplitz GEMMs on every VM measured; beyond it an earlier VM's depthwise convolutions fell
# off (README "2-core CPU"). Other CPUs: `dispatch.depthwise_max_side`.
DEPTHWISE_MAX_LEN = 64
# From this many output rows (H // pool) on, `DepthwiseConv` convolves the H axis as the last axis of a view whose
# channels are the (column, channel) pairs (`_conv_rows`): oneDNN's depthwise convolution along the contiguous last axis
# ran faster than along H from 24 rows on, slower below (README "2-core CPU")
DEPTHWISE_ROWS_VIEW_MIN = 24
PROJECTION_CHUNK_BYTES = 8 * 2 ** 20  # a fused projection is made this much at a time (`projection_chunks`)
# The FFT path (`_FFTAxis.apply`) transforms at most this much spectrum at a time (a group of channels): its
# temporaries, each about twice the input's size, stay bounded at large inputs (the stem at thousands of pixels)
FFT_CHUNK_BYTES = 32 * 2 ** 20
# On the CPU, a fused projection whose first axis is at most this long (a clip's frames, not an image's rows) is
# multiplied together with that axis' Toeplitz matrix, one GEMM (`_projected_first_axis`): the full-resolution
# projection, a memory-bound pass written and read once more, is never made, for C_in times the axis' multiply-adds
# (faster up to 16, slower at 32: README "2-core CPU")
PROJECTED_AXIS_MAX_LEN = 16
# Input channels up to which the backward pass of a fused projection whose input needs no gradient skips forming the
# projection's gradient (`_projection_params_backward`): its GEMM grows with them, the general pass's does not
# (the crossover, measured on the CPU: README, "2-core CPU")
PROJECTION_PARAMS_MAX_IN = 6
# Taps below this magnitude are dropped from the CPU's operators (`flush_tiny`): a decayed kernel's far taps reach
# 1e-40 on long axes, and their products with activations fall in the denormal range, which x86 CPUs compute
# 10-100 times slower than normal numbers (the stem's Toeplitz GEMMs took 1.3-1.8x as long, README "2-core CPU").
FLUSH_BELOW = 2.0 ** -100  # (~7.9e-31: a dropped tap changes a sum of O(1) terms ~1e23 below float32 rounding)


class ForcedChoice:
    """A choice forced within a context (`forced(value)`), None outside any. Eager code reads it from a
    ContextVar (per thread and asyncio task); code that torch.compile captures reads a process-wide mirror,
    which dynamo guards on (a graph captured under one value is recompiled under another), since dynamo before
    torch 2.14 cannot trace `ContextVar.get` (a graph break in every S4ND layer: `fullgraph=True` fails). Threads
    that force different values while compiling may see each other's while their contexts overlap."""

    def __init__(self, name: str):
        self._var: ContextVar[Optional[str]] = ContextVar(name, default=None)
        self.value: Optional[str] = None  # the mirror: the value of the context entered last of those still open
        self._open: List[list] = []  # [value] per open context, of every thread, in the order entered
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def forced(self, value: Optional[str]) -> Iterator[None]:
        token, entry = self._var.set(value), [value]
        with self._lock:
            self._open.append(entry)
            self.value = value
        try:
            yield
        finally:
            self._var.reset(token)
            # (from the contexts still open, of any thread: restoring the value on entry would leave a closed
            # context's value set when two threads' contexts overlap without nesting)
            with self._lock:
                self._open = [e for e in self._open if e is not entry]
                self.value = self._open[-1][0] if self._open else None

    def get(self) -> Optional[str]:
        return self.value if torch.compiler.is_compiling() else self._var.get()


_FORCED_ALGORITHM = ForcedChoice('s4nd_conv_algorithm')


@contextlib.contextmanager
def conv_algorithm(algorithm: Optional[str]) -> Iterator[None]:
    """Within this context every S4ND axis is convolved by `algorithm`, 'toeplitz' or 'fft' (None: the rule of
    `choose_algorithm`), e.g. to compare or count the two: CPU inference takes the fast path, not the depthwise
    convolutions (`dispatch`). A backward pass uses the algorithms of its forward."""
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ValueError(f'algorithm must be one of {ALGORITHMS} or None, got {algorithm!r}')
    with _FORCED_ALGORITHM.forced(algorithm):
        yield


def forced_algorithm() -> Optional[str]:
    """The algorithm of an enclosing `conv_algorithm` context, or None."""
    return _FORCED_ALGORITHM.get()


def choose_algorithm(n: int, rows: int) -> str:
    """'toeplitz' or 'fft' for an axis of length `n` whose per-channel matrix multiplies `rows` vectors
    (the one of an enclosing `conv_algorithm` context, if any)."""
    forced = forced_algorithm()
    if forced is not None:
        return forced
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
    right = _first_taps(k_fwd, n)
    left = right.new_zeros(right.shape[:-1] + (n - 1,)) if k_bwd is None else _first_taps(k_bwd, n - 1).flip(-1)
    return torch.cat([left, right], dim=-1)


def _first_taps(k: torch.Tensor, m: int) -> torch.Tensor:
    """The first m taps of k (..., L), zero-padded when L < m: one pad, negative where it crops, with no branch on
    the sizes, so that an exported graph of symbolic sizes needs no guard (a layer's `l_max` makes L = min(n, l_max /
    rate), whose comparison with m held at the traced size only)."""
    return F.pad(k, (0, m - k.shape[-1]))


def _toeplitz_index(m: int, n: int, pool: int, device: torch.device) -> torch.Tensor:
    """(m, n) tap index of the first row of each pooling window: T[c, r * pool, j] = k[c, index[r, j]]."""
    return (torch.arange(m, device=device) * pool)[:, None] - torch.arange(n, device=device)[None, :] + (n - 1)


def _avg_pool_axis(y: torch.Tensor, dim: int, pool: int) -> torch.Tensor:
    """Average non-overlapping windows of `pool` along `dim` (a trailing remainder is dropped, like AvgPool)."""
    if pool == 1:
        return y
    # the sum of the windows' strided slices, then one division: `mean` over a short inner axis reads the
    # windows element by element and costs several times more on the CPU (see the README's inference notes)
    windows = y.narrow(dim, 0, y.shape[dim] // pool * pool).unflatten(dim, (-1, pool))
    out = windows.select(dim + 1, 0) + windows.select(dim + 1, 1)
    for i in range(2, pool):
        out.add_(windows.select(dim + 1, i))
    return out.div_(pool)


def _avg_pool_axis_adjoint(g: torch.Tensor, dim: int, pool: int, n: int) -> torch.Tensor:
    """Transpose of `_avg_pool_axis` for an axis of length n: spread each value over its window, / pool."""
    if pool == 1:
        return g
    g = g.repeat_interleave(pool, dim=dim) / pool
    pad = n - g.shape[dim]
    return g if pad == 0 else torch.cat([g, g.new_zeros(g.shape[:dim] + (pad,) + g.shape[dim + 1:])], dim=dim)


def _shape3(z: torch.Tensor, dim: int) -> tuple:
    """(C, prefix, suffix): channel-major z seen as (C, prefix, n, suffix) around `dim`."""
    return z.shape[0], math.prod(z.shape[1:dim]), math.prod(z.shape[dim + 1:])


def flush_tiny(k: torch.Tensor) -> torch.Tensor:
    """Kernel taps k with those below `FLUSH_BELOW` in magnitude set to zero (a new tensor), on the CPU in float32
    and narrower dtypes; k itself elsewhere (GPUs compute denormals at full speed; float64's range ends at 1e-308).
    Applied to the taps, not to the operators built from them: a fraction of the elements."""
    if k.device.type != 'cpu' or k.dtype == torch.float64:
        return k
    return torch.where(k.abs() < FLUSH_BELOW, 0.0, k)


def _gemm(a: torch.Tensor, b: torch.Tensor, acc: Optional[torch.Tensor]) -> torch.Tensor:
    """a @ b, or acc += a @ b in place (the GEMM accumulates: no copy of acc, no separate add)."""
    return torch.bmm(a, b) if acc is None else acc.baddbmm_(a, b)


def _add_pool_adjoint_(
        target: torch.Tensor, s: torch.Tensor, dims: Sequence[int], pools: Sequence[int]) -> torch.Tensor:
    """target += the transpose of average pooling by pools[a] along dims[a] (increasing) applied to s, in place:
    s is spread (each value over its window, / pool) along every pooled axis but the outermost, which takes
    a broadcast add into target (contiguous inner blocks), so no full-size spread tensor is materialized."""
    (first, pool), *rest = [(dim, p) for dim, p in zip(dims, pools) if p > 1]
    for dim, p in rest:
        s = _avg_pool_axis_adjoint(s, dim, p, target.shape[dim])
    m = s.shape[first]
    target.narrow(first, 0, m * pool).unflatten(first, (m, pool)).add_(s.unsqueeze(first + 1), alpha=1 / pool)
    return target


class _ToeplitzAxis:
    """Convolution along one axis as a batched Toeplitz GEMM, average pooling folded into the matrix rows
    (fewer rows, less work). k: (C, 2n - 1); T[c, i, j] = k[c, i - j + n - 1], rows pooled by `pool`."""

    def __init__(self, k: torch.Tensor, n: int, pool: int):
        self.n, self.pool = n, pool
        m = n // pool
        # sliding windows of the reversed taps are T's rows in reverse order: rev[c, r, j] = T[c, n - 1 - r, j]
        # (a strided view, cheaper to materialize than a gather); rows are pooled before the flip
        rev = flush_tiny(k).flip(-1).unfold(1, n, 1)
        if pool > 1:  # AvgPool drops the last rows of T, i.e. the first of rev
            rev = rev.narrow(1, n - m * pool, m * pool).unflatten(1, (m, pool)).mean(2)
        self.t = rev.flip(1)  # (C, m, n)

    def _bmm(self, t: torch.Tensor, z: torch.Tensor, dim: int, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """t (C, rows, cols) applied along `dim` of z (length cols), plus `acc` (shaped like the result, a temporary
        the caller owns) if given: the GEMM accumulates into it in place, one pass fewer than adding afterwards."""
        c, prefix, suffix = _shape3(z, dim)
        rows, cols = t.shape[1:]
        # (a last axis as (T @ z^T)^T would run a faster GEMM on small axes, but its strided result slows
        # every op that follows, so the result is computed contiguous)
        if suffix == 1:  # last axis: (C, P, cols) @ (C, rows, cols)^T
            acc = None if acc is None else acc.reshape(c, prefix, rows)
            y = _gemm(z.reshape(c, prefix, cols), t.transpose(1, 2), acc)
        else:  # (C * P, rows, cols) @ (C * P, cols, Q); T repeats over P (only for middle axes of 3D inputs)
            if prefix > 1:
                t = t[:, None].expand(c, prefix, rows, cols).reshape(c * prefix, rows, cols)
            acc = None if acc is None else acc.reshape(c * prefix, rows, suffix)
            y = _gemm(t, z.reshape(c * prefix, cols, suffix), acc)
        return y.reshape(z.shape[:dim] + (rows,) + z.shape[dim + 1:])  # a view

    def apply(self, z: torch.Tensor, dim: int, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z convolved (and pooled) along `dim`, plus `acc` if given (which may be overwritten)."""
        return self._bmm(self.t, z, dim, acc)

    def backward(self, z: torch.Tensor, g: torch.Tensor, dim: int, acc: Optional[torch.Tensor] = None) -> tuple:
        """Gradients of the (C, 2n - 1) taps and of the axis input z (plus `acc` if given), given the output
        gradient g."""
        return self._kernel_grad(z, g, dim), self._bmm(self.t.transpose(1, 2), g, dim, acc)

    def _kernel_grad(self, z: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
        c, prefix, suffix = _shape3(z, dim)
        n, m = self.n, self.t.shape[1]
        if suffix == 1:  # sum over rows of g^T z: (C, m, P) @ (C, P, n)
            grad_t = torch.bmm(g.reshape(c, prefix, m).transpose(1, 2), z.reshape(c, prefix, n))
        else:  # (C * P, m, Q) @ (C * P, Q, n), summed over P
            grad_t = torch.bmm(g.reshape(c * prefix, m, suffix), z.reshape(c * prefix, n, suffix).transpose(1, 2))
            grad_t = grad_t.view(c, prefix, m, n).sum(1)
        return self.taps_grad(grad_t)

    def taps_grad(self, grad_t: torch.Tensor) -> torch.Tensor:
        """Gradient of the (C, 2n - 1) taps given that of the (C, m, n) matrix."""
        c, m, n = grad_t.shape
        # each diagonal of the (pooled) matrix sums into its tap; a pooled row r averages the taps of rows
        # r * pool + s, s < pool: its diagonal sums, spread over `pool` neighbouring taps (a box filter)
        index = _toeplitz_index(m, n, self.pool, grad_t.device).flatten()
        grad_k = grad_t.new_zeros(c, 2 * n - 1).index_add_(1, index, grad_t.reshape(c, m * n))
        if self.pool == 1:
            return grad_k
        return F.pad(grad_k, (self.pool - 1, 0)).unfold(1, self.pool, 1).mean(-1)


class _FFTAxis:
    """Convolution along one axis by a zero-padded FFT (no circular wrap-around), then average pooling."""

    def __init__(self, k: torch.Tensor, n: int, pool: int):
        self.n, self.pool, self.m = n, pool, 2 * n  # 2n >= (2n - 1 taps) + (n inputs) - 1
        # circular layout: offsets 0..n-1 at 0..n-1, offset -n (zero) at n, offsets -(n-1)..-1 at n+1..2n-1
        k_circ = torch.cat([k[:, n - 1:], k.new_zeros(k.shape[0], 1), k[:, : n - 1]], dim=-1)
        self.k_f = torch.fft.rfft(k_circ, n=self.m)  # (C, m // 2 + 1)

    def _spectrum(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.fft.rfft(z, n=self.m, dim=dim)

    def _broadcast(self, k_f: torch.Tensor, z: torch.Tensor, dim: int) -> torch.Tensor:
        return k_f.reshape(k_f.shape[:1] + (1,) * (dim - 1) + k_f.shape[1:] + (1,) * (z.ndim - dim - 1))

    def _groups(self, z: torch.Tensor) -> List[Tuple[int, int]]:
        """(start, size) groups of z's channels whose spectra take at most `FFT_CHUNK_BYTES` (at least one channel):
        the padded input, its spectrum, their product and the full-length inverse each take about twice z's memory,
        made whole (a full-resolution stem at 2048 x 2048 px peaked at 3.8 GB for a 0.5 GB input)."""
        c = z.shape[0]
        per_channel = z[:1].numel() // self.n * (self.m // 2 + 1) * 2 * max(z.element_size(), 4)
        step = max(1, FFT_CHUNK_BYTES // max(per_channel, 1))
        return [(start, min(step, c - start)) for start in range(0, c, step)]

    def apply(self, z: torch.Tensor, dim: int, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z convolved (and pooled) along `dim`, plus `acc` if given (which may be overwritten); a group of
        channels at a time (`_groups`)."""
        groups = self._groups(z)
        if len(groups) == 1:
            return self._apply(z, self.k_f, dim, acc)
        out = acc
        for start, size in groups:
            y = self._apply(z.narrow(0, start, size), self.k_f.narrow(0, start, size), dim, None)
            if out is None:
                out = y.new_empty((z.shape[0],) + y.shape[1:])
            (out.narrow(0, start, size).copy_ if acc is None else out.narrow(0, start, size).add_)(y)
        return out

    def _apply(self, z: torch.Tensor, k_f: torch.Tensor, dim: int, acc: Optional[torch.Tensor]) -> torch.Tensor:
        """`apply` for the channels of z, whose kernel spectra are k_f."""
        y = torch.fft.irfft(self._spectrum(z, dim) * self._broadcast(k_f, z, dim), n=self.m, dim=dim)
        y = _avg_pool_axis(y.narrow(dim, 0, self.n), dim, self.pool)
        return y if acc is None else acc.add_(y)

    def backward(self, z: torch.Tensor, g: torch.Tensor, dim: int, acc: Optional[torch.Tensor] = None) -> tuple:
        """Gradients of the (C, 2n - 1) taps (circular cross-correlation of g and z, summed over every row)
        and of the axis input z (correlation of g with the kernel; plus `acc` if given), sharing the spectrum of g;
        a group of channels at a time (`_groups`)."""
        groups = self._groups(z)
        if len(groups) == 1:
            return self._backward(z, g, self.k_f, dim, acc)
        grad_k, grad_z = None, acc
        for start, size in groups:
            part_k, part_z = self._backward(
                z.narrow(0, start, size), g.narrow(0, start, size), self.k_f.narrow(0, start, size), dim, None)
            if grad_k is None:
                grad_k = part_k.new_empty((z.shape[0],) + part_k.shape[1:])
                grad_z = part_z.new_empty(z.shape) if acc is None else acc
            grad_k.narrow(0, start, size).copy_(part_k)
            (grad_z.narrow(0, start, size).copy_ if acc is None else grad_z.narrow(0, start, size).add_)(part_z)
        return grad_k, grad_z

    def _backward(self, z: torch.Tensor, g: torch.Tensor, k_f: torch.Tensor, dim: int,
                  acc: Optional[torch.Tensor]) -> tuple:
        """`backward` for the channels of z and g, whose kernel spectra are k_f."""
        g_f = self._spectrum(_avg_pool_axis_adjoint(g, dim, self.pool, self.n), dim)
        grad_z = torch.fft.irfft(g_f * self._broadcast(k_f.conj(), g, dim), n=self.m, dim=dim)
        grad_z = grad_z.narrow(dim, 0, self.n)
        grad_z = grad_z if acc is None else acc.add_(grad_z)
        cross = (g_f * self._spectrum(z, dim).conj()).movedim(dim, -1)
        grad_circ = torch.fft.irfft(cross.reshape(z.shape[0], -1, cross.shape[-1]).sum(1), n=self.m)  # (C, m)
        n = self.n
        return torch.cat([grad_circ[:, n + 1:], grad_circ[:, :n]], dim=-1), grad_z


def channel_major(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(B, C, S_1, ..., S_N) -> contiguous (C, S_1, ..., S_{N-1}, B, S_N), the working layout in which
    the contractions along the first and the last spatial axis are single batched GEMMs (or FFTs); in `dtype` if
    given, cast by the same copy (off the CPU: one pass instead of a copy, then a cast)."""
    nd = x.ndim - 2
    order = [1] + list(range(2, nd + 1)) + [0, nd + 1]
    if dtype is not None and dtype != x.dtype and x.device.type != 'cpu':
        return x.permute(order).to(dtype, memory_format=torch.contiguous_format)
    if x.device.type == 'cpu' and x.shape[1] > 1 and x.stride(1) == 1:
        # channels-last memory (ConvNeXt blocks hand it on): on the CPU one copy that permutes all axes at once
        # reads or writes with a stride everywhere, which is slow; instead transpose each (S_N, C) block of the
        # rows, then move whole rows of S_N values (timings: README, "2-core CPU")
        b, c, sizes = x.shape[0], x.shape[1], x.shape[2:]
        rows = x.movedim(1, -1).reshape(-1, sizes[-1], c).transpose(1, 2).contiguous()  # (B S_1..S_N-1, C, S_N)
        x = rows.view((b,) + sizes[:-1] + (c, sizes[-1])).movedim(nd, 1)  # (B, C, S_1, ..., S_N), a view
    u = x.permute(order).contiguous()
    return u if dtype is None else u.to(dtype)


def channels_first(u: torch.Tensor) -> torch.Tensor:
    """Inverse of `channel_major` (a view): (C, S_1, ..., S_{N-1}, B, S_N) -> (B, C, S_1, ..., S_N)."""
    nd = u.ndim - 2
    return u.permute([nd, 0] + list(range(1, nd)) + [nd + 1])


def channel_major_memory(x: torch.Tensor) -> Optional[torch.Tensor]:
    """The contiguous channel-major tensor (C, S_1, ..., S_{N-1}, B, S_N) whose `channels_first` view x
    (B, C, S_1, ..., S_N) is, no copy; None when x is laid out otherwise (or has no spatial axis)."""
    if x.ndim < 3:
        return None
    nd = x.ndim - 2
    u = x.permute([1] + list(range(2, nd + 1)) + [0, nd + 1])
    return u if u.is_contiguous() else None


def _spatial_dims(u: torch.Tensor) -> List[int]:
    """Positions of the spatial axes 1..N in the channel-major layout."""
    nd = u.ndim - 2
    return list(range(1, nd)) + [nd + 1]


def is_int(value) -> bool:
    """An integer, and not a bool (True would pass as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def avg_pool_axes(u: torch.Tensor, pools: Sequence[int]) -> torch.Tensor:
    """Average pooling of a channel-major tensor by pools[a] along spatial axis a (window = stride, remainder
    dropped, like AvgPool)."""
    dims = _spatial_dims(u)
    # (zip would leave the axes after a short `pools` unpooled, silently; a pool of 0 divided by zero)
    if len(pools) != len(dims) or any(not is_int(p) or p < 1 for p in pools):
        raise ValueError(f'pools must hold one positive integer per spatial axis of u ({len(dims)} for a '
                         f'channel-major u of shape {tuple(u.shape)}), got {tuple(pools)}')
    for dim, pool in zip(dims, pools):
        u = _avg_pool_axis(u, dim, pool)
    return u


def conv_algorithms(shape: Sequence[int], pools: Sequence[int]) -> List[str]:
    """Per spatial axis, 'toeplitz' or 'fft' (`choose_algorithm`) for a channel-major input of `shape`
    convolved axis after axis, each axis pooled by pools[a] before the next."""
    shape = list(shape)
    algorithms = []
    for dim, pool in zip(list(range(1, len(shape) - 2)) + [len(shape) - 1], pools):
        n = shape[dim]
        algorithms.append(choose_algorithm(n, math.prod(shape) // (shape[0] * n)))
        shape[dim] = n // pool
    return algorithms


def conv_operators(
        kernels: Sequence[torch.Tensor],
        shape: Sequence[int],
        pools: Sequence[int],
        algorithms: Optional[Sequence[str]] = None,
) -> list:
    """Per rank-1 term, per axis, the Toeplitz or FFT operator (`algorithms`, by default `conv_algorithms`)
    that convolves axis a of a channel-major input of `shape` with kernels[a][term] and pools it by pools[a].

    The operators hold everything that depends on the kernels only (Toeplitz matrices, kernel spectra),
    so a fixed set of kernels (inference) builds them once."""
    shape = tuple(shape)
    dims = list(range(1, len(shape) - 2)) + [len(shape) - 1]
    algorithms = conv_algorithms(shape, pools) if algorithms is None else algorithms
    operators = [[] for _ in range(kernels[0].shape[0])]
    for dim, k, pool, algorithm in zip(dims, kernels, pools, algorithms):
        op = _ToeplitzAxis if algorithm == 'toeplitz' else _FFTAxis
        for term, ops_ in enumerate(operators):
            ops_.append(op(k[term], shape[dim], pool))
        shape = shape[:dim] + (shape[dim] // pool,) + shape[dim + 1:]
    return operators


def apply_operators(
        u: torch.Tensor,
        operators: list,
        pools: Sequence[int],
        skip: Optional[torch.Tensor] = None,
        intermediates: Optional[List[torch.Tensor]] = None,
        proj: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """Forward of `separable_conv` with operators from `conv_operators` (no autograd bookkeeping).
    With `intermediates` (a list), the result along each axis but the last is appended to it, term by term
    (and batch chunk by batch chunk, see `projection_chunks`). With `proj`, u is projected first, a batch
    chunk at a time."""
    if proj is None:
        return _apply_operators(u, operators, pools, skip, intermediates)
    weight, bias = proj
    pooled = _pooled_projection(u, proj, pools, skip)  # (small: pooled before it is projected)
    projected = None
    if _projects_first_axis(u, operators):  # (a clip's frames: the projection taken into their Toeplitz matrices)
        projected = [_projected_matrix(ops_[0].t, weight, bias) for ops_ in operators]
    responses = None
    if projected is None and bias is not None and u.ndim > 3:
        # the bias, a constant per channel, enters after the first axis as that axis' response to it, added by the
        # GEMM into a tensor the size of its (pooled) result: a pass over a quarter of the projection in the stem,
        # where a bias in the projection's GEMM is a pass over all of it (addmm writes the bias first, then adds)
        responses = [bias.reshape((-1,) + (1,) * (u.ndim - 1)) * ops_[0].apply(
            u.new_ones((weight.shape[0], u.shape[1]) + (1,) * (u.ndim - 2)), 1) for ops_ in operators]
        proj = (weight, None)
    parts = []
    for start, size in projection_chunks(u.shape, weight.shape[0], weight.element_size(), u.device):
        chunk = u.narrow(-2, start, size)
        pooled_chunk = None if pooled is None else pooled.narrow(-2, start, size)
        if projected is None:
            parts.append(_apply_operators(project(chunk, *proj), operators, pools, skip, intermediates, pooled_chunk,
                                          responses))
        else:  # (the chunk only gives the number of axes: the first axis' results are made here)
            first = [_projected_first_axis(chunk, *matrices) for matrices in projected]
            parts.append(_apply_operators(chunk, operators, pools, skip, intermediates, pooled_chunk, first=first))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def _pooled_projection(x: torch.Tensor, proj, pools: Sequence[int], skip: Optional[torch.Tensor]):
    """pool(project(x)) for the skip term, as project(pool(x)): the same (both are linear, the projection acts on
    channels only), pooling the narrow input instead of the wide projection; None without a skip term."""
    return None if skip is None else project(avg_pool_axes(x, pools), *proj)


def _apply_operators(u, operators, pools, skip, intermediates, pooled=None, responses=None, first=None
                     ) -> torch.Tensor:
    """`apply_operators` without projection; `pooled` is avg_pool_axes(u, pools) if the caller has it;
    `responses` (per term, broadcastable to the first axis' result) are added to that result; `first` (per term)
    is the first axis' result, made by the caller (u then only gives the number of axes)."""
    dims = _spatial_dims(u)
    if skip is not None:
        pooled = avg_pool_axes(u, pools) if pooled is None else pooled
    y = None if skip is None else skip.reshape((-1,) + (1,) * (u.ndim - 1)) * pooled
    for term, ops_ in enumerate(operators):
        z = u
        for a, (dim, op) in enumerate(zip(dims[:-1], ops_)):
            if a == 0 and first is not None:
                z = first[term]
            else:
                acc = None
                if a == 0 and responses is not None:
                    # (a copy: with one sample and a last side of 1 the expand is the response itself, and the
                    # product accumulates into its accumulator)
                    acc = responses[term].expand(responses[term].shape[:2] + z.shape[2:]).clone(
                        memory_format=torch.contiguous_format)
                z = op.apply(z, dim, acc=acc)
            if intermediates is not None:
                intermediates.append(z)
        y = ops_[-1].apply(z, dims[-1], acc=y)  # the sum so far accumulates into the last product
    return y


def _projects_first_axis(u: torch.Tensor, operators: list) -> bool:
    """Whether `apply_operators` multiplies the projection of u together with the first axis' Toeplitz matrices
    (`_projected_first_axis`): on the CPU, for a first axis (of two or more) up to `PROJECTED_AXIS_MAX_LEN`."""
    return (u.device.type == 'cpu' and u.ndim > 3
            and all(isinstance(ops_[0], _ToeplitzAxis) and ops_[0].n <= PROJECTED_AXIS_MAX_LEN for ops_ in operators))


def _projected_matrix(t: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple:
    """The first axis' (C, m, n) Toeplitz matrices t with the projection weight (C, C_in) @ x + bias taken in, for
    `_projected_first_axis`: M (C, m, C_in n), M[c, i, j a] = t[c, i, a] weight[c, j], and the bias' response,
    bias[c] times t[c, i]'s sum, (C, m, 1), or None without a bias."""
    c, m, n = t.shape
    mat = (t[:, :, None, :] * weight[:, None, :, None]).reshape(c, m, weight.shape[1] * n)
    return mat, None if bias is None else bias[:, None, None] * t.sum(-1, keepdim=True)


def _projected_first_axis(x: torch.Tensor, mat: torch.Tensor, response: Optional[torch.Tensor]) -> torch.Tensor:
    """The first axis' Toeplitz product of the projection of a channel-major x (C_in, n, ...), from
    `_projected_matrix`: one GEMM of (C m, C_in n) against x's (C_in n) rows, the bias' response added by it:
    (C, m, ...), as op.apply(project(x, weight, bias), 1) but without the full-size projection."""
    c_in, n = x.shape[:2]
    rows = x.reshape(c_in * n, -1)  # (x narrowed to a batch chunk: a copy of the narrow input)
    flat = mat.flatten(0, 1)
    z = torch.mm(flat, rows) if response is None else torch.addmm(response.flatten(0, 1), flat, rows)
    return z.view(mat.shape[:2] + x.shape[2:])


def projection_chunks(
        shape: Sequence[int], channels: int, itemsize: int, device: torch.device) -> List[Tuple[int, int]]:
    """(start, size) slices of the batch axis (-2) of a channel-major input of `shape` on `device` whose
    pointwise projection to `channels` takes at most `PROJECTION_CHUNK_BYTES` each (at least one sample);
    off the CPU, the whole batch.

    A widening projection (the stem: 3 -> 32 channels at full resolution) makes the largest temporary of
    the network. On the CPU, made a few samples at a time, it stays in cache, and glibc's allocator reuses
    its memory instead of mapping fresh pages for every call, which costs more than the GEMM that fills
    them (GPUs have caching allocators, and gain nothing from more, smaller launches)."""
    batch = shape[-2]
    if torch.device(device).type != 'cpu':
        return [(0, batch)]
    per_sample = channels * math.prod(shape[1:]) // max(batch, 1) * itemsize
    step = max(1, min(batch, PROJECTION_CHUNK_BYTES // max(per_sample, 1)))
    return [(start, min(step, batch - start)) for start in range(0, batch, step)] or [(0, 0)]


class DepthwiseConv:
    """The 2D or 3D convolution of a (B, C, *spatial) input in channels-last memory as one depthwise convolution per
    axis and rank-1 term (taps of length 2n - 1, zero padding n - 1: exactly the non-circular convolution), average
    pooled by `pools` (folded into the taps, below), plus skip * x (pooled). The result is channels-last too. For
    inference on the CPU, where PyTorch's depthwise convolution reads and writes channels-last data directly: the
    Toeplitz path needs the input channel-major, two transposing copies per layer that cost more than the
    convolution on short axes (`DEPTHWISE_MAX_LEN`); on long axes the Toeplitz GEMM wins."""

    def __init__(self, kernels: Sequence[torch.Tensor], pools: Sequence[int]):
        nd = len(kernels)  # kernels[a]: (rank, C, 2 n_a - 1), offset o at index o + n_a - 1
        self.conv = (F.conv2d, F.conv3d)[nd - 2]
        self.pool = None if all(p == 1 for p in pools) else functools.partial((F.avg_pool2d, F.avg_pool3d)[nd - 2],
                                                                              kernel_size=tuple(pools))
        # per axis: weights (rank, C, 1, *taps along that axis), stride, padding, and whether the axis runs as the
        # last axis of a view of the rows (`_conv_rows`; its weights are then (rank, W C, 1, 1, taps))
        self.axes = []
        width = (kernels[-1].shape[-1] + 1) // 2
        for a, (k, pool) in enumerate(zip(kernels, pools)):
            w = _pooled_taps(k, pool)  # (rank, C, 2n - 2 + pool)
            n = (k.shape[-1] + 1) // 2
            if a == nd - 2 and n // pool >= DEPTHWISE_ROWS_VIEW_MIN:
                w = w.repeat(1, width, 1)  # channel (column j, channel c) of the view, j C + c, takes c's taps
                self.axes.append((w.reshape(w.shape[:2] + (1, 1, w.shape[-1])), (1, pool), (0, n - 1), True))
                continue
            taps, stride, padding = [1] * nd, [1] * nd, [0] * nd
            taps[a], stride[a], padding[a] = w.shape[-1], pool, n - 1
            self.axes.append((w.reshape(w.shape[:2] + (1, *taps)), tuple(stride), tuple(padding), False))

    def apply(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, *spatial), channels-last memory; skip (C,) or None -> (B, C, *(spatial // pools))."""
        c, y = x.shape[1], None
        for term in range(len(self.axes[0][0])):
            z = x
            for w, stride, padding, rows in self.axes:
                if rows:
                    z = _conv_rows(z, w[term], stride, padding)
                else:
                    z = self.conv(z, w[term], stride=stride, padding=padding, groups=c)
            y = z if y is None else y.add_(z)
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        if not y.is_contiguous(memory_format=fmt):  # (PyTorch's conv3d on one thread answers in NCDHW memory)
            y = y.contiguous(memory_format=fmt)
        if skip is None:
            return y
        pooled = x if self.pool is None else self.pool(x)  # (drops the remainder, as AvgPool)
        return y.addcmul_(pooled, skip.reshape((-1,) + (1,) * (x.ndim - 2)))  # (one pass, into the last result)


def _conv_rows(z: torch.Tensor, w: torch.Tensor, stride: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    """The depthwise convolution of channels-last z (B, C, ..., H, W) along H, as a convolution along the last axis
    of a view, no copy: (B ..., W C, 1, H) channels-last, every (column, channel) pair a channel. w: (W C, 1, 1, taps).
    The result is channels-last (B, C, ..., H // pool, W)."""
    b, c, *spatial = z.shape
    h, width = spatial[-2:]
    rows = z.movedim(1, -1).reshape(-1, 1, h, width * c).permute(0, 3, 1, 2)
    y = F.conv2d(rows, w, stride=stride, padding=padding, groups=width * c)  # (B ..., W C, 1, H // pool)
    return y.permute(0, 2, 3, 1).reshape(b, *spatial[:-2], y.shape[-1], width, c).movedim(-1, 1)


def _pooled_taps(k: torch.Tensor, pool: int) -> torch.Tensor:
    """The cross-correlation weights (what conv2d applies: the taps reversed) of the convolution by taps k
    (..., 2n - 1) followed by average pooling over windows of `pool` outputs, applied at stride `pool`: each
    window's mean is one product with the taps averaged over `pool` neighbours (a box filter), (..., 2n - 2 + pool)."""
    w = flush_tiny(k).flip(-1)
    if pool == 1:
        return w
    return F.pad(w, (pool - 1, pool - 1)).unfold(-1, pool, 1).mean(-1)


FIRST_ORDER_ONLY = (b"S4ND's fast paths compute first-order gradients only, and this backward pass differentiates one "
                    b"again (create_graph=True, e.g. a gradient penalty): run the model within "
                    b"s4nd_vision.layers.reference_formulation() for higher-order gradients, or use torch.func "
                    b"transforms, which take that formulation by themselves")


def first_order_backward(backward):
    """`torch.autograd.function.once_differentiable` for the fast paths' closed-form backward passes, with an error
    that names the remedy: a backward pass through their gradients (higher-order gradients) raises
    `FIRST_ORDER_ONLY`, where PyTorch's message names neither S4ND nor `reference.reference_formulation`."""
    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled() or not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
            return outputs
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        refuse = torch._C._functions.DelayedError(FIRST_ORDER_ONLY, len(outputs))

        def tracked(t):  # (the error is raised where a gradient flows into one of these)
            if t is None:
                return t
            t = t.detach()
            t.requires_grad = True
            return t
        return refuse(*[tracked(t) for t in outputs])
    return wrapped


def recompute_for_memory(device: torch.device) -> bool:
    """Whether a layer recomputes a large intermediate in the backward pass rather than saving it, where both are
    possible (a widening projection, pooled intermediates): off the CPU, where the GEMM is cheap and memory is what
    bounds the batch; not on the CPU, where time is the constraint."""
    return torch.device(device).type != 'cpu'


def backward_without_autocast(backward):
    """Decorates a custom autograd Function's backward to run in the dtypes of its saved tensors (autocast off), as
    when `.backward()` is called outside autocast. Called inside an autocast region (a common training loop), the
    region would recast its products: a bf16 GEMM into a float32 accumulator fails, and kernel generation's
    gradient, float32 by design, would lose precision."""
    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        device = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), 'cpu')
        with autocast_off(device):
            return backward(ctx, *grads)
    return wrapped


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast turned off on `device_type` where it is on (`torch.autocast(enabled=False)`), else no context: a graph
    that torch.export captures outside autocast then holds no `wrap_with_autocast` subgraph, whose symbolic float
    inputs (the kernel rates of dynamic sizes) `torch.export.save` cannot serialize."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type`; False for a device autocast has no notion of (`meta`, which shape
    inference, `init_empty_weights` and memory planning run on): `torch.is_autocast_enabled('meta')` raises instead
    of answering."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def module_parameter(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """A parameter of `module` (its device is the one the module computes on), or None where it has none. Also of
    a replica that `nn.DataParallel` makes per GPU and forward (`torch.nn.parallel.replicate`): its parameters are
    plain attributes, which `parameters()` does not list; torch keeps them in `_former_parameters`."""
    param = next(module.parameters(), None)
    if param is None:
        param = next((p for m in module.modules() for p in getattr(m, '_former_parameters', {}).values()
                      if p is not None), None)
    return param


def generation_without_autocast(generate):
    """Decorates a kernel generator (a kernel module's forward, or a function of a sequence of kernel modules) to
    run with autocast off on the modules' device: kernels are generated in the dtype asked for (float32 or
    float64), also when called inside an autocast region (CPU autocast would run its GEMMs in bfloat16)."""
    @functools.wraps(generate)
    def wrapped(kernels, *args, **kwargs):
        module = kernels if isinstance(kernels, torch.nn.Module) else (kernels[0] if len(kernels) else None)
        param = None if module is None else module_parameter(module)
        with autocast_off(param.device.type if param is not None else 'cpu'):
            return generate(kernels, *args, **kwargs)
    return wrapped


def project(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pointwise (1x1) projection of a channel-major x (C_in, ...) by weight (C, C_in) plus bias (C,): (C, ...)."""
    if bias is None:
        y = torch.mm(weight, x.flatten(1))
    else:
        y = torch.addmm(bias[:, None], weight, x.flatten(1))
    return y.view((-1,) + x.shape[1:])


class _SeparableConv(torch.autograd.Function):
    """sum_r (k_1[r] (x) ... (x) k_N[r]) * u + skip * pool(u), with a hand-written backward, where u is the
    input or, with `weight`, its pointwise projection weight @ input + bias.

    Only the input and the 1D kernels are saved: the intermediate results along the first N - 1
    axes (each as large as the input) are recomputed in the backward pass, so S4ND keeps about as
    much for backward as the depthwise conv it replaces, at the price of N - 1 extra 1D convolutions.
    When the first axis is pooled, the intermediates are at most 1 / pool of the input and are kept
    instead (the stem and downsampling layers: one large GEMM fewer for a fraction of the memory).
    A fused projection is recomputed (one GEMM): a projection that widens its input (e.g. a stem,
    3 -> 32 channels at full resolution) then costs the memory of its narrow input only (and, off the CPU,
    its intermediates are recomputed too, being larger than that input). With a projection,
    both passes run a batch chunk at a time (`projection_chunks`); when the projected input needs no gradient
    and the intermediates are kept (an image into the stem, on the CPU), the backward pass forms neither the
    projection nor its gradient (`_projection_params_backward`).
    """

    @staticmethod
    def forward(ctx, x, skip, weight, bias, pools, *kernels):
        shape = x.shape if weight is None else (weight.shape[0],) + x.shape[1:]
        algorithms = conv_algorithms(shape, pools)  # the backward pass uses the same
        # intermediates are kept when the first axis is pooled, unless they outsize the saved input (a widening
        # projection: the stem) where memory is worth a GEMM (`recompute_for_memory`)
        small = kernels[0].shape[0] * math.prod(shape) // pools[0] <= x.numel()  # (one per rank-1 term)
        kept = [] if pools[0] > 1 and (small or not recompute_for_memory(x.device)) else None
        proj = None if weight is None else (weight, bias)
        y = apply_operators(x, conv_operators(kernels, shape, pools, algorithms), pools, skip, kept, proj=proj)
        ctx.save_for_backward(x, skip, weight, bias, *kernels, *(kept or ()))
        ctx.pools, ctx.num_kernels, ctx.algorithms = pools, len(kernels), algorithms
        return y

    @staticmethod
    @first_order_backward
    @backward_without_autocast
    def backward(ctx, grad):
        x, skip, weight, bias, *kernels = ctx.saved_tensors
        kernels, kept = kernels[: ctx.num_kernels], kernels[ctx.num_kernels:]
        grad = channel_major(channels_first(grad))  # usually a permuted view of the next layer's layout
        shape = x.shape if weight is None else (weight.shape[0],) + x.shape[1:]
        operators = conv_operators(kernels, shape, ctx.pools, ctx.algorithms)
        if weight is None:
            grad_u, grad_skip, grad_kernels = _separable_conv_backward(x, grad, skip, kernels, operators, kept,
                                                                       ctx.pools)
            return (grad_u, grad_skip, None, None, None) + tuple(grad_kernels)
        chunks = projection_chunks(x.shape, weight.shape[0], weight.element_size(), x.device)
        if (not ctx.needs_input_grad[0] and kept and weight.shape[1] <= PROJECTION_PARAMS_MAX_IN
                and all(isinstance(ops_[0], _ToeplitzAxis) for ops_ in operators)):
            return (None,) + _projection_params_backward(x, grad, skip, weight, bias, operators, kept, ctx.pools,
                                                         chunks)
        per_chunk = len(kept) // len(chunks)
        grads_x, grad_weight, grad_bias, grad_skip, grad_kernels = [], 0, 0, 0, 0
        for i, (start, size) in enumerate(chunks):
            x_c = x.narrow(-2, start, size)
            pooled = _pooled_projection(x_c, (weight, bias), ctx.pools, skip)
            grad_u, grad_skip_c, grad_kernels_c = _separable_conv_backward(
                project(x_c, weight, bias), grad.narrow(-2, start, size), skip, kernels, operators,
                kept[i * per_chunk: (i + 1) * per_chunk], ctx.pools, pooled)
            grad_u = grad_u.flatten(1)
            if ctx.needs_input_grad[0]:
                grads_x.append(torch.mm(weight.t(), grad_u).view(x_c.shape))
            grad_weight = grad_weight + torch.mm(grad_u, x_c.flatten(1).t())
            grad_bias = grad_bias + grad_u.sum(1) if bias is not None else None
            grad_skip = grad_skip + grad_skip_c if skip is not None else None
            grad_kernels = [g + g_c for g, g_c in zip(grad_kernels, grad_kernels_c)] if i else grad_kernels_c
        grad_x = (grads_x[0] if len(grads_x) == 1 else torch.cat(grads_x, dim=-2)) if grads_x else None
        return (grad_x, grad_skip, grad_weight, grad_bias, None) + tuple(grad_kernels)


def _separable_conv_backward(u, grad, skip, kernels, operators, kept, pools, pooled=None) -> tuple:
    """Gradients of the input u, of the skip weights and of the kernels of `_SeparableConv` (without
    projection) for the channel-major output gradient `grad`, with the forward's `operators` (any batch size)
    and intermediates `kept` (or empty: recomputed); `pooled` is avg_pool_axes(u, pools) if the caller has it."""
    dims = _spatial_dims(u)
    grad_u, grad_skip, grad_pooled = None, None, None
    if skip is not None:
        pooled = avg_pool_axes(u, pools) if pooled is None else pooled
        grad_skip = (grad * pooled).sum(dim=list(range(1, u.ndim)))
        grad_pooled = skip.reshape((-1,) + (1,) * (u.ndim - 1)) * grad
        if all(p == 1 for p in pools):  # the first axis' adjoint GEMM accumulates into it
            grad_u, grad_pooled = grad_pooled, None
    grad_kernels = [torch.zeros_like(k) for k in kernels]
    for term, ops_ in enumerate(operators):
        inputs = [u]  # the input of every axis, kept or recomputed
        for a, (dim, op) in enumerate(zip(dims[:-1], ops_)):
            inputs.append(kept[term * (len(dims) - 1) + a] if kept else op.apply(inputs[-1], dim))
        g = _later_axes_backward(grad, ops_, inputs, dims, grad_kernels, term)
        grad_kernels[0][term], grad_u = ops_[0].backward(u, g, dims[0], acc=grad_u)
    if grad_pooled is not None:  # the skip's gradient, spread over the pooling windows
        _add_pool_adjoint_(grad_u, grad_pooled, dims, pools)
    return grad_u, grad_skip, grad_kernels


def _later_axes_backward(grad, ops_, inputs, dims, grad_kernels, term) -> torch.Tensor:
    """The adjoints of every axis but the first of one rank-1 term (`inputs`: each axis' input) applied to the
    output gradient: the gradient at the first axis' output. Adds each axis' tap gradient to grad_kernels[a][term]."""
    g = grad
    for a in reversed(range(1, len(dims))):
        grad_taps, g = ops_[a].backward(inputs[a], g, dims[a])
        grad_kernels[a][term] += grad_taps
    return g


def _projection_params_backward(x, grad, skip, weight, bias, operators, kept, pools, chunks) -> tuple:
    """Gradients of skip, weight, bias and the kernels of a projected `_SeparableConv` whose input x (C_in, n, ...)
    needs none, with kept intermediates and a Toeplitz first axis (the stem on the CPU). The gradient of the
    projection u = weight x + bias, as large as u (C channels at full resolution), is never formed, nor is u: with
    g0 the gradient at the first axis' output (C, m, ...) and T its (C, m, n) matrix, one GEMM against the narrow
    input, mixed[c, p, i, h] = sum g0[c, p, ...] x[i, h, ...], gives T's gradient, sum_i weight[c, i] mixed[c, :, i]
    (+ the bias' part), and the projection's, sum_{p, h} T[c, p, h] mixed[c, p, i, h]. It costs C_in times the
    GEMM of T's gradient alone, which the two GEMMs, projection and memory passes it replaces outweigh for few input
    channels (`PROJECTION_PARAMS_MAX_IN`)."""
    dims = _spatial_dims(x)
    c, c_in = weight.shape
    per_chunk = len(kept) // len(chunks)
    grad_kernels = [torch.zeros((len(operators), c, 2 * x.shape[d] - 1), dtype=grad.dtype, device=grad.device)
                    for d in dims]
    firsts = [None] * len(operators)  # per term, g0 for the whole batch
    for i, (start, size) in enumerate(chunks):
        kept_c = kept[i * per_chunk: (i + 1) * per_chunk]
        for term, ops_ in enumerate(operators):
            inputs = [None] + kept_c[term * (len(dims) - 1): (term + 1) * (len(dims) - 1)]
            g0 = _later_axes_backward(grad.narrow(-2, start, size), ops_, inputs, dims, grad_kernels, term)
            if len(chunks) == 1:
                firsts[term] = g0
                continue
            if firsts[term] is None:
                firsts[term] = g0.new_empty(g0.shape[:-2] + (x.shape[-2], g0.shape[-1]))
            firsts[term].narrow(-2, start, size).copy_(g0)
    x_rows = x.reshape(c_in * x.shape[1], -1)  # (C_in n, other axes and batch)
    grad_weight = torch.zeros_like(weight)
    grad_bias = None if bias is None else torch.zeros_like(bias)
    for term, (ops_, g0) in enumerate(zip(operators, firsts)):
        t = ops_[0].t
        m, n = t.shape[1:]
        mixed = torch.mm(g0.reshape(c * m, -1), x_rows.t()).view(c, m, c_in, n)
        # (a few input channels: a sum over them; einsum ran batched GEMMs over permuted copies, far slower)
        grad_t = mixed[:, :, 0] * weight[:, 0, None, None]
        for i in range(1, c_in):
            grad_t.addcmul_(mixed[:, :, i], weight[:, i, None, None])
        grad_weight += torch.linalg.vecdot(mixed, t[:, :, None, :]).sum(1)
        if bias is not None:
            g_rows = g0.reshape(c, m, -1).sum(-1)  # (C, m)
            grad_t += bias[:, None, None] * g_rows[:, :, None]
            grad_bias += (g_rows * t.sum(-1)).sum(-1)
        grad_kernels[0][term] += ops_[0].taps_grad(grad_t)
    grad_skip = None
    if skip is not None:  # skip * pool(weight x + bias): pool(x)'s products with the output gradient serve all three
        out = grad.reshape(c, -1)
        mixed = torch.mm(out, avg_pool_axes(x, pools).reshape(c_in, -1).t())  # (C, C_in)
        grad_skip = (mixed * weight).sum(1)
        grad_weight += skip[:, None] * mixed
        if bias is not None:
            out_sums = out.sum(1)
            grad_skip += bias * out_sums
            grad_bias += skip * out_sums
    return (grad_skip, grad_weight, grad_bias, None) + tuple(grad_kernels)


def _check_conv_args(u: torch.Tensor, kernels: Sequence[torch.Tensor], pools: Sequence[int],
                     skip: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor] = None) -> None:
    """Raise ValueError unless `separable_conv`'s arguments fit a channel-major u (C_in, S_1, ..., B, S_N)."""
    dims = _spatial_dims(u)
    if len(kernels) != len(dims) or len(pools) != len(dims):
        raise ValueError(f'kernels and pools need one entry per spatial axis of u ({len(dims)} for a channel-major '
                         f'u of shape {tuple(u.shape)}), got {len(kernels)} and {len(pools)}')
    channels = u.shape[0] if weight is None else weight.shape[0]
    rank = kernels[0].shape[0] if kernels[0].ndim == 3 else None
    for a, (k, dim) in enumerate(zip(kernels, dims)):
        expected = (rank, channels, 2 * u.shape[dim] - 1)
        if tuple(k.shape) != expected:
            raise ValueError(f'kernels[{a}] must be (rank, C, 2n - 1) = {expected} for axis {a} of length '
                             f'{u.shape[dim]} (one rank for every axis), got {tuple(k.shape)}')
    if skip is not None and tuple(skip.shape) != (channels,):
        raise ValueError(f'skip must be ({channels},), got {tuple(skip.shape)}')
    if weight is not None and (weight.ndim != 2 or weight.shape[1] != u.shape[0]):
        raise ValueError(f'proj weight must be (C, {u.shape[0]}), got {tuple(weight.shape)}')
    if any(not 1 <= p <= u.shape[dim] for p, dim in zip(pools, dims)):
        raise ValueError(f'pools must be between 1 and the axis lengths, got {tuple(pools)}')
    # (one dtype for all: the GEMMs and FFTs do not promote, and their own error names no argument; e.g. kernels
    # from `S4ND.axis_kernels`, float32 by default, for a float64 u)
    named = [(f'kernels[{a}]', k) for a, k in enumerate(kernels)] + [('skip', skip), ('proj weight', weight),
                                                                         ('proj bias', bias)]
    for name, t in named:
        if t is not None and t.dtype != u.dtype:
            raise ValueError(f'{name} must have the dtype of u ({u.dtype}), got {t.dtype}')


def separable_conv(
        u: torch.Tensor,
        kernels: Sequence[torch.Tensor],
        pools: Optional[Sequence[int]] = None,
        skip: Optional[torch.Tensor] = None,
        proj: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """Depthwise N-D convolution with a sum of separable (outer product) kernels, optionally average-pooled.

    Args:
        u: channel-major input (see `channel_major`), N spatial axes; kernels, skip and proj in its dtype.
        kernels: per axis, (R, C, 2n - 1) two-sided kernels of R rank-1 terms.
        pools: per axis, average pooling window (and stride) applied to the result; None = no pooling.
        skip: optional (C,) weights of a skip term skip * pool(u) added to the result (S4ND's D).
        proj: optional (weight (C, C_in), bias (C,) or None): convolve the pointwise projection of a
            (C_in, ...) u instead, fused (recomputed in the backward pass rather than saved).

    Returns:
        Channel-major result, spatial sizes s // pool: the sum over r of u convolved with
        kernels[0][r] (x) ... (x) kernels[N-1][r], plus the skip term.
    """
    pools = tuple(pools or (1,) * len(kernels))
    weight, bias = proj if proj is not None else (None, None)
    _check_conv_args(u, kernels, pools, skip, weight, bias)
    if use_reference():  # export / compilation: shape-generic real ops (see `reference`)
        u = u if weight is None else project(u, weight, bias)
        return separable_conv_reference(u, kernels, _spatial_dims(u), pools, skip)
    if torch.jit.is_tracing():  # plain differentiable ops that fvcore sees
        u = u if weight is None else project(u, weight, bias)
        return apply_operators(u, conv_operators(kernels, u.shape, pools), pools, skip)
    return _SeparableConv.apply(u, skip, weight, bias, pools, *kernels)
