"""What a training run reports: one row per epoch to `metrics.csv`, the Accelerate trackers and the console."""
import csv
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator

from ..utils.files import replaced_atomically
from ..utils.yaml12 import dump_yaml
from .checkpoint import CONFIG_FILE, METRICS_FILE
from .config import Config, config_to_dict

try:
    import resource
except ImportError:  # (not on Windows: no peak resident memory on CPU there, reported as nan)
    resource = None

__all__ = ['MetricsLog', 'last_row', 'peak_memory_mb', 'reset_peak_memory']


class MetricsLog:
    """Per-epoch rows of a run in `output_dir`: `metrics.csv` (rewritten atomically by the main process), the
    trackers of `train.trackers` (their hyper-parameter table from the config) and a console line.

    Args:
        accelerator: the run's Accelerator (trackers, which process writes).
        cfg: the run's config.
    """

    def __init__(self, accelerator: Accelerator, cfg: Config):
        self.accelerator, self.cfg = accelerator, cfg
        self.path = os.path.join(cfg.train.output_dir, METRICS_FILE)
        if cfg.train.trackers:  # (TensorBoard writes to <output_dir>/logs/<project>: the trainer's logging_dir)
            run = os.path.basename(os.path.abspath(cfg.train.output_dir))
            accelerator.init_trackers(cfg.train.tracker_project, config=_flat(config_to_dict(cfg)),
                                      init_kwargs={'wandb': {'name': run}, 'mlflow': {'run_name': run}})

    def begin(self, epoch: int, checkpoint: Optional[str] = None, new_logs: bool = False) -> None:
        """A run (re)starting at `epoch`, from the checkpoint folder `checkpoint` if resumed: the rows of the epochs
        before `epoch` are the checkpoint's (so a row the interrupted run did not get to write comes back), rows
        of epochs it will redo are dropped; the config it runs with goes to `config.yaml`. `new_logs`: the trackers'
        logs were set aside (a new branch, `set_aside_newer`), so they get every row of the checkpoint again."""
        if self.accelerator.is_main_process:
            saved = os.path.join(checkpoint, METRICS_FILE) if checkpoint is not None else None
            if saved is not None and os.path.isfile(saved):
                logged = set() if new_logs else {r['epoch'] for r in _read_csv(self.path)}
                with replaced_atomically(self.path) as tmp:
                    shutil.copyfile(saved, tmp)
                # a row the interrupted run checkpointed but never logged (or logged to logs set aside): log it now
                for row in _read_csv(saved):
                    if row['epoch'] not in logged and int(row['epoch']) < epoch:
                        self.accelerator.log(_numbers(row), step=int(row['epoch']))
            _truncate_csv(self.path, before_epoch=epoch)
            self._write_config(self.cfg.train.output_dir)

    def _write_config(self, folder: str) -> None:
        with replaced_atomically(os.path.join(folder, CONFIG_FILE)) as tmp, open(tmp, 'w') as f:
            dump_yaml(config_to_dict(self.cfg), f, sort_keys=False)

    def snapshot(self, folder: str, row: Optional[Dict[str, Any]] = None) -> None:
        """Write the config and the metrics rows so far (and `row`, the epoch a checkpoint completes) into the
        checkpoint folder `folder` (main process; `save_checkpoint`'s `write_extra`)."""
        self._write_config(folder)
        target = os.path.join(folder, METRICS_FILE)
        if os.path.isfile(self.path):
            shutil.copyfile(self.path, target)
        if row is not None:
            _append_csv(target, row)

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
    """CUDA: the allocator's peak since `reset_peak_memory`; CPU: the process's peak resident memory (nan where the
    system does not say: Windows)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if resource is None:
        return float('nan')
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (20 if sys.platform == 'darwin' else 10)


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
    rows = [*_read_csv(path), row]
    fields: List[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    _write_csv(path, fields, rows)


def _read_csv(path: str) -> List[Dict[str, str]]:
    """The rows of the CSV file `path` ([] without one)."""
    return _read_csv_fields(path)[1]


def _read_csv_fields(path: str) -> Tuple[Optional[List[str]], List[Dict[str, str]]]:
    """The header (None without one) and the rows of the CSV file `path`."""
    if not os.path.isfile(path):
        return None, []
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def last_row(path: str) -> Dict[str, Any]:
    """The last row of the CSV file `path` as `MetricsLog.log` was given it (ints and floats as such; columns it did
    not have left out), {} without one."""
    rows = _read_csv(path)
    return {key: _value(text) for key, text in rows[-1].items() if text != ''} if rows else {}


def _value(text: str) -> Any:
    for kind in (int, float):  # (a float is written with a '.', an 'e', or as nan/inf: never read as an int)
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _numbers(row: Dict[str, str]) -> Dict[str, float]:
    """The numeric entries of a CSV row, as the trackers take them."""
    values = {}
    for key, text in row.items():
        try:
            values[key] = float(text)
        except (TypeError, ValueError):
            pass
    return values


def _truncate_csv(path: str, before_epoch: int) -> None:
    """Drop the rows of epochs >= `before_epoch`."""
    if not os.path.isfile(path):
        return
    fields, rows = _read_csv_fields(path)
    _write_csv(path, fields or ['epoch'], [r for r in rows if int(r['epoch']) < before_epoch])


def _write_csv(path: str, fields: List[str], rows: List[Dict[str, Any]]) -> None:
    """Write to a temporary file, then rename: a run killed mid-write leaves the previous file."""
    with replaced_atomically(path) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
