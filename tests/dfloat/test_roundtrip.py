"""Exactness: every decoder path returns the original bits, for every pattern and every awkward size."""

import pytest
import torch

import dfloat
from dfloat.integrity import check_members
from dfloat.reference import reference_decode
from dfloat.testing import (
    all_bf16_patterns,
    bits,
    fibonacci_exponents,
    random_bits,
    weights_like,
    with_exponent_counts,
)

SMALL = dict(bytes_per_window=4, windows_per_block=4)  # many blocks even for small inputs


def roundtrip(t, **opts):
    ct = dfloat.compress_tensor(t, allow_raw=False, **opts)
    out = dfloat.decompress_tensor(ct, backend="cpu")
    assert out.shape == t.shape and out.dtype == torch.bfloat16
    assert torch.equal(bits(out), bits(t))
    assert torch.equal(bits(reference_decode(ct)), bits(t))
    check_members(ct, out.reshape(-1))
    return ct


@pytest.mark.parametrize("opts", [{}, SMALL, dict(bytes_per_window=8, windows_per_block=512)])
def test_all_65536_patterns(opts):
    roundtrip(all_bf16_patterns(), **opts)


@pytest.mark.parametrize("n", [0, 1, 2, 31, 32, 33, 127, 128, 129, 4095, 4097, 10_000])
def test_awkward_sizes(n):
    roundtrip(weights_like(n, seed=n), **SMALL)
    roundtrip(weights_like(n, seed=n))


def test_sizes_around_window_and_block_boundaries():
    # with 4-byte windows and codes of exactly 1 bit (two symbols), a window is 32 weights, a block 128
    for n in (31, 32, 33, 127, 128, 129, 255, 257):
        roundtrip(with_exponent_counts({120: n // 2, 121: n - n // 2}), **SMALL)


def test_one_symbol_and_256_symbols():
    roundtrip(with_exponent_counts({127: 5000}), **SMALL)
    ct = roundtrip(random_bits(20_000), **SMALL)
    assert int((ct.code > 0).sum()) == 256


@pytest.mark.parametrize("limit", [9, 24, 32])
def test_codes_at_the_length_limit(limit):
    t = with_exponent_counts(fibonacci_exponents(26))  # unlimited depth 25
    ct = roundtrip(t, max_code_length=limit, bytes_per_window=4, windows_per_block=8)
    assert int(ct.code.max()) == min(limit, 25)


def test_non_contiguous_and_shaped_tensors():
    base = weights_like(64 * 48).view(64, 48)
    roundtrip(base.t())
    roundtrip(base[:, ::3])
    roundtrip(base.view(8, 8, 48))


def test_multi_member_unit_splits_back():
    parts = {"a": weights_like(1000, 1).view(10, 100), "b": weights_like(37, 2), "c": weights_like(5000, 3)}
    ct = dfloat.compress_tensors(parts, allow_raw=False, **SMALL)
    flat = dfloat.decompress_tensor(ct)
    assert flat.shape == (6037,)
    for name, view in ct.split(flat).items():
        assert torch.equal(bits(view), bits(parts[name])) and view.shape == parts[name].shape


def test_decode_into_a_callers_buffer():
    t = weights_like(10_000)
    ct = dfloat.compress_tensor(t)
    buf = torch.full((12_000,), 7.0, dtype=torch.bfloat16)
    out = dfloat.decompress_tensor(ct, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(bits(buf[:10_000]), bits(t)) and (buf[10_000:] == 7).all()


def test_real_weights_shrink_and_roundtrip(minilm_bf16):
    t = minilm_bf16[:2_000_000]
    ct = dfloat.compress_tensor(t)
    assert torch.equal(bits(dfloat.decompress_tensor(ct)), bits(t))
    assert ct.nbytes < 0.68 * 2 * t.numel()


def test_raw_fallback_for_tiny_or_incompressible():
    tiny = weights_like(10)
    assert dfloat.compress_tensor(tiny).mode == "raw"
    noise = random_bits(50_000)
    ct = dfloat.compress_tensor(noise)
    assert ct.mode == "raw" and ct.nbytes == 2 * noise.numel()
    assert torch.equal(bits(dfloat.decompress_tensor(ct)), bits(noise))


def test_nbytes_counts_every_stored_array():
    ct = dfloat.compress_tensor(weights_like(50_000), allow_raw=False)
    expected = sum(
        t.numel() * t.element_size()
        for t in (ct.encoded_exponent, ct.sign_mantissa, ct.gaps, ct.output_positions, ct.code)
    )
    assert ct.nbytes == expected


def test_store_raw_keeps_any_dtype():
    t = torch.randn(33, 7)
    ct = dfloat.store_raw(t)
    assert ct.mode == "raw" and torch.equal(dfloat.decompress_tensor(ct), t)
