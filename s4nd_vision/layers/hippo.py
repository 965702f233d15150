"""HiPPO-LegS and its normal plus low-rank (NPLR) decomposition, the initialization of S4 and S4D-LegS.

HiPPO-LegS (state size N, n, k = 0..N-1):

    A[n, k] = -sqrt(2n + 1) sqrt(2k + 1)  (n > k),   -(n + 1)  (n == k),   0  (n < k);   B[n] = sqrt(2n + 1).

With P[n] = sqrt(n + 1/2), S = A + P P^T is normal (-1/2 I plus a skew-symmetric matrix), so
S = V Lambda V^H with V unitary, and in that eigenbasis A = Lambda - (V^H P)(V^H P)^H: diagonal
plus rank 1 (S4's DPLR form). Dropping the rank-1 term gives S4D-LegS (A = Lambda, B = V^H B).
S is real, so its eigenvalues come in conjugate pairs; a real system keeps the N/2 with Im > 0.

Papers: HiPPO (https://arxiv.org/abs/2008.07669), S4 (https://arxiv.org/abs/2111.00396),
S4D (https://arxiv.org/abs/2206.11893).
"""
from functools import lru_cache
from typing import Tuple

import torch

from .ops import is_int

__all__ = ['hippo_legs', 'legs_nplr', 'legs_b', 'LEGS_B_CLIP']

LEGS_B_CLIP = 2.0  # the cap on |V^H B| of the LegS initializations (the original code's B_clip)


def hippo_legs(d_state: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The HiPPO-LegS matrices A (N, N), B (N,) and the low-rank factor P (N,), float64 on the CPU."""
    if not is_int(d_state) or d_state < 1:  # (2.5 made the 3 x 3 matrices of arange(2.5), silently)
        raise ValueError(f'd_state must be a positive integer, got {d_state!r}')
    n = torch.arange(d_state, dtype=torch.float64, device='cpu')
    q = torch.sqrt(2 * n + 1)
    a = -torch.tril(q[:, None] * q[None, :], diagonal=-1) - torch.diag(n + 1)
    return a, q.clone(), torch.sqrt(n + 0.5)


@lru_cache(maxsize=8)
def _legs_nplr(d_state: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b, p = hippo_legs(d_state)
    eig, vec = torch.linalg.eig(a + p[:, None] * p[None, :])
    keep = (eig.imag > 0).nonzero().squeeze(1)
    keep = keep[eig.imag[keep].argsort()][: d_state // 2]
    if keep.numel() != d_state // 2:
        raise RuntimeError(
            f'HiPPO-LegS normal part at d_state={d_state}: expected {d_state // 2} eigenvalues with Im > 0')
    lam, vec = eig[keep], vec[:, keep]  # (N/2,), (N, N/2): unit columns, orthogonal (S is normal)
    # an eigenvector is defined up to a phase: choose it so that V^H B is real and positive
    # (a unitary diagonal change of basis; kernels depend on C and B only through C_n B_n)
    vb = vec.conj().T @ b.to(vec.dtype)
    vec = vec * (vb / vb.abs())[None, :]
    return lam, vec.conj().T @ b.to(vec.dtype), vec.conj().T @ p.to(vec.dtype), vec


def legs_nplr(d_state: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO-LegS in the eigenbasis of its normal part, the N/2 modes with Im > 0 (increasing Im),
    complex128 on the CPU: Lambda (N/2,), V^H B (N/2,), V^H P (N/2,) and V (N, N/2).

    With the conjugate half, A = V_full (Lambda_full - (V_full^H P)(V_full^H P)^H) V_full^H exactly."""
    if not is_int(d_state) or d_state < 2 or d_state % 2:  # (4.0 failed in slicing, naming no argument)
        raise ValueError(f'd_state must be a positive even integer, got {d_state!r}')
    return tuple(t.clone() for t in _legs_nplr(d_state))


def legs_b(d_state: int) -> torch.Tensor:
    """B of the LegS initializations (S4D-LegS, S4): V^H B of `legs_nplr` (real and positive in its eigenbasis)
    with magnitudes capped at LEGS_B_CLIP, (d_state // 2,) complex128. The original code clips Im(V^H B) to
    [-2, 2] in its own eigenvector phases, where V^H B is nearly imaginary, while V^H B itself grows with N on the
    fastest modes. The cap bounds the magnitudes alike, independently of the phases (and C, random, does not depend
    on them either)."""
    vb = legs_nplr(d_state)[1]
    return vb * (LEGS_B_CLIP / vb.abs()).clamp(max=1.0)
