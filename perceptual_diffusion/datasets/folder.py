"""A folder of images (recursive), with optional captions from captions.jsonl, for real data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImageFolderDataset", "IMAGE_EXTENSIONS", "CAPTIONS_FILE", "resize_center_crop"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"


def resize_center_crop(im: Image.Image, size: int, channels: int) -> np.ndarray:
    """Gray (channels=1) or RGB `im` with its shorter side resized to `size` (bicubic) and
    centre-cropped to size x size: (size, size, channels) float32 in [-1, 1]."""
    im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    scale = size / min(w, h)
    # max(): rounding must never leave the shorter side below `size`.
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.float32).reshape(size, size, channels) / 127.5 - 1


class ImageFolderDataset(Dataset):
    """Every image under `path` (sorted by relative path, so the order is the same on every
    machine), resized so the shorter side is `size`, center-cropped to size x size and converted
    to gray (channels=1) or RGB (channels=3). Items {"x": (channels, size, size) float32 in
    [-1, 1]}, plus "caption": str when `path/captions.jsonl` exists (one {"file": relative
    path, "caption": str} per line; an image without a line gets ""). `empty_captions=True`
    gives every image the caption "" (unconditional training, section 5.7).

    An unreadable image raises OSError naming the file from __getitem__, not from the
    constructor (files are only listed here); wrap the dataset in `SkipCorrupt` to skip them.
    """

    def __init__(self, path: str | Path, size: int = 32, channels: int = 3, empty_captions: bool = False):
        if not str(path):
            raise ValueError("image_folder: no folder given (set data.path)")
        if channels not in (1, 3):
            raise ValueError(f"image_folder: channels must be 1 or 3, got {channels}")
        if size < 1:
            raise ValueError(f"image_folder: size must be >= 1, got {size}")
        root = Path(path).expanduser()
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "not found"
            raise FileNotFoundError(f"image folder {what}: {root}")
        self.root, self.size, self.channels = root, size, channels
        self.files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) "
                             f"found under {root}")
        self.captions = self._read_captions(root / CAPTIONS_FILE)
        if empty_captions:  # section 5.7: the same data, every caption "" (unconditional)
            self.captions = [""] * len(self.files)

    def _read_captions(self, file: Path) -> list[str] | None:
        if not file.is_file():
            return None
        by_file: dict[str, str] = {}
        with file.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    name, caption = Path(entry["file"]).as_posix(), entry["caption"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{file}:{n}: expected a JSON object with \"file\" and "
                                     f"\"caption\" ({e})") from e
                if not isinstance(caption, str):
                    raise ValueError(f"{file}:{n}: \"caption\" must be a string")
                by_file[name] = caption
        missing = sum(name not in by_file for name in self.files)
        unknown = len(by_file.keys() - set(self.files))
        if missing or unknown:
            log.warning("%s: %d images have no caption (they get \"\"), %d captions name no "
                        "image", file, missing, unknown)
        return [by_file.get(name, "") for name in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Tensor:
        """The image at `index` as (channels, size, size) float32 in [-1, 1]."""
        file = self.root / self.files[index]
        try:
            with Image.open(file) as im:
                # Photos are often stored sideways with an EXIF rotation tag.
                im = ImageOps.exif_transpose(im).convert("L" if self.channels == 1 else "RGB")
        except Exception as e:
            raise OSError(f"cannot read image {file}: {e}") from e
        a = resize_center_crop(im, self.size, self.channels)
        return torch.from_numpy(a.transpose(2, 0, 1)).contiguous()

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        item: dict[str, Tensor | str] = {"x": self.load(index)}
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item
