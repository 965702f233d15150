"""What band-limiting removes from a model's S4ND kernels: per layer and axis, and as plots.

For every S4ND layer with SSM kernels (S4D or S4 (DPLR); stem, downsampling, blocks) and every spatial axis, at
the layer's reference grid (rate 1, its `l_ref`):

- `masked`: the fraction of SSM modes whose frequency dt |Im A| / 2pi (base dt) is at or above
  bandlimit / 2 cycles per step, i.e. whose C the mask sets to zero (S4: the modes of A's diagonal part, whose
  low-rank term makes the cut approximate, as `energy_kept` shows);
- `energy_kept`: ||K_masked||^2 / ||K_full||^2 over the layer's channels and directions, with K the
  axis kernel at its rate-1 length; `energy_kept_median`: the median of the same ratio per channel (a ratio
  can exceed 1 where removed modes cancelled part of the kept ones);
- `modes_kept_median`: the median over the channels of the modes each keeps (of `modes / channels`; the
  summary's: over every channel of the layer kind).

`plot_layer_kernels` draws one layer's axis kernels at rate 1 and rate 1/2 (twice as many taps of half
the step) on the same continuous axis, with and without the mask.

    model = load_model('convnext_s4nd_atto', model_kwargs=dict(img_size=64, ssm_init='lin'))
    rows = kernel_report(model, bandlimit=1.0)
    print(format_report(rows)); print(format_summary(summarize(rows)))
"""
import contextlib
import csv
import os
import statistics
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..layers import S4ND, set_bandlimit
from ..layers.ssm_kernel import _DiagonalSSM
from ..utils import replaced_atomically
from ..utils.runtime import progress_refresh_s

__all__ = [
    'kernel_bandlimit', 'layer_kind', 's4nd_layers', 'kernel_report', 'summarize', 'format_report',
    'format_summary', 'write_report_csv', 'plotted_layer', 'plot_layer_kernels', 'REPORT_FIELDS', 'LAYER_KINDS',
]

LAYER_KINDS = ('stem', 'downsample', 'block')
REPORT_FIELDS = ('layer', 'kind', 'axis', 'grid', 'bandlimit', 'modes', 'masked', 'energy_kept', 'energy_kept_median',
                 'modes_kept_median')


def kernel_bandlimit(kernel: nn.Module) -> Optional[float]:
    """The band-limiting cut-off of a kernel module, or None when it has none (off, or an SGConv kernel)."""
    return getattr(kernel, 'bandlimit', None)


@contextlib.contextmanager
def _bandlimit(kernel: _DiagonalSSM, bandlimit: Optional[float]) -> Iterator[None]:
    """`kernel` with the cut-off `bandlimit` (None: off) inside the context, its own afterwards."""
    own = kernel_bandlimit(kernel)
    set_bandlimit(kernel, bandlimit)
    try:
        yield
    finally:
        set_bandlimit(kernel, own)


def layer_kind(name: str) -> str:
    """'stem', 'downsample' or 'block', from an S4ND layer's module name."""
    if name.startswith('stem') or '.stem' in name:
        return 'stem'
    if 'downsample' in name:
        return 'downsample'
    return 'block'


def s4nd_layers(model: nn.Module) -> List[Tuple[str, S4ND]]:
    """(name, layer) of every S4ND layer with SSM kernels (S4D or S4: those with modes to band-limit; not SGConv),
    in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, S4ND) and all(isinstance(k, _DiagonalSSM) for k in m.kernels)]


@torch.no_grad()
def _axis_kernel(kernel: _DiagonalSSM, length: int, rate: float, bandlimit: Optional[float]) -> torch.Tensor:
    """(num_kernels, dim, length) float64 kernel of `kernel` with the cut-off `bandlimit`."""
    with _bandlimit(kernel, bandlimit):
        return kernel(length, rate=rate, dtype=torch.float64)


@torch.no_grad()
def _mode_mask(kernel: _DiagonalSSM, bandlimit: Optional[float]) -> torch.Tensor:
    with _bandlimit(kernel, bandlimit):
        return kernel.mode_mask()


def kernel_report(
        model: nn.Module,
        bandlimit: Optional[float] = None,
        grid: Optional[Sequence[int]] = None,
        progress: bool = True,
) -> List[Dict]:
    """One row per SSM-kernel S4ND layer of `model` and spatial axis (see the module docstring).

    Args:
        bandlimit: the cut-off to measure, 0 for none (nothing masked); None: each kernel's own (layers without
            one report nothing masked).
        grid: the reference grid for layers without `l_ref` (e.g. a bare S4ND); layers with one use it.
    Returns:
        dicts with the keys REPORT_FIELDS (`bandlimit` None when the kernel is not band-limited), and `modes_kept`:
        the modes each channel keeps (a list, for `summarize`; not written to the CSV).
    """
    layers = s4nd_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no S4ND layer with SSM kernels (kernel="s4d" or "s4")')
    rows = []
    for name, layer in tqdm(layers, desc='kernels', unit='layer', leave=False, disable=not progress,
                            mininterval=progress_refresh_s()):
        sizes = layer.l_ref if layer.l_ref is not None else grid
        if sizes is None:
            raise ValueError(f'S4ND layer {name or "(model)"} has no reference grid (l_ref): pass grid')
        sizes = tuple(sizes) if isinstance(sizes, (tuple, list)) else (sizes,) * layer.ndim
        lengths = layer.kernel_lengths(sizes, (1.0,) * layer.ndim)
        for axis, (kernel, size, length) in enumerate(zip(layer.kernels, sizes, lengths)):
            cut = kernel_bandlimit(kernel) if bandlimit is None else bandlimit or None  # (0: off, as None)
            mask = _mode_mask(kernel, cut)
            full = _axis_kernel(kernel, length, 1.0, None)
            masked = _axis_kernel(kernel, length, 1.0, cut) if cut is not None else full
            e_full = full.square().sum(dim=(0, 2))  # per channel
            e_masked = masked.square().sum(dim=(0, 2))
            per_channel = e_masked / e_full.clamp_min(1e-300)
            kept = mask.sum(dim=1).tolist()  # (dim, modes per channel) mask: modes kept per channel
            rows.append(dict(
                layer=name, kind=layer_kind(name), axis=axis, grid=size, bandlimit=cut, modes=mask.numel(),
                masked=1.0 - mask.double().mean().item(),
                energy_kept=(e_masked.sum() / e_full.sum().clamp_min(1e-300)).item(),
                energy_kept_median=per_channel.median().item(),
                modes_kept_median=statistics.median(kept), modes_kept=kept,
            ))
    return rows


def summarize(rows: Sequence[Dict]) -> List[Dict]:
    """Per layer kind: the fraction of all its modes masked, the mean and the lowest energy kept over its
    layers and axes, the median over all its channels of the modes kept, and its grids."""
    out = []
    for kind in LAYER_KINDS:
        mine = [r for r in rows if r['kind'] == kind]
        if not mine:
            continue
        modes = sum(r['modes'] for r in mine)
        out.append(dict(
            kind=kind, layers=len({r['layer'] for r in mine}),
            grids=sorted({r['grid'] for r in mine}, reverse=True),
            masked=sum(r['masked'] * r['modes'] for r in mine) / modes,
            energy_kept=sum(r['energy_kept'] for r in mine) / len(mine),
            energy_kept_min=min(r['energy_kept'] for r in mine),
            modes_kept_median=statistics.median(k for r in mine for k in r['modes_kept']),
        ))
    return out


def format_report(rows: Sequence[Dict]) -> str:
    """Markdown table, one line per layer and axis."""
    lines = ['| layer | kind | axis | grid | bandlimit | modes masked | energy kept | median per channel '
             '| modes kept per channel (median) |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        cut = 'off' if r['bandlimit'] is None else f'{r["bandlimit"]:g}'
        lines.append(f'| {r["layer"]} | {r["kind"]} | {r["axis"]} | {r["grid"]} | {cut} | {100 * r["masked"]:.1f}% '
                     f'| {100 * r["energy_kept"]:.1f}% | {100 * r["energy_kept_median"]:.1f}% '
                     f'| {r["modes_kept_median"]:g} |')
    return '\n'.join(lines)


def format_summary(summary: Sequence[Dict]) -> str:
    """Markdown table, one line per layer kind."""
    lines = ['| kind | layers | grids | modes masked | energy kept (mean) | energy kept (lowest) '
             '| modes kept per channel (median) |',
             '|---|---|---|---|---|---|---|']
    for s in summary:
        grids = '/'.join(str(g) for g in s['grids'])
        lines.append(f'| {s["kind"]} | {s["layers"]} | {grids} | {100 * s["masked"]:.1f}% '
                     f'| {100 * s["energy_kept"]:.1f}% | {100 * s["energy_kept_min"]:.1f}% '
                     f'| {s["modes_kept_median"]:g} |')
    return '\n'.join(lines)


def write_report_csv(rows: Sequence[Dict], path: str) -> str:
    """Write the rows (REPORT_FIELDS) to `path`."""
    with replaced_atomically(path) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=REPORT_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ('' if r[k] is None else r[k]) for k in REPORT_FIELDS})
    return path


def plotted_layer(model: nn.Module, layer: str, axis: int, channels: Sequence[int]) -> S4ND:
    """The S4ND layer named `layer`, once `axis` and `channels` are checked against it (a clear error
    otherwise): what `plot_layer_kernels` draws, checkable before any other work."""
    layers = dict(s4nd_layers(model))
    if layer not in layers:
        raise ValueError(f'layer must name an S4ND layer with SSM kernels, one of {list(layers)}, got {layer!r}')
    s4nd = layers[layer]
    if not 0 <= axis < s4nd.ndim:
        raise ValueError(f'axis must be in [0, {s4nd.ndim}) for {layer}, got {axis}')
    dim = s4nd.kernels[axis].dim
    if any(not 0 <= c < dim for c in channels):
        raise ValueError(f'channels must be in [0, {dim}) for {layer}, got {list(channels)}')
    return s4nd


def plot_layer_kernels(
        model: nn.Module,
        layer: str,
        path: str,
        bandlimit: Optional[float] = None,
        axis: int = 0,
        channels: Sequence[int] = (0,),
        grid: Optional[int] = None,
) -> str:
    """Plot the forward axis kernels of S4ND layer `layer` (a module name) at rate 1 and rate 1/2 against the
    position in reference-grid steps, without (left) and with (right) the band-limit mask; saved as PNG.

    The rate-1/2 kernel has twice the taps at half the step; it is drawn divided by its rate (a density), and every
    tap at the centre of the cell it integrates (tap l of rate r at (l + 1/2) r: the discretization's taps are
    integrals over cells, not point samples), so that both samplings of one continuous kernel lie on one curve.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or window state

    s4nd = plotted_layer(model, layer, axis, channels)
    kernel = s4nd.kernels[axis]
    size = s4nd.l_ref[axis] if s4nd.l_ref is not None else grid
    if size is None:
        raise ValueError(f'S4ND layer {layer} has no reference grid (l_ref): pass grid')
    cut = kernel_bandlimit(kernel) if bandlimit is None else bandlimit or None  # (0: off, as None)
    fig = Figure(figsize=(10, 3.6), dpi=120)
    masked = 'no band-limit: nothing masked' if cut is None else f'masked, bandlimit {cut:g}'
    panels = [(None, 'no mask'), (cut, masked)]
    for i, (limit, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for rate, style in ((1.0, dict(marker='o', linestyle='-')), (0.5, dict(marker='.', linestyle='--'))):
            n = round(size / rate)  # taps at this rate, as on an input of that size
            length = s4nd.kernel_lengths((n,) * s4nd.ndim, (rate,) * s4nd.ndim)[axis]
            k = _axis_kernel(kernel, length, rate, limit)[0]  # the forward direction, first rank-1 term
            position = (torch.arange(length, dtype=torch.float64) + 0.5) * rate  # cell centres
            for c in channels:
                ax.plot(position, k[c] / rate, label=f'ch {c}, rate {rate:g}', markersize=3, **style)
        ax.set_xlabel(f'position (steps of the {size}-point reference grid)')
        ax.set_ylabel('kernel / rate')
        ax.set_title(f'{layer} axis {axis}: {title}', fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format='png')
    return path
