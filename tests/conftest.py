"""Test-session setup. Without CUDA the Triton kernels (tests/test_triton_*.py) run in Triton's CPU interpreter.
Triton reads TRITON_INTERPRET when it is first imported (its own language helpers are decorated then) and when
kernels are decorated, so it is set here, before any test module (or torch.compile) imports Triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
