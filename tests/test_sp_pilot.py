"""benchmarks/sp_pilot.py: the convergence rule on known curves, and the choice it makes from a
pilot's run directories."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from helpers import load_benchmark


def _load():
    return load_benchmark("sp_pilot")


def _records(curve, steps=300, every=10, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [{"step": 0, "stage": "sp", "stage_step": 0, "perceptual_val_vmse": 0.1}] + [
        {"stage": "sp", "stage_step": s, "loss": 1.0, "val_sp": curve(s) + noise * rng.standard_normal()}
        for s in range(every, steps + 1, every)]


def test_median_se_is_the_normal_approximation():
    sp = _load()
    assert sp.median_se([1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.2533 * math.sqrt(0.5) / 2)  # a trend, not noise
    assert sp.median_se([1.0, 3.0, 1.0, 3.0]) == pytest.approx(1.2533 * math.sqrt(2) / 2)
    assert math.isinf(sp.median_se([1.0]))


def test_a_curve_that_fell_and_flattened_has_converged():
    sp = _load()
    c = sp.convergence(_records(lambda s: 0.05 + 0.05 * math.exp(-s / 35), noise=0.0002), 300)
    assert c.medians[0] > c.medians[1] > c.medians[2] - 0.001
    assert c.measurable_fall() and not c.still_falling() and c.converged()
    assert "converged" in c.text()


def test_a_steady_fall_is_still_falling():
    sp = _load()
    c = sp.convergence(_records(lambda s: 0.1 - 2e-4 * s, noise=0.001), 300)
    # each third falls by 0.02: the late fall is half the whole fall, far above its error
    assert c.late_fall == pytest.approx(0.02, abs=0.002) and c.fall == pytest.approx(0.04, abs=0.002)
    assert c.measurable_fall() and c.still_falling() and not c.converged()
    assert "still falling" in c.text()


def test_noise_without_a_trend_is_no_measurable_fall():
    sp = _load()
    for seed in range(5):
        c = sp.convergence(_records(lambda s: 0.08, noise=0.005, seed=seed), 300)
        assert not c.measurable_fall() and not c.converged(), seed
    # a small late fall inside its error does not count as still falling
    c = sp.Convergence((0.10, 0.0805, 0.08), (0.001, 0.001, 0.001))
    assert c.late_fall < 2 * math.hypot(0.001, 0.001) and c.converged()
    # ...but outside its error and above the 10% share it does
    c = sp.Convergence((0.10, 0.09, 0.08), (0.001, 0.001, 0.001))
    assert c.still_falling() and not c.converged()


def test_convergence_needs_logs_in_every_third():
    sp = _load()
    with pytest.raises(ValueError, match="every third"):
        sp.convergence(_records(lambda s: 0.1, steps=300)[:15], 300)  # logs up to step 140 only
    with pytest.raises(ValueError, match="every third"):
        sp.convergence([{"stage_step": 10, "loss": 1.0}], 300)  # no val_sp


def _write_run(path: Path, curve, steps: int, seed: int):
    path.mkdir(parents=True)
    path.joinpath("metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _records(curve, steps=steps, noise=0.0002, seed=seed)))


def test_main_chooses_the_shortest_converged_candidate(tmp_path, capsys):
    sp = _load()
    flat = lambda s: 0.05 + 0.05 * math.exp(-s / 35)  # noqa: E731
    steady = lambda s: 0.1 - 2e-4 * s  # noqa: E731
    for steps, lr, curve in ((100, 1e-4, steady), (300, 1e-4, flat), (300, 1e-3, flat)):
        for seed in (10, 11):
            for model in ("sp", "control"):
                _write_run(tmp_path / "circles" / f"seed{seed}" / f"{model}{sp.suffix(steps, lr)}",
                           curve if model == "sp" else (lambda s: 0.09), steps, seed)
    out = tmp_path / "pilot.md"
    assert sp.main(["--work-dir", str(tmp_path), "--candidates", "300:1e-3,100:1e-4,300:1e-4",
                    "--tasks", "circles", "--seeds", "10,11", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| 1") or line.startswith("| 3")]
    assert [r.split(" | ")[:2] for r in rows] == [["| 100", "0.0001"], ["| 300", "0.0001"], ["| 300", "0.001"]]
    assert [r.split(" | ")[4] for r in rows] == ["no", "yes", "yes"]
    assert "Chosen: 300 steps at lr 0.0001" in text
    assert "| – / – |" in text  # no rows.jsonl: the sample metrics are left blank, not invented


def test_main_falls_back_when_nothing_converged(tmp_path, capsys):
    sp = _load()
    for seed in (10, 11):
        for model in ("sp", "control"):
            _write_run(tmp_path / "circles" / f"seed{seed}" / f"{model}{sp.suffix(300, 1e-3)}",
                       lambda s: 0.08, 300, seed)
    args = ["--work-dir", str(tmp_path), "--candidates", "300:1e-3", "--tasks", "circles", "--seeds", "10,11"]
    assert sp.main(args + ["--fallback", "300:1e-3"]) == 0
    assert "the fallback is used: 300 steps at lr 0.001." in capsys.readouterr().out
    assert sp.main(args) == 0
    assert "no --fallback was given" in capsys.readouterr().out
    # bad input: one line and exit status 2
    for bad, said in ((args[:3] + ["300-1e-3"] + args[4:], "want STEPS:LR"),
                      (args[:3] + ["200:1e-3"] + args[4:], "has the candidate been trained"),
                      (args + ["--fallback", "x"], "want STEPS:LR"),
                      (args[:5] + ["nope"] + args[6:], "unknown task"),
                      (args[:7] + ["10,a"], "invalid literal")):
        with pytest.raises(SystemExit) as exit_info:
            sp.main(bad)
        assert exit_info.value.code == 2
        assert said in capsys.readouterr().err


def test_sample_cells_pair_sp_with_its_control(tmp_path):
    sp = _load()
    rows = {}
    for seed, (v_sp, v_ctl) in {10: (0.5, 0.7), 11: (0.6, 0.7)}.items():
        for variant, valid, hf in (("sp", v_sp, 1.5), ("control", v_ctl, 1.1)):
            for steps in (25, 50):  # the 50-step rows are not the ones compared
                rows[f"{variant}{seed}{steps}"] = {"task": "circles", "variant": variant, "seed": seed, "steps": steps,
                                                   "guidance": 1.0, "eval": {"valid_fraction": valid if steps == 25 else 0.0,
                                                                             "spectrum_hf_ratio": hf}}
    delta, hf_sp, hf_ctl = sp.sample_cells(rows, "circles", [10, 11])
    assert delta.startswith("-0.150 [-0.200, -0.100], 0/2 better")
    assert (hf_sp, hf_ctl) == ("1.50", "1.10")
    assert sp.sample_cells(rows, "circles", [10, 12]) == ("–", "–", "–")  # seed 12 has no rows
