"""Input checks shared by the models: a clear ValueError naming what is wrong with the input."""
import torch

__all__ = ['check_input']


def check_input(x: torch.Tensor, in_chans: int, layout: str = '(B, C, H, W)', min_side: int = 1) -> None:
    """Raise ValueError unless `x` is a floating point tensor with the rank of `layout`, `in_chans` channels (dim 1)
    and its last two sides (H, W) at least `min_side` (the model's total stride)."""
    if not x.is_floating_point():  # (e.g. uint8 images: the projections would fail on the dtype, less clearly)
        raise ValueError(f'expected a floating point input {layout}, got {x.dtype} (convert images with .float() '
                         'and normalize them as the model\'s data config says)')
    rank = layout.count(',') + 1
    if x.ndim != rank:
        raise ValueError(f'expected input {layout}, got shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'expected {in_chans} input channels, got {x.shape[1]} in shape {tuple(x.shape)}')
    if min(x.shape[-2:]) < min_side:
        raise ValueError(f'input sides must be at least {min_side} (the total stride), got {tuple(x.shape[-2:])}')
