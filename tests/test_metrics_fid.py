"""FID / IS against closed forms, streaming statistics and their cache, and the FID Inception-v3
architecture (random weights: the published ones are never downloaded in tests)."""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perceptual_diffusion.metrics import (
    FID_WEIGHTS_FILE,
    FeatureNetwork,
    InceptionV3FID,
    RunningStats,
    cached_statistics,
    compute_statistics,
    frechet_distance,
    inception_score,
    load_fid_inception,
    sqrtm_trace,
)


def _random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


def _random_spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# ---------------------------------------------------------------- Fréchet distance


def test_fid_of_diagonal_gaussians_is_closed_form():
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = (torch.randn(16, generator=gen, dtype=torch.float64) for _ in range(2))
    a, b = (torch.rand(16, generator=gen, dtype=torch.float64) * 5 for _ in range(2))
    a[0] = 0.0   # a degenerate direction is fine
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_of_commuting_full_covariances_is_closed_form():
    gen = torch.Generator().manual_seed(1)
    q = _random_orthogonal(12, gen)
    a = torch.rand(12, generator=gen, dtype=torch.float64) * 3
    b = torch.rand(12, generator=gen, dtype=torch.float64) * 3
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T   # same eigenvectors: commute
    mu1 = torch.zeros(12, dtype=torch.float64)
    mu2 = torch.full((12,), 0.5, dtype=torch.float64)
    expected = 12 * 0.25 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # S1 = S2: the trace term vanishes, only the mean term is left.
    assert frechet_distance(mu1, s1, mu2, s1) == pytest.approx(3.0, rel=1e-9)


def test_sqrtm_trace_of_non_commuting_2x2_is_closed_form():
    # For 2x2 PSD S1, S2 the eigenvalues l1, l2 of S1 S2 are >= 0 and
    # sqrt(l1) + sqrt(l2) = sqrt(Tr(S1 S2) + 2 sqrt(det S1 det S2)).
    s1 = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.5, -0.2], [-0.2, 3.0]], dtype=torch.float64)
    expected = math.sqrt(float(torch.trace(s1 @ s2))
                         + 2 * math.sqrt(float(torch.det(s1) * torch.det(s2))))
    assert sqrtm_trace(s1, s2) == pytest.approx(expected, rel=1e-12)
    mu = torch.zeros(2)
    fid = frechet_distance(mu, s1, mu, s2)
    assert fid == pytest.approx(float(torch.trace(s1 + s2)) - 2 * expected, rel=1e-10)


@pytest.mark.parametrize("n", [40, 300])   # fewer samples than dims: singular covariance
def test_fid_of_a_feature_set_with_itself_is_zero(n):
    x = np.random.default_rng(2).normal(size=(n, 64)) * 3 + 1
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-6


def test_fid_is_symmetric_and_positive():
    gen = torch.Generator().manual_seed(3)
    mu1, mu2 = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    s1, s2 = _random_spd(32, gen), _random_spd(32, gen)
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert d12 > 0
    assert d12 == pytest.approx(d21, rel=1e-9)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


def test_sqrtm_trace_matches_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(4)
    s1, s2 = _random_spd(48, gen), _random_spd(48, gen)
    expected = float(np.trace(linalg.sqrtm(s1.numpy() @ s2.numpy())).real)
    assert sqrtm_trace(s1, s2) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- streaming statistics


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), dim=st.integers(1, 6), offset=st.sampled_from([0.0, 1e4]),
       cuts=st.lists(st.integers(0, 60), max_size=6), seed=st.integers(0, 2**16))
def test_running_stats_match_numpy_whatever_the_batching(n, dim, offset, cuts, seed):
    x = np.random.default_rng(seed).normal(size=(n, dim)) + offset
    bounds = sorted({0, n, *(c for c in cuts if c <= n)})
    stats = RunningStats(dim)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        stats.update(torch.from_numpy(x[lo:hi]).float() if offset == 0 else x[lo:hi])
    tol = 1e-6 if offset == 0 else 1e-9   # float32 batches round the inputs
    assert stats.count == n
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=tol, atol=tol)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(x, rowvar=False).reshape(dim, dim),
                               rtol=1e-5, atol=tol * 10)


def test_running_stats_reject_bad_input():
    stats = RunningStats(3)
    with pytest.raises(ValueError, match="empty"):
        stats.mean
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        stats.update(torch.zeros(4, 2))
    stats.update(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        stats.cov


def test_stats_cache_round_trip_and_key_mismatch(tmp_path):
    x = torch.randn(50, 5, dtype=torch.float64)
    stats = RunningStats(5, key="digits/lenet").update(x[:20]).update(x[20:])
    path = tmp_path / "sub" / "ref.safetensors"
    stats.save(path)
    assert os.listdir(path.parent) == ["ref.safetensors"]   # no temporary left behind
    back = RunningStats.load(path, "digits/lenet")
    assert back.count == 50 and back.key == "digits/lenet"
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.cov, stats.cov)
    back.update(x)   # a loaded file can keep accumulating
    np.testing.assert_allclose(back.cov.numpy(), np.cov(torch.cat([x, x]).numpy(), rowvar=False))
    with pytest.raises(ValueError, match="digits/lenet.*circles/inception"):
        RunningStats.load(path, "circles/inception")


class _LinearFeatures:
    """A FeatureNetwork: a fixed random projection of the flattened image."""

    dim = 4

    def __init__(self):
        self.w = torch.randn(2 * 3 * 3, self.dim, generator=torch.Generator().manual_seed(5))
        self.calls = 0

    def features(self, x):
        self.calls += 1
        return x.flatten(1) @ self.w


def test_compute_statistics_streams_batches_and_dicts():
    net = _LinearFeatures()
    assert isinstance(net, FeatureNetwork)
    images = torch.rand(30, 2, 3, 3) * 2 - 1
    batches = [images[:7], {"x": images[7:20]}, images[20:]]
    stats = compute_statistics(net, iter(batches), key="k", progress=True)
    feats = (images.flatten(1) @ net.w).double().numpy()
    assert stats.count == 30 and net.calls == 3 and stats.key == "k"
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(feats, rowvar=False), rtol=1e-5)


def test_cached_statistics_computes_once(tmp_path):
    net, images = _LinearFeatures(), torch.rand(12, 2, 3, 3)
    made = []

    def make_batches():
        made.append(1)
        return images.split(5)

    path = tmp_path / "ref.safetensors"
    first = cached_statistics(path, "set-a", make_batches, net)
    second = cached_statistics(path, "set-a", make_batches, net)
    assert len(made) == 1 and net.calls == 3
    assert torch.equal(first.cov, second.cov) and second.count == 12
    with pytest.raises(ValueError, match="set-a"):
        cached_statistics(path, "set-b", make_batches, net)
    third = cached_statistics(path, "set-b", make_batches, net, overwrite=True)
    assert len(made) == 2 and RunningStats.load(path, None).key == "set-b" == third.key


# ---------------------------------------------------------------- Inception Score


def test_is_of_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(100, 7), splits=5)   # logits -> uniform
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = inception_score(np.full((20, 4), 0.25), splits=2)  # probabilities
    assert mean == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 10, 100])
def test_is_of_one_hot_predictions_over_k_equally_used_classes_is_k(k):
    labels = torch.arange(k * 10) % k                    # every split holds each class once
    probs = torch.nn.functional.one_hot(labels, k).double()
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    mean, _ = inception_score(probs * 200.0, splits=10, kind="logits")   # near one-hot softmax
    assert mean == pytest.approx(k, rel=1e-6)


def test_is_of_two_classes_with_known_mixture():
    # Half the samples certain of class 0, half split 50/50: p(y) = (3/4, 1/4);
    # KL = 1/2 log(4/3) + 1/2 (1/2 log(2/3) + 1/2 log 2).
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).repeat(8, 1)
    kl = 0.5 * math.log(4 / 3) + 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    mean, _ = inception_score(probs, splits=4)
    assert mean == pytest.approx(math.exp(kl), rel=1e-12)


def test_is_rejects_bad_splits():
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(5, 3), splits=10)


# ---------------------------------------------------------------- FID Inception-v3

# Names and shapes of the published pt_inception-2015-12-05 state dict (pytorch-fid).
_EXPECTED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2b.bn.running_var": (384,),
    "Mixed_7c.branch3x3dbl_3a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return InceptionV3FID()


def test_inception_state_dict_names_shapes_and_size(inception):
    sd = inception.state_dict()
    for name, shape in _EXPECTED_SHAPES.items():
        assert tuple(sd[name].shape) == shape, name
    assert not any(k.startswith("AuxLogits") for k in sd)
    # torchvision's inception_v3 (27,161,264) minus AuxLogits (3,326,696) plus 8 more classes.
    assert sum(p.numel() for p in inception.parameters()) == 23_850_960
    running = sum(v.numel() for k, v in sd.items() if "running" in k)
    assert sum(p.numel() for p in inception.parameters()) + running == 23_885_392
    assert not inception.training and not any(p.requires_grad for p in inception.parameters())


def test_inception_outputs_for_gray_and_rgb_32x32(inception):
    gray = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    feats = inception.features(gray)
    logits = inception.logits(gray.repeat(1, 3, 1, 1), bias=True)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert (feats >= 0).all() and feats.abs().sum() > 0   # pooled ReLU outputs
    # Gray is the same image in 3 channels, and the logits are the fc layer on pool3.
    torch.testing.assert_close(logits, inception.fc(feats), rtol=1e-4, atol=1e-6)
    assert feats[0].ne(feats[1]).any()


def test_inception_rejects_wrong_channels(inception):
    with pytest.raises(ValueError, match="1\\|3"):
        inception.features(torch.zeros(1, 2, 8, 8))


def test_saved_state_dict_reloads_strictly_and_is_found(inception, tmp_path, monkeypatch):
    weights = tmp_path / FID_WEIGHTS_FILE
    torch.save({k: v for k, v in inception.state_dict().items()
                if not k.endswith("num_batches_tracked")}, weights)   # as the published file
    loaded = InceptionV3FID.from_file(weights)
    for k, v in inception.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("PERCEPTUAL_DIFFUSION_WEIGHTS", str(tmp_path))
    found = load_fid_inception()
    assert torch.equal(found.fc.weight, inception.fc.weight)
    monkeypatch.delenv("PERCEPTUAL_DIFFUSION_WEIGHTS")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    os.replace(weights, tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_FILE)
    assert torch.equal(load_fid_inception().fc.bias, inception.fc.bias)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, bad)
    with pytest.raises(RuntimeError, match="Missing key"):
        InceptionV3FID.from_file(bad)


def test_missing_weights_raise_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("PERCEPTUAL_DIFFUSION_WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(FileNotFoundError) as err:
        load_fid_inception()
    msg = str(err.value)
    assert FID_WEIGHTS_FILE == "pt_inception-2015-12-05-6726825d.pth"
    assert FID_WEIGHTS_FILE in msg and "\n" not in msg
    assert str(tmp_path / "weights") in msg and str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_fid_inception(tmp_path / "nowhere.pth")


def _random_fid_state(reference: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A seeded state dict with pytorch-fid's names (as the published file: no batch counters):
    He-scaled conv weights and random BatchNorm affine parameters and running statistics, so
    every block contributes and activations stay of order one through the 94 convolutions."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, v in reference.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = v[0].numel()
            new = torch.randn(v.shape, generator=g, dtype=torch.float64) * math.sqrt(2 / fan_in)
        elif name.endswith("running_var"):
            new = 0.5 + torch.rand(v.shape, generator=g, dtype=torch.float64)
        elif name.endswith("bn.weight"):
            new = 1 + 0.2 * torch.randn(v.shape, generator=g, dtype=torch.float64)
        else:  # bn.bias, running_mean, fc.bias
            new = 0.2 * torch.randn(v.shape, generator=g, dtype=torch.float64)
        state[name] = new.to(v.dtype)
    return state


def test_inception_on_torchvision_blocks_equals_the_hand_written_oracle(inception, tmp_path):
    """The network built on torchvision's Inception3 computes exactly what the former plain-torch
    network (kept in tests/fid_inception_oracle.py) computes, weight for weight."""
    from fid_inception_oracle import InceptionV3FID as Oracle

    torch.manual_seed(1)
    oracle = Oracle()
    ours, theirs = inception.state_dict(), oracle.state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert sum(p.numel() for p in inception.parameters()) == \
        sum(p.numel() for p in oracle.parameters()) == 23_850_960

    # Loaded the way the published file is: strict, through from_file.
    weights = tmp_path / FID_WEIGHTS_FILE
    torch.save(_random_fid_state(oracle, seed=7), weights)
    net, ref = InceptionV3FID.from_file(weights), Oracle.from_file(weights)
    assert not net.training and not ref.training
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 299, 299, generator=g) * 2 - 1  # the network's own size
    want = ref.features(x)
    assert want.std() > 0.1  # the random weights make a non-degenerate network
    torch.testing.assert_close(net.features(x), want, rtol=1e-5, atol=1e-5)
    x = torch.rand(1, 1, 37, 52, generator=g) * 2 - 1  # gray, through the bilinear resize
    feats = net.features(x)
    assert feats.shape == (1, 2048) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, ref.features(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.logits(x, bias=True), ref.logits(x, bias=True),
                               rtol=1e-5, atol=1e-5)
