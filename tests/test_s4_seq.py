"""The 1D sequence classifier (models/s4_seq.py): its recurrent view, sampling-rate change, training, and
sequential MNIST-5k."""
import copy
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from s4nd_vision.data import MNIST5k, SequentialMNIST5k, flatten_image
from s4nd_vision.layers import S4ND


def _model(name: str = 's4nd_seq_atto', **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kw).double().eval()


def _step_through(model, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
    state = model.default_state(x.shape[0], rate=rate)
    out = []
    for t in range(x.shape[-1]):
        y, state = model.step(x[..., t], state)
        out.append(y)
    return torch.stack(out, dim=-1)


def _smooth_signal(length: int, chans: int = 1) -> torch.Tensor:
    """A few low harmonics on [0, 1), sampled at `length` points: (1, chans, length) float64."""
    t = torch.arange(length, dtype=torch.float64) / length
    x = torch.stack([torch.sin(2 * math.pi * (3 + c) * t) + 0.5 * torch.cos(2 * math.pi * 5 * t + c)
                     for c in range(chans)])
    return x[None]


@pytest.mark.parametrize('kernel', ['s4d', 's4'])
def test_model_step_equals_convolutional_forward(kernel):
    """Stepping the whole model (stem, S4 layers, GELU, GLU, residuals, norms) sample by sample gives the
    features of the convolutional forward at every position, at the training rate and at rate 2."""
    model = _model(kernel=kernel, seq_len=48, in_chans=2, d_state=8)
    torch.manual_seed(1)
    x = torch.randn(3, 2, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(_step_through(model, x), model.forward_features(x))
        half = x[..., :24]  # 24 samples against seq_len 48: the convolution runs at rate 2
        torch.testing.assert_close(_step_through(model, half, rate=2.0), model.forward_features(half))
        # after 10 steps, the head with global_pool='last' gives the logits of position 9 of the causal forward
        model.reset_classifier(5, global_pool='last')
        state = model.default_state(3)
        for t in range(10):
            y, state = model.step(x[..., t], state)
        expected = model.forward_head(model.forward_features(x)[..., 9:10])
        torch.testing.assert_close(model.forward_head(y[..., None]), expected)
        # (and over a whole sequence it pools the final position: a one-sample slice cannot tell first from last)
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model.forward_head(features[..., -1:]))
        assert not torch.allclose(model.forward_head(features), model.forward_head(features[..., :1]))
    assert [s.shape for s in state.states] == [(3, 16, 4 if kernel == 's4d' else 8)] * 4


def test_model_step_of_a_pruned_model_uses_its_current_weights():
    """torch.nn.utils.prune recomputes a pruned conv's weight in a forward pre-hook: step read the stem's and the
    blocks' projection weights directly, as the last forward left them, stale after an update of the unpruned
    weights (features off by 0.1), where forward_features runs the hooks."""
    import torch.nn.utils.prune as prune
    model = _model(seq_len=16, d_state=4)
    convs = [model.stem] + [b.out_proj for b in model.blocks]
    for conv in convs:
        prune.l1_unstructured(conv, 'weight', amount=0.3)
    torch.manual_seed(1)
    x = torch.randn(2, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        model(x)  # (the hooks set the weights from the values before the update)
        for conv in convs:
            conv.weight_orig.mul_(1.5)
        torch.testing.assert_close(_step_through(model, x), model.forward_features(x))


def test_recurrent_view_defaults_to_the_native_length():
    """After `set_input_size`, or with weights of a model built for another length, the layers keep their reference
    length: `default_state`'s rate is relative to `seq_len`, as `forward_features` runs a sequence of seq_len
    samples (the layers' rate 1 would step another system)."""
    model = _model(seq_len=32, d_state=8)
    model.set_input_size(64)
    loaded = _model(seq_len=64, d_state=8)
    loaded.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    x = torch.randn(2, 1, 64, dtype=torch.float64)
    with torch.no_grad():
        for m in (model, loaded):
            assert m.blocks[0].mixer.l_ref == (32,)
            torch.testing.assert_close(_step_through(m, x), m.forward_features(x))
            half = x[..., :32]
            torch.testing.assert_close(_step_through(m, half, rate=2.0), m.forward_features(half))
    for rate in (None, 0, -1.0, float('nan'), (2.0,)):
        with pytest.raises(ValueError, match=r'rate must be a positive number \(seq_len / the length'):
            model.default_state(2, rate)
    for batch in (-1, 2.0, True, None):  # (a bool made a batch of 1; the others failed inside torch)
        with pytest.raises(ValueError, match=f'batch_size must be a non-negative integer, got {batch!r}'):
            model.default_state(batch)
    assert model.default_state(np.int64(3)).states[0].shape[0] == 3


def test_step_refuses_a_state_made_before_the_parameters_changed():
    """The recurrences are snapshots of the SSMs while the pointwise layers are read live: a state kept across an
    optimizer step, load_state_dict or .double() stepped old SSMs with new layers (or in float32 for a float64
    model), silently."""
    x = torch.randn(2, 1, dtype=torch.float64)
    model = _model(seq_len=16, d_state=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    changes = [
        lambda m: (m(torch.randn(2, 1, 16, dtype=torch.float64)).sum().backward(), optimizer.step()),
        lambda m: m.load_state_dict(_model(seq_len=16, d_state=4).state_dict()),
        lambda m: m.float(),
    ]
    for change in changes:
        state = model.default_state(2)
        model.step(x.to(model.stem.weight.dtype), state)  # (a fresh state steps)
        change(model)
        with pytest.raises(ValueError, match='state was made from other parameters .* make a new one'):
            model.step(x.to(model.stem.weight.dtype), state)
        model.step(x.to(model.stem.weight.dtype), model.default_state(2))


def test_recurrent_view_errors():
    x = torch.zeros(2, 1)
    with pytest.raises(ValueError, match='causal 1D'):
        _model(bidirectional=True).default_state(2)
    with pytest.raises(ValueError, match="mixer='s4nd'"):
        _model('conv_seq_tiny').default_state(2)
    with pytest.raises(ValueError, match='SSM kernel'):
        _model(kernel='sgconv').default_state(2)
    model = _model()
    state = model.default_state(2)
    with pytest.raises(ValueError, match=r'one sample \(B, 1\)'):
        model.step(torch.zeros(2, 1, 5), state)
    with pytest.raises(ValueError, match='state holds'):
        model.step(x.double(), state._replace(states=state.states[:2]))
    features, _ = model.step(x.double(), state)
    for wrong in (features, state.states, None):  # (the results swapped, the bare states: a missing attribute)
        with pytest.raises(ValueError, match=r'state must be the SeqState of default_state .* got '
                                             f'{type(wrong).__name__}'):
            model.step(x.double(), wrong)
    dtype = model.stem.weight.dtype
    with pytest.raises(ValueError, match=f"step expects x in the model's dtype {dtype}, got torch.float16"):
        model.step(x.half(), state)
    with pytest.raises(ValueError, match=r'state must be \(B, dim, N\) = \(3, .* for a batch of 3'):
        model.step(torch.zeros(3, 1, dtype=dtype), state)  # a state made for batch 2


def test_input_and_argument_errors():
    model = _model()
    with pytest.raises(ValueError, match=r'\(B, C, L\)'):
        model(torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match='input channels'):
        model(torch.zeros(1, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r'floating point input \(B, C, L\)'):
        model(torch.zeros(1, 1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r'input sides must be at least 1 .*got \(0,\)'):  # (the length, not (C, L))
        model(torch.zeros(1, 1, 0, dtype=torch.float64))
    with pytest.raises(ValueError, match='global_pool'):
        timm.create_model('s4nd_seq_atto', global_pool='token')
    with pytest.raises(ValueError, match='mixer'):
        timm.create_model('s4nd_seq_atto', mixer='attention')
    with pytest.raises(ValueError, match='seq_len'):
        model.set_input_size(0)
    model.set_input_size()  # (None keeps the length, as timm's models do)
    assert model.seq_len == 784 and model.pretrained_cfg['input_size'] == (1, 784)


def test_bandlimit_is_a_keyword_as_in_the_other_families():
    """`bandlimit=` reaches every S4ND layer; off by default (the S4 layer's), as `bandlimit=0` is."""
    def cutoffs(model):
        return {k.bandlimit for b in model.blocks for k in b.mixer.kernels}

    assert cutoffs(_model()) == cutoffs(_model(bandlimit=0)) == {None}
    assert cutoffs(_model(bandlimit=0.5)) == {0.5}
    assert cutoffs(_model(kernel='s4', bandlimit=0.5)) == {0.5}
    with pytest.raises(ValueError, match="bandlimit applies to the SSM kernels"):
        _model(kernel='sgconv', bandlimit=0.5)


def test_seq_len_takes_numpy_integers_and_refuses_bools():
    """`seq_len` is checked as the other size arguments are: NumPy integers pass (kept as ints, which a JSON
    config needs), True does not pass as 1."""
    for name in ('s4nd_seq_atto', 'conv_seq_tiny'):
        for bad in (True, 64.0, 0):
            with pytest.raises(ValueError, match=f'seq_len must be a positive integer, got {bad!r}'):
                timm.create_model(name, seq_len=bad)
    model = timm.create_model('s4nd_seq_atto', seq_len=np.int64(50))
    assert type(model.seq_len) is int and model.pretrained_cfg['input_size'] == (1, 50)
    json.dumps(model.pretrained_cfg)
    model.set_input_size(np.int64(64))
    assert type(model.seq_len) is int and model.pretrained_cfg['input_size'] == (1, 64)
    with pytest.raises(ValueError, match='seq_len must be a positive integer, got True'):
        model.set_input_size(True)


def test_baselines_refuse_what_their_s4nd_twins_refuse():
    """The conv baselines (no S4ND layer to object) check the S4ND keywords as their twins do, and the sequence
    model's `bidirectional` is a bool whatever the mixer: 'false' would build a two-sided conv for a causal one."""
    bad = [(dict(kernel='bogus'), r"kernel must be one of \('s4d', 's4', 'sgconv'\), got 'bogus'"),
           (dict(ssm_init='bogus'), r"ssm_init must be one of \('lin', 'inv', 'legs'\) for kernel='s4d'"),
           (dict(d_state=3), 'd_state must be a positive even integer, got 3'),
           (dict(dt_min=-1.0), r'need finite 0 < dt_min <= dt_max, got dt_min=-1.0'),
           (dict(bandlimit=-1), 'bandlimit must be a positive cut-off, or 0 or None for off, got -1'),
           (dict(bandlimit='x'), "bandlimit must be a positive cut-off, or 0 or None for off, got 'x'"),
           (dict(kernel='sgconv', bandlimit=0.5),
            r"bandlimit applies to the SSM kernels \('s4d', 's4'\), got kernel='sgconv'")]
    with torch.device('meta'):
        for name in ('conv_seq_tiny', 'conv_iso_tiny', 'convnext_3d_atto', 's4nd_seq_atto', 'convnext_s4nd_atto',
                     's4nd_iso_tiny', 'vit_s4nd_tiny_patch16_224'):
            for kwargs, match in bad:
                with pytest.raises(ValueError, match=match):
                    timm.create_model(name, **kwargs)
        for name in ('conv_seq_tiny', 's4nd_seq_atto'):
            with pytest.raises(ValueError, match=r"bidirectional must be a bool \(False: causal\), got 'false'"):
                timm.create_model(name, bidirectional='false')
        assert timm.create_model('conv_seq_tiny').blocks[0].mixer[0].padding == (8, 0)  # (causal: past samples)


def test_dim_is_checked_at_construction():
    """dim=2.5 failed inside a conv ('out_channels must be divisible by groups'), True inside torch.empty, 0 in the
    conv baseline as 'groups must be a positive integer'."""
    for name in ('conv_seq_tiny', 's4nd_seq_atto', 'conv_iso_tiny', 's4nd_iso_tiny'):
        for bad in (0, 2.5, True):
            with pytest.raises(ValueError, match=f'dim must be a positive integer, got {bad!r}'):
                timm.create_model(name, dim=bad)
    assert timm.create_model('s4nd_seq_atto', dim=np.int64(8)).num_features == 8


def test_conv_kernel_size_is_checked_at_construction():
    """A conv_kernel_size of 0 built a model that failed only at its first forward, in oneDNN; True built a 1-tap
    conv. Checked for every mixer, as the S4ND keywords are for the conv baseline."""
    for name in ('conv_seq_tiny', 's4nd_seq_atto'):
        for bad in (0, -1, True, 2.5):
            with pytest.raises(ValueError, match=f'conv_kernel_size must be a positive integer, got {bad!r}'):
                timm.create_model(name, conv_kernel_size=bad)
    assert timm.create_model('conv_seq_tiny', conv_kernel_size=np.int64(3)).blocks[0].mixer[1].kernel_size == (3,)


@pytest.mark.parametrize('bidirectional', [False, True])
def test_half_sampling_rate_matches_to_interpolation_error(bidirectional):
    """A smooth signal at half the sampling rate: with the rate following the input (kernels referenced to
    seq_len), the features match the full-rate features at the shared instants to a few percent; run at
    rate 1 (the half-rate length made the reference), they do not match at all."""
    model = _model(seq_len=512, bidirectional=bidirectional, d_state=16, dt_max=0.02, num_classes=0)
    x = _smooth_signal(512)
    with torch.no_grad():
        full = model.forward_features(x)[..., ::2]
        half = model.forward_features(x[..., ::2])
        for m in model.modules():
            if isinstance(m, S4ND):
                m.set_reference_size(256)
        half_rate1 = model.forward_features(x[..., ::2])
    scale = full.abs().max()
    assert (half - full).abs().max() / scale < 0.08
    assert (half_rate1 - full).abs().max() / scale > 0.5


def test_layer_rate_two_on_half_rate_signal():
    """The same for one S4ND layer without l_ref, given rate=2 explicitly."""
    torch.manual_seed(0)
    layer = S4ND(4, ndim=1, d_state=16, dt_max=0.02, bidirectional=False).double()
    x = _smooth_signal(512, chans=4)
    with torch.no_grad():
        full = layer(x)[..., ::2]
        half = layer(x[..., ::2], rate=2.0)
        half_rate1 = layer(x[..., ::2])
    scale = full.abs().max()
    assert (half - full).abs().max() / scale < 0.05
    assert (half_rate1 - full).abs().max() / scale > 0.5


@pytest.mark.parametrize('name,kw', [('s4nd_seq_atto', {}), ('s4nd_seq_atto', dict(kernel='sgconv')),
                                     ('conv_seq_tiny', dict(dim=16))])
def test_classifier_trains_a_few_steps(name, kw):
    """Two classes of noisy tones (low vs high frequency): the loss falls over 20 Adam steps."""
    torch.manual_seed(0)
    length, n = 64, 32
    labels = torch.arange(n) % 2
    t = torch.arange(length) / length
    freq = torch.where(labels == 0, 2.0, 9.0)[:, None]
    x = torch.sin(2 * math.pi * freq * t + torch.rand(n, 1) * 6.28) + 0.3 * torch.randn(n, length)
    model = timm.create_model(name, seq_len=length, num_classes=2, **kw)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x[:, None]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


def test_sequential_mnist_5k():
    images = MNIST5k('val')
    seqs = SequentialMNIST5k('val')
    assert len(seqs) == len(images) == 1000
    torch.testing.assert_close(seqs[3][0], flatten_image(images[3][0]))  # raster order of the same digit
    assert seqs[3][1] == images[3][1] and seqs[3][0].shape == (1, 784)
    half = SequentialMNIST5k('val', cols=14, transform=lambda s: s * 2)
    assert half[3][0].shape == (1, 392) and half.rows == 28
    # each row resampled on its own: row r of the half-rate sequence is row r of the 28 x 14 image
    row = F.interpolate(images.images[3:4], size=(28, 14), mode='bilinear', antialias=True, align_corners=False)
    torch.testing.assert_close(half[3][0][0, 14:28], 2 * row[0, 0, 1].clamp(0, 1))
    with pytest.raises(ValueError, match='cols'):
        SequentialMNIST5k(cols=0)
    with pytest.raises(ValueError, match='split'):
        SequentialMNIST5k('test')
    with pytest.raises(ValueError, match=r'\(C, H, W\)'):
        flatten_image(torch.zeros(28, 28))


def test_sequential_mnist_experiment_runs_small(monkeypatch):
    import timm

    from s4nd_vision.eval.sequential import format_table, run_sequential_mnist
    logged, built, create = [], [], timm.create_model
    monkeypatch.setattr(timm, 'create_model', lambda name, **kw: built.append((name, kw)) or create(name, **kw))
    models = ('s4nd_seq_atto', 's4nd_seq_atto,kernel=sgconv,d_state=4', 'conv_seq_tiny')  # (its own arguments too)
    rows = run_sequential_mnist(models=models, rows=4, cols=4, epochs=1, batch_size=25, train_limit=50,
                                model_kwargs=dict(dim=8, depth=1), log=logged.append)
    assert [r['model'] for r in rows] == list(models)
    common = dict(in_chans=1, num_classes=10, seq_len=16, dim=8, depth=1)
    expected = [('s4nd_seq_atto', common), ('s4nd_seq_atto', dict(common, kernel='sgconv', d_state=4)),
                ('conv_seq_tiny', common)]
    assert built == expected * 2  # (each built once before any trains: a bad one fails first)
    for row in rows:
        assert row['train_len'] == 16 and [k for k in row if k.startswith('acc@')] == ['acc@8', 'acc@16', 'acc@32']
        assert all(0 <= row[k] <= 1 for k in ('acc@8', 'acc@16', 'acc@32'))
    assert any('epoch 1/1' in line for line in logged)
    table = format_table(rows).splitlines()
    assert table[0] == '| model | 8 samples | 16 samples (train) | 32 samples |' and len(table) == 5
    with pytest.raises(ValueError, match='cols must be a positive even number'):
        run_sequential_mnist(cols=7)
    with pytest.raises(ValueError, match='key=value'):
        run_sequential_mnist(models=('s4nd_seq_atto', 's4nd_seq_atto,sgconv'))


def test_sequential_mnist_takes_numpy_integers_and_refuses_bools():
    """Sizes from NumPy (a sweep over np.arange) were refused as 'rows must be a positive integer, got
    np.int64(4)'; True passed as 1. The rows' lengths come back as Python ints (JSON)."""
    from s4nd_vision.eval.sequential import run_sequential_mnist
    seqs = SequentialMNIST5k('val', rows=np.int64(4), cols=np.int64(6))
    assert (seqs.rows, seqs.cols) == (4, 6) and type(seqs.rows) is int and seqs[0][0].shape == (1, 24)
    torch.testing.assert_close(seqs[0][0], SequentialMNIST5k('val', rows=4, cols=6)[0][0])
    assert MNIST5k('val', img_size=np.int64(14))[0][0].shape == (1, 14, 14)
    for kwargs in (dict(rows=True), dict(cols=4.0)):
        with pytest.raises(ValueError, match=r'(rows|cols) must be a positive integer, got (True|4\.0)'):
            SequentialMNIST5k('val', **kwargs)
    with pytest.raises(ValueError, match='img_size must be a positive integer, got True'):
        MNIST5k('val', img_size=True)
    rows = run_sequential_mnist(models=('conv_seq_tiny',), rows=np.int64(2), cols=np.int64(2), epochs=1,
                                batch_size=25, train_limit=25, model_kwargs=dict(dim=8, depth=1), log=print)
    assert rows[0]['train_len'] == 4 and type(rows[0]['train_len']) is int
    json.dumps(rows)


def test_sequential_mnist_refuses_learning_rates_that_train_nothing():
    """A NaN or negative --ssm-lr is refused before any training: AdamW checks only its default lr, so the SSM
    group trained on with NaN weights and the table showed chance accuracy without an error."""
    from s4nd_vision.eval.sequential import run_sequential_mnist
    for key, value in (('ssm_lr', float('nan')), ('ssm_lr', -1e-3), ('lr', float('inf')), ('lr', 0.0)):
        with pytest.raises(ValueError, match=f'{key} must be a positive finite number'):
            run_sequential_mnist(models=('conv_seq_tiny',), **{key: value})


def test_sequential_mnist_train_limit_keeps_every_class(monkeypatch):
    """`train_limit` trains on digits chosen by the seed: the split is sorted by class, so its first 100 digits would
    all be zeros. The validation digits are the same for every seed."""
    from s4nd_vision.eval import sequential
    trained = []
    loader = sequential.DataLoader
    monkeypatch.setattr(sequential, 'DataLoader', lambda data, **kw: trained.append(data) or loader(data, **kw))
    for seed in (0, 1):
        sequential.run_sequential_mnist(models=('conv_seq_tiny',), rows=4, cols=4, epochs=1, batch_size=25,
                                        train_limit=100, model_kwargs=dict(dim=8, depth=1), seed=seed, log=print)
    first, second = trained[0], trained[4]  # (each run: its training loader, then one per test length)
    assert len(first) == len(second) == 100
    assert len({first[i][1] for i in range(100)}) == 10
    assert first.indices != second.indices  # another seed, other digits
    for a, b in zip(trained[1:4], trained[5:8]):  # and one validation split for every seed (it took the seed's)
        assert len(a) == len(b) and all(torch.equal(a[i][0], b[i][0]) for i in range(0, len(a), 7))


def test_seq_mnist_command_prints_the_table_and_writes_json(tmp_path, capsys):
    """`s4nd-vision seq-mnist` (= tools/seq_mnist.py) runs the experiment above and writes its rows."""
    import json

    from s4nd_vision.cli import tool_main
    out = tmp_path / 'rows' / 'seq.json'
    rows = tool_main('seq-mnist', ['--models', 's4nd_seq_atto', '--rows', '4', '--cols', '4', '--epochs', '1',
                                   '--batch-size', '25', '--train-limit', '50', '--json', str(out)])
    assert [r['model'] for r in rows] == ['s4nd_seq_atto'] and rows[0]['train_len'] == 16
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('s4nd_seq_atto epoch 1/1: train loss ')  # the progress log, then the table
    assert lines[-3] == '| model | 8 samples | 16 samples (train) | 32 samples |'
    assert lines[-1].startswith('| `s4nd_seq_atto` | ')
    with open(out) as f:
        assert json.load(f) == rows


def test_drop_path_rate_is_timms_stochastic_depth():
    """drop_path_rate (timm's train.py --drop-path) rises linearly over the blocks' residual branches; in eval the
    model computes what it computes without it, and in training it drops whole samples' branches."""
    torch.manual_seed(0)
    plain = timm.create_model('s4nd_seq_atto', seq_len=32)
    model = timm.create_model('s4nd_seq_atto', seq_len=32, drop_path_rate=0.3)
    model.load_state_dict(plain.state_dict())
    probs = [getattr(b.drop_path, 'drop_prob', 0.0) for b in model.blocks]
    assert probs == pytest.approx([0.3 * i / (len(probs) - 1) for i in range(len(probs))])
    x = torch.randn(8, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
        assert not torch.allclose(model.train()(x), plain.train()(x))


def _scale_shared_parameters(model) -> None:
    """An optimizer step of another process that shares the model's memory (a learner's, `share_memory()`)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)


def test_step_refuses_a_state_made_before_another_process_changed_the_shared_parameters():
    """Version counters are per process: a worker stepping a model shared with a learner (`share_memory()`) stepped
    a state made before the learner's optimizer step, old SSMs with new pointwise layers, silently (as a write through
    `.data` did)."""
    x = torch.randn(2, 1, dtype=torch.float64)
    model = _model(seq_len=16, d_state=4).share_memory()
    state = model.default_state(2)
    model.step(x, state)
    learner = torch.multiprocessing.get_context('fork').Process(target=_scale_shared_parameters, args=(model,))
    learner.start()
    learner.join(60)
    assert learner.exitcode == 0
    with pytest.raises(ValueError, match='state was made from other parameters .* make a new one'):
        model.step(x, state)
    state = model.default_state(2)
    with torch.no_grad():
        model.blocks[0].mixer.D.data.mul_(2)  # (a write the version counters miss in this process too)
    with pytest.raises(ValueError, match='state was made from other parameters'):
        model.step(x, state)
    # a state sent to a worker steps its copy of the same parameters (other storage; refused before)
    state = model.default_state(2)
    torch.testing.assert_close(copy.deepcopy(model).step(x, state)[0], model.step(x, state)[0], rtol=0, atol=0)


def test_step_refuses_a_state_made_before_the_reference_grid_changed():
    """A state's SSMs step at the rate of the layers' reference grid when it was made: a load of weights saved with
    another grid (here the same values, from a model of another length) makes `forward_features` run at another rate,
    and stepping the old state gave other features silently (made_from compared parameters and band-limits only)."""
    model, longer = _model(seq_len=16, d_state=4), _model(seq_len=32, d_state=4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), longer.parameters()))
    x = torch.randn(2, 1, dtype=torch.float64)
    state = model.default_state(2)
    model.load_state_dict(longer.state_dict())
    assert model.blocks[0].mixer.l_ref == (32,)
    with pytest.raises(ValueError, match='state was made from other parameters'):
        model.step(x, state)
    seq = torch.randn(2, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(_step_through(model, seq), model.forward_features(seq))


def test_sequential_mnist_scores_non_finite_logits_as_misses(monkeypatch):
    """A model whose logits are NaN at the double length was scored by argmax, which ranks a NaN first: about 10%
    (the share of class 0), read as chance; now every such sequence is a miss, warned about."""
    import timm
    import torch.nn as nn

    from s4nd_vision.eval.sequential import run_sequential_mnist
    create = timm.create_model

    class NanAtDouble(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.inner = create('conv_seq_tiny', **kwargs)

        def forward(self, x):
            out = self.inner(x)
            return out * float('nan') if x.shape[-1] > 16 else out

    monkeypatch.setattr(timm, 'create_model', lambda name, **kw: NanAtDouble(**kw))
    with pytest.warns(RuntimeWarning, match=r'conv_seq_tiny at 32 samples: 1000 of 1000 sequences gave non-finite'):
        (row,) = run_sequential_mnist(models=('conv_seq_tiny',), rows=4, cols=4, epochs=1, batch_size=25,
                                      train_limit=50, model_kwargs=dict(dim=8, depth=1), log=lambda s: None)
    assert row['acc@32'] == 0 and row['acc@16'] > 0


def test_sequential_mnist_refuses_a_string_of_models_and_non_integer_counts():
    """A single name as `models` was iterated letter by letter ("Unknown model (s)"); a float epochs or train_limit
    passed the checks and failed in range() or indexing after the data and models were built."""
    from s4nd_vision.eval.sequential import run_sequential_mnist
    with pytest.raises(ValueError, match=r"models must be a sequence of model names .* got the string 'conv_seq_tiny'"):
        run_sequential_mnist(models='conv_seq_tiny')
    for key, value in (('epochs', 1.5), ('epochs', True), ('train_limit', 50.0), ('batch_size', 25.0)):
        with pytest.raises(ValueError, match=f'{key} must be a positive (integer|number of digits), got {value!r}'):
            run_sequential_mnist(models=('conv_seq_tiny',), rows=4, cols=4, **dict(
                dict(epochs=1, batch_size=25, train_limit=50), **{key: value}))
