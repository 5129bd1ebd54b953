"""Reference backbones implementing the `Denoiser` protocol, and the registry recipes use."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .image_unet import ImageUNet, ImageUNetConfig

__all__ = ["ImageUNet", "ImageUNetConfig", "BACKBONES", "build_backbone"]

# recipe name -> class with from_preset(name, **overrides); a new backbone adds one line here
BACKBONES: dict[str, Callable[..., nn.Module]] = {"image_unet": ImageUNet}


def build_backbone(name: str, preset: str, **overrides: Any) -> nn.Module:
    """Build a registered backbone from a preset with config fields overridden."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name].from_preset(preset, **overrides)
