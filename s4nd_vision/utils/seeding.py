"""Deterministic seeds for resumable runs: every random draw is seeded from what identifies it.

The trainer seeds each sample's augmentation from (seed, epoch, index) and each micro-step from
(seed, step, rank), so a run resumed from a checkpoint draws exactly what the uninterrupted run drew.
"""
import hashlib
import random

import numpy as np
import torch

__all__ = ['seed_from', 'seed_all']


def seed_from(*parts) -> int:
    """A 63-bit seed derived deterministically from `parts` (ints or strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') >> 1


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (timm's transforms and Mixup use all three)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
