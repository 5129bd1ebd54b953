"""Which SP length is fair? The pilot of issue 11, item 5, read back and judged by a rule fixed
before its results were seen.

The pilot is `benchmarks/reproduce.py` run once per candidate (SP steps x lr) into one work dir,
on training seeds and sampling noise that the committed tables do not use, for example

    for c in "300 1e-3" "300 1e-4" "300 3e-4" "200 1e-4"; do set -- $c
      python benchmarks/reproduce.py --jobs 2 --tasks digits_uncond,photo_patches --ablation-tasks '' \
        --artifact-tasks '' --seed-list 10,11 --sample-seed 1 --sp-steps $1 --sp-lr $2 --no-figures \
        --work-dir runs/pilot --results-dir runs/pilot/sp$1-lr$2; done
    python benchmarks/sp_pilot.py --work-dir runs/pilot --candidates 300:1e-3,300:1e-4,300:3e-4,200:1e-4 \
        --tasks digits_uncond,photo_patches --seeds 10,11 --out runs/pilot/pilot.md

The rule: SP has been given enough steps when its own objective moved and then stopped moving.
Per SP run, the `val_sp` diagnostic (eq. 12 on the run's fixed validation batch, logged every
`log_every` steps) is cut into thirds by stage step and each third summarised by its median, with
the median's standard error (1.2533 s / sqrt(n) from the spread of that third's logs: the online
weights jitter from log to log, so single logs are too noisy to difference). The run's fall is the
first third's median minus the last's, its late fall the middle's minus the last's. A run has
converged when its fall is measurable (over twice its standard error) and its late fall is not:
under `--late-fraction` (10%) of the fall, or under twice its own standard error. The chosen
length is the shortest candidate (the smallest steps x lr, then the fewest steps) whose runs all
converged; when none did, the pilot cannot tell lengths apart and `--fallback` is used (the
issue's own suggestion: the lr the MSE stage ended at, for 30% of its steps). reproduce trains
with the divergence guard on "stop", so a run that finished had no loss spike.

The sample metrics of each candidate (the task's headline metric and the high-frequency energy
ratio, SP against its matched control), the control's own val_sp at the end and SP's training
loss (L_sp on the training batches, the thirds' medians of its logged means) are shown beside;
they play no part in the choice.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce import TASKS, paired_cell, read_rows  # noqa: E402

LATE_FRACTION = 0.1


def median_se(values: list[float]) -> float:
    """Standard error of the median of `values`, logged in order along a trend: 1.2533 sigma / sqrt(n)
    (normal approximation), with the log-to-log noise sigma estimated from successive differences
    (sigma^2 = mean((x[i+1] - x[i])^2) / 2), which a smooth trend hardly inflates."""
    if len(values) < 2:
        return math.inf
    sigma = math.sqrt(statistics.fmean((b - a) ** 2 for a, b in zip(values, values[1:])) / 2)
    return 1.2533 * sigma / math.sqrt(len(values))


@dataclass(frozen=True)
class Convergence:
    """The thirds' medians of a stage's val_sp and their standard errors."""

    medians: tuple[float, float, float]
    errors: tuple[float, float, float]

    @property
    def fall(self) -> float:
        return self.medians[0] - self.medians[2]

    @property
    def late_fall(self) -> float:
        return self.medians[1] - self.medians[2]

    def measurable_fall(self) -> bool:
        return self.fall > 2 * math.hypot(self.errors[0], self.errors[2])

    def still_falling(self, late_fraction: float = LATE_FRACTION) -> bool:
        return self.late_fall > max(late_fraction * self.fall, 2 * math.hypot(self.errors[1], self.errors[2]))

    def converged(self, late_fraction: float = LATE_FRACTION) -> bool:
        return self.measurable_fall() and not self.still_falling(late_fraction)

    def text(self, late_fraction: float = LATE_FRACTION) -> str:
        m, e = self.medians, self.errors
        verdict = ("no measurable fall" if not self.measurable_fall() else
                   "still falling" if self.still_falling(late_fraction) else "converged")
        return (f"{m[0]:.4g} → {m[1]:.4g} → {m[2]:.4g} (fall {self.fall:+.2g} ± {math.hypot(e[0], e[2]):.1g}, "
                f"late {self.late_fall:+.2g} ± {math.hypot(e[1], e[2]):.1g}: {verdict})")


def convergence(records: list[dict], steps: int, key: str = "val_sp") -> Convergence:
    """Thirds' medians of `key` over one stage of `steps` steps, from its metrics records (those
    with a stage_step in 1..steps that carry `key`)."""
    points = [(r["stage_step"], r[key]) for r in records if key in r and 0 < r.get("stage_step", 0) <= steps]
    thirds = [[v for s, v in points if lo < s <= hi] for lo, hi in
              ((0, steps / 3), (steps / 3, 2 * steps / 3), (2 * steps / 3, steps))]
    if not all(len(t) > 1 for t in thirds):
        raise ValueError(f"need {key} logged twice or more in every third of the {steps} steps, "
                         f"got steps {[s for s, _ in points]}")
    return Convergence(tuple(statistics.median(t) for t in thirds), tuple(median_se(t) for t in thirds))


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (has the candidate been trained?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def suffix(steps: int, lr: float) -> str:
    """The run-name suffix reproduce.py gives a candidate's SP runs and controls."""
    return f"-steps{steps}-lr{lr:g}"


def sample_cells(rows: dict[str, dict], task: str, seeds: list[int]) -> tuple[str, str, str]:
    """(SP − control on the task's headline metric, SP's HF ratio, the control's HF ratio) at 25 steps."""
    def find(variant: str, seed: int) -> dict | None:
        return next((r for r in rows.values() if r["task"] == task and r["variant"] == variant
                     and r["seed"] == seed and r["steps"] == 25 and r["guidance"] == 1.0), None)

    head = TASKS[task].columns[0]
    sp, ctl = [find("sp", s) for s in seeds], [find("control", s) for s in seeds]
    if not all(sp) or not all(ctl):
        return "–", "–", "–"
    hf = lambda rs: f"{statistics.fmean(r['eval']['spectrum_hf_ratio'] for r in rs):.2f}"  # noqa: E731
    return paired_cell(head, [r["eval"][head.key] for r in sp], [r["eval"][head.key] for r in ctl]), hf(sp), hf(ctl)


def parse_candidates(text: str) -> list[tuple[int, float, str]]:
    """"STEPS:LR,..." -> (steps, lr, LR as written: the results dir is sp<STEPS>-lr<LR>)."""
    out = []
    for item in text.split(","):
        try:
            steps, lr = item.split(":")
            out.append((int(steps), float(lr), lr))
        except ValueError:
            raise ValueError(f"want STEPS:LR[,STEPS:LR...], got {item!r}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, required=True, help="reproduce.py's --work-dir of the pilot")
    p.add_argument("--candidates", required=True, help="STEPS:LR,... as given to reproduce's --sp-steps/--sp-lr")
    p.add_argument("--tasks", required=True, help="comma-separated tasks")
    p.add_argument("--seeds", required=True, help="comma-separated training seeds")
    p.add_argument("--results-root", type=Path, default=None,
                   help="where the candidates' results dirs sp<STEPS>-lr<LR> are, for the sample metrics "
                        "(default: the work dir)")
    p.add_argument("--fallback", default=None,
                   help="STEPS:LR used when no candidate converged (e.g. the MSE stage's final lr for 30%% of its steps)")
    p.add_argument("--late-fraction", type=float, default=LATE_FRACTION)
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    try:
        candidates = parse_candidates(args.candidates)
        fallback = parse_candidates(args.fallback)[0][:2] if args.fallback else None
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        p.error(str(e))
    tasks = args.tasks.split(",")
    if unknown := [t for t in tasks if t not in TASKS]:
        p.error(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    try:
        text = judge(args, candidates, fallback, tasks, seeds)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


def judge(args: argparse.Namespace, candidates: list[tuple[int, float, str]], fallback: tuple[int, float] | None,
          tasks: list[str], seeds: list[int]) -> str:
    """The pilot's table and its choice, as markdown."""
    root = args.results_root or args.work_dir
    lines = ["| SP steps | SP lr | task | SP's val_sp per seed: thirds' medians, fall and late fall ± SE "
             "| converged | val_sp at the end, SP / control | SP's training loss, thirds' medians | SP − control, headline [95% CI] | HF ratio SP / control |",
             "|---|---|---|---|---|---|---|---|---|"]
    chosen = None
    for steps, lr, written in sorted(candidates, key=lambda c: (c[0] * c[1], c[0])):
        ok = True
        rows = read_rows(root / f"sp{steps}-lr{written}" / "rows.jsonl")
        for task in tasks:
            records = {m: [read_metrics(args.work_dir / task / f"seed{s}" / f"{m}{suffix(steps, lr)}" / "metrics.jsonl")
                           for s in seeds] for m in ("sp", "control")}
            runs = {m: [convergence(r, steps) for r in records[m]] for m in records}
            train = "; ".join(" → ".join(f"{v:.4g}" for v in convergence(r, steps, key="loss").medians)
                              for r in records["sp"])
            conv = all(c.converged(args.late_fraction) for c in runs["sp"])
            ok &= conv
            end = " / ".join(f"{statistics.fmean(c.medians[2] for c in runs[m]):.4g}" for m in ("sp", "control"))
            delta, hf_sp, hf_ctl = sample_cells(rows, task, seeds)
            lines.append(f"| {steps} | {lr:g} | {task} | {'; '.join(c.text(args.late_fraction) for c in runs['sp'])} | "
                         f"{'yes' if conv else 'no'} | {end} | {train} | {TASKS[task].columns[0].header}: {delta} | "
                         f"{hf_sp} / {hf_ctl} |")
        if ok and chosen is None:
            chosen = (steps, lr)
    lines.append("")
    if chosen:
        lines.append(f"Chosen: {chosen[0]} steps at lr {chosen[1]:g}, the shortest candidate (by steps x lr) "
                     "whose SP runs all converged.")
    else:
        lines.append("No candidate's SP runs all converged, so the pilot cannot tell the lengths apart; "
                     + (f"the fallback is used: {fallback[0]} steps at lr {fallback[1]:g}." if fallback
                        else "no --fallback was given."))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
