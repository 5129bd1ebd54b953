"""Sample grids: torchvision's tiling with 1-pixel white padding, nearest upscaling, gray kept
single-channel."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from perceptual_diffusion.images import make_grid, save_grid, to_uint8


def test_make_grid_layout_padding_and_scale():
    n, h, w, s = 5, 3, 4, 2
    x = torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = make_grid(x, nrow=3, scale=s)
    th, tw = s * h, s * w
    assert grid.shape == (2 * (th + 1) + 1, 3 * (tw + 1) + 1, 1) and grid.dtype == np.uint8
    tiles = to_uint8(x).repeat(s, axis=1).repeat(s, axis=2)  # nearest upscaling
    for i in range(n):
        r, c = divmod(i, 3)
        top, left = 1 + r * (th + 1), 1 + c * (tw + 1)
        assert np.array_equal(grid[top:top + th, left:left + tw], tiles[i]), i
    # White lines between and around the tiles, and the empty sixth slot white.
    assert (grid[::th + 1] == 255).all() and (grid[:, ::tw + 1] == 255).all()
    assert (grid[th + 2:, 2 * (tw + 1) + 1:] == 255).all()


def test_make_grid_default_rows_single_image_and_rgb():
    x = torch.linspace(-1, 1, 4 * 3 * 2 * 2).reshape(4, 3, 2, 2)
    grid = make_grid(x)  # ceil(sqrt(4)) = 2 per row
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 3)
    assert np.array_equal(grid[4:6, 4:6], to_uint8(x)[3])
    one = make_grid(x[:1])  # a lone image is padded too
    assert one.shape == (4, 4, 3) and np.array_equal(one[1:3, 1:3], to_uint8(x)[0])
    assert (one[0] == 255).all() and (one[:, -1] == 255).all()
    assert make_grid(x[:2], nrow=8).shape == (4, 7, 3)  # at most N per row


def test_save_grid_keeps_gray_single_channel(tmp_path):
    x = torch.full((3, 1, 2, 2), 0.0)
    with Image.open(save_grid(x, tmp_path / "g" / "gray.png", nrow=3)) as im:
        assert im.mode == "L" and im.size == (10, 4)
        a = np.asarray(im)
    assert (a[1:3, 1:3] == 128).all() and (a[0] == 255).all()
    with Image.open(save_grid(x.expand(3, 3, 2, 2), tmp_path / "rgb.png")) as im:
        assert im.mode == "RGB" and im.size == (7, 7)
