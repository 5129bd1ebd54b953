"""QKNorm: the query-key normalisation that keeps attention logits bounded (the default presets'
fix for the loss jump of the default ImageUNet at lr 1e-3, benchmarks/RESULTS.md)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backbones import BACKBONES, build_backbone
from backbones.layers import MultiHeadAttention, QKNorm

from helpers import ROOT, load_benchmark

OWN = [name for name in BACKBONES if name != "diffusers_unet"]


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-3, 1e6), head_dim=st.sampled_from([4, 16, 32]), seed=st.integers(0, 2**16))
def test_logits_are_bounded_by_the_learned_scales_whatever_the_input_scale(scale, head_dim, seed):
    """With unit scales every normalised query and key has norm sqrt(d), so |q.k| / sqrt(d) <=
    sqrt(d) (Cauchy-Schwarz); without the norm the logits grow with the square of the input."""
    g = torch.Generator().manual_seed(seed)
    q, k = (scale * torch.randn(2, 3, 7, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    norm = QKNorm(head_dim).double()
    qn, kn = norm(q, k)
    logits = qn @ kn.transpose(-1, -2) / math.sqrt(head_dim)
    assert logits.abs().max() <= math.sqrt(head_dim) * (1 + 1e-6)
    assert (qn.norm(dim=-1) <= math.sqrt(head_dim) * (1 + 1e-9)).all()  # sqrt(d) up to RMSNorm's eps
    with torch.no_grad():  # the learned scales bound them instead
        norm.q.weight.fill_(2.0)
        norm.k.weight.fill_(3.0)
    qn, kn = norm(q, k)
    assert (qn @ kn.transpose(-1, -2) / math.sqrt(head_dim)).abs().max() <= 6 * math.sqrt(head_dim) * (1 + 1e-6)


@pytest.mark.parametrize("name", OWN)
def test_the_default_presets_normalise_queries_and_keys_and_the_tiny_ones_do_not(name):
    cls = BACKBONES[name]
    assert cls.PRESETS["default"].qk_norm is True
    assert cls.PRESETS["tiny"].qk_norm is False  # the shipped recipes' nets, stable at their lr (RESULTS.md)
    net = build_backbone(name, "tiny", in_channels=1, num_classes=3, qk_norm=True)
    attentions = [m for m in net.modules() if isinstance(m, MultiHeadAttention) or hasattr(m, "to_qkv")]
    assert attentions and all(isinstance(m.qk_norm, QKNorm) for m in attentions)
    x = torch.randn(2, *cls.EXAMPLE_INPUT_SHAPE)
    out = net(x, torch.tensor([10, 900]), torch.tensor([0, 1]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    plain = build_backbone(name, "tiny", in_channels=1, num_classes=3)
    assert not any(isinstance(m, QKNorm) for m in plain.modules())
    missing = set(net.state_dict()) - set(plain.state_dict())
    assert missing and all(".qk_norm." in k for k in missing)  # an old checkpoint does not load silently


def test_the_logit_probe_matches_the_bound_and_sees_qk_norm(tmp_path):
    """benchmarks/attention_logits.py on two 2-step runs: with QKNorm at init (unit scales) every
    layer's largest logit is at most sqrt(head_dim); the probe reads each checkpoint."""
    from perceptual_diffusion.config import load_recipe
    from perceptual_diffusion.trainer import Trainer

    module = load_benchmark("attention_logits")
    sets = ["data.size=16", "data.num_items=32", "train.stages=['mse']", "mse.steps=2", "mse.batch_size=2",
            "mse.lr=1e-12", "train.checkpoint_every=1", "train.sample_every=0", "train.num_samples=1",
            "train.sample_steps=1", "train.validation_size=0"]
    for qk in (True, False):
        run = tmp_path / str(qk)
        Trainer(load_recipe(ROOT / "recipes/image/circles.toml", [*sets, f"model.overrides.qk_norm={str(qk).lower()}"]),
                run, progress=False).run()
        rows = module.probe(run, n=4)
        assert [r["step"] for r in rows] == [1, 2] and all(r["vmse_t0-100"] > 0 for r in rows)
        largest = max(rows[0]["attention_logit_max"].values())
        head_dim = 24  # the tiny ImageUNet
        assert (largest <= math.sqrt(head_dim) + 0.05) if qk else largest > 0
