"""The `Denoiser` contract for every backbone in the `backbones` registry, and the conditioning
rules of the library's own backbones (`base.Backbone`).

Each registry entry gets a `DenoiserConformance` subclass built from its class's
`conformance_example()` (a tiny net, one sample's shape, a condition): registering a backbone is
enough to have it checked, as a user checks theirs with the same kit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from backbones import BACKBONES
from backbones.base import Backbone, ConformanceExample
from perceptual_diffusion import make_perceptual
from perceptual_diffusion.denoiser import Denoiser
from perceptual_diffusion.testing import DenoiserConformance, one_thread, randomise_zero_init


@pytest.fixture(autouse=True)
def _tiny_nets_on_one_thread():
    with one_thread():
        yield


def _conformance(name: str, example: ConformanceExample) -> type[DenoiserConformance]:
    """The kit's checks on `example` (the registry entry `name`)."""
    body: dict[str, Any] = {"__module__": __name__, "input_shape": example.input_shape,
                            "make_denoiser": lambda self: example.build()}
    if example.make_cond is not None:
        body["make_cond"] = lambda self, n: example.make_cond(n)
    if example.checkpointing:
        body["make_checkpointed_denoiser"] = lambda self: example.build(gradient_checkpointing=True)
    return type(f"Test_{name}", (DenoiserConformance,), body)


globals().update({f"Test_{name}": _conformance(name, cls.conformance_example()) for name, cls in BACKBONES.items()})


def _spectrum_example() -> ConformanceExample:
    """AudioDiT with its spectrum front end: the tokens are frequency bins, not stretches of time."""
    example = BACKBONES["audio_dit"].conformance_example()
    return dataclasses.replace(example, build=lambda **kw: example.build(front_end="spectrum", **kw))


Test_audio_dit_spectrum = _conformance("audio_dit_spectrum", _spectrum_example())


# ------------------------------------------- conditioning of the library's own backbones (base.Backbone)

OWN = sorted(name for name, cls in BACKBONES.items() if isinstance(cls, type) and issubclass(cls, Backbone))


def _own(name: str, **overrides: Any) -> tuple[nn.Module, Tensor, Tensor]:
    """A perturbed tiny `name` with `overrides`, and an input batch of 2 of its example's shape."""
    shape = BACKBONES[name].conformance_example().input_shape
    torch.manual_seed(0)
    net = randomise_zero_init(BACKBONES[name].from_preset("tiny", in_channels=shape[0], **overrides)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every path carries signal, not only the zero-initialised ones
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net, torch.randn(2, *shape, generator=g), torch.randint(0, 1000, (2,), generator=g)


@pytest.mark.parametrize("name", OWN)
def test_class_labels_condition_and_none_means_the_null_label(name):
    net, x, t = _own(name, num_classes=10)
    with torch.no_grad():
        a, b = net(x, t, torch.tensor([1, 2])), net(x, t, torch.tensor([3, 4]))
        assert (a - b).abs().amax() > 1e-3
        assert torch.equal(a, net(x, t, torch.tensor([1, 2])))
        null = net.null_cond(torch.tensor([1, 2]))
        assert torch.equal(null, torch.tensor([10, 10]))
        torch.testing.assert_close(net(x, t, None), net(x, t, null))


@pytest.mark.parametrize("name", OWN)
def test_contexts_of_any_length_condition_and_bad_ones_raise(name):
    net, x, t = _own(name, context_dim=12)
    ctx = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = net(x, t, ctx), net(x, t, ctx + 1.0)
        assert a.shape == x.shape and (a - b).abs().amax() > 1e-3
        assert net(x, t, torch.randn(2, 7, 12)).shape == x.shape
    with pytest.raises(ValueError, match="explicit uncond"):
        net.null_cond(ctx)
    with pytest.raises(ValueError, match=r"\(N, L, 12\)"):
        net(x, t, torch.randn(2, 5, 11))
    with pytest.raises(ValueError, match="needs a context"):
        net(x, t)
    with pytest.raises(ValueError, match="context of batch 3 for a batch of 2"):
        net(x, t, torch.randn(3, 5, 12))


@pytest.mark.parametrize("name", OWN)
def test_wrong_conditions_raise(name):
    net, x, t = _own(name, num_classes=10)
    plain, _, _ = _own(name)
    with pytest.raises(TypeError, match="no num_classes"):
        plain(x, t, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="no cross-attention"):
        net(x, t, torch.randn(2, 4, 8))
    with pytest.raises(TypeError, match="list"):
        net(x, t, [1, 2])
    with pytest.raises(TypeError, match="dtype"):
        net(x, t, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        net(x, t, torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match="3 class labels for a batch of 2"):
        net(x, t, torch.tensor([1, 2, 3]))
    assert plain.null_cond(None) is None


@pytest.mark.parametrize("name", OWN)
def test_eval_is_deterministic_and_train_mode_applies_dropout(name):
    net, x, t = _own(name, dropout=0.3)
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    assert not torch.equal(net(x, t), net(x, t))


@pytest.mark.parametrize("name", OWN)
def test_a_bfloat16_copy_returns_float32_and_computes_in_bfloat16(name):
    """What the own backbones add to the kit's bfloat16 check: v in the input's dtype, taps in the
    copy's (the memory saving is real)."""
    net, x, t = _own(name, num_classes=10)
    half = make_perceptual(net, dtype=torch.bfloat16)
    with torch.no_grad():
        assert half(x, t, torch.tensor([1, 2])).dtype == torch.float32
        assert half.forward_features(x, t, torch.tensor([1, 2]), layers="mid")["mid"].dtype == torch.bfloat16


# ------------------------------------------- presets, construction, taps, batches and checkpointing of the own backbones


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", OWN)
def test_presets_grow_from_tiny_to_default(name):
    cls = BACKBONES[name]
    assert list(cls.PRESETS)[0] == "tiny" and list(cls.PRESETS)[-1] == "default"
    counts = [_params(cls.from_preset(preset)) for preset in cls.PRESETS]
    assert counts[0] < 1_000_000
    assert counts == sorted(set(counts)), dict(zip(cls.PRESETS, counts))  # strictly increasing
    default = cls.PRESETS["default"]
    assert default == type(default)()  # the config class's defaults are the "default" preset
    assert isinstance(cls.from_preset("tiny"), Denoiser)


@pytest.mark.parametrize("name", OWN)
def test_construction_styles_agree_and_bad_names_raise(name):
    cls = BACKBONES[name]
    cfg = cls.PRESETS["tiny"]
    assert cls(cfg).config == cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}).config
    assert cls(cfg, dropout=0.1).config.dropout == 0.1
    with pytest.raises(ValueError, match=".*".join(cls.PRESETS)):
        cls.from_preset("huge")
    with pytest.raises(TypeError, match="'not_a_field'"):
        cls.from_preset("tiny", not_a_field=8)


@pytest.mark.parametrize("name", OWN)
def test_layer_groups_select_taps_in_execution_order(name):
    net, x, t = _own(name)
    layers = net.feature_layers
    m = layers.index("mid")
    expected = {
        "encoder": layers[:m],
        "decoder": layers[m + 1:],
        "encoder+mid": layers[:m + 1],
        "mid": ("mid",),
        (layers[-1], layers[0]): (layers[0], layers[-1]),  # execution order, not the order asked in
    }
    with torch.no_grad():
        for spec, names in expected.items():
            assert tuple(net.forward_features(x[:1], t[:1], layers=spec)) == names, spec
    with pytest.raises(ValueError, match="unknown feature layer"):
        net.forward_features(x, t, layers="up.9")


# (rtol, atol) of an item alone against the batch, where the default (1e-5, 1e-6) is too tight: the
# sums of a batch of 2 and of 1 are blocked differently, and the UNets add more of them
_BATCH_TOLERANCE = {"image_unet": (1e-5, 1e-5), "video_unet": (1e-4, 1e-5)}


@pytest.mark.parametrize("name", OWN)
def test_an_item_alone_matches_the_batch_and_a_scalar_t_broadcasts(name):
    net, x, t = _own(name, num_classes=10)
    y = torch.tensor([4, 5])
    rtol, atol = _BATCH_TOLERANCE.get(name, (1e-5, 1e-6))
    with torch.no_grad():
        both = net(x, t, y)
        one = net(x[:1], t[:1], y[:1])
        assert one.shape == (1, *x.shape[1:])
        torch.testing.assert_close(one, both[:1], rtol=rtol, atol=atol)
        assert torch.equal(net(x[:1], t[0], y[:1]), one)


@pytest.mark.parametrize("name", OWN)
def test_gradient_checkpointing_recomputes_every_block_and_changes_nothing(name):
    """Each block of SHARD_UNITS runs twice with checkpointing (once more in backward), once without;
    outputs are equal and gradients (parameters and context) equal up to rounding."""
    plain, x, t = _own(name, context_dim=8)
    plain.train()
    ckpt = BACKBONES[name].from_preset("tiny", in_channels=x.shape[1], context_dim=8, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train()
    ctx = torch.randn(2, 3, 8, requires_grad=True)
    outs, grads = [], []
    for net in (plain, ckpt):
        units = [m for m in net.modules() if type(m).__name__ in BACKBONES[name].SHARD_UNITS]
        calls = [0] * len(units)
        hooks = [m.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
                 for i, m in enumerate(units)]
        ctx.grad = None
        v = net(x, t, ctx)
        v.square().mean().backward()
        for h in hooks:
            h.remove()
        outs.append(v.detach())
        grads.append([p.grad.clone() for p in net.parameters()] + [ctx.grad.clone()])
        assert units and set(calls) == {2 if net is ckpt else 1}
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
