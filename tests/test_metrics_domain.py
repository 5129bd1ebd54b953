"""Domain metrics that need no download: the circles disk detector with its validity and
diversity scores, and the digits classifier with digits-FID, digits-IS and label accuracy."""

from __future__ import annotations

import json
import logging
import math
from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from perceptual_diffusion.datasets import DigitsDataset, circles
from perceptual_diffusion.metrics import digits as digits_module
from perceptual_diffusion.metrics.circles import (DiskFit, circles_metrics, detect_disk, fit_disks,
                                                  label_components)
from perceptual_diffusion.metrics.digits import (TRAINING_VERSION, DigitsClassifier,
                                                 DigitsFeatureNet, digits_metrics, heldout_split,
                                                 load_digits_classifier, train_digits_classifier)
from perceptual_diffusion.metrics.fid import FeatureNetwork
from perceptual_diffusion.metrics.kid import polynomial_kernel

SIZE = 32


def disk(cx: float, cy: float, r: float, size: int = SIZE) -> torch.Tensor:
    """(size, size) in [-1, 1], a disk drawn with the generator's rule (distance <= r)."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return ((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r).float() * 2 - 1


def union(*images: torch.Tensor) -> torch.Tensor:
    return torch.stack(images).amax(0)


# ------------------------------------------------------------------------------ circles


@pytest.mark.parametrize("cx, cy, r", [(16.0, 16.0, 8.0), (12.3, 17.8, 6.5), (9.5, 22.1, 4.0),
                                       (20.0, 11.0, 10.6)])
def test_one_disk_is_valid_with_its_centre_and_radius(cx, cy, r):
    fit = detect_disk(disk(cx, cy, r)[None])
    assert isinstance(fit, DiskFit)
    assert abs(fit.cx - cx) < 0.15 and abs(fit.cy - cy) < 0.15
    assert abs(fit.r - r) < 0.3
    assert fit.iou >= (0.92 if r < 5 else 0.95)  # small disks are coarsely rasterised


def test_disk_touching_the_border_is_valid_but_a_clipped_one_is_not():
    fit = detect_disk(disk(5.0, 16.0, 5.0))  # leftmost pixel in column 0, rightmost at 10
    assert fit is not None and fit.cx == pytest.approx(5.0) and fit.r == pytest.approx(5.0, abs=0.2)
    assert detect_disk(disk(16.0, 26.0, 5.0)) is not None  # bottom pixel in the last row
    valid, params = fit_disks(disk(0.0, 0.0, 10.0)[None])  # a quarter disk in the corner
    assert not valid[0] and params[0, 3] < 0.9
    valid, params = fit_disks(disk(0.0, 16.0, 8.0)[None])  # a half disk on the left edge
    assert not valid[0] and params[0, 3] < 0.9


def test_two_disks_or_a_disk_and_one_stray_pixel_are_invalid():
    assert detect_disk(union(disk(8, 8, 4), disk(23, 23, 5))) is None
    speck = disk(16, 16, 7)
    speck[0, 31] = 1.0
    assert detect_disk(speck) is None
    valid, params = fit_disks(speck[None])
    assert not valid[0] and np.isnan(params[0]).all()  # no fit: two components


def test_ring_is_invalid_through_its_iou():
    ring = disk(16, 16, 10).clone()
    ring[disk(16, 16, 5) > 0] = -1
    valid, params = fit_disks(ring[None])
    # Closed form: fitted radius sqrt(R^2 - r^2) = 8.66, IoU = (75 - 25) / (100 - 25 + 25) = 0.5.
    assert params[0, 2] == pytest.approx(math.sqrt(75), abs=0.2)
    assert params[0, 3] == pytest.approx(0.5, abs=0.03)
    assert not valid[0] and detect_disk(ring) is None


def test_disk_with_a_pinhole_is_not_solid():
    holed = disk(16, 16, 10).clone()
    holed[disk(16, 16, 1.5) > 0] = -1  # 9 pixels: the IoU alone (0.93) would pass
    valid, params = fit_disks(holed[None])
    assert params[0, 3] > 0.9 and not valid[0]


def test_square_is_invalid():
    square = -torch.ones(SIZE, SIZE)
    square[8:20, 8:20] = 1
    valid, params = fit_disks(square[None])
    # The inscribed-area disk misses the corners: IoU 0.825, well below 0.9.
    assert params[0, 3] == pytest.approx(0.825, abs=1e-3)
    assert not valid[0] and detect_disk(square) is None


def test_empty_and_noise_images_are_invalid():
    assert detect_disk(-torch.ones(1, SIZE, SIZE)) is None
    noise = torch.rand(20, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    valid, _ = fit_disks(noise)
    assert not valid.any()


def test_threshold_decides_the_foreground():
    img = disk(16, 16, 6) * 0.4 + 0.1  # disk 0.5, background -0.3
    assert detect_disk(img) is not None
    assert detect_disk(img, threshold=0.6) is None  # nothing above
    assert detect_disk(img, threshold=-0.5) is None  # everything above: the whole image


def test_full_image_is_not_a_disk():
    # Its fitted disk (r = 18) reaches outside the image; those pixels count in the union.
    valid, params = fit_disks(torch.ones(1, SIZE, SIZE))
    assert not valid[0] and params[0, 3] < 0.85


def _bfs_components(mask: np.ndarray) -> int:
    seen, count = np.zeros_like(mask), 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        count += 1
        seen[y0, x0] = True
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] \
                        and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_labels_agree_with_breadth_first_search(h, w, density, seed):
    mask = np.random.default_rng(seed).random((h, w)) < density
    labels = label_components(mask[None])[0]
    roots = labels == np.arange(h * w).reshape(h, w)
    assert roots.sum() == _bfs_components(mask)
    assert ((labels >= 0) == mask).all()
    # Neighbours on the mask share a label (the partition is 4-connected).
    assert (labels[:, 1:] == labels[:, :-1])[mask[:, 1:] & mask[:, :-1]].all()
    assert (labels[1:] == labels[:-1])[mask[1:] & mask[:-1]].all()


def test_generated_circles_score_well_and_a_collapsed_set_does_not():
    reference = circles(1000, SIZE, seed=1)
    real = circles_metrics(circles(1000, SIZE, seed=2), reference)
    assert real["valid_fraction"] >= 0.98 and real["num_valid"] >= 980
    assert real["param_fd"] < 2e-3 and real["coverage"] > 0.9

    collapsed = circles_metrics(circles(1, SIZE, seed=3).repeat(1000, 1, 1, 1), reference)
    assert collapsed["valid_fraction"] == 1.0
    assert collapsed["coverage"] < 0.2
    assert collapsed["param_fd"] > 10 * real["param_fd"]


def test_default_reference_is_the_generator():
    m = circles_metrics(circles(500, SIZE, seed=4))
    assert m["valid_fraction"] == 1.0 and m["param_fd"] < 2e-3 and m["coverage"] > 0.8


def test_no_valid_sample_gives_infinite_distance_and_no_coverage():
    m = circles_metrics(-torch.ones(4, 1, SIZE, SIZE), circles(100, SIZE, seed=1))
    assert m == {"valid_fraction": 0.0, "num_valid": 0, "param_fd": math.inf, "coverage": 0.0}


# ------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def cached_classifier(tmp_path_factory):
    """The classifier trained once into a fresh cache directory."""
    cache = tmp_path_factory.mktemp("digits-cache")
    model = load_digits_classifier(SIZE, cache)
    return model, cache


@pytest.fixture(scope="module")
def real_digits():
    return DigitsDataset(SIZE)


def test_classifier_is_accurate_on_the_held_out_split(cached_classifier, real_digits):
    model, _ = cached_classifier
    assert not model.from_cache
    _, test_idx = heldout_split(len(real_digits))
    assert len(test_idx) == round(0.2 * len(real_digits))
    with torch.no_grad():
        pred = model(real_digits.images[test_idx]).argmax(1)
    accuracy = float((pred == real_digits.labels[test_idx]).float().mean())
    assert accuracy > 0.95
    assert accuracy == pytest.approx(model.heldout_accuracy)


def test_training_is_deterministic_given_the_seed():
    a, b = (train_digits_classifier(size=16, seed=3, epochs=1) for _ in range(2))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    c = train_digits_classifier(size=16, seed=4, epochs=1)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_cache_round_trip_does_not_retrain(cached_classifier, monkeypatch):
    model, cache = cached_classifier
    monkeypatch.setattr(digits_module, "train_digits_classifier",
                        lambda *a, **k: pytest.fail("retrained a valid cache"))
    again = load_digits_classifier(SIZE, cache)
    assert again.from_cache and again.heldout_accuracy == model.heldout_accuracy
    for (k, va), vb in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(va, vb), k
    meta = json.loads((cache / f"digits-classifier-{SIZE}.json").read_text())
    assert meta["version"] == TRAINING_VERSION and meta["size"] == SIZE and meta["seed"] == 0
    assert meta["sha256"] == again.weights_sha256 and meta["heldout_accuracy"] > 0.95


def _fake_trainer(calls: list):
    def train(size=32, seed=0, **_):
        calls.append(size)
        model = DigitsClassifier(size)
        model.heldout_accuracy = 0.5
        return model
    return train


@pytest.mark.parametrize("damage", ["weights", "version", "sidecar"])
def test_damaged_cache_is_retrained(cached_classifier, tmp_path, monkeypatch, caplog, damage):
    _, cache = cached_classifier
    weights = cache / f"digits-classifier-{SIZE}.safetensors"
    sidecar = weights.with_suffix(".json")
    (tmp_path / weights.name).write_bytes(weights.read_bytes())
    meta = json.loads(sidecar.read_text())
    if damage == "weights":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one flipped byte in the last tensor: still loads, checksum differs
        (tmp_path / weights.name).write_bytes(bytes(data))
    elif damage == "version":
        meta["version"] = "digits-cnn/0"
    (tmp_path / sidecar.name).write_text("{not json" if damage == "sidecar" else json.dumps(meta))
    calls: list = []
    monkeypatch.setattr(digits_module, "train_digits_classifier", _fake_trainer(calls))
    with caplog.at_level(logging.WARNING, logger="perceptual_diffusion.metrics.digits"):
        model = load_digits_classifier(SIZE, tmp_path)
    assert calls == [SIZE] and not model.from_cache
    assert "retraining" in caplog.text
    # The retrained weights replace the cache, with a matching sidecar.
    new_meta = json.loads((tmp_path / sidecar.name).read_text())
    assert new_meta["version"] == TRAINING_VERSION and new_meta["heldout_accuracy"] == 0.5
    assert new_meta["sha256"] == model.weights_sha256
    stored = load_file(str(tmp_path / weights.name))
    assert torch.equal(stored["head.weight"], model.head.weight)


def test_feature_net_interface(cached_classifier, real_digits):
    net = DigitsFeatureNet(cached_classifier[0])
    assert isinstance(net, FeatureNetwork) and net.dim == 128
    x = real_digits.images[:5]
    assert net.features(x).shape == (5, 128) and net.logits(x).shape == (5, 10)
    with pytest.raises(ValueError, match="1 x 32 x 32"):
        net.features(torch.zeros(2, 1, 16, 16))


def test_real_digits_score_perfectly_and_noise_does_not(cached_classifier, real_digits):
    model, cache = cached_classifier
    real = digits_metrics(real_digits.images, real_digits.labels, classifier=model)
    assert real["digits_fid"] == pytest.approx(0.0, abs=1e-6)
    assert real["digits_is"] > 5
    assert real["label_accuracy"] > 0.95
    assert (cache / f"digits-reference-{SIZE}.safetensors").exists()
    # KID of a set against itself: its cross term holds the diagonal, so the unbiased estimate is
    # 2 [(S - tr K) / (n (n - 1)) - S / n^2] < 0 (S the sum of the kernel matrix K), not 0.
    net = DigitsFeatureNet(model)
    feats = torch.cat([net.features(b) for b in real_digits.images.split(256)]).double()
    k, n = polynomial_kernel(feats, feats), len(feats)
    expected = 2 * ((k.sum() - k.trace()) / (n * (n - 1)) - k.sum() / n ** 2)
    assert real["digits_kid"] == pytest.approx(float(expected), rel=1e-9) and real["digits_kid"] < 0

    noise = torch.rand(500, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = digits_metrics(noise, classifier=model)
    assert "label_accuracy" not in fake
    assert fake["digits_fid"] > 100 and fake["digits_is"] < 2
    assert fake["digits_kid"] > 10 * fake["digits_kid_se"] > 0

    wrong = digits_metrics(real_digits.images, real_digits.labels.roll(1), classifier=model)
    assert wrong["label_accuracy"] < 0.2  # labels of the neighbour: chance level


def test_digits_metrics_loads_the_cached_classifier(cached_classifier, real_digits, monkeypatch):
    _, cache = cached_classifier
    monkeypatch.setattr(digits_module, "train_digits_classifier",
                        lambda *a, **k: pytest.fail("retrained a valid cache"))
    # Fewer than 100 samples: one IS split, so the spread over splits is 0.
    m = digits_metrics(real_digits.images[:60], real_digits.labels[:60], cache_dir=cache)
    assert m["digits_is_std"] == 0.0 and m["label_accuracy"] > 0.9 and m["digits_kid_se"] > 0
    assert 0 < m["digits_fid"] < 500
