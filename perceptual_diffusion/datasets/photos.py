"""Natural-image patches cut from the two photographs scikit-learn ships (no download):
china.jpg and flower.jpg, 427 x 640 RGB each.

    train = PhotoPatchesDataset(num_items=4096, size=16, channels=1, seed=0)
    held_out = PhotoPatchesDataset(num_items=4096, size=16, channels=1, seed=0, split="heldout")

Each photo is cut into a grid of tiles at least 4 x size pixels each way (the largest crop), and
the tiles are dealt to the two splits by their detail: sorted by the mean absolute Laplacian of the
photo's luma inside them and dealt in the order train, held-out, held-out, train, train, ... so
that both splits get as much sky, foliage, roof, water, petals and blurred background as the other
(a plain checkerboard left the training patches 10-25% smoother than the held-out ones). Training
patches come from the training tiles, held-out patches from the others: the two splits share no
pixel. At size 16 that is 6 x 10 tiles of 71 x 64 px per photo, 60 tiles per split; at size 32,
3 x 5 tiles of 142 x 128 px, 15 per split. Sizes above 106 leave no tile and are refused.

An item is a square crop of size x s pixels, s drawn uniformly from SCALES = (1, 2, 4), at a
uniform position inside a tile drawn uniformly from the split's tiles, resized to size x size with
antialiased bilinear filtering (a triangle filter as wide as the reduction: PIL's BILINEAR
reduce), so the patches hold fine grain (s = 1), the texture of objects (s = 2) and their layout
(s = 4). Gray patches are PIL's "L" luma of the photo (ITU-R 601-2, as image_folder); RGB keeps
the colours. Values 0..255 map linearly to [-1, 1]; the filter's weights are non-negative and sum
to 1, so resized values stay in range. Everything is drawn once from `seed` (and the split), so an
item depends on (num_items, size, channels, seed, split) only.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["PhotoPatchesDataset", "load_photos", "photo_tiles", "SCALES", "SPLITS"]

SCALES = (1, 2, 4)          # crop side / patch side
SPLITS = ("train", "heldout")
_TILE = max(SCALES)         # a tile is at least this many patch sides each way
_CHUNK = 64                 # crops resized at once: at most ~140 MiB of crops (RGB, size 106)


@functools.lru_cache(maxsize=2)
def load_photos(channels: int = 1) -> Tensor:
    """scikit-learn's two sample photos as (2, channels, 427, 640) float32 in [-1, 1] (china, then
    flower); channels 1 is PIL's "L" luma, 3 the RGB colours."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise ImportError("the photo_patches dataset needs scikit-learn: "
                          "pip install 'perceptual-diffusion[data]'") from e
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"photo_patches: channels must be 1 (gray) or 3 (RGB), got {channels}")
    photos = [np.asarray(Image.fromarray(p).convert("L"))[..., None] if channels == 1 else p
              for p in load_sample_images().images]
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1).contiguous()


def photo_tiles(size: int, split: str) -> Tensor:
    """The tiles of `split` for patches of `size` px: (K, 5) int64 rows (photo, top, left, height,
    width), in detail order. Tiles of the two splits never overlap; see the module docstring."""
    from ..metrics.patches import mean_abs_laplacian

    if split not in SPLITS:
        raise ValueError(f"photo_patches: split must be one of {', '.join(SPLITS)}, got {split!r}")
    luma = load_photos(1)
    photos, height, width = luma.shape[0], luma.shape[-2], luma.shape[-1]
    rows, cols = height // (_TILE * size), width // (_TILE * size)
    if rows < 1 or cols < 1:
        raise ValueError(f"photo_patches: size must be at most {min(height, width) // _TILE} (crops of up to "
                         f"{_TILE} x size inside the {height} x {width} photos), got {size}")
    th, tw = height // rows, width // cols
    tiles = [(p, r * th, c * tw, th, tw) for p in range(photos) for r in range(rows) for c in range(cols)]
    detail = [mean_abs_laplacian(luma[p, None, :, t:t + h, x:x + w]) for p, t, x, h, w in tiles]
    order = sorted(range(len(tiles)), key=detail.__getitem__)
    held_out = [k % 4 in (1, 2) for k in range(len(tiles))]  # train, held-out, held-out, train, ...
    return torch.tensor([tiles[i] for i, h in zip(order, held_out) if h == (split == "heldout")],
                        dtype=torch.int64)


class PhotoPatchesDataset(Dataset):
    """Patches of scikit-learn's sample photos (module docstring): items {"x": (channels, size,
    size) float32 in [-1, 1]}. `boxes` (num_items, 4) int64 holds each item's crop as (photo, top,
    left, side) in photo pixels; `images` (num_items, channels, size, size) the patches; `split`
    which tiles they come from ("train" or "heldout")."""

    def __init__(self, num_items: int = 4096, size: int = 16, channels: int = 1, seed: int = 0,
                 split: str = "train"):
        if num_items < 1 or size < 1:
            raise ValueError(f"photo_patches: need num_items >= 1 and size >= 1, got {num_items}, {size}")
        photos = load_photos(channels)
        tiles = photo_tiles(size, split)
        self.split = split
        # one stream per (seed, split): the held-out draws are not the training draws moved over
        g = torch.Generator().manual_seed(len(SPLITS) * seed + SPLITS.index(split))
        tile = tiles[torch.randint(len(tiles), (num_items,), generator=g)]
        side = size * torch.tensor(SCALES)[torch.randint(len(SCALES), (num_items,), generator=g)]
        top = tile[:, 1] + (torch.rand(num_items, generator=g) * (tile[:, 3] - side + 1)).long()
        left = tile[:, 2] + (torch.rand(num_items, generator=g) * (tile[:, 4] - side + 1)).long()
        self.boxes = torch.stack([tile[:, 0], top, left, side], 1)
        self.images = torch.empty(num_items, channels, size, size)
        for s in side.unique().tolist():
            for idx in (side == s).nonzero()[:, 0].split(_CHUNK):
                self.images[idx] = _crop_resize(photos, self.boxes[idx], s, size)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.images[index]}


def _crop_resize(photos: Tensor, boxes: Tensor, side: int, size: int) -> Tensor:
    """Crops `boxes` (K, 4) of one `side` from photos (P, C, H, W), resized to size x size."""
    span = torch.arange(side)
    rows = (boxes[:, 1, None] + span)[:, None, :, None]
    cols = (boxes[:, 2, None] + span)[:, None, None, :]
    chans = torch.arange(photos.shape[1])[None, :, None, None]
    crops = photos[boxes[:, 0, None, None, None], chans, rows, cols]  # (K, C, side, side)
    if side == size:
        return crops
    return F.interpolate(crops, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp_(-1, 1)
