"""Diagonal state-space kernel along one axis (S4D), the math behind S4ND.

For each channel h the continuous SSM  x' = A x + B u,  y = C x  has a complex diagonal
A (N/2 conjugate pairs, Re(A) < 0). Zero-order hold with step dt gives the length-L kernel

    K[l] = 2 Re( sum_n C~_n exp(dt A_n l) ),   C~ = C B (exp(dt A) - 1) / A,   l = 0..L-1.

Papers: S4 (https://arxiv.org/abs/2111.00396), S4D (https://arxiv.org/abs/2206.11893),
S4ND (https://arxiv.org/abs/2210.06583).
"""
import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn as nn

__all__ = ['SSMKernel', 'ssm_init_imag', 'is_ssm_param', 'set_bandlimit', 'SSM_INITS']

SSM_INITS = ('lin', 'inv', 'legs')

# Attribute set on the A, B and log-step parameters so optimizers can give them their own
# learning rate and no weight decay (see `s4nd_vision.optim`).
_SSM_ATTR = '_s4nd_ssm'


def _mark_ssm(param: nn.Parameter) -> nn.Parameter:
    setattr(param, _SSM_ATTR, True)
    return param


def is_ssm_param(param: torch.Tensor) -> bool:
    """True for the SSM parameters (A, B, log dt) that want their own lr and no weight decay."""
    return getattr(param, _SSM_ATTR, False)


@lru_cache(maxsize=8)
def _legs_imag(d_state: int) -> torch.Tensor:
    """Imaginary parts of the eigenvalues of the normal part of the HiPPO-LegS matrix."""
    n = torch.arange(d_state, dtype=torch.float64, device='cpu')
    q = torch.sqrt(2 * n + 1)
    # HiPPO-LegS: A[i, j] = -q_i q_j (i > j), -(i + 1) (i == j); normal part S = A + P P^T, P = sqrt(n + 1/2)
    a = -torch.tril(q[:, None] * q[None, :], diagonal=-1) - torch.diag(n + 1)
    p = torch.sqrt(n + 0.5)
    eig = torch.linalg.eigvals(a + p[:, None] * p[None, :])
    imag = eig.imag[eig.imag > 0].sort().values
    return imag[: d_state // 2].clone()


def ssm_init_imag(init: str, d_state: int) -> torch.Tensor:
    """Im(A) for the S4D initializations, (d_state // 2,) float64 on the CPU."""
    n = torch.arange(d_state // 2, dtype=torch.float64, device='cpu')
    if init == 'lin':
        return math.pi * n
    if init == 'inv':
        return (d_state / math.pi) * (d_state / (2 * n + 1) - 1)
    if init == 'legs':
        return _legs_imag(d_state)
    raise ValueError(f'init must be one of {SSM_INITS}, got {init!r}')


class SSMKernel(nn.Module):
    """Generates 1D convolution kernels from per-channel diagonal SSMs.

    Holds `num_kernels` independent C matrices per channel (e.g. forward and backward
    directions times rank-1 terms) sharing A, B and dt. Parameters are kept real
    (complex values as trailing pairs) so dtype casts, DDP and FSDP treat them as usual.
    """

    def __init__(
            self,
            dim: int,
            d_state: int = 64,
            num_kernels: int = 1,
            init: str = 'lin',
            dt_min: float = 1e-3,
            dt_max: float = 1e-1,
            bandlimit: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(f'd_state must be a positive even number, got {d_state}')
        if init not in SSM_INITS:
            raise ValueError(f'init must be one of {SSM_INITS}, got {init!r}')
        if not 0 < dt_min <= dt_max:
            raise ValueError(f'need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}')
        if bandlimit is not None and not bandlimit > 0:
            raise ValueError(f'bandlimit must be positive or None, got {bandlimit}')
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.d_state = d_state
        self.num_kernels = num_kernels
        self.init = init
        self.dt_min, self.dt_max = dt_min, dt_max
        self.bandlimit = bandlimit
        n2 = d_state // 2
        self.log_dt = _mark_ssm(nn.Parameter(torch.empty(dim, **dd)))
        self.log_a_real = _mark_ssm(nn.Parameter(torch.empty(dim, n2, **dd)))  # Re(A) = -exp(log_a_real)
        self.a_imag = _mark_ssm(nn.Parameter(torch.empty(dim, n2, **dd)))
        self.b = _mark_ssm(nn.Parameter(torch.empty(dim, n2, 2, **dd)))
        self.c = nn.Parameter(torch.empty(num_kernels, dim, n2, 2, **dd))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n2 = self.d_state // 2
        # Initial values are computed on the CPU in float64, then copied (works on the meta device too).
        u = torch.rand(self.dim, dtype=torch.float64, device='cpu')
        log_dt = math.log(self.dt_min) + u * (math.log(self.dt_max) - math.log(self.dt_min))
        self.log_dt.copy_(log_dt)
        self.log_a_real.copy_(torch.full((self.dim, n2), math.log(0.5), dtype=torch.float64))
        self.a_imag.copy_(ssm_init_imag(self.init, self.d_state).expand(self.dim, n2))
        self.b.copy_(torch.stack([torch.ones(self.dim, n2), torch.zeros(self.dim, n2)], dim=-1))
        # C ~ complex standard normal (variance 1/2 per component)
        self.c.copy_(torch.randn(self.num_kernels, self.dim, n2, 2, dtype=torch.float64, device='cpu') * 0.5 ** 0.5)

    def mode_mask(self) -> torch.Tensor:
        """(dim, d_state // 2) bool: modes kept by band-limiting, i.e. frequency dt |Im A| / 2pi < bandlimit / 2."""
        if self.bandlimit is None:
            return torch.ones_like(self.a_imag, dtype=torch.bool)
        freq = self.log_dt.detach().exp()[:, None] * self.a_imag.detach().abs() / (2 * math.pi)
        return freq < self.bandlimit / 2

    def forward(self, length: int, rate: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Kernels for `length` steps of size dt * rate.

        Returns:
            (num_kernels, dim, length) real tensor of `dtype` (float32 or float64).
        """
        log_dt, log_a_real, a_imag = self.log_dt.to(dtype), self.log_a_real.to(dtype), self.a_imag.to(dtype)
        dt = log_dt.exp() * rate  # (H,)
        a = torch.complex(-log_a_real.exp(), a_imag)  # (H, N2)
        b = torch.view_as_complex(self.b.to(dtype).contiguous())  # (H, N2)
        c = torch.view_as_complex(self.c.to(dtype).contiguous())  # (K, H, N2)
        if self.bandlimit is not None:
            # the cut-off uses the base step size, so every resolution keeps the same modes
            c = c * self.mode_mask().to(dtype)
        dta = dt[:, None] * a  # (H, N2)
        c_disc = c * (b * torch.expm1(dta) / a)  # ZOH: C B (exp(dt A) - 1) / A, (K, H, N2)
        # Vandermonde exp(dt A l) in real arithmetic (real exp, cos, sin vectorize; complex exp does not)
        steps = torch.arange(length, device=dta.device, dtype=dtype)
        magnitude = torch.exp(dta.real[..., None] * steps)  # (H, N2, L)
        angle = dta.imag[..., None] * steps
        vandermonde = torch.cat([magnitude * torch.cos(angle), magnitude * torch.sin(angle)], dim=1)  # (H, 2 N2, L)
        # 2 Re(sum_n C~ V) = 2 (Re C~ . Re V - Im C~ . Im V), as one batched GEMM over channels
        c_real = torch.cat([c_disc.real, -c_disc.imag], dim=-1).transpose(0, 1)  # (H, K, 2 N2)
        return 2 * torch.bmm(c_real, vandermonde).transpose(0, 1)  # (K, H, L)

    def extra_repr(self) -> str:
        s = f'{self.dim}, d_state={self.d_state}, num_kernels={self.num_kernels}, init={self.init!r}'
        if self.bandlimit is not None:
            s += f', bandlimit={self.bandlimit}'
        return s


def set_bandlimit(module: nn.Module, bandlimit: Optional[float]) -> int:
    """Set the band-limiting cut-off of every SSM kernel in `module` (None = off); returns how many were set."""
    if bandlimit is not None and not bandlimit > 0:
        raise ValueError(f'bandlimit must be positive or None, got {bandlimit}')
    kernels = [m for m in module.modules() if isinstance(m, SSMKernel)]
    for m in kernels:
        m.bandlimit = bandlimit
    return len(kernels)
