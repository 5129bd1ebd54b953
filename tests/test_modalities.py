"""Video and audio through the same trainer, sampler, CLI and evaluation as images: only the
backbone and the data change (issue: the objective is modality-agnostic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceptual_diffusion.audio import read_wav
from perceptual_diffusion.cli import main
from perceptual_diffusion.config import RecipeError, load_recipe
from perceptual_diffusion.datasets import build_dataset, sample_shape
from perceptual_diffusion.evaluation import evaluate, load_model
from perceptual_diffusion.media import save_samples
from perceptual_diffusion.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

# tiny versions of the shipped recipes: a few steps of both stages
TINY = {
    "video": ("recipes/video/moving_shapes.toml",
              ["data.frames=3", "data.num_items=16", "mse.batch_size=2", "sp.batch_size=2"]),
    "audio": ("recipes/audio/tones.toml",
              ["data.length=256", "data.num_items=16", "mse.batch_size=2", "sp.batch_size=2"]),
}
COMMON = ["mse.steps=2", "sp.steps=2", "train.sample_every=2", "train.checkpoint_every=0", "train.num_samples=8",
          "train.sample_steps=2", "mse.warmup_steps=0"]


def _train(tmp_path: Path, kind: str) -> Path:
    recipe, overrides = TINY[kind]
    run = tmp_path / kind
    result = Trainer(load_recipe(ROOT / recipe, overrides + COMMON), run, progress=False).run()
    assert [s.stage for s in result.stages] == ["mse", "sp"]
    return run


@pytest.mark.parametrize("recipe", ["recipes/video/moving_shapes.toml", "recipes/video/moving_shapes_uncond.toml",
                                    "recipes/audio/tones.toml", "recipes/audio/tones_uncond.toml"])
def test_shipped_recipes_build_their_data_and_model(recipe):
    r = load_recipe(ROOT / recipe)
    data = build_dataset(r.data)
    item = data[0]
    assert tuple(item["x"].shape) == sample_shape(r.data)
    assert ("label" in item) == r.data.conditional
    from perceptual_diffusion.builders import build_model

    net = build_model(r).eval()
    x = item["x"][None]
    with torch.no_grad():
        v = net(x, torch.tensor([500]), item["label"][None] if r.data.conditional else None)
    assert v.shape == x.shape and "mid" in net.feature_layers


def test_video_two_stages_write_strips_and_gifs_and_evaluate(tmp_path):
    run = _train(tmp_path, "video")
    samples = run / "samples"
    for name in ("mse-0000002", "sp-0000004", "mse_vs_sp"):
        with Image.open(samples / f"{name}.png") as im:
            assert im.size[0] > im.size[1] / 16  # frames run left to right
        with Image.open(samples / f"{name}.gif") as gif:
            assert gif.n_frames >= 1
    with Image.open(samples / "mse_vs_sp.png") as im:
        h = im.size[1]
    with Image.open(samples / "mse-0000002.png") as im:
        assert h > im.size[1]  # the comparison holds both models' clips
    summary = json.loads((run / "summary.json").read_text())
    assert [Path(p).suffix for p in summary["mse_vs_sp_files"]] == [".png", ".gif"]

    row = evaluate(load_model(run), ["moving_shapes"], n=4, steps=2)
    assert {"valid_fraction", "param_fd", "coverage", "label_accuracy"} <= set(row)
    assert 0.0 <= row["valid_fraction"] <= 1.0 and row["nfe"] == 2
    with pytest.raises(RecipeError, match="measure image samples.*makes video"):
        evaluate(load_model(run), ["circles"], n=2, steps=1)


def test_audio_two_stages_write_wavs_and_spectrograms_and_evaluate(tmp_path, capsys):
    run = _train(tmp_path, "audio")
    wav, rate = read_wav(run / "samples" / "mse_vs_sp.wav")
    assert rate == 8000 and wav.shape[0] == 1 and wav.shape[1] >= 16 * 256  # 16 clips and the silences
    with Image.open(run / "samples" / "mse_vs_sp.png") as im:
        assert im.mode == "RGB"

    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--metric", "tones", "--n", "8", "--steps", "2", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert {"valid_fraction", "pitch_error_cents", "pitch_tv", "label_accuracy"} <= set(row)

    png = tmp_path / "s" / "tones.png"
    assert main(["sample", str(run), "--n", "3", "--steps", "2", "--out", str(png)]) == 0
    wav, _ = read_wav(png.with_suffix(".wav"))
    assert wav.shape[1] >= 3 * 256
    assert png.exists() and png.with_suffix(".safetensors").exists()
    assert "tones.wav" in capsys.readouterr().out

    assert main(["evaluate", str(run), "--metric", "digits", "--n", "2", "--out", str(out)]) == 2
    assert "measure image samples" in capsys.readouterr().err


def test_save_samples_per_modality(tmp_path):
    g = torch.Generator().manual_seed(0)
    image = save_samples(torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, tmp_path / "i.png", "image", scale=1)
    video = save_samples(torch.rand(2, 1, 3, 8, 8, generator=g) * 2 - 1, tmp_path / "v.png", "video", scale=1)
    audio = save_samples(torch.rand(2, 1, 512, generator=g) * 2 - 1, tmp_path / "a.png", "audio", scale=1)
    assert [p.suffix for p in image] == [".png"]
    assert [p.suffix for p in video] == [".png", ".gif"]
    assert [p.suffix for p in audio] == [".png", ".wav"]
    with Image.open(video[0]) as im:
        strip = np.asarray(im)
    assert strip.shape[0] < strip.shape[1]  # 2 clips as rows, 3 frames as columns
    with Image.open(video[1]) as gif:
        assert gif.n_frames == 3
    with pytest.raises(ValueError, match="rank 5"):
        save_samples(torch.zeros(2, 1, 8, 8), tmp_path / "x.png", "video")
    with pytest.raises(ValueError, match="unknown modality"):
        save_samples(torch.zeros(2, 1, 8), tmp_path / "x.png", "text")


def test_data_errors_are_recipe_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = load_recipe(ROOT / "recipes/audio/tones.toml", ["data.name=audio_folder", f"data.path={json.dumps(str(empty))}"])
    with pytest.raises(RecipeError, match="data \\(audio_folder\\)"):
        Trainer(r, tmp_path / "run", progress=False)
    with pytest.raises(RecipeError, match="data.frames must be >= 2"):
        load_recipe(ROOT / "recipes/video/moving_shapes.toml", ["data.frames=1"])
