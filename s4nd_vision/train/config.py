"""Training configuration: typed sections loaded from YAML, validated on load.

A config file holds the sections below (every key optional except `model.name` and the data
location); an unknown or mistyped key, a value of the wrong type or out of range is a
`ConfigError` naming the key, on one line (so is malformed YAML). Command-line overrides use
dotted keys: `optim.lr=1e-3`, `train.epochs=5`, `data.root=/data/imagenet` (values are parsed as
YAML). Beyond types and ranges: every float must be finite; `optim.opt` (and what it takes of `optim.betas`
and `optim.eps`, which are the optimizer's own when null), `aug.auto_augment` and `data.interpolation` are
checked against timm's own registry and parsers; the model is built on
the meta device (no memory) to check `model.name`, `model.kwargs` and that `data.img_size` and
every progressive stage are at least the model's smallest input.

Video (`data.dataset: hmdb51`) reads clips of `data.clip_duration` seconds subsampled to
`data.num_frames` frames; of the augmentation keys, `aug.auto_augment` (RandAugment
as `rand-m<magnitude 0-10, as timm's>[-n<ops>]`), `aug.no_aug`, `aug.smoothing` and Mixup/CutMix apply
to clips, and the image-only ones (`aug.scale`, `aug.hflip`, `aug.color_jitter`, `aug.reprob`, `aug.remode`,
`aug.repeated_aug`) must keep their defaults.
"""
import dataclasses
import difflib
import importlib.resources
import inspect
import math
import os
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from ..utils.model_spec import closest_model_hint
from ..utils.yaml12 import load_yaml

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
    # eval centre crop (hmdb51: every crop, after a short-side resize to img_size / crop_pct); None: the model's
    # pretrained cfg, as eval-resolution and timm's validate.py take it for the same weights
    crop_pct: Optional[float] = None
    # resizing (clips: also RandAugment's affine ops, bilinear for bicubic); None: the model's pretrained cfg
    interpolation: Optional[str] = None
    mean: Optional[Tuple[float, ...]] = None  # None: the model's pretrained cfg
    std: Optional[Tuple[float, ...]] = None
    in_chans: int = 3
    # hmdb51 only
    split_dir: Optional[str] = None  # the official split files <class>_test_split<1|2|3>.txt (None: root)
    split: int = 1  # official split 1, 2 or 3 (train and test videos)
    num_frames: int = 16  # frames per clip, subsampled uniformly: the video models' time reference grid
    clip_duration: float = 2.0  # seconds per clip (training: one random clip per video and epoch)
    clips_per_video: int = 1  # evenly spaced test clips per video; their softmax is averaged per video


# the keys that name files or folders: (section, key)
_PATH_KEYS = (('data', 'root'), ('data', 'split_dir'), ('model', 'pretrained_file'), ('train', 'output_dir'))

# data keys read by some datasets only (root: MNIST-5k is built in), as the dataclass notes them: the others refuse a
# value other than the default (data.root with data.dataset mnist trained on the built-in digits, not on that folder)
_DATASET_KEYS = {'root': ('imagefolder', 'hmdb51'), 'train_split': ('imagefolder',), 'val_split': ('imagefolder',),
                 **{key: ('hmdb51',)
                    for key in ('split_dir', 'split', 'num_frames', 'clip_duration', 'clips_per_video')}}

# the settings of the image-folder data's training transform (clips take auto_augment as their RandAugment)
_IMAGE_AUG = ('auto_augment', 'scale', 'hflip', 'color_jitter', 'reprob', 'remode')


@dataclass
class AugConfig:
    auto_augment: Optional[str] = None  # timm policy string, e.g. rand-m9-mstd0.5-inc1
    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.4
    reprob: float = 0.0  # random erasing probability
    remode: str = 'pixel'  # random erasing fill: 'pixel' (per-pixel normal, timm's train.py default), 'rand', 'const'
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.0  # label smoothing
    # DeiT's repeated augmentation (0 = off; DeiT uses 3): each drawn image this many times, differently augmented,
    # spread over the processes; on one process in the same batch, so the global batch is the same at any count.
    # As in DeiT (timm's RepeatAugSampler), an epoch keeps its number of draws: 1 / repeated_aug of the images,
    # the draws rounded down to a multiple of 256 (a dataset of fewer than 256 images: all of them, rounded up to a
    # multiple of the processes)
    repeated_aug: int = 0
    no_aug: bool = False  # training resizes and centre crops as evaluation does (small demos)

    def video_randaugment(self) -> Optional[Tuple[int, int]]:
        """(num_ops, magnitude 0-10) of RandAugment for clips from `auto_augment` (None: off); the magnitude is
        timm's and pytorchvideo's (10: the strongest), as `rand-m9` means for images."""
        if self.auto_augment is None:
            return None
        match = re.fullmatch(r'rand-m(\d+)(?:-n(\d+))?', self.auto_augment)
        if match is None or int(match.group(1)) > 10 or match.group(2) == '0':
            raise ConfigError(
                "aug.auto_augment must be null or 'rand-m<magnitude 0-10>[-n<ops>]' for video (RandAugment, the "
                f'same for every frame of a clip, magnitudes as timm\'s), got {self.auto_augment!r}')
        return int(match.group(2) or 2), int(match.group(1))


@dataclass
class OptimConfig:
    opt: str = 'adamw'
    lr: float = 1e-3  # at a global batch of lr_base_batch; scaled linearly to the real global batch
    lr_base_batch: Optional[int] = None  # None: lr is used as given
    weight_decay: float = 0.05
    ssm_lr: Optional[float] = None  # SSM parameters (A, B, dt) and SGConv weights; scaled like lr; None = lr
    ssm_weight_decay: float = 0.0
    layer_decay: Optional[float] = None  # layer-wise lr decay
    # null: the optimizer's own (timm's train.py passes them only when given; AdamW's are (0.9, 0.999) and 1e-8)
    betas: Optional[Tuple[float, ...]] = None
    eps: Optional[float] = None
    clip_grad: Optional[float] = None  # max gradient norm


@dataclass
class SchedConfig:
    sched: str = 'cosine'  # timm scheduler stepped per update: cosine, tanh or poly
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    decay_rate: float = 0.1  # poly: the power of the decay (timm's decay_rate, its train.py's default); 1: linear


@dataclass
class ProgressiveStage:
    epoch: int = 0  # first epoch of the stage
    # training resolution in this stage: required (a default, e.g. timm's 224, would silently train at another size
    # than data.img_size where a stage only changes the band-limit)
    img_size: Optional[int] = None
    # S4ND band-limit from this stage on (0: off; None: keep the one in force, the model's own or an earlier stage's)
    bandlimit: Optional[float] = None


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
    # the trackers' project (W&B project, MLflow experiment, ...), in which each run is named as its output_dir
    tracker_project: str = 's4nd_vision'
    # model and batches in channels-last memory (channels_last_3d for clips), as GPU training usually runs (timm's
    # --channels-last); the S4ND layers read it without transposing copies
    channels_last: bool = False
    # optimizer updates in a row with a non-finite loss or gradient (each skipped) tolerated before the run stops
    # with an error; 0 = stop at the first
    max_nonfinite_steps: int = 3


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

        # a leading ~ is the home folder, as the shell would make it of a separate argument: it leaves the `~` of
        # `data.root=~/imagenet` as is (`data.root` is no shell variable name), and the run wrote to ./~/...
        for section, key in _PATH_KEYS:
            path = getattr(getattr(self, section), key)
            if isinstance(path, str) and path.startswith('~'):
                setattr(getattr(self, section), key, os.path.expanduser(path))
        need(bool(self.model.name), 'model.name', 'a timm model name', self.model.name)
        need(self.data.dataset in ('imagefolder', 'mnist', 'hmdb51'), 'data.dataset',
             "'imagefolder', 'mnist' or 'hmdb51'", self.data.dataset)
        if self.data.dataset == 'imagefolder':
            need(self.data.root is not None, 'data.root', 'the dataset folder (with train/ and val/)', self.data.root)
            need(os.path.isdir(self.data.root), 'data.root', 'an existing folder', self.data.root)
        for key, datasets in _DATASET_KEYS.items():
            if self.data.dataset in datasets:
                continue
            default = getattr(DataConfig(), key)
            # (MNIST's note for MNIST only: said to hmdb51 or imagefolder, it explained nothing)
            built_in = '; mnist is built in' if self.data.dataset == 'mnist' else ''
            need(getattr(self.data, key) == default, f'data.{key}',
                 f'left at {"null" if default is None else repr(default)} for data.dataset {self.data.dataset}, '
                 f'which does not read it (data.dataset {" and ".join(datasets)} only{built_in})',
                 getattr(self.data, key))
        if self.data.dataset in ('imagefolder', 'mnist'):  # (MNIST's gray channel, alone or repeated for RGB)
            need(self.data.in_chans in (1, 3), 'data.in_chans', '1 (images read as grayscale) or 3 (RGB) for '
                 f'data.dataset {self.data.dataset}', self.data.in_chans)
        if self.data.dataset == 'hmdb51':
            self._validate_video()
        if self.data.dataset == 'mnist':  # (digits fill their image: the same resize in training and evaluation)
            for key in _IMAGE_AUG:
                need(getattr(self.aug, key) == getattr(AugConfig(), key), f'aug.{key}',
                     f'left at {getattr(AugConfig(), key)!r} for data.dataset mnist, which applies no image '
                     f'augmentation (Mixup/CutMix and label smoothing apply)', getattr(self.aug, key))
            need(self.data.crop_pct in (None, 1.0), 'data.crop_pct', 'null or 1.0 for data.dataset mnist (a digit '
                 'fills its image: resized whole, never cropped)', self.data.crop_pct)
        if self.data.dataset == 'imagefolder' and self.aug.no_aug:  # (the training transform is the evaluation's)
            for key in _IMAGE_AUG:
                need(getattr(self.aug, key) == getattr(AugConfig(), key), f'aug.{key}',
                     f'left at {getattr(AugConfig(), key)!r} with aug.no_aug (training resizes and centre crops as '
                     f'evaluation does; Mixup/CutMix and label smoothing apply)', getattr(self.aug, key))
        for key in ('img_size', 'batch_size', 'in_chans'):
            need(getattr(self.data, key) > 0, f'data.{key}', 'positive', getattr(self.data, key))
        need(self.data.workers >= 0, 'data.workers', '>= 0', self.data.workers)
        for key in ('mean', 'std'):  # (null: the model's, fitted to data.in_chans)
            value = getattr(self.data, key)
            need(value is None or len(value) == self.data.in_chans, f'data.{key}',
                 f'null or one value per channel (data.in_chans={self.data.in_chans})', value)
        need(self.data.std is None or all(v > 0 for v in self.data.std), 'data.std', 'positive values', self.data.std)
        for key in ('drop_rate', 'drop_path_rate'):
            need(0 <= getattr(self.model, key) < 1, f'model.{key}', 'in [0, 1)', getattr(self.model, key))
        need(self.data.crop_pct is None or 0 < self.data.crop_pct <= 1, 'data.crop_pct', 'in (0, 1] or null',
             self.data.crop_pct)
        need(self.optim.lr > 0, 'optim.lr', 'positive', self.optim.lr)
        need(self.optim.eps is None or self.optim.eps > 0, 'optim.eps', 'positive or null', self.optim.eps)
        need(self.optim.ssm_lr is None or self.optim.ssm_lr > 0, 'optim.ssm_lr', 'positive or null', self.optim.ssm_lr)
        need(self.optim.lr_base_batch is None or self.optim.lr_base_batch > 0, 'optim.lr_base_batch',
             'positive or null', self.optim.lr_base_batch)
        for key in ('weight_decay', 'ssm_weight_decay'):
            need(getattr(self.optim, key) >= 0, f'optim.{key}', '>= 0', getattr(self.optim, key))
        need(self.optim.layer_decay is None or 0 < self.optim.layer_decay <= 1, 'optim.layer_decay',
             'in (0, 1] or null', self.optim.layer_decay)
        need(self.optim.clip_grad is None or self.optim.clip_grad > 0, 'optim.clip_grad', 'positive or null',
             self.optim.clip_grad)
        need(self.sched.sched in ('cosine', 'tanh', 'poly'), 'sched.sched', "'cosine', 'tanh' or 'poly'",
             self.sched.sched)
        need(self.sched.warmup_epochs >= 0, 'sched.warmup_epochs', '>= 0', self.sched.warmup_epochs)
        need(self.sched.decay_rate > 0, 'sched.decay_rate', 'positive', self.sched.decay_rate)
        need(self.train.epochs > 0, 'train.epochs', 'positive', self.train.epochs)
        need(self.sched.warmup_epochs < self.train.epochs, 'sched.warmup_epochs',
             f'less than train.epochs ({self.train.epochs}): the LR would never reach optim.lr',
             self.sched.warmup_epochs)
        for key in ('lr', 'ssm_lr'):  # (scaled to the global batch, the trainer checks them again)
            lr = getattr(self.optim, key)
            need(lr is None or self.optim.lr_base_batch is not None or self.sched.min_lr <= lr, 'sched.min_lr',
                 f'at most optim.{key} ({lr}): the schedule decays to it', self.sched.min_lr)
        need(self.train.grad_accum_steps >= 1, 'train.grad_accum_steps', '>= 1', self.train.grad_accum_steps)
        need(self.train.mixed_precision in (None, 'no', 'bf16', 'fp16'), 'train.mixed_precision',
             "one of no, bf16, fp16 or null", self.train.mixed_precision)
        from accelerate.utils import LoggerType
        trackers = [t.value for t in LoggerType]
        need(all(t in trackers for t in self.train.trackers), 'train.trackers', f'a list of {trackers}',
             self.train.trackers)
        need(isinstance(self.train.tracker_project, str) and self.train.tracker_project.strip() != '',
             'train.tracker_project', 'a non-empty name', self.train.tracker_project)
        need(self.train.ema_decay is None or 0 < self.train.ema_decay < 1, 'train.ema_decay', 'in (0, 1) or null',
             self.train.ema_decay)
        need(self.train.checkpoint_every_steps >= 0, 'train.checkpoint_every_steps', '>= 0',
             self.train.checkpoint_every_steps)
        need(self.train.keep_checkpoints >= 1, 'train.keep_checkpoints', '>= 1', self.train.keep_checkpoints)
        need(self.train.max_steps_per_epoch is None or self.train.max_steps_per_epoch > 0, 'train.max_steps_per_epoch',
             'positive or null', self.train.max_steps_per_epoch)
        need(self.train.eval_every_epochs >= 1, 'train.eval_every_epochs', '>= 1', self.train.eval_every_epochs)
        # (Accelerate's set_seed seeds NumPy too, which takes 32-bit seeds)
        need(0 <= self.train.seed < 2 ** 32, 'train.seed', 'in [0, 2**32)', self.train.seed)
        need(self.train.max_nonfinite_steps >= 0, 'train.max_nonfinite_steps', '>= 0', self.train.max_nonfinite_steps)
        for key in ('warmup_lr', 'min_lr'):
            need(getattr(self.sched, key) >= 0, f'sched.{key}', '>= 0', getattr(self.sched, key))
        need(self.aug.color_jitter >= 0, 'aug.color_jitter', '>= 0', self.aug.color_jitter)
        need(0 < self.aug.scale[0] <= self.aug.scale[1], 'aug.scale', '[min, max] with 0 < min <= max', self.aug.scale)
        _check_optimizer(self.optim)
        _check_interpolation(self.data.interpolation)
        if self.data.dataset != 'hmdb51':  # video parses it itself (video_randaugment)
            _check_auto_augment(self.aug.auto_augment)
        need(self.aug.remode in ('pixel', 'rand', 'const'), 'aug.remode', "'pixel', 'rand' or 'const'",
             self.aug.remode)
        for key in ('reprob', 'hflip', 'mixup_prob', 'mixup_switch_prob'):
            need(0 <= getattr(self.aug, key) <= 1, f'aug.{key}', 'in [0, 1]', getattr(self.aug, key))
        for key in ('mixup', 'cutmix', 'repeated_aug'):
            need(getattr(self.aug, key) >= 0, f'aug.{key}', '>= 0', getattr(self.aug, key))
        need(0 <= self.aug.smoothing < 1, 'aug.smoothing', 'in [0, 1)', self.aug.smoothing)
        if self.aug.mixup > 0 or self.aug.cutmix > 0:  # timm's Mixup pairs each sample with its mirror in the batch
            need(self.data.batch_size % 2 == 0, 'data.batch_size', 'even with aug.mixup or aug.cutmix on',
                 self.data.batch_size)
        epochs = [s.epoch for s in self.train.progressive]
        if epochs:
            need(epochs[0] == 0, 'train.progressive', 'stages starting at epoch 0', epochs)
            need(epochs == sorted(set(epochs)), 'train.progressive', 'stages in increasing epoch order', epochs)
            need(epochs[-1] < self.train.epochs, 'train.progressive',
                 f'stages starting before train.epochs ({self.train.epochs}): a later one never runs', epochs)
            for i, stage in enumerate(self.train.progressive):
                need(stage.img_size is not None, f'train.progressive[{i}].img_size',
                     "given for every stage (the stage's training size; repeat the previous stage's to change only "
                     'the band-limit)', stage.img_size)
                need(stage.img_size > 0, f'train.progressive[{i}].img_size', 'positive', stage.img_size)
                need(stage.bandlimit is None or stage.bandlimit >= 0, f'train.progressive[{i}].bandlimit',
                     "a positive cut-off, 0 for off, or null to keep the one in force (the model's own or an "
                     "earlier stage's)", stage.bandlimit)
        self._validate_model()
        return self

    def _validate_model(self) -> None:
        """model.name, model.kwargs and the resolutions against the model, built on the meta device (no memory)."""
        import timm
        import torch
        from timm.models import get_model_input_config

        from .. import models  # noqa: F401  (registers the models)
        from ..eval.resolution import check_resolutions, min_input_size
        from ..layers import set_bandlimit, sgconv_weights, ssm_parameters

        mc, data = self.model, self.data
        if not timm.is_model(mc.name):
            raise ConfigError(f'model.name {mc.name!r} is not a timm model{closest_model_hint(mc.name)}')
        if len(timm.models.get_pretrained_cfg(mc.name).input_size or ()) == 2:  # (C, L)
            raise ConfigError(f'model.name: {mc.name} is a sequence model; the trainer trains image and video '
                              'models (sequence models: s4nd-vision seq-mnist)')
        owned = dict(num_classes='the dataset', in_chans='data.in_chans', drop_rate='model.drop_rate',
                     drop_path_rate='model.drop_path_rate', pretrained='model.pretrained_file',
                     pretrained_cfg_overlay='model.pretrained_file', img_size='data.img_size',
                     num_frames='data.num_frames')
        for key, value in mc.kwargs.items():
            if value is None:  # it would silently build the model's default instead
                raise ConfigError(
                    f'model.kwargs.{key} is null, which timm.create_model drops (the model would take its default): '
                    f"remove it for the model's default, or give a value (e.g. bandlimit: 0 turns band-limiting off)")
            if key in owned:
                raise ConfigError(
                    f'model.kwargs.{key} is set by the trainer from {owned[key]}: remove it from model.kwargs')
            if not _all_finite(value):  # (e.g. ls_init_value: .nan built a model whose first step diverged)
                raise ConfigError(f'model.kwargs.{key} must hold finite numbers, got {value!r}')
        kwargs = dict(mc.kwargs, in_chans=data.in_chans, drop_rate=mc.drop_rate, drop_path_rate=mc.drop_path_rate)
        try:
            with torch.device('meta'):
                model = timm.create_model(mc.name, **kwargs)
        except (TypeError, ValueError, AssertionError, KeyError, IndexError) as e:
            what = ' '.join(f'{type(e).__name__}: {e}'.split())  # one line
            raise ConfigError(f'model.kwargs {mc.kwargs} do not build {mc.name}: {what}') from None
        except (RuntimeError, NotImplementedError):  # a model that cannot be built on the meta device:
            return  # the trainer builds it for real and reports what fails
        if (self.optim.ssm_lr is not None and not any(ssm_parameters(model)) and not any(sgconv_weights(model))
                and os.environ.get('RANK', '0') in ('', '0')):
            # (param_groups_ssm gives it to no group: it silently changed nothing. A warning, not an error: the demo
            # trains its conv twin with the S4ND model's config, as a baseline run may share a recipe. Once per run:
            # by its first process, not by each of `accelerate launch`'s / torchrun's, which set RANK)
            warnings.warn(f'optim.ssm_lr ({self.optim.ssm_lr}) applies to nothing: {mc.name} has no SSM parameters '
                          f'or SGConv sub-kernel weights (every parameter trains at optim.lr)', stacklevel=2)
        if self.train.progressive and get_model_input_config(model)['fixed_input_size']:
            raise ConfigError(
                f'train.progressive changes the training size, but {mc.name} has a fixed input size (timm\'s '
                f'fixed_input_size; for timm ViTs set model.kwargs.dynamic_img_size: true), or train without it')
        smallest = min_input_size(model)
        need_size = f'at least {smallest} (the smallest input {mc.name} takes)'
        if data.img_size < smallest:
            raise ConfigError(f'data.img_size must be {need_size}, got {data.img_size}')
        if not get_model_input_config(model)['fixed_input_size']:  # (a fixed one is built for data.img_size)
            try:  # as the stages below (e.g. a timm ViT's patch multiples): else an error at the first step
                check_resolutions([data.img_size], {mc.name: model})
            except ValueError as e:
                raise ConfigError(f'data.img_size: {e}') from None
        for i, stage in enumerate(self.train.progressive):
            if stage.img_size < smallest:
                raise ConfigError(f'train.progressive[{i}].img_size must be {need_size}, got {stage.img_size}')
            try:  # the model's own input check on a meta tensor (e.g. a ViT's patch-size multiples), not at the stage
                check_resolutions([stage.img_size], {mc.name: model})
            except ValueError as e:
                raise ConfigError(f'train.progressive[{i}].img_size: {e}') from None
            if stage.bandlimit:  # (set on the meta model: the stage would fail or set nothing when it starts)
                try:
                    band_limited = set_bandlimit(model, stage.bandlimit)
                except ValueError as e:
                    raise ConfigError(f'train.progressive[{i}].bandlimit: {e}') from None
                if not band_limited:
                    raise ConfigError(f'train.progressive[{i}].bandlimit is {stage.bandlimit}, but {mc.name} has no '
                                      f"SSM kernels ('s4d', 's4') to band-limit: leave it null")

    def _validate_video(self) -> None:
        from ..data.video import VIDEO_INTERPOLATIONS

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
        need(data.interpolation in (None,) + VIDEO_INTERPOLATIONS, 'data.interpolation',
             f'null or one of {VIDEO_INTERPOLATIONS} (torchvision resizes clips)', data.interpolation)
        defaults = AugConfig()
        for key in [k for k in _IMAGE_AUG if k != 'auto_augment'] + ['repeated_aug']:  # image-only settings
            need(getattr(aug, key) == getattr(defaults, key), f'aug.{key}',
                 f'left at {getattr(defaults, key)!r} (an image setting: clips get a short-side resize, random crop, '
                 'flip and RandAugment)', getattr(aug, key))
        aug.video_randaugment()

    def stage_at(self, epoch: int) -> ProgressiveStage:
        """The progressive-resizing stage of `epoch` (a single stage at data.img_size when none are set)."""
        stages = self.train.progressive or [ProgressiveStage(epoch=0, img_size=self.data.img_size)]
        return [s for s in stages if s.epoch <= epoch][-1]

    def bandlimit_at(self, epoch: int) -> Optional[float]:
        """The band-limit that the progressive stages put in force at `epoch`: the last one a stage up to it gives
        (0: off), or None where none does (the model keeps its own). Set at every epoch, not only where a stage gives
        one, so that a run resumed in a later stage runs the earlier stage's cut-off also where its checkpoint does not
        hold it (FSDP checkpoints leave the kernels' records out: the model is rebuilt with its own cut-off)."""
        given = [s.bandlimit for s in self.train.progressive if s.epoch <= epoch and s.bandlimit is not None]
        return given[-1] if given else None


# optim.betas and optim.eps before they became null (the optimizer's own): every config held AdamW's values, which
# the trainer passed to any optimizer (timm drops them for one that takes none)
LEGACY_OPTIM = {'betas': [0.9, 0.999], 'eps': 1e-8}


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def optimizer_default(opt: str, key: str) -> Any:
    """The default of `key` ('betas' or 'eps') of timm's optimizer `opt` (a `lookahead_` prefix allowed), betas as
    a list; None where it takes none."""
    from timm.optim import get_optimizer_info

    info = get_optimizer_info(opt.lower().split('_')[-1])
    if not (info.has_betas if key == 'betas' else info.has_eps):
        return None
    if not callable(info.opt_class):  # (named by a string, not imported: bitsandbytes', APEX's; AdamW-like defaults)
        return LEGACY_OPTIM[key]
    param = inspect.signature(info.opt_class).parameters.get(key)
    return None if param is None or param.default is param.empty else _listed(param.default)


def _check_optimizer(optim: OptimConfig) -> None:
    """optim.opt against timm's optimizer registry (a `lookahead_` prefix allowed, as timm parses it), and
    optim.betas / optim.eps against what that optimizer takes (timm would drop them, or fail on the count)."""
    from timm.optim import get_optimizer_info, list_optimizers

    names = list_optimizers()
    parts = optim.opt.lower().split('_')
    if not (len(parts) <= 2 and (len(parts) == 1 or parts[0] == 'lookahead') and parts[-1] in names):
        close = difflib.get_close_matches(parts[-1], names, n=1)
        hint = f' (did you mean {close[0]}?)' if close else ''
        raise ConfigError(f'optim.opt must be a timm optimizer (timm.optim.list_optimizers(), optionally with a '
                          f'lookahead_ prefix), got {optim.opt!r}{hint}')
    info = get_optimizer_info(parts[-1])
    if info.second_order:  # (its step reads Hessian-vector products: a backward pass with create_graph=True)
        raise ConfigError(f'optim.opt must be a first-order optimizer: {optim.opt!r} needs second-order gradients '
                          f'(backward with create_graph=True), which the trainer does not compute')
    for key, legacy in LEGACY_OPTIM.items():  # (a run's config.yaml written before: values that never applied)
        if _listed(getattr(optim, key)) == legacy and optimizer_default(optim.opt, key) is None:
            setattr(optim, key, None)
    if optim.betas is not None:
        expectation = (f'null or {info.num_betas} values in [0, 1) for optim.opt {optim.opt}' if info.has_betas else
                       f'null: optim.opt {optim.opt} takes no betas')
        if not info.has_betas or len(optim.betas) != info.num_betas or not all(0 <= b < 1 for b in optim.betas):
            raise ConfigError(f'optim.betas must be {expectation}, got {list(optim.betas)!r}')
    if optim.eps is not None and not info.has_eps:
        raise ConfigError(f'optim.eps must be null: optim.opt {optim.opt} takes no eps, got {optim.eps!r}')


def _all_finite(value: Any) -> bool:
    """Whether every float in `value` (nested lists and mappings) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    return True


def _check_interpolation(mode: Optional[str]) -> None:
    """data.interpolation: null or a mode timm's transforms know (the trainer evaluates with it too: not 'random')."""
    if mode is None:
        return
    from timm.data.transforms import str_to_interp_mode

    try:
        str_to_interp_mode(mode)
    except KeyError:
        raise ConfigError(f"data.interpolation must be null or a timm interpolation such as 'bilinear' or "
                          f"'bicubic' (used for evaluation too, so not 'random'), got {mode!r}") from None


def _check_auto_augment(policy: Optional[str]) -> None:
    """aug.auto_augment through timm's own parsers (RandAugment, AugMix, AutoAugment), as create_transform calls
    them; a section without a number, which timm's parsers skip without a word, is an error too."""
    if policy is None:
        return
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    build = (rand_augment_transform if policy.startswith('rand') else
             augment_and_mix_transform if policy.startswith('augmix') else auto_augment_transform)
    expectation = ("null or a timm policy: 'rand-m<magnitude>[-n<ops>][-mstd<std>]...', "
                   "'augmix-m<magnitude>...' or an AutoAugment policy ('original', 'v0', ...)")
    ignored = [c for c in policy.split('-')[1:] if not re.search(r'\d', c) and not (build is rand_augment_transform
                                                                                    and c.startswith('t'))]
    if ignored:
        raise ConfigError(f'aug.auto_augment must be {expectation}, got {policy!r} (timm ignores {ignored})')
    try:
        transform = build(policy, dict(translate_const=100, img_mean=(124, 116, 104)))
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(f'aug.auto_augment must be {expectation}, got {policy!r} ({e})') from None
    # timm clips each op's magnitude to its magnitude_max (10 unless `-mmax<M>`) without a word: rand-m15 trains as
    # rand-m10 (a magnitude counts to 10, as for clips, which refuse more)
    for op in getattr(transform, 'ops', ()):
        bound = getattr(op, 'magnitude_max', None) or 10
        if getattr(op, 'magnitude', 0) > bound:
            raise ConfigError(f'aug.auto_augment must have a magnitude of at most {bound} (timm clips larger ones '
                              f'to it; add -mmax<M> to raise the bound), got {policy!r}')


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
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)  # YAML 1.1 reads 4e-3 as a string
        except ValueError:
            number = None
        except OverflowError:  # (an integer beyond float's range)
            number = math.inf
        if number is not None and not math.isfinite(number):
            raise ConfigError(f'{key} must be a finite number, got {value!r}')
        if number is not None:
            return number
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    hint = ''
    if tp is str and isinstance(value, (bool, int, float)):  # (a shell's quotes do not reach YAML: `'2024'` is 2024)
        hint = f' (YAML reads it as {type(value).__name__}: quote it in YAML, on a command line as {key}="\'...\'")'
    raise ConfigError(f'{key} must be {tp.__name__}, got {value!r}{hint}')


def _build(cls, values: Dict[str, Any], prefix: str = ''):
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f'{prefix}.{key}' if prefix else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else None  # (YAML: `1:`)
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
    if len(parts) == 1 and isinstance(value, dict) and isinstance(tree.get(dotted), dict):
        # a whole section (`optim={lr: 1e-3}`) sets its keys, as `optim.lr=1e-3` does (and as Hydra merges): replaced,
        # the file's other keys of the section (optim.lr_base_batch, optim.ssm_lr, ...) would fall to the defaults
        for key, item in value.items():
            _set_dotted(tree, f'{dotted}.{key}', item)
        return
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f'override {dotted!r}: {part!r} is not a section')
    node[parts[-1]] = value


def apply_overrides(tree: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict; `section={key: value, ...}` sets
    those keys of the section and keeps its others."""
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'override {item!r} must look like section.key=value')
        key, raw = item.split('=', 1)
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f'override {item!r}: the value is not valid YAML ({_yaml_problem(e)})') from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _yaml_problem(e: 'yaml.YAMLError') -> str:
    """A YAML error on one line: the problem and where (YAML's own message spans several lines)."""
    problem = getattr(e, 'problem', None) or str(e)
    mark = getattr(e, 'problem_mark', None)
    where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
    return ' '.join(f'{problem}{where}'.split())


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
    path = os.fspath(path)  # (a pathlib.Path names a packaged config too)
    if path.startswith('~'):  # (the shell leaves the ~ of --config=~/run.yaml)
        path = os.path.expanduser(path)
    if os.path.isfile(path):
        # UTF-8, as YAML files are (with or without the byte-order mark Windows Notepad writes): the locale's
        # encoding (Windows' cp1252) turned a data.root with an accented letter into another folder's name
        with open(path, encoding='utf-8-sig') as f:
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
        try:
            tree = load_yaml(_read_config(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f'{path} is not valid YAML: {_yaml_problem(e)}') from None
        if not isinstance(tree, dict):
            raise ConfigError(f'{path} must hold a mapping of sections, got {type(tree).__name__}')
    apply_overrides(tree, overrides)
    return _build(Config, tree).validate()
