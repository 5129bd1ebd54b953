"""Small rank-generic denoisers for tests of the objectives (any of 1-D, 2-D, 3-D data), the kit's
way to give zero-initialised layers signal, what the backbone tests share (`perturbed`, `tiny_net`,
`noisy_inputs`, `check_v_like_x`, `check_early_exit`), a launcher for tests that run 2
processes through `accelerate launch`, and `load_benchmark` for the scripts under benchmarks/."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from perceptual_diffusion.denoiser import TappedDenoiser
from perceptual_diffusion.testing import randomise_zero_init  # noqa: F401  (the tests' and benchmarks' import)

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """benchmarks/<name>.py as module `name`, executed afresh and registered in sys.modules
    (dataclasses resolve their annotations through it; scripts import one another by name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class TinyConvDenoiser(TappedDenoiser):
    """conv -> down.0 -> down.1 -> mid -> up.0 -> up.1 -> out, with t and class conditioning.

    Submodule names tell encoder (enc*) and decoder (dec*) apart for call-counting tests.
    """

    feature_layers = ("down.0", "down.1", "mid", "up.0", "up.1")

    def __init__(self, dims: int = 2, channels: int = 2, width: int = 8, num_classes: int | None = None):
        super().__init__()
        conv = _CONV[dims]
        self.enc_in = conv(channels, width, 3, padding=1)
        self.enc0 = conv(width, width, 3, padding=1)
        self.enc1 = conv(width, width, 3, padding=1)
        self.mid = conv(width, width, 3, padding=1)
        self.dec0 = conv(2 * width, width, 3, padding=1)
        self.dec1 = conv(2 * width, width, 3, padding=1)
        self.dec_out = conv(width, channels, 3, padding=1)
        self.t_embed = nn.Linear(1, width)
        self.class_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.num_classes = num_classes

    def _run(self, x, t, cond, tap):
        x = x.to(self.enc_in.weight.dtype)
        emb = self.t_embed((t.float()[:, None] / 1000).to(x.dtype))
        if cond is not None:
            emb = emb + self.class_embed(cond)
        emb = emb.reshape(*emb.shape, *([1] * (x.ndim - 2)))
        h = torch.tanh(self.enc_in(x) + emb)
        h0 = tap("down.0", torch.tanh(self.enc0(h)))
        h1 = tap("down.1", torch.tanh(self.enc1(h0)))
        h = tap("mid", torch.tanh(self.mid(h1)))
        h = tap("up.0", torch.tanh(self.dec0(torch.cat([h, h1], 1))))
        h = tap("up.1", torch.tanh(self.dec1(torch.cat([h, h0], 1))))
        return self.dec_out(h)

    def null_cond(self, cond):
        return torch.full_like(cond, self.num_classes)


def perturbed(net: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Add noise to every parameter, so the zero-initialised paths carry signal; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def tiny_net(cls, **overrides) -> nn.Module:
    """`cls.from_preset("tiny", **overrides)` built under torch.manual_seed(0), `perturbed`."""
    torch.manual_seed(0)
    return perturbed(cls.from_preset("tiny", **overrides))


def noisy_inputs(*shape: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t of `shape` and t (N,) in [0, 1000), from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, 1000, (shape[0],), generator=g)


def check_v_like_x(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Assert that v = net(x, t) has x's shape and is contiguous and finite; return v."""
    v = net(x, t)
    assert v.shape == x.shape and v.is_contiguous()
    assert torch.isfinite(v).all()
    return v


def check_early_exit(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond=None) -> dict[str, torch.Tensor]:
    """Assert that every tap, requested alone with and without stop_early, and all taps requested
    together, equal the full pass's exactly, in `feature_layers` order; return the full pass's taps."""
    full = net.forward_features(x, t, cond, layers="all", stop_early=False)
    assert tuple(full) == net.feature_layers
    assert net.forward_features(x, t, cond, layers="all").keys() == full.keys()
    for name in net.feature_layers:
        early = net.forward_features(x, t, cond, layers=name)
        late = net.forward_features(x, t, cond, layers=name, stop_early=False)
        assert list(early) == [name]
        assert torch.equal(early[name], full[name]), name
        assert torch.equal(late[name], full[name]), name
    return full


ROOT = Path(__file__).resolve().parents[1]


def accelerate_launch(*args, config=None, port_offset: int = 0, precision: str = "no") -> subprocess.CompletedProcess:
    """`accelerate launch` 2 CPU processes (gloo) running `args` from the repository root: DDP, or
    what the accelerate `config` file says. Each process gets one thread."""
    port = str(29600 + (os.getpid() + port_offset) % 900)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    how = ["--config_file", str(config)] if config else ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--mixed_precision", precision,
         "--main_process_port", port, *map(str, args)], capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
