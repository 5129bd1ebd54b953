"""Turning tensors into pictures a person can open."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["to_uint8", "make_grid", "save_grid"]


def to_uint8(x: Tensor) -> np.ndarray:
    """[N x C x H x W] in [-1, 1] -> uint8 array (N, H, W, C)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(x: Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile [N x C x H x W] images in [-1, 1] into one uint8 (H', W', C) array, `nrow` per row,
    each image upscaled `scale` times (nearest) so small samples are visible."""
    if x.ndim != 4:
        raise ValueError(f"make_grid needs [N x C x H x W], got shape {tuple(x.shape)}")
    imgs = to_uint8(x)
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = imgs[i]
    return grid


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of [N x C x H x W] images in [-1, 1]; C is 1 (gray) or 3 (RGB)."""
    grid = make_grid(x, nrow=nrow, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
