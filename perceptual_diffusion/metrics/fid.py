"""FID and Inception Score over any feature network, with streaming float64 statistics.

FID (Heusel et al. 2017) between feature distributions N(mu1, S1) and N(mu2, S2)::

    ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

IS (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), mean and std over `splits` chunks.

Statistics are accumulated batch by batch (never all features in memory) and reference
statistics are cached to a `.safetensors` file tagged with a `key` naming what produced them.
Sample-based metrics (KID, `kid.py`) need the features themselves: `keep_features` keeps the
first rows (as float32, what the feature networks emit) beside the statistics, in the cache too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..fileio import atomic_write
from .kid import kernel_inception_distance

__all__ = [
    "sample_frechet_distance",
    "fid_and_inception_score",
    "FeatureNetwork",
    "RunningStats",
    "frechet_distance",
    "sqrtm_trace",
    "inception_score",
    "compute_statistics",
    "cached_statistics",
]

log = logging.getLogger(__name__)

_FORMAT = "perceptual_diffusion.RunningStats/1"
_ALL = 1 << 62  # keep_features=True: every row


def _feature_cap(keep_features: bool | int) -> int:
    """keep_features (True: all rows, False: none, an int: that many) -> a row count."""
    if isinstance(keep_features, bool):
        return _ALL if keep_features else 0
    if int(keep_features) < 0:
        raise ValueError(f"keep_features must be a bool or a count >= 0, got {keep_features!r}")
    return int(keep_features)


@runtime_checkable
class FeatureNetwork(Protocol):
    """A frozen network that embeds images for FID.

    `features(x)`: x [N x C x H x W] in [-1, 1] -> (N, dim) features. Networks that also serve
    the Inception Score provide `logits(x) -> (N, K)` class logits (optional, not checked here).
    """

    dim: int

    def features(self, x: Tensor) -> Tensor: ...


class RunningStats:
    """Streaming mean and covariance of (N, dim) feature batches, in float64 on the CPU.

    Batches are merged with Chan et al.'s pairwise update (mean and centred scatter matrix
    `m2`), which stays accurate when the mean is large relative to the spread, unlike the
    raw sum of outer products. `cov` is unbiased, like `numpy.cov(x, rowvar=False)`.
    `key` says what produced the statistics (e.g. "digits-train/inception-2015-12-05").
    `keep_features` (True: all, an int: the first that many rows) also keeps the features
    themselves, float32 (num_features, dim), for sample-based metrics such as KID.
    """

    def __init__(self, dim: int, key: str = "", keep_features: bool | int = False) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self.key = key
        self.count = 0
        self._mean = torch.zeros(self.dim, dtype=torch.float64)
        self._m2 = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.keep_features = _feature_cap(keep_features)
        self.num_features = 0
        self._kept: list[Tensor] = []

    def update(self, features: Tensor | np.ndarray) -> RunningStats:
        """Add a batch of features (N, dim); returns self."""
        x = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {tuple(x.shape)}")
        n_b = x.shape[0]
        if n_b == 0:
            return self
        room = self.keep_features - self.num_features
        if room > 0:
            self._kept.append(x[:room].to(torch.float32))
            self.num_features += min(room, n_b)
        mean_b = x.mean(0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean += delta * (n_b / n)
        self._m2 += m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n
        return self

    @property
    def mean(self) -> Tensor:
        """(dim,) float64 mean of everything seen."""
        if self.count == 0:
            raise ValueError("RunningStats is empty: call update() with features first")
        return self._mean.clone()

    @property
    def cov(self) -> Tensor:
        """(dim, dim) float64 unbiased covariance (divides by count - 1)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.count}")
        return self._m2 / (self.count - 1)

    @property
    def features(self) -> Tensor:
        """(num_features, dim) float32: the first rows seen, kept when `keep_features` asked."""
        if self.num_features == 0:
            raise ValueError("RunningStats kept no features: make it with keep_features=True "
                             f"(key {self.key!r}, {self.count} samples seen)")
        if len(self._kept) > 1:
            self._kept = [torch.cat(self._kept)]
        return self._kept[0]

    def save(self, path: str | os.PathLike) -> None:
        """Write to `path` (.safetensors) atomically: a temporary file, then os.replace."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self._mean.contiguous(), "m2": self._m2.contiguous(),
                   "count": torch.tensor([self.count], dtype=torch.int64)}
        meta = {"format": _FORMAT, "key": self.key, "count": str(self.count),
                "keep_features": str(self.keep_features)}
        if self.num_features:
            tensors["features"] = self.features.contiguous()
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, key: str | None) -> RunningStats:
        """Read statistics saved by `save`. Raises ValueError if the stored key differs from
        `key` (pass None to accept any key)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a RunningStats file (format {meta.get('format')!r})")
        stored = meta.get("key", "")
        if key is not None and stored != key:
            raise ValueError(f"cached statistics {path} were made by key {stored!r}, not {key!r};"
                             " delete the file or use another path")
        tensors = load_file(str(path))
        stats = cls(tensors["mean"].shape[0], stored)
        stats._mean = tensors["mean"].to(torch.float64)
        stats._m2 = tensors["m2"].to(torch.float64)
        stats.count = int(tensors["count"][0])
        stats.keep_features = int(meta.get("keep_features", "0"))
        if "features" in tensors:
            stats._kept = [tensors["features"].to(torch.float32)]
            stats.num_features = stats._kept[0].shape[0]
        return stats


def _as_f64(a: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(a).detach().to("cpu", torch.float64)


def _psd_sqrt(s: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix via eigh (tiny negative eigenvalues
    from round-off are clamped to 0)."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def sqrtm_trace(cov1: Tensor | np.ndarray, cov2: Tensor | np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, in float64, without scipy.

    S1 S2 = R (R S2) with R = S1^(1/2), and AB, BA share eigenvalues, so S1 S2 has the
    eigenvalues of M = R S2 R, which is symmetric PSD: the trace is sum sqrt(eig(M)). Two
    symmetric eigendecompositions, no eps added to the diagonal, exact for singular S1 or S2
    (e.g. fewer samples than dimensions); negative round-off eigenvalues are clamped to 0.
    """
    s1, s2 = _as_f64(cov1), _as_f64(cov2)
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(eig.clamp_min(0).sqrt().sum())


def frechet_distance(mu1: Tensor | np.ndarray, cov1: Tensor | np.ndarray,
                     mu2: Tensor | np.ndarray, cov2: Tensor | np.ndarray) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), computed in float64:
    ||mu1 - mu2||^2 + Tr(cov1) + Tr(cov2) - 2 Tr((cov1 cov2)^(1/2)) (see `sqrtm_trace`)."""
    m1, m2 = _as_f64(mu1), _as_f64(mu2)
    c1, c2 = _as_f64(cov1), _as_f64(cov2)
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or c1.shape != (d, d) or c2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {tuple(m1.shape)}, {tuple(m2.shape)}; "
                         f"cov {tuple(c1.shape)}, {tuple(c2.shape)}")
    diff = float(((m1 - m2) ** 2).sum())
    value = diff + float(torch.trace(c1) + torch.trace(c2)) - 2.0 * sqrtm_trace(c1, c2)
    # Round-off can leave -1e-12 for identical inputs; a distance is never negative.
    return max(value, 0.0)


def inception_score(logits_or_probs: Tensor | np.ndarray, splits: int = 10,
                    kind: Literal["auto", "logits", "probs"] = "auto") -> tuple[float, float]:
    """Inception Score of predictions (N, K): mean and std (ddof 0) over `splits` contiguous
    chunks of exp(mean_x KL(p(y|x) || p(y))), p(y) being the chunk's mean prediction.

    kind="auto" treats the input as probabilities when every row is non-negative and sums to
    1, otherwise as logits (softmax applied). Computed in float64; 0 log 0 = 0.
    """
    x = _as_f64(logits_or_probs)
    if x.ndim != 2:
        raise ValueError(f"expected predictions of shape (N, K), got {tuple(x.shape)}")
    if not 1 <= splits <= x.shape[0]:
        raise ValueError(f"splits must be in [1, N={x.shape[0]}], got {splits}")
    if kind == "auto":
        is_probs = bool((x >= 0).all()) and bool(((x.sum(1) - 1).abs() <= 1e-4).all())
        kind = "probs" if is_probs else "logits"
    if kind == "logits":
        p = torch.softmax(x, dim=1)
    elif kind == "probs":
        p = x / x.sum(1, keepdim=True)
    else:
        raise ValueError(f"kind must be 'auto', 'logits' or 'probs', got {kind!r}")
    scores = []
    for part in torch.tensor_split(p, splits):
        py = part.mean(0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, py)).sum(1)
        scores.append(float(torch.exp(kl.mean())))
    s = np.asarray(scores)
    return float(s.mean()), float(s.std())


def compute_statistics(feature_net: FeatureNetwork, batches: Iterable[Tensor], key: str = "",
                       *, progress: bool = False, desc: str = "features",
                       keep_features: bool | int = False) -> RunningStats:
    """Stream `batches` ([N x C x H x W] in [-1, 1], or dicts with an "x" entry) through
    `feature_net.features` into a RunningStats; only one batch of features is held at a time,
    besides the rows `keep_features` keeps (see RunningStats)."""
    from tqdm.auto import tqdm

    stats = RunningStats(feature_net.dim, key, keep_features)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            x = batch["x"] if isinstance(batch, dict) else batch
            stats.update(feature_net.features(x))
    log.info("statistics %r over %d samples", key, stats.count)
    return stats


def cached_statistics(path: str | os.PathLike, key: str,
                      make_batches: Callable[[], Iterable[Tensor]], feature_net: FeatureNetwork,
                      *, progress: bool = False, overwrite: bool = False,
                      keep_features: bool | int = False) -> RunningStats:
    """Statistics cached at `path`: loaded when the file exists with the same `key`, else
    computed from `make_batches()` and saved atomically. A file with another key raises
    ValueError unless `overwrite=True`, in which case it is recomputed and replaced. A file that
    kept fewer features than `keep_features` asks for (e.g. one written before KID) is
    recomputed and replaced."""
    path = Path(path)
    if path.exists():
        try:
            stats = RunningStats.load(path, key)
        except ValueError:
            if not overwrite:
                raise
            log.warning("replacing cached statistics %s: made with another key", path)
        else:
            wanted = min(_feature_cap(keep_features), stats.count)
            if stats.num_features >= wanted:
                log.info("loaded cached statistics %s (%d samples)", path, stats.count)
                return stats
            log.info("recomputing cached statistics %s: it kept %d features, %d wanted", path,
                     stats.num_features, wanted)
    stats = compute_statistics(feature_net, make_batches(), key, progress=progress,
                               keep_features=keep_features)
    stats.save(path)
    return stats


def sample_frechet_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sample sets [M x D] (rows are samples):
    inf when `generated` is empty; one sample counts as a point mass (zero covariance)."""
    if len(generated) == 0:
        return float("inf")

    def gaussian(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cov = np.cov(p, rowvar=False) if len(p) > 1 else np.zeros((p.shape[1], p.shape[1]))
        return p.mean(0), np.atleast_2d(cov)

    mu_g, cov_g = gaussian(np.asarray(generated, dtype=np.float64))
    mu_r, cov_r = gaussian(np.asarray(reference, dtype=np.float64))
    return float(frechet_distance(mu_g, cov_g, mu_r, cov_r))


def fid_and_inception_score(net: torch.nn.Module, batches: Iterable[Tensor], reference: RunningStats,
                            key: str = "samples") -> dict[str, float]:
    """FID against `reference` and IS of the images in `batches`, from one pass of the FID
    Inception network `net` (pool3 features for FID; the unbiased 1008-way logits of its fc
    layer, as torch-fidelity, for IS: 10 splits from 100 images up, else 1). When `reference`
    kept features (RunningStats `keep_features`), also "kid" and "kid_se"
    (`kernel_inception_distance`, seed 0) between every image's pool3 features and those."""
    with_kid = reference.num_features > 0
    stats, probs = RunningStats(net.dim, key=key, keep_features=with_kid), []
    with torch.inference_mode():
        for batch in batches:
            feats = net.features(batch)
            stats.update(feats)
            probs.append((feats.float() @ net.fc.weight.float().T).softmax(-1).cpu())
    probs = torch.cat(probs)
    is_mean, is_std = inception_score(probs, splits=10 if probs.shape[0] >= 100 else 1)
    out = {"fid": frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov), "is": is_mean,
           "is_std": is_std}
    if with_kid:
        out["kid"], out["kid_se"] = kernel_inception_distance(stats.features, reference.features)
    return out

