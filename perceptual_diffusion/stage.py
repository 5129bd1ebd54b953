"""The state of one training stage (`StageState`) and what a run returns (`StageResult`,
`TrainResult`). A stage's state is everything a checkpoint must hold beyond the weights and the
optimizer for a resume to continue bit for bit: its step, data position, objective generator,
EMA count, counters and divergence statistic."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import restore_rng_state
from .config import StageConfig
from .ema import EMA
from .guards import DivergenceGuard

__all__ = ["StageResult", "TrainResult", "StageState"]

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: str
    steps: int
    final_loss: float
    seconds: float
    checkpoint: str
    skipped_nonfinite: int = 0
    skipped_items: int = 0


@dataclass
class TrainResult:
    run_dir: str
    stages: list[StageResult] = field(default_factory=list)
    interrupted_by: int | None = None   # the signal number that stopped the run, if any
    stopped_at: int | None = None       # global step of the interruption checkpoint


@dataclass
class StageState:
    """The stage being trained: what the trainer's step reads and updates."""

    name: str
    cfg: StageConfig
    offset: int                          # global step at the stage's start
    ema: EMA
    lr_sched: Any
    objective: Any
    gen: torch.Generator                 # the objective's t, t', noise and dropout draws
    perceptual: torch.nn.Module | None   # stage sp's f_*
    reference: torch.nn.Module | None    # the frozen net of the val_sp diagnostic
    batches: Any                         # the data loader's iterator
    data_pos: list[int]                  # the sampler position after the last batch consumed
    guard: DivergenceGuard
    step: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"skipped_nonfinite": 0, "skipped_items": 0})
    window: list[float] = field(default_factory=list)   # losses since the last log line
    grad_norm: float = math.nan
    last_loss: float = math.nan
    t_start: float = field(default_factory=time.time)
    path: Path | None = None             # the newest checkpoint saved

    def next_batch(self) -> dict:
        """The next batch with at least one readable item (the data position follows)."""
        while True:
            batch = next(self.batches)
            self.data_pos[:] = batch["position"]
            self.counters["skipped_items"] += batch.get("skipped", 0)
            if "x" in batch:
                return batch

    def load_state_dict(self, state: dict[str, Any], rank: int, world: int) -> None:
        """Continue from a checkpoint's training state: step, counters, guard and, when the process
        count is the one saved, this process's RNGs (they restart otherwise, with a warning)."""
        self.step = state.get("stage_step", 0)
        self.counters = dict(state.get("counters", self.counters))
        rngs = state["rng"]
        if len(rngs) != world:
            log.warning("resuming %d processes from a checkpoint of %d: RNG streams restart", world, len(rngs))
        else:
            restore_rng_state(rngs[rank], {"objective": self.gen})
        if state.get("divergence"):
            self.guard.load_state_dict(state["divergence"])

    def state_dict(self, rng: list, optimizer: dict, scaler: dict | None) -> dict[str, Any]:
        """The checkpoint's training state, with every process's `rng`, the full `optimizer` state
        and the grad scaler's."""
        return {"optimizer": optimizer, "lr_scheduler": self.lr_sched.state_dict(), "scaler": scaler,
                "rng": rng, "data_position": list(self.data_pos), "stage_step": self.step,
                "ema_updates": self.ema.num_updates, "counters": self.counters, "divergence": self.guard.state_dict()}

    def meta(self, final: bool, recipe: dict) -> dict[str, Any]:
        """The checkpoint's meta: stage, step, whether it ends the stage, the recipe, the best loss."""
        best = self.guard.best
        return {"stage": self.name, "stage_step": self.step, "final": final, "recipe": recipe,
                "best_loss": best if math.isfinite(best) else None}

    def result(self) -> StageResult:
        return StageResult(stage=self.name, steps=self.cfg.steps, final_loss=self.last_loss,
                           seconds=time.time() - self.t_start, checkpoint=str(self.path), **self.counters)
