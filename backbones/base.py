"""`Backbone`: what the reference backbones share on top of `TappedDenoiser`.

A subclass sets `PRESETS` (name -> config dataclass) and `self.config`, whose `num_classes`,
`context_dim` and `gradient_checkpointing` fields drive conditioning and checkpointing, and
the `time_embed` / `label_embed` modules that `_embed_conditioning` reads:

    class MyNet(Backbone):
        PRESETS = {"tiny": MyNetConfig(...)}
        EXAMPLE_INPUT_SHAPE = (3, 16, 16)   # one sample for "tiny": the conformance tests' example
        def __init__(self, config=None, **overrides):
            super().__init__()
            self.config = apply_overrides(config or MyNetConfig(), overrides, "MyNet")

Error messages name the concrete class (``type(self).__name__``).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from perceptual_diffusion.denoiser import TappedDenoiser

from .layers import ATTENTION_BACKENDS, timestep_embedding

__all__ = ["Backbone", "ConformanceExample", "apply_overrides", "check_levels", "validate_backbone_fields"]

_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# typing.Self needs Python 3.11; the project supports 3.10
B = TypeVar("B", bound="Backbone")
C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class ConformanceExample:
    """A tiny instance of a backbone, for the conformance kit (`perceptual_diffusion.testing`).

    `build(**overrides)` makes a fresh net (`build(gradient_checkpointing=True)` one with it on,
    when `checkpointing`); `input_shape` is one sample; `make_cond(n)` a condition for a batch
    of n (None: the example is unconditional).
    """

    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    make_cond: Callable[[int], Any] | None = None
    checkpointing: bool = False


def _three_labels(n: int) -> Tensor:
    return torch.arange(n) % 3


class Backbone(TappedDenoiser):
    """A `TappedDenoiser` built from a config dataclass, with named presets.

    `cond` is None, a LongTensor (N,) of labels in [0, num_classes] (num_classes is the null
    label; None also means null), or a float context (N, L, context_dim).
    """

    PRESETS: ClassVar[dict[str, Any]] = {}
    EXAMPLE_INPUT_SHAPE: ClassVar[tuple[int, ...]] = ()  # one sample the "tiny" preset takes
    # preset -> (lr, warmup_steps): AdamW from scratch (batch 16, grad clip 1) measured to train
    # without a loss spike on the shipped data (benchmarks/RESULTS.md, "Divergence"); a preset
    # missing here has not been measured
    RECOMMENDED_LR: ClassVar[dict[str, tuple[float, int]]] = {}
    config: Any
    time_embed: nn.Module
    label_embed: nn.Embedding | None

    @classmethod
    def from_preset(cls: type[B], name: str, **overrides: Any) -> B:  # noqa: PYI019
        """A net from `PRESETS[name]` with config fields replaced by `overrides`."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; presets: {', '.join(cls.PRESETS)}")
        return cls(cls.PRESETS[name], **overrides)

    @classmethod
    def conformance_example(cls) -> ConformanceExample:
        """The "tiny" preset on one sample of `EXAMPLE_INPUT_SHAPE`, with 3 classes."""
        if not cls.EXAMPLE_INPUT_SHAPE:
            raise NotImplementedError(f"{cls.__name__} sets no EXAMPLE_INPUT_SHAPE for its conformance example")
        build = functools.partial(cls.from_preset, "tiny", in_channels=cls.EXAMPLE_INPUT_SHAPE[0], num_classes=3)
        return ConformanceExample(build, cls.EXAMPLE_INPUT_SHAPE, _three_labels, checkpointing=True)

    @classmethod
    def lr_advice(cls, preset: str, lr: float, warmup_steps: int) -> str | None:
        """A warning when training `preset` from scratch at `lr` exceeds 1.5x its measured
        `RECOMMENDED_LR` (None when within it, or when the preset was not measured)."""
        if preset not in cls.RECOMMENDED_LR:
            return None
        good, warm = cls.RECOMMENDED_LR[preset]
        if lr <= 1.5 * good:
            return None
        return (f"mse.lr = {lr:g} is {lr / good:.1f}x the lr measured to train the {cls.__name__} {preset!r} preset "
                f"from scratch without a loss spike ({good:g} with {warm} warm-up steps; benchmarks/RESULTS.md); "
                f"consider --set mse.lr={good:g} --set mse.warmup_steps={max(warm, warmup_steps)}")

    def null_cond(self, cond: Any) -> Any:
        """The unconditional counterpart of `cond`: the null label (same shape) for class labels."""
        self._check_cond(cond)
        if self.config.context_dim is not None:
            raise ValueError(
                f"{type(self).__name__} with cross-attention has no built-in null condition: pass an "
                "explicit uncond context, e.g. the embedding of the empty prompt"
            )
        return None if cond is None else torch.full_like(cond, self.config.num_classes)

    def _check_cond(self, cond: Any) -> None:
        c, name = self.config, type(self).__name__
        if cond is None:
            if c.context_dim is not None:
                raise ValueError(f"this {name} needs a context tensor (N, L, {c.context_dim}) as cond")
            return
        if not isinstance(cond, Tensor):
            raise TypeError(f"cond must be None or a Tensor, got {type(cond).__name__}")
        if cond.is_floating_point():
            if c.context_dim is None:
                raise TypeError(
                    f"got a float context {tuple(cond.shape)} as cond, but this {name} has no "
                    "cross-attention (context_dim=None)"
                )
            if cond.ndim != 3 or cond.shape[-1] != c.context_dim:
                raise ValueError(f"context must be (N, L, {c.context_dim}), got {tuple(cond.shape)}")
        elif cond.dtype in _LABEL_DTYPES:
            if c.num_classes is None:
                raise TypeError(f"got class labels as cond, but this {name} has no num_classes")
            if cond.ndim != 1:
                raise ValueError(f"class labels must be a LongTensor (N,), got shape {tuple(cond.shape)}")
        else:
            raise TypeError(f"cond must be class labels (integer) or a float context, got dtype {cond.dtype}")

    def _embed_conditioning(
        self, x_t: Tensor, t: Tensor, cond: Any, freq_dim: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor | None]:
        """Check `cond`; return emb (N, E) of t (+ the label, null when cond is None) and the context.

        Uses the subclass's `time_embed` (freq_dim sinusoidal features -> E) and `label_embed`
        (None without num_classes). The context is (N, L, context_dim) in `dtype`, or None.
        """
        self._check_cond(cond)
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(n) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, freq_dim).to(dtype))
        context = None
        if self.label_embed is not None:
            labels = torch.full((n,), self.config.num_classes, device=x_t.device) if cond is None else cond
            if labels.shape[0] != n:
                raise ValueError(f"got {labels.shape[0]} class labels for a batch of {n}")
            emb = emb + self.label_embed(labels.long())
        elif cond is not None:
            if cond.shape[0] != n:
                raise ValueError(f"got a context of batch {cond.shape[0]} for a batch of {n}")
            context = cond.to(dtype)
        return emb, context

    def _block(self, block: nn.Module, *args: Any) -> Tensor:
        """`block(*args)`, recomputed in backward when gradient checkpointing is on and training."""
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def apply_overrides(config: C, overrides: dict[str, Any], owner: str) -> C:
    """`config` (a dataclass) with fields replaced by `overrides`; TypeError naming `owner` if unknown."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"unknown {owner} config field(s) {', '.join(map(repr, unknown))}; "
            f"fields: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(config, **overrides) if overrides else config


def validate_backbone_fields(cfg: Any) -> None:
    """The checks of the fields every backbone config has, ValueError naming the config class:
    dropout in [0, 1), num_classes and context_dim exclusive, a known attention backend, and
    gradient_checkpointing and qk_norm bools."""
    owner = type(cfg).__name__
    p = cfg.dropout
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{owner}.dropout must be in [0, 1), got {p!r}")
    if cfg.num_classes is not None and cfg.context_dim is not None:
        raise ValueError(f"{owner}: num_classes and context_dim are exclusive; set one of them")
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"{owner}.attention_backend={cfg.attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
    for name in ("gradient_checkpointing", "qk_norm"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{owner}.{name} must be True or False, got {getattr(cfg, name)!r}")


def check_levels(owner: str, name: str, value: Any, levels: int, hint: str = "") -> None:
    """`value` must be distinct level indices in [0, levels - 1] (ValueError naming owner.name)."""
    bad = [i for i in value if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < levels]
    if bad or len(set(value)) != len(value):
        raise ValueError(f"{owner}.{name}={value} must be distinct level indices in [0, {levels - 1}]{hint}")

