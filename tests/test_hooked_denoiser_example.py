"""The HookedDenoiser example of docs/backbones.md, executed as written: a tiny diffusers
UNet2DModel wrapped in about ten lines passes the conformance kit, and the wrapper computes
exactly what the wrapped model computes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from perceptual_diffusion import HookedDenoiser  # noqa: E402
from perceptual_diffusion.testing import DenoiserConformance, one_thread  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "backbones.md"
MARKER = "<!-- example: hooked-unet"


def example_source() -> str:
    """The ```python block right after the example's marker in docs/backbones.md."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(re.escape(MARKER) + r"[^\n]*\n```python\n(.*?)\n```", text, re.S)
    assert found, f"{DOC} has no python block after {MARKER!r}"
    return found.group(1)


def build_example() -> HookedDenoiser:
    namespace: dict = {}
    exec(compile(example_source(), str(DOC), "exec"), namespace)
    return namespace["net"]


class TestDocumentedHookedUNet(DenoiserConformance):
    input_shape = (1, 16, 16)

    def make_denoiser(self):
        return build_example()

    def make_cond(self, n):
        return torch.arange(n) % 10

    def make_checkpointed_denoiser(self):
        net = build_example()
        net.module.enable_gradient_checkpointing()
        return net


def test_the_wrapper_is_the_wrapped_unet_with_taps():
    torch.manual_seed(0)
    net = build_example().eval()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 1, 16, 16, generator=g), torch.tensor([3, 700]), torch.tensor([4, 10])
    with one_thread(), torch.no_grad():
        v = net(x, t, y)
        assert torch.equal(v, net.module(x, t, class_labels=y).sample)
        mid = net.forward_features(x, t, y, layers="mid")["mid"]
    assert mid.shape == (2, 32, 8, 8) and net.feature_layers == ("down.0", "down.1", "mid", "up.0", "up.1")
    assert not net.module.mid_block._forward_hooks  # hooks live only during forward_features
