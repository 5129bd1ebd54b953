"""ddim_sample against a hand loop over diffusers' DDIMScheduler (eta = 0 and eta > 0, with and
without CFG + guidance rescale), call counts, the zero-SNR terminal step, errors, any rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perceptual_diffusion.sampling import ddim_sample, rescale_guidance
from perceptual_diffusion.schedule import NoiseSchedule

T = 1000
NUM_CLASSES = 5
SCHEDULE = NoiseSchedule.scaled_linear(T, beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True)


class ToyDenoiser(nn.Module):
    """A deterministic v-predictor, rank agnostic: channel mixing + tanh, modulated by t, plus a
    condition embedding (class labels (N,), label NUM_CLASSES being "null", or a context (N, L, D)).
    Every sample and every position is processed independently."""

    def __init__(self, channels: int = 3, ctx_dim: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("mix", torch.randn(channels, channels, generator=g, dtype=torch.float64))
        self.register_buffer("labels", torch.randn(NUM_CLASSES + 1, channels, generator=g, dtype=torch.float64))
        self.register_buffer("ctx", torch.randn(ctx_dim, channels, generator=g, dtype=torch.float64))

    def forward(self, x_t, t, cond=None):
        col = (-1,) + (1,) * (x_t.ndim - 1)
        tau = ((t.to(torch.float64) + 1) / T).view(col)
        h = torch.einsum("oc,nc...->no...", self.mix, x_t.double())
        v = torch.tanh(h) * (0.5 + tau) + torch.sin(3 * tau) * x_t.double()
        if cond is not None:
            e = self.labels[cond] if cond.dtype == torch.long else cond.double().mean(1) @ self.ctx
            v = v + e.view(*e.shape, *([1] * (x_t.ndim - 2))) * torch.cos(2 * tau) * (1 + 0.5 * torch.tanh(x_t.double()))
        return v.to(x_t.dtype)


class NullCondDenoiser(ToyDenoiser):
    def null_cond(self, cond):
        return torch.full_like(cond, NUM_CLASSES)


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.batches = net, []

    def forward(self, x_t, t, cond=None):
        self.batches.append(x_t.shape[0])
        return self.net(x_t, t, cond)


def _noise(shape=(2, 3, 4, 4), dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


LABELS = torch.tensor([1, 3])
NULL = torch.full((2,), NUM_CLASSES)


# ------------------------------------------------------------------ diffusers oracle
@pytest.fixture(scope="module")
def diffusers_ddim():
    """A function (steps) -> DDIMScheduler configured like SCHEDULE with trailing spacing."""
    DDIMScheduler = pytest.importorskip("diffusers").DDIMScheduler

    def make(steps):
        sched = DDIMScheduler(
            num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
            clip_sample=False, set_alpha_to_one=True,
        )
        sched.set_timesteps(steps)
        return sched

    return make


@pytest.fixture(scope="module")
def rescale_noise_cfg():
    pytest.importorskip("diffusers")
    try:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    except ImportError:  # same function, without the pipeline's transformers import
        from diffusers.guiders.guider_utils import rescale_noise_cfg
    return rescale_noise_cfg


def _diffusers_loop(sched, net, noise, cond=None, eta=0.0, seed=None, w=1.0, uncond=None, phi=0.0,
                    rescale_noise_cfg=None, generator=None):
    # Noises drawn exactly as ddim_sample draws them: one randn(x.shape) per step, in order.
    g = torch.Generator().manual_seed(seed) if generator is None and seed is not None else generator
    x = noise.clone()
    for t in sched.timesteps.tolist():
        tb = torch.full((x.shape[0],), t)
        if w == 1.0:
            v = net(x, tb, cond)
        else:
            v_u, v_c = net(x, tb, uncond), net(x, tb, cond)
            v = v_u + w * (v_c - v_u)
            if phi > 0:
                v = rescale_noise_cfg(v, v_c, guidance_rescale=phi)
        kw = {}
        if eta > 0:
            kw["variance_noise"] = torch.randn(x.shape, dtype=x.dtype, generator=g)
        x = sched.step(v, t, x, eta=eta, **kw).prev_sample
    return x


TOLS = {torch.float64: 1e-5, torch.float32: 1e-4}


# diffusers steps from t to t - T//S, ddim_sample to the next timestep of its own sequence; with
# trailing spacing and S dividing T the two coincide exactly, hence S in (10, 25, 50).
# eta = 1 is left out: at the zero-SNR first step 1 - a_prev - sigma^2 is exactly 0 in exact arithmetic,
# and diffusers takes the square root of its float error (NaN), where ddim_sample clamps at 0.
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_matches_diffusers_ddim(diffusers_ddim, steps, dtype, eta):
    net, noise = ToyDenoiser(), _noise(dtype=dtype)
    sched = diffusers_ddim(steps)
    assert sched.timesteps.tolist() == SCHEDULE.timesteps(steps).tolist()
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = ddim_sample(net, SCHEDULE, noise, cond=LABELS, steps=steps, eta=eta, generator=g_ours)
    ref = _diffusers_loop(sched, net, noise, cond=LABELS, eta=eta, generator=g_ref)
    assert ours.dtype == dtype and ours.shape == noise.shape
    assert (ours - ref).abs().max().item() < TOLS[dtype]
    # one draw per step, the last (sigma = 0) included, so a reused generator continues identically
    assert torch.equal(g_ours.get_state(), g_ref.get_state())
    # the comparison is not vacuous: the condition and the seed both change the result
    other = ddim_sample(net, SCHEDULE, noise, cond=LABELS.flip(0), steps=steps, eta=eta,
                        generator=torch.Generator().manual_seed(7))
    assert (other - ours).abs().max().item() > 1e-2
    if eta > 0:
        reseeded = ddim_sample(net, SCHEDULE, noise, cond=LABELS, steps=steps, eta=eta,
                               generator=torch.Generator().manual_seed(8))
        assert (reseeded - ours).abs().max().item() > 1e-2


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("w,phi", [(3.0, 0.0), (5.0, 0.7), (7.5, 1.0), (0.0, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cfg_matches_diffusers(diffusers_ddim, rescale_noise_cfg, w, phi, eta, dtype):
    net, noise, steps = ToyDenoiser(), _noise(dtype=dtype), 25
    ours = ddim_sample(net, SCHEDULE, noise, cond=LABELS, steps=steps, eta=eta, guidance_scale=w,
                       uncond=NULL, guidance_rescale=phi, generator=torch.Generator().manual_seed(3))
    ref = _diffusers_loop(diffusers_ddim(steps), net, noise, cond=LABELS, eta=eta, seed=3, w=w, uncond=NULL,
                          phi=phi, rescale_noise_cfg=rescale_noise_cfg)
    assert (ours - ref).abs().max().item() < TOLS[dtype]
    if w == 0.0:  # eq. 1 with w = 0 is the unconditional model
        plain = ddim_sample(net, SCHEDULE, noise, cond=NULL, steps=steps, eta=eta,
                            generator=torch.Generator().manual_seed(3))
        assert (ours - plain).abs().max().item() < TOLS[dtype]


def test_cfg_with_context_condition(diffusers_ddim, rescale_noise_cfg):
    net, noise = ToyDenoiser(), _noise()
    ctx = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    empty = torch.zeros_like(ctx)
    ours = ddim_sample(net, SCHEDULE, noise, cond=ctx, steps=10, guidance_scale=4.0, uncond=empty,
                       guidance_rescale=0.5)
    ref = _diffusers_loop(diffusers_ddim(10), net, noise, cond=ctx, w=4.0, uncond=empty, phi=0.5,
                          rescale_noise_cfg=rescale_noise_cfg)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("shape", [(3, 2, 8), (2, 3, 4, 4), (2, 2, 3, 4, 4)])
def test_rescale_guidance_matches_diffusers(rescale_noise_cfg, shape, phi):
    g = torch.Generator().manual_seed(len(shape))
    v_cfg = 3 * torch.randn(shape, generator=g, dtype=torch.float64) + 1
    v_cond = torch.randn(shape, generator=g, dtype=torch.float64)
    ours = rescale_guidance(v_cfg, v_cond, phi)
    torch.testing.assert_close(ours, rescale_noise_cfg(v_cfg, v_cond, guidance_rescale=phi), rtol=1e-12,
                               atol=1e-12)
    if phi == 1.0:  # fully rescaled: the per-sample std is the conditional one
        dims = tuple(range(1, len(shape)))
        torch.testing.assert_close(ours.std(dim=dims), v_cond.std(dim=dims), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ number of network calls
@pytest.mark.parametrize("w,factor", [(1.0, 1), (4.0, 2)])
def test_network_evaluations(w, factor):
    steps, noise = 7, _noise((3, 3, 4, 4))
    cond = torch.tensor([0, 1, 2])
    counting = Counting(ToyDenoiser())
    out = ddim_sample(counting, SCHEDULE, noise, cond=cond, steps=steps, guidance_scale=w,
                      uncond=torch.full((3,), NUM_CLASSES))
    assert counting.batches == [factor * 3] * steps
    direct = ddim_sample(ToyDenoiser(), SCHEDULE, noise, cond=cond, steps=steps, guidance_scale=w,
                         uncond=torch.full((3,), NUM_CLASSES))
    torch.testing.assert_close(out, direct, rtol=0, atol=0)


# ------------------------------------------------------------------ zero-SNR terminal step, trajectory
class LoudDenoiser(ToyDenoiser):
    def forward(self, x_t, t, cond=None):
        return 1e6 * super().forward(x_t, t, cond)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_terminal_step_is_finite(eta):
    net, noise, steps = LoudDenoiser(), _noise(), 5
    out, traj = ddim_sample(net, SCHEDULE, noise, cond=LABELS, steps=steps, eta=eta, guidance_scale=3.0,
                            uncond=NULL, guidance_rescale=0.5, return_x0_trajectory=True,
                            generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(traj).all())
    # at index T-1 alpha_bar is exactly 0, so x0_hat = -v with x_T = noise
    assert SCHEDULE.alphas_cumprod[SCHEDULE.timesteps(steps)[0]].item() == 0.0
    tb = torch.full((2,), T - 1)
    v_u, v_c = net(noise, tb, NULL), net(noise, tb, LABELS)
    v = rescale_guidance(v_u + 3.0 * (v_c - v_u), v_c, 0.5)
    torch.testing.assert_close(traj[0], -v, rtol=1e-12, atol=0)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(2, 3, 16), (2, 3, 4, 4)])
def test_x0_trajectory(shape, eta):
    net, noise, steps = ToyDenoiser(), _noise(shape), 6
    out, traj = ddim_sample(net, SCHEDULE, noise, cond=LABELS, steps=steps, eta=eta, return_x0_trajectory=True,
                            generator=torch.Generator().manual_seed(0))
    assert traj.shape == (steps, *shape)
    assert torch.equal(traj[-1], out)  # the last step lands on alpha_bar = 1
    alone = ddim_sample(net, SCHEDULE, noise, cond=LABELS, steps=steps, eta=eta,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(alone, out)
    assert (traj[0] - traj[-1]).abs().max().item() > 1e-3  # the predictions do evolve


# ------------------------------------------------------------------ errors and null_cond
def test_guidance_without_cond_raises():
    with pytest.raises(ValueError, match="cond"):
        ddim_sample(ToyDenoiser(), SCHEDULE, _noise(), steps=2, guidance_scale=2.0, uncond=NULL)


def test_guidance_without_uncond_or_null_cond_raises():
    with pytest.raises(ValueError, match="uncond"):
        ddim_sample(ToyDenoiser(), SCHEDULE, _noise(), cond=LABELS, steps=2, guidance_scale=2.0)


def test_null_cond_used_automatically():
    net, noise = NullCondDenoiser(), _noise()
    auto = ddim_sample(net, SCHEDULE, noise, cond=LABELS, steps=5, guidance_scale=3.0)
    explicit = ddim_sample(net, SCHEDULE, noise, cond=LABELS, steps=5, guidance_scale=3.0, uncond=NULL)
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)
    wrong = ddim_sample(net, SCHEDULE, noise, cond=LABELS, steps=5, guidance_scale=3.0, uncond=LABELS.flip(0))
    assert (wrong - auto).abs().max().item() > 1e-2
    # an explicit uncond wins over null_cond
    torch.testing.assert_close(
        ddim_sample(net, SCHEDULE, noise, cond=LABELS, steps=5, guidance_scale=3.0, uncond=LABELS.flip(0)),
        wrong, rtol=0, atol=0)


def test_negative_eta_raises():
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(ToyDenoiser(), SCHEDULE, _noise(), cond=LABELS, steps=2, eta=-0.1)


@pytest.mark.parametrize("w", [1.0, 3.0])
@pytest.mark.parametrize("phi", [-0.1, 1.5])
def test_guidance_rescale_out_of_range_raises(phi, w):
    with pytest.raises(ValueError, match="guidance_rescale"):
        ddim_sample(ToyDenoiser(), SCHEDULE, _noise(), cond=LABELS, steps=2, guidance_scale=w, uncond=NULL,
                    guidance_rescale=phi)


# ------------------------------------------------------------------ any rank
@pytest.mark.parametrize("w,phi", [(1.0, 0.0), (3.0, 0.7)])
@pytest.mark.parametrize("shape", [(2, 3, 32), (2, 3, 2, 4, 4)])
def test_rank_agnostic(diffusers_ddim, rescale_noise_cfg, shape, w, phi):
    net, noise = ToyDenoiser(), _noise(shape)
    kw = dict(cond=LABELS, steps=10, guidance_scale=w, uncond=NULL, guidance_rescale=phi)
    out = ddim_sample(net, SCHEDULE, noise, **kw)
    assert out.shape == shape and bool(torch.isfinite(out).all())
    ref = _diffusers_loop(diffusers_ddim(10), net, noise, cond=LABELS, w=w, uncond=NULL, phi=phi,
                          rescale_noise_cfg=rescale_noise_cfg)
    assert (out - ref).abs().max().item() < 1e-5
    # the toy net is per position and the rescale std is over all non-batch dims, so the
    # sample does not depend on how the non-batch dims are laid out
    flat = ddim_sample(net, SCHEDULE, noise.reshape(2, 3, -1), **kw)
    torch.testing.assert_close(out.reshape(2, 3, -1), flat, rtol=1e-10, atol=1e-10)
