"""The CUDA kernel's own source (kernels/cuda/decode.cu), run on the CPU: one std::thread per CUDA thread.

tests/kernels/cuda_emu.cpp supplies threadIdx, __syncthreads, warp shuffles and shared memory, and the host side
is the real one (cuda_decode.plan and cuda_decode.host_tables), so these tests check the kernel's logic, its
launch plan and its bounds without a GPU. They need g++ with C++20 (<barrier>); without it they are skipped.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dfloat
from dfloat.kernels import cuda_decode
from dfloat.reference import reference_decode
from dfloat.testing import all_bf16_patterns, bits, fibonacci_exponents, weights_like, with_exponent_counts

sys.path.insert(0, str(Path(__file__).parent))
from kernel_cases import flip_bytes, staircase, with_positions  # noqa: E402

HERE = Path(__file__).parent
SOURCE = Path(cuda_decode.__file__).parent / "cuda" / "decode.cu"
GUARD = 40  # elements each side of the output that must stay untouched
FILL = 0x5A5A


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed")
    lib = tmp_path_factory.mktemp("cuda_emu") / "emu.so"
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-pthread",
        "-shared",
        "-fPIC",
        f'-DDECODE_CU="{SOURCE}"',
        "-o",
        str(lib),
        str(HERE / "cuda_emu.cpp"),
    ]
    if os.environ.get(
        "DFLOAT_EMU_SANITIZE"
    ):  # e.g. "address", with LD_PRELOAD=$(g++ -print-file-name=libasan.so)
        cmd[1:1] = [f"-fsanitize={os.environ['DFLOAT_EMU_SANITIZE']}", "-g"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        if "barrier" in res.stderr and "No such file" in res.stderr:
            pytest.skip("g++ without C++20 <barrier>")
        raise AssertionError(f"building the emulator failed:\n{res.stderr[-4000:]}")
    dll = ctypes.CDLL(str(lib))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    dll.emu_launch.argtypes = [
        ctypes.c_char_p,
        i32,
        i32,
        i64,
        p,
        i64,
        p,
        p,
        i64,
        p,
        i32,
        p,
        i32,
        i32,
        p,
        p,
        p,
        i64,
        i32,
        i32,
        i32,
        i32,
        i32,
        p,
    ]
    dll.emu_launch.restype = i32
    return dll


def emu_decode(
    emu,
    ct,
    *,
    offset: int = GUARD,
    smem_limit: int = cuda_decode.SMEM_DEFAULT,
    smem_optin: int = cuda_decode.SMEM_DEFAULT,
    smem_per_sm: int | None = None,
):
    """Decode with the emulated kernel into the middle of a guarded buffer; returns (words, status).

    The launch plan and the argument list are cuda_decode's own (plan, cuda_tables, launch_args).
    """
    tables, lut_sym, lut_info = (
        torch.from_numpy(a.view(np.int32).reshape(-1)).clone()  # clone: 16-byte aligned
        for a in cuda_decode.cuda_tables(ct)
    )
    plan = cuda_decode.plan(
        ct.bytes_per_window,
        ct.windows_per_block,
        ct.n_blocks,
        tables.numel() // 256,
        smem_limit=smem_limit,
        smem_optin=smem_optin,
        smem_per_sm=smem_per_sm,
    )
    buf = torch.full((ct.numel + offset + GUARD,), FILL, dtype=torch.int16)
    out = buf[offset : offset + ct.numel]
    status = torch.tensor([0, 2**31 - 1], dtype=torch.int32)
    if ct.numel and ct.n_blocks:
        arrays = [
            t.reshape(-1).contiguous()
            for t in (ct.encoded_exponent, ct.sign_mantissa, ct.gaps, ct.output_positions)
        ]
        args = cuda_decode.launch_args(ct, plan, *arrays, tables, lut_sym, lut_info, out, status)
        rc = emu.emu_launch(plan.kernel.encode(), plan.grid, plan.block, plan.smem, *(int(a) for a in args))
        assert rc == 0
    assert bool((buf[:offset] == FILL).all()) and bool((buf[offset + ct.numel :] == FILL).all()), (
        "wrote outside out"
    )
    return out.clone(), status.numpy()


def check_exact(emu, t, ct=None, **kw):
    ct = ct if ct is not None else dfloat.compress_tensor(t, allow_raw=False, **kw)
    for offset in (GUARD, GUARD + 3):  # 16-byte aligned output (wide stores) and misaligned (scalar stores)
        words, status = emu_decode(emu, ct, offset=offset)
        assert status[0] == 0, cuda_decode.explain(int(status[0]))
        assert torch.equal(words, bits(t)), f"mismatch at offset {offset}"
    return ct


SMALL = dict(bytes_per_window=4, windows_per_block=4)


@pytest.mark.parametrize(
    "opts",
    [
        {},
        dict(bytes_per_window=8, windows_per_block=512),
        dict(bytes_per_window=4, windows_per_block=64),
        dict(bytes_per_window=32, windows_per_block=40),
        dict(bytes_per_window=5, windows_per_block=64),
    ],
    ids=["ours-w32-t256", "official-w8-t512", "generic-w4-t64", "generic-w32-t40", "generic-odd-window"],
)
def test_all_65536_patterns(emu, opts):
    t = all_bf16_patterns()
    ct = check_exact(emu, t, **opts)
    assert torch.equal(bits(reference_decode(ct)), bits(t))


@pytest.mark.parametrize("wpb", [2100, 2050])
def test_more_windows_than_threads(emu, wpb):
    t = weights_like(40_000, seed=5)
    ct = check_exact(
        emu, t, bytes_per_window=4, windows_per_block=wpb
    )  # 3 windows per thread (the last: 1 or 3)
    assert cuda_decode.plan(4, wpb, ct.n_blocks, 1).windows_per_thread == 3


@pytest.mark.parametrize("limit", [9, 16])
def test_length_limited_codes(emu, limit):
    t = with_exponent_counts(fibonacci_exponents(20))  # unlimited depth 19
    ct = check_exact(emu, t, max_code_length=limit, bytes_per_window=4, windows_per_block=32)
    assert int(ct.code.max()) == limit


@pytest.mark.parametrize(
    "opts",
    [dict(bytes_per_window=4, windows_per_block=32), {}, dict(bytes_per_window=8, windows_per_block=512)],
)
def test_32_bit_codes(emu, opts):
    t, ct = staircase(**opts)
    check_exact(emu, t, ct=ct)


def test_deep_tables_from_global_memory(emu, monkeypatch):
    monkeypatch.setattr(cuda_decode, "MAX_TABLES_IN_SMEM", 1)
    t, ct = staircase(bytes_per_window=4, windows_per_block=32)
    assert cuda_decode.host_tables(ct)[0].shape[0] > 1
    check_exact(emu, t, ct=ct)


def test_staging_in_rounds(emu):
    # one symbol: 1-bit codes, 8 * 32 * 256 codes per block, far more than a 256-byte stage: many rounds
    t = with_exponent_counts({127: 70_000, 126: 3}, seed=1)
    ct = dfloat.compress_tensor(t, allow_raw=False)
    tables = cuda_decode.host_tables(ct)[0]
    full = cuda_decode.plan(32, 256, ct.n_blocks, tables.shape[0])
    small = full.smem - full.stage_cap + cuda_decode.MIN_STAGE
    for offset in (GUARD, GUARD + 5):
        words, status = emu_decode(emu, ct, offset=offset, smem_limit=small)
        assert status[0] == 0 and torch.equal(words, bits(t))


def test_h100_plan_five_blocks_per_sm(emu):
    # on an H100 (228 KiB per SM) the plan shrinks staging so 5 blocks of our layout fit: more rounds per block
    t = weights_like(150_000, seed=13)
    ct = dfloat.compress_tensor(t, allow_raw=False)
    h100_per_sm = 233_472
    p = cuda_decode.plan(
        32, 256, ct.n_blocks, cuda_decode.cuda_tables(ct)[0].shape[0], smem_per_sm=h100_per_sm
    )
    assert cuda_decode.resident_blocks(p.smem, h100_per_sm) == 5
    assert p.stage_cap < ct.numel // ct.n_blocks  # several rounds per block
    for offset in (GUARD, GUARD + 3):
        words, status = emu_decode(emu, ct, offset=offset, smem_per_sm=h100_per_sm)
        assert status[0] == 0 and torch.equal(words, bits(t))


def test_opt_in_shared_memory(emu):
    # 192-byte windows: the slots alone exceed 48 KiB, so the plan takes an H100's opt-in maximum (227 KiB)
    t = weights_like(60_000, seed=11)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=192, windows_per_block=256)
    h100_optin = 232_448
    p = cuda_decode.plan(
        192, 256, ct.n_blocks, cuda_decode.host_tables(ct)[0].shape[0], smem_optin=h100_optin
    )
    assert p.smem == h100_optin
    for offset in (GUARD, GUARD + 3):
        words, status = emu_decode(emu, ct, offset=offset, smem_optin=h100_optin)
        assert status[0] == 0 and torch.equal(words, bits(t))
    with pytest.raises(dfloat.errors.BackendUnavailableError, match="shared memory"):
        cuda_decode.plan(192, 256, ct.n_blocks, 1)  # without opt-in it cannot fit


@pytest.mark.parametrize("n", [0, 1, 2, 31, 32, 33, 127, 128, 129, 4095, 4097])
def test_awkward_sizes(emu, n):
    check_exact(emu, weights_like(n, seed=n), **SMALL)
    check_exact(emu, weights_like(n, seed=n), bytes_per_window=8, windows_per_block=512)
    check_exact(emu, weights_like(n, seed=n))


def test_window_and_block_boundaries(emu):
    # 4-byte windows of 1-bit codes hold 32 weights; 4 windows per block: 128
    for n in (31, 32, 33, 127, 128, 129, 255, 257):
        check_exact(emu, with_exponent_counts({120: n // 2, 121: n - n // 2}), **SMALL)


def test_multi_member_unit(emu):
    parts = {"a": weights_like(1000, 1).view(10, 100), "b": weights_like(37, 2), "c": weights_like(5000, 3)}
    ct = dfloat.compress_tensors(parts, allow_raw=False, **SMALL)
    flat = torch.cat([p.reshape(-1) for p in parts.values()])
    check_exact(emu, flat, ct=ct)


def test_official_unit(emu):
    df11 = pytest.importorskip("dfloat.df11")
    t = weights_like(30_000, seed=9)
    ct = dfloat.compress_tensor(t, allow_raw=False)
    arrays = df11.to_official_unit(ct)
    off = df11.from_official_unit(arrays, [("w", tuple(t.shape))])
    assert off.bytes_per_window == 8 and off.windows_per_block == 512
    check_exact(emu, t, ct=off)


def test_corrupt_streams_stay_inside_out(emu):
    t = weights_like(20_000, seed=3)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=8, windows_per_block=16)
    flagged = 0
    for trial in range(12):
        _, status = emu_decode(
            emu, flip_bytes(ct, 8, trial), offset=GUARD + trial % 2
        )  # guard checked inside
        flagged += int(status[0] != 0)
    assert flagged > 0
    from dataclasses import replace

    ones = replace(ct, encoded_exponent=torch.full_like(ct.encoded_exponent, 0xFF), _cache={})
    emu_decode(emu, ones)
    t, ct = staircase(bytes_per_window=4, windows_per_block=32)
    for trial in range(4):
        emu_decode(emu, flip_bytes(ct, 16, trial))


def test_corrupt_positions_are_reported(emu):
    t = weights_like(20_000, seed=4)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=8, windows_per_block=16)
    pos = ct.output_positions.clone()
    pos[3] += 5
    _, status = emu_decode(emu, with_positions(ct, pos))
    assert status[0] & cuda_decode.STATUS_BAD_COUNT and status[1] in (2, 3)
    pos = ct.output_positions.clone()
    pos[5] = 10**12
    _, status = emu_decode(emu, with_positions(ct, pos))
    assert status[0] & cuda_decode.STATUS_BAD_POSITIONS and status[1] == 4
    pos = ct.output_positions.clone()
    pos[2], pos[3] = pos[3].clone(), pos[2].clone()
    _, status = emu_decode(emu, with_positions(ct, pos))
    assert status[0] != 0 and status[1] <= 2


# ---- the 12-bit multi-code tables, independently of the kernel -----------------------------------------------


def _lut_by_walking_the_code(ct) -> tuple[np.ndarray, np.ndarray]:
    """lut_sym / lut_info from the code words themselves, one pattern at a time (4096 patterns: a test oracle)."""
    from dfloat.code_tables import code_of

    codes, lengths = code_of(ct)
    symbol_of = {(int(lengths[s]), int(codes[s])): s for s in range(256) if lengths[s] > 0}
    syms, infos = np.zeros(4096, np.uint32), np.zeros(4096, np.uint16)
    for p in range(4096):
        bits = [(p >> (11 - i)) & 1 for i in range(12)]
        found, used, code, length, nd, ld = [], 0, 0, 0, 0, 0
        for i, bit in enumerate(bits):
            code, length = (code << 1) | bit, length + 1
            if (length, code) in symbol_of:
                found.append(symbol_of[(length, code)])
                used, code, length = i + 1, 0, 0
                if len(found) <= 4:
                    nd, ld = len(found), used
        syms[p] = sum(s << (8 * k) for k, s in enumerate(found[:4]))
        infos[p] = len(found) | (used << 4) | (nd << 8) | (ld << 12)
    return syms, infos


@pytest.mark.parametrize("case", ["weights", "one-bit", "staircase"])
def test_lut_tables_match_the_code(case):
    if case == "weights":
        ct = dfloat.compress_tensor(weights_like(50_000, seed=2), allow_raw=False)
    elif case == "one-bit":
        ct = dfloat.compress_tensor(with_exponent_counts({120: 500, 121: 500}), allow_raw=False)
    else:
        ct = staircase()[1]
    _, lut_sym, lut_info = cuda_decode.cuda_tables(ct)
    want_sym, want_info = _lut_by_walking_the_code(ct)
    assert np.array_equal(lut_info, want_info) and np.array_equal(lut_sym, want_sym)


# ---- the gap rule ---------------------------------------------------------------------------------------------


def with_gap(ct, window: int, value: int):
    """A copy of a unit whose window ``window`` has start offset ``value`` (5 bits, packed MSB-first)."""
    from dataclasses import replace

    packed = np.unpackbits(ct.gaps.numpy())
    packed[5 * window : 5 * window + 5] = np.unpackbits(np.array([value << 3], np.uint8))[:5]
    gaps = torch.from_numpy(np.packbits(packed)[: ct.gaps.numel()].copy())
    return replace(ct, gaps=gaps, _cache={})


def gap_of(ct, window: int) -> int:
    bits = np.unpackbits(ct.gaps.numpy())[5 * window : 5 * window + 5]
    return int(np.packbits(np.concatenate([bits, np.zeros(3, np.uint8)]))[0] >> 3)


@pytest.mark.parametrize(
    "opts, window",
    [
        (dict(bytes_per_window=8, windows_per_block=16), 5),  # inside a block
        (dict(bytes_per_window=8, windows_per_block=16), 32),  # a block's first
        (dict(bytes_per_window=4, windows_per_block=2100), 2101),  # 3 per thread
        ({}, 300),
    ],
)  # our layout: block 1, window 44
def test_a_damaged_later_gap_is_reported(emu, opts, window):
    t = weights_like(30_000, seed=6)
    ct = dfloat.compress_tensor(t, allow_raw=False, **opts)
    assert window < ct.gaps.numel() * 8 // 5 and window * ct.bytes_per_window < ct.encoded_exponent.numel()
    for delta in (1, 7):
        bad = with_gap(ct, window, (gap_of(ct, window) + delta) % 32)
        _, status = emu_decode(emu, bad)  # the guard regions are checked inside
        assert status[0] & cuda_decode.STATUS_BAD_GAP, cuda_decode.explain(int(status[0]))
        assert status[1] == window // ct.windows_per_block - (window % ct.windows_per_block == 0)


def test_first_window_gap_is_not_checked_by_the_gap_rule(emu):
    # window 0 has no previous window; a wrong start there shows up as bad codes or counts, if at all
    t = weights_like(5_000, seed=8)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=8, windows_per_block=16)
    _, status = emu_decode(emu, with_gap(ct, 0, (gap_of(ct, 0) + 1) % 32))
    assert not status[0] & cuda_decode.STATUS_BAD_GAP


@pytest.mark.parametrize(
    "opts, per_window, per_block",
    [({}, 256, 65536), (dict(bytes_per_window=8, windows_per_block=512), 64, 32768)],
)
def test_a_window_and_a_block_plus_minus_one(emu, opts, per_window, per_block):
    # 1-bit codes: a window holds exactly `per_window` codes, a block `per_block`
    for n in (per_window - 1, per_window, per_window + 1, per_block - 1, per_block + 1):
        check_exact(emu, with_exponent_counts({120: n // 2, 121: n - n // 2}, seed=n), **opts)


# ---- the launch path's packed arguments ------------------------------------------------------------------------


def test_packed_launch_arguments_drive_the_kernel(emu):
    """cuda_launch.PackedLaunch as decode() uses it, with the driver replaced by the emulator: the packed C
    argument block, read back with DF_PARAMS's types, decodes bit-exact, and set() moves the output."""
    import ctypes

    from dfloat.kernels import cuda_launch

    t = weights_like(9_000, seed=12)
    ct = dfloat.compress_tensor(t, allow_raw=False, bytes_per_window=8, windows_per_block=16)
    tables, lut_sym, lut_info = (
        torch.from_numpy(a.view(np.int32).reshape(-1)).clone() for a in cuda_decode.cuda_tables(ct)
    )
    plan = cuda_decode.plan(ct.bytes_per_window, ct.windows_per_block, ct.n_blocks, tables.numel() // 256)
    arrays = [
        a.reshape(-1).contiguous()
        for a in (ct.encoded_exponent, ct.sign_mantissa, ct.gaps, ct.output_positions)
    ]
    bufs = [torch.full((ct.numel + 2 * GUARD,), FILL, dtype=torch.int16) for _ in range(2)]
    status = torch.tensor([0, 2**31 - 1], dtype=torch.int32)
    args = cuda_decode.launch_args(ct, plan, *arrays, tables, lut_sym, lut_info, bufs[0][GUARD:], status)
    kinds = [
        ctypes.c_uint64
        if isinstance(a, np.uint64)
        else ctypes.c_int64
        if isinstance(a, np.int64)
        else ctypes.c_int32
        for a in args
    ]
    launches = []

    def fake_launch(function, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        values = [ctypes.cast(params[i], ctypes.POINTER(k)).contents.value for i, k in enumerate(kinds)]
        launches.append((function.value, stream))
        return emu.emu_launch(plan.kernel.encode(), gx, bx, smem, *values)

    class FakeDriver:
        cuLaunchKernel = staticmethod(fake_launch)

    packed = cuda_launch.PackedLaunch(FakeDriver(), 1234, 0, plan.grid, plan.block, plan.smem, args)
    packed.launch(99)
    packed.set(cuda_decode.UnitLaunch.OUT, bufs[1][GUARD:].data_ptr())
    packed.launch(98)
    assert launches == [(1234, 99), (1234, 98)] and status[0] == 0
    for buf in bufs:
        assert torch.equal(buf[GUARD : GUARD + ct.numel], bits(t))
        assert bool((buf[:GUARD] == FILL).all()) and bool((buf[GUARD + ct.numel :] == FILL).all())


def test_prepared_launch_takes_the_rawkernel_handle_and_decodes(emu, monkeypatch):
    """UnitLaunch as decode() builds it, with CuPy and the CUDA driver replaced: the kernel comes from a RawModule
    shaped like CuPy 14's, whose get_function gives a RawKernel with no ``ptr`` of its own (the handle is
    ``.kernel.ptr``); the launch is packed for cuLaunchKernel with that handle and decodes bit-exact through the
    emulated kernel, at a 16-byte aligned output and then a misaligned one."""
    import ctypes
    from types import SimpleNamespace

    from fake_cupy import FakeCupy

    from dfloat.kernels import cuda_launch, gpu_common

    fake = FakeCupy()
    monkeypatch.setattr(cuda_decode, "_cupy", lambda: fake)
    for cache in ("_MODULES", "_FUNCTIONS", "_POINTERS", "_SCRATCH"):
        monkeypatch.setattr(cuda_decode, cache, {})
    h100 = SimpleNamespace(shared_memory_per_block_optin=232_448, shared_memory_per_multiprocessor=233_472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    launches = []

    def fake_launch(function, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        names = {k.kernel.ptr: name for m in fake.modules for name, k in m.kernels.items()}
        kinds = [
            {
                np.dtype(np.uint64): ctypes.c_uint64,
                np.dtype(np.int64): ctypes.c_int64,
                np.dtype(np.int32): ctypes.c_int32,
            }[np.asarray(a).dtype]
            for a in ul.args
        ]
        values = [ctypes.cast(params[i], ctypes.POINTER(k)).contents.value for i, k in enumerate(kinds)]
        launches.append((function.value, stream))
        return emu.emu_launch(names[function.value].encode(), gx, bx, smem, *values)

    monkeypatch.setattr(cuda_launch, "driver", lambda: SimpleNamespace(cuLaunchKernel=fake_launch))
    t = weights_like(150_000, seed=21)
    ct = dfloat.compress_tensor(t, allow_raw=False)
    buf = torch.full((ct.numel + 2 * GUARD,), FILL, dtype=torch.int16)
    out = buf[GUARD : GUARD + ct.numel].view(torch.bfloat16)
    ul = cuda_decode.UnitLaunch(ct, gpu_common.launch_arrays(ct, out), torch.device("cpu"))
    kernel = fake.modules[0].kernels[ul.plan.kernel]
    assert ul.function is kernel and not hasattr(kernel, "ptr")
    assert ul.packed is not None, "the RawKernel's handle was not found: decodes would take CuPy's launch"
    assert (
        ul.plan.kernel == "dfloat_decode_w32_t256" and cuda_decode.resident_blocks(ul.plan.smem, 233_472) == 5
    )
    for offset in (GUARD, GUARD + 3):
        buf.fill_(FILL)
        ul.launch(buf[offset:].data_ptr(), 77)
        assert torch.equal(buf[offset : offset + ct.numel], bits(t)), offset
        assert bool((buf[:offset] == FILL).all()) and bool((buf[offset + ct.numel :] == FILL).all())
    assert launches == [(kernel.kernel.ptr, 77)] * 2 and not kernel.calls  # never CuPy's launch
    assert int(ul.scratch[0]) == 0 and fake.compiles == 1


@pytest.mark.parametrize("per_sm", [233_472, 167_936, 102_400, 65_536], ids=["sm90", "sm80", "sm86", "sm75"])
@pytest.mark.parametrize("kernel", sorted(cuda_decode.BLOCKS_PER_SM))
@pytest.mark.parametrize("n_tables", [1, 3])
def test_plan_shares_an_sm_as_the_hardware_counts(per_sm, kernel, n_tables):
    """Shared memory is allocated per block as its bytes + the 1 KiB reserve, rounded up to 128 B: a plan that shrinks
    staging for BLOCKS_PER_SM blocks must fit them after that rounding."""
    bpw, wpb = next(k for k, v in cuda_decode.SPECIALISED.items() if v == kernel)
    want = cuda_decode.BLOCKS_PER_SM[kernel]
    p = cuda_decode.plan(bpw, wpb, 1000, n_tables, smem_per_sm=per_sm)
    share = (
        per_sm // want // cuda_decode.SMEM_GRANULE * cuda_decode.SMEM_GRANULE
        - cuda_decode.SMEM_RESERVED_PER_BLOCK
    )
    if (
        p.smem <= share
    ):  # staging was shrunk for `want` blocks (else the fixed part alone is too big for that)
        assert cuda_decode.resident_blocks(p.smem, per_sm) >= want
    assert cuda_decode.resident_blocks(p.smem, per_sm) >= 1


def test_resident_blocks_rounds_like_the_hardware():
    # the arithmetic: 45,664 B + 1 KiB reserve -> 46,720 B per block -> 4 blocks in 228 KiB, not 5
    assert cuda_decode.resident_blocks(45_664, 233_472) == 4
    assert cuda_decode.resident_blocks(45_568, 233_472) == 5  # 46,592 B per block: 5 x 46,592 = 232,960
    assert cuda_decode.resident_blocks(0, 233_472) == 228
