"""The tiny circles recipe through both stages, stopped by SIGTERM and resumed, against an
uninterrupted run: is the resume exact on this device and precision?

    python benchmarks/resume_check.py --mixed-precision bf16            # on a GPU: the GPU check
    python benchmarks/resume_check.py --mixed-precision bf16 --smoke    # a few steps, any machine

Both runs use `perceptual-diffusion train recipes/image/circles.toml` (16x16, tiny ImageUNet)
with the same settings in fresh run directories. The second is sent SIGTERM once it logs its
first step of stage sp (so the resume crosses the frozen perceptual copy), must exit with 143,
and is then continued with `--resume latest`. Reported: wall times, the step it stopped at, and
the largest absolute difference of every tensor (online and EMA weights) between the two final
checkpoints; "exact" means every tensor is bit for bit equal.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perceptual_diffusion.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402


def train_cmd(out: Path, args: argparse.Namespace, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "perceptual_diffusion.cli", "train", str(ROOT / "recipes/image/circles.toml"),
           "--out", str(out), "--no-progress",
           "--set", "data.size=16", "--set", f"mse.steps={args.mse_steps}", "--set", f"sp.steps={args.sp_steps}",
           "--set", f"train.mixed_precision={args.mixed_precision}", "--set", "train.log_every=1",
           "--set", f"train.checkpoint_every={args.checkpoint_every}", "--set", "train.sample_every=0",
           "--set", "train.num_samples=4", "--set", "train.sample_steps=5"]
    return cmd + (["--resume", "latest"] if resume else [])


def first_sp_step(metrics: Path) -> bool:
    if not metrics.exists():
        return False
    for line in metrics.read_text().splitlines():
        try:
            if json.loads(line).get("stage") == "sp":
                return True
        except ValueError:  # a line being written
            pass
    return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="bf16")
    p.add_argument("--mse-steps", type=int, default=300)
    p.add_argument("--sp-steps", type=int, default=150)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="12 + 8 steps, checkpoints every 4")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "resume_check")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.smoke:
        args.mse_steps, args.sp_steps, args.checkpoint_every = 12, 8, 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")}
    full, stopped = args.workdir / "uninterrupted", args.workdir / "interrupted"
    for d in (full, stopped):
        if d.exists():
            subprocess.run(["rm", "-rf", str(d)], check=True)

    start = time.perf_counter()
    done = subprocess.run(train_cmd(full, args), cwd=ROOT, env=env, capture_output=True, text=True)
    t_full = time.perf_counter() - start
    if done.returncode != 0:
        print(f"uninterrupted run failed ({done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
        return 1

    start = time.perf_counter()
    proc = subprocess.Popen(train_cmd(stopped, args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not first_sp_step(stopped / "metrics.jsonl"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 143:
        print(f"SIGTERM gave exit {proc.returncode}, expected 143:\n{err[-3000:]}", file=sys.stderr)
        return 1
    stop_ck = load_checkpoint(latest_checkpoint(stopped))
    resumed = subprocess.run(train_cmd(stopped, args, resume=True), cwd=ROOT, env=env, capture_output=True,
                             text=True)
    t_stopped = time.perf_counter() - start
    if resumed.returncode != 0:
        print(f"resume failed ({resumed.returncode}):\n{resumed.stderr[-3000:]}", file=sys.stderr)
        return 1

    a, b = load_checkpoint(latest_checkpoint(full)), load_checkpoint(latest_checkpoint(stopped))
    diffs = {}
    for kind in sorted(set(a.weights) | set(b.weights)):
        wa, wb = a.weights.get(kind, {}), b.weights.get(kind, {})
        if set(wa) != set(wb):
            print(f"{kind}: the two checkpoints hold different tensors", file=sys.stderr)
            return 1
        diffs[kind] = max(((wa[k].double() - wb[k].double()).abs().max().item() for k in wa), default=0.0)
    exact = all(torch.equal(a.weights[k][n], b.weights[k][n]) for k in a.weights for n in a.weights[k])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "mixed_precision": args.mixed_precision, "mse_steps": args.mse_steps, "sp_steps": args.sp_steps,
              "stopped_at": {"stage": stop_ck.stage, "step": stop_ck.step},
              "final": {"stage": b.stage, "step": b.step}, "max_abs_diff": diffs, "exact": exact,
              "seconds_uninterrupted": round(t_full, 1), "seconds_interrupted_and_resumed": round(t_stopped, 1)}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if (a.stage, a.step) != (b.stage, b.step):
        print(f"the runs ended at different steps: {a.stage} {a.step} vs {b.stage} {b.step}", file=sys.stderr)
        return 1
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
