"""A fixed validation batch: training diagnostics and the perceptual network's sanity check.

One batch is drawn once from the data with its own generator (items, timesteps, t', noise and
conditions), so every evaluation sees the same inputs and training's RNG streams are untouched:

- `vmse(net)`: eq. 5 on the batch, the loss a stage-1 model was trained on;
- `sp(net, perceptual)`: eq. 12 (mid taps) against a frozen network.

The timesteps are stratified (item i at t = (i + 1/2) T / n, in a fixed shuffled order), so the
mean over a batch of n items estimates the loss under t ~ U{0, ..., T-1} with far less spread
than n random draws; the items come from the training data, so this tracks optimisation (what
SP does that MSE does not), not generalisation.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .objectives import SelfPerceptual, VelocityMSE
from .schedule import NoiseSchedule

__all__ = ["ValidationBatch"]


class ValidationBatch:
    """The fixed inputs: `x0` (n, ...), `t`, `t_prime`, `noise` and `cond` (or None)."""

    def __init__(self, schedule: NoiseSchedule, x0: Tensor, cond: Any = None, seed: int = 0):
        n, T = x0.shape[0], schedule.num_timesteps
        g = torch.Generator().manual_seed(seed)
        strata = ((torch.arange(n, dtype=torch.float64) + 0.5) * T / n).long().clamp(0, T - 1)
        self.schedule = schedule
        self.x0 = x0
        self.cond = cond
        self.t = strata[torch.randperm(n, generator=g)]
        self.t_prime = strata[torch.randperm(n, generator=g)]
        self.noise = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(x0.dtype)

    @classmethod
    def from_dataset(cls, dataset, n: int, schedule: NoiseSchedule, seed: int,
                     condition: Callable[[dict], Any] | None = None,
                     encode: Callable[[Tensor], Tensor] | None = None) -> "ValidationBatch":
        """`n` items of `dataset` (a fixed random choice; unreadable ones are passed over).

        `condition(batch)` turns the collated items into the model's condition (labels, text
        contexts; None for unconditional data); `encode(x)` maps images to what the model sees
        (a VAE's latents)."""
        from .datasets.loader import collate_skip

        g = torch.Generator().manual_seed(seed)
        items = []
        for i in torch.randperm(len(dataset), generator=g).tolist():
            try:
                items.append(dataset[i])
            except Exception:  # an unreadable item is the training loop's to report
                continue
            if len(items) == n:
                break
        if not items:
            raise ValueError("no readable data item for the validation batch")
        batch = collate_skip(items)
        x0 = batch["x"] if encode is None else encode(batch["x"])
        return cls(schedule, x0, None if condition is None else condition(batch), seed=seed)

    @classmethod
    def for_recipe(cls, recipe, dataset, schedule: NoiseSchedule, condition: Callable[..., Any], latent=None,
                   device: torch.device | str = "cpu") -> "ValidationBatch":
        """A run's batch: `recipe.train.validation_size` items of its data, drawn from seed + 54321,
        conditioned without dropout (`condition(batch, 0.0, None)`); latent recipes see a fixed
        posterior sample of the VAE."""
        encode = None
        if latent is not None:
            g = torch.Generator(device=device).manual_seed(recipe.seed + 54321)
            encode = lambda x: latent.encode_images(x.to(device), generator=g).cpu()  # noqa: E731
        return cls.from_dataset(dataset, recipe.train.validation_size, schedule, seed=recipe.seed + 54321,
                                condition=lambda b: condition(b, 0.0, None), encode=encode)

    def __len__(self) -> int:
        return self.x0.shape[0]

    def _inputs(self, net: nn.Module) -> dict[str, Any]:
        device = next(net.parameters()).device
        cond = self.cond.to(device) if isinstance(self.cond, Tensor) else self.cond
        return {"x0": self.x0.to(device), "cond": cond, "t": self.t.to(device), "noise": self.noise.to(device)}

    @torch.no_grad()
    def vmse(self, net: nn.Module, autocast: Callable[[], Any] | None = None) -> float:
        """Eq. 5 on the batch, in eval mode (the net's mode is restored)."""
        with _eval(net), (autocast() if autocast else nullcontext()):
            return VelocityMSE(self.schedule)(net, **self._inputs(net)).mean().item()

    @torch.no_grad()
    def sp(self, net: nn.Module, perceptual: nn.Module, layers: str = "mid",
           autocast: Callable[[], Any] | None = None) -> float:
        """Eq. 12 (the paper's formulation, squared distance) of `net` against the frozen
        `perceptual` on the batch, at the fixed t'."""
        objective = SelfPerceptual(self.schedule, perceptual, layers=layers)
        inputs = self._inputs(net)
        with _eval(net), (autocast() if autocast else nullcontext()):
            return objective(net, inputs["x0"], inputs["cond"], t=inputs["t"], noise=inputs["noise"],
                             t_prime=self.t_prime.to(inputs["t"].device)).mean().item()

    @torch.no_grad()
    def losses(self, net: nn.Module, perceptual: nn.Module | None = None,
               autocast: Callable[[], Any] | None = None) -> dict[str, float]:
        """{"val_vmse"} (eq. 5), and with a frozen `perceptual` also "val_sp" (eq. 12, mid taps),
        the two from one forward of `net`: equal to `vmse` and `sp`."""
        if perceptual is None:
            return {"val_vmse": self.vmse(net, autocast)}
        objective = SelfPerceptual(self.schedule, perceptual, mse_weight=1.0)  # adds eq. 5 from the same v_hat
        inputs = self._inputs(net)
        with _eval(net), (autocast() if autocast else nullcontext()):
            terms = objective.terms(net, inputs["x0"], inputs["cond"], t=inputs["t"], noise=inputs["noise"],
                                    t_prime=self.t_prime.to(inputs["t"].device))
        return {"val_vmse": terms["mse"].mean().item(), "val_sp": terms["sp"].mean().item()}


class _eval:
    """Put a module in eval mode for a block, then back in the mode it was in."""

    def __init__(self, net: nn.Module):
        self.net, self.was_training = net, net.training

    def __enter__(self) -> None:
        self.net.eval()

    def __exit__(self, *exc: Any) -> None:
        self.net.train(self.was_training)

