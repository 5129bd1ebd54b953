"""`data.scale`: the model trains on x * scale, and its samples are divided by scale before they
are scored or saved."""

import math
from pathlib import Path

import pytest
import torch

from backbones import ImageUNet
from perceptual_diffusion.builders import build_train_dataset, to_data
from perceptual_diffusion.cli import main
from perceptual_diffusion.config import RecipeError, recipe_from_dict
from perceptual_diffusion.datasets import ScaledDataset, build_dataset
from perceptual_diffusion.datasets.audio import TonesDataset
from perceptual_diffusion.evaluation import LoadedModel, generate


def test_scaled_dataset_multiplies_x_and_passes_the_rest():
    base = TonesDataset(num_items=8, length=256, conditional=True)
    scaled = ScaledDataset(base, 2.5)
    assert len(scaled) == 8
    for i in range(8):
        assert torch.equal(scaled[i]["x"], base[i]["x"] * 2.5)
        assert torch.equal(scaled[i]["label"], base[i]["label"])
    assert scaled.params is base.params  # attributes of the wrapped dataset pass through
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        ScaledDataset(base, 0.0)


def test_the_training_data_is_in_the_models_units():
    recipe = recipe_from_dict({"data": {"name": "tones", "length": 256, "num_items": 16, "scale": 3.0},
                               "model": {"backbone": "audio_dit"}})
    train, raw = build_train_dataset(recipe), build_dataset(recipe.data)
    assert torch.equal(train[5]["x"], raw[5]["x"] * 3.0)
    plain = recipe_from_dict({"data": {"name": "tones", "length": 256, "num_items": 16}, "model": {"backbone": "audio_dit"}})
    assert not isinstance(build_train_dataset(plain), ScaledDataset)  # scale 1: the dataset itself


@pytest.mark.parametrize("scale", [0, -1.0, math.nan, math.inf, True])
def test_a_bad_scale_is_one_line(scale):
    with pytest.raises(RecipeError, match=r"^data.scale must be a (finite number|float)"):
        recipe_from_dict({"data": {"scale": scale}})


def test_the_cli_refuses_a_bad_scale_with_exit_2(tmp_path, capsys):
    assert main(["train", "recipes/image/circles.toml", "--set", "data.scale=-2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.scale must be a finite number > 0, got -2" in err[0]


def test_a_latent_recipe_refuses_a_scale():
    with pytest.raises(RecipeError, match="data.scale scales pixel-space data"):
        recipe_from_dict({"data": {"name": "image_folder", "channels": 3, "path": "x", "scale": 2.0},
                          "model": {"backbone": "diffusers_unet", "latent": "some/model"}}, check_paths=False)


def test_samples_come_back_in_data_units():
    torch.manual_seed(0)
    net = ImageUNet.from_preset("tiny", in_channels=1)
    with torch.no_grad():
        for p in net.parameters():  # a net whose output is not zero
            p.add_(0.05 * torch.randn_like(p))
    net.eval()
    samples = {}
    for scale in (1.0, 4.0):
        recipe = recipe_from_dict({"data": {"name": "circles", "size": 16, "scale": scale}})
        loaded = LoadedModel(net, recipe, Path("ck"), "ema")
        samples[scale] = generate(loaded, n=3, steps=3, seed=7).samples
        assert torch.equal(to_data(recipe, None, samples[scale] * scale), samples[scale])
    # the same noise and net: only the division differs
    assert torch.allclose(samples[4.0] * 4.0, samples[1.0], atol=1e-6)
    assert not torch.allclose(samples[4.0], samples[1.0])
