"""Zero-shot resolution evaluation: the accuracy of one or more models at a list of input resolutions.

S4ND models know the grid they were trained on (built for it: `load_model(img_size=...)`; weight files
written by the trainer also hold it), and their kernels' step size follows each input, so a model
trained at 14 px sees the same continuous kernels at 28 px; plain timm models (e.g. `convnext_tiny`)
simply run at the new size. Each model is fed the way timm evaluates it: its own pretrained cfg gives
mean, std, interpolation and crop.

    models = {name: load_model(name, ckpt, num_classes=10, img_size=14) for name, ckpt in ...}
    rows = eval_resolution(models, 'mnist', [14, 20, 28, 42], train_resolution=14, out_dir='output/zero_shot')
    print(format_table(rows))
"""
import contextlib
import csv
import os
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.data import create_dataset, create_transform
from timm.data.dataset_factory import _search_split
from timm.layers import PatchEmbed, to_2tuple
from timm.models import get_model_input_config
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data import MNIST5k
from ..data.images import ImageFolderDataset, check_class_folders, check_folder_links, folder_class_to_idx
from ..data.transforms import mnist_transform, model_data_config
from ..layers import S4ND, drop_inference_caches, set_bandlimit
from ..layers.ops import is_int
from ..models import input_size_args
from ..models._checkpoint import WEIGHTS_FILE_HINT, file_shape, weights_num_classes
from ..utils import replaced_atomically
from ..utils.runtime import progress_refresh_s
from .accuracy import topk_hits

__all__ = [
    'load_model', 'same_model_argument', 'dataset_num_classes', 'min_input_size', 'check_resolutions',
    'eval_resolution', 'format_table', 'write_csv', 'plot_accuracy', 'CSV_NAME', 'PLOT_NAME',
]

CSV_NAME = 'accuracy_vs_resolution.csv'
PLOT_NAME = 'accuracy_vs_resolution.png'
BUILTIN = 'mnist'  # the built-in dataset: MNIST-5k, its deterministic 'val' split


def load_model(
        name: str,
        checkpoint: Optional[str] = None,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        bandlimit: Optional[float] = None,
        img_size: Optional[int] = None,
        model_kwargs: Optional[Mapping] = None,
) -> nn.Module:
    """`timm.create_model(name)` in eval mode, with weights from a local checkpoint or from the name.

    Args:
        name: registered timm model name, or shared weights: 'hf-hub:USER/REPO' or 'local-dir:PATH' (loaded
            as with `pretrained=True`; see s4nd_vision.deploy.hub).
        checkpoint: safetensors or torch file (wrapped state dicts, 'state_dict' / 'model' / EMA, load too).
        num_classes: classifier outputs; None: those of the checkpoint's classifier (`weights_num_classes`), else
            the model's default (shared weights: their config's).
        in_chans: passed to `timm.create_model` when given.
        img_size: the resolution the weights were trained at: this package's models are built for it (their
            S4ND kernels' reference grids, which weight files written by earlier versions do not hold); timm
            models that take a size (ViTs) are set to it; others ignore it. Weights (a checkpoint, or shared ones
            where a size is given) that hold another grid keep it (they were trained at another size): a warning
            names both, and the model is set to the weights' (a checkpoint without a size given, silently: it
            states the size its weights were trained at; shared weights then state their config's).
        bandlimit: band-limiting cut-off set on every S4ND kernel after loading (None leaves the one saved with
            the weights, else the model's own); models without S4ND layers are unaffected.
        model_kwargs: further `timm.create_model` arguments (those the model was trained with).
    """
    if checkpoint is not None and os.path.isdir(checkpoint):  # (e.g. a training checkpoint, step-N: its weights are
        # model.safetensors; a shared-weights folder is 'local-dir:PATH' as the model name)
        raise IsADirectoryError(f'checkpoint {checkpoint!r} is a folder, not a weights file: {WEIGHTS_FILE_HINT} '
                                f'(a folder saved for the Hub loads as the model local-dir:PATH)')
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint!r}')
    kwargs = dict(model_kwargs or {})
    _check_no_clash(kwargs, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    if num_classes is None and 'num_classes' not in kwargs:
        num_classes = weights_num_classes(name, checkpoint)
    kwargs.update({k: v for k, v in dict(num_classes=num_classes, in_chans=in_chans).items() if v is not None})
    if img_size is not None and input_size_args(name):
        kwargs['img_size'] = img_size
    shared = name.startswith(('hf-hub:', 'local-dir:'))  # the name is the weights: never a random init of them
    _check_shared_folder(name)
    model = timm.create_model(name, pretrained=shared and checkpoint is None, **kwargs)
    if img_size is not None and hasattr(model, 'set_input_size'):
        model.set_input_size(img_size)
    if checkpoint is not None:
        try:
            timm.models.load_checkpoint(model, checkpoint, strict=True)
        except RuntimeError as e:
            if 'Error(s) in loading state_dict' not in str(e):
                raise
            _check_input_channels(model, name, checkpoint)
            detail = ' '.join(str(e).split('\n', 1)[-1].split())
            detail = detail if len(detail) <= 300 else detail[:300] + '...'
            built = {k: v for k, v in (model_kwargs or {}).items() if k != 'pretrained_cfg_overlay'}
            raise ValueError(
                f'the weights in {checkpoint!r} do not fit {name} built with {built or "its defaults"} '
                f'({detail}): build it with the arguments it was trained with (eval-resolution: '
                f'--models NAME,key=value,...; kernel-report, export: --model-kwargs key=value ...)') from None
    stated = img_size if img_size is not None else kwargs.get('img_size')
    # shared weights where a size is given (without one they state their config's, which may be another on purpose)
    weights = checkpoint if checkpoint is not None else name if shared and stated is not None else None
    if weights is not None:
        # the saved reference grids replace those built for img_size: the model says the size they were trained at
        # (also where no size was given: else it would state its default, and so would the data config and the
        # metadata of an exported file, and preprocessing would resize to that); shared weights set to img_size
        # above stated it without a word (and a plot marked it as the training size)
        trained = model.reference_img_size() if hasattr(model, 'reference_img_size') else None
        if trained is not None and tuple(trained) != tuple(model.img_size):
            if stated is not None:
                px = f'{trained[0]} px' if trained[0] == trained[1] else f'{trained[0]}x{trained[1]} px'
                warnings.warn(f'{weights!r} holds weights trained at {px} (their S4ND reference grids), not '
                              f'at img_size={stated}: they are evaluated as trained at {px}',
                              UserWarning)
            model.set_input_size(trained)
    if bandlimit is not None:
        set_bandlimit(model, bandlimit)
    return model.eval()


def _check_shared_folder(name: str) -> None:
    """A 'local-dir:PATH' must be a folder saved for the Hub (config.json beside the weights): timm's own error
    ("Config file not found") says nothing of what to give instead, e.g. for a run's output folder or a training
    checkpoint (step-N), whose weights load as a checkpoint file of the registered model."""
    if not name.startswith('local-dir:'):
        return
    folder = name[len('local-dir:'):]
    if os.path.isfile(os.path.join(folder, 'config.json')):
        return
    what = 'has no config.json' if os.path.isdir(folder) else 'is not a folder'
    raise FileNotFoundError(
        f'{name!r}: {folder!r} {what}, so it is not weights saved for the Hub (s4nd_vision.deploy.save_for_hf or '
        f'timm.models.save_for_hf write config.json beside them); for a run\'s weights give the registered model '
        f'name and the file as the checkpoint (e.g. best.safetensors, or a training checkpoint\'s model.safetensors)')


def same_model_argument(key: str, a: object, b: object) -> bool:
    """Whether two values of the model argument `key` build the same model: an `img_size` of one side S is the square
    (S, S), however spelt (64, [64, 64], (64, 64)); other arguments compare as they are."""
    return to_2tuple(a) == to_2tuple(b) if key == 'img_size' else a == b


def _check_no_clash(model_kwargs: Mapping, **given) -> None:
    """A ValueError naming both values where an argument of `load_model` and `model_kwargs` set the same model
    argument to different values (else one would silently win: another model than the other one says)."""
    for key, value in given.items():
        if value is None or key not in model_kwargs:
            continue
        if not same_model_argument(key, value, model_kwargs[key]):
            raise ValueError(
                f'{key}={value!r} and model_kwargs {key}={model_kwargs[key]!r} disagree: give it once '
                f'(eval-resolution: --in-chans, --train-resolution or --models NAME,key=value; kernel-report: '
                f'--num-classes, --in-chans, --img-size or --model-kwargs)')


def _check_input_channels(model: nn.Module, name: str, checkpoint: str) -> None:
    """A one-line error naming the input channels when the weights' first conv takes other channels than the
    model's (e.g. the demo's 1-channel digits), the likeliest cause of a load that failed."""
    first_conv = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    try:
        own = model.get_parameter(f'{first_conv}.weight').shape if first_conv else None
    except AttributeError:  # (a first_conv the model has not: nothing to say)
        return
    saved = file_shape(checkpoint, f'{first_conv}.weight') if own is not None else None
    if saved is not None and len(saved) == len(own) > 1 and saved[1] != own[1]:
        raise ValueError(
            f'the weights in {checkpoint!r} take {saved[1]} input channels, {name} was built for {own[1]}: give '
            f'in_chans={saved[1]} (eval-resolution, kernel-report: --in-chans {saved[1]}; export: --model-kwargs '
            f'in_chans={saved[1]})')


def dataset_num_classes(data: str, split: str = 'validation') -> int:
    """Number of classes of `data` ('mnist' or an ImageFolder directory: those of its training split, when it has
    one, as the trainer numbers them)."""
    if data == BUILTIN:
        return len(MNIST5k.classes)
    return _num_classes(_image_folder(data, split))


def _num_classes(dataset: Dataset) -> int:
    return len(MNIST5k.classes) if isinstance(dataset, MNIST5k) else len(dataset.reader.class_to_idx)


_SPLIT_FOLDERS = ('train', 'training', 'val', 'valid', 'validation', 'eval', 'evaluation', 'test')
TRAIN_SPLIT = 'train'  # the trainer's data.train_split (or timm's 'training'): the classes a trained model knows


def _image_folder(root: str, split: str, **kwargs) -> Dataset:
    """The `split` of ImageFolder `root`, its labels the training split's class numbers when `root` has one (as the
    trainer validates: a class without images in `split` shifts no label); classes only in `split` are refused.
    Only the split's folder is walked: the training split's classes are its folders (`folder_class_to_idx`)."""
    if not os.path.isdir(root):
        raise ValueError(f"data must be {BUILTIN!r} or an ImageFolder directory, got {root!r}")
    folder = _search_split(root, split)  # the split's folder as timm's create_dataset finds it
    splits = sorted(d for d in os.listdir(root) if d in _SPLIT_FOLDERS and os.path.isdir(os.path.join(root, d)))
    if splits and os.path.samefile(folder, root):  # timm falls back to the root: every split as classes
        raise ValueError(f'{root!r} holds no folder for split {split!r} (nor a synonym timm accepts) but holds the '
                         f'split folders {splits}: pass one of them as the split')
    check_folder_links(folder)  # before timm's reader walks (and multiplies) a symlink loop
    ds = create_dataset('', root=root, split=split, **kwargs)
    if len(ds) == 0:
        raise ValueError(f'no images found under {root!r} (expected [<split>/]<class>/<image>)')
    train = _search_split(root, TRAIN_SPLIT)  # ('train', else timm's synonym 'training'; else the root: none)
    other = (os.path.isdir(train) and not os.path.samefile(train, root)
             and not os.path.samefile(train, ds.reader.root))
    classes = folder_class_to_idx(train) if other else ds.reader.class_to_idx
    mapped = ds.reader.class_to_idx != classes
    if mapped:  # (as the trainer's ImageFolderData: the training classes' numbers)
        unknown = sorted(set(ds.reader.class_to_idx) - set(classes))
        if unknown:
            raise ValueError(f'{ds.reader.root!r} holds images of classes the training split {train!r} has none of '
                             f'(so no model trained on it knows them): {unknown[:5]}')
        ds = create_dataset('', root=root, split=split, class_map=classes, **kwargs)
    # (as training checks them; a class map numbers the classes itself, not in timm's order)
    check_class_folders(ds.reader.root, ds.reader.samples, None if mapped else ds.reader.class_to_idx)
    # samples (image, target, skipped): 16-bit images scaled, unreadable ones replaced with a warning
    return ImageFolderDataset(root, reader=ds.reader, input_img_mode=ds.input_img_mode, transform=ds.transform)


def min_input_size(model: nn.Module) -> int:
    """Smallest side the model accepts: its `min_input_size`, else its total stride (timm's feature_info), else 1."""
    size = getattr(model, 'min_input_size', None)
    if size is None:
        size = max((f['reduction'] for f in getattr(model, 'feature_info', None) or [] if 'reduction' in f), default=1)
    return int(size)


def check_resolutions(resolutions: Sequence[int], models: Optional[Mapping[str, nn.Module]] = None) -> List[int]:
    """Validate `resolutions` (positive integers, NumPy's too, each given once, each at least every model's minimum
    input size, only its own size for a model that takes no other: timm's `fixed_input_size`, and each one the
    model's own input check accepts: e.g. a ViT-S4ND's patch-size multiples, and a timm ViT's unless it pads; a
    sequence model, whose input has no sides, is refused), before any evaluation; returns them as Python ints."""
    resolutions = list(resolutions)
    if not resolutions:
        raise ValueError('resolutions must list at least one resolution')
    bad = [r for r in resolutions if not is_int(r) or r < 1]
    if bad:
        raise ValueError(f'resolutions must be positive integers (pixels per side), got {bad}')
    resolutions = [int(r) for r in resolutions]  # (NumPy's too, e.g. np.arange: Python ints in the rows and CSV)
    repeated = sorted({r for r in resolutions if resolutions.count(r) > 1})
    if repeated:  # (evaluated twice, or a study's table with two columns of one name)
        raise ValueError(f'resolutions must each be given once, got {repeated} more than once')
    for name, model in (models or {}).items():
        # (C, H, W), (C, T, H, W) or (C, L); a model without a pretrained_cfg (not built by timm) takes images
        input_size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))
        if len(input_size) < 3:  # (its input check would refuse the first batch, after the data were built)
            raise ValueError(f'{name!r} takes sequences (its input_size is {tuple(input_size)}): resolutions are the '
                             f'sides of images and clips')
        smallest = min_input_size(model)
        too_small = [r for r in resolutions if r < smallest]
        if too_small:
            raise ValueError(
                f'resolutions {too_small} are smaller than the minimum input size of {name!r} ({smallest} px)')
        config = get_model_input_config(model)
        own = tuple(config['input_size'][-2:])
        other = [r for r in resolutions if (r, r) != own]
        if config['fixed_input_size'] and other:
            raise ValueError(
                f"resolutions {other}: {name!r} takes only its own input size {own[0]}x{own[1]} (timm's "
                f"fixed_input_size); a timm ViT takes any with dynamic_img_size=true "
                f"(--models NAME,dynamic_img_size=true)")
        check_input = getattr(model, '_check_input', None)  # this package's models: what their forward checks first
        patch_embed = getattr(model, 'patch_embed', None)  # a timm ViT of dynamic_img_size: patch multiples unless
        # dynamic_img_pad (its forward asserts them only when it reaches the size, after the other sizes' work)
        if check_input is None and isinstance(patch_embed, PatchEmbed) and patch_embed.img_size is not None and not (
                patch_embed.strict_img_size or patch_embed.dynamic_img_pad):
            patch = tuple(patch_embed.patch_size)
            other = [r for r in resolutions if r % patch[0] or r % patch[1]]
            if other:
                raise ValueError(
                    f'resolutions {other}: {name!r} takes multiples of its patch size {patch[0]}x{patch[1]} (any '
                    f'size with dynamic_img_pad=true: eval-resolution --models NAME,dynamic_img_size=true,'
                    f'dynamic_img_pad=true; training: model.kwargs.dynamic_img_pad: true)')
        # (C,) or a video model's (C, T) before the sides; none for a sequence model (its input has no sides)
        layout = check_input is not None and hasattr(model, 'input_size') and model.input_size()[:-2]
        for r in resolutions if layout else ():
            try:  # (a meta tensor: its shape is checked, nothing is allocated or computed)
                check_input(torch.empty(1, *layout, r, r, device='meta'))
            except ValueError as e:
                raise ValueError(f'resolution {r}: {name!r} does not take it ({e})') from None
    return resolutions


def _dataset(data: str, split: str, resolution: int, model_cfg: dict, crop_pct: Optional[float],
             listed: Dict[str, Dataset]) -> Dataset:
    """`data` as model `model_cfg` expects it at `resolution`: channels, resampling, normalization. `listed`: the
    image folder's split as listed and checked by an earlier call of the same evaluation, per image mode (a folder
    is walked once, not once per model and resolution)."""
    chans = model_cfg['input_size'][0]
    if data == BUILTIN:  # resampled from the 28 px originals, as the trainer feeds them
        return MNIST5k('val', img_size=28, in_chans=chans, transform=mnist_transform(resolution, model_cfg))
    crop = model_cfg['crop_pct'] if crop_pct is None else crop_pct
    common = dict(interpolation=model_cfg['interpolation'], mean=model_cfg['mean'], std=model_cfg['std'])
    transform = create_transform((chans, resolution, resolution), is_training=False, crop_pct=crop,
                                 crop_mode=model_cfg.get('crop_mode', 'center'), **common)
    mode = 'L' if chans == 1 else 'RGB'
    if mode not in listed:
        listed[mode] = _image_folder(data, split, input_img_mode=mode)
    return ImageFolderDataset(data, reader=listed[mode].reader, input_img_mode=mode, transform=transform)


@torch.inference_mode()
def eval_resolution(
        models: Mapping[str, nn.Module],
        data: str,
        resolutions: Sequence[int],
        train_resolution: Optional[int] = None,
        split: str = 'validation',
        batch_size: int = 64,
        device: str = 'cpu',
        num_workers: int = 0,
        crop_pct: Optional[float] = None,
        out_dir: Optional[str] = None,
        progress: bool = True,
) -> List[Dict]:
    """Top-1/top-5 accuracy (%) of every model at every resolution.

    Args:
        models: display name -> model (moved to `device` and put in eval mode). Images are cast to the dtype of
            its weights: a `model.half()` or bfloat16 model is evaluated in it (as timm's validate.py
            --model-dtype); its logits are scored as they are.
        data: 'mnist' (the built-in MNIST-5k validation split) or an ImageFolder directory
            (its `split` sub-folder when present, found as timm's `create_dataset` does).
        resolutions: input sides in pixels.
        train_resolution: the resolution the models were trained at (checked, marked on the plot); build
            the models for it (`load_model(img_size=...)`). Where the S4ND models all state another native size
            (e.g. `load_model` found weights trained at it), the plot marks theirs.
        split: the ImageFolder's split ('mnist': 'validation' or 'val', its only split here).
        crop_pct: center-crop fraction for ImageFolder data (None = each model's pretrained cfg; refused for 'mnist',
            whose digits are not cropped: None or 1.0 there).
        out_dir: if given, the rows are written there as CSV_NAME and plotted as PLOT_NAME, both rewritten as each
            row is measured (an interrupted run leaves the rows measured, and their plot; an earlier evaluation's
            files there are removed once the models and data are checked, before the first row).

    Returns:
        One dict per (model, resolution): model, resolution, top1, top5, n (images scored), skipped (unreadable
        images: their stand-ins are not scored), nonfinite (images scored whose logits hold a NaN or inf: never a
        hit, and warned about, so that a model that blows up is not read as one at chance).
    """
    if not models:
        raise ValueError('models must hold at least one model')
    if crop_pct is not None and not 0 < crop_pct <= 1:  # (timm's create_transform reads 0 as its default, 0.875)
        raise ValueError(f"crop_pct must be in (0, 1], or None for each model's, got {crop_pct!r}")
    if data == BUILTIN:  # (else accepted and ignored: the table would read as of the crop or split asked for)
        if crop_pct not in (None, 1.0):  # (as the trainer refuses data.crop_pct for them)
            raise ValueError(f'crop_pct (--crop-pct) crops ImageFolder data; {BUILTIN!r} digits are resampled whole, '
                             f'as the trainer feeds them (no crop): None or 1.0, got crop_pct={crop_pct!r}')
        if split not in ('validation', 'val'):
            raise ValueError(f"split (--split): {BUILTIN!r} is MNIST-5k's validation split only, got split {split!r}")
    resolutions = check_resolutions(resolutions, models)
    for name, model in models.items():  # (the data are images: a clip model's input check refused the first batch)
        input_size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or ()
        if len(input_size) == 4:
            raise ValueError(f'{name!r} takes video clips (its input_size is {tuple(input_size)}): eval_resolution '
                             'scores images; evaluate video models on their clips (the trainer, data.dataset hmdb51)')
    if train_resolution is not None:
        check_resolutions([train_resolution], models)
    if out_dir is not None:  # the resolution the plot marks
        stated = {get_model_input_config(m)['input_size'][-1] for m in models.values()
                  if any(isinstance(layer, S4ND) for layer in m.modules())}
        mark = stated.pop() if train_resolution is not None and len(stated) == 1 else train_resolution
    # every model's data first (lazy: nothing is read), so that a model the data do not fit (channels, classes) is
    # refused before any work, not after the models before it were evaluated
    listed, model_loaders = {}, {}
    for name, model in models.items():
        cfg = model_data_config(model)
        chans = cfg['input_size'][0]
        if chans not in (1, 3):  # (images are read as grayscale or RGB: another count failed in the first batch)
            raise ValueError(f'{name!r} takes {chans} input channels: eval_resolution reads images as grayscale '
                             f'(in_chans 1) or RGB (in_chans 3)')
        loaders = [
            DataLoader(_dataset(data, split, r, cfg, crop_pct, listed), batch_size=batch_size, num_workers=num_workers)
            for r in resolutions
        ]
        classes = _num_classes(loaders[0].dataset)
        if getattr(model, 'num_classes', classes) != classes:  # (targets are indices into the folder's classes)
            raise ValueError(
                f'{name} classifies {model.num_classes} classes, but {data!r} ({split}) holds {classes} class '
                f'folders: its labels would not be the model\'s (a class missing from the split, or an extra folder?)')
        model_loaders[name] = loaders
    if out_dir is not None:  # an earlier evaluation's results go: a run that fails before its first row leaves
        os.makedirs(out_dir, exist_ok=True)  # none of them beside it, to be read as its own; and a folder that
        for file in (CSV_NAME, PLOT_NAME):  # cannot be made (a file, no permission) fails before the first row's work
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, file))
    rows = []
    for name, model in models.items():
        model.eval().to(device)
        # (the transforms give float32 images: cast to the weights' dtype, which the first layer expects)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        loaders = model_loaders[name]
        with tqdm(total=sum(len(l) for l in loaders), desc=name, unit='batch', disable=not progress,
                  mininterval=progress_refresh_s()) as bar:
            for resolution, loader in zip(resolutions, loaders):
                correct1 = correct5 = n = skipped = nonfinite = 0
                for images, targets, *counts in loader:  # image folders add a skip count per sample
                    logits = model(images.to(device=device, dtype=dtype))
                    hits = topk_hits(logits, targets.to(device))
                    # an unreadable image's stand-in (another image, with its label) is not scored, as in training
                    read = (counts[0] == 0).to(hits.device) if counts else torch.ones_like(hits[:, 0])
                    correct1 += hits[read, 0].sum().item()
                    correct5 += hits[read].any(dim=1).sum().item()
                    n += int(read.sum())
                    nonfinite += int((read & ~logits.isfinite().all(dim=1)).sum())
                    skipped += len(targets) - int(read.sum())
                    bar.update()
                if n == 0:
                    raise ValueError(f'{name} at {resolution} px: none of the {skipped} validation images is readable')
                if nonfinite:
                    warnings.warn(f'{name} at {resolution} px: {nonfinite} of {n} images gave non-finite logits '
                                  '(scored as misses)', RuntimeWarning)
                rows.append(dict(model=name, resolution=resolution, top1=100 * correct1 / n, top5=100 * correct5 / n,
                                 n=n, skipped=skipped, nonfinite=nonfinite))
                bar.set_postfix({f'{resolution}px': f'{rows[-1]["top1"]:.1f}%'})
                if out_dir is not None:  # (each row as soon as it is measured: a later failure keeps it)
                    write_csv(rows, os.path.join(out_dir, CSV_NAME))
                    # the plot of the same rows: an interrupted run leaves no plot of an earlier one beside them
                    plot_accuracy(rows, os.path.join(out_dir, PLOT_NAME), train_resolution=mark)
        drop_inference_caches(model)  # (the operators of its last sizes: not reused, held while the next model runs)
    return rows


def format_table(rows: Sequence[Dict]) -> str:
    """Markdown table: one line per model, one column per resolution, cells 'top-1 / top-5' (%); where a row has
    images with non-finite logits, a last column counts them per resolution."""
    resolutions = sorted({r['resolution'] for r in rows})
    by_model: Dict[str, Dict[int, Dict]] = {}
    for r in rows:
        by_model.setdefault(r['model'], {})[r['resolution']] = r
    flagged = any(r.get('nonfinite') for r in rows)
    lines = [
        '| model (top-1 / top-5 %) | ' + ' | '.join(f'{res} px' for res in resolutions)
        + (' | non-finite logits |' if flagged else ' |'),
        '|---|' + '---|' * (len(resolutions) + flagged),
    ]
    for model, cells in by_model.items():
        values = [
            f'{cells[res]["top1"]:.1f} / {cells[res]["top5"]:.1f}' if res in cells else '-' for res in resolutions]
        if flagged:
            counts = [f'{res} px: {c["nonfinite"]}/{c["n"]}' for res, c in sorted(cells.items()) if c.get('nonfinite')]
            values.append(', '.join(counts) or '-')
        lines.append(f'| {model} | ' + ' | '.join(values) + ' |')
    return '\n'.join(lines)


def write_csv(rows: Sequence[Dict], path: str) -> str:
    """Write the rows (model, resolution, top1, top5, n: images scored, skipped: unreadable ones, nonfinite: scored
    ones with non-finite logits) to `path` (through a temporary file: an interrupted write leaves the previous
    file), in UTF-8: the locale's encoding (Windows' cp1252) failed on a model's name it has no character for,
    after the first model was measured."""
    with replaced_atomically(path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=['model', 'resolution', 'top1', 'top5', 'n', 'skipped', 'nonfinite'])
        writer.writeheader()
        for r in rows:
            writer.writerow(dict(r, top1=f'{r["top1"]:.2f}', top5=f'{r["top5"]:.2f}'))
    return path


def plot_accuracy(rows: Sequence[Dict], path: str, train_resolution: Optional[int] = None,
                  title: str = 'Zero-shot resolution change') -> str:
    """Top-1 accuracy vs resolution, one line per model, saved as a PNG at `path` (`title`: what was measured)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or window state

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    models = list(dict.fromkeys(r['model'] for r in rows))
    for model in models:
        points = sorted((r['resolution'], r['top1']) for r in rows if r['model'] == model)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker='o', label=model)
    if train_resolution is not None:
        ax.axvline(
            train_resolution, color='gray', linestyle='--', linewidth=1, label=f'trained at {train_resolution} px')
    ax.set_xticks(sorted({r['resolution'] for r in rows}))
    ax.set_ylim(0, 100)
    ax.set_xlabel('test resolution (px)')
    ax.set_ylabel('top-1 accuracy (%)')
    import textwrap  # (a long title in lines the figure's width holds)
    ax.set_title('\n'.join(textwrap.fill(line, 70) for line in title.split('\n')), fontsize='medium')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format='png')
    return path
