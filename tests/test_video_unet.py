"""VideoUNet and its temporal blocks: shapes, frame mixing, per-clip contexts, configs, taps and
early exit. What every own backbone shares (presets, construction, layer groups, batches,
checkpointing, conditioning) is checked in tests/test_backbone_conformance.py, weights and
outputs against earlier code in tests/test_backbone_digests.py."""

from __future__ import annotations

import pytest
import torch
from helpers import check_early_exit, check_v_like_x, noisy_inputs, perturbed, tiny_net
from hypothesis import given, settings
from hypothesis import strategies as st

from backbones.video_unet import (
    TemporalAttention,
    TemporalConv,
    VideoUNet,
    VideoUNetConfig,
)
from perceptual_diffusion.testing import record_calls


def zero_temporal(net: VideoUNet) -> VideoUNet:
    """Zero the output projections of every temporal block (their state at init)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (TemporalConv, TemporalAttention)):
                for p in m.proj_out.parameters():
                    p.zero_()
    return net


def inputs(n: int = 2, c: int = 3, f: int = 4, h: int = 8, w: int = 8, seed: int = 1):
    return noisy_inputs(n, c, f, h, w, seed=seed)


# ---------------------------------------------------------------- shapes and presets


@pytest.mark.parametrize(
    "overrides,shape",
    [
        ({}, (2, 3, 4, 8, 8)),
        ({}, (1, 3, 1, 8, 8)),  # one frame, batch 1
        ({"in_channels": 1}, (2, 1, 5, 6, 10)),  # odd F, non-square
        ({"channel_mult": (1, 1, 2), "temporal_attention_levels": True}, (1, 3, 3, 12, 8)),
        ({"temporal_attention_levels": False, "attention_levels": ()}, (2, 3, 2, 4, 4)),
    ],
)
def test_output_shape_equals_input_shape(overrides, shape):
    check_v_like_x(perturbed(VideoUNet.from_preset("tiny", **overrides)), *inputs(*shape))


def test_bad_input_shapes_raise(tiny):
    x, t = inputs(2, h=8, w=8)
    with pytest.raises(ValueError, match=r"divisible by 2.*7 x 8"):
        tiny(torch.randn(2, 3, 4, 7, 8), t)
    with pytest.raises(ValueError, match=r"\[N x C x F x H x W\]"):
        tiny(x[:, :, 0], t)
    with pytest.raises(ValueError, match="in_channels=3.*1 channels"):
        tiny(x[:, :1], t)
    three = VideoUNet.from_preset("tiny", channel_mult=(1, 1, 2))
    with pytest.raises(ValueError, match="3 levels needs H and W divisible by 4"):
        three(torch.randn(1, 3, 2, 8, 6), t[:1])


def test_out_channels_and_feature_info():
    net = perturbed(VideoUNet.from_preset("tiny", out_channels=2, channel_mult=(1, 2, 2)))
    x, t = inputs(2, f=3, h=8, w=16)
    assert net(x, t).shape == (2, 2, 3, 8, 16)
    feats = net.forward_features(x, t, layers="all", stop_early=False)
    assert tuple(feats) == net.feature_layers
    for name, f in feats.items():
        info = net.feature_info[name]
        assert f.shape == (2, info["channels"], 3, 8 // info["reduction"], 16 // info["reduction"]), name
    assert [net.feature_info[n]["reduction"] for n in net.feature_layers] == [2, 4, 4, 4, 2, 1, 1]


def test_default_preset():
    default = VideoUNet.from_preset("default")
    assert 8_000_000 < sum(p.numel() for p in default.parameters()) < 16_000_000
    # the midblock and the default preset's levels 1 and 2 have both kinds of attention
    kinds = {type(m).__name__ for m in default.mid[0].modules()}
    assert {"ResBlock", "TemporalConv", "AttentionBlock", "TemporalAttention"} <= kinds
    assert default.down[0].blocks[0].tattn is None
    assert default.down[1].blocks[0].tattn is not None


def test_lists_from_recipes_and_temporal_levels():
    c = VideoUNet.from_preset(
        "tiny", channel_mult=[1, 2], attention_levels=[0], temporal_attention_levels=[1, 0]
    )
    assert c.config.channel_mult == (1, 2) and c.config.temporal_attention_levels == (1, 0)
    # a bool follows the number of levels, also after a later override
    all_levels = VideoUNetConfig(temporal_attention_levels=True)
    assert all_levels.temporal_levels == (0, 1, 2)
    fewer = VideoUNet(
        all_levels, base_channels=16, groups=8, head_dim=16, channel_mult=(1, 2), attention_levels=(1,)
    )
    assert fewer.config.temporal_levels == (0, 1) and fewer.down[0].blocks[0].tattn is not None
    assert VideoUNetConfig(temporal_attention_levels=False).temporal_levels == ()
    with pytest.raises(TypeError, match="'base_chanels'"):
        VideoUNet.from_preset("tiny", base_chanels=8)


@pytest.mark.parametrize(
    "fields,match",
    [  # the fields it shares with ImageUNetConfig are checked in tests/test_unet.py
        ({"attention_levels": (3,)}, "attention_levels"),
        ({"temporal_attention_levels": (0, 0)}, "temporal_attention_levels"),
        ({"temporal_attention_levels": (True,)}, "temporal_attention_levels"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        VideoUNetConfig(**fields)


# ---------------------------------------------------------------- mixing across frames


def test_fresh_net_is_a_per_frame_unet():
    """At init every temporal block is the identity: frame k of the output sees frame k only."""
    torch.manual_seed(0)
    net = VideoUNet.from_preset("tiny").eval()
    for m in net.modules():
        if isinstance(m, (TemporalConv, TemporalAttention)):
            assert all(torch.equal(p, torch.zeros_like(p)) for p in m.proj_out.parameters())
    x, t = inputs(2, f=3)
    y = x.clone()
    y[:, :, 2] = torch.randn_like(y[:, :, 2])
    a, b = net(x, t), net(y, t)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2], rtol=0, atol=1e-6)


@settings(max_examples=4, deadline=None)
@given(frames=st.integers(2, 5), data=st.data())
def test_zero_temporal_projections_decouple_frames(frames, data):
    """Law: with the temporal projections zero, a clip is denoised frame by frame."""
    k = data.draw(st.integers(0, frames - 1))
    torch.manual_seed(0)
    net = zero_temporal(perturbed(VideoUNet.from_preset("tiny", num_classes=4)))
    x, t = inputs(2, f=frames, seed=frames)
    y = torch.tensor([1, 3])
    whole = net(x, t, y)
    alone = net(x[:, :, k : k + 1], t, y)
    torch.testing.assert_close(whole[:, :, k : k + 1], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["conv", "attention", "both"])
def test_temporal_blocks_mix_frames(which):
    torch.manual_seed(0)
    net = perturbed(VideoUNet.from_preset("tiny"))
    with torch.no_grad():  # leave only the chosen temporal path open
        for m in net.modules():
            closed = {"conv": TemporalAttention, "attention": TemporalConv, "both": ()}[which]
            if isinstance(m, closed):
                for p in m.proj_out.parameters():
                    p.zero_()
    x, t = inputs(1, f=4)
    y = x.clone()
    y[:, :, 3] += 1.0
    a, b = net(x, t), net(y, t)
    assert (a[:, :, 0] - b[:, :, 0]).abs().amax() > 1e-4
    # and the zero-projection control: frame 0 does not move
    zero_temporal(net)
    torch.testing.assert_close(net(x, t)[:, :, 0], net(y, t)[:, :, 0], rtol=0, atol=1e-6)


def test_temporal_conv_matches_conv3d_reference():
    torch.manual_seed(0)
    block = perturbed(TemporalConv(8, groups=4), scale=0.3)
    x = torch.randn(2, 8, 5, 3, 4)
    conv3d = [torch.nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)) for _ in range(2)]
    for c3, c2 in zip(conv3d, (block.conv1, block.proj_out)):
        c3.weight.data.copy_(c2.weight.data[..., None])  # (out, in, 3, 1) -> (out, in, 3, 1, 1)
        c3.bias.data.copy_(c2.bias.data)
    silu, gn = torch.nn.functional.silu, torch.nn.functional.group_norm
    h = conv3d[0](silu(gn(x, 4, block.norm1.weight, block.norm1.bias)))
    ref = x + conv3d[1](silu(gn(h, 4, block.norm2.weight, block.norm2.bias)))
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_temporal_attention_permutation_law():
    """Without the frame-index embedding, attention over frames commutes with reordering them."""
    torch.manual_seed(0)
    block = perturbed(TemporalAttention(16, head_dim=8, groups=4), scale=0.3)
    x = torch.randn(2, 16, 5, 3, 2)
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert not torch.allclose(block(x)[:, :, perm], block(x[:, :, perm]), atol=1e-4)  # order is seen
    with torch.no_grad():
        block.frame_pos.weight.zero_()
        block.frame_pos.bias.zero_()
    torch.testing.assert_close(block(x)[:, :, perm], block(x[:, :, perm]), rtol=1e-5, atol=1e-5)
    one = torch.randn(1, 16, 1, 2, 2)
    assert block(one).shape == one.shape
    with pytest.raises(ValueError, match="head_dim=6"):
        TemporalAttention(16, head_dim=6)
    with pytest.raises(ValueError, match="exactly one"):
        TemporalAttention(16)


# ---------------------------------------------------------------- conditioning


def test_each_clip_reads_its_own_context():
    """Conditioning in general is checked for every backbone in test_backbone_conformance.py;
    here: frames are folded into the batch, yet clip i sees only context i in every frame."""
    torch.manual_seed(0)
    net = perturbed(VideoUNet.from_preset("tiny", context_dim=12))
    x, t = inputs(2, f=3)
    ctx = torch.randn(2, 5, 12)
    a, b = net(x, t, ctx), net(x, t, ctx + 1.0)
    swapped = net(x, t, torch.stack([ctx[0], ctx[1] + 1.0]))
    torch.testing.assert_close(swapped[0], a[0])
    torch.testing.assert_close(swapped[1], b[1])


# ---------------------------------------------------------------- taps and early exit


@pytest.fixture(scope="module")
def tiny() -> VideoUNet:
    return tiny_net(VideoUNet, num_classes=10)


def test_early_exit_features_match_full_forward(tiny):
    x, t = inputs(2)
    y = torch.tensor([3, 7])
    full = check_early_exit(tiny, x, t, y)
    assert tuple(full) == ("down.0", "down.1", "mid", "up.0", "up.1")
    # the last tap is the input of the output head
    v = tiny(x, t, y)
    up = full["up.1"]
    head = tiny.conv_out(torch.nn.functional.silu(tiny.norm_out(up.transpose(1, 2).flatten(0, 1))))
    torch.testing.assert_close(head.unflatten(0, (2, -1)).transpose(1, 2), v)


def test_mid_runs_no_decoder_module(tiny):
    x, t = inputs(2)
    calls = record_calls(tiny, lambda: tiny.forward_features(x, t, torch.tensor([0, 1]), layers="mid"))
    tops = {name.split(".")[0] for name in calls}
    assert "up" not in tops and "norm_out" not in tops and "conv_out" not in tops
    assert {"conv_in", "time_embed", "label_embed", "down", "mid"} <= tops
    expected = {
        "down.0.blocks.0.res", "down.0.blocks.0.tconv", "down.0.resample",
        "down.1.blocks.0.attn", "down.1.blocks.0.tattn",
        "mid.0.res", "mid.0.tconv", "mid.0.attn", "mid.0.tattn", "mid.1.res", "mid.1.tconv",
    }
    assert expected <= set(calls)
    assert calls.index("mid.0.tattn") < calls.index("mid.1.res")
    assert calls.count("mid.1.tconv") == 1
