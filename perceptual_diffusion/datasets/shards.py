"""Image-text pairs in webdataset-format tar shards (the LAION / img2dataset layout), read as a
map-style dataset so that `ResumableBatchSampler` resumes exactly and splits the samples across
processes and nodes, and DataLoader workers read in parallel.

A shard is a plain (uncompressed) tar whose members are grouped by key, the member name up to
the first dot of its base name: 000123.jpg + 000123.txt + 000123.json is one sample with the
extensions "jpg", "txt" and "json". Each shard is indexed once (key -> offset and size of every
member, plus the image size and aesthetic score read from the JSON); the index is cached as JSON
beside the shard, and items are then read by seeking straight to the member's data.

    write_shards(samples, "shards/", per_shard=1000)       # (key, image, caption, meta) tuples
    ds = ShardDataset("shards/{00000..00099}.tar", size=512, min_size=512, min_aesthetic=6.0)
    ds.stats    # {"shards", "samples", "kept", "dropped_size", "dropped_aesthetic", ...}
    ds[0]       # {"x": [3 x 512 x 512] in [-1, 1], "caption": str}
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from glob import glob
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..fileio import atomic_write
from .folder import decode_image, resize_center_crop

__all__ = ["ShardDataset", "write_shards", "expand_braces", "resolve_shards", "center_crop_tensor",
           "IMAGE_KEYS", "INDEX_SUFFIX"]

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".idx.json"
_INDEX_VERSION = 1
# Metadata fields, first match wins. The filter is on the source resolution (the paper's > 512 px):
# img2dataset writes original_width/original_height (the source) and width/height (the stored,
# possibly resized image); LAION's parquet columns, copied into the JSON, are upper case.
_SIZE_FIELDS = (("original_width", "original_height"), ("WIDTH", "HEIGHT"), ("width", "height"))
_AESTHETIC_FIELDS = ("aesthetic", "AESTHETIC_SCORE")
_MAX_OPEN = 32          # open shard files per process (LRU): stays far below the fd limit
_INDEX_THREADS = 8      # shards indexed at once: hides the latency of network filesystems
_KEY_EXT = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]+)$")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))  # + RIFF....WEBP

PathLike = str | os.PathLike
Sample = tuple[str, Image.Image | bytes | None, str | None, dict[str, Any] | None]


# ---- naming the shards ------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: "{00000..00002}.tar" -> 00000.tar,
    00001.tar, 00002.tar (zero-padded to the longer end when either end has a leading zero;
    a descending range counts down), "{a,b}" -> a, b; several groups give their product.
    Nested or unbalanced braces raise ValueError."""
    match = _BRACE.search(pattern)
    head = pattern if match is None else pattern[:match.start()]
    if "{" in head or "}" in head:
        raise ValueError(f"unbalanced or nested braces in shard pattern {pattern!r}")
    if match is None:
        return [pattern]
    body = match.group(1)
    if (r := _RANGE.match(body)) is not None:
        lo, hi = r.group(1), r.group(2)
        padded = any(len(end) > 1 and end.startswith("0") for end in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [f"{n:0{width}d}" for n in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"brace group {{{body}}} in {pattern!r} is neither a range {{A..B}} "
                         "of integers nor a list {a,b,...}")
    tails = expand_braces(pattern[match.end():])
    return [head + choice + tail for choice in choices for tail in tails]


def resolve_shards(urls: PathLike | Sequence[PathLike]) -> list[Path]:
    """The shard files `urls` names: a brace pattern ("/data/{00000..00099}.tar"; every shard
    must exist), a glob ("/data/*.tar", sorted), a folder (all its *.tar, sorted), one file, or a
    list of files. Nothing found, or a named shard missing, raises FileNotFoundError."""
    if isinstance(urls, (str, os.PathLike)):
        text = os.fspath(urls)
        if not text:
            raise FileNotFoundError("no shards given (data.path / urls is empty)")
        if "{" in text or "}" in text:
            paths = [Path(name).expanduser() for name in expand_braces(text)]
        elif any(c in text for c in "*?["):
            paths = sorted(Path(name) for name in glob(os.path.expanduser(text))
                           if os.path.isfile(name))
        elif (root := Path(text).expanduser()).is_dir():
            paths = sorted(p for p in root.glob("*.tar") if p.is_file())
        else:
            paths = [root]
    else:
        if not all(isinstance(u, (str, os.PathLike)) for u in urls):
            raise TypeError(f"shard urls must be a path, a pattern or a list of paths, got {urls!r}")
        text = f"the list of {len(urls)} shards"
        paths = [Path(u).expanduser() for u in urls]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or len(missing) == len(paths):
        raise FileNotFoundError(f"no tar shards found for {text}")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} shards of {text} are missing: "
                                f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    return paths


# ---- indexing ---------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    """A finite JSON number as float, else None (missing, null, bool, string, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _filter_fields(meta: Any) -> dict[str, float | None]:
    """width, height and aesthetic of one sample's JSON metadata (None where absent)."""
    out: dict[str, float | None] = {"width": None, "height": None, "aesthetic": None}
    if not isinstance(meta, dict):
        return out
    for w, h in _SIZE_FIELDS:
        width, height = _number(meta.get(w)), _number(meta.get(h))
        if width is not None and height is not None:
            out["width"], out["height"] = width, height
            break
    for field in _AESTHETIC_FIELDS:
        if (score := _number(meta.get(field))) is not None:
            out["aesthetic"] = score
            break
    return out


def _scan_shard(path: Path) -> list[dict[str, Any]]:
    """Read the tar headers of `path` (and each sample's .json): one entry per key, in order of
    first appearance, {"key", "members": {ext: [offset_data, size]}, "width", "height",
    "aesthetic"}."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                named = _KEY_EXT.match(member.name)
                if not member.isfile() or named is None:
                    continue
                key, ext = named.group(1), named.group(2).lower()
                sample = samples.setdefault(key, {"key": key, "members": {}})
                if ext in sample["members"]:
                    log.warning("%s: member %s appears twice; the last one is used", path, member.name)
                sample["members"][ext] = [member.offset_data, member.size]
                if ext == "json":
                    try:
                        meta = json.loads(tar.extractfile(member).read())
                    except ValueError:
                        meta = None  # unreadable metadata: the filters see missing fields
                    sample.update(_filter_fields(meta))
    except tarfile.TarError as e:
        raise OSError(f"cannot index shard {path} (it must be an uncompressed tar): {e}") from e
    for sample in samples.values():
        for field in ("width", "height", "aesthetic"):
            sample.setdefault(field, None)
    return list(samples.values())


def default_cache_dir() -> Path:
    """Where indexes go when a shard's folder is read-only: $XDG_CACHE_HOME (or ~/.cache)
    /perceptual-diffusion/shard-index."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return root / "perceptual-diffusion" / "shard-index"


def _index_locations(shard: Path, cache_dir: Path | None) -> list[Path]:
    """Where the index of `shard` may live, in order of preference."""
    digest = hashlib.sha256(str(shard.resolve()).encode()).hexdigest()[:16]
    cached = f"{digest}-{shard.name}{INDEX_SUFFIX}"
    if cache_dir is not None:
        return [cache_dir / cached]
    return [shard.with_name(shard.name + INDEX_SUFFIX), default_cache_dir() / cached]


def _load_index(shard: Path, cache_dir: Path | None) -> tuple[list[dict[str, Any]], bool]:
    """The samples of `shard` from a valid cached index (its size and mtime match the shard's),
    else scanned and cached; and whether the cache was used."""
    stat = shard.stat()
    stamp = {"version": _INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    locations = _index_locations(shard, cache_dir)
    for location in locations:
        try:
            index = json.loads(location.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(index, dict) and all(index.get(k) == v for k, v in stamp.items()):
            return index["samples"], True
    samples = _scan_shard(shard)
    text = json.dumps({**stamp, "shard": shard.name, "samples": samples}, separators=(",", ":"))
    for location in locations:
        try:
            location.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(location, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            break
        except OSError as e:  # a read-only shard folder: try the next place
            log.debug("cannot write shard index %s: %s", location, e)
    else:
        log.warning("could not cache the index of %s anywhere (%s); it is rebuilt on every run",
                    shard, ", ".join(str(p) for p in locations))
    return samples, False


# ---- decoding ---------------------------------------------------------------------------------

def center_crop_tensor(im: Image.Image, size: int) -> Tensor:
    """An "L" or "RGB" image resized (bicubic, antialiased) so its shorter side is `size`,
    center-cropped to size x size: [C x size x size] float32 in [-1, 1], C = 1 ("L") or 3
    ("RGB").

    `resize_center_crop`, the transform of `ImageFolderDataset.load` and `ShardDataset.load`,
    applied to a decoded PIL image."""
    if im.mode not in ("L", "RGB"):
        raise ValueError(f"center_crop_tensor: image mode must be 'L' or 'RGB', got {im.mode!r}")
    pixels = torch.from_numpy(np.array(im)).reshape(im.height, im.width, -1).permute(2, 0, 1)
    return resize_center_crop(pixels, size)


# ---- the dataset ------------------------------------------------------------------------------

def _extensions(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value \
            or not all(isinstance(v, str) and v.strip(".") for v in value):
        raise TypeError(f"shards: {field} must be a non-empty list of extensions such as "
                        f"['jpg', 'png'], got {value!r}")
    return tuple(v.strip(".").lower() for v in value)


class ShardDataset(Dataset):
    """The image-caption samples of webdataset tar shards (see the module docstring), filtered
    by their JSON metadata, as a map-style dataset: items {"x": [channels x size x size] float32
    in [-1, 1] (shorter side resized to `size`, center-cropped), "caption": str}.

    Filters (the paper: LAION images over 512 px with aesthetic score above 6), applied once
    when indexing; both thresholds are inclusive:
      min_size       both sides >= min_size, from "width"/"height" (else "original_width"/
                     "original_height", else "WIDTH"/"HEIGHT"); 0 turns it off
      min_aesthetic  score >= min_aesthetic, from "aesthetic" (else "AESTHETIC_SCORE"); None
                     turns it off
    A sample lacking the metadata an active filter needs is dropped by that filter. A sample
    with no image member (the first of `image_keys` present is used) or, unless
    `empty_captions`, no `caption_key` member is dropped as incomplete. `stats` counts each
    dropped sample once, under the first reason in the order incomplete, size, aesthetic.

    empty_captions=True gives every item caption "" (the unconditional model of section 5.7).
    Captions are stripped of surrounding whitespace. A corrupt image or caption raises OSError
    naming shard and key from __getitem__; wrap the dataset in `SkipCorrupt` to skip them.

    The index is cached as `<shard>.idx.json` beside each shard (in `cache_dir` when given, or
    in `default_cache_dir()` when the shard's folder is read-only) and rebuilt when the shard's
    size or mtime changes. The kept samples are held in numpy arrays, so the dataset pickles
    small and forked workers share it without copy-on-write growth; shard files are opened
    lazily in each process, never pickled.
    """

    def __init__(self, urls: PathLike | Sequence[PathLike], size: int = 512, channels: int = 3,
                 min_size: int = 0, min_aesthetic: float | None = None, caption_key: str = "txt",
                 image_keys: Sequence[str] = IMAGE_KEYS, cache_dir: PathLike | None = None,
                 empty_captions: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"shards: channels must be 1 or 3, got {channels}")
        for field, value, least in (("size", size, 1), ("min_size", min_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"shards: {field} must be an integer, got {value!r}")
            if value < least:
                raise ValueError(f"shards: {field} must be >= {least}, got {value}")
        if min_aesthetic is not None and _number(min_aesthetic) is None:
            raise TypeError(f"shards: min_aesthetic must be a number or None (no filter), "
                            f"got {min_aesthetic!r}")
        self.image_keys = _extensions(image_keys, "image_keys")
        if not isinstance(caption_key, str) or not caption_key.strip("."):
            raise TypeError(f"shards: caption_key must be an extension such as 'txt', "
                            f"got {caption_key!r}")
        self.caption_key = caption_key.strip(".").lower()
        if self.caption_key in self.image_keys:
            raise ValueError(f"shards: caption_key {caption_key!r} is also one of the image_keys")
        self.size, self.channels, self.empty_captions = size, channels, empty_captions
        self.min_size, self.min_aesthetic = min_size, min_aesthetic
        paths = resolve_shards(urls)
        self.shards = [str(p) for p in paths]
        cache = None if cache_dir is None else Path(cache_dir).expanduser()
        with ThreadPoolExecutor(min(_INDEX_THREADS, len(paths))) as pool:
            indexes = list(pool.map(lambda p: _load_index(p, cache), paths))
        self._select(indexes)
        cached = sum(hit for _, hit in indexes)
        log.info("shards: %s (%d indexes from cache, %d built)",
                 " ".join(f"{k}={v}" for k, v in self._stats.items()), cached, len(paths) - cached)
        if not len(self):
            raise ValueError(f"shards: no sample of {len(paths)} shards passes the filters "
                             f"(min_size={min_size}, min_aesthetic={min_aesthetic}): {self._stats}")
        self._handles: OrderedDict[int, BinaryIO] = OrderedDict()
        self._pid = os.getpid()

    def _select(self, indexes: list[tuple[list[dict[str, Any]], bool]]) -> None:
        """Apply the filters; keep the survivors' locations in flat arrays."""
        stats = dict.fromkeys(("samples", "kept", "dropped_size", "dropped_aesthetic",
                               "dropped_incomplete"), 0)
        shard_ids, images, captions, keys, exts = [], [], [], [], []
        for shard_id, (samples, _) in enumerate(indexes):
            for s in samples:
                stats["samples"] += 1
                members = s["members"]
                ext = next((e for e in self.image_keys if e in members), None)
                caption = members.get(self.caption_key)
                if ext is None or (caption is None and not self.empty_captions):
                    stats["dropped_incomplete"] += 1
                elif self.min_size and (s["width"] is None or s["height"] is None
                                        or min(s["width"], s["height"]) < self.min_size):
                    stats["dropped_size"] += 1
                elif self.min_aesthetic is not None and (s["aesthetic"] is None
                                                         or s["aesthetic"] < self.min_aesthetic):
                    stats["dropped_aesthetic"] += 1
                else:
                    stats["kept"] += 1
                    shard_ids.append(shard_id)
                    images.append(members[ext])
                    captions.append([-1, 0] if caption is None else caption)
                    keys.append(s["key"])
                    exts.append(ext)
        self._stats = {"shards": len(indexes), **stats}
        self._shard = np.asarray(shard_ids, dtype=np.int32)
        self._image = np.asarray(images, dtype=np.int64).reshape(-1, 2)      # offset, size
        self._caption = np.asarray(captions, dtype=np.int64).reshape(-1, 2)  # offset -1: none
        self._key = np.asarray(keys, dtype=str)
        self._ext = np.asarray(exts, dtype=str)

    @property
    def stats(self) -> dict[str, int]:
        """{"shards", "samples", "kept", "dropped_size", "dropped_aesthetic",
        "dropped_incomplete"}; samples = kept + the three dropped counts."""
        return dict(self._stats)

    def __len__(self) -> int:
        return len(self._shard)

    def location(self, index: int) -> tuple[str, str]:
        """(shard path, key) of item `index`."""
        return self.shards[self._shard[index]], str(self._key[index])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # file objects stay in the process that opened them
        return state

    def __del__(self) -> None:
        for f in getattr(self, "_handles", {}).values():
            f.close()

    def _read(self, shard_id: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # forked into a worker: its inherited files share offsets
            self._handles, self._pid = OrderedDict(), os.getpid()
        f = self._handles.get(shard_id)
        if f is None:
            f = self._handles[shard_id] = open(self.shards[shard_id], "rb")
            if len(self._handles) > _MAX_OPEN:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(shard_id)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"shard {self.shards[shard_id]} is shorter than its index says "
                          f"(rebuild it by touching the shard)")
        return data

    def load(self, index: int) -> Tensor:
        """The image of item `index`: [channels x size x size] float32 in [-1, 1]."""
        shard_id, (offset, size) = int(self._shard[index]), self._image[index].tolist()
        name = f"{self._key[index]}.{self._ext[index]}"
        try:
            image = decode_image(self._read(shard_id, offset, size), self.channels)
        except Exception as e:
            raise OSError(f"cannot read image {name} in shard {self.shards[shard_id]}: {e}") from e
        return resize_center_crop(image, self.size)

    def caption(self, index: int) -> str:
        """The caption of item `index` ("" with empty_captions)."""
        if self.empty_captions:
            return ""
        offset, size = self._caption[index].tolist()
        shard_id = int(self._shard[index])
        try:
            return self._read(shard_id, offset, size).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise OSError(f"cannot read caption {self._key[index]}.{self.caption_key} in shard "
                          f"{self.shards[shard_id]}: {e}") from e

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        return {"x": self.load(index), "caption": self.caption(index)}


# ---- writing shards ---------------------------------------------------------------------------

def _image_bytes(key: str, image: Image.Image | bytes, image_format: str) -> tuple[bytes, str]:
    """Encoded image and its extension: bytes are stored as they are (their format read from
    their magic number), a PIL image is encoded as `image_format`."""
    if isinstance(image, (bytes, bytearray)):
        if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
            return bytes(image), "webp"
        for magic, ext in _MAGIC:
            if image.startswith(magic):
                return bytes(image), ext
        raise ValueError(f"write_shards: image bytes of {key!r} are not PNG, JPEG or WEBP")
    if not isinstance(image, Image.Image):
        raise TypeError(f"write_shards: image of {key!r} must be a PIL image, bytes or None, "
                        f"got {type(image).__name__}")
    if image_format == "jpg" and image.mode not in ("L", "RGB", "CMYK"):
        image = image.convert("RGB")  # JPEG has no alpha or palette
    buffer = io.BytesIO()
    image.save(buffer, format=_FORMATS[image_format])
    return buffer.getvalue(), image_format


def _write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: same samples, same bytes
            tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[Sample], out_dir: PathLike, per_shard: int = 1000,
                 image_format: str = "png") -> list[Path]:
    """Write (key, image, caption, meta) samples as webdataset tar shards 00000.tar, 00001.tar,
    ... of `per_shard` samples each into `out_dir`; returns their paths.

    image: a PIL image (encoded as `image_format`: "png", "jpg" or "webp") or encoded bytes
    (stored as they are); caption: str, stored as <key>.txt; meta: a dict stored as <key>.json
    (put "width", "height" and "aesthetic" there for the filters of `ShardDataset`). None leaves
    that member out. Keys must be unique and have no "." in their last path part. Each shard is
    written atomically, and the same samples give byte-identical shards."""
    if isinstance(per_shard, bool) or not isinstance(per_shard, int) or per_shard < 1:
        raise ValueError(f"write_shards: per_shard must be an integer >= 1, got {per_shard!r}")
    if image_format not in _FORMATS:
        raise ValueError(f"write_shards: image_format must be one of {', '.join(_FORMATS)}, "
                         f"got {image_format!r}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    paths: list[Path] = []
    it = iter(samples)
    while chunk := list(itertools.islice(it, per_shard)):
        members = []
        for key, image, caption, meta in chunk:
            if not isinstance(key, str) or "." in key.rsplit("/", 1)[-1] or not key \
                    or key.endswith("/") or key in seen:
                raise ValueError(f"write_shards: key {key!r} is empty, repeated or has a '.' in "
                                 "its last path part")
            seen.add(key)
            if image is not None:
                data, ext = _image_bytes(key, image, image_format)
                members.append((f"{key}.{ext}", data))
            if caption is not None:
                members.append((f"{key}.txt", caption.encode("utf-8")))
            if meta is not None:
                members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8")))

        path = out / f"{len(paths):05d}.tar"
        atomic_write(path, lambda tmp, members=members: _write_tar(tmp, members))
        paths.append(path)
    if not paths:
        raise ValueError("write_shards: no samples given")
    return paths
