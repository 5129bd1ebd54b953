"""A folder of images (recursive), with optional captions from captions.jsonl, for real data."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import io as tvio
from torchvision.transforms.v2 import functional as TF

__all__ = ["ImageFolderDataset", "IMAGE_EXTENSIONS", "CAPTIONS_FILE", "decode_image", "to_channels",
           "resize_center_crop"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"


def _webp_with_exif(header: bytes) -> bool:
    """An extended WEBP whose VP8X flags announce EXIF (torchvision ignores its orientation)."""
    return header[:4] == b"RIFF" and header[8:16] == b"WEBPVP8X" and len(header) > 20 \
        and bool(header[20] & 0x08)


def _decode_with_pillow(data: bytes) -> Tensor:
    """uint8 RGB [3 x H x W], EXIF orientation applied."""
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


def to_channels(images: Tensor, channels: int) -> Tensor:
    """uint8 images [... x C x H x W], C = 1 or 3, as gray (channels=1) or RGB (channels=3).
    RGB to gray is Pillow's convert("L") exactly: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16,
    the ITU-R 601-2 luma; gray to RGB repeats the channel."""
    c = images.shape[-3]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    if c == 3 and channels == 1:
        r, g, b = images.to(torch.int32).unbind(-3)
        return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).to(torch.uint8).unsqueeze(-3)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def decode_image(data: bytes | Tensor, channels: int) -> Tensor:
    """Encoded image bytes (or their 1-D uint8 tensor) -> uint8 [channels x H x W], gray
    (channels=1) or RGB (channels=3), with its EXIF orientation applied (photos are often stored
    sideways with a rotation tag).

    torchvision.io decodes JPEG (CMYK too), PNG (palette, alpha, 16 bit: scaled to 8 bits) and
    WEBP (and the first frame of a GIF); Pillow decodes what it cannot (BMP, TIFF, ...) and WEBP
    with EXIF, whose orientation torchvision ignores. Decoded as RGB and made gray by
    `to_channels`, because torchvision's GRAY mode differs per format (libjpeg's Y plane,
    libpng's weights, none for WEBP). Undecodable data raises OSError."""
    encoded = (data if isinstance(data, Tensor)
               else torch.frombuffer(bytearray(data), dtype=torch.uint8))
    tv_error = "WEBP with EXIF orientation"
    if not _webp_with_exif(encoded[:21].numpy().tobytes()):
        try:
            image = tvio.decode_image(encoded, mode=tvio.ImageReadMode.RGB,
                                      apply_exif_orientation=True)
        except RuntimeError as e:
            tv_error = " ".join(str(e).split())
        else:
            if image.ndim == 4:  # an animated GIF: its first frame, as Pillow gives
                image = image[0]
            if image.dtype != torch.uint8:  # 16-bit PNG
                image = TF.to_dtype(image, torch.uint8, scale=True)
            return to_channels(image, channels)
    try:
        image = _decode_with_pillow(encoded.numpy().tobytes())
    except Exception as e:
        raise OSError(f"neither torchvision ({tv_error}) nor Pillow ({e}) can decode it") from e
    return to_channels(image, channels)


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """uint8 images [... x C x H x W] (one image or a whole clip) with the shorter side resized
    to `size` (bicubic, antialiased) and center-cropped to size x size:
    [... x C x size x size] float32 in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"resize_center_crop needs uint8 images, got {images.dtype}")
    h, w = images.shape[-2:]
    scale = size / min(w, h)
    # max(): rounding must never leave the shorter side below `size`.
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = TF.resize(images, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC,
                           antialias=True)
    return TF.center_crop(images, [size, size]).float().div_(127.5).sub_(1)


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
            image = decode_image(tvio.read_file(str(file)), self.channels)
        except Exception as e:
            raise OSError(f"cannot read image {file}: {e}") from e
        return resize_center_crop(image, self.size)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        item: dict[str, Tensor | str] = {"x": self.load(index)}
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item
