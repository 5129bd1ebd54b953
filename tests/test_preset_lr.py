"""benchmarks/preset_lr.py: the guard statistic on known curves, the summary of a run with a spike,
and two short real runs side by side."""

import json
import math

import pytest

from helpers import load_benchmark


def _load():
    return load_benchmark("preset_lr")


def test_guard_peak_is_the_median_over_its_running_minimum():
    pl = _load()
    assert pl.guard_peak([1.0] * 20) == 1.0
    falling = [1.0 / (k + 1) for k in range(20)]
    assert pl.guard_peak(falling) == 1.0  # a falling curve never rises above its minimum
    # 10 steps at 0.2, then 10 at 0.6: the median of 5 reaches 0.6 = 3x the minimum 0.2
    assert pl.guard_peak([0.2] * 10 + [0.6] * 10) == pytest.approx(3.0)
    # one outlier does not move a median of 5
    assert pl.guard_peak([0.2] * 10 + [5.0] + [0.2] * 10) == pytest.approx(1.0)
    # medians ending before `start` are not counted (the warm-up), but they set the minimum
    assert pl.guard_peak([0.2] * 10 + [0.6] * 10, start=19) == pytest.approx(3.0)
    assert pl.guard_peak([0.6] * 10 + [0.2] * 10, start=12) == pytest.approx(1.0)
    assert math.isnan(pl.guard_peak([1.0] * 4))


def test_summary_of_a_run_with_a_spike(tmp_path):
    pl = _load()
    losses = [0.5 - 0.02 * k for k in range(20)] + [0.9] * 20
    rows = [{"step": 10 * (k + 1), "stage": "mse", "loss": v, "val_vmse": v + 0.01, "elapsed_s": 0.1 * 10 * (k + 1)}
            for k, v in enumerate(losses)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = pl.summarise(tmp_path, warmup=50, factor=2.0)
    assert got["steps"] == 400 and got["s_per_step"] == pytest.approx(0.1)
    assert got["final_loss"] == pytest.approx(0.9) and got["val_vmse_end"] == pytest.approx(0.91)
    assert got["val_vmse_min"] == pytest.approx(0.13)
    assert got["guard_peak"] == pytest.approx(0.9 / 0.16)  # the minimum median is that of 0.20..0.12
    assert not got["guard_warned"] and not got["stable"]  # above the factor 2: not stable
    (tmp_path / "train.log").write_text(f"WARNING spike at step 230 ...; {pl.WARNED}\n")
    assert pl.summarise(tmp_path, warmup=50, factor=10.0)["guard_warned"]
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no stage-mse losses"):
        pl.summarise(tmp_path, warmup=0, factor=2.0)


def test_two_learning_rates_side_by_side(tmp_path, capsys):
    from perceptual_diffusion.config import load_recipe

    pl = _load()
    out = tmp_path / "out"
    argv = ["recipes/image/circles.toml", "--preset", "tiny", "--lr", "1e-3,3e-4", "--warmup", "5", "--steps", "30",
            "--set", "data.size=16", "--set", "train.log_every=5", "--set", "mse.batch_size=4", "--out", str(out)]
    assert pl.main(argv) == 0
    runs = json.loads((out / "runs.json").read_text())
    assert [r["lr"] for r in runs] == [1e-3, 3e-4] and all(r["steps"] == 30 for r in runs)
    for r in runs:
        recipe = load_recipe(out / f"lr{r['lr']:g}" / "recipe.toml")
        assert (recipe.mse.lr, recipe.mse.warmup_steps, recipe.mse.decay_steps) == (r["lr"], 5, 0)
        assert recipe.model.preset == "tiny" and tuple(recipe.train.stages) == ("mse",) and recipe.train.divergence == "warn"
        assert math.isfinite(r["final_loss"]) and r["wall_s"] > 0
    table = (out / "table.md").read_text()
    assert table.count("\n| 0.00") == 2 and "preset `tiny`" in table and "30 steps, warm-up 5" in table
    assert capsys.readouterr().out.strip() == table.strip()
    # a second call reads the finished runs, it does not train them again
    assert pl.main(argv) == 0
    assert all(r["wall_s"] == 0 for r in json.loads((out / "runs.json").read_text()))
    for bad in (["--lr", "x"], ["--lr", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            pl.parse_args(["recipes/image/circles.toml", "--out", str(out), *bad])
    with pytest.raises(SystemExit):
        pl.parse_args(["recipes/image/circles.toml", "--out", str(out), "--preset", "huge"])


def test_a_stopped_run_resumes_from_its_latest_checkpoint(tmp_path):
    import shutil

    pl = _load()
    out = tmp_path / "out"
    argv = ["recipes/image/circles.toml", "--preset", "tiny", "--lr", "1e-3", "--warmup", "0", "--set", "data.size=16",
            "--set", "train.log_every=5", "--set", "mse.batch_size=4", "--checkpoint-every", "10", "--steps", "20",
            "--out", str(out)]
    assert pl.main(argv) == 0
    run = out / "lr0.001"
    first = json.loads((out / "runs.json").read_text())[0]
    # as if stopped after step 17: the step-10 checkpoint is the latest, steps 15 (and 20) were logged
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-0000020")
    assert pl.main(argv) == 0
    raw = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert raw == [5, 10, 15, 20, 15, 20]  # the resumed part logs its steps again, after the first part's
    (got,) = json.loads((out / "runs.json").read_text())
    assert got["steps"] == 20 and got["wall_s"] > 0 and 0 < got["s_per_step"] < 5
    assert got["final_loss"] == pytest.approx(first["final_loss"], rel=1e-4)  # exact resume: the same last loss
