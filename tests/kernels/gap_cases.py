"""Streams with one damaged window start offset ("gap"), and what a decoder makes of each.

Shared by test_gap_rule.py: the CPU decoder runs them in the test process, the Triton decoder in a child process
under TRITON_INTERPRET=1 (``python tests/kernels/gap_cases.py triton`` prints the outcomes as JSON). Small
inputs: the interpreter runs numpy per operation.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace

import numpy as np
import torch

import dfloat
from dfloat.format import GAP_BITS
from dfloat.testing import weights_like

WINDOW_BYTES, WINDOWS_PER_BLOCK = 4, 16


def base_unit():
    return dfloat.compress_tensor(
        weights_like(800, seed=3),
        allow_raw=False,
        bytes_per_window=WINDOW_BYTES,
        windows_per_block=WINDOWS_PER_BLOCK,
    )


def gaps_of(ct) -> np.ndarray:
    bits = np.unpackbits(ct.gaps.numpy())
    n = bits.size // GAP_BITS
    return bits[: n * GAP_BITS].reshape(n, GAP_BITS) @ (1 << np.arange(GAP_BITS - 1, -1, -1))


def with_gap(ct, w: int, value: int):
    bits = np.unpackbits(ct.gaps.numpy())
    bits[GAP_BITS * w : GAP_BITS * (w + 1)] = [(value >> (GAP_BITS - 1 - k)) & 1 for k in range(GAP_BITS)]
    return replace(ct, gaps=torch.from_numpy(np.packbits(bits)), _cache={})


def cases() -> dict[str, object]:
    """{name: unit}: the intact unit, then one gap changed: the first window's, one inside a block, the last of a
    block, the first of the next block, one of the last windows."""
    ct = base_unit()
    n_windows = -(-ct.encoded_exponent.numel() // WINDOW_BYTES)
    gaps = gaps_of(ct)
    out = {"intact": ct}
    for w in (0, 5, WINDOWS_PER_BLOCK - 1, WINDOWS_PER_BLOCK, n_windows - 2):
        value = (int(gaps[w]) + 1) % 32
        out[f"window{w}_gap{gaps[w]}to{value}"] = with_gap(ct, w, value)
    return out


def outcome(ct, backend: str) -> str:
    """'error' for a CorruptStreamError, else a digest of the output (and 'outside' if anything past it moved)."""
    from importlib import import_module

    module = import_module({"cpu": "dfloat.kernels.cpu", "triton": "dfloat.kernels.triton_decode"}[backend])
    buf = torch.full((ct.numel + 64,), 0x5A5A, dtype=torch.int16)
    try:
        module.decode(ct, buf[: ct.numel].view(torch.bfloat16), check=True)
    except dfloat.CorruptStreamError:
        return "error"
    if not (buf[ct.numel :] == 0x5A5A).all():
        return "outside"
    return hashlib.sha256(buf[: ct.numel].numpy().tobytes()).hexdigest()[:16]


def outcomes(backend: str) -> dict[str, str]:
    return {name: outcome(ct, backend) for name, ct in cases().items()}


if __name__ == "__main__":
    print(json.dumps(outcomes(sys.argv[1])))
