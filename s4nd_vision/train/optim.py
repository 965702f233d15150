"""Optimizer parameter groups that give S4ND's SSM parameters their own learning rate.

S4ND trains the SSM parameters (A, B and the log step size) with a smaller learning rate and
no weight decay; SGConv (`kernel='sgconv'`) its sub-kernel weights with that learning rate and the usual weight
decay (the SGConv code's only override is their lr). Use with timm's optimizer factory::

    optimizer = timm.optim.create_optimizer_v2(
        model, 'adamw', lr=4e-3, weight_decay=0.05,
        param_group_fn=partial(param_groups_ssm, weight_decay=0.05, ssm_lr=1e-3))

Without `param_group_fn`, timm still excludes them from weight decay through the models'
`no_weight_decay()`, which lists them; `param_groups_ssm` honours the rest of that list too (timm's factory
does not pass it to a `param_group_fn`), e.g. a ViT's `pos_embed` and `cls_token`.

Hybrid optimizers (timm's `muon`, `adamuon`, ...) train the SSM parameters and SGConv's sub-kernels (in their
own groups) with their fallback, AdamW, as the S4 and SGConv code trains them: Muon would orthogonalize the updates
of A, B and the sub-kernels, whose shapes are a weight matrix's but whose rows are independent per-channel values.
"""
from typing import Any, Collection, Dict, List, Optional

import torch.nn as nn
from timm.optim._param_groups import _matches_pattern, param_groups_layer_decay

from ..layers import sgconv_weights, ssm_parameters

__all__ = ['param_groups_ssm', 'ssm_param_names']


def ssm_param_names(model: nn.Module) -> List[str]:
    """Names of the SSM parameters (A, B, log dt) of every S4ND layer in `model`."""
    return [name for name, _ in ssm_parameters(model)]


def param_groups_ssm(
        model: nn.Module,
        weight_decay: Optional[float] = None,
        ssm_lr: Optional[float] = None,
        ssm_weight_decay: float = 0.0,
        no_weight_decay_list: Optional[Collection[str]] = None,
        layer_decay: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Split parameters into SSM / no-decay / decay groups.

    SSM parameters get `ssm_lr` (the optimizer's lr when None) and `ssm_weight_decay`, SGConv's sub-kernel weights
    `ssm_lr` and the weight decay of the rest; biases,
    1-D parameters and names matching `no_weight_decay_list` (fnmatch patterns; None = the model's
    `no_weight_decay()`, as plain `create_optimizer_v2` uses it) get no weight decay.
    `weight_decay` None: the decayed groups take the optimizer's weight decay (they carry none of their own; a
    default of their own would override the `weight_decay` given to the optimizer without a word).
    With `layer_decay`, timm's layer-wise groups (an `lr_scale` per depth, which timm's schedulers
    apply) are split the same way, so SSM parameters keep their own lr at every depth.
    The SSM and SGConv groups say `use_fallback` (hybrid optimizers train them with AdamW; others ignore it).
    """
    if no_weight_decay_list is None:
        no_weight_decay_list = tuple(getattr(model, 'no_weight_decay', lambda: ())())
    ssm_ids = {id(p) for _, p in ssm_parameters(model)}
    if layer_decay is not None:
        groups = param_groups_layer_decay(
            model, weight_decay=weight_decay, no_weight_decay_list=no_weight_decay_list, layer_decay=layer_decay)
    else:
        ssm, no_decay, decay = [], [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in ssm_ids:
                ssm.append(p)
            elif p.ndim <= 1 or name.endswith('.bias') or _matches_pattern(name, no_weight_decay_list):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{'params': ssm}, {'params': no_decay, 'weight_decay': 0.0},
                  {'params': decay, 'weight_decay': weight_decay}]
    if weight_decay is None:  # (timm's layer-wise groups hold it as given: None where they decay)
        groups = [{k: v for k, v in g.items() if not (k == 'weight_decay' and v is None)} for g in groups]
    # (without `ssm_lr` SGConv's weights are like the others: no group of their own)
    kernel_ids = set() if ssm_lr is None else {id(p) for _, p in sgconv_weights(model)}
    lr = {} if ssm_lr is None else {'lr': ssm_lr}  # (timm's schedulers scale each group from its own initial lr)
    out = []
    for group in groups:
        ssm = [p for p in group['params'] if id(p) in ssm_ids]
        kernel = [p for p in group['params'] if id(p) in kernel_ids]
        rest = [p for p in group['params'] if id(p) not in ssm_ids and id(p) not in kernel_ids]
        if ssm:
            out.append(dict(group, params=ssm, weight_decay=ssm_weight_decay, use_fallback=True, **lr))
        if kernel:
            out.append(dict(group, params=kernel, use_fallback=True, **lr))
        if rest:
            out.append(dict(group, params=rest))
    return out
