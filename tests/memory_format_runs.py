"""A short run with `train.channels_last` off and on, for the image and the video trainer tests."""
from typing import Callable, Sequence

import torch
from accelerate.state import AcceleratorState, GradientState

from s4nd_vision.train import Trainer, load_config


def train_in_both_memory_formats(out, overrides: Callable[..., Sequence[str]], fmt: torch.memory_format) -> None:
    """Two updates (SGD) and an evaluation of `overrides(out_dir, *extra)` with train.channels_last off and on:
    with it on, every batch reaches the model in `fmt` memory (training and evaluation) and the conv weights are
    in it; on the CPU both runs end with the same weights and metrics."""
    runs = {}
    for flag in ('false', 'true'):
        cfg = load_config(None, overrides(out / flag, 'train.epochs=1', 'train.max_steps_per_epoch=2', 'optim.opt=sgd',
                                          f'train.channels_last={flag}'))
        trainer = Trainer(cfg)
        model = trainer.accelerator.unwrap_model(trainer.model)
        seen = []
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=fmt)))
        trainer.fit()
        header, *rows = (out / flag / 'metrics.csv').read_text().splitlines()
        metrics = {k: float(v) for k, v in zip(header.split(','), rows[-1].split(',')) if 'loss' in k or 'top' in k}
        runs[flag] = model.state_dict(), metrics, seen, model
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    (weights, metrics, seen, _), (weights_cl, metrics_cl, seen_cl, model_cl) = runs['false'], runs['true']
    assert len(seen_cl) == len(seen) > 2 and all(seen_cl) and not any(seen)
    convs = [m.weight for m in model_cl.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert all(w.is_contiguous(memory_format=fmt) for w in convs)
    assert metrics.keys() == metrics_cl.keys() and len(metrics) >= 2
    for k, v in metrics.items():
        assert abs(metrics_cl[k] - v) <= 1e-4 * max(1.0, abs(v)), k
    for k, v in weights.items():
        torch.testing.assert_close(weights_cl[k], v, rtol=1e-4, atol=1e-6, msg=k)
