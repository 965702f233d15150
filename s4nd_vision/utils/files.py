"""Writing result files so that an interrupted write never leaves a truncated one."""
import os
import tempfile
from contextlib import contextmanager
from typing import Iterator

__all__ = ['replaced_atomically']


@contextmanager
def replaced_atomically(path: str) -> Iterator[str]:
    """Yield a new temporary path next to `path` to write to; when the block completes it replaces `path` in one
    rename (an interrupted or failed write leaves the previous file, and no temporary one).

    The temporary file's name is unique (two writers never share one, no other file is touched), its data reach
    the disk before the rename, the replaced file keeps its permissions (a new one gets the umask's), and a
    symbolic link at `path` keeps pointing at its target, which is the file replaced."""
    target = os.path.realpath(path)
    folder, name = os.path.split(target)
    handle, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=folder)
    os.close(handle)
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        if os.path.exists(target):
            mode = os.stat(target).st_mode
        else:  # (mkstemp made it 0600)
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode & 0o7777)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
