"""benchmarks/sp_step.py end to end on the tiny preset (memory is deterministic; times are not)."""

import json

import pytest

from helpers import load_benchmark


def _load():
    return load_benchmark("sp_step")


def test_sp_step_benchmark_reports_all_variants(tmp_path, capsys):
    out = tmp_path / "r.json"
    result = _load().main(["--preset", "tiny", "--batch", "2", "--size", "16", "--channels", "1",
                           "--warmup", "1", "--repeats", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["mse", "sp_algorithm1_literal", "sp_library"]
    assert rows["mse"]["ratio"] == pytest.approx(1.0)
    assert all(r["median_ms"] > 0 for r in rows.values())
    # early exit + no-grad ground-truth branch save activation memory over Algorithm 1 as printed
    mem = {k: r["memory_mib"] for k, r in rows.items()}
    assert mem["mse"] < mem["sp_library"] < mem["sp_algorithm1_literal"]
    assert "| sp_library |" in capsys.readouterr().out


def test_sp_step_benchmark_on_the_diffusers_unet(tmp_path):
    pytest.importorskip("diffusers")
    result = _load().main(["--backbone", "diffusers_unet", "--preset", "tiny", "--batch", "2", "--size", "8",
                           "--channels", "4", "--warmup", "1", "--repeats", "1"])
    assert result["backbone"] == "diffusers_unet"
    mem = {r["variant"]: r["memory_mib"] for r in result["rows"]}
    assert mem["mse"] < mem["sp_library"] < mem["sp_algorithm1_literal"]


def test_sd21_reduced_keeps_the_sd21_layout():
    pytest.importorskip("diffusers")
    from backbones import DiffusersUNet

    reduced = _load().SD21_REDUCED
    cfg = DiffusersUNet.PRESETS["sd21-base"]
    assert len(reduced["block_out_channels"]) == len(cfg["block_out_channels"])
    # the same 64-channel heads as SD2.1-base, at a fifth of the width
    assert [c // h for c, h in zip(reduced["block_out_channels"], reduced["attention_head_dim"])] == [64] * 4
    assert [c // h for c, h in zip(cfg["block_out_channels"], cfg["attention_head_dim"])] == [64] * 4


def test_modality_diagnostics_on_tones_end_to_end(tmp_path):
    """benchmarks/modality_diagnostics.py (issue 14's evidence) at a few steps: real tones score 1.0
    on their metric, loud noise breaks them, the exact batch denoiser's samples are the batch."""
    module = load_benchmark("modality_diagnostics")
    result = module.main(["--out", str(tmp_path), "--steps", "2", "--only", "tones", "--n-real", "16",
                          "--repeats", "1", "--sample-steps", "5", "--data-scale", "2"])
    assert json.loads((tmp_path / "diagnostics.json").read_text())["recipes"].keys() == {"tones"}
    tones = result["recipes"]["tones"]
    sanity = tones["a_metric_sanity"]
    assert sanity["noise_0.0"]["valid_fraction"] == 1.0 and sanity["noise_0.3"]["valid_fraction"] < 0.5
    assert 0.2 < tones["b_scale"]["std"] < 0.5  # the tones' amplitude, well below unit variance
    exact = tones["c_overfit"]["samples_exact_batch_denoiser"]
    assert exact["nearest_same_label_item_rms_max"] < 1e-3 and exact["metric"]["valid_fraction"] == 1.0
    assert len(tones["c_overfit"]["loss_curve"]) == 0  # fewer steps than one logging window
