"""The training engine end to end: both stages, exact resume, signals, non-finite handling,
corrupt data, bad input through the CLI, sampling (several processes: test_distributed.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from perceptual_diffusion.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from perceptual_diffusion.cli import main
from perceptual_diffusion.config import load_recipe
from perceptual_diffusion.builders import load_start
from perceptual_diffusion.trainer import NonFiniteError, Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """
name = "t"
seed = 3
[data]
name = "circles"
size = 16
num_items = 128
[model]
preset = "tiny"
[mse]
steps = 8
batch_size = 4
lr = 1e-3
cond_dropout = 0.0
[sp]
steps = 6
batch_size = 4
lr = 1e-4
[train]
log_every = 2
sample_every = 0
checkpoint_every = 3
keep_last = 2
num_samples = 4
sample_steps = 4
"""


@pytest.fixture()
def recipe_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    return path


def _cli(*args, timeout=240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "perceptual_diffusion.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _final_weights(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir)).weights


def test_two_stages_end_to_end(recipe_file, tmp_path):
    run = tmp_path / "run"
    result = Trainer(load_recipe(recipe_file), run, progress=False).run()
    assert [s.stage for s in result.stages] == ["mse", "sp"] and result.interrupted_by is None
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8, 10, 12, 14]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    assert {r["stage"] for r in lines} == {"mse", "sp"}
    # checkpoints at 3, 6, 8 (mse final), 11, 14 (sp final): rotation keeps the 2 newest
    # non-final ones and every stage-final one
    kept = [load_checkpoint(p) for p in list_checkpoints(run)]
    assert [c.step for c in kept] == [6, 8, 11, 14]
    assert [c.info.final for c in kept] == [False, True, False, True]
    # the perceptual net of stage 2 is the frozen EMA of the final stage-1 model
    mse_final, sp_final = kept[1].weights, kept[3].weights
    for name, tensor in mse_final["ema"].items():
        assert torch.equal(sp_final["perceptual"][name], tensor)
    assert not all(torch.equal(sp_final["model"][n], mse_final["model"][n]) for n in mse_final["model"])
    assert load_recipe(run / "recipe.toml") == load_recipe(recipe_file)
    summary = json.loads((run / "summary.json").read_text())
    assert Path(summary["mse_vs_sp"]).is_file()
    assert Image.open(summary["mse_vs_sp"]).size[0] > 4 * 16


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_sp_starts_from_the_frozen_weights_or_the_chosen_ones(recipe_file, tmp_path):
    base = tmp_path / "base"
    Trainer(load_recipe(recipe_file, ["train.stages=['mse']"]), base, progress=False).run()
    stage1 = load_checkpoint(latest_checkpoint(base)).weights
    assert not _same(stage1["model"], stage1["ema"])
    for which, perceptual in [("frozen", "ema"), ("frozen", "online"), ("online", "ema"), ("ema", "online")]:
        recipe = load_recipe(recipe_file, ["train.stages=['sp']", f"sp.init='{base}'", f"sp.init_weights='{which}'",
                                           f"sp.perceptual_weights='{perceptual}'", "sp.steps=1"])
        trainer = Trainer(recipe, tmp_path / f"sp-{which}-{perceptual}", progress=False)
        st = trainer._setup("sp", None)
        model, frozen = trainer.engine.online, st.perceptual
        start = perceptual if which == "frozen" else which  # Algorithm 1: the copy that is frozen
        assert _same(model.state_dict(), stage1["model" if start == "online" else "ema"])
        assert _same(frozen.state_dict(), stage1["model" if perceptual == "online" else "ema"])
    assert load_recipe(recipe_file).sp.init_weights == "frozen"  # the default


def test_mse_init_is_the_matched_control_of_sp(recipe_file, tmp_path, monkeypatch):
    """train.stages=['mse'] with mse.init continues MSE from the same start, with the same seed
    (data order and noise generator) as the SP stage that starts from that checkpoint."""
    import perceptual_diffusion.trainer as trainer_module

    base = tmp_path / "base"
    Trainer(load_recipe(recipe_file, ["train.stages=['mse']"]), base, progress=False).run()
    start = latest_checkpoint(base)
    orders = {}

    class Recording(trainer_module.ResumableBatchSampler):  # notes the first epoch's order
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            orders.setdefault(run_name, self.permutation(0).tolist())

    monkeypatch.setattr(trainer_module, "ResumableBatchSampler", Recording)
    same = ["mse.lr=1e-4", "mse.steps=4", "mse.warmup_steps=0", "mse.cond_dropout=0.0"]
    runs = {"control": ["train.stages=['mse']", f"mse.init='{start}'", *same],
            "sp": ["train.stages=['sp']", f"sp.init='{start}'", "sp.steps=4"],
            "scratch": ["train.stages=['mse']", *same]}
    for run_name, sets in runs.items():
        trainer = Trainer(load_recipe(recipe_file, sets), tmp_path / run_name, progress=False)
        if run_name == "control":
            first = trainer._new_model()
            load_start(first, "mse", start, "ema")
            assert _same(first.state_dict(), load_checkpoint(start).weights["ema"])
        trainer.run()
    ran = load_checkpoint(latest_checkpoint(tmp_path / "control"))
    assert ran.stage == "mse" and ran.step == 4
    assert not _same(ran.weights["model"], load_checkpoint(start).weights["ema"])  # it trained
    # the control sees the SP stage's batches in the same order; a run from scratch does not
    assert orders["control"] == orders["sp"] != orders["scratch"]


def test_mse_init_that_does_not_fit_is_one_line(recipe_file, tmp_path, capsys):
    other = tmp_path / "other"
    Trainer(load_recipe(recipe_file, ["train.stages=['mse']", "mse.steps=1", "model.preset='default'"]), other,
            progress=False).run()
    code = main(["train", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", "train.stages=['mse']", "--set", f"mse.init={other}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"perceptual-diffusion: error: mse.init: the ema weights of {other}")
    assert "do not fit this recipe's model" in err[0]


@pytest.mark.parametrize("sets", [[], ["mse.decay_steps=3", "mse.warmup_steps=0"]], ids=["constant", "decay"])
def test_exact_resume_bit_for_bit(recipe_file, tmp_path, sets):
    recipe = load_recipe(recipe_file, sets)
    Trainer(recipe, tmp_path / "a", progress=False).run()
    b = tmp_path / "b"
    assert Trainer(recipe, b, progress=False).run(stop_after=4).stopped_at == 4          # inside stage mse
    assert Trainer(recipe, b, resume="latest", progress=False).run(stop_after=10).stopped_at == 10  # inside sp
    Trainer(recipe, b, resume="latest", progress=False).run()
    wa, wb = _final_weights(tmp_path / "a"), _final_weights(b)
    assert set(wa) == set(wb) == {"model", "ema", "perceptual"}
    for k in wa:
        assert all(torch.equal(wa[k][n], wb[k][n]) for n in wa[k]), k
    # stage 1 ended in an earlier process: the MSE-vs-SP grid still shows both models
    assert Path(json.loads((b / "summary.json").read_text())["mse_vs_sp"]).is_file()
    if sets:  # the resumed run logged the decayed lr for the last 3 of stage mse's 8 steps
        rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
        lrs = {r["stage_step"]: r["lr"] for r in rows if r.get("stage") == "mse" and "lr" in r}
        assert lrs[4] == pytest.approx(recipe.mse.lr) and lrs[6] == lrs[8] == pytest.approx(0.1 * recipe.mse.lr)


def test_nonfinite_stops_and_keeps_last_good_checkpoint(recipe_file, tmp_path):
    # lr 1e30 blows the weights up after the first step: the loss of step 2 is not finite
    recipe = load_recipe(recipe_file, ["mse.lr=1e30", "train.checkpoint_every=1", "mse.grad_clip=0"])
    with pytest.raises(NonFiniteError, match=r"non-finite loss at mse step 2 \(global step 2\)"):
        Trainer(recipe, tmp_path / "run", progress=False).run()
    (good,) = list_checkpoints(tmp_path / "run")
    assert load_checkpoint(good).step == 1

    skip = load_recipe(recipe_file, ["mse.lr=1e30", "mse.grad_clip=0", "train.stages=['mse']",
                                     "train.nonfinite=skip"])
    result = Trainer(skip, tmp_path / "skip", progress=False).run()
    assert result.stages[0].skipped_nonfinite == 7


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_checkpoint_and_exits_then_resumes(recipe_file, tmp_path, signum, code):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "perceptual_diffusion.cli", "train", str(recipe_file), "--out", str(run),
           "--no-progress", "--set", "mse.steps=100000", "--set", "train.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:  # training has started
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"interrupted by signal {int(signum)}" in err
    (ck,) = list_checkpoints(run)
    stopped = load_checkpoint(ck)
    assert stopped.stage == "mse" and not stopped.info.final and stopped.step >= 2
    done = _cli("train", recipe_file, "--out", run, "--no-progress", "--resume", "latest",
                "--set", f"mse.steps={stopped.step + 2}")
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(latest_checkpoint(run)).stage == "sp"


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        Image.new("L", (20, 24), color=20 * i).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(RECIPE.replace('name = "circles"', f'name = "image_folder"\npath = "{folder}"'))
    recipe = load_recipe(recipe_path, ["train.stages=['mse']", "mse.steps=6"])
    result = Trainer(recipe, tmp_path / "run", progress=False).run()
    # 6 steps x 4 of 11 items: 2 full epochs + 2 batches; the broken file appears once per epoch
    assert result.stages[0].skipped_items >= 2


@pytest.mark.parametrize("args, message", [
    (["--set", "mse.learning_rate=1"], "unknown key 'mse.learning_rate'; did you mean 'mse.lr'?"),
    (["--set", "mse.steps=ten"], "mse.steps must be an int"),
    (["--set", "sp.t_prime=gaussian"], "sp.t_prime"),
    (["--set", "model.preset=huge"], "unknown ImageUNet preset 'huge'"),
    (["--resume", "latest"], "no complete checkpoint"),
    (["--set", "train.stages=['mse']", "--set", "mse.init=runs/nowhere"], "mse.init 'runs/nowhere' does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(recipe_file, tmp_path, args, message, capsys):
    code = main(["train", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_errors_for_files(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not found" in capsys.readouterr().err


def test_sample_command_and_guidance_rules(recipe_file, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(load_recipe(recipe_file, ["train.stages=['mse']", "mse.steps=2"]), run, progress=False).run()
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--n", "3", "--steps", "4", "--out", str(out)]) == 0
    from safetensors.torch import load_file

    tensors = load_file(str(out.with_suffix(".safetensors")))
    assert tensors["samples"].shape == (3, 1, 16, 16) and Image.open(out).size == (2 * 16 * 2 + 3, 2 * 16 * 2 + 3)
    assert main(["sample", str(run), "--guidance", "3", "--out", str(out)]) == 2
    assert "class-conditional" in capsys.readouterr().err


def test_recipes_command_lists_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("image/circles.toml", "image/digits.toml", "image/digits_uncond.toml"):
        assert name in out
