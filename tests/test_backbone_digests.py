"""Refactors of the backbones change no network: the same state_dict names, shapes and order, the
same seeded initial weights, and bit for bit the same v, taps and (with checkpointing) gradients
for the same weights and inputs, per preset and option.

Each case is measured the same way for every backbone: build under ``torch.manual_seed(0)``
(digest of the initial weights: the order modules draw from the generator), then fill every
state_dict entry from one generator by sorted key (independent of the build order), draw x_t and
the condition from it, and hash the float32 bytes of `forward`, of `forward_features` at every tap
(``stop_early=False``) and, for nets with gradient checkpointing, of v and every parameter
gradient of one training-mode backward. ``python tests/test_backbone_digests.py`` prints the
table for the code as it is now.

Recorded with torch 2.9.1 (diffusers 0.42.1) on an x86-64 CPU (AMD EPYC), one thread: every row
at 9074574 (before the UNet skeleton, backbones/unet.py). The `forward` digests of the two
AudioDiT rows are also those recorded at a146dc8, before backbones/transformer.py (the first 16
hex digits of the digests test_audio_dit.py held). A CPU whose float kernels round differently
could change a digest with no change of code, so a failure there means: run this file at that
commit first.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from backbones import BACKBONES
from perceptual_diffusion.testing import one_thread

PARTS = ("keys", "init", "forward", "features", "train")

# (id, registry name, preset, overrides, one sample's shape)
CASES: list[tuple[str, str, str, dict[str, Any], tuple[int, ...]]] = [
    ("image-tiny", "image_unet", "tiny", {}, (3, 16, 16)),
    ("image-tiny-labels", "image_unet", "tiny", {"num_classes": 10}, (3, 16, 16)),
    ("image-tiny-context", "image_unet", "tiny", {"context_dim": 8}, (3, 16, 16)),
    ("image-tiny-qk-norm", "image_unet", "tiny", {"qk_norm": True, "num_classes": 10}, (3, 16, 16)),
    ("image-tiny-checkpointing", "image_unet", "tiny", {"gradient_checkpointing": True, "context_dim": 8},
     (3, 16, 16)),
    ("image-tiny-odd-size", "image_unet", "tiny", {"in_channels": 4, "out_channels": 2}, (4, 15, 9)),
    ("image-tiny-three-levels", "image_unet", "tiny",
     {"channel_mult": (1, 1, 2), "base_channels": 16, "num_res_blocks": 2, "attention_levels": (0, 2),
      "head_dim": None, "num_heads": 2}, (3, 12, 20)),
    ("image-small", "image_unet", "small", {"num_classes": 10}, (3, 16, 16)),
    ("image-default", "image_unet", "default", {"num_classes": 10}, (3, 16, 16)),
    ("video-tiny", "video_unet", "tiny", {}, (3, 4, 8, 8)),
    ("video-tiny-labels", "video_unet", "tiny", {"num_classes": 10}, (3, 4, 8, 8)),
    ("video-tiny-context", "video_unet", "tiny", {"context_dim": 8}, (3, 3, 8, 8)),
    ("video-tiny-qk-norm", "video_unet", "tiny", {"qk_norm": True, "num_classes": 10}, (3, 4, 8, 8)),
    ("video-tiny-checkpointing", "video_unet", "tiny", {"gradient_checkpointing": True, "context_dim": 8},
     (3, 3, 8, 8)),
    ("video-tiny-temporal-everywhere", "video_unet", "tiny",
     {"channel_mult": (1, 1, 2), "temporal_attention_levels": True}, (3, 3, 12, 8)),
    ("video-tiny-no-attention", "video_unet", "tiny",
     {"temporal_attention_levels": False, "attention_levels": ()}, (3, 2, 4, 4)),
    ("video-tiny-heads", "video_unet", "tiny",
     {"in_channels": 1, "out_channels": 2, "head_dim": None, "num_heads": 2, "num_res_blocks": 2}, (1, 5, 6, 10)),
    ("video-default", "video_unet", "default", {"num_classes": 10}, (3, 4, 8, 8)),
    ("audio-labels", "audio_dit", "tiny", {"num_classes": 3}, (1, 32)),
    ("audio-context", "audio_dit", "tiny", {"context_dim": 8, "depth": 2}, (1, 32)),
    ("image-dit-labels", "image_dit", "tiny", {"num_classes": 10}, (1, 8, 8)),
    ("image-dit-checkpointing", "image_dit", "tiny", {"gradient_checkpointing": True, "context_dim": 8},
     (1, 8, 8)),
    ("diffusers-tiny", "diffusers_unet", "tiny", {}, (4, 8, 8)),
    ("diffusers-tiny-checkpointing", "diffusers_unet", "tiny", {"gradient_checkpointing": True}, (4, 8, 8)),
]

# case id -> the first 16 hex digits of the sha256 of each part of PARTS that the case has
RECORDED: dict[str, str] = {
    "image-tiny": "6909f31e24008437 0afac4caee5687f1 0924785b12f8c9d5 61ce71ed897fb8d1",
    "image-tiny-labels": "a50ae60ce3712850 bed0c9a38e6e760a 58390be2f6a13717 b6d623bad2c8439f",
    "image-tiny-context": "ebbf7a58daa13c8f f3e047fb7e76b56e f17bc9cea16c732a a7a977e6929bdfe8",
    "image-tiny-qk-norm": "86215122fbc06b9d feacada7ad445176 2c84366c292ce127 ffb05941184c0cff",
    "image-tiny-checkpointing": "ebbf7a58daa13c8f f3e047fb7e76b56e f17bc9cea16c732a a7a977e6929bdfe8 4cb29b818073b3ab",
    "image-tiny-odd-size": "4e95d9515ddc54c1 77215e391e4f9aee 133c57f860524a86 ff05254507c8d6e7",
    "image-tiny-three-levels": "ba73191b7dbb05e0 619216843845fabc ff69fbf17673ea46 8e2d15d909fbfd0c",
    "image-small": "5454aa52f12a1709 90f5de3d60d9a3de cfafeb5e6ef860b2 35d4dab779f2d5c5",
    "image-default": "c19a2bdb81abdd05 4f372b0d49807644 962a7d655c6d4005 3f5648d50fec0bcc",
    "video-tiny": "0acc3362e6725f1a 572334d7ffa4a287 17699ccb38704ed8 3d00c6452e43accb",
    "video-tiny-labels": "9f6176da5b86ef9c b7a523ece4b2ae43 8fb30e0a49d1e3ba 1c8ce9e5f2904770",
    "video-tiny-context": "e04f573918d82f76 4be9f5a5c8b740fa 72c9bd48f007b436 12a79f75ce13f6b9",
    "video-tiny-qk-norm": "cf7d389fa50a7189 e240d84ed193631c 676058f5373c0c8b d5b0cd95e444503a",
    "video-tiny-checkpointing": "e04f573918d82f76 4be9f5a5c8b740fa 72c9bd48f007b436 12a79f75ce13f6b9 59ca669eb3ba2ee3",
    "video-tiny-temporal-everywhere": "73436e22b194179c f9f4171b78b11fde a8cd08ff900e7653 b0d9fd8cafa7f2e6",
    "video-tiny-no-attention": "46a565ee9da4d2a2 98a00e6041bee5fc ea33ca6cda3cb4d7 1766964b37b356dc",
    "video-tiny-heads": "4a2b0354b8532b55 ca2d58c114dd8e85 eb78fc8ff951e8ee f2b76db6ffbb3924",
    "video-default": "92b721ebe344d218 7a86ff2802d1e4e6 b79a8d9e2ef85ee9 7124901e5e92c84c",
    "audio-labels": "5f66ddbed46bba33 b86f077afbc426f1 a3fbbbdf2792860f b7ce27b6acb00b9f",
    "audio-context": "e38a7c87dbf62b59 6a85389b5cbb6a32 88b03244a5e0f345 b16b029b467d764a",
    "image-dit-labels": "1df9671efdd78715 425081fca6ffdbec 74e9dfb64591ebda 69597e742e877539",
    "image-dit-checkpointing": "946c028a5bc2e9e4 564b67e25049bd7a 40b954daf22922b9 f954957b4509a7e5 6dfdbfd39a1fb449",
    "diffusers-tiny": "15f49952e5821f6e ca860b1c66bd80a3 b11e57d79efccf79 67b198823975bccd",
    "diffusers-tiny-checkpointing": "15f49952e5821f6e ca860b1c66bd80a3 b11e57d79efccf79 67b198823975bccd 57a8f45827afadbd",
}


def digest(*tensors: Tensor) -> str:
    """The first 16 hex digits of the sha256 of the tensors' bytes, in order."""
    h = hashlib.sha256()
    for x in tensors:
        h.update(x.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def seeded_weights(net: nn.Module, g: torch.Generator, scale: float = 0.1) -> nn.Module:
    """Every state_dict entry of `net` drawn from `g` by sorted key, loaded strictly: the same
    weights whatever order the modules are built in."""
    state = {k: torch.randn(p.shape, generator=g) * scale for k, p in sorted(net.state_dict().items())}
    net.load_state_dict(state)
    return net


def _condition(net: nn.Module, g: torch.Generator) -> Any:
    """Labels (one real, one null) for a class-conditional net, a context of 5 tokens for one with
    cross-attention, else None."""
    config = getattr(net, "config", None)
    num_classes = getattr(config, "num_classes", None)
    context_dim = getattr(config, "context_dim", getattr(net, "context_dim", None))
    if num_classes:
        return torch.tensor([0, num_classes])
    if context_dim:
        return torch.randn(2, 5, context_dim, generator=g)
    return None


def measure(name: str, preset: str, overrides: dict[str, Any], shape: tuple[int, ...]) -> dict[str, str]:
    """The digests of PARTS for one case (`train` only with gradient checkpointing)."""
    with one_thread():
        torch.manual_seed(0)
        net = BACKBONES[name].from_preset(preset, **overrides).eval()
        state = net.state_dict()
        out = {"keys": hashlib.sha256("\n".join(f"{k} {tuple(p.shape)}" for k, p in state.items()).encode())
               .hexdigest()[:16],
               "init": digest(*state.values())}
        g = torch.Generator().manual_seed(0)
        seeded_weights(net, g)
        x = torch.randn(2, *shape, generator=g)
        cond = _condition(net, g)
        t = torch.tensor([3, 871])
        with torch.no_grad():
            out["forward"] = digest(net(x, t, cond))
            out["features"] = digest(*net.forward_features(x, t, cond, layers="all", stop_early=False).values())
        if overrides.get("gradient_checkpointing"):
            net.train()
            v = net(x, t, cond)
            v.square().mean().backward()
            out["train"] = digest(v, *(p.grad for p in net.parameters() if p.grad is not None))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_names_shapes_initial_weights_and_outputs_are_unchanged(case):
    case_id, *spec = case
    if BACKBONES.get(spec[0]) is None:
        pytest.skip(f"{spec[0]} is not installed (the `sd` extra)")
    got = measure(*spec)
    expected = dict(zip(PARTS, RECORDED[case_id].split()))
    changed = [part for part in PARTS if got.get(part) != expected.get(part)]
    assert not changed, f"{case_id}: {', '.join(changed)} changed; now {' '.join(got.values())}"


if __name__ == "__main__":
    for case_id, *spec in CASES:
        print(f'    "{case_id}": "{" ".join(measure(*spec).values())}",')
