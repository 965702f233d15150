"""Command line of the trainer (`s4nd-vision train`, `tools/train.py`).

    s4nd-vision train --config FILE|NAME [section.key=value ...] [--resume [CHECKPOINT]]
"""
import argparse
import sys
from typing import Optional, Sequence

from .config import ConfigError, load_config

__all__ = ['add_arguments', 'run', 'main']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', help='YAML config file, or a packaged config name such as '
                                         'imagenet/convnext_s4nd_tiny.yaml (configs/... also accepted)')
    parser.add_argument('overrides', nargs='*', help='section.key=value overrides (values parsed as YAML)')
    parser.add_argument('--resume', nargs='?', const=True, default=False,
                        help='continue from the latest checkpoint in train.output_dir, or from CHECKPOINT')


def run(args: argparse.Namespace) -> dict:
    """Train with parsed arguments; a bad config exits with status 2 and a one-line error."""
    try:
        cfg = load_config(args.config, args.overrides)
        from .trainer import Trainer  # heavy imports after the config is known to be good
        return Trainer(cfg, resume=args.resume).fit()
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        description='Train a timm model (S4ND backbones and baselines) with Accelerate from a YAML config.',
        epilog='Overrides use dotted keys, e.g. optim.lr=1e-3 train.epochs=5 data.root=/data/imagenet')
    add_arguments(parser)
    return run(parser.parse_args(argv))
