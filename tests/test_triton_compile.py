"""Every Triton kernel of the CUDA path compiles for GPU targets (H100/H200, A100, B200, V100) on a machine without one.

The interpreter tests check the kernels' values; only the compiler checks that Triton accepts them as GPU code
(a loop variable that changes type, a type mismatch between branches). `triton_compile_script.py` runs the real
launchers with recorded kernels and compiles each launch to a cubin, in a subprocess without TRITON_INTERPRET: every
launch for sm_90 (the target: H100/H200), and for the other GPUs (sm_80: A100, and the shared-memory limit of sm_86/89;
sm_100: B200; sm_70: V100, the oldest the dispatch runs them on) a covering subset, recorded once: every kernel with
each of its pointer dtypes, num_warps and constexpr values (tile sides, images per program, product dtype, pooling,
transposition, the edges' ints of 1) at least once.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {'_conv_kernel', '_kernel_grad_kernel', '_axis_kernel', '_axis_grad_kernel', '_dot_conv_kernel',
           '_dot_grad_kernel', '_vandermonde_fwd', '_vandermonde_bwd', '_discretize_fwd', '_discretize_bwd'}


ARCHS = (90, 80, 100, 70)


def _features(report) -> set:
    return {(report['kernel'], 'dtypes', tuple(report['dtypes'])), (report['kernel'], 'num_warps', report['num_warps'])
            } | {(report['kernel'], k, str(v)) for k, v in report['constexprs'].items()}


def test_every_kernel_compiles_for_the_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''))
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'triton_compile_script.py'),
                          '--arch', str(ARCHS[0]), '--cover', *map(str, ARCHS[1:])],
                         env=env, capture_output=True, text=True, timeout=900)
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{')]
    failures = [r for r in reports if not r['ok']]
    assert run.returncode == 0 and not failures, failures or run.stderr[-3000:]
    assert [r['arch'] for r in reports] == sorted((r['arch'] for r in reports), key=ARCHS.index)
    every = set().union(*(_features(r) for r in reports if r['arch'] == ARCHS[0]))
    for arch in ARCHS:
        by_arch = [r for r in reports if r['arch'] == arch]
        # (the covering subsets: each value every launch has, on a smaller number of launches)
        assert set().union(*(_features(r) for r in by_arch)) == every
        assert arch == ARCHS[0] or len(by_arch) < len([r for r in reports if r['arch'] == ARCHS[0]]) / 2
        _check(arch, by_arch)


def _check(arch, reports):
    assert {r['kernel'] for r in reports} == KERNELS
    # every variant the models launch: forward and input gradient (TRANSPOSE) at each stage's block size (and 1, the
    # one-channel edge's), pools 1, 2 and 4, three input dtypes
    conv = [r['constexprs'] for r in reports if r['kernel'] == '_conv_kernel']
    assert {c['BLOCK_IN'] for c in conv} == {1, 8, 16, 32, 64} and {c['PH'] for c in conv} == {1, 2, 4}
    assert {c['TRANSPOSE'] for c in conv} == {False, True}
    # each launch as Triton's launcher specializes it: an int equal to 1 is a constexpr (rank 1, the models'
    # default; channels-last's unit channel stride), and every kernel at the edges (one channel, d_state 2: N2 = 1)
    assert any(c.get('R') == 1 and c.get('sxc') == 1 for c in conv)
    assert {r['kernel'] for r in reports if 1 in (r['constexprs'].get('C'), r['constexprs'].get('N2'))} == KERNELS
    assert {d for r in reports for d in r['dtypes']} >= {'*fp32', '*bf16', '*fp16'}
    # the tensor-core kernels at every tile side, forward and input gradient, each operand dtype
    dot = [r for r in reports if r['kernel'] == '_dot_conv_kernel']
    assert {r['constexprs']['S'] for r in dot} == {16, 32, 64}
    assert {r['constexprs']['TRANSPOSE'] for r in dot} == {False, True}
    assert {r['constexprs']['OPERANDS'] for r in dot} == {'fp32', 'bf16', 'fp16'}
    assert {r['constexprs']['S'] for r in reports if r['kernel'] == '_dot_grad_kernel'} == {16, 32, 64}
    # and their values stay in registers (a one-channel program's 3D products spilled at S = 64, its 2D ones do not);
    # the kernel gradient with 16-bit products (the models' case under autocast), in blocks (`DOT_GRAD_BLOCK`):
    # no spill up to S = 32, little at 64 (whole, with the diagonal sums gathered in registers: 48 B and 1.9 KB)
    if arch == 90:  # (at the landed 8 warps)
        assert [r['constexprs'] for r in dot if r['stack'] > 0 and r['num_warps'] == 8] == []
        grads = [r for r in reports if r['kernel'] == '_dot_grad_kernel' and r['constexprs']['OPERANDS'] == 'bf16'
                 and r['num_warps'] == 8]
        assert {r['constexprs']['S'] for r in grads} == {16, 32, 64}
        assert all(r['stack'] <= (512 if r['constexprs']['S'] == 64 else 0) for r in grads), grads
    # the landed 8 warps, and one warp per 16 rows of the tiles (`DOT_WARPS` = 0: 1, 2 and 4 warps)
    assert {r['num_warps'] for r in reports if r['kernel'].startswith('_dot_')} == {1, 2, 4, 8}
    # programs over one image and over 8 (batch 128), for both kernels
    assert {r['constexprs']['IMAGES'] for r in reports if r['kernel'].startswith('_dot_')} == {1, 8}
    assert all(r['reg'] > 0 for r in reports)
    # Triton's dynamic shared memory fits in the 99 KB a block may use on sm_86/89 (RTX 30/40, A10, L4, L40), the
    # least of the GPUs since Ampere (A100 163 KB, H100/B200 227 KB; the sm_80 build stands for sm_86/89): a kernel
    # over it would fail to launch there
    over = [(r['kernel'], r['constexprs'], r['dynamic_shared']) for r in reports if r['dynamic_shared'] > 99 * 1024]
    assert not over, over
