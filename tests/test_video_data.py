"""Video data: the moving-shapes generator and dataset, the video folder dataset, the
moving-shapes metric, and the frame-strip / GIF pictures of clips."""

from __future__ import annotations

import importlib
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from perceptual_diffusion.datasets.folder import ImageFolderDataset, resize_center_crop
from perceptual_diffusion.datasets.loader import SkipCorrupt
from perceptual_diffusion.datasets.video import (MovingShapesDataset, MovingShapesParams,
                                                 VideoFolderDataset, heading_vectors,
                                                 moving_shapes, moving_shapes_params, reflect)
from perceptual_diffusion.images import save_frame_strip, save_gif
from perceptual_diffusion.metrics.circles import fit_disks
from perceptual_diffusion.metrics.moving_shapes import (fit_tracks, heading_of,
                                                        moving_shapes_metrics, param_features)

PROPERTY = settings(max_examples=25, deadline=None)
N, F, S = 240, 8, 16  # the metric tests' clips: default frames and size


@pytest.fixture(scope="module")
def real() -> MovingShapesParams:
    return moving_shapes_params(N, F, S, seed=3)


@pytest.fixture(scope="module")
def real_clips(real: MovingShapesParams) -> torch.Tensor:
    return real.render()


@pytest.fixture(scope="module")
def real_metrics(real: MovingShapesParams, real_clips: torch.Tensor) -> dict[str, float]:
    return moving_shapes_metrics(real_clips, labels=real.heading)


def disk_clip(centres: list[tuple[float, float]], r: float | list[float], size: int = S
              ) -> torch.Tensor:
    """[1 x 1 x F x size x size]: frame k a disk at centres[k] of radius r (or r[k])."""
    radii = r if isinstance(r, list) else [r] * len(centres)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    frames = [((xs - cx) ** 2 + (ys - cy) ** 2 <= rk * rk).float() * 2 - 1
              for (cx, cy), rk in zip(centres, radii, strict=True)]
    return torch.stack(frames)[None, None]


# ----------------------------------------------------------------------- generator


def test_heading_vectors_are_the_compass_on_screen():
    v = heading_vectors()
    assert torch.allclose(v.norm(dim=1), torch.ones(8, dtype=torch.float64))
    # y points down: north (2) is up the screen, south (6) down.
    assert v[0].tolist() == [1.0, 0.0] and v[2].tolist() == [0.0, -1.0]
    assert v[4].tolist() == [-1.0, 0.0] and v[6].tolist() == [0.0, 1.0]
    h = 1 / math.sqrt(2)
    assert torch.allclose(v[1], torch.tensor([h, -h], dtype=torch.float64))
    assert heading_of(v.numpy()).tolist() == list(range(8))


@PROPERTY
@given(u=st.floats(-100, 100), lo=st.floats(0, 10), span=st.floats(0.5, 20))
def test_reflect_folds_into_the_walls_periodically_and_symmetrically(u, lo, span):
    hi = lo + span
    t = torch.tensor([u], dtype=torch.float64)
    x = reflect(t, lo, hi)
    assert lo - 1e-9 <= float(x) <= hi + 1e-9
    assert torch.allclose(reflect(t + 2 * span, lo, hi), x, atol=1e-9)
    assert torch.allclose(reflect(2 * lo - t, lo, hi), x, atol=1e-9)  # mirror at a wall
    if lo <= u <= hi:
        assert float(x) == pytest.approx(u)


def test_moving_shapes_is_deterministic_and_binary():
    a = moving_shapes(16, frames=6, size=16, seed=7)
    assert a.shape == (16, 1, 6, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, moving_shapes(16, frames=6, size=16, seed=7))
    assert not torch.equal(a, moving_shapes(16, frames=6, size=16, seed=8))
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, moving_shapes_params(16, 6, 16, seed=7).render())


def test_every_frame_is_one_disk_of_constant_radius_at_the_true_centre(real, real_clips):
    valid, p = fit_disks(real_clips[:, 0].reshape(-1, S, S))
    assert valid.all()  # a disk in every frame, fully inside
    p = p.reshape(N, F, 4)
    true = real.centres().numpy()
    assert np.abs(p[..., :2] - true).max() < 0.35  # centroid of the rasterised disk
    assert np.abs(p[..., 2] - real.radius.numpy()[:, None]).max() < 0.35
    assert np.ptp(p[..., 2], axis=1).max() < 0.4  # the radius does not change within a clip


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(12, 40), frames=st.integers(2, 12))
def test_centres_bounce_elastically_between_the_walls(seed, size, frames):
    p = moving_shapes_params(6, frames, size, seed)
    c = p.centres().numpy()  # (n, F, 2)
    r = p.radius.numpy()[:, None, None]
    lo, hi = r, size - 1 - r
    assert (c >= lo - 1e-9).all() and (c <= hi + 1e-9).all()
    speed = np.abs(np.stack([p.vx, p.vy], -1))[:, None, :]  # (n, 1, 2) per axis
    step = np.diff(c, axis=1)
    # Each step either moves |v| along the axis, or hits one wall: its distances to that
    # wall before and after add up to |v| (elastic: the speed per axis never changes).
    straight = np.isclose(np.abs(step), speed, atol=1e-9)
    via_lo = np.isclose((c[:, :-1] - lo) + (c[:, 1:] - lo), speed, atol=1e-9)
    via_hi = np.isclose((hi - c[:, :-1]) + (hi - c[:, 1:]), speed, atol=1e-9)
    assert (straight | via_lo | via_hi).all()
    # The first step hits no wall, so it is the velocity and its heading the label.
    assert np.allclose(step[:, 0], np.stack([p.vx, p.vy], -1), atol=1e-9)
    assert np.array_equal(heading_of(step[:, 0]), p.heading.numpy())
    assert ((p.speed >= 0.5) & (p.speed <= size / 8)).all()


def test_labels_are_spread_over_the_eight_headings(real):
    counts = torch.bincount(real.heading, minlength=8)
    assert counts.shape == (8,) and counts.min() >= N / 8 / 2


@pytest.mark.parametrize("kwargs, field", [
    ({"n": 0}, "n >= 1"), ({"frames": 1}, "frames >= 2"), ({"size": 6}, "size >= 8"),
    ({"max_radius": 8.0}, "max_radius"), ({"min_radius": 0.5}, "min_radius"),
    ({"min_speed": 0.0}, "min_speed"), ({"max_speed": 9.0}, "max_speed"),
])
def test_moving_shapes_rejects_bad_arguments(kwargs, field):
    args = {"n": 2, "frames": 4, "size": 16} | kwargs
    with pytest.raises(ValueError, match=field):
        moving_shapes_params(args.pop("n"), args.pop("frames"), args.pop("size"), **args)


def test_moving_shapes_dataset_items():
    data = MovingShapesDataset(12, frames=5, size=16, seed=2, conditional=True)
    clips = moving_shapes(12, frames=5, size=16, seed=2)
    assert len(data) == 12 and MovingShapesDataset.num_classes == 8
    item = data[3]
    assert item["x"].shape == (1, 5, 16, 16) and item["x"].dtype == torch.float32
    assert torch.equal(item["x"], clips[3])
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert int(item["label"]) == int(moving_shapes_params(12, 5, 16, seed=2).heading[3])
    assert set(MovingShapesDataset(4, 5, 16, 2, conditional=False)[0]) == {"x"}


# --------------------------------------------------------------------- video folder


def write_frames(folder, values, size=(12, 10), mode="L"):
    """One PNG per value (constant frames), named f1.png, f2.png, ... (no zero padding)."""
    folder.mkdir(parents=True)
    for i, v in enumerate(values, 1):
        Image.new(mode, size, v if mode == "L" else (v, 255 - v, 0)).save(folder / f"f{i}.png")


def test_folder_of_frame_clips_samples_evenly_in_natural_order(tmp_path):
    write_frames(tmp_path / "b", [20 * k for k in range(12)])  # frame k has value 20 k
    write_frames(tmp_path / "a" / "nested", [0, 255, 0, 255])
    data = VideoFolderDataset(tmp_path, frames=4, size=8, channels=1)
    assert data.clips == ["a/nested", "b"] and len(data) == 2
    x = data[1]["x"]
    assert x.shape == (1, 4, 8, 8) and x.dtype == torch.float32
    # evenly spaced over 12 frames: 0, 4 (3.67), 7 (7.33), 11; natural order puts f10 after f9
    expected = torch.tensor([0, 4, 7, 11]) * 20 / 127.5 - 1
    assert torch.allclose(x[0, :, 4, 4], expected.float(), atol=1e-5)
    first = VideoFolderDataset(tmp_path, frames=3, size=8, channels=1, sampling="first")[1]["x"]
    assert torch.allclose(first[0, :, 0, 0], (torch.tensor([0, 20, 40]) / 127.5 - 1).float(),
                          atol=1e-5)
    assert torch.allclose(data[0]["x"][0, :, 3, 3], torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_folder_frames_are_resized_center_cropped_and_rgb(tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    for i in range(3):  # 30 x 10: a white middle third between black thirds
        a = np.zeros((10, 30, 3), dtype=np.uint8)
        a[:, 10:20] = (255, 128, 0)
        Image.fromarray(a).save(clip / f"{i:03d}.jpg", quality=100)
    x = VideoFolderDataset(tmp_path, frames=2, size=6, channels=3)[0]["x"]
    assert x.shape == (3, 2, 6, 6)
    assert x.min() >= -1 and x.max() <= 1
    # shorter side 10 -> 6, width 30 -> 18, centre crop keeps the middle third
    assert torch.allclose(x[:, :, 3, 3].T, torch.tensor([[1.0, 0.0, -1.0]] * 2), atol=0.05)


@pytest.mark.parametrize("channels", [1, 3])
def test_clip_frames_equal_the_same_images_in_an_image_folder(tmp_path, channels):
    """A clip's frames are decoded, resized and cropped as `ImageFolderDataset` does, the whole
    clip in one resize call."""
    clip = tmp_path / "clip"
    clip.mkdir()
    rng = np.random.default_rng(4)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)).save(clip / f"{i:02d}.png")
    x = VideoFolderDataset(tmp_path, frames=3, size=6, channels=channels)[0]["x"]
    assert x.shape == (channels, 3, 6, 6) and x.dtype == torch.float32
    frames = ImageFolderDataset(clip, size=6, channels=channels)
    for k in range(3):
        assert torch.equal(x[:, k], frames.load(k)), k
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 9, 14), dtype=np.uint8))
    assert torch.equal(resize_center_crop(images, 5),
                       torch.stack([resize_center_crop(im, 5) for im in images]))


def test_frames_of_different_sizes_raise_naming_the_clip(tmp_path):
    write_frames(tmp_path / "mixed", [10, 20])
    Image.new("L", (8, 8), 30).save(tmp_path / "mixed" / "f3.png")
    with pytest.raises(OSError, match="mixed.*different sizes"):
        VideoFolderDataset(tmp_path, frames=3, size=4, channels=1)[0]


def test_short_and_corrupt_clips_raise_and_are_skipped(tmp_path):
    write_frames(tmp_path / "good", [10, 20, 30, 40])
    write_frames(tmp_path / "short", [10, 20])
    (tmp_path / "corrupt").mkdir()
    for i in range(4):
        (tmp_path / "corrupt" / f"{i}.png").write_bytes(b"not a png")
    data = VideoFolderDataset(tmp_path, frames=3, size=8, channels=1)
    assert data.clips == ["corrupt", "good", "short"]
    with pytest.raises(OSError, match="corrupt"):
        data[0]
    with pytest.raises(ValueError, match=r"short has 2 frames, fewer than the 3 needed"):
        data[2]
    skipping = SkipCorrupt(data)
    assert skipping[0] is None and skipping[2] is None
    assert skipping[1]["x"].shape == (1, 3, 8, 8)


def test_folder_errors_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        VideoFolderDataset(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        VideoFolderDataset(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no clips found"):
        VideoFolderDataset(tmp_path / "empty")
    write_frames(tmp_path / "ok" / "c", [1, 2])
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        VideoFolderDataset(tmp_path / "ok", channels=2)
    with pytest.raises(ValueError, match="sampling must be one of even, first"):
        VideoFolderDataset(tmp_path / "ok", sampling="random")
    with pytest.raises(ValueError, match="no folder given"):
        VideoFolderDataset("")


def test_video_file_without_a_decoder_names_the_package(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    for name in ("torchcodec", "torchcodec.decoders", "torchvision", "torchvision.io"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(RuntimeError, match="pip install torchcodec") as e:
        VideoFolderDataset(tmp_path, frames=2, size=8)
    assert "\n" not in str(e.value)


def test_torchvision_without_pyav_is_no_decoder(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    for name in ("torchcodec", "torchcodec.decoders", "av"):
        monkeypatch.setitem(sys.modules, name, None)  # torchvision.io imports, read_video can't run
    with pytest.raises(RuntimeError, match="torchvision with PyAV: pip install torchcodec") as e:
        VideoFolderDataset(tmp_path, frames=2, size=8)
    assert "\n" not in str(e.value)


def test_a_decoder_that_fails_to_load_is_named(tmp_path, monkeypatch):
    real_import = importlib.import_module

    def load(name: str, *args, **kwargs):
        if name.startswith("torchcodec"):  # installed, but its FFmpeg libraries are missing
            raise RuntimeError("Could not load libtorchcodec.\nFFmpeg not found")
        if name.startswith("torchvision"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", load)
    (tmp_path / "clip.mkv").write_bytes(b"\x00")
    with pytest.raises(RuntimeError, match="torchcodec is installed but fails to load: Could not "
                                           "load libtorchcodec. FFmpeg not found"):
        VideoFolderDataset(tmp_path, frames=2, size=8)


def test_video_file_is_decoded_with_torchcodec_when_present(tmp_path, monkeypatch):
    class FakeDecoder:  # torchcodec's indexing API: len() and uint8 [C x H x W] frames
        def __init__(self, path: str):
            assert path.endswith("clip.webm")

        def __len__(self) -> int:
            return 9

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.full((3, 10, 14), 30 * i, dtype=torch.uint8)

    decoders = types.ModuleType("torchcodec.decoders")
    decoders.VideoDecoder = FakeDecoder
    monkeypatch.setitem(sys.modules, "torchcodec", types.ModuleType("torchcodec"))
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", decoders)
    (tmp_path / "clip.webm").write_bytes(b"\x00")
    data = pickle.loads(pickle.dumps(VideoFolderDataset(tmp_path, frames=3, size=8, channels=1)))
    assert data.backend == "torchcodec"
    x = data[0]["x"]
    assert x.shape == (1, 3, 8, 8)
    assert torch.allclose(x[0, :, 2, 2], (torch.tensor([0, 4, 8]) * 30 / 127.5 - 1).float(),
                          atol=1e-5)
    with pytest.raises(ValueError, match="has 9 frames, fewer than the 10 needed"):
        VideoFolderDataset(tmp_path, frames=10, size=8)[0]


# -------------------------------------------------------------------------- metric


def test_fit_tracks_recovers_the_true_parameters(real, real_clips):
    fits = fit_tracks(real_clips)
    assert fits.valid.all()
    assert np.abs(fits.velocity - np.stack([real.vx, real.vy], 1)).max() < 0.15
    assert np.abs(fits.start - np.stack([real.cx, real.cy], 1)).max() < 0.35
    assert np.abs(fits.radius - real.radius.numpy()).max() < 0.15
    assert np.array_equal(heading_of(fits.velocity), real.heading.numpy())


def test_real_clips_score_valid_close_and_labelled(real_metrics):
    m = real_metrics
    assert m["valid_fraction"] >= 0.97 and m["num_valid"] == round(m["valid_fraction"] * N)
    assert m["param_fd"] < 1e-3  # ~1e-4 for 1,000 clips; fewer clips add finite-sample bias
    assert m["label_accuracy"] >= 0.99
    assert 0 < m["track_error"] < 0.15
    assert m["coverage"] > 0.3
    assert m["frame_disk_fraction"] == 1.0 and m["disk_clip_fraction"] == 1.0


def test_partial_credit_counts_frames_and_clips_of_disks(real_clips):
    x = real_clips[:40].clone()
    x[:10, :, 3] = -1.0  # one empty frame in a quarter of the clips
    m = moving_shapes_metrics(x)
    assert m["frame_disk_fraction"] == pytest.approx(1 - 10 / (40 * F))
    assert m["disk_clip_fraction"] == pytest.approx(0.75)
    assert m["valid_fraction"] <= 0.75


def test_fd_of_a_set_with_itself_is_zero(real, real_clips):
    m = moving_shapes_metrics(real_clips, real_clips)
    assert m["param_fd"] == pytest.approx(0.0, abs=1e-10) and m["coverage"] == 1.0
    exact = moving_shapes_metrics(real_clips, real)  # the true parameters of the same clips
    assert exact["param_fd"] < 1e-4
    assert param_features(real).shape == (N, 5)


def test_wrong_labels_score_zero(real, real_clips):
    m = moving_shapes_metrics(real_clips[:60], labels=(real.heading[:60] + 4) % 8)
    assert m["label_accuracy"] == 0.0


def test_static_disks_are_valid_but_far_from_the_data(real_clips, real_metrics):
    static = real_clips[:, :, :1].expand(-1, -1, F, -1, -1)
    m = moving_shapes_metrics(static)
    assert m["valid_fraction"] == 1.0 and m["track_error"] == 0.0
    # the spread of the velocities: E|v|^2 / size^2 = 1.75 / 256 = 0.0068
    assert m["param_fd"] > 0.005 and m["param_fd"] > 5 * real_metrics["param_fd"]
    assert m["coverage"] < real_metrics["coverage"] / 2


def test_teleporting_and_shuffled_disks_are_invalid(real_clips):
    g = torch.Generator().manual_seed(0)
    teleport = torch.stack([real_clips[torch.randperm(N, generator=g), :, k] for k in range(F)], 2)
    m = moving_shapes_metrics(teleport)
    assert m["valid_fraction"] < 0.05 and m["track_error"] > 0.5
    shuffled = real_clips[:, :, torch.tensor([5, 4, 2, 6, 7, 3, 1, 0])]
    assert moving_shapes_metrics(shuffled)["valid_fraction"] < 0.1


@pytest.mark.parametrize("kind", ["two disks", "empty", "noise"])
def test_clips_without_one_disk_per_frame_score_nothing(kind, real_clips):
    x = real_clips[:40]
    if kind == "two disks":
        x = torch.maximum(x, disk_clip([(2.0, 2.0)] * F, 1.5))  # a speck in the corner too
    elif kind == "empty":
        x = -torch.ones_like(x)
    else:
        x = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m = moving_shapes_metrics(x, labels=torch.zeros(40, dtype=torch.long))
    assert m["valid_fraction"] == 0.0 and m["num_valid"] == 0
    assert m["param_fd"] == math.inf and m["coverage"] == 0.0
    assert m["label_accuracy"] == 0.0 and m["disk_clip_fraction"] == 0.0
    assert m["frame_disk_fraction"] < 0.02  # two disks: a frame where the disk covers the speck counts


def test_turning_mid_box_or_growing_is_invalid_but_bouncing_is_valid():
    r = 3.5  # walls at 3.5 and 11.5
    bounce = disk_clip([(x, 7.0) for x in (8.0, 9.5, 11.0, 11.0, 9.5, 8.0, 6.5, 5.0)], r)
    turn = disk_clip([(x, 7.0) for x in (5.0, 6.5, 8.0, 9.5, 8.0, 6.5, 5.0, 3.5)], r)
    grow = disk_clip([(5.0 + k, 7.0) for k in range(F)], [3.0 + 0.2 * k for k in range(F)])
    fits = fit_tracks(torch.cat([bounce, turn, grow]))
    assert fits.disks.all()
    assert fits.valid.tolist() == [True, False, False]
    assert fits.velocity[0] == pytest.approx([1.5, 0.0], abs=0.1)
    assert fits.residual[1] > 1.0 and fits.radius_range[2] > 1.0


def test_metric_rejects_bad_shapes(real_clips):
    with pytest.raises(ValueError, match=r"\[N x 1 x F x H x W\]"):
        moving_shapes_metrics(real_clips[:, 0])
    with pytest.raises(ValueError, match="labels must have shape"):
        moving_shapes_metrics(real_clips[:4], labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 frames"):
        fit_tracks(real_clips[:4, :, :1])


# ------------------------------------------------------------------------- pictures


def test_frame_strip_has_one_row_per_clip_and_one_column_per_frame(tmp_path):
    n, f, h, w = 3, 4, 5, 6
    values = torch.linspace(-1, 1, n * f).reshape(n, 1, f, 1, 1)  # one constant per frame
    x = values.expand(n, 1, f, h, w)
    path = save_frame_strip(x, tmp_path / "deep" / "strip.png", scale=2)
    with Image.open(path) as im:
        assert im.size == (f * (2 * w + 1) + 1, n * (2 * h + 1) + 1) and im.mode == "L"
        a = np.asarray(im)
    for i in range(n):
        for k in range(f):
            centre = a[1 + i * (2 * h + 1) + h, 1 + k * (2 * w + 1) + w]
            assert centre == round((float(values[i, 0, k]) + 1) * 127.5)
    path = save_frame_strip(x, tmp_path / "two.png", max_clips=2)
    with Image.open(path) as im:
        assert im.size == (f * (w + 1) + 1, 2 * (h + 1) + 1)


def test_gif_has_one_frame_per_clip_frame(tmp_path):
    n, f = 4, 5
    x = moving_shapes(n, frames=f, size=16, seed=1)
    path = save_gif(x, tmp_path / "g" / "clips.gif", fps=10, scale=2)
    with Image.open(path) as im:
        assert im.n_frames == f and im.size == (2 * 33 + 1, 2 * 33 + 1)  # a 2 x 2 grid
        assert im.info["duration"] == 100 and im.info["loop"] == 0
        im.seek(f - 1)
        last = np.asarray(im.convert("L"))
    expected = ((x[0, 0, -1].repeat_interleave(2, 0).repeat_interleave(2, 1) + 1) * 127.5).numpy()
    assert np.array_equal(last[1:33, 1:33], expected.astype(np.uint8))
    rgb = save_gif(torch.zeros(1, 3, 2, 4, 4).uniform_(-1, 1), tmp_path / "rgb.gif", fps=8,
                   scale=1)
    with Image.open(rgb) as im:
        assert im.n_frames == 2 and im.size == (6, 6)
        assert im.info["duration"] == 130  # 12.5 steps of 10 ms, rounded to the nearest


def test_pictures_reject_non_clips(tmp_path):
    with pytest.raises(ValueError, match=r"\[N x C x F x H x W\]"):
        save_frame_strip(torch.zeros(2, 1, 8, 8), tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"\[N x C x F x H x W\]"):
        save_gif(torch.zeros(2, 1, 8, 8), tmp_path / "a.gif")
    with pytest.raises(ValueError, match="C = 1"):
        save_gif(torch.zeros(1, 2, 3, 8, 8), tmp_path / "a.gif")
    with pytest.raises(ValueError, match="fps must be > 0"):
        save_gif(torch.zeros(1, 1, 3, 8, 8), tmp_path / "a.gif", fps=0)
