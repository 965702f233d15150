"""Checks shared by the models: a clear ValueError naming what is wrong with the input or with an argument."""
import numbers
from collections.abc import Iterable
from typing import Optional, Tuple

import torch

from ..layers.ssm_kernel import check_sizes, is_int

__all__ = ['check_input', 'check_img_size', 'check_model_sizes', 'check_num_classes', 'check_rates']


def check_img_size(img_size) -> Tuple[int, int]:
    """`img_size` as (H, W) (one integer: a square), after raising ValueError unless it is one or two positive
    integers (NumPy's too): here, rather than as an error about a layer's grid or pooling."""
    size = tuple(img_size) if isinstance(img_size, Iterable) and not isinstance(img_size, str) else (img_size,) * 2
    if len(size) != 2 or not all(is_int(s) and s > 0 for s in size):
        raise ValueError(f'img_size must be a positive integer, or two (H, W), got {img_size!r}')
    return int(size[0]), int(size[1])


def check_model_sizes(in_chans, num_classes, **depths) -> None:
    """Raise ValueError naming the first of a model's sizes out of range: `in_chans` a positive integer, `num_classes`
    a non-negative one (0: no classifier, as in timm), each of `depths` (name=value: an integer, or one per stage) a
    non-negative one. Here, rather than as an error from a layer at the first forward, or none at all."""
    check_sizes(in_chans=in_chans)
    check_num_classes(num_classes)
    for name, value in depths.items():
        values = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else (value,)
        if not all(is_int(v) and v >= 0 for v in values):
            raise ValueError(f'{name} must be a non-negative number of blocks (or one per stage), got {value!r}')


def check_rates(**rates) -> None:
    """Raise ValueError naming the first of `rates` (name=value: a dropout or stochastic depth rate) that is not a
    real number in [0, 1), as the config's model.drop_rate and model.drop_path_rate are: through the Python API a
    negative rate or nan built a model (timm's DropPath then dropped nothing, or everything at 1), a string failed
    inside torch.linspace."""
    for name, value in rates.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ValueError(f'{name} must be a number in [0, 1), got {value!r}')


def check_num_classes(num_classes) -> None:
    """Raise ValueError unless `num_classes` is a non-negative integer (0: no classifier, as in timm): at
    construction and in `reset_classifier`, where timm's heads take a negative count for 0 (the model then gives
    features for logits) and fail on others in the layers, after the model has recorded it."""
    if not is_int(num_classes) or num_classes < 0:
        raise ValueError(f'num_classes must be a non-negative integer (0: no classifier), got {num_classes!r}')


def check_input(
        x: torch.Tensor,
        in_chans: int,
        layout: str = '(B, C, H, W)',
        min_side: int = 1,
        patch: Optional[Tuple[int, int]] = None,
        min_frames: int = 1,
) -> torch.Tensor:
    """x, after raising ValueError unless it is a floating point tensor with the rank of `layout`, `in_chans`
    channels (dim 1), its last two sides (H, W; a sequence: its length) at least `min_side` (the model's total
    stride) and multiples of `patch`, and (clips) at least `min_frames` frames (dim 2).

    Every check of a model's input is here: the models' modules wrap this function for FX (`torch.fx.wrap`), so
    an FX graph (timm's `feature_cls='fx'`) calls it on the real input instead of tracing through it; it returns
    x so that the call lies on the input's path (graphs drop calls whose results are unused)."""
    if not x.is_floating_point():  # (e.g. uint8 images: the projections would fail on the dtype, less clearly)
        raise ValueError(f'expected a floating point input {layout}, got {x.dtype} (convert images with .float() '
                         'and normalize them as the model\'s data config says)')
    rank = layout.count(',') + 1
    if x.ndim != rank:
        raise ValueError(f'expected input {layout}, got shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'expected {in_chans} input channels, got {x.shape[1]} in shape {tuple(x.shape)}')
    sides = x.shape[-2:] if rank >= 4 else x.shape[-1:]  # (H, W), or a sequence's length
    if min(sides) < min_side:
        raise ValueError(f'input sides must be at least {min_side} (the total stride), got {tuple(sides)}')
    if patch is not None and any(s < p or s % p for s, p in zip(x.shape[-2:], patch)):
        raise ValueError(
            f'input sides must be positive multiples of the patch size {patch}, got {tuple(x.shape[-2:])}')
    if rank == 5 and x.shape[2] < min_frames:
        raise ValueError(f'clips need at least {min_frames} frames (the stem stride in time), got {x.shape[2]}')
    return x
