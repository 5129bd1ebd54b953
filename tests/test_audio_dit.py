"""AudioDiT: patching, adaLN-Zero init, taps and early exit, configs, the SP loss through it, and
that moving its blocks to backbones/transformer.py kept its weights' names (its outputs then:
tests/test_backbone_digests.py). What every own backbone shares (presets, construction, layer
groups, batches, checkpointing, conditioning) is checked in tests/test_backbone_conformance.py."""

from __future__ import annotations

import pytest
import torch
from helpers import check_early_exit, noisy_inputs, perturbed
from hypothesis import given, settings
from hypothesis import strategies as st

from backbones.audio_dit import AudioDiT, AudioDiTConfig, inverse_spectrum, patchify, spectrum, tap_names, unpatchify
from perceptual_diffusion import NoiseSchedule, SelfPerceptual, make_perceptual


def inputs(n: int = 2, c: int = 1, length: int = 128, seed: int = 1):
    return noisy_inputs(n, c, length, seed=seed)


def block_calls(net: AudioDiT, run) -> dict[str, int]:
    """How often each block and the final layer ran during `run()`."""
    counts = {f"blocks.{i}": 0 for i in range(len(net.blocks))} | {"final_layer": 0}
    handles = [
        net.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: counts.__setitem__(name, counts[name] + 1)
        )
        for name in counts
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return counts


@pytest.fixture(scope="module")
def tiny() -> AudioDiT:
    return perturbed(AudioDiT.from_preset("tiny", num_classes=10))


# ---------------------------------------------------------------- patching


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    p=st.integers(1, 8),
    tokens=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_patchify_unpatchify_round_trip(n, c, p, tokens, seed):
    x = torch.randn(n, c, tokens * p, generator=torch.Generator().manual_seed(seed))
    z = patchify(x, p)
    assert z.shape == (n, tokens, c * p)
    assert torch.equal(unpatchify(z, p, c), x)
    assert torch.equal(patchify(unpatchify(z, p, c), p), z)
    # token k holds samples k*p..(k+1)*p-1 of each channel, channel-major
    k = tokens - 1
    assert torch.equal(z[:, k].reshape(n, c, p), x[:, :, k * p : (k + 1) * p])


def test_patchify_errors():
    with pytest.raises(ValueError, match=r"L=10 is not divisible by patch_size=4"):
        patchify(torch.zeros(1, 1, 10), 4)
    with pytest.raises(ValueError, match=r"\[N x C x L\]"):
        patchify(torch.zeros(1, 10), 2)
    with pytest.raises(ValueError, match="channels=2 x patch_size=4"):
        unpatchify(torch.zeros(1, 3, 6), 4, 2)


# ---------------------------------------------------------------- shapes and presets


@pytest.mark.parametrize(
    "overrides,shape",
    [
        ({}, (1, 1, 16)),  # a single token
        ({}, (1, 1, 256)),
        ({}, (2, 1, 1024)),
        ({"in_channels": 2, "out_channels": 3, "patch_size": 8}, (2, 2, 40)),
        ({"patch_size": 1, "depth": 1}, (1, 1, 7)),
    ],
)
def test_output_shape_and_feature_info(overrides, shape):
    net = perturbed(AudioDiT.from_preset("tiny", **overrides))
    x, t = inputs(*shape)
    v = net(x, t)
    c_out = overrides.get("out_channels", shape[1])
    assert v.shape == (shape[0], c_out, shape[2])
    assert torch.isfinite(v).all() and v.abs().amax() > 0
    feats = net.forward_features(x, t, layers="all", stop_early=False)
    for name, f in feats.items():
        info = net.feature_info[name]
        assert f.shape == (shape[0], shape[2] // info["reduction"], info["channels"]), name


def test_length_not_divisible_raises(tiny):
    x, t = inputs(2, 1, 100)
    with pytest.raises(ValueError, match=r"L=100 is not divisible by patch_size=16"):
        tiny(x, t)
    with pytest.raises(ValueError, match=r"L=100 is not divisible by patch_size=16"):
        tiny.forward_features(x, t, layers="down.0")
    with pytest.raises(ValueError, match=r"\[N x 1 x L\]"):
        tiny(torch.zeros(2, 2, 64), t)
    with pytest.raises(ValueError, match=r"\[N x 1 x L\]"):
        tiny(torch.zeros(2, 64), t)


def test_default_preset_and_override_errors():
    assert 6_000_000 <= sum(p.numel() for p in AudioDiT.from_preset("default").parameters()) <= 10_000_000
    with pytest.raises(TypeError, match="'patchsize'"):
        AudioDiT.from_preset("tiny", patchsize=8)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"patch_size": 2.0}, "patch_size must be a positive int"),
        ({"hidden_dim": -8}, "hidden_dim must be a positive int"),
        ({"depth": 0}, "depth must be a positive int"),
        ({"num_heads": True}, "num_heads must be a positive int"),
        ({"out_channels": 0}, "out_channels"),
        ({"num_classes": 0}, "num_classes"),
        ({"context_dim": -1}, "context_dim"),
        ({"hidden_dim": 64, "num_heads": 6}, "hidden_dim=64 is not divisible by num_heads=6"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"mlp_ratio": "4"}, "mlp_ratio"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_classes": 10, "context_dim": 8}, "exclusive"),
        ({"attention_backend": "flash"}, "attention_backend='flash'.*sdpa.*xformers"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing"),
        ({"front_end": "stft"}, "front_end must be one of waveform, spectrum, got 'stft'"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        AudioDiTConfig(**fields)


# ---------------------------------------------------------------- adaLN-Zero init


@pytest.mark.parametrize("overrides", [{}, {"num_classes": 5}, {"context_dim": 6}])
def test_output_is_exactly_zero_at_init(overrides):
    torch.manual_seed(0)
    net = AudioDiT.from_preset("tiny", **overrides).eval()
    x, t = inputs(2, 1, 64)
    cond = torch.randn(2, 3, 6) if "context_dim" in overrides else None
    assert torch.equal(net(x, t, cond), torch.zeros_like(x))
    # every block is the identity at init: all taps equal the embedded patches + positions
    feats = net.forward_features(x, t, cond, layers="all")
    first = feats["down.0"]
    assert first.abs().amax() > 0
    for name in net.feature_layers:
        assert torch.equal(feats[name], first), name
    assert not torch.equal(perturbed(net)(x, t, cond), torch.zeros_like(x))


def test_positions_break_token_permutation_symmetry(tiny):
    # without positional embeddings a transformer is permutation-equivariant over tokens
    x, t = inputs(1, 1, 64)
    perm = torch.tensor([2, 0, 3, 1])
    x_perm = unpatchify(patchify(x, 16)[:, perm], 16, 1)
    v_perm = patchify(tiny(x_perm, t), 16)
    assert (v_perm - patchify(tiny(x, t), 16)[:, perm]).abs().amax() > 1e-4


# ---------------------------------------------------------------- taps and early exit


@pytest.mark.parametrize(
    "depth,names",
    [
        (1, ("mid",)),
        (2, ("down.0", "mid")),
        (4, ("down.0", "down.1", "mid", "up.0")),
        (5, ("down.0", "down.1", "mid", "up.0", "up.1")),
    ],
)
def test_tap_names(depth, names):
    assert tap_names(depth) == names
    net = AudioDiT.from_preset("tiny", depth=depth)
    assert net.feature_layers == names
    assert set(net.feature_info) == set(names)
    assert net.feature_layers.index("mid") == depth // 2


@pytest.mark.parametrize("depth", [4, 5])
def test_early_exit_runs_only_blocks_up_to_the_tap(depth):
    net = perturbed(AudioDiT.from_preset("tiny", depth=depth))
    x, t = inputs(1, 1, 64)
    m = depth // 2
    for layers, last in [("mid", m), ("down.0", 0), ("encoder", m - 1), (("down.1", "mid"), m)]:
        counts = block_calls(net, lambda layers=layers: net.forward_features(x, t, layers=layers))
        assert counts == {f"blocks.{i}": int(i <= last) for i in range(depth)} | {"final_layer": 0}, layers
    counts = block_calls(net, lambda: net.forward_features(x, t, layers="mid", stop_early=False))
    assert set(counts.values()) == {1}
    assert set(block_calls(net, lambda: net(x, t)).values()) == {1}


@pytest.mark.parametrize("depth", [4, 5])
def test_early_exit_features_match_full_forward(depth):
    net = perturbed(AudioDiT.from_preset("tiny", depth=depth, num_classes=3))
    x, t = inputs(2, 1, 64)
    y = torch.tensor([0, 2])
    full = check_early_exit(net, x, t, y)
    # the last tap is the input of the final layer
    assert torch.equal(
        unpatchify(net.final_layer(full[net.feature_layers[-1]], _cond_vector(net, t, y)), 16, 1), net(x, t, y)
    )
    # taps differ from each other once the blocks are not the identity
    assert (full["mid"] - full["down.0"]).abs().amax() > 1e-4


def _cond_vector(net: AudioDiT, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """c = MLP(timestep_embedding(t)) + label embedding, read from the first block's adaLN input."""
    seen = []
    h = net.blocks[0].adaLN.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        net.forward_features(torch.zeros(len(t), 1, 16), t, y, layers="down.0")
    finally:
        h.remove()
    return seen[0]


# ---------------------------------------------------------------- the SP objective


def test_self_perceptual_loss_trains_through_audio_dit():
    net = perturbed(AudioDiT.from_preset("tiny")).train()
    frozen = make_perceptual(net)
    schedule = NoiseSchedule.scaled_linear(num_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    sp = SelfPerceptual(schedule, frozen, layers="mid")
    x0, t = inputs(2, 1, 64)
    loss = sp(net, x0, t=t, t_prime=torch.tensor([10, 900]))
    assert loss.shape == (2,) and (loss > 0).all()
    loss.mean().backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert net.final_layer.linear.weight.grad.abs().amax() > 0
    # eq. 13: with t' = t the predicted and ground-truth inputs coincide, so the loss vanishes
    same = sp(net, x0, t=t, t_prime=t)
    torch.testing.assert_close(same, torch.zeros(2), rtol=0, atol=1e-8)


# ---------------------------------------------------------------- checkpoints from before backbones/transformer.py

_ATTN = ["to_q.weight", "to_kv.weight", "to_out.weight", "to_out.bias"]
_MLP_ADALN = ["mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias", "adaLN.1.weight", "adaLN.1.bias"]
_CROSS = ["norm_cross.weight", "norm_cross.bias"] + [f"cross_attn.{k}" for k in _ATTN]


def _keys(depth: int, label: bool, cross: bool) -> list[str]:
    """The state_dict keys of an AudioDiT as written before the refactor, in order."""
    block = [f"attn.{k}" for k in _ATTN] + (_CROSS if cross else []) + _MLP_ADALN
    return (["time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias"]
            + (["label_embed.weight"] if label else []) + ["patch_embed.weight", "patch_embed.bias"]
            + [f"blocks.{i}.{k}" for i in range(depth) for k in block]
            + ["final_layer.adaLN.1.weight", "final_layer.adaLN.1.bias",
               "final_layer.linear.weight", "final_layer.linear.bias"])


@pytest.mark.parametrize("overrides,label,cross", [({"num_classes": 3}, True, False),
                                                  ({"context_dim": 8, "depth": 2}, False, True)])
def test_weights_keep_the_names_of_old_checkpoints(overrides, label, cross):
    """The names of an AudioDiT's weights, in order, are those written before the refactor; its
    outputs for the same weights are checked in tests/test_backbone_digests.py (audio-*)."""
    net = AudioDiT.from_preset("tiny", **overrides)
    assert list(net.state_dict()) == _keys(net.config.depth, label, cross)


# ---------------------------------------------------------------- the spectrum front end


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 3), half=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_spectrum_is_orthonormal_and_inverted_exactly(n, c, half, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, 2 * half, generator=g, dtype=torch.float64)
    y = spectrum(x)
    assert y.shape == (n, 2 * c, half) and y.dtype == torch.float64
    torch.testing.assert_close(y.square().sum(), x.square().sum(), rtol=1e-12, atol=1e-12)  # Parseval
    torch.testing.assert_close(inverse_spectrum(y), x, rtol=0, atol=1e-12)
    z = torch.randn(n, 2 * c, half, generator=g, dtype=torch.float64)  # every packed array is a spectrum
    torch.testing.assert_close(spectrum(inverse_spectrum(z)), z, rtol=0, atol=1e-12)
    # linear, with the matrix orthogonal: inner products are kept too
    w = torch.randn(n, c, 2 * half, generator=g, dtype=torch.float64)
    torch.testing.assert_close((spectrum(x) * spectrum(w)).sum(), (x * w).sum(), rtol=1e-10, atol=1e-10)


def test_a_tone_is_a_few_bins_of_the_spectrum():
    length, rate, f0 = 2048, 8000, 440.0
    t = torch.arange(length, dtype=torch.float64) / rate
    x = torch.sin(2 * torch.pi * f0 * t + 0.3)[None, None]
    y = spectrum(x)[0]
    energy = y.square().sum(0)  # per bin, real and imaginary parts together
    k = round(f0 * length / rate)  # bin 112.6 -> 113
    assert energy.argmax().item() in (k - 1, k)
    # 6 of 1024 bins hold 94.5% of the energy (the rest is the leakage of a clip that does not hold
    # a whole number of periods), 16 bins 97.9%
    assert energy[k - 3:k + 3].sum() / energy.sum() > 0.94
    assert energy[k - 8:k + 8].sum() / energy.sum() > 0.97


def test_spectrum_front_end_shapes_taps_and_errors():
    net = perturbed(AudioDiT.from_preset("tiny", front_end="spectrum", patch_size=8, num_classes=4))
    x, t = inputs(2, 1, 256)
    v = net(x, t, torch.tensor([0, 3]))
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()
    assert net.feature_info["mid"] == {"channels": 64, "reduction": 16}
    feats = net.forward_features(x, t, torch.tensor([0, 3]), layers="all")
    assert all(f.shape == (2, 256 // 16, 64) for f in feats.values())  # 128 bins in tokens of 8
    assert net.patch_embed.in_features == 2 * 8 and net.final_layer.linear.out_features == 2 * 8
    with pytest.raises(ValueError, match=r"L=200 is not divisible by 2 x patch_size=16 \(the spectrum front end"):
        net(*inputs(2, 1, 200))
    # a fresh net still outputs exactly zero (the inverse of a zero spectrum)
    assert torch.equal(AudioDiT.from_preset("tiny", front_end="spectrum")(x, t), torch.zeros_like(x))
    # no parameters of its own: the weights have the waveform net's names
    assert net.state_dict().keys() == perturbed(AudioDiT.from_preset("tiny", patch_size=8, num_classes=4)).state_dict().keys()
