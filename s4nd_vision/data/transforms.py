"""Input settings shared by training and evaluation: a model's data config for its input channels, and the
transform of the built-in digits."""
from typing import Any, Dict, Mapping, Optional

import torch.nn as nn
from timm.data import create_transform, resolve_data_config

__all__ = ['model_data_config', 'mnist_transform']


def model_data_config(
        model: nn.Module,
        in_chans: Optional[int] = None,
        overrides: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """timm's data config of `model` (`overrides` first, as `timm.data.resolve_data_config` takes them) for
    `in_chans` input channels (None: the model's `in_chans`).

    A mean or std of another length, such as the 3-channel ImageNet default of a single-channel model, is
    averaged to one value repeated per channel; `input_size` starts with `in_chans`.
    """
    cfg = resolve_data_config(dict(overrides or {}), model=model)
    chans = in_chans if in_chans is not None else getattr(model, 'in_chans', cfg['input_size'][0])
    cfg['input_size'] = (chans,) + tuple(cfg['input_size'][1:])
    for key in ('mean', 'std'):
        if len(cfg[key]) != chans:
            cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * chans
    return cfg


def mnist_transform(img_size: int, data_config: Mapping[str, Any]):
    """MNIST-5k digits (28 px tensors) resampled to `img_size` and normalized as `data_config` says.

    The same in training and evaluation: a digit fills its image, so there is no crop or flip.
    """
    return create_transform(
        (data_config['input_size'][0], img_size, img_size), is_training=False, crop_pct=1.0,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'])
