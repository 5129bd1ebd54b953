"""Checkpoints (round trips, atomicity, rotation, corruption, resolution), RNG capture, and EMA."""

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import perceptual_diffusion
from perceptual_diffusion.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    checkpoint_before,
    final_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from perceptual_diffusion.ema import EMA


class Tied(nn.Module):
    """Embedding and output head share one weight; a norm layer brings buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.body(self.embed(idx)))))


class Opaque:
    """Not a tensor or plain container: weights_only loading must refuse it."""


def _save(run, step, weights=None, state=None, meta=None, **kw):
    weights = {"model": {"w": torch.full((2, 3), float(step))}} if weights is None else weights
    state = {"step": step} if state is None else state
    return save_checkpoint(run, step, weights=weights, state=state,
                           meta={"stage": "mse"} if meta is None else meta, **kw)


def _steps(run):
    return [load_checkpoint(p, verify=False).step for p in list_checkpoints(run)]


def _hidden(run):
    return sorted(p.name for p in (Path(run) / "checkpoints").iterdir() if p.name.startswith("."))


def _rewrite_hash(ckpt: Path, rel: str) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][rel] = hashlib.sha256((ckpt / rel).read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------ round trips


def test_weights_round_trip_with_tied_weights_and_layout(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    model(torch.randint(0, 10, (8,)))  # moves the BatchNorm running statistics
    ema = EMA(model, decay=0.9)
    big = torch.arange(24.0).reshape(4, 6)
    odd = {"slice": big[1:3], "transposed": big.t(), "whole": big, "bf16": big.bfloat16()}
    path = save_checkpoint(
        tmp_path, 1200,
        weights={"model": model.state_dict(), "ema": ema.model.state_dict(), "odd": odd},
        state={"ema_num_updates": ema.num_updates},
        meta={"stage": "sp", "loss": 0.25, "recipe": {"lr": 3e-5}},
    )
    assert path == tmp_path / "checkpoints" / "step-0001200"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "state.pt", "weights"]
    assert sorted(p.name for p in (path / "weights").iterdir()) == [
        "ema.safetensors", "model.safetensors", "odd.safetensors"]

    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint) and ckpt.step == 1200 and ckpt.stage == "sp"
    assert ckpt.meta["extra"] == {"loss": 0.25, "recipe": {"lr": 3e-5}}
    assert ckpt.meta["version"] == perceptual_diffusion.__version__
    assert set(ckpt.meta["files"]) == {"state.pt", "weights/model.safetensors",
                                       "weights/ema.safetensors", "weights/odd.safetensors"}
    for name, tensor in odd.items():
        loaded = ckpt.weights["odd"][name]
        assert torch.equal(loaded, tensor) and loaded.dtype == tensor.dtype

    fresh = Tied()
    fresh.load_state_dict(ckpt.weights["model"])
    assert fresh.head.weight is fresh.embed.weight
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(ckpt.weights["ema"]["norm.running_mean"], model.norm.running_mean)


def _train(model, opt, sched, gen, steps):
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        noise = torch.randn(16, 1)  # the global torch RNG must be restored too
        loss = (model(x) - x.sum(1, keepdim=True) + 0.01 * noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def test_optimizer_scheduler_and_rng_resume_is_bit_identical(tmp_path):
    model, opt, sched = _setup()
    gen = torch.Generator().manual_seed(7)
    _train(model, opt, sched, gen, 3)
    path = save_checkpoint(
        tmp_path, 3, weights={"model": model.state_dict()},
        state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
               "rng": capture_rng_state({"data": gen}), "data": {"epoch": 0, "index": 48}},
        meta={"stage": "mse"},
    )
    _train(model, opt, sched, gen, 4)

    ckpt = load_checkpoint(path)
    model2, opt2, sched2 = _setup(seed=123)  # different init: everything must come from disk
    gen2 = torch.Generator()
    model2.load_state_dict(ckpt.weights["model"])
    opt2.load_state_dict(ckpt.state["optimizer"])
    sched2.load_state_dict(ckpt.state["scheduler"])
    restore_rng_state(ckpt.state["rng"], {"data": gen2})
    assert ckpt.state["data"] == {"epoch": 0, "index": 48}
    _train(model2, opt2, sched2, gen2, 4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert sched.get_last_lr() == sched2.get_last_lr()


def _draws(gen):
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.standard_normal(), torch.rand(3).tolist(),
            torch.randn(2, generator=gen).tolist())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), odd_gauss=st.booleans())
def test_rng_capture_restore_through_weights_only_load(seed, odd_gauss):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if odd_gauss:  # leaves a cached Gaussian in both python's and numpy's state
        random.gauss(0, 1)
        np.random.standard_normal()
    buffer = io.BytesIO()
    torch.save(capture_rng_state({"data": gen}), buffer)
    expected = _draws(gen)
    _draws(gen)
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True), {"data": gen})
    assert _draws(gen) == expected


def test_restore_rng_names_a_missing_generator():
    state = capture_rng_state({"data": torch.Generator()})
    with pytest.raises(KeyError, match="'noise'"):
        restore_rng_state(state, {"noise": torch.Generator()})


# ------------------------------------------------------------------------- faults and crashes


def test_failed_save_leaves_previous_intact_and_nothing_partial(tmp_path, monkeypatch):
    first = _save(tmp_path, 1, keep_last=1)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, keep_last=1)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [first] and latest_checkpoint(tmp_path) == first
    assert _hidden(tmp_path) == []
    assert torch.equal(load_checkpoint(first).weights["model"]["w"], torch.full((2, 3), 1.0))


CRASH = textwrap.dedent("""
    import os, sys, torch
    from perceptual_diffusion import checkpoint
    def crash(*args, **kwargs):  # the process dies while writing meta.json
        os._exit(3)
    checkpoint.json.dump = crash
    checkpoint.save_checkpoint(sys.argv[1], 2, weights={"model": {"w": torch.ones(2)}},
                               state={"step": 2}, meta={}, keep_last=1)
""")


def test_crash_mid_write_is_ignored_then_cleaned(tmp_path):
    first = _save(tmp_path, 1)
    run = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)], capture_output=True,
                         cwd=Path(perceptual_diffusion.__file__).parents[1], timeout=120)
    assert run.returncode == 3, run.stderr.decode()
    stale = _hidden(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".tmp-step-0000002-")
    assert (tmp_path / "checkpoints" / stale[0] / "state.pt").exists()
    # a half-written directory that somehow got the final name is not complete either
    (tmp_path / "checkpoints" / "step-0000005" / "weights").mkdir(parents=True)
    assert list_checkpoints(tmp_path) == [first] and latest_checkpoint(tmp_path) == first
    assert resolve_checkpoint("latest", tmp_path) == first
    assert load_checkpoint(first).state == {"step": 1}

    second = _save(tmp_path, 3)
    assert _hidden(tmp_path) == [] and list_checkpoints(tmp_path) == [first, second]


def test_resave_same_step_replaces_it(tmp_path, monkeypatch):
    _save(tmp_path, 3, weights={"model": {"w": torch.zeros(2)}})
    path = _save(tmp_path, 3, weights={"model": {"w": torch.ones(2)}}, state={"v": 2})
    assert list_checkpoints(tmp_path) == [path] and _hidden(tmp_path) == []
    assert torch.equal(load_checkpoint(path).weights["model"]["w"], torch.ones(2))

    # failure between moving the old one aside and moving the new one in: the old one returns
    real_rename, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("interrupted")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(OSError, match="interrupted"):
        _save(tmp_path, 3, weights={"model": {"w": torch.full((2,), 9.0)}})
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [path] and _hidden(tmp_path) == []
    assert load_checkpoint(path).state == {"v": 2}

    # a crash in that same window leaves it hidden as .old-*: the next save puts it back
    real_rename(path, path.with_name(".old-step-0000003-deadbeef"))
    assert list_checkpoints(tmp_path) == []
    _save(tmp_path, 4)
    assert _steps(tmp_path) == [3, 4] and _hidden(tmp_path) == []
    assert load_checkpoint(path).state == {"v": 2}


def test_rotation_keep_last_and_keep_predicate(tmp_path):
    def stage_final(path):
        return load_checkpoint(path, verify=False).meta["extra"].get("stage_final", False)

    for step in range(1, 7):
        _save(tmp_path, step, meta={"stage": "mse", "stage_final": step == 2},
              keep_last=2, keep=stage_final)
        assert _hidden(tmp_path) == []
    assert _steps(tmp_path) == [2, 5, 6]
    # the checkpoint just written survives even when it is not the newest step
    _save(tmp_path, 4, keep_last=1, keep=stage_final)
    assert _steps(tmp_path) == [2, 4, 6]
    _save(tmp_path, 7, keep_last=1)
    assert _steps(tmp_path) == [7]


def test_save_refuses_bad_input_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"state\['opt'\]\[0\].*Opaque"):
        _save(tmp_path, 1, state={"opt": [Opaque()]})
    with pytest.raises(TypeError, match=r"np\.float64|numpy"):
        _save(tmp_path, 1, state={"loss": np.float64(1.0)})
    with pytest.raises(TypeError, match="JSON"):
        _save(tmp_path, 1, meta={"when": object()})
    with pytest.raises(TypeError, match=r"weights\['model'\]\['w'\]"):
        _save(tmp_path, 1, weights={"model": {"w": [1.0]}})
    with pytest.raises(ValueError, match="weights name"):
        _save(tmp_path, 1, weights={"../x": {}})
    with pytest.raises(ValueError, match="keep_last"):
        _save(tmp_path, 1, keep_last=0)
    assert list_checkpoints(tmp_path) == []


# -------------------------------------------------------------------------------- corruption


def _corrupt(path: Path, case: str) -> None:
    weights = path / "weights" / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif case == "truncated-header":
        weights.write_bytes(weights.read_bytes()[:5])
    elif case == "flipped":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        weights.write_bytes(bytes(data))
    elif case == "no-weights":
        weights.unlink()
    elif case == "garbage-state":
        (path / "state.pt").write_bytes(b"\x80\x02garbage" * 10)
    elif case == "bad-meta":
        (path / "meta.json").write_text("{not json")


@pytest.mark.parametrize("case, verify, message", [
    ("truncated", True, r"checksum mismatch.*model\.safetensors"),
    ("truncated", False, r"corrupt .*model\.safetensors"),
    ("truncated-header", False, r"corrupt .*model\.safetensors"),
    ("flipped", True, r"checksum mismatch.*model\.safetensors"),
    ("no-weights", False, r"missing file.*model\.safetensors"),
    ("garbage-state", True, r"checksum mismatch.*state\.pt"),
    ("garbage-state", False, r"state\.pt"),
    ("bad-meta", True, r"corrupt .*meta\.json"),
])
def test_corrupt_checkpoint_gives_one_clear_line(tmp_path, case, verify, message):
    path = _save(tmp_path, 1, weights={"model": {"w": torch.randn(64)}})
    _corrupt(path, case)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path, verify=verify)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_missing_or_incomplete_checkpoint(tmp_path):
    path = _save(tmp_path, 1)
    (path / "meta.json").unlink()
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_state_with_pickled_object_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    torch.save({"step": 1, "payload": Opaque()}, path / "state.pt")
    _rewrite_hash(path, "state.pt")  # a well-formed file whose content is the problem
    message = r"unsafe .*state\.pt.*refused to unpickle.*Opaque"
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------------- resolution


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(run)
    run.mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint or run directory"):
        resolve_checkpoint(run)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint("latest", run)
    first, second = _save(run, 1), _save(run, 20)
    assert resolve_checkpoint("latest", run) == second
    assert resolve_checkpoint(run) == second
    assert resolve_checkpoint(str(run / "checkpoints")) == second
    assert resolve_checkpoint(first, run) == first
    (second / "meta.json").unlink()
    assert resolve_checkpoint("latest", run) == first
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint \(no meta.json\)"):
        resolve_checkpoint(second)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(run / "checkpoints" / "step-0000099")


# --------------------------------------------------------------------------------------- EMA


@settings(max_examples=20, deadline=None)
@given(decay=st.floats(0.0, 0.999), k=st.integers(0, 12))
def test_ema_closed_form_with_constant_parameters(decay, k):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay)
    start = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(k):
        ema.update(model)
    assert ema.num_updates == k
    for e, e0, p in zip(ema.model.parameters(), start, model.parameters()):
        torch.testing.assert_close(e, p + decay**k * (e0 - p), rtol=1e-5, atol=1e-6)


def test_ema_warmup_schedule_and_frozen_copy():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9995, warmup=True)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    assert ema.model.weight is not model.weight
    decays = []
    for _ in range(5):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays == pytest.approx([(1 + n) / (10 + n) for n in range(5)])
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.9995
    assert EMA(model, 0.99).current_decay() == 0.99

    # one warmup update with decay 1/10 lands at 0.1 * ema + 0.9 * param
    fresh = EMA(model, 0.9995, warmup=True)
    start = fresh.model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    fresh.update(model)
    torch.testing.assert_close(fresh.model.weight, 0.1 * start + 0.9 * model.weight)


def test_ema_copies_buffers_and_handles_tied_weights():
    torch.manual_seed(0)
    model = Tied()
    ema = EMA(model, decay=0.5)
    model.train()
    model(torch.randint(0, 10, (16,)))
    ema.update(model)
    assert torch.equal(ema.model.norm.running_mean, model.norm.running_mean)
    assert torch.equal(ema.model.norm.num_batches_tracked, model.norm.num_batches_tracked)
    assert ema.model.head.weight is ema.model.embed.weight


def test_ema_state_round_trip_through_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    ema = EMA(model, 0.9, warmup=True)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(0.1)
        ema.update(model)
    state = ema.state_dict()
    path = save_checkpoint(tmp_path, 3, weights={"ema": state["model"]},
                           state={"ema_num_updates": state["num_updates"]}, meta={})
    ckpt = load_checkpoint(path)
    other = EMA(nn.Linear(3, 3), 0.9, warmup=True)
    other.load_state_dict({"model": ckpt.weights["ema"],
                           "num_updates": ckpt.state["ema_num_updates"]})
    assert other.num_updates == 3 and other.current_decay() == ema.current_decay()
    assert torch.equal(other.model.weight, ema.model.weight)
    ema.update(model)
    other.update(model)
    assert torch.equal(other.model.weight, ema.model.weight)
    with pytest.raises(KeyError, match="num_updates"):
        other.load_state_dict({"model": ckpt.weights["ema"]})


def test_read_meta_reads_the_metadata_without_the_tensors(tmp_path):
    run = tmp_path / "run"
    recipe = {"mse": {"lr": 1e-3}}
    a = _save(run, 3, meta={"stage": "mse", "stage_step": 3, "final": False, "recipe": recipe, "best_loss": 0.5})
    b = _save(run, 5, meta={"stage": "mse", "stage_step": 5, "final": True, "recipe": recipe, "best_loss": None})
    c = _save(run, 9, meta={"stage": "sp", "stage_step": 4, "final": False})
    (b / "weights" / "model.safetensors").write_bytes(b"not read")  # corrupt tensors do not matter here
    info = read_meta(b)
    assert (info.path, info.step, info.stage, info.stage_step, info.final, info.recipe, info.best_loss) == (
        b, 5, "mse", 5, True, recipe, None)
    assert info.version == perceptual_diffusion.__version__ and info.time
    assert load_checkpoint(a).info == read_meta(a) and read_meta(a).best_loss == 0.5
    assert (read_meta(c).final, read_meta(c).recipe, read_meta(c).best_loss) == (False, {}, None)
    assert final_checkpoint(run, "mse") == b and final_checkpoint(run, "sp") is None
    assert [checkpoint_before(run, s) for s in (3, 4, 6, 10)] == [None, a, b, c]


@pytest.mark.parametrize("damage, message", [("remove", "incomplete checkpoint"), ("garble", "corrupt")])
def test_read_meta_of_a_damaged_checkpoint_is_a_checkpoint_error(tmp_path, damage, message):
    path = _save(tmp_path / "run", 1)
    if damage == "remove":
        (path / "meta.json").unlink()
    else:
        (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=message):
        read_meta(path)
