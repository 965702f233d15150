""" Isotropic S4ND

The architecture of S4ND's zero-shot resolution experiments: no downsampling at all. A pointwise
input projection at full resolution, a stack of residual blocks (S4ND global convolution -> norm
-> pointwise MLP), global average pooling, a norm and a linear head. Every layer is pointwise or
an S4ND layer referenced to the training grid, so the same weights run at any input size and see
the same continuous kernels: a model trained at 14 px classifies 28 or 42 px images.

`mixer='conv'` swaps each S4ND layer for a 7x7 depthwise conv and changes nothing else: the
baseline (`conv_iso_*`) whose receptive field is fixed in pixels, so it does not transfer.

Paper:
* `S4ND: Modeling Images and Videos as Multidimensional Signals Using State Spaces`
  - https://arxiv.org/abs/2210.06583

The registered variants default to the built-in demo: 1x14x14 MNIST digits, 10 classes. The S4ND
defaults (S4D-LegS init, step sizes in [0.05, 0.5], layer scale 1.0, no band-limit) measured best
for zero-shot resolution change there (trained at 14 px, kept about 97% of the accuracy at 28 and 42 px).
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import (
    LayerNorm2d, NormMlpClassifierHead, calculate_drop_path_rates, create_conv2d, get_device_dtype, to_2tuple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, named_apply, register_model
from timm.models._features import feature_take_indices

from ..layers import S4ND, is_ssm_param
from ._checks import check_input
from .convnext_s4nd import ConvNeXtS4NDBlock

__all__ = ['IsoS4ND']

MIXERS = ('s4nd', 'conv')
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class IsoS4ND(nn.Module):
    """Isotropic (no downsampling) S4ND network: (B, in_chans, H, W) -> (B, num_classes).

    Runs at any input size; compute grows with H * W since every block works at full resolution.
    """

    def __init__(
            self,
            in_chans: int = 1,
            num_classes: int = 10,
            global_pool: str = 'avg',
            img_size: Union[int, Tuple[int, int]] = 14,
            depth: int = 4,
            dim: int = 64,
            mixer: str = 's4nd',
            d_state: int = 64,
            ssm_init: str = 'legs',
            dt_min: float = 0.05,
            dt_max: float = 0.5,
            bandlimit: Optional[float] = None,
            conv_kernel_size: int = 7,
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = 1.0,
            act_layer: Union[str, Callable] = 'gelu',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: input image channels.
            num_classes: classifier outputs (0 for pooled features).
            global_pool: head pooling type ('' for none).
            img_size: training resolution; S4ND kernels are referenced to it (rate 1).
            depth: number of blocks.
            dim: channels of every block.
            mixer: spatial mixing layer, 's4nd' or 'conv' (depthwise conv, the baseline).
            d_state: SSM state size per axis ('s4nd').
            ssm_init: S4D initialization of A, 'lin', 'inv' or 'legs' ('s4nd').
            dt_min, dt_max: step size initialization range ('s4nd').
            bandlimit: S4ND band-limiting cut-off, None = off ('s4nd').
            conv_kernel_size: depthwise kernel size ('conv').
            mlp_ratio: MLP expansion ratio.
            ls_init_value: layer scale init (None disables).
            act_layer: MLP activation.
            drop_rate: head dropout.
            drop_path_rate: stochastic depth rate (linear over the blocks).
        """
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f'mixer must be one of {MIXERS}, got {mixer!r}')
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.img_size = to_2tuple(img_size)
        self.mixer = mixer
        self.min_input_size = 1  # no downsampling: every side length works
        self.grad_checkpointing = False
        if mixer == 's4nd':
            make_mixer = partial(
                S4ND, ndim=2, d_state=d_state, init=ssm_init, dt_min=dt_min, dt_max=dt_max, bandlimit=bandlimit,
                l_ref=self.img_size, **dd)
        else:
            make_mixer = lambda chs: create_conv2d(chs, chs, conv_kernel_size, depthwise=True, **dd)  # noqa: E731

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=1, **dd),
            LayerNorm2d(dim, **dd),
        )
        dp_rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            ConvNeXtS4NDBlock(
                dim, make_mixer, mlp_ratio=mlp_ratio,
                ls_init_value=ls_init_value, act_layer=act_layer, drop_path=dp_rates[i], **dd)
            for i in range(depth)
        ])
        self.feature_info = [dict(num_chs=dim, reduction=1, module=f'blocks.{i}') for i in range(depth)]
        self.num_features = dim
        self.head = NormMlpClassifierHead(
            dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, norm_layer=LayerNorm2d, **dd)
        self.head_hidden_size = self.head.num_features
        named_apply(_init_weights, self)

    @torch.jit.ignore
    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Make `img_size` the resolution at which the S4ND kernels run at rate 1 (the reference grid).

        Not needed for zero-shot evaluation at other sizes (the rate follows the input); use it
        when a new resolution should become the model's native one, e.g. after fine-tuning at it.
        """
        img_size = to_2tuple(img_size)
        if min(img_size) < self.min_input_size:
            raise ValueError(f'img_size must be at least {self.min_input_size} on each side, got {img_size}')
        for m in self.blocks.modules():
            if isinstance(m, S4ND):
                m.set_reference_size(img_size)
        self.img_size = img_size

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names of the SSM parameters (A, B, log dt): trained without weight decay."""
        return {name for name, p in self.named_parameters() if is_ssm_param(p)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(stem=r'^stem', blocks=r'^blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        self.num_classes = num_classes
        self.head.reset(
            num_classes, global_pool, reset_other=reset_other, in_features=self.num_features,
            **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.in_chans)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the blocks in `indices` (last n if int, all if None), each (B, dim, H, W).

        `norm` is accepted for timm's interface; there is no final norm outside the head.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.stem(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and head) not needed for the intermediates in `indices`."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, dim, H, W)."""
        self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module, name: Optional[str] = None) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _create_iso(variant: str, pretrained: bool = False, **kwargs) -> IsoS4ND:
    return build_model_with_cfg(
        IsoS4ND, variant, pretrained,
        feature_cfg=dict(out_indices=4, feature_cls='getter'),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 10, 'input_size': (1, 14, 14), 'pool_size': (14, 14),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': MNIST_MEAN, 'std': MNIST_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc',
        'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    's4nd_iso_tiny.untrained': _cfg(),
    's4nd_iso_small.untrained': _cfg(),
    'conv_iso_tiny.untrained': _cfg(),
    'conv_iso_small.untrained': _cfg(),
})


@register_model
def s4nd_iso_tiny(pretrained: bool = False, **kwargs) -> IsoS4ND:
    model_args = dict(depth=4, dim=64, mixer='s4nd')
    return _create_iso('s4nd_iso_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def s4nd_iso_small(pretrained: bool = False, **kwargs) -> IsoS4ND:
    model_args = dict(depth=8, dim=128, mixer='s4nd')
    return _create_iso('s4nd_iso_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def conv_iso_tiny(pretrained: bool = False, **kwargs) -> IsoS4ND:
    model_args = dict(depth=4, dim=64, mixer='conv')
    return _create_iso('conv_iso_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def conv_iso_small(pretrained: bool = False, **kwargs) -> IsoS4ND:
    model_args = dict(depth=8, dim=128, mixer='conv')
    return _create_iso('conv_iso_small', pretrained=pretrained, **dict(model_args, **kwargs))
