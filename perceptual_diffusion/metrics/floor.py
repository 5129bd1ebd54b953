"""The real-versus-real floor of a metric: its value between two disjoint sets of real data of the
sample count a table uses, over a few random splits, to report beside the model rows, so that a
difference between models can be read against the metric's own noise at that n.

    floor = real_vs_real_floor(spectrum_metrics, real_images, n=1000)
    # {"spectrum_hf_ratio": (mean, std), "spectrum_log_ratio_0": (mean, std), ...}
    kid = real_vs_real_floor(lambda a, b: kernel_inception_distance(a, b)[0], real_features, n=300)
    # {"value": (mean, std)}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["real_vs_real_floor"]


def real_vs_real_floor(metric: Callable[[Tensor, Tensor], float | Mapping[str, float]],
                       pool: Tensor | np.ndarray, n: int, *, splits: int = 5, seed: int = 0
                       ) -> dict[str, tuple[float, float]]:
    """`metric(a, b)` of two disjoint sets a, b of `n` items of `pool` [M x ...] (M >= 2 n), over
    `splits` random splits: (mean, std with ddof 1) per key of the metric's dict (a metric that
    returns a number is reported under "value"). Deterministic given `seed`."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if splits < 2:
        raise ValueError(f"splits must be >= 2 for a spread, got {splits}")
    total = len(pool)
    if total < 2 * n:
        raise ValueError(f"pool holds {total} items; two disjoint sets of n={n} need {2 * n}")
    g = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {}
    for _ in range(splits):
        perm = torch.randperm(total, generator=g)
        if isinstance(pool, np.ndarray):
            perm = perm.numpy()
        out = metric(pool[perm[:n]], pool[perm[n:2 * n]])
        for key, v in (out.items() if isinstance(out, Mapping) else [("value", out)]):
            values.setdefault(key, []).append(float(v))
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1))) for k, v in values.items()}
