"""Timing and memory of S4ND against what it replaces, as ratios measured in one process.

Layer level: S4ND 2D vs timm's 7x7 depthwise conv (channels-last) at the ConvNeXt-T stage shapes, with each
per-axis kernel ('s4d', 's4', 'sgconv').
Generation: one recurrent step of a causal 1D layer vs recomputing its convolution for each new sample.
Model level: `convnext_s4nd_*` vs timm's `convnext_*` (training step and inference).
Times are medians over repeated runs after warm-up. Memory is the bytes autograd saves for the
backward pass (activations), which is what grows with batch size; on CUDA the model rows also hold the
allocator's peak of a training step (`*_cuda_peak_mb`), the layer, kernel and scaling rows do not.
"""
import json
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import create_conv2d

from .. import __version__
from ..layers import KERNELS, S4ND, S4NDRecurrence, dispatch
from ..utils import replaced_atomically
from ..utils.model_spec import _split_options, parse_model_spec

__all__ = [
    'time_ms', 'saved_activation_mb', 'cuda_settings', 'environment', 'describe_environment', 'bench_layers',
    'bench_kernels', 'bench_step', 'bench_scaling', 'bench_models', 'check_pairs', 'parse_pair', 'format_table',
    'write_json']

CONVNEXT_T_STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))


def cuda_settings(device: torch.device) -> Dict[str, bool]:
    """Sets what every benchmark here runs under on CUDA and returns it: cuDNN autotuning on, as timm's train.py
    runs (the baselines' convolutions get their fastest algorithms during warm-up); TF32 as PyTorch's defaults."""
    if device.type != 'cuda':
        return {}
    torch.backends.cudnn.benchmark = True
    return dict(cudnn_benchmark=True, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                tf32_cudnn=torch.backends.cudnn.allow_tf32)


def _commit(root: Optional[str] = None) -> Optional[str]:
    """The git commit of the checkout at `root` (default: the one holding this package), with '+changes' when the
    tree differs from it; None unless `root` is that repository's top level (a package installed in a venv inside
    another repository would otherwise report the enclosing project's commit)."""
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(['git', 'rev-parse', '--show-toplevel', 'HEAD'], cwd=root, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = head.stdout.split()
    if head.returncode or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(root):
        return None
    return lines[1] + ('+changes' if dirty.stdout.strip() else '')


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, commit: Optional[str] = None) -> dict:
    """What a result file must state to be read later, whatever measured it: the device, the CPU and its threads,
    the versions (this package's among them), the commit (`commit`, else git's) and, on CUDA, the toolkit and the
    settings every benchmark here runs under (`cuda_settings`, which this applies)."""
    env = dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda' else str(device), cpu=_cpu_name(),
               threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
               s4nd_vision=__version__, commit=commit or _commit())
    try:
        import triton
        env['triton'] = triton.__version__
    except ImportError:
        env['triton'] = None
    if device.type == 'cuda':
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   capability='.'.join(map(str, torch.cuda.get_device_capability(device))), **cuda_settings(device))
    return env


def describe_environment(env: dict) -> str:
    """One line of `environment`'s device, threads, versions and commit, to print above results."""
    return (f"{env['device']} ({env['cpu']}, {env['threads']} threads), torch {env['torch']}, timm {env['timm']}, "
            f"triton {env['triton']}, s4nd_vision {env['s4nd_vision']}, commit {env['commit']}")


def _sync(device: torch.device) -> None:
    """Wait for the work queued on `device`: CUDA and Apple's MPS run asynchronously, so a timing that did not wait
    would measure the launches only."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def time_ms(
        fns: Dict[str, Callable[[], object]], device: torch.device, warmup: int = 2, repeats: int = 7,
) -> Dict[str, float]:
    """Median wall time in milliseconds of each fn(), run interleaved (a, b, a, b, ...) so that drifts in
    machine speed (shared VMs, turbo, thermal) hit every candidate alike and the ratios stay fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


# autograd nodes that only view, transpose, expand or cast their one input: a saved tensor that reaches a
# parameter through these alone is the parameter's own storage or a copy of it (autocast's bf16 weights)
_VIEW_OR_CAST_NODES = frozenset((
    'AliasBackward0', 'ExpandBackward0', 'PermuteBackward0', 'SqueezeBackward0', 'SqueezeBackward1',
    'TBackward0', 'ToCopyBackward0', 'TransposeBackward0', 'UnsafeViewBackward0', 'UnsqueezeBackward0',
    'ViewBackward0'))


def _is_parameter_or_copy(t: torch.Tensor) -> bool:
    """Whether `t` is a parameter, or a view or dtype copy of one (nn.Linear saves `weight.t()`, a view; autocast
    saves bf16 copies of weights): memory that does not grow with the batch."""
    if isinstance(t, nn.Parameter):
        return True
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEW_OR_CAST_NODES:
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
    return fn is not None and isinstance(getattr(fn, 'variable', None), nn.Parameter)


def saved_activation_mb(fn: Callable[[], torch.Tensor]) -> float:
    """MB of distinct storages autograd saves for backward while running fn(): the activations, which grow with the
    batch (parameters and their views and autocast copies excluded; kernels generated from them included)."""
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != 'meta' and not _is_parameter_or_copy(t):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / 2 ** 20


def _fwd_bwd(module: nn.Module, x: torch.Tensor, amp: bool = False, path: Optional[str] = None) -> Callable[[], None]:
    """forward+backward of a layer on x, under bf16 autocast with `amp`, S4ND's implementation forced to `path`
    (None: the dispatch's choice)."""
    def forward():
        with dispatch.force_path(path), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            return module(x)

    # a dense upstream gradient, as in a network (the expanded one of .sum() sends CPU bmm down a slow path)
    with torch.no_grad():
        grad = torch.randn_like(forward())

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None  # (accumulating an input gradient would add a full-size kernel to every candidate's time)
        forward().backward(grad)
    return step


def _channels_last_input(batch_size: int, dim: int, size: int, device: torch.device,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer benchmarks' input, (batch_size, dim, size, size) in channels-last memory, as the convs of
    ConvNeXt (and S4ND's CUDA path) take it: every candidate gets the same tensor, so none pays a layout copy the
    others do not."""
    x = torch.randn(batch_size, dim, size, size, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last).requires_grad_()


def _report(progress: Optional[Callable[[dict], None]], row: dict) -> None:
    """Hands a measured row to a caller's `progress` hook (if any), which keeps it should the run be cut short."""
    if progress is not None:
        progress(row)


def bench_layers(
        batch_size: int = 8,
        stages: Sequence = CONVNEXT_T_STAGES,
        device: str = 'cpu',
        repeats: int = 7,
        progress: Optional[Callable[[dict], None]] = None,
) -> List[dict]:
    """S4ND 2D vs 7x7 depthwise conv, forward+backward, per stage shape, both on the same channels-last input.
    `progress` gets each row as it is measured (so that a caller cut short keeps it)."""
    dev = torch.device(device)
    cuda_settings(dev)
    rows = []
    for dim, size in stages:
        torch.manual_seed(0)
        s4nd = S4ND(dim, ndim=2, l_ref=size).to(dev)
        conv = create_conv2d(dim, dim, 7, depthwise=True).to(dev, memory_format=torch.channels_last)
        x = _channels_last_input(batch_size, dim, size, dev)
        times = time_ms(dict(conv=_fwd_bwd(conv, x), s4nd=_fwd_bwd(s4nd, x)), dev, repeats=repeats)
        t_conv, t_s4nd = times['conv'], times['s4nd']
        m_conv = saved_activation_mb(lambda: conv(x))
        m_s4nd = saved_activation_mb(lambda: s4nd(x))
        rows.append(dict(
            case=f'layer {batch_size}x{dim}x{size}x{size}', baseline='dwconv7x7',
            baseline_ms=t_conv, s4nd_ms=t_s4nd, time_ratio=t_s4nd / t_conv,
            baseline_mb=m_conv, s4nd_mb=m_s4nd, mem_ratio=m_s4nd / m_conv))
        _report(progress, rows[-1])
    return rows


def bench_kernels(
        batch_size: int = 8,
        stages: Sequence = CONVNEXT_T_STAGES,
        kernels: Sequence[str] = KERNELS,
        device: str = 'cpu',
        repeats: int = 7,
        progress: Optional[Callable[[dict], None]] = None,
) -> List[dict]:
    """S4ND 2D with each per-axis kernel vs the 7x7 depthwise conv (channels-last), forward+backward, per stage
    shape: one row per kernel and stage, all of a stage's candidates timed interleaved. `progress` gets each row as
    it is measured."""
    dev = torch.device(device)
    cuda_settings(dev)
    rows = []
    for dim, size in stages:
        torch.manual_seed(0)
        conv = create_conv2d(dim, dim, 7, depthwise=True).to(dev, memory_format=torch.channels_last)
        layers = {k: S4ND(dim, ndim=2, kernel=k, l_ref=size).to(dev) for k in kernels}
        x = _channels_last_input(batch_size, dim, size, dev)
        fns = dict(conv=_fwd_bwd(conv, x), **{k: _fwd_bwd(layer, x) for k, layer in layers.items()})
        times = time_ms(fns, dev, repeats=repeats)
        m_conv = saved_activation_mb(lambda: conv(x))
        for k, layer in layers.items():
            m_s4nd = saved_activation_mb(lambda: layer(x))
            rows.append(dict(
                case=f'kernel {k} {batch_size}x{dim}x{size}x{size}', baseline='dwconv7x7',
                baseline_ms=times['conv'], s4nd_ms=times[k], time_ratio=times[k] / times['conv'],
                baseline_mb=m_conv, s4nd_mb=m_s4nd, mem_ratio=m_s4nd / m_conv))
            _report(progress, rows[-1])
    return rows


def bench_step(
        lengths: Sequence[int] = (1024, 16384),
        dim: int = 256,
        d_state: int = 64,
        batch_size: int = 1,
        kernels: Sequence[str] = ('s4d', 's4'),
        device: str = 'cpu',
        repeats: int = 7,
        progress: Optional[Callable[[dict], None]] = None,
) -> List[dict]:
    """Cost of generating one more sample after L, with a causal 1D S4ND layer: one step of its recurrent view
    (`S4NDRecurrence`, constant cost) vs recomputing the convolution over the L samples so far (kernel
    generation included: the length grows with every sample, so no kernel can be reused). Inference mode.
    `progress` gets each row as it is measured."""
    dev = torch.device(device)
    rows = []
    for kernel in kernels:
        torch.manual_seed(0)
        layer = S4ND(dim, ndim=1, d_state=d_state, kernel=kernel, bidirectional=False).to(dev)
        with torch.inference_mode():
            recurrence = S4NDRecurrence(layer)
            state = recurrence.default_state(batch_size)
        for length in lengths:
            u = torch.randn(batch_size, dim, length, device=dev)

            def recompute():
                layer._kernel_cache = None  # the next sample makes the input longer: cached operators never apply
                with torch.inference_mode():
                    return layer(u)[..., -1]

            def step():
                with torch.inference_mode():
                    return recurrence.step(u[..., -1], state)[0]

            times = time_ms(dict(recompute=recompute, step=step), dev, repeats=repeats)
            rows.append(dict(
                case=f'step {kernel} {batch_size}x{dim} L={length}', baseline='recompute',
                baseline_ms=times['recompute'], s4nd_ms=times['step'], time_ratio=times['step'] / times['recompute'],
                speedup=times['recompute'] / times['step']))
            _report(progress, rows[-1])
    return rows


def bench_scaling(
        batch_size: int = 8,
        dim: int = 96,
        sizes: Sequence[int] = (56, 112, 224),
        device: str = 'cpu',
        repeats: int = 7,
        progress: Optional[Callable[[dict], None]] = None,
) -> List[dict]:
    """Growth of the layer's forward+backward time with resolution (each step 4x the pixels when sizes double):
    S4ND vs the 7x7 depthwise conv at a fixed width, each size's pair timed interleaved. Rows are named
    'scaling BxCxHxW' (apart from `bench_layers`' rows of the same shape in one result file). `progress` gets each
    row as it is measured (with its growth over the one before)."""
    rows: List[dict] = []

    def grow(row: dict) -> None:
        row['case'] = row['case'].replace('layer', 'scaling', 1)
        if rows:
            row['s4nd_growth'] = row['s4nd_ms'] / rows[-1]['s4nd_ms']
            row['baseline_growth'] = row['baseline_ms'] / rows[-1]['baseline_ms']
        rows.append(row)
        _report(progress, row)

    bench_layers(batch_size=batch_size, stages=[(dim, size) for size in sizes], device=device, repeats=repeats,
                 progress=grow)
    return rows


# options that change what a model takes or returns: a pair given them on one side only would compare unlike models
_PAIR_SHARED_OPTIONS = ('num_classes', 'in_chans')


def _check_pair(name: str, kwargs: dict, baseline: str) -> Tuple[str, dict]:
    """The baseline's name and options (`baseline` is `BASELINE[,key=value...]`, read by `parse_model_spec`);
    ValueError when the two sides are given different `_PAIR_SHARED_OPTIONS` (one of them only, or other values)."""
    baseline_name, baseline_kwargs = parse_model_spec(baseline)
    for key in _PAIR_SHARED_OPTIONS:
        if kwargs.get(key) != baseline_kwargs.get(key):
            raise ValueError(
                f'model pair {name} vs {baseline_name}: {key} must be given to both sides alike, e.g. '
                f'{name},{key}=N:{baseline_name},{key}=N (got {kwargs.get(key)} and {baseline_kwargs.get(key)})')
    return baseline_name, baseline_kwargs


def _pair_sides(spec: str) -> List[str]:
    """`spec` split at the colons between its models: not one inside a value's brackets, braces or quotes
    (`pretrained_cfg_overlay={file: w.safetensors}`), nor that of shared weights' names (`hf-hub:USER/REPO`,
    `local-dir:PATH`), nor a Windows drive's (`local-dir:C:\\runs\\x`, `pretrained_file=D:/w.safetensors`: a letter
    alone before the colon, a path after it, which no model name starts with)."""
    sides: List[str] = []
    for part in _split_options(spec, separator=':'):
        drive = part[:1] in ('\\', '/') and sides and re.search(r'(^|[=:,{\[\s])[A-Za-z]$', sides[-1])
        if sides and (sides[-1] in ('hf-hub', 'local-dir') or drive):
            sides[-1] += ':' + part
        else:
            sides.append(part)
    return sides


def parse_pair(spec: str) -> tuple:
    """'vit_s4nd_small_patch16_224,token_layout=1d:vit_small_patch16_224' -> (name, kwargs, baseline); each side's
    options are read as `parse_model_spec` reads them (YAML values), the baseline's stay in its spec
    (`BASELINE[,key=value...]`, which `bench_models` reads). num_classes and in_chans must be given to both sides
    alike (ValueError otherwise)."""
    sides = _pair_sides(spec)
    if len(sides) != 2:
        raise ValueError(f'a model pair must look like NAME[,key=value...]:BASELINE[,key=value...], got {spec!r}')
    left, baseline = sides
    name, kwargs = parse_model_spec(left)
    _check_pair(name, kwargs, baseline)
    return name, kwargs, baseline


def _pair_model(pair: str, model_name: str, kwargs: dict, img_size: int, num_frames: Optional[int]) -> nn.Module:
    """One side of the model pair `pair` (named in errors), built on the CPU and checked for the benchmark's input:
    ValueError for an argument the model does not take (timm's TypeError), for clips given to an image model or
    images to a video model, and for an `img_size` below the model's minimum; timm's ViTs set to `img_size`. This
    package's models are built for the input (`img_size`, and a video model's `num_frames`: their kernels' reference
    grid, as a model trained at that size is) unless `kwargs` set it: one built for 224 px and run at 64 masks more
    of its modes and times as another model (its CPU training step 15% faster than the one built for 64 px)."""
    from ..eval.resolution import min_input_size
    from ..models import input_size_args
    sizes = dict(img_size=img_size, num_frames=num_frames)
    built = dict({k: sizes[k] for k in input_size_args(model_name) if sizes[k] and k not in kwargs}, **kwargs)
    try:
        model = timm.create_model(model_name, **built)
    except TypeError as e:  # (an unknown NAME,key=value: timm says only which __init__ refused it)
        if 'unexpected keyword argument' not in str(e):
            raise
        raise ValueError(f'model pair {pair}: {model_name} does not take the arguments {kwargs}: {e}') from None
    layout = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 0, 0))
    if (len(layout) == 4) != bool(num_frames):  # (else a shape error deep in the model's stem)
        raise ValueError(f'num_frames: {model_name!r} takes clips (input_size {tuple(layout)}); give '
                         'num_frames (--num-frames) for a video pair' if len(layout) == 4 else
                         f'num_frames: {model_name!r} takes inputs of input_size {tuple(layout)}, not '
                         'clips; give num_frames (--num-frames) for video pairs only')
    smallest = min_input_size(model)  # (a timm baseline's conv would fail deeper, less clearly)
    if img_size < smallest:
        raise ValueError(f'img_size {img_size} is smaller than the minimum input size of {model_name!r} '
                         f'({smallest} px)')
    if not num_frames and hasattr(model, 'set_input_size'):  # (timm's ViTs take their patch grid from it)
        model.set_input_size(img_size)
    return model


def check_pairs(pairs: Sequence, img_size: int = 224, num_frames: Optional[int] = None) -> None:
    """Build both models of every pair (name, kwargs, baseline) once, on the CPU, with `bench_models`' checks: what
    `bench_models` would refuse (an argument a model does not take, clips for an image model, a size below a
    model's minimum) is refused before anything is measured, not after the other benchmarks' minutes."""
    for name, kwargs, baseline in pairs:
        baseline_name, baseline_kwargs = _check_pair(name, kwargs, baseline)
        for model_name, model_kwargs in ((name, kwargs), (baseline_name, baseline_kwargs)):
            _pair_model(f'{name} vs {baseline_name}', model_name, model_kwargs, img_size, num_frames)


def _train_step(model: nn.Module, x: torch.Tensor, amp_dtype: Optional[torch.dtype]) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        out.float().sum().backward()
    return step


def _inference(model: nn.Module, x: torch.Tensor, amp_dtype: Optional[torch.dtype]) -> Callable[[], None]:
    def infer():
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(x)
    return infer


def bench_models(
        pairs: Sequence = (('convnext_s4nd_tiny', {}, 'convnext_tiny'),),
        img_size: int = 224,
        batch_size: int = 8,
        device: str = 'cpu',
        repeats: int = 5,
        amp_dtype: Optional[torch.dtype] = None,
        compile: bool = False,
        num_frames: Optional[int] = None,
        channels_last: bool = False,
        progress: Optional[Callable[[dict], None]] = None,
) -> List[dict]:
    """Training step (forward+backward) and inference of S4ND models vs their timm baselines
    (with `compile`, both models run through `torch.compile`); a pair is (name, kwargs, baseline), the baseline a
    `BASELINE[,key=value...]` spec (`parse_pair`). This package's models are built for `img_size` (and `num_frames`)
    unless the pair sets them (`_pair_model`). Each model's input has its own `in_chans` channels. With
    `num_frames`, the models are video models and the input is (batch_size, in_chans, num_frames, img_size,
    img_size) clips. With `channels_last`, both models and the input are in channels-last memory
    (`torch.channels_last_3d` for clips), as GPU training usually runs.
    A row's `case` names the pair, the size, the batch and these settings (`amp-bfloat16`, channels-last, compiled).
    `progress` gets a pair's row as it fills (compile times, training times, then memory), so that a caller cut
    short keeps what was measured. Compiled pairs have no saved-activation column (the hooks that count it see
    eager autograd), and add the seconds of each model's first training step and first inference (their
    compilation, `*_compile_s`)."""
    dev = torch.device(device)
    cuda_settings(dev)
    if num_frames is not None and num_frames < 1:
        raise ValueError(f'num_frames must be a positive number of frames or None (images), got {num_frames}')
    memory_format = (torch.channels_last_3d if num_frames else torch.channels_last) if channels_last else None
    rows = []
    for name, kwargs, baseline in pairs:
        baseline_name, baseline_kwargs = _check_pair(name, kwargs, baseline)
        options = ''.join(f',{k}={v}' for k, v in kwargs.items())
        size = f'{num_frames}x{img_size}' if num_frames else f'{img_size}'
        flags = ''.join(flag for flag, on in ((f" amp-{str(amp_dtype).replace('torch.', '')}", amp_dtype is not None),
                                              (' channels-last', channels_last), (' compiled', compile)) if on)
        result = dict(case=f'{name}{options} vs {baseline} @{size} b{batch_size}{flags}', baseline=baseline)
        models, inputs, train_steps, inferences = {}, {}, {}, {}
        for key, model_name, model_kwargs in (('s4nd', name, kwargs), ('baseline', baseline_name, baseline_kwargs)):
            torch.manual_seed(0)
            model = _pair_model(f'{name} vs {baseline_name}', model_name, model_kwargs, img_size, num_frames)
            models[key] = model = model.to(dev, memory_format=memory_format)
            result[f'{key}_params_m'] = sum(p.numel() for p in model.parameters()) / 1e6
            shape = (batch_size, getattr(model, 'in_chans', 3), *((num_frames,) if num_frames else ()), img_size,
                     img_size)
            x = torch.randn(shape, device=dev)
            inputs[key] = x = x if memory_format is None else x.contiguous(memory_format=memory_format)
            run = torch.compile(model) if compile else model
            train_steps[key], inferences[key] = _train_step(run, x, amp_dtype), _inference(run, x, amp_dtype)
        for model in models.values():
            model.train()
        if compile:  # the first call compiles: what a user waits for before the first step
            _first_call_s(train_steps, dev, result, 'train_compile_s')
            if progress is not None:  # (a caller cut short during the timing keeps the compile times)
                progress(dict(result))
        for key, ms in time_ms(train_steps, dev, warmup=1, repeats=repeats).items():
            result[f'{key}_train_ms'] = ms
        result['train_ratio'] = result['s4nd_train_ms'] / result['baseline_train_ms']
        if progress is not None:
            progress(dict(result))
        for model in models.values():  # neither model's gradients held while the other's peak is measured
            model.zero_grad(set_to_none=True)
        for key, model in models.items():
            x = inputs[key]
            if not compile:
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    result[f'{key}_train_mb'] = saved_activation_mb(lambda: model(x))
            if dev.type == 'cuda':  # the step's peak above what was allocated before it (weights, input, ...)
                torch.cuda.synchronize(dev)
                before = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                train_steps[key]()
                result[f'{key}_cuda_peak_mb'] = (torch.cuda.max_memory_allocated(dev) - before) / 2 ** 20
            model.zero_grad(set_to_none=True)
        if not compile:
            result['train_mem_ratio'] = result['s4nd_train_mb'] / result['baseline_train_mb']
        if dev.type == 'cuda':
            result['cuda_peak_ratio'] = result['s4nd_cuda_peak_mb'] / result['baseline_cuda_peak_mb']
        if progress is not None:
            progress(dict(result))
        for model in models.values():
            model.eval()
        if compile:  # (eval mode and no autograd: another graph)
            _first_call_s(inferences, dev, result, 'infer_compile_s')
        for key, ms in time_ms(inferences, dev, warmup=1, repeats=repeats).items():
            result[f'{key}_infer_ms'] = ms
        del models, inputs, train_steps, inferences
        result['infer_ratio'] = result['s4nd_infer_ms'] / result['baseline_infer_ms']
        rows.append(result)
    return rows


def _first_call_s(fns: Dict[str, Callable[[], object]], device: torch.device, result: dict, column: str) -> None:
    """result[f'{key}_{column}'] = seconds of the first call of fns[key] (through torch.compile: its compilation)."""
    for key, fn in fns.items():
        start = time.perf_counter()
        fn()
        _sync(device)
        result[f'{key}_{column}'] = time.perf_counter() - start


def format_table(rows: List[dict]) -> str:
    """Plain-text table of the numeric columns of `rows`."""
    if not rows:
        return ''
    keys = [k for k in rows[0] if k != 'case']
    table = [['case', *keys]] + [
        [row['case'], *(f'{row[k]:.2f}' if isinstance(row[k], float) else str(row[k]) for k in keys)] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]  # long names never run together
    return '\n'.join(line[0].ljust(widths[0]) + ''.join(c.rjust(w + 2) for c, w in zip(line[1:], widths[1:]))
                     for line in table)


def write_json(results: dict, path: str) -> None:
    """Write `results` ({'environment': ..., 'rows': [...]}) to `path` as JSON, atomically."""
    with replaced_atomically(path) as tmp, open(tmp, 'w') as f:
        json.dump(results, f, indent=2)
