"""Datasets that ship (no download) and loaders for real data, per modality:

    image  circles (generated one-disk images), digits (scikit-learn's 8x8 digits), photo_patches
           (patches of scikit-learn's two sample photos, with a held-out split), image_folder,
           shards (LAION-style webdataset tar shards with metadata filters)
    video  moving_shapes (generated clips of one bouncing disk), video_folder
    audio  tones (generated sine tones on a scale), audio_folder (WAV/FLAC via soundfile)

`build_dataset` makes one from a recipe's [data] table; `build_reference_dataset` the data that
metrics compare samples with (the held-out split where the dataset has one); `sample_shape` is the
shape of one item, which is also the shape of the noise the sampler starts from. All of them read
the dataset's entry in `DATASET_SPECS` (registry.py), where a new dataset adds one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from .digits import DigitsDataset
from .folder import ImageFolderDataset
from .loader import ResumableBatchSampler, ScaledDataset, SkipCorrupt, collate_skip, make_loader
from .photos import PhotoPatchesDataset
from .registry import DATASET_SPECS, MODALITIES, DatasetSpec, Modality, dataset_spec
from .synthetic import CirclesDataset, circles

if TYPE_CHECKING:  # config validates through the registry: importing it here would be a cycle
    from ..config import DataConfig

__all__ = ["build_dataset", "build_reference_dataset", "num_classes", "sample_shape", "modality", "DATASETS",
           "MODALITY", "DATASET_SPECS", "MODALITIES", "DatasetSpec", "Modality", "dataset_spec", "circles",
           "CirclesDataset", "DigitsDataset", "PhotoPatchesDataset", "ImageFolderDataset",
           "ResumableBatchSampler", "ScaledDataset", "SkipCorrupt", "collate_skip", "make_loader"]

# views of the registry: the names, and each name's modality
DATASETS = tuple(DATASET_SPECS)
MODALITY = {name: spec.modality for name, spec in DATASET_SPECS.items()}


def modality(cfg: DataConfig) -> str:
    """"image", "video" or "audio": what the items of `cfg.name` are."""
    return dataset_spec(cfg.name).modality


def sample_shape(cfg: DataConfig) -> tuple[int, ...]:
    """The shape of one item's "x": (C, H, W) images, (C, F, H, W) clips, (C, L) audio."""
    return MODALITIES[modality(cfg)].shape(cfg)


def build_dataset(cfg: DataConfig) -> Dataset:
    """The dataset `cfg.name` names. Items are dicts with "x" of `sample_shape(cfg)` in [-1, 1],
    plus "label" (conditional digits / moving_shapes / tones) or "caption" (image folders with
    captions.jsonl, shards)."""
    spec = dataset_spec(cfg.name)
    spec.check_channels(cfg.channels)
    return spec.build(cfg)


def build_reference_dataset(cfg: DataConfig) -> Dataset:
    """What metrics compare samples with: the held-out split of a dataset that has one
    (photo_patches: patches that share no pixel with the training ones), else `build_dataset(cfg)`."""
    spec = dataset_spec(cfg.name)
    spec.check_channels(cfg.channels)
    return (spec.reference or spec.build)(cfg)


def num_classes(cfg: DataConfig) -> int | None:
    """How many class labels the items carry (conditional digits 10, moving_shapes 8 headings,
    tones one per pitch), else None."""
    if not cfg.conditional:
        return None
    return dataset_spec(cfg.name).classes
