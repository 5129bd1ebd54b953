"""The `perceptual-diffusion` command line: train, sample, recipes.

A user error (bad recipe key or value, missing file or checkpoint) prints one line and exits
with status 2; SIGTERM / SIGINT during training save a checkpoint and exit with 143 / 130.
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
            print(f"samples, MSE (top) vs SP (bottom) from the same noise: {summary['mse_vs_sp']}")
        print(f"run directory: {run_dir} (metrics.jsonl, samples/, checkpoints/, summary.json)")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .config import recipe_from_dict
    from .datasets import num_classes
    from .images import save_grid
    from .sampling import ddim_sample
    from .trainer import build_model, build_schedule, run_info

    for name in ("n", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.rescale <= 1:
        raise UserError(f"--rescale must be in [0, 1], got {args.rescale}")
    path = resolve_checkpoint(args.checkpoint, Path(args.checkpoint))
    ck = load_checkpoint(path)
    recipe = recipe_from_dict(run_info(ck.meta)["recipe"], check_paths=False)
    if not 1 <= args.steps <= recipe.schedule.num_timesteps:
        raise UserError(f"--steps must be in [1, {recipe.schedule.num_timesteps}], got {args.steps}")
    model = build_model(recipe)
    model.load_state_dict(ck.weights[args.weights])
    model.eval()
    k = num_classes(recipe.data)
    if args.guidance != 1.0 and k is None:
        raise UserError("--guidance needs a class-conditional model; this checkpoint is unconditional")
    if args.label is not None and (k is None or not 0 <= args.label < k):
        raise UserError(f"--label needs a class-conditional model and a label in [0, {k})" if k
                        else "--label needs a class-conditional model; this checkpoint is unconditional")
    g = torch.Generator().manual_seed(args.seed)
    d = recipe.data
    noise = torch.randn(args.n, d.channels, d.size, d.size, generator=g)
    cond = None
    if k is not None:
        cond = torch.full((args.n,), args.label) if args.label is not None else torch.arange(args.n) % k
    x = ddim_sample(model, build_schedule(recipe), noise, cond=cond, steps=args.steps,
                    guidance_scale=args.guidance, guidance_rescale=args.rescale, progress=True)
    out = Path(args.out)
    save_grid(x, out, scale=args.scale)
    tensors = {"samples": x.contiguous(), "noise": noise}
    if cond is not None:
        tensors["labels"] = cond
    save_file(tensors, str(out.with_suffix(".safetensors")))
    print(f"wrote {out} and {out.with_suffix('.safetensors')} ({args.n} samples, {args.steps} steps, "
          f"guidance {args.guidance}, rescale {args.rescale}, {args.weights} weights of {path})")
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
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.set_defaults(func=_sample)

    p = sub.add_parser("recipes", help="list the recipes that ship")
    p.set_defaults(func=_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import RecipeError
    from .trainer import NonFiniteError

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


if __name__ == "__main__":
    sys.exit(main())
