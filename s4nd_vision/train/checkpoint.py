"""Checkpoints of a training run: Accelerate state folders written atomically, found again on resume, and the
weights exported as safetensors.

`output_dir/checkpoints/step-<update>` holds `accelerator.save_state`: model, optimizer, scheduler, EMA,
`TrainState` and the random generators. Each is written to a temporary folder and renamed once every process has
written its part, so a run killed at any moment leaves only complete checkpoints.
"""
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import save_file

from .config import ConfigError

__all__ = [
    'TrainState', 'latest_checkpoint', 'checkpoint_to_resume', 'save_checkpoint', 'load_checkpoint', 'export_weights',
]

_CKPT_RE = re.compile(r'^step-(\d+)$')


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint (registered with Accelerate)."""
    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # optimizer updates done in that epoch
    update: int = 0  # optimizer updates done in total
    best_top1: float = -1.0
    best_epoch: int = -1

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)


def _complete(root: str):
    """(update, folder name) of the complete checkpoints under `root`, oldest first."""
    return sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _CKPT_RE.match(name)))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The most advanced complete checkpoint under output_dir/checkpoints (None if there is none)."""
    root = os.path.join(output_dir, 'checkpoints')
    if not os.path.isdir(root):
        return None
    steps = _complete(root)
    return os.path.join(root, steps[-1][1]) if steps else None


def checkpoint_to_resume(output_dir: str, resume: Union[bool, str]) -> Optional[str]:
    """The checkpoint a run starts from: `resume` True = the latest in `output_dir` (None if there is none), a path
    = that checkpoint, False = none, refused when `output_dir` already holds checkpoints (it would mix two runs)."""
    latest = latest_checkpoint(output_dir)
    if resume:
        return resume if isinstance(resume, str) else latest
    if latest is not None:
        raise ConfigError(f'train.output_dir {output_dir!r} already holds checkpoints ({latest}): '
                          'pass --resume to continue that run, or choose another output_dir')
    return None


def save_checkpoint(accelerator: Accelerator, output_dir: str, update: int, keep: int) -> None:
    """`accelerator.save_state` into a temporary folder, renamed once every process has written its part; then
    only the newest `keep` checkpoints are kept. Every process must call it."""
    acc = accelerator
    root = os.path.join(output_dir, 'checkpoints')
    final = os.path.join(root, f'step-{update:08d}')
    tmp = os.path.join(root, f'.tmp-step-{update:08d}')
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    acc.wait_for_everyone()
    acc.save_state(tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, name in _complete(root)[:-keep]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    acc.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, path: str, state: TrainState) -> None:
    """Restore everything registered with `accelerator` (`state` among it) from the checkpoint folder `path`."""
    if not os.path.isdir(path):
        raise ConfigError(f'--resume: no checkpoint folder {path!r}')
    accelerator.load_state(path)
    accelerator.print(f'resumed from {path}: epoch {state.epoch}, update {state.update} '
                      f'({state.step_in_epoch} into the epoch)')


def export_weights(accelerator: Accelerator, model: nn.Module, path: str) -> str:
    """The weights of `model` as safetensors at `path` (written by the main process, atomically), loadable with
    `timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=path))`. Every process must call it
    (FSDP gathers the weights)."""
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        _atomic_save_file(state, path)
    return path


def _atomic_save_file(state: Dict[str, torch.Tensor], path: str) -> None:
    tmp = path + '.tmp'
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp)
    os.replace(tmp, path)
