"""The `Denoiser` contract, checked the same way for every backbone in the `backbones` registry.

Each registered backbone needs a case below (a tiny net, an input and a condition); a backbone
added to the registry without one fails `test_every_registered_backbone_has_a_case`, so the
contract cannot be skipped by accident. The checks are what the objectives and the trainer rely
on: shapes, taps, early exit that computes nothing after the last tap, gradients through a
frozen copy to its input only, determinism, batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from backbones import BACKBONES, build_backbone
from backbones.base import Backbone
from perceptual_diffusion import make_perceptual
from perceptual_diffusion.denoiser import TappedDenoiser

from helpers import randomise_zero_init


@dataclass
class Case:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]            # one sample (C, ...)
    cond: Callable[[nn.Module, int], Any]  # (net, batch) -> cond


def _labels(net: nn.Module, n: int) -> Tensor:
    return torch.arange(n) % 3


def _diffusers_case() -> Case:
    pytest.importorskip("diffusers")

    def build() -> nn.Module:
        net = build_backbone("diffusers_unet", "tiny")
        d = net.unet.config.cross_attention_dim
        net.set_null_context(torch.randn(1, 5, d, generator=torch.Generator().manual_seed(1)))
        return net

    def cond(net: nn.Module, n: int) -> Tensor:
        return torch.randn(n, 5, net.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))

    return Case(build, (4, 8, 8), cond)


CASES: dict[str, Callable[[], Case]] = {
    "image_unet": lambda: Case(lambda: build_backbone("image_unet", "tiny", in_channels=1, num_classes=3),
                               (1, 16, 16), _labels),
    "video_unet": lambda: Case(lambda: build_backbone("video_unet", "tiny", in_channels=1, num_classes=3),
                               (1, 4, 16, 16), _labels),
    "audio_dit": lambda: Case(lambda: build_backbone("audio_dit", "tiny", in_channels=1, num_classes=3),
                              (1, 256), _labels),
    "diffusers_unet": _diffusers_case,
}


def test_every_registered_backbone_has_a_case():
    missing = sorted(set(BACKBONES) - set(CASES))
    assert not missing, f"add a conformance case for {missing}"


@pytest.fixture(params=sorted(BACKBONES))
def case(request) -> tuple[str, nn.Module, Case]:
    torch.manual_seed(0)
    c = CASES[request.param]()
    return request.param, randomise_zero_init(c.build()).eval(), c


def _inputs(net: nn.Module, c: Case, n: int = 2) -> tuple[Tensor, Tensor, Any]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, *c.shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t, c.cond(net, n)


def test_output_shape_equals_input_shape(case):
    _, net, c = case
    for n in (1, 2):
        x, t, cond = _inputs(net, c, n)
        with torch.no_grad():
            v = net(x, t, cond)
        assert v.shape == x.shape
        assert torch.isfinite(v).all()


def test_feature_layers_name_the_taps(case):
    _, net, _ = case
    layers = tuple(net.feature_layers)
    assert layers and "mid" in layers
    assert len(set(layers)) == len(layers)
    assert all(name == "mid" or name.split(".")[0] in ("down", "up") for name in layers)


def test_early_exit_features_equal_full_forward_features(case):
    _, net, c = case
    x, t, cond = _inputs(net, c)
    with torch.no_grad():
        full = net.forward_features(x, t, cond, layers=net.feature_layers, stop_early=False)
        for name in net.feature_layers:
            early = net.forward_features(x, t, cond, layers=name, stop_early=True)
            assert early.keys() == {name}
            torch.testing.assert_close(early[name], full[name], rtol=0, atol=0)


def _leaf_calls(net: nn.Module, fn: Callable[[], Any], calls: list[str] | None = None) -> list[str]:
    """The names of the leaf modules `fn` calls, in call order (appended to `calls`)."""
    calls = [] if calls is None else calls
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: calls.append(name))
               for name, m in net.named_modules() if not list(m.children())]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return calls


def test_nothing_after_mid_runs(case):
    """The leaf modules an early exit at "mid" calls are exactly those a full forward calls up
    to the moment the "mid" tap is reached, in the same order."""
    _, net, c = case
    assert isinstance(net, TappedDenoiser)
    x, t, cond = _inputs(net, c)
    calls_at_mid: list[int] = []
    calls: list[str] = []

    def tap(name: str, h: Tensor) -> Tensor:
        if name == "mid":
            calls_at_mid.append(len(calls))
        return h

    with torch.no_grad():
        _leaf_calls(net, lambda: net._run(x, t, cond, tap), calls)
        early = _leaf_calls(net, lambda: net.forward_features(x, t, cond, layers="mid"))
    assert len(calls_at_mid) == 1
    assert early == calls[:calls_at_mid[0]]
    assert len(early) < len(calls)


def test_gradients_reach_the_input_through_a_frozen_copy_only(case):
    _, net, c = case
    frozen = make_perceptual(net)
    x, t, cond = _inputs(net, c)
    x.requires_grad_(True)
    feats = frozen.forward_features(x, t, cond, layers="mid")["mid"]
    feats.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    assert all(p.grad is None for p in net.parameters())  # the online net shares nothing with the copy


def test_deterministic_in_eval_mode(case):
    _, net, c = case
    x, t, cond = _inputs(net, c)
    with torch.no_grad():
        a, b = net(x, t, cond), net(x, t, cond)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batch_size_one_matches_the_batched_call(case):
    _, net, c = case
    x, t, cond = _inputs(net, c, 2)
    with torch.no_grad():
        both = net(x, t, cond)
        first = net(x[:1], t[:1], cond[:1] if isinstance(cond, Tensor) else cond)
    torch.testing.assert_close(first, both[:1], rtol=1e-4, atol=1e-5)


# ------------------------------------------- conditioning of the library's own backbones (base.Backbone)

OWN = sorted(name for name, cls in BACKBONES.items() if isinstance(cls, type) and issubclass(cls, Backbone))


def _own(name: str, **overrides: Any) -> tuple[nn.Module, Tensor, Tensor]:
    """A perturbed tiny `name` with `overrides`, and an input batch of 2 of its case's shape."""
    torch.manual_seed(0)
    net = randomise_zero_init(build_backbone(name, "tiny", in_channels=1, **overrides)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every path carries signal, not only the zero-initialised ones
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    shape = CASES[name]().shape
    return net, torch.randn(2, *shape, generator=g), torch.randint(0, 1000, (2,), generator=g)


def test_own_backbones_are_the_image_video_and_audio_ones():
    assert OWN == ["audio_dit", "image_unet", "video_unet"]


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
def test_a_bfloat16_copy_accepts_float32_inputs(name):
    net, x, t = _own(name, num_classes=10)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        ref = net(x, t, y)
        half = make_perceptual(net, dtype=torch.bfloat16)  # how the trainer stores the frozen copy
        v = half(x, t, y)
        assert v.dtype == torch.float32
        assert (v - ref).abs().amax() < 0.05 * ref.abs().amax() + 0.05
        assert half.forward_features(x, t, y, layers="mid")["mid"].dtype == torch.bfloat16
