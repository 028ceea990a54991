"""The compiled Triton decoder on a CUDA device: every subtable depth (EXTRA 0 to 3), blocks decoded in rounds,
and the gap rule. Skipped without a GPU (tests/conftest.py); benchmarks/gpu_check.sh runs it."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import dfloat
from dfloat.errors import CorruptStreamError
from dfloat.testing import bits, fibonacci_exponents, weights_like, with_exponent_counts

sys.path.insert(0, str(Path(__file__).parent))
from kernel_cases import staircase  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
triton = pytest.importorskip("triton")


def decode(ct, check=True) -> torch.Tensor:
    from dfloat.kernels import triton_decode

    ct = ct.to("cuda")
    out = torch.empty(ct.numel, dtype=torch.bfloat16, device="cuda")
    triton_decode.decode(ct, out, check=check)
    return out.cpu()


def units():
    yield "1-bit codes (EXTRA 0)", with_exponent_counts({120: 50_000, 121: 50_001}), {}
    yield "9-bit codes (EXTRA 1)", with_exponent_counts(fibonacci_exponents(20)), dict(max_code_length=9)
    yield "defaults (EXTRA 2)", weights_like(300_001, seed=3), {}
    t, ct = staircase(n_per_symbol=300)
    yield "32-bit codes (EXTRA 3)", t, ct


@pytest.mark.parametrize("layout", [{}, dict(bytes_per_window=4, windows_per_block=3000)])
def test_every_subtable_depth_and_rounds(layout):
    from dfloat.kernels import triton_decode

    for name, t, opts in units():
        ct = opts if not isinstance(opts, dict) else dfloat.compress_tensor(t, allow_raw=False, **opts, **layout)
        assert torch.equal(bits(decode(ct)), bits(t)), name
        assert triton_decode._device_tables(ct, torch.device("cpu"))[3] == int(name[-2])


def with_gap(ct, window: int, value: int):
    b = np.unpackbits(ct.gaps.numpy())
    b[5 * window:5 * window + 5] = [(value >> (4 - i)) & 1 for i in range(5)]
    return replace(ct, gaps=torch.from_numpy(np.packbits(b)[:ct.gaps.numel()]), _cache={})


@pytest.mark.parametrize("windows_per_block, window", [(256, 7), (256, 256), (2048, 1024), (2048, 3001)])
def test_a_damaged_later_gap_is_reported(windows_per_block, window):
    t = weights_like(400_000, seed=8)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=4, windows_per_block=windows_per_block)
    old = int("".join(map(str, np.unpackbits(ct.gaps.numpy())[5 * window:5 * window + 5])), 2)
    with pytest.raises(CorruptStreamError, match="window start offsets disagree with the codes"):
        decode(with_gap(ct, window, (old + 5) % 32))
