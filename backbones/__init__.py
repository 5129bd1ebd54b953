"""Reference backbones implementing the `Denoiser` protocol, and the registry recipes use.

`BACKBONE_SPECS` holds one `BackboneSpec` per recipe name: where the class is, whether it trains in
a VAE latent space, and the pip extra it needs. A class is imported on first use, so validating a
recipe imports neither diffusers nor transformers; `BACKBONES` is the name -> class view of the
backbones whose extra is installed. A new backbone is one file here plus one entry below.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .audio_dit import AudioDiT, AudioDiTConfig
from .image_dit import ImageDiT, ImageDiTConfig
from .image_unet import ImageUNet, ImageUNetConfig
from .video_unet import VideoUNet, VideoUNetConfig

__all__ = ["ImageUNet", "ImageUNetConfig", "VideoUNet", "VideoUNetConfig", "AudioDiT", "AudioDiTConfig",
           "ImageDiT", "ImageDiTConfig", "BackboneSpec", "BACKBONE_SPECS", "BACKBONES", "build_backbone"]


@dataclass(frozen=True)
class BackboneSpec:
    name: str                      # the recipe's model.backbone
    target: str                    # "module:attribute" of the class (anything with from_preset); a
                                   # module starting with "." is in this package
    latent: bool = False           # trains in a VAE latent space on captions: needs model.latent, may load
                                   # model.pretrained; the others work in pixel space
    extra: str = ""                # the pip extra it needs ("" = the base install)
    requires: tuple[str, ...] = ()  # the top-level packages of that extra

    @property
    def installed(self) -> bool:
        """Whether the packages it needs are installed (looked up, not imported)."""
        return all(_findable(package) for package in self.requires)

    def load(self) -> Any:
        """The class; ImportError naming the extra when it is not installed."""
        if not self.installed:
            raise ImportError(f"backbone {self.name!r} needs the {self.extra!r} extra "
                              f"({', '.join(self.requires)}): pip install 'perceptual-diffusion[{self.extra}]'")
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module, __name__), attribute)


@functools.cache
def _findable(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


BACKBONE_SPECS: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec("image_unet", ".image_unet:ImageUNet"),
    BackboneSpec("video_unet", ".video_unet:VideoUNet"),
    BackboneSpec("audio_dit", ".audio_dit:AudioDiT"),
    BackboneSpec("image_dit", ".image_dit:ImageDiT"),
    BackboneSpec("diffusers_unet", ".diffusers_unet:DiffusersUNet", latent=True, extra="sd",
                 requires=("diffusers", "transformers")),
)}


class _Installed(Mapping[str, Any]):
    """name -> class of every registered backbone whose extra is installed; looking a name up
    imports its module, listing or testing membership does not."""

    def __getitem__(self, name: str) -> Any:
        spec = BACKBONE_SPECS.get(name)
        if spec is None or not spec.installed:
            raise KeyError(name)
        return spec.load()

    def __contains__(self, name: object) -> bool:
        spec = BACKBONE_SPECS.get(name) if isinstance(name, str) else None
        return spec is not None and spec.installed

    def __iter__(self) -> Iterator[str]:
        return (name for name, spec in BACKBONE_SPECS.items() if spec.installed)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"BACKBONES({', '.join(self)})"


BACKBONES: Mapping[str, Any] = _Installed()

# the diffusers adapter's public names, imported on first access (None without the `sd` extra)
_DIFFUSERS_NAMES = ("DiffusersUNet", "export_diffusers")
if BACKBONE_SPECS["diffusers_unet"].installed:
    __all__ += list(_DIFFUSERS_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _DIFFUSERS_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = None
    if BACKBONE_SPECS["diffusers_unet"].installed:
        value = getattr(importlib.import_module(".diffusers_unet", __name__), name)
    globals()[name] = value
    return value


def build_backbone(name: str, preset: str, **overrides: Any) -> nn.Module:
    """Build a registered backbone from a preset with config fields overridden."""
    if name not in BACKBONE_SPECS:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONE_SPECS)}")
    return BACKBONE_SPECS[name].load().from_preset(preset, **overrides)
