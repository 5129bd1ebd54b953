"""The photo_patches dataset (patches of scikit-learn's two sample photos, a held-out split that
shares no pixel with the training one) and the weight-free `patches` metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perceptual_diffusion.cli import main
from perceptual_diffusion.config import DataConfig, load_recipe
from perceptual_diffusion.datasets import (DATASETS, PhotoPatchesDataset, build_dataset, build_reference_dataset,
                                           modality, num_classes, sample_shape)
from perceptual_diffusion.datasets.photos import SCALES, load_photos, photo_tiles
from perceptual_diffusion.evaluation import METRIC_MODALITY, METRICS, reference_images
from perceptual_diffusion.metrics import real_vs_real_floor
from perceptual_diffusion.metrics.patches import laplacian, mean_abs_laplacian, patch_features, patches_metrics
from perceptual_diffusion.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "image" / "photo_patches.toml"


@pytest.fixture(scope="module")
def splits() -> tuple[PhotoPatchesDataset, PhotoPatchesDataset]:
    return (PhotoPatchesDataset(2048, 16, 1, seed=0), PhotoPatchesDataset(2048, 16, 1, seed=0, split="heldout"))


# ---- the dataset ------------------------------------------------------------------------------

def test_items_shapes_range_and_determinism(splits):
    train, _ = splits
    assert len(train) == 2048 and train.images.shape == (2048, 1, 16, 16) and train.images.dtype == torch.float32
    assert train.images.min() >= -1 and train.images.max() <= 1 and train.images.std() > 0.3
    item = train[5]
    assert set(item) == {"x"} and torch.equal(item["x"], train.images[5])
    again = PhotoPatchesDataset(2048, 16, 1, seed=0)
    assert torch.equal(again.images, train.images) and torch.equal(again.boxes, train.boxes)
    other = PhotoPatchesDataset(2048, 16, 1, seed=1)
    assert not torch.equal(other.boxes, train.boxes)
    # every scale is drawn about equally often
    counts = torch.bincount(train.boxes[:, 3] // 16)
    assert [int(counts[s]) for s in SCALES] == pytest.approx([2048 / 3] * 3, rel=0.1)


def test_items_are_crops_of_the_photos_resized_with_antialiasing(splits):
    train, _ = splits
    photos = load_photos(1)
    for i in range(40):
        p, top, left, side = train.boxes[i].tolist()
        crop = photos[p, :, top:top + side, left:left + side]
        want = crop if side == 16 else F.interpolate(crop[None], size=(16, 16), mode="bilinear", antialias=True)[0]
        torch.testing.assert_close(train.images[i], want.clamp(-1, 1), rtol=0, atol=1e-6)


def test_gray_is_pillows_luma_and_rgb_keeps_the_colours():
    from PIL import Image
    from sklearn.datasets import load_sample_images

    raw = load_sample_images().images[1]
    want = np.asarray(Image.fromarray(raw).convert("L"), dtype=np.float32) / 127.5 - 1
    assert torch.equal(load_photos(1)[1, 0], torch.from_numpy(want))
    assert torch.equal(load_photos(3)[1], torch.from_numpy(raw.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    rgb = PhotoPatchesDataset(16, 16, 3, seed=0)
    assert rgb.images.shape == (16, 3, 16, 16) and torch.equal(rgb.boxes, PhotoPatchesDataset(16, 16, 1).boxes)
    assert (rgb.images[:, 0] - rgb.images[:, 2]).abs().max() > 0.1  # colour, not three copies of gray


@pytest.mark.parametrize("size", [16, 32])
def test_splits_share_no_pixel(size):
    train = PhotoPatchesDataset(1000, size, 1, seed=3)
    held = PhotoPatchesDataset(1000, size, 1, seed=3, split="heldout")
    photos = load_photos(1)
    used = torch.zeros(2, *photos.shape[:1], *photos.shape[-2:], dtype=torch.bool)  # split x photo x H x W
    for k, ds in enumerate((train, held)):
        for p, top, left, side in ds.boxes.tolist():
            used[k, p, top:top + side, left:left + side] = True
    assert used[0].any() and used[1].any() and not (used[0] & used[1]).any()
    # and the tiles behind them are disjoint and cover both photos for both splits
    tiles = {s: photo_tiles(size, s) for s in ("train", "heldout")}
    assert set(tiles["train"][:, 0].tolist()) == set(tiles["heldout"][:, 0].tolist()) == {0, 1}
    assert abs(len(tiles["train"]) - len(tiles["heldout"])) <= 1


def test_splits_hold_alike_detail_and_brightness(splits):
    train, held = splits
    assert mean_abs_laplacian(train.images) == pytest.approx(mean_abs_laplacian(held.images), rel=0.06)
    assert float(train.images.mean()) == pytest.approx(float(held.images.mean()), abs=0.03)
    assert float(train.images.std()) == pytest.approx(float(held.images.std()), rel=0.03)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="size must be at most 106"):
        PhotoPatchesDataset(4, 107)
    with pytest.raises(ValueError, match="split must be one of train, heldout"):
        PhotoPatchesDataset(4, 16, split="test")
    with pytest.raises(ValueError, match="channels must be 1"):
        PhotoPatchesDataset(4, 16, channels=2)
    with pytest.raises(ValueError, match="conditional"):
        build_dataset(DataConfig(name="photo_patches", size=16, conditional=True))


def test_registry_and_recipe():
    assert "photo_patches" in DATASETS
    cfg = DataConfig(name="photo_patches", size=16, num_items=32, seed=2)
    assert modality(cfg) == "image" and num_classes(cfg) is None and sample_shape(cfg) == (1, 16, 16)
    train, held = build_dataset(cfg), build_reference_dataset(cfg)
    assert torch.equal(train.images, PhotoPatchesDataset(32, 16, 1, 2).images)
    assert torch.equal(held.images, PhotoPatchesDataset(32, 16, 1, 2, "heldout").images)
    circles = DataConfig(name="circles", size=16, num_items=8)
    assert torch.equal(build_reference_dataset(circles).images, build_dataset(circles).images)

    r = load_recipe(RECIPE)
    assert (r.data.name, r.data.size, r.data.channels, r.data.conditional) == ("photo_patches", 16, 1, False)
    assert r.model.backbone == "image_unet" and r.model.preset == "tiny" and list(r.train.stages) == ["mse", "sp"]
    assert r.sp.init_weights == "frozen" and r.sp.perceptual_weights == "ema" and r.sp.lr < r.mse.lr
    assert len(build_dataset(r.data)) == 4096
    # metrics measure samples against the held-out split
    ref = reference_images(load_recipe(RECIPE, ["data.num_items=48"]), 10_000)
    held = PhotoPatchesDataset(48, 16, 1, 0, "heldout").images
    assert ref.shape == held.shape
    torch.testing.assert_close(ref.sum(0), held.sum(0))  # the same patches, in another order


# ---- the patches metric -----------------------------------------------------------------------

def test_laplacian_of_known_images():
    ramp = torch.linspace(-1, 1, 10, dtype=torch.float64).expand(1, 1, 10, 10)
    assert laplacian(ramp).shape == (1, 1, 8, 8) and mean_abs_laplacian(ramp) == pytest.approx(0, abs=1e-12)
    checker = (torch.arange(10)[:, None] + torch.arange(10)[None, :]) % 2 * 2.0 - 1
    assert mean_abs_laplacian(checker.expand(2, 3, 10, 10)) == pytest.approx(8.0)   # |4 (+-1) - 4 (-+1)|
    bowl = (torch.arange(10.0)[:, None] ** 2 + torch.arange(10.0)[None, :] ** 2).expand(1, 1, 10, 10)
    assert mean_abs_laplacian(bowl) == pytest.approx(4.0)                              # d2/dx2 + d2/dy2 = 2 + 2


def test_patch_features_shapes_and_invariance_to_order(splits):
    train, _ = splits
    layout, texture = patch_features(train.images[:10])
    assert layout.shape == (10, 64) and texture.shape == (10, 7) and layout.dtype == torch.float64
    torch.testing.assert_close(layout, F.avg_pool2d(train.images[:10].double(), 2).flatten(1))
    rgb_layout, rgb_texture = patch_features(torch.rand(4, 3, 16, 16))
    assert rgb_layout.shape == (4, 192) and rgb_texture.shape == (4, 21)
    flipped = patch_features(train.images[:10].flip(0))
    torch.testing.assert_close(flipped[1], texture.flip(0))
    with pytest.raises(ValueError, match="6 x 6"):
        patch_features(torch.zeros(2, 1, 5, 5))


def test_patches_metric_tells_real_from_blurred_and_grainy(splits):
    train, held = splits
    real = patches_metrics(train.images[:300], held.images)
    blur = patches_metrics(F.avg_pool2d(train.images[:300], 3, 1, 1, count_include_pad=False), held.images)
    g = torch.Generator().manual_seed(0)
    grain = patches_metrics((train.images[:300] + 0.1 * torch.randn(300, 1, 16, 16, generator=g)).clamp(-1, 1),
                            held.images)
    assert set(real) == {"patches_kid", "patches_kid_se", "patches_fd", "patches_laplacian", "patches_laplacian_ratio"}
    assert abs(real["patches_kid"]) < 3 * real["patches_kid_se"] and 0.8 < real["patches_laplacian_ratio"] < 1.2
    for bad in (blur, grain):
        assert bad["patches_kid"] > 3 * bad["patches_kid_se"] and bad["patches_fd"] > 3 * real["patches_fd"]
    assert grain["patches_kid"] > 20 * real["patches_kid_se"]
    assert blur["patches_laplacian_ratio"] < 0.5 and grain["patches_laplacian_ratio"] > 2
    assert real["patches_laplacian"] == pytest.approx(mean_abs_laplacian(train.images[:300]))


def test_patches_metric_floor_is_centred_on_zero(splits):
    _, held = splits
    floor = real_vs_real_floor(lambda a, b: patches_metrics(a, b, scale_from=held.images), held.images, 200,
                               splits=8)
    mean, std = floor["patches_kid"]
    assert abs(mean) < 2.5 * std / 8 ** 0.5 + 0.05 and std > 0
    assert floor["patches_laplacian_ratio"][0] == pytest.approx(1, abs=0.1)
    with pytest.raises(ValueError, match="same C x H x W"):
        patches_metrics(held.images[:4], torch.zeros(4, 3, 16, 16))


def test_patches_metric_is_registered_and_evaluates_a_checkpoint(tmp_path):
    assert METRIC_MODALITY["patches"] == "image" and "patches" in METRICS
    recipe = load_recipe(RECIPE, ["data.num_items=64", "mse.steps=2", "mse.batch_size=4", "train.stages=['mse']",
                                  "train.sample_every=0", "train.checkpoint_every=0", "train.num_samples=2",
                                  "train.sample_steps=2", "train.validation_size=0"])
    Trainer(recipe, tmp_path / "run", progress=False).run()
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(tmp_path / "run"), "--metric", "patches", "--metric", "spectrum", "--n", "8",
                 "--steps", "2", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    # a 2-step model draws noise: far more grain than the photos
    assert row["patches_laplacian_ratio"] > 3 and row["spectrum_hf_ratio"] > 2
    assert row["patches_kid"] > 3 * row["patches_kid_se"]
