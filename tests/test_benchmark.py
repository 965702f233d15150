"""The benchmark harness runs and reports ratios (no timing is asserted)."""
import json
import math
import shlex
import sys

import pytest
import torch

from s4nd_vision.bench.benchmark import (
    bench_kernels,
    bench_layers,
    bench_models,
    bench_scaling,
    bench_step,
    format_table,
    parse_pair,
    saved_activation_mb,
)
from s4nd_vision.utils.model_spec import parse_model_spec
from s4nd_vision.utils.yaml12 import load_yaml


def test_parse_pair():
    assert parse_pair('vit_s4nd_small_patch16_224,token_layout=1d:vit_small_patch16_224') == (
        'vit_s4nd_small_patch16_224', {'token_layout': '1d'}, 'vit_small_patch16_224')
    assert parse_pair('a:b') == ('a', {}, 'b')
    with pytest.raises(ValueError, match='NAME'):
        parse_pair('convnext_s4nd_tiny')
    with pytest.raises(ValueError, match='key=value'):
        parse_pair('a,token_layout:b')
    assert parse_pair('convnext_s4nd_atto,d_state=8:convnext_atto')[1] == {'d_state': 8}  # a number, not '8'
    assert parse_pair('a,in_chans=1:b,in_chans=1') == ('a', {'in_chans': 1}, 'b,in_chans=1')  # the baseline's spec


def test_pairs_split_at_the_colon_between_their_models():
    """A pair was split at its first colon: one inside a value (a dict, a quoted string) or of shared weights' names
    (hf-hub:USER/REPO, local-dir:PATH) made the wrong two models, or a YAML error about half a value."""
    assert parse_pair('hf-hub:user/repo:convnext_tiny') == ('hf-hub:user/repo', {}, 'convnext_tiny')
    assert parse_pair('local-dir:out/model:hf-hub:timm/convnext_atto') == (
        'local-dir:out/model', {}, 'hf-hub:timm/convnext_atto')
    assert parse_pair('a,overlay={file: w.safetensors},tag="x:y":b,c=1') == (
        'a', {'overlay': {'file': 'w.safetensors'}, 'tag': 'x:y'}, 'b,c=1')
    # Windows paths: the drive's colon is no separator
    assert parse_pair(r'local-dir:C:\runs\model:convnext_tiny') == (r'local-dir:C:\runs\model', {}, 'convnext_tiny')
    assert parse_pair('a:local-dir:D:/runs/model') == ('a', {}, 'local-dir:D:/runs/model')
    assert parse_pair(r'a,pretrained_file=C:\w.safetensors:b') == ('a', {'pretrained_file': r'C:\w.safetensors'}, 'b')
    for bad in ('a:b:c', 'a', 'hf-hub:user/repo'):
        with pytest.raises(ValueError, match='must look like NAME'):
            parse_pair(bad)


@pytest.mark.parametrize('spec', ['a,num_classes=10:b', 'a:b,in_chans=1', 'a,in_chans=1:b,in_chans=2'])
def test_pairs_given_num_classes_or_in_chans_on_one_side_are_refused(spec):
    """A 10-class S4ND model was compared with a 1000-class baseline without a word: options that change what a
    model takes or returns must be given to both sides alike."""
    with pytest.raises(ValueError, match='must be given to both sides alike'):
        parse_pair(spec)


def test_pairs_run_on_each_models_own_channels():
    """The input had 3 channels whatever the models took (in_chans=1 failed), and the baseline took no options."""
    (row,) = bench_models(pairs=[parse_pair('convnext_s4nd_atto,in_chans=1:convnext_atto,in_chans=1')], img_size=32,
                          batch_size=1, repeats=1)
    assert row['case'] == 'convnext_s4nd_atto,in_chans=1 vs convnext_atto,in_chans=1 @32 b1'
    assert row['train_ratio'] > 0 and row['infer_ratio'] > 0 and row['train_mem_ratio'] > 0


def test_model_spec_values_are_yaml_and_keep_their_commas():
    assert parse_model_spec('convnext_s4nd_atto,dims=[8, 16,16,16],d_state=8,bandlimit=0.5,kernel=sgconv,'
                            "stem={a: 1, b: [2,3]},flag=true") == ('convnext_s4nd_atto', dict(
                                dims=[8, 16, 16, 16], d_state=8, bandlimit=0.5, kernel='sgconv',
                                stem={'a': 1, 'b': [2, 3]}, flag=True))
    assert parse_model_spec('hf-hub:user/repo') == ('hf-hub:user/repo', {})
    for bad, match in ((',d_state=8', 'NAME'), ('m,d_state=', 'key=value'), ('m,=8', 'key=value'),
                       ('m,dims=[8,16', 'not a YAML value'), ('m,a=1,a=2', "'a' is given twice"),
                       ('m,a=1],b=2', 'closes a bracket it never opened'),
                       ('m,a="x,b=2', 'opens a quote it never closes'),
                       ('m,bandlimit=null', 'is null: timm.create_model drops'),
                       ('m,bandlimit=~', 'is null: timm.create_model drops')):
        with pytest.raises(ValueError, match=match):
            parse_model_spec(bad)
    # YAML 1.2 numbers (1.1 read 1e-6 as a string and 010 as 8), quoted commas, spaces after commas
    assert parse_model_spec('m,ls_init_value=1e-6,depth=010,name="a,b", c=0x10,d=2020-01-01') == ('m', dict(
        ls_init_value=1e-6, depth=10, name='a,b', c=16, d='2020-01-01'))
    # a quote inside a plain value is a character, as in YAML (it swallowed the options after it)
    assert parse_model_spec("m,a=it's,b=2") == ('m', dict(a="it's", b=2))


def test_yaml_reads_yaml_1_2_scalars():
    values = load_yaml('[1e-3, 1.0e3, .5, 1., -1E+2, .inf, 0o10, 010, 0x1F, 1:30, 2020-01-01, 1_000, no, on, true, ~]')
    assert values[:5] == [1e-3, 1e3, 0.5, 1.0, -100.0] and values[5] == float('inf')
    assert values[6:] == [8, 10, 31, '1:30', '2020-01-01', '1_000', 'no', 'on', True, None]
    assert math.isnan(load_yaml('.nan'))


def test_bench_rows_hold_ratios():
    rows = bench_layers(batch_size=1, stages=((8, 7),), repeats=1)
    rows += bench_models(pairs=[('convnext_s4nd_atto', {}, 'convnext_atto')], img_size=32, batch_size=1, repeats=1)
    for row in rows:
        ratios = [k for k in row if k.endswith('ratio')]
        assert ratios and all(row[k] > 0 for k in ratios)
    table = format_table(rows[:1])
    assert 'layer 1x8x7x7' in table and 'time_ratio' in table


def test_saved_activations_leave_out_parameters_their_views_and_autocast_copies():
    """nn.Linear saves `weight.t()` (a view) and autocast saves bf16 copies of the weights: neither is an activation,
    so the memory column grows with the batch alone (an S4ND model's generated kernels are its only fixed part)."""
    import timm
    linear = torch.nn.Linear(256, 256)
    x = torch.randn(4, 256, requires_grad=True)
    assert saved_activation_mb(lambda: linear(x)) == 4 * 256 * 4 / 2 ** 20  # the input only, not the 256 KB weight
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert saved_activation_mb(lambda: linear(x)) == 4 * 256 * 2 / 2 ** 20  # its bf16 copy, not the weight's
    model = timm.create_model('convnext_atto')
    for amp in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            one, two = (saved_activation_mb(lambda: model(torch.randn(b, 3, 32, 32))) for b in (1, 2))
        assert two == pytest.approx(2 * one, rel=1e-6), (amp, one, two)


def test_model_pairs_fit_a_vit_baseline_to_the_size():
    """timm's ViT takes its patch grid from its size: the baseline is set to the benchmark's (it was an assertion
    deep in timm at any size but 224)."""
    (row,) = bench_models(pairs=[('vit_s4nd_atto_patch16_224', {}, 'vit_tiny_patch16_224')], img_size=32,
                          batch_size=1, repeats=1)
    assert row['train_ratio'] > 0 and row['infer_ratio'] > 0


def test_layer_candidates_share_one_channels_last_input(monkeypatch):
    """The conv and S4ND get the same tensor (none pays a layout copy the others do not)."""
    from s4nd_vision.bench import benchmark
    inputs = []
    fwd_bwd = benchmark._fwd_bwd
    monkeypatch.setattr(benchmark, '_fwd_bwd', lambda module, x: inputs.append(x) or fwd_bwd(module, x))
    bench_layers(batch_size=1, stages=((8, 7),), repeats=1)
    bench_kernels(batch_size=1, stages=((8, 7),), kernels=('s4d', 'sgconv'), repeats=1)
    assert len(inputs) == 5 and inputs[0] is inputs[1] and inputs[2] is inputs[3] is inputs[4]
    assert all(x.is_contiguous(memory_format=torch.channels_last) and x.requires_grad for x in inputs)


def test_compiled_pairs_report_as_they_go_without_an_eager_memory_column(monkeypatch):
    """torch.compile'd models (identity here: the columns are the point) have no saved-activation column (its
    hooks count eager autograd) but the seconds of each first call (the compilation); `progress` gets the training
    times before inference is measured."""
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: model)
    seen = []
    (row,) = bench_models(pairs=[('convnext_s4nd_atto', {}, 'convnext_atto')], img_size=32, batch_size=1, repeats=1,
                          compile=True, progress=lambda r: seen.append(sorted(r)))
    assert 'compiled' in row['case'] and 'train_mem_ratio' not in row and 's4nd_train_mb' not in row
    assert row['train_ratio'] > 0 and row['infer_ratio'] > 0
    # the compile times first (a pair cut short while timing keeps them), then the training times
    assert 's4nd_train_compile_s' in seen[0] and 'train_ratio' not in seen[0] and 'train_ratio' in seen[1]
    assert not any('infer' in k for keys in seen for k in keys)
    assert all(row[f'{key}_{step}_compile_s'] > 0 for key in ('s4nd', 'baseline') for step in ('train', 'infer'))


def test_video_pairs_run_on_clips_in_channels_last_memory():
    rows = bench_models(pairs=[('convnext_s4nd_3d_atto', {}, 'convnext_3d_atto')], img_size=32, batch_size=1,
                        repeats=1, num_frames=4, channels_last=True)
    assert rows[0]['case'] == 'convnext_s4nd_3d_atto vs convnext_3d_atto @4x32 b1 channels-last'
    assert rows[0]['train_ratio'] > 0 and rows[0]['infer_ratio'] > 0 and rows[0]['train_mem_ratio'] > 0
    with pytest.raises(ValueError, match='num_frames'):
        bench_models(pairs=[('convnext_s4nd_3d_atto', {}, 'convnext_3d_atto')], num_frames=0)
    # a video pair without num_frames, an image pair with it: refused naming num_frames (was a shape error in the stem)
    with pytest.raises(ValueError, match=r"num_frames: 'convnext_s4nd_3d_atto' takes clips"):
        bench_models(pairs=[('convnext_s4nd_3d_atto', {}, 'convnext_3d_atto')], img_size=32, batch_size=1)
    with pytest.raises(ValueError, match=r"num_frames: 'convnext_s4nd_atto' takes inputs of input_size \(3, 32, 32\)"):
        bench_models(pairs=[('convnext_s4nd_atto', {}, 'convnext_atto')], img_size=32, batch_size=1, num_frames=4)


def test_kernel_rows_one_per_kernel_and_stage():
    rows = bench_kernels(batch_size=1, stages=((8, 7), (4, 6)), repeats=1)
    assert [r['case'] for r in rows] == [f'kernel {k} 1x{d}x{s}x{s}' for d, s in ((8, 7), (4, 6))
                                         for k in ('s4d', 's4', 'sgconv')]
    for row in rows:
        assert row['baseline'] == 'dwconv7x7' and row['time_ratio'] == row['s4nd_ms'] / row['baseline_ms']
        assert row['mem_ratio'] == row['s4nd_mb'] / row['baseline_mb'] and row['s4nd_mb'] != row['baseline_mb']
    assert 'kernel sgconv 1x4x6x6' in format_table(rows)


def test_table_columns_stay_apart_for_long_names():
    rows = [dict(case='vit_s4nd_small_patch16_224,token_layout=1d vs vit_small_patch16_224 @224 b8',
                 baseline='vit_small_patch16_224', train_ratio=0.87),
            dict(case='layer 8x96x56x56', baseline='dwconv7x7', train_ratio=1.4)]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ['case', 'baseline', 'train_ratio']
    for line, row in zip(lines[1:], rows):
        assert line.split() == [*row['case'].split(), row['baseline'], f"{row['train_ratio']:.2f}"]
    assert len({len(line) for line in lines}) == 1  # right-aligned columns end together


def test_step_rows_compare_recurrence_with_recompute():
    rows = bench_step(lengths=(16, 64), dim=4, d_state=8, repeats=1)
    assert [r['case'] for r in rows] == [f'step {k} 1x4 L={n}' for k in ('s4d', 's4') for n in (16, 64)]
    for row in rows:
        assert row['baseline'] == 'recompute' and row['s4nd_ms'] > 0 and row['baseline_ms'] > 0
        assert row['speedup'] == pytest.approx(1 / row['time_ratio'])


def test_scaling_rows_hold_growth():
    """Scaling rows are named as such: they shared `layer BxCxHxW` names with the layer rows in one JSON."""
    rows = bench_scaling(batch_size=1, dim=4, sizes=(6, 12, 24), repeats=1)
    assert [r['case'] for r in rows] == ['scaling 1x4x6x6', 'scaling 1x4x12x12', 'scaling 1x4x24x24']
    for prev, row in zip(rows, rows[1:]):
        assert row['s4nd_growth'] == row['s4nd_ms'] / prev['s4nd_ms'] and row['baseline_growth'] > 0


def test_keep_freed_memory_on_glibc():
    import platform

    from s4nd_vision.utils.runtime import keep_freed_memory
    expected = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'
    assert keep_freed_memory() is expected


def test_results_state_their_conditions(tmp_path, capsys):
    """The JSON holds the conditions beside the rows (device, threads, versions, commit, dtype and autocast,
    layout, compile, allocator, command), the same line heads the printed tables, and an autocast pair's row says so
    (it was named as the float32 one)."""
    from s4nd_vision.cli import tool_main
    path = tmp_path / 'bench.json'
    pair = 'convnext_s4nd_atto:convnext_atto'
    tool_main('benchmark', ['--what', 'step', 'models', '--step-lengths', '8', '--pairs', pair, '--img-size', '32',
                            '--batch-size', '1', '--repeats', '1', '--amp', 'bf16', '--device', 'cpu',
                            '--json', str(path)])
    results = json.loads(path.read_text())
    assert results['complete'] is True
    env = results['environment']
    assert env['device'] == 'cpu' and env['threads'] == torch.get_num_threads() and env['torch'] == torch.__version__
    assert env['amp'] == 'bf16' and env['dtype'] == 'float32' and env['channels_last'] is False
    assert env['compile'] is False and 'keep_freed_memory' in env['malloc'] and env['batch_size'] == 1
    assert env['command'] == shlex.join(sys.argv) and 'timm' in env and 'commit' in env  # (the process's command)
    cases = [r['case'] for r in results['rows']]
    assert cases[-1] == 'convnext_s4nd_atto vs convnext_atto @32 b1 amp-bfloat16' and cases[0].startswith('step s4d')
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"cpu ({env['cpu']}, {env['threads']} threads), torch {torch.__version__}")
    assert 'model rows: amp bf16, channels-first' in header


def test_results_without_model_rows_state_no_model_settings(tmp_path):
    """A run with no model rows (--what step) recorded the pairs, size, amp, layout and compile flag of model rows
    it never measured (the default pair convnext_s4nd_tiny among them); it records them only with model rows."""
    from s4nd_vision.cli import tool_main
    path = tmp_path / 'bench.json'
    tool_main('benchmark', ['--what', 'step', '--step-lengths', '8', '--repeats', '1', '--amp', 'bf16', '--device',
                            'cpu', '--json', str(path)])
    env = json.loads(path.read_text())['environment']
    assert env['what'] == ['step'] and env['dtype'] == 'float32'
    assert not {'amp', 'channels_last', 'compile', 'img_size', 'num_frames', 'pairs'} & set(env), env


def test_an_interrupted_benchmark_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    """The JSON is rewritten as each row finishes, and Ctrl-C keeps it: the finished rows, a model pair's row so far
    (under 'partial') and 'interrupted' (it was written only at the end: an interruption lost every row)."""
    from s4nd_vision.bench import benchmark
    from s4nd_vision.cli import tool_main
    path = tmp_path / 'bench.json'

    def interrupted_pair(pairs, progress, **kwargs):
        on_disk = json.loads(path.read_text())  # the finished rows are already in the file
        assert [r['case'] for r in on_disk['rows']] == [f'step {k} 1x256 L=8' for k in ('s4d', 's4')]
        assert on_disk['complete'] is False  # (a run killed here, e.g. by `timeout`, leaves this file)
        progress(dict(case='pair so far', baseline_train_ms=1.0))
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, 'bench_models', interrupted_pair)
    with pytest.raises(SystemExit) as exit_info:
        tool_main('benchmark', ['--what', 'step', 'models', '--step-lengths', '8', '--repeats', '1', '--device', 'cpu',
                                '--json', str(path)])
    assert exit_info.value.code == 130
    results = json.loads(path.read_text())
    assert results['interrupted'] and len(results['rows']) == 2 and results['partial']['case'] == 'pair so far'
    assert results['complete'] is False
    assert 'step s4 1x256 L=8' in capsys.readouterr().out  # (the table of the rows measured)


@pytest.mark.parametrize('pair, size, message', [
    ('convnext_s4nd_atto,foo=1:convnext_atto', '32',
     "model pair convnext_s4nd_atto vs convnext_atto: convnext_s4nd_atto does not take the arguments {'foo': 1}"),
    ('convnext_s4nd_atto:convnext_atto,d_state=8', '32', "convnext_atto does not take the arguments {'d_state': 8}"),
    ('convnext_s4nd_atto:convnext_atto', '16', 'img_size must be at least 32 on each side'),
])
def test_a_pair_that_cannot_run_is_refused_before_anything_is_measured(pair, size, message, monkeypatch, capsys):
    """A pair's unknown argument (or a size below a model's minimum) ended the run only when its turn came, after every
    other section's rows (minutes to hours), with timm's bare TypeError naming neither the pair nor the side."""
    from s4nd_vision.bench import benchmark
    from s4nd_vision.cli import tool_main

    def not_reached(**kwargs):
        raise AssertionError('a row was measured before the pair was checked')
    monkeypatch.setattr(benchmark, 'bench_step', not_reached)
    with pytest.raises(SystemExit) as exit_info:
        tool_main('benchmark', ['--what', 'step', 'models', '--step-lengths', '8', '--repeats', '1', '--device', 'cpu',
                                '--img-size', size, '--pairs', pair])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and 'Traceback' not in err and message in err.splitlines()[-1], err


def test_pair_models_are_built_for_the_benchmarked_input(monkeypatch):
    """A ConvNeXt-S4ND was built for 224 px (and a video model for 16 frames) whatever --img-size / --num-frames: at
    64 px it masked more modes and timed 15% faster than the model one trains at 64 px. The pair's own img_size or
    num_frames is kept, and timm's own models get no such argument."""
    from s4nd_vision.bench import benchmark
    built = {}
    create = benchmark.timm.create_model

    def spy(name, **kwargs):
        built[name] = kwargs
        return create(name, **kwargs)
    monkeypatch.setattr(benchmark.timm, 'create_model', spy)
    benchmark.check_pairs([parse_pair('convnext_s4nd_atto,dims=[8,8,8,8]:convnext_atto')], img_size=64)
    assert built == {'convnext_s4nd_atto': dict(img_size=64, dims=[8, 8, 8, 8]), 'convnext_atto': {}}
    built.clear()
    benchmark.check_pairs([parse_pair('convnext_s4nd_3d_atto,img_size=32:convnext_3d_atto')], img_size=64, num_frames=4)
    assert built == {'convnext_s4nd_3d_atto': dict(num_frames=4, img_size=32),  # (this package's 3D baseline too)
                     'convnext_3d_atto': dict(img_size=64, num_frames=4)}


@pytest.mark.parametrize('frames', ['0', '-2'])
def test_num_frames_must_be_positive(frames, capsys):
    """--num-frames 0 told a video pair to 'give num_frames', and -2 told an image pair that it takes no clips:
    a count of frames below 1 is refused as such."""
    from s4nd_vision.cli import tool_main
    with pytest.raises(SystemExit) as exit_info:
        tool_main('benchmark', ['--what', 'models', '--num-frames', frames, '--pairs', 'convnext_s4nd_3d_atto:'
                                'convnext_3d_atto', '--img-size', '32', '--repeats', '1', '--device', 'cpu'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--num-frames: expects a positive integer, got '{frames}'" in err, err


@pytest.mark.parametrize('argv, message', [
    (['flops', 'convnext_atto', '--img-size', '16'],
     "--img-size 16 is smaller than the minimum input size of 'convnext_atto' (32 px)"),
    (['flops', 'vit_tiny_patch16_224', '--img-size', '8'],
     "--img-size 8 is smaller than the minimum input size of 'vit_tiny_patch16_224' (16 px)"),
    (['smoke', '--model', 'convnext_atto', '--resolutions', '16'],
     "resolutions [16] are smaller than the minimum input size of 'convnext_atto' (32 px)"),
    (['benchmark', '--what', 'models', '--pairs', 's4nd_iso_tiny:convnext_atto', '--img-size', '16', '--repeats', '1'],
     "img_size 16 is smaller than the minimum input size of 'convnext_atto' (32 px)"),
], ids=lambda v: v[0] if isinstance(v, list) else '')
def test_tools_check_a_baselines_minimum_size(argv, message, capsys):
    """A timm baseline below its total stride (patch size) ends in one `error:` line, as our models do (it was a
    traceback from deep in its first conv)."""
    from s4nd_vision.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and 'Traceback' not in err and err.splitlines()[-1] == f'error: {message}', err


def test_commit_is_the_packages_own_checkout_and_the_version_is_recorded(tmp_path):
    """A package installed in a venv inside another git repository reported that project's commit (git walks up from
    site-packages): only a checkout whose top level holds the package counts. The package's version is always
    recorded, so a result file from a plain install still says which code produced it."""
    import subprocess

    import s4nd_vision
    from s4nd_vision.bench.benchmark import _commit, environment
    site = tmp_path / '.venv' / 'site-packages'
    site.mkdir(parents=True)
    git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t']
    subprocess.run([*git, 'init', '-q'], cwd=tmp_path, check=True)
    subprocess.run([*git, 'commit', '-q', '--allow-empty', '-m', 'the user project'], cwd=tmp_path, check=True)
    project = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert _commit(root=str(site)) is None
    assert _commit(root=str(tmp_path)) == project  # (the repository's own top level)
    assert environment(torch.device('cpu'), commit='abc1234')['s4nd_vision'] == s4nd_vision.__version__


def test_ratios_divide_each_candidates_own_numbers_s4nd_over_the_baseline(monkeypatch):
    """Each ratio is S4ND's number over its baseline's, each timed on its own candidate (a swapped or inverted one
    reads a slower S4ND as faster): timed here by a stand-in that knows what ran, memory as measured."""
    from s4nd_vision.bench import benchmark
    ms = {'Conv2d': 2.0, 'S4ND': 3.0, ('s4nd', 'step'): 3.0, ('baseline', 'step'): 2.0, ('s4nd', 'infer'): 1.0,
          ('baseline', 'infer'): 4.0}
    monkeypatch.setattr(benchmark, '_fwd_bwd', lambda module, x: lambda: type(module).__name__)
    monkeypatch.setattr(benchmark, 'time_ms', lambda fns, *a, **k: {
        name: ms[fn()] if fn.__name__ == '<lambda>' else ms[name, fn.__name__] for name, fn in fns.items()})
    (row,) = bench_layers(batch_size=1, stages=((8, 7),), repeats=1)
    assert (row['baseline_ms'], row['s4nd_ms'], row['time_ratio']) == (2.0, 3.0, 1.5)
    assert row['mem_ratio'] == row['s4nd_mb'] / row['baseline_mb'] and row['s4nd_mb'] != row['baseline_mb']
    (row,) = bench_models(pairs=[('convnext_s4nd_atto', {}, 'convnext_atto')], img_size=32, batch_size=1, repeats=1)
    assert (row['s4nd_train_ms'], row['baseline_train_ms'], row['train_ratio']) == (3.0, 2.0, 1.5)
    assert (row['s4nd_infer_ms'], row['baseline_infer_ms'], row['infer_ratio']) == (1.0, 4.0, 0.25)
    assert row['train_mem_ratio'] == row['s4nd_train_mb'] / row['baseline_train_mb']


def test_timings_wait_for_the_asynchronous_mps_device(monkeypatch):
    """Apple's MPS queues its work as CUDA does: each timed call waits for it (without, `--device mps` timed only the
    launches, and the S4ND / baseline ratios were wrong without a word)."""
    from s4nd_vision.bench import benchmark
    calls = []
    monkeypatch.setattr(torch.mps, 'synchronize', lambda: calls.append('sync'))
    benchmark.time_ms({'a': lambda: calls.append('a')}, torch.device('mps'), warmup=1, repeats=2)
    assert calls == ['a', 'sync', 'a', 'sync', 'a', 'sync']
