"""S4 kernel along one axis: a diagonal plus low-rank (DPLR) state matrix, HiPPO-LegS initialization.

For each channel the continuous SSM  x' = A x + B u,  y = C^T x  has N states and

    A = Lambda - P P^*    (Lambda diagonal, Re(Lambda) < 0; P a column: rank 1),

kept in conjugate-symmetric form: the N/2 modes with Im(Lambda) > 0 are parameters and the other half are
their conjugates, so the system is real (the kernel is real). Initialized from HiPPO-LegS's NPLR
decomposition (`hippo.legs_nplr`): the DPLR system starts as HiPPO-LegS's A written in an eigenbasis, with its B
there capped at magnitude 2 as in the original code (`hippo.legs_b`; the fastest modes' would reach 10 at N = 16).
Hermitian part Re(Lambda) - P P^* < 0 keeps every A stable.

Discretization: bilinear (S4's), with step dt:  A~ = (I - dt/2 A)^-1 (I + dt/2 A),  B~ = (I - dt/2 A)^-1 dt B,
K[l] = C^T A~^l B~. Its length-L DFT at z = exp(-2 pi i m / L) is

    K^(z) = C^T (I - A~^L) (I - A~ z)^-1 B~ = dt * r ((1 - z) I - dt/2 (1 + z) A)^-1 B,   r = C^T (I - A~^L),

(no pole at z = -1 in this form). The resolvent of the DPLR matrix is diagonal plus rank 1 by the Woodbury
identity, so K^ needs four Cauchy sums sum_n x_n y_n / (a(z) - b(z) Lambda_n) per frequency; an inverse real
FFT gives K. The truncation term r uses the dense N x N A~ (log2 L products by repeated squaring), kept as its
difference from I: A~ = I + O(dt A) rounded to float32 lost the kernel's accuracy at small dt * rate (2e-2 of its
largest tap at dt * rate ~ 1e-7, 5e-4 at 1e-5); so did 1 - z at long lengths, formed from the half angle instead. In
float32 the kernel is within 3e-7 to 7e-6 of the largest tap of all channels, 4e-7 to 3e-5 of each channel's own
(d_state 64, default init, 3 seeds, dt 1e-7 to 1e-1, 64 to 65536 taps; the worst at short lengths: the zero
frequency's resolvent is about A^-1, so its rounding grows with A's condition number, as in the original S4 code).
The zero frequency (the kernel's sum) comes from the same repeated squaring instead, not from the Cauchy form, whose
factors' gradients with respect to A cancel at small L dt: float32 gradients of every parameter are within 2e-5 of
the largest of the float64 ones at dt 1e-5 to 1e-4 (3e-3 to 6e-3 for A's from the Cauchy form) and 8e-5 at dt 1e-3 to
1e-1 (d_state 64, 56 to 1024 taps, as S4D's: 2e-5 and 2e-4). What is left is where a pole of A~ turns an integer number
of times over the L steps (dt Im(Lambda) L / 2 pi near an integer m > 0), where the same cancellation happens at
frequency m, bounded by the pole's decay over the L steps.
Resolution as in S4D: rate scales the step (dt * rate).

Paper: S4 (https://arxiv.org/abs/2111.00396).
"""
import math
from typing import Optional

import torch
import torch.nn as nn

from .hippo import legs_b, legs_nplr
from .ops import generation_without_autocast
from .ssm_kernel import _DiagonalSSM, _log_uniform_dt, as_complex, check_generation

__all__ = ['S4Kernel']


def _full(x: torch.Tensor) -> torch.Tensor:
    """(..., N/2) complex modes with Im > 0 -> (..., N) with their conjugates."""
    return torch.cat([x, x.conj()], dim=-1)


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^-1 b for a batch of matrices a = I - dt/2 A, which are never singular (A's Hermitian part Re(Lambda) - P P^*
    is negative definite, so every eigenvalue of a has a real part of at least 1): `torch.linalg.solve_ex` without
    its error check, which `torch.linalg.solve` runs by reading a flag back from the device, a host synchronization
    per kernel generation on a GPU (per layer and axis: S4 kernels are generated one module at a time), which also
    fails a CUDA graph's capture. The same LU solve and gradients."""
    return torch.linalg.solve_ex(a, b)[0]


def _power_minus_identity(d: torch.Tensor, n: int) -> torch.Tensor:
    """(I + d) ** n - I for a batch of square matrices d (n >= 1), by repeated squaring on the differences from I,
    (I + x)(I + y) - I = x + y + x y: a d small against I keeps its relative accuracy, which forming I + d in
    float32 would round away (its bits: a Python int; a traced length arrives as a 0-dim tensor, which the in-place
    shift would otherwise zero)."""
    result, power, n = None, d, int(n)
    while True:
        if n & 1:
            result = power if result is None else torch.baddbmm(result + power, result, power)
        n >>= 1
        if not n:
            return result
        power = torch.baddbmm(power, power, power, beta=2)


class S4Kernel(_DiagonalSSM):
    """Generates 1D convolution kernels from per-channel DPLR SSMs (S4).

    Holds `num_kernels` C vectors per channel (e.g. forward and backward directions times rank-1 terms)
    sharing A, B and dt. Same interface as `SSMKernel`: `forward(length, rate, dtype)` returns
    (num_kernels, dim, length). Parameters are real (complex values as trailing pairs). Band-limiting masks C
    on the modes of Lambda whose frequency dt |Im Lambda| / 2pi is at or above bandlimit / 2, as the original
    S4 code does for its DPLR kernel (the low-rank term couples the modes, so the cut is not exact there).
    """

    ssm_param_names = _DiagonalSSM.ssm_param_names + ('p',)

    def __init__(
            self,
            dim: int,
            d_state: int = 64,
            num_kernels: int = 1,
            init: str = 'legs',
            dt_min: float = 1e-3,
            dt_max: float = 1e-1,
            bandlimit: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        if init != 'legs':
            raise ValueError(f"the S4 kernel's init must be 'legs' (HiPPO-LegS NPLR), got {init!r}")
        super().__init__(dim, d_state, num_kernels, init, dt_min, dt_max, bandlimit, device=device,
                         dtype=dtype)  # Lambda as A
        self.p = nn.Parameter(torch.empty(dim, d_state // 2, 2, device=device, dtype=dtype))  # low rank P
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n2 = self.d_state // 2
        # computed on the CPU in float64, then copied (works on the meta device too)
        self.log_dt.copy_(_log_uniform_dt(self.dim, self.dt_min, self.dt_max))
        lam, _, vp, _ = legs_nplr(self.d_state)
        vb = legs_b(self.d_state)
        self.log_a_real.copy_((-lam.real).log().expand(self.dim, n2))
        self.a_imag.copy_(lam.imag.expand(self.dim, n2))
        self.p.copy_(torch.view_as_real(vp).expand(self.dim, n2, 2))
        self.b.copy_(torch.view_as_real(vb).expand(self.dim, n2, 2))
        self._reset_c()

    def dense(self, dtype: torch.dtype = torch.float64) -> tuple:
        """The full conjugate-symmetric system as dense complex tensors: A (dim, N, N), B (dim, N), C (K, dim, N)."""
        lam, p, b, c = self._modes(dtype)
        return torch.diag_embed(lam) - p[..., :, None] * p.conj()[..., None, :], b, c

    def _modes(self, dtype: torch.dtype) -> tuple:
        """Lambda, P, B (dim, N) and C (K, dim, N, band-limited) complex, conjugate halves included."""
        lam = torch.complex(-self.log_a_real.to(dtype).exp(), self.a_imag.to(dtype))
        p, b, c = (as_complex(t.to(dtype)) for t in (self.p, self.b, self.c_pairs))
        if self.bandlimit is not None:
            c = c * self.mode_mask()
        return _full(lam), _full(p), _full(b), _full(c)

    @staticmethod
    def _bilinear(lam: torch.Tensor, p: torch.Tensor, b: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Dense bilinear [A~ - I, B~] (H, N, N + 1) for A = Lambda - P P^*, by one LU solve:
        A~ = (I - dt/2 A)^-1 (I + dt/2 A), so A~ - I = (I - dt/2 A)^-1 dt A, and B~ = (I - dt/2 A)^-1 dt B. A~ - I is
        O(dt A): formed as is, not as A~ minus I, it keeps its relative accuracy at small dt * rate
        (`_power_minus_identity`)."""
        a = torch.diag_embed(lam) - p[:, :, None] * p.conj()[:, None, :]
        eye = torch.eye(lam.shape[-1], dtype=a.dtype, device=a.device)
        half = (0.5 * dt).to(a.dtype)[:, None, None] * a
        return _solve(eye - half, torch.cat([half + half, (dt[:, None] * b)[..., None]], dim=-1))

    def discretize(self, rate: float = 1.0, dtype: torch.dtype = torch.float32) -> tuple:
        """The recurrent view x_t = A~ x_{t-1} + B~ u_t, y_t = Re(C^T x_t) (conjugate halves included, so the state
        stays conjugate-symmetric and Re drops nothing): A~ (dim, N, N), B~ (dim, N), C (num_kernels, dim, N)."""
        lam, p, b, c = self._modes(dtype)
        disc = self._bilinear(lam, p, b, self.log_dt.to(dtype).exp() * rate)
        eye = torch.eye(disc.shape[-2], dtype=disc.dtype, device=disc.device)
        return disc[..., :-1] + eye, disc[..., -1], c

    @generation_without_autocast
    def forward(self, length: int, rate: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Kernels for `length` steps of size dt * rate.

        Returns:
            (num_kernels, dim, length) real tensor of `dtype` (float32 or float64).
        """
        check_generation(length, rate, dtype)
        lam, p, b, c = self._modes(dtype)  # (H, N) x 3, (K, H, N)
        dt = self.log_dt.to(dtype).exp() * rate  # (H,)
        # truncation: r = C^T (I - A~^L) = -C^T (A~^L - I), with the dense bilinear A~ (H, N, N) kept as A~ - I, and
        # the kernel's sum S B~ = (I + A~ + ... + A~^(L-1)) B~ with it: M = [[A~, B~], [0, 1]] has
        # M^L - I = [[A~^L - I, S B~], [0, 0]], one row and column more in the same repeated squaring
        disc = self._bilinear(lam, p, b, dt)
        power = _power_minus_identity(torch.cat([disc, torch.zeros_like(disc[:, :1])], dim=1), length)
        r = -torch.einsum('khn,hnm->khm', c, power[:, :-1, :-1])
        # the zero frequency is that sum, C^T S B~: the Cauchy form below would give it as r times the resolvent
        # ~ (dt A)^-1, factors O(L dt A) and O(1 / (dt A)) whose gradients with respect to A cancel to the sum's far
        # smaller dependence on A, which float32 lost at small L dt (A's gradients 3e-3 off, relative to the largest,
        # at d_state 64, 56 taps, dt 1e-5; 2e-4 at dt 1e-4; now 2e-5 at most, as S4D's)
        k_zero = torch.einsum('khn,hn->kh', c, power[:, :-1, -1])
        # Cauchy sums at the other rfft frequencies z_m = exp(-2 pi i m / L): 1 / (a(z) - b(z) Lambda_n) = resolvent
        # (H, M, N). 1 - z and 1 + z from the half angle: 1 - z formed from z loses its real part 1 - cos(theta) ~
        # theta^2 / 2 to rounding at long lengths (float32 at 65k taps: ~ 5e-9, below z's ulp), where at small
        # dt * rate it is as large as the dt term it is compared with (kernel errors of 1e-3 of a channel's largest tap
        # at dt 1e-5, 65k taps)
        theta = -2 * math.pi / length * torch.arange(1, length // 2 + 1, device=dt.device, dtype=dtype)  # (M,)
        sin, half_sin, half_cos = theta.sin(), (theta / 2).sin(), (theta / 2).cos()
        one_minus_z = torch.complex(2 * half_sin * half_sin, -sin)
        bz = (0.5 * dt)[:, None] * torch.complex(2 * half_cos * half_cos, sin)  # dt/2 (1 + z) (H, M)
        res = 1 / (one_minus_z[None, :, None] - bz[..., None] * lam[:, None, :])
        k_rb = torch.einsum('khn,hmn->khm', r * b, res)
        k_rp = torch.einsum('khn,hmn->khm', r * p, res)
        k_pb = torch.einsum('hn,hmn->hm', p.conj() * b, res)
        k_pp = torch.einsum('hn,hmn->hm', (p.conj() * p), res)
        # Woodbury: (R^-1 + b P P^*)^-1 = R - b R P (1 + b P^* R P)^-1 P^* R
        k_hat = dt[:, None] * (k_rb - k_rp * (bz * k_pb / (1 + bz * k_pp)))
        k_hat = torch.cat([k_zero[..., None], k_hat], dim=-1)
        return torch.fft.irfft(k_hat, n=length)
