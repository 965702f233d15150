"""Image datasets and samplers for training: unreadable files skipped and counted, resumable order.

* `ImageFolderDataset`: timm's `ImageDataset` (folder layout, class map) whose samples are `(image, target,
  skipped)`. An image that fails to decode is replaced by a random other image (drawn from a generator seeded by the
  sample, so the replacement is deterministic and the sample distribution stays that of the readable images), with a
  warning; `skipped` is 1 when the drawn file itself was unreadable, so each unreadable file drawn in an epoch
  counts once (the count travels with the batch, so it works across worker processes and ranks). 16-bit grayscale
  PNG images are scaled to 8 bits (PIL's conversion would clip them to white). timm's reader lists .png, .jpg and
  .jpeg files only: other images PIL reads (.webp, .bmp, .tif, ...) are counted in a warning, and a class folder of
  them only is refused (the class would vanish). A folder reached twice through symbolic links (a link loop, which
  timm's reader would follow again and again) is refused with an error naming the link. The folder must be
  `<class>/<image>`: timm's reader labels an image by its innermost folder, so images in sub-folders
  (`cat/2019/x.png`) or beside the class folders would silently form or merge classes (also under a class map); both
  are refused, and so are hidden folders ('.ipynb_checkpoints', '__MACOSX'), which would become classes, hidden
  image files (macOS' AppleDouble '._x.png', which timm lists and no image reader reads), and class
  names that timm's natural order cannot tell apart ('cat' and 'Cat', '1' and '01'), which processes would number
  differently (unless a class map numbers them). Image files are ordered as timm orders them, their exact paths
  breaking its ties, so sample i is the same file on every machine.
* `EpochSeeded` + `ResumableSampler`: the random augmentation of a sample is seeded from
  (seed, epoch, index) (and the repeat, under repeated augmentation), and the sampler can start
  mid-epoch, so a run resumed from a checkpoint sees exactly the batches (and augmentations) the
  interrupted run would have seen, whatever the number of workers.
"""
import os
import random
import warnings
from collections import Counter
from typing import Dict, Iterator, Tuple

import numpy as np
import torch
from PIL import Image, ImageFile
from timm.data import ImageDataset, get_img_extensions
from timm.data.readers.reader_image_folder import ReaderImageFolder, natural_key
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..utils.seeding import seed_all, seed_from

__all__ = ['ImageFolderDataset', 'EpochSeeded', 'ResumableSampler', 'open_image', 'check_folder_links',
           'check_class_folders', 'is_hidden', 'folder_class_to_idx']

# images PIL reads in files that timm's reader does not list (check_folder_links counts them)
_OTHER_IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jfif', '.jpe', '.pbm', '.pgm', '.pnm', '.ppm', '.tif', '.tiff', '.webp')
_16BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')  # PIL's modes of 16-bit grayscale files ('I': PGM)


def open_image(fp, mode: str = 'RGB') -> Image.Image:
    """The image file `fp` decoded and converted to `mode`; 16-bit grayscale scaled to 8 bits first.

    PIL converts 16-bit grayscale ('I;16', and 'I' for PGM, which PIL scales to 0-65535) to 8 bits
    by clipping at 255, which turns almost every pixel white: here the high byte is kept instead, the same
    mapping for every image (a choice by each image's values would scale a dark image 256 times brighter than a
    bright one). Data of 12 bits or fewer in 16-bit files (every value below 4096) therefore keeps 4 bits or fewer
    (8-bit data comes out black): warned about.
    Raises OSError / ValueError for files that cannot be decoded (or values outside 16 bits).
    """
    img = Image.open(fp)
    if img.mode in _16BIT_MODES:
        pixels = np.asarray(img).astype(np.int64)  # decodes the pixels
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ValueError(f'{img.mode} image with values outside 0..65535 ({pixels.min()}..{pixels.max()}): '
                             'cannot scale it to 8 bits')
        bits = int(pixels.max()).bit_length() if pixels.size else 0
        if 0 < bits <= 12:  # (8- to 12-bit data, e.g. microscopy and X-ray exports, stored in a 16-bit file)
            kept = ('no bits: it comes out black' if bits <= 8
                    else f'{bits - 8} bits ({2 ** (bits - 8)} gray levels): it comes out nearly black')
            warnings.warn(f'a 16-bit image holds only values below {2 ** bits} ({bits}-bit data in a 16-bit file?): '
                          f'scaled from 16 bits by its high byte, it keeps {kept}; rescale such files to the full '
                          '16 bits, or convert them to 8 bits', RuntimeWarning)
        img = Image.fromarray((pixels >> 8).astype(np.uint8), mode='L')
    elif img.mode == 'F':  # float images have no fixed range to scale from
        raise ValueError('floating-point image (mode F): no fixed range to scale to 8 bits')
    return img.convert(mode)  # decodes the pixels: truncated files fail here


def check_folder_links(root: str) -> None:
    """Raise ValueError when a folder under `root` is reached twice through symbolic links, or when a folder without
    sub-folders (a class folder) holds images of kinds timm's reader leaves out and none it lists; warn about images
    of those kinds elsewhere.

    timm's reader walks the tree following links: a link to a folder above it (a loop) lists the
    files below that folder again at every level until the OS gives up, and two links to one
    folder list its files twice. Both would multiply the dataset silently. It lists only the extensions of
    `timm.data.get_img_extensions` (.png, .jpg, .jpeg): images in other files that PIL reads (.webp, .bmp, .tif,
    ...) would be left out without a word, and a class of them would vanish.
    """
    seen, listed, unlisted, example = {}, get_img_extensions(as_set=True), Counter(), None
    for path, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(path)
        if real in seen:
            first = seen[real]
            kind = ('a symlink loop' if path.startswith(first.rstrip(os.sep) + os.sep)
                    else 'the same folder reached twice through symbolic links')
            raise ValueError(
                f'{kind} under {root!r}: {path!r} is {first!r} ({real}); its images would be listed more than '
                'once: remove the link')
        seen[real] = path
        names = [f for f in files if not f.startswith('.')]  # (not macOS' AppleDouble `._<name>`)
        kinds = [os.path.splitext(f)[1].lower() for f in names]
        others = [f for f, ext in zip(names, kinds) if ext in _OTHER_IMAGE_EXTENSIONS and ext not in listed]
        if others:
            other_kinds = Counter(os.path.splitext(f)[1].lower() for f in others)
            if not dirs and not listed.intersection(kinds):
                raise ValueError(f'folder {path!r} holds {len(others)} images of kinds timm\'s reader leaves out '
                                 f'({", ".join(sorted(other_kinds))}) and none of those it lists '
                                 f'({", ".join(sorted(listed))}): its class would vanish: convert them to .png or .jpg')
            unlisted.update(other_kinds)
            example = example or os.path.join(path, min(others))
    if unlisted:
        warnings.warn(f'{unlisted.total()} images under {root!r} are of kinds timm\'s reader leaves out '
                      f'({", ".join(sorted(unlisted))}; e.g. {example!r}): they are not used; convert them to .png or '
                      '.jpg to use them', RuntimeWarning)


def is_hidden(name: str) -> bool:
    """Whether folder `name` is no class: hidden ('.ipynb_checkpoints', which the video data leaves out too) or
    the metadata folder of a zip made on macOS ('__MACOSX')."""
    return name.startswith('.') or name == '__MACOSX'


def check_class_folders(root: str, samples, class_to_idx=None) -> None:
    """ValueError unless every image of `samples` is `root/<class>/<image>`, no class folder (`is_hidden`) or image
    file ('._x.png', macOS' metadata) is hidden and, where timm numbers the classes (`class_to_idx` given: no class
    map), its order of them is total (`natural_key` ignores case and leading zeros; ties fall to set order, which
    differs between processes)."""
    prefix = os.path.join(root, '')
    for path, _ in samples:  # (timm's paths start with root as given: a slice, not relpath, for a million images)
        rest = path[len(prefix):] if path.startswith(prefix) else os.path.normpath(os.path.relpath(path, root))
        top = rest.split(os.sep, 1)[0]
        if is_hidden(top):
            raise ValueError(f'{path!r} is in {top!r} of {root!r}, a hidden folder (or macOS archive metadata), which '
                             'timm\'s reader would make a class, shifting the labels of the others: remove it, or '
                             'move it out')
        name = rest.rsplit(os.sep, 1)[-1]
        if name.startswith('.'):  # (timm's reader lists them by their extension alone)
            raise ValueError(f'{path!r} under {root!r} is a hidden file (macOS\' AppleDouble metadata `._<name>`, '
                             'not an image, where a copy from a Mac left them beside every image): it would be '
                             'skipped as unreadable each time it is drawn, and where many are, a sample and its random '
                             f'replacements all unreadable end the run: remove such files (find {root} -name \'._*\' '
                             '-delete)')
        depth = rest.count(os.sep) + 1
        if depth != 2:
            where = 'beside the class folders' if depth == 1 else 'in a sub-folder of a class folder'
            raise ValueError(f'{path!r} is {where} of {root!r}: expected <class>/<image> (timm labels an image by its '
                             f'innermost folder, so it would form or merge a class): move it, or remove it')
    keys = {}
    for name in class_to_idx or ():
        other = keys.setdefault(tuple(natural_key(name)), name)
        if other != name:
            raise ValueError(f'class folders {other!r} and {name!r} of {root!r} sort as equal in timm\'s order (case '
                             'and leading zeros ignored), so processes could number them differently: rename one')


def folder_class_to_idx(root: str) -> Dict[str, int]:
    """The class numbers timm's reader (and so the trainer) gives the `<class>/<image>` folder `root`, without
    listing its images: the sub-folders holding a file of a kind the reader lists, in timm's order.

    One directory read per class, stopped at its first image (ImageNet's training split: 1,000 short reads, not
    1.28M files walked). A folder whose images are only in sub-folders is no class here; the trainer refuses such
    a layout. Class names timm's order cannot tell apart are refused (`check_class_folders`).
    """
    listed = get_img_extensions(as_set=True)
    names = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir():  # (follows links, as the reader's walk)
                with os.scandir(entry.path) as files:  # (files as os.walk takes them: whatever is not a folder)
                    if any(os.path.splitext(f.name)[1].lower() in listed and not f.is_dir() for f in files):
                        names.append(entry.name)
    class_to_idx = {name: i for i, name in enumerate(sorted(names, key=natural_key))}
    check_class_folders(root, [], class_to_idx)
    return class_to_idx


class ImageFolderDataset(ImageDataset):
    """timm's ImageDataset returning `(image, target, skipped)`; unreadable images are replaced and counted.

    Args:
        root: folder with one sub-folder per class (or a timm reader root).
        max_skips: unreadable replacements tolerated for one sample before giving up.

    PIL's `Image.MAX_IMAGE_PIXELS` and `ImageFile.LOAD_TRUNCATED_IMAGES` of the process that pickles it (a DataLoader
    starting workers by spawn) apply in the process that unpickles it.
    """

    def __init__(self, root: str, split: str = 'train', transform=None, max_skips: int = 10, **kwargs):
        for key in ('load_bytes', 'additional_features'):  # (samples here are decoded images with a skip count)
            if kwargs.get(key):
                raise ValueError(f'{key} is not supported by ImageFolderDataset (samples are (image, target, '
                                 f'skipped)): use timm\'s ImageDataset')
        folder = kwargs.get('reader') in (None, '') and os.path.isdir(root)
        if folder:
            check_folder_links(root)  # before timm's reader walks (and multiplies) a loop
        super().__init__(root, split=split, transform=transform, **kwargs)
        if isinstance(self.reader, ReaderImageFolder):
            # timm sorts by natural_key alone (case and leading zeros ignored) and keeps the directory listing's order
            # for ties ('x1.png', 'x01.png'), which differs between machines: the exact path breaks them (a stable
            # sort, so the order of files without a tie stays timm's)
            self.reader.samples.sort(key=lambda sample: (natural_key(sample[0]), sample[0]))
        if len(self.reader) == 0:
            raise ValueError(f'no images found in {root!r} (expected <class>/<image> sub-folders)')
        if folder:  # (a class map numbers the classes itself: their order is not timm's)
            mapped = kwargs.get('class_map') not in (None, '')
            check_class_folders(root, self.reader.samples, None if mapped else self.reader.class_to_idx)
        self.max_skips = max_skips

    def __getstate__(self):
        # PIL's process-wide settings travel with the dataset to the DataLoader workers that start by spawn (macOS'
        # and Windows' default) and import PIL afresh: a limit raised for genuinely large images
        # (`Image.MAX_IMAGE_PIXELS`), or truncated files accepted (`ImageFile.LOAD_TRUNCATED_IMAGES`), in a script's
        # main guard or a notebook applied in the main process alone, so the workers skipped those images
        return {**self.__dict__, '_pil_settings': (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)}

    def __setstate__(self, state):
        state = dict(state)
        settings = state.pop('_pil_settings', None)
        self.__dict__.update(state)
        if settings is not None:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = settings

    def _read(self, index: int):
        """(image, target) of `index`, or None (with a warning) when the file cannot be opened or decoded."""
        try:
            img, target = self.reader[index][:2]  # (opens the file: a link to nothing, a file removed since)
            return open_image(img, self.input_img_mode or 'RGB'), target
        except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for corrupt or truncated files
            warnings.warn(f'skipped unreadable image {self.reader.filename(index, absolute=True)}: {e}',
                          RuntimeWarning)
            return None
        except Image.DecompressionBombError as e:  # (not an OSError) a huge image, or a corrupt header claiming one
            warnings.warn(f'skipped unreadable image {self.reader.filename(index, absolute=True)}: {e} (for '
                          'genuinely large images raise PIL.Image.MAX_IMAGE_PIXELS)', RuntimeWarning)
            return None

    def load(self, index: int, seed: int) -> Tuple[torch.Tensor, int, int]:
        """Sample `index`; when its file is unreadable, a random other sample drawn from `seed` (skipped = 1)."""
        sample, skipped = self._read(index), 0
        if sample is None:
            skipped, n = 1, len(self.reader)
            rng = random.Random(seed_from('replacement', seed))
            for _ in range(self.max_skips if n > 1 else 0):
                other = rng.randrange(n - 1)
                sample = self._read(other + (other >= index))  # any index but `index`, uniformly
                if sample is not None:
                    break
            else:
                raise RuntimeError(
                    f'image {self.reader.filename(index, absolute=True)!r} and {self.max_skips} random '
                    'replacements are unreadable: is the folder readable?')
        img, target = sample
        if self.transform is not None:
            img = self.transform(img)
        if target is None:  # (as timm's ImageDataset)
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return img, target, skipped

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        return self.load(index, seed=index)


class EpochSeeded(Dataset):
    """Indexed by `(epoch, index, repeat)`: seeds the global generators from (seed, epoch, index[, repeat]),
    then returns dataset[index].

    `repeat` numbers the draws of one index in an epoch (repeated augmentation): each draw gets its
    own augmentation, and a sample's `skipped` count (third item, when the dataset has one) is
    kept for the first draw only, so an unreadable file counts once per epoch. A dataset with a
    `load(index, seed)` method (`ImageFolderDataset`) also gets the seed, for its replacements.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int, int]):
        epoch, index, repeat = key
        seed = seed_from(self.seed, epoch, index, *((repeat,) if repeat else ()))
        seed_all(seed)
        load = getattr(self.dataset, 'load', None)
        sample = load(index, seed) if load is not None else self.dataset[index]
        if repeat and isinstance(sample, tuple) and len(sample) == 3:
            sample = (*sample[:2], 0)
        return sample


class ResumableSampler(Sampler):
    """One epoch of a distributed (or repeated-augmentation) sampler as `(epoch, index, repeat)`, from sample
    `start` on.

    `repeat` is 0 for the first draw of `index` in the epoch (over all ranks), 1 for the second, ...
    (always 0 without repeated augmentation).

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

            def shard(r: int) -> list:
                base = RepeatAugSampler(dataset, num_replicas=num_replicas, rank=r, shuffle=True, num_repeats=repeats)
                base.set_epoch(seed_from(seed, epoch) % 2 ** 31)  # timm seeds with the epoch alone: fold our seed in
                return list(base)

            # number the draws of each index in the epoch's global order (draw p of rank r is p * num_replicas + r)
            shards, counts, draws = [shard(r) for r in range(num_replicas)], Counter(), []
            for p in range(len(shards[rank])):
                for r in range(num_replicas):
                    i = shards[r][p]
                    if r == rank:
                        draws.append((i, counts[i]))
                    counts[i] += 1
        else:
            base = DistributedSampler(
                dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
            base.set_epoch(epoch)
            draws = [(i, 0) for i in base]
        self.draws = draws[start:]
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.draws)

    def __iter__(self) -> Iterator[Tuple[int, int, int]]:
        return ((self.epoch, i, repeat) for i, repeat in self.draws)
