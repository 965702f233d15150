"""Which implementation of S4ND's convolution runs: the one place that decides.

- 'reference': while a graph is captured for export or compilation (`reference.use_reference`): the plain
  real-arithmetic formulation (`reference.separable_conv_reference`), shape-generic; except that torch.compile
  on CUDA (not export) takes the Triton custom ops where they apply (their fake implementations trace).
- 'triton': on CUDA, when Triton imports and compiles for the GPU (NVIDIA, `MIN_CAPABILITY`), the input is supported
  (`triton_conv.supported`: 2D or 3D, H and W up to `triton_conv.MAX_SIDE`, pools 1/2/4, float32/bfloat16/float16,
  fewer than 2^31 elements) and its sides are at most `TRITON_FASTER_SIDE` (`TRITON_FASTER_SIDE_INFERENCE` without
  autograd; where an H200 measured the fused kernels faster than the fast path, see below): the fused channels-last
  kernels (3D: the time axis, then each frame's fused 2D convolution).
- 'depthwise': CPU inference (no autograd) on a 2D or 3D float32 input in channels-last memory with sides up to
  `depthwise_max_side()` (64 where PyTorch's CPU kernels use AVX-512, else 16): `ops.DepthwiseConv`, one depthwise
  convolution per axis and rank-1 term (strided where the layer pools) that reads and writes channels-last data (no
  transposing copies); not within `ops.conv_algorithm`, which asks for the fast path's algorithms.
- 'fast': everything else, e.g. every other CPU input: `ops.separable_conv` (Toeplitz GEMMs or FFTs per axis).

Kernel generation (`generate_two_sided`, `fused_generation`): on CUDA, whichever path each layer's convolution
takes, the two-sided S4D kernels of every (layer, axis) entry that share d_state, num_kernels and direction come
from one fused launch and one gather (`triton_kernels`), float32.

Layout of the activations around S4ND (`channel_major_input`, `stem_keeps_channel_major`): on the CPU an S4ND
layer on the fast path returns its channel-major working layout (`ops.channel_major`), and the layers after it
act on that layout (`pointwise`: norms, 1x1 projections, the ConvNeXt block's MLP) instead of copying it back to
channels-last; the ConvNeXt-S4ND stem starts it, so the whole network runs channel-major without transposing copies:
in a training step, and in inference unless the blocks after the stem take the 'depthwise' path (then the stem hands
on channels-last, where that path needs no copies).

Model files call `S4ND` and never choose; a `force_path('triton' | 'fast')` context overrides the choice (tests,
benchmarks; under torch.compile 'triton' takes the custom ops and 'fast' the reference); 'triton' still falls
back to 'fast' for an unsupported input.
"""
import contextlib
import functools
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .ops import (
    DEPTHWISE_MAX_LEN,
    ForcedChoice,
    channel_major,
    channel_major_memory,
    forced_algorithm,
    module_parameter,
    two_sided_kernel,
)
from .reference import use_reference
from .ssm_kernel import read_directly, ssm_kernel_runs, ssm_kernels

__all__ = [
    'PATHS', 'channel_major_input', 'conv_path', 'depthwise_max_side', 'force_path', 'generate_two_sided',
    'stem_input', 'stem_keeps_channel_major', 'triton_available',
]

PATHS = ('reference', 'triton', 'depthwise', 'fast')
# The largest H and W (by spatial rank) at which CUDA runs the fused Triton kernels by default, with autograd and
# without (inference): where an H200 measured them faster than the fast path in the models (README, "H200"; at
# 28x28 the tensor-core kernels made inference faster, training no faster).
TRITON_FASTER_SIDE = {2: 16, 3: 32}
TRITON_FASTER_SIDE_INFERENCE = {2: 32, 3: 32}
# The oldest NVIDIA GPUs the Triton kernels compile for: compute capability 7.0 (V100; `tests/triton_compile_script.py`
# builds every kernel for it). For sm_60 (P100, GTX 10xx) ptxas refuses the kernel gradients' atomics: those GPUs
# run the fast path and the unfused kernel generation, also when 'triton' is forced; so do AMD GPUs (ROCm), for
# which the kernels are neither built nor checked.
MIN_CAPABILITY = (7, 0)
# The largest side at which CPU inference takes the 'depthwise' path where PyTorch's CPU kernels use narrower vectors
# than AVX-512 (AVX2, ...): there oneDNN's depthwise convolutions ran 2.5x slower than the fast path's GEMMs at
# 96x56x56 and 1.6x at 192x28x28, faster at 384x14x14 and 768x7x7 (README, "Speed and cost": Inference). With AVX-512:
# `ops.DEPTHWISE_MAX_LEN`.
DEPTHWISE_MAX_SIDE_NARROW = 16
_FORCED_PATH = ForcedChoice('s4nd_forced_path')


@contextlib.contextmanager
def force_path(path: Optional[str]) -> Iterator[None]:
    """Within this context every S4ND call that is not capturing a graph runs `path`, 'triton' or 'fast'
    (None: the rule of `conv_path`); 'triton' still falls back to 'fast' for an unsupported input. Under activation
    checkpointing (`set_grad_checkpointing`) the backward pass runs the checkpointed layers again: keep it within
    the context too, else the recomputation takes the rule's path, saves other tensors and PyTorch's checkpoint
    stops with a CheckpointError."""
    if path not in (None, 'triton', 'fast'):
        raise ValueError(f"path must be 'triton', 'fast' or None, got {path!r}")
    with _FORCED_PATH.forced(path):
        yield


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton and the fused kernels import (imported on first use on CUDA only)."""
    try:
        from . import triton_conv  # noqa: F401
    except Exception:  # noqa: BLE001  (ImportError, or a Triton build that fails on this machine)
        return False
    return True


def conv_path(
        device: torch.device,
        shape: Sequence[int],
        pools: Sequence[int],
        dtype: torch.dtype,
        channels_last: bool = False,
) -> str:
    """The implementation ('reference', 'triton', 'depthwise' or 'fast') for an S4ND input of `shape`
    (B, C, *spatial) on `device`, pooled by `pools`, convolved in `dtype`, in channels-last memory or not."""
    if use_reference():
        return 'triton' if _compiles_triton(device, shape, pools, dtype) else 'reference'
    if torch.jit.is_tracing():  # FLOP counting traces the plain ops of the fast path
        return 'fast'
    forced = _FORCED_PATH.get()
    if forced is not None:
        return forced if forced == 'fast' or _triton_supports(device, shape, pools, dtype) else 'fast'
    device_type = torch.device(device).type
    if device_type == 'cuda' and _triton_faster(shape) and _triton_supports(device, shape, pools, dtype):
        return 'triton'
    if (device_type == 'cpu' and channels_last and not torch.is_grad_enabled() and dtype == torch.float32
            and len(shape) in (4, 5) and max(shape[2:]) <= depthwise_max_side() and forced_algorithm() is None):
        return 'depthwise'
    return 'fast'


def channel_major_input(x: torch.Tensor) -> Optional[torch.Tensor]:
    """The contiguous channel-major tensor behind x (`ops.channel_major_memory`) when the layers around S4ND act on
    it in that layout (`pointwise`): on the CPU, outside graph capture; else None (they take x in its own layout, as
    while timm's FX tracing passes a proxy). Off the CPU the layout copies are cheap and the fused kernels read
    channels-last."""
    return channel_major_memory(x) if _cpu_eager(x) and x.ndim >= 3 else None


def stem_input(x: torch.Tensor) -> torch.Tensor:
    """An S4ND stem's input x (B, C_in, *spatial) in S4ND's channel-major order, for its fused projection: on the CPU,
    for a contiguous x outside graph capture, the permuted view of x (no copy). The projection reads it a batch chunk
    at a time (`ops.projection_chunks`: one sample per chunk at 224 px); a one-sample chunk of this view is
    contiguous, one of a channel-major copy is not and was copied again before its GEMM. Elsewhere
    `ops.channel_major` (a copy)."""
    if _cpu_eager(x) and x.is_contiguous():
        return x.permute(1, *range(2, x.ndim - 1), 0, x.ndim - 1)
    return channel_major(x)


def stem_keeps_channel_major(y: torch.Tensor) -> bool:
    """Whether an S4ND stem hands on its output y (B, C, *spatial) in S4ND's channel-major layout, to be kept up to
    the head (`pointwise`): on the CPU outside graph capture, in a training step (under autograd), and in inference
    unless y's sides are within `depthwise_max_side()`: then the blocks get channels-last activations, on which their
    S4ND layers run as depthwise convolutions ('depthwise', faster there than the channel-major path: README,
    "2-core CPU")."""
    return _cpu_eager(y) and (torch.is_grad_enabled() or max(y.shape[2:], default=0) > depthwise_max_side())


@functools.lru_cache(maxsize=None)
def depthwise_max_side() -> int:
    """The largest side at which CPU inference convolves channels-last input by depthwise convolutions
    ('depthwise'): `ops.DEPTHWISE_MAX_LEN` where PyTorch's CPU kernels use AVX-512 (`torch.backends.cpu`), else
    `DEPTHWISE_MAX_SIDE_NARROW`."""
    wide = torch.backends.cpu.get_cpu_capability().startswith('AVX512')
    return DEPTHWISE_MAX_LEN if wide else DEPTHWISE_MAX_SIDE_NARROW


def _cpu_eager(x: torch.Tensor) -> bool:
    """x is a CPU tensor and no graph is being captured (export, compilation, tracing)."""
    return (isinstance(x, torch.Tensor) and x.device.type == 'cpu' and not use_reference()
            and not torch.jit.is_tracing())


def _compiles_triton(device: torch.device, shape: Sequence[int], pools: Sequence[int], dtype: torch.dtype) -> bool:
    """Whether a graph being captured takes the Triton custom ops: under torch.compile (not torch.export, not the
    ONNX exporter, which need the portable reference), on CUDA or with 'triton' forced, for a supported input."""
    if not _compiling_not_exporting():
        return False
    forced = _FORCED_PATH.get()
    wanted = forced == 'triton' or (forced is None and torch.device(device).type == 'cuda' and _triton_faster(shape))
    return wanted and _triton_supports(device, shape, pools, dtype)


def _compiling_not_exporting() -> bool:
    """Whether torch.compile is capturing a graph (not torch.export or the ONNX exporter, which need the portable
    reference)."""
    return torch.compiler.is_compiling() and not _exporting()


@torch.compiler.assume_constant_result  # (a graph capture calls it eagerly and keeps the answer)
def _exporting() -> bool:
    """Whether torch.export or the ONNX exporter is running. Asked eagerly: the dynamo of torch 2.11 (not 2.14)
    reads `torch.compiler.is_exporting()` as True in every graph it captures, which sent torch.compile off the
    Triton ops."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def _triton_faster(shape: Sequence[int]) -> bool:
    """Whether the fused kernels beat the fast path on an input of `shape` (B, C, *spatial): sides up to
    `TRITON_FASTER_SIDE`, or `TRITON_FASTER_SIDE_INFERENCE` without autograd (measured, see there)."""
    sides = TRITON_FASTER_SIDE if torch.is_grad_enabled() else TRITON_FASTER_SIDE_INFERENCE
    side = sides.get(len(shape) - 2)
    return side is not None and max(shape[-2:]) <= side


def _triton_supports(device: torch.device, shape: Sequence[int], pools: Sequence[int], dtype: torch.dtype) -> bool:
    """Whether the Triton ops take an input of `shape` (B, C, *spatial) on `device`; traceable with symbolic sizes (a
    compiled graph with dynamic shapes guards on the answer)."""
    if len(shape) not in (4, 5) or not _triton_ready() or not _triton_device(device):
        return False
    b, c, *spatial = shape
    return _triton_conv().supported((b, *spatial, c), tuple(pools), dtype) is None


@torch.compiler.assume_constant_result  # (a graph capture calls it eagerly and keeps the answer: no import is traced)
def _triton_ready() -> bool:
    return triton_available()


@torch.compiler.assume_constant_result  # (a graph capture calls it eagerly and keeps the answer)
def _triton_device(device: torch.device) -> bool:
    """Whether the Triton kernels compile for `device`: an NVIDIA GPU of compute capability `MIN_CAPABILITY` or newer
    (not a ROCm build's GPU); off CUDA only under Triton's interpreter (TRITON_INTERPRET=1: CPU tensors; without it
    Triton has no driver for them); true where no GPU is visible (fake CUDA tensors)."""
    device = torch.device(device)
    if device.type != 'cuda':
        return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')
    if torch.version.hip is not None:
        return False
    capability = _capability(device)
    return capability is None or capability >= MIN_CAPABILITY


def _capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """The compute capability of a CUDA device; None where no GPU is visible. 'cuda' without an index is the current
    device, asked each time: the cache is keyed by the index (keyed by the device, 'cuda' kept the answer of the GPU
    that was current first, on a machine of two kinds of GPU)."""
    index = device.index
    if index is None and torch.cuda.is_available():
        index = torch.cuda.current_device()
    return _device_capability(index)


@functools.lru_cache(maxsize=None)  # (asked per layer call; a device's capability never changes)
def _device_capability(index: Optional[int]) -> Optional[Tuple[int, int]]:
    """The compute capability of the CUDA device `index`; None where no GPU is visible."""
    return torch.cuda.get_device_capability(index) if torch.cuda.is_available() else None


def _triton_conv():
    """The module of the Triton ops (once `triton_available()`), as a plain lookup that graph capture can trace."""
    return sys.modules[f'{__package__}.triton_conv']


def fused_generation(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether S4D kernels for `device` in `dtype` come from the fused Triton generation (`generate_two_sided`):
    on a GPU of `MIN_CAPABILITY` or newer (whatever path the layers' convolutions take) or with 'triton' forced (not
    on an older GPU), not with 'fast' forced; also in a graph torch.compile captures (the ops' fake implementations
    trace), not in one captured for export."""
    forced = _FORCED_PATH.get()
    if torch.jit.is_tracing() or dtype != torch.float32 or forced == 'fast':
        return False
    wanted = forced == 'triton' or torch.device(device).type == 'cuda'
    if use_reference():
        return wanted and _compiling_not_exporting() and _triton_ready() and _triton_device(device)
    return wanted and triton_available() and _triton_device(device)


def generate_two_sided(
        kernels: Sequence[nn.Module],
        lengths: Sequence[int],
        rates: Sequence[float],
        sizes: Sequence[int],
        bidirectional: Sequence[bool],
        dtype: torch.dtype = torch.float32,
) -> List[torch.Tensor]:
    """Per (layer, axis) entry, the two-sided kernel (rank, dim, 2 n - 1) on an axis of `sizes[i]` taps
    (`ops.two_sided_kernel`) of `kernels[i](lengths[i], rates[i])`: its first rank kernels forward, the others
    backward when `bidirectional[i]`. On the Triton path the S4D entries that share d_state, num_kernels and
    direction come from one fused launch and one gather (`triton_kernels.two_sided_kernels_fused`); elsewhere
    (the CPU, export) from `ssm_kernel.ssm_kernel_runs` (on the CPU one call for the entries that share d_state and
    num_kernels), made two-sided a run at a time."""
    if not kernels or not fused_generation(module_parameter(kernels[0]).device, dtype):
        return _two_sided_runs(kernels, ssm_kernel_runs(kernels, lengths, rates, dtype), sizes, bidirectional)
    from .triton_kernels import two_sided_kernels_fused
    groups: Dict[Optional[tuple], List[int]] = {}
    for i, k in enumerate(kernels):
        key = (k.d_state, k.num_kernels, bool(bidirectional[i])) if read_directly(k) else None
        groups.setdefault(key, []).append(i)
    out: List[Optional[torch.Tensor]] = [None] * len(kernels)
    for key, members in groups.items():
        args = ([kernels[i] for i in members], [lengths[i] for i in members], [rates[i] for i in members])
        if key is None:
            made = [_two_sided(k, sizes[i], bidirectional[i]) for k, i in zip(ssm_kernels(*args, dtype), members)]
        else:
            made = two_sided_kernels_fused(*args, [sizes[i] for i in members], key[2], dtype)
        for i, k in zip(members, made):
            out[i] = k
    return out


def _two_sided_runs(
        kernels: Sequence[nn.Module],
        runs: Sequence[Tuple[List[int], torch.Tensor]],
        sizes: Sequence[int],
        bidirectional: Sequence[bool],
) -> List[torch.Tensor]:
    """Per entry, its two-sided kernel from `ssm_kernel.ssm_kernel_runs`' runs: made for the entries of a run
    that share size and direction at once (a few ops per run instead of per entry, forward and backward; symbolic
    sizes of a captured graph join only where they are equal without a guard)."""
    out: List[Optional[torch.Tensor]] = [None] * len(kernels)
    for members, stacked in runs:
        start, part = 0, []
        for j, i in enumerate(members):
            part.append(i)
            after = members[j + 1] if j + 1 < len(members) else None
            if (after is not None and bidirectional[after] == bidirectional[i]
                    and statically_known_true(sizes[after] == sizes[i])):
                continue
            dims = [kernels[m].dim for m in part]
            two = _two_sided(stacked.narrow(1, start, sum(dims)) if len(members) > 1 else stacked, sizes[i],
                             bidirectional[i])
            for m, k in zip(part, two.split(dims, dim=1) if len(dims) > 1 else [two]):
                out[m] = k
            start, part = start + sum(dims), []
    return out


def _two_sided(k: torch.Tensor, n: int, bidirectional: bool) -> torch.Tensor:
    """(num_kernels, dim, length) generated kernels as (rank, dim, 2 n - 1) two-sided ones."""
    if not bidirectional:
        return two_sided_kernel(k, None, n)
    rank = k.shape[0] // 2
    return two_sided_kernel(k[:rank], k[rank:], n)
