"""Turning tensors into pictures a person can open: PNG grids of images, and for clips a PNG
strip (one clip per row, one frame per column) and an animated GIF."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid as tv_make_grid

__all__ = ["to_uint8", "make_grid", "save_grid", "save_frame_strip", "save_gif"]


def _uint8(x: Tensor) -> Tensor:
    """[N x C x H x W] in [-1, 1] -> uint8 [N x C x H x W] on the CPU."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_uint8(x: Tensor) -> np.ndarray:
    """[N x C x H x W] in [-1, 1] -> uint8 array (N, H, W, C)."""
    return _uint8(x).permute(0, 2, 3, 1).numpy()


def make_grid(x: Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile [N x C x H x W] images in [-1, 1] into one uint8 (H', W', C) array with
    torchvision's `make_grid`: min(nrow, N) per row (default ceil(sqrt(N))), `pad` white pixels
    between and around the tiles, each image upscaled `scale` times (nearest) so small samples
    are visible."""
    if x.ndim != 4:
        raise ValueError(f"make_grid needs [N x C x H x W], got shape {tuple(x.shape)}")
    imgs = _uint8(x)
    if scale > 1:
        imgs = imgs.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    if imgs.shape[0] == 1:  # torchvision returns a lone image unpadded
        grid = F.pad(imgs[0], (pad, pad, pad, pad), value=255)
    else:
        grid = tv_make_grid(imgs, nrow=nrow or math.ceil(math.sqrt(imgs.shape[0])), padding=pad,
                            pad_value=255)
    # torchvision repeats a gray image to 3 channels; they are equal, so keep one.
    return grid[:imgs.shape[1]].permute(1, 2, 0).numpy()


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of [N x C x H x W] images in [-1, 1]; C is 1 (gray) or 3 (RGB)."""
    grid = make_grid(x, nrow=nrow, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def _check_clips(x: Tensor, what: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{what} needs clips [N x C x F x H x W], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) or min(x.shape) < 1:
        raise ValueError(f"{what} needs C = 1 (gray) or 3 (RGB) and non-empty clips, got shape "
                         f"{tuple(x.shape)}")


def _to_image(grid: np.ndarray) -> Image.Image:
    return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def save_frame_strip(x: Tensor, path: str | Path, scale: int = 1, max_clips: int | None = None
                     ) -> Path:
    """Write a PNG of clips [N x C x F x H x W] in [-1, 1]: row i is clip i, column k its frame
    k (the first `max_clips` clips when given), with `make_grid`'s 1-pixel white padding."""
    _check_clips(x, "save_frame_strip")
    if max_clips is not None:
        if max_clips < 1:
            raise ValueError(f"max_clips must be >= 1 or None, got {max_clips}")
        x = x[:max_clips]
    n, c, f, h, w = x.shape
    frames = x.transpose(1, 2).reshape(n * f, c, h, w)  # clip-major: clip 0's frames first
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _to_image(make_grid(frames, nrow=f, scale=scale)).save(path)
    return path


def save_gif(x: Tensor, path: str | Path, fps: float = 8, scale: int = 2, nrow: int | None = None
             ) -> Path:
    """Write an animated GIF of clips [N x C x F x H x W] in [-1, 1]: GIF frame k tiles frame k
    of every clip as `make_grid` does (`nrow` per row), looping forever at `fps` frames per
    second. GIF stores delays in whole 10 ms steps (fps 8 gives 130 ms, the nearest), and Pillow
    merges identical consecutive frames into one longer frame (a clip that stands still gives a
    one-frame GIF)."""
    _check_clips(x, "save_gif")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    images = [_to_image(make_grid(x[:, :, k], nrow=nrow, scale=scale)) for k in range(x.shape[2])]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=10 * max(1, math.floor(100 / fps + 0.5)), loop=0)
    return path
