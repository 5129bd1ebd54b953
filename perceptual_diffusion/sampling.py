"""DDIM sampling (Song et al. 2021) for v-prediction denoisers, with classifier-free guidance
(eq. 1) and guidance rescale (Lin et al. 2024, Algorithm 2)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .denoiser import Denoiser
from .schedule import NoiseSchedule

__all__ = ["ddim_sample", "rescale_guidance", "guided_velocity"]


def rescale_guidance(v_cfg: Tensor, v_cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2024 Alg. 2: match the per-sample std of the guided prediction to the
    conditional one, blended by phi. Stds are over all non-batch dims (unbiased, as diffusers)."""
    dims = tuple(range(1, v_cfg.ndim))
    rescaled = v_cfg * (v_cond.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * v_cfg


def _cat_cond(uncond: Any, cond: Any) -> Any:
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        return torch.cat([uncond, cond])
    raise TypeError("classifier-free guidance needs cond and uncond as tensors of the same kind")


def guided_velocity(
    net: Denoiser, x: Tensor, t: Tensor, cond: Any, uncond: Any, guidance_scale: float,
    guidance_rescale: float,
) -> Tensor:
    """v for one step: a plain call when guidance_scale == 1, otherwise eq. 1 with the
    unconditional and conditional halves in one batched call (2N), then optional rescale."""
    if guidance_scale == 1.0:
        return net(x, t, cond)
    v_uncond, v_cond = net(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(uncond, cond)).chunk(2)
    v = v_uncond + guidance_scale * (v_cond - v_uncond)
    if guidance_rescale > 0:
        v = rescale_guidance(v, v_cond, guidance_rescale)
    return v


@torch.no_grad()
def ddim_sample(
    net: Denoiser,
    schedule: NoiseSchedule,
    noise: Tensor,
    cond: Any = None,
    steps: int = 25,
    spacing: str = "trailing",
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    uncond: Any = None,
    guidance_rescale: float = 0.0,
    return_x0_trajectory: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample x_0 from x_T = `noise` [N x C x ...] with DDIM over `steps` timesteps.

    eta=0 is the deterministic sampler the paper uses; eta>0 adds the DDIM noise, drawn from
    `generator` once per step. With guidance_scale != 1, `uncond` is the unconditional input
    (null labels, empty-prompt context); if omitted, ``net.null_cond(cond)`` is used when the
    backbone has it. Each step moves to the next timestep of the sequence and the last step
    lands on alpha_bar = 1, so the output is that step's x0 prediction.

    Returns x0 [N x C x ...], and with `return_x0_trajectory` also the x0 prediction of every
    step, [steps x N x C x ...] (Figure 5 of the paper).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if guidance_scale != 1.0:
        if cond is None:
            raise ValueError("guidance_scale != 1 needs a condition (cond is None)")
        if uncond is None:
            null_cond = getattr(net, "null_cond", None)
            if null_cond is None:
                raise ValueError("guidance_scale != 1 needs `uncond` (the network has no null_cond)")
            uncond = null_cond(cond)
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")

    ab = schedule.alphas_cumprod
    ts = schedule.timesteps(steps, spacing).tolist()
    x = noise
    trajectory = []
    for i, t in enumerate(tqdm(ts, desc="ddim", disable=not progress, leave=False)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        v = guided_velocity(net, x, t_batch, cond, uncond, guidance_scale, guidance_rescale)
        x0_hat = schedule.x0_from_v(x, v, t_batch)
        eps_hat = schedule.eps_from_v(x, v, t_batch)
        if return_x0_trajectory:
            trajectory.append(x0_hat)
        a_t = float(ab[t])
        a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        sigma = 0.0
        if eta > 0:
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0_hat + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps_hat
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    if return_x0_trajectory:
        return x, torch.stack(trajectory)
    return x
