"""benchmarks/reproduce.py: the table plan and cell format (fast), and --quick end to end with a
resume that re-trains and re-evaluates nothing (slow)."""

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_plan_covers_the_papers_tables():
    rp = _load()
    tables = rp.plan_tables(list(rp.TASKS), ["digits"])
    titles = [t.title.split(" (")[0] for t in tables]
    assert titles == ["Table 1"] * 3 + ["Modalities"] * 2 + ["Table 2", "Table 3", "Table 4", "Table 5", "Table 6",
                                                              "Table 7", "Table 8", "Table 8"]
    # video and audio: MSE vs SP at 25 steps, nothing else
    for task in ("moving_shapes", "tones"):
        t = next(t for t in tables if t.task == task)
        assert [(u.model, u.steps, u.guidance) for _, u in t.rows] == [("mse", 25, 1.0), ("sp", 25, 1.0)]
        assert rp.models_of(task, tables) == ["mse", "sp"]
    t1 = {t.task: t for t in tables if t.title.startswith("Table 1")}
    # conditional: MSE 25/50, MSE + CFG 7.5 without and with rescale 0.7, SP 25/50; NFE doubles with CFG
    assert [(u.model, u.steps, u.guidance, u.rescale, u.nfe) for _, u in t1["digits"].rows] == [
        ("mse", 25, 1.0, 0.0, 25), ("mse", 50, 1.0, 0.0, 50), ("mse", 25, 7.5, 0.0, 50),
        ("mse", 25, 7.5, 0.7, 50), ("sp", 25, 1.0, 0.0, 25), ("sp", 50, 1.0, 0.0, 50)]
    assert [u.model for _, u in t1["circles"].rows] == ["mse", "mse", "sp", "sp"]  # no CFG unconditionally
    t7 = next(t for t in tables if t.title.startswith("Table 7"))
    assert [(u.model, u.guidance, u.rescale) for _, u in t7.rows] == [
        ("mse", 7.5, 0.7), ("sp", 1.0, 0.0), ("sp", 2.0, 0.7), ("sp", 3.0, 0.7), ("sp", 4.0, 0.7), ("sp", 7.5, 0.7)]
    assert {t.task for t in tables if t.title.startswith("Table 8")} == {"circles", "digits_uncond"}
    # every variant on the ablation task, parents before children; only MSE + SP elsewhere
    digits = rp.models_of("digits", tables)
    assert digits[:2] == ["mse", "sp"] and set(digits) == {"mse", *rp.VARIANTS}
    assert rp.models_of("circles", tables) == ["mse", "sp"]
    assert rp.VARIANTS["sp_repeat"].parent == "sp"
    assert rp.VARIANTS["layers_encoder+mid"].overrides == ("sp.layers=encoder+mid",)


def test_cells_show_mean_and_sample_std():
    rp = _load()
    assert rp.cell([1.0, 3.0]) == "2.00 ± 1.41"
    assert rp.cell([200.0, 210.0, 220.0]) == "210.0 ± 10.0"
    assert rp.cell([0.001, 0.003]) == "0.00200 ± 0.00141"
    assert rp.cell([0.5]) == "0.500 (1 seed)"
    assert rp.cell([float("inf"), 0.2, 0.4]) == "0.300 ± 0.141; inf in 1 of 3 seeds"
    assert rp.cell([float("inf")] * 2) == "inf"
    assert rp.cell([]) == "–"


def _checkpoints(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work)) for p in work.rglob("checkpoints/step-*"))


@pytest.mark.slow
def test_quick_reproduction_end_to_end_and_resume(tmp_path, monkeypatch):
    rp = _load()
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--quick", "--work-dir", str(work), "--results-dir", str(results), "--tasks", ",".join(rp.IMAGE_TASKS)]
    t0 = time.time()
    assert rp.main(args) == 0
    first = time.time() - t0

    rows = [json.loads(line) for line in (results / "rows.jsonl").read_text().splitlines()]
    by_unit = {}
    for r in rows:
        assert {"task", "variant", "seed", "steps", "guidance", "rescale", "train_steps", "train_wall_s",
                "eval"} <= r.keys()
        assert r["eval"]["n"] == 40 and r["eval"]["nfe"] == r["steps"] * (2 if r["guidance"] != 1 else 1)
        assert r["train_steps"]["mse"] == 30 and all(v == 15 for k, v in r["train_steps"].items() if k != "mse")
        assert all(w > 0 for w in r["train_wall_s"].values())
        by_unit.setdefault((r["task"], r["variant"], r["steps"], r["guidance"], r["rescale"]), set()).add(r["seed"])
    tables = rp.plan_tables(rp.IMAGE_TASKS, ["digits"])
    wanted = {(u.task, u.model, u.steps, u.guidance, u.rescale) for t in tables for _, u in t.rows}
    assert set(by_unit) == wanted and all(seeds == {0, 1} for seeds in by_unit.values())
    assert len(rows) == 2 * len(wanted) == 2 * (4 + 18 + 4)
    metric_keys = {"circles": {"valid_fraction", "param_fd", "coverage"},
                   "digits": {"digits_fid", "digits_is", "label_accuracy"},
                   "digits_uncond": {"digits_fid", "digits_is"}}
    for r in rows:
        assert metric_keys[r["task"]] <= r["eval"].keys()
    assert "label_accuracy" not in next(r for r in rows if r["task"] == "digits_uncond")["eval"]

    text = (results / "tables.md").read_text()
    for n in range(1, 9):
        assert f"## Table {n} (" in text
    assert "AMD" in text or "cores" in text  # the machine line
    assert re.search(r"Training: MSE 30 steps \(\d+ s per seed\), then SP 15 steps", text)
    sections = text.split("## ")[1:-1]  # the last is the figures' legend
    assert len(sections) == 3 + 5 + 1 + 2
    for sec in sections:
        body = [line for line in sec.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert body and all(re.search(r"\d ± \d", line) for line in body), sec
    for task in rp.IMAGE_TASKS:
        for kind in ("samples", "trajectory"):
            img = Image.open(results / "figures" / f"{task}_{kind}.png")
            assert img.width > 100 and img.height > 30
    # samples: 10 per row, rows MSE / SP (/ MSE + CFG): 3 x (16 x 3 + 1) + 1 px high for digits
    assert Image.open(results / "figures" / "digits_samples.png").height == 3 * 49 + 1
    assert Image.open(results / "figures" / "circles_samples.png").height == 2 * 49 + 1

    # a second invocation trains nothing, evaluates nothing and leaves the rows alone
    rows_before, ckpts_before = (results / "rows.jsonl").read_bytes(), _checkpoints(work)

    def refuse(*a, **k):
        raise AssertionError("re-ran finished work")

    monkeypatch.setattr(rp, "Trainer", refuse)
    monkeypatch.setattr(rp, "evaluate", refuse)
    t0 = time.time()
    assert rp.main(args) == 0
    assert time.time() - t0 < first / 3
    assert (results / "rows.jsonl").read_bytes() == rows_before
    assert _checkpoints(work) == ckpts_before
    assert (results / "tables.md").read_text().split("Wall time")[1] == text.split("Wall time")[1]

    # a row lost (an interruption between two rows) is evaluated again, and only that row
    lines = rows_before.decode().splitlines(keepends=True)
    lost = json.loads(lines[5])
    (results / "rows.jsonl").write_text("".join(lines[:5] + lines[6:]))
    calls = []
    monkeypatch.setattr(rp, "evaluate", lambda *a, **k: calls.append(k) or lost["eval"])
    assert rp.main(args + ["--no-figures"]) == 0
    assert len(calls) == 1 and (calls[0]["steps"], calls[0]["guidance"]) == (lost["steps"], lost["guidance"])


@pytest.mark.slow
def test_interrupted_training_resumes_from_its_latest_checkpoint(tmp_path, monkeypatch):
    from perceptual_diffusion.checkpoint import list_checkpoints

    rp = _load()
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--quick", "--tasks", "circles", "--seeds", "1", "--samples", "8", "--no-figures",
            "--work-dir", str(work), "--results-dir", str(results)]
    run = rp.Trainer.run
    monkeypatch.setattr(rp.Trainer, "run", lambda self, stop_after=None: run(self, stop_after=10))  # a preemption
    assert rp.main(args) == 130
    mse_dir = work / "circles" / "seed0" / "mse"
    (ckpt,) = list_checkpoints(mse_dir)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["extra"]["stage_step"] == 10 and not meta["extra"]["final"]
    assert not (results / "rows.jsonl").exists()
    wall = json.loads((mse_dir / "reproduce.json").read_text())["wall_s"]

    monkeypatch.undo()
    resumes = []
    init = rp.Trainer.__init__
    monkeypatch.setattr(rp.Trainer, "__init__", lambda self, recipe, run_dir, resume=None, progress=True: (
        resumes.append((Path(run_dir).name, resume)), init(self, recipe, run_dir, resume, progress))[1])
    assert rp.main(args) == 0
    assert resumes == [("mse", "latest"), ("sp", None)]
    steps = [json.loads(line)["stage_step"] for line in (mse_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]  # continued from step 10, nothing trained twice
    assert json.loads((mse_dir / "reproduce.json").read_text())["wall_s"] > wall  # wall time accumulates
    rows = [json.loads(line) for line in (results / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["variant"] for r in rows} == {"mse", "sp"}


def test_seed_list_picks_the_training_seeds(tmp_path):
    rp = _load()
    cfg = rp.build_config(rp.parse_args(["--seed-list", "2,0", "--work-dir", str(tmp_path)]))
    assert cfg.seeds == [2, 0] and cfg.label == "full"
    assert rp.build_config(rp.parse_args(["--seeds", "2", "--work-dir", str(tmp_path)])).seeds == [0, 1]
    with pytest.raises(SystemExit):
        rp.parse_args(["--seed-list", "1,x"])


@pytest.mark.slow
def test_quick_reproduction_of_the_video_and_audio_rows(tmp_path):
    rp = _load()
    results = tmp_path / "results"
    args = ["--quick", "--work-dir", str(tmp_path / "work"), "--results-dir", str(results),
            "--tasks", "moving_shapes,tones", "--ablation-tasks", ""]
    assert rp.main(args) == 0
    rows = [json.loads(line) for line in (results / "rows.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["variant"], r["seed"]) for r in rows) == sorted(
        (t, v, s) for t in ("moving_shapes", "tones") for v in ("mse", "sp") for s in (0, 1))
    for r in rows:
        assert r["steps"] == 25 and r["eval"]["n"] == 24
        assert {k for k, _ in rp.TASKS[r["task"]].columns} <= r["eval"].keys()
    text = (results / "tables.md").read_text()
    assert "## Modalities (moving_shapes, video)" in text and "## Modalities (tones, audio)" in text
    assert "8 frames of 16x16" in text and "2048 samples at 8000 Hz" in text
    figures = results / "figures"
    with Image.open(figures / "moving_shapes_samples.gif") as gif:
        assert gif.n_frames == 8
    # 4 MSE clips then 4 SP clips as rows, 8 frames as columns, 16 px at scale 3 and 1 px lines
    assert Image.open(figures / "moving_shapes_samples.png").size == (8 * 49 + 1, 8 * 49 + 1)
    assert (figures / "tones_samples.wav").stat().st_size > 8 * 2048 * 2  # 8 clips of 16-bit samples
    assert Image.open(figures / "tones_samples.png").mode == "RGB"

