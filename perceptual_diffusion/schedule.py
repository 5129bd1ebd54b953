"""Discrete noise schedules and the forward process (eq. 2-3, 8-9).

Index convention: tensors of timesteps hold indices ``i`` in ``[0, T-1]``; index ``i`` is the
paper's ``t = i + 1`` (so ``alphas_cumprod[i]`` is the paper's alpha_bar_{i+1}, and the last
index ``T-1`` is the paper's ``t = T``). This matches diffusers and Algorithm 1's
``randint(0, 1000)``.

Every operation accepts ``x`` of any rank >= 2 ((N,C,L), (N,C,H,W), (N,C,F,H,W)) and any float
dtype: coefficients live in float64, are gathered per sample, then cast to ``x``'s dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NoiseSchedule", "rescale_zero_terminal_snr", "SPACINGS", "SCHEDULE_KINDS"]

SPACINGS = ("trailing", "leading", "linspace")
SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1: shift sqrt(alpha_bar) so the last is exactly 0, then scale
    so the first is unchanged. Returns the new alpha_bar (float64)."""
    sqrt_ab = alphas_cumprod.double().sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    return sqrt_ab.square()


class NoiseSchedule:
    """A discrete variance-preserving schedule alpha_bar_1..alpha_bar_T (float64).

    Build with `linear`, `scaled_linear`, `cosine` or from explicit betas. With
    ``zero_terminal_snr=True`` alpha_bar at the last index is exactly 0, so x_T is pure noise
    and the sampler must start at index T-1 ("trailing" spacing).
    """

    def __init__(self, betas: Tensor, zero_terminal_snr: bool = False):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2:
            raise ValueError(f"a schedule needs at least 2 timesteps, got {betas.numel()}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
            prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
            betas = 1.0 - alphas_cumprod / prev
        if not bool((alphas_cumprod[1:] <= alphas_cumprod[:-1]).all()):
            raise ValueError("alpha_bar must be non-increasing")
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.zero_terminal_snr = zero_terminal_snr
        self._tables: dict[tuple[str, torch.device], Tensor] = {}

    # ---------------------------------------------------------------- constructors
    @classmethod
    def linear(
        cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """DDPM's linear betas."""
        _check_range(beta_start, beta_end)
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64), zero_terminal_snr)

    @classmethod
    def scaled_linear(
        cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """Stable Diffusion's betas: linear in sqrt(beta)."""
        _check_range(beta_start, beta_end)
        sqrt = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64)
        return cls(sqrt.square(), zero_terminal_snr)

    @classmethod
    def cosine(
        cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """Nichol & Dhariwal's cosine schedule (betas clipped at `max_beta`)."""
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2).square()
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas, zero_terminal_snr)

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "NoiseSchedule":
        """``"linear"``, ``"scaled_linear"`` or ``"cosine"`` with that constructor's kwargs."""
        if name not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
        return getattr(cls, name)(**kwargs)

    # ---------------------------------------------------------------- properties
    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def snr(self) -> Tensor:
        """alpha_bar / (1 - alpha_bar), (T,) float64 (inf never occurs; 0 at a zero-SNR end)."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_timesteps}, alpha_bar[0]={self.alphas_cumprod[0]:.6g}, "
                f"alpha_bar[-1]={self.alphas_cumprod[-1]:.6g}, zero_terminal_snr={self.zero_terminal_snr})")

    # ---------------------------------------------------------------- coefficients
    def _table(self, name: str, device: torch.device) -> Tensor:
        key = (name, device)
        if key not in self._tables:
            ab = self.alphas_cumprod
            if name == "sqrt_ab":
                table = ab.sqrt()
            elif name == "sqrt_1mab":
                table = (1 - ab).sqrt()
            else:  # "angle": phi_t with (cos, sin) = (sqrt(ab), sqrt(1 - ab))
                table = torch.atan2((1 - ab).sqrt(), ab.sqrt())
            # MPS has no float64; everywhere else keep full precision until the final cast.
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._tables[key] = table.to(device=device, dtype=dtype)
        return self._tables[key]

    def _coef(self, name: str, t: Tensor | int, x: Tensor) -> Tensor:
        """Gather a coefficient for each sample and shape it (N, 1, ..., 1) in x's dtype."""
        table = self._table(name, x.device)
        t = torch.as_tensor(t, device=x.device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
        return table[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def _pair(self, t: Tensor | int, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim < 2:
            raise ValueError(f"expected a batched tensor of rank >= 2, got shape {tuple(x.shape)}")
        return self._coef("sqrt_ab", t, x), self._coef("sqrt_1mab", t, x)

    # ---------------------------------------------------------------- eq. 2, 3, 8, 9
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Eq. 2: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps. [N x ...] -> [N x ...]."""
        a, s = self._pair(t, x0)
        return a * x0 + s * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Eq. 3: v_t = sqrt(ab_t) eps - sqrt(1 - ab_t) x0."""
        a, s = self._pair(t, x0)
        return a * noise - s * x0

    def x0_from_v(self, x_t: Tensor, v: Tensor, t: Tensor | int) -> Tensor:
        """Eq. 8: x0_hat = sqrt(ab_t) x_t - sqrt(1 - ab_t) v."""
        a, s = self._pair(t, x_t)
        return a * x_t - s * v

    def eps_from_v(self, x_t: Tensor, v: Tensor, t: Tensor | int) -> Tensor:
        """Eq. 9: eps_hat = sqrt(ab_t) v + sqrt(1 - ab_t) x_t."""
        a, s = self._pair(t, x_t)
        return a * v + s * x_t

    def renoise(self, x_t: Tensor, v: Tensor, t: Tensor | int, t_new: Tensor | int) -> Tensor:
        """forward(x0_hat, eps_hat, t_new) with x0_hat, eps_hat from v at t (eq. 8, 9, 11) in one
        step: with angles phi (cos phi = sqrt(ab)), it is cos(d) x_t + sin(d) v, d = phi_new - phi_t.

        At t_new == t, d is exactly 0, so the result is exactly x_t and v gets no gradient:
        the paper's eq. 13 holds bit for bit, not just up to rounding.
        """
        if x_t.ndim < 2:
            raise ValueError(f"expected a batched tensor of rank >= 2, got shape {tuple(x_t.shape)}")
        table = self._table("angle", x_t.device)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.long).expand(x_t.shape[0])
        t_new = torch.as_tensor(t_new, device=x_t.device, dtype=torch.long).expand(x_t.shape[0])
        d = table[t_new] - table[t]
        return d.cos().to(x_t.dtype).reshape(shape) * x_t + d.sin().to(x_t.dtype).reshape(shape) * v

    # ---------------------------------------------------------------- inference timesteps
    def timesteps(self, steps: int, spacing: str = "trailing", offset: int = 0) -> Tensor:
        """Descending LongTensor (steps,) of indices for sampling.

        "trailing" starts at T-1 (needed with zero terminal SNR, Lin et al. 2024 sec. 3.3);
        "leading" is arange(steps) * (T // steps) + offset; "linspace" spreads 0..T-1 evenly.
        The formulas are diffusers' `timestep_spacing` options (where a value lands on k + 0.5,
        float rounding may send the two implementations to neighbouring integers).
        """
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        if spacing == "trailing":
            # round(T - k T/steps) - 1 for k < steps; diffusers' np.arange(T, 0, -T/steps) can
            # yield a spurious extra element through float error, this form cannot.
            k = torch.arange(steps, dtype=torch.float64)
            ts = torch.round(T - k * (T / steps)) - 1
        elif spacing == "leading":
            ts = (torch.arange(steps, dtype=torch.float64) * (T // steps)).round().flip(0) + offset
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().flip(0)
        else:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
        ts = ts.long()
        if ts.numel() != steps or ts.min() < 0 or ts.max() > T - 1:
            raise ValueError(f"spacing {spacing!r} with offset {offset} gives invalid timesteps for steps={steps}")
        return ts


def _check_range(beta_start: float, beta_end: float) -> None:
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
