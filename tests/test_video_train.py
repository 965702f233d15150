"""The trainer on video: a generated HMDB-51-layout dataset through the real pipeline, one and two processes."""
import json
import os
import shutil
import socket
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import timm
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from media import write_video
from memory_format_runs import train_in_both_memory_formats
from safetensors.torch import load_file, save_file
from torch.utils.data import DistributedSampler

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.data.video import VIDEO_WORKER_START, Hmdb51Clips, VideoTransform
from s4nd_vision.models._checkpoint import file_num_classes
from s4nd_vision.models.inflate import inflate_state_dict
from s4nd_vision.train import ConfigError, Trainer, load_config
from s4nd_vision.train import data as train_data
from s4nd_vision.train.data import Hmdb51Data, _full_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('brush_hair', 'cartwheel', 'wave')
TRAIN = [f'{c}_{i}.avi' for c in CLASSES for i in range(2)] + ['broken.avi']  # broken.avi: not a video
TEST = [f'{c}_test.avi' for c in CLASSES]
# a very small 3D ConvNeXt-S4ND on (B, 3, 4, 32, 32) clips of 1 s
TINY = [
    'model.name=convnext_s4nd_3d_atto',
    'model.kwargs={depths: [1, 1, 1, 1], dims: [8, 16, 16, 16], d_state: 8, stem_chs: 8}',
    'data.dataset=hmdb51', 'data.num_frames=4', 'data.clip_duration=1.0', 'data.clips_per_video=2',
    'data.img_size=32', 'data.batch_size=2', 'data.workers=0', 'optim.lr=2e-3', 'sched.warmup_epochs=0',
    'aug.auto_augment=rand-m9-n2',
]


@pytest.fixture(scope='module')
def hmdb(tmp_path_factory):
    """videos/<class>/<video>.avi and splits/<class>_test_split1.txt: per class two training videos and one
    test video; brush_hair also holds an unreadable training video and an unreadable test video (listed first)."""
    root = tmp_path_factory.mktemp('hmdb51')
    videos, splits = root / 'videos', root / 'splits'
    splits.mkdir()
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for k, name in enumerate(CLASSES):
        (videos / name).mkdir(parents=True)
        lines = []
        if k == 0:
            for broken, tag in (('broken_test.avi', 2), ('broken.avi', 1)):
                (videos / name / broken).write_bytes(garbage)
                lines.append(f'{broken} {tag}')
        for video, tag in ((f'{name}_0.avi', 1), (f'{name}_1.avi', 1), (f'{name}_test.avi', 2)):
            write_video(videos / name / video, channel=k)
            lines.append(f'{video} {tag}')
        (splits / f'{name}_test_split1.txt').write_text(' \n'.join(lines) + ' \n')
    return str(videos), str(splits)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny clips: one thread each (threads spinning on shared cores cost several times the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each Trainer builds its own Accelerator; the process-wide accelerate state must not leak between tests."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _overrides(hmdb, out, *extra):
    videos, splits = hmdb
    return [*TINY, f'data.root={videos}', f'data.split_dir={splits}', f'train.output_dir={out}', *extra]


def _rows(out):
    header, *rows = (out / 'metrics.csv').read_text().splitlines()
    return [dict(zip(header.split(','), row.split(','))) for row in rows]


def test_video_config_errors(hmdb, tmp_path):
    with pytest.raises(ConfigError, match="data.dataset must be 'imagefolder', 'mnist' or 'hmdb51'"):
        load_config(None, _overrides(hmdb, tmp_path, 'data.dataset=kinetics'))
    with pytest.raises(ConfigError, match='data.root must be an existing folder for data.dataset hmdb51'):
        load_config(None, _overrides(hmdb, tmp_path, f'data.root={tmp_path / "missing"}'))
    with pytest.raises(ConfigError, match='data.split must be 1, 2 or 3'):
        load_config(None, _overrides(hmdb, tmp_path, 'data.split=4'))
    with pytest.raises(ConfigError, match='aug.reprob must be left at 0.0'):
        load_config(None, _overrides(hmdb, tmp_path, 'aug.reprob=0.25'))
    with pytest.raises(ConfigError, match="aug.auto_augment must be null or 'rand-m"):
        load_config(None, _overrides(hmdb, tmp_path, 'aug.auto_augment=rand-m9-mstd0.5-inc1'))
    with pytest.raises(ConfigError, match=r"rand-m<magnitude 0-10>.*got 'rand-m11-n2'"):
        load_config(None, _overrides(hmdb, tmp_path, 'aug.auto_augment=rand-m11-n2'))
    with pytest.raises(ConfigError, match='holds no HMDB-51 split files'):  # at run time, before any model is built
        Trainer(load_config(None, _overrides(hmdb, tmp_path, f'data.split_dir={tmp_path}')))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(ConfigError, match='convnext_s4nd_atto takes images'):
        Trainer(load_config(None, _overrides(hmdb, tmp_path, 'model.name=convnext_s4nd_atto')))


def test_a_2d_imagenet_checkpoint_initializes_the_video_model(hmdb, tmp_path):
    """model.pretrained_file with 2D weights (another class count): inflated on the fly, the classifier left new."""
    kwargs = dict(depths=[1, 1, 1, 1], dims=[8, 16, 16, 16], d_state=8, stem_chs=8)
    weights_2d = timm.create_model('convnext_s4nd_atto', num_classes=10, **kwargs).state_dict()
    save_file(weights_2d, str(tmp_path / 'imagenet.safetensors'))
    trainer = Trainer(load_config(None, _overrides(
        hmdb, tmp_path / 'run', f'model.pretrained_file={tmp_path / "imagenet.safetensors"}')))
    model = trainer.accelerator.unwrap_model(trainer.model)
    own = model.state_dict()
    inflated = inflate_state_dict(weights_2d, model)  # the default (smooth) time kernels on the model's own dt
    assert set(own) - set(inflated) == {'head.fc.weight', 'head.fc.bias'} and own['head.fc.weight'].shape == (3, 16)
    for k, v in inflated.items():
        assert torch.equal(own[k], v), k
    torch.testing.assert_close(own['stages.1.blocks.0.conv_dw.kernels.2.c'],
                               weights_2d['stages.1.blocks.0.conv_dw.kernels.1.c'])  # W kernel: 2D axis 1 -> 3D axis 2


@pytest.mark.parametrize('source', ['convnext_s4nd_atto', 'convnext_s4nd_3d_atto'])
def test_a_checkpoint_of_the_same_classes_keeps_its_classifier(hmdb, tmp_path, source):
    """A 3-class file (a 2D one, or a video run's, in a training checkpoint) in a 3-class run: its classifier is
    loaded (timm compares the file's class count, stated from the file, with the model's)."""
    kwargs = dict(depths=[1, 1, 1, 1], dims=[8, 16, 16, 16], d_state=8, stem_chs=8)
    torch.manual_seed(3)
    weights = timm.create_model(source, num_classes=len(CLASSES), **kwargs).state_dict()
    torch.save({'state_dict': weights}, tmp_path / 'same.pth')
    file = tmp_path / 'same.pth'
    trainer = Trainer(load_config(None, _overrides(hmdb, tmp_path / 'run', f'model.pretrained_file={file}')))
    own = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert torch.equal(own['head.fc.weight'], weights['head.fc.weight'])
    assert torch.equal(own['head.fc.bias'], weights['head.fc.bias'])


def test_file_num_classes_reads_shapes_of_either_format(tmp_path):
    """The classifier rows of a safetensors file (DDP prefix) and of a torch training checkpoint (EMA first)."""
    save_file({'module.head.fc.weight': torch.zeros(7, 4), 'module.stem.0.weight': torch.zeros(4, 3, 1, 1)},
              str(tmp_path / 'w.safetensors'))
    torch.save({'state_dict': {'head.fc.weight': torch.zeros(5, 4)}, 'state_dict_ema': {'head.fc.weight':
                torch.zeros(9, 4)}}, tmp_path / 'ckpt.pth')
    assert file_num_classes(str(tmp_path / 'w.safetensors'), 'head.fc') == 7
    assert file_num_classes(str(tmp_path / 'ckpt.pth'), 'head.fc') == 9
    assert file_num_classes(str(tmp_path / 'ckpt.pth'), 'head') is None
    # a pathlib.Path, as timm's loader takes it (load_model reads the classes of its checkpoint through this)
    assert file_num_classes(tmp_path / 'w.safetensors', 'head.fc') == 7


def _evaluate_directly(model, hmdb):
    """Video top-1 (mean softmax of each video's clips), clip top-1 and loss, computed clip by clip."""
    videos, splits = hmdb
    test = Hmdb51Clips(videos, splits, 'test', clip_duration=1.0, clips_per_video=2, with_video_index=True,
                       transform=VideoTransform(train=False, num_frames=4, img_size=32))
    probs, losses, clip_hits = {}, [], []
    model.eval()
    with torch.no_grad():
        for clip, label, _, video in test:
            logits = model(clip[None])[0]
            losses.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor([label])))
            clip_hits.append(float(logits.argmax() == label))
            probs.setdefault(video, (label, []))[1].append(logits.softmax(0))
    video_hits = [float(torch.stack(p).mean(0).argmax() == label) for label, p in probs.values()]
    return dict(top1=100 * np.mean(video_hits), clip_top1=100 * np.mean(clip_hits),
                val_loss=torch.stack(losses).mean().item(), val_videos=len(probs))


def test_single_process_run_skips_broken_videos_evaluates_per_video_and_resumes_exactly(hmdb, tmp_path):
    extra = ('train.epochs=2', 'train.checkpoint_every_steps=1', 'train.keep_checkpoints=10', 'train.ema_decay=0.8',
             'model.drop_path_rate=0.1', 'aug.cutmix=1.0')
    out = tmp_path / 'run'
    trainer = Trainer(load_config(None, _overrides(hmdb, out, *extra)))
    assert trainer.updates_per_epoch == 3  # 7 training videos, batch 2
    model = trainer.model
    inputs, mixed = [], []
    model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()) if m.training else None)
    cutmix = trainer.mixup

    def recorded(x, y):
        mixed.append(x.clone())
        return cutmix(x, y)

    trainer.mixup = recorded
    with pytest.warns(RuntimeWarning, match='skipped unreadable video') as record:
        trainer.fit()
    assert any('broken.avi' in str(w.message) for w in record)
    assert any('broken_test.avi' in str(w.message) for w in record)

    # clips (B, 3, T, H, W) in, every frame of a clip with the same CutMix box from the same partner
    assert len(inputs) == 6 and inputs[0].shape == (2, 3, 4, 32, 32)
    boxes = 0
    for before, after in zip(mixed, inputs):
        before = before.view(after.shape)
        box = (after != before).any(1).any(1)  # (B, H, W)
        torch.testing.assert_close(after, torch.where(box[:, None, None], before.flip(0), before), rtol=0, atol=0)
        boxes += int(box.any())
    assert boxes > 0

    rows = _rows(out)
    assert [r['epoch'] for r in rows] == ['0', '1']
    for column in ('clips_per_s', 'skipped_videos', 'top1', 'top5', 'clip_top1', 'val_videos', 'ema_top1'):
        assert column in rows[0]
    # the broken training video is read once per epoch (seed 0 puts it mid-epoch in both), the broken test video
    # at every evaluation
    assert [r['skipped_videos'] for r in rows] == ['1', '1']
    assert [r['val_skipped_videos'] for r in rows] == ['1', '1'] and [r['val_videos'] for r in rows] == ['3', '3']
    with pytest.warns(RuntimeWarning, match='broken_test.avi'):
        expected = _evaluate_directly(trainer.accelerator.unwrap_model(model), hmdb)
        metrics = trainer.evaluate()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key
    trained = load_file(str(out / 'last.safetensors'))
    # the export loads as the run's last line says: the training clip (32 px, 4 frames) is the kernels' reference
    exported = timm.create_model(
        'convnext_s4nd_3d_atto', pretrained=True, num_classes=3, img_size=32, num_frames=4,
        pretrained_cfg_overlay=dict(file=str(out / 'last.safetensors'), num_classes=3), **trainer.cfg.model.kwargs)
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(clip), trainer.accelerator.unwrap_model(model).eval()(clip))

    # resuming at the epoch boundary (update 3) and mid-epoch (update 4) ends with the same weights
    for update in (3, 4):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        again = tmp_path / f'resumed-{update}'
        resumed = Trainer(load_config(None, _overrides(hmdb, again, *extra)),
                          resume=str(out / 'checkpoints' / f'step-{update:08d}'))
        assert resumed.state.update == update
        with pytest.warns(RuntimeWarning, match='skipped unreadable video'):
            resumed.fit()
        weights = load_file(str(again / 'last.safetensors'))
        for k, v in trained.items():
            assert torch.equal(weights[k], v), f'{k} differs after resuming at update {update}'


def test_an_unreadable_video_read_last_is_counted(hmdb, tmp_path):
    """Batches of one: with the epoch order putting broken.avi last, no clip follows it to carry its count; the
    epoch's count comes from the dataset, which counts every unreadable video it meets."""
    videos, splits = hmdb
    paths = [p for p, _ in Hmdb51Clips(videos, splits, 'train')._videos._labeled_videos]
    broken = next(i for i, p in enumerate(paths) if p.endswith('broken.avi'))
    seed = next(s for s in range(100)  # the video order of epoch 0 (Hmdb51Clips' DistributedSampler)
                if list(DistributedSampler(paths, num_replicas=1, rank=0, shuffle=True, seed=s))[-1] == broken)
    out = tmp_path / 'run'
    trainer = Trainer(load_config(None, _overrides(
        hmdb, out, 'data.batch_size=1', f'train.seed={seed}', 'train.epochs=1')))
    with pytest.warns(RuntimeWarning, match='broken.avi'):
        trainer.fit()
    assert [r['skipped_videos'] for r in _rows(out)] == ['1']


def test_an_unreadable_test_video_read_last_is_counted(hmdb, tmp_path):
    """The last test video unreadable (here missing): no clip follows it to carry its count; evaluation counts the
    dataset's record, as training does."""
    videos, splits = hmdb
    mine = tmp_path / 'splits'
    shutil.copytree(splits, mine)
    with open(mine / 'wave_test_split1.txt', 'a') as f:
        f.write('missing_test.avi 2 \n')
    trainer = Trainer(load_config(None, _overrides((videos, str(mine)), tmp_path / 'run', 'train.epochs=1')))
    for _ in range(2):  # (each evaluation counts its own)
        with pytest.warns(RuntimeWarning, match='missing_test.avi'):
            metrics = trainer.evaluate()
        assert metrics['val_videos'] == 3 and metrics['val_skipped_videos'] == 2


def test_workers_train_on_every_video_once_per_epoch(hmdb, tmp_path):
    """data.workers=2: each worker's share of the 7 training videos (one unreadable) can end in a partial batch;
    merged, every readable video is trained on once per epoch (dropped, the epoch ran short into a second pass
    that repeated videos). This process decodes a clip first: workers forked after it hung (PyAV 18.1.1)."""
    data = Trainer(load_config(None, _overrides(hmdb, tmp_path, 'data.workers=2'))).data
    next(iter(data.train_set))
    stop = data.samples_per_rank() // data.cfg.data.batch_size
    for epoch in range(3):
        batches = list(data.train_batches(epoch, 32, 0, stop))  # (the workers warn about broken.avi)
        assert len(batches) == stop == 3 and all(len(x) == 2 for x, _, _ in batches)
        assert sorted(torch.cat([y for _, y, _ in batches]).tolist()) == [0, 0, 1, 1, 2, 2], epoch


def test_a_mid_epoch_start_with_workers_gives_the_rest_of_the_uninterrupted_epoch(hmdb, tmp_path):
    """data.workers=2 (workers started by forkserver, seeded from the loader's generator): an epoch started at its
    second micro-batch, as a mid-epoch resume does, yields the same clips, labels and counts as the whole epoch."""
    data = Trainer(load_config(None, _overrides(hmdb, tmp_path, 'data.workers=2'))).data
    stop = data.samples_per_rank() // data.cfg.data.batch_size
    whole = list(data.train_batches(1, 32, 0, stop))
    rest = list(data.train_batches(1, 32, 1, stop))
    assert len(whole) == stop and len(rest) == stop - 1
    for a, b in zip(whole[1:], rest):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_run_with_workers_counts_and_scores_as_one_without(hmdb, tmp_path):
    """data.workers=2 end to end (training and evaluation loaders, workers started by forkserver): the unreadable
    videos the workers meet are counted in this process, and the scores are those of a direct evaluation."""
    out = tmp_path / 'run'
    trainer = Trainer(load_config(None, _overrides(hmdb, out, 'data.workers=2', 'train.epochs=1')))
    trainer.fit()  # (the workers warn about the broken videos in their own processes)
    row, = _rows(out)
    assert (row['skipped_videos'], row['val_skipped_videos'], row['val_videos']) == ('1', '1', '3')
    with pytest.warns(RuntimeWarning, match='broken_test.avi'):
        expected = _evaluate_directly(trainer.accelerator.unwrap_model(trainer.model), hmdb)
    metrics = trainer.evaluate()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key


def test_video_workers_start_from_a_server_that_preloaded_the_video_pipeline(hmdb, tmp_path, monkeypatch):
    """The trainer starts new workers for every epoch and evaluation: by forkserver, from a server that imported
    torch and pytorchvideo once, besides the main script (each worker importing them anew took ~10 s a loader)."""
    import multiprocessing.forkserver
    monkeypatch.setattr(multiprocessing.forkserver._forkserver, '_preload_modules', ['__main__'])  # (the default)
    data = Trainer(load_config(None, _overrides(hmdb, tmp_path, 'data.workers=2'))).data
    assert data.val_loader.multiprocessing_context.get_start_method() == VIDEO_WORKER_START
    if VIDEO_WORKER_START == 'forkserver':
        assert multiprocessing.forkserver._forkserver._preload_modules == ['__main__', 's4nd_vision.data.video']


def test_full_batches_merge_the_partial_ones_in_order():
    batches = [[torch.arange(n) + 10 * i, torch.full((n,), i)] for i, n in enumerate((3, 1, 3, 2, 2, 1, 1))]
    merged = list(_full_batches(iter(batches), 3))  # the remainder [60] is dropped
    assert [b[0].tolist() for b in merged] == [[0, 1, 2], [20, 21, 22], [10, 30, 31], [40, 41, 50]]
    assert [b[1].tolist() for b in merged] == [[0, 0, 0], [2, 2, 2], [1, 3, 3], [4, 4, 5]]
    # a merge past the size keeps its leftover for the next batch
    batches = [[torch.arange(2) + 10 * i] for i in range(3)]
    assert [b[0].tolist() for b in _full_batches(iter(batches), 3)] == [[0, 1, 10], [11, 20, 21]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_run_shards_videos_and_synchronizes(hmdb, tmp_path):
    """7 training videos over 2 ranks: 4 each (one repeated), one broken, so one rank has 3 clips for 2 batches of 2
    and takes a second pass; 3 test videos: one repeated for evaluation, counted once."""
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    out = tmp_path / 'dist'
    cmd = ['accelerate', 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(_free_port()),
           os.path.join(ROOT, 'tests', 'dist_video_train_script.py'), *_overrides(hmdb, out, 'train.epochs=1')]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'training convnext_s4nd_3d_atto on 2 process(es), global batch 4, lr 0.002, 2 updates/epoch' in result.stdout

    ranks = [load_file(str(out / f'rank{r}.safetensors')) for r in (0, 1)]
    initial = load_file(str(out / 'rank0_initial.safetensors'))
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), f'{k} differs between ranks: gradients were not synchronized'
    assert any(not torch.equal(ranks[0][k], initial[k]) for k in initial)
    updates, shards = [], []
    for r in (0, 1):
        done, opened = (out / f'rank{r}_videos.txt').read_text().split('\n')
        updates.append(int(done))
        shards.append({v for v in opened.split() if v in TRAIN})
    assert updates == [2, 2]
    assert shards[0] | shards[1] == set(TRAIN) and len(shards[0] & shards[1]) == 1  # own halves, one padding repeat
    row, = _rows(out)  # (each unreadable video once, also where it is a shard's padding repeat)
    assert row['val_videos'] == '3' and row['skipped_videos'] == '1' and row['val_skipped_videos'] == '1'


def test_an_fsdp_sharded_model_evaluates_shards_of_unequal_clip_counts(hmdb, tmp_path):
    """The 4 test videos over 2 ranks, one unreadable: one rank has 1 batch of clips, the other 2. Sharded by FSDP2,
    every forward all-gathers the parameters: the rank that ran out must keep joining them, not go on to the
    gathering of scores (a mismatch of collectives: a hang until the timeout, or an error). The metrics equal the
    plain module's, also where one rank has no clip at all."""
    out = tmp_path / 'metrics.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()),
           os.path.join(ROOT, 'tests', 'dist_video_eval_script.py'), str(out), *_overrides(hmdb, tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.read_text())
    plain, sharded = metrics['plain'], metrics['sharded']
    assert plain['val_videos'] == 3 and plain['val_skipped_videos'] == 1
    assert sharded == pytest.approx(plain, rel=1e-5)
    # a rank without a single clip (the evaluation's stand-in clip has the shape of the data's)
    empty = metrics['rank1_empty']
    assert 0 < empty['plain']['val_videos'] < 3 and empty['sharded'] == pytest.approx(empty['plain'], rel=1e-5)


def test_channels_last_run(hmdb, tmp_path):
    train_in_both_memory_formats(tmp_path, partial(_overrides, hmdb), torch.channels_last_3d)


def test_a_test_video_cut_short_is_skipped_whole(hmdb, tmp_path):
    """A truncated test video (frames ending before its header's duration) yields its first clip, then its last has
    no frames: it is skipped and counted, and its first clip is not scored (it was scored on 1 of 2 clips and counted
    skipped too: val_videos + val_skipped_videos exceeded the test videos)."""
    videos, splits = (tmp_path / 'videos', tmp_path / 'splits')
    shutil.copytree(hmdb[0], videos)
    shutil.copytree(hmdb[1], splits)
    cut = videos / 'wave' / 'cut_test.avi'
    write_video(cut, channel=2, frames=24)
    cut.write_bytes(cut.read_bytes()[:-1000])  # (its header still says 3.5 s)
    with open(splits / 'wave_test_split1.txt', 'a') as f:
        f.write('cut_test.avi 2 \n')
    trainer = Trainer(load_config(None, _overrides((videos, splits), tmp_path / 'run', 'train.epochs=1')))
    with pytest.warns(RuntimeWarning, match=r'cut_test.avi: no frames decoded'):
        metrics = trainer.evaluate()
    assert metrics['val_videos'] == 3 and metrics['val_skipped_videos'] == 2  # broken_test.avi and cut_test.avi


class _LogitClips(torch.utils.data.IterableDataset):
    """Test clips that hold their own logits, `(clip (K, 1, 1, 1), label, skipped, video)`, as `Hmdb51Clips` yields
    them with `with_video_index`; `unreadable`: the videos its record counts unreadable."""

    def __init__(self, clips, unreadable):
        self.clips, self.unreadable, self.transform = clips, unreadable, None

    def __iter__(self):
        for logits, label, video in self.clips:
            yield torch.tensor(logits).view(-1, 1, 1, 1), label, 0, video

    def set_epoch(self, epoch):
        pass

    def unreadable_videos(self):
        return self.unreadable


class _ClipLogits(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)  # (B, K, 1, 1, 1) -> (B, K): the clip's logits


def _clip_evaluation(tmp_path, clips, num_classes: int, unreadable=()) -> Hmdb51Data:
    """The evaluation's parts of an `Hmdb51Data` (no videos) over crafted `clips` (`_LogitClips`), batches of 2."""
    data = Hmdb51Data.__new__(Hmdb51Data)
    data.cfg = load_config(None, _overrides((str(tmp_path), str(tmp_path)), tmp_path, 'data.batch_size=2'))
    data.accelerator, data.num_classes, data.memory_format = Accelerator(cpu=True), num_classes, torch.contiguous_format
    data.val_set, data.transform = _LogitClips(clips, unreadable=list(unreadable)), lambda img_size, training: None
    data.prepare_evaluation()
    return data


def test_video_scores_are_the_mean_softmax_of_the_clips_of_each_video_scored_once(monkeypatch, tmp_path):
    """Crafted clip logits through the evaluation's loader and scoring. Video 0 (class 0): two clips sure of class 0,
    one far surer of class 1: the mean softmax says class 0, summed logits (or log-probabilities) say class 1.
    Video 1 is also on another rank (a shard's padding repeat, logits for class 0): scored once, on this rank's copy.
    Video 2 is unreadable after its first clip: skipped, not scored. 5 clips in batches of 2: the last one, video 1's
    only clip here, is a partial batch that must be scored."""
    clips = [([0.0, 0.0, 9.0], 2, 2), ([4.0, 0.0, 0.0], 0, 0), ([4.0, 0.0, 0.0], 0, 0), ([0.0, 20.0, 0.0], 0, 0),
             ([0.0, 3.0, 0.0], 1, 1)]
    other_rank = (torch.tensor([[9.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([1, 0]), [1, 3], [])
    monkeypatch.setattr(train_data, 'gather_object', lambda shards: shards + [other_rank])
    data = _clip_evaluation(tmp_path, clips, num_classes=3, unreadable=[2])
    metrics = data.evaluate(_ClipLogits())
    # videos 0, 1 (this rank's copy) and 3 right; clips: 4 of the 5 scored (video 2's is not) right
    assert metrics['top1'] == 100 and metrics['val_videos'] == 3 and metrics['val_skipped_videos'] == 1
    assert metrics['clip_top1'] == pytest.approx(80)


def test_a_clip_with_non_finite_logits_is_no_hit(tmp_path):
    """A clip whose logits are NaN is a miss in clip_top1 as in top1 (`topk_hits`): argmax ranks a NaN first, so an
    all-NaN clip was credited to class 0 (a model that blew up read as one at chance)."""
    nan = float('nan')
    clips = [([nan, nan, nan], 0, 0), ([0.0, 3.0, 0.0], 1, 1)]
    data = _clip_evaluation(tmp_path, clips, num_classes=3)
    metrics = data.evaluate(_ClipLogits())
    assert metrics['top1'] == 50 and metrics['clip_top1'] == 50 and metrics['val_videos'] == 2


def test_video_top5_counts_a_label_ranked_below_the_first(monkeypatch, tmp_path):
    """Video top-5 is its own count: of 7 classes, video 0's label ranks 2nd (a top-5 hit, no top-1 hit), video 1's
    last (neither)."""
    clips = [([5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0], 0, 0), ([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0], 6, 1)]
    monkeypatch.setattr(train_data, 'gather_object', lambda shards: shards)
    data = _clip_evaluation(tmp_path, clips, num_classes=7)
    metrics = data.evaluate(_ClipLogits())
    assert (metrics['top1'], metrics['top5'], metrics['clip_top1']) == (0, 50, 0)


class _Fsdp1Wrapper(torch.distributed.fsdp.FullyShardedDataParallel):
    """Stands for an FSDP1-wrapped model (FSDP1 needs an accelerator: it cannot be built on CPU): its forward, which
    gathers the root unit's sharded parameters, must be the one evaluated."""

    def __init__(self, module):
        torch.nn.Module.__init__(self)
        self._fsdp_wrapped_module, self.forwards = module, 0

    def forward(self, x):
        self.forwards += 1
        return self._fsdp_wrapped_module(x)


def test_video_evaluation_keeps_the_fsdp1_wrapper(tmp_path):
    """Accelerate's `unwrap_model` removes FSDP1's wrapper; the inner module holds the root unit's parameters as
    local shards, so evaluating it fails (or scores a shard): the wrapper's forward is evaluated."""
    clips = [([4.0, 0.0, 0.0], 0, 0), ([0.0, 3.0, 0.0], 1, 1)]
    data = _clip_evaluation(tmp_path, clips, num_classes=3)
    wrapped = _Fsdp1Wrapper(_ClipLogits())
    metrics = data.evaluate(wrapped)
    assert wrapped.forwards == 1 and metrics['top1'] == 100 and metrics['val_videos'] == 2


def test_video_evaluation_of_a_compiled_fsdp1_model_leaves_it_as_it_was(tmp_path):
    """Accelerate compiles the FSDP1 wrapper (`--dynamo_backend`): the evaluation forwards it as it is. unwrap_model
    removed the FSDP1 wrapper inside the compiled module and put the bare module (local shards) in its place, in the
    model being trained."""
    clips = [([4.0, 0.0, 0.0], 0, 0), ([0.0, 3.0, 0.0], 1, 1)]
    data = _clip_evaluation(tmp_path, clips, num_classes=3)
    wrapped = _Fsdp1Wrapper(_ClipLogits())
    compiled = torch.compile(wrapped, backend='eager')
    metrics = data.evaluate(compiled)
    assert compiled._orig_mod is wrapped and wrapped.forwards == 1
    assert metrics['top1'] == 100 and metrics['val_videos'] == 2
