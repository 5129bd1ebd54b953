"""Per checkpoint of a run: the largest attention logit of every attention layer, the v-MSE in
five t bands, and the weights' norm (RESULTS.md, "Divergence").

    python benchmarks/attention_logits.py RUN_DIR [--weights model|ema] [--n 200]

Prints one JSON line per checkpoint. The logit of a layer is max |q.k| / sqrt(head_dim) over
`--n` fixed training items at each band's timesteps, recomputed by a forward hook from the
layer's own projections (after its QKNorm, when it has one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbones.layers import MultiHeadAttention  # noqa: E402
from perceptual_diffusion.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from perceptual_diffusion.config import load_recipe  # noqa: E402
from perceptual_diffusion.datasets import build_dataset  # noqa: E402
from perceptual_diffusion.builders import build_model, build_schedule  # noqa: E402

BANDS = ((0, 100), (100, 500), (500, 900), (900, 990), (990, 1000))


def probe(run: Path, weights: str = "model", n: int = 200) -> list[dict]:
    recipe = load_recipe(run / "recipe.toml")
    schedule, data = build_schedule(recipe), build_dataset(recipe.data)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n].tolist()
    x0 = torch.stack([data[i]["x"] for i in pick])
    net = build_model(recipe).eval()
    logits: dict[str, float] = {}

    def hook(name: str):
        def record(mod, args, kwargs, out):
            x, context = args[0], (args[1] if len(args) > 1 else kwargs.get("context"))
            k, _ = mod.to_kv(x if context is None else context).chunk(2, dim=-1)
            q, k = (a.unflatten(-1, (mod.heads, -1)).transpose(1, 2) for a in (mod.to_q(x), k))
            if mod.qk_norm is not None:
                q, k = mod.qk_norm(q, k)
            value = (q @ k.transpose(-1, -2)).abs().max().item() / math.sqrt(q.shape[-1])
            logits[name] = max(logits.get(name, 0.0), value)
        return record

    for name, module in net.named_modules():
        if isinstance(module, MultiHeadAttention):
            module.register_forward_hook(hook(name), with_kwargs=True)
    rows = []
    for path in list_checkpoints(run):
        ck = load_checkpoint(path)
        net.load_state_dict(ck.weights[weights])
        logits.clear()
        row = {"step": ck.step, "stage": ck.stage}
        with torch.no_grad():
            for lo, hi in BANDS:
                g = torch.Generator().manual_seed(lo)
                t = torch.randint(lo, hi, (n,), generator=g)
                noise = torch.randn(x0.shape, generator=g)
                v_hat = net(schedule.add_noise(x0, noise, t), t, None)
                row[f"vmse_t{lo}-{hi}"] = round((v_hat - schedule.velocity(x0, noise, t)).square().mean().item(), 4)
        row["attention_logit_max"] = {k: round(v, 1) for k, v in logits.items()}
        row["weight_norm"] = round(sum(w.float().square().sum() for w in ck.weights[weights].values()).sqrt().item(), 1)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--weights", choices=("model", "ema"), default="model")
    p.add_argument("--n", type=int, default=200)
    args = p.parse_args(argv)
    for row in probe(args.run, args.weights, args.n):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
