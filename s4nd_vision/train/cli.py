"""Command line of the trainer (`s4nd-vision train`, `tools/train.py`).

    s4nd-vision train --config FILE|NAME [section.key=value ...] [--resume [CHECKPOINT]]

Exit status 2: a configuration problem (one line naming the key); 3: training diverged (the loss stayed
non-finite past `train.max_nonfinite_steps`; nothing non-finite was written). Under `accelerate launch`, torchrun
reports any failing process as 1: the one-line error on stderr says which. A config error on some processes of a
multi-process launch stops every process, each naming the processes (and hosts) it came from.
"""
import argparse
import os
import sys
from typing import Optional

from .config import ConfigError, load_config

__all__ = ['add_arguments', 'run']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', help='YAML config file, or a packaged config name such as '
                                         'imagenet/convnext_s4nd_tiny.yaml (configs/... also accepted)')
    parser.add_argument('overrides', nargs='*', help='section.key=value overrides (values parsed as YAML)')
    parser.add_argument('--resume', nargs='?', const=True, default=False,
                        help='continue from the latest checkpoint in train.output_dir, or from CHECKPOINT '
                             '(refused when train.output_dir holds none, unless --allow-fresh)')
    parser.add_argument('--allow-fresh', action='store_true',
                        help='with --resume: start a fresh run when train.output_dir holds no checkpoint yet '
                             '(job scripts that may be preempted and restarted)')


def run(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """Train with parsed arguments; a bad config exits with status 2, a diverged run with 3 (one-line errors)."""
    if isinstance(args.resume, str) and '=' in args.resume and not os.path.exists(args.resume):
        # `--resume optim.lr=1e-4`: argparse gave the override to --resume's optional CHECKPOINT (before the
        # --allow-fresh check: `--allow-fresh --resume optim.lr=1e-4` is a plain --resume)
        at = getattr(args, 'resume_position', 0)
        args.overrides, args.resume = [*args.overrides[:at], args.resume, *args.overrides[at:]], True
    if args.allow_fresh and args.resume is not True:
        message = '--allow-fresh goes with --resume (without a CHECKPOINT)'
        if parser is not None:
            parser.error(message)
        print(f'error: {message}', file=sys.stderr)
        sys.exit(2)
    try:
        cfg = load_config(args.config, args.overrides)
        from .trainer import Trainer, TrainingDiverged  # heavy imports after the config is known to be good
    except ConfigError as e:
        print(f'error: {_told_to_every_process(e)}', file=sys.stderr)
        sys.exit(2)
    try:
        trainer = Trainer(cfg, resume=args.resume, allow_fresh=args.allow_fresh)
        summary = trainer.fit()
        trainer.accelerator.end_training()  # (the process group: `fit` leaves it up for evaluations after it)
        return summary
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(3)


def _told_to_every_process(error: ConfigError) -> ConfigError:
    """This process's config `error` as every process of a multi-process launch reports it: the others wait at their
    Trainer's first collective (`same_on_every_process`), which this one joins with its error (e.g. data.root missing
    on its machine) instead of leaving them waiting until the process group's timeout (30 minutes)."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return error
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .checkpoint import same_on_every_process
    try:  # (the process group as the others' Accelerator makes it: gloo where `accelerate launch` says CPU)
        with same_on_every_process(PartialState(cpu=parse_flag_from_env('ACCELERATE_USE_CPU'))):
            raise error
    except ConfigError as everyone:
        return everyone
