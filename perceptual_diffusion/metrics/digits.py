"""Digits metrics from a small CNN classifier trained on scikit-learn's bundled digits, the way
MNIST work uses LeNet features: a digits-FID and a digits-KID from its penultimate features and a
digits-IS from its class probabilities, plus how often a class-conditional sample shows its label.

    clf = load_digits_classifier(32)           # trained once (~10 s on 2 cores), then cached
    m = digits_metrics(samples, labels=labels)  # {"digits_fid", "digits_kid", "digits_kid_se",
                                                #  "digits_is", "digits_is_std", "label_accuracy"}

The classifier is trained on a fixed 80% of the 1,797 digits; its accuracy on the other 20% is
stored with it. The cache holds `digits-classifier-<size>.safetensors` and a JSON sidecar (sha256
of the weights, size, seed, TRAINING_VERSION, held-out accuracy); a cache whose checksum or
version does not match is retrained with a warning, never trusted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..datasets.digits import DigitsDataset
from ..fileio import atomic_write, sha256_file
from .fid import (RunningStats, cached_statistics, compute_statistics, frechet_distance,
                  inception_score)
from .kid import kernel_inception_distance

__all__ = ["DigitsClassifier", "DigitsFeatureNet", "train_digits_classifier",
           "load_digits_classifier", "digits_metrics", "default_cache_dir", "heldout_split",
           "TRAINING_VERSION"]

log = logging.getLogger(__name__)

# Bump whenever the architecture, data, split or training schedule changes: caches made by
# another version are retrained.
TRAINING_VERSION = "digits-cnn/1"
DEFAULT_SEED = 0
SPLIT_SEED = 0  # the 80/20 split is the same for every training seed
HELD_OUT_FRACTION = 0.2
NUM_CLASSES = 10


class DigitsClassifier(nn.Module):
    """conv3x3/2-relu (16 channels), (conv3x3-relu-maxpool) x 2 (32, 64) -> 4x4 -> linear
    `feature_dim` + relu (the penultimate features) -> 10 logits. Input [N x 1 x size x size]
    in [-1, 1]."""

    def __init__(self, size: int = 32, feature_dim: int = 128):
        super().__init__()
        self.size, self.feature_dim = size, feature_dim
        # The digits are 8x8 images upsampled, so a strided first conv loses nothing and
        # quarters the cost; adaptive pooling makes the feature size independent of `size`.
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, NUM_CLASSES)
        self.heldout_accuracy: float | None = None  # set by training or read from the cache
        self.from_cache = False
        self.weights_path: Path | None = None  # the cache file these weights were loaded from
        self.weights_sha256: str | None = None

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (N, feature_dim)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, 10)."""
        return self.head(self.body(x))


def heldout_split(n: int) -> tuple[Tensor, Tensor]:
    """(train, held-out) indices of a fixed 80/20 split of n items (seed SPLIT_SEED)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(n * HELD_OUT_FRACTION)
    return perm[n_test:], perm[:n_test]


def _random_shift(x: Tensor, max_shift: int, g: torch.Generator) -> Tensor:
    """Each image of [N x 1 x H x W] moved by its own random (dy, dx) in [-max_shift, max_shift],
    the uncovered border filled with background (-1)."""
    n, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x[:, 0], (s, s, s, s), value=-1.0)
    dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols][:, None]


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    pred = torch.cat([model(b).argmax(1) for b in x.split(512)])
    return float((pred == y).float().mean())


def train_digits_classifier(size: int = 32, seed: int = DEFAULT_SEED, epochs: int = 10,
                            batch_size: int = 64, lr: float = 3e-3) -> DigitsClassifier:
    """Train a DigitsClassifier on the training 80% of the digits at size x size, with random
    shifts of up to size/16 pixels (2 at 32x32); deterministic given `seed` (the global RNG is
    left untouched). The held-out accuracy is logged and kept in `model.heldout_accuracy`."""
    threads = torch.get_num_threads()
    # One thread: the result then does not depend on the machine's core count (parallel
    # reductions sum in another order), and a net this small gains little from more; with a
    # busy second core, spinning OpenMP workers made training 10x slower.
    torch.set_num_threads(1)
    try:
        return _train(size, seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(size: int, seed: int, epochs: int, batch_size: int, lr: float) -> DigitsClassifier:
    start = time.perf_counter()
    data = DigitsDataset(size, conditional=True)
    train_idx, test_idx = heldout_split(len(data))
    x_train, y_train = data.images[train_idx], data.labels[train_idx]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(size)
    g = torch.Generator().manual_seed(seed)
    max_shift = max(1, size // 16)
    steps_per_epoch = -(-len(x_train) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch)
    model.train()
    for _ in range(epochs):
        for b in torch.randperm(len(x_train), generator=g).split(batch_size):
            loss = F.cross_entropy(model(_random_shift(x_train[b], max_shift, g)), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    model.heldout_accuracy = _accuracy(model, data.images[test_idx], data.labels[test_idx])
    log.info("digits classifier (size %d, seed %d): held-out accuracy %.4f after %d epochs, "
             "%.1f s", size, seed, model.heldout_accuracy, epochs, time.perf_counter() - start)
    return model


def default_cache_dir() -> Path:
    """$PERCEPTUAL_DIFFUSION_CACHE, else ~/.cache/perceptual-diffusion."""
    env = os.environ.get("PERCEPTUAL_DIFFUSION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "perceptual-diffusion"


def _load_cached(weights: Path, sidecar: Path, size: int) -> DigitsClassifier | None:
    """The cached classifier when its sidecar matches this code and its weights' checksum;
    None (with a warning saying why, unless nothing is cached yet) otherwise."""
    if not weights.exists() and not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        expected = {"version": TRAINING_VERSION, "size": size, "seed": DEFAULT_SEED}
        for k, v in expected.items():
            if meta.get(k) != v:
                raise ValueError(f"{k} is {meta.get(k)!r}, expected {v!r}")
        digest = sha256_file(weights)
        if digest != meta.get("sha256"):
            raise ValueError(f"sha256 of {weights.name} does not match the sidecar")
        model = DigitsClassifier(size)
        model.load_state_dict(load_file(str(weights)))
        model.heldout_accuracy = float(meta["heldout_accuracy"])
    except Exception as e:  # any defect of the cache means retraining, never trusting it
        log.warning("retraining the digits classifier: cache %s is unusable (%s: %s)",
                    weights, type(e).__name__, e)
        return None
    model.weights_sha256 = digest
    return model.eval()


def load_digits_classifier(size: int = 32, cache_dir: str | os.PathLike | None = None
                           ) -> DigitsClassifier:
    """The digits classifier for size x size images, trained with seed 0 on first use and
    cached in `cache_dir` (default `default_cache_dir()`); `model.from_cache` says which."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    weights = root / f"digits-classifier-{size}.safetensors"
    sidecar = weights.with_suffix(".json")
    model = _load_cached(weights, sidecar, size)
    if model is not None:
        model.from_cache = True
    else:
        start = time.perf_counter()
        model = train_digits_classifier(size, DEFAULT_SEED)
        seconds = time.perf_counter() - start
        root.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(weights, lambda tmp: save_file(state, tmp))
        model.weights_sha256 = sha256_file(weights)
        meta = {"sha256": model.weights_sha256, "size": size, "seed": DEFAULT_SEED,
                "version": TRAINING_VERSION, "heldout_accuracy": model.heldout_accuracy,
                "train_seconds": round(seconds, 2)}
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n",
                                                                 encoding="utf-8"))
    model.weights_path = weights
    return model


class DigitsFeatureNet:
    """The feature-network interface of metrics.fid over a DigitsClassifier: `features(x)` ->
    penultimate (N, dim), `logits(x)` -> (N, 10), for x [N x 1 x size x size] in [-1, 1]."""

    def __init__(self, model: DigitsClassifier):
        self.model = model.eval()
        self.dim = model.feature_dim
        self.size = model.size

    def _check(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"the digits classifier takes [N x 1 x {self.size} x {self.size}] "
                             f"images, got {tuple(x.shape)}")
        p = next(self.model.parameters())
        return x.to(p.device, p.dtype)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        return self.model.features(self._check(x))

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        return self.model(self._check(x))


def _reference_statistics(net: DigitsFeatureNet) -> RunningStats:
    """Feature statistics of the 1,797 real digits at the net's size, with the features kept
    (1797 x 128, for KID); cached beside the classifier's cache file (keyed by its checksum)
    when it came from the cache."""
    batches = lambda: DigitsDataset(net.size, conditional=False).images.split(256)  # noqa: E731
    model = net.model
    if getattr(model, "weights_path", None) is None:
        return compute_statistics(net, batches(), key="digits-real", keep_features=True)
    path = model.weights_path.with_name(f"digits-reference-{net.size}.safetensors")
    key = f"digits-real-1797|size={net.size}|classifier-sha256={model.weights_sha256}"
    try:
        return cached_statistics(path, key, batches, net, overwrite=True, keep_features=True)
    except Exception as e:  # an unreadable file: recompute rather than fail the evaluation
        log.warning("recomputing digits reference statistics: %s is unusable (%s)", path, e)
        path.unlink(missing_ok=True)
        return cached_statistics(path, key, batches, net, keep_features=True)


def digits_metrics(samples: Tensor, labels: Tensor | None = None,
                   classifier: DigitsClassifier | DigitsFeatureNet | None = None, *,
                   cache_dir: str | os.PathLike | None = None, batch_size: int = 256,
                   reference: Tensor | None = None) -> dict[str, float]:
    """Digits metrics of samples [N x 1 x S x S] in [-1, 1] (N >= 2).

    - "digits_fid": Frechet distance between the classifier's penultimate features of the
      samples and of the 1,797 real digits at size S.
    - "digits_kid", "digits_kid_se": KID between the same features, with its standard error
      (`kernel_inception_distance`: every row up to 2,896 samples, subsets beyond).
    - "digits_is", "digits_is_std": Inception Score of the softmax probabilities over 10 splits
      (1 split when N < 100: fewer samples per split bias the score low).
    - "label_accuracy" (when `labels` (N,) are given): fraction classified as their
      conditioning label, the class alignment that classifier-free guidance buys.

    `classifier` defaults to `load_digits_classifier(S, cache_dir)`. `reference` (real images
    [M x 1 x S x S]) replaces the 1,797 digits as what FID and KID compare with, e.g. for a
    real-versus-real floor between two disjoint subsets of the digits.
    """
    if samples.ndim != 4 or samples.shape[1] != 1 or samples.shape[-1] != samples.shape[-2]:
        raise ValueError(f"expected samples [N x 1 x S x S], got {tuple(samples.shape)}")
    n, size = samples.shape[0], samples.shape[-1]
    if n < 2:
        raise ValueError(f"digits metrics need at least 2 samples, got {n}")
    if labels is not None and tuple(labels.shape) != (n,):
        raise ValueError(f"expected labels of shape ({n},), got {tuple(labels.shape)}")
    if classifier is None:
        classifier = load_digits_classifier(size, cache_dir)
    net = classifier if isinstance(classifier, DigitsFeatureNet) else DigitsFeatureNet(classifier)
    ref = (_reference_statistics(net) if reference is None else
           compute_statistics(net, reference.split(batch_size), key="reference", keep_features=True))
    stats = compute_statistics(net, samples.split(batch_size), key="samples", keep_features=True)
    logits = torch.cat([net.logits(b) for b in samples.split(batch_size)]).double()
    is_mean, is_std = inception_score(logits.softmax(1), splits=1 if n < 100 else 10)
    kid, kid_se = kernel_inception_distance(stats.features, ref.features)
    out = {"digits_fid": frechet_distance(stats.mean, stats.cov, ref.mean, ref.cov),
           "digits_kid": kid, "digits_kid_se": kid_se, "digits_is": is_mean, "digits_is_std": is_std}
    if labels is not None:
        out["label_accuracy"] = float((logits.argmax(1).cpu() == labels.cpu()).float().mean())
    return out
