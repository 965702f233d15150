"""The one-call GPU check (`bench.gpu_check`) runs every section end to end at tiny sizes on the CPU (Triton's
interpreter, the Triton path forced), so that it works the first time a GPU is lent; it measures nothing here."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from s4nd_vision.bench import gpu_check
from s4nd_vision.cli import tool_main
from s4nd_vision.layers import ops


def _correctness_checks(plan) -> int:
    """The checks of `plan`'s correctness section: conv cases in two dtypes by both fused algorithms, the models'
    kernels (autocast cases), custom op, generation, two layers, the Triton one checkpointed and every fast case with
    each algorithm, in fp32 and bf16."""
    return (4 * (len(plan.conv_cases) + len(plan.conv3d_cases)) + len(plan.autocast_cases) + 7
            + 2 * len(plan.fast_cases) * len(ops.ALGORITHMS))


@pytest.fixture(scope='module')
def every_section(tmp_path_factory):
    """One isolated run (its rows in a worker process, as on CUDA) of every section but 'compiled' (the same code,
    compile=True), without faults, asked in reverse order: shared by the tests that read it (the run is the suite's
    costliest). The rows' time limits are lifted: a loaded machine must not make a row count as hung."""
    path = tmp_path_factory.mktemp('every_section') / 'gpu_check.json'
    sections = [s for s in gpu_check.SECTIONS if s != 'compiled']
    with pytest.MonkeyPatch.context() as m:
        for section in gpu_check._ROW_LIMIT_S:
            m.setitem(gpu_check._ROW_LIMIT_S, section, 3600)
        results = gpu_check.run_checks(sections[::-1], gpu_check.TINY, 'cpu', str(path), isolate=True)
    return sections, path, results


@pytest.mark.xdist_group('gpu_check_every_section')  # (shares its module fixture's run: one process)
def test_every_section_runs_and_reports(every_section):
    sections, path, results = every_section
    assert results['ok'] and json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert list(results['seconds']) == sections  # in SECTIONS order, whatever the order asked
    assert sections == ['correctness', 'models', 'bench', 'dot', 'profile']  # (profile decides nothing: last)
    assert results['plan']['batch'] == gpu_check.TINY.batch and 'commit' in results and 'triton' in results
    plan = gpu_check.TINY
    checks = results['correctness']
    assert len(checks) == _correctness_checks(plan)
    assert all(c['ok'] for c in checks)
    assert any('triton path' in c['check'] for c in checks) and any('inductor' in c['check'] for c in checks)
    assert any('fast path' in c['check'] for c in checks)
    assert sum(c['check'].startswith('conv3d') for c in checks) == 4 * len(plan.conv3d_cases) + sum(
        len(shape) == 5 for shape, _ in plan.autocast_cases)  # by both algorithms, and the video pair's kernels
    image_rows = [f'layer {plan.batch}x4x5x5 {d}' for d in ('float32', 'bfloat16', 'float32 in bf16 autocast')]
    assert [r['case'] for r in results['bench']] == image_rows + [
        f'3D layer {plan.video[0]}x4x2x5x5 float32 in bf16 autocast']
    assert all(r['triton_ratio'] > 0 and r['fast_ratio'] > 0 for r in results['bench'])
    assert [(r['model'], r['train']) for r in results['profile']] == (
        [(name, True) for name in plan.profile_models] + [(name, False) for name in plan.profile_models])
    assert all('Name' in r['top_operators'] for r in results['profile'])
    assert all(r['step_ms'] > 0 and r['profiled_step_ms'] > 0 for r in results['profile'])
    cases = [r['case'] for r in results['models']]
    assert cases[0].startswith('convnext_s4nd_atto vs convnext_atto @32 b2 amp-bfloat16 channels-last')
    assert cases[-1].startswith('convnext_s4nd_3d_atto vs convnext_3d_atto @2x32 b1')
    # the tensor-core kernels: checked in correctness (every conv case), then the first image pair with them on
    # every layer up to DOT_TRY_SIDE, the video pair again with them, the layers by both algorithms and the fast
    # path (the rows deciding the dispatch's choices), and last the variants
    dot_checks = 2 * (len(plan.conv_cases) + len(plan.conv3d_cases)) + len(plan.autocast_cases)
    assert sum(c['check'].endswith(' dot') for c in checks) == dot_checks
    assert sum(c['check'].endswith('float32 in bf16 autocast dot') for c in checks) == len(plan.autocast_cases)
    dot = results['dot']
    assert [r['case'] for r in dot[:2]] == [cases[0], cases[-1]]  # the first image pair, the video pair
    assert dot[0]['triton_side'] == gpu_check.DOT_TRY_SIDE and dot[1]['algorithm'] == 'dot'
    layers, variants = dot[2:2 + len(results['bench'])], dot[2 + len(results['bench']):]
    assert [r['case'] for r in layers] == [r['case'] for r in results['bench']]
    assert all(r['dot_ratio'] > 0 and r['sum_ratio'] > 0 and r['fast_ratio'] > 0 for r in layers)  # (both paths)
    assert not any(f'{v}_ratio' in r for r in layers for v in gpu_check.DOT_VARIANTS)
    # the variants on the rows of the models' case (float32 under bf16 autocast: the 2D one and the 3D one)
    assert [r['case'] for r in variants] == [r['case'] for r in layers if 'autocast' in r['case']]
    assert len(variants) == 2 and all(r[f'{v}_ratio'] > 0 for r in variants for v in ('dot', *gpu_check.DOT_VARIANTS))
    assert all(r['path'] == 'dispatch' for r in results['models'] + results['profile'] + dot[:2])
    assert all(r['path'] == 'per column' for r in results['bench'] + dot[2:])  # (each column forces its path)
    assert all(r['train_ratio'] > 0 and r['infer_ratio'] > 0 for r in results['models'])


def test_a_row_or_check_that_raises_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    """A failing check of the Triton path switches the later model and profile rows to the fast path; a failing row
    loses only itself, and the file holds every row measured so far. (The correctness checks other than the failing
    one and the layer's on the Triton path pass as stubs: only the bookkeeping is checked here.)"""
    def broken(*args, **kwargs):
        raise RuntimeError('no kernel image for this device')

    def passing(plan, device, checks):
        checks.add('passing', {'y': 0.0}, 1e-4)
    for name in ('check_conv', 'check_conv_dot', 'check_conv_autocast', 'check_fast_layer', 'check_fast_algorithms',
                 'check_inductor'):
        monkeypatch.setattr(gpu_check, name, passing)
    saved = []
    monkeypatch.setattr(gpu_check, '_bench_video_stage', broken)  # the last row of bench
    monkeypatch.setattr(gpu_check, 'check_generation', broken)
    real_save = gpu_check._Results.save
    monkeypatch.setattr(gpu_check._Results, 'save', lambda self: (real_save(self), saved.append(len(self['bench']))
                                                                  if 'bench' in self else None))
    path = tmp_path / 'gpu_check.json'
    results = gpu_check.run_checks(['correctness', 'bench', 'profile'], gpu_check.TINY, 'cpu', str(path))
    assert not results['ok'] and results['path'] == 'fast'  # switched by the failed check
    assert 'no kernel image' in results['errors']['bench[3]'] and len(results['bench']) == 3  # the 2D rows kept
    assert saved[:2] == [1, 2]  # written after each row
    failed = [c for c in results['correctness'] if not c['ok']]
    assert [c['check'] for c in failed] == ['broken'] and 'no kernel image' in failed[0]['error']
    assert any('triton path' in c['check'] and c['ok'] for c in results['correctness'])  # the checks after it ran
    assert len(results['profile']) == 4 and json.loads(path.read_text())['errors'] == results['errors']
    assert all(r['path'] == 'fast' for r in results['profile'])  # each row says so
    assert all(r['path'] == 'per column' for r in results['bench'])  # (its columns force their paths)


def test_the_budget_stops_starting_rows(tmp_path, capsys):
    results = gpu_check.run_checks(['correctness', 'profile'], gpu_check.TINY, 'cpu', budget_s=0)
    out = capsys.readouterr().out  # checks skipped are not reported as passed
    assert "correctness: NOT RUN: ['check_conv'," in out and 'every check passed' not in out
    assert results['skipped'] == {'correctness': ['check_conv', 'check_conv_dot', 'check_conv_autocast',
                                                   'check_generation', 'check_layer', 'check_checkpointed',
                                                   'check_fast_layer',
                                                   'check_fast_algorithms', 'check_inductor'],
                                  'profile': [0, 1, 2, 3]}
    assert results['profile'] == [] and results['ok']


def test_a_compiled_pair_needs_its_minimum_budget_left_to_start(monkeypatch):
    """A compiled pair compiles for minutes: with less budget left than `_MIN_LEFT_S` it is skipped, not started to
    be killed part-way (a run on a lent GPU would lose its remaining minutes to it)."""
    monkeypatch.setattr(gpu_check, '_bench_pair', lambda *a, **k: pytest.fail('a compiled pair started'))
    results = gpu_check.run_checks(['compiled'], gpu_check.TINY, 'cpu', budget_s=100)  # (300 s wanted)
    assert results['skipped']['compiled'] == [0] and results['compiled'] == []


def test_an_in_process_run_writes_its_environment_before_its_first_row(monkeypatch, tmp_path, capsys):
    """A run killed in its first row (an outer limit on an in-process run) still leaves the file with the device,
    versions and plan; skipped compiled pairs come with the command that runs them."""
    path = str(tmp_path / 'run.json')

    def killed(*args, **kwargs):
        assert json.load(open(path))['plan']  # (written before the rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, '_run_rows', killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_checks(['correctness'], gpu_check.TINY, 'cpu', json_path=path)
    monkeypatch.undo()
    results = gpu_check.run_checks(['profile', 'compiled'], gpu_check.TINY, 'cpu', budget_s=0)
    assert results['skipped']['compiled'] == [0]
    assert 'run them on their own (--sections compiled), with at least that budget per pair' in capsys.readouterr().out


def test_a_failed_check_fails_the_run():
    checks = gpu_check._Checks()
    checks.add('close', {'y': 1e-6}, 1e-4)
    assert checks.ok
    checks.add('far', {'y': 0.5, 'dx': 1e-6}, 1e-4)
    assert not checks.ok and [c['ok'] for c in checks.rows] == [True, False]
    checks = gpu_check._Checks()
    checks.add('just over the limit', {'y': 1e-6, 'dx': 2e-4}, 1e-4)  # (one column off by 2x fails the check)
    assert not checks.ok
    with pytest.raises(ValueError, match='sections'):
        gpu_check.run_checks(['speed'], gpu_check.TINY, 'cpu')


def test_the_command_passes_its_options_and_exits_1_when_a_check_fails(tmp_path, monkeypatch):
    """`gpu-check` gives each option to run_checks and exits with status 1 when a check failed (a CI job or a script
    on a lent GPU reads the status), else returns the results."""
    calls = []

    def run_checks(*args, **kwargs):  # (the checks themselves are tested above)
        calls.append((args, kwargs))
        return {'ok': len(calls) == 1}

    monkeypatch.setattr(gpu_check, 'run_checks', run_checks)
    json_path = str(tmp_path / 'out' / 'gpu.json')
    assert tool_main('gpu-check', ['--device', 'cpu', '--tiny', '--sections', 'profile', 'compiled', '--json',
                                   json_path, '--path', 'fast', '--budget-s', '5', '--in-process', '--commit', 'abc'])
    assert calls[0] == ((['profile', 'compiled'], gpu_check.TINY, 'cpu', json_path, 'fast', 5.0),
                        dict(isolate=False, commit='abc'))
    for argv, plan, budget in (([], gpu_check.GPU, gpu_check.BUDGET_S), (['--tiny'], gpu_check.TINY, None)):
        with pytest.raises(SystemExit) as info:
            tool_main('gpu-check', ['--device', 'cpu', *argv])
        assert info.value.code == 1
        assert calls[-1] == ((list(gpu_check.SECTIONS), plan, 'cpu', None, None, budget),
                             dict(isolate=None, commit=None))


def test_the_commit_can_be_given_and_the_tool_runs_from_an_uninstalled_copy(tmp_path):
    """A GPU machine may get a copy of the tree without .git and without installing it: `--commit` records the
    commit, and tools/gpu_check.py imports the package of the tree it is in."""
    results = tool_main('gpu-check', ['--device', 'cpu', '--tiny', '--sections', 'profile', '--budget-s', '0',
                                      '--commit', 'abc1234'])
    assert results['commit'] == 'abc1234' and results['skipped'] == {'profile': [0, 1, 2, 3]}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ('import os, runpy, sys; '
            "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "  # (not installed)
            f"runpy.run_path({os.path.join(root, 'tools', 'gpu_check.py')!r}); "
            "import s4nd_vision; print(os.path.dirname(os.path.dirname(s4nd_vision.__file__)))")
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    run = subprocess.run([sys.executable, '-I', '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert os.path.samefile(run.stdout.strip(), root)


def test_cli_refuses_cuda_without_a_device(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        tool_main('gpu-check', ['--sections', 'bench'])
    assert exit_info.value.code == 2 and 'no CUDA device' in capsys.readouterr().err


def test_a_row_that_kills_hangs_or_breaks_its_worker_loses_only_itself(monkeypatch, tmp_path):
    """Isolated (the default on CUDA): a row that kills its process, one that breaks its CUDA context and one that
    hangs are each recorded as failed, and a new worker goes on with the next row, on the fast path."""
    monkeypatch.setenv(gpu_check._FAULT_ENV, 'bench[0]=exit,bench[1]=cuda,profile[0]=hang')
    # (the rows that do not hang must end within it on a loaded machine: the suite runs in two processes on 2 cores)
    monkeypatch.setitem(gpu_check._ROW_LIMIT_S, 'profile', 30)
    path = tmp_path / 'gpu_check.json'
    results = gpu_check.run_checks(['bench', 'profile'], gpu_check.TINY, 'cpu', str(path), isolate=True)
    assert json.loads(path.read_text()) == json.loads(json.dumps(results)) and 'running' not in results
    assert results['crashed'] == ['bench[0]', 'bench[1]', 'profile[0]'] and not results['ok']
    assert 'exit status 13' in results['errors']['bench[0]']
    assert 'illegal memory access' in results['errors']['bench[1]']
    assert 'killed after' in results['errors']['profile[0]']
    assert [r['case'] for r in results['bench']] == [
        f'layer {gpu_check.TINY.batch}x4x5x5 float32 in bf16 autocast',
        f'3D layer {gpu_check.TINY.video[0]}x4x2x5x5 float32 in bf16 autocast']
    assert [r['model'] for r in results['profile']] == [gpu_check.TINY.profile_models[1]] + list(
        gpu_check.TINY.profile_models)  # (training, then inference)
    assert results['path'] == 'fast' and results['isolated'] and results['seconds']['profile'] >= 30


def _terminated_in_a_hanging_row(monkeypatch, path, row: str) -> dict:
    """An isolated TINY 'profile' run whose `row` hangs, sent SIGTERM (as `timeout` would) once it runs it."""
    monkeypatch.setenv(gpu_check._FAULT_ENV, f'{row}=hang')
    monkeypatch.setitem(gpu_check._ROW_LIMIT_S, 'profile', 600)

    def terminate_in_the_hanging_row():
        while (gpu_check._running(str(path)) or {}).get('row') != row:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_in_the_hanging_row, daemon=True)
    killer.start()
    results = gpu_check.run_checks(['profile'], gpu_check.TINY, 'cpu', str(path), isolate=True)
    killer.join()
    return results


def test_sigterm_ends_an_isolated_run_with_its_bookkeeping(monkeypatch, tmp_path):
    """An outer time limit (`timeout` sends SIGTERM): the interrupted row is recorded as failed, the rows after it as
    skipped, and the file says so (it kept 'running', and the run 'ok', before)."""
    path = tmp_path / 'gpu_check.json'
    results = _terminated_in_a_hanging_row(monkeypatch, path, 'profile[1]')
    assert json.loads(path.read_text()) == json.loads(json.dumps(results)) and 'running' not in results
    assert results['interrupted'] and not results['ok'] and results['crashed'] == ['profile[1]']
    assert 'SIGTERM' in results['errors']['profile[1]'] and results['skipped'] == {'profile': [2, 3]}
    assert [r['model'] for r in results['profile']] == [gpu_check.TINY.profile_models[0]]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # (restored)


def test_a_second_sigterm_does_not_cut_the_bookkeeping_short(monkeypatch, tmp_path):
    """`timeout` and process-group kills may send SIGTERM again while the run records the interrupted row: the run
    still ends with its file written (and the handler restored after)."""
    path = tmp_path / 'gpu_check.json'
    real_reload = gpu_check._reload

    def reload_under_a_second_sigterm(results):  # (called once the worker is killed: the bookkeeping's start)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_reload(results)
    monkeypatch.setattr(gpu_check, '_reload', reload_under_a_second_sigterm)
    results = _terminated_in_a_hanging_row(monkeypatch, path, 'profile[0]')
    assert results['interrupted'] and results['skipped'] == {'profile': [1, 2, 3]}
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def _children(pid: int) -> list:
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(child) for child in f.read().split()]


def _cmdline(pid: int) -> bytes:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
        return f.read()


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_a_worker_ends_with_its_killed_supervisor(tmp_path):
    """A supervisor killed without clean-up (SIGKILL, e.g. an outer `timeout -k`) leaves no worker running on (it
    would hold the GPU): the worker ends with it, here in a row that would hang for an hour."""
    path = tmp_path / 'gpu_check.json'
    code = ('import sys; from s4nd_vision.bench import gpu_check; '
            "gpu_check.run_checks(['profile'], gpu_check.TINY, 'cpu', sys.argv[1], isolate=True)")
    env = dict(os.environ, **{gpu_check._FAULT_ENV: 'profile[0]=hang'})
    supervisor = subprocess.Popen([sys.executable, '-c', code, str(path)], env=env)
    worker = None
    try:
        deadline = time.time() + 120
        while (gpu_check._running(str(path)) or {}).get('row') != 'profile[0]':
            assert time.time() < deadline and supervisor.poll() is None
            time.sleep(0.2)
        (worker,) = [pid for pid in _children(supervisor.pid) if b'spawn_main' in _cmdline(pid)]
        assert _alive(worker)
        supervisor.kill()
        supervisor.wait()
        deadline = time.time() + 10
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(worker)
    finally:  # (no process left behind, whatever failed)
        left = [worker] if worker is not None else _children(supervisor.pid) if supervisor.poll() is None else []
        supervisor.kill()
        for pid in left:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.xdist_group('gpu_check_every_section')  # (shares its module fixture's run: one process)
def test_an_isolated_run_without_faults_runs_one_worker(every_section):
    results = every_section[2]  # (every section but 'compiled', isolated)
    assert results['ok'] and results['crashed'] == [] and results['path'] is None and results['isolated']
    assert len(results['correctness']) == _correctness_checks(gpu_check.TINY)
    # without a file of its own the run keeps its rows in a temporary one (a worker needs one): here its worker
    # starts, finds the budget spent and ends
    results = gpu_check.run_checks(['correctness'], gpu_check.TINY, 'cpu', isolate=True, budget_s=0)
    assert results['ok'] and results['crashed'] == [] and results['isolated'] and 'errors' in results
    assert len(results['skipped']['correctness']) == 9 and results['correctness'] == []


def test_device_activity_counts_kernels_and_the_union_of_busy_time():
    """Two 300 us kernels, a memset, and a user annotation spanning both kernels (as Kineto mirrors a
    record_function range on the device timeline), over a 1 ms step: 2 launches, 610 us busy (not 1,310)."""
    import inspect

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent
    accepted = inspect.signature(FunctionEvent).parameters  # (torch 2.11's events have no activity_type)

    def event(name, start, end, **kw):
        kw = {k: v for k, v in kw.items() if k in accepted}
        return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=DeviceType.CUDA, **kw)

    events = [event('kernel_a', 0, 300, activity_type='kernel'), event('kernel_b', 400, 700, activity_type='kernel'),
              event('Memset (Device)', 700, 710, activity_type='gpu_memset'),
              event('region', 0, 700, is_user_annotation=True, activity_type='gpu_user_annotation'),
              event('kernel_c', 200, 350, activity_type='kernel'),  # on another stream, overlapping kernel_a
              FunctionEvent(id=0, name='aten::add', thread=0, start_us=0, end_us=900)]  # a host event
    assert gpu_check._device_activity(events) == (3, 660.0)


def test_a_compiled_pair_cut_short_keeps_what_it_measured(monkeypatch, tmp_path):
    """A compiled pair compiles for minutes: its training times are in the file before its inference runs, and
    stay there (under 'partial') when the row fails or is killed; a row that completes leaves no partial entry."""
    def training_then_failure(*args, progress=None, **kwargs):
        progress(dict(case='pair', s4nd_train_ms=2.0, baseline_train_ms=1.0, train_ratio=2.0))
        raise RuntimeError('killed while compiling the inference graph')

    monkeypatch.setattr(gpu_check, 'bench_models', training_then_failure)
    path = tmp_path / 'gpu_check.json'
    results = gpu_check.run_checks(['compiled'], gpu_check.TINY, 'cpu', str(path))
    assert results['partial'] == {'compiled[0]': dict(case='pair', s4nd_train_ms=2.0, baseline_train_ms=1.0,
                                                      train_ratio=2.0)}
    assert 'killed while compiling' in results['errors']['compiled[0]']
    assert json.loads(path.read_text())['partial'] == results['partial']
    monkeypatch.setattr(gpu_check, 'bench_models', lambda *a, progress=None, **k: progress({}) or [dict(case='ok')])
    results = gpu_check.run_checks(['compiled'], gpu_check.TINY, 'cpu', str(path))
    assert results['compiled'] == [dict(case='ok', path='dispatch')] and results['partial'] == {}


def test_only_the_triton_path_failing_switches_the_model_and_profile_rows_to_the_fast_path():
    """A crashed row outside 'dot', or a failed check of the Triton path, switches the rows that run S4ND as the
    dispatch chooses (models, profile, compiled) to the fast path; the 'dot' rows (settings beside the dispatch's) and
    the layer rows (each column forces its path) keep theirs, and a crashed 'dot' row, a failed check of the fast
    path or of inductor switch nothing."""
    def path(section, crashed=(), failed=(), forced=None):
        checks = [dict(check='conv', row='check_conv', ok=True)] + [dict(check=f, row=f, ok=False) for f in failed]
        return gpu_check._measured_path(gpu_check._Results(None, path=None, correctness=checks,
                                                           crashed=list(crashed)), forced, section)
    assert path('models', crashed=['dot[1]']) is None
    assert path('models', crashed=['models[0]']) == path('profile', crashed=['bench[0]']) == 'fast'
    assert path('dot', crashed=['profile[0]']) is None and path('bench', failed=['check_conv']) is None
    assert path('profile', failed=['check_conv_autocast']) == path('compiled', failed=['check_layer']) == 'fast'
    assert path('models', failed=['check_inductor', 'check_fast_layer', 'check_fast_algorithms']) is None
    assert path('models', failed=['check_conv'], forced='triton') == 'triton'
    assert path('dot', forced='fast') is None  # (--path forces the model, profile and compiled sections)


def test_inductor_failing_leaves_the_model_rows_on_the_dispatch(monkeypatch):
    """torch.compile failing fails its own check (the run fails) but switches no model row to the fast path."""
    def broken(*args, **kwargs):
        raise RuntimeError('inductor failed (injected)')

    def passing(plan, device, checks):
        checks.add('passing', {'y': 0.0}, 1e-4)
    monkeypatch.setattr(torch, 'compile', broken)
    for name in ('check_conv', 'check_conv_dot', 'check_conv_autocast', 'check_generation', 'check_layer',
                 'check_checkpointed', 'check_fast_layer', 'check_fast_algorithms'):
        monkeypatch.setattr(gpu_check, name, passing)
    results = gpu_check.run_checks(['correctness', 'models'], gpu_check.TINY, 'cpu')
    failed = [c for c in results['correctness'] if not c['ok']]
    assert len(failed) == 1 and 'inductor failed' in failed[0]['error'] and not results['ok']
    assert results['path'] is None and [r['path'] for r in results['models']] == ['dispatch', 'dispatch']


def test_triton_sides_apply_within_the_call_only():
    """The 'dot' section's extra image pair runs the fused kernels on every 2D layer up to DOT_TRY_SIDE, in training
    and inference; the dispatch's measured sides are back after the call, also when it raises."""
    from s4nd_vision.layers import dispatch
    landed = (dict(dispatch.TRITON_FASTER_SIDE), dict(dispatch.TRITON_FASTER_SIDE_INFERENCE))
    shape = (2, 96, 56, 56)

    def faster():
        with torch.no_grad():
            inference = dispatch._triton_faster(shape)
        return dispatch._triton_faster(shape), inference
    assert faster() == (False, False)  # (the landed sides: 16 and 32)
    assert gpu_check._with_triton_sides(faster, gpu_check.DOT_TRY_SIDE)() == (True, True)
    assert (dispatch.TRITON_FASTER_SIDE, dispatch.TRITON_FASTER_SIDE_INFERENCE) == landed

    def broken():
        raise RuntimeError('row failed')
    with pytest.raises(RuntimeError):
        gpu_check._with_triton_sides(broken, 64)()
    assert (dispatch.TRITON_FASTER_SIDE, dispatch.TRITON_FASTER_SIDE_INFERENCE) == landed


def test_dot_variants_apply_within_the_call_only():
    """The 'dot' section's variant columns run the tensor-core kernels with other settings (those an H200 measured
    before: 'dot_wide'); the landed settings are back after the call, also when it raises."""
    from s4nd_vision.layers import triton_conv
    names = ('DOT_TILE', 'DOT_GRAD_TILE', 'DOT_IMAGES', 'DOT_GRAD_BLOCK')
    landed = {k: getattr(triton_conv, k) for k in names}
    wide = gpu_check.DOT_VARIANTS['dot_wide']
    assert wide != {k: landed[k] for k in wide}
    seen = gpu_check._with_dot_settings(lambda: {k: getattr(triton_conv, k) for k in names}, wide)()
    assert seen == dict(DOT_TILE=4096, DOT_GRAD_TILE=1024, DOT_IMAGES=1, DOT_GRAD_BLOCK=64)
    assert {k: getattr(triton_conv, k) for k in names} == landed

    def broken():
        raise RuntimeError('row failed')
    with pytest.raises(RuntimeError):
        gpu_check._with_dot_settings(broken, wide)()
    assert {k: getattr(triton_conv, k) for k in names} == landed


def test_correctness_launches_the_kernel_configurations_of_the_models(monkeypatch):
    """The GPU plan's correctness section launches every configuration (constexprs: images per program, tile side,
    product dtype, pooling...) of the tensor-core kernels that the models' layers launch under bf16 autocast:
    ConvNeXt-T's stage shapes at batch 128, pooled and not, and the video pair's stage shapes (8 clips of 8 frames,
    with 'dot' as the 'dot' section runs it). The kernels are recorders here: they compute nothing."""
    import triton.runtime.jit

    from s4nd_vision.layers import S4ND, dispatch, triton_conv, triton_kernels
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, tuple(sorted(map(str, kwargs.items())))))

    for module in (triton_conv, triton_kernels):
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.KernelInterface):
                monkeypatch.setattr(module, name, Recorder(name))
    monkeypatch.setattr(triton_conv, '_operands', str)  # (the interpreter multiplies bf16 in float32)

    def configurations(run) -> set:
        start = len(launches)
        run()
        return {launch for launch in launches[start:] if launch[0].startswith('_dot')}

    class Unchecked(gpu_check._Checks):  # (the recorded kernels' outputs are left uninitialized)
        def add(self, *args):
            pass

    def unreferenced_case(shape, rank, pools):  # (`_conv_case` less its float64 reference: the launches depend on
        # the shapes, dtypes and pools only, and the outputs are unchecked)
        leaves = [torch.zeros(s, dtype=torch.float64).requires_grad_() for s in (
            shape, *((rank, shape[-1], 2 * n - 1) for n in shape[1:-1]), shape[-1:])]
        out = (shape[0], *(n // p for n, p in zip(shape[1:-1], pools)), shape[-1])
        return leaves, torch.zeros(out, dtype=torch.float64), []
    monkeypatch.setattr(gpu_check, '_conv_case', unreferenced_case)

    plan, cpu = gpu_check.GPU, torch.device('cpu')
    checked = configurations(lambda: [check(plan, cpu, Unchecked()) for check in (
        gpu_check.check_conv, gpu_check.check_conv_dot, gpu_check.check_conv_autocast)])

    def models():
        shapes = [(plan.batch, dim, side, side) for dim, side in plan.stages] + [
            (plan.video[0], dim, frames, side, side) for dim, frames, side in plan.video_stages]
        for shape in shapes:  # (the blocks' layers, and the downsampling ones: spatial pooling)
            for pool in (1, 2):
                pools = (1,) * (len(shape) - 4) + (pool, pool)
                layer = S4ND(shape[1], ndim=len(shape) - 2, l_ref=shape[2:], pool=pools)
                x = torch.zeros(shape).contiguous(memory_format=torch.channels_last if len(shape) == 4 else
                                                  torch.channels_last_3d).requires_grad_()
                with dispatch.force_path('triton'), triton_conv.fused_algorithm('dot'), \
                        torch.autocast('cpu', dtype=torch.bfloat16):
                    layer(x).float().sum().backward()
    launched = configurations(models)
    assert len(launched) == 36 and launched <= checked, sorted(launched - checked)


def test_correctness_checks_catch_a_wrong_result(monkeypatch):
    """A correctness check that passes on the CPU must still be able to fail: with the Triton convolution's input
    scaled by 1 + 1e-3 (its output and every gradient off by about 1e-3) each float32 conv check fails on the output
    and on every gradient; with the fused generation's kernels off by 1e-2, and the layer's convolution by 10%, their
    checks fail on every column; with the layer's recomputation under checkpointing off, the checkpointed check fails
    on the parameters' gradients (dx does not depend on the input the backward recomputes). A check comparing a result
    with itself or with the wrong tensor, or with a limit loosened 10x, would pass."""
    import dataclasses
    import itertools

    from s4nd_vision.layers import triton_conv, triton_kernels
    plan = dataclasses.replace(gpu_check.TINY, conv_cases=gpu_check.TINY.conv_cases[1:])  # (r2, pooled: 2D and 3D)

    def scaled(fn, scale, calls=None):
        def run(x, *args, **kwargs):
            count = next(calls) if calls is not None else 0
            return fn(x * (scale if count >= 2 else 1.0) if calls is not None else x * scale, *args, **kwargs)
        return run

    def rows(check, **patches) -> list:
        with monkeypatch.context() as m:
            for module, name, fn in patches.values():
                m.setattr(module, name, fn)
            checks = gpu_check._Checks()
            check(plan, torch.device('cpu'), checks)
        return checks.rows

    conv2d, conv3d = triton_conv.separable_conv2d_cl, triton_conv.separable_conv3d_cl
    off = dict(a=(triton_conv, 'separable_conv2d_cl', scaled(conv2d, 1 + 1e-3)),
               b=(triton_conv, 'separable_conv3d_cl', scaled(conv3d, 1 + 1e-3)))
    fp32 = [r for r in rows(gpu_check.check_conv, **off) if 'float32' in r['check']]
    assert len(fp32) == len(plan.conv_cases) + len(plan.conv3d_cases)
    assert all(1e-4 < e < 1e-2 for r in fp32 for e in r['errors'].values()), fp32  # (y, dx, each dk, dD)
    assert not any(r['ok'] for r in fp32)  # (a limit loosened to 1e-2 would pass them)

    fused = triton_kernels.ssm_kernels_fused
    generation = rows(gpu_check.check_generation, a=(triton_kernels, 'ssm_kernels_fused',
                                                     lambda *a: [k * 1.01 for k in fused(*a)]))
    assert all(1e-3 < e < 1e-1 for e in generation[0]['errors'].values()) and not generation[0]['ok'], generation

    layer = rows(gpu_check.check_layer, a=(triton_conv, 'separable_conv2d_cl', scaled(conv2d, 1.1)))
    assert len(layer) == 2 and all(e > r['limit'] for r in layer for e in r['errors'].values()), layer

    # the layer, the checkpointed layer's forward, then its recomputation: only that one is off
    checkpointed = rows(gpu_check.check_checkpointed,
                        a=(triton_conv, 'separable_conv2d_cl', scaled(conv2d, 1.1, itertools.count())))
    assert checkpointed[0]['errors']['dparams'] > 1e-4 and not checkpointed[0]['ok'], checkpointed


def test_layer_rows_time_each_column_on_its_own_path_and_divide_by_the_conv(monkeypatch):
    """The layer rows decide the dispatch's paths and algorithms: each column must time S4ND on the path and algorithm
    it names, and its ratio be its time over the depthwise conv's (a swapped or inverted column would pick the slower
    side). Timed here by a stand-in that knows what each column ran."""
    from s4nd_vision.layers import triton_conv
    ms = {('Conv2d', None, None): 2.0, ('S4ND', 'triton', None): 1.0, ('S4ND', 'triton', 'sum'): 3.0,
          ('S4ND', 'triton', 'dot'): 0.5, ('S4ND', 'fast', None): 4.0}
    monkeypatch.setattr(gpu_check, '_fwd_bwd', lambda module, x, amp, path=None: lambda: (
        type(module).__name__, path, triton_conv._ALGORITHM.get()))
    monkeypatch.setattr(gpu_check, 'time_ms', lambda fns, *a, **k: {name: ms[fn()] for name, fn in fns.items()})
    s4nd, conv, x = gpu_check.S4ND(4, ndim=2, l_ref=5), torch.nn.Conv2d(4, 4, 7, padding=3, groups=4), torch.zeros(1)
    row = gpu_check._bench_layer('case', s4nd, conv, x, True, 1)
    assert row == dict(case='case', dwconv_ms=2.0, triton_ms=1.0, fast_ms=4.0, triton_ratio=0.5, fast_ratio=2.0,
                       path='per column')
    row = gpu_check._bench_layer('case', s4nd, conv, x, True, 1, 'algorithms')
    assert {k: v for k, v in row.items() if k.endswith('ratio')} == dict(sum_ratio=1.5, dot_ratio=0.25, fast_ratio=2.0)
