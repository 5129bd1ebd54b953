r"""Small-scale reproduction of the paper's Tables 1-8 and Figures 3-5 on data that ships, with
the matched MSE control of every SP model.

    python benchmarks/reproduce.py --jobs 2        # full scale on 2 cores: ~2.8 h (estimate below), resumable
    python benchmarks/reproduce.py --quick         # pipeline check: all tables, tiny, ~25 min (estimate)
    python benchmarks/reproduce.py --seeds 5 --samples 1000 --scale-steps 2 --tasks digits
    python benchmarks/reproduce.py --tasks circles,digits,digits_uncond,photo_patches,moving_shapes,tones

Tasks: "circles" (unconditional one-disk images), "digits" (class-conditional), "digits_uncond"
(section 5.7) and "photo_patches" (natural-image patches of scikit-learn's two photos, measured
against held-out patches that share no pixel with the training ones), each from its recipe in
recipes/image/; "moving_shapes" (video) and "tones" (audio) on request. For every task and seed:
  - the MSE base: stage mse from scratch;
  - SP: an SP-only run from the base's final checkpoint (``train.stages=['sp']``, ``sp.init=<base>``),
    the frozen network and the start both the base's EMA (Algorithm 1);
  - the control: stage mse continued from the same checkpoint (``mse.init=<base>``), from the same
    weights SP starts from (``mse.init_weights``), with every optimisation setting of the recipe's
    [sp] section copied to [mse] (steps, batch, accumulation, lr, weight decay, betas, warm-up,
    grad clip, EMA decay and warm-up, cond dropout: `control_overrides`) and the same seed, so the
    trainer feeds it the same batches: what SP gains over simply training on.
Every SP variant (Tables 2-6, on the conditional digits: ``--ablation-tasks``) is an SP-only run
from the same base and is compared with the same control. Table 6's "SP model as perceptual
network" is a second SP round from the default SP run's final checkpoint (its EMA is frozen).
The artifact tables (``--artifact-tasks``, default every image task) put every SP variant the
library has (layers mid / encoder / decoder / all, mse_weight 0 / 0.1 / 1, t' uniform / near /
normal, L_sp / L_sp2) against the control on the task's headline metric, its KID, its grain
ratio and the high-frequency energy ratio; a last table says per variant and task whether it
beats the control (the paired 95% interval on the better side of 0) and whether its HF ratio is
no farther from 1 than the control's, and whether both hold on every task.

Every row is evaluated on the same number of samples from the same initial noise (sampling
seed 0 for every row and training seed), with EMA weights, DDIM trailing, eta 0. Tables, first
the verdicts (`render_verdicts`: per task, SP, the control, SP - control with its interval, the
headline metric's floor, and "SP better" / "SP worse" / "not resolved", flagged when the
difference is under the floor's std), then per task "SP vs its matched control": per metric the real-versus-real floor, the MSE base, SP
and the control (mean +- sample std over seeds) and SP - control paired by seed, with the 95%
percentile-bootstrap interval of its mean (`bootstrap_ci`: 10,000 resamples of the seeds, RNG
seed 0) and the number of seeds in which SP is better. Then Table 1 (MSE / SP / control at 25
and 50 steps, MSE + CFG 7.5 with and without rescale 0.7 when conditional), Tables 2-6 (SP
variants and the control at 25 steps), Table 7 (MSE and the control with CFG 7.5 rescale 0.7, SP
with CFG 2/3/4/7.5 rescale 0.7), Table 8 (unconditional MSE / SP / control); each has a column
of every row's paired difference from the control (same sampling steps and guidance) on the
task's headline metric (the first column) and ends with the floor rows. The floor of a metric
(`compute_floors`, via metrics.real_vs_real_floor) is its value between two disjoint sets of
real data of the rows' sample count, mean +- std over 10 splits, cached in floors.json;
photo_patches also gets n training patches measured as a model row is. Columns: circles'
validity, parameter FD and coverage; the digits' FID, KID (with its SE), IS and label accuracy;
photo_patches' KID (with its SE), FD and grain ratio (metrics/patches.py); and for every image
task the spectrum metric's high-frequency energy ratio (1 = like the data).

Outputs (``--results-dir``, default benchmarks/results; runs/reproduce/quick/results for
--quick): tables.md, rows.jsonl (one JSON object per (row, seed): the evaluate() dict plus
task, variant, seed, steps, guidance, rescale, training steps and training wall seconds),
floors.json, figures/<task>_samples.png (rows MSE / control / SP / MSE+CFG 7.5 rescale 0.7 from
the same noise; Figure 3/4) and figures/<task>_trajectory.png (x0 prediction over the sampling
steps; per sample a MSE row then a SP row, columns are steps; Figure 5).

Resumable: runs live under ``--work-dir`` (default runs/reproduce/<scale>); a run with a final
checkpoint is not retrained, an interrupted one resumes from its latest checkpoint, and a row
already in rows.jsonl (same key, same checkpoint, every column present) is not re-evaluated.
``--jobs N`` deals the seeds round-robin to N worker processes (one torch thread each; each is
the plain command with ``--seed-list``, so resumable alike), then draws the figures and tables.

The SP stage's length and lr (issue 11, item 5) are chosen in a pilot, not on the tables' rows:
``--sp-steps N`` and ``--sp-lr X`` set every SP run's (and so the control's) steps and lr, and
``--sample-seed K`` draws the rows from other noise than the tables' seed 0; training seeds the
tables do not use (``--seed-list 10,11``) keep the pilot's models apart from the tables' too. Runs
after the MSE base are named by those settings (``sp-steps300-lr0.001``), so candidates given the
same ``--work-dir`` train the bases once and keep their own SP runs and controls, e.g.

    python benchmarks/reproduce.py --jobs 2 --tasks digits_uncond,photo_patches --ablation-tasks '' \
        --artifact-tasks '' --seed-list 10,11 --sample-seed 1 --sp-steps 300 --sp-lr 1e-3 \
        --work-dir runs/pilot --results-dir runs/pilot/sp300-lr1e-3

and ``benchmarks/sp_pilot.py`` reads the candidates back and applies the rule that picks one.

The pilot's choice (RESULTS.md, "SP length pilot") is the full scale's: every SP run and control
of an image task is 300 steps (30% of stage mse) at lr 1e-3 (the lr stage mse ends at), not the
recipes' [sp] 400 steps at 1e-4; video and audio keep their recipes' SP lr.

Budget of the full scale (per run: images 1000 MSE + 300 SP or control steps at batch 16 and
16x16, 300 samples per row, 4 seeds; video 4500 + 300 steps and audio 3000 + 300 steps as their
recipes, 100 and 200 clips per row). Measured on 2 CPU cores (AMD EPYC, torch 2.9 CPU, tiny presets, one
torch thread per process) with the cores shared by three processes, i.e. about 2/3 of a core each:
  image step at 16x16: MSE 0.20-0.24 s, the control 0.22 s, SP 0.30 s (photo_patches, 50-step
  timings); a row of 300 samples: 25 steps 25-45 s (photo_patches 44 s, with its metrics), 50
  steps or CFG 45-80 s (the rows of the last full run and a photo_patches row)
  per seed: circles ~650 s (350 s training, 6 rows), digits_uncond ~550 s, photo_patches ~720 s,
  digits ~1700 s (900 s for 11 runs, 21 rows): ~3600 s of process time, 4 seeds ~14,500 s
  the artifact tables add 27 SP runs and rows per seed (8 on each of circles, digits_uncond and
  photo_patches, 3 on digits) at ~100 s each (estimated from the step and row times above; the
  committed run's SP variants took 48-127 s each in a worker): ~2,700 s per seed, ~10,800 s for 4 seeds
  audio (tones, 3000 + 300 + 300 steps) ~640 s per seed with its rows, measured 2026-12-03 with
  another run on the other core; video (4500 + 300 + 300 steps) ~1,500-2,000 s per seed estimated
  from its recipe's run (~12,000 s of process time for 4 seeds, about 1.7 h more with --jobs 2)
Estimated wall time of the default full run (4 image tasks, 4 seeds, every ablation on all 4
seeds, the artifact tables): with --jobs 2 on an otherwise idle 2-core machine each worker has a
core (~1.5x the speeds above): 25,300 / 1.5 / 2 ~ 8,400 s, about 2.3 h, plus a few minutes of
floors, figures and tables (without the artifact tables, ``--artifact-tasks ''``, about 1.4 h).
Those figures were measured with 200-step SP runs; at 300 steps the SP runs' and controls'
training is 1.5x longer, about 20% more in all: ~2.8 h; on
cores as busy as during the measurement ~3.5 h; in one process ~4.7 h. Measured 2026-12-03 (the
committed tables): 3.4 h of wall time with --jobs 2, the first 80 min of it with two other training
processes on the same 2 cores, so about 2.8 h on idle ones. It resumes where it stopped. The audio task
adds ~0.4 h with --jobs 2, the video task ~1.7 h. Nothing is cut at this scale: 4 seeds for every table, 300
samples per row (the digits' floor needs 2 x n <= 1,797 real digits; photo_patches' 2 x n <= 4,096
held-out patches). `--scale-steps 2` doubles every run (2000 + 600 image steps). The digits are
8x8 images upsampled, so 16x16 loses nothing. Circles at 16x16: the disk detector passes 99% of
real disks there (all at 32x32), so the circles rows compare models with each other (the floor
row shows the real disks' scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sp_step import cpu_name  # noqa: E402  (one CPU naming for both benchmark scripts)

from perceptual_diffusion.checkpoint import final_checkpoint, list_checkpoints, read_meta
from perceptual_diffusion.config import Recipe, StageConfig, load_recipe
from perceptual_diffusion.datasets import build_dataset, build_reference_dataset
from perceptual_diffusion.evaluation import evaluate, generate, load_model, reference_images
from perceptual_diffusion.metrics import radial_power_spectrum, real_vs_real_floor, save_spectrum_plot
from perceptual_diffusion.images import save_grid
from perceptual_diffusion.media import save_samples
from perceptual_diffusion.sampling import ddim_sample
from perceptual_diffusion.builders import build_schedule
from perceptual_diffusion.trainer import Trainer

log = logging.getLogger("reproduce")

SAMPLE_SEED = 0          # the initial noise of every row (and every training seed)
CFG_MSE = (7.5, 0.7)     # Table 1's MSE + CFG (+ rescale) and the figures' third row
CFG_SP = (2.0, 3.0, 4.0, 7.5)  # Table 7, each with rescale 0.7
RESCALE = 0.7


# ------------------------------------------------------------------------------ what is run
@dataclass(frozen=True)
class Column:
    """A metric column: the evaluate() key, its header, and which way is better: "higher", "lower",
    "one" (1 means like the data) or "se" (a standard error: shown, never compared)."""

    key: str
    header: str
    better: str = "lower"


@dataclass(frozen=True)
class Task:
    name: str
    recipe: str
    conditional: bool
    metrics: tuple[str, ...]                    # evaluate() metric names
    columns: tuple[Column, ...]                 # the first is the task's headline (the Δ column of the tables)
    modality: str = "image"                     # video and audio tasks get one MSE-vs-SP table

    def shape_text(self, size: int) -> str:
        """What one sample is, e.g. "16x16" or "8 frames of 16x16" or "2048 samples at 8000 Hz"."""
        d = load_recipe(ROOT / self.recipe, [f"data.size={size}"]).data
        if self.modality == "video":
            return f"{d.frames} frames of {size}x{size}"
        if self.modality == "audio":
            return f"{d.length} samples at {d.sample_rate} Hz"
        return f"{size}x{size}"


_HF = Column("spectrum_hf_ratio", "HF energy ratio (1 = data)", "one")
_CIRCLES_COLS = (Column("valid_fraction", "valid ↑", "higher"), Column("param_fd", "param FD ↓"),
                 Column("coverage", "coverage ↑", "higher"), _HF)
_DIGITS_COLS = (Column("digits_fid", "digits-FID ↓"), Column("digits_kid", "digits-KID ↓"),
                Column("digits_kid_se", "KID SE", "se"), Column("digits_is", "digits-IS ↑", "higher"))
_PATCHES_COLS = (Column("patches_kid", "patches-KID ↓"), Column("patches_kid_se", "KID SE", "se"),
                 Column("patches_fd", "patches-FD ↓"),
                 Column("patches_laplacian_ratio", "grain ratio (1 = data)", "one"), _HF)
TASKS = {
    "circles": Task("circles", "recipes/image/circles.toml", False, ("circles", "spectrum"), _CIRCLES_COLS),
    "digits": Task("digits", "recipes/image/digits.toml", True, ("digits", "spectrum"),
                   _DIGITS_COLS + (Column("label_accuracy", "label acc ↑", "higher"), _HF)),
    "digits_uncond": Task("digits_uncond", "recipes/image/digits_uncond.toml", False, ("digits", "spectrum"),
                          _DIGITS_COLS + (_HF,)),
    "photo_patches": Task("photo_patches", "recipes/image/photo_patches.toml", False, ("patches", "spectrum"),
                          _PATCHES_COLS),
    "moving_shapes": Task("moving_shapes", "recipes/video/moving_shapes_uncond.toml", False, ("moving_shapes",),
                          (Column("valid_fraction", "valid clips ↑", "higher"),
                           Column("disk_clip_fraction", "clips of disks ↑", "higher"),
                           Column("frame_disk_fraction", "frames with one disk ↑", "higher"),
                           Column("param_fd", "param FD ↓")), "video"),
    "tones": Task("tones", "recipes/audio/tones_uncond.toml", False, ("tones",),
                  (Column("valid_fraction", "valid ↑", "higher"),
                   Column("peak_concentration", "peak energy fraction ↑", "higher"),
                   Column("pitch_error_cents", "pitch error (cents) ↓"), Column("pitch_tv", "pitch TV ↓")),
                  "audio"),
}
IMAGE_TASKS = [t for t in TASKS if TASKS[t].modality == "image"]
DEFAULT_TASKS = ["circles", "digits", "digits_uncond", "photo_patches"]  # the full run; video and audio on request


@dataclass(frozen=True)
class Variant:
    """A run started from `parent`'s final checkpoint with `overrides` on the recipe: stage sp (an SP
    run), or stage mse continued (the matched control, its settings from `control_overrides`)."""

    name: str
    overrides: tuple[str, ...] = ()
    parent: str = "mse"
    stage: str = "sp"


VARIANTS = {v.name: v for v in (
    Variant("sp"),  # mid, uniform t', mse distance, sp formulation, EMA of stage mse frozen
    Variant("control", stage="mse"),  # MSE continued as SP is trained: the same start, settings and batches
    Variant("layers_encoder", ("sp.layers=encoder",)),
    Variant("layers_decoder", ("sp.layers=decoder",)),
    Variant("layers_encoder+mid", ("sp.layers=encoder+mid",)),
    Variant("tprime_near", ("sp.t_prime=near",)),
    Variant("tprime_normal", ("sp.t_prime=normal",)),
    Variant("distance_mae", ("sp.distance=mae",)),
    Variant("formulation_sp2", ("sp.formulation=sp2",)),
    Variant("layers_all", ("sp.layers=all",)),
    Variant("mse_weight_0.1", ("sp.mse_weight=0.1",)),  # L_sp + 0.1 x eq. 5 from the same forward
    Variant("mse_weight_1", ("sp.mse_weight=1",)),
    Variant("sp_repeat", ("sp.perceptual_weights=ema",), parent="sp"),  # Table 6: SP model as f_*
)}
ABLATIONS = [v for v in VARIANTS if v not in ("sp", "control")]
# Issue 11, item 6: every SP variant the library has, on every image task, against the control.
ARTIFACT_ROWS = [("Midblock, L_sp (the paper's default)", "sp"), ("All encoder layers", "layers_encoder"),
                 ("All decoder layers", "layers_decoder"), ("Every tap", "layers_all"),
                 ("+ 0.1 x eq. 5 (mse_weight 0.1)", "mse_weight_0.1"), ("+ eq. 5 (mse_weight 1)", "mse_weight_1"),
                 ("t' = t ± 40", "tprime_near"), ("t' ~ N(t, 100)", "tprime_normal"), ("L_sp2", "formulation_sp2")]


def stage_of(model: str) -> str:
    return "mse" if model == "mse" else VARIANTS[model].stage


def control_overrides(recipe: Recipe) -> list[str]:
    """--set overrides that make stage mse the matched control of `recipe`'s SP stage: every
    optimisation field of [sp] (steps, batch, accumulation, lr, weight decay, betas, warm-up, grad
    clip, EMA decay and warm-up, cond dropout: all of StageConfig but where it starts) copied to
    [mse], and mse.init_weights = the weights SP starts from (the frozen ones by default). With
    mse.init = SP's sp.init and the same seed, the trainer gives both the same data order."""
    sp = recipe.sp
    copied = [f"mse.{f.name}={json.dumps(getattr(sp, f.name))}" for f in dataclasses.fields(StageConfig)
              if f.name not in ("init", "init_weights")]
    start = sp.perceptual_weights if sp.init_weights == "frozen" else sp.init_weights
    return copied + [f"mse.init_weights={start}"]


@dataclass(frozen=True)
class Scale:
    mse_steps: dict[str, int]    # per task
    sp_steps: dict[str, int]     # per SP run (and control) of a task
    sp_lr: dict[str, float]      # their lr per task; 0: the recipe's [sp] lr
    samples: dict[str, int]      # per row of a task
    sizes: dict[str, int]        # images are size x size
    seeds: int
    checkpoint_every: int


def _per_task(image: float, video: float, audio: float) -> dict[str, float]:
    """One value per task: `image` for the image tasks, `video` for moving_shapes, `audio` for tones."""
    return {name: {"image": image, "video": video, "audio": audio}[t.modality] for name, t in TASKS.items()}


SCALES = {
    "full": Scale(mse_steps=_per_task(1000, 4500, 3000), sp_steps=_per_task(300, 300, 300),
                  sp_lr=_per_task(1e-3, 0, 0), samples=_per_task(300, 100, 200), sizes=_per_task(16, 16, 16), seeds=4, checkpoint_every=250),
    "quick": Scale(mse_steps=_per_task(30, 30, 30), sp_steps=_per_task(15, 15, 15), sp_lr=_per_task(0, 0, 0),
                   samples=_per_task(40, 24, 24), sizes=_per_task(16, 16, 16), seeds=2, checkpoint_every=0),
}


@dataclass(frozen=True)
class Unit:
    """One evaluated row of one task (before seeds): `model` is "mse" or a variant name."""

    task: str
    model: str
    steps: int = 25
    guidance: float = 1.0
    rescale: float = 0.0

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.guidance != 1.0 else 1)


@dataclass
class Table:
    """Model rows (labels, unit); kind "paired" is the per-metric SP-versus-control table of a task,
    whose rows are the MSE base, SP and the control."""

    title: str
    task: str
    label_headers: list[str]
    rows: list[tuple[list[str], Unit]] = field(default_factory=list)
    note: str = ""
    kind: str = "rows"


CONTROL_LABEL = "MSE continued (control)"


def plan_tables(tasks: list[str], ablation_tasks: list[str], artifact_tasks: list[str] = ()) -> list[Table]:
    """Per task the SP-versus-control comparison, then the analogues of the paper's Tables 1-8, then
    per artifact task every SP variant against the control (issue 11, item 6); every table that
    holds SP rows holds the matched control too."""
    tables = [Table(f"SP vs its matched control ({name})", name, ["Metric"],
                    [(["MSE base"], Unit(name, "mse")), (["SP"], Unit(name, "sp")),
                     (["Control"], Unit(name, "control"))], kind="paired") for name in tasks]
    for name in tasks:
        task = TASKS[name]
        if task.modality != "image":
            tables.append(Table(f"Modalities ({name}, {task.modality}): MSE vs SP", name, ["Loss"],
                                [(["MSE"], Unit(name, "mse")), (["SP"], Unit(name, "sp")),
                                 ([CONTROL_LABEL], Unit(name, "control"))]))
            continue
        t = Table(f"Table 1 ({name})", name, ["Loss", "CFG", "Rescale", "Steps", "NFE"])
        t.rows += [(["MSE", "", "", str(s)], Unit(name, "mse", s)) for s in (25, 50)]
        if task.conditional:
            t.rows += [(["MSE", "7.5", r, "25"], Unit(name, "mse", 25, 7.5, float(r or 0))) for r in ("", "0.7")]
        t.rows += [(["SP", "", "", str(s)], Unit(name, "sp", s)) for s in (25, 50)]
        t.rows += [([CONTROL_LABEL, "", "", str(s)], Unit(name, "control", s)) for s in (25, 50)]
        for labels, u in t.rows:
            labels.append(str(u.nfe))
        tables.append(t)
    ablations = [
        ("Table 2 ({}): layer l", "Layer", [("All encoder layers", "layers_encoder"),
                                            ("All decoder layers", "layers_decoder"),
                                            ("All encoder layers + midblock", "layers_encoder+mid"),
                                            ("Only midblock ✓", "sp")]),
        ("Table 3 ({}): timestep t' (clamped to [1, T])", "Timestep",
         [("t' = t ± 40", "tprime_near"), ("t' ~ N(t, 100)", "tprime_normal"), ("t' ~ U(1, T) ✓", "sp")]),
        ("Table 4 ({}): distance function", "Distance",
         [("Mean absolute distance", "distance_mae"), ("Mean squared distance ✓", "sp")]),
        ("Table 5 ({}): formulation", "Formulation", [("L_sp ✓", "sp"), ("L_sp2", "formulation_sp2")]),
        ("Table 6 ({}): perceptual network", "Perceptual network",
         [("MSE model ✓", "sp"), ("SP model (second SP round)", "sp_repeat")]),
    ]
    notes = {"Table 6": "The second round (sp_repeat) trains as long again from the SP run's final checkpoint, "
                        "with that run's EMA as the frozen network (twice the control's steps)."}
    for name in ablation_tasks:
        for title, header, rows in ablations:
            tables.append(Table(title.format(name), name, [header],
                                [([label], Unit(name, model)) for label, model in rows]
                                + [([CONTROL_LABEL], Unit(name, "control"))],
                                note=notes.get(title.split(" (")[0], "")))
    for name in tasks:
        if TASKS[name].conditional:
            t = Table(f"Table 7 ({name}): SP with classifier-free guidance", name, ["Loss", "CFG", "Rescale"])
            t.rows.append((["MSE", "7.5", "0.7"], Unit(name, "mse", 25, *CFG_MSE)))
            t.rows.append(([CONTROL_LABEL, "7.5", "0.7"], Unit(name, "control", 25, *CFG_MSE)))
            t.rows.append((["SP", "", ""], Unit(name, "sp")))
            t.rows += [(["SP", f"{w:g}", "0.7"], Unit(name, "sp", 25, w, RESCALE)) for w in CFG_SP]
            tables.append(t)
    for name in tasks:
        if not TASKS[name].conditional and TASKS[name].modality == "image":
            tables.append(Table(f"Table 8 ({name}): unconditional generation", name, ["Loss"],
                                [(["MSE"], Unit(name, "mse")), (["SP"], Unit(name, "sp")),
                                 ([CONTROL_LABEL], Unit(name, "control"))]))
    for name in artifact_tasks:
        tables.append(Table(f"SP variants and the grain ({name})", name, ["SP variant"],
                            [(["MSE base"], Unit(name, "mse"))]
                            + [([label], Unit(name, model)) for label, model in ARTIFACT_ROWS]
                            + [([CONTROL_LABEL], Unit(name, "control"))], kind="artifact"))
    return tables


def models_of(task: str, tables: list[Table]) -> list[str]:
    """The runs a task needs, parents first."""
    needed = {u.model for t in tables for _, u in t.rows if u.task == task}
    for m in list(needed):
        while m != "mse":
            m = VARIANTS[m].parent
            needed.add(m)
    return [m for m in ["mse", *VARIANTS] if m in needed]  # VARIANTS lists parents first


# ------------------------------------------------------------------------------ training
@dataclass
class Config:
    label: str                   # names the work dir and goes into every row key
    mse_steps: dict[str, int]
    sp_steps: dict[str, int]
    samples: dict[str, int]
    sizes: dict[str, int]
    seeds: list[int]
    checkpoint_every: int
    work_dir: Path
    results_dir: Path
    progress: bool
    sp_lr: dict[str, float] = field(default_factory=dict)  # per task, > 0: the SP runs' (and controls') lr, not the recipe's
    sp_suffix: str = ""          # names the SP-stage runs of a non-default SP length or lr (--sp-steps / --sp-lr)
    sample_seed: int = SAMPLE_SEED
    jobs: int = 1                # --jobs: worker processes of one torch thread each when > 1


class Interrupted(Exception):
    def __init__(self, signum: int | None):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


def run_dir_of(cfg: Config, task: str, seed: int, model: str) -> Path:
    """<work dir>/<task>/seed<k>/<model>; every run after the MSE base carries `cfg.sp_suffix`, so
    configurations that differ only in the SP stage's length or lr share one work dir and its bases
    (the SP-length pilot: one invocation per candidate, the same --work-dir)."""
    return cfg.work_dir / task / f"seed{seed}" / (model if model == "mse" else model + cfg.sp_suffix)


def scaled_decay(stage: StageConfig, steps: int) -> int:
    """The recipe's `decay_steps` for a run of `steps` instead of `stage.steps`: the same share of
    the run."""
    return round(stage.decay_steps * steps / stage.steps)


def train(cfg: Config, task: str, seed: int, model: str, phase: str) -> Path:
    """Train (or resume, or skip) one run; returns its final checkpoint. The run's accumulated
    training wall seconds go to <run>/reproduce.json."""
    run_dir = run_dir_of(cfg, task, seed, model)
    stage = stage_of(model)
    steps = cfg.mse_steps[task] if model == "mse" else cfg.sp_steps[task]
    sidecar = run_dir / "reproduce.json"
    info = json.loads(sidecar.read_text()) if sidecar.exists() else {"wall_s": 0.0}
    final = final_checkpoint(run_dir, stage)
    if final is not None:
        done = read_meta(final).stage_step
        if done != steps:
            raise SystemExit(f"{run_dir} holds a finished {done}-step run, this configuration wants "
                             f"{steps} steps; use another --work-dir")
        log.info("%s %s seed %d %s: trained already (%d steps)", phase, task, seed, model, steps)
        return final
    parent = None
    if model != "mse":
        parent = final_checkpoint(run_dir_of(cfg, task, seed, VARIANTS[model].parent), stage_of(VARIANTS[model].parent))
        if parent is None:  # models_of() orders parents first
            raise RuntimeError(f"{VARIANTS[model].parent} of {task} seed {seed} has no final checkpoint")
    recipe = load_recipe(ROOT / TASKS[task].recipe, run_overrides(cfg, task, seed, model, parent))
    resume = "latest" if list_checkpoints(run_dir) else None
    log.info("%s %s seed %d %s: %s %d steps at %dx%d%s", phase, task, seed, model, stage.upper(), steps,
             cfg.sizes[task], cfg.sizes[task], " (resuming)" if resume else "")
    t0 = time.time()
    try:
        result = Trainer(recipe, run_dir, resume=resume, progress=cfg.progress).run()
    finally:
        info["wall_s"] = round(info["wall_s"] + time.time() - t0, 2)
        sidecar.write_text(json.dumps(info) + "\n")
    if result.interrupted_by is not None or result.stopped_at is not None:
        raise Interrupted(result.interrupted_by)
    log.info("%s %s seed %d %s: done in %.0f s", phase, task, seed, model, info["wall_s"])
    return final_checkpoint(run_dir, stage)


def run_overrides(cfg: Config, task: str, seed: int, model: str, parent: Path | None) -> list[str]:
    """The --set overrides of one run on its task's recipe: the scale's steps and size, one stage,
    and for a run after the MSE base its start (`parent`, that base's or variant's final checkpoint)
    with the variant's overrides, or the control's settings copied from [sp]."""
    recipe_path = ROOT / TASKS[task].recipe
    shipped = load_recipe(recipe_path)
    stage = stage_of(model)
    overrides = [f"seed={seed}", f"name={task}-seed{seed}-{model}", f"data.size={cfg.sizes[task]}",
                 f"mse.steps={cfg.mse_steps[task]}", f"sp.steps={cfg.sp_steps[task]}",
                 f"mse.decay_steps={scaled_decay(shipped.mse, cfg.mse_steps[task])}",
                 f"sp.decay_steps={scaled_decay(shipped.sp, cfg.sp_steps[task])}",
                 f"train.checkpoint_every={cfg.checkpoint_every}", "train.sample_every=0", "train.keep_last=1",
                 f"train.stages=['{stage}']"]
    if model != "mse":  # the base is the same whatever the SP stage: configurations share it
        overrides += [f"sp.lr={cfg.sp_lr[task]!r}"] if cfg.sp_lr.get(task) else []
        start = json.dumps(str(parent.resolve()))
        if stage == "sp":
            overrides += [f"sp.init={start}", *VARIANTS[model].overrides]
        else:  # the control: stage mse with the SP stage's settings, from the checkpoint SP starts from
            overrides += [*control_overrides(load_recipe(recipe_path, overrides)), f"mse.init={start}"]
    return overrides


def lineage(cfg: Config, task: str, seed: int, model: str) -> tuple[dict, dict]:
    """Steps and training wall seconds of a model and every run it starts from."""
    steps, wall = {}, {}
    while True:
        info_path = run_dir_of(cfg, task, seed, model) / "reproduce.json"
        steps[model] = cfg.mse_steps[task] if model == "mse" else cfg.sp_steps[task]
        wall[model] = json.loads(info_path.read_text()).get("wall_s") if info_path.exists() else None
        if model == "mse":
            return steps, wall
        model = VARIANTS[model].parent


# ------------------------------------------------------------------------------ evaluation
def row_key(cfg: Config, u: Unit, seed: int) -> str:
    return (f"{cfg.label}|{u.task}|{u.model}|steps{u.steps}|cfg{u.guidance:g}|rescale{u.rescale:g}|"
            f"n{cfg.samples[u.task]}|seed{seed}")


def read_rows(path: Path) -> dict[str, dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            rows[row["key"]] = row
    return rows


def _checkpoint_time(path: Path) -> str:
    return read_meta(path).time


def evaluate_row(cfg: Config, u: Unit, seed: int, checkpoint: Path, rows: dict[str, dict], phase: str) -> dict:
    key = row_key(cfg, u, seed)
    old = rows.get(key)
    if (old is not None and old.get("checkpoint_time") == _checkpoint_time(checkpoint)
            and all(c.key in old["eval"] for c in TASKS[u.task].columns)):  # a row from before a new column: again
        return old
    size, n = cfg.sizes[u.task], cfg.samples[u.task]
    t0 = time.time()
    loaded = load_model(checkpoint)
    ev = evaluate(loaded, list(TASKS[u.task].metrics), n=n, steps=u.steps, guidance=u.guidance,
                  rescale=u.rescale, seed=cfg.sample_seed, batch_size=128 if size <= 16 else 64)
    steps, wall = lineage(cfg, u.task, seed, u.model)
    row = {"key": key, "scale": cfg.label, "task": u.task, "variant": u.model, "seed": seed,
           "steps": u.steps, "nfe": u.nfe, "guidance": u.guidance, "rescale": u.rescale, "samples": n,
           "size": size, "train_steps": steps, "train_wall_s": wall, "eval_wall_s": round(time.time() - t0, 2),
           "checkpoint_time": _checkpoint_time(checkpoint), "torch_threads": torch.get_num_threads(),
           "jobs": cfg.jobs, "eval": ev}
    with open(cfg.results_dir / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    rows[key] = row
    cols = ", ".join(f"{c.key}={ev[c.key]:.4g}" for c in TASKS[u.task].columns)
    log.info("%s %s seed %d %s steps %d cfg %g rescale %g: %s (%.0f s)", phase, u.task, seed, u.model, u.steps,
             u.guidance, u.rescale, cols, row["eval_wall_s"])
    return row


# ------------------------------------------------------------------------------ paired statistics
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def bootstrap_ci(diffs: list[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (one per training seed):
    `resamples` resamples of the seeds with replacement, the (1 - level) / 2 and (1 + level) / 2
    quantiles of their means; deterministic given `seed`. It cannot be wider than the range of the
    differences, so with a handful of seeds it undercovers: read it with the real-vs-real floor."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or len(d) < 1 or not np.isfinite(d).all():
        raise ValueError(f"need one or more finite differences, got {diffs!r}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _better(column: Column, row: float, control: float) -> bool:
    if column.better == "higher":
        return row > control
    if column.better == "lower":
        return row < control
    return abs(row - 1) < abs(control - 1)


def _digits(*values: float) -> int:
    """Decimals that give three significant digits to the largest of `values` (as `cell`)."""
    top = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    return min(6, max(1, 2 - math.floor(math.log10(top)))) if top else 3


def paired_cell(column: Column, rows: list[float], controls: list[float]) -> str:
    """Row − control over the seeds that have both (finite): "mean [lo, hi], k/m better" with the
    bootstrap 95% interval of the mean."""
    pairs = [(r, c) for r, c in zip(rows, controls) if math.isfinite(r) and math.isfinite(c)]
    if not pairs or column.better == "se":
        return "–"
    diffs = [r - c for r, c in pairs]
    mean = statistics.fmean(diffs)
    wins = f"{sum(_better(column, r, c) for r, c in pairs)}/{len(pairs)} better"
    if len(pairs) == 1:
        return f"{mean:+.{_digits(mean)}f} (1 seed)"
    lo, hi = bootstrap_ci(diffs)
    k = _digits(mean, lo, hi)
    return f"{mean:+.{k}f} [{lo:+.{k}f}, {hi:+.{k}f}], {wins}"


# ------------------------------------------------------------------------------ real-vs-real floors
FLOOR_SPLITS = 10  # a std over k splits is good to about 1 / sqrt(2 (k - 1)): 35% at 5, 24% at 10


def _floor_metric(task: Task, recipe: Recipe, pool: torch.Tensor):
    """metric(a, b): what evaluate() reports for samples `a`, measured against real items `b`."""
    from perceptual_diffusion.metrics.circles import circles_metrics
    from perceptual_diffusion.metrics.digits import digits_metrics
    from perceptual_diffusion.metrics.moving_shapes import moving_shapes_metrics
    from perceptual_diffusion.metrics.patches import patches_metrics
    from perceptual_diffusion.metrics.spectrum import spectrum_metrics
    from perceptual_diffusion.metrics.tones import tones_metrics

    by_name = {"circles": lambda a, b: circles_metrics(a, reference=b),
               "digits": lambda a, b: digits_metrics(a, reference=b),
               "spectrum": spectrum_metrics,
               "patches": lambda a, b: patches_metrics(a, b, scale_from=pool),  # scaled as the model rows are
               "moving_shapes": lambda a, b: moving_shapes_metrics(a, reference=b),
               "tones": lambda a, b: tones_metrics(a, sample_rate=recipe.data.sample_rate, reference=b)}
    return lambda a, b: {k: v for m in task.metrics for k, v in by_name[m](a, b).items()}


def _stack(dataset) -> torch.Tensor:
    return torch.stack([dataset[i]["x"] for i in range(len(dataset))])


def compute_floors(task: str, size: int, n: int) -> dict[str, dict[str, tuple[float, float]]]:
    """{"real": the task's metrics between two disjoint sets of n real items (the data metrics compare
    with: held-out patches, the digits, generated disks), mean and std over FLOOR_SPLITS splits
    (`real_vs_real_floor`)}; tasks with a held-out split also get "train": n training items against
    the whole held-out reference, as a model row is measured (what reproducing the training data
    exactly would score). Empty where the pool holds fewer than 2 n items."""
    t = TASKS[task]
    recipe = load_recipe(ROOT / t.recipe, [f"data.size={size}"])
    reference = build_reference_dataset(recipe.data)
    pool = _stack(reference)
    if len(pool) < 2 * n:
        log.warning("%s: no real-vs-real floor at n = %d (the data holds %d items)", task, n, len(pool))
        return {"real": {}}
    metric = _floor_metric(t, recipe, pool)
    out = {"real": real_vs_real_floor(metric, pool, n, splits=FLOOR_SPLITS)}
    train = build_dataset(recipe.data)
    if getattr(reference, "split", "train") != "train":
        images = _stack(train)
        g = torch.Generator().manual_seed(0)
        runs = [metric(images[torch.randperm(len(images), generator=g)[:n]], pool) for _ in range(FLOOR_SPLITS)]
        out["train"] = {k: (statistics.fmean(r[k] for r in runs), statistics.stdev(r[k] for r in runs))
                        for k in runs[0]}
    return out


def floors(cfg: Config, tasks: list[str]) -> dict[str, dict]:
    """`compute_floors` of each task at its sample count, cached in <results>/floors.json."""
    path = cfg.results_dir / "floors.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    out = {}
    for task in tasks:
        key = f"{task}|size{cfg.sizes[task]}|n{cfg.samples[task]}|splits{FLOOR_SPLITS}"
        if key not in cache:
            t0 = time.time()
            cache[key] = compute_floors(task, cfg.sizes[task], cfg.samples[task])
            log.info("[floor] %s at n = %d: %.0f s", task, cfg.samples[task], time.time() - t0)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(cache, indent=1) + "\n")
            tmp.replace(path)
        out[task] = cache[key]
    return out


# ------------------------------------------------------------------------------ tables
def machine(cfg: Config, rows: list[dict]) -> str:
    """The CPU, and how the work in `rows` ran: the worker processes and torch threads that each row
    records, or, for rows from before they were recorded, this run's --jobs (a worker has 1 thread)."""
    threads = sorted({r["torch_threads"] for r in rows if "torch_threads" in r})
    jobs = sorted({r["jobs"] for r in rows if "jobs" in r})
    if not threads:  # older rows: what this invocation would have run them with
        threads, jobs = [1 if cfg.jobs > 1 else torch.get_num_threads()], [cfg.jobs]
    t = "/".join(map(str, threads)) + (" torch thread" if threads == [1] else " torch threads")
    how = (f"{'/'.join(map(str, jobs))} worker processes of {t} each" if max(jobs, default=1) > 1
           else f"1 process of {t}")
    return f"{cpu_name()}, {os.cpu_count()} cores, {how}, torch {torch.__version__}"


def cell(values: list[float]) -> str:
    """"mean ± std" with three significant digits of the mean; inf values (circles' param_fd
    when no sample is a disk) are counted apart."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "inf" if values else "–"
    mean = statistics.fmean(finite)
    digits = min(6, max(1, 2 - math.floor(math.log10(abs(mean))))) if mean else 3
    text = f"{mean:.{digits}f}" + (f" ± {statistics.stdev(finite):.{digits}f}" if len(finite) > 1 else " (1 seed)")
    if len(finite) < len(values):
        text += f"; inf in {len(values) - len(finite)} of {len(values)} seeds"
    return text


def floor_cell(floor: dict[str, tuple[float, float]], key: str) -> str:
    if key not in floor or not math.isfinite(floor[key][0]):
        return "–"
    mean, std = floor[key]
    k = _digits(mean)
    return f"{mean:.{k}f} ± {std:.{k}f}"


def _mean_wall(rows: list[dict], model: str) -> float | None:
    walls = [r["train_wall_s"].get(model) for r in rows if r["train_wall_s"].get(model) is not None]
    return statistics.fmean(walls) if walls else None


FLOOR_LABELS = {"real": "Real vs real (floor)", "train": "Training data vs held-out"}


def _values(rows: list[dict | None], key: str) -> list[float]:
    return [float(r["eval"][key]) if r is not None else math.nan for r in rows]


def seed_values(cfg: Config, rows: dict[str, dict], task: str, model: str, key: str) -> list[float]:
    """`key` of the default row (25 steps, no guidance) of `model` on `task`, one value per seed of
    `cfg` (nan where the row, or the metric in it, is missing)."""
    found = [rows.get(row_key(cfg, Unit(task, model), s)) for s in cfg.seeds]
    return [float(r["eval"].get(key, math.nan)) if r is not None else math.nan for r in found]


def render_paired(cfg: Config, t: Table, found: list[list[dict | None]], floor: dict) -> list[str]:
    """One line per metric: the floors, MSE base, SP, control (mean ± std over seeds) and SP − control
    paired over seeds with its bootstrap interval."""
    task = TASKS[t.task]
    kinds = [k for k in FLOOR_LABELS if k in floor]
    n = cfg.samples[t.task]
    headers = (["Metric"] + [f"{FLOOR_LABELS[k]}, n = {n}" for k in kinds] + [labels[0] for labels, _ in t.rows]
               + ["SP − control, paired [95% CI]"])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    base, sp, control = found
    for c in task.columns:
        got = [[float(r["eval"][c.key]) for r in rs if r is not None] for rs in found]
        lines.append("| " + " | ".join([c.header] + [floor_cell(floor[k], c.key) for k in kinds]
                                       + [cell(v) for v in got]
                                       + [paired_cell(c, _values(sp, c.key), _values(control, c.key))]) + " |")
    return lines


def render_rows(cfg: Config, t: Table, found: list[list[dict | None]], floor: dict) -> list[str]:
    """The model rows with the task's columns; where the table holds the control, a column of each
    row's paired difference from the control (same steps and guidance) on the task's headline
    metric; then the floors."""
    task = TASKS[t.task]
    head = task.columns[0]
    controls = {(u.steps, u.guidance, u.rescale): rs for (_, u), rs in zip(t.rows, found) if u.model == "control"}
    headers = t.label_headers + [c.header for c in task.columns]
    if controls:
        headers.append(f"{head.header.split(' ')[0]} − control [95% CI]")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for (labels, u), rs in zip(t.rows, found):
        got = [r for r in rs if r is not None]
        cells = [cell([float(r["eval"][c.key]) for r in got]) for c in task.columns]
        if controls:
            ref = controls.get((u.steps, u.guidance, u.rescale))
            cells.append("–" if ref is None or u.model == "control"
                         else paired_cell(head, _values(rs, head.key), _values(ref, head.key)))
        lines.append("| " + " | ".join(labels + cells) + " |")
    return lines + floor_lines(cfg, t, floor, task.columns, 1 if controls else 0)


def floor_lines(cfg: Config, t: Table, floor: dict, columns, dashes: int) -> list[str]:
    """The table's floor rows: per kind of floor, its label and each column's floor, then `dashes`
    empty difference cells."""
    lines = []
    for kind in (k for k in FLOOR_LABELS if k in floor):
        labels = [f"{FLOOR_LABELS[kind]}, n = {cfg.samples[t.task]}"] + [""] * (len(t.label_headers) - 1)
        cells = [floor_cell(floor[kind], c.key) for c in columns] + ["–"] * dashes
        lines.append("| " + " | ".join(labels + cells) + " |")
    return lines


def artifact_columns(task: Task) -> list[Column]:
    """What the artifact tables show of a task: its headline metric, its KID (when the headline is
    another metric), the grain ratio where the task has one, and the high-frequency energy ratio."""
    head = task.columns[0]
    extra = [c for c in task.columns[1:] if c.key.endswith("_kid") or c.key == "patches_laplacian_ratio"]
    return [head, *extra, _HF]


def verdict(column: Column, rows: list[float], controls: list[float]) -> str:
    """"better", "worse" or "tie" of the rows against their paired controls: better (worse) when the
    95% bootstrap interval of the paired differences lies wholly on the better (worse) side of 0. For
    a "one" column the difference is in the distance from 1 (|row - 1| - |control - 1|), so "better"
    means closer to the data. "–" with fewer than two paired seeds."""
    pairs = [(r, c) for r, c in zip(rows, controls) if math.isfinite(r) and math.isfinite(c)]
    if len(pairs) < 2:
        return "–"
    sign = {"lower": 1.0, "higher": -1.0}
    if column.better == "one":
        diffs = [abs(r - 1) - abs(c - 1) for r, c in pairs]
    else:
        diffs = [sign[column.better] * (r - c) for r, c in pairs]
    lo, hi = bootstrap_ci(diffs)
    return "better" if hi < 0 else "worse" if lo > 0 else "tie"


def render_artifact(cfg: Config, t: Table, found: list[list[dict | None]], floor: dict) -> list[str]:
    """Every SP variant of a task against the control: the artifact columns, then the paired
    difference from the control of the headline metric and of the high-frequency energy ratio."""
    task = TASKS[t.task]
    columns = artifact_columns(task)
    head = columns[0]
    control = next(rs for (_, u), rs in zip(t.rows, found) if u.model == "control")
    headers = (t.label_headers + [c.header for c in columns]
               + [f"{head.header.split(' ')[0]} − control [95% CI]", "HF ratio − control [95% CI]"])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for (labels, u), rs in zip(t.rows, found):
        got = [r for r in rs if r is not None]
        cells = [cell([float(r["eval"][c.key]) for r in got]) for c in columns]
        cells += (["–", "–"] if u.model == "control" else
                  [paired_cell(c, _values(rs, c.key), _values(control, c.key)) for c in (head, _HF)])
        lines.append("| " + " | ".join(labels + cells) + " |")
    return lines + floor_lines(cfg, t, floor, columns, 2)


def render_artifact_summary(cfg: Config, tables: list[Table], rows: dict[str, dict]) -> list[str]:
    """Issue 11, item 6: per SP variant and artifact task, whether it beats the control on the task's
    headline metric and whether its high-frequency energy ratio is as close to the data's as the
    control's (the grain removed); then whether both hold on every task."""
    tables = [t for t in tables if t.kind == "artifact"]
    if not tables:
        return []
    head = {t.task: TASKS[t.task].columns[0] for t in tables}
    headers = ["SP variant"] + [f"{t.task}: {head[t.task].header.split(' ')[0]} / HF" for t in tables] \
        + ["beats the control, grain removed, on every task"]
    lines = ["## SP variants against the control on every task (the artifact, issue 11)", "",
             ("Per task: the variant's headline metric against the control, then its high-frequency energy "
              "ratio's distance from 1 against the control's; \"better\" / \"worse\" when the 95% bootstrap "
              "interval of the paired differences over seeds lies wholly on that side of 0, else \"tie\". "
              "The last column is \"yes\" when the headline is better and the HF ratio is not worse on every "
              "task. With a handful of seeds the interval undercovers; the per-task tables above give the figures."),
             "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for label, model in ARTIFACT_ROWS:
        cells, every, missing = [], True, False
        for t in tables:
            values = functools.partial(seed_values, cfg, rows, t.task)
            h = verdict(head[t.task], values(model, head[t.task].key), values("control", head[t.task].key))
            g = verdict(_HF, values(model, _HF.key), values("control", _HF.key))
            g = {"better": "closer", "worse": "farther"}.get(g, g)
            cells.append(f"{h} / {g}")
            every = every and h == "better" and g in ("closer", "tie")
            missing = missing or "–" in (h, g)
        answer = "yes" if every else "– (too few seeds)" if missing else "no"  # a "no" needs every task measured
        lines.append("| " + " | ".join([label] + cells + [answer]) + " |")
    return lines + [""]


VERDICT_TEXT = {"better": "SP better", "worse": "SP worse", "tie": "not resolved", "–": "– (too few seeds)"}


def render_verdicts(cfg: Config, tables: list[Table], rows: dict[str, dict], task_floors: dict[str, dict]) -> list[str]:
    """Issue 11, item 8: per task with an SP-vs-control table, whether SP beats its matched control on
    the task's headline metric (`verdict`: the paired 95% interval wholly on one side of 0), by how
    much, beside the metric's real-vs-real floor; a mean difference smaller than the floor's std is
    flagged as inside the metric's sampling noise whatever the interval says."""
    tasks = [t.task for t in tables if t.kind == "paired"]
    if not tasks:
        return []
    lines = ["## Does SP beat its matched control? (per task, the headline metric)", "",
             ("SP − control is paired by training seed (same start, steps, lr, batch, EMA and sampling noise); "
              "\"SP better\" / \"SP worse\" when its 95% bootstrap interval lies wholly on that side of 0, "
              "else \"not resolved\". The floor is the metric between two disjoint real sets of the rows' "
              "sample count (mean ± std); a difference whose size is under the floor's std is marked as "
              "inside it. The HF energy ratio (1 = the data's) shows the grain."), "",
             "| task | metric | MSE base | SP | control | SP − control [95% CI] | floor (real vs real) | verdict "
             "| HF ratio SP / control |", "|---|---|---|---|---|---|---|---|---|"]
    def mean_text(values: list[float]) -> str:
        finite = [v for v in values if math.isfinite(v)]
        return f"{statistics.fmean(finite):.2f}" if finite else "–"

    for task in tasks:
        head = TASKS[task].columns[0]
        values = {m: seed_values(cfg, rows, task, m, head.key) for m in ("mse", "sp", "control")}
        floor = task_floors.get(task, {}).get("real", {})
        said = VERDICT_TEXT[verdict(head, values["sp"], values["control"])]
        pairs = [r - c for r, c in zip(values["sp"], values["control"]) if math.isfinite(r) and math.isfinite(c)]
        if pairs and head.key in floor and abs(statistics.fmean(pairs)) < floor[head.key][1]:
            said += " (inside the floor's std)"
        hf_text = " / ".join(mean_text(seed_values(cfg, rows, task, m, _HF.key)) for m in ("sp", "control"))
        lines.append("| " + " | ".join([task, head.header] + [cell([v for v in values[m] if math.isfinite(v)])
                                                                for m in ("mse", "sp", "control")]
                                       + [paired_cell(head, values["sp"], values["control"]),
                                          floor_cell(floor, head.key), said, hf_text]) + " |")
    return lines + [""]


def render_tables(cfg: Config, tables: list[Table], rows: dict[str, dict], total_s: float,
                  task_floors: dict[str, dict]) -> str:
    intro = (f"Scale `{cfg.label}`: seeds {', '.join(map(str, cfg.seeds))}; cells are mean ± sample std "
             "over training seeds. Every row: EMA weights, DDIM (trailing, eta 0), the same initial noise "
             f"(sampling seed {cfg.sample_seed}); conditional rows cycle the 10 labels. Wall time of the work "
             f"these tables hold (training + evaluation): {total_s / 60:.1f} min.")
    control = ("The control (\"MSE continued\") is stage mse continued from the same MSE checkpoint SP starts "
               "from, from the same (EMA) weights, with the SP stage's steps, batch, lr, warm-up, grad clip, EMA "
               "and cond dropout and the same seed, so it sees the same batches: what SP gains over training on. "
               "\"X − control\" columns pair each seed's row with that seed's control (same sampling steps and "
               "guidance) and give the mean difference, the 95% percentile-bootstrap interval of that mean over "
               f"seeds ({BOOTSTRAP_RESAMPLES:,} resamples, RNG seed {BOOTSTRAP_SEED}; with few seeds it is "
               "narrower than it should be) and in how many seeds the row is better. The floor rows are the "
               "metric between two disjoint sets of real data of the rows' sample count, mean ± std over "
               f"{FLOOR_SPLITS} splits: model differences smaller than the floor's std are noise. KID is "
               "unbiased, so its floor is about 0 at any n; Frechet distances (FID, param FD, patches-FD) are "
               "biased upward at small n and the floor (n against n) overstates what a row (n against the "
               "whole reference) would score with real data. photo_patches rows are measured against held-out "
               "patches that share no pixel with the training patches; its \"Training data\" row is n training "
               "patches measured as a model row is.")
    used = [r for t in tables for _, u in t.rows for s in cfg.seeds if (r := rows.get(row_key(cfg, u, s)))]
    lines = ["# Small-scale reproduction of the paper's tables", "", f"Machine: {machine(cfg, used)}.", "", intro, "",
             control, ""]
    lines += render_verdicts(cfg, tables, rows, task_floors)
    for t in tables:
        task = TASKS[t.task]
        found = [[rows.get(row_key(cfg, u, s)) for s in cfg.seeds] for _, u in t.rows]
        done = [r for rs in found for r in rs if r is not None]
        sp_wall = {m: _mean_wall(done, m) for _, u in t.rows for m in [u.model] if m != "mse"}
        mse_wall = _mean_wall(done, "mse")
        walls = ", ".join(f"{m} {w:.0f} s" for m, w in sp_wall.items() if w is not None)
        lines += [f"## {t.title}", "",
                  f"{t.task} {task.shape_text(cfg.sizes[t.task])}, {cfg.samples[t.task]} samples per row. "
                  f"Training: MSE {cfg.mse_steps[t.task]} steps"
                  + (f" ({mse_wall:.0f} s per seed)" if mse_wall is not None else "")
                  + f", then SP {cfg.sp_steps[t.task]} steps" + (f" at lr {cfg.sp_lr[t.task]:g}" if cfg.sp_lr.get(t.task) else "")
                  + " from the frozen MSE EMA and the control as long"
                  + (f" ({walls} per seed)" if walls else "") + ". 25 DDIM steps unless stated."
                  + (f" {t.note}" if t.note else ""), ""]
        render = {"paired": render_paired, "artifact": render_artifact}.get(t.kind, render_rows)
        lines += render(cfg, t, found, task_floors.get(t.task, {}))
        lines.append("")
    lines += render_artifact_summary(cfg, tables, rows)
    if not any((cfg.results_dir / "figures").glob("*.png")):  # --no-figures: no legend for pictures not drawn
        return "\n".join(lines)
    lines += ["## Figures", "",
              ("`figures/<task>_samples.png`: rows MSE, the control (MSE continued), SP and (conditional tasks) "
               "MSE + CFG 7.5 rescale 0.7, 25 DDIM steps from the same initial noise, seed-0 models (Figures 3 "
               "and 4). `figures/<task>_trajectory.png`: the x0 prediction at 10 of the 25 sampling steps "
               "(columns); for each of 3 initial noises a MSE row then a SP row (Figure 5). "
               "`figures/<task>_spectrum.png`: the radially averaged power spectrum (log10 power against "
               "radius in cycles per image; Hann-tapered) of the data and of the samples of the seed-0 MSE "
               "base, control and SP, from the rows' noise: grain is SP's curve above the data's at high "
               "radii. Video tasks: "
               "`figures/<task>_samples.png` has one clip per row (frames in columns), MSE clips then SP clips "
               "from the same noise, and a `.gif` beside it; audio tasks: the spectrograms of MSE clips then SP "
               "clips, and a `.wav` beside it."), ""]
    return "\n".join(lines)


def write_tables(cfg: Config, tables: list[Table], rows: dict[str, dict]) -> str:
    used = {row_key(cfg, u, s) for t in tables for _, u in t.rows for s in cfg.seeds}
    runs = {(r["task"], r["seed"], m): w for k, r in rows.items() if k in used for m, w in r["train_wall_s"].items()}
    total = sum(w for w in runs.values() if w) + sum(rows[k]["eval_wall_s"] for k in used if k in rows)
    text = render_tables(cfg, tables, rows, total, floors(cfg, list(dict.fromkeys(t.task for t in tables))))
    path = cfg.results_dir / "tables.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return text


# ------------------------------------------------------------------------------ figures
def figures(cfg: Config, task: str, seed: int, n: int = 10, n_traj: int = 3, columns: int = 10) -> list[Path]:
    """Figure 3/4 (samples of each model, and of the control, from the same noise), Figure 5
    (x0 trajectories) and, for image tasks, the radially averaged power spectrum of the data and of
    each model's samples (the rows' sample count, the rows' noise): the grain as a curve."""
    out = cfg.results_dir / "figures"
    mse = load_model(final_checkpoint(run_dir_of(cfg, task, seed, "mse"), "mse"))
    sp = load_model(final_checkpoint(run_dir_of(cfg, task, seed, "sp"), "sp"))
    kind = TASKS[task].modality
    if kind != "image":  # MSE clips then SP clips from the same noise; no trajectory figure
        n = 4
        both = torch.cat([generate(m, n, 25, seed=cfg.sample_seed).samples for m in (mse, sp)])
        return save_samples(both, out / f"{task}_samples.png", kind, nrow=n, scale=3 if kind == "video" else 2,
                            sample_rate=mse.recipe.data.sample_rate)  # audio: a row of MSE, a row of SP
    control = load_model(final_checkpoint(run_dir_of(cfg, task, seed, "control"), "mse"))
    rows = [generate(m, n, 25, seed=cfg.sample_seed).samples for m in (mse, control, sp)]
    if TASKS[task].conditional:
        rows.append(generate(mse, n, 25, *CFG_MSE, seed=cfg.sample_seed).samples)
    scale = 3 if cfg.sizes[task] <= 16 else 2
    paths = [save_grid(torch.cat(rows), out / f"{task}_samples.png", nrow=n, scale=scale)]

    r = mse.recipe
    noise = torch.randn(n_traj, r.data.channels, r.data.size, r.data.size,
                        generator=torch.Generator().manual_seed(cfg.sample_seed))
    cond = torch.arange(n_traj) % 10 if TASKS[task].conditional else None
    schedule = build_schedule(r)
    steps = 25
    pick = torch.linspace(0, steps - 1, columns).round().long()
    trajs = [ddim_sample(m.model, schedule, noise, cond=cond, steps=steps, return_x0_trajectory=True)[1][pick]
             for m in (mse, sp)]  # each [columns x N x C x H x W]
    grid = torch.stack([trajs[k][:, i] for i in range(n_traj) for k in range(2)])  # [2N x columns x ...]
    paths.append(save_grid(grid.flatten(0, 1), out / f"{task}_trajectory.png", nrow=columns, scale=scale))

    m = cfg.samples[task]
    curves = {"data": radial_power_spectrum(reference_images(r))}
    for label, model in (("MSE base", mse), ("MSE continued (control)", control), ("SP", sp)):
        curves[label] = radial_power_spectrum(generate(model, m, 25, seed=cfg.sample_seed).samples)
    paths.append(save_spectrum_plot(curves, out / f"{task}_spectrum.png", nyquist=cfg.sizes[task] // 2,
                                    title=f"{task}: log10 power by radius, seed-{seed} models, {m} samples"))
    return paths


# ------------------------------------------------------------------------------ main
def build_config(args: argparse.Namespace) -> Config:
    scale_name = "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    tasks = list(TASKS)
    sp_suffix = "".join([f"-steps{args.sp_steps}" if args.sp_steps else "", f"-lr{args.sp_lr:g}" if args.sp_lr else ""])
    label = (scale_name + (f"-steps{args.scale_steps:g}" if args.scale_steps != 1 else "")
             + (f"-sp{args.sp_steps}" if args.sp_steps else "") + (f"-splr{args.sp_lr:g}" if args.sp_lr else "")
             + (f"-noise{args.sample_seed}" if args.sample_seed != SAMPLE_SEED else ""))
    mse_steps = {t: max(1, round(scale.mse_steps[t] * args.scale_steps)) for t in tasks}
    sp_steps = {t: args.sp_steps or max(1, round(scale.sp_steps[t] * args.scale_steps)) for t in tasks}
    sp_lr = {t: args.sp_lr or scale.sp_lr[t] for t in tasks}
    samples = {t: args.samples or scale.samples[t] for t in tasks}
    work_dir = Path(args.work_dir or ROOT / "runs" / "reproduce" / label)
    results_dir = Path(args.results_dir or (work_dir / "results" if args.quick else ROOT / "benchmarks" / "results"))
    return Config(label=label, mse_steps=mse_steps, sp_steps=sp_steps, samples=samples, sizes=dict(scale.sizes),
                  seeds=args.seed_list or list(range(args.seeds or scale.seeds)),
                  checkpoint_every=scale.checkpoint_every,
                  work_dir=work_dir, results_dir=results_dir, progress=args.progress,
                  sp_lr=sp_lr, sp_suffix=sp_suffix, sample_seed=args.sample_seed,
                  jobs=args.worker_of or args.jobs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny pipeline check (2 seeds, 30 + 15 steps, 40 samples)")
    p.add_argument("--seeds", type=int, default=0, help="training seeds 0..N-1 (default: 4, quick 2)")
    p.add_argument("--seed-list", default="", help="comma-separated training seeds to run instead of 0..N-1 (e.g. "
                                                   "one process per seed on a machine with more cores); render the "
                                                   "tables afterwards with the plain command")
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one torch thread each, the seeds dealt "
                                                       "round-robin between them; then this process draws the "
                                                       "figures and tables (use 2 on 2 cores)")
    p.add_argument("--samples", type=int, default=0, help="samples per row for every task")
    p.add_argument("--scale-steps", type=float, default=1.0, help="multiply every run's training steps")
    p.add_argument("--sp-steps", type=int, default=0, help="steps of every SP run and control instead of the scale's "
                                                           "(the SP-length pilot; runs named apart, bases shared)")
    p.add_argument("--sp-lr", type=float, default=0.0, help="lr of every SP run and control instead of the recipe's")
    p.add_argument("--sample-seed", type=int, default=SAMPLE_SEED,
                   help=f"the initial noise of every row (default {SAMPLE_SEED}, the tables'; a pilot uses another "
                        "so that nothing is tuned on the tables' samples)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated subset of " + ", ".join(TASKS)
                   + " (default: " + ", ".join(DEFAULT_TASKS) + ")")
    p.add_argument("--ablation-tasks", default="digits", help="tasks of Tables 2-6 (comma-separated; '' for none)")
    p.add_argument("--artifact-tasks", default="image",
                   help="tasks of the SP-variant (artifact) tables, every variant against the control (comma-separated; "
                        "'' for none; default 'image': every image task of --tasks)")
    p.add_argument("--work-dir", help="training runs (default runs/reproduce/<scale>)")
    p.add_argument("--results-dir", help="tables.md, rows.jsonl, floors.json, figures/ (default benchmarks/results; "
                                         "quick: <work-dir>/results)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-tables", action="store_true", help="train and evaluate only (what --jobs workers do)")
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    p.add_argument("--worker-of", type=int, default=0, help=argparse.SUPPRESS)  # a --jobs worker: how many run
    args = p.parse_args(argv)
    if args.artifact_tasks == "image":
        args.artifact_tasks = ",".join(t for t in args.tasks.split(",") if t in IMAGE_TASKS)
    for opt in ("tasks", "ablation_tasks", "artifact_tasks"):
        names = [t for t in getattr(args, opt).split(",") if t]
        bad = [t for t in names if t not in TASKS]
        if bad:
            p.error(f"--{opt.replace('_', '-')}: unknown task(s) {', '.join(bad)}; choose from {', '.join(TASKS)}")
        setattr(args, opt, names)
    if any(t not in IMAGE_TASKS for t in args.artifact_tasks):
        p.error(f"--artifact-tasks: the artifact tables measure images' spectra; choose from {', '.join(IMAGE_TASKS)}")
    try:
        args.seed_list = [int(v) for v in args.seed_list.split(",") if v.strip()]
    except ValueError:
        p.error(f"--seed-list must be comma-separated integers, got {args.seed_list!r}")
    if any(v < 0 for v in args.seed_list):
        p.error("--seed-list seeds must be >= 0")
    if args.seeds < 0 or args.samples < 0 or args.scale_steps <= 0 or args.jobs < 1:
        p.error("--seeds and --samples must be >= 1, --jobs >= 1 and --scale-steps > 0")
    if args.sp_steps < 0 or args.sp_lr < 0 or args.sample_seed < 0:
        p.error("--sp-steps, --sp-lr and --sample-seed must be >= 0")
    if args.samples == 1:
        p.error("--samples must be >= 2 (the metrics need a spread)")
    return args


def worker_argv(args: argparse.Namespace, cfg: Config, seeds: list[int]) -> list[str]:
    """The command line of one --jobs worker: this run's settings for `seeds`, no figures, no tables."""
    argv = ["--seed-list", ",".join(map(str, seeds)), "--tasks", ",".join(args.tasks),
            "--ablation-tasks", ",".join(args.ablation_tasks), "--artifact-tasks", ",".join(args.artifact_tasks),
            "--scale-steps", repr(args.scale_steps), "--sp-steps", str(args.sp_steps), "--sp-lr", repr(args.sp_lr),
            "--sample-seed", str(args.sample_seed),
            "--work-dir", str(cfg.work_dir), "--results-dir", str(cfg.results_dir), "--no-figures", "--no-tables",
            "--worker-of", str(args.jobs)]
    return argv + (["--quick"] if args.quick else []) + (["--samples", str(args.samples)] if args.samples else []) \
        + (["--progress"] if args.progress else [])


def run_workers(args: argparse.Namespace, cfg: Config) -> int:
    """Run the seeds in `args.jobs` worker processes (one torch thread each); the first failing exit
    status, else 0. Each worker is resumable like the plain command."""
    groups = [cfg.seeds[k::args.jobs] for k in range(args.jobs) if cfg.seeds[k::args.jobs]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *worker_argv(args, cfg, seeds)], env=env)
             for seeds in groups]
    log.info("%d workers, seeds %s", len(procs), " | ".join(",".join(map(str, g)) for g in groups))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the workers got the terminal's SIGINT too: let them save and stop
        codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("perceptual_diffusion").setLevel(logging.WARNING)
    cfg = build_config(args)
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    ablation_tasks = [t for t in args.ablation_tasks if t in args.tasks]
    artifact_tasks = [t for t in args.artifact_tasks if t in args.tasks]
    tables = plan_tables(args.tasks, ablation_tasks, artifact_tasks)
    if args.jobs > 1:
        code = run_workers(args, cfg)
        if code != 0:
            log.warning("a worker exited with status %d; rerun the same command to continue", code)
            return code
    units = {task: list(dict.fromkeys(u for t in tables for _, u in t.rows if u.task == task)) for task in args.tasks}
    models = {task: models_of(task, tables) for task in args.tasks}
    n_train = len(cfg.seeds) * sum(map(len, models.values()))
    n_eval = len(cfg.seeds) * sum(map(len, units.values()))
    log.info("scale %s: %d runs, %d rows (%s); work dir %s, results %s", cfg.label, n_train, n_eval,
             ", ".join(f"{t}: MSE {cfg.mse_steps[t]} + SP {cfg.sp_steps[t]} steps at {cfg.sizes[t]}px, "
                       f"{cfg.samples[t]} samples" for t in args.tasks), cfg.work_dir, cfg.results_dir)
    rows = read_rows(cfg.results_dir / "rows.jsonl")
    i_train = i_eval = 0
    try:
        for seed in cfg.seeds:  # seed-major: an interrupted run leaves whole seeds behind it
            for task in args.tasks:
                finals = {}
                for model in models[task]:
                    i_train += 1
                    finals[model] = train(cfg, task, seed, model, f"[train {i_train}/{n_train}]")
                for u in units[task]:
                    i_eval += 1
                    evaluate_row(cfg, u, seed, finals[u.model], rows, f"[eval {i_eval}/{n_eval}]")
            if not args.no_tables:
                write_tables(cfg, tables, rows)
    except Interrupted as e:
        log.warning("%s; rerun the same command to continue", e)
        return 128 + (e.signum or 2)
    except KeyboardInterrupt:  # between training runs: finished runs and rows are kept
        log.warning("interrupted; rerun the same command to continue")
        return 130
    if not args.no_figures:
        for task in args.tasks:
            paths = figures(cfg, task, cfg.seeds[0])
            log.info("[figures] %s: %s", task, ", ".join(str(p) for p in paths))
    if not args.no_tables:
        print(write_tables(cfg, tables, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
