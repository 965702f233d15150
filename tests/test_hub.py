"""Sharing weights in timm's Hub format: the config and model card say to install and import s4nd_vision, and the
saved folder loads back through timm's `local-dir:` (no network)."""
import json
import os
import subprocess
import sys

import huggingface_hub
import pytest
import timm
import torch

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.deploy import model_card, push_to_hub, save_for_hf
from s4nd_vision.eval.resolution import load_model

OUR_MODULES = ('convnext_s4nd', 'convnext_s4nd_3d', 'iso_s4nd', 's4_seq', 'vit_s4nd')


def test_every_pretrained_cfg_says_which_library_to_import():
    names = [n for m in OUR_MODULES for n in timm.list_models(module=m)]
    assert {'convnext_s4nd_atto', 'vit_s4nd_atto_patch16_224', 'conv_iso_tiny', 'conv_seq_tiny',
            'convnext_sgconv_atto', 'convnext_3d_tiny'} <= set(names)
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        assert any('import s4nd_vision' in n and 'pip install s4nd-vision' in n for n in cfg.notes), name
        assert cfg.origin_url == 'https://github.com/state-spaces/s4', name


@pytest.mark.parametrize('name', ['convnext_s4nd_atto', 'vit_s4nd_atto_patch16_224'])
def test_save_for_hf_card_and_local_dir_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, num_classes=7).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # nothing an initialization could reproduce
    folder = tmp_path / name
    readme = save_for_hf(model, str(folder), safe_serialization=True)

    with open(readme, encoding='utf-8') as f:
        text = f.read()
    assert f'# Model card for {name}\n' in text
    assert 'pip install s4nd-vision' in text and 'import s4nd_vision' in text
    assert "timm.create_model('local-dir:" in text and 'Unknown model' in text
    assert 'https://github.com/state-spaces/s4' in text and 'arxiv.org/abs/2210.06583' in text
    assert '@inproceedings{nguyen2022s4nd' in text
    assert 'Input size: 64 x 64' in text  # the size it was built for, not the registry's 224
    # the config.json of timm's own save_for_hf says it too (the notes of every pretrained_cfg of ours)
    with open(folder / 'config.json') as f:
        config = json.load(f)
    assert config['architecture'] == name
    assert any('import s4nd_vision' in n for n in config['pretrained_cfg']['notes'])

    torch.manual_seed(1)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert type(loaded) is type(model) and loaded.num_classes == 7
    assert loaded.img_size == (64, 64) and loaded.pretrained_cfg['input_size'] == (3, 64, 64)
    evaluated = load_model(f'local-dir:{folder}')  # what `s4nd-vision eval-resolution --models local-dir:...` runs
    for size in (64, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
            torch.testing.assert_close(evaluated(x), model(x), rtol=0, atol=0)


def test_without_the_import_timm_does_not_know_the_model(tmp_path):
    """What the card warns about: a process that never imports s4nd_vision cannot load the folder (one that does,
    as this one, can)."""
    folder = tmp_path / 'iso'
    timm.models.save_for_hf(timm.create_model('s4nd_iso_tiny', img_size=14, num_classes=3), str(folder))
    code = 'import sys, timm; timm.create_model("local-dir:" + sys.argv[1], pretrained=True)'
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, '-c', code, str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and 'Unknown model (s4nd_iso_tiny)' in result.stderr, result.stderr[-2000:]
    # the same call where s4nd_vision is imported (this process) loads it
    timm.create_model('local-dir:' + str(folder), pretrained=True)


def test_model_card_overrides_and_paper_citations():
    model = timm.create_model('convnext_sgconv_atto', img_size=64)
    card = model_card(model, 'me/convnext-sgconv', details={'Dataset': 'ImageNet-1k'}, description='Mine.')
    assert card['description'] == 'Mine.'
    assert card['details']['Dataset'] == 'ImageNet-1k' and 's4nd-vision' in card['details']['Library']
    assert card['details']['Model Type'] == 'Image classification / feature backbone'
    for name, kind in [('s4nd_seq_atto', 'Sequence'), ('convnext_s4nd_3d_atto', 'Video')]:
        other = model_card(timm.create_model(name))
        assert other['details']['Model Type'].startswith(kind), name
        # the usage's last sentence stands alone without the image-only `eval-resolution` command before it
        last = "\n\ntimm's own `train.py` / `validate.py` scripts do not import it."
        assert other['usage'].rstrip().endswith(last), name
    assert card['usage'].rstrip().endswith('--models hf-hub:me/convnext-sgconv ...`); timm\'s own `train.py` / '
                                           '`validate.py` scripts do not.')
    assert "timm.create_model('hf-hub:me/convnext-sgconv', pretrained=True)" in card['usage']
    ids = model.pretrained_cfg['paper_ids']
    cites = card['citation']
    assert ids == ('arXiv:2210.09298', 'arXiv:2210.06583'), ids  # the SGConv variant cites both papers
    assert len(cites) == 2 and 'nguyen2022s4nd' in cites[0] and 'li2023sgconv' in cites[1]
    # the sequence models (the S4 block, S4ND layers) cite S4 and S4ND
    seq = timm.create_model('s4nd_seq_atto', seq_len=16)
    assert seq.pretrained_cfg['paper_ids'] == ('arXiv:2111.00396', 'arXiv:2210.06583')
    card = model_card(seq)
    assert card['details']['Papers'] == ['Efficiently Modeling Long Sequences with Structured State Spaces',
                                         'https://arxiv.org/abs/2111.00396', 'https://arxiv.org/abs/2210.06583']
    assert [c.split(',')[0] for c in card['citation']] == ['@inproceedings{nguyen2022s4nd',
                                                           '@inproceedings{gu2022efficiently']


@pytest.mark.parametrize('name, kwargs, input_size, pool_size', [
    ('convnext_s4nd_3d_atto', dict(img_size=32, num_frames=8, in_chans=1), [1, 8, 32, 32], [4, 1, 1]),
    ('s4nd_seq_atto', dict(seq_len=50, in_chans=2), [2, 50], [50]),
])
def test_video_and_sequence_sizes_survive_the_round_trip(tmp_path, name, kwargs, input_size, pool_size):
    """timm's config.json states (C, H, W) and drops other pool sizes; ours states the clip or the length."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    with open(tmp_path / 'config.json') as f:
        cfg = json.load(f)['pretrained_cfg']
    assert cfg['input_size'] == input_size and cfg['pool_size'] == pool_size
    assert 'Input size: ' + ' x '.join(str(s) for s in input_size[1:]) in (tmp_path / 'README.md').read_text()
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert list(loaded.pretrained_cfg['input_size']) == input_size
    assert timm.data.resolve_model_data_config(loaded)['input_size'] == tuple(input_size)
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize('name, kwargs, size', [
    ('convnext_s4nd_atto', dict(img_size=64), (3, 96, 96)),
    ('convnext_s4nd_3d_atto', dict(img_size=32, num_frames=4), (3, 8, 64, 64)),
    ('s4nd_seq_atto', dict(seq_len=50), (1, 80)),
])
def test_a_data_config_input_size_is_kept(tmp_path, name, kwargs, size):
    """save_for_hf(data_config=dict(input_size=...)) states that size on reload (ours restated the built size; timm
    refused a clip's or a sequence's); the model saved keeps its size and the loaded one its function."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    built = model.pretrained_cfg['input_size']
    readme = save_for_hf(model, str(tmp_path), data_config=dict(input_size=size, mean=(0.5,) * size[0]))
    assert model.pretrained_cfg['input_size'] == built  # restored after the save
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    config = timm.data.resolve_model_data_config(loaded)
    assert config['input_size'] == size and tuple(config['mean']) == (0.5,) * size[0]
    x = torch.randn(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    text = open(readme, encoding='utf-8').read()
    task = {2: 'other', 3: 'image-classification', 4: 'video-classification'}[len(size)]
    assert f'pipeline_tag: {task}\n' in text and ('create_transform' in text) == (len(size) == 3)
    assert f'Input size: {" x ".join(map(str, size[1:]))}' in text  # the card states the size config.json does
    with pytest.raises(ValueError, match='states 5 channels'):
        save_for_hf(model, str(tmp_path / 'bad'), data_config=dict(input_size=(5, *size[1:])))
    # img_size, as timm's data configs give it: (H, W), a video model keeping its frames; no meaning for sequences
    if len(size) == 2:
        with pytest.raises(ValueError, match='img_size does not apply to the sequence model.*input_size=\\(C, L\\)'):
            save_for_hf(model, str(tmp_path / 'img'), data_config=dict(img_size=96))
    else:
        save_for_hf(model, str(tmp_path / 'img'), data_config=dict(img_size=96))
        loaded = timm.create_model(f'local-dir:{tmp_path / "img"}', pretrained=True)
        assert loaded.pretrained_cfg['input_size'] == (*built[:-2], 96, 96)


def test_the_card_describes_the_model_as_built():
    """A baseline is not called an S4ND model, and a model built with SGConv kernels cites SGConv whatever its
    registry name."""
    for name in ('convnext_3d_atto', 'conv_iso_tiny', 'conv_seq_tiny'):
        card = model_card(timm.create_model(name))
        assert 'a baseline without S4ND layers' in card['description'] and ': an S4ND model' not in card['description']
    card = model_card(timm.create_model('convnext_s4nd_atto', img_size=64))
    assert ': an S4ND model' in card['description'] and len(card['citation']) == 1
    for name in ('convnext_s4nd_atto', 'convnext_sgconv_atto'):
        card = model_card(timm.create_model(name, img_size=64, kernel='sgconv'))
        assert [c.split(',')[0] for c in card['citation']] == ['@inproceedings{nguyen2022s4nd',
                                                               '@inproceedings{li2023sgconv'], name
        assert card['details']['Papers'].count('https://arxiv.org/abs/2210.09298') == 1, name


@pytest.mark.parametrize('has_readme', [False, True])
def test_push_to_hub_uploads_the_card(monkeypatch, has_readme):
    """timm's push_to_hf_hub with our card and config; the Hub client is replaced by one that reads the folder
    it is given. A repository's README is kept, as timm keeps it."""
    uploaded = {}

    class FakeApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type('RepoUrl', (), {'repo_id': repo_id})()

        def file_exists(self, **kwargs):
            return has_readme

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded['delete_patterns'] = kwargs.get('delete_patterns')
            for name in os.listdir(folder_path):
                uploaded[name] = os.path.getsize(os.path.join(folder_path, name))
            if not has_readme:
                with open(os.path.join(folder_path, 'README.md'), encoding='utf-8') as f:
                    uploaded['text'] = f.read()
            return repo_id

    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    model = timm.create_model('s4nd_iso_tiny', img_size=14, num_classes=3)
    assert push_to_hub(model, 'me/iso') == 'me/iso'
    if has_readme:
        assert 'README.md' not in uploaded and {'config.json', 'model.safetensors'} <= set(uploaded)
        assert uploaded['delete_patterns'] == []  # (both formats pushed: no earlier weights left to delete)
        push_to_hub(model, 'me/iso', safe_serialization=False)
        assert uploaded['delete_patterns'] == ['model.safetensors']  # (the earlier push's: timm would load it)
        return
    assert {'config.json', 'model.safetensors', 'README.md'} <= set(uploaded)
    assert '# Model card for iso\n' in uploaded['text']
    assert "timm.create_model('hf-hub:me/iso', pretrained=True)" in uploaded['text']
    assert 'import s4nd_vision' in uploaded['text'] and 'pip install s4nd-vision' in uploaded['text']


def test_a_compiled_model_saves_the_model_it_wraps(tmp_path):
    """`torch.compile(model)` (compilation is lazy: nothing runs here) saves and loads back as the model itself."""
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=64, num_classes=5).eval()
    save_for_hf(torch.compile(model), str(tmp_path))
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert loaded.img_size == (64, 64) and loaded.num_classes == 5
    assert loaded.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_failed_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """A save stopped part-way (here: the card fails after timm wrote the weights and config) leaves the earlier
    save's files, not new weights beside its config.json (which would build the model at the old native size), and
    no temporary folder."""
    from s4nd_vision.deploy import hub
    torch.manual_seed(0)
    model = timm.create_model('s4nd_iso_tiny', img_size=14, num_classes=3)
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def failing_card(*args, **kwargs):
        raise RuntimeError('stopped')
    monkeypatch.setattr(hub, '_card', failing_card)
    with torch.no_grad():
        model.head.fc.weight.add_(1.0)
    with pytest.raises(RuntimeError, match='stopped'):
        save_for_hf(model, str(tmp_path), safe_serialization=True, data_config=dict(input_size=(3, 28, 28)))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


@pytest.mark.parametrize('first,then', [(True, False), (False, True), ('both', False)])
def test_a_save_in_another_format_replaces_the_earlier_weights(tmp_path, first, then):
    """Saving again into a folder in the other format removes the earlier save's weights: timm loads
    model.safetensors before pytorch_model.bin, so a re-save with safe_serialization=False loaded the old weights."""
    torch.manual_seed(0)
    old, new = (timm.create_model('s4nd_iso_tiny', img_size=14, num_classes=3).eval() for _ in range(2))
    save_for_hf(old, str(tmp_path), safe_serialization=first)
    save_for_hf(new, str(tmp_path), safe_serialization=then)
    assert {'model.safetensors', 'pytorch_model.bin'} & set(os.listdir(tmp_path)) == {
        'model.safetensors' if then else 'pytorch_model.bin'}
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = torch.randn(1, 3, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), new(x), rtol=0, atol=0)


def test_a_folder_not_saved_for_the_hub_is_named_with_what_to_give_instead(tmp_path):
    """'local-dir:' of a run's folder (its best.safetensors, no config.json) or of no folder: an error that says what
    a Hub folder holds and how a run's weights load (timm's own said only "Config file not found")."""
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'best.safetensors').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match=r"'local-dir:.*run'.* has no config.json, so it is not weights saved "
                                                r'for the Hub.*registered model name and the file as the checkpoint'):
        load_model(f'local-dir:{run}')
    with pytest.raises(FileNotFoundError, match=r"'.*missing' is not a folder, so it is not weights saved for the Hub"):
        load_model(f'local-dir:{tmp_path / "missing"}')
