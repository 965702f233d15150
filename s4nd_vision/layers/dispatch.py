"""Which implementation of S4ND's convolution runs: the one place that decides.

- 'reference': while a graph is captured for export or compilation (`reference.use_reference`): the plain
  real-arithmetic formulation (`reference.separable_conv_reference`), shape-generic.
- 'triton': on CUDA, when Triton imports and the input is supported (`triton_conv.supported`: 2D, sides up
  to `triton_conv.MAX_SIDE`, pools 1/2/4, float32/bfloat16/float16): the fused channels-last kernels.
- 'fast': everything else, e.g. every CPU input: `ops.separable_conv` (Toeplitz GEMMs or FFTs per axis).

Model files call `S4ND` and never choose; `FORCE_PATH` ('triton' or 'fast') overrides the choice outside graph
capture (tests, benchmarks); 'triton' still falls back to 'fast' for an unsupported input.
"""
import functools
from typing import Optional, Sequence

import torch

from .reference import use_reference

__all__ = ['conv_path', 'triton_available', 'FORCE_PATH', 'PATHS']

PATHS = ('reference', 'triton', 'fast')
FORCE_PATH: Optional[str] = None  # 'triton' or 'fast' for every call that is not capturing a graph; None = the rule


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton and the fused kernels import (imported on first use on CUDA only)."""
    try:
        from . import triton_conv  # noqa: F401
    except Exception:  # ImportError, or a Triton build that cannot compile on this machine
        return False
    return True


def conv_path(device: torch.device, shape: Sequence[int], pools: Sequence[int], dtype: torch.dtype) -> str:
    """The implementation ('reference', 'triton' or 'fast') for an S4ND input of `shape` (B, C, *spatial) on
    `device`, pooled by `pools`, convolved in `dtype`."""
    if use_reference():
        return 'reference'
    if torch.jit.is_tracing():  # FLOP counting traces the plain ops of the fast path
        return 'fast'
    if FORCE_PATH is not None:
        if FORCE_PATH not in ('triton', 'fast'):
            raise ValueError(f"dispatch.FORCE_PATH must be 'triton', 'fast' or None, got {FORCE_PATH!r}")
        if FORCE_PATH != 'triton' or _triton_supports(shape, pools, dtype):
            return FORCE_PATH
        return 'fast'
    if torch.device(device).type == 'cuda' and _triton_supports(shape, pools, dtype):
        return 'triton'
    return 'fast'


def _triton_supports(shape: Sequence[int], pools: Sequence[int], dtype: torch.dtype) -> bool:
    if len(shape) != 4 or not triton_available():
        return False
    from .triton_conv import supported
    b, c, h, w = shape
    return supported((b, h, w, c), tuple(pools), dtype) is None
