""" S4 sequence classifier

A 1D S4ND network for sequences (B, C, L): raw 1D signals, or images flattened to pixel sequences
(sequential MNIST). The block is the S4 paper's: S4 layer -> GELU -> dropout -> pointwise linear with a
GLU -> dropout -> residual -> LayerNorm over channels. A pointwise input projection, `depth` blocks at full
length, then global pooling and a linear head.

Every S4ND layer is referenced to the training length (`seq_len`), so the rate follows the input: the same
weights run on the signal sampled at half or double the rate and see the same continuous kernels.
With causal layers (`bidirectional=False`, kernel 's4d' or 's4') the model also runs one sample at a time
(`default_state`, `step`): each step costs the same whatever the length of the past.

`mixer='conv'` swaps each S4ND layer for a depthwise 1D conv of `conv_kernel_size` samples (causal when
`bidirectional=False`) and changes nothing else: the baseline whose receptive field is fixed in samples.

Papers:
* `Efficiently Modeling Long Sequences with Structured State Spaces` - https://arxiv.org/abs/2111.00396
* `S4ND: Modeling Images and Videos as Multidimensional Signals Using State Spaces`
  - https://arxiv.org/abs/2210.06583
"""
import math
import numbers
from functools import partial
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, calculate_drop_path_rates, get_act_layer
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    checkpoint_seq,
    generate_default_cfgs,
    get_pretrained_cfg,
    named_apply,
    register_model,
)
from timm.models._features import feature_take_indices

from ..layers import S4ND, ChannelLayerNorm, S4NDRecurrence, check_kernel_args
from ..layers.recurrent import made_from
from ..layers.ssm_kernel import check_sizes, is_int
from ._base import (
    LIBRARY_CFG,
    MIXER_TYPES,
    S4_ID,
    SSMNoWeightDecay,
    feature_cfg,
    init_weights,
    paper_cfg,
    update_model_args,
)
from ._checkpoint import (
    adapt_input_channels,
    check_pretrained_file,
    check_weights_fit,
    filter_args,
    split_input_size,
    unwrap_state_dict,
)
from ._checks import check_input, check_model_sizes, check_num_classes, check_rates

torch.fx.wrap('check_input')  # a call in FX graphs (timm's feature_cls='fx'): the check runs on the real input

__all__ = ['SeqS4ND', 'SeqS4NDBlock', 'SeqState']

POOLS = ('avg', 'max', 'last', '')
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class SeqState(NamedTuple):
    """The recurrent state of a `SeqS4ND`: one `S4NDRecurrence` and its state (B, dim, N) per block."""
    recurrences: Tuple[S4NDRecurrence, ...]
    states: Tuple[torch.Tensor, ...]


class SeqS4NDBlock(nn.Module):
    """S4 block: (B, dim, L) -> (B, dim, L), x + drop_path(drop(GLU(W drop(GELU(mixer(x)))))), then LayerNorm."""

    def __init__(
            self,
            dim: int,
            mixer: nn.Module,
            act_layer: Union[str, type] = 'gelu',
            drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.mixer = mixer
        self.act = get_act_layer(act_layer)()
        self.drop = nn.Dropout(drop)
        self.out_proj = nn.Conv1d(dim, 2 * dim, kernel_size=1, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm = ChannelLayerNorm(dim, eps=1e-5, **dd)  # (nn.LayerNorm's eps, as in the S4 block)

    def _pointwise(self, x: torch.Tensor, y: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Everything after the mixer, for (B, dim, L), or with `sample` for one sample (B, dim)."""
        y = self.drop(self.act(y))
        # a sample goes through the projection module as a length-1 sequence, not F.linear on its weight: the
        # module's forward pre-hooks (torch.nn.utils.prune recomputes a pruned weight from the unpruned one) run, as
        # in the forward (read directly, a pruned weight was the last forward's, stale after an update)
        y = self.out_proj(y[..., None])[..., 0] if sample else self.out_proj(y)
        y = self.drop(F.glu(y, dim=1))
        return self.norm(x + self.drop_path(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pointwise(x, self.mixer(x))

    def step(self, x: torch.Tensor, recurrence: S4NDRecurrence, state: torch.Tensor) -> tuple:
        """One sample (B, dim) -> (B, dim), new state."""
        y, state = recurrence.step(x, state)
        return self._pointwise(x, y, sample=True), state


class SeqS4ND(SSMNoWeightDecay, nn.Module):
    """S4 sequence classifier: (B, in_chans, L) -> (B, num_classes)."""

    def __init__(
            self,
            in_chans: int = 1,
            num_classes: int = 10,
            global_pool: str = 'avg',
            seq_len: int = 784,
            depth: int = 4,
            dim: int = 64,
            mixer: str = 's4nd',
            kernel: str = 's4d',
            bidirectional: bool = False,
            d_state: int = 64,
            ssm_init: Optional[str] = None,
            dt_min: float = 1e-3,
            dt_max: float = 1e-1,
            bandlimit: Optional[float] = None,
            conv_kernel_size: int = 9,
            act_layer: Union[str, type] = 'gelu',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: input channels (1 for pixel sequences and mono signals).
            num_classes: classifier outputs (0 for pooled features).
            global_pool: pooling over time, 'avg', 'max', 'last' (the last sample: what a causal model has seen
                of the whole sequence) or '' (none).
            seq_len: training length; the S4ND kernels are referenced to it (rate 1).
            depth: number of blocks.
            dim: channels of every block.
            mixer: sequence mixing layer, 's4nd' or 'conv' (depthwise conv, the baseline).
            kernel: S4ND per-axis kernel, 's4d', 's4' or 'sgconv' ('s4nd').
            bidirectional: two-sided kernels; False = causal (and the recurrent view for 's4d', 's4').
            d_state: SSM state size ('s4d', 's4').
            ssm_init: SSM initialization (None = the kernel's default; see `S4ND`).
            dt_min, dt_max: step size initialization range ('s4d', 's4').
            bandlimit: S4ND band-limiting cut-off ('s4d', 's4'); 0 or None = off (the S4 layer's default).
            conv_kernel_size: depthwise kernel size ('conv').
            act_layer: activation after the mixer.
            drop_rate: head dropout.
            proj_drop_rate: dropout in the blocks (after the activation and after the GLU).
            drop_path_rate: stochastic depth of the blocks' residual branches, rising linearly to this rate (timm's).
        """
        super().__init__()
        if mixer not in MIXER_TYPES:
            raise ValueError(f'mixer must be one of {MIXER_TYPES}, got {mixer!r}')
        check_kernel_args(kernel, ssm_init, d_state, dt_min, dt_max, name='ssm_init', bandlimit=bandlimit)
        if not isinstance(bidirectional, bool):  # (bool('false') is True: a two-sided conv for a causal one)
            raise ValueError(f'bidirectional must be a bool (False: causal), got {bidirectional!r}')
        if global_pool not in POOLS:
            raise ValueError(f'global_pool must be one of {POOLS}, got {global_pool!r}')
        # (conv_kernel_size whatever the mixer, as the S4ND keywords are: a 0 built and then failed in oneDNN at the
        # first forward, True built a 1-tap conv)
        # (dim too: 2.5 failed in a conv as 'out_channels must be divisible by groups', True inside torch.empty)
        check_sizes(seq_len=seq_len, dim=dim, conv_kernel_size=conv_kernel_size)
        check_model_sizes(in_chans, num_classes, depth=depth)
        check_rates(drop_rate=drop_rate, proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self._traits = dict(first_conv=None)  # timm's loader adapts Conv2d stems only: `checkpoint_filter_fn` does
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.seq_len = int(seq_len)  # (a NumPy integer too, as the other size arguments)
        self.mixer = mixer
        self.bidirectional = bidirectional
        self.grad_checkpointing = False

        self.stem = nn.Conv1d(in_chans, dim, kernel_size=1, **dd)
        self.blocks = nn.Sequential(*[
            SeqS4NDBlock(dim, self._make_mixer(
                dim, kernel, d_state, ssm_init, dt_min, dt_max, bandlimit, conv_kernel_size, dd),
                act_layer=act_layer, drop=proj_drop_rate, drop_path=rate, **dd)
            for rate in calculate_drop_path_rates(drop_path_rate, depth)
        ])
        self.feature_info = [dict(num_chs=dim, reduction=1, module=f'blocks.{i}') for i in range(depth)]
        self.num_features = self.head_hidden_size = dim
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        named_apply(init_weights, self)

    def _make_mixer(self, dim, kernel, d_state, ssm_init, dt_min, dt_max, bandlimit, conv_kernel_size,
                    dd) -> nn.Module:
        if self.mixer == 's4nd':
            return S4ND(dim, ndim=1, d_state=d_state, bidirectional=self.bidirectional, kernel=kernel, init=ssm_init,
                        dt_min=dt_min, dt_max=dt_max, bandlimit=bandlimit, l_ref=self.seq_len, **dd)
        if self.bidirectional:
            padding = (conv_kernel_size // 2, (conv_kernel_size - 1) // 2)
        else:
            padding = (conv_kernel_size - 1, 0)
        return nn.Sequential(
            nn.ConstantPad1d(padding, 0.),
            nn.Conv1d(dim, dim, conv_kernel_size, groups=dim, **dd))

    @torch.jit.ignore
    def set_input_size(self, seq_len: Optional[int] = None) -> None:
        """Make `seq_len` the model's native length (None keeps it, as in timm), keeping its function: the S4ND
        layers keep their reference grids (saved with the weights; the rate follows the input),
        `pretrained_cfg['input_size']` becomes (C, seq_len)."""
        if seq_len is not None:
            check_sizes(seq_len=seq_len)
            self.seq_len = int(seq_len)
        if getattr(self, 'pretrained_cfg', None) is not None:  # (set by timm's builder)
            self.pretrained_cfg.update(input_size=(self.in_chans, self.seq_len), pool_size=(self.seq_len,))
        update_model_args(self, seq_len=self.seq_len)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(stem=r'^stem', blocks=r'^blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        check_num_classes(num_classes)
        if global_pool is not None:
            if global_pool not in POOLS:
                raise ValueError(f'global_pool must be one of {POOLS}, got {global_pool!r}')
            self.global_pool = global_pool
        self.num_classes = num_classes
        param = self.stem.weight
        self.head = (nn.Linear(self.num_features, num_classes, device=param.device, dtype=param.dtype)
                     if num_classes > 0 else nn.Identity())

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        return check_input(x, self.in_chans, layout='(B, C, L)')

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCL',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the blocks in `indices` (last n if int, all if None), each (B, dim, L).

        `norm` is accepted for timm's interface; every block ends with its norm.
        """
        if output_fmt not in ('NCL', 'NCHW'):  # timm's feature wrappers ask for 'NCHW': channels first
            raise ValueError(f"output_fmt must be 'NCL' (channels first), got {output_fmt!r}")
        x = self._check_input(x)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.stem(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        checkpointed = self.grad_checkpointing and not torch.jit.is_scripting()
        for i, block in enumerate(blocks):
            x = checkpoint(block, x) if checkpointed else block(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and head) not needed for the intermediates in `indices`. `prune_norm` is accepted for
        timm's interface: there is no final norm to drop (every block ends with its norm)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, L) -> (B, dim, L)."""
        x = self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, dim, L) -> (B, num_classes) (pooled); with global_pool='' (B, num_classes, L)."""
        if self.global_pool == 'avg':
            x = x.mean(-1)
        elif self.global_pool == 'max':
            x = x.amax(-1)
        elif self.global_pool == 'last':
            x = x[..., -1]
        x = self.head_drop(x)
        if pre_logits:
            return x
        if self.global_pool == '':
            return self.head(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # the recurrent view (causal S4ND models)

    def default_state(self, batch_size: int, rate: float = 1.0) -> SeqState:
        """The zero state for stepping `batch_size` sequences sampled at `rate` relative to the model's native
        length `seq_len` (1: sequences of seq_len samples; 2: half the sampling rate, seq_len / 2 samples).

        Each layer steps at the rate `forward_features` gives it for a sequence of seq_len / rate samples (its
        reference length over that length: weights loaded from a model of another length, or `set_input_size`,
        keep their layers' reference). The SSMs are discretized here, once, from the current parameters; make a
        new state after they change (`step` refuses a state made before an optimizer step, `load_state_dict`,
        `.to()` or `.double()`).
        """
        if self.mixer != 's4nd':
            raise ValueError(f"the recurrent view needs mixer='s4nd', got mixer={self.mixer!r}")
        if not is_int(batch_size) or batch_size < 0:  # (a float failed in torch.Size, True made a batch of 1)
            raise ValueError(f'batch_size must be a non-negative integer, got {batch_size!r}')
        if not (isinstance(rate, numbers.Real) and math.isfinite(rate) and rate > 0):
            raise ValueError(f'rate must be a positive number (seq_len / the length of the sequences stepped '
                             f'through), got {rate!r}')
        dtype = torch.promote_types(self.stem.weight.dtype, torch.float32)
        recurrences = tuple(S4NDRecurrence(block.mixer, rate * block.mixer.resolve_rate((self.seq_len,))[0], dtype)
                            for block in self.blocks)
        return SeqState(recurrences, tuple(r.default_state(batch_size) for r in recurrences))

    def step(self, x: torch.Tensor, state: SeqState) -> Tuple[torch.Tensor, SeqState]:
        """One sample x (B, in_chans) -> (features (B, dim), new state).

        Stepping through x[..., t] of a whole sequence of L samples from `default_state(B, seq_len / L)` (the
        default for L = seq_len) gives `forward_features(x)[..., t]` (in eval mode), so
        `forward_head(features[..., None])` with global_pool='last' classifies the sequence seen so far.
        """
        if x.ndim != 2 or x.shape[1] != self.in_chans:
            raise ValueError(f'step expects one sample (B, {self.in_chans}), got shape {tuple(x.shape)}')
        if not isinstance(state, SeqState):  # (the features, `step`'s first result, failed on a missing attribute)
            raise ValueError(f'state must be the SeqState of default_state or of the last step (step returns '
                             f'(features, state)), got {type(state).__name__}')
        if len(state.states) != len(self.blocks):
            raise ValueError(f'state holds {len(state.states)} blocks, the model has {len(self.blocks)}')
        if x.dtype != self.stem.weight.dtype:
            raise ValueError(f'step expects x in the model\'s dtype {self.stem.weight.dtype}, got {x.dtype}')
        # the recurrences are snapshots: stepping one made before an optimizer step, load_state_dict or .double()
        # would mix the old SSMs with the current pointwise layers, silently
        if not made_from(state.recurrences, [b.mixer for b in self.blocks]):
            raise ValueError('the state was made from other parameters than the model\'s current ones (an optimizer '
                             'step, load_state_dict, .to() or .double() since default_state, or another model): '
                             'make a new one with default_state')
        x = self.stem(x[..., None])[..., 0]  # (the module, its hooks run: see `SeqS4NDBlock._pointwise`)
        states = []
        for block, recurrence, s in zip(self.blocks, state.recurrences, state.states):
            x, s = block.step(x, recurrence, s)
            states.append(s)
        return x, SeqState(state.recurrences, tuple(states))



def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor], model: SeqS4ND, strict: bool = True, warn_classifier: bool = True,
) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint, with the stem adapted to the model's `in_chans` as timm adapts 2D models', when
    they fit the model (`check_weights_fit`; `warn_classifier`: `filter_args`)."""
    state_dict = adapt_input_channels(unwrap_state_dict(state_dict), 'stem', model.in_chans)
    return check_weights_fit(state_dict, model, strict=strict, check_classifier=warn_classifier)


def _create_seq(variant: str, pretrained: bool = False, **kwargs) -> SeqS4ND:
    check_pretrained_file(pretrained, kwargs)
    # timm's builder reads an input_size as (C, H, W); a sequence model's is (C, L): in_chans and seq_len come
    # from it here, and it goes into the model's pretrained_cfg after building
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    stated = split_input_size(kwargs, axes=1)  # a config.json's
    in_chans, seq_len = overlay.pop('input_size', None) or stated or get_pretrained_cfg(variant).input_size
    kwargs.setdefault('in_chans', in_chans)
    kwargs.setdefault('seq_len', seq_len)
    model = build_model_with_cfg(
        SeqS4ND, variant, pretrained,
        pretrained_cfg_overlay=dict(overlay, input_size=None),
        pretrained_filter_fn=partial(checkpoint_filter_fn, **filter_args(kwargs)),
        # the last 4 blocks
        feature_cfg=feature_cfg(kwargs, out_indices=min(4, kwargs.get('depth', 4)), feature_cls='getter'),
        **kwargs)
    seq_len = int(kwargs['seq_len'])  # (the model took it: an integer, maybe NumPy's)
    model.pretrained_cfg.update(input_size=(kwargs['in_chans'], seq_len), pool_size=(seq_len,))
    return model


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 10, 'input_size': (1, 784), 'pool_size': (784,), 'fixed_input_size': False,
        'mean': MNIST_MEAN, 'std': MNIST_STD,
        'first_conv': 'stem', 'classifier': 'head',
        'license': 'apache-2.0', **paper_cfg(S4_ID), **LIBRARY_CFG, **kwargs,
    }


default_cfgs = generate_default_cfgs({
    's4nd_seq_atto.untrained': _cfg(),
    's4nd_seq_tiny.untrained': _cfg(),
    'conv_seq_tiny.untrained': _cfg(),
})


@register_model
def s4nd_seq_atto(pretrained: bool = False, **kwargs) -> SeqS4ND:
    model_args = dict(depth=4, dim=16, d_state=16)
    return _create_seq('s4nd_seq_atto', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def s4nd_seq_tiny(pretrained: bool = False, **kwargs) -> SeqS4ND:
    model_args = dict(depth=4, dim=64)
    return _create_seq('s4nd_seq_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def conv_seq_tiny(pretrained: bool = False, **kwargs) -> SeqS4ND:
    model_args = dict(depth=4, dim=64, mixer='conv')
    return _create_seq('conv_seq_tiny', pretrained=pretrained, **dict(model_args, **kwargs))
