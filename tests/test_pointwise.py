"""The layers between S4ND layers on S4ND's channel-major working layout (`layers.pointwise`), and ConvNeXt-S4ND
keeping that layout through a CPU training step."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, Mlp

import s4nd_vision  # noqa: F401
from s4nd_vision.layers import ConvNeXtS4NDBlock, channel_major, channels_first, dispatch
from s4nd_vision.layers.ops import channel_major_memory
from s4nd_vision.layers.pointwise import layer_norm_channels, linear_glu_channels, norm_mlp_channels


def _channel_major(shape, dtype=torch.float64):
    """A random (B, C, *spatial) tensor in S4ND's channel-major memory, and its underlying (C, ..., B, S_N) tensor."""
    u = channel_major(torch.randn(shape, dtype=dtype))
    return channels_first(u), u


def test_channel_major_memory_finds_the_working_tensor_of_a_view_only():
    x, u = _channel_major((2, 3, 4, 5))
    assert channel_major_memory(x).data_ptr() == u.data_ptr() and channel_major_memory(x).shape == u.shape
    assert channel_major_memory(x.contiguous()) is None
    assert channel_major_memory(x.contiguous(memory_format=torch.channels_last)) is None
    assert channel_major_memory(torch.randn(2, 3)) is None
    x3, u3 = _channel_major((2, 3, 4, 5, 6))
    assert channel_major_memory(x3).shape == u3.shape == (3, 4, 5, 2, 6)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_channel_major_casts_in_its_copy(memory_format):
    """`channel_major(x, dtype)` equals the copy then the cast; off the CPU (fake CUDA tensors) it is one operator,
    the cast copy into the working layout (under CUDA autocast the fast path's single pass over its input)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.namespace != 'prim':
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=memory_format)
    expected = channel_major(x).to(torch.bfloat16)
    assert torch.equal(channel_major(x, torch.bfloat16), expected) and expected.is_contiguous()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 3, 4, 5, device='cuda').contiguous(memory_format=memory_format)
        with Ops() as ops:
            u = channel_major(x, torch.bfloat16)
    assert u.shape == (3, 4, 2, 5) and u.dtype == torch.bfloat16 and u.is_contiguous()
    assert ops.ops == ['aten._to_copy.default'], ops.ops


def test_channel_major_input_only_on_the_cpu_outside_graph_capture(monkeypatch):
    x, _ = _channel_major((2, 3, 4, 5))
    assert dispatch.channel_major_input(x) is not None
    assert dispatch.channel_major_input(channels_first(torch.empty(3, 4, 2, 5, device='meta'))) is None  # (off the CPU)
    monkeypatch.setattr(dispatch, 'use_reference', lambda: True)  # (as under torch.compile or export)
    assert dispatch.channel_major_input(x) is None
    assert not dispatch.stem_keeps_channel_major(x)


def test_stem_keeps_channel_major_under_autograd_or_beyond_the_depthwise_sides(monkeypatch):
    """In a training step always; in inference where the blocks' S4ND layers will not take the 'depthwise' path, which
    wants channels-last."""
    monkeypatch.setattr(dispatch, 'depthwise_max_side', lambda: 8)
    for y, beyond in ((torch.randn(2, 3, 8, 8), False), (torch.randn(2, 3, 4, 9), True),
                      (torch.randn(2, 3, 9, 8, 8), True), (torch.randn(2, 3, 2, 8, 8), False)):
        assert dispatch.stem_keeps_channel_major(y)
        with torch.no_grad():
            assert dispatch.stem_keeps_channel_major(y) == beyond


@pytest.mark.parametrize('channels', [6, 1])  # (one channel: batch norm refuses it, layer_norm takes it)
@pytest.mark.parametrize('affine', [True, False])
def test_layer_norm_channels_is_layer_norm_over_channels(affine, channels):
    torch.manual_seed(0)
    x, u = _channel_major((3, channels, 5, 4))
    norm = LayerNorm(channels, eps=1e-6, affine=affine).double()
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    want = norm(x.movedim(1, -1)).movedim(-1, 1)
    got = layer_norm_channels(u, norm)
    assert got.shape == u.shape
    torch.testing.assert_close(channels_first(got), want, rtol=1e-12, atol=1e-12)
    u = u.clone().requires_grad_()
    params = [u] + list(norm.parameters())
    assert torch.autograd.gradcheck(lambda *p: layer_norm_channels(p[0], norm), params[:1])


def test_linear_glu_channels_is_the_pointwise_conv_and_glu():
    torch.manual_seed(0)
    x, u = _channel_major((2, 5, 3, 4, 6))
    weight, bias = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    want = F.glu(F.linear(x.movedim(1, -1), weight, bias), dim=-1).movedim(-1, 1)
    got = linear_glu_channels(u, weight, bias)
    assert got.shape == (4,) + u.shape[1:]
    torch.testing.assert_close(channels_first(got), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(channels_first(linear_glu_channels(u, weight, None)),
                               F.glu(F.linear(x.movedim(1, -1), weight), dim=-1).movedim(-1, 1))


# (positions above / below 4 C: folded or not; one channel)
@pytest.mark.parametrize('shape', [(2, 4, 6, 6), (1, 4, 2, 1), (2, 1, 3, 3)])
@pytest.mark.parametrize('gamma, affine', [(True, True), (False, True), (True, False)])
def test_norm_mlp_channels_is_the_blocks_norm_mlp_and_layer_scale(shape, gamma, affine):
    """Folded into the MLP's weights (many positions) or applied to the activation (few), the norm's affine and the
    layer scale give the block's values and gradients."""
    torch.manual_seed(0)
    c = shape[1]
    norm = LayerNorm(c, eps=1e-6, affine=affine).double()
    mlp = Mlp(c, 4 * c).double()
    g = torch.randn(c, dtype=torch.float64, requires_grad=True) if gamma else None
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x, u = _channel_major(shape)
    params = [p for p in [*norm.parameters(), *mlp.parameters(), g] if p is not None]

    def block(t):
        t = mlp(norm(t.movedim(1, -1)))
        return (t if g is None else t * g).movedim(-1, 1)

    want = block(x)
    got = norm_mlp_channels(u, norm, mlp, g)
    torch.testing.assert_close(channels_first(got), want, rtol=1e-10, atol=1e-12)
    grads_want = torch.autograd.grad(want.square().sum(), params)
    grads_got = torch.autograd.grad(got.square().sum(), params)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    u = u.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: norm_mlp_channels(t, norm, mlp, g), (u,))


def test_norm_mlp_channels_refuses_an_mlp_with_an_inner_norm():
    _, u = _channel_major((1, 4, 2, 2))
    mlp = Mlp(4, 8, norm_layer=torch.nn.LayerNorm).double()
    with pytest.raises(ValueError, match='without an inner norm'):
        norm_mlp_channels(u, LayerNorm(4).double(), mlp, None)


def test_block_keeps_an_s4nd_layers_channel_major_output(monkeypatch):
    """A ConvNeXt block whose S4ND mixer returns its working layout (the CPU's fast path) acts on it there and hands
    it on; values and gradients are those of the channels-last rows path."""
    from s4nd_vision.layers import S4ND, convnext_block
    torch.manual_seed(0)
    block = ConvNeXtS4NDBlock(8, lambda c: S4ND(c, ndim=2, d_state=8), ls_init_value=0.5).double()
    x, _ = _channel_major((2, 8, 6, 5))
    y = block(x)
    assert channel_major_memory(y) is not None
    grads = torch.autograd.grad(y.square().sum(), list(block.parameters()))
    monkeypatch.setattr(convnext_block, 'channel_major_input', lambda t: None)
    want = block(x)
    assert channel_major_memory(want) is None
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, torch.autograd.grad(want.square().sum(), list(block.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name, shape, kwargs', [('convnext_s4nd_atto', (2, 3, 64, 48), {}),
                                                 ('convnext_s4nd_3d_atto', (2, 3, 4, 32, 32), {'num_frames': 4}),
                                                 ('convnext_s4nd_atto', (2, 3, 32, 32), {'dims': (1, 2, 4, 8)})])
def test_cpu_training_step_keeps_the_channel_major_layout_to_the_head(name, shape, kwargs, monkeypatch):
    """Every stage's output in a CPU training step is in S4ND's channel-major layout (no layer in between falls back
    to another layout, which would cost transposing copies), and the logits and gradients equal those of the same
    step on channels-last activations (with drop path: the same masks; also with a one-channel stage, whose norms
    batch norm refuses)."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=shape[-2:], drop_path_rate=0.2, **kwargs).double().train()
    x = torch.randn(shape, dtype=torch.float64)
    layouts = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: layouts.append(channel_major_memory(o) is not None))

    def step():
        torch.manual_seed(1)
        out = model(x)
        return out, torch.autograd.grad(out.square().sum(), list(model.parameters()))

    out, grads = step()
    assert layouts == [True] * len(model.stages)
    from s4nd_vision.layers import convnext_block
    from s4nd_vision.models import convnext_base
    for module in (convnext_block, convnext_base):
        monkeypatch.setattr(module, 'channel_major_input', lambda t: None)
    monkeypatch.setattr(convnext_base, 'stem_keeps_channel_major', lambda t: False)
    layouts.clear()
    out_cl, grads_cl = step()
    assert layouts == [False] * len(model.stages)
    torch.testing.assert_close(out, out_cl, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, grads_cl):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

