"""A pointwise projection followed by a GLU that keeps only its input for the backward pass."""
import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from . import ops
from .reference import use_reference

__all__ = ['linear_glu']


def linear_glu(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        recompute: Optional[bool] = None,
) -> torch.Tensor:
    """GLU over the last axis of x @ weight^T + bias: (..., C_in) -> (..., C_out) for weight (2 C_out, C_in).

    With `recompute` (by default `ops.recompute_for_memory`: off the CPU), training recomputes the (..., 2 C_out)
    projection in the backward pass (one GEMM) instead of saving it: a projection that doubles the channels of a
    stem or a downsampling layer would otherwise keep an activation as large as a full-resolution stage's (on a
    GPU, where the GEMM is cheap and memory is what limits the batch). On the CPU the GEMM costs more than the
    memory is worth, so the plain ops run. Autocast applies as to `F.linear` (the backward pass recomputes in the
    forward's dtype). Without gradients, and while a graph is captured or traced, the plain ops run (without
    gradients on the CPU, the projection as a oneDNN convolution: `_project_rows_onednn`).
    """
    if recompute is None:
        recompute = ops.recompute_for_memory(x.device)
    plain = use_reference() or torch.jit.is_tracing()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs_grad and not plain and _onednn_rows(x, weight):
        return F.glu(_project_rows_onednn(x, weight, bias), dim=-1)
    if not recompute or not needs_grad or plain:
        return F.glu(F.linear(x, weight, bias), dim=-1)
    return _LinearGLU.apply(x, weight, bias)


def _onednn_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `_project_rows_onednn` takes x: on the CPU with oneDNN, float32 or bfloat16, at least 3 axes, a
    second-to-last axis longer than 1 (so that the 4-D view below is unambiguously channels-last) and not empty
    (a convolution refuses an image of no rows; `F.linear` maps an empty batch to an empty batch)."""
    return (x.device.type == 'cpu' and torch.backends.mkldnn.is_available() and x.ndim >= 3 and x.shape[-2] > 1
            and x.numel() > 0 and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype)


def _project_rows_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ weight^T + bias for x (..., W, C_in), as oneDNN's 1x1 convolution of the rows seen as one channels-last
    image (1, C_in, rows / W, W): in inference on the CPU, faster than the GEMM at the stem and downsampling
    shapes of ConvNeXt-S4ND (measured in the README). A permuted x is copied to contiguous rows first, as
    `F.linear` would."""
    rows = x.reshape(1, -1, x.shape[-2], x.shape[-1]).permute(0, 3, 1, 2)  # (1, C_in, rows / W, W), channels-last
    if (x.dtype == torch.float32 and not torch.is_autocast_enabled('cpu') and torch.backends.mkldnn.enabled
            and not is_fake(x)):
        # oneDNN itself: F.conv2d sends a 1x1 convolution of one image to PyTorch's own GEMM (as slow as F.linear,
        # about twice oneDNN's time here) whenever PyTorch runs on one thread (OMP_NUM_THREADS=1, a DataLoader
        # worker, torch.set_num_threads(1)). bfloat16 and autocast keep F.conv2d, whose dispatch checks the CPU, and so
        # does oneDNN turned off (torch.backends.mkldnn.flags(enabled=False)), and a fake x (`FakeTensorMode`: the
        # direct call has no fake implementation).
        y = torch.ops.aten.mkldnn_convolution(rows, weight[:, :, None, None], bias, (0, 0), (1, 1), (1, 1), 1)
    else:
        y = F.conv2d(rows, weight[:, :, None, None], bias)
    return y.permute(0, 2, 3, 1).reshape(x.shape[:-1] + (weight.shape[0],))  # a view: oneDNN writes channels-last


class _LinearGLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias):
        device_type = x.device.type
        # (None on a device autocast has no notion of: meta)
        ctx.autocast = ((device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
                        if torch.amp.is_autocast_available(device_type) else None)
        ctx.save_for_backward(x, weight, bias)
        return F.glu(F.linear(x, weight, bias), dim=-1)

    @staticmethod
    @ops.first_order_backward
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        with contextlib.nullcontext() if ctx.autocast is None else torch.autocast(
                ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1]):
            h = F.linear(x, weight, bias)  # the forward's projection, in the forward's dtype
        # d(a sigmoid(b)) = sigmoid(b) da + a sigmoid(b) (1 - sigmoid(b)) db, in float32 at least (float64 stays
        # float64: rounded to float32, a float64 layer's gradients would carry float32's error)
        acc = torch.promote_types(h.dtype, torch.float32)
        a, b = h.chunk(2, dim=-1)
        s = torch.sigmoid(b.to(acc))
        grad_a = grad.to(acc) * s
        grad_b = grad_a * a
        grad_b.addcmul_(grad_b, s, value=-1)  # grad_a a (1 - s)
        grad_h = torch.cat([grad_a.to(h.dtype), grad_b.to(h.dtype)], dim=-1)
        del a, b, s, grad_a, grad_b, h
        rows = grad_h.reshape(-1, grad_h.shape[-1])
        grad_x = (grad_h @ weight.to(grad_h.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (rows.t() @ x.reshape(-1, x.shape[-1]).to(grad_h.dtype)).to(weight.dtype)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0, dtype=acc).to(bias.dtype)
        return grad_x, grad_weight, grad_bias
