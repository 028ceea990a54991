"""Inputs shared by the kernel tests (emulated CUDA, Triton under the interpreter, and the GPU tests)."""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch

import dfloat
from dfloat import huffman
from dfloat.testing import with_exponent_counts

STAIRCASE_SYMBOLS = list(range(100, 133))


def staircase_lengths() -> np.ndarray:
    """33 symbols with code lengths 1, 2, ..., 31, 32, 32 (Kraft sum exactly 1): codes of the maximum length."""
    lengths = np.zeros(256, np.uint8)
    for i, s in enumerate(STAIRCASE_SYMBOLS):
        lengths[s] = min(i + 1, 32)
    return lengths


@contextmanager
def forced_code(lengths: np.ndarray):
    """Make the encoder use ``lengths`` whatever the histogram (any prefix code decodes the same way)."""
    with mock.patch.object(huffman, "code_lengths", lambda counts, max_length: lengths.copy()):
        yield


def staircase(n_per_symbol: int = 60, seed: int = 0, **opts):
    """(tensor, unit) where every symbol is equally frequent and half the stream is 20-32-bit codes."""
    t = with_exponent_counts({s: n_per_symbol for s in STAIRCASE_SYMBOLS}, seed=seed)
    with forced_code(staircase_lengths()):
        ct = dfloat.compress_tensor(t, allow_raw=False, max_code_length=32, **opts)
    assert int(ct.code.max()) == 32
    return t, ct


def flip_bytes(ct, n: int, seed: int):
    """A copy of a unit with ``n`` random bytes of its code stream changed."""
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    enc = ct.encoded_exponent.clone()
    idx = torch.from_numpy(rng.integers(0, enc.numel(), n))
    enc[idx] ^= torch.from_numpy(rng.integers(1, 256, n).astype(np.uint8))
    return replace(ct, encoded_exponent=enc, _cache={})


def with_positions(ct, positions: torch.Tensor):
    from dataclasses import replace

    return replace(ct, output_positions=positions, _cache={})
