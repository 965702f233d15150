"""Config values that pass the type checks but would fail (or train wrongly) deep in timm: a one-line error naming
the key. tools/inflate.py given a missing or wrong file: a one-line error naming it."""
import os
import warnings

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from test_train import _overrides, _write_folder, tool_main
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2

from s4nd_vision.data.video import VideoTransform
from s4nd_vision.train import ConfigError, Trainer, config_to_dict, load_config
from s4nd_vision.train.config import Config


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp('stripes'), n_train=2, n_val=1)


@pytest.mark.parametrize('override, message', [
    ('optim.lr=.inf', r'optim.lr must be a finite number, got inf'),
    ('optim.lr=.nan', r'optim.lr must be a finite number, got nan'),
    ('optim.weight_decay=-.inf', r'optim.weight_decay must be a finite number'),
    ('optim.lr=1' + '0' * 400, r'optim.lr must be a finite number, got 10{400}$'),  # (float() overflowed)
    ('optim.betas=[0.9, .nan]', r'optim.betas\[1\] must be a finite number'),
    ("sched.min_lr='inf'", r'sched.min_lr must be a finite number'),
    ('optim.betas=[0.9, 1.5]', r'optim.betas must be null or 2 values in \[0, 1\) for optim.opt adamw, got '
                               r'\[0.9, 1.5\]'),
    ('optim.eps=0', r'optim.eps must be positive or null, got 0'),
    ('aug.remode=zero', r"aug.remode must be 'pixel', 'rand' or 'const', got 'zero'"),
    ('train.trackers=[tensorbaord]', r"train.trackers must be a list of \[.*'tensorboard'.*\], got \['tensorbaord'\]"),
    ("train.tracker_project=' '", r"train.tracker_project must be a non-empty name, got ' '"),
    ('train.channels_last=yes', r"train.channels_last must be bool, got 'yes'"),  # YAML 1.2: only true / false
    # (the shell's quotes in `train.tracker_project='2024'` do not reach YAML: the error says how to quote)
    ('train.tracker_project=2024', r'train.tracker_project must be str, got 2024 \(YAML reads it as int: quote it in '
                                   r'YAML, on a command line as train.tracker_project="\'...\'"\)$'),
    ('optim.opt=adamww', r"optim.opt must be a timm optimizer .*got 'adamww' \(did you mean adamw\?\)"),
    ('optim.opt=lookahead_adamww', r"optim.opt must be a timm optimizer"),
    ('aug.auto_augment=bogus', r"aug.auto_augment must be .*got 'bogus'"),
    ('aug.auto_augment=rand-m9-bogus', r"aug.auto_augment must be .*got 'rand-m9-bogus' \(timm ignores \['bogus'\]\)"),
    # (timm clips a magnitude above its bound to it without a word: rand-m15 would train as rand-m10)
    ('aug.auto_augment=rand-m15-n2', r"aug.auto_augment must have a magnitude of at most 10 .*got 'rand-m15-n2'"),
    ('aug.auto_augment=augmix-m12', r"aug.auto_augment must have a magnitude of at most 10 .*got 'augmix-m12'"),
    ('aug.auto_augment=rand-x9', r"aug.auto_augment must be .*got 'rand-x9' \(Unknown RandAugment config section\)"),
    ('data.interpolation=bogus', r"data.interpolation must be null or a timm interpolation.*got 'bogus'"),
    ('data.interpolation=random', r"data.interpolation must be .*not 'random'"),
    ('data.img_size=16', r'data.img_size must be at least 32 \(the smallest input convnext_s4nd_atto takes\), got 16'),
    ('train.progressive=[{epoch: 0, img_size: 32}, {epoch: 1, img_size: 0}]',
     r'train.progressive\[1\].img_size must be positive, got 0'),  # (the stage named, as every other stage check)
    ('train.progressive=[{epoch: 0, img_size: 32}, {epoch: 1, img_size: 16}]',
     r'train.progressive\[1\].img_size must be at least 32 .*got 16'),
    ('sched.warmup_epochs=5000', r'sched.warmup_epochs must be less than train.epochs \(\d+\): the LR would never '
                                 r'reach optim.lr, got 5000'),
    ('sched.min_lr=0.01', r'sched.min_lr must be at most optim.lr \(0.002\).*got 0.01'),
    ('train.progressive=[{epoch: 0, img_size: 32}, {epoch: 500, img_size: 48}]',
     r'train.progressive must be stages starting before train.epochs \(\d+\): a later one never runs'),
    ('train.seed=-1', r'train.seed must be in \[0, 2\*\*32\), got -1'),
    ('train.max_nonfinite_steps=-1', r'train.max_nonfinite_steps must be >= 0, got -1'),
    ('model.kwargs.foo=1', r"model.kwargs .* do not build convnext_s4nd_atto: TypeError: .*unexpected keyword argument "
                           r"'foo'"),
    ('model.kwargs.depths=[1, 1]', r'model.kwargs .* do not build convnext_s4nd_atto: ValueError: depths and dims'),
    ('model.kwargs.num_classes=5', r'model.kwargs.num_classes is set by the trainer from the dataset'),
    ('model.kwargs.img_size=64', r'model.kwargs.img_size is set by the trainer from data.img_size'),
    ('model.kwargs.ls_init_value=null', r'model.kwargs.ls_init_value is null, which timm.create_model drops'),
    # (a NaN layer scale built a model whose first steps diverged: 'training diverged', not the config)
    ('model.kwargs.ls_init_value=.nan', r'model.kwargs.ls_init_value must hold finite numbers, got nan'),
    ('model.kwargs.dims=[8, 16, .inf, 16]', r'model.kwargs.dims must hold finite numbers, got \[8, 16, inf, 16\]'),
    ('model.kwargs.bandlimit=null', r'model.kwargs.bandlimit is null, .*bandlimit: 0 turns band-limiting off'),
    # (a stage without its size trained at a default of 224 px, silently)
    ('train.progressive=[{epoch: 0, img_size: 32}, {epoch: 1, bandlimit: 0.5}]',
     r"train.progressive\[1\].img_size must be given for every stage \(the stage's training size; .*got None"),
    ('train.progressive=[{epoch: 0, img_size: 32}, {epoch: 1, img_size: 32, bandlimit: -1}]',
     r"train.progressive\[1\].bandlimit must be a positive cut-off, 0 for off, or null to keep the one in force "
     r"\(the model's own or an earlier stage's\), got -1"),
    ('model.name=convnext_s4nd_atoo', r"model.name 'convnext_s4nd_atoo' is not a timm model \(did you mean "
                                      r"convnext_s4nd_atto\?\)"),
    ('optim.lr=[1', r"override 'optim.lr=\[1': the value is not valid YAML \(expected ',' or '\]'"),
    # (a boolean is an int in Python: true trained 1 epoch; a third scale bound was dropped by the pairing, silently)
    ('train.epochs=true', r'train.epochs must be int, got True'),
    ('aug.scale=[0.1, 0.5, 0.9]', r'aug.scale must hold 2 values, got \[0.1, 0.5, 0.9\]'),
])
def test_invalid_values_name_the_key(override, message, folder, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, _overrides(folder, tmp_path, override))
    assert '\n' not in str(info.value)


def test_an_override_value_keeps_its_own_equals_signs(folder, tmp_path):
    """Only the first `=` separates the key from the value: a value holding one (a path, a project name) is kept."""
    cfg = load_config(None, _overrides(folder, tmp_path, 'train.tracker_project=lr=1e-3,bs=8'))
    assert cfg.train.tracker_project == 'lr=1e-3,bs=8'


def test_progressive_sizes_the_model_does_not_take_are_refused(folder, tmp_path):
    """A stage size that is no multiple of a ViT's patch size is refused by the model's own input check when the
    config loads, not when the stage starts."""
    vit = ['model.name=vit_s4nd_atto_patch16_224', 'model.kwargs={}']
    message = r"train.progressive\[1\].img_size: resolution 40: .vit_s4nd_atto_patch16_224. does not take it"
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, _overrides(folder, tmp_path, *vit, 'train.progressive=[{epoch: 0, img_size: 32}, '
                                                             '{epoch: 1, img_size: 40}]'))
    assert 'multiples of the patch size' in str(info.value) and '\n' not in str(info.value)
    cfg = load_config(None, _overrides(folder, tmp_path, *vit, 'train.progressive=[{epoch: 0, img_size: 32}, '
                                                               '{epoch: 1, img_size: 48}]'))
    assert [s.img_size for s in cfg.train.progressive] == [32, 48]


def test_a_training_size_the_model_does_not_take_is_refused(folder, tmp_path):
    """data.img_size is checked as the progressive stages are (a timm ViT of dynamic_img_size: patch multiples), not
    by an AssertionError in timm's PatchEmbed at the first step; a ViT of one size is built for it and takes it."""
    vit = ['model.name=vit_tiny_patch16_224', 'model.kwargs={dynamic_img_size: true, depth: 1}']
    message = r"data.img_size: resolutions \[40\]: 'vit_tiny_patch16_224' takes multiples of its patch size 16x16"
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, _overrides(folder, tmp_path, *vit, 'data.img_size=40'))
    assert 'training: model.kwargs.dynamic_img_pad: true' in str(info.value)  # (the key to set here, not a flag)
    assert load_config(None, _overrides(folder, tmp_path, *vit, 'data.img_size=48')).data.img_size == 48
    fixed = load_config(None, _overrides(folder, tmp_path, 'model.name=vit_tiny_patch16_224', 'model.kwargs={depth: 1}',
                                         'data.img_size=40'))
    assert fixed.data.img_size == 40


def test_valid_values_from_timm_lists_pass(folder, tmp_path):
    cfg = load_config(None, _overrides(
        folder, tmp_path, 'optim.opt=lookahead_sgd', 'aug.auto_augment=rand-m9-mstd0.5-inc1',
        'data.interpolation=bicubic',
        'train.max_nonfinite_steps=0', "optim.lr='4e-3'"))
    assert cfg.optim.opt == 'lookahead_sgd' and cfg.optim.lr == 4e-3 and cfg.train.max_nonfinite_steps == 0
    for policy in ('original-mstd0.5', 'v0', 'augmix-m5-w4-d2', 'rand-m7-n3-mmax10'):
        assert load_config(None, _overrides(folder, tmp_path, f'aug.auto_augment={policy}')).aug.auto_augment == policy
    assert Config().train.max_nonfinite_steps >= 1  # a few stray non-finite steps are tolerated by default
    # Accelerate's spelling, read as YAML 1.2 (1.1 made an unquoted no the boolean False), on the command line and
    # in a file
    assert load_config(None, _overrides(folder, tmp_path, 'train.mixed_precision=no')).train.mixed_precision == 'no'
    (tmp_path / 'no.yaml').write_text('train:\n  mixed_precision: no\n  channels_last: true\n')
    cfg = load_config(str(tmp_path / 'no.yaml'), _overrides(folder, tmp_path))
    assert cfg.train.mixed_precision == 'no' and cfg.train.channels_last is True


def test_optimizers_keep_their_own_betas_and_eps_unless_set(folder, tmp_path):
    """As timm's train.py, optim.betas and optim.eps are passed only when set (AdamW's own are the values the
    shipped configs train with); a set value must fit the optimizer: Adan takes 3 betas, SGD none, Lion no eps."""
    for i, (extra, betas, eps) in enumerate((
            ((), (0.9, 0.999), 1e-8), (('optim.opt=lamb',), (0.9, 0.999), 1e-6),
            (('optim.opt=adan',), (0.98, 0.92, 0.99), 1e-8),
            (('optim.opt=adan', 'optim.betas=[0.9, 0.9, 0.9]', 'optim.eps=1e-6'), (0.9,) * 3, 1e-6))):
        group = Trainer(load_config(None, _overrides(folder, tmp_path / str(i), *extra))).optimizer.param_groups[0]
        assert (tuple(group['betas']), group['eps']) == (betas, eps), extra
    for extra, message in (
            (('optim.opt=adan', 'optim.betas=[0.9, 0.99]'),
             r'optim.betas must be null or 3 values in \[0, 1\) for optim.opt adan, got \[0.9, 0.99\]'),
            (('optim.opt=sgd', 'optim.betas=[0.9, 0.99]'), r'optim.betas must be null: optim.opt sgd takes no betas'),
            (('optim.opt=lion', 'optim.eps=1e-6'), r'optim.eps must be null: optim.opt lion takes no eps'),
            (('optim.opt=adahessian',), r"optim.opt must be a first-order optimizer: 'adahessian' needs second-order")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, _overrides(folder, tmp_path, *extra))


def test_configs_written_before_betas_and_eps_became_null_still_load_and_resume(folder, tmp_path):
    """A run's config.yaml from before holds AdamW's betas and eps whatever optim.opt: for an optimizer that takes
    none they never applied, and load as null; resuming such a run warns only of a real change."""
    from s4nd_vision.train.checkpoint import _compare_configs
    legacy = ('optim.betas=[0.9, 0.999]', 'optim.eps=1e-8')
    cfg = load_config(None, _overrides(folder, tmp_path, 'optim.opt=sgd', *legacy))
    assert cfg.optim.betas is None and cfg.optim.eps is None
    with pytest.raises(ConfigError, match='optim.betas must be null: optim.opt sgd takes no betas'):
        load_config(None, _overrides(folder, tmp_path, 'optim.opt=sgd', 'optim.betas=[0.9, 0.99]'))
    assert load_config(None, _overrides(folder, tmp_path, 'optim.opt=lion', *legacy)).optim.eps is None
    # an optimizer timm names by a string (bitsandbytes', not installed here) loads with them as set
    assert load_config(None, _overrides(folder, tmp_path, 'optim.opt=bnbadamw', *legacy)).optim.eps == 1e-8
    for opt, changed in (('adamw', []), ('sgd', []), ('lamb', ['optim.eps'])):  # (LAMB's own eps is 1e-6)
        old = config_to_dict(load_config(None, _overrides(folder, tmp_path, f'optim.opt={opt}')))
        old['optim'].update(betas=[0.9, 0.999], eps=1e-8)
        new = config_to_dict(load_config(None, _overrides(folder, tmp_path, f'optim.opt={opt}')))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            _compare_configs('ckpt', old, new)
        said = ' '.join(str(w.message) for w in caught)
        assert [k for k in ('optim.betas', 'optim.eps') if k in said] == changed, (opt, said)


def test_augmentations_mean_what_they_mean_in_timm(folder, tmp_path):
    """Random erasing fills with per-pixel noise by default, as timm's train.py (and the published recipes); a
    video RandAugment magnitude counts to 10 as timm's and pytorchvideo's: m9 rotates by up to 27 degrees."""
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'aug.reprob=0.25')))
    erasing = [t for t in trainer.data.transform(32, training=True).transforms if isinstance(t, RandomErasing)]
    assert len(erasing) == 1 and erasing[0].mode == 'pixel' and erasing[0].probability == 0.25

    clip = VideoTransform(train=True, num_frames=2, img_size=32, randaugment_magnitude=9)
    applied = [t for t in clip.transform.transforms if isinstance(t, v2.RandomApply)]
    assert len(applied) == 2 and all(t.p == 0.5 for t in applied)  # rand-m9-n2: two ops, each with p 0.5 as timm
    randaugment = applied[0].transforms[0]
    assert randaugment.num_ops == 1 and randaugment.interpolation == v2.InterpolationMode.BILINEAR
    magnitudes = randaugment._AUGMENTATION_SPACE['Rotate'][0](randaugment.num_magnitude_bins, 32, 32)
    assert magnitudes[randaugment.magnitude].item() == pytest.approx(27.0)
    with pytest.raises(ValueError, match=r'randaugment_magnitude must be in \[0, 10\]'):
        VideoTransform(train=True, num_frames=2, img_size=32, randaugment_magnitude=11)


def test_image_transforms_take_the_configs_interpolation_mean_and_std(folder, tmp_path):
    """data.interpolation, data.mean and data.std reach both the training and the evaluation transform (what the
    exported cfg then states); aug.no_aug trains on exactly the evaluation transform."""
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'data.interpolation=bicubic',
                                                   'data.mean=[0.1, 0.2, 0.3]', 'data.std=[0.4, 0.5, 0.6]')))
    for training in (True, False):
        transform = trainer.data.transform(32, training=training)
        resize, normalize = transform.transforms[0], transform.transforms[-1]
        assert 'interpolation=bicubic' in repr(resize), (training, transform)
        assert normalize.mean.tolist() == pytest.approx([0.1, 0.2, 0.3]), (training, transform)
        assert normalize.std.tolist() == pytest.approx([0.4, 0.5, 0.6]), (training, transform)
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'aug.no_aug=true')))
    assert repr(trainer.data.transform(32, training=True)) == repr(trainer.data.transform(32, training=False))


def test_randaugment_posterize_runs_on_current_pillow(folder, tmp_path):
    """timm's RandAugment asks posterize for 0 bits at magnitude 10 with inc1 (the ImageNet recipes' mstd draws
    reach it), which Pillow 11+ refuses: the training transform keeps Pillow 10's black image instead."""
    import random

    import numpy as np
    from PIL import Image
    from timm.data import auto_augment

    from s4nd_vision.data.transforms import posterize_any_bits
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path, 'aug.auto_augment=rand-m10-n3-inc1')))
    transform = trainer.data.transform(32, training=True)
    (randaugment,) = [t for t in transform.transforms if isinstance(t, auto_augment.RandAugment)]
    assert [op.aug_fn for op in randaugment.ops if op.name == 'PosterizeIncreasing'] == [posterize_any_bits]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    random.seed(0)
    for _ in range(200):  # (each op of 3 is posterize with p 1/15, applied with p 0.5: ~20 times)
        transform(img)
    assert not np.asarray(posterize_any_bits(img, 0)).any() and posterize_any_bits(img, 8) is img


def test_clip_randaugment_is_as_strong_as_timms_policy():
    """timm's rand-m9-n2 leaves about a quarter of the images as they are (each op with p 0.5; torchvision's own
    RandAugment applied every op: 1% unchanged); an unchanged clip keeps every frame."""
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (3, 2, 32, 32), dtype=torch.uint8)
    transform = VideoTransform(train=True, num_frames=2, img_size=32, crop_pct=1.0, randaugment_magnitude=9)
    steps = transform.transform.transforms
    transform.transform.transforms = [t for t in steps if not isinstance(t, v2.RandomHorizontalFlip)]
    plain = VideoTransform(train=False, num_frames=2, img_size=32, crop_pct=1.0)(frames)
    unchanged = sum(torch.equal(transform(frames), plain) for _ in range(200)) / 200
    assert 0.15 < unchanged < 0.5


def test_clip_interpolation_follows_the_data_config(tmp_path):
    """data.interpolation resizes clips (and is what the exported cfg then says); clips take torchvision's modes."""
    frames = torch.randint(0, 256, (3, 2, 40, 40), dtype=torch.uint8)
    bicubic = VideoTransform(train=False, num_frames=2, img_size=32, interpolation='bicubic')
    assert 'bicubic' in repr(bicubic).lower()
    assert not torch.equal(bicubic(frames), VideoTransform(train=False, num_frames=2, img_size=32)(frames))
    with pytest.raises(ValueError, match=r"interpolation must be one of \('bilinear', 'bicubic', 'nearest'\) for "
                                         r"clips, got 'lanczos'"):
        VideoTransform(train=False, num_frames=2, img_size=32, interpolation='lanczos')
    videos, splits = tmp_path / 'videos', tmp_path / 'splits'
    videos.mkdir(), splits.mkdir()
    with pytest.raises(ConfigError, match=r"data.interpolation must be null or one of .* for data.dataset hmdb51, "
                                          r"got 'lanczos'"):
        load_config(None, ['model.name=convnext_s4nd_3d_atto', 'data.dataset=hmdb51', f'data.root={videos}',
                           f'data.split_dir={splits}', 'data.interpolation=lanczos'])


def test_a_tracker_that_is_not_installed_is_refused(folder, tmp_path, monkeypatch):
    """Accelerate leaves a tracker of `log_with` that is not installed out with a debug message only: the run would
    log nothing to it (e.g. wandb on a fresh machine) without a word."""
    from accelerate.utils import LoggerType

    import s4nd_vision.train.trainer as trainer
    monkeypatch.setattr(trainer, 'get_available_trackers', lambda: [LoggerType.TENSORBOARD])
    with pytest.raises(ConfigError, match=r"train.trackers: \['wandb'\] not installed here \(installed: "
                                          r"\['tensorboard'\]\), so the run would log nothing there: pip install "
                                          r"wandb, or remove them from train.trackers"):
        Trainer(load_config(None, _overrides(folder, tmp_path, 'train.trackers=[tensorboard, wandb]')))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_image_data_refuses_video_and_sequence_models(folder, tmp_path):
    """Before any training (the mirror of hmdb51 refusing image models), not at the first forward."""
    with pytest.raises(ConfigError, match=r'model.name: convnext_s4nd_3d_atto takes video clips \(B, C, T, H, W\); '
                                          'data.dataset imagefolder holds images'):
        Trainer(load_config(None, _overrides(folder, tmp_path, 'model.name=convnext_s4nd_3d_atto')))
    with pytest.raises(ConfigError, match='model.name: s4nd_seq_atto is a sequence model; the trainer trains image '
                                          'and video models'):
        load_config(None, _overrides(folder, tmp_path, 'model.name=s4nd_seq_atto', 'model.kwargs={}'))


def test_malformed_yaml_file_is_one_line(tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text('model:\n  name: convnext_s4nd_atto\n  kwargs: {depths: [1, 1\noptim:\n  lr: 1e-3\n')
    with pytest.raises(ConfigError, match=r'bad.yaml is not valid YAML: .* at line \d+, column \d+$') as info:
        load_config(str(path))
    assert '\n' not in str(info.value)


def _cli(capsys, *args):
    """tools/train.py's main in this process: (exit status, stderr). (An error raised after the Trainer built its
    Accelerator leaves no accelerate state to the next call or test.)"""
    main = tool_main('train')
    try:
        with pytest.raises(SystemExit) as info:
            main(list(args))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return info.value.code, capsys.readouterr().err


def test_a_key_given_twice_is_an_error(tmp_path):
    """YAML forbids it; PyYAML would keep the last: the first `optim:` section would be silently dropped."""
    path = tmp_path / 'twice.yaml'
    path.write_text('optim:\n  lr: 5.0e-3\ndata:\n  batch_size: 4\noptim:\n  ssm_lr: 1.0e-4\n')
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML: found the key 'optim' twice at line 5") \
            as info:
        load_config(str(path))
    assert '\n' not in str(info.value)
    path.write_text('optim:\n  lr: 5.0e-3\ndata:\n  batch_size: 4\n  batch_size: 64\n')
    with pytest.raises(ConfigError, match=r"found the key 'batch_size' twice at line 5"):
        load_config(str(path))



def test_a_key_that_is_no_name_is_an_unknown_key(tmp_path):
    """YAML reads `1:` and `null:` as a number and null: a TypeError from the did-you-mean lookup before."""
    path = tmp_path / 'keys.yaml'
    for text, key in [('optim:\n  1: 2\n', "'optim.1'"), ('null: 2\n', 'None'),
                      ('optim:\n  null: 2\n', "'optim.None'")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf'unknown config key {key}; known keys here: '):
            load_config(str(path))


def test_a_section_override_keeps_the_sections_other_keys(folder):
    """`optim={lr: 2e-3}` sets optim.lr as `optim.lr=2e-3` does (Hydra merges too): replacing the section would reset
    the file's lr_base_batch and ssm_lr to their defaults, an unscaled lr and the SSM parameters at the full lr."""
    cfg = load_config('imagenet/convnext_s4nd_tiny.yaml',
                      [f'data.root={folder}', 'optim={lr: 2.0e-3, weight_decay: 0.1}', 'model={drop_path_rate: 0.2}'])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (2e-3, 0.1)
    assert (cfg.optim.lr_base_batch, cfg.optim.ssm_lr) == (4096, 1e-3)
    assert (cfg.model.name, cfg.model.drop_path_rate) == ('convnext_s4nd_tiny', 0.2)
    # a mapping-valued key is still replaced whole: model.kwargs={} clears the kwargs
    cfg = load_config(None, [*_overrides(folder, 'out'), 'model={kwargs: {}, name: convnext_s4nd_atto}'])
    assert cfg.model.kwargs == {}

def test_a_leading_tilde_in_a_path_is_the_home_folder(folder, tmp_path, monkeypatch):
    """The shell leaves the ~ of `data.root=~/imagenet` as is (`data.root` is no variable name): the data was 'not an
    existing folder' and `train.output_dir=~/runs/x` trained into a folder named '~' in the working folder."""
    home, name = os.path.split(folder)
    monkeypatch.setenv('HOME', home)
    cfg = load_config(None, [*_overrides(folder, tmp_path), f'data.root=~/{name}', 'train.output_dir=~/runs/x',
                             'model.pretrained_file=~/w.safetensors'])
    assert cfg.data.root == folder
    assert cfg.train.output_dir == os.path.join(home, 'runs', 'x')
    assert cfg.model.pretrained_file == os.path.join(home, 'w.safetensors')
    # (--config=~/run.yaml: the shell leaves that ~ too)
    with open(os.path.join(home, 'run.yaml'), 'w') as f:
        f.write('train:\n  epochs: 7\n')
    assert load_config('~/run.yaml', _overrides(folder, tmp_path)).train.epochs == 7

def test_a_config_file_is_read_as_utf8_whatever_the_locale(folder, tmp_path):
    """YAML files are UTF-8: read in the locale's encoding (Windows' cp1252, here a C locale's ASCII), a config
    naming a folder such as runs/Données failed to load, or named another folder; a byte-order mark (Windows
    Notepad's) is no part of the first key."""
    import subprocess
    import sys
    path = tmp_path / 'run.yaml'
    path.write_bytes('\ufeff# ConvNeXt-S4ND \u2014 tiny\nmodel:\n  name: convnext_s4nd_atto\ntrain:\n'
                     '  output_dir: runs/Donn\u00e9es\n'.encode('utf-8'))
    env = dict(os.environ, LC_ALL='C', LANG='C', PYTHONUTF8='0', PYTHONCOERCECLOCALE='0')
    read = subprocess.run(
        [sys.executable, '-c', 'import sys; from s4nd_vision.train.config import load_config; '
         'print(ascii(load_config(sys.argv[1], [sys.argv[2]]).train.output_dir))', str(path), f'data.root={folder}'],
        env=env, capture_output=True, text=True)
    assert read.stdout.strip() == ascii('runs/Donn\u00e9es'), read.stderr[-2000:]


def test_the_written_config_reads_back_as_the_config(folder, tmp_path):
    """A run's config.yaml (which --resume compares and the zero-shot study reloads) is the run's Config: a YAML 1.1
    writer left the string '1e3' plain, which YAML 1.2 reads as 1000.0 (train.output_dir must be str)."""
    from s4nd_vision.train.metrics import MetricsLog
    cfg = load_config(None, [*_overrides(folder, tmp_path), "train.output_dir='1e3'", "train.tracker_project='0o17'",
                             'train.mixed_precision=no', 'optim.betas=[0.9, 0.95]', 'sched.min_lr=1e-7'])
    MetricsLog(None, cfg)._write_config(str(tmp_path))
    assert load_config(str(tmp_path / 'config.yaml')) == cfg
    # (other YAML readers read it alike)
    with open(tmp_path / 'config.yaml') as f:
        assert yaml.safe_load(f)['train']['output_dir'] == '1e3'

def test_cli_reports_yaml_and_value_errors_on_one_line(tmp_path, folder, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('optim: {lr: [1\n')
    for args, message in (
            (['--config', str(bad)], 'is not valid YAML'),
            (_overrides(folder, tmp_path, 'optim.lr=[1'), "override 'optim.lr=[1': the value is not valid YAML"),
            (_overrides(folder, tmp_path, 'optim.opt=adamww'), "optim.opt must be a timm optimizer"),
            # (CUDA-only; without CUDA or APEX timm's factory raises)
            (_overrides(folder, tmp_path, 'optim.opt=fusedadam'), "optim.opt 'fusedadam' cannot be created here")):
        code, err = _cli(capsys, *args)
        assert code == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], err[-2000:]



# ------------------------------------------------------------------------------------------- tools/inflate.py

def _inflate(capsys, *args):
    """tools/inflate.py's main in this process: (exit status, stderr)."""
    main = tool_main('inflate')
    with pytest.raises(SystemExit) as info:
        main([*args, '--model', 'convnext_s4nd_3d_atto'])
    return info.value.code, capsys.readouterr().err


def test_inflate_cli_names_a_missing_or_wrong_source(tmp_path, capsys):
    import torch

    (tmp_path / 'config.yaml').write_text('model:\n  name: convnext_s4nd_tiny\n')
    (tmp_path / 'metrics.csv').write_text('epoch,top1\n0,50.0\n')
    torch.save({'state_dict': {'w': torch.zeros(2)}}, tmp_path / 'good.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'good.pth').read_bytes()[:200])
    out = str(tmp_path / 'out.safetensors')
    for name, message in (
            ('missing.pth', "checkpoint '{}' does not exist"),
            ('config.yaml', "checkpoint '{}' is neither a safetensors file nor a torch.save file (it starts with "
                            "b'model:"),
            ('metrics.csv', "checkpoint '{}' is neither a safetensors file nor a torch.save file"),
            ('cut.pth', "checkpoint '{}' is a damaged torch.save file")):
        path = str(tmp_path / name)
        code, err = _inflate(capsys, path, out)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), err
        assert message.format(path) in lines[0], err
        assert 'weights_only' not in err
    # a readable torch file that is not a 2D ConvNeXt: the existing check, now on one line too
    code, err = _inflate(capsys, str(tmp_path / 'good.pth'), out)
    assert code == 2
    assert err.strip() == 'error: state_dict is not a 2D ConvNeXt(-S4ND) state dict (no 4-D stem.0.weight)'
    assert not os.path.exists(out)


def test_inflate_cli_creates_the_output_folder_and_refuses_a_folder_as_output(tmp_path, capsys, caplog):
    import timm
    from safetensors.torch import save_file

    import s4nd_vision  # noqa: F401
    source = str(tmp_path / '2d.safetensors')
    save_file(timm.create_model('convnext_s4nd_atto').state_dict(), source)
    code, err = _inflate(capsys, source, str(tmp_path))
    assert code == 2 and err.strip() == f"error: dst '{tmp_path}' is a folder: give the safetensors file to write"
    saved = open(source, 'rb').read()  # the source as the output (a typo): refused, the 2D weights kept
    code, err = _inflate(capsys, source, os.path.join(str(tmp_path), '.', '2d.safetensors'))
    assert code == 2 and 'is the 2D checkpoint src: give another file' in err and open(source, 'rb').read() == saved
    out = tmp_path / 'new' / 'folder' / '3d.safetensors'
    main = tool_main('inflate')
    main([source, str(out), '--model', 'convnext_s4nd_3d_atto'])
    captured = capsys.readouterr()
    assert os.listdir(out.parent) == ['3d.safetensors'] and f'to {out}' in captured.out  # (no temporary file left)
    assert 'from 2D weights (inflated): loaded' in caplog.text  # the transfer report: the command shows INFO
    timm.create_model('convnext_s4nd_3d_atto', pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))


def test_data_keys_the_dataset_does_not_read_are_refused(folder, tmp_path):
    """data.root with data.dataset mnist trained on the built-in MNIST-5k, not on that folder, without a word; so were
    a video setting for images and the image-folder splits for MNIST or clips ignored."""
    mnist = ['model.name=s4nd_iso_tiny', 'data.dataset=mnist', f'train.output_dir={tmp_path}']
    for override, message in [
            (f'data.root={folder}', r"data.root must be left at null for data.dataset mnist, which does not read it "
                                    r"\(data.dataset imagefolder and hmdb51 only; mnist is built in\), got '.*'$"),
            ('data.val_split=test', r"data.val_split must be left at 'val' for data.dataset mnist, .*got 'test'$"),
            ('data.num_frames=8', r'data.num_frames must be left at 16 for data.dataset mnist, which does not read '
                                  r'it \(data.dataset hmdb51 only; .*got 8$')]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*mnist, override])
    with pytest.raises(ConfigError, match=r'data.clips_per_video must be left at 1 for data.dataset imagefolder, '
                                          r'which does not read it \(data.dataset hmdb51 only\), got 4$'):
        load_config(None, _overrides(folder, tmp_path, 'data.clips_per_video=4'))
    # (MNIST's note where the dataset is MNIST only: it was said to hmdb51 and imagefolder too)
    video = ['model.name=convnext_s4nd_3d_atto', 'data.dataset=hmdb51', f'data.root={folder}']
    with pytest.raises(ConfigError, match=r"data.val_split must be left at 'val' for data.dataset hmdb51, which does "
                                          r"not read it \(data.dataset imagefolder only\), got 'test'$"):
        load_config(None, [*video, f'train.output_dir={tmp_path}', 'data.val_split=test'])
    assert load_config(None, _overrides(folder, tmp_path, 'data.clip_duration=2')).data.clip_duration == 2.0


def test_mnist_refuses_image_augmentation_it_would_ignore(tmp_path):
    """MNIST-5k's digits get the same resize in training and evaluation: RandAugment, crops, flips, jitter and
    random erasing would be silently dropped, so setting them is an error; Mixup/CutMix and smoothing apply."""
    base = ['model.name=s4nd_iso_tiny', 'data.dataset=mnist', f'train.output_dir={tmp_path}']
    for key, value in (('auto_augment', 'rand-m9-mstd0.5-inc1'), ('reprob', '0.25'), ('hflip', '0.0'),
                       ('scale', '[0.5, 1.0]'), ('color_jitter', '0.0'), ('remode', 'const')):
        with pytest.raises(ConfigError, match=rf'aug.{key} must be left at .* for data.dataset mnist, which applies '
                                              r'no image augmentation'):
            load_config(None, [*base, f'aug.{key}={value}'])
    cfg = load_config(None, [*base, 'aug.mixup=0.2', 'aug.smoothing=0.1', 'aug.no_aug=true'])
    assert cfg.aug.mixup == 0.2
    # nor is there a crop: crop_pct other than 1.0 would be ignored, and the weights' cfg says 1.0 (what ran)
    with pytest.raises(ConfigError, match=r'data.crop_pct must be null or 1.0 for data.dataset mnist'):
        load_config(None, [*base, 'data.crop_pct=0.5'])
    trainer = Trainer(load_config(None, [*base, 'data.img_size=14']))
    assert trainer.registered_cfg['crop_pct'] != 1.0
    assert trainer.data.data_config['crop_pct'] == trainer.model.pretrained_cfg['crop_pct'] == 1.0


def test_ssm_lr_for_a_model_without_ssm_parameters_is_warned_about(folder, tmp_path):
    """optim.ssm_lr set for a model with neither SSM parameters nor SGConv sub-kernels (timm's ConvNeXt, the
    baseline) went to no parameter group without a word: a warning names the key (not an error: the demo trains its
    conv twin with the S4ND model's config); S4ND's SSM kernels and SGConv's take it without one."""
    baseline = ['model.name=convnext_tiny', 'model.kwargs={depths: [1, 1, 1, 1], dims: [8, 16, 16, 16]}']
    with pytest.warns(UserWarning, match=r'optim.ssm_lr \(0.001\) applies to nothing: convnext_tiny has no SSM'):
        load_config(None, _overrides(folder, tmp_path, *baseline, 'optim.ssm_lr=1e-3'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_config(None, _overrides(folder, tmp_path, *baseline))
        load_config(None, _overrides(folder, tmp_path, 'optim.ssm_lr=1e-3'))
        load_config(None, _overrides(folder, tmp_path, 'optim.ssm_lr=1e-3', 'model.kwargs={depths: [1, 1, 1, 1], '
                                     'dims: [8, 16, 16, 16], stem_chs: 8, kernel: sgconv}'))


def test_the_ssm_lr_warning_comes_from_the_first_process_only(folder, tmp_path, monkeypatch):
    """Every process of a launched run loads the config: the warning that optim.ssm_lr applies to nothing comes once,
    from the process of RANK 0 (or an unlaunched one), not once per process."""
    args = _overrides(folder, tmp_path, 'model.name=convnext_tiny', 'optim.ssm_lr=1e-3',
                      'model.kwargs={depths: [1, 1, 1, 1], dims: [8, 16, 16, 16]}')
    monkeypatch.setenv('RANK', '0')
    with pytest.warns(UserWarning, match='applies to nothing'):
        load_config(None, args)
    monkeypatch.setenv('RANK', '1')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_config(None, args)


def test_the_latest_progressive_stage_and_band_limit_are_in_force(folder, tmp_path):
    """Each epoch trains at the size of the latest stage that has started, and under the latest band-limit a stage up
    to it gave (a stage without one keeps the earlier one in force)."""
    stages = ('[{epoch: 0, img_size: 32, bandlimit: 0.5}, {epoch: 2, img_size: 48}, '
              '{epoch: 4, img_size: 64, bandlimit: 0.8}]')
    cfg = load_config(None, _overrides(folder, tmp_path / 'run', 'train.epochs=6', f'train.progressive={stages}'))
    assert [cfg.stage_at(e).img_size for e in range(6)] == [32, 32, 48, 48, 64, 64]
    assert [cfg.bandlimit_at(e) for e in range(6)] == [0.5, 0.5, 0.5, 0.5, 0.8, 0.8]


def test_mixup_and_cutmix_settings_reach_timms_mixup(folder, tmp_path):
    """aug.mixup / aug.cutmix / mixup_prob / mixup_switch_prob / smoothing are passed to timm's Mixup as its
    mixup_alpha / cutmix_alpha / mix_prob / switch_prob / label_smoothing (distinct values: a swap shows)."""
    trainer = Trainer(load_config(None, _overrides(
        folder, tmp_path / 'run', 'aug.mixup=0.3', 'aug.cutmix=0.7', 'aug.mixup_prob=0.6', 'aug.mixup_switch_prob=0.2',
        'aug.smoothing=0.05')))
    m = trainer.mixup
    assert (m.mixup_alpha, m.cutmix_alpha, m.mix_prob, m.switch_prob, m.label_smoothing) == (0.3, 0.7, 0.6, 0.2, 0.05)
