"""The data a trainer runs on, one class per kind of data, chosen once from `data.dataset`.

Each holds this process's training and validation sets, their transforms and loaders, the model settings the
data implies (the training grid as the S4ND kernels' reference) and the validation metrics:

* `ImageFolderData` (`imagefolder`): `<root>/<split>/<class>/<image>`, timm's training transforms.
* `Mnist5kData` (`mnist`): the built-in MNIST-5k digits, resampled to each stage's size, no crops or flips.
* `Hmdb51Data` (`hmdb51`): HMDB-51 clips `(C, T, H, W)` for video models, each process reading its own shard.

Images: the sample order of an epoch depends only on (seed, epoch) and each sample's augmentation is seeded from
(seed, epoch, index) (`ResumableSampler`, `EpochSeeded`), and the sampler can start mid-epoch, so a resumed run
sees exactly the batches the interrupted run would have seen, whatever the number of workers.
"""
import os
from functools import partial
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import gather_object, is_compiled_module
from timm.data import create_transform
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.data import DataLoader, Dataset

from ..data.images import EpochSeeded, ImageFolderDataset, ResumableSampler
from ..data.transforms import mnist_transform, model_data_config, with_posterize_any_bits
from ..eval.accuracy import topk_hits
from ..models import input_size_args
from ..utils.seeding import seed_all, seed_from
from .config import Config, ConfigError

__all__ = ['TrainData', 'ImageFolderData', 'Mnist5kData', 'Hmdb51Data', 'create_train_data']


class TrainData:
    """One kind of data for one process of a run: datasets, transforms, loaders, evaluation.

    Built before the model (which takes `num_classes`); `bind(model)` then fits the model to the data and
    resolves the data config (mean, std, crop, interpolation) from both.

    Args:
        cfg: the run's config (`data`, `aug`, `train.seed`).
        accelerator: the run's Accelerator (process grid, device, metric gathering).
    """
    unit = 'images'  # what a training sample is: metric names and messages
    rate_name = 'img_per_s'  # the training throughput's metric name
    channels_last_format = torch.channels_last  # the memory format of batches (and model) with `train.channels_last`

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.memory_format = self.channels_last_format if cfg.train.channels_last else torch.contiguous_format
        self.train_set, self.val_set, self.classes = self._datasets()
        self.num_classes = len(self.classes)
        self.data_config: Dict[str, Any] = {}
        self.val_loader: Optional[Iterable] = None

    def _datasets(self) -> Tuple[Dataset, Dataset, List[str]]:
        """(training set, validation set, class names in label order)."""
        raise NotImplementedError

    def input_size(self) -> Dict[str, Any]:
        """The training input as model arguments."""
        return dict(img_size=self.cfg.data.img_size)

    def input_size_kwargs(self, model_name: str) -> Dict[str, Any]:
        """The `timm.create_model` arguments of `model_name` for the training input ({} for models without them):
        this package's models are built for it (the S4ND kernels' reference grids)."""
        args = input_size_args(model_name)
        return {k: v for k, v in self.input_size().items() if k in args}

    def bind(self, model: nn.Module) -> None:
        """Fit `model` to the data (other timm models that take a size, e.g. ViTs, are set to the training size),
        then resolve the data config: the config's mean/std/crop/interpolation, else the model's, fitted to
        `data.in_chans` channels."""
        self._configure_model(model)
        data = self.cfg.data
        self.data_config = model_data_config(model, data.in_chans, dict(
            mean=data.mean, std=data.std, crop_pct=data.crop_pct, interpolation=data.interpolation))

    def _configure_model(self, model: nn.Module) -> None:
        if len((getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or ()) == 4:  # (C, T, H, W)
            raise ConfigError(f'model.name: {self.cfg.model.name} takes video clips (B, C, T, H, W); data.dataset '
                              f'{self.cfg.data.dataset} holds images: choose an image model, e.g. convnext_s4nd_tiny')
        if hasattr(model, 'set_input_size'):  # (a no-op for this package's models, built at the size)
            model.set_input_size(self.cfg.data.img_size)

    @property
    def num_train_samples(self) -> int:
        """Training samples (of all processes), for messages."""
        return len(self.train_set)

    @property
    def num_val_samples(self) -> int:
        """Validation samples (of all processes)."""
        return len(self.val_set)

    def fingerprint(self) -> Dict[str, Any]:
        """What every process must hold alike (compared at the run's start): a stale copy of the data on one machine
        would give it other labels, or another number of updates per epoch (a deadlock at the epoch's end)."""
        return {f'training {self.unit}': self.num_train_samples, f'validation {self.unit}': self.num_val_samples,
                'classes': self.classes}

    def samples_per_rank(self) -> int:
        """Training samples this process sees per epoch."""
        raise NotImplementedError

    def transform(self, img_size: int, training: bool):
        raise NotImplementedError

    def skipped_in_epoch(self) -> Optional[int]:
        """The unreadable training samples of the current epoch over all processes (every process calls it), where
        the data counts them exactly (None: the trainer sums the per-batch counts)."""
        return None

    def train_batches(self, epoch: int, img_size: int, start: int, stop: int) -> Iterable:
        """This process's `(x, y, skipped)` micro-batches of `epoch` at `img_size`, from micro-batch `start` on
        (resuming mid-epoch); `stop` is the epoch's number of micro-batches (the loader may yield more)."""
        raise NotImplementedError

    def prepare_evaluation(self) -> None:
        """Build the validation loader (at `data.img_size`)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """Top-1/top-5 and loss on the validation split, over all processes."""
        raise NotImplementedError

    def rebuild_kwargs(self, model_name: str, model: nn.Module) -> Dict[str, Any]:
        """The size arguments that rebuild `model` as trained, for the message on loading the exported weights:
        this package's models' (`input_size_kwargs`), or img_size for other timm models set to the training size
        (`set_input_size`, e.g. ViTs)."""
        own = self.input_size_kwargs(model_name)
        if own or not hasattr(model, 'set_input_size'):
            return own
        return dict(img_size=self.cfg.data.img_size)

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, batch_size=self.cfg.data.batch_size, num_workers=self.cfg.data.workers,
                          pin_memory=self.accelerator.device.type == 'cuda', **kwargs)


class _WithSkipCount(Dataset):
    """Adds a zero skip count to (image, target) samples of datasets that cannot fail to read."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        img, target = self.dataset[index][:2]
        return img, target, 0


def _set_transform(dataset: Dataset, transform) -> None:
    inner = dataset.dataset if isinstance(dataset, _WithSkipCount) else dataset
    inner.transform = transform


class _ImageData(TrainData):
    """Map-style image datasets of `(image, target, skipped)`: sharded by a resumable sampler, evaluated on every
    process's share of the (Accelerate-prepared) validation loader."""

    def samples_per_rank(self) -> int:
        acc = self.accelerator
        return len(ResumableSampler(
            self.train_set, 0, acc.num_processes, acc.process_index, self.cfg.train.seed,
            repeats=self.cfg.aug.repeated_aug))

    def train_batches(self, epoch: int, img_size: int, start: int, stop: int) -> DataLoader:
        acc, cfg = self.accelerator, self.cfg
        _set_transform(self.train_set, self.transform(img_size, training=True))
        sampler = ResumableSampler(
            self.train_set, epoch, acc.num_processes, acc.process_index, cfg.train.seed,
            start=start * cfg.data.batch_size, repeats=cfg.aug.repeated_aug)
        return self._loader(EpochSeeded(self.train_set, cfg.train.seed), sampler=sampler, drop_last=True,
                            persistent_workers=False)

    def prepare_evaluation(self) -> None:
        _set_transform(self.val_set, self.transform(self.cfg.data.img_size, training=False))
        self.val_loader = self.accelerator.prepare(self._loader(self.val_set, shuffle=False))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        acc = self.accelerator
        was_training = model.training
        model.eval()
        correct1, correct5, losses, skipped = [], [], [], 0
        for x, y, n_skipped in self.val_loader:
            with acc.autocast():
                logits = model(x.contiguous(memory_format=self.memory_format))
            loss = nn.functional.cross_entropy(logits.float(), y, reduction='none')
            hit = topk_hits(logits, y)
            c1, c5, loss, n_skipped = acc.gather_for_metrics((hit[:, 0], hit.any(1), loss, n_skipped))
            read = n_skipped == 0  # an unreadable image's stand-in (another image) is not scored
            correct1.append(c1[read])
            correct5.append(c5[read])
            losses.append(loss[read])
            skipped += int(n_skipped.sum())
        model.train(was_training)
        c1, c5, loss = torch.cat(correct1), torch.cat(correct5), torch.cat(losses)
        if len(loss) == 0:
            raise RuntimeError('no readable validation image: nothing to evaluate')
        # (from the counts, as eval-resolution: a float32 mean gave 64.28571343 for 9 of 14)
        return dict(top1=100 * int(c1.sum()) / len(c1), top5=100 * int(c5.sum()) / len(c5),
                    val_loss=loss.mean().item(), val_skipped_images=skipped)


class ImageFolderData(_ImageData):
    """`data.root/{data.train_split,data.val_split}/<class>/<image>`; unreadable images are skipped and counted.
    Training uses timm's transforms (random resized crop, flip, color jitter, RandAugment, random erasing); with
    `aug.no_aug` the evaluation's resize and centre crop."""

    def _datasets(self) -> Tuple[Dataset, Dataset, List[str]]:
        data = self.cfg.data
        mode = 'L' if data.in_chans == 1 else 'RGB'
        splits = []
        for split in (data.train_split, data.val_split):
            folder = os.path.join(data.root, split)
            if not os.path.isdir(folder):
                raise ConfigError(f'data.root: no {split!r} folder in {data.root!r} (expected {split}/<class>/<image>)')
            splits.append(ImageFolderDataset(folder, input_img_mode=mode))
        train, val = splits
        classes = train.reader.class_to_idx
        only_val = sorted(set(val.reader.class_to_idx) - set(classes))
        if only_val:
            raise ConfigError(f'data.root: {data.val_split!r} holds images of classes {data.train_split!r} has none '
                              f'of: {only_val[:5]}')
        if val.reader.class_to_idx != classes:  # (a class without validation images: the training classes' numbers)
            val = ImageFolderDataset(os.path.join(data.root, data.val_split), input_img_mode=mode, class_map=classes)
        return train, val, sorted(classes, key=classes.get)

    def transform(self, img_size: int, training: bool):
        data, aug, dc = self.cfg.data, self.cfg.aug, self.data_config
        common = dict(interpolation=dc['interpolation'], mean=dc['mean'], std=dc['std'])
        if not training or aug.no_aug:  # (no_aug: what evaluation sees, as for clips; timm's squashed the whole image)
            return create_transform(
                (data.in_chans, img_size, img_size), is_training=False, crop_pct=dc['crop_pct'],
                crop_mode=dc.get('crop_mode', 'center'), **common)
        return with_posterize_any_bits(create_transform(
            (data.in_chans, img_size, img_size), is_training=True, scale=aug.scale,
            hflip=aug.hflip, color_jitter=aug.color_jitter, auto_augment=aug.auto_augment, re_prob=aug.reprob,
            re_mode=aug.remode, **common))


class Mnist5kData(_ImageData):
    """The built-in MNIST-5k (4,000 training and 1,000 validation digits), kept as 28 px tensors and resampled to
    each stage's size (`mnist_transform`, the same for training and evaluation: no crop, so the data config, which
    the exported cfg states, says crop_pct 1.0)."""

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.data_config['crop_pct'] = 1.0

    def _datasets(self) -> Tuple[Dataset, Dataset, List[str]]:
        from ..data.mnist import MNIST5k
        chans = self.cfg.data.in_chans
        train = MNIST5k('train', img_size=28, in_chans=chans)
        val = MNIST5k('val', img_size=28, in_chans=chans)
        return _WithSkipCount(train), _WithSkipCount(val), [str(digit) for digit in range(10)]

    def transform(self, img_size: int, training: bool):
        return mnist_transform(img_size, self.data_config)


class Hmdb51Data(TrainData):
    """HMDB-51 clips `(C, data.num_frames, H, W)` through `Hmdb51Clips`, for video models.

    Each process reads its own shard of the videos (`Hmdb51Clips(num_shards=num_processes, shard_id=rank)`;
    Accelerate does not shard an iterable dataset, which would make every rank decode every video). Every rank
    runs exactly the epoch's number of micro-batches, computed from the shard size: a rank left short of clips by
    unreadable videos starts another pass over its shard, so DDP never waits on a rank that ran out. Each batch's
    random clips and augmentation are seeded from (seed, epoch, rank, batch) (with `data.workers > 0`, the
    workers' generators from (seed, epoch, rank)), so resuming at an epoch boundary (with the same
    `data.workers`) repeats the uninterrupted run exactly. An iterable dataset cannot seek: a mid-epoch resume
    decodes and discards the batches this rank had already trained on in that epoch, then continues with the
    same batches, so it too repeats the uninterrupted run (at the cost of decoding up to an epoch of clips).

    Evaluation scores `data.clips_per_video` clips per test video on each rank's shard (the ranks in step: under
    FSDP every forward is a collective), gathers the scores, counts videos repeated to even out the shards once, and
    reports clip top-1 and video top-1/top-5 (the mean softmax of a video's clips); a video with an unreadable clip
    is skipped whole.
    """
    unit = 'videos'
    rate_name = 'clips_per_s'
    channels_last_format = torch.channels_last_3d

    def _datasets(self) -> Tuple[Dataset, Dataset, List[str]]:
        from ..data.video import Hmdb51Clips  # pytorchvideo is heavy: imported for video only
        data, acc = self.cfg.data, self.accelerator
        common = dict(video_dir=data.root, split_dir=data.split_dir, split_id=data.split,
                      clip_duration=data.clip_duration, num_shards=acc.num_processes, shard_id=acc.process_index,
                      seed=self.cfg.train.seed)
        try:
            train = Hmdb51Clips(split='train', **common)
            val = Hmdb51Clips(split='test', clips_per_video=data.clips_per_video, with_video_index=True, **common)
        except (OSError, ValueError) as e:
            raise ConfigError(f'data.root / data.split_dir (HMDB-51): {e}') from None
        return train, val, list(train.classes)

    def _configure_model(self, model: nn.Module) -> None:
        # the training clip is the kernels' reference, in time too
        if len(model.pretrained_cfg.get('input_size', ())) != 4:  # video models state (C, T, H, W)
            raise ConfigError(f'model.name: {self.cfg.model.name} takes images; data.dataset hmdb51 needs a video '
                              'model taking (B, C, T, H, W) clips, e.g. convnext_s4nd_3d_tiny')
        model.set_input_size(self.cfg.data.img_size, num_frames=self.cfg.data.num_frames)  # (built at it)

    @property
    def num_train_samples(self) -> int:
        return self.train_set.num_videos

    @property
    def num_val_samples(self) -> int:
        return self.val_set.num_videos

    def samples_per_rank(self) -> int:
        return len(self.train_set)  # this rank's shard already; every shard holds as many videos

    def skipped_in_epoch(self) -> Optional[int]:
        # a video skipped after a worker's last clip has no clip to carry its count in the batches; one repeated
        # to even out the shards is counted by both
        return len(set().union(*gather_object([self.train_set.unreadable_videos()])))

    def transform(self, img_size: int, training: bool):
        from ..data.video import VideoTransform
        data, aug, dc = self.cfg.data, self.cfg.aug, self.data_config
        randaugment = aug.video_randaugment()
        ops, magnitude = randaugment if randaugment else (2, None)
        return VideoTransform(
            train=training and not aug.no_aug, num_frames=data.num_frames, img_size=img_size,
            crop_pct=dc['crop_pct'], randaugment_ops=ops, randaugment_magnitude=magnitude, mean=dc['mean'],
            std=dc['std'], interpolation=dc['interpolation'])

    def train_batches(self, epoch: int, img_size: int, start: int, stop: int) -> Iterator[Tuple[torch.Tensor, ...]]:
        _set_transform(self.train_set, self.transform(img_size, training=True))
        return self._batches(epoch, start, stop)

    def _batches(self, epoch: int, start: int, stop: int) -> Iterator[Tuple[torch.Tensor, ...]]:
        """Micro-batches `start`..`stop` of `epoch`'s clips, whatever was skipped (another pass over the shard when
        it runs short); the first `start` are decoded and discarded.

        A loader of an iterable dataset batches each worker's clips apart: the partial batch that ends each
        worker's share is kept and merged with the others into full batches (`_full_batches`), so that with
        `data.workers > 0` every video of the epoch is seen and the epoch does not run short into a second pass."""
        acc, cfg = self.accelerator, self.cfg
        self.train_set.set_epoch(epoch)
        seed = partial(seed_from, cfg.train.seed, 'video', epoch, acc.process_index)
        loader = self._loader(self.train_set, generator=torch.Generator().manual_seed(seed('workers')))
        micro = 0
        while micro < stop:
            batches, first = _full_batches(iter(loader), cfg.data.batch_size), micro
            while micro < stop:
                seed_all(seed(micro))  # data.workers=0: the clips and augmentation of each batch from its own seed
                batch = next(batches, None)
                if batch is None:
                    break
                if micro >= start:
                    yield batch
                micro += 1
            if micro == first:
                raise RuntimeError(f'process {acc.process_index}: fewer readable training clips than data.batch_size '
                                   f'in its {len(self.train_set)} videos')

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        from ..data.video import video_worker_context
        if self.cfg.data.workers > 0:  # (a forked worker can hang in decoding)
            kwargs['multiprocessing_context'] = video_worker_context()
        return super()._loader(dataset, **kwargs)

    def prepare_evaluation(self) -> None:
        _set_transform(self.val_set, self.transform(self.cfg.data.img_size, training=False))
        self.val_loader = self._loader(self.val_set, shuffle=False)  # sharded by Hmdb51Clips, not Accelerate
        self._evaluations = 0  # (each evaluation counts its unreadable videos as an epoch of the test split)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """Video top-1/top-5 (the mean softmax of a video's clips), clip top-1 and loss on the test split.

        Ranks score their shards, then gather the scores; a video repeated to even out the shards counts once (the
        copy of the lowest rank). Unreadable videos can leave the shards with different numbers of batches, and
        under FSDP every forward is a collective (the parameters are gathered): the ranks step through the batches
        together, and one that has run out forwards a blank clip (not scored) until none has a batch left; without
        that, its gathering of the scores met the others' forwards: a hang until the timeout (NCCL) or a
        "collective mismatch" crash (gloo). DDP's wrapper is removed (its forward is not needed to evaluate); FSDP1's
        is kept (its root unit gathers the parameters it holds). A compiled model (`--dynamo_backend`) is evaluated
        as it is: its forward calls the wrapper it compiled, and `unwrap_model` would put the bare module in that
        wrapper's place inside it, in the model being trained (FSDP1's: a module of local shards).
        """
        acc = self.accelerator
        if not isinstance(model, FullyShardedDataParallel) and not is_compiled_module(model):
            model = acc.unwrap_model(model)
        was_training = model.training
        model.eval()
        logits, labels, videos = [torch.empty(0, self.num_classes)], [torch.empty(0, dtype=torch.long)], []
        self._evaluations += 1
        self.val_set.set_epoch(self._evaluations)  # (no shuffling: the same order)
        data = self.cfg.data
        blank = torch.zeros(1, data.in_chans, data.num_frames, data.img_size, data.img_size, device=acc.device)
        batches = iter(self.val_loader)
        while True:
            batch = next(batches, None)
            if acc.num_processes > 1:  # (one small all-reduce per batch)
                if int(acc.reduce(torch.tensor([batch is not None], device=acc.device, dtype=torch.int32))) == 0:
                    break
            elif batch is None:
                break
            x = blank if batch is None else batch[0].to(acc.device)
            with acc.autocast():
                out = model(x.contiguous(memory_format=self.memory_format)).float().cpu()
            if batch is not None:
                logits.append(out)
                labels.append(batch[1])
                videos += batch[3].tolist()
        model.train(was_training)
        # unreadable videos from the shards' records, not the per-clip counts: one after a shard's last clip has no
        # clip to carry its count
        shards = gather_object([(torch.cat(logits), torch.cat(labels), videos, self.val_set.unreadable_videos())])
        unreadable = set().union(*(shard[3] for shard in shards))
        # a video whose frames end before its stated duration yields its first clips, then is skipped: not scored
        # on those (a video is scored on all its clips or counted skipped, never both)
        seen, keep = set(unreadable), []
        for shard_logits, shard_labels, shard_videos, _ in shards:
            first = torch.tensor([v not in seen for v in shard_videos], dtype=torch.bool)
            keep.append((shard_logits[first], shard_labels[first], torch.tensor(shard_videos, dtype=torch.long)[first]))
            seen.update(shard_videos)
        logits, labels, videos = (torch.cat(t) for t in zip(*keep))
        if len(labels) == 0:
            raise RuntimeError('no readable test video: nothing to evaluate')
        ids, video_of_clip = torch.unique(videos, return_inverse=True)
        # summed softmax per video (ranks classes as the mean does) and each video's label
        scores = torch.zeros(len(ids), self.num_classes).index_add_(0, video_of_clip, logits.softmax(1))
        video_labels = torch.zeros(len(ids), dtype=torch.long).scatter_(0, video_of_clip, labels)
        hit = topk_hits(scores, video_labels)
        return dict(
            top1=100 * int(hit[:, 0].sum()) / len(hit), top5=100 * int(hit.any(1).sum()) / len(hit),
            clip_top1=100 * int(topk_hits(logits, labels, k=1).sum()) / len(labels),  # (a NaN clip: no hit)
            val_loss=nn.functional.cross_entropy(logits, labels).item(), val_videos=len(ids),
            val_skipped_videos=len(unreadable))

    def input_size(self) -> Dict[str, Any]:
        return dict(img_size=self.cfg.data.img_size, num_frames=self.cfg.data.num_frames)


def _full_batches(batches: Iterator[List[torch.Tensor]], size: int) -> Iterator[List[torch.Tensor]]:
    """The batches of `size` samples as they come, and the smaller ones (the end of a worker's share) merged in
    order into batches of `size`; a remainder smaller than `size` is dropped."""
    parts: List[List[torch.Tensor]] = []
    for batch in batches:
        if len(batch[0]) == size:
            yield batch
            continue
        parts.append(batch)
        if sum(len(p[0]) for p in parts) >= size:
            merged = [torch.cat(fields) for fields in zip(*parts)]
            yield [t[:size] for t in merged]
            parts = [[t[size:] for t in merged]] if len(merged[0]) > size else []


_KINDS = {'imagefolder': ImageFolderData, 'mnist': Mnist5kData, 'hmdb51': Hmdb51Data}


def create_train_data(cfg: Config, accelerator: Accelerator) -> TrainData:
    """The `TrainData` of `cfg.data.dataset` (validated by the config: 'imagefolder', 'mnist' or 'hmdb51')."""
    return _KINDS[cfg.data.dataset](cfg, accelerator)
