"""Channel LayerNorm for channels-first tensors of any rank: timm's LayerNorm2d for sequences and clips too."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['ChannelLayerNorm', 'LayerNorm3d']


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels (axis 1) of a (B, C, *spatial) tensor, or of a (B, C) sample (timm's LayerNorm2d
    for any number of axes)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__(num_channels, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, *spatial) -> (B, *spatial, C) and back; for a (B, C) sample nothing moves (one expression for both,
        # which FX can trace)
        return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)


LayerNorm3d = ChannelLayerNorm  # (B, C, T, H, W): the name timm's LayerNorm2d suggests for clips
