"""Sampling from a checkpoint and measuring the samples: what `sample` and `evaluate` run.

    model = load_model("runs/digits")                        # EMA weights of the latest checkpoint
    out = generate(model, n=1000, steps=25, guidance=1.0)    # samples, labels, NFE
    row = evaluate(model, ["digits"], n=1000, steps=25)       # {"digits_fid": ..., "nfe": 25, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import Recipe, RecipeError, recipe_from_dict
from .datasets import build_reference_dataset, modality, num_classes
from .sampling import ddim_sample
from .builders import (WEIGHTS_KEY, build_latent, build_model, build_schedule, check_device_support, model_input_shape,
                       to_data)

__all__ = ["LoadedModel", "Generated", "load_model", "generate", "evaluate", "MetricSpec", "METRIC_SPECS",
           "METRICS", "METRIC_MODALITY", "metrics_for", "reference_images", "REFERENCE_SUBSET"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    recipe: Recipe
    checkpoint: Path
    weights: str
    latent: Any = None          # LatentPipeline of text-to-image models (model.latent), else None

    @property
    def num_classes(self) -> int | None:
        return num_classes(self.recipe.data)


@dataclass
class Generated:
    samples: Tensor             # [N x C x H x W] (video [N x C x F x H x W], audio [N x C x L]) in about [-1, 1], CPU
    noise: Tensor               # the initial noise x_T
    labels: Tensor | None       # the class of each sample for conditional models
    nfe: int                    # network evaluations per sample


def load_model(checkpoint: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> LoadedModel:
    """A checkpoint dir (or a run dir: its latest checkpoint) -> the model in eval mode, with its
    `weights`: "ema", "online" (the trained net itself) or another name the checkpoint holds."""
    path = resolve_checkpoint(checkpoint, Path(checkpoint))
    ck = load_checkpoint(path)
    key = WEIGHTS_KEY.get(weights, weights)
    if key not in ck.weights:
        names = {v: k for k, v in WEIGHTS_KEY.items()}  # checkpoint entry -> the name a user passes
        held = ", ".join(names.get(name, name) for name in ck.weights)
        raise RecipeError(f"checkpoint {path} has no {weights!r} weights (it has {held})")
    recipe = recipe_from_dict(ck.info.recipe, check_paths=False)
    model = build_model(recipe, pretrained_weights=False)  # the checkpoint holds the weights
    model.load_state_dict(ck.weights[key])
    check_device_support(model, device)
    return LoadedModel(model.to(device).eval(), recipe, path, weights, build_latent(recipe, device))


def generate(
    loaded: LoadedModel, n: int, steps: int = 25, guidance: float = 1.0, rescale: float = 0.0,
    seed: int = 0, label: int | None = None, batch_size: int = 256, progress: bool = False,
    prompts: list[str] | None = None,
) -> Generated:
    """`n` samples with DDIM (trailing, eta 0) from noise seeded by `seed`, in batches.

    Conditional models cycle through the classes (or use `label` for all); guidance != 1 needs
    a conditional model and uses its null label as the unconditional input. Text-to-image
    models (`model.latent`) cycle through `prompts` (default: the empty prompt), guide with the
    empty prompt's context, and decode their latents to images.
    """
    r, k = loaded.recipe, loaded.num_classes
    latent = loaded.latent
    if prompts is not None and latent is None:
        raise RecipeError("prompts need a text-to-image checkpoint (model.latent); this one is not")
    if n < 1 or steps < 1 or batch_size < 1:
        raise RecipeError(f"need n, steps and batch size >= 1, got {n}, {steps}, {batch_size}")
    if steps > r.schedule.num_timesteps:
        raise RecipeError(f"steps must be in [1, {r.schedule.num_timesteps}], got {steps}")
    if not 0.0 <= rescale <= 1.0:
        raise RecipeError(f"rescale must be in [0, 1], got {rescale}")
    if guidance != 1.0 and k is None and latent is None:
        raise RecipeError("guidance needs a class-conditional model; this checkpoint is unconditional")
    if label is not None and (k is None or not 0 <= label < k):
        raise RecipeError(f"label needs a class-conditional model and a value in [0, {k})" if k
                          else "label needs a class-conditional model; this checkpoint is unconditional")
    device = next(loaded.model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *model_input_shape(r, latent), generator=g)
    labels = None
    if k is not None:
        labels = torch.full((n,), label) if label is not None else torch.arange(n) % k
    prompts = [(prompts or [""])[i % len(prompts or [""])] for i in range(n)] if latent is not None else None
    schedule = build_schedule(r)
    chunks = []
    for i in tqdm(range(0, n, batch_size), desc="sampling", disable=not progress, leave=False):
        cond = None if labels is None else labels[i:i + batch_size].to(device)
        if prompts is not None:
            cond = latent.encode_prompts(prompts[i:i + batch_size])
        x = ddim_sample(loaded.model, schedule, noise[i:i + batch_size].to(device), cond=cond, steps=steps,
                        guidance_scale=guidance, guidance_rescale=rescale)
        chunks.append(to_data(r, latent, x).cpu())
    return Generated(torch.cat(chunks), noise, labels, steps * (2 if guidance != 1.0 else 1))


# Data images (a seeded random subset) that KID keeps features of and the spectrum is measured
# on: more than the sample counts used, and 10,000 x 2048 float32 features are an 80 MB cache.
# The held-out split where the dataset has one (photo_patches), so samples are compared with data
# the model never saw.
REFERENCE_SUBSET = 10_000


def reference_images(recipe: Recipe, limit: int = REFERENCE_SUBSET) -> Tensor:
    """The data images the metrics score samples against: `limit` items of the recipe's reference
    dataset in a fixed random order (seed 0), stacked [N x C x H x W]."""
    data = build_reference_dataset(recipe.data)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit]
    return torch.stack([data[int(i)]["x"] for i in idx])


def _circles(loaded: LoadedModel, gen: Generated, **_: Any) -> dict[str, float]:
    from .metrics.circles import circles_metrics

    return circles_metrics(gen.samples)


def _digits(loaded: LoadedModel, gen: Generated, **_: Any) -> dict[str, float]:
    from .metrics.digits import digits_metrics

    return digits_metrics(gen.samples, labels=gen.labels)


def _moving_shapes(loaded: LoadedModel, gen: Generated, **_: Any) -> dict[str, float]:
    from .metrics.moving_shapes import moving_shapes_metrics

    return moving_shapes_metrics(gen.samples, labels=gen.labels)


def _tones(loaded: LoadedModel, gen: Generated, **_: Any) -> dict[str, float]:
    from .metrics.tones import tones_metrics

    return tones_metrics(gen.samples, sample_rate=loaded.recipe.data.sample_rate, labels=gen.labels)


def _inception(loaded: LoadedModel, gen: Generated, inception_net: torch.nn.Module,
               cache_dir: str | None = None, **_: Any) -> dict[str, float]:
    """FID and KID against the recipe's data and IS, with the standard FID Inception network (the
    reference keeps the pool3 features of its first REFERENCE_SUBSET images for KID)."""
    from .metrics.fid import cached_statistics, fid_and_inception_score

    net = inception_net
    r = loaded.recipe
    key = f"fid-inception-pool3|{r.data.name}|{r.data.path}|{r.data.size}|{r.data.channels}|{r.data.seed}"
    cache = Path(cache_dir or loaded.checkpoint.parent.parent) / "fid_reference.safetensors"
    ref_images = None

    def ref_batches():
        nonlocal ref_images
        ref_images = reference_images(r, 50_000) if ref_images is None else ref_images
        return ref_images.split(64)

    ref = cached_statistics(cache, key, ref_batches, net, keep_features=REFERENCE_SUBSET)
    return fid_and_inception_score(net, gen.samples.split(64), ref)


def _spectrum(loaded: LoadedModel, gen: Generated, **_: Any) -> dict[str, float]:
    """Radially averaged power spectrum of the samples against REFERENCE_SUBSET data images."""
    from .metrics.spectrum import spectrum_metrics

    return spectrum_metrics(gen.samples, reference_images(loaded.recipe, REFERENCE_SUBSET))


def _patches(loaded: LoadedModel, gen: Generated, **_: Any) -> dict[str, float]:
    """KID and Frechet distance on fixed weight-free patch features, and the mean absolute
    Laplacian, against REFERENCE_SUBSET data images."""
    from .metrics.patches import patches_metrics

    return patches_metrics(gen.samples, reference_images(loaded.recipe, REFERENCE_SUBSET))


@dataclass(frozen=True)
class MetricSpec:
    """A metric: the modality of the samples it measures, and `measure(loaded, gen, **kwargs)` ->
    {column: value}."""

    modality: str
    measure: Callable[..., dict[str, float]]


# The metric registry: a new metric is one function above plus one entry here.
METRIC_SPECS: dict[str, MetricSpec] = {
    "circles": MetricSpec("image", _circles), "digits": MetricSpec("image", _digits),
    "inception": MetricSpec("image", _inception), "moving_shapes": MetricSpec("video", _moving_shapes),
    "tones": MetricSpec("audio", _tones), "spectrum": MetricSpec("image", _spectrum),
    "patches": MetricSpec("image", _patches),
}
# views of the registry: each metric's function, and the modality of the samples it measures
METRICS = {name: spec.measure for name, spec in METRIC_SPECS.items()}
METRIC_MODALITY = {name: spec.modality for name, spec in METRIC_SPECS.items()}


def metrics_for(kind: str) -> list[str]:
    """The metrics that measure samples of modality `kind`, in registry order."""
    return [name for name, spec in METRIC_SPECS.items() if spec.modality == kind]


def evaluate(
    loaded: LoadedModel, metrics: list[str], n: int = 1000, steps: int = 25, guidance: float = 1.0,
    rescale: float = 0.0, seed: int = 0, batch_size: int = 256, progress: bool = False, **metric_kwargs: Any,
) -> dict[str, Any]:
    """Generate `n` samples once and measure every metric on them; one flat dict (a table row)."""
    unknown = [m for m in metrics if m not in METRIC_SPECS]
    if unknown or not metrics:
        raise RecipeError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(METRIC_SPECS)}")
    kind = modality(loaded.recipe.data)
    wrong = [m for m in metrics if METRIC_SPECS[m].modality != kind]
    if wrong:
        raise RecipeError(f"metric(s) {', '.join(wrong)} measure {METRIC_SPECS[wrong[0]].modality} samples; this "
                          f"checkpoint makes {kind} ({loaded.recipe.data.name}); choose from "
                          f"{', '.join(metrics_for(kind))}")
    if "inception" in metrics:  # find the weights before spending time on sampling
        from .metrics.inception import load_fid_inception

        metric_kwargs["inception_net"] = load_fid_inception(metric_kwargs.pop("inception_weights", None))
    gen = generate(loaded, n, steps, guidance, rescale, seed, batch_size=batch_size, progress=progress)
    row: dict[str, Any] = {
        "checkpoint": str(loaded.checkpoint), "weights": loaded.weights, "n": n, "steps": steps, "nfe": gen.nfe,
        "guidance": guidance, "rescale": rescale, "seed": seed,
    }
    for m in metrics:
        for k, v in METRIC_SPECS[m].measure(loaded, gen, **metric_kwargs).items():
            row[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return row
