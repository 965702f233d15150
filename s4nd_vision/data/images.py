"""Image datasets and samplers for training: unreadable files skipped and counted, resumable order.

* `ImageFolderDataset`: timm's `ImageDataset` (folder layout, class map) whose samples are
  `(image, target, skipped)`: an image that fails to decode is replaced by the next readable one,
  with a warning, and `skipped` counts the replacements, so the trainer can report them (the
  count travels with the batch, so it works across worker processes and ranks).
* `EpochSeeded` + `ResumableSampler`: the random augmentation of a sample is seeded from
  (seed, epoch, index), and the sampler can start mid-epoch, so a run resumed from a checkpoint
  sees exactly the batches (and augmentations) the interrupted run would have seen, whatever the
  number of workers.
"""
import warnings
from typing import Iterator, Tuple

import torch
from PIL import Image
from timm.data import ImageDataset
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..utils.seeding import seed_all, seed_from

__all__ = ['ImageFolderDataset', 'EpochSeeded', 'ResumableSampler']


class ImageFolderDataset(ImageDataset):
    """timm's ImageDataset returning `(image, target, skipped)`; unreadable images are skipped and counted.

    Args:
        root: folder with one sub-folder per class (or a timm reader root).
        max_skips: consecutive unreadable files tolerated before giving up.
    """

    def __init__(self, root: str, split: str = 'train', transform=None, max_skips: int = 10, **kwargs):
        super().__init__(root, split=split, transform=transform, **kwargs)
        if len(self.reader) == 0:
            raise ValueError(f'no images found in {root!r} (expected <class>/<image> sub-folders)')
        self.max_skips = max_skips

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        for skipped in range(self.max_skips + 1):
            try:
                img, target = self.reader[index][:2]
                img = Image.open(img)
                img = img.convert(self.input_img_mode)  # decodes the pixels: truncated files fail here
                break
            except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for corrupt or truncated files
                warnings.warn(f'skipped unreadable image {self.reader.filename(index, absolute=True)}: {e}',
                              RuntimeWarning)
                index = (index + 1) % len(self.reader)
        else:
            raise RuntimeError(f'{self.max_skips + 1} consecutive unreadable images before index {index}')
        if self.transform is not None:
            img = self.transform(img)
        return img, target, skipped


class EpochSeeded(Dataset):
    """Indexed by `(epoch, index)`: seeds the global generators from (seed, epoch, index), then returns dataset[index]."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        seed_all(seed_from(self.seed, epoch, index))
        return self.dataset[index]


class ResumableSampler(Sampler):
    """One epoch of a distributed (or repeated-augmentation) sampler as `(epoch, index)` pairs, from sample `start` on.

    Args:
        dataset: the dataset sampled.
        epoch: the epoch whose order is produced (the order depends only on seed and epoch).
        num_replicas, rank: the process grid; each rank gets its own shard.
        seed: shuffling seed.
        start: samples of this rank's shard to skip (resuming mid-epoch).
        repeats: repeated augmentation (each sample `repeats` times, spread over ranks), 0 = off.
    """

    def __init__(
            self,
            dataset: Dataset,
            epoch: int,
            num_replicas: int = 1,
            rank: int = 0,
            seed: int = 0,
            start: int = 0,
            repeats: int = 0,
    ):
        if repeats:
            from timm.data.distributed_sampler import RepeatAugSampler
            base = RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=repeats)
            # timm seeds its permutation with the epoch alone: fold our seed in
            base.set_epoch(seed_from(seed, epoch) % 2 ** 31)
        else:
            base = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
            base.set_epoch(epoch)
        self.indices = list(base)[start:]
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((self.epoch, i) for i in self.indices)

