"""The registries carry their own rules: every dataset entry builds what it says (shape, channels,
classes), recipe validation reads the entries (datasets, backbones' latent flag), evaluation and
the CLI read the metric registry, and loading a recipe imports neither diffusers nor transformers
nor, from the dataset modules, the recipe schema that validates through them."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import backbones
from backbones import BACKBONE_SPECS, BACKBONES, BackboneSpec, build_backbone
from perceptual_diffusion.cli import build_parser
from perceptual_diffusion.config import DataConfig, Recipe, RecipeError
from perceptual_diffusion.datasets import (DATASET_SPECS, DATASETS, MODALITIES, MODALITY, build_dataset,
                                           build_reference_dataset, num_classes, sample_shape)
from perceptual_diffusion.evaluation import METRIC_SPECS, LoadedModel, evaluate

from test_config import SHIPPED, error_of, recipe_with

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "transformers")
PATH_FREE = [name for name, spec in DATASET_SPECS.items() if not spec.needs_path]


def _python(code: str, cwd: Path = REPO) -> str:
    """Run `code` in a fresh interpreter; its stdout (a failure shows its stderr)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---------------------------------------------------------------------------------- imports
def test_loading_every_shipped_recipe_imports_neither_diffusers_nor_transformers(tmp_path):
    sd = all(importlib.util.find_spec(p) for p in HEAVY)
    paths = []
    for path in SHIPPED:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        if raw.get("model", {}).get("backbone") == "diffusers_unet" and not sd:
            continue  # validation refuses it without the sd extra (test below)
        for stage in ("mse", "sp"):  # the stage-1 runs that stage-2 recipes start from
            init = raw.get(stage, {}).get("init")
            if init:
                (tmp_path / init).mkdir(parents=True, exist_ok=True)
        paths.append(str(path))
    assert paths
    out = _python(
        "import json, sys\n"
        "from perceptual_diffusion.config import load_recipe\n"
        f"loaded = [load_recipe(p).model.backbone for p in {paths!r}]\n"
        "import backbones\n"
        "names = list(backbones.BACKBONES)\n"
        f"print(json.dumps([loaded, names, [m for m in {HEAVY!r} if m in sys.modules]]))\n",
        cwd=tmp_path)
    loaded, names, heavy = json.loads(out)
    assert len(loaded) == len(paths) and ("diffusers_unet" in loaded) == sd
    assert ("diffusers_unet" in names) == sd  # listed without being imported
    assert heavy == []


def test_the_dataset_modules_do_not_import_the_recipe_schema():
    """The schema validates through the dataset registry, so no dataset module may import it
    back at import time (only under TYPE_CHECKING or inside a function)."""
    for path in sorted((REPO / "perceptual_diffusion" / "datasets").glob("*.py")):
        for node in _imports_at_import_time(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = {alias.name for alias in node.names}
            else:  # from ..config import X (level 2: perceptual_diffusion), from .. import config
                base = ".".join(["perceptual_diffusion", "datasets"][: 3 - node.level]) if node.level else ""
                module = ".".join(p for p in (base, node.module) if p)
                targets = {module} | {f"{module}.{alias.name}" for alias in node.names}
            assert "perceptual_diffusion.config" not in targets, f"{path.name}:{node.lineno}"
    out = _python(
        "import pkgutil, sys, importlib\n"
        "import perceptual_diffusion.datasets.registry\n"
        "import perceptual_diffusion.datasets as ds\n"
        "for m in pkgutil.iter_modules(ds.__path__):\n"
        "    importlib.import_module(f'perceptual_diffusion.datasets.{m.name}')\n"
        "print('perceptual_diffusion.config' in sys.modules)\n"
        "from perceptual_diffusion.config import load_recipe\n"
        "print(load_recipe('recipes/image/digits.toml').data.name)\n")
    assert out.split() == ["False", "digits"]


def _imports_at_import_time(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs when imported: none inside functions or `if TYPE_CHECKING:`."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        todo += ast.iter_child_nodes(node)
    return found


# ---------------------------------------------------------------------------------- datasets
def _tiny(name: str, channels: int, conditional: bool) -> DataConfig:
    spec = DATASET_SPECS[name]
    return DataConfig(name=name, size=8, channels=channels, frames=max(3, spec.min_frames), length=64,
                      num_items=64, conditional=conditional, seed=1)


@pytest.mark.parametrize("name", PATH_FREE)
def test_each_path_free_dataset_builds_what_its_entry_says(name):
    spec = DATASET_SPECS[name]
    assert spec.modality in MODALITIES and set(spec.channels) <= set(MODALITIES[spec.modality].channels)
    for channels in spec.channels:
        for conditional in ((False, True) if spec.classes else (False,)):
            cfg = _tiny(name, channels, conditional)
            for data in (build_dataset(cfg), build_reference_dataset(cfg)):
                item = data[0]
                assert tuple(item["x"].shape) == sample_shape(cfg)
                assert item["x"].dtype == torch.float32 and item["x"].abs().max() <= 1
                assert ("label" in item) == conditional
            assert num_classes(cfg) == (spec.classes if conditional else None)
    if spec.classes:
        data = build_dataset(_tiny(name, spec.channels[0], True))
        assert type(data).num_classes == spec.classes
        labels = {int(data[i]["label"]) for i in range(len(data))}
        assert labels == set(range(spec.classes))  # every class occurs, and nothing else


@pytest.mark.parametrize("name", DATASETS)
def test_validation_reads_each_dataset_entry(name, tmp_path):
    spec = DATASET_SPECS[name]
    assert MODALITY[name] == spec.modality
    path = [f"data.path={json.dumps(str(tmp_path))}"] if spec.needs_path else []
    base = [f"data.name={name}", f"data.channels={spec.channels[0]}", *path]
    assert recipe_with(*base).data.name == name
    for channels in set(MODALITIES[spec.modality].channels) - set(spec.channels):
        message = error_of(*base, f"data.channels={channels}")
        with pytest.raises(ValueError) as built:
            build_dataset(DataConfig(name=name, channels=channels, path=str(tmp_path)))
        assert message == str(built.value) and message.startswith(f"data.channels must be {spec.channels[0]}")
        assert f"for {name} (" in message
    assert error_of(*base, f"data.frames={spec.min_frames - 1}") == (
        f"data.frames must be >= {spec.min_frames}, got {spec.min_frames - 1}")
    if spec.needs_path:
        assert error_of(*base[:2]) == f"data.path must name {spec.path} when data.name is '{name}'"
        missing = tmp_path / "gone"
        if spec.path_is_dir:
            assert error_of(*base[:2], f"data.path={json.dumps(str(missing))}") == (
                f"data.path '{missing}' is not an existing directory (data.name = '{name}')")


def test_gray_datasets_refuse_rgb_in_the_recipe_and_in_build_dataset():
    assert error_of("data.channels=3") == "data.channels must be 1 for circles (gray), got 3"
    assert error_of("data.name=tones", "data.channels=2") == "data.channels must be 1 for tones (mono), got 2"
    assert recipe_with("data.name=audio_folder", "data.channels=2", "data.path=.").data.channels == 2


def test_a_new_dataset_is_one_entry(monkeypatch):
    def blobs(d: DataConfig) -> list[dict[str, torch.Tensor]]:
        return [{"x": torch.zeros(d.channels, d.size, d.size), "label": torch.tensor(i % 3)} for i in range(4)]

    entry = dataclasses.replace(DATASET_SPECS["digits"], name="blobs", build=blobs, channels=(1, 3), classes=3)
    monkeypatch.setitem(DATASET_SPECS, "blobs", entry)
    r = recipe_with("data.name=blobs", "data.channels=3", "data.size=8", "data.conditional=true")
    assert num_classes(r.data) == 3 and sample_shape(r.data) == (3, 8, 8)
    assert build_dataset(r.data)[1]["x"].shape == (3, 8, 8)


# ---------------------------------------------------------------------------------- backbones
def test_only_latent_backbones_take_model_latent_and_model_pretrained():
    assert [name for name, spec in BACKBONE_SPECS.items() if spec.latent] == ["diffusers_unet"]
    rgb = ["data.name=photo_patches", "data.channels=3"]
    for name, spec in BACKBONE_SPECS.items():
        if not spec.installed:
            continue
        chosen = [*rgb, f"model.backbone={name}"]
        if spec.latent:
            assert recipe_with(*chosen, "model.latent=sd", "model.pretrained=sd").model.backbone == name
            assert "needs model.latent" in error_of(*chosen)
        else:
            assert recipe_with(*chosen).model.backbone == name
            assert "other backbones work in pixel space" in error_of(*chosen, "model.latent=sd")
            assert error_of(*chosen, "model.pretrained=sd").startswith(
                "model.pretrained loads diffusers UNets only (model.backbone = 'diffusers_unet')")


def test_validation_reads_the_latent_flag_and_the_extra_not_the_name(monkeypatch):
    mine = BackboneSpec("mine", ".image_unet:ImageUNet", latent=True)
    monkeypatch.setitem(BACKBONE_SPECS, "mine", mine)
    r = recipe_with("data.name=photo_patches", "data.channels=3", "model.backbone=mine", "model.latent=sd")
    assert r.model.latent == "sd" and BACKBONES["mine"] is backbones.ImageUNet

    missing = BackboneSpec("far", ".image_unet:ImageUNet", extra="far", requires=("no_such_package_4e1f",))
    monkeypatch.setitem(BACKBONE_SPECS, "far", missing)
    assert error_of("model.backbone=far") == (
        "model.backbone = 'far' needs the 'far' extra (no_such_package_4e1f): pip install 'perceptual-diffusion[far]'")
    assert "far" not in BACKBONES and "far" not in list(BACKBONES)
    with pytest.raises(KeyError):
        BACKBONES["far"]
    with pytest.raises(ImportError, match="pip install 'perceptual-diffusion\\[far\\]'"):
        build_backbone("far", "tiny")
    with pytest.raises(ValueError, match="unknown backbone 'nope'; known: image_unet"):
        build_backbone("nope", "tiny")


def test_the_diffusers_adapter_resolves_lazily():
    if not BACKBONE_SPECS["diffusers_unet"].installed:
        assert backbones.DiffusersUNet is None and "diffusers_unet" not in BACKBONES
        return
    from backbones.diffusers_unet import DiffusersUNet, export_diffusers

    assert BACKBONES["diffusers_unet"] is DiffusersUNet is backbones.DiffusersUNet
    assert backbones.export_diffusers is export_diffusers
    with pytest.raises(AttributeError):
        backbones.NoSuchBackbone  # noqa: B018


# ---------------------------------------------------------------------------------- metrics
def test_the_cli_help_lists_every_registry_metric(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line of help, whatever the terminal
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for kind in dict.fromkeys(spec.modality for spec in METRIC_SPECS.values()):
        names = [name for name, spec in METRIC_SPECS.items() if spec.modality == kind]
        assert f"{kind}: {', '.join(names)}" in text


@pytest.mark.parametrize("metric", list(METRIC_SPECS))
def test_evaluate_refuses_a_metric_of_another_modality(metric):
    spec = METRIC_SPECS[metric]
    assert spec.modality in MODALITIES and callable(spec.measure)
    for dataset in ("circles", "moving_shapes", "tones"):
        kind = DATASET_SPECS[dataset].modality
        if kind == spec.modality:
            continue
        loaded = LoadedModel(torch.nn.Identity(), Recipe(data=DataConfig(name=dataset)), Path("ck"), "ema")
        with pytest.raises(RecipeError) as info:
            evaluate(loaded, [metric], n=1, steps=1)
        mine = [m for m, s in METRIC_SPECS.items() if s.modality == kind]
        assert str(info.value) == (f"metric(s) {metric} measure {spec.modality} samples; this checkpoint makes "
                                   f"{kind} ({dataset}); choose from {', '.join(mine)}")
