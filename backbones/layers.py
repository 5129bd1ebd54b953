"""Building blocks shared by the backbones, generic over 1, 2 or 3 spatial dims.

Tensors are channels-first, [N x C x ...] with 1-3 trailing positional dims; nothing here
assumes images. Zero-initialised last layers make every residual block the identity at
init (ADM), so a freshly built net predicts a function of its conv_in/conv_out only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "conv_nd",
    "zero_",
    "timestep_embedding",
    "ResBlock",
    "Downsample",
    "Upsample",
    "attention",
    "attention_heads",
    "QKNorm",
    "MultiHeadAttention",
    "AttentionBlock",
    "ATTENTION_BACKENDS",
    "check_attention_backend",
    "check_attention_backends",
]

ATTENTION_BACKENDS = ("sdpa", "xformers")
Factor = int | tuple[int, ...]


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """nn.Conv1d / Conv2d / Conv3d for dims = 1 / 2 / 3."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    return convs[dims](*args, **kwargs)


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it (an identity-at-init last layer)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) float32, [cos | sin] halves (ADM convention)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + timestep embedding (scale-shift), GroupNorm-SiLU-dropout-conv(0).

    x: [N x in_ch x ...], emb: (N, emb_dim) -> [N x out_ch x ...] (same positions).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dims: int = 2,
        dropout: float = 0.0,
        groups: int = 32,
        scale_shift: bool = True,
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = conv_nd(dims, in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(conv_nd(dims, out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else conv_nd(dims, in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))
        e = e.view(*e.shape, *([1] * (h.ndim - 2)))
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x..x3 conv: [N x C x ...] -> positions ceil(size / factor).

    `factor` may be per-dim, e.g. (1, 2, 2) keeps the frame axis of a video.
    """

    def __init__(self, ch: int, dims: int = 2, factor: Factor = 2):
        super().__init__()
        self.conv = conv_nd(dims, ch, ch, 3, stride=factor, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling by `factor` (or to `size`, to undo odd-sized downsampling) + 3x3 conv."""

    def __init__(self, ch: int, dims: int = 2, factor: Factor = 2):
        super().__init__()
        self.factor = factor
        self.conv = conv_nd(dims, ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, ...] | None = None) -> Tensor:
        if size is not None:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=self.factor, mode="nearest")
        return self.conv(x)


def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise ImportError("attention_backend='xformers' needs the xformers package: pip install -e "
                          "'.[xformers]' (or use attention_backend='sdpa', the default)") from e
    return xops


def check_attention_backend(backend: str, device: torch.device | str) -> None:
    """Refuse, with one line naming the option, an attention backend that cannot run on `device`:
    an unknown name (ValueError), xformers without its package (ImportError) or off CUDA
    (ValueError: xformers has no CPU kernels). Never falls back to another backend."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention_backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    if backend == "xformers":
        _xformers_ops()
        if torch.device(device).type != "cuda":
            raise ValueError(f"attention_backend='xformers' cannot run on {torch.device(device).type}: "
                             "xformers has CUDA kernels only; use attention_backend='sdpa' (the default) "
                             "or a CUDA device")


def check_attention_backends(model: nn.Module, device: torch.device | str) -> set[str]:
    """`check_attention_backend` for every backend that a module of `model` uses (any module
    with an `attention_backend` attribute); returns the set of backends found."""
    found = {b for m in model.modules() if isinstance(b := getattr(m, "attention_backend", None), str)}
    for backend in sorted(found):
        check_attention_backend(backend, device)
    return found


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa") -> Tensor:
    """Softmax attention on (B, heads, L, head_dim) tensors; returns (B, heads, Lq, head_dim).

    "sdpa": torch's scaled_dot_product_attention (picks flash / memory-efficient / math kernels
    itself); "xformers": xformers' memory_efficient_attention, CUDA tensors only.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        if q.device.type != "cuda":
            check_attention_backend(backend, q.device)  # the one-line refusal, not xformers' own
        # xformers takes (B, L, heads, head_dim)
        out = _xformers_ops().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                         v.transpose(1, 2))
        return out.transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")


def attention_heads(owner: str, ch: int, num_heads: int | None, head_dim: int | None, backend: str) -> int:
    """The number of heads that split `ch` channels, from exactly one of `num_heads` / `head_dim`;
    ValueError naming `owner` when they do not divide ch, or for an unknown attention backend."""
    if (num_heads is None) == (head_dim is None):
        raise ValueError(f"{owner}: give exactly one of num_heads and head_dim")
    if head_dim is not None:
        if head_dim <= 0 or ch % head_dim:
            raise ValueError(f"{owner}: {ch} channels not divisible by head_dim={head_dim}")
        num_heads = ch // head_dim
    if num_heads <= 0 or ch % num_heads:
        raise ValueError(f"{owner}: {ch} channels not divisible by num_heads={num_heads}")
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    return num_heads


class QKNorm(nn.Module):
    """RMSNorm of queries and keys per head, with learned scales: (B, heads, L, head_dim) each.

    Bounds the attention logits q.k / sqrt(d) by the learned scales, where plain attention lets
    them grow with the projection weights until the softmax saturates: the default ImageUNet at
    lr 1e-3 (benchmarks/RESULTS.md) went from logits ~10 to ~200 in 50 steps as its loss jumped
    (the query-key normalisation of Dehghani et al. 2023 and Stable Diffusion 3)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.q = nn.RMSNorm(head_dim, eps=1e-6)
        self.k = nn.RMSNorm(head_dim, eps=1e-6)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q(q), self.k(k)


class MultiHeadAttention(nn.Module):
    """Self-attention (context_dim None) or cross-attention on tokens (N, L, ch); `qk_norm` adds
    `QKNorm`."""

    def __init__(self, ch: int, heads: int, context_dim: int | None, backend: str, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        self.attention_backend = backend
        self.to_q = nn.Linear(ch, ch, bias=False)
        self.to_kv = nn.Linear(context_dim or ch, 2 * ch, bias=False)
        self.to_out = nn.Linear(ch, ch)
        self.qk_norm = QKNorm(ch // heads) if qk_norm else None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        n, length, ch = x.shape
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)

        def split(a: Tensor) -> Tensor:  # (N, L, ch) -> (N, heads, L, ch / heads)
            return a.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k = split(self.to_q(x)), split(k)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        out = attention(q, k, split(v), self.attention_backend)
        return self.to_out(out.transpose(1, 2).reshape(n, length, ch))


class AttentionBlock(nn.Module):
    """GroupNorm, self-attention over all positions, [cross-attention], feed-forward; residual.

    x: [N x ch x ...] (any number of positional dims), context: (N, L, context_dim) or None.
    Give exactly one of `num_heads` / `head_dim`. The output projection is zero-initialised.
    """

    def __init__(
        self,
        ch: int,
        num_heads: int | None = None,
        *,
        head_dim: int | None = None,
        context_dim: int | None = None,
        backend: str = "sdpa",
        groups: int = 32,
        qk_norm: bool = False,
    ):
        super().__init__()
        num_heads = attention_heads("AttentionBlock", ch, num_heads, head_dim, backend)
        self.context_dim = context_dim
        self.norm = nn.GroupNorm(groups, ch)
        self.self_attn = MultiHeadAttention(ch, num_heads, None, backend, qk_norm)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(ch)
            self.cross_attn = MultiHeadAttention(ch, num_heads, context_dim, backend, qk_norm)
        self.norm_ff = nn.LayerNorm(ch)
        self.ff = nn.Sequential(nn.Linear(ch, 4 * ch), nn.GELU(), nn.Linear(4 * ch, ch))
        self.proj_out = zero_(nn.Linear(ch, ch))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.norm(x).flatten(2).transpose(1, 2)  # (N, L, ch), L = product of positions
        h = h + self.self_attn(h)
        if self.context_dim is not None:
            if context is None:
                raise ValueError("this AttentionBlock has cross-attention and needs a context")
            h = h + self.cross_attn(self.norm_cross(h), context)
        h = h + self.ff(self.norm_ff(h))
        return x + self.proj_out(h).transpose(1, 2).reshape(x.shape)
