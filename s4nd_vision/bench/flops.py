"""FLOP counting for S4ND models with fvcore: handles for the ops fvcore leaves at 0.

fvcore's `FlopCountAnalysis` counts convolutions, matrix products and norms, but counts every FFT
and complex elementwise product as 0 (with a warning) and a complex matrix product or einsum as
if it were real (4x too low). `count_flops` registers handles for them (`s4nd_handles`), so the
count of an S4ND model is its true cost and compares with fvcore's count of its timm baseline.

Units follow fvcore: one count is one real multiply-add (MAC), the unit behind the "GFLOPs" that
timm and the ConvNeXt paper report (ConvNeXt-T: 4.5 G); real flops are about twice as many.

- FFT (every `torch.fft` transform): `FFT_MACS_PER_POINT_LOG2 * N log2 N` per transform of N
  points (N = product of the transformed lengths, the padded length where `n`/`s` pads), i.e.
  5 N log2 N real flops for a complex transform (the radix-2 count FFTW's benchmarks use) and half
  of it when the input or output is real (rfft, irfft, hfft, ihfft and their 2D/ND forms).
- Complex elementwise products: 4 MACs per element for complex x complex, 2 for complex x real.
  x / z with complex z counts as x conj(z) (4, or 2 for a real x) plus |z|^2 and two real
  divisions (4): 8 per element (6 for a real x); a complex divided by a real number, 2.
  Real x real stays 0, as in fvcore.
- Complex bmm / mm / matmul / einsum: fvcore's count times 4 (torch multiplies complex only by complex).
  baddbmm(_) (a product accumulated into a tensor) counts as its bmm, which fvcore leaves at 0.
- `mean` (average pooling, folded into S4ND): one per input element, fvcore's convention for
  `adaptive_avg_pool2d`.
- `scaled_dot_product_attention` (timm's attention: the ViT baselines): its two matrix products, q k^T and the
  weights times v, Lq * Lk * (d + dv) per batch and head, as fvcore counts them written out (in full: a causal
  or masked call counts the whole product; the softmax, like other real elementwise ops, is not counted).
- Pure data movement (pad, flip, complex <-> real views and conjugation, unflatten, movedim) is marked as free.

Like fvcore, real elementwise ops (add, sub, mul, exp, cos, sin, GELU, GLU, ...) are not counted
(they stay in `unsupported_ops()`, except mul and div): the exp/cos/sin of S4ND's kernel
generation among them; its batched GEMM and complex products are counted. Kernel generation is
always counted, under `torch.no_grad()` too: a traced S4ND layer generates its kernels from its
parameters and uses no cached ones (a cache would be baked into the trace as constants). For an
inference count with the kernels generated once beforehand, subtract the S4ND layers' `kernels`
entries of `by_module()` (names ending in '.kernels'; they do not grow with the batch).
"""
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

with warnings.catch_warnings():  # (fvcore scripts its focal loss when imported: torch's deprecation warning, not ours)
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import (
        Handle,
        bmm_flop_jit,
        einsum_flop_jit,
        elementwise_flop_counter,
        get_shape,
        matmul_flop_jit,
    )

__all__ = ['count_flops', 's4nd_handles', 'fft_macs', 'FFT_MACS_PER_POINT_LOG2']

FFT_MACS_PER_POINT_LOG2 = {'complex': 2.5, 'real': 1.25}  # MACs per N log2 N: 5 and 2.5 real flops, halved

# torch.fft ops by transform type: (complex or real, how the transformed axes are given)
# 'r2c': real input, one-sided complex output (the last axis keeps n // 2 + 1 bins)
# 'c2r': one-sided complex input, real output; 'c2c': complex to complex
_FFT_OPS = {
    **{f'aten::fft_{name}': ('c2c', form) for name, form in [
        ('fft', '1d'), ('ifft', '1d'), ('fft2', '2d'), ('ifft2', '2d'), ('fftn', 'nd'), ('ifftn', 'nd')]},
    **{f'aten::fft_{name}': ('r2c', form) for name, form in [
        ('rfft', '1d'), ('ihfft', '1d'), ('rfft2', '2d'), ('ihfft2', '2d'), ('rfftn', 'nd'), ('ihfftn', 'nd')]},
    **{f'aten::fft_{name}': ('c2r', form) for name, form in [
        ('irfft', '1d'), ('hfft', '1d'), ('irfft2', '2d'), ('hfft2', '2d'), ('irfftn', 'nd'), ('hfftn', 'nd')]},
}

# ops that only move or reinterpret data
_FREE_OPS = (
    'aten::pad', 'aten::flip', 'aten::complex', 'aten::view_as_complex', 'aten::view_as_real',
    'aten::real', 'aten::imag', 'aten::conj_physical', 'aten::unflatten', 'aten::movedim',
)

_NOT_CONSTANT = object()


def _constant(value: Any) -> Any:
    """The Python value of a traced argument (an int, None, or a list of them), or _NOT_CONSTANT where the
    trace computed it; list items are resolved one by one."""
    kind = value.node().kind()
    if kind == 'prim::Constant':
        return value.toIValue()
    if kind == 'prim::ListConstruct':
        return [_constant(v) for v in value.node().inputs()]
    return _NOT_CONSTANT


def _is_complex(value: Any) -> bool:
    """Whether a traced value is a complex tensor or a complex Python number."""
    value_type = value.type()
    if isinstance(value_type, torch._C.TensorType):
        return str(value_type.scalarType()).startswith('Complex')
    return isinstance(value_type, torch._C.ComplexType)


def fft_macs(lengths: Sequence[int], transforms: int, real: bool) -> int:
    """MACs of `transforms` FFTs over axes of `lengths` (real input or output if `real`)."""
    n = math.prod(lengths)
    if n <= 1:
        return 0
    rate = FFT_MACS_PER_POINT_LOG2['real' if real else 'complex']
    return round(rate * transforms * n * math.log2(n))


def _fft_axes(form: str, size_arg: Any, dim_arg: Any, ndim: int) -> Tuple[List[int], Any]:
    """Transformed axes (non-negative) and the size requested for the last one (None or -1: not given)."""
    sizes, dims = _constant(size_arg), _constant(dim_arg)
    if form == '1d':
        sizes, dims = (None if sizes is None else [sizes]), [dims]
    elif dims is None:  # fftn family: the last len(s) axes, or all of them
        if sizes is None:
            dims = list(range(ndim))
        else:
            dims = _NOT_CONSTANT if sizes is _NOT_CONSTANT else list(range(ndim - len(sizes), ndim))
    if dims is _NOT_CONSTANT or _NOT_CONSTANT in dims:
        raise ValueError('FFT flop count: the transformed dims must be constants in the traced graph')
    last = sizes if sizes is None or sizes is _NOT_CONSTANT else sizes[-1]
    return [d % ndim for d in dims], last


def _fft_handle(kind: str, form: str) -> Handle:
    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        out_shape = get_shape(outputs[0])
        dims, last = _fft_axes(form, inputs[1], inputs[2], len(out_shape))
        lengths = [out_shape[d] for d in dims]  # the signal sizes, except the one-sided last axis of r2c
        if kind == 'r2c':  # that axis keeps n // 2 + 1 bins of the real length n
            if last is None or last == -1:  # no size given: the input's length
                lengths[-1] = get_shape(inputs[0])[dims[-1]]
            elif last is _NOT_CONSTANT:  # a size computed in the trace: exact for even n
                lengths[-1] = 2 * (lengths[-1] - 1)
            else:
                lengths[-1] = last
        transforms = math.prod(out_shape) // math.prod(out_shape[d] for d in dims)
        return fft_macs(lengths, transforms, real=kind != 'c2c')
    return handle


def _complex_elementwise(divide: bool) -> Handle:
    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        out_shape = get_shape(outputs[0])
        a, b = _is_complex(inputs[0]), _is_complex(inputs[1])
        if out_shape is None or not (a or b):
            return 0  # real elementwise ops are not counted (fvcore's convention)
        if divide and b:  # x / z = x conj(z) / |z|^2: the product, |z|^2 (2) and 2 real divisions
            per_element = (4 if a else 2) + 4
        else:
            per_element = 4 if a and b else 2
        return per_element * math.prod(out_shape)
    return handle


def _complex_product(real_handle: Handle) -> Handle:
    """fvcore's count for a real matrix product, times 4 for a complex one (4 real multiply-adds each)."""
    def handle(inputs: List[Any], outputs: List[Any]) -> Union[int, float]:
        return real_handle(inputs, outputs) * (4 if _is_complex(outputs[0]) else 1)
    return handle


def _attention_handle(inputs: List[Any], outputs: List[Any]) -> int:
    """q (..., Lq, d) k^T (..., d, Lk), then the weights times v (..., Lk, dv): Lq * Lk * (d + dv) per batch and head
    (the output (..., Lq, dv) gives the batch and heads, also where grouped-query attention shares k and v)."""
    query, key, out = get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0])
    return math.prod(out[:-1]) * key[-2] * (query[-1] + out[-1])


def s4nd_handles() -> Dict[str, Optional[Handle]]:
    """fvcore op handles for FFTs, complex products, pooling means and attention (None = free); see the module
    doc."""
    handles: Dict[str, Optional[Handle]] = {name: _fft_handle(*spec) for name, spec in _FFT_OPS.items()}
    handles.update({
        'aten::mul': _complex_elementwise(divide=False),
        'aten::div': _complex_elementwise(divide=True),
        'aten::bmm': _complex_product(bmm_flop_jit),
        **{name: _complex_product(lambda inputs, outputs: bmm_flop_jit(inputs[1:3], outputs))
           for name in ('aten::baddbmm', 'aten::baddbmm_')},
        'aten::mm': _complex_product(matmul_flop_jit),
        'aten::matmul': _complex_product(matmul_flop_jit),
        'aten::einsum': _complex_product(einsum_flop_jit),
        'aten::mean': elementwise_flop_counter(1, 0),  # one per input element
        'aten::scaled_dot_product_attention': _attention_handle,
    })
    handles.update({name: None for name in _FREE_OPS})
    return handles


def count_flops(model: nn.Module, inputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]]) -> FlopCountAnalysis:
    """fvcore's `FlopCountAnalysis` of `model` on `inputs` with `s4nd_handles()` registered.

    `.total()` is in multiply-adds (see the module doc); `.by_operator()`, `.by_module()` and
    `.unsupported_ops()` work as in fvcore. The model is traced once, at the first query.
    """
    return FlopCountAnalysis(model, inputs).set_op_handle(**s4nd_handles())
