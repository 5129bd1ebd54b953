"""What stops a run that went wrong, with one line saying what and where to go back to.

- `NonFiniteError`: a NaN or inf loss or gradient (train.nonfinite = "stop").
- `DivergenceGuard` / `DivergenceError`: a sustained finite loss spike (train.divergence), named
  with the last checkpoint saved before the rise (`spike_report`).
- `check_perceptual` / `PerceptualCheckError`: stage sp's frozen network much worse on the
  validation batch than the stage-1 loss its checkpoint recorded (sp.check_factor).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import checkpoint_before, list_checkpoints, read_meta

__all__ = ["NonFiniteError", "DivergenceError", "DivergenceGuard", "PerceptualCheckError", "check_perceptual",
           "spike_report", "WARN_SUFFIX"]

WARN_SUFFIX = "training on (train.divergence = 'warn')"  # ends the one warning of a spike under "warn"


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient (train.nonfinite = "stop")."""


class DivergenceError(RuntimeError):
    """A sustained loss spike (train.divergence = "stop"); `report` holds the figures and the
    last good checkpoint, as written to summary.json."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class PerceptualCheckError(RuntimeError):
    """Stage sp's frozen network fails `sp.check_factor`'s check: its v-MSE on the validation batch
    is far above the best loss its stage-1 checkpoint recorded (a diverged or broken model)."""


class DivergenceGuard:
    """Detects a sustained loss spike: the median loss of the last `window` steps staying above
    `factor` x its running minimum for `window` consecutive steps.

    A median over a window, not the step's loss: one batch's loss at random t (and t') is often
    3x, in stage sp 15x, another's, and a few outlier batches hardly move a median. The statistic
    runs from the first full window, so a rise at the end of the warm-up is measured against the
    loss before it; a spike is confirmed no earlier than step `start` (the warm-up plus one
    window). The gradient norm is reported, not a trigger: its scale changes by orders of
    magnitude over a healthy run, and a norm that blows up either drags the loss along (caught
    here) or turns non-finite (caught by train.nonfinite).
    """

    def __init__(self, factor: float, window: int, start: int):
        self.factor, self.window, self.start = factor, window, start
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.best = math.inf             # running minimum of the median loss
        self.best_norm = math.nan        # the median grad norm when it was reached
        self.above = 0                   # consecutive steps with median > factor x best
        self.fired: int | None = None    # began() of the confirmed spike; the guard is then done

    @classmethod
    def for_stage(cls, train, stage) -> DivergenceGuard:
        """The guard of a stage (`StageConfig`) under `train.divergence_*`, from the end of its
        warm-up plus one window. It runs with train.divergence = "off" too: its running minimum is
        the stage's best loss, recorded in every checkpoint (stage sp checks its f_* against it)."""
        return cls(train.divergence_factor, train.divergence_window, start=stage.warmup_steps + train.divergence_window)

    def update(self, step: int, loss: float, grad_norm: float) -> bool:
        """Feed stage step `step` (1-based); True once, at the step a spike is confirmed."""
        if self.fired is not None:
            return False
        self.losses.append(loss)
        if math.isfinite(grad_norm):  # NaN when DeepSpeed computed none, inf on a loss scaler's skipped step
            self.norms.append(grad_norm)
        if len(self.losses) < self.window:
            return False
        median = self.median()
        self.above = self.above + 1 if median > self.factor * self.best else 0
        if median < self.best:
            self.best, self.best_norm = median, self.median_norm()
        if self.above >= self.window and step >= self.start:
            self.fired = self.began(step)
            return True
        return False

    def began(self, step: int) -> int:
        """After step `step`: the earliest step at which a spike confirmed now or later can have
        begun (the first step of the window whose median first crossed the threshold); what was
        saved before it is good."""
        return self.fired if self.fired is not None else step - self.above - self.window + 2

    def median(self) -> float:
        return statistics.median(self.losses)

    def median_norm(self) -> float:
        return statistics.median(self.norms) if self.norms else math.nan

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "norms": list(self.norms), "best": self.best,
                "best_norm": self.best_norm, "above": self.above, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        self.losses.extend(state["losses"])
        self.norms.extend(state["norms"])
        self.best, self.best_norm, self.above, self.fired = (state[k] for k in ("best", "best_norm", "above", "fired"))


def spike_report(run_dir: Path, stage: str, step: int, offset: int, guard: DivergenceGuard,
                 grad_norm: float) -> tuple[str, dict]:
    """One line on the spike `guard` confirmed at `stage` step `step` (global step `offset + step`),
    and its report for summary.json, naming the last checkpoint of `run_dir` saved before the rise."""
    began = offset + guard.began(step)
    good = checkpoint_before(run_dir, began)
    report = {"stage": stage, "stage_step": step, "step": offset + step, "rise_began_at_step": began,
              "median_loss": guard.median(), "min_median_loss": guard.best, "factor": guard.factor,
              "window": guard.window, "grad_norm": grad_norm, "median_grad_norm": guard.median_norm(),
              "median_grad_norm_at_min": guard.best_norm, "last_good_checkpoint": str(good) if good else None,
              "checkpoints_after_the_rise": [str(p) for p in list_checkpoints(run_dir) if read_meta(p).step >= began]}
    use = " or use it as sp.init" if stage == "mse" else ""
    message = (f"loss diverging at {stage} step {step} (global step {offset + step}): the median loss of the last "
               f"{guard.window} steps, {guard.median():.4g}, has stayed above {guard.factor:g} x its minimum "
               f"{guard.best:.4g} for {guard.window} steps (the rise began at global step {began}); grad norm "
               f"{grad_norm:.3g} (median {guard.median_norm():.3g}, {guard.best_norm:.3g} at the minimum); "
               + (f"the last good checkpoint is {good} (--resume it with other settings{use})" if good
                  else "no checkpoint was saved before the rise"))
    return message, report


def check_perceptual(perceptual: torch.nn.Module, source: Path, *, factor: float, which: str,
                     vmse: Callable[[torch.nn.Module], float], frozen_of: Callable[[Path], torch.nn.Module],
                     record: Callable[[dict], None]) -> bool:
    """Stage sp's sanity check of f_* (`perceptual`, the `which` weights of stage-1 checkpoint
    `source`): its v-MSE on the validation batch (`vmse`) against the best loss stage 1 recorded.
    Above `factor` x that loss, PerceptualCheckError names the newest earlier stage-1 checkpoint
    of that run whose frozen net (`frozen_of`) passes, if one does. False when `source` records no
    loss to check against; `record` receives the figures."""
    info = read_meta(source)
    best = info.best_loss
    if info.stage != "mse" or best is None or not math.isfinite(best):
        return False
    value = vmse(perceptual)
    record({"perceptual_val_vmse": value, "stage1_best_loss": best, "source": str(source)})
    if value <= factor * best:
        return True
    better = None
    for path in reversed(list_checkpoints(source.parent.parent)):  # its run's, newest first, before it
        other = read_meta(path)
        if other.stage == "mse" and other.step < info.step and vmse(frozen_of(path)) <= factor * best:
            better = path
            break
    hint = f"use {better} as sp.init" if better else "no earlier stage-1 checkpoint of that run passes"
    raise PerceptualCheckError(
        f"sp: the perceptual network ({which} weights of {source}) has v-MSE {value:.4g} on the validation "
        f"batch, {value / best:.1f} x the best stage-1 loss {best:.4g} (sp.check_factor = {factor:g}): the "
        f"stage-1 model looks diverged or broken; {hint} (or set sp.check_factor = 0)")
