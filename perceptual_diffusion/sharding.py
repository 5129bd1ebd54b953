"""Sharded training state for the trainer: FSDP2, and gathering / restoring DeepSpeed ZeRO state.

    units = shard_units(net)                 # the backbone's blocks (net.SHARD_UNITS class names)
    shard(net)                               # fully_shard each unit, then the root (collective)
    weights = full_state_dict(net)           # rank 0: the full state dict on CPU; others: {}
    state = optimizer_state(net, optimizer)  # keyed by parameter name, loadable sharded or not

Each process keeps 1/N of every sharded parameter (a DTensor); a unit's parameters are
all-gathered just before it runs and freed after, gradients are reduce-scattered. Parameters
stay in float32 and autocast does the mixed-precision compute, so a sharded run computes what
a DDP run computes (up to the order of floating-point sums).

Under DeepSpeed ZeRO (stages 1 and 2; the trainer refuses 0 and 3) the engine owns the
partitioning; `full_state_dict`, `optimizer_state` and `load_deepspeed_state` read and write its
float32 master weights and Adam moments parameter by parameter (collectives), in the same format.

Checkpoints hold full (unsharded) tensors, with optimizer state keyed by parameter name, so a
run saved by one process, by DDP, by FSDP or by DeepSpeed resumes under any of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["clip_grad_norm", "full_fp32_params", "full_state_dict", "is_deepspeed", "is_sharded",
           "load_deepspeed_state", "load_optimizer_state", "optimizer_state", "shard", "shard_units"]


def _fsdp():
    from torch.distributed import fsdp

    return fsdp


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (the root) was sharded with `shard` / FSDP2's fully_shard."""
    return isinstance(model, _fsdp().FSDPModule)


def shard_units(model: nn.Module, class_names: Iterable[str] | None = None) -> list[nn.Module]:
    """The submodules sharded as separate units: instances of the classes named by `class_names`,
    by default the model's ``SHARD_UNITS`` (its repeated blocks). Children come before parents."""
    names = set(getattr(model, "SHARD_UNITS", ()) if class_names is None else class_names)
    units = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    return units[::-1]


def shard(model: nn.Module, class_names: Iterable[str] | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place across the default process group (every process must call this).

    Each unit (see `shard_units`) becomes its own FSDP unit, all-gathered only while it runs; the
    rest (embeddings, stems, heads) belongs to the root unit. Needs torch.distributed initialised
    (as under `accelerate launch` / torchrun) and the model on this process's device.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sharding needs several processes (torch.distributed is not initialised): launch with "
                           "`accelerate launch --num_processes N ...` or torchrun")
    fsdp = _fsdp()
    if is_sharded(model):
        raise ValueError(f"{type(model).__name__} is already sharded")
    units = shard_units(model, class_names)
    if class_names is not None and not units:
        raise ValueError(f"no submodule of {type(model).__name__} is an instance of {sorted(set(class_names))}")
    for unit in units:
        fsdp.fully_shard(unit, reshard_after_forward=reshard_after_forward)
    fsdp.fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def is_deepspeed(model: nn.Module) -> bool:
    """Whether `model`'s parameters are managed by a DeepSpeed ZeRO engine (`engine.module`)."""
    p = next(model.parameters(), None)
    return p is not None and (hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"))


def full_fp32_params(model: nn.Module) -> list[torch.Tensor]:
    """The float32 master weights of a DeepSpeed-managed `model`, full, in `parameters()` order
    (every process gets them; collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p) for p in model.parameters()]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded `model` on CPU on rank 0 ({} elsewhere; collective), of a
    DeepSpeed-managed one with its float32 master weights (collective), or `model.state_dict()`."""
    if is_deepspeed(model):
        names = [name for name, _ in model.named_parameters()]
        full = dict(zip(names, (t.detach().cpu() for t in full_fp32_params(model))))
        state = model.state_dict()  # buffers as they are; ZeRO-3 parameters are placeholders here
        return {k: full.get(k, v.detach().cpu()) for k, v in state.items()}
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (full tensors; on rank 0 only when sharded,
    collective then). Loads back with `load_optimizer_state` whether the model is sharded or not.
    For a DeepSpeed-managed `model`, `optimizer` is the engine's ZeRO optimizer (collective)."""
    if is_deepspeed(model):
        return _deepspeed_optimizer_state(model, optimizer)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    options = _options(full_state_dict=True, cpu_offload=True) if is_sharded(model) else _options()
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state`; each process passes the full state and keeps its shard.

    A state saved by ``optimizer.state_dict()`` (integer parameter ids) is loaded as is, which
    works only unsharded and with the same parameter order."""
    if all(isinstance(k, int) for k in state.get("state", {})) and all(
            isinstance(p, int) for g in state.get("param_groups", []) for p in g.get("params", [])):
        if is_sharded(model):
            raise ValueError("an optimizer state saved by parameter index cannot be loaded into a sharded model")
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=_options(full_state_dict=is_sharded(model)))


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients of (possibly sharded) parameters to a global norm; returns the norm before
    clipping, the same on every process."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    full = getattr(norm, "full_tensor", None)  # a DTensor when the gradients are sharded
    return full() if full is not None else norm


# ------------------------------------------------------------------------------ DeepSpeed ZeRO


def _base_optimizer(zero_optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer a ZeRO optimizer steps on its flat float32 partitions."""
    base = getattr(zero_optimizer, "optimizer", None)
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"expected a DeepSpeed ZeRO optimizer, got {type(zero_optimizer).__name__}")
    return base


def _deepspeed_optimizer_state(model: nn.Module, zero_optimizer: Any) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _base_optimizer(zero_optimizer)
    names = [name for name, _ in model.named_parameters()]
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names} for g in base.param_groups[:1]]
    flat_states = [st for st in base.state.values() if st]
    if not flat_states:  # no step taken yet
        return {"state": {}, "param_groups": groups}
    keys = sorted(k for k, v in flat_states[0].items() if k != "step" and torch.is_tensor(v) and v.dim() > 0)
    step = flat_states[0].get("step")
    state = {}
    for name, p in model.named_parameters():
        entry = {k: safe_get_full_optimizer_state(p, k).detach().float().cpu() for k in keys}
        if step is not None:
            entry["step"] = torch.tensor(float(step))
        state[name] = entry
    return {"state": state, "param_groups": groups}


def load_deepspeed_state(engine: Any, weights: dict[str, torch.Tensor], optim_state: dict[str, Any] | None,
                         warmup_inputs: tuple[Any, ...]) -> None:
    """Restore a DeepSpeed engine (every process calls this) from full `weights` and an optimizer
    state in the format of `optimizer_state`.

    The float32 master weights are set from `weights` (a bf16 engine would otherwise start from
    rounded copies). ZeRO creates its optimizer state at the first step, so when there is one to
    restore, one step is taken first with zero gradients and learning rate 0 (an exact no-op on
    the weights for Adam/AdamW; `warmup_inputs` = (x_t, t, cond) of one sample feed the forward),
    then the moments, step counts and hyperparameters are overwritten from `optim_state`.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    module, zero = engine.module, engine.optimizer
    base = _base_optimizer(zero)
    params = dict(module.named_parameters())
    saved = (optim_state or {}).get("state", {})
    if saved:
        lrs = [g["lr"] for g in base.param_groups]
        for g in base.param_groups:
            g["lr"] = 0.0
        training = module.training
        module.eval()  # no dropout: the no-op step draws no random numbers
        out = engine(*warmup_inputs)
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(out.float().sum() * 0.0)
        engine.step()
        module.train(training)
        for g, lr in zip(base.param_groups, lrs):
            g["lr"] = lr
    for name, p in params.items():
        if name not in weights:
            raise KeyError(f"checkpoint weights lack {name!r}")
        safe_set_full_fp32_param(p, weights[name].to(device=p.device, dtype=torch.float32))
    if not saved:
        return
    missing = sorted(set(params) - set(saved))
    if missing:
        raise KeyError(f"optimizer state lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    step = None
    for name, p in params.items():
        for key, value in saved[name].items():
            if key == "step":
                step = float(value)
            else:
                safe_set_full_optimizer_state(p, value.to(device=p.device, dtype=torch.float32), key)
    for flat_state in base.state.values():
        if step is not None and "step" in flat_state:
            if torch.is_tensor(flat_state["step"]):
                flat_state["step"].fill_(step)
            else:
                flat_state["step"] = type(flat_state["step"])(step)
    hyper = {k: v for k, v in optim_state["param_groups"][0].items() if k != "params"}
    for g in base.param_groups:
        g.update(hyper)
