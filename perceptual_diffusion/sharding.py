"""FSDP2 sharding for the trainer: parameters, gradients and optimizer state split across processes.

    units = shard_units(net)                 # the backbone's blocks (net.SHARD_UNITS class names)
    shard(net)                               # fully_shard each unit, then the root (collective)
    weights = full_state_dict(net)           # rank 0: the full state dict on CPU; others: {}
    state = optimizer_state(net, optimizer)  # keyed by parameter name, loadable sharded or not

Each process keeps 1/N of every sharded parameter (a DTensor); a unit's parameters are
all-gathered just before it runs and freed after, gradients are reduce-scattered. Parameters
stay in float32 and autocast does the mixed-precision compute, so a sharded run computes what
a DDP run computes (up to the order of floating-point sums).

Checkpoints hold full (unsharded) tensors, with optimizer state keyed by parameter name, so a
run saved by one process, by DDP or by FSDP resumes under any of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["shard", "shard_units", "is_sharded", "full_state_dict", "optimizer_state", "load_optimizer_state",
           "clip_grad_norm"]


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


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded `model` on CPU on rank 0 ({} elsewhere; collective), or
    `model.state_dict()` of an unsharded one."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (full tensors; on rank 0 only when sharded,
    collective then). Loads back with `load_optimizer_state` whether the model is sharded or not."""
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
