"""`VideoUNet`: a factorised (2+1)D video UNet, as a `TappedDenoiser` (v-prediction).

    net = VideoUNet.from_preset("tiny", in_channels=1)       # or VideoUNet(config) / VideoUNet(**fields)
    v = net(x_t, t, cond)                                    # [N x C x F x H x W] -> same shape
    feats = net.forward_features(x_t, t, layers="mid")       # {"mid": [N x C' x F x H' x W']}

Every block is a spatial ResBlock applied to each frame (frames folded into the batch), then a
residual convolution across frames at each pixel, then optionally spatial attention within each
frame and temporal attention across frames at each pixel. The temporal paths end in
zero-initialised projections, so a fresh net is a per-frame image UNet, the identity in time
(as in Make-A-Video / Video LDM, which inflate image models this way). Resampling is spatial
only: any number of frames F >= 1 works; H and W must be divisible by 2 ** (levels - 1). The
encoder / midblock / decoder, conditioning, taps and checkpointing are `backbones.unet.UNet`,
shared with `ImageUNet`: a step of a level here is one such space-time block, and the midblock
is two (the first with both attentions, the second with neither).

Taps, in execution order: ``down.i`` (encoder level i, after its Downsample), ``mid``,
``up.i`` (decoder level i, up.0 = lowest resolution, after its Upsample), each
[N x C' x F x H' x W']. `feature_info` gives each tap's channels and spatial reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .base import apply_overrides, check_levels
from .layers import QKNorm, ResBlock, attention, attention_heads, conv_nd, timestep_embedding, zero_
from .unet import UNet, UNetConfig, UNetLevel, UNetPass, fold, unfold, validate_unet_config

__all__ = ["TemporalAttention", "TemporalConv", "VideoUNet", "VideoUNetConfig"]


@dataclass(frozen=True)
class VideoUNetConfig(UNetConfig):
    """Architecture of a `VideoUNet`: the `UNetConfig` fields and `temporal_attention_levels`; the
    defaults are the "default" preset (16 frames x 32x32).

    `attention_levels` get spatial attention (cross-attending to the context, if any),
    `temporal_attention_levels` temporal attention (True: every level, False: none); the
    midblock always has both.
    """

    channel_mult: tuple[int, ...] = (1, 2, 2)
    attention_levels: tuple[int, ...] = (1, 2)
    temporal_attention_levels: tuple[int, ...] | bool = (1, 2)

    def __post_init__(self) -> None:
        if not isinstance(self.temporal_attention_levels, bool):
            object.__setattr__(self, "temporal_attention_levels", tuple(self.temporal_attention_levels))
        super().__post_init__()

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

    def __init__(self, ch: int, num_heads: int | None = None, *, head_dim: int | None = None, backend: str = "sdpa",
                 groups: int = 32, qk_norm: bool = False):
        super().__init__()
        self.heads = num_heads = attention_heads("TemporalAttention", ch, num_heads, head_dim, backend)
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
        h = fold(self.tconv(unfold(h, (frames,))), 1)
        if self.attn is not None:
            h = self.attn(h, context)
        if self.tattn is not None:
            h = fold(self.tattn(unfold(h, (frames,))), 1)
        return h


class VideoUNet(UNet):
    """(2+1)D UNet predicting v: x_t [N x C x F x H x W], t (N,), cond -> v like x_t.

    Build with ``VideoUNet(config)``, ``VideoUNet(**config_fields)``, ``VideoUNet(config, **overrides)``
    or ``VideoUNet.from_preset(name, **overrides)``. `cond` is None, a LongTensor (N,) of labels
    in [0, num_classes] (num_classes is the null label; None also means null), or a float
    context (N, L, context_dim) shared by all frames. Computes in the parameter dtype; returns
    v in x_t's dtype. Presets: "tiny" (~0.3M parameters, for 8 frames x 16x16 on CPU) and
    "default" (~12.8M, for 16 frames x 32x32: base 64, levels (1, 2, 2), spatial and temporal
    attention at 16x16 and 8x8).
    """

    POSITIONAL_DIMS: ClassVar[int] = 3  # F x H x W; the frames are folded into the batch
    SHARD_UNITS: ClassVar[tuple[str, ...]] = ("_SpaceTimeBlock",)  # FSDP units
    EXAMPLE_INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, 4, 16, 16)
    RECOMMENDED_LR: ClassVar[dict[str, tuple[float, int]]] = {"tiny": (1e-3, 50), "default": (3e-4, 200)}
    PRESETS: ClassVar[dict[str, VideoUNetConfig]] = {
        "tiny": VideoUNetConfig(
            base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
            temporal_attention_levels=(1,), head_dim=16, groups=8, qk_norm=False,
        ),
        "default": VideoUNetConfig(),
    }

    def __init__(self, config: VideoUNetConfig | None = None, **overrides: Any):
        super().__init__(apply_overrides(config or VideoUNetConfig(), overrides, "VideoUNet"))

    def _space_time_block(self, cin: int, cout: int, spatial_attn: bool, temporal_attn: bool) -> _SpaceTimeBlock:
        c = self.config
        return _SpaceTimeBlock(
            self._res_block(cin, cout),
            TemporalConv(cout, dropout=c.dropout, groups=c.groups),
            self._attention_block(cout) if spatial_attn else None,
            TemporalAttention(cout, **self._heads(), backend=c.attention_backend, groups=c.groups, qk_norm=c.qk_norm)
            if temporal_attn else None,
        )

    def _level_blocks(self, level: int, steps: list[tuple[int, int]]) -> dict[str, nn.Module]:
        attn = (level in self.config.attention_levels, level in self.config.temporal_levels)
        return {"blocks": nn.ModuleList([self._space_time_block(cin, cout, *attn) for cin, cout in steps])}

    def _mid_block(self, ch: int) -> nn.Module:
        return nn.ModuleList([self._space_time_block(ch, ch, True, True), self._space_time_block(ch, ch, False, False)])

    def _step(self, level: UNetLevel, j: int, h: Tensor, p: UNetPass) -> Tensor:
        (frames,) = p.folded
        return self._block(level.blocks[j], h, p.emb, p.context, frames)

    def _mid(self, h: Tensor, p: UNetPass) -> Tensor:
        (frames,) = p.folded
        for block in self.mid:
            h = self._block(block, h, p.emb, p.context, frames)
        return h

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
        return super()._run(x_t, t, cond, tap)
