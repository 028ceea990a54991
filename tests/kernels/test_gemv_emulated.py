"""The fused decode-GEMV kernel (kernels/cuda/gemv.cu) run on the CPU, thread by thread.

tests/kernels/gemv_emu.cpp supplies threadIdx, __syncthreads, warp shuffles and shared memory; the launch plan and
the argument list are the real ones (cuda_gemv.plan, cuda_gemv.launch_args). The contract checked: the fused
product equals its twin (the same kernel on plain BF16 weights) bit for bit, on odd shapes, 1..16 rows of x and
every BF16 pattern as a weight; the matrix decoder gives back the original bits. Needs g++ with C++20.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dfloat.kernels import cuda_gemv, gemv_layout
from dfloat.testing import all_bf16_patterns, bits, weights_like

HERE = Path(__file__).parent
SOURCE = Path(cuda_gemv.__file__).parent / "cuda" / "gemv.cu"
GUARD = 16
FILL = 0x5A5A


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed")
    lib = tmp_path_factory.mktemp("gemv_emu") / "emu.so"
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-ffp-contract=off",
        "-pthread",
        "-shared",
        "-fPIC",
        f'-DGEMV_CU="{SOURCE}"',
        "-o",
        str(lib),
        str(HERE / "gemv_emu.cpp"),
    ]
    if os.environ.get("DFLOAT_EMU_SANITIZE"):
        cmd[1:1] = [f"-fsanitize={os.environ['DFLOAT_EMU_SANITIZE']}", "-g"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        if "barrier" in res.stderr and "No such file" in res.stderr:
            pytest.skip("g++ without C++20 <barrier>")
        raise AssertionError(f"building the emulator failed:\n{res.stderr[-4000:]}")
    dll = ctypes.CDLL(str(lib))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    dll.emu_gemv.argtypes = [
        ctypes.c_char_p,
        i32,
        i32,
        i32,
        i32,
        i64,
        p,
        i64,
        p,
        p,
        p,
        i32,
        p,
        p,
        p,
        i32,
        i32,
        i32,
        i32,
        i64,
        i64,
        i32,
        p,
    ]
    dll.emu_gemv.restype = i32
    return dll


def _guarded(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.full((rows * cols + 2 * GUARD,), FILL, dtype=torch.int16)
    return buf, buf[GUARD : GUARD + rows * cols].view(torch.bfloat16).view(rows, cols)


def _untouched(buf: torch.Tensor) -> bool:
    return bool((buf[:GUARD] == FILL).all()) and bool((buf[-GUARD:] == FILL).all())


def run(
    emu,
    kind: str,
    gm: gemv_layout.GemvMatrix | None,
    x: torch.Tensor | None,
    *,
    weight=None,
    rows_per_tile: int = 0,
    threads: int = 0,
) -> torch.Tensor:
    """One emulated launch: "fused" / "twin" return y (rows of x, N); "decode" returns W."""
    if gm is not None:
        n, k = gm.shape
        rows_per_tile, threads, n_tiles, peek, groups = (
            gm.rows_per_tile,
            gm.threads,
            gm.n_tiles,
            gm.peek,
            gm.groups,
        )
        arrays = (gm.enc, gm.warp_offsets, gm.sm, gm.lut)
    else:
        n, k = weight.shape
        n_tiles, peek, groups = -(-n // rows_per_tile), 1, -(-k // (4 * threads))
        arrays = (None, None, None, None)
    batch = x.shape[0] if x is not None else 1
    pl = cuda_gemv.plan(kind, rows_per_tile, threads, n_tiles, peek, batch)
    if kind == "decode":
        buf, out = _guarded(n, k)
        y = None
    else:
        buf, y = _guarded(batch, n)
        out = None
    args = cuda_gemv.launch_args(
        arrays,
        peek=peek,
        w=weight,
        x=x,
        y=y,
        n=n,
        k=k,
        groups=groups,
        batch=batch if kind != "decode" else 0,
        ldx=x.stride(0) if x is not None else 0,
        ldy=n,
        vec_x=x is not None and cuda_gemv.x_is_vectorisable(x),
    )
    rc = emu.emu_gemv(
        kind.encode(),
        rows_per_tile,
        pl.rows_per_pass,
        pl.grid,
        pl.block,
        pl.smem,
        *(int(a) for a in args),
        out.data_ptr() if out is not None else 0,
    )
    assert rc == 0
    assert _untouched(buf), "wrote outside the output"
    return (out if kind == "decode" else y).clone()


def fused_and_twin(emu, w: torch.Tensor, x: torch.Tensor, **layout) -> tuple[torch.Tensor, torch.Tensor]:
    gm = gemv_layout.encode(w, **layout)
    fused = run(emu, "fused", gm, x)
    twin = run(emu, "twin", None, x, weight=w, rows_per_tile=gm.rows_per_tile, threads=gm.threads)
    return fused, twin


def rand_x(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g).to(torch.bfloat16)


CASES = [  # (N, K, rows of x, rows_per_tile, threads): K and N multiples of nothing, every pass split
    (1, 1, 1, 2, 32),
    (3, 5, 2, 1, 32),
    (37, 131, 3, 4, 32),
    (13, 1029, 16, 8, 64),
    (29, 263, 9, 2, 32),
    (11, 97, 12, 8, 32),
    (66, 61, 5, 4, 64),
    (9, 700, 7, 2, 128),
    (17, 300, 4, 8, 32),
    (5, 129, 8, 1, 32),
    (7, 33, 6, 2, 32),
    (10, 255, 10, 4, 32),
    (19, 67, 11, 8, 32),
    (6, 45, 13, 2, 32),
    (4, 130, 14, 4, 32),
    (23, 19, 15, 1, 32),
]


@pytest.mark.parametrize("n,k,rows,r,t", CASES, ids=[f"{c[0]}x{c[1]}-b{c[2]}-r{c[3]}-t{c[4]}" for c in CASES])
def test_fused_equals_twin(emu, n, k, rows, r, t):
    w = weights_like(n * k, seed=n + k).view(n, k)
    x = rand_x(rows, k, seed=rows)
    fused, twin = fused_and_twin(emu, w, x, rows_per_tile=r, threads=t)
    assert torch.equal(bits(fused), bits(twin))
    # the twin is a GEMV: close to a float64 product (BF16 rounding of the output)
    ref = x.double() @ w.double().T
    assert torch.allclose(twin.double(), ref, rtol=1e-2, atol=1e-3)


def test_every_bf16_pattern_as_a_weight(emu):
    w = all_bf16_patterns().view(256, 256)  # every exponent, sign and mantissa; NaN and infinities included
    x = rand_x(3, 256, seed=7)
    gm = gemv_layout.encode(w, rows_per_tile=8, threads=32)
    assert torch.equal(bits(run(emu, "decode", gm, None)), bits(w))
    fused = run(emu, "fused", gm, x)
    twin = run(emu, "twin", None, x, weight=w, rows_per_tile=8, threads=32)
    assert torch.equal(bits(fused), bits(twin))


@pytest.mark.parametrize("rows", [1, 8, 16])
def test_every_exponent_in_finite_weights(emu, rows):
    # each of the 254 finite exponents, in a matrix with K = 2 * 127: products span the whole f32 range
    e = torch.arange(1, 255, dtype=torch.int32)
    g = torch.Generator().manual_seed(rows)
    mant = torch.randint(0, 256, (21, 254), generator=g, dtype=torch.int32)
    words = ((mant & 0x80) << 8) | (e << 7) | (mant & 0x7F)
    w = words.to(torch.int16).view(torch.bfloat16)
    x = rand_x(rows, 254, seed=rows) * 1e-3
    fused, twin = fused_and_twin(emu, w, x, rows_per_tile=4, threads=32)
    assert torch.equal(bits(fused), bits(twin))


@pytest.mark.parametrize(
    "shape,r,t", [((5, 3), 2, 32), ((37, 1029), 8, 64), ((64, 257), 4, 128), ((9, 4096), 1, 32)]
)
def test_decode_kernel_gives_back_the_matrix(emu, shape, r, t):
    w = weights_like(shape[0] * shape[1], seed=shape[1]).view(*shape)
    gm = gemv_layout.encode(w, rows_per_tile=r, threads=t)
    assert torch.equal(bits(run(emu, "decode", gm, None)), bits(w))
    assert torch.equal(bits(gemv_layout.decode(gm)), bits(w))


def test_unaligned_x_rows_take_the_scalar_path(emu):
    w = weights_like(12 * 96, seed=3).view(12, 96)
    wide = rand_x(4, 97, seed=4)
    x = wide[:, 1:]  # row stride 97: not a multiple of 4, so four scalar loads per group
    assert not cuda_gemv.x_is_vectorisable(x)
    gm = gemv_layout.encode(w, rows_per_tile=4, threads=32)
    fused = run(emu, "fused", gm, x)
    assert torch.equal(bits(fused), bits(run(emu, "fused", gm, x.contiguous())))
    assert torch.equal(bits(fused), bits(run(emu, "twin", None, x, weight=w, rows_per_tile=4, threads=32)))


def test_each_row_of_x_depends_on_itself_only(emu):
    w = weights_like(21 * 150, seed=8).view(21, 150)
    x = rand_x(16, 150, seed=9)
    gm = gemv_layout.encode(w, rows_per_tile=4, threads=32)
    all_rows = run(emu, "fused", gm, x)
    for lo, hi in ((0, 1), (3, 8), (5, 16)):
        assert torch.equal(bits(run(emu, "fused", gm, x[lo:hi])), bits(all_rows[lo:hi]))


def test_corrupt_streams_stay_in_bounds(emu):
    w = weights_like(16 * 200, seed=5).view(16, 200)
    gm = gemv_layout.encode(w, rows_per_tile=4, threads=32)
    x = rand_x(2, 200, seed=1)
    from dataclasses import replace

    g = np.random.default_rng(0)
    enc = gm.enc.clone()
    enc[torch.from_numpy(g.integers(0, enc.numel(), 8))] = torch.from_numpy(
        g.integers(-(2**31), 2**31 - 1, 8, dtype=np.int64)
    ).int()
    run(emu, "fused", replace(gm, enc=enc), x)  # wrong values, but the guards around y stay untouched
    woff = gm.warp_offsets.clone()
    woff[2] = 10**9
    run(emu, "fused", replace(gm, warp_offsets=woff), x)
    run(emu, "decode", replace(gm, warp_offsets=woff), None)
