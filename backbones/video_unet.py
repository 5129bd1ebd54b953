"""`VideoUNet`: a factorised (2+1)D video UNet, as a `TappedDenoiser` (v-prediction).

    net = VideoUNet.from_preset("tiny", in_channels=1)       # or VideoUNet(config) / VideoUNet(**fields)
    v = net(x_t, t, cond)                                    # [N x C x F x H x W] -> same shape
    feats = net.forward_features(x_t, t, layers="mid")       # {"mid": [N x C' x F x H' x W']}

Every block is a spatial ResBlock applied to each frame (frames folded into the batch), then a
residual convolution across frames at each pixel, then optionally spatial attention within each
frame and temporal attention across frames at each pixel. The temporal paths end in
zero-initialised projections, so a fresh net is a per-frame image UNet, the identity in time
(as in Make-A-Video / Video LDM, which inflate image models this way). Resampling is spatial
only: any number of frames F >= 1 works; H and W must be divisible by 2 ** (levels - 1).

Taps, in execution order: ``down.i`` (encoder level i, after its Downsample), ``mid``,
``up.i`` (decoder level i, up.0 = lowest resolution, after its Upsample), each
[N x C' x F x H' x W']. `feature_info` gives each tap's channels and spatial reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .base import Backbone, apply_overrides, check_levels, unet_feature_info, validate_unet_config
from .layers import (
    ATTENTION_BACKENDS,
    AttentionBlock,
    Downsample,
    QKNorm,
    ResBlock,
    Upsample,
    attention,
    conv_nd,
    timestep_embedding,
    zero_,
)

__all__ = ["TemporalAttention", "TemporalConv", "VideoUNet", "VideoUNetConfig"]


@dataclass(frozen=True)
class VideoUNetConfig:
    """Architecture of a `VideoUNet`; the defaults are the "default" preset (16 frames x 32x32).

    Conditioning: `num_classes` (labels, plus a null label `num_classes` for CFG dropout) or
    `context_dim` (cross-attention of the spatial attention to a context (N, L, context_dim)),
    not both. Attention heads: exactly one of `head_dim` / `num_heads`. Level i has
    base_channels * channel_mult[i] channels. `attention_levels` get spatial attention,
    `temporal_attention_levels` temporal attention (True: every level, False: none); the
    midblock always has both.
    """

    in_channels: int = 3
    out_channels: int | None = None  # None: in_channels
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2)
    temporal_attention_levels: tuple[int, ...] | bool = (1, 2)
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
        if not isinstance(self.temporal_attention_levels, bool):
            object.__setattr__(self, "temporal_attention_levels", tuple(self.temporal_attention_levels))
        self._validate()

    @property
    def temporal_levels(self) -> tuple[int, ...]:
        """`temporal_attention_levels` with a bool resolved to level indices."""
        if isinstance(self.temporal_attention_levels, bool):
            return tuple(range(len(self.channel_mult))) if self.temporal_attention_levels else ()
        return self.temporal_attention_levels

    def _validate(self) -> None:
        if not isinstance(self.temporal_attention_levels, bool) and self.channel_mult:
            check_levels("VideoUNetConfig", "temporal_attention_levels", self.temporal_attention_levels,
                         len(self.channel_mult), " or a bool")
        validate_unet_config(self, extra_attending=self.temporal_levels)

def _unfold(h: Tensor, frames: int) -> Tensor:
    """[N*F x C x H x W] -> [N x C x F x H x W] (a view)."""
    return h.unflatten(0, (-1, frames)).transpose(1, 2)


def _fold(x: Tensor) -> Tensor:
    """[N x C x F x H x W] -> [N*F x C x H x W] (a view when `x` came from `_unfold`)."""
    return x.transpose(1, 2).flatten(0, 1)


class TemporalConv(nn.Module):
    """Residual convolution across frames at each pixel (kernel 3 over frames, 1 over pixels).

    GroupNorm-SiLU-conv, GroupNorm-SiLU-dropout-conv(0): x [N x C x F x H x W] -> same shape.
    The last conv is zero-initialised, so the block is the identity at init.
    """

    def __init__(self, ch: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()

        # a 3 x 1 conv on [N x C x F x (H*W)]: the same map as a 3 x 1 x 1 Conv3d, 3-4x faster on CPU
        def temporal_conv() -> nn.Module:
            return conv_nd(2, ch, ch, (3, 1), padding=(1, 0))

        self.norm1 = nn.GroupNorm(groups, ch)
        self.conv1 = temporal_conv()
        self.norm2 = nn.GroupNorm(groups, ch)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = zero_(temporal_conv())

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x.flatten(3))))
        h = self.proj_out(self.dropout(nn.functional.silu(self.norm2(h))))
        return x + h.view(x.shape)


class TemporalAttention(nn.Module):
    """Self-attention across frames at each pixel, then a feed-forward; residual.

    x: [N x C x F x H x W] -> same shape. Tokens are the F frames of one pixel, with a learned
    projection of a sinusoidal frame-index embedding added (attention alone is blind to
    order). Give exactly one of `num_heads` / `head_dim`; the output projection is
    zero-initialised, so the block is the identity at init.
    """

    def __init__(
        self,
        ch: int,
        num_heads: int | None = None,
        *,
        head_dim: int | None = None,
        backend: str = "sdpa",
        groups: int = 32,
        qk_norm: bool = False,
    ):
        super().__init__()
        if (num_heads is None) == (head_dim is None):
            raise ValueError("TemporalAttention: give exactly one of num_heads and head_dim")
        if head_dim is not None:
            if head_dim <= 0 or ch % head_dim:
                raise ValueError(f"TemporalAttention: {ch} channels not divisible by head_dim={head_dim}")
            num_heads = ch // head_dim
        if num_heads <= 0 or ch % num_heads:
            raise ValueError(f"TemporalAttention: {ch} channels not divisible by num_heads={num_heads}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
        self.heads = num_heads
        self.attention_backend = backend
        self.norm = nn.GroupNorm(groups, ch)
        self.frame_pos = nn.Linear(ch, ch)
        self.to_qkv = nn.Linear(ch, 3 * ch, bias=False)
        self.to_out = nn.Linear(ch, ch)
        self.qk_norm = QKNorm(ch // num_heads) if qk_norm else None
        self.norm_ff = nn.LayerNorm(ch)
        self.ff = nn.Sequential(nn.Linear(ch, 4 * ch), nn.GELU(), nn.Linear(4 * ch, ch))
        self.proj_out = zero_(nn.Linear(ch, ch))

    def forward(self, x: Tensor) -> Tensor:
        n, ch, frames, height, width = x.shape
        h = self.norm(x).permute(0, 3, 4, 2, 1).reshape(n * height * width, frames, ch)
        index = torch.arange(frames, device=x.device)
        h = h + self.frame_pos(timestep_embedding(index, ch).to(h.dtype))
        q, k, v = (a.unflatten(-1, (self.heads, -1)).transpose(1, 2) for a in self.to_qkv(h).chunk(3, dim=-1))
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        h = h + self.to_out(attention(q, k, v, self.attention_backend).transpose(1, 2).flatten(2))
        h = h + self.ff(self.norm_ff(h))
        h = self.proj_out(h).reshape(n, height, width, frames, ch).permute(0, 4, 3, 1, 2)
        return x + h


class _SpaceTimeBlock(nn.Module):
    """ResBlock per frame, TemporalConv, [AttentionBlock per frame], [TemporalAttention].

    h: [N*F x C x H x W] (frames folded into the batch), emb: (N*F, E), context: (N*F, L, D).
    """

    def __init__(self, res: ResBlock, tconv: TemporalConv, attn: nn.Module | None, tattn: nn.Module | None):
        super().__init__()
        self.res = res
        self.tconv = tconv
        self.attn = attn
        self.tattn = tattn

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, frames: int) -> Tensor:
        h = self.res(h, emb)
        h = _fold(self.tconv(_unfold(h, frames)))
        if self.attn is not None:
            h = self.attn(h, context)
        if self.tattn is not None:
            h = _fold(self.tattn(_unfold(h, frames)))
        return h


class _Level(nn.Module):
    """One resolution of the encoder or decoder: space-time blocks [+ spatial resampler]."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class VideoUNet(Backbone):
    """(2+1)D UNet predicting v: x_t [N x C x F x H x W], t (N,), cond -> v like x_t.

    Build with ``VideoUNet(config)``, ``VideoUNet(**config_fields)``, ``VideoUNet(config, **overrides)``
    or ``VideoUNet.from_preset(name, **overrides)``. `cond` is None, a LongTensor (N,) of labels
    in [0, num_classes] (num_classes is the null label; None also means null), or a float
    context (N, L, context_dim) shared by all frames. Computes in the parameter dtype; returns
    v in x_t's dtype. Presets: "tiny" (~0.3M parameters, for 8 frames x 16x16 on CPU) and
    "default" (~12.8M, for 16 frames x 32x32: base 64, levels (1, 2, 2), spatial and temporal
    attention at 16x16 and 8x8).
    """

    SHARD_UNITS: ClassVar[tuple[str, ...]] = ("_SpaceTimeBlock",)  # FSDP units
    EXAMPLE_INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, 4, 16, 16)
    RECOMMENDED_LR: ClassVar[dict[str, tuple[float, int]]] = {"tiny": (1e-3, 50)}
    PRESETS: ClassVar[dict[str, VideoUNetConfig]] = {
        "tiny": VideoUNetConfig(
            base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
            temporal_attention_levels=(1,), head_dim=16, groups=8, qk_norm=False,
        ),
        "default": VideoUNetConfig(),
    }

    def __init__(self, config: VideoUNetConfig | None = None, **overrides: Any):
        super().__init__()
        config = apply_overrides(config or VideoUNetConfig(), overrides, "VideoUNet")
        self.config = c = config
        levels = len(c.channel_mult)
        emb_dim = 4 * c.base_channels
        heads = {"head_dim": c.head_dim} if c.head_dim else {"num_heads": c.num_heads}

        def block(cin: int, cout: int, spatial_attn: bool, temporal_attn: bool) -> _SpaceTimeBlock:
            return _SpaceTimeBlock(
                ResBlock(cin, cout, emb_dim, dims=2, dropout=c.dropout, groups=c.groups),
                TemporalConv(cout, dropout=c.dropout, groups=c.groups),
                AttentionBlock(
                    cout, **heads, context_dim=c.context_dim, backend=c.attention_backend, groups=c.groups,
                    qk_norm=c.qk_norm,
                ) if spatial_attn else None,
                TemporalAttention(cout, **heads, backend=c.attention_backend, groups=c.groups, qk_norm=c.qk_norm)
                if temporal_attn else None,
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
            attn = (i in c.attention_levels, i in c.temporal_levels)
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(block(ch, c.base_channels * mult, *attn))
                ch = c.base_channels * mult
                skip_chs.append(ch)
            down = Downsample(ch, dims=2) if i < levels - 1 else None
            if down is not None:
                skip_chs.append(ch)
            self.down.append(_Level(blocks, down))

        self.mid = nn.ModuleList([block(ch, ch, True, True), block(ch, ch, False, False)])

        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            attn = (i in c.attention_levels, i in c.temporal_levels)
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                cout = c.base_channels * c.channel_mult[i]
                blocks.append(block(ch + skip_chs.pop(), cout, *attn))
                ch = cout
            self.up.append(_Level(blocks, Upsample(ch, dims=2) if i > 0 else None))

        self.norm_out = nn.GroupNorm(c.groups, ch)
        self.conv_out = conv_nd(2, ch, c.out_channels or c.in_channels, 3, padding=1)

        self.feature_layers = tuple(
            [f"down.{i}" for i in range(levels)] + ["mid"] + [f"up.{j}" for j in range(levels)]
        )
        # reduction is of H and W; taps keep every frame
        self.feature_info = unet_feature_info([c.base_channels * m for m in c.channel_mult])

    def _check_input(self, x_t: Tensor) -> None:
        c = self.config
        if x_t.ndim != 5:
            raise ValueError(f"VideoUNet takes clips [N x C x F x H x W], got shape {tuple(x_t.shape)}")
        if x_t.shape[1] != c.in_channels:
            raise ValueError(
                f"VideoUNet has in_channels={c.in_channels}, got clips with {x_t.shape[1]} channels"
            )
        k = 2 ** (len(c.channel_mult) - 1)
        if x_t.shape[-2] % k or x_t.shape[-1] % k:
            raise ValueError(
                f"VideoUNet with {len(c.channel_mult)} levels needs H and W divisible by {k}, "
                f"got H x W = {x_t.shape[-2]} x {x_t.shape[-1]}"
            )

    def _run(self, x_t: Tensor, t: Tensor, cond: Any, tap: Callable[[str, Tensor], Tensor]) -> Tensor:
        self._check_input(x_t)
        frames = x_t.shape[2]
        dtype = self.conv_in.weight.dtype
        emb, context = self._embed_conditioning(x_t, t, cond, self.config.base_channels, dtype)
        # spatial layers see every frame as an image: fold F into the batch, clip-major
        emb = emb.repeat_interleave(frames, dim=0)
        if context is not None:
            context = context.repeat_interleave(frames, dim=0)

        def tapped(name: str, h: Tensor) -> Tensor:
            return _fold(tap(name, _unfold(h, frames)))

        h = self.conv_in(_fold(x_t.to(dtype)))
        skips = [h]
        for i, level in enumerate(self.down):
            for block in level.blocks:
                h = self._block(block, h, emb, context, frames)
                skips.append(h)
            if level.resample is not None:
                h = self._block(level.resample, h)
                skips.append(h)
            h = tapped(f"down.{i}", h)

        for block in self.mid:
            h = self._block(block, h, emb, context, frames)
        h = tapped("mid", h)

        for i, level in enumerate(self.up):
            for block in level.blocks:
                h = self._block(block, torch.cat([h, skips.pop()], dim=1), emb, context, frames)
            if level.resample is not None:
                h = self._block(level.resample, h)
            h = tapped(f"up.{i}", h)

        v = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return _unfold(v, frames).to(x_t.dtype).contiguous()

