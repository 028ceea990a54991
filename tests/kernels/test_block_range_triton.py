"""The Triton decoder (under TRITON_INTERPRET=1, on the CPU) decodes `block_range` sub-units to the same elements
as the whole decode: the generic route partial decodes take on GPUs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASE = """
import torch, dfloat
from dfloat.blocks import block_range, host_positions
from dfloat.kernels import registry
from dfloat.testing import bits, weights_like
t = weights_like(3000, seed=2)
for opts in (dict(bytes_per_window=8, windows_per_block=16), dict(bytes_per_window=5, windows_per_block=3)):
    ct = dfloat.compress_tensor(t, allow_raw=False, **opts)
    pos, n = host_positions(ct), ct.n_blocks
    for b0, b1 in sorted({(0, 1), (1, 3), (n - 2, n)}):  # few blocks: the interpreter runs one per second
        sub = block_range(ct, b0, b1)
        out = torch.empty(sub.numel, dtype=torch.bfloat16)
        registry.decode_into(sub, out, "triton", check=True)
        assert torch.equal(bits(out), bits(t)[pos[b0]:pos[b1]]), (opts, b0, b1)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_decodes_block_ranges_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", CASE], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).parents[2])
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (res.stdout[-3000:] + res.stderr[-3000:])
