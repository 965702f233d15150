#!/usr/bin/env python
"""Zero-shot resolution evaluation: accuracy of models at resolutions they were (or were not) trained at.

    python tools/eval_resolution.py --models s4nd_iso_tiny conv_iso_tiny \\
        --checkpoints out/s4nd/best.safetensors out/conv/best.safetensors \\
        --data mnist --train-resolution 14 --resolutions 14 20 28 42 --out output/zero_shot

Prints a top-1/top-5 table and writes accuracy_vs_resolution.csv and .png to --out
(see s4nd_vision.eval.resolution).
"""
import argparse
import sys

from s4nd_vision.eval.resolution import dataset_num_classes, eval_resolution, format_table, load_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', required=True, help='timm model names')
    parser.add_argument('--checkpoints', nargs='+', default=None,
                        help='one weights file per model (safetensors or torch); omit for untrained models')
    parser.add_argument('--labels', nargs='+', default=None, help='one display name per model (default: the names)')
    parser.add_argument('--data', default='mnist', help="'mnist' (built-in MNIST-5k) or an ImageFolder directory")
    parser.add_argument('--split', default='validation', help='sub-folder of an ImageFolder --data to use, if present')
    parser.add_argument('--resolutions', nargs='+', type=int, required=True, help='input sides in pixels')
    parser.add_argument('--train-resolution', type=int, default=None,
                        help="the models' training resolution: the reference grid of S4ND kernels")
    parser.add_argument('--bandlimit', type=float, default=None,
                        help='band-limiting cut-off of the S4ND models, as trained (default: their own, off)')
    parser.add_argument('--in-chans', type=int, default=None, help='input channels of the models (default: theirs)')
    parser.add_argument('--crop-pct', type=float, default=None, help="ImageFolder center crop (default: each model's)")
    parser.add_argument('--out', default='output/eval_resolution', help='folder for the CSV and PNG')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args(argv)

    checkpoints = args.checkpoints or [None] * len(args.models)
    labels = args.labels or args.models
    for flag, values in (('--checkpoints', checkpoints), ('--labels', labels)):
        if len(values) != len(args.models):
            parser.error(f'{flag} needs one entry per model ({len(args.models)}), got {len(values)}')
    if len(set(labels)) != len(labels):
        parser.error('two models share a display name: pass distinct --labels')
    try:
        num_classes = dataset_num_classes(args.data, args.split)
        models = {
            label: load_model(name, ckpt, num_classes=num_classes, in_chans=args.in_chans, bandlimit=args.bandlimit)
            for label, name, ckpt in zip(labels, args.models, checkpoints)
        }
        rows = eval_resolution(
            models, args.data, args.resolutions, train_resolution=args.train_resolution, split=args.split,
            batch_size=args.batch_size, device=args.device, num_workers=args.workers, crop_pct=args.crop_pct,
            out_dir=args.out)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f'error: {e}')
    print(format_table(rows))
    print(f'wrote {args.out}/accuracy_vs_resolution.csv and {args.out}/accuracy_vs_resolution.png')


if __name__ == '__main__':
    main()
