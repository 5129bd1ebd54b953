"""Small-scale reproduction of the paper's Tables 1-8 and Figures 3-5 on data that ships.

    python benchmarks/reproduce.py                 # full scale (the committed tables): ~1.7 h on 2 CPU cores
    python benchmarks/reproduce.py --quick         # pipeline check: all tables, tiny, ~5 min
    python benchmarks/reproduce.py --seeds 5 --samples 1000 --scale-steps 2 --tasks digits

Tasks: "circles" (unconditional one-disk images), "digits" (class-conditional) and
"digits_uncond" (section 5.7), each from its recipe in recipes/image/. For every task and seed
stage mse is trained once; every SP variant is then an SP-only run initialised from that run's
final checkpoint (``train.stages=['sp']``, ``sp.init=<mse final>``), so all variants share the
stage-1 model as the paper's ablations do. Table 6's "SP model as perceptual network" is a
second SP round from the default SP run's final checkpoint (its EMA is the frozen network).
The ablations (Tables 2-6) run on the conditional digits task (``--ablation-tasks``).

Every row is evaluated on the same number of samples from the same initial noise (sampling
seed 0 for every row and training seed), with EMA weights, DDIM trailing, eta 0. Rows:
Table 1 MSE / SP at 25 and 50 steps, MSE + CFG 7.5 with and without rescale 0.7 (conditional
only); Tables 2-6 SP variants at 25 steps; Table 7 SP + CFG 2/3/4/7.5 with rescale 0.7; Table 8
unconditional MSE vs SP. Cells are mean +- sample std over the training seeds.

Outputs (``--results-dir``, default benchmarks/results; runs/reproduce/quick/results for
--quick): tables.md, rows.jsonl (one JSON object per (row, seed): the evaluate() dict plus
task, variant, seed, steps, guidance, rescale, training steps and training wall seconds),
figures/<task>_samples.png (rows MSE / SP / MSE+CFG 7.5 rescale 0.7 from the same noise;
Figure 3/4) and figures/<task>_trajectory.png (x0 prediction over the sampling steps; per
sample a MSE row then a SP row, columns are steps; Figure 5).

Resumable: runs live under ``--work-dir`` (default runs/reproduce/<scale>); a run with a final
checkpoint is not retrained, an interrupted one resumes from its latest checkpoint, and a row
already in rows.jsonl (same key, same checkpoint) is not re-evaluated.

Tasks "moving_shapes" (video, unconditional, VideoUNet) and "tones" (audio, unconditional,
AudioDiT) get one table each: MSE vs SP at 25 steps (the modality rows of the issue).

Budget of the full scale (per run: images 1000 MSE + 200 SP steps at batch 16 and 16x16, 300
samples per row; video 500 + 150 steps, 100 clips per row; audio 1000 + 250 steps, 200 clips per
row; 3 seeds), measured on 2 CPU cores (AMD EPYC, torch 2.13 CPU, tiny presets, one torch thread
per process, two to three processes sharing the cores):
  image step at 16x16: MSE 0.2 s, SP 0.3 s; a row of 300 samples: 25 steps 30-40 s, 50 steps or
  CFG 55-75 s
  video step (8 frames of 16x16, batch 8): MSE ~0.55 s, SP ~0.8 s; a row of 100 clips ~80 s
  audio step (2048 samples, batch 16): MSE ~0.38 s, SP ~0.5 s; a row of 200 clips ~20 s
  per seed: digits ~1600 s (1000 MSE steps, 9 SP runs, 18 rows), circles and digits_uncond
  ~450 s each, video ~700 s, audio ~550 s
This is what benchmarks/results/ holds: the image tasks in two processes (`--seed-list 0,1`
and `--seed-list 2`) and the video and audio tasks in a third, about 1.7 h of wall time, then
the plain command to render the tables and figures. `--scale-steps 2` doubles every run
(2000 + 400 image steps). The digits are 8x8 images upsampled, so 16x16 loses nothing. Circles
at 16x16: the disk detector passes 99% of real disks there (all at 32x32), so the circles rows
compare models with each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sp_step import cpu_name  # noqa: E402  (one CPU naming for both benchmark scripts)

from perceptual_diffusion.checkpoint import list_checkpoints
from perceptual_diffusion.config import load_recipe
from perceptual_diffusion.evaluation import evaluate, generate, load_model
from perceptual_diffusion.images import save_grid
from perceptual_diffusion.media import save_samples
from perceptual_diffusion.sampling import ddim_sample
from perceptual_diffusion.trainer import Trainer, build_schedule, final_checkpoint

log = logging.getLogger("reproduce")

SAMPLE_SEED = 0          # the initial noise of every row (and every training seed)
CFG_MSE = (7.5, 0.7)     # Table 1's MSE + CFG (+ rescale) and the figures' third row
CFG_SP = (2.0, 3.0, 4.0, 7.5)  # Table 7, each with rescale 0.7
RESCALE = 0.7


# ------------------------------------------------------------------------------ what is run
@dataclass(frozen=True)
class Task:
    name: str
    recipe: str
    conditional: bool
    metrics: tuple[str, ...]                    # evaluate() metric names
    columns: tuple[tuple[str, str], ...]        # (row key, table header)
    modality: str = "image"                     # video and audio tasks get one MSE-vs-SP table

    def shape_text(self, size: int) -> str:
        """What one sample is, e.g. "16x16" or "8 frames of 16x16" or "2048 samples at 8000 Hz"."""
        d = load_recipe(ROOT / self.recipe, [f"data.size={size}"]).data
        if self.modality == "video":
            return f"{d.frames} frames of {size}x{size}"
        if self.modality == "audio":
            return f"{d.length} samples at {d.sample_rate} Hz"
        return f"{size}x{size}"


_CIRCLES_COLS = (("valid_fraction", "valid ↑"), ("param_fd", "param FD ↓"), ("coverage", "coverage ↑"))
_DIGITS_COLS = (("digits_fid", "digits-FID ↓"), ("digits_is", "digits-IS ↑"))
TASKS = {
    "circles": Task("circles", "recipes/image/circles.toml", False, ("circles",), _CIRCLES_COLS),
    "digits": Task("digits", "recipes/image/digits.toml", True, ("digits",),
                   _DIGITS_COLS + (("label_accuracy", "label acc ↑"),)),
    "digits_uncond": Task("digits_uncond", "recipes/image/digits_uncond.toml", False, ("digits",), _DIGITS_COLS),
    "moving_shapes": Task("moving_shapes", "recipes/video/moving_shapes_uncond.toml", False, ("moving_shapes",),
                          (("valid_fraction", "valid clips ↑"), ("disk_clip_fraction", "clips of disks ↑"),
                           ("frame_disk_fraction", "frames with one disk ↑"), ("param_fd", "param FD ↓")),
                          "video"),
    "tones": Task("tones", "recipes/audio/tones_uncond.toml", False, ("tones",),
                  (("valid_fraction", "valid ↑"), ("peak_concentration", "peak energy fraction ↑"),
                   ("pitch_error_cents", "pitch error (cents) ↓"), ("pitch_tv", "pitch TV ↓")), "audio"),
}
IMAGE_TASKS = [t for t in TASKS if TASKS[t].modality == "image"]


@dataclass(frozen=True)
class Variant:
    """An SP-only run: `overrides` on the recipe, initialised from `parent`'s final checkpoint."""

    name: str
    overrides: tuple[str, ...] = ()
    parent: str = "mse"


VARIANTS = {v.name: v for v in (
    Variant("sp"),  # mid, uniform t', mse distance, sp formulation, EMA of stage mse frozen
    Variant("layers_encoder", ("sp.layers=encoder",)),
    Variant("layers_decoder", ("sp.layers=decoder",)),
    Variant("layers_encoder+mid", ("sp.layers=encoder+mid",)),
    Variant("tprime_near", ("sp.t_prime=near",)),
    Variant("tprime_normal", ("sp.t_prime=normal",)),
    Variant("distance_mae", ("sp.distance=mae",)),
    Variant("formulation_sp2", ("sp.formulation=sp2",)),
    Variant("sp_repeat", ("sp.perceptual_weights=ema",), parent="sp"),  # Table 6: SP model as f_*
)}
ABLATIONS = [v for v in VARIANTS if v != "sp"]


@dataclass(frozen=True)
class Scale:
    mse_steps: dict[str, int]    # per task
    sp_steps: dict[str, int]     # per SP run of a task
    samples: dict[str, int]      # per row of a task
    sizes: dict[str, int]        # images are size x size
    seeds: int
    checkpoint_every: int


def _per_task(image: int, video: int, audio: int) -> dict[str, int]:
    """One value per task: `image` for the image tasks, `video` for moving_shapes, `audio` for tones."""
    return {name: {"image": image, "video": video, "audio": audio}[t.modality] for name, t in TASKS.items()}


SCALES = {
    "full": Scale(mse_steps=_per_task(1000, 500, 1000), sp_steps=_per_task(200, 150, 250),
                  samples=_per_task(300, 100, 200), sizes=_per_task(16, 16, 16), seeds=3, checkpoint_every=250),
    "quick": Scale(mse_steps=_per_task(30, 30, 30), sp_steps=_per_task(15, 15, 15),
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
    title: str
    task: str
    label_headers: list[str]
    rows: list[tuple[list[str], Unit]] = field(default_factory=list)
    note: str = ""


def plan_tables(tasks: list[str], ablation_tasks: list[str]) -> list[Table]:
    """The analogues of the paper's Tables 1-8 for the chosen tasks."""
    tables = []
    for name in tasks:
        task = TASKS[name]
        if task.modality != "image":
            tables.append(Table(f"Modalities ({name}, {task.modality}): MSE vs SP", name, ["Loss"],
                                [(["MSE"], Unit(name, "mse")), (["SP"], Unit(name, "sp"))]))
            continue
        t = Table(f"Table 1 ({name})", name, ["Loss", "CFG", "Rescale", "Steps", "NFE"])
        t.rows += [(["MSE", "", "", str(s)], Unit(name, "mse", s)) for s in (25, 50)]
        if task.conditional:
            t.rows += [(["MSE", "7.5", r, "25"], Unit(name, "mse", 25, 7.5, float(r or 0))) for r in ("", "0.7")]
        t.rows += [(["SP", "", "", str(s)], Unit(name, "sp", s)) for s in (25, 50)]
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
                        "with that run's EMA as the frozen network."}
    for name in ablation_tasks:
        for title, header, rows in ablations:
            tables.append(Table(title.format(name), name, [header],
                                [([label], Unit(name, model)) for label, model in rows],
                                note=notes.get(title.split(" (")[0], "")))
    for name in tasks:
        if TASKS[name].conditional:
            t = Table(f"Table 7 ({name}): SP with classifier-free guidance", name, ["Loss", "CFG", "Rescale"])
            t.rows.append((["MSE", "7.5", "0.7"], Unit(name, "mse", 25, *CFG_MSE)))
            t.rows.append((["SP", "", ""], Unit(name, "sp")))
            t.rows += [(["SP", f"{w:g}", "0.7"], Unit(name, "sp", 25, w, RESCALE)) for w in CFG_SP]
            tables.append(t)
    for name in tasks:
        if not TASKS[name].conditional and TASKS[name].modality == "image":
            tables.append(Table(f"Table 8 ({name}): unconditional generation", name, ["Loss"],
                                [(["MSE"], Unit(name, "mse")), (["SP"], Unit(name, "sp"))]))
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


class Interrupted(Exception):
    def __init__(self, signum: int | None):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


def run_dir_of(cfg: Config, task: str, seed: int, model: str) -> Path:
    return cfg.work_dir / task / f"seed{seed}" / model


def train(cfg: Config, task: str, seed: int, model: str, phase: str) -> Path:
    """Train (or resume, or skip) one run; returns its final checkpoint. The run's accumulated
    training wall seconds go to <run>/reproduce.json."""
    run_dir = run_dir_of(cfg, task, seed, model)
    stage = "mse" if model == "mse" else "sp"
    steps = cfg.mse_steps[task] if stage == "mse" else cfg.sp_steps[task]
    sidecar = run_dir / "reproduce.json"
    info = json.loads(sidecar.read_text()) if sidecar.exists() else {"wall_s": 0.0}
    final = final_checkpoint(run_dir, stage)
    if final is not None:
        done = json.loads((final / "meta.json").read_text())["extra"]["stage_step"]
        if done != steps:
            raise SystemExit(f"{run_dir} holds a finished {done}-step run, this configuration wants "
                             f"{steps} steps; use another --work-dir")
        log.info("%s %s seed %d %s: trained already (%d steps)", phase, task, seed, model, steps)
        return final
    overrides = [f"seed={seed}", f"name={task}-seed{seed}-{model}", f"data.size={cfg.sizes[task]}",
                 f"mse.steps={cfg.mse_steps[task]}", f"sp.steps={cfg.sp_steps[task]}",
                 f"train.checkpoint_every={cfg.checkpoint_every}", "train.sample_every=0", "train.keep_last=1",
                 f"train.stages=['{stage}']"]
    if stage == "sp":
        variant = VARIANTS[model]
        parent_stage = "mse" if variant.parent == "mse" else "sp"
        parent = final_checkpoint(run_dir_of(cfg, task, seed, variant.parent), parent_stage)
        if parent is None:  # models_of() orders parents first
            raise RuntimeError(f"{variant.parent} of {task} seed {seed} has no final checkpoint")
        overrides += [f"sp.init={json.dumps(str(parent.resolve()))}", *variant.overrides]
    recipe = load_recipe(ROOT / TASKS[task].recipe, overrides)
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
    return json.loads((path / "meta.json").read_text())["time"]


def evaluate_row(cfg: Config, u: Unit, seed: int, checkpoint: Path, rows: dict[str, dict], phase: str) -> dict:
    key = row_key(cfg, u, seed)
    old = rows.get(key)
    if old is not None and old.get("checkpoint_time") == _checkpoint_time(checkpoint):
        return old
    size, n = cfg.sizes[u.task], cfg.samples[u.task]
    t0 = time.time()
    loaded = load_model(checkpoint)
    ev = evaluate(loaded, list(TASKS[u.task].metrics), n=n, steps=u.steps, guidance=u.guidance,
                  rescale=u.rescale, seed=SAMPLE_SEED, batch_size=128 if size <= 16 else 64)
    steps, wall = lineage(cfg, u.task, seed, u.model)
    row = {"key": key, "scale": cfg.label, "task": u.task, "variant": u.model, "seed": seed,
           "steps": u.steps, "nfe": u.nfe, "guidance": u.guidance, "rescale": u.rescale, "samples": n,
           "size": size, "train_steps": steps, "train_wall_s": wall, "eval_wall_s": round(time.time() - t0, 2),
           "checkpoint_time": _checkpoint_time(checkpoint), "eval": ev}
    with open(cfg.results_dir / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    rows[key] = row
    cols = ", ".join(f"{k}={ev[k]:.4g}" for k, _ in TASKS[u.task].columns)
    log.info("%s %s seed %d %s steps %d cfg %g rescale %g: %s (%.0f s)", phase, u.task, seed, u.model, u.steps,
             u.guidance, u.rescale, cols, row["eval_wall_s"])
    return row


# ------------------------------------------------------------------------------ tables
def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


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


def _mean_wall(rows: list[dict], model: str) -> float | None:
    walls = [r["train_wall_s"].get(model) for r in rows if r["train_wall_s"].get(model) is not None]
    return statistics.fmean(walls) if walls else None


def render_tables(cfg: Config, tables: list[Table], rows: dict[str, dict], total_s: float) -> str:
    intro = (f"Scale `{cfg.label}`: seeds {', '.join(map(str, cfg.seeds))}; cells are mean ± sample std "
             "over training seeds. Every row: EMA weights, DDIM (trailing, eta 0), the same initial noise "
             f"(sampling seed {SAMPLE_SEED}); conditional rows cycle the 10 labels. Wall time of the work "
             f"these tables hold (training + evaluation): {total_s / 60:.1f} min.")
    lines = ["# Small-scale reproduction of the paper's tables", "", f"Machine: {machine()}.", "", intro, ""]
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
                  + f", then SP {cfg.sp_steps[t.task]} steps from the frozen MSE EMA"
                  + (f" ({walls} per seed)" if walls else "") + ". 25 DDIM steps unless stated."
                  + (f" {t.note}" if t.note else ""), ""]
        headers = t.label_headers + [h for _, h in task.columns]
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for (labels, _), rs in zip(t.rows, found):
            got = [r for r in rs if r is not None]
            cells = [cell([float(r["eval"][k]) for r in got]) for k, _ in task.columns]
            lines.append("| " + " | ".join(labels + cells) + " |")
        lines.append("")
    lines += ["## Figures", "",
              ("`figures/<task>_samples.png`: rows MSE, SP and (conditional tasks) MSE + CFG 7.5 rescale 0.7, "
              "25 DDIM steps from the same initial noise, seed-0 models (Figures 3 and 4). "
              "`figures/<task>_trajectory.png`: the x0 prediction at 10 of the 25 sampling steps (columns); "
              "for each of 3 initial noises a MSE row then a SP row (Figure 5). Video tasks: "
              "`figures/<task>_samples.png` has one clip per row (frames in columns), MSE clips then SP clips "
              "from the same noise, and a `.gif` beside it; audio tasks: the spectrograms of MSE clips then SP "
              "clips, and a `.wav` beside it."), ""]
    return "\n".join(lines)


def write_tables(cfg: Config, tables: list[Table], rows: dict[str, dict]) -> str:
    used = {row_key(cfg, u, s) for t in tables for _, u in t.rows for s in cfg.seeds}
    runs = {(r["task"], r["seed"], m): w for k, r in rows.items() if k in used for m, w in r["train_wall_s"].items()}
    total = sum(w for w in runs.values() if w) + sum(rows[k]["eval_wall_s"] for k in used if k in rows)
    text = render_tables(cfg, tables, rows, total)
    path = cfg.results_dir / "tables.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return text


# ------------------------------------------------------------------------------ figures
def figures(cfg: Config, task: str, seed: int, n: int = 10, n_traj: int = 3, columns: int = 10) -> list[Path]:
    """Figure 3/4 (samples of each model from the same noise) and Figure 5 (x0 trajectories)."""
    out = cfg.results_dir / "figures"
    mse = load_model(final_checkpoint(run_dir_of(cfg, task, seed, "mse"), "mse"))
    sp = load_model(final_checkpoint(run_dir_of(cfg, task, seed, "sp"), "sp"))
    kind = TASKS[task].modality
    if kind != "image":  # MSE clips then SP clips from the same noise; no trajectory figure
        n = 4
        both = torch.cat([generate(m, n, 25, seed=SAMPLE_SEED).samples for m in (mse, sp)])
        return save_samples(both, out / f"{task}_samples.png", kind, nrow=n, scale=3 if kind == "video" else 2,
                            sample_rate=mse.recipe.data.sample_rate)  # audio: a row of MSE, a row of SP
    rows = [generate(mse, n, 25, seed=SAMPLE_SEED).samples, generate(sp, n, 25, seed=SAMPLE_SEED).samples]
    if TASKS[task].conditional:
        rows.append(generate(mse, n, 25, *CFG_MSE, seed=SAMPLE_SEED).samples)
    scale = 3 if cfg.sizes[task] <= 16 else 2
    paths = [save_grid(torch.cat(rows), out / f"{task}_samples.png", nrow=n, scale=scale)]

    r = mse.recipe
    noise = torch.randn(n_traj, r.data.channels, r.data.size, r.data.size,
                        generator=torch.Generator().manual_seed(SAMPLE_SEED))
    cond = torch.arange(n_traj) % 10 if TASKS[task].conditional else None
    schedule = build_schedule(r)
    steps = 25
    pick = torch.linspace(0, steps - 1, columns).round().long()
    trajs = [ddim_sample(m.model, schedule, noise, cond=cond, steps=steps, return_x0_trajectory=True)[1][pick]
             for m in (mse, sp)]  # each [columns x N x C x H x W]
    grid = torch.stack([trajs[k][:, i] for i in range(n_traj) for k in range(2)])  # [2N x columns x ...]
    paths.append(save_grid(grid.flatten(0, 1), out / f"{task}_trajectory.png", nrow=columns, scale=scale))
    return paths


# ------------------------------------------------------------------------------ main
def build_config(args: argparse.Namespace) -> Config:
    scale_name = "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    tasks = list(TASKS)
    label = scale_name + (f"-steps{args.scale_steps:g}" if args.scale_steps != 1 else "")
    mse_steps = {t: max(1, round(scale.mse_steps[t] * args.scale_steps)) for t in tasks}
    sp_steps = {t: max(1, round(scale.sp_steps[t] * args.scale_steps)) for t in tasks}
    samples = {t: args.samples or scale.samples[t] for t in tasks}
    work_dir = Path(args.work_dir or ROOT / "runs" / "reproduce" / label)
    results_dir = Path(args.results_dir or (work_dir / "results" if args.quick else ROOT / "benchmarks" / "results"))
    return Config(label=label, mse_steps=mse_steps, sp_steps=sp_steps, samples=samples, sizes=dict(scale.sizes),
                  seeds=args.seed_list or list(range(args.seeds or scale.seeds)),
                  checkpoint_every=scale.checkpoint_every,
                  work_dir=work_dir, results_dir=results_dir, progress=args.progress)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny pipeline check (2 seeds, 30 + 15 steps, 40 samples)")
    p.add_argument("--seeds", type=int, default=0, help="training seeds 0..N-1 (default: 3, quick 2)")
    p.add_argument("--seed-list", default="", help="comma-separated training seeds to run instead of 0..N-1 (e.g. "
                                                   "one process per seed on a machine with more cores); render the "
                                                   "tables afterwards with the plain command")
    p.add_argument("--samples", type=int, default=0, help="samples per row for every task")
    p.add_argument("--scale-steps", type=float, default=1.0, help="multiply every run's training steps")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS)
                   + " (default: all)")
    p.add_argument("--ablation-tasks", default="digits", help="tasks of Tables 2-6 (comma-separated; '' for none)")
    p.add_argument("--work-dir", help="training runs (default runs/reproduce/<scale>)")
    p.add_argument("--results-dir", help="tables.md, rows.jsonl, figures/ (default benchmarks/results; "
                                         "quick: <work-dir>/results)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    args = p.parse_args(argv)
    for opt in ("tasks", "ablation_tasks"):
        names = [t for t in getattr(args, opt).split(",") if t]
        bad = [t for t in names if t not in TASKS]
        if bad:
            p.error(f"--{opt.replace('_', '-')}: unknown task(s) {', '.join(bad)}; choose from {', '.join(TASKS)}")
        setattr(args, opt, names)
    try:
        args.seed_list = [int(v) for v in args.seed_list.split(",") if v.strip()]
    except ValueError:
        p.error(f"--seed-list must be comma-separated integers, got {args.seed_list!r}")
    if any(v < 0 for v in args.seed_list):
        p.error("--seed-list seeds must be >= 0")
    if args.seeds < 0 or args.samples < 0 or args.scale_steps <= 0:
        p.error("--seeds and --samples must be >= 1 and --scale-steps > 0")
    if args.samples == 1:
        p.error("--samples must be >= 2 (the metrics need a spread)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("perceptual_diffusion").setLevel(logging.WARNING)
    cfg = build_config(args)
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    ablation_tasks = [t for t in args.ablation_tasks if t in args.tasks]
    tables = plan_tables(args.tasks, ablation_tasks)
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
    text = write_tables(cfg, tables, rows)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
