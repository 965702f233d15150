"""Command line of the trainer: `tools/train.py --config FILE [section.key=value ...] [--resume [CHECKPOINT]]`."""
import argparse
import sys
from typing import Optional, Sequence

from .config import ConfigError, load_config

__all__ = ['main']


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        description='Train a timm model (S4ND backbones and baselines) with Accelerate from a YAML config.',
        epilog='Overrides use dotted keys, e.g. optim.lr=1e-3 train.epochs=5 data.root=/data/imagenet')
    parser.add_argument('--config', help='YAML config file (configs/...)')
    parser.add_argument('overrides', nargs='*', help='section.key=value overrides (values parsed as YAML)')
    parser.add_argument('--resume', nargs='?', const=True, default=False,
                        help='continue from the latest checkpoint in train.output_dir, or from CHECKPOINT')
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from .trainer import Trainer  # heavy imports after the config is known to be good
        return Trainer(cfg, resume=args.resume).fit()
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
