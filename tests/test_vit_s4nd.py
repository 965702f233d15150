"""ViT-S4ND specifics: registration, the two token layouts, resolution control, checkpoints, optimizer groups, errors.

The generic timm contract (backward to every parameter, features, intermediates, bf16, compile,
meta device) is checked for both modes in test_timm_compliance.py.
"""
import importlib.resources
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from stacking import count_generation_calls, step_with_and_without_stacking
from timm.optim import create_optimizer_v2

import s4nd_vision  # noqa: F401
from s4nd_vision.deploy import save_for_hf
from s4nd_vision.layers import S4ND, S4Kernel
from s4nd_vision.train.config import load_config, packaged_configs
from s4nd_vision.train.optim import ssm_param_names

ATTO = 'vit_s4nd_atto_patch16_224'
MODES = ('2d', '1d')


def _atto(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ATTO, **kwargs)


def test_registered_with_timm():
    names = timm.list_models('vit_s4nd_*')
    assert names == sorted(f'vit_s4nd_{s}_patch16_224' for s in ('atto', 'tiny', 'small', 'base'))
    cfg = timm.get_pretrained_cfg('vit_s4nd_small_patch16_224')
    assert cfg.input_size == (3, 224, 224) and cfg.first_conv == 'patch_embed.proj' and cfg.classifier == 'head.fc'


@pytest.mark.parametrize('mode, ndim, l_ref', [('2d', 2, (14, 10)), ('1d', 1, (140,))])
def test_token_layouts_reference_the_training_grid(mode, ndim, l_ref):
    model = _atto(token_layout=mode, img_size=(224, 160))
    layers = [m for m in model.modules() if isinstance(m, S4ND)]
    assert len(layers) == len(model.blocks)
    assert all(m.ndim == ndim and m.l_ref == l_ref for m in layers)
    # no position embedding, no class token: the S4ND layers are the only source of position
    assert not any('pos_embed' in n or 'cls_token' in n for n, _ in model.named_parameters())


@pytest.mark.parametrize('mode', MODES)
def test_runs_at_new_and_non_square_resolutions(mode):
    model = _atto(token_layout=mode, num_classes=5).eval()
    with torch.no_grad():
        for size in ((224, 224), (160, 160), (288, 288), (224, 160), (160, 224)):
            features = model.forward_features(torch.randn(1, 3, *size))
            assert features.shape == (1, 64, size[0] // 16, size[1] // 16)
            assert torch.isfinite(features).all()
            assert model.forward_head(features).shape == (1, 5)


def test_2d_layout_uses_the_grid_1d_layout_only_the_raster_order():
    """Re-arranging the same raster sequence as a single row changes nothing in '1d' mode and
    everything in '2d' mode: the grid shape reaches the 2D mixer, not just the token count."""
    x = torch.randn(2, 6, 5, 64)  # (B, Hp, Wp, C)
    as_row = x.reshape(2, 1, 30, 64)
    with torch.no_grad():
        for mode in MODES:
            mixer = _atto(token_layout=mode, img_size=(96, 80)).blocks[0].mixer
            out, out_row = mixer(x), mixer(as_row).reshape(x.shape)
            if mode == '1d':
                torch.testing.assert_close(out_row, out)
            else:
                assert not torch.allclose(out_row, out, atol=1e-3)


def test_drop_path_rate_rises_linearly_over_the_blocks_as_timms_vit():
    """drop_path_rate (timm's --drop-path): both residual branches of block i drop with rate i / (depth - 1) times
    it, as in timm's ViT."""
    with torch.device('meta'):
        model = timm.create_model(ATTO, depth=5, drop_path_rate=0.2)
    expected = pytest.approx([0.2 * i / 4 for i in range(5)])
    for branch in ('drop_path1', 'drop_path2'):
        assert [getattr(getattr(b, branch), 'drop_prob', 0.0) for b in model.blocks] == expected


@pytest.mark.parametrize('mode', MODES)
def test_block_is_pre_norm_with_both_residuals(mode):
    """A block adds its mixer's and its MLP's outputs to the token stream (pre-norm ViT): x + mixer(norm1(x)), then
    the same with the MLP; neither branch replaces the stream. The '2d' mixer's S4ND layer sees the token grid as
    (B, C, Hp, Wp), not transposed."""
    block = _atto(token_layout=mode).blocks[0].eval()
    x = torch.randn(2, 4, 3, block.norm1.normalized_shape[0])  # (B, Hp, Wp, C)
    seen = []  # the S4ND layer's input: the (Hp, Wp) grid, channels first, or the raster sequence
    block.mixer.s4nd.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        mixed = x + block.mixer(block.norm1(x))
        torch.testing.assert_close(block(x), mixed + block.mlp(block.norm2(mixed)))
    assert seen[0] == ((2, x.shape[-1], 4, 3) if mode == '2d' else (2, x.shape[-1], 12))


@pytest.mark.parametrize('mode', MODES)
def test_set_input_size_sets_the_patch_grid_and_keeps_the_reference_grids(mode):
    """(Function preservation: tests/test_input_size.py.)"""
    trained_64 = _atto(token_layout=mode, img_size=64).eval()
    reference = trained_64.blocks[0].mixer.s4nd.l_ref
    trained_64.set_input_size(96)
    assert trained_64.img_size == (96, 96) and trained_64.patch_embed.grid_size == (6, 6)
    trained_64.set_input_size(None)  # timm's meaning: keep the size
    assert trained_64.img_size == (96, 96) and trained_64.patch_embed.grid_size == (6, 6)
    assert trained_64.blocks[0].mixer.s4nd.l_ref == reference == ((4, 4) if mode == '2d' else (16,))
    with pytest.raises(ValueError, match='img_size'):
        trained_64.set_input_size(8)


def test_set_input_size_resamples_the_patch_embedding(tmp_path):
    """timm's `set_input_size(patch_size=)`: a 32 px patch on a 2x image sees what the 16 px patch saw (FlexiViT's
    resampling is exact for a patch resized as it assumes), on the same token grid; the change is saved."""
    model = _atto(img_size=64, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    model.set_input_size(128, patch_size=32)
    assert model.patch_embed.patch_size == (32, 32) and model.patch_embed.grid_size == (4, 4)
    assert [i['reduction'] for i in model.feature_info] == [32] * len(model.blocks)
    assert model.pretrained_cfg['input_size'] == (3, 128, 128) and model.pretrained_cfg['pool_size'] == (4, 4)
    # each 16 px patch resized to 32 px on its own, as the resampling's pseudo-inverse assumes
    patches = rearrange(x, 'b c (h p) (w q) -> (b h w) c p q', p=16, q=16)
    patches = F.interpolate(patches, size=(32, 32), mode='bicubic', antialias=True)
    x_128 = rearrange(patches, '(b h w) c p q -> b c (h p) (w q)', b=2, h=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x_128), expected, atol=2e-4, rtol=1e-3)
    with pytest.raises(ValueError, match='multiples of the patch size'):
        model.set_input_size(96, patch_size=64)
    with pytest.raises(ValueError, match='square'):
        model.set_input_size(128, patch_size=(32, 16))

    save_for_hf(model, str(tmp_path))
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert loaded.patch_embed.patch_size == (32, 32) and loaded.img_size == (128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_128), model(x_128))


def test_intermediates_nlc_are_the_nchw_grid_in_raster_order():
    model = _atto().eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        nchw = model.forward_intermediates(x, indices=2, intermediates_only=True)
        nlc = model.forward_intermediates(x, indices=2, output_fmt='NLC', norm=True, intermediates_only=True)
    assert [t.shape for t in nchw] == [(1, 64, 4, 6)] * 2
    assert [t.shape for t in nlc] == [(1, 24, 64)] * 2
    torch.testing.assert_close(model.norm(nchw[-1].flatten(2).transpose(1, 2)), nlc[-1])
    with pytest.raises(ValueError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NHWC')


def test_unpooled_head_gives_logits_per_token():
    """global_pool='' (timm's meaning: no pooling) classifies every token, (B, num_classes, H/p, W/p)."""
    torch.manual_seed(0)
    model = timm.create_model('vit_s4nd_atto_patch16_224', num_classes=5, global_pool='').eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features, logits = model.forward_features(x), model(x)
        expected = torch.einsum('bchw,kc->bkhw', features, model.head.fc.weight) + model.head.fc.bias[:, None, None]
        torch.testing.assert_close(logits, expected)
        assert model.forward_head(features, pre_logits=True).shape == features.shape
        model.reset_classifier(5, 'avg')  # (a new classifier)
        torch.testing.assert_close(model(x), model.head.fc(features.mean((2, 3))))


@pytest.mark.parametrize('global_pool', ['avg', 'catavgmax', ''])
def test_head_takes_timm_vit_tokens(global_pool):
    """forward_head takes the (B, N, C) tokens of forward_intermediates(output_dict=True), as timm's ViT does: the
    same logits as from the (B, C, H/p, W/p) features, per token (B, N, num_classes) without pooling."""
    model = _atto(num_classes=5, global_pool=global_pool).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        tokens = model.forward_intermediates(x, indices=1, output_dict=True)['image_features']
        expected = model.forward_head(model.forward_features(x))
        out = model.forward_head(tokens)
    expected = expected if global_pool else rearrange(expected, 'b k h w -> b (h w) k')
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match=r'forward_head takes features \(B, C, H/p, W/p\).*got shape \(24, 64\)'):
        model.forward_head(tokens[0])
    with warnings.catch_warnings():  # (torch's is_fx_tracing warned at every forward, and is true under export)
        warnings.simplefilter('error')
        model(x)
    head = torch.export.export(_Head(model), (tokens,))  # (the token branch under export too)
    torch.testing.assert_close(head.module()(tokens), out)


class _Head(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.forward_head(tokens)


def test_pretrained_from_local_safetensors(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model('vit_s4nd_small_patch16_224').eval()
    path = tmp_path / 'vit_s4nd_small.safetensors'
    save_file(source.state_dict(), str(path))
    torch.manual_seed(1)
    loaded = timm.create_model(
        'vit_s4nd_small_patch16_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


@pytest.mark.parametrize('mode', MODES)
def test_ssm_params_without_weight_decay_and_layer_decay_groups(mode):
    model = _atto(token_layout=mode)
    ssm_names = set(ssm_param_names(model))
    assert ssm_names and model.no_weight_decay() == ssm_names
    ssm_params = {id(p) for n, p in model.named_parameters() if n in ssm_names}
    # layer-wise lr decay through group_matcher: one scale per block (plus stem and head), SSM params undecayed
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scales = {g['lr_scale'] for g in opt.param_groups}
    assert len(scales) == len(model.blocks) + 2 and max(scales) == 1.0
    for group in opt.param_groups:
        if any(id(p) in ssm_params for p in group['params']):
            assert group['weight_decay'] == 0.0
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


def test_bad_input_errors():
    model = _atto()
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match='3 input channels'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='floating point input.*torch.int64'):
        model(torch.randint(0, 255, (1, 3, 64, 64)))
    with pytest.raises(ValueError, match='multiples of the patch size'):
        model(torch.randn(1, 3, 64, 72))
    with pytest.raises(ValueError, match='multiples of the patch size'):
        model(torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match='token_layout'):
        timm.create_model(ATTO, token_layout='3d')
    with pytest.raises(ValueError, match='img_size'):
        timm.create_model(ATTO, img_size=8)


@pytest.mark.parametrize('patch_size', [(32, 32), [32, 32]])
def test_patch_size_as_a_pair(patch_size):
    """A square (h, w) patch size (a YAML list too) builds, as timm's ViT takes it; an oblong one is refused."""
    model = _atto(patch_size=patch_size, img_size=64).eval()
    assert model.patch_embed.patch_size == (32, 32) and model.feature_info[-1]['reduction'] == 32
    assert model.pretrained_cfg['pool_size'] == (2, 2)
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 96)).shape == (1, 64, 2, 3)
    with pytest.raises(ValueError, match=r'patch_size must be square.*\(16, 8\)'):
        timm.create_model(ATTO, patch_size=(16, 8), img_size=64)


@pytest.mark.parametrize('feature_cls', ['fx', 'hook'])
def test_block_feature_wrappers_state_channels_last(feature_cls):
    """The wrappers that return the blocks' outputs as they are say so (NHWC, as timm's Swin); the default getter
    gives the intermediates channels first."""
    x = torch.randn(1, 3, 64, 96)
    raw = _atto(features_only=True, feature_cls=feature_cls).eval()
    getter = _atto(features_only=True).eval()
    with torch.no_grad():
        out, nchw = raw(x)[-1], getter(x)[-1]
    assert raw.output_fmt.value == 'NHWC' and out.shape == (1, 4, 6, raw.feature_info.channels()[-1])
    assert getter.output_fmt.value == 'NCHW' and nchw.shape == (1, 64, 4, 6)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), nchw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mode', ['2d', '1d'])
def test_training_step_generates_all_blocks_kernels_together(monkeypatch, mode):
    """All blocks' kernels come from one stacked call (2d on a 4x6 grid: two kernel lengths); outputs and
    gradients equal the block-by-block generation (one call per block)."""
    torch.manual_seed(0)
    model = timm.create_model('vit_s4nd_atto_patch16_224', token_layout=mode)
    calls = count_generation_calls(monkeypatch)
    stacked, per_layer = step_with_and_without_stacking(monkeypatch, model, torch.randn(2, 3, 64, 96), calls)
    assert stacked[2] == 1 and per_layer[2] == len(model.blocks)
    # a backbone (features_only, forward_intermediates) too, with the blocks it runs
    from s4nd_vision.layers import s4nd
    monkeypatch.setattr(s4nd, 'kernels_can_be_prepared', lambda module: True)  # (as in a CPU training step)
    features = timm.create_model('vit_s4nd_atto_patch16_224', token_layout=mode, features_only=True)
    calls.clear()
    sum(out.square().sum() for out in features(torch.randn(2, 3, 64, 96))).backward()
    assert len(calls) == 1


def test_intermediates_as_a_dict_as_timm_vit_gives_them():
    """The dict has timm's ViT keys and layouts (its encoders read 'image_features' as tokens, (B, N, C)); the tuple's
    final features are `forward_features`'s, (B, C, H/p, W/p), which the head and features_only take."""
    model = _atto().eval()
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, depth=2, class_token=False, global_pool='avg',
                            dynamic_img_size=True).eval()
    assert model.num_prefix_tokens == vit.num_prefix_tokens == 0
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, indices=2)
        out = model.forward_intermediates(x, indices=2, output_dict=True, return_prefix_tokens=True)
        only = model.forward_intermediates(x, indices=2, output_dict=True, intermediates_only=True)
        timm_out = vit.forward_intermediates(x, indices=2, output_dict=True)
        torch.testing.assert_close(final, model.forward_features(x))
    assert set(out) == set(timm_out) == {'image_intermediates', 'image_features'}
    assert set(only) == {'image_intermediates'}
    assert out['image_features'].shape == timm_out['image_features'].shape[:2] + (64,) == (1, 24, 64)
    torch.testing.assert_close(out['image_features'], final.flatten(2).transpose(1, 2))  # raster order
    assert [t.shape[2:] for t in out['image_intermediates']] == [t.shape[2:] for t in timm_out['image_intermediates']]
    for got in (out['image_intermediates'], only['image_intermediates']):
        assert len(got) == 2
        for a, b in zip(got, intermediates):
            torch.testing.assert_close(a, b)


def test_dynamic_img_size_and_pad_have_timm_vit_meanings():
    torch.manual_seed(0)
    kw = dict(img_size=64, num_classes=0)
    dynamic = timm.create_model('vit_s4nd_atto_patch16_224', dynamic_img_size=True, **kw).eval()
    assert dynamic.dynamic_img_size and dynamic(torch.randn(1, 3, 96, 80)).shape == (1, dynamic.num_features)
    fixed = timm.create_model('vit_s4nd_atto_patch16_224', dynamic_img_size=False, **kw).eval()
    fixed.load_state_dict(dynamic.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), dynamic(x))
    with pytest.raises(AssertionError, match=r"Input height \(96\) doesn't match model \(64\)"):
        fixed(torch.randn(1, 3, 96, 64))
    padded = timm.create_model('vit_s4nd_atto_patch16_224', dynamic_img_pad=True, **kw).eval()
    padded.load_state_dict(dynamic.state_dict())
    x = torch.randn(1, 3, 70, 50)  # padded on the bottom and right to 80 x 64
    with torch.no_grad():
        torch.testing.assert_close(padded(x), dynamic(torch.nn.functional.pad(x, (0, 14, 0, 10))))
    with pytest.raises(ValueError, match='multiples of the patch size'):
        dynamic(x)


@pytest.mark.parametrize('name', [n for n in packaged_configs() if n.startswith('imagenet/vit_s4nd_')])
def test_configs_override_builds_the_published_1d_s4_layer(name, tmp_path):
    """The override the ViT configs' header gives builds the research run's layer (state-spaces/s4,
    vit_b_16_s4_imagenet_v2 with layer s4nd): S4's DPLR kernel (HiPPO-LegS) over the raster sequence, d_state 64,
    dt in [0.001, 0.1], no band-limit."""
    text = importlib.resources.files('s4nd_vision').joinpath('configs', *name.split('/')).read_text()
    header = [line for line in text.splitlines() if "'model.kwargs=" in line]
    assert len(header) == 1
    cfg = load_config(name, [header[0].strip('# \''), f'data.root={tmp_path}'])
    assert cfg.model.kwargs == dict(token_layout='1d', kernel='s4', ssm_init='legs')
    torch.manual_seed(0)
    model = timm.create_model(cfg.model.name, depth=1, **cfg.model.kwargs)
    layer = model.blocks[0].mixer.s4nd
    assert layer.ndim == 1 and layer.kernel == 's4' and all(layer.bidirectional)
    (kernel,) = layer.kernels
    assert isinstance(kernel, S4Kernel) and kernel.d_state == 64 and kernel.bandlimit is None
    assert (kernel.dt_min, kernel.dt_max) == (0.001, 0.1)
    assert 0.001 <= kernel.log_dt.exp().min() and kernel.log_dt.exp().max() <= 0.1
    model(torch.randn(2, 3, 64, 96)).square().mean().backward()  # (a training step, its kernels stacked)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_intermediates_arguments_in_timm_vit_order():
    """A positional call written for timm's ViT (x, indices, return_prefix_tokens, norm, stop_early, output_fmt,
    intermediates_only, output_dict) means the same here."""
    model = _atto().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        positional = model.forward_intermediates(x, [0], False, True, True, 'NLC', True, True)
        named = model.forward_intermediates(x, indices=[0], return_prefix_tokens=False, norm=True, stop_early=True,
                                            output_fmt='NLC', intermediates_only=True, output_dict=True)
    assert set(positional) == {'image_intermediates'} and positional['image_intermediates'][0].shape == (1, 16, 64)
    torch.testing.assert_close(positional, named)


def test_1d_weights_of_another_aspect_name_a_size_of_whole_patches():
    """'1d' weights hold a sequence length, which a model of another aspect maps to a square-root scale: rounded to
    whole patches, the size is one the model takes (eval-resolution sets the model to it)."""
    with torch.device('meta'):
        trained = _atto(img_size=(224, 160), token_layout='1d')
        model = _atto(img_size=224, token_layout='1d')
    model.load_state_dict(trained.state_dict(), assign=True)
    size = model.reference_img_size()
    assert size == (192, 192)
    model.set_input_size(size)


def test_reference_img_size_without_blocks_is_the_img_size():
    """A ViT-S4ND of depth 0 (patch embedding, norm, head: no S4ND layer) answers its `img_size`, as the models
    without S4ND layers do, where it failed with an IndexError (eval-resolution and export read it for weights)."""
    model = _atto(img_size=(32, 48), depth=0)
    assert model.reference_img_size() == (32, 48)
