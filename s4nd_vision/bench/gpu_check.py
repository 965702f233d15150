"""Every check of S4ND's CUDA path in one run, sized (`GPU`) to take under 8 minutes on one H100/H200.

GPU time is scarce, so one call does everything a GPU session needs, section by section, the most needed first
(`SECTIONS`, their order):

1. correctness: the fused convolution (`layers.triton_conv`, forward and every gradient, fp32 and bf16, by
   each algorithm: 'sum' and the tensor-core kernels 'dot'; then 'dot' in every configuration the models launch: a
   float32 input multiplied in bf16 as under autocast, their batches' images per program, `Plan.autocast_cases`), the
   fused kernel generation (`layers.triton_kernels`), an S4ND layer on the Triton path (also under activation
   checkpointing, against itself) and a stem-like one on the fast path, against float64 on the CPU; the custom op
   compiled by inductor (fullgraph). A failed check makes the run fail; one of the Triton path (not of the fast
   path, nor inductor's) switches the later sections that run S4ND as the dispatch chooses (models, profile,
   compiled) to its fast path, unless a path is forced.
2. models: `benchmark.bench_models` (bf16 autocast, channels-last) for the image pairs of the performance table
   and the video pair on clips.
3. bench: S4ND (Triton path and fast path) vs timm's 7x7 depthwise conv, channels-last, forward+backward, at the
   four ConvNeXt-T stage shapes, fp32, bf16 and fp32 under bf16 autocast (the models' case); the 3D layer vs the
   3D baseline's depthwise conv at the video model's stage shapes (bf16 autocast): which path the 3D dispatch
   should take.
4. dot: the fused convolution's tensor-core kernels (`triton_conv.fused_algorithm('dot')`, the default for images,
   not yet for clips; checked in correctness), first the rows that decide the dispatch's choices: the ConvNeXt pair
   with the fused kernels on every layer up to `DOT_TRY_SIDE` (the dispatch's sides are smaller), the video pair
   again with them, the layers by both algorithms and on the fast path; then the layers of the models' case by 'dot'
   with each of `DOT_VARIANTS` (the settings an H200 ran before, each compiling kernels of its own). It runs the
   paths it tries whatever failed before, and its failures and crashes switch no other row to the fast path.
5. profile: torch.profiler over training steps, then inference forwards (bf16 autocast, channels-last) of
   ConvNeXt-T and ConvNeXt-S4ND-T: step time, device kernels per step, the fraction of the step the device is busy
   (what the host's launches leave idle), top operators by device time. It decides nothing: it runs after the
   sections that do.
6. compiled: the image pairs through torch.compile, while the time budget lasts (minutes of compilation each).

Every row (a check, a layer shape, a model pair) is measured on its own: one that raises is recorded with its
traceback and the next one runs, and the JSON file is rewritten (atomically) after every row, so a run cut short
keeps everything it measured. On CUDA the rows run in a worker process that the run replaces after a row that
kills it (a crash), leaves its CUDA context unusable (a sticky error such as an illegal address, which would fail
every later row) or runs past its time limit (a hang): that row is recorded as failed and the next one runs in a
new worker (the model, profile and compiled rows on the fast path). Each row records the path it ran ('per
column' for the layer rows, whose columns force theirs). A time budget (`budget_s`) stops starting rows when it
is spent (recorded as skipped). The file states the device, versions, the commit, the plan and the path that ran.

`TINY` runs every section in seconds on the CPU, with Triton's interpreter (TRITON_INTERPRET=1): correctness and
bench run the Triton kernels; profile and models take the dispatch's choice (the fast path on the CPU; `path`
'triton' runs them on the kernels too, for minutes under the interpreter), so that the tests keep this script
working between GPU sessions.
"""
import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import create_conv2d

from ..layers import S4ND, dispatch, ops
from ..layers.reference import separable_conv_reference
from ..layers.ssm_kernel import SSMKernel, ssm_kernels
from ..models.convnext_s4nd_3d import _dw_conv3d
from ..utils.files import replaced_atomically
from .benchmark import (
    CONVNEXT_T_STAGES,
    _channels_last_input,
    _fwd_bwd,
    _inference,
    _train_step,
    bench_models,
    cuda_settings,
    describe_environment,
    environment,
    format_table,
    time_ms,
)

__all__ = ['Plan', 'GPU', 'TINY', 'SECTIONS', 'run_checks']

SECTIONS = ('correctness', 'models', 'bench', 'dot', 'profile', 'compiled')  # the order they run in
BUDGET_S = 420  # the default time budget of a GPU run: rows start until it is spent (seconds)
_MIN_LEFT_S = {'compiled': 300}  # a compiled pair compiles 4 graphs (an H200 took 358 s for the ConvNeXt pair's
# training graphs at 54b42a5, since reduced): not started with less left
_Pair = Tuple[str, dict, str]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one run."""
    batch: int  # layer benchmark, profile and image model pairs
    conv_cases: Sequence[Tuple[int, int, int, int, int, Tuple[int, int]]]  # (B, H, W, C, rank, pools)
    conv3d_cases: Sequence[Tuple[int, int, int, int, int, int, Tuple[int, int, int]]]  # (B, T, H, W, C, rank, pools)
    generation: Sequence[Tuple[int, int, float, dict]]  # fused generation entries: (dim, length, rate, SSMKernel kw)
    layer: Tuple[int, int, int, int]  # S4ND layer check on the Triton path: (B, C, side, pool)
    autocast_cases: Sequence[Tuple[Tuple[int, ...], Tuple[int, ...]]]  # the models' tensor-core kernels: (x's shape
    # (B, H, W, C) or (B, T, H, W, C), pools), a float32 x multiplied in bf16 (bf16 autocast); 128 images give
    # programs of 8, 64 frames programs of 4
    fast_layer: Tuple[int, int, int, int]  # S4ND layer check on the fast path (a stem-like layer): (B, C, side, pool)
    fast_cases: Sequence[Tuple[int, int, Tuple[int, ...]]]  # fast path, each algorithm, 1D/2D/3D: (B, C, sizes)
    stages: Sequence[Tuple[int, int]]  # layer benchmark shapes: (C, side)
    video_stages: Sequence[Tuple[int, int, int]]  # 3D layer benchmark shapes (batch `video[0]`): (C, frames, side)
    profile_models: Tuple[str, str]
    image_pairs: Sequence[_Pair]
    img_size: int
    video_pair: _Pair
    video: Tuple[int, int, int]  # (batch, frames, side)
    repeats: int
    profile_steps: int


GPU = Plan(
    batch=128,
    conv_cases=((4, 56, 56, 96, 1, (1, 1)), (2, 28, 28, 192, 2, (2, 2)), (2, 7, 7, 768, 1, (1, 1)),
                (2, 64, 48, 40, 1, (4, 4)), (3, 13, 9, 37, 1, (2, 1))),
    conv3d_cases=((2, 8, 28, 28, 96, 1, (1, 1, 1)), (2, 8, 14, 14, 192, 1, (2, 2, 2))),
    generation=((96, 56, 1.0, {}), (192, 28, 0.5, dict(bandlimit=0.5)), (40, 224, 2.0, dict(init='legs'))),
    layer=(4, 96, 56, 2),
    autocast_cases=tuple(((128, side, side, 32), (pool, pool)) for side in (56, 28, 14) for pool in (1, 2)) + tuple(
        ((8, 8, side, side, 32), (1, pool, pool)) for side in (56, 28, 14) for pool in (1, 2)),  # (the video pair's)
    fast_layer=(4, 32, 112, 4),
    fast_cases=((2, 16, (300,)), (2, 16, (300, 20)), (2, 16, (6, 12, 10))),
    stages=CONVNEXT_T_STAGES,
    video_stages=((96, 8, 56), (192, 8, 28), (384, 8, 14), (768, 8, 7)),
    profile_models=('convnext_tiny', 'convnext_s4nd_tiny'),
    image_pairs=(('convnext_s4nd_tiny', {}, 'convnext_tiny'),
                 ('vit_s4nd_small_patch16_224', {}, 'vit_small_patch16_224')),
    img_size=224,
    video_pair=('convnext_s4nd_3d_tiny', {}, 'convnext_3d_tiny'),
    video=(8, 16, 224),
    repeats=10,
    profile_steps=3,
)

TINY = Plan(
    batch=2,
    conv_cases=((1, 6, 5, 4, 1, (1, 1)), (1, 8, 8, 3, 2, (2, 2))),
    conv3d_cases=((1, 4, 3, 5, 3, 1, (2, 1, 1)),),
    generation=((4, 6, 1.0, {}), (8, 5, 0.5, dict(bandlimit=0.5)), (3, 12, 2.0, dict(init='legs'))),
    layer=(2, 8, 8, 2),
    autocast_cases=(((32, 6, 5, 3), (2, 2)), ((2, 4, 5, 4, 3), (1, 2, 2))),  # (32 images: 2 per program)
    fast_layer=(2, 4, 12, 4),
    fast_cases=((1, 3, (9,)), (1, 3, (9, 5)), (1, 3, (3, 4, 5))),
    stages=((4, 5),),
    video_stages=((4, 2, 5),),
    profile_models=('convnext_atto', 'convnext_s4nd_atto'),
    image_pairs=(('convnext_s4nd_atto', {}, 'convnext_atto'),),
    img_size=32,
    video_pair=('convnext_s4nd_3d_atto', {}, 'convnext_3d_atto'),
    video=(1, 2, 32),
    repeats=1,
    profile_steps=1,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.detach().cpu().double() - b.detach().cpu().double()).norm() / b.double().norm().clamp_min(1e-30)).item()


class _Checks:
    """Collects named checks (into `rows`, e.g. the results' list): relative errors against a limit."""

    def __init__(self, rows: Optional[List[dict]] = None):
        self.rows: List[dict] = [] if rows is None else rows
        self.row: Optional[str] = None  # the correctness row (its check function's name) the checks come from

    def add(self, name: str, errors: Dict[str, float], limit: float) -> None:
        ok = all(e < limit for e in errors.values())
        self.rows.append(dict(check=name, row=self.row, errors=errors, limit=limit, ok=ok))
        values = ' '.join(f'{k}={v:.1e}' for k, v in errors.items())
        print(f'{name:46s} {values}  (< {limit:g}) {"ok" if ok else "FAIL"}', flush=True)

    def failed(self, name: str, error: str) -> None:
        """Records correctness row `name` as failed with `error` (a traceback, or why its process ended)."""
        self.rows.append(dict(check=name, row=name, error=error[-3000:], ok=False))
        print(f'{name} FAILED:\n{error}', flush=True)

    @property
    def ok(self) -> bool:
        return all(r['ok'] for r in self.rows)


def _conv_case(shape: Tuple[int, ...], rank: int, pools: Tuple[int, ...]
               ) -> Tuple[List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
    """A seeded case of the fused convolution on the CPU, x of `shape` (B, *spatial, C): its float64 leaves (x,
    a kernel per spatial axis, d), an output gradient, and the reference output and gradients."""
    torch.manual_seed(0)
    x, d = torch.randn(shape, dtype=torch.float64), torch.randn(shape[-1], dtype=torch.float64)
    kernels = [torch.randn(rank, shape[-1], 2 * n - 1, dtype=torch.float64) for n in shape[1:-1]]
    leaves = [t.requires_grad_() for t in (x, *kernels, d)]
    dims = list(range(2, len(shape)))
    y_ref = separable_conv_reference(x.movedim(-1, 0), kernels, dims, pools, d).movedim(0, -1)
    grad = torch.randn_like(y_ref)
    return leaves, grad, [y_ref] + list(torch.autograd.grad(y_ref, leaves, grad))


def _check_conv_case(device: torch.device, checks: _Checks, name: str, case, pools: Tuple[int, ...],
                     dtype: torch.dtype, limit: float, algorithm: str, operands: Optional[torch.dtype] = None) -> None:
    """`case` (`_conv_case`, 2D or 3D) on `device` by `algorithm`, x in `dtype` (the kernels and d in float32),
    the tensor-core kernels' products in `operands`: output and every gradient against the reference."""
    from ..layers.triton_conv import fused_algorithm, separable_conv2d_cl, separable_conv3d_cl
    leaves, grad, ref = case
    inputs = [leaves[0].detach().to(device, dtype)] + [t.detach().to(device, torch.float32) for t in leaves[1:]]
    inputs = [t.requires_grad_() for t in inputs]
    conv = separable_conv2d_cl if len(inputs) == 4 else separable_conv3d_cl
    with fused_algorithm(algorithm):
        y = conv(inputs[0], tuple(inputs[1:-1]), pools, inputs[-1], operands=operands)
    out = [y] + list(torch.autograd.grad(y, inputs, grad.to(device, y.dtype)))
    names = ('y', 'dx', *(f'dk{axis}' for axis in 'thw'[5 - len(inputs):]), 'dD')
    checks.add(name, {k: _rel(a, r) for k, a, r in zip(names, out, ref)}, limit)


def check_conv(plan: Plan, device: torch.device, checks: _Checks, algorithm: str = 'sum') -> None:
    """The fused convolution (2D, and 3D: time axis then 2D per frame) by `algorithm`
    (`triton_conv.fused_algorithm`) against float64 on the CPU: output and every
    gradient, fp32 and bf16."""
    label = '' if algorithm == 'sum' else f' {algorithm}'
    cases = [('conv', (b, h, w, c), rank, pools) for b, h, w, c, rank, pools in plan.conv_cases] + [
        ('conv3d', (b, t, h, w, c), rank, pools) for b, t, h, w, c, rank, pools in plan.conv3d_cases]
    for kind, shape, rank, pools in cases:
        case = _conv_case(shape, rank, pools)
        for dtype, limit in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            name = f'{kind} {"x".join(map(str, shape))} r{rank} pool{pools} {str(dtype)[6:]}{label}'
            _check_conv_case(device, checks, name, case, pools, dtype, limit, algorithm)


def check_inductor(plan: Plan, device: torch.device, checks: _Checks) -> None:
    """The fused convolution's custom op compiled by inductor (fullgraph) against eager: what torch.compile runs (its
    failure switches no row to the fast path, `_switches_to_fast`)."""
    from ..layers.triton_conv import separable_conv2d_cl
    b, h, w, c = plan.conv_cases[0][:4]
    x = torch.randn(b, h, w, c, device=device, dtype=torch.bfloat16)
    kh, kw = torch.randn(1, c, 2 * h - 1, device=device), torch.randn(1, c, 2 * w - 1, device=device)
    d = torch.randn(c, device=device)
    compiled = torch.compile(lambda *a: separable_conv2d_cl(a[0], a[1:3], (1, 1), a[3]) * 2, fullgraph=True)
    eager = separable_conv2d_cl(x, (kh, kw), (1, 1), d) * 2
    checks.add('custom op under inductor (fullgraph)', {'y': _rel(compiled(x, kh, kw, d), eager)}, 1e-2)


def check_conv_dot(plan: Plan, device: torch.device, checks: _Checks) -> None:
    """`check_conv` by the tensor-core kernels ('dot', the images' default)."""
    check_conv(plan, device, checks, 'dot')


def check_conv_autocast(plan: Plan, device: torch.device, checks: _Checks) -> None:
    """The tensor-core kernels as the models launch them: a float32 input multiplied in bf16 (the `operands` that
    `S4ND` passes under bf16 autocast) forward and in every gradient, at batches whose programs take several images
    (`triton_conv.DOT_IMAGES`: 8 at the models' batch of 128) and at each of their sides' tiles, pooled and not
    (`Plan.autocast_cases`), against float64 on the CPU."""
    for shape, pools in plan.autocast_cases:
        name = f'conv{"3d" if len(shape) == 5 else ""} {"x".join(map(str, shape))} r1 pool{pools} float32 in bf16 ' \
               'autocast dot'
        _check_conv_case(device, checks, name, _conv_case(shape, 1, pools), pools, torch.float32, 3e-2, 'dot',
                         operands=torch.bfloat16)


def check_generation(plan: Plan, device: torch.device, checks: _Checks) -> None:
    """The fused kernel generation (one launch for every entry) and its backward against float64 on the CPU."""
    from ..layers.triton_kernels import ssm_kernels_fused
    torch.manual_seed(0)
    kernels = [SSMKernel(dim, d_state=64, num_kernels=2, **kw) for dim, _, _, kw in plan.generation]
    lengths, rates = [e[1] for e in plan.generation], [e[2] for e in plan.generation]
    ref = [ssm_kernels([k.double()], [n], [r], torch.float64)[0] for k, n, r in zip(kernels, lengths, rates)]
    weights = [torch.randn_like(r) for r in ref]
    params = [p for k in kernels for p in k.parameters()]
    grads_ref = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), params)
    for k in kernels:
        k.to(device, torch.float32)
    out = ssm_kernels_fused(kernels, lengths, rates)
    grads = torch.autograd.grad(sum((o * w.to(device, torch.float32)).sum() for o, w in zip(out, weights)),
                                [p for k in kernels for p in k.parameters()])
    errors = {f'k{i}': _rel(o, r) for i, (o, r) in enumerate(zip(out, ref))}
    errors['grads'] = max(_rel(g, r) for g, r in zip(grads, grads_ref))
    checks.add(f'fused generation ({len(kernels)} entries, N=64, L<={max(lengths)})', errors, 1e-3)


def check_layer(plan: Plan, device: torch.device, checks: _Checks) -> None:
    """An S4ND layer (pooled) on the Triton path, float32 and bf16 autocast, against the float64 layer on the CPU."""
    b, c, side, pool = plan.layer
    _check_layer(device, checks, 'triton', b, c, (side, side), pool)


def check_checkpointed(plan: Plan, device: torch.device, checks: _Checks) -> None:
    """The Triton path's layer under non-reentrant activation checkpointing (`set_grad_checkpointing`, FSDP's):
    its backward, which runs the layer again, gives the gradients of the layer without it (the fused generation's
    backward once failed there, unpacking a saved tensor twice)."""
    from torch.utils.checkpoint import checkpoint
    b, c, side, pool = plan.layer
    torch.manual_seed(0)
    layer = S4ND(c, ndim=2, l_ref=(side, side), pool=pool).to(device)
    x = torch.randn(b, c, side, side, device=device).contiguous(memory_format=torch.channels_last)
    grads = []
    with dispatch.force_path('triton'):  # (the backward within: its recomputation takes the same path)
        for checkpointed in (False, True):
            layer.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_()
            y = checkpoint(layer, xg, use_reentrant=False) if checkpointed else layer(xg)
            y.square().sum().backward()
            grads.append([xg.grad] + [p.grad for p in layer.parameters()])
    errors = {'dx': _rel(grads[1][0], grads[0][0]),
              'dparams': max(_rel(g, r) for g, r in zip(grads[1][1:], grads[0][1:]))}
    checks.add(f'S4ND({c}, pool={pool}) checkpointed, triton path', errors, 1e-4)


def check_fast_layer(plan: Plan, device: torch.device, checks: _Checks) -> None:
    """A stem-like S4ND layer (wider than the Triton kernels take, pooled) on the fast path (Toeplitz GEMMs, bf16
    under autocast), float32 and bf16 autocast, against the float64 layer on the CPU."""
    b, c, side, pool = plan.fast_layer
    _check_layer(device, checks, 'fast', b, c, (side, side), pool)


def check_fast_algorithms(plan: Plan, device: torch.device, checks: _Checks) -> None:
    """1D, 2D and 3D S4ND layers on the fast path with each convolution algorithm forced (Toeplitz GEMMs, FFTs),
    float32 and bf16 autocast, against the float64 layer on the CPU."""
    for b, c, sizes in plan.fast_cases:
        for algorithm in ops.ALGORITHMS:
            with ops.conv_algorithm(algorithm):
                _check_layer(device, checks, 'fast', b, c, sizes, 1, algorithm)


def _check_layer(device: torch.device, checks: _Checks, path: str, b: int, c: int, sizes: Tuple[int, ...], pool: int,
                 algorithm: Optional[str] = None) -> None:
    torch.manual_seed(0)
    layer = S4ND(c, ndim=len(sizes), l_ref=sizes, pool=pool)
    x = torch.randn(b, c, *sizes)
    ref_layer = S4ND(c, ndim=len(sizes), l_ref=sizes, pool=pool).double()
    ref_layer.load_state_dict(layer.state_dict())
    xr = x.double().requires_grad_()
    y_ref = ref_layer(xr)
    y_ref.square().sum().backward()
    layer = layer.to(device)
    name = f'S4ND({c}, pool={pool}) {"x".join(map(str, x.shape))}' + (f' {algorithm}' if algorithm else '')
    with dispatch.force_path(path):
        if dispatch.conv_path(device, x.shape, layer.pool, torch.float32) != path:
            checks.add(f'{name}: runs the {path} path', {f'not {path}': 1.0}, 0.5)
            return
        xg = x.to(device)
        xg = (xg.contiguous(memory_format=torch.channels_last) if xg.ndim == 4 else xg).requires_grad_()
        y = layer(xg)
        y.square().sum().backward()
        errors = {'y': _rel(y, y_ref), 'dx': _rel(xg.grad, xr.grad),
                  'dparams': max(_rel(p.grad, q.grad) for p, q in zip(layer.parameters(), ref_layer.parameters()))}
        checks.add(f'{name} fp32, {path} path', errors, 1e-3)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y16 = layer(xg.detach().bfloat16())
            y_amp = layer(xg.detach())  # (a float32 input: the Triton kernels multiply it in bf16)
    checks.add('  same, bf16 autocast', {'y': _rel(y16.float(), y_ref), 'y (float32 input)': _rel(y_amp, y_ref)}, 3e-2)


def _with_algorithm(fn: Callable, algorithm: str) -> Callable:
    """`fn` run with the fused convolution's `algorithm` (`triton_conv.fused_algorithm`)."""
    from ..layers.triton_conv import fused_algorithm

    def run(*args, **kwargs):
        with fused_algorithm(algorithm):
            return fn(*args, **kwargs)
    return run


# Settings of the tensor-core kernels (`triton_conv` attributes) that the 'dot' section times beside the landed ones,
# so that one GPU run confirms or reverts the changes made since an H200 last ran them (commit 54b42a5):
# 'dot_wide' as it ran then (large tiles, one image per program), 'dot_single' the landed tiles, one image per
# program, 'dot_unsplit' the kernel gradient's products whole (one pass over the images each, more registers),
# 'dot_row_warps' one warp per 16 rows of a program's tiles (no warp repeating another's products). Timed on the
# rows of the models' case (float32 input under bf16 autocast): each setting compiles kernels of its own.
DOT_VARIANTS = {'dot_wide': dict(DOT_TILE=4096, DOT_GRAD_TILE=1024, DOT_IMAGES=1, DOT_GRAD_BLOCK=64),
                'dot_single': dict(DOT_IMAGES=1), 'dot_unsplit': dict(DOT_GRAD_BLOCK=64),
                'dot_row_warps': dict(DOT_WARPS=0)}


# The side up to which the 'dot' section's extra ConvNeXt pair runs the fused kernels (every block and downsampling
# layer of ConvNeXt-T at 224 px), in training and inference, against the dispatch's measured sides in 'models'.
DOT_TRY_SIDE = 64


def _with_triton_sides(fn: Callable, side: int) -> Callable:
    """`fn` with the dispatch running the fused kernels on 2D sides up to `side` in training and inference
    (`dispatch.TRITON_FASTER_SIDE` and `TRITON_FASTER_SIDE_INFERENCE`), restored afterwards."""
    def run(*args, **kwargs):
        saved = dispatch.TRITON_FASTER_SIDE, dispatch.TRITON_FASTER_SIDE_INFERENCE
        dispatch.TRITON_FASTER_SIDE = {**saved[0], 2: side}
        dispatch.TRITON_FASTER_SIDE_INFERENCE = {**saved[1], 2: side}
        try:
            return fn(*args, **kwargs)
        finally:
            dispatch.TRITON_FASTER_SIDE, dispatch.TRITON_FASTER_SIDE_INFERENCE = saved
    return run


def _with_dot_settings(fn: Callable, settings: Dict[str, int]) -> Callable:
    """`fn` run with the tensor-core kernels' `settings` (`triton_conv` attributes), restored afterwards."""
    from ..layers import triton_conv

    def run(*args, **kwargs):
        saved = {k: getattr(triton_conv, k) for k in settings}
        for k, v in settings.items():
            setattr(triton_conv, k, v)
        try:
            return fn(*args, **kwargs)
        finally:
            for k, v in saved.items():
                setattr(triton_conv, k, v)
    return run


_COLUMNS = ('paths', 'algorithms', 'variants')  # the S4ND columns of a layer row (`_bench_layer`)


def _bench_layer(case: str, s4nd: S4ND, conv: nn.Module, x: torch.Tensor, amp: bool, repeats: int,
                 columns: str = 'paths') -> dict:
    """One row of `layer_jobs`: forward+backward of the baseline depthwise `conv` and of `s4nd` by each of its
    `columns`: 'paths' the Triton path ('triton', the fused convolution's default algorithm) and the fast path,
    'algorithms' the Triton path by each algorithm ('sum' and 'dot') and the fast path, 'variants' 'dot' as landed
    and with each of `DOT_VARIANTS`; on x (its grad enabled), ms and ratios to the conv; printed as it comes."""
    fns = {'dwconv': _fwd_bwd(conv, x, amp)}
    if columns == 'paths':
        fns.update(triton=_fwd_bwd(s4nd, x, amp, 'triton'), fast=_fwd_bwd(s4nd, x, amp, 'fast'))
    else:  # (built only here: `_fwd_bwd` runs a forward to shape the gradient)
        dot = _with_algorithm(_fwd_bwd(s4nd, x, amp, 'triton'), 'dot')
        if columns == 'algorithms':  # (the fast path compiles nothing: each shape's 'dot' against it too)
            fns.update(sum=_with_algorithm(_fwd_bwd(s4nd, x, amp, 'triton'), 'sum'), dot=dot,
                       fast=_fwd_bwd(s4nd, x, amp, 'fast'))
        else:
            fns.update(dot=dot, **{name: _with_dot_settings(dot, settings) for name, settings in DOT_VARIANTS.items()})
    t = time_ms(fns, x.device, warmup=2, repeats=repeats)
    row = dict(case=case, **{f'{k}_ms': v for k, v in t.items()},
               **{f'{k}_ratio': t[k] / t['dwconv'] for k in fns if k != 'dwconv'},
               path='per column')  # (fast: the fast path; triton, sum, dot and the variants: the Triton path)
    print(f'  {case}: dwconv {t["dwconv"]:.2f}  S4ND ' + '  '.join(
        f'{k} {t[k]:.2f} ({row[f"{k}_ratio"]:.2f}x)' for k in fns if k != 'dwconv'), flush=True)
    return row


def _bench_stage(plan: Plan, device: torch.device, dim: int, size: int, dtype: torch.dtype, amp: bool,
                 columns: str = 'paths') -> dict:
    """One 2D row of `layer_jobs`: an input of `dtype`, under bf16 autocast with `amp`."""
    torch.manual_seed(0)
    s4nd = S4ND(dim, ndim=2, l_ref=size).to(device)
    conv = create_conv2d(dim, dim, 7, depthwise=True).to(device, memory_format=torch.channels_last)
    x = _channels_last_input(plan.batch, dim, size, device, dtype)
    autocast = ' in bf16 autocast' if amp and dtype != torch.bfloat16 else ''
    return _bench_layer(f'layer {plan.batch}x{dim}x{size}x{size} {str(dtype)[6:]}{autocast}', s4nd, conv, x,
                        amp, plan.repeats, columns)


def _bench_video_stage(plan: Plan, device: torch.device, dim: int, frames: int, size: int, columns: str = 'paths'
                       ) -> dict:
    """One 3D row of `layer_jobs` (a float32 input under bf16 autocast, as in the video model)."""
    batch = plan.video[0]
    torch.manual_seed(0)
    s4nd = S4ND(dim, ndim=3, l_ref=(frames, size, size)).to(device)
    conv = _dw_conv3d(dim).to(device, memory_format=torch.channels_last_3d)
    x = torch.randn(batch, dim, frames, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    return _bench_layer(f'3D layer {batch}x{dim}x{frames}x{size}x{size} float32 in bf16 autocast', s4nd, conv, x,
                        True, plan.repeats, columns)


def layer_jobs(plan: Plan, device: torch.device, columns: str = 'paths') -> List[Callable[[], dict]]:
    """The rows of the layer benchmark: S4ND by `columns` (`_bench_layer`: the Triton and the fast path by default)
    vs timm's 7x7 depthwise conv, forward+backward, channels-last, fp32, bf16, and fp32 under bf16 autocast (the
    models' case: their blocks hand on float32 activations; the only one for 'variants', each of which compiles
    kernels of its own); then 3D S4ND vs the 3D baseline's depthwise conv."""
    if columns not in _COLUMNS:
        raise ValueError(f'columns must be one of {_COLUMNS}, got {columns!r}')
    kinds = ((torch.float32, True),) if columns == 'variants' else (
        (torch.float32, False), (torch.bfloat16, True), (torch.float32, True))
    return ([partial(_bench_stage, plan, device, dim, size, dtype, amp, columns)
             for dtype, amp in kinds for dim, size in plan.stages]
            + [partial(_bench_video_stage, plan, device, *stage, columns) for stage in plan.video_stages])


def _device_activity(events) -> Tuple[int, float]:
    """(kernel launches, microseconds the device is busy) in profiler `events`: busy is the union of the device
    activities' intervals (kernels, copies, memsets; several streams may overlap), without the user annotations
    that span them; only kernels are counted as launches."""
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    kernels = [e for e in device if getattr(e, 'activity_type', None) in (None, 'kernel', 'concurrent_kernel')
               and not e.name.startswith(('Memcpy', 'Memset'))]
    busy, end = 0.0, float('-inf')
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in device):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return len(kernels), busy


def _profile_model(plan: Plan, device: torch.device, name: str, train: bool = True) -> dict:
    """torch.profiler over training steps (or, without `train`, inference forwards) of model `name`: step time
    (unprofiled, and under the profiler, whose host overhead grows with the operators), device kernels per step, the
    fraction of the profiled step the device is busy (well below 1 when the host's launches limit the step), top
    operators by device time (kept in the row)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    x = torch.randn(plan.batch, 3, plan.img_size, plan.img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    print(f'{"training steps" if train else "inference"}, batch {plan.batch}, bf16 autocast, channels-last')
    torch.manual_seed(0)
    model = timm.create_model(name).to(device, memory_format=torch.channels_last).train(train)
    step = (_train_step if train else _inference)(model, x, torch.bfloat16)
    # the step time without the profiler (its warm-up: Triton compilation, cuDNN autotuning)
    step_ms = time_ms(dict(step=step), device, warmup=2, repeats=plan.profile_steps)['step']
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(plan.profile_steps):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    kernels, busy_us = _device_activity(prof.events())
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else 0.0
    sort = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    table = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60)
    row = dict(model=name, train=train, step_ms=step_ms, profiled_step_ms=wall_us / plan.profile_steps / 1e3,
               kernels_per_step=kernels / plan.profile_steps, busy=min(busy_us / wall_us, 1.0), peak_gib=peak,
               top_operators=table)
    print(f'{name} {"training" if train else "inference"}: {step_ms:.1f} ms/step '
          f'({row["profiled_step_ms"]:.1f} profiled), {row["kernels_per_step"]:.0f} '
          f'device kernels/step, device busy {row["busy"]:.0%} of the profiled step, peak {peak:.1f} GiB')
    print(table, flush=True)
    return row


def _bench_pair(plan: Plan, device: torch.device, pair: _Pair, compile: bool = False,
                progress: Optional[Callable[[dict], None]] = None) -> dict:
    """`bench_models` of one image pair, bf16 autocast, channels-last (through torch.compile with `compile`)."""
    (row,) = bench_models(pairs=[pair], img_size=plan.img_size, batch_size=plan.batch, device=str(device),
                          repeats=plan.repeats, amp_dtype=torch.bfloat16, channels_last=True, compile=compile,
                          progress=progress)
    print(format_table([row]), flush=True)
    return row


def _bench_video_pair(plan: Plan, device: torch.device) -> dict:
    """`bench_models` of the video pair on clips, bf16 autocast, channels-last-3d."""
    batch, frames, side = plan.video
    (row,) = bench_models(pairs=[plan.video_pair], img_size=side, batch_size=batch, num_frames=frames,
                          device=str(device), repeats=plan.repeats, amp_dtype=torch.bfloat16, channels_last=True)
    print(format_table([row]), flush=True)
    return row


def _jobs(section: str, plan: Plan, device: torch.device) -> List[Callable[[], dict]]:
    """The rows of a measuring section, each a call that returns one row."""
    models = [partial(_bench_pair, plan, device, pair) for pair in plan.image_pairs] + [
        partial(_bench_video_pair, plan, device)]
    if section == 'models':
        return models
    if section == 'bench':
        return layer_jobs(plan, device)
    if section == 'profile':
        return [partial(_profile_model, plan, device, name, train) for train in (True, False)
                for name in plan.profile_models]
    if section == 'dot':  # the rows that decide the dispatch's choices first (a run cut short by its budget keeps
        # them): the first image pair with the fused kernels on every layer up to `DOT_TRY_SIDE` (its sides), the
        # video pair with the tensor-core kernels (clips default to 'sum': the images' pairs in 'models' already run
        # 'dot'), the layers by both algorithms and on the fast path; then the kernels' settings, `DOT_VARIANTS`
        return ([_labelled(_with_triton_sides(models[0], DOT_TRY_SIDE), triton_side=DOT_TRY_SIDE),
                 _labelled(_with_algorithm(models[-1], 'dot'), algorithm='dot')]
                + layer_jobs(plan, device, 'algorithms') + layer_jobs(plan, device, 'variants'))
    return [partial(_bench_pair, plan, device, pair, compile=True) for pair in plan.image_pairs]  # compiled


def _labelled(job: Callable[[], dict], **labels) -> Callable[[], dict]:
    """`job` whose row carries `labels` too."""
    def run(**kwargs) -> dict:
        return dict(job(**kwargs), **labels)
    return run


def _environment(dev: torch.device, plan: Plan, path: Optional[str], budget_s: Optional[float],
                 commit: Optional[str]) -> dict:
    """What a result file must state to be read later: `benchmark.environment` (device, versions, commit: `commit`,
    else git's; the CUDA settings), this run's settings, the plan."""
    return dict(environment(dev, commit), path=path, budget_s=budget_s, plan=dataclasses.asdict(plan),
                started=time.strftime('%Y-%m-%d %H:%M:%S %Z'), units='ms per call (median), MB, ratios S4ND / baseline')


class _Results(dict):
    """The results of a run, written atomically to `json_path` (if any) after every row."""

    def __init__(self, json_path: Optional[str], **fields):
        super().__init__(fields)
        for key, empty in (('ok', True), ('seconds', {}), ('errors', {}), ('skipped', {}), ('crashed', []),
                           ('partial', {})):
            self.setdefault(key, empty)
        self.json_path = json_path

    @classmethod
    def load(cls, json_path: str) -> '_Results':
        with open(json_path) as f:
            return cls(json_path, **json.load(f))

    def save(self) -> None:
        if self.json_path:
            with replaced_atomically(self.json_path) as tmp, open(tmp, 'w') as f:
                json.dump(self, f, indent=1)

    def fail(self, key: str, error: str) -> None:
        self['errors'][key] = error[-3000:]
        self['ok'] = False
        print(f'{key} FAILED:\n{error}', flush=True)
        self.save()


_Row = Tuple[str, object, Callable]  # (section, id: a check's name or a row's index, the call)
_ROW_LIMIT_S = dict(correctness=240, models=240, bench=120, profile=180, dot=240,
                    compiled=420)  # a worker's row is killed after
_OVERRUN_S = 90  # ...or once the run is this far past its budget (a compiled pair may start with 300 s left; what
# it measured by then is kept under 'partial'), so that a run ends within budget + 90 s + start-up: under an outer
# time limit, give a budget that leaves that (a SIGTERM still ends the run with its bookkeeping, `_supervise`)
_PATH_SECTIONS = ('models', 'profile', 'compiled')  # run S4ND as the dispatch chooses: `path` forces it, and a failed
# check or crashed row switches them to the fast path (`_measured_path`)
_OWN_CHECKS = ('correctness[check_fast_layer]', 'correctness[check_fast_algorithms]', 'correctness[check_inductor]')
_BROKEN_EXIT = 3  # a worker's exit status after a row broke its CUDA context (the row's error is recorded)
_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends
_FAULT_ENV = 'S4ND_GPU_CHECK_FAULT'  # tests: 'ROW=exit|hang|cuda,...' makes a worker fail at rows ROW ('bench[0]')
_injected_broken = False


def _rows(sections: Sequence[str], plan: Plan, dev: torch.device) -> List[_Row]:
    """Every row of the run, in order."""
    rows: List[_Row] = []
    for section in sections:
        if section == 'correctness':
            rows += [(section, c.__name__, c) for c in (check_conv, check_conv_dot, check_conv_autocast,
                                                           check_generation, check_layer, check_checkpointed,
                                                           check_fast_layer,
                                                           check_fast_algorithms, check_inductor)]
        else:
            rows += [(section, i, job) for i, job in enumerate(_jobs(section, plan, dev))]
    return rows


def _switches_to_fast(key: str) -> bool:
    """Whether row `key` failing a check or crashing its process switches the later rows of `_PATH_SECTIONS` to the
    fast path: a row of the Triton path, not one of the 'dot' section (settings the dispatch does not take by
    default) nor a check of the fast path itself or of compiled code (`_OWN_CHECKS`)."""
    return not key.startswith('dot[') and key not in _OWN_CHECKS


def _measured_path(results: _Results, forced: Optional[str], section: str) -> Optional[str]:
    """S4ND's implementation for a row of `section`. In the sections that run S4ND as the dispatch chooses
    (`_PATH_SECTIONS`): `forced`, else the fast path once a check of the Triton path failed or a row crashed its
    process (`_switches_to_fast`: the models measured on it rather than not at all), else the dispatch's (None).
    Elsewhere None: the layer rows force each column's path, the 'dot' model rows run the settings they try."""
    if section not in _PATH_SECTIONS:
        return None
    if forced is not None:
        return forced
    failed = [f'correctness[{c["row"]}]' for c in results.get('correctness', []) if not c['ok']]
    if any(_switches_to_fast(key) for key in results['crashed'] + failed):
        if results['path'] != 'fast':
            results['path'] = 'fast'
            print("a check of the Triton path failed or a row crashed: the next model, profile and compiled rows run "
                  "S4ND's fast path", flush=True)
        return 'fast'
    return None


def _run_rows(results: _Results, sections: Sequence[str], plan: Plan, dev: torch.device, forced: Optional[str],
              deadline: Optional[float], start: int = 0, worker: bool = False) -> None:
    """Runs the rows of `sections` from the `start`-th on, recording each in `results`, saved after each. A
    `worker` marks the row it runs as 'running' in the file, and exits with `_BROKEN_EXIT` after a row that leaves
    its CUDA context unusable (the supervisor goes on in a new process)."""
    cuda_settings(dev)
    checks = _Checks(results.setdefault('correctness', [])) if 'correctness' in sections else None
    current = None
    for index, (section, ident, call) in enumerate(_rows(sections, plan, dev)):
        if index < start:
            continue
        if section != current:
            current = section
            print(f'\n== {section}', flush=True)
            results.setdefault(section, [])
            results['seconds'].setdefault(section, 0.0)
        left = float('inf') if deadline is None else deadline - time.time()
        if left <= _MIN_LEFT_S.get(section, 0):
            results['skipped'].setdefault(section, []).append(ident)
            results.save()
            continue
        key, began, error = f'{section}[{ident}]', time.time(), None
        if worker:
            results['running'] = dict(index=index, section=section, id=ident, row=key, started=began)
            results.save()
        try:
            if worker:
                _inject_fault(key)
            if section == 'correctness':
                checks.row = ident
                call(plan, dev, checks)
            else:  # (a compiled pair compiles for minutes: what it measured is kept if it is cut short)
                kwargs = dict(progress=partial(_keep_partial, results, key)) if section == 'compiled' else {}
                path = _measured_path(results, forced, section)
                with dispatch.force_path(path):  # (each row says which path it measured: layer rows 'per column')
                    row = call(**kwargs)
                results[section].append(dict(row, path=row.get('path', path or 'dispatch')))
                results['partial'].pop(key, None)
        except Exception:  # noqa: BLE001  (a GPU session is too short to stop at the first error)
            error = traceback.format_exc()
            if section == 'correctness':
                checks.failed(ident, error)
            else:
                results.fail(key, error)
        results['ok'] &= checks is None or checks.ok
        results['seconds'][section] += time.time() - began
        if error is not None and worker and _device_broken(dev):
            results.save()
            print(f'{key} left the CUDA context unusable: this worker stops', flush=True)
            os._exit(_BROKEN_EXIT)  # (no clean-up on a broken context)
        results.pop('running', None)
        if dev.type == 'cuda':
            torch.cuda.empty_cache()
        results.save()


def _keep_partial(results: _Results, key: str, row: dict) -> None:
    """Row `key` as measured so far, under 'partial' in the results file until the row completes."""
    results['partial'][key] = row
    results.save()


def _inject_fault(key: str) -> None:
    """For the tests of the supervisor: fails row `key` as `_FAULT_ENV` says (a worker only)."""
    global _injected_broken
    for item in os.environ.get(_FAULT_ENV, '').split(','):
        row, _, kind = item.partition('=')
        if row != key:
            continue
        if kind == 'exit':
            os._exit(13)
        if kind == 'hang':
            time.sleep(3600)
        if kind == 'cuda':
            _injected_broken = True
            raise RuntimeError('CUDA error: an illegal memory access was encountered (injected)')


def _device_broken(dev: torch.device) -> bool:
    """Whether the CUDA context is unusable (a sticky error: illegal address, device-side assert)."""
    if _injected_broken or dev.type != 'cuda':
        return _injected_broken
    try:
        torch.cuda.synchronize(dev)
        torch.zeros(1, device=dev).cpu()
    except Exception:  # noqa: BLE001
        return True
    return False


def _worker(json_path: str, sections: Sequence[str], plan: Plan, device: str, forced: Optional[str],
            deadline: Optional[float], start: int, parent: int) -> None:
    """A worker process (`_supervise`, process `parent`): the rows from the `start`-th on, into the results file."""
    _end_with(parent)
    _run_rows(_Results.load(json_path), sections, plan, torch.device(device), forced, deadline, start, worker=True)


def _end_with(parent: int) -> None:
    """Ends this process when process `parent` (its supervisor) ends, also killed without clean-up (SIGKILL), so
    that no worker goes on holding the GPU: Linux's PR_SET_PDEATHSIG, elsewhere (or where prctl fails) a thread
    polling the parent's id."""
    if not (sys.platform.startswith('linux')
            and ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0):
        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # (it ended before)
        os._exit(1)


def _running(json_path: str) -> Optional[dict]:
    try:
        with open(json_path) as f:
            return json.load(f).get('running')
    except (OSError, ValueError):
        return None


def _watch(worker, json_path: str, deadline: Optional[float]) -> Optional[str]:
    """Waits for `worker` to end; kills it when its row runs past `_ROW_LIMIT_S` or the run `_OVERRUN_S` past its
    budget, and then returns why."""
    while True:
        worker.join(1.0)
        if worker.exitcode is not None:
            return None
        running, now, reason = _running(json_path), time.time(), None
        if running and now - running['started'] > _ROW_LIMIT_S[running['section']]:
            reason = f'killed after {now - running["started"]:.0f} s (a {running["section"]} row may take ' \
                     f'{_ROW_LIMIT_S[running["section"]]} s)'
        elif deadline is not None and now > deadline + _OVERRUN_S:
            reason = f'killed {_OVERRUN_S} s after the budget was spent'
        if reason:
            worker.kill()
            worker.join()
            print(f'{running["row"] if running else "the worker"}: {reason}', flush=True)
            return reason


class _Terminated(Exception):
    """SIGTERM reached the supervisor (an outer time limit, e.g. `timeout`): the run ends with its bookkeeping."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _record_lost_row(results: _Results, running: dict, error: str) -> None:
    """The row a worker was in when it died or was killed: failed (a correctness check: the check), its time
    counted, listed under 'crashed'."""
    if running['section'] == 'correctness':
        results['ok'] = False
        _Checks(results['correctness']).failed(running['id'], error)
    else:
        results.fail(running['row'], error)
    results['seconds'][running['section']] += time.time() - running['started']


def _reload(results: _Results) -> Optional[dict]:
    """`results` as the worker left the file; returns the row it was in (None between rows)."""
    measured = _Results.load(results.json_path)
    results.clear()
    results.update(measured)
    return results.pop('running', None)


def _supervise(results: _Results, sections: Sequence[str], plan: Plan, device: str, forced: Optional[str],
               deadline: Optional[float]) -> None:
    """Runs the rows in worker processes: one, unless a row kills its process, leaves its CUDA context unusable
    (a sticky error) or runs past its limit; that row is recorded as failed (the later model, profile and compiled
    rows then run the fast path, `_measured_path`) and a new worker goes on with the next row. A SIGTERM (an outer
    time limit) ends the run with the row it interrupted recorded as failed and the rows after it as skipped
    ('interrupted')."""
    own_file = results.json_path is None
    if own_file:
        fd, results.json_path = tempfile.mkstemp(suffix='.json', prefix='gpu_check_')
        os.close(fd)
    rows = _rows(sections, plan, torch.device('cpu'))  # (the same rows on every device)
    context = multiprocessing.get_context('spawn')  # (a CUDA context does not survive fork)
    handles_signals = threading.current_thread() is threading.main_thread()  # (signals reach the main thread only)
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if handles_signals else None
    start, worker = 0, None
    try:
        while start < len(rows):
            results.save()
            # (not a daemon: inductor's compile workers are its children)
            worker = context.Process(target=_worker,
                                     args=(results.json_path, sections, plan, device, forced, deadline, start,
                                           os.getpid()))
            worker.start()
            reason = _watch(worker, results.json_path, deadline)
            running = _reload(results)
            if worker.exitcode == 0 and running is None:
                break
            if running is None:
                results.fail('worker', f'the worker process ended (exit status {worker.exitcode}) outside a row')
                break
            if worker.exitcode != _BROKEN_EXIT:  # (after a broken context the row's error is recorded already)
                _record_lost_row(results, running, reason or (f'the worker process died (exit status '
                                                              f'{worker.exitcode}) in this row; its output is above'))
            results['crashed'].append(running['row'])
            start = running['index'] + 1
            if reason and deadline is not None and time.time() > deadline:
                for section, ident, _ in rows[start:]:
                    results['skipped'].setdefault(section, []).append(ident)
                break
            print(f'a new worker goes on after {running["row"]}', flush=True)
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (a second one, e.g. sent to the process group, must not cut
        # the bookkeeping short: the rows' file is written below)
        if worker is not None:
            worker.kill()
            worker.join()
            running = _reload(results)
            if running is not None:
                _record_lost_row(results, running, 'interrupted by SIGTERM (an outer time limit) in this row')
                results['crashed'].append(running['row'])
                start = running['index'] + 1
        for section, ident, _ in rows[start:]:
            results['skipped'].setdefault(section, []).append(ident)
        results['ok'], results['interrupted'] = False, True
        print('interrupted by SIGTERM: the rows not run are listed under skipped', flush=True)
    finally:
        if handles_signals:  # (until the final write)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if worker is not None and worker.is_alive():  # (the supervisor interrupted otherwise)
            worker.kill()
        if own_file:
            os.remove(results.json_path)
            results.json_path = None
        results.save()
        if handles_signals:
            signal.signal(signal.SIGTERM, previous)


def run_checks(sections: Sequence[str] = SECTIONS, plan: Plan = GPU, device: str = 'cuda',
               json_path: Optional[str] = None, path: Optional[str] = None,
               budget_s: Optional[float] = None, isolate: Optional[bool] = None, commit: Optional[str] = None) -> dict:
    """Runs the `sections` (see the module docstring; in `SECTIONS` order) with the sizes of `plan` on `device`;
    returns (and with `json_path` writes, after every row) the results, with 'ok': False if a correctness check
    failed or a row raised (its traceback under 'errors', the next row runs). `path` ('triton' or 'fast') forces
    S4ND's implementation in the model, profile and compiled sections (None: the dispatch's choice, or 'fast' once a
    check of the Triton path failed or a row crashed, but 'dot' rows and the fast path's own checks,
    `_measured_path`). `budget_s`: no row starts once that many seconds have passed (nor a compiled pair with less
    than `_MIN_LEFT_S` left); the rows left are listed under 'skipped'. `isolate` (by default on CUDA): the rows
    run in a worker process, replaced after a row that kills it, breaks its CUDA context or runs past its time limit
    (`_supervise`; those rows are listed under 'crashed'), so that one such row does not end the run. `commit`: the
    tree's commit, recorded in the results (None: git's, which a copy of the tree without its .git folder lacks)."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f'sections must be among {SECTIONS}, got {unknown}')
    sections = sorted(sections, key=SECTIONS.index)
    dev = torch.device(device)
    isolate = dev.type == 'cuda' if isolate is None else isolate
    deadline = None if budget_s is None else time.time() + budget_s
    results = _Results(json_path, **_environment(dev, plan, path, budget_s, commit), isolated=isolate)
    results.save()  # (the environment and plan at once: a run killed in its first row still leaves them)
    print(describe_environment(results), flush=True)
    if isolate:
        _supervise(results, sections, plan, device, path, deadline)
    else:
        _run_rows(results, sections, plan, dev, path, deadline)
    failed = [c['check'] for c in results.get('correctness', []) if not c['ok']]
    not_run = results['skipped'].get('correctness', [])  # (a budget spent, or SIGTERM: not verified, not passed)
    if 'correctness' in sections:
        print('correctness: ' + (f'FAILED: {failed}' if failed else f'NOT RUN: {not_run}; the checks run passed'
                                 if not_run else 'every check passed'), flush=True)
    if results['skipped']:
        print(f'skipped for the time budget: {results["skipped"]}', flush=True)
        if 'compiled' in results['skipped'] and len(sections) > 1:  # (the last section: _MIN_LEFT_S left to start)
            print(f'a compiled pair starts only with {_MIN_LEFT_S["compiled"]} s of budget left: run them on their '
                  f'own (--sections compiled), with at least that budget per pair', flush=True)
    return dict(results)
