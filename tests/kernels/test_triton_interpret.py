"""The Triton decoder, bit-exact on CPU tensors under TRITON_INTERPRET=1, so CI checks it without a GPU.

The cases live in triton_interpret_cases.py and run in a child pytest whose environment sets TRITON_INTERPRET=1
before triton is imported (Triton picks the interpreter for its own library functions at import time; setting it
in this process would also change what every other test sees). About two minutes on a busy 2-core machine.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).parent / "triton_interpret_cases.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_decoder_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", str(CASES)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).parents[2])
    tail = (res.stdout[-6000:] + res.stderr[-3000:]).strip()
    assert res.returncode == 0, f"the interpreter cases failed:\n{tail}"
    assert " passed" in res.stdout and " skipped" not in res.stdout.splitlines()[-1], tail
