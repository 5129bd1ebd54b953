"""Does a backbone preset train stably at a learning rate? Stage mse of a recipe at a few lrs, side
by side, read back from each run's metrics.jsonl (issue 15, item 3: the evidence behind a
backbone's `RECOMMENDED_LR`).

    python benchmarks/preset_lr.py recipes/audio/tones.toml --preset default --lr 1e-3,3e-4 --warmup 200 \
        --steps 1500 --jobs 2 --out runs/preset_lr/audio_default

Each lr is one `perceptual-diffusion train RECIPE --set 'train.stages=["mse"]'` run with the preset,
the lr, the warm-up and the steps given, a constant lr after the warm-up (``mse.decay_steps=0``: the
harsher test; a recipe's anneal would hide a late spike), ``train.divergence=warn`` (a spike is
reported and the run goes on, so its whole curve is seen) and everything else as the recipe ships.
Runs that finished already are read, not retrained (delete the run directory to redo one); a run
that was stopped resumes from its latest checkpoint (every ``--checkpoint-every`` steps), so a long
sweep can span several sessions.

Per run the table gives the seconds per step, the loss at the end (the mean of the last tenth of the
logged losses), the validation v-MSE at the end and its minimum, the guard's statistic at its peak
(the median of five consecutive logged losses over its running minimum, from the end of the warm-up
plus one window; the trainer's guard uses the median of 50 step losses and fires above
``train.divergence_factor``, 2 by default) and whether the guard warned. A run is "stable" when the
guard did not warn, every logged loss is finite and the peak statistic stays below the factor.
`table.md` and `runs.json` go to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from sp_step import cpu_name  # noqa: E402

from backbones import BACKBONE_SPECS  # noqa: E402
from perceptual_diffusion.config import load_recipe  # noqa: E402
from perceptual_diffusion.guards import WARN_SUFFIX as WARNED  # noqa: E402  (the trainer's spike warning ends so)

LOG_WINDOW = 5  # logged losses per median (5 x log_every steps)


def guard_peak(losses: list[float], start: int = 0) -> float:
    """The largest median of `LOG_WINDOW` consecutive values over the running minimum of those
    medians (itself included, so a curve that never rises gives 1), counting medians whose window
    ends at index >= `start`; nan if there are none."""
    best, peak = math.inf, math.nan
    for end in range(LOG_WINDOW, len(losses) + 1):
        median = statistics.median(losses[end - LOG_WINDOW:end])
        best = min(best, median)
        if end - 1 >= start:
            peak = median / best if math.isnan(peak) else max(peak, median / best)
    return peak


def summarise(run_dir: Path, warmup: int, factor: float) -> dict:
    """The figures of one finished run, from its metrics.jsonl and train.log."""
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in logs if r.get("stage") == "mse" and "loss" in r}  # a resume logs its steps again
    logs = [by_step[k] for k in sorted(by_step)]
    if not logs:
        raise ValueError(f"{run_dir}: no stage-mse losses in metrics.jsonl")
    losses = [float(r["loss"]) for r in logs]
    vals = [float(r["val_vmse"]) for r in logs if "val_vmse" in r]
    every = logs[1]["step"] - logs[0]["step"] if len(logs) > 1 else 1
    start = next((i for i, r in enumerate(logs) if r["step"] >= warmup + LOG_WINDOW * every), len(logs))
    tail = losses[-max(1, len(losses) // 10):]
    log = run_dir / "train.log"
    warned = log.exists() and WARNED in log.read_text()
    peak = guard_peak(losses, start)
    finite = all(map(math.isfinite, losses))
    # elapsed_s restarts at a resume: time the last uninterrupted stretch, from its second log (start-up is not a step)
    cut = max((i for i in range(1, len(logs)) if logs[i]["elapsed_s"] < logs[i - 1]["elapsed_s"]), default=0)
    first, last = logs[min(cut + 1, len(logs) - 1)], logs[-1]
    per_step = ((last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"]) if last is not first
                else last["elapsed_s"] / last["step"])
    return {"steps": last["step"], "s_per_step": per_step,
            "final_loss": statistics.fmean(tail), "val_vmse_end": vals[-1] if vals else math.nan,
            "val_vmse_min": min(vals) if vals else math.nan, "guard_peak": peak, "guard_warned": warned,
            "stable": finite and not warned and (not math.isfinite(peak) or peak < factor)}


def train_one(recipe: Path, run_dir: Path, preset: str, lr: float, warmup: int, steps: int, extra: list[str],
              threads: int, checkpoint_every: int) -> float:
    """One stage-mse run through the CLI, or the rest of a stopped one; its wall seconds (0 when it
    had finished already)."""
    if (run_dir / "summary.json").exists():
        return 0.0
    sets = [f"model.preset={preset}", f"mse.lr={lr!r}", f"mse.warmup_steps={warmup}", f"mse.steps={steps}",
            "mse.decay_steps=0", "train.stages=['mse']", "train.divergence=warn", "train.sample_every=0",
            f"train.checkpoint_every={checkpoint_every}", "train.keep_last=1", *extra]
    resume = ["--resume", "latest"] if any((run_dir / "checkpoints").glob("step-*")) else []
    cmd = [sys.executable, "-m", "perceptual_diffusion.cli", "train", str(recipe), "--out", str(run_dir),
           "--no-progress", *resume] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / "train.log", "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise RuntimeError(f"{run_dir}: training exited with status {code}; see {run_dir / 'train.log'}")
    return time.time() - t0


def render(args: argparse.Namespace, rows: list[dict]) -> str:
    lines = [f"# Stage mse of `{args.recipe}` with preset `{args.preset}` at {len(rows)} learning rates", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, {args.jobs} run(s) at a time. Command: "
             f"`python benchmarks/preset_lr.py {' '.join(args.argv)}`. {args.steps} steps, warm-up {args.warmup}, "
             "constant lr after it, train.divergence=warn.", "",
             "| lr | s / step | loss at the end | val v-MSE end (min) | guard peak (median / min) | guard warned | stable |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lr']:g} | {r['s_per_step']:.3f} | {r['final_loss']:.4f} | {r['val_vmse_end']:.4f} "
                     f"({r['val_vmse_min']:.4f}) | {r['guard_peak']:.2f} | {'yes' if r['guard_warned'] else 'no'} "
                     f"| {'yes' if r['stable'] else 'no'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path)
    p.add_argument("--preset", default="default")
    p.add_argument("--lr", default="1e-3,3e-4", help="comma-separated learning rates")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (a stopped run "
                                                                      "resumes from its latest)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each on cpu_count / jobs torch threads")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    try:
        args.lrs = [float(v) for v in args.lr.split(",") if v.strip()]
    except ValueError:
        p.error(f"--lr must be comma-separated numbers, got {args.lr!r}")
    if not args.lrs or any(v <= 0 for v in args.lrs):
        p.error("--lr needs one or more learning rates > 0")
    if args.steps < 1 or args.warmup < 0 or args.jobs < 1 or args.checkpoint_every < 0:
        p.error("--steps >= 1, --warmup >= 0, --jobs >= 1 and --checkpoint-every >= 0")
    try:
        recipe = load_recipe(args.recipe, [f"model.preset={args.preset}", *args.set])
    except (OSError, ValueError) as e:
        p.error(str(e).splitlines()[0])
    presets = BACKBONE_SPECS[recipe.model.backbone].load().PRESETS
    if args.preset not in presets:
        p.error(f"--preset: {recipe.model.backbone} has no preset {args.preset!r}; presets: {', '.join(presets)}")
    args.factor = recipe.train.divergence_factor
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    dirs = {lr: args.out / f"lr{lr:g}" for lr in args.lrs}
    with ThreadPoolExecutor(args.jobs) as pool:
        walls = list(pool.map(lambda lr: train_one(args.recipe, dirs[lr], args.preset, lr, args.warmup, args.steps,
                                                   args.set, threads, args.checkpoint_every), args.lrs))
    rows = [{"lr": lr, "wall_s": w, **summarise(dirs[lr], args.warmup, args.factor)} for lr, w in zip(args.lrs, walls)]
    text = render(args, rows)
    (args.out / "table.md").write_text(text)
    (args.out / "runs.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
