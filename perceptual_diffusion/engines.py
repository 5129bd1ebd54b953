"""The training engines: how one optimisation step runs on one process, DDP, FSDP2 or DeepSpeed.

    accelerator = make_accelerator(recipe.train.mixed_precision)
    engine = make_engine(accelerator, recipe.train)      # Engine | FSDPEngine | DeepSpeedEngine
    engine.shard(model); engine.shard(ema.model)         # FSDP only; a no-op elsewhere
    engine.prepare(model, optimizer, stage_cfg, optim_state, example)
    for micro_batch ...: engine.backward(loss, last=..., grad_accum=...)
    norm = engine.clip_grad_norm(max_norm)               # None when the engine computed none
    engine.step()  # or engine.skip() after a non-finite step
    weights, optim_state = engine.full_state(ema.model)  # collective under FSDP / DeepSpeed

Every engine computes the same update (up to the order of floating-point sums) and saves full,
unsharded tensors with the optimizer state keyed by parameter name, so a checkpoint written by
any engine resumes under any other (see `sharding`). The trainer never branches on the engine;
what differs lives in the three classes here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from accelerate import Accelerator

from .config import RecipeError, StageConfig, TrainConfig
from .sharding import (clip_grad_norm, full_fp32_params, full_state_dict, load_deepspeed_state, load_optimizer_state,
                       optimizer_state, shard)

__all__ = ["Engine", "FSDPEngine", "DeepSpeedEngine", "make_engine", "make_accelerator", "sharding_plan",
           "deepspeed_plan"]

log = logging.getLogger(__name__)


class Engine:
    """One process, or DDP under `accelerate launch` / torchrun: accelerate's `prepare` wraps the
    online net; gradients are all-reduced on the last micro-batch only."""

    collective = False  # whether gathering the full weights needs every process

    def __init__(self, accelerator: Accelerator):
        self.acc = accelerator
        self.model: torch.nn.Module | None = None
        self.optimizer: Any = None

    @property
    def name(self) -> str:
        return "DDP" if self.acc.num_processes > 1 else "one process"

    @property
    def summary_name(self) -> str:
        """The engine's name in summary.json."""
        return "ddp"

    def shard(self, net: torch.nn.Module) -> None:
        """Shard `net` across the processes (FSDP; nothing elsewhere)."""

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: StageConfig,
                optim_state: dict | None = None, example: tuple | None = None) -> None:
        """Take the online net and its optimizer (restoring `optim_state`, a state saved by any
        engine); `example` = (x_t, t, cond) of one sample, for engines that must run a step."""
        if optim_state is not None:
            load_optimizer_state(model, optimizer, optim_state)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)

    @property
    def online(self) -> torch.nn.Module:
        """The online net itself (no DDP / engine wrapper)."""
        return self.acc.unwrap_model(self.model)

    @property
    def forward_module(self) -> torch.nn.Module:
        """What to call for a forward outside the training step (diagnostics)."""
        return self.online

    def backward(self, loss: torch.Tensor, last: bool, grad_accum: int) -> None:
        """Accumulate the gradients of one micro-batch (`last`: the step's final one)."""
        if last:
            self.acc.backward(loss / grad_accum)
        else:
            with self.acc.no_sync(self.model):
                self.acc.backward(loss / grad_accum)

    def clip_grad_norm(self, max_norm: float) -> float | None:
        """Clip the gradients to `max_norm` (<= 0: no clipping); the norm before clipping, the same
        on every process (None when the engine computed none)."""
        return float(self.acc.clip_grad_norm_(self.model.parameters(), max_norm if max_norm > 0 else float("inf")))

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        """Drop the step's gradients (train.nonfinite = "skip")."""
        self.optimizer.zero_grad(set_to_none=True)

    def ema_params(self) -> list[torch.Tensor] | None:
        """The float32 weights the EMA should follow, when they are not the module's own."""
        return None

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The online net's full state dict (collective when `collective`)."""
        return self.online.state_dict()

    def full_state(self, ema_model: torch.nn.Module) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Full "model" and "ema" weights and the optimizer state keyed by parameter name, on the
        main process (collective when `collective`)."""
        online = self.online
        weights = {"model": full_state_dict(online), "ema": full_state_dict(ema_model)}
        return weights, optimizer_state(online, self._torch_optimizer())

    def _torch_optimizer(self) -> Any:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper


class FSDPEngine(Engine):
    """FSDP2: the online net and its EMA are sharded alike (each unit of `SHARD_UNITS` all-gathered
    only while it runs); the optimizer holds shards; gradients are reduce-scattered on the last
    micro-batch. A sharded model is not handed to accelerate."""

    collective = True
    name = "FSDP"
    summary_name = "fsdp"

    def __init__(self, accelerator: Accelerator, shard_options: dict[str, Any]):
        super().__init__(accelerator)
        self.shard_options = shard_options

    def shard(self, net: torch.nn.Module) -> None:
        try:
            shard(net.to(self.acc.device), **self.shard_options)
        except ValueError as e:  # fsdp_transformer_layer_cls_to_wrap names no block of this backbone
            raise RecipeError(f"FSDP: {e}") from e

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: StageConfig,
                optim_state: dict | None = None, example: tuple | None = None) -> None:
        if optim_state is not None:
            load_optimizer_state(model, optimizer, optim_state)
        self.model, self.optimizer = model, optimizer

    @property
    def forward_module(self) -> torch.nn.Module:
        return self.model  # a sharded forward is collective: every process runs it

    def backward(self, loss: torch.Tensor, last: bool, grad_accum: int) -> None:
        self.model.set_requires_gradient_sync(last)
        self.acc.backward(loss / grad_accum)

    def clip_grad_norm(self, max_norm: float) -> float | None:
        return float(clip_grad_norm(self.model.parameters(), max_norm if max_norm > 0 else float("inf")))

    def full_weights(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.online)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-1/2: the engine scales by 1 / grad_accum, reduces, clips and steps inside
    `backward` at the accumulation boundary; its float32 master weights live in the ZeRO
    partitions and are what the EMA follows and checkpoints hold."""

    collective = True
    name = "DeepSpeed"
    summary_name = "deepspeed"

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: StageConfig,
                optim_state: dict | None = None, example: tuple | None = None) -> None:
        """The engine is configured from the stage (micro batch, accumulation, clipping); its master
        weights are set from `model`'s own (not from the engine's bf16 copy), then `optim_state`."""
        acc = self.acc
        acc.free_memory()  # an earlier stage's engine
        config = acc.state.deepspeed_plugin.deepspeed_config
        config.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                      train_batch_size=cfg.batch_size * cfg.grad_accum * acc.num_processes,
                      gradient_clipping=float(cfg.grad_clip), zero_allow_untested_optimizer=True)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        engine, _ = acc.prepare(model, optimizer)
        load_deepspeed_state(engine, weights, optim_state, example)
        self.model, self.optimizer = engine, engine.optimizer

    def backward(self, loss: torch.Tensor, last: bool, grad_accum: int) -> None:
        self.model.set_gradient_accumulation_boundary(last)
        self.model.backward(loss)
        self.model.step()

    def clip_grad_norm(self, max_norm: float) -> float | None:
        norm = self.model.get_global_grad_norm()  # clipped inside the engine's step; None if not computed
        return None if norm is None else float(norm)

    def step(self) -> None:
        """The engine stepped already, inside `backward`."""

    def ema_params(self) -> list[torch.Tensor] | None:
        # a bf16 engine keeps its float32 weights in the ZeRO partitions (gathered here); in
        # float32 the module's own weights are those masters
        online = self.online
        return full_fp32_params(online) if next(online.parameters()).dtype != torch.float32 else None

    def full_weights(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.online)

    def _torch_optimizer(self) -> Any:
        return self.optimizer  # the ZeRO optimizer (`sharding` reads its partitions)


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


def make_engine(accelerator: Accelerator, train: TrainConfig) -> Engine:
    """The engine the accelerate configuration and `train` ask for (RecipeError for what this
    trainer does not support)."""
    fsdp, options = sharding_plan(accelerator, train)
    if deepspeed_plan(accelerator, train):
        return DeepSpeedEngine(accelerator)
    return FSDPEngine(accelerator, options) if fsdp else Engine(accelerator)


def make_accelerator(mixed_precision: str) -> Accelerator:
    """accelerate's Accelerator for this machine. cpu=True on a CPU-only machine lets `accelerate
    launch --multi_gpu` / torchrun run several CPU processes (gloo); DeepSpeed needs cpu=False
    and, without GPUs, the gloo backend named explicitly."""
    cuda = torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.utils import InitProcessGroupKwargs

        handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
        return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=handlers)
    return Accelerator(mixed_precision=mixed_precision, cpu=not cuda)
