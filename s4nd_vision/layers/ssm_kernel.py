"""Diagonal state-space kernel along one axis (S4D), the math behind S4ND.

For each channel h the continuous SSM  x' = A x + B u,  y = C x  has a complex diagonal
A (N/2 conjugate pairs, Re(A) < 0). Zero-order hold with step dt gives the length-L kernel

    K[l] = 2 Re( sum_n C~_n exp(dt A_n l) ),   C~ = C B (exp(dt A) - 1) / A,   l = 0..L-1.

Papers: S4 (https://arxiv.org/abs/2111.00396), S4D (https://arxiv.org/abs/2206.11893),
S4ND (https://arxiv.org/abs/2210.06583).
"""
import itertools
import math
import numbers
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.nn.utils import parametrize

from .hippo import legs_b, legs_nplr
from .ops import backward_without_autocast, first_order_backward, generation_without_autocast, is_int
from .records import record_float, records_in_state_dict
from .reference import LOG_A_REAL_MIN, ssm_kernel_reference, use_reference

__all__ = [
    'SSMKernel', 'ssm_kernels', 'ssm_kernel_runs', 'ssm_init_imag', 'ssm_init_b', 'ssm_parameters', 'set_bandlimit',
    'SSM_INITS',
]

SSM_INITS = ('lin', 'inv', 'legs')

def ssm_parameters(module: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """(name, parameter) of the SSM parameters (A, B, log dt; S4's P) of every SSM kernel in `module`, which want
    their own learning rate and no weight decay (see `s4nd_vision.train.optim`). Found by the kernels' parameter
    names, not by a mark on the tensors, which copies (deepcopy, creation on the meta device, loading with
    assign=True) would drop."""
    for prefix, m in module.named_modules():
        if isinstance(m, _DiagonalSSM):
            for name in m.ssm_param_names:
                yield from trained_parameters(m, name, prefix)


def trained_parameters(module: nn.Module, name: str, prefix: str = '') -> Iterator[Tuple[str, nn.Parameter]]:
    """(name, parameter) of what an optimizer trains for the parameter `name` of `module` (its full name under
    `prefix`): the parameter, or where it is computed from others, those, as `named_parameters()` lists them (the
    attribute is then a computed tensor, which no optimizer group holds and no `no_weight_decay()` name matches):
    `parametrizations.<name>.original` where `torch.nn.utils.parametrize` computes it, `<name>_orig` where a forward
    pre-hook does (`torch.nn.utils.prune`, `spectral_norm`; the old `weight_norm`: `<name>_g` and `<name>_v`)."""
    join = (lambda sub: f'{prefix}.{sub}') if prefix else (lambda sub: sub)
    if parametrize.is_parametrized(module, name):
        for sub, p in module.parametrizations[name].named_parameters(recurse=False):
            yield join(f'parametrizations.{name}.{sub}'), p
    elif name in module._parameters:
        yield join(name), module._parameters[name]
    else:
        yield from ((join(sub), p) for sub, p in module.named_parameters(recurse=False) if sub.startswith(name + '_'))


def check_ssm_args(d_state: int, dt_min: float, dt_max: float) -> None:
    """ValueError unless d_state is a positive even integer and 0 < dt_min <= dt_max, finite."""
    if not is_int(d_state) or d_state < 2 or d_state % 2:
        raise ValueError(f'd_state must be a positive even integer, got {d_state!r}')
    if not (all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (dt_min, dt_max))
            and math.isfinite(dt_min) and math.isfinite(dt_max) and 0 < dt_min <= dt_max):
        raise ValueError(f'need finite 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}')


def per_kernel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A kernel tensor stored channel-major, (dim * num_kernels, ...), as (num_kernels, dim, ...): a view."""
    return t.unflatten(0, (dim, -1)).transpose(0, 1)


def flatten_legacy_4d(state_dict: Dict[str, torch.Tensor], key: str) -> None:
    """In place: a kernel tensor saved 4-D, (num_kernels, dim, ...), as before kernel parameters became 3-D (see
    `_DiagonalSSM`), in today's channel-major (dim * num_kernels, ...) layout."""
    value = state_dict.get(key)
    if isinstance(value, torch.Tensor) and value.ndim == 4:
        state_dict[key] = value.transpose(0, 1).flatten(0, 1)


class _DiagonalSSM(nn.Module):
    """The parameters of a diagonal (S4D) or diagonal-plus-low-rank (S4) SSM per channel, uninitialized:
    log dt (dim,); Re(A) = -exp(log_a_real) and Im(A) (dim, N/2); B (dim, N/2, 2) and C (dim * num_kernels, N/2, 2),
    complex values as (re, im) pairs. A, B and dt are the SSM parameters (`ssm_param_names`).

    No parameter is 4-D (`c_pairs` is C as (num_kernels, dim, N/2, 2)): `Module.to(memory_format=...)` converts
    every 4-D and 5-D tensor, and channels_last_3d refuses 4-D ones. C is channel-major like the others, so the
    parameters of many kernels stack along channels (dim 0) and their gradients split back without copies.
    Weights saved with the earlier 4-D C load."""

    ssm_param_names = ('log_dt', 'log_a_real', 'a_imag', 'b')  # (`ssm_parameters`)

    def __init__(self, dim: int, d_state: int, num_kernels: int, init: str, dt_min: float, dt_max: float,
                 bandlimit: Optional[float] = None, device=None, dtype=None):
        super().__init__()
        check_sizes(dim=dim, num_kernels=num_kernels)
        check_bandlimit(bandlimit)
        check_ssm_args(d_state, dt_min, dt_max)
        check_param_dtype(dtype)
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.d_state = d_state
        self.num_kernels = num_kernels
        self.init = init
        self.dt_min, self.dt_max = dt_min, dt_max
        self.bandlimit = bandlimit or None  # (0 and None: off)
        n2 = d_state // 2
        self.log_dt = nn.Parameter(torch.empty(dim, **dd))
        self.log_a_real = nn.Parameter(torch.empty(dim, n2, **dd))
        self.a_imag = nn.Parameter(torch.empty(dim, n2, **dd))
        self.b = nn.Parameter(torch.empty(dim, n2, 2, **dd))
        self.c = nn.Parameter(torch.empty(dim * num_kernels, n2, 2, **dd))

    @property
    def c_pairs(self) -> torch.Tensor:
        """(num_kernels, dim, N/2, 2): a view of the parameter `c`."""
        return per_kernel(self.c, self.dim)

    def _reset_c(self) -> None:
        """C ~ complex standard normal (variance 1/2 per component), drawn on the CPU in float64."""
        c = torch.randn(self.num_kernels, self.dim, self.d_state // 2, 2, dtype=torch.float64, device='cpu')
        self.c_pairs.copy_(c * 0.5 ** 0.5)

    # The band-limit is saved with the weights, as `bandlimit`: the float64 cut-off's bit pattern in an int64
    # scalar (0 for off). The kernels' function depends on it, so weights trained with one cut-off and loaded
    # into a kernel built with another (e.g. after a change of defaults) keep their function. It is not a
    # floating tensor on purpose: EMA interpolates floating entries (a cut-off is not a weight to average) and
    # copies the others, and a CPU float64 entry among CUDA weights would also take timm's foreach EMA update off its
    # fused path (a record that a tool converted to floating point is read from its bits: `record_float`). Weight
    # files without it keep the kernel's own, with a warning.
    # (A plain attribute, not a buffer: a hyper-parameter that `set_bandlimit` and progressive stages change,
    # read on the host by the layers' kernel caches.)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if records_in_state_dict():
            cut = torch.tensor(self.bandlimit or 0.0, dtype=torch.float64, device='cpu')
            destination[prefix + 'bandlimit'] = cut.view(torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        flatten_legacy_4d(state_dict, prefix + 'c')
        key = prefix + 'bandlimit'
        value = state_dict.get(key)
        if value is None:
            # (only for weights of this kernel without the record: a file of another model, e.g. a plain timm
            # ConvNeXt given to checkpoint_path, ends in the missing-keys error without a warning per kernel)
            if records_in_state_dict() and any(prefix + name in state_dict for name in self._parameters):
                # (off is spelt 0, as models take it: None would read as "the default", which is 1.0 for S4D)
                own = '0 (off)' if self.bandlimit is None else self.bandlimit
                warnings.warn(f'weights without a band-limit record (written before s4nd_vision saved it): the '
                              f'model\'s own bandlimit={own} is kept; build the model with the band-limit '
                              'they were trained with (bandlimit=0 for none)', stacklevel=2)
        elif not value.is_meta:
            cut = record_float(value, own=self.bandlimit or 0.0, name='bandlimit')
            if cut is None or not (math.isfinite(cut) and cut >= 0):
                error_msgs.append(f'{key}: expected the band-limit cut-off as float64 bits in one int64 (0 for '
                                  f'none), got {value.dtype} {tuple(value.shape)} {value.tolist()}')
            else:
                self.bandlimit = cut or None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def mode_mask(self) -> torch.Tensor:
        """(dim, d_state // 2) bool: modes kept by band-limiting, i.e. frequency dt |Im A| / 2pi < bandlimit / 2."""
        if self.bandlimit is None:
            return torch.ones_like(self.a_imag, dtype=torch.bool)
        return mode_masks([self])

    def extra_repr(self) -> str:
        s = f'{self.dim}, d_state={self.d_state}, num_kernels={self.num_kernels}, init={self.init!r}'
        if self.bandlimit is not None:
            s += f', bandlimit={self.bandlimit}'
        return s


def _log_uniform_dt(dim: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """(dim,) float64 on the CPU: log dt drawn uniformly in [log dt_min, log dt_max] (one step size per channel)."""
    u = torch.rand(dim, dtype=torch.float64, device='cpu')
    return math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min))


def ssm_init_imag(init: str, d_state: int) -> torch.Tensor:
    """Im(A) for the S4D initializations, (d_state // 2,) float64 on the CPU."""
    n = torch.arange(d_state // 2, dtype=torch.float64, device='cpu')
    if init == 'lin':
        return math.pi * n
    if init == 'inv':
        return (d_state / math.pi) * (d_state / (2 * n + 1) - 1)
    if init == 'legs':
        return legs_nplr(d_state)[0].imag
    raise ValueError(f'init must be one of {SSM_INITS}, got {init!r}')


def ssm_init_b(init: str, d_state: int) -> torch.Tensor:
    """B for the S4D initializations, (d_state // 2,) complex128 on the CPU: ones for 'lin' and 'inv'; for 'legs'
    HiPPO-LegS's B in the eigenbasis of its normal part (V^H B, the basis of Im(A), see `hippo.legs_nplr`), its
    magnitudes capped at 2 as in the original code (`hippo.legs_b`)."""
    if init == 'legs':
        return legs_b(d_state)
    if init in SSM_INITS:
        return torch.ones(d_state // 2, dtype=torch.complex128)
    raise ValueError(f'init must be one of {SSM_INITS}, got {init!r}')


POWER_BLOCK = 64  # powers by repeated doubling within blocks of this many steps (`_powers`)


def _block_starts(dta: torch.Tensor, block: int, blocks: int) -> torch.Tensor:
    """(blocks, *dta.shape) complex: exp(j block dt A) for j < blocks, from dt A itself (real exp, cos and sin: the
    complex exp is a scalar loop on the CPU)."""
    steps = torch.arange(0, blocks * block, block, dtype=dta.real.dtype, device=dta.device)
    steps = steps.view((blocks,) + (1,) * dta.dim())
    x, y = dta.real * steps, dta.imag * steps
    magnitude = x.exp()
    return torch.complex(magnitude * y.cos(), magnitude * y.sin())


def _powers(z: torch.Tensor, dta: torch.Tensor, length: int) -> torch.Tensor:
    """(length, *z.shape) complex: z ** l for l = 0..length-1 where z = exp(dt A) (differentiable).

    The first `POWER_BLOCK` powers by repeated doubling (log2 of it vectorized complex products instead of
    exp/cos/sin per element: faster), the rest as those times the powers at each block's start, exp(l dt A) from
    dt A itself: products of float32 powers compound their errors where |z| is near 1 (small dt), so doubling all
    the way loses accuracy at long lengths; with blocks the kernels are as accurate as exp(l dt A) per element
    (the reference formulation; measured: README, "What is here")."""
    block = min(length, POWER_BLOCK)
    v, power = torch.ones_like(z)[None], z  # power == z ** len(v)
    while v.shape[0] < block:
        v = torch.cat([v, v[: block - v.shape[0]] * power])
        power = power * power
    if length > block:
        blocks = -(-length // block)
        v = (_block_starts(dta, block, blocks)[:, None] * v).flatten(0, 1)[:length]
    return v


def _powers_into(z: torch.Tensor, dta: torch.Tensor, length: int) -> torch.Tensor:
    """`_powers` written into one buffer (no autograd): no copies of the growing result."""
    block = min(length, POWER_BLOCK)
    blocks = -(-length // block)
    v = z.new_empty((blocks * block,) + z.shape)
    v[0] = 1
    filled, power = 1, z
    while filled < block:
        step = min(filled, block - filled)
        torch.mul(v[:step], power, out=v[filled: filled + step])
        filled += step
        if filled < block:
            power = power * power
    if blocks > 1:
        torch.mul(_block_starts(dta, block, blocks)[1:, None], v[None, :block],
                  out=v[block:].view((blocks - 1, block) + z.shape))
    return v[:length]


def as_complex(pairs: torch.Tensor) -> torch.Tensor:
    """(..., 2) real pairs as a complex view, copied first where a view is impossible: a parameter that is a view
    into a flat vector (`vector_to_parameters`, FSDP's flat parameters) can start at an odd offset."""
    pairs = pairs.contiguous()
    if not torch.compiler.is_compiling() and pairs.storage_offset() % 2:  # (a compiled graph has no offsets)
        pairs = pairs.clone()
    return torch.view_as_complex(pairs)


def _stack(params: Sequence[torch.Tensor], rates: Sequence[float], mask: Optional[torch.Tensor]):
    """Parameters of several kernels (5 each: log_dt, log_a_real, a_imag, b, c) stacked along channels, B and C,
    masked by the band-limiting `mask` (H, N2) of 0s and 1s if given, as complex (H, N2) and (K, H, N2), with the
    per-channel rate (a float when shared)."""
    groups = [params[i: i + 5] for i in range(0, len(params), 5)]
    if len(groups) == 1:
        log_dt, log_a_real, a_imag, b, c = groups[0]
    else:
        log_dt, log_a_real, a_imag, b = (torch.cat(p) for p in list(zip(*groups))[:4])
        c = torch.cat([g[4] for g in groups], dim=1)
    rate = rates[0]
    if any(r != rate for r in rates):
        rate = torch.cat([g[0].new_full((g[0].shape[0], 1), r) for g, r in zip(groups, rates)])
    if mask is not None:  # (on the real pairs: a complex tensor times a real one costs several times more)
        c = c * mask[..., None]
    return log_dt, log_a_real, a_imag, as_complex(b), as_complex(c), rate


def _kept_modes(mask: Optional[torch.Tensor]) -> Optional[slice]:
    """The modes from the first to the last that band-limiting keeps in any channel, as a slice of the mode axis;
    None where that is every mode, off the CPU (the slice is read on the host, which would synchronize a GPU), and
    for a fake tensor (`FakeTensorMode`: shape inference and memory planning, which have no values to read).
    Generation over these modes equals generation over all: a masked mode's C~ is 0 (or NaN where its parameters
    are not finite, which `_kept_values` keeps). (S4D's initializations order the modes by frequency, so the kept
    ones are one run; how many: README, "2-core CPU".)"""
    if mask is None or mask.device.type != 'cpu' or is_fake(mask):
        return None
    kept = mask.sum(0).nonzero()  # (a 0/1 float mask: `sum` is far faster than `any` across rows on the CPU)
    if len(kept) == 0:
        return slice(0, 1)
    first, last = int(kept[0]), int(kept[-1])
    return None if last - first + 1 == mask.shape[1] else slice(first, last + 1)


def _kept_values(modes: slice, mask: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, b: torch.Tensor,
                 c: torch.Tensor) -> tuple:
    """The stacked values (`_stack`) of the `modes` only, and the mask of those modes plus, per channel, the sum of
    all modes' parameters times 0: the mask itself, or NaN in a channel where a parameter of a mode left out is NaN
    or infinite. Generation over all modes (the reference formulation, and CUDA) gives that channel NaN (0 * NaN)
    for all of these but log_a_real = -inf, which every path bounds to LOG_A_REAL_MIN (a finite mode, masked to 0
    there), so a broken parameter is not hidden on the CPU either, nor a channel with that bounded mode made NaN;
    work the size of the values (C's: num_kernels x H x N2)."""
    # (each value times 0 before the sums: 0 where finite, NaN where not, never an overflow of finite values; sums
    # over the last, contiguous axis: reductions over other axes are many times slower on the CPU)
    poison = (log_a_real.clamp(min=LOG_A_REAL_MIN).mul(0).sum(1) + a_imag.mul(0).sum(1)
              + torch.view_as_real(b).flatten(1).mul(0).sum(1)
              + torch.view_as_real(c).flatten(2).mul(0).sum(2).sum(0))
    mask = mask[:, modes] + poison[:, None]
    # (B and C contiguous: the complex products downstream are slower on strided views)
    return log_a_real[:, modes], a_imag[:, modes], b[:, modes].contiguous(), c[:, :, modes].contiguous(), mask


def _put_modes(g: torch.Tensor, modes: Optional[slice], n2: int) -> torch.Tensor:
    """The gradient g (..., M) of values restricted to `modes` (`_kept_values`) for all n2 modes, (..., n2): zero for
    the modes left out."""
    if modes is None:
        return g
    out = g.new_zeros(g.shape[:-1] + (n2,))
    out[..., modes] = g
    return out


def _poles(log_dt, log_a_real, a_imag, rate) -> tuple:
    """The step dt (H, 1) and the continuous-time poles A (H, N2 complex)."""
    # (log_a_real bounded below: a Re A that underflows made the kernel NaN, see LOG_A_REAL_MIN)
    return log_dt.exp()[:, None] * rate, torch.complex(-log_a_real.clamp(min=LOG_A_REAL_MIN).exp(), a_imag)


def _discretize(dt: torch.Tensor, a: torch.Tensor) -> tuple:
    """Zero-order hold: z = exp(dt A) and e = expm1(dt A) / A (so that C~ = C B e), (H, N2) complex.

    Complex exp and expm1 are scalar loops on the CPU, so they are built from real ops; the real expm1 is a scalar
    loop too (README, "2-core CPU"), so expm1(x) = 2 t / (1 - t) with t = tanh(x / 2), as accurate (x = Re(dt A) < 0,
    so 1 - t is in [1, 2): no cancellation)."""
    x, y = dt * a.real, dt * a.imag  # dt A
    exp_x, cos_y, sin_y = x.exp(), y.cos(), y.sin()
    z = torch.complex(exp_x * cos_y, exp_x * sin_y)
    # expm1(x + iy) = expm1(x) cos y - 2 sin^2(y / 2) + i exp(x) sin y: no cancellation for small dt A
    s = (0.5 * y).sin()
    t = (0.5 * x).tanh()
    expm1_x = (2 * t).div_(1 - t)
    expm1_dta = torch.complex(torch.addcmul(expm1_x.mul_(cos_y), s, s, value=-2), z.imag)
    return z, expm1_dta * a.reciprocal()


def _discretize_a_derivative(dt: torch.Tensor, a: torch.Tensor, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """de/dA of e = expm1(dt A) / A (`_discretize`'s z and e): (dt z - e) / A = dt^2 phi(dt A) with
    phi(Z) = (Z exp(Z) - expm1(Z)) / Z^2 = sum_j (j + 1) Z^j / (j + 2)!. The difference cancels for small |Z| (its
    relative error ~ eps / |Z|: 1e-4 in float32 for S4D-Lin's first mode at dt 1e-3, and no digit left where
    |A| < 1e-13), so there the series is summed, to the term below the dtype's rounding for |Z| < 0.1 (Z^4 in
    float32, Z^9 in float64), by Horner's rule in real arithmetic (complex ops are slower on the CPU)."""
    x, y = dt * a.real, dt * a.imag
    top = 4 if x.dtype == torch.float32 else 9
    coefficient = [(k + 1) / math.factorial(k + 2) for k in range(top + 1)]
    p_re, p_im = x * coefficient[top], y * coefficient[top]  # p <- p Z + c_k, from c_top Z + c_(top - 1)
    p_re.add_(coefficient[top - 1])
    for k in range(top - 2, -1, -1):
        p_re, p_im = (p_re * x).addcmul_(p_im, y, value=-1).add_(coefficient[k]), (p_re * y).addcmul_(p_im, x)
    dt2 = dt * dt
    return torch.where(x * x + y * y < 0.01, torch.complex(p_re.mul_(dt2), p_im.mul_(dt2)), (dt * z - e) / a)


def _kernels(conj_powers: torch.Tensor, c_disc: torch.Tensor) -> torch.Tensor:
    """(K, H, L) real: 2 Re(sum_n C~[k, h, n] z[h, n] ** l) = 2 <C~, conj(z) ** l> in real pairs, one real GEMM per
    channel, from the powers of conj(z) (L, H, N2)."""
    k, h, n2 = c_disc.shape
    c_pairs = torch.view_as_real(c_disc).reshape(k, h, 2 * n2).transpose(0, 1)
    v = torch.view_as_real(conj_powers).reshape(-1, h, 2 * n2)
    return 2 * torch.bmm(c_pairs, v.permute(1, 2, 0)).transpose(0, 1)


def _powers_grad(grad: torch.Tensor, z: torch.Tensor, dta: torch.Tensor) -> torch.Tensor:
    """For the gradient (K, H, L) of `_kernels(z ** l, C~)` (z = exp(dt A)): w = 2 sum_l grad z^l (the conjugated
    gradient of C~) and p = 2 sum_l l grad z^l (of dt A through z ** l, per kernel, / C~), (2 K, H, N2) complex, in
    one GEMM (H, 2K, L) @ (H, L, 2 N2)."""
    (k, h, length), n2 = grad.shape, z.shape[1]
    steps = torch.arange(length, device=grad.device, dtype=grad.dtype)
    g = (grad * torch.stack([torch.full_like(steps, 2), 2 * steps])[:, None, None]).reshape(2 * k, h, length)
    v = torch.view_as_real(_powers_into(z, dta, length)).view(length, h, 2 * n2)
    wp = torch.bmm(g.transpose(0, 1), v.transpose(0, 1)).view(h, 2 * k, n2, 2)
    return torch.view_as_complex(wp).transpose(0, 1)


class _SSMKernelFn(torch.autograd.Function):
    """S4D kernels of one or more SSMs stacked along channels, with a closed-form backward.

    Autograd through these steps would record every small complex op and save many tensors,
    some (L, H, N2) large; here only (H, N2) values are saved: z = exp(dt A) and e = expm1(dt A) / A (their
    transcendental functions are most of the discretization's cost), the stacked dt, A, B and C, and the mask. The
    backward recomputes the powers z ** l, and one batched GEMM serves the gradients of C~ and dt A. On the CPU
    both passes run over the modes that band-limiting keeps in some channel only (`_kept_modes`). The backward works
    with conjugated gradients
    g_x = conj(dL/dx) (PyTorch's convention is dL/dRe + i dL/dIm), which saves conjugations.

    The SSMs may have different lengths, each run of equal lengths one output (K, H_run, length): the powers and
    GEMMs run per length, everything else (stacking, discretization, the backward's elementwise work) once for
    all, so a model's generation costs the ops of one length (they are most of its cost at vision sizes).
    """

    @staticmethod
    def forward(ctx, runs: Tuple[Tuple[int, int], ...], rates, mask, *params):
        """runs: (rows, length) per output, the stacked rows in order."""
        modes = _kept_modes(mask)  # the modes band-limiting removes everywhere cost only a finiteness check
        # (the mask multiplies B e (H, modes), not C, num_kernels times as large)
        log_dt, log_a_real, a_imag, b, c, rate = _stack(params, rates, None)
        if modes is not None:
            log_a_real, a_imag, b, c, mask = _kept_values(modes, mask, log_a_real, a_imag, b, c)
        dt, a = _poles(log_dt, log_a_real, a_imag, rate)
        z, e = _discretize(dt, a)
        # (the stacked values are kept, (H, N2) small: the backward pass neither stacks nor discretizes again)
        ctx.save_for_backward(z, e, dt, a, b, c, mask)
        ctx.modes, ctx.all_modes, ctx.sizes = modes, params[1].shape[1], [p.shape[0] for p in params[::5]]
        ctx.runs = runs
        q = b * e if mask is None else b * e * mask
        rows = [n for n, _ in runs]
        c_disc, z_conj = (c * q).split(rows, dim=1), torch.conj_physical(z).split(rows)
        dta_conj = torch.conj_physical(dt * a).split(rows)  # the powers are conj(z) ** l = exp(l conj(dt A))
        return tuple(_kernels(_powers_into(z_r, dta_r, length), c_r)
                     for (_, length), z_r, dta_r, c_r in zip(runs, z_conj, dta_conj, c_disc))

    @staticmethod
    @first_order_backward
    @backward_without_autocast
    def backward(ctx, *grads):
        z, e, dt, a, b, c, mask = ctx.saved_tensors
        modes, all_modes = ctx.modes, ctx.all_modes
        q = b * e
        rows = [n for n, _ in ctx.runs]
        parts = [_powers_grad(grad, z_r, dta_r) for grad, z_r, dta_r in zip(grads, z.split(rows), (dt * a).split(rows))]
        wp = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        k = c.shape[0]
        w, p = wp[:k], wp[k:]  # (K, H, N2): g of C~, and g of dt A through z ** l per kernel (/ C~)
        q_masked = q if mask is None else q * mask  # C~ = C (B e mask)
        g_q = (w * c).sum(0) if mask is None else (w * c).sum(0) * mask
        g_e = g_q * b
        g_dta = (p * (c * q_masked)).sum(0)  # through z ** l: d/d(dt A) = l z ** l
        g_a = dt * g_dta + g_e * _discretize_a_derivative(dt, a, z, e)  # A: through z ** l (dt A) and e
        g_dta = g_dta + g_e * z * a.reciprocal()  # dt A, for dt: e = expm1(dt A) / A, de/d(dt) = z
        g_c = w * q_masked
        stacked = (
            (g_dta * a).real.sum(-1) * dt[:, 0],  # dt A with dt real, dt = exp(log_dt)
            _put_modes(g_a.real * a.real, modes, all_modes),  # Re A = -exp(log_a_real)
            _put_modes(-g_a.imag, modes, all_modes),
            torch.view_as_real(torch.conj_physical(_put_modes(g_q * e, modes, all_modes))),
            torch.view_as_real(torch.conj_physical(_put_modes(g_c, modes, all_modes))),
        )
        split = [g.split(ctx.sizes, dim=1 if i == 4 else 0) for i, g in enumerate(stacked)]  # per kernel
        return (None, None, None) + tuple(split[i % 5][i // 5] for i in range(5 * len(ctx.sizes)))


class SSMKernel(_DiagonalSSM):
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
        if init not in SSM_INITS:
            raise ValueError(f'init must be one of {SSM_INITS}, got {init!r}')
        super().__init__(dim, d_state, num_kernels, init, dt_min, dt_max, bandlimit, device=device, dtype=dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n2 = self.d_state // 2
        # Initial values are computed on the CPU in float64, then copied (works on the meta device too).
        self.log_dt.copy_(_log_uniform_dt(self.dim, self.dt_min, self.dt_max))
        self.log_a_real.copy_(torch.full((self.dim, n2), math.log(0.5), dtype=torch.float64))
        self.a_imag.copy_(ssm_init_imag(self.init, self.d_state).expand(self.dim, n2))
        self.b.copy_(torch.view_as_real(ssm_init_b(self.init, self.d_state)).expand(self.dim, n2, 2))
        self._reset_c()

    def discretize(self, rate: float = 1.0, dtype: torch.dtype = torch.float32) -> tuple:
        """The recurrent view x_t = z x_{t-1} + e B u_t, y_t = 2 Re(C^T x_t) (zero-order hold, step dt * rate):
        z = exp(dt A) and e B (dim, N/2) complex, and the band-limited C (num_kernels, dim, N/2) complex."""
        mask = None if self.bandlimit is None else self.mode_mask().to(dtype)
        params = [p.to(dtype) for p in (self.log_dt, self.log_a_real, self.a_imag, self.b, self.c_pairs)]
        log_dt, log_a_real, a_imag, b, c, rate = _stack(params, [rate], mask)
        z, e = _discretize(*_poles(log_dt, log_a_real, a_imag, rate))
        return z, e * b, c

    @generation_without_autocast
    def forward(self, length: int, rate: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Kernels for `length` steps of size dt * rate.

        Returns:
            (num_kernels, dim, length) real tensor of `dtype` (float32 or float64).
        """
        check_generation(length, rate, dtype)
        return ssm_kernels([self], [length], [rate], dtype, called=True)[0]


def mode_masks(kernels: Sequence[_DiagonalSSM]) -> Optional[torch.Tensor]:
    """The `mode_mask`s of `kernels` stacked along channels, (sum of dims, d_state // 2) bool, in a number of ops
    that does not grow with the number of kernels when they share one cut-off; None when none band-limits."""
    cuts = [k.bandlimit for k in kernels]
    if all(cut is None for cut in cuts):
        return None
    with torch.no_grad():  # (stacked, then detached: not one detach per kernel in a captured graph)
        log_dt = torch.cat([k.log_dt for k in kernels]) if len(kernels) > 1 else kernels[0].log_dt
        a_imag = torch.cat([k.a_imag for k in kernels]) if len(kernels) > 1 else kernels[0].a_imag
        # in float32 at least, as the kernels are generated: bfloat16 or float16 parameters (`model.half()`) would
        # round dt |Im A| by up to 0.4% and flip the modes near the cut-off, each a large part of the kernel
        full = torch.promote_types(log_dt.dtype, torch.float32)
        freq = log_dt.to(full).exp()[:, None] * a_imag.to(full).abs() / (2 * math.pi)
        if all(cut == cuts[0] for cut in cuts):
            return freq < cuts[0] / 2
        half = torch.cat([freq.new_full((k.dim, 1), math.inf if k.bandlimit is None else k.bandlimit / 2)
                          for k in kernels])
        return freq < half


def read_directly(kernel: nn.Module) -> bool:
    """Whether generation may read `kernel`'s parameters as they are, stacked with other S4D kernels': an
    `SSMKernel` without forward pre-hooks. Those (torch.nn.utils.prune, the deprecated weight_norm and
    spectral_norm) recompute a parameter before each call of the module, so such a kernel is called instead."""
    return isinstance(kernel, SSMKernel) and not kernel._forward_pre_hooks


@generation_without_autocast
def ssm_kernel_runs(
        kernels: Sequence[nn.Module],
        lengths: Sequence[int],
        rates: Sequence[float],
        dtype: torch.dtype = torch.float32,
        called: bool = False,
) -> List[Tuple[List[int], torch.Tensor]]:
    """The kernels of `ssm_kernels` as they are made: runs of entries of one length, each run's indices into
    `kernels` and its kernels stacked along channels in that order, (num_kernels, sum of their dims, length), so
    that the steps after generation can act on a run at once. The S4D kernels that share state size and kernel
    count come from one generation call (`_SSMKernelFn`, whatever their lengths); in a captured graph (export,
    compilation) those that also share length and rate come from one reference call (`_reference_kernels`);
    other kernel generators (`S4Kernel`, `SGConvKernel`), S4D kernels with forward pre-hooks (`read_directly`; not
    when `called` from their own forward, after the hooks) and tracing give runs of one."""
    if not len(kernels) == len(lengths) == len(rates):
        raise ValueError(f'kernels, lengths and rates need one entry per kernel, got {len(kernels)}, {len(lengths)} '
                         f'and {len(rates)}')
    if use_reference():  # export / compilation: real arithmetic
        return _reference_kernels(kernels, lengths, rates, dtype, called)
    for length, rate in zip(lengths, rates):  # (as each kernel module's forward checks them)
        check_generation(length, rate, dtype)
    if torch.jit.is_tracing() and len(kernels) > 1:  # FLOP counting: each kernel in its own module's scope
        return [([i], kernel(length, rate=rate, dtype=dtype))
                for i, (kernel, length, rate) in enumerate(zip(kernels, lengths, rates))]
    groups: Dict[tuple, List[int]] = {}
    out: List[Tuple[List[int], torch.Tensor]] = []
    for i, (kernel, length) in enumerate(zip(kernels, lengths)):
        if called or read_directly(kernel):
            groups.setdefault((kernel.d_state, kernel.num_kernels), []).append(i)
        else:
            out.append(([i], kernel(length, rate=rates[i], dtype=dtype)))
    for members in groups.values():
        members = sorted(members, key=lambda i: lengths[i])  # (stable: runs of equal lengths, in order)
        params = [p.to(dtype) for i in members for p in
                  (kernels[i].log_dt, kernels[i].log_a_real, kernels[i].a_imag, kernels[i].b, kernels[i].c_pairs)]
        # the band-limiting cut-off uses the base step size, so every resolution keeps the same modes
        mask = mode_masks([kernels[i] for i in members])
        mask = None if mask is None else mask.to(dtype)
        group_rates = [rates[i] for i in members]
        if torch.jit.is_tracing():  # plain differentiable ops that fvcore sees (one kernel, see above)
            log_dt, log_a_real, a_imag, b, c, rate = _stack(params, group_rates, mask)
            dt, a = _poles(log_dt, log_a_real, a_imag, rate)
            z, e = _discretize(dt, a)
            powers = _powers(torch.conj_physical(z), torch.conj_physical(dt * a), lengths[members[0]])
            out.append((members, _kernels(powers, c * (b * e))))
            continue
        runs = [list(run) for _, run in itertools.groupby(members, key=lambda i: lengths[i])]
        stacked = _SSMKernelFn.apply(tuple((sum(kernels[i].dim for i in run), lengths[run[0]]) for run in runs),
                                     group_rates, mask, *params)
        out += zip(runs, stacked)
    return out


def ssm_kernels(
        kernels: Sequence[nn.Module],
        lengths: Sequence[int],
        rates: Sequence[float],
        dtype: torch.dtype = torch.float32,
        called: bool = False,
) -> List[torch.Tensor]:
    """`kernels[i](lengths[i], rates[i], dtype)` for every i, with one generation call for all S4D kernels that
    share state size and kernel count (their channels are stacked, `ssm_kernel_runs`): at the sizes of vision
    models the cost of generation is mostly per op, not per element (e.g. both axes of a square image, and every
    layer of a network).

    Returns:
        per kernel, a (num_kernels, dim, length) real tensor of `dtype`.
    """
    out: List[Optional[torch.Tensor]] = [None] * len(kernels)
    for members, stacked in ssm_kernel_runs(kernels, lengths, rates, dtype, called):
        parts = stacked.split([kernels[i].dim for i in members], dim=1) if len(members) > 1 else [stacked]
        for i, k in zip(members, parts):
            out[i] = k
    return out


def _reference_kernels(
        kernels: Sequence[nn.Module],
        lengths: Sequence,
        rates: Sequence,
        dtype: torch.dtype,
        called: bool = False,
) -> List[Tuple[List[int], torch.Tensor]]:
    """`ssm_kernel_runs` in the reference formulation (`reference.ssm_kernel_reference`), for graph capture: the S4D
    kernels that share d_state, num_kernels, length and rate come from one call, their channels stacked, so that
    a captured graph (and torch.compile's time, README "Deployment") grows with the distinct axis lengths, not with
    the layers. Symbolic lengths and rates (an export or compilation with dynamic sizes) join a group only where
    they are equal without a guard: grouping never specializes a size."""
    groups: List[List[int]] = []
    out: List[Tuple[List[int], torch.Tensor]] = []
    for i, kernel in enumerate(kernels):
        if not (called or read_directly(kernel)):
            out.append(([i], kernel(lengths[i], rate=rates[i], dtype=dtype)))
            continue
        for members in groups:
            first = kernels[members[0]]
            if ((first.d_state, first.num_kernels) == (kernel.d_state, kernel.num_kernels)
                    and statically_known_true(lengths[members[0]] == lengths[i])
                    and statically_known_true(rates[members[0]] == rates[i])):
                members.append(i)
                break
        else:
            groups.append([i])
    for members in groups:
        group = [kernels[i] for i in members]
        params = [(torch.cat([getattr(k, name) for k in group], dim=dim) if len(group) > 1
                   else getattr(group[0], name)).to(dtype)
                  for name, dim in (('log_dt', 0), ('log_a_real', 0), ('a_imag', 0), ('b', 0), ('c_pairs', 1))]
        mask = mode_masks(group)  # the cut-off uses the base step size: every resolution keeps the same modes
        out.append((members, ssm_kernel_reference(*params, lengths[members[0]], rates[members[0]],
                                                  mask=None if mask is None else mask.to(dtype))))
    return out


def check_sizes(**sizes) -> None:
    """Raise ValueError naming the first of `sizes` (name=value) that is not a positive integer."""
    for name, value in sizes.items():
        if not is_int(value) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')


def check_generation(length, rate, dtype: torch.dtype) -> None:
    """Raise ValueError unless a kernel module's forward can make `length` taps at `rate` in `dtype`: a positive
    integer length (symbolic in a captured graph), a finite positive rate, float32 or float64. Not checked while
    `torch.jit.trace` (fvcore's FLOP counting) records sizes as tensors."""
    if torch.jit.is_tracing():
        return
    if isinstance(length, bool) or not isinstance(length, (numbers.Integral, torch.SymInt)) or length < 1:
        raise ValueError(f'length must be a positive integer, got {length!r}')
    compiling = torch.compiler.is_compiling()  # (a symbolic rate under torch.compile: math.isfinite does not trace)
    if isinstance(rate, numbers.Real) and not compiling and not (math.isfinite(rate) and rate > 0):
        raise ValueError(f'rate must be finite and positive, got {rate!r}')
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f'dtype must be torch.float32 or torch.float64 (kernels are generated in full precision), '
                         f'got {dtype}')


def check_param_dtype(dtype) -> None:
    """Raise ValueError unless `dtype`, of a kernel's parameters, is None (the default dtype) or a real floating-point
    dtype: a complex one made complex step sizes and weights whose imaginary parts generation dropped (a cast warning
    at most), and the optimizer trained; an integer one failed in torch with an error naming no argument."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f'dtype must be a real floating-point dtype (or None), got {dtype}')


def check_bandlimit(bandlimit: Optional[float]) -> None:
    """Raise ValueError unless `bandlimit` is a cut-off: a finite number >= 0, or None (0 and None: off)."""
    if bandlimit is not None and not (isinstance(bandlimit, numbers.Real) and not isinstance(bandlimit, bool)
                                      and math.isfinite(bandlimit) and bandlimit >= 0):
        raise ValueError(f'bandlimit must be a positive cut-off, or 0 or None for off, got {bandlimit!r}')


def set_bandlimit(module: nn.Module, bandlimit: Optional[float]) -> int:
    """Set the band-limiting cut-off of every SSM kernel in `module` (0 or None = off); returns how many were set."""
    check_bandlimit(bandlimit)
    bandlimit = bandlimit or None
    kernels = [m for m in module.modules() if isinstance(m, _DiagonalSSM)]  # S4D and S4 kernels
    if bandlimit is not None:
        from .sgconv_kernel import SGConvKernel  # (it imports this module)
        if any(isinstance(m, SGConvKernel) for m in module.modules()):
            raise ValueError("band-limiting applies to the SSM kernels ('s4d', 's4'); the module has SGConvKernels")
    for m in kernels:
        m.bandlimit = bandlimit
    return len(kernels)
