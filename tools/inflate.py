#!/usr/bin/env python
"""Inflate a 2D checkpoint into the weights of a 3D (video) model, saved as safetensors.

    python tools/inflate.py convnext_s4nd_tiny.safetensors video_init.safetensors --model convnext_s4nd_3d_tiny
    python tools/inflate.py convnext_tiny.safetensors baseline_init.safetensors --model convnext_3d_tiny

The output loads with timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=OUTPUT)).
See s4nd_vision.models.inflate for what each option does to the output on static clips.
"""
import argparse
import sys
from typing import Optional, Sequence

from timm.utils import ParseKwargs

from s4nd_vision.models.inflate import CONV_MODES, TIME_INITS, inflate_checkpoint


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source', help='2D checkpoint: safetensors, or a torch checkpoint with or without a '
                        'wrapper (its EMA weights first, as timm loads them)')
    parser.add_argument('output', help='where to write the 3D weights (safetensors)')
    parser.add_argument('--model', required=True, help='3D timm model: convnext_s4nd_3d_tiny, convnext_3d_tiny, ...')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='model constructor arguments, e.g. stem_type=patch downsample_type=conv')
    parser.add_argument('--time-init', choices=TIME_INITS, default='smooth')
    parser.add_argument('--time-decay', type=float, default=1.0, help='smooth time kernel decay, in frames')
    parser.add_argument('--conv-mode', choices=CONV_MODES, default='repeat')
    parser.add_argument('--keep-head', action='store_true', help='keep the 2D classifier (head.fc)')
    args = parser.parse_args(argv)
    try:
        weights = inflate_checkpoint(
            args.source, args.output, args.model, args.model_kwargs, time_init=args.time_init,
            time_decay=args.time_decay, conv_mode=args.conv_mode, keep_head=args.keep_head)
    except (OSError, ValueError) as e:  # a missing or wrong file, weights that do not fit the model
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'wrote {len(weights)} tensors for {args.model} to {args.output}')


if __name__ == '__main__':
    main()
