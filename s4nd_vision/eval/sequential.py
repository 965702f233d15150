"""Sequential MNIST-5k at other sampling rates: train 1D models on digits flattened to pixel sequences at one
length, test them on the same validation digits at half and double the length.

Each digit is resampled to `rows` x `cols` and read in raster order; the test sequences change `cols` only
(cols / 2, cols * 2), so every row is the same signal sampled at half or double the rate. S4 models
(`s4nd_seq_*`) are referenced to the training length and follow the rate; the depthwise-conv baseline
(`conv_seq_*`) has a kernel fixed in samples.
"""
import math
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..data import SequentialMNIST5k
from ..layers.ops import is_int
from ..models.s4_seq import MNIST_MEAN, MNIST_STD
from ..train.optim import param_groups_ssm
from ..utils.model_spec import parse_model_spec
from ..utils.seeding import seed_all
from .accuracy import topk_hits

__all__ = ['run_sequential_mnist', 'format_table']


def _normalize(sequence: torch.Tensor) -> torch.Tensor:
    return (sequence - MNIST_MEAN[0]) / MNIST_STD[0]


def _accuracy(model: torch.nn.Module, dataset, batch_size: int, name: str = 'model') -> float:
    """Top-1 accuracy; a sequence whose logits hold a NaN or inf is a miss, warned about (argmax ranks a NaN first:
    a model that blows up at a test length read as one at chance, about 10%)."""
    model.eval()
    hits = nonfinite = 0
    with torch.inference_mode():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            logits = model(x)
            hits += topk_hits(logits, y, k=1)[:, 0].sum().item()
            nonfinite += int((~logits.isfinite().all(dim=1)).sum())
    if nonfinite:
        warnings.warn(f'{name} at {dataset[0][0].shape[-1]} samples: {nonfinite} of {len(dataset)} sequences gave '
                      'non-finite logits (scored as misses)', RuntimeWarning)
    return hits / len(dataset)


def run_sequential_mnist(
        models: Sequence[str] = ('s4nd_seq_tiny', 'conv_seq_tiny'),
        rows: int = 14,
        cols: int = 14,
        epochs: int = 3,
        batch_size: int = 50,
        lr: float = 1e-2,
        ssm_lr: float = 1e-3,
        weight_decay: float = 0.01,
        train_limit: Optional[int] = None,
        model_kwargs: Optional[Mapping] = None,
        seed: int = 0,
        log=print,
) -> List[Dict]:
    """Train each of `models` on the MNIST-5k train split as sequences of rows * cols samples (AdamW, cosine
    schedule, SSM parameters at `ssm_lr` without weight decay), then report its validation accuracy at
    cols / 2, cols and cols * 2 samples per row (a sequence with non-finite logits a miss, warned about). One row per
    model: {'model', 'train_len', 'acc@<len>': ...}.

    `models` are timm names, each with constructor arguments of its own as `NAME,key=value,...`
    (`parse_model_spec`, e.g. 's4nd_seq_tiny,kernel=sgconv'); `model_kwargs` go to every model's constructor;
    `train_limit` keeps n training digits chosen at random by `seed` (the split is sorted by class: its first n
    digits would hold one or two classes). `seed` picks the initialization, the batches and those digits; the
    train/validation split is MNIST-5k's fixed one (`MNIST5k`'s seed 0), as for the other tools: a mean over seeds
    measures the training's spread on one validation set, not a mix of validation sets.
    """
    if isinstance(models, str):  # (iterated, each letter was a model: "Unknown model (s)")
        raise ValueError(f'models must be a sequence of model names (NAME or NAME,key=value,...), got the string '
                         f'{models!r}: pass [{models!r}]')
    specs = [parse_model_spec(spec) for spec in models]  # (malformed ones fail before any training)
    fixed = {'seq_len': 'rows x cols', 'in_chans': '1', 'num_classes': '10'}
    for spec, (_, kwargs) in zip(models, specs):
        for key in fixed.keys() & {**(model_kwargs or {}), **kwargs}.keys():
            raise ValueError(f'{spec}: {key} is set by the task ({fixed[key]}), not a model argument here')
    if cols < 2 or cols % 2:
        raise ValueError(f'cols must be a positive even number (the test lengths are cols / 2 and cols * 2), '
                         f'got {cols}')
    # (a float passed the checks and failed in range() after the data and models were built; True trained 1 epoch)
    if not is_int(epochs) or epochs < 1:
        raise ValueError(f'epochs must be a positive integer, got {epochs!r}')
    if train_limit is not None and (not is_int(train_limit) or train_limit < 1):
        raise ValueError(f'train_limit must be a positive number of digits, got {train_limit!r}')
    if not is_int(batch_size):
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
    for key, value in (('lr', lr), ('ssm_lr', ssm_lr)):  # (AdamW checks its default lr only: a group's NaN trains on)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f'{key} must be a positive finite number, got {value}')
    train = SequentialMNIST5k('train', rows=rows, cols=cols, transform=_normalize)
    rows, cols = train.rows, train.cols  # (Python ints, also for NumPy's: the rows' lengths go to JSON)
    if train_limit is not None:
        chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:train_limit]
        train = Subset(train, chosen.sort().values.tolist())
    if not 1 <= batch_size <= len(train):  # (full batches only: a larger one would train nothing)
        raise ValueError(f'batch_size must be in [1, {len(train)}] (the training digits), got {batch_size}')
    tests = {rows * c: SequentialMNIST5k('val', rows=rows, cols=c, transform=_normalize)
             for c in (cols // 2, cols, cols * 2)}
    for spec, (name, kwargs) in zip(models, specs):  # every model builds before any trains (minutes each)
        try:
            timm.create_model(name, in_chans=1, num_classes=10, seq_len=rows * cols, **dict(model_kwargs or {},
                                                                                           **kwargs))
        except TypeError as e:
            if "'seq_len'" not in str(e):
                raise
            raise ValueError(f'{spec}: not a sequence model (it takes no seq_len): seq-mnist trains 1D models such '
                             f'as s4nd_seq_tiny and conv_seq_tiny') from None
    results = []
    for spec, (name, kwargs) in zip(models, specs):
        seed_all(seed)
        model = timm.create_model(name, in_chans=1, num_classes=10, seq_len=rows * cols,
                                  **dict(model_kwargs or {}, **kwargs))
        optimizer = torch.optim.AdamW(
            param_groups_ssm(model, weight_decay=weight_decay, ssm_lr=ssm_lr), lr=lr, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)
        total = epochs * len(loader)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        for epoch in range(epochs):
            model.train()
            running = 0.0
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                running += loss.item()
            log(f'{spec} epoch {epoch + 1}/{epochs}: train loss {running / len(loader):.3f}')
        row = dict(model=spec, train_len=rows * cols)
        for length, dataset in tests.items():
            row[f'acc@{length}'] = _accuracy(model, dataset, batch_size, name=spec)
        log(', '.join(f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))
        results.append(row)
    return results


def format_table(rows: Sequence[Dict]) -> str:
    """Markdown table: one line per model, validation accuracy (%) per test length."""
    if not rows:
        return ''
    lengths = [k for k in rows[0] if k.startswith('acc@')]
    train_len = rows[0]['train_len']
    head = ['model'] + [f'{k[4:]} samples' + (' (train)' if int(k[4:]) == train_len else '') for k in lengths]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for row in rows:
        lines.append('| ' + ' | '.join([f"`{row['model']}`"] + [f'{100 * row[k]:.1f}' for k in lengths]) + ' |')
    return '\n'.join(lines)
