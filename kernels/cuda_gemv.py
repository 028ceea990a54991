"""Fused decode-GEMV: ``kernels/cuda/gemv.cu`` compiled with NVRTC through CuPy, launched on torch's stream.

``gemv(gm, x)`` computes ``x @ W.T`` for x of a few rows (the fused kernel reads the coded matrix, never writes
W); ``twin(w, x, ...)`` runs the same kernel code on plain BF16 weights (the reference the fused product equals
bit for bit); ``decode_matrix(gm, out)`` writes W (for prefill: decode, then cuBLAS). Nothing here synchronizes
with the host and every launch uses ``torch.cuda.current_stream()``, so calls can be captured in a CUDA graph.

Compiling: one NVRTC module per rows_per_tile holds every instance a layout of that tile height can launch (the
fused kernel for 1 to 8 or 16 rows of x per pass, and the decode kernel), built on first use, once per process and
device (CuPy keeps it on disk); the twin, a test reference, has a module of its own per rows_per_tile. A kernel
with many accumulators (rows_per_tile x rows per pass above 48) is built with ``__launch_bounds__(128, 3)``: at most
168 registers, so that 3 blocks of 128 threads share an SM (ptxas left alone gives them 173-191: 2 blocks, too few
loads in flight at batch 8 and 16); a layout of 256 threads gets the unbounded build of the same code.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from dfloat.errors import BackendUnavailableError, ShapeMismatchError, UnsupportedDtypeError
from dfloat.kernels.cuda_decode import _stream
from dfloat.kernels.gemv_layout import GemvMatrix
from dfloat.kernels.gpu_common import build_failure

SOURCE = "cuda/gemv.cu"
NVRTC_OPTIONS = ("-std=c++17",)
# Rows of x per pass: accumulators per thread are rows_per_tile * rows per pass (at most 64)
MAX_ROWS_PER_PASS = {1: 8, 2: 8, 4: 16, 8: 8}
MAX_FUSED_ROWS = 16  # above this the runtime decodes and calls cuBLAS (prefill)
# Register-capped builds (see the module docstring): above this many accumulators per thread, for blocks of at
# most CAPPED_THREADS threads, __launch_bounds__(CAPPED_THREADS, CAPPED_MIN_BLOCKS).
CAPPED_ACCUMULATORS = 48
CAPPED_THREADS, CAPPED_MIN_BLOCKS = 128, 3

_MODULES: dict[tuple, object] = {}  # (device, module family, rows_per_tile) -> cupy.RawModule
_FUNCTIONS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise BackendUnavailableError(
            f"the fused GEMV needs CuPy: pip install 'dfloat[cuda13]' (CUDA 13) or 'dfloat[cuda12]' ({e})"
        ) from None
    return cupy


@dataclass(frozen=True)
class GemvPlan:
    kernel: str  # the C++ name expression of the template instance
    grid: int
    block: int
    smem: int
    rows_per_pass: int


def rows_per_pass(batch: int, rows_per_tile: int) -> int:
    """Rows of x per pass: as even as possible over the fewest passes (R = 8: 16 -> 8 + 8, 12 -> 6 + 6)."""
    cap = MAX_ROWS_PER_PASS[rows_per_tile]
    passes = max(1, math.ceil(batch / cap))
    return max(1, math.ceil(batch / passes))


def min_blocks(rows_per_tile: int, nb: int, threads: int) -> int:
    """The fused kernel's ``__launch_bounds__`` minimum of blocks per SM for a launch (0: none, ptxas decides)."""
    if rows_per_tile * nb > CAPPED_ACCUMULATORS and threads <= CAPPED_THREADS:
        return CAPPED_MIN_BLOCKS
    return 0


def kernel_name(kind: str, rows_per_tile: int, nb: int, threads: int) -> str:
    """The C++ name expression of the template instance a launch uses."""
    if kind == "fused":
        return f"dfloat_gemv<{rows_per_tile}, {nb}, {min_blocks(rows_per_tile, nb, threads)}>"
    if kind == "twin":
        return f"dfloat_gemv_twin<{rows_per_tile}, {nb}>"
    if kind == "decode":
        return f"dfloat_gemv_decode<{rows_per_tile}>"
    raise ValueError(f"unknown GEMV kernel kind {kind!r}")


def module_family(kind: str) -> str:
    return "twin" if kind == "twin" else "product"


def module_instances(family: str, rows_per_tile: int) -> tuple[str, ...]:
    """Every name expression the module of ``family`` ("product" or "twin") for ``rows_per_tile`` holds: all that
    `plan` can ask for, at any batch up to MAX_FUSED_ROWS and any block width."""
    nbs = range(1, MAX_ROWS_PER_PASS[rows_per_tile] + 1)
    if family == "twin":
        return tuple(kernel_name("twin", rows_per_tile, nb, 32) for nb in nbs)
    names = {kernel_name("fused", rows_per_tile, nb, t): None for nb in nbs for t in (CAPPED_THREADS, 256)}
    return (*names, kernel_name("decode", rows_per_tile, 1, 32))


def plan(kind: str, rows_per_tile: int, threads: int, n_tiles: int, peek: int, batch: int) -> GemvPlan:
    """Grid, block, shared memory and template instance for one launch ("fused", "twin" or "decode")."""
    nb = rows_per_pass(batch, rows_per_tile)
    lut_words = (2 << peek) if kind != "twin" else 0
    red_words = (threads // 32) * rows_per_tile * nb if kind != "decode" else 0
    name = kernel_name(kind, rows_per_tile, nb, threads)
    return GemvPlan(name, n_tiles, threads, 4 * (lut_words + red_words), nb)


def launch_args(
    gm_arrays, *, peek: int, w, x, y, n: int, k: int, groups: int, batch: int, ldx: int, ldy: int, vec_x: bool
) -> tuple:
    """The kernels' parameters (DFG_PARAMS in gemv.cu) in order, as sized numpy scalars; tensors by data_ptr()."""
    enc, woff, sm, lut = gm_arrays
    p = lambda t: np.uint64(t.data_ptr() if t is not None else 0)  # noqa: E731
    i32, i64 = np.int32, np.int64
    return (
        p(enc),
        i64(enc.numel() if enc is not None else 0),
        p(woff),
        p(sm),
        p(lut),
        i32(peek),
        p(w),
        p(x),
        p(y),
        i32(n),
        i32(k),
        i32(groups),
        i32(batch),
        i64(ldx),
        i64(ldy),
        i32(int(vec_x)),
    )


def x_is_vectorisable(x: torch.Tensor) -> bool:
    return x.stride(0) % 4 == 0 and x.data_ptr() % 8 == 0


def source() -> str:
    return resources.files("dfloat.kernels").joinpath(SOURCE).read_text()


def _function(device_index: int, kind: str, rows_per_tile: int, name: str):
    """Template instance ``name`` on a device, from its module (compiled whole on first use: module_instances).

    A compiler error in gemv.cu is raised as CuPy's ``CompileException``; any other failure to build (NVRTC or
    the CUDA toolkit missing or unusable) is a `BackendUnavailableError`.
    """
    key = (device_index, name)
    fn = _FUNCTIONS.get(key)
    if fn is not None:
        return fn
    cupy = _cupy()
    family = module_family(kind)
    with _LOCK, cupy.cuda.Device(device_index):
        mkey = (device_index, family, rows_per_tile)
        try:
            mod = _MODULES.get(mkey)
            if mod is None:
                names = module_instances(family, rows_per_tile)
                mod = cupy.RawModule(code=source(), options=NVRTC_OPTIONS, name_expressions=list(names))
            fn = mod.get_function(name)  # NVRTC runs here for the whole module, on first use
        except Exception as e:
            raise build_failure(
                e, "the fused GEMV kernel", "load with matmul='decode' (the default) to decode before cuBLAS"
            ) from e
        _MODULES[mkey] = mod
        _FUNCTIONS[key] = fn
    return fn


def _check_x(x: torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    if x.dtype != torch.bfloat16:
        raise UnsupportedDtypeError(f"fused GEMV: x must be BF16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ShapeMismatchError(f"fused GEMV: x must be (rows, {k}), got {tuple(x.shape)}")
    if x.device != device:
        raise ShapeMismatchError(f"fused GEMV: x is on {x.device}, the weights on {device}")
    return x if x.stride(1) == 1 else x.contiguous()


def _launch(pl: GemvPlan, kind: str, rows_per_tile: int, device: torch.device, args: tuple) -> None:
    cupy = _cupy()
    fn = _function(device.index, kind, rows_per_tile, pl.kernel)
    if pl.smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = pl.smem
    with (
        cupy.cuda.Device(device.index),
        _stream(cupy, torch.cuda.current_stream(device).cuda_stream, device.index),
    ):
        fn((pl.grid,), (pl.block,), args, shared_mem=pl.smem)


def gemv(gm: GemvMatrix, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` (BF16, shape (rows, N)) from the coded matrix; asynchronous on the current stream."""
    n, k = gm.shape
    x = _check_x(x, k, gm.device)
    y = out if out is not None else torch.empty(x.shape[0], n, dtype=torch.bfloat16, device=x.device)
    if y.shape != (x.shape[0], n) or y.stride(1) != 1 or y.dtype != torch.bfloat16:
        raise ShapeMismatchError(
            f"fused GEMV: out must be a BF16 ({x.shape[0]}, {n}) tensor with unit column stride"
        )
    if x.shape[0] == 0:
        return y
    pl = plan("fused", gm.rows_per_tile, gm.threads, gm.n_tiles, gm.peek, x.shape[0])
    args = launch_args(
        (gm.enc, gm.warp_offsets, gm.sm, gm.lut),
        peek=gm.peek,
        w=None,
        x=x,
        y=y,
        n=n,
        k=k,
        groups=gm.groups,
        batch=x.shape[0],
        ldx=x.stride(0),
        ldy=y.stride(0),
        vec_x=x_is_vectorisable(x),
    )
    _launch(pl, "fused", gm.rows_per_tile, x.device, args)
    return y


def twin(weight: torch.Tensor, x: torch.Tensor, rows_per_tile: int, threads: int) -> torch.Tensor:
    """The same kernel on plain BF16 weights (N x K): the fused product's bit-exact reference."""
    n, k = weight.shape
    weight = weight.contiguous()
    x = _check_x(x, k, weight.device)
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16, device=x.device)
    pl = plan("twin", rows_per_tile, threads, math.ceil(n / rows_per_tile), 1, x.shape[0])
    groups = math.ceil(k / (4 * threads))
    args = launch_args(
        (None, None, None, None),
        peek=1,
        w=weight,
        x=x,
        y=y,
        n=n,
        k=k,
        groups=groups,
        batch=x.shape[0],
        ldx=x.stride(0),
        ldy=y.stride(0),
        vec_x=x_is_vectorisable(x),
    )
    _launch(pl, "twin", rows_per_tile, x.device, args)
    return y


def decode_matrix(gm: GemvMatrix, out: torch.Tensor | None = None) -> torch.Tensor:
    """W as BF16 (N x K) on the GPU, into ``out`` when given (e.g. a shared prefill buffer)."""
    n, k = gm.shape
    w = out if out is not None else torch.empty(n, k, dtype=torch.bfloat16, device=gm.device)
    if w.shape != (n, k) or not w.is_contiguous() or w.dtype != torch.bfloat16:
        raise ShapeMismatchError(f"decode_matrix: out must be a contiguous BF16 ({n}, {k}) tensor")
    pl = plan("decode", gm.rows_per_tile, gm.threads, gm.n_tiles, gm.peek, 1)
    args = launch_args(
        (gm.enc, gm.warp_offsets, gm.sm, gm.lut),
        peek=gm.peek,
        w=None,
        x=None,
        y=None,
        n=n,
        k=k,
        groups=gm.groups,
        batch=0,
        ldx=0,
        ldy=0,
        vec_x=False,
    )
    _launch(pl, "decode", gm.rows_per_tile, gm.device, (*args, np.uint64(w.data_ptr())))
    return w
