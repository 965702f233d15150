"""Sharing weights through timm's Hugging Face Hub format, with a model card that says how to load them.

timm has no plugin mechanism: `timm.create_model('hf-hub:USER/REPO', pretrained=True)` and
`timm.create_model('local-dir:PATH', pretrained=True)` find our architectures only after `import s4nd_vision`,
and end in "Unknown model" without it. Whoever loads a shared model must learn that from what was shared:

- config.json: every pretrained_cfg of ours carries `notes` (install and import this package) and `origin_url`
  (the S4ND authors' research code), so timm's own `save_for_hf` / `push_to_hf_hub` write them there.
- README.md: timm's card (`generate_readme`) is built from the `model_card` argument alone, never from the
  pretrained_cfg. `model_card(model, repo_id)` gives one with a usage section (pip install, import, load),
  the papers and the credit; `save_for_hf` / `push_to_hub` here are timm's with that card. A user of timm's own
  `timm.models.push_to_hf_hub` passes it: `push_to_hf_hub(model, repo_id, model_card=model_card(model, repo_id))`.
"""
import contextlib
import json
import os
import tempfile
from typing import Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..layers import S4ND
from ..models._base import S4_ID, S4ND_ID, SGCONV_ID
from ..models._checks import check_img_size
from ..utils.files import replaced_atomically

__all__ = ['PACKAGE', 'CITATIONS', 'model_card', 'save_for_hf', 'push_to_hub']

PACKAGE = 's4nd-vision'  # the pip distribution; the import name is s4nd_vision
ORIGINAL_CODE = 'https://github.com/state-spaces/s4'

# BibTeX by the `paper_ids` of a pretrained_cfg; the S4ND entry is cited by every card
CITATIONS = {
    S4ND_ID: """@inproceedings{nguyen2022s4nd,
  title={S4ND: Modeling Images and Videos as Multidimensional Signals with State Spaces},
  author={Nguyen, Eric and Goel, Karan and Gu, Albert and Downs, Gordon W. and Shah, Preey and Dao, Tri and
          Baccus, Stephen A. and R{\\'e}, Christopher},
  booktitle={Advances in Neural Information Processing Systems},
  volume={35},
  year={2022}
}""",
    S4_ID: """@inproceedings{gu2022efficiently,
  title={Efficiently Modeling Long Sequences with Structured State Spaces},
  author={Gu, Albert and Goel, Karan and R{\\'e}, Christopher},
  booktitle={International Conference on Learning Representations},
  year={2022}
}""",
    SGCONV_ID: """@inproceedings{li2023sgconv,
  title={What Makes Convolutional Models Great on Long Sequence Modeling?},
  author={Li, Yuhong and Cai, Tianle and Zhang, Yi and Chen, Deming and Dey, Debadeepta},
  booktitle={International Conference on Learning Representations},
  year={2023}
}""",
}
# by the number of axes of the pretrained_cfg's pool_size (the final feature grid)
_MODEL_TYPES = {1: 'Sequence classification / feature backbone', 2: 'Image classification / feature backbone',
                3: 'Video classification / feature backbone'}
TASKS = {1: 'other', 2: 'image-classification', 3: 'video-classification'}  # the Hub's pipeline_tag
# what to feed the model, and the command that evaluates it, by axes
_INPUT = {
    1: """with torch.no_grad():
    logits = model(x)  # x: (B, C, L) sequences of any length (the native one: data_config['input_size'])""",
    2: """transform = timm.data.create_transform(**data_config, is_training=False)

with torch.no_grad():
    logits = model(transform(img).unsqueeze(0))  # img: a PIL image""",
    3: """with torch.no_grad():  # clips: (B, C, T, H, W), frames normalized with data_config['mean'] / ['std']
    logits = model(clips)""",
}


def _axes(model: nn.Module) -> int:
    """Input axes of `model` (1 sequence, 2 image, 3 video): those of its final feature grid, `pool_size`."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return len(cfg.get('pool_size') or (0, 0))


def _usage(repo_id: Optional[str], axes: int) -> str:
    source = f'hf-hub:{repo_id}' if repo_id else 'local-dir:/path/to/this/folder'
    # (images only: `eval-resolution` evaluates image folders; the sentence must stand alone for the other models)
    command = (f"The library's `s4nd-vision` command imports it itself (`s4nd-vision eval-resolution --models {source} "
               "...`); timm's own `train.py` / `validate.py` scripts do not." if axes == 2 else
               "timm's own `train.py` / `validate.py` scripts do not import it.")
    return f"""The architecture is defined by the [{PACKAGE}](https://pypi.org/project/{PACKAGE}/) library, not by
timm itself: timm has no plugin mechanism, so install the library and `import s4nd_vision` before
`timm.create_model` (without the import, timm ends in "Unknown model").

```bash
pip install {PACKAGE}
```

```python
import timm
import torch

import s4nd_vision  # registers the S4ND models with timm

model = timm.create_model('{source}', pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
{_INPUT.get(axes, _INPUT[2])}
```

{command}
"""


def model_card(model: nn.Module, repo_id: Optional[str] = None, **overrides) -> dict:
    """A timm `model_card` dict (timm's `generate_readme` keys: description, details, usage, citation, ...) for
    one of our models: which library to install and import, the papers, the original code.

    Args:
        model: a model of this package, as built by `timm.create_model`.
        repo_id: the Hub repository (USER/REPO) the usage example loads from; None: a local folder.
        **overrides: card keys replacing ours; `details` entries are merged into ours.
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('architecture') or type(model).__name__
    ids = cfg.get('paper_ids') or ()
    ids = [ids] if isinstance(ids, str) else list(ids)
    kernels = {m.kernel for m in model.modules() if isinstance(m, S4ND)}  # (none: a baseline)
    if 'sgconv' in kernels and SGCONV_ID not in ids:  # (built with kernel='sgconv', whatever the registry name)
        ids.append(SGCONV_ID)
    papers = ([cfg['paper_name']] if cfg.get('paper_name') else []) + [
        f'https://arxiv.org/abs/{i.split(":")[-1]}' for i in ids]
    details = {
        'Model Type': _MODEL_TYPES.get(_axes(model), _MODEL_TYPES[2]),
        'Architecture': f'`{name}`',
        'Library': f'{PACKAGE} (`pip install {PACKAGE}`, then `import s4nd_vision` before `timm.create_model`)',
        'Model Stats': {'Params (M)': round(sum(p.numel() for p in model.parameters()) / 1e6, 2)},
    }
    if cfg.get('input_size'):  # the native size (`img_size=` / `set_input_size`); other sizes run too
        details['Model Stats']['Input size'] = ' x '.join(str(s) for s in cfg['input_size'][1:])
    if papers:
        details['Papers'] = papers
    details['Original'] = f'{cfg.get("origin_url") or ORIGINAL_CODE} (the research code of the S4ND authors)'
    what = ('an S4ND model (multidimensional state-space global convolutions)' if kernels else
            'a baseline without S4ND layers (the convolutional counterpart of an S4ND model)')
    card = dict(
        description=(f'`{name}`: {what} of the {PACKAGE} library for timm, an independent implementation of the '
                     'S4ND architecture. Loading it needs `import s4nd_vision` first (see Model Usage).'),
        details=details,
        usage=_usage(repo_id, _axes(model)),
        citation=[CITATIONS[i] for i in dict.fromkeys([S4ND_ID, *ids]) if i in CITATIONS],
        tags=[TASKS.get(_axes(model), TASKS[2]), 'timm', PACKAGE, 's4nd', 'state-space-model'],
        license=cfg.get('license') or 'apache-2.0',
    )
    extra = dict(overrides)
    if 'details' in extra:
        card['details'] = {**details, **extra.pop('details')}
    card.update(extra)
    return card


_card = model_card  # the wrappers below take timm's `model_card` argument (the overrides) under that name


def save_for_hf(
        model: nn.Module,
        save_directory: str,
        repo_id: Optional[str] = None,
        model_card: Optional[dict] = None,
        task_name: Optional[str] = None,
        **kwargs,
) -> str:
    """timm's `save_for_hf` (weights and config.json; `kwargs`: model_config, model_args, safe_serialization,
    data_config) plus the README.md model card of `model_card(model, repo_id, **model_card)`. `task_name`: the
    Hub's pipeline_tag (None: image- or video-classification, or other for sequences, by the model's input).

    A `data_config` input size (input_size (C, *sizes), or img_size: (H, W), a video model keeping its frames) is
    saved, in config.json and the card, as the model's native size (`set_input_size` for the save, then restored):
    our models restate their pretrained_cfg's input size from their arguments on load, and keep their function at
    any native size.

    The files are written in a temporary folder inside `save_directory`, then moved out into it, config.json last: an
    interrupted or failed save leaves its files as they were (not new weights beside an earlier save's config.json,
    which would build the model at that save's native size). An earlier save's weights in the other format are
    removed (timm loads model.safetensors before pytorch_model.bin: the folder would load the earlier weights).

    Returns:
        the README.md path.
    """
    from timm.models import save_for_hf as timm_save_for_hf
    from timm.models._hub import generate_readme  # the card push_to_hf_hub writes
    # a torch.compile'd model saves the model it wraps (timm's save fails on the wrapper, whose state dict's keys
    # carry an '_orig_mod.' prefix)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    os.makedirs(save_directory, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='.saving-', dir=save_directory) as tmp:
        with _native_size(model, kwargs.pop('data_config', None)) as data_config:
            timm_save_for_hf(model, tmp, data_config=data_config, **kwargs)
            _state_clip_or_sequence_size(model, os.path.join(tmp, 'config.json'))
            card = _card(model, repo_id, **(model_card or {}))  # (at the saved native size, as config.json)
        name = repo_id.split('/')[-1] if repo_id else model.pretrained_cfg.get('architecture') or type(model).__name__
        with open(os.path.join(tmp, 'README.md'), 'w', encoding='utf-8') as f:
            f.write(generate_readme(card, name, task_name=task_name or TASKS.get(_axes(model), TASKS[2])))
        written = sorted(os.listdir(tmp), key=lambda n: n == 'config.json')
        for stale in _stale_weights(written):  # (before the moves: never this save's config beside earlier weights)
            path = os.path.join(save_directory, stale)
            if os.path.isfile(path):
                os.remove(path)
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(save_directory, name))
    return os.path.join(save_directory, 'README.md')


def _stale_weights(written: Iterable[str]) -> List[str]:
    """The weights files of timm's Hub format (model.safetensors, pytorch_model.bin) that a save which wrote the
    files `written` did not write: an earlier save's in the other format, which timm would load instead
    (model.safetensors before pytorch_model.bin, locally and from the Hub) or beside them."""
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    return [name for name in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME) if name not in written]


def _set_native_size(model: nn.Module, sizes: Tuple[int, ...]) -> None:
    """`set_input_size` of a sequence (L,), image (H, W) or video (T, H, W) model."""
    axes = len(model.pretrained_cfg['input_size']) - 1
    if len(sizes) != axes:
        raise ValueError(f'data_config: {type(model).__name__} takes {axes} input axes, got sizes {sizes}')
    if axes == 1:
        model.set_input_size(seq_len=sizes[0])
    elif axes == 3:
        model.set_input_size(img_size=sizes[1:], num_frames=sizes[0])
    else:
        model.set_input_size(img_size=sizes)


@contextlib.contextmanager
def _native_size(model: nn.Module, data_config: Optional[dict]) -> Iterator[Optional[dict]]:
    """`data_config` without its input size, with that size the model's native one until the context exits."""
    config = dict(data_config or {})
    size, img_size = config.pop('input_size', None), config.pop('img_size', None)
    if size is None and img_size is None:
        yield config or None
        return
    if size is not None and size[0] != model.in_chans:
        raise ValueError(f'data_config: input_size {tuple(size)} states {size[0]} channels, the model takes '
                         f'{model.in_chans}')
    before = tuple(model.pretrained_cfg['input_size'][1:])
    if size is not None:
        sizes = tuple(size[1:])
    elif len(before) == 1:
        raise ValueError(f'data_config: img_size does not apply to the sequence model {type(model).__name__}: '
                         'give input_size=(C, L)')
    else:  # (an image size, (H, W); a video model keeps its frames)
        sizes = (*before[:-2], *check_img_size(img_size))
    _set_native_size(model, sizes)
    try:
        yield config or None
    finally:
        _set_native_size(model, before)


def _state_clip_or_sequence_size(model: nn.Module, config_path: str) -> None:
    """timm's config.json states an image input, (C, H, W), and drops the `pool_size` of any other: for our video
    (C, T, H, W) and sequence (C, L) models write the sizes their pretrained_cfg states, with the channels of the
    saved weights."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size')
    if not size or len(size) == 3:
        return
    with open(config_path, encoding='utf-8') as f:
        config = json.load(f)
    config['pretrained_cfg'].update(input_size=[model.in_chans, *size[1:]], pool_size=list(cfg['pool_size']))
    with replaced_atomically(config_path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        json.dump(config, f, indent=2)


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        model_card: Optional[dict] = None,
        commit_message: str = 'Add model',
        token: Optional[str] = None,
        revision: Optional[str] = None,
        private: bool = False,
        create_pr: bool = False,
        task_name: Optional[str] = None,
        safe_serialization='both',
        **kwargs,
):
    """timm's `push_to_hf_hub`, with the folder of `save_for_hf` above: its config.json states video and sequence
    sizes, and its model card is `model_card(model, repo_id, **model_card)`, written only where the repository
    has no README yet (as timm does). The repository's weights in a format not pushed now are deleted in the same
    commit (`safe_serialization=False` after a push with safetensors: timm would load the earlier
    model.safetensors). `kwargs`: `save_for_hf`'s (model_config, model_args, data_config)."""
    from huggingface_hub import HfApi
    from timm import __version__
    api = HfApi(token=token, library_name='timm', library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    has_readme = api.file_exists(repo_id=repo_id, filename='README.md', revision=revision)
    with tempfile.TemporaryDirectory() as folder:
        readme = save_for_hf(model, folder, repo_id=repo_id, model_card=model_card, task_name=task_name,
                             safe_serialization=safe_serialization, **kwargs)
        if has_readme:
            os.remove(readme)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message, delete_patterns=_stale_weights(os.listdir(folder)))
