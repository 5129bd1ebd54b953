"""Checkpoints that survive faults: atomic writes, checksums, rotation, no arbitrary unpickling.

Layout of one checkpoint (only complete ones ever carry the final name)::

    <run>/checkpoints/step-0001200/
        weights/<name>.safetensors   one per named module state dict ("model", "ema", ...)
        state.pt                     optimizer, scheduler, scaler, RNG, data position, counters
                                     (plain containers + tensors; read with weights_only=True)
        meta.json                    step, stage, time, version, extra info, sha256 of the
                                     other files; written last

A save writes into ``checkpoints/.tmp-step-XXXXXXX-<random>/`` and renames it into place, so a
crash leaves at worst a hidden directory that readers ignore and the next save removes.
Only one process (the main one) should call `save_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .fileio import sha256_file

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "CheckpointMeta",
    "read_meta",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "checkpoint_before",
    "final_checkpoint",
    "resolve_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
META = "meta.json"
STATE = "state.pt"
WEIGHTS = "weights"
FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d{7,})")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Hidden siblings: in-progress writes, a replaced checkpoint, one being deleted.
_TMP, _OLD, _DEL = ".tmp-", ".old-", ".del-"
# What torch.load(weights_only=True) accepts that a training state plausibly holds. Exact
# types: subclasses such as numpy.float64 or defaultdict would be refused at load time.
_ATOMS = {bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device}
_SEQUENCES = {list, tuple, set, torch.Size}
_MAPPINGS = {dict, OrderedDict}


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or unsafe to load."""


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint's meta.json says, read without touching its tensors (`read_meta`).

    `extra` is the writer's own info (`save_checkpoint`'s `meta` less "stage"); the trainer's
    fields have properties: `stage_step`, `final` (the checkpoint that ended its stage),
    `recipe` (the resolved recipe as a dict) and `best_loss` (the stage's best running median
    loss, None when none was recorded).
    """

    path: Path
    step: int
    stage: str | None
    time: str
    version: str
    extra: dict[str, Any]

    @classmethod
    def from_dict(cls, path: str | os.PathLike, meta: Mapping[str, Any]) -> CheckpointMeta:
        extra = meta.get("extra", {})
        return cls(path=Path(path), step=int(meta["step"]), stage=meta.get("stage"), time=str(meta.get("time", "")),
                   version=str(meta.get("version", "")), extra=dict(extra) if isinstance(extra, dict) else {})

    @property
    def stage_step(self) -> int | None:
        return self.extra.get("stage_step")

    @property
    def final(self) -> bool:
        return bool(self.extra.get("final", False))

    @property
    def recipe(self) -> dict[str, Any]:
        return self.extra.get("recipe", {})

    @property
    def best_loss(self) -> float | None:
        return self.extra.get("best_loss")


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: `weights[name]` are state dicts on CPU, `state` the training state,
    `meta` the raw meta.json and `info` the same as a `CheckpointMeta`."""

    path: Path
    meta: dict[str, Any]
    weights: dict[str, dict[str, Tensor]]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def stage(self) -> str | None:
        return self.meta.get("stage")

    @property
    def info(self) -> CheckpointMeta:
        return CheckpointMeta.from_dict(self.path, self.meta)


# ----------------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    weights: Mapping[str, Mapping[str, Tensor]],
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
    keep_last: int | None = None,
    keep: Callable[[Path], bool] | None = None,
) -> Path:
    """Atomically write checkpoint `step` under ``run_dir/checkpoints`` and return its path.

    `weights`: name -> state dict, each written to ``weights/<name>.safetensors`` (tied or
    non-contiguous tensors are copied as needed). `state`: anything ``torch.load(weights_only=
    True)`` reads back (tensors, numbers, strings, None, lists, tuples, dicts). `meta`: JSON
    info; its "stage" becomes meta.json's "stage", the rest its "extra". An existing checkpoint
    of the same step is replaced. Afterwards, with `keep_last`, the oldest complete checkpoints
    beyond the newest `keep_last` are deleted, except those for which ``keep(path)`` is True.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    ):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
    for name, sd in weights.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"invalid weights name {name!r} (letters, digits, '_', '.', '-')")
        for key, value in sd.items():
            if not isinstance(value, Tensor):
                kind = type(value).__name__
                raise TypeError(f"weights[{name!r}][{key!r}] is a {kind}, not a Tensor")
    _check_state(state, "state")
    meta = dict(meta)
    stage = meta.pop("stage", None)
    info = {"format": FORMAT, "step": step, "stage": stage,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": _version(), "extra": meta}
    try:
        json.dumps(info)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta is not JSON serialisable: {exc}") from exc

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}step-{step:07d}-", dir=root))
    old: Path | None = None
    try:
        files: dict[str, str] = {}
        (tmp / WEIGHTS).mkdir()
        for name, sd in weights.items():
            rel = f"{WEIGHTS}/{name}.safetensors"
            save_file(_safetensors_ready(sd), str(tmp / rel))
            _fsync_file(tmp / rel)
            files[rel] = sha256_file(tmp / rel)
        torch.save(dict(state), tmp / STATE)
        _fsync_file(tmp / STATE)
        files[STATE] = sha256_file(tmp / STATE)
        info["files"] = files
        with open(tmp / META, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp / WEIGHTS)
        _fsync_dir(tmp)
        if final.exists():
            old = root / f"{_OLD}{final.name}-{os.urandom(4).hex()}"
            os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(root)
        else:
            os.rename(tmp, final)
            _fsync_dir(root)
    except BaseException:
        if old is not None and old.exists() and not final.exists():
            os.rename(old, final)  # the replaced checkpoint stays the valid one
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by the next save
    log.info("saved checkpoint %s", final)
    if keep_last is not None:
        _rotate(root, final, keep_last, keep)
    return final


def _rotate(root: Path, final: Path, keep_last: int, keep: Callable[[Path], bool] | None) -> None:
    rotatable = [p for p in list_checkpoints(root.parent) if not (keep is not None and keep(p))]
    survivors = set(rotatable[-keep_last:]) | {final}
    for path in rotatable:
        if path not in survivors:
            _remove(path)
            log.info("removed old checkpoint %s", path)


def _remove(path: Path) -> None:
    """Delete a checkpoint so that no crash can leave it half-deleted under its own name."""
    doomed = path.with_name(f"{_DEL}{path.name}-{os.urandom(4).hex()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def _clean_stale(root: Path) -> None:
    """Remove leftovers of interrupted saves; put back a replaced checkpoint whose successor
    never arrived (a crash between the two renames of a re-save)."""
    for entry in root.iterdir():
        if entry.name.startswith(_OLD):
            name = entry.name[len(_OLD):].rsplit("-", 1)[0]
            if not (root / name).exists() and _is_complete(entry):
                os.rename(entry, root / name)
                log.warning("restored checkpoint %s after an interrupted re-save", root / name)
                continue
        if entry.name.startswith((_TMP, _OLD, _DEL)):
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed stale %s", entry)


def _safetensors_ready(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous tensors, no two sharing storage (safetensors refuses tied weights)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for key, t in sd.items():
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        if storage in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        elif t.numel() and t.untyped_storage().nbytes():
            seen.add(storage)
        out[key] = t
    return out


def _check_state(obj: Any, where: str) -> None:
    """Refuse at save time what weights_only loading would refuse at resume time."""
    if type(obj) in _ATOMS or isinstance(obj, Tensor):
        return
    if type(obj) in _MAPPINGS:
        for k, v in obj.items():
            _check_state(k, f"{where} key {k!r}")
            _check_state(v, f"{where}[{k!r}]")
    elif type(obj) in _SEQUENCES:
        for i, v in enumerate(obj):
            _check_state(v, f"{where}[{i}]")
    else:
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint state "
            "may hold only tensors, numbers, strings, bools, None, lists, tuples and dicts"
        )


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------- finding


def _read_meta(path: Path) -> dict[str, Any]:
    with open(path / META, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise ValueError("meta.json does not hold a JSON object")
    return meta


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """The metadata of checkpoint directory `path` (no tensors are read); `CheckpointError` when
    it has no readable meta.json."""
    path = Path(path)
    try:
        return CheckpointMeta.from_dict(path, _read_meta(path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"incomplete checkpoint (no {META}): {path}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"corrupt {path / META}: {_one_line(exc)}") from exc


def _is_complete(path: Path) -> bool:
    try:
        _read_meta(path)
    except (OSError, ValueError):
        return False
    return True


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (meta.json present and parseable), oldest step first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir() and _is_complete(entry):
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_before(run_dir: str | os.PathLike, step: int) -> Path | None:
    """The newest complete checkpoint of a run saved before global step `step`, or None."""
    return next((p for p in reversed(list_checkpoints(run_dir)) if read_meta(p).step < step), None)


def final_checkpoint(run_dir: str | os.PathLike, stage: str) -> Path | None:
    """The newest complete checkpoint of a run that ended training stage `stage`, or None."""
    return next((p for p in reversed(list_checkpoints(run_dir))
                 if (info := read_meta(p)).stage == stage and info.final), None)


def resolve_checkpoint(arg: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path:
    """Turn "latest" (the newest complete checkpoint of `run_dir`), a run directory (its newest)
    or a checkpoint directory into a checkpoint path; `CheckpointError` when there is none."""
    if str(arg) == "latest":
        if run_dir is None:
            raise CheckpointError('"latest" needs a run directory')
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in {Path(run_dir) / CHECKPOINTS}")
        return found
    path = Path(arg)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.name == CHECKPOINTS and not (path / META).exists():
        path = path.parent
    if (path / CHECKPOINTS).is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in {path / CHECKPOINTS}")
        return found
    if not (path / META).exists():
        what = "incomplete checkpoint" if _STEP_DIR.fullmatch(path.name) else (
            "not a checkpoint or run directory")
        raise CheckpointError(f"{what} (no {META}): {path}")
    return path


# ---------------------------------------------------------------------------------- loading


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """Read a checkpoint directory; with `verify`, check every file against meta.json's sha256.

    Tensors come from safetensors and the state from ``torch.load(weights_only=True)``, so
    nothing but tensors and plain containers is ever unpickled. Any fault -> `CheckpointError`.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not (path / META).exists():
        raise CheckpointError(f"incomplete checkpoint (no {META}): {path}")
    try:
        meta = _read_meta(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt {path / META}: {_one_line(exc)}") from exc
    files = meta.get("files")
    if not isinstance(files, dict) or STATE not in files or "step" not in meta:
        raise CheckpointError(f"corrupt {path / META}: lacks 'step' or the file list")
    for rel, digest in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"corrupt {path / META}: entry {rel!r} leaves the checkpoint")
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"missing file in checkpoint: {file}")
        if verify and sha256_file(file) != digest:
            raise CheckpointError(f"checksum mismatch (file changed or corrupt): {file}")

    weights: dict[str, dict[str, Tensor]] = {}
    for rel in files:
        if rel.startswith(f"{WEIGHTS}/") and rel.endswith(".safetensors"):
            name = rel[len(WEIGHTS) + 1 : -len(".safetensors")]
            try:
                weights[name] = load_file(str(path / rel), device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"corrupt {path / rel}: {_one_line(exc)}") from exc
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise CheckpointError(f"corrupt or unsafe {path / STATE}: {_one_line(exc)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"corrupt {path / STATE}: holds {type(state).__name__}, not a dict")
    return Checkpoint(path=path, meta=meta, weights=weights, state=state)


def _one_line(exc: BaseException) -> str:
    """The informative line of an exception (torch's weights_only errors span a page)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = text.split(marker, 1)[1].strip()
        text = "refused to unpickle: " + rest.split(". Please", 1)[0].splitlines()[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# -------------------------------------------------------------------------------------- RNG


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state a run draws from, as weights_only-safe values: python `random`, numpy's
    global state, torch CPU, every CUDA device (when available), and each named generator."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Inverse of `capture_rng_state`: the next draws equal those that followed the capture."""
    py = state["python"]
    internal = tuple(int(v) for v in py["internal"].tolist())
    random.setstate((py["version"], internal, py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda) != count:
            log.warning("RNG state has %d CUDA devices, this machine %d; restoring the first %d",
                        len(cuda), count, min(len(cuda), count))
        for device, device_state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(device_state, device)
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"RNG state has no generator {name!r} (has {sorted(saved)})")
        g.set_state(saved[name])
