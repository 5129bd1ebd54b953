"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 5): the
unbiased estimate of the squared MMD between two feature sets under the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, over all rows or, for large sets, averaged over random subsets, with
its standard error.

    kid, se = kernel_inception_distance(gen_features, ref_features)   # [N1 x D], [N2 x D]

Any features serve (Inception pool3, the digits classifier's); computed in float64 on the CPU.
Unlike FID the estimate is unbiased at every sample count, so it can be negative when the two
sets come from one distribution.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["polynomial_kernel", "polynomial_mmd2", "kernel_inception_distance", "COMPLETE_MAX_ENTRIES"]

# Sets whose kernel matrices have at most this many entries (64 MiB each in float64) are measured
# whole; larger ones on subsets.
COMPLETE_MAX_ENTRIES = 1 << 23


def _features(a: Tensor | np.ndarray, name: str) -> Tensor:
    x = torch.as_tensor(a).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be features [N x D] with N >= 2, got shape {tuple(x.shape)}")
    return x


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x.y / d + 1)^3 between the rows of x [N x D] and y [M x D] -> [N x M]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_terms(x: Tensor, y: Tensor) -> tuple[float, Tensor, Tensor]:
    """Unbiased MMD^2 of x [m x D] against y [n x D] and each point's first-order term
    a_i = mean_{j != i} k(x_i, x_j) - mean_j k(x_i, y_j) (b_j likewise), whose means add up
    to the estimate: MMD^2_u = mean(a) + mean(b)."""
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    a = (kxx.sum(1) - kxx.diagonal()) / (x.shape[0] - 1) - kxy.mean(1)
    b = (kyy.sum(1) - kyy.diagonal()) / (y.shape[0] - 1) - kxy.mean(0)
    return float(a.mean() + b.mean()), a, b


def polynomial_mmd2(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3 with the full cross term, as Binkowski et al.)
    of features x [N x D] against y [M x D] under `polynomial_kernel`, over all pairs:
    mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)."""
    x, y = _features(x, "x"), _features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dim, got {x.shape[1]} and {y.shape[1]}")
    return _mmd2_terms(x, y)[0]


def kernel_inception_distance(features1: Tensor | np.ndarray, features2: Tensor | np.ndarray, *,
                              num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
                              ) -> tuple[float, float]:
    """KID of features1 [N1 x D] against features2 [N2 x D]: (estimate, standard error).

    The estimate is `polynomial_mmd2` over all rows (the complete U-statistic) when each kernel
    matrix has at most COMPLETE_MAX_ENTRIES entries (N up to 2,896, e.g. digits). Larger sets
    are measured as torch-fidelity does: the mean over `num_subsets` pairs of subsets of
    m = min(subset_size, N1, N2) rows drawn without replacement from each side (deterministic
    given `seed`), an incomplete U-statistic with the same expectation and more variance.

    The standard error is that of the estimate over fresh draws of the two feature sets, not the
    spread over subsets: the std over subsets (what torch-fidelity reports) is 0 when both sets
    have m rows and small whenever a subset covers most of its set, and std / sqrt(num_subsets)
    only measures the Monte-Carlo error of re-using one sample. It is the first-order (Hoeffding
    projection) variance of the two-sample U-statistic, 4 Var(a) / N1 + 4 Var(b) / N2, as in
    the MMD model comparison test of Bounliphone et al. 2016 (a, b the per-point terms of
    `_mmd2_terms`; on subsets their variances are averaged, N is capped at num_subsets * m and
    the subsets' Monte-Carlo variance is added). Near KID = 0 the first-order term vanishes; the
    plug-in estimate is then of the right (1/N^2) order and errs large (measured against the
    spread over fresh draws: 1.35 times on Gaussian features at N = 200, 1.9 times on two real
    digit sets of 300; 1.0 to 1.2 times away from 0). The spread of a real-versus-real floor
    (`real_vs_real_floor`) is the direct measurement.
    """
    x, y = _features(features1, "features1"), _features(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features1 and features2 must have the same dim, got {x.shape[1]} and {y.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    n1, n2 = x.shape[0], y.shape[0]
    if max(n1, n2) ** 2 <= COMPLETE_MAX_ENTRIES:
        value, a, b = _mmd2_terms(x, y)
        return value, math.sqrt(4 * float(a.var()) / n1 + 4 * float(b.var()) / n2)
    m = min(subset_size, n1, n2)
    g = torch.Generator().manual_seed(seed)
    estimates, var_a, var_b = [], [], []
    for _ in range(num_subsets):
        xs = x if m == n1 else x[torch.randperm(n1, generator=g)[:m]]
        ys = y if m == n2 else y[torch.randperm(n2, generator=g)[:m]]
        value, a, b = _mmd2_terms(xs, ys)
        estimates.append(value)
        var_a.append(float(a.var()))
        var_b.append(float(b.var()))
    est = np.asarray(estimates)
    used = num_subsets * m
    se2 = 4 * np.mean(var_a) / min(n1, used) + 4 * np.mean(var_b) / min(n2, used)
    if num_subsets > 1:
        se2 += est.var(ddof=1) / num_subsets
    return float(est.mean()), math.sqrt(se2)
