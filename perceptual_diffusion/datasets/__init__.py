"""Datasets that ship (no download): generated `circles`, scikit-learn's `digits`, and
`image_folder` for real data; `build_dataset` makes one from a recipe's [data] table."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config import DataConfig
from .digits import DigitsDataset
from .folder import ImageFolderDataset
from .loader import ResumableBatchSampler, SkipCorrupt, collate_skip, make_loader
from .synthetic import CirclesDataset, circles

__all__ = ["build_dataset", "num_classes", "DATASETS", "circles", "CirclesDataset",
           "DigitsDataset", "ImageFolderDataset", "ResumableBatchSampler", "SkipCorrupt",
           "collate_skip", "make_loader"]

DATASETS = ("circles", "digits", "image_folder")
_GRAY = ("circles", "digits")


def build_dataset(cfg: DataConfig) -> Dataset:
    """The dataset `cfg.name` names. Items are dicts with "x" (C, size, size) in [-1, 1], plus
    "label" (conditional digits) or "caption" (image folders with captions.jsonl)."""
    if cfg.name in _GRAY and cfg.channels != 1:
        raise ValueError(f"data.channels must be 1 for {cfg.name} (gray images), got {cfg.channels}")
    if cfg.name == "circles":
        return CirclesDataset(cfg.num_items, cfg.size, cfg.seed)
    if cfg.name == "digits":
        return DigitsDataset(cfg.size, cfg.conditional)
    if cfg.name == "image_folder":
        return ImageFolderDataset(cfg.path, cfg.size, cfg.channels)
    raise ValueError(f"unknown dataset {cfg.name!r}; choose one of {', '.join(DATASETS)}")


def num_classes(cfg: DataConfig) -> int | None:
    """How many class labels the items carry: 10 for conditional digits, else None."""
    return DigitsDataset.num_classes if cfg.name == "digits" and cfg.conditional else None
