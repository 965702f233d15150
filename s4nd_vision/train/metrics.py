"""What a training run reports: one row per epoch to `metrics.csv`, the Accelerate trackers and the console."""
import csv
import os
import resource
from typing import Any, Dict, List

import torch
import yaml
from accelerate import Accelerator

from .config import Config, config_to_dict

__all__ = ['MetricsLog', 'peak_memory_mb', 'reset_peak_memory']


class MetricsLog:
    """Per-epoch rows of a run in `output_dir`: `metrics.csv` (rewritten atomically by the main process), the
    trackers of `train.trackers` (their hyper-parameter table from the config) and a console line.

    Args:
        accelerator: the run's Accelerator (trackers, which process writes).
        cfg: the run's config.
    """

    def __init__(self, accelerator: Accelerator, cfg: Config):
        self.accelerator, self.cfg = accelerator, cfg
        self.path = os.path.join(cfg.train.output_dir, 'metrics.csv')
        if cfg.train.trackers:
            accelerator.init_trackers('logs', config=_flat(config_to_dict(cfg)))

    def begin(self, epoch: int) -> None:
        """A run (re)starting at `epoch`: drop the rows of epochs it will redo (written by an interrupted run after
        its last checkpoint) and write the config it runs with to `config.yaml`."""
        if self.accelerator.is_main_process:
            _truncate_csv(self.path, before_epoch=epoch)
            with open(os.path.join(self.cfg.train.output_dir, 'config.yaml'), 'w') as f:
                yaml.safe_dump(config_to_dict(self.cfg), f, sort_keys=False)

    def log(self, row: Dict[str, Any], epoch: int) -> None:
        """Append `row` to the CSV, send its numbers to the trackers, print it."""
        acc = self.accelerator
        if acc.is_main_process:
            _append_csv(self.path, row)
        acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
        acc.print(_format_row(row))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the allocator's peak since `reset_peak_memory`; CPU: the process's peak resident memory."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux: KiB -> MiB (process peak RSS)


def _flat(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """Nested config -> flat {section/key: scalar} for trackers' hyper-parameter tables."""
    out = {}
    for k, v in tree.items():
        key = f'{prefix}{k}'
        if isinstance(v, dict):
            out.update(_flat(v, key + '/'))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _format_row(row: Dict[str, Any]) -> str:
    return '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items())


def _append_csv(path: str, row: Dict[str, Any]) -> None:
    rows = []
    if os.path.isfile(path):
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    rows.append(row)
    fields: List[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    _write_csv(path, fields, rows)


def _truncate_csv(path: str, before_epoch: int) -> None:
    """Drop the rows of epochs >= `before_epoch`."""
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if int(r['epoch']) < before_epoch]
    _write_csv(path, fields or ['epoch'], rows)


def _write_csv(path: str, fields: List[str], rows: List[Dict[str, Any]]) -> None:
    """Write to a temporary file, then rename: a run killed mid-write leaves the previous file."""
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
