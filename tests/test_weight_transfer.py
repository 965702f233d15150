"""Weight transfer from timm's ConvNeXt into ConvNeXt-S4ND (and into the inflated 3D baseline), and from timm's ViT
into ViT-S4ND: every timm tensor with a counterpart loads, with its values (1x1 conv MLP weights reshaped to our
Linear ones), the rest keeps its initialization whole, and a one-line report says which is which."""
import logging
import os
import re
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

import s4nd_vision  # noqa: F401
from s4nd_vision.layers import S4ND, S4Kernel, SGConvKernel, SSMKernel
from s4nd_vision.layers.ssm_kernel import per_kernel
from s4nd_vision.models._checkpoint import file_num_classes, match_state_dict, pointwise_reshape
from s4nd_vision.models.convnext_s4nd import checkpoint_filter_fn
from s4nd_vision.models.inflate import inflate_state_dict

SIZES = ('atto', 'femto', 'pico', 'nano', 'tiny', 'small', 'base')
CONV_MLP = {'atto', 'femto', 'pico', 'nano'}  # timm builds these with conv_mlp=True: 1x1 conv MLP weights
LOGGER = 's4nd_vision.models._checkpoint'

# what has no counterpart, by layout: the depthwise convs are S4ND layers; the S4ND stem (pointwise
# conv, S4ND, pointwise GLU projection, norm) replaces timm's patch conv and norm; the S4ND downsampling
# keeps timm's norm (downsample.0) and replaces its strided conv (downsample.1) by S4ND and a projection
_KEPT = {
    'patch': r'\.conv_dw\.',
    's4nd': r'^stem\.|\.conv_dw\.|^stages\.\d\.downsample\.[12]\.',
}
_UNUSED = {
    'patch': r'\.conv_dw\.',
    's4nd': r'^stem\.|\.conv_dw\.|^stages\.\d\.downsample\.1\.',
}
_LAYOUTS = {'patch': dict(stem_type='patch', downsample_type='conv'), 's4nd': {}}


def _records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]


@pytest.mark.parametrize('size', SIZES)
def test_every_timm_convnext_tensor_with_a_counterpart_loads(size, caplog):
    """State dicts only (the models on the meta device): every variant we mirror, both layouts."""
    torch.manual_seed(0)
    with torch.device('meta'):
        convnext = timm.create_model(f'convnext_{size}')
    theirs = {k: torch.randn(v.shape) for k, v in convnext.state_dict().items()}
    assert any(v.ndim == 4 and k.endswith('mlp.fc1.weight') for k, v in theirs.items()) == (size in CONV_MLP)
    for layout, kwargs in _LAYOUTS.items():
        with torch.device('meta'):
            model = timm.create_model(f'convnext_s4nd_{size}', **kwargs)
        own = model.state_dict()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            out = checkpoint_filter_fn(theirs, model)
        assert out.keys() == own.keys() and all(out[k].shape == own[k].shape for k in own)

        kept = {k for k in own if re.search(_KEPT[layout], k)}
        unused = {k for k in theirs if re.search(_UNUSED[layout], k)}
        loaded = set(theirs) - unused
        assert loaded <= set(own)
        for k in loaded:  # the values, after the reshape of 1x1 conv weights
            assert out[k].shape == own[k].shape and torch.equal(out[k].flatten(), theirs[k].flatten()), k
        assert set(own) - loaded == kept
        # the model's own tensors: its initialization (meta), its reference grids and band-limits (host values)
        host = ('.l_ref', '.bandlimit')
        assert all(out[k].is_meta for k in kept if not k.endswith(host))
        assert all(torch.equal(out[k], own[k]) for k in kept if k.endswith(host))
        assert any(k.endswith('.bandlimit') for k in kept)
        # what keeps its initialization is exactly the S4ND layers, and with the S4ND stem and downsampling
        # their pointwise convs and the stem norm
        s4nd = {f'{name}.{k}' for name, m in model.named_modules() if isinstance(m, S4ND) for k in m.state_dict()}
        assert {k for k in kept if '.conv_dw.' in k} == {k for k in s4nd if '.conv_dw.' in k}
        if layout == 's4nd':
            assert kept - s4nd == {k for k in own if re.match(r'stem\.[024]\.|stages\.\d\.downsample\.2\.', k)}
        else:
            assert kept == s4nd

        reshaped = sorted(k for k in loaded if theirs[k].shape != own[k].shape)
        n_mlp = 2 * sum(len(s.blocks) for s in model.stages)
        if size in CONV_MLP:
            assert reshaped == sorted(k for k in own if re.search(r'\.mlp\.fc[12]\.weight$', k))
            assert len(reshaped) == n_mlp
        else:
            assert not reshaped
        (line,) = _records(caplog)
        assert f'loaded {len(loaded) - len(reshaped)} tensors as they are' in line
        assert f'kept init {len(kept)} (' in line and f'unused from the checkpoint {len(unused)} (' in line
        assert f'stages.*.blocks.*.conv_dw S4ND {len([k for k in kept if ".conv_dw." in k])}' in line
        if size in CONV_MLP:
            assert f'reshaped 1x1 conv -> linear {n_mlp} (stages.*.blocks.*.mlp.fc1/fc2 {n_mlp})' in line
        else:
            assert 'reshaped' not in line


def test_timm_convnext_atto_weights_give_timm_outputs(tmp_path):
    """Functional check through timm's own loading path: with every block's mixer set to timm's depthwise conv
    (the one part that is S4ND by design), ConvNeXt-S4ND-atto with the patch stem and conv downsampling,
    loaded from timm's convnext_atto file, computes timm's convnext_atto: the 1x1 conv MLPs became our Linear
    layers with the same function."""
    torch.manual_seed(0)
    convnext = timm.create_model('convnext_atto', ls_init_value=1.0).eval()  # blocks that matter
    with torch.no_grad():  # no weight at its init value, so that every tensor's transfer is seen
        for p in convnext.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / 'convnext_atto.safetensors'
    save_file(convnext.state_dict(), str(path))
    model = timm.create_model(
        'convnext_s4nd_atto', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        **_LAYOUTS['patch']).eval()
    for ours, theirs in zip(model.stages, convnext.stages):
        for block, timm_block in zip(ours.blocks, theirs.blocks):
            block.conv_dw = timm_block.conv_dw
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = convnext(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        # (not trivially: without the MLP weights the output differs)
        model.stages[1].blocks[0].mlp.fc1.weight.zero_()
        assert not torch.allclose(model(x), expected, rtol=1e-3, atol=1e-3)
    # another number of input channels: the stem conv adapted as timm's loader adapts timm's convnext_atto
    for in_chans in (1, 4):
        ours = timm.create_model('convnext_s4nd_atto', pretrained=True, in_chans=in_chans,
                                 pretrained_cfg_overlay=dict(file=str(path)), **_LAYOUTS['patch'])
        theirs = timm.create_model('convnext_atto', pretrained=True, in_chans=in_chans,
                                   pretrained_cfg_overlay=dict(file=str(path)))
        torch.testing.assert_close(ours.stem[0].weight, theirs.stem[0].weight)
        torch.testing.assert_close(ours.stem[0].bias, theirs.stem[0].bias)


def _facebook_name(name: str) -> str:
    """timm's ConvNeXt tensor name -> the original (facebookresearch/ConvNeXt) checkpoint's."""
    name = re.sub(r'^stem\.', 'downsample_layers.0.', name)
    name = re.sub(r'^stages\.(\d)\.downsample\.', r'downsample_layers.\1.', name)
    name = re.sub(r'^stages\.(\d)\.blocks\.(\d+)\.', r'stages.\1.\2.', name)
    name = name.replace('conv_dw', 'dwconv').replace('mlp.fc', 'pwconv')
    return name.replace('head.norm.', 'norm.').replace('head.fc.', 'head.')


def test_original_convnext_checkpoints_load_as_timm_renames_them():
    """A checkpoint of the original ConvNeXt code ({'model': ...}, `downsample_layers.*`, `stages.i.j.pwconv1`)
    transfers as the same weights in timm's layout do (timm's ConvNeXt filter renames them), also from a deeper
    ConvNeXt (its extra block unused, not a KeyError in timm's reshape): it was refused as fitting nothing."""
    torch.manual_seed(0)
    convnext = timm.models.convnext.ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), conv_mlp=False)
    theirs = convnext.state_dict()
    original = {'model': {_facebook_name(k): v for k, v in theirs.items()}}
    assert 'downsample_layers.1.1.weight' in original['model'] and 'stages.2.1.pwconv1.weight' in original['model']
    model = timm.create_model('convnext_s4nd_atto', depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), **_LAYOUTS['patch'])
    expected = checkpoint_filter_fn(theirs, model)
    out = checkpoint_filter_fn(original, model)
    assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in expected)
    assert torch.equal(out['stem.0.weight'], theirs['stem.0.weight'])
    assert torch.equal(out['stages.3.blocks.0.mlp.fc2.weight'], theirs['stages.3.blocks.0.mlp.fc2.weight'])
    assert torch.equal(out['head.norm.weight'], theirs['head.norm.weight'])


def test_open_clip_convnext_trunks_load_as_timm_renames_them():
    """An open_clip ConvNeXt tower (`visual.trunk.*`, as the docstring of the filter says) transfers as the same
    weights in timm's layout do (timm's ConvNeXt filter strips the prefix); unrenamed it fits nothing."""
    torch.manual_seed(0)
    convnext = timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), conv_mlp=False)
    theirs = {k: v for k, v in convnext.state_dict().items() if not k.startswith('head.fc.')}
    tower = {f'visual.trunk.{k}': v for k, v in theirs.items()}
    model = timm.create_model('convnext_s4nd_atto', depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), **_LAYOUTS['patch'])
    expected = checkpoint_filter_fn(theirs, model, warn_classifier=False)
    out = checkpoint_filter_fn(tower, model, warn_classifier=False)
    assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in expected)
    assert torch.equal(out['stages.2.blocks.0.mlp.fc1.weight'], theirs['stages.2.blocks.0.mlp.fc1.weight'])


def test_original_convnext_checkpoints_of_another_width_are_refused_by_name():
    """An original ConvNeXt checkpoint of another width is refused as its timm-layout twin is (nothing fits outside
    the head), not with timm's reshape error ("shape '[32, 8]' is invalid")."""
    torch.manual_seed(0)
    wider = timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), conv_mlp=False).state_dict()
    model = timm.create_model('convnext_s4nd_atto', depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), **_LAYOUTS['patch'])
    with pytest.raises(ValueError, match='fit no module') as timm_layout:
        checkpoint_filter_fn(wider, model)
    with pytest.raises(ValueError, match='fit no module') as original:
        checkpoint_filter_fn({'model': {_facebook_name(k): v for k, v in wider.items()}}, model)
    assert str(original.value) == str(timm_layout.value)


def test_linear_and_1x1_conv_mlps_map_both_ways():
    """timm's own ConvNeXt in both MLP layouts: the 1x1 conv weights load into Linear layers and back,
    and the model computes the same function."""
    torch.manual_seed(0)
    kwargs = dict(ls_init_value=1.0, pretrained=False)
    conv, linear = (timm.create_model('convnext_atto', conv_mlp=c, **kwargs).eval() for c in (True, False))
    x = torch.randn(1, 3, 32, 32)
    for source, target, how in ((conv, linear, '1x1 conv -> linear'), (linear, conv, 'linear -> 1x1 conv')):
        weights, report = match_state_dict(source.state_dict(), target)
        target.load_state_dict(weights)
        assert not report.kept_init and not report.unused
        assert list(report.mapped) == [f'reshaped {how}'] and len(report.mapped[f'reshaped {how}']) == 2 * 12
        with torch.no_grad():
            torch.testing.assert_close(target(x), source(x), rtol=1e-4, atol=1e-5)


def test_pointwise_reshape_only_maps_the_same_pointwise_map():
    w = torch.randn(6, 4)
    conv, how = pointwise_reshape(w, (6, 4, 1, 1))
    assert how == 'linear -> 1x1 conv' and torch.equal(conv.flatten(1), w)
    back, how = pointwise_reshape(conv, (6, 4))
    assert how == '1x1 conv -> linear' and torch.equal(back, w)
    assert pointwise_reshape(conv, (6, 4, 1, 1, 1))[1] == '1x1 conv -> 1x1x1 conv'
    for value, shape in ((w, (6, 4)), (w, (4, 6, 1, 1)), (torch.randn(6, 4, 2, 2), (6, 16)),
                         (torch.randn(24), (6, 4)), (torch.randn(6, 1, 1, 1), (6, 1, 7, 7)), (w, (6, 2, 2))):
        assert pointwise_reshape(value, shape) is None, (tuple(value.shape), shape)


def test_a_module_loads_whole_or_keeps_its_init():
    """A bias never loads without its weight: with stem_chs equal to timm's stem width the pointwise stem conv's
    bias has the shape of timm's patch conv bias, and keeps its initialization all the same."""
    torch.manual_seed(0)
    theirs = timm.create_model('convnext_atto').state_dict()
    model = timm.create_model('convnext_s4nd_atto', stem_chs=40)
    assert model.state_dict()['stem.0.bias'].shape == theirs['stem.0.bias'].shape
    theirs['stem.0.bias'] = torch.randn_like(theirs['stem.0.bias'])
    out = checkpoint_filter_fn(theirs, model)
    assert torch.equal(out['stem.0.bias'], model.state_dict()['stem.0.bias'])
    assert not torch.equal(out['stem.0.bias'], theirs['stem.0.bias'])


def test_our_own_checkpoints_load_as_they_are_without_a_report(caplog):
    model = timm.create_model('convnext_s4nd_atto', img_size=32)
    own = model.state_dict()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = checkpoint_filter_fn(own, model)
    assert out.keys() == own.keys() and all(out[k] is own[k] for k in own)
    assert not _records(caplog)


def test_inflating_timm_convnext_logs_the_same_report(caplog):
    """Inflation (2D -> 3D) reshapes 1x1 conv MLP weights with the same helper and logs the same kind of line."""
    torch.manual_seed(0)
    convnext = timm.create_model('convnext_atto')
    model_3d = timm.create_model('convnext_3d_atto', img_size=32, num_frames=4)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        weights = inflate_state_dict(convnext.state_dict(), model_3d)
    (line,) = _records(caplog)
    theirs = convnext.state_dict()
    torch.testing.assert_close(weights['stages.2.blocks.3.mlp.fc2.weight'], theirs['stages.2.blocks.3.mlp.fc2.weight'][
        :, :, 0, 0])
    n_mlp = 2 * 12
    n_inflated = 1 + 12 + 3  # the stem's patch conv, the depthwise convs, the downsampling convs
    assert line.startswith('ConvNeXt3d from 2D weights (inflated): loaded ')
    assert f'reshaped 1x1 conv -> linear {n_mlp} (stages.*.blocks.*.mlp.fc1/fc2 {n_mlp})' in line
    assert f'inflated along time (repeat) {n_inflated} (stem.0 1, stages.*.blocks.*.conv_dw 12, ' \
           'stages.*.downsample.1 3)' in line
    assert 'kept init 2 (head.fc Linear 2)' in line and 'unused from the checkpoint 2 (head.fc 2)' in line


def _as_saved_before_3d_kernel_tensors(model: torch.nn.Module) -> dict:
    """`model`'s weights as s4nd_vision saved them while SSM C and SGConv weights were 4-D, (num_kernels, dim, ...)."""
    old = dict(model.state_dict())
    for prefix, m in model.named_modules():
        if isinstance(m, (SSMKernel, S4Kernel, SGConvKernel)):
            key = f'{prefix}.{"weight" if isinstance(m, SGConvKernel) else "c"}'
            old[key] = per_kernel(old[key], m.dim).contiguous()
    assert sum(v.ndim == 4 for v in old.values()) > sum(v.ndim == 4 for v in model.state_dict().values())
    return old


@pytest.mark.parametrize('name,kwargs', [('convnext_s4nd_atto', {}), ('convnext_s4nd_atto', dict(kernel='s4')),
                                         ('convnext_sgconv_atto', {})], ids=['s4d', 's4', 'sgconv'])
def test_weights_saved_with_4d_kernel_tensors_still_load(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, **kwargs)
    old = _as_saved_before_3d_kernel_tensors(model)
    fresh = timm.create_model(name, img_size=32, **kwargs)
    fresh.load_state_dict(old)
    filtered = checkpoint_filter_fn(old, fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
        assert torch.equal(filtered[key], value), key


def test_inflating_weights_saved_with_4d_kernel_tensors():
    torch.manual_seed(0)
    model_2d = timm.create_model('convnext_s4nd_atto', img_size=32)
    model_3d = timm.create_model('convnext_s4nd_3d_atto', img_size=32, num_frames=4)
    torch.manual_seed(1)
    expected = inflate_state_dict(model_2d.state_dict(), model_3d)
    torch.manual_seed(1)
    out = inflate_state_dict(_as_saved_before_3d_kernel_tensors(model_2d), model_3d)
    assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in out)


VIT = 'vit_s4nd_atto_patch16_224'


def _timm_vit(embed_dim: int = 64) -> torch.nn.Module:
    """A timm ViT of the atto's width and depth (timm registers none that small)."""
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', img_size=64, embed_dim=embed_dim, depth=4, num_heads=2)


def test_timm_vit_weights_transfer_what_fits_with_a_report(tmp_path, caplog):
    """From a timm ViT: the patch embedding, the blocks' norms and MLPs and the final norm load; the S4ND mixers and
    the head (timm's is `head`, ours `head.fc`) keep their init; attention, class token and position embedding are
    unused, and a line says so. Weights of another width fit nothing and are refused in one line."""
    vit = _timm_vit()
    path = str(tmp_path / 'vit.safetensors')
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = timm.create_model(VIT, img_size=64, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    theirs = vit.state_dict()
    for name in ('patch_embed.proj.weight', 'blocks.3.norm2.weight', 'blocks.0.mlp.fc1.weight', 'norm.bias'):
        assert torch.equal(model.state_dict()[name], theirs[name]), name
    (line,) = _records(caplog)
    assert line.startswith('VisionTransformerS4ND from timm ViT weights: loaded ')
    assert 'kept init' in line and 'blocks.*.mixer S4NDMixer' in line and 'blocks.*.attn' in line
    save_file({k: v.contiguous() for k, v in _timm_vit(embed_dim=32).state_dict().items()}, path)
    with pytest.raises(ValueError, match='fit no module of VisionTransformerS4ND outside the head'):
        timm.create_model(VIT, img_size=64, pretrained=True, pretrained_cfg_overlay=dict(file=path))


def test_timm_vit_report_names_its_top_level_tensors_and_the_resampled_patch_embedding(tmp_path, caplog):
    """The report names what a timm ViT's top level holds and nothing takes (class token, position embedding, head;
    in the file's order), where it read '/head 4', and says that a patch embedding of another patch size was
    resampled, not loaded as it is."""
    vit = _timm_vit()
    path = str(tmp_path / 'vit.safetensors')
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        timm.create_model(VIT, img_size=64, pretrained=True, pretrained_cfg_overlay=dict(file=path))
        timm.create_model(VIT, img_size=64, patch_size=8, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    same, resampled = _records(caplog)
    assert 'unused from the checkpoint 20 (blocks.*.attn 16, cls_token/head/pos_embed 4)' in same, same
    assert same.startswith('VisionTransformerS4ND from timm ViT weights: loaded 36 tensors as they are;'), same
    assert 'resampled' not in same
    assert resampled.startswith('VisionTransformerS4ND from timm ViT weights: loaded 35 tensors as they are; '
                                'resampled from 16x16 to 8x8 patches 1 (patch_embed.proj 1);'), resampled


def test_vit_weights_of_another_patch_size_are_resampled(tmp_path, caplog):
    """Our own patch-16 weights load into a patch-8 model as `set_input_size(patch_size=8)` makes them, without a
    transfer report."""
    torch.manual_seed(0)
    source = timm.create_model(VIT, img_size=64)
    path = str(tmp_path / 'p16.safetensors')
    save_file(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = timm.create_model(VIT, img_size=64, patch_size=8, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=path))
    assert not _records(caplog)
    source.set_input_size(patch_size=8)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)


@pytest.mark.parametrize('name,saved,built,size', [
    ('convnext_s4nd_atto', dict(kernel='s4'), {}, dict(img_size=32)),
    ('convnext_s4nd_atto', {}, dict(kernel='s4'), dict(img_size=32)),
    ('vit_s4nd_atto_patch16_224', {}, dict(token_layout='1d'), dict(img_size=32)),
    ('s4nd_iso_tiny', {}, dict(kernel='sgconv'), dict(img_size=16)),
    ('convnext_s4nd_3d_atto', {}, dict(kernel='s4'), dict(img_size=32, num_frames=2)),
    ('s4nd_seq_atto', {}, dict(kernel='s4'), dict(seq_len=16)),
], ids=['s4-into-s4d', 's4d-into-s4', 'vit-2d-into-1d', 'iso-into-sgconv', '3d', 'seq'])
def test_our_weights_that_do_not_fit_are_refused_also_with_a_new_classifier(tmp_path, name, saved, built, size):
    """timm loads non-strictly when it drops the classifier (another num_classes, as in fine-tuning): weights of
    the model built with other arguments would load in part (an S4 kernel without its low-rank term, a 2D layer's
    H kernel as a 1D one), the rest at its initialization. They are refused, naming what does not fit; weights that
    fit load, the new classifier kept at its initialization. timm's pretrained_strict=False still loads in part."""
    path = tmp_path / 'weights.safetensors'
    model = timm.create_model(name, num_classes=5, **saved, **size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    load = dict(pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **size)
    with pytest.raises(ValueError, match=rf'the weights do not fit {type(model).__name__}: .* missing .*unexpected '):
        timm.create_model(name, **built, **load)
    if 'token_layout' not in built:  # (a 2D layer's reference grid never loads into a 1D layer, strict or not)
        timm.create_model(name, **built, **load, pretrained_strict=False)  # (a partial load asked for: timm's)
    fine_tuned = timm.create_model(name, **saved, **load)
    for key, value in model.state_dict().items():
        if not key.startswith(fine_tuned.pretrained_cfg['classifier'] + '.'):
            assert torch.equal(fine_tuned.state_dict()[key], value), key


@pytest.mark.parametrize('name,size', [('convnext_s4nd_atto', dict(img_size=32)), ('s4nd_seq_atto', dict(seq_len=16))])
def test_a_wrong_or_missing_pretrained_file_is_a_clear_error(tmp_path, name, size):
    """timm's loader ends a missing file in a bare FileNotFoundError, a YAML file in torch.load's IndexError, and
    reads a file by its name (a safetensors file named .pth in torch.load's advice to load unsafely): each is
    refused naming the file and what is wrong. Files of either format under their own names load."""
    weights = timm.create_model(name, **size).state_dict()
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'config.yaml').write_text('model:\n  name: convnext_s4nd_atto\n')
    save_file(weights, str(tmp_path / 'safetensors.pth'))
    torch.save(weights, tmp_path / 'torch.safetensors')
    for file, error, match in [
            ('missing.safetensors', FileNotFoundError, 'missing.safetensors.* does not exist'),
            ('folder', FileNotFoundError, "folder.* is not a file but a folder: give a file such as a run's best"),
            ('config.yaml', ValueError, r"config.yaml.* is neither a safetensors file nor a torch.save file .*b'model"),
            ('safetensors.pth', ValueError, r'safetensors.pth.* is a safetensors file, but timm reads a file by its '
                                            r'name: .* rename it'),
            ('torch.safetensors', ValueError, 'torch.safetensors.* is a torch.save file, but timm reads')]:
        with pytest.raises(error, match=f'weights file .*{match}'):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / file)), **size)
        if os.path.isfile(tmp_path / file):  # (the trainer and eval-resolution read the class count first)
            with pytest.raises(error, match=f'weights file .*{match}'):
                file_num_classes(str(tmp_path / file), 'head.fc')
    save_file(weights, str(tmp_path / 'weights.safetensors'))
    torch.save(weights, tmp_path / 'weights.pth')
    for file in ('weights.safetensors', 'weights.pth'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / file)), **size)


@pytest.mark.parametrize('name,size', [
    ('convnext_s4nd_atto', dict(img_size=32)),
    ('vit_s4nd_atto_patch16_224', dict(img_size=32)),
    ('s4nd_iso_tiny', dict(img_size=16)),
    ('convnext_s4nd_3d_atto', dict(img_size=32, num_frames=2)),
    ('s4nd_seq_atto', dict(seq_len=16)),
], ids=['convnext', 'vit', 'iso', '3d', 'seq'])
def test_a_fitting_classifier_that_timm_drops_is_warned_about(tmp_path, name, size):
    """timm drops the file's classifier whenever the model's num_classes differs from the pretrained_cfg's (1000
    unless the overlay states another): `num_classes=5` without `num_classes=5` in the overlay loads a 5-class file
    with a random head. That is warned about; the overlay's count loads the head, and a file of another count
    (fine-tuning) is not warned about."""
    path = tmp_path / 'weights.safetensors'
    model = timm.create_model(name, num_classes=5, **size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    classifier = model.pretrained_cfg['classifier'] + '.weight'
    with pytest.warns(UserWarning, match=r"classifier .* has the model's 5 classes, but timm drops it .* "
                                         r"pass num_classes=5 in pretrained_cfg_overlay"):
        forgot = timm.create_model(name, pretrained=True, num_classes=5, **size,
                                   pretrained_cfg_overlay=dict(file=str(path)))
    assert not torch.equal(forgot.state_dict()[classifier], model.state_dict()[classifier])  # (what it warns of)
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*timm drops it')
        loaded = timm.create_model(name, pretrained=True, num_classes=5, **size,
                                   pretrained_cfg_overlay=dict(file=str(path), num_classes=5))
        timm.create_model(name, pretrained=True, num_classes=3, **size, pretrained_cfg_overlay=dict(file=str(path)))
        # a features_only backbone has no classifier to lose (timm drops any, the wrapper leaves out the head)
        backbone = timm.create_model(name, pretrained=True, num_classes=5, features_only=True, **size,
                                     pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(loaded.state_dict()[classifier], model.state_dict()[classifier])
    # (loaded, under the wrapper's name)
    first_conv = model.state_dict()[model.pretrained_cfg['first_conv'] + '.weight']
    assert any(torch.equal(v, first_conv) for v in backbone.state_dict().values())


def test_a_fitting_classifier_of_timm_or_2d_weights_that_timm_drops_is_warned_about(tmp_path):
    """The same for a plain timm ConvNeXt file (transferred module by module) and a 2D file inflated into a video
    model, whose classifier is kept when it fits."""
    for source, target, size in (('convnext_atto', 'convnext_s4nd_atto', dict(img_size=32)),
                                 ('convnext_s4nd_atto', 'convnext_s4nd_3d_atto', dict(img_size=32, num_frames=2))):
        path = tmp_path / f'{source}.safetensors'
        save_file({k: v.contiguous() for k, v in timm.create_model(source, num_classes=5).state_dict().items()},
                  str(path))
        with pytest.warns(UserWarning, match=r"has the model's 5 classes, but timm drops it"):
            timm.create_model(target, pretrained=True, num_classes=5, **size,
                              pretrained_cfg_overlay=dict(file=str(path)))
        with warnings.catch_warnings():  # (not for a features_only backbone, which has no classifier)
            warnings.filterwarnings('error', message='.*timm drops it')
            timm.create_model(target, pretrained=True, num_classes=5, features_only=True, **size,
                              pretrained_cfg_overlay=dict(file=str(path)))
