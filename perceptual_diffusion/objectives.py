"""Training objectives: v-prediction MSE (eq. 5) and the self-perceptual loss (eq. 6-12, 14-17).

Both are small callables that receive the online network at call time (EDM style) and return
per-sample losses of shape (N,); reduce them however the trainer likes. Every tensor op is
rank-agnostic, so the same objects train image, video and audio backbones.

    mse = VelocityMSE(schedule)
    sp = SelfPerceptual(schedule, make_perceptual(mse_trained_net))
    loss = sp(net, x0, cond).mean()
    loss = (1.0 * sp(net, x0, cond) + 0.1 * mse(net, x0, cond)).mean()   # a weighted sum, or,
    sp = SelfPerceptual(schedule, perceptual, mse_weight=0.1)            # sharing one forward
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .denoiser import Denoiser, LayerSpec, model_dtype, resolve_layers
from .schedule import NoiseSchedule

__all__ = ["VelocityMSE", "SelfPerceptual", "make_perceptual", "T_PRIME_MODES", "DISTANCES", "FORMULATIONS"]

T_PRIME_MODES = ("uniform", "near", "normal")
DISTANCES = ("mse", "mae")
FORMULATIONS = ("sp", "sp2")


def make_perceptual(net: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The paper's "copy and freeze": deep copy, requires_grad_(False), eval(), optional dtype.

    Storing the copy in the mixed-precision dtype (e.g. torch.bfloat16) halves its memory; the
    backbones of this library cast their inputs to their parameter dtype.
    """
    frozen = copy.deepcopy(net)
    frozen.requires_grad_(False)
    frozen.eval()
    if dtype is not None:
        frozen.to(dtype)
    return frozen


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.float().flatten(1).mean(1)


def _velocity_error(s: NoiseSchedule, v_hat: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Eq. 5 per sample: mean over non-batch dims of (v_hat - v_t)^2, in float32."""
    return _per_sample_mean((v_hat.float() - s.velocity(x0, noise, t).float()).square())


def _draw_t(num_timesteps: int, x0: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)


def _draw_noise(x0: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)


class VelocityMSE:
    """Eq. 5: ||f(x_t, t, c) - v_t||^2, averaged over all but the batch dim -> (N,)."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def __call__(
        self, net: Denoiser, x0: Tensor, cond: Any = None, t: Tensor | None = None,
        noise: Tensor | None = None, generator: torch.Generator | None = None,
    ) -> Tensor:
        s = self.schedule
        t = _draw_t(s.num_timesteps, x0, generator) if t is None else t
        noise = _draw_noise(x0, generator) if noise is None else noise
        x_t = s.add_noise(x0, noise, t)
        v_hat = net(x_t, t, cond)
        return _velocity_error(s, v_hat, x0, noise, t)


class SelfPerceptual:
    """The self-perceptual objective (eq. 6-12), with every ablation of the paper's section 5.

    Args:
        schedule: the noise schedule shared with the online network.
        perceptual: the frozen network f_* (see `make_perceptual`); any `Denoiser`.
        layers: taps whose feature distances are summed: "mid" (paper default), "encoder",
            "decoder", "encoder+mid" (Table 2), or explicit tap names.
        t_prime: "uniform" t' ~ U over all timesteps (default); "near" t' = t +- `near_offset`
            with a random sign; "normal" t' ~ round(N(t, `normal_std`^2)); both clamped to
            [0, T-1] (Table 3).
        distance: "mse" (squared, default) or "mae" on features (Table 4).
        formulation: "sp" (eq. 11-12) or "sp2" (eq. 14-17, x0_hat and eps_hat paired
            separately with the ground truth; Table 5).
        mse_weight: adds mse_weight * eq. 5 computed from the same online forward.

    Cost: the ground-truth branch runs under no_grad, both branches stop at the last tap, and
    in "sp2" the two predicted inputs go through the frozen net as one batch.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        perceptual: Denoiser,
        layers: LayerSpec = "mid",
        t_prime: str = "uniform",
        distance: str = "mse",
        formulation: str = "sp",
        mse_weight: float = 0.0,
        near_offset: int = 40,
        normal_std: float = 100.0,
    ):
        _check_choice("t_prime", t_prime, T_PRIME_MODES)
        _check_choice("distance", distance, DISTANCES)
        _check_choice("formulation", formulation, FORMULATIONS)
        if mse_weight < 0:
            raise ValueError(f"mse_weight must be >= 0, got {mse_weight}")
        if near_offset < 0 or normal_std <= 0:
            raise ValueError(f"need near_offset >= 0 and normal_std > 0, got {near_offset}, {normal_std}")
        if isinstance(perceptual, nn.Module) and any(p.requires_grad for p in perceptual.parameters()):
            raise ValueError("the perceptual network has trainable parameters; freeze it with make_perceptual(net)")
        self.schedule = schedule
        self.perceptual = perceptual
        self.layers = resolve_layers(layers, perceptual.feature_layers)
        self.t_prime_mode = t_prime
        self.distance = distance
        self.formulation = formulation
        self.mse_weight = float(mse_weight)
        self.near_offset = int(near_offset)
        self.normal_std = float(normal_std)

    # ------------------------------------------------------------------ pieces
    def sample_t_prime(self, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw t' for each sample according to `t_prime` (indices in [0, T-1])."""
        T = self.schedule.num_timesteps
        if self.t_prime_mode == "uniform":
            return torch.randint(0, T, t.shape, device=t.device, generator=generator)
        if self.t_prime_mode == "near":
            sign = torch.randint(0, 2, t.shape, device=t.device, generator=generator) * 2 - 1
            return (t + sign * self.near_offset).clamp(0, T - 1)
        z = torch.randn(t.shape, device=t.device, generator=generator, dtype=torch.float64)
        return (t.double() + self.normal_std * z).round().long().clamp(0, T - 1)

    def features(self, x: Tensor, t: Tensor, cond: Any) -> dict[str, Tensor]:
        """f_*^l(x, t, c) at the configured taps, stopping after the last one."""
        dtype = model_dtype(self.perceptual) if isinstance(self.perceptual, nn.Module) else x.dtype
        return self.perceptual.forward_features(x.to(dtype), t, cond, layers=self.layers, stop_early=True)

    def _distance(self, pred: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        total = None
        for name in self.layers:
            diff = pred[name].float() - target[name].float()
            d = _per_sample_mean(diff.square() if self.distance == "mse" else diff.abs())
            total = d if total is None else total + d
        return total

    # ------------------------------------------------------------------ the loss
    def terms(
        self, net: Denoiser, x0: Tensor, cond: Any = None, t: Tensor | None = None,
        t_prime: Tensor | None = None, noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample loss terms {"sp": (N,)[, "mse": (N,)]} (unweighted)."""
        s = self.schedule
        t = _draw_t(s.num_timesteps, x0, generator) if t is None else t
        noise = _draw_noise(x0, generator) if noise is None else noise
        t_prime = self.sample_t_prime(t, generator) if t_prime is None else t_prime

        x_t = s.add_noise(x0, noise, t)                          # eq. 6
        v_hat = net(x_t, t, cond)                                # eq. 7
        with torch.no_grad():                                    # eq. 10, ground-truth branch
            target = self.features(s.add_noise(x0, noise, t_prime), t_prime, cond)

        if self.formulation == "sp":
            # eq. 11 as one rotation of (x_t, v_hat): exactly x_t when t' = t (eq. 13)
            pred = self.features(s.renoise(x_t, v_hat, t, t_prime), t_prime, cond)
            loss = self._distance(pred, target)                                          # eq. 12
        else:
            n = x0.shape[0]
            x0_hat = s.x0_from_v(x_t, v_hat, t)                  # eq. 8
            eps_hat = s.eps_from_v(x_t, v_hat, t)                # eq. 9
            x_hat_x = s.add_noise(x0_hat, noise, t_prime)        # eq. 15
            x_hat_eps = s.add_noise(x0, eps_hat, t_prime)        # eq. 16
            both = self.features(torch.cat([x_hat_x, x_hat_eps]), t_prime.repeat(2), _repeat_cond(cond))
            loss = (self._distance({k: f[:n] for k, f in both.items()}, target)           # eq. 17
                    + self._distance({k: f[n:] for k, f in both.items()}, target))
        out = {"sp": loss}
        if self.mse_weight > 0:
            out["mse"] = _velocity_error(s, v_hat, x0, noise, t)
        return out

    def __call__(
        self, net: Denoiser, x0: Tensor, cond: Any = None, t: Tensor | None = None,
        t_prime: Tensor | None = None, noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Per-sample loss (N,): L_sp (eq. 12, or L_sp2 eq. 17) [+ mse_weight * L_mse]."""
        terms = self.terms(net, x0, cond, t=t, t_prime=t_prime, noise=noise, generator=generator)
        loss = terms["sp"]
        if "mse" in terms:
            loss = loss + self.mse_weight * terms["mse"]
        return loss


def _repeat_cond(cond: Any) -> Any:
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return torch.cat([cond, cond])
    raise TypeError(f"formulation 'sp2' needs cond to be None or a Tensor, got {type(cond).__name__}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
