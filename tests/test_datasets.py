"""Datasets that ship (circles, digits, image_folder), build_dataset, and the data pipeline:
resumable rank-sliced batches and corrupt items skipped and counted."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from perceptual_diffusion.config import DataConfig
from perceptual_diffusion.datasets import (CirclesDataset, DigitsDataset, ImageFolderDataset,
                                           ResumableBatchSampler, SkipCorrupt, build_dataset,
                                           circles, collate_skip, make_loader, num_classes)
from perceptual_diffusion.datasets.folder import decode_image, resize_center_crop

PROPERTY = settings(max_examples=60, deadline=None)


def take(sampler: ResumableBatchSampler, n: int) -> list[list[int]]:
    return [list(b) for b in itertools.islice(iter(sampler), n)]


class IndexDataset(torch.utils.data.Dataset):
    """Item i is {"x": [i]}; items in `bad` raise, like an unreadable file."""

    def __init__(self, n: int, bad: tuple[int, ...] = ()):
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i in self.bad:
            raise OSError(f"item {i} is corrupt")
        return {"x": torch.tensor([float(i)])}


# ---- circles ----------------------------------------------------------------------------------

def components(mask: np.ndarray) -> int:
    """Number of 4-connected components of True pixels (iterative flood fill)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


@pytest.mark.parametrize("size", [16, 32])
def test_circles_one_disk_per_image(size):
    images = circles(64, size, seed=3)
    assert images.shape == (64, 1, size, size) and images.dtype == torch.float32
    assert set(images.unique().tolist()) == {-1.0, 1.0}
    yy, xx = np.mgrid[:size, :size]
    for img in images[:, 0].numpy():
        fg = img > 0
        assert components(fg) == 1
        cy, cx = yy[fg].mean(), xx[fg].mean()
        r = math.sqrt(fg.sum() / math.pi)
        dist = np.hypot(yy - cy, xx - cx)
        assert fg[dist <= r - 1].all()          # a solid disk: no holes, no bites
        assert (dist[fg] <= r + 1).all()        # and nothing beyond it


def test_circles_deterministic_and_dataset_matches():
    assert torch.equal(circles(8, 16, seed=5), circles(8, 16, seed=5))
    assert not torch.equal(circles(8, 16, seed=5), circles(8, 16, seed=6))
    ds = CirclesDataset(num_items=10, size=16, seed=5)
    assert len(ds) == 10
    item = ds[7]
    assert set(item) == {"x"} and item["x"].shape == (1, 16, 16)
    assert torch.equal(item["x"], circles(10, 16, seed=5)[7])
    assert torch.equal(CirclesDataset(10, 16, 5)[3]["x"], ds[3]["x"])


# ---- digits -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits32() -> DigitsDataset:
    return DigitsDataset(size=32, conditional=True)


def test_digits_items_labels_range(digits32):
    assert len(digits32) == 1797
    labels = digits32.labels
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    x = digits32.images
    assert x.shape == (1797, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    item = digits32[5]
    assert item["x"].shape == (1, 32, 32)
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert item["label"].item() == 5      # load_digits starts 0, 1, 2, ..., 9


def test_digits_scaling_size_and_unconditional():
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float32)
    native = DigitsDataset(size=8, conditional=False)
    assert torch.allclose(native.images[:, 0], raw / 8 - 1)     # 0..16 -> [-1, 1]
    assert set(native[0]) == {"x"}
    small = DigitsDataset(size=16, conditional=False)
    assert small[0]["x"].shape == (1, 16, 16) and set(small[0]) == {"x"}
    assert small.images.min() >= -1 and small.images.max() <= 1


def test_digits_without_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"perceptual-diffusion\[data\]"):
        DigitsDataset()


# ---- image_folder -----------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    stripes = np.zeros((16, 48, 3), np.uint8)       # wide: red | green | blue, 16 px each
    stripes[:, :16, 0] = stripes[:, 16:32, 1] = stripes[:, 32:, 2] = 255
    Image.fromarray(stripes).save(tmp_path / "a_stripes.png")
    Image.fromarray(np.full((50, 20), 200, np.uint8)).save(tmp_path / "b_tall_gray.png")
    (tmp_path / "c_corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((8, 12, 3), 255, np.uint8)).save(tmp_path / "sub" / "d_small.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    captions = [{"file": "a_stripes.png", "caption": "three stripes"},
                {"file": "sub/d_small.jpg", "caption": "white"}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    return tmp_path


def test_image_folder_resize_crop_channels_captions(folder):
    rgb = ImageFolderDataset(folder, size=16, channels=3)
    assert rgb.files == ["a_stripes.png", "b_tall_gray.png", "c_corrupt.png", "sub/d_small.jpg"]
    stripes = rgb[0]
    assert stripes["caption"] == "three stripes"
    # shorter side already 16: the center crop is exactly the green stripe
    assert torch.allclose(stripes["x"], torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 16, 16))
    tall = rgb[1]
    assert tall["caption"] == "" and tall["x"].shape == (3, 16, 16)
    assert torch.allclose(tall["x"], torch.full((3, 16, 16), 200 / 127.5 - 1), atol=1e-6)
    up = rgb[3]                                   # 12x8 upscaled to 24x16, cropped
    assert up["caption"] == "white" and up["x"].shape == (3, 16, 16)
    assert up["x"].min() >= -1 and up["x"].max() <= 1 and up["x"].mean() > 0.95

    gray = ImageFolderDataset(folder, size=16, channels=1)
    x = gray[0]["x"]
    assert x.shape == (1, 16, 16)
    assert torch.allclose(x, torch.full_like(x, 150 / 127.5 - 1), atol=1 / 127.5)  # L of green


def test_image_folder_without_captions_and_other_size(folder):
    (folder / "captions.jsonl").unlink()
    ds = ImageFolderDataset(folder, size=10, channels=3)
    assert set(ds[1]) == {"x"} and ds[1]["x"].shape == (3, 10, 10)


def test_image_folder_corrupt_raises_raw_and_is_skipped_by_loader(folder, caplog):
    ds = ImageFolderDataset(folder, size=16, channels=3)
    with pytest.raises(OSError, match="c_corrupt.png"):
        ds[2]
    loader = make_loader(ds, ResumableBatchSampler(len(ds), batch_size=4, seed=0), num_workers=0)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(loader))
    assert batch["skipped"] == 1
    assert batch["x"].shape == (3, 3, 16, 16)
    assert sorted(batch["caption"]) == ["", "three stripes", "white"]
    assert any("skipping data item 2" in r.getMessage() and "c_corrupt.png" in r.getMessage()
               for r in caplog.records)


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        ImageFolderDataset(tmp_path / "nowhere", 16, 3)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=str(tmp_path)):
        ImageFolderDataset(tmp_path, 16, 3)
    with pytest.raises(ValueError, match="data.path"):
        ImageFolderDataset("", 16, 3)


# ---- decoding, resizing, cropping (torchvision) ---------------------------------------------

def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_resize_center_crop_constant_split_and_dtype():
    # A constant image stays constant, down and up.
    for h, w, size in [(30, 50, 7), (5, 3, 16)]:
        x = resize_center_crop(torch.full((3, h, w), 77, dtype=torch.uint8), size)
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert torch.equal(x, torch.full_like(x, 77) / 127.5 - 1)
    # Left half black, right half white, 40 -> 10: the columns beyond the bicubic kernel's reach
    # of the edge are exactly black / white, every row is the same, and the split is kept.
    a = torch.zeros(1, 40, 40, dtype=torch.uint8)
    a[..., 20:] = 255
    x = resize_center_crop(a, 10)[0]
    assert x.shape == (10, 10) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, x[:1].expand(10, 10))
    assert torch.equal(x[:, :3], -torch.ones(10, 3)) and torch.equal(x[:, 7:], torch.ones(10, 3))
    assert x[:, :5].mean() < -0.5 and x[:, 5:].mean() > 0.5
    # Wide, 24 x 8 -> 12 x 4, middle third white: the crop is the middle, its inner columns
    # white, the outer ones mostly (the kernel reaches the black thirds).
    a = torch.zeros(1, 8, 24, dtype=torch.uint8)
    a[..., 8:16] = 255
    x = resize_center_crop(a, 4)[0]
    assert torch.equal(x[:, 1:3], torch.ones(4, 2)) and (x[:, [0, 3]] > 0.5).all()
    assert torch.equal(x, x.flip(-1))
    with pytest.raises(TypeError, match="uint8"):
        resize_center_crop(torch.zeros(1, 4, 4), 2)


def test_gray_is_pillows_luma_and_rgb_repeats_gray(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 1]).save(tmp_path / "z_gray.png")
    gray = ImageFolderDataset(tmp_path, size=6, channels=1)
    want = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 127.5 - 1
    assert torch.equal(gray.load(0), torch.from_numpy(want)[None])      # no resize: exact
    three = ImageFolderDataset(tmp_path, size=6, channels=3).load(1)
    assert torch.equal(three, (torch.from_numpy(rgb[..., 1]).float() / 127.5 - 1).expand(3, 6, 6))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255  # stored 20 wide: left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 10 wide, 20 tall, top half white
    kw = {"quality": 100} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    (tmp_path / f"x.{fmt.lower()}").write_bytes(_encode(Image.fromarray(a), fmt, exif=exif.tobytes(), **kw))
    x = ImageFolderDataset(tmp_path, size=10, channels=3).load(0)
    assert x.shape == (3, 10, 10)  # the 10 x 20 upright picture, its middle rows kept
    want = torch.cat([torch.ones(3, 5, 10), -torch.ones(3, 5, 10)], 1)
    torch.testing.assert_close(x, want, rtol=0, atol=0 if fmt != "JPEG" else 4 / 127.5)


def test_formats_torchvision_cannot_decode_fall_back_to_pillow(tmp_path, monkeypatch):
    import perceptual_diffusion.datasets.folder as folder_mod

    pillow_calls = []
    real = folder_mod._decode_with_pillow
    monkeypatch.setattr(folder_mod, "_decode_with_pillow",
                        lambda data: pillow_calls.append(data[:2]) or real(data))
    pic = Image.fromarray(np.random.default_rng(2).integers(0, 256, (21, 30, 3), dtype=np.uint8))
    pic.save(tmp_path / "a.bmp")
    pic.save(tmp_path / "b.png")
    ds = ImageFolderDataset(tmp_path, size=8, channels=3)
    bmp = ds.load(0)
    assert pillow_calls == [b"BM"]  # the BMP went through Pillow, the PNG did not
    assert torch.equal(bmp, ds.load(1)) and pillow_calls == [b"BM"]
    assert torch.equal(ImageFolderDataset(tmp_path, size=8, channels=1).load(0),
                       ImageFolderDataset(tmp_path, size=8, channels=1).load(1))
    # TIFF: Pillow as well; CMYK JPEG, palette and alpha PNG: torchvision, as Pillow sees them.
    want = torch.from_numpy(np.array(pic)).permute(2, 0, 1)
    assert torch.equal(decode_image(_encode(pic, "TIFF"), 3), want)
    for im, fmt in [(pic.convert("CMYK"), "JPEG"), (pic.convert("P"), "PNG"), (pic.convert("RGBA"), "PNG")]:
        data = _encode(im, fmt)
        ref = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        assert torch.equal(decode_image(data, 3), torch.from_numpy(ref).permute(2, 0, 1)), (im.mode, fmt)
    assert pillow_calls == [b"BM", b"BM", b"II"]  # BMP (RGB, gray), TIFF


def test_16_bit_png_is_scaled_to_8_bits():
    k = np.arange(256, dtype=np.uint16).reshape(16, 16)
    data = _encode(Image.fromarray(k * 257), "PNG")  # 16-bit gray, full range
    x = decode_image(data, 1)
    assert x.dtype == torch.uint8 and torch.equal(x[0], torch.from_numpy(k.astype(np.uint8)))
    with pytest.raises(OSError, match="neither torchvision .* nor Pillow"):
        decode_image(b"not an image", 3)


# ---- build_dataset / num_classes -------------------------------------------------------------

def test_build_dataset_dispatch(folder):
    c = build_dataset(DataConfig(name="circles", num_items=12, size=16, seed=2))
    assert isinstance(c, CirclesDataset) and len(c) == 12
    assert torch.equal(c[4]["x"], circles(12, 16, 2)[4])
    d = build_dataset(DataConfig(name="digits", size=16, conditional=True))
    assert isinstance(d, DigitsDataset) and d[0]["x"].shape == (1, 16, 16) and "label" in d[0]
    f = build_dataset(DataConfig(name="image_folder", path=str(folder), size=8, channels=3))
    assert isinstance(f, ImageFolderDataset) and f[0]["x"].shape == (3, 8, 8)

    assert num_classes(DataConfig(name="digits", conditional=True)) == 10
    assert num_classes(DataConfig(name="digits", conditional=False)) is None
    assert num_classes(DataConfig(name="circles", conditional=True)) is None
    with pytest.raises(ValueError, match="image_folder"):
        build_dataset(DataConfig(name="mnist"))
    with pytest.raises(ValueError, match="channels"):
        build_dataset(DataConfig(name="circles", channels=3))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        build_dataset(DataConfig(name="image_folder", path=str(folder / "missing_dir")))


# ---- ResumableBatchSampler --------------------------------------------------------------------

def test_sampler_epochs_are_the_seeded_permutations():
    s = ResumableBatchSampler(12, batch_size=4, seed=7)
    batches = take(s, 9)
    for e in range(3):
        g = torch.Generator().manual_seed(7 * 1_000_003 + e)
        perm = torch.randperm(12, generator=g).tolist()
        assert sum(batches[3 * e:3 * e + 3], []) == perm
        assert sorted(perm) == list(range(12))
    assert batches[:3] != batches[3:6]
    assert take(ResumableBatchSampler(12, 4, seed=7), 9) == batches
    assert take(ResumableBatchSampler(12, 4, seed=8), 9) != batches
    assert s.position == (3, 0)


def test_sampler_drops_the_incomplete_tail():
    s = ResumableBatchSampler(11, batch_size=3, seed=0)
    assert s.batches_per_epoch == 3
    epoch = sum(take(s, 3), [])
    assert len(set(epoch)) == 9 and epoch == s.permutation(0).tolist()[:9]


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_rank_slices_cover_each_global_batch(world_size):
    n, bs = 23, 2
    per_rank = [take(ResumableBatchSampler(n, bs, seed=1, rank=r, world_size=world_size), 12)
                for r in range(world_size)]
    bpe = n // (bs * world_size)
    for i in range(12):
        epoch, b = divmod(i, bpe)
        glob = ResumableBatchSampler(n, bs, seed=1).permutation(epoch).tolist()
        glob = glob[b * bs * world_size:(b + 1) * bs * world_size]
        assert sum((per_rank[r][i] for r in range(world_size)), []) == glob
        assert len(set(glob)) == bs * world_size                  # ranks disjoint


@PROPERTY
@given(k=st.integers(0, 25), m=st.integers(1, 8), batch_size=st.integers(1, 5),
       world_size=st.integers(1, 3), extra=st.integers(0, 20), data=st.data())
def test_sampler_resumes_exactly_from_position(k, m, batch_size, world_size, extra, data):
    rank = data.draw(st.integers(0, world_size - 1))
    n = batch_size * world_size + extra
    args = dict(num_items=n, batch_size=batch_size, seed=3, rank=rank, world_size=world_size)
    full = take(ResumableBatchSampler(**args), k + m)
    first = ResumableBatchSampler(**args)
    assert take(first, k) == full[:k]
    epoch, b = first.position
    assert epoch * first.batches_per_epoch + b == k
    resumed = ResumableBatchSampler(**args, epoch=epoch, batch_in_epoch=b)
    assert take(resumed, m) == full[k:]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(5, batch_size=3, seed=0, world_size=2)
    with pytest.raises(ValueError):
        ResumableBatchSampler(10, batch_size=2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="position"):
        ResumableBatchSampler(10, batch_size=2, seed=0, batch_in_epoch=5)


# ---- loader -----------------------------------------------------------------------------------

def test_collate_skip():
    items = [{"x": torch.zeros(1, 2, 2), "label": torch.tensor(3), "caption": "a"}, None,
             {"x": torch.ones(1, 2, 2), "label": torch.tensor(4), "caption": "b"}]
    out = collate_skip(items)
    assert out["skipped"] == 1 and out["x"].shape == (2, 1, 2, 2)
    assert out["label"].tolist() == [3, 4] and out["caption"] == ["a", "b"]
    assert collate_skip([None, None]) == {"skipped": 2}


def test_skip_corrupt_returns_none_and_warns(caplog):
    ds = SkipCorrupt(IndexDataset(4, bad=(2,)))
    with caplog.at_level(logging.WARNING):
        assert ds[2] is None
    assert ds[1]["x"].item() == 1.0
    assert "skipping data item 2" in caplog.text and "item 2 is corrupt" in caplog.text


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_batches_follow_sampler_and_resume_from_batch_position(num_workers):
    n, bs, k, m = 10, 3, 4, 5
    expected = take(ResumableBatchSampler(n, bs, seed=4), k + m)
    state = torch.get_rng_state()
    loader = make_loader(IndexDataset(n, bad=(expected[1][0],)), ResumableBatchSampler(n, bs, seed=4),
                         num_workers)
    it = iter(loader)
    got = [next(it) for _ in range(k)]
    assert torch.equal(torch.get_rng_state(), state)      # the loader leaves the global RNG alone
    assert got[1]["skipped"] == 1 and got[1]["x"].shape[0] == bs - 1
    for batch, idx in zip(got, expected):
        assert sorted(batch["x"][:, 0].long().tolist()) == sorted(set(idx) - {expected[1][0]})
    epoch, b = got[-1]["position"]       # with workers the sampler itself has run ahead
    resumed = make_loader(IndexDataset(n), ResumableBatchSampler(n, bs, 4, epoch=epoch,
                                                                 batch_in_epoch=b), num_workers)
    rest = list(itertools.islice(resumed, m))
    assert [batch["x"][:, 0].long().tolist() for batch in rest] == expected[k:]


def test_loader_all_corrupt_batch_has_no_x():
    loader = make_loader(IndexDataset(4, bad=(0, 1, 2, 3)), ResumableBatchSampler(4, 2, 0), 0)
    batch = next(iter(loader))
    assert "x" not in batch and batch["skipped"] == 2 and batch["position"] == (0, 1)


def test_loader_rejects_mismatched_sampler():
    with pytest.raises(ValueError, match="dataset has 7"):
        make_loader(IndexDataset(7), ResumableBatchSampler(8, 2, 0), 0)
