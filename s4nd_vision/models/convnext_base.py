""" The ConvNeXt(-S4ND) skeleton shared by the 2D (images) and 3D (clips) models

A stem (the S4ND stem is each model's own; the 'patch' stem is timm's strided conv) -> stages, each
an optional downsampling followed by ConvNeXt blocks -> timm's norm-MLP head. The stages are the
same on 2 or 3 axes: only the strides (2D: stem (4, 4), downsampling (2, 2); 3D: (2, 4, 4) and
(1, 2, 2), time is not downsampled) and the blocks' mixer differ. Every S4ND layer runs on the
input grid divided by a stride known here, so its reference grid (at the training input size)
and the input sizes for the stacked kernel generation need no per-model code.

Paper:
* `A ConvNet for the 2020s` - https://arxiv.org/abs/2201.03545
"""
import inspect
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, calculate_drop_path_rates, register_notrace_module
from timm.models import FeatureListNet, checkpoint_seq
from timm.models._features import feature_take_indices

from ..layers import (
    S4ND,
    ConvNeXtS4NDBlock,
    LayerNorm3d,
    channel_major,
    channels_first,
    check_kernel_args,
    linear_glu,
    stacked_kernels,
)
from ..layers.dispatch import channel_major_input, stem_input, stem_keeps_channel_major
from ..layers.ops import autocast_enabled
from ..layers.pointwise import layer_norm_channels, linear_glu_channels, record_submodules, submodules_as_built
from ..layers.s4nd import refuse_fx_proxy
from ._base import HandsOutFeatures, S4NDModel, SSMNoWeightDecay, handed_out, s4nd_grids
from ._checks import check_img_size, check_input, check_model_sizes, check_rates

__all__ = [
    'ConvNeXtBase', 'ConvNeXtFeatures', 'ConvNeXtStage', 'S4NDStem', 'S4NDDownsample', 'STEM_TYPES', 'DOWNSAMPLE_TYPES',
    'PAPER_SSM', 'every_stage',
]

STEM_TYPES = ('s4nd', 'patch')
DOWNSAMPLE_TYPES = ('s4nd', 'conv')
# The S4ND settings of the published ImageNet ConvNeXt-S4ND (S4D-Lin, dt in [0.1, 1], no band-limit); the
# `*_paper` models use them. The defaults (S4D-Inv, dt in [0.1, 1], band-limit 1.0) are the zero-shot
# study's choice: they keep far more accuracy at resolutions not trained at (README, "Zero-shot resolution").
PAPER_SSM = dict(ssm_init='lin', dt_min=0.1, dt_max=1.0, bandlimit=0)
_DEFAULT_INIT = {'s4d': 'inv', 's4': 'legs'}  # (S4's DPLR form is HiPPO-LegS's; SGConv takes no init)
_DEFAULT_BANDLIMIT = {'s4d': 1.0}  # (S4's default is the original code's: off; SGConv has none)
_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: LayerNorm2d, 3: LayerNorm3d}


def _pointwise_glu(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """(B, C, *spatial) -> (B, *spatial, C_out): the 1x1 `conv` (C -> 2 C_out) and a GLU over its channels,
    computed as one GEMM on channels-last rows; `x` may be any permuted view (the GEMM reads it once).
    A 1x1 conv on the permuted view the S4ND layers return on the CPU costs several times more. Off the CPU
    the (2 C_out)-channel projection is recomputed in the backward pass instead of saved (`linear_glu`)."""
    return linear_glu(x.movedim(1, -1), conv.weight.flatten(1), conv.bias)


@register_notrace_module  # a leaf of timm's FX feature graphs (its layout depends on the input's strides)
class S4NDStem(nn.Sequential):
    """(B, in_chs, *spatial) -> (B, out_chs, *spatial / pool): pointwise in_chs -> stem_chs, S4ND at full
    resolution with average pooling by `pool` (fused), pointwise projection with GLU, norm; 2 or 3 axes.

    The full-resolution part, the largest tensors of the network, stays in S4ND's channel-major layout,
    and the first projection is fused into the S4ND layer (recomputed in the backward pass, a few samples
    at a time): no 1x1 conv or permuted copy at full resolution, and only the narrow input is saved.
    The result is in channels-last memory, the blocks' layout; on the CPU (`dispatch.stem_keeps_channel_major`: a
    training step, and inference unless the blocks take the 'depthwise' path) it stays in S4ND's channel-major
    layout instead, which the downsampling layers and blocks keep up to the head (`layers.pointwise`: no
    transposing copies around the S4ND layers).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stem_chs: int,
            grid: Tuple[int, ...],
            pool: Tuple[int, ...],
            s4nd_layer: Callable,
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        conv, norm = _CONV[len(grid)], _NORM[len(grid)]
        super().__init__(
            conv(in_chs, stem_chs, kernel_size=1, **dd),
            s4nd_layer(stem_chs, l_ref=grid, pool=pool),
            conv(stem_chs, 2 * out_chs, kernel_size=1, **dd),
            nn.GLU(dim=1),
            norm(out_chs, **dd),
        )
        record_submodules(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_fx_proxy(x, type(self).__name__)
        if not submodules_as_built(self):  # (hooked or replaced submodules: called one after the other)
            return super().forward(x)
        # (the nn.GLU, dim=1, describes the layer and keeps timm's module indices; here the channels are the
        # last axis, where `_pointwise_glu` and the norm act)
        proj, s4nd, conv, _, norm = self
        y = s4nd.forward_channel_major(stem_input(x), proj=(proj.weight.flatten(1), proj.bias))
        if not autocast_enabled(x.device.type):  # (under autocast the projection picks its dtype)
            y = y.to(x.dtype)
        if stem_keeps_channel_major(channels_first(y)):  # (the layers up to the head keep this layout)
            return channels_first(layer_norm_channels(linear_glu_channels(y, conv.weight.flatten(1), conv.bias), norm))
        y = _pointwise_glu(channels_first(y), conv)
        return F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps).movedim(-1, 1)


@register_notrace_module  # (as S4NDStem)
class S4NDDownsample(nn.Sequential):
    """(B, in_chs, *spatial) -> (B, out_chs, *spatial / pool): norm, S4ND with average pooling by `pool`
    (fused: a resolution-aware downsampling), pointwise projection with GLU; the result in channels-last
    memory, or on the CPU in S4ND's channel-major layout if x is (see `S4NDStem`)."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            grid: Tuple[int, ...],
            pool: Tuple[int, ...],
            s4nd_layer: Callable,
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__(
            _NORM[len(grid)](in_chs, **dd),
            s4nd_layer(in_chs, l_ref=grid, pool=pool),
            _CONV[len(grid)](in_chs, 2 * out_chs, kernel_size=1, **dd),
            nn.GLU(dim=1),
        )
        record_submodules(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_fx_proxy(x, type(self).__name__)
        if not submodules_as_built(self):  # (as in `S4NDStem`)
            return super().forward(x)
        norm, s4nd, conv, _ = self  # (the GLU, as in `S4NDStem`: applied by `_pointwise_glu`, channels last)
        u = channel_major_input(x)
        if u is not None:  # (S4ND's working layout, kept: see `S4NDStem`)
            y = s4nd(channels_first(layer_norm_channels(u, norm)))  # (its result: a view of that layout, no copy)
            return channels_first(linear_glu_channels(channel_major(y), conv.weight.flatten(1), conv.bias))
        return _pointwise_glu(s4nd(norm(x)), conv).movedim(-1, 1)


class ConvNeXtStage(nn.Module):
    """Optional downsampling followed by `depth` blocks: (B, in_chs, *spatial) -> (B, out_chs, *spatial / down)."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            feat_size: Tuple[int, ...],
            down: Tuple[int, ...],
            s4nd_layer: Callable,
            mixer_layer: Optional[Callable[[int], nn.Module]] = None,
            downsample_type: Optional[str] = 's4nd',
            dilated: bool = False,
            in_dilation: Optional[Tuple[int, ...]] = None,
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
            feat_size: the stage's (output) grid at the training input size, per spatial axis.
            down: the downsampling factor per spatial axis.
            s4nd_layer: builds an S4ND layer (channels, l_ref=, pool=).
            mixer_layer: builds a block's mixer for a channel count; None: S4ND referenced to `feat_size`.
            downsample_type: 's4nd' (norm, S4ND with average pooling by `down` (fused), pointwise GLU
                projection), 'conv' (norm, conv of kernel and stride `down`) or None (no downsampling).
            dilated: keep the input's resolution (timm's `output_stride`): no pooling, a conv of stride 1
                ('same' padding, timm's choice), and the blocks' S4ND kernels sampled `down` times as densely
                (their reference grid stays `feat_size`: the kernels cover the same part of the image, as
                dilated convs do).
            in_dilation: how many times as densely as without `output_stride` the input is sampled, per axis
                (None: not at all); a dilated 'conv' downsampling dilates its taps by as much (timm's
                `first_dilation`), so that they combine the pixels they were trained to.
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        conv, norm = _CONV[len(feat_size)], _NORM[len(feat_size)]
        self.grad_checkpointing = False
        if downsample_type == 's4nd':
            in_size = tuple(s * d for s, d in zip(feat_size, down))
            pool = (1,) * len(down) if dilated else down
            self.downsample = S4NDDownsample(in_chs, out_chs, in_size, pool, s4nd_layer, **dd)
        elif downsample_type == 'conv':
            self.downsample = nn.Sequential(
                norm(in_chs, **dd),
                conv(in_chs, out_chs, kernel_size=down, **(
                    dict(stride=1, padding='same', dilation=in_dilation or 1) if dilated else dict(stride=down)),
                     **dd),
            )
        else:
            self.downsample = nn.Identity()
        if mixer_layer is None:
            mixer_layer = partial(s4nd_layer, l_ref=feat_size)
        drop_path_rates = drop_path_rates or [0.] * depth
        self.blocks = nn.Sequential(*[
            ConvNeXtS4NDBlock(
                out_chs, mixer_layer, mlp_ratio=mlp_ratio, ls_init_value=ls_init_value,
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


class ConvNeXtBase(S4NDModel):
    """ConvNeXt(-S4ND) on `len(stem_stride)` spatial axes: (B, in_chans, *spatial) -> (B, num_classes).

    Subclasses set `stem_stride` and `down` and build the S4ND stem (`_s4nd_stem`); a model with more
    than the two image axes states its training grid (`_grid`) and its S4ND layers' directions.
    """
    stem_stride: Tuple[int, ...]  # the stem's stride per spatial axis
    down: Tuple[int, ...]  # the downsampling factor per spatial axis between stages

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
            output_stride: int = 32,
            kernel: str = 's4d',
            d_state: int = 64,
            ssm_init: Optional[str] = None,
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
            global_pool: head pooling type ('' for none).
            img_size: training resolution (of the frames); S4ND kernels are referenced to it (rate 1).
            depths: blocks per stage.
            dims: channels per stage.
            stem_type: 's4nd' (resolution-aware, default) or 'patch' (timm's patch conv: kernel and
                stride `stem_stride`).
            stem_chs: channels of the S4ND stem filter.
            downsample_type: 's4nd' (resolution-aware, default) or 'conv' (timm's conv: kernel and
                stride `down`).
            output_stride: 32, 16 or 8 (timm's, for dense prediction): the last stages keep the resolution of
                the stage before them (see `ConvNeXtStage`'s `dilated`); the weights are the same.
            kernel: per-axis kernel of every S4ND layer: 's4d' (diagonal SSM), 's4' (DPLR SSM) or 'sgconv'
                (`S4ND`'s `kernel`).
            d_state: SSM state size per axis ('s4d', 's4').
            ssm_init: initialization of A: 'lin', 'inv' or 'legs' for 's4d', 'legs' for 's4' (None: 'inv' for
                's4d', 'legs' for 's4'; 'sgconv' takes none).
            dt_min, dt_max: step size initialization range ('s4d', 's4').
            bandlimit: S4ND band-limiting cut-off ('s4d', 's4'); 0 turns it off (None: the kernel's default,
                1.0 for 's4d', off for the others; `timm.create_model` drops arguments that are None).
                The defaults of ssm_init, dt_min, dt_max and bandlimit are the zero-shot study's; `PAPER_SSM`
                holds the published ImageNet ones.
            mlp_ratio: MLP expansion ratio.
            ls_init_value: layer scale init (None disables).
            head_init_scale: classifier weight and bias init scale (a Linear head; the 1x1-conv head of
                global_pool='' keeps its init, as in timm's ConvNeXt).
            head_hidden_size: pre-logits MLP size in the head (None = no MLP).
            act_layer: MLP activation.
            drop_rate: head dropout.
            drop_path_rate: stochastic depth rate.
        """
        super().__init__()
        if stem_type not in STEM_TYPES:
            raise ValueError(f'stem_type must be one of {STEM_TYPES}, got {stem_type!r}')
        if downsample_type not in DOWNSAMPLE_TYPES:
            raise ValueError(f'downsample_type must be one of {DOWNSAMPLE_TYPES}, got {downsample_type!r}')
        check_model_sizes(in_chans, num_classes, depths=depths)
        check_rates(drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        if len(depths) != len(dims):
            raise ValueError(f'depths and dims need the same length, got {depths} and {dims}')
        if output_stride not in (8, 16, 32):
            raise ValueError(f'output_stride must be 8, 16 or 32, got {output_stride!r}')
        check_kernel_args(kernel, ssm_init, d_state, dt_min, dt_max, name='ssm_init', bandlimit=bandlimit)
        if bandlimit is None:
            bandlimit = _DEFAULT_BANDLIMIT.get(kernel)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.img_size = check_img_size(img_size)
        # img_size: at least the total stride without dilation, which the reference grids follow
        self.min_img_size = self.stem_stride[-1] * self.down[-1] ** (len(depths) - 1)
        self._check_input_size(self.img_size)
        grid = self._grid(self.img_size)
        s4nd_layer = partial(
            S4ND, ndim=len(grid), kernel=kernel, d_state=d_state,
            init=_DEFAULT_INIT.get(kernel) if ssm_init is None else ssm_init, dt_min=dt_min, dt_max=dt_max,
            bandlimit=bandlimit,
            bidirectional=self._s4nd_bidirectional(), **dd)
        if stem_type == 's4nd':
            self.stem = self._s4nd_stem(dims[0], stem_chs, s4nd_layer, **dd)
        else:
            self.stem = self._patch_stem(dims[0], **dd)

        dp_rates = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        mixer_layer = self._mixer_layer(**dd)
        if mixer_layer is not None and output_stride < 32:
            raise ValueError(f'output_stride={output_stride} needs S4ND blocks (mixer_type=\'s4nd\'): dilated '
                             f'depthwise convs are not implemented')
        self.feature_info = []
        self._stage_strides = []  # stride per spatial axis of each stage's grid (as run)
        stages = []
        prev_chs = dims[0]
        stride = nominal = self.stem_stride  # (nominal: without dilation, what the reference grids follow)
        for i, (depth, out_chs) in enumerate(zip(depths, dims)):
            dilated = i > 0 and stride[-1] * self.down[-1] > output_stride
            in_dilation = tuple(n // s for n, s in zip(nominal, stride))  # (of this stage's input)
            if i > 0:
                nominal = tuple(s * d for s, d in zip(nominal, self.down))
                stride = stride if dilated else tuple(s * d for s, d in zip(stride, self.down))
            stages.append(ConvNeXtStage(
                prev_chs,
                out_chs,
                feat_size=tuple(g // s for g, s in zip(grid, nominal)),
                down=self.down,
                s4nd_layer=s4nd_layer,
                mixer_layer=mixer_layer,
                downsample_type=downsample_type if i > 0 else None,
                dilated=dilated,
                in_dilation=in_dilation,
                depth=depth,
                drop_path_rates=dp_rates[i],
                mlp_ratio=mlp_ratio,
                ls_init_value=ls_init_value,
                act_layer=act_layer,
                **dd,
            ))
            prev_chs = out_chs
            self._stage_strides.append(stride)
            # reduction is spatial (timm's convention): the last axis' stride
            self.feature_info += [dict(num_chs=out_chs, reduction=stride[-1], module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)
        self.min_input_size = self._min_side()  # inputs: at least the total stride as run (less with output_stride)
        self.num_features = prev_chs
        self.norm_pre = nn.Identity()
        self._init_norm_mlp_head(num_classes, global_pool, head_hidden_size, drop_rate, head_init_scale, **dd)

    def _check_input_size(self, img_size: Tuple[int, int]) -> None:
        if min(img_size) < self.min_img_size:
            raise ValueError(f'img_size must be at least {self.min_img_size} on each side (the total stride without '
                             f'output_stride\'s dilation, which the reference grids follow), got {img_size}')

    def _grid(self, img_size: Tuple[int, int]) -> Tuple[int, ...]:
        """The training input size per spatial axis: the reference of every S4ND layer."""
        return img_size

    def _s4nd_bidirectional(self) -> Union[bool, Tuple[bool, ...]]:
        """The S4ND layers' `bidirectional`: two-sided kernels on every axis."""
        return True

    def _mixer_layer(self, device=None, dtype=None) -> Optional[Callable[[int], nn.Module]]:
        """The blocks' mixer for a channel count; None: S4ND referenced to the stage's grid."""
        return None

    def _s4nd_stem(self, out_chs: int, stem_chs: int, s4nd_layer: Callable, **dd) -> nn.Module:
        """The 's4nd' stem (`S4NDStem`): (B, in_chans, *spatial) -> (B, out_chs, *spatial / stem_stride)."""
        return S4NDStem(self.in_chans, out_chs, stem_chs, self._grid(self.img_size), self.stem_stride, s4nd_layer,
                        **dd)

    def _patch_stem(self, out_chs: int, **dd) -> nn.Module:
        """The 'patch' stem, timm's: a conv of kernel and stride `stem_stride`, then norm."""
        conv, norm = _CONV[len(self.stem_stride)], _NORM[len(self.stem_stride)]
        return nn.Sequential(
            conv(self.in_chans, out_chs, kernel_size=self.stem_stride, stride=self.stem_stride, **dd),
            norm(out_chs, **dd),
        )

    def _s4nd_layers(self) -> Iterator[Tuple[S4ND, Tuple[int, ...]]]:
        """Every S4ND layer with the stride per input axis of the grid it runs on: the stem's at the
        input grid, a downsampling's at the previous stage's, the blocks' at their stage's."""
        prev = (1,) * len(self._stage_strides[0])
        for m in self.stem.modules():
            if isinstance(m, S4ND):
                yield m, prev
        for stage, stride in zip(self.stages, self._stage_strides):
            for m in stage.downsample.modules():
                if isinstance(m, S4ND):
                    yield m, prev
            for m in stage.blocks.modules():
                if isinstance(m, S4ND):
                    yield m, stride
            prev = stride

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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, *spatial) -> (B, num_features, *spatial reduced): H and W by output_stride (clips: T by 2),
        in a layout whose spatial axes merge (`handed_out`).

        In a training step every S4ND layer's kernels are generated up front in one stacked call
        (`stacked_kernels`, instead of one per layer)."""
        x = self._check_input(x)
        # (under gradient checkpointing a recomputed block must redo its own generation)
        checkpointed = any(s.grad_checkpointing for s in self.stages)
        with stacked_kernels(self, x, lambda: [] if checkpointed else self._s4nd_grids(x.shape)):
            x = self.stem(x)
            x = self.stages(x)
        return handed_out(self.norm_pre(x))


def every_stage(kwargs: Dict[str, Any]) -> Tuple[int, ...]:
    """`features_only`'s default `out_indices` for a model built from `kwargs`: every stage, as timm's ConvNeXt
    (its four), also for `depths` of another length (a fixed (0, 1, 2, 3) failed on three stages and dropped a
    fifth). Depths that are not a sequence are left to the model's own error."""
    depths = kwargs.get('depths', inspect.signature(ConvNeXtBase).parameters['depths'].default)
    return tuple(range(len(depths))) if hasattr(depths, '__len__') else (0, 1, 2, 3)


class ConvNeXtFeatures(HandsOutFeatures, SSMNoWeightDecay, FeatureListNet):
    """The `features_only=True` backbone of a ConvNeXt(-S4ND): timm's list wrapper (the model's modules one by one,
    its state-dict keys, `set_grad_checkpointing`), which also checks its input as the model does and, in a training
    step, makes the kernels of all its S4ND layers in one stacked call, as the model's forward does.
    (B, in_chans, *spatial) -> the outputs of the stages in `out_indices`, each (B, C_i, *spatial_i) (`handed_out`).
    `feature_cls='list'` gives timm's plain wrapper, whose layers generate their kernels one by one (both keep the
    SSM parameters' `no_weight_decay`)."""

    def __init__(self, model: ConvNeXtBase, out_indices: Tuple[int, ...] = (0, 1, 2, 3), **kwargs):
        super().__init__(model, out_indices=out_indices, **kwargs)
        held = set(self.modules())  # (timm keeps the modules up to the last stage asked for)
        # a plain list (not registered): the layers stay in the state dict once, under their stage
        self._s4nd_strides = [(layer, stride) for layer, stride in model._s4nd_layers() if layer in held]
        # (a backbone cut after an earlier stage runs at sides down to that stage's reduction)
        _, last = feature_take_indices(len(model.feature_info), out_indices)
        checks = dict(model._input_checks(), min_side=model._min_side(last))
        self._check_input = partial(check_input, **checks)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self._check_input(x)
        # (under gradient checkpointing a recomputed module must redo its own generation)
        checkpointed = self.grad_checkpointing or any(getattr(m, 'grad_checkpointing', False) for m in self.values())
        with stacked_kernels(self, x, lambda: [] if checkpointed else s4nd_grids(self._s4nd_strides, x.shape)):
            return super().forward(x)
