#!/usr/bin/env python
"""Every GPU check of the Triton path in one run (planned to take under 8 minutes on one GPU).

    python tools/gpu_check.py                       # correctness, layer benchmark, profile
    python tools/gpu_check.py correctness bench     # a subset of the three sections

1. correctness: the fused convolution (`layers.triton_conv`, forward and every gradient, fp32 and bf16), the
   fused kernel generation (`layers.triton_kernels`) and an S4ND layer on the Triton path, vs float64 on the CPU;
   the custom op compiled with inductor (fullgraph). Exits non-zero if a check fails.
2. bench: S4ND (Triton path and fast path) vs timm's 7x7 depthwise conv, channels-last, forward+backward, at the
   four ConvNeXt-T stage shapes, batch 128, fp32 and bf16.
3. profile: torch.profiler over training steps (batch 128, bf16 autocast, channels-last) of convnext_s4nd_tiny vs
   convnext_tiny: step time, CUDA kernels per step, GPU busy fraction, top operators by CUDA time.
"""
import sys
import time

import timm
import torch
from timm.layers import create_conv2d
from torch.profiler import ProfilerActivity, profile

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.bench.benchmark import CONVNEXT_T_STAGES, time_ms
from s4nd_vision.layers import S4ND, dispatch
from s4nd_vision.layers.reference import separable_conv_reference
from s4nd_vision.layers.ssm_kernel import SSMKernel, ssm_kernels
from s4nd_vision.layers.triton_conv import separable_conv2d_cl
from s4nd_vision.layers.triton_kernels import ssm_kernels_fused

DEV = torch.device('cuda')
BATCH = 128


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.detach().cpu().double() - b.detach().cpu().double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _report(name: str, errors: dict, limit: float) -> bool:
    good = all(e < limit for e in errors.values())
    values = ' '.join(f'{k}={v:.1e}' for k, v in errors.items())
    print(f'{name:44s} {values}  (< {limit:g}) {"ok" if good else "FAIL"}')
    return good


def check_conv() -> bool:
    ok = True
    cases = [(4, 56, 56, 96, 1, (1, 1)), (2, 28, 28, 192, 2, (2, 2)), (2, 7, 7, 768, 1, (1, 1)),
             (2, 64, 48, 40, 1, (4, 4)), (3, 13, 9, 37, 1, (2, 1))]
    for b, h, w, c, rank, pools in cases:
        torch.manual_seed(0)
        x, d = torch.randn(b, h, w, c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
        kh = torch.randn(rank, c, 2 * h - 1, dtype=torch.float64)
        kw = torch.randn(rank, c, 2 * w - 1, dtype=torch.float64)
        leaves = [t.requires_grad_() for t in (x, kh, kw, d)]
        y_ref = separable_conv_reference(x.permute(3, 0, 1, 2), [kh, kw], [2, 3], pools, d).permute(1, 2, 3, 0)
        grad = torch.randn_like(y_ref)
        ref = [y_ref] + list(torch.autograd.grad(y_ref, leaves, grad))
        for dtype, limit in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            gpu = [x.detach().to(DEV, dtype)] + [t.detach().to(DEV, torch.float32) for t in (kh, kw, d)]
            gpu = [t.requires_grad_() for t in gpu]
            y = separable_conv2d_cl(gpu[0], (gpu[1], gpu[2]), pools, gpu[3])
            out = [y] + list(torch.autograd.grad(y, gpu, grad.to(DEV, y.dtype)))
            errors = {k: _rel(a, r) for k, a, r in zip(('y', 'dx', 'dkh', 'dkw', 'dD'), out, ref)}
            ok &= _report(f'conv {b}x{h}x{w}x{c} r{rank} pool{pools} {str(dtype)[6:]}', errors, limit)
    x = torch.randn(8, 28, 28, 64, device=DEV, dtype=torch.bfloat16)
    kh, kw, d = torch.randn(1, 64, 55, device=DEV), torch.randn(1, 64, 55, device=DEV), torch.randn(64, device=DEV)
    compiled = torch.compile(lambda *a: separable_conv2d_cl(a[0], a[1:3], (1, 1), a[3]) * 2, fullgraph=True)
    eager = separable_conv2d_cl(x, (kh, kw), (1, 1), d) * 2
    ok &= _report('custom op under inductor (fullgraph)', {'y': _rel(compiled(x, kh, kw, d), eager)}, 1e-2)
    return ok


def check_generation() -> bool:
    torch.manual_seed(0)
    kernels = [SSMKernel(96, d_state=64, num_kernels=2), SSMKernel(192, d_state=64, num_kernels=2, bandlimit=0.5),
               SSMKernel(40, d_state=64, num_kernels=2, init='legs')]
    lengths, rates = [56, 28, 224], [1.0, 0.5, 2.0]
    ref = [ssm_kernels([k.double()], [n], [r], torch.float64)[0] for k, n, r in zip(kernels, lengths, rates)]
    weights = [torch.randn_like(r) for r in ref]
    params = [p for k in kernels for p in k.parameters()]
    grads_ref = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), params)
    for k in kernels:
        k.to(DEV, torch.float32)
    out = ssm_kernels_fused(kernels, lengths, rates)
    grads = torch.autograd.grad(sum((o * w.to(DEV, torch.float32)).sum() for o, w in zip(out, weights)),
                                [p for k in kernels for p in k.parameters()])
    errors = {f'k{i}': _rel(o, r) for i, (o, r) in enumerate(zip(out, ref))}
    errors['grads'] = max(_rel(g, r) for g, r in zip(grads, grads_ref))
    return _report('fused generation (3 entries, N=64, L<=224)', errors, 1e-3)


def check_layer() -> bool:
    torch.manual_seed(0)
    layer = S4ND(96, ndim=2, l_ref=(56, 56), pool=2)
    x = torch.randn(4, 96, 56, 56)
    ref_layer = S4ND(96, ndim=2, l_ref=(56, 56), pool=2).double()
    ref_layer.load_state_dict(layer.state_dict())
    xr = x.double().requires_grad_()
    y_ref = ref_layer(xr)
    y_ref.square().sum().backward()
    gpu = layer.to(DEV)
    assert dispatch.conv_path(DEV, x.shape, gpu.pool, torch.float32) == 'triton'
    xg = x.to(DEV, memory_format=torch.channels_last).requires_grad_()
    y = gpu(xg)
    y.square().sum().backward()
    errors = {'y': _rel(y, y_ref), 'dx': _rel(xg.grad, xr.grad),
              'dparams': max(_rel(p.grad, q.grad) for p, q in zip(gpu.parameters(), ref_layer.parameters()))}
    ok = _report('S4ND(96, pool=2) 4x96x56x56 fp32, Triton path', errors, 1e-3)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y16 = gpu(xg.detach().bfloat16())
    return ok & _report('  same, bf16 autocast', {'y': _rel(y16.float(), y_ref)}, 3e-2)


def _fwd_bwd(module, x, amp):
    def step():
        module.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
            y = module(x)
        y.backward(torch.ones_like(y))
    return step


def _forced(path, fn):
    def run():
        with dispatch.force_path(path):
            fn()
    return run


def bench() -> None:
    print(f'\nlayer fwd+bwd, batch {BATCH}, channels-last, ms (ratio to dwconv7x7)')
    for dtype in (torch.float32, torch.bfloat16):
        amp = dtype == torch.bfloat16
        for dim, size in CONVNEXT_T_STAGES:
            torch.manual_seed(0)
            s4nd = S4ND(dim, ndim=2, l_ref=size).to(DEV)
            conv = create_conv2d(dim, dim, 7, depthwise=True).to(DEV, memory_format=torch.channels_last)
            x = torch.randn(BATCH, dim, size, size, device=DEV, dtype=dtype).to(memory_format=torch.channels_last)
            x.requires_grad_()
            fns = {'dwconv': _fwd_bwd(conv, x, amp), 'triton': _forced('triton', _fwd_bwd(s4nd, x, amp)),
                   'fast': _forced('fast', _fwd_bwd(s4nd, x, amp))}
            t = time_ms(fns, DEV, warmup=2, repeats=10)
            print(f'  {str(dtype)[6:]:8s} {BATCH}x{dim}x{size}x{size}: dwconv {t["dwconv"]:.2f}  '
                  f'S4ND triton {t["triton"]:.2f} ({t["triton"] / t["dwconv"]:.2f}x)  fast {t["fast"]:.2f} '
                  f'({t["fast"] / t["dwconv"]:.2f}x)')


def _train_step(model, x):
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = model(x).float().sum()
        loss.backward()
    return step


def profile_models(steps: int = 3) -> None:
    x = torch.randn(BATCH, 3, 224, 224, device=DEV).to(memory_format=torch.channels_last)
    print(f'\ntraining steps, batch {BATCH}, bf16 autocast, channels-last')
    for name in ('convnext_tiny', 'convnext_s4nd_tiny'):
        torch.manual_seed(0)
        model = timm.create_model(name).to(DEV, memory_format=torch.channels_last).train()
        step = _train_step(model, x)
        for _ in range(2):  # warm-up: Triton compilation, cuDNN autotuning
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - start) * 1e6
        gpu_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in gpu_events)  # kernels do not overlap on one stream
        print(f'{name}: {wall_us / steps / 1e3:.1f} ms/step (profiled), '
              f'{len(gpu_events) / steps:.0f} CUDA kernels/step, '
              f'GPU busy {min(busy_us / wall_us, 1):.0%}, peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB')
        print(prof.key_averages().table(sort_by='self_device_time_total', row_limit=12, max_name_column_width=60))
        del model, step, prof


def main() -> int:
    if not torch.cuda.is_available():
        print('no CUDA device')
        return 1
    sections = sys.argv[1:] or ['correctness', 'bench', 'profile']
    print(f'{torch.cuda.get_device_name(DEV)}, torch {torch.__version__}, timm {timm.__version__}')
    start, ok = time.perf_counter(), True
    if 'correctness' in sections:
        ok = check_conv() & check_generation() & check_layer()
        print('all correctness checks passed' if ok else 'SOME CORRECTNESS CHECKS FAILED')
    if 'bench' in sections:
        bench()
    if 'profile' in sections:
        profile_models()
    print(f'\ntotal {time.perf_counter() - start:.0f} s')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
