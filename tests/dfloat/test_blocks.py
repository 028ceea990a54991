"""Decoding part of a unit: every block range, through the CPU's in-place range decoder and through the sub-unit
that any decoder can decode, equals the same elements of the whole decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dfloat
from dfloat.blocks import block_range, blocks_covering, decompress_blocks, host_positions
from dfloat.integrity import check_structure
from dfloat.reference import reference_decode
from dfloat.testing import all_bf16_patterns, bits, weights_like

LAYOUTS = {
    "default": {},
    "small-blocks": dict(bytes_per_window=8, windows_per_block=4),  # 5*4 bits: offsets start on a byte
    "odd-blocks": dict(bytes_per_window=5, windows_per_block=3),  # 5*3 bits: offsets start mid-byte
    "official": dict(bytes_per_window=8, windows_per_block=512),
}


def _ranges(n_blocks: int):
    cuts = sorted({0, 1, 2, n_blocks // 3, n_blocks // 2, n_blocks - 2, n_blocks - 1, n_blocks})
    cuts = [c for c in cuts if 0 <= c <= n_blocks]
    return [(a, b) for a in cuts for b in cuts if a < b]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_block_range_equals_the_whole_decode(layout):
    t = torch.cat([weights_like(20_000, seed=3), all_bf16_patterns()[::11]])
    ct = dfloat.compress_tensor(t, allow_raw=False, **LAYOUTS[layout])
    whole = bits(dfloat.decompress_tensor(ct))
    pos = host_positions(ct)
    out = torch.empty(ct.numel, dtype=torch.bfloat16)
    for b0, b1 in _ranges(ct.n_blocks):
        want = whole[pos[b0] : pos[b1]]
        got = decompress_blocks(ct, b0, b1, out)  # the CPU's in-place range decode
        assert torch.equal(bits(got), want), (b0, b1)
        sub = block_range(ct, b0, b1)
        check_structure(sub, "sub-unit")  # a valid unit, so any decoder may decode it
        assert sub.numel == pos[b1] - pos[b0]
        assert torch.equal(bits(dfloat.decompress_tensor(sub)), want), (b0, b1)
        if b0 == 0 and b1 <= 2:  # the oracle walks the stream from bit 0, where block 0 starts
            assert torch.equal(bits(reference_decode(sub)), want), (b0, b1)


def test_sub_unit_is_views_and_shares_tables():
    ct = dfloat.compress_tensor(
        weights_like(50_000), allow_raw=False, bytes_per_window=8, windows_per_block=4
    )
    sub = block_range(ct, 3, 9)
    assert (
        sub.encoded_exponent.untyped_storage().data_ptr() == ct.encoded_exponent.untyped_storage().data_ptr()
    )
    assert sub.sign_mantissa.untyped_storage().data_ptr() == ct.sign_mantissa.untyped_storage().data_ptr()
    dfloat.decompress_tensor(sub)
    assert "cpu_tables" in ct._cache  # built once, in the parent's cache
    assert (
        "host_positions" not in sub._cache or sub._cache["host_positions"] is not ct._cache["host_positions"]
    )


def test_blocks_covering_finds_the_holding_blocks():
    ct = dfloat.compress_tensor(
        weights_like(20_000), allow_raw=False, bytes_per_window=8, windows_per_block=2
    )
    pos = host_positions(ct)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, ct.numel - 1, 200)
    stops = np.minimum(ct.numel, starts + rng.integers(1, 3000, 200))
    b0, b1 = blocks_covering(ct, starts, stops)
    assert np.all(pos[b0] <= starts) and np.all(pos[b1] >= stops)
    assert np.all(pos[b0 + 1] > starts) and np.all(pos[b1 - 1] < stops)  # the smallest such ranges
    with pytest.raises(dfloat.DFloatError):
        blocks_covering(ct, 0, ct.numel + 1)


def test_bad_ranges_are_refused():
    ct = dfloat.compress_tensor(
        weights_like(20_000), allow_raw=False, bytes_per_window=8, windows_per_block=2
    )
    with pytest.raises(dfloat.DFloatError, match="outside"):
        block_range(ct, 2, ct.n_blocks + 1)
    with pytest.raises(dfloat.DFloatError, match="elements"):
        decompress_blocks(ct, 0, ct.n_blocks, torch.empty(10, dtype=torch.bfloat16))
