"""The package as users get it: a built wheel installed into a fresh virtual environment, run outside the repository.

The wheel is built from a copy of the sources (no editable install, no repository on the path), installed with
`--no-deps` into a new venv whose dependencies come from this interpreter's site-packages through a .pth file
(a .pth path line adds the folder without running the .pth files inside it, so this environment's editable
install of s4nd_vision stays invisible there).
"""
import argparse
import csv
import importlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest

import s4nd_vision
from s4nd_vision.cli import COMMANDS, main
from s4nd_vision.train.config import ConfigError, _read_config, load_config, packaged_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ('pyproject.toml', 'README.md', 'LICENSE', 's4nd_vision')


def _venv_paths(venv: str):
    scheme = {'base': venv, 'platbase': venv}
    purelib = sysconfig.get_path('purelib', 'venv' if 'venv' in sysconfig.get_scheme_names() else None, scheme)
    bindir = sysconfig.get_path('scripts', 'venv' if 'venv' in sysconfig.get_scheme_names() else None, scheme)
    return purelib, bindir


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """(bin folder, environment, a working folder outside the repository) of a venv holding only the built wheel."""
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy)(
            os.path.join(ROOT, name), src / name)
    for cache in src.rglob('__pycache__'):
        shutil.rmtree(cache)
    # no build isolation: the build backend comes from this environment (setuptools>=77 is in the dev extra)
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps', '--no-build-isolation',
                    '--no-index', '-w', str(tmp / 'dist'), str(src)], check=True, capture_output=True, text=True)
    wheels = list((tmp / 'dist').glob('s4nd_vision-*.whl'))
    assert len(wheels) == 1, wheels

    venv = str(tmp / 'venv')
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv], check=True)
    purelib, bindir = _venv_paths(venv)
    python = os.path.join(bindir, 'python')
    parent = [p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages') and os.path.isdir(p)]
    with open(os.path.join(purelib, '_parent_site_packages.pth'), 'w') as f:
        f.write('\n'.join(parent) + '\n')
    # -I: install even though this environment's editable s4nd-vision of the same version is visible through the .pth
    subprocess.run([sys.executable, '-m', 'pip', '--python', python, 'install', '--quiet', '--no-deps', '--no-index',
                    '-I', str(wheels[0])], check=True, capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV')}
    env['PATH'] = bindir + os.pathsep + env.get('PATH', '')
    work = tmp / 'work'
    work.mkdir()
    return bindir, env, str(work), purelib


def _run(installed, *args, timeout=300):
    bindir, env, work, _ = installed
    return subprocess.run([os.path.join(bindir, args[0]), *args[1:]], cwd=work, env=env,
                          capture_output=True, text=True, timeout=timeout)


# one interpreter of the installed wheel answers several tests (each start pays the torch and timm imports): its
# commands run through the installed `s4nd_vision.cli.main`, as the console script calls it (`sys.exit(main())`):
# [exit status, stdout, stderr] of each
_REPORT = r"""
import contextlib, io, json, traceback
import importlib.metadata as m, s4nd_vision, timm
import numpy as np
from s4nd_vision.cli import main
from s4nd_vision.data import mnist
from s4nd_vision.train.config import packaged_configs
report = dict(file=s4nd_vision.__file__, n_configs=len(packaged_configs()),
              license=m.distribution("s4nd-vision").metadata["License-Expression"],
              versions=[m.version("s4nd-vision"), s4nd_vision.__version__],
              registered=f'{timm.is_model("convnext_s4nd_tiny")} {s4nd_vision.optim.param_groups_ssm.__module__}')


def command(name, *argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_info:
            code = exit_info.code
        except Exception:  # (the console script: its traceback, status 1; the next commands still run)
            traceback.print_exc()
            code = 1
    # the exit status sys.exit(code) gives: None is 0, another object (printed) 1
    report[name] = [0 if code is None else code if isinstance(code, int) else 1, out.getvalue(), err.getvalue()]


command('train', 'train', '--help')
command('export', 'export', '--help')
# a packaged config by name, from a folder without configs/ (the working folder): a bad override
command('bad_override', 'train', '--config', 'configs/demo/mnist_iso.yaml', 'optim.lr=-1')
# the demo's quick mode on 500 of MNIST-5k's 5,000 digits (50 of each class: 400 train, 100 val; evaluating 1,000
# images at 4 resolutions twice was most of its time)
images, labels = mnist.load_mnist_5k()
keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:50] for c in range(10)]))
mnist.load_mnist_5k = lambda: (images[keep], labels[keep])
command('demo', 'demo', '--epochs', '1', '--max-steps-per-epoch', '2', '--out', 'demo')
print(json.dumps(report))
"""


@pytest.fixture(scope='module')
def installed_report(installed):
    """What the installed package says about itself: its file, configs, metadata, registration, and its commands'
    (exit status, stdout, stderr) as its `s4nd_vision.cli.main` runs them: the train and export commands' --help,
    train with a bad override, and the demo's quick mode."""
    result = _run(installed, 'python', '-c', _REPORT, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.xdist_group('installed_wheel')  # (shares its module fixture's run: one process)
def test_wheel_imports_its_own_copy_with_configs_and_metadata(installed, installed_report):
    _, _, _, purelib = installed
    file, n_configs = installed_report['file'], installed_report['n_configs']
    assert file.startswith(purelib) and not file.startswith(ROOT)
    assert n_configs == len(packaged_configs()) >= 11
    assert installed_report['license'] == 'Apache-2.0'
    assert installed_report['versions'] == [s4nd_vision.__version__] * 2  # (the metadata's, from the package's)
    assert installed_report['registered'] == 'True s4nd_vision.train.optim'


@pytest.mark.xdist_group('installed_wheel')  # (shares its module fixture's run: one process)
def test_console_script_lists_every_command_and_train_help(installed, installed_report):
    result = _run(installed, 's4nd-vision', '--help')
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in COMMANDS)
    # the installed commands' own help (the console script runs this same main; one interpreter serves both)
    code, text, _ = installed_report['train']
    assert code == 0 and '--config' in text and '--resume' in text
    code, text, _ = installed_report['export']
    assert code == 0 and '--trace-size' in text and '--model-kwargs' in text
    # a packaged config by name, from a folder without configs/: a bad override is the trainer's one-line error
    code, _, err = installed_report['bad_override']
    assert code == 2 and err.strip() == 'error: optim.lr must be positive, got -1.0'


@pytest.mark.xdist_group('installed_wheel')  # (shares its module fixture's run: one process)
def test_installed_demo_quick_mode(installed, installed_report):
    _, _, work, _ = installed
    code, out, err = installed_report['demo']
    assert code == 0, err[-3000:]
    assert '| s4nd_iso_tiny |' in out and '| conv_iso_tiny |' in out
    with open(os.path.join(work, 'demo', 'accuracy_vs_resolution-epochs1-steps2.csv')) as f:
        rows = list(csv.DictReader(f))
    assert {r['model'] for r in rows} == {'s4nd_iso_tiny', 'conv_iso_tiny'} and len(rows) == 8


# ----------------------------------------------------------------------- in this process (no install)

def test_packaged_config_names_and_paths_load_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: names resolve inside the package
    for name in packaged_configs():
        with open(os.path.join(os.path.dirname(s4nd_vision.__file__), 'configs', name)) as f:
            text = f.read()
        assert _read_config(name) == _read_config(f'configs/{name}') == text
    assert load_config('configs/demo/mnist_iso.yaml').model.name == 's4nd_iso_tiny'
    with pytest.raises(ConfigError, match='config file not found: imagenet/nope.yaml .*imagenet/convnext_s4nd_tiny'):
        load_config('imagenet/nope.yaml')
    # a pathlib.Path names a packaged config as a str does (it raised TypeError from Path.replace)
    assert load_config(pathlib.Path('demo/mnist_iso.yaml')).model.name == 's4nd_iso_tiny'
    with pytest.raises(ConfigError, match='config file not found: imagenet/nope.yaml'):
        load_config(pathlib.Path('imagenet/nope.yaml'))
    # an existing file wins over the packaged config of the same name
    (tmp_path / 'configs' / 'demo').mkdir(parents=True)
    (tmp_path / 'configs' / 'demo' / 'mnist_iso.yaml').write_text('model: {name: conv_iso_tiny}\n'
                                                                 'data: {dataset: mnist}\n')
    assert load_config('configs/demo/mnist_iso.yaml').model.name == 'conv_iso_tiny'
    assert load_config('demo/mnist_iso.yaml').model.name == 's4nd_iso_tiny'


def test_sdist_carries_the_whole_test_suite(tmp_path):
    """The sdist (what packagers build and test from) holds every file of tests/ and tools/: setuptools alone adds
    only tests/test*.py, whose helper modules (media, stacking, ...) and conftest.py were then missing."""
    src = tmp_path / 'src'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns('.*', 'build', 'output', '*.egg-info', '__pycache__'))
    build = f'from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})'
    subprocess.run([sys.executable, '-c', build], cwd=src, check=True, capture_output=True, text=True)
    with tarfile.open(next(tmp_path.glob('s4nd_vision-*.tar.gz'))) as sdist:
        packed = {name.split('/', 1)[1] for name in sdist.getnames() if '/' in name}
    wanted = {os.path.relpath(os.path.join(folder, name), src) for top in ('tests', 'tools')
              for folder, _, names in os.walk(src / top) for name in names}
    assert wanted and wanted <= packed, sorted(wanted - packed)
    assert {'CITATION.cff', 'LICENSE', 's4nd_vision/configs/demo/mnist_iso.yaml'} <= packed


# the newest API of each dependency that the package imports, and the release that first has it: pip keeps an
# installed release that meets the declared floor, so a floor below these breaks the commands on import
_NEWEST_APIS = {'timm': ('timm.models', 'get_model_input_config', (1, 0, 31))}


@pytest.mark.parametrize('package', sorted(_NEWEST_APIS))
def test_declared_floors_have_the_apis_the_package_imports(package):
    module, name, first = _NEWEST_APIS[package]
    assert hasattr(importlib.import_module(module), name)  # (still the import the package makes)
    with open(os.path.join(ROOT, 'pyproject.toml')) as f:
        floor = re.search(rf'^\s*"{package}>=([0-9.]+)', f.read(), flags=re.MULTILINE).group(1)
    assert tuple(int(part) for part in floor.split('.')) >= first, f'{package}>={floor}: {module}.{name} needs {first}'


def test_optim_is_reachable_as_the_readme_uses_it():
    from s4nd_vision.train.optim import param_groups_ssm
    assert s4nd_vision.optim.param_groups_ssm is param_groups_ssm
    assert s4nd_vision.train.optim.param_groups_ssm is param_groups_ssm
    with pytest.raises(AttributeError, match='no attribute'):
        s4nd_vision.not_a_module  # noqa: B018


@pytest.mark.parametrize('script,command', [
    ('demo', 'demo'), ('train', 'train'), ('eval_resolution', 'eval-resolution'), ('inflate', 'inflate'),
    ('benchmark', 'benchmark'), ('flops', 'flops'), ('smoke', 'smoke'), ('export', 'export'),
    ('seq_mnist', 'seq-mnist'), ('kernel_report', 'kernel-report'), ('zero_shot_study', 'zero-shot-study')])
def test_tools_scripts_are_the_cli_commands(script, command, capsys, monkeypatch):
    """Each tools/<name>.py takes the arguments of `s4nd-vision <name>` (they live in s4nd_vision.cli)."""
    monkeypatch.setenv('COLUMNS', '100')
    spec = importlib.util.spec_from_file_location(f'tool_{script}', os.path.join(ROOT, 'tools', f'{script}.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    helps = []
    for run in (lambda: tool.main(['--help'], prog='PROG'), lambda: main([command, '--help'])):
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == 0
        helps.append(capsys.readouterr().out.replace(f's4nd-vision {command}', 'PROG').split())
    assert helps[0] == helps[1] and '--help' in helps[0]


@pytest.mark.parametrize('argv, message', [
    (['flops', 'no_such_model'], "'no_such_model' is not a timm model"),
    (['kernel-report', '--model', 'no_such_model'], "'no_such_model' is not a timm model"),
    (['eval-resolution', '--models', 'convnext_s4nd_tinyy', '--resolutions', '64'],
     "'convnext_s4nd_tinyy' is not a timm model (did you mean convnext_s4nd_tiny?)"),
    (['export', 'convnext_s4nd_atto', '--sizes', '96', '96x100'],
     "argument --sizes: 96x100: sides must be multiples of the model stride 32 from 32 to 2048 (the exported graph"),
    (['export', 'vit_s4nd_atto_patch16_224', '--trace-size', '100'], 'argument --trace-size: 100x100: sides must be'),
    (['export', 's4nd_seq_atto'],
     'does not take images (its input_size has the sides (784,)): graphs of dynamic sizes take image models'),
    (['export', 'convnext_s4nd_atto', '--checkpoint', 'missing.safetensors'], "checkpoint not found"),
    (['seq-mnist', '--models', 's4nd_seq_atto,seq_len=8'], 'seq_len is set by the task (rows x cols)'),
    (['seq-mnist', '--rows', '7', '--cols', '8', '--train-limit', '40', '--batch-size', '50'],
     'batch_size must be in [1, 40]'),
    (['seq-mnist', '--rows', '0', '--cols', '14'], 'rows must be a positive integer'),
    (['eval-resolution', '--models', 'convnext_s4nd_atto', '--resolutions', '64', '--checkpoints', 'missing.pth'],
     "checkpoint not found: 'missing.pth'"),
    (['eval-resolution', '--models', 'convnext_s4nd_atto', '--resolutions', '64', '--checkpoints', '.'],
     "checkpoint '.' is a folder, not a weights file: give a file such as a run's best.safetensors or a training "
     "checkpoint's model.safetensors"),  # (a training checkpoint, step-N, was 'not found')
    (['export', 'convnext_s4nd_atto', '--checkpoint', '.'], "checkpoint '.' is a folder, not a weights file"),
    (['inflate', 'missing.safetensors', 'out.safetensors', '--model', 'convnext_s4nd_3d_atto'], 'does not exist'),
    (['kernel-report', '--model', 'convnext_tiny'], 'convnext_tiny has no S4ND layer with S4D or S4 kernels'),
    (['kernel-report', '--bandlimits', '-1'],
     "argument --bandlimits: a band-limit is 'off' (or 0) or a positive number"),
    (['kernel-report', '--model', 'convnext_s4nd_atto,d_state'], "--model: model option 'd_state' in"),
    (['smoke', '--model', 'convnext_s4nd_atto,d_state'], "--model: model option 'd_state' in"),
    (['smoke', '--model', 's4nd_seq_atto'], "'s4nd_seq_atto' takes sequences (its input_size is (1, 784))"),
    (['smoke', '--model', 'vit_small_patch16_224'],
     'takes 224x224 images only (built with dynamic_img_size=False): build it for any size, --model '
     'vit_small_patch16_224,dynamic_img_size=True'),
    (['kernel-report', '--model', 'convnext_s4nd_atto', '--model-kwargs', 'd_stat=8'],
     "unexpected keyword argument 'd_stat'"),
    # --model-kwargs: timm's meaning (Python literals) in every command, without timm's traceback or silent strings
    (['kernel-report', '--model-kwargs', 'img_size'], "argument --model-kwargs: model option 'img_size' must look"),
    (['inflate', 'a.safetensors', 'b.safetensors', '--model', 'convnext_s4nd_3d_atto', '--model-kwargs', 'x=false'],
     "argument --model-kwargs: x=false: values are Python literals, as in timm's train.py (True, False;"),
    (['export', 'convnext_s4nd_atto', '--model-kwargs', 'bandlimit=None'], 'timm.create_model drops null (None)'),
    (['eval-resolution', '--models', 'convnext_s4nd_atto,d_stat=8', '--resolutions', '64'],
     "unexpected keyword argument 'd_stat'"),
    (['eval-resolution', '--models', 'convnext_s4nd_atto,pretrained=true', '--resolutions', '64'],
     "got multiple values for keyword argument 'pretrained'"),  # (one the command sets itself)
    (['flops', 'convnext_s4nd_atto,ls_init_value=1e-6,d_state=010,bandlimit=null'], 'bandlimit=null'),  # YAML 1.2
    (['eval-resolution', '--models', 'convnext_s4nd_atto,d_state', '--resolutions', '64'],
     "--models: model option 'd_state' in 'convnext_s4nd_atto,d_state' must look like key=value"),
    # before any work: sizes, threads and limits positive, outputs of the right kind, a device that exists
    (['smoke', '--model', 'convnext_s4nd_atto', '--resolutions', '-32'], "argument --resolutions: expects a positive"),
    (['benchmark', '--what', 'step', '--step-lengths', '-5'], 'argument --step-lengths: expects a positive integer'),
    (['flops', 'convnext_atto', '--img-size', '0'], 'argument --img-size: expects a positive integer'),
    (['seq-mnist', '--threads', '0'], 'argument --threads: expects a positive integer'),
    # a time budget that is no time: -5 ran nothing and passed, nan never ran out
    (['gpu-check', '--device', 'cpu', '--tiny', '--budget-s', '-5'],
     'argument --budget-s: expects a number of seconds'),
    (['gpu-check', '--device', 'cpu', '--tiny', '--budget-s', 'nan'],
     'argument --budget-s: expects a number of seconds'),
    (['seq-mnist', '--train-limit', '0'], 'argument --train-limit: expects a positive integer'),
    (['benchmark', '--json', '.'], "--json: '.' is a folder: give the file to write"),
    (['export', 'convnext_s4nd_atto', '--output', '.'], "--output: '.' is a folder: give the file to write"),
    (['kernel-report', '--out', 'README.md'], "--out: 'README.md' is a file: give a folder"),
    # an output under a file: refused before the work (seq-mnist wrote its JSON after training, export after tracing)
    (['seq-mnist', '--json', 'README.md/rows.json', '--train-limit', '2', '--batch-size', '2', '--epochs', '1'],
     "--json: cannot write 'README.md/rows.json': "),
    (['export', 'convnext_s4nd_atto', '--output', 'README.md/m.onnx'], "--output: cannot write 'README.md/m.onnx': "),
    (['eval-resolution', '--models', 'convnext_s4nd_atto', '--resolutions', '64', '--out', 'README.md/sub'],
     "--out: cannot write 'README.md/sub': "),
    (['benchmark', '--device', 'cuda'], '--device cuda: no CUDA device here (use --device cpu)'),
    (['eval-resolution', '--models', 'convnext_s4nd_atto', '--resolutions', '64', '--device', 'mps'],
     '--device mps: no MPS device here (use --device cpu)'),
    (['eval-resolution', '--models', 'convnext_s4nd_atto', '--resolutions', '64', '--device', 'gpu'], '--device: '),
    (['eval-resolution', '--models', 'convnext_s4nd_atto', '--resolutions', '64', '--mean', '0.1', '0.9'],
     '--mean needs one value or one per input channel (3 for convnext_s4nd_atto), got 2'),
    (['eval-resolution', '--models', 'convnext_s4nd_atto', '--resolutions', '64', '--interpolation', 'random'],
     "argument --interpolation: expects a timm interpolation such as 'bilinear' or 'bicubic', got 'random'"),
], ids=lambda v: v[0] if isinstance(v, list) else '')
def test_commands_report_user_errors_in_one_line(argv, message, capsys, monkeypatch):
    """A wrong name, file or value ends any command with an `error: ...` line and exit status 2, no traceback (an
    argument's value the model refuses, as argparse reports it: after the usage)."""
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # (the CUDA and MPS cases, on any machine)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and 'Traceback' not in err, err
    assert 'error: ' in err.splitlines()[-1] and message in err.splitlines()[-1], err


def test_outputs_in_an_unwritable_folder_are_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """A folder this user may not write in (a read-only mount, another user's) is named before any work: seq-mnist
    trained for minutes, then failed writing --json (export: after its trace) with a bare PermissionError."""
    locked = str(tmp_path / 'locked')
    os.mkdir(locked)
    access = os.access  # (root may write anywhere: the permission check is stubbed for this folder)
    monkeypatch.setattr(os, 'access', lambda path, mode, **kw: path != locked and access(path, mode, **kw))
    for argv, flag in ((['seq-mnist', '--json', f'{locked}/new/rows.json', '--train-limit', '2', '--batch-size', '2',
                         '--epochs', '1'], '--json'),
                       (['kernel-report', '--out', locked], '--out')):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and f"the folder '{locked}' is not writable" in err and flag in err, err


@pytest.mark.parametrize('argv', [['eval-resolution', '--models', 'convnext_s4nd_atto', '--resolutions', '64'],
                                  ['demo'], ['zero-shot-study'], ['export', 'convnext_s4nd_atto']], ids=lambda a: a[0])
def test_single_process_commands_refuse_a_distributed_launch(argv, capsys, monkeypatch):
    """Under `accelerate launch --num_processes 2` every process ran the whole evaluation (or demo, study, export) and
    wrote the same files; only train shares its work among processes."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and f'error: {argv[0]} runs in one process, but this is one of 2' in err, err


class _Called(Exception):
    """Raised by a stub in place of a command's work, with the arguments the command gave it."""


def _stub(monkeypatch, module: str, name: str):
    def stub(*args, **kwargs):
        raise _Called(args, kwargs)
    monkeypatch.setattr(importlib.import_module(module), name, stub)


def test_help_states_every_default():
    """`COMMAND --help` states the default of every option that has one (seq-mnist's --epochs and --lr,
    eval-resolution's --batch-size and --device, ... were shown without it), as the value the command runs with."""
    from s4nd_vision.cli import COMMANDS, build_parser
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(COMMANDS)
    for name, parser in commands.items():
        for action in parser._actions:
            default = action.default
            if not action.option_strings or any(default is v for v in (None, False, argparse.SUPPRESS)) or (
                    isinstance(default, (list, dict)) and not default):  # (0 is a default to state)
                continue
            assert 'default' in (action.help or ''), (name, action.dest)
    for name, option, shown in (('seq-mnist', '--epochs EPOCHS', '3'), ('seq-mnist', '--lr LR', '0.01'),
                                ('seq-mnist', '--seed SEED', '0'), ('eval-resolution', '--device DEVICE', 'cpu'),
                                ('kernel-report', '--channels CHANNELS [CHANNELS ...]', 'channels of --plot-layer to '
                                 'plot (default: 0 1)'), ('zero-shot-study', '--inits INITS [INITS ...]',
                                                          'S4D initializations (default: lin inv legs)')):
        text = ' '.join(commands[name].format_help().split())
        assert f'{option} {shown if " " in shown else f"(default: {shown})"}' in text, (name, option)


@pytest.mark.parametrize('argv,module,name,expected', [
    (['demo', '--seed', '5', '--bandlimit', '0.5'], 's4nd_vision.eval.demo', 'run_demo',
     dict(seed=5, bandlimit=0.5)),
    (['demo', '--bandlimit', 'off'], 's4nd_vision.eval.demo', 'run_demo', dict(seed=0, bandlimit='off')),
    (['zero-shot-study', '--overrides', 'train.batch_size=4', 'optim.lr=0.01'], 's4nd_vision.eval.zero_shot_study',
     'run_study', dict(overrides=['train.batch_size=4', 'optim.lr=0.01'])),
    (['inflate', 'a.safetensors', 'b.safetensors', '--model', 'convnext_s4nd_3d_atto', '--keep-head', '--time-decay',
      '2.5'], 's4nd_vision.models.inflate', 'inflate_checkpoint', dict(keep_head=True, time_decay=2.5)),
    (['seq-mnist', '--ssm-lr', '0.02', '--seed', '3'], 's4nd_vision.eval.sequential', 'run_sequential_mnist',
     dict(ssm_lr=0.02, seed=3)),
    (['export', 'convnext_s4nd_atto', '--checkpoint', 'w.safetensors'], 's4nd_vision.eval.resolution', 'load_model',
     dict(args=('convnext_s4nd_atto', 'w.safetensors'))),
], ids=lambda v: v[0] if isinstance(v, list) else '')
def test_commands_pass_their_options_on(argv, module, name, expected, monkeypatch):
    """Each option reaches the function doing the command's work (a dropped one ran with its default, silently)."""
    _stub(monkeypatch, module, name)
    with pytest.raises(_Called) as called:
        main(argv)
    args, kwargs = called.value.args
    assert {k: args if k == 'args' else kwargs.get(k) for k in expected} == expected


def test_kernel_report_and_export_use_their_seed_and_batch_size(tmp_path, monkeypatch):
    """kernel-report's --seed makes the initialization it reports; export times its sizes at --batch-size."""
    import timm
    import torch
    seeds = []

    def load_model(*args, **kwargs):
        seeds.append(torch.initial_seed())
        raise _Called()
    monkeypatch.setattr(importlib.import_module('s4nd_vision.eval.resolution'), 'load_model', load_model)
    with pytest.raises(_Called):
        main(['kernel-report', '--seed', '7', '--out', str(tmp_path)])
    assert seeds == [7]
    export = importlib.import_module('s4nd_vision.deploy.export')
    monkeypatch.setattr(importlib.import_module('s4nd_vision.eval.resolution'), 'load_model', lambda *a, **k:
                        timm.create_model('convnext_s4nd_atto', depths=(1, 1, 1, 1), dims=(4, 4, 4, 4)).eval())
    monkeypatch.setattr(export, 'export_onnx', lambda *args, **kwargs: None)
    _stub(monkeypatch, 's4nd_vision.deploy.export', 'onnx_latency')
    with pytest.raises(_Called) as called:
        main(['export', 'convnext_s4nd_atto', '--output', str(tmp_path / 'm.onnx'), '--sizes', '64',
              '--batch-size', '3'])
    assert called.value.args[1]['batch_size'] == 3

def test_export_names_the_file_of_shared_weights_after_them(tmp_path, monkeypatch, capsys):
    """Without --output, shared weights export to output/<repository or folder>.onnx, as the line printed says: the
    name as it was made the folders output/hf-hub:USER/ (or output/local-dir:/the/whole/path/)."""
    import timm
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.import_module('s4nd_vision.eval.resolution'), 'load_model', lambda *a, **k:
                        timm.create_model('convnext_s4nd_atto', depths=(1, 1, 1, 1), dims=(4, 4, 4, 4)).eval())
    written = []
    monkeypatch.setattr(importlib.import_module('s4nd_vision.deploy.export'), 'export_onnx',
                        lambda model, path, **kwargs: written.append(path))
    for name, file in (('hf-hub:someone/s4nd-tiny', 'output/s4nd-tiny.onnx'),
                       (f'local-dir:{tmp_path}/shared/', 'output/shared.onnx'),
                       ('convnext_s4nd_atto', 'output/convnext_s4nd_atto.onnx')):
        main(['export', name])
        assert written[-1] == file and f'wrote {file} in' in capsys.readouterr().out
    # Windows: the folder's trailing separator is a backslash (a shell's completion adds it)
    import ntpath
    import types
    windows = types.ModuleType('os')
    windows.__dict__.update(os.__dict__, path=ntpath, sep='\\')
    monkeypatch.setattr(importlib.import_module('s4nd_vision.cli'), 'os', windows)
    main(['export', 'local-dir:C:\\runs\\shared\\'])
    assert written[-1] == 'output/shared.onnx'


def test_seq_mnist_builds_every_model_before_training_any(capsys):
    """A wrong model later in --models (unknown, or an image model) is refused before the first one trains for
    minutes (whose results were lost with the error), in terms of the task."""
    for bad, message in (('no_such_model', "error: 'no_such_model' is not a timm model"),
                         ('convnext_s4nd_atto', 'error: convnext_s4nd_atto: not a sequence model (it takes no')):
        with pytest.raises(SystemExit) as exit_info:
            main(['seq-mnist', '--models', 'conv_seq_tiny', bad, '--rows', '8', '--cols', '8', '--epochs', '1',
                  '--train-limit', '50'])
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and message in captured.err and 'epoch' not in captured.out, captured


def test_smoke_builds_the_input_the_model_takes(capsys):
    """smoke runs image models with their own input channels, and video models on clips of their frames."""
    main(['smoke', '--model', 'convnext_s4nd_atto,in_chans=1', '--resolutions', '64', '96', '--batch-size', '1'])
    main(['smoke', '--model', 'convnext_s4nd_3d_atto,num_frames=4', '--resolutions', '64', '--batch-size', '1'])
    out = capsys.readouterr().out
    assert 'input (1, 1, 64, 64) ->' in out and 'input (1, 1, 96, 96) ->' in out and 'input (1, 3, 4, 64, 64) ->' in out
    assert out.count('ok: the same weights ran at every resolution') == 2


@pytest.mark.parametrize('argv, hint', [
    (['smoke'], ''),
    (['train', '--config', 'demo/mnist_iso.yaml'], ' (the run continues from its last checkpoint with --resume)'),
    (['demo'], ' (run the same command again: it continues from the last checkpoints)'),
    (['zero-shot-study'], ' (run the same command again: it continues from the last checkpoints)'),
], ids=lambda v: v[0] if isinstance(v, list) else '')
def test_ctrl_c_ends_a_command_with_one_line_and_status_130(argv, hint, capsys, monkeypatch):
    """One line, with how the command continues where it does (--resume is train's option only)."""
    def interrupted(args, parser):
        raise KeyboardInterrupt
    monkeypatch.setitem(COMMANDS, argv[0], COMMANDS[argv[0]]._replace(run=interrupted))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 130 and err == 'interrupted' + hint
