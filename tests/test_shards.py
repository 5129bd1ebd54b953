"""Webdataset tar shards as a map-style dataset: url forms, metadata filters and their counts,
items, the cached index, corrupt members, pickling/workers and rank splitting."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import perceptual_diffusion.datasets.shards as shards_mod
from perceptual_diffusion.datasets.folder import ImageFolderDataset
from perceptual_diffusion.datasets.loader import (ResumableBatchSampler, SkipCorrupt, collate_skip,
                                                  make_loader)
from perceptual_diffusion.datasets.shards import (INDEX_SUFFIX, ShardDataset, center_crop_tensor,
                                                  expand_braces, resolve_shards, write_shards)
from perceptual_diffusion.fileio import sha256_file

PROPERTY = settings(max_examples=40, deadline=None)
N = 20
NO_CAPTION, NO_IMAGE, NO_JSON, ORIGINAL_FIELDS, BAD_WIDTH = 3, 8, 13, 17, 5


def spec(i: int) -> dict:
    """The truth about sample i of the test shards."""
    return {"key": f"{i:06d}", "w": 10 + (i * 7) % 15, "h": 10 + (i * 11) % 13,
            "aesthetic": i / 2, "caption": f"  photo {i} of a caf\u00e9\n"}


def make_image(i: int) -> Image.Image:
    s = spec(i)
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (s["h"], s["w"], 3), dtype=np.uint8))


def encoded(i: int) -> bytes:
    """Odd samples are stored as JPEG bytes, even ones as PIL images (written as PNG)."""
    buffer = io.BytesIO()
    make_image(i).save(buffer, format="JPEG" if i % 2 else "PNG")
    return buffer.getvalue()


def sample(i: int) -> tuple:
    s = spec(i)
    meta = {"width": s["w"], "height": s["h"], "aesthetic": s["aesthetic"], "url": f"http://x/{i}"}
    if i == ORIGINAL_FIELDS:
        meta = {"original_width": s["w"], "original_height": s["h"], "AESTHETIC_SCORE": s["aesthetic"]}
    if i == BAD_WIDTH:
        meta["width"] = "wide"
    image = None if i == NO_IMAGE else encoded(i) if i % 2 else make_image(i)
    return (s["key"], image, None if i == NO_CAPTION else s["caption"], None if i == NO_JSON else meta)


def expected_stats(min_size: int = 0, min_aesthetic: float | None = None,
                   empty_captions: bool = False) -> dict[str, int]:
    """The filters written out plainly from `spec`, for comparison with ShardDataset.stats."""
    out = {"shards": 3, "samples": N, "kept": 0, "dropped_size": 0, "dropped_aesthetic": 0,
           "dropped_incomplete": 0}
    for i in range(N):
        s = spec(i)
        has_size, has_score = i not in (NO_JSON, BAD_WIDTH), i != NO_JSON
        if i == NO_IMAGE or (i == NO_CAPTION and not empty_captions):
            out["dropped_incomplete"] += 1
        elif min_size and (not has_size or min(s["w"], s["h"]) < min_size):
            out["dropped_size"] += 1
        elif min_aesthetic is not None and (not has_score or s["aesthetic"] < min_aesthetic):
            out["dropped_aesthetic"] += 1
        else:
            out["kept"] += 1
    return out


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    paths = write_shards((sample(i) for i in range(N)), out, per_shard=7)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    return out


@pytest.fixture
def fresh(shard_dir, tmp_path) -> Path:
    """A private copy of the shards (without their indexes) for tests that change files."""
    out = tmp_path / "copy"
    out.mkdir()
    for p in sorted(shard_dir.glob("*.tar")):
        shutil.copy2(p, out / p.name)
    return out


def by_key(ds: ShardDataset) -> dict[str, int]:
    return {ds.location(i)[1]: i for i in range(len(ds))}


# ---- naming the shards ------------------------------------------------------------------------

def test_expand_braces_closed_forms():
    assert expand_braces("/d/{00000..00002}.tar") == ["/d/00000.tar", "/d/00001.tar", "/d/00002.tar"]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{09..10}") == ["09", "10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("{0..2", "0..2}", "{a{1,2}}", "{x}"):
        with pytest.raises(ValueError, match="brace"):
            expand_braces(bad)


@PROPERTY
@given(lo=st.integers(0, 500), count=st.integers(0, 30), width=st.integers(1, 6))
def test_expand_braces_range_is_the_integers_zero_padded(lo, count, width):
    a, b = f"{lo:0{width}d}", f"{lo + count:0{width}d}"
    names = expand_braces(f"s{{{a}..{b}}}.tar")
    numbers = [n[1:-4] for n in names]
    assert [int(n) for n in numbers] == list(range(lo, lo + count + 1))
    padded = any(len(e) > 1 and e.startswith("0") for e in (a, b))
    assert numbers == [f"{n:0{max(len(a), len(b))}d}" if padded else str(n)
                       for n in range(lo, lo + count + 1)]


def test_every_url_form_names_the_same_shards(shard_dir):
    tars = sorted(shard_dir.glob("*.tar"))
    forms = [f"{shard_dir}/{{00000..00002}}.tar", f"{shard_dir}/*.tar", str(shard_dir), shard_dir,
             [str(p) for p in tars]]
    for urls in forms:
        assert resolve_shards(urls) == tars, urls
        ds = ShardDataset(urls, size=8)
        assert ds.shards == [str(p) for p in tars] and len(ds) == expected_stats()["kept"]
    assert resolve_shards(tars[1]) == [tars[1]]


def test_missing_shards_name_the_pattern(shard_dir, tmp_path):
    for urls in (f"{tmp_path}/*.tar", str(tmp_path), f"{tmp_path}/nope.tar", ""):
        with pytest.raises(FileNotFoundError, match="no tar shards|no shards given") as e:
            resolve_shards(urls)
        assert str(urls) in str(e.value)
    pattern = f"{shard_dir}/{{00000..00003}}.tar"
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 shards .*00003\.tar"):
        ShardDataset(pattern)
    with pytest.raises(TypeError, match="list of paths"):
        resolve_shards([str(shard_dir / "00000.tar"), 7])


# ---- filters and stats ------------------------------------------------------------------------

def test_stats_without_filters(shard_dir, caplog):
    with caplog.at_level(logging.INFO, logger="perceptual_diffusion.datasets.shards"):
        ds = ShardDataset(shard_dir, size=8)
    assert ds.stats == {"shards": 3, "samples": 20, "kept": 18, "dropped_size": 0,
                        "dropped_aesthetic": 0, "dropped_incomplete": 2}
    assert sum("kept=18" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO) == 1
    keys = set(by_key(ds))
    assert spec(NO_IMAGE)["key"] not in keys and spec(NO_CAPTION)["key"] not in keys
    assert ShardDataset(shard_dir, size=8, empty_captions=True).stats["dropped_incomplete"] == 1


@pytest.mark.parametrize("min_size,min_aesthetic,empty",
                         [(12, None, False), (0, 5.0, False), (13, 4.5, True), (15, 8.0, False)])
def test_filters_match_their_plain_definition(shard_dir, min_size, min_aesthetic, empty):
    ds = ShardDataset(shard_dir, size=8, min_size=min_size, min_aesthetic=min_aesthetic,
                      empty_captions=empty)
    stats = ds.stats
    assert stats == expected_stats(min_size, min_aesthetic, empty)
    assert stats["samples"] == stats["kept"] + stats["dropped_size"] + stats["dropped_aesthetic"] \
        + stats["dropped_incomplete"]
    for key in by_key(ds):
        s = spec(int(key))
        assert min(s["w"], s["h"]) >= min_size
        assert min_aesthetic is None or s["aesthetic"] >= min_aesthetic


def test_filter_counts_by_hand(shard_dir):
    small = [i for i in range(N) if min(spec(i)["w"], spec(i)["h"]) < 12]
    assert small == [0, 6, 13, 15, 19]
    ds = ShardDataset(shard_dir, size=8, min_size=12, min_aesthetic=6.0)
    # incomplete: 3 (no caption), 8 (no image); size: the small ones and 5 (width "wide");
    # aesthetic below 6: 1, 2, 4, 7, 9, 10, 11; kept: 12 (exactly 6.0), 14, 16, 17, 18.
    assert ds.stats == {"shards": 3, "samples": 20, "kept": 5, "dropped_size": 6,
                        "dropped_aesthetic": 7, "dropped_incomplete": 2}
    assert sorted(by_key(ds)) == ["000012", "000014", "000016", "000017", "000018"]


def test_thresholds_are_inclusive(shard_dir):
    s = spec(ORIGINAL_FIELDS)  # also: filters read original_width/height and AESTHETIC_SCORE
    ds = ShardDataset(shard_dir, size=8, min_size=min(s["w"], s["h"]), min_aesthetic=s["aesthetic"])
    assert s["key"] in by_key(ds)


def test_no_survivor_and_bad_arguments_raise(shard_dir):
    with pytest.raises(ValueError, match="no sample of 3 shards passes the filters"):
        ShardDataset(shard_dir, min_size=10_000)
    cases = [({"channels": 2}, ValueError, "channels must be 1 or 3"),
             ({"size": 0}, ValueError, "size must be >= 1"),
             ({"size": 8.0}, TypeError, "size must be an integer"),
             ({"min_size": -1}, ValueError, "min_size must be >= 0"),
             ({"min_aesthetic": "6"}, TypeError, "min_aesthetic must be a number"),
             ({"image_keys": "jpg"}, TypeError, "image_keys must be a non-empty list"),
             ({"caption_key": 3}, TypeError, "caption_key must be"),
             ({"caption_key": "png"}, ValueError, "also one of the image_keys")]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            ShardDataset(shard_dir, **kwargs)


# ---- items ------------------------------------------------------------------------------------

def test_items_shape_range_and_caption(shard_dir):
    ds = ShardDataset(shard_dir, size=8)
    for key, i in by_key(ds).items():
        item = ds[i]
        assert item["x"].shape == (3, 8, 8) and item["x"].dtype == torch.float32
        assert -1 <= item["x"].min() and item["x"].max() <= 1
        assert item["caption"] == spec(int(key))["caption"].strip()
    gray = ShardDataset(shard_dir, size=5, channels=1, empty_captions=True)
    assert len(gray) == 19
    assert all(gray[i]["x"].shape == (1, 5, 5) and gray[i]["caption"] == "" for i in range(len(gray)))


def test_items_equal_image_folder_of_the_same_files(shard_dir, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    picks = [0, 1, 6, 7]  # PNG and JPEG, wide and tall
    for i in picks:
        (folder / f"{spec(i)['key']}.{'jpg' if i % 2 else 'png'}").write_bytes(encoded(i))
    ref = ImageFolderDataset(folder, size=9, channels=3)
    ds = ShardDataset(shard_dir, size=9)
    index = by_key(ds)
    for j, name in enumerate(ref.files):
        assert torch.equal(ds.load(index[Path(name).stem]), ref.load(j)), name


def test_gray_items_equal_image_folder_and_pil_path(shard_dir, tmp_path):
    """Gray, and WEBP too: the shard and the folder decode and resize alike, and so does
    `center_crop_tensor` on the picture Pillow decodes from the same lossless bytes."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in (0, 1, 6):
        (folder / f"{spec(i)['key']}.{'jpg' if i % 2 else 'png'}").write_bytes(encoded(i))
    buffer = io.BytesIO()
    make_image(2).save(buffer, format="WEBP", lossless=True)
    (folder / "w.webp").write_bytes(buffer.getvalue())
    write_shards([(p.stem, p.read_bytes(), "c", None) for p in sorted(folder.iterdir())],
                 tmp_path / "s")
    ref = ImageFolderDataset(folder, size=7, channels=1)
    ds = ShardDataset(tmp_path / "s", size=7, channels=1)
    index = by_key(ds)
    for j, name in enumerate(ref.files):
        x = ds.load(index[Path(name).stem])
        assert x.shape == (1, 7, 7) and torch.equal(x, ref.load(j)), name
    assert torch.equal(ds.load(index["w"]), center_crop_tensor(make_image(2).convert("L"), 7))


@PROPERTY
@given(w=st.integers(1, 40), h=st.integers(1, 40), size=st.integers(1, 16), v=st.integers(0, 255),
       gray=st.booleans())
def test_center_crop_tensor_shape_and_constant_image(w, h, size, v, gray):
    im = Image.new("L" if gray else "RGB", (w, h), v if gray else (v, v, v))
    x = center_crop_tensor(im, size)
    assert x.shape == ((1 if gray else 3), size, size) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, v / 127.5 - 1), atol=1e-6)


def test_center_crop_tensor_takes_the_middle():
    a = np.zeros((4, 12), dtype=np.uint8)
    a[:, 4:8] = 255  # a wide image whose middle third is white
    x = center_crop_tensor(Image.fromarray(a), 4)
    assert torch.equal(x, torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="mode must be 'L' or 'RGB'"):
        center_crop_tensor(Image.new("RGBA", (4, 4)), 4)


# ---- the index cache --------------------------------------------------------------------------

def count_scans(monkeypatch) -> list[str]:
    scans: list[str] = []
    scan = shards_mod._scan_shard

    def counting(path):
        scans.append(Path(path).name)
        return scan(path)

    monkeypatch.setattr(shards_mod, "_scan_shard", counting)
    return scans


def test_index_is_cached_beside_the_shards_and_reused(fresh, monkeypatch):
    scans = count_scans(monkeypatch)
    first = ShardDataset(fresh, size=8)
    assert sorted(scans) == ["00000.tar", "00001.tar", "00002.tar"]
    index = json.loads((fresh / f"00001.tar{INDEX_SUFFIX}").read_text())
    assert index["size"] == (fresh / "00001.tar").stat().st_size and len(index["samples"]) == 7
    scans.clear()
    again = ShardDataset(fresh, size=8, min_size=12)  # filters apply to a cached index too
    assert scans == [] and again.stats == expected_stats(12)
    assert torch.equal(ShardDataset(fresh, size=8)[4]["x"], first[4]["x"])


def test_changed_shard_is_reindexed(fresh, monkeypatch):
    ShardDataset(fresh, size=8)
    scans = count_scans(monkeypatch)
    write_shards([sample(i) for i in range(7, 10)], fresh / "tmp", per_shard=7)
    os.replace(fresh / "tmp" / "00000.tar", fresh / "00001.tar")  # new size and mtime
    shutil.rmtree(fresh / "tmp")
    stat = (fresh / "00002.tar").stat()
    os.utime(fresh / "00002.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # mtime only
    (fresh / f"00000.tar{INDEX_SUFFIX}").write_text("{not json")  # a broken index
    ds = ShardDataset(fresh, size=8)
    assert sorted(scans) == ["00000.tar", "00001.tar", "00002.tar"]
    assert ds.stats["samples"] == 7 + 3 + 6
    scans.clear()
    ShardDataset(fresh, size=8)
    assert scans == []


def test_read_only_shard_folder_uses_the_cache_dir(fresh, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write = shards_mod.atomic_write

    def read_only(path, fn):
        if Path(path).parent == fresh:
            raise PermissionError(30, "Read-only file system", str(path))
        return write(path, fn)

    monkeypatch.setattr(shards_mod, "atomic_write", read_only)
    scans = count_scans(monkeypatch)
    ShardDataset(fresh, size=8)
    cached = sorted(p.name for p in (tmp_path / "xdg/perceptual-diffusion/shard-index").iterdir())
    assert len(cached) == 3 and all(n.endswith(f".tar{INDEX_SUFFIX}") for n in cached)
    assert not list(fresh.glob(f"*{INDEX_SUFFIX}"))
    scans.clear()
    ShardDataset(fresh, size=8)
    assert scans == []
    own = tmp_path / "own"
    ShardDataset(fresh, size=8, cache_dir=own)  # an explicit cache dir is used on its own
    assert len(scans) == 3 and len(list(own.iterdir())) == 3


# ---- corrupt data -----------------------------------------------------------------------------

def test_corrupt_image_raises_oserror_and_is_skipped(tmp_path, caplog):
    truncated_jpeg = encoded(1)[:40]
    write_shards([("good", make_image(0), "fine", None), ("bad", truncated_jpeg, "broken", None)],
                 tmp_path)
    ds = ShardDataset(tmp_path, size=8)
    bad = by_key(ds)["bad"]
    with pytest.raises(OSError, match=r"bad\.jpg in shard .*00000\.tar"):
        ds[bad]
    skipping = SkipCorrupt(ds)
    with caplog.at_level(logging.WARNING):
        items = [skipping[i] for i in range(len(ds))]
    assert items[bad] is None and "bad.jpg" in caplog.text
    batch = collate_skip(items)
    assert batch["skipped"] == 1 and batch["caption"] == ["fine"] and batch["x"].shape == (1, 3, 8, 8)


def test_shard_truncated_after_indexing_raises_oserror(fresh):
    ds = ShardDataset(fresh, size=8)
    last = len(ds) - 1
    shard, key = ds.location(last)
    with open(shard, "r+b") as f:
        f.truncate(int(ds._image[last, 0]) + 3)
    with pytest.raises(OSError, match=f"{key}.*{Path(shard).name}"):
        ds[last]


# ---- processes and ranks ----------------------------------------------------------------------

def assert_items_equal(a: dict, b: dict) -> None:
    assert torch.equal(a["x"], b["x"]) and a["caption"] == b["caption"]


def test_pickles_without_open_files(shard_dir):
    ds = ShardDataset(shard_dir, size=8)
    first = [ds[i] for i in range(len(ds))]  # opens the shard files
    assert len(ds._handles) == 3
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    copy = pickle.loads(blob)
    assert len(copy._handles) == 0 and copy.stats == ds.stats
    for i in reversed(range(len(ds))):
        assert_items_equal(copy[i], first[i])


def test_loader_with_two_workers_matches_direct_indexing(shard_dir):
    ds = ShardDataset(shard_dir, size=8)
    ds[0]  # handles open in the parent before the workers fork
    sampler = ResumableBatchSampler(len(ds), batch_size=3, seed=4)
    order = [list(b) for b in itertools.islice(iter(ResumableBatchSampler(len(ds), 3, seed=4)), 7)]
    loader = make_loader(ds, sampler, num_workers=2)
    for indices, batch in zip(order, itertools.islice(iter(loader), 7)):
        assert batch["skipped"] == 0
        assert torch.equal(batch["x"], torch.stack([ds[i]["x"] for i in indices]))
        assert batch["caption"] == [ds[i]["caption"] for i in indices]


def test_two_ranks_split_the_kept_samples_disjointly(shard_dir):
    ds = ShardDataset(shard_dir, size=8, min_size=12)
    per_rank = []
    for rank in range(2):
        sampler = ResumableBatchSampler(len(ds), batch_size=2, seed=9, rank=rank, world_size=2)
        batches = list(itertools.islice(iter(sampler), sampler.batches_per_epoch))
        per_rank.append({ds.location(i)[1] for b in batches for i in b})
    assert not per_rank[0] & per_rank[1]
    covered = 2 * 2 * (len(ds) // 4)
    assert len(per_rank[0]) == len(per_rank[1]) == covered // 2
    assert per_rank[0] | per_rank[1] <= set(by_key(ds))


# ---- writing ----------------------------------------------------------------------------------

def test_write_shards_layout_and_determinism(shard_dir, tmp_path):
    with tarfile.open(shard_dir / "00000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["000000.png", "000000.txt", "000000.json"] and "000001.jpg" in names
    assert "000003.txt" not in names  # a None caption leaves the member out
    again = write_shards((sample(i) for i in range(N)), tmp_path, per_shard=7)
    assert [sha256_file(p) for p in again] == [sha256_file(shard_dir / p.name) for p in again]


def test_write_shards_rejects_bad_input(tmp_path):
    image = Image.new("RGB", (4, 4))
    for samples, message in [([("a.b", image, "c", None)], "has a '.'"),
                             ([("a", image, "c", None), ("a", image, "c", None)], "repeated"),
                             ([("a", b"not an image", "c", None)], "not PNG, JPEG"),
                             ([], "no samples")]:
        with pytest.raises(ValueError, match=message):
            write_shards(samples, tmp_path)
    with pytest.raises(TypeError, match="PIL image, bytes or None"):
        write_shards([("a", np.zeros((4, 4)), "c", None)], tmp_path)
    with pytest.raises(ValueError, match="per_shard"):
        write_shards([("a", image, "c", None)], tmp_path, per_shard=0)
    with pytest.raises(ValueError, match="image_format"):
        write_shards([("a", image, "c", None)], tmp_path, image_format="gif")


def test_webp_and_jpeg_formats_round_trip(tmp_path):
    image = Image.new("RGB", (6, 4), (200, 10, 10))
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", lossless=True)
    write_shards([("a", image, "x", None), ("b", buffer.getvalue(), "y", None)], tmp_path / "w",
                 image_format="webp")
    write_shards([("c", image.convert("RGBA"), "z", None)], tmp_path / "j", image_format="jpg")
    with tarfile.open(tmp_path / "w/00000.tar") as tar:
        assert [n for n in tar.getnames() if not n.endswith(".txt")] == ["a.webp", "b.webp"]
    ds = ShardDataset(tmp_path / "w", size=4)
    assert torch.equal(ds[1]["x"], center_crop_tensor(image, 4))  # lossless bytes as stored
    assert ShardDataset(tmp_path / "j", size=4).location(0) == (str(tmp_path / "j/00000.tar"), "c")
