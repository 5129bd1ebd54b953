"""`AudioDiT`: a diffusion transformer (DiT, Peebles & Xie) on 1-D signals, as a `TappedDenoiser`.

    net = AudioDiT.from_preset("tiny")                       # or AudioDiT(config) / AudioDiT(**fields)
    v = net(x_t, t, cond)                                    # [N x C x L] -> same shape
    feats = net.forward_features(x_t, t, layers="mid")       # {"mid": [N x L/p x hidden_dim]}

With ``front_end="waveform"`` (the default) the input (raw waveform or any 1-D latent) is cut
into non-overlapping patches of `patch_size` samples, so L must be a multiple of it. With
``front_end="spectrum"`` the net works on the clip's spectrum instead: an orthonormal real FFT
(`spectrum`, exactly inverted by `inverse_spectrum`) turns [N x C x L] into the real and
imaginary parts of its L/2 frequency bins, [N x 2C x L/2], whose patches of `patch_size` bins are
the tokens (L a multiple of 2 * patch_size); the predicted v comes back through the inverse. An
orthonormal map keeps white noise white, so the diffusion is the same process seen in another
basis, and a steady tone is a few bins instead of a long wave: measured on the tones recipe in
benchmarks/RESULTS.md. Positions (time, or frequency with the spectrum) get a fixed sinusoidal
embedding computed for the actual token count (no maximum length). Blocks are adaLN-Zero: a freshly built net outputs
exactly zero. The blocks, patching and positions are `backbones.transformer`'s, shared with
`ImageDiT`.

Taps are block outputs, token sequences [N x L/p x hidden_dim] (spectrum: [N x L/(2p) x hidden_dim]). With blocks indexed
0..depth-1 and m = depth // 2: ``down.i`` is block i (i < m), ``mid`` is block m, ``up.j`` is
block m + 1 + j; e.g. depth 4 gives down.0, down.1, mid, up.0. With ``stop_early=True`` no
block after the last requested one runs, nor the final layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import apply_overrides
from .transformer import DiT, DiTConfig, FrontEnd, patchify, tap_names, unpatchify

__all__ = ["AudioDiT", "AudioDiTConfig", "FRONT_ENDS", "Spectrum", "inverse_spectrum", "patchify", "spectrum",
           "tap_names", "unpatchify"]

FRONT_ENDS = ("waveform", "spectrum")


@dataclass(frozen=True)
class AudioDiTConfig(DiTConfig):
    """Architecture of an `AudioDiT` (fields and checks: `DiTConfig`, plus `front_end`, one of
    FRONT_ENDS); the defaults are the "default" preset (~9.7M parameters): patches of 16 samples
    of the waveform, 8 blocks of width 256."""

    front_end: str = "waveform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.front_end not in FRONT_ENDS:
            raise ValueError(f"AudioDiTConfig.front_end must be one of {', '.join(FRONT_ENDS)}, got {self.front_end!r}")


def spectrum(x: Tensor) -> Tensor:
    """[N x C x L] real (L even) -> [N x 2C x L/2]: an orthonormal real FFT, packed.

    Channels 0..C-1 hold the real parts of bins 0..L/2-1, channels C..2C-1 their imaginary
    parts, except that bin 0's imaginary part (always 0) gives its slot to the real Nyquist
    bin L/2. Bins 1..L/2-1 are scaled by sqrt(2), so the map is orthonormal: it keeps sums of
    squares (and so white noise white). Computed in float32 (float64 stays float64)."""
    length = x.shape[-1]
    if x.ndim != 3 or length % 2:
        raise ValueError(f"the spectrum front end needs [N x C x L] with an even L, got shape {tuple(x.shape)}")
    h = length // 2
    f = torch.fft.rfft(x if x.dtype == torch.float64 else x.float(), norm="ortho")
    root2 = math.sqrt(2.0)
    re = torch.cat([f.real[..., :1], f.real[..., 1:h] * root2], dim=-1)
    im = torch.cat([f.real[..., h:], f.imag[..., 1:h] * root2], dim=-1)
    return torch.cat([re, im], dim=1)


def inverse_spectrum(y: Tensor) -> Tensor:
    """The inverse of `spectrum`: [N x 2C x L/2] -> [N x C x L]."""
    c2, h = y.shape[1:]
    if c2 % 2:
        raise ValueError(f"a packed spectrum has an even channel count, got shape {tuple(y.shape)}")
    y = y if y.dtype == torch.float64 else y.float()
    re_p, im_p = y.chunk(2, dim=1)
    root2 = math.sqrt(2.0)
    zero = torch.zeros_like(re_p[..., :1])
    re = torch.cat([re_p[..., :1], re_p[..., 1:] / root2, im_p[..., :1]], dim=-1)
    im = torch.cat([zero, im_p[..., 1:] / root2, zero], dim=-1)
    return torch.fft.irfft(torch.complex(re, im), n=2 * h, norm="ortho")


class Spectrum(FrontEnd):
    """`spectrum` as a DiT front end: 2C channels, each position a frequency bin (2 samples' worth
    of the input); L must be a multiple of 2 * patch_size."""

    reduction = 2

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def channels(self, channels: int) -> int:
        return 2 * channels

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % (2 * self.patch_size):
            raise ValueError(f"L={x.shape[-1]} is not divisible by 2 x patch_size={2 * self.patch_size} (the spectrum "
                             f"front end patches L/2 frequency bins); pad or crop L to a multiple of it")
        return spectrum(x)

    def inverse(self, y: Tensor) -> Tensor:
        return inverse_spectrum(y)


class AudioDiT(DiT):
    """DiT predicting v: x_t [N x C x L] (L a multiple of patch_size), t (N,), cond -> v like x_t.

    Build with ``AudioDiT(config)``, ``AudioDiT(**config_fields)``, ``AudioDiT(config, **overrides)``
    or ``AudioDiT.from_preset(name, **overrides)``. `cond` is None, a LongTensor (N,) of labels
    in [0, num_classes] (num_classes is the null label; None also means null), or a float
    context (N, L_ctx, context_dim). Computes in the parameter dtype; returns v in x_t's dtype.
    """

    POSITIONAL_DIMS: ClassVar[int] = 1
    EXAMPLE_INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, 256)
    RECOMMENDED_LR: ClassVar[dict[str, tuple[float, int]]] = {"tiny": (1e-3, 50), "default": (3e-4, 200)}
    PRESETS: ClassVar[dict[str, AudioDiTConfig]] = {
        "tiny": AudioDiTConfig(patch_size=16, hidden_dim=64, depth=4, num_heads=4, qk_norm=False),
        "default": AudioDiTConfig(),
    }

    def __init__(self, config: AudioDiTConfig | None = None, **overrides: Any):
        super().__init__(apply_overrides(config or AudioDiTConfig(), overrides, "AudioDiT"))

    def _front_end(self) -> FrontEnd:
        return Spectrum(self.config.patch_size) if self.config.front_end == "spectrum" else FrontEnd()
