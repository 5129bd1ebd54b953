"""Tiny, seeded Stable Diffusion components built offline (no hub access), for diffusers oracles.

    pipe = tiny_pipeline(tmp_dir)            # StableDiffusionPipeline: tiny UNet, VAE, CLIP, DDIM
    pipe.save_pretrained(model_dir)          # a local "SD model directory" for export tests

The tokenizer is a real byte-level CLIP BPE whose vocab.json / merges.txt are written here: every
byte as a symbol (alone and word-final "</w>"), a handful of merges, and the two specials. The
text encoder's hidden size equals the tiny UNet's cross_attention_dim (32), and the VAE's two
levels give the usual latent layout (4 channels, image size / 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from backbones.diffusers_unet import DiffusersUNet

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 8  # tokenizer.model_max_length = text encoder max_position_embeddings
CONTEXT_DIM = 32
# (left, right) pairs; each result is in the vocabulary
MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>"), ("a", "n</w>")]


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: printable Latin-1 bytes map to themselves, the other
    bytes to code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted, out = 0, []
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


def write_tokenizer_files(directory: str | Path) -> Path:
    """vocab.json, merges.txt and tokenizer_config.json of the tiny CLIP BPE in `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
    }))
    return d


def tiny_tokenizer(directory: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tokenizer_files(directory)))


def tiny_text_encoder(tokenizer, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CONTEXT_DIM, intermediate_size=64, projection_dim=CONTEXT_DIM,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16,
    ).eval()


def tiny_unet(seed: int = 0, scale: float = 0.05):
    """The "tiny" preset's UNet2DConditionModel, its weights perturbed so no path is dead."""
    torch.manual_seed(seed)
    unet = DiffusersUNet.from_preset("tiny", cross_attention_dim=CONTEXT_DIM).unet
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return unet.eval()


def tiny_scheduler(num_train_timesteps: int = 1000, set_alpha_to_one: bool = True):
    """DDIM with SD's betas, zero terminal SNR, v-prediction and trailing spacing."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, rescale_betas_zero_snr=True, prediction_type="v_prediction",
        timestep_spacing="trailing", steps_offset=1, clip_sample=False, set_alpha_to_one=set_alpha_to_one,
    )


def tiny_pipeline(tokenizer_dir: str | Path, seed: int = 0, unet=None):
    """A StableDiffusionPipeline of the tiny components (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = tiny_tokenizer(tokenizer_dir)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(tokenizer, seed), tokenizer=tokenizer,
        unet=tiny_unet(seed) if unet is None else unet, scheduler=tiny_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden state [N x MAX_LENGTH x CONTEXT_DIM] as the pipeline makes it."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]
