"""Video clips for training and evaluation: HMDB-51 through pytorchvideo, transforms through torchvision.

* `Hmdb51Clips`: pytorchvideo's HMDB-51 dataset (official split files, `<class>/<video>.avi`, PyAV
  decoding) as an iterable dataset of `(clip, label, skipped)`: class names mapped to sorted
  integer ids, one random clip per video and epoch for training, `clips_per_video` evenly spaced
  clips for testing (from the start to the end of the video; one clip: the centre), videos sharded
  over processes and DataLoader workers. Problems a run would only meet later (a missing folder, no
  split files, an empty split) fail at construction with a message saying what was expected, and so
  do class folders without a split file and split files without a class folder (an incomplete
  download would train on fewer classes).
* Unreadable videos: pytorchvideo already moves on to the next video when one fails to open or
  decode, silently, and gives up after 10 failures in a row. Here every such video is reported
  with a warning and counted (`skipped`: videos skipped since the previous clip of the same
  worker, so the count travels with the batch across worker processes and ranks; a skip after a
  worker's last clip of the epoch is warned about but has no clip to ride on), once per epoch
  when `set_epoch` is used (a second pass over the shard does not count them again), and an
  epoch never ends early because of them.
* `VideoTransform`: uniform temporal subsampling to a fixed number of frames, short-side resize,
  crop (random + flip + RandAugment for training, centre for evaluation), normalization, with
  torchvision's `transforms.v2` (`pytorchvideo.transforms` does not import on current torchvision).
"""
import copy
import math
import multiprocessing
import os
import warnings
from fractions import Fraction
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from pytorchvideo.data import LabeledVideoDataset, make_clip_sampler
from pytorchvideo.data.clip_sampling import ClipInfo, ConstantClipsPerVideoSampler
from pytorchvideo.data.hmdb51 import Hmdb51LabeledVideoPaths
from pytorchvideo.data.video import VideoPathHandler
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DistributedSampler, IterableDataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .images import is_hidden

__all__ = ['Hmdb51Clips', 'VideoTransform', 'VIDEO_INTERPOLATIONS', 'VIDEO_WORKER_START', 'read_hmdb51_split',
           'video_worker_context']

# How DataLoader workers that decode video start: never by fork. A forked worker inherits the FFmpeg state of a
# parent that has decoded (converted) a frame, with none of its threads: PyAV 18.1.1 keeps one SwsContext, with
# its slice-thread pool, per thread, and a worker forked after the parent converted a frame waits forever on
# the parent's pool. A forkserver worker starts from a clean server process (spawn where there is none).
VIDEO_WORKER_START = 'forkserver' if 'forkserver' in multiprocessing.get_all_start_methods() else 'spawn'


def video_worker_context() -> multiprocessing.context.BaseContext:
    """The context that starts video DataLoader workers (`VIDEO_WORKER_START`), its fork server set to preload this
    module (torch, timm, pytorchvideo, PyAV: imported, no frame decoded) in addition to its other preloads (the
    main script by default), where the server has not started yet.

    Without it every worker imports them anew, and a trainer starts new workers for every epoch and evaluation
    (about 10 s a loader on 2 busy cores; 0.5 s preloaded).
    """
    context = multiprocessing.get_context(VIDEO_WORKER_START)
    if VIDEO_WORKER_START == 'forkserver':
        from multiprocessing import forkserver  # (POSIX only)
        preload = list(getattr(forkserver._forkserver, '_preload_modules', None) or ['__main__'])
        if __name__ not in preload:
            context.set_forkserver_preload(preload + [__name__])
    return context

_SPLIT_TAGS = {'train': 1, 'test': 2}  # official split files: 1 = train, 2 = test, 0 = unused
_MAX_MAGNITUDE = 10  # RandAugment magnitudes as timm and pytorchvideo count them (timm's _LEVEL_DENOM)
VIDEO_INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest')  # the modes torchvision resizes uint8 clips with
_AFFINE_INTERPOLATIONS = ('bilinear', 'nearest')  # the modes of torchvision's affine ops (rotate, shear...) on tensors


class VideoTransform:
    """(C, T, H, W) clip, values 0-255 (pytorchvideo's; float or uint8) -> (C, num_frames, img_size, img_size) float.
    A float clip with all values in [0, 1] (divided by 255 before) is refused: it would round to 0 and 1.

    Frames are subsampled evenly by index (uniformly in time at a constant frame rate, as HMDB-51's; repeated when
    the clip is shorter), the short side is
    resized to img_size / crop_pct, then cropped: at random, with horizontal flips and RandAugment for training;
    in the centre for evaluation. Every frame of a clip gets the same augmentation. Output normalized by mean, std.

    RandAugment is applied as timm applies `rand-m{magnitude}-n{ops}`: `randaugment_ops` operations drawn at random,
    each applied with probability 0.5 at the fixed magnitude, filling with the mean colour (torchvision's own
    RandAugment applies every drawn operation, with black fill: far stronger at the same numbers). The operations and
    their magnitude ranges are torchvision's, not timm's image set: Identity is one, Invert and SolarizeAdd are not,
    and at magnitude 9 posterize keeps 4 bits (timm: 3), solarize inverts above 10% of the range (timm: 90%), and the
    colour ops scale by 1 +- 0.81 (timm: 1.72); rotate, shear and translate span timm's ranges. Its geometric
    operations (rotate, shear, translate) interpolate as the resize does, but bilinear where the resize is bicubic:
    torchvision's affine ops take only nearest and bilinear on tensors.
    """

    def __init__(
            self,
            train: bool,
            num_frames: int = 16,
            img_size: int = 224,
            crop_pct: float = 0.875,
            randaugment_ops: int = 2,
            randaugment_magnitude: Optional[int] = 9,
            mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
            std: Sequence[float] = IMAGENET_DEFAULT_STD,
            interpolation: str = 'bilinear',
    ):
        """
        Args:
            train: random crop, flip and RandAugment (True) or centre crop (False).
            randaugment_magnitude: RandAugment magnitude, 0-10 as timm's and pytorchvideo's (9: rotations up to
                27 degrees), None for no RandAugment.
            interpolation: of the resize, one of VIDEO_INTERPOLATIONS, and of RandAugment's geometric operations
                (bilinear for 'bicubic').
        """
        if num_frames < 1:
            raise ValueError(f'num_frames must be positive, got {num_frames}')
        if not 0 < crop_pct <= 1:
            raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
        if interpolation not in VIDEO_INTERPOLATIONS:
            raise ValueError(f'interpolation must be one of {VIDEO_INTERPOLATIONS} for clips, got {interpolation!r}')
        mode = v2.InterpolationMode(interpolation)
        self.num_frames = num_frames
        steps = [v2.Resize(math.floor(img_size / crop_pct), interpolation=mode, antialias=True)]
        if train:
            steps += [v2.RandomCrop(img_size), v2.RandomHorizontalFlip()]
            if randaugment_magnitude is not None:
                if not 0 <= randaugment_magnitude <= _MAX_MAGNITUDE:
                    raise ValueError(
                        f'randaugment_magnitude must be in [0, {_MAX_MAGNITUDE}], got {randaugment_magnitude}')
                fill = [round(255 * m) for m in mean]  # (timm's fill: the mean colour)
                # torchvision's bins span the same ranges: bin m of 11 is m / 10
                affine = mode if interpolation in _AFFINE_INTERPOLATIONS else v2.InterpolationMode.BILINEAR
                op = partial(v2.RandAugment, num_ops=1, magnitude=randaugment_magnitude,
                             num_magnitude_bins=_MAX_MAGNITUDE + 1, interpolation=affine, fill=fill)
                steps += [v2.RandomApply([op()], p=0.5) for _ in range(randaugment_ops)]
        else:
            steps.append(v2.CenterCrop(img_size))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
        self.transform = v2.Compose(steps)

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 4 or video.shape[1] == 0:
            raise ValueError(f'expected a clip (C, T, H, W) with at least one frame, got shape {tuple(video.shape)}')
        index = torch.linspace(0, video.shape[1] - 1, self.num_frames).round().long()
        frames = video[:, index].permute(1, 0, 2, 3)  # (C, T, H, W) -> (T, C, H, W), torchvision's video layout
        if frames.is_floating_point():
            low, high = torch.aminmax(frames)
            # (whole values in [0, 1] are a nearly black 0-255 clip, e.g. a fade-out: fractions betray a scaled one)
            if low >= 0 and 0 < high <= 1 and (frames != frames.round()).any():
                raise ValueError("video must hold values 0-255 (pytorchvideo's decoded clips, float or uint8), got a "
                                 'float clip with fractional values all in [0, 1] (divided by 255 already?): they '
                                 'would round to 0 and 1, an almost black clip')
            frames = frames.round().clamp(0, 255).to(torch.uint8)
        frames = self.transform(tv_tensors.Video(frames))
        return frames.as_subclass(torch.Tensor).permute(1, 0, 2, 3)  # (T, C, H, W) -> (C, T, H, W)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(num_frames={self.num_frames}, {self.transform})'


def read_hmdb51_split(split_dir: str, split: str = 'train', split_id: int = 1) -> Tuple[List[str], int]:
    """Class names (sorted) and the number of videos of `split` in HMDB-51's official split files.

    `split_dir` holds `<class>_test_split<split_id>.txt` per class, lines `<video>.avi <tag>` with
    tag 1 = train, 2 = test, 0 = unused (blank lines skipped). Raises ValueError for no split files, a line of
    another form, or an empty split.
    """
    videos = _read_split_videos(split_dir, split, split_id)
    return list(videos), sum(len(v) for v in videos.values())


def _read_split_videos(split_dir: str, split: str, split_id: int) -> Dict[str, List[str]]:
    """The videos of `split` per class (classes sorted by name), as `read_hmdb51_split` reads them.

    Read as UTF-8, with or without a byte-order mark (a split file saved by Windows Notepad): pytorchvideo's own
    reading (`Hmdb51LabeledVideoPaths.from_csvs`) reads in the locale's encoding and kept the mark in the first
    video's name, which was then skipped as an unreadable video that seemed to exist.
    """
    if split not in _SPLIT_TAGS:
        raise ValueError(f'split must be one of {tuple(_SPLIT_TAGS)}, got {split!r}')
    if split_id not in (1, 2, 3):
        raise ValueError(f'split_id must be 1, 2 or 3 (the official HMDB-51 splits), got {split_id!r}')
    suffix = f'_test_split{split_id}.txt'
    # hidden files (macOS' AppleDouble `._<name>`) are not split files; sorted by class name (the file names sort
    # 'climb_stairs_...' before 'climb_...')
    files = sorted((f for f in os.listdir(split_dir) if f.endswith(suffix) and not f.startswith('.')),
                   key=lambda f: f[:-len(suffix)])
    if not files:
        raise ValueError(f'split_dir {split_dir!r} holds no HMDB-51 split files <class>{suffix}')
    tag, videos = str(_SPLIT_TAGS[split]), {}
    for name in files:
        try:
            with open(os.path.join(split_dir, name), encoding='utf-8-sig') as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f'{os.path.join(split_dir, name)} is not a text split file ({e})') from None
        videos[name[:-len(suffix)]] = chosen = []
        for n, line in enumerate(lines, 1):
            if not line.strip():  # (an editor's blank line, e.g. at the end)
                continue
            fields = line.rsplit(None, 1)
            if len(fields) != 2 or fields[1] not in ('0', '1', '2'):
                raise ValueError(f'{name} line {n}: expected "<video>.avi <0|1|2>", got {line!r}')
            if fields[1] == tag:
                chosen.append(fields[0])
    if not any(videos.values()):
        raise ValueError(
            f'split {split!r} of split {split_id} is empty: no line of the {len(files)} split files in '
            f'{split_dir!r} is tagged {tag} ("<video>.avi {tag}")')
    return videos


def _check_classes(video_dir: str, split_dir: str, split_id: int, classes: Sequence[str]) -> None:
    """Raise FileNotFoundError unless every class of the split files has a folder in `video_dir` and every
    folder of `video_dir` (but hidden ones, `images.is_hidden`, and the one holding `split_dir`) has a split file: an
    incomplete download would otherwise train on fewer classes without a word."""
    no_folder = [c for c in classes if not os.path.isdir(os.path.join(video_dir, c))]
    splits = os.path.realpath(split_dir) + os.sep
    folders = [d for d in sorted(os.listdir(video_dir)) if not is_hidden(d)
               and os.path.isdir(os.path.join(video_dir, d))
               and not splits.startswith(os.path.realpath(os.path.join(video_dir, d)) + os.sep)]
    no_split = sorted(set(folders) - set(classes))
    problems = []
    if no_folder:
        problems.append(f'video_dir {video_dir!r} has no folder for the classes {no_folder}')
    if no_split:
        problems.append(f'split_dir {split_dir!r} has no split file <class>_test_split{split_id}.txt for the '
                        f'class folders {no_split} of video_dir {video_dir!r}')
    if problems:
        raise FileNotFoundError('; '.join(problems) + ' (an incomplete HMDB-51 download?)')


class _EvenlySpacedClipSampler(ConstantClipsPerVideoSampler):
    """`clips_per_video` clips spread over the whole video: clip k of n starts at k (D - c) / (n - 1) for a video
    of D seconds and clips of c, so the first starts at 0 and the last ends at D; a single clip is the centre one.
    (pytorchvideo's own starts at k (D - c) / n: the end of every video is never seen, one clip is the first.)
    Its clip count and indices are pytorchvideo's; only the times move."""

    def __call__(self, last_clip_time: float, video_duration: float, annotation: Dict) -> ClipInfo:
        info = super().__call__(last_clip_time, video_duration, annotation)
        free = Fraction(max(video_duration - self._clip_duration, 0))  # the latest start
        n = self._clips_per_video
        start = free / 2 if n == 1 else free * info.clip_index / (n - 1)
        return info._replace(clip_start_sec=start, clip_end_sec=start + self._clip_duration)


class _CheckedVideo:
    """A pytorchvideo video whose failed clip reads are reported (pytorchvideo drops the video silently)."""

    def __init__(self, video, report: Callable[[str], None]):
        self._video = video
        self._report = report

    @property
    def name(self) -> Optional[str]:
        return self._video.name

    @property
    def duration(self) -> float:
        """The video stream's duration as its header states it. pytorchvideo's (PyAV) subtracts the stream's start
        time from it, as from a time stamp: a video whose first frame is stamped 1 s (an MP4 cut without
        re-encoding) lasted 1 s less, and its clips, which count from the first frame, never reached its end."""
        container = getattr(self._video, '_container', None)
        if getattr(self._video, '_selective_decoding', False) and container is not None:  # (else: from the frames)
            stream = container.streams.video[0]
            if stream.duration is not None:
                return stream.duration * stream.time_base
        return self._video.duration

    def get_clip(self, start_sec: float, end_sec: float) -> Dict[str, Optional[torch.Tensor]]:
        try:
            clip = self._video.get_clip(start_sec, end_sec)
        except Exception as e:  # any decoder failure: pytorchvideo then moves on to the next video
            self._report(f'{type(e).__name__}: {e}')
            return {'video': None, 'audio': None}
        if clip is None or clip['video'] is None:
            self._report(f'no frames decoded in [{float(start_sec):.2f}, {float(end_sec):.2f}) s')
        return clip

    def close(self) -> None:
        self._video.close()


class _CountingPathHandler(VideoPathHandler):
    """pytorchvideo's path handler, with every video that fails to open or decode warned about and counted.

    After `set_epoch`, a video is counted (and warned about) once per epoch, however many passes
    over the shard the epoch takes: the epoch of each video's last count is kept in shared memory,
    which DataLoader workers (of this pass and of the next) share with the main process.
    """

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        self.skipped = 0
        self.epoch: Optional[int] = None
        self._index = {path: i for i, path in enumerate(paths)}
        self.counted_in = torch.full((len(paths),), -1, dtype=torch.long).share_memory_()  # epoch, -1 = never

    def _skip(self, path: str, reason: str) -> None:
        i = self._index.get(path)
        if self.epoch is not None and i is not None:
            if self.counted_in[i] == self.epoch:  # counted in an earlier pass of this epoch
                return
            self.counted_in[i] = self.epoch
        self.skipped += 1
        warnings.warn(f'skipped unreadable video {path}: {reason}', RuntimeWarning)

    def video_from_path(self, filepath: str, **kwargs):
        try:
            video = super().video_from_path(filepath, **kwargs)
        except Exception as e:  # re-raised: pytorchvideo catches it and moves on to the next video
            self._skip(filepath, f'{type(e).__name__}: {e}')
            raise
        return _CheckedVideo(video, partial(self._skip, filepath))


class Hmdb51Clips(IterableDataset):
    """HMDB-51 clips through pytorchvideo (its `Hmdb51` on the checked split files): yields `(clip, label, skipped)`.

    `clip` is the transform's output (by default pytorchvideo's float (C, T, H, W) clip, values
    0-255), `label` the index of the video's class in `classes` (sorted names), `skipped` the
    number of unreadable videos skipped since this worker's previous clip. Call `set_epoch`
    before each training epoch for a new video order.

    Args:
        video_dir: folder with one sub-folder of videos per class.
        split_dir: folder with the official split files `<class>_test_split<1|2|3>.txt`
            (None: `video_dir`).
        split: 'train' (one random clip per video, shuffled) or 'test' (`clips_per_video`
            evenly spaced clips per video, in order: the first at the start, the last at the end, one in the
            centre).
        split_id: official split 1, 2 or 3.
        clip_duration: seconds per clip.
        transform: applied to each (C, T, H, W) clip, e.g. `VideoTransform`; picklable for DataLoader workers,
            which get a pickled copy of the dataset (not a lambda or local function; torch's hint to start them
            by fork instead does not apply here: a forked worker can hang in decoding).
        clips_per_video: clips per video for 'test'.
        num_shards, shard_id: split the videos over processes (distributed runs; every shard gets
            the same number of videos, some repeated). DataLoader workers split a shard further;
            start them with `multiprocessing_context=video_worker_context()` (a forked worker can hang in
            decoding).
        seed: seed of the video order.
        with_video_index: also yield the index of the clip's video in the split (the same for
            every clip of a video and every repeat of it in another shard): `(clip, label,
            skipped, video_index)`, for averaging clip scores per video.
    """

    def __init__(
            self,
            video_dir: str,
            split_dir: Optional[str] = None,
            split: str = 'train',
            split_id: int = 1,
            clip_duration: float = 2.0,
            transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            clips_per_video: int = 1,
            num_shards: int = 1,
            shard_id: int = 0,
            seed: int = 0,
            with_video_index: bool = False,
    ):
        split_dir = video_dir if split_dir is None else split_dir
        for arg, path in (('video_dir', video_dir), ('split_dir', split_dir)):
            if not os.path.isdir(path):
                raise FileNotFoundError(
                    f'{arg} {path!r} is not a folder (HMDB-51 needs <video_dir>/<class>/<video>.avi '
                    f'and <split_dir>/<class>_test_split<1|2|3>.txt)')
        if not clip_duration > 0:
            raise ValueError(f'clip_duration must be positive (seconds), got {clip_duration}')
        if clips_per_video < 1:
            raise ValueError(f'clips_per_video must be at least 1, got {clips_per_video}')
        if not 0 <= shard_id < num_shards:
            raise ValueError(f'need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}')
        videos = _read_split_videos(split_dir, split, split_id)
        self.classes, self.num_videos = list(videos), sum(len(v) for v in videos.values())
        _check_classes(video_dir, split_dir, split_id, self.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self.with_video_index = with_video_index
        train = split == 'train'
        self.clips_per_video = 1 if train else clips_per_video
        clip_sampler = (
            make_clip_sampler('random', clip_duration) if train
            else _EvenlySpacedClipSampler(clip_duration, clips_per_video))
        # pytorchvideo's `Hmdb51`, over exactly the videos read and checked above: its own listing (`from_dir`) also
        # reads any other .txt whose name holds `_test_split<id>` (a stray `wave_test_split1 (1).txt` listed every
        # wave video twice) and hidden AppleDouble files; its reading (`from_csvs`) another encoding (above)
        paths = Hmdb51LabeledVideoPaths(
            [(os.path.join(c, v), {'label': c, 'meta_tags': v.split('_')[-6:-1]}) for c in self.classes
             for v in videos[c]], path_prefix=video_dir)
        self._videos = LabeledVideoDataset(
            paths,
            clip_sampler=clip_sampler,
            video_sampler=partial(DistributedSampler, num_replicas=num_shards, rank=shard_id, shuffle=train, seed=seed),
            decode_audio=False,
            decoder='pyav',
        )
        self._paths = _CountingPathHandler(
            [self._videos._labeled_videos[i][0] for i in range(len(self._videos._labeled_videos))])
        self._videos.video_path_handler = self._paths
        # pytorchvideo gives up after 10 unreadable videos in a row: never, here (each costs one video)
        self._videos._MAX_CONSECUTIVE_FAILURES = self.num_videos + 1

    def set_epoch(self, epoch: int) -> None:
        """Use the video order of `epoch` (training; the random clips follow the global / worker seeds).

        From the first call on, each unreadable video is counted once per epoch, also when the epoch
        takes more than one pass over the shard (without it, every pass counts its own).
        """
        self._videos.video_sampler.set_epoch(epoch)
        self._paths.epoch = epoch

    def unreadable_videos(self) -> List[int]:
        """The videos of this shard found unreadable so far in the epoch of the last `set_epoch`, by any worker: their
        indices in the split (the same on every shard, so that a video repeated to even out the shards counts once
        in the union over shards).

        Exact where the per-clip `skipped` counts cannot be: a skip after a worker's last clip, or in
        a dropped last batch, has no clip to ride on.
        """
        if self._paths.epoch is None:
            raise RuntimeError('unreadable_videos() counts per epoch: call set_epoch(epoch) first')
        return torch.nonzero(self._paths.counted_in == self._paths.epoch).flatten().tolist()

    def __getstate__(self) -> Dict:
        # (the copy that DataLoader workers started by forkserver or spawn get) without the state of a pass: the video
        # an abandoned pass left open (e.g. a peek at one test clip) does not pickle (PyAV's container), and each
        # pass starts afresh anyway (`__iter__`)
        state = self.__dict__.copy()
        videos = state['_videos'] = copy.copy(self._videos)
        videos._loaded_video_label, videos._video_sampler_iter, videos._next_clip_start_time = None, None, 0.0
        return state

    def __len__(self) -> int:
        """Clips this shard yields per epoch when every video is readable."""
        return len(self._videos.video_sampler) * self.clips_per_video

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, ...]]:
        # pytorchvideo's own `__iter__` keeps the video an abandoned pass left loaded (e.g. `next(iter(dataset))`):
        # the next pass began with the rest of its clips, extra clips of its first video. Each pass starts afresh.
        videos = self._videos
        if videos._loaded_video_label:
            videos._loaded_video_label[0].close()
        videos._loaded_video_label, videos._next_clip_start_time = None, 0.0
        videos._clip_sampler.reset()
        reported = self._paths.skipped
        for sample in self._videos:
            clip = sample['video'] if self.transform is None else self.transform(sample['video'])
            out = clip, self.class_to_idx[sample['label']], self._paths.skipped - reported
            yield (*out, sample['video_index']) if self.with_video_index else out
            reported = self._paths.skipped
