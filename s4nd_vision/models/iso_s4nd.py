""" Isotropic S4ND

The architecture of S4ND's zero-shot resolution experiments: no downsampling at all. A pointwise
input projection at full resolution, a stack of residual blocks (S4ND global convolution -> norm
-> pointwise MLP), global average pooling, a norm and a linear head. Every layer is pointwise or
an S4ND layer referenced to the training grid, so the same weights run at any input size and see
the same continuous kernels: a model trained at 14 px classifies 28 or 42 px images.

`mixer_type='conv'` swaps each S4ND layer for a 7x7 depthwise conv and changes nothing else: the
baseline (`conv_iso_*`) whose receptive field is fixed in pixels, so it does not transfer.

Paper:
* `S4ND: Modeling Images and Videos as Multidimensional Signals Using State Spaces`
  - https://arxiv.org/abs/2210.06583

The S4ND defaults (S4D-LegS init, step sizes in [0.05, 0.5], layer scale 1.0, no band-limit) favour
zero-shot resolution change: slowly decaying kernels that span the image, smooth enough to resample
(the README's demo table shows their effect). The registered variants carry timm's generic data
defaults (ImageNet, 3x224x224, 1000 classes); the demo passes its own (configs/demo/mnist_iso.yaml).
"""
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, calculate_drop_path_rates, create_conv2d
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ..layers import S4ND, ConvNeXtS4NDBlock, check_kernel_args, stacked_kernels
from ..layers.ssm_kernel import check_sizes
from ._base import LIBRARY_CFG, MIXER_TYPES, S4NDModel, feature_cfg, handed_out, paper_cfg
from ._checkpoint import check_pretrained_file, check_weights_fit, filter_args, stated_img_size, unwrap_state_dict
from ._checks import check_img_size, check_model_sizes, check_rates

__all__ = ['IsoS4ND']

_DEFAULT_INIT = {'s4d': 'legs', 's4': 'legs'}  # (the zero-shot defaults above; SGConv takes no init)


class IsoS4ND(S4NDModel):
    """Isotropic (no downsampling) S4ND network: (B, in_chans, H, W) -> (B, num_classes).

    Runs at any input size; compute grows with H * W since every block works at full resolution.
    """
    _feature_seq = 'blocks'  # the intermediates are the blocks' outputs

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            img_size: Union[int, Tuple[int, int]] = 224,
            depth: int = 4,
            dim: int = 64,
            mixer_type: str = 's4nd',
            kernel: str = 's4d',
            d_state: int = 64,
            ssm_init: Optional[str] = None,
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
            mixer_type: the blocks' spatial mixer, 's4nd' or 'conv' (depthwise conv, the baseline).
            kernel: per-axis kernel of every S4ND layer: 's4d' (diagonal SSM), 's4' (DPLR SSM) or 'sgconv'
                (`S4ND`'s `kernel`; 's4nd').
            d_state: SSM state size per axis ('s4d', 's4').
            ssm_init: initialization of A: 'lin', 'inv' or 'legs' for 's4d', 'legs' for 's4' (None: 'legs', S4D-LegS
                or HiPPO-LegS; 'sgconv' takes none).
            dt_min, dt_max: step size initialization range ('s4d', 's4').
            bandlimit: S4ND band-limiting cut-off ('s4d', 's4'), 0 or None = off.
            conv_kernel_size: depthwise kernel size ('conv'): a positive odd integer (the conv is centred).
            mlp_ratio: MLP expansion ratio.
            ls_init_value: layer scale init (None disables).
            act_layer: MLP activation.
            drop_rate: head dropout.
            drop_path_rate: stochastic depth rate (linear over the blocks).
        """
        super().__init__()
        if mixer_type not in MIXER_TYPES:
            raise ValueError(f'mixer_type must be one of {MIXER_TYPES}, got {mixer_type!r}')
        check_kernel_args(kernel, ssm_init, d_state, dt_min, dt_max, name='ssm_init', bandlimit=bandlimit)
        # (whatever the mixer, as the S4ND keywords are: an even size padded by half lost a row and a column per
        # block, a 0 padded negatively; both built and then failed at the first forward)
        check_sizes(dim=dim, conv_kernel_size=conv_kernel_size)
        if conv_kernel_size % 2 == 0:
            raise ValueError(f'conv_kernel_size must be odd (a centred conv keeps the size), got {conv_kernel_size!r}')
        check_model_sizes(in_chans, num_classes, depth=depth)
        check_rates(drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.img_size = check_img_size(img_size)
        self.mixer_type = mixer_type
        self.min_input_size = 1  # no downsampling: every side length works
        self.grad_checkpointing = False
        if mixer_type == 's4nd':
            mixer_layer = partial(
                S4ND, ndim=2, kernel=kernel, d_state=d_state,
                init=_DEFAULT_INIT.get(kernel) if ssm_init is None else ssm_init, dt_min=dt_min, dt_max=dt_max,
                bandlimit=bandlimit, l_ref=self.img_size, **dd)
        else:
            mixer_layer = lambda chs: create_conv2d(chs, chs, conv_kernel_size, depthwise=True, **dd)  # noqa: E731

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=1, **dd),
            LayerNorm2d(dim, **dd),
        )
        dp_rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            ConvNeXtS4NDBlock(
                dim, mixer_layer, mlp_ratio=mlp_ratio,
                ls_init_value=ls_init_value, act_layer=act_layer, drop_path=dp_rates[i], **dd)
            for i in range(depth)
        ])
        self.feature_info = [dict(num_chs=dim, reduction=1, module=f'blocks.{i}') for i in range(depth)]
        self.num_features = dim
        self.norm_pre = nn.Identity()  # (the norm is in the head)
        self._init_norm_mlp_head(num_classes, global_pool, None, drop_rate, head_init_scale=1., **dd)

    def _s4nd_layers(self) -> Iterator[Tuple[S4ND, Tuple[int, int]]]:
        for m in self.blocks.modules():
            if isinstance(m, S4ND):
                yield m, (1, 1)  # every block runs at the input grid

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(stem=r'^stem', blocks=r'^blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, dim, H, W), in a layout whose spatial axes merge (`handed_out`).

        In a training step the kernels of all blocks are generated together (`stacked_kernels`), as in
        `forward_intermediates`."""
        x = self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            with stacked_kernels(self, x, lambda: self._s4nd_grids(x.shape)):
                x = self.blocks(x)
        return handed_out(self.norm_pre(x))


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor], model: IsoS4ND, strict: bool = True, warn_classifier: bool = True,
) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint (a training checkpoint dict unwrapped: `unwrap_state_dict`), when they fit the
    model (`check_weights_fit`; `warn_classifier`: `filter_args`); timm adapts the stem to the model's `in_chans`
    after."""
    return check_weights_fit(unwrap_state_dict(state_dict), model, strict=strict, check_classifier=warn_classifier)


def _create_iso(variant: str, pretrained: bool = False, **kwargs) -> IsoS4ND:
    check_pretrained_file(pretrained, kwargs)
    stated_img_size(kwargs)
    return build_model_with_cfg(
        IsoS4ND, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, **filter_args(kwargs)),
        # the last 4 blocks
        feature_cfg=feature_cfg(kwargs, out_indices=min(4, kwargs.get('depth', 4)), feature_cls='getter'),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (224, 224),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc',
        'license': 'apache-2.0', **paper_cfg(), **LIBRARY_CFG, **kwargs,
    }


default_cfgs = generate_default_cfgs({
    's4nd_iso_tiny.untrained': _cfg(),
    's4nd_iso_small.untrained': _cfg(),
    'conv_iso_tiny.untrained': _cfg(),
    'conv_iso_small.untrained': _cfg(),
})


@register_model
def s4nd_iso_tiny(pretrained: bool = False, **kwargs) -> IsoS4ND:
    model_args = dict(depth=4, dim=64, mixer_type='s4nd')
    return _create_iso('s4nd_iso_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def s4nd_iso_small(pretrained: bool = False, **kwargs) -> IsoS4ND:
    model_args = dict(depth=8, dim=128, mixer_type='s4nd')
    return _create_iso('s4nd_iso_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def conv_iso_tiny(pretrained: bool = False, **kwargs) -> IsoS4ND:
    model_args = dict(depth=4, dim=64, mixer_type='conv')
    return _create_iso('conv_iso_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def conv_iso_small(pretrained: bool = False, **kwargs) -> IsoS4ND:
    model_args = dict(depth=8, dim=128, mixer_type='conv')
    return _create_iso('conv_iso_small', pretrained=pretrained, **dict(model_args, **kwargs))
