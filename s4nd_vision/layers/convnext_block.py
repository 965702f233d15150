"""The ConvNeXt block with a pluggable spatial mixer (S4ND, or a depthwise conv for the baselines)."""
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm, Mlp, get_act_layer

from .dispatch import channel_major_input
from .ops import channels_first
from .pointwise import norm_mlp_channels, record_submodules, submodules_as_built

__all__ = ['ConvNeXtS4NDBlock']


class ConvNeXtS4NDBlock(nn.Module):
    """ConvNeXt block with S4ND in place of the depthwise conv: (B, C, *spatial) -> (B, C, *spatial).

    mixer (S4ND in linear form: convolution + D skip) -> LayerNorm -> MLP -> layer scale -> drop path
    + shortcut. Any number of spatial axes: `mixer_layer` decides (2D, 3D and isotropic models share it).
    On the CPU, a mixer output in S4ND's channel-major working layout stays in it (`pointwise`), and so does the
    block's output when its input was.
    """

    def __init__(
            self,
            dim: int,
            mixer_layer: Callable[[int], nn.Module],
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = 1e-6,
            act_layer: Union[str, Callable] = 'gelu',
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: channels.
            mixer_layer: builds the spatial mixer for `dim` channels (an S4ND layer referenced to the
                block's grid, or a depthwise conv).
            mlp_ratio: MLP expansion ratio.
            ls_init_value: layer scale init (None disables).
            act_layer: MLP activation.
            drop_path: stochastic depth rate.
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv_dw = mixer_layer(dim)  # (ConvNeXt's name for its depthwise conv: timm checkpoints map onto it)
        self.norm = LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=get_act_layer(act_layer), **dd)
        self.ls_init_value = ls_init_value
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim, **dd)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        record_submodules(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The layer scale back to `ls_init_value` (e.g. after `to_empty` from the meta device; the submodules reset
        their own parameters)."""
        if self.gamma is not None:
            self.gamma.fill_(self.ls_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        u = channel_major_input(x)
        if u is not None and submodules_as_built(self):  # an S4ND layer's output in its working layout: the rest
            # acts on it there (no copies), reading the norm's and the MLP's weights
            x = channels_first(norm_mlp_channels(u, self.norm, self.mlp, self.gamma))
        else:
            x = x.movedim(1, -1)  # (B, C, *spatial) -> (B, *spatial, C)
            x = self.mlp(self.norm(x))
            if self.gamma is not None:
                x = x * self.gamma
            x = x.movedim(-1, 1)  # (B, *spatial, C) -> (B, C, *spatial)
        return self.drop_path(x) + shortcut
