"""S4D kernel generation of many (layer, axis) entries in one Triton launch (and one for the backward).

Every entry (an `SSMKernel` with its own length and rate) contributes its channels as rows of one packed
problem. The per-mode discretization (zero-order hold, see `ssm_kernel` and `reference.ssm_kernel_reference`) of
the stacked (rows, N/2) parameters is one Triton kernel, and its closed-form backward another; the heavy part,
the sum over modes for every tap,

    K[k, r, l] = 2 sum_n exp(x[r, n] l) (Re C~[k, r, n] cos(y[r, n] l) - Im C~[k, r, n] sin(y[r, n] l)),
    x + i y = dt A (dt including the entry's rate), l < length[r],

is one Triton kernel over (row, block of taps), written into a (K, rows, max length) buffer zero beyond each
row's length, and its backward (the gradients of x, y and C~, sums over the taps) one more.
"""
import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from . import dispatch
from .reference import LOG_A_REAL_MIN
from .ssm_kernel import SSMKernel, check_generation, mode_masks

_LOG_A_REAL_MIN = tl.constexpr(LOG_A_REAL_MIN)  # (a global a jitted kernel reads must be a constexpr)

__all__ = ['check_device', 'discretize', 'on_tensor_device', 'ssm_kernels_fused', 'two_sided_kernels_fused',
           'vandermonde']


def on_tensor_device(launch):
    """Decorates a function that launches Triton kernels on its tensor arguments: it runs with the first tensor's
    GPU as the current device. Triton launches on the current device and its current stream, not on the tensors'
    device: a model on cuda:1 while cuda:0 is current would have its kernels read another GPU's memory, unordered
    with the stream that wrote it."""
    @functools.wraps(launch)
    def on_device(*args, **kwargs):
        device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if device.type != 'cuda':
            return launch(*args, **kwargs)
        with torch.cuda.device(device):
            return launch(*args, **kwargs)
    return on_device


def check_device(name: str, device: torch.device) -> None:
    """Refuses tensors the kernels cannot launch on (`dispatch._triton_device`, looked up when called: a script that
    records launches on the CPU replaces it), naming the public function `name`: Triton itself fails there with a
    driver error that names neither."""
    if not dispatch._triton_device(device):
        capability = '.'.join(str(v) for v in dispatch.MIN_CAPABILITY)
        raise ValueError(f'{name} needs tensors on an NVIDIA GPU of compute capability {capability} or newer '
                         f'(or CPU tensors under TRITON_INTERPRET=1), got tensors on {device}')


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation: its series (to x^10, relative error < 3e-11) for |x| < 0.5, else exp(x) - 1.
    The series sees 0 elsewhere: it would overflow to inf for large |x| (an inflated identity time kernel: 1e9)."""
    small = tl.abs(x) < 0.5
    s = tl.where(small, x, 0.0)
    series = s * (1 + s / 2 * (1 + s / 3 * (1 + s / 4 * (1 + s / 5 * (1 + s / 6 * (1 + s / 7 * (1 + s / 8 * (
        1 + s / 9 * (1 + s / 10)))))))))
    return tl.where(small, series, tl.exp(x) - 1)


@triton.jit
def _phi(x, y):
    """phi(Z) = (Z exp(Z) - expm1(Z)) / Z^2 = sum_j (j + 1) Z^j / (j + 2)! for Z = x + i y, as (re, im): its series
    to Z^8 (relative error < 1e-9) for |Z| < 0.5, where the difference cancels; 1/2 elsewhere (not used there)."""
    small = x * x + y * y < 0.25
    x, y = tl.where(small, x, 0.0), tl.where(small, y, 0.0)
    p_re, p_im = _horner(x * 0 + 1 / 403200, y * 0, x, y, 1 / 45360)  # (j + 1) / (j + 2)! for j = 8, 7, ..., 0
    p_re, p_im = _horner(p_re, p_im, x, y, 1 / 5760)
    p_re, p_im = _horner(p_re, p_im, x, y, 1 / 840)
    p_re, p_im = _horner(p_re, p_im, x, y, 1 / 144)
    p_re, p_im = _horner(p_re, p_im, x, y, 1 / 30)
    p_re, p_im = _horner(p_re, p_im, x, y, 1 / 8)
    p_re, p_im = _horner(p_re, p_im, x, y, 1 / 3)
    return _horner(p_re, p_im, x, y, 1 / 2)


@triton.jit
def _horner(p_re, p_im, x, y, c):
    """One Horner step p Z + c of a complex polynomial with real coefficients, Z = x + i y."""
    return p_re * x - p_im * y + c, p_re * y + p_im * x


@triton.jit
def _zoh(log_dt_ptr, rate_ptr, lar_ptr, aim_ptr, b_ptr, mask_ptr, r, n, R, N2, HAS_MASK: tl.constexpr):
    """Zero-order hold of rows r (BLOCK_R, 1) x modes n (1, BLOCK_N): dt, A, x + i y = dt A, exp(x), cos y, sin y,
    u = A / scale and norm = |A|^2 / scale (1 / A = conj(u) / norm), e = expm1(dt A) / A, B and the masked q = B e
    (mask 1 without band-limiting); complex values as (re, im)."""
    ok = (r < R) & (n < N2)
    rn = r * N2 + n
    dt = tl.exp(tl.load(log_dt_ptr + r, mask=r < R, other=0.0)) * tl.load(rate_ptr + r, mask=r < R, other=1.0)
    a_re = -tl.exp(tl.maximum(tl.load(lar_ptr + rn, mask=ok, other=0.0), _LOG_A_REAL_MIN))  # (no underflow: NaN)
    a_im = tl.load(aim_ptr + rn, mask=ok, other=0.0)
    x, y = dt * a_re, dt * a_im
    s = tl.sin(0.5 * y)
    ex, cos_y, sin_y = tl.exp(x), tl.cos(y), tl.sin(y)
    n_re = _expm1(x) * cos_y - 2 * s * s  # expm1(x + i y), no cancellation for small dt A
    n_im = ex * sin_y
    # n / A = n conj(u) / norm with u = A / scale, norm = |A|^2 / scale, scale = |Re A| + |Im A|: |A|^2 itself
    # underflows in float32 where |A| < 1e-19 (S4D-Lin's first mode, Im A = 0), as `reference.ssm_kernel_reference`
    scale = tl.abs(a_im) - a_re  # (Re A < 0)
    u_re, u_im = a_re / scale, a_im / scale
    norm = (u_re * u_re + u_im * u_im) * scale
    e_re = (n_re * u_re + n_im * u_im) / norm
    e_im = (n_im * u_re - n_re * u_im) / norm
    b_re = tl.load(b_ptr + 2 * rn, mask=ok, other=0.0)
    b_im = tl.load(b_ptr + 2 * rn + 1, mask=ok, other=0.0)
    m = tl.load(mask_ptr + rn, mask=ok, other=0.0) if HAS_MASK else 1.0
    q_re = (b_re * e_re - b_im * e_im) * m
    q_im = (b_re * e_im + b_im * e_re) * m
    return dt, a_re, a_im, x, y, ex, cos_y, sin_y, u_re, u_im, norm, e_re, e_im, b_re, b_im, m, q_re, q_im


@triton.jit
def _discretize_fwd(log_dt_ptr, rate_ptr, lar_ptr, aim_ptr, b_ptr, c_ptr, mask_ptr, x_ptr, y_ptr, cre_ptr, cim_ptr,
                    R, N2, K, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    n = tl.arange(0, BLOCK_N)[None, :]
    ok = (r < R) & (n < N2)
    rn = r * N2 + n
    _, _, _, x, y, _, _, _, _, _, _, _, _, _, _, _, q_re, q_im = _zoh(
        log_dt_ptr, rate_ptr, lar_ptr, aim_ptr, b_ptr, mask_ptr, r, n, R, N2, HAS_MASK)
    tl.store(x_ptr + rn, x, mask=ok)
    tl.store(y_ptr + rn, y, mask=ok)
    for k in range(K):
        c_at = c_ptr + 2 * ((r * K + k) * N2 + n)  # C channel-major: (R, K, N2, 2)
        c_re = tl.load(c_at, mask=ok, other=0.0)
        c_im = tl.load(c_at + 1, mask=ok, other=0.0)
        tl.store(cre_ptr + k * R * N2 + rn, c_re * q_re - c_im * q_im, mask=ok)
        tl.store(cim_ptr + k * R * N2 + rn, c_re * q_im + c_im * q_re, mask=ok)


@triton.jit
def _discretize_bwd(log_dt_ptr, rate_ptr, lar_ptr, aim_ptr, b_ptr, c_ptr, mask_ptr,
                    gx_ptr, gy_ptr, gcre_ptr, gcim_ptr,
                    g_log_dt_ptr, g_lar_ptr, g_aim_ptr, g_b_ptr, g_c_ptr,
                    R, N2, K, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    r1 = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = r1[:, None]
    n = tl.arange(0, BLOCK_N)[None, :]
    ok = (r < R) & (n < N2)
    rn = r * N2 + n
    dt, a_re, a_im, x, y, ex, cos_y, sin_y, u_re, u_im, norm, e_re, e_im, b_re, b_im, m, q_re, q_im = _zoh(
        log_dt_ptr, rate_ptr, lar_ptr, aim_ptr, b_ptr, mask_ptr, r, n, R, N2, HAS_MASK)
    # g_u for u = v w (complex) gives g_v = g_u conj(w), with g = dL/dRe + i dL/dIm
    gq_re = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    gq_im = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for k in range(K):
        c_at = c_ptr + 2 * ((r * K + k) * N2 + n)
        c_re = tl.load(c_at, mask=ok, other=0.0)
        c_im = tl.load(c_at + 1, mask=ok, other=0.0)
        g_re = tl.load(gcre_ptr + k * R * N2 + rn, mask=ok, other=0.0)
        g_im = tl.load(gcim_ptr + k * R * N2 + rn, mask=ok, other=0.0)
        g_c = g_c_ptr + 2 * ((r * K + k) * N2 + n)
        tl.store(g_c, g_re * q_re + g_im * q_im, mask=ok)
        tl.store(g_c + 1, g_im * q_re - g_re * q_im, mask=ok)
        gq_re += g_re * c_re + g_im * c_im
        gq_im += g_im * c_re - g_re * c_im
    gq_re, gq_im = gq_re * m, gq_im * m
    tl.store(g_b_ptr + 2 * rn, gq_re * e_re + gq_im * e_im, mask=ok)
    tl.store(g_b_ptr + 2 * rn + 1, gq_im * e_re - gq_re * e_im, mask=ok)
    ge_re = gq_re * b_re + gq_im * b_im  # g_e = g_q conj(B)
    ge_im = gq_im * b_re - gq_re * b_im
    # e = expm1(Z) / A with Z = dt A: de/d(dt) = exp(Z), de/dA = (dt exp(Z) - e) / A = dt^2 phi(Z), the series
    # `_phi` for small |Z| (where |A| is tiny the difference cancels to rounding noise times 1 / A: 1e9 at
    # |A| = 4e-18), else (dt exp(Z) - e) conj(u) / norm (1 / A scaled as in `_zoh`)
    z_re, z_im = ex * cos_y, ex * sin_y
    p_re, p_im = _phi(x, y)
    d_re, d_im = dt * z_re - e_re, dt * z_im - e_im
    small = x * x + y * y < 0.25
    f_re = tl.where(small, dt * dt * p_re, (d_re * u_re + d_im * u_im) / norm)
    f_im = tl.where(small, dt * dt * p_im, (d_im * u_re - d_re * u_im) / norm)
    # plus the Vandermonde sums' own g_x, g_y of Z = x + i y: x = dt Re(A), y = dt Im(A)
    gx = tl.load(gx_ptr + rn, mask=ok, other=0.0)
    gy = tl.load(gy_ptr + rn, mask=ok, other=0.0)
    ga_re = gx * dt + ge_re * f_re + ge_im * f_im
    ga_im = gy * dt + ge_im * f_re - ge_re * f_im
    g_dt = gx * a_re + gy * a_im + ge_re * z_re + ge_im * z_im
    # Re(A) = -exp(log_a_real); dt = exp(log_dt) rate
    tl.store(g_lar_ptr + rn, ga_re * a_re, mask=ok)
    tl.store(g_aim_ptr + rn, ga_im, mask=ok)
    g_log_dt = tl.sum(tl.where(ok, g_dt * dt, 0.0), axis=1)  # d dt / d log_dt = dt
    tl.store(g_log_dt_ptr + r1, g_log_dt, mask=r1 < R)


@triton.jit
def _vandermonde_fwd(x_ptr, y_ptr, cre_ptr, cim_ptr, len_ptr, out_ptr, R, N2, LMAX, K,
                     BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N2
    length = tl.load(len_ptr + row)
    x = tl.load(x_ptr + row * N2 + n, mask=n_ok, other=0.0)
    y = tl.load(y_ptr + row * N2 + n, mask=n_ok, other=0.0)
    lf = l.to(tl.float32)[:, None]
    mag = tl.exp(x[None, :] * lf)
    cos = mag * tl.cos(y[None, :] * lf)
    sin = mag * tl.sin(y[None, :] * lf)
    inside = l < length
    for k in range(K):
        c_re = tl.load(cre_ptr + (k * R + row) * N2 + n, mask=n_ok, other=0.0)
        c_im = tl.load(cim_ptr + (k * R + row) * N2 + n, mask=n_ok, other=0.0)
        val = 2 * tl.sum(c_re[None, :] * cos - c_im[None, :] * sin, axis=1)
        tl.store(out_ptr + (k * R + row) * LMAX + l, tl.where(inside, val, 0.0), mask=l < LMAX)


@triton.jit
def _vandermonde_bwd(x_ptr, y_ptr, cre_ptr, cim_ptr, len_ptr, g_ptr, gx_ptr, gy_ptr, gcre_ptr, gcim_ptr,
                     R, N2, LMAX, K, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N2
    length = tl.load(len_ptr + row)
    x = tl.load(x_ptr + row * N2 + n, mask=n_ok, other=0.0)
    y = tl.load(y_ptr + row * N2 + n, mask=n_ok, other=0.0)
    g_x = tl.zeros([BLOCK_N], dtype=tl.float32)
    g_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(K):
        c_re = tl.load(cre_ptr + (k * R + row) * N2 + n, mask=n_ok, other=0.0)
        c_im = tl.load(cim_ptr + (k * R + row) * N2 + n, mask=n_ok, other=0.0)
        s_cos = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_l g l^0 mag cos, and with l^1
        s_sin = tl.zeros([BLOCK_N], dtype=tl.float32)
        t_cos = tl.zeros([BLOCK_N], dtype=tl.float32)
        t_sin = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, length, BLOCK_L):
            l = start + tl.arange(0, BLOCK_L)
            g = tl.load(g_ptr + (k * R + row) * LMAX + l, mask=l < length, other=0.0).to(tl.float32)
            lf = l.to(tl.float32)[:, None]
            mag = tl.exp(x[None, :] * lf)
            cos = g[:, None] * mag * tl.cos(y[None, :] * lf)
            sin = g[:, None] * mag * tl.sin(y[None, :] * lf)
            s_cos += tl.sum(cos, axis=0)
            s_sin += tl.sum(sin, axis=0)
            t_cos += tl.sum(cos * lf, axis=0)
            t_sin += tl.sum(sin * lf, axis=0)
        tl.store(gcre_ptr + (k * R + row) * N2 + n, 2 * s_cos, mask=n_ok)
        tl.store(gcim_ptr + (k * R + row) * N2 + n, -2 * s_sin, mask=n_ok)
        # d/dx of exp(x l) (...) is l times it; d/dy of (c_re cos - c_im sin) is -(c_re sin + c_im cos), times l
        g_x += 2 * (c_re * t_cos - c_im * t_sin)
        g_y -= 2 * (c_re * t_sin + c_im * t_cos)
    tl.store(gx_ptr + row * N2 + n, g_x, mask=n_ok)
    tl.store(gy_ptr + row * N2 + n, g_y, mask=n_ok)


def _blocks(n2: int, lmax: int):
    return min(64, triton.next_power_of_2(max(lmax, 1))), triton.next_power_of_2(n2)


@torch.library.custom_op('s4nd_vision::ssm_vandermonde', mutates_args=())
@on_tensor_device
def _vandermonde_op(x: torch.Tensor, y: torch.Tensor, c_re: torch.Tensor, c_im: torch.Tensor,
                    lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    k, r, n2 = c_re.shape
    out = torch.empty((k, r, max_length), device=x.device, dtype=torch.float32)
    block_l, block_n = _blocks(n2, max_length)
    _vandermonde_fwd[(r, triton.cdiv(max_length, block_l))](
        x, y, c_re, c_im, lengths, out, r, n2, max_length, k, BLOCK_L=block_l, BLOCK_N=block_n)
    return out


@_vandermonde_op.register_fake
def _(x, y, c_re, c_im, lengths, max_length):
    return x.new_empty((c_re.shape[0], c_re.shape[1], max_length))


@torch.library.custom_op('s4nd_vision::ssm_vandermonde_backward', mutates_args=())
@on_tensor_device
def _vandermonde_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, c_re: torch.Tensor,
                             c_im: torch.Tensor, lengths: torch.Tensor
                             ) -> List[torch.Tensor]:
    k, r, n2 = c_re.shape
    grad = grad.contiguous()
    g_x, g_y = torch.empty_like(x), torch.empty_like(y)
    g_re, g_im = torch.empty_like(c_re), torch.empty_like(c_im)
    block_l, block_n = _blocks(n2, grad.shape[-1])
    _vandermonde_bwd[(r,)](x, y, c_re, c_im, lengths, grad, g_x, g_y, g_re, g_im, r, n2, grad.shape[-1], k,
                           BLOCK_L=block_l, BLOCK_N=block_n)
    return [g_x, g_y, g_re, g_im]


@_vandermonde_backward_op.register_fake
def _(grad, x, y, c_re, c_im, lengths):
    return [torch.empty_like(x), torch.empty_like(y), torch.empty_like(c_re), torch.empty_like(c_im)]


def _setup_context(ctx, inputs, output):
    x, y, c_re, c_im, lengths, _ = inputs
    ctx.save_for_backward(x, y, c_re, c_im, lengths)


def _backward(ctx, grad):
    g_x, g_y, g_re, g_im = _vandermonde_backward_op(grad, *ctx.saved_tensors)
    return g_x, g_y, g_re, g_im, None, None


_vandermonde_op.register_autograd(_backward, setup_context=_setup_context)


_DISCRETIZE_ROWS = 16  # rows per program of the discretization kernels


@torch.library.custom_op('s4nd_vision::ssm_discretize', mutates_args=())
@on_tensor_device
def _discretize_op(log_dt: torch.Tensor, rate: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor,
                   b: torch.Tensor, c: torch.Tensor, mask: Optional[torch.Tensor]) -> List[torch.Tensor]:
    r, n2 = log_a_real.shape
    k = c.shape[1]
    x, y = torch.empty_like(log_a_real), torch.empty_like(log_a_real)
    c_re, c_im = log_a_real.new_empty((k, r, n2)), log_a_real.new_empty((k, r, n2))
    _discretize_fwd[(triton.cdiv(r, _DISCRETIZE_ROWS),)](
        log_dt, rate, log_a_real, a_imag, b, c, mask if mask is not None else log_a_real, x, y, c_re, c_im,
        r, n2, k, HAS_MASK=mask is not None, BLOCK_R=_DISCRETIZE_ROWS, BLOCK_N=triton.next_power_of_2(n2))
    return [x, y, c_re, c_im]


@_discretize_op.register_fake
def _(log_dt, rate, log_a_real, a_imag, b, c, mask):
    r, n2 = log_a_real.shape
    k = c.shape[1]
    return [log_a_real.new_empty((r, n2)), log_a_real.new_empty((r, n2)), log_a_real.new_empty((k, r, n2)),
            log_a_real.new_empty((k, r, n2))]


@torch.library.custom_op('s4nd_vision::ssm_discretize_backward', mutates_args=())
@on_tensor_device
def _discretize_backward_op(g_x: torch.Tensor, g_y: torch.Tensor, g_re: torch.Tensor, g_im: torch.Tensor,
                            log_dt: torch.Tensor, rate: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor,
                            b: torch.Tensor, c: torch.Tensor, mask: Optional[torch.Tensor]) -> List[torch.Tensor]:
    r, n2 = log_a_real.shape
    grads = [torch.empty_like(t) for t in (log_dt, log_a_real, a_imag, b, c)]
    _discretize_bwd[(triton.cdiv(r, _DISCRETIZE_ROWS),)](
        log_dt, rate, log_a_real, a_imag, b, c, mask if mask is not None else log_a_real,
        g_x.contiguous(), g_y.contiguous(), g_re.contiguous(), g_im.contiguous(), *grads,
        r, n2, c.shape[1], HAS_MASK=mask is not None, BLOCK_R=_DISCRETIZE_ROWS, BLOCK_N=triton.next_power_of_2(n2))
    return grads


@_discretize_backward_op.register_fake
def _(g_x, g_y, g_re, g_im, log_dt, rate, log_a_real, a_imag, b, c, mask):
    return [torch.empty_like(t) for t in (log_dt, log_a_real, a_imag, b, c)]


def _discretize_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.mask = inputs[6]  # (a constant: no gradient)


def _discretize_backward(ctx, grads):  # (the op returns a list: its gradients come as one list)
    # (read once: non-reentrant activation checkpointing refuses to unpack a saved tensor twice)
    saved = ctx.saved_tensors
    log_a_real, c = saved[2], saved[5]
    shapes = [log_a_real.shape] * 2 + [(c.shape[1],) + tuple(log_a_real.shape)] * 2
    g = [log_a_real.new_zeros(shape) if gi is None else gi for gi, shape in zip(grads, shapes)]
    g_log_dt, g_lar, g_aim, g_b, g_c = _discretize_backward_op(*g, *saved, ctx.mask)
    return g_log_dt, None, g_lar, g_aim, g_b, g_c, None


_discretize_op.register_autograd(_discretize_backward, setup_context=_discretize_setup_context)


def discretize(log_dt: torch.Tensor, rate: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor,
               b: torch.Tensor, c: torch.Tensor, mask: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Zero-order hold of stacked diagonal SSMs, one Triton launch (and one for the backward): x + i y = dt A and
    C~ = (C * mask) B expm1(dt A) / A, with dt = exp(log_dt) rate and A = -exp(log_a_real) + i a_imag.

    Args:
        log_dt, rate: (R,); log_a_real, a_imag: (R, N2); b: (R, N2, 2); c: (R, K, N2, 2) (channel-major);
        mask: optional (R, N2) band-limiting mask (no gradient). All float32.

    Returns:
        x, y (R, N2) and Re C~, Im C~ (K, R, N2), float32, the inputs of `vandermonde`.
    """
    check_device('discretize', log_dt.device)
    tensors = [t.float().contiguous() for t in (log_dt, rate, log_a_real, a_imag, b, c)]
    return _discretize_op(*tensors, None if mask is None else mask.float().contiguous())


def vandermonde(x: torch.Tensor, y: torch.Tensor, c_re: torch.Tensor, c_im: torch.Tensor,
                lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """K[k, r, l] = 2 sum_n exp(x l) (c_re cos(y l) - c_im sin(y l)) for l < lengths[r], else 0.

    Args:
        x, y: (R, N2) float32, dt A per row (real and imaginary parts).
        c_re, c_im: (K, R, N2) float32, C~ = C B expm1(dt A) / A.
        lengths: (R,) int32 taps per row; max_length: the output's last size (>= every length).

    Returns:
        (K, R, max_length) float32.
    """
    check_device('vandermonde', x.device)
    tensors = [t.float().contiguous() for t in (x, y, c_re, c_im)]
    return _vandermonde_op(*tensors, lengths.to(torch.int32).contiguous(), int(max_length))


def _kept(make):
    """`make(*key, device)` kept per (key, device) for the next steps: constants a step needs on its device, made
    there (no host-to-device copy, so a training step stays capturable in a CUDA graph). Not kept while a CUDA
    graph is captured (its kernels only run at replay) nor while tracing (torch.compile, fake tensors); `like`
    gives the device.
    The last 16 are kept: a few resolutions of a few models (a gather index holds one int64 per kernel tap). They
    are made as normal tensors even under `torch.inference_mode` (a validation loop), which autograd of a later
    training step could not save."""
    def normal(*key):
        with torch.inference_mode(False):
            return make(*key)
    cached = functools.lru_cache(maxsize=16)(normal)

    def get(*key, like: torch.Tensor):
        if torch.compiler.is_compiling():  # made in the graph torch.compile captures
            return make(*key, like.device)
        capturing = like.is_cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        return (make if capturing or is_fake(like) else cached)(*key, like.device)
    return get


@_kept
def _row_constants(dims: Tuple[int, ...], lengths: Tuple[int, ...], rates: Tuple[float, ...],
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per packed row, the entry's rate (float32) and length (int32)."""
    rate = torch.cat([torch.full((d,), r, device=device, dtype=torch.float32) for d, r in zip(dims, rates)])
    row_lengths = torch.cat([torch.full((d,), n, device=device, dtype=torch.int32) for d, n in zip(dims, lengths)])
    return rate, row_lengths


@torch.library.custom_op('s4nd_vision::row_constants', mutates_args=())
def _row_constants_op(dims: List[int], lengths: List[int], rates: List[float],
                      like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`_row_constants` on `like`'s device as one operator of a graph torch.compile captures, instead of two per
    entry; copies of the kept tensors (an operator's outputs are its own)."""
    rate, row_lengths = _row_constants(tuple(dims), tuple(lengths), tuple(rates), like=like)
    return rate.clone(), row_lengths.clone()


@_row_constants_op.register_fake
def _(dims, lengths, rates, like):
    rows = sum(dims)
    return like.new_empty(rows, dtype=torch.float32), like.new_empty(rows, dtype=torch.int32)


@_kept
def _two_sided_index(num_kernels: int, dims: Tuple[int, ...], sizes: Tuple[int, ...], bidirectional: bool,
                     max_length: int, device: torch.device) -> torch.Tensor:
    """Where each value of the entries' two-sided kernels (`ops.two_sided_kernel`), laid out one after another
    (rank, dim, 2 n - 1) each, is in the flattened (num_kernels, rows, max_length) generation buffer followed by
    one zero (index num_kernels * rows * max_length). Offset o >= 0 is tap o of a forward kernel (the first rank),
    o < 0 tap -o - 1 of the backward one (the others), zero for a causal kernel or beyond the buffer."""
    rank, rows = num_kernels // 2 if bidirectional else num_kernels, sum(dims)
    zero = num_kernels * rows * max_length
    parts, first_row = [], 0
    for dim, n in zip(dims, sizes):
        j = torch.arange(rank, device=device)[:, None, None]
        r = first_row + torch.arange(dim, device=device)[None, :, None]
        o = torch.arange(2 * n - 1, device=device)[None, None, :] - (n - 1)
        tap = torch.where(o >= 0, o, -o - 1)
        k = torch.where(o >= 0, j, j + rank)
        ok = (tap < max_length) & ((o >= 0) | bidirectional)
        parts.append(torch.where(ok, (k * rows + r) * max_length + tap, zero).flatten())
        first_row += dim
    return torch.cat(parts)


@torch.library.custom_op('s4nd_vision::two_sided_index', mutates_args=())
def _two_sided_index_op(num_kernels: int, dims: List[int], sizes: List[int], bidirectional: bool, max_length: int,
                        like: torch.Tensor) -> torch.Tensor:
    """`_two_sided_index` on `like`'s device as one operator of a graph torch.compile captures, instead of a dozen
    per entry; a copy of the kept index (an operator's output is its own)."""
    return _two_sided_index(num_kernels, tuple(dims), tuple(sizes), bidirectional, max_length, like=like).clone()


@_two_sided_index_op.register_fake
def _(num_kernels, dims, sizes, bidirectional, max_length, like):
    rank = num_kernels // 2 if bidirectional else num_kernels
    return like.new_empty(rank * sum(d * (2 * n - 1) for d, n in zip(dims, sizes)), dtype=torch.int64)


def _generate(name: str, kernels: Sequence[SSMKernel], lengths: Sequence[int], rates: Sequence[float]
              ) -> torch.Tensor:
    """The packed (num_kernels, rows, max length) float32 kernels of every entry (rows: the entries' channels in
    order), zero beyond each entry's length; `name`: the public function, for its errors."""
    first = kernels[0]
    if not len(kernels) == len(lengths) == len(rates):  # (zip would drop entries, or read rates beyond the rows')
        raise ValueError(f'{name}: kernels, lengths and rates need one entry per kernel, got {len(kernels)}, '
                         f'{len(lengths)} and {len(rates)}')
    for length, rate in zip(lengths, rates):  # (as `ssm_kernel_runs` checks them: the kernels would not say)
        check_generation(length, rate, torch.float32)
    if any(not isinstance(k, SSMKernel) for k in kernels):
        raise ValueError('fused kernel generation takes SSMKernel (S4D) entries only')
    if any((k.d_state, k.num_kernels) != (first.d_state, first.num_kernels) for k in kernels):
        raise ValueError('fused kernel generation needs one d_state and one num_kernels for every entry, got '
                         f'{[(k.d_state, k.num_kernels) for k in kernels]}')
    check_device(name, first.log_dt.device)
    f32 = torch.float32
    dims = [k.dim for k in kernels]
    # (each parameter stacked, then cast: one cast per kind, not per entry, in the graphs torch.compile captures)
    log_dt, log_a_real, a_imag, b, c = [torch.cat([getattr(k, name) for k in kernels]).to(f32)
                                        for name in ('log_dt', 'log_a_real', 'a_imag', 'b', 'c')]
    lengths, rates = [int(n) for n in lengths], [float(r) for r in rates]
    if torch.compiler.is_compiling():
        rate, row_lengths = _row_constants_op(dims, lengths, rates, log_dt.detach())  # (constants: no gradient)
    else:
        rate, row_lengths = _row_constants(tuple(dims), tuple(lengths), tuple(rates), like=log_dt)
    mask = mode_masks(kernels)
    x, y, ct_re, ct_im = discretize(log_dt, rate, log_a_real, a_imag, b, c.unflatten(0, (sum(dims), -1)),
                                    None if mask is None else mask.to(f32))
    return vandermonde(x, y, ct_re, ct_im, row_lengths, max(lengths))


def ssm_kernels_fused(
        kernels: Sequence[SSMKernel],
        lengths: Sequence[int],
        rates: Sequence[float],
        dtype: torch.dtype = torch.float32,
) -> List[torch.Tensor]:
    """`ssm_kernel.ssm_kernels` for S4D kernels sharing d_state and num_kernels, generated in one launch.

    Returns:
        per entry, a (num_kernels, dim, length) tensor of `dtype` (computed in float32).
    """
    if not kernels:
        return []
    out = _generate('ssm_kernels_fused', kernels, lengths, rates)
    return [o[..., :n].to(dtype) for o, n in zip(out.split([k.dim for k in kernels], dim=1), lengths)]


def two_sided_kernels_fused(
        kernels: Sequence[SSMKernel],
        lengths: Sequence[int],
        rates: Sequence[float],
        sizes: Sequence[int],
        bidirectional: bool,
        dtype: torch.dtype = torch.float32,
) -> List[torch.Tensor]:
    """The two-sided kernels (`ops.two_sided_kernel`) of S4D kernels sharing d_state, num_kernels and direction,
    on axes of `sizes`: one generation launch and one gather for all entries, forward and backward (a number of
    ops that does not grow with the entries). Bidirectional entries hold rank forward then rank backward kernels.

    Returns:
        per entry, a (rank, dim, 2 n - 1) tensor of `dtype` (computed in float32).
    """
    if not kernels:
        return []
    sizes = tuple(int(n) for n in sizes)
    if len(sizes) != len(kernels) or any(n < 1 for n in sizes):  # (zip would drop entries)
        raise ValueError(f'two_sided_kernels_fused: sizes needs one positive axis size per kernel, got {list(sizes)} '
                         f'for {len(kernels)} kernels')
    out = _generate('two_sided_kernels_fused', kernels, lengths, rates)
    dims, num_kernels = tuple(k.dim for k in kernels), kernels[0].num_kernels
    if torch.compiler.is_compiling():
        index = _two_sided_index_op(num_kernels, list(dims), list(sizes), bool(bidirectional), out.shape[-1], out)
    else:
        index = _two_sided_index(num_kernels, dims, sizes, bool(bidirectional), out.shape[-1], like=out)
    packed = torch.cat([out.flatten(), out.new_zeros(1)])[index].to(dtype)
    rank = num_kernels // 2 if bidirectional else num_kernels
    shapes = [(rank, d, 2 * n - 1) for d, n in zip(dims, sizes)]
    return [p.view(shape) for p, shape in zip(packed.split([math.prod(s) for s in shapes]), shapes)]
