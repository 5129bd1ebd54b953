"""ImageDiT and the N-D pieces of backbones/transformer.py it adds to AudioDiT's: patching and
positions over 1-3 dims, tap grids, sizes, errors, presets, registry and recipe. The Denoiser
contract itself (taps, early exit, gradients, conditions, checkpointing) is the conformance kit's,
run on every registry entry by tests/test_backbone_conformance.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backbones import BACKBONES, build_backbone
from backbones.image_dit import ImageDiT, ImageDiTConfig
from backbones import transformer
from backbones.layers import timestep_embedding
from backbones.transformer import patchify, position_embedding, unpatchify
from perceptual_diffusion.config import load_recipe
from perceptual_diffusion.testing import one_thread, randomise_zero_init

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "image" / "digits_dit.toml"


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def noisy_tiny(**overrides) -> ImageDiT:
    """The tiny preset in eval mode with signal on every path (no adaLN-Zero identity)."""
    torch.manual_seed(0)
    return randomise_zero_init(ImageDiT.from_preset("tiny", **overrides)).eval()


def batch(*shape: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, 1000, (shape[0],), generator=g)


# ---------------------------------------------------------------- N-D patching and positions

@settings(max_examples=40, deadline=None)
@given(dims=st.integers(1, 3), c=st.integers(1, 3), data=st.data())
def test_patchify_round_trips_and_lays_out_patches_row_major_channel_major(dims, c, data):
    p = tuple(data.draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims)))
    grid = tuple(data.draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims)))
    x = torch.randn(2, c, *(g * q for g, q in zip(grid, p)))
    tokens = patchify(x, p)
    assert tokens.shape == (2, math.prod(grid), c * math.prod(p))
    assert torch.equal(unpatchify(tokens, p, c, grid), x)
    # the last token is the last patch of the grid, all channels, each channel's patch row-major
    last = tuple(slice((g - 1) * q, g * q) for g, q in zip(grid, p))
    assert torch.equal(tokens[:, -1], x[(slice(None), slice(None), *last)].reshape(2, -1))
    if len(set(p)) == 1:  # one int means the same size along every dim
        assert torch.equal(patchify(x, p[0]), tokens)


def test_patchify_names_the_axis_that_does_not_divide():
    with pytest.raises(ValueError, match=r"W=10 is not divisible by patch_size=4; pad or crop W"):
        patchify(torch.zeros(1, 1, 8, 10), 4)
    with pytest.raises(ValueError, match=r"F=3 is not divisible by patch_size=2"):
        patchify(torch.zeros(1, 1, 3, 4, 4), (2, 1, 1))
    with pytest.raises(ValueError, match="gives 1 sizes for 2 positional dims"):
        patchify(torch.zeros(1, 1, 4, 4), (2,))
    with pytest.raises(ValueError, match=r"\[N x C x H x W\]"):
        patchify(torch.zeros(1, 1, 1, 1, 1, 1), 1)
    with pytest.raises(ValueError, match=r"grid \(2, 2\)"):
        unpatchify(torch.zeros(1, 3, 4), 2, 1, (2, 2))


def test_positions_give_each_dim_its_share_of_the_width():
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
    emb = position_embedding((3, 5), 64)
    assert emb.shape == (15, 64)
    torch.testing.assert_close(emb[:, :32], timestep_embedding(rows.flatten(), 32), rtol=0, atol=0)
    torch.testing.assert_close(emb[:, 32:], timestep_embedding(cols.flatten(), 32), rtol=0, atol=0)
    assert len({tuple(e.tolist()) for e in emb}) == 15  # every token its own position
    # 1-D is the whole width on the one index (AudioDiT's positions); odd splits give the first dims more
    torch.testing.assert_close(position_embedding((7,), 10), timestep_embedding(torch.arange(7), 10), rtol=0, atol=0)
    assert position_embedding((2, 2, 2), 11).shape == (8, 11)


# ---------------------------------------------------------------- the network

@pytest.mark.parametrize("overrides,shape", [
    ({}, (2, 1, 16, 16)),
    ({}, (1, 1, 8, 24)),  # not square: a grid of 4 x 12 tokens
    ({}, (1, 1, 2, 2)),  # a single token
    ({"in_channels": 3, "out_channels": 2, "patch_size": 4}, (2, 3, 12, 8)),
])
def test_any_size_divisible_by_the_patch_gives_v_and_token_grid_taps(overrides, shape):
    net = noisy_tiny(**overrides)
    x, t = batch(*shape)
    p, (h, w) = net.config.patch_size, shape[2:]
    with torch.no_grad():
        v = net(x, t)
        feats = net.forward_features(x, t, layers="all", stop_early=False)
    assert v.shape == (shape[0], overrides.get("out_channels", shape[1]), h, w) and v.abs().amax() > 0
    assert list(feats) == list(net.feature_layers)
    for name, f in feats.items():
        assert net.feature_info[name] == {"channels": 64, "reduction": p}
        assert f.shape == (shape[0], h // p, w // p, 64), name


def test_taps_are_the_token_grid_that_the_final_layer_reads():
    net = noisy_tiny(num_classes=10)
    x, t = batch(2, 1, 8, 12)
    y = torch.tensor([3, 10])
    seen = []
    hook = net.final_layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        last = net.forward_features(x, t, y, layers="up.1", stop_early=False)["up.1"]
    hook.remove()
    assert torch.equal(last.flatten(1, 2), seen[0])  # row-major: token k is grid cell (k // 6, k % 6)


def test_rows_and_columns_are_told_apart(monkeypatch):
    """With 1x1 patches, transposing a square image permutes the tokens: without positions the
    net would commute with it (attention is permutation-equivariant); the 2-D positions break that."""
    net = noisy_tiny(patch_size=1)
    x, t = batch(1, 1, 6, 6)

    def gap() -> float:
        with torch.no_grad():
            return (net(x.mT, t) - net(x, t).mT).abs().amax().item()

    assert gap() > 1e-3
    monkeypatch.setattr(transformer, "position_embedding", lambda grid, dim, device: torch.zeros(dim))
    assert gap() < 1e-5


def test_zero_output_at_init_and_tiny_depth_six_taps():
    torch.manual_seed(0)
    net = ImageDiT.from_preset("tiny", num_classes=10)
    x, t = batch(2, 1, 16, 16)
    assert torch.equal(net(x, t, torch.tensor([1, 2])), torch.zeros_like(x))
    assert net.feature_layers == ("down.0", "down.1", "down.2", "mid", "up.0", "up.1")


def test_inputs_of_the_wrong_layout_raise_naming_the_net():
    net = noisy_tiny()
    t = torch.tensor([5])
    with pytest.raises(ValueError, match=r"H=15 is not divisible by patch_size=2"):
        net(torch.zeros(1, 1, 15, 16), t)
    for bad in (torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 256)):
        with pytest.raises(ValueError, match=r"ImageDiT expects x_t \[N x 1 x H x W\]"):
            net(bad, t)


def test_presets_and_config():
    counts = {name: sum(p.numel() for p in ImageDiT.from_preset(name).parameters()) for name in ImageDiT.PRESETS}
    assert counts["tiny"] < 500_000 and 30_000_000 < counts["default"] < 35_000_000  # DiT-S/2 width and depth
    assert ImageDiT.PRESETS["default"] == ImageDiTConfig() and ImageDiTConfig().patch_size == 2
    assert ImageDiT(ImageDiT.PRESETS["tiny"], depth=2).feature_layers == ("down.0", "mid")
    with pytest.raises(ValueError, match=r"ImageDiTConfig.hidden_dim=64 is not divisible by num_heads=5"):
        ImageDiTConfig(hidden_dim=64, num_heads=5)
    with pytest.raises(TypeError, match="unknown ImageDiT config field.*'patch'"):
        ImageDiT.from_preset("tiny", patch=4)
    with pytest.raises(ValueError, match="unknown ImageDiT preset 'small'; presets: tiny, default"):
        ImageDiT.from_preset("small")


def test_registered_with_its_shard_units():
    assert BACKBONES["image_dit"] is ImageDiT
    net = build_backbone("image_dit", "tiny", in_channels=1, num_classes=10)
    assert ImageDiT.SHARD_UNITS == ("DiTBlock",)
    assert sum(type(m).__name__ == "DiTBlock" for m in net.modules()) == net.config.depth == 6


def test_the_digits_recipe_builds_a_tiny_image_dit_for_its_data():
    from perceptual_diffusion.builders import build_model

    r = load_recipe(RECIPE)
    assert (r.model.backbone, r.model.preset, r.data.name, r.data.size) == ("image_dit", "tiny", "digits", 16)
    net = build_model(r)
    assert isinstance(net, ImageDiT)
    assert (net.config.in_channels, net.config.num_classes) == (1, 10)
    assert r.data.size % net.config.patch_size == 0 and (r.data.size // net.config.patch_size) ** 2 == 64
