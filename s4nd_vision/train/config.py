"""Training configuration: typed sections loaded from YAML, validated on load.

A config file holds the sections below (every key optional except `model.name` and the data
location); an unknown or mistyped key, a value of the wrong type or out of range is a
`ConfigError` naming the key. Command-line overrides use dotted keys: `optim.lr=1e-3`,
`train.epochs=5`, `data.root=/data/imagenet` (values are parsed as YAML).

Video (`data.dataset: hmdb51`) reads clips of `data.clip_duration` seconds subsampled to
`data.num_frames` frames; of the augmentation keys, `aug.auto_augment` (torchvision's
RandAugment as `rand-m<magnitude>[-n<ops>]`), `aug.no_aug`, `aug.smoothing` and Mixup/CutMix apply
to clips, and the image-only ones (`aug.scale`, `aug.hflip`, `aug.color_jitter`, `aug.reprob`,
`aug.repeated_aug`) must keep their defaults.
"""
import dataclasses
import difflib
import importlib.resources
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ['ConfigError', 'Config', 'load_config', 'apply_overrides', 'config_to_dict', 'packaged_configs']


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


@dataclass
class ModelConfig:
    name: str = ''  # a timm model name, e.g. convnext_s4nd_tiny
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model keyword arguments
    pretrained_file: Optional[str] = None  # local weights (safetensors / torch) to start from
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0  # head dropout


@dataclass
class DataConfig:
    # 'imagefolder' (root/train, root/val), 'mnist' (built in, no download) or 'hmdb51' (video)
    dataset: str = 'imagefolder'
    root: Optional[str] = None  # hmdb51: the videos, <root>/<class>/<video>.avi
    train_split: str = 'train'  # imagefolder
    val_split: str = 'val'  # imagefolder
    img_size: int = 224  # training resolution: the models' reference grid (rate 1)
    batch_size: int = 128  # per process, per micro-batch
    workers: int = 4
    crop_pct: float = 0.875  # eval centre crop (hmdb51: every crop, after a short-side resize to img_size / crop_pct)
    interpolation: Optional[str] = None  # images; None: the model's pretrained cfg (clips are resized bilinearly)
    mean: Optional[Tuple[float, ...]] = None  # None: the model's pretrained cfg
    std: Optional[Tuple[float, ...]] = None
    in_chans: int = 3
    # hmdb51 only
    split_dir: Optional[str] = None  # the official split files <class>_test_split<1|2|3>.txt (None: root)
    split: int = 1  # official split 1, 2 or 3 (train and test videos)
    num_frames: int = 16  # frames per clip, subsampled uniformly: the video models' time reference grid
    clip_duration: float = 2.0  # seconds per clip (training: one random clip per video and epoch)
    clips_per_video: int = 1  # evenly spaced test clips per video; their softmax is averaged per video


@dataclass
class AugConfig:
    auto_augment: Optional[str] = None  # timm policy string, e.g. rand-m9-mstd0.5-inc1
    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.4
    reprob: float = 0.0  # random erasing probability
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.0  # label smoothing
    repeated_aug: int = 0  # repeats per sample when distributed (0 = off; DeiT uses 3)
    no_aug: bool = False  # resize + centre crop only (small demos)

    def video_randaugment(self) -> Optional[Tuple[int, int]]:
        """(num_ops, magnitude) of torchvision's RandAugment for clips from `auto_augment` (None: off)."""
        if self.auto_augment is None:
            return None
        match = re.fullmatch(r'rand-m(\d+)(?:-n(\d+))?', self.auto_augment)
        if match is None or int(match.group(1)) > 30 or match.group(2) == '0':
            raise ConfigError(
                "aug.auto_augment must be null or 'rand-m<magnitude 0-30>[-n<ops>]' for video (torchvision's "
                f'RandAugment, the same for every frame of a clip), got {self.auto_augment!r}')
        return int(match.group(2) or 2), int(match.group(1))


@dataclass
class OptimConfig:
    opt: str = 'adamw'
    lr: float = 1e-3  # at a global batch of lr_base_batch; scaled linearly to the real global batch
    lr_base_batch: Optional[int] = None  # None: lr is used as given
    weight_decay: float = 0.05
    ssm_lr: Optional[float] = None  # SSM parameters (A, B, dt); scaled like lr; None = lr
    ssm_weight_decay: float = 0.0
    layer_decay: Optional[float] = None  # layer-wise lr decay
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = None  # max gradient norm


@dataclass
class SchedConfig:
    sched: str = 'cosine'  # timm scheduler stepped per update: cosine, tanh or poly
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6


@dataclass
class ProgressiveStage:
    epoch: int = 0  # first epoch of the stage
    img_size: int = 224  # training resolution in this stage
    bandlimit: Optional[float] = None  # S4ND band-limit in this stage (None: leave the model's)


@dataclass
class TrainConfig:
    epochs: int = 300
    seed: int = 0
    output_dir: str = 'output/run'
    mixed_precision: Optional[str] = None  # 'no', 'bf16', 'fp16'; None: accelerate launch decides
    grad_accum_steps: int = 1
    ema_decay: Optional[float] = None  # model EMA (None = off)
    checkpoint_every_steps: int = 0  # also checkpoint every N optimizer updates (0 = epochs only)
    keep_checkpoints: int = 2
    max_steps_per_epoch: Optional[int] = None  # cap updates per epoch (quick runs)
    eval_every_epochs: int = 1
    progressive: List[ProgressiveStage] = field(default_factory=list)
    trackers: List[str] = field(default_factory=list)  # accelerate trackers, e.g. [tensorboard]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> 'Config':
        """Check values that types alone cannot; raise ConfigError naming the key."""
        def need(ok: bool, key: str, expectation: str, value: Any) -> None:
            if not ok:
                raise ConfigError(f'{key} must be {expectation}, got {value!r}')

        need(bool(self.model.name), 'model.name', 'a timm model name', self.model.name)
        need(self.data.dataset in ('imagefolder', 'mnist', 'hmdb51'), 'data.dataset',
             "'imagefolder', 'mnist' or 'hmdb51'", self.data.dataset)
        if self.data.dataset == 'imagefolder':
            need(self.data.root is not None, 'data.root', 'the dataset folder (with train/ and val/)', self.data.root)
            need(os.path.isdir(self.data.root), 'data.root', 'an existing folder', self.data.root)
        if self.data.dataset == 'hmdb51':
            self._validate_video()
        for key in ('img_size', 'batch_size', 'in_chans'):
            need(getattr(self.data, key) > 0, f'data.{key}', 'positive', getattr(self.data, key))
        need(self.data.workers >= 0, 'data.workers', '>= 0', self.data.workers)
        need(0 < self.data.crop_pct <= 1, 'data.crop_pct', 'in (0, 1]', self.data.crop_pct)
        for key in ('lr', 'eps'):
            need(getattr(self.optim, key) > 0, f'optim.{key}', 'positive', getattr(self.optim, key))
        need(self.optim.ssm_lr is None or self.optim.ssm_lr > 0, 'optim.ssm_lr', 'positive or null', self.optim.ssm_lr)
        need(self.optim.lr_base_batch is None or self.optim.lr_base_batch > 0, 'optim.lr_base_batch', 'positive or null',
             self.optim.lr_base_batch)
        for key in ('weight_decay', 'ssm_weight_decay'):
            need(getattr(self.optim, key) >= 0, f'optim.{key}', '>= 0', getattr(self.optim, key))
        need(self.optim.layer_decay is None or 0 < self.optim.layer_decay <= 1, 'optim.layer_decay', 'in (0, 1] or null',
             self.optim.layer_decay)
        need(self.optim.clip_grad is None or self.optim.clip_grad > 0, 'optim.clip_grad', 'positive or null',
             self.optim.clip_grad)
        need(self.sched.sched in ('cosine', 'tanh', 'poly'), 'sched.sched', "'cosine', 'tanh' or 'poly'", self.sched.sched)
        need(self.sched.warmup_epochs >= 0, 'sched.warmup_epochs', '>= 0', self.sched.warmup_epochs)
        need(self.train.epochs > 0, 'train.epochs', 'positive', self.train.epochs)
        need(self.train.grad_accum_steps >= 1, 'train.grad_accum_steps', '>= 1', self.train.grad_accum_steps)
        need(self.train.mixed_precision in (None, 'no', 'bf16', 'fp16'), 'train.mixed_precision',
             "one of no, bf16, fp16 or null", self.train.mixed_precision)
        need(self.train.ema_decay is None or 0 < self.train.ema_decay < 1, 'train.ema_decay', 'in (0, 1) or null',
             self.train.ema_decay)
        need(self.train.checkpoint_every_steps >= 0, 'train.checkpoint_every_steps', '>= 0',
             self.train.checkpoint_every_steps)
        need(self.train.keep_checkpoints >= 1, 'train.keep_checkpoints', '>= 1', self.train.keep_checkpoints)
        need(self.train.max_steps_per_epoch is None or self.train.max_steps_per_epoch > 0, 'train.max_steps_per_epoch',
             'positive or null', self.train.max_steps_per_epoch)
        need(self.train.eval_every_epochs >= 1, 'train.eval_every_epochs', '>= 1', self.train.eval_every_epochs)
        for key in ('reprob', 'hflip', 'mixup_prob', 'mixup_switch_prob'):
            need(0 <= getattr(self.aug, key) <= 1, f'aug.{key}', 'in [0, 1]', getattr(self.aug, key))
        for key in ('mixup', 'cutmix', 'repeated_aug'):
            need(getattr(self.aug, key) >= 0, f'aug.{key}', '>= 0', getattr(self.aug, key))
        need(0 <= self.aug.smoothing < 1, 'aug.smoothing', 'in [0, 1)', self.aug.smoothing)
        epochs = [s.epoch for s in self.train.progressive]
        if epochs:
            need(epochs[0] == 0, 'train.progressive', 'stages starting at epoch 0', epochs)
            need(epochs == sorted(set(epochs)), 'train.progressive', 'stages in increasing epoch order', epochs)
            for stage in self.train.progressive:
                need(stage.img_size > 0, 'train.progressive[].img_size', 'positive', stage.img_size)
                need(stage.bandlimit is None or stage.bandlimit > 0, 'train.progressive[].bandlimit', 'positive or null',
                     stage.bandlimit)
        return self

    def _validate_video(self) -> None:
        def need(ok: bool, key: str, expectation: str, value: Any) -> None:
            if not ok:
                raise ConfigError(f'{key} must be {expectation} for data.dataset hmdb51, got {value!r}')

        data, aug = self.data, self.aug
        need(data.root is not None, 'data.root', 'the video folder (<class>/<video>.avi)', data.root)
        need(os.path.isdir(data.root), 'data.root', 'an existing folder', data.root)
        need(data.split_dir is None or os.path.isdir(data.split_dir), 'data.split_dir', 'an existing folder or null',
             data.split_dir)
        need(data.split in (1, 2, 3), 'data.split', '1, 2 or 3 (the official splits)', data.split)
        need(data.num_frames >= 2, 'data.num_frames', 'at least 2 (the stem strides 2 in time)', data.num_frames)
        need(data.clip_duration > 0, 'data.clip_duration', 'positive (seconds)', data.clip_duration)
        need(data.clips_per_video >= 1, 'data.clips_per_video', 'at least 1', data.clips_per_video)
        need(data.in_chans == 3, 'data.in_chans', '3 (RGB clips)', data.in_chans)
        defaults = AugConfig()
        for key in ('scale', 'hflip', 'color_jitter', 'reprob', 'repeated_aug'):  # image-only settings
            need(getattr(aug, key) == getattr(defaults, key), f'aug.{key}',
                 f'left at {getattr(defaults, key)!r} (an image setting: clips get a short-side resize, random crop, '
                 'flip and RandAugment)', getattr(aug, key))
        aug.video_randaugment()

    def stage_at(self, epoch: int) -> ProgressiveStage:
        """The progressive-resizing stage of `epoch` (a single stage at data.img_size when none are set)."""
        stages = self.train.progressive or [ProgressiveStage(epoch=0, img_size=self.data.img_size)]
        return [s for s in stages if s.epoch <= epoch][-1]


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against (and lightly coerced to) the annotation `tp`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f'{key} must be a mapping of {[f.name for f in fields(tp)]}, got {value!r}')
        return _build(tp, value, key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{key} must be a list, got {value!r}')
        return [_convert(v, args[0], f'{key}[{i}]') for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{key} must be a list, got {value!r}')
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f'{key} must hold {len(args)} values, got {value!r}')
        item_types = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args)
        return tuple(_convert(v, t, f'{key}[{i}]') for i, (v, t) in enumerate(zip(value, item_types)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f'{key} must be a mapping, got {value!r}')
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 4e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f'{key} must be {tp.__name__}, got {value!r}')


def _build(cls, values: Dict[str, Any], prefix: str = ''):
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f'{prefix}.{key}' if prefix else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f' (did you mean {prefix + "." if prefix else ""}{close[0]}?)' if close else ''
            raise ConfigError(f'unknown config key {full!r}{hint}; known keys here: {", ".join(known)}')
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain nested dict (tuples as lists), as written back to YAML."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split('.')
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f'override {dotted!r}: {part!r} is not a section')
    node[parts[-1]] = value


def apply_overrides(tree: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'override {item!r} must look like section.key=value')
        key, raw = item.split('=', 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _packaged_root():  # an importlib.resources Traversable
    return importlib.resources.files('s4nd_vision').joinpath('configs')


def packaged_configs() -> List[str]:
    """Names of the YAML configs shipped in s4nd_vision/configs, e.g. 'imagenet/convnext_s4nd_tiny.yaml'."""
    names = []
    for folder in _packaged_root().iterdir():
        if folder.is_dir():
            names += [f'{folder.name}/{f.name}' for f in folder.iterdir() if f.name.endswith('.yaml')]
    return sorted(names)


def _read_config(path: str) -> str:
    """The text of a config file, or of a packaged config named with or without a leading 'configs/'."""
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    name = path.replace(os.sep, '/')
    name = name[len('configs/'):] if name.startswith('configs/') else name
    packaged = _packaged_root().joinpath(*name.split('/')) if name and not os.path.isabs(path) else None
    if packaged is not None and packaged.is_file():
        return packaged.read_text()
    raise ConfigError(f'config file not found: {path} (neither a file nor a packaged config; '
                      f'packaged: {", ".join(packaged_configs())})')


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply overrides, build and validate it.

    `path` is a YAML file, or the name of a config shipped in the package (`packaged_configs()`), such as
    `imagenet/convnext_s4nd_tiny.yaml`, optionally as `configs/imagenet/convnext_s4nd_tiny.yaml`; an existing
    file of that name wins.
    """
    tree: Dict[str, Any] = {}
    if path is not None:
        tree = yaml.safe_load(_read_config(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f'{path} must hold a mapping of sections, got {type(tree).__name__}')
    apply_overrides(tree, overrides)
    return _build(Config, tree).validate()
