"""Checks that need a CUDA device (skipped without one; `benchmarks/gpu_check.sh` runs them):
SDPA and xformers agree within bf16 tolerance in every backbone, the diffusers UNet switches to
diffusers' xformers processors, and the SP loss under bf16 autocast with a bf16 frozen copy
matches float32."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from backbones import BACKBONES, build_backbone
from backbones.layers import attention
from perceptual_diffusion import NoiseSchedule, SelfPerceptual, make_perceptual

from helpers import randomise_zero_init

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_xformers = pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="needs xformers")

# bf16 keeps 8 mantissa bits: outputs of the two kernels agree to about 1e-2 of their scale
BF16_TOL = 3e-2


def _case(name: str, backend: str):
    """(net, x, t, cond) on CUDA for a registered backbone, tiny preset, fixed weights."""
    torch.manual_seed(0)
    if name == "diffusers_unet":
        net = build_backbone(name, "tiny", attention_backend=backend)
        d = net.unet.config.cross_attention_dim
        shape, cond = (4, 16, 16), torch.randn(4, 7, d)
    else:
        net = build_backbone(name, "tiny", in_channels=1, num_classes=3, attention_backend=backend)
        shape = BACKBONES[name].EXAMPLE_INPUT_SHAPE
        cond = torch.arange(4) % 3
    randomise_zero_init(net)  # no zero-initialised path: every attention layer must reach the output
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, *shape, generator=g), torch.randint(0, 1000, (4,), generator=g)
    return net.cuda(), x.cuda(), t.cuda(), cond.cuda()


@needs_xformers
def test_attention_kernels_agree_in_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 333, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    ref = attention(q.float(), k.float(), v.float(), "sdpa")
    for backend in ("sdpa", "xformers"):
        out = attention(q, k, v, backend).float()
        assert ((out - ref).abs().max() / ref.square().mean().sqrt()).item() < BF16_TOL


@needs_xformers
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbones_agree_across_attention_backends(name):
    if name == "diffusers_unet":
        pytest.importorskip("diffusers")
    outs, grads = {}, {}
    for backend in ("sdpa", "xformers"):
        net, x, t, cond = _case(name, backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x, t, cond)
        out.float().square().mean().backward()
        outs[backend] = out.detach().float()
        grads[backend] = torch.cat([p.grad.flatten().float() for p in net.parameters() if p.grad is not None])
    rms = outs["sdpa"].square().mean().sqrt()
    assert ((outs["xformers"] - outs["sdpa"]).abs().max() / rms).item() < BF16_TOL
    g_rms = grads["sdpa"].square().mean().sqrt()
    assert ((grads["xformers"] - grads["sdpa"]).square().mean().sqrt() / g_rms).item() < BF16_TOL


@needs_xformers
def test_diffusers_unet_uses_diffusers_xformers_processors():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import XFormersAttnProcessor

    net, *_ = _case("diffusers_unet", "xformers")
    procs = net.unet.attn_processors
    assert procs and all(isinstance(p, XFormersAttnProcessor) for p in procs.values())
    sdpa, *_ = _case("diffusers_unet", "sdpa")
    assert not any(isinstance(p, XFormersAttnProcessor) for p in sdpa.unet.attn_processors.values())


def test_sp_loss_in_bf16_with_bf16_frozen_copy_matches_float32():
    schedule = NoiseSchedule.scaled_linear(zero_terminal_snr=True)
    net, x, t, cond = _case("image_unet", "sdpa")
    g = torch.Generator(device="cuda").manual_seed(3)
    noise, t_prime = torch.randn(x.shape, device="cuda", generator=g), torch.randint(0, 1000, (4,), device="cuda")
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        sp = SelfPerceptual(schedule, make_perceptual(net, dtype=dtype))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            losses[dtype] = sp(net, x, cond, t=t, t_prime=t_prime, noise=noise).float()
    assert torch.isfinite(losses[torch.bfloat16]).all()
    torch.testing.assert_close(losses[torch.bfloat16], losses[torch.float32], rtol=0.1, atol=1e-4)
