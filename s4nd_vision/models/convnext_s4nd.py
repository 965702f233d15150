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
stride, saved with the weights) and derives its step-size rate from each input's size, so
evaluating at a new resolution needs nothing. `set_input_size(img_size)` makes another resolution
the native one (the data config's), keeping the model's function, as in timm.
"""
from functools import partial
from types import SimpleNamespace
from typing import Any, Dict

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import checkpoint_filter_fn as timm_convnext_filter

from ._base import LIBRARY_CFG, SGCONV_ID, feature_cfg, paper_cfg
from ._checkpoint import check_pretrained_file, filter_args, stated_img_size, transfer_timm_weights, unwrap_state_dict
from .convnext_base import PAPER_SSM, ConvNeXtBase, ConvNeXtFeatures, every_stage

__all__ = ['ConvNeXtS4ND']


class ConvNeXtS4ND(ConvNeXtBase):
    """ConvNeXt with S4ND global convolutions: (B, in_chans, H, W) -> (B, num_classes).

    Runs at any input size whose sides are at least 32 (the total stride). Arguments: `ConvNeXtBase`'s.
    """
    stem_stride = (4, 4)
    down = (2, 2)


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor], model: ConvNeXtS4ND, strict: bool = True, warn_classifier: bool = True,
) -> Dict[str, torch.Tensor]:
    """Load our own checkpoints as they are; start from a plain timm ConvNeXt checkpoint otherwise.

    A training checkpoint dict is unwrapped first (`unwrap_state_dict`). From a timm `convnext_*` state
    dict every module whose tensors fit is taken (`match_state_dict`): norms, layer scales, the MLPs
    (the 1x1 conv MLPs of atto to nano reshaped to our Linear layers), head and, with the 'patch' /
    'conv' stem and downsampling, those too (the patch stem's conv adapted to the model's `in_chans` first, by
    timm's rule, as timm's loader does for its own models). The S4ND layers (and anything else without a
    counterpart) keep the model's initialization; a one-line report of what was loaded, reshaped and kept is
    logged. Weights of which nothing outside the head fits (another architecture or width) are refused: the
    model would otherwise be its initialization under the name of a pretrained one.
    The original ConvNeXt checkpoints (facebookresearch/ConvNeXt: `downsample_layers.*`, `stages.i.j.dwconv`,
    `pwconv1`, ...) and open_clip's ConvNeXt trunks (`visual.trunk.*`) are first renamed to timm's layout by timm's
    own ConvNeXt filter, as `timm.create_model('convnext_tiny', pretrained=True)` loads them.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith(('downsample_layers.', 'visual.trunk.')) for k in state_dict):
        state_dict = _renamed_by_timm(state_dict)
    return transfer_timm_weights(
        state_dict, model, 'stem.0', source='timm ConvNeXt weights', strict=strict, warn_classifier=warn_classifier)


def _renamed_by_timm(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """An original ConvNeXt (or open_clip trunk) state dict renamed to timm's layout by timm's own ConvNeXt filter,
    every tensor in its own shape. The filter also reshapes each 2-D tensor to the model's tensor of its name, which
    failed for a checkpoint of another width (a reshape error, not the refusal `transfer_timm_weights` gives by
    name) or depth (a KeyError): it is handed a model of no shapes (each 2-D tensor flattened, a view of it), and the
    flattened tensors are put back as they were; the transfer maps Linear <-> 1x1 conv itself."""
    state_dict = {k: v.contiguous() if isinstance(v, torch.Tensor) and v.ndim == 2 else v
                  for k, v in state_dict.items()}  # (so that flattening is a view, found by its data pointer)
    own = {v.data_ptr(): v for v in state_dict.values() if isinstance(v, torch.Tensor) and v.ndim == 2 and v.numel()}
    renamed = timm_convnext_filter(state_dict, _NoShapes())
    return {k: own[v.data_ptr()] if isinstance(v, torch.Tensor) and v.ndim == 1 and v.numel() and 'grn' not in k
            and v.data_ptr() in own and own[v.data_ptr()].numel() == v.numel() else v  # (GRN's: timm's own reshape)
            for k, v in renamed.items()}


class _NoShapes:
    """The model timm's ConvNeXt filter reads shapes from: every name's shape is (-1,) (flattened)."""

    @staticmethod
    def state_dict() -> Dict[str, Any]:
        class Shapes(dict):
            def __missing__(self, key):
                return SimpleNamespace(shape=(-1,))

        return Shapes()


def _create_convnext_s4nd(variant: str, pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    check_pretrained_file(pretrained, kwargs)
    stated_img_size(kwargs)
    return build_model_with_cfg(
        ConvNeXtS4ND, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, **filter_args(kwargs)),
        feature_cfg=feature_cfg(
            kwargs, out_indices=every_stage(kwargs), flatten_sequential=True, feature_cls=ConvNeXtFeatures),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc',
        'license': 'apache-2.0', **paper_cfg(), **LIBRARY_CFG, **kwargs,
    }


def _paper_ssm(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """`PAPER_SSM` as it applies to the kernel in `kwargs`: its init, S4D-Lin, is an S4D init, so another kernel
    keeps its own (S4's HiPPO-LegS, none for SGConv) and takes the step sizes and band-limit."""
    return {k: v for k, v in PAPER_SSM.items() if k != 'ssm_init' or kwargs.get('kernel', 's4d') == 's4d'}



default_cfgs = generate_default_cfgs({
    'convnext_s4nd_atto.untrained': _cfg(),
    'convnext_s4nd_femto.untrained': _cfg(),
    'convnext_s4nd_pico.untrained': _cfg(),
    'convnext_s4nd_nano.untrained': _cfg(),
    'convnext_s4nd_tiny.untrained': _cfg(),
    'convnext_s4nd_small.untrained': _cfg(),
    'convnext_s4nd_base.untrained': _cfg(),
    'convnext_s4nd_tiny_paper.untrained': _cfg(),
    'convnext_s4nd_small_paper.untrained': _cfg(),
    'convnext_s4nd_base_paper.untrained': _cfg(),
    'convnext_sgconv_atto.untrained': _cfg(**paper_cfg(SGCONV_ID)),
    'convnext_sgconv_tiny.untrained': _cfg(**paper_cfg(SGCONV_ID)),
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


@register_model
def convnext_s4nd_tiny_paper(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    """ConvNeXt-S4ND-T with the published ImageNet S4ND settings (`PAPER_SSM`: S4D-Lin, dt in [0.1, 1], no
    band-limit) instead of the zero-shot defaults."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **_paper_ssm(kwargs))
    return _create_convnext_s4nd('convnext_s4nd_tiny_paper', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_s4nd_small_paper(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    """ConvNeXt-S4ND-S with the published ImageNet S4ND settings (`PAPER_SSM`)."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), **_paper_ssm(kwargs))
    return _create_convnext_s4nd('convnext_s4nd_small_paper', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_s4nd_base_paper(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    """ConvNeXt-S4ND-B with the published ImageNet S4ND settings (`PAPER_SSM`)."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **_paper_ssm(kwargs))
    return _create_convnext_s4nd('convnext_s4nd_base_paper', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_sgconv_atto(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    """ConvNeXt-S4ND-atto with SGConv kernels (multiscale sub-kernels with decay) in every S4ND layer."""
    model_args = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), kernel='sgconv')
    return _create_convnext_s4nd('convnext_sgconv_atto', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_sgconv_tiny(pretrained: bool = False, **kwargs) -> ConvNeXtS4ND:
    """ConvNeXt-S4ND-T with SGConv kernels (multiscale sub-kernels with decay) in every S4ND layer."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), kernel='sgconv')
    return _create_convnext_s4nd('convnext_sgconv_tiny', pretrained=pretrained, **dict(model_args, **kwargs))
