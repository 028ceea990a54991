"""Cases for the Triton decoder under TRITON_INTERPRET=1, on CPU tensors: bit-exact without a GPU.

Run by tests/kernels/test_triton_interpret.py in a child pytest with TRITON_INTERPRET=1 set before anything
imports triton: Triton decorates its own library functions (tl.zeros, tl.cumsum, ...) when it is imported, so the
interpreter must be chosen before that, and setting it for the whole test process would change what other tests
see. Run directly with ``TRITON_INTERPRET=1 pytest tests/kernels/triton_interpret_cases.py``.
The interpreter runs numpy per operation (about half a second per program of 1024 lanes), so the inputs are small
and the blocks large.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dfloat
from dfloat.errors import CorruptStreamError
from dfloat.reference import reference_decode
from dfloat.testing import all_bf16_patterns, bits, fibonacci_exponents, weights_like, with_exponent_counts

sys.path.insert(0, str(Path(__file__).parent))
from kernel_cases import flip_bytes, staircase, with_positions  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (see test_triton_interpret.py)",
                allow_module_level=True)
pytest.importorskip("triton")
GUARD = 24
FILL = 0x5A5A


def triton_decode(ct, offset: int = GUARD, check: bool = False) -> torch.Tensor:
    """Decode into the middle of a guarded buffer and check that nothing outside the output changed."""
    from dfloat.kernels import triton_decode as td

    buf = torch.full((ct.numel + offset + GUARD,), FILL, dtype=torch.int16)
    out = buf[offset:offset + ct.numel].view(torch.bfloat16)
    if check:
        td.decode(ct, out, check=True)
    else:
        from dfloat.format import mark_trusted

        mark_trusted(ct)  # the decoder itself, as after verify=False (the checksums would refuse damage first)
        got = dfloat.decompress_tensor(ct, device="cpu", backend="triton",
                                       out=buf[offset:].view(torch.bfloat16))
        assert got.data_ptr() == out.data_ptr()
    assert (buf[:offset] == FILL).all() and (buf[offset + ct.numel:] == FILL).all(), "wrote outside out"
    return out.clone()


def exact(t, ct=None, **opts):
    ct = ct if ct is not None else dfloat.compress_tensor(t, allow_raw=False, **opts)
    got = triton_decode(ct, check=True)
    assert torch.equal(bits(got), bits(t))
    return ct


def test_all_65536_patterns():
    t = all_bf16_patterns()
    ct = exact(t, bytes_per_window=4, windows_per_block=2048)  # 2 windows per lane
    assert torch.equal(bits(reference_decode(ct)), bits(t))


def test_32_bit_codes():
    t, ct = staircase(n_per_symbol=30, bytes_per_window=4, windows_per_block=512)
    exact(t, ct=ct)
    assert torch.equal(bits(reference_decode(ct)), bits(t))


def test_length_limited_code():
    t = with_exponent_counts(fibonacci_exponents(20))
    ct = exact(t, max_code_length=9, bytes_per_window=4, windows_per_block=1024)
    assert int(ct.code.max()) == 9


@pytest.mark.parametrize("n", [0, 1, 2, 31, 32, 33, 127, 128, 129, 257])
def test_sizes_around_windows_and_blocks(n):
    # 1-bit codes, 4-byte windows: a window is 32 weights, a block of 4 windows 128
    exact(with_exponent_counts({120: n // 2, 121: n - n // 2}), bytes_per_window=4, windows_per_block=4)


def test_one_element_and_defaults():
    exact(weights_like(1))
    exact(weights_like(3000, seed=2))  # our default layout: 32-byte windows, 256 per block


def test_multi_member_unit():
    parts = {"a": weights_like(1000, 1).view(10, 100), "b": weights_like(37, 2), "c": weights_like(5000, 3)}
    ct = dfloat.compress_tensors(parts, allow_raw=False, bytes_per_window=4, windows_per_block=1024)
    flat = dfloat.decompress_tensor(ct, device="cpu", backend="triton")
    for name, view in ct.split(flat).items():
        assert torch.equal(bits(view), bits(parts[name])) and view.shape == parts[name].shape


def test_official_unit():
    df11 = pytest.importorskip("dfloat.df11")
    t = weights_like(12_000, seed=9)
    arrays = df11.to_official_unit(dfloat.compress_tensor(t, allow_raw=False))
    off = df11.from_official_unit(arrays, [("w", tuple(t.shape))])
    exact(t, ct=off)


def test_misaligned_output_buffer():
    t = weights_like(2000, seed=4)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=4, windows_per_block=1024)
    assert torch.equal(bits(triton_decode(ct, offset=GUARD + 3)), bits(t))


def test_corrupt_streams_stay_inside_out_and_are_reported():
    t = weights_like(6000, seed=3)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=4, windows_per_block=256)
    raised = 0
    for trial in range(3):
        bad = flip_bytes(ct, 6, trial)
        triton_decode(bad)  # never writes outside out
        try:
            triton_decode(bad, check=True)
        except CorruptStreamError as e:
            raised += 1
            assert "unit tensor" in str(e) and "block" in str(e)
    assert raised > 0
    pos = ct.output_positions.clone()
    pos[1] += 3
    with pytest.raises(CorruptStreamError, match="block 0"):
        triton_decode(with_positions(ct, pos), check=True)
    pos = ct.output_positions.clone()
    pos[1] = 10**12
    with pytest.raises(CorruptStreamError, match="out of order or out of range"):
        triton_decode(with_positions(ct, pos), check=True)
    from dataclasses import replace

    ones = replace(ct, encoded_exponent=torch.full_like(ct.encoded_exponent, 0xFF), _cache={})
    triton_decode(ones)


def test_registry_picks_cpu_for_cpu_tensors():
    from dfloat.kernels import registry

    assert registry.available_backends("cpu")[0] == registry.Backend.CPU
    assert registry.Backend.TRITON in registry.available_backends("cpu")


def test_tables_have_the_multi_symbol_entries():
    from dfloat.kernels.cuda_decode import host_tables

    ct = dfloat.compress_tensor(with_exponent_counts({120: 500, 121: 500}), allow_raw=False)
    _, msym, minfo = host_tables(ct)
    assert (minfo & 15 == 8).all() and ((minfo >> 8) & 15 == 4).all()  # 1-bit codes: 8 per byte, 4 stored
    assert np.all((msym & 0xFF) >= 120)


def with_gap(ct, window: int, value: int):
    """A copy of a unit whose window ``window`` claims its first code starts at bit ``value`` of the window."""
    from dataclasses import replace

    bits = np.unpackbits(ct.gaps.numpy())
    bits[5 * window:5 * window + 5] = [(value >> (4 - i)) & 1 for i in range(5)]
    return replace(ct, gaps=torch.from_numpy(np.packbits(bits)[:ct.gaps.numel()]), _cache={})


def gap_of(ct, window: int) -> int:
    bits = np.unpackbits(ct.gaps.numpy())[5 * window:5 * window + 5]
    return int("".join(map(str, bits)), 2)


@pytest.mark.parametrize("windows_per_block, window", [(64, 5), (64, 64), (2048, 1024), (2048, 1100)])
def test_a_damaged_later_gap_is_reported(windows_per_block, window):
    # window 5: inside block 0; 64: the first window of block 1 (checked by block 0's last lane); 1024: the first
    # window of the second round of a 2048-window block; 1100: inside that round
    t = weights_like(2_000 if windows_per_block < 1024 else 14_000, seed=5)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=4, windows_per_block=windows_per_block)
    assert (window + 2) * 4 < ct.encoded_exponent.numel()
    bad = with_gap(ct, window, (gap_of(ct, window) + 7) % 32)
    with pytest.raises(CorruptStreamError, match="window start offsets disagree with the codes") as e:
        triton_decode(bad, check=True)
    assert f"block {window // windows_per_block - (window % windows_per_block == 0)} " in str(e.value)
