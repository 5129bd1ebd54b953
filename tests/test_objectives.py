"""VelocityMSE and SelfPerceptual: closed forms, Algorithm 1 as an oracle, degeneracy, gradients."""

import pytest
import torch
from helpers import TinyConvDenoiser
from hypothesis import given, settings
from hypothesis import strategies as st

from perceptual_diffusion import NoiseSchedule, SelfPerceptual, VelocityMSE, make_perceptual
from perceptual_diffusion.denoiser import resolve_layers

SCHEDULE = NoiseSchedule.scaled_linear(zero_terminal_snr=True)
SHAPES = {1: (3, 2, 16), 2: (3, 2, 8, 8), 3: (3, 2, 4, 6, 6)}


def _nets(dims=2, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    online = TinyConvDenoiser(dims, **kw).to(dtype)
    frozen = make_perceptual(online)
    with torch.no_grad():  # the online net has moved on from its frozen copy
        for p in online.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return online, frozen


def _algorithm1(frozen, online, x0, cond, t, tt, eps, layers, distance="mse", formulation="sp"):
    """The paper's Algorithm 1 written out with explicit coefficients and full forwards."""
    ab = SCHEDULE.alphas_cumprod.to(x0.dtype)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a, s = ab[t].sqrt().reshape(shape), (1 - ab[t]).sqrt().reshape(shape)
    a2, s2 = ab[tt].sqrt().reshape(shape), (1 - ab[tt]).sqrt().reshape(shape)
    x_t = a * x0 + s * eps
    v = online(x_t, t, cond)
    x0_pred, eps_pred = a * x_t - s * v, a * v + s * x_t
    x_tt = a2 * x0 + s2 * eps
    inputs = [a2 * x0_pred + s2 * eps_pred] if formulation == "sp" else [a2 * x0_pred + s2 * eps, a2 * x0 + s2 * eps_pred]
    real = frozen.forward_features(x_tt, tt, cond, layers=layers, stop_early=False)
    total = 0
    for inp in inputs:
        pred = frozen.forward_features(inp, tt, cond, layers=layers, stop_early=False)
        for k in real:
            d = pred[k] - real[k]
            total = total + (d.square() if distance == "mse" else d.abs()).flatten(1).mean(1)
    return total


@pytest.mark.parametrize("formulation", ["sp", "sp2"])
@pytest.mark.parametrize("distance", ["mse", "mae"])
@pytest.mark.parametrize("layers", ["mid", "encoder", "decoder", "encoder+mid"])
def test_sp_matches_algorithm1(formulation, distance, layers):
    online, frozen = _nets(dtype=torch.float64, num_classes=3)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(SHAPES[2], generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPES[2], generator=g, dtype=torch.float64)
    t, tt = torch.tensor([0, 500, 999]), torch.tensor([999, 3, 640])
    cond = torch.tensor([0, 2, 1])
    sp = SelfPerceptual(SCHEDULE, frozen, layers=layers, distance=distance, formulation=formulation)
    got = sp(online, x0, cond, t=t, t_prime=tt, noise=eps)
    want = _algorithm1(frozen, online, x0, cond, t, tt, eps, layers, distance, formulation)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    assert bool((got > 0).all())


_NETS = {}


@settings(max_examples=25, deadline=None)
@given(t=st.lists(st.integers(0, 999), min_size=2, max_size=4), seed=st.integers(0, 2**16), dims=st.sampled_from([1, 2, 3]))
def test_sp_is_exactly_zero_at_t_prime_equal_t(t, seed, dims):
    """Eq. 13: forward(x0_hat, eps_hat, t) == x_t for any network output, so L_sp == 0 and the
    online net receives no gradient, bit for bit."""
    if dims not in _NETS:
        _NETS[dims] = _nets(dims)
    online, frozen = _NETS[dims]
    online.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    shape = (len(t),) + SHAPES[dims][1:]
    x0 = torch.randn(shape, generator=g)
    t = torch.tensor(t)
    loss = SelfPerceptual(SCHEDULE, frozen, layers="all")(online, x0, t=t, t_prime=t, generator=g)
    assert bool((loss == 0).all())
    loss.sum().backward()
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in online.parameters())


def test_sp2_has_gradient_at_t_prime_equal_t():
    online, frozen = _nets()
    x0 = torch.randn(SHAPES[2])
    t = torch.tensor([10, 400, 900])
    loss = SelfPerceptual(SCHEDULE, frozen, formulation="sp2")(online, x0, t=t, t_prime=t)
    assert bool((loss > 0).all())
    loss.sum().backward()
    assert online.enc_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gradients_reach_online_net_but_not_frozen_params(dims):
    online, frozen = _nets(dims)
    seen = []
    original = frozen.forward_features

    def spy(x, t, cond=None, **kw):
        seen.append((torch.is_grad_enabled(), x.requires_grad))
        return original(x, t, cond, **kw)

    frozen.forward_features = spy
    sp = SelfPerceptual(SCHEDULE, frozen)
    loss = sp(online, torch.randn(SHAPES[dims]))
    assert loss.shape == (SHAPES[dims][0],)
    loss.mean().backward()
    # ground-truth branch without a graph, predicted branch with one through the frozen net
    assert seen == [(False, False), (True, True)]
    grads = [p.grad for p in online.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())


def test_mse_weight_adds_velocity_mse_from_the_same_forward():
    online, frozen = _nets()
    calls = []
    online.register_forward_hook(lambda *a: calls.append(1))
    x0, eps = torch.randn(SHAPES[2]), torch.randn(SHAPES[2])
    t, tt = torch.tensor([5, 50, 500]), torch.tensor([700, 70, 7])
    plain = SelfPerceptual(SCHEDULE, frozen)(online, x0, t=t, t_prime=tt, noise=eps)
    mse = VelocityMSE(SCHEDULE)(online, x0, t=t, noise=eps)
    calls.clear()
    mixed = SelfPerceptual(SCHEDULE, frozen, mse_weight=0.25)(online, x0, t=t, t_prime=tt, noise=eps)
    assert len(calls) == 1
    torch.testing.assert_close(mixed, plain + 0.25 * mse)


def test_velocity_mse_closed_form():
    x0, eps = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    t = torch.tensor([0, 1, 500, 999])
    v = SCHEDULE.velocity(x0, eps, t)
    mse = VelocityMSE(SCHEDULE)
    zero_net = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    torch.testing.assert_close(mse(zero_net, x0, t=t, noise=eps), v.square().mean((1, 2)))
    perfect = lambda x, t_, c: v  # noqa: E731
    assert bool((mse(perfect, x0, t=t, noise=eps) == 0).all())
    # at the zero-SNR end, v = -x0: the model must predict the data from pure noise
    torch.testing.assert_close(v[3], -x0[3])


def test_t_prime_distributions():
    _, frozen = _nets()
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (20000,), generator=g)
    uni = SelfPerceptual(SCHEDULE, frozen).sample_t_prime(t, g)
    assert uni.min() == 0 and uni.max() == 999 and abs(uni.float().mean() - 499.5) < 10

    near = SelfPerceptual(SCHEDULE, frozen, t_prime="near").sample_t_prime(t, g)
    inside = (t >= 40) & (t <= 959)
    assert bool(((near - t).abs()[inside] == 40).all())
    assert bool((near == (t + 40).clamp(max=999))[t > 959].logical_or(near[t > 959] == t[t > 959] - 40).all())
    assert 0.45 < float((near > t)[inside].float().mean()) < 0.55
    assert near.min() >= 0 and near.max() <= 999

    t_mid = torch.full((20000,), 500)
    normal = SelfPerceptual(SCHEDULE, frozen, t_prime="normal").sample_t_prime(t_mid, g)
    assert abs(normal.float().mean() - 500) < 3 and abs(normal.float().std() - 100) < 3
    edge = SelfPerceptual(SCHEDULE, frozen, t_prime="normal").sample_t_prime(torch.zeros(1000, dtype=torch.long), g)
    assert edge.min() == 0 and float((edge == 0).float().mean()) > 0.45


def test_bf16_perceptual_copy_trains_fp32_online_net():
    online, _ = _nets()
    frozen = make_perceptual(online, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in frozen.parameters())
    loss = SelfPerceptual(SCHEDULE, frozen)(online, torch.randn(SHAPES[2]))
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    assert online.enc_in.weight.grad.dtype == torch.float32 and online.enc_in.weight.grad.abs().sum() > 0


def test_make_perceptual_copies_and_freezes():
    net = TinyConvDenoiser().train()
    frozen = make_perceptual(net)
    assert not frozen.training and all(not p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in net.parameters()) and net.training
    with torch.no_grad():
        net.mid.weight.add_(1.0)
    assert not torch.equal(net.mid.weight, frozen.mid.weight)


def test_rejects_bad_options_and_trainable_perceptual():
    net, frozen = _nets()
    with pytest.raises(ValueError, match="freeze"):
        SelfPerceptual(SCHEDULE, net)
    with pytest.raises(ValueError, match="t_prime"):
        SelfPerceptual(SCHEDULE, frozen, t_prime="gaussian")
    with pytest.raises(ValueError, match="distance"):
        SelfPerceptual(SCHEDULE, frozen, distance="l2")
    with pytest.raises(ValueError, match="formulation"):
        SelfPerceptual(SCHEDULE, frozen, formulation="sp3")
    with pytest.raises(ValueError, match="unknown feature layer.*'middle'"):
        SelfPerceptual(SCHEDULE, frozen, layers="middle")
    with pytest.raises(ValueError, match="mse_weight"):
        SelfPerceptual(SCHEDULE, frozen, mse_weight=-1)


def test_layer_groups_resolve_in_execution_order():
    taps = TinyConvDenoiser.feature_layers
    assert resolve_layers("mid", taps) == ("mid",)
    assert resolve_layers("encoder", taps) == ("down.0", "down.1")
    assert resolve_layers("decoder", taps) == ("up.0", "up.1")
    assert resolve_layers("encoder+mid", taps) == ("down.0", "down.1", "mid")
    assert resolve_layers(["up.1", "down.0"], taps) == ("down.0", "up.1")


def test_objectives_are_reproducible_with_a_generator():
    online, frozen = _nets()
    x0 = torch.randn(SHAPES[2])
    sp = SelfPerceptual(SCHEDULE, frozen)
    a = sp(online, x0, generator=torch.Generator().manual_seed(3))
    b = sp(online, x0, generator=torch.Generator().manual_seed(3))
    c = sp(online, x0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
