"""`DenoiserConformance`: the `Denoiser` contract as pytest checks, for any backbone.

    class TestMyNet(DenoiserConformance):
        input_shape = (3, 16, 16)                                 # one sample
        def make_denoiser(self): return MyNet()
        def make_cond(self, n): return torch.arange(n) % 10       # optional: default unconditional

Every check is a test method of the subclass. Optional capabilities are checked when the backbone
offers them and skipped with the reason otherwise: a condition (`make_cond`), a null condition
(the net's `null_cond`), gradient checkpointing (`make_checkpointed_denoiser`), `feature_info`,
and a bfloat16 frozen copy taking float32 inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ..objectives import DISTANCES, SelfPerceptual, make_perceptual
from ..schedule import NoiseSchedule
from .probes import one_thread, randomise_zero_init, record_calls, tap_positions

__all__ = ["DenoiserConformance"]

_EXAMPLES = 5  # hypothesis examples per property: the checks stay fast on tiny nets


class DenoiserConformance:
    """Subclass it, set `input_shape` and define `make_denoiser`; pytest collects the checks.

    Override as needed:
        make_cond(n): a condition for a batch of n (None, the default: unconditional).
        make_checkpointed_denoiser(): the same architecture with gradient checkpointing on (its
            weights are loaded from make_denoiser's); None, the default: not offered.
        select_cond(cond, index): items `index` (a slice) of a condition; handles None, tensors
            and mappings of them.
        num_timesteps (1000), seed (0).

    Nets are built with torch seeded by `seed`, their zero-initialised layers given noise
    (`randomise_zero_init`) so that no check passes on a path that adds exactly 0, and put in eval
    mode; inputs are float32 on the CPU, and each check runs on one thread.
    """

    __test__ = False  # the base holds no backbone; each subclass is collected

    input_shape: tuple[int, ...] = ()
    num_timesteps: int = 1000
    seed: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__test__ = cls.__dict__.get("__test__", True)

    @pytest.fixture(autouse=True)
    def _one_thread(self) -> Iterator[None]:
        with one_thread():
            yield

    # ------------------------------------------------------------------ what a subclass gives
    def make_denoiser(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define make_denoiser()")

    def make_cond(self, n: int) -> Any:
        return None

    def make_checkpointed_denoiser(self) -> nn.Module | None:
        return None

    def select_cond(self, cond: Any, index: slice) -> Any:
        if cond is None:
            return None
        if isinstance(cond, Tensor):
            return cond[index]
        if isinstance(cond, Mapping):
            return {k: self.select_cond(v, index) for k, v in cond.items()}
        raise TypeError(f"cannot take items of a {type(cond).__name__} condition: override select_cond()")

    # ------------------------------------------------------------------ shared pieces
    def _denoiser(self) -> nn.Module:
        if not self.input_shape:
            raise TypeError(f"{type(self).__name__}.input_shape must give one sample's shape, e.g. (3, 16, 16)")
        torch.manual_seed(self.seed)
        return randomise_zero_init(self.make_denoiser(), self.seed).eval()

    def _inputs(self, n: int = 2) -> tuple[Tensor, Tensor, Any]:
        g = torch.Generator().manual_seed(self.seed + n)
        x = torch.randn(n, *self.input_shape, generator=g)
        return x, torch.randint(0, self.num_timesteps, (n,), generator=g), self.make_cond(n)

    def _cond_or_skip(self, net: nn.Module, n: int) -> Any:
        cond = self.make_cond(n)
        if cond is None:
            pytest.skip(f"{_who(net)} takes no condition (make_cond is not defined)")
        return cond

    def _null_problem(self, net: nn.Module, cond: Any) -> str | None:
        """Why cond=None has no meaning for `net` next to `cond` (None: it means `net.null_cond(cond)`)."""
        null_cond = getattr(net, "null_cond", None)
        if null_cond is None:
            return f"{_who(net)} has no null_cond, so cond=None has no unconditional meaning"
        try:
            null_cond(cond)
        except (TypeError, ValueError) as e:
            return f"{_who(net)} has no built-in null condition ({e})"
        return None

    def _sp_conditions(self, net: nn.Module) -> list[str]:
        """The conditions eq. 13 is checked with: "none" (cond=None) where it has a meaning,
        "make_cond" where the backbone takes one."""
        cond = self.make_cond(2)
        if cond is None:
            return ["none"]
        return ["make_cond"] + ([] if self._null_problem(net, cond) else ["none"])

    # ------------------------------------------------------------------ shapes and taps
    def test_output_has_the_input_shape(self):
        net = self._denoiser()
        for n in (1, 2):
            x, t, cond = self._inputs(n)
            with torch.no_grad():
                v = net(x, t, cond)
            assert v.shape == x.shape, f"{_who(net)}: output of shape {tuple(v.shape)} for input {tuple(x.shape)}"
            assert torch.isfinite(v).all(), f"{_who(net)}: non-finite output for a batch of {n}"

    def test_feature_layers_name_the_taps_in_execution_order(self):
        net = self._denoiser()
        layers, who = net.feature_layers, _who(net)
        assert isinstance(layers, tuple) and layers, f"{who}: feature_layers must be a non-empty tuple, got {layers!r}"
        assert len(set(layers)) == len(layers), f"{who}: feature_layers repeats a tap: {layers}"
        odd = [n for n in layers if not _is_tap_name(n)]
        assert not odd, f"{who}: taps {odd} are not named 'mid', 'down.<i>' or 'up.<i>'"
        assert "mid" in layers, f"{who}: no 'mid' tap (the objective's default layer) in {layers}"
        x, t, cond = self._inputs()
        with torch.no_grad():
            feats = net.forward_features(x, t, cond, layers=layers, stop_early=False)
            _, marks = tap_positions(net, x, t, cond)
        assert list(feats) == list(layers), f"{who}: forward_features gave taps {list(feats)}, not {list(layers)}"
        for name, f in feats.items():
            assert isinstance(f, Tensor) and f.shape[0] == 2, f"{who}: tap {name!r} is not a tensor batch of 2"
        if marks is None:  # order seen through early exits instead (see the next check)
            return
        unseen, repeated = [n for n in layers if n not in marks], [n for n in layers if len(marks.get(n, ())) > 1]
        assert not unseen, f"{who}: taps {unseen} are never reached in a forward pass"
        assert not repeated, f"{who}: taps {repeated} are reached more than once in a forward pass"
        reached = sorted(layers, key=lambda n: marks[n][0])
        assert reached == list(layers), f"{who}: taps are reached in the order {reached}, feature_layers says {layers}"

    def test_nothing_after_the_last_requested_tap_runs(self):
        """stop_early=True: the modules called are exactly those a full forward pass calls before it
        reaches the last requested tap, in the same order (forward hooks on every submodule).

        A `Denoiser` that is neither a `TappedDenoiser` nor a `HookedDenoiser` shows no tap
        positions; then each tap's early exit must run a prefix of the full pass that goes further
        than the previous tap's."""
        net = self._denoiser()
        who, layers = _who(net), tuple(net.feature_layers)
        x, t, cond = self._inputs()

        def calls_for(request: Any) -> list[str]:
            return record_calls(net, lambda: net.forward_features(x, t, cond, layers=request))

        with torch.no_grad():
            full, marks = tap_positions(net, x, t, cond)
            alone = {name: calls_for(name) for name in layers}
            if marks is None:
                previous: list[str] = []
                for name in layers:
                    ran = alone[name]
                    assert ran == full[:len(ran)], f"{who}: forward_features(layers={name!r}) {_difference(ran, full)}"
                    assert len(ran) > len(previous), (
                        f"{who}: stop_early=True at {name!r} runs no further than at the tap before it")
                    previous = ran
                until = alone
            else:
                unseen = [n for n in layers if n not in marks]
                assert not unseen, f"{who}: taps {unseen} are never reached in a forward pass"
                until = {name: full[:marks[name][0]] for name in layers}
            for request in [*((n,) for n in layers), layers, (layers[0], "mid")]:
                ran = alone[request[0]] if len(request) == 1 else calls_for(request)
                expected = until[max(request, key=lambda n: len(until[n]))]
                assert ran == expected, f"{who}: forward_features(layers={request}) {_difference(ran, expected)}"

    def test_early_exit_gives_the_full_forward_features(self):
        net = self._denoiser()
        layers = tuple(net.feature_layers)
        x, t, cond = self._inputs()
        with torch.no_grad():
            full = net.forward_features(x, t, cond, layers=layers, stop_early=False)
            together = net.forward_features(x, t, cond, layers=layers, stop_early=True)
            for name in layers:
                early = net.forward_features(x, t, cond, layers=name, stop_early=True)
                assert early.keys() == {name}, f"{_who(net)}: forward_features(layers={name!r}) gave {list(early)}"
                for got, how in ((early[name], "alone"), (together[name], "with every tap")):
                    torch.testing.assert_close(got, full[name], rtol=0, atol=0, msg=lambda m, name=name, how=how: (
                        f"{_who(net)}: tap {name!r} requested {how} with stop_early=True differs from the "
                        f"full forward's: {m}"))

    # ------------------------------------------------------------------ gradients and copies
    def test_gradients_reach_the_input_through_a_frozen_copy_only(self):
        net = self._denoiser()
        frozen, who = make_perceptual(net), _who(net)
        x, t, cond = self._inputs()
        x.requires_grad_(True)
        mid = frozen.forward_features(x, t, cond, layers="mid")["mid"]
        assert mid.requires_grad, f"{who}: no gradient reaches the input through the frozen 'mid' tap (no graph)"
        mid.square().mean().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, (
            f"{who}: no gradient reaches the input through the frozen 'mid' tap")
        assert torch.isfinite(x.grad).all(), f"{who}: non-finite input gradient through the frozen copy"
        leaking = [n for n, p in frozen.named_parameters() if p.requires_grad or p.grad is not None]
        assert not leaking, f"{who}: frozen copy parameters {leaking[:3]} take gradients"
        shared = [n for n, p in net.named_parameters() if p.grad is not None]
        assert not shared, f"{who}: the original's parameters {shared[:3]} got gradients through its frozen copy"

    def test_deterministic_in_eval_mode(self):
        net = self._denoiser()
        x, t, cond = self._inputs()
        with torch.no_grad():
            assert torch.equal(net(x, t, cond), net(x, t, cond)), f"{_who(net)}: two eval forwards differ"
            a, b = (net.forward_features(x, t, cond, layers="mid")["mid"] for _ in range(2))
            assert torch.equal(a, b), f"{_who(net)}: two eval forward_features at 'mid' differ"

    def test_a_batch_of_one_matches_the_batched_call(self):
        net = self._denoiser()
        x, t, cond = self._inputs(2)
        with torch.no_grad():
            both = net(x, t, cond)
            for i in range(2):
                one = net(x[i:i + 1], t[i:i + 1], self.select_cond(cond, slice(i, i + 1)))
                torch.testing.assert_close(one, both[i:i + 1], rtol=1e-4, atol=1e-5, msg=lambda m, i=i: (
                    f"{_who(net)}: item {i} alone differs from item {i} of a batch of 2: {m}"))

    def test_a_deep_copy_computes_the_same_and_owns_its_weights(self):
        net = self._denoiser()
        twin, who = copy.deepcopy(net), _who(net)
        x, t, cond = self._inputs()
        with torch.no_grad():
            ref = net(x, t, cond)
            assert torch.equal(twin(x, t, cond), ref), f"{who}: copy.deepcopy gives a different output"
            for p in twin.parameters():
                if p.is_floating_point():
                    p.add_(1.0)
            assert torch.equal(net(x, t, cond), ref), f"{who}: changing a deep copy's weights changes the original"

    def test_a_bfloat16_copy_takes_float32_inputs(self):
        """How the trainer stores the frozen copy under bf16 (sp.perceptual_dtype); skipped where
        the copy does not run on float32 inputs."""
        net = self._denoiser()
        who = _who(net)
        x, t, cond = self._inputs()
        with torch.no_grad():
            ref, ref_mid = net(x, t, cond), net.forward_features(x, t, cond, layers="mid")["mid"]
            half = make_perceptual(net, dtype=torch.bfloat16)
            try:
                v, mid = half(x, t, cond), half.forward_features(x, t, cond, layers="mid")["mid"]
            except RuntimeError as e:
                pytest.skip(f"{who}: a bfloat16 copy does not run on float32 inputs "
                            f"({str(e).splitlines()[0]}), so the frozen copy cannot be stored in bf16")
        for got, want, what in ((v, ref, "output"), (mid, ref_mid, "'mid' tap")):
            err = (got.float() - want).abs().amax()
            assert err <= 0.05 * want.abs().amax() + 0.05, f"{who}: bfloat16 copy's {what} is off by {err:.3g}"

    # ------------------------------------------------------------------ optional capabilities
    def test_the_condition_changes_the_output(self):
        net = self._denoiser()
        cond = self._cond_or_skip(net, 2)
        x, t, _ = self._inputs(1)
        with torch.no_grad():  # one input twice, with the two conditions of make_cond(2)
            v = net(x.expand(2, *x.shape[1:]).contiguous(), t.expand(2).contiguous(), cond)
        gap = (v[0] - v[1]).abs().amax()
        assert gap > 1e-4 * v.abs().amax(), (
            f"{_who(net)}: the two conditions of make_cond(2) give the same output (largest gap {gap:.3g}): "
            "the condition is ignored, or make_cond repeats one condition")

    def test_none_means_the_null_condition(self):
        net = self._denoiser()
        cond = self._cond_or_skip(net, 2)
        problem = self._null_problem(net, cond)
        if problem:
            pytest.skip(problem)
        x, t, _ = self._inputs(2)
        with torch.no_grad():
            torch.testing.assert_close(net(x, t, None), net(x, t, net.null_cond(cond)), msg=lambda m: (
                f"{_who(net)}: cond=None differs from cond=null_cond(cond): {m}"))

    def test_gradient_checkpointing_changes_neither_outputs_nor_gradients(self):
        plain = self._denoiser().train()
        checkpointed = self.make_checkpointed_denoiser()
        who = _who(plain)
        if checkpointed is None:
            pytest.skip(f"{who} does not offer gradient checkpointing (make_checkpointed_denoiser is not defined)")
        checkpointed.load_state_dict(plain.state_dict())
        checkpointed.train()
        x, t, cond = self._inputs()
        (v0, g0, calls0), (v1, g1, calls1) = (self._training_step(net, x, t, cond) for net in (plain, checkpointed))
        assert calls1 > calls0, f"{who}: with gradient checkpointing on, nothing is recomputed in backward"
        torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{who}: checkpointing changes the output: {m}")
        assert g1.keys() == g0.keys(), (
            f"{who}: checkpointing changes which tensors get gradients: {sorted(g0.keys() ^ g1.keys())[:3]}")
        for name, g in g0.items():
            torch.testing.assert_close(g1[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: (
                f"{who}: checkpointing changes the gradient of {name}: {m}"))

    def _training_step(self, net: nn.Module, x: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, dict[str, Tensor], int]:
        """One forward and backward: the output, the gradients by name (parameters, the input, a
        context) and how many module calls ran (recomputation in backward included)."""
        inputs = {"input": x.clone().requires_grad_(True)}
        if isinstance(cond, Tensor) and cond.is_floating_point():
            cond = inputs["context"] = cond.clone().requires_grad_(True)
        out: list[Tensor] = []

        def step() -> None:
            torch.manual_seed(self.seed)  # the same dropout masks with and without checkpointing
            out.append(net(inputs["input"], t, cond))
            out[0].square().mean().backward()

        calls = record_calls(net, step)
        grads = {n: p.grad for n, p in [*net.named_parameters(), *inputs.items()] if p.grad is not None}
        return out[0].detach(), grads, len(calls)

    def test_feature_info_describes_the_taps(self):
        net = self._denoiser()
        info, who = getattr(net, "feature_info", None), _who(net)
        if info is None:
            pytest.skip(f"{who} has no feature_info")
        x, t, cond = self._inputs()
        with torch.no_grad():
            feats = net.forward_features(x, t, cond, layers=net.feature_layers, stop_early=False)
        missing = [n for n in feats if n not in info]
        assert not missing, f"{who}: feature_info has no entry for taps {missing}"
        for name, f in feats.items():
            channels, reduction = info[name]["channels"], info[name]["reduction"]
            assert _has_layout(tuple(x.shape), tuple(f.shape), channels, reduction), (
                f"{who}: tap {name!r} of shape {tuple(f.shape)} for input {tuple(x.shape)} is not "
                f"{channels} channels at reduction {reduction}, as feature_info says")

    # ------------------------------------------------------------------ eq. 13 on this backbone
    def test_self_perceptual_loss_and_gradient_vanish_at_t_prime_equal_t(self):
        """Eq. 13: with t' = t, forward(x0_hat, eps_hat, t') is x_t whatever the net predicts, so
        L_sp is exactly 0 and the online net gets exactly zero gradient (mse and mae)."""
        from hypothesis import given, settings
        from hypothesis import strategies as st

        online, sp = self._self_perceptual()
        conditions = self._sp_conditions(online)

        @settings(max_examples=_EXAMPLES, deadline=None)
        @given(t=st.lists(st.integers(0, self.num_timesteps - 1), min_size=1, max_size=3), seed=st.integers(0, 2**16))
        def vanishes(t: list[int], seed: int) -> None:
            x0, noise = self._clean_and_noise(len(t), seed)
            t_ = torch.tensor(t)
            for distance in DISTANCES:
                for which in conditions:
                    online.zero_grad(set_to_none=True)
                    loss = sp[distance](online, x0, self._sp_cond(which, len(t)), t=t_, t_prime=t_, noise=noise)
                    assert (loss == 0).all(), (
                        f"{_who(online)}: L_sp ({distance}, cond {which}) at t' = t = {t} is {loss.tolist()}, not 0")
                    loss.sum().backward()
                    moved = [n for n, p in online.named_parameters() if p.grad is not None and p.grad.any()]
                    assert not moved, f"{_who(online)}: at t' = t ({distance}, cond {which}) {moved[:3]} get gradients"

        vanishes()

    def test_self_perceptual_loss_vanishes_exactly_on_the_items_with_t_prime_equal_t(self):
        """A batch mixing t' = t with t' != t: the t' = t items have loss exactly 0 and give no
        gradient, the others a positive loss and a gradient."""
        from hypothesis import given, settings
        from hypothesis import strategies as st

        online, sp = self._self_perceptual()
        T = self.num_timesteps

        @st.composite
        def batches(draw: Any) -> tuple[list[int], list[int], list[bool]]:
            n = draw(st.integers(2, 4))
            t = draw(st.lists(st.integers(0, T - 1), min_size=n, max_size=n))
            shift = draw(st.lists(st.integers(1, T - 1), min_size=n, max_size=n))
            order, k = draw(st.permutations(range(n))), draw(st.integers(1, n - 1))
            same = [i in order[:k] for i in range(n)]
            return t, [ti if s else (ti + d) % T for ti, d, s in zip(t, shift, same)], same

        @settings(max_examples=_EXAMPLES, deadline=None)
        @given(batch=batches(), distance=st.sampled_from(DISTANCES),
               which=st.sampled_from(self._sp_conditions(online)), seed=st.integers(0, 2**16))
        def vanishes_per_item(batch: tuple[list[int], list[int], list[bool]], distance: str, which: str,
                              seed: int) -> None:
            t, t_prime, same = batch
            x0, noise = self._clean_and_noise(len(t), seed)
            loss = sp[distance](online, x0, self._sp_cond(which, len(t)), t=torch.tensor(t),
                                t_prime=torch.tensor(t_prime), noise=noise)
            mask = torch.tensor(same)
            where = f"{_who(online)} ({distance}, cond {which}, t = {t}, t' = {t_prime})"
            assert (loss[mask] == 0).all() and (loss[~mask] > 0).all(), f"{where}: L_sp = {loss.tolist()}"
            params = [p for p in online.parameters() if p.requires_grad]
            zero = torch.autograd.grad(loss[mask].sum(), params, retain_graph=True, allow_unused=True)
            assert all(g is None or not g.any() for g in zero), f"{where}: the t' = t items give a gradient"
            other = torch.autograd.grad(loss[~mask].sum(), params, allow_unused=True)
            assert any(g is not None and g.any() for g in other), f"{where}: the t' != t items give no gradient"

        vanishes_per_item()

    def _self_perceptual(self) -> tuple[nn.Module, dict[str, SelfPerceptual]]:
        """The online net (train mode) and SelfPerceptual on every tap of its frozen copy, per distance."""
        online = self._denoiser()
        frozen = make_perceptual(online)
        schedule = NoiseSchedule.scaled_linear(num_timesteps=self.num_timesteps, zero_terminal_snr=True)
        return online.train(), {d: SelfPerceptual(schedule, frozen, layers="all", distance=d) for d in DISTANCES}

    def _clean_and_noise(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, *self.input_shape, generator=g), torch.randn(n, *self.input_shape, generator=g)

    def _sp_cond(self, which: str, n: int) -> Any:
        return None if which == "none" else self.make_cond(n)


def _who(net: nn.Module) -> str:
    return type(net).__name__


def _is_tap_name(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    head, _, index = name.partition(".")
    return name == "mid" or (head in ("down", "up") and index.isdigit())


def _difference(ran: list[str], expected: list[str]) -> str:
    """Where a sequence of module calls departs from the expected one, in words."""
    if ran[:len(expected)] == expected:
        return f"runs {len(ran) - len(expected)} module call(s) past the tap, from {ran[len(expected)]!r}"
    if expected[:len(ran)] == ran:
        return f"stops {len(expected) - len(ran)} module call(s) before the tap, at {expected[len(ran)]!r}"
    i = next(k for k, (a, b) in enumerate(zip(ran, expected)) if a != b)
    return f"calls {ran[i]!r} where a full forward pass calls {expected[i]!r} (call {i})"


def _has_layout(x_shape: tuple[int, ...], tap_shape: tuple[int, ...], channels: int, reduction: int) -> bool:
    """Whether a tap is `channels` channels (channels first like the input, or last as tokens) at
    `reduction`: each of its sizes is an input size divided by it (rounded either way) or kept,
    and at least one is divided when reduction > 1 (video taps keep every frame)."""
    layouts = []
    if len(tap_shape) > 1 and tap_shape[1] == channels:
        layouts.append(tap_shape[2:])
    if len(tap_shape) > 1 and tap_shape[-1] == channels:
        layouts.append(tap_shape[1:-1])
    for sizes in layouts:
        if len(sizes) != len(x_shape) - 2:
            continue
        pairs = list(zip(x_shape[2:], sizes))
        divided = [s in (i // reduction, -(-i // reduction)) for i, s in pairs]
        kept = [s == i for i, s in pairs]
        some_divided = reduction == 1 or any(d and not k for d, k in zip(divided, kept))
        if some_divided and all(d or k for d, k in zip(divided, kept)):
            return True
    return False
