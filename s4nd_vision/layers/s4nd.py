"""S4ND: a global N-D convolution whose kernel is the outer product of per-axis SSM kernels.

Paper: `S4ND: Modeling Images and Videos as Multidimensional Signals Using State Spaces`
(https://arxiv.org/abs/2210.06583).
"""
import contextlib
import ctypes
import itertools
import math
import numbers
import threading
import warnings
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import register_notrace_module
from torch._subclasses.fake_tensor import is_fake

from . import dispatch
from .ops import (
    DepthwiseConv,
    apply_operators,
    autocast_off,
    channel_major,
    channels_first,
    conv_algorithms,
    conv_operators,
    module_parameter,
    separable_conv,
)
from .records import record_ints, records_in_state_dict
from .reference import use_reference
from .s4_kernel import S4Kernel
from .sgconv_kernel import SGConvKernel
from .ssm_kernel import SSM_INITS, SSMKernel, check_bandlimit, check_ssm_args, is_int

__all__ = ['S4ND', 'prepare_kernels', 'kernels_can_be_prepared', 'stacked_kernels', 'KERNELS', 'check_kernel_args',
           'refuse_fx_proxy', 'drop_inference_caches']

KERNELS = ('s4d', 's4', 'sgconv')
KERNEL_INITS = {'s4d': SSM_INITS, 's4': ('legs',)}  # the inits of the SSM kernels (SGConv takes none)
CACHED_SHAPES = 4  # input shapes whose convolution operators a layer keeps for inference (`S4ND._cached_operators`)


def refuse_fx_proxy(x: torch.Tensor, owner: str) -> None:
    """Raise TypeError if x is a torch.fx proxy: the forward of `owner` (an S4ND module, a leaf of timm's FX graphs:
    its work depends on the input's sizes) traced by a tracer that does not know timm's leaves, e.g. torchvision's
    `create_feature_extractor`, which otherwise fails deep inside with a message about proxies."""
    if isinstance(x, torch.fx.Proxy):
        raise TypeError(
            f'{owner} cannot be traced into by torch.fx: its computation depends on the input sizes. Trace with timm '
            f'(features_only=True, feature_cls="fx"), or give the tracer timm\'s leaves, e.g. torchvision\'s '
            f'create_feature_extractor(model, return_nodes, tracer_kwargs=dict('
            f'leaf_modules=timm.layers.get_notrace_modules(), autowrap_functions=timm.layers.get_notrace_functions()))')


def check_kernel_args(kernel: str, init: Optional[str], d_state: int, dt_min: float, dt_max: float,
                      name: str = 'init', bandlimit: Optional[float] = None) -> None:
    """Raise ValueError unless `kernel` is one of `KERNELS`, `init` (the argument `name`) None (the default) or an
    init of that kernel, d_state, dt_min, dt_max what the SSM kernels take (checked whichever kernel is built), and
    `bandlimit` a cut-off (0 or None = off) of an SSM kernel. S4ND checks its arguments with it, and the models
    theirs (`ssm_init`) whatever their mixer, so that a baseline refuses what its S4ND twin refuses."""
    if kernel not in KERNELS:
        raise ValueError(f'kernel must be one of {KERNELS}, got {kernel!r}')
    check_ssm_args(d_state, dt_min, dt_max)
    check_bandlimit(bandlimit)
    if bandlimit and kernel == 'sgconv':
        raise ValueError(f"bandlimit applies to the SSM kernels ('s4d', 's4'), got kernel='sgconv' with "
                         f"bandlimit={bandlimit} (pass bandlimit=None or 0)")
    if init is None:
        return
    if kernel not in KERNEL_INITS:
        raise ValueError(f"{name} applies to the SSM kernels {tuple(KERNEL_INITS)}, not kernel={kernel!r} "
                         f"(pass {name}=None), got {init!r}")
    if init not in KERNEL_INITS[kernel]:
        raise ValueError(f'{name} must be one of {KERNEL_INITS[kernel]} for kernel={kernel!r} (or None for the '
                         f'default), got {init!r}')
SCRIPT_ALTERNATIVES = ('use torch.compile, torch.export or torch.jit.trace, or export to ONNX '
                       '(s4nd_vision.deploy.export_onnx)')  # what to say where torch.jit.script is refused

_Ints = Union[int, Sequence[int]]
_Floats = Union[float, Sequence[float]]


def _per_axis(value, ndim: int, name: str) -> tuple:
    if not isinstance(value, (numbers.Number, list, tuple)) and getattr(value, 'ndim', 0) > 0:  # a tensor or array
        # of per-axis values (a number is not asked: under torch.compile a symbolic float has no ndim to trace)
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != ndim:
            raise ValueError(f'{name} needs one value per spatial axis ({ndim}), got {tuple(value)}')
        return tuple(value)
    return (value,) * ndim


def _libc_memcmp():
    """The C library's memcmp, or None where ctypes cannot reach it (then `_equal_tensors` compares bit patterns)."""
    try:
        memcmp = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):  # (Windows has no process-wide C namespace)
        return None
    memcmp.restype, memcmp.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_MEMCMP = _libc_memcmp()


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """`t`'s values as the integers of their bit patterns (a view, but for a negative or conjugate view, which is
    resolved): equal exactly where the values are bitwise equal, as memcmp compares them (a NaN equals itself,
    -0.0 differs from 0.0)."""
    t = t.resolve_conj().resolve_neg()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def _same_bits(cached: Sequence[torch.Tensor], current: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether tensors of equal dtypes, shapes and devices hold bitwise equal values, pair by pair, as a 0-dim bool
    tensor (on a GPU: read with one synchronization)."""
    return torch.stack([(_bits(a) == _bits(b)).all() for a, b in zip(cached, current)]).all()


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two CPU tensors of one dtype and shape hold the same values: by their bytes where both are dense,
    real and not negative views, whose bytes are their values negated (memcmp reads a layer's parameters faster
    than torch.equal, README "2-core CPU"; bitwise equality is the stricter test: a NaN equals itself, -0.0
    differs from 0.0, and either way the kernels built from b are those of a), else by their bit patterns."""
    if (_MEMCMP is None or a.dtype.is_complex or a.layout != torch.strided or b.layout != torch.strided
            or not a.is_contiguous() or not b.is_contiguous() or a.is_neg() or b.is_neg()):
        return bool(_same_bits([a], [b]))
    return a.numel() == 0 or _MEMCMP(a.data_ptr(), b.data_ptr(), a.nbytes) == 0


def _valueless(t: torch.Tensor) -> bool:
    """Whether `t` holds no values: on the meta device or fake (shape inference and memory planning)."""
    return t.is_meta or is_fake(t)


def _equal_tensors(cached: Sequence[torch.Tensor], current: Sequence[torch.Tensor]) -> bool:
    """Whether two lists of tensors have equal dtypes, shapes, devices and bitwise values, compared tensor by
    tensor in their own dtype (no concatenated or converted copy, which on small layers costs more than their
    convolution); on a GPU with one synchronization. (Bitwise on every device: a parameter holding a NaN equals
    itself, so a GPU's cache and recurrent states are not refused as stale for it, as `==` did.) Meta and fake
    tensors (`FakeTensorMode`) have no values: they equal nothing (their data pointers are no memory to compare)."""
    if any(_valueless(t) for t in itertools.chain(cached, current)):
        return False
    if len(cached) != len(current) or any(
            a.dtype != b.dtype or a.shape != b.shape or a.device != b.device for a, b in zip(cached, current)):
        return False
    if all(t.device.type == 'cpu' for t in current):
        return all(_same_values(a, b) for a, b in zip(cached, current))
    return bool(_same_bits(cached, current))


@register_notrace_module  # a leaf of timm's FX feature graphs (its forward branches on the input's shape)
class S4ND(nn.Module):
    """Depthwise global convolution with an N-D S4 kernel, in linear form: y = K * x + D x.

    Each spatial axis has its own 1D kernel generator (`kernel`): a diagonal SSM ('s4d', `SSMKernel`), a diagonal
    plus low-rank SSM ('s4', `S4Kernel`) or dyadic SGConv sub-kernels ('sgconv', `SGConvKernel`); the N-D kernel
    of a channel is the outer product of its axis kernels (a sum of `rank` such rank-1 terms), so the
    convolution runs as one exact 1D convolution per axis.

    Resolution: kernels are sampled from continuous parameters with step dt * rate, where
    rate = reference length / input length per axis. With `l_ref` set (the training grid), the
    rate follows the input automatically, so a layer trained at 56x56 sees the same continuous
    kernel at 112x112 (finer steps, twice as many taps). Pass `rate` to forward to override.
    That holds exactly ('s4d', 'sgconv'; S4's bilinear steps approximate it) on causal and two-sided axes alike: tap
    o (o < 0: the backward half) is the continuous kernel integrated over the cell [o, o + 1) of the step, so the
    taps at rate r / 2 summed in pairs are those at rate r, and output sample l is the continuous output (of an input
    constant over each sample's cell) at the end of its cell, (l + 1) rate reference steps: half a sample after the
    sample's centre, at every rate. A kernel whose taps are centred on the reference grid (a two-sided one with the
    backward half lam times the forward one, symmetric at rate 1) is therefore centred there only: at rate r its
    backward taps are lam^(1 - r) times those of a symmetric kernel.

    With `pool` > 1 the output is average-pooled by `pool` (window = stride, remainder dropped,
    like AvgPool): a resolution-aware downsampling. The pooling folds into the convolution, so
    filtering and pooling together cost less than the filter alone.

    Shapes: (B, dim, *spatial) -> (B, dim, *(spatial // pool)), len(spatial) == ndim. The result may be a permuted
    view of the layout the convolution ran in (what the next layer reads at no cost): `.reshape` it, not `.view`.

    Args:
        dim: channels.
        ndim: number of spatial axes (1, 2 or 3).
        d_state: SSM state size N per axis (N/2 complex modes).
        rank: number of rank-1 kernel terms summed per channel (the original code's `trank`, which
            averages its terms where this sums them; its `channels` argument, output channels per
            feature, has no counterpart here).
        bidirectional: two-sided kernels (per axis, or one bool for all); False = causal axis.
        kernel: per-axis kernel type, 's4d', 's4' or 'sgconv'.
        init: SSM initialization; 's4d': 'lin' (S4D-Lin, default), 'inv' (S4D-Inv) or 'legs' (S4D-LegS);
            's4': 'legs' (HiPPO-LegS, default); 'sgconv': None.
        dt_min, dt_max: range of the log-uniform step size initialization ('s4d', 's4').
        bandlimit: mask modes whose frequency dt |Im A| / 2pi is at or above bandlimit / 2 ('s4d', 's4'; 0 or
            None: off).
        sgconv_size, sgconv_decay: values per SGConv sub-kernel and decay per dyadic range ('sgconv'); the
            sub-kernels cover min(l_ref, l_max) taps per axis, so 'sgconv' needs l_ref or l_max.
        l_ref: reference (training) length per axis; enables the automatic rate.
        l_max: longest kernel at rate 1 per axis (None = global, as long as the input).
        pool: average pooling of the output per axis (1 = none).
    """

    def __init__(
            self,
            dim: int,
            ndim: int = 2,
            d_state: int = 64,
            rank: int = 1,
            bidirectional: Union[bool, Sequence[bool]] = True,
            kernel: str = 's4d',
            init: Optional[str] = None,
            dt_min: float = 1e-3,
            dt_max: float = 1e-1,
            bandlimit: Optional[float] = None,
            sgconv_size: int = 32,
            sgconv_decay: float = 0.5,
            l_ref: Optional[_Ints] = None,
            l_max: Optional[_Ints] = None,
            pool: _Ints = 1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not is_int(dim) or dim < 1:
            raise ValueError(f'dim (channels) must be a positive integer, got {dim!r}')
        dim = int(dim)
        if not is_int(ndim) or ndim not in (1, 2, 3):
            raise ValueError(f'ndim must be 1, 2 or 3, got {ndim!r}')
        if not is_int(rank) or rank < 1:
            raise ValueError(f'rank must be a positive integer, got {rank!r}')
        self.dim = dim
        self.ndim = ndim
        self.rank = rank
        self.bidirectional = _per_axis(bidirectional, ndim, 'bidirectional')
        if not all(isinstance(b, bool) for b in self.bidirectional):  # (bool('false') is True)
            raise ValueError(f'bidirectional must be a bool, or one per spatial axis, got {bidirectional!r}')
        self.l_ref = None
        self.set_reference_size(l_ref)
        self.l_max = None if l_max is None else _per_axis(l_max, ndim, 'l_max')
        if self.l_max is not None and any(not is_int(v) or v < 1 for v in self.l_max):
            raise ValueError(f'l_max must hold positive integers (or be None for global kernels), got {l_max!r}')
        self.pool = _per_axis(pool, ndim, 'pool')
        if any(not is_int(p) or p < 1 for p in self.pool):
            raise ValueError(f'pool must hold positive integers, got {pool}')
        # (as Python ints: NumPy integers pass the checks, but sizes divided by them under torch.compile or
        # torch.export became NumPy arrays, which torch.arange refuses)
        self.pool = tuple(int(p) for p in self.pool)
        self.l_max = None if self.l_max is None else tuple(int(v) for v in self.l_max)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f'dtype must be a real floating-point dtype (or None), got {dtype}')
        self.kernel = kernel
        self.kernels = nn.ModuleList(self._axis_kernel_modules(
            kernel, d_state, init, dt_min, dt_max, bandlimit, sgconv_size, sgconv_decay, device, dtype))
        self.D = nn.Parameter(torch.randn(dim, device=device, dtype=dtype))
        self._kernel_cache = None  # (parameter values, ((key, convolution operators), ...)), inference only
        self._prepared = None  # (key, kernels, thread) from `prepare_kernels`, for the next forward

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw D ~ N(0, 1), as at construction (e.g. after `to_empty` from the meta device; each axis kernel module
        resets its own parameters)."""
        self.D.normal_()

    def __getstate__(self) -> dict:
        """Pickled and deep-copied (an EMA copy, `torch.save(model)`) without the inference cache or prepared
        kernels: both are rebuilt on use, and the cache's convolution operators would only add to every copy."""
        state = super().__getstate__()
        state['_kernel_cache'] = state['_prepared'] = None
        return state

    def __prepare_scriptable__(self):
        raise RuntimeError('torch.jit.script does not support S4ND (kernel generation uses complex tensors and '
                           f'Python control flow on sizes): {SCRIPT_ALTERNATIVES}')

    def _axis_kernel_modules(self, kernel, d_state, init, dt_min, dt_max, bandlimit, sgconv_size, sgconv_decay,
                             device, dtype) -> list:
        """One kernel generator per axis, with rank kernels per direction."""
        check_kernel_args(kernel, init, d_state, dt_min, dt_max, bandlimit=bandlimit)
        counts = self._kernel_counts()
        dd = dict(device=device, dtype=dtype)
        # every kernel's arguments are checked whichever kernel is built (models pass them all to every layer)
        if not is_int(sgconv_size) or sgconv_size < 1:
            raise ValueError(f'sgconv_size must be a positive integer, got {sgconv_size!r}')
        if not (isinstance(sgconv_decay, numbers.Real) and not isinstance(sgconv_decay, bool)
                and 0 < sgconv_decay <= 1):  # (True passed as 1)
            raise ValueError(f'sgconv_decay must be in (0, 1], got {sgconv_decay!r}')
        if kernel == 'sgconv':
            if self.l_ref is None and self.l_max is None:
                raise ValueError("kernel='sgconv' needs l_ref or l_max: the length its sub-kernels cover")
            none = (None,) * self.ndim  # sub-kernels covering min(l_ref, l_max) taps per axis
            refs = [min(r for r in pair if r is not None) for pair in zip(self.l_ref or none, self.l_max or none)]
            return [SGConvKernel(self.dim, l_ref=ref, num_kernels=n, size=sgconv_size, decay=sgconv_decay, **dd)
                    for ref, n in zip(refs, counts)]
        ssm = dict(d_state=d_state, dt_min=dt_min, dt_max=dt_max, bandlimit=bandlimit, **dd)
        if kernel == 's4':
            return [S4Kernel(self.dim, num_kernels=n, init=init or 'legs', **ssm) for n in counts]
        return [SSMKernel(self.dim, num_kernels=n, init=init or 'lin', **ssm) for n in counts]

    def _kernel_counts(self) -> list:
        """Kernels per axis: rank-1 terms times directions."""
        return [self.rank * (2 if bi else 1) for bi in self.bidirectional]

    def set_reference_size(self, l_ref: Optional[_Ints]) -> None:
        """Set the grid on which rate == 1 (the training resolution of this layer), or None for rate 1 always.

        This changes what the layer computes at every input size other than the old reference (its steps are
        measured on the new grid); models keep their layers' references when their input size changes. SGConv
        kernels keep their sub-kernels (the taps they cover at rate 1).
        """
        if l_ref is not None:
            l_ref = _per_axis(l_ref, self.ndim, 'l_ref')
            if any(not is_int(v) or v < 1 for v in l_ref):
                raise ValueError(f'l_ref must hold positive integers, got {l_ref}')
            l_ref = tuple(int(v) for v in l_ref)  # (Python ints, as `pool`)
        self.l_ref = l_ref

    # The reference grid is saved with the weights, as `l_ref` (int64, zeros for None): it fixes the kernels'
    # steps at every input size, so weights loaded into a layer built for another grid keep their function.
    # Weight files without it keep the layer's own reference. (A plain attribute, not a buffer: the rate is
    # computed on the host at every call, and a device tensor would cost a synchronization.)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if records_in_state_dict():
            grid = self.l_ref if self.l_ref is not None else (0,) * self.ndim
            destination[prefix + 'l_ref'] = torch.tensor(grid, dtype=torch.int64, device='cpu')

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + 'l_ref'
        value = state_dict.get(key)
        if value is not None and not value.is_meta:  # (SGConv kernels take their layout from their own weights)
            grid = record_ints(value)
            d = state_dict.get(prefix + 'D')
            if grid is None or len(grid) != self.ndim or not (all(v > 0 for v in grid) or not any(grid)):
                error_msgs.append(f'{key}: expected {self.ndim} positive integers (the reference grid; zeros for '
                                  f'none), got {value.dtype} {tuple(value.shape)} {value.tolist()}')
            elif d is None or d.shape == self.D.shape:  # (a layer of other channels: load_state_dict refuses it
                # for D's shape, and a refused load leaves this layer's grid as it was, not only its other tensors)
                self.set_reference_size(tuple(grid) if any(grid) else None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def resolve_rate(self, sizes: Sequence[int], rate: Optional[_Floats] = None) -> Tuple[float, ...]:
        """Per-axis rate for an input of spatial `sizes`: explicit, else l_ref / size, else 1."""
        if rate is None:
            if self.l_ref is None:
                return (1.0,) * self.ndim
            return tuple(r / s for r, s in zip(self.l_ref, sizes))
        rate = _per_axis(rate, self.ndim, 'rate')
        if any(isinstance(r, (str, bool)) for r in rate):  # (float() took '2' and True as numbers)
            raise ValueError(f'rate must be a number or one per spatial axis ({self.ndim}), got {rate}')
        rate = tuple(float(r) for r in rate)
        # (checked in eager mode: under torch.compile a rate may be symbolic, and math.isfinite does not trace)
        if not torch.compiler.is_compiling() and any(not (math.isfinite(r) and r > 0) for r in rate):
            raise ValueError(f'rate must be finite and positive on every axis, got {rate}')
        return rate

    def kernel_lengths(self, sizes: Sequence[int], rates: Sequence[float]) -> Tuple[int, ...]:
        """Taps per direction on each axis: the input length, capped at round(l_max / rate) (at least 1), as the
        original code (a ceiling would also take one tap too many where the rate's rounding puts l_max / rate a
        hair above an integer)."""
        if self.l_max is None:
            return tuple(sizes)
        return tuple(min(s, max(1, round(m / r))) for s, m, r in zip(sizes, self.l_max, rates))

    def axis_kernels(self, sizes: Sequence[int], rate: Optional[_Floats] = None, dtype=torch.float32):
        """Two-sided 1D kernels for each axis: a list (per axis) of (rank, dim, 2 n - 1) tensors."""
        rates = self.resolve_rate(sizes, rate)
        lengths = self.kernel_lengths(sizes, rates)
        return dispatch.generate_two_sided(self.kernels, lengths, rates, sizes, self.bidirectional, dtype)

    def _prepared_kernels(self, sizes: Sequence[int], rate: Optional[_Floats], dtype: torch.dtype):
        """The kernels `prepare_kernels` made for this input (each used once) in this grad mode, or None. Also None
        where other saved-tensor hooks are active than where they were made: non-reentrant activation checkpointing
        around this layer (e.g. FSDP's `apply_activation_checkpointing`) recomputes it alone, finding no prepared
        kernels, so the first pass must generate them too to save the same tensors. (Hooks that recompute nothing,
        e.g. `save_on_cpu` entered per stage, lose the stacking too: no hook says whether it recomputes.)"""
        prepared, self._prepared = self._prepared, None
        if prepared is None or prepared[0] != self._preparation_key(sizes, self.resolve_rate(sizes, rate), dtype):
            return None
        # Made in eager mode by another thread: a forward there (a server computing input gradients, Hogwild
        # training) would otherwise take them, and two backward passes would run through one generation graph. (Not
        # read in a graph that torch.compile captures: it would guard on the thread and recompile per thread.)
        if not torch.compiler.is_compiling() and prepared[2] not in (None, threading.get_ident()):
            return None
        return prepared[1]

    def _preparation_key(self, sizes: Sequence[int], rates: Tuple[float, ...], dtype: torch.dtype) -> tuple:
        """What prepared kernels must match to serve a call: input sizes, rates, dtype, saved-tensor hooks and grad
        mode."""
        return tuple(sizes), rates, dtype, _saved_tensor_hooks(), torch.is_grad_enabled()

    def _kernel_tensors(self) -> List[torch.Tensor]:
        """Every tensor the kernels are generated from (SSM parameters and buffers), detached."""
        return [t.detach() for t in itertools.chain(self.kernels.parameters(), self.kernels.buffers())]

    def _cached_operators(
            self,
            shape: Sequence[int],
            rate: Optional[_Floats],
            dtype: torch.dtype,
            conv_dtype: torch.dtype,
            depthwise: bool = False,
    ):
        """Convolution operators (Toeplitz matrices, kernel spectra) for a channel-major input of `shape`, or
        with `depthwise` the `DepthwiseConv` for the same input in channels-last
        memory, remembered between calls while no gradient is recorded (inference).

        The layer keeps the operators of its last `CACHED_SHAPES` inputs (least recently used dropped first), so
        that a server or evaluation alternating between a few image sizes does not rebuild them per call; they do
        not depend on the batch size, except through the algorithm per axis. An entry is reused only when the
        input's spatial sizes, the algorithm per axis (it depends on the batch size too, and on an enclosing
        `ops.conv_algorithm`), rates, kernel lengths, dtypes, band limits (SGConv: decays), pooling
        and the values of every kernel parameter and buffer equal those it was built from. Parameters are
        compared by value, not by version counter: writes through `.data`, `.copy_`,
        `load_state_dict(assign=True)`, `vector_to_parameters`, distributed broadcasts or NumPy views can
        bypass the counters, and stale kernels would be a silently wrong result; a change drops every entry. The
        comparison reads each parameter once per call (on CUDA, one synchronization per layer).
        """
        sizes = shape[1:-2] + shape[-1:]
        rates = self.resolve_rate(sizes, rate)
        algorithms = ('depthwise',) if depthwise else conv_algorithms(shape, self.pool)
        key = (
            tuple(sizes), tuple(algorithms), rates, self.kernel_lengths(sizes, rates), dtype, conv_dtype,
            tuple((k.bandlimit, getattr(k, 'decay', None)) for k in self.kernels), self.pool,
        )
        state = self._kernel_tensors()
        # (the cache is an immutable (values, entries) pair, replaced whole: threads sharing a model in inference
        # never see one half-updated)
        cache = self._kernel_cache
        if cache is not None and _equal_tensors(cache[0], state):
            snapshot, entries = cache
            for i, (cached_key, operators) in enumerate(entries):
                if cached_key == key:
                    if i < len(entries) - 1:  # the most recently used last
                        self._kernel_cache = (snapshot, entries[:i] + entries[i + 1:] + (entries[i],))
                    return operators
            entries = entries[max(0, len(entries) + 1 - CACHED_SHAPES):]
        else:
            # (the values compared next time are those read before generating: a write while generating, e.g. an
            # EMA update from another thread, makes the next call rebuild instead of serving kernels of the old
            # values)
            snapshot, entries = [t.clone() for t in state], ()
        kernels = [k.to(conv_dtype) for k in self.axis_kernels(sizes, rates, dtype=dtype)]
        if depthwise:
            operators = DepthwiseConv(kernels, self.pool)
        else:
            operators = conv_operators(kernels, shape, self.pool, algorithms)
        # (operators made on the meta device or under `FakeTensorMode` are shapes only, never served to a later
        # call: a real call after them would compute with no values, or return fake tensors)
        if not any(_valueless(t) for t in snapshot + kernels):
            self._kernel_cache = (snapshot, entries + ((key, operators),))
        return operators

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.ndim + 2:
            raise ValueError(
                f'S4ND with ndim={self.ndim} expects input '
                f'(B, C, {("L", "H, W", "T, H, W")[self.ndim - 1]}) '
                f'with {self.ndim} spatial dims, got shape {tuple(x.shape)}')
        if x.shape[1] != self.dim:
            raise ValueError(
                f'S4ND expects {self.dim} input channels (dim 1), got {x.shape[1]} in shape {tuple(x.shape)}')
        if any(s < 1 for s in x.shape[2:]):
            raise ValueError(f'S4ND cannot build a kernel for an empty spatial axis, got shape {tuple(x.shape)}')
        if any(s < p for s, p in zip(x.shape[2:], self.pool)):
            raise ValueError(
                f'S4ND with pool={self.pool} needs spatial sizes of at least pool, got shape {tuple(x.shape)}')
        if not x.is_floating_point():
            raise ValueError(f'S4ND expects a floating point input, got {x.dtype}')

    def _conv_dtype(self, device: torch.device, shape: Sequence[int], kernel_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the convolution of a channel-major input of `shape`: under CUDA autocast, the autocast
        dtype when every axis runs as a Toeplitz GEMM (like any convolution under autocast: half the memory
        traffic, tensor cores); else `kernel_dtype`. FFTs and kernel generation always run in float32 (or float64)."""
        if device.type == 'cuda' and torch.is_autocast_enabled('cuda') and kernel_dtype == torch.float32:
            if all(a == 'toeplitz' for a in conv_algorithms(shape, self.pool)):
                return torch.get_autocast_dtype('cuda')
        return kernel_dtype

    def forward(self, x: torch.Tensor, rate: Optional[_Floats] = None) -> torch.Tensor:
        # kernels `prepare_kernels` made serve this call alone: taken off the layer here and put back only for the
        # paths that read them, so that none outlives a call that refuses its input or runs without them (depthwise)
        prepared, self._prepared = self._prepared, None
        refuse_fx_proxy(x, 'S4ND')
        self._check_input(x)
        # the fused kernels read x in its own dtype, also under autocast (a memory-bound convolution gains nothing
        # from a cast copy), and accumulate in float32
        path = dispatch.conv_path(x.device, x.shape, self.pool, x.dtype,
                                  channels_last=x.ndim in (4, 5) and x.shape[1] > 1 and x.stride(1) == 1)
        b, c, *sizes = x.shape
        shape = (c, *sizes[:-1], b, sizes[-1])  # (the channel-major shape, as the fast path's cache keys it)
        if x.shape[0] > 0 and path == 'depthwise':  # (inference: operators cached like the fast path's)
            with torch.autocast(device_type='cpu', enabled=False):  # float32, like the fast path on the CPU
                return self._cached_operators(shape, rate, x.dtype, x.dtype, depthwise=True).apply(x, self.D)
        self._prepared = prepared
        if x.shape[0] > 0 and path == 'triton':
            return self._forward_triton(x, rate)
        # (the layout copy casts to the convolution's dtype too: under CUDA autocast one pass instead of two)
        conv_dtype = self._conv_dtype(x.device, shape, torch.promote_types(x.dtype, torch.float32))
        return channels_first(self.forward_channel_major(channel_major(x, conv_dtype), rate)).to(x.dtype)

    def _forward_triton(self, x: torch.Tensor, rate: Optional[_Floats]) -> torch.Tensor:
        """The fused Triton convolution (`triton_conv`) of a 2D or 3D input, read in channels-last order: a view,
        no copy, when x is in channels-last (3d) memory; the result, in x's dtype, is channels-last too. Under autocast
        the tensor-core kernels multiply in its dtype."""
        from .triton_conv import separable_conv2d_cl, separable_conv3d_cl
        sizes = tuple(x.shape[2:])
        conv = separable_conv2d_cl if len(sizes) == 2 else separable_conv3d_cl
        kernel_dtype = torch.promote_types(x.dtype, torch.float32)
        device_type = x.device.type
        # (like any convolution under autocast; x is read as it is, no cast copy)
        autocast = torch.is_autocast_enabled(device_type) and x.dtype == torch.float32
        operands = torch.get_autocast_dtype(device_type) if autocast else None
        self._kernel_cache = None
        with torch.autocast(device_type=device_type, enabled=False):
            kernels = self._prepared_kernels(sizes, rate, kernel_dtype)
            if kernels is None:
                kernels = self.axis_kernels(sizes, rate, dtype=kernel_dtype)
            y = conv(x.movedim(1, -1), kernels, self.pool, skip=self.D.to(kernel_dtype), operands=operands)
        return y.movedim(-1, 1)

    def forward_channel_major(
            self,
            u: torch.Tensor,
            rate: Optional[_Floats] = None,
            proj: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
    ) -> torch.Tensor:
        """The layer on S4ND's working layout (see `ops.channel_major`), unchecked:
        (dim, *spatial[:-1], B, spatial[-1]) -> the same layout with spatial // pool, in the compute dtype.

        With proj = (weight (dim, C_in), bias (dim,) or None), u is (C_in, ...) and the layer filters its
        pointwise projection, fused: the projected tensor is recomputed for the backward pass, not saved.
        """
        sizes = u.shape[1:-2] + u.shape[-1:]
        shape = (self.dim,) + u.shape[1:]
        if torch.jit.is_tracing():  # (a TracerWarning: fvcore's FLOP counting, which traces, hides them)
            warnings.warn('torch.jit.trace records S4ND layers at the traced input size: their kernel lengths and '
                          'rates become constants, so the traced module computes wrong results at other input sizes; '
                          'trace at the size you run, or use torch.export or ONNX (s4nd_vision.deploy.export_onnx) '
                          'for dynamic sizes', torch.jit.TracerWarning)
        # kernels, FFTs and long sums run in float32 (float64 stays float64), also under autocast
        kernel_dtype = torch.promote_types(u.dtype, torch.float32)
        conv_dtype = self._conv_dtype(u.device, shape, kernel_dtype)
        if u.shape[-2] == 0:  # empty batch: an empty output, like a convolution's (FFT libraries refuse it)
            pooled = tuple(n // p for n, p in zip(sizes, self.pool))
            out = u.new_zeros((self.dim,) + pooled[:-1] + (0, pooled[-1]), dtype=conv_dtype)
            # keeps the output in the autograd graph, with (zero) gradients for every parameter, as a convolution's:
            # the layer's and the fused projection's (a model's S4ND stem projection, which DDP waits for too)
            weights = [*self.parameters(), *(t for t in proj or () if t is not None)]
            return out + 0 * (u.sum() + sum(t.sum() for t in weights))
        with autocast_off(u.device.type):
            u = u.to(conv_dtype)
            if proj is not None:
                proj = tuple(None if p is None else p.to(conv_dtype) for p in proj)
            skip = self.D.to(conv_dtype)
            # prepared kernels (training, and inference on the Triton path) are used as they are: no cache, whose
            # check would synchronize a GPU; a traced graph generates them from the parameters (cached ones would
            # be baked into it as constants, stale once its weights change)
            kernels = self._prepared_kernels(sizes, rate, kernel_dtype)
            if kernels is not None or torch.is_grad_enabled() or use_reference() or torch.jit.is_tracing():
                self._kernel_cache = None
                if kernels is None:
                    kernels = self.axis_kernels(sizes, rate, dtype=kernel_dtype)
                kernels = [k.to(conv_dtype) for k in kernels]
                return separable_conv(u, kernels, self.pool, skip=skip, proj=proj)
            operators = self._cached_operators(shape, rate, kernel_dtype, conv_dtype)
            return apply_operators(u, operators, self.pool, skip=skip, proj=proj)

    def extra_repr(self) -> str:
        s = f'{self.dim}, ndim={self.ndim}, kernel={self.kernel!r}, rank={self.rank}'
        s += f', bidirectional={self.bidirectional}'
        if self.l_ref is not None:
            s += f', l_ref={self.l_ref}'
        if self.l_max is not None:
            s += f', l_max={self.l_max}'
        if any(p > 1 for p in self.pool):
            s += f', pool={self.pool}'
        return s


def drop_inference_caches(module: nn.Module) -> None:
    """Free the convolution operators the S4ND layers of `module` keep from inference (`S4ND._cached_operators`,
    up to `CACHED_SHAPES` sizes per layer; README gives their size) once nothing will reuse them, e.g. an EMA
    model's after its evaluation, or a model's after an evaluation at many sizes."""
    for m in module.modules():
        if isinstance(m, S4ND):
            m._kernel_cache = None


def _saved_tensor_hooks() -> Optional[Callable]:
    """The pack hook of the innermost active `torch.autograd.graph.saved_tensors_hooks` context (non-reentrant
    checkpointing, `save_on_cpu`), or None."""
    if torch.compiler.is_compiling():  # (dynamo cannot read them)
        return None
    top = getattr(torch._C._autograd, '_top_saved_tensors_default_hooks', None)
    hooks = None if top is None else top(False)
    return None if hooks is None else hooks[0]


def prepare_kernels(layers: Sequence[Tuple[S4ND, Sequence[int]]], dtype: torch.dtype = torch.float32) -> None:
    """Generate the kernels of many S4ND layers at once, for their next forward on inputs of the given
    spatial sizes (at their automatic rate): all axes of all layers that share SSM sizes, whatever their kernel
    lengths, become one stacked generation call (`dispatch.generate_two_sided`), so a whole network costs one
    call per training step instead of one per layer (generation is many small ops, so its cost follows the
    number of calls, not their size). A layer whose next input differs ignores them.

    Every parameter must be materialized (not FSDP-sharded across units) when this runs.
    """
    if not layers:
        return
    kernels, lengths, rates, all_sizes, bidirectional = [], [], [], [], []
    for layer, sizes in layers:
        if len(sizes) != layer.ndim:
            raise ValueError(f'layers: the sizes of each layer need one entry per spatial axis of the layer '
                             f'({layer.ndim}), got {tuple(sizes)}')
        layer_rates = layer.resolve_rate(sizes)
        kernels += list(layer.kernels)
        lengths += layer.kernel_lengths(sizes, layer_rates)
        rates += layer_rates
        all_sizes += sizes
        bidirectional += layer.bidirectional
    with autocast_off(layers[0][0].D.device.type):  # generation runs in `dtype`
        made = iter(dispatch.generate_two_sided(kernels, lengths, rates, all_sizes, bidirectional, dtype))
    thread = None if torch.compiler.is_compiling() else threading.get_ident()  # (see `_prepared_kernels`)
    for layer, sizes in layers:
        # (autograd on or off: kernels prepared under no_grad carry no graph to the parameters)
        layer._prepared = (layer._preparation_key(sizes, layer.resolve_rate(sizes), dtype),
                           [next(made) for _ in layer.kernels], thread)


def kernels_can_be_prepared(module: nn.Module) -> bool:
    """False where `prepare_kernels` must not run for the S4ND layers of `module`: without autograd off the
    Triton path in eager mode (inference caches operators per layer instead; on the Triton path one fused
    generation for all layers costs less than one per layer, and comparing cached parameters would synchronize
    every layer; a graph that torch.compile or torch.export captures has no cache and generates every kernel per
    call, so there stacking leaves a few ops per distinct axis length instead of per layer), while tracing
    (`torch.jit.trace`, fvcore: each layer's generation then lies in its own scope, and the graph is the same with
    and without autograd), under FSDP sharding (wrapped submodules or DTensor parameters: parameters of other
    units are not materialized), and where the parameters are not all on one device (layers placed on several GPUs,
    or offloaded to the meta device until their module runs, as by Accelerate's `device_map` and `cpu_offload`)."""
    if torch.jit.is_tracing():
        return False
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        param = module_parameter(module)
        if param is None or not dispatch.fused_generation(param.device, torch.float32):
            return False
    params = list(module.parameters())
    devices = {p.device for p in params}
    if len(devices) > 1 or any(d.type == 'meta' for d in devices):
        return False
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
        if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
            return False
        if any(isinstance(p, DTensor) for p in params):
            return False
    return True


@contextlib.contextmanager
def stacked_kernels(
        module: nn.Module,
        x: torch.Tensor,
        layers: Callable[[], Sequence[Tuple[S4ND, Sequence[int]]]],
) -> Iterator[None]:
    """Within this context the S4ND layers `layers()` (each with the spatial sizes of its next input) of `module`,
    run on `module`'s input x, use kernels made together by `prepare_kernels` (in x's dtype promoted to float32),
    where `kernels_can_be_prepared(module)`; leftovers (e.g. after an error) are dropped on exit so that they hold
    no autograd graph. Under FX symbolic tracing (timm's `feature_cls='fx'`) x is a proxy with no sizes: the S4ND
    layers are leaves of that graph and make their own kernels."""
    prepared = kernels_can_be_prepared(module) and not isinstance(x, torch.fx.Proxy)
    layers = list(layers()) if prepared else []
    if layers:
        prepare_kernels(layers, torch.promote_types(x.dtype, torch.float32))
    try:
        yield
    finally:
        for layer, _ in layers:
            layer._prepared = None
