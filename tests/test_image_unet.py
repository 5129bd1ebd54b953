"""ImageUNet and its building blocks: shapes, conditioning, taps and early exit, dtypes."""

from __future__ import annotations


import pytest
import torch

from backbones import ImageUNet, ImageUNetConfig
from backbones.layers import AttentionBlock, Downsample, ResBlock, Upsample, attention, timestep_embedding
from perceptual_diffusion.denoiser import Denoiser


def perturbed(net: ImageUNet, seed: int = 0, scale: float = 0.05) -> ImageUNet:
    """Add noise to every parameter, so the zero-initialised paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def inputs(n: int = 2, c: int = 3, h: int = 16, w: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.randint(0, 1000, (n,), generator=g)


@pytest.fixture(scope="module")
def tiny() -> ImageUNet:
    torch.manual_seed(0)
    return perturbed(ImageUNet.from_preset("tiny", num_classes=10))


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
    net = perturbed(ImageUNet.from_preset("tiny", **overrides))
    x, t = inputs(*shape)
    v = net(x, t)
    assert v.shape == x.shape
    assert torch.isfinite(v).all()


def test_out_channels_and_feature_info():
    net = perturbed(ImageUNet.from_preset("tiny", out_channels=6))
    x, t = inputs(2, 3, 16, 16)
    assert net(x, t).shape == (2, 6, 16, 16)
    feats = net.forward_features(x, t, layers="all", stop_early=False)
    for name, f in feats.items():
        info = net.feature_info[name]
        assert f.shape == (2, info["channels"], 16 // info["reduction"], 16 // info["reduction"]), name


def test_presets():
    counts = {
        name: sum(p.numel() for p in ImageUNet.from_preset(name).parameters()) for name in ImageUNet.PRESETS
    }
    assert set(counts) >= {"tiny", "small", "default"}
    assert counts["tiny"] < 1_000_000
    assert counts["tiny"] < counts["small"] < counts["default"]
    assert ImageUNet.PRESETS["default"] == ImageUNetConfig()
    assert isinstance(ImageUNet.from_preset("tiny"), Denoiser)


def test_construction_styles_agree():
    cfg = ImageUNet.PRESETS["tiny"]
    a = ImageUNet(cfg)
    b = ImageUNet(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
    assert a.config == b.config
    assert ImageUNet(cfg, dropout=0.1).config.dropout == 0.1
    assert ImageUNet.from_preset("tiny", channel_mult=[1, 2]).config.channel_mult == (1, 2)


def test_preset_and_override_errors():
    with pytest.raises(ValueError, match="tiny.*small.*default"):
        ImageUNet.from_preset("huge")
    with pytest.raises(TypeError, match="'base_chanels'"):
        ImageUNet.from_preset("tiny", base_chanels=8)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"base_channels": 24, "groups": 32}, "not divisible by groups"),
        ({"num_classes": 10, "context_dim": 8}, "exclusive"),
        ({"num_res_blocks": -1}, "num_res_blocks must be a positive int"),
        ({"base_channels": 0}, "base_channels"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"channel_mult": (1, -2)}, "channel_mult"),
        ({"attention_levels": (4,)}, "attention_levels"),
        ({"head_dim": 32, "num_heads": 4}, "exactly one"),
        ({"head_dim": 48}, "head_dim=48"),
        ({"dropout": 1.5}, "dropout"),
        ({"num_classes": 0}, "num_classes"),
        ({"attention_backend": "flash"}, "attention_backend"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        ImageUNetConfig(**fields)


# ---------------------------------------------------------------- taps and early exit


def test_early_exit_features_match_full_forward(tiny):
    x, t = inputs(2)
    y = torch.tensor([3, 7])
    full = tiny.forward_features(x, t, y, layers="all", stop_early=False)
    assert tuple(full) == tiny.feature_layers == ("down.0", "down.1", "mid", "up.0", "up.1")
    assert tiny.forward_features(x, t, y, layers="all").keys() == full.keys()
    for name in tiny.feature_layers:
        early = tiny.forward_features(x, t, y, layers=name)
        late = tiny.forward_features(x, t, y, layers=name, stop_early=False)
        assert list(early) == [name]
        assert torch.equal(early[name], full[name]), name
        assert torch.equal(late[name], full[name]), name


def test_mid_runs_no_decoder_module(tiny):
    calls: set[str] = set()
    handles = [
        m.register_forward_hook(lambda mod, i, o, name=name: calls.add(name))
        for name, m in tiny.named_modules()
        if name
    ]
    try:
        x, t = inputs(2)
        tiny.forward_features(x, t, torch.tensor([0, 1]), layers="mid")
    finally:
        for h in handles:
            h.remove()
    tops = {name.split(".")[0] for name in calls}
    assert not any(n.startswith("up.") for n in calls)
    assert "up" not in tops and "norm_out" not in tops and "conv_out" not in tops
    assert {"conv_in", "time_embed", "label_embed", "down", "mid"} <= tops
    assert {"down.0.res.0", "down.1.attn.0", "down.0.resample", "mid.res1", "mid.attn", "mid.res2"} <= calls


def test_layer_groups(tiny):
    x, t = inputs(1)
    expected = {
        "encoder": ["down.0", "down.1"],
        "decoder": ["up.0", "up.1"],
        "encoder+mid": ["down.0", "down.1", "mid"],
        "mid": ["mid"],
        ("up.1", "down.0"): ["down.0", "up.1"],  # execution order
    }
    for spec, names in expected.items():
        assert list(tiny.forward_features(x, t, layers=spec)) == names
    with pytest.raises(ValueError, match="unknown feature layer"):
        tiny.forward_features(x, t, layers="up.9")


# ---------------------------------------------------------------- modes and dtypes


def test_batch_size_one(tiny):
    x, t = inputs(2)
    y = torch.tensor([4, 5])
    both = tiny(x, t, y)
    one = tiny(x[:1], t[:1], y[:1])
    assert one.shape == (1, 3, 16, 16)
    assert torch.allclose(one, both[:1], atol=1e-5)
    assert tiny(x[:1], t[0], y[:1]).shape == (1, 3, 16, 16)  # scalar t broadcasts


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = perturbed(ImageUNet.from_preset("tiny", context_dim=8)).train()
    ckpt = ImageUNet.from_preset("tiny", context_dim=8, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = inputs(2)
    ctx = torch.randn(2, 3, 8, requires_grad=True)
    grads = []
    for net in (plain, ckpt):
        calls = []
        h = net.mid.res1.register_forward_pre_hook(lambda *a: calls.append(1))
        ctx.grad = None
        net(x, t, ctx).square().mean().backward()
        h.remove()
        grads.append([p.grad.clone() for p in net.parameters()] + [ctx.grad.clone()])
        # checkpointing recomputes the block in backward (a post-hook may not fire: early stop)
        assert len(calls) == (2 if net is ckpt else 1)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
