"""timm compliance: the checks timm runs on its own models (its tests/test_models.py), on ours.

Every registered `*s4nd*` model is created on the meta device and run once at a small input (sides capped at
SMALL_SIDE; sequence models, input (C, L), get the length capped);
the small variants in COMPLIANCE_MODELS go through the whole contract (backward, default cfg,
features, intermediates, gradient checkpointing, bf16, torch.compile).
"""
import collections
import copy

import numpy as np
import pytest
import timm
import timm.optim
import torch
from stacking import assert_same_gradient

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.layers import sgconv_kernel, ssm_kernel

# (model name, constructor kwargs): the small variants that get every check. Add new families here.
COMPLIANCE_MODELS = [
    ('convnext_s4nd_atto', {}),
    ('convnext_s4nd_atto', dict(stem_type='patch', downsample_type='conv')),
    ('vit_s4nd_atto_patch16_224', {}),
    ('vit_s4nd_atto_patch16_224', dict(token_layout='1d')),
    ('convnext_s4nd_3d_atto', {}),
    ('s4nd_iso_tiny', {}),
    ('convnext_sgconv_atto', {}),
    # (the S4 kernel's entry: one block a stage, every stage, block, stem and downsampling kind kept; the kernel
    # type is what it adds to the entries above, and its generation, per layer, is what its checks cost)
    ('convnext_s4nd_atto', dict(kernel='s4', bandlimit=0, depths=(1, 1, 1, 1))),
    ('s4nd_seq_atto', {}),
    ('s4nd_seq_atto', dict(kernel='s4', bidirectional=True, global_pool='last')),
]
ALL_S4ND_MODELS = timm.list_models('*s4nd*') + timm.list_models('*sgconv*')
SMALL_SIDE = 64  # spatial sides used for the cheap runs (every model must accept it)


def _ids(entry) -> str:
    name, kwargs = entry
    return name + ''.join(f'-{k}={v}' for k, v in kwargs.items())


def _small_input(model: torch.nn.Module, batch_size: int = 1) -> torch.Tensor:
    """Input shaped like the model's default cfg with spatial sides capped at SMALL_SIDE (time kept)."""
    chans, *sizes = model.pretrained_cfg['input_size']
    spatial = [min(s, SMALL_SIDE) for s in sizes[-2:]]
    torch.manual_seed(0)
    return torch.randn(batch_size, chans, *sizes[:-2], *spatial)


def _create(name: str, kwargs: dict, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **dict(kwargs, **extra))


def test_every_family_is_covered():
    assert ALL_S4ND_MODELS, 'no *s4nd* model registered'
    families = {n.split('_')[0] + '_' + n.split('_')[1] for n in ALL_S4ND_MODELS}
    covered = {n.split('_')[0] + '_' + n.split('_')[1] for n, _ in COMPLIANCE_MODELS}
    assert families <= covered, f'families without a compliance entry: {families - covered}'


@pytest.mark.parametrize('name', ALL_S4ND_MODELS)
def test_create_on_meta_device_and_cfg_names(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert all(p.device.type == 'meta' for p in model.parameters())
    cfg = model.pretrained_cfg
    state = model.state_dict()
    for key in ('input_size', 'num_classes', 'first_conv', 'classifier', 'mean', 'std'):
        assert key in cfg, f'{name}: default cfg misses {key!r}'
    classifiers = cfg['classifier'] if isinstance(cfg['classifier'], (tuple, list)) else (cfg['classifier'],)
    first_convs = cfg['first_conv'] if isinstance(cfg['first_conv'], (tuple, list)) else (cfg['first_conv'],)
    for layer in (*classifiers, *first_convs):
        assert layer + '.weight' in state, f'{name}: {layer}.weight not in the state dict'
    with pytest.raises(TypeError):
        timm.create_model(name, not_an_argument=1)


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_meta_device_forward_and_backward_give_the_shapes_of_a_real_run(entry):
    """Shape inference on the meta device (`with torch.device('meta')`, then a meta input): forward in training and
    in inference, and backward, give the real run's shapes (autocast's state is asked for the input's device, which
    `torch.is_autocast_enabled('meta')` refuses); a model that ran on meta, moved with `to_empty` and loaded, computes
    as the original (no operators cached from meta tensors)."""
    model = _create(*entry, num_classes=5).eval()
    x = _small_input(model, batch_size=2)
    with torch.no_grad():
        want = model(x)
    with torch.device('meta'):
        meta = _create(*entry, num_classes=5)
    out = meta(x.to('meta'))
    assert out.device.type == 'meta' and out.shape == want.shape
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in meta.parameters())
    meta.eval()
    with torch.no_grad():  # (twice: a second inference call looks for operators cached by the first)
        assert meta(x.to('meta')).shape == meta(x.to('meta')).shape == want.shape
    meta.to_empty(device='cpu')
    meta.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(meta(x), want, rtol=0, atol=0)


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_fake_tensor_forward_gives_the_shapes_and_leaves_real_runs_alone(entry, monkeypatch):
    """Memory planning runs a real model on a fake input (`FakeTensorMode`): in training and in inference it gives the
    real run's shapes (band-limiting's kept modes are not read from fake values), and the real runs after it give real
    tensors of the same values: no fake kernel operators cached in the layers (the next real call compared its
    parameters with their data pointers: a crash) or in SGConv's matrices (every later call returned fake tensors)."""
    from torch._subclasses import FakeTensorMode
    for store in ('_cache', '_large'):  # (SGConv's matrices for this input not made yet: the fake run makes them)
        monkeypatch.setattr(sgconv_kernel, store, collections.OrderedDict())
    model = _create(*entry, num_classes=5)
    reference = copy.deepcopy(model).eval()
    x = _small_input(model, batch_size=2)
    shapes = []
    for train in (True, False):  # (first: no real call has cached anything)
        model.train(train)
        with torch.set_grad_enabled(train), FakeTensorMode(allow_non_fake_inputs=True):
            shapes.append(model(torch.empty(x.shape)).shape)
    with torch.no_grad():
        got = model(x)
        want = reference(x)
    assert shapes == [want.shape] * 2
    assert type(got) is torch.Tensor and type(want) is torch.Tensor
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize('name', ALL_S4ND_MODELS)
def test_forward_backward_every_model(name):
    model = _create(name, {})
    x = _small_input(model)
    out = model(x)
    assert out.shape == (1, model.num_classes)
    assert torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters without a gradient: {missing}'


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_backward_reaches_every_parameter(entry):
    model = _create(*entry, num_classes=5)
    x = _small_input(model, batch_size=2)
    out = model(x)
    assert out.shape == (2, 5)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f'parameters without a (finite) gradient: {missing}'
    # gradients are not all zero (layer scale starts tiny, but nothing may be disconnected)
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f'parameters with an all-zero gradient: {zero}'


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_default_cfg_contract(entry):
    model = _create(*entry).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features
        if 'pool_size' in cfg:
            assert tuple(features.shape[2:]) == tuple(cfg['pool_size'])
        assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
        assert model(x).shape == (1, cfg['num_classes'])

        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (1, model.num_features)
        assert isinstance(model.get_classifier(), torch.nn.Identity)
        model.reset_classifier(0, '')
        assert model(x).shape == features.shape
        model.reset_classifier(11, 'avg')
        assert model(x).shape == (1, 11)

    cases = ((dict(num_classes=0), (1, model.num_features)), (dict(num_classes=0, global_pool=''), None))
    for extra, expected in cases:
        headless = _create(*entry, **extra).eval()
        with torch.no_grad():
            out = headless(x)
        assert out.shape == (expected or features.shape)


@pytest.mark.parametrize('name', ['convnext_s4nd_atto', 'vit_s4nd_atto_patch16_224', 's4nd_seq_atto'])
def test_reset_classifier_refuses_a_class_count_that_is_not_a_non_negative_integer(name):
    """As at construction: timm's heads took -1 for 0 (features given for logits, num_classes=-1) and failed on
    None or '10' in a comparison, after the model had recorded it; the classifier stays as it was."""
    model = _create(name, {}, num_classes=3)
    for bad in (-1, None, '10', 2.5):
        with pytest.raises(ValueError, match='num_classes must be a non-negative integer'):
            model.reset_classifier(bad)
    assert model.num_classes == 3 and model.get_classifier().out_features == 3
    if name.startswith('convnext'):  # (the norm-MLP head takes no widening pooling: the count stays too)
        with pytest.raises(ValueError, match="global_pool='catavgmax' doubles the pooled width"):
            model.reset_classifier(7, 'catavgmax')
        assert model.num_classes == 3 and model.get_classifier().out_features == 3
    model.reset_classifier(5)  # a valid count: the model states it as timm's models do (train scripts read it)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)


@pytest.mark.parametrize('name,widening', [('convnext_s4nd_atto', False), ('s4nd_iso_tiny', False),
                                           ('vit_s4nd_atto_patch16_224', True)])
def test_a_pooling_that_the_head_does_not_take_is_refused_naming_global_pool(name, widening):
    """timm's heads only assert on a pooling they do not take ('Invalid pool type: foo'; under `python -O` nothing,
    and the model failed at its first forward): refused at construction and in reset_classifier, naming the argument
    and the poolings the head takes, the head left as it was; timm's 'fast' variants and case are taken as timm
    takes them."""
    refused = ['foo', 'avgg', 3] + ([] if widening else ['catavgmax', 'fastcatavgmax'])
    for bad in refused:
        with pytest.raises(ValueError, match=r"global_pool=.* use 'avg', 'max', 'avgmax'"):
            _create(name, dict(depth=1) if 'convnext' not in name else dict(depths=(1, 1, 1, 1)), global_pool=bad)
    model = _create(name, {}, num_classes=3).eval()
    for bad in refused:
        with pytest.raises(ValueError, match=r"global_pool="):
            model.reset_classifier(7, bad)
        assert model.num_classes == 3 and model.get_classifier().out_features == 3
    x = torch.randn(1, 3, 32, 32)
    for pool in ('fast', 'MAX', 'fastavgmax') + (('catavgmax',) if widening else ()):
        model.reset_classifier(4, pool)
        with torch.no_grad():
            assert model(x).shape == (1, 4)


@pytest.mark.parametrize('entry', [e for e in COMPLIANCE_MODELS if not e[0].startswith('s4nd_seq')], ids=_ids)
def test_an_overlay_input_size_is_the_native_size(entry):
    """As timm's fixed-size models (its ViTs): without `img_size`, the input size a `pretrained_cfg_overlay`
    states is the size the model is built for, and the data config keeps it; an `img_size` argument wins."""
    from timm.data import resolve_model_data_config
    name, kwargs = entry
    with torch.device('meta'):
        model = timm.create_model(name, pretrained_cfg_overlay=dict(input_size=(3, 96, 80)), **kwargs)
        explicit = timm.create_model(name, img_size=64, pretrained_cfg_overlay=dict(input_size=(3, 96, 80)),
                                     **kwargs)
    assert tuple(model.img_size) == (96, 80) and resolve_model_data_config(model)['input_size'][-2:] == (96, 80)
    assert tuple(explicit.img_size) == (64, 64)
    assert resolve_model_data_config(explicit)['input_size'][-2:] == (64, 64)


def test_vit_features_only_gives_timms_default_blocks():
    """timm's ViT gives the last three blocks by default: so does ours."""
    ours = timm.create_model('vit_s4nd_atto_patch16_224', features_only=True, img_size=64)
    depth = len(timm.create_model('vit_s4nd_atto_patch16_224', img_size=64).blocks)
    assert ours.feature_info.out_indices == tuple(range(depth - 3, depth))
    with torch.no_grad():
        assert len(ours(torch.randn(1, 3, 64, 64))) == 3


def test_vit_head_hidden_size_follows_a_pooling_that_widens():
    """'catavgmax' concatenates two poolings: head_hidden_size is the pre-logits width as built, as after a
    reset_classifier."""
    model = timm.create_model('vit_s4nd_atto_patch16_224', img_size=32, num_classes=4, global_pool='catavgmax').eval()
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(torch.randn(1, 3, 32, 32)), pre_logits=True)
    assert pre_logits.shape == (1, model.head_hidden_size) == (1, 2 * model.num_features)
    model.reset_classifier(4)
    assert model.head_hidden_size == 2 * model.num_features


@pytest.mark.parametrize('name, kwargs, x', [
    ('vit_s4nd_atto_patch16_224', dict(img_size=32), torch.randn(1, 3, 32, 32)),
    ('s4nd_iso_tiny', dict(img_size=16), torch.randn(1, 3, 16, 16)),
    ('s4nd_seq_atto', dict(seq_len=32), torch.randn(1, 1, 32))])
def test_features_only_of_a_shallow_isotropic_model_gives_all_its_blocks(name, kwargs, x):
    """The default of the last 3 (ViT) or 4 blocks, capped at the depth: a 2-block model gives both (timm's last-n
    count refused it as out of range)."""
    model = timm.create_model(name, features_only=True, depth=2, **kwargs)
    assert model.feature_info.module_name() == ['blocks.0', 'blocks.1']
    with torch.no_grad():
        assert len(model(x)) == 2


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('name', ALL_S4ND_MODELS + ['conv_iso_tiny', 'convnext_3d_atto'])
def test_torchscript_is_refused_with_the_alternatives(name):
    """timm's `--torchscript` scripts a model: ours say at once what to use instead (not an error deep inside)."""
    with torch.device('meta'):
        model = timm.create_model(name)
    with pytest.raises(RuntimeError, match=r'torch.jit.script does not support .*: use torch.compile, torch.export'):
        torch.jit.script(model)


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_bf16_weights(entry):
    model = _create(*entry).eval().to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        out = model(_small_input(model).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_empty_batch(entry):
    """An empty batch (e.g. a rank's share of an uneven last batch) gives empty logits, as timm's models do, in
    inference and in training, and every parameter a (zero) gradient, as a convolution does (DDP waits for all of
    them), the fused projection of an S4ND stem too."""
    model = _create(*entry).eval()
    x = _small_input(model)[:0]
    with torch.no_grad():
        assert model(x).shape == (0, model.num_classes)
    out = model.train()(x.requires_grad_())
    assert out.shape == (0, model.num_classes)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert [n for n, p in model.named_parameters() if p.grad is None or p.grad.any()] == []


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_features_only(entry):
    model = _create(*entry, features_only=True).eval()
    info = model.feature_info
    assert len(info.channels()) >= 3  # (ViTs: timm's last three blocks)
    x = _small_input(model, batch_size=2)
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == len(info.channels())
    getter = _create(*entry, features_only=True, feature_cls='getter').eval()  # (it asks for output_fmt='NCHW')
    plain = _create(*entry).eval()  # (same seed: same weights)
    with torch.no_grad():
        expected = plain.forward_intermediates(x, indices=model.feature_info.out_indices, intermediates_only=True)
        # the getter and forward_intermediates run the same code: equal; timm's features_only model runs the stem's
        # modules one by one (the projection, then S4ND) where they run its fused forward: the same values up to
        # float32 rounding, which grows over the stages
        for a, b, c in zip(getter(x), outs, expected, strict=True):
            assert torch.equal(a, c)
            torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-4)
    model.set_grad_checkpointing(True)  # (every wrapper has it; detection code calls it)
    sides = 1 if x.ndim == 3 else 2  # sequences (B, C, L): L; images and videos: H, W
    for out, chs, reduction in zip(outs, info.channels(), info.reduction()):
        assert out.shape[:2] == (2, chs)
        assert tuple(out.shape[-sides:]) == tuple(s // reduction for s in x.shape[-sides:])

    subset = _create(*entry, features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = subset(x)
    every = _create(*entry).feature_info  # (the model's: features_only gives a ViT's last three by default)
    assert [o.shape[1] for o in outs] == subset.feature_info.channels() == [every[1]['num_chs'], every[3]['num_chs']]


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_fx_feature_extraction(entry):
    """timm's FX feature graphs (`feature_cls='fx'`, what torchvision-style detection necks use) trace every
    family: the same block outputs as the hooks (raw, as timm's), gradients to every S4ND layer, and the input
    checks still run in the graph."""
    graph = _create(*entry, features_only=True, feature_cls='fx').eval()
    hooks = _create(*entry, features_only=True, feature_cls='hook').eval()
    x = _small_input(graph, batch_size=2)
    with torch.no_grad():
        for a, b in zip(graph(x), hooks(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    sum(out.square().sum() for out in graph.train()(x)).backward()
    s4nd = [p for n, p in graph.named_parameters() if '.kernels.' in n]
    assert s4nd and all(p.grad is not None for p in s4nd)
    with pytest.raises(ValueError, match='floating point'):
        graph(x.to(torch.uint8))


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_torchvision_feature_extractor(entry):
    """torchvision's `create_feature_extractor` traces with its own tracer: given timm's leaves (as the README says)
    it gives the feature modules' outputs, as timm's hooks do; without them a clear error says how to trace."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _create(*entry).eval()
    nodes = [info['module'] for info in model.feature_info]
    with pytest.raises(TypeError, match='leaf_modules=timm.layers.get_notrace_modules'):
        create_feature_extractor(model, return_nodes=nodes)
    leaves = dict(leaf_modules=timm.layers.get_notrace_modules(),
                  autowrap_functions=timm.layers.get_notrace_functions())
    extractor = create_feature_extractor(model, return_nodes=nodes, tracer_kwargs=leaves)
    hooks = _create(*entry, features_only=True, feature_cls='hook', out_indices=range(len(nodes))).eval()
    x = _small_input(model, batch_size=2)
    with torch.no_grad():
        for a, b in zip(extractor(x).values(), hooks(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_forward_intermediates_match_forward_features(entry):
    model = _create(*entry).eval()
    x = _small_input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert [t.shape[1] for t in intermediates] == [f['num_chs'] for f in model.feature_info]
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(only) == 2
        for a, b in zip(only, intermediates[-2:]):
            torch.testing.assert_close(a, b)
        # pruning for the first two stages leaves a model whose intermediates are unchanged
        kept = model.prune_intermediate_layers(indices=[0, 1], prune_head=True)
        assert kept == [0, 1]
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        for a, b in zip(pruned, intermediates[:2]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_gradient_checkpointing_same_output_and_grads(entry):
    model = _create(*entry, num_classes=3)
    x = _small_input(model, batch_size=2)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for n, p in model.named_parameters():  # (checkpointed stages generate their layers' kernels themselves)
        assert_same_gradient(p.grad, grads[n], n)
    # forward_intermediates (what feature extractors train through) checkpoints too: it keeps far less for backward
    saved = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            model.forward_intermediates(x)
        saved.append(sum(sizes))
    assert saved[1] < saved[0] / 2, saved


@pytest.mark.parametrize('feature_cls', ['getter', None])
@pytest.mark.parametrize('name', ['vit_s4nd_atto_patch16_224', 's4nd_iso_tiny', 's4nd_seq_atto', 'convnext_s4nd_atto'])
def test_features_only_gradient_checkpointing(name, feature_cls):
    """Every `features_only` backbone takes `set_grad_checkpointing` (timm's getter wrapper, the ViT's, the isotropic
    and sequence models' default, has none): the same features and gradients, far less kept for backward."""
    extra = {} if feature_cls is None else dict(feature_cls=feature_cls)
    model = _create(name, {}, features_only=True, drop_path_rate=0.2, **extra)
    x = _small_input(model, batch_size=2)
    runs = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        sizes = []
        torch.manual_seed(1)  # (the same drop-path masks)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            outs = model(x)
        sum(out.square().sum() for out in outs).backward()
        runs.append((outs, {n: p.grad for n, p in model.named_parameters()}, sum(sizes)))
    (outs, grads, saved), (outs_ckpt, grads_ckpt, saved_ckpt) = runs
    for a, b in zip(outs_ckpt, outs, strict=True):
        torch.testing.assert_close(a, b)
    for n, g in grads.items():
        assert_same_gradient(grads_ckpt[n], g, n)
    assert saved_ckpt < saved / 2, (saved, saved_ckpt)


@pytest.mark.parametrize('entry', [e for e in COMPLIANCE_MODELS if e[0] != 's4nd_seq_atto'], ids=_ids)
def test_blocks_checkpointed_from_outside_train_as_without(entry, monkeypatch):
    """Non-reentrant activation checkpointing applied to the blocks from outside (PyTorch's default, and FSDP's
    `apply_activation_checkpointing`): the recomputed blocks save what their first pass saved (their layers
    generate their own kernels in both), so the step equals one without checkpointing. Saved-tensor hooks around
    the whole step (`save_on_cpu`) keep the model-wide kernel generation."""
    from stacking import count_generation_calls
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from s4nd_vision.layers import S4ND, ssm_kernel
    from s4nd_vision.layers import s4nd as s4nd_module
    monkeypatch.setattr(s4nd_module, 'kernels_can_be_prepared', lambda module: True)  # (as in a CPU training step)
    model = _create(*entry, num_classes=3)
    x = _small_input(model, batch_size=2)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    calls = count_generation_calls(monkeypatch)
    with torch.autograd.graph.save_on_cpu():
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
    stacked_calls = len(calls)
    def is_block(module: torch.nn.Module) -> bool:  # (blocks, and the stems and downsamplings that hold an S4ND)
        return any(isinstance(c, S4ND) for c in module.children()) or type(module).__name__.endswith('Block')

    apply_activation_checkpointing(model, check_fn=is_block)
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert_same_gradient(p.grad, grads[n.replace('_checkpoint_wrapped_module.', '')], n)
    if any(isinstance(m, ssm_kernel.SSMKernel) for m in model.modules()):
        assert 0 < stacked_calls < len(calls) - stacked_calls  # (the checkpointed step: more, per-layer calls)


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_group_matcher_and_no_weight_decay(entry):
    model = _create(*entry)
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=False))
    grouped = {n for g in groups.values() for n in g}
    assert grouped == names and len(groups) > 2


def _decayed_ssm_parameters(model: torch.nn.Module) -> list:
    """Names of SSM parameters that timm's optimizer factory would give weight decay."""
    optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    return [n for n, p in ssm_kernel.ssm_parameters(model) if id(p) in decayed]


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_features_only_backbone_keeps_ssm_parameters_out_of_weight_decay(entry):
    """A `features_only` backbone (what detection and segmentation code trains) lists the SSM parameters in its
    own `no_weight_decay`, as the model does: timm's optimizer factory asks the wrapper, not the model."""
    features = _create(*entry, features_only=True)
    assert features.no_weight_decay() == {n for n, _ in ssm_kernel.ssm_parameters(features)}
    assert not _decayed_ssm_parameters(features)


@pytest.mark.parametrize('feature_cls', ['list', 'dict', 'Hook', 'fx', 'getter'])
def test_every_named_feature_wrapper_keeps_ssm_parameters_out_of_weight_decay(feature_cls):
    features = _create('convnext_s4nd_atto', {}, features_only=True, feature_cls=feature_cls)
    assert any(True for _ in ssm_kernel.ssm_parameters(features)) and not _decayed_ssm_parameters(features)
    outputs = features(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in (outputs.values() if isinstance(outputs, dict) else outputs)] == [40, 80, 160, 320]


@pytest.mark.parametrize('feature_cls', ['list', 'dict', 'hook'])
def test_module_by_module_feature_wrappers_check_the_input_as_the_model(feature_cls):
    """timm's 'list', 'dict' and 'hook' wrappers run the modules one by one, not the model's forward: they check the
    input as it does (an image given to a video backbone was read by the stem's Conv3d as an unbatched clip of one
    channel, and refused for that)."""
    clips = _create('convnext_s4nd_3d_atto', dict(img_size=32, num_frames=4, depths=(1, 1, 1, 1)),
                    features_only=True, feature_cls=feature_cls, out_indices=(0, 1))
    with pytest.raises(ValueError, match=r'expected input \(B, C, T, H, W\)'):
        clips(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match='at least 8'):  # (the reduction of the last stage returned)
        clips(torch.randn(1, 3, 2, 4, 4))
    assert [o.shape[1:] for o in (lambda out: out.values() if isinstance(out, dict) else out)(
        clips(torch.randn(1, 3, 2, 8, 8)))] == [(40, 1, 2, 2), (80, 1, 1, 1)]
    images = _create('convnext_s4nd_atto', dict(img_size=32, depths=(1, 1, 1, 1)), features_only=True,
                     feature_cls=feature_cls)
    with pytest.raises(ValueError, match='floating point'):
        images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# fewer blocks (every block type, stage, stem and downsampling kept): what dynamo traces is each module's code, and
# its tracing time grows with the number of blocks, which a graph break or an untraceable op does not depend on
SHALLOW = {'convnext_s4nd_atto': dict(depths=(1, 1, 1, 1)), 'convnext_sgconv_atto': dict(depths=(1, 1, 1, 1)),
           'convnext_s4nd_3d_atto': dict(depths=(1, 1, 1, 1)), 'vit_s4nd_atto_patch16_224': dict(depth=2),
           's4nd_iso_tiny': dict(depth=2), 's4nd_seq_atto': dict(depth=2)}


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_torch_compile_fullgraph(entry):
    """Every family compiles as one graph (fullgraph) and gives the eager outputs: shallow variants (see SHALLOW)."""
    torch._dynamo.reset()
    name, kwargs = entry
    model = _create(name, dict(SHALLOW[name], **kwargs)).eval()
    x = _small_input(model)
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_channels_last_memory_format(entry):
    """`model.to(memory_format=...)` as GPU training runs it (timm's --channels-last): channels_last for images,
    channels_last_3d for clips and sequences (which refuses any 4-D tensor: S4ND keeps its parameters 3-D);
    outputs and gradients do not change."""
    model = _create(*entry)
    x = _small_input(model, batch_size=2)
    fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
    other = _create(*entry).to(memory_format=fmt)
    assert any(p.ndim in (4, 5) for p in other.parameters()) == (x.ndim > 3)  # (sequence models: no conv)
    for p in other.parameters():
        assert p.is_contiguous(memory_format=fmt) if p.ndim in (4, 5) else p.is_contiguous()
    x_other = x.contiguous(memory_format=fmt) if x.ndim > 3 else x
    out, out_other = model(x), other(x_other)
    torch.testing.assert_close(out_other, out, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    out_other.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


# what Accelerate's offloading must load at these modules' forward: they read their submodules' weights directly
# (fused projections, stacked kernel generation), not through the submodules' forward (README, "Deployment")
OFFLOAD_PRELOAD = ['S4ND', 'S4NDStem', 'S4NDDownsample', 'ConvNeXtS4NDBlock']


@pytest.mark.parametrize('entry', COMPLIANCE_MODELS, ids=_ids)
def test_accelerate_cpu_offload(entry):
    """Weights offloaded by Accelerate (`cpu_offload`: on the meta device until their module runs) give the same
    output, in inference and in a training forward, with the README's `preload_module_classes`; the layers then
    generate their kernels one by one (no stacking over meta parameters)."""
    from accelerate import cpu_offload

    from s4nd_vision.layers import kernels_can_be_prepared
    for train in (False, True):
        model = _create(*entry).train(train)
        x = _small_input(model, batch_size=2)
        offloaded = _create(*entry).train(train)
        offloaded.load_state_dict(model.state_dict())
        cpu_offload(offloaded, execution_device=torch.device('cpu'), preload_module_classes=OFFLOAD_PRELOAD)
        assert not kernels_can_be_prepared(offloaded)
        with torch.set_grad_enabled(train):
            torch.testing.assert_close(offloaded(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name, depth_arg', [('convnext_s4nd_atto', 'depths'), ('convnext_s4nd_3d_atto', 'depths'),
                                             ('vit_s4nd_atto_patch16_224', 'depth'), ('s4nd_iso_tiny', 'depth'),
                                             ('s4nd_seq_tiny', 'depth')])
def test_model_sizes_out_of_range_are_refused_at_construction(name, depth_arg):
    """in_chans 0 built and failed at the first forward in a layer (or in a reshape), a negative depth in timm's
    drop-path schedule, num_classes -1 built a model: each is now refused naming the argument; 0 classes (no
    classifier) and 0 blocks stay valid, as in timm."""
    depth = (1, -1, 1, 1) if depth_arg == 'depths' else -1
    for kwargs, message in ((dict(in_chans=0), 'in_chans must be a positive integer, got 0'),
                            (dict(in_chans=True), 'in_chans must be a positive integer, got True'),
                            (dict(num_classes=-1), 'num_classes must be a non-negative integer'),
                            ({depth_arg: depth}, f'{depth_arg} must be a non-negative number of blocks')):
        with pytest.raises(ValueError, match=message), torch.device('meta'):
            timm.create_model(name, **kwargs)
    with torch.device('meta'):
        timm.create_model(name, num_classes=0, **{depth_arg: (1, 0, 1, 1) if depth_arg == 'depths' else 0})


@pytest.mark.parametrize('name', ['convnext_s4nd_atto', 'convnext_s4nd_3d_atto', 'vit_s4nd_atto_patch16_224',
                                  's4nd_iso_tiny', 's4nd_seq_tiny'])
def test_drop_rates_out_of_range_are_refused_by_name(name):
    """Through the Python API a negative, >= 1 or nan drop_path_rate (or drop_rate) built a model and a string
    failed inside torch.linspace; the config checks them: the models now refuse them naming the argument, as the
    config does, and keep taking a rate in [0, 1) (NumPy's too)."""
    for key in ('drop_rate', 'drop_path_rate'):
        for value in (-0.1, 1.0, float('nan'), '0.1', True):
            with pytest.raises(ValueError, match=f'{key} must be a number in \\[0, 1\\)'), torch.device('meta'):
                timm.create_model(name, **{key: value})
    with torch.device('meta'):
        timm.create_model(name, drop_rate=np.float32(0.5), drop_path_rate=0.)


def test_accelerate_big_model_loading_recipe_applies_the_records(tmp_path):
    """The README's recipe for Accelerate's big-model loading (whose `load_checkpoint_and_dispatch` stops at the
    S4ND records): a model built empty for another size and band-limit, loaded by torch with assign=True and
    dispatched with a disk-offloaded head, computes what the saved model does."""
    from accelerate import dispatch_model, init_empty_weights, load_checkpoint_and_dispatch
    from safetensors.torch import load_file, save_file
    kwargs = dict(depths=(1, 1), dims=(8, 16), img_size=32, bandlimit=0.5)
    model = timm.create_model('convnext_s4nd_atto', **kwargs).eval()
    path = str(tmp_path / 'weights.safetensors')
    save_file(model.state_dict(), path)
    with init_empty_weights():
        empty = timm.create_model('convnext_s4nd_atto', **dict(kwargs, img_size=64, bandlimit=1.0))
    # (if Accelerate learns to skip the records, the README can say so)
    with pytest.raises(ValueError, match='does not have a parameter or a buffer'):
        load_checkpoint_and_dispatch(empty, path, device_map={'': 'cpu'})
    empty.load_state_dict(load_file(path), assign=True)
    device_map = {'stem': 'cpu', 'stages': 'cpu', 'norm_pre': 'cpu', 'head': 'disk'}
    dispatched = dispatch_model(empty.eval(), device_map, offload_dir=str(tmp_path / 'offload'),
                                preload_module_classes=OFFLOAD_PRELOAD)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dispatched(x), model(x), rtol=0, atol=0)
