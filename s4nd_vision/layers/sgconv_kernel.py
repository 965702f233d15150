"""SGConv kernel along one axis (Structured Global Convolution): few parameters, decaying weights.

The kernel of a channel is a concatenation of `n_scales` small sub-kernels of `size` values each. Sub-kernel i
covers one dyadic range of offsets: [0, d) for i = 0 and [2^(i-1) d, 2^i d) for i >= 1 (d = size), stretched by
2^max(0, i-1) through linear interpolation, and scaled by decay^i. n_scales = 1 + ceil(log2(l_ref / d)) covers
the reference length l_ref, so the parameter count grows with log(l_ref), not l_ref. The whole kernel is divided
by its norm at initialization (a buffer, then fixed). Two-sided use: one kernel per direction.

Resolution: the sub-kernel values are samples of a continuous function f of the offset t (in taps at rate 1):
sample j of sub-kernel i sits at the centre of its stretched cell, f is linear between samples and constant over
the outer half cells of each range. The kernel at rate r is f integrated over cells of width r,

    K_r[l] = integral of f over [l r, (l + 1) r),

so the kernel covers the same part of the signal at any rate (K_2[l] = K_1[2l] + K_1[2l + 1] exactly), and its
taps scale with the cell width like a discretized continuous convolution (and like S4D's ZOH kernels).
The kernel is zero beyond the covered length d 2^(n_scales - 1).

Paper: `What Makes Convolutional Models Great on Long Sequence Modeling?` (https://arxiv.org/abs/2210.09298).
"""
import math
import numbers
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Iterator, Tuple

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

from .ops import backward_without_autocast, generation_without_autocast
from .records import record_float, records_in_state_dict
from .reference import use_reference
from .ssm_kernel import (
    check_generation,
    check_param_dtype,
    check_sizes,
    flatten_legacy_4d,
    per_kernel,
    trained_parameters,
)

__all__ = ['SGConvKernel', 'sgconv_scales', 'sgconv_weights']


def sgconv_weights(module: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """(name, parameter) of the sub-kernel weights of every SGConv kernel in `module`, which the SGConv code trains
    at its own learning rate (0.001) with the other weights' decay (see `s4nd_vision.train.optim`)."""
    for prefix, m in module.named_modules():
        if isinstance(m, SGConvKernel):
            yield from trained_parameters(m, 'weight', prefix)


def sgconv_scales(l_ref: int, size: int) -> int:
    """Number of sub-kernels of `size` values that cover `l_ref` taps (dyadic ranges)."""
    return 1 if l_ref <= size else 1 + math.ceil(math.log2(l_ref / size))


@lru_cache(maxsize=None)
def _pieces(size: int, n_scales: int) -> Tuple[torch.Tensor, ...]:
    """The linear pieces of the sub-kernels' interpolant, float64 on the CPU: start t_a, width, and the rows
    (i * size + j: value j of sub-kernel i) of the values at each piece's two ends."""
    idx_a, idx_b, t_a, t_b = [], [], [], []
    for i in range(n_scales):
        stretch = 2 ** max(0, i - 1)
        origin = 0 if i == 0 else size * stretch
        # breakpoints origin + stretch * (0, 1/2, 3/2, ..., size - 1/2, size); values v0, v0, v1, ..., v_{d-1}, v_{d-1}
        knots = [0.0] + [j + 0.5 for j in range(size)] + [float(size)]
        values = [0] + list(range(size)) + [size - 1]
        for k in range(size + 1):
            t_a.append(origin + stretch * knots[k])
            t_b.append(origin + stretch * knots[k + 1])
            idx_a.append(i * size + values[k])
            idx_b.append(i * size + values[k + 1])
    with torch.inference_mode(False):  # (a first call under inference mode must not cache inference tensors)
        t_a, t_b = (torch.tensor(t, dtype=torch.float64, device='cpu') for t in (t_a, t_b))
        return t_a, t_b - t_a, torch.tensor(idx_a, device='cpu'), torch.tensor(idx_b, device='cpu')


def _integrals(size: int, n_scales: int, length: int, rate) -> torch.Tensor:
    """(n_scales * size, length) float64: tap l of the kernel at `rate` as a linear map of the sub-kernel values
    (row i * size + j = value j of sub-kernel i), the integral of the interpolant over [l rate, (l + 1) rate).
    Built on the CPU whatever the default device (models are also created under `torch.device('meta')`); plain
    tensor arithmetic in `length` and `rate`, so a graph capture keeps both symbolic."""
    t_a, width, idx_a, idx_b = _pieces(size, n_scales)
    edges = torch.arange(length + 1, dtype=torch.float64, device='cpu') * rate
    u = ((edges[:, None] - t_a) / width).clamp(0, 1)  # (length + 1, pieces): covered part of each linear piece
    # integral over [t_a, t_a + u w] of the linear piece from y_a to y_b: w (u - u^2 / 2) y_a + w u^2 / 2 y_b
    antiderivative = torch.zeros(length + 1, n_scales * size, dtype=torch.float64, device='cpu')
    antiderivative = antiderivative.index_add(1, idx_a, width * (u - u * u / 2))
    antiderivative = antiderivative.index_add(1, idx_b, width * u * u / 2)
    return (antiderivative[1:] - antiderivative[:-1]).T.contiguous()


_CACHE_BYTES = 64 * 2 ** 20  # what the cache of `_cell_integrals` may hold: the matrices of ~ 100 image axes
# Matrices above this (a 1D layer's over thousands of taps) are kept apart, the last `_LARGE_KEPT` made, in `_large`: a
# training run at one length reuses its matrix (a rebuild took 4 / 35 / 294 ms at 2k / 8k / 16k taps), and so does one
# that alternates between a training and an evaluation length, while a server fed many lengths does not churn them
# through the cache, after which glibc's heap held over 1 GB more than the cache (lengths 16 to 6000: 1.9 against
# 1.1 GB resident).
_CACHE_MATRIX_BYTES = 2 * 2 ** 20
_LARGE_KEPT = 2
_cache: 'OrderedDict[tuple, torch.Tensor]' = OrderedDict()
_large: 'OrderedDict[tuple, torch.Tensor]' = OrderedDict()
_cache_lock = threading.Lock()


def _cell_integrals(size: int, n_scales: int, length: int, rate: float, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """`_integrals` on `device` in `dtype`, cached per (size, n_scales, length, rate, device, dtype) for eager calls
    (so a GPU step copies no matrix from the host), least recently used out first once the matrices pass
    `_CACHE_BYTES`; of the matrices above `_CACHE_MATRIX_BYTES` only the last `_LARGE_KEPT` are kept."""
    device = torch.device(device)
    if device.type == 'meta':  # (models built under torch.device('meta'): nothing to keep)
        return _integrals(size, n_scales, length, rate).to(device, dtype)
    key = (size, n_scales, length, rate, device, dtype)
    with _cache_lock:  # (models called from several threads share it)
        for store in (_cache, _large):
            if key in store:
                store.move_to_end(key)
                return store[key]
    with torch.inference_mode(False):  # (a first call under inference mode must not cache inference tensors)
        m = _integrals(size, n_scales, length, rate).to(device, dtype)
    if is_fake(m):  # (made under `FakeTensorMode`: no values, which later real calls of that key would be served)
        return m
    with _cache_lock:
        store, limit = (_large, None) if m.nbytes > _CACHE_MATRIX_BYTES else (_cache, _CACHE_BYTES)
        store[key] = m
        while len(store) > 1 and (len(store) > _LARGE_KEPT if limit is None
                                  else sum(t.nbytes for t in store.values()) > limit):
            store.popitem(last=False)
    return m


class _IntegralsFn(torch.autograd.Function):
    """values (R, n_scales * size) @ m (n_scales * size, L), m the fixed `_cell_integrals`, with a backward that
    runs with autocast off (`ops.backward_without_autocast`): the product's plain autograd backward would run under
    the autocast region that `.backward()` is called in (a common training loop), in bfloat16 on the CPU, while
    kernel generation and its gradient are float32 by design."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(m)
        return values @ m

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad: torch.Tensor):
        m, = ctx.saved_tensors
        return grad @ m.T, None


class SGConvKernel(nn.Module):
    """Generates 1D convolution kernels from per-channel SGConv sub-kernels.

    Same interface as `SSMKernel`: `forward(length, rate, dtype)` returns (num_kernels, dim, length).

    Args:
        dim: channels.
        l_ref: taps to cover at rate 1 (the reference length of the axis).
        num_kernels: kernels per channel (directions times rank-1 terms).
        size: values per sub-kernel (capped at l_ref).
        decay: scale of sub-kernel i is decay ** i.
    """

    bandlimit = None  # band-limiting is defined for the SSM kernels only

    def __init__(
            self,
            dim: int,
            l_ref: int,
            num_kernels: int = 1,
            size: int = 32,
            decay: float = 0.5,
            device=None,
            dtype=None,
    ):
        super().__init__()
        check_sizes(dim=dim, l_ref=l_ref, num_kernels=num_kernels, size=size)
        check_param_dtype(dtype)
        if not (isinstance(decay, numbers.Real) and not isinstance(decay, bool) and 0 < decay <= 1):  # (True: 1)
            raise ValueError(f'decay must be in (0, 1], got {decay}')
        self.dim = dim
        self.l_ref = l_ref
        self.num_kernels = num_kernels
        self.size = min(size, l_ref)
        self.decay = decay
        self.n_scales = sgconv_scales(l_ref, self.size)
        self.support = self.size * 2 ** (self.n_scales - 1)  # taps covered at rate 1
        # (dim * num_kernels, n_scales, size): channel-major and 3-D, like `SSMKernel`'s C (`per_kernel` views it)
        self.weight = nn.Parameter(torch.empty(dim * num_kernels, self.n_scales, self.size, device=device, dtype=dtype))
        self.register_buffer('norm', torch.empty(num_kernels, dim, 1, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # computed on the CPU in float64, then copied (works on the meta device too)
        weight = torch.randn(self.num_kernels, self.dim, self.n_scales, self.size, dtype=torch.float64, device='cpu')
        weight = weight.transpose(0, 1).flatten(0, 1)
        self.weight.copy_(weight)
        self.norm.copy_(self._unnormalized(weight, self.support, 1.0).norm(dim=-1, keepdim=True))

    def _unnormalized(self, weight: torch.Tensor, length: int, rate: float) -> torch.Tensor:
        scale = self.decay ** torch.arange(self.n_scales, dtype=weight.dtype, device=weight.device)
        if torch.compiler.is_compiling():  # compile / export trace the construction, length and rate symbolic
            m = _integrals(self.size, self.n_scales, length, rate).to(weight.device, weight.dtype)
        else:
            m = _cell_integrals(self.size, self.n_scales, length, float(rate), weight.device, weight.dtype)
        values = (weight * scale[:, None]).flatten(-2)
        # (the plain product for graph capture and torch.func transforms, which take no autograd Function, and for
        # FLOP counting's trace, which would not see into one)
        plain = use_reference() or torch.jit.is_tracing()
        return per_kernel(values @ m if plain else _IntegralsFn.apply(values, m), self.dim)

    # The decay is saved with the weights, as `decay`: the float64 value's bit pattern in an int64 scalar (as
    # `SSMKernel` saves its band-limit: not a floating entry that EMA would average). The kernels' function depends
    # on it, so weights load into a kernel built with another decay keeping theirs. Files without it keep the
    # kernel's own (the default never changed).

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if records_in_state_dict():
            destination[prefix + 'decay'] = torch.tensor(float(self.decay), dtype=torch.float64).view(torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        flatten_legacy_4d(state_dict, prefix + 'weight')
        key = prefix + 'decay'
        value = state_dict.get(key)
        decay = self.decay
        if value is not None and not value.is_meta:
            decay = record_float(value, own=self.decay, name='decay')
            if decay is None or not 0 < decay <= 1:
                error_msgs.append(f'{key}: expected the decay in (0, 1] as float64 bits in one int64, got '
                                  f'{value.dtype} {tuple(value.shape)} {value.tolist()}')
                decay = None
        # The layout and decay are taken only from weights that load here (those of this layer's channels, with a
        # valid decay): a load refused by the shape checks below leaves the layout and decay as they were.
        weight, norm = state_dict.get(prefix + 'weight'), state_dict.get(prefix + 'norm')
        if (decay is not None
                and (weight is None or (weight.ndim == 3 and weight.shape[0] == self.weight.shape[0]))
                and (norm is None or norm.shape == self.norm.shape)):
            if weight is not None and tuple(weight.shape[1:]) != (self.n_scales, self.size):
                self._adopt_layout(*weight.shape[1:])
            self.decay = decay
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def _adopt_layout(self, n_scales: int, size: int) -> None:
        """Take the sub-kernel layout of loaded weights: the weight's shape (n_scales, size) defines the kernel (the
        l_ref it was built for only chose them), so weights trained for another reference length load as they are.

        The weight stays the same Parameter, reshaped in place (its data replaced, its gradient of the old shape
        dropped): an optimizer made before the load holds the weight it loads into and trains it. Optimizer state of
        the old shape (Adam's moments after a step) does not fit the new one: load the optimizer's state saved with the
        weights, or make a new optimizer; copies (a model EMA) and DDP wrappers are made after the load."""
        self.n_scales, self.size = n_scales, size
        self.l_ref = self.support = size * 2 ** (n_scales - 1)
        self.weight.data = self.weight.new_empty(self.weight.shape[0], n_scales, size)
        self.weight.grad = None

    @generation_without_autocast
    def forward(self, length: int, rate: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Kernels for `length` taps of width `rate` (in taps at rate 1).

        Returns:
            (num_kernels, dim, length) real tensor of `dtype` (float32 or float64).
        """
        check_generation(length, rate, dtype)
        return self._unnormalized(self.weight.to(dtype), length, rate) / self.norm.to(dtype)

    def extra_repr(self) -> str:
        return (f'{self.dim}, l_ref={self.l_ref}, num_kernels={self.num_kernels}, size={self.size}, '
                f'n_scales={self.n_scales}, decay={self.decay}')
