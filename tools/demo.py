#!/usr/bin/env python
"""Zero-shot resolution demo on built-in data (no downloads): train at a low resolution, test at higher ones.

    python tools/demo.py                      # isotropic S4ND vs its conv twin, 14 px -> 14/20/28/42 px
    python tools/demo.py --setting convnext   # ConvNeXt-S4ND vs ConvNeXt, 64 px -> 64/96/128 px (longer)

See s4nd_vision.eval.demo.
"""
import argparse

from s4nd_vision.eval.demo import SETTINGS, run_demo
from s4nd_vision.utils.runtime import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--setting', choices=sorted(SETTINGS), default='iso')
    parser.add_argument('--out', default=None, help='output folder (default: output/demo/<setting>)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--bandlimit', type=float, default=None,
                        help='S4ND band-limit cut-off (masks kernel modes above bandlimit/2 cycles per step); '
                             'default off (see the README)')
    parser.add_argument('--epochs', type=int, default=None, help="override the config's epochs")
    parser.add_argument('--max-steps-per-epoch', type=int, default=None, help='cap the updates per epoch (quick check)')
    args = parser.parse_args()
    keep_freed_memory()  # reuse freed memory instead of page-faulting it in again (CPU speed)
    run_demo(args.setting, out_dir=args.out or f'output/demo/{args.setting}', seed=args.seed, bandlimit=args.bandlimit,
             epochs=args.epochs, max_steps_per_epoch=args.max_steps_per_epoch)


if __name__ == '__main__':
    main()
