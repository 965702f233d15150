"""Per-position layers on S4ND's channel-major working layout (`ops.channel_major`: (C, S_1..S_{N-1}, B, S_N)).

On the CPU a training step of ConvNeXt-S4ND keeps its activations in that layout from the stem to the head, and so
does inference unless the blocks take the 'depthwise' path (`dispatch.stem_keeps_channel_major`,
`dispatch.channel_major_input`): the S4ND layers then read and write it
without transposing copies, and the layers between them act on the (C, positions) matrix it is: a LayerNorm over
channels normalizes its columns, a 1x1 projection is one GEMM from the left. Channels-last activations cost two
transposing copies per S4ND layer each way (forward and backward), at a quarter of memory speed on the CPU (README,
"2-core CPU").
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['layer_norm_channels', 'linear_glu_channels', 'norm_mlp_channels', 'record_submodules',
           'submodules_as_built']

_HOOKS = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks')
_GLOBAL_HOOKS = ('_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks',
                 '_global_backward_pre_hooks')


def record_submodules(owner: nn.Module) -> None:
    """Note the classes of `owner`'s submodules as built, for `submodules_as_built` (the end of its __init__)."""
    owner._built_as = tuple((name, type(m)) for name, m in owner.named_modules() if name)


def submodules_as_built(owner: nn.Module) -> bool:
    """Whether a fused forward of `owner` may read its submodules' weights instead of calling them: each submodule is
    of the class it was built with (none replaced, as adapters such as LoRA or quantization do) and none has hooks
    (feature capture, per-module FLOP counters, quantization observers), nor are global module hooks set. Else the
    owner calls its submodules, and computes what they do."""
    if any(getattr(nn.modules.module, hooks, None) for hooks in _GLOBAL_HOOKS):
        return False
    modules = [(name, m) for name, m in owner.named_modules() if name]
    return (tuple((name, type(m)) for name, m in modules) == owner._built_as
            and not any(getattr(m, hooks) for _, m in modules for hooks in _HOOKS))


def _columns(u: torch.Tensor) -> torch.Tensor:
    """(C, ...) -> the (C, positions) matrix, a view."""
    return u.reshape(u.shape[0], -1)


def _project(weight: torch.Tensor, bias: Optional[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """weight (C_out, C) @ u (C, N) + bias[:, None]: one GEMM."""
    return weight @ u if bias is None else torch.addmm(bias[:, None], weight, u)


def _normalized(u: torch.Tensor, eps: float) -> torch.Tensor:
    """Each column of u (C, N) minus its mean, over its standard deviation (biased, + eps): LayerNorm without
    affine. Batch norm's fused kernels compute it, u seen as a batch of C samples of N channels; one channel, which
    batch norm refuses in training, by layer_norm on the transposed (N, 1) view (contiguous then: no copy)."""
    if u.shape[0] == 1:
        return F.layer_norm(u.t(), (1,), eps=eps).t()
    return F.batch_norm(u, None, None, training=True, eps=eps)


def _affine(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """`norm`'s elementwise affine on the (C, N) columns x."""
    w = norm.weight[:, None]
    return x * w if norm.bias is None else torch.addcmul(norm.bias[:, None], x, w)


def layer_norm_channels(u: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """`norm` (a LayerNorm over C channels) at every position of channel-major u: (C, ...) -> (C, ...)."""
    x = _normalized(_columns(u), norm.eps)
    return (x if norm.weight is None else _affine(x, norm)).view(u.shape)


def linear_glu_channels(u: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1 projection (weight (2 C_out, C)) and a GLU over its channels, on channel-major u:
    (C, ...) -> (C_out, ...)."""
    return F.glu(_project(weight, bias, _columns(u)), dim=0).view((weight.shape[0] // 2,) + u.shape[1:])


def norm_mlp_channels(u: torch.Tensor, norm: nn.LayerNorm, mlp: nn.Module,
                      gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """The ConvNeXt block's LayerNorm -> MLP (timm's `Mlp`, no inner norm) -> layer scale `gamma`, on channel-major
    u: (C, ...) -> (C, ...).

    Where the MLP's weights are smaller than the activation (4 C < positions: ConvNeXt-T's early stages), the
    norm's affine and the layer scale are folded into them (fc1 (W diag(w), W b + b1), fc2 (diag(gamma) W,
    gamma b2)): elementwise passes over the weights instead of over the activation, forward and backward.
    """
    if not isinstance(mlp.norm, nn.Identity):
        raise ValueError(f'norm_mlp_channels expects an Mlp without an inner norm, got {mlp.norm}')
    x = _columns(u)
    fc1, fc2 = mlp.fc1, mlp.fc2
    fold = fc1.weight.numel() < x.numel()
    x = _normalized(x, norm.eps)
    w1, b1 = fc1.weight, fc1.bias
    if norm.weight is not None and fold:
        if norm.bias is not None:
            b1 = fc1.weight @ norm.bias if b1 is None else torch.addmv(b1, fc1.weight, norm.bias)
        w1 = w1 * norm.weight
    elif norm.weight is not None:
        x = _affine(x, norm)
    x = mlp.drop1(mlp.act(_project(w1, b1, x)))
    w2, b2 = fc2.weight, fc2.bias
    if gamma is not None and fold:
        w2, b2 = w2 * gamma[:, None], None if b2 is None else b2 * gamma
    x = _project(w2, b2, x)
    if gamma is not None and not fold:
        x = x * gamma[:, None]
    return mlp.drop2(x).view(u.shape)
