"""Official DFloat11 units: LUTs to codes and back, and decoding through the same decoders."""

import numpy as np
import pytest
import torch

import dfloat
from dfloat import df11, huffman
from dfloat.code_tables import code_of
from dfloat.reference import reference_decode
from dfloat.testing import all_bf16_patterns, bits, fibonacci_exponents, weights_like, with_exponent_counts


def test_luts_roundtrip_a_deep_code():
    counts = np.zeros(256, np.int64)
    for e, c in fibonacci_exponents(30).items():
        counts[e] = c
    lengths = huffman.code_lengths(counts, 32)
    codes = huffman.canonical_codes(lengths)
    luts = huffman.luts_from_code(codes, lengths)
    assert luts.shape[1] == 256 and luts.shape[0] >= 4  # tables for 0, 8, 16 and 24-bit prefixes + lengths
    got_codes, got_lengths = huffman.codes_from_luts(luts)
    assert np.array_equal(got_lengths, lengths) and np.array_equal(got_codes, codes)


def test_lut_rows_follow_the_official_rules():
    t = weights_like(20_000)
    ct = dfloat.compress_tensor(t)
    luts = huffman.luts_from_code(*code_of(ct)).astype(np.int64)
    assert np.array_equal(luts[-1], ct.code.numpy())
    root = luts[0]
    assert set(root.tolist()) <= set(np.flatnonzero(ct.code.numpy()).tolist()) | set(range(240, 256))


@pytest.mark.parametrize(
    "make",
    [
        lambda: weights_like(50_000, 3).view(250, 200),
        lambda: with_exponent_counts(fibonacci_exponents(28)),
        lambda: weights_like(1, 5),
    ],
)
def test_official_unit_decodes_identically(make):
    t = make()
    ct = dfloat.compress_tensors({"q": t}, allow_raw=False)
    arrays = df11.to_official_unit(ct)
    assert arrays["output_positions"].dtype == torch.uint8
    off = df11.from_official_unit(arrays, [("q", tuple(t.shape))])
    assert (off.bytes_per_window, off.windows_per_block, off.code_kind) == (8, 512, "df11-lut")
    assert torch.equal(bits(dfloat.decompress_tensor(off)), bits(t))
    assert torch.equal(bits(reference_decode(off)), bits(t))


def test_official_unit_of_all_patterns_below_240():
    t = all_bf16_patterns()
    keep = ((t.view(torch.int16).to(torch.int32) >> 7) & 0xFF) < 240
    t = t[keep]
    off = df11.from_official_unit(df11.to_official_unit(dfloat.compress_tensor(t)), [("x", (t.numel(),))])
    assert torch.equal(bits(dfloat.decompress_tensor(off)), bits(t))


def test_official_unit_with_wrong_member_shapes_is_refused():
    ct = dfloat.compress_tensor(weights_like(10_000))
    arrays = df11.to_official_unit(ct)
    with pytest.raises(dfloat.CorruptStreamError, match="hold 9999 elements"):
        df11.from_official_unit(arrays, [("x", (9999,))])
    with pytest.raises(dfloat.DFloatError, match=">= 240"):
        df11.to_official_unit(dfloat.compress_tensor(all_bf16_patterns()))
