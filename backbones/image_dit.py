"""`ImageDiT`: a diffusion transformer (DiT, Peebles & Xie) on images, as a `TappedDenoiser`.

    net = ImageDiT.from_preset("tiny")                       # or ImageDiT(config) / ImageDiT(**fields)
    v = net(x_t, t, cond)                                    # [N x C x H x W] -> same shape
    feats = net.forward_features(x_t, t, layers="mid")       # {"mid": [N x H/p x W/p x hidden_dim]}

The image (pixels or a latent) is cut into p x p patches (H and W multiples of p), one token
each, row by row; positions get a fixed 2-D sinusoidal embedding (half the width for the row,
half for the column) computed for the actual grid, so one net takes any size. Blocks are
adaLN-Zero: a freshly built net outputs exactly zero. Everything but the presets is
`backbones.transformer.DiT`, shared with `AudioDiT`.

Taps are block outputs as token grids [N x H/p x W/p x hidden_dim] (channels last; reduction p).
A transformer has no resolution levels, so the UNet names are given by depth: with blocks indexed
0..depth-1 and m = depth // 2, ``down.i`` is block i (i < m), ``mid`` is block m and ``up.j`` is
block m + 1 + j; e.g. the tiny preset (depth 6) has down.0-2, mid, up.0-1. With
``stop_early=True`` no block after the last requested one runs, nor the final layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import apply_overrides
from .transformer import DiT, DiTConfig

__all__ = ["ImageDiT", "ImageDiTConfig"]


@dataclass(frozen=True)
class ImageDiTConfig(DiTConfig):
    """Architecture of an `ImageDiT` (fields and checks: `DiTConfig`); the defaults are the
    "default" preset, DiT-S/2 (32.5M parameters): RGB, 2x2 patches, 12 blocks of width 384."""

    in_channels: int = 3
    patch_size: int = 2
    hidden_dim: int = 384
    depth: int = 12
    num_heads: int = 6


class ImageDiT(DiT):
    """DiT predicting v: x_t [N x C x H x W] (H, W multiples of patch_size), t (N,), cond -> v like x_t.

    Build with ``ImageDiT(config)``, ``ImageDiT(**config_fields)``, ``ImageDiT(config, **overrides)``
    or ``ImageDiT.from_preset(name, **overrides)``; `cond` as for every `Backbone` (None, labels
    with num_classes the null label, or a context (N, L_ctx, context_dim)). FSDP shards each
    `DiTBlock` (`SHARD_UNITS`, from `DiT`).
    """

    POSITIONAL_DIMS: ClassVar[int] = 2
    # digits_dit.toml's stage mse, 1000 steps at a constant lr after the warm-up, no spike
    # (benchmarks/results/preset_lr/dit_*; RESULTS.md, "Divergence")
    RECOMMENDED_LR: ClassVar[dict[str, tuple[float, int]]] = {"tiny": (1e-3, 50), "default": (3e-4, 200)}
    PRESETS: ClassVar[dict[str, ImageDiTConfig]] = {
        # 16x16 gray digits on a CPU: 64 tokens of width 64
        "tiny": ImageDiTConfig(in_channels=1, hidden_dim=64, depth=6, num_heads=4, qk_norm=False),
        "default": ImageDiTConfig(),
    }
    EXAMPLE_INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, 16, 16)

    def __init__(self, config: ImageDiTConfig | None = None, **overrides: Any):
        super().__init__(apply_overrides(config or ImageDiTConfig(), overrides, "ImageDiT"))
