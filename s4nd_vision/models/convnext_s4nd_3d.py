""" ConvNeXt-S4ND 3D (video), and the inflated 3D ConvNeXt baseline

ConvNeXt for clips (B, C, T, H, W): the 2D ConvNeXt-S4ND with a time axis. Every block's S4ND
has three SSM kernels, time (`kernels.0`), H (`kernels.1`) and W (`kernels.2`); the time kernel
is two-sided by default (`time_bidirectional=False` makes it causal). With `conv_type='conv'`
the blocks hold depthwise (3, 7, 7) convs instead: timm's ConvNeXt inflated to 3D, the baseline.

* Stem: a tubelet stem of stride (2, 4, 4). `stem_type='s4nd'` (default) is the 2D S4ND stem with
  a time axis (pointwise 3 -> 32, 3D S4ND at full resolution with average pooling (2, 4, 4),
  pointwise GLU projection, norm); `'patch'` is a (2, 4, 4) conv of stride (2, 4, 4), timm's 4x4
  patch conv inflated along time.
* Downsampling is spatial only, as in 2D: time stays at T / 2 through the network.
  `'s4nd'`: norm, 3D S4ND with average pooling (1, 2, 2), pointwise GLU; `'conv'`: norm,
  (1, 2, 2) conv of stride (1, 2, 2).

Parameter names are the 2D models' (`convnext_s4nd_*`, and timm's `convnext_*` for the
conv/patch baseline) name for name, so a 2D checkpoint maps onto a 3D model by
`s4nd_vision.models.inflate` (or on the fly, by `timm.create_model(..., pretrained=True)` with a
2D file): S4ND H/W kernels onto the H/W axes, the time axis its own initialization, convs
repeated along time, and the S4ND stem's 2D kernels simply gain a time axis (its pooling of 2
in time averages the frames of a static clip to the same frame).

Papers:
* `S4ND: Modeling Images and Videos as Multidimensional Signals Using State Spaces`
  - https://arxiv.org/abs/2210.06583
* `A ConvNet for the 2020s` - https://arxiv.org/abs/2201.03545

Resolution control as in 2D: every S4ND layer knows its (T, H, W) grid at `num_frames` x
`img_size` and derives its rate from each input, so a clip with twice the frames over the same
duration sees the same continuous time kernel. `set_input_size(img_size, num_frames)` moves that
reference.
"""
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import calculate_drop_path_rates, to_2tuple
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ..layers import S4ND
from ._checks import check_input
from .convnext_s4nd import ConvNeXtAPI, ConvNeXtS4NDBlock
from .inflate import inflate_state_dict, is_2d_state_dict, unwrap_state_dict

__all__ = ['ConvNeXt3d', 'LayerNorm3d']

_STEM_TYPES = ('s4nd', 'patch')
_DOWNSAMPLE_TYPES = ('s4nd', 'conv')
_CONV_TYPES = ('s4nd', 'conv')
_TUBELET = (2, 4, 4)  # stem stride (T, H, W)
_DW_KERNEL_SIZE = (3, 7, 7)  # depthwise conv of the baseline
_NUM_FRAMES = 16
_IMG_SIZE = 224


class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, T, H, W) tensor (timm's LayerNorm2d, one axis more)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__(num_channels, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)  # (B, C, T, H, W) -> (B, T, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)  # (B, T, H, W, C) -> (B, C, T, H, W)


def _dw_conv3d(dim: int, device=None, dtype=None) -> nn.Conv3d:
    """Depthwise (3, 7, 7) conv with 'same' padding: ConvNeXt's 7x7 depthwise conv inflated along time."""
    return nn.Conv3d(
        dim, dim, kernel_size=_DW_KERNEL_SIZE, padding=tuple(k // 2 for k in _DW_KERNEL_SIZE), groups=dim,
        device=device, dtype=dtype)


class ConvNeXt3dStage(nn.Module):
    """Optional spatial downsampling followed by `depth` blocks: (B, in_chs, T, H, W) -> (B, out_chs, T, H', W')."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            feat_size: Tuple[int, int, int],
            conv_layer: Callable[[int], nn.Module],
            s4nd_layer: Callable,
            downsample_type: Optional[str] = 's4nd',
            depth: int = 2,
            drop_path_rates: Optional[List[float]] = None,
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = 1e-6,
            act_layer: Union[str, Callable] = 'gelu',
            device=None,
            dtype=None,
    ):
        """
        Args:
            feat_size: the stage's (output) (T, H, W) grid at the training clip size.
            conv_layer: builds a block's spatio-temporal mixer for a channel count.
            s4nd_layer: builds the S4ND of the 's4nd' downsampling.
            downsample_type: 's4nd', 'conv' (norm + (1, 2, 2) stride-(1, 2, 2) conv) or None (none).
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        if downsample_type == 's4nd':
            in_size = (feat_size[0], 2 * feat_size[1], 2 * feat_size[2])
            self.downsample = nn.Sequential(
                LayerNorm3d(in_chs, **dd),
                s4nd_layer(in_chs, l_ref=in_size, pool=(1, 2, 2)),
                nn.Conv3d(in_chs, 2 * out_chs, kernel_size=1, **dd),
                nn.GLU(dim=1),
            )
        elif downsample_type == 'conv':
            self.downsample = nn.Sequential(
                LayerNorm3d(in_chs, **dd),
                nn.Conv3d(in_chs, out_chs, kernel_size=(1, 2, 2), stride=(1, 2, 2), **dd),
            )
        else:
            self.downsample = nn.Identity()
        drop_path_rates = drop_path_rates or [0.] * depth
        self.blocks = nn.Sequential(*[
            ConvNeXtS4NDBlock(
                out_chs, conv_layer, mlp_ratio=mlp_ratio, ls_init_value=ls_init_value,
                act_layer=act_layer, drop_path=drop_path_rates[i], **dd)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class ConvNeXt3d(ConvNeXtAPI):
    """3D ConvNeXt(-S4ND) for clips: (B, in_chans, T, H, W) -> (B, num_classes).

    Runs at any clip with at least 2 frames and sides of at least 32 (the total stride).
    """
    intermediates_fmt = 'NCTHW'  # features and intermediates are clips

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            img_size: Union[int, Tuple[int, int]] = _IMG_SIZE,
            num_frames: int = _NUM_FRAMES,
            depths: Tuple[int, ...] = (3, 3, 9, 3),
            dims: Tuple[int, ...] = (96, 192, 384, 768),
            conv_type: str = 's4nd',
            stem_type: str = 's4nd',
            stem_chs: int = 32,
            downsample_type: str = 's4nd',
            time_bidirectional: bool = True,
            d_state: int = 64,
            ssm_init: str = 'lin',
            dt_min: float = 0.1,
            dt_max: float = 1.0,
            bandlimit: Optional[float] = None,
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = 1e-6,
            head_init_scale: float = 1.,
            head_hidden_size: Optional[int] = None,
            act_layer: Union[str, Callable] = 'gelu',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: input channels.
            num_classes: classifier outputs (0 for pooled features).
            global_pool: head pooling type over (T, H, W) ('' for none).
            img_size: training frame size; S4ND kernels are referenced to it (rate 1).
            num_frames: training clip length in frames; the time kernels are referenced to it.
            depths: blocks per stage.
            dims: channels per stage.
            conv_type: the blocks' mixer, 's4nd' (3D S4ND) or 'conv' (depthwise (3, 7, 7) conv).
            stem_type: 's4nd' (resolution-aware, default) or 'patch' ((2, 4, 4) tubelet conv).
            stem_chs: channels of the S4ND stem filter.
            downsample_type: 's4nd' (resolution-aware, default) or 'conv' ((1, 2, 2) strided conv).
            time_bidirectional: two-sided time kernels (False: causal in time).
            d_state: SSM state size per axis.
            ssm_init: S4D initialization of A ('lin', 'inv', 'legs').
            dt_min, dt_max: step size initialization range.
            bandlimit: S4ND band-limiting cut-off (None = off).
            mlp_ratio: MLP expansion ratio.
            ls_init_value: layer scale init (None disables).
            head_init_scale: classifier weight and bias init scale.
            head_hidden_size: pre-logits MLP size in the head (None = no MLP).
            act_layer: MLP activation.
            drop_rate: head dropout.
            drop_path_rate: stochastic depth rate.
        """
        super().__init__()
        if conv_type not in _CONV_TYPES:
            raise ValueError(f'conv_type must be one of {_CONV_TYPES}, got {conv_type!r}')
        if stem_type not in _STEM_TYPES:
            raise ValueError(f'stem_type must be one of {_STEM_TYPES}, got {stem_type!r}')
        if downsample_type not in _DOWNSAMPLE_TYPES:
            raise ValueError(f'downsample_type must be one of {_DOWNSAMPLE_TYPES}, got {downsample_type!r}')
        if len(depths) != len(dims):
            raise ValueError(f'depths and dims need the same length, got {depths} and {dims}')
        if num_frames < _TUBELET[0]:
            raise ValueError(f'num_frames must be at least {_TUBELET[0]} (the stem stride in time), got {num_frames}')
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.img_size = to_2tuple(img_size)
        self.num_frames = num_frames
        s4nd_layer = partial(
            S4ND, ndim=3, d_state=d_state, init=ssm_init, dt_min=dt_min, dt_max=dt_max, bandlimit=bandlimit,
            bidirectional=(time_bidirectional, True, True), **dd)

        grid = (num_frames, *self.img_size)
        if stem_type == 's4nd':
            self.stem = nn.Sequential(
                nn.Conv3d(in_chans, stem_chs, kernel_size=1, **dd),
                s4nd_layer(stem_chs, l_ref=grid, pool=_TUBELET),
                nn.Conv3d(stem_chs, 2 * dims[0], kernel_size=1, **dd),
                nn.GLU(dim=1),
                LayerNorm3d(dims[0], **dd),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv3d(in_chans, dims[0], kernel_size=_TUBELET, stride=_TUBELET, **dd),
                LayerNorm3d(dims[0], **dd),
            )

        dp_rates = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        self.feature_info = []
        stages = []
        prev_chs = dims[0]
        stride = _TUBELET[1]
        for i, (depth, out_chs) in enumerate(zip(depths, dims)):
            if i > 0:
                stride *= 2
            feat_size = (num_frames // _TUBELET[0], self.img_size[0] // stride, self.img_size[1] // stride)
            if conv_type == 's4nd':
                conv_layer = partial(s4nd_layer, l_ref=feat_size)
            else:
                conv_layer = partial(_dw_conv3d, **dd)
            stages.append(ConvNeXt3dStage(
                prev_chs,
                out_chs,
                feat_size=feat_size,
                conv_layer=conv_layer,
                s4nd_layer=s4nd_layer,
                downsample_type=downsample_type if i > 0 else None,
                depth=depth,
                drop_path_rates=dp_rates[i],
                mlp_ratio=mlp_ratio,
                ls_init_value=ls_init_value,
                act_layer=act_layer,
                **dd,
            ))
            prev_chs = out_chs
            # reduction is spatial (timm's convention); time is reduced by 2 everywhere
            self.feature_info += [dict(num_chs=out_chs, reduction=stride, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)
        self.min_input_size = stride
        self.num_features = prev_chs
        # timm's head on (B, C, T * H, W) (see forward_head): pooling over T * H x W is pooling over the clip
        self._init_head(num_classes, global_pool, head_hidden_size, drop_rate, head_init_scale, **dd)

    def _s4nd_layers(self) -> Iterator[Tuple[S4ND, Tuple[int, int]]]:
        """Every S4ND layer with the (time, spatial) stride of the grid it runs on."""
        if isinstance(self.stem[1], S4ND):
            yield self.stem[1], (1, 1)
        for i, stage in enumerate(self.stages):
            reduction = self.feature_info[i]['reduction']
            for m in stage.downsample.modules():
                if isinstance(m, S4ND):
                    yield m, (_TUBELET[0], reduction // 2)
            for m in stage.blocks.modules():
                if isinstance(m, S4ND):
                    yield m, (_TUBELET[0], reduction)

    def _s4nd_grids(self, shape: torch.Size) -> List[Tuple[S4ND, Tuple[int, ...]]]:
        frames, height, width = shape[-3:]
        return [(layer, (frames // t_stride, height // stride, width // stride))
                for layer, (t_stride, stride) in self._s4nd_layers()]

    @torch.jit.ignore
    def set_input_size(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            num_frames: Optional[int] = None,
    ) -> None:
        """Make `num_frames` x `img_size` the clip size at which the S4ND kernels run at rate 1 (None keeps one).

        Not needed for zero-shot evaluation at other sizes (the rate follows the input); use it
        when a new clip size should become the model's native one, e.g. after fine-tuning at it.
        """
        img_size = self.img_size if img_size is None else to_2tuple(img_size)
        num_frames = self.num_frames if num_frames is None else num_frames
        if min(img_size) < self.min_input_size:
            raise ValueError(f'img_size must be at least {self.min_input_size} on each side, got {img_size}')
        if num_frames < _TUBELET[0]:
            raise ValueError(f'num_frames must be at least {_TUBELET[0]}, got {num_frames}')
        for layer, (t_stride, stride) in self._s4nd_layers():
            layer.set_reference_size((num_frames // t_stride, img_size[0] // stride, img_size[1] // stride))
        self.img_size = img_size
        self.num_frames = num_frames

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.in_chans, layout='(B, C, T, H, W)', min_side=self.min_input_size)
        if x.shape[2] < _TUBELET[0]:
            raise ValueError(f'clips need at least {_TUBELET[0]} frames (the stem stride in time), got {x.shape[2]}')

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, num_classes), or (B, C', T, H, W) when the head does not pool."""
        frames = x.shape[2]
        x = self.head(x.flatten(2, 3), pre_logits=pre_logits)  # (B, C, T, H, W) -> (B, C, T * H, W)
        return x.unflatten(2, (frames, -1)) if x.ndim == 4 else x


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ConvNeXt3d) -> Dict[str, torch.Tensor]:
    """Load 3D checkpoints as they are, inflate 2D ones on the fly (`inflate_state_dict` defaults).

    A 2D classifier is kept when it fits the model (the same number of classes) and dropped
    otherwise (e.g. ImageNet weights for a 51-class video model). A checkpoint without a
    classifier keeps the model's own initialization of `head.fc`.
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_2d_state_dict(state_dict):
        fc, head_2d = model.get_classifier(), state_dict.get('head.fc.weight')
        keep_head = isinstance(fc, nn.Linear) and head_2d is not None and head_2d.shape == fc.weight.shape
        state_dict = inflate_state_dict(state_dict, model, keep_head=keep_head)
    for k, v in model.get_classifier().state_dict(prefix='head.fc.').items():
        state_dict.setdefault(k, v)
    return state_dict


def _create_convnext_3d(variant: str, pretrained: bool = False, **kwargs) -> ConvNeXt3d:
    model = build_model_with_cfg(
        ConvNeXt3d, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs)
    # timm's registry only holds (C, H, W) input sizes; the instance's cfg states the clip it takes
    img_size = to_2tuple(kwargs.get('img_size', _IMG_SIZE))
    num_frames = kwargs.get('num_frames', _NUM_FRAMES)
    model.pretrained_cfg = model.default_cfg = dict(
        model.pretrained_cfg,
        input_size=(kwargs.get('in_chans', 3), num_frames, *img_size),
        pool_size=(num_frames // _TUBELET[0], img_size[0] // 32, img_size[1] // 32))
    return model


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, _IMG_SIZE, _IMG_SIZE), 'pool_size': (_NUM_FRAMES // 2, 7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc',
        'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'convnext_s4nd_3d_atto.untrained': _cfg(),
    'convnext_s4nd_3d_tiny.untrained': _cfg(),
    'convnext_3d_atto.untrained': _cfg(),
    'convnext_3d_tiny.untrained': _cfg(),
})

_BASELINE = dict(conv_type='conv', stem_type='patch', downsample_type='conv')


@register_model
def convnext_s4nd_3d_atto(pretrained: bool = False, **kwargs) -> ConvNeXt3d:
    model_args = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320))
    return _create_convnext_3d('convnext_s4nd_3d_atto', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_s4nd_3d_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt3d:
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
    return _create_convnext_3d('convnext_s4nd_3d_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_3d_atto(pretrained: bool = False, **kwargs) -> ConvNeXt3d:
    model_args = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), **_BASELINE)
    return _create_convnext_3d('convnext_3d_atto', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_3d_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt3d:
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **_BASELINE)
    return _create_convnext_3d('convnext_3d_tiny', pretrained=pretrained, **dict(model_args, **kwargs))
