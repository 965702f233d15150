"""timm's model API shared by every S4ND model (ConvNeXt-S4ND 2D and 3D, isotropic, ViT-S4ND).

The models hold a `head` with timm's head interface (`NormMlpClassifierHead` or `ClassifierHead`),
`num_features`, `in_chans`; models whose S4ND layers run at fixed strides of the input also
implement `_s4nd_layers`, from which their reference grids and kernel generation follow.
"""
from functools import partial
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, NormMlpClassifierHead, get_device_dtype, trunc_normal_
from timm.models import FeatureDictNet, FeatureHookNet, FeatureListNet, checkpoint, named_apply
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models._features_fx import FeatureGraphNet

from ..layers import S4ND, ssm_parameters, stacked_kernels
from ..layers.dispatch import channel_major_input
from ..layers.s4nd import SCRIPT_ALTERNATIVES
from ._checks import check_img_size, check_input, check_num_classes

try:  # timm's record of a model's current input size and arguments, apart from its source cfg (recent timm)
    from timm.models._input import update_model_args, update_model_input_size
except ImportError:  # older timm: `pretrained_cfg['input_size']` is the only record
    def update_model_input_size(model: nn.Module, img_size, **model_args) -> None:
        pass

    def update_model_args(model: nn.Module, **model_args) -> None:
        pass

torch.fx.wrap('check_input')  # a call in FX graphs (timm's feature_cls='fx'): the check runs on the real input

__all__ = [
    'S4NDModel', 'MIXER_TYPES', 'S4ND_ID', 'S4_ID', 'SGCONV_ID', 'PAPER_NAMES', 'paper_cfg', 'LIBRARY_CFG',
    'init_weights', 'update_model_args', 'input_size_args',
    'check_global_pool', 's4nd_grids', 'SSMNoWeightDecay', 'feature_cfg', 'handed_out', 'HandsOutFeatures',
]

# The papers our models implement, by arXiv id, with their titles: the pretrained_cfgs' `paper_ids` / `paper_name`
# (timm's keys) and the hub's citations go by these ids.
S4ND_ID, S4_ID, SGCONV_ID = 'arXiv:2210.06583', 'arXiv:2111.00396', 'arXiv:2210.09298'
PAPER_NAMES = {
    S4ND_ID: 'S4ND: Modeling Images and Videos as Multidimensional Signals Using State Spaces',
    S4_ID: 'Efficiently Modeling Long Sequences with Structured State Spaces',
    SGCONV_ID: 'What Makes Convolutional Models Great on Long Sequence Modeling?',
}


def paper_cfg(paper_id: str = S4ND_ID) -> dict:
    """A pretrained_cfg's paper entries: the paper of the model's architecture, then S4ND's, which every model here
    implements (its layer)."""
    ids = tuple(dict.fromkeys((paper_id, S4ND_ID)))
    return dict(paper_ids=ids[0] if len(ids) == 1 else ids, paper_name=PAPER_NAMES[paper_id])

# In every pretrained_cfg, so that the config.json written by timm's own `save_for_hf` / `push_to_hf_hub` says
# where the model comes from: timm has no plugin mechanism, and its registry knows these models only once this
# package is imported (`s4nd_vision.deploy.hub` writes the same into the README model card).
LIBRARY_CFG = dict(
    origin_url='https://github.com/state-spaces/s4',  # the S4ND authors' research code (architecture, recipes)
    notes=('Needs the s4nd-vision package: `pip install s4nd-vision`, then `import s4nd_vision` before '
           "`timm.create_model('hf-hub:...' or 'local-dir:...', pretrained=True)`; without the import timm "
           "ends in 'Unknown model'.",))

MIXER_TYPES = ('s4nd', 'conv')  # the blocks' spatial mixer: S4ND, or the depthwise conv of the baselines


_POOLS = ('avg', 'max', 'avgmax', 'catavgmax')  # timm's adaptive poolings ('fast' + one of them, or 'fast': avg)


def check_global_pool(global_pool: Optional[str], widening: bool = True) -> None:
    """Raise ValueError unless `global_pool` is one of timm's image poolings (None: the head's own), naming the
    argument, where timm's heads only assert ('Invalid pool type', nothing at all under `python -O`): its ViT
    poolings, which these models have nothing for, and without `widening` (ConvNeXt's norm-MLP head) 'catavgmax',
    which doubles the pooled width."""
    valid = [p for p in _POOLS if widening or p != 'catavgmax']
    if global_pool in ('token', 'map'):
        raise ValueError(f"global_pool={global_pool!r} pools a class token or with attention, which S4ND models do "
                         f"not have: use {', '.join(map(repr, valid))} or '' (none)")
    if global_pool is None:
        return
    kind = global_pool.lower() if isinstance(global_pool, str) else None
    if kind is not None and kind.startswith('fast'):
        kind = kind[4:] or 'avg'
    if kind != '' and kind not in valid:
        what = ('doubles the pooled width, which the norm-MLP head does not take' if kind == 'catavgmax' else
                'is no pooling of timm\'s')
        raise ValueError(f"global_pool={global_pool!r} {what}: use {', '.join(map(repr, valid))} or '' (none), "
                         f"also with timm's 'fast' prefix")


class SSMNoWeightDecay:
    """`no_weight_decay()` as timm's optimizer factory asks for it: the names of the SSM parameters (A, B, log dt;
    S4's P) under this module, trained without weight decay. Mixed into the models and into their `features_only`
    wrappers, the module a detection or segmentation user hands to `timm.optim.create_optimizer_v2`."""

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {name for name, _ in ssm_parameters(self)}


def handed_out(x: torch.Tensor) -> torch.Tensor:
    """A feature map handed to the caller (features, intermediates) in a layout whose spatial axes merge
    (`x.view(B, C, -1)` works, as on any conv net's output): where x is S4ND's channel-major working memory
    (C, ..., B, W), which a CPU forward keeps between layers (`layers.pointwise`) and on which such a view fails, a
    channels-last copy (`channels_last_3d` for clips), the layout the blocks hand on otherwise; else x as it is."""
    if channel_major_input(x) is None or x.is_contiguous():  # (batch 1: that memory is contiguous (B, C, ...))
        return x
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim, torch.contiguous_format)
    return x.contiguous(memory_format=fmt)


class HandsOutFeatures:
    """Mixed into the `features_only` wrappers (before timm's class): their feature maps `handed_out`."""

    def forward(self, x: torch.Tensor) -> Union[List[torch.Tensor], Dict[str, torch.Tensor]]:
        out = super().forward(x)
        if isinstance(out, dict):
            return type(out)((k, handed_out(v)) for k, v in out.items())
        return [handed_out(v) for v in out]


class ChecksInput:
    """Mixed into timm's 'list', 'dict' and 'hook' wrappers (before timm's class), which run the model's modules
    one by one rather than its forward: the model's input check, as its forward makes it (`check_input`; sides
    down to the reduction of the last stage returned), so that e.g. an image given to a video backbone is refused
    as such rather than by a conv that reads it as one unbatched clip. Models whose forward makes its own checks
    elsewhere (without `min_input_size`: ViT-S4ND, the sequence models) are left as they are."""

    def __init__(self, model: nn.Module, out_indices: Tuple[int, ...], **kwargs):
        super().__init__(model, out_indices=out_indices, **kwargs)
        self._input_check = None
        if hasattr(model, 'min_input_size'):
            _, last = feature_take_indices(len(model.feature_info), out_indices)
            self._input_check = partial(check_input, **dict(model._input_checks(), min_side=model._min_side(last)))

    def forward(self, x: torch.Tensor) -> Union[List[torch.Tensor], Dict[str, torch.Tensor]]:
        if self._input_check is not None:
            x = self._input_check(x)
        return super().forward(x)


class _FeatureListNet(HandsOutFeatures, ChecksInput, SSMNoWeightDecay, FeatureListNet):
    pass


class _FeatureDictNet(HandsOutFeatures, ChecksInput, SSMNoWeightDecay, FeatureDictNet):
    pass


class _FeatureHookNet(HandsOutFeatures, ChecksInput, SSMNoWeightDecay, FeatureHookNet):
    pass


class _FeatureGraphNet(HandsOutFeatures, SSMNoWeightDecay, FeatureGraphNet):
    """timm's FX feature graph, traced from the model pruned to the stages it returns (as timm's getter wrapper
    prunes), so that the input check in the graph takes sides down to the reduction of the last of them."""

    def __init__(self, model: nn.Module, out_indices: Tuple[int, ...], **kwargs):
        if hasattr(model, 'prune_intermediate_layers'):
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=True)
        super().__init__(model, out_indices=out_indices, **kwargs)


class _FeatureGetterNet(SSMNoWeightDecay, FeatureGetterNet):
    """timm's getter wrapper (the model's `forward_intermediates`), with the `set_grad_checkpointing` that timm's
    lacks and its other wrappers have (detection code calls it): the model's, which `forward_intermediates`
    honours."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


_FEATURE_CLASSES = dict(list=_FeatureListNet, dict=_FeatureDictNet, hook=_FeatureHookNet, fx=_FeatureGraphNet,
                        getter=_FeatureGetterNet)


def feature_cfg(kwargs: Dict[str, Any], **cfg) -> Dict[str, Any]:
    """timm's `feature_cfg` for `build_model_with_cfg`, whose wrapper class keeps the SSM parameters' no weight
    decay: `cfg['feature_cls']` or a `feature_cls=` the user gave in `kwargs` (popped), where a name of timm's
    wrappers ('list', 'dict', 'hook', 'fx', 'getter') becomes the same wrapper with `no_weight_decay`."""
    if kwargs.get('features_only'):
        cls = kwargs.pop('feature_cls', cfg['feature_cls'])
        if isinstance(cls, str):
            name = 'hook' if 'hook' in cls.lower() else cls.lower()  # (timm's own matching of the names)
            cls = _FEATURE_CLASSES.get(name, cls)
        cfg['feature_cls'] = cls
    return cfg


class S4NDModel(SSMNoWeightDecay, nn.Module):
    """Base of the S4ND models: optimizer groups, classifier handling, head and forward, reference grids.

    Image models whose S4ND layers run at fixed strides set `min_input_size` (their total stride as run). The
    intermediates are the outputs of the nn.Sequential `_feature_seq` that follows the `stem`, and
    `norm_pre` (an Identity here: the norm is in the head) follows it.
    """
    intermediates_fmt = 'NCHW'  # layout of the features and intermediates (the only output_fmt)
    _feature_seq = 'stages'

    def __prepare_scriptable__(self):
        """torch.jit.script's hook: refused with the alternatives (timm's `--torchscript` scripts models)."""
        raise RuntimeError(f'{type(self).__name__}: torch.jit.script does not support the models of s4nd_vision: '
                           f'{SCRIPT_ALTERNATIVES}')

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """A new classifier for `num_classes` (0: none) and, if given, pooling; `reset_other` also removes
        the head's norm and pre-logits MLP (heads that have them)."""
        check_num_classes(num_classes)
        check_global_pool(global_pool, widening=not isinstance(self.head, NormMlpClassifierHead))
        self.head.reset(  # (first: a pooling timm's head refuses leaves num_classes as it was)
            num_classes, global_pool, reset_other=reset_other, in_features=self.num_features,
            **get_device_dtype(self))
        self.num_classes = num_classes
        self.head_hidden_size = self.head.num_features

    def _init_norm_mlp_head(
            self,
            num_classes: int,
            global_pool: str,
            head_hidden_size: Optional[int],
            drop_rate: float,
            head_init_scale: float,
            device=None,
            dtype=None,
    ) -> None:
        """ConvNeXt's head (timm's norm-MLP classifier head on `num_features`), then the weight init of the
        whole model."""
        check_global_pool(global_pool, widening=False)
        self.head = NormMlpClassifierHead(
            self.num_features, num_classes, hidden_size=head_hidden_size, pool_type=global_pool,
            drop_rate=drop_rate, norm_layer=LayerNorm2d, act_layer='gelu', device=device, dtype=dtype)
        self.head_hidden_size = self.head.num_features
        named_apply(partial(init_weights, head_init_scale=head_init_scale), self)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: Optional[str] = None,
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the stages (`_feature_seq`) in `indices` (last n if int, all if None), each
        (B, C_i, *spatial_i) (`handed_out`); `norm` applies `norm_pre` to the last."""
        output_fmt = output_fmt or self.intermediates_fmt
        if output_fmt not in (self.intermediates_fmt, 'NCHW'):  # (timm's feature wrappers ask for 'NCHW')
            raise ValueError(f'output_fmt must be {self.intermediates_fmt!r} (channels first), got {output_fmt!r}')
        intermediates = []
        all_stages = getattr(self, self._feature_seq)
        take_indices, max_index = feature_take_indices(len(all_stages), indices)
        last_idx = len(all_stages) - 1
        stages = all_stages if torch.jit.is_scripting() or not stop_early else all_stages[:max_index + 1]
        # (stopping early, the input need only reach the reduction of the last stage run)
        x = check_input(x, **dict(self._input_checks(), min_side=self._min_side(len(stages) - 1)))
        # model-wide checkpointing (the isotropic blocks; ConvNeXt's stages checkpoint themselves)
        checkpointed = getattr(self, 'grad_checkpointing', False) and not torch.jit.is_scripting()
        # as in forward_features, a training step makes all kernels in one stacked call, where every layer runs
        # and none recomputes its own under checkpointing
        stack = len(stages) == len(all_stages) and not checkpointed and not any(
            getattr(s, 'grad_checkpointing', False) for s in all_stages)
        with stacked_kernels(self, x, lambda: self._s4nd_grids(x.shape) if stack else []):
            x = self.stem(x)
            for feat_idx, stage in enumerate(stages):
                x = checkpoint(stage, x) if checkpointed else stage(x)
                if feat_idx in take_indices:
                    intermediates.append(handed_out(self.norm_pre(x) if norm and feat_idx == last_idx else x))
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
        stages = getattr(self, self._feature_seq)
        take_indices, max_index = feature_take_indices(len(stages), indices)
        prune_end = max_index < len(stages) - 1
        if prune_norm or prune_end:
            self.norm_pre = nn.Identity()
        setattr(self, self._feature_seq, stages[:max_index + 1])
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.min_input_size = self._min_side()  # (the kept stages' reduction: smaller inputs run)
            self.record_input_size()  # (pool_size: the final feature map of the kept stages)
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices

    def _min_side(self, last_index: int = -1) -> int:
        """The smallest input side of a run through stage `last_index` of `_feature_seq` (-1: the last the model
        holds, after `prune_intermediate_layers` the last kept): that stage's reduction, the total stride as run.
        The one rule for the whole model (`min_input_size`), a pruned one, `forward_intermediates(stop_early=True)`
        and a `features_only` backbone; it is also the reduction of that run's final feature map (`pool_size`)."""
        index = range(len(getattr(self, self._feature_seq)))[last_index]
        return self.feature_info[index]['reduction']

    def _input_checks(self) -> Dict[str, Any]:
        """`check_input`'s arguments for this model's input."""
        return dict(in_chans=self.in_chans, min_side=self.min_input_size)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        return check_input(x, **self._input_checks())

    def _s4nd_layers(self) -> Iterator[Tuple[S4ND, Tuple[int, ...]]]:
        """Every S4ND layer with the stride per input axis of the grid it runs on."""
        raise NotImplementedError

    def _s4nd_grids(self, shape: Sequence[int]) -> List[Tuple[S4ND, Tuple[int, ...]]]:
        """Every S4ND layer with the spatial sizes of its input, for a model input of `shape` (B, C, *spatial)."""
        return s4nd_grids(self._s4nd_layers(), shape)

    def input_size(self) -> Tuple[int, ...]:
        """The native input (C, *spatial) without the batch; `pretrained_cfg['input_size']` states its spatial
        part."""
        return (self.in_chans, *self.img_size)

    def reference_img_size(self) -> Tuple[int, int]:
        """The image size (H, W) that the S4ND layers' reference grids (their rate-1 grids, saved with the weights)
        correspond to: the size the weights were trained at, `img_size` unless weights of another size were loaded.
        Read from the first S4ND layer; a model without one (the conv baselines) answers `img_size`."""
        grids = self._s4nd_grids((1, *self.input_size()))
        if not grids:
            return self.img_size
        layer, grid = grids[0]
        return tuple(round(s * r / g) for s, r, g in zip(self.img_size, layer.l_ref[-2:], grid[-2:]))

    def _state_input_size(self, cfg: Dict[str, Any]) -> None:
        """Write the native spatial input size (and its final feature map's, `pool_size`) into a pretrained cfg
        (in place). The channel count stays the one the cfg states, that of the source weights: timm's builder
        adapts their first conv to `in_chans` from it (`create_model(name, pretrained=True, in_chans=1)`). The
        model's own channels are `in_chans`."""
        chans = (cfg.get('input_size') or (self.in_chans,))[0]
        cfg['input_size'] = (chans, *self.input_size()[1:])
        if getattr(self, 'feature_info', None):  # the final feature map at that size (H, W), of the stages kept
            reduction = self._min_side()
            cfg['pool_size'] = tuple(s // reduction for s in self.input_size()[-2:])

    @property
    def pretrained_cfg(self) -> Optional[Dict[str, Any]]:
        return self.__dict__.get('_pretrained_cfg')

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: Optional[Dict[str, Any]]) -> None:
        """timm's builder assigns the registry's cfg (a fresh dict per model): it is made to state the input
        size this model was built for (`img_size=`), in place, so that the copy a `features_only` wrapper
        takes says it too, and `resolve_model_data_config` gives it."""
        if cfg is not None:
            self._state_input_size(cfg)
        self.__dict__['_pretrained_cfg'] = cfg

    def record_input_size(self) -> None:
        """State `input_size()` where timm looks: `pretrained_cfg['input_size']` (read by
        `resolve_model_data_config`), and the model's traits and arguments (`update_model_input_size`)."""
        if self.pretrained_cfg is not None:
            self._state_input_size(self.pretrained_cfg)
        update_model_input_size(self, self.img_size)

    def _check_input_size(self, img_size: Tuple[int, int]) -> None:
        if min(img_size) < self.min_input_size:
            raise ValueError(f'img_size must be at least {self.min_input_size} on each side, got {img_size}')

    @torch.jit.ignore
    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Make `img_size` the model's native resolution (None keeps it, as in timm), keeping its function.

        As in timm, the model then computes the same thing in image coordinates at every input size: the
        S4ND layers keep their reference grids (the grids their step sizes are measured on, saved with
        the weights), since the rate follows the input anyway. What changes is what the model states:
        `img_size` and `pretrained_cfg['input_size']`, so `timm.data.resolve_model_data_config` gives the
        new size.
        """
        img_size = self.img_size if img_size is None else check_img_size(img_size)
        self._check_input_size(img_size)
        self.img_size = img_size
        self.record_input_size()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def s4nd_grids(
        layers: Iterable[Tuple[S4ND, Tuple[int, ...]]], shape: Sequence[int]) -> List[Tuple[S4ND, Tuple[int, ...]]]:
    """(layer, stride per input axis of its grid) pairs as (layer, spatial sizes of its input) for a model input of
    `shape` (B, C, *spatial)."""
    return [(layer, tuple(s // t for s, t in zip(shape[2:], stride))) for layer, stride in layers]


def init_weights(module: nn.Module, name: Optional[str] = None, head_init_scale: float = 1.0) -> None:
    """ConvNeXt's init: truncated normal (std 0.02) convs and linears, zero biases, the classifier scaled."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Linear) and name and 'head.' in name:
            module.weight.data.mul_(head_init_scale)
            module.bias.data.mul_(head_init_scale)


def input_size_args(name: str) -> Tuple[str, ...]:
    """The input-size arguments the timm model `name` is built with: ('img_size',) for this package's image
    models, ('img_size', 'num_frames') for its video models (their kernels' reference grids), () for others
    (timm's own models; the sequence models, built with `seq_len`)."""
    if not timm.is_model(name):
        return ()
    module = timm.models.model_entrypoint(name).__module__
    if not module.startswith(__name__.rsplit('.', 1)[0] + '.') or module.endswith('.s4_seq'):
        return ()
    return ('img_size', 'num_frames') if module.endswith('.convnext_s4nd_3d') else ('img_size',)
