"""The built-in demo (the README's main job) end to end in a reduced mode, and its determinism."""
import csv
import os
import re

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file
from timm.data import resolve_data_config

from s4nd_vision.data import mnist
from s4nd_vision.eval import demo
from s4nd_vision.eval.demo import CONFIG_DIR, SETTINGS, _train, retention, run_demo
from s4nd_vision.eval.resolution import CSV_NAME, PLOT_NAME


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _first_digits_of_each_class(per_class: int):
    """MNIST-5k cut to its first `per_class` digits of every class (the stratified split and its file order kept)."""
    images, labels = mnist.load_mnist_5k()
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    return images[keep], labels[keep]


def test_demo_reduced_end_to_end(tmp_path, capsys, monkeypatch):
    """The whole demo on 500 of the 5,000 digits (400 train, 100 val: the pipeline, not the accuracy, is checked)."""
    reduced = _first_digits_of_each_class(50)
    monkeypatch.setattr(mnist, 'load_mnist_5k', lambda: reduced)
    evaluated = {}  # the data config each model is evaluated with
    evaluate = demo.eval_resolution
    monkeypatch.setattr(demo, 'eval_resolution', lambda models, *a, **k: evaluated.update(
        {n: resolve_data_config({}, model=m) for n, m in models.items()}) or evaluate(models, *a, **k))
    rows = run_demo('iso', out_dir=str(tmp_path), epochs=1, max_steps_per_epoch=2)
    setting = SETTINGS['iso']
    # normalized as in training: the demo config's MNIST statistics, not the models' ImageNet defaults
    assert {n: (c['mean'], c['std']) for n, c in evaluated.items()} == {
        m: ((0.1307,), (0.3081,)) for m in (setting.s4nd_model, setting.baseline)}
    assert {(r['model'], r['resolution']) for r in rows} == {
        (m, r) for m in (setting.s4nd_model, setting.baseline) for r in setting.resolutions}
    out = capsys.readouterr().out
    # runs and results named by the settings that differ from the config's (another --epochs: other runs)
    tag = '-epochs1-steps2'
    csv_path, plot_path = (tmp_path / name.replace('.', tag + '.') for name in (CSV_NAME, PLOT_NAME))
    assert '| s4nd_iso_tiny |' in out and 'keeps' in out and str(plot_path) in out
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with Image.open(plot_path) as img:
        assert img.format == 'PNG' and img.size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [csv_path.name, plot_path.name, setting.s4nd_model + tag, setting.baseline + tag])
    for model in (setting.s4nd_model, setting.baseline):
        assert (tmp_path / (model + tag) / 'best.safetensors').is_file()
        assert set(retention(rows, model)) == set(setting.resolutions)

    # the same seed trains the same weights; running again resumes the finished runs (no retraining)
    again = _train(os.path.join(CONFIG_DIR, setting.config), setting.s4nd_model, str(tmp_path / 'again'),
                   ['train.epochs=1', 'train.max_steps_per_epoch=2'])
    first, second = load_file(str(tmp_path / (setting.s4nd_model + tag) / 'best.safetensors')), load_file(again)
    assert all((first[k] == second[k]).all() for k in first)
    mtime = (tmp_path / (setting.s4nd_model + tag) / 'best.safetensors').stat().st_mtime
    _train(os.path.join(CONFIG_DIR, setting.config), setting.s4nd_model, str(tmp_path / (setting.s4nd_model + tag)),
           ['train.epochs=1', 'train.max_steps_per_epoch=2'])
    assert (tmp_path / (setting.s4nd_model + tag) / 'best.safetensors').stat().st_mtime == mtime


def test_demo_rejects_unknown_setting(tmp_path):
    with pytest.raises(ValueError, match='setting must be one of'):
        run_demo('resnet', out_dir=str(tmp_path))


def test_retention_is_relative_to_the_training_resolution():
    """The demo's 'keeps X% at R px' line: per model, each resolution's top-1 over that of the training resolution
    (the lowest; rows in any order); a model with no top-1 there keeps 0."""
    rows = [dict(model='s4nd', resolution=r, top1=t) for r, t in ((28, 45.0), (14, 90.0), (42, 30.0))]
    rows += [dict(model='conv', resolution=r, top1=t) for r, t in ((14, 0.0), (28, 10.0))]
    assert retention(rows, 's4nd') == {14: 1.0, 28: 0.5, 42: pytest.approx(1 / 3)}
    assert retention(rows, 'conv') == {14: 0.0, 28: 0.0}


def test_convnext_setting_runs_the_models_defaults(tmp_path, monkeypatch):
    """The ConvNeXt demo passes no model arguments (a layer scale of 1.0 in its config once kept S4D-Lin and
    band-limited S4D-LegS at chance): ConvNeXt-S4ND trains with its own defaults, band-limit 1.0 included,
    and `bandlimit='off'` / a number reach the model through timm.create_model."""
    from s4nd_vision.train import load_config
    setting = SETTINGS['convnext']
    assert load_config(os.path.join(CONFIG_DIR, setting.config)).model.kwargs == {}
    assert setting.resolutions == (64, 96, 128, 256)
    class Built(Exception):
        pass

    def load_model(name, path, **kwargs):
        raise Built(kwargs)  # (stops before evaluation)

    trained = {}
    monkeypatch.setattr(demo, '_train', lambda config, name, out, overrides: trained.setdefault(name, overrides))
    monkeypatch.setattr(demo, 'load_model', load_model)
    for bandlimit, extra in ((None, []), ('off', ['model.kwargs.bandlimit=0']), (0, ['model.kwargs.bandlimit=0']),
                             (0.5, ['model.kwargs.bandlimit=0.5'])):
        trained.clear()
        with pytest.raises(Built) as built:
            run_demo('convnext', out_dir=str(tmp_path), bandlimit=bandlimit)
        assert trained[setting.s4nd_model] == ['train.seed=0', *extra] and trained[setting.baseline] == ['train.seed=0']
        cut = built.value.args[0]['model_kwargs'].get('bandlimit', 1.0)
        assert cut == {None: 1.0, 'off': 0, 0: 0, 0.5: 0.5}[bandlimit]
    with pytest.raises(ValueError, match="bandlimit must be None"):
        run_demo('convnext', out_dir=str(tmp_path), bandlimit=-1)
    # another seed or band-limit trains in a folder of its own (it resumed the first run's finished models)
    folders = {}
    monkeypatch.setattr(demo, '_train', lambda config, name, out, overrides: folders.setdefault(name, out))
    with pytest.raises(Built):
        run_demo('convnext', out_dir=str(tmp_path), seed=3, bandlimit=0.5)
    assert folders == {setting.s4nd_model: str(tmp_path / f'{setting.s4nd_model}-seed3-bandlimit0.5'),
                       setting.baseline: str(tmp_path / f'{setting.baseline}-seed3')}
    # and so do other epochs or steps per epoch (a run never continues one trained with others); the config's
    # own number of epochs is the default run
    for epochs, steps, tag in ((2, 3, '-epochs2-steps3'), (5, None, ''), (None, 4, '-steps4')):
        folders.clear()
        with pytest.raises(Built):
            run_demo('convnext', out_dir=str(tmp_path), epochs=epochs, max_steps_per_epoch=steps)
        assert folders == {name: str(tmp_path / (name + tag)) for name in (setting.s4nd_model, setting.baseline)}


def test_results_are_named_as_their_run_folders(tmp_path, monkeypatch):
    """The CSV and plot of a run with another seed, number of epochs or band-limit carry its folder's tag: the
    default command's results are never overwritten by (or mistaken for) a variant's."""
    written = {}
    monkeypatch.setattr(demo, '_train', lambda config, name, out, overrides: out)
    monkeypatch.setattr(demo, 'load_model', lambda name, path, **kwargs: name)
    monkeypatch.setattr(demo, 'eval_resolution', lambda models, dataset, resolutions, **kwargs: [
        dict(model=m, resolution=r, top1=50.0, top5=90.0, n=1) for m in models for r in resolutions])
    monkeypatch.setattr(demo, 'write_csv', lambda rows, path: written.__setitem__('csv', path))
    monkeypatch.setattr(demo, 'plot_accuracy', lambda rows, path, **kwargs: written.__setitem__('plot', path))
    for kwargs, tag in ((dict(), ''), (dict(seed=3, bandlimit=0.5), '-seed3-bandlimit0.5'),
                        (dict(bandlimit='off'), '-bandlimit0'), (dict(epochs=2), '-epochs2')):
        run_demo('convnext', out_dir=str(tmp_path), **kwargs)
        assert written == {'csv': str(tmp_path / CSV_NAME.replace('.csv', f'{tag}.csv')),
                           'plot': str(tmp_path / PLOT_NAME.replace('.png', f'{tag}.png'))}, kwargs

def test_readme_export_example_gives_the_iso_demos_preprocessing():
    """The README's export example for the isotropic demo's weights overlays every preprocessing value the demo
    trained with that is not the model's default: without crop_pct (1.0) the file's metadata says timm's 0.875, and
    a deployment would resize each digit by 8/7 and crop its border."""
    import ast
    import re

    import timm
    import yaml
    with open(os.path.join(os.path.dirname(__file__), os.pardir, 'README.md')) as f:
        readme = ' '.join(f.read().split())
    example = ast.literal_eval(re.search(r'pretrained_cfg_overlay=(\{[^}]*\})', readme).group(1))
    with open(os.path.join(CONFIG_DIR, 'mnist_iso.yaml')) as f:
        config = yaml.safe_load(f)
    trained, default = config['data'], timm.create_model(config['model']['name']).pretrained_cfg
    needed = {key: tuple(value) if isinstance(value, list) else value for key, value in trained.items()
              if key in ('mean', 'std', 'crop_pct', 'interpolation')}
    needed = {key: value for key, value in needed.items() if value != default.get(key)}
    assert needed and example == needed


def test_a_diverged_demo_ends_with_one_line_naming_the_model(tmp_path, capsys, monkeypatch):
    """A model whose training diverges ends the demo as it ends train: one `error: ...` line naming the model and its
    run folder, exit status 3 (it ended in a traceback with exit status 1)."""
    from s4nd_vision import train
    from s4nd_vision.cli import main

    class Diverging:
        def __init__(self, cfg, **kwargs):
            pass

        def fit(self):
            raise train.TrainingDiverged('training diverged: the loss was not finite')

    monkeypatch.setattr(train, 'Trainer', Diverging)
    with pytest.raises(SystemExit) as exit_info:
        main(['demo', '--out', str(tmp_path), '--epochs', '1'])
    err = capsys.readouterr().err.strip()
    run = tmp_path / f'{SETTINGS["iso"].s4nd_model}-epochs1'
    assert exit_info.value.code == 3 and err == (
        f'error: {SETTINGS["iso"].s4nd_model} in {run}: training diverged: the loss was not finite'), err


def test_the_plot_and_table_say_which_variant_they_show(tmp_path, monkeypatch, capsys):
    """The plot's title and the table's heading name the data, the training size and what differs from the default
    run (seed, epochs, steps per epoch, band-limit): a variant's plot was titled as the default's, its file name
    alone telling them apart."""
    titles = []
    monkeypatch.setattr(demo, '_train', lambda config, name, out, overrides: out)
    monkeypatch.setattr(demo, 'load_model', lambda name, path, **kwargs: name)
    monkeypatch.setattr(demo, 'eval_resolution', lambda models, dataset, resolutions, **kwargs: [
        dict(model=m, resolution=r, top1=50.0, top5=90.0, n=1) for m in models for r in resolutions])
    monkeypatch.setattr(demo, 'write_csv', lambda rows, path: path)
    monkeypatch.setattr(demo, 'plot_accuracy', lambda rows, path, **kwargs: titles.append(kwargs['title']))
    for kwargs, said in ((dict(), ''), (dict(seed=3, bandlimit=0.5), ' (seed 3, S4ND band-limit 0.5)'),
                         (dict(epochs=2, max_steps_per_epoch=4, bandlimit='off'),
                          ' (epochs 2, steps per epoch 4, S4ND band-limit off)')):
        run_demo('iso', out_dir=str(tmp_path), **kwargs)
        what = 'MNIST-5k validation split, trained at 14 px' + said
        assert titles[-1] == f'Zero-shot resolution change\n{what}', kwargs
        assert f'Top-1 / top-5 accuracy (%) on the {what}:' in capsys.readouterr().out, kwargs


def test_each_setting_keeps_its_own_results(tmp_path, monkeypatch):
    """run_demo's default folder is the command's, one per setting (it was output/demo for both: the ConvNeXt demo's
    CSV and plot replaced the isotropic demo's); an output folder given to both settings is refused before any
    training where it holds the other setting's results."""
    written, trained = [], []
    monkeypatch.setattr(demo, '_train', lambda config, name, out, overrides: trained.append(out) or out)
    monkeypatch.setattr(demo, 'load_model', lambda name, path, **kwargs: name)
    monkeypatch.setattr(demo, 'eval_resolution', lambda models, dataset, resolutions, **kwargs: [
        dict(model=m, resolution=r, top1=50.0, top5=90.0, n=1, skipped=0, nonfinite=0)
        for m in models for r in resolutions])
    monkeypatch.setattr(demo, 'plot_accuracy', lambda rows, path, **kwargs: path)
    monkeypatch.setattr(demo, 'write_csv', lambda rows, path: written.append(path))
    monkeypatch.chdir(tmp_path)
    for setting in SETTINGS:
        run_demo(setting)
    assert written == [os.path.join('output', 'demo', setting, CSV_NAME) for setting in SETTINGS]
    monkeypatch.undo()  # (the real write_csv: results of the isotropic demo in a shared folder)
    from s4nd_vision.eval.resolution import write_csv
    write_csv([dict(model=SETTINGS['iso'].s4nd_model, resolution=14, top1=90.0, top5=99.0, n=1000, skipped=0,
                    nonfinite=0)], str(tmp_path / CSV_NAME))
    monkeypatch.setattr(demo, '_train', lambda config, name, out, overrides: trained.append(out) or out)
    trained.clear()
    with pytest.raises(ValueError, match=rf"out_dir \(--out\) '{re.escape(str(tmp_path))}' holds the results of "
                                         r"other models \(s4nd_iso_tiny: another setting\) in .*: give each setting"):
        run_demo('convnext', out_dir=str(tmp_path))
    assert trained == [] and (tmp_path / CSV_NAME).read_text().count('s4nd_iso_tiny') == 1


def test_the_models_are_evaluated_with_the_configs_interpolation(tmp_path, monkeypatch):
    """A demo config's data.interpolation (the trainer resamples the digits with it) reaches the evaluation, as its
    mean and std do: the models were evaluated resampled with their own default."""
    import yaml
    with open(os.path.join(CONFIG_DIR, SETTINGS['iso'].config)) as f:
        config = yaml.safe_load(f)
    config['data']['interpolation'] = 'nearest'
    (tmp_path / SETTINGS['iso'].config).write_text(yaml.safe_dump(config))
    built = {}
    monkeypatch.setattr(demo, '_train', lambda config, name, out, overrides: out)
    monkeypatch.setattr(demo, 'load_model', lambda name, path, **kwargs: built.setdefault(name, kwargs) and name)
    monkeypatch.setattr(demo, 'eval_resolution', lambda models, dataset, resolutions, **kwargs: [
        dict(model=m, resolution=r, top1=50.0, top5=90.0, n=1) for m in models for r in resolutions])
    monkeypatch.setattr(demo, 'write_csv', lambda rows, path: path)
    monkeypatch.setattr(demo, 'plot_accuracy', lambda rows, path, **kwargs: path)
    run_demo('iso', out_dir=str(tmp_path / 'out'), config_dir=str(tmp_path))
    assert {name: kwargs['model_kwargs']['pretrained_cfg_overlay'] for name, kwargs in built.items()} == {
        name: dict(mean=(0.1307,), std=(0.3081,), interpolation='nearest')
        for name in (SETTINGS['iso'].s4nd_model, SETTINGS['iso'].baseline)}
