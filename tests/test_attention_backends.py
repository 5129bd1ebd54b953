"""The attention_backend option: it reaches every attention layer of every backbone, and choosing
xformers where it cannot run (CPU tensors, package missing) is one line naming the option, never
a silent fallback. Agreement of the two backends on a GPU is in tests/test_cuda.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones import BACKBONES, build_backbone
from backbones.layers import attention, check_attention_backend, check_attention_backends
from perceptual_diffusion.config import RecipeError
from perceptual_diffusion.builders import check_device_support

ROOT = Path(__file__).resolve().parents[1]
OWN = [name for name, cls in BACKBONES.items() if name != "diffusers_unet"]  # the backbones with their own attention


def _attention_modules(net: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in net.modules() if hasattr(m, "attention_backend") and m is not net]


@pytest.mark.parametrize("name", OWN)
def test_option_reaches_every_attention_layer(name):
    default = build_backbone(name, "default", in_channels=1)
    chosen = build_backbone(name, "default", in_channels=1, attention_backend="xformers")
    layers = _attention_modules(chosen)
    # every layer that calls `attention` carries the option: as many as the sdpa net has, all xformers
    assert len(layers) == len(_attention_modules(default)) > 0
    assert {m.attention_backend for m in layers} == {"xformers"}
    assert {m.attention_backend for m in _attention_modules(default)} == {"sdpa"}
    calls = sum(1 for m in chosen.modules() if type(m).__name__ in ("MultiHeadAttention", "TemporalAttention"))
    assert calls == len(layers)


def test_sdpa_backend_is_accepted_everywhere():
    net = build_backbone("image_unet", "tiny", in_channels=1)
    assert check_attention_backends(net, "cpu") == {"sdpa"}
    check_device_support(net, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", OWN)
def test_xformers_on_cpu_is_refused_naming_the_option(name):
    pytest.importorskip("xformers")
    net = build_backbone(name, "tiny", in_channels=1, attention_backend="xformers")
    with pytest.raises(ValueError, match=r"^attention_backend='xformers' cannot run on cpu: xformers has CUDA "
                                         r"kernels only; use attention_backend='sdpa'"):
        check_attention_backends(net, "cpu")
    with pytest.raises(RecipeError, match=r"^model\.overrides\.attention_backend='xformers' cannot run on cpu"):
        check_device_support(net, torch.device("cpu"))
    # and the kernel call itself refuses before xformers' own "No operator found"
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention_backend='xformers' cannot run on cpu"):
        attention(q, q, q, backend="xformers")


def test_xformers_missing_is_refused_naming_the_option(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import xformers -> ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    msg = r"^attention_backend='xformers' needs the xformers package: pip install -e '\.\[xformers\]'"
    with pytest.raises(ImportError, match=msg):
        check_attention_backend("xformers", "cuda")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ImportError, match=msg):
        attention(q, q, q, backend="xformers")
    with pytest.raises(RecipeError, match=r"^model\.overrides\.attention_backend='xformers' needs the xformers"):
        check_device_support(build_backbone("audio_dit", "tiny", attention_backend="xformers"), "cuda")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"unknown attention_backend 'flash'; choose one of \('sdpa', 'xformers'\)"):
        check_attention_backend("flash", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_diffusers_unet_xformers_without_cuda_is_refused():
    pytest.importorskip("diffusers")
    pytest.importorskip("xformers")
    with pytest.raises(ValueError, match=r"^attention_backend='xformers' cannot run on cpu"):
        BACKBONES["diffusers_unet"].from_preset("tiny", attention_backend="xformers")
    with pytest.raises(ValueError, match=r"unknown attention_backend 'flash'"):
        BACKBONES["diffusers_unet"].from_preset("tiny", attention_backend="flash")
    net = BACKBONES["diffusers_unet"].from_preset("tiny")
    assert net.attention_backend == "sdpa" and check_attention_backends(net, "cpu") == {"sdpa"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("recipe", ["recipes/image/circles.toml", "recipes/video/moving_shapes.toml",
                                    "recipes/audio/tones.toml"])
def test_cli_refuses_xformers_on_cpu_with_one_line_and_exit_2(tmp_path, recipe):
    pytest.importorskip("xformers")
    cmd = [sys.executable, "-m", "perceptual_diffusion.cli", "train", recipe, "--out", str(tmp_path / "run"),
           "--no-progress", "--set", "model.overrides.attention_backend=xformers"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "attention_backend='xformers' cannot run on cpu" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
