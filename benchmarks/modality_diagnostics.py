"""Why the tones and moving_shapes recipes score 0 valid samples (issue 14, item 1): evidence only.

    OMP_NUM_THREADS=1 python benchmarks/modality_diagnostics.py --out runs/diag --steps 300

For each recipe (recipes/audio/tones.toml, recipes/video/moving_shapes.toml):
  (a) metric sanity: real clips, and real clips perturbed (Gaussian noise of std 0.01..0.3 in the
      data's [-1, 1] units; for video also a spatial blur and one-pixel shifts), scored with the
      metric exactly as `evaluation` calls it;
  (b) data scale: std / mean / peak of the items next to the unit-variance noise, and the
      timestep where the data's SNR ab * std^2 / (1 - ab) crosses 1 (vs unit-variance data);
  (c) one-batch overfit: the recipe's model and schedule, plain v-MSE (`VelocityMSE`), AdamW at
      the recipe's lr (with its warmup and grad clip) on one fixed batch (8 tones / 4 clips),
      fresh t and noise every step; the loss curve, the final loss per t bucket (next to the loss
      of predicting v = 0), then 25-step DDIM samples with the batch's labels scored by the
      metric. An exact posterior-mean denoiser of the same batch goes through the same sampler
      and metric as a control of that path, independent of any training.
Writes OUT/diagnostics.json and prints a compact report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perceptual_diffusion.builders import build_model, build_schedule, to_data  # noqa: E402
from perceptual_diffusion.config import load_recipe  # noqa: E402
from perceptual_diffusion.datasets import build_dataset  # noqa: E402
from perceptual_diffusion.metrics.moving_shapes import moving_shapes_metrics  # noqa: E402
from perceptual_diffusion.metrics.tones import tones_metrics  # noqa: E402
from perceptual_diffusion.objectives import VelocityMSE  # noqa: E402
from perceptual_diffusion.sampling import ddim_sample  # noqa: E402
from perceptual_diffusion.schedule import NoiseSchedule  # noqa: E402

RECIPES = {"tones": ("recipes/audio/tones.toml", 8), "moving_shapes": ("recipes/video/moving_shapes.toml", 4)}
NOISE_STDS = (0.0, 0.01, 0.03, 0.1, 0.3)
BUCKETS = ((0, 100), (100, 500), (500, 1000))
LOG_EVERY = 25


def metric_fn(name: str, recipe: Any) -> Callable[[Tensor, Tensor | None], dict[str, float]]:
    """The metric called the way `evaluation._tones` / `_moving_shapes` call it."""
    if name == "tones":
        return lambda x, labels: tones_metrics(x, sample_rate=recipe.data.sample_rate, labels=labels)
    return lambda x, labels: moving_shapes_metrics(x, labels=labels)


def compact(m: dict[str, float]) -> dict[str, float]:
    keys = ("valid_fraction", "num_valid", "label_accuracy", "peak_concentration", "pitch_error_cents",
            "frame_disk_fraction", "disk_clip_fraction", "track_error", "param_fd")
    return {k: (float(m[k]) if math.isfinite(float(m[k])) else str(m[k])) for k in keys if k in m}


# ---------------------------------------------------------------- (a) perturbations

def blur(x: Tensor, sigma: float) -> Tensor:
    """Per-frame spatial Gaussian blur (3x3 or 5x5, replicate padding) of [N x 1 x F x H x W]."""
    r = max(1, math.ceil(2 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = (k / k.sum())
    n, c, f, h, w = x.shape
    y = F.pad(x.reshape(n * c * f, 1, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return y.reshape(n, c, f, h, w)


def shift(x: Tensor, frames: slice = slice(None)) -> Tensor:
    """Shift the chosen frames one pixel right, filling with the background (-1)."""
    y = x.clone()
    part = y[:, :, frames]
    part[..., 1:] = x[:, :, frames][..., :-1]
    part[..., :1] = -1.0
    y[:, :, frames] = part
    return y


def metric_sanity(name: str, x: Tensor, labels: Tensor, metric: Callable) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for std in NOISE_STDS:
        out[f"noise_{std}"] = compact(metric(x + std * torch.randn(x.shape, generator=g), labels))
    if name == "moving_shapes":
        out["blur_sigma_0.5"] = compact(metric(blur(x, 0.5), labels))
        out["blur_sigma_1.0"] = compact(metric(blur(x, 1.0), labels))
        out["shift_1px_all_frames"] = compact(metric(shift(x), labels))
        out["shift_1px_frame_3_only"] = compact(metric(shift(x, slice(3, 4)), labels))
    return out


# ---------------------------------------------------------------- (b) scale

def data_scale(x: Tensor, schedule: NoiseSchedule) -> dict[str, Any]:
    std = float(x.std())
    ab = schedule.alphas_cumprod.double()

    def crossing(var: float) -> int:
        snr = ab * var / (1 - ab).clamp_min(1e-30)
        below = torch.nonzero(snr < 1)
        return int(below[0]) if len(below) else -1

    per_item = x.flatten(1).std(1)
    return {"items": len(x), "mean": float(x.mean()), "std": std, "rms": float(x.square().mean().sqrt()),
            "per_item_std_min": float(per_item.min()), "per_item_std_median": float(per_item.median()),
            "per_item_std_max": float(per_item.max()), "abs_max": float(x.abs().max()),
            "noise_std": 1.0, "t_snr_1_this_data_var": crossing(float(x.var())),
            "t_snr_1_unit_var_data": crossing(1.0),
            "t_snr_1_this_data_second_moment": crossing(float(x.square().mean()))}


# ---------------------------------------------------------------- (c) overfit one batch

class BatchPosteriorMean(nn.Module):
    """The exact v of the empirical distribution of a batch x0 [B x ...] (per label when given):
    x0_hat = softmax_i(-||x_t - a x0_i||^2 / 2 s^2) . x0_i, v = (a x_t - x0_hat) / s."""

    def __init__(self, x0: Tensor, labels: Tensor | None, schedule: NoiseSchedule):
        super().__init__()
        self.x0, self.labels, self.schedule = x0, labels, schedule

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        ab = self.schedule.alphas_cumprod.to(x_t.dtype)[t].view(-1, *[1] * (x_t.ndim - 1))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        d2 = (x_t[:, None] - a[:, None] * self.x0[None]).flatten(2).square().sum(-1)  # (N, B)
        logits = -d2 / (2 * s.flatten()[:, None] ** 2)
        if cond is not None and self.labels is not None:
            logits = logits.masked_fill(cond[:, None] != self.labels[None], -math.inf)
        w = logits.softmax(1)
        x0_hat = (w @ self.x0.flatten(1)).view_as(x_t)
        return (a * x_t - x0_hat) / s


@torch.no_grad()
def bucket_losses(net: nn.Module, objective: VelocityMSE, x0: Tensor, labels: Tensor, reps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    ab = objective.schedule.alphas_cumprod
    out = {}
    for lo, hi in BUCKETS:
        losses, zero = [], []
        for _ in range(reps):
            t = torch.randint(lo, hi, (len(x0),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            losses.append(objective(net, x0, labels, t=t, noise=noise))
            v = objective.schedule.velocity(x0, noise, t)
            zero.append(v.flatten(1).square().mean(1))
        out[f"[{lo},{hi})"] = {"v_mse": float(torch.cat(losses).mean()),
                               "v_mse_of_predicting_zero": float(torch.cat(zero).mean()),
                               "mean_alpha_bar": float(ab[lo:hi].mean())}
    return out


def nearest_rms(samples: Tensor, x0: Tensor, sample_labels: Tensor, labels: Tensor) -> list[float]:
    """Per sample, the RMS distance to the nearest batch item of the same label."""
    d = (samples[:, None] - x0[None]).flatten(2).square().mean(-1).sqrt()  # (N, B)
    d = d.masked_fill(sample_labels[:, None] != labels[None], math.inf)
    return d.min(1).values.tolist()


def sample_and_score(net: nn.Module, schedule: NoiseSchedule, x0: Tensor, labels: Tensor, repeats: int,
                     metric: Callable, steps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    cond = labels.repeat(repeats)
    noise = torch.randn((len(cond), *x0.shape[1:]), generator=g)
    samples = ddim_sample(net, schedule, noise, cond=cond, steps=steps)
    near = torch.tensor(nearest_rms(samples, x0, cond, labels))
    return {"n": len(cond), "metric": compact(metric(samples, cond)),
            "sample_std": float(samples.std()), "sample_abs_max": float(samples.abs().max()),
            "nearest_same_label_item_rms_median": float(near.median()),
            "nearest_same_label_item_rms_max": float(near.max())}


def overfit(recipe: Any, x0: Tensor, labels: Tensor, steps: int, metric: Callable, sample_steps: int,
            repeats: int) -> dict[str, Any]:
    torch.manual_seed(recipe.seed)
    net = build_model(recipe)
    schedule = build_schedule(recipe)
    objective = VelocityMSE(schedule)
    cfg = recipe.mse
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    warmup = max(cfg.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    g = torch.Generator().manual_seed(4)
    curve, window = [], []
    t0 = time.perf_counter()
    net.train()
    for step in range(1, steps + 1):
        t = torch.randint(0, schedule.num_timesteps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = objective(net, x0, labels, t=t, noise=noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        window.append(loss.item())
        if step % LOG_EVERY == 0:
            curve.append({"step": step, "loss_mean_last_25": sum(window) / len(window)})
            window = []
    train_s = time.perf_counter() - t0
    net.eval()
    return {"model": type(net).__name__, "params": sum(p.numel() for p in net.parameters()),
            "lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "grad_clip": cfg.grad_clip, "steps": steps,
            "batch": len(x0), "labels": labels.tolist(), "train_seconds": train_s, "loss_curve": curve,
            "final_bucket_loss": bucket_losses(net, objective, x0, labels, reps=64 // len(x0) * 4),
            "samples_overfit_model": sample_and_score(net, schedule, x0, labels, repeats, metric, sample_steps),
            "samples_exact_batch_denoiser": sample_and_score(BatchPosteriorMean(x0, labels, schedule), schedule,
                                                             x0, labels, repeats, metric, sample_steps)}


# ---------------------------------------------------------------- driver

def run(name: str, steps: int, n_real: int, sample_steps: int, repeats: int, overrides: list[str]) -> dict[str, Any]:
    path, batch = RECIPES[name]
    recipe = load_recipe(str(ROOT / path), overrides)
    ds = build_dataset(recipe.data)  # data units, for (a) and (b)
    idx = range(min(n_real, len(ds)))
    x = torch.stack([ds[i]["x"] for i in idx])
    labels = torch.stack([torch.as_tensor(ds[i]["label"]) for i in idx]).long()
    metric = metric_fn(name, recipe)
    # (c) trains in the model's units (x * data.scale) and scores its samples in data units, as the trainer does
    scale = recipe.data.scale
    train_metric = lambda x, labels: metric(to_data(recipe, None, x), labels)  # noqa: E731
    schedule = build_schedule(recipe)
    return {"recipe": path, "preset": recipe.model.preset, "item_shape": list(x.shape[1:]),
            "a_metric_sanity": metric_sanity(name, x, labels, metric),
            "b_scale": data_scale(x, schedule),
            "c_overfit": overfit(recipe, x[:batch] * scale, labels[:batch], steps, train_metric, sample_steps,
                                 repeats)}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def report(results: dict[str, Any]) -> None:
    print(f"machine: {results['machine']}")
    print(f"args: {results['args']}  wall {results['wall_seconds']:.0f} s")
    for name, r in results["recipes"].items():
        print(f"\n== {name} ({r['recipe']}, preset {r['preset']}, item {r['item_shape']})")
        print("(a) metric on real clips (n=%d)" % results["args"]["n_real"])
        for case, m in r["a_metric_sanity"].items():
            print(f"  {case:24s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in m.items()))
        print("(b) scale " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in r["b_scale"].items()))
        c = r["c_overfit"]
        print(f"(c) {c['model']} {c['params']} params, batch {c['batch']} labels {c['labels']}, lr {c['lr']}, "
              f"{c['steps']} steps in {c['train_seconds']:.0f} s")
        print("  loss (mean of the last 25 steps): " + " ".join(
            f"{p['step']}:{p['loss_mean_last_25']:.4f}" for p in c["loss_curve"]))
        for b, v in c["final_bucket_loss"].items():
            print(f"  t {b:11s} v_mse={v['v_mse']:.5f}  (predict-0: {v['v_mse_of_predicting_zero']:.4f}, "
                  f"mean ab {v['mean_alpha_bar']:.3f})")
        for key in ("samples_overfit_model", "samples_exact_batch_denoiser"):
            s = c[key]
            print(f"  {key:30s} n={s['n']} std={s['sample_std']:.3f} |x|max={s['sample_abs_max']:.2f} "
                  f"nearest-item rms med/max={s['nearest_same_label_item_rms_median']:.3f}/"
                  f"{s['nearest_same_label_item_rms_max']:.3f}")
            print("    " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in s["metric"].items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for diagnostics.json")
    p.add_argument("--steps", type=int, default=300, help="overfit steps per model")
    p.add_argument("--n-real", type=int, default=256, help="real clips for (a) and (b)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--repeats", type=int, default=4, help="samples per batch item in (c)")
    p.add_argument("--only", choices=sorted(RECIPES), action="append", help="run only these recipes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for (c), e.g. model.overrides.patch_size=4 (repeatable)")
    p.add_argument("--data-scale", type=float, default=None,
                   help="the same as --set data.scale=X: (c) trains on the batch times X and scores samples divided "
                        "by it (default: the recipe's)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    results = {"machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "recipes": {name: run(name, args.steps, args.n_real, args.sample_steps, args.repeats,
                                     args.overrides + ([] if args.data_scale is None else
                                                       [f"data.scale={args.data_scale}"]))
                           for name in (args.only or RECIPES)}}
    results["wall_seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diagnostics.json").write_text(json.dumps(results, indent=1))
    report(results)
    return results


if __name__ == "__main__":
    main()
