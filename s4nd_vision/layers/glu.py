"""A pointwise projection followed by a GLU that keeps only its input for the backward pass."""
from typing import Optional

import torch
import torch.nn.functional as F

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
    forward's dtype). Without gradients, and while a graph is captured or traced, the plain ops run.
    """
    if recompute is None:
        recompute = ops.recompute_for_memory(x.device)
    if (not recompute or not torch.is_grad_enabled() or use_reference() or torch.jit.is_tracing()
            or not any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return F.glu(F.linear(x, weight, bias), dim=-1)
    return _LinearGLU.apply(x, weight, bias)


class _LinearGLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias):
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(x, weight, bias)
        return F.glu(F.linear(x, weight, bias), dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            h = F.linear(x, weight, bias)  # the forward's projection, in the forward's dtype
        # d(a sigmoid(b)) = sigmoid(b) da + a sigmoid(b) (1 - sigmoid(b)) db, in float32
        a, b = h.chunk(2, dim=-1)
        s = torch.sigmoid(b.float())
        grad_a = grad.float() * s
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
            grad_bias = rows.sum(0, dtype=torch.float32).to(bias.dtype)
        return grad_x, grad_weight, grad_bias
