"""Launched by tests/test_train.py under `accelerate launch` (two CPU processes): runs one or more trainings one after
the other in the same processes (and process group), each run's overrides separated by '--then' (one launch: the
processes import torch, timm and accelerate once), and writes what each rank holds. '{rank}' in an argument becomes
the process's rank (e.g. a folder of each process's own). A run whose overrides start with '--nan-on-rank1-at=<update>':
rank 1's loss is NaN at that update (the update is skipped on every rank); each rank writes its micro-batches'
(update, loss, samples) to rank<r>_losses.txt, and its final weights (and EMA's) to rank<r>.safetensors
(rank<r>_ema.safetensors); rank 0 writes `trainer.evaluate()` after fit to evaluate_after_fit.json. A run whose
overrides start with '--resume=<checkpoint>' resumes from that checkpoint folder. Before each run
every rank prints 'run <i> of <n>' to stdout (stdout and stderr are flushed first), so a test can tell the runs'
output apart; a run that raises ends the launch (its processes exit with the error)."""
import json
import math
import os
import sys

from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import save_file

from s4nd_vision.data.images import ResumableSampler
from s4nd_vision.train import Trainer, load_config


def _save(model, path):
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path)


def run(args) -> None:
    nan_at, resume = None, False
    if args and args[0].startswith('--nan-on-rank1-at='):
        nan_at, args = int(args[0].split('=', 1)[1]), args[1:]
    if args and args[0].startswith('--resume='):
        resume, args = args[0].split('=', 1)[1], args[1:]
    trainer = Trainer(load_config(None, [a.replace('{rank}', os.environ['RANK']) for a in args]), resume=resume)
    acc, out = trainer.accelerator, trainer.cfg.train.output_dir
    rank = acc.process_index
    if rank == 0:
        _save(acc.unwrap_model(trainer.model), os.path.join(out, 'rank0_initial.safetensors'))
    sampler = ResumableSampler(trainer.data.train_set, 0, acc.num_processes, rank, trainer.cfg.train.seed)
    with open(os.path.join(out, f'rank{rank}_indices.txt'), 'w') as f:
        f.write(' '.join(str(i) for _, i, _ in sampler))
    losses = []
    if nan_at is not None:
        loss_fn = trainer.train_loss

        def loss_nan_on_rank1(logits, target):
            loss = loss_fn(logits, target)
            if rank == 1 and trainer.state.update == nan_at:
                loss = loss * math.nan
            losses.append(f'{trainer.state.update} {loss.item()!r} {len(target)}')
            return loss

        trainer.train_loss = loss_nan_on_rank1
    trainer.fit()
    evaluation = trainer.evaluate()  # (after fit: its process group is still up)
    if rank == 0:
        with open(os.path.join(out, 'evaluate_after_fit.json'), 'w') as f:
            json.dump(evaluation, f)
    with open(os.path.join(out, f'rank{rank}_losses.txt'), 'w') as f:
        f.write('\n'.join(losses))
    _save(acc.unwrap_model(trainer.model), os.path.join(out, f'rank{rank}.safetensors'))
    if trainer.ema is not None:
        _save(trainer.ema.module, os.path.join(out, f'rank{rank}_ema.safetensors'))


def main() -> None:
    runs, argv = [[]], sys.argv[1:]
    for a in argv:
        if a == '--then':
            runs.append([])
        else:
            runs[-1].append(a)
    for i, args in enumerate(runs):
        if i:  # a fresh Accelerator for the next run; the process group (PartialState's) stays up
            AcceleratorState._reset_state()
            GradientState._reset_state()
        sys.stderr.flush()
        print(f'run {i + 1} of {len(runs)}', flush=True)
        run(args)


if __name__ == '__main__':
    main()
