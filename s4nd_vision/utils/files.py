"""Writing result files so that an interrupted write never leaves a truncated one."""
import os
import re
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Dict, Iterator, Optional

if TYPE_CHECKING:
    import torch

__all__ = ['replaced_atomically', 'remove_temporaries', 'save_safetensors']

_TEMPORARY = re.compile(r'^\..+\.[a-z0-9_]{8}\.tmp$')  # `replaced_atomically`'s names: .<name>.<mkstemp's 8>.tmp


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status): setting and restoring
    it would give files other threads create meanwhile the permissions of umask 0."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode & 0o7777)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(tensors: Dict[str, 'torch.Tensor'], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """`tensors` as a safetensors file at `path`, written atomically (`replaced_atomically`). They are serialized in
    memory and written into `replaced_atomically`'s temporary: safetensors' `save_file` writes through a temporary of
    its own (`.tmpXXXXXX`, safetensors 0.8), which a process killed mid-write leaves behind at full size, unknown to
    `remove_temporaries`. A failed write (e.g. a full disk) raises an OSError that names `path`."""
    from safetensors.torch import save
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    try:
        with replaced_atomically(path) as tmp, open(tmp, 'wb') as f:
            f.write(data)
    except OSError as e:
        raise OSError(e.errno, f'writing {path}: {e.strerror or e}') from e


def remove_temporaries(folder: str) -> list:
    """Remove the temporary files `replaced_atomically` left in `folder` when its process was killed mid-write (no
    clean-up ran): each as large as the file it was to replace. Only for a folder no other process writes to (a
    run's, held by its lock). Returns the names removed."""
    removed = [name for name in os.listdir(folder) if _TEMPORARY.match(name)
               and os.path.isfile(os.path.join(folder, name))]
    for name in removed:
        os.remove(os.path.join(folder, name))
    return removed
