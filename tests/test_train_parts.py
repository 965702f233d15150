"""The trainer's parts on their own: top-k hits, data configs, checkpoint lookup and the metrics CSV."""
import contextlib
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.data.transforms import mnist_transform, model_data_config
from s4nd_vision.eval.accuracy import topk_hits
from s4nd_vision.train import ConfigError, checkpoint, latest_checkpoint
from s4nd_vision.train.checkpoint import (
    checkpoint_to_resume,
    export_weights,
    recover_replaced_checkpoints,
    restore_best_weights,
    save_checkpoint,
    set_aside_newer,
)
from s4nd_vision.train.metrics import _append_csv, _truncate_csv
from s4nd_vision.utils import remove_temporaries


def test_topk_hits_rank_the_target_and_cap_k_at_the_classes():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    hits = topk_hits(scores, target, k=2)
    assert hits.tolist() == [[True, False], [False, True], [False, False]]
    assert topk_hits(scores, target, k=5).shape == (3, 3)  # only 3 classes
    assert topk_hits(scores, target, k=5).any(1).all()


def test_model_data_config_fits_mean_and_std_to_the_channels():
    model = timm.create_model('convnext_atto', in_chans=1, num_classes=10)
    cfg = model_data_config(model)
    assert cfg['input_size'][0] == 1
    assert cfg['mean'] == pytest.approx((sum(IMAGENET_DEFAULT_MEAN) / 3,))
    assert cfg['std'] == pytest.approx((sum(IMAGENET_DEFAULT_STD) / 3,))
    cfg = model_data_config(model, 1, dict(mean=(0.5,), std=(0.25,), interpolation='bilinear', crop_pct=None))
    assert cfg['mean'] == (0.5,) and cfg['std'] == (0.25,) and cfg['interpolation'] == 'bilinear'
    assert len(model_data_config(timm.create_model('convnext_atto'), 3)['mean']) == 3

    digits = mnist_transform(20, cfg)(torch.full((1, 28, 28), 0.5))
    assert digits.shape == (1, 20, 20)
    torch.testing.assert_close(digits, torch.zeros(1, 20, 20))  # (0.5 - mean) / std, no crop of the constant


def test_checkpoint_lookup_ignores_partial_folders_and_refuses_to_mix_runs(tmp_path):
    out = str(tmp_path)
    assert latest_checkpoint(out) is None and checkpoint_to_resume(out, True, allow_fresh=True) is None
    with pytest.raises(ConfigError, match='--resume: no checkpoint in .* to resume from .*--allow-fresh'):
        checkpoint_to_resume(out, True)  # nothing to resume: a mistyped output_dir must not start over silently
    for name in ('step-00000002', 'step-00000010', '.tmp-step-00000012'):
        os.makedirs(os.path.join(out, 'checkpoints', name))
    latest = os.path.join(out, 'checkpoints', 'step-00000010')
    assert latest_checkpoint(out) == latest
    assert checkpoint_to_resume(out, True) == latest
    assert checkpoint_to_resume(out, 'elsewhere/step-1') == 'elsewhere/step-1'
    with pytest.raises(ConfigError, match='already holds checkpoints'):
        checkpoint_to_resume(out, False)


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_metrics_but_no_checkpoints(tmp_path):
    """Checkpoints removed to save space: a fresh run there would replace the earlier run's metrics.csv, config and
    best weights, and mix its TensorBoard logs (steps going back to 0)."""
    out = str(tmp_path)
    with open(os.path.join(out, 'metrics.csv'), 'w') as f:
        f.write('epoch,train_loss\n')
    assert checkpoint_to_resume(out, False) is None  # (a header alone: no earlier run's rows)
    with open(os.path.join(out, 'metrics.csv'), 'a') as f:
        f.write('0,2.3\n1,2.1\n')
    for resume, fresh in ((False, False), (True, True)):
        with pytest.raises(ConfigError, match=r"train.output_dir .* holds the outputs of an earlier run \(2 rows in "
                                              r"metrics.csv, but no checkpoint to resume\)"):
            checkpoint_to_resume(out, resume, allow_fresh=fresh, say=lambda _: None)


def test_a_save_removes_killed_saves_folders_and_replaces_a_checkpoint_of_its_update(tmp_path):
    """Partial folders of saves killed before (full size each) do not pile up; saving an update again replaces
    its checkpoint."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    acc = Accelerator(cpu=True)
    try:
        acc.prepare(torch.nn.Linear(2, 2))
        root = tmp_path / 'checkpoints'
        save_checkpoint(acc, str(tmp_path), 2, keep=3)
        # a new save's, the old copy of a checkpoint saved again, a pruned checkpoint's: each killed while written or
        # removed (a `.old-step-N` beside its `step-N`: the new one was in place)
        for name in ('.tmp-step-00000003', '.old-step-00000002', '.pruned-step-00000001'):
            (root / name).mkdir(parents=True)
            (root / name / 'model.safetensors').write_bytes(b'partial')
        save_checkpoint(acc, str(tmp_path), 5, keep=3)
        assert sorted(os.listdir(root)) == ['step-00000002', 'step-00000005']
        save_checkpoint(acc, str(tmp_path), 5, keep=3,
                        write_extra=lambda folder: open(os.path.join(folder, 'again'), 'w').close())
        assert sorted(os.listdir(root)) == ['step-00000002', 'step-00000005']
        assert (root / 'step-00000005' / 'again').is_file()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_a_save_killed_between_its_renames_or_while_pruning_leaves_complete_checkpoints(tmp_path, monkeypatch):
    """A save of an update saved before sets the old checkpoint aside (`.old-step-N`) and renames the new one into
    place: killed between the two renames, the old one is the update's only copy, put back by the next run's start
    and by the next save (whose clean-up removed it: `--resume` found an earlier checkpoint, or none). A checkpoint
    pruned (`train.keep_checkpoints`) is renamed before its removal, so one killed midway is never taken as a
    checkpoint (`step-N` with some of its files)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    acc = Accelerator(cpu=True)
    try:
        acc.prepare(torch.nn.Linear(2, 2))
        out, root = str(tmp_path), tmp_path / 'checkpoints'
        save_checkpoint(acc, out, 4, keep=1)
        os.replace(root / 'step-00000004', root / '.old-step-00000004')  # killed between the renames of a new save
        (root / '.tmp-step-00000004').mkdir()
        assert latest_checkpoint(out) is None
        assert recover_replaced_checkpoints(out) == [str(root / 'step-00000004')]
        assert latest_checkpoint(out) == str(root / 'step-00000004')
        os.replace(root / 'step-00000004', root / '.old-step-00000004')
        save_checkpoint(acc, out, 5, keep=2)
        assert sorted(os.listdir(root)) == ['step-00000004', 'step-00000005']

        rmtree = checkpoint.shutil.rmtree

        def killed_while_pruning(path, *args, **kwargs):
            if os.path.basename(path).startswith('.pruned-'):
                raise KeyboardInterrupt
            return rmtree(path, *args, **kwargs)

        monkeypatch.setattr(checkpoint.shutil, 'rmtree', killed_while_pruning)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(acc, out, 6, keep=2)
        assert sorted(name for name in os.listdir(root) if name.startswith('step-')) == ['step-00000005',
                                                                                      'step-00000006']
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_a_save_of_an_update_saved_before_killed_before_its_last_rename_leaves_the_old_checkpoint(tmp_path,
                                                                                                 monkeypatch):
    """Saving an update again, the old checkpoint is set aside by a rename, not removed, before the new one is renamed
    into place: a run killed between the two keeps the update's checkpoint (put back by the next start)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    acc = Accelerator(cpu=True)
    try:
        acc.prepare(torch.nn.Linear(2, 2))
        out, root = str(tmp_path), tmp_path / 'checkpoints'
        save_checkpoint(acc, out, 4, keep=2)
        replace = checkpoint.os.replace

        def killed_before_the_new_one_is_in_place(src, dst, *args, **kwargs):
            if os.path.basename(src).startswith('.tmp-step-'):
                raise KeyboardInterrupt
            return replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(checkpoint.os, 'replace', killed_before_the_new_one_is_in_place)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(acc, out, 4, keep=2)
        monkeypatch.undo()
        assert recover_replaced_checkpoints(out) == [str(root / 'step-00000004')]
        assert latest_checkpoint(out) == str(root / 'step-00000004')
        assert (root / 'step-00000004' / 'model.safetensors').is_file()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_a_save_keeps_the_newest_checkpoints(tmp_path):
    """train.keep_checkpoints: each save removes the oldest checkpoints beyond `keep`, never the one it wrote (the
    one a resume continues from), also when the updates' digits differ in number."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    acc = Accelerator(cpu=True)
    try:
        acc.prepare(torch.nn.Linear(2, 2))
        for update in (1, 2, 9, 10):
            save_checkpoint(acc, str(tmp_path), update, keep=2)
        assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['step-00000009', 'step-00000010']
        assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoints' / 'step-00000010')
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_metrics_csv_grows_columns_and_drops_epochs_a_resumed_run_redoes(tmp_path):
    path = str(tmp_path / 'metrics.csv')
    _truncate_csv(path, before_epoch=0)  # no file yet: nothing to do
    assert not os.path.exists(path)
    _append_csv(path, dict(epoch=0, train_loss=1.5))
    _append_csv(path, dict(epoch=1, train_loss=1.0, top1=50.0))
    _append_csv(path, dict(epoch=2, train_loss=0.5))
    header, *rows = open(path).read().splitlines()
    assert header == 'epoch,train_loss,top1' and rows == ['0,1.5,', '1,1.0,50.0', '2,0.5,']
    _truncate_csv(path, before_epoch=1)
    assert open(path).read().splitlines() == ['epoch,train_loss,top1', '0,1.5,']
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # (no temporary file left)


def test_exported_weights_load_with_their_head_as_the_docstring_says(tmp_path):
    """`export_weights`' docstring: a model of N classes loads its file with num_classes=N given to the call and to
    the overlay. Without the overlay's, timm drops the file's classifier (N is not the registry's 1000) and the head
    is a new random one: the docstring must not promise that call."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    size = dict(img_size=32, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), d_state=8)
    model = timm.create_model('convnext_s4nd_atto', num_classes=7, **size).eval()
    with torch.no_grad():
        model.get_classifier().weight.normal_()
    try:
        path = export_weights(Accelerator(cpu=True), model, str(tmp_path / 'best.safetensors'))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    documented = timm.create_model('convnext_s4nd_atto', pretrained=True, num_classes=7,
                                   pretrained_cfg_overlay=dict(file=path, num_classes=7), **size).eval()
    with pytest.warns(UserWarning, match='timm drops it'):  # (warned of since: the file's head fits the model)
        without = timm.create_model('convnext_s4nd_atto', pretrained=True, num_classes=7,
                                    pretrained_cfg_overlay=dict(file=path), **size).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(documented(x), model(x))
        assert not torch.allclose(without(x), model(x))  # (the head timm dropped)
    doc = export_weights.__doc__.replace('\n', ' ')
    assert 'num_classes=N, pretrained_cfg_overlay=dict(file=path, num_classes=N)' in ' '.join(doc.split())


def test_a_branch_resume_sets_aside_the_abandoned_branchs_best_weights(tmp_path):
    """best.safetensors records the update it was exported at: resumed from an earlier checkpoint, the run's best is
    the checkpoint's, so weights exported later by the abandoned run must not stay under the name. The tracker logs
    go aside with them, and only then."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    try:
        acc, model = Accelerator(cpu=True), torch.nn.Linear(2, 2)
        best, logs = tmp_path / 'best.safetensors', tmp_path / 'logs'
        export_weights(acc, model, str(best), update=12)
        logs.mkdir()
        assert set_aside_newer(acc, str(tmp_path), 12) == [] and best.is_file()  # (not past the resumed update)
        assert logs.is_dir()  # (nothing set aside: a plain resume goes on logging there)
        moved, moved_logs = set_aside_newer(acc, str(tmp_path), 8)
        assert not best.exists() and os.path.basename(moved).startswith('abandoned-')
        assert moved.endswith('-best.safetensors') and os.path.isfile(moved)
        # the tracker logs go with the branch (they hold its epochs): named as the rest
        assert not logs.exists() and moved_logs == moved[:-len('best.safetensors')] + 'logs'
        assert os.path.isdir(moved_logs)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_a_branch_resume_sets_aside_the_abandoned_branchs_last_weights_too(tmp_path):
    """last.safetensors and last_ema.safetensors exported past the resumed update are the abandoned branch's weights
    as much as best.safetensors is: set aside alike (a branch stopped before its first epoch end had kept them)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    try:
        acc, model = Accelerator(cpu=True), torch.nn.Linear(2, 2)
        for name, update in (('best', 4), ('last', 12), ('last_ema', 12)):
            export_weights(acc, model, str(tmp_path / f'{name}.safetensors'), update=update)
        moved = set_aside_newer(acc, str(tmp_path), 8)
        assert sorted(name.split('-')[-1] for name in map(os.path.basename, moved)) == [
            'last.safetensors', 'last_ema.safetensors']
        assert sorted(os.listdir(tmp_path)) == sorted(['best.safetensors', *map(os.path.basename, moved)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_checkpoints_keep_the_best_weights_of_their_state_for_a_branch_resume(tmp_path):
    """Each checkpoint keeps the best.safetensors of its time, unchanged by later exports; a resume puts it back where
    the output folder has none (set aside), and says when there is none to put back (the run then exports its own)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    try:
        acc = Accelerator(cpu=True)
        model = acc.prepare(torch.nn.Linear(2, 2))
        best = tmp_path / 'best.safetensors'
        save_checkpoint(acc, str(tmp_path), 2, keep=3)  # (before any best: none kept)
        export_weights(acc, model, str(best), update=4)
        save_checkpoint(acc, str(tmp_path), 4, keep=3)
        at4 = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        export_weights(acc, model, str(best), update=6)
        save_checkpoint(acc, str(tmp_path), 6, keep=3)
        step2, step4 = (str(tmp_path / 'checkpoints' / f'step-{u:08d}') for u in (2, 4))
        assert not os.path.exists(os.path.join(step2, 'best.safetensors'))
        set_aside_newer(acc, str(tmp_path), 4)
        assert restore_best_weights(acc, str(tmp_path), step4)
        assert torch.equal(load_file(str(best))['weight'], at4)
        set_aside_newer(acc, str(tmp_path), 2)
        assert not restore_best_weights(acc, str(tmp_path), step2) and not best.exists()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_temporaries_of_writes_killed_midway_are_removed(tmp_path):
    for name in ('.last.safetensors.ab12cd_9.tmp', '.metrics.csv.zzzzzzzz.tmp', 'keep.tmp', '.hidden', 'x.csv'):
        (tmp_path / name).write_text('x')
    assert sorted(remove_temporaries(str(tmp_path))) == ['.last.safetensors.ab12cd_9.tmp', '.metrics.csv.zzzzzzzz.tmp']
    assert sorted(os.listdir(tmp_path)) == ['.hidden', 'keep.tmp', 'x.csv']


_EXPORT_200_MB = """
import sys, torch
from accelerate import Accelerator
from s4nd_vision.train.checkpoint import export_weights
export_weights(Accelerator(cpu=True), torch.nn.Linear(50_000, 1_000, bias=False), sys.argv[1] + '/last.safetensors')
"""


def test_a_weights_export_killed_midway_leaves_only_what_the_clean_up_removes(tmp_path):
    """kill -9 while weights are written: what is left is `replaced_atomically`'s temporary, which the next run's
    `remove_temporaries` removes (safetensors' own save_file wrote through a `.tmpXXXXXX` of its own, left at full
    size)."""
    child = subprocess.Popen([sys.executable, '-c', _EXPORT_200_MB, str(tmp_path)],
                             env=dict(os.environ, OMP_NUM_THREADS='1'))
    try:
        writing = False
        while not writing and child.poll() is None:  # until a file other than the result holds data
            for entry in os.scandir(tmp_path):
                try:
                    writing = writing or (entry.name != 'last.safetensors' and entry.stat().st_size > 0)
                except FileNotFoundError:  # (renamed meanwhile)
                    pass
        assert writing, 'the export ended before it was seen writing'
    finally:
        child.kill()
        child.wait()
    remove_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_resumed_run_sends_checkpointed_rows_it_never_logged_to_the_trackers(tmp_path):
    """Killed between an epoch's checkpoint and its row: metrics.csv gets the row back from the checkpoint, and so
    do the trackers (TensorBoard lost that epoch's scalars before)."""
    from s4nd_vision.train.config import Config
    from s4nd_vision.train.metrics import MetricsLog

    class Accelerator:
        is_main_process = True

        def __init__(self):
            self.logged = []

        def log(self, values, step):
            self.logged.append((step, values))

    cfg = Config()
    cfg.train.output_dir, cfg.train.trackers = str(tmp_path), []
    checkpoint = tmp_path / 'checkpoints' / 'step-00000004'
    checkpoint.mkdir(parents=True)
    _append_csv(str(tmp_path / 'metrics.csv'), dict(epoch=0, top1=10.0))
    for row in (dict(epoch=0, top1=10.0), dict(epoch=1, top1=20.0, note='x')):
        _append_csv(str(checkpoint / 'metrics.csv'), row)
    acc = Accelerator()
    MetricsLog(acc, cfg).begin(2, str(checkpoint))
    assert acc.logged == [(1, dict(epoch=1.0, top1=20.0))]
    assert [r.split(',')[0] for r in open(tmp_path / 'metrics.csv').read().splitlines()] == ['epoch', '0', '1']


def test_trackers_log_to_the_configs_project_under_the_runs_name(tmp_path):
    """W&B and MLflow get `train.tracker_project` as their project / experiment and the run folder's name as the
    run's (every run went to a project named 'logs', the trackers' folder, under a random name)."""
    from s4nd_vision.train.config import Config
    from s4nd_vision.train.metrics import MetricsLog

    class Accelerator:
        def init_trackers(self, project_name, config=None, init_kwargs=None):
            self.project, self.init_kwargs = project_name, init_kwargs

    cfg = Config()
    cfg.train.output_dir, cfg.train.trackers, cfg.train.tracker_project = str(tmp_path / 'run7'), ['wandb'], 'mine'
    acc = Accelerator()
    MetricsLog(acc, cfg)
    assert acc.project == 'mine' and acc.init_kwargs == {'wandb': {'name': 'run7'}, 'mlflow': {'run_name': 'run7'}}

def _deepspeed_accelerator(**config):
    """What `check_deepspeed_config` reads of an Accelerator launched with DeepSpeed (not installed here)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


def _refused_if(refused: bool, match: str):
    """A ConfigError matching `match` expected where `refused`, none otherwise."""
    return pytest.raises(ConfigError, match=match) if refused else contextlib.nullcontext()


@pytest.mark.parametrize('clip, deepspeed, refused', [
    (None, 'auto', True), (1.0, 'auto', False), (0.5, 'auto', True), (0.5, 0.5, False), (None, None, False),
    (None, 0, False), (2.0, None, True), (None, 1.0, True)])
def test_deepspeed_clipping_must_be_optim_clip_grad(clip, deepspeed, refused):
    """DeepSpeed clips the gradients itself (Accelerate's clip_grad_norm_ only reads the norm there) at its config's
    gradient_clipping, 'auto' filled with 1.0 by Accelerate: a run with another optim.clip_grad (null included)
    clipped at that value without a word."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from s4nd_vision.train.trainer import check_deepspeed_config

    acc = _deepspeed_accelerator(**({} if deepspeed is None else {'gradient_clipping': deepspeed}))
    with _refused_if(refused, rf'optim.clip_grad is {clip if clip else "null"}, but DeepSpeed, which clips the '
                              rf'gradients itself, clips them at'):
        check_deepspeed_config(acc, clip, 1)
    check_deepspeed_config(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), clip, 1)  # (others: no-op)


@pytest.mark.parametrize('steps, refused', [('auto', False), (4, False), (1, True), ('2', True)])
def test_deepspeed_accumulation_must_be_train_grad_accum_steps(steps, refused):
    """A DeepSpeed config file's gradient_accumulation_steps (1 where it gives none) replaces Accelerate's in
    `prepare` (a log line only): Accelerate would sync every `steps` micro-batches while the loop counts updates of
    train.grad_accum_steps (4 here), stepping the optimizer several times per counted update."""
    from s4nd_vision.train.trainer import check_deepspeed_config

    acc = _deepspeed_accelerator(gradient_clipping=0, gradient_accumulation_steps=steps)
    with _refused_if(refused, rf'train.grad_accum_steps is 4, but the DeepSpeed config accumulates over {steps} '
                              rf'micro-batches'):
        check_deepspeed_config(acc, None, 4)


def test_non_finite_checks_reduce_fsdp2_shards():
    """FSDP2's parameters and gradients are DTensors, which collectives refuse: the gradient and weight checks
    all-reduce each process's verdict on its local shards (here FSDP2 on one gloo process), and still see a NaN."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from s4nd_vision.train.checkpoint import all_finite
    from s4nd_vision.train.trainer import grad_norm

    class Accelerator:  # what all_finite uses of one: the all-reduce of two processes that hold the same values
        device, num_processes = torch.device('cpu'), 2

        def reduce(self, tensor, reduction):
            dist.all_reduce(tensor)
            return tensor * self.num_processes

    dist.init_process_group('gloo', rank=0, world_size=1, store=dist.HashStore())
    try:
        model = timm.create_model('convnext_s4nd_atto', num_classes=4, img_size=32)
        fully_shard(model)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        norm = grad_norm(model)
        dist.all_reduce(norm)
        expected = torch.linalg.vector_norm(torch.stack([p.grad.full_tensor().norm() for p in model.parameters()]))
        torch.testing.assert_close(norm, expected)
        assert all_finite(Accelerator(), model)
        with torch.no_grad():
            model.head.fc.weight.to_local()[0, 0] = float('nan')
        assert not all_finite(Accelerator(), model)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('param_dtype, warns', [(torch.bfloat16, True), (torch.float32, False), (None, False)])
def test_fsdp_mixed_precision_that_casts_parameters_is_warned_of(param_dtype, warns, recwarn):
    """Accelerate's FSDP bf16 casts every parameter (the SSM's too) before the forward: the trainer warns."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from s4nd_vision.train.trainer import warn_fsdp_parameter_cast
    policy = MixedPrecisionPolicy(param_dtype=param_dtype)
    fsdp = SimpleNamespace(fsdp_plugin=SimpleNamespace(mixed_precision_policy=policy))
    warn_fsdp_parameter_cast(SimpleNamespace(distributed_type=DistributedType.FSDP, state=fsdp))
    warn_fsdp_parameter_cast(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, state=None))
    assert [str(w.message).split(' before')[0] for w in recwarn.list if 'FSDP' in str(w.message)] == (
        [f'FSDP mixed precision casts every parameter to {param_dtype}'] if warns else [])


@pytest.mark.parametrize('engine, name, kind', [('FSDP', 'FSDP', 'FSDP'), ('DEEPSPEED', 'DeepSpeed', 'DEEPSPEED')])
def test_fsdp_and_deepspeed_launches_that_accelerate_runs_with_ddp_are_refused(engine, name, kind, monkeypatch):
    """On CPU processes (ACCELERATE_USE_CPU=1) Accelerate enables neither FSDP nor DeepSpeed that the launcher's
    config asks for: it trains with DDP (MULTI_CPU), without a word. Where it runs them, and without them asked
    for, nothing is refused."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from s4nd_vision.train.trainer import check_launched_engine

    def acc(distributed_type):
        return SimpleNamespace(distributed_type=distributed_type, num_processes=2, device=torch.device('cpu'))
    monkeypatch.delenv('ACCELERATE_USE_FSDP', raising=False)
    monkeypatch.delenv('ACCELERATE_USE_DEEPSPEED', raising=False)
    check_launched_engine(acc(DistributedType.MULTI_CPU))
    monkeypatch.setenv(f'ACCELERATE_USE_{engine}', 'true')
    check_launched_engine(acc(DistributedType[kind]))
    with pytest.raises(ConfigError, match=rf'asks for {name} .* runs these 2 process\(es\) on cpu without it '
                                          rf'.* would train with DDP'):
        check_launched_engine(acc(DistributedType.MULTI_CPU))


def test_cpu_peak_memory_is_in_mib_on_linux_and_macos_and_the_trainer_imports_without_resource(monkeypatch):
    """ru_maxrss is KiB on Linux and bytes on macOS; Windows has no `resource` module (nan, not an ImportError of
    s4nd_vision.train)."""
    import resource

    from s4nd_vision.train import metrics
    cpu = torch.device('cpu')
    usage = resource.struct_rusage((0,) * 2 + (3 * 2 ** 20,) + (0,) * 13)  # ru_maxrss: 3 * 2 ** 20
    monkeypatch.setattr(resource, 'getrusage', lambda who: usage)
    for platform, expected in (('linux', 3 * 2 ** 10), ('darwin', 3)):
        monkeypatch.setattr(sys, 'platform', platform)
        assert metrics.peak_memory_mb(cpu) == expected
    script = ("import sys; sys.modules['resource'] = None\n"
              "import torch; from s4nd_vision.train.metrics import peak_memory_mb\n"
              "print(peak_memory_mb(torch.device('cpu')))")
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ['nan'], result.stderr[-2000:]


def test_a_trainer_built_while_a_worker_imports_the_main_script_says_to_guard_it(monkeypatch, tmp_path):
    """A script without the main guard runs again in each forkserver/spawn worker (video loaders'): refused there
    with what to do, not a confusing 'folder in use' error from the run it would start."""
    import multiprocessing

    from s4nd_vision.train import Trainer, load_config
    monkeypatch.setattr(multiprocessing.current_process(), '_inheriting', True, raising=False)
    with pytest.raises(RuntimeError, match="starting worker process imports the main script.*__name__ == '__main__'"):
        Trainer(load_config('demo/mnist_convnext.yaml', [f'train.output_dir={tmp_path}']))
    assert not os.listdir(tmp_path)
