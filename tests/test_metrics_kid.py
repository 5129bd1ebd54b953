"""KID against a pair-by-pair reference and a closed form, its unbiasedness and standard error, the
features RunningStats keeps (and caches) for it, and its place beside FID."""

import numpy as np
import pytest
import torch

from perceptual_diffusion.metrics import (RunningStats, cached_statistics, kernel_inception_distance,
                                          polynomial_mmd2, real_vs_real_floor)
from perceptual_diffusion.metrics import kid as kid_module
from perceptual_diffusion.metrics.fid import fid_and_inception_score


def _pairwise_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 under k(a, b) = (a.b / d + 1)^3, one pair at a time."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def _shift_mmd2(delta: float, d: int) -> float:
    """MMD^2 between N(delta e1, I_d) and N(0, I_d) under the cubic kernel, in closed form.

    k = sum_p C(3, p) (x.y / d)^p and (x.y)^p = <x^(x)p, y^(x)p>, so MMD^2 = sum_{p=1..3}
    C(3, p) d^-p ||E x^(x)p - E y^(x)p||^2 with the Gaussian moments E x = mu,
    E x x^T = I + mu mu^T, E[x_i x_j x_k] = mu_i mu_j mu_k + mu_i I_jk + mu_j I_ik + mu_k I_ij.
    For mu = delta e1 the third moment differs by delta^3 + 3 delta at (1,1,1) and by delta at
    the 3 (d - 1) entries (1,j,j), (j,1,j), (j,j,1).
    """
    p1, p2 = delta ** 2, delta ** 4
    p3 = (delta ** 3 + 3 * delta) ** 2 + 3 * (d - 1) * delta ** 2
    return 3 * p1 / d + 3 * p2 / d ** 2 + p3 / d ** 3


def _gauss(n: int, d: int, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    x = rng.normal(size=(n, d))
    x[:, 0] += shift
    return x


def test_mmd2_matches_the_pair_by_pair_reference():
    rng = np.random.default_rng(0)
    x, y = _gauss(7, 3, rng, 0.7), _gauss(9, 3, rng)
    assert polynomial_mmd2(x, y) == pytest.approx(_pairwise_mmd2(x, y), rel=1e-12)
    # Equal sizes no larger than a subset: one subset, the whole sets, the same number.
    y7 = y[:7]
    assert kernel_inception_distance(x, y7)[0] == pytest.approx(_pairwise_mmd2(x, y7), rel=1e-12)


def test_closed_form_of_the_shift_holds_in_one_dimension():
    # d = 1: MMD^2 = 3 (m1 - m1')^2 + 3 (m2 - m2')^2 + (m3 - m3')^2 with raw moments m_p.
    delta = 0.8
    moments = (delta, 1 + delta ** 2, delta ** 3 + 3 * delta)
    expected = 3 * (moments[0]) ** 2 + 3 * (moments[1] - 1) ** 2 + (moments[2]) ** 2
    assert _shift_mmd2(delta, 1) == pytest.approx(expected, rel=1e-14)


def test_kid_of_a_gaussian_shift_is_the_closed_form_within_its_standard_error():
    rng = np.random.default_rng(1)
    d, delta = 4, 1.0
    x, y = _gauss(2000, d, rng, delta), _gauss(2000, d, rng)
    kid, se = kernel_inception_distance(x, y)   # 2000 rows: the complete statistic
    truth = _shift_mmd2(delta, d)   # 1.328125
    assert abs(kid - truth) < 4 * se and se < 0.1 * truth


def test_subsets_estimate_the_same_as_the_complete_statistic(monkeypatch):
    rng = np.random.default_rng(7)
    x, y = _gauss(1200, 4, rng, 1.0), _gauss(1500, 4, rng)
    complete, se = kernel_inception_distance(x, y)
    monkeypatch.setattr(kid_module, "COMPLETE_MAX_ENTRIES", 0)
    subsets, sub_se = kernel_inception_distance(x, y, num_subsets=20, subset_size=300)
    assert abs(subsets - _shift_mmd2(1.0, 4)) < 4 * sub_se
    assert abs(subsets - complete) < 2 * sub_se and se < sub_se < 2 * se


def test_subset_standard_error_matches_the_spread_over_fresh_draws(monkeypatch):
    monkeypatch.setattr(kid_module, "COMPLETE_MAX_ENTRIES", 0)
    rng = np.random.default_rng(4)
    draws = [kernel_inception_distance(_gauss(500, 8, rng, 0.7), _gauss(500, 8, rng), num_subsets=20,
                                       subset_size=150) for _ in range(60)]
    values, ses = np.array([v for v, _ in draws]), np.array([s for _, s in draws])
    assert 0.7 < values.std(ddof=1) / ses.mean() < 1.33


def test_kid_is_unbiased_and_can_be_negative():
    rng = np.random.default_rng(2)
    values = np.array([kernel_inception_distance(_gauss(40, 8, rng), _gauss(40, 8, rng))[0]
                       for _ in range(300)])
    assert abs(values.mean()) < 3 * values.std(ddof=1) / np.sqrt(len(values))
    assert (values < 0).mean() > 0.2


def test_kid_standard_error_matches_the_spread_over_fresh_draws():
    rng = np.random.default_rng(3)
    draws = [kernel_inception_distance(_gauss(200, 8, rng, 0.7), _gauss(200, 8, rng))
             for _ in range(100)]
    values, ses = np.array([v for v, _ in draws]), np.array([s for _, s in draws])
    assert 0.75 < values.std(ddof=1) / ses.mean() < 1.33


def test_kid_is_symmetric_and_deterministic_given_the_seed(monkeypatch):
    rng = np.random.default_rng(4)
    x, y = _gauss(60, 5, rng, 0.5), _gauss(60, 5, rng)
    assert kernel_inception_distance(x, y) == pytest.approx(kernel_inception_distance(y, x), rel=1e-12)
    assert polynomial_mmd2(x, y) == pytest.approx(polynomial_mmd2(y, x), rel=1e-12)
    monkeypatch.setattr(kid_module, "COMPLETE_MAX_ENTRIES", 0)   # subsets: the seed decides which
    big = _gauss(150, 5, rng)
    a = kernel_inception_distance(x, big, num_subsets=10, seed=3)
    assert a == kernel_inception_distance(x, big, num_subsets=10, seed=3)
    assert a[0] != kernel_inception_distance(x, big, num_subsets=10, seed=4)[0]
    b = kernel_inception_distance(big, x, num_subsets=10, seed=3)
    assert abs(a[0] - b[0]) < 2 * (a[1] + b[1])


def test_disjoint_halves_of_one_pool_have_kid_near_zero_and_a_floor():
    pool = _gauss(2000, 16, np.random.default_rng(5))
    kid, se = kernel_inception_distance(pool[:1000], pool[1000:])
    assert abs(kid) < 4 * se
    floor = real_vs_real_floor(lambda a, b: kernel_inception_distance(a, b)[0], pool, n=500, splits=6)
    mean, std = floor["value"]
    assert std > 0 and abs(mean) < 3 * std
    # a real shift stands far above the floor
    shifted = _gauss(500, 16, np.random.default_rng(6), 1.0)
    assert kernel_inception_distance(shifted, pool[:500])[0] > mean + 10 * std


@pytest.mark.parametrize("args, message", [
    ((np.zeros(5), np.zeros((5, 2))), "features1 must be features"),
    ((np.zeros((5, 2)), np.zeros((1, 2))), "features2 must be features"),
    ((np.zeros((5, 2)), np.zeros((5, 3))), "same dim"),
])
def test_kid_rejects_bad_features(args, message):
    with pytest.raises(ValueError, match=message):
        kernel_inception_distance(*args)


def test_kid_rejects_bad_subsets():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="num_subsets"):
        kernel_inception_distance(x, x, num_subsets=0)
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(x, x, subset_size=1)


# ---------------------------------------------------------------- features kept for KID


def test_running_stats_keep_the_first_features_and_cache_them(tmp_path):
    x = torch.randn(10, 3, dtype=torch.float64)
    stats = RunningStats(3, "k", keep_features=5).update(x[:3]).update(x[3:])
    assert stats.count == 10 and stats.num_features == 5
    assert torch.equal(stats.features, x[:5].float())
    everything = RunningStats(3, keep_features=True).update(x[:4]).update(x[4:])
    assert torch.equal(everything.features, x.float())
    stats.save(tmp_path / "s.safetensors")
    back = RunningStats.load(tmp_path / "s.safetensors", "k")
    assert back.num_features == 5 and torch.equal(back.features, stats.features)
    assert torch.equal(back.cov, stats.cov)
    with pytest.raises(ValueError, match="keep_features=True"):
        RunningStats(3).update(x).features
    with pytest.raises(ValueError, match="keep_features"):
        RunningStats(3, keep_features=-1)


class _Linear:
    dim = 4

    def __init__(self):
        self.w = torch.randn(2 * 3 * 3, self.dim, generator=torch.Generator().manual_seed(5))

    def features(self, x):
        return x.flatten(1) @ self.w


def test_a_cache_without_features_is_recomputed_when_kid_needs_them(tmp_path):
    net, images = _Linear(), torch.rand(12, 2, 3, 3)
    made = []

    def make_batches():
        made.append(1)
        return images.split(5)

    path = tmp_path / "ref.safetensors"
    old = cached_statistics(path, "set", make_batches, net)   # as written before KID
    assert old.num_features == 0
    new = cached_statistics(path, "set", make_batches, net, keep_features=True)
    assert len(made) == 2 and new.features.shape == (12, 4)
    again = cached_statistics(path, "set", make_batches, net, keep_features=100)
    assert len(made) == 2 and torch.equal(again.features, new.features)
    assert cached_statistics(path, "set", make_batches, net).num_features == 12 and len(made) == 2


class _TinyInception(torch.nn.Module):
    """The parts of InceptionV3FID that fid_and_inception_score uses."""

    dim = 6

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(12, self.dim, generator=g)
        self.fc = torch.nn.Linear(self.dim, 1008)

    def features(self, x):
        return x.flatten(1) @ self.w


def test_fid_and_inception_score_adds_kid_when_the_reference_kept_features():
    net = _TinyInception()
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(40, 3, 2, 2, generator=g), torch.rand(30, 3, 2, 2, generator=g) * 2
    plain = RunningStats(net.dim).update(net.features(real))
    kept = RunningStats(net.dim, keep_features=True).update(net.features(real))
    without = fid_and_inception_score(net, fake.split(8), plain)
    with_kid = fid_and_inception_score(net, fake.split(8), kept)
    assert set(without) == {"fid", "is", "is_std"}
    assert {k: with_kid[k] for k in without} == without   # FID and IS unchanged
    expected = kernel_inception_distance(net.features(fake).float(), net.features(real).float())
    assert (with_kid["kid"], with_kid["kid_se"]) == pytest.approx(expected, rel=1e-5)
    assert with_kid["kid"] > 2 * with_kid["kid_se"]   # uniform on [0, 2] against [0, 1]
