"""Video data: generated clips of one bouncing disk (`moving_shapes`, the video analogue of the
circles toy) and a folder of real clips (video files or folders of frame images).

    p = moving_shapes_params(n, frames=8, size=16, seed=0)   # the true start, velocity, radius
    x = p.render()                                           # [n x 1 x F x size x size] in [-1, 1]
    x = moving_shapes(n, frames=8, size=16, seed=0)          # the same clips
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import read_file

from .folder import decode_image, resize_center_crop, to_channels

__all__ = ["MovingShapesParams", "moving_shapes_params", "moving_shapes", "reflect",
           "heading_vectors", "MovingShapesDataset", "VideoFolderDataset", "VIDEO_EXTENSIONS",
           "FRAME_EXTENSIONS", "NUM_HEADINGS"]

log = logging.getLogger(__name__)

NUM_HEADINGS = 8
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
SAMPLINGS = ("even", "first")
_RENDER_CHUNK = 256  # clips rasterised at once: bounds the float32 distance block


def heading_vectors() -> Tensor:
    """(8, 2) float64 unit vectors (x, y) of the compass headings, in pixel coordinates (x =
    column, y = row, pointing down): heading k is k * 45 degrees counter-clockwise on screen
    from east, so 0 = E, 1 = NE, 2 = N, 3 = NW, 4 = W, 5 = SW, 6 = S, 7 = SE."""
    angle = torch.arange(NUM_HEADINGS, dtype=torch.float64) * (math.pi / 4)
    v = torch.stack([torch.cos(angle), -torch.sin(angle)], 1)
    return torch.where(v.abs() < 1e-12, torch.zeros_like(v), v)  # exact 0 for the axes


def reflect(u: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """Fold unbounded coordinates `u` into [lo, hi] by elastic reflection at both walls (a
    triangle wave of period 2 (hi - lo)): the position of a point moving along u that bounces
    off the walls. Broadcasts; needs hi > lo."""
    span = hi - lo
    s = torch.remainder(u - lo, 2 * span)
    return lo + torch.minimum(s, 2 * span - s)


@dataclass(frozen=True)
class MovingShapesParams:
    """The true parameters of `n` moving-shapes clips, each (n,) float64 unless said otherwise:
    start centre (cx, cy) in pixels (x = column, y = row), velocity (vx, vy) in pixels per frame
    before any bounce, radius r, and heading (n,) int64 in 0..7 (see `heading_vectors`), with
    speed = |v|. The centre at frame t is reflect(c + v t) into [r, size - 1 - r] per axis."""

    cx: Tensor
    cy: Tensor
    vx: Tensor
    vy: Tensor
    radius: Tensor
    heading: Tensor
    speed: Tensor
    frames: int
    size: int

    def __len__(self) -> int:
        return self.cx.shape[0]

    def centres(self) -> Tensor:
        """(n, frames, 2) float64 centre (x, y) of every frame, bounces included."""
        t = torch.arange(self.frames, dtype=torch.float64)
        lo, hi = self.radius[:, None], self.size - 1 - self.radius[:, None]
        x = reflect(self.cx[:, None] + self.vx[:, None] * t, lo, hi)
        y = reflect(self.cy[:, None] + self.vy[:, None] * t, lo, hi)
        return torch.stack([x, y], -1)

    def render(self) -> Tensor:
        """The clips [n x 1 x frames x size x size] float32 in [-1, 1] (disk 1, background -1)."""
        return self.render_masks().float().mul_(2).sub_(1)[:, None]

    def render_masks(self) -> Tensor:
        """(n, frames, size, size) bool: pixels within distance r of the frame's centre, the
        rasterisation rule of `circles`."""
        centres = self.centres().float()
        r2 = (self.radius.float() ** 2)[:, None, None, None]
        coords = torch.arange(self.size, dtype=torch.float32)
        out = torch.empty(len(self), self.frames, self.size, self.size, dtype=torch.bool)
        for i in range(0, len(self), _RENDER_CHUNK):
            part = slice(i, i + _RENDER_CHUNK)
            dx2 = (coords - centres[part, :, 0, None]) ** 2  # (m, F, W)
            dy2 = (coords - centres[part, :, 1, None]) ** 2  # (m, F, H)
            out[part] = dy2[..., :, None] + dx2[..., None, :] <= r2[part]
        return out


def moving_shapes_params(n: int, frames: int = 8, size: int = 16, seed: int = 0, *,
                         min_radius: float | None = None, max_radius: float | None = None,
                         min_speed: float = 0.5, max_speed: float | None = None
                         ) -> MovingShapesParams:
    """Draw the parameters of `n` clips, deterministic in `seed`.

    Radius uniform in [min_radius, max_radius] (default size/5 .. size/4, where the disk
    detector of `metrics.circles` accepts every frame at 16x16 and above), heading uniform over
    the 8 compass directions, speed uniform in [min_speed, max_speed] pixels per frame (default
    0.5 .. size/8; never 0, so every clip moves). The start centre is uniform over the positions
    whose first step hits no wall, so the heading of the first step is the label exactly.
    """
    if n < 1 or frames < 2 or size < 8:
        raise ValueError(f"need n >= 1, frames >= 2 and size >= 8, got n={n}, frames={frames}, "
                         f"size={size}")
    r_lo = size / 5 if min_radius is None else min_radius
    r_hi = size / 4 if max_radius is None else max_radius
    if not 1 <= r_lo <= r_hi < (size - 1) / 2:
        raise ValueError(f"need 1 <= min_radius <= max_radius < (size - 1)/2 = {(size - 1) / 2},"
                         f" got {r_lo}, {r_hi}")
    s_hi = size / 8 if max_speed is None else max_speed
    room = size - 1 - 2 * r_hi  # how far the largest disk can travel between the walls
    if not 0 < min_speed <= s_hi < room:
        raise ValueError(f"need 0 < min_speed <= max_speed < size - 1 - 2 max_radius = {room} "
                         f"(a first step free of bounces), got {min_speed}, {s_hi}")
    g = torch.Generator().manual_seed(seed)
    r = r_lo + (r_hi - r_lo) * torch.rand(n, generator=g, dtype=torch.float64)
    heading = torch.randint(NUM_HEADINGS, (n,), generator=g)
    speed = min_speed + (s_hi - min_speed) * torch.rand(n, generator=g, dtype=torch.float64)
    v = heading_vectors()[heading] * speed[:, None]
    lo = r[:, None] + (-v).clamp_min(0)  # the first step stays inside [r, size - 1 - r]
    hi = size - 1 - r[:, None] - v.clamp_min(0)
    c = lo + (hi - lo) * torch.rand(n, 2, generator=g, dtype=torch.float64)
    return MovingShapesParams(cx=c[:, 0], cy=c[:, 1], vx=v[:, 0], vy=v[:, 1], radius=r,
                              heading=heading, speed=speed, frames=frames, size=size)


def moving_shapes(n: int, frames: int = 8, size: int = 16, seed: int = 0, **ranges: float | None
                  ) -> Tensor:
    """Clips [n x 1 x frames x size x size] float32 in [-1, 1]: one solid disk (1 on -1) of
    constant radius moving at constant velocity and bouncing elastically off the walls (its
    centre is reflected inside [r, size - 1 - r], so it stays fully inside every frame).
    Deterministic in `seed`; `ranges` and the true parameters: see `moving_shapes_params`."""
    return moving_shapes_params(n, frames, size, seed, **ranges).render()


class MovingShapesDataset(Dataset):
    """`moving_shapes(num_items, frames, size, seed)` as a map-style dataset: items
    {"x": (1, frames, size, size)}, plus "label" (int64 scalar heading 0..7 of the first step)
    when `conditional`.

    Generated once up front and stored as bool masks (4096 clips of 8 x 32 x 32 are 32 MiB), so
    an item depends on the seed only, never on the order or the process that reads it.
    """

    num_classes = NUM_HEADINGS

    def __init__(self, num_items: int = 4096, frames: int = 8, size: int = 16, seed: int = 0,
                 conditional: bool = False):
        self.params = moving_shapes_params(num_items, frames, size, seed)
        self.masks = self.params.render_masks()
        self.labels = self.params.heading
        self.conditional = conditional

    def __len__(self) -> int:
        return self.masks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        x = self.masks[index].float().mul_(2).sub_(1)[None]
        if self.conditional:
            return {"x": x, "label": self.labels[index]}
        return {"x": x}


def _natural_key(name: str) -> list[int | str]:
    """Sort key putting "frame2.png" before "frame10.png"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _video_backend() -> str:
    """"torchcodec" when it loads, else "torchvision" (its deprecated `read_video`, which needs
    PyAV); RuntimeError (one line) when neither does."""
    broken = []
    for backend, modules in (("torchcodec", ("torchcodec.decoders",)),
                             ("torchvision", ("torchvision.io", "av"))):
        try:
            for module in modules:
                importlib.import_module(module)
        except ImportError:
            continue
        except Exception as e:  # installed but unusable, e.g. torchcodec without FFmpeg libraries
            broken.append(f"{backend} is installed but fails to load: {' '.join(str(e).split())}")
            continue
        return backend
    raise RuntimeError("; ".join(["decoding video files needs torchcodec, or torchvision with "
                                  "PyAV: pip install torchcodec (or store each clip as a folder "
                                  "of PNG/JPG frames)", *broken]))


def _decode_video(backend: str, file: Path, frames: int, sampling: str) -> Tensor:
    """The frames of a video file that `_frame_indices` picks: uint8 [F x C x H x W]."""
    if backend == "torchcodec":
        from torchcodec.decoders import VideoDecoder

        decoder = VideoDecoder(str(file))
        idx = _frame_indices(len(decoder), frames, sampling, file)
        return torch.stack([decoder[i] for i in idx])
    from torchvision.io import read_video

    video, _, _ = read_video(str(file), pts_unit="sec", output_format="TCHW")
    idx = _frame_indices(video.shape[0], frames, sampling, file)
    return video[idx]


class _ClipTooShort(ValueError):
    pass


def _frame_indices(total: int, frames: int, sampling: str, clip: Path) -> list[int]:
    """Which of a clip's `total` frames to take: `frames` evenly spaced from the first to the
    last ("even"), or the first `frames` ("first"). ValueError naming the clip when it is too
    short."""
    if total < frames:
        raise _ClipTooShort(f"clip {clip} has {total} frames, fewer than the {frames} needed")
    if sampling == "first":
        return list(range(frames))
    if frames == 1:
        return [0]
    return [round(i * (total - 1) / (frames - 1)) for i in range(frames)]


class VideoFolderDataset(Dataset):
    """Every clip under `path`, sorted by relative path: a video file (.mp4 .avi .mov .mkv
    .webm, decoded with torchcodec, else torchvision.io), or a subfolder holding a clip's frames
    as PNG/JPG images (in natural order: frame2 before frame10; images directly in `path` are no
    clip). Items {"x": (channels, frames, size, size) float32 in [-1, 1]}.

    `sampling` "even" takes `frames` frames evenly spaced from the first to the last, "first"
    the first `frames` consecutive ones. Each frame is resized so its shorter side is `size` and
    center-cropped (as `ImageFolderDataset` does), gray (channels=1) or RGB (channels=3).

    A clip with fewer frames than needed raises ValueError, an unreadable one OSError, both from
    __getitem__ and naming the clip; wrap the dataset in `SkipCorrupt` to skip them. A folder
    with video files but no decoder installed raises RuntimeError at construction.
    """

    def __init__(self, path: str | Path, frames: int = 8, size: int = 32, channels: int = 3,
                 sampling: str = "even"):
        if not str(path):
            raise ValueError("video_folder: no folder given (set data.path)")
        if channels not in (1, 3):
            raise ValueError(f"video_folder: channels must be 1 or 3, got {channels}")
        if size < 1 or frames < 1:
            raise ValueError(f"video_folder: size and frames must be >= 1, got {size}, {frames}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"video_folder: sampling must be one of {', '.join(SAMPLINGS)}, "
                             f"got {sampling!r}")
        root = Path(path).expanduser()
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "not found"
            raise FileNotFoundError(f"video folder {what}: {root}")
        self.root, self.frames, self.size, self.channels = root, frames, size, channels
        self.sampling = sampling
        clips = []
        for p in root.rglob("*"):
            if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
                clips.append(p.relative_to(root).as_posix())
            elif p.is_dir() and any(_is_frame(f) for f in p.iterdir()):
                clips.append(p.relative_to(root).as_posix())
        loose = sum(_is_frame(f) for f in root.iterdir())
        if loose:
            log.warning("%s: %d frame images lie directly in the folder and belong to no clip; "
                        "put each clip's frames in a subfolder of its own", root, loose)
        self.clips = sorted(clips)
        if not self.clips:
            raise ValueError(f"no clips found under {root}: expected video files "
                             f"({', '.join(e[1:] for e in VIDEO_EXTENSIONS)}) or subfolders of "
                             f"frame images ({', '.join(e[1:] for e in FRAME_EXTENSIONS)})")
        # A name, not the decoder: the dataset pickles to DataLoader workers. Checked here so a
        # missing decoder fails once, not once per item in the loader.
        self.backend: str | None = None
        if any(Path(c).suffix.lower() in VIDEO_EXTENSIONS for c in self.clips):
            self.backend = _video_backend()

    def __len__(self) -> int:
        return len(self.clips)

    def _frame_images(self, clip: Path) -> Tensor:
        """The picked frame images of a clip folder: uint8 [F x channels x H x W]."""
        files = sorted((f for f in clip.iterdir() if _is_frame(f)),
                       key=lambda f: _natural_key(f.name))
        idx = _frame_indices(len(files), self.frames, self.sampling, clip)
        images = []
        for i in idx:
            try:
                images.append(decode_image(read_file(str(files[i])), self.channels))
            except Exception as e:
                raise OSError(f"{files[i].name}: {e}") from e
        sizes = sorted({tuple(im.shape[1:]) for im in images})
        if len(sizes) > 1:
            raise ValueError(f"frames of different sizes (H, W): {sizes}")
        return torch.stack(images)

    def load(self, index: int) -> Tensor:
        """The clip at `index` as (channels, frames, size, size) float32 in [-1, 1]."""
        clip = self.root / self.clips[index]
        try:
            if clip.is_dir():
                images = self._frame_images(clip)
            else:
                images = to_channels(_decode_video(self.backend or _video_backend(), clip,
                                                   self.frames, self.sampling), self.channels)
            x = resize_center_crop(images, self.size)  # the whole clip in one call
        except _ClipTooShort:
            raise
        except Exception as e:  # whatever the decoder raises, the message names the clip
            raise OSError(f"cannot read clip {clip}: {e}") from e
        return x.transpose(0, 1).contiguous()

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.load(index)}


def _is_frame(p: Path) -> bool:
    return p.suffix.lower() in FRAME_EXTENSIONS and p.is_file()
