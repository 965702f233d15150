"""Input settings shared by training and evaluation: a model's data config for its input channels, the transform
of the built-in digits, and timm's augmentation ops kept working on current Pillow."""
from typing import Any, Dict, Mapping, Optional

import torch.nn as nn
from PIL import Image
from timm.data import auto_augment, create_transform, resolve_data_config

__all__ = ['model_data_config', 'mnist_transform', 'posterize_any_bits', 'with_posterize_any_bits']


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits kept as Pillow before 11 computed them: a black image. Pillow 11 and later
    refuse 0 bits, which timm's RandAugment asks for at magnitude 10 with 'inc1' (a magnitude drawn by 'mstd' is
    clipped to 10: `rand-m9-mstd0.5-inc1`, the ImageNet recipes', in about 1 image of 900) and below 2.5 without:
    the transform raised and the training run ended."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def with_posterize_any_bits(transform):
    """`transform` (timm's, a Compose or one transform) with the posterize of its RandAugment, AutoAugment and
    AugMix ops replaced by `posterize_any_bits`, in place."""
    for t in getattr(transform, 'transforms', [transform]):
        ops = list(getattr(t, 'ops', [])) + [op for policy in getattr(t, 'policy', []) for op in policy]
        for op in ops:
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = posterize_any_bits
    return transform


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
