"""timm's meaning of the input size: `create_model(img_size=)` and `set_input_size` state the native size
(`pretrained_cfg['input_size']`, read by `resolve_model_data_config`) and keep the model's function at every
input size; the S4ND layers' reference grids travel with the weights. The cfg's channel count stays the source
weights' (timm adapts the first conv to `in_chans` from it); the model's own is `get_model_input_config`'s."""
import logging

import numpy as np
import pytest
import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import get_model_input_config
from timm.models._hub import save_config_for_hf

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.eval.resolution import load_model
from s4nd_vision.layers import S4ND
from s4nd_vision.models.inflate import inflate_state_dict

# (model, kwargs at the training size, native-size kwargs after the change, input shapes (no batch) to compare)
FAMILIES = {
    'convnext_2d': ('convnext_s4nd_atto', dict(img_size=64), dict(img_size=128),
                    [(3, 64, 64), (3, 96, 96), (3, 64, 96)]),
    'convnext_sgconv': ('convnext_sgconv_atto', dict(img_size=64), dict(img_size=96), [(3, 64, 64), (3, 128, 128)]),
    'convnext_3d': ('convnext_s4nd_3d_atto', dict(img_size=32, num_frames=4), dict(img_size=64, num_frames=8),
                    [(3, 4, 32, 32), (3, 8, 64, 48)]),
    'vit_2d': ('vit_s4nd_atto_patch16_224', dict(img_size=64), dict(img_size=96), [(3, 64, 64), (3, 128, 96)]),
    'vit_1d': ('vit_s4nd_atto_patch16_224', dict(img_size=64, token_layout='1d'), dict(img_size=96),
               [(3, 64, 64), (3, 128, 96)]),
    'iso': ('s4nd_iso_tiny', dict(img_size=14, num_classes=10, in_chans=1), dict(img_size=28),
            [(1, 14, 14), (1, 28, 28), (1, 21, 17)]),
    'seq': ('s4nd_seq_atto', dict(seq_len=64), dict(seq_len=128), [(1, 64), (1, 128), (1, 100)]),
}


def _outputs(model, shapes):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return [model(torch.randn(2, *s, generator=gen)) for s in shapes]


def _input_size(kwargs):
    """What the cfg states: the registry's (source weights') channels, the native size of `kwargs`."""
    if 'seq_len' in kwargs:
        return (1, kwargs['seq_len'])
    img = kwargs['img_size']
    return (3, *((kwargs['num_frames'],) if 'num_frames' in kwargs else ()), img, img)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_set_input_size_keeps_the_function_and_states_the_size(family):
    name, kwargs, new, shapes = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    in_chans = kwargs.get('in_chans', 3)
    assert model.pretrained_cfg['input_size'] == _input_size(kwargs)  # not the registry's 224
    before = _outputs(model, shapes)
    model.set_input_size(**new)
    assert model.pretrained_cfg['input_size'] == _input_size(new)
    if family != 'seq':  # pool_size: the final feature map at the new size (the head's pooling window)
        with torch.no_grad():
            final = model.forward_features(torch.randn(1, in_chans, *_input_size(new)[1:]))
        assert model.pretrained_cfg['pool_size'] == tuple(final.shape[2:]), family
    if family != 'seq':  # (timm's data config reads images)
        assert resolve_model_data_config(model)['input_size'] == _input_size(new)
        assert get_model_input_config(model)['input_size'] == (in_chans, new['img_size'], new['img_size'])
    for a, b in zip(before, _outputs(model, shapes)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)

    # the weights carry the reference grids: a model built at the new size that loads them computes the same
    native = timm.create_model(name, **dict(kwargs, **new)).eval()
    state = model.state_dict()
    native.load_state_dict(state)
    for a, b in zip(before, _outputs(native, shapes)):
        torch.testing.assert_close(b, a)
    # ... which it would not without them (a weight file written before the grids were saved): the grid matters
    if family != 'convnext_sgconv':  # (SGConv's sub-kernel layout follows the grid: its weights do not fit)
        old_file = timm.create_model(name, **dict(kwargs, **new)).eval()
        old_file.load_state_dict({k: v for k, v in state.items() if not k.endswith('l_ref')})
        assert not all(torch.allclose(a, b) for a, b in zip(before, _outputs(old_file, shapes)))


def test_create_model_states_the_input_size_for_timm_data_config():
    model = timm.create_model('convnext_s4nd_atto', img_size=64)
    config = resolve_model_data_config(model)
    assert config['input_size'] == (3, 64, 64)
    assert timm.create_model('convnext_s4nd_atto').pretrained_cfg['input_size'] == (3, 224, 224)
    video = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=8)
    assert video.pretrained_cfg['input_size'] == (3, 8, 64, 64) and video.pretrained_cfg['pool_size'] == (4, 2, 2)
    # features_only wrappers build (they keep timm's cfg)
    features = timm.create_model('convnext_s4nd_atto', img_size=64, features_only=True)
    assert len(features(torch.randn(1, 3, 64, 64))) == 4


def test_layer_saves_and_loads_its_reference_grid():
    torch.manual_seed(0)
    trained = S4ND(4, l_ref=(8, 6))
    other = S4ND(4, l_ref=(16, 12))
    state = trained.state_dict()
    assert state['l_ref'].tolist() == [8, 6] and state['l_ref'].dtype == torch.int64
    other.load_state_dict(state)
    assert other.l_ref == (8, 6)
    x = torch.randn(2, 4, 12, 10)
    torch.testing.assert_close(other(x), trained(x))

    no_ref = S4ND(4)
    assert no_ref.state_dict()['l_ref'].tolist() == [0, 0]  # zeros: no reference (rate 1 always)
    other.load_state_dict(no_ref.state_dict())
    assert other.l_ref is None
    other.load_state_dict({k: v for k, v in state.items() if k != 'l_ref'})  # older files: the layer's own
    assert other.l_ref is None

    for bad in (torch.tensor([8.5, 6.0]), torch.tensor([8, 6, 4]), torch.tensor([8, 0])):
        with pytest.raises(RuntimeError, match='l_ref: expected 2 positive integers'):
            other.load_state_dict(dict(state, l_ref=bad))


def test_sgconv_layer_adopts_the_sub_kernel_layout_of_the_grid_it_loads():
    torch.manual_seed(0)
    trained = S4ND(4, kernel='sgconv', l_ref=(64, 16), sgconv_size=8)
    other = S4ND(4, kernel='sgconv', l_ref=(16, 16), sgconv_size=8)
    assert trained.kernels[0].n_scales != other.kernels[0].n_scales
    other.load_state_dict(trained.state_dict())
    assert other.kernels[0].n_scales == trained.kernels[0].n_scales and other.l_ref == (64, 16)
    x = torch.randn(1, 4, 32, 24)
    torch.testing.assert_close(other(x), trained(x))

    # the layout comes from the weights, not from the grid saved with them: a layer whose reference was set
    # after it was built (its sub-kernels unchanged) saves weights that load, into a layer built like it or not
    trained.set_reference_size((128, 16))
    for like in ((64, 16), (128, 16)):
        copy = S4ND(4, kernel='sgconv', l_ref=like, sgconv_size=8)
        copy.load_state_dict(trained.state_dict())
        torch.testing.assert_close(copy(x), trained(x))
    # and where the layout does not change, the loaded parameters are the layer's own (an optimizer keeps them)
    capped = S4ND(4, kernel='sgconv', l_ref=(16, 16), l_max=(16, 16), sgconv_size=8)
    params = list(capped.parameters())
    capped.load_state_dict(S4ND(4, kernel='sgconv', l_ref=(64, 64), l_max=(16, 16), sgconv_size=8).state_dict())
    assert capped.l_ref == (64, 64) and all(a is b for a, b in zip(capped.parameters(), params))


def test_inflation_keeps_the_2d_reference_grid_and_the_3d_time_axis():
    torch.manual_seed(0)
    source = timm.create_model('convnext_s4nd_atto', img_size=64)
    target = timm.create_model('convnext_s4nd_3d_atto', img_size=128, num_frames=8)
    inflated = inflate_state_dict(source.state_dict(), target)
    assert inflated['stem.1.l_ref'].tolist() == [8, 64, 64]
    assert inflated['stages.3.blocks.0.conv_dw.l_ref'].tolist() == [4, 2, 2]
    target.load_state_dict(inflated, strict=False)  # (the 2D head is left out)
    assert target.stages[3].blocks[0].conv_dw.l_ref == (4, 2, 2)


def test_load_model_builds_at_the_training_resolution(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    trained = timm.create_model('s4nd_iso_tiny', img_size=14, num_classes=10, in_chans=1)
    path = str(tmp_path / 'w.safetensors')
    save_file({k: v for k, v in trained.state_dict().items() if not k.endswith('l_ref')}, path)  # an older file
    model = load_model('s4nd_iso_tiny', path, num_classes=10, in_chans=1, img_size=14)
    assert model.img_size == (14, 14) and {b.conv_dw.l_ref for b in model.blocks} == {(14, 14)}
    assert get_model_input_config(model)['input_size'] == (1, 14, 14)
    plain = load_model('convnext_atto', None, num_classes=10, img_size=64)  # timm's own: no img_size argument
    assert plain.num_classes == 10


@pytest.mark.parametrize('name', ['convnext_s4nd_atto', 'vit_s4nd_atto_patch16_224', 's4nd_iso_tiny'])
def test_pretrained_weights_adapt_to_other_input_channels(name, tmp_path):
    """`create_model(name, pretrained=True, in_chans=1)` sums the source RGB filters of the first conv, as for
    timm's models: the cfg still states the 3 channels the weights were trained on, also at another img_size."""
    torch.manual_seed(0)
    source = timm.create_model(name)
    torch.save(source.state_dict(), tmp_path / 'rgb.pth')
    model = timm.create_model(name, pretrained=True, in_chans=1, img_size=64,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'rgb.pth')))
    assert model.pretrained_cfg['input_size'] == (3, 64, 64)
    first_conv = model.pretrained_cfg['first_conv'] + '.weight'
    weights = model.state_dict()
    torch.testing.assert_close(weights[first_conv], source.state_dict()[first_conv].sum(1, keepdim=True))
    assert all(torch.equal(weights[k], v) for k, v in source.state_dict().items() if k != first_conv)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize('name, source_name, kwargs, in_chans', [
    ('convnext_s4nd_3d_atto', 'convnext_s4nd_3d_atto', dict(img_size=64, num_frames=4), 1),
    ('convnext_3d_atto', 'convnext_3d_atto', dict(img_size=64, num_frames=4), 1),
    ('convnext_s4nd_3d_atto', 'convnext_s4nd_atto', dict(img_size=64, num_frames=4), 1),  # inflated on the fly
    ('s4nd_seq_atto', 's4nd_seq_atto', dict(seq_len=64), 2),
])
def test_video_and_sequence_weights_adapt_to_other_input_channels(name, source_name, kwargs, in_chans, tmp_path,
                                                                   caplog):
    """The 3D and 1D models' first convs (Conv3d, Conv1d), which timm's loader does not adapt, follow its rule:
    one channel sums the checkpoint's filters, more repeat them scaled by checkpoint / model channels; no
    warning that the weights stay random or were loaded unchanged."""
    torch.manual_seed(0)
    source = timm.create_model(source_name)
    torch.save(source.state_dict(), tmp_path / 'source.pth')
    with caplog.at_level(logging.WARNING):
        model = timm.create_model(name, pretrained=True, in_chans=in_chans, **kwargs,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / 'source.pth')))
    assert not [r for r in caplog.records if 'stem' in r.getMessage()], caplog.text
    first_conv = 'stem' if name.startswith('s4nd_seq') else 'stem.0'
    src = source.state_dict()[f'{first_conv}.weight']
    got = model.state_dict()[f'{first_conv}.weight']
    want = src.sum(1, keepdim=True) if in_chans == 1 else src.repeat(1, 2, *[1] * (src.ndim - 2)) * src.shape[1] / 2
    torch.testing.assert_close(got.reshape(want.shape[0], in_chans, -1), want.reshape(want.shape[0], in_chans, -1))
    x = torch.randn(1, in_chans, 64) if name.startswith('s4nd_seq') else torch.randn(1, in_chans, 4, 64, 64)
    assert model(x).shape == (1, model.num_classes)


def test_sizes_and_poolings_the_models_cannot_run_are_refused_when_built():
    """An img_size no input could have (below the total stride, or off the ViT patch grid, which the forward
    refuses) and timm's class-token poolings fail at construction with the expectation, not at the first
    forward or inside a layer ('l_ref must hold positive integers') or timm's head (a bare AssertionError)."""
    with pytest.raises(ValueError, match=r'img_size must be at least 32 on each side \(the total .*\), got \(64, 16\)'):
        timm.create_model('convnext_s4nd_atto', img_size=(64, 16))
    with pytest.raises(ValueError, match=r'img_size must be positive multiples of the patch size \(16, 16\)'):
        timm.create_model('vit_s4nd_atto_patch16_224', img_size=70)
    vit = timm.create_model('vit_s4nd_atto_patch16_224', img_size=64)
    with pytest.raises(ValueError, match='positive multiples of the patch size'):
        vit.set_input_size(70)
    assert vit.img_size == (64, 64)
    for name in ('vit_s4nd_atto_patch16_224', 'convnext_s4nd_atto'):
        with pytest.raises(ValueError, match="global_pool='token' pools a class token"):
            timm.create_model(name, global_pool='token')
        with pytest.raises(ValueError, match="global_pool='map'"):
            timm.create_model(name).reset_classifier(5, 'map')


@pytest.mark.parametrize('family', [f for f in FAMILIES if f != 'seq'])
def test_img_size_that_is_not_one_or_two_positive_integers_is_refused_by_name(family):
    """Every image and video family refuses it as `img_size`, at construction and in `set_input_size`, rather than
    as an error about a layer's grid or pooling (or a KeyError); NumPy integers pass, kept as ints."""
    name, kwargs, _, _ = FAMILIES[family]
    with torch.device('meta'):
        for bad in ((64, 64, 64), 64.0, 0, (64, -64), True, '64'):
            with pytest.raises(ValueError, match=r'img_size must be a positive integer, or two \(H, W\), got '):
                timm.create_model(name, **dict(kwargs, img_size=bad))
        model = timm.create_model(name, **kwargs)
        with pytest.raises(ValueError, match=r'img_size must be a positive integer, or two \(H, W\), got 64.0'):
            model.set_input_size(64.0)
        model.set_input_size(np.int64(64))  # (timm's builder itself takes no NumPy img_size)
        assert model.img_size == (64, 64) and all(type(s) is int for s in model.img_size)


@pytest.mark.parametrize('name, kwargs, change', [
    ('vit_s4nd_atto_patch16_224', dict(img_size=64), dict(patch_size=np.int64(8))),
    ('convnext_s4nd_3d_atto', dict(img_size=32, num_frames=4), dict(num_frames=np.int64(8))),
], ids=['vit-patch_size', '3d-num_frames'])
def test_numpy_integers_for_the_other_sizes_are_kept_as_ints(name, kwargs, change, tmp_path):
    """NumPy integers given to `set_input_size` (patch_size, num_frames) are kept as Python ints: the recorded model
    args stay serializable, so timm's `save_config_for_hf` (push_to_hf_hub) still writes the model's config."""
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
        model.set_input_size(**change)
    save_config_for_hf(model, tmp_path / 'config.json')
    if 'num_frames' in change:
        assert type(model.num_frames) is int and model.num_frames == 8
    else:
        assert model.patch_embed.patch_size == (8, 8) and all(type(p) is int for p in model.patch_embed.patch_size)
        with pytest.raises(ValueError, match=r'patch_size must be a positive integer, or a pair of them, got \(0, 0'):
            timm.create_model(name, patch_size=0)
