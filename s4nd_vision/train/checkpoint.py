"""Checkpoints of a training run: Accelerate state folders written atomically, found again on resume, and the
weights exported as safetensors.

`output_dir/checkpoints/step-<update>` holds `accelerator.save_state`: model, optimizer, scheduler, EMA,
`TrainState` (with the epoch's running sums, so a mid-epoch resume reports the same epoch row) and the random
generators, plus the run's `config.yaml` and its `metrics.csv` up to the checkpoint (the epoch-end checkpoint
holds that epoch's row, so a run killed before writing the row gets it back on resume) and its `best.safetensors`
(a branch resumed there gets back the best weights its state records). Each is written to a
temporary folder and renamed once every process has written its part, so a run killed at any moment leaves only
complete checkpoints. Weights with non-finite values are never written (`all_finite` is checked first).
"""
import csv
import io
import os
import pickle
import re
import reprlib
import shutil
import socket
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, is_compiled_module
from safetensors import SafetensorError, safe_open

from ..layers import state_dict_without_records
from ..utils.files import replaced_atomically, save_safetensors
from ..utils.yaml12 import load_yaml
from .config import LEGACY_OPTIM, ConfigError, optimizer_default

try:
    import fcntl
except ImportError:  # (not on Windows: run folders are not locked there)
    fcntl = None

__all__ = [
    'TrainState', 'latest_checkpoint', 'checkpoint_to_resume', 'save_checkpoint', 'load_checkpoint', 'export_weights',
    'all_finite', 'local_shards', 'check_shared_folder', 'lock_run_folder', 'release_run_folder', 'CONFIG_FILE',
    'METRICS_FILE', 'LOCK_FILE', 'BEST_FILE', 'LOGS_DIR', 'set_aside_newer', 'restore_best_weights',
    'same_on_every_process', 'RunFolderInUse', 'recover_replaced_checkpoints',
]

CONFIG_FILE = 'config.yaml'  # in each checkpoint folder: the config of the run that wrote it
METRICS_FILE = 'metrics.csv'  # in each checkpoint folder: the metrics rows of the epochs it completes

_CKPT_RE = re.compile(r'^step-(\d+)$')
BEST_FILE = 'best.safetensors'  # in output_dir, and in each checkpoint folder: the best weights its state records
LOGS_DIR = 'logs'  # in output_dir: the trackers' logs (`train.trackers`, e.g. TensorBoard's event files)
_EXPORTED = (BEST_FILE, 'last.safetensors', 'last_ema.safetensors')  # the weights a run exports


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint (registered with Accelerate)."""
    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # optimizer updates done in that epoch
    update: int = 0  # optimizer updates done in total
    best_top1: float = -1.0
    best_epoch: int = -1
    nonfinite_in_a_row: int = 0  # updates skipped in a row for a non-finite loss or gradient
    # the epoch in progress, over all processes: [loss sum, finite micro-steps, samples, skipped samples,
    # non-finite updates] and the seconds spent, up to step_in_epoch (a mid-epoch resume continues them)
    epoch_sums: List[float] = field(default_factory=lambda: [0.0] * 5)
    epoch_seconds: float = 0.0
    # samples per update over all processes (processes x batch x accumulation), the unit of `update` and
    # `step_in_epoch`; 0 in checkpoints written before it was recorded
    global_batch: int = 0

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)


def check_shared_folder(accelerator: Accelerator, folder: str, wait_s: float = 5.0) -> None:
    """Refuse, on every process at once (a collective), a `folder` that is not the same on every process.

    Checkpoints are written there by the main process and a resume is decided from its contents by each process: a
    folder on each machine's own disk would resume only the main machine (the others would refuse, or start afresh
    with `--allow-fresh` and train other weights beside it). The main process writes a marker that all must see
    within `wait_s` seconds (network filesystems may show a new file late; its name is new, so no cached lookup
    of it can hide it).
    """
    acc = accelerator
    token = broadcast_object_list([uuid.uuid4().hex if acc.is_main_process else None])[0]
    marker = os.path.join(folder, f'.shared-{token}')
    with same_on_every_process(acc):  # (a folder the main process cannot write: every process stops, naming it)
        if acc.is_main_process:
            open(marker, 'w').close()
    deadline = time.monotonic() + wait_s
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    blind = torch.tensor(0.0 if os.path.exists(marker) else 1.0, device=acc.device)
    missing = int(acc.reduce(blind, reduction='sum').item())
    if acc.is_main_process:
        os.remove(marker)
    if missing:
        raise ConfigError(
            f'train.output_dir {folder!r} is not the same folder on every process: {missing} of {acc.num_processes} '
            f"processes do not see what the main process writes there (a folder on each machine's own disk?); put it "
            f'on storage that every machine shares')


@contextmanager
def same_on_every_process(state: PartialState) -> Iterator[Dict[str, Any]]:
    """Refuse, on every process at once (a collective: one gather), a start-up step that failed on some process or
    whose facts differ between processes.

    The block fills the dict it is given with this process's facts (flat keys, e.g. `optim.lr`). A ConfigError in
    the block is raised on every process, naming the processes (and hosts) it came from: a process stopping alone
    (e.g. data missing on its machine) would leave the others waiting in their next collective until the process
    group's timeout (30 minutes). So is a ValueError or OSError, what the command line reports as a user's error in
    one line: e.g. the image folder's refusals (a `__MACOSX` folder or a link loop in one machine's copy of the
    data, which the other machines waited on, or saw only as a peer that crashed). Otherwise a ConfigError names
    each key whose value differs from process 0's, with the values and the processes that hold them: each machine
    builds the model, optimizer and data from its own command line and files, and a difference would train other
    weights on some processes without a word, or deadlock when they count other updates per epoch. One process:
    the block runs as it is."""
    facts: Dict[str, Any] = {}
    if state.num_processes == 1:
        yield facts
        return
    error = cause = None
    try:
        yield facts
    except (ValueError, OSError) as e:  # (a ConfigError is a ValueError)
        error, cause = str(e), e
    everyone = gather_object([(error, facts, socket.gethostname())])
    errors: Dict[str, list] = {}  # error -> [(rank, host), ...]
    for rank, (process_error, _, host) in enumerate(everyone):
        if process_error is not None:
            errors.setdefault(process_error, []).append((rank, host))
    if errors:  # (this process's own error, where it had one, as the cause: its traceback)
        raise ConfigError('; '.join(f'{_processes(at, state)}: {message}' for message, at in errors.items())) from cause
    differences = []
    for key in dict.fromkeys(k for _, process_facts, _ in everyone for k in process_facts):
        values: List[list] = []  # [value, [(rank, host), ...]] in order of first appearance (process 0's first)
        for rank, (_, process_facts, host) in enumerate(everyone):
            value = process_facts.get(key)
            held = next((v for v in values if v[0] == value), None)  # (==: dicts alike in another key order)
            if held is None:
                values.append(held := [value, []])
            held[1].append((rank, host))
        if len(values) > 1:
            differences.append(f'{key} is ' + ', '.join(f'{_SHORT.repr(value)} on {_processes(at, state)}'
                                                        for value, at in values))
    if differences:
        raise ConfigError(f'the processes of this run differ (every machine must run the same config, --resume and '
                          f'data): {"; ".join(differences)}')


_SHORT = reprlib.Repr()  # values in messages: whole model.kwargs, the first classes of a long list
_SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring = 16, 8, 80


def _processes(at: List[tuple], state: PartialState) -> str:
    """'process 1 of 2 (host b)', 'processes 0, 2 of 4 (hosts a, c)' for [(rank, host), ...]."""
    ranks, hosts = [str(rank) for rank, _ in at], list(dict.fromkeys(host for _, host in at))
    return (f'process{"es" if len(ranks) > 1 else ""} {", ".join(ranks)} of {state.num_processes} '
            f'(host{"s" if len(hosts) > 1 else ""} {", ".join(hosts)})')


class RunFolderInUse(ConfigError):
    """train.output_dir is held by another live run (`lock_run_folder`)."""


LOCK_FILE = '.lock'  # in output_dir: held (flock) by the main process of the run that writes there
_HELD: Dict[str, int] = {}  # output folders (real paths) this process holds the lock of -> the lock's descriptor


def lock_run_folder(accelerator: Accelerator, folder: str) -> None:
    """Refuse, on every process at once (a collective), a run folder that another live run writes to.

    The main process holds an exclusive `flock` on `folder/.lock` until `release_run_folder` or its exit, so two
    runs never mix their checkpoints, weights and metrics rows: e.g. a `--resume` started while the workers of a
    launcher killed with `kill -9` still train (torchrun's workers outlive it). The lock file names its holder.
    The same process may take a folder again (a later Trainer of the same notebook). A file system without locks
    (some network mounts) leaves the folder unguarded, with a warning; a system without `fcntl` (Windows) locks
    nothing."""
    error = None
    if accelerator.is_main_process and fcntl is not None:
        path = os.path.realpath(folder)
        if path not in _HELD:
            fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors='replace').strip() or 'another process'
                os.close(fd)
                error = (f'train.output_dir {folder!r} is in use by another run ({holder}): wait for it to end or stop '
                         f'it (the workers of an `accelerate launch` killed with kill -9 keep running: stop them too), '
                         f'or give another train.output_dir')
            except OSError as e:
                os.close(fd)
                warnings.warn(f'train.output_dir {folder!r}: no file lock on this file system ({e}); nothing stops '
                              f'another run from writing to the same folder')
            else:
                os.ftruncate(fd, 0)
                os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}, since '
                             f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode())
                _HELD[path] = fd
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise RunFolderInUse(error)


def release_run_folder(folder: str) -> None:
    """Release the lock of `lock_run_folder` on `folder` (where this process holds it)."""
    fd = _HELD.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)


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


def checkpoint_to_resume(output_dir: str, resume: Union[bool, str], allow_fresh: bool = False,
                         say: Callable[[str], None] = print) -> Optional[str]:
    """The checkpoint a run starts from: `resume` True = the latest in `output_dir`, a path = that checkpoint,
    False = none, refused when `output_dir` already holds checkpoints (it would mix two runs).

    `resume=True` with no checkpoint in `output_dir` is refused (a mistyped output_dir would silently start
    over) unless `allow_fresh` (job scripts that always pass --resume): then it says so and returns None. A fresh
    start is refused where `output_dir` holds an earlier run's metrics rows without its checkpoints (removed to save
    space): it would replace that run's metrics.csv, config.yaml and best weights and mix its tracker logs.
    """
    latest = latest_checkpoint(output_dir)
    if resume is True and latest is None:
        where = os.path.join(output_dir, 'checkpoints')
        if not allow_fresh:
            raise ConfigError(f'--resume: no checkpoint in {where!r} to resume from (check train.output_dir; pass '
                              '--allow-fresh to start a fresh run when there is none)')
        _refuse_earlier_outputs(output_dir)
        say(f'--resume: no checkpoint in {where!r}: starting a fresh run (--allow-fresh)')
        return None
    if resume:
        return resume if isinstance(resume, str) else latest
    if latest is not None:
        raise ConfigError(f'train.output_dir {output_dir!r} already holds checkpoints ({latest}): '
                          'pass --resume to continue that run, or choose another output_dir')
    _refuse_earlier_outputs(output_dir)
    return None


def _refuse_earlier_outputs(output_dir: str) -> None:
    """Refuse a fresh start in `output_dir` where its metrics.csv holds rows: a run writes them only after its
    first checkpoint, so they are an earlier run's (its checkpoints removed), not a killed start of this one's."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = sum(1 for line in f if line.strip()) - 1  # (the header)
    if rows > 0:
        raise ConfigError(f'train.output_dir {output_dir!r} holds the outputs of an earlier run ({rows} '
                          f'row{"s" if rows > 1 else ""} in {METRICS_FILE}, but no checkpoint to resume): a fresh run '
                          f'would replace its metrics, config and weights; choose another output_dir, or remove its '
                          f'{METRICS_FILE} (and its weights and logs) to start over there')


def set_aside_newer(accelerator: Accelerator, output_dir: str, update: int) -> List[str]:
    """Rename the complete checkpoints under output_dir/checkpoints past `update` to 'abandoned-<time>-step-*', and
    the weights files exported past it (best, last, last_ema) to 'abandoned-<time>-<name>.safetensors' (main process;
    all must call): a run resumed from an earlier checkpoint starts a new branch, and a later `--resume` must continue
    this branch, not the abandoned one's higher step, nor present the abandoned branch's weights as its own (the
    resumed state's best accuracy is the checkpoint's). Where anything was set aside, the trackers' logs
    (output_dir/logs) go too, to 'abandoned-<time>-logs': they hold the abandoned branch's rows of the epochs this
    branch redoes (TensorBoard would show both), and `MetricsLog.begin` logs the checkpoint's rows anew. Returns the
    new paths."""
    root = os.path.join(output_dir, 'checkpoints')
    moved, exported, error = [], {}, None
    if accelerator.is_main_process:  # (a damaged weights file stops every process before anything is moved)
        try:
            exported = {name: _exported_update(os.path.join(output_dir, name)) for name in _EXPORTED}
        except ConfigError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise ConfigError(error)
    if accelerator.is_main_process:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        for step, name in _complete(root) if os.path.isdir(root) else []:
            if step > update:
                moved.append(os.path.join(root, f'abandoned-{stamp}-{name}'))
                os.replace(os.path.join(root, name), moved[-1])
        for name in _EXPORTED:
            path = os.path.join(output_dir, name)
            if exported[name] is not None and exported[name] > update:
                moved.append(os.path.join(output_dir, f'abandoned-{stamp}-{name}'))
                os.replace(path, moved[-1])
        logs = os.path.join(output_dir, LOGS_DIR)
        if moved and os.path.isdir(logs):
            moved.append(os.path.join(output_dir, f'abandoned-{stamp}-{LOGS_DIR}'))
            os.replace(logs, moved[-1])
        if moved:
            accelerator.print(f'--resume: resumed at update {update}; the later checkpoints, weights and tracker logs '
                              f'of the abandoned run are set aside as {", ".join(os.path.basename(m) for m in moved)}')
    accelerator.wait_for_everyone()
    return moved


def restore_best_weights(accelerator: Accelerator, output_dir: str, checkpoint: str) -> bool:
    """Put the copy of best.safetensors that `checkpoint` keeps back in `output_dir` where it has none (e.g. the
    abandoned branch's set aside by `set_aside_newer`): the resumed state's best accuracy is that file's. Returns
    whether `output_dir` holds best weights now, the same on every process (all must call); where it does not (a
    checkpoint written before checkpoints kept them), the resumed run must export its own."""
    present = error = None
    if accelerator.is_main_process:
        best, kept = os.path.join(output_dir, BEST_FILE), os.path.join(checkpoint, BEST_FILE)
        if not os.path.exists(best) and os.path.isfile(kept):
            try:  # (a copy cut short would become the run's best weights)
                _exported_update(kept)
            except ConfigError:
                error = str(_damaged(checkpoint, ValueError(f'{BEST_FILE} is cut short')))
            else:
                _link_or_copy(kept, best)
                accelerator.print(f'--resume: {BEST_FILE} restored from {checkpoint} (the best weights of its state)')
        present = os.path.isfile(best)
    present, error = broadcast_object_list([present, error])
    if error:
        raise ConfigError(error)
    return bool(present)


def _link_or_copy(src: str, dst: str) -> None:
    """`dst`, a new name, as a hard link to `src` (`export_weights` writes each file anew, so the link keeps these
    bytes), or as a copy written atomically where the file system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        with replaced_atomically(dst) as tmp:
            shutil.copyfile(src, tmp)


def save_checkpoint(
        accelerator: Accelerator,
        output_dir: str,
        update: int,
        keep: int,
        write_extra: Optional[Callable[[str], None]] = None,
) -> None:
    """`accelerator.save_state` into a temporary folder, renamed once every process has written its part; then
    only the newest `keep` checkpoints are kept. `write_extra(folder)` (main process) adds files before the rename
    (the run's config and metrics rows); the run's best.safetensors is kept with it (a hard link where the file
    system has them: no copy of the data). Every process must call it. Partial folders of saves killed before (full
    size each) are removed first: this run holds the folder (`lock_run_folder`), nothing else writes them."""
    acc = accelerator
    root = os.path.join(output_dir, 'checkpoints')
    final = os.path.join(root, f'step-{update:08d}')
    tmp = os.path.join(root, f'.tmp-step-{update:08d}')
    if acc.is_main_process:
        os.makedirs(root, exist_ok=True)
        recover_replaced_checkpoints(output_dir)  # (an `.old-step-*` left so is the only copy of its checkpoint)
        for name in os.listdir(root):
            if name.startswith(('.tmp-step-', '.old-step-', '.pruned-step-')):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    acc.wait_for_everyone()
    with _write_errors_as_oserror(tmp), _fsdp_records(acc):
        acc.save_state(tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        best = os.path.join(output_dir, BEST_FILE)
        if os.path.isfile(best):  # the best weights this checkpoint's state records (a branch resume restores them)
            _link_or_copy(best, os.path.join(tmp, BEST_FILE))
        old = os.path.join(root, f'.old-step-{update:08d}')
        if os.path.isdir(final):  # (the same update saved again, e.g. after a resume: two renames, then removed)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for _, name in _complete(root)[:-keep]:  # (renamed first: one killed while removed is no checkpoint)
            os.replace(os.path.join(root, name), os.path.join(root, f'.pruned-{name}'))
            shutil.rmtree(os.path.join(root, f'.pruned-{name}'), ignore_errors=True)
    acc.wait_for_everyone()


def recover_replaced_checkpoints(output_dir: str) -> List[str]:
    """Rename back to `step-N` each `.old-step-N` under output_dir/checkpoints that has no `step-N`: a save of an
    update already saved (`save_checkpoint`) sets the old checkpoint aside under that name before renaming the new
    one into place, so a run killed between the two renames leaves the old one, complete, as the update's only
    checkpoint (a later save's clean-up would remove it, and a `--resume` found no checkpoint there, or an earlier
    one). Main process, in a run folder this run holds (`lock_run_folder`). Returns the checkpoints put back."""
    root = os.path.join(output_dir, 'checkpoints')
    restored = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name.startswith('.old-step-') and _CKPT_RE.match(name[len('.old-'):]):
            final = os.path.join(root, name[len('.old-'):])
            if not os.path.exists(final):
                os.replace(os.path.join(root, name), final)
                restored.append(final)
    return restored


def _fsdp_records(accelerator: Accelerator):
    """Under FSDP, the model's state in checkpoints without the S4ND layers' records (`layers.records`): torch's
    distributed state-dict functions refuse them (FSDP2's full state dict) or restore them on rank 0 only, and a
    resumed run rebuilds its model from the same config, records included. Its exported weights keep them."""
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    return state_dict_without_records() if fsdp else nullcontext()


def load_checkpoint(accelerator: Accelerator, path: str, state: TrainState, config: Optional[Dict] = None) -> None:
    """Restore everything registered with `accelerator` (`state` among it) from the checkpoint folder `path`.

    With `config` (this run's, as a nested dict): a checkpoint of another model (`model.name`, `model.kwargs`) is
    refused with a ConfigError naming the checkpoint's model, and any other key that changed is warned about.
    """
    if os.path.isfile(path):  # (e.g. best.safetensors: weights, without the optimizer, schedule and data position)
        raise ConfigError(f'--resume: {path!r} is a file, not a checkpoint folder (one of <train.output_dir>/'
                          f'checkpoints/step-*): to start a run from weights, give model.pretrained_file={path}')
    if not os.path.isdir(path):
        raise ConfigError(f'--resume: no checkpoint folder {path!r}')
    if not any(name.startswith('custom_checkpoint_') for name in os.listdir(path)):  # (our TrainState, scheduler)
        raise ConfigError(f'--resume: {path!r} is not a checkpoint folder (one of <train.output_dir>/checkpoints/'
                          f'step-*; --resume alone takes the latest in train.output_dir)')
    _check_metrics(path)
    _check_model_layout(accelerator, path)
    saved = _read_config(path)
    if config is not None and saved is not None:
        _compare_configs(path, saved, config, warn=accelerator.is_main_process)
    try:
        fp16 = ((saved or {}).get('train') or {}).get('mixed_precision') == 'fp16'
        with _fsdp_records(accelerator), _without_missing_scaler(accelerator, path, expected=fp16):
            accelerator.load_state(path)
    except ValueError as e:  # the optimizer's parameter groups (torch: 'loaded state dict has a different ...')
        if 'parameter group' not in str(e):
            raise
        raise ConfigError(f'--resume: the optimizer of checkpoint {path!r} has other parameter groups than this '
                          f'run\'s ({e}): optim.layer_decay, optim.ssm_lr or the no-weight-decay parameters changed; '
                          f'resume with the checkpoint\'s, or start a fresh run in another output_dir') from None
    except RuntimeError as e:  # load_state_dict's report of every mismatched tensor: one line instead
        if 'PytorchStreamReader' in str(e):  # torch.load of a truncated file
            raise _damaged(path, e) from None
        if 'state_dict' not in str(e):
            raise
        first = ' '.join(str(e).split())[:300]
        raise ConfigError(f'--resume: checkpoint {path!r} does not fit the model {(config or {}).get("model", {})}'
                          f' (a checkpoint of another model?): {first}') from None
    except (FileNotFoundError, EOFError, pickle.UnpicklingError, SafetensorError) as e:  # missing or truncated
        raise _damaged(path, e) from None
    accelerator.print(f'resumed from {path}: epoch {state.epoch}, update {state.update} '
                      f'({state.step_in_epoch} into the epoch)')


# how each kind of run writes its model's state in a checkpoint (Accelerate's names; the first model's)
_MODEL_LAYOUTS = {
    'plain': (('model.safetensors', 'pytorch_model.bin'), 'a run without FSDP (DDP or one process)'),
    'FULL_STATE_DICT': (('pytorch_model_fsdp.bin',), 'an FSDP run with fsdp_state_dict_type FULL_STATE_DICT'),
    'SHARDED_STATE_DICT': (('pytorch_model_fsdp_0',), 'an FSDP run with fsdp_state_dict_type SHARDED_STATE_DICT'),
    'LOCAL_STATE_DICT': (('pytorch_model_fsdp_rank0.bin',), 'an FSDP run with fsdp_state_dict_type LOCAL_STATE_DICT'),
}


def _check_model_layout(accelerator: Accelerator, path: str) -> None:
    """Refuse checkpoint `path` where another kind of run wrote its model's state than this one reads: with FSDP
    or without it, or FSDP's other state dict type (each reads its own files only, and the file it missed made
    Accelerate's error, read as a damaged checkpoint, whose advice was an earlier checkpoint, written the same way,
    or a fresh run). A checkpoint without any of them is left to the load (damaged)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        kind = getattr(accelerator.state.fsdp_plugin.state_dict_type, 'name', None)
    else:
        kind = 'plain'
    if kind not in _MODEL_LAYOUTS or any(os.path.exists(os.path.join(path, f)) for f in _MODEL_LAYOUTS[kind][0]):
        return
    for files, writer in _MODEL_LAYOUTS.values():
        found = [f for f in files if os.path.exists(os.path.join(path, f))]
        if found:
            raise ConfigError(
                f'--resume: checkpoint {path!r} was written by {writer} ({found[0]}), which this run, '
                f'{_MODEL_LAYOUTS[kind][1]}, cannot read: resume it with the launch config that wrote it, or start a '
                f'fresh run from the run\'s exported weights (model.pretrained_file=<its train.output_dir>/'
                f'last.safetensors)')


@contextmanager
def _without_missing_scaler(accelerator: Accelerator, path: str, expected: bool) -> Iterator[None]:
    """An fp16 run (Accelerate's GradScaler) resuming a checkpoint without the scaler's state, one of a bf16 or
    float32 run: its scaler starts afresh, as in a fresh fp16 run (Accelerate would fail on the missing scaler.pt,
    a checkpoint read as damaged). The weights, optimizer and position are the checkpoint's. Where the checkpoint's
    config says it trained in fp16 (`expected`), a missing scaler.pt is damage, left to Accelerate's error."""
    scaler = accelerator.scaler
    if scaler is None or expected or os.path.isfile(os.path.join(path, 'scaler.pt')):
        yield
        return
    accelerator.print(f'{path} holds no gradient scaler state (a run without fp16): the scaler starts afresh')
    accelerator.scaler = None
    try:
        yield
    finally:
        accelerator.scaler = scaler


def _damaged(path: str, error: BaseException) -> ConfigError:
    """The error for checkpoint `path` whose files fail to load (`error`): one line naming it and the checkpoint
    before it to resume from instead."""
    if isinstance(error, FileNotFoundError) and error.filename:
        # (Accelerate looks for pytorch_model.bin where model.safetensors is missing: name the file it writes)
        name = re.sub(r'^pytorch_model(_\d+)?\.bin$', r'model\1.safetensors', os.path.basename(error.filename))
        reason = f'{name} is missing'
    else:
        reason = ' '.join(str(error).split()).split('. ')[0][:200]  # (torch's has paragraphs of advice)
    root, name = os.path.split(os.path.normpath(path))
    step = _CKPT_RE.match(name)
    earlier = [n for u, n in _complete(root) if step and u < int(step.group(1))] if os.path.isdir(root) else []
    advice = (f'resume from the checkpoint before it with --resume {os.path.join(root, earlier[-1])}' if earlier else
              'no earlier checkpoint is kept: start a fresh run in another train.output_dir')
    return ConfigError(f'--resume: checkpoint {path!r} is damaged ({reason}); {advice}')


def _check_metrics(checkpoint: str) -> None:
    """Refuse as damaged a checkpoint whose metrics.csv is cut short (its last line unended, or a row short of
    fields): the resumed run takes its rows as the run's (a TypeError from the missing fields before). None: a
    checkpoint written before checkpoints held their rows."""
    path = os.path.join(checkpoint, METRICS_FILE)
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        text = f.read()
    rows = list(csv.DictReader(io.StringIO(text)))
    if not text.endswith('\n') or any(None in row or None in row.values() or not str(row.get('epoch')).isdigit()
                                       for row in rows):
        raise _damaged(checkpoint, ValueError(f'{METRICS_FILE} is cut short'))


def _read_config(checkpoint: str) -> Optional[Dict[str, Any]]:
    """The config of `checkpoint` (None: a checkpoint written before checkpoints held their config); one cut short
    (its last line unended: YAML reads the rest as the whole config, and the resume warned of every key it lost as
    changed, or took its model for another) or not a config is refused as damaged."""
    path = os.path.join(checkpoint, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read()
    try:
        tree = load_yaml(text)
    except yaml.YAMLError:
        tree = None
    if not text.endswith('\n') or not isinstance(tree, dict):
        raise _damaged(checkpoint, ValueError(f'{CONFIG_FILE} is cut short or not a config'))
    return tree


def flat_config(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """A config as a nested dict (`config_to_dict`) as {'section.key': value}, `model.kwargs` whole."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != 'kwargs':
            out.update(flat_config(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def _compare_configs(path: str, saved: Dict[str, Any], config: Dict[str, Any], warn: bool = True) -> None:
    """Refuse another model; warn (if `warn`: once per run, not per process) about every other key whose value
    changed since the checkpoint was written."""
    old, new = flat_config(saved), flat_config(config)
    model_keys = ('model.name', 'model.kwargs')
    if any(old.get(k) != new.get(k) for k in model_keys):
        raise ConfigError(
            f'--resume: checkpoint {path!r} belongs to model {old.get("model.name")!r} with model.kwargs '
            f'{old.get("model.kwargs")}, but this run builds {new.get("model.name")!r} with model.kwargs '
            f'{new.get("model.kwargs")}: resume with the checkpoint\'s model, or choose another train.output_dir')
    if old.get('optim.opt', new.get('optim.opt')) != new.get('optim.opt'):  # (its moments would not fit)
        raise ConfigError(f'--resume: checkpoint {path!r} was written with optim.opt={old.get("optim.opt")!r}, this '
                          f'run has {new.get("optim.opt")!r}: resume with the checkpoint\'s optimizer, or start a '
                          f'fresh run in another output_dir')
    if (old.get('train.ema_decay') is None) != (new.get('train.ema_decay') is None):
        raise ConfigError(
            f'--resume: checkpoint {path!r} was written {"without" if old.get("train.ema_decay") is None else "with"} '
            f'a model EMA (train.ema_decay={old.get("train.ema_decay")}), this run has train.ema_decay='
            f'{new.get("train.ema_decay")}: resume with the checkpoint\'s choice (another non-null decay is fine), or '
            f'start a fresh run in another output_dir')
    if old.get('train.mixed_precision') is None:  # (written before the precision a run resolved was recorded)
        old['train.mixed_precision'] = new.get('train.mixed_precision')
    for key, legacy in LEGACY_OPTIM.items():  # (written before they became null: null means the same values)
        if (new.get(f'optim.{key}') is None and old.get(f'optim.{key}') == legacy
                and optimizer_default(new.get('optim.opt', 'adamw'), key) in (None, legacy)):
            old[f'optim.{key}'] = None
    changed = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}'
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed and warn:
        warnings.warn(f'resuming {path} with a changed config (checkpoint -> now; the new values apply from here '
                      f'on): {"; ".join(changed)}',
                      UserWarning, stacklevel=3)


def local_shards(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """This process's parts of `tensors`: the local shard of an FSDP2 DTensor (collectives refuse DTensors; a check
    of every process's shard covers the whole tensor), any other tensor as it is."""
    tensors = list(tensors)
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return tensors


def all_finite(accelerator: Accelerator, *modules: nn.Module) -> bool:
    """Whether every parameter and buffer of `modules` is finite on every process (a collective: all must call);
    each process checks its shards under FSDP."""
    flags = [torch.isfinite(t).all() for m in modules for t in local_shards((*m.parameters(), *m.buffers()))
             if t.is_floating_point() or t.is_complex()]
    ok = torch.stack(flags).all().float() if flags else torch.ones((), device=accelerator.device)
    if accelerator.num_processes > 1:
        ok = accelerator.reduce(ok.to(accelerator.device), reduction='sum') / accelerator.num_processes
    return bool(ok.item() == 1)


def export_weights(accelerator: Accelerator, model: nn.Module, path: str, update: Optional[int] = None) -> str:
    """The weights of `model` as safetensors at `path` (written by the main process, atomically), loadable for a
    model of N classes with `timm.create_model(name, pretrained=True, num_classes=N,
    pretrained_cfg_overlay=dict(file=path, num_classes=N))` (the trainer prints the exact call): timm drops a
    file's classifier whenever the overlay's num_classes (else the registry's 1000) differs from the model's, and
    the head would be a new random one. Every process must call it (FSDP gathers the weights). A model compiled by
    Accelerate (`accelerate launch --dynamo_backend ...`) is written with the keys of the module it compiles, as its
    checkpoints are. `update`: the run's update count, recorded in
    the file's metadata (`set_aside_newer` reads it)."""
    if is_compiled_module(model):  # Accelerate's state dict keeps the wrapper's '_orig_mod.' prefix
        model = model._orig_mod
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_safetensors(state, path, None if update is None else {'update': str(update)})
    return path


@contextmanager
def _write_errors_as_oserror(path: str) -> Iterator[None]:
    """safetensors reports a failed write (e.g. a full disk: os error 28) as a SafetensorError: re-raised as the
    OSError it is (its errno where the message gives one, its message kept), which the command line reports in
    one line instead of a traceback."""
    try:
        yield
    except SafetensorError as e:
        code = re.search(r'\bcode: (\d+)', str(e))
        message = f'writing {path}: {e}'
        raise (OSError(int(code.group(1)), message) if code else OSError(message)) from e


def _exported_update(path: str) -> Optional[int]:
    """The update `export_weights` recorded in weights file `path` (None: none recorded, or no such file); a file
    cut short (a bad copy, a failing disk) is a ConfigError naming it (a SafetensorError that named no file
    before)."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework='pt') as f:
            update = (f.metadata() or {}).get('update')
    except SafetensorError as e:
        raise ConfigError(f'--resume: {path} is damaged ({" ".join(str(e).split())[:200]}): move it away; the '
                          f'resumed run writes it again ({BEST_FILE}: from the checkpoint\'s copy, where it keeps '
                          f'one)') from None
    return int(update) if update is not None and update.isdigit() else None
