"""The records the S4ND layers save beside their weights, and a context whose state dicts leave them out.

S4ND saves its reference grid (`l_ref`), the SSM kernels their band-limit and SGConv its decay as int64 entries of
the state dict: neither parameters nor buffers (each layer reads them on the host), so that weights keep their
function in a layer built otherwise. torch's distributed state-dict utilities (`set_model_state_dict`, which
Accelerate's FSDP2 uses to load full checkpoints) list parameters, buffers and extra states only: they refuse such
an entry, or load it on rank 0 only. Within `state_dict_without_records()` the layers neither save nor expect them.
"""
import contextlib
from contextvars import ContextVar
from typing import Iterator

__all__ = ['records_in_state_dict', 'state_dict_without_records']

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
