"""The mutation fuzzer (scripts/fuzz.py) in CI: every damaged dfloat unit or file gives a named DFloatError or the
exact weights; official units and unchecked ones never raise anything else, write outside out, or crash.

A fixed seed and a bounded number of cases (about a minute on 2 cores); ``DFLOAT_FUZZ_CASES=20000`` runs longer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FUZZ = ROOT / "scripts" / "fuzz.py"


def run_fuzzer(tmp_path, *args, env=None) -> dict:
    out = tmp_path / "fuzz.json"
    res = subprocess.run(
        [sys.executable, str(FUZZ), "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert out.is_file(), res.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert res.returncode == 0 and summary["n_failures"] == 0, res.stdout[-4000:] + res.stderr[-2000:]
    return summary


def test_fuzzer_cpu_decoder_files_and_models(tmp_path):
    summary = run_fuzzer(tmp_path)
    counts = summary["counts"]
    assert summary["cases"] == int(os.environ.get("DFLOAT_FUZZ_CASES", 1000))
    assert set(counts) == {"dfloat", "official", "unchecked", "file", "model"}
    for kind in ("dfloat", "file", "model"):  # checksummed: an error or the exact weights, nothing else
        assert set(counts[kind]) <= {"error", "exact"}, counts[kind]
        assert counts[kind].get("error", 0) > 0
    for kind in ("official", "unchecked"):  # nothing to check against: no other exception, no OOB, no crash
        assert set(counts[kind]) <= {"error", "exact", "undetected"}, counts[kind]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fuzzer_triton_decoder_under_the_interpreter(tmp_path):
    summary = run_fuzzer(
        tmp_path, "--backend", "triton", "--cases", "16", "--no-files", env={"TRITON_INTERPRET": "1"}
    )
    assert summary["cases"] == 16 and "official" in summary["counts"]
