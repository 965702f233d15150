"""The `s4nd-vision` command: one entry point, a subcommand per job.

    s4nd-vision demo [--setting iso|convnext]          # zero-shot resolution demo on built-in data
    s4nd-vision train --config imagenet/convnext_s4nd_tiny.yaml data.root=/data/imagenet
    s4nd-vision eval-resolution --models ... --resolutions 14 20 28 42
    s4nd-vision kernel-report --model convnext_s4nd_atto --img-size 64 --bandlimits 1.0 0.5
    s4nd-vision zero-shot-study --inits lin legs --seeds 0 1 2 --out output/zero_shot_study
    s4nd-vision inflate 2d.safetensors 3d.safetensors --model convnext_s4nd_3d_tiny
    s4nd-vision benchmark | flops MODEL ... | smoke | gpu-check
    s4nd-vision export convnext_s4nd_tiny --sizes 224 288x352      # ONNX with dynamic sizes
    s4nd-vision seq-mnist --rows 14 --cols 14                       # sequential MNIST at other sampling rates

`python -m s4nd_vision ...` is the same command (e.g. `accelerate launch -m s4nd_vision train ...`), and each
`tools/<name>.py` script of the repository is `s4nd-vision <name>` with the same arguments. Every command imports
torch and timm first (the package registers its models with timm when imported: about 5 s on a 2-core machine).
"""
import argparse
import importlib.util
import os
import sys
from collections import Counter
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

__all__ = ['COMMANDS', 'main', 'tool_main', 'build_parser']


_RAW = argparse.RawDescriptionHelpFormatter


class Command(NamedTuple):
    help: str  # one line, in `s4nd-vision --help`
    description: str  # the subcommand's --help text
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], object]


def _model_spec(flag: str, spec: str, parser: argparse.ArgumentParser):
    """(name, kwargs) of a `NAME[,key=value...]` option (`parse_model_spec`); a malformed one is `flag`'s error."""
    from .utils.model_spec import parse_model_spec
    try:
        return parse_model_spec(spec)
    except ValueError as e:
        parser.error(f'{flag}: {e}')


# ---------------------------------------------------------------------------------------------- demo

def _bandlimit_arg(text: str):
    """'off' (or 0) or a positive number (argparse type)."""
    from .eval.zero_shot_study import parse_bandlimit
    try:
        value = parse_bandlimit(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return 'off' if value is None else value


def _cutoff_arg(text: str) -> float:
    """A band-limit to set: 'off' or 0 -> 0.0 (off), else a positive number (argparse type)."""
    value = _bandlimit_arg(text)
    return 0.0 if value == 'off' else value


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval.demo import SETTINGS
    parser.add_argument('--setting', choices=sorted(SETTINGS), default='iso')
    parser.add_argument('--out', default=None, help='output folder (default: output/demo/<setting>)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--bandlimit', type=_bandlimit_arg, default=None,
                        help="S4ND band-limit cut-off (masks kernel modes above bandlimit/2 cycles per step) or 'off'; "
                             "default: the model's own (ConvNeXt-S4ND 1.0, isotropic S4ND off; see the README)")
    parser.add_argument('--epochs', type=int, default=None, help="override the config's epochs")
    parser.add_argument('--max-steps-per-epoch', type=int, default=None, help='cap the updates per epoch (quick check)')


def _demo_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from .eval.demo import run_demo
    from .train import TrainingDiverged
    from .utils.runtime import keep_freed_memory
    keep_freed_memory()  # reuse freed memory instead of page-faulting it in again (CPU speed)
    try:
        return run_demo(args.setting, out_dir=args.out, seed=args.seed,
                        bandlimit=args.bandlimit, epochs=args.epochs, max_steps_per_epoch=args.max_steps_per_epoch)
    except TrainingDiverged as e:  # one line and exit status 3, as train's (not a traceback)
        print(f'error: {e}', file=sys.stderr)
        sys.exit(3)


# --------------------------------------------------------------------------------------------- train

def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train.cli import add_arguments
    add_arguments(parser)


def _train_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from .train.cli import run
    from .utils.runtime import keep_freed_memory
    keep_freed_memory()
    return run(args, parser)


# --------------------------------------------------------------------------------------- eval-resolution

def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--models', nargs='+', required=True,
                        help="timm model names, or shared weights: 'hf-hub:USER/REPO', 'local-dir:PATH'; with the "
                             "arguments a model was built with as NAME,key=value,... (YAML values), e.g. "
                             "vit_s4nd_small_patch16_224,token_layout=1d")
    parser.add_argument('--checkpoints', nargs='+', default=None,
                        help='one weights file per model (safetensors or torch); omit for untrained models')
    parser.add_argument('--labels', nargs='+', default=None, help='one display name per model (default: the names)')
    parser.add_argument('--data', default='mnist', help="'mnist' (built-in MNIST-5k) or an ImageFolder directory")
    parser.add_argument('--split', default='validation', help='sub-folder of an ImageFolder --data to use, if present')
    parser.add_argument('--resolutions', nargs='+', type=int, required=True, help='input sides in pixels')
    parser.add_argument('--train-resolution', type=int, default=None,
                        help="the models' training resolution: they are built for it (the S4ND kernels' "
                             "reference grid)")
    parser.add_argument('--bandlimit', type=_cutoff_arg, default=None,
                        help="band-limiting cut-off of the S4ND models, or 'off' (or 0) (default: the one saved with "
                             "their weights, else the model's own)")
    parser.add_argument('--in-chans', type=int, default=None, help='input channels of the models (default: theirs)')
    parser.add_argument('--crop-pct', type=_crop_fraction, default=None,
                        help="ImageFolder center crop, a fraction in (0, 1] (default: each model's)")
    parser.add_argument('--interpolation', type=_interpolation, default=None,
                        help="resampling of the inputs to each resolution, a timm interpolation such as bilinear or "
                             "bicubic (default: each model's cfg)")
    parser.add_argument('--mean', type=float, nargs='+', default=None,
                        help="input normalization the models were trained with (default: each model's cfg), "
                             'e.g. --mean 0.1307 --std 0.3081 for the MNIST demo models')
    parser.add_argument('--std', type=float, nargs='+', default=None, help='see --mean')
    parser.add_argument('--out', default='output/eval_resolution', help='folder for the CSV and PNG')
    parser.add_argument('--batch-size', type=_positive_int, default=64)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--device', default='cpu')


def _eval_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    checkpoints = args.checkpoints or [None] * len(args.models)
    labels = args.labels or args.models
    for flag, values in (('--checkpoints', checkpoints), ('--labels', labels)):
        if len(values) != len(args.models):
            parser.error(f'{flag} needs one entry per model ({len(args.models)}), got {len(values)}')
    if len(set(labels)) != len(labels):
        parser.error('two models share a display name: pass distinct --labels')
    from .eval.resolution import dataset_num_classes, eval_resolution, format_table, load_model
    from .models._checkpoint import weights_num_classes
    specs = [_model_spec('--models', spec, parser) for spec in args.models]
    overlay = {k: tuple(v) for k, v in (('mean', args.mean), ('std', args.std)) if v is not None}
    if args.interpolation is not None:
        overlay['interpolation'] = args.interpolation
    folder_classes = dataset_num_classes(args.data, args.split)

    def num_classes(name, kwargs, ckpt):
        """The classes the model is built with where load_model would not know them: its --models num_classes, else
        its weights' (load_model reads them), else the data's (eval_resolution then refuses data whose classes are
        not the model's)."""
        if 'num_classes' in kwargs or name.startswith(('hf-hub:', 'local-dir:')):
            return None  # (in kwargs; shared weights: their config's)
        return None if weights_num_classes(name, ckpt) is not None else folder_classes

    models = {
        label: load_model(name, ckpt, num_classes=num_classes(name, kwargs, ckpt), in_chans=args.in_chans,
                          bandlimit=args.bandlimit, img_size=args.train_resolution,
                          model_kwargs=dict(kwargs, **({'pretrained_cfg_overlay': overlay} if overlay else {})))
        for label, (name, kwargs), ckpt in zip(labels, specs, checkpoints)
    }
    for flag, values in (('--mean', args.mean), ('--std', args.std)):  # (a model's own cfg is fitted; these are not)
        for label, model in models.items():
            chans = getattr(model, 'in_chans', 3)
            if values is not None and len(values) not in (1, chans):
                parser.error(f'{flag} needs one value or one per input channel ({chans} for {label}), got '
                             f'{len(values)}')
    rows = eval_resolution(
        models, args.data, args.resolutions, train_resolution=args.train_resolution, split=args.split,
        batch_size=args.batch_size, device=args.device, num_workers=args.workers, crop_pct=args.crop_pct,
        out_dir=args.out)
    print(format_table(rows))
    if any(r['skipped'] for r in rows):
        print(f'not scored: {max(r["skipped"] for r in rows)} unreadable validation images')
    print(f'wrote {args.out}/accuracy_vs_resolution.csv and {args.out}/accuracy_vs_resolution.png')
    return rows


# ------------------------------------------------------------------------------------------ kernel-report

def _kernel_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='convnext_s4nd_atto',
                        help='timm model name (S4ND layers with S4D or S4 kernels), with arguments as '
                             'NAME,key=value,... if it needs them (YAML values)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=_model_kwargs_action(),
                        help='model constructor arguments, e.g. ssm_init=legs dt_min=0.05 dt_max=0.5')
    parser.add_argument('--checkpoint', default=None, help='weights file (e.g. a run\'s best.safetensors); default: '
                        'the initialization of --seed')
    parser.add_argument('--img-size', type=int, default=None,
                        help="the model's training resolution: every layer's reference grid (default: the model's)")
    parser.add_argument('--num-classes', type=int, default=None, help="classifier size of --checkpoint's model")
    parser.add_argument('--in-chans', type=int, default=None, help="input channels of --checkpoint's model")
    parser.add_argument('--bandlimits', type=_cutoff_arg, nargs='+', default=None,
                        help="cut-offs to measure, 'off' (or 0) for none (default: each kernel's own)")
    parser.add_argument('--plot-layer', default=None,
                        help='S4ND layer (module name, e.g. stem.1 or stages.3.downsample.1) whose kernels to plot '
                             '(default: the first)')
    parser.add_argument('--axis', type=int, default=0, help='axis of --plot-layer to plot')
    parser.add_argument('--channels', type=int, nargs='+', default=[0, 1], help='channels of --plot-layer to plot')
    parser.add_argument('--seed', type=int, default=0, help='seed of the initialization')
    parser.add_argument('--out', default='output/kernel_report', help='folder for the CSV and the PNG')


def _kernel_report_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    import torch

    from .eval.kernel_report import (
        format_report,
        format_summary,
        kernel_report,
        plot_layer_kernels,
        plotted_layer,
        s4nd_layers,
        summarize,
        write_report_csv,
    )
    from .eval.resolution import load_model, same_model_argument
    from .models import input_size_args
    name, kwargs = _model_spec('--model', args.model, parser)
    if args.img_size is not None and name.startswith(('hf-hub:', 'local-dir:')):  # (not in the model registry)
        parser.error(f'--img-size: {name} is shared weights, which hold the resolution they were trained at (their '
                     f'S4ND reference grids, which the report measures): leave --img-size out')
    if args.img_size is not None and 'img_size' not in input_size_args(name):
        parser.error(f'--img-size: {name} is not one of our image models built for a resolution (a sequence '
                     f'model takes its reference length as --model-kwargs seq_len=N)')
    # (img_size=64 and img_size=[64,64] are one size: both spellings are taken, as with --img-size)
    given = args.model_kwargs
    clash = [k for k in kwargs if k in given and not same_model_argument(k, kwargs[k], given[k])]
    if clash:  # (else the NAME,key=value one would win silently)
        parser.error(f'--model and --model-kwargs set {", ".join(clash)} to different values: give each once')
    torch.manual_seed(args.seed)
    model = load_model(name, args.checkpoint, num_classes=args.num_classes, in_chans=args.in_chans,
                       img_size=args.img_size, model_kwargs=dict(args.model_kwargs, **kwargs))
    if not s4nd_layers(model):
        raise ValueError(f'{args.model} has no S4ND layer with S4D or S4 kernels: no kernel to report')
    layer = args.plot_layer or s4nd_layers(model)[0][0]
    try:  # before any work or output: a bad --plot-layer/--axis/--channels must not leave a CSV behind
        plotted_layer(model, layer, args.axis, args.channels)
    except ValueError as e:
        parser.error(f'--plot-layer/--axis/--channels: {e}')
    rows = []
    for cut in args.bandlimits or [None]:
        rows += kernel_report(model, bandlimit=cut)
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f'kernels_{layer}.png')
    if os.path.exists(png):  # an earlier run's: a run stopped between the two writes leaves no plot beside its CSV
        os.remove(png)
    csv_path = write_report_csv(rows, os.path.join(args.out, 'kernel_report.csv'))
    # the mask of the first cut-off that masks (`--bandlimits off 1.0` plots 1.0's; only 'off': nothing masked)
    cut = next((c for c in args.bandlimits if c), 0.0) if args.bandlimits else None
    png = plot_layer_kernels(model, layer, png, bandlimit=cut, axis=args.axis, channels=args.channels)
    for cut in dict.fromkeys(r['bandlimit'] for r in rows):
        mine = [r for r in rows if r['bandlimit'] == cut]
        print(f'\nbandlimit {"off" if not cut else cut}:\n\n{format_summary(summarize(mine))}\n')
    print(format_report(rows))
    print(f'\nwrote {csv_path} and {png}')
    return rows


# ---------------------------------------------------------------------------------------- zero-shot-study

def _study_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval.zero_shot_study import PROGRESSIVE_CHOICES
    parser.add_argument('--inits', nargs='+', default=['lin', 'inv', 'legs'], help='S4D initializations')
    parser.add_argument('--dt-ranges', nargs='+', default=['0.1,1', '0.05,0.5'], metavar='DT_MIN,DT_MAX',
                        help='step-size initialization ranges')
    parser.add_argument('--bandlimits', nargs='+', default=['off', '1.0', '0.5'],
                        help="band-limit cut-offs ('off' or a positive number)")
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--no-baseline', action='store_true', help='leave out plain ConvNeXt-atto')
    parser.add_argument('--progressive', choices=PROGRESSIVE_CHOICES, default='unlimited',
                        help="progressive-resizing twins (more runs): of the baseline and the settings without "
                             "band-limit ('unlimited'), of every setting ('all'), or 'none'")
    parser.add_argument('--progressive-sizes', nargs='+', type=int, default=[32, 48, 64],
                        help='progressive resizing: the training sizes, in equal parts of the epochs')
    parser.add_argument('--img-size', type=int, default=64, help='training resolution')
    parser.add_argument('--resolutions', nargs='+', type=int, default=[64, 96, 128, 256],
                        help='test resolutions, the training resolution first')
    parser.add_argument('--epochs', type=int, default=None, help="override the demo config's epochs")
    parser.add_argument('--max-steps-per-epoch', type=int, default=None, help='cap the updates per epoch (quick check)')
    parser.add_argument('--report-only', action='store_true', help='train nothing: table and plot of the runs done')
    parser.add_argument('--overrides', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides for every run (e.g. data.batch_size=128); keep them for a whole study')
    parser.add_argument('--out', default='output/zero_shot_study', help='folder for the runs, CSV, table and plot')


def _study_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from .eval.zero_shot_study import parse_bandlimit, parse_dt_range, run_study, study_grid
    from .utils.runtime import keep_freed_memory
    try:
        runs = study_grid(
            inits=args.inits, dt_ranges=[parse_dt_range(t) for t in args.dt_ranges],
            bandlimits=[parse_bandlimit(t) for t in args.bandlimits], seeds=args.seeds,
            baseline=not args.no_baseline, progressive=args.progressive)
    except ValueError as e:
        parser.error(str(e))
    keep_freed_memory()
    return run_study(
        runs, out_dir=args.out, img_size=args.img_size, resolutions=args.resolutions, epochs=args.epochs,
        max_steps_per_epoch=args.max_steps_per_epoch, progressive_sizes=args.progressive_sizes,
        report_only=args.report_only, overrides=args.overrides)


# ------------------------------------------------------------------------------------------- inflate

def _inflate_arguments(parser: argparse.ArgumentParser) -> None:
    from .models.inflate import CONV_MODES, TIME_INITS
    parser.add_argument('source', help='2D checkpoint: safetensors, or a torch checkpoint with or without a '
                        'wrapper (its EMA weights first, as timm loads them)')
    parser.add_argument('output', help='where to write the 3D weights (safetensors)')
    parser.add_argument('--model', required=True, help='3D timm model: convnext_s4nd_3d_tiny, convnext_3d_tiny, ...')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=_model_kwargs_action(),
                        help='model constructor arguments, e.g. num_frames=30 stem_type=patch; num_frames: the clip '
                        "length the model will train at (S4ND time kernels are referenced to it; the model's default: "
                        '16)')
    parser.add_argument('--time-init', choices=TIME_INITS, default='smooth')
    parser.add_argument('--time-decay', type=float, default=1.0, help='smooth time kernel decay, in frames')
    parser.add_argument('--conv-mode', choices=CONV_MODES, default='repeat')
    parser.add_argument('--keep-head', action='store_true', help='keep the 2D classifier (head.fc)')


def _inflate_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    import logging

    from .models.inflate import inflate_checkpoint
    logging.basicConfig(format='%(message)s')
    logging.getLogger('s4nd_vision').setLevel(logging.INFO)  # the report of what was copied, inflated, initialized
    weights = inflate_checkpoint(
        args.source, args.output, args.model, args.model_kwargs, time_init=args.time_init,
        time_decay=args.time_decay, conv_mode=args.conv_mode, keep_head=args.keep_head)
    print(f'wrote {len(weights)} tensors for {args.model} to {args.output}')
    return weights


# ----------------------------------------------------------------------------------------- benchmark

def _benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    import torch
    what = ['layers', 'kernels', 'step', 'scaling', 'models']
    parser.add_argument('--what', nargs='+', choices=what, default=what)
    parser.add_argument('--step-lengths', nargs='+', type=_positive_int, default=[1024, 16384],
                        help="sequence lengths of the 'step' rows (recurrent step vs recomputed convolution)")
    parser.add_argument('--batch-size', type=_positive_int, default=8)
    parser.add_argument('--img-size', type=_positive_int, default=224)
    parser.add_argument('--pairs', nargs='+', default=['convnext_s4nd_tiny:convnext_tiny'],
                        help='model pairs NAME[,key=value...]:BASELINE[,key=value...], '
                             'e.g. vit_s4nd_small_patch16_224,token_layout=1d:vit_small_patch16_224; num_classes and '
                             'in_chans must be given to both sides alike (a pair given them on one side only is '
                             'refused: it would compare unlike models)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', choices=['bf16', 'fp16'], default=None, help='autocast dtype for the model runs')
    parser.add_argument('--compile', action='store_true', help='run both models through torch.compile')
    parser.add_argument('--num-frames', type=_positive_int, default=None,
                        help='video pairs (e.g. convnext_s4nd_3d_tiny:convnext_3d_tiny): clips of this many frames')
    parser.add_argument('--channels-last', action='store_true',
                        help='models and input in channels-last memory (as GPU training usually runs)')
    parser.add_argument('--repeats', type=_positive_int, default=5)
    parser.add_argument('--json', default=None,
                        help='write the conditions and the rows to this JSON file: {"environment": ..., "rows": [...]}')
    parser.add_argument('--default-malloc', action='store_true',
                        help="leave glibc's allocator as it is "
                             "(by default freed memory is kept: s4nd_vision.utils.runtime)")


def _benchmark_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    import shlex
    import time

    import torch

    from .bench.benchmark import (
        bench_kernels,
        bench_layers,
        bench_models,
        bench_scaling,
        bench_step,
        check_pairs,
        describe_environment,
        environment,
        format_table,
        parse_pair,
        write_json,
    )
    from .utils.runtime import keep_freed_memory
    kept = not args.default_malloc and keep_freed_memory()
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16, None: None}[args.amp]
    pairs = [parse_pair(p) for p in args.pairs] if 'models' in args.what else []
    check_pairs(pairs, img_size=args.img_size, num_frames=args.num_frames)  # (before the other rows' minutes)
    # the conditions every number depends on, stated above the tables and in the JSON (layer, kernel, step and
    # scaling rows run float32 without autocast on channels-last input; amp, channels_last, compile, the size and
    # the pairs are the model rows': recorded only in a run that has them, where they describe something)
    model_settings = dict(amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                          img_size=args.img_size, num_frames=args.num_frames, pairs=args.pairs)
    env = dict(environment(torch.device(args.device)), command=shlex.join(sys.argv), what=args.what,
               batch_size=args.batch_size, repeats=args.repeats, dtype='float32',
               **(model_settings if 'models' in args.what else {}),
               malloc='freed memory kept (keep_freed_memory)' if kept else "the C library's default",
               started=time.strftime('%Y-%m-%d %H:%M:%S %Z'), units='ms per call (median), MB, ratios S4ND / baseline')
    header = f'{describe_environment(env)}; malloc: {env["malloc"]}'
    if 'models' in args.what:
        layout = 'channels-last' if args.channels_last else 'channels-first'
        header += f'; model rows: {f"amp {args.amp}" if amp else "float32"}, {layout}{", compiled" * args.compile}'
    print(header, flush=True)
    # 'complete' turns true after the last row: a file of a run killed (SIGKILL, `timeout`'s SIGTERM) stays false
    results = dict(environment=env, rows=[], complete=False)

    def save() -> None:  # (atomically: an interrupted write leaves the file before it)
        if args.json:
            write_json(results, args.json)

    def measured(row: dict) -> None:  # each row is kept as soon as it is measured
        results.pop('partial', None)
        results['rows'].append(row)
        save()

    def partial(row: dict) -> None:  # a model pair's row as it fills (compile and training times, then memory)
        results['partial'] = row
        save()

    def models(progress: Callable[[dict], None]) -> None:
        for pair in pairs:  # (one at a time: each pair's row is kept as it completes)
            for row in bench_models(pairs=[pair], img_size=args.img_size, batch_size=args.batch_size,
                                    device=args.device, repeats=args.repeats, amp_dtype=amp, compile=args.compile,
                                    num_frames=args.num_frames, channels_last=args.channels_last, progress=partial):
                progress(row)

    common = dict(device=args.device, repeats=args.repeats)
    runs = dict(layers=lambda progress: bench_layers(batch_size=args.batch_size, progress=progress, **common),
                kernels=lambda progress: bench_kernels(batch_size=args.batch_size, progress=progress, **common),
                step=lambda progress: bench_step(lengths=args.step_lengths, progress=progress, **common),
                scaling=lambda progress: bench_scaling(batch_size=args.batch_size, progress=progress, **common),
                models=models)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or '.', exist_ok=True)
    save()
    start = 0
    try:
        for what, run in runs.items():
            if what in args.what:
                start = len(results['rows'])
                run(measured)
                shown = results['rows'][start:]
                print(format_table(shown[1:] if what == 'scaling' else shown), flush=True)  # (growth: from the 2nd)
    except KeyboardInterrupt:  # (Ctrl-C) what was measured stays: the file holds it, the table shows it
        results['interrupted'] = True
        save()
        if len(results['rows']) > start:
            print(format_table(results['rows'][start:]), flush=True)
        written = f', in {args.json}' if args.json else ''
        print(f'{len(results["rows"])} rows measured before the interruption{written}', file=sys.stderr, flush=True)
        raise
    results['complete'] = True
    save()
    if args.json:
        print(f'wrote {args.json}')
    return results


# --------------------------------------------------------------------------------------------- flops

def _flops_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('models', nargs='+',
                        help='timm model names, each with arguments as NAME,key=value,... if it needs them (YAML '
                             'values), e.g. vit_s4nd_small_patch16_224,token_layout=1d')
    parser.add_argument('--img-size', type=_positive_int, default=224)
    parser.add_argument('--batch-size', type=_positive_int, default=1,
                        help='counts are per batch; the S4ND algorithm rule depends on it')
    parser.add_argument('--algorithm', choices=['rule', 'fft', 'toeplitz'], default='rule',
                        help="S4ND convolution algorithm: the per-axis rule, or one for every axis")


def _flops_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    import logging

    from .layers import ops
    specs = [_model_spec('models', spec, parser) for spec in args.models]
    logging.getLogger('fvcore').setLevel(logging.ERROR)  # unsupported ops are printed below instead
    with ops.conv_algorithm(None if args.algorithm == 'rule' else args.algorithm):
        _count_flops(args, specs)


def _count_flops(args: argparse.Namespace, specs) -> None:
    """Print the counts of every model of `args.models` ((name, kwargs) in `specs`), on a batch of its own input
    channels."""
    import timm
    import torch

    from .bench.flops import FlopCountAnalysis, count_flops  # (imports fvcore without its import-time warning)
    from .eval.resolution import min_input_size
    from .models import input_size_args
    for label, (name, kwargs) in zip(args.models, specs):
        own = input_size_args(name)  # this package's image and video models: built for the size
        model = timm.create_model(name, **dict({'img_size': args.img_size} if own else {}, **kwargs)).eval()
        layout = model.pretrained_cfg.get('input_size', (3, 0, 0))
        smallest = min_input_size(model)  # (a timm baseline's conv would fail deeper, less clearly)
        if len(layout) > 2 and args.img_size < smallest:
            raise ValueError(f'--img-size {args.img_size} is smaller than the minimum input size of {label!r} '
                             f'({smallest} px)')
        if not own and len(layout) == 3 and hasattr(model, 'set_input_size'):  # timm ViTs: the patch grid
            model.set_input_size(img_size=args.img_size)
        # an image at --img-size, a clip of the model's frames at it, or a sequence of the model's length
        shape = {2: layout[1:], 3: (args.img_size,) * 2, 4: (layout[1], args.img_size, args.img_size)}[len(layout)]
        x = torch.randn(args.batch_size, getattr(model, 'in_chans', layout[0]), *shape)
        counted = count_flops(model, (x,))
        plain = FlopCountAnalysis(model, (x,))
        top = ', '.join(f'{op} {v / 1e9:.3f}' for op, v in counted.by_operator().most_common())
        print(f'{label} @ {"x".join(map(str, shape))}, batch {args.batch_size}, algorithm {args.algorithm}: '
              f'{counted.total() / 1e9:.3f} GMACs ({2 * counted.total() / 1e9:.2f} GFLOPs); '
              f'plain fvcore {plain.total() / 1e9:.3f} GMACs')
        print(f'  by operator (GMACs): {top}')
        print(f'  not counted: {dict(counted.unsupported_ops())}')


# ----------------------------------------------------------------------------------------- gpu-check

def _gpu_check_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench.gpu_check import BUDGET_S, SECTIONS
    parser.add_argument('--sections', nargs='+', choices=SECTIONS, default=list(SECTIONS),
                        help='what to run (default: all, in this order; compiled while the budget lasts)')
    parser.add_argument('--budget-s', type=_seconds, default=None,
                        help=f'start no row after this many seconds (default: {BUDGET_S} on a GPU, none with --tiny)')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true',
                        help='tiny sizes (minutes on a CPU with TRITON_INTERPRET=1, most of them compiling): '
                        'checks the script, measures nothing')
    parser.add_argument('--json', default=None, help='write the results to this JSON file (after every row)')
    parser.add_argument('--commit', default=None,
                        help="the tree's commit, recorded in the results (default: git's; a copy of the tree without "
                        'its .git folder, e.g. on a lent GPU machine, has none)')
    parser.add_argument('--path', choices=['triton', 'fast'], default=None,
                        help="force S4ND's implementation in the profile and model sections (fast: if triton fails)")
    parser.add_argument('--in-process', action='store_true',
                        help='run every row in this process (the default off CUDA); on CUDA the rows run in a worker '
                        'process, replaced after a row that kills it, breaks its CUDA context or runs past its limit')


def _gpu_check_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from .bench.gpu_check import BUDGET_S, GPU, TINY, run_checks
    if args.json:
        os.makedirs(os.path.dirname(args.json) or '.', exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else (None if args.tiny else BUDGET_S)
    results = run_checks(args.sections, TINY if args.tiny else GPU, args.device, args.json, args.path, budget,
                         isolate=False if args.in_process else None, commit=args.commit)
    if not results['ok']:
        sys.exit(1)
    return results


# --------------------------------------------------------------------------------------------- smoke

def _smoke_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='convnext_s4nd_tiny',
                        help='timm model name, with arguments as NAME,key=value,... if it needs them (YAML values)')
    parser.add_argument('--resolutions', type=_positive_int, nargs='+', default=[224, 288])
    parser.add_argument('--batch-size', type=_positive_int, default=2)


def _smoke_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from .bench.smoke import run
    name, kwargs = _model_spec('--model', args.model, parser)
    run(name, args.resolutions, args.batch_size, model_kwargs=kwargs)


# -------------------------------------------------------------------------------------------- export

def _model_kwargs_action():
    """timm's `--model-kwargs` action: key=value arguments of timm.create_model, values read as Python literals (as
    timm's train.py reads them; a value that is none, such as `legs`, stays a string). Refuses, naming the option,
    what timm would take silently wrongly: a malformed option (timm: a traceback), None (timm.create_model drops it,
    so the model would take its default) and true/false/null spelt the YAML way (a non-empty string is true)."""
    import ast

    from .utils.model_spec import NULL_OPTION

    class ModelKwargs(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            kwargs = {}
            for option in values:
                key, sep, text = option.partition('=')
                if not sep or not key.strip() or not text:
                    raise argparse.ArgumentError(self, f'model option {option!r} must look like key=value')
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = text
                if value is None:
                    raise argparse.ArgumentError(self, f'{option}: {NULL_OPTION}')
                if isinstance(value, str) and value.lower() in ('true', 'false', 'null', 'none'):
                    raise argparse.ArgumentError(self, f'{option}: values are Python literals, as in timm\'s train.py '
                                                       f'(True, False; a string {value!r} would be passed as it is)')
                kwargs[key.strip()] = value
            setattr(namespace, self.dest, kwargs)

    return ModelKwargs


def _crop_fraction(text: str) -> float:
    """An argparse type: a centre-crop fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f'expects a fraction in (0, 1], got {text!r}')
    return value


def _interpolation(text: str) -> str:
    """An argparse type: an interpolation timm's eval transforms know (not 'random', a training augmentation)."""
    from timm.data.transforms import str_to_interp_mode
    try:
        str_to_interp_mode(text)
    except KeyError:
        raise argparse.ArgumentTypeError(f"expects a timm interpolation such as 'bilinear' or 'bicubic', got "
                                         f"{text!r}") from None
    return text


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expects a positive integer, got {text!r}')
    return value


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds, 0 or more ('inf' for no limit; not nan, which no time exceeds)."""
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'expects a number of seconds (0 or more), got {text!r}')
    return value


def _size(text: str) -> Tuple[int, ...]:
    """Sides joined by x (HxW, TxHxW; L for a sequence), each a positive integer; one side S stands for every
    side of the model's input (a square image): see `_model_size`."""
    try:
        sides = tuple(int(side) for side in text.split('x'))
    except ValueError:
        sides = ()
    if not sides or min(sides) < 1:
        raise argparse.ArgumentTypeError(f'expects a size HxW (TxHxW for clips) or S, got {text!r}')
    return sides


def _model_size(size: Tuple[int, ...], sides: int) -> Tuple[int, ...]:
    """`size` (from `_size`) for a model whose inputs have `sides` sides: one side repeated; ValueError if neither
    one side nor `sides`."""
    if len(size) == 1:
        return size * sides
    if len(size) != sides:
        raise ValueError(f'the model takes inputs of {sides} sides, got {len(size)}')
    return size


def _size_text(size: Sequence[int]) -> str:
    return 'x'.join(str(side) for side in size)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', help="a registered model name, e.g. convnext_s4nd_tiny, or shared weights: "
                        "'hf-hub:USER/REPO', 'local-dir:PATH'")
    parser.add_argument('--output', default=None, help='ONNX file (default: output/<model>.onnx; for hf-hub:USER/REPO '
                        'or local-dir:PATH, output/<REPO or the folder\'s name>.onnx)')
    parser.add_argument('--checkpoint', default=None,
                        help='weights to load (safetensors or torch file; training checkpoints unwrap)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=_model_kwargs_action(),
                        help='key=value arguments of timm.create_model (values as Python literals, as in timm)')
    parser.add_argument('--trace-size', type=_size, default=None,
                        help="HxW the graph is traced at (TxHxW for a clip, L for a sequence, with --fixed-size; "
                             "default: the model's input size, at least 3 strides without --fixed-size)")
    parser.add_argument('--fixed-size', action='store_true',
                        help='a graph of --trace-size only (the batch stays dynamic): onnxruntime folds the S4ND '
                             'kernels into constants when it loads the file, so calls are faster')
    parser.add_argument('--sizes', nargs='*', type=_size, default=[],
                        help='HxW sizes to check and time the file at (or as --trace-size; from 1 stride)')
    parser.add_argument('--max-side', type=_positive_int, default=None,
                        help='the largest height and width the graph declares, in pixels (default: 2048; not with '
                             '--fixed-size); --trace-size and --sizes may not exceed it')
    parser.add_argument('--batch-size', type=_positive_int, default=1)
    parser.add_argument('--threads', type=_positive_int, default=None,
                        help='threads of torch and onnxruntime (default: all)')


def _export_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    import json
    import time

    import torch

    from .deploy.export import (
        check_export_size,
        check_image_model,
        export_onnx,
        input_sides,
        model_stride,
        onnx_latency,
    )
    from .deploy.export import trace_size as default_trace_size
    from .eval.resolution import load_model
    for package in ('onnx', 'onnxscript', 'onnxruntime'):  # (before any work, not in the exporter after it)
        if importlib.util.find_spec(package) is None:
            parser.error(f'export needs the {package} package of the export extra: pip install "s4nd-vision[export]"')
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.checkpoint, model_kwargs=args.model_kwargs)
    try:
        check_image_model(model, args.fixed_size)
    except ValueError as e:
        parser.error(f'{args.model}: {e}')
    chans, own = model.in_chans, input_sides(model)
    if args.fixed_size and args.max_side is not None:
        parser.error('argument --max-side: a graph of --fixed-size takes its --trace-size only')
    max_side = 2048 if args.max_side is None else args.max_side
    if not args.fixed_size and max_side < 3 * model_stride(model):  # (the smallest trace: 3 strides)
        parser.error(f'argument --max-side: at least 3 strides of {args.model} ({3 * model_stride(model)} px), '
                     f'got {max_side}')
    trace_size, sizes = args.trace_size or default_trace_size(model, args.fixed_size), []
    trace_flag = 'argument --trace-size' if args.trace_size else "the default trace size (the model's input size)"
    for flag, given in ((trace_flag, [trace_size]), ('argument --sizes', args.sizes)):
        for size in given:  # sizes the model or the graph refuse, before the export (minutes for large models)
            try:
                size = _model_size(size, len(own))
                if flag == trace_flag:
                    trace_size = size
                elif args.fixed_size and size != trace_size:
                    raise ValueError('the graph of --fixed-size takes its --trace-size only '
                                     f'({_size_text(trace_size)})')
                if not args.fixed_size:  # (the graph is traced at 3 strides or more, and serves 1 stride up)
                    check_export_size(model, size, max_side, min_strides=3 if flag == trace_flag else 1)
                with torch.no_grad():
                    model(torch.zeros(1, chans, *size))
            except ValueError as e:
                parser.error(f'{flag}: {_size_text(size)}: {e}')
            if flag != trace_flag:
                sizes.append(size)
    raised = '' if args.trace_size or trace_size == own else f' (the model\'s {_size_text(own)} raised to 3 strides)'
    print(f'exporting {args.model} traced at {_size_text(trace_size)}{raised} (large models take minutes)',
          file=sys.stderr)  # (stdout: the file written, then one JSON row per checked size)
    # (shared weights: named after their repository or folder; 'hf-hub:USER/REPO' made the folders output/hf-hub:USER/)
    # (a folder's trailing separator, '\\' on Windows too, left no name: output/model.onnx)
    shared = args.model.split(':', 1)[-1].rstrip('/' + os.sep)
    path = args.output or f'output/{os.path.basename(shared) or "model"}.onnx'
    start = time.perf_counter()
    export_onnx(model, path, img_size=trace_size, in_chans=chans, max_side=max_side, fixed_size=args.fixed_size)
    shape = 'input size fixed' if args.fixed_size else 'height and width'
    print(f'wrote {path} in {time.perf_counter() - start:.0f} s (dynamic batch, {shape})')
    rows = onnx_latency(model, path, sizes, batch_size=args.batch_size, threads=args.threads,
                        in_chans=chans) if sizes else []
    for row in rows:
        print(json.dumps(row))
    return rows


# ---------------------------------------------------------------------------------------- seq-mnist

def _seq_mnist_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--models', nargs='+', default=['s4nd_seq_tiny', 'conv_seq_tiny'],
                        help='timm model names, each with arguments of its own as NAME,key=value,... (YAML values), '
                             'e.g. s4nd_seq_tiny,kernel=sgconv')
    parser.add_argument('--rows', type=int, default=14)
    parser.add_argument('--cols', type=int, default=14, help='samples per row in training (even)')
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch-size', type=_positive_int, default=50)
    parser.add_argument('--lr', type=float, default=1e-2)
    parser.add_argument('--ssm-lr', type=float, default=1e-3)
    parser.add_argument('--train-limit', type=_positive_int, default=None,
                        help='train on n digits chosen at random by --seed (the split is sorted by class)')
    parser.add_argument('--threads', type=_positive_int, default=None, help='torch CPU threads')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None, help='write the rows to this JSON file')


def _seq_mnist_run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    import json

    import torch

    from .eval.sequential import format_table, run_sequential_mnist
    from .utils import replaced_atomically
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run_sequential_mnist(
        models=args.models, rows=args.rows, cols=args.cols, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, ssm_lr=args.ssm_lr, train_limit=args.train_limit, seed=args.seed)
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or '.', exist_ok=True)
        with replaced_atomically(args.json) as tmp, open(tmp, 'w') as f:
            json.dump(rows, f, indent=2)
    return rows


COMMANDS: Dict[str, Command] = {
    'demo': Command(
        'zero-shot resolution demo on built-in data (no downloads)',
        """Zero-shot resolution demo on built-in data (no downloads): train at a low resolution, test at higher ones.

    s4nd-vision demo                      # isotropic S4ND vs its conv twin, 14 px -> 14/20/28/42 px
    s4nd-vision demo --setting convnext   # ConvNeXt-S4ND vs ConvNeXt, 64 px -> 64/96/128/256 px (longer)
    s4nd-vision demo --epochs 1 --max-steps-per-epoch 2 --out /tmp/demo   # a quick check of the pipeline

See s4nd_vision.eval.demo.""",
        _demo_arguments, _demo_run),
    'train': Command(
        'train a timm model from a YAML config (one process or many)',
        """Train a timm model (S4ND backbones and baselines) with Accelerate from a YAML config.

    s4nd-vision train --config imagenet/convnext_s4nd_tiny.yaml data.root=/data/imagenet
    accelerate launch --multi_gpu --num_processes 8 -m s4nd_vision train --config ... [--resume]

--config is a YAML file or the name of a config shipped in the package (demo/, imagenet/, hmdb51/;
a leading configs/ is accepted). Overrides use dotted keys, e.g. optim.lr=1e-3 train.epochs=5.""",
        _train_arguments, _train_run),
    'eval-resolution': Command(
        'accuracy of models at resolutions they were (or were not) trained at',
        """Zero-shot resolution evaluation: accuracy of models at resolutions they were (or were not) trained at.

    s4nd-vision eval-resolution --models s4nd_iso_tiny conv_iso_tiny \\
        --checkpoints output/demo/iso/s4nd_iso_tiny/best.safetensors output/demo/iso/conv_iso_tiny/best.safetensors \\
        --in-chans 1 --mean 0.1307 --std 0.3081 \\
        --data mnist --train-resolution 14 --resolutions 14 20 28 42 --out output/zero_shot

(the demo's models: 1-channel digits, normalized with MNIST's mean and std; give what your models trained with)

Prints a top-1/top-5 table and writes accuracy_vs_resolution.csv and .png to --out
(see s4nd_vision.eval.resolution).""",
        _eval_arguments, _eval_run),
    'kernel-report': Command(
        'what band-limiting removes from the S4ND kernels of a model, per layer and axis',
        """Band-limiting diagnostics: per S4ND layer (stem, downsampling, blocks) and axis, the fraction of SSM modes
the mask removes and the kernel energy it keeps at the layer's reference grid; plots one layer's kernels at
rate 1 and 1/2, with and without the mask.

    s4nd-vision kernel-report --model convnext_s4nd_atto --img-size 64 --bandlimits 1.0 0.5
    s4nd-vision kernel-report --model-kwargs ssm_init=legs dt_min=0.05 dt_max=0.5 --img-size 64
    s4nd-vision kernel-report --checkpoint output/demo/convnext/convnext_s4nd_atto/best.safetensors --img-size 64 \\
        --num-classes 10 --in-chans 1 --bandlimits 1.0 --plot-layer stages.3.downsample.1

Writes kernel_report.csv and kernels_<layer>.png to --out (see s4nd_vision.eval.kernel_report).""",
        _kernel_report_arguments, _kernel_report_run),
    'zero-shot-study': Command(
        'the zero-shot resolution study: ConvNeXt-S4ND settings x seeds against ConvNeXt (long)',
        """The zero-shot resolution study on MNIST-5k: ConvNeXt-S4ND-atto per S4D init x dt range x band-limit x seed,
plain ConvNeXt-atto per seed, progressive resizing against the final size throughout; trained at 64 px with
the demo's config and trainer, tested at 64, 96, 128 and 256 px.

    s4nd-vision zero-shot-study --out output/zero_shot_study        # the whole grid: many hours on a CPU
    s4nd-vision zero-shot-study --inits lin legs --bandlimits off 1.0 --seeds 0 --epochs 3
    s4nd-vision zero-shot-study --report-only --out output/zero_shot_study

Each finished run appends a row to runs.csv; run it again to skip those and resume the unfinished one. Writes
study.md (mean +- std over seeds, kept at 2x and 4x) and study.png (see s4nd_vision.eval.zero_shot_study).""",
        _study_arguments, _study_run),
    'inflate': Command(
        'inflate a 2D checkpoint into the weights of a 3D (video) model',
        """Inflate a 2D checkpoint into the weights of a 3D (video) model, saved as safetensors.

    s4nd-vision inflate convnext_s4nd_tiny.safetensors video_init.safetensors --model convnext_s4nd_3d_tiny \\
        --model-kwargs num_frames=30
    s4nd-vision inflate convnext_tiny.safetensors baseline_init.safetensors --model convnext_3d_tiny

The output loads with timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=OUTPUT)); with
--keep-head and N classes other than 1000, give num_classes=N to both the call and the overlay (else timm drops the
kept head).
Build the target at the clip length it will train at (num_frames=30: the HMDB-51 recipe's): S4ND time kernels
are referenced to its num_frames (logged), and the file keeps them for a model of any other num_frames.
See s4nd_vision.models.inflate for what each option does to the output on static clips.""",
        _inflate_arguments, _inflate_run),
    'benchmark': Command(
        'time and memory of S4ND against the depthwise conv / ConvNeXt it replaces',
        """Benchmark S4ND against the depthwise conv / ConvNeXt it replaces (ratios in one process).

    s4nd-vision benchmark --what layers kernels step scaling models --batch-size 8 --json output/benchmark.json""",
        _benchmark_arguments, _benchmark_run),
    'flops': Command(
        "count a model's multiply-adds (fvcore, with FFT and complex handles)",
        """Count an image model's multiply-adds (fvcore's "FLOPs"), with the FFT and complex handles of
s4nd_vision.bench.flops.

    s4nd-vision flops convnext_s4nd_tiny convnext_tiny --img-size 224 --algorithm fft

Prints, per model: GMACs with the handles, fvcore's own count (FFTs and complex products as 0),
the largest operators, and the ops still left uncounted.""",
        _flops_arguments, _flops_run),
    'gpu-check': Command(
        'every check of the CUDA path in one run: correctness, model pairs, layer benchmark, dot, profile, compiled',
        """Every check of S4ND's CUDA path in one run, sized to take under 8 minutes on one H100/H200
(see s4nd_vision.bench.gpu_check); exits non-zero if a correctness check fails or a row raises.

    s4nd-vision gpu-check --json output/gpu_check.json            # every section, rows until the budget is spent
    s4nd-vision gpu-check --sections compiled --json output/gpu_check_compiled.json
    TRITON_INTERPRET=1 s4nd-vision gpu-check --device cpu --tiny  # checks the script on a CPU""",
        _gpu_check_arguments, _gpu_check_run),
    'smoke': Command(
        'build a model through timm and run it at several resolutions',
        'Smoke run: create convnext_s4nd_tiny with timm and run it at two resolutions (see s4nd_vision.bench.smoke).',
        _smoke_arguments, _smoke_run),
    'export': Command(
        'export a model to ONNX with dynamic batch, height and width; check and time the file',
        """Export a model to ONNX with dynamic batch, height and width (or a fixed input size: --fixed-size, which
video and sequence models need), then check the file against eager PyTorch and time both (onnxruntime, CPU;
needs the `export` extra: pip install "s4nd-vision[export]").

    s4nd-vision export convnext_s4nd_tiny --output output/convnext_s4nd_tiny.onnx --sizes 224 288x352
    s4nd-vision export convnext_s4nd_tiny --checkpoint output/imagenet/convnext_s4nd_tiny/best.safetensors \\
        --model-kwargs img_size=224
    s4nd-vision export convnext_s4nd_tiny --fixed-size --trace-size 224 --sizes 224   # faster calls, 224 only
    s4nd-vision export convnext_s4nd_3d_tiny --fixed-size --trace-size 16x224x224 --sizes 16x224x224

Prints one JSON row per --sizes entry: the largest output difference and both latencies
(see s4nd_vision.deploy.export).""",
        _export_arguments, _export_run),
    'seq-mnist': Command(
        'sequential MNIST at half and double the sampling rate: S4 vs a 1D conv',
        """Sequential MNIST-5k at half and double the sampling rate: S4 sequence model vs a 1D depthwise-conv baseline.

    s4nd-vision seq-mnist --rows 14 --cols 14 --epochs 3 --threads 1

Trains each model on the digits as rows * cols pixel sequences and prints a markdown table of validation
accuracy at cols / 2, cols and cols * 2 samples per row (s4nd_vision.eval.sequential).""",
        _seq_mnist_arguments, _seq_mnist_run),
}


def _state_defaults(parser: argparse.ArgumentParser) -> None:
    """Each option's default after its help, where the help does not state one and there is one to state (not None,
    False or empty: 'the model's own' and the like are said in the help); `--help` showed few of them."""
    for action in parser._actions:
        text, default = action.help or '', action.default
        if (not action.option_strings or 'default' in text or default is None or default is False
                or default is argparse.SUPPRESS or (isinstance(default, (list, tuple, dict, str)) and not default)):
            continue
        shown = ' '.join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        action.help = f'{text} (default: {shown.replace("%", "%%")})'.lstrip()


def _command_parser(name: str, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    COMMANDS[name].add_arguments(parser)
    _state_defaults(parser)
    parser.set_defaults(_command=name, _parser=parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The `s4nd-vision` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog='s4nd-vision', description=__doc__, formatter_class=_RAW)
    from . import __version__
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    sub = parser.add_subparsers(title='commands', metavar='COMMAND', required=True)
    for name, command in COMMANDS.items():
        _command_parser(name, sub.add_parser(name, help=command.help, description=command.description,
                                             formatter_class=_RAW))
    return parser


_OUTPUTS = (('json', '--json', False), ('output', '--output', False), ('out', '--out', True))  # (a folder?)
_CPU_HINT = {'gpu-check': '--device cpu --tiny checks the script on the CPU, with TRITON_INTERPRET=1'}
_RERUN = 'run the same command again: it continues from the last checkpoints'
_INTERRUPT_HINT = {'train': 'the run continues from its last checkpoint with --resume', 'demo': _RERUN,
                   'zero-shot-study': _RERUN}  # (how an interrupted command continues, where it does)


def _check_common(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Before any work: one process unless the command trains distributed, output paths of the right kind (a file,
    or a folder), and a device that exists."""
    processes = os.environ.get('WORLD_SIZE', '1')  # (set by accelerate launch and torchrun for every process)
    if args._command != 'train' and processes.isdigit() and int(processes) > 1:
        parser.error(f'{args._command} runs in one process, but this is one of {processes} (WORLD_SIZE, from '
                     f'accelerate launch or torchrun): each would do the whole job and write the same files; run it '
                     f'with python or s4nd-vision (only train runs distributed)')
    options = {a.dest for a in parser._actions if a.option_strings}  # (a positional output checks itself)
    for attr, flag, folder in _OUTPUTS:
        path = getattr(args, attr, None) if attr in options else None
        if isinstance(path, str) and folder and os.path.isfile(path):
            parser.error(f'{flag}: {path!r} is a file: give a folder')
        if isinstance(path, str) and not folder and os.path.isdir(path):
            parser.error(f'{flag}: {path!r} is a folder: give the file to write')
        if isinstance(path, str) and path:  # (else found only when the results are written: after the work)
            problem = _unwritable(path if folder else os.path.dirname(path) or '.')
            if problem:
                parser.error(f'{flag}: cannot write {path!r}: {problem}')
    device = getattr(args, 'device', None)
    if device is not None:
        import torch
        try:
            device_type = torch.device(device).type
        except RuntimeError as e:
            parser.error(f'--device: {e}')
        if device_type == 'cuda' and not torch.cuda.is_available():
            parser.error(f'--device {device}: no CUDA device here ({_CPU_HINT.get(args._command, "use --device cpu")})')
        if device_type == 'mps' and not torch.backends.mps.is_available():  # (an Intel Mac, Linux, Windows)
            parser.error(f'--device {device}: no MPS device here ({_CPU_HINT.get(args._command, "use --device cpu")})')


def _unwritable(folder: str) -> Optional[str]:
    """Why files cannot be made in `folder` (made if missing, as the commands do), or None: its nearest existing
    ancestor is a file, or a folder this user may not write in (a read-only mount, another user's)."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f'{existing!r} is not a folder'
    if not os.access(existing, os.W_OK | os.X_OK):
        return f'the folder {existing!r} is not writable'
    return None


def _run(command: Command, args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Run `command`. What a user can get wrong (a value, a file, a model name) ends it with a one-line
    `error: ...` on stderr and exit status 2, as an argparse error does, instead of a traceback; Ctrl-C with one
    line and status 130."""
    _check_common(args, parser)
    try:
        return command.run(args, parser)
    except KeyboardInterrupt:
        hint = _INTERRUPT_HINT.get(args._command)
        print('interrupted' + (f' ({hint})' if hint else ''), file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        error = e
    except RuntimeError as e:  # timm's create_model: 'Unknown model (NAME)'
        if not str(e).startswith('Unknown model ('):
            raise
        from .utils.model_spec import closest_model_hint
        name = str(e)[len('Unknown model ('):-1]
        error = f'{name!r} is not a timm model{closest_model_hint(name)}'

    except TypeError as e:  # timm's create_model: a model argument (--model-kwargs, NAME,key=value) it does not take,
        # or one the command sets itself (pretrained, num_classes, ...)
        if not any(text in str(e) for text in ('got an unexpected keyword argument', 'got multiple values for')):
            raise
        error = e
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """parser.parse_args(argv), but train's section.key=value overrides may also follow `--resume [CHECKPOINT]`
    (`a=1 --resume CKPT b=2`: argparse's positional takes only the first run of them), in their order."""
    args, extras = parser.parse_known_args(argv)
    if args._command == 'train':
        overrides = [t for t in extras if '=' in t and not t.startswith('-')]
        args.overrides, extras = [*args.overrides, *overrides], [t for t in extras if t not in overrides]
        # `--resume a=1`: argparse gives the override to --resume's optional CHECKPOINT; train.cli.run puts it back
        # among the overrides, after those before --resume on the command line (a later value for a key wins)
        if isinstance(args.resume, str):
            args.resume_position = _overrides_before_resume(sys.argv[1:] if argv is None else list(argv),
                                                            args.overrides)
    if extras:
        parser.error(f'unrecognized arguments: {" ".join(extras)}')
    return args


def _overrides_before_resume(argv: Sequence[str], overrides: Sequence[str]) -> int:
    """How many of `overrides` come before the last --resume (or its abbreviation) in `argv`: `a=1 --config X b=2
    --resume c=3` gives 2 (argparse counts only its positional's a=1, and c=3 would go before b=2)."""
    last = max((i for i, t in enumerate(argv) if len(t.split('=')[0]) > 2 and '--resume'.startswith(t.split('=')[0])),
               default=len(argv))
    left, before = Counter(overrides), 0
    for token in argv[:last]:
        if left[token] > 0:
            left[token] -= 1
            before += 1
    return before


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`s4nd-vision COMMAND [ARGS]`, the console script (which exits with what this returns: None is success)."""
    args = _parse(build_parser(), argv)
    _run(COMMANDS[args._command], args, args._parser)


def tool_main(name: str, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None):
    """One command as a standalone program (the repository's `tools/<name>.py` wrappers); returns its result."""
    command = COMMANDS[name]
    parser = _command_parser(name, argparse.ArgumentParser(
        prog=prog or os.path.basename(sys.argv[0]), description=command.description, formatter_class=_RAW))
    args = _parse(parser, argv)
    return _run(command, args, parser)
