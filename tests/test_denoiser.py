"""The Denoiser protocol, layer groups, TappedDenoiser early exit and HookedDenoiser adapters."""

import copy

import pytest
import torch
from helpers import TinyConvDenoiser
from torch import nn

from perceptual_diffusion import Denoiser, HookedDenoiser, NoiseSchedule, SelfPerceptual, make_perceptual
from perceptual_diffusion.denoiser import resolve_layers


def _count_calls(module: nn.Module) -> dict[str, int]:
    counts = {}
    for name, sub in module.named_modules():
        if name:
            counts[name] = 0
            sub.register_forward_hook(lambda m, i, o, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def test_resolve_layers_rejects_unknown_and_empty():
    taps = ("down.0", "mid", "up.0")
    with pytest.raises(ValueError, match="available taps: down.0, mid, up.0"):
        resolve_layers("down.7", taps)
    with pytest.raises(ValueError, match="selects no tap"):
        resolve_layers([], taps)
    assert resolve_layers("all", taps) == taps


def test_tapped_denoiser_early_exit_matches_full_forward_for_every_tap():
    torch.manual_seed(0)
    net = TinyConvDenoiser().eval()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 700])
    full = net.forward_features(x, t, layers="all", stop_early=False)
    for name in net.feature_layers:
        early = net.forward_features(x, t, layers=name)
        assert list(early) == [name]
        torch.testing.assert_close(early[name], full[name], rtol=0, atol=0)


def test_tapped_denoiser_mid_runs_no_decoder_module():
    net = TinyConvDenoiser()
    counts = _count_calls(net)
    net.forward_features(torch.randn(1, 2, 8, 8), torch.tensor([5]), layers="mid")
    assert counts["enc_in"] == counts["enc0"] == counts["enc1"] == counts["mid"] == 1
    assert counts["dec0"] == counts["dec1"] == counts["dec_out"] == 0
    net.forward_features(torch.randn(1, 2, 8, 8), torch.tensor([5]), layers="mid", stop_early=False)
    assert counts["dec_out"] == 1


class ThirdPartyNet(nn.Module):
    """A foreign model: its own forward signature, tuple-returning blocks, no taps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv1d(4, 4, 3, padding=1) for _ in range(2)])
        self.middle = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Conv1d(4, 1, 3, padding=1)

    def forward(self, sample, timestep, scale=1.0):
        h = self.stem(sample) + timestep.float()[:, None, None] / 1000
        for b in self.blocks:
            h = torch.tanh(b(h))
        h = torch.tanh(self.middle(h))
        return (self.head(h) * scale,)


def _hooked():
    torch.manual_seed(0)
    return HookedDenoiser(
        ThirdPartyNet(),
        layers={"down.0": "blocks.0", "down.1": "blocks.1", "mid": "middle", "up.0": "head"},
        forward=lambda m, x, t, cond: m(x, t)[0],
    )


def test_hooked_denoiser_implements_protocol_with_early_exit():
    net = _hooked()
    assert isinstance(net, Denoiser)
    assert net.feature_layers == ("down.0", "down.1", "mid", "up.0")
    x, t = torch.randn(3, 1, 12), torch.tensor([0, 10, 999])
    torch.testing.assert_close(net(x, t), net.module(x, t)[0])
    full = net.forward_features(x, t, layers="all", stop_early=False)
    counts = _count_calls(net.module)
    early = net.forward_features(x, t, layers="encoder+mid")
    assert list(early) == ["down.0", "down.1", "mid"]
    for k in early:
        torch.testing.assert_close(early[k], full[k], rtol=0, atol=0)
    assert counts["middle"] == 1 and counts["head"] == 0
    # the tap hooks are removed afterwards: only the counting hook is left on each submodule
    assert all(len(sub._forward_hooks) == 1 for name, sub in net.module.named_modules() if name)
    net(x, t)
    assert counts["head"] == 1


def test_hooked_denoiser_trains_with_sp_and_deep_copies():
    net = _hooked()
    frozen = make_perceptual(net)
    assert frozen.module is not net.module
    sp = SelfPerceptual(NoiseSchedule.linear(num_timesteps=100), frozen)
    loss = sp(net, torch.randn(4, 1, 12))
    loss.mean().backward()
    assert net.module.stem.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen.parameters())
    assert copy.deepcopy(net).feature_layers == net.feature_layers


def test_hooked_denoiser_bad_path_and_unrun_tap():
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        HookedDenoiser(ThirdPartyNet(), layers={"mid": "nope"})
    net = HookedDenoiser(ThirdPartyNet(), layers={"mid": "middle"}, forward=lambda m, x, t, c: x)
    with pytest.raises(RuntimeError, match="never ran"):
        net.forward_features(torch.randn(1, 1, 4), torch.tensor([1]), layers="mid")


def test_hooked_diffusers_unet_stops_before_up_blocks():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
    )
    net = HookedDenoiser(
        unet,
        layers={"down.0": "down_blocks.0", "down.1": "down_blocks.1", "mid": "mid_block",
                "up.0": "up_blocks.0", "up.1": "up_blocks.1"},
        forward=lambda m, x, t, cond: m(x, t).sample,
    )
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1, 900])
    full = net.forward_features(x, t, layers="all", stop_early=False)
    counts = _count_calls(unet)
    mid = net.forward_features(x, t, layers="mid")["mid"]
    torch.testing.assert_close(mid, full["mid"], rtol=0, atol=0)
    assert counts["mid_block"] == 1 and counts["down_blocks.1"] == 1
    assert counts["up_blocks.0"] == counts["up_blocks.1"] == counts["conv_out"] == 0
    assert full["down.0"].shape == (2, 8, 4, 4)  # a down block returns (h, skips): h is kept
