"""The gap rule: every decoder checks every window start offset it could use, so all decoders agree on every
stream (the same output, or an error). See docs/kernels.md."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import gap_cases  # noqa: E402

CASES = gap_cases.cases()
CPU = gap_cases.outcomes("cpu")


def test_intact_stream_decodes_exactly_on_the_cpu():
    from dfloat.reference import reference_decode

    want = reference_decode(CASES["intact"]).view(torch.int16).numpy().tobytes()
    assert CPU["intact"] == hashlib.sha256(want).hexdigest()[:16]


@pytest.mark.parametrize("name", [n for n in CASES if n != "intact" and not n.startswith("window0_")])
def test_cpu_rejects_every_damaged_later_gap(name):
    """A changed gap of any window w >= 1 that holds a code start is an error, inside a block or at its start."""
    assert CPU[name] == "error", name


# A damaged first gap (window 0) is outside the rule: every decoder starts at s_0 and Huffman codes often fall
# back in step within a few codes, so all decoders give the same wrong output. The unit's checksums catch it
# before any decode (test_integrity.py); the agreement test below still covers it.


@pytest.fixture(scope="module")
def triton_outcomes():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "gap_cases.py"), "triton"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_triton_agrees_with_the_cpu(triton_outcomes, name):
    assert triton_outcomes[name] != "outside", f"{name}: the Triton decoder wrote outside out"
    assert triton_outcomes[name] == CPU[name], name
