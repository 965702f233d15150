"""The recurrent view of a causal 1D S4ND layer: one step at a time, constant memory per step.

A causal 1D S4ND layer with an S4D ('s4d') or S4 ('s4') kernel is a linear state-space system: the convolution
view y = K * u + D u equals, sample by sample, the recurrence

    x_t = A~ x_{t-1} + B~ u_t,    y_t = (C^T x_t, real part, summed over the rank-1 terms) + D u_t,

with the discretization of its kernel (zero-order hold for S4D: diagonal A~; bilinear for S4: dense A~ of the
diagonal plus low-rank A). All rank-1 terms share A, B and dt, so they share the state too. Used for
autoregressive generation: each new sample costs O(dim * N) ('s4d') or O(dim * N^2) ('s4'), not a convolution
over the whole past.
"""
import itertools
from typing import Optional, Sequence

import torch

from .s4_kernel import S4Kernel
from .s4nd import S4ND, _equal_tensors
from .ssm_kernel import SSMKernel, is_int

__all__ = ['S4NDRecurrence', 'made_from']


def made_from(recurrences: Sequence['S4NDRecurrence'], layers: Sequence[S4ND]) -> bool:
    """Whether each of `layers` holds the parameters (values, dtypes, devices), band-limits and reference grid its
    recurrence was made from. Compared by value, as the layers' operator cache does (on a GPU with one
    synchronization for all): version counters miss writes through `.data` and those of another process sharing the
    model's memory (`share_memory()`: a learner's optimizer step while a worker steps), after which old SSMs would run
    with new pointwise layers, silently. (The grid: a model derives its recurrences' rates from it, and a load of
    weights saved with another grid, the same values or not, changes the rate of the layer's forward.)"""
    if any(tuple(getattr(k, 'bandlimit', None) for k in layer.kernels) != r.bandlimits or layer.l_ref != r.l_ref
           for r, layer in zip(recurrences, layers)):
        return False
    made = [t for r in recurrences for t in r.values]
    return _equal_tensors(made, [t for layer in layers for t in _layer_tensors(layer)])


def _layer_tensors(layer: S4ND) -> list:
    """Every parameter and buffer of `layer` (its SSMs and D), detached."""
    return [t.detach() for t in itertools.chain(layer.parameters(), layer.buffers())]


class S4NDRecurrence:
    """Step-by-step evaluation of a causal 1D S4ND layer: (B, dim) per step -> (B, dim).

    Over a whole sequence u (B, dim, L), stepping through u[..., t] gives `layer(u, rate=rate)`.
    The discretization is computed once, here (with the layer's current parameters and step dt * rate), as a
    snapshot without autograd history: steps never build a graph through the parameters, so memory stays constant
    per step with or without `torch.no_grad()`, and later optimizer updates to the layer do not reach it.

    Args:
        layer: an S4ND layer with ndim=1, bidirectional=False, pool=1, l_max=None, kernel 's4d' or 's4'.
        rate: step-size rate (1 = the layer's reference grid).
        dtype: compute dtype of the recurrence (float32 or float64); None: the layer's, as its forward computes
            (float64 for a float64 layer, else float32).
    """

    def __init__(self, layer: S4ND, rate: float = 1.0, dtype: Optional[torch.dtype] = None):
        if not isinstance(layer, S4ND):
            raise ValueError(f'layer must be an S4ND layer (a block\'s S4ND mixer, e.g. `block.mixer`), got '
                             f'{type(layer).__name__}')
        if layer.ndim != 1 or layer.bidirectional != (False,):
            raise ValueError(f'the recurrent view needs a causal 1D S4ND layer (ndim=1, bidirectional=False), '
                             f'got ndim={layer.ndim}, bidirectional={layer.bidirectional}')
        if layer.pool != (1,):
            raise ValueError(f'the recurrent view needs pool=1, got pool={layer.pool}')
        if layer.l_max is not None:
            raise ValueError(f'the recurrent view needs l_max=None (a truncated kernel has no finite state), '
                             f'got l_max={layer.l_max}')
        if dtype is None:  # (float32 for a float64 layer stepped its float64 input at float32 accuracy, silently)
            dtype = torch.promote_types(layer.D.dtype, torch.float32)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f'dtype must be torch.float32 or torch.float64 (the state is complex64 or complex128), '
                             f'got {dtype}')
        kernel = layer.kernels[0]
        if not isinstance(kernel, (SSMKernel, S4Kernel)):
            raise ValueError(f"the recurrent view needs an SSM kernel ('s4d' or 's4'), got kernel={layer.kernel!r}")
        if rate is None:  # (the layer's forward would take l_ref / length: a recurrence has no length)
            raise ValueError('rate must be a positive number (1 = the layer\'s reference grid; l_ref / length for a '
                             'sequence of that length), got None')
        (rate,) = layer.resolve_rate((1,), rate)  # (a number or a one-axis tuple, as the layer's forward takes)
        self.diagonal = isinstance(kernel, SSMKernel)
        # the values the snapshot is made from (copied before it: a later write makes it stale), for `made_from`
        self.values = [t.clone() for t in _layer_tensors(layer)]
        self.bandlimits = tuple(getattr(k, 'bandlimit', None) for k in layer.kernels)
        self.l_ref = layer.l_ref  # (for `made_from`)
        with torch.no_grad():
            # forward pre-hooks (torch.nn.utils.prune: its hook recomputes a pruned parameter from the unpruned one)
            # run first, as in the layer's forward: the layer's own (a pruned D) on an empty batch, which generates
            # no kernel, then the kernel's; read without them, a pruned D or SSM parameter was the value of the last
            # forward, stale after an update
            if layer._forward_pre_hooks:
                layer(layer.D.new_zeros((0, layer.dim, 1)), rate=rate)
            if kernel._forward_pre_hooks:
                kernel(1, rate=rate)
            # discretized in float64 and kept as A~ - I, the state stepped as x + (A~ - I) x: A~ = I + O(dt A) rounded
            # to float32 (steps of 6e-8) drifted 4e-5 of the output's scale from the convolution over 4k steps at
            # dt * rate = 1e-5, the difference keeps the convolution's 1e-6
            a, b, c = kernel.discretize(rate, torch.float64)
            a = a - (1 if self.diagonal else torch.eye(a.shape[-1], dtype=a.dtype, device=a.device))
            if self.diagonal:
                c = 2 * c  # y = 2 Re(C^T x) over the modes with Im A > 0
            complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
            # (rank-1 terms share the state: (dim, N), their C summed)
            self.a_minus_i, self.b, self.c = (t.to(complex_dtype) for t in (a, b, c.sum(0)))
            self.d = layer.D.to(dtype, copy=True)
        self.dtype = dtype

    def default_state(self, batch: int) -> torch.Tensor:
        """The zero state, (batch, dim, N) complex (N = d_state / 2 for 's4d', d_state for 's4')."""
        if not is_int(batch) or batch < 0:  # (a float or a bool failed in torch.Size, or made a batch of 1)
            raise ValueError(f'batch must be a non-negative integer (sequences stepped at once), got {batch!r}')
        return self.b.new_zeros((batch,) + self.b.shape)

    def step(self, u: torch.Tensor, state: torch.Tensor) -> tuple:
        """One sample u (B, dim) -> (y (B, dim) in u's dtype, new state)."""
        if u.ndim != 2 or u.shape[1] != self.b.shape[0]:
            raise ValueError(f'step expects one sample u (B, {self.b.shape[0]}), got shape {tuple(u.shape)}')
        if not u.is_floating_point():  # (y is returned in u's dtype)
            raise ValueError(f'step expects u of a real floating-point dtype, got {u.dtype}')
        if state.shape != (u.shape[0],) + self.b.shape:
            raise ValueError(f'state must be (B, dim, N) = {(u.shape[0],) + tuple(self.b.shape)} for a batch of '
                             f'{u.shape[0]} (see default_state), got shape {tuple(state.shape)}')
        if state.dtype != self.b.dtype:
            raise ValueError(f'state must be {self.b.dtype}, as this recurrence computes in {self.dtype} (see '
                             f'default_state), got {state.dtype}')
        x = u.to(self.dtype)
        if self.diagonal:
            state = state + self.a_minus_i * state + self.b * x[..., None]
        else:
            state = state + torch.einsum('hnm,bhm->bhn', self.a_minus_i, state) + self.b * x[..., None]
        y = torch.einsum('hn,bhn->bh', self.c, state).real + self.d * x
        return y.to(u.dtype), state
