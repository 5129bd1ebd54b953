"""LatentPipeline against diffusers itself (VAE encode / decode, StableDiffusionPipeline.encode_prompt,
the full pipeline's decoded images), loading, freezing, errors, and the latent cache round trip."""

from __future__ import annotations

import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from hypothesis import given, settings
from hypothesis import strategies as st
from sd_tiny import CONTEXT_DIM, MAX_LENGTH, tiny_pipeline, tiny_text_encoder, tiny_tokenizer, tiny_vae
from torch.utils.data import Dataset

from backbones.diffusers_unet import DiffusersUNet
from perceptual_diffusion.latent import CachedLatents, LatentPipeline, dataset_checksum
from perceptual_diffusion.sampling import ddim_sample
from perceptual_diffusion.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.scaled_linear(1000, beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def images(n, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tok"), seed=0)


@pytest.fixture(scope="module")
def lp(pipe) -> LatentPipeline:
    return LatentPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer)


@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd") / "model"
    pipe.save_pretrained(out)
    return out


def fresh(tmp_path, seed=0, **vae_overrides) -> LatentPipeline:
    """A LatentPipeline of its own components (tests that move or mutate it)."""
    tok = tiny_tokenizer(tmp_path / "tok")
    vae = tiny_vae(seed)
    if vae_overrides:
        # keys such as _use_default_values would reset the overridden fields
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        vae = diffusers.AutoencoderKL.from_config({**config, **vae_overrides})
        vae.load_state_dict(tiny_vae(seed).state_dict())
    return LatentPipeline(vae, tiny_text_encoder(tok, seed), tok)


class Captioned(Dataset):
    """Images with captions; `captions` as an attribute (the fast path) or only in the items."""

    def __init__(self, x, captions, attribute=True, labels=False):
        self.x, self._captions, self.attribute, self.labels = x, captions, attribute, labels
        self.calls = 0

    def __getattr__(self, name):
        if name == "captions" and self.__dict__["attribute"]:
            return self.__dict__["_captions"]
        raise AttributeError(name)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.calls += 1
        item = {"x": self.x[i]} if self._captions is None else {"x": self.x[i], "caption": self._captions[i]}
        if self.labels:
            item["label"] = torch.tensor(i % 3)
        return item


# ------------------------------------------------------------------ loading and properties
def test_from_pretrained_loads_the_saved_components(pipe, model_dir):
    loaded = LatentPipeline.from_pretrained(model_dir)
    for mine, theirs in ((loaded.vae, pipe.vae), (loaded.text_encoder, pipe.text_encoder)):
        ref = theirs.state_dict()
        assert mine.state_dict().keys() == ref.keys()
        assert all(torch.equal(v, ref[k]) for k, v in mine.state_dict().items())
    prompts = ["the cat", "a dog on the mat"]
    tokenize = lambda tok: tok(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    assert tokenize(loaded.tokenizer) == tokenize(pipe.tokenizer)
    assert torch.equal(loaded.encode_prompts(prompts), pipe.encode_prompt(prompts, "cpu", 1, False)[0])
    assert loaded.vae.dtype == loaded.text_encoder.dtype == torch.float32
    half = LatentPipeline.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    assert half.vae.dtype == half.text_encoder.dtype == torch.bfloat16
    z = half.encode_images(images(1), sample=False)
    assert z.dtype == torch.float32 and z.shape == (1, 4, 8, 8)


def test_from_pretrained_errors(model_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    shutil.rmtree(partial / "text_encoder")
    shutil.rmtree(partial / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"no text_encoder/, tokenizer/ subfolder"):
        LatentPipeline.from_pretrained(partial)
    with pytest.raises(FileNotFoundError, match="not found"):
        LatentPipeline.from_pretrained(tmp_path / "absent" / "model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LatentPipeline.from_pretrained(tmp_path / "file")
    with pytest.raises(TypeError, match="dtype"):
        LatentPipeline.from_pretrained(model_dir, dtype=torch.int8)


def test_properties(lp):
    assert lp.scaling_factor == pytest.approx(0.18215) and lp.shift_factor == 0.0
    assert (lp.latent_channels, lp.downsample) == (4, 2)
    assert lp.context_shape == (MAX_LENGTH, CONTEXT_DIM)
    for h, w in [(16, 16), (15, 17), (9, 4)]:
        assert lp.encode_images(images(1, 17)[..., :h, :w], sample=False).shape[1:] == lp.latent_shape((3, h, w))


def test_frozen_and_eval(lp):
    assert all(not p.requires_grad for p in lp.parameters())
    assert sum(p.numel() for p in lp.parameters()) > 0
    lp.train()
    assert not lp.training and not any(m.training for m in lp.modules())
    x = images(1).requires_grad_()
    assert not lp.encode_images(x).requires_grad
    assert not lp.decode(randn(1, 4, 8, 8)).requires_grad
    # the state dict is the models' own, nothing else (never saved: documented)
    assert {k.split(".")[0] for k in lp.state_dict()} == {"vae", "text_encoder"}


def test_to_moves_and_casts(tmp_path):
    p = fresh(tmp_path)
    null32 = p.null_context()
    assert p.to(torch.float64) is p
    assert p.vae.dtype == p.text_encoder.dtype == torch.float64 and p.device == torch.device("cpu")
    null64 = p.null_context()  # recomputed in float64, returned as float32
    assert null64.dtype == torch.float32
    assert torch.allclose(null64, null32, atol=1e-5) and not torch.equal(null64, null32)
    z = p.encode_images(images(2), sample=False)
    assert z.dtype == torch.float32 and p.decode(z).dtype == torch.float32


# ------------------------------------------------------------------ images against the VAE
def test_encode_decode_shapes_and_range(lp):
    z = lp.encode_images(images(2))
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    x = lp.decode(z)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    loud = lp.decode(100 * randn(2, 4, 8, 8))
    assert loud.min().item() == -1.0 and loud.max().item() == 1.0  # the clamp is exercised


def test_encode_equals_vae(lp, pipe):
    x = images(3, seed=1)
    with torch.no_grad():
        posterior = pipe.vae.encode(x).latent_dist
        mode = posterior.mode() * 0.18215
        drawn = posterior.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
    assert torch.equal(lp.encode_images(x, sample=False), mode)
    assert torch.equal(lp.encode_images(x, generator=torch.Generator().manual_seed(7)), drawn)
    other = lp.encode_images(x, generator=torch.Generator().manual_seed(8))
    assert (other - drawn).abs().max().item() > 1e-3 and (drawn - mode).abs().max().item() > 1e-3


def test_decode_equals_vae(lp, pipe):
    z = randn(2, 4, 8, 8, seed=2) * 3
    with torch.no_grad():
        ref = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.equal(lp.decode(z), ref)


def test_shift_factor_and_refused_vaes(tmp_path):
    p = fresh(tmp_path, shift_factor=0.25)
    x = images(2, seed=3)
    with torch.no_grad():
        mode = p.vae.encode(x).latent_dist.mode()
    z = p.encode_images(x, sample=False)
    torch.testing.assert_close(z, (mode - 0.25) * 0.18215, rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = p.vae.decode(z / 0.18215 + 0.25).sample.clamp(-1, 1)
    assert torch.equal(p.decode(z), ref)
    with pytest.raises(NotImplementedError, match="latents_mean"):
        fresh(tmp_path, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)


# ------------------------------------------------------------------ text against encode_prompt
def test_encode_prompts_equals_pipeline(lp, pipe):
    prompts = ["the cat", "", "a dog and the cat and the dog and a cat"]  # the last one is truncated
    ours = lp.encode_prompts(prompts)
    assert ours.shape == (3, MAX_LENGTH, CONTEXT_DIM) and ours.dtype == torch.float32
    assert torch.equal(ours, pipe.encode_prompt(prompts, "cpu", 1, False)[0])
    assert torch.equal(lp.encode_prompts(tuple(prompts[:1])), ours[:1])


def test_encode_prompts_attention_mask_branch(lp, pipe):
    prompts = ["the cat", "a"]
    plain = lp.encode_prompts(prompts)
    pipe.text_encoder.config.use_attention_mask = True
    try:
        masked = lp.encode_prompts(prompts)
        ref = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    finally:
        del pipe.text_encoder.config.use_attention_mask
    assert torch.equal(masked, ref)
    assert (masked - plain).abs().max().item() > 1e-4  # the mask changes the padded positions


@settings(max_examples=10, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_encode_prompts_equals_pipeline_any_text(pipe, prompts):
    ours = LatentPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer).encode_prompts(prompts)
    assert torch.equal(ours, pipe.encode_prompt(prompts, "cpu", 1, False)[0])


def test_null_context(lp, pipe):
    null = lp.null_context()
    assert null.shape == (1, MAX_LENGTH, CONTEXT_DIM)
    assert torch.equal(null, lp.encode_prompts([""]))
    # the pipeline's unconditional embedding under CFG is the same
    assert torch.equal(null, pipe.encode_prompt(["the cat"], "cpu", 1, True)[1])
    null.zero_()  # a returned tensor is the caller's; the cache is untouched
    assert torch.equal(lp.null_context(), lp.encode_prompts([""]))


# ------------------------------------------------------------------ with the sampler
@torch.no_grad()
def test_sample_and_decode_equals_stable_diffusion_pipeline(lp, pipe):
    # the latent sampler is checked against the pipeline in test_diffusers_unet; here the text
    # and decode ends come from LatentPipeline and the pictures are compared. steps divides T:
    # diffusers' DDIM steps to t - T // steps, not to the next trailing timestep, otherwise
    adapter = DiffusersUNet(pipe.unet)
    adapter.set_null_context(lp.null_context())
    prompts, noise = ["the cat", "a dog"], randn(2, 4, 8, 8, seed=5)
    ours = lp.decode(ddim_sample(adapter, SCHEDULE, noise, cond=lp.encode_prompts(prompts), steps=5,
                                 guidance_scale=7.5, guidance_rescale=0.7))
    ref = pipe(prompts, num_inference_steps=5, guidance_scale=7.5, guidance_rescale=0.7, output_type="pt",
               latents=noise.clone()).images
    assert ref.shape == ours.shape == (2, 3, 16, 16)
    assert (ours * 0.5 + 0.5 - ref).abs().max().item() < 1e-4


# ------------------------------------------------------------------ errors
def test_errors(lp, pipe, tmp_path):
    with pytest.raises(TypeError, match="AutoencoderKL"):
        LatentPipeline(torch.nn.Conv2d(3, 3, 1), pipe.text_encoder, pipe.tokenizer)
    with pytest.raises(TypeError, match="CLIPTextModel"):
        LatentPipeline(pipe.vae, torch.nn.Linear(2, 2), pipe.tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        LatentPipeline(pipe.vae, pipe.text_encoder, lambda s: s)
    long_tok = tiny_tokenizer(tmp_path / "tok")
    long_tok.model_max_length = MAX_LENGTH + 1
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        LatentPipeline(pipe.vae, pipe.text_encoder, long_tok)
    with pytest.raises(TypeError, match="list of str"):
        lp.encode_prompts("the cat")
    with pytest.raises(TypeError, match="must all be str"):
        lp.encode_prompts(["a", 3])
    with pytest.raises(ValueError, match="empty"):
        lp.encode_prompts([])
    with pytest.raises(ValueError, match=r"\[N x 3 x H x W\]"):
        lp.encode_images(randn(1, 4, 8, 8))
    with pytest.raises(TypeError, match="float Tensor"):
        lp.encode_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[N x 4 x H x W\]"):
        lp.decode(randn(4, 8, 8))


# ------------------------------------------------------------------ latent cache
def test_cache_round_trip(lp, tmp_path, monkeypatch):
    x = images(5, seed=4)
    data = Captioned(x, [f"caption {i}" for i in range(5)])
    path = lp.cache_latents(data, tmp_path / "c" / "latents.safetensors", batch_size=2, progress=False)
    assert path.is_file()
    cached = CachedLatents(path, data)
    assert len(cached) == 5 and cached.sample_shape == (4, 8, 8)
    assert cached.metadata["dataset_checksum"] == dataset_checksum(data) and cached.metadata["sample"] == "false"
    expected = torch.cat([lp.encode_images(x[i:i + 1], sample=False) for i in range(5)])
    data.calls = 0
    items = [cached[i] for i in range(5)]
    assert data.calls == 0  # captions from the attribute: no image is loaded
    assert [it["caption"] for it in items] == [f"caption {i}" for i in range(5)]
    assert all(set(it) == {"x", "caption"} for it in items)
    torch.testing.assert_close(torch.stack([it["x"] for it in items]), expected, rtol=1e-5, atol=1e-6)

    # up to date: reused without encoding anything
    def boom(*a, **k):
        raise AssertionError("re-encoded an up-to-date cache")

    monkeypatch.setattr(lp, "encode_images", boom)
    assert lp.cache_latents(data, path, batch_size=2, progress=False) == path
    monkeypatch.undo()

    # without the attribute the items are read; their other keys are kept
    by_item = Captioned(x, [f"c{i}" for i in range(5)], attribute=False, labels=True)
    items = [CachedLatents(path, by_item)[i] for i in range(5)]
    assert [it["caption"] for it in items] == [f"c{i}" for i in range(5)]
    assert [int(it["label"]) for it in items] == [0, 1, 2, 0, 1]
    # a dataset whose `captions` is None has none
    assert set(CachedLatents(path, Captioned(x, None))[0]) == {"x"}


def test_cache_float16_and_fixed_sample(lp, tmp_path):
    x = images(3, seed=6)
    data = Captioned(x, ["a", "b", "c"])
    half = CachedLatents(lp.cache_latents(data, tmp_path / "h.safetensors", dtype=torch.float16, progress=False), data)
    assert half.latents.dtype == torch.float16 and half[0]["x"].dtype == torch.float32
    torch.testing.assert_close(half[1]["x"], lp.encode_images(x[1:2], sample=False)[0], rtol=2e-3, atol=2e-3)

    a = lp.cache_latents(data, tmp_path / "s1.safetensors", batch_size=3, sample=True, seed=3, progress=False)
    b = lp.cache_latents(data, tmp_path / "s2.safetensors", batch_size=3, sample=True, seed=3, progress=False)
    za, zb = CachedLatents(a, data).latents, CachedLatents(b, data).latents
    assert torch.equal(za, zb)  # one fixed sample per seed
    assert torch.equal(za, lp.encode_images(x, generator=torch.Generator().manual_seed(3)))
    mode = lp.encode_images(x, sample=False)
    assert (za - mode).abs().max().item() > 1e-3
    # changing the settings makes the cache stale: rebuilt as the mean
    lp.cache_latents(data, a, batch_size=3, sample=False, progress=False)
    torch.testing.assert_close(CachedLatents(a, data).latents, mode, rtol=1e-5, atol=1e-6)


def test_stale_cache_is_detected_and_rebuilt(lp, tmp_path):
    x = images(4, seed=8)
    data = Captioned(x, list("abcd"))
    path = lp.cache_latents(data, tmp_path / "l.safetensors", progress=False)

    shorter = Captioned(x[:3], list("abc"))
    with pytest.raises(ValueError, match="stale.*4 items.*3 items"):
        CachedLatents(path, shorter)
    lp.cache_latents(shorter, path, progress=False)
    assert len(CachedLatents(path, shorter)) == 3
    with pytest.raises(ValueError, match="stale"):
        CachedLatents(path, data)

    replaced = Captioned(images(3, seed=9), list("abc"))  # same length, other images
    with pytest.raises(ValueError, match="stale"):
        CachedLatents(path, replaced)
    lp.cache_latents(replaced, path, progress=False)
    torch.testing.assert_close(CachedLatents(path, replaced).latents, lp.encode_images(replaced.x, sample=False),
                               rtol=1e-5, atol=1e-6)

    # another VAE: rebuilt too
    other = fresh(tmp_path, seed=1)
    assert other.fingerprint() != lp.fingerprint()
    other.cache_latents(replaced, path, progress=False)
    torch.testing.assert_close(CachedLatents(path, replaced).latents, other.encode_images(replaced.x, sample=False),
                               rtol=1e-5, atol=1e-6)

    # an unreadable file: rebuilt by cache_latents, reported by CachedLatents
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a latent cache"):
        CachedLatents(path, replaced)
    lp.cache_latents(replaced, path, progress=False)
    assert len(CachedLatents(path, replaced)) == 3
    with pytest.raises(FileNotFoundError, match="latent cache not found"):
        CachedLatents(tmp_path / "none.safetensors", replaced)
    assert sorted(p.name for p in tmp_path.glob(".*tmp")) == []  # atomic writes leave nothing behind


def test_cache_errors(lp, tmp_path):
    data = Captioned(images(2), ["a", "b"])
    with pytest.raises(ValueError, match="torch.float32, torch.float16"):
        lp.cache_latents(data, tmp_path / "x.safetensors", dtype=torch.bfloat16, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        lp.cache_latents(data, tmp_path / "x.safetensors", batch_size=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        lp.cache_latents(Captioned(images(0), []), tmp_path / "x.safetensors", progress=False)
    gray = Captioned(torch.zeros(2, 1, 16, 16), ["a", "b"])
    with pytest.raises(ValueError, match=r"item 0.*\[3 x H x W\]"):
        lp.cache_latents(gray, tmp_path / "x.safetensors", progress=False)
    mixed = Captioned([images(1)[0], images(1, size=8)[0]], ["a", "b"])
    with pytest.raises(ValueError, match="one size"):
        lp.cache_latents(mixed, tmp_path / "x.safetensors", batch_size=2, progress=False)
    assert not (tmp_path / "x.safetensors").exists()
