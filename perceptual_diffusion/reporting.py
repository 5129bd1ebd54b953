"""What a run writes besides its checkpoints: metrics.jsonl (and TensorBoard when installed) and
the preview sample grids, all drawn from one fixed noise so that grids compare across steps and
stages."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from .builders import model_input_shape, preview_prompts, to_data
from .config import Recipe
from .datasets import modality, num_classes
from .media import save_samples
from .sampling import ddim_sample
from .schedule import NoiseSchedule
from .sharding import is_sharded

__all__ = ["MetricsLog", "Previews", "param_digest", "warn_recipe_changes", "write_summary"]

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per record to `run_dir/metrics.jsonl` and its numbers to TensorBoard
    (as "<stage>/<key>"); does nothing when not `enabled` (processes other than the main one)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path, self.enabled = Path(run_dir) / "metrics.jsonl", enabled
        self.tb = self._tensorboard() if enabled else None

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.path.parent / "tensorboard"))

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record['stage']}/{k}", v, record["step"])

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()


class Previews:
    """Sample grids of a run: `recipe.train.num_samples` samples from one fixed noise, with fixed
    labels (cycling over the classes) or the captions of the first items, without guidance;
    latents are decoded to images. Written by the main process only."""

    def __init__(self, recipe: Recipe, schedule: NoiseSchedule, dataset, latent, device: torch.device, is_main: bool):
        self.recipe, self.schedule, self.latent, self.device, self.is_main = recipe, schedule, latent, device, is_main
        n = recipe.train.num_samples
        g = torch.Generator().manual_seed(recipe.seed + 12345)
        self.noise = torch.randn((n, *model_input_shape(recipe, latent)), generator=g)
        classes = num_classes(recipe.data)
        self.cond = (torch.arange(n) % classes) if classes else None
        if latent is not None:
            self.cond = latent.encode_prompts(preview_prompts(dataset, n))

    def example(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x_t, t, cond) of one sample on the device: a forward's worth of input."""
        cond = None if self.cond is None else self.cond[:1].to(self.device)
        return self.noise[:1].to(self.device), torch.zeros(1, dtype=torch.long, device=self.device), cond

    def generate(self, model: torch.nn.Module) -> torch.Tensor | None:
        """The samples of `model` on the main process (None elsewhere); every process runs a sharded
        model, as each holds a part of its weights."""
        if model is None or not (self.is_main or is_sharded(model)):
            return None
        cond = None if self.cond is None else self.cond.to(self.device)
        x = ddim_sample(model, self.schedule, self.noise.to(self.device), cond=cond,
                        steps=self.recipe.train.sample_steps)
        x = to_data(self.recipe, self.latent, x).cpu()
        return x if self.is_main else None

    def save(self, x: torch.Tensor, path: Path, nrow: int | None = None) -> list[Path]:
        d = self.recipe.data
        return save_samples(x, path, modality(d), nrow=nrow, scale=2, sample_rate=d.sample_rate)

    def side_by_side(self, models: list[torch.nn.Module], path: Path) -> dict[str, object]:
        """One row per model, all from the same noise, saved as `path` (e.g. MSE vs SP); the
        summary's entries for it ({} without models, and on processes other than the main one)."""
        rows = [self.generate(model) for model in models]
        if not rows or not self.is_main:
            return {}
        paths = self.save(torch.cat(rows), path, nrow=self.recipe.train.num_samples)
        return {f"{path.stem}": str(paths[0]), f"{path.stem}_files": [str(p) for p in paths]}

    def grid(self, model: torch.nn.Module, path: Path) -> Path | None:
        """`model`'s samples saved as the grid `path` (and its media files); the path or None."""
        x = self.generate(model)
        return None if x is None else self.save(x, path)[0]


def param_digest(state: dict[str, torch.Tensor]) -> str:
    """A short digest of a state dict's names and exact bytes (processes must end with equal ones)."""
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def warn_recipe_changes(saved: dict, current: dict) -> None:
    """Resuming with a changed recipe is allowed (e.g. more steps) but said out loud."""
    a, b = _flatten(saved), _flatten(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if changed:
        log.warning("resuming with a recipe that differs from the checkpoint's in: %s",
                    ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in changed))


def write_summary(run_dir: Path, result, **fields) -> dict:
    """summary.json of a run: its stages' results and `fields`; returns what was written."""
    summary = {"run_dir": str(run_dir), "stages": [asdict(s) for s in result.stages], **fields}
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
