"""The `Denoiser` protocol: a v-prediction network with named feature taps and early exit.

Every backbone (image UNet, video UNet, audio DiT, a wrapped diffusers UNet) exposes the same
two calls, so the objectives, sampler and trainer never look inside it:

    v = net(x_t, t, cond)                                        # (N, C, ...) like x_t
    feats = net.forward_features(x_t, t, cond, layers="mid")     # {"mid": Tensor}

Tap names are stable: ``down.i`` (output of encoder stage i), ``mid`` (midblock output) and
``up.i`` (output of decoder stage i), listed in `feature_layers` in execution order. With
``stop_early=True`` nothing after the last requested tap is computed.

Backbones written for this library subclass `TappedDenoiser` and call ``tap(name, h)`` at each
tap inside `_run`; foreign modules are adapted with `HookedDenoiser`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "Denoiser",
    "TappedDenoiser",
    "HookedDenoiser",
    "FeatureRecorder",
    "resolve_layers",
    "LAYER_GROUPS",
]

Cond = Any  # None, LongTensor (N,) of class labels, or a context tensor (N, L, D)
LayerSpec = str | Sequence[str]

LAYER_GROUPS = ("mid", "encoder", "decoder", "encoder+mid", "all")


@runtime_checkable
class Denoiser(Protocol):
    """A v-prediction network with feature taps (see the module docstring)."""

    feature_layers: tuple[str, ...]

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """x_t: [N x C x ...], t: LongTensor (N,) of indices in [0, T-1]; returns v like x_t."""
        ...

    def forward_features(
        self, x_t: Tensor, t: Tensor, cond: Cond = None, *, layers: LayerSpec, stop_early: bool = True
    ) -> dict[str, Tensor]:
        """Hidden features at the requested taps, keyed by tap name."""
        ...


def resolve_layers(spec: LayerSpec, available: Sequence[str]) -> tuple[str, ...]:
    """Turn a layer spec into tap names, in the execution order of `available`.

    `spec` is a group ("mid", "encoder" = all down.*, "decoder" = all up.*, "encoder+mid",
    "all"), a single tap name, or a sequence of tap names. Raises ValueError for unknown names.
    """
    available = tuple(available)
    if isinstance(spec, str):
        encoder = [n for n in available if n.startswith("down.")]
        decoder = [n for n in available if n.startswith("up.")]
        groups = {
            "encoder": encoder,
            "decoder": decoder,
            "encoder+mid": encoder + ["mid"],
            "all": list(available),
        }
        names = groups.get(spec, [spec])
    else:
        names = list(spec)
    if not names:
        raise ValueError(f"layer spec {spec!r} selects no tap; available taps: {', '.join(available)}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(
            f"unknown feature layer(s) {', '.join(map(repr, unknown))}; available taps: "
            f"{', '.join(available)}; groups: {', '.join(LAYER_GROUPS)}"
        )
    wanted = set(names)
    return tuple(n for n in available if n in wanted)


class StopForward(Exception):
    """Raised by a recorder once every requested tap is filled (early exit)."""


class FeatureRecorder:
    """Collects tap outputs during one forward pass and stops it after the last one."""

    def __init__(self, layers: Iterable[str] = (), stop_early: bool = True):
        self.wanted = frozenset(layers)
        self.stop_early = stop_early
        self.features: dict[str, Tensor] = {}

    def __call__(self, name: str, h: Tensor) -> Tensor:
        if name in self.wanted:
            self.features[name] = h
            if self.stop_early and len(self.features) == len(self.wanted):
                raise StopForward
        return h


_NO_TAPS = FeatureRecorder()


class TappedDenoiser(nn.Module):
    """Base class for backbones of this library.

    Subclasses set `feature_layers` and implement ``_run(x_t, t, cond, tap) -> v``, calling
    ``tap(name, h)`` at each tap in execution order; this class supplies `forward` and
    `forward_features` (with early exit) on top of it.
    """

    feature_layers: tuple[str, ...] = ()
    # class names of the repeated blocks that FSDP shards as separate units (sharding.shard)
    SHARD_UNITS: tuple[str, ...] = ()

    def _run(self, x_t: Tensor, t: Tensor, cond: Cond, tap: Callable[[str, Tensor], Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        return self._run(x_t, t, cond, _NO_TAPS)

    def forward_features(
        self, x_t: Tensor, t: Tensor, cond: Cond = None, *, layers: LayerSpec, stop_early: bool = True
    ) -> dict[str, Tensor]:
        names = resolve_layers(layers, self.feature_layers)
        recorder = FeatureRecorder(names, stop_early)
        try:
            self._run(x_t, t, cond, recorder)
        except StopForward:
            pass
        return {n: recorder.features[n] for n in names}


def _default_forward(module: nn.Module, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
    return module(x_t, t) if cond is None else module(x_t, t, cond)


def _first_tensor(output: Any) -> Tensor:
    """Hook outputs may be tuples (e.g. diffusers down blocks return (h, skips)): take h."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"tapped submodule returned {type(output).__name__}, expected a Tensor")
    return output


class HookedDenoiser(nn.Module):
    """Adapt any nn.Module into a `Denoiser` by tapping submodule outputs with forward hooks.

    Args:
        module: the network (its parameters become this wrapper's parameters).
        layers: tap name -> dotted submodule path, in execution order, e.g.
            ``{"down.0": "down_blocks.0", "mid": "mid_block", "up.0": "up_blocks.0"}``.
            A tuple output is reduced to its first element.
        forward: ``forward(module, x_t, t, cond) -> v``; defaults to ``module(x_t, t[, cond])``.

    Hooks exist only during `forward_features`, so the wrapper deep-copies cleanly (which
    `make_perceptual` relies on). Early exit raises from the hook of the last requested tap, so
    nothing after it runs.
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Mapping[str, str],
        forward: Callable[[nn.Module, Tensor, Tensor, Cond], Tensor] | None = None,
    ):
        super().__init__()
        if not layers:
            raise ValueError("HookedDenoiser needs at least one tap in `layers`")
        self.module = module
        self.layer_paths = dict(layers)
        for name, path in self.layer_paths.items():
            try:
                module.get_submodule(path)
            except AttributeError as e:
                raise ValueError(f"tap {name!r}: module has no submodule {path!r}") from e
        self.feature_layers = tuple(self.layer_paths)
        self._forward_fn = forward or _default_forward

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        return self._forward_fn(self.module, x_t, t, cond)

    def forward_features(
        self, x_t: Tensor, t: Tensor, cond: Cond = None, *, layers: LayerSpec, stop_early: bool = True
    ) -> dict[str, Tensor]:
        names = resolve_layers(layers, self.feature_layers)
        recorder = FeatureRecorder(names, stop_early)
        handles = []
        try:
            for name in names:
                sub = self.module.get_submodule(self.layer_paths[name])
                handles.append(sub.register_forward_hook(_make_hook(recorder, name)))
            try:
                self._forward_fn(self.module, x_t, t, cond)
            except StopForward:
                pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in recorder.features]
        if missing:
            raise RuntimeError(f"taps {missing} never ran during the forward pass")
        return {n: recorder.features[n] for n in names}


def _make_hook(recorder: FeatureRecorder, name: str):
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        recorder(name, _first_tensor(output))

    return hook


def model_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of a module's first floating parameter (float32 if none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
