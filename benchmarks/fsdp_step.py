"""DDP vs FSDP (the trainer's `train.fsdp`): training-state bytes per process and SP step time.

    accelerate launch --multi_gpu --num_processes 2 benchmarks/fsdp_step.py            # CPU, gloo
    accelerate launch --num_processes 8 benchmarks/fsdp_step.py --backbone diffusers_unet \
        --preset sd21-base --batch 16 --size 64 --channels 4 --autocast bf16            # GPUs

Both variants run in the same processes on the same network, data and SP objective (frozen
copy unsharded, as in the trainer), interleaved round-robin so machine drift hits them alike.
Per process it counts the bytes of the training state each variant keeps: online weights,
gradients, AdamW moments and the EMA copy (FSDP keeps a 1/N shard of each; the frozen
perceptual network is a full copy in both and is reported apart). The table reports the median
step time, its ratio to DDP, and the state bytes; rank 0 prints it and writes --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import build_backbone  # noqa: E402
from perceptual_diffusion import NoiseSchedule, SelfPerceptual, make_perceptual  # noqa: E402
from perceptual_diffusion.ema import EMA  # noqa: E402
from perceptual_diffusion.sharding import clip_grad_norm, shard  # noqa: E402

from sp_step import cpu_name  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _local_bytes(tensors) -> int:
    """Bytes this process holds for `tensors` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA) -> dict[str, int]:
    params = list(model.parameters())
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"weights": _local_bytes(params), "grads": _local_bytes(p.grad for p in params),
            "adam": _local_bytes(moments), "ema": _local_bytes(ema.model.parameters())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="image_unet")
    p.add_argument("--preset", default="default")
    p.add_argument("--batch", type=int, default=4, help="per process")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 2 warm-up)")
    p.add_argument("--autocast", choices=sorted(DTYPES), default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.num_processes < 2:
        sys.exit("fsdp_step.py compares multi-process variants: run it under accelerate launch --num_processes N")
    device, rank = acc.device, acc.process_index
    torch.manual_seed(0)
    schedule = NoiseSchedule.scaled_linear(zero_terminal_snr=True)
    kwargs = {} if args.backbone == "diffusers_unet" else {"in_channels": args.channels}
    base = build_backbone(args.backbone, args.preset, **kwargs)
    cond = None
    if args.backbone == "diffusers_unet":
        dim = base.unet.config.cross_attention_dim
        base.set_null_context(torch.zeros(1, 77, dim))
        cond = torch.randn(args.batch, 77, dim, device=device)
    perceptual = make_perceptual(base).to(device)
    objective = SelfPerceptual(schedule, perceptual)
    x0 = torch.randn(args.batch, args.channels, args.size, args.size, device=device)

    variants = {}
    for name in ("ddp", "fsdp"):
        net = build_backbone(args.backbone, args.preset, **kwargs)
        net.load_state_dict(base.state_dict())
        net.to(device)
        ema = EMA(net, 0.9995)
        if name == "fsdp":
            shard(net)
            shard(ema.model)
            wrapped = net
        else:
            wrapped = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        variants[name] = (wrapped, net, opt, ema)

    autocast = torch.autocast(device.type, DTYPES[args.autocast]) if args.autocast else None
    times: dict[str, list[float]] = {name: [] for name in variants}
    gen = torch.Generator(device=device)
    for step in range(args.steps + 2):
        for name, (wrapped, net, opt, ema) in variants.items():
            gen.manual_seed(1000 * step + rank)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
                loss = objective(wrapped, x0, cond, generator=gen).mean()
            loss.backward()
            if name == "fsdp":
                clip_grad_norm(net.parameters(), 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            ema.update(net)
            if step == args.steps + 1:
                variants[name] = (wrapped, net, opt, ema, state_bytes(net, opt, ema))
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            if step >= 2:
                times[name].append(time.perf_counter() - t0)

    mib = 2 ** 20
    rows = {}
    for name, v in variants.items():
        b = v[-1]
        rows[name] = {"median_s": statistics.median(times[name]), **{k: b[k] / mib for k in b},
                      "state_mib": sum(b.values()) / mib}
    for name in rows:
        rows[name]["time_vs_ddp"] = rows[name]["median_s"] / rows["ddp"]["median_s"]
        rows[name]["state_vs_ddp"] = rows[name]["state_mib"] / rows["ddp"]["state_mib"]
    frozen = _local_bytes(perceptual.parameters()) / mib
    n_params = sum(q.numel() for q in base.parameters())
    if acc.is_main_process:
        machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{cpu_name()}, {torch.get_num_threads()} threads/process")
        print(f"{args.backbone}/{args.preset} ({n_params / 1e6:.1f}M params), {acc.num_processes} processes on "
              f"{machine}, batch {args.batch} x {args.channels}x{args.size}x{args.size} per process, "
              f"autocast {args.autocast or 'off'}, SP objective, {args.steps} timed steps")
        print(f"{'variant':8} {'step s':>8} {'vs DDP':>7} {'weights':>8} {'grads':>8} {'adam':>8} {'ema':>8} "
              f"{'state MiB':>10} {'vs DDP':>7}")
        for name, r in rows.items():
            print(f"{name:8} {r['median_s']:8.3f} {r['time_vs_ddp']:7.2f} {r['weights']:8.1f} {r['grads']:8.1f} "
                  f"{r['adam']:8.1f} {r['ema']:8.1f} {r['state_mib']:10.1f} {r['state_vs_ddp']:7.2f}")
        print(f"frozen perceptual copy (both variants): {frozen:.1f} MiB per process")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine,
                                             "processes": acc.num_processes, "params": n_params,
                                             "frozen_mib": frozen, "rows": rows}, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
