"""The Triton decode kernel compiles ahead of time, with no GPU, for NVIDIA sm_80 and sm_90 and AMD gfx942.

Runs scripts/triton_aot_check.py (the same script CI runs under Triton 3.6.0 in a second venv) with the installed
Triton, in a child process so its fresh Triton cache does not leak into other tests. The script loads
kernels/triton_kernel.py from this checkout: the kernel the launcher runs, not a copy.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "triton_aot_check.py"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_compiles_for_every_target(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--targets", "cuda:80,cuda:90,hip:gfx942", "--variants", "256:3",
                          "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["target"], r["ok"]) for r in rows] == [("cuda:80", True), ("cuda:90", True), ("hip:gfx942", True)]
    assert all(r["asm_lines"] > 100 for r in rows)  # real code came out, not an empty module
