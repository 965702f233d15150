"""The built-in demo (the README's main job) end to end in a reduced mode, and its determinism."""
import csv
import os

import pytest
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file

from s4nd_vision.eval.demo import CONFIG_DIR, SETTINGS, _train, retention, run_demo
from s4nd_vision.eval.resolution import CSV_NAME, PLOT_NAME


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_demo_reduced_end_to_end(tmp_path, capsys):
    rows = run_demo('iso', out_dir=str(tmp_path), epochs=1, max_steps_per_epoch=2)
    setting = SETTINGS['iso']
    assert {(r['model'], r['resolution']) for r in rows} == {
        (m, r) for m in (setting.s4nd_model, setting.baseline) for r in setting.resolutions}
    out = capsys.readouterr().out
    assert '| s4nd_iso_tiny |' in out and 'keeps' in out and str(tmp_path / PLOT_NAME) in out
    with open(tmp_path / CSV_NAME) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with Image.open(tmp_path / PLOT_NAME) as img:
        assert img.format == 'PNG' and img.size[0] > 100
    for model in (setting.s4nd_model, setting.baseline):
        assert (tmp_path / model / 'best.safetensors').is_file()
        assert set(retention(rows, model)) == set(setting.resolutions)

    # the same seed trains the same weights; running again resumes the finished runs (no retraining)
    again = _train(os.path.join(CONFIG_DIR, setting.config), setting.s4nd_model, str(tmp_path / 'again'),
                   ['train.epochs=1', 'train.max_steps_per_epoch=2'])
    first, second = load_file(str(tmp_path / setting.s4nd_model / 'best.safetensors')), load_file(again)
    assert all((first[k] == second[k]).all() for k in first)
    mtime = (tmp_path / setting.s4nd_model / 'best.safetensors').stat().st_mtime
    _train(os.path.join(CONFIG_DIR, setting.config), setting.s4nd_model, str(tmp_path / setting.s4nd_model),
           ['train.epochs=1', 'train.max_steps_per_epoch=2'])
    assert (tmp_path / setting.s4nd_model / 'best.safetensors').stat().st_mtime == mtime


def test_demo_rejects_unknown_setting(tmp_path):
    with pytest.raises(ValueError, match='setting must be one of'):
        run_demo('resnet', out_dir=str(tmp_path))
