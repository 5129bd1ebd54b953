"""`ImageUNet`: the ADM / diffusers-style image UNet, as a `TappedDenoiser` (v-prediction).

    net = ImageUNet.from_preset("tiny")                      # or ImageUNet(config) / ImageUNet(**fields)
    v = net(x_t, t, cond)                                    # [N x C x H x W] -> same shape
    feats = net.forward_features(x_t, t, layers="mid")       # {"mid": [N x C' x H' x W']}

A step of a level is a ResBlock, followed by an AttentionBlock at the `attention_levels`; the
midblock is ResBlock, AttentionBlock, ResBlock. Everything else (conditioning, resampling, skips,
taps, checkpointing) is `backbones.unet.UNet`, shared with `VideoUNet`. Any H and W work: the
decoder upsamples to the size of each skip, so odd sizes round-trip.

Taps, in execution order: ``down.i`` (encoder level i, after its Downsample), ``mid``,
``up.i`` (decoder level i, up.0 = lowest resolution, after its Upsample). `feature_info`
gives each tap's channels and reduction (input size / tap size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from .base import apply_overrides
from .unet import UNet, UNetConfig, UNetLevel, UNetPass

__all__ = ["ImageUNet", "ImageUNetConfig"]


@dataclass(frozen=True)
class ImageUNetConfig(UNetConfig):
    """Architecture of an `ImageUNet`: the `UNetConfig` fields, whose defaults are the "default"
    preset (32x32 images)."""


class ImageUNet(UNet):
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
        super().__init__(apply_overrides(config or ImageUNetConfig(), overrides, "ImageUNet"))

    def _level_blocks(self, level: int, steps: list[tuple[int, int]]) -> dict[str, nn.Module]:
        res, attn = [], []
        for cin, cout in steps:
            res.append(self._res_block(cin, cout))
            if level in self.config.attention_levels:
                attn.append(self._attention_block(cout))
        return {"res": nn.ModuleList(res), "attn": nn.ModuleList(attn)}  # attn: empty, or one per ResBlock

    def _mid_block(self, ch: int) -> nn.Module:
        return nn.ModuleDict(
            {"res1": self._res_block(ch, ch), "attn": self._attention_block(ch), "res2": self._res_block(ch, ch)}
        )

    def _step(self, level: UNetLevel, j: int, h: Tensor, p: UNetPass) -> Tensor:
        h = self._block(level.res[j], h, p.emb)
        return self._block(level.attn[j], h, p.context) if level.attn else h

    def _mid(self, h: Tensor, p: UNetPass) -> Tensor:
        h = self._block(self.mid["res1"], h, p.emb)
        h = self._block(self.mid["attn"], h, p.context)
        return self._block(self.mid["res2"], h, p.emb)
