"""The training engine: the paper's two stages (section 4) on Hugging Face accelerate.

Stage "mse" trains v-prediction MSE (eq. 5) with conditional dropout; stage "sp" starts from
the stage-1 checkpoint, freezes a copy of it as the perceptual network (EMA weights by
default) and trains the self-perceptual objective (eq. 12). The same code runs on one CPU, one
GPU, or many processes under `accelerate launch` / torchrun: DDP, FSDP2 (`train.fsdp` or an
accelerate FSDP config) or DeepSpeed ZeRO-1/2 (an accelerate DeepSpeed config).

Nothing is lost on a fault: checkpoints are atomic and hold every state needed for an exact
resume (weights, EMA, optimizer, LR schedule, grad scaler, every process's RNG, the data
position); SIGTERM/SIGINT save at the next step boundary; a non-finite loss or gradient stops
the run naming the step (or, with ``train.nonfinite = "skip"``, skips and counts the step); a
sustained finite loss spike stops it naming the last checkpoint saved before the rise
(`DivergenceGuard`; ``train.divergence = "warn"`` only warns).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from .checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import Recipe, RecipeError, StageConfig, TrainConfig, recipe_to_dict, save_recipe
from .datasets import build_dataset, make_loader, modality, num_classes, sample_shape
from .datasets.loader import ResumableBatchSampler
from .ema import EMA
from .media import save_samples
from .objectives import SelfPerceptual, VelocityMSE, make_perceptual
from .sampling import ddim_sample
from .schedule import NoiseSchedule
from .validation import ValidationBatch
from .sharding import (clip_grad_norm, full_fp32_params, full_state_dict, is_sharded, load_deepspeed_state,
                       load_optimizer_state, optimizer_state, shard)

__all__ = ["Trainer", "TrainResult", "StageResult", "NonFiniteError", "DivergenceError", "DivergenceGuard",
           "PerceptualCheckError",
           "build_model", "build_schedule", "check_device_support", "final_checkpoint", "run_info", "sharding_plan",
           "deepspeed_plan"]

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient (train.nonfinite = "stop")."""


class DivergenceError(RuntimeError):
    """A sustained loss spike (train.divergence = "stop"); `report` holds the figures and the
    last good checkpoint, as written to summary.json."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class PerceptualCheckError(RuntimeError):
    """Stage sp's frozen network fails `sp.check_factor`'s check: its v-MSE on the validation batch
    is far above the best loss its stage-1 checkpoint recorded (a diverged or broken model)."""


class DivergenceGuard:
    """Detects a sustained loss spike: the median loss of the last `window` steps staying above
    `factor` x its running minimum for `window` consecutive steps.

    A median over a window, not the step's loss: one batch's loss at random t (and t') is often
    3x, in stage sp 15x, another's, and a few outlier batches hardly move a median. The statistic
    runs from the first full window, so a rise at the end of the warm-up is measured against the
    loss before it; a spike is confirmed no earlier than step `start` (the warm-up plus one
    window). The gradient norm is reported, not a trigger: its scale changes by orders of
    magnitude over a healthy run, and a norm that blows up either drags the loss along (caught
    here) or turns non-finite (caught by train.nonfinite).
    """

    def __init__(self, factor: float, window: int, start: int):
        self.factor, self.window, self.start = factor, window, start
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.best = math.inf             # running minimum of the median loss
        self.best_norm = math.nan        # the median grad norm when it was reached
        self.above = 0                   # consecutive steps with median > factor x best
        self.fired: int | None = None    # began() of the confirmed spike; the guard is then done

    def update(self, step: int, loss: float, grad_norm: float) -> bool:
        """Feed stage step `step` (1-based); True once, at the step a spike is confirmed."""
        if self.fired is not None:
            return False
        self.losses.append(loss)
        if math.isfinite(grad_norm):  # NaN when DeepSpeed computed none, inf on a loss scaler's skipped step
            self.norms.append(grad_norm)
        if len(self.losses) < self.window:
            return False
        median = self.median()
        self.above = self.above + 1 if median > self.factor * self.best else 0
        if median < self.best:
            self.best, self.best_norm = median, self.median_norm()
        if self.above >= self.window and step >= self.start:
            self.fired = self.began(step)
            return True
        return False

    def began(self, step: int) -> int:
        """After step `step`: the earliest step at which a spike confirmed now or later can have
        begun (the first step of the window whose median first crossed the threshold); what was
        saved before it is good."""
        return self.fired if self.fired is not None else step - self.above - self.window + 2

    def median(self) -> float:
        return statistics.median(self.losses)

    def median_norm(self) -> float:
        return statistics.median(self.norms) if self.norms else math.nan

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "norms": list(self.norms), "best": self.best,
                "best_norm": self.best_norm, "above": self.above, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        self.losses.extend(state["losses"])
        self.norms.extend(state["norms"])
        self.best, self.best_norm, self.above, self.fired = (state[k] for k in ("best", "best_norm", "above", "fired"))


@dataclass
class StageResult:
    stage: str
    steps: int
    final_loss: float
    seconds: float
    checkpoint: str
    skipped_nonfinite: int = 0
    skipped_items: int = 0


@dataclass
class TrainResult:
    run_dir: str
    stages: list[StageResult] = field(default_factory=list)
    interrupted_by: int | None = None   # the signal number that stopped the run, if any
    stopped_at: int | None = None       # global step of the interruption checkpoint


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


def model_input_shape(recipe: Recipe, latent=None) -> tuple[int, ...]:
    """The shape of one sample the backbone sees: the data's, or its VAE latent."""
    shape = sample_shape(recipe.data)
    return shape if latent is None else tuple(latent.latent_shape(shape))


def preview_prompts(dataset, n: int) -> list[str]:
    """The captions of the first `n` items (cycled): the fixed prompts of text-to-image previews."""
    return [dataset[i % len(dataset)].get("caption", "") for i in range(n)]


def _param_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_info(meta: dict) -> dict:
    """The trainer's fields of a checkpoint's meta (stage, stage_step, final, recipe, step)."""
    return {**meta.get("extra", {}), "stage": meta.get("stage"), "step": meta.get("step")}


def _meta_of(path: Path) -> dict:
    """`run_info` of a checkpoint directory, read from its meta.json without loading tensors."""
    return run_info(json.loads((Path(path) / "meta.json").read_text()))


def final_checkpoint(run_dir: str | Path, stage: str) -> Path | None:
    """The newest complete checkpoint that ended `stage` in `run_dir`, or None."""
    for path in reversed(list_checkpoints(run_dir)):
        info = _meta_of(path)
        if info.get("stage") == stage and info.get("final"):
            return path
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _warn_recipe_changes(saved: dict, current: dict) -> None:
    """Resuming with a changed recipe is allowed (e.g. more steps) but said out loud."""
    a, b = _flatten(saved), _flatten(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if changed:
        log.warning("resuming with a recipe that differs from the checkpoint's in: %s",
                    ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in changed))


def sharding_plan(accelerator: Accelerator, train: TrainConfig) -> tuple[bool, dict[str, Any]]:
    """Whether to shard with FSDP2 (`train.fsdp`, or an accelerate FSDP config) and the keyword
    arguments of `sharding.shard` that the accelerate config sets (units, resharding)."""
    kind = accelerator.distributed_type.value
    if kind == "MEGATRON_LM":
        raise RecipeError(f"accelerate distributed type {kind} is not supported; use DDP, FSDP or DeepSpeed "
                          "(recipes/accelerate/)")
    if kind == "DEEPSPEED":
        if train.fsdp:
            raise RecipeError("train.fsdp and a DeepSpeed accelerate config exclude each other: DeepSpeed shards itself")
        return False, {}
    options: dict[str, Any] = {}
    plugin = accelerator.state.fsdp_plugin if kind == "FSDP" else None
    if plugin is not None:
        if plugin.fsdp_version != 2:
            raise RecipeError("the accelerate config asks for FSDP version 1; this trainer shards with FSDP2: "
                              "set fsdp_version: 2 (see recipes/accelerate/fsdp_1node.yaml)")
        if train.mixed_precision == "fp16":
            raise RecipeError("FSDP supports train.mixed_precision 'no' or 'bf16', not 'fp16'; use bf16")
        options = {"class_names": plugin.transformer_cls_names_to_wrap or None,
                   "reshard_after_forward": bool(plugin.reshard_after_forward)}
        offload = type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
        ignored = [name for name, on in (("fsdp_offload_params", offload),
                                         ("fsdp_activation_checkpointing", plugin.activation_checkpointing)) if on]
        if ignored:
            log.warning("ignoring %s of the accelerate config (for activation checkpointing set "
                        "model.overrides.gradient_checkpointing = true)", ", ".join(ignored))
    wanted = train.fsdp or plugin is not None
    if wanted and accelerator.num_processes == 1:
        log.warning("FSDP with one process has nothing to shard: training unsharded")
        return False, {}
    return wanted, options


def deepspeed_plan(accelerator: Accelerator, train: TrainConfig) -> bool:
    """Whether accelerate runs DeepSpeed, after checking what this trainer supports of it: ZeRO
    stages 1 and 2 without offloading, mixed precision 'no' or 'bf16', train.nonfinite = 'stop'.
    Stage 0 (no partitioning) is DDP: recipes/accelerate/ddp_1node.yaml.

    Stage 3 is refused: DeepSpeed (0.19) cannot write a full tensor back into a ZeRO-3 partition
    when its size is not a multiple of the process count, so a resume could not be exact; FSDP
    (recipes/accelerate/fsdp_1node.yaml) shards the weights instead."""
    if accelerator.distributed_type.value != "DEEPSPEED":
        return False
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2):
        raise RecipeError(f"DeepSpeed ZeRO stage {zero.get('stage')!r} is not supported: use stage 1 or 2, DDP "
                          "for stage 0 (ddp_1node.yaml), or FSDP (fsdp_1node.yaml) to shard the weights as ZeRO-3 would")
    offload = [k for k in ("offload_optimizer", "offload_param")
               if str(zero.get(k, {}).get("device", "none")).lower() not in ("none", "auto")]
    if offload:
        raise RecipeError(f"DeepSpeed {' and '.join(offload)} is not supported by this trainer; set the device "
                          "to none (FSDP or more processes shard further)")
    if train.mixed_precision == "fp16":
        raise RecipeError("DeepSpeed supports train.mixed_precision 'no' or 'bf16', not 'fp16'; use bf16")
    if train.nonfinite == "skip":
        raise RecipeError("train.nonfinite = 'skip' cannot be honoured under DeepSpeed (its engine steps inside "
                          "backward); use 'stop'")
    return True


def _accelerator(mixed_precision: str) -> Accelerator:
    """accelerate's Accelerator for this machine. cpu=True on a CPU-only machine lets `accelerate
    launch --multi_gpu` / torchrun run several CPU processes (gloo); DeepSpeed needs cpu=False
    and, without GPUs, the gloo backend named explicitly."""
    cuda = torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.utils import InitProcessGroupKwargs

        handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
        return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=handlers)
    return Accelerator(mixed_precision=mixed_precision, cpu=not cuda)


class Trainer:
    """Runs the stages of `recipe.train.stages` in `run_dir`, optionally resuming.

    ``Trainer(recipe, run_dir, resume="latest").run()``; `request_stop()` (called by the
    signal handlers) makes the loop save a checkpoint at the next step boundary and return.
    """

    def __init__(self, recipe: Recipe, run_dir: str | Path, resume: str | None = None, progress: bool = True):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.accelerator = _accelerator(recipe.train.mixed_precision)
        self.device = self.accelerator.device
        self.fsdp, self._shard_options = sharding_plan(self.accelerator, recipe.train)
        self.deepspeed = deepspeed_plan(self.accelerator, recipe.train)
        self.collective_state = self.fsdp or self.deepspeed  # gathering weights needs every process
        self.schedule = build_schedule(recipe)
        try:
            self.dataset = build_dataset(recipe.data)
        except (ValueError, RuntimeError, ImportError, OSError) as e:  # empty folder, missing decoder, bad shard
            raise RecipeError(f"data ({recipe.data.name}): {e}") from e
        self.num_classes = num_classes(recipe.data)
        self.resume_from = resolve_checkpoint(resume, self.run_dir) if resume else None
        if self.resume_from is not None:
            _warn_recipe_changes(_meta_of(self.resume_from).get("recipe", {}), recipe_to_dict(recipe))
        self._stop_signal: int | None = None
        self._stop_requested = False
        self._stopped_at: int | None = None
        self._emas: dict[str, torch.nn.Module] = {}  # stage -> its final EMA model
        self._digests: dict[str, str] = {}  # stage -> digest of its final online weights
        stages = recipe.train.stages
        self.offsets = {s: sum(self._stage_cfg(p).steps for p in stages[: stages.index(s)]) for s in stages}
        self.latent = build_latent(recipe, self.device)  # None in pixel space
        self._null_context = None if self.latent is None else self.latent.null_context()  # [1 x L x D]
        if self.latent is not None and "caption" not in self.dataset[0]:
            raise RecipeError(f"model.latent trains on captions, but {recipe.data.name} items have none (an "
                              "image_folder needs captions.jsonl; set data.empty_captions = true for section 5.7)")
        g = torch.Generator().manual_seed(recipe.seed + 12345)
        shape = (recipe.train.num_samples, *model_input_shape(recipe, self.latent))
        self.sample_noise = torch.randn(shape, generator=g)  # the same noise for every grid
        self.sample_cond = (torch.arange(recipe.train.num_samples) % self.num_classes) if self.num_classes else None
        if self.latent is not None:  # the captions of the first items, the same for every grid
            self.sample_cond = self.latent.encode_prompts(preview_prompts(self.dataset, recipe.train.num_samples))
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, self.run_dir / "recipe.toml")
        self._tb = self._tensorboard() if self.is_main else None
        self._validation: ValidationBatch | None = None

    # ------------------------------------------------------------------ small helpers
    def _stage_cfg(self, stage: str) -> StageConfig:
        return self.recipe.mse if stage == "mse" else self.recipe.sp

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def request_stop(self, signum: int | None = None) -> None:
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self._stop_requested, self._stop_signal = True, signum

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self._tb.add_scalar(f"{record['stage']}/{k}", v, record["step"])

    def validation(self) -> ValidationBatch | None:
        """The fixed validation batch (None with train.validation_size = 0), built on first use."""
        n = self.recipe.train.validation_size
        if n and self._validation is None:
            encode = None
            if self.latent is not None:  # a fixed posterior sample of the VAE
                g = torch.Generator(device=self.device).manual_seed(self.recipe.seed + 54321)
                encode = lambda x: self.latent.encode_images(x.to(self.device), generator=g).cpu()  # noqa: E731
            self._validation = ValidationBatch.from_dataset(
                self.dataset, n, self.schedule, seed=self.recipe.seed + 54321,
                condition=lambda b: self._condition(b, 0.0, None), encode=encode)
        return self._validation

    def _check_perceptual(self, perceptual: torch.nn.Module, source: Path) -> None:
        """Stage sp's sanity check of f_* (sp.check_factor): its v-MSE on the validation batch
        against the best loss stage 1 recorded in `source`; PerceptualCheckError naming a
        checkpoint of that run that passes, if one does."""
        factor, val = self.recipe.sp.check_factor, self.validation()
        info = _meta_of(source)
        best = info.get("best_loss")
        if not factor or val is None:
            return
        if info.get("stage") != "mse" or best is None or not math.isfinite(best):
            log.info("sp: %s records no stage-1 loss to check the perceptual network against", source)
            return
        vmse = self._reduce_max(val.vmse(perceptual.to(self.device), self.accelerator.autocast))
        self._log({"step": self.offsets["sp"], "stage": "sp", "stage_step": 0, "perceptual_val_vmse": vmse,
                   "stage1_best_loss": best, "source": str(source)})
        if vmse <= factor * best:
            return
        which = self.recipe.sp.perceptual_weights
        better = None
        for path in reversed(list_checkpoints(source.parent.parent)):  # its run's, newest first, before it
            other = _meta_of(path)
            if other.get("stage") != "mse" or other["step"] >= info["step"]:
                continue
            net = self._frozen(load_checkpoint(path).weights["model" if which == "online" else "ema"]).to(self.device)
            if self._reduce_max(val.vmse(net, self.accelerator.autocast)) <= factor * best:
                better = path
                break
        hint = (f"use {better} as sp.init" if better else "no earlier stage-1 checkpoint of that run passes")
        raise PerceptualCheckError(
            f"sp: the perceptual network ({which} weights of {source}) has v-MSE {vmse:.4g} on the validation "
            f"batch, {vmse / best:.1f} x the best stage-1 loss {best:.4g} (sp.check_factor = {factor:g}): the "
            f"stage-1 model looks diverged or broken; {hint} (or set sp.check_factor = 0)")

    def _reduce_max(self, value: float) -> float:
        """The largest of every process's `value` (so all of them take the same decision)."""
        return max(self.accelerator.gather(torch.tensor([value], device=self.device)).tolist())

    def _perceptual_dtype(self) -> torch.dtype:
        d = self.recipe.sp.perceptual_dtype
        return DTYPES[self.recipe.train.mixed_precision if d == "auto" else d]

    def _new_model(self, pretrained_weights: bool = True) -> torch.nn.Module:
        """The recipe's backbone; a latent text-to-image model also gets the empty prompt's
        context as its null condition (before any EMA or frozen copy is made of it)."""
        net = build_model(self.recipe, pretrained_weights)
        check_device_support(net, self.device)
        if self.latent is not None:
            net.set_null_context(self.latent.null_context().cpu())
        return net

    def _generate(self, model: torch.nn.Module) -> torch.Tensor:
        """Samples from the fixed noise (and fixed labels or prompts), without guidance, on the
        CPU; latents are decoded to images."""
        cond = None if self.sample_cond is None else self.sample_cond.to(self.device)
        x = ddim_sample(model, self.schedule, self.sample_noise.to(self.device), cond=cond,
                        steps=self.recipe.train.sample_steps)
        return (x if self.latent is None else self.latent.decode(x)).cpu()

    def _generate_main(self, model: torch.nn.Module | None) -> torch.Tensor | None:
        """`_generate` on the main process (None elsewhere); every process runs a sharded model,
        as each holds a part of its weights."""
        if model is not None and (self.is_main or is_sharded(model)):
            x = self._generate(model)
            return x if self.is_main else None
        return None

    def _sample(self, model: torch.nn.Module, name: str) -> Path | None:
        x = self._generate_main(model)
        return None if x is None else self._save(x, self.run_dir / "samples" / f"{name}.png")[0]

    def _save(self, x: torch.Tensor, path: Path, nrow: int | None = None) -> list[Path]:
        d = self.recipe.data
        return save_samples(x, path, modality(d), nrow=nrow, scale=2, sample_rate=d.sample_rate)

    # ------------------------------------------------------------------ the run
    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train every remaining stage; `stop_after` (global step) simulates a preemption."""
        result = TrainResult(run_dir=str(self.run_dir))
        handlers = {s: signal.signal(s, lambda n, f: self.request_stop(n)) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            ckpt = self.resume_from
            meta = _meta_of(ckpt) if ckpt else {}
            for stage in self.recipe.train.stages:
                done = meta and (self.recipe.train.stages.index(meta["stage"]) > self.recipe.train.stages.index(stage)
                                 or (meta["stage"] == stage and meta.get("final")))
                if done:
                    continue
                resume = ckpt if meta.get("stage") == stage else None
                stage_result = self._run_stage(stage, resume, stop_after)
                if stage_result is None:  # interrupted
                    result.interrupted_by = self._stop_signal
                    result.stopped_at = self._stopped_at
                    return result
                result.stages.append(stage_result)
            self._finish(result)
            return result
        except DivergenceError as e:
            if self.is_main:  # the run ends here: the summary names the spike and the last good checkpoint
                summary = {"run_dir": str(self.run_dir), "stages": [asdict(s) for s in result.stages],
                           "diverged": e.report}
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            raise
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self._tb is not None:
                self._tb.flush()

    def _load_start(self, model: torch.nn.Module, stage: str, source: Path, which: str) -> Any:
        """Load the `which` ("online" | "ema") weights of checkpoint `source` into the online net
        of `stage` (RecipeError when they do not fit the recipe's model); returns the checkpoint."""
        ck = load_checkpoint(source)
        key = "model" if which == "online" else "ema"
        try:
            model.load_state_dict(ck.weights[key])
        except (RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError(f"{stage}.init: the {which} weights of {source} do not fit this recipe's model "
                              f"({first})") from e
        return ck

    def _init_sp(self, model: torch.nn.Module, source: Path):
        """Stage 2 from a stage-1 checkpoint: the frozen perceptual copy and the online net, which
        by default starts from the very weights that are frozen (Algorithm 1's deep copy)."""
        sp = self.recipe.sp
        start = sp.perceptual_weights if sp.init_weights == "frozen" else sp.init_weights
        ck = self._load_start(model, "sp", source, start)
        return self._frozen(ck.weights["model" if sp.perceptual_weights == "online" else "ema"])

    def _frozen(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The perceptual network f_*: the recipe's backbone with `weights`, frozen."""
        net = self._new_model(pretrained_weights=False)
        net.load_state_dict(weights)
        return make_perceptual(net, dtype=self._perceptual_dtype())

    def _stage1_source(self) -> Path:
        if self.recipe.sp.init:
            return resolve_checkpoint(self.recipe.sp.init, self.run_dir)
        final = final_checkpoint(self.run_dir, "mse")
        if final is None:
            raise FileNotFoundError(f"no final stage-1 (mse) checkpoint in {self.run_dir}; set sp.init")
        return final

    def _last_before(self, step: int) -> Path | None:
        """The newest complete checkpoint of the run saved before global step `step`, or None."""
        return next((p for p in reversed(list_checkpoints(self.run_dir)) if _meta_of(p)["step"] < step), None)

    def _spike(self, stage: str, step: int, offset: int, guard: DivergenceGuard, grad_norm: float) -> tuple[str, dict]:
        """One line on the spike `guard` confirmed at stage step `step`, and its report for summary.json."""
        began = offset + guard.began(step)
        good = self._last_before(began)
        report = {"stage": stage, "stage_step": step, "step": offset + step, "rise_began_at_step": began,
                  "median_loss": guard.median(), "min_median_loss": guard.best, "factor": guard.factor,
                  "window": guard.window, "grad_norm": grad_norm, "median_grad_norm": guard.median_norm(),
                  "median_grad_norm_at_min": guard.best_norm, "last_good_checkpoint": str(good) if good else None,
                  "checkpoints_after_the_rise": [str(p) for p in list_checkpoints(self.run_dir)
                                                 if _meta_of(p)["step"] >= began]}
        use = " or use it as sp.init" if stage == "mse" else ""
        message = (f"loss diverging at {stage} step {step} (global step {offset + step}): the median loss of the last "
                   f"{guard.window} steps, {guard.median():.4g}, has stayed above {guard.factor:g} x its minimum "
                   f"{guard.best:.4g} for {guard.window} steps (the rise began at global step {began}); grad norm "
                   f"{grad_norm:.3g} (median {guard.median_norm():.3g}, {guard.best_norm:.3g} at the minimum); "
                   + (f"the last good checkpoint is {good} (--resume it with other settings{use})" if good
                      else "no checkpoint was saved before the rise"))
        return message, report

    def _run_stage(self, stage: str, resume: Path | None, stop_after: int | None) -> StageResult | None:
        acc, recipe, cfg = self.accelerator, self.recipe, self._stage_cfg(stage)
        offset = self.offsets[stage]
        # a stage starts from the recipe's seed whatever ran before it (a resume then restores
        # every RNG from the checkpoint); a stage that starts from a checkpoint (sp, or mse with
        # mse.init: SP's matched control) takes seed + 1, so SP and its control see the same data
        # order and start from the same generator state
        seed = recipe.seed + int(stage == "sp" or bool(cfg.init))
        set_seed(seed)
        # stage mse starts from model.pretrained (if any) or mse.init; everything else loads a checkpoint
        model = self._new_model(pretrained_weights=stage == "mse" and resume is None and not cfg.init)
        perceptual = None
        state: dict[str, Any] = {}
        if resume is not None:
            ck = load_checkpoint(resume)
            model.load_state_dict(ck.weights["model"])
            state = ck.state
            if stage == "sp":
                perceptual = self._frozen(ck.weights["perceptual"])
        elif stage == "sp":
            source = self._stage1_source()
            perceptual = self._init_sp(model, source)
            self._check_perceptual(perceptual, source)
        elif cfg.init:  # stage mse continued from a checkpoint (the matched control of an SP run)
            self._load_start(model, "mse", resolve_checkpoint(cfg.init, self.run_dir), cfg.init_weights)
        elif not recipe.model.pretrained and hasattr(model, "lr_advice"):  # from scratch
            advice = model.lr_advice(recipe.model.preset, cfg.lr, cfg.warmup_steps)
            if advice and self.is_main:
                log.warning(advice)
        # the frozen network of the val_sp diagnostic: stage sp's f_*, or an mse stage's start weights
        reference = perceptual
        if stage == "mse" and cfg.init and self.validation() is not None:
            start = load_checkpoint(resolve_checkpoint(cfg.init, self.run_dir))
            reference = self._frozen(start.weights["model" if cfg.init_weights == "online" else "ema"])
        ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
        if resume is not None:
            ema.load_state_dict({"model": ck.weights["ema"], "num_updates": state["ema_updates"]})
        if recipe.train.compile:
            model.forward = torch.compile(model.forward)
        if self.fsdp:  # the online net and its EMA, sharded alike (the optimizer then holds shards)
            for net in (model, ema.model):
                try:
                    shard(net.to(self.device), **self._shard_options)
                except ValueError as e:  # fsdp_transformer_layer_cls_to_wrap names no block of this backbone
                    raise RecipeError(f"FSDP: {e}") from e

        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                      weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        if resume is not None:
            if not self.deepspeed:
                load_optimizer_state(model, optimizer, state["optimizer"])
            lr_sched.load_state_dict(state["lr_scheduler"])
        if self.deepspeed:  # the engine wraps the model; `optimizer` becomes its ZeRO optimizer
            model = self._deepspeed_engine(model, optimizer, cfg, state.get("optimizer"))
            optimizer = model.optimizer
        elif not self.fsdp:  # DDP (or one process); a sharded model is not handed to accelerate
            model, optimizer = acc.prepare(model, optimizer)
        if resume is not None and state.get("scaler") is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        ema.model.to(self.device)
        for frozen in {id(n): n for n in (perceptual, reference) if n is not None}.values():
            frozen.to(self.device)  # never wrapped in DDP, never given to the optimizer

        objective = (VelocityMSE(self.schedule) if stage == "mse" else SelfPerceptual(
            self.schedule, perceptual, layers=recipe.sp.layers, t_prime=recipe.sp.t_prime,
            distance=recipe.sp.distance, formulation=recipe.sp.formulation, mse_weight=recipe.sp.mse_weight,
            near_offset=recipe.sp.near_offset, normal_std=recipe.sp.normal_std))
        gen = torch.Generator(device=self.device).manual_seed(
            recipe.seed * 1_000_003 + 7919 * acc.process_index + (seed - recipe.seed))

        world, rank = acc.num_processes, acc.process_index
        engine = "FSDP" if self.fsdp else "DeepSpeed" if self.deepspeed else "DDP" if world > 1 else "one process"
        log.info("stage %s (%s): effective batch %d = %d per process x %d accumulation steps x %d processes", stage,
                 engine, cfg.batch_size * cfg.grad_accum * world, cfg.batch_size, cfg.grad_accum, world)
        pos = state.get("data_position", (0, 0))
        sampler = ResumableBatchSampler(len(self.dataset), cfg.batch_size, seed=seed,
                                        rank=rank, world_size=world, epoch=pos[0], batch_in_epoch=pos[1])
        batches = iter(make_loader(self.dataset, sampler, recipe.data.num_workers))
        data_pos = list(pos)  # the sampler position after the last batch consumed

        def next_batch() -> dict:
            batch = next(batches)
            data_pos[:] = batch["position"]
            counters["skipped_items"] += batch.get("skipped", 0)
            return batch

        step = state.get("stage_step", 0)
        if step > cfg.steps:
            raise RecipeError(f"{stage}.steps = {cfg.steps}, but {resume} is at {stage} step {step}: set "
                              f"{stage}.steps >= {step} to resume from it")
        counters = dict(state.get("counters", {"skipped_nonfinite": 0, "skipped_items": 0}))
        if resume is not None:
            rngs = state["rng"]
            if len(rngs) != world:
                log.warning("resuming %d processes from a checkpoint of %d: RNG streams restart", world, len(rngs))
            else:
                restore_rng_state(rngs[rank], {"objective": gen})
        t = recipe.train
        # the guard runs with train.divergence = "off" too: its running minimum is the stage's best
        # loss, recorded in every checkpoint (stage sp checks its perceptual network against it)
        guard = DivergenceGuard(t.divergence_factor, t.divergence_window, start=cfg.warmup_steps + t.divergence_window)
        if state.get("divergence"):
            guard.load_state_dict(state["divergence"])

        def save(final: bool) -> Path:
            rng = gather_object([capture_rng_state({"objective": gen})])
            path = None
            if self.is_main or self.collective_state:  # sharded tensors are gathered to the main process
                unwrapped = acc.unwrap_model(model)
                weights = {"model": full_state_dict(unwrapped), "ema": full_state_dict(ema.model)}
                inner = optimizer if self.deepspeed else getattr(optimizer, "optimizer", optimizer)
                opt_state = optimizer_state(unwrapped, inner)
            if self.is_main:
                if perceptual is not None:
                    weights["perceptual"] = perceptual.state_dict()
                ck_state = {
                    "optimizer": opt_state, "lr_scheduler": lr_sched.state_dict(),
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                    "rng": rng, "data_position": list(data_pos), "stage_step": step,
                    "ema_updates": ema.num_updates, "counters": counters,
                    "divergence": guard.state_dict(),
                }
                meta = {"stage": stage, "stage_step": step, "final": final, "recipe": recipe_to_dict(recipe),
                        "best_loss": guard.best if math.isfinite(guard.best) else None}
                # rotation spares the checkpoint that a spike confirmed later would name as the last good one
                good = t.divergence != "off" and self._last_before(offset + guard.began(step))
                path = save_checkpoint(self.run_dir, offset + step, weights=weights, state=ck_state, meta=meta,
                                       keep_last=recipe.train.keep_last,
                                       keep=lambda p: p == good or _meta_of(p).get("final", False))
            acc.wait_for_everyone()
            return path or self.run_dir

        bar = tqdm(total=cfg.steps, initial=step, desc=f"{stage}", disable=not (self.progress and self.is_main),
                   dynamic_ncols=True)
        window: list[float] = []
        t_start, last_loss = time.time(), float("nan")
        model.train()
        val = self.validation()
        online_net = model if self.fsdp else acc.unwrap_model(model)  # a sharded forward is collective

        def diagnostics() -> dict:
            return {} if val is None else val.losses(online_net, reference, acc.autocast)

        path = None
        if step == cfg.steps:  # resumed at the stage's (shortened) end: finish it
            log.info("%s: resumed at step %d = %s.steps; ending the stage", stage, step, stage)
            self._sample(ema.model, f"{stage}-{offset + step:07d}")
            path = save(True)
        while step < cfg.steps:
            loss_sum = torch.zeros((), device=self.device)
            for micro in range(cfg.grad_accum):
                batch = next_batch()
                while "x" not in batch:  # every item of the batch was unreadable
                    batch = next_batch()
                x0 = batch["x"].to(self.device)
                if self.latent is not None:  # images -> VAE latents (a posterior sample)
                    x0 = self.latent.encode_images(x0, generator=gen)
                cond = self._condition(batch, cfg.cond_dropout, gen)
                with acc.autocast():
                    loss = objective(model, x0, cond, generator=gen).mean()
                loss_sum += loss.detach()
                last = micro == cfg.grad_accum - 1
                if self.deepspeed:  # the engine scales by 1 / grad_accum, reduces, clips, steps at the boundary
                    model.set_gradient_accumulation_boundary(last)
                    model.backward(loss)
                    model.step()
                elif self.fsdp:  # gradients reduce-scatter on the last micro-batch only
                    model.set_requires_gradient_sync(last)
                    acc.backward(loss / cfg.grad_accum)
                elif not last:
                    with acc.no_sync(model):
                        acc.backward(loss / cfg.grad_accum)
                else:
                    acc.backward(loss / cfg.grad_accum)
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            if self.deepspeed:  # clipped inside the engine's step; None when it computed no norm
                norm = model.get_global_grad_norm()
            else:
                norm = (clip_grad_norm if self.fsdp else acc.clip_grad_norm_)(model.parameters(), clip)
            grad_norm = float("nan") if norm is None else float(norm)
            loss_mean = loss_sum / cfg.grad_accum
            bad_grad = acc.scaler is None and norm is not None and not math.isfinite(grad_norm)
            bad = torch.tensor(float(not torch.isfinite(loss_mean).item() or bad_grad), device=self.device)
            # one collective: is any process's step non-finite, and the loss summed over processes (the
            # divergence guard sees the same figure on every process, so all of them stop together)
            bad, world_loss = acc.reduce(torch.stack([bad, loss_mean.float()]), "sum").tolist()
            if bad > 0:
                what = f"non-finite {'loss' if not torch.isfinite(loss_mean).item() else 'gradient'}"
                if recipe.train.nonfinite == "stop":
                    raise NonFiniteError(f"{what} at {stage} step {step + 1} (global step {offset + step + 1}); "
                                         "the last complete checkpoint is intact")
                log.warning("%s at %s step %d: step skipped", what, stage, step + 1)
                counters["skipped_nonfinite"] += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                if not self.deepspeed:  # the engine stepped already
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                lr_sched.step()
                online = acc.unwrap_model(model)
                # a bf16 DeepSpeed engine keeps its float32 weights in the ZeRO partitions (gathered
                # here); in float32 the module's own weights are those masters
                masters = self.deepspeed and next(online.parameters()).dtype != torch.float32
                ema.update(online, full_fp32_params(online) if masters else None)
                window.append(loss_mean.item())
                fired = guard.update(step + 1, world_loss / acc.num_processes, grad_norm)
                if fired and t.divergence != "off":
                    message, report = self._spike(stage, step + 1, offset, guard, grad_norm)
                    if t.divergence == "stop":
                        raise DivergenceError(message, report)
                    log.warning("%s; training on (train.divergence = 'warn')", message)
            step += 1
            bar.update(1)
            if window:
                bar.set_postfix(loss=f"{window[-1]:.4f}")

            global_step = offset + step
            if step % recipe.train.log_every == 0 or step == cfg.steps:
                local = torch.tensor(sum(window) / len(window) if window else float("nan"), device=self.device)
                last_loss = acc.gather(local.reshape(1)).mean().item()
                self._log({"step": global_step, "stage": stage, "stage_step": step, "loss": last_loss,
                           "lr": lr_sched.get_last_lr()[0], "grad_norm": grad_norm,
                           "ema_decay": ema.current_decay(), **counters, **diagnostics(),
                           "elapsed_s": round(time.time() - t_start, 3)})
                window.clear()
            final = step == cfg.steps
            every = recipe.train.sample_every
            if (every and step % every == 0) or final:
                self._sample(ema.model, f"{stage}-{global_step:07d}")
            every = recipe.train.checkpoint_every
            stop = self._stop_requested or (stop_after is not None and global_step >= stop_after)
            stop = acc.reduce(torch.tensor(float(stop), device=self.device), "sum").item() > 0
            if (every and step % every == 0) or final or stop:
                path = save(final)
            if stop and not final:
                bar.close()
                self._stopped_at = global_step
                log.info("stopped at global step %d; checkpoint %s", global_step, path)
                return None
        bar.close()
        if counters["skipped_items"]:
            log.warning("%s: %d unreadable data items were skipped", stage, counters["skipped_items"])
        online = acc.unwrap_model(model)
        weights = full_state_dict(online) if self.collective_state else online.state_dict()  # collective
        self._digests[stage] = _param_digest(weights) if self.is_main or not self.collective_state else ""
        self._emas[stage] = ema.model
        return StageResult(stage=stage, steps=cfg.steps, final_loss=last_loss, seconds=time.time() - t_start,
                           checkpoint=str(path), **counters)

    def _deepspeed_engine(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: StageConfig,
                          optim_state: dict | None):
        """`model` and `optimizer` handed to a DeepSpeed engine configured from the stage (micro
        batch, accumulation, clipping); its float32 master weights are set from `model`'s own
        (not from the engine's bf16 copy) and `optim_state`, if any, is restored."""
        acc = self.accelerator
        acc.free_memory()  # an earlier stage's engine
        config = acc.state.deepspeed_plugin.deepspeed_config
        config.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                      train_batch_size=cfg.batch_size * cfg.grad_accum * acc.num_processes,
                      gradient_clipping=float(cfg.grad_clip), zero_allow_untested_optimizer=True)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        engine, _ = acc.prepare(model, optimizer)
        cond = None if self.sample_cond is None else self.sample_cond[:1].to(self.device)
        one = (self.sample_noise[:1].to(self.device), torch.zeros(1, dtype=torch.long, device=self.device), cond)
        load_deepspeed_state(engine, weights, optim_state, one)
        return engine

    def _condition(self, batch: dict, dropout: float, gen: torch.Generator) -> torch.Tensor | None:
        if self.latent is not None:  # captions -> text contexts; dropped and empty ones -> the empty prompt
            captions = batch["caption"]
            keep = torch.tensor([c != "" for c in captions], device=self.device)
            if dropout > 0:
                keep &= torch.rand(len(captions), device=self.device, generator=gen) >= dropout
            context = self._null_context.expand(len(captions), -1, -1).clone()
            if keep.any():  # the text encoder runs on the kept captions only
                kept = [c for c, k in zip(captions, keep.tolist()) if k]
                context[keep] = self.latent.encode_prompts(kept).to(context.dtype)
            return context
        labels = batch.get("label")
        if labels is None or self.num_classes is None:
            return None
        labels = labels.to(self.device)
        if dropout > 0:  # the null label trains the unconditional model used by CFG
            drop = torch.rand(labels.shape, device=self.device, generator=gen) < dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return labels

    def _finish(self, result: TrainResult) -> None:
        """summary.json, weight digests (per process under DDP, of the gathered weights under
        FSDP / DeepSpeed), and MSE vs SP from the same noise."""
        if self.collective_state:  # each process holds a shard: the full weights were digested once
            digests = [self._digests] if self.is_main else []
        else:
            digests = gather_object([self._digests])
        emas: dict[str, torch.nn.Module | None] = dict(self._emas)
        if "sp" in emas and "mse" not in emas and tuple(self.recipe.train.stages) == ("mse", "sp"):
            # stage 1 finished in an earlier process: its final EMA is in its checkpoint
            emas["mse"] = None
            if self.is_main:
                emas["mse"] = self._new_model(pretrained_weights=False).to(self.device).eval()
                emas["mse"].load_state_dict(load_checkpoint(self._stage1_source()).weights["ema"])
        rows = [self._generate_main(emas[stage]) for stage in ("mse", "sp")] if len(emas) == 2 else []
        if not self.is_main:
            return
        summary = {"run_dir": str(self.run_dir), "stages": [asdict(s) for s in result.stages],
                   "num_processes": self.accelerator.num_processes, "sharded": self.collective_state,
                   "engine": "fsdp" if self.fsdp else "deepspeed" if self.deepspeed else "ddp"}
        if self.collective_state:
            summary["weight_digest"] = digests[0]
        else:
            summary["weight_digests_per_process"] = digests
        if len({json.dumps(d, sort_keys=True) for d in digests}) > 1:
            log.error("processes ended with different weights: %s", digests)
        if rows:
            paths = self._save(torch.cat(rows), self.run_dir / "samples" / "mse_vs_sp.png",
                               nrow=self.recipe.train.num_samples)
            summary["mse_vs_sp"] = str(paths[0])
            summary["mse_vs_sp_files"] = [str(p) for p in paths]
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
