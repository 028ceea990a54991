"""What the Triton launcher decides on the host: which source it jits and which kernel variant a unit gets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import dfloat
from dfloat.testing import fibonacci_exponents, with_exponent_counts

sys.path.insert(0, str(Path(__file__).parent))
from kernel_cases import staircase  # noqa: E402

ROOT = Path(__file__).parents[2]


def test_launcher_runs_the_checked_source():
    """The AOT check compiles kernels/triton_kernel.py; the launcher must jit that same function."""
    pytest.importorskip("triton")
    from dfloat.kernels import triton_decode, triton_kernel

    assert Path(triton_kernel.__file__).resolve() == ROOT / "kernels" / "triton_kernel.py"
    assert triton_decode._kernel().fn is triton_kernel.decode_kernel


def test_subtable_depth_is_the_longest_codes_extra_lookups():
    from dfloat.kernels.cuda_decode import host_tables
    from dfloat.kernels.triton_decode import subtable_depth

    cases = [
        (dfloat.compress_tensor(with_exponent_counts({120: 50, 121: 50}), allow_raw=False), 0),  # 1-bit codes
        (dfloat.compress_tensor(with_exponent_counts(fibonacci_exponents(20)), allow_raw=False,
                                max_code_length=9), 1),
        (dfloat.compress_tensor(with_exponent_counts(fibonacci_exponents(20)), allow_raw=False,
                                max_code_length=16), 1),
        (dfloat.compress_tensor(with_exponent_counts(fibonacci_exponents(20)), allow_raw=False,
                                max_code_length=17), 2),
        (staircase(n_per_symbol=2)[1], 3),  # 32-bit codes
    ]
    for ct, depth in cases:
        assert subtable_depth(host_tables(ct)[0]) == depth, int(ct.code.max())


def test_lanes_cover_the_block_up_to_1024():
    from dfloat.kernels.triton_decode import _lanes

    assert [_lanes(w) for w in (1, 16, 17, 256, 512, 1000, 1024, 1025, 4096)] == \
        [16, 16, 32, 256, 512, 1024, 1024, 1024, 1024]
