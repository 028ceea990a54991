"""benchmarks/autoload_cost.py runs (on a cheap statement) and writes its two rows."""

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "autoload_cost.py"


def test_autoload_cost_writes_both_sides(tmp_path, monkeypatch):
    out = tmp_path / "autoload_t"  # an absolute name: the JSON goes there, not to benchmarks/results/
    argv = [str(SCRIPT), "--repeats", "1", "--statement", "import json", "--name", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    doc = json.loads(out.with_suffix(".json").read_text())
    assert [r["hook"].split()[0] for r in doc["rows"]] == ["off", "on"]
    assert doc["extra_modules"] == [] and doc["rows"][1]["extra_modules"] == 0
    assert doc["statement"] == "import json" and doc["versions"]["torch"] and doc["hook_self_ms"] >= 0
