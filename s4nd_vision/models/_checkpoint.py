"""The weights inside a checkpoint file's dict: one unwrapping order for every model's filter and for inflation."""
from typing import Any, Dict

import torch
from timm.models import clean_state_dict

__all__ = ['unwrap_state_dict', 'CHECKPOINT_KEYS']

# tried in this order, as timm's `load_state_dict` does: the EMA weights (what timm evaluates) before the model's
CHECKPOINT_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')


def unwrap_state_dict(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights of a training checkpoint dict: the first of CHECKPOINT_KEYS that holds a dict (EMA first),
    else the dict itself; DDP / torch.compile prefixes ('module.', '_orig_mod.') removed."""
    for key in CHECKPOINT_KEYS:
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return clean_state_dict(state_dict)
