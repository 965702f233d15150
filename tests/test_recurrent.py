"""The recurrent view of causal 1D S4ND layers equals their convolutional view over whole sequences."""
import pytest
import torch
from test_s4nd_layer import _randomize

from s4nd_vision.layers import S4ND, S4NDRecurrence
from s4nd_vision.models.s4_seq import SeqS4NDBlock


def _causal_layer(kernel: str, dim: int = 3, **kw) -> S4ND:
    return S4ND(dim, ndim=1, kernel=kernel, bidirectional=False, d_state=8, dt_min=0.05, dt_max=0.5,
                **kw).double()


def _run(recurrences, u: torch.Tensor, between=None) -> torch.Tensor:
    """Step a stack of recurrences through u (B, dim, L), with `between` applied after each but the last."""
    states = [r.default_state(u.shape[0]) for r in recurrences]
    out = []
    for t in range(u.shape[-1]):
        y = u[..., t]
        for i, r in enumerate(recurrences):
            y, states[i] = r.step(y, states[i])
            if between is not None and i < len(recurrences) - 1:
                y = between(y)
        out.append(y)
    return torch.stack(out, dim=-1)


@pytest.mark.parametrize('kernel,kw', [('s4d', {}), ('s4d', dict(rank=2, bandlimit=0.8, init='legs')),
                                       ('s4', {}), ('s4', dict(rank=2))])
def test_recurrence_equals_convolution(kernel, kw):
    torch.manual_seed(0)
    layer = _causal_layer(kernel, **kw)
    _randomize(layer)
    if kernel == 's4':
        with torch.no_grad():  # randomized P, B, C of moderate size: a stable, not too stiff system
            for k in layer.kernels:
                k.p.mul_(0.3)
                k.log_a_real.fill_(-0.5)
    u = torch.randn(2, 3, 40, dtype=torch.float64)
    for rate in (1.0, 0.5):
        expected = layer(u, rate=rate)
        torch.testing.assert_close(_run([S4NDRecurrence(layer, rate, torch.float64)], u), expected)


@pytest.mark.parametrize('kernel,init,bandlimit', [('s4d', 'lin', None), ('s4d', 'inv', None), ('s4d', 'legs', None),
                                                    ('s4', 'legs', None), ('s4', 'legs', 0.5)])
def test_recurrence_equals_convolution_at_every_init(kernel, init, bandlimit):
    """At the initializations' own structured values (S4D-Inv's fast modes: dt |Im A| of tens of radians per step)
    and with S4's band-limit (C masked on the modes of Lambda), at the reference rate and at finer and coarser
    steps, with D."""
    torch.manual_seed(0)
    layer = S4ND(3, ndim=1, kernel=kernel, init=init, bandlimit=bandlimit, bidirectional=False, d_state=16,
                 dt_min=0.05, dt_max=1.0).double()
    u = torch.randn(2, 3, 37, dtype=torch.float64)
    for rate in (1.0, 0.3, 3.0):
        with torch.no_grad():
            expected = layer(u, rate=rate)
        torch.testing.assert_close(_run([S4NDRecurrence(layer, rate)], u), expected)


@pytest.mark.parametrize('kernel', ['s4d', 's4'])
def test_recurrent_stack_with_nonlinearities_equals_convolutional_stack(kernel):
    """Two causal layers with a GELU between them: the nonlinearity sees each sample once, in order."""
    torch.manual_seed(0)
    layers = [_causal_layer(kernel, l_ref=32) for _ in range(2)]
    u = torch.randn(2, 3, 32, dtype=torch.float64)
    expected = layers[1](torch.nn.functional.gelu(layers[0](u)))  # at the reference length: rate 1
    recurrences = [S4NDRecurrence(layer, 1.0, torch.float64) for layer in layers]
    torch.testing.assert_close(_run(recurrences, u, between=torch.nn.functional.gelu), expected)
    assert recurrences[0].default_state(2).shape == ((2, 3, 4) if kernel == 's4d' else (2, 3, 8))


def test_recurrence_errors():
    with pytest.raises(ValueError, match='causal 1D'):
        S4NDRecurrence(S4ND(3, ndim=1))
    with pytest.raises(ValueError, match='causal 1D'):
        S4NDRecurrence(S4ND(3, ndim=2, bidirectional=False))
    with pytest.raises(ValueError, match='pool'):
        S4NDRecurrence(S4ND(3, ndim=1, bidirectional=False, pool=2))
    with pytest.raises(ValueError, match='l_max'):
        S4NDRecurrence(S4ND(3, ndim=1, bidirectional=False, l_max=8))
    with pytest.raises(ValueError, match='SSM kernel'):
        S4NDRecurrence(S4ND(3, ndim=1, bidirectional=False, kernel='sgconv', l_ref=8))
    with pytest.raises(ValueError, match='rate'):
        S4NDRecurrence(S4ND(3, ndim=1, bidirectional=False), rate=0.0)
    with pytest.raises(ValueError, match=r'rate must be a positive number .* got None'):  # (no length to divide)
        S4NDRecurrence(S4ND(3, ndim=1, bidirectional=False, l_ref=16), rate=None)
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match='dtype must be torch.float32 or torch.float64'):
            S4NDRecurrence(S4ND(3, ndim=1, bidirectional=False), dtype=dtype)
    # the compute dtype follows the layer's by default: a float64 layer stepped at float32 accuracy (error 1e-6)
    assert S4NDRecurrence(_causal_layer('s4d')).default_state(1).dtype == torch.complex128
    assert S4NDRecurrence(S4ND(3, ndim=1, bidirectional=False).bfloat16()).dtype == torch.float32
    causal = S4ND(3, ndim=1, bidirectional=False)  # a per-axis rate, as the layer's forward takes it
    torch.testing.assert_close(S4NDRecurrence(causal, rate=(2.0,)).a_minus_i,
                               S4NDRecurrence(causal, rate=2.0).a_minus_i)
    recurrence = S4NDRecurrence(S4ND(3, ndim=1, bidirectional=False))
    for batch in (-1, 2.0, True):
        with pytest.raises(ValueError, match=f'batch must be a non-negative integer .* got {batch!r}'):
            recurrence.default_state(batch)
    with pytest.raises(ValueError, match=r'one sample u \(B, 3\), got shape \(3,\)'):
        recurrence.step(torch.zeros(3), recurrence.default_state(2))  # (it broadcast over the state's batch)
    with pytest.raises(ValueError, match=r'state must be .* for a batch of 2'):
        recurrence.step(torch.zeros(2, 3), S4NDRecurrence(S4ND(4, ndim=1, bidirectional=False)).default_state(2))
    # a block instead of its S4ND mixer, a state of another dtype (it was promoted or failed in the arithmetic), an
    # integer input (its output came back rounded)
    block = SeqS4NDBlock(3, S4ND(3, ndim=1, bidirectional=False))
    with pytest.raises(ValueError, match=r'layer must be an S4ND layer \(a block\'s S4ND mixer.* got SeqS4NDBlock'):
        S4NDRecurrence(block)
    for kernel in ('s4d', 's4'):
        recurrence = S4NDRecurrence(S4ND(3, ndim=1, bidirectional=False, kernel=kernel, d_state=8))
        state = recurrence.default_state(2)
        for wrong in (state.to(torch.complex128), state.real):
            with pytest.raises(ValueError, match=f'state must be torch.complex64, as this recurrence computes in '
                                                 f'torch.float32 \\(see default_state\\), got {wrong.dtype}'):
                recurrence.step(torch.zeros(2, 3), wrong)
        with pytest.raises(ValueError, match='step expects u of a real floating-point dtype, got torch.int64'):
            recurrence.step(torch.ones(2, 3, dtype=torch.long), state)


@pytest.mark.parametrize('kernel', ['s4d', 's4'])
def test_recurrence_is_a_snapshot_without_autograd_history(kernel):
    """Steps build no graph through the parameters (memory would grow with every step), and later in-place
    parameter updates do not change the snapshot."""
    layer = S4ND(3, ndim=1, bidirectional=False, kernel=kernel, d_state=8)
    recurrence = S4NDRecurrence(layer)
    assert not any(t.requires_grad for t in (recurrence.a_minus_i, recurrence.b, recurrence.c, recurrence.d))
    y, state = recurrence.step(torch.randn(2, 3), recurrence.default_state(2))
    assert not y.requires_grad and not state.requires_grad
    d = recurrence.d.clone()
    with torch.no_grad():
        layer.D.add_(1.0)
    torch.testing.assert_close(recurrence.d, d)


@pytest.mark.parametrize('kernel', ['s4d', 's4'])
def test_recurrence_of_a_pruned_layer_uses_its_current_weights(kernel):
    """torch.nn.utils.prune recomputes a pruned parameter in a forward pre-hook: a recurrence made after an update
    of the unpruned weight (no forward between) runs the hook, as the layer's forward does (it read the value of
    the last forward, silently)."""
    import torch.nn.utils.prune as prune
    torch.manual_seed(0)
    layer = _causal_layer(kernel)
    prune.random_unstructured(layer.kernels[0], 'b', amount=0.5)
    u = torch.randn(2, 3, 24, dtype=torch.float64)
    layer(u)  # (the hook sets b from the values before the update)
    with torch.no_grad():
        layer.kernels[0].b_orig.mul_(-2.0)
    torch.testing.assert_close(_run([S4NDRecurrence(layer, 1.0, torch.float64)], u), layer(u))


@pytest.mark.parametrize('kernel', ['s4d', 's4'])
def test_recurrence_of_a_layer_with_a_pruned_skip_uses_its_current_weights(kernel):
    """The same for the layer's own pre-hooks: D pruned (e.g. every parameter of a model pruned) was read as the
    last forward left it, stale after an update of D_orig; its recurrence then stepped another skip than the layer
    computes."""
    import torch.nn.utils.prune as prune
    torch.manual_seed(0)
    layer = _causal_layer(kernel)
    prune.random_unstructured(layer, 'D', amount=0.34)
    u = torch.randn(2, 3, 12, dtype=torch.float64)
    layer(u)  # (the hook sets D from the values before the update)
    with torch.no_grad():
        layer.D_orig.mul_(-3.0)
    torch.testing.assert_close(_run([S4NDRecurrence(layer, 1.0, torch.float64)], u), layer(u))

@pytest.mark.parametrize('kernel', ['s4d', 's4'])
def test_float32_recurrence_keeps_the_convolutions_accuracy_at_small_steps(kernel):
    """At dt * rate = 1e-5, A~ = I + O(1e-5) rounded to float32 drifted 2e-5 to 4e-5 of the output's scale from the
    float64 convolution over 4k steps; stepped as x + (A~ - I) x the recurrence stays within the float32
    convolution's 1e-6 to 3e-6."""
    torch.manual_seed(0)
    layer = S4ND(8, ndim=1, kernel=kernel, bidirectional=False, d_state=16, dt_min=1e-5, dt_max=1e-4).double()
    with torch.no_grad():
        layer.D.zero_()  # (the SSM's part alone: D u would hide it)
        u = torch.randn(1, 8, 4096, dtype=torch.float64)
        expected = layer(u, rate=1.0)
        actual = _run([S4NDRecurrence(layer.float(), 1.0, torch.float32)], u.float())
    assert (actual - expected).abs().max() < 5e-6 * expected.abs().max()
