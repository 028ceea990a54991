"""benchmarks/gpu_decode.py without a GPU: its case building, anchor arrays, ratios, table and JSON (--dry-run)."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_decode.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_decode_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_writes_exact_rows_and_ratios(bench, tmp_path, capsys):
    rc = bench.main(["--dry-run", "--repeats", "1", "--cases", "llama8b-layer", "--copies", "llama8b-layer=2",
                     "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "gpu_decode_dry-run.json").read_text())
    assert doc["dry_run"] and doc["command"] and doc["versions"]["torch"]
    rows = {r["backend"]: r for r in doc["rows"]}
    assert set(rows) == {"cpu (dry run)", "official"}
    n = sum(int(a * b * bench.DRY_RUN_SCALE) for a, b in bench.LLAMA8B_LAYER.values())
    assert all(r["output_exact"] and r["weights"] == n and r["copies"] == 2 for r in rows.values())
    ours = rows["cpu (dry run)"]
    assert ours["ours_over_official"] == pytest.approx(ours["seconds"] / rows["official"]["seconds"])
    assert "ours/official" in capsys.readouterr().out


def test_official_ptx_comes_from_a_carried_wheel(bench, tmp_path):
    if importlib.util.find_spec("dfloat11") is not None:
        pytest.skip("dfloat11 is installed: the installed copy wins")
    ptx, where = bench.official_ptx(tmp_path)
    assert ptx is None and "not timed" in where
    with zipfile.ZipFile(tmp_path / "dfloat11-0.5.0-py3-none-any.whl", "w") as z:
        z.writestr("dfloat11/decode.ptx", ".visible .entry decode(")
    ptx, where = bench.official_ptx(tmp_path)
    assert ptx.startswith(".visible .entry decode") and "dfloat11-0.5.0-py3-none-any.whl" in where
