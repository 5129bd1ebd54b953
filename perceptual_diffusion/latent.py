"""The frozen parts of Stable Diffusion around the UNet: the VAE (images <-> latents) and the CLIP
text encoder (prompts -> cross-attention contexts), plus a latent cache for training.

    lp = LatentPipeline.from_pretrained("path/to/sd21-base", dtype=torch.float16).to("cuda")
    z0 = lp.encode_images(x)                    # [N x 3 x H x W] in [-1, 1] -> [N x 4 x H/8 x W/8]
    ctx = lp.encode_prompts(["a cat", "a dog"]) # [N x 77 x 1024], as StableDiffusionPipeline
    net.set_null_context(lp.null_context())     # the empty prompt, for cond=None and CFG
    x = lp.decode(ddim_sample(net, s, noise, cond=ctx, guidance_scale=7.5, uncond=...))
    lp.cache_latents(dataset, "latents.safetensors")       # encode every image once
    data = CachedLatents("latents.safetensors", dataset)    # {"x": latent, "caption": str}

Latents are the VAE's latents times `scaling_factor` (SD2.1: 0.18215), the unit-variance space the
UNet is trained in. Nothing here is trained: every parameter is frozen and the module stays in
eval mode. A LatentPipeline is never part of a checkpoint (the trainer saves the UNet only) and
is always reloaded from the model directory; its state_dict is the plain one of `vae.*` and
`text_encoder.*` and is not meant to be saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .fileio import atomic_write

try:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
except ImportError as e:  # pragma: no cover - exercised only without the `sd` extra
    raise ImportError(
        "perceptual_diffusion.latent needs diffusers and transformers; install the `sd` extra "
        "(pip install 'perceptual-diffusion[sd]')"
    ) from e

__all__ = ["CACHE_FORMAT", "CachedLatents", "LatentPipeline", "dataset_checksum"]

log = logging.getLogger(__name__)

SUBFOLDERS = ("vae", "text_encoder", "tokenizer")
CACHE_FORMAT = "perceptual-diffusion-latents/1"
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# "owner/name" or a bare legacy name; anything else that does not exist locally is a missing dir
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class LatentPipeline(nn.Module):
    """Frozen SD VAE + CLIP text encoder + tokenizer: images <-> scaled latents, prompts -> contexts.

    Args:
        vae: a diffusers `AutoencoderKL`; `scaling_factor` and, when set, `shift_factor` come
            from its config (latents = (z - shift) * scaling, as diffusers' SD3 / Flux pipelines;
            SD 1.x / 2.x have no shift). VAEs with latents_mean / latents_std are refused.
        text_encoder: a transformers `CLIPTextModel` (its last hidden state is the context).
        tokenizer: the matching CLIP tokenizer; model_max_length (77 for SD) is the context
            length L and may not exceed the encoder's max_position_embeddings.

    All parameters are set requires_grad=False and the module stays in eval mode whatever
    `train()` is asked. Outputs are float32 whatever the models' dtype.
    """

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        if not isinstance(vae, AutoencoderKL):
            raise TypeError(f"vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
        if not isinstance(text_encoder, CLIPTextModel):
            raise TypeError(f"text_encoder must be a transformers CLIPTextModel, got {type(text_encoder).__name__}")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        cfg = vae.config
        for field in ("latents_mean", "latents_std"):
            if getattr(cfg, field, None) is not None:
                raise NotImplementedError(
                    f"vae.config.{field} is set; LatentPipeline implements SD's latent normalisation "
                    "(scaling_factor and shift_factor only)"
                )
        length, positions = tokenizer.model_max_length, text_encoder.config.max_position_embeddings
        if not isinstance(length, int) or not 0 < length <= positions:
            raise ValueError(
                f"tokenizer.model_max_length={length!r} must be a positive int <= the text encoder's "
                f"max_position_embeddings={positions}"
            )
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer  # not a module: it moves nowhere and holds no tensors
        self.requires_grad_(False)
        self.eval()
        self._null_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, dtype: torch.dtype | None = None) -> LatentPipeline:
        """Load vae/ (AutoencoderKL), text_encoder/ (CLIPTextModel) and tokenizer/ (CLIPTokenizer)
        of a diffusers model directory, or of a hub id when the hub is reachable.

        `dtype` is the parameter dtype of both models (None: float32). Raises FileNotFoundError
        for a local path that is missing or lacks one of the subfolders.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        dtype = torch.float32 if dtype is None else dtype
        source = str(path_or_hub_id)
        local = Path(source).expanduser()
        if local.is_dir():
            missing = [s for s in SUBFOLDERS if not (local / s).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"{local} has no {', '.join(f'{s}/' for s in missing)} subfolder "
                    f"(a Stable Diffusion model directory holds {', '.join(f'{s}/' for s in SUBFOLDERS)})"
                )
            source = str(local)
        elif local.exists():
            raise FileNotFoundError(f"{local} is not a directory (expected a diffusers model directory)")
        elif not _HUB_ID.match(source):
            raise FileNotFoundError(f"model directory not found: {local}")
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        return cls(vae, text_encoder, tokenizer)

    # ------------------------------------------------------------------ properties
    def train(self, mode: bool = True) -> LatentPipeline:
        """Always eval: the frozen models never switch to training behaviour."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        shift = getattr(self.vae.config, "shift_factor", None)
        return 0.0 if shift is None else float(shift)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Image size / latent size: 2 ** (VAE levels - 1), 8 for SD."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def context_shape(self) -> tuple[int, int]:
        """(L, D) of one prompt's context."""
        return (self.tokenizer.model_max_length, int(self.text_encoder.config.hidden_size))

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of images (3, H, W): each VAE level halves the size, rounding
        down (diffusers pads right/bottom by one before each stride-2 3x3 convolution)."""
        _c, h, w = image_shape
        for _ in range(len(self.vae.config.block_out_channels) - 1):
            h, w = h // 2, w // 2
        return (self.latent_channels, h, w)

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images [N x 3 x H x W] in [-1, 1] -> latents [N x C x H/8 x W/8] float32, scaled.

        sample=True draws from the VAE posterior with `generator` (as diffusers' training
        scripts and img2img do); sample=False takes its mode (the mean). Runs in the VAE's dtype
        on its device.
        """
        self._check(x, "x", self.vae.config.in_channels, "images")
        posterior = self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        if self.shift_factor:
            z = z - self.shift_factor
        return (z * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents [N x C x h x w] -> images [N x 3 x 8h x 8w] float32, clamped to [-1, 1]."""
        self._check(latents, "latents", self.latent_channels, "latents")
        z = latents.to(self.device, self.vae.dtype) / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1, 1).float()

    @staticmethod
    def _check(x: Any, name: str, channels: int, what: str) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a float Tensor of {what} [N x {channels} x H x W], got "
                            f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be {what} [N x {channels} x H x W], got shape {tuple(x.shape)}")

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> contexts [N x L x D] float32: the text encoder's last hidden state.

        As `StableDiffusionPipeline.encode_prompt` with clip_skip=None: padded to
        tokenizer.model_max_length, longer prompts truncated, the attention mask passed only
        when text_encoder.config.use_attention_mask is true. Textual-inversion tokens are not
        expanded.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty; give at least one prompt (\"\" for the null context)")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must all be str, got {', '.join(sorted(set(bad)))}")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = self.text_encoder.device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float()

    def null_context(self) -> Tensor:
        """The empty prompt's context [1 x L x D] float32 (computed once per device and dtype)."""
        key = (self.text_encoder.device, self.text_encoder.dtype)
        if key not in self._null_cache:
            self._null_cache[key] = self.encode_prompts([""])
        return self._null_cache[key].clone()

    # ------------------------------------------------------------------ latent cache
    def fingerprint(self) -> str:
        """sha256 of the VAE encoder's config, dtype and weights: what the cached latents depend on."""
        config = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}  # not _name_or_path
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        modules = [self.vae.encoder] + ([self.vae.quant_conv] if self.vae.quant_conv is not None else [])
        for module in modules:
            for name, p in module.named_parameters():
                digest.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
                digest.update(_tensor_bytes(p))
        return digest.hexdigest()

    def cache_latents(
        self,
        dataset: Dataset,
        path: str | Path,
        batch_size: int = 16,
        sample: bool = False,
        progress: bool = True,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> Path:
        """Encode every item's "x" of a map-style dataset once into `path` (.safetensors).

        The file holds "latents" [N x C x h x w] (`dtype` float32 or float16) and metadata: the
        dataset's checksum (`dataset_checksum`: length, item shape, a few items' contents), this
        VAE's fingerprint and the settings. An existing file made from the same dataset, VAE
        and settings is reused as is; any other (stale, or unreadable) is rebuilt. Written
        atomically. Returns `path`.

        Unlike on-the-fly encoding, which draws a fresh posterior sample every epoch, the cache
        holds the posterior mean (sample=False) or one fixed sample per item (sample=True,
        drawn from a CPU generator seeded with `seed`). Items must be deterministic (no random
        augmentation) and fit in memory together; call it on one process only.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = {v: k for k, v in CACHE_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of torch.{', torch.'.join(CACHE_DTYPES)}, got {dtype!r}")
        path = Path(path)
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("cache_latents: the dataset is empty")
        meta = {
            "format": CACHE_FORMAT,
            "num_items": str(n),
            "dataset_checksum": dataset_checksum(dataset),
            "vae": self.fingerprint(),
            "sample": str(bool(sample)).lower(),
            "seed": str(seed) if sample else "",
            "batch_size": str(batch_size) if sample else "",  # sampled noise depends on the batching
            "dtype": names[dtype],
            "scaling_factor": repr(self.scaling_factor),
            "shift_factor": repr(self.shift_factor),
        }
        if path.is_file():
            stored = _read_metadata(path)
            if stored is not None and all(stored.get(k) == v for k, v in meta.items()):
                log.info("latent cache %s is up to date (%d items)", path, n)
                return path
            changed = sorted(k for k, v in meta.items() if stored is None or stored.get(k) != v)
            log.warning("latent cache %s is stale (%s differ); rebuilding", path, ", ".join(changed) or "format")

        loader = DataLoader(_Images(dataset, self.vae.config.in_channels), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=_stack_images)
        generator = torch.Generator().manual_seed(seed) if sample else None
        latents: Tensor | None = None
        start = 0
        for x in tqdm(loader, desc="encoding latents", disable=not progress, leave=False):
            z = self.encode_images(x, generator=generator, sample=sample).to("cpu", dtype)
            if latents is None:
                latents = torch.empty((n, *z.shape[1:]), dtype=dtype)
            elif z.shape[1:] != latents.shape[1:]:
                raise ValueError(f"items {start}..{start + len(z) - 1} have latents {tuple(z.shape[1:])}, "
                                 f"the first items {tuple(latents.shape[1:])}: all images must share one size")
            latents[start:start + len(z)] = z
            start += len(z)
        if latents is None or start != n:
            raise RuntimeError(f"the dataset said it has {n} items but yielded {start}")
        meta["latent_shape"] = "x".join(map(str, latents.shape[1:]))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"latents": latents}, tmp, metadata=meta))
        log.info("cached %d latents %s to %s", n, meta["latent_shape"], path)
        return path


class CachedLatents(Dataset):
    """Items {"x": latent [C x h x w] float32, "caption": str} from a `cache_latents` file.

    `dataset` is the dataset the cache was made from; its length and checksum must match the
    file's, else ValueError (rerun `cache_latents`, which rebuilds a stale cache). Captions come
    from `dataset.captions` when the dataset has that attribute (ImageFolderDataset: a list,
    or None for no captions), so no image is decoded; otherwise from `dataset[i]`, whose keys
    other than "x" ("caption", "label") are all kept. Latents are the scaled VAE latents: the
    posterior mean or one fixed sample per item, never a fresh sample (see `cache_latents`).
    """

    def __init__(self, path: str | Path, dataset: Dataset):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"latent cache not found: {self.path} (make it with LatentPipeline.cache_latents)")
        meta = _read_metadata(self.path)
        if meta is None:
            raise ValueError(f"{self.path} is not a latent cache made by LatentPipeline.cache_latents")
        n = len(dataset)  # type: ignore[arg-type]
        if meta.get("num_items") != str(n) or meta.get("dataset_checksum") != dataset_checksum(dataset):
            raise ValueError(
                f"latent cache {self.path} is stale: it holds {meta.get('num_items')} items of another dataset "
                f"(this one has {n} items or different contents); rebuild it with LatentPipeline.cache_latents"
            )
        self.metadata = meta
        self.latents = load_file(str(self.path))["latents"]
        self.dataset = dataset
        self._captions = getattr(dataset, "captions", _NO_ATTR)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, h, w) of one latent: the shape of the noise the sampler starts from."""
        return tuple(self.latents.shape[1:])

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        x = self.latents[index].float()
        if self._captions is not _NO_ATTR:
            return {"x": x} if self._captions is None else {"x": x, "caption": self._captions[index]}
        item = self.dataset[index]
        return {**{k: v for k, v in item.items() if k != "x"}, "x": x}


_NO_ATTR = object()


def dataset_checksum(dataset: Dataset, probes: int = 3) -> str:
    """sha256 of the dataset's length, its first item's "x" shape and the "x" of `probes`
    items spread from first to last: cheap, and it changes when the data is replaced."""
    n = len(dataset)  # type: ignore[arg-type]
    digest = hashlib.sha256(f"{n}".encode())
    if n == 0:
        return digest.hexdigest()
    indices = sorted({round(i * (n - 1) / max(probes - 1, 1)) for i in range(probes)})
    for i in indices:
        x = dataset[i]["x"]
        if not isinstance(x, Tensor):
            raise TypeError(f"dataset item {i} has \"x\" of type {type(x).__name__}, expected a Tensor")
        digest.update(f"|{i}:{tuple(x.shape)}:{x.dtype}|".encode())
        digest.update(_tensor_bytes(x))
    return digest.hexdigest()


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    # numpy has no bfloat16: hash its bits through an int16 view
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def _read_metadata(path: Path) -> dict[str, str] | None:
    """The file's metadata if it is a latent cache of this format, else None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):  # unreadable: "not a cache", the caller rebuilds or reports
        return None
    return meta if meta.get("format") == CACHE_FORMAT else None


class _Images(Dataset):
    """(index, "x") of each item, checked to be an image [C x H x W] (picklable for workers)."""

    def __init__(self, dataset: Dataset, channels: int):
        self.dataset, self.channels = dataset, channels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        x = self.dataset[index]["x"]
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[0] != self.channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"dataset item {index}: \"x\" must be an image [{self.channels} x H x W], got {shape}")
        return index, x


def _stack_images(items: list[tuple[int, Tensor]]) -> Tensor:
    shapes = {tuple(x.shape) for _, x in items}
    if len(shapes) > 1:
        raise ValueError(f"items {items[0][0]}..{items[-1][0]} have images of several sizes {sorted(shapes)}; "
                         "all images must share one size")
    return torch.stack([x for _, x in items])
