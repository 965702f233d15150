"""Test-session setup. Without CUDA the Triton kernels (tests/test_triton_*.py) run in Triton's CPU interpreter.
Triton reads TRITON_INTERPRET when it is first imported (its own language helpers are decorated then) and when
kernels are decorated, so it is set here, before any test module (or torch.compile) imports Triton."""
import os

if os.environ.get('PYTEST_XDIST_WORKER'):  # (pytest -n N: N workers share the cores; no oversubscribed OpenMP pools)
    os.environ.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1)
                                                      // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')))))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
