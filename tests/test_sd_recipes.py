"""The Stable Diffusion 2.1 recipes end to end, offline: the shipped recipes/image/sd21_*.toml
run a few steps on tiny components built from configs (UNet, VAE, CLIP text encoder and a local
tokenizer, saved as a diffusers model directory) and on LAION-style shards written here, then
the trained UNet is exported and reloaded by diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from perceptual_diffusion.checkpoint import final_checkpoint, load_checkpoint  # noqa: E402
from perceptual_diffusion.cli import main  # noqa: E402
from perceptual_diffusion.config import RecipeError, load_recipe  # noqa: E402
from perceptual_diffusion.datasets.shards import write_shards  # noqa: E402
from perceptual_diffusion.trainer import Trainer  # noqa: E402

from helpers import accelerate_launch  # noqa: E402
from sd_tiny import tiny_pipeline, write_tokenizer_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a cat", "the dog", "a dog", "the cat"]


@pytest.fixture(scope="module")
def sd_world(tmp_path_factory):
    """A tiny SD model directory and 2 shards of 10 samples (2 of them filtered out)."""
    root = tmp_path_factory.mktemp("sd")
    pipe = tiny_pipeline(write_tokenizer_files(root / "tok"))
    model_dir = root / "model"
    pipe.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(10):
        im = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
        small = i == 3  # the resolution filter drops it
        ugly = i == 7  # the aesthetic filter drops it
        meta = {"width": 300 if small else 600, "height": 600, "aesthetic": 5.0 if ugly else 6.5}
        samples.append((f"{i:05d}", im, CAPTIONS[i % 4], meta))
    write_shards(samples, root / "shards", per_shard=5)
    return model_dir, root / "shards"


def _overrides(model_dir: Path, shards: Path) -> list[str]:
    return [f"model.pretrained={json.dumps(str(model_dir))}", f"model.latent={json.dumps(str(model_dir))}",
            "model.overrides={}", f"data.path={json.dumps(str(shards))}", "data.size=16",
            "data.num_workers=0", "train.mixed_precision='no'", "train.sample_every=2", "train.num_samples=2",
            "train.sample_steps=2", "train.checkpoint_every=0", "train.log_every=1"]


def _stage(name: str, steps: int = 2) -> list[str]:
    return [f"{name}.steps={steps}", f"{name}.batch_size=2", f"{name}.grad_accum=1", f"{name}.warmup_steps=0"]


def test_t2i_mse_then_sp_then_export_and_reload(sd_world, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    model_dir, shards = sd_world
    base = _overrides(model_dir, shards)
    mse_run = tmp_path / "runs" / "sd21_t2i_mse"
    recipe = load_recipe(ROOT / "recipes/image/sd21_t2i_mse.toml", base + _stage("mse"))
    assert (recipe.data.min_size, recipe.data.min_aesthetic, recipe.mse.cond_dropout) == (513, 6.0, 0.1)
    trainer = Trainer(recipe, mse_run, progress=False)
    assert trainer.dataset.stats["kept"] == 8  # the size and aesthetic filters each drop one
    assert tuple(trainer.previews.noise.shape) == (2, 4, 8, 8)  # VAE latents of 16x16 images
    trainer.run()
    ck = load_checkpoint(final_checkpoint(mse_run, "mse"))
    null = ck.weights["ema"]["null_context"]
    torch.testing.assert_close(null, trainer.latent.null_context().cpu())  # the empty prompt's context
    with Image.open(mse_run / "samples" / "mse-0000002.png") as im:
        assert im.mode == "RGB"  # decoded by the VAE, not raw latents

    sp_run = tmp_path / "runs" / "sd21_t2i_sp"
    recipe = load_recipe(ROOT / "recipes/image/sd21_t2i_sp.toml",
                         base + _stage("sp") + [f"sp.init={json.dumps(str(mse_run))}"])
    assert (recipe.sp.cond_dropout, recipe.sp.layers, tuple(recipe.train.stages)) == (0.0, "mid", ("sp",))
    result = Trainer(recipe, sp_run, progress=False).run()
    assert result.stages[0].stage == "sp" and np.isfinite(result.stages[0].final_loss)

    out = tmp_path / "export"
    assert main(["export", str(sp_run), str(out)]) == 0
    assert "text_encoder" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(out)
    cfg = pipe.scheduler.config
    assert (cfg.prediction_type, cfg.timestep_spacing, cfg.rescale_betas_zero_snr) == ("v_prediction", "trailing", True)
    ema = load_checkpoint(final_checkpoint(sp_run, "sp")).weights["ema"]
    for name, p in pipe.unet.state_dict().items():
        torch.testing.assert_close(p, ema[f"unet.{name}"], rtol=0, atol=0)
    image = pipe("a cat", num_inference_steps=2, guidance_scale=7.5, guidance_rescale=0.7, height=16, width=16,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()

    png = tmp_path / "cats.png"
    assert main(["sample", str(sp_run), "--n", "2", "--steps", "2", "--guidance", "7.5", "--rescale", "0.7",
                 "--prompt", "a cat", "--prompt", "the dog", "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.mode == "RGB"


def test_uncond_recipe_trains_on_the_empty_prompt(sd_world, tmp_path):
    model_dir, shards = sd_world
    recipe = load_recipe(ROOT / "recipes/image/sd21_uncond_mse.toml",
                         _overrides(model_dir, shards) + _stage("mse", 1) + ["train.sample_every=0"])
    trainer = Trainer(recipe, tmp_path / "u", progress=False)
    assert recipe.data.empty_captions and {trainer.dataset[i]["caption"] for i in range(8)} == {""}
    batch = {"caption": ["", ""]}
    gen = torch.Generator().manual_seed(0)
    cond = trainer.condition(batch, 0.0, gen)
    torch.testing.assert_close(cond, trainer.latent.null_context().expand(2, -1, -1))
    trainer.run()


def test_text_dropout_replaces_contexts_with_the_empty_prompt(sd_world, tmp_path):
    model_dir, shards = sd_world
    recipe = load_recipe(ROOT / "recipes/image/sd21_t2i_mse.toml", _overrides(model_dir, shards) + _stage("mse"))
    trainer = Trainer(recipe, tmp_path / "d", progress=False)
    prompts = ["a cat"] * 64
    full = trainer.latent.encode_prompts(prompts)
    null = trainer.latent.null_context()
    got = trainer.condition({"caption": prompts}, 0.5, torch.Generator().manual_seed(0))
    dropped = [bool(torch.equal(got[i], null[0])) for i in range(64)]
    kept = [bool(torch.equal(got[i], full[i])) for i in range(64)]
    assert all(d != k for d, k in zip(dropped, kept)) and 16 < sum(dropped) < 48
    assert trainer.condition({"caption": prompts}, 0.0, torch.Generator()).equal(full)


def test_sd_recipe_errors(sd_world, tmp_path):
    model_dir, shards = sd_world
    base = _overrides(model_dir, shards)
    with pytest.raises(RecipeError, match="model.latent needs RGB images"):
        load_recipe(ROOT / "recipes/image/sd21_t2i_mse.toml", base + ["data.channels=1"])
    with pytest.raises(RecipeError, match="model.pretrained loads diffusers UNets only"):
        load_recipe(ROOT / "recipes/image/circles.toml", [f"model.pretrained={json.dumps(str(model_dir))}"])
    with pytest.raises(RecipeError, match="sp.init"):
        load_recipe(ROOT / "recipes/image/sd21_t2i_sp.toml", base + ["sp.init='runs/nowhere'"])
    missing = base + [f"model.pretrained={json.dumps(str(tmp_path / 'nothing'))}"] + _stage("mse")
    with pytest.raises(RecipeError, match="model.pretrained"):
        Trainer(load_recipe(ROOT / "recipes/image/sd21_t2i_mse.toml", missing), tmp_path / "m", progress=False).run()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_xformers_attention_on_cpu_is_one_line_and_exit_2(sd_world, tmp_path, capsys):
    pytest.importorskip("xformers")
    model_dir, shards = sd_world
    sets = _overrides(model_dir, shards) + _stage("mse") + ["model.overrides={attention_backend='xformers'}"]
    code = main(["train", str(ROOT / "recipes/image/sd21_t2i_mse.toml"), "--out", str(tmp_path / "x"),
                 "--no-progress", *[a for s in sets for a in ("--set", s)]])
    # (diffusers and transformers draw their own loading bars on stderr before the error)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("perceptual-diffusion")]
    assert code == 2 and len(err) == 1, err
    assert "model: attention_backend='xformers' cannot run on cpu" in err[0]


def test_latent_and_diffusers_unet_go_together(sd_world):
    model_dir, shards = sd_world
    with pytest.raises(RecipeError, match="needs model.latent"):
        load_recipe(ROOT / "recipes/image/sd21_t2i_mse.toml", _overrides(model_dir, shards) + ["model.latent=''"])
    with pytest.raises(RecipeError, match="other backbones work in pixel space"):
        load_recipe(ROOT / "recipes/image/sd21_t2i_mse.toml", _overrides(model_dir, shards)
                    + ["model.backbone='image_unet'", "model.preset='tiny'", "model.pretrained=''"])


def test_architecture_from_config_takes_the_recipes_config_overrides(sd_world):
    from perceptual_diffusion.builders import build_model

    model_dir, shards = sd_world
    r = load_recipe(ROOT / "recipes/image/sd21_t2i_mse.toml", _overrides(model_dir, shards)
                    + ["model.overrides={upcast_attention=true, gradient_checkpointing=true}"])
    fresh, arch = build_model(r), build_model(r, pretrained_weights=False)
    assert fresh.unet.config.upcast_attention and arch.unet.config.upcast_attention
    assert fresh.state_dict().keys() == arch.state_dict().keys()
    # activation checkpointing in training only: a frozen (eval) copy never recomputes blocks
    assert arch.unet.is_gradient_checkpointing
    arch.eval()
    assert not arch.unet.is_gradient_checkpointing
    arch.train()
    assert arch.unet.is_gradient_checkpointing


def test_two_process_fsdp_on_the_sd_unet_exports_a_pipeline(sd_world, tmp_path):
    """sd21_t2i_mse then SP under FSDP over gloo, in bf16 as the recipes run: the diffusers UNet
    sharded by its ResnetBlock2D / Transformer2DModel blocks, full float32 checkpoints (with the
    null context), a bf16 perceptual copy, and an export that loads."""
    from diffusers import UNet2DConditionModel

    model_dir, shards = sd_world
    run = tmp_path / "fsdp"
    overrides = _overrides(model_dir, shards) + _stage("mse") + _stage("sp") + [
        "train.stages=['mse', 'sp']", "train.fsdp=true", "train.sample_every=0", "train.mixed_precision='bf16'"]
    proc = accelerate_launch("-m", "perceptual_diffusion.cli", "train", ROOT / "recipes/image/sd21_t2i_mse.toml",
                             "--out", run, "--no-progress", *[arg for o in overrides for arg in ("--set", o)],
                             port_offset=450)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sharded"] and set(summary["weight_digest"]) == {"mse", "sp"}
    ck = load_checkpoint(final_checkpoint(run, "sp"))
    assert {v.dtype for v in ck.weights["model"].values()} == {torch.float32}
    assert ck.weights["perceptual"]["unet.conv_in.weight"].dtype == torch.bfloat16
    reference = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").state_dict()
    assert {k: v.shape for k, v in ck.weights["ema"].items()} == {
        **{f"unet.{k}": v.shape for k, v in reference.items()}, "null_context": ck.weights["ema"]["null_context"].shape}
    assert main(["export", str(run), str(tmp_path / "pipe"), "--components", str(model_dir)]) == 0
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "pipe", subfolder="unet").state_dict()
    for key, value in exported.items():
        assert torch.equal(value, ck.weights["ema"][f"unet.{key}"]), key


def test_latent_cache_encodes_once_and_trains_on_the_cached_latents(sd_world, tmp_path, monkeypatch):
    """model.latent_cache: the main process encodes every image once (the posterior mean), later runs
    reuse the file, and training batches are the cached latents (no VAE encode per step)."""
    from perceptual_diffusion.latent import CachedLatents, LatentPipeline

    model_dir, shards = sd_world
    cache = tmp_path / "cache" / "latents.safetensors"
    sets = _overrides(model_dir, shards) + _stage("mse") + [f"model.latent_cache={json.dumps(str(cache))}",
                                                           "train.sample_every=0"]
    recipe = load_recipe(ROOT / "recipes/image/sd21_t2i_mse.toml", sets)
    first = Trainer(recipe, tmp_path / "a", progress=False)
    assert isinstance(first.dataset, CachedLatents) and cache.is_file() and not first.encode
    latents = first.dataset.latents
    assert tuple(latents.shape[1:]) == tuple(first.previews.noise.shape[1:])  # [4 x 2 x 2] of 16x16 images
    # the cache holds the posterior mean of each image
    image = first.dataset.dataset[0]["x"][None]
    torch.testing.assert_close(latents[:1], first.latent.encode_images(image, sample=False))

    def no_encoding(self, *args, **kwargs):
        pytest.fail("the VAE encoded images although the cache is up to date")

    monkeypatch.setattr(LatentPipeline, "encode_images", no_encoding)
    second = Trainer(recipe, tmp_path / "b", progress=False)  # the file is up to date: reused, not re-encoded
    assert torch.equal(second.dataset.latents, latents)
    import perceptual_diffusion.builders as builders_module

    seen = []

    base = builders_module.VelocityMSE

    class Recording(base):
        def __call__(self, net, x0, *args, **kwargs):
            seen.append(x0.detach().clone())
            return super().__call__(net, x0, *args, **kwargs)

    monkeypatch.setattr(builders_module, "VelocityMSE", Recording)
    result = second.run()
    assert result.stages[0].steps == 2 and len(seen) == 2
    assert all(any(torch.equal(x, z) for z in latents) for batch in seen for x in batch)


def test_latent_cache_needs_model_latent():
    with pytest.raises(RecipeError, match="model.latent_cache caches VAE latents and needs model.latent"):
        load_recipe(ROOT / "recipes/image/digits.toml", ["model.latent_cache='x.safetensors'"])
