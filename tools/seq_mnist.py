#!/usr/bin/env python
"""Sequential MNIST-5k at half and double the sampling rate: S4 sequence model vs a 1D depthwise-conv baseline.

    python tools/seq_mnist.py --rows 14 --cols 14 --epochs 3 --threads 1

Trains each model on the digits as rows * cols pixel sequences and prints a markdown table of validation
accuracy at cols / 2, cols and cols * 2 samples per row (s4nd_vision.eval.sequential).
"""
import argparse
import json
import os

import torch

from s4nd_vision.eval.sequential import format_table, run_sequential_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['s4nd_seq_tiny', 'conv_seq_tiny'])
    parser.add_argument('--rows', type=int, default=14)
    parser.add_argument('--cols', type=int, default=14, help='samples per row in training (even)')
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=50)
    parser.add_argument('--lr', type=float, default=1e-2)
    parser.add_argument('--ssm-lr', type=float, default=1e-3)
    parser.add_argument('--train-limit', type=int, default=None, help='train on the first n digits only')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None, help='write the rows to this JSON file')
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run_sequential_mnist(
        models=args.models, rows=args.rows, cols=args.cols, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, ssm_lr=args.ssm_lr, train_limit=args.train_limit, seed=args.seed)
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or '.', exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
