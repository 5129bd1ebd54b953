"""benchmarks/reproduce.py: the table plan, the matched control's settings, the paired bootstrap
interval, the cell format and the tables with the control and the floors (fast), and --quick end
to end with a resume that re-trains and re-evaluates nothing (slow)."""

import json
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return load_benchmark("reproduce")


def test_plan_covers_the_papers_tables():
    rp = _load()
    tables = rp.plan_tables(list(rp.TASKS), ["digits"])
    titles = [t.title.split(" (")[0] for t in tables]
    assert titles == (["SP vs its matched control"] * 6 + ["Table 1"] * 4 + ["Modalities"] * 2
                      + ["Table 2", "Table 3", "Table 4", "Table 5", "Table 6", "Table 7"] + ["Table 8"] * 3)
    assert [t.task for t in tables[:6]] == list(rp.TASKS) and {t.kind for t in tables[:6]} == {"paired"}
    assert [u.model for _, u in tables[0].rows] == ["mse", "sp", "control"]
    # video and audio: MSE vs SP vs the control at 25 steps, nothing else
    for task in ("moving_shapes", "tones"):
        t = next(t for t in tables if t.task == task and t.kind == "rows")
        assert [(u.model, u.steps, u.guidance) for _, u in t.rows] == [("mse", 25, 1.0), ("sp", 25, 1.0),
                                                                       ("control", 25, 1.0)]
        assert rp.models_of(task, tables) == ["mse", "sp", "control"]
    t1 = {t.task: t for t in tables if t.title.startswith("Table 1")}
    # conditional: MSE 25/50, MSE + CFG 7.5 without and with rescale 0.7, SP 25/50, control 25/50;
    # NFE doubles with CFG
    assert [(u.model, u.steps, u.guidance, u.rescale, u.nfe) for _, u in t1["digits"].rows] == [
        ("mse", 25, 1.0, 0.0, 25), ("mse", 50, 1.0, 0.0, 50), ("mse", 25, 7.5, 0.0, 50),
        ("mse", 25, 7.5, 0.7, 50), ("sp", 25, 1.0, 0.0, 25), ("sp", 50, 1.0, 0.0, 50),
        ("control", 25, 1.0, 0.0, 25), ("control", 50, 1.0, 0.0, 50)]
    for task in ("circles", "photo_patches"):  # no CFG unconditionally
        assert [u.model for _, u in t1[task].rows] == ["mse", "mse", "sp", "sp", "control", "control"]
    t7 = next(t for t in tables if t.title.startswith("Table 7"))
    assert [(u.model, u.guidance, u.rescale) for _, u in t7.rows] == [
        ("mse", 7.5, 0.7), ("control", 7.5, 0.7), ("sp", 1.0, 0.0), ("sp", 2.0, 0.7), ("sp", 3.0, 0.7),
        ("sp", 4.0, 0.7), ("sp", 7.5, 0.7)]
    assert {t.task for t in tables if t.title.startswith("Table 8")} == {"circles", "digits_uncond", "photo_patches"}
    # every table with an SP-trained row holds the control (the ablations are compared with the same one)
    for t in tables:
        if any(rp.stage_of(u.model) == "sp" for _, u in t.rows):
            assert any(u.model == "control" for _, u in t.rows), t.title
    # every variant on the ablation task, parents before children; only MSE, SP and the control elsewhere
    digits = rp.models_of("digits", tables)
    extra = {"layers_all", "mse_weight_0.1", "mse_weight_1"}  # the artifact tables' variants (none here)
    assert digits[:3] == ["mse", "sp", "control"] and set(digits) == {"mse", *rp.VARIANTS} - extra
    assert rp.models_of("circles", tables) == rp.models_of("photo_patches", tables) == ["mse", "sp", "control"]
    assert rp.VARIANTS["sp_repeat"].parent == "sp" and rp.VARIANTS["control"].parent == "mse"
    assert rp.stage_of("control") == "mse" and rp.stage_of("sp_repeat") == "sp"
    assert rp.VARIANTS["layers_encoder+mid"].overrides == ("sp.layers=encoder+mid",)
    assert rp.DEFAULT_TASKS == ["circles", "digits", "digits_uncond", "photo_patches"]
    assert rp.SCALES["full"].seeds >= 4


def test_artifact_tables_hold_every_sp_variant_of_the_library_against_the_control():
    from perceptual_diffusion.config import load_recipe

    rp = _load()
    tables = rp.plan_tables(rp.IMAGE_TASKS, ["digits"], ["circles", "photo_patches"])
    art = [t for t in tables if t.kind == "artifact"]
    assert [t.task for t in art] == ["circles", "photo_patches"] and tables[-2:] == art
    for t in art:
        assert [u.model for _, u in t.rows] == ["mse", *(m for _, m in rp.ARTIFACT_ROWS), "control"]
        assert all((u.steps, u.guidance) == (25, 1.0) for _, u in t.rows)
        assert set(rp.models_of(t.task, tables)) == {"mse", "control", *(m for _, m in rp.ARTIFACT_ROWS)}
    # item 6's list: layers mid / encoder / decoder / all, mse_weight 0 / 0.1 / 1, the t' modes, sp / sp2
    recipe = rp.ROOT / rp.TASKS["circles"].recipe
    seen = set()
    for _, model in rp.ARTIFACT_ROWS:
        v = rp.VARIANTS[model]
        assert v.stage == "sp" and v.parent == "mse"
        sp = load_recipe(recipe, list(v.overrides)).sp
        seen.add((sp.layers, sp.mse_weight, sp.t_prime, sp.formulation))
    assert {layers for layers, *_ in seen} == {"mid", "encoder", "decoder", "all"}
    assert {w for _, w, *_ in seen} == {0.0, 0.1, 1.0}
    assert {t for *_, t, _ in seen} == {"uniform", "near", "normal"} and {f for *_, f in seen} == {"sp", "sp2"}
    assert len(seen) == len(rp.ARTIFACT_ROWS)  # each row a different setting; all others as the default
    assert rp.models_of("digits_uncond", tables) == ["mse", "sp", "control"]  # not an artifact task here
    # photo_patches shows its KID and grain ratio as well as the HF ratio
    assert [c.key for c in rp.artifact_columns(rp.TASKS["photo_patches"])] == [
        "patches_kid", "patches_laplacian_ratio", "spectrum_hf_ratio"]
    assert [c.key for c in rp.artifact_columns(rp.TASKS["digits"])] == [
        "digits_fid", "digits_kid", "spectrum_hf_ratio"]


def test_verdicts_need_the_interval_on_one_side_of_zero():
    rp = _load()
    lower, higher, one = rp.Column("fid", "FID ↓"), rp.Column("acc", "acc ↑", "higher"), rp.Column("r", "r", "one")
    assert rp.verdict(lower, [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) == "better"
    assert rp.verdict(higher, [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) == "worse"
    assert rp.verdict(lower, [1.0, 3.0, 2.0, 4.0], [2.0, 2.0, 3.0, 3.0]) == "tie"  # -1, +1, -1, +1
    # ratios: the distance from 1 counts, not the sign of the difference
    assert rp.verdict(one, [0.9, 1.05, 1.1], [1.3, 1.4, 0.6]) == "better"
    assert rp.verdict(one, [1.5, 1.6], [1.0, 0.9]) == "worse"
    assert rp.verdict(lower, [1.0], [2.0]) == "–"  # one seed: no interval
    assert rp.verdict(lower, [1.0, float("nan"), 1.0], [2.0, 1.0, float("inf")]) == "–"  # one finite pair


def _sections(text: str) -> dict[str, str]:
    """tables.md by its "## " headings."""
    return {s.split("\n")[0]: s for s in text.split("## ")[1:]}


def test_artifact_tables_and_the_summary_render_the_paired_verdicts(tmp_path):
    rp = _load()
    cfg = rp.build_config(rp.parse_args(["--work-dir", str(tmp_path), "--results-dir", str(tmp_path / "results")]))
    tables = rp.plan_tables(["circles", "digits"], [], ["circles", "digits"])
    # the headline: control 1, layers_all 0.5 (digits-FID ↓ better; circles' valid ↑ worse), the rest 1.2;
    # the HF ratio: control 1.3, every variant 1.1 (closer to 1) but formulation_sp2 2.0 (farther)
    rows = {}
    for t in tables:
        for _, u in t.rows:
            for seed in cfg.seeds:
                head = {"control": 1.0, "layers_all": 0.5}.get(u.model, 1.2) + seed / 100
                hf = {"control": 1.3, "formulation_sp2": 2.0}.get(u.model, 1.1) + seed / 100
                ev = {c.key: head for c in rp.TASKS[u.task].columns} | {"spectrum_hf_ratio": hf}
                rows[rp.row_key(cfg, u, seed)] = {"eval": ev, "train_wall_s": {"mse": 10.0}, "eval_wall_s": 1.0}
    floors = {"digits": {"real": {"digits_fid": (3.0, 0.5), "spectrum_hf_ratio": (1.0, 0.02)}}}
    text = rp.render_tables(cfg, tables, rows, 60.0, floors)
    sections = _sections(text)
    digits = sections["SP variants and the grain (digits)"]
    assert ("| SP variant | digits-FID ↓ | digits-KID ↓ | HF energy ratio (1 = data) | digits-FID − control [95% CI] "
            "| HF ratio − control [95% CI] |") in digits
    assert "| Every tap | 0.515 ± 0.013 | 0.515 ± 0.013 | 1.12 ± 0.01 | -0.500 [-0.500, -0.500], 4/4 better | " \
           "-0.200 [-0.200, -0.200], 4/4 better |" in digits
    assert "| MSE continued (control) | 1.02 ± 0.01 | 1.02 ± 0.01 | 1.31 ± 0.01 | – | – |" in digits
    assert "| Real vs real (floor), n = 300 | 3.00 ± 0.50 | – | 1.00 ± 0.02 | – | – |" in digits
    summary = sections["SP variants against the control on every task (the artifact, issue 11)"]
    lines = {line.split(" | ")[0][2:]: line for line in summary.splitlines() if line.startswith("| ")}
    assert lines["SP variant"] == ("| SP variant | circles: valid / HF | digits: digits-FID / HF | beats the control, "
                                   "grain removed, on every task |")
    assert lines["Every tap"] == "| Every tap | worse / closer | better / closer | no |"  # circles' valid fell
    assert lines["L_sp2"] == "| L_sp2 | better / farther | worse / farther | no |"
    assert lines["Midblock, L_sp (the paper's default)"].endswith("| better / closer | worse / closer | no |")
    assert len(lines) == 1 + len(rp.ARTIFACT_ROWS)
    # a variant better on every task's headline and not farther on the HF ratio is a "yes"
    for t in tables:
        for _, u in t.rows:
            if u.model == "layers_all":
                for seed in cfg.seeds:
                    better = 1.5 if rp.TASKS[u.task].columns[0].better == "higher" else 0.5
                    rows[rp.row_key(cfg, u, seed)]["eval"][rp.TASKS[u.task].columns[0].key] = better + seed / 100
    text = rp.render_tables(cfg, tables, rows, 60.0, floors)
    assert "| Every tap | better / closer | better / closer | yes |" in text
    assert rp.render_artifact_summary(cfg, rp.plan_tables(["circles"], []), rows) == []  # no artifact table
    # a variant not measured on a task yet (fewer than two seeds) gets no verdict there, and no answer
    for seed in cfg.seeds[1:]:
        del rows[rp.row_key(cfg, rp.Unit("circles", "tprime_near"), seed)]
    text = rp.render_tables(cfg, tables, rows, 60.0, floors)
    assert "| t' = t ± 40 | – / – | worse / closer | – (too few seeds) |" in text
    # the figures' legend only where figures were drawn (not with --no-figures)
    assert "## Figures" not in text
    (cfg.results_dir / "figures").mkdir(parents=True)
    (cfg.results_dir / "figures" / "circles_samples.png").write_bytes(b"")
    assert "## Figures" in rp.render_tables(cfg, tables, rows, 60.0, floors)


def test_artifact_tasks_default_to_the_image_tasks_and_refuse_the_others(tmp_path, capsys):
    rp = _load()
    assert rp.parse_args([]).artifact_tasks == rp.DEFAULT_TASKS == rp.IMAGE_TASKS
    assert rp.parse_args(["--tasks", "circles,moving_shapes"]).artifact_tasks == ["circles"]
    assert rp.parse_args(["--tasks", "tones", "--artifact-tasks", ""]).artifact_tasks == []
    assert rp.parse_args(["--artifact-tasks", "digits"]).artifact_tasks == ["digits"]
    with pytest.raises(SystemExit) as e:
        rp.parse_args(["--artifact-tasks", "tones"])
    assert e.value.code == 2 and "--artifact-tasks" in capsys.readouterr().err


@pytest.mark.parametrize("sp_settings", [
    [],  # the recipe's own [sp]
    ["sp.steps=37", "sp.batch_size=5", "sp.grad_accum=3", "sp.lr=2.5e-5", "sp.weight_decay=0.01",
     "sp.adam_betas=[0.8, 0.95]", "sp.warmup_steps=7", "sp.grad_clip=0.5", "sp.ema_decay=0.99",
     "sp.ema_warmup=false", "sp.cond_dropout=0.2", "sp.init_weights=online"],
    ["sp.perceptual_weights=online"],  # init_weights "frozen": the online weights then
])
@pytest.mark.parametrize("task", ["circles", "digits", "digits_uncond", "photo_patches", "moving_shapes", "tones"])
def test_control_settings_equal_the_sp_stage_field_by_field(task, sp_settings, tmp_path):
    import dataclasses

    from perceptual_diffusion.config import StageConfig, load_recipe

    rp = _load()
    recipe_path = rp.ROOT / rp.TASKS[task].recipe
    base = ["seed=3", "mse.steps=1000", "mse.lr=1e-3", "mse.warmup_steps=50", "mse.cond_dropout=0.1", *sp_settings]
    sp = load_recipe(recipe_path, base)
    control = load_recipe(recipe_path, base + rp.control_overrides(sp)
                          + ["train.stages=['mse']", f"mse.init='{tmp_path}'"])
    fields = [f.name for f in dataclasses.fields(StageConfig) if f.name not in ("init", "init_weights")]
    assert {"steps", "batch_size", "lr", "warmup_steps", "grad_clip", "ema_decay", "ema_warmup",
            "cond_dropout"} <= set(fields)
    for name in fields:
        assert getattr(control.mse, name) == getattr(sp.sp, name), name
    start = sp.sp.perceptual_weights if sp.sp.init_weights == "frozen" else sp.sp.init_weights
    assert control.mse.init_weights == start == ("online" if sp_settings else "ema")
    assert control.seed == sp.seed == 3 and control.mse.init == str(tmp_path)
    assert control.data == sp.data and control.model == sp.model and control.schedule == sp.schedule


def test_bootstrap_interval_on_known_data():
    rp = _load()
    assert rp.bootstrap_ci([0.25] * 4) == (0.25, 0.25)                      # a constant difference: zero width
    lo, hi = rp.bootstrap_ci([-3.0, -1.0, 1.0, 3.0])                         # symmetric about 0: covers 0
    assert lo < 0 < hi and lo == pytest.approx(-hi, abs=0.26)
    # two seeds {0, 1}: the resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert rp.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert rp.bootstrap_ci([0.0, 1.0], level=0.4) == (0.5, 0.5)
    data = [0.3, -0.1, 0.5, 0.2, 0.4, 0.0]
    assert rp.bootstrap_ci(data) == rp.bootstrap_ci(data)                    # a fixed RNG seed
    lo, hi = rp.bootstrap_ci(data)
    assert min(data) <= lo < sum(data) / len(data) < hi <= max(data)
    wide, narrow = rp.bootstrap_ci(data), rp.bootstrap_ci(data * 4)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]                         # more seeds, narrower
    assert rp.bootstrap_ci([2.0]) == (2.0, 2.0)
    for bad in ([], [1.0, float("inf")]):
        with pytest.raises(ValueError):
            rp.bootstrap_ci(bad)


def test_paired_cells_pair_seeds_and_count_wins():
    rp = _load()
    lower, higher, one = rp.Column("fid", "FID ↓"), rp.Column("acc", "acc ↑", "higher"), rp.Column("r", "r", "one")
    assert rp.paired_cell(lower, [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) == "-1.00 [-1.00, -1.00], 3/3 better"
    assert rp.paired_cell(higher, [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) == "-1.00 [-1.00, -1.00], 0/3 better"
    # a seed missing on either side (nan) or an inf is left out of the pairs
    assert rp.paired_cell(lower, [1.0, float("nan"), float("inf"), 5.0], [2.0, 3.0, 4.0, 4.0]).endswith("1/2 better")
    assert rp.paired_cell(one, [1.1, 0.7], [1.3, 0.9]).endswith("1/2 better")  # 1.1 beats 1.3, 0.7 loses to 0.9
    assert rp.paired_cell(lower, [1.0], [1.5]) == "-0.500 (1 seed)"
    assert rp.paired_cell(lower, [], []) == "–"
    assert rp.paired_cell(rp.Column("kid_se", "SE", "se"), [1.0, 2.0], [1.0, 1.0]) == "–"


def _fake_rows(rp, cfg, tables):
    """Rows of every unit and seed: metric value = 1 for the control, 0.5 for SP, 2 for MSE (+ seed / 100)."""
    rows = {}
    level = {"control": 1.0, "sp": 0.5, "mse": 2.0}
    for t in tables:
        for _, u in t.rows:
            for seed in cfg.seeds:
                value = level.get(u.model, 0.75) + seed / 100
                ev = {c.key: value for c in rp.TASKS[u.task].columns}
                rows[rp.row_key(cfg, u, seed)] = {"eval": ev, "train_wall_s": {"mse": 10.0, u.model: 5.0},
                                                  "eval_wall_s": 1.0}
    return rows


def test_tables_show_the_control_the_paired_differences_and_the_floors(tmp_path):
    rp = _load()
    cfg = rp.build_config(rp.parse_args(["--work-dir", str(tmp_path)]))
    tables = rp.plan_tables(["photo_patches", "digits"], ["digits"])
    floors = {"photo_patches": {"real": {"patches_kid": (0.01, 0.1), "spectrum_hf_ratio": (1.05, 0.1)},
                                "train": {"patches_kid": (0.2, 0.1)}},
              "digits": {"real": {"digits_fid": (3.0, 0.5)}}}
    text = rp.render_tables(cfg, tables, _fake_rows(rp, cfg, tables), 60.0, floors)
    sections = _sections(text)
    paired = sections["SP vs its matched control (photo_patches)"]
    assert ("| Metric | Real vs real (floor), n = 300 | Training data vs held-out, n = 300 | MSE base | SP | "
            "Control | SP − control, paired [95% CI] |") in paired
    # SP 0.5 + seed/100 against the control 1 + seed/100: -0.5 in every seed, all 4 better (KID ↓)
    assert "| patches-KID ↓ | 0.0100 ± 0.1000 | 0.200 ± 0.100 | 2.01 ± 0.01 | 0.515 ± 0.013 | 1.02 ± 0.01 | " \
           "-0.500 [-0.500, -0.500], 4/4 better |" in paired
    se = next(line for line in paired.splitlines() if line.startswith("| KID SE |"))
    assert se.startswith("| KID SE | – | – |") and se.endswith("| – |")  # a standard error is not compared
    assert paired.count("\n| ") == 1 + len(rp.TASKS["photo_patches"].columns)  # the header and a line per metric
    # closer to 1 is better for the ratios: the control's 1.02 beats SP's 0.515 in every seed
    assert "| HF energy ratio (1 = data) | 1.05 ± 0.10 | – |" in paired and paired.count("0/4 better") == 2
    t1 = sections["Table 1 (digits)"]
    assert "digits-FID − control [95% CI]" in t1
    assert "| SP |  |  | 25 | 25 |" in t1 and "-0.500 [-0.500, -0.500], 4/4 better |" in t1
    assert "| MSE continued (control) |  |  | 50 | 50 |" in t1 and "| Real vs real (floor), n = 300 |" in t1
    mse_cfg = next(line for line in t1.splitlines() if line.startswith("| MSE | 7.5 |  |"))
    assert mse_cfg.endswith("| – |")  # no control at CFG 7.5 without rescale in Table 1
    t7 = sections["Table 7 (digits): SP with classifier-free guidance"]
    sp_cfg = next(line for line in t7.splitlines() if line.startswith("| SP | 7.5 | 0.7 |"))
    assert sp_cfg.endswith("4/4 better |")  # paired with the control at CFG 7.5 rescale 0.7
    for title in ("Table 2", "Table 3", "Table 4", "Table 5", "Table 6"):
        body = next(s for k, s in sections.items() if k.startswith(title))
        assert "| MSE continued (control) |" in body and "− control [95% CI]" in body
    assert "percentile-bootstrap" in text and "10,000 resamples" in text


def test_floors_of_photo_patches_include_the_training_data():
    rp = _load()
    got = rp.compute_floors("photo_patches", 16, 40)
    assert set(got) == {"real", "train"}
    keys = {c.key for c in rp.TASKS["photo_patches"].columns}
    assert keys <= set(got["real"]) and keys <= set(got["train"])
    mean, std = got["real"]["patches_laplacian_ratio"]
    assert 0.7 < mean < 1.4 and std > 0  # 40 against 40 patches: a noisy ratio
    assert rp.compute_floors("photo_patches", 16, 3000) == {"real": {}}  # 4096 held-out patches < 2 x 3000
    circles = rp.compute_floors("circles", 16, 40)
    assert set(circles) == {"real"} and circles["real"]["valid_fraction"][0] > 0.9


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
    args = ["--quick", "--work-dir", str(work), "--results-dir", str(results), "--tasks", ",".join(rp.IMAGE_TASKS),
            "--artifact-tasks", "circles"]
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
    tables = rp.plan_tables(rp.IMAGE_TASKS, ["digits"], ["circles"])
    wanted = {(u.task, u.model, u.steps, u.guidance, u.rescale) for t in tables for _, u in t.rows}
    assert set(by_unit) == wanted and all(seeds == {0, 1} for seeds in by_unit.values())
    # Table 1: 6 units (circles, digits_uncond, photo_patches) and 8 (digits); 8 more SP runs in
    # Tables 2-6; the control with CFG and SP at 4 guidance scales in Table 7; 8 SP variants on circles
    assert len(rows) == 2 * len(wanted) == 2 * (6 + 8 + 6 + 6 + 8 + 5 + 8)
    metric_keys = {"circles": {"valid_fraction", "param_fd", "coverage"},
                   "digits": {"digits_fid", "digits_kid", "digits_kid_se", "digits_is", "label_accuracy"},
                   "digits_uncond": {"digits_fid", "digits_kid", "digits_is"},
                   "photo_patches": {"patches_kid", "patches_kid_se", "patches_fd", "patches_laplacian_ratio"}}
    for r in rows:
        assert metric_keys[r["task"]] | {"spectrum_hf_ratio"} <= r["eval"].keys()
    assert "label_accuracy" not in next(r for r in rows if r["task"] == "digits_uncond")["eval"]

    text = (results / "tables.md").read_text()
    for n in range(1, 9):
        assert f"## Table {n} (" in text
    assert "AMD" in text or "cores" in text  # the machine line
    assert re.search(r"Training: MSE 30 steps \(\d+ s per seed\), then SP 15 steps", text)
    sections = text.split("## ")[1:-1]  # the last is the figures' legend
    assert len(sections) == 1 + 4 + 4 + 5 + 1 + 3 + 1 + 1
    verdicts = sections.pop(0)  # the per-task verdicts open the tables
    assert verdicts.startswith("Does SP beat its matched control?")
    for task in rp.IMAGE_TASKS:
        assert re.search(rf"^\| {task} \| .*\| (SP better|SP worse|not resolved)", verdicts, re.M), task
    assert sections[-2].startswith("SP variants and the grain (circles)")
    summary = sections.pop()  # verdicts, not figures
    assert summary.startswith("SP variants against the control on every task") and "| Every tap | " in summary
    for sec in sections:
        body = [line for line in sec.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert body and all(re.search(r"\d ± \d", line) for line in body), sec
        assert "control" in sec and "Real vs real (floor), n = 40" in sec, sec
    assert "Training data vs held-out, n = 40" in text  # photo_patches
    floors = json.loads((results / "floors.json").read_text())
    assert {k.split("|")[0] for k in floors} == set(rp.IMAGE_TASKS)
    for task in rp.IMAGE_TASKS:
        for kind in ("samples", "trajectory", "spectrum"):
            img = Image.open(results / "figures" / f"{task}_{kind}.png")
            assert img.width > 100 and img.height > 30
    # samples: 10 per row, rows MSE / control / SP (/ MSE + CFG): 4 x (16 x 3 + 1) + 1 px high for digits
    assert Image.open(results / "figures" / "digits_samples.png").height == 4 * 49 + 1
    assert Image.open(results / "figures" / "circles_samples.png").height == 3 * 49 + 1

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
    from perceptual_diffusion.checkpoint import list_checkpoints, read_meta

    rp = _load()
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--quick", "--tasks", "circles", "--artifact-tasks", "", "--seeds", "1", "--samples", "8", "--no-figures",
            "--work-dir", str(work), "--results-dir", str(results)]
    run = rp.Trainer.run
    monkeypatch.setattr(rp.Trainer, "run", lambda self, stop_after=None: run(self, stop_after=10))  # a preemption
    assert rp.main(args) == 130
    mse_dir = work / "circles" / "seed0" / "mse"
    (ckpt,) = list_checkpoints(mse_dir)
    meta = read_meta(ckpt)
    assert meta.stage_step == 10 and not meta.final
    assert not (results / "rows.jsonl").exists()
    wall = json.loads((mse_dir / "reproduce.json").read_text())["wall_s"]

    monkeypatch.undo()
    resumes = []
    init = rp.Trainer.__init__
    monkeypatch.setattr(rp.Trainer, "__init__", lambda self, recipe, run_dir, resume=None, progress=True: (
        resumes.append((Path(run_dir).name, resume)), init(self, recipe, run_dir, resume, progress))[1])
    assert rp.main(args) == 0
    assert resumes == [("mse", "latest"), ("sp", None), ("control", None)]
    steps = [json.loads(line)["stage_step"] for line in (mse_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]  # continued from step 10, nothing trained twice
    assert json.loads((mse_dir / "reproduce.json").read_text())["wall_s"] > wall  # wall time accumulates
    rows = [json.loads(line) for line in (results / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["variant"] for r in rows} == {"mse", "sp", "control"}


def test_seed_list_picks_the_training_seeds(tmp_path):
    rp = _load()
    cfg = rp.build_config(rp.parse_args(["--seed-list", "2,0", "--work-dir", str(tmp_path)]))
    assert cfg.seeds == [2, 0] and cfg.label == "full"
    assert rp.build_config(rp.parse_args(["--seeds", "2", "--work-dir", str(tmp_path)])).seeds == [0, 1]
    assert rp.build_config(rp.parse_args(["--work-dir", str(tmp_path)])).seeds == [0, 1, 2, 3]
    with pytest.raises(SystemExit):
        rp.parse_args(["--seed-list", "1,x"])
    with pytest.raises(SystemExit):
        rp.parse_args(["--jobs", "0"])


def test_sp_length_and_lr_name_their_runs_apart_and_share_the_bases(tmp_path):
    from perceptual_diffusion.config import load_recipe

    rp = _load()
    default = rp.build_config(rp.parse_args(["--work-dir", str(tmp_path)]))
    pilot = rp.build_config(rp.parse_args(["--work-dir", str(tmp_path), "--sp-steps", "300", "--sp-lr", "1e-3",
                                           "--sample-seed", "1"]))
    assert (default.label, pilot.label) == ("full", "full-sp300-splr0.001-noise1")
    assert set(pilot.sp_steps.values()) == {300} and pilot.mse_steps == default.mse_steps
    assert set(pilot.sp_lr.values()) == {1e-3} and default.sp_lr == rp.SCALES["full"].sp_lr
    assert pilot.sample_seed == 1 and default.sample_seed == rp.SAMPLE_SEED == 0
    # the MSE base is one run for both; SP, its variants and the control are named by the SP setting
    assert rp.run_dir_of(pilot, "digits", 2, "mse") == rp.run_dir_of(default, "digits", 2, "mse") \
        == tmp_path / "digits" / "seed2" / "mse"
    assert rp.run_dir_of(default, "digits", 2, "sp") == tmp_path / "digits" / "seed2" / "sp"
    for model in ("sp", "control", "layers_all"):
        assert rp.run_dir_of(pilot, "digits", 2, model).name == f"{model}-steps300-lr0.001"
    assert rp.row_key(pilot, rp.Unit("digits", "mse"), 0) != rp.row_key(default, rp.Unit("digits", "mse"), 0)
    # the lr reaches SP and, through the copied [sp] settings, the control; never the base
    recipe = rp.ROOT / rp.TASKS["digits"].recipe
    got = {m: load_recipe(recipe, rp.run_overrides(pilot, "digits", 2, m, None if m == "mse" else tmp_path))
           for m in ("mse", "sp", "control")}
    assert got["sp"].sp.lr == got["control"].mse.lr == 1e-3 and got["sp"].sp.steps == got["control"].mse.steps == 300
    assert got["control"].mse.init == got["sp"].sp.init == str(tmp_path.resolve())
    shipped = load_recipe(recipe)
    assert got["mse"].sp.lr == shipped.sp.lr and got["mse"].mse == load_recipe(
        recipe, rp.run_overrides(default, "digits", 2, "mse", None)).mse
    assert load_recipe(recipe, rp.run_overrides(default, "digits", 2, "sp", tmp_path)).sp.lr == (
        default.sp_lr["digits"] or shipped.sp.lr)
    for bad in (["--sp-steps", "-1"], ["--sp-lr", "-1e-4"], ["--sample-seed", "-2"]):
        with pytest.raises(SystemExit):
            rp.parse_args(bad)


def test_jobs_workers_run_the_same_configuration_on_their_seeds(tmp_path):
    rp = _load()
    args = rp.parse_args(["--quick", "--jobs", "2", "--samples", "12", "--tasks", "circles,digits",
                          "--ablation-tasks", "", "--scale-steps", "0.5", "--work-dir", str(tmp_path),
                          "--sp-steps", "7", "--sp-lr", "2e-4", "--sample-seed", "3"])
    cfg = rp.build_config(args)
    worker_args = rp.parse_args(rp.worker_argv(args, cfg, [1, 3]))
    worker = rp.build_config(worker_args)
    assert worker.seeds == [1, 3] and worker_args.jobs == 1 and worker_args.no_tables and worker_args.no_figures
    assert (worker_args.tasks, worker_args.ablation_tasks) == (["circles", "digits"], [])
    assert worker_args.artifact_tasks == args.artifact_tasks == ["circles", "digits"]
    for name in ("label", "mse_steps", "sp_steps", "samples", "sizes", "work_dir", "results_dir", "checkpoint_every",
                 "sp_lr", "sp_suffix", "sample_seed", "jobs"):
        assert getattr(worker, name) == getattr(cfg, name), name
    assert cfg.jobs == 2  # a worker's rows record that it was one of 2


def test_machine_line_says_how_the_rows_were_made():
    rp = _load()
    cfg = rp.build_config(rp.parse_args(["--quick", "--jobs", "2"]))
    assert "2 worker processes of 1 torch thread each" in rp.machine(cfg, [])  # rows from before the record
    made = [{"torch_threads": 1, "jobs": 2}, {"torch_threads": 1, "jobs": 2}]
    assert "2 worker processes of 1 torch thread each" in rp.machine(rp.build_config(rp.parse_args(["--quick"])), made)
    assert "1 process of 2 torch threads" in rp.machine(cfg, [{"torch_threads": 2, "jobs": 1}])
    assert "1/2 worker processes of 1/2 torch threads each" in rp.machine(
        cfg, [{"torch_threads": 1, "jobs": 2}, {"torch_threads": 2, "jobs": 1}])


@pytest.mark.slow
def test_quick_reproduction_of_the_video_and_audio_rows(tmp_path):
    rp = _load()
    results = tmp_path / "results"
    args = ["--quick", "--work-dir", str(tmp_path / "work"), "--results-dir", str(results),
            "--tasks", "moving_shapes,tones", "--ablation-tasks", ""]
    assert rp.main(args) == 0
    rows = [json.loads(line) for line in (results / "rows.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["variant"], r["seed"]) for r in rows) == sorted(
        (t, v, s) for t in ("moving_shapes", "tones") for v in ("mse", "sp", "control") for s in (0, 1))
    for r in rows:
        assert r["steps"] == 25 and r["eval"]["n"] == 24
        assert {c.key for c in rp.TASKS[r["task"]].columns} <= r["eval"].keys()
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



def test_verdicts_say_per_task_whether_sp_beats_its_control(tmp_path):
    rp = _load()
    cfg = rp.build_config(rp.parse_args(["--work-dir", str(tmp_path), "--results-dir", str(tmp_path / "results")]))
    tables = rp.plan_tables(["circles", "digits", "photo_patches", "moving_shapes"], [], [])
    rows = _fake_rows(rp, cfg, tables)  # SP 0.5, control 1 (+ seed / 100) on every metric
    for seed in cfg.seeds:  # photo_patches: SP 0.02 above the control in seed 0 and 1, below in 2 and 3
        rows[rp.row_key(cfg, rp.Unit("photo_patches", "sp"), seed)]["eval"]["patches_kid"] = \
            1.0 + seed / 100 + (0.02 if seed < 2 else -0.01)
    floors = {"digits": {"real": {"digits_fid": (3.0, 0.05)}}, "photo_patches": {"real": {"patches_kid": (0.0, 0.1)}}}
    lines = {line.split(" | ")[0][2:]: line for line in rp.render_verdicts(cfg, tables, rows, floors)
             if line.startswith("| ")}
    # circles' valid fraction ↑: SP's 0.5 below the control's 1 in every seed is worse; no floor given
    assert lines["circles"].startswith("| circles | valid ↑ | 2.01 ± 0.01 | 0.515 ± 0.013 | 1.02 ± 0.01 | "
                                       "-0.500 [-0.500, -0.500], 0/4 better | – | SP worse |")
    # digits-FID ↓: better, and the difference is far outside the floor's std
    assert "| -0.500 [-0.500, -0.500], 4/4 better | 3.00 ± 0.05 | SP better | 0.52 / 1.02 |" in lines["digits"]
    # a mixed sign is not resolved, and +0.005 is inside the floor's std of 0.1
    assert "| not resolved (inside the floor's std) |" in lines["photo_patches"]
    assert lines["moving_shapes"].endswith("| SP worse | – / – |")  # video rows have no spectrum
    # with one seed there is no verdict
    one = rp.build_config(rp.parse_args(["--work-dir", str(tmp_path), "--seed-list", "0"]))
    assert "| – (too few seeds) |" in "\n".join(rp.render_verdicts(one, tables, rows, floors))
    assert rp.render_verdicts(cfg, rp.plan_tables(["digits"], ["digits"], [])[1:], rows, floors) == []
