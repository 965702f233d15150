"""Writing result files so that an interrupted write never leaves a truncated one."""
import os
from contextlib import contextmanager
from typing import Iterator

__all__ = ['replaced_atomically']


@contextmanager
def replaced_atomically(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path` to write to; when the block completes it replaces `path` in one rename
    (an interrupted or failed write leaves the previous file, and no temporary one)."""
    tmp = f'{path}.tmp'
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
