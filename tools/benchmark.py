#!/usr/bin/env python
"""Benchmark S4ND against the depthwise conv / ConvNeXt it replaces (ratios in one process), its three per-axis
kernels, and recurrent generation against recomputing the convolution.

    python tools/benchmark.py --what layers kernels step scaling models --batch-size 8 --json output/benchmark.json
"""
import argparse
import os

import torch

from s4nd_vision.bench.benchmark import (
    bench_kernels, bench_layers, bench_models, bench_scaling, bench_step, format_table, parse_pair, write_json)
from s4nd_vision.utils.runtime import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ['layers', 'kernels', 'step', 'scaling', 'models']
    parser.add_argument('--what', nargs='+', choices=what, default=what)
    parser.add_argument('--step-lengths', nargs='+', type=int, default=[1024, 16384],
                        help="sequence lengths of the 'step' rows (recurrent step vs recomputed convolution)")
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--pairs', nargs='+', default=['convnext_s4nd_tiny:convnext_tiny'],
                        help='model pairs NAME[,key=value...]:BASELINE, '
                             'e.g. vit_s4nd_small_patch16_224,token_layout=1d:vit_small_patch16_224')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', choices=['bf16', 'fp16'], default=None, help='autocast dtype for the model runs')
    parser.add_argument('--compile', action='store_true', help='run both models through torch.compile')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--json', default=None, help='write the rows to this JSON file')
    parser.add_argument('--default-malloc', action='store_true',
                        help="leave glibc's allocator as it is "
                             "(by default freed memory is kept: s4nd_vision.utils.runtime)")
    args = parser.parse_args()
    if not args.default_malloc:
        keep_freed_memory()

    rows = []
    if 'layers' in args.what:
        rows += bench_layers(batch_size=args.batch_size, device=args.device, repeats=args.repeats)
        print(format_table(rows), flush=True)
    if 'kernels' in args.what:
        kernel_rows = bench_kernels(batch_size=args.batch_size, device=args.device, repeats=args.repeats)
        print(format_table(kernel_rows), flush=True)
        rows += kernel_rows
    if 'step' in args.what:
        step_rows = bench_step(lengths=args.step_lengths, device=args.device, repeats=args.repeats)
        print(format_table(step_rows), flush=True)
        rows += step_rows
    if 'scaling' in args.what:
        scaling_rows = bench_scaling(batch_size=args.batch_size, device=args.device, repeats=args.repeats)
        print(format_table(scaling_rows[1:]), flush=True)  # rows after the first carry the growth columns
        rows += scaling_rows
    if 'models' in args.what:
        amp = {'bf16': torch.bfloat16, 'fp16': torch.float16, None: None}[args.amp]
        model_rows = bench_models(
            pairs=[parse_pair(p) for p in args.pairs], img_size=args.img_size, batch_size=args.batch_size,
            device=args.device, repeats=args.repeats, amp_dtype=amp, compile=args.compile)
        print(format_table(model_rows), flush=True)
        rows += model_rows
    if args.json:
        os.makedirs(os.path.dirname(args.json) or '.', exist_ok=True)
        write_json(rows, args.json)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
