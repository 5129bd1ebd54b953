"""`ImageUNet`: the ADM / diffusers-style image UNet, as a `TappedDenoiser` (v-prediction).

    net = ImageUNet.from_preset("tiny")                      # or ImageUNet(config) / ImageUNet(**fields)
    v = net(x_t, t, cond)                                    # [N x C x H x W] -> same shape
    feats = net.forward_features(x_t, t, layers="mid")       # {"mid": [N x C' x H' x W']}

Taps, in execution order: ``down.i`` (encoder level i, after its Downsample), ``mid``,
``up.i`` (decoder level i, up.0 = lowest resolution, after its Upsample). `feature_info`
gives each tap's channels and reduction (input size / tap size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .base import Backbone, apply_overrides, unet_feature_info, validate_unet_config
from .layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    conv_nd,
)

__all__ = ["ImageUNet", "ImageUNetConfig"]


@dataclass(frozen=True)
class ImageUNetConfig:
    """Architecture of an `ImageUNet`; the defaults are the "default" preset (32x32 images).

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
    qk_norm: bool = True             # QKNorm in every attention (the tiny preset: off)

    def __post_init__(self) -> None:
        # recipes arrive as TOML/JSON, where tuples are lists
        for name in ("channel_mult", "attention_levels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        validate_unet_config(self)

class _Level(nn.Module):
    """One resolution of the encoder or decoder: ResBlocks [+ AttentionBlocks] [+ resampler]."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty, or one per ResBlock
        self.resample = resample


class ImageUNet(Backbone):
    """ADM-style UNet predicting v: x_t [N x C x H x W], t (N,), cond -> v like x_t (any H, W).

    Build with ``ImageUNet(config)``, ``ImageUNet(**config_fields)``, ``ImageUNet(config, **overrides)``
    or ``ImageUNet.from_preset(name, **overrides)``. `cond` is None, a LongTensor (N,) of labels
    in [0, num_classes] (num_classes is the null label; None also means null), or a float
    context (N, L, context_dim). Computes in the parameter dtype; returns v in x_t's dtype.
    """

    SHARD_UNITS: ClassVar[tuple[str, ...]] = ("ResBlock", "AttentionBlock")  # FSDP units
    EXAMPLE_INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, 16, 16)
    RECOMMENDED_LR: ClassVar[dict[str, tuple[float, int]]] = {"tiny": (1e-3, 50), "default": (3e-4, 200)}
    PRESETS: ClassVar[dict[str, ImageUNetConfig]] = {
        "tiny": ImageUNetConfig(
            base_channels=24, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
            head_dim=24, groups=8, qk_norm=False,
        ),
        "small": ImageUNetConfig(
            base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2), head_dim=32
        ),
        "default": ImageUNetConfig(),
    }

    def __init__(self, config: ImageUNetConfig | None = None, **overrides: Any):
        super().__init__()
        config = apply_overrides(config or ImageUNetConfig(), overrides, "ImageUNet")
        self.config = c = config
        levels = len(c.channel_mult)
        emb_dim = 4 * c.base_channels
        heads = {"head_dim": c.head_dim} if c.head_dim else {"num_heads": c.num_heads}

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dims=2, dropout=c.dropout, groups=c.groups)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(
                ch, **heads, context_dim=c.context_dim, backend=c.attention_backend, groups=c.groups,
                qk_norm=c.qk_norm,
            )

        self.time_embed = nn.Sequential(
            nn.Linear(c.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_embed = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes else None
        self.conv_in = conv_nd(2, c.in_channels, c.base_channels, 3, padding=1)

        ch = c.base_channels
        skip_chs = [ch]
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.channel_mult):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(res(ch, c.base_channels * mult))
                ch = c.base_channels * mult
                if i in c.attention_levels:
                    attns.append(attn(ch))
                skip_chs.append(ch)
            down = Downsample(ch, dims=2) if i < levels - 1 else None
            if down is not None:
                skip_chs.append(ch)
            self.down.append(_Level(blocks, attns, down))

        self.mid = nn.ModuleDict({"res1": res(ch, ch), "attn": attn(ch), "res2": res(ch, ch)})

        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(res(ch + skip_chs.pop(), c.base_channels * c.channel_mult[i]))
                ch = c.base_channels * c.channel_mult[i]
                if i in c.attention_levels:
                    attns.append(attn(ch))
            self.up.append(_Level(blocks, attns, Upsample(ch, dims=2) if i > 0 else None))

        self.norm_out = nn.GroupNorm(c.groups, ch)
        self.conv_out = conv_nd(2, ch, c.out_channels or c.in_channels, 3, padding=1)

        self.feature_layers = tuple(
            [f"down.{i}" for i in range(levels)] + ["mid"] + [f"up.{j}" for j in range(levels)]
        )
        self.feature_info = unet_feature_info([c.base_channels * m for m in c.channel_mult])

    def _run(self, x_t: Tensor, t: Tensor, cond: Any, tap: Callable[[str, Tensor], Tensor]) -> Tensor:
        dtype = self.conv_in.weight.dtype
        emb, context = self._embed_conditioning(x_t, t, cond, self.config.base_channels, dtype)

        h = self.conv_in(x_t.to(dtype))
        skips = [h]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.res):
                h = self._block(block, h, emb)
                if level.attn:
                    h = self._block(level.attn[j], h, context)
                skips.append(h)
            if level.resample is not None:
                h = self._block(level.resample, h)
                skips.append(h)
            h = tap(f"down.{i}", h)

        h = self._block(self.mid["res1"], h, emb)
        h = self._block(self.mid["attn"], h, context)
        h = self._block(self.mid["res2"], h, emb)
        h = tap("mid", h)

        for i, level in enumerate(self.up):
            for j, block in enumerate(level.res):
                h = self._block(block, torch.cat([h, skips.pop()], dim=1), emb)
                if level.attn:
                    h = self._block(level.attn[j], h, context)
            if level.resample is not None:
                # upsample to the size of the matching skip, so odd sizes round-trip
                h = self._block(level.resample, h, tuple(skips[-1].shape[2:]))
            h = tap(f"up.{i}", h)

        v = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return v.to(x_t.dtype)

