""" ConvNeXt-S4ND

ConvNeXt with every 7x7 depthwise conv replaced by an S4ND global convolution, and (by default)
a resolution-aware stem and downsampling: S4ND filter -> average pooling -> pointwise GLU
projection, instead of strided patch convolutions. A strided conv sees a different signal when
the input resolution changes; a (band-limited) S4ND filter followed by average pooling does not,
so the same weights run at resolutions never seen in training.

Papers:
* `S4ND: Modeling Images and Videos as Multidimensional Signals Using State Spaces`
  - https://arxiv.org/abs/2210.06583
* `A ConvNet for the 2020s` - https://arxiv.org/abs/2201.03545

Resolution control: every S4ND layer knows the grid it was trained on (`img_size` divided by its
stride) and, by default, derives its step-size rate from each input's size, so evaluating at a
new resolution needs nothing. `set_input_size(img_size)` moves that reference, e.g. after
fine-tuning at a higher resolution, or to run larger images at the training pixel scale.
"""
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerNorm, LayerNorm2d, Mlp, NormMlpClassifierHead, calculate_drop_path_rates,
    get_act_layer, get_device_dtype, to_2tuple, trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, named_apply, register_model
from timm.models._features import feature_take_indices

from ..layers import S4ND, channel_major, channels_first, is_ssm_param, stacked_kernels
from ._checks import check_input

__all__ = ['ConvNeXtS4ND', 'ConvNeXtAPI']

_STEM_TYPES = ('s4nd', 'patch')
_DOWNSAMPLE_TYPES = ('s4nd', 'conv')


class S4NDStem(nn.Sequential):
    """(B, in_chs, H, W) -> (B, out_chs, H/4, W/4): pointwise in_chs -> stem_chs, S4ND at full
    resolution with average pooling by 4 (fused), pointwise projection with GLU, norm.

    The full-resolution part, the largest tensors of the network, stays in S4ND's channel-major
    layout, and the first projection is fused into the S4ND layer (one GEMM, recomputed in the
    backward pass): no NCHW 1x1 conv, no permuted copies, and only the narrow input is saved.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stem_chs: int,
            img_size: Tuple[int, int],
            s4nd_layer: Callable,
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__(
            nn.Conv2d(in_chs, stem_chs, kernel_size=1, **dd),
            s4nd_layer(stem_chs, l_ref=img_size, pool=4),
            nn.Conv2d(stem_chs, 2 * out_chs, kernel_size=1, **dd),
            nn.GLU(dim=1),
            LayerNorm2d(out_chs, **dd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj, s4nd = self[0], self[1]
        # the projection is fused into S4ND: only the (in_chs, H, B, W) input is kept for backward
        y = s4nd.forward_channel_major(channel_major(x), proj=(proj.weight.flatten(1), proj.bias))
        y = channels_first(y)
        if not torch.is_autocast_enabled(x.device.type):  # (under autocast the next conv picks its dtype)
            y = y.to(x.dtype)
        for m in list(self)[2:]:
            y = m(y)
        return y


def _s4nd_downsample(
        in_chs: int,
        out_chs: int,
        feat_size: Tuple[int, int],
        s4nd_layer: Callable,
        device=None,
        dtype=None,
) -> nn.Sequential:
    """(B, in_chs, H, W) -> (B, out_chs, H/2, W/2): norm, S4ND with average pooling by 2 (fused), pointwise GLU projection."""
    dd = dict(device=device, dtype=dtype)
    return nn.Sequential(
        LayerNorm2d(in_chs, **dd),
        s4nd_layer(in_chs, l_ref=feat_size, pool=2),
        nn.Conv2d(in_chs, 2 * out_chs, kernel_size=1, **dd),
        nn.GLU(dim=1),
    )


class ConvNeXtS4NDBlock(nn.Module):
    """ConvNeXt block with S4ND in place of the depthwise conv: (B, C, *spatial) -> (B, C, *spatial).

    S4ND (linear form: convolution + D skip) -> LayerNorm -> MLP -> layer scale -> drop path + shortcut.
    Any number of spatial axes: `conv_layer` decides (the 3D models reuse this block).
    """

    def __init__(
            self,
            dim: int,
            conv_layer: Callable[[int], nn.Module],
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = 1e-6,
            act_layer: Union[str, Callable] = 'gelu',
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv_dw = conv_layer(dim)  # S4ND referenced to the block's grid (or a depthwise conv)
        self.norm = LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=get_act_layer(act_layer), **dd)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim, **dd)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = x.movedim(1, -1)  # (B, C, *spatial) -> (B, *spatial, C)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = x * self.gamma
        x = x.movedim(-1, 1)  # (B, *spatial, C) -> (B, C, *spatial)
        return self.drop_path(x) + shortcut


class ConvNeXtS4NDStage(nn.Module):
    """Optional downsampling followed by `depth` blocks: (B, in_chs, H, W) -> (B, out_chs, H', W')."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            feat_size: Tuple[int, int],
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
            feat_size: the stage's (output) grid at the training resolution.
            downsample_type: 's4nd', 'conv' (norm + 2x2 stride-2 conv) or None (no downsampling).
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        if downsample_type == 's4nd':
            in_size = (2 * feat_size[0], 2 * feat_size[1])
            self.downsample = _s4nd_downsample(in_chs, out_chs, in_size, s4nd_layer, **dd)
        elif downsample_type == 'conv':
            self.downsample = nn.Sequential(
                LayerNorm2d(in_chs, **dd),
                nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2, **dd),
            )
        else:
            self.downsample = nn.Identity()
        drop_path_rates = drop_path_rates or [0.] * depth
        self.blocks = nn.Sequential(*[
            ConvNeXtS4NDBlock(
                out_chs, partial(s4nd_layer, l_ref=feat_size), mlp_ratio=mlp_ratio, ls_init_value=ls_init_value,
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


class ConvNeXtAPI(nn.Module):
    """timm's model API shared by the 2D and 3D ConvNeXt(-S4ND) models.

    Subclasses build `stem`, `stages`, `norm_pre`, `head`, `feature_info`, `num_features`,
    `head_hidden_size` and `num_classes`, and define `_check_input`.
    """
    intermediates_fmt = 'NCHW'  # layout of the features and intermediates (the only output_fmt)

    def _init_head(
            self,
            num_classes: int,
            global_pool: str,
            head_hidden_size: Optional[int],
            drop_rate: float,
            head_init_scale: float,
            device=None,
            dtype=None,
    ) -> None:
        """timm's norm-MLP classifier head on `num_features`, then the weight init of the whole model."""
        self.norm_pre = nn.Identity()
        self.head = NormMlpClassifierHead(
            self.num_features, num_classes, hidden_size=head_hidden_size, pool_type=global_pool,
            drop_rate=drop_rate, norm_layer=LayerNorm2d, act_layer='gelu', device=device, dtype=dtype)
        self.head_hidden_size = self.head.num_features
        named_apply(partial(_init_weights, head_init_scale=head_init_scale), self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names of the SSM parameters (A, B, log dt): trained without weight decay."""
        return {name for name, p in self.named_parameters() if is_ssm_param(p)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm_pre', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        self.num_classes = num_classes
        self.head.reset(
            num_classes, global_pool, reset_other=reset_other, in_features=self.num_features,
            **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: Optional[str] = None,
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stages in `indices` (last n if int, all if None), each (B, C_i, *spatial_i)."""
        output_fmt = output_fmt or self.intermediates_fmt
        if output_fmt != self.intermediates_fmt:
            raise ValueError(f'output_fmt must be {self.intermediates_fmt!r}, got {output_fmt!r}')
        self._check_input(x)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        last_idx = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm_pre(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm_pre(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) not needed for the intermediates in `indices`."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm_pre = nn.Identity()
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices

    def _s4nd_grids(self, shape: torch.Size) -> List[Tuple[S4ND, Tuple[int, ...]]]:
        """Every S4ND layer with the spatial sizes of its input, for an input of `shape`."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, *spatial) -> (B, num_features, *spatial reduced): H and W by 32 (clips: T by 2).

        In a training step every S4ND layer's kernels are generated up front in a few stacked calls
        (`stacked_kernels`: one per kernel length instead of one per layer)."""
        self._check_input(x)
        # (under gradient checkpointing a recomputed block must redo its own generation)
        layers = [] if any(s.grad_checkpointing for s in self.stages) else self._s4nd_grids(x.shape)
        with stacked_kernels(self, layers, dtype=torch.promote_types(x.dtype, torch.float32)):
            x = self.stem(x)
            x = self.stages(x)
        return self.norm_pre(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ConvNeXtS4ND(ConvNeXtAPI):
    """ConvNeXt with S4ND global convolutions: (B, in_chans, H, W) -> (B, num_classes).

    Runs at any input size whose sides are at least 32 (the total stride).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            img_size: Union[int, Tuple[int, int]] = 224,
            depths: Tuple[int, ...] = (3, 3, 9, 3),
            dims: Tuple[int, ...] = (96, 192, 384, 768),
            stem_type: str = 's4nd',
            stem_chs: int = 32,
            downsample_type: str = 's4nd',
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
            in_chans: input image channels.
            num_classes: classifier outputs (0 for pooled features).
            global_pool: head pooling type ('' for none).
            img_size: training resolution; S4ND kernels are referenced to it (rate 1).
            depths: blocks per stage.
            dims: channels per stage.
            stem_type: 's4nd' (resolution-aware, default) or 'patch' (timm's 4x4 stride-4 conv).
            stem_chs: channels of the S4ND stem filter.
            downsample_type: 's4nd' (resolution-aware, default) or 'conv' (timm's 2x2 stride-2 conv).
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
        if stem_type not in _STEM_TYPES:
            raise ValueError(f'stem_type must be one of {_STEM_TYPES}, got {stem_type!r}')
        if downsample_type not in _DOWNSAMPLE_TYPES:
            raise ValueError(f'downsample_type must be one of {_DOWNSAMPLE_TYPES}, got {downsample_type!r}')
        if len(depths) != len(dims):
            raise ValueError(f'depths and dims need the same length, got {depths} and {dims}')
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.img_size = to_2tuple(img_size)
        s4nd_layer = partial(
            S4ND, ndim=2, d_state=d_state, init=ssm_init, dt_min=dt_min, dt_max=dt_max, bandlimit=bandlimit, **dd)

        if stem_type == 's4nd':
            self.stem = S4NDStem(in_chans, dims[0], stem_chs, self.img_size, s4nd_layer, **dd)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4, **dd),
                LayerNorm2d(dims[0], **dd),
            )

        dp_rates = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        self.feature_info = []
        stages = []
        prev_chs = dims[0]
        stride = 4
        for i, (depth, out_chs) in enumerate(zip(depths, dims)):
            if i > 0:
                stride *= 2
            stages.append(ConvNeXtS4NDStage(
                prev_chs,
                out_chs,
                feat_size=(self.img_size[0] // stride, self.img_size[1] // stride),
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
            self.feature_info += [dict(num_chs=out_chs, reduction=stride, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)
        self.min_input_size = stride
        self.num_features = prev_chs
        self._init_head(num_classes, global_pool, head_hidden_size, drop_rate, head_init_scale, **dd)

    def _s4nd_layers(self) -> Iterator[Tuple[S4ND, int]]:
        """Every S4ND layer with the stride (w.r.t. the input image) of the grid it runs on."""
        if isinstance(self.stem[1], S4ND):
            yield self.stem[1], 1
        for i, stage in enumerate(self.stages):
            reduction = self.feature_info[i]['reduction']
            for m in stage.downsample.modules():
                if isinstance(m, S4ND):
                    yield m, reduction // 2
            for m in stage.blocks.modules():
                if isinstance(m, S4ND):
                    yield m, reduction

    def _s4nd_grids(self, shape: torch.Size) -> List[Tuple[S4ND, Tuple[int, ...]]]:
        return [(layer, (shape[-2] // stride, shape[-1] // stride)) for layer, stride in self._s4nd_layers()]

    @torch.jit.ignore
    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Make `img_size` the resolution at which the S4ND kernels run at rate 1 (the reference grid).

        Not needed for zero-shot evaluation at other sizes (the rate follows the input); use it
        when a new resolution should become the model's native one, e.g. after fine-tuning at it.
        """
        img_size = to_2tuple(img_size)
        if min(img_size) < self.min_input_size:
            raise ValueError(f'img_size must be at least {self.min_input_size} on each side, got {img_size}')
        for layer, stride in self._s4nd_layers():
            layer.set_reference_size((img_size[0] // stride, img_size[1] // stride))
        self.img_size = img_size

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.in_chans, min_side=self.min_input_size)


def _init_weights(module: nn.Module, name: Optional[str] = None, head_init_scale: float = 1.0) -> None:
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Linear) and name and 'head.' in name:
            module.weight.data.mul_(head_init_scale)
            module.bias.data.mul_(head_init_scale)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ConvNeXtS4ND) -> Dict[str, torch.Tensor]:
    """Load our own checkpoints as they are; start from a plain timm ConvNeXt checkpoint otherwise.

    From a timm `convnext_*` state dict every tensor whose name and shape match is kept (MLPs,
    norms, layer scales, head and, with the 'patch'/'conv' stem and downsampling, those too);
    the depthwise convs (and anything else without a match) keep the model's initialization.
    """
    for wrapper in ('model', 'state_dict', 'model_ema'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    if any('.kernels.' in k for k in state_dict):
        return state_dict
    own = model.state_dict()
    out = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    for k, v in own.items():
        out.setdefault(k, v)
    return out


def _create_convnext_s4nd(variant: str, pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    return build_model_with_cfg(
        ConvNeXtS4ND, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc',
        'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'convnext_s4nd_atto.untrained': _cfg(),
    'convnext_s4nd_femto.untrained': _cfg(),
    'convnext_s4nd_pico.untrained': _cfg(),
    'convnext_s4nd_nano.untrained': _cfg(),
    'convnext_s4nd_tiny.untrained': _cfg(),
    'convnext_s4nd_small.untrained': _cfg(),
    'convnext_s4nd_base.untrained': _cfg(),
})


@register_model
def convnext_s4nd_atto(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    model_args = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320))
    return _create_convnext_s4nd('convnext_s4nd_atto', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_s4nd_femto(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    model_args = dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384))
    return _create_convnext_s4nd('convnext_s4nd_femto', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_s4nd_pico(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    model_args = dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512))
    return _create_convnext_s4nd('convnext_s4nd_pico', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_s4nd_nano(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    model_args = dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640))
    return _create_convnext_s4nd('convnext_s4nd_nano', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_s4nd_tiny(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
    return _create_convnext_s4nd('convnext_s4nd_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_s4nd_small(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    model_args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
    return _create_convnext_s4nd('convnext_s4nd_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_s4nd_base(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    model_args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024))
    return _create_convnext_s4nd('convnext_s4nd_base', pretrained=pretrained, **dict(model_args, **kwargs))
