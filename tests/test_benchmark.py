"""benchmarks/sp_step.py end to end on the tiny preset (memory is deterministic; times are not)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("sp_step", ROOT / "benchmarks" / "sp_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
