"""The zero-shot resolution study: which S4ND settings keep their accuracy at resolutions never trained at.

Grid: S4D init (lin, inv, legs) x step-size range (dt_min, dt_max) x band-limit (off or a cut-off) x seeds, for
ConvNeXt-S4ND-atto on MNIST-5k, next to plain ConvNeXt-atto per seed; and progressive resizing (e.g.
32 -> 48 -> 64 px) against training at the final size throughout. Every run uses the demo's config
(`configs/demo/mnist_convnext.yaml`) and trainer exactly as `s4nd_vision.eval.demo` does, with the model
kwargs of its setting, is trained at `img_size` and evaluated at every resolution (`eval.resolution`).

Interruptions: each finished run appends one row to `runs.csv` in the output folder (with its training time:
the sum of its epochs' wall time as the trainer records it, each epoch's validation included); running the
study again skips the runs in it and resumes unfinished ones from their last checkpoint. Studies run side by
side on one folder share it: each looks at `runs.csv` again before every run, skipping those another has
finished since, and a run_id is recorded (and read) once (a run that diverges
is reported and left out; the next study run tries it again). The settings every run shares (training
resolution, epochs, steps per epoch, progressive sizes, overrides) are kept in `study_settings.json` once a run
starts (every run's config is loaded first: a bad value fails before anything is recorded); a continuation with
others is refused, as its runs would be averaged with those trained before (a run killed mid-training would
resume at the other resolution). After the last run (or with `report_only`) it writes `study.md`
(mean +- std over seeds per setting, and the fraction kept at 2x and 4x the training resolution) and `study.png`
(top-1 against resolution, one line per setting).

    s4nd-vision zero-shot-study --out output/zero_shot_study               # the whole grid (hours on a CPU)
    s4nd-vision zero-shot-study --inits lin --bandlimits off 1.0 --seeds 0 --epochs 3
"""
import csv
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..layers import SSM_INITS
from ..utils import replaced_atomically
from .demo import CONFIG_DIR, SETTINGS, _load_recipe, _train, _train_config
from .resolution import check_resolutions, eval_resolution, load_model

try:
    import fcntl
except ImportError:  # (not on Windows: runs.csv is not locked there)
    fcntl = None

__all__ = [
    'StudyRun', 'study_grid', 'progressive_stages', 'run_study', 'read_runs', 'summarize_runs', 'format_study',
    'plot_study', 'parse_dt_range', 'parse_bandlimit', 'DEFAULT_DT_RANGES', 'RUNS_CSV', 'TABLE_NAME', 'PLOT_NAME',
]

RUNS_CSV = 'runs.csv'
SETTINGS_JSON = 'study_settings.json'
TABLE_NAME = 'study.md'
PLOT_NAME = 'study.png'
S4ND_MODEL = SETTINGS['convnext'].s4nd_model
BASELINE = SETTINGS['convnext'].baseline
CONFIG = os.path.join(CONFIG_DIR, SETTINGS['convnext'].config)
DEFAULT_DT_RANGES = ((0.1, 1.0), (0.05, 0.5))
# progressive-resizing twins: none, of the baseline and the settings without band-limit ('unlimited'), of all
PROGRESSIVE_CHOICES = ('none', 'unlimited', 'all')


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study: a model setting and a seed."""
    model: str
    seed: int
    init: Optional[str] = None  # S4ND settings only
    dt_range: Optional[Tuple[float, float]] = None
    bandlimit: Optional[float] = None
    progressive: bool = False

    @property
    def setting(self) -> str:
        """The setting's name, the same for every seed (the table's rows)."""
        if self.model != S4ND_MODEL:
            name = self.model
        else:
            cut = 'off' if self.bandlimit is None else f'{self.bandlimit:g}'
            name = f'{self.init} dt {self.dt_range[0]:g}-{self.dt_range[1]:g} bandlimit {cut}'
        return name + (' progressive' if self.progressive else '')

    @property
    def run_id(self) -> str:
        """A folder name: the setting and the seed."""
        return '_'.join(self.setting.replace('-', '_').split()) + f'_seed{self.seed}'

    def model_kwargs(self) -> Dict:
        """The model kwargs of the setting (on top of the config's)."""
        if self.model != S4ND_MODEL:
            return {}
        # every S4ND argument the study varies is set explicitly, whatever the model's defaults; off is 0
        # (timm.create_model drops arguments that are None)
        return dict(ssm_init=self.init, dt_min=self.dt_range[0], dt_max=self.dt_range[1], bandlimit=self.bandlimit or 0)


def _check_positive(name: str, values: Sequence, allow_none: bool = False) -> None:
    bad = [v for v in values if not (v is None and allow_none) and not (isinstance(v, (int, float)) and v > 0)]
    if bad:
        raise ValueError(f'{name} must hold positive numbers{" or None (off)" if allow_none else ""}, got {bad}')


def study_grid(
        inits: Sequence[str] = ('lin', 'inv', 'legs'),
        dt_ranges: Sequence[Tuple[float, float]] = DEFAULT_DT_RANGES,
        bandlimits: Sequence[Optional[float]] = (None, 1.0, 0.5),
        seeds: Sequence[int] = (0, 1, 2),
        baseline: bool = True,
        progressive: str = 'unlimited',
) -> List[StudyRun]:
    """The runs of the study, seed-major (every setting of seed 0 first: a partial study covers all settings).

    progressive: 'unlimited' adds a progressive-resizing twin of the baseline and of every S4ND setting without
    band-limit, 'all' of every setting, 'none' none.
    """
    from ..layers import SSM_INITS
    bad = [i for i in inits if i not in SSM_INITS]
    if bad or not inits:
        raise ValueError(f'inits must be a non-empty list of {SSM_INITS}, got {list(inits)}')
    if not dt_ranges or any(len(r) != 2 or not 0 < r[0] <= r[1] for r in dt_ranges):
        raise ValueError(f'dt_ranges must be (dt_min, dt_max) pairs with 0 < dt_min <= dt_max, got {list(dt_ranges)}')
    _check_positive('bandlimits', bandlimits, allow_none=True)
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f'seeds must be distinct non-negative integers, got {list(seeds)}')
    if progressive not in PROGRESSIVE_CHOICES:
        raise ValueError(f'progressive must be one of {PROGRESSIVE_CHOICES}, got {progressive!r}')
    runs = []
    for seed in seeds:
        settings = []
        if baseline:
            settings.append(StudyRun(BASELINE, seed))
        for init in inits:
            for dt_range in dt_ranges:
                for cut in bandlimits:
                    settings.append(StudyRun(S4ND_MODEL, seed, init, tuple(dt_range), cut))
        twins = [StudyRun(s.model, seed, s.init, s.dt_range, s.bandlimit, progressive=True) for s in settings
                 if progressive == 'all' or (progressive == 'unlimited' and s.bandlimit is None)]
        runs += settings + twins
    runs = list(dict.fromkeys(runs))  # (repeated grid values once)
    named: Dict[str, StudyRun] = {}
    for run in runs:  # (the names print 6 significant digits: one folder and row would be taken as both's)
        other = named.setdefault(run.run_id, run)
        if other != run:
            raise ValueError(f'dt_ranges and bandlimits must differ within 6 significant digits (the settings, '
                             f'their run folders and rows are named with them): two settings are {run.setting!r}')
    return runs


def progressive_stages(sizes: Sequence[int], epochs: int) -> List[Dict]:
    """`train.progressive` stages that step through `sizes` in equal parts of `epochs` (the last size from
    epoch (n - 1) * epochs // n on); sizes that would get no epoch are left out."""
    stages: Dict[int, int] = {}
    for i, size in enumerate(sizes):
        stages[i * epochs // len(sizes)] = size  # a later size wins an epoch
    return [dict(epoch=e, img_size=s) for e, s in sorted(stages.items())]


def _overrides(run: StudyRun, img_size: int, epochs: Optional[int], max_steps_per_epoch: Optional[int],
               progressive_sizes: Sequence[int], config_epochs: int) -> List[str]:
    out = [f'train.seed={run.seed}', f'data.img_size={img_size}']
    if epochs is not None:
        out.append(f'train.epochs={epochs}')
    if max_steps_per_epoch is not None:
        out.append(f'train.max_steps_per_epoch={max_steps_per_epoch}')
    if run.progressive:
        stages = progressive_stages(progressive_sizes, epochs or config_epochs)
        out.append('train.progressive=[' + ', '.join(f'{{epoch: {s["epoch"]}, img_size: {s["img_size"]}}}'
                                                      for s in stages) + ']')
    out += [f'model.kwargs.{k}={v}' for k, v in run.model_kwargs().items()]
    return out


# config keys the study sets per run (from its options), not to be overridden
_OWNED = ('model.name', 'train.output_dir', 'train.seed', 'train.epochs', 'train.max_steps_per_epoch',
          'train.progressive', 'data.img_size', 'model.kwargs.ssm_init', 'model.kwargs.dt_min', 'model.kwargs.dt_max',
          'model.kwargs.bandlimit')


def _fields(resolutions: Sequence[int]) -> List[str]:
    return (['run_id', 'setting', 'model', 'init', 'dt_min', 'dt_max', 'bandlimit', 'progressive', 'seed', 'epochs',
             'train_s'] + [f'top1_{r}' for r in resolutions])


def read_runs(path: str) -> List[Dict]:
    """The rows of a study's runs.csv, numbers parsed (`top1` a dict resolution -> top-1 %), one per run_id (the
    first: a file written by two study processes before they checked for each other may hold a run twice)."""
    if not os.path.isfile(path):
        return []
    rows = {}
    with open(path, newline='') as f:
        for r in csv.DictReader(f):
            rows.setdefault(r['run_id'], dict(
                r, seed=int(r['seed']), epochs=int(r['epochs']), train_s=float(r['train_s']),
                progressive=r['progressive'] == 'True',
                top1={int(k[5:]): float(v) for k, v in r.items() if k.startswith('top1_') and v != ''}))
    return list(rows.values())


def _recorded_resolutions(path: str) -> Optional[List[int]]:
    """The test resolutions of a study's runs.csv (its header), the training resolution first; None if none."""
    if not os.path.isfile(path):
        return None
    with open(path, newline='') as f:
        header = next(csv.reader(f), [])
    return [int(k[5:]) for k in header if k.startswith('top1_')] or None


def _begun_runs(out_dir: str) -> bool:
    """Whether `out_dir` holds a run: a row of runs.csv, or a run folder its training has begun (its config.yaml)."""
    runs = os.path.join(out_dir, 'runs')
    return bool(read_runs(os.path.join(out_dir, RUNS_CSV))) or (os.path.isdir(runs) and any(
        os.path.isfile(os.path.join(runs, name, 'config.yaml')) for name in os.listdir(runs)))


def _check_settings(out_dir: str, settings: Dict, starting: bool, log: Callable[[str], None]) -> None:
    """Refuse to continue a study in `out_dir` with other shared settings than its runs were trained with (recorded
    in `SETTINGS_JSON`); record them when a run is `starting` (settings recorded for no run are replaced)."""
    path = os.path.join(out_dir, SETTINGS_JSON)
    begun = _begun_runs(out_dir)
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
        # (a file written before img_size was kept holds none: unknown, not changed; runs.csv's header is checked)
        changed = [k for k in settings
                   if recorded.get(k) != settings[k] and not (k == 'img_size' and k not in recorded)]
        if not changed and set(settings) <= set(recorded):
            return
        if changed and begun:
            before = ', '.join(f'{k}={recorded.get(k)!r}' for k in changed)
            now = ', '.join(f'{k}={settings[k]!r}' for k in changed)
            raise ValueError(f'{out_dir} holds runs trained with {before}, not {now}: continue that study with its '
                             f'settings, or choose another output folder')
    elif begun and starting:
        log(f'{path}: none (a study begun before it was kept); recording these settings for the next runs')
    if starting:
        os.makedirs(out_dir, exist_ok=True)
        with replaced_atomically(path) as tmp, open(tmp, 'w') as f:
            json.dump(settings, f, indent=1)


def _append_row(path: str, row: Dict, fields: List[str]) -> bool:
    """Append one row (the header first in a new file) unless the file holds its run_id already (another study
    process on the folder recorded it first); False then. The check and the write hold an exclusive lock on the
    file, and the line is written and flushed in one call."""
    with open(path, 'a+', newline='') as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # (released when the file is closed)
        f.seek(0)
        reader = csv.DictReader(f)
        header = reader.fieldnames  # (None: a new, empty file)
        if header is not None and header != fields:
            raise ValueError(f'{path} holds runs with the columns {header}, this study writes {fields}: '
                             'use another --out (or the same resolutions)')
        if any(r['run_id'] == row['run_id'] for r in reader):
            return False
        writer = csv.DictWriter(f, fieldnames=fields)  # ('a+': written at the end, wherever the reading stopped)
        if header is None:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())
    return True


def _run_config(run_dir: str):
    """The config a run was trained with (its config.yaml; the baseline's optim.ssm_lr is the recipe's, on purpose)."""
    return _load_recipe(os.path.join(run_dir, 'config.yaml'))


def _train_seconds(run_dir: str) -> float:
    """The sum of the run's epoch times (the trainer's metrics.csv, restored across resumes)."""
    with open(os.path.join(run_dir, 'metrics.csv'), newline='') as f:
        return sum(float(r['epoch_time_s']) for r in csv.DictReader(f) if r.get('epoch_time_s'))


def _evaluate(run: StudyRun, run_dir: str, resolutions: Sequence[int], img_size: int) -> Dict[int, float]:
    """Top-1 (%) of the run's best weights at every resolution, the model built and the digits resampled and
    normalized as its config.yaml says (as the trainer's validation does)."""
    cfg = _run_config(run_dir)
    kwargs = dict(cfg.model.kwargs)
    data = (('mean', cfg.data.mean), ('std', cfg.data.std), ('interpolation', cfg.data.interpolation))
    overlay = {k: v for k, v in data if v is not None}
    if overlay:
        kwargs['pretrained_cfg_overlay'] = overlay
    model = load_model(run.model, os.path.join(run_dir, 'best.safetensors'), num_classes=10,
                       in_chans=cfg.data.in_chans, img_size=img_size, model_kwargs=kwargs)
    rows = eval_resolution({run.setting: model}, 'mnist', resolutions, train_resolution=img_size)
    return {r['resolution']: r['top1'] for r in rows}


def run_study(
        runs: Sequence[StudyRun],
        out_dir: str = 'output/zero_shot_study',
        img_size: int = 64,
        resolutions: Sequence[int] = (64, 96, 128, 256),
        epochs: Optional[int] = None,
        max_steps_per_epoch: Optional[int] = None,
        progressive_sizes: Sequence[int] = (32, 48, 64),
        report_only: bool = False,
        overrides: Sequence[str] = (),
        log: Callable[[str], None] = print,
) -> List[Dict]:
    """Train and evaluate every run not yet in `out_dir`/runs.csv, then write the table and the plot.

    Args:
        runs: from `study_grid`.
        img_size: training resolution (the models' reference grid); must be the first of `resolutions`
            and the last of `progressive_sizes` (when a run is progressive).
        epochs, max_steps_per_epoch: None keeps the config's (5 epochs, every batch).
        report_only: train nothing; the table and plot of the rows already there (at the resolutions they were
            trained and tested at, whatever `img_size` and `resolutions` say).
        overrides: further config overrides for every run, before the run's own (e.g. data.batch_size=128,
            train.mixed_precision=bf16 on a GPU); they change what is compared, so keep them for a whole study. The
            data stay MNIST-5k (the runs are evaluated on it).
    Returns:
        The rows of runs.csv (see `read_runs`).
    """
    path = os.path.join(out_dir, RUNS_CSV)
    recorded = _recorded_resolutions(path)  # the study's own: training resolution first
    if report_only:
        if not read_runs(path):
            raise ValueError(f'report_only: no runs recorded in {path} (train them first, or check the output folder)')
        resolutions, img_size = recorded, recorded[0]
    resolutions = list(resolutions)
    if not resolutions or resolutions[0] != img_size:
        raise ValueError(f'resolutions must start with the training resolution img_size={img_size}, got {resolutions}')
    if recorded is not None and recorded != resolutions:
        raise ValueError(f'{path} holds runs trained at {recorded[0]} px and tested at {recorded}: continue that study '
                         f'with img_size={recorded[0]} and these resolutions, or choose another output folder')
    if not report_only and any(r.progressive for r in runs) and list(progressive_sizes)[-1:] != [img_size]:
        raise ValueError(f'progressive_sizes (--progressive-sizes) must end with img_size={img_size} (--img-size) for '
                         f'the progressive runs, got {list(progressive_sizes)}')
    _check_positive('resolutions', resolutions)
    check_resolutions(resolutions)  # (integers, each once: runs.csv has a column per resolution)
    _check_positive('progressive_sizes', progressive_sizes)
    owned = [o for o in overrides if o.split('=')[0].strip() in _OWNED]
    if owned:
        raise ValueError(f'overrides {owned} set what the study sets per run ({", ".join(_OWNED)}): use its options')
    fields = _fields(resolutions)
    done = {r['run_id'] for r in read_runs(path)}
    todo = [] if report_only else [r for r in runs if r.run_id not in done]
    from ..train import load_config
    config_epochs = load_config(CONFIG).train.epochs
    if any(r.progressive for r in todo):  # (a size without an epoch is left out: the row would be no such run)
        stages = progressive_stages(progressive_sizes, epochs or config_epochs)
        if len(set(progressive_sizes)) < 2 or len(stages) < len(progressive_sizes):
            raise ValueError(
                f'progressive_sizes (--progressive-sizes) must be at least 2 sizes, each with an epoch of the '
                f'{epochs or config_epochs} a run trains (--epochs), for the progressive runs: they would train at '
                f'{[s["img_size"] for s in stages]} px only, got {list(progressive_sizes)}')
    planned = []  # (run, its folder, its overrides), every config loaded as the run will (a bad value fails here)
    for run in todo:
        run_dir = os.path.join(out_dir, 'runs', run.run_id)
        run_overrides = list(overrides) + _overrides(run, img_size, epochs, max_steps_per_epoch, progressive_sizes,
                                                     config_epochs)
        dataset = _train_config(CONFIG, run.model, run_dir, run_overrides).data.dataset
        if dataset != 'mnist':  # (its evaluation reads MNIST-5k: a model trained on other data would be scored on it)
            raise ValueError(f"overrides: the study trains and evaluates on MNIST-5k (data.dataset mnist), got "
                             f"data.dataset {dataset!r}: evaluate models trained on other data with eval-resolution")
        planned.append((run, run_dir, run_overrides))
    if not report_only:
        _check_settings(out_dir, dict(img_size=img_size, epochs=epochs, max_steps_per_epoch=max_steps_per_epoch,
                                      progressive_sizes=[int(s) for s in progressive_sizes],
                                      overrides=list(overrides)), starting=bool(todo), log=log)
    from ..train import RunFolderInUse, TrainingDiverged
    for i, (run, run_dir, run_overrides) in enumerate(planned):
        if any(r['run_id'] == run.run_id for r in read_runs(path)):  # (a study beside this one finished it since)
            log(f'[{i + 1}/{len(todo)}] {run.run_id}: recorded by another study on {out_dir} meanwhile, skipped')
            continue
        log(f'[{i + 1}/{len(todo)}] {run.run_id}')
        t0 = time.perf_counter()
        try:
            _train(CONFIG, run.model, run_dir, run_overrides)
        except TrainingDiverged as e:  # a setting that diverges does not stop the others (a rerun tries again)
            log(f'    diverged, left out of {RUNS_CSV}: {e}')
            continue
        except RunFolderInUse:  # (a study beside this one trains it: that one records it)
            log(f'    trained by another study on {out_dir} now: skipped')
            continue
        top1 = _evaluate(run, run_dir, resolutions, img_size)
        dt_min, dt_max = run.dt_range or ('', '')
        recorded = _append_row(path, dict(
            run_id=run.run_id, setting=run.setting, model=run.model, init=run.init or '', dt_min=dt_min,
            dt_max=dt_max, bandlimit='' if run.bandlimit is None else run.bandlimit, progressive=run.progressive,
            seed=run.seed, epochs=_run_config(run_dir).train.epochs, train_s=f'{_train_seconds(run_dir):.1f}',
            **{f'top1_{r}': f'{top1[r]:.2f}' for r in resolutions}), fields)
        if not recorded:
            log(f'    recorded by another study on {out_dir} meanwhile: not recorded again')
        log('    top-1 ' + ', '.join(f'{top1[r]:.1f}% at {r} px' for r in resolutions)
            + f' ({time.perf_counter() - t0:.0f} s)')
    rows = read_runs(path)
    if rows:
        summary = summarize_runs(rows, img_size)
        with replaced_atomically(os.path.join(out_dir, TABLE_NAME)) as tmp, open(tmp, 'w') as f:
            f.write(format_study(summary, img_size) + '\n')
        plot_study(summary, os.path.join(out_dir, PLOT_NAME), img_size)
        log(format_study(summary, img_size))
        log(f'\ntable: {os.path.join(out_dir, TABLE_NAME)}\nplot:  {os.path.join(out_dir, PLOT_NAME)}')
    return rows


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize_runs(rows: Sequence[Dict], img_size: int) -> List[Dict]:
    """Per setting (baseline first, then by init, dt range and band-limit): what it is (model, init, dt_range,
    bandlimit, progressive), seeds, mean and std of top-1 per resolution, of the fraction of the `img_size`
    accuracy kept at every resolution (per seed, then averaged), and of the training time. A run_id given twice
    counts once (its first row), not as another seed."""
    unique: Dict[str, Dict] = {}
    for r in rows:
        unique.setdefault(r['run_id'], r)
    by_setting: Dict[str, List[Dict]] = {}
    for r in unique.values():
        by_setting.setdefault(r['setting'], []).append(r)
    out = []
    for setting, mine in by_setting.items():
        resolutions = sorted(set.intersection(*(set(r['top1']) for r in mine)))
        kept = {res: [r['top1'][res] / r['top1'][img_size] if r['top1'].get(img_size) else 0.0 for r in mine]
                for res in resolutions}
        first = mine[0]
        out.append(dict(
            setting=setting, seeds=sorted(r['seed'] for r in mine), model=first['model'], init=first['init'],
            dt_range=(float(first['dt_min']), float(first['dt_max'])) if first['dt_min'] else None,
            bandlimit=float(first['bandlimit']) if first['bandlimit'] else None,
            progressive=first['progressive'],
            top1={res: _mean_std([r['top1'][res] for r in mine]) for res in resolutions},
            kept={res: _mean_std(v) for res, v in kept.items()},
            train_s=_mean_std([r['train_s'] for r in mine])))
    return sorted(out, key=_order)


def _order(s: Dict) -> tuple:
    """Table order: the baseline, then S4ND settings by init, dt range and band-limit (off first, then from
    the highest cut-off down), each progressive twin after its fixed-size setting."""
    if s['model'] != S4ND_MODEL:
        return (0, s['model'], (), 0.0, s['progressive'])
    init = SSM_INITS.index(s['init']) if s['init'] in SSM_INITS else len(SSM_INITS)
    return (1, init, s['dt_range'], -math.inf if s['bandlimit'] is None else -s['bandlimit'], s['progressive'])


def format_study(summary: Sequence[Dict], img_size: int) -> str:
    """Markdown table: top-1 mean +- std per resolution, kept at 2x and 4x, training time, seeds."""
    resolutions = sorted({res for s in summary for res in s['top1']})
    factors = [f for f in (2, 4) if f * img_size in resolutions]
    head = ([f'{r} px' for r in resolutions] + [f'kept at {f}x' for f in factors]
            + ['train time (s)', 'seeds'])
    lines = [f'| setting (top-1 %, trained at {img_size} px) | ' + ' | '.join(head) + ' |',
             '|---|' + '---|' * len(head)]
    for s in summary:
        cells = [('%.1f +- %.1f' % s['top1'][r]) if r in s['top1'] else '-' for r in resolutions]
        cells += [('%.0f%% +- %.0f' % tuple(100 * v for v in s['kept'][f * img_size]))
                  if f * img_size in s['kept'] else '-' for f in factors]
        cells += ['%.0f +- %.0f' % s['train_s'], ','.join(str(x) for x in s['seeds'])]
        lines.append(f'| {s["setting"]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot_study(summary: Sequence[Dict], path: str, img_size: int) -> str:
    """Three panels, saved as PNG: top-1 (mean over seeds, std as error bars) against test resolution for the
    baseline and the settings with a progressive twin (both drawn; every setting where no S4ND setting has one); and
    the share of the training-resolution accuracy kept at 2x and at 4x for every fixed-size S4ND setting, grouped by
    init and dt range, one bar per band-limit."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.8), dpi=110)
    curves, kept_2x, kept_4x = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=[1.2, 1, 1]))
    twinned = {s['setting'][:-len(' progressive')] for s in summary if s['progressive']}
    shown = [s for s in summary if s['model'] == BASELINE or s['setting'] in twinned or s['progressive']]
    if not any(s['model'] != BASELINE for s in shown):  # (no S4ND setting singled out by a twin: every setting, not
        shown = list(summary)  # the baseline alone, e.g. --progressive none: without 2x or 4x, no S4ND result drawn)
    colors = colormaps['tab10']
    base_names = list(dict.fromkeys(s['setting'].replace(' progressive', '') for s in shown))
    for s in shown:
        res = sorted(s['top1'])
        name = s['setting'].replace(' progressive', '')
        color = 'black' if s['model'] == BASELINE else colors(base_names.index(name) % 10)
        curves.errorbar(res, [s['top1'][r][0] for r in res], yerr=[s['top1'][r][1] for r in res], marker='o',
                        markersize=3, capsize=2, linestyle='--' if s['progressive'] else '-', color=color,
                        label=s['setting'])
    curves.axvline(img_size, color='gray', linestyle=':', linewidth=1)
    curves.set_xscale('log', base=2)
    ticks = sorted({r for s in summary for r in s['top1']})
    curves.set_xticks(ticks, [str(t) for t in ticks])
    curves.set_ylim(0, 100)
    curves.set_xlabel(f'test resolution (px), trained at {img_size} px')
    curves.set_ylabel('top-1 accuracy (%), mean over seeds')
    curves.set_title('top-1 (dashed: progressive resizing)')
    curves.grid(alpha=0.3)
    curves.legend(fontsize=6, loc='lower right', bbox_to_anchor=(1.0, 0.15))

    grid = [s for s in summary if s['model'] != BASELINE and not s['progressive']]
    groups = sorted({(s['init'], s['dt_range']) for s in grid}, key=lambda g: (SSM_INITS.index(g[0]), g[1]))
    cuts = sorted({s['bandlimit'] for s in grid}, key=lambda c: -math.inf if c is None else -c)  # off, high to low
    width = 0.8 / max(len(cuts), 1)
    for ax, factor in ((kept_2x, 2), (kept_4x, 4)):
        res = factor * img_size
        for j, cut in enumerate(cuts):
            mine = {(s['init'], s['dt_range']): s for s in grid if s['bandlimit'] == cut and res in s['kept']}
            xs = [i + (j - (len(cuts) - 1) / 2) * width for i, g in enumerate(groups) if g in mine]
            vals = [mine[g]['kept'][res] for g in groups if g in mine]
            if vals:  # (an empty bar set would still be a legend entry, in the default colour)
                ax.bar(xs, [100 * v[0] for v in vals], width, yerr=[100 * v[1] for v in vals], capsize=2,
                       color=colors(j), label='band-limit off' if cut is None else f'band-limit {cut:g}')
        ax.set_xticks(range(len(groups)), [f'{init}\ndt {lo:g}-{hi:g}' for init, (lo, hi) in groups], fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f'% of the {img_size} px top-1 kept at {res} px')
        ax.grid(alpha=0.3, axis='y')
        if grid and not any(res in s['kept'] for s in grid):  # (an empty panel read as measured, every bar at 0)
            ax.set_title(f'kept at {factor}x ({res} px): not tested')
            ax.text(0.5, 0.5, f'{res} px is not among the test resolutions', ha='center', va='center',
                    transform=ax.transAxes)
            continue
        ax.set_title(f'kept at {factor}x ({res} px), fixed-size training')
        if grid:
            ax.legend(fontsize=7, loc='lower right')
    fig.suptitle('Zero-shot resolution: ConvNeXt-S4ND-atto settings and ConvNeXt-atto on MNIST-5k '
                 '(mean +- std over seeds)')
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format='png')
    return path


def parse_dt_range(text: str) -> Tuple[float, float]:
    """'0.1,1' -> (0.1, 1.0)."""
    parts = text.split(',')
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f'a dt range is DT_MIN,DT_MAX (e.g. 0.1,1), got {text!r}') from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ValueError(f'a dt range needs finite 0 < DT_MIN <= DT_MAX, got {text!r}')
    return low, high


def parse_bandlimit(text: str) -> Optional[float]:
    """'off' / 'none' / 0 -> None (no band-limit), else a positive float."""
    if text.lower() in ('off', 'none'):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"a band-limit is 'off' (or 0) or a positive number, got {text!r}")
    return value or None
