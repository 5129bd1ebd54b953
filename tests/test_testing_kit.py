"""The conformance kit itself: a backbone with only the protocol passes (its optional checks skip
with a reason), so do a hooked foreign module and a hand-written `Denoiser`, each broken backbone
fails the check for what it breaks, and importing the kit collects nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from perceptual_diffusion import HookedDenoiser, TappedDenoiser, resolve_layers
from perceptual_diffusion.testing import DenoiserConformance, one_thread

pytest_plugins = ["pytester"]

WIDTH = 8


class Foreign(nn.Module):
    """A module written without the library: forward(x, t) -> v, with its stages as submodules."""

    def __init__(self, channels: int = 2):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, WIDTH, 3, padding=1)
        self.t_embed = nn.Linear(1, WIDTH)
        self.down = nn.Sequential(nn.Conv2d(WIDTH, WIDTH, 3, stride=2, padding=1), nn.Tanh())
        self.mid = nn.Sequential(nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.Tanh())
        self.up = nn.Sequential(nn.ConvTranspose2d(WIDTH, WIDTH, 2, stride=2), nn.Tanh())
        self.conv_out = nn.Conv2d(WIDTH, channels, 3, padding=1)

    def stem(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(self.conv_in(x) + self.t_embed(t.float()[:, None] / 1000)[:, :, None, None])

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.conv_out(self.up(self.mid(self.down(self.stem(x, t)))))


class Minimal(TappedDenoiser):
    """Only the protocol: taps down.0, mid, up.0; no condition, preset, checkpointing,
    feature_info, nor inputs cast to the parameter dtype."""

    feature_layers = ("down.0", "mid", "up.0")

    def __init__(self) -> None:
        super().__init__()
        self.net = Foreign()

    def _mid(self, h: Tensor) -> Tensor:
        return self.net.mid(h)

    def _run(self, x, t, cond, tap):
        h = tap("down.0", self.net.down(self.net.stem(x, t)))
        h = tap("mid", self._mid(h))
        return self.net.conv_out(tap("up.0", self.net.up(h)))


class Labelled(Minimal):
    """Class labels (no null_cond), gradient checkpointing of the midblock, feature_info."""

    feature_info = {"down.0": {"channels": WIDTH, "reduction": 2}, "mid": {"channels": WIDTH, "reduction": 2},
                    "up.0": {"channels": WIDTH, "reduction": 1}}

    def __init__(self, gradient_checkpointing: bool = False):
        super().__init__()
        self.labels = nn.Embedding(4, 2 * 8 * 8)
        self.gradient_checkpointing = gradient_checkpointing

    def _mid(self, h: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(self.net.mid, h, use_reentrant=False)
        return self.net.mid(h)

    def _run(self, x, t, cond, tap):
        return super()._run(x + self.labels(cond).view(x.shape), t, None, tap)


class HandWritten(nn.Module):
    """The protocol written out by hand, without TappedDenoiser or HookedDenoiser."""

    feature_layers = ("down.0", "mid", "up.0")

    def __init__(self) -> None:
        super().__init__()
        self.net = Foreign()

    def forward(self, x, t, cond=None):
        return self.net(x, t)

    def forward_features(self, x, t, cond=None, *, layers, stop_early=True):
        names, feats = resolve_layers(layers, self.feature_layers), {}
        h = self.net.stem(x, t)
        for name, stage in zip(self.feature_layers, (self.net.down, self.net.mid, self.net.up)):
            h = feats[name] = stage(h)
            if stop_early and set(names) <= set(feats):
                break
        else:
            self.net.conv_out(h)
        return {n: feats[n] for n in names}


def _labels(n: int) -> Tensor:
    return torch.arange(n) % 4


class TestMinimal(DenoiserConformance):
    input_shape = (2, 8, 8)

    def make_denoiser(self):
        return Minimal()


class TestLabelled(DenoiserConformance):
    input_shape = (2, 8, 8)

    def make_denoiser(self):
        return Labelled()

    def make_cond(self, n):
        return _labels(n)

    def make_checkpointed_denoiser(self):
        return Labelled(gradient_checkpointing=True)


class TestHooked(DenoiserConformance):
    input_shape = (2, 8, 8)

    def make_denoiser(self):
        return HookedDenoiser(Foreign(), {"down.0": "down", "mid": "mid", "up.0": "up"})


class TestHandWritten(DenoiserConformance):
    input_shape = (2, 8, 8)

    def make_denoiser(self):
        return HandWritten()


@pytest.mark.parametrize("check, reason", [
    ("test_the_condition_changes_the_output", "Minimal takes no condition"),
    ("test_none_means_the_null_condition", "Minimal takes no condition"),
    ("test_gradient_checkpointing_changes_neither_outputs_nor_gradients",
     "Minimal does not offer gradient checkpointing"),
    ("test_feature_info_describes_the_taps", "Minimal has no feature_info"),
    ("test_a_bfloat16_copy_takes_float32_inputs", "bfloat16 copy does not run on float32 inputs"),
])
def test_a_protocol_only_backbone_skips_the_optional_checks_with_the_reason(check, reason):
    with one_thread(), pytest.raises(pytest.skip.Exception, match=reason):
        getattr(TestMinimal(), check)()


def test_a_condition_without_null_cond_skips_the_none_check():
    with one_thread(), pytest.raises(pytest.skip.Exception, match="Labelled has no null_cond"):
        TestLabelled().test_none_means_the_null_condition()


# ------------------------------------------------------------------ broken backbones

class WrongOrder(Minimal):
    feature_layers = ("down.0", "up.0", "mid")  # mid runs before up.0


class RunsPastTheTap(Minimal):
    def forward_features(self, x, t, cond=None, *, layers, stop_early=True):
        return super().forward_features(x, t, cond, layers=layers, stop_early=False)


class HandWrittenRunsPastTheTap(HandWritten):
    def forward_features(self, x, t, cond=None, *, layers, stop_early=True):
        return super().forward_features(x, t, cond, layers=layers, stop_early=False)


class CutsTheInputGradient(Minimal):
    def _run(self, x, t, cond, tap):
        return super()._run(x.detach(), t, cond, tap)


class Noisy(Minimal):
    def _mid(self, h):
        return nn.functional.dropout(super()._mid(h), 0.1, training=True)


class BatchCoupled(Minimal):
    def _mid(self, h):
        return super()._mid(h - 0.5 * h.mean(0, keepdim=True))


class SharesItsWeights(Minimal):
    def __deepcopy__(self, memo):
        return self


class GradModeDependent(Minimal):
    """Like a kernel that is picked differently when autograd records: the predicted branch of
    L_sp (with grad) and the ground-truth branch (no_grad) no longer see the same net."""

    def _mid(self, h):
        return super()._mid(h) + 1e-3 * torch.is_grad_enabled()


class WrongFeatureInfo(Labelled):
    feature_info = {**Labelled.feature_info, "mid": {"channels": WIDTH, "reduction": 4}}


class CheckpointingCutsTheGraph(Labelled):
    def _mid(self, h):
        return super()._mid(h.detach() if self.gradient_checkpointing else h)


def _kit(make: Any, conditioned: bool = False) -> DenoiserConformance:
    body = {"input_shape": (2, 8, 8), "make_denoiser": lambda self: make()}
    if conditioned:
        body["make_cond"] = lambda self, n: _labels(n)
        body["make_checkpointed_denoiser"] = lambda self: make(gradient_checkpointing=True)
    return type(f"Kit{make.__name__}", (DenoiserConformance,), body)()


@pytest.mark.parametrize("net, check, message", [
    (WrongOrder, "test_feature_layers_name_the_taps_in_execution_order",
     r"taps are reached in the order \['down.0', 'mid', 'up.0'\], feature_layers says"),
    (RunsPastTheTap, "test_nothing_after_the_last_requested_tap_runs", r"layers=\('down.0',\)\) runs \d+ module call"),
    (HandWrittenRunsPastTheTap, "test_nothing_after_the_last_requested_tap_runs",
     "stop_early=True at 'mid' runs no further than at the tap before it"),
    (CutsTheInputGradient, "test_gradients_reach_the_input_through_a_frozen_copy_only",
     "no gradient reaches the input"),
    (Noisy, "test_deterministic_in_eval_mode", "two eval forwards differ"),
    (BatchCoupled, "test_a_batch_of_one_matches_the_batched_call", "item 0 alone differs"),
    (SharesItsWeights, "test_a_deep_copy_computes_the_same_and_owns_its_weights", "changes the original"),
    (GradModeDependent, "test_self_perceptual_loss_and_gradient_vanish_at_t_prime_equal_t", "not 0"),
    (GradModeDependent, "test_self_perceptual_loss_vanishes_exactly_on_the_items_with_t_prime_equal_t", "L_sp = "),
])
def test_a_broken_backbone_fails_the_matching_check(net, check, message):
    with one_thread(), pytest.raises(AssertionError, match=message):
        getattr(_kit(net), check)()


@pytest.mark.parametrize("net, check, message", [
    (Minimal, "test_the_condition_changes_the_output", "the condition is ignored"),
    (WrongFeatureInfo, "test_feature_info_describes_the_taps", r"tap 'mid' .* reduction 4, as feature_info says"),
    (CheckpointingCutsTheGraph, "test_gradient_checkpointing_changes_neither_outputs_nor_gradients",
     "checkpointing changes which tensors get gradients"),
])
def test_a_broken_conditional_backbone_fails_the_matching_check(net, check, message):
    with one_thread(), pytest.raises(AssertionError, match=message):
        getattr(_kit(net, conditioned=True), check)()


# ------------------------------------------------------------------ collection

def test_importing_the_kit_collects_nothing_and_a_subclass_collects_every_check(pytester):
    pytester.makepyfile(test_only_import="from perceptual_diffusion.testing import DenoiserConformance\n")
    result = pytester.runpytest_inprocess("--collect-only", "-q", "test_only_import.py")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED, result.stdout.str()
    checks = sorted(n for n in dir(DenoiserConformance) if n.startswith("test_"))
    pytester.makepyfile(test_mine="""
        from perceptual_diffusion.testing import DenoiserConformance, one_thread

        class TestMine(DenoiserConformance):
            input_shape = (1, 4)
    """)
    result = pytester.runpytest_inprocess("--collect-only", "-q", "test_mine.py")
    collected = sorted(line.split("::")[-1] for line in result.stdout.lines if "::" in line)
    assert collected == checks and len(checks) == 15
