"""Channel LayerNorm for clips: timm's LayerNorm2d with a time axis."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['LayerNorm3d']


class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, T, H, W) tensor (timm's LayerNorm2d, one axis more)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__(num_channels, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)  # (B, C, T, H, W) -> (B, T, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)  # (B, T, H, W, C) -> (B, C, T, H, W)
