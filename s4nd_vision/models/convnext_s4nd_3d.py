""" ConvNeXt-S4ND 3D (video), and the inflated 3D ConvNeXt baseline

ConvNeXt for clips (B, C, T, H, W): the 2D ConvNeXt-S4ND with a time axis. Every block's S4ND
has three SSM kernels, time (`kernels.0`), H (`kernels.1`) and W (`kernels.2`); the time kernel
is two-sided by default (`time_bidirectional=False` makes it causal). With `mixer_type='conv'`
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
duration sees the same continuous time kernel, on a causal time axis (`time_bidirectional=False`) and a
two-sided one alike (`S4ND`); the inflated smooth kernel's taps are symmetric only at `num_frames`
(`s4nd_vision.models.inflate`). `set_input_size(img_size, num_frames)` makes another
clip size the native one, keeping the model's function.
"""
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..layers.ssm_kernel import is_int
from ._base import LIBRARY_CFG, MIXER_TYPES, feature_cfg, paper_cfg, update_model_args
from ._checkpoint import (
    adapt_input_channels,
    check_pretrained_file,
    check_weights_fit,
    filter_args,
    split_input_size,
    stated_img_size,
    unwrap_state_dict,
    warn_dropped_fitting_classifier,
)
from ._checks import check_img_size
from .convnext_base import ConvNeXtBase, ConvNeXtFeatures, every_stage
from .inflate import default_time_init, inflate_state_dict, is_2d_state_dict

__all__ = ['ConvNeXt3d']

_TUBELET = (2, 4, 4)  # stem stride (T, H, W)
_DW_KERNEL_SIZE = (3, 7, 7)  # depthwise conv of the baseline
_NUM_FRAMES = 16
_IMG_SIZE = 224


def _dw_conv3d(dim: int, device=None, dtype=None) -> nn.Conv3d:
    """Depthwise (3, 7, 7) conv with 'same' padding: ConvNeXt's 7x7 depthwise conv inflated along time."""
    return nn.Conv3d(
        dim, dim, kernel_size=_DW_KERNEL_SIZE, padding=tuple(k // 2 for k in _DW_KERNEL_SIZE), groups=dim,
        device=device, dtype=dtype)


def _check_num_frames(num_frames: int) -> int:
    """`num_frames` as a Python int (a NumPy one, kept, would make the recorded model args unserializable), after
    raising ValueError unless it is an integer of at least the stem's stride in time."""
    if not is_int(num_frames) or num_frames < _TUBELET[0]:
        raise ValueError(f'num_frames must be an integer of at least {_TUBELET[0]} (the stem stride in time), got '
                         f'{num_frames!r}')
    return int(num_frames)


class ConvNeXt3d(ConvNeXtBase):
    """3D ConvNeXt(-S4ND) for clips: (B, in_chans, T, H, W) -> (B, num_classes).

    Runs at any clip with at least 2 frames and sides of at least 32 (the total stride).
    """
    stem_stride = _TUBELET
    down = (1, 2, 2)  # spatial only: time stays at T / 2
    intermediates_fmt = 'NCTHW'  # features and intermediates are clips

    def __init__(
            self,
            num_frames: int = _NUM_FRAMES,
            mixer_type: str = 's4nd',
            time_bidirectional: bool = True,
            **kwargs,
    ):
        """
        Args:
            num_frames: training clip length in frames; the time kernels are referenced to it.
            mixer_type: the blocks' mixer, 's4nd' (3D S4ND) or 'conv' (depthwise (3, 7, 7) conv).
            time_bidirectional: two-sided time kernels (False: causal in time).
            **kwargs: `ConvNeXtBase`'s arguments (img_size: the frame size; stem_type 'patch': a (2, 4, 4)
                tubelet conv; downsample_type 'conv': a (1, 2, 2) strided conv; global_pool: over (T, H, W)).
        """
        if mixer_type not in MIXER_TYPES:
            raise ValueError(f'mixer_type must be one of {MIXER_TYPES}, got {mixer_type!r}')
        if not isinstance(time_bidirectional, bool):  # (bool('no') is True)
            raise ValueError(f'time_bidirectional must be a bool (False: causal in time), got {time_bidirectional!r}')
        if not time_bidirectional and mixer_type == 'conv':
            raise ValueError("time_bidirectional=False needs S4ND blocks (mixer_type='s4nd'): the blocks' depthwise "
                             "(3, 7, 7) convs see both directions in time")
        # (plain attributes, set before nn.Module.__init__: the base's construction reads them)
        self.num_frames = _check_num_frames(num_frames)
        self.mixer_type = mixer_type
        self.time_bidirectional = time_bidirectional
        super().__init__(**kwargs)
        self._traits = dict(first_conv=None)  # timm's loader adapts Conv2d stems only: `checkpoint_filter_fn` does

    def _grid(self, img_size: Tuple[int, int]) -> Tuple[int, int, int]:
        return (self.num_frames, *img_size)

    def _s4nd_bidirectional(self) -> Tuple[bool, bool, bool]:
        return self.time_bidirectional, True, True

    def _mixer_layer(self, device=None, dtype=None) -> Optional[Callable[[int], nn.Module]]:
        return partial(_dw_conv3d, device=device, dtype=dtype) if self.mixer_type == 'conv' else None

    def input_size(self) -> Tuple[int, ...]:
        return (self.in_chans, self.num_frames, *self.img_size)

    def _state_input_size(self, cfg: Dict[str, Any]) -> None:
        """timm's registry holds (C, H, W) input sizes only: the instance's cfg states the clip it takes."""
        super()._state_input_size(cfg)
        cfg['pool_size'] = (self.num_frames // _TUBELET[0], *cfg['pool_size'])

    def record_input_size(self) -> None:
        super().record_input_size()
        update_model_args(self, num_frames=self.num_frames)

    @torch.jit.ignore
    def set_input_size(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            num_frames: Optional[int] = None,
    ) -> None:
        """Make `num_frames` x `img_size` the model's native clip size (None keeps one), keeping its function:
        the S4ND layers keep their reference grids (see `S4NDModel.set_input_size`), `pretrained_cfg['input_size']`
        becomes (C, T, H, W)."""
        img_size = self.img_size if img_size is None else check_img_size(img_size)
        num_frames = self.num_frames if num_frames is None else num_frames
        self._check_input_size(img_size)
        num_frames = _check_num_frames(num_frames)
        self.img_size = img_size
        self.num_frames = num_frames
        self.record_input_size()

    def _input_checks(self) -> Dict[str, Any]:
        return dict(in_chans=self.in_chans, layout='(B, C, T, H, W)', min_side=self.min_input_size,
                    min_frames=_TUBELET[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, num_classes), or (B, C', T, H, W) when the head does not pool.

        timm's 2D head runs on (B, C, T * H, W): pooling over T * H x W is pooling over the clip."""
        frames = x.shape[2]
        x = self.head(x.flatten(2, 3), pre_logits=pre_logits)  # (B, C, T, H, W) -> (B, C, T * H, W)
        return x.unflatten(2, (frames, -1)) if self.head.global_pool.is_identity() else x  # (unpooled: 4-D)


_FIRST_CONV = 'stem.0'  # the patch stem's conv, or the S4ND stem's pointwise projection


def _check_time_direction(state_dict: Dict[str, torch.Tensor], model: ConvNeXt3d) -> None:
    """Raise ValueError for 3D weights whose time kernels run in the other direction(s) than the model's
    (`time_bidirectional`): they hold half or twice its rows of C (SGConv: of sub-kernels), a set per direction,
    which loading reported only as size mismatches of `kernels.0` tensors."""
    other = 0.5 if model.time_bidirectional else 2  # the other direction(s)' rows per the model's
    own_state = model.state_dict()
    for name, own in own_state.items():
        theirs = state_dict.get(name)
        # the same layer's H kernel, two-sided in both, has as many rows only where width and rank agree (weights of
        # another width or rank, whose time kernels hold half or twice the rows too, were said to be of the other
        # direction); its other axes may differ (an SGConv layout of another grid, which loads)
        h_name = name.replace('.kernels.0.', '.kernels.1.')
        h_theirs, h_own = state_dict.get(h_name), own_state.get(h_name)
        h_rows_fit = h_theirs is not None and h_own is not None and h_theirs.shape[:1] == h_own.shape[:1]
        if (name.endswith(('.kernels.0.c', '.kernels.0.weight')) and theirs is not None and h_rows_fit
                and theirs.shape[1:] == own.shape[1:] and theirs.shape[0] == other * own.shape[0]):
            raise ValueError(
                f'the weights have {"causal" if model.time_bidirectional else "two-sided"} time kernels ({name}: '
                f'{theirs.shape[0]} rows, the model {own.shape[0]}): build the model with '
                f'time_bidirectional={not model.time_bidirectional}')


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor], model: ConvNeXt3d, strict: bool = True, warn_classifier: bool = True,
) -> Dict[str, torch.Tensor]:
    """Load 3D checkpoints as they are, inflate 2D ones on the fly (`inflate_state_dict` defaults, but the time
    kernels' init: 'smooth', or 'random' for SGConv models, `default_time_init`; the transfer report says which).

    A 2D classifier is kept when it fits the model (the same number of classes) and dropped
    otherwise (e.g. ImageNet weights for a 51-class video model). A checkpoint without a
    classifier keeps the model's own initialization of `head.fc`. The first conv is adapted to the
    model's `in_chans` as timm adapts 2D models' (`adapt_input_channels`). Weights that do not fit the model
    (`check_weights_fit`) are refused.
    """
    state_dict = adapt_input_channels(unwrap_state_dict(state_dict), _FIRST_CONV, model.in_chans)
    if is_2d_state_dict(state_dict):
        fc, head_2d = model.get_classifier(), state_dict.get('head.fc.weight')
        keep_head = isinstance(fc, nn.Linear) and head_2d is not None and head_2d.shape == fc.weight.shape
        state_dict = inflate_state_dict(state_dict, model, time_init=default_time_init(model), keep_head=keep_head)
    else:
        _check_time_direction(state_dict, model)
    if warn_classifier:  # (`filter_args`)
        warn_dropped_fitting_classifier(state_dict, model)  # (before the model's own head fills a missing one in)
    for k, v in model.get_classifier().state_dict(prefix='head.fc.').items():
        state_dict.setdefault(k, v)
    return check_weights_fit(state_dict, model, strict=strict, check_classifier=False)


def _create_convnext_3d(variant: str, pretrained: bool = False, **kwargs) -> ConvNeXt3d:
    check_pretrained_file(pretrained, kwargs)
    stated = split_input_size(kwargs, axes=3)  # a config.json's (C, T, H, W)
    if stated:
        kwargs.setdefault('num_frames', stated[1])
    stated_img_size(kwargs)
    return build_model_with_cfg(
        ConvNeXt3d, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, **filter_args(kwargs)),
        feature_cfg=feature_cfg(
            kwargs, out_indices=every_stage(kwargs), flatten_sequential=True, feature_cls=ConvNeXtFeatures),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, _IMG_SIZE, _IMG_SIZE), 'pool_size': (_NUM_FRAMES // 2, 7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': _FIRST_CONV, 'classifier': 'head.fc',
        'license': 'apache-2.0', **paper_cfg(), **LIBRARY_CFG, **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'convnext_s4nd_3d_atto.untrained': _cfg(),
    'convnext_s4nd_3d_tiny.untrained': _cfg(),
    'convnext_3d_atto.untrained': _cfg(),
    'convnext_3d_tiny.untrained': _cfg(),
})

_BASELINE = dict(mixer_type='conv', stem_type='patch', downsample_type='conv')


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
