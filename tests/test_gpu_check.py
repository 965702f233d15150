"""The one-call GPU check (`bench.gpu_check`) runs every section end to end at tiny sizes on the CPU (Triton's
interpreter, the Triton path forced), so that it works the first time a GPU is lent; it measures nothing here."""
import json

import pytest

from s4nd_vision.bench import gpu_check
from s4nd_vision.cli import tool_main


def test_every_section_runs_and_reports(tmp_path):
    path = tmp_path / 'gpu_check.json'
    sections = [s for s in gpu_check.SECTIONS if s != 'compiled']  # compiled: the same code, compile=True
    results = gpu_check.run_checks(sections, gpu_check.TINY, 'cpu', str(path))
    assert results['ok'] and json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert set(results['seconds']) == set(sections)
    plan = gpu_check.TINY
    checks = results['correctness']
    assert len(checks) == 2 * (len(plan.conv_cases) + len(plan.conv3d_cases)) + 4 and all(c['ok'] for c in checks)
    assert any('Triton path' in c['check'] for c in checks) and any('inductor' in c['check'] for c in checks)
    assert sum(c['check'].startswith('conv3d') for c in checks) == 2 * len(plan.conv3d_cases)
    image_rows = [f'layer {plan.batch}x4x5x5 {d}' for d in ('float32', 'bfloat16')]
    assert [r['case'] for r in results['bench']] == image_rows + [f'3D layer {plan.video[0]}x4x2x5x5 bfloat16']
    assert all(r['triton_ratio'] > 0 and r['fast_ratio'] > 0 for r in results['bench'])
    assert [r['model'] for r in results['profile']] == list(plan.profile_models)
    cases = [r['case'] for r in results['models']]
    assert cases[0].startswith('convnext_s4nd_atto vs convnext_atto @32 b2 channels-last')
    assert cases[-1].startswith('convnext_s4nd_3d_atto vs convnext_3d_atto @2x32 b1')
    assert all(r['train_ratio'] > 0 and r['infer_ratio'] > 0 for r in results['models'])


def test_a_section_or_check_that_raises_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError('no kernel image for this device')

    monkeypatch.setattr(gpu_check, 'bench_layers', broken)
    monkeypatch.setattr(gpu_check, 'check_generation', broken)
    path = tmp_path / 'gpu_check.json'
    results = gpu_check.run_checks(['correctness', 'bench', 'profile'], gpu_check.TINY, 'cpu', str(path), path='fast')
    assert not results['ok'] and results['path'] == 'fast'
    assert 'no kernel image' in results['errors']['bench'] and 'bench' not in results
    failed = [c for c in results['correctness'] if not c['ok']]
    assert [c['check'] for c in failed] == ['broken'] and 'no kernel image' in failed[0]['error']
    assert any('Triton path' in c['check'] and c['ok'] for c in results['correctness'])  # the checks after it ran
    assert len(results['profile']) == 2 and json.loads(path.read_text())['errors'] == results['errors']


def test_a_failed_check_fails_the_run():
    checks = gpu_check._Checks()
    checks.add('close', {'y': 1e-6}, 1e-4)
    assert checks.ok
    checks.add('far', {'y': 0.5, 'dx': 1e-6}, 1e-4)
    assert not checks.ok and [c['ok'] for c in checks.rows] == [True, False]
    with pytest.raises(ValueError, match='sections'):
        gpu_check.run_checks(['speed'], gpu_check.TINY, 'cpu')


def test_cli_refuses_cuda_without_a_device(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        tool_main('gpu-check', ['--sections', 'bench'])
    assert exit_info.value.code == 2 and 'no CUDA device' in capsys.readouterr().err
