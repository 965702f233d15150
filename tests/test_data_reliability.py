"""Data that could go silently wrong: skip counts, replacement sampling, 16-bit images, symlink loops, HMDB-51
splits."""
import os
import warnings
from collections import Counter
from io import BytesIO

import numpy as np
import pytest
import torch
from media import write_video
from PIL import Image
from torch.utils.data import DataLoader

from s4nd_vision.data.images import EpochSeeded, ImageFolderDataset, ResumableSampler, folder_class_to_idx, open_image
from s4nd_vision.data.video import Hmdb51Clips, video_worker_context
from s4nd_vision.eval.resolution import dataset_num_classes
from s4nd_vision.train.config import ConfigError, load_config


def _identity(img: Image.Image) -> int:
    """The value every pixel of a test image holds: which file it came from."""
    return int(np.asarray(img.convert('L'))[0, 0])


def _constant_folder(root, n: int = 12, bad=(4, 5, 6)) -> str:
    """One class of `n` 4x4 images whose pixels hold their index * 10; the files in `bad` are garbage."""
    folder = os.path.join(root, 'digits')
    os.makedirs(folder)
    for i in range(n):
        path = os.path.join(folder, f'{i:02d}.png')
        if i in bad:
            with open(path, 'wb') as f:
                f.write(b'not a png')
        else:
            Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(path)
    return str(root)


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        return fn(*args)


# ------------------------------------------------------------------------------------------ images

def test_adjacent_unreadable_images_count_once_per_epoch(tmp_path):
    """Three adjacent unreadable files: 3 skips per epoch (not 3 + 2 + 1), and the same samples when resumed."""
    ds = ImageFolderDataset(_constant_folder(tmp_path), transform=_identity)
    data = EpochSeeded(ds, seed=7)
    epoch = [_quiet(data.__getitem__, key) for key in ResumableSampler(ds, epoch=2, seed=7)]
    assert sum(skipped for _, _, skipped in epoch) == 3
    values = Counter(v for v, _, _ in epoch)
    assert set(values) <= {10 * i for i in range(12) if i not in (4, 5, 6)}  # only readable images come back
    assert sum(values.values()) == 12
    # the replacements are drawn from (seed, epoch, index): a resumed epoch sees the same samples
    tail = [_quiet(data.__getitem__, key) for key in ResumableSampler(ds, epoch=2, seed=7, start=5)]
    assert tail == epoch[5:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ds[5]
    assert any('skipped unreadable image' in str(w.message) and '05.png' in str(w.message) for w in caught)


def test_unreadable_images_are_replaced_without_favouring_their_neighbours(tmp_path):
    """The replacement of an unreadable file is uniform over the other files, not the next file in the folder."""
    ds = ImageFolderDataset(_constant_folder(tmp_path), transform=_identity)
    counts = Counter(_quiet(ds.load, 6, seed)[0] for seed in range(900))
    readable = [10 * i for i in range(12) if i not in (4, 5, 6)]
    assert set(counts) == set(readable)
    assert max(counts.values()) < 2 * 900 / len(readable)  # about 100 each; the next file (70) got all 900 before
    assert _quiet(ds.load, 6, 3) == _quiet(ds.load, 6, 3)  # deterministic
    assert ds[0] == (0, 0, 0)


def test_all_unreadable_gives_a_clear_error(tmp_path):
    ds = ImageFolderDataset(_constant_folder(tmp_path, n=3, bad=(0, 1, 2)), max_skips=4)
    with pytest.raises(RuntimeError, match=r'00\.png.* and 4 random replacements are unreadable'):
        _quiet(ds.__getitem__, 0)


def test_repeated_augmentation_draws_are_numbered_and_augmented_differently(tmp_path):
    data = list(range(40))
    draws = [d for r in range(3) for d in ResumableSampler(data, 1, num_replicas=3, rank=r, seed=2, repeats=3)]
    per_index = {}
    for _, index, repeat in draws:
        per_index.setdefault(index, []).append(repeat)
    # each index's draws (over all ranks) are numbered 0, 1, 2, ...: the first one counts a skip
    assert all(sorted(r) == list(range(len(r))) for r in per_index.values())
    assert any(len(r) > 1 for r in per_index.values())

    ds = ImageFolderDataset(_constant_folder(tmp_path, n=4, bad=(1,)), transform=lambda img: torch.rand(()).item())
    data = EpochSeeded(ds, seed=0)
    first, second = data[(0, 0, 0)], data[(0, 0, 1)]
    assert first[0] != second[0]  # each repeat gets its own augmentation (they were identical before)
    assert _quiet(data.__getitem__, (0, 1, 0))[2] == 1
    assert _quiet(data.__getitem__, (0, 1, 1))[2] == 0  # the second draw of an unreadable file is not counted again


def test_16_bit_grayscale_images_are_scaled_not_clipped_to_white(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    folder = tmp_path / 'data' / 'ramp'
    folder.mkdir(parents=True)
    Image.fromarray(ramp).save(folder / 'a.png')  # mode I;16
    Image.fromarray(ramp).save(folder / 'b.tif')
    Image.fromarray(ramp).save(folder / 'c.pgm')  # read back as mode I
    assert Image.open(folder / 'a.png').mode == 'I;16' and Image.open(folder / 'c.pgm').mode == 'I'
    expected = (ramp >> 8).astype(np.uint8)
    for name in ('a.png', 'b.tif', 'c.pgm'):
        np.testing.assert_array_equal(np.asarray(open_image(folder / name, 'L')), expected, err_msg=name)
        rgb = np.asarray(open_image(folder / name, 'RGB'))
        np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2), err_msg=name)
    ds = ImageFolderDataset(str(tmp_path / 'data'), transform=np.asarray)
    for i in range(len(ds)):
        img, _, skipped = ds[i]
        assert skipped == 0 and abs(img.mean() - expected.mean()) < 0.5  # PIL alone gives about 255
    # one mapping for every image, whatever its values: a dark image is not brightened 256 times (it was when its
    # values all fit in 8 bits); 8-bit data in 16-bit files comes out black, with a warning
    dark = (np.arange(32 * 32).reshape(32, 32) % 200).astype(np.uint16)
    for name in ('d.png', 'e.tif'):
        Image.fromarray(dark).save(folder / name)
        with pytest.warns(RuntimeWarning, match='16-bit image holds only values below 256'):
            assert not np.asarray(open_image(folder / name, 'L')).any(), name
    # 12-bit data (microscopy, X-ray) keeps 16 gray levels: warned, saying so; 13 bits and more are not warned about
    twelve = np.linspace(0, 4095, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(twelve).save(folder / 'f.png')
    with pytest.warns(RuntimeWarning, match=r'values below 4096 \(12-bit data .* keeps 4 bits \(16 gray levels\)'):
        assert np.asarray(open_image(folder / 'f.png', 'L')).max() == 15
    Image.fromarray(twelve * 2 + 1).save(folder / 'g.png')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert np.asarray(open_image(folder / 'g.png', 'L')).max() == 31


def test_symlink_loop_in_a_class_folder_is_refused(tmp_path):
    root = _constant_folder(tmp_path / 'data', n=2, bad=())
    os.symlink('..', os.path.join(root, 'digits', 'loop'))
    with pytest.raises(ValueError, match=r'symlink loop .*loop'):
        ImageFolderDataset(root)
    with pytest.raises(ValueError, match='symlink loop'):
        dataset_num_classes(root)


def test_one_folder_linked_twice_is_refused_and_a_single_link_is_fine(tmp_path):
    outside = _constant_folder(tmp_path / 'elsewhere', n=2, bad=())
    root = tmp_path / 'data'
    root.mkdir()
    os.symlink(os.path.join(outside, 'digits'), root / 'digits')
    assert len(ImageFolderDataset(str(root))) == 2  # a linked class folder is a normal layout
    os.symlink(os.path.join(outside, 'digits'), root / 'again')
    with pytest.raises(ValueError, match='reached twice through symbolic links'):
        ImageFolderDataset(str(root))


def test_an_image_that_cannot_be_opened_is_skipped_and_counted(tmp_path):
    """A link to nothing (or a file removed after the folder was listed) is unreadable like a corrupt file."""
    root = _constant_folder(tmp_path, n=4, bad=())
    os.symlink(os.path.join(root, 'nowhere.png'), os.path.join(root, 'digits', '09.png'))
    ds = ImageFolderDataset(root, transform=_identity)
    os.remove(os.path.join(root, 'digits', '01.png'))
    with pytest.warns(RuntimeWarning, match='skipped unreadable image .*09.png'):
        value, _, skipped = ds[4]
    assert skipped == 1 and value in (0, 20, 30)
    assert _quiet(ds.__getitem__, 1)[2] == 1


def test_an_image_too_large_for_pil_is_skipped_and_counted(tmp_path):
    """A header declaring more pixels than PIL.Image.MAX_IMAGE_PIXELS (a corrupt file, or a huge tile) raises
    DecompressionBombError, which is not an OSError: it is skipped like any unreadable file, not a crash."""
    root = _constant_folder(tmp_path, n=3, bad=())
    jpeg = BytesIO()
    Image.new('L', (16, 16)).save(jpeg, 'JPEG')
    data = bytearray(jpeg.getvalue())
    sof = data.index(b'\xff\xc0')
    data[sof + 5:sof + 9] = b'\xff\xff\xff\xff'  # height and width 65535
    (tmp_path / 'digits' / '03.jpg').write_bytes(data)
    ds = ImageFolderDataset(root, transform=_identity)
    with pytest.warns(RuntimeWarning, match=r'skipped unreadable image .*03\.jpg.*PIL\.Image\.MAX_IMAGE_PIXELS'):
        value, _, skipped = ds[3]
    assert skipped == 1 and value in (0, 10, 20)


def test_spawned_workers_read_images_with_the_pil_settings_of_the_main_process(tmp_path, monkeypatch):
    """DataLoader workers started by spawn (macOS' and Windows' default) import PIL afresh: the dataset carries the
    limit on image pixels and the acceptance of truncated files that the main process set (they read the large
    image and the truncated one as the main process does, instead of skipping one and reading the other)."""
    root = _constant_folder(tmp_path, n=3, bad=())
    Image.fromarray(np.full((16, 16), 250, np.uint8)).save(tmp_path / 'digits' / '03.png')  # 256 pixels
    jpeg = BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(jpeg, 'JPEG')
    (tmp_path / 'digits' / '04.jpg').write_bytes(jpeg.getvalue()[:-2])  # truncated
    from PIL import ImageFile
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # (more than twice it: too large)
    monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)
    ds = ImageFolderDataset(root, transform=_identity)
    expected = [_quiet(ds.__getitem__, i)[2] for i in range(len(ds))]
    assert expected == [0, 0, 0, 1, 0]
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context='spawn')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        assert [int(skipped) for _, _, skipped in loader] == expected


def test_timms_dataset_arguments_apply_or_are_refused(tmp_path):
    root = _constant_folder(tmp_path, n=2, bad=())
    assert ImageFolderDataset(root, transform=_identity, target_transform=lambda t: t + 100)[1] == (10, 100, 0)
    for key in ('load_bytes', 'additional_features'):
        with pytest.raises(ValueError, match=f'{key} is not supported by ImageFolderDataset'):
            ImageFolderDataset(root, **{key: True})


def test_class_numbers_from_the_class_folders_are_timms(tmp_path):
    """`folder_class_to_idx` (eval-resolution's numbering of the training split, read without walking it) numbers
    the classes as timm's reader of the whole folder does: natural order, case ignored, a folder without images of
    the kinds it lists (empty, or .webp only beside others) no class; names timm cannot order are refused."""
    for name, ext in (('c10', '.png'), ('c9', '.jpg'), ('B', '.JPEG'), ('a', '.png'), ('webp', '.webp')):
        os.makedirs(tmp_path / name)
        Image.new('RGB', (4, 4)).save(tmp_path / name / f'x{ext}', format='WEBP' if ext == '.webp' else None)
    os.makedirs(tmp_path / 'empty')
    os.makedirs(tmp_path / 'a' / 'notes.png')  # (a folder, not an image)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # (the trainer refuses the .webp folder)
        with pytest.raises(ValueError, match="webp' holds 1 images .* its class would vanish"):
            ImageFolderDataset(str(tmp_path))
    expected = {'a': 0, 'B': 1, 'c9': 2, 'c10': 3}
    assert folder_class_to_idx(str(tmp_path)) == expected
    os.remove(tmp_path / 'webp' / 'x.webp')
    assert ImageFolderDataset(str(tmp_path)).reader.class_to_idx == expected
    os.makedirs(tmp_path / 'C9')
    Image.new('RGB', (4, 4)).save(tmp_path / 'C9' / 'x.png')
    with pytest.raises(ValueError, match="class folders 'c9' and 'C9'|class folders 'C9' and 'c9'"):
        folder_class_to_idx(str(tmp_path))


def test_images_outside_class_folders_and_classes_timm_cannot_order_are_refused(tmp_path):
    """timm labels an image by its innermost folder: images in sub-folders or beside the classes would form or
    merge classes silently; 'cat' and 'Cat' tie in timm's order, which set order then breaks per process."""
    nested = _constant_folder(tmp_path / 'nested', n=2, bad=())
    os.makedirs(os.path.join(nested, 'digits', '2019'))
    Image.new('L', (4, 4)).save(os.path.join(nested, 'digits', '2019', 'x.png'))
    with pytest.raises(ValueError, match=r"2019/x.png' is in a sub-folder of a class folder .*<class>/<image>"):
        ImageFolderDataset(nested)
    with pytest.raises(ValueError, match=r"is in a sub-folder of a class folder"):  # (evaluation reads it so too)
        dataset_num_classes(nested, split='')
    os.makedirs(os.path.join(nested, 'digits', '2019', 'digits'))  # (innermost folder a class of the map: merged)
    Image.new('L', (4, 4)).save(os.path.join(nested, 'digits', '2019', 'digits', 'y.png'))
    with pytest.raises(ValueError, match=r"y.png' is in a sub-folder of a class folder"):
        ImageFolderDataset(nested, class_map={'digits': 0})
    stray = _constant_folder(tmp_path / 'stray', n=2, bad=())
    Image.new('L', (4, 4)).save(os.path.join(stray, 'x.png'))
    with pytest.raises(ValueError, match=r"x.png' is beside the class folders"):
        ImageFolderDataset(stray)
    ties = _constant_folder(tmp_path / 'ties', n=2, bad=())
    for name in ('cat', 'Cat'):
        os.makedirs(os.path.join(ties, name))
        Image.new('L', (4, 4)).save(os.path.join(ties, name, 'x.png'))
    with pytest.raises(ValueError, match=r"class folders '(cat|Cat)' and '(cat|Cat)' .* sort as equal"):
        ImageFolderDataset(ties)
    assert len(ImageFolderDataset(ties, class_map={'digits': 0, 'cat': 1, 'Cat': 2})) > 0  # (the map numbers them)


def test_macos_metadata_files_beside_the_images_are_refused(tmp_path):
    """A copy from a Mac can leave an AppleDouble `._<name>` beside every image: timm lists them by extension, none
    is an image, and with one file in two unreadable a sample and its 10 random replacements are all unreadable
    about once in 2,000 draws, which ended the run mid-epoch: refused up front (training and evaluation alike)."""
    root = _constant_folder(tmp_path / 'mac', n=3, bad=())
    with open(os.path.join(root, 'digits', '._01.png'), 'wb') as f:
        f.write(b'\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ')  # (AppleDouble's header)
    with pytest.raises(ValueError, match=r"_01.png' under .* is a hidden file .*AppleDouble.* -name '\._\*' -delete"):
        ImageFolderDataset(root)
    with pytest.raises(ValueError, match=r"_01.png' under .* is a hidden file"):
        dataset_num_classes(root, split='')


def test_file_names_timms_order_cannot_tell_apart_are_ordered_the_same_on_every_machine(tmp_path, monkeypatch):
    """timm's natural order ignores case and leading zeros; its ties kept the directory listing's order, which
    differs between file systems: sample i was another file on another machine (simulated by listing in reverse)."""
    for name in ('x1.png', 'x01.png', 'X2.png', 'x2.png', 'x10.png'):
        (tmp_path / 'a').mkdir(exist_ok=True)
        Image.new('L', (4, 4)).save(tmp_path / 'a' / name)
    walk = os.walk
    orders = []
    for reverse in (False, True):
        monkeypatch.setattr(os, 'walk', lambda *a, reverse=reverse, **k: (
            (path, dirs, sorted(files, reverse=reverse)) for path, dirs, files in walk(*a, **k)))
        ds = ImageFolderDataset(str(tmp_path))
        orders.append([os.path.basename(path) for path, _ in ds.reader.samples])
    # ties broken by the exact name; the order of files without a tie is timm's natural order (x10 after x2)
    assert orders[0] == orders[1] == ['x01.png', 'x1.png', 'X2.png', 'x2.png', 'x10.png']


def test_images_of_kinds_timms_reader_does_not_list_are_warned_about_or_refused(tmp_path):
    """timm's reader lists .png, .jpg and .jpeg files only: other images PIL reads (.webp, .bmp, .tif) were left out
    without a word, and a class made of them vanished (a 2-class model for 3 classes)."""
    root = _constant_folder(tmp_path, n=2, bad=())
    Image.new('L', (4, 4)).save(tmp_path / 'digits' / 'b.bmp')
    Image.new('L', (4, 4)).save(tmp_path / 'digits' / 'c.webp')
    (tmp_path / 'digits' / '._c.webp').write_bytes(b'AppleDouble')  # (hidden files are not counted)
    (tmp_path / 'digits' / 'notes.txt').write_text('not an image')
    with pytest.warns(RuntimeWarning, match=r"2 images under .* of kinds timm's reader leaves out \(\.bmp, \.webp; "
                                            r"e\.g\. '.*digits/b\.bmp'\): they are not used"):
        assert len(ImageFolderDataset(root)) == 2
    (tmp_path / 'letters').mkdir()
    for name in ('a.webp', 'b.webp'):
        Image.new('L', (4, 4)).save(tmp_path / 'letters' / name)
    with pytest.raises(ValueError, match=r"folder '.*letters' holds 2 images of kinds timm's reader leaves out "
                                         r"\(\.webp\) and none of those it lists .*: its class would vanish"):
        _quiet(ImageFolderDataset, root)
    with pytest.raises(ValueError, match=r"letters' holds 2 images"):  # (evaluation reads it so too)
        _quiet(dataset_num_classes, root, '')


@pytest.mark.parametrize('hidden', ['.ipynb_checkpoints', '__MACOSX'])
def test_hidden_folders_beside_the_class_folders_are_refused(tmp_path, hidden):
    """A hidden folder holding images would become class 0 and shift every label (the video data leaves such folders
    out too); a zip made on macOS adds __MACOSX/<class>/._<image>."""
    root = _constant_folder(tmp_path, n=2, bad=())
    os.makedirs(os.path.join(root, hidden, 'digits'))
    Image.new('L', (4, 4)).save(os.path.join(root, hidden, '0-checkpoint.png'))
    Image.new('L', (4, 4)).save(os.path.join(root, hidden, 'digits', '._00.png'))
    with pytest.raises(ValueError, match=f"is in '{hidden}' of .*, a hidden folder .* shifting the labels"):
        ImageFolderDataset(root)
    with pytest.raises(ValueError, match=f"is in '{hidden}' of .*, a hidden folder"):  # (evaluation reads it so too)
        dataset_num_classes(root, split='')


def test_mnist_channels_other_than_1_or_3_are_a_config_error_naming_the_key():
    """MNIST's gray channel is given alone or repeated for RGB: another data.in_chans is refused at load, as a
    ConfigError naming the key (not a bare ValueError from the dataset once the run has started)."""
    with pytest.raises(ConfigError, match=r'data.in_chans must be 1 .* or 3 \(RGB\) for data.dataset mnist, got 2'):
        load_config(None, ['model.name=convnext_s4nd_atto', 'data.dataset=mnist', 'data.in_chans=2'])
    assert load_config(None, ['model.name=convnext_s4nd_atto', 'data.dataset=mnist', 'data.in_chans=1'])


# ------------------------------------------------------------------------------------------- video

CLASSES = ('brush_hair', 'cartwheel', 'wave')


@pytest.fixture
def hmdb(tmp_path):
    """HMDB-51 layout with four training videos per class; two of brush_hair's are unreadable."""
    videos, splits = tmp_path / 'videos', tmp_path / 'splits'
    splits.mkdir()
    for k, name in enumerate(CLASSES):
        (videos / name).mkdir(parents=True)
        names = [f'{name}_{i}.avi' for i in range(4)]
        for video in names:
            if name == 'brush_hair' and video.endswith(('_1.avi', '_2.avi')):
                (videos / name / video).write_bytes(b'\x00' * 2048)
            else:
                write_video(videos / name / video, channel=k)
        (splits / f'{name}_test_split1.txt').write_text(''.join(f'{v} {t}\n' for v, t in zip(names, (1, 1, 1, 2))))
    return str(videos), str(splits)


@pytest.mark.parametrize('workers', [0, 2])
def test_unreadable_videos_count_once_per_epoch_over_several_passes(hmdb, workers):
    """The trainer makes a second pass over a shard left short by unreadable videos: they count once."""
    videos, splits = hmdb
    dataset = Hmdb51Clips(videos, splits, 'train', clip_duration=1.0)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        multiprocessing_context=video_worker_context() if workers else None)

    def skipped_in(passes: int) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)
            return sum(int(skipped) for _ in range(passes) for _, _, skipped in loader)

    with pytest.raises(RuntimeError, match='set_epoch'):
        dataset.unreadable_videos()
    dataset.set_epoch(0)
    assert skipped_in(2) == 2  # 2 unreadable videos, 2 passes: counted as 4 before
    paths = [p for p, _ in dataset._videos._labeled_videos]
    assert sorted(os.path.basename(paths[i]) for i in dataset.unreadable_videos()) == ['brush_hair_1.avi',
                                                                                      'brush_hair_2.avi']
    dataset.set_epoch(1)
    assert dataset.unreadable_videos() == []
    # a new epoch counts them again (a skip after a worker's last clip has no clip to ride on: the
    # shared record is exact)
    assert 1 <= skipped_in(2) <= 2 and len(dataset.unreadable_videos()) == 2


def test_without_set_epoch_every_pass_counts(hmdb):
    """Evaluation iterates the test split once per evaluation without set_epoch: each counts its own skips."""
    videos, splits = hmdb
    dataset = Hmdb51Clips(videos, splits, 'train', clip_duration=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        assert [sum(s for _, _, s in dataset) for _ in range(2)] == [2, 2]


def test_a_missing_hmdb51_split_file_is_an_error_naming_the_class(hmdb):
    videos, splits = hmdb
    os.remove(os.path.join(splits, 'cartwheel_test_split1.txt'))
    with pytest.raises(FileNotFoundError, match=r"no split file <class>_test_split1\.txt for the class folders "
                                                r"\['cartwheel'\]"):
        Hmdb51Clips(videos, splits, 'train')


def test_a_split_file_without_class_folder_is_an_error_naming_the_class(hmdb, tmp_path):
    videos, splits = hmdb
    (tmp_path / 'splits' / 'run_test_split1.txt').write_text('run_0.avi 1\n')
    with pytest.raises(FileNotFoundError, match=r"no folder for the classes \['run'\]"):
        Hmdb51Clips(videos, splits, 'train')


def test_hidden_folders_and_the_split_folder_inside_video_dir_are_not_classes(hmdb, tmp_path):
    videos, splits = hmdb
    os.makedirs(os.path.join(videos, '.cache'))
    os.makedirs(os.path.join(videos, '__MACOSX'))  # (a zip made on macOS)
    inside = os.path.join(videos, 'meta', 'splits')
    os.makedirs(inside)
    for name in os.listdir(splits):
        os.link(os.path.join(splits, name), os.path.join(inside, name))
    assert Hmdb51Clips(videos, inside, 'train').classes == list(CLASSES)
