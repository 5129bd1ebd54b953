"""Exponential moving average of a network's weights (the paper's stage-1 EMA, decay 0.9995).

    ema = EMA(net, decay=0.9995)
    ...; optimizer.step(); ema.update(net)
    sample_with(ema.model)

For a checkpoint, the weights go to safetensors and the counter to the training state:
``weights["ema"] = ema.model.state_dict()`` and ``state["ema_num_updates"] = ema.num_updates``;
or use `state_dict()` / `load_state_dict()`, which hold both.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """A frozen deep copy of `model` whose parameters track `model` by an exponential average.

    After each update, ``ema = decay * ema + (1 - decay) * param``; buffers (e.g. norm running
    statistics) are copied. With ``warmup=True`` the decay used for update number n + 1 is
    ``min(decay, (1 + n) / (10 + n))`` so that early averages are not dominated by the
    initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, params: Sequence[Tensor] | None = None) -> None:
        """Move the average one step towards `model` (call after each optimizer step).

        `params`, in `model.parameters()` order, replace the model's own parameters as the target,
        e.g. the float32 master weights of a DeepSpeed engine; buffers come from `model`.
        """
        weight = 1.0 - self.current_decay()
        ema_params = list(self.model.parameters())
        params = list(model.parameters()) if params is None else list(params)
        if len(ema_params) != len(params):
            raise ValueError(
                f"EMA.update: model has {len(params)} parameters, the average has {len(ema_params)}"
            )
        # Group by (device, dtype) of the average: _foreach_lerp_ needs uniform lists; the source
        # is cast to the average's dtype so a float32 average of a low-precision model stays exact.
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for e, p in zip(ema_params, params):
            if e.shape != p.shape:
                raise ValueError(f"EMA.update: shape mismatch {tuple(e.shape)} vs {tuple(p.shape)}")
            dst, src = groups.setdefault((e.device, e.dtype), ([], []))
            dst.append(e)
            src.append(p.detach().to(device=e.device, dtype=e.dtype))
        for dst, src in groups.values():
            torch._foreach_lerp_(dst, src, weight)
        ema_buffers = list(self.model.buffers())
        buffers = list(model.buffers())
        if len(ema_buffers) != len(buffers):
            raise ValueError(
                f"EMA.update: model has {len(buffers)} buffers, the average has {len(ema_buffers)}"
            )
        for e, b in zip(ema_buffers, buffers):
            e.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"model": averaged state dict, "num_updates": int}``."""
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict` (decay and warmup stay as constructed)."""
        missing = {"model", "num_updates"} - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)}")
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
