"""Datasets that ship (no download) and loaders for real data, per modality:

    image  circles (generated one-disk images), digits (scikit-learn's 8x8 digits), photo_patches
           (patches of scikit-learn's two sample photos, with a held-out split), image_folder,
           shards (LAION-style webdataset tar shards with metadata filters)
    video  moving_shapes (generated clips of one bouncing disk), video_folder
    audio  tones (generated sine tones on a scale), audio_folder (WAV/FLAC via soundfile)

`build_dataset` makes one from a recipe's [data] table; `build_reference_dataset` the data that
metrics compare samples with (the held-out split where the dataset has one); `sample_shape` is the
shape of one item, which is also the shape of the noise the sampler starts from.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config import DataConfig
from .digits import DigitsDataset
from .folder import ImageFolderDataset
from .loader import ResumableBatchSampler, SkipCorrupt, collate_skip, make_loader
from .photos import PhotoPatchesDataset
from .synthetic import CirclesDataset, circles

__all__ = ["build_dataset", "build_reference_dataset", "num_classes", "sample_shape", "modality", "DATASETS",
           "MODALITY", "circles", "CirclesDataset", "DigitsDataset", "PhotoPatchesDataset", "ImageFolderDataset",
           "ResumableBatchSampler", "SkipCorrupt", "collate_skip", "make_loader"]

# dataset name -> modality; a new dataset adds one entry here and one branch in build_dataset
MODALITY = {
    "circles": "image", "digits": "image", "photo_patches": "image", "image_folder": "image",
    "shards": "image",
    "moving_shapes": "video", "video_folder": "video",
    "tones": "audio", "audio_folder": "audio",
}
DATASETS = tuple(MODALITY)
_GRAY = ("circles", "digits", "moving_shapes")
_MONO = ("tones",)


def modality(cfg: DataConfig) -> str:
    """"image", "video" or "audio": what the items of `cfg.name` are."""
    if cfg.name not in MODALITY:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    return MODALITY[cfg.name]


def sample_shape(cfg: DataConfig) -> tuple[int, ...]:
    """The shape of one item's "x": (C, H, W) images, (C, F, H, W) clips, (C, L) audio."""
    kind = modality(cfg)
    if kind == "image":
        return (cfg.channels, cfg.size, cfg.size)
    if kind == "video":
        return (cfg.channels, cfg.frames, cfg.size, cfg.size)
    return (cfg.channels, cfg.length)


def build_dataset(cfg: DataConfig) -> Dataset:
    """The dataset `cfg.name` names. Items are dicts with "x" of `sample_shape(cfg)` in [-1, 1],
    plus "label" (conditional digits / moving_shapes / tones) or "caption" (image folders with
    captions.jsonl)."""
    kind = modality(cfg)
    if cfg.name in _GRAY and cfg.channels != 1:
        raise ValueError(f"data.channels must be 1 for {cfg.name} (gray), got {cfg.channels}")
    if cfg.name in _MONO and cfg.channels != 1:
        raise ValueError(f"data.channels must be 1 for {cfg.name} (mono), got {cfg.channels}")
    if cfg.name == "circles":
        return CirclesDataset(cfg.num_items, cfg.size, cfg.seed)
    if cfg.name == "digits":
        return DigitsDataset(cfg.size, cfg.conditional)
    if cfg.name == "photo_patches":
        return _photo_patches(cfg, "train")
    if cfg.name == "image_folder":
        return ImageFolderDataset(cfg.path, cfg.size, cfg.channels, empty_captions=cfg.empty_captions)
    if cfg.name == "shards":
        from .shards import ShardDataset

        return ShardDataset(cfg.path, cfg.size, cfg.channels, min_size=cfg.min_size,
                            min_aesthetic=cfg.min_aesthetic or None, caption_key=cfg.caption_key,
                            empty_captions=cfg.empty_captions)
    if kind == "video":
        from .video import MovingShapesDataset, VideoFolderDataset

        if cfg.name == "moving_shapes":
            return MovingShapesDataset(cfg.num_items, cfg.frames, cfg.size, cfg.seed, cfg.conditional)
        return VideoFolderDataset(cfg.path, cfg.frames, cfg.size, cfg.channels)
    from .audio import AudioFolderDataset, TonesDataset

    if cfg.name == "tones":
        return TonesDataset(cfg.num_items, cfg.length, cfg.sample_rate, cfg.seed, cfg.conditional)
    return AudioFolderDataset(cfg.path, cfg.length, cfg.sample_rate, cfg.channels)


def build_reference_dataset(cfg: DataConfig) -> Dataset:
    """What metrics compare samples with: the held-out split of a dataset that has one
    (photo_patches: patches that share no pixel with the training ones), else `build_dataset(cfg)`."""
    if cfg.name == "photo_patches":
        return _photo_patches(cfg, "heldout")
    return build_dataset(cfg)


def _photo_patches(cfg: DataConfig, split: str) -> PhotoPatchesDataset:
    if cfg.conditional:
        raise ValueError("data.conditional must be false for photo_patches (the patches carry no labels)")
    return PhotoPatchesDataset(cfg.num_items, cfg.size, cfg.channels, cfg.seed, split)


def num_classes(cfg: DataConfig) -> int | None:
    """How many class labels the items carry (conditional digits 10, moving_shapes 8 headings,
    tones one per pitch), else None."""
    if not cfg.conditional:
        return None
    if cfg.name == "digits":
        return DigitsDataset.num_classes
    if cfg.name == "moving_shapes":
        from .video import MovingShapesDataset

        return MovingShapesDataset.num_classes
    if cfg.name == "tones":
        from .audio import TonesDataset

        return TonesDataset.num_classes
    return None
