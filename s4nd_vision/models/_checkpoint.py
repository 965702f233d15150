"""Checkpoint weights for a model: one unwrapping order for every model's filter and for inflation, the
weight transfer from other architectures (timm's ConvNeXt) and the report of what it did."""
import argparse
import logging
import os
import re
import warnings
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import clean_state_dict
from timm.models._manipulate import adapt_input_conv

from ..layers.records import state_dict_without_records
from ..layers.ssm_kernel import flatten_legacy_4d

__all__ = [
    'unwrap_state_dict', 'check_weights_fit', 'check_weights_file', 'check_pretrained_file', 'adapt_input_channels',
    'CHECKPOINT_KEYS', 'pointwise_reshape', 'TransferReport', 'match_state_dict', 'transfer_timm_weights',
    'split_input_size', 'stated_img_size', 'file_shape', 'file_num_classes', 'weights_num_classes',
    'warn_dropped_fitting_classifier', 'WEIGHTS_FILE_HINT', 'filter_args',
]

_logger = logging.getLogger(__name__)

# tried in this order, as timm's `load_state_dict` does: the EMA weights (what timm evaluates) before the model's
CHECKPOINT_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')

KEPT_INIT = 'kept init'
_KERNEL_TENSOR = re.compile(r'(^|\.)kernels\.\d+\.(c|weight)$')  # an S4ND layer's SSM C or SGConv weight
_POINTWISE = {2: 'linear', 4: '1x1 conv', 5: '1x1x1 conv'}


def unwrap_state_dict(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights of a training checkpoint dict: the first of CHECKPOINT_KEYS that holds a dict (EMA first),
    else the dict itself; DDP / torch.compile prefixes ('module.', '_orig_mod.') removed, and S4ND kernel
    tensors saved 4-D (before s4nd_vision stored them 3-D) flattened to today's shape."""
    for key in CHECKPOINT_KEYS:
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    state_dict = clean_state_dict(state_dict)
    for name in state_dict:
        if _KERNEL_TENSOR.search(name):
            flatten_legacy_4d(state_dict, name)
    return state_dict


def check_weights_fit(
        state_dict: Dict[str, torch.Tensor], model: nn.Module, strict: bool = True,
        check_classifier: bool = True) -> Dict[str, torch.Tensor]:
    """`state_dict` when it names the tensors of `model` one for one, but for the classifier (the pretrained_cfg's
    `classifier`) and the S4ND layers' records (files written before a record was saved keep the model's own).

    timm loads non-strictly whenever it drops the classifier (a `num_classes` other than the file's, as when
    fine-tuning): weights of another model, or of this one built with other arguments (`kernel=`, `stem_type=`,
    `token_layout=`, ...), would then load in part, the rest left at its initialization with at most a log line.
    They are refused instead, naming what is missing and what is left over; `strict=False` (timm's
    `pretrained_strict=False`, a partial load asked for) lets them through. A classifier that timm is about to drop
    though it fits is warned about (`warn_dropped_fitting_classifier`; `check_classifier=False` where the caller
    did so before filling the head in, and
    for a `features_only` model: `filter_args`)."""
    if check_classifier:
        warn_dropped_fitting_classifier(state_dict, model)
    if not strict:
        return state_dict
    with state_dict_without_records():
        tensors = set(model.state_dict())
    records = set(model.state_dict()) - tensors
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    heads = tuple(f'{c}.' for c in ([classifier] if isinstance(classifier, str) else classifier or ()))
    missing = sorted(k for k in tensors - set(state_dict) if not k.startswith(heads))
    unexpected = sorted(k for k in set(state_dict) - tensors - records if not k.startswith(heads))
    if missing or unexpected:
        raise ValueError(
            f'the weights do not fit {type(model).__name__}: they are of another model, or of this one built with '
            f'other arguments (kernel=, stem_type=, token_layout=, ...): missing {missing[:5]}'
            f'{" ..." if len(missing) > 5 else ""} ({len(missing)}), unexpected {unexpected[:5]}'
            f'{" ..." if len(unexpected) > 5 else ""} ({len(unexpected)})')
    return state_dict


def filter_args(kwargs: Dict[str, Any]) -> Dict[str, bool]:
    """The models' checkpoint filters' arguments from `create_model`'s `kwargs`: `strict` (timm's
    `pretrained_strict`), and `warn_classifier`, False for a `features_only` model, which has no classifier to
    warn about (timm drops the weights' classifier whatever its size, and the wrapper leaves out the head)."""
    return dict(strict=kwargs.get('pretrained_strict', True), warn_classifier=not kwargs.get('features_only', False))


def warn_dropped_fitting_classifier(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Warn where timm is about to drop a classifier of the weights that fits the model exactly: timm drops it
    whenever the model's `num_classes` differs from its pretrained_cfg's (the registry's 1000 unless the overlay
    states another), so `create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=...))`
    with a 10-class file silently gets a random head. A file of another class count (fine-tuning) is not warned
    about."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier, cfg_classes = cfg.get('classifier'), cfg.get('num_classes')
    num_classes = getattr(model, 'num_classes', None)
    if not classifier or not num_classes or cfg_classes is None or num_classes == cfg_classes:
        return
    for name in [classifier] if isinstance(classifier, str) else classifier:
        weight = state_dict.get(f'{name}.weight')
        if weight is not None and weight.ndim >= 1 and weight.shape[0] == num_classes:
            warnings.warn(
                f'the weights\' classifier {name!r} has the model\'s {num_classes} classes, but timm drops it (random '
                f'head) because the pretrained_cfg says {cfg_classes}: to load it, pass num_classes={num_classes} in '
                f'pretrained_cfg_overlay too', stacklevel=2)
            return


# what to give where a folder was given for a weights file (e.g. a training checkpoint, step-N)
WEIGHTS_FILE_HINT = "give a file such as a run's best.safetensors or a training checkpoint's model.safetensors"


def check_weights_file(path: str) -> None:
    """Refuse, on one line naming `path`, a weights file on which timm's loader would fail unclearly: a missing one
    (a bare FileNotFoundError), one that is no checkpoint (torch.load's errors, e.g. IndexError for a YAML file),
    and one whose name says another format than its contents: timm reads a file named *.safetensors with
    safetensors and any other with torch.load, whose error for a safetensors file suggests unsafe loading."""
    from .inflate import _looks_like_safetensors  # (inflate imports this module)
    if not os.path.isfile(path):
        problem = ('does not exist' if not os.path.exists(path) else
                   f'is not a file but a folder: {WEIGHTS_FILE_HINT}' if os.path.isdir(path) else 'is not a file')
        raise FileNotFoundError(f'weights file {path!r} {problem}')
    with open(path, 'rb') as f:
        head = f.read(16)
    if _looks_like_safetensors(head, os.path.getsize(path)):
        kind = 'safetensors'
    elif zipfile.is_zipfile(path) or head[:1] == b'\x80':  # torch.save: a zip archive, or (legacy) a pickle
        kind = 'torch.save'
    else:
        raise ValueError(f'weights file {path!r} is neither a safetensors file nor a torch.save file (it starts '
                         f'with {head!r})')
    if (kind == 'safetensors') != str(path).endswith('.safetensors'):
        raise ValueError(f'weights file {path!r} is a {kind} file, but timm reads a file by its name: '
                         'safetensors for a name ending in .safetensors, torch.load for any other; rename it')


def check_pretrained_file(pretrained: bool, kwargs: Dict[str, Any]) -> None:
    """`check_weights_file` for the `file` that a `pretrained_cfg_overlay` or `pretrained_cfg` argument in `kwargs`
    has timm's loader read (given `pretrained`; not a 'local-dir:' folder, not a Hub download)."""
    cfg = {}
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay'):  # (the overlay's entries win, as in timm)
        value = kwargs.get(key)
        if value is not None and not isinstance(value, str):
            cfg.update(value if isinstance(value, dict) else value.to_dict())
    if pretrained and cfg.get('file') and cfg.get('state_dict') is None and cfg.get('source') not in (
            'hf-hub', 'local-dir'):
        check_weights_file(os.fspath(cfg['file']))


def adapt_input_channels(
        state_dict: Dict[str, torch.Tensor], first_conv: str, in_chans: int) -> Dict[str, torch.Tensor]:
    """`state_dict` with the weight of the conv `first_conv` (any number of kernel axes) adapted to `in_chans`
    input channels by timm's rule (`adapt_input_conv`: one channel sums the checkpoint's, more repeat them scaled
    by checkpoint / model channels). timm's loader adapts Conv2d weights only; the 1D and 3D models declare
    `first_conv=None` to it and adapt in their checkpoint filters with this instead."""
    name = f'{first_conv}.weight'
    weight = state_dict.get(name)
    if weight is None or weight.ndim < 3 or weight.shape[1] == in_chans:
        return state_dict
    out_chs, source_chs, *kernel_size = weight.shape
    flat = weight.reshape(out_chs, source_chs, -1, 1)  # (O, I, prod(kernel), 1): the Conv2d layout timm adapts
    adapted = adapt_input_conv(in_chans, flat, base_chans=source_chs).reshape(out_chs, in_chans, *kernel_size)
    _logger.info(f'{name}: adapted from {source_chs} to {in_chans} input channels')
    return {**state_dict, name: adapted}


def file_shape(path: str, key: str) -> Optional[Tuple[int, ...]]:
    """The shape of entry `key` of the weights file `path` (safetensors, or a torch checkpoint of any of
    CHECKPOINT_KEYS), None without it. Reads the shapes only (the safetensors header, a memory-mapped torch file).
    A file that timm cannot load (`check_weights_file`) is refused here already, before the model is built."""
    path = os.fspath(path)  # (a pathlib.Path too, as timm's loader takes it)
    check_weights_file(path)
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, 'pt') as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        shape = clean_state_dict(shapes).get(key)
    else:
        # (timm's train.py saves its argparse arguments in its checkpoints, which timm's loader allows as well)
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                state_dict = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) torch file cannot be memory-mapped
                state_dict = torch.load(path, map_location='cpu', weights_only=True)
        weight = unwrap_state_dict(state_dict).get(key)
        shape = None if weight is None else weight.shape
    return None if shape is None else tuple(int(s) for s in shape)


def file_num_classes(path: str, classifier: str) -> Optional[int]:
    """The classes of the weights file `path`: the rows of `classifier`'s weight, None without one.
    `pretrained_cfg_overlay=dict(file=path)` needs it as the overlay's `num_classes`: timm drops the file's
    classifier whenever that differs from the model's, and the registry's is ImageNet's 1000, so without it a
    51-class file's head would not load into a 51-class model. Reads the shapes only: timm loads the weights after."""
    shape = file_shape(path, f'{classifier}.weight')
    return None if shape is None else shape[0]


def weights_num_classes(name: str, path: Optional[str]) -> Optional[int]:
    """`file_num_classes` of the weights file `path` for the registered timm model `name` (its cfg names the
    classifier); None without an existing file, without a classifier in it, or for a name timm does not register
    (shared weights, 'hf-hub:' / 'local-dir:', state their classes in their config)."""
    if path is None or not os.path.isfile(path) or not timm.is_model(name):
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    return file_num_classes(path, cfg.classifier) if cfg is not None and cfg.classifier else None


def _stated_cfgs(kwargs: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(argument name, a dict copy) of the `pretrained_cfg_overlay` and then the `pretrained_cfg` argument in
    `kwargs` (a dict or a PretrainedCfg, not a tag) that state an input_size."""
    for key in ('pretrained_cfg_overlay', 'pretrained_cfg'):
        cfg = kwargs.get(key)
        if cfg is None or isinstance(cfg, str):
            continue
        cfg = dict(cfg) if isinstance(cfg, dict) else cfg.to_dict()
        if cfg.get('input_size') is not None:
            yield key, cfg


def split_input_size(kwargs: Dict[str, Any], axes: int) -> Optional[Tuple[int, ...]]:
    """The (C, *sizes) input_size of `axes` axes that a `pretrained_cfg_overlay` or (else) a `pretrained_cfg`
    argument states (as the config.json of `s4nd_vision.deploy.save_for_hf` does for video and sequence models),
    or None. timm's builder asserts an image's (C, H, W), so every such argument in `kwargs` is replaced by a copy
    holding (C, H, W) for a video (`axes=3`) and no input_size for a sequence; the caller builds with the sizes
    and states them after."""
    stated = None
    for key, cfg in list(_stated_cfgs(kwargs)):
        size = cfg['input_size']
        if len(size) == axes + 1:
            kwargs[key] = dict(cfg, input_size=(size[0], *size[-2:]) if axes == 3 else None)
            stated = stated or tuple(size)
    return stated


def stated_img_size(kwargs: Dict[str, Any]) -> None:
    """timm's rule for models built for one input size (`fixed_input_size`, e.g. its ViTs), which ours are in
    that their S4ND kernels are referenced to their `img_size`: without an `img_size` argument, the (H, W) of an
    input_size that a `pretrained_cfg_overlay` (else a `pretrained_cfg`) states is the size the model is built
    for (in `kwargs`, in place). The models then state their native size in their pretrained_cfg, which without
    this discarded the overlay's."""
    if 'img_size' not in kwargs:
        for _, cfg in _stated_cfgs(kwargs):
            kwargs['img_size'] = tuple(cfg['input_size'][-2:])
            return


def _pointwise_kind(shape: Sequence[int]) -> Optional[str]:
    return _POINTWISE.get(len(shape)) if len(shape) == 2 or all(s == 1 for s in shape[2:]) else None


def pointwise_reshape(value: torch.Tensor, shape: Sequence[int]) -> Optional[Tuple[torch.Tensor, str]]:
    """`value` as a weight of `shape` when both are the same pointwise map (out, in): a Linear weight
    (out, in), a 1x1 conv weight (out, in, 1, 1) or a 1x1x1 one (out, in, 1, 1, 1), in differing layouts.

    Returns (the reshaped values, e.g. '1x1 conv -> linear'), or None for anything else (the values
    would change meaning)."""
    src, dst = _pointwise_kind(value.shape), _pointwise_kind(shape)
    if src is None or dst is None or src == dst or tuple(value.shape[:2]) != tuple(shape[:2]):
        return None
    return value.reshape(shape), f'{src} -> {dst}'


def _owner(name: str) -> str:
    return name.rpartition('.')[0]


def _pattern(module: str) -> str:
    """'stages.1.blocks.0.mlp.fc1' -> 'stages.*.blocks.*.mlp.fc1'."""
    return '.'.join('*' if p.isdigit() else p for p in module.split('.'))


def _groups(names: Iterable[str], every: Iterable[str], model: Optional[nn.Module] = None) -> str:
    """`names` (a subset of `every`, tensor names) summarized by module: each tensor under the outermost
    module all of whose tensors are in `names` (else its own module); modules of one class that differ
    in digit indices only share a line, those indices shown as '*' ('stages.*.blocks.*.conv_dw S4ND 132'),
    and so do siblings ('mlp.fc1/fc2'). Each line: the name, the class (given `model`), the tensor count."""
    names = list(names)
    chosen, total = defaultdict(int), defaultdict(int)
    for sets, counter in ((names, chosen), (every, total)):
        for n in sets:
            parts = n.split('.')[:-1]
            for i in range(len(parts) + 1):
                counter['.'.join(parts[:i])] += 1
    classes = {k: type(m).__name__ for k, m in model.named_modules()} if model is not None else {}
    groups = defaultdict(lambda: [0, set()])  # (pattern, class) -> [tensor count, modules]
    for n in names:
        parts = n.split('.')[:-1]
        # (a top-level tensor, e.g. a ViT's cls_token, is its own group, named: else it would show as '')
        prefixes = ['.'.join(parts[:i]) for i in range(1, len(parts) + 1)] or [n]
        module = next((m for m in prefixes if chosen[m] == total[m]), prefixes[-1])
        group = groups[(_pattern(module), classes.get(module, ''))]
        group[0] += 1
        group[1].add(module)
    siblings = defaultdict(list)  # (parent, class) -> [(last part, count)]
    for (_, kind), (count, modules) in groups.items():
        split = [m.split('.') for m in modules]
        name = '.'.join(p if all(s[i] == p for s in split) else '*' for i, p in enumerate(split[0]))
        parent, _, last = name.rpartition('.')
        siblings[(parent, kind)].append((last, count))
    out = []
    for (parent, kind), members in siblings.items():
        name = '/'.join(m for m, _ in members)
        name = f'{parent}.{name}' if parent else (name or '(top level)')
        out.append(f"{name}{f' {kind}' if kind else ''} {sum(c for _, c in members)}")
    return ', '.join(out)


@dataclass
class TransferReport:
    """What a weight transfer did, by target tensor name: loaded as is, `mapped` from the checkpoint in
    another form (how -> names), `initialized` without it (how -> names; KEPT_INIT: the model's own
    initialization), and the checkpoint's `unused` tensors."""
    source: str
    target: str
    loaded: List[str] = field(default_factory=list)
    mapped: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    initialized: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    unused: List[str] = field(default_factory=list)
    source_names: List[str] = field(default_factory=list)
    model: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def kept_init(self) -> List[str]:
        return self.initialized.get(KEPT_INIT, [])

    def __str__(self) -> str:
        every = self.loaded + [n for v in self.mapped.values() for n in v] + [
            n for v in self.initialized.values() for n in v]
        parts = [f'loaded {len(self.loaded)} tensors as they are']
        parts += [f'{how} {len(names)} ({_groups(names, every)})' for how, names in self.mapped.items() if names]
        parts += [f'{how} {len(names)} ({_groups(names, every, self.model)})'
                  for how, names in self.initialized.items() if names]
        if self.unused:
            parts.append(f'unused from the checkpoint {len(self.unused)} '
                         f'({_groups(self.unused, self.source_names or self.unused)})')
        return f'{self.target} from {self.source}: ' + '; '.join(parts)

    def log(self) -> None:
        _logger.info(str(self))


def _fit(value: Any, shape: Sequence[int]) -> Optional[Tuple[torch.Tensor, Optional[str]]]:
    """(value, None) as is, (reshaped, how) for a pointwise map in another layout, or None: does not fit."""
    if not torch.is_tensor(value):
        return None
    return (value, None) if value.shape == tuple(shape) else pointwise_reshape(value, shape)


def match_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        source: str = 'a checkpoint',
) -> Tuple[Dict[str, torch.Tensor], TransferReport]:
    """Weights for every entry of `model.state_dict()` from a checkpoint of another architecture.

    A module of the model takes the checkpoint's tensors when the checkpoint holds one module of the same
    name with the same tensor names and every tensor fits: the same shape, or the same pointwise map in
    another layout (`pointwise_reshape`: 1x1 conv <-> Linear). A module loads whole or keeps its own
    initialization whole (a bias never loads without its weight). Returns the weights and the report.
    """
    own = model.state_dict()
    theirs, ours = defaultdict(dict), defaultdict(dict)
    for sd, by_module in ((state_dict, theirs), (own, ours)):
        for name, value in sd.items():
            by_module[_owner(name)][name] = value
    report = TransferReport(source, type(model).__name__, source_names=list(state_dict), model=model)
    out, used = {}, set()
    for module, tensors in ours.items():
        candidates = theirs.get(module, {})
        fitted = {}
        if candidates.keys() == tensors.keys():
            for name, target in tensors.items():
                fit = _fit(candidates[name], target.shape)
                if fit is None:
                    fitted = {}
                    break
                fitted[name] = fit
        for name, target in tensors.items():
            if name in fitted:
                value, how = fitted[name]
                (report.mapped[f'reshaped {how}'] if how else report.loaded).append(name)
                out[name] = value
                used.add(name)
            else:
                report.initialized[KEPT_INIT].append(name)
                out[name] = target
    report.unused = [k for k in state_dict if k not in used]
    return out, report


def transfer_timm_weights(state_dict: Dict[str, torch.Tensor], model: nn.Module, first_conv: str,
                          source: str, strict: bool = True, warn_classifier: bool = True,
                          changed: Optional[Dict[str, str]] = None) -> Dict[str, torch.Tensor]:
    """Our own weights (they hold S4ND kernels) as they are, refused where they do not fit the model
    (`check_weights_fit`); from a plain timm model's (`source`, e.g. 'timm ViT weights') every module that fits
    (`match_state_dict`), `first_conv` adapted to the model's `in_chans` first by timm's rule, with the report
    logged. Weights of which nothing outside the head fits (another architecture or width) are refused: the model
    would otherwise be its initialization under the name of a pretrained one. `warn_classifier`: see
    `filter_args`. `changed`: tensor name -> how the caller changed it before (e.g. a resampled patch embedding),
    reported as such rather than as loaded as it is."""
    if any('.kernels.' in k for k in state_dict):
        return check_weights_fit(state_dict, model, strict=strict, check_classifier=warn_classifier)
    if warn_classifier:
        warn_dropped_fitting_classifier(state_dict, model)
    state_dict = adapt_input_channels(state_dict, first_conv, model.in_chans)
    out, report = match_state_dict(state_dict, model, source=source)
    for name, how in (changed or {}).items():
        if name in report.loaded:
            report.loaded.remove(name)
            report.mapped[how].append(name)
    taken = report.loaded + [n for names in report.mapped.values() for n in names]
    if not any(not n.startswith('head.') for n in taken):
        raise ValueError(f'the weights fit no module of {type(model).__name__} outside the head: neither its own '
                         f'weights nor {source} of its width ({report})')
    report.log()
    return out
