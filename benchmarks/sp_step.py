"""Cost of one training step: MSE vs SP as Algorithm 1 reads vs the library's SP.

    python benchmarks/sp_step.py                       # default ImageUNet, CPU, float32
    python benchmarks/sp_step.py --device cuda --autocast bf16 --frozen-dtype bf16 --batch 16
    python benchmarks/sp_step.py --backbone diffusers_unet --preset sd21-base --device cuda \
        --autocast bf16 --frozen-dtype bf16 --batch 16 --size 64 --channels 4   # the paper's setting
    python benchmarks/sp_step.py --backbone diffusers_unet --preset sd21-reduced --batch 2 \
        --size 32 --channels 4                                                 # the same on a CPU

All variants run in one process on the same network and batch, interleaved round-robin so
machine drift hits them alike; the table reports the median step time and its ratio to MSE.
Memory: on CUDA the peak allocated bytes of the step; on CPU the bytes autograd saves for the
backward pass (activation memory, the part that differs between variants).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import ImageUNet  # noqa: E402
from perceptual_diffusion import NoiseSchedule, SelfPerceptual, VelocityMSE, make_perceptual  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LiteralAlgorithm1:
    """Algorithm 1 as printed: two full forwards of the frozen net, both with autograd on,
    the midblock feature read by a forward hook."""

    def __init__(self, schedule: NoiseSchedule, perceptual: torch.nn.Module, tap_module: torch.nn.Module):
        self.s, self.perceptual = schedule, perceptual
        self._feature = None
        tap_module.register_forward_hook(lambda m, i, o: setattr(self, "_feature", o))

    def _mid(self, x, t, cond):
        self.perceptual(x.to(next(self.perceptual.parameters()).dtype), t, cond)
        return self._feature

    def __call__(self, net, x0, cond=None):
        s = self.s
        t = torch.randint(0, s.num_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        x_t = s.add_noise(x0, eps, t)
        v_pred = net(x_t, t, cond)
        x0_pred, eps_pred = s.x0_from_v(x_t, v_pred, t), s.eps_from_v(x_t, v_pred, t)
        tt = torch.randint(0, s.num_timesteps, (x0.shape[0],), device=x0.device)
        feature_real = self._mid(s.add_noise(x0, eps, tt), tt, cond)
        feature_pred = self._mid(s.add_noise(x0_pred, eps_pred, tt), tt, cond)
        return (feature_pred.float() - feature_real.float()).square().flatten(1).mean(1)


class SavedBytes:
    """Counts the bytes autograd saves for backward (distinct storages)."""

    def __init__(self):
        self.bytes, self._seen = 0, set()

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def context(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# SD2.1-base's UNet layout at a fifth of the width (heads of 64 channels kept), for CPUs
SD21_REDUCED = {"block_out_channels": (64, 128, 256, 256), "attention_head_dim": (1, 2, 4, 4)}


def build(args, device):
    """The network under test and the condition it takes (None, or a random text context)."""
    if args.backbone == "image_unet":
        return ImageUNet.from_preset(args.preset, in_channels=args.channels).to(device), None
    from backbones import DiffusersUNet

    preset, overrides = (("sd21-base", SD21_REDUCED) if args.preset == "sd21-reduced" else (args.preset, {}))
    net = DiffusersUNet.from_preset(preset, in_channels=args.channels, **overrides).to(device)
    context = torch.randn(args.batch, 77, net.unet.config.cross_attention_dim, device=device)
    return net, context


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["image_unet", "diffusers_unet"], default="image_unet")
    p.add_argument("--preset", default="default",
                   help="image_unet: tiny|small|default; diffusers_unet: tiny|sd21-base|sd21-reduced")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--frozen-dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    net, cond = build(args, device)
    schedule = NoiseSchedule.scaled_linear(zero_terminal_snr=True)
    frozen = make_perceptual(net, dtype=DTYPES[args.frozen_dtype])
    frozen_literal = make_perceptual(net, dtype=DTYPES[args.frozen_dtype])
    mid = frozen_literal.unet.mid_block if args.backbone == "diffusers_unet" else frozen_literal.mid["res2"]
    variants = {
        "mse": VelocityMSE(schedule),
        "sp_algorithm1_literal": LiteralAlgorithm1(schedule, frozen_literal, mid),
        "sp_library": SelfPerceptual(schedule, frozen, layers="mid"),
    }
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    x0 = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    amp = (torch.autocast(device.type, dtype=DTYPES[args.autocast]) if args.autocast != "none"
           else contextlib.nullcontext())

    def step(objective, saved=None):
        with amp, (saved.context() if saved else contextlib.nullcontext()):
            loss = objective(net, x0, cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {k: [] for k in variants}
    memory = {}
    for name, obj in variants.items():
        for _ in range(args.warmup):
            step(obj)
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(obj)
            memory[name] = torch.cuda.max_memory_allocated(device)
        else:
            saved = SavedBytes()
            step(obj, saved)
            memory[name] = saved.bytes
    for _ in range(args.repeats):
        for name, obj in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            step(obj)
            _sync(device)
            times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["mse"])
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} threads")
    result = {
        "machine": machine, "torch": torch.__version__, "backbone": args.backbone, "preset": args.preset,
        "params": sum(p.numel() for p in net.parameters()), "batch": args.batch, "size": args.size,
        "autocast": args.autocast, "frozen_dtype": args.frozen_dtype, "repeats": args.repeats,
        "memory_kind": "peak CUDA allocated" if device.type == "cuda" else "saved for backward",
        "rows": [
            {"variant": k, "median_ms": 1000 * statistics.median(v), "ratio": statistics.median(v) / base,
             "memory_mib": memory[k] / 2**20}
            for k, v in times.items()
        ],
    }
    print(f"{machine} | torch {torch.__version__} | {type(net).__name__} {args.preset} ({result['params'] / 1e6:.1f}M) | "
          f"batch {args.batch} x {args.channels}x{args.size}x{args.size} | autocast {args.autocast} | "
          f"frozen {args.frozen_dtype} | median of {args.repeats}")
    print(f"| variant | step (ms) | x MSE | memory (MiB, {result['memory_kind']}) |")
    print("|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['variant']} | {r['median_ms']:.1f} | {r['ratio']:.2f} | {r['memory_mib']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
