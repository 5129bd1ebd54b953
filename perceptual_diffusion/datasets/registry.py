"""The dataset registry: one `DatasetSpec` per dataset, carrying the rules that recipe validation,
`build_dataset` and the trainer read instead of lists of names.

    spec = DATASET_SPECS["digits"]
    spec.modality, spec.channels, spec.classes     # "image", (1,), 10
    spec.build(data_cfg)                           # the dataset of a recipe's [data] table

A new dataset is its module plus one entry in DATASET_SPECS. This module does not import the
recipe schema (`..config` validates through it) nor, until a builder is called, the dataset's
module (video and audio decoding pull in torchvision.io and torchaudio).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from ..config import DataConfig

__all__ = ["Modality", "MODALITIES", "DatasetSpec", "DATASET_SPECS", "dataset_spec"]


@dataclass(frozen=True)
class Modality:
    channels: dict[int, str]                           # the data.channels it allows, by name
    shape: Callable[[DataConfig], tuple[int, ...]]     # one item's "x"


MODALITIES: dict[str, Modality] = {
    "image": Modality({1: "gray", 3: "RGB"}, lambda d: (d.channels, d.size, d.size)),             # (C, H, W)
    "video": Modality({1: "gray", 3: "RGB"}, lambda d: (d.channels, d.frames, d.size, d.size)),   # (C, F, H, W)
    "audio": Modality({1: "mono", 2: "stereo"}, lambda d: (d.channels, d.length)),                # (C, L)
}


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset and its rules. `build(cfg)` returns items {"x": sample_shape in [-1, 1]} plus
    "label" (when `classes` and data.conditional) or "caption" (captioned images)."""

    name: str
    modality: str                                      # a key of MODALITIES
    build: Callable[[DataConfig], Dataset]
    channels: tuple[int, ...]                          # the data.channels it makes
    classes: int | None = None                         # labels 0..classes-1 when data.conditional
    path: str = ""                                     # what data.path must name ("" = it takes none)
    path_is_dir: bool = False                          # data.path must be an existing directory
    min_frames: int = 1                                # video: the shortest clip it can make
    reference: Callable[[DataConfig], Dataset] | None = None  # a held-out split metrics compare with

    @property
    def needs_path(self) -> bool:
        return bool(self.path)

    def check_channels(self, channels: int) -> None:
        """ValueError (one line naming data.channels) unless this dataset makes `channels`."""
        names = MODALITIES[self.modality].channels
        if channels not in names:
            raise ValueError(f"data.channels must be one of {', '.join(map(str, names))}, got {channels!r}")
        if channels not in self.channels:
            allowed = " or ".join(map(str, self.channels))
            raise ValueError(f"data.channels must be {allowed} for {self.name} "
                             f"({' or '.join(names[c] for c in self.channels)}), got {channels!r}")


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of `name`; ValueError naming the choices for an unknown one."""
    if name not in DATASET_SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_SPECS)}")
    return DATASET_SPECS[name]


# ---------------------------------------------------------------------------------- builders
def _circles(d: DataConfig) -> Dataset:
    from .synthetic import CirclesDataset

    return CirclesDataset(d.num_items, d.size, d.seed)


def _digits(d: DataConfig) -> Dataset:
    from .digits import DigitsDataset

    return DigitsDataset(d.size, d.conditional)


def _photo_patches(d: DataConfig, split: str) -> Dataset:
    if d.conditional:
        raise ValueError("data.conditional must be false for photo_patches (the patches carry no labels)")
    from .photos import PhotoPatchesDataset

    return PhotoPatchesDataset(d.num_items, d.size, d.channels, d.seed, split)


def _image_folder(d: DataConfig) -> Dataset:
    from .folder import ImageFolderDataset

    return ImageFolderDataset(d.path, d.size, d.channels, empty_captions=d.empty_captions)


def _shards(d: DataConfig) -> Dataset:
    from .shards import ShardDataset

    return ShardDataset(d.path, d.size, d.channels, min_size=d.min_size, min_aesthetic=d.min_aesthetic or None,
                        caption_key=d.caption_key, empty_captions=d.empty_captions)


def _moving_shapes(d: DataConfig) -> Dataset:
    from .video import MovingShapesDataset

    return MovingShapesDataset(d.num_items, d.frames, d.size, d.seed, d.conditional)


def _video_folder(d: DataConfig) -> Dataset:
    from .video import VideoFolderDataset

    return VideoFolderDataset(d.path, d.frames, d.size, d.channels)


def _tones(d: DataConfig) -> Dataset:
    from .audio import TonesDataset

    return TonesDataset(d.num_items, d.length, d.sample_rate, d.seed, d.conditional)


def _audio_folder(d: DataConfig) -> Dataset:
    from .audio import AudioFolderDataset

    return AudioFolderDataset(d.path, d.length, d.sample_rate, d.channels)


# ---------------------------------------------------------------------------------- the registry
# `classes` restates the dataset class's num_classes (digits 10, moving_shapes 8 headings, tones
# 8 pitches) so that validation imports no dataset; tests/test_registries.py checks they agree.
DATASET_SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("circles", "image", _circles, channels=(1,)),
    DatasetSpec("digits", "image", _digits, channels=(1,), classes=10),
    DatasetSpec("photo_patches", "image", functools.partial(_photo_patches, split="train"), channels=(1, 3),
                reference=functools.partial(_photo_patches, split="heldout")),
    DatasetSpec("image_folder", "image", _image_folder, channels=(1, 3), path="a folder of images",
                path_is_dir=True),
    DatasetSpec("shards", "image", _shards, channels=(1, 3),
                path="the shards (a {000..999} pattern, a glob or a folder)"),
    DatasetSpec("moving_shapes", "video", _moving_shapes, channels=(1,), classes=8,
                min_frames=2),  # a track needs two frames
    DatasetSpec("video_folder", "video", _video_folder, channels=(1, 3), path="a folder of clips",
                path_is_dir=True),
    DatasetSpec("tones", "audio", _tones, channels=(1,), classes=8),
    DatasetSpec("audio_folder", "audio", _audio_folder, channels=(1, 2), path="a folder of audio files",
                path_is_dir=True),
)}
