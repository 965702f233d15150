"""The zero-shot resolution study runner: its grid, resumable CSV, table and plot, and one tiny real run."""
import csv
import json
import os

import pytest
import timm
import yaml
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from s4nd_vision.cli import main
from s4nd_vision.eval import zero_shot_study as study
from s4nd_vision.eval.zero_shot_study import (
    RUNS_CSV,
    StudyRun,
    format_study,
    parse_bandlimit,
    parse_dt_range,
    progressive_stages,
    read_runs,
    run_study,
    study_grid,
    summarize_runs,
)
from s4nd_vision.layers import SSMKernel
from s4nd_vision.train import TrainingDiverged


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_grid():
    runs = study_grid()
    # per seed: the baseline, 3 inits x 2 dt ranges x 3 band-limits, and progressive twins of the baseline and
    # of the 6 settings without band-limit
    assert len(runs) == 3 * (1 + 18 + 7) == len({r.run_id for r in runs})
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)  # seed-major: seed 0 covers every setting
    assert len({r.setting for r in runs}) == 26
    twins = [r for r in runs if r.progressive]
    assert all(r.bandlimit is None for r in twins) and sum(r.model == 'convnext_atto' for r in twins) == 3
    assert study_grid(progressive='unlimited') == runs  # (named for what gets twins: 'off' read as 'no twins')
    with pytest.raises(ValueError, match='progressive must be one of'):
        study_grid(progressive='off')
    run = StudyRun('convnext_s4nd_atto', 1, 'legs', (0.05, 0.5), 1.0)
    assert run.setting == 'legs dt 0.05-0.5 bandlimit 1' and run.run_id == 'legs_dt_0.05_0.5_bandlimit_1_seed1'
    assert run.model_kwargs() == dict(ssm_init='legs', dt_min=0.05, dt_max=0.5, bandlimit=1.0)
    assert StudyRun('convnext_atto', 0).model_kwargs() == {}
    small = study_grid(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[None, 1.0], seeds=[4], baseline=False,
                       progressive='all')
    assert [r.setting for r in small] == ['lin dt 0.1-1 bandlimit off', 'lin dt 0.1-1 bandlimit 1',
                                          'lin dt 0.1-1 bandlimit off progressive',
                                          'lin dt 0.1-1 bandlimit 1 progressive']
    for kwargs, match in ((dict(inits=['fourier']), 'inits'), (dict(dt_ranges=[(1.0, 0.1)]), 'dt_ranges'),
                          (dict(bandlimits=[0.0]), 'bandlimits'), (dict(seeds=[0, 0]), 'seeds'),
                          (dict(progressive='some'), 'progressive')):
        with pytest.raises(ValueError, match=match):
            study_grid(**kwargs)
    # values that print alike (6 significant digits) would be one run folder and row: the second never trained
    for kwargs, name in ((dict(bandlimits=[0.3333333, 0.33333334]), 'lin dt 0.1-1 bandlimit 0.333333'),
                         (dict(dt_ranges=[(0.1, 1.0), (0.1, 1.0000001)]), 'lin dt 0.1-1 bandlimit off')):
        with pytest.raises(ValueError, match=f"differ within 6 significant digits .*: two settings are '{name}'"):
            study_grid(**dict(dict(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[None]), **kwargs))
    assert parse_dt_range('0.05,0.5') == (0.05, 0.5) and parse_bandlimit('off') is None
    assert parse_bandlimit('0.5') == 0.5 and parse_bandlimit('0') is None  # (0 is off, as everywhere)
    for bad in ('0.5', '1,0.1', 'a,b', '0.1,inf', 'nan,1'):
        with pytest.raises(ValueError, match='dt range'):
            parse_dt_range(bad)
    for bad in ('-1', 'nan', 'inf', 'x'):
        with pytest.raises(ValueError, match=r"a band-limit is 'off' \(or 0\) or a positive number"):
            parse_bandlimit(bad)


def test_progressive_stages_and_overrides():
    assert progressive_stages([32, 48, 64], 5) == [
        dict(epoch=0, img_size=32), dict(epoch=1, img_size=48), dict(epoch=3, img_size=64)]
    assert progressive_stages([32, 48, 64], 2) == [dict(epoch=0, img_size=48), dict(epoch=1, img_size=64)]
    assert progressive_stages([32, 48, 64], 1) == [dict(epoch=0, img_size=64)]
    run = StudyRun('convnext_s4nd_atto', 2, 'inv', (0.1, 1.0), None, progressive=True)
    overrides = study._overrides(run, 64, 6, None, [32, 48, 64], 5)
    assert overrides == ['train.seed=2', 'data.img_size=64', 'train.epochs=6',
                         'train.progressive=[{epoch: 0, img_size: 32}, {epoch: 2, img_size: 48}, '
                         '{epoch: 4, img_size: 64}]',
                         'model.kwargs.ssm_init=inv', 'model.kwargs.dt_min=0.1', 'model.kwargs.dt_max=1.0',
                         'model.kwargs.bandlimit=0']
    from s4nd_vision.train import load_config
    cfg = load_config(study.CONFIG, ['model.name=convnext_s4nd_atto', *overrides])
    assert [(s.epoch, s.img_size) for s in cfg.train.progressive] == [(0, 32), (2, 48), (4, 64)]
    assert cfg.model.kwargs['ssm_init'] == 'inv' and cfg.data.img_size == 64
    # 'off' is explicit, whatever the model's default cut-off (1.0), and survives timm.create_model (which
    # drops None arguments): the model is built without one
    assert cfg.model.kwargs['bandlimit'] == 0
    model = timm.create_model('convnext_s4nd_atto', img_size=64, num_classes=10, in_chans=1, **cfg.model.kwargs)
    assert {k.bandlimit for k in model.modules() if isinstance(k, SSMKernel)} == {None}


def _fake(monkeypatch, calls, fail_at=None, diverge=()):
    """Training and evaluation replaced: top-1 from the setting and seed, epoch times in metrics.csv."""
    def train(config, model, run_dir, overrides):
        calls.append(os.path.basename(run_dir))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        if os.path.basename(run_dir) in diverge:
            raise TrainingDiverged('training diverged: the loss was not finite')
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, 'metrics.csv'), 'w') as f:
            f.write('epoch,top1,epoch_time_s\n0,50,10.5\n1,60,11.5\n')
        with open(os.path.join(run_dir, 'config.yaml'), 'w') as f:
            f.write(f'model: {{name: {model}}}\ndata: {{dataset: mnist}}\ntrain: {{epochs: 2}}\n')
        return os.path.join(run_dir, 'best.safetensors')

    def evaluate(run, run_dir, resolutions, img_size):
        base = 90.0 + run.seed
        drop = 0.0 if run.bandlimit is None else 10.0
        return {r: base - drop * (r / img_size - 1) for r in resolutions}

    monkeypatch.setattr(study, '_train', train)
    monkeypatch.setattr(study, '_evaluate', evaluate)


def test_resumable_csv_table_and_plot(tmp_path, monkeypatch):
    runs = study_grid(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[None, 1.0], seeds=[0, 1],
                      progressive='none')
    assert len(runs) == 6
    calls = []
    _fake(monkeypatch, calls, fail_at=4)
    with pytest.raises(KeyboardInterrupt):  # interrupted in the 4th run: 3 rows written
        run_study(runs, out_dir=str(tmp_path), log=lambda s: None)
    assert len(read_runs(str(tmp_path / RUNS_CSV))) == 3
    calls.clear()
    _fake(monkeypatch, calls, diverge=[runs[4].run_id])
    logged = []
    rows = run_study(runs, out_dir=str(tmp_path), log=logged.append)
    assert calls == [r.run_id for r in runs[3:]]  # only the runs not in the CSV
    assert any('diverged' in line for line in logged)  # reported, left out, the others done
    assert len(rows) == 5 and runs[4].run_id not in {r['run_id'] for r in rows}
    calls.clear()
    _fake(monkeypatch, calls)
    rows = run_study(runs, out_dir=str(tmp_path), log=lambda s: None)
    assert calls == [runs[4].run_id]  # tried again
    assert len(rows) == 6 and {r['run_id'] for r in rows} == {r.run_id for r in runs}
    assert all(r['train_s'] == 22.0 and r['epochs'] == 2 for r in rows)
    calls.clear()
    run_study(runs, out_dir=str(tmp_path), log=lambda s: None)
    assert calls == []  # all done: nothing trained again
    logged.clear()
    assert len(run_study(runs, out_dir=str(tmp_path), report_only=True, log=logged.append)) == 6 and calls == []
    assert any('table:' in line for line in logged)
    # a report of a folder that holds no study says so (a wrong --out), instead of printing nothing
    with pytest.raises(ValueError, match='report_only: no runs recorded in'):
        run_study(runs, out_dir=str(tmp_path / 'elsewhere'), report_only=True)
    assert not (tmp_path / 'elsewhere').exists()
    summary = {s['setting']: s for s in summarize_runs(rows, 64)}
    banded = summary['lin dt 0.1-1 bandlimit 1']
    assert banded['seeds'] == [0, 1]
    assert (banded['model'], banded['init'], banded['dt_range'], banded['bandlimit'], banded['progressive']) == (
        'convnext_s4nd_atto', 'lin', (0.1, 1.0), 1.0, False)
    assert summary['lin dt 0.1-1 bandlimit off']['bandlimit'] is None and summary['convnext_atto']['dt_range'] is None
    assert banded['top1'][128] == pytest.approx((80.5, 2 ** -0.5))  # 80 and 81
    assert banded['kept'][256][0] == pytest.approx((60 / 90 + 61 / 91) / 2)
    table = (tmp_path / study.TABLE_NAME).read_text()
    assert table.startswith('| setting (top-1 %, trained at 64 px) | 64 px | 96 px | 128 px | 256 px | kept at 2x |'
                            ' kept at 4x | train time (s) | seeds |')
    banded_line = '| lin dt 0.1-1 bandlimit 1 | 90.5 +- 0.7 | 85.5 +- 0.7 | 80.5 +- 0.7 | 60.5 +- 0.7 | 89% +- 0 |'
    assert banded_line + ' 67% +- 0 | 22 +- 0 | 0,1 |' in table
    assert table == format_study(summarize_runs(rows, 64), 64) + '\n'
    with Image.open(tmp_path / study.PLOT_NAME) as img:
        assert img.format == 'PNG'
    # a report reads the study's own resolutions from its CSV, whatever the options say (they are for training)
    run_study(runs, out_dir=str(tmp_path), report_only=True, img_size=32, resolutions=[32, 64],
              progressive_sizes=(16, 24), log=lambda s: None)
    assert (tmp_path / study.TABLE_NAME).read_text() == table
    # another training size or set of resolutions does not mix into the same CSV
    for img_size, resolutions in ((64, [64, 128]), (32, [32, 64, 128])):
        with pytest.raises(ValueError, match=r'holds runs trained at 64 px and tested at \[64, 96, 128, 256\]'):
            run_study([StudyRun('convnext_atto', 5)], out_dir=str(tmp_path), img_size=img_size,
                      resolutions=resolutions, progressive_sizes=(img_size,), log=lambda s: None)
    with pytest.raises(ValueError, match='start with the training resolution'):
        run_study(runs, out_dir=str(tmp_path), resolutions=[96, 64])
    with pytest.raises(ValueError, match="overrides \\['train.seed=3'\\] set what the study sets"):
        run_study(runs, out_dir=str(tmp_path), overrides=['data.batch_size=32', 'train.seed=3'])
    # nor do runs trained with other shared settings (they would be averaged with these: refused, nothing trained)
    for changed, message in ((dict(epochs=5), 'epochs=None, not epochs=5'),
                             (dict(max_steps_per_epoch=3), 'max_steps_per_epoch=None, not max_steps_per_epoch=3'),
                             (dict(progressive_sizes=(48, 64)),
                              'progressive_sizes=\\[32, 48, 64\\], not progressive_sizes=\\[48, 64\\]'),
                             (dict(overrides=['data.batch_size=32']),
                              "overrides=\\[\\], not overrides=\\['data.batch_size=32'\\]")):
        with pytest.raises(ValueError, match=f'holds runs trained with {message}: continue that study'):
            run_study(runs + [StudyRun('convnext_atto', 7)], out_dir=str(tmp_path), log=lambda s: None, **changed)
    assert calls == []


def test_two_studies_on_one_folder_record_each_run_once(tmp_path, monkeypatch):
    """A study beside this one (on the same --out) finishes a run this one planned: it is not trained, evaluated
    nor recorded again; a row given twice (a file from before this check) counts once, not as another seed."""
    runs = study_grid(inits=['lin', 'inv'], dt_ranges=[(0.1, 1.0)], bandlimits=[1.0], seeds=[0], baseline=False,
                      progressive='none')
    path = str(tmp_path / RUNS_CSV)
    fields = study._fields([64, 96, 128, 256])
    other = dict(run_id=runs[1].run_id, setting=runs[1].setting, model=runs[1].model, init='inv', dt_min=0.1,
                 dt_max=1.0, bandlimit=1.0, progressive=False, seed=0, epochs=2, train_s=22.0,
                 top1_64=11, top1_96=11, top1_128=11, top1_256=11)
    calls = []
    _fake(monkeypatch, calls)
    fake_train = study._train

    def train(config, model, run_dir, overrides):  # the other study finishes runs[1] while this one trains runs[0]
        study._append_row(path, other, fields)
        return fake_train(config, model, run_dir, overrides)

    monkeypatch.setattr(study, '_train', train)
    logged = []
    rows = run_study(runs, out_dir=str(tmp_path), log=logged.append)
    assert calls == [runs[0].run_id] and any('meanwhile, skipped' in line for line in logged)
    with open(path) as f:
        assert [r['run_id'] for r in csv.DictReader(f)] == [runs[1].run_id, runs[0].run_id]
    assert [r['run_id'] for r in rows] == [runs[1].run_id, runs[0].run_id]
    assert study._append_row(path, other, fields) is False  # the run_id is there: nothing appended
    with open(path, 'a') as f:  # a copy written before processes checked for each other
        f.write(','.join(str(other[k]) for k in fields).replace('11', '99') + '\n')
    assert [r['top1'][64] for r in read_runs(path)] == [11.0, 90.0]  # the first row of each run_id
    summary = summarize_runs(read_runs(path) * 2, 64)  # (rows given twice, as read before)
    inv = next(s for s in summary if s['init'] == 'inv')
    assert inv['seeds'] == [0] and inv['top1'][64] == (11.0, 0.0)


def test_a_run_another_study_is_training_is_skipped(tmp_path, monkeypatch):
    """Two studies on one folder walk the grid in the same order: the second meets the run the first trains (its
    folder locked) and goes on with the next run instead of ending (the first records it)."""
    from s4nd_vision.train import RunFolderInUse
    runs = study_grid(inits=['lin', 'inv'], dt_ranges=[(0.1, 1.0)], bandlimits=[1.0], seeds=[0], baseline=False,
                      progressive='none')
    calls = []
    _fake(monkeypatch, calls)
    fake_train = study._train

    def train(config, model, run_dir, overrides):
        if os.path.basename(run_dir) == runs[0].run_id:
            raise RunFolderInUse(f'train.output_dir {run_dir!r} is in use by another run (pid 1)')
        return fake_train(config, model, run_dir, overrides)

    monkeypatch.setattr(study, '_train', train)
    logged = []
    rows = run_study(runs, out_dir=str(tmp_path), log=logged.append)
    assert calls == [runs[1].run_id] and [r['run_id'] for r in rows] == [runs[1].run_id]
    assert any('trained by another study' in line for line in logged)


def test_bad_settings_record_nothing(tmp_path, monkeypatch):
    """A value the runs' configs refuse fails before study_settings.json is written (it would hold the folder for
    runs that never existed); settings recorded for no run are replaced, never reported as runs."""
    runs = study_grid(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[1.0], seeds=[0], baseline=False,
                      progressive='none')
    calls = []
    _fake(monkeypatch, calls)
    for bad, message in ((dict(epochs=0), 'train.epochs must be positive'),
                         (dict(max_steps_per_epoch=0), 'train.max_steps_per_epoch must be positive'),
                         (dict(overrides=['bogus.key=1']), "unknown config key 'bogus'"),
                         (dict(resolutions=(64, 96, 96)), r'each be given once, got \[96\]')):
        with pytest.raises(ValueError, match=message):
            run_study(runs, out_dir=str(tmp_path), log=lambda s: None, **bad)
        assert not (tmp_path / study.SETTINGS_JSON).exists() and calls == []
    (tmp_path / study.SETTINGS_JSON).write_text('{"epochs": 7}')  # recorded for no run
    run_study(runs, out_dir=str(tmp_path), epochs=1, log=lambda s: None)
    assert calls == [runs[0].run_id]
    assert json.loads((tmp_path / study.SETTINGS_JSON).read_text())['epochs'] == 1


def test_a_study_killed_in_its_first_run_keeps_its_training_size(tmp_path, monkeypatch):
    """A study interrupted before its first row (no runs.csv header yet) refuses to continue at another --img-size:
    its run would resume from the checkpoint at the other size and be recorded as trained at it. A settings file
    from before img_size was kept is continued, and gains it."""
    runs = study_grid(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[1.0], seeds=[0], baseline=False,
                      progressive='none')

    def killed(config, model, run_dir, overrides):  # the run's training has begun (its config.yaml), no row
        os.makedirs(run_dir, exist_ok=True)
        (tmp_path / 'runs' / runs[0].run_id / 'config.yaml').write_text('model: {name: convnext_s4nd_atto}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(study, '_train', killed)
    with pytest.raises(KeyboardInterrupt):
        run_study(runs, out_dir=str(tmp_path), log=lambda s: None)
    assert not (tmp_path / RUNS_CSV).exists()
    calls = []
    _fake(monkeypatch, calls)
    with pytest.raises(ValueError, match='holds runs trained with img_size=64, not img_size=48: continue that'):
        run_study(runs, out_dir=str(tmp_path), img_size=48, resolutions=[48, 96], log=lambda s: None)
    assert calls == []
    settings = json.loads((tmp_path / study.SETTINGS_JSON).read_text())
    del settings['img_size']  # (written before it was kept)
    (tmp_path / study.SETTINGS_JSON).write_text(json.dumps(settings))
    run_study(runs, out_dir=str(tmp_path), log=lambda s: None)
    assert calls == [runs[0].run_id] and json.loads((tmp_path / study.SETTINGS_JSON).read_text())['img_size'] == 64


def test_progressive_sizes_bind_the_progressive_runs_only(tmp_path, monkeypatch):
    """A study of another training size without progressive runs needs no progressive sizes of that size (the
    default sizes, ending at 64, refused every --img-size but 64); with progressive runs they must end with it."""
    calls = []
    _fake(monkeypatch, calls)
    plain = study_grid(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[None], seeds=[0], baseline=False,
                       progressive='none')
    run_study(plain, out_dir=str(tmp_path / 'plain'), img_size=48, resolutions=[48, 96], log=lambda s: None)
    assert calls == [plain[0].run_id]
    twins = study_grid(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[None], seeds=[0], baseline=False)
    with pytest.raises(ValueError, match=r'progressive_sizes \(--progressive-sizes\) must end with img_size=48'):
        run_study(twins, out_dir=str(tmp_path / 'twins'), img_size=48, resolutions=[48, 96], log=lambda s: None)
    # a twin that leaves out a listed size (fewer epochs than sizes) or trains at one size is refused: its row would
    # be recorded as progressive at those sizes
    for sizes, epochs, trained in (((32, 48, 64), 1, r'\[64\]'), ((32, 48, 64), 2, r'\[48, 64\]'),
                                   ((64,), 5, r'\[64\]')):
        with pytest.raises(ValueError, match=rf'progressive_sizes .* at least 2 sizes, each with an epoch of the '
                                             rf'{epochs} a run trains .*would train at {trained} px only'):
            run_study(twins, out_dir=str(tmp_path / 'few'), epochs=epochs, progressive_sizes=sizes,
                      log=lambda s: None)
    assert calls == [plain[0].run_id]


def test_tiny_real_run(tmp_path, capsys):
    """One S4ND setting through the demo's trainer and the evaluation (1 update, 32 px), by the command."""
    out = tmp_path / 'study'
    args = ['zero-shot-study', '--inits', 'legs', '--dt-ranges', '0.05,0.5', '--bandlimits', '1.0', '--seeds', '3',
            '--no-baseline', '--progressive', 'none', '--img-size', '32', '--resolutions', '32', '64',
            '--progressive-sizes', '32', '--epochs', '1', '--max-steps-per-epoch', '1', '--out', str(out),
            '--overrides', 'model.kwargs.depths=[1,1,1,1]', 'model.kwargs.dims=[8,8,8,8]', 'model.kwargs.stem_chs=4',
            'model.kwargs.d_state=8', 'data.batch_size=200', 'data.interpolation=nearest']
    main(args)
    rows = read_runs(str(out / RUNS_CSV))
    with open(out / 'runs' / rows[0]['run_id'] / 'metrics.csv') as f:  # the trainer's validation of the weights
        validated = float(list(csv.DictReader(f))[-1]['top1'])
    assert rows[0]['top1'][32] == pytest.approx(validated, abs=0.01)  # evaluated as validated: nearest resampling
    assert [r['run_id'] for r in rows] == ['legs_dt_0.05_0.5_bandlimit_1_seed3']
    assert set(rows[0]['top1']) == {32, 64} and all(0 <= v <= 100 for v in rows[0]['top1'].values())
    assert rows[0]['train_s'] > 0 and rows[0]['epochs'] == 1
    with open(out / 'runs' / rows[0]['run_id'] / 'config.yaml') as f:
        cfg = yaml.safe_load(f)
    assert cfg['model']['kwargs'] == dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8], stem_chs=4,
                                          d_state=8, ssm_init='legs', dt_min=0.05, dt_max=0.5, bandlimit=1.0)
    assert cfg['data']['img_size'] == 32 and cfg['train']['seed'] == 3 and cfg['data']['interpolation'] == 'nearest'
    assert '| legs dt 0.05-0.5 bandlimit 1 |' in capsys.readouterr().out
    assert (out / study.PLOT_NAME).is_file()
    with open(out / RUNS_CSV) as f:
        assert len(list(csv.DictReader(f))) == 1
    main(args)  # done: skipped, the report written again
    assert len(read_runs(str(out / RUNS_CSV))) == 1


def test_runs_on_other_data_than_mnist_are_refused(tmp_path, monkeypatch):
    """The runs are evaluated on MNIST-5k: a data.dataset override would train on a folder and score the model on
    the digits (silently, where the folder has 10 classes). Refused before anything is trained or recorded."""
    runs = study_grid(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[1.0], seeds=[0], baseline=False,
                      progressive='none')
    calls = []
    _fake(monkeypatch, calls)
    with pytest.raises(ValueError, match="trains and evaluates on MNIST-5k .* got data.dataset 'imagefolder'"):
        run_study(runs, out_dir=str(tmp_path), overrides=['data.dataset=imagefolder', f'data.root={tmp_path}'],
                  log=lambda s: None)
    assert calls == [] and not (tmp_path / study.SETTINGS_JSON).exists()


def test_a_study_without_s4nd_twins_plots_every_settings_curve(tmp_path, monkeypatch):
    """The curves panel singles out the settings with a progressive twin; a study with none (--progressive none, the
    README's grid) drew the baseline's curve alone, and without 2x or 4x among its resolutions (no bars either) no
    S4ND result at all: every setting's curve is drawn then."""
    from matplotlib.axes import Axes
    labels = []
    errorbar = Axes.errorbar
    def curve(ax, x, y, **kw):  # (the bars' error bars too: unlabelled, '_nolegend_')
        labels.extend([kw['label']] if not kw.get('label', '_').startswith('_') else [])
        return errorbar(ax, x, y, **kw)
    monkeypatch.setattr(Axes, 'errorbar', curve)
    calls = []
    _fake(monkeypatch, calls)
    runs = study_grid(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[None, 1.0], seeds=[0], progressive='none')
    run_study(runs, out_dir=str(tmp_path), resolutions=[64, 96], log=lambda s: None)
    assert labels == [r.setting for r in runs]
    labels.clear()
    twins = study_grid(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[None, 1.0], seeds=[0])
    run_study(twins, out_dir=str(tmp_path), resolutions=[64, 96], log=lambda s: None)
    assert labels[:4] == ['convnext_atto', 'convnext_atto progressive', 'lin dt 0.1-1 bandlimit off',
                          'lin dt 0.1-1 bandlimit off progressive']  # (a twin: singled out, as before)


@pytest.mark.parametrize('doc', ['module', 'command'])
def test_the_documented_small_study_passes_the_up_front_checks(doc, tmp_path, monkeypatch):
    """The small study of the docs (`--epochs`, default progressive twins and sizes 32, 48, 64) gets to training:
    with `--epochs 2` its twins would skip the 32 px stage, which the study refuses up front."""
    from s4nd_vision.cli import COMMANDS

    class Started(Exception):
        pass

    def started(*args):
        raise Started
    monkeypatch.setattr(study, '_train', started)
    text = study.__doc__ if doc == 'module' else COMMANDS['zero-shot-study'].description
    (line,) = [s.strip() for s in text.splitlines() if s.strip().startswith('s4nd-vision zero-shot-study --inits')]
    with pytest.raises(Started):
        main(line.split()[1:] + ['--out', str(tmp_path)])


def test_a_kept_panel_of_a_resolution_not_tested_says_so(tmp_path, monkeypatch):
    """Tested at 2x but not at 4x: the 4x panel says that resolution was not tested, with no legend; it was titled as
    measured, empty, its legend listing every band-limit in one default colour."""
    from matplotlib.figure import Figure
    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, 'savefig', lambda fig, *a, **k: figures.append(fig) or savefig(fig, *a, **k))
    _fake(monkeypatch, [])
    runs = study_grid(inits=['lin'], dt_ranges=[(0.1, 1.0)], bandlimits=[None, 1.0], seeds=[0], progressive='none')
    run_study(runs, out_dir=str(tmp_path), resolutions=[64, 96, 128], log=lambda s: None)
    _, kept_2x, kept_4x = figures[-1].axes
    assert kept_2x.get_title() == 'kept at 2x (128 px), fixed-size training'
    assert [t.get_text() for t in kept_2x.get_legend().get_texts()] == ['band-limit off', 'band-limit 1']
    assert kept_4x.get_title() == 'kept at 4x (256 px): not tested' and kept_4x.get_legend() is None
    assert [t.get_text() for t in kept_4x.texts] == ['256 px is not among the test resolutions']
    assert not kept_4x.patches


def test_summary_counts_a_repeated_run_once_and_keeps_the_resolutions_of_every_seed():
    """A run_id given twice (a run appended again) counts once, with its first row; a resolution one seed lacks
    (an evaluation cut short) is left out of its setting's summary, not averaged over the seeds that have it."""
    def row(run_id, seed, top1):
        return dict(run_id=run_id, setting='baseline', seed=seed, model='convnext_atto', init='', dt_min='', dt_max='',
                    bandlimit='', progressive=False, top1=top1, train_s=10.0)
    rows = [row('b0', 0, {32: 50.0, 64: 40.0}), row('b1', 1, {32: 60.0}), row('b0', 0, {32: 90.0, 64: 80.0})]
    (summary,) = study.summarize_runs(rows, img_size=32)
    assert summary['seeds'] == [0, 1]
    assert summary['top1'] == {32: pytest.approx((55.0, 50 ** 0.5))}
    assert summary['kept'] == {32: (1.0, 0.0)}


def test_the_baselines_config_is_read_back_without_the_ssm_lr_warning(tmp_path):
    """The baseline trains with the S4ND recipe's optim.ssm_lr on purpose (the demo silences the warning that it
    applies to nothing): reading its run's config.yaml back to evaluate and record it warns neither."""
    import warnings

    from s4nd_vision.eval.demo import _train_config
    from s4nd_vision.train import config_to_dict
    cfg = _train_config(study.CONFIG, study.BASELINE, str(tmp_path), [])
    assert cfg.optim.ssm_lr is not None  # (else this test checks nothing)
    with open(tmp_path / 'config.yaml', 'w') as f:
        yaml.safe_dump(config_to_dict(cfg), f)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert study._run_config(str(tmp_path)).model.name == study.BASELINE
