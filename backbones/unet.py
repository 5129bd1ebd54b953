"""`UNet`: the ADM-style encoder / midblock / decoder skeleton that `ImageUNet` and `VideoUNet` share.

    x_t [N x C x *P x *S]  --fold P into the batch, conv_in-->  h [N*prod(P) x C' x *S]
    encoder level i: steps (a skip after each) [+ Downsample, a skip]       -> tap down.i
    midblock                                                                -> tap mid
    decoder level i: steps on [h | skip] [+ Upsample to the skip's size]    -> tap up.i
    GroupNorm-SiLU-conv_out, unfold  -->  v [N x C_out x *P x *S]

S are the `SPATIAL_DIMS` dims that the convolutions and resamplers act on (H, W). P are the
positional dims before them (`POSITIONAL_DIMS - SPATIAL_DIMS` of them: none for images, the frames
F for video); they are folded into the batch, so every spatial layer sees each frame as an image,
and the embedding and context are repeated to match. Level i has base_channels * channel_mult[i]
channels; every level but the last ends in a 2x Downsample, and the decoder mirrors it (up.0 is
the lowest resolution).

A subclass says what a step and the midblock are: `_level_blocks` and `_mid_block` build them
(the named children of each `UNetLevel`, so they set the state_dict names), `_step` and `_mid`
run them. The rest lives here: time and label / context conditioning, conv_in and the head, the
channel and skip bookkeeping, resampling, taps and early exit, gradient checkpointing (each
block runs through `_block`) and `feature_info`. Taps are [N x C' x *P x *S'], with the folded
dims restored; `feature_info` gives their channels and spatial reduction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Backbone, check_levels, validate_backbone_fields
from .layers import AttentionBlock, Downsample, ResBlock, Upsample, conv_nd

__all__ = ["UNet", "UNetConfig", "UNetLevel", "UNetPass", "fold", "unfold", "unet_feature_info",
           "validate_unet_config"]


@dataclass(frozen=True)
class UNetConfig:
    """The fields of every UNet config; the defaults are `ImageUNet`'s "default" preset. Errors
    name the subclass.

    Conditioning: `num_classes` (labels, plus a null label `num_classes` for CFG dropout) or
    `context_dim` (cross-attention to a context (N, L, context_dim)), not both. Attention heads:
    exactly one of `head_dim` / `num_heads`. Level i has base_channels * channel_mult[i] channels.
    """

    in_channels: int = 3
    out_channels: int | None = None  # None: in_channels
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (2,)
    head_dim: int | None = 32
    num_heads: int | None = None
    dropout: float = 0.0
    num_classes: int | None = None
    context_dim: int | None = None
    groups: int = 32
    attention_backend: str = "sdpa"
    gradient_checkpointing: bool = False
    qk_norm: bool = True             # QKNorm in every attention (the tiny presets: off)

    def __post_init__(self) -> None:
        # recipes arrive as TOML/JSON, where tuples are lists
        for name in ("channel_mult", "attention_levels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        validate_unet_config(self)


def validate_unet_config(cfg: UNetConfig, extra_attending: Iterable[int] = ()) -> None:
    """The checks every UNet config gets, ValueError naming the config class: positive sizes,
    channel_mult, attention_levels, dropout, heads, the condition, the attention backend, and that
    every level divides by `groups` and every attending level (attention_levels, `extra_attending`,
    and the last level, where the midblock attends) by the head split."""
    owner = type(cfg).__name__

    def positive(name: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")

    for name in ("in_channels", "base_channels", "num_res_blocks", "groups"):
        positive(name, getattr(cfg, name))
    for name in ("out_channels", "head_dim", "num_heads", "num_classes", "context_dim"):
        positive(name, getattr(cfg, name), allow_none=True)
    if not cfg.channel_mult:
        raise ValueError(f"{owner}.channel_mult must name at least one level")
    for m in cfg.channel_mult:
        positive("channel_mult entries", m)
    levels = len(cfg.channel_mult)
    check_levels(owner, "attention_levels", cfg.attention_levels, levels)
    if (cfg.head_dim is None) == (cfg.num_heads is None):
        raise ValueError(f"{owner}: give exactly one of head_dim and num_heads")
    validate_backbone_fields(cfg)
    attending = set(cfg.attention_levels) | set(extra_attending) | {levels - 1}
    for i, m in enumerate(cfg.channel_mult):
        ch = cfg.base_channels * m
        if ch % cfg.groups:
            raise ValueError(f"{owner}: level {i} has {ch} channels, not divisible by groups={cfg.groups}")
        if i in attending:
            split, what = (cfg.head_dim, "head_dim") if cfg.head_dim else (cfg.num_heads, "num_heads")
            if ch % split:
                raise ValueError(f"{owner}: level {i} has {ch} channels (with attention), "
                                 f"not divisible by {what}={split}")


def unet_feature_info(channels: list[int]) -> dict[str, dict[str, int]]:
    """Channels and reduction (input size / tap size) of each tap of a UNet with len(channels) levels.

    Level i has channels[i]; every level but the last ends in a 2x Downsample (so down.i has
    reduction 2 ** min(i + 1, levels - 1)), and the decoder mirrors it (up.0 = lowest resolution,
    after its Upsample).
    """
    levels = len(channels)
    return {
        **{
            f"down.{i}": {"channels": channels[i], "reduction": 2 ** min(i + 1, levels - 1)}
            for i in range(levels)
        },
        "mid": {"channels": channels[-1], "reduction": 2 ** (levels - 1)},
        **{
            f"up.{j}": {"channels": channels[levels - 1 - j], "reduction": 2 ** max(levels - 2 - j, 0)}
            for j in range(levels)
        },
    }


def fold(x: Tensor, dims: int) -> Tensor:
    """[N x C x *P x *S] -> [N*prod(P) x C x *S], for the `dims` positional dims P after C (x
    itself when dims is 0); sample-major, so sample n's positions are consecutive."""
    return x.movedim(1, dims + 1).flatten(0, dims) if dims else x


def unfold(h: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """The inverse of `fold`: [N*prod(P) x C x *S] -> [N x C x *P x *S] for P = `sizes` (a view)."""
    return h.unflatten(0, (-1, *sizes)).movedim(len(sizes) + 1, 1) if sizes else h


@dataclass(frozen=True)
class UNetPass:
    """What the blocks of one forward pass read besides h: the embedding `emb` (B, E) of t [+ the
    label], the `context` (B, L, D) or None, and the sizes of the positional dims `folded` into
    the batch, B = N * prod(folded) (() for images, (F,) for video)."""

    emb: Tensor
    context: Tensor | None
    folded: tuple[int, ...]


class UNetLevel(nn.Module):
    """One resolution of the encoder or decoder: a subclass's blocks (named children, in the order
    given) [+ resampler]."""

    def __init__(self, blocks: dict[str, nn.Module], resample: nn.Module | None):
        super().__init__()
        for name, module in blocks.items():
            self.add_module(name, module)
        self.resample = resample


class UNet(Backbone):
    """UNet predicting v: x_t [N x C x *P x *S], t (N,), cond -> v like x_t (module docstring).

    `cond` is None, a LongTensor (N,) of labels in [0, num_classes] (num_classes is the null
    label; None also means null), or a float context (N, L, context_dim) shared by all positions
    of P. Computes in the parameter dtype; returns v in x_t's dtype, contiguous.
    """

    SPATIAL_DIMS: ClassVar[int] = 2     # convolved and resampled (H, W)
    POSITIONAL_DIMS: ClassVar[int] = 2  # of x_t; those before the spatial ones are folded into the batch
    config: UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        dims, levels, emb = self.SPATIAL_DIMS, len(c.channel_mult), self.emb_dim

        self.time_embed = nn.Sequential(nn.Linear(c.base_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_embed = nn.Embedding(c.num_classes + 1, emb) if c.num_classes else None
        self.conv_in = conv_nd(dims, c.in_channels, c.base_channels, 3, padding=1)

        ch = c.base_channels
        skip_chs = [ch]  # the channels of each skip the encoder pushes, popped by the decoder
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.channel_mult):
            steps = []
            for _ in range(c.num_res_blocks):
                steps.append((ch, c.base_channels * mult))
                ch = c.base_channels * mult
                skip_chs.append(ch)
            blocks = self._level_blocks(i, steps)
            down = Downsample(ch, dims=dims) if i < levels - 1 else None
            if down is not None:
                skip_chs.append(ch)
            self.down.append(UNetLevel(blocks, down))

        self.mid = self._mid_block(ch)

        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            steps = []
            for _ in range(c.num_res_blocks + 1):
                steps.append((ch + skip_chs.pop(), c.base_channels * c.channel_mult[i]))
                ch = c.base_channels * c.channel_mult[i]
            blocks = self._level_blocks(i, steps)
            self.up.append(UNetLevel(blocks, Upsample(ch, dims=dims) if i > 0 else None))

        self.norm_out = nn.GroupNorm(c.groups, ch)
        self.conv_out = conv_nd(dims, ch, c.out_channels or c.in_channels, 3, padding=1)

        self.feature_layers = tuple(
            [f"down.{i}" for i in range(levels)] + ["mid"] + [f"up.{j}" for j in range(levels)]
        )
        # reduction is of the spatial dims; taps keep the folded ones (every frame)
        self.feature_info = unet_feature_info([c.base_channels * m for m in c.channel_mult])

    @property
    def emb_dim(self) -> int:
        """Width of the embedding of t [+ label] that every ResBlock reads (ADM: 4 x base_channels)."""
        return 4 * self.config.base_channels

    # ------------------------------------------------------------ what a subclass defines

    def _level_blocks(self, level: int, steps: list[tuple[int, int]]) -> dict[str, nn.Module]:
        """The blocks of encoder or decoder `level`, for one step per (in, out) channels in `steps`:
        the named children of its `UNetLevel`, built in the order they run."""
        raise NotImplementedError

    def _mid_block(self, ch: int) -> nn.Module:
        """The midblock at `ch` channels."""
        raise NotImplementedError

    def _step(self, level: UNetLevel, j: int, h: Tensor, p: UNetPass) -> Tensor:
        """Step j of `level` on h [B x C x *S], each block through `_block`."""
        raise NotImplementedError

    def _mid(self, h: Tensor, p: UNetPass) -> Tensor:
        """The midblock on h [B x C x *S], each block through `_block`."""
        raise NotImplementedError

    # ------------------------------------------------------------ blocks the subclasses share

    def _res_block(self, cin: int, cout: int) -> ResBlock:
        c = self.config
        return ResBlock(cin, cout, self.emb_dim, dims=self.SPATIAL_DIMS, dropout=c.dropout, groups=c.groups)

    def _attention_block(self, ch: int) -> AttentionBlock:
        c = self.config
        return AttentionBlock(ch, **self._heads(), context_dim=c.context_dim, backend=c.attention_backend,
                              groups=c.groups, qk_norm=c.qk_norm)

    def _heads(self) -> dict[str, int]:
        """The head split the config gives, as the keyword attention blocks take."""
        c = self.config
        return {"head_dim": c.head_dim} if c.head_dim else {"num_heads": c.num_heads}

    # ------------------------------------------------------------ the forward pass

    def _run(self, x_t: Tensor, t: Tensor, cond: Any, tap: Callable[[str, Tensor], Tensor]) -> Tensor:
        c = self.config
        dtype = self.conv_in.weight.dtype
        emb, context = self._embed_conditioning(x_t, t, cond, c.base_channels, dtype)
        folded = tuple(x_t.shape[2 : 2 + self.POSITIONAL_DIMS - self.SPATIAL_DIMS])
        if folded:  # every position of the folded dims is a sample of the spatial layers
            emb = emb.repeat_interleave(math.prod(folded), dim=0)
            if context is not None:
                context = context.repeat_interleave(math.prod(folded), dim=0)
        p = UNetPass(emb, context, folded)

        def tapped(name: str, h: Tensor) -> Tensor:
            return fold(tap(name, unfold(h, folded)), len(folded))

        h = self.conv_in(fold(x_t.to(dtype), len(folded)))
        skips = [h]
        for i, level in enumerate(self.down):
            for j in range(c.num_res_blocks):
                h = self._step(level, j, h, p)
                skips.append(h)
            if level.resample is not None:
                h = self._block(level.resample, h)
                skips.append(h)
            h = tapped(f"down.{i}", h)

        h = tapped("mid", self._mid(h, p))

        for i, level in enumerate(self.up):
            for j in range(c.num_res_blocks + 1):
                h = self._step(level, j, torch.cat([h, skips.pop()], dim=1), p)
            if level.resample is not None:
                # upsample to the size of the matching skip, so odd sizes round-trip
                h = self._block(level.resample, h, tuple(skips[-1].shape[2:]))
            h = tapped(f"up.{i}", h)

        v = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return unfold(v, folded).to(x_t.dtype).contiguous()
