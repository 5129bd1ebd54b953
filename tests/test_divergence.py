"""The divergence guard: its statistic on series, and runs made to spike (stop, warn, off, resume)."""

import json
import logging
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import perceptual_diffusion.builders as builders_module
from perceptual_diffusion.checkpoint import list_checkpoints, load_checkpoint
from perceptual_diffusion.cli import main
from perceptual_diffusion.config import Recipe, load_recipe
from perceptual_diffusion.guards import DivergenceGuard
from perceptual_diffusion.trainer import DivergenceError, Trainer


def feed(guard: DivergenceGuard, losses, first: int = 1) -> list[int]:
    """The steps (`first`, first + 1, ...) at which `guard` confirms a spike."""
    return [step for step, loss in enumerate(losses, first) if guard.update(step, loss, 1.0)]


# ---------------------------------------------------------------------------------- the statistic
def test_defaults():
    t = Recipe().train
    assert (t.divergence, t.divergence_factor, t.divergence_window) == ("stop", 2.0, 50)


@pytest.mark.parametrize("window", [2, 5, 10, 11, 50])
def test_a_constant_loss_that_jumps_fires_once_a_window_after_the_median_crosses(window):
    jump = 300  # steps 1..300 at 1.0, then 3.0
    guard = DivergenceGuard(factor=2, window=window, start=window)
    crossed = jump + window // 2 + 1  # the first window whose median is a post-jump value
    assert feed(guard, [1.0] * jump + [3.0] * 3 * window) == [crossed + window - 1]
    assert guard.began(0) == crossed - window + 1 <= jump + 1  # nothing saved before it saw the rise
    assert (guard.median(), guard.best) == (3.0, 1.0)


def test_a_rise_inside_the_grace_period_is_confirmed_at_its_end_and_dated_from_its_start():
    early = [1.0] * 20 + [3.0] * 200  # the median of 10 crosses at step 26 (six 3.0s)
    assert feed(DivergenceGuard(factor=2, window=10, start=10), early) == [35]
    assert feed(DivergenceGuard(factor=2, window=10, start=30), early) == [35]
    late = DivergenceGuard(factor=2, window=10, start=40)
    assert feed(late, early) == [40]
    assert late.began(0) == 17 == 26 - 10 + 1


def test_a_falling_loss_never_fires_and_a_spike_after_it_does():
    falling = [10 * 0.99**i for i in range(500)]
    guard = DivergenceGuard(factor=2, window=21, start=21)
    assert feed(guard, falling) == []
    assert guard.best == statistics.median(falling[-21:])
    # 5x: the median of 21 is a new value from the 11th step of the rise (501 + 10) on; 21 steps later
    assert feed(guard, [falling[-1] * 5] * 40, first=501) == [531]


@settings(max_examples=80, deadline=None)
@given(data=st.data(), window=st.integers(5, 60), factor=st.floats(1.05, 10))
def test_noise_within_the_factor_and_isolated_spikes_never_fire(data, window, factor):
    """Law: losses within [a, a * factor) plus spikes, at most 2 in any window (under half of it
    from 5 steps on), never fire: such a window's median lies in [a, a * factor), however tall
    the spikes."""
    n = data.draw(st.integers(window, 400))
    losses = data.draw(st.lists(st.floats(1.0, factor, exclude_max=True), min_size=n, max_size=n))
    gap = window // 2 + 1  # at most one spike in `gap` steps
    for i in range(data.draw(st.integers(0, gap - 1)), n, gap):
        if data.draw(st.booleans()):
            losses[i] = data.draw(st.floats(1.0, 1e12))
    assert feed(DivergenceGuard(factor=factor, window=window, start=window), losses) == []


def test_the_gradient_norm_is_reported_not_a_trigger():
    guard = DivergenceGuard(factor=2, window=5, start=5)
    assert [s for s in range(1, 100) if guard.update(s, 1.0, 10.0 ** s)] == []
    assert guard.median_norm() == 10.0 ** 97 and guard.best_norm == 10.0 ** 3  # median of 10^1..10^5
    guard.update(100, 1.0, math.nan)  # DeepSpeed may report no norm
    assert guard.median_norm() == 10.0 ** 97


def test_state_round_trip_fires_at_the_same_step():
    losses = [1.0] * 100 + [5.0] * 100
    whole = DivergenceGuard(factor=2, window=10, start=10)
    expected = feed(whole, losses)
    first = DivergenceGuard(factor=2, window=10, start=10)
    feed(first, losses[:103])
    second = DivergenceGuard(factor=2, window=10, start=10)
    second.load_state_dict(first.state_dict())
    assert [s for s, loss in enumerate(losses[103:], 104) if second.update(s, loss, 1.0)] == expected == [114]


# ---------------------------------------------------------------------------------- runs made to spike
RECIPE = """
name = "d"
seed = 1
[data]
name = "circles"
size = 16
num_items = 64
[model]
preset = "tiny"
[mse]
steps = 32
batch_size = 4
lr = 1e-3
cond_dropout = 0.0
[sp]
steps = 32
batch_size = 4
lr = 1e-4
[train]
stages = ["mse"]
log_every = 4
sample_every = 0
checkpoint_every = 4
keep_last = 1
num_samples = 2
sample_steps = 2
divergence_window = 5
divergence_factor = 10
"""
JUMP = 20  # the loss of every step after this one (of the patched stage) is 1000x its real value


@pytest.fixture()
def recipe_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    return path


@pytest.fixture()
def spiking(monkeypatch):
    """Patch a stage's objective so that its loss jumps 1000x after step JUMP (one call per step)."""

    def patch(stage: str):
        name = "VelocityMSE" if stage == "mse" else "SelfPerceptual"
        base = getattr(builders_module, name)

        class Jump(base):
            calls = 0

            def __call__(self, *args, **kwargs):
                Jump.calls += 1
                return super().__call__(*args, **kwargs) * (1000.0 if Jump.calls > JUMP else 1.0)

        monkeypatch.setattr(builders_module, name, Jump)

    return patch


def _steps(run_dir) -> list[int]:
    return [load_checkpoint(p).step for p in list_checkpoints(run_dir)]


@pytest.mark.parametrize("stage", ["mse", "sp"])
def test_a_spike_stops_the_run_and_names_the_last_good_checkpoint(recipe_file, tmp_path, spiking, stage):
    # window 5: the median crosses at stage step JUMP + 3 = 23 and has stayed above for 5 steps at 27;
    # the window that first crossed began at step 19, so the last good checkpoint is that of step 16
    # (keep_last = 1 would have rotated it away); 20 and 24 were saved during the rise
    spiking(stage)
    sets = ["train.stages=['mse', 'sp']", "mse.steps=4"] if stage == "sp" else []
    offset = 4 if stage == "sp" else 0
    run = tmp_path / "run"
    with pytest.raises(DivergenceError) as info:
        Trainer(load_recipe(recipe_file, sets), run, progress=False).run()
    good = run / "checkpoints" / f"step-{offset + 16:07d}"
    message = str(info.value)
    assert message.startswith(f"loss diverging at {stage} step 27 (global step {offset + 27}): the median loss "
                              "of the last 5 steps")
    assert "has stayed above 10 x its minimum" in message and f"began at global step {offset + 19}" in message
    assert message.endswith(f"the last good checkpoint is {good} (--resume it with other settings"
                            + (" or use it as sp.init)" if stage == "mse" else ")"))
    assert "\n" not in message
    stage_steps = [s - offset for s in _steps(run) if s > offset]
    assert stage_steps == [16, 24]  # the good one kept, 20 rotated away, nothing saved at 27
    report = json.loads((run / "summary.json").read_text())["diverged"]
    assert report["last_good_checkpoint"] == str(good) == str(info.value.report["last_good_checkpoint"])
    assert report["checkpoints_after_the_rise"] == [str(run / "checkpoints" / f"step-{offset + 24:07d}")]
    assert (report["stage"], report["stage_step"], report["rise_began_at_step"]) == (stage, 27, offset + 19)
    assert report["median_loss"] > 10 * report["min_median_loss"] > 0
    ck = load_checkpoint(good)
    assert ck.stage == stage and ck.state["divergence"]["above"] == 0  # saved before the median crossed


def test_the_cli_stops_with_one_line_and_exit_status_3(recipe_file, tmp_path, spiking, capsys):
    spiking("mse")
    code = main(["train", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("perceptual-diffusion")]
    assert code == 3 and len(lines) == 1
    assert lines[0].startswith("perceptual-diffusion: training stopped: loss diverging at mse step 27 (global step 27)")
    assert lines[0].endswith("the last good checkpoint is " + str(tmp_path / "run" / "checkpoints" / "step-0000016")
                             + " (--resume it with other settings or use it as sp.init)")


def test_warn_warns_once_and_completes(recipe_file, tmp_path, spiking, caplog):
    spiking("mse")
    with caplog.at_level(logging.WARNING, logger="perceptual_diffusion.trainer"):
        result = Trainer(load_recipe(recipe_file, ["train.divergence=warn"]), tmp_path / "run", progress=False).run()
    warnings = [r.getMessage() for r in caplog.records if "diverging" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("loss diverging at mse step 27")
    assert warnings[0].endswith("; training on (train.divergence = 'warn')")
    assert result.stages[0].steps == 32
    assert _steps(tmp_path / "run") == [16, 28, 32]  # the last good one is still kept at the end


def test_off_is_silent_and_rotates_as_usual(recipe_file, tmp_path, spiking, caplog):
    spiking("mse")
    with caplog.at_level(logging.WARNING, logger="perceptual_diffusion.trainer"):
        Trainer(load_recipe(recipe_file, ["train.divergence=off"]), tmp_path / "run", progress=False).run()
    assert not [r for r in caplog.records if "diverging" in r.getMessage()]
    assert _steps(tmp_path / "run") == [28, 32]
    # the statistic still runs: its minimum, from before the spike, is the stage's recorded best loss
    final = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert final.info.best_loss == final.state["divergence"]["best"] < 1.0 < final.state["divergence"]["losses"][-1]


def test_a_resumed_run_keeps_the_statistic(recipe_file, tmp_path, spiking):
    """Stopped at step 22 (inside the rise) and resumed: the restored guard fires at step 27 as
    the uninterrupted run does; a fresh one would take the spiking loss as its minimum."""
    spiking("mse")
    recipe = load_recipe(recipe_file)
    run = tmp_path / "run"
    assert Trainer(recipe, run, progress=False).run(stop_after=22).stopped_at == 22
    with pytest.raises(DivergenceError, match=r"at mse step 27 .* began at global step 19"):
        Trainer(recipe, run, resume="latest", progress=False).run()


# ---------------------------------------------------------------------------------- the presets' lr
def test_presets_carry_the_lr_they_were_measured_to_train_at():
    from backbones import AudioDiT, ImageDiT, ImageUNet, VideoUNet

    assert ImageUNet.lr_advice("tiny", 1e-3, 50) is None  # the shipped recipes' setting
    assert ImageUNet.lr_advice("small", 1.0, 0) is None  # not measured: no advice
    advice = ImageUNet.lr_advice("default", 1e-3, 50)
    assert advice.startswith("mse.lr = 0.001 is 3.3x the lr measured to train the ImageUNet 'default' preset")
    assert advice.endswith("consider --set mse.lr=0.0003 --set mse.warmup_steps=200")
    assert VideoUNet.lr_advice("tiny", 1.4e-3, 50) is None and VideoUNet.lr_advice("tiny", 2e-3, 50)
    assert ImageDiT.lr_advice("tiny", 1e-3, 50) is None  # digits_dit.toml as shipped
    assert ImageDiT.lr_advice("default", 1e-3, 50).endswith("consider --set mse.lr=0.0003 --set mse.warmup_steps=200")
    assert AudioDiT.lr_advice("tiny", 1e-3, 50) is None  # tones.toml as shipped
    assert AudioDiT.lr_advice("default", 3e-4, 200) is None
    assert AudioDiT.lr_advice("default", 1e-3, 50).startswith("mse.lr = 0.001 is 3.3x the lr measured to train the AudioDiT")
    assert VideoUNet.lr_advice("default", 3e-4, 200) is None  # moving_shapes.toml, measured
    assert VideoUNet.lr_advice("default", 1e-3, 50).startswith("mse.lr = 0.001 is 3.3x the lr measured to train the VideoUNet")


def test_training_a_preset_from_scratch_above_its_lr_warns_once(recipe_file, tmp_path, caplog):
    sets = ["model.preset='default'", "mse.steps=1", "train.checkpoint_every=0"]
    with caplog.at_level(logging.WARNING, logger="perceptual_diffusion.trainer"):
        Trainer(load_recipe(recipe_file, sets), tmp_path / "run", progress=False).run()
        Trainer(load_recipe(recipe_file, [*sets, "mse.lr=3e-4"]), tmp_path / "ok", progress=False).run()
    warnings = [r.getMessage() for r in caplog.records if "measured to train" in r.getMessage()]
    assert len(warnings) == 1 and "ImageUNet 'default'" in warnings[0]
