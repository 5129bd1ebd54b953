"""Refactors of the backbones change no network: the same state_dict names, shapes and order, the
same seeded initial weights, and bit for bit the same v, taps and (with checkpointing) gradients
for the same weights and inputs, per preset and option.

Each case is measured the same way for every backbone: build under ``torch.manual_seed(0)``
(digest of the initial weights: the order modules draw from the generator), then fill every
state_dict entry from one generator by sorted key (independent of the build order), draw x_t and
the condition from it, and take a fingerprint of `forward`, of `forward_features` at every tap
(``stop_early=False``) and, for nets with gradient checkpointing, of v and every parameter
gradient of one training-mode backward. ``python tests/test_backbone_digests.py`` prints the
table for the code as it is now.

Names, shapes and initial weights are hashed (exact on every CPU: the generator is). Outputs are
not: the float kernels of a CPU with AVX-512 round convolutions differently from one without, so
the bytes of a UNet's output differ between two machines of the same class with no change of code
(measured: every UNet row). An output's fingerprint is its norm and its projections on 4 fixed
random directions (all tensors of a part concatenated), compared to within 1e-4 of the norm: far
above rounding (about 1e-6 here), far below any change of the network.

Hashes recorded with torch 2.9.1 (diffusers 0.42.1) on an x86-64 CPU (AMD EPYC), one thread:
every row at 9074574 (before the UNet skeleton, backbones/unet.py). The fingerprints were
recorded at b1567d5 (whose outputs were the bytes of 9074574's on the machine that recorded
those), on an AMD EPYC with AVX-512.
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
    ("audio-spectrum", "audio_dit", "tiny", {"num_classes": 3, "front_end": "spectrum", "patch_size": 8}, (1, 64)),
    ("image-dit-labels", "image_dit", "tiny", {"num_classes": 10}, (1, 8, 8)),
    ("image-dit-checkpointing", "image_dit", "tiny", {"gradient_checkpointing": True, "context_dim": 8},
     (1, 8, 8)),
    ("diffusers-tiny", "diffusers_unet", "tiny", {}, (4, 8, 8)),
    ("diffusers-tiny-checkpointing", "diffusers_unet", "tiny", {"gradient_checkpointing": True}, (4, 8, 8)),
]

# case id -> the first 16 hex digits of the sha256 of `keys` and of `init`
RECORDED: dict[str, str] = {
    "image-tiny": "6909f31e24008437 0afac4caee5687f1",
    "image-tiny-labels": "a50ae60ce3712850 bed0c9a38e6e760a",
    "image-tiny-context": "ebbf7a58daa13c8f f3e047fb7e76b56e",
    "image-tiny-qk-norm": "86215122fbc06b9d feacada7ad445176",
    "image-tiny-checkpointing": "ebbf7a58daa13c8f f3e047fb7e76b56e",
    "image-tiny-odd-size": "4e95d9515ddc54c1 77215e391e4f9aee",
    "image-tiny-three-levels": "ba73191b7dbb05e0 619216843845fabc",
    "image-small": "5454aa52f12a1709 90f5de3d60d9a3de",
    "image-default": "c19a2bdb81abdd05 4f372b0d49807644",
    "video-tiny": "0acc3362e6725f1a 572334d7ffa4a287",
    "video-tiny-labels": "9f6176da5b86ef9c b7a523ece4b2ae43",
    "video-tiny-context": "e04f573918d82f76 4be9f5a5c8b740fa",
    "video-tiny-qk-norm": "cf7d389fa50a7189 e240d84ed193631c",
    "video-tiny-checkpointing": "e04f573918d82f76 4be9f5a5c8b740fa",
    "video-tiny-temporal-everywhere": "73436e22b194179c f9f4171b78b11fde",
    "video-tiny-no-attention": "46a565ee9da4d2a2 98a00e6041bee5fc",
    "video-tiny-heads": "4a2b0354b8532b55 ca2d58c114dd8e85",
    "video-default": "92b721ebe344d218 7a86ff2802d1e4e6",
    "audio-labels": "5f66ddbed46bba33 b86f077afbc426f1",
    "audio-context": "e38a7c87dbf62b59 6a85389b5cbb6a32",
    "audio-spectrum": "5f66ddbed46bba33 b86f077afbc426f1",
    "image-dit-labels": "1df9671efdd78715 425081fca6ffdbec",
    "image-dit-checkpointing": "946c028a5bc2e9e4 564b67e25049bd7a",
    "diffusers-tiny": "15f49952e5821f6e ca860b1c66bd80a3",
    "diffusers-tiny-checkpointing": "15f49952e5821f6e ca860b1c66bd80a3",
}

# case id -> the fingerprints of `forward`, `features` and `train` (python tests/test_backbone_digests.py)
FINGERPRINTS: dict[str, dict[str, list[float]]] = {
    "image-tiny": {"forward": [1536.0, 5.384965739600526, -0.08669934280177616, 0.16915796920081785, 0.1556817051244024, -0.14376154234588795], "features": [52224.0, 217.6452715893037, 0.8261513549942653, -0.30434784564852235, -1.2129388540572452, -0.3854901654733258]},
    "image-tiny-labels": {"forward": [1536.0, 4.374689454214719, -0.03269954708464029, 0.1934391497567457, 0.21524087643750275, -0.08508513195551366], "features": [52224.0, 212.2449350571773, 0.6482686433332492, -0.9818378306804889, 0.4150861720254039, 2.3781889717175178]},
    "image-tiny-context": {"forward": [1536.0, 7.872885998465882, 0.2110028830284903, 0.11039229032629183, 0.0962861236943263, -0.10699416390000213], "features": [52224.0, 234.9391933932873, 1.114340193106584, -1.3704788465393865, 2.143067913894363, 0.7527049720226929]},
    "image-tiny-qk-norm": {"forward": [1536.0, 5.894688133881953, -0.05342548856111323, 0.19463666127185986, 0.14309602221338985, -0.1765530595608461], "features": [52224.0, 230.5417528513732, -1.390210106320285, -2.095128509860371, -0.41628486029549067, 0.7061811624770679]},
    "image-tiny-checkpointing": {"forward": [1536.0, 7.872885998465882, 0.2110028830284903, 0.11039229032629183, 0.0962861236943263, -0.10699416390000213], "features": [52224.0, 234.9391933932873, 1.114340193106584, -1.3704788465393865, 2.143067913894363, 0.7527049720226929], "train": [534291.0, 7.883078306872675, 0.01112987983647765, 0.007655680577634514, 0.00915105080807834, 0.009662351842188248]},
    "image-tiny-odd-size": {"forward": [540.0, 2.3298330389473887, 0.029772763495909953, -0.03084688641872064, 0.03687394831873759, -0.1261384437148275], "features": [29040.0, 173.38192099859566, -0.4050691021421395, 0.4412648905031294, 0.44157982834413606, -1.646267229707818]},
    "image-tiny-three-levels": {"forward": [1440.0, 3.8886108837860514, -0.1851003601098525, -0.13096038665807797, 0.07299065884092594, -0.08164070916201593], "features": [23520.0, 91.19266100928824, -0.7868863436829967, 0.2180639840780229, -0.2758145458653271, -0.2087026794822574]},
    "image-small": {"forward": [1536.0, 6.582383512897171, 0.010493798927109249, 0.023727040199779968, 0.22163897272610197, -0.3736003481488468], "features": [135168.0, 105517.74356246245, 300.42165074451185, -12.885819237052942, 239.94213722155894, 369.83868458205086]},
    "image-default": {"forward": [1536.0, 5.831741813470769, 0.19734279960079018, 0.33794043054479017, 0.0272927769456486, -0.19287670125220324], "features": [134144.0, 1125594.4426741388, 1666.9149971816507, -733.884160164394, -1452.3400964662835, -1861.4116761074226]},
    "video-tiny": {"forward": [1536.0, 6.704897704866614, -0.2997512044170988, 0.2670061248370453, -0.012835336123960456, -0.08143393582174657], "features": [34816.0, 145.07942491368465, 0.11791593666530903, 0.4349840058553037, -1.0000456128378448, -0.16967981802469784]},
    "video-tiny-labels": {"forward": [1536.0, 6.136955548625287, -0.0021329315819733907, 0.20376515211768925, 0.127869922233566, -0.08473389412031712], "features": [34816.0, 115.96037237967857, -0.12242201791769627, 0.3883121482617814, 0.7210512468393321, 0.2711059361740169]},
    "video-tiny-context": {"forward": [1152.0, 5.815463055453669, -0.03880125335267048, -0.004262085595842333, 0.15227069211784347, 0.20855876430016546], "features": [26112.0, 149.2347103058442, -0.8160391514614038, 0.10224680991768079, -0.49944034092412126, 0.8515855418901488]},
    "video-tiny-qk-norm": {"forward": [1536.0, 4.092106758173453, -0.027595673249859676, 0.07249975965656863, 0.096609675592526, -0.09071741973291275], "features": [34816.0, 131.00039399764273, -0.867212213473989, 0.7899477674347408, -0.9342414514160882, -0.20823064874418679]},
    "video-tiny-checkpointing": {"forward": [1152.0, 5.815463055453669, -0.03880125335267048, -0.004262085595842333, 0.15227069211784347, 0.20855876430016546], "features": [26112.0, 149.2347103058442, -0.8160391514614038, 0.10224680991768079, -0.49944034092412126, 0.8515855418901488], "train": [335683.0, 5.822334197155595, -0.0027211784155352975, -0.0004172435212504537, 0.011874063603337433, -0.01683702375487555]},
    "video-tiny-temporal-everywhere": {"forward": [1728.0, 3.6122321787937683, -0.10251248549866251, 0.14179502176680497, 0.05454233369429953, -0.16398351868618874], "features": [28224.0, 102.2780114761433, -0.09549396180251368, 0.6040131340637473, -0.68803176074418, -0.925584228074862]},
    "video-tiny-no-attention": {"forward": [192.0, 1.53769771433785, -0.2130508664687049, 0.21724766098346632, 0.0024374176089472406, -0.0862185292763055], "features": [4352.0, 26.096034202537584, 0.5354590781922026, -0.5458197739646384, 0.10992515883832599, 0.035280999042543004]},
    "video-tiny-heads": {"forward": [1200.0, 2.735024167331733, -0.005165613564711208, -0.04604590126023399, 0.007297559094953103, 0.06929319410414325], "features": [40800.0, 157.86708633285824, 0.011838353668558413, -0.23424152135951548, -0.42225639429385886, 0.9812247287951184]},
    "video-default": {"forward": [1536.0, 7.018154572609133, 0.05982620597543352, -0.025124610090716662, -0.09247079188325445, 0.12458096393307078], "features": [135168.0, 88116.8467032361, -40.94672817670701, -258.89611157106174, 13.931122189138904, 119.10126935380886]},
    "audio-labels": {"forward": [64.0, 5.8151874599320355, 0.5573914636635836, 1.2040194587970254, 0.22454801445791592, -0.38637797431475984], "features": [1024.0, 29.50305824307582, -0.517867565470627, -0.710251694648149, 1.6232383764967264, 0.4967750351443627]},
    "audio-context": {"forward": [64.0, 7.767771452134923, -0.9838369763119128, -0.1826628313145035, 1.07611391959143, -1.5273312800798635], "features": [512.0, 20.269518759222105, -0.0381457022152254, -0.44891267394460743, -0.4257316391672117, 0.3055579196167879]},
    "audio-spectrum": {"forward": [128.0, 8.392832634785396, -0.821097106525532, -1.232552787799493, -0.5275609745584382, -1.8621387129319746], "features": [2048.0, 38.95030019342996, -0.7131357923328734, 1.0593480319358441, 1.124987807499951, 0.8470174005890592]},
    "image-dit-labels": {"forward": [128.0, 6.948135917825187, 0.10728019773606051, -0.9373041199544303, -0.7824610041905018, 1.5008948196502798], "features": [12288.0, 96.08195469999501, 0.537208872097367, 0.4876396269314859, -0.35643484747961585, -0.31758392589778195]},
    "image-dit-checkpointing": {"forward": [128.0, 10.456286701063679, -0.2405099529161599, 0.25226254361712586, -1.2304520935596586, -0.7679429187733459], "features": [12288.0, 101.15466528042093, 0.5847568127809644, 0.6246876151534804, -0.1530570610505566, -1.7663844189024815], "train": [533060.0, 17.132870946866234, 0.003810826534035399, -0.012012693341453638, -0.024314348802438036, 0.01079542348308337]},
    "diffusers-tiny": {"forward": [512.0, 3.101725699956339, -0.010196798517574442, 0.16322086272192168, 0.08579608093569877, -0.12344402906058703], "features": [8704.0, 43.48539280851938, 0.01321032145119505, -0.08290210648385513, 0.53092273464268, 0.3681934948475054]},
    "diffusers-tiny-checkpointing": {"forward": [512.0, 3.101725699956339, -0.010196798517574442, 0.16322086272192168, 0.08579608093569877, -0.12344402906058703], "features": [8704.0, 43.48539280851938, 0.01321032145119505, -0.08290210648385513, 0.53092273464268, 0.3681934948475054], "train": [203716.0, 3.108206494959645, -0.00026289856288497053, -0.0017280123453830166, 0.010455138941292456, -0.0028845900239162676]},
}


def digest(*tensors: Tensor) -> str:
    """The first 16 hex digits of the sha256 of the tensors' bytes, in order."""
    h = hashlib.sha256()
    for x in tensors:
        h.update(x.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(*tensors: Tensor) -> list[float]:
    """[size, norm, 4 projections] of the tensors flattened and concatenated in order, in float64;
    the directions are standard normal vectors drawn from a fixed seed (so a projection is about
    norm / sqrt(size))."""
    v = torch.cat([x.detach().double().flatten() for x in tensors])
    g = torch.Generator().manual_seed(1234)
    directions = torch.randn(4, v.numel(), generator=g, dtype=torch.float64) / v.numel() ** 0.5
    return [float(v.numel()), float(v.norm())] + [float(d @ v) for d in directions]


def same_fingerprint(got: list[float], expected: list[float], tol: float = 1e-3) -> bool:
    """The same size; the norm within `tol` / 100 of itself; each projection within `tol` x the
    size of a projection (norm / sqrt(size)): rounding moves them about 1e-6 of that."""
    if len(got) != len(expected) or got[0] != expected[0]:
        return False
    norm, unit = expected[1], expected[1] / expected[0] ** 0.5
    return abs(got[1] - norm) <= tol / 100 * norm and all(abs(a - b) <= tol * unit for a, b in zip(got[2:], expected[2:]))


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


def measure(name: str, preset: str, overrides: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """The hashes of `keys` and `init` and the fingerprints of `forward`, `features` and (with
    gradient checkpointing only) `train` for one case."""
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
            out["forward"] = fingerprint(net(x, t, cond))
            out["features"] = fingerprint(*net.forward_features(x, t, cond, layers="all", stop_early=False).values())
        if overrides.get("gradient_checkpointing"):
            net.train()
            v = net(x, t, cond)
            v.square().mean().backward()
            out["train"] = fingerprint(v, *(p.grad for p in net.parameters() if p.grad is not None))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_names_shapes_initial_weights_and_outputs_are_unchanged(case):
    case_id, *spec = case
    if BACKBONES.get(spec[0]) is None:
        pytest.skip(f"{spec[0]} is not installed (the `sd` extra)")
    got = measure(*spec)
    hashes = dict(zip(("keys", "init"), RECORDED[case_id].split()[:2]))
    changed = [part for part in hashes if got[part] != hashes[part]]
    expected = FINGERPRINTS[case_id]
    changed += [part for part in ("forward", "features", "train")
                if (part in got) != (part in expected) or (part in got and not same_fingerprint(got[part], expected[part]))]
    assert not changed, f"{case_id}: {', '.join(changed)} changed; now {got}"


def test_a_fingerprint_tells_a_changed_output_from_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    ref = fingerprint(x)
    assert same_fingerprint(fingerprint(x * (1 + 1e-6)), ref)                      # rounding-sized
    assert same_fingerprint(fingerprint(x + 1e-7 * torch.randn(x.shape, generator=g)), ref)
    assert not same_fingerprint(fingerprint(x.flip(-1)), ref)                        # same norm, moved
    y = x.clone()
    y[0, 0, 0, 0] += 0.05 * x.norm()                                                 # one entry changed
    assert not same_fingerprint(fingerprint(y), ref)
    assert not same_fingerprint(fingerprint(x, x[:1]), ref)                          # another part


if __name__ == "__main__":
    rows = {case_id: measure(*spec) for case_id, *spec in CASES if BACKBONES.get(spec[0]) is not None}
    for case_id, got in rows.items():
        print(f'    "{case_id}": "{got["keys"]} {got["init"]}",')
    print()
    for case_id, got in rows.items():
        parts = ", ".join(f'"{p}": [{", ".join(repr(v) for v in got[p])}]' for p in ("forward", "features", "train")
                          if p in got)
        print(f'    "{case_id}": {{{parts}}},')
