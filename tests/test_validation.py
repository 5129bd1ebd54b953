"""The fixed validation batch: its diagnostics in metrics.jsonl, stage sp's check of its
perceptual network, and that neither changes what the run trains."""

import json
import logging

import pytest
import torch

from perceptual_diffusion.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from perceptual_diffusion.cli import main
from perceptual_diffusion.config import load_recipe
from perceptual_diffusion.datasets.synthetic import CirclesDataset
from perceptual_diffusion.objectives import SelfPerceptual, VelocityMSE, make_perceptual
from perceptual_diffusion.schedule import NoiseSchedule
from perceptual_diffusion.trainer import PerceptualCheckError, Trainer
from perceptual_diffusion.validation import ValidationBatch

from helpers import randomise_zero_init

RECIPE = """
name = "v"
seed = 5
[data]
name = "circles"
size = 16
num_items = 96
[model]
preset = "tiny"
[mse]
steps = 8
batch_size = 4
lr = 1e-3
cond_dropout = 0.0
ema_warmup = true
[sp]
steps = 4
batch_size = 4
lr = 1e-4
[train]
log_every = 2
sample_every = 0
checkpoint_every = 2
keep_last = 10
num_samples = 2
sample_steps = 2
validation_size = 12
divergence_window = 3
"""


@pytest.fixture()
def recipe_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    return path


def _lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the batch itself
def _net():
    from backbones import build_backbone

    return randomise_zero_init(build_backbone("image_unet", "tiny", in_channels=1)).eval()


def test_the_batch_is_fixed_stratified_and_leaves_the_global_rng_alone():
    schedule = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True)
    data = CirclesDataset(num_items=50, size=16, seed=0)
    net = _net().train()
    before = torch.get_rng_state()
    a = ValidationBatch.from_dataset(data, 10, schedule, seed=1)
    b = ValidationBatch.from_dataset(data, 10, schedule, seed=1)
    value = a.vmse(net)
    assert torch.equal(torch.get_rng_state(), before)
    assert net.training  # the mode is restored
    assert len(a) == 10 and torch.equal(a.x0, b.x0) and torch.equal(a.noise, b.noise)
    # one t per stratum of width T / n: the batch mean estimates the loss under t ~ U{0..T-1}
    assert sorted(a.t.tolist()) == sorted(a.t_prime.tolist()) == [50 + 100 * i for i in range(10)]
    assert not torch.equal(a.t, a.t_prime)
    assert value == b.vmse(net)
    assert value == VelocityMSE(schedule)(net.eval(), a.x0, t=a.t, noise=a.noise).mean().item()
    frozen = make_perceptual(_net())
    sp = SelfPerceptual(schedule, frozen)(net, a.x0, t=a.t, t_prime=a.t_prime, noise=a.noise).mean().item()
    assert a.sp(net, frozen) == sp > 0
    assert a.losses(net, frozen) == {"val_vmse": value, "val_sp": sp} and a.losses(net) == {"val_vmse": value}
    assert ValidationBatch.from_dataset(data, 10, schedule, seed=2).vmse(net) != value


# ----------------------------------------------------------------------------- in the trainer
def test_both_stages_log_diagnostics_without_changing_the_training(recipe_file, tmp_path):
    runs = {n: tmp_path / f"run{n}" for n in (12, 0)}
    for n, run in runs.items():
        Trainer(load_recipe(recipe_file, [f"train.validation_size={n}"]), run, progress=False).run()
    lines = _lines(runs[12])
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    assert all(r["val_vmse"] > 0 for r in steps)
    assert [("val_sp" in r) for r in steps] == [False] * 4 + [True] * 2  # an mse stage from scratch has no f_*
    check = [r for r in lines if "perceptual_val_vmse" in r]
    assert len(check) == 1 and check[0]["stage1_best_loss"] == load_checkpoint(
        check[0]["source"]).info.best_loss > 0
    assert not any("val_vmse" in r or "perceptual_val_vmse" in r for r in _lines(runs[0]))
    # the diagnostics draw nothing from the training's RNG streams: the same losses and weights
    assert [r["loss"] for r in steps] == [r["loss"] for r in _lines(runs[0])]
    a, b = (load_checkpoint(latest_checkpoint(run)).weights["model"] for run in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_control_logs_val_sp_against_its_start_weights(recipe_file, tmp_path):
    base = tmp_path / "base"
    Trainer(load_recipe(recipe_file, ["train.stages=['mse']"]), base, progress=False).run()
    control = tmp_path / "control"
    Trainer(load_recipe(recipe_file, ["train.stages=['mse']", f"mse.init='{base}'", "mse.steps=4"]), control,
            progress=False).run()
    steps = _lines(control)
    assert len(steps) == 2 and all(r["val_sp"] > 0 and r["val_vmse"] > 0 for r in steps)


# ----------------------------------------------------------------------------- the perceptual check
def _broken_copy(run, scale: float = 50.0):
    """A final stage-mse checkpoint after the run's last one whose weights are `scale` x the last's."""
    last = load_checkpoint(latest_checkpoint(run))
    weights = {k: {n: t * scale for n, t in sd.items()} for k, sd in last.weights.items()}
    meta = {**last.info.extra, "stage": "mse"}
    return save_checkpoint(run, last.step + 1, weights=weights, state=last.state, meta=meta)


def test_sp_refuses_a_broken_perceptual_network_and_names_a_good_checkpoint(recipe_file, tmp_path, capsys):
    base = tmp_path / "base"
    Trainer(load_recipe(recipe_file, ["train.stages=['mse']"]), base, progress=False).run()
    good = latest_checkpoint(base)
    broken = _broken_copy(base)
    sets = ["train.stages=['sp']", f"sp.init='{broken}'"]
    with pytest.raises(PerceptualCheckError) as info:
        Trainer(load_recipe(recipe_file, sets), tmp_path / "sp", progress=False).run()
    message = str(info.value)
    assert message.startswith(f"sp: the perceptual network (ema weights of {broken}) has v-MSE ")
    assert "the stage-1 model looks diverged or broken; " in message and "\n" not in message
    assert message.endswith(f"use {good} as sp.init (or set sp.check_factor = 0)")
    assert not list_checkpoints(tmp_path / "sp")  # nothing trained
    # the CLI: one line, exit 3; with the check off the same start trains
    code = main(["train", str(recipe_file), "--out", str(tmp_path / "cli"), "--no-progress",
                 *[a for s in sets for a in ("--set", s)]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("perceptual-diffusion")]
    assert code == 3 and len(err) == 1 and "looks diverged or broken" in err[0]
    Trainer(load_recipe(recipe_file, [*sets, "sp.check_factor=0"]), tmp_path / "off", progress=False).run()
    assert load_checkpoint(latest_checkpoint(tmp_path / "off")).stage == "sp"


def test_a_checkpoint_without_a_recorded_loss_is_not_checked(recipe_file, tmp_path, caplog):
    base = tmp_path / "base"
    Trainer(load_recipe(recipe_file, ["train.stages=['mse']", "mse.steps=2"]), base, progress=False).run()
    assert load_checkpoint(latest_checkpoint(base)).info.best_loss is None  # shorter than a window
    with caplog.at_level(logging.INFO, logger="perceptual_diffusion.trainer"):
        Trainer(load_recipe(recipe_file, ["train.stages=['sp']", f"sp.init='{base}'", "sp.steps=1"]),
                tmp_path / "sp", progress=False).run()
    assert any("records no stage-1 loss" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- resuming past a shortened stage
def test_resuming_into_a_shortened_stage_ends_it_or_says_why_not(recipe_file, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(load_recipe(recipe_file, ["train.stages=['mse']", "mse.steps=4"]), run, progress=False).run()
    mid = run / "checkpoints" / "step-0000002"
    code = main(["train", str(recipe_file), "--out", str(run), "--no-progress", "--resume", str(mid),
                 "--set", "train.stages=['mse']", "--set", "mse.steps=1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("perceptual-diffusion")]
    assert code == 2 and err == [f"perceptual-diffusion: error: mse.steps = 1, but {mid} is at mse step 2: set "
                                 "mse.steps >= 2 to resume from it"]
    # exactly at the end: the stage ends there (a final checkpoint of the same weights), then sp runs
    resumed = tmp_path / "resumed"
    result = Trainer(load_recipe(recipe_file, ["mse.steps=2", "sp.steps=2", "sp.check_factor=0"]), resumed,
                     resume=str(mid), progress=False).run()
    assert [s.stage for s in result.stages] == ["mse", "sp"]
    ends = [c for c in map(load_checkpoint, list_checkpoints(resumed)) if c.info.final]
    assert [(c.stage, c.step) for c in ends] == [("mse", 2), ("sp", 4)]
    assert all(torch.equal(ends[0].weights["model"][k], v) for k, v in load_checkpoint(mid).weights["model"].items())
