"""The records the S4ND layers save beside their weights, and a context whose state dicts leave them out.

S4ND saves its reference grid (`l_ref`), the SSM kernels their band-limit and SGConv its decay as int64 entries of
the state dict: neither parameters nor buffers (each layer reads them on the host), so that weights keep their
function in a layer built otherwise. torch's distributed state-dict utilities (`set_model_state_dict`, which
Accelerate's FSDP2 uses to load full checkpoints) list parameters, buffers and extra states only: they refuse such
an entry, or load it on rank 0 only. Within `state_dict_without_records()` the layers neither save nor expect them.
"""
import contextlib
import warnings
from contextvars import ContextVar
from typing import Iterator, List, Optional

import torch

__all__ = ['records_in_state_dict', 'state_dict_without_records', 'record_ints', 'record_float']

_RECORDS: ContextVar[bool] = ContextVar('s4nd_state_dict_records', default=True)


def records_in_state_dict() -> bool:
    """Whether the layers' state dicts hold their records (outside `state_dict_without_records`)."""
    return _RECORDS.get()


@contextlib.contextmanager
def state_dict_without_records() -> Iterator[None]:
    """State dicts of parameters and buffers only, and loads that do not expect the records (no warning of their
    absence; records a file holds still load): for checkpoints of a model that is always rebuilt from the same
    config, e.g. the trainer's FSDP checkpoints (its exported weights keep the records)."""
    token = _RECORDS.set(False)
    try:
        yield
    finally:
        _RECORDS.reset(token)


# Tools that convert every entry of a state dict to floating point (timm's avg_checkpoints.py averages in float64
# and writes float32) turn the int64 records into floats: they are read back from those too.

def record_ints(value: torch.Tensor) -> Optional[List[int]]:
    """The integers of a 1-D record (a reference grid), also from a record converted to floating point (whole
    values only); None for anything else."""
    if value.ndim != 1 or value.is_complex() or value.dtype == torch.bool:
        return None
    if value.is_floating_point():
        whole = bool(value.isfinite().all()) and bool((value == value.round()).all())
        return [int(v) for v in value.tolist()] if whole else None
    return value.tolist()


def record_float(value: torch.Tensor, own: float, name: str) -> Optional[float]:
    """The float64 value that a record of one int64 holds as its bits (a band-limit, a decay); None for anything
    else. A record converted to floating point holds the bits rounded (float32: to about 1e-4 of the value): it
    reads as `own`, the layer's value, where that rounds to the same, else as the value of the rounded bits, with a
    warning naming the record (`name`, e.g. 'bandlimit': one warning for all layers)."""
    if value.numel() != 1:
        return None
    value = value.reshape(()).cpu()
    if value.dtype == torch.int64:
        return value.view(torch.float64).item()
    # (the bits of a normal float64 are 2 ** 52 to 2 ** 63 in size: a smaller float is a value saved as such, not bits)
    if not value.is_floating_point() or not (value.item() == 0 or 2 ** 52 <= abs(value.item()) < 2 ** 63):
        return None
    if value.item() == 0:  # (0.0's bits, 0, convert exactly, and no other bits round to 0: nothing was lost)
        return 0.0
    own_bits = torch.tensor(float(own), dtype=torch.float64).view(torch.int64)
    if own_bits.to(value.dtype) == value or own_bits.double().to(value.dtype) == value:  # (rounded once or twice)
        return float(own)
    read = torch.tensor(round(value.item()), dtype=torch.int64).view(torch.float64).item()
    warnings.warn(f'the {name} records, saved as float64 bits, were converted to {value.dtype} (e.g. by checkpoint '
                  f'averaging): read as {read} (their bits rounded); build the model with the value it was trained '
                  f'with to load it exactly', stacklevel=3)
    return read
