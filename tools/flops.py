#!/usr/bin/env python
"""Count an image model's multiply-adds (fvcore's "FLOPs") with the FFT and complex handles of s4nd_vision.bench.flops.

    python tools/flops.py convnext_s4nd_tiny convnext_tiny --img-size 224 --algorithm fft

Prints, per model: GMACs with the handles, fvcore's own count (FFTs and complex products as 0),
the largest operators, and the ops still left uncounted.
"""
import argparse
import logging

import timm
import torch
from fvcore.nn import FlopCountAnalysis

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.bench.flops import count_flops
from s4nd_vision.layers import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='+', help='timm model names')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=1,
                        help='counts are per batch; the S4ND algorithm rule depends on it')
    parser.add_argument('--algorithm', choices=['rule', 'fft', 'toeplitz'], default='rule',
                        help="S4ND convolution algorithm: the measured per-axis rule, or one for every axis")
    args = parser.parse_args()

    logging.getLogger('fvcore').setLevel(logging.ERROR)  # unsupported ops are printed below instead
    ops.FORCE_ALGORITHM = None if args.algorithm == 'rule' else args.algorithm
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    for name in args.models:
        model = timm.create_model(name).eval()
        if hasattr(model, 'set_input_size'):  # the S4ND models' reference grid (timm ViTs: the patch grid)
            model.set_input_size(img_size=args.img_size)
        counted = count_flops(model, (x,))
        plain = FlopCountAnalysis(model, (x,))
        top = ', '.join(f'{op} {v / 1e9:.3f}' for op, v in counted.by_operator().most_common())
        print(f'{name} @ {args.img_size}, batch {args.batch_size}, algorithm {args.algorithm}: '
              f'{counted.total() / 1e9:.3f} GMACs ({2 * counted.total() / 1e9:.2f} GFLOPs); '
              f'plain fvcore {plain.total() / 1e9:.3f} GMACs')
        print(f'  by operator (GMACs): {top}')
        print(f'  not counted: {dict(counted.unsupported_ops())}')


if __name__ == '__main__':
    main()
