"""SDPA versus xformers attention in every backbone that has attention: agreement and speed.

    python benchmarks/attention_backends.py --device cuda            # bf16 autocast, the GPU check
    python benchmarks/attention_backends.py --device cpu --smoke     # CPU: SDPA runs, xformers is refused

For each backbone (ImageUNet, VideoUNet, AudioDiT at their `default` presets, the diffusers
SD2.1-base UNet layout) one network is built with attention_backend="sdpa" (its zero-initialised
output layers filled with noise, so attention reaches the output) and a second with "xformers"
holding the same weights; both run the same batch under bf16 autocast. Reported: the
largest absolute difference of the outputs relative to the outputs' RMS (bf16 keeps 8 bits of
mantissa, so agreement means about 1e-2 or better), and the median forward + backward time of
each backend, measured interleaved in one process, with its ratio to SDPA.

Where xformers cannot run (no CUDA, or the package missing) the script checks that choosing it
is refused with one line naming the option (never a silent fallback) and times SDPA alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import BACKBONES  # noqa: E402
from backbones.layers import check_attention_backend, check_attention_backends  # noqa: E402
from tests.helpers import randomise_zero_init  # noqa: E402  (a fresh net's attention adds exactly 0)

# backbone -> (preset on the GPU, preset for --smoke, one sample's shape, cond kind)
CASES = {
    "image_unet": ("default", "tiny", (3, 32, 32), "label"),
    "video_unet": ("default", "tiny", (3, 8, 32, 32), "label"),
    "audio_dit": ("default", "tiny", (1, 2048), "label"),
    "image_dit": ("default", "tiny", (3, 32, 32), "label"),
    "diffusers_unet": ("sd21-base", "tiny", (4, 64, 64), "context"),
}


def build(name: str, preset: str, shape: tuple[int, ...], backend: str) -> torch.nn.Module:
    kw = {"attention_backend": backend}
    if name == "diffusers_unet":
        return BACKBONES[name].from_preset(preset, **kw)
    return BACKBONES[name].from_preset(preset, in_channels=shape[0], num_classes=10, **kw)


def make_cond(net: torch.nn.Module, kind: str, n: int, device: torch.device) -> torch.Tensor:
    if kind == "label":
        return torch.randint(0, 10, (n,), device=device)
    return torch.randn(n, 77, net.context_dim, device=device)


def step(net, x, t, cond, autocast) -> torch.Tensor:
    with autocast():
        out = net(x, t, cond)
    out.float().square().mean().backward()
    return out.detach().float()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny presets and small inputs (a CPU run-through)")
    p.add_argument("--backbones", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    names = [n for n in args.backbones.split(",") if n]
    unknown = [n for n in names if n not in CASES or n not in BACKBONES]
    if unknown:
        p.error(f"unknown or unavailable backbone(s) {unknown}; choose from {[n for n in CASES if n in BACKBONES]}")
    try:
        check_attention_backend("xformers", device)
        refusal = None
    except (ValueError, ImportError) as e:
        refusal = str(e)
        if "attention_backend='xformers'" not in refusal:
            print(f"xformers refused without naming the option: {refusal}", file=sys.stderr)
            return 1
        print(f"xformers cannot run here, refused as expected: {refusal}")

    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    rows = []
    for name in names:
        gpu_preset, smoke_preset, shape, kind = CASES[name]
        preset = smoke_preset if args.smoke else gpu_preset
        if args.smoke:
            shape = shape[:-2] + tuple(min(s, 16) for s in shape[-2:]) if len(shape) > 2 else (shape[0], 256)
        torch.manual_seed(0)
        nets = {"sdpa": randomise_zero_init(build(name, preset, shape, "sdpa")).to(device)}
        if refusal is None:
            nets["xformers"] = build(name, preset, shape, "xformers").to(device)
            nets["xformers"].load_state_dict(nets["sdpa"].state_dict())
        else:  # the refusal must come from building or from the check before use, naming the option
            try:
                check_attention_backends(build(name, preset, shape, "xformers"), device)
            except (ValueError, ImportError) as e:
                if "attention_backend='xformers'" not in str(e):
                    print(f"{name}: xformers refused without naming the option: {e}", file=sys.stderr)
                    return 1
            else:
                print(f"{name}: xformers was accepted on {device}, where it cannot run", file=sys.stderr)
                return 1
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, *shape, generator=g).to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        cond = make_cond(nets["sdpa"], kind, args.batch, device)
        outs, times = {}, {b: [] for b in nets}
        for r in range(args.warmup + args.repeats):
            for backend, net in nets.items():  # interleaved, so drift hits both alike
                net.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                outs[backend] = step(net, x, t, cond, autocast)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r >= args.warmup:
                    times[backend].append(time.perf_counter() - start)
        row = {"backbone": name, "preset": preset, "params_m": sum(p.numel() for p in nets["sdpa"].parameters()) / 1e6,
               "input": [args.batch, *shape]}
        for backend in nets:
            row[f"{backend}_ms"] = 1000 * statistics.median(times[backend])
        if "xformers" in nets:
            ref = outs["sdpa"]
            row["max_abs_diff_over_rms"] = ((outs["xformers"] - ref).abs().max() / ref.square().mean().sqrt()).item()
            row["xformers_x_sdpa"] = row["xformers_ms"] / row["sdpa_ms"]
        rows.append(row)
        print(json.dumps(row))

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"\nmachine: {machine}, torch {torch.__version__}, batch {args.batch}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, forward + backward, median of {args.repeats}")
    print("| backbone | preset | params (M) | SDPA (ms) | xformers (ms) | x SDPA | max |diff| / RMS |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        xf = f"{r['xformers_ms']:.1f} | {r['xformers_x_sdpa']:.2f} | {r['max_abs_diff_over_rms']:.2e}" \
            if "xformers_ms" in r else "refused | - | -"
        print(f"| {r['backbone']} | {r['preset']} | {r['params_m']:.2f} | {r['sdpa_ms']:.1f} | {xf} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "device": str(device),
                                         "xformers_refused": refusal, "rows": rows}, indent=1))
    bad = [r["backbone"] for r in rows if r.get("max_abs_diff_over_rms", 0) > 3e-2]
    if bad:
        print(f"SDPA and xformers disagree beyond bf16 tolerance in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
