"""Recipes: the shipped TOML files, --set overrides, validation messages, save/load round trips."""

from __future__ import annotations

import datetime
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from perceptual_diffusion.config import (
    Recipe,
    RecipeError,
    apply_override,
    list_recipes,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    save_recipe,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.toml") if "accelerate" not in p.parts)
CIRCLES = REPO / "recipes" / "image" / "circles.toml"


def recipe_with(*overrides: str) -> Recipe:
    """The default recipe with --set overrides applied (no file involved)."""
    d: dict = {}
    for item in overrides:
        apply_override(d, item)
    return recipe_from_dict(d)


def error_of(*overrides: str) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_with(*overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def subset_equal(raw: dict, full: dict) -> None:
    """Every key/value of the parsed TOML `raw` is in `full` (the resolved recipe as a dict)."""
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(full[key], dict) and key != "overrides":
            subset_equal(value, full[key])
        else:
            assert full[key] == value, key


# ---------------------------------------------------------------------------------- shipped recipes
def test_the_image_recipes_ship():
    names = {p.relative_to(REPO).as_posix() for p in SHIPPED}
    assert {"recipes/image/circles.toml", "recipes/image/digits.toml", "recipes/image/digits_uncond.toml"} <= names


@pytest.fixture
def stage1_runs(tmp_path, monkeypatch):
    """The stage-1 runs the stage-2 recipes name in sp.init (relative to the working directory)."""
    monkeypatch.chdir(tmp_path)
    for path in SHIPPED:
        init = tomllib.loads(path.read_text(encoding="utf-8")).get("sp", {}).get("init")
        if init:
            Path(init).mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_shipped_recipe_loads_with_the_values_it_states(path, stage1_runs):
    r = load_recipe(path)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    subset_equal(raw, recipe_to_dict(r))
    assert path.read_text(encoding="utf-8").startswith("# ")  # its description for `recipes`


def test_circles_recipe_is_the_cpu_main_job():
    r = load_recipe(CIRCLES)
    assert (r.data.name, r.data.size, r.data.channels, r.data.conditional) == ("circles", 32, 1, False)
    assert (r.model.backbone, r.model.preset) == ("image_unet", "tiny")
    assert (r.schedule.kind, r.schedule.zero_terminal_snr) == ("scaled_linear", True)
    assert r.train.stages == ("mse", "sp")
    assert (r.mse.lr, r.sp.lr) == (1e-3, 1e-4)
    for stage in (r.mse, r.sp):
        assert (stage.ema_decay, stage.ema_warmup, stage.cond_dropout) == (0.999, True, 0.0)
    assert r.train.sample_every == r.train.checkpoint_every > 0
    assert r.train.keep_last == 2
    # the budget written in the file: ~0.35 s per MSE step at 32x32 batch 16, SP ~1.4x
    assert r.mse.batch_size == r.sp.batch_size == 16 and r.mse.grad_accum == r.sp.grad_accum == 1
    seconds = 0.35 * (r.mse.steps + 1.4 * r.sp.steps)
    assert 7 * 60 <= seconds <= 11 * 60  # + sample grids and checkpoints: 8-12 minutes


def test_digits_recipes_differ_only_in_the_condition():
    cond = recipe_to_dict(load_recipe(REPO / "recipes/image/digits.toml"))
    uncond = recipe_to_dict(load_recipe(REPO / "recipes/image/digits_uncond.toml"))
    assert (cond["data"]["name"], cond["data"]["conditional"], cond["data"]["channels"]) == ("digits", True, 1)
    assert (cond["mse"]["cond_dropout"], cond["sp"]["cond_dropout"]) == (0.1, 0.0)
    assert (uncond["data"]["conditional"], uncond["mse"]["cond_dropout"]) == (False, 0.0)
    for d in (cond, uncond):
        d.pop("name")
        d["data"].pop("conditional")
        d["mse"].pop("cond_dropout")
        d["train"].pop("num_samples")
    assert cond == uncond


# ---------------------------------------------------------------------------------- overrides
@pytest.mark.parametrize(
    "item, get, expected",
    [
        ("mse.lr=1e-4", lambda r: r.mse.lr, 1e-4),                      # float
        ("mse.lr=1", lambda r: r.mse.lr, 1.0),                           # int accepted as float
        ("mse.steps=12", lambda r: r.mse.steps, 12),
        ('train.stages=["sp"]', lambda r: r.train.stages, ("sp",)),      # list
        ("mse.adam_betas=[0.5, 0.9]", lambda r: r.mse.adam_betas, (0.5, 0.9)),
        ("model.overrides.base_channels=32", lambda r: r.model.overrides["base_channels"], 32),  # nested
        ("model.overrides.channel_mult=[1, 2, 2]", lambda r: r.model.overrides["channel_mult"], [1, 2, 2]),
        ("model.overrides={groups = 4}", lambda r: r.model.overrides, {"groups": 4}),
        ("sp.layers=encoder", lambda r: r.sp.layers, "encoder"),         # bare word
        ("sp.layers=encoder+mid", lambda r: r.sp.layers, "encoder+mid"),
        ("sp.layers=down.1", lambda r: r.sp.layers, "down.1"),
        ('name="my run"', lambda r: r.name, "my run"),                   # quoted string
        ("name=2024", lambda r: r.name, "2024"),                         # a string field keeps the text
        ("sp.t_prime = near", lambda r: r.sp.t_prime, "near"),
        ("mse.ema_warmup=false", lambda r: r.mse.ema_warmup, False),     # bool
        ("train.compile=true", lambda r: r.train.compile, True),
        ("data.conditional=true", lambda r: r.data.conditional, True),
        ("train.divergence=off", lambda r: r.train.divergence, "off"),
        ("train.divergence_factor=3", lambda r: r.train.divergence_factor, 3.0),  # int accepted as float
        ("train.divergence_window=100", lambda r: r.train.divergence_window, 100),
    ],
)
def test_override_applies(item, get, expected):
    init = ["sp.init=" + str(REPO)] if "stages" in item else []  # an SP-only run needs a checkpoint
    r = load_recipe(CIRCLES, [item, *init])
    value = get(r)
    assert value == expected and type(value) is type(expected)
    untouched = load_recipe(CIRCLES)
    assert r != untouched


def test_quoted_keys_in_overrides():
    r = recipe_with('model.overrides."a.b"=1', "model.overrides.c.d=2")
    assert r.model.overrides == {"a.b": 1, "c": {"d": 2}}


def test_every_choice_of_the_library_is_a_valid_recipe_value():
    from perceptual_diffusion import denoiser, objectives, schedule

    for field, choices in [("sp.t_prime", objectives.T_PRIME_MODES), ("sp.distance", objectives.DISTANCES),
                           ("sp.formulation", objectives.FORMULATIONS), ("sp.layers", denoiser.LAYER_GROUPS),
                           ("schedule.kind", schedule.SCHEDULE_KINDS)]:
        for choice in choices:
            assert recipe_to_dict(load_recipe(CIRCLES, [f"{field}={choice}"]))[field.split(".")[0]][
                field.split(".")[1]] == choice


def test_later_override_wins_and_file_values_are_kept():
    r = load_recipe(CIRCLES, ["mse.lr=1e-4", "mse.lr=2e-4"])
    assert r.mse.lr == 2e-4
    assert r.sp.lr == 1e-4 and r.mse.steps == load_recipe(CIRCLES).mse.steps


def test_override_with_spaces_and_empty_values_become_strings(tmp_path):
    folder = tmp_path / "my images"
    folder.mkdir()
    r = load_recipe(CIRCLES, ["data.name=image_folder", f"data.path={folder}", "sp.init="])
    assert (r.data.path, r.sp.init) == (str(folder), "")


@pytest.mark.parametrize(
    "item, message",
    [
        ("mse.lr", "override 'mse.lr' must look like key=value, e.g. mse.lr=1e-4"),
        ("=3", "override '=3' must look like key=value, e.g. mse.lr=1e-4"),
        ("mse..lr=3", "override 'mse..lr=3' must look like key=value, e.g. mse.lr=1e-4"),
        ("mse.learning_rate=1e-4", "unknown key 'mse.learning_rate'; did you mean 'mse.lr'?"),
        ("mse.lr.x=1", "cannot set 'mse.lr.x': 'mse.lr' is not a table"),
        ("mse.steps=ten", "mse.steps must be an int, got str 'ten'"),
        ("mse=3", "mse must be a table, got int 3"),
    ],
)
def test_bad_override_is_one_clear_line(item, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(CIRCLES, [item])
    assert str(info.value) == message


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seed=-1"], "seed must be >= 0, got -1"),
        (["mse.steps=0"], "mse.steps must be >= 1, got 0"),
        (["sp.steps=0"], "sp.steps must be >= 1, got 0"),
        (["mse.batch_size=0"], "mse.batch_size must be >= 1, got 0"),
        (["sp.grad_accum=0"], "sp.grad_accum must be >= 1, got 0"),
        (["mse.lr=0"], "mse.lr must be > 0, got 0.0"),
        (["sp.lr=-1e-4"], "sp.lr must be > 0, got -0.0001"),
        (["mse.cond_dropout=1"], "mse.cond_dropout must be in [0, 1), got 1.0"),
        (["sp.cond_dropout=-0.1"], "sp.cond_dropout must be in [0, 1), got -0.1"),
        (["mse.ema_decay=1"], "mse.ema_decay must be in (0, 1), got 1.0"),
        (["sp.ema_decay=0"], "sp.ema_decay must be in (0, 1), got 0.0"),
        (["mse.grad_clip=-1"], "mse.grad_clip must be >= 0, got -1.0"),
        (["mse.weight_decay=-0.1"], "mse.weight_decay must be >= 0, got -0.1"),
        (["sp.warmup_steps=-1"], "sp.warmup_steps must be >= 0, got -1"),
        (["mse.adam_betas=[0.9, 1.0]"], "mse.adam_betas[1] must be in [0, 1), got 1.0"),
        (["sp.adam_betas=[-0.1, 0.9]"], "sp.adam_betas[0] must be in [0, 1), got -0.1"),
        (["mse.adam_betas=[0.9]"], "mse.adam_betas must be a list of 2 floats, got list [0.9]"),
        (["data.size=4"], "data.size must be >= 8, got 4"),
        (["data.channels=2"], "data.channels must be one of 1, 3, got 2"),
        (["data.num_items=0"], "data.num_items must be >= 1, got 0"),
        (["data.num_workers=-1"], "data.num_workers must be >= 0, got -1"),
        (["data.name=mnist"], "data.name must be one of 'circles', 'digits', 'photo_patches', 'image_folder', "
                               "'shards', 'moving_shapes', 'video_folder', 'tones', 'audio_folder', got 'mnist'"),
        (["data.name=tones", "data.channels=3"], "data.channels must be one of 1, 2, got 3"),
        (["data.name=moving_shapes", "data.channels=2"], "data.channels must be one of 1, 3, got 2"),
        (["data.frames=0"], "data.frames must be >= 1, got 0"),
        (["data.name=circle"], "data.name must be one of 'circles', 'digits', 'photo_patches', 'image_folder', "
                               "'shards', 'moving_shapes', 'video_folder', 'tones', 'audio_folder', got 'circle'; "
                               "did you mean 'circles'?"),
        (["model.backbone=dit"], "model.backbone must be one of 'image_unet', 'video_unet', 'audio_dit', "
                                       "'image_dit', 'diffusers_unet', got 'dit'"),
        (["schedule.kind=sigmoid"], "schedule.kind must be one of 'linear', 'scaled_linear', 'cosine', "
                                    "got 'sigmoid'"),
        (["schedule.num_timesteps=1"], "schedule.num_timesteps must be >= 2, got 1"),
        (["schedule.beta_start=0"], "schedule.beta_start must be in (0, 1), got 0.0"),
        (["schedule.beta_end=1"], "schedule.beta_end must be in [schedule.beta_start = 0.00085, 1), got 1.0"),
        (["schedule.beta_start=0.02"], "schedule.beta_end must be in [schedule.beta_start = 0.02, 1), got 0.012"),
        (["sp.init_weights=best"], "sp.init_weights must be one of 'frozen', 'online', 'ema', got 'best'"),
        (["mse.init_weights=frozen"], "mse.init_weights must be one of 'online', 'ema', got 'frozen'"),
        (["sp.perceptual_weights=frozen"], "sp.perceptual_weights must be one of 'online', 'ema', got 'frozen'"),
        (["sp.perceptual_dtype=fp64"], "sp.perceptual_dtype must be one of 'auto', 'fp32', 'bf16', 'fp16', "
                                       "got 'fp64'"),
        (["sp.t_prime=far"], "sp.t_prime must be one of 'uniform', 'near', 'normal', got 'far'"),
        (["sp.distance=l1"], "sp.distance must be one of 'mse', 'mae', got 'l1'"),
        (["sp.formulation=sp3"], "sp.formulation must be one of 'sp', 'sp2', got 'sp3'; did you mean 'sp'?"),
        (["sp.layers=middle"], "sp.layers must be one of 'mid', 'encoder', 'decoder', 'encoder+mid', 'all' "
                               "or a tap name like 'down.0' or 'up.1', got 'middle'"),
        (["sp.layers=down.x"], "sp.layers must be one of 'mid', 'encoder', 'decoder', 'encoder+mid', 'all' "
                               "or a tap name like 'down.0' or 'up.1', got 'down.x'"),
        (["sp.mse_weight=-1"], "sp.mse_weight must be >= 0, got -1.0"),
        (["sp.near_offset=-1"], "sp.near_offset must be >= 0, got -1"),
        (["sp.normal_std=0"], "sp.normal_std must be > 0, got 0.0"),
        (["train.mixed_precision=fp8"], "train.mixed_precision must be one of 'no', 'fp16', 'bf16', got 'fp8'"),
        (["train.nonfinite=ignore"], "train.nonfinite must be one of 'stop', 'skip', got 'ignore'"),
        (["train.divergence=skip"], "train.divergence must be one of 'stop', 'warn', 'off', got 'skip'"),
        (["train.divergence_factor=1"], "train.divergence_factor must be > 1, got 1.0"),
        (["train.divergence_window=1"], "train.divergence_window must be >= 2, got 1"),
        (["train.divergence_window=5.0"], "train.divergence_window must be an int, got float 5.0"),
        (["train.log_every=0"], "train.log_every must be >= 1, got 0"),
        (["train.sample_every=-1"], "train.sample_every must be >= 0, got -1"),
        (["train.checkpoint_every=-1"], "train.checkpoint_every must be >= 0, got -1"),
        (["train.keep_last=0"], "train.keep_last must be >= 1, got 0"),
        (["train.num_samples=0"], "train.num_samples must be >= 1, got 0"),
        (["train.sample_steps=0"], "train.sample_steps must be in [1, schedule.num_timesteps = 1000], got 0"),
        (["schedule.num_timesteps=50", "train.sample_steps=51"],
         "train.sample_steps must be in [1, schedule.num_timesteps = 50], got 51"),
    ],
)
def test_validation_rule(overrides, message):
    assert error_of(*overrides) == message


@pytest.mark.parametrize("stages", ["[]", '["sp", "mse"]', '["mse", "mse"]', '["mse", "ema"]'])
def test_stages_must_be_mse_then_sp(stages):
    message = error_of(f"train.stages={stages}", f"sp.init={REPO}")
    assert message.startswith("train.stages must be a non-empty list drawn from ['mse', 'sp'] in that order")


def test_sp_only_run_needs_an_existing_stage1_checkpoint(tmp_path):
    message = error_of('train.stages=["sp"]')
    assert message.startswith("sp.init must name a stage-1 checkpoint") and "SP-only run" in message
    missing = tmp_path / "no-such-checkpoint"
    assert error_of('train.stages=["sp"]', f"sp.init={missing}") == (
        f"sp.init '{missing}' does not exist (it should be a stage-1 checkpoint)"
    )
    assert error_of(f"sp.init={missing}").startswith("sp.init '")  # also when stage mse comes first
    assert recipe_with('train.stages=["sp"]', f"sp.init={tmp_path}").sp.init == str(tmp_path)
    assert recipe_with('train.stages=["mse"]', f"sp.init={missing}").train.stages == ("mse",)


def test_check_paths_false_accepts_a_stored_recipe_whose_paths_moved(tmp_path):
    d = {"data": {"name": "image_folder", "path": str(tmp_path / "gone")},
         "sp": {"init": str(tmp_path / "gone-too")}, "train": {"stages": ["sp"]}}
    with pytest.raises(RecipeError, match="data.path"):
        recipe_from_dict(d)
    r = recipe_from_dict(d, check_paths=False)
    assert (r.data.path, r.sp.init) == (str(tmp_path / "gone"), str(tmp_path / "gone-too"))
    with pytest.raises(RecipeError, match="mse.steps must be >= 1"):  # everything else still checked
        recipe_from_dict({**d, "mse": {"steps": 0}}, check_paths=False)


def test_image_folder_needs_an_existing_directory(tmp_path):
    assert error_of("data.name=image_folder") == (
        "data.path must name a folder of images when data.name is 'image_folder'"
    )
    missing = tmp_path / "faces"
    assert error_of("data.name=image_folder", f"data.path={missing}") == (
        f"data.path '{missing}' is not an existing directory (data.name = 'image_folder')"
    )
    missing.mkdir()
    assert recipe_with("data.name=image_folder", f"data.path={missing}").data.path == str(missing)


@pytest.mark.parametrize(
    "overrides",
    [
        ["sp.layers=up.0"], ["sp.layers=all"], ["sp.layers=decoder"], ['train.stages=["mse"]'],
        ["train.sample_every=0", "train.checkpoint_every=0"], ["mse.cond_dropout=0"], ["mse.grad_clip=0"],
        ["mse.adam_betas=[0, 0.999]"], ["schedule.beta_start=0.012"], ["train.sample_steps=1000"],
        ["data.name=photo_patches", "data.channels=3"], ["data.size=8"],
        ["schedule.num_timesteps=2", "train.sample_steps=2"],
        ["model.overrides.not_a_field_here=1"],  # the backbone checks its own keys
    ],
)
def test_boundary_values_are_accepted(overrides):
    assert isinstance(recipe_with(*overrides), Recipe)


# ---------------------------------------------------------------------------------- keys and types
@pytest.mark.parametrize(
    "d, message",
    [
        ({"mse": {"learning_rate": 1e-4}}, "unknown key 'mse.learning_rate'; did you mean 'mse.lr'?"),
        ({"train": {"checkpoint_evry": 1}},
         "unknown key 'train.checkpoint_evry'; did you mean 'train.checkpoint_every'?"),
        ({"sp": {"layer": "mid"}}, "unknown key 'sp.layer'; did you mean 'sp.layers'?"),
        ({"mse": {"layers": "mid"}}, "unknown key 'mse.layers'; did you mean 'sp.layers'?"),
        ({"lr": 1e-4}, "unknown key 'lr'; did you mean 'mse.lr' or 'sp.lr'?"),
        ({"shedule": {}}, "unknown key 'shedule'; did you mean 'schedule'?"),
        ({"optimizer": {}}, "unknown key 'optimizer'; valid keys: name, seed, data, model, schedule, mse, sp, train"),
        ({"data": {"zzz": 1}}, "unknown key 'data.zzz'; valid keys in data: name, size, channels, frames, "
                               "length, sample_rate, num_items, path, conditional, min_size, min_aesthetic, "
                               "caption_key, empty_captions, num_workers, seed, scale"),
    ],
)
def test_unknown_key_names_it_and_suggests(d, message):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(d)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "d, message",
    [
        ({"mse": {"steps": "ten"}}, "mse.steps must be an int, got str 'ten'"),
        ({"mse": {"steps": True}}, "mse.steps must be an int, got bool True"),
        ({"mse": {"steps": 1.5}}, "mse.steps must be an int, got float 1.5"),
        ({"mse": {"lr": "fast"}}, "mse.lr must be a float, got str 'fast'"),
        ({"mse": {"lr": True}}, "mse.lr must be a float, got bool True"),
        ({"mse": {"lr": float("inf")}}, "mse.lr must be a finite number, got inf"),
        ({"sp": {"ema_warmup": 1}}, "sp.ema_warmup must be a bool (true or false), got int 1"),
        ({"data": {"name": 3}}, "data.name must be a string, got int 3"),
        ({"train": {"stages": "mse"}}, "train.stages must be a list of strings, got str 'mse'"),
        ({"train": {"stages": ["mse", 2]}}, "train.stages must be a list of strings, got list ['mse', 2]"),
        ({"mse": {"adam_betas": [0.9, "x"]}}, "mse.adam_betas[1] must be a float, got str 'x'"),
        ({"mse": 3}, "mse must be a table, got int 3"),
        ({"model": {"overrides": 3}}, "model.overrides must be a table, got int 3"),
        ({"model": {"overrides": {"when": datetime.date(2024, 1, 1)}}},
         "model.overrides.when must be a string, number, bool, list or table, got date datetime.date(2024, 1, 1)"),
    ],
)
def test_wrong_type_names_the_field(d, message):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(d)
    assert str(info.value) == message


def test_recipe_error_is_a_one_line_value_error():
    e = RecipeError("first\nsecond")
    assert isinstance(e, ValueError) and str(e) == "first second"


def test_unknown_key_in_a_toml_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[mse]\nlearnig_rate = 1e-4\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"^unknown key 'mse.learnig_rate'; did you mean 'mse.lr'\?$"):
        load_recipe(path)


# ---------------------------------------------------------------------------------- files
def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"recipe file not found: '{path}'"
    with pytest.raises(RecipeError, match="is not a file"):
        load_recipe(tmp_path)


def test_invalid_toml_names_the_file_and_the_parser_message(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[mse\nlr = 1\n', encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"invalid TOML in '{path}': ") and "line 2" in message and "\n" not in message


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": ', encoding="utf-8")
    with pytest.raises(RecipeError, match=f"^invalid JSON in '{path}': "):
        load_recipe(path)


def test_empty_recipe_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("# nothing\n", encoding="utf-8")
    assert load_recipe(path) == Recipe()


def test_recipe_to_dict_uses_lists_and_does_not_alias():
    r = Recipe()
    d = recipe_to_dict(r)
    assert d["train"]["stages"] == ["mse", "sp"] and d["mse"]["adam_betas"] == [0.9, 0.999]
    assert json.loads(json.dumps(d)) == d
    source = {"model": {"overrides": {"channel_mult": [1, 2]}}}
    r = recipe_from_dict(source)
    source["model"]["overrides"]["channel_mult"].append(4)
    assert r.model.overrides == {"channel_mult": [1, 2]}


RICH = [
    "name=\"quote \\\" backslash \\\\ newline \\n tab \\t unicode é ✓\"",
    "model.overrides.channel_mult=[1, 2, 2]",
    "model.overrides.head_dim=16",
    "model.overrides.dropout=0.1",
    'model.overrides.attention_backend="math"',
    "model.overrides.gradient_checkpointing=true",
    'model.overrides."dotted.key"={inner = [1, {x = "y"}], empty = {}}',
    "mse.lr=1.5e-7",
    "train.divergence=warn",
    "train.divergence_factor=2.5",
    "train.divergence_window=20",
    'train.stages=["mse"]',
]


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("source", [*SHIPPED, "rich"], ids=lambda p: getattr(p, "stem", p))
def test_save_then_load_round_trips(tmp_path, suffix, source, stage1_runs):
    r = load_recipe(CIRCLES, RICH) if source == "rich" else load_recipe(source)
    path = save_recipe(r, tmp_path / f"resolved{suffix}")
    assert path == tmp_path / f"resolved{suffix}"
    assert load_recipe(path) == r
    text = path.read_text(encoding="utf-8")
    parsed = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    assert parsed == recipe_to_dict(r)


def test_saving_null_as_toml_asks_for_json(tmp_path):
    r = recipe_from_dict({"model": {"overrides": {"head_dim": None, "num_heads": 4}}})
    with pytest.raises(RecipeError, match=r"model.overrides.head_dim = None cannot be written as TOML"):
        save_recipe(r, tmp_path / "r.toml")
    assert load_recipe(save_recipe(r, tmp_path / "r.json")) == r
    with pytest.raises(RecipeError, match="must end in .toml or .json"):
        save_recipe(r, tmp_path / "r.yaml")


scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
free_form = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(
    name=st.text(max_size=20),
    lr=st.floats(min_value=1e-12, max_value=10.0),
    betas=st.tuples(st.floats(0, 0.999999), st.floats(0, 0.999999)),
    stages=st.sampled_from([("mse",), ("mse", "sp")]),
    layers=st.sampled_from(["mid", "all", "encoder+mid"]) | st.from_regex(r"(down|up)\.[0-9]{1,2}", fullmatch=True),
    overrides=st.dictionaries(st.text(max_size=8), free_form, max_size=4),
)
def test_round_trip_property(name, lr, betas, stages, layers, overrides):
    r = Recipe(name=name)
    r.mse.lr, r.sp.adam_betas, r.train.stages, r.sp.layers = lr, betas, stages, layers
    r.model.overrides = recipe_from_dict({"model": {"overrides": overrides}}).model.overrides
    assert recipe_from_dict(recipe_to_dict(r)) == r
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".toml", ".json"):
            assert load_recipe(save_recipe(r, Path(tmp) / f"r{suffix}")) == r


# ---------------------------------------------------------------------------------- listing
def test_list_recipes_finds_the_shipped_ones_with_descriptions():
    listed = dict(list_recipes(REPO))
    assert listed["recipes/image/circles.toml"].startswith("One-disk images (the paper's Figure 2a)")
    assert "class-conditional" in listed["recipes/image/digits.toml"]
    assert "section 5.7" in listed["recipes/image/digits_uncond.toml"]
    assert sorted(listed) == [p.relative_to(REPO).as_posix() for p in SHIPPED]


def test_list_recipes_reads_the_first_comment_line(tmp_path):
    (tmp_path / "recipes" / "audio").mkdir(parents=True)
    (tmp_path / "recipes" / "accelerate").mkdir()
    (tmp_path / "recipes" / "audio" / "b.toml").write_text("\n#   Speech, tiny DiT  \n# more\nname = 'b'\n")
    (tmp_path / "recipes" / "a.toml").write_text("name = 'a'\n# too late\n")
    (tmp_path / "recipes" / "accelerate" / "fsdp.toml").write_text("# not a recipe\n")
    (tmp_path / "recipes" / "notes.md").write_text("# not a recipe\n")
    assert list_recipes(tmp_path) == [("recipes/a.toml", ""), ("recipes/audio/b.toml", "Speech, tiny DiT")]
    assert list_recipes(tmp_path / "recipes") == [("a.toml", ""), ("audio/b.toml", "Speech, tiny DiT")]


def test_a_step_decay_anneals_the_last_steps():
    from perceptual_diffusion.builders import build_optimizer, lr_factor

    r = recipe_from_dict({"mse": {"steps": 10, "lr": 1e-3, "warmup_steps": 4, "decay_steps": 3, "decay_factor": 0.1}})
    assert [lr_factor(r.mse, s) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1]
    net = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(net, r.mse)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * f for f in (0.25, 0.5, 0.75, 1, 1, 1, 1, 0.1, 0.1, 0.1)])
    # a stage shorter than its decay (a recipe shortened with --set mse.steps=...) decays every step
    short = recipe_from_dict({"mse": {"steps": 4, "warmup_steps": 2, "decay_steps": 500, "decay_factor": 0.1}})
    assert [lr_factor(short.mse, s) for s in range(4)] == pytest.approx([0.05, 0.1, 0.1, 0.1])
    plain = recipe_from_dict({"mse": {"steps": 5, "warmup_steps": 0}})
    assert [lr_factor(plain.mse, s) for s in range(5)] == [1.0] * 5  # decay_steps 0: constant


@pytest.mark.parametrize("stage,message", [
    ({"decay_steps": -1}, "mse.decay_steps must be"),
    ({"decay_steps": 5, "decay_factor": 0.0}, r"mse.decay_factor must be in \(0, 1\], got 0.0"),
    ({"decay_steps": 5, "decay_factor": 1.5}, r"mse.decay_factor must be in \(0, 1\], got 1.5"),
])
def test_bad_decay_settings_are_one_line(stage, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"mse": stage})
