"""Process settings that S4ND's CPU speed depends on."""
import ctypes
import ctypes.util
import sys

__all__ = ['keep_freed_memory', 'progress_refresh_s', 'LOG_REFRESH_S']

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed memory in the process, as `MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=-1` in the environment would: large temporaries (activations, Toeplitz
    products, FFT buffers) are then reused instead of being returned to the OS after every free and
    page-faulted in again, a cost S4ND's large per-call temporaries pay on every step on CPU (the
    README's benchmark shows both allocators). The resident memory stays at its peak. Returns False,
    changing nothing, where the C library is not glibc.
    """
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


LOG_REFRESH_S = 60.0  # a progress bar's redraws into a log file or pipe: one a minute at most


def progress_refresh_s() -> float:
    """The least seconds between a progress bar's redraws (tqdm's `mininterval`): tqdm's 0.1 where stderr is a
    terminal or in a Jupyter kernel (tqdm.auto's widgets); `LOG_REFRESH_S` into a log file or a pipe (nohup, a batch
    job's log), which kept every redraw, several a second for the whole run, where a line a minute shows progress."""
    terminal = 'ipykernel' in sys.modules or bool(getattr(sys.stderr, 'isatty', lambda: False)())
    return 0.1 if terminal else LOG_REFRESH_S
