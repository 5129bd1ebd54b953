"""Diffusion-transformer pieces (DiT, Peebles & Xie) shared by the DiT backbones, generic over
1, 2 or 3 positional dims: `AudioDiT` is `DiT` on [N x C x L], `ImageDiT` on [N x C x H x W].

    x [N x C x *S]  --patchify-->  tokens [N x T x C*prod(p)]   (T = prod(S / p), row-major grid)
                    --Linear + N-D sinusoidal positions-->  [N x T x D]
                    --DiTBlock x depth (adaLN-Zero, conditioned on c = t [+ label])-->
                    --FinalLayer + unpatchify-->  v [N x C_out x *S]

A subclass of `DiT` sets `POSITIONAL_DIMS`, `PRESETS` (of a `DiTConfig` subclass) and
`EXAMPLE_INPUT_SHAPE`; everything else, taps included, lives here. Positions get a fixed
sinusoidal embedding computed for the actual grid (no maximum size); the embedding width is split
evenly over the positional dims (DiT's 2-D scheme; in 1-D the whole width encodes the index).

Taps: block outputs, as the token grid [N x *S/p x D] (channels last; a view of the tokens).
With blocks indexed 0..depth-1 and m = depth // 2, ``down.i`` is block i (i < m), ``mid`` is
block m and ``up.j`` is block m + 1 + j: e.g. depth 4 gives down.0, down.1, mid, up.0. A
transformer keeps one resolution, so every tap has reduction patch_size. With
``stop_early=True`` no block after the last requested one runs, nor the final layer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .base import Backbone, validate_backbone_fields
from .layers import MultiHeadAttention, timestep_embedding, zero_

__all__ = ["DiT", "DiTConfig", "DiTBlock", "FinalLayer", "FrontEnd", "patchify", "unpatchify", "position_embedding",
           "tap_names"]

# width of the sinusoidal timestep features fed to the conditioning MLP (DiT's choice)
FREQ_DIM = 256

# how the positional sizes of [N x C x ...] are written in errors, by number of positional dims
_AXES = {1: ("L",), 2: ("H", "W"), 3: ("F", "H", "W")}


@dataclass(frozen=True)
class DiTConfig:
    """The fields of every DiT config (subclasses change defaults only); errors name the subclass.

    Conditioning: `num_classes` (labels, plus a null label `num_classes` for CFG dropout) or
    `context_dim` (cross-attention to a context (N, L_ctx, context_dim)), not both. The MLP of
    each block has int(hidden_dim * mlp_ratio) hidden units; `dropout` acts on the attention
    outputs and the MLP hidden units. `patch_size` is the same along every positional dim.
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
    qk_norm: bool = True             # QKNorm in every attention (the tiny presets: off)

    def __post_init__(self) -> None:
        owner = type(self).__name__

        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")

        for name in ("in_channels", "patch_size", "hidden_dim", "depth", "num_heads"):
            positive(name)
        for name in ("out_channels", "num_classes", "context_dim"):
            positive(name, allow_none=True)
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"{owner}.hidden_dim={self.hidden_dim} is not divisible by num_heads={self.num_heads}")
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or int(self.hidden_dim * ratio) < 1:
            raise ValueError(f"{owner}.mlp_ratio must be a number with int(hidden_dim * mlp_ratio) >= 1, got {ratio!r}")
        validate_backbone_fields(self)


# ---------------------------------------------------------------- tokens and positions

def _patch_per_dim(patch_size: int | Sequence[int], dims: int) -> tuple[int, ...]:
    p = (patch_size,) * dims if isinstance(patch_size, int) else tuple(patch_size)
    if len(p) != dims:
        raise ValueError(f"patch_size {patch_size!r} gives {len(p)} sizes for {dims} positional dims")
    return p


def patchify(x: Tensor, patch_size: int | Sequence[int]) -> Tensor:
    """[N x C x *S] (1-3 positional dims) -> tokens [N x prod(S/p) x C*prod(p)].

    Tokens run over the patch grid in row-major order; each holds its patch channel-major
    (channel, then offsets within the patch). `patch_size` is one int or one per dim.
    """
    if not 3 <= x.ndim <= 5:
        raise ValueError(f"expected [N x C x L], [N x C x H x W] or [N x C x F x H x W], got shape {tuple(x.shape)}")
    n, c, *sizes = x.shape
    dims = len(sizes)
    p = _patch_per_dim(patch_size, dims)
    for axis, size, q in zip(_AXES[dims], sizes, p):
        if size % q:
            raise ValueError(f"{axis}={size} is not divisible by patch_size={q}; "
                             f"pad or crop {axis} to a multiple of {q}")
    grid = [size // q for size, q in zip(sizes, p)]
    x = x.reshape(n, c, *(k for g, q in zip(grid, p) for k in (g, q)))
    # (N, C, g0, p0, g1, p1, ...) -> (N, g0, g1, ..., C, p0, p1, ...)
    x = x.permute(0, *range(2, 2 + 2 * dims, 2), 1, *range(3, 3 + 2 * dims, 2))
    return x.reshape(n, math.prod(grid), c * math.prod(p))


def unpatchify(tokens: Tensor, patch_size: int | Sequence[int], channels: int,
               grid: Sequence[int] | None = None) -> Tensor:
    """Inverse of `patchify`: tokens [N x T x C*prod(p)] on a patch grid (T tokens in 1-D when
    None) -> [N x C x *(grid * p)]."""
    grid = (tokens.shape[1],) if grid is None else tuple(grid)
    p = _patch_per_dim(patch_size, len(grid))
    width = channels * math.prod(p)
    if tokens.ndim != 3 or tokens.shape[-1] != width or tokens.shape[1] != math.prod(grid):
        raise ValueError(f"expected tokens [N x {math.prod(grid)} x {width}] (grid {grid}, channels={channels} x "
                         f"patch_size={patch_size}), got shape {tuple(tokens.shape)}")
    n, dims = tokens.shape[0], len(grid)
    x = tokens.reshape(n, *grid, channels, *p)
    # (N, g0, g1, ..., C, p0, p1, ...) -> (N, C, g0, p0, g1, p1, ...)
    x = x.permute(0, dims + 1, *(k for i in range(dims) for k in (1 + i, dims + 2 + i)))
    return x.reshape(n, channels, *(g * q for g, q in zip(grid, p)))


def position_embedding(grid: Sequence[int], dim: int, device: torch.device | str | None = None) -> Tensor:
    """Fixed sinusoidal positions (prod(grid), dim) float32 of a row-major token grid.

    The width is split over the positional dims (the first dim % len(grid) dims get one more);
    each part is `timestep_embedding` of the token's index along its dim.
    """
    dims = len(grid)
    widths = [dim // dims + (i < dim % dims) for i in range(dims)]
    index = torch.meshgrid(*(torch.arange(g, device=device) for g in grid), indexing="ij")
    return torch.cat([timestep_embedding(i.flatten(), w) for i, w in zip(index, widths)], dim=-1)


def tap_names(depth: int) -> tuple[str, ...]:
    """Tap name of each block output, block 0 first: down.i (i < depth//2), mid, up.j."""
    m = depth // 2
    return tuple([f"down.{i}" for i in range(m)] + ["mid"] + [f"up.{j}" for j in range(depth - m - 1)])


class FrontEnd(nn.Module):
    """The identity map between the data [N x C x *S] and what a DiT patches; the base of front ends
    that change the representation (`AudioDiT`'s spectrum). A front end has no parameters, maps C
    channels to `channels(C)` and each of its positions covers `reduction` input positions; the
    output of the net goes back through `inverse`."""

    reduction: int = 1

    def channels(self, channels: int) -> int:
        return channels

    def forward(self, x: Tensor) -> Tensor:
        return x

    def inverse(self, y: Tensor) -> Tensor:
        """The data-space tensor that `y` (the net's output in this front end's space) stands for."""
        return y


# ---------------------------------------------------------------- blocks

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
        qk_norm: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(dim, heads, None, backend, qk_norm)
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = MultiHeadAttention(dim, heads, context_dim, backend, qk_norm)
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


# ---------------------------------------------------------------- the network

class DiT(Backbone):
    """DiT predicting v: x_t [N x C x *S] (each size a multiple of patch_size), t (N,), cond -> v
    like x_t, for S of `POSITIONAL_DIMS` dims. Computes in the parameter dtype; returns v in
    x_t's dtype. A fresh net outputs exactly zero (adaLN-Zero)."""

    POSITIONAL_DIMS: ClassVar[int] = 1
    SHARD_UNITS: ClassVar[tuple[str, ...]] = ("DiTBlock",)  # FSDP units

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        d = c.hidden_dim
        self.out_channels = c.out_channels or c.in_channels
        patch_numel = c.patch_size ** self.POSITIONAL_DIMS
        self.front_end = self._front_end()

        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, d), nn.SiLU(), nn.Linear(d, d))
        self.label_embed = nn.Embedding(c.num_classes + 1, d) if c.num_classes else None
        self.patch_embed = nn.Linear(self.front_end.channels(c.in_channels) * patch_numel, d)
        self.blocks = nn.ModuleList(
            DiTBlock(d, c.num_heads, c.mlp_ratio, c.dropout, c.context_dim, c.attention_backend, c.qk_norm)
            for _ in range(c.depth)
        )
        self.final_layer = FinalLayer(d, self.front_end.channels(self.out_channels) * patch_numel)

        self.feature_layers = tap_names(c.depth)
        self.feature_info: dict[str, dict[str, int]] = {
            name: {"channels": d, "reduction": c.patch_size * self.front_end.reduction} for name in self.feature_layers
        }

    def _front_end(self) -> "FrontEnd":
        """What the input becomes before patching (and the output after unpatching): the data
        itself here; a subclass may return another `FrontEnd` (AudioDiT's spectrum)."""
        return FrontEnd()

    def _run(self, x_t: Tensor, t: Tensor, cond: Any, tap: Callable[[str, Tensor], Tensor]) -> Tensor:
        cfg, dims = self.config, self.POSITIONAL_DIMS
        if x_t.ndim != 2 + dims or x_t.shape[1] != cfg.in_channels:
            raise ValueError(f"{type(self).__name__} expects x_t [N x {cfg.in_channels} x {' x '.join(_AXES[dims])}], "
                             f"got shape {tuple(x_t.shape)}")
        dtype = self.patch_embed.weight.dtype
        c, context = self._embed_conditioning(x_t, t, cond, FREQ_DIM, dtype)

        y = self.front_end(x_t).to(dtype)
        h = self.patch_embed(patchify(y, cfg.patch_size))
        grid = tuple(size // cfg.patch_size for size in y.shape[2:])
        h = h + position_embedding(grid, cfg.hidden_dim, h.device).to(dtype)
        for block, name in zip(self.blocks, self.feature_layers):
            h = self._block(block, h, c, context)
            tap(name, h.unflatten(1, grid))

        v = unpatchify(self.final_layer(h, c), cfg.patch_size, self.front_end.channels(self.out_channels), grid)
        return self.front_end.inverse(v).to(x_t.dtype)
