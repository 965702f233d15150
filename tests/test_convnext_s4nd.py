"""ConvNeXt-S4ND specifics: registration, resolution control, checkpoints, optimizer groups, errors."""
import copy
import warnings
from functools import partial

import pytest
import timm
import torch
import torch.nn.utils.prune
from safetensors.torch import save_file
from stacking import count_generation_calls, latest_operators, step_with_and_without_stacking
from timm.optim import create_optimizer_v2

import s4nd_vision  # noqa: F401
from s4nd_vision.layers import S4ND, S4Kernel, SGConvKernel, SSMKernel, channel_major, channels_first
from s4nd_vision.layers.ops import channel_major_memory
from s4nd_vision.models import PAPER_SSM, ConvNeXtS4ND
from s4nd_vision.train.optim import param_groups_ssm, ssm_param_names

SIZES = ('atto', 'femto', 'pico', 'nano', 'tiny', 'small', 'base')
PAPER_SIZES = ('tiny', 'small', 'base')


def test_registered_with_timm():
    names = timm.list_models('convnext_s4nd_*', exclude_filters='*_3d_*')
    assert names == sorted([f'convnext_s4nd_{s}' for s in SIZES] + [f'convnext_s4nd_{s}_paper' for s in PAPER_SIZES])
    assert all(timm.is_model(n) for n in names)
    assert timm.get_pretrained_cfg('convnext_s4nd_tiny').input_size == (3, 224, 224)


def _ssm_settings(model) -> set:
    """{(init, dt_min, dt_max, bandlimit)} over every SSM kernel of the model."""
    return {(k.init, k.dt_min, k.dt_max, k.bandlimit) for k in model.modules() if isinstance(k, SSMKernel)}


def test_defaults_and_paper_variants():
    """The defaults are the zero-shot study's (S4D-Inv, dt in [0.1, 1], band-limit 1.0) in every S4ND layer;
    `*_paper` has the published ImageNet settings and otherwise the same architecture and parameters."""
    with torch.device('meta'):
        default = timm.create_model('convnext_s4nd_tiny')
        paper = timm.create_model('convnext_s4nd_tiny_paper')
    assert _ssm_settings(default) == {('inv', 0.1, 1.0, 1.0)}
    assert PAPER_SSM == dict(ssm_init='lin', dt_min=0.1, dt_max=1.0, bandlimit=0)
    assert _ssm_settings(paper) == {('lin', 0.1, 1.0, None)}
    # through timm.create_model (which drops None arguments) the published settings are one argument set away
    with torch.device('meta'):
        assert _ssm_settings(timm.create_model('convnext_s4nd_atto', **PAPER_SSM)) == {('lin', 0.1, 1.0, None)}
        with pytest.raises(ValueError, match='bandlimit must be a positive cut-off, or 0 or None for off'):
            timm.create_model('convnext_s4nd_atto', bandlimit=-1.0)
    assert [(n, p.shape) for n, p in default.named_parameters()] == [(n, p.shape) for n, p in paper.named_parameters()]
    for size in PAPER_SIZES:
        with torch.device('meta'):
            a, b = (timm.create_model(f'convnext_s4nd_{size}{tag}') for tag in ('', '_paper'))
        assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    # other kernels take their own defaults (S4: LegS, no band-limit, as the original; SGConv: none, an explicit
    # cut-off is an error)
    with torch.device('meta'):
        for kwargs, cut in ((dict(kernel='s4'), None), (dict(kernel='s4', bandlimit=0), None),
                            (dict(kernel='s4', bandlimit=1.0), 1.0)):
            s4 = timm.create_model('convnext_s4nd_atto', **kwargs)
            kernels = [k for k in s4.modules() if isinstance(k, S4Kernel)]
            assert {k.init for k in kernels} == {'legs'} and {k.bandlimit for k in kernels} == {cut}
        timm.create_model('convnext_sgconv_atto')
        with pytest.raises(ValueError, match=r"bandlimit applies to the SSM kernels \('s4d', 's4'\), got "
                                             r"kernel='sgconv'"):
            timm.create_model('convnext_s4nd_atto', kernel='sgconv', bandlimit=1.0)
    # the class itself: None is the kernel's default, as through timm.create_model (which drops it)
    with torch.device('meta'):
        assert _ssm_settings(ConvNeXtS4ND(depths=(1, 1), dims=(8, 16), bandlimit=None)) == {('inv', 0.1, 1.0, 1.0)}



def test_ssm_init_errors_name_the_keyword_and_paper_models_take_any_kernel():
    """A bad `ssm_init` is refused in the model's keywords (the layers name their own `init`), for every family;
    a `*_paper` model with another kernel keeps that kernel's init (S4D-Lin is an S4D init) and takes the rest
    of `PAPER_SSM`, instead of blaming an init the user never passed."""
    with torch.device('meta'):
        for name in ('convnext_s4nd_atto', 'convnext_s4nd_3d_atto', 'vit_s4nd_atto_patch16_224', 's4nd_iso_tiny',
                     's4nd_seq_atto'):
            with pytest.raises(ValueError, match=r"ssm_init must be one of \('lin', 'inv', 'legs'\) for "
                                                 r"kernel='s4d' \(or None for the default\), got 'fourier'"):
                timm.create_model(name, ssm_init='fourier')
        with pytest.raises(ValueError, match=r"ssm_init must be one of \('legs',\) for kernel='s4'"):
            timm.create_model('convnext_s4nd_atto', kernel='s4', ssm_init='lin')
        with pytest.raises(ValueError, match=r"ssm_init applies to the SSM kernels \('s4d', 's4'\), not "
                                             r"kernel='sgconv' \(pass ssm_init=None\)"):
            timm.create_model('convnext_s4nd_atto', kernel='sgconv', ssm_init='lin')
        with pytest.raises(ValueError, match=r"kernel must be one of \('s4d', 's4', 'sgconv'\), got 's5'"):
            timm.create_model('vit_s4nd_atto_patch16_224', kernel='s5')
        s4 = timm.create_model('convnext_s4nd_tiny_paper', kernel='s4')
        assert {(k.init, k.dt_min, k.dt_max, k.bandlimit) for k in s4.modules() if isinstance(k, S4Kernel)} == {
            ('legs', 0.1, 1.0, None)}
        sgconv = timm.create_model('convnext_s4nd_tiny_paper', kernel='sgconv')
        assert not any(isinstance(k, SSMKernel) for k in sgconv.modules())
        assert _ssm_settings(timm.create_model('convnext_s4nd_tiny_paper')) == {('lin', 0.1, 1.0, None)}

def test_tiny_parameter_count():
    with torch.device('meta'):
        s4nd = timm.create_model('convnext_s4nd_tiny')
        base = timm.create_model('convnext_tiny')
    n_s4nd = sum(p.numel() for p in s4nd.parameters())
    n_base = sum(p.numel() for p in base.parameters())
    assert 29e6 < n_s4nd < 33e6  # the paper's ConvNeXt-S4ND-T: about 30M
    assert n_s4nd > n_base


def test_every_s4nd_layer_is_referenced_to_its_grid():
    model = timm.create_model('convnext_s4nd_atto', img_size=128)
    layers = dict(model._s4nd_layers())
    assert len(layers) == 1 + 3 + sum(len(s.blocks) for s in model.stages)
    assert all(isinstance(m, S4ND) for m in layers)
    assert {m.l_ref for m in layers} == {(128, 128), (32, 32), (16, 16), (8, 8), (4, 4)}
    assert set(layers.values()) == {(1, 1), (4, 4), (8, 8), (16, 16), (32, 32)}  # strides of the grids
    assert all(m.l_ref == (128 // sh, 128 // sw) for m, (sh, sw) in layers.items())
    assert model.stem[1].l_ref == (128, 128)
    assert model.stages[3].blocks[0].conv_dw.l_ref == (4, 4)
    assert model.stages[3].downsample[1].l_ref == (8, 8)


def test_drop_path_rate_rises_linearly_over_all_blocks_as_timms_convnext():
    """drop_path_rate (timm's --drop-path): the blocks' stochastic depth rises linearly from 0 over every block of
    every stage, as in timm's ConvNeXt (not one rate per stage)."""
    kw = dict(depths=(2, 3, 1, 2), dims=(8, 8, 8, 8), drop_path_rate=0.35)
    with torch.device('meta'):
        model = timm.create_model('convnext_s4nd_atto', img_size=64, **kw)
        ref = timm.create_model('convnext_atto', **kw)
    def rates(m):
        return [getattr(b.drop_path, 'drop_prob', 0.0) for s in m.stages for b in s.blocks]
    assert rates(model) == pytest.approx([0.35 * i / 7 for i in range(8)])
    assert rates(model) == pytest.approx(rates(ref))


def test_dilated_model_is_built_with_the_reference_grids_of_the_undilated_one():
    """With output_stride < 32 every S4ND layer is referenced to its grid without dilation (the total stride of the
    undilated model), as built, not only after loading the undilated model's weights (which overwrite them)."""
    plain = timm.create_model('convnext_s4nd_atto', img_size=64, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    expected = [m.l_ref for m, _ in plain._s4nd_layers()]
    for output_stride in (16, 8):
        model = timm.create_model(
            'convnext_s4nd_atto', img_size=64, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), output_stride=output_stride)
        assert [m.l_ref for m, _ in model._s4nd_layers()] == expected


def test_set_input_size_keeps_the_reference_grids():
    """(Function preservation for every family: tests/test_input_size.py.)"""
    trained_64 = timm.create_model('convnext_s4nd_atto', img_size=64).eval()
    trained_64.set_input_size(96)
    assert trained_64.img_size == (96, 96) and trained_64.stages[3].downsample[1].l_ref == (4, 4)
    trained_64.set_input_size(None)  # timm's meaning: keep the size
    assert trained_64.img_size == (96, 96)
    with pytest.raises(ValueError, match='img_size'):
        trained_64.set_input_size(16)


def test_runs_at_new_and_non_square_resolutions():
    model = timm.create_model('convnext_s4nd_atto', img_size=64, num_classes=5).eval()
    with torch.no_grad():
        for size in ((64, 64), (96, 96), (64, 96), (100, 70)):
            features = model.forward_features(torch.randn(1, 3, *size))
            assert features.shape == (1, 320, size[0] // 32, size[1] // 32)
            assert torch.isfinite(features).all()


def test_stem_and_downsample_types():
    patch = timm.create_model('convnext_s4nd_atto', stem_type='patch', downsample_type='conv')
    assert isinstance(patch.stem[0], torch.nn.Conv2d) and patch.stem[0].stride == (4, 4)
    assert not any(isinstance(m, S4ND) for m in patch.stem.modules())
    assert not any(isinstance(m, S4ND) for s in patch.stages for m in s.downsample.modules())
    assert patch(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match='stem_type'):
        timm.create_model('convnext_s4nd_atto', stem_type='overlap')
    with pytest.raises(ValueError, match='downsample_type'):
        timm.create_model('convnext_s4nd_atto', downsample_type='strided')


@pytest.mark.parametrize('name, shape', [('convnext_s4nd_atto', (2, 3, 64, 48)),
                                         ('convnext_s4nd_3d_atto', (2, 3, 4, 32, 32))])
def test_stem_and_downsampling_compute_their_modules_in_order(name, shape):
    """The S4ND stem and downsampling run their 1x1 conv, GLU and norm as GEMM and row ops, on channels-last rows
    or on S4ND's channel-major layout (and the stem's first conv fused into S4ND): the same values and gradients as
    applying the modules one after another. Under autograd on the CPU the stem hands on the channel-major layout
    and the downsampling keeps it; without autograd both hand on channels-last results, and so does the
    downsampling for channels-last input."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=shape[-2:], **({'num_frames': shape[2]} if len(shape) == 5 else {}))
    model = model.double()  # (float64: the two orders of operations agree to rounding, far below the tolerances)
    memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        down_x = torch.randn(model.stages[0](model.stem(x)).shape, dtype=x.dtype)
    down = model.stages[1].downsample
    cases = [(model.stem, x, 'channel-major'), (down, down_x.contiguous(memory_format=memory_format), 'channels-last'),
             (down, channels_first(channel_major(down_x)), 'channel-major')]
    for module, module_x, layout in cases:
        outs, grads = [], []
        for forward in (module.forward, partial(torch.nn.Sequential.forward, module)):
            y = forward(module_x)
            grads.append(torch.autograd.grad(y.square().sum(), list(module.parameters())))
            outs.append(y)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        if layout == 'channel-major':
            assert channel_major_memory(outs[0]) is not None
        else:
            assert outs[0].is_contiguous(memory_format=memory_format)
        with torch.no_grad():
            y = module(module_x if layout == 'channels-last' or module is model.stem
                       else module_x.contiguous(memory_format=memory_format))
        torch.testing.assert_close(y, outs[1].detach(), rtol=1e-10, atol=1e-12)
        assert y.is_contiguous(memory_format=memory_format)


def test_bad_input_errors():
    model = timm.create_model('convnext_s4nd_atto')
    with pytest.raises(ValueError, match='at least 32'):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match='3 input channels'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match='floating point input.*torch.uint8'):
        model(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8))


def test_pretrained_from_local_safetensors(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model('convnext_s4nd_atto', num_classes=7).eval()
    path = tmp_path / 'weights.safetensors'
    save_file(source.state_dict(), str(path))
    loaded = timm.create_model(
        'convnext_s4nd_atto', pretrained=True, num_classes=7,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=7)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_start_from_plain_timm_convnext(tmp_path):
    torch.manual_seed(0)
    convnext = timm.create_model('convnext_atto', conv_mlp=False)  # the Linear MLP layout of convnext_tiny+
    path = tmp_path / 'convnext_atto.safetensors'
    save_file(convnext.state_dict(), str(path))
    model = timm.create_model(
        'convnext_s4nd_atto', pretrained=True, stem_type='patch', downsample_type='conv',
        pretrained_cfg_overlay=dict(file=str(path)))
    theirs, ours = convnext.state_dict(), model.state_dict()
    transferred = [k for k in ours if k in theirs and theirs[k].shape == ours[k].shape]
    assert 'stem.0.weight' in transferred and 'stages.1.downsample.1.weight' in transferred
    assert 'stages.2.blocks.3.mlp.fc1.weight' in transferred and 'head.fc.weight' in transferred
    for k in transferred:
        torch.testing.assert_close(ours[k], theirs[k])
    # the depthwise convs have no counterpart: S4ND keeps its own initialization
    assert not any('conv_dw.weight' in k for k in ours)
    assert model.stages[0].blocks[0].conv_dw.kernels[0].log_dt.abs().sum() > 0


@pytest.mark.parametrize('source', ['resnet18', 'convnext_tiny', 'one tensor', 'head only'])
def test_weights_that_fit_nothing_outside_the_head_are_refused(source, tmp_path):
    """Another architecture, a ConvNeXt of other widths or a file of unrelated tensors would leave the model at
    its initialization under a pretrained name (reported at INFO only): refused, naming what went unused."""
    if source == 'one tensor':
        weights = {'x': torch.zeros(1)}
    elif source == 'head only':
        weights = {k: v for k, v in timm.create_model('convnext_atto').state_dict().items() if k.startswith('head.')}
    else:
        weights = timm.create_model(source).state_dict()
    path = tmp_path / 'w.safetensors'
    save_file(weights, str(path))
    with pytest.raises(ValueError, match='fit no module of ConvNeXtS4ND outside the head') as e:
        timm.create_model('convnext_s4nd_atto', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert ('unused from the checkpoint' in str(e.value)) == (source != 'head only')


def test_checkpoint_filters_unwrap_training_checkpoints_the_same_way():
    """One order for the 2D filter and 3D inflation: the EMA weights before the model's (as timm's
    load_state_dict), DDP / torch.compile prefixes removed."""
    from s4nd_vision.models import convnext_s4nd, inflate
    torch.manual_seed(0)
    model, ema = (timm.create_model('convnext_s4nd_atto', img_size=32).state_dict() for _ in range(2))
    video = timm.create_model('convnext_s4nd_3d_atto', img_size=32, num_frames=4)
    wrapped = {'model': model, 'model_ema': {'module.' + k: v for k, v in ema.items()}, 'epoch': 3}
    filtered = convnext_s4nd.checkpoint_filter_fn(wrapped, timm.create_model('convnext_s4nd_atto', img_size=32))
    assert filtered.keys() == ema.keys() and all(filtered[k] is ema[k] for k in ema)
    inflated, expected = inflate.inflate_state_dict(wrapped, video), inflate.inflate_state_dict(ema, video)
    assert inflated.keys() == expected.keys() and all(torch.equal(inflated[k], expected[k]) for k in expected)
    assert not torch.equal(inflated['stages.0.blocks.0.mlp.fc1.weight'],
                           inflate.inflate_state_dict(model, video)['stages.0.blocks.0.mlp.fc1.weight'])


def test_ssm_params_get_no_weight_decay_and_their_own_lr():
    model = timm.create_model('convnext_s4nd_atto')
    ssm_names = set(ssm_param_names(model))
    assert ssm_names == model.no_weight_decay()
    assert {n.rsplit('.', 1)[-1] for n in ssm_names} == {'log_dt', 'log_a_real', 'a_imag', 'b'}
    ssm_params = {id(p) for n, p in model.named_parameters() if n in ssm_names}

    # timm's factory alone: SSM params land in a weight-decay-free group
    opt = create_optimizer_v2(model, 'adamw', lr=4e-3, weight_decay=0.05)
    for group in opt.param_groups:
        if any(id(p) in ssm_params for p in group['params']):
            assert group['weight_decay'] == 0.0

    # with our groups: own learning rate too, and every parameter exactly once
    opt = create_optimizer_v2(
        model, 'adamw', lr=4e-3, weight_decay=0.05,
        param_group_fn=partial(param_groups_ssm, weight_decay=0.05, ssm_lr=1e-3))
    ssm_groups = [g for g in opt.param_groups if any(id(p) in ssm_params for p in g['params'])]
    assert len(ssm_groups) == 1 and ssm_groups[0]['lr'] == 1e-3 and ssm_groups[0]['weight_decay'] == 0.0
    assert {id(p) for p in ssm_groups[0]['params']} == ssm_params
    decayed = [g for g in opt.param_groups if g['weight_decay'] == 0.05]
    assert decayed and all(p.ndim > 1 for g in decayed for p in g['params'])
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


def test_ssm_params_are_found_in_copies_and_in_models_built_on_the_meta_device():
    """By the kernels' parameter names: deepcopy, meta-device creation and loading with assign=True make new
    parameter objects (a mark on the tensors would be lost, and the SSM parameters silently decayed)."""
    model = timm.create_model('convnext_s4nd_atto')
    names = model.no_weight_decay()
    meta = timm.create_model('convnext_s4nd_atto', device='meta')
    assigned = timm.create_model('convnext_s4nd_atto', device='meta')
    assigned.load_state_dict(model.state_dict(), assign=True)
    for other in (copy.deepcopy(model), meta.to_empty(device='cpu'), assigned):
        assert other.no_weight_decay() == names and set(ssm_param_names(other)) == names
        opt = create_optimizer_v2(other, 'adamw', lr=4e-3, weight_decay=0.05)
        ssm = {id(p) for n, p in other.named_parameters() if n in names}
        assert all(g['weight_decay'] == 0.0 for g in opt.param_groups if ssm & {id(p) for p in g['params']})


@pytest.mark.parametrize('how', ['parametrize', 'prune'])
@pytest.mark.parametrize('kernel, name', [('s4d', 'log_a_real'), ('sgconv', 'weight')])
def test_recomputed_kernel_parameters_keep_their_optimizer_group(kernel, name, how):
    """A kernel parameter computed from another (torch.nn.utils.parametrize, or prune's forward pre-hook) is
    trained through that original: what `no_weight_decay()` names and `param_groups_ssm` groups (the computed
    tensor matched no name, and the SSM parameter was silently decayed at the base lr)."""
    model = timm.create_model('convnext_s4nd_atto', depths=(1, 1), dims=(8, 16), kernel=kernel, img_size=32)
    module = next(m for m in model.modules() if isinstance(m, (SSMKernel, SGConvKernel)))
    if how == 'parametrize':
        torch.nn.utils.parametrize.register_parametrization(module, name, Scale())
        original = getattr(module.parametrizations, name).original
    else:
        torch.nn.utils.prune.l1_unstructured(module, name, amount=0.25)
        original = getattr(module, f'{name}_orig')
    full = next(n for n, p in model.named_parameters() if p is original)
    assert kernel == 'sgconv' or full in model.no_weight_decay()
    groups = param_groups_ssm(model, weight_decay=0.05, ssm_lr=1e-3)
    group = next(g for g in groups if any(p is original for p in g['params']))
    assert group['lr'] == 1e-3 and group['weight_decay'] == (0.05 if kernel == 'sgconv' else 0.0)
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))


class Scale(torch.nn.Module):
    """A parametrization that computes a new tensor (an identity would hand back the original itself)."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return 2 * t


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_fused_layers_call_hooked_or_replaced_submodules(train):
    """The stem, the downsampling layers and (in a CPU training step) the blocks read their submodules' weights
    instead of calling them; with hooks on a submodule (feature capture, FLOP counters) or a submodule replaced (an
    adapter), they call them: hooks fire and replacements act, with the same result otherwise."""
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', num_classes=10, ls_init_value=1.0).train(train)
    x = torch.randn(2, 3, 64, 64)
    fused = model(x)
    hooked = ['stem.0', 'stem.1', 'stem.2', 'stages.1.downsample.2', 'stages.0.blocks.0.mlp.fc1',
              'stages.3.blocks.0.norm']
    calls = []
    handles = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
               for name in hooked]
    torch.testing.assert_close(model(x), fused, rtol=1e-4, atol=1e-5)
    assert sorted(calls) == sorted(hooked)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(model(x), fused, rtol=0, atol=0)  # (fused again)

    class Shifted(torch.nn.Module):  # an adapter around a submodule
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 1.0

    for name in ('stages.0.blocks.0.mlp.fc1', 'stem.2'):
        adapted = copy.deepcopy(model)
        parent, _, child = name.rpartition('.')
        setattr(adapted.get_submodule(parent), child, Shifted(adapted.get_submodule(name)))
        assert (adapted(x) - fused).abs().max() > 1e-3, name


def test_resolution_aware_stem_keeps_logits_across_resolutions():
    """Untrained, for a smooth image at 64 and at 128 px: the S4ND stem and downsampling give nearly
    the same logits (more so band-limited); timm's strided patch stem and convs do not."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 6, 6, generator=g)
    images = [torch.nn.functional.interpolate(coarse, size=(n, n), mode='bicubic') for n in (64, 128)]

    def logit_change(**kwargs):
        torch.manual_seed(0)
        model = timm.create_model('convnext_s4nd_atto', img_size=64, **kwargs).eval()
        with torch.no_grad():
            low, high = (model(x) for x in images)
        return ((high - low).norm() / low.norm()).item()

    default, off, half = logit_change(), logit_change(bandlimit=0), logit_change(bandlimit=0.5)
    patch = logit_change(stem_type='patch', downsample_type='conv')
    assert default < 0.5 * patch and off < patch
    assert default < 0.8 * off and half < off  # band-limited at either cut-off: closer still


def test_training_step_generates_all_kernels_in_one_stacked_call(monkeypatch):
    """With autograd on, the model generates every layer's kernels up front, in one call whatever their lengths;
    outputs and gradients equal the layer-by-layer generation (one call per layer), which each layer falls back to."""
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=64)
    calls = count_generation_calls(monkeypatch)
    stacked, per_layer = step_with_and_without_stacking(monkeypatch, model, torch.randn(2, 3, 70, 64), calls)
    layers = sum(isinstance(m, S4ND) for m in model.modules())
    assert stacked[2] == 1 and per_layer[2] == layers > 1  # (its axes, of lengths 70 // s and 64 // s, in one)
    assert all(layer._prepared is None for layer in model.modules() if isinstance(layer, S4ND))


def test_features_only_keeps_timms_list_wrapper():
    """Backbones keep timm ConvNeXt's wrapper (its state-dict keys, set_grad_checkpointing, feature_cls='list'),
    which detection and segmentation code and saved backbone weights rely on."""
    from timm.models import FeatureListNet

    from s4nd_vision.models.convnext_base import ConvNeXtFeatures
    for kwargs, cls in ((dict(), ConvNeXtFeatures), (dict(feature_cls='list'), FeatureListNet)):
        features = timm.create_model('convnext_s4nd_atto', img_size=64, features_only=True, **kwargs)
        assert isinstance(features, cls) and 'stem_0.weight' in features.state_dict()
        features.set_grad_checkpointing(True)
        assert features.grad_checkpointing
    # the S4ND layers it knows are not registered twice
    assert len(features.state_dict()) == len(ConvNeXtFeatures(
        timm.create_model('convnext_s4nd_atto', img_size=64), flatten_sequential=True).state_dict())


@pytest.mark.parametrize('name', ['convnext_s4nd_atto', 'convnext_s4nd_3d_atto'])
@pytest.mark.parametrize('depths', [(1, 1, 1), (1, 1, 1, 1, 1)])
def test_features_only_gives_every_stage_of_any_depth(name, depths):
    """features_only's default is every stage, as timm's ConvNeXt's four: a model of three stages failed (index 3
    out of range) and one of five lost its last."""
    dims = (8, 16, 32, 64, 128)[:len(depths)]
    features = timm.create_model(name, img_size=64, depths=depths, dims=dims, features_only=True).eval()
    x = torch.randn(1, 3, *((4,) if '3d' in name else ()), 64, 64)
    with torch.no_grad():
        assert [o.shape[1] for o in features(x)] == features.feature_info.channels() == list(dims)


@pytest.mark.parametrize('name, shape, message', [
    ('convnext_s4nd_atto', (2, 3, 16, 16), 'at least 32'),
    ('convnext_s4nd_atto', (2, 1, 64, 64), 'channels'),
    ('convnext_s4nd_3d_atto', (2, 3, 64, 64), r'\(B, C, T, H, W\)'),
])
def test_features_only_checks_its_input_as_the_model(name, shape, message):
    features = timm.create_model(name, img_size=64, features_only=True)
    model = timm.create_model(name, img_size=64)
    for module in (features, model):
        with pytest.raises(ValueError, match=message):
            module(torch.randn(shape))


@pytest.mark.parametrize('feature_cls', [None, 'getter', 'fx'])
def test_a_cut_backbone_takes_inputs_down_to_its_own_reduction(feature_cls):
    """Stages 0 and 1 reduce by 8: a 16 px input runs (as in timm's convnext, with every wrapper), a 4 px one is
    refused."""
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
    features = timm.create_model('convnext_s4nd_atto', img_size=64, features_only=True, out_indices=(0, 1), **kwargs)
    assert [tuple(f.shape) for f in features(torch.randn(2, 3, 16, 16))] == [(2, 40, 4, 4), (2, 80, 2, 2)]
    with pytest.raises(ValueError, match='at least 8'):
        features(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize('name, frames', [('convnext_s4nd_atto', ()), ('convnext_s4nd_3d_atto', (2,))])
def test_a_pruned_or_early_stopped_model_takes_inputs_down_to_the_kept_reduction(name, frames):
    """Run through stage 1 (reduction 8), a model takes 16 px inputs, as timm's convnext does, pruned
    (`prune_intermediate_layers`) or stopping early (`forward_intermediates(stop_early=True)`); the pruned model's
    pool_size is its final feature map's, also after `set_input_size`."""
    x = torch.randn(1, 3, *frames, 16, 16)
    model = timm.create_model(name, img_size=64).eval()
    with torch.no_grad():
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert [tuple(t.shape[-2:]) for t in early] == [(4, 4), (2, 2)]
        with pytest.raises(ValueError, match='at least 32'):  # (all stages: the full model's total stride)
            model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        model.prune_intermediate_layers([0, 1])
        assert model.min_input_size == 8 and model.forward_features(x).shape[-2:] == (2, 2)
        with pytest.raises(ValueError, match='at least 8'):
            model(torch.randn(1, 3, *frames, 4, 4))
        assert model.pretrained_cfg['pool_size'][-2:] == (8, 8)
        model.set_input_size(128)
        assert model.pretrained_cfg['pool_size'][-2:] == (16, 16)
        assert model.forward_features(torch.randn(1, 3, *frames, 128, 128)).shape[-2:] == (16, 16)


def test_meta_device_then_reset_parameters_gives_a_finite_model():
    """The meta-device recipe (build on meta, `to_empty`, `reset_parameters` of every module that has one) leaves
    nothing uninitialized: S4ND's D and the blocks' layer scale included."""
    with torch.device('meta'):
        model = timm.create_model('convnext_s4nd_atto', img_size=32)
    model.to_empty(device='cpu')
    with torch.no_grad():
        for p in model.parameters():  # (what to_empty hands out is arbitrary memory)
            p.fill_(float('nan'))
    for module in model.modules():
        if hasattr(module, 'reset_parameters'):
            module.reset_parameters()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.cat([m.D for m in model.modules() if isinstance(m, S4ND)]).std() > 0.5  # D ~ N(0, 1)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


@pytest.mark.parametrize('feature_cls', [None, 'getter'])
def test_features_only_training_step_stacks_the_kernel_generation(monkeypatch, feature_cls):
    """A backbone, timm's list wrapper (the default) or through forward_intermediates (the 'getter' wrapper), trains
    with the stacked generation too, also pruned, and gives the model's intermediates."""
    calls = count_generation_calls(monkeypatch)
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
    x = torch.randn(2, 3, 64, 64)
    for out_indices in ((0, 1, 2, 3), (0, 1)):
        torch.manual_seed(0)
        features = timm.create_model('convnext_s4nd_atto', img_size=64, features_only=True, out_indices=out_indices,
                                     **kwargs)
        calls.clear()
        outs = features(x)
        sum(out.square().sum() for out in outs).backward()
        assert len(calls) == 1  # (every kernel length in one: 64 over each stride the S4ND layers run at)
        assert all(p.grad is not None for n, p in features.named_parameters() if '.kernels.' in n)
        assert all(m._prepared is None for m in features.modules() if isinstance(m, S4ND))
        torch.manual_seed(0)
        model = timm.create_model('convnext_s4nd_atto', img_size=64)
        with torch.no_grad():
            expected = model.forward_intermediates(x, indices=out_indices, intermediates_only=True)
        for out, ref in zip(outs, expected, strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_fsdp_sharded_model_generates_kernels_layer_by_layer():
    """Under FSDP (here FSDP2 on one gloo process) other units' parameters are not materialized, so the
    model-wide kernel generation steps aside and every layer generates its own; training still runs."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from s4nd_vision.layers import kernels_can_be_prepared
    model = timm.create_model('convnext_s4nd_atto', img_size=32)
    assert kernels_can_be_prepared(model)
    dist.init_process_group('gloo', rank=0, world_size=1, store=dist.HashStore())
    try:
        for stage in model.stages:
            for block in stage.blocks:
                fully_shard(block)
        fully_shard(model)
        assert not kernels_can_be_prepared(model)
        out = model(torch.randn(2, 3, 32, 32))
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('kernel', ['s4d', 'sgconv'])
def test_fsdp2_full_state_dicts_load_without_the_layers_records(kernel):
    """torch's `set_model_state_dict` (Accelerate's load of FSDP2 full checkpoints) lists parameters and buffers
    only, and refused the S4ND layers' records (l_ref, band-limit, SGConv decay); the trainer's FSDP checkpoints
    leave them out (`state_dict_without_records`), and a model rebuilt from the config has them."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from s4nd_vision.layers import state_dict_without_records
    torch.manual_seed(0)
    source = timm.create_model('convnext_s4nd_atto', img_size=32, num_classes=4, kernel=kernel)
    model = timm.create_model('convnext_s4nd_atto', img_size=32, num_classes=4, kernel=kernel)
    records = {k: v for k, v in source.state_dict().items() if k.endswith(('.l_ref', '.bandlimit', '.decay'))}
    assert records
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    dist.init_process_group('gloo', rank=0, world_size=1, store=dist.HashStore())
    try:
        for stage in model.stages:
            fully_shard(stage)
        fully_shard(model)
        with pytest.raises(KeyError):  # (torch's refusal of an entry that is neither a parameter nor a buffer)
            set_model_state_dict(model, source.state_dict(), options=options)
        with state_dict_without_records(), warnings.catch_warnings():
            warnings.simplefilter('error')  # (no warning of the records' absence)
            full = source.state_dict()
            assert not set(records) & set(full)
            set_model_state_dict(model, full, options=options)
            assert set(get_model_state_dict(model, options=options)) == set(full)
        loaded = get_model_state_dict(model, options=options)
        for k, v in source.state_dict().items():
            torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_the_trainers_fsdp_checkpoints_leave_the_records_out():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from s4nd_vision.train.checkpoint import _fsdp_records
    model = timm.create_model('convnext_s4nd_atto', img_size=32)
    for kind, kept in ((DistributedType.FSDP, False), (DistributedType.MULTI_GPU, True), (DistributedType.NO, True)):
        with _fsdp_records(SimpleNamespace(distributed_type=kind)):
            assert any(k.endswith('.l_ref') for k in model.state_dict()) == kept, kind
    assert any(k.endswith('.l_ref') for k in model.state_dict())


@pytest.mark.parametrize('feature_cls', [None, 'list', 'dict', 'hook', 'getter'])
def test_feature_maps_handed_out_take_view(feature_cls, monkeypatch):
    """The features, intermediates and forward_features' output (ConvNeXt-S4ND's and the isotropic model's) support
    `.view(B, C, -1)` (channels-last, as the blocks hand on) also where a CPU forward keeps S4ND's channel-major
    layout between the layers (a training step; inference where the stem's sides exceed
    `dispatch.depthwise_max_side()`, 8 here), with the same values."""
    from s4nd_vision.layers import dispatch
    args = dict(img_size=64, features_only=True, out_indices=(0, 2))
    if feature_cls is not None:
        args['feature_cls'] = feature_cls
    torch.manual_seed(0)
    features = timm.create_model('convnext_s4nd_atto', **args)
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=64)  # (the same weights)
    x = torch.randn(2, 3, 64, 64)
    for side in (64, 8):
        monkeypatch.setattr(dispatch, 'depthwise_max_side', lambda: side)
        for train in (False, True):
            features.train(train), model.train(train)
            with torch.set_grad_enabled(train):
                out = features(x)
                maps = (list(out.values()) if isinstance(out, dict) else out) + model.forward_intermediates(
                    x, indices=(0, 2), intermediates_only=True) + [model.forward_features(x)]
            views = [t.view(2, t.shape[1], -1) for t in maps]
            torch.testing.assert_close(views[:2], views[2:4])  # (the features are the intermediates)
            if side == 64 and not train:
                expected = views
            torch.testing.assert_close(views, expected, rtol=1e-4, atol=1e-5)
    if feature_cls is None:  # (the isotropic model's blocks keep that layout too, at sides above 8 here)
        iso = timm.create_model('s4nd_iso_tiny', img_size=16).eval()
        with torch.no_grad():
            iso.forward_features(torch.randn(2, 3, 12, 12)).view(2, iso.num_features, -1)


@pytest.mark.parametrize('depthwise_max_side', [64, 8])
def test_inference_paths_agree_in_a_model(depthwise_max_side, monkeypatch):
    """In inference on the CPU, where the stem's output sides (16 here) are within `dispatch.depthwise_max_side()`,
    the S4ND layers of the blocks and the downsampling get channels-last input and run the 'depthwise' path; else
    the network runs in S4ND's channel-major layout from the stem to the head, as a training step does. The logits
    equal those of the Toeplitz path on channels-last input (`force_path('fast')`, the stem handing on
    channels-last)."""
    from s4nd_vision.layers import dispatch, ops
    from s4nd_vision.layers.ops import channel_major_memory
    from s4nd_vision.models import convnext_base
    monkeypatch.setattr(dispatch, 'depthwise_max_side', lambda: depthwise_max_side)
    depthwise = depthwise_max_side >= 16
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=64, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    layouts = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: layouts.append(channel_major_memory(o) is not None))
    with torch.no_grad():
        logits = model(x)
        assert layouts == [not depthwise] * len(model.stages)
        used = [type(latest_operators(m)) for m in model.modules() if isinstance(m, S4ND) and m._kernel_cache]
        assert (ops.DepthwiseConv in used) == depthwise and list in used  # (the stem, channel-major: Toeplitz)
        assert all(isinstance(latest_operators(stage.downsample[1]), ops.DepthwiseConv) == depthwise
                   for stage in model.stages[1:])
        monkeypatch.setattr(convnext_base, 'stem_keeps_channel_major', lambda t: False)
        with dispatch.force_path('fast'):
            torch.testing.assert_close(model(x), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name, kwargs, shape', [
    ('convnext_s4nd_atto', {}, (2, 3, 64, 96)),
    ('convnext_s4nd_atto', dict(stem_type='patch', downsample_type='conv'), (2, 3, 64, 96)),
    ('convnext_s4nd_3d_atto', dict(num_frames=4), (1, 3, 4, 64, 64)),
])
def test_output_stride_keeps_the_weights_and_dilates_the_last_stages(name, kwargs, shape, monkeypatch):
    """timm's `output_stride` (dense prediction): the same weights load, the stages before the dilated ones are
    unchanged, the dilated ones keep the resolution (feature_info says so) with their S4ND kernels sampled
    twice (four times) as densely, and the stacked training step equals the layer-by-layer one (each layer
    gets kernels for the grid it really runs on)."""
    torch.manual_seed(0)
    plain = timm.create_model(name, img_size=64, **kwargs).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        plain_feats = plain.forward_intermediates(x, intermediates_only=True)
    for output_stride, reductions in ((16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])):
        model = timm.create_model(name, img_size=64, output_stride=output_stride, **kwargs).eval()
        model.load_state_dict(plain.state_dict())  # (strict: the same parameters and reference grids)
        assert [f['reduction'] for f in model.feature_info] == reductions
        with torch.no_grad():
            feats = model.forward_intermediates(x, intermediates_only=True)
        for feat, reduction in zip(feats, reductions):
            assert tuple(feat.shape[-2:]) == tuple(s // reduction for s in shape[-2:])
        undilated = reductions.index(output_stride) + 1  # the stages up to the first at output_stride
        for a, b in zip(feats[:undilated], plain_feats[:undilated]):
            torch.testing.assert_close(a, b)
        step_with_and_without_stacking(monkeypatch, model.train(), x, [])
    features = timm.create_model(name, img_size=64, output_stride=16, features_only=True, **kwargs)
    assert features.feature_info.reduction() == [4, 8, 16, 16]
    if kwargs.get('downsample_type') == 'conv':  # dilated as timm's ConvNeXt: the taps combine the same pixels
        ref = timm.create_model('convnext_atto', output_stride=8).eval()
        model = timm.create_model(name, img_size=64, output_stride=8, **kwargs).eval()
        for i in (1, 2, 3):
            ds, ref_ds = model.stages[i].downsample, ref.stages[i].downsample
            ds.load_state_dict(ref_ds.state_dict())
            x = torch.randn(1, ds[0].normalized_shape[0], 9, 12)
            with torch.no_grad():
                torch.testing.assert_close(ds(x), ref_ds(x))
    with pytest.raises(ValueError, match='output_stride must be 8, 16 or 32'):
        timm.create_model(name, output_stride=4, **kwargs)


@pytest.mark.parametrize('output_stride', [16, 8])
def test_output_stride_accepts_inputs_down_to_its_total_stride(output_stride):
    """A dilated model runs inputs down to its total stride as run, as its features_only wrapper does; its
    img_size (the reference grids) still needs the total stride without dilation."""
    model = timm.create_model('convnext_s4nd_atto', img_size=64, output_stride=output_stride).eval()
    features = timm.create_model('convnext_s4nd_atto', img_size=64, output_stride=output_stride, features_only=True)
    assert model.min_input_size == output_stride
    x = torch.randn(1, 3, output_stride, output_stride)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)
        assert [f.shape[-1] for f in features(x)] == [output_stride // r for r in features.feature_info.reduction()]
    with pytest.raises(ValueError, match=f'at least {output_stride} '):
        model(torch.randn(1, 3, output_stride // 2, output_stride))
    with pytest.raises(ValueError, match='img_size must be at least 32 on each side'):
        timm.create_model('convnext_s4nd_atto', img_size=16, output_stride=output_stride)


def _fresh_output(model, x: torch.Tensor) -> torch.Tensor:
    """What `model` computes for x from its current weights alone: a deep copy carries no inference cache."""
    with torch.no_grad():
        return copy.deepcopy(model)(x)


def test_copies_wrappers_and_threads_get_their_own_weights_outputs_in_inference():
    """The layers' inference caches (operators per input size) never serve a model other weights' outputs: a deep
    copy made after inference whose weights change (an EMA, updated in place by timm's ModelEmaV3), the original
    after its copy changed, `torch.func.functional_call` with another model's weights, and threads of an inference
    server calling one model at more input sizes than a layer caches."""
    from concurrent.futures import ThreadPoolExecutor

    from timm.utils import ModelEmaV3
    from torch.func import functional_call

    from s4nd_vision.layers import state_dict_without_records
    torch.manual_seed(0)
    tiny = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5)
    model, other = (timm.create_model('convnext_s4nd_atto', **tiny).eval() for _ in range(2))
    inputs = [torch.randn(b, 3, h, w) for b, h, w in ((2, 32, 32), (1, 48, 32), (1, 32, 64), (2, 64, 64),
                                                      (1, 40, 40), (1, 64, 48))]
    inputs.append(inputs[0].to(memory_format=torch.channels_last))  # (the depthwise path, where it applies)
    with torch.no_grad():
        own = [model(x) for x in inputs]  # (caches filled)
        ema = ModelEmaV3(model, decay=0.5)
        for x in inputs:
            ema.module(x)  # (the copy's own caches, of the weights before the update)
        for p in model.parameters():
            p.mul_(1.05)
        ema.update(model)
        for x in inputs:
            torch.testing.assert_close(ema.module(x), _fresh_output(ema.module, x), rtol=0, atol=0)
            assert not torch.allclose(ema.module(x), _fresh_output(model, x))  # (the update reached the copy)
        for p in ema.module.parameters():
            p.mul_(0.5)
        for x in inputs:
            torch.testing.assert_close(model(x), _fresh_output(model, x), rtol=0, atol=0)
        with state_dict_without_records():
            weights = other.state_dict()
        for x in inputs:
            torch.testing.assert_close(functional_call(model, weights, (x,)), other(x), rtol=0, atol=0)
    expected = [_fresh_output(model, x) for x in inputs]
    assert not torch.allclose(expected[0], own[0])  # (sanity: the weights changed since the caches were filled)

    def infer(i):
        with torch.no_grad():
            return i % len(inputs), model(inputs[i % len(inputs)])
    with ThreadPoolExecutor(4) as pool:
        for i, y in pool.map(infer, range(4 * len(inputs))):
            torch.testing.assert_close(y, expected[i], rtol=0, atol=0)


@pytest.mark.parametrize('kernel', ['s4d', 'sgconv'])
def test_replicas_of_data_parallel_compute_what_the_model_computes(kernel, monkeypatch):
    """nn.DataParallel runs a replica per GPU (`torch.nn.parallel.replicate`, every forward) whose parameters are
    plain attributes, which `parameters()` does not list: every S4ND layer of a replica raised StopIteration looking
    for its kernels' device (inference and training alike). Replicated here by torch's own code on the CPU, its
    broadcast to the GPUs replaced by copies that keep the autograd graph to the parameters, as the broadcast does."""
    import importlib
    replicate = importlib.import_module('torch.nn.parallel.replicate')
    monkeypatch.setattr(replicate, '_get_device_index', lambda device, optional=False: device)
    monkeypatch.setattr(replicate, '_broadcast_coalesced_reshape', lambda tensors, devices, detach=False: [
        [t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices] if tensors else [])
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5,
                              kernel=kernel)
    x = torch.randn(2, 3, 32, 32)
    model.train()(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    replicas = replicate.replicate(model, [0, 1])
    assert not list(replicas[1].parameters())  # (as on GPUs: the replica lists none)
    replicas[1](x).square().sum().backward()  # (its gradients reach the model's parameters)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    model.eval()
    with torch.no_grad():
        expected = model(x)  # (the model's own inference caches, which the replicas copy)
        for replica in replicate.replicate(model, [0, 1]):
            torch.testing.assert_close(replica(x), expected)


@pytest.mark.parametrize('chunk_bytes', [1, None])
def test_stem_projects_batch_chunks_of_the_input_without_copying_them(monkeypatch, chunk_bytes):
    """On the CPU the stem's fused projection reads a contiguous image as a permuted view: a one-sample batch chunk
    (`ops.projection_chunks`; at 224 px every chunk) goes to its GEMM without a copy (a chunk of the channel-major
    copy it read before needed a second one), with the values and gradients of the channel-major copy (taken for
    channels-last input), in a training step and in inference; larger chunks too."""
    from torch.profiler import ProfilerActivity, profile

    import s4nd_vision.layers.ops as ops
    if chunk_bytes is not None:
        monkeypatch.setattr(ops, 'PROJECTION_CHUNK_BYTES', chunk_bytes)  # one sample per chunk
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), img_size=32)
    stem = model.stem
    x = torch.randn(3, 3, 32, 32)
    for grad in (True, False):
        outs, grads = [], []
        for x_in in (x, x.contiguous(memory_format=torch.channels_last)):
            with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
                y = stem(x_in)
            outs.append(y)
            if grad:
                grads.append(torch.autograd.grad(y.square().sum(), list(stem.parameters())))
            if x_in is x:
                chunk_copies = [e for e in p.events() if e.name == 'aten::copy_' and e.input_shapes
                                and e.input_shapes[0] == [3, 32, 1, 32]]
                assert not chunk_copies
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
