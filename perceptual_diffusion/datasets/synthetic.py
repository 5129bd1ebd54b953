"""Generated data (no download): the paper's Figure 2a one-disk toy."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["circles", "CirclesDataset"]


def circles(n: int, size: int = 32, seed: int = 0, min_radius: float | None = None,
            max_radius: float | None = None) -> Tensor:
    """The paper's Figure 2a toy: each image holds exactly one solid disk at a random position
    and radius. Returns (n, 1, size, size) float32 in [-1, 1] (disk = 1, background = -1),
    deterministic in `seed`. The disk lies fully inside the image."""
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    lo = size / 8 if min_radius is None else min_radius
    hi = size / 3 if max_radius is None else max_radius
    if not 1 <= lo <= hi < size / 2:
        raise ValueError(f"need 1 <= min_radius <= max_radius < size/2, got {lo}, {hi}")
    g = torch.Generator().manual_seed(seed)
    r = lo + (hi - lo) * torch.rand(n, generator=g)
    cx = r + (size - 1 - 2 * r) * torch.rand(n, generator=g)
    cy = r + (size - 1 - 2 * r) * torch.rand(n, generator=g)
    coords = torch.arange(size, dtype=torch.float32)
    d2 = (coords[None, None, :] - cx[:, None, None]) ** 2 + (coords[None, :, None] - cy[:, None, None]) ** 2
    disk = d2 <= r[:, None, None] ** 2
    return (disk.float() * 2 - 1)[:, None]


class CirclesDataset(Dataset):
    """`circles(num_items, size, seed)` as a map-style dataset: items {"x": (1, size, size)}.

    The images are generated once up front (4096 at 32x32 is 16 MiB), so an item depends on
    the seed only, never on the order or the process that reads it.
    """

    def __init__(self, num_items: int = 4096, size: int = 32, seed: int = 0):
        self.images = circles(num_items, size, seed)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.images[index]}
