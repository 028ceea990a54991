"""The GPU route for partial decodes: the CUDA kernel (emulated on the CPU) decodes `block_range` sub-units to the
same elements as the whole decode, and never writes outside them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dfloat
from dfloat.blocks import block_range, host_positions
from dfloat.testing import bits, weights_like

sys.path.insert(0, str(Path(__file__).parent))
from test_cuda_emulated import emu, emu_decode  # noqa: E402, F401 - the emulator fixture


@pytest.mark.parametrize(
    "opts",
    [dict(bytes_per_window=8, windows_per_block=4), dict(bytes_per_window=5, windows_per_block=3), {}],
    ids=["small-blocks", "offsets-mid-byte", "default"],
)
def test_emulated_kernel_decodes_block_ranges(emu, opts):  # noqa: F811
    t = weights_like(30_000, seed=4)
    ct = dfloat.compress_tensor(t, allow_raw=False, **opts)
    pos, want = host_positions(ct), bits(t)
    n = ct.n_blocks
    for b0, b1 in sorted({(0, 1), (1, 2), (n // 2, n), (1, n - 1), (0, n), (n - 1, n)}):
        if not 0 <= b0 < b1 <= n:
            continue
        words, status = emu_decode(emu, block_range(ct, b0, b1))
        assert status[0] == 0, (b0, b1, status)
        assert torch.equal(words, want[pos[b0] : pos[b1]]), (b0, b1)
