"""Reference backbones implementing the `Denoiser` protocol."""

from .image_unet import ImageUNet, ImageUNetConfig

__all__ = ["ImageUNet", "ImageUNetConfig"]
