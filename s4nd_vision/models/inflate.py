"""Temporal inflation: the weights of a 2D model as those of its 3D (video) counterpart.

A state dict of a 2D model (`convnext_s4nd_*`, or timm's `convnext_*` for the `convnext_3d_*`
baseline) maps onto a 3D model (`convnext_s4nd_3d_*`, `convnext_3d_*`) name for name:

* S4ND layers: the 2D kernels (`kernels.0` = H, `kernels.1` = W) become the 3D H and W kernels
  (`kernels.1`, `kernels.2`), `D` is kept, and the time kernel (`kernels.0`) gets its own
  initialization (`time_init`).
* Convs gain the 3D kernel's time axis: the 2D weight repeated along time and divided by its
  length (`conv_mode='repeat'`), or put on the centre tap `T // 2` (`'center'`). 1x1 convs
  (timm's conv-MLP layout) fold into the Linear layers of the same name (`pointwise_reshape`, as in
  the 2D models' transfer from timm).
* The classifier `head.fc` is dropped unless `keep_head` (the 3D model then keeps its own).

A one-line report of what was copied, reshaped, inflated and initialized is logged (`TransferReport`).

Static clips. S4ND's kernel per channel is sum_r K_T^r (x) K_H^r (x) K_W^r, plus D x. With the
same time kernel K_T in every rank-1 term r (as inflated), the convolution term at frame t of a
clip that repeats one frame is s(t) times the 2D term, where s(t) is the sum of the time taps
that land inside the clip, and the D term is unchanged. So the 3D model reproduces the 2D model
on every frame exactly when s(t) = 1 everywhere:

* `time_init='identity'`: a pass-through time kernel (1 at offset 0, 0 elsewhere). Exact at every clip length
  with S4D (ZOH: exp(-r dt a) = exp(-r / 1e-9) is 0 in float32 at every rate r = num_frames / T above 1.04e-7,
  clips up to 9.6 million times num_frames). S4's bilinear step (1 - r x) / (1 + r x), with
  x = dt a / 2 = 1 at the 3D model's `num_frames` (rate 1), is 0 there only: a clip of another length (rate
  r = num_frames / T) gets the taps of (1 - r) / (1 + r), a blur (no single pole passes through at every rate).
* `time_init='smooth'` (default): the symmetric exponential kernel K(o) = lam^|o| (1 - lam) / (1 + lam)
  of unit total mass, lam = exp(-1 / time_decay) per frame of the layer's reference grid: a
  temporal blur. Over a clip of T frames, s(t) = 1 - (lam^(t+1) + lam^(T-t)) / (1 + lam): the
  conv term is scaled by about 1 / (1 + lam) at the first and last frame (0.73 for the default
  decay of one frame) and by nearly 1 inside. With a causal time axis K(o) = (1 - lam) lam^o for
  o >= 0 and s(t) = 1 - lam^(t+1).
  The two-sided kernel is symmetric at the model's `num_frames` only: its backward half (offsets -1, -2, ...)
  is the forward half times its own C = lam, so at another clip length (rate r = num_frames / T) tap -(l + 1) is
  lam, not lam^r, times tap l. The continuous kernel is the same at every rate (`S4ND`: tap o integrates it over
  the cell [o, o + 1) r frames of the reference grid); it is its taps on the frame grid that are symmetric at rate 1
  only. Against a symmetric kernel the backward
  half is scaled by lam^(1 - r) (S4D; 0.61 at twice the frames with the default decay, 2.7 = 1 / lam at half); the
  whole kernel keeps unit mass (the forward half 1 / (1 + lam), the backward lam / (1 + lam)), its shape on the
  frame grid does not: temporal zero-shot sees a kernel leaning forward at more frames, backward at fewer.
* `time_init='random'`: the 3D model's own initialization of its time kernels (no relation to the 2D output).

Both kernels use one real mode (the others start with C = 0 and are free to learn): Im(A) = 0,
Re(A) = -1 / (dt * time_decay) for the layer's own step size dt, the normalization in B (which
has no weight decay). An S4 (DPLR) time kernel gets the same taps: its low-rank term P is zeroed, so A is
diagonal, and Re(A) is the pole whose bilinear step is lam. SGConv time kernels take 'random' only (on-the-fly
inflation picks it for them: `default_time_init`), and SGConv models inflate into a 3D model built at the 2D
training size (their parameters are laid out for it).
The identity is the same kernel with a decay of 1e-9 frame, whose taps after the first are 0 in float32 (S4's:
within float32 rounding of 0); S4D's B normalizes Re(A) as float32 stores it, so its first tap is 1 to float32
rounding. (A decay of 1/200 frame stopped passing through at clips of about 32x num_frames.)
The convs: 'repeat' is exact on static clips wherever all of a conv's time taps land inside the clip (the tubelet
stem, whose stride is its kernel); a padded (3, 7, 7) conv sees only 2 of its 3 taps at the first and last frame.
'center' is exact everywhere.
"""
import logging
import math
import os
import pickle
import zipfile
from typing import Any, Dict, Optional, Set, Tuple

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import load_state_dict

from ..layers import S4ND
from ..layers.s4_kernel import S4Kernel
from ..layers.sgconv_kernel import SGConvKernel
from ..layers.ssm_kernel import SSMKernel, per_kernel
from ..utils.files import save_safetensors
from ._checkpoint import KEPT_INIT, TransferReport, adapt_input_channels, pointwise_reshape, unwrap_state_dict

__all__ = [
    'TIME_INITS', 'CONV_MODES', 'inflate_state_dict', 'inflate_checkpoint', 'inflate_conv_weight', 'is_2d_state_dict',
    'load_checkpoint_file', 'default_time_init',
]

TIME_INITS = ('smooth', 'identity', 'random')
CONV_MODES = ('repeat', 'center')
_IDENTITY_DECAY = 1e-9  # exp(-r / 1e-9) underflows to 0 in float32 for every rate r above 1.04e-7
_RENAMED = 'H/W kernels moved to the 3D H/W axes'
_RANDOM_TIME = "time kernels (random: the 3D model's own init)"
_logger = logging.getLogger(__name__)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) >= 9 and 0 < int.from_bytes(head[:8], 'little') <= size - 8 and head[8:9] == b'{'


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """The contents of a checkpoint file: safetensors, or a `torch.save` file (zip or legacy pickle), told
    apart by their contents. Raises FileNotFoundError / ValueError naming the file, on one line, for a
    missing file or one that is neither (a YAML or CSV given by mistake)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} is not a file')
    with open(path, 'rb') as f:
        head = f.read(16)
    size = os.path.getsize(path)
    if _looks_like_safetensors(head, size):
        try:
            return load_file(path)
        except SafetensorError as e:
            raise ValueError(f'checkpoint {path!r} is a damaged safetensors file: {e}') from None
    if zipfile.is_zipfile(path) or head[:1] == b'\x80':  # torch.save: a zip archive, or (legacy) a pickle
        try:
            return load_state_dict(path)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            reason = ' '.join(str(e).split())
            raise ValueError(f'checkpoint {path!r}: torch.load failed: {reason[:300]}') from None
    if head[:2] == b'PK':
        raise ValueError(f'checkpoint {path!r} is a damaged torch.save file (a zip archive without its directory: '
                         'truncated?)')
    text = all(32 <= b < 127 or b in b'\t\r\n' for b in head)
    raise ValueError(f'checkpoint {path!r} is neither a safetensors file nor a torch.save file (it starts with '
                     f'{head!r}{": a YAML, CSV or other text file?" if text else ""})')


def is_2d_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for the weights of a 2D ConvNeXt(-S4ND): its first conv `stem.0` has a 4-D weight."""
    stem = state_dict.get('stem.0.weight')
    return stem is not None and stem.ndim == 4


def _kernel_type(names: Set[str]) -> Optional[str]:
    """The S4ND `kernel` whose axis kernels hold the tensors `names`: 's4' (its low-rank term `p`), 's4d' or 'sgconv'
    (None: none of them)."""
    return 's4' if 'p' in names else 's4d' if 'log_a_real' in names else 'sgconv' if 'weight' in names else None


def _ssm_time_kernel(layer: S4ND) -> bool:
    """Whether a 3D S4ND layer's time kernel is an SSM kernel (S4D's or S4's), which 'smooth' and 'identity' set."""
    return isinstance(layer.kernels[0], (SSMKernel, S4Kernel))


def default_time_init(model: nn.Module) -> str:
    """The time_init of on-the-fly inflation: 'smooth' where every time kernel of `model` is an SSM kernel, 'random'
    otherwise (SGConv's time kernels have no smooth or pass-through form)."""
    layers = [m for m in model.modules() if isinstance(m, S4ND)]
    return 'smooth' if all(_ssm_time_kernel(layer) for layer in layers) else 'random'


def inflate_conv_weight(weight: torch.Tensor, time_size: int, mode: str = 'repeat') -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I, time_size, kh, kw): repeated along time / time_size, or on the centre tap."""
    if mode not in CONV_MODES:
        raise ValueError(f'conv_mode must be one of {CONV_MODES}, got {mode!r}')
    if mode == 'repeat':
        return weight.unsqueeze(2).repeat(1, 1, time_size, 1, 1) / time_size
    out = weight.new_zeros(weight.shape[:2] + (time_size,) + weight.shape[2:])
    out[:, :, time_size // 2] = weight
    return out


@torch.no_grad()
def _time_kernel(
        own: Dict[str, torch.Tensor],
        channels: int,
        bidirectional: bool,
        decay: float,
) -> Dict[str, torch.Tensor]:
    """Parameters of a time SSM kernel (`own`: the 3D model's, by short name; S4D, or S4 with its low-rank
    term `p`) made the unit-mass exponential kernel of `decay` frames (see the module docstring)."""
    log_dt = own['log_dt'].double()  # (H,)
    dt = log_dt.exp()
    lam = math.exp(-1 / decay)
    log_a_real, a_imag = own['log_a_real'].double().clone(), own['a_imag'].double().clone()  # (H, N2)
    b, c = own['b'].double().clone(), torch.zeros_like(own['c'], dtype=torch.float64)  # (H, N2, 2), (H * K, N2, 2)
    new = {}
    if 'p' in own:  # S4: no low-rank term (A diagonal), and the bilinear step (1 - dt a / 2) / (1 + dt a / 2) = lam
        a = 2 * (1 - lam) / ((1 + lam) * dt)
        # the forward taps are 2 C B~ lam^l with B~ = dt B / (1 + dt a / 2) = dt B (1 + lam) / 2
        b[:, 0, 0] = (1 - lam) / ((1 + lam) ** 2 * dt) if bidirectional else (1 - lam) / ((1 + lam) * dt)
        new['p'] = torch.zeros_like(own['p'], dtype=torch.float64)
    else:  # S4D, ZOH: exp(-dt a) = lam; the forward taps are 2 C B (1 - lam) / a * lam^l
        a = ((1 / decay) / dt).log().to(own['log_a_real'].dtype).double().exp()  # (as stored: B normalizes that a)
        b[:, 0, 0] = a / (2 * (1 + lam)) if bidirectional else a / 2
    log_a_real[:, 0] = a.log()  # Re(A) = -a
    a_imag[:, 0] = 0
    b[:, 0, 1] = 0
    c_pairs = per_kernel(c, log_dt.shape[0])  # (K, H, N2, 2), a view
    c_pairs[:channels, :, 0, 0] = 1
    if bidirectional:  # the backward taps (offsets -1, -2, ...): the same with their own C
        c_pairs[channels:, :, 0, 0] = lam
    new.update(log_dt=log_dt, log_a_real=log_a_real, a_imag=a_imag, b=b, c=c)
    return {k: v.to(own[k].dtype) for k, v in new.items()}


def _fit(name: str, value: torch.Tensor, target: torch.Tensor, conv_mode: str) -> Tuple[torch.Tensor, Optional[str]]:
    """`value` (2D) in the shape of `target` (3D): as is, a pointwise map in another layout (1x1 conv ->
    Linear, `pointwise_reshape`), or a conv inflated along time. Returns (the values, how: None if as is)."""
    how = None
    if value.shape == target.shape:
        out = value
    elif (reshaped := pointwise_reshape(value, target.shape)) is not None:
        out, how = reshaped
        how = f'reshaped {how}'
    elif value.ndim == 4 and target.ndim == 5 and value.shape == target.shape[:2] + target.shape[3:]:
        out, how = inflate_conv_weight(value, target.shape[2], conv_mode), f'inflated along time ({conv_mode})'
    else:
        hint = (' (num_classes differs: drop the head, keep_head=False)' if name.startswith('head.fc.') else
                ' (build the 3D model with the 2D model\'s arguments, e.g. its dims, d_state, stem_chs)')
        raise ValueError(
            f'cannot inflate {name}: 2D shape {tuple(value.shape)} does not fit 3D shape {tuple(target.shape)}{hint}')
    return out.to(target.dtype).contiguous(), how


def inflate_state_dict(
        state_dict: Dict[str, Any],
        model: nn.Module,
        time_init: str = 'smooth',
        time_decay: float = 1.0,
        conv_mode: str = 'repeat',
        keep_head: bool = False,
) -> Dict[str, torch.Tensor]:
    """Map a 2D model's weights onto `model`, a 3D ConvNeXt (see the module docstring).

    Args:
        state_dict: the 2D weights (a training checkpoint dict is unwrapped: `unwrap_state_dict`).
        model: the 3D target; its initialization is kept for the time kernels' step sizes (and
            the whole time kernels with time_init='random').
        time_init: 'smooth', 'identity' or 'random'.
        time_decay: decay of the smooth time kernel, in frames of each layer's reference grid.
        conv_mode: 'repeat' or 'center'.
        keep_head: keep the 2D classifier (`head.fc`); it is left out otherwise.

    Returns:
        Weights for every entry of `model.state_dict()`, less `head.fc` unless `keep_head`.
    """
    if time_init not in TIME_INITS:
        raise ValueError(f'time_init must be one of {TIME_INITS}, got {time_init!r}')
    if conv_mode not in CONV_MODES:
        raise ValueError(f'conv_mode must be one of {CONV_MODES}, got {conv_mode!r}')
    if not (math.isfinite(time_decay) and time_decay > 0):
        raise ValueError(f'time_decay must be positive and finite (frames), got {time_decay}')
    source = unwrap_state_dict(state_dict)
    if not is_2d_state_dict(source):
        raise ValueError('state_dict is not a 2D ConvNeXt(-S4ND) state dict (no 4-D stem.0.weight)')
    if getattr(model, 'in_chans', None) is not None:  # RGB weights for a model of other inputs: timm's rule
        source = adapt_input_channels(source, 'stem.0', model.in_chans)
    target = model.state_dict()
    stem = target.get('stem.0.weight')
    if stem is None or stem.ndim != 5:  # (a 2D model took the weights as they are, reported as inflated)
        raise ValueError(f'model must be a 3D ConvNeXt (convnext_s4nd_3d_*, convnext_3d_*: a 5-D stem.0.weight), got '
                         f'{type(model).__name__}')
    if not any('.kernels.' in k for k in source) and any('.kernels.' in k for k in target):
        raise ValueError(f'the 2D weights hold no S4ND layer (timm ConvNeXt weights?): they inflate into the '
                         f'convnext_3d_* baseline, not {type(model).__name__} with S4ND layers')
    if any('.kernels.' in k for k in source) and not any('.kernels.' in k for k in target):
        # (they failed on the stem's shape, with advice to build the target with the 2D model's dims or d_state)
        raise ValueError(f'the 2D weights hold S4ND layers (ConvNeXt-S4ND weights): they inflate into a '
                         f'convnext_s4nd_3d_* model, not {type(model).__name__} without S4ND layers (the convnext_3d_* '
                         f'baseline)')
    renamed, time_params, grids, used = {}, {}, {}, set()
    for prefix, layer in model.named_modules():
        if not isinstance(layer, S4ND):
            continue
        p = prefix + '.'
        # weights of another kernel type, named as such (they failed name for name on lists of tensors, or, into an
        # SGConv model, on the time_init advice below, which then failed so)
        held = f'{p}kernels.0.'  # the 2D H kernel's tensors
        trained = _kernel_type({k[len(held):] for k in source if k.startswith(held)})
        if trained not in (None, layer.kernel):
            raise ValueError(f"{prefix}: the 2D weights hold kernel={trained!r} S4ND kernels, but the 3D model has "
                             f"kernel={layer.kernel!r}: build it with kernel={trained!r}")
        for axis in (1, 2):  # 2D H, W (kernels.0, kernels.1) -> 3D H, W (kernels.1, kernels.2)
            for k in layer.kernels[axis].state_dict():
                renamed[f'{p}kernels.{axis}.{k}'] = f'{p}kernels.{axis - 1}.{k}'
        time = {k: target[f'{p}kernels.0.{k}'] for k in layer.kernels[0].state_dict()}
        if time_init != 'random' and not _ssm_time_kernel(layer):
            raise ValueError(f"time_init={time_init!r} builds an SSM time kernel, but {prefix} has "
                             f"kernel={layer.kernel!r}: inflate with time_init='random' (its own time kernels)")
        if time_init != 'random':
            decay = _IDENTITY_DECAY if time_init == 'identity' else time_decay
            time.update(_time_kernel(time, layer.rank, layer.bidirectional[0], decay))  # (bandlimit: the 3D model's)
        time_params.update({f'{p}kernels.0.{k}': v.contiguous() for k, v in time.items()})
        # the reference grid: the 3D model's T, and the 2D (H, W) the kernels were trained on (the model's own
        # for weight files that do not hold it)
        grid = f'{p}l_ref'
        height_width = source[grid] if grid in source else target[grid][1:]
        if isinstance(layer.kernels[1], SGConvKernel) and height_width.tolist() != target[grid][1:].tolist():
            # (an SSM kernel is a function of position on any grid; SGConv's sub-kernel count follows l_ref)
            trained = [round(s * int(h) / int(t)) for s, h, t in zip(model.img_size, height_width, target[grid][1:])]
            raise ValueError(
                f'{prefix}: the 2D SGConv kernels were trained on a {tuple(height_width.tolist())} grid and their '
                f'parameters are laid out for it, but the 3D model is built for {tuple(target[grid][1:].tolist())}: '
                f'build it at the 2D training size, img_size={tuple(trained)} (any clip size runs after)')
        grids[grid] = torch.cat([target[grid][:1], height_width.to(target[grid].dtype)])
        used.add(grid)

    report = TransferReport('2D weights (inflated)', type(model).__name__, source_names=list(source), model=model)
    inflated, missing = {}, []
    for name, t in target.items():
        if name in grids:
            inflated[name] = grids[name]
            report.loaded.append(name)
        elif name in time_params:
            inflated[name] = time_params[name]
            report.initialized[_RANDOM_TIME if time_init == 'random' else f'time kernels ({time_init})'].append(name)
        elif name.startswith('head.fc.') and not keep_head:
            report.initialized[KEPT_INIT].append(name)
        else:
            src = renamed.get(name, name)
            if src.endswith('.bandlimit') and src not in source:  # weight files written before it was saved
                inflated[name] = t
                report.initialized[KEPT_INIT].append(name)
            elif src.endswith('.bandlimit'):  # as it is (not cast by `_fit`): loading checks the record
                inflated[name] = source[src]
                (report.mapped[_RENAMED] if src != name else report.loaded).append(name)
                used.add(src)
            elif src in source:
                inflated[name], how = _fit(src, source[src], t, conv_mode)
                how = how or (_RENAMED if src != name else None)
                (report.mapped[how] if how else report.loaded).append(name)
                used.add(src)
            else:
                missing.append(src)
    dropped = set() if keep_head else {k for k in source if k.startswith('head.fc.')}
    unexpected = sorted(set(source) - used - dropped)
    if missing or unexpected:
        raise ValueError(
            f'the 2D weights do not match {type(model).__name__} name for name: missing {missing[:5]}'
            f'{" ..." if len(missing) > 5 else ""}, unexpected {unexpected[:5]}{" ..." if len(unexpected) > 5 else ""}')
    report.unused = [k for k in source if k in dropped]
    report.log()
    return inflated


def inflate_checkpoint(
        src: str,
        dst: str,
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        **inflate_kwargs,
) -> Dict[str, torch.Tensor]:
    """Inflate the 2D checkpoint file `src` (safetensors or torch) for the timm model `model_name`
    (built with `model_kwargs`), and save the result to `dst` (safetensors; its folder is created). Returns the
    weights.

    `inflate_kwargs` go to `inflate_state_dict`. The file loads with
    `timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=dst))`; with `keep_head` and N
    classes other than the registry's 1000, give N to both (`num_classes=N` and the overlay's `num_classes=N`):
    timm drops the file's classifier when they differ, and the head would be a new random one.

    Build the target at the clip length it will train at (`model_kwargs=dict(num_frames=30)` for the HMDB-51
    recipe): the S4ND time kernels are referenced to its `num_frames` (the layers' `l_ref`, saved in the file),
    and a 3D file loads as it is, so a model of another `num_frames` gets kernels stretched or squeezed in time
    (on-the-fly inflation of a 2D file uses the model's own). The length is logged.
    """
    if os.path.isdir(dst):
        raise ValueError(f'dst {dst!r} is a folder: give the safetensors file to write')
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):  # (else the 2D weights are lost)
        raise ValueError(f'dst {dst!r} is the 2D checkpoint src: give another file to write the 3D weights to')
    state_dict = load_checkpoint_file(src)
    if not timm.is_model(model_name):
        raise ValueError(f'unknown timm model {model_name!r} (the 3D target, e.g. convnext_s4nd_3d_tiny)')
    model = timm.create_model(model_name, **(model_kwargs or {}))
    weights = inflate_state_dict(state_dict, model, **inflate_kwargs)
    if any(isinstance(m, S4ND) for m in model.modules()):
        _logger.info(f'{model_name}: S4ND time kernels referenced to {model.num_frames} frames (num_frames: build '
                     'the 3D model at the clip length it will train at)')
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    save_safetensors(weights, dst)  # (atomically: a killed run leaves no partial file under the name)
    return weights
