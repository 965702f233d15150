"""Fused separable 2D (and 3D) convolution on a channels-last activation, as Triton kernels (the CUDA path of S4ND).

    y[b, p, q, c] = sum_r sum_{h, w} A_r[p, h, c] B_r[q, w, c] x[b, h, w, c] + D[c] pool(x)[b, p, q, c]

with A_r[p, h, c] = (1 / P_h) sum_{s < P_h} k_h[r, c, p P_h + s - h + H - 1] (the two-sided kernel of the H axis,
offset o at index o + H - 1, rows averaged over the pooling window, see `ops.two_sided_kernel`) and B_r likewise
for the W axis. x is (B, H, W, C) with C contiguous (a channels-last (B, C, H, W) tensor seen through
`permute(0, 2, 3, 1)`, no copy); the result has the same layout, spatial sizes H // P_h, W // P_w.

Design (for the GPU; on the CPU the kernels run under `TRITON_INTERPRET=1` for the tests): a program owns
a block of output rows of one image for a block of channels, the vectorized (contiguous) dimension. It sums the
input rows weighted by its rows of A (a (ROWS, W, BLOCK_C) accumulator in registers, fp32: each input row read
serves every row of the block), then produces each output pixel as a reduction of that accumulator against a
column of B: no Toeplitz matrix and no intermediate tensor is written to memory; the taps are read from the
small (C, 2n - 1) kernels (cached). The programs of one (image, channel block) run next to each other (the row
block is the fastest grid axis), so its input rows come from the L2 cache after the first read.

Backward: the input gradient is the same kernel with A and B transposed (`TRANSPOSE`), the skip term spread
over its pooling windows; the kernel and D gradients come from one program per (image, block of output rows,
channel block) that recomputes its rows' H-axis results and adds each tap gradient it finds to its image's slice
of a (B, R, C, 2n - 1) float32 buffer, summed over the images afterwards (one reduction).
Inputs may be float32, bfloat16 or float16; every sum accumulates in float32.

The tensor-core kernels ('dot', `fused_algorithm`): the same products as matrix products per channel,
y[c] = sum_r A_r[c] x[c] B_r[c]^T, each image's plane of a channel one padded (S, S) matrix (S = 16 or 32)
and a block of channels the batch of 3D dots (fp32 as three TF32 products; 16-bit inputs in their own dtype,
which the operators, the first product's result and, where it pools, D are rounded to as well),
the rank terms summed in registers; backward, the input gradient by the transposed operators, and the taps'
gradients as the diagonal sums of the operators' gradients g (x B^T)^T and (A x)^T g, summed over a program's
images first (a program takes a few images, `DOT_IMAGES`: per-channel work is done once for them). It avoids what
makes the 'sum' kernels slow (reductions across threads, gathered tap loads; README, "H200"). An H200 measured it faster
than 'sum' at every 2D layer shape (forward+backward) and in the image models, so it is the default for images
(`DEFAULT_KERNEL_ALGORITHM`); the video model ran slower with it (another day's run: to be measured in one
process), so clips keep 'sum'.

3D (clips, (B, T, H, W, C)): per rank-1 term, `_axis_kernel` convolves (and pools) the time axis, writing its
result once, and the 2D kernels above then treat every frame as an image; the skip term is added by PyTorch ops.
That result, the rank terms' sum and the skip term are in the clip's dtype: a 16-bit clip is rounded between the
axes too (its error, README "H200"; an fp32 time result, twice that tensor's memory traffic, is to be weighed on a
GPU).
The time axis' tap gradient reduces over each image's plane in a few chunks (`_axis_grad_kernel`).
"""
import contextlib
import math
import os
import warnings
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from .ops import ForcedChoice, _avg_pool_axis
from .triton_kernels import check_device, on_tensor_device

__all__ = ['separable_conv2d_cl', 'separable_conv3d_cl', 'supported', 'fused_algorithm', 'KERNEL_ALGORITHMS']

MAX_SIDE = 64  # rows of W (padded to a power of two) x BLOCK_C channels live in registers
CONV_TILE = 8192  # fp32 accumulator values per program of the convolution (ROWS x BLOCK_IN x BLOCK_C)
CONV_WARPS = 8  # 256 threads: 32 accumulator registers each
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ELEMENTS = 2 ** 31 - 1  # the kernels index their tensors in int32: a larger input runs the fast path


def supported(shape, pools, dtype: torch.dtype) -> Optional[str]:
    """None when the Triton ops handle a (B, H, W, C) or (B, T, H, W, C) input with `pools`, else the reason they
    do not."""
    if len(shape) not in (4, 5) or len(pools) != len(shape) - 2:
        return f'needs a (B, H, W, C) or (B, T, H, W, C) input and a pool per axis, got shape {tuple(shape)}'
    if dtype not in DTYPES:
        return f'dtype {dtype} not in {DTYPES}'
    if shape[-1] < 1:
        return f'needs at least one channel, got shape {tuple(shape)}'
    if math.prod(shape) > MAX_ELEMENTS:
        return f'more than {MAX_ELEMENTS} elements (int32 offsets), got shape {tuple(shape)}'
    spatial = tuple(shape[1:-1])
    if max(spatial[-2:]) > MAX_SIDE:
        return f'spatial sizes {spatial[-2:]} exceed {MAX_SIDE}'
    if any(p not in (1, 2, 4) for p in pools) or any(n < p for n, p in zip(spatial, pools)):
        return f'pools {tuple(pools)} must be 1, 2 or 4 and at most the spatial sizes {spatial}'
    return None


@triton.jit
def _conv_kernel(
        x_ptr, kh_ptr, kw_ptr, d_ptr, y_ptr,
        C, H, W, HO, WO, R,
        sxb, sxh, sxw, sxc, syb, syh, syw, syc,
        skr, skc, skwr, skwc,
        PH: tl.constexpr, PW: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_SKIP: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Forward (TRANSPOSE=False): x (B, H, W, C) -> y (B, HO, WO, C). Input gradient (TRANSPOSE=True):
    x is the output gradient (B, HO, WO, C), y the input gradient (B, H, W, C). One program per (b, block of ROWS
    output rows, channel block): each input row it reads serves all ROWS output rows, and each column of B all
    ROWS results, so the input is read (from L2) once per ROWS output rows, not once per row."""
    if TRANSPOSE:
        rows_out, rows_in, cols_in, cols_out = H, HO, WO, W
    else:
        rows_out, rows_in, cols_in, cols_out = HO, H, W, WO
    blocks = tl.cdiv(rows_out, ROWS)
    b = tl.program_id(0) // blocks
    i = (tl.program_id(0) % blocks) * ROWS + tl.arange(0, ROWS)  # output rows
    i_ok = i < rows_out
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    v = tl.arange(0, BLOCK_IN)  # input columns
    v_ok = v < cols_in
    x_base = x_ptr + b * sxb
    y_rows = y_ptr + b * syb + i[:, None] * syh + c[None, :] * syc  # (ROWS, BLOCK_C) pointers of column 0
    mask2 = v_ok[:, None] & c_ok[None, :]
    mask_out = i_ok[:, None] & c_ok[None, :]
    skip_d = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_SKIP:
        skip_d = tl.load(d_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    for r in range(R):
        # stage 1: z[i, v, c] = sum_a A[i, a, c] x[a, v, c] (TRANSPOSE: sum_a A[a, i, c] g[a, v, c])
        z = tl.zeros([ROWS, BLOCK_IN, BLOCK_C], dtype=tl.float32)
        for a in range(rows_in):
            tap = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
            for s in tl.static_range(PH):
                if TRANSPOSE:
                    idx = a * PH + s - i + H - 1
                else:
                    idx = i * PH + s - a + H - 1
                tap += tl.load(kh_ptr + r * skr + c[None, :] * skc + idx[:, None], mask=mask_out,
                               other=0.0).to(tl.float32)
            row = tl.load(x_base + a * sxh + v[:, None] * sxw + c[None, :] * sxc, mask=mask2, other=0.0)
            z += (tap / PH)[:, None, :] * row.to(tl.float32)[None, :, :]
        # stage 2: y[i, j, c] = sum_v B[j, v, c] z[i, v, c] (TRANSPOSE: sum_v B[v, j, c] z[i, v, c])
        for j in range(cols_out):
            taps = tl.zeros([BLOCK_IN, BLOCK_C], dtype=tl.float32)
            for t in tl.static_range(PW):
                if TRANSPOSE:
                    idx2 = v * PW + t - j + W - 1
                else:
                    idx2 = j * PW + t - v + W - 1
                taps += tl.load(kw_ptr + r * skwr + c[None, :] * skwc + idx2[:, None], mask=mask2, other=0.0)
            out = tl.sum(taps[None, :, :] * z, axis=1) / PW  # (ROWS, BLOCK_C)
            if r > 0:
                out += tl.load(y_rows + j * syw, mask=mask_out, other=0.0).to(tl.float32)
            elif HAS_SKIP:
                if TRANSPOSE:  # the skip's gradient, spread over its pooling window
                    inside = (i < HO * PH) & (j < WO * PW)
                    g = tl.load(x_base + (i[:, None] // PH) * sxh + (j // PW) * sxw + c[None, :] * sxc,
                                mask=mask_out & inside[:, None], other=0.0)
                    out += skip_d[None, :] * g.to(tl.float32) / (PH * PW)
                else:
                    pooled = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
                    for s in tl.static_range(PH):
                        for t in tl.static_range(PW):
                            pooled += tl.load(x_base + (i[:, None] * PH + s) * sxh + (j * PW + t) * sxw
                                              + c[None, :] * sxc, mask=mask_out, other=0.0).to(tl.float32)
                    out += skip_d[None, :] * pooled / (PH * PW)
            tl.store(y_rows + j * syw, out.to(y_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _kernel_grad_kernel(
        x_ptr, g_ptr, kh_ptr, kw_ptr, dkh_ptr, dkw_ptr, dd_ptr,
        C, H, W, HO, WO, R,
        sxb, sxh, sxw, sxc, sgb, sgh, sgw, sgc,
        skr, skc, skwr, skwc,
        PH: tl.constexpr, PW: tl.constexpr, HAS_SKIP: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-image gradients of the taps (fp32 (B, R, C, 2H - 1) and (B, R, C, 2W - 1), contiguous, zeroed: the caller
    sums over B) and the gradient of D (fp32 (C,), atomic adds across images), given the output gradient
    g (B, HO, WO, C). One program per (image, block of ROWS output rows, channel block), its rows at once (each
    input row read serves them all); each tap value it finds is added to its image's slice with a reduction (an
    atomic add whose result is unused: no round trip, and only the few programs of one image write there), instead
    of being selected into a register tile of every tap, which costs a full-tile pass per tap."""
    b = tl.program_id(0)
    p = tl.program_id(1) * ROWS + tl.arange(0, ROWS)  # output rows
    p_ok = p < HO
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    w = tl.arange(0, BLOCK_IN)
    w_ok = w < W
    mask2 = w_ok[:, None] & c_ok[None, :]
    mask_pc = p_ok[:, None] & c_ok[None, :]
    x_base = x_ptr + b * sxb
    g_rows = g_ptr + b * sgb + p[:, None] * sgh + c[None, :] * sgc  # (ROWS, BLOCK_C) pointers of column 0
    n_h = 2 * H - 1
    n_w = 2 * W - 1
    for r in range(R):
        dkh_base = dkh_ptr + ((b * R + r) * C + c) * n_h
        dkw_base = dkw_ptr + ((b * R + r) * C + c) * n_w
        # zh[p, w, c] = sum_h A[p, h, c] x[h, w, c]: the rows' H-axis results
        zh = tl.zeros([ROWS, BLOCK_IN, BLOCK_C], dtype=tl.float32)
        for h in range(H):
            tap = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
            for s in tl.static_range(PH):
                tap += tl.load(kh_ptr + r * skr + c[None, :] * skc + (p[:, None] * PH + s - h + H - 1), mask=mask_pc,
                               other=0.0).to(tl.float32)
            row = tl.load(x_base + h * sxh + w[:, None] * sxw + c[None, :] * sxc, mask=mask2, other=0.0)
            zh += (tap / PH)[:, None, :] * row.to(tl.float32)[None, :, :]
        # gw[p, w, c] = sum_q B[q, w, c] g[p, q, c]
        gw = tl.zeros([ROWS, BLOCK_IN, BLOCK_C], dtype=tl.float32)
        for q in range(WO):
            gq = tl.load(g_rows + q * sgw, mask=mask_pc, other=0.0).to(tl.float32)
            for t in tl.static_range(PW):
                idx = q * PW + t - w + W - 1
                taps = tl.load(kw_ptr + r * skwr + c[None, :] * skwc + idx[:, None], mask=mask2, other=0.0)
                gw += taps.to(tl.float32)[None, :, :] * gq[:, None, :]
        gw = gw / PW
        # tap o of the W axis: (1 / PW) sum_{p, w} zh[p, w, c] sum_t g[p, q, c] where q PW + t = o + w - W + 1
        for o in range(n_w):
            val = tl.zeros([BLOCK_C], dtype=tl.float32)
            for t in tl.static_range(PW):
                m = o + w - W + 1 - t
                q_of_w = m // PW  # (a new name: a loop variable may not change type in compiled Triton)
                ok = w_ok & (m >= 0) & (m % PW == 0) & (q_of_w < WO)
                gv = tl.load(g_rows[:, None, :] + q_of_w[None, :, None] * sgw,
                             mask=mask_pc[:, None, :] & ok[None, :, None], other=0.0)
                val += tl.sum(tl.sum(gv.to(tl.float32) * zh, axis=1), axis=0)
            tl.atomic_add(dkw_base + o, val / PW, mask=c_ok)
        # dA[p, h, c] = sum_w gw[p, w, c] x[h, w, c], spread onto the taps of the pooling window
        for h in range(H):
            row = tl.load(x_base + h * sxh + w[:, None] * sxw + c[None, :] * sxc, mask=mask2, other=0.0)
            val = tl.sum(gw * row.to(tl.float32)[None, :, :], axis=1) / PH  # (ROWS, BLOCK_C)
            for s in tl.static_range(PH):
                tl.atomic_add(dkh_base[None, :] + (p[:, None] * PH + s - h + H - 1), val, mask=mask_pc)
    if HAS_SKIP:  # dD[c] = sum_{p, q} g[p, q, c] pool(x)[p, q, c]
        qs = tl.arange(0, BLOCK_IN)
        mask3 = mask_pc[:, None, :] & (qs < WO)[None, :, None]
        pooled = tl.zeros([ROWS, BLOCK_IN, BLOCK_C], dtype=tl.float32)
        for s in tl.static_range(PH):
            for t in tl.static_range(PW):
                pooled += tl.load(x_base + (p[:, None, None] * PH + s) * sxh + (qs[None, :, None] * PW + t) * sxw
                                  + c[None, None, :] * sxc, mask=mask3, other=0.0).to(tl.float32)
        gq = tl.load(g_rows[:, None, :] + qs[None, :, None] * sgw, mask=mask3, other=0.0)
        dd = tl.sum(tl.sum(gq.to(tl.float32) * pooled, axis=1), axis=0)
        tl.atomic_add(dd_ptr + c, dd / (PH * PW), mask=c_ok)


@triton.jit
def _axis_kernel(
        x_ptr, k_ptr, y_ptr,
        C, N, NO, S,
        sxb, sxn, sxs, sxc, syb, syn, sys_, syc, skc,
        P: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The leading axis of a 3D input (time), one rank-1 term. Forward (TRANSPOSE=False): x (B, N, S, C) ->
    y (B, NO, S, C), y[b, p, s, c] = (1 / P) sum_{u < P} sum_t k[c, p P + u - t + N - 1] x[b, t, s, c] (S: the
    flattened H x W plane). Input gradient (TRANSPOSE=True): x is the output gradient (B, NO, S, C), y (B, N, S, C).
    One program per (b, block of S, channel block): each output row sums the program's input rows (from L1/L2)."""
    if TRANSPOSE:
        rows_out, rows_in = N, NO
    else:
        rows_out, rows_in = NO, N
    blocks = tl.cdiv(S, BLOCK_S)
    b = tl.program_id(0) // blocks
    s = (tl.program_id(0) % blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mask = (s < S)[:, None] & c_ok[None, :]
    x_tile = x_ptr + b * sxb + s[:, None] * sxs + c[None, :] * sxc
    y_tile = y_ptr + b * syb + s[:, None] * sys_ + c[None, :] * syc
    for i in range(rows_out):
        acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        for a in range(rows_in):
            tap = tl.zeros([BLOCK_C], dtype=tl.float32)
            for u in tl.static_range(P):
                if TRANSPOSE:
                    idx = a * P + u - i + N - 1
                else:
                    idx = i * P + u - a + N - 1
                tap += tl.load(k_ptr + c * skc + idx, mask=c_ok, other=0.0).to(tl.float32)
            row = tl.load(x_tile + a * sxn, mask=mask, other=0.0)
            acc += tap[None, :] * row.to(tl.float32)
        tl.store(y_tile + i * syn, (acc / P).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _axis_grad_kernel(
        x_ptr, g_ptr, dk_ptr,
        C, N, NO, S, S_CHUNK,
        sxb, sxn, sxs, sxc, sgb, sgn, sgs, sgc,
        P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Gradient of the taps of `_axis_kernel` (forward) given its output gradient g (B, NO, S, C): per (image,
    chunk of S_CHUNK plane positions), a fp32 (C, 2N - 1) slice of dk (B, chunks, C, 2N - 1), zeroed, that only
    this program writes (the caller sums over images and chunks). For each pair of rows (p, t) it reduces
    g[b, p, s, c] x[b, t, s, c] over its positions and adds the result to the taps p P + u - t + N - 1, u < P."""
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n_taps = 2 * N - 1
    dk_base = dk_ptr + ((b * tl.num_programs(1) + chunk) * C + c) * n_taps
    start = chunk * S_CHUNK
    for p in range(NO):
        for t in range(N):
            val = tl.zeros([BLOCK_C], dtype=tl.float32)
            for s0 in range(start, tl.minimum(start + S_CHUNK, S), BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                mask = ((s < S) & (s < start + S_CHUNK))[:, None] & c_ok[None, :]
                g = tl.load(g_ptr + b * sgb + p * sgn + s[:, None] * sgs + c[None, :] * sgc, mask=mask, other=0.0)
                x = tl.load(x_ptr + b * sxb + t * sxn + s[:, None] * sxs + c[None, :] * sxc, mask=mask, other=0.0)
                val += tl.sum(g.to(tl.float32) * x.to(tl.float32), axis=0)
            for u in tl.static_range(P):
                idx = p * P + u - t + N - 1  # (pairs share taps: read, add, write; no other program writes here)
                old = tl.load(dk_base + idx, mask=c_ok, other=0.0)
                tl.store(dk_base + idx, old + val / P, mask=c_ok)


# ----- the same convolution on tensor cores ('dot') -----

# Values of one (BLOCK_C, S, S) tensor of a forward or input-gradient program, and of a kernel-gradient program
# (more tensors live at once). Small: a thread's registers bound the warps an SM keeps, and these programs wait on
# chains of dependent products (registers per kernel for sm_90: README, "H200"; `gpu_check` times the former tiles).
# From S = 32 (and in every kernel-gradient program) a program holds one channel.
DOT_TILE = 1024
DOT_GRAD_TILE = 256
# The kernel gradient's products contract over blocks of at most this many rows or columns (`_dot_grad_kernel`'s
# SPLIT), each block a pass over the images, and its diagonal sums read as many rows at a time: fewer values live,
# more reads of the input planes (from the L2 cache). For sm_90, whole products spilled registers at S = 64
# (1.9-3.3 KB, the diagonal sums gathered at once), blocks of 16 spill 0.2-0.4 KB there and none at S = 32
# (`gpu_check` times 'dot_unsplit' beside them)
DOT_GRAD_BLOCK = 16
# Warps per program; 0: one per 16 rows of the program's tiles (BLOCK_C x S / 16, at most 8). Chained products lay
# their warps along the rows, so warps beyond those rows repeat others' products (8 warps on a 32 x 32 tile: each
# product four times, in registers a quarter of the warps would hold; `gpu_check` times 0 as 'dot_row_warps')
DOT_WARPS = 8
# Images per program (at most): a program builds its channels' operators and, in the kernel gradient, reduces their
# gradients to taps once for all its images (the same work for every image; one image per program repeated it)
DOT_IMAGES = 8
KERNEL_ALGORITHMS = ('sum', 'dot')
# by spatial rank (images, clips): measured on an H200 (README)
DEFAULT_KERNEL_ALGORITHM = {2: 'dot', 3: 'sum'}


@triton.jit
def _toeplitz(k_ptr, c, c_ok, row, col, n, P: tl.constexpr, TRANSPOSE: tl.constexpr, mask):
    """(BLOCK_C, S, S) fp32 operator of one axis: TRANSPOSE=False, [c, i, a] = (1 / P) sum_{s < P}
    k[c, i P + s - a + n - 1] (rows i: outputs, columns a: inputs); TRANSPOSE=True, its transpose [c, a, i]
    (`row` a, `col` i). `k_ptr` points at one rank term, `c` (BLOCK_C, 1, 1) holds channel offsets of k."""
    full = mask & c_ok
    op = tl.zeros(full.shape, dtype=tl.float32)
    for s in tl.static_range(P):
        if TRANSPOSE:
            idx = col * P + s - row + n - 1
        else:
            idx = row * P + s - col + n - 1
        op += tl.load(k_ptr + c + idx, mask=full, other=0.0).to(tl.float32)
    return op / P


@triton.jit
def _pooling(row, col, n_out, P: tl.constexpr, TRANSPOSE: tl.constexpr):
    """(1, S, S) fp32 average-pooling operator of one axis: [i, a] = 1 / P where a // P == i < n_out
    (TRANSPOSE: its transpose, [a, i])."""
    if TRANSPOSE:
        hit = (row // P == col) & (col < n_out)
    else:
        hit = (col // P == row) & (row < n_out)
    return tl.where(hit, 1.0 / P, 0.0)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr):
    """The batched product of (BLOCK_C, M, K) and (BLOCK_C, K, N) tensors, fp32 (BLOCK_C, M, N). One channel's
    as a 2D dot: for a batch of one, Triton's 3D dot took up to twice the registers and spilled (sm_90, S >= 32)."""
    if BLOCK_C == 1:
        z = tl.dot(tl.reshape(a, [a.shape[1], a.shape[2]]), tl.reshape(b, [b.shape[1], b.shape[2]]),
                   input_precision=PRECISION)
        return tl.reshape(z, [1, a.shape[1], b.shape[2]])
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _dot_conv_kernel(
        x_ptr, kh_ptr, kw_ptr, d_ptr, y_ptr,
        B, C, H, W, HO, WO,
        sxb, sxh, sxw, sxc, syb, syh, syw, syc,
        skr, skc, skwr, skwc,
        R: tl.constexpr, IMAGES: tl.constexpr,
        PH: tl.constexpr, PW: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_SKIP: tl.constexpr,
        S: tl.constexpr, BLOCK_C: tl.constexpr, OPERANDS: tl.constexpr, PRECISION: tl.constexpr,
):
    """`_conv_kernel` as matrix products per channel: y[c] = sum_r A_r[c] x[c] B_r[c]^T (+ D[c] pool(x[c])), each
    image's (H, W) plane of a channel a padded (S, S) matrix and the channels of a program the batch of 3D dots
    (TRANSPOSE: the input gradient A_r^T g B_r). One program per (group of IMAGES images, channel block): it builds
    the Toeplitz operators from the taps (gathered from the small kernels) once for its images when there is one
    rank term, reads each input once and writes each output once, all in registers."""
    b0 = tl.program_id(0) * IMAGES
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[:, None, None]
    c_ok = c < C
    m = tl.arange(0, S)[None, :, None]
    n = tl.arange(0, S)[None, None, :]
    if TRANSPOSE:
        rows_out, rows_in, cols_in, cols_out = H, HO, WO, W
    else:
        rows_out, rows_in, cols_in, cols_out = HO, H, W, WO
    left_mask = (m < rows_out) & (n < rows_in)  # [., i, a]: output row i, input row a
    right_mask = (m < cols_in) & (n < cols_out)  # [., v, j]: input column v, output column j
    if R == 1:  # the same operators for every image of the program
        left0 = _toeplitz(kh_ptr, c * skc, c_ok, m, n, H, PH, TRANSPOSE, left_mask).to(OPERANDS)
        right0 = _toeplitz(kw_ptr, c * skwc, c_ok, n, m, W, PW, TRANSPOSE, right_mask).to(OPERANDS)
    if HAS_SKIP:
        d = tl.load(d_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        if PH != 1 or PW != 1:  # D times the input pooled (forward) or spread over the pooling windows (TRANSPOSE)
            pool_left = (tl.broadcast_to(_pooling(m, n, HO, PH, TRANSPOSE), [BLOCK_C, S, S]) * d).to(OPERANDS)
            pool_right = tl.broadcast_to(_pooling(n, m, WO, PW, TRANSPOSE), [BLOCK_C, S, S]).to(OPERANDS)
    for i in range(IMAGES):
        b = b0 + i
        b_ok = b < B
        inp = tl.load(x_ptr + b * sxb + m * sxh + n * sxw + c * sxc,
                      mask=b_ok & c_ok & (m < rows_in) & (n < cols_in), other=0.0).to(OPERANDS)
        acc = tl.zeros([BLOCK_C, S, S], dtype=tl.float32)
        for r in tl.static_range(R):
            if R == 1:
                left = left0
                right = right0
            else:
                left = _toeplitz(kh_ptr + r * skr, c * skc, c_ok, m, n, H, PH, TRANSPOSE, left_mask).to(OPERANDS)
                # the right operator is B^T ([v, j] = B[j, v]): the transposed Toeplitz of the forward, and vice versa
                right = _toeplitz(kw_ptr + r * skwr, c * skwc, c_ok, n, m, W, PW, TRANSPOSE, right_mask).to(OPERANDS)
            z = _mm(left, inp, PRECISION, BLOCK_C)
            acc += _mm(z.to(OPERANDS), right, PRECISION, BLOCK_C)
        if HAS_SKIP:
            if PH == 1 and PW == 1:  # D x, elementwise (products would double the program's dots)
                acc += d * inp.to(tl.float32)
            else:
                z = _mm(pool_left, inp, PRECISION, BLOCK_C)
                acc += _mm(z.to(OPERANDS), pool_right, PRECISION, BLOCK_C)
        tl.store(y_ptr + b * syb + m * syh + n * syw + c * syc, acc.to(y_ptr.dtype.element_ty),
                 mask=b_ok & c_ok & (m < rows_out) & (n < cols_out))


@triton.jit
def _diagonal_sums(mat, scratch_ptr, n, P: tl.constexpr, S: tl.constexpr, BLOCK_C: tl.constexpr,
                   TAPS: tl.constexpr, ROWS: tl.constexpr):
    """(BLOCK_C, TAPS) fp32: tap o of an axis of n inputs gets (1 / P) sum of mat[c, i, a] (rows i: outputs,
    columns a: inputs, zero beyond the axis) over i P + s - a + n - 1 = o, s < P: the gradient of the taps given
    that of the Toeplitz operator. `mat` goes to this program's (BLOCK_C, S, S) fp32 `scratch` and comes back ROWS
    rows at a time, each row's entries gathered onto the taps, then summed over the rows (gathering the whole
    matrix at once took the registers of (BLOCK_C, S, TAPS) values: at S = 64 they spilled)."""
    cc = tl.arange(0, BLOCK_C)[:, None, None]
    i = tl.arange(0, S)[None, :, None]
    tl.store(scratch_ptr + (cc * S + i) * S + tl.arange(0, S)[None, None, :], mat)
    tl.debug_barrier()  # (the stores of every thread of the program, before any reads them)
    o = tl.arange(0, TAPS)[None, None, :]
    sums = tl.zeros([BLOCK_C, TAPS], dtype=tl.float32)
    for block in range(S // ROWS):
        rows = block * ROWS + tl.arange(0, ROWS)[None, :, None]
        for s in tl.static_range(P):
            col = rows * P + s + n - 1 - o
            inside = (col >= 0) & (col < S)
            sums += tl.sum(tl.load(scratch_ptr + (cc * S + rows) * S + col, mask=inside, other=0.0), axis=1)
    tl.debug_barrier()  # (every read done before the scratch is written again)
    return sums / P


@triton.jit
def _planes(x_ptr, g_ptr, b, B, m, n, q, c, sxb, sxh, sxw, sxc, sgb, sgh, sgw, sgc, x_mask, g_mask,
            OPERANDS: tl.constexpr, ROWS: tl.constexpr = False):
    """Image b's (BLOCK_C, S, S) plane of the input x and its block of the output gradient g in OPERANDS (zero
    beyond the batch and the masks): g's columns `q` (BLOCK_C, S, S / SPLIT), or with ROWS its rows `q`
    (BLOCK_C, S / SPLIT, S)."""
    b_ok = b < B
    xo = tl.load(x_ptr + b * sxb + m * sxh + n * sxw + c * sxc, mask=b_ok & x_mask, other=0.0).to(OPERANDS)
    if ROWS:
        g_off = q * sgh + n * sgw
    else:
        g_off = m * sgh + q * sgw
    go = tl.load(g_ptr + b * sgb + g_off + c * sgc, mask=b_ok & g_mask, other=0.0).to(OPERANDS)
    return xo, go


@triton.jit
def _dot_grad_kernel(
        x_ptr, g_ptr, kh_ptr, kw_ptr, dkh_ptr, dkw_ptr, dd_ptr, scratch_ptr,
        B, C, H, W, HO, WO, R,
        sxb, sxh, sxw, sxc, sgb, sgh, sgw, sgc,
        skr, skc, skwr, skwc,
        IMAGES: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, HAS_SKIP: tl.constexpr,
        S: tl.constexpr, BLOCK_C: tl.constexpr, TAPS: tl.constexpr, SPLIT: tl.constexpr, OPERANDS: tl.constexpr,
        PRECISION: tl.constexpr,
):
    """`_kernel_grad_kernel` as matrix products: per rank term, the gradients of the operators,
    dA = sum over images of g (x B^T)^T and dB^T = sum of (A x)^T g, then their diagonal sums (`_diagonal_sums`)
    into this program's fp32 slices of dkh (groups, R, C, 2H - 1) and dkw (groups, R, C, 2W - 1), and dD (groups, C)
    (the caller sums over the groups). One program per (group of IMAGES images, channel block): the operators are
    built and their gradients reduced to taps once per group. Each product's contraction (the output columns for
    dA, the output rows for dB^T) runs in SPLIT blocks of S / SPLIT, each a pass over the images with its block of
    the operator and of g (`DOT_GRAD_BLOCK`); the diagonal sums read as many rows at a time. The products multiply
    in OPERANDS (accumulating in float32), the operators' gradients in float32; `scratch` holds (programs, BLOCK_C,
    S, S) fp32 for the diagonal sums."""
    grp = tl.program_id(0)
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[:, None, None]
    c_ok = c < C
    scratch_ptr += (grp * tl.num_programs(1) + tl.program_id(1)) * BLOCK_C * S * S  # this program's
    m = tl.arange(0, S)[None, :, None]
    n = tl.arange(0, S)[None, None, :]
    q_rows = tl.arange(0, S // SPLIT)[None, :, None]  # offsets within a block of rows
    q_cols = tl.arange(0, S // SPLIT)[None, None, :]  # and of columns
    x_mask = c_ok & (m < H) & (n < W)
    o = tl.arange(0, TAPS)[None, :]
    n_h = 2 * H - 1
    n_w = 2 * W - 1
    dd = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_SKIP and (PH != 1 or PW != 1):
        pool_left = tl.broadcast_to(_pooling(m, n, HO, PH, False), [BLOCK_C, S, S]).to(OPERANDS)
    for r in range(R):
        # one operator gradient after the other, each in SPLIT passes over the images (fewer tensors live at once;
        # the later passes read the planes from the L2 cache)
        da = tl.zeros([BLOCK_C, S, S], dtype=tl.float32)
        for q in range(SPLIT):
            j = q * (S // SPLIT) + q_cols  # output columns: B's rows, g's columns
            bt_op = _toeplitz(kw_ptr + r * skwr, c * skwc, c_ok, j, m, W, PW, False, (m < W) & (j < WO))  # [v, j]
            bt_op = bt_op.to(OPERANDS)
            g_mask = c_ok & (m < HO) & (j < WO)
            for i in range(IMAGES):
                b = grp * IMAGES + i
                xo, go = _planes(x_ptr, g_ptr, b, B, m, n, j, c, sxb, sxh, sxw, sxc, sgb, sgh, sgw, sgc, x_mask,
                                 g_mask, OPERANDS)
                xb = _mm(xo, bt_op, PRECISION, BLOCK_C)  # x B^T: [a, j]
                da += _mm(go, tl.permute(xb, (0, 2, 1)).to(OPERANDS), PRECISION, BLOCK_C)  # [i, a]
                if HAS_SKIP:  # dD[c] = sum g pool(x), once (in the first term's pass)
                    if PH != 1 or PW != 1:
                        pool_right = tl.broadcast_to(_pooling(j, m, WO, PW, False), [BLOCK_C, S, S // SPLIT])
                        pooled = _mm(_mm(pool_left, xo, PRECISION, BLOCK_C).to(OPERANDS), pool_right.to(OPERANDS),
                                     PRECISION, BLOCK_C)
                    elif SPLIT == 1:
                        pooled = xo.to(tl.float32)
                    else:  # x's columns of this block
                        pooled = tl.load(x_ptr + b * sxb + m * sxh + j * sxw + c * sxc,
                                         mask=(b < B) & c_ok & (m < H) & (j < W), other=0.0).to(tl.float32)
                    dd += tl.where(r == 0, tl.sum(tl.sum(go.to(tl.float32) * pooled, axis=2), axis=1), 0.0)
        dkh = _diagonal_sums(da, scratch_ptr, H, PH, S, BLOCK_C, TAPS, S // SPLIT)
        tl.store(dkh_ptr + ((grp * R + r) * C + c1[:, None]) * n_h + o, dkh, mask=(c1 < C)[:, None] & (o < n_h))
        dbt = tl.zeros([BLOCK_C, S, S], dtype=tl.float32)
        for q in range(SPLIT):
            rows = q * (S // SPLIT) + q_rows  # output rows: A's rows, g's rows
            a_op = _toeplitz(kh_ptr + r * skr, c * skc, c_ok, rows, n, H, PH, False, (rows < HO) & (n < H))  # [i, a]
            a_op = a_op.to(OPERANDS)
            g_mask = c_ok & (rows < HO) & (n < WO)
            for i in range(IMAGES):
                xo, go = _planes(x_ptr, g_ptr, grp * IMAGES + i, B, m, n, rows, c, sxb, sxh, sxw, sxc, sgb, sgh,
                                 sgw, sgc, x_mask, g_mask, OPERANDS, ROWS=True)
                ax = _mm(a_op, xo, PRECISION, BLOCK_C)  # A x: [i, v]
                dbt += _mm(tl.permute(ax, (0, 2, 1)).to(OPERANDS), go, PRECISION, BLOCK_C)  # [v, j]
        # dB^T[v, j] is dB[j, v]: B's rows j are its outputs, the diagonal sums of its transpose
        dkw = _diagonal_sums(tl.permute(dbt, (0, 2, 1)), scratch_ptr, W, PW, S, BLOCK_C, TAPS, S // SPLIT)
        tl.store(dkw_ptr + ((grp * R + r) * C + c1[:, None]) * n_w + o, dkw, mask=(c1 < C)[:, None] & (o < n_w))
    if HAS_SKIP:
        tl.store(dd_ptr + grp * C + c1, dd, mask=c1 < C)


_ALGORITHM = ForcedChoice('s4nd_fused_algorithm')


@contextlib.contextmanager
def fused_algorithm(algorithm: Optional[str]) -> Iterator[None]:
    """Within this context the fused 2D convolution runs `algorithm`: 'sum' (`_conv_kernel`, sums on CUDA cores)
    or 'dot' (`_dot_conv_kernel`, matrix products on tensor cores);
    None: `DEFAULT_KERNEL_ALGORITHM` (by the input's spatial rank: a clip's frames count as 3D)."""
    if algorithm is not None and algorithm not in KERNEL_ALGORITHMS:
        raise ValueError(f'algorithm must be one of {KERNEL_ALGORITHMS} or None, got {algorithm!r}')
    with _ALGORITHM.forced(algorithm):
        yield


def _use_dot(ndim: int) -> bool:
    """Whether the 2D convolution of the planes of an input of spatial rank `ndim` runs 'dot': as forced, else
    `DEFAULT_KERNEL_ALGORITHM`, except under `torch.use_deterministic_algorithms`, where only 'dot' gives the same
    gradients every run ('sum' accumulates the taps' gradients with atomic adds, in whatever order they land)."""
    forced = _ALGORITHM.get()
    if forced is None and torch.are_deterministic_algorithms_enabled():
        return True
    return (forced or DEFAULT_KERNEL_ALGORITHM[ndim]) == 'dot'


def _alert_not_deterministic() -> None:
    """What PyTorch's nondeterministic operators do under `torch.use_deterministic_algorithms`: an error (a warning
    with warn_only=True); for the 'sum' kernel gradient, which only a forced 'sum' runs there."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = ("the 'sum' kernel gradient of s4nd_vision's fused convolution accumulates with atomic adds and is "
               "not deterministic; under torch.use_deterministic_algorithms(True) leave the algorithm to the default "
               "(fused_algorithm(None): 'dot', deterministic) or run the fast path (dispatch.force_path('fast'))")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def _dot_sizes(h: int, w: int, tile: int) -> Tuple[int, int]:
    """(S, BLOCK_C) of the dot kernels: the planes padded to S x S (a power of two, at least tl.dot's 16), and
    as many channels per program as keep each of its (BLOCK_C, S, S) tensors within `tile` values, at most 8."""
    side = max(16, triton.next_power_of_2(max(h, w)))
    return side, max(1, min(8, tile // side ** 2))


def _dot_warps(side: int, block_c: int) -> int:
    """num_warps of a dot program of (block_c, side, side) tiles (`DOT_WARPS`)."""
    return DOT_WARPS or max(1, min(8, block_c * side // 16))


def _dot_grad_split(side: int) -> int:
    """Blocks of the kernel gradient's contractions over a side S (`DOT_GRAD_BLOCK` rows or columns each, at least
    16: tl.dot's operands have sides of 16 or more)."""
    return max(1, side // max(16, DOT_GRAD_BLOCK))


def _dot_images(b: int) -> int:
    """Images per program of the dot kernels: a power of two up to `DOT_IMAGES`, leaving at least 16 programs per
    channel block (small batches keep one image per program, and the GPU filled)."""
    return max(1, min(DOT_IMAGES, triton.next_power_of_2(b // 16 + 1) // 2))


def _block_c(c: int) -> int:
    return min(32, triton.next_power_of_2(c))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 through three TF32 products (float32 accuracy on tensor cores)."""
    return 'tf32x3' if dtype == torch.float32 else 'ieee'  # (16-bit inputs: their own precision)


def _operands(dtype: torch.dtype):
    """The dtype `_dot_conv_kernel` multiplies in: the input's, except bfloat16 under Triton's interpreter, whose
    dot multiplies bfloat16 values as the integers that store them (Triton 3.8): float32 there."""
    if dtype == torch.bfloat16 and os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
        return tl.float32
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _launch_conv(x, kh, kw, skip, pools, out_hw, transpose: bool, dot: bool,
                 operands: Optional[torch.dtype] = None) -> torch.Tensor:
    """Forward (transpose=False, x the input) or input gradient (transpose=True, x the output gradient), by
    `_dot_conv_kernel` (dot: its products in `operands`, by default x's dtype) or `_conv_kernel`."""
    b, _, _, c = x.shape
    h, w = (out_hw if transpose else x.shape[1:3])
    ho, wo = h // pools[0], w // pools[1]
    rows, cols = (h, w) if transpose else (ho, wo)
    if dot:  # (the rank-1 terms are summed in registers, in float32)
        y = torch.empty((b, rows, cols, c), device=x.device, dtype=x.dtype)
        kh, kw = kh.contiguous(), kw.contiguous()
        side, block_c = _dot_sizes(h, w, DOT_TILE)
        images = _dot_images(b)
        _dot_conv_kernel[(triton.cdiv(b, images), triton.cdiv(c, block_c))](
            x, kh, kw, skip.contiguous() if skip is not None else kh, y,
            b, c, h, w, ho, wo,
            *x.stride(), *y.stride(), kh.stride(0), kh.stride(1), kw.stride(0), kw.stride(1),
            R=kh.shape[0], IMAGES=images, PH=pools[0], PW=pools[1], TRANSPOSE=transpose, HAS_SKIP=skip is not None,
            S=side, BLOCK_C=block_c, OPERANDS=_operands(operands or x.dtype), PRECISION=_precision(operands or x.dtype),
            num_warps=_dot_warps(side, block_c))
        return y
    # the rank-1 terms are summed in y: over several, in float32 (in a 16-bit y every term would round the sum)
    y = torch.empty((b, rows, cols, c), device=x.device, dtype=x.dtype if kh.shape[0] == 1 else torch.float32)
    kh, kw = kh.contiguous(), kw.contiguous()
    skip = skip.contiguous() if skip is not None else None  # (read at stride 1)
    block_in = triton.next_power_of_2(wo if transpose else w)
    rows_per_program = _conv_rows(rows, block_in, _block_c(c))
    grid = (b * triton.cdiv(rows, rows_per_program), triton.cdiv(c, _block_c(c)))
    _conv_kernel[grid](
        x, kh, kw, skip if skip is not None else kh, y,
        c, h, w, ho, wo, kh.shape[0],
        *x.stride(), *y.stride(), kh.stride(0), kh.stride(1), kw.stride(0), kw.stride(1),
        PH=pools[0], PW=pools[1], TRANSPOSE=transpose, HAS_SKIP=skip is not None,
        ROWS=rows_per_program, BLOCK_IN=block_in, BLOCK_C=_block_c(c), num_warps=CONV_WARPS)
    return y.to(x.dtype)


def _conv_rows(rows: int, block_in: int, block_c: int) -> int:
    """Output rows per program of `_conv_kernel` (a power of two): a (ROWS, BLOCK_IN, BLOCK_C) accumulator of at
    most `CONV_TILE` values, e.g. 4 rows at sides 33-64, 8 at 17-32."""
    return min(triton.next_power_of_2(rows), max(1, CONV_TILE // (block_in * block_c)))


def _readable(t: torch.Tensor) -> torch.Tensor:
    """t as the kernels read it: C contiguous (stride 1), and spanning at most `MAX_ELEMENTS` elements of memory
    (they index in int32: a view with gaps, e.g. a slice of a wider tensor, can span more than its elements, which
    `supported` counts); else a contiguous copy."""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t if t.stride(-1) == 1 and span <= MAX_ELEMENTS else t.contiguous()


def _check_operands(operands: Optional[torch.dtype]) -> Optional[torch.dtype]:
    if operands is not None and operands not in DTYPES:
        raise ValueError(f'operands must be one of {DTYPES} or None, got {operands!r}')
    return operands


def _check_devices(name: str, x: torch.Tensor, *others: Optional[torch.Tensor]) -> None:
    """The kernels read every tensor on x's device (they launch there, `on_tensor_device`): PyTorch's check for its
    own operators; and that device must be one Triton launches on (`check_device`)."""
    devices = [t.device for t in others if t is not None]
    if any(d != x.device for d in devices):
        raise ValueError(f'kernels and skip must be on the input\'s device {x.device}, got {devices}')
    check_device(name, x.device)


def _check(x: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor, skip: Optional[torch.Tensor], pools) -> None:
    if x.ndim != 4:
        raise ValueError(f'x must be (B, H, W, C), got shape {tuple(x.shape)}')
    reason = supported(x.shape, pools, x.dtype)
    if reason is not None:
        raise ValueError(f'separable_conv2d_cl: {reason}')
    _, h, w, c = x.shape
    if (kh.shape[1:] != (c, 2 * h - 1) or kw.shape[1:] != (c, 2 * w - 1) or kh.shape[0] != kw.shape[0]
            or kh.shape[0] < 1):
        raise ValueError(f'kernels must be (R, C, 2H - 1) = (R, {c}, {2 * h - 1}) and (R, C, 2W - 1) = (R, {c}, '
                         f'{2 * w - 1}) with R >= 1, got {tuple(kh.shape)} and {tuple(kw.shape)}')
    if skip is not None and skip.shape != (c,):
        raise ValueError(f'skip must be ({c},), got {tuple(skip.shape)}')
    _check_devices('separable_conv2d_cl', x, kh, kw, skip)


@torch.library.custom_op('s4nd_vision::separable_conv2d_cl', mutates_args=())
@on_tensor_device
def _conv_op(x: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor, skip: Optional[torch.Tensor],
             pool_h: int, pool_w: int, dot: bool, operands: Optional[torch.dtype]) -> torch.Tensor:
    return _launch_conv(x, kh, kw, skip, (pool_h, pool_w), None, transpose=False, dot=dot, operands=operands)


@_conv_op.register_fake
def _(x, kh, kw, skip, pool_h, pool_w, dot, operands):
    b, h, w, c = x.shape
    return x.new_empty((b, h // pool_h, w // pool_w, c))


@torch.library.custom_op('s4nd_vision::separable_conv2d_cl_backward', mutates_args=())
@on_tensor_device
def _conv_backward_op(grad: torch.Tensor, x: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor,
                      skip: Optional[torch.Tensor], pool_h: int, pool_w: int, dot: bool,
                      operands: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_kh, grad_kw, grad_skip); grad_skip is empty without a skip."""
    b, h, w, c = x.shape
    grad = _readable(grad)
    grad_x = _launch_conv(grad, kh, kw, skip, (pool_h, pool_w), (h, w), transpose=True, dot=dot, operands=operands)
    if dot:
        return (grad_x,) + _dot_kernel_grads(grad, x, kh, kw, skip, (pool_h, pool_w), operands)
    _alert_not_deterministic()
    r = kh.shape[0]
    dkh = torch.zeros((b, r, c, 2 * h - 1), device=x.device, dtype=torch.float32)  # per image, summed below
    dkw = torch.zeros((b, r, c, 2 * w - 1), device=x.device, dtype=torch.float32)
    dd = torch.zeros((c if skip is not None else 0,), device=x.device, dtype=torch.float32)
    khc, kwc = kh.contiguous(), kw.contiguous()
    ho, block_in, block_c = h // pool_h, triton.next_power_of_2(w), _block_c(c)
    rows = max(1, _conv_rows(ho, block_in, block_c) // 2)  # (two accumulators: half the convolution's rows)
    grid = (b, triton.cdiv(ho, rows), triton.cdiv(c, block_c))
    _kernel_grad_kernel[grid](
        x, grad, khc, kwc, dkh, dkw, dd if skip is not None else dkh,
        c, h, w, ho, w // pool_w, r,
        *x.stride(), *grad.stride(), khc.stride(0), khc.stride(1), kwc.stride(0), kwc.stride(1),
        PH=pool_h, PW=pool_w, HAS_SKIP=skip is not None,
        ROWS=rows, BLOCK_IN=block_in, BLOCK_C=block_c, num_warps=CONV_WARPS)
    grad_skip = dd.to(skip.dtype) if skip is not None else dd
    return grad_x, dkh.sum(0).to(kh.dtype), dkw.sum(0).to(kw.dtype), grad_skip


def _dot_kernel_grads(grad, x, kh, kw, skip, pools, operands: Optional[torch.dtype] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_dot_grad_kernel`: the gradients of kh, kw and skip (empty without one), its products in `operands` (by
    default float32, whatever x's dtype)."""
    b, h, w, c = x.shape
    r = kh.shape[0]
    images = _dot_images(b)
    groups = triton.cdiv(b, images)
    dkh = torch.empty((groups, r, c, 2 * h - 1), device=x.device, dtype=torch.float32)  # per group, summed below
    dkw = torch.empty((groups, r, c, 2 * w - 1), device=x.device, dtype=torch.float32)
    dd = torch.empty((groups, c if skip is not None else 0), device=x.device, dtype=torch.float32)
    khc, kwc = kh.contiguous(), kw.contiguous()
    side, block_c = _dot_sizes(h, w, DOT_GRAD_TILE)
    blocks = triton.cdiv(c, block_c)
    scratch = torch.empty((groups * blocks * block_c * side * side,), device=x.device, dtype=torch.float32)
    _dot_grad_kernel[(groups, blocks)](
        x, grad, khc, kwc, dkh, dkw, dd if skip is not None else dkh, scratch,
        b, c, h, w, h // pools[0], w // pools[1], r,
        *x.stride(), *grad.stride(), khc.stride(0), khc.stride(1), kwc.stride(0), kwc.stride(1),
        IMAGES=images, PH=pools[0], PW=pools[1], HAS_SKIP=skip is not None, S=side, BLOCK_C=block_c, TAPS=2 * side,
        SPLIT=_dot_grad_split(side),
        OPERANDS=_operands(operands or torch.float32), PRECISION=_precision(operands or torch.float32),
        num_warps=_dot_warps(side, block_c))
    dd = dd.sum(0)
    return dkh.sum(0).to(kh.dtype), dkw.sum(0).to(kw.dtype), dd.to(skip.dtype) if skip is not None else dd


@_conv_backward_op.register_fake
def _(grad, x, kh, kw, skip, pool_h, pool_w, dot, operands):
    c = x.shape[-1]
    dd = skip.new_empty((c,)) if skip is not None else x.new_empty((0,), dtype=torch.float32)
    return x.new_empty(x.shape), kh.new_empty(kh.shape), kw.new_empty(kw.shape), dd


def _setup_context(ctx, inputs, output):
    x, kh, kw, skip, pool_h, pool_w, dot, operands = inputs
    ctx.save_for_backward(x, kh, kw, skip)
    ctx.pools, ctx.dot, ctx.operands = (pool_h, pool_w), dot, operands


def _backward(ctx, grad):
    x, kh, kw, skip = ctx.saved_tensors
    grad_x, dkh, dkw, dd = _conv_backward_op(grad, x, kh, kw, skip, *ctx.pools, ctx.dot, ctx.operands)
    return grad_x, dkh, dkw, dd if skip is not None else None, None, None, None, None


_conv_op.register_autograd(_backward, setup_context=_setup_context)


def separable_conv2d_cl(
        x: torch.Tensor,
        kernels: Tuple[torch.Tensor, torch.Tensor],
        pools: Tuple[int, int] = (1, 1),
        skip: Optional[torch.Tensor] = None,
        operands: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Separable 2D convolution of a channels-last input, fused (one Triton launch forward, two backward).

    Args:
        x: (B, H, W, C) with C contiguous (e.g. `x.permute(0, 2, 3, 1)` of a channels-last (B, C, H, W) tensor).
        kernels: (R, C, 2H - 1) and (R, C, 2W - 1) two-sided kernels of R rank-1 terms (`ops.two_sided_kernel`).
        pools: average pooling window (and stride) per axis, 1, 2 or 4.
        skip: optional (C,) weights D of the skip term D * pool(x).
        operands: the dtype the tensor-core kernels multiply in (accumulating in float32), e.g. autocast's
            bfloat16 for a float32 x, read as it is (no cast copy); None: x's dtype forward, float32 for the
            kernels' gradients. The 'sum' kernels multiply in float32.

    Returns:
        (B, H // pools[0], W // pools[1], C) in x's dtype (accumulated in float32), C contiguous.
    """
    if len(kernels) != 2:
        raise ValueError(f'kernels must be 2 tensors (height, width), got {len(kernels)}')
    kh, kw = kernels
    pools = tuple(int(p) for p in pools)
    _check(x, kh, kw, skip, pools)
    x = _readable(x)
    return _conv_op(x, kh, kw, skip, pools[0], pools[1], _use_dot(2), _check_operands(operands))


AXIS_BLOCK_S = 32  # plane positions per program of the time axis (BLOCK_S x BLOCK_C fp32 accumulator)
AXIS_GRAD_CHUNKS = 8  # plane chunks per image of the time axis' tap gradient (more programs, then one sum)


def _launch_axis(x: torch.Tensor, k: torch.Tensor, pool: int, n: int, transpose: bool) -> torch.Tensor:
    """`_axis_kernel`: forward (x (B, N, S, C) -> (B, N // pool, S, C)) or, with `transpose`, the input gradient
    (x the output gradient (B, N // pool, S, C) -> (B, n, S, C))."""
    b, rows, plane, c = x.shape
    rows_out = n if transpose else n // pool
    y = torch.empty((b, rows_out, plane, c), device=x.device, dtype=x.dtype)
    k = k.contiguous()
    block_c = _block_c(c)
    grid = (b * triton.cdiv(plane, AXIS_BLOCK_S), triton.cdiv(c, block_c))
    _axis_kernel[grid](
        x, k, y, c, n, n // pool, plane, *x.stride(), *y.stride(), k.stride(0),
        P=pool, TRANSPOSE=transpose, BLOCK_S=AXIS_BLOCK_S, BLOCK_C=block_c)
    return y


@torch.library.custom_op('s4nd_vision::axis_conv_cl', mutates_args=())
@on_tensor_device
def _axis_op(x: torch.Tensor, k: torch.Tensor, pool: int) -> torch.Tensor:
    return _launch_axis(x, k, pool, x.shape[1], transpose=False)


@_axis_op.register_fake
def _(x, k, pool):
    b, n, plane, c = x.shape
    return x.new_empty((b, n // pool, plane, c))


@torch.library.custom_op('s4nd_vision::axis_conv_cl_backward', mutates_args=())
@on_tensor_device
def _axis_backward_op(grad: torch.Tensor, x: torch.Tensor, k: torch.Tensor, pool: int
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_k) of `_axis_op`."""
    b, n, plane, c = x.shape
    grad = _readable(grad)
    grad_x = _launch_axis(grad, k, pool, n, transpose=True)
    chunks = min(AXIS_GRAD_CHUNKS, triton.cdiv(plane, AXIS_BLOCK_S))
    dk = torch.zeros((b, chunks, c, 2 * n - 1), device=x.device, dtype=torch.float32)  # summed below
    block_c = _block_c(c)
    _axis_grad_kernel[(b, chunks, triton.cdiv(c, block_c))](
        x, grad, dk, c, n, n // pool, plane, triton.cdiv(plane, chunks), *x.stride(), *grad.stride(),
        P=pool, BLOCK_S=AXIS_BLOCK_S, BLOCK_C=block_c)
    return grad_x, dk.sum((0, 1)).to(k.dtype)


@_axis_backward_op.register_fake
def _(grad, x, k, pool):
    return x.new_empty(x.shape), k.new_empty(k.shape)


def _axis_setup_context(ctx, inputs, output):
    x, k, pool = inputs
    ctx.save_for_backward(x, k)
    ctx.pool = pool


def _axis_backward(ctx, grad):
    x, k = ctx.saved_tensors
    grad_x, grad_k = _axis_backward_op(grad, x, k, ctx.pool)
    return grad_x, grad_k, None


_axis_op.register_autograd(_axis_backward, setup_context=_axis_setup_context)


def separable_conv3d_cl(
        x: torch.Tensor,
        kernels: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        pools: Tuple[int, int, int] = (1, 1, 1),
        skip: Optional[torch.Tensor] = None,
        operands: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Separable 3D convolution of a channels-last clip: per rank-1 term, the time axis (`_axis_kernel`, one
    launch, its result written once) and then each frame's fused 2D convolution (`separable_conv2d_cl`); the
    skip term D * pool(x) is added by PyTorch ops.

    Args:
        x: (B, T, H, W, C) with C contiguous (e.g. `x.permute(0, 2, 3, 4, 1)` of a channels-last-3d clip).
        kernels: (R, C, 2T - 1), (R, C, 2H - 1) and (R, C, 2W - 1) two-sided kernels of R rank-1 terms.
        pools: average pooling window (and stride) per axis, 1, 2 or 4.
        skip: optional (C,) weights D of the skip term.
        operands: the dtype the frames' tensor-core kernels multiply in (see `separable_conv2d_cl`).

    Returns:
        (B, T // pools[0], H // pools[1], W // pools[2], C) in x's dtype, C contiguous (each axis accumulated in
        float32; in between, and summing rank terms, in x's dtype: see the module's docstring).
    """
    if len(kernels) != 3:
        raise ValueError(f'kernels must be 3 tensors (time, height, width), got {len(kernels)}')
    kt, kh, kw = kernels
    pools = tuple(int(p) for p in pools)
    _check3d(x, kt, kh, kw, skip, pools)
    operands = _check_operands(operands)
    x = _readable(x)
    b, t, h, w, c = x.shape
    to = t // pools[0]
    y = None
    for r in range(kt.shape[0]):
        z = _axis_op(x.reshape(b, t, h * w, c), kt[r], pools[0])  # (B, T // pool, H W, C)
        term = _conv_op(z.view(b * to, h, w, c), kh[r:r + 1], kw[r:r + 1], None, pools[1], pools[2],
                        _use_dot(3), operands)
        y = term if y is None else y + term
    y = y.view(b, to, h // pools[1], w // pools[2], c)
    if skip is None:
        return y
    pooled = x
    for dim, pool in zip((1, 2, 3), pools):
        pooled = _avg_pool_axis(pooled, dim, pool)
    return torch.addcmul(y, pooled, skip.to(y.dtype))


def _check3d(x, kt, kh, kw, skip, pools) -> None:
    if x.ndim != 5:
        raise ValueError(f'x must be (B, T, H, W, C), got shape {tuple(x.shape)}')
    reason = supported(x.shape, pools, x.dtype)
    if reason is not None:
        raise ValueError(f'separable_conv3d_cl: {reason}')
    _, t, h, w, c = x.shape
    expected = [(c, 2 * n - 1) for n in (t, h, w)]
    if [k.shape[1:] for k in (kt, kh, kw)] != expected or not 1 <= kt.shape[0] == kh.shape[0] == kw.shape[0]:
        raise ValueError(f'kernels must be (R, C, 2n - 1) per axis of n = {t}, {h}, {w}, i.e. (R, {c}, '
                         f'{2 * t - 1}), (R, {c}, {2 * h - 1}) and (R, {c}, {2 * w - 1}) with one R >= 1, got '
                         f'{tuple(kt.shape)}, {tuple(kh.shape)} and {tuple(kw.shape)}')
    if skip is not None and skip.shape != (c,):
        raise ValueError(f'skip must be ({c},), got {tuple(skip.shape)}')
    _check_devices('separable_conv3d_cl', x, kt, kh, kw, skip)
