""" ViT-S4ND

A Vision Transformer whose self-attention is replaced by an S4ND global convolution: patch
embedding -> pre-norm blocks (S4ND token mixer, MLP) -> norm -> average pooling -> classifier.
There is no position embedding and no class token: the convolution knows where tokens are.

Two token layouts for the S4ND mixer (`token_layout`):
* '2d' (default): S4ND on the patch grid (B, C, H/16, W/16). The kernels are continuous functions
  of position referenced to the training grid, so the model runs at any input size (square or
  not) without re-creation, and the mixer sees the same kernel over the image at every resolution.
* '1d': S4ND over the raster-flattened patch sequence (B, C, H/16 * W/16), as in the published
  ViT-S4ND experiments (whose layer was S4's: `kernel='s4'`). Rows are concatenated, so this layout is not
  resolution-consistent (a row step is W/16 sequence steps); it is here for comparisons.

The patch stem is timm's strided 16x16 conv (`PatchEmbed`): unlike the S4ND stem of ConvNeXt-S4ND
it is not resolution-invariant, since a patch always covers 16 pixels, whatever the image size.

Papers:
* `S4ND: Modeling Images and Videos as Multidimensional Signals Using State Spaces`
  - https://arxiv.org/abs/2210.06583
* `An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale`
  - https://arxiv.org/abs/2010.11929

Resolution control: every S4ND layer knows the training grid (`img_size // patch_size`, saved with
the weights) and derives its step-size rate from each input's grid. `set_input_size(img_size)` makes
another resolution the native one (the patch grid's and the data config's), keeping the function.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from einops import rearrange
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    LayerNorm,
    Mlp,
    PatchEmbed,
    calculate_drop_path_rates,
    get_act_layer,
    nchw_to,
    resample_patch_embed,
    to_2tuple,
)
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    checkpoint_seq,
    generate_default_cfgs,
    named_apply,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import init_weights_vit_timm

from ..layers import S4ND, check_kernel_args, stacked_kernels
from ..layers.ssm_kernel import is_int
from ._base import LIBRARY_CFG, S4NDModel, check_global_pool, feature_cfg, paper_cfg, update_model_args
from ._checkpoint import check_pretrained_file, filter_args, stated_img_size, transfer_timm_weights, unwrap_state_dict
from ._checks import check_img_size, check_input, check_model_sizes, check_rates

torch.fx.wrap('check_input')  # a call in FX graphs (timm's feature_cls='fx'): the check runs on the real input
torch.fx.wrap('rearrange')  # (einops does not take FX proxies)

__all__ = ['VisionTransformerS4ND']

# S4ND step size initialization range per token layout (with Re(A) = -1/2 a mode decays e-fold over 2 / dt
# steps): the ImageNet ConvNeXt-S4ND range for the 14x14 grid (2-20 patches), the S4 sequence range for the
# 196-long raster sequence (20-2000 tokens).
_LAYOUT_DT = {'2d': (0.1, 1.0), '1d': (0.001, 0.1)}


class S4NDMixer(nn.Module):
    """Token mixer in place of self-attention: S4ND -> GELU -> linear projection with GLU.

    '2d': S4ND(ndim=2) on the grid, referenced to `grid_size`; '1d': S4ND(ndim=1) on the
    raster-flattened sequence, referenced to its length.

    Shapes: (B, Hp, Wp, C) -> (B, Hp, Wp, C).
    """

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            token_layout: str,
            s4nd_layer: Callable,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.token_layout = token_layout
        self.s4nd = s4nd_layer(dim, ndim=2 if token_layout == '2d' else 1, l_ref=self.input_grid(grid_size))
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, 2 * dim, device=device, dtype=dtype)
        self.gate = nn.GLU(dim=-1)

    def input_grid(self, grid_size: Sequence[int]) -> Tuple[int, ...]:
        """The spatial sizes of the S4ND input for a patch grid of `grid_size`: the grid, or the sequence length."""
        return tuple(grid_size) if self.token_layout == '2d' else (grid_size[0] * grid_size[1],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_layout == '2d':
            y = self.s4nd(rearrange(x, 'b h w c -> b c h w'))
            y = rearrange(y, 'b c h w -> b h w c')
        else:
            y = self.s4nd(rearrange(x, 'b h w c -> b c (h w)'))  # raster order: row after row
            y = rearrange(y, 'b c (h w) -> b h w c', h=x.shape[1])
        return self.gate(self.proj(self.act(y)))


class S4NDViTBlock(nn.Module):
    """Pre-norm ViT block with the S4ND mixer in place of attention: (B, Hp, Wp, C) -> (B, Hp, Wp, C)."""

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            token_layout: str,
            s4nd_layer: Callable,
            mlp_ratio: float = 4.,
            act_layer: Union[str, Callable] = 'gelu',
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = LayerNorm(dim, **dd)
        self.mixer = S4NDMixer(dim, grid_size, token_layout, s4nd_layer, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=get_act_layer(act_layer), **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.mixer(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class VisionTransformerS4ND(S4NDModel):
    """ViT with S4ND token mixing: (B, in_chans, H, W) -> (B, num_classes).

    Blocks work on channels-last tokens that keep the grid, (B, H/p, W/p, C); features come out
    as (B, C, H/p, W/p). Runs at any input whose sides are multiples of the patch size.
    """
    _feature_seq = 'blocks'  # the intermediates are the blocks' outputs

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 768,
            depth: int = 12,
            token_layout: str = '2d',
            mlp_ratio: float = 4.,
            kernel: str = 's4d',
            d_state: int = 64,
            ssm_init: Optional[str] = None,
            dt_min: Optional[float] = None,
            dt_max: Optional[float] = None,
            bandlimit: Optional[float] = None,
            dynamic_img_size: bool = True,
            dynamic_img_pad: bool = False,
            act_layer: Union[str, Callable] = 'gelu',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: training resolution; the S4ND kernels are referenced to its patch grid (rate 1).
            patch_size: side of the square patches (the stride of the patch embedding); an (h, w) pair must be
                square, as in `set_input_size`.
            in_chans: input image channels.
            num_classes: classifier outputs (0 for pooled features).
            global_pool: head pooling type ('' for none).
            embed_dim: token channels.
            depth: number of blocks.
            token_layout: how S4ND sees the patch tokens: '2d' (the patch grid) or '1d' (the raster-flattened
                sequence, as in the published ViT-S4ND).
            mlp_ratio: MLP expansion ratio.
            kernel: per-axis kernel of every S4ND layer: 's4d' (diagonal SSM), 's4' (DPLR SSM, the published
                ViT-S4ND's) or 'sgconv' (`S4ND`'s `kernel`).
            d_state: SSM state size per axis ('s4d', 's4').
            ssm_init: initialization of A: 'lin', 'inv' or 'legs' for 's4d', 'legs' for 's4' (None: the kernel's
                default, 'lin' for 's4d', 'legs' for 's4'; 'sgconv' takes none).
            dt_min, dt_max: step size initialization range ('s4d', 's4'; None: 0.1-1.0 for '2d', 0.001-0.1 for
                '1d').
            bandlimit: S4ND band-limiting cut-off ('s4d', 's4'; 0 or None = off).
            dynamic_img_size: timm's ViT flag: accept any input size (multiples of the patch size). True by
                default, since nothing here is tied to one grid; False refuses every size but `img_size`.
            dynamic_img_pad: timm's ViT flag: pad inputs on the bottom and right to a multiple of the patch size.
            act_layer: MLP activation.
            drop_rate: head dropout.
            drop_path_rate: stochastic depth rate.
        """
        super().__init__()
        check_global_pool(global_pool)
        check_model_sizes(in_chans, num_classes, depth=depth)
        check_rates(drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        if token_layout not in _LAYOUT_DT:
            raise ValueError(f'token_layout must be one of {tuple(_LAYOUT_DT)}, got {token_layout!r}')
        default_dt_min, default_dt_max = _LAYOUT_DT[token_layout]
        dt_min = default_dt_min if dt_min is None else dt_min
        dt_max = default_dt_max if dt_max is None else dt_max
        check_kernel_args(kernel, ssm_init, d_state, dt_min, dt_max, name='ssm_init', bandlimit=bandlimit)
        patch_size = self._check_patch_size(to_2tuple(patch_size))
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0  # (timm's ViT attribute: no class or register tokens)
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size
        # the blocks' layout, (B, H/p, W/p, C): timm's builder states it in the wrappers that return the blocks'
        # outputs as they are ('fx', 'hook'), as for Swin; the getter gives NCHW intermediates
        self.output_fmt = 'NHWC'

        self.patch_embed = PatchEmbed(
            img_size=check_img_size(img_size), patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            output_fmt='NHWC', strict_img_size=not dynamic_img_size, dynamic_img_pad=dynamic_img_pad, **dd)
        self._check_input_size(self.patch_embed.img_size)
        grid_size = self.patch_embed.grid_size

        s4nd_layer = partial(
            S4ND, kernel=kernel, d_state=d_state, init=ssm_init, dt_min=dt_min, dt_max=dt_max, bandlimit=bandlimit,
            **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            S4NDViTBlock(
                embed_dim, grid_size, token_layout, s4nd_layer, mlp_ratio=mlp_ratio, act_layer=act_layer,
                drop_path=dpr[i], **dd)
            for i in range(depth)
        ])
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size[0]) for i in range(depth)]
        self.norm = LayerNorm(embed_dim, **dd)
        self.head = ClassifierHead(embed_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.head.num_features  # (twice embed_dim with 'catavgmax', as reset_classifier says)
        named_apply(partial(init_weights_vit_timm, needs_reset=False), self)

    @property
    def img_size(self) -> Tuple[int, int]:
        """The native resolution (the patch grid's)."""
        return self.patch_embed.img_size

    def _check_input_size(self, img_size: Tuple[int, int], patch_size: Optional[Tuple[int, int]] = None) -> None:
        patch_size = patch_size or self.patch_embed.patch_size
        if any(s < p or s % p for s, p in zip(img_size, patch_size)):  # (what the input must be)
            raise ValueError(f'img_size must be positive multiples of the patch size {patch_size}, got {img_size}')

    @staticmethod
    def _check_patch_size(patch_size: Tuple[int, int]) -> Tuple[int, int]:
        """`patch_size` as Python ints (NumPy ones, kept, would make the recorded model args unserializable)."""
        if len(patch_size) != 2 or not all(is_int(p) and p > 0 for p in patch_size):
            raise ValueError(f'patch_size must be a positive integer, or a pair of them, got {patch_size}')
        if patch_size[0] != patch_size[1]:  # (a tuple, e.g. a YAML list, as timm's ViT takes it)
            raise ValueError(f'patch_size must be square (feature_info states one reduction), got {patch_size}')
        return int(patch_size[0]), int(patch_size[1])

    @torch.jit.ignore
    def set_input_size(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            patch_size: Optional[Union[int, Tuple[int, int]]] = None,
    ) -> None:
        """Make `img_size` the model's native resolution (the patch grid's; None keeps it), keeping its
        function: see `S4NDModel.set_input_size`. A new `patch_size` resamples the patch embedding as timm's
        ViT does (FlexiViT's pseudo-inverse); the S4ND layers keep their reference grids. With token_layout '2d'
        their continuous kernels then cover the same image extent on the finer or coarser token grid; with '1d'
        the rate follows the token count, not the row spacing, so the kernels change scale (e.g. half the patch
        size stretches them 2x along a row), as for a size change (see the module docstring). Like timm's, it
        replaces `patch_embed.proj`: build the optimizer after."""
        img_size = self.img_size if img_size is None else check_img_size(img_size)
        if patch_size is None:
            patch_size = self.patch_embed.patch_size
        patch_size = self._check_patch_size(to_2tuple(patch_size))
        self._check_input_size(img_size, patch_size)
        if patch_size != self.patch_embed.patch_size:
            self.patch_embed.set_input_size(img_size, patch_size=patch_size)
            for info in self.feature_info:
                info['reduction'] = patch_size[0]
            update_model_args(self, patch_size=patch_size[0])
        else:
            self.patch_embed.set_input_size(img_size)
        self.record_input_size()

    def reference_img_size(self) -> Tuple[int, int]:
        """The image size (H, W) the S4ND layers' reference grids correspond to (see `S4NDModel`): per axis of the
        patch grid for '2d'; for '1d' (a sequence length, H/p * W/p) the patch grid of the same aspect as the
        model's own, scaled by the square root of the length ratio, each side rounded to whole patches (the model
        takes no other). Without blocks (`depth=0`) there is no S4ND layer: `img_size`, as `S4NDModel` answers."""
        if not len(self.blocks):
            return self.img_size
        mixer = self.blocks[0].mixer
        grid = mixer.input_grid(self.patch_embed.grid_size)
        ratios = [r / g for r, g in zip(mixer.s4nd.l_ref, grid)]
        if mixer.token_layout == '1d':
            ratios = [ratios[0] ** 0.5] * 2
        patch = self.patch_embed.patch_size
        return tuple(p * max(1, round(s * r / p)) for s, r, p in zip(self.img_size, ratios, patch))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        patch = None if self.patch_embed.dynamic_img_pad else self.patch_embed.patch_size  # (else: padded to it)
        return check_input(x, self.in_chans, patch=patch)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, H/p, W/p, C)."""
        x = self._check_input(x)
        embed = self.patch_embed
        if embed.strict_img_size or embed.dynamic_img_pad or embed.flatten:
            return embed(x)
        # timm's PatchEmbed.forward less its asserts that the sides are multiples of the patch (checked above): their
        # messages format the sides, which specialized torch.compile(dynamic=True)'s graph to the input size (a
        # recompilation per size, and eager mode past torch's recompile limit)
        return embed.norm(nchw_to(embed.proj(x), embed.output_fmt))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """Outputs of the blocks in `indices` (last n if int, all if None), each (B, C, H/p, W/p)
        for output_fmt 'NCHW' or (B, H/p * W/p, C) for 'NLC' (raster order), and the final features
        (B, C, H/p, W/p), as `forward_features` gives them, unless `intermediates_only`. `output_dict`: as
        timm's ViT, a dict with 'image_intermediates' and (unless `intermediates_only`) 'image_features', the
        final tokens (B, H/p * W/p, C) in raster order, as timm's ViT gives them to the encoders that read it.
        There are no prefix (class) tokens, so `return_prefix_tokens` changes nothing, as in timm's ViT without
        them. The arguments are in timm's ViT's order, so a positional call means what it means there."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        checkpointed = self.grad_checkpointing and not torch.jit.is_scripting()
        intermediates = []
        with stacked_kernels(self, x, lambda: [] if checkpointed else self._block_grids(blocks, x)):
            for i, block in enumerate(blocks):
                x = checkpoint(block, x) if checkpointed else block(x)
                if i in take_indices:
                    y = self.norm(x) if norm else x
                    if output_fmt == 'NCHW':
                        intermediates.append(rearrange(y, 'b h w c -> b c h w'))
                    else:
                        intermediates.append(rearrange(y, 'b h w c -> b (h w) c'))
        if output_dict:
            if intermediates_only:
                return dict(image_intermediates=intermediates)
            tokens = rearrange(self.norm(x), 'b h w c -> b (h w) c')
            return dict(image_intermediates=intermediates, image_features=tokens)
        if intermediates_only:
            return intermediates
        return rearrange(self.norm(x), 'b h w c -> b c h w'), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and norm / head) not needed for the intermediates in `indices`."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, H/p, W/p) -> (B, num_classes); without pooling (global_pool='') logits per token,
        (B, num_classes, H/p, W/p), as ConvNeXt's head gives (timm's linear classifier acts on the last axis).
        Also takes timm's ViT tokens (B, N, C), as `forward_intermediates(output_dict=True)` gives them: pooled over
        N, or without pooling logits per token (B, N, num_classes), as timm's ViT's head gives."""
        if not isinstance(x, torch.fx.Proxy) and x.ndim != 4:  # (an FX graph traces forward_features' 4-D output)
            return self._forward_head_tokens(x, pre_logits=pre_logits)
        if self.head.global_pool.is_identity():
            return self.head(x.movedim(1, -1), pre_logits=pre_logits).movedim(-1, 1)
        return self.head(x, pre_logits=pre_logits)

    def _forward_head_tokens(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """`forward_head` of tokens (B, N, C): pooled over N as over the grid, or per token without pooling."""
        if x.ndim != 3:
            raise ValueError(f'forward_head takes features (B, C, H/p, W/p), as forward_features gives them, or '
                             f'tokens (B, N, C), got shape {tuple(x.shape)}')
        if self.head.global_pool.is_identity():
            return self.head(x, pre_logits=pre_logits)
        return self.head(rearrange(x, 'b n c -> b c n 1'), pre_logits=pre_logits)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, embed_dim, H/p, W/p): channels first, as ConvNeXt's, for the head and
        features_only (timm's ViT gives tokens, (B, N, C): here `forward_intermediates(output_dict=True)` does).

        In a training step the kernels of all blocks are generated together (`stacked_kernels`), as in
        `forward_intermediates`."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return rearrange(self.norm(checkpoint_seq(self.blocks, x)), 'b h w c -> b c h w')
        with stacked_kernels(self, x, lambda: self._block_grids(self.blocks, x)):
            x = self.blocks(x)
        return rearrange(self.norm(x), 'b h w c -> b c h w')

    @staticmethod
    def _block_grids(blocks: Sequence[nn.Module], tokens: torch.Tensor) -> List[Tuple[S4ND, Tuple[int, ...]]]:
        """The S4ND layer of each block with the grid it runs on, for tokens (B, H/p, W/p, C)."""
        return [(b.mixer.s4nd, b.mixer.input_grid(tokens.shape[1:3])) for b in blocks]


_PATCH_WEIGHT = 'patch_embed.proj.weight'


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor], model: VisionTransformerS4ND, strict: bool = True,
        warn_classifier: bool = True,
) -> Dict[str, torch.Tensor]:
    """Load our own checkpoints, and start from a plain timm ViT checkpoint, at the model's patch size.

    A training checkpoint dict is unwrapped first (`unwrap_state_dict`). A patch embedding of another patch size is
    resampled to the model's as timm's ViT filter and `set_input_size(patch_size=)` do (`resample_patch_embed`,
    FlexiViT's pseudo-inverse). Our own weights then load as they are. From a timm `vit_*` state dict every module
    whose tensors fit is taken (`match_state_dict`, as ConvNeXt-S4ND's filter does): the patch embedding (adapted
    to the model's `in_chans` by timm's rule first), the blocks' norms and MLPs and the final norm. Attention, the
    class token and the position embedding have no counterpart; the S4ND mixers (and anything else without one)
    keep the model's initialization, and a one-line report of what was loaded and kept is logged. Weights of which
    nothing outside the head fits (another architecture or width) are refused.
    """
    state_dict = unwrap_state_dict(state_dict)
    weight, patch_size = state_dict.get(_PATCH_WEIGHT), model.patch_embed.patch_size
    changed = {}
    if weight is not None and weight.ndim == 4 and tuple(weight.shape[-2:]) != patch_size:
        state_dict = {**state_dict, _PATCH_WEIGHT: resample_patch_embed(weight, list(patch_size), verbose=True)}
        changed[_PATCH_WEIGHT] = 'resampled from {}x{} to {}x{} patches'.format(*weight.shape[-2:], *patch_size)
    return transfer_timm_weights(state_dict, model, 'patch_embed.proj', source='timm ViT weights', strict=strict,
                                 warn_classifier=warn_classifier, changed=changed)


def _create_vit_s4nd(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformerS4ND:
    check_pretrained_file(pretrained, kwargs)
    stated_img_size(kwargs)
    return build_model_with_cfg(
        VisionTransformerS4ND, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, **filter_args(kwargs)),
        # features_only: the last three blocks, as timm's ViT (all of a shallower model)
        feature_cfg=feature_cfg(kwargs, out_indices=min(3, kwargs.get('depth', 12)), feature_cls='getter'),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc',
        'license': 'apache-2.0', **paper_cfg(), **LIBRARY_CFG, **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'vit_s4nd_atto_patch16_224.untrained': _cfg(),
    'vit_s4nd_tiny_patch16_224.untrained': _cfg(),
    'vit_s4nd_small_patch16_224.untrained': _cfg(),
    'vit_s4nd_base_patch16_224.untrained': _cfg(),
})


@register_model
def vit_s4nd_atto_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformerS4ND:
    """A very small ViT-S4ND for tests (4 blocks of 64 channels)."""
    model_args = dict(patch_size=16, embed_dim=64, depth=4)
    return _create_vit_s4nd('vit_s4nd_atto_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_s4nd_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformerS4ND:
    model_args = dict(patch_size=16, embed_dim=192, depth=12)
    return _create_vit_s4nd('vit_s4nd_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_s4nd_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformerS4ND:
    model_args = dict(patch_size=16, embed_dim=384, depth=12)
    return _create_vit_s4nd('vit_s4nd_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_s4nd_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformerS4ND:
    model_args = dict(patch_size=16, embed_dim=768, depth=12)
    return _create_vit_s4nd('vit_s4nd_base_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))
