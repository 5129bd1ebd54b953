"""The `perceptual-diffusion` command line: train, sample, evaluate, recipes.

A user error (bad recipe key or value, missing file or checkpoint) prints one line and exits
with status 2; SIGTERM / SIGINT during training save a checkpoint and exit with 143 / 130. A
training run stopped by a NaN or inf loss or gradient exits with status 1, one stopped by a
diverging loss (train.divergence = "stop") with status 3; both print one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def _recipes_root() -> Path:
    return REPO_RECIPES if REPO_RECIPES.is_dir() else Path.cwd() / "recipes"


def _quick(recipe) -> None:
    """--quick: a tenth of the steps (at least 10), pictures and checkpoints at stage ends."""
    for stage in (recipe.mse, recipe.sp):
        stage.steps = max(10, stage.steps // 10)
        stage.warmup_steps = min(stage.warmup_steps, stage.steps)
        stage.decay_steps //= 10
    recipe.train.sample_every = recipe.train.checkpoint_every = 0
    recipe.data.num_items = min(recipe.data.num_items, 1024)


def _train(args: argparse.Namespace) -> int:
    from .checkpoint import list_checkpoints
    from .config import load_recipe
    from .trainer import Trainer

    recipe = load_recipe(args.recipe, args.set or [])
    if args.quick:
        _quick(recipe)
    run_dir = Path(args.out) if args.out else Path("runs") / recipe.name
    if args.resume is None and list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: continue with --resume latest, or pick another --out")
    trainer = Trainer(recipe, run_dir, resume=args.resume, progress=not args.no_progress)
    result = trainer.run()
    if result.interrupted_by is not None:
        print(f"interrupted by signal {result.interrupted_by} at step {result.stopped_at}; "
              f"checkpoint saved in {run_dir}/checkpoints; continue with --resume latest", file=sys.stderr)
        return 128 + int(result.interrupted_by)
    if trainer.accelerator.is_main_process:
        for s in result.stages:
            print(f"stage {s.stage}: {s.steps} steps in {s.seconds:.0f} s, final loss {s.final_loss:.5f}, "
                  f"checkpoint {s.checkpoint}"
                  + (f", {s.skipped_items} unreadable items skipped" if s.skipped_items else "")
                  + (f", {s.skipped_nonfinite} non-finite steps skipped" if s.skipped_nonfinite else ""))
        summary = json.loads((run_dir / "summary.json").read_text())
        if "mse_vs_sp" in summary:
            files = summary.get("mse_vs_sp_files", [summary["mse_vs_sp"]])
            print(f"samples from the same noise, the MSE model's first (top rows) then the SP model's: "
                  f"{', '.join(files)}")
        print(f"run directory: {run_dir} (metrics.jsonl, samples/, checkpoints/, summary.json)")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .datasets import modality
    from .evaluation import generate, load_model
    from .media import save_samples

    loaded = load_model(args.checkpoint, weights=args.weights)
    gen = generate(loaded, args.n, args.steps, args.guidance, args.rescale, args.seed, label=args.label,
                   progress=True, prompts=args.prompt)
    out = Path(args.out)
    data = loaded.recipe.data
    files = save_samples(gen.samples, out, modality(data), scale=args.scale, sample_rate=data.sample_rate)
    tensors = {"samples": gen.samples.contiguous(), "noise": gen.noise}
    if gen.labels is not None:
        tensors["labels"] = gen.labels
    save_file(tensors, str(out.with_suffix(".safetensors")))
    print(f"wrote {', '.join(map(str, files))} and {out.with_suffix('.safetensors')} ({args.n} samples, {args.steps} steps, "
          f"guidance {args.guidance}, rescale {args.rescale}, {args.weights} weights of {loaded.checkpoint})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from backbones import export_diffusers

    from .evaluation import load_model

    loaded = load_model(args.checkpoint, weights=args.weights)
    m = loaded.recipe.model
    if m.backbone != "diffusers_unet" or export_diffusers is None:
        raise UserError(f"export writes diffusers UNets (model.backbone = 'diffusers_unet'); this checkpoint's "
                        f"backbone is {m.backbone!r}")
    components = args.components or (m.latent if m.latent and Path(m.latent).is_dir() else None)
    out = export_diffusers(loaded.model, args.out, loaded.recipe.schedule, components_from=components)
    print(f"wrote {out} (unet/ from the {args.weights} weights of {loaded.checkpoint}, scheduler/: DDIM, trailing, "
          f"v-prediction{', zero terminal SNR' if loaded.recipe.schedule.zero_terminal_snr else ''}"
          + (f"; vae/, text_encoder/, tokenizer/ from {components}" if components else
             "; no vae/text_encoder/tokenizer: pass --components DIR or give them to from_pretrained") + ")")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, load_model

    loaded = load_model(args.checkpoint, weights=args.weights)
    row = evaluate(loaded, args.metric, n=args.n, steps=args.steps, guidance=args.guidance, rescale=args.rescale,
                   seed=args.seed, batch_size=args.batch_size, progress=True,
                   inception_weights=args.inception_weights)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    shown = {k: v for k, v in row.items() if k != "checkpoint"}
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from .config import list_recipes

    root = _recipes_root()
    rows = list_recipes(root)
    if not rows:
        raise UserError(f"no recipes found under {root}")
    width = max(len(r[0]) for r in rows)
    for rel, desc in rows:
        print(f"recipes/{rel:<{width}}  {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .evaluation import METRIC_SPECS, metrics_for

    parser = argparse.ArgumentParser(prog="perceptual-diffusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe: stage mse, then stage sp")
    p.add_argument("recipe", help="a recipe TOML file, e.g. recipes/image/circles.toml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, e.g. mse.lr=1e-4")
    p.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--resume", metavar="DIR|latest", help="continue from a checkpoint, or the run's latest")
    p.add_argument("--quick", action="store_true", help="a tenth of the steps: a smoke test of the pipeline")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="write a PNG grid (and a .safetensors of the samples) from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale w (eq. 1)")
    p.add_argument("--rescale", type=float, default=0.0, help="guidance rescale phi (0.7 in the paper)")
    p.add_argument("--label", type=int, help="one class for every sample (default: cycle through classes)")
    p.add_argument("--weights", choices=["ema", "online"], default="ema")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=2, help="pixel upscaling of the grid")
    p.add_argument("--out", required=True, help="the PNG to write (video also writes .gif, audio .wav beside it)")
    p.add_argument("--prompt", action="append", help="text-to-image models: a prompt (repeat it; samples cycle "
                                                     "through them; default the empty prompt)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("export", help="write a diffusers StableDiffusionPipeline directory from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="the directory to write (unet/, scheduler/, model_index.json, ...)")
    p.add_argument("--weights", choices=["ema", "online"], default="ema")
    p.add_argument("--components", help="a local SD model directory to copy vae/, text_encoder/, tokenizer/ "
                                         "from (default: the recipe's model.latent when it is a directory)")
    p.set_defaults(func=_export)

    p = sub.add_parser("evaluate", help="sample from a checkpoint and measure; writes JSON, prints one row")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    # evaluate() checks the names against the registry: a wrong one is one line and exit status 2
    # (argparse's choices= would print the usage as well)
    kinds = dict.fromkeys(spec.modality for spec in METRIC_SPECS.values())
    by_modality = "; ".join(f"{kind}: {', '.join(metrics_for(kind))}" for kind in kinds)
    p.add_argument("--metric", action="append", required=True, metavar="NAME",
                   help=f"what to measure, by the modality of the checkpoint's samples ({by_modality}); the "
                        "README describes each; inception needs the FID Inception weights; repeatable")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--rescale", type=float, default=0.0)
    p.add_argument("--weights", choices=["ema", "online"], default="ema")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--inception-weights", help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("recipes", help="list the recipes that ship")
    p.set_defaults(func=_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import RecipeError
    from .trainer import DivergenceError, NonFiniteError, PerceptualCheckError

    args = build_parser().parse_args(argv)  # argparse itself exits with status 2 on bad flags
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UserError, RecipeError, CheckpointError, FileNotFoundError) as e:
        print(f"perceptual-diffusion: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"perceptual-diffusion: training stopped: {e}", file=sys.stderr)
        return 1
    except (DivergenceError, PerceptualCheckError) as e:  # a model that trained into the ground
        print(f"perceptual-diffusion: training stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
