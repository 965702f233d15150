#!/usr/bin/env python
"""Check S4ND on a CUDA device against the float64 CPU reference, and bf16 autocast against float32.

    python tools/cuda_check.py            # exits non-zero if any check fails

Checks, for 1D/2D/3D layers and both convolution algorithms (Toeplitz GEMM and FFT): float32
CUDA output and gradients vs the layer run in float64 on the CPU; bf16 autocast output vs float32;
a ConvNeXt-S4ND forward+backward under bf16 autocast is finite and close to float32.
"""
import copy
import sys

import timm
import torch

import s4nd_vision  # noqa: F401
from s4nd_vision.layers import S4ND, ops


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_layers(device: torch.device) -> list:
    results = []
    cases = [(1, (300,)), (2, (24, 40)), (2, (300, 20)), (3, (6, 12, 10))]
    for algorithm in ('toeplitz', 'fft'):
        with ops.conv_algorithm(algorithm):
            for ndim, sizes in cases:
                torch.manual_seed(0)
                layer = S4ND(16, ndim=ndim, d_state=16, l_ref=sizes, dt_min=0.01, dt_max=0.2)
                x = torch.randn(2, 16, *sizes)
                ref_layer = copy.deepcopy(layer).double()
                xr = x.double().requires_grad_()
                y_ref = ref_layer(xr)
                y_ref.square().sum().backward()
                gpu = layer.to(device)
                xg = x.to(device).requires_grad_()
                y = gpu(xg)
                y.square().sum().backward()
                grad_err = max(_rel(p.grad.cpu(), q.grad) for p, q in zip(gpu.parameters(), ref_layer.parameters()))
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    y_bf16 = gpu(x.to(device).bfloat16())
                results.append((
                    f'{algorithm:8s} {ndim}D {sizes}', _rel(y.detach().cpu(), y_ref.detach()),
                    _rel(xg.grad.cpu(), xr.grad), grad_err, _rel(y_bf16.float().detach().cpu(), y_ref.detach())))
    return results


def check_model(device: torch.device) -> tuple:
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=128, num_classes=10).to(device)
    x = torch.randn(4, 3, 160, 160, device=device)
    y32 = model(x)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y16 = model(x)
    y16.float().sum().backward()
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return _rel(y16.float().detach(), y32.detach()), finite


def main() -> int:
    if not torch.cuda.is_available():
        print('no CUDA device')
        return 1
    device = torch.device('cuda')
    print(f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}, timm {timm.__version__}')
    print(f'{"case":30s} {"out fp32":>10s} {"dx fp32":>10s} {"dparams":>10s} {"out bf16":>10s}   '
          '(relative errors vs float64 CPU)')
    ok = True
    for name, out, dx, dparams, bf16 in check_layers(device):
        good = out < 1e-4 and dx < 1e-4 and dparams < 1e-3 and bf16 < 3e-2
        ok &= good
        print(f'{name:30s} {out:10.2e} {dx:10.2e} {dparams:10.2e} {bf16:10.2e}   {"ok" if good else "FAIL"}')
    rel, finite = check_model(device)
    good = rel < 5e-2 and finite
    ok &= good
    print(f'convnext_s4nd_atto bf16 autocast vs fp32 logits: {rel:.2e}, finite grads: {finite}   '
          f'{"ok" if good else "FAIL"}')
    print('all checks passed' if ok else 'SOME CHECKS FAILED')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
