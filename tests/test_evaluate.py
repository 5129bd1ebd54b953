"""`perceptual-diffusion evaluate` end to end on tiny checkpoints."""

import json
import math

import pytest
import torch

from perceptual_diffusion.cli import main
from perceptual_diffusion.config import RecipeError, load_recipe
from perceptual_diffusion.trainer import Trainer

RECIPE = """
name = "e"
[data]
name = "{name}"
size = 16
num_items = 64
conditional = {conditional}
[model]
preset = "tiny"
[mse]
steps = 2
batch_size = 4
lr = 1e-3
[train]
stages = ["mse"]
sample_every = 0
checkpoint_every = 0
num_samples = 2
sample_steps = 2
"""


def _train(tmp_path, name="circles", conditional="false"):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(name=name, conditional=conditional))
    Trainer(load_recipe(path), tmp_path / "run", progress=False).run()
    return tmp_path / "run"


def test_evaluate_circles_writes_json_and_prints_one_row(tmp_path, capsys):
    run = _train(tmp_path)
    capsys.readouterr()  # what training printed (DeepSpeed's accelerator warning, when imported first)
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--metric", "circles", "--n", "6", "--steps", "3", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert (row["n"], row["steps"], row["nfe"], row["guidance"], row["rescale"], row["seed"]) == (6, 3, 3, 1.0, 0.0, 0)
    assert 0.0 <= row["valid_fraction"] <= 1.0 and {"param_fd", "coverage", "num_valid"} <= set(row)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "valid_fraction" in printed[0] and "nfe 3" in printed[0]


def test_evaluate_digits_with_guidance_doubles_nfe(tmp_path, monkeypatch):
    monkeypatch.setenv("PERCEPTUAL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    run = _train(tmp_path, "digits", "true")
    out = tmp_path / "eval.json"
    args = ["evaluate", str(run), "--metric", "digits", "--n", "10", "--steps", "2", "--guidance", "2",
            "--rescale", "0.7", "--out", str(out)]
    assert main(args) == 0
    row = json.loads(out.read_text())
    assert row["nfe"] == 4 and row["guidance"] == 2.0 and row["rescale"] == 0.7
    assert {"digits_fid", "digits_is", "label_accuracy"} <= set(row) and row["digits_fid"] > 0
    assert row["digits_kid_se"] > 0 and row["digits_kid"] > 3 * row["digits_kid_se"]   # 2-step noise is far off


def test_evaluate_spectrum_against_the_recipe_data(tmp_path):
    run = _train(tmp_path)
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--metric", "spectrum", "--metric", "circles", "--n", "6", "--steps", "2",
                 "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert {f"spectrum_log_ratio_{b}" for b in range(4)} | {"valid_fraction"} <= set(row)
    # an undertrained model's samples are noise: far more high-frequency energy than solid disks
    assert row["spectrum_hf_ratio"] > 2


@pytest.mark.parametrize("args, message", [
    (["--metric", "inception"], "pt_inception-2015-12-05-6726825d.pth"),
    (["--metric", "lpips"], "unknown metric(s) lpips"),
    (["--metric", "circles", "--guidance", "3"], "class-conditional"),
    (["--metric", "circles", "--steps", "5000"], "steps must be in [1, 1000]"),
])
def test_evaluate_bad_input_exits_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("PERCEPTUAL_DIFFUSION_WEIGHTS", str(tmp_path / "no-weights-here"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    run = _train(tmp_path)
    code = main(["evaluate", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "e.json"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluate_inception_with_a_local_weights_file(tmp_path):
    """The FID/IS path end to end with randomly initialised Inception weights (the real file
    cannot be downloaded here): numbers are meaningless, the plumbing and caching are not."""
    import torch

    from perceptual_diffusion.metrics.inception import InceptionV3FID

    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.manual_seed(0)
    torch.save(InceptionV3FID().state_dict(), weights)
    run = _train(tmp_path)
    out = tmp_path / "e.json"
    args = ["evaluate", str(run), "--metric", "inception", "--n", "4", "--steps", "2",
            "--inception-weights", str(weights), "--out", str(out)]
    assert main(args) == 0
    row = json.loads(out.read_text())
    assert row["fid"] >= 0 and 1.0 <= row["is"] <= 1008 and row["kid_se"] > 0 and math.isfinite(row["kid"])
    assert (run / "fid_reference.safetensors").is_file()
    assert main(args) == 0
    again = json.loads(out.read_text())   # from the cached reference, features included
    assert (again["fid"], again["kid"]) == pytest.approx((row["fid"], row["kid"]))


def test_evaluate_the_online_weights(tmp_path):
    run = _train(tmp_path)
    out = tmp_path / "online.json"
    assert main(["evaluate", str(run), "--metric", "circles", "--n", "2", "--steps", "2", "--weights", "online",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["weights"] == "online"
    from perceptual_diffusion.evaluation import load_model

    ema, online = load_model(run), load_model(run, weights="online")
    assert any(not torch.equal(a, b) for a, b in zip(ema.model.parameters(), online.model.parameters()))
    with pytest.raises(RecipeError, match=r"has no 'perceptual' weights \(it has online, ema\)"):
        load_model(run, weights="perceptual")
