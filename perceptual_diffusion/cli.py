"""The `perceptual-diffusion` command line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

__all__ = ["main"]


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
    for name in ("mse_steps", "sp_steps", "batch_size", "num_images", "sample_steps", "num_samples"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.image_size < 8 or cfg.image_size % 2:
        raise UserError(f"--image-size must be even and >= 8, got {cfg.image_size}")
    r = run_demo(cfg)
    print(f"stage 1 (MSE, {cfg.mse_steps} steps): loss {r.mse_loss_first:.4f} -> {r.mse_loss_last:.4f}")
    print(f"stage 2 (SP,  {cfg.sp_steps} steps): loss {r.sp_loss_first:.5f} -> {r.sp_loss_last:.5f}")
    print(f"held-out v-MSE (eq. 5): MSE model {r.eval_mse_of_mse_model:.4f}, SP model {r.eval_mse_of_sp_model:.4f}")
    print(f"samples (rows: data, MSE model, SP model; same noise): {r.samples}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig

    parser = argparse.ArgumentParser(prog="perceptual-diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the tiny image UNet with MSE then SP on generated disks")
    for f in fields(DemoConfig):
        demo.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with status 2 on bad flags
    try:
        return args.func(args)
    except UserError as e:
        print(f"perceptual-diffusion: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
