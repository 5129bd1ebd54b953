"""`AudioDiT`: a diffusion transformer (DiT, Peebles & Xie) on 1-D signals, as a `TappedDenoiser`.

    net = AudioDiT.from_preset("tiny")                       # or AudioDiT(config) / AudioDiT(**fields)
    v = net(x_t, t, cond)                                    # [N x C x L] -> same shape
    feats = net.forward_features(x_t, t, layers="mid")       # {"mid": [N x L/p x hidden_dim]}

The input (raw waveform or any 1-D latent) is cut into non-overlapping patches of `patch_size`
samples, so L must be a multiple of it; positions get a fixed sinusoidal embedding computed for
the actual token count (no maximum length). Blocks are adaLN-Zero: a freshly built net outputs
exactly zero.

Taps are block outputs, token sequences [N x L/p x hidden_dim]. With blocks indexed
0..depth-1 and m = depth // 2: ``down.i`` is block i (i < m), ``mid`` is block m, ``up.j`` is
block m + 1 + j; e.g. depth 4 gives down.0, down.1, mid, up.0. With ``stop_early=True`` no
block after the last requested one runs, nor the final layer.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .base import Backbone, apply_overrides
from .layers import ATTENTION_BACKENDS, MultiHeadAttention, timestep_embedding, zero_

__all__ = ["AudioDiT", "AudioDiTConfig", "patchify", "tap_names", "unpatchify"]

# width of the sinusoidal timestep features fed to the conditioning MLP (DiT's choice)
FREQ_DIM = 256


@dataclass(frozen=True)
class AudioDiTConfig:
    """Architecture of an `AudioDiT`; the defaults are the "default" preset (~9.7M parameters).

    Conditioning: `num_classes` (labels, plus a null label `num_classes` for CFG dropout) or
    `context_dim` (cross-attention to a context (N, L_ctx, context_dim)), not both. The MLP of
    each block has int(hidden_dim * mlp_ratio) hidden units; `dropout` acts on the attention
    outputs and the MLP hidden units.
    """

    in_channels: int = 1
    out_channels: int | None = None  # None: in_channels
    patch_size: int = 16
    hidden_dim: int = 256
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    num_classes: int | None = None
    context_dim: int | None = None
    attention_backend: str = "sdpa"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"AudioDiTConfig.{name} must be a positive int, got {value!r}")

        for name in ("in_channels", "patch_size", "hidden_dim", "depth", "num_heads"):
            positive(name)
        for name in ("out_channels", "num_classes", "context_dim"):
            positive(name, allow_none=True)
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"AudioDiTConfig.hidden_dim={self.hidden_dim} is not divisible by num_heads={self.num_heads}"
            )
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or int(self.hidden_dim * ratio) < 1:
            raise ValueError(
                f"AudioDiTConfig.mlp_ratio must be a number with int(hidden_dim * mlp_ratio) >= 1, got {ratio!r}"
            )
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
            raise ValueError(f"AudioDiTConfig.dropout must be in [0, 1), got {p!r}")
        if self.num_classes is not None and self.context_dim is not None:
            raise ValueError("AudioDiTConfig: num_classes and context_dim are exclusive; set one of them")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"AudioDiTConfig.attention_backend={self.attention_backend!r}; choose one of {ATTENTION_BACKENDS}"
            )
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(
                f"AudioDiTConfig.gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}"
            )


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """[N x C x L] -> tokens [N x L/p x C*p]; token k holds samples k*p..(k+1)*p-1 of every channel."""
    if x.ndim != 3:
        raise ValueError(f"expected a signal [N x C x L], got shape {tuple(x.shape)}")
    n, c, length = x.shape
    if length % patch_size:
        raise ValueError(
            f"signal length L={length} is not divisible by patch_size={patch_size}; "
            f"pad or crop L to a multiple of {patch_size}"
        )
    return x.reshape(n, c, length // patch_size, patch_size).transpose(1, 2).reshape(n, -1, c * patch_size)


def unpatchify(tokens: Tensor, patch_size: int, channels: int) -> Tensor:
    """Inverse of `patchify`: tokens [N x T x C*p] -> [N x C x T*p]."""
    if tokens.ndim != 3 or tokens.shape[-1] != channels * patch_size:
        raise ValueError(
            f"expected tokens [N x T x {channels * patch_size}] (channels={channels} x "
            f"patch_size={patch_size}), got shape {tuple(tokens.shape)}"
        )
    n, num_tokens, _ = tokens.shape
    return tokens.reshape(n, num_tokens, channels, patch_size).transpose(1, 2).reshape(n, channels, -1)


def tap_names(depth: int) -> tuple[str, ...]:
    """Tap name of each block output, block 0 first: down.i (i < depth//2), mid, up.j."""
    m = depth // 2
    return tuple([f"down.{i}" for i in range(m)] + ["mid"] + [f"up.{j}" for j in range(depth - m - 1)])


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x: [N x T x D], shift/scale: (N, D) -> x * (1 + scale) + shift per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block on tokens [N x T x D], conditioned on c (N, D).

    Self-attention and MLP read LayerNorm(x) (no affine) shifted/scaled by c and are gated by
    c; the shift/scale/gate projection is zero-initialised, so the block is the identity at
    init. With `context_dim`, a pre-norm cross-attention (zero-initialised output) sits
    between the two.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        context_dim: int | None = None,
        backend: str = "sdpa",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(dim, heads, None, backend)
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = MultiHeadAttention(dim, heads, context_dim, backend)
            zero_(self.cross_attn.to_out)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.dropout = nn.Dropout(dropout)
        self.adaLN = nn.Sequential(nn.SiLU(), zero_(nn.Linear(dim, 6 * dim)))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.dropout(self.attn(_modulate(self.norm1(x), shift_a, scale_a)))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this DiTBlock has cross-attention and needs a context")
            x = x + self.dropout(self.cross_attn(self.norm_cross(x), context))
        return x + gate_m[:, None] * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + zero-initialised linear: [N x T x D] -> [N x T x out_dim]."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), zero_(nn.Linear(dim, 2 * dim)))
        self.linear = zero_(nn.Linear(dim, out_dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class AudioDiT(Backbone):
    """DiT predicting v: x_t [N x C x L] (L a multiple of patch_size), t (N,), cond -> v like x_t.

    Build with ``AudioDiT(config)``, ``AudioDiT(**config_fields)``, ``AudioDiT(config, **overrides)``
    or ``AudioDiT.from_preset(name, **overrides)``. `cond` is None, a LongTensor (N,) of labels
    in [0, num_classes] (num_classes is the null label; None also means null), or a float
    context (N, L_ctx, context_dim). Computes in the parameter dtype; returns v in x_t's dtype.
    """

    SHARD_UNITS: ClassVar[tuple[str, ...]] = ("DiTBlock",)  # FSDP units
    EXAMPLE_INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, 256)
    PRESETS: ClassVar[dict[str, AudioDiTConfig]] = {
        "tiny": AudioDiTConfig(patch_size=16, hidden_dim=64, depth=4, num_heads=4),
        "default": AudioDiTConfig(),
    }

    def __init__(self, config: AudioDiTConfig | None = None, **overrides: Any):
        super().__init__()
        config = apply_overrides(config or AudioDiTConfig(), overrides, "AudioDiT")
        self.config = c = config
        d = c.hidden_dim
        self.out_channels = c.out_channels or c.in_channels

        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, d), nn.SiLU(), nn.Linear(d, d))
        self.label_embed = nn.Embedding(c.num_classes + 1, d) if c.num_classes else None
        self.patch_embed = nn.Linear(c.in_channels * c.patch_size, d)
        self.blocks = nn.ModuleList(
            DiTBlock(d, c.num_heads, c.mlp_ratio, c.dropout, c.context_dim, c.attention_backend)
            for _ in range(c.depth)
        )
        self.final_layer = FinalLayer(d, self.out_channels * c.patch_size)

        self.feature_layers = tap_names(c.depth)
        self.feature_info: dict[str, dict[str, int]] = {
            name: {"channels": d, "reduction": c.patch_size} for name in self.feature_layers
        }

    def _run(self, x_t: Tensor, t: Tensor, cond: Any, tap: Callable[[str, Tensor], Tensor]) -> Tensor:
        cfg = self.config
        if x_t.ndim != 3 or x_t.shape[1] != cfg.in_channels:
            raise ValueError(f"AudioDiT expects x_t [N x {cfg.in_channels} x L], got shape {tuple(x_t.shape)}")
        dtype = self.patch_embed.weight.dtype
        c, context = self._embed_conditioning(x_t, t, cond, FREQ_DIM, dtype)

        h = self.patch_embed(patchify(x_t.to(dtype), cfg.patch_size))
        positions = torch.arange(h.shape[1], device=h.device)
        h = h + timestep_embedding(positions, cfg.hidden_dim).to(dtype)
        for block, name in zip(self.blocks, self.feature_layers):
            h = tap(name, self._block(block, h, c, context))

        v = unpatchify(self.final_layer(h, c), cfg.patch_size, self.out_channels)
        return v.to(x_t.dtype)

