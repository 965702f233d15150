"""A short smoke run: build ConvNeXt-S4ND-T (or another image or video model) through timm and run it at several
resolutions.

The weights are untrained (random); this checks the install, the timm registration and the
resolution control, and prints the time of each forward pass.
"""
import time
from typing import Mapping, Optional, Sequence

import timm
import torch

import s4nd_vision  # noqa: F401  (registers the models with timm)
from s4nd_vision.eval.resolution import check_resolutions


def run(model_name: str = 'convnext_s4nd_tiny', resolutions: Sequence[int] = (224, 288), batch_size: int = 2,
        model_kwargs: Optional[Mapping] = None) -> None:
    """Build `model_name` and run it on a batch of random inputs at every side in `resolutions`: images, or clips of
    the model's frames (their shape from its pretrained_cfg's input_size, as `flops` builds them). ValueError for a
    model that takes no such inputs (a sequence model, or one built for one image size only) and for a side below
    the model's minimum (`eval.resolution.check_resolutions`)."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, **dict(model_kwargs or {})).eval()
    layout = model.pretrained_cfg.get('input_size', (3, 224, 224))  # (C, H, W), (C, T, H, W) or (C, L)
    if getattr(model, 'dynamic_img_size', True) is False:  # (timm's ViTs: a patch grid of one size)
        raise ValueError(f'{model_name} takes {layout[-2]}x{layout[-1]} images only (built with '
                         f'dynamic_img_size=False): build it for any size, --model {model_name},dynamic_img_size=True')
    check_resolutions(resolutions, {model_name: model})  # (a timm baseline's conv would fail deeper, less clearly)
    n_params = sum(p.numel() for p in model.parameters())
    print(f'{model_name}: {n_params / 1e6:.2f}M parameters, trained input size {"x".join(map(str, layout[1:]))}')
    for size in resolutions:
        x = torch.randn(batch_size, getattr(model, 'in_chans', layout[0]), *layout[1:-2], size, size)
        with torch.inference_mode():
            model(x)  # warm-up
            start = time.perf_counter()
            features = model.forward_features(x)
            logits = model.forward_head(features)
            elapsed = time.perf_counter() - start
        print(f'  input {tuple(x.shape)} -> features {tuple(features.shape)} -> logits {tuple(logits.shape)}'
              f'  {elapsed * 1e3:.0f} ms ({batch_size / elapsed:.1f} img/s, {torch.get_num_threads()} threads)')
    print('ok: the same weights ran at every resolution (S4ND kernels follow the input grid)')
