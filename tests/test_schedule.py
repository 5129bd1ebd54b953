"""NoiseSchedule: zero terminal SNR, the forward-process identities (eq. 2, 3, 8, 9, 13),
dtype/shape handling, inference timesteps, and diffusers' DDIMScheduler as an oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from perceptual_diffusion.schedule import SPACINGS, NoiseSchedule

T = 1000
SD = dict(beta_start=0.00085, beta_end=0.012)
SCHEDULES = {
    "linear": NoiseSchedule.linear(T),
    "linear_zsnr": NoiseSchedule.linear(T, zero_terminal_snr=True),
    "scaled_linear_zsnr": NoiseSchedule.scaled_linear(T, **SD, zero_terminal_snr=True),
    "cosine": NoiseSchedule.cosine(T),
    "cosine_zsnr": NoiseSchedule.cosine(T, zero_terminal_snr=True),
}
ZSNR_MAKERS = {
    "linear": lambda z: NoiseSchedule.linear(T, zero_terminal_snr=z),
    "scaled_linear": lambda z: NoiseSchedule.scaled_linear(T, **SD, zero_terminal_snr=z),
    "cosine": lambda z: NoiseSchedule.cosine(T, zero_terminal_snr=z),
}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
PROPERTY = settings(max_examples=30, deadline=None)


# ------------------------------------------------------------------ zero terminal SNR
@pytest.mark.parametrize("name", ZSNR_MAKERS)
def test_zero_terminal_snr(name):
    s, plain = ZSNR_MAKERS[name](True), ZSNR_MAKERS[name](False)
    ab = s.alphas_cumprod
    assert ab.dtype == torch.float64 and ab.shape == (T,)
    assert ab[-1].item() == 0.0
    assert plain.alphas_cumprod[-1].item() > 0.0
    assert bool((ab[1:] < ab[:-1]).all()), "alpha_bar must be strictly decreasing"
    assert abs(ab[0].item() - plain.alphas_cumprod[0].item()) <= 1e-12
    assert bool(((s.betas > 0) & (s.betas <= 1)).all())
    assert s.betas[-1].item() == 1.0
    # the betas describe the same alpha_bar
    torch.testing.assert_close(torch.cumprod(1 - s.betas, 0), ab, rtol=0, atol=1e-12)
    assert s.snr()[-1].item() == 0.0 and bool(torch.isfinite(s.snr()).all())


# ------------------------------------------------------------------ property tests
@st.composite
def batches(draw):
    """(schedule name, shape of rank 3-5, per-sample t with the ends over-represented, seed)."""
    rank = draw(st.integers(3, 5))
    n = draw(st.integers(1, 4))
    shape = (n, *draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1)))
    t = draw(st.lists(st.one_of(st.just(T - 1), st.just(0), st.integers(0, T - 1)), min_size=n, max_size=n))
    return draw(st.sampled_from(sorted(SCHEDULES))), shape, t, draw(st.integers(0, 2**31 - 1))


def _randn(shape, seed, dtype, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


@PROPERTY
@given(batches(), st.sampled_from([torch.float64, torch.float32]))
@example(("scaled_linear_zsnr", (3, 2, 4, 4), [T - 1, 0, 500], 0), torch.float64)
@example(("cosine_zsnr", (2, 1, 2, 3, 3), [T - 1, T - 1], 1), torch.float32)
def test_round_trip_v_parametrisation(case, dtype):
    """x0_from_v(x_t, v, t) == x0 and eps_from_v(x_t, v, t) == eps, for every t incl. T-1."""
    name, shape, t, seed = case
    s, t = SCHEDULES[name], torch.tensor(t)
    x0, eps = _randn(shape, seed, dtype)
    x_t, v = s.add_noise(x0, eps, t), s.velocity(x0, eps, t)
    assert x_t.dtype == v.dtype == dtype and x_t.shape == v.shape == shape
    tol = TOL[dtype]
    torch.testing.assert_close(s.x0_from_v(x_t, v, t), x0, rtol=tol, atol=tol)
    torch.testing.assert_close(s.eps_from_v(x_t, v, t), eps, rtol=tol, atol=tol)


@PROPERTY
@given(batches(), st.floats(1e-2, 1e2), st.sampled_from([torch.float64, torch.float32]))
@example(("scaled_linear_zsnr", (2, 3, 2, 2), [T - 1, 0], 3), 50.0, torch.float64)
def test_eq13_degenerates_at_t_prime_equal_t(case, v_scale, dtype):
    """Eq. 13 with t' = t: re-noising (x0_hat, eps_hat) at t gives back x_t for ANY output v."""
    name, shape, t, seed = case
    s, t = SCHEDULES[name], torch.tensor(t)
    x0, eps, v = _randn(shape, seed, dtype, n=3)
    v = v * v_scale  # an arbitrary "network output", unrelated to x0 and eps
    x_t = s.add_noise(x0, eps, t)
    again = s.add_noise(s.x0_from_v(x_t, v, t), s.eps_from_v(x_t, v, t), t)
    tol = TOL[dtype] * (1 + v_scale)
    torch.testing.assert_close(again, x_t, rtol=tol, atol=tol)


# ------------------------------------------------------------------ dtypes and shapes
OPS = ("add_noise", "velocity", "x0_from_v", "eps_from_v")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2),
                                       (torch.float32, 1e-6), (torch.float64, 0.0)])
@pytest.mark.parametrize("op", OPS)
def test_dtype_preserved(op, dtype, tol):
    s = SCHEDULES["scaled_linear_zsnr"]
    a, b = _randn((3, 2, 4, 4), 0, torch.float64)
    t = torch.tensor([0, 400, T - 1])
    out = getattr(s, op)(a.to(dtype), b.to(dtype), t)
    assert out.dtype == dtype and out.shape == a.shape
    ref = getattr(s, op)(a.to(dtype).double(), b.to(dtype).double(), t)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("op", OPS)
def test_coefficients_gathered_per_sample(op):
    s = SCHEDULES["linear"]
    ab = s.alphas_cumprod
    t = torch.tensor([10, 900, 10])
    x0 = torch.ones(3, 2, 3, dtype=torch.float64)
    other = torch.zeros_like(x0)
    out = getattr(s, op)(x0, other, t)
    # with the second argument zero each op reduces to +-(one coefficient) * ones
    coef = {"add_noise": ab.sqrt(), "velocity": -(1 - ab).sqrt(),
            "x0_from_v": ab.sqrt(), "eps_from_v": (1 - ab).sqrt()}[op][t]
    torch.testing.assert_close(out, coef.view(3, 1, 1).expand_as(x0), rtol=0, atol=1e-15)
    assert out[0, 0, 0] != out[1, 0, 0]
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_scalar_t_broadcasts(op):
    s = SCHEDULES["cosine_zsnr"]
    a, b = _randn((4, 2, 3, 3), 1, torch.float64)
    expected = getattr(s, op)(a, b, torch.full((4,), 123))
    for t in (123, torch.tensor(123)):
        torch.testing.assert_close(getattr(s, op)(a, b, t), expected, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad_t", [torch.zeros(4, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                                   torch.zeros(3, 1, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)])
def test_wrongly_shaped_t_raises(op, bad_t):
    a, b = _randn((3, 2, 4), 0, torch.float64)
    with pytest.raises(ValueError, match="t must"):
        getattr(SCHEDULES["linear"], op)(a, b, bad_t)


@pytest.mark.parametrize("op", OPS)
def test_rank_one_input_raises(op):
    a, b = _randn((5,), 0, torch.float64)
    with pytest.raises(ValueError, match="rank >= 2"):
        getattr(SCHEDULES["linear"], op)(a, b, 0)


# ------------------------------------------------------------------ inference timesteps
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 25, 30, 50, 333, 999, 1000])
def test_timesteps_invariants(spacing, steps):
    ts = SCHEDULES["scaled_linear_zsnr"].timesteps(steps, spacing)
    assert ts.dtype == torch.long and ts.shape == (steps,)
    assert bool((ts[1:] < ts[:-1]).all()), "strictly descending, hence unique"
    assert ts.unique().numel() == steps
    assert 0 <= ts.min().item() and ts.max().item() <= T - 1
    if spacing == "trailing":
        assert ts[0].item() == T - 1
    if spacing == "linspace":
        assert ts[0].item() == (T - 1 if steps > 1 else 0) and ts[-1].item() == 0
    if spacing == "leading":
        assert ts[-1].item() == 0 and ts[0].item() == (steps - 1) * (T // steps)


def test_timesteps_trailing_values_when_t_not_divisible():
    s = SCHEDULES["linear"]
    assert s.timesteps(3).tolist() == [999, 666, 332]  # round(1000 - k*1000/3) - 1
    assert s.timesteps(7).tolist() == [999 - round(k * 1000 / 7) for k in range(7)]
    assert s.timesteps(999)[-2:].tolist() == [1, 0]


def test_timesteps_leading_offset():
    s = SCHEDULES["linear"]
    torch.testing.assert_close(s.timesteps(10, "leading", offset=1), s.timesteps(10, "leading") + 1)
    with pytest.raises(ValueError):
        s.timesteps(1000, "leading", offset=1)  # would reach index T


@pytest.mark.parametrize("steps", [0, -1, T + 1])
def test_timesteps_invalid_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        SCHEDULES["linear"].timesteps(steps)


def test_timesteps_invalid_spacing():
    with pytest.raises(ValueError, match="spacing"):
        SCHEDULES["linear"].timesteps(10, "uniform")


# ------------------------------------------------------------------ diffusers oracles
@pytest.fixture(scope="module")
def DDIMScheduler():
    return pytest.importorskip("diffusers").DDIMScheduler


DIFFUSERS_NAMES = {"linear": ("linear", {}), "scaled_linear": ("scaled_linear", SD),
                   "cosine": ("squaredcos_cap_v2", {})}


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("name", DIFFUSERS_NAMES)
def test_alphas_cumprod_match_diffusers(DDIMScheduler, name, zero_snr):
    beta_schedule, kw = DIFFUSERS_NAMES[name]
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr,
                        **kw).alphas_cumprod
    ours = ZSNR_MAKERS[name](zero_snr).alphas_cumprod
    # diffusers builds its betas and cumprod in float32
    torch.testing.assert_close(ours, ref.double(), rtol=0, atol=1e-6)
    if zero_snr:
        assert ref[-1].item() == ours[-1].item() == 0.0


# diffusers computes these in floating point, so where the exact value is k + 0.5 its rounding can go
# either way (and "trailing" can even gain an extra element, e.g. n=61, 103 at T=1000): the oracle
# uses step counts away from those ties.
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7, 10, 20, 25, 30, 50, 100, 250, 500, 999, 1000])
def test_timesteps_match_diffusers(DDIMScheduler, spacing, steps):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    torch.testing.assert_close(SCHEDULES["linear"].timesteps(steps, spacing), ref.timesteps, rtol=0, atol=0)


def test_leading_offset_matches_diffusers(DDIMScheduler):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(50)
    torch.testing.assert_close(SCHEDULES["linear"].timesteps(50, "leading", offset=1), ref.timesteps,
                               rtol=0, atol=0)


def test_add_noise_matches_diffusers(DDIMScheduler):
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", rescale_betas_zero_snr=True, **SD)
    x0, eps = _randn((3, 2, 4, 4), 5, torch.float32)
    t = torch.tensor([0, 500, T - 1])
    ours = SCHEDULES["scaled_linear_zsnr"]
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.velocity(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=0, atol=1e-5)
    assert torch.equal(ours.add_noise(x0, eps, t)[2], eps[2])  # zero SNR: x_T is exactly the noise
