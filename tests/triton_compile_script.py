"""Compile every Triton kernel of the CUDA path for a GPU target, on a machine without a GPU.

Triton's CPU interpreter (the other tests) runs kernels as NumPy code: it checks their values, not that the
compiler accepts them (e.g. a loop variable that changes type compiles to an error, but interprets fine).
This script runs the real launchers (`triton_conv.separable_conv2d_cl` and `separable_conv3d_cl` forward and
backward, `triton_kernels.ssm_kernels_fused` forward and backward, with and without band-limiting; at the models'
shapes and at the edges: batch, channels, sides, rank and length 1) on CPU tensors with the kernels replaced by
recorders, then compiles each recorded launch (argument types and constexprs as Triton's launcher specializes them,
num_warps) down to a cubin for each --arch target (Triton ships ptxas; no driver is needed), and a covering subset
of them (every kernel with each of its dtypes, num_warps and constexpr values) for each --cover target, recorded
once.
It prints one JSON line per compiled kernel (registers, spills, Triton's dynamic shared memory) and exits non-zero
if any launch fails to compile.

    python tests/triton_compile_script.py [--arch 90 ...] [--cover 80 100 70]

Run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
    sys.exit('run triton_compile_script.py without TRITON_INTERPRET')

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from s4nd_vision.layers import dispatch, triton_conv, triton_kernels  # noqa: E402
from s4nd_vision.layers.ssm_kernel import SSMKernel  # noqa: E402

KERNELS = {
    (triton_conv, '_conv_kernel'), (triton_conv, '_kernel_grad_kernel'),
    (triton_conv, '_axis_kernel'), (triton_conv, '_axis_grad_kernel'),
    (triton_conv, '_dot_conv_kernel'), (triton_conv, '_dot_grad_kernel'),
    (triton_kernels, '_vandermonde_fwd'), (triton_kernels, '_vandermonde_bwd'),
    (triton_kernels, '_discretize_fwd'), (triton_kernels, '_discretize_bwd'),
}
_TYPES = {torch.float32: '*fp32', torch.bfloat16: '*bf16', torch.float16: '*fp16', torch.int32: '*i32',
          torch.int64: '*i64'}


class _Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, name, fn, launches):
        self.name, self.fn, self.launches = name, fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, self.fn, args, kwargs))


def _signature(fn, args, kwargs):
    """Triton's signature and constexprs of a launch of `fn` with positional `args` and keyword `kwargs`, as its
    launcher specializes them: an int equal to 1 becomes a constexpr (Triton's `native_specialize_impl`, which the
    JIT calls on every launch), so that a rank, batch or channel count of 1 compiles the variant a GPU runs."""
    signature, constexprs = {}, {}
    positional = iter(args)
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = 'constexpr'
            constexprs[name] = kwargs[name]
            continue
        value = next(positional)
        if isinstance(value, torch.Tensor):
            signature[name] = _TYPES[value.dtype]
        elif isinstance(value, (bool, int, float)):
            kind = native_specialize_impl(BaseBackend, value, param.is_const, not param.do_not_specialize, True)[0]
            signature[name] = kind
            if kind == 'constexpr':
                constexprs[name] = value
        else:
            raise TypeError(f'{fn.__name__}: argument {name} of type {type(value).__name__}')
    if next(positional, None) is not None:
        raise TypeError(f'{fn.__name__}: more positional arguments than parameters')
    return signature, constexprs


def _resources(cubin: bytes) -> dict:
    """Registers, stack (spills) and shared memory of a cubin, from cuobjdump (shipped with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, '--dump-resource-usage', f.name], capture_output=True, text=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r'(REG|STACK|SHARED|LOCAL):(\d+)', out)}


def record_launches() -> list:
    """Runs the launchers of the models' cases (the four ConvNeXt-T stages, the pooling of the downsampling
    layers, float32 / bfloat16 / float16, forward and backward) and returns their recorded kernel launches."""
    launches = []
    for module, name in KERNELS:
        setattr(module, name, _Recorder(name, getattr(module, name), launches))
    dispatch._triton_device = lambda device: True  # (CPU tensors: nothing launches, the kernels are recorders)
    # 2D: (B, H, W, C), pools, dtype, rank, algorithm; 'dot' at its three tile sides (16, 32, 64), and at
    # ConvNeXt-T's batch of 128, whose programs loop over 8 images (`triton_conv._dot_images`)
    cases = [((2, 56, 56, 96), (1, 1), torch.float32, 1, 'sum'), ((2, 56, 56, 96), (1, 1), torch.bfloat16, 1, 'sum'),
             ((2, 28, 28, 192), (1, 1), torch.bfloat16, 1, 'sum'), ((2, 14, 14, 384), (1, 1), torch.bfloat16, 1, 'sum'),
             ((2, 7, 7, 768), (1, 1), torch.bfloat16, 1, 'sum'), ((2, 56, 56, 96), (2, 2), torch.bfloat16, 1, 'sum'),
             ((2, 64, 64, 32), (4, 4), torch.float16, 1, 'sum'),
             ((2, 32, 32, 96), (2, 2), torch.float32, 1, 'dot'),
             ((128, 28, 28, 192), (1, 1), torch.bfloat16, 1, 'dot'),
             ((128, 14, 14, 384), (1, 1), torch.bfloat16, 1, 'dot'),
             ((128, 7, 7, 768), (1, 1), torch.float32, 2, 'dot'),
             ((2, 14, 14, 384), (2, 2), torch.float16, 1, 'dot')]
    # (under bf16 autocast the models' float32 activations are multiplied in bf16: `operands`)
    cases = [case + (None,) for case in cases] + [
        ((128, 14, 14, 384), (1, 1), torch.float32, 1, 'dot', torch.bfloat16),
        ((128, 28, 28, 192), (2, 2), torch.float32, 1, 'dot', torch.bfloat16),
        ((128, 56, 56, 96), (1, 1), torch.float32, 1, 'dot', torch.bfloat16),
        ((128, 56, 56, 96), (2, 2), torch.float32, 1, 'dot', torch.bfloat16)]
    for (b, h, w, c), pools, dtype, rank, algorithm, operands in cases:
        x = torch.zeros(b, h, w, c, dtype=dtype, requires_grad=True)
        kh = torch.zeros(rank, c, 2 * h - 1, requires_grad=True)
        kw = torch.zeros(rank, c, 2 * w - 1, requires_grad=True)
        skip = torch.zeros(c, requires_grad=True)
        with triton_conv.fused_algorithm(algorithm):
            triton_conv.separable_conv2d_cl(x, (kh, kw), pools, skip, operands=operands).float().sum().backward()
    # the models' case again with one warp per 16 rows of a program's tiles (`triton_conv.DOT_WARPS` = 0, timed by
    # gpu_check beside the landed warps)
    warps, triton_conv.DOT_WARPS = triton_conv.DOT_WARPS, 0
    try:
        for side, c in ((14, 384), (28, 192), (56, 96)):
            x = torch.zeros(128, side, side, c, requires_grad=True)
            kernels = [torch.zeros(1, c, 2 * side - 1, requires_grad=True) for _ in range(2)]
            skip = torch.zeros(c, requires_grad=True)
            with triton_conv.fused_algorithm('dot'):
                triton_conv.separable_conv2d_cl(x, kernels, (1, 1), skip, operands=torch.bfloat16).sum().backward()
    finally:
        triton_conv.DOT_WARPS = warps
    for pools, dtype in (((1, 1, 1), torch.bfloat16), ((2, 2, 2), torch.float32)):  # clips: the time axis
        x = torch.zeros(2, 8, 28, 28, 192, dtype=dtype, requires_grad=True)
        kernels = [torch.zeros(1, 192, 2 * n - 1, requires_grad=True) for n in (8, 28, 28)]
        skip = torch.zeros(192, requires_grad=True)
        triton_conv.separable_conv3d_cl(x, kernels, pools, skip).float().sum().backward()
    for bandlimit in (None, 1.0):  # (with and without the band-limiting mask)
        entries = [SSMKernel(96, d_state=64, num_kernels=2, bandlimit=bandlimit),
                   SSMKernel(192, d_state=64, num_kernels=2, bandlimit=bandlimit)]
        made = triton_kernels.ssm_kernels_fused(entries, [56, 111], [1.0, 0.5])
        sum(k.sum() for k in made).backward()
    # the edges, where ints of 1 become constexprs: one image of one channel at sides 1 (both algorithms), a clip of
    # one frame at sides 1, one kernel of length 1 with d_state 2
    for algorithm in ('sum', 'dot'):
        x = torch.zeros(1, 1, 1, 1, requires_grad=True)
        kernels = [torch.zeros(1, 1, 1, requires_grad=True) for _ in range(2)]
        with triton_conv.fused_algorithm(algorithm):
            triton_conv.separable_conv2d_cl(x, kernels, (1, 1), torch.zeros(1, requires_grad=True)).sum().backward()
    x = torch.zeros(1, 1, 1, 1, 1, requires_grad=True)
    kernels = [torch.zeros(1, 1, 1, requires_grad=True) for _ in range(3)]
    triton_conv.separable_conv3d_cl(x, kernels, (1, 1, 1), torch.zeros(1, requires_grad=True)).sum().backward()
    made = triton_kernels.ssm_kernels_fused([SSMKernel(1, d_state=2)], [1], [1.0])
    sum(k.sum() for k in made).backward()
    return launches


def _features(name, signature, constexprs, options) -> set:
    """What of a launch its compilation for an architecture depends on, value by value: the kernel's pointer dtypes,
    num_warps, and each constexpr's value (tile sides, images per program, product dtype, pooling, transposition,
    and the edges' ints of 1)."""
    dtypes = tuple(sorted({t for t in signature.values() if t.startswith('*')}))
    return {(name, 'dtypes', dtypes), (name, 'num_warps', options.get('num_warps'))} | {
        (name, k, str(v)) for k, v in constexprs.items()}


def _cover(launches: list) -> list:
    """A subset of `launches` (deterministic, greedy) holding every feature (`_features`) of them all."""
    left = set().union(*(launch[-1] for launch in launches))
    chosen = []
    while left:
        best = max(launches, key=lambda launch: len(launch[-1] & left))  # (the first of the best)
        chosen.append(best)
        left -= best[-1]
    return sorted(chosen, key=launches.index)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, nargs='+', default=[90],
                        help='CUDA compute capabilities to compile every launch for, e.g. 90 (H100/H200), 80 (A100)')
    parser.add_argument('--cover', type=int, nargs='*', default=[],
                        help='CUDA compute capabilities to compile only a covering subset of the launches for: every '
                             'kernel with each of its dtypes, num_warps and constexpr values at least once')
    args = parser.parse_args()
    launches, seen = [], set()
    for name, fn, launch_args, kwargs in record_launches():
        signature, constexprs = _signature(fn, launch_args, kwargs)
        options = {k: kwargs[k] for k in ('num_warps', 'num_stages') if k in kwargs}
        key = (name, *(tuple(sorted(d.items())) for d in (signature, constexprs, options)))
        if key not in seen:
            seen.add(key)
            features = _features(name, signature, constexprs, options)
            launches.append((name, fn, signature, constexprs, options, features))
    failed = False
    for arch, subset in [(a, launches) for a in args.arch] + [(a, _cover(launches)) for a in args.cover]:
        failed |= _compile(arch, subset)
    return 1 if failed else 0


def _compile(arch: int, launches: list) -> bool:
    """Compiles `launches` for sm_`arch`, printing one JSON line each; whether any failed."""
    target, failed = GPUTarget('cuda', arch, 32), False
    for name, fn, signature, constexprs, options, _ in launches:
        shown = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in constexprs.items()}  # dtypes
        report = {'kernel': name, 'arch': arch, 'constexprs': shown, 'num_warps': options.get('num_warps'),
                  'dtypes': sorted({t for t in signature.values() if t.startswith('*')})}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=target, options=options)
            report.update(ok=True, **_resources(compiled.asm['cubin']), dynamic_shared=compiled.metadata.shared)
        except Exception as error:  # noqa: BLE001  (a CompilationError, or ptxas refusing the PTX)
            failed = True
            report.update(ok=False, error=f'{type(error).__name__}: {error}'[-2000:])
        print(json.dumps(report), flush=True)
    return failed


if __name__ == '__main__':
    sys.exit(main())
