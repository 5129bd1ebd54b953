"""What a recipe builds: the schedule, the backbone, the VAE of latent recipes, the objective of a
stage and the conditioning of a batch. Shared by the trainer and by evaluation (which loads a
checkpoint's model without importing the trainer).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import Recipe, RecipeError
from .datasets import ScaledDataset, build_dataset, num_classes, sample_shape
from .objectives import SelfPerceptual, VelocityMSE
from .schedule import NoiseSchedule

__all__ = ["DTYPES", "WEIGHTS_KEY", "Conditioner", "build_latent", "build_model", "build_objective", "build_optimizer",
           "build_schedule", "build_train_dataset", "check_device_support", "frozen_model", "load_start", "lr_factor",
           "model_input_shape", "new_model",
           "preview_prompts", "to_data"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
WEIGHTS_KEY = {"online": "model", "ema": "ema"}  # a recipe's weight source -> a checkpoint's weights name


def build_schedule(recipe: Recipe) -> NoiseSchedule:
    s = recipe.schedule
    kwargs: dict[str, Any] = {"num_timesteps": s.num_timesteps, "zero_terminal_snr": s.zero_terminal_snr}
    if s.kind != "cosine":
        kwargs.update(beta_start=s.beta_start, beta_end=s.beta_end)
    return NoiseSchedule.from_name(s.kind, **kwargs)


def build_model(recipe: Recipe, pretrained_weights: bool = True) -> torch.nn.Module:
    """The recipe's backbone, with in_channels (pixel space) and num_classes taken from the data.

    With `model.pretrained` the UNet comes from that diffusers model: its weights, or only its
    architecture when `pretrained_weights=False` (the weights then come from a checkpoint).
    Latent models (`model.latent`) take their in_channels from the UNet, not from the images.
    """
    from backbones import BACKBONES, build_backbone

    m = recipe.model
    overrides: dict[str, Any] = {"num_classes": num_classes(recipe.data), **m.overrides}
    if not m.latent:
        overrides = {"in_channels": recipe.data.channels, **overrides}
    try:
        if not m.pretrained:
            return build_backbone(m.backbone, m.preset, **overrides)
        cls = BACKBONES[m.backbone]
        if pretrained_weights:
            return cls.from_pretrained(m.pretrained, **overrides)
        from diffusers import UNet2DConditionModel

        # the architecture only: config.json with the recipe's config-field overrides on top
        adapter = {k: overrides.pop(k) for k in ("in_channels", "num_classes", "gradient_checkpointing",
                                                 "attention_backend")
                   if k in overrides}
        config = {**UNet2DConditionModel.load_config(m.pretrained, subfolder="unet"), **overrides}
        return cls.from_config(config, **adapter)
    # unknown preset or field, unsupported UNet, an attention backend whose package is missing
    except (TypeError, ValueError, NotImplementedError, ImportError) as e:
        raise RecipeError(f"model: {e}") from e
    except OSError as e:  # diffusers: no such directory / hub id
        raise RecipeError(f"model.pretrained {m.pretrained!r}: {' '.join(str(e).split())}") from e


def check_device_support(model: torch.nn.Module, device: torch.device | str) -> None:
    """RecipeError (one line, naming the option) when the model's attention kernels cannot run on
    `device`, e.g. model.overrides.attention_backend = "xformers" on a CPU."""
    from backbones.layers import check_attention_backends

    try:
        check_attention_backends(model, device)
    except (ValueError, ImportError) as e:
        raise RecipeError(f"model.overrides.{e}") from e


def new_model(recipe: Recipe, latent: Any, device: torch.device | str, pretrained_weights: bool = True) -> torch.nn.Module:
    """`build_model`, checked against `device`; a latent text-to-image model also gets the empty
    prompt's context as its null condition (before any EMA or frozen copy is made of it)."""
    net = build_model(recipe, pretrained_weights)
    check_device_support(net, device)
    if latent is not None:
        net.set_null_context(latent.null_context().cpu())
    return net


def frozen_model(recipe: Recipe, latent: Any, device: torch.device | str,
                 weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The perceptual network f_*: the recipe's backbone with `weights`, frozen, in
    `sp.perceptual_dtype` ("auto": the mixed-precision dtype)."""
    from .objectives import make_perceptual

    net = new_model(recipe, latent, device, pretrained_weights=False)
    net.load_state_dict(weights)
    d = recipe.sp.perceptual_dtype
    return make_perceptual(net, dtype=DTYPES[recipe.train.mixed_precision if d == "auto" else d])


def load_start(model: torch.nn.Module, stage: str, source, which: str):
    """Load the `which` ("online" | "ema") weights of checkpoint `source` into `model`, the online
    net of `stage` (RecipeError when they do not fit the recipe's model); returns the checkpoint."""
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(source)
    try:
        model.load_state_dict(ck.weights[WEIGHTS_KEY[which]])
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{stage}.init: the {which} weights of {source} do not fit this recipe's model "
                          f"({first})") from e
    return ck


def build_train_dataset(recipe: Recipe, latent: Any = None, is_main: bool = True,
                        barrier: Callable[[], None] = lambda: None, progress: bool = True):
    """The recipe's training data (RecipeError, one line, when it cannot be read). A latent recipe
    needs captions; with `model.latent_cache` its items are every image's VAE latent (the posterior
    mean), read from the file the main process makes, or remakes when the data or the VAE changed;
    `barrier` makes the other processes wait for it. Pixel-space items are in the model's units:
    "x" times `data.scale`."""
    try:
        dataset = build_dataset(recipe.data)
    except (ValueError, RuntimeError, ImportError, OSError) as e:  # empty folder, missing decoder, bad shard
        raise RecipeError(f"data ({recipe.data.name}): {e}") from e
    if latent is None:
        return dataset if recipe.data.scale == 1 else ScaledDataset(dataset, recipe.data.scale)
    if "caption" not in dataset[0]:
        raise RecipeError(f"model.latent trains on captions, but {recipe.data.name} items have none (an "
                          "image_folder needs captions.jsonl; set data.empty_captions = true for section 5.7)")
    if not recipe.model.latent_cache:
        return dataset
    from .latent import CachedLatents

    path = Path(recipe.model.latent_cache)
    if is_main:
        latent.cache_latents(dataset, path, progress=progress)
    barrier()
    return CachedLatents(path, dataset)


def build_latent(recipe: Recipe, device: torch.device | str = "cpu"):
    """The frozen VAE + text encoder + tokenizer of `model.latent` (None for pixel-space recipes)."""
    if not recipe.model.latent:
        return None
    try:
        from .latent import LatentPipeline
    except ImportError as e:
        raise RecipeError(f"model.latent needs the sd extra: {e}") from e
    # the frozen VAE and text encoder in the mixed-precision dtype (they take no gradients)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.mixed_precision)
    if torch.device(device).type == "cpu":
        dtype = None
    try:
        return LatentPipeline.from_pretrained(recipe.model.latent, dtype=dtype).to(device)
    except OSError as e:
        raise RecipeError(f"model.latent {recipe.model.latent!r}: {' '.join(str(e).split())}") from e


def to_data(recipe: Recipe, latent: Any, x: torch.Tensor) -> torch.Tensor:
    """Samples in the model's units -> data units: latents decoded to images, pixel-space samples
    divided by `data.scale` (the inverse of what `build_train_dataset` applies)."""
    if latent is not None:
        return latent.decode(x)
    return x if recipe.data.scale == 1 else x / recipe.data.scale


def model_input_shape(recipe: Recipe, latent=None) -> tuple[int, ...]:
    """The shape of one sample the backbone sees: the data's, or its VAE latent."""
    shape = sample_shape(recipe.data)
    return shape if latent is None else tuple(latent.latent_shape(shape))


def preview_prompts(dataset, n: int) -> list[str]:
    """The captions of the first `n` items (cycled): the fixed prompts of text-to-image previews."""
    return [dataset[i % len(dataset)].get("caption", "") for i in range(n)]


def build_objective(recipe: Recipe, stage: str, schedule: NoiseSchedule, perceptual: torch.nn.Module | None):
    """Stage mse's v-MSE (eq. 5), or stage sp's self-perceptual objective on `perceptual` (eq. 12)."""
    if stage == "mse":
        return VelocityMSE(schedule)
    sp = recipe.sp
    return SelfPerceptual(schedule, perceptual, layers=sp.layers, t_prime=sp.t_prime, distance=sp.distance,
                          formulation=sp.formulation, mse_weight=sp.mse_weight, near_offset=sp.near_offset,
                          normal_std=sp.normal_std)


def build_optimizer(model: torch.nn.Module, cfg) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over `model`'s parameters with the stage's settings (`StageConfig`), and its LR
    schedule (`lr_factor`): a linear warm-up over `warmup_steps`, constant, and the last
    `decay_steps` steps at `decay_factor` times the lr."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                  weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))


def lr_factor(cfg, step: int) -> float:
    """The lr of optimizer step `step` (0-based) of a stage, as a fraction of `cfg.lr`: the warm-up
    ramp, times `decay_factor` in the last `decay_steps` steps (every step of a shorter stage)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * cfg.decay_factor if cfg.decay_steps and step >= cfg.steps - cfg.decay_steps else warm


class Conditioner:
    """The condition of a batch: class labels (with `dropout` of them replaced by the null label
    that trains the unconditional model CFG uses) or, for latent text-to-image recipes, the text
    contexts of the captions (dropped and empty ones -> the empty prompt's context)."""

    def __init__(self, recipe: Recipe, latent: Any, device: torch.device | str):
        self.latent, self.device = latent, device
        self.num_classes = num_classes(recipe.data)
        self.null_context = None if latent is None else latent.null_context()  # [1 x L x D]

    def __call__(self, batch: dict, dropout: float, gen: torch.Generator | None) -> torch.Tensor | None:
        if self.latent is not None:
            captions = batch["caption"]
            keep = torch.tensor([c != "" for c in captions], device=self.device)
            if dropout > 0:
                keep &= torch.rand(len(captions), device=self.device, generator=gen) >= dropout
            context = self.null_context.expand(len(captions), -1, -1).clone()
            if keep.any():  # the text encoder runs on the kept captions only
                kept = [c for c, k in zip(captions, keep.tolist()) if k]
                context[keep] = self.latent.encode_prompts(kept).to(context.dtype)
            return context
        labels = batch.get("label")
        if labels is None or self.num_classes is None:
            return None
        labels = labels.to(self.device)
        if dropout > 0:
            drop = torch.rand(labels.shape, device=self.device, generator=gen) < dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return labels
