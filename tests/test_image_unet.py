"""ImageUNet and its building blocks: shapes, feature_info, configs, taps and early exit. What
every own backbone shares (presets, construction, layer groups, batches, checkpointing,
conditioning) is checked in tests/test_backbone_conformance.py, weights and outputs against
earlier code in tests/test_backbone_digests.py."""

from __future__ import annotations

import pytest
import torch
from helpers import check_early_exit, check_v_like_x, noisy_inputs, perturbed, tiny_net

from backbones import ImageUNet
from backbones.layers import AttentionBlock, Downsample, ResBlock, Upsample, attention, timestep_embedding
from perceptual_diffusion.testing import record_calls


def inputs(n: int = 2, c: int = 3, h: int = 16, w: int = 16, seed: int = 1):
    return noisy_inputs(n, c, h, w, seed=seed)


# ---------------------------------------------------------------- shapes and presets


@pytest.mark.parametrize(
    "overrides,shape",
    [
        ({}, (2, 3, 16, 16)),
        ({"in_channels": 1}, (3, 1, 8, 12)),
        ({"in_channels": 4}, (2, 4, 15, 9)),  # odd sizes round-trip through the Upsample
        ({"channel_mult": (1, 1, 2), "base_channels": 16, "head_dim": 16}, (2, 3, 13, 20)),
    ],
)
def test_output_shape_equals_input_shape(overrides, shape):
    check_v_like_x(perturbed(ImageUNet.from_preset("tiny", **overrides)), *inputs(*shape))


def test_out_channels_and_feature_info():
    net = perturbed(ImageUNet.from_preset("tiny", out_channels=6))
    x, t = inputs(2, 3, 16, 16)
    assert net(x, t).shape == (2, 6, 16, 16)
    feats = net.forward_features(x, t, layers="all", stop_early=False)
    for name, f in feats.items():
        info = net.feature_info[name]
        assert f.shape == (2, info["channels"], 16 // info["reduction"], 16 // info["reduction"]), name


def test_presets_and_lists_from_recipes():
    """The config's checks are tests/test_unet.py's, for both UNets."""
    assert list(ImageUNet.PRESETS) == ["tiny", "small", "default"]  # parameters grow: test_backbone_conformance
    assert ImageUNet.from_preset("tiny", channel_mult=[1, 2]).config.channel_mult == (1, 2)
    with pytest.raises(TypeError, match="'base_chanels'"):
        ImageUNet.from_preset("tiny", base_chanels=8)


# ---------------------------------------------------------------- taps and early exit


@pytest.fixture(scope="module")
def tiny() -> ImageUNet:
    return tiny_net(ImageUNet, num_classes=10)


def test_early_exit_features_match_full_forward(tiny):
    x, t = inputs(2)
    full = check_early_exit(tiny, x, t, torch.tensor([3, 7]))
    assert tuple(full) == ("down.0", "down.1", "mid", "up.0", "up.1")


def test_mid_runs_no_decoder_module(tiny):
    x, t = inputs(2)
    calls = set(record_calls(tiny, lambda: tiny.forward_features(x, t, torch.tensor([0, 1]), layers="mid")))
    tops = {name.split(".")[0] for name in calls}
    assert not any(n.startswith("up.") for n in calls)
    assert "up" not in tops and "norm_out" not in tops and "conv_out" not in tops
    assert {"conv_in", "time_embed", "label_embed", "down", "mid"} <= tops
    assert {"down.0.res.0", "down.1.attn.0", "down.0.resample", "mid.res1", "mid.attn", "mid.res2"} <= calls


# ---------------------------------------------------------------- layers


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 5, 999]), 16)
    assert e.shape == (3, 16) and e.dtype == torch.float32
    assert torch.equal(e[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    assert torch.allclose(e[:, :8] ** 2 + e[:, 8:] ** 2, torch.ones(3, 8))
    assert timestep_embedding(torch.tensor([1.5]), 7)[0, -1] == 0  # odd dim: zero pad
    assert torch.allclose(timestep_embedding(torch.tensor([3]), 8), timestep_embedding(torch.tensor([3.0]), 8))


def test_attention_matches_reference():
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="magic")


@pytest.mark.parametrize("dims,size", [(1, (9,)), (2, (6, 5)), (3, (3, 4, 6))])
def test_blocks_are_dimension_generic(dims, size):
    x = torch.randn(2, 16, *size)
    emb = torch.randn(2, 32)
    block = ResBlock(16, 24, 32, dims=dims, groups=8)
    assert block(x, emb).shape == (2, 24, *size)
    attn = AttentionBlock(16, head_dim=8, context_dim=6, groups=8)
    ctx = torch.randn(2, 3, 6)
    # zero-initialised output projection: identity at init
    assert torch.equal(attn(x, ctx), x)
    torch.nn.init.normal_(attn.proj_out.weight)
    assert attn(x, ctx).shape == x.shape and not torch.equal(attn(x, ctx), x)
    down = Downsample(16, dims)(x)
    assert down.shape[2:] == tuple((s + 1) // 2 for s in size)
    assert Upsample(16, dims)(down, size=size).shape == x.shape
    doubled = Upsample(16, dims)(down)
    assert doubled.shape[2:] == tuple(2 * s for s in down.shape[2:])
