"""DiffusersUNet against diffusers itself: the forward and every tap against UNet2DConditionModel
and its block outputs, early exit by call counts, ddim_sample against a DDIMScheduler loop and
against StableDiffusionPipeline (CFG + rescale), the SP objective, export -> from_pretrained, errors."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from hypothesis import given, settings
from hypothesis import strategies as st
from sd_tiny import CONTEXT_DIM, MAX_LENGTH, encode, tiny_pipeline, tiny_scheduler, tiny_unet

from backbones.diffusers_unet import DiffusersUNet, ddim_scheduler_config, export_diffusers
from perceptual_diffusion.config import ScheduleConfig
from perceptual_diffusion.denoiser import Denoiser
from perceptual_diffusion.objectives import SelfPerceptual, make_perceptual
from perceptual_diffusion.sampling import ddim_sample
from perceptual_diffusion.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.scaled_linear(1000, beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True)
SCHEDULE_CFG = ScheduleConfig(kind="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              zero_terminal_snr=True)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def net() -> DiffusersUNet:
    return DiffusersUNet(tiny_unet(seed=0))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tok"), seed=0)


def record_blocks(unet):
    """Forward hooks on every down/mid/up block and conv_out: outputs (h of a tuple) and call counts."""
    outputs, calls, handles = {}, {}, []
    named = {f"down.{i}": b for i, b in enumerate(unet.down_blocks)}
    named["mid"] = unet.mid_block
    named.update({f"up.{i}": b for i, b in enumerate(unet.up_blocks)})
    named["conv_out"] = unet.conv_out

    def hook(name):
        def fn(_m, _inp, out):
            outputs[name] = out[0] if isinstance(out, tuple) else out
            calls[name] = calls.get(name, 0) + 1
        return fn

    for name, module in named.items():
        handles.append(module.register_forward_hook(hook(name)))
    return outputs, calls, handles


# ------------------------------------------------------------------ forward and taps
def test_protocol_and_feature_layers(net):
    assert isinstance(net, Denoiser)
    assert net.feature_layers == ("down.0", "down.1", "mid", "up.0", "up.1")
    assert sum(p.numel() for p in net.parameters()) < 1_000_000
    assert {n for n, _ in net.state_dict().items() if not n.startswith("unet.")} == {"null_context"}


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 4, 6, 10), (2, 4, 7, 9)])
def test_forward_equals_diffusers(net, shape):
    x, ctx = randn(*shape), randn(shape[0], 5, CONTEXT_DIM, seed=1)
    t = torch.tensor([999, 17])[: shape[0]]
    with torch.no_grad():
        ours = net(x, t, ctx)
        ref = net.unet(x, t, encoder_hidden_states=ctx).sample
    assert ours.shape == x.shape
    assert torch.equal(ours, ref)


@settings(max_examples=8, deadline=None)
@given(h=st.integers(3, 12), w=st.integers(3, 12), t=st.integers(0, 999), length=st.integers(1, 6))
def test_forward_equals_diffusers_any_size(h, w, t, length):
    net = DiffusersUNet(tiny_unet(seed=0))
    x, ctx = randn(1, 4, h, w, seed=h * w), randn(1, length, CONTEXT_DIM, seed=t)
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([t]), ctx), net.unet(x, t, encoder_hidden_states=ctx).sample)


def test_taps_equal_hooked_block_outputs(net):
    x, t, ctx = randn(2, 4, 8, 8), torch.tensor([5, 600]), randn(2, 3, CONTEXT_DIM, seed=2)
    outputs, _calls, handles = record_blocks(net.unet)
    try:
        with torch.no_grad():
            net.unet(x, t, encoder_hidden_states=ctx)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        feats = net.forward_features(x, t, ctx, layers="all", stop_early=False)
    assert list(feats) == list(net.feature_layers)
    for name, f in feats.items():
        assert torch.equal(f, outputs[name]), name
        info = net.feature_info[name]
        assert f.shape == (2, info["channels"], 8 // info["reduction"], 8 // info["reduction"]), name


def test_stop_early_at_mid_runs_nothing_after(net):
    x, t, ctx = randn(2, 4, 8, 8), torch.tensor([5, 600]), randn(2, 3, CONTEXT_DIM, seed=2)
    with torch.no_grad():
        full = net.forward_features(x, t, ctx, layers="mid", stop_early=False)["mid"]
    for layers, ran in [("mid", {"down.0", "down.1", "mid"}), ("down.0", {"down.0"})]:
        _outputs, calls, handles = record_blocks(net.unet)
        try:
            with torch.no_grad():
                feats = net.forward_features(x, t, ctx, layers=layers)
        finally:
            for h in handles:
                h.remove()
        assert calls == {name: 1 for name in ran}, layers  # no up block, no conv_out
        assert set(feats) == {layers}
    with torch.no_grad():
        assert torch.equal(net.forward_features(x, t, ctx, layers="mid")["mid"], full)


def test_feature_info_of_sd21_base_architecture():
    # built on the meta device: the real architecture's shapes without 3.5 GB of weights
    with torch.device("meta"):
        big = DiffusersUNet.from_preset("sd21-base")
    assert sum(p.numel() for p in big.unet.parameters()) == 865_910_724  # the SD 2.x UNet
    cfg = big.unet.config
    assert tuple(cfg.attention_head_dim) == (5, 10, 20, 20) and cfg.cross_attention_dim == 1024
    assert cfg.use_linear_projection and cfg.sample_size == 64
    assert big.feature_info["mid"] == {"channels": 1280, "reduction": 8}
    assert [big.feature_info[f"down.{i}"]["reduction"] for i in range(4)] == [2, 4, 8, 8]
    assert [big.feature_info[f"up.{i}"]["channels"] for i in range(4)] == [1280, 1280, 640, 320]


# ------------------------------------------------------------------ null context
def test_null_context(net, pipe, tmp_path):
    adapter = DiffusersUNet(tiny_unet(seed=0))
    x, t = randn(2, 4, 8, 8), torch.tensor([10, 500])
    with pytest.raises(ValueError, match="set_null_context"):
        adapter(x, t, None)
    null = encode(pipe, [""])
    adapter.set_null_context(null)
    expanded = adapter.null_cond(randn(2, MAX_LENGTH, CONTEXT_DIM))
    assert expanded.shape == (2, MAX_LENGTH, CONTEXT_DIM) and torch.equal(expanded[1], null[0])
    assert adapter.null_cond(None) is None
    with torch.no_grad():
        assert torch.equal(adapter(x, t, None), adapter(x, t, null.expand(2, -1, -1)))
    # persistent: a fresh adapter (no null context yet) takes it from the state dict, and so does a copy
    fresh = DiffusersUNet(tiny_unet(seed=0))
    fresh.load_state_dict(adapter.state_dict())
    assert torch.equal(fresh.null_context, null)
    assert torch.equal(make_perceptual(adapter).null_context, null)
    with pytest.raises(ValueError, match=r"\[1 x L x D\]"):
        adapter.set_null_context(null.expand(2, -1, -1))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        adapter.set_null_context(randn(1, 4, CONTEXT_DIM + 1))


# ------------------------------------------------------------------ samplers
def _hand_ddim(unet, noise, ctx, steps):
    sched = tiny_scheduler()
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        v = unet(x, t, encoder_hidden_states=ctx).sample
        x = sched.step(v, t, x).prev_sample
    return x


@torch.no_grad()
def test_ddim_sample_equals_diffusers_loop(net):
    noise, ctx = randn(2, 4, 8, 8, seed=3), randn(2, 4, CONTEXT_DIM, seed=4)
    ours = ddim_sample(net, SCHEDULE, noise, cond=ctx, steps=10)
    ref = _hand_ddim(net.unet, noise, ctx, 10)
    assert (ours - ref).abs().max().item() < 1e-5
    other = ddim_sample(net, SCHEDULE, noise, cond=ctx.flip(0), steps=10)
    assert (other - ours).abs().max().item() > 1e-3  # the context matters


@torch.no_grad()
def test_cfg_equals_stable_diffusion_pipeline(pipe):
    adapter = DiffusersUNet(pipe.unet)
    prompts, steps = ["the cat", "a dog"], 10
    adapter.set_null_context(encode(pipe, [""]))
    ctx = encode(pipe, prompts)
    noise = randn(2, 4, 8, 8, seed=5)
    ours = ddim_sample(adapter, SCHEDULE, noise, cond=ctx, steps=steps, guidance_scale=7.5, guidance_rescale=0.7)
    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, guidance_rescale=0.7, output_type="latent",
               latents=noise.clone()).images
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
    plain = ddim_sample(adapter, SCHEDULE, noise, cond=ctx, steps=steps, guidance_scale=7.5)
    assert (plain - ours).abs().max().item() > 1e-3  # the rescale is exercised


# ------------------------------------------------------------------ the SP objective
def test_self_perceptual_on_adapter():
    online = DiffusersUNet(tiny_unet(seed=0)).train()
    frozen = make_perceptual(online)
    sp = SelfPerceptual(SCHEDULE, frozen, layers="mid")
    x0, ctx = randn(2, 4, 8, 8, seed=6), randn(2, 3, CONTEXT_DIM, seed=7)
    noise, t = randn(2, 4, 8, 8, seed=8), torch.tensor([100, 700])
    loss = sp(online, x0, cond=ctx, t=t, t_prime=torch.tensor([400, 50]), noise=noise)
    assert loss.shape == (2,) and bool((loss > 0).all()) and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    grads = {n: p.grad for n, p in online.named_parameters()}
    assert all(g is not None for g in grads.values())
    for name in ("unet.conv_in.weight", "unet.down_blocks.0.attentions.0.proj_in.weight", "unet.conv_out.weight"):
        assert grads[name].abs().sum().item() > 0, name
    # eq. 13: at t' = t the renoised input is x_t itself, so the loss is exactly 0
    zero = sp(online, x0, cond=ctx, t=t, t_prime=t, noise=noise)
    assert torch.equal(zero, torch.zeros(2))


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_scheduler_config_reproduces_schedule(kind, zero_snr):
    beta = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (0.00085, 0.012)}[kind]
    cfg = ScheduleConfig(kind=kind, num_timesteps=1000, beta_start=beta[0], beta_end=beta[1],
                         zero_terminal_snr=zero_snr)
    sched = diffusers.DDIMScheduler(**ddim_scheduler_config(cfg))
    kwargs = {} if kind == "cosine" else {"beta_start": beta[0], "beta_end": beta[1]}
    ours = NoiseSchedule.from_name(kind, num_timesteps=1000, zero_terminal_snr=zero_snr, **kwargs)
    torch.testing.assert_close(sched.alphas_cumprod.double(), ours.alphas_cumprod, rtol=1e-5, atol=1e-6)
    sched.set_timesteps(25)
    assert sched.timesteps.tolist() == ours.timesteps(25).tolist()


def test_scheduler_config_errors():
    with pytest.raises(ValueError, match="kind 'sigmoid'"):
        ddim_scheduler_config(ScheduleConfig(kind="sigmoid"))
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        ddim_scheduler_config({"kind": "linear", "num_timesteps": 10, "beta_start": 1e-4, "beta_end": 0.02})
    with pytest.raises(TypeError, match="ScheduleConfig"):
        ddim_scheduler_config(SCHEDULE)


def test_export_loads_as_stable_diffusion_pipeline(pipe, tmp_path):
    source = tmp_path / "source"
    pipe.save_pretrained(source)
    net = DiffusersUNet(tiny_unet(seed=3))  # not the source's UNet: the exported one must be loaded
    out = export_diffusers(net, tmp_path / "export", SCHEDULE_CFG, components_from=source)

    loaded = diffusers.StableDiffusionPipeline.from_pretrained(out)
    loaded.set_progress_bar_config(disable=True)
    cfg = loaded.scheduler.config
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    expected = {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": True}
    assert {k: cfg[k] for k in expected} == expected
    assert json.loads((out / "model_index.json").read_text())["requires_safety_checker"] is False
    for name, p in net.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], p), name
    for name, p in pipe.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[name], p), name

    # the reloaded pipeline samples what ddim_sample gives with the same UNet and contexts
    with torch.no_grad():
        adapter = DiffusersUNet(loaded.unet)
        adapter.set_null_context(encode(loaded, [""]))
        noise = randn(1, 4, 8, 8, seed=9)
        ref = loaded("the cat", num_inference_steps=5, guidance_scale=3.0, output_type="latent",
                     latents=noise.clone()).images
        ours = ddim_sample(adapter, SCHEDULE, noise, cond=encode(loaded, ["the cat"]), steps=5, guidance_scale=3.0)
        assert (ours - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
        image = loaded("the cat", num_inference_steps=2, output_type="np", latents=noise.clone()).images
    assert image.shape == (1, 16, 16, 3) and bool((image >= 0).all() and (image <= 1).all())

    # SD's original scheduler setting is available; the last DDIM step then keeps a little noise
    sd_style = export_diffusers(net, tmp_path / "sd_style", SCHEDULE_CFG, set_alpha_to_one=False)
    assert json.loads((sd_style / "scheduler" / "scheduler_config.json").read_text())["set_alpha_to_one"] is False
    assert not (sd_style / "vae").exists()
    reloaded = DiffusersUNet.from_pretrained(sd_style)
    assert all(torch.equal(reloaded.unet.state_dict()[k], v) for k, v in net.unet.state_dict().items())


def test_export_errors(tmp_path):
    net = DiffusersUNet(tiny_unet(seed=0))
    with pytest.raises(FileNotFoundError, match="vae, text_encoder, tokenizer"):
        export_diffusers(net, tmp_path / "x", SCHEDULE_CFG, components_from=tmp_path / "missing")
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        export_diffusers(torch.nn.Linear(2, 2), tmp_path / "y", SCHEDULE_CFG)


# ------------------------------------------------------------------ constructors and errors
def test_constructors_agree(tmp_path):
    net = DiffusersUNet.from_preset("tiny")
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert public(DiffusersUNet.from_config(net.unet.config).unet.config) == public(net.unet.config)
    net.unet.save_pretrained(tmp_path / "m" / "unet")
    loaded = DiffusersUNet.from_pretrained(tmp_path / "m", in_channels=4, num_classes=None)
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in net.unet.state_dict().items())
    # the trainer's overrides: in_channels sets the fresh UNet's in and out channels
    three = DiffusersUNet.from_preset("tiny", in_channels=3, num_classes=None)
    assert (three.unet.config.in_channels, three.unet.config.out_channels) == (3, 3)
    with torch.no_grad():
        assert three(randn(1, 3, 8, 8), torch.tensor([3]), randn(1, 2, CONTEXT_DIM)).shape == (1, 3, 8, 8)
    assert DiffusersUNet.from_preset("tiny", gradient_checkpointing=True).unet.is_gradient_checkpointing


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"num_class_embeds": 10}, "class embeddings"),
        ({"class_embed_type": "timestep"}, "class embeddings"),
        ({"addition_embed_type": "text", "encoder_hid_dim": 32}, "addition_embed_type='text'"),
        ({"time_cond_proj_dim": 8}, "time_cond_proj_dim"),
        ({"mid_block_type": None}, "no midblock"),
        ({"down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")}, "SimpleCrossAttnDownBlock2D"),
    ],
)
def test_unsupported_configurations(overrides, match):
    with pytest.raises(NotImplementedError, match=match):
        DiffusersUNet.from_preset("tiny", **overrides)


def test_errors(net, tmp_path):
    unet = net.unet
    with pytest.raises(ValueError, match="in_channels=3 does not match.*in_channels=4"):
        DiffusersUNet(unet, in_channels=3)
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="in_channels=3"):
        DiffusersUNet.from_pretrained(tmp_path, in_channels=3)
    with pytest.raises(ValueError, match="num_classes=10"):
        DiffusersUNet(unet, num_classes=10)
    with pytest.raises(ValueError, match="num_classes=10"):
        DiffusersUNet.from_preset("tiny", num_classes=10)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        DiffusersUNet(torch.nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match="tiny.*sd21-base"):
        DiffusersUNet.from_preset("huge")
    with pytest.raises(TypeError, match="'block_out_channel'"):
        DiffusersUNet.from_preset("tiny", block_out_channel=(8, 16))
    x, t = randn(2, 4, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="set_null_context"):
        net(x, t, None)
    with pytest.raises(ValueError, match="set_null_context"):  # CFG needs the null context too
        ddim_sample(net, SCHEDULE, x, cond=randn(2, 3, CONTEXT_DIM), steps=2, guidance_scale=2.0)
    with pytest.raises(TypeError, match="float context"):
        net(x, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="N=2"):
        net(x, t, randn(3, 4, CONTEXT_DIM))
    with pytest.raises(ValueError, match="cross_attention_dim is 32"):
        net(x, t, randn(2, 4, 16))
