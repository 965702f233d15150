"""Export to ONNX with dynamic batch, height and width (or a fixed input size), and time the file in onnxruntime
against eager PyTorch.

While a graph is captured, S4ND runs its real-arithmetic reference formulation (`layers.reference`):
no complex tensors, no size-dependent algorithm choice, so one graph serves every input size. Height
and width are declared as multiples of the model's total stride (32 for ConvNeXt-S4ND, the patch size
for ViT-S4ND), which keeps every stage grid an integer and spares torch.export's shape solver. onnxruntime
does not enforce declared sizes, so the graph begins with an exact reshape of its input into stride blocks: other
sides fail at run time (a strided stem would otherwise answer for the top-left crop). A model that pads its
input to a multiple of the stride (ViT-S4ND's `dynamic_img_pad`) takes every side, the padding computed in the
graph as in eager mode.

The file's metadata holds what a deployment needs besides the graph (`onnx_metadata`): the architecture, the
classes and timm's data config (input size, interpolation, mean, std, crop), to preprocess as timm would.

A graph of one fixed size (`fixed_size=True`, the batch still dynamic) computes its S4ND kernels and
Toeplitz operators from the weights alone: onnxruntime folds them into constants when it loads the file,
so no call generates them (a dynamic graph generates them at every call, as it must for a new size). Video
and sequence models export this way.
"""
import json
import os
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.export import Dim

from ..bench.benchmark import time_ms
from ..layers.ops import is_int

__all__ = ['input_sides', 'model_stride', 'pads_inputs', 'check_image_model', 'check_export_size', 'trace_size',
           'export_onnx', 'onnx_metadata', 'onnx_latency']


def input_sides(model: nn.Module) -> Tuple[int, ...]:
    """The model's default input size without channels (timm's `pretrained_cfg['input_size'][1:]`): (H, W) for
    images, (T, H, W) for clips, (L,) for sequences; (224, 224) for a model without one."""
    return tuple((getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))[1:])


def check_image_model(model: nn.Module, fixed_size: bool = False) -> None:
    """Raise ValueError unless `export_onnx` takes `model`: a graph of dynamic sizes, an image model (B, C, H, W)
    that takes every size; a graph of one fixed size (`fixed_size`), any model."""
    if fixed_size:
        return
    size = input_sides(model)
    if len(size) != 2:
        raise ValueError(f'model: {type(model).__name__} does not take images (its input_size has the sides '
                         f'{size}): graphs of dynamic sizes take image models, (B, C, H, W); export video and '
                         'sequence models at a fixed size (fixed_size=True; the command: --fixed-size)')
    if getattr(model, 'dynamic_img_size', True) is False:  # (a graph of dynamic sides would accept what it refuses)
        raise ValueError(f'model: {type(model).__name__} is built with dynamic_img_size=False (it takes '
                         f'{size} only); export writes graphs of dynamic sizes: build it with '
                         'dynamic_img_size=True, or export it at that fixed size')


def model_stride(model: nn.Module) -> int:
    """The factor input sides must be a multiple of: the largest feature reduction (timm's `feature_info`),
    else the patch size (ViT), else 1."""
    info = getattr(model, 'feature_info', None)
    if info:
        return max(int(f['reduction']) for f in info)
    patch = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    return int(patch[0]) if patch else 1


def pads_inputs(model: nn.Module) -> bool:
    """Whether `model` pads its input sides to multiples of its stride (timm's ViT flag `dynamic_img_pad`)."""
    return bool(getattr(getattr(model, 'patch_embed', None), 'dynamic_img_pad', False))


def check_export_size(model: nn.Module, size: Tuple[int, int], max_side: int = 2048, min_strides: int = 3) -> None:
    """Refuse an (H, W) the exported graph does not cover: sides from `min_strides` strides (`model_stride(model)`)
    to `max_side`, multiples of the stride unless the model pads (`pads_inputs`). A graph is traced at 3 strides or
    more (its declared range; smaller traces specialize to the stage grids of 1 and 2), and serves sides from
    1 stride up (`min_strides=1`: equal to eager, `tests/test_export.py`)."""
    stride = model_stride(model)
    multiple = not pads_inputs(model)
    if any((multiple and s % stride) or not min_strides * stride <= s <= max_side for s in size):
        what = f'multiples of the model stride {stride} ' if multiple else ''
        raise ValueError(f'sides must be {what}from {min_strides * stride} to {max_side} (the exported graph\'s '
                         f'sizes), got {size[0]}x{size[1]}')


def trace_size(model: nn.Module, fixed_size: bool = False) -> Tuple[int, ...]:
    """The size `export_onnx` traces at by default: the model's input sides (`input_sides`), for a graph of dynamic
    sizes each raised to 3 strides (the smallest trace: `check_export_size`)."""
    sides = input_sides(model)
    return sides if fixed_size else tuple(max(side, 3 * model_stride(model)) for side in sides)


class _StrideBlocks(nn.Module):
    """`model` behind an exact reshape of its input (B, C, H, W) into stride blocks, which fails unless the
    stride divides H and W: the exported graph's check of its declared sides, which onnxruntime does not enforce."""

    def __init__(self, model: nn.Module, stride: int):
        super().__init__()
        self.model = model
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.stride  # (B, C, H, W) -> (B, C, H/s, s, W/s, s) -> (B, C, H, W)
        return self.model(x.reshape(b, c, h // s, s, w // s, s).reshape(b, c, h, w))


def export_onnx(
        model: nn.Module,
        path: str,
        img_size: Optional[Tuple[int, ...]] = None,
        in_chans: Optional[int] = None,
        max_side: int = 2048,
        fixed_size: bool = False,
) -> str:
    """Export `model` (set to eval) to an ONNX file at `path`, traced at `img_size` (and batch 2), with the
    batch and both sides dynamic (declared from 3 strides of `model_stride(model)` to `max_side`, it serves
    multiples of the stride from 1 stride up, `check_export_size`; the graph fails at run time on other sides, or
    pads them as the model does if it pads: `pads_inputs`).

    Args:
        img_size: (H, W); with `fixed_size`, the input's sides as the model takes them (`input_sides`): (H, W),
            (T, H, W) for clips, (L,) for sequences. Default: the model's, raised to 3 strides for a graph of
            dynamic sizes (`trace_size`).
        in_chans: input channels; default: the model's (`model_data_config`).
        fixed_size: the graph takes `img_size` only (any size the model takes; the batch stays dynamic).
            Its S4ND kernels and operators depend on the weights alone, and onnxruntime folds them into
            constants when it loads the file: faster calls, at the memory of the operators (README "Deployment").

    Returns:
        the path written.
    """
    from ..layers import S4Kernel
    if os.path.isdir(path):  # (else refused only by the rename after the export, which takes minutes)
        raise ValueError(f'path: {path!r} is a folder; name the ONNX file to write, e.g. '
                         f'{os.path.join(path, "model.onnx")!r}')
    check_image_model(model, fixed_size)
    # float16/bfloat16 failed minutes into the export (torch's ONNX decomposition); a float64 graph exports, but
    # onnxruntime has no float64 Conv or AveragePool: every S4ND model's file failed to load there
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if dtypes:
        raise ValueError(f'model: its weights are {", ".join(dtypes)}; export_onnx exports float32 models (a float64 '
                         f'graph does not run in onnxruntime): export model.float() (and convert the ONNX file to '
                         f'float16 afterwards if needed)')
    own = input_sides(model)
    img_size = trace_size(model, fixed_size) if img_size is None else img_size
    in_chans = _model_chans(model) if in_chans is None else in_chans
    # (a dynamic graph too: another number of sides failed in torch.export with no word of img_size)
    img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size,)
    if len(img_size) != len(own):
        raise ValueError(f'img_size: {type(model).__name__} takes inputs of {len(own)} sides (its input_size has '
                         f'{own}), got {img_size}')
    if any(isinstance(m, S4Kernel) for m in model.modules()):
        raise ValueError("model: the S4 (DPLR) kernel cannot be exported to ONNX (its generation is complex "
                         "arithmetic, which ONNX has no type for, and raises A to the power of each axis length by "
                         "repeated squaring, a graph per length); export an S4D (kernel='s4d') or SGConv model, or "
                         "torch.export this one at a static size")
    model = traced = model.eval()
    shapes = {0: Dim('batch', max=4096)}
    if not fixed_size:
        stride = model_stride(model)
        if max_side < 3 * stride:
            raise ValueError(f'max_side must be at least {3 * stride}, got {max_side}')
        try:
            check_export_size(model, img_size, max_side)
        except ValueError as e:
            raise ValueError(f'img_size: {e}') from None
        if pads_inputs(model):  # (the padding to a multiple of the stride stays symbolic in the graph)
            shapes.update({2: Dim('h', min=3 * stride, max=max_side), 3: Dim('w', min=3 * stride, max=max_side)})
        else:
            traced = _StrideBlocks(model, stride).eval()
            shapes.update({2: stride * Dim('h', min=3, max=max_side // stride),
                           3: stride * Dim('w', min=3, max=max_side // stride)})
    program = torch.onnx.export(traced, (_sample_input(model, (2, in_chans, *img_size)),), dynamo=True, verbose=False,
                                dynamic_shapes=(shapes,))
    if traced is not model:  # the weights keep the model's names; onnxruntime's error on other sides names the check
        for value in list(program.model.graph.initializers.values()):
            value.name = value.name.removeprefix('model.')
        for node, _ in program.model.graph.inputs[0].uses():
            if node.op_type == 'Reshape':
                node.name = f'input_sides_must_be_multiples_of_{stride}'
    program.model.metadata_props.update(onnx_metadata(model, (in_chans, *img_size) if fixed_size else None))
    # written in a temporary folder beside `path`, then renamed: an interrupted or failed save leaves no truncated
    # file under the name (nor replaces one there); a graph over ONNX's size limit saves its weights to a second
    # file, `<name>.data`, which the graph names and which is renamed first
    folder, name = os.path.split(os.path.realpath(path))  # (a link at `path`: its target is replaced)
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f'.{name}.', dir=folder) as tmp:
        program.save(os.path.join(tmp, name))
        for written in sorted(os.listdir(tmp), key=lambda n: n == name):  # (the graph last)
            os.replace(os.path.join(tmp, written), os.path.join(folder, written))
    return path


def _sample_input(model: nn.Module, shape: Tuple[int, ...]) -> torch.Tensor:
    """A random input of `shape` on the device and in the dtype of the model's weights (a model on a GPU takes no
    CPU tensor)."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.randn(shape) if weight is None else torch.randn(shape, device=weight.device, dtype=weight.dtype)


def _model_chans(model: nn.Module) -> int:
    """The model's input channels, as its data config states them (`model_data_config`)."""
    from ..data.transforms import model_data_config
    return model_data_config(model)['input_size'][0]


def onnx_metadata(model: nn.Module, input_size: Optional[Tuple[int, ...]] = None) -> Dict[str, str]:
    """The ONNX metadata `export_onnx` writes (string values): 'architecture' (the timm name), 'num_classes', and
    'data_config', timm's data config of the model as JSON (`timm.data.resolve_data_config`: input_size,
    interpolation, mean, std, crop_pct, crop_mode) fitted to the model's input channels (`model_data_config`: a
    pretrained cfg states its source weights' channels), its input_size replaced by `input_size` (channels first)
    if given: the size of a fixed-size graph."""
    from ..data.transforms import model_data_config
    config = model_data_config(model)
    if input_size is not None:
        config['input_size'] = tuple(input_size)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {'architecture': str(cfg.get('architecture', type(model).__name__)),
            'num_classes': str(getattr(model, 'num_classes', '')), 'data_config': json.dumps(config)}


def onnx_latency(
        model: nn.Module,
        path: str,
        sizes: Sequence[Tuple[int, ...]],
        batch_size: int = 1,
        in_chans: Optional[int] = None,
        repeats: int = 10,
        threads: Optional[int] = None,
) -> list:
    """Per input size: the largest difference between the ONNX file's outputs (onnxruntime, CPU) and eager
    PyTorch's (on the model's device), and both median latencies in ms (timed interleaved, see
    `bench.benchmark.time_ms`); inputs of `in_chans` channels (default: the model's)."""
    if not is_int(repeats) or repeats < 1:  # (before the session loads: a median of no runs fails at the end)
        raise ValueError(f'repeats must be an integer >= 1, got {repeats!r}')
    import onnxruntime as ort
    in_chans = _model_chans(model) if in_chans is None else in_chans

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    rows = []
    model = model.eval()
    for size in sizes:
        x = _sample_input(model, (batch_size, in_chans, *size))  # (eager on the model's device, onnxruntime on CPU)
        with torch.no_grad():
            expected = model(x).cpu()
        array = x.cpu().numpy()
        out = session.run(None, {name: array})[0]
        with torch.no_grad():
            times: Dict[str, float] = time_ms({
                'eager': lambda: model(x),
                'onnxruntime': lambda: session.run(None, {name: array}),
            }, x.device, repeats=repeats)
        rows.append(dict(
            size='x'.join(str(side) for side in size), batch_size=batch_size,
            max_abs_diff=float((torch.from_numpy(out) - expected).abs().max()),
            eager_ms=round(times['eager'], 2), onnxruntime_ms=round(times['onnxruntime'], 2),
            onnxruntime_vs_eager=round(times['onnxruntime'] / times['eager'], 3)))
    return rows
