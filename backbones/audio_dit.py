"""`AudioDiT`: a diffusion transformer (DiT, Peebles & Xie) on 1-D signals, as a `TappedDenoiser`.

    net = AudioDiT.from_preset("tiny")                       # or AudioDiT(config) / AudioDiT(**fields)
    v = net(x_t, t, cond)                                    # [N x C x L] -> same shape
    feats = net.forward_features(x_t, t, layers="mid")       # {"mid": [N x L/p x hidden_dim]}

The input (raw waveform or any 1-D latent) is cut into non-overlapping patches of `patch_size`
samples, so L must be a multiple of it; positions get a fixed sinusoidal embedding computed for
the actual token count (no maximum length). Blocks are adaLN-Zero: a freshly built net outputs
exactly zero. The blocks, patching and positions are `backbones.transformer`'s, shared with
`ImageDiT`.

Taps are block outputs, token sequences [N x L/p x hidden_dim]. With blocks indexed
0..depth-1 and m = depth // 2: ``down.i`` is block i (i < m), ``mid`` is block m, ``up.j`` is
block m + 1 + j; e.g. depth 4 gives down.0, down.1, mid, up.0. With ``stop_early=True`` no
block after the last requested one runs, nor the final layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import apply_overrides
from .transformer import DiT, DiTConfig, patchify, tap_names, unpatchify

__all__ = ["AudioDiT", "AudioDiTConfig", "patchify", "tap_names", "unpatchify"]


@dataclass(frozen=True)
class AudioDiTConfig(DiTConfig):
    """Architecture of an `AudioDiT` (fields and checks: `DiTConfig`); the defaults are the
    "default" preset (~9.7M parameters): patches of 16 samples, 8 blocks of width 256."""


class AudioDiT(DiT):
    """DiT predicting v: x_t [N x C x L] (L a multiple of patch_size), t (N,), cond -> v like x_t.

    Build with ``AudioDiT(config)``, ``AudioDiT(**config_fields)``, ``AudioDiT(config, **overrides)``
    or ``AudioDiT.from_preset(name, **overrides)``. `cond` is None, a LongTensor (N,) of labels
    in [0, num_classes] (num_classes is the null label; None also means null), or a float
    context (N, L_ctx, context_dim). Computes in the parameter dtype; returns v in x_t's dtype.
    """

    POSITIONAL_DIMS: ClassVar[int] = 1
    EXAMPLE_INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, 256)
    RECOMMENDED_LR: ClassVar[dict[str, tuple[float, int]]] = {"tiny": (1e-3, 50)}
    PRESETS: ClassVar[dict[str, AudioDiTConfig]] = {
        "tiny": AudioDiTConfig(patch_size=16, hidden_dim=64, depth=4, num_heads=4, qk_norm=False),
        "default": AudioDiTConfig(),
    }

    def __init__(self, config: AudioDiTConfig | None = None, **overrides: Any):
        super().__init__(apply_overrides(config or AudioDiTConfig(), overrides, "AudioDiT"))
