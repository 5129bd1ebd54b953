"""Reference backbones implementing the `Denoiser` protocol, and the registry recipes use."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .audio_dit import AudioDiT, AudioDiTConfig
from .image_dit import ImageDiT, ImageDiTConfig
from .image_unet import ImageUNet, ImageUNetConfig
from .video_unet import VideoUNet, VideoUNetConfig

__all__ = ["ImageUNet", "ImageUNetConfig", "VideoUNet", "VideoUNetConfig", "AudioDiT", "AudioDiTConfig",
           "ImageDiT", "ImageDiTConfig", "BACKBONES", "build_backbone"]

# recipe name -> class with from_preset(name, **overrides); a new backbone adds one line here
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "image_unet": ImageUNet,
    "video_unet": VideoUNet,
    "audio_dit": AudioDiT,
    "image_dit": ImageDiT,
}

try:  # the diffusers adapter needs the `sd` extra (diffusers, transformers)
    from .diffusers_unet import DiffusersUNet, export_diffusers
except ImportError:  # pragma: no cover - exercised only without the extra
    DiffusersUNet = export_diffusers = None  # type: ignore[assignment,misc]
else:
    BACKBONES["diffusers_unet"] = DiffusersUNet
    __all__ += ["DiffusersUNet", "export_diffusers"]


def build_backbone(name: str, preset: str, **overrides: Any) -> nn.Module:
    """Build a registered backbone from a preset with config fields overridden."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name].from_preset(preset, **overrides)
