"""Triton decoder: launches kernels/triton_kernel.py (the same format and two phases as the CUDA kernel).

Tested with: every Triton from 3.3 to the newest compiles the kernel ahead of time for cuda sm_80, sm_90 and hip
gfx942 (scripts/triton_aot_check.py; the matrix is in docs/kernels.md), and it is bit-exact against
dfloat.reference under TRITON_INTERPRET=1 on CPU tensors in CI.

Caution:
- Under TRITON_INTERPRET=1 the kernel runs on CPU tensors, slowly (numpy per operation): keep inputs small.
  The interpreter is chosen when the kernel is first built, from TRITON_INTERPRET at that moment, so this module
  builds it lazily (and again if the variable changes) instead of at import.
- Blocks of more than 1024 windows are decoded in rounds of 1024 windows, one window per lane.

Differences from the CUDA version:
- No explicit shared memory: the decode tables are gathered from global memory (they stay in L1/L2), each lane
  re-reads its stream bytes at the code's position on every step, and phase 2 writes BF16 words straight to their
  output positions (up to 4 per lane and step) instead of staging exponents for 16-byte stores.
- Lanes that finish early stay masked until the whole block is done (a while loop on the block's maximum).
- Corruption is reported through the same status word, with the same flags (8: the gap rule).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dfloat.errors import BackendUnavailableError, CorruptStreamError
from dfloat.kernels import triton_kernel
from dfloat.kernels.gpu_common import launch_arrays, new_status, raise_if_flagged, wants_check

try:
    import triton
except ImportError as _e:  # the registry only picks this backend when triton is installed
    triton = None
    _IMPORT_ERROR = _e

MAX_LANES = triton_kernel.MAX_LANES
UNROLL = 2  # decode steps between two checks of "is any lane still busy" (a block-wide reduction)

_KERNELS: dict[bool, object] = {}


def _kernel():
    """The triton.jit kernel, built on first use (and rebuilt if TRITON_INTERPRET changes)."""
    if triton is None:
        raise BackendUnavailableError(
            f"the triton backend needs Triton: pip install 'dfloat[triton]' ({_IMPORT_ERROR})") from None
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    k = _KERNELS.get(interpret)
    if k is None:
        # Sizes and buffer offsets vary per unit and the kernel only gathers, so one compiled variant serves them
        # all (the layout parameters bytes_per_window and windows_per_block still specialise).
        sizes = ["n_enc", "n_gaps", "n_blocks", "n_tab", "numel"]
        try:
            k = triton.jit(triton_kernel.decode_kernel, do_not_specialize=sizes,
                           do_not_specialize_on_alignment=["enc_ptr", "sm_ptr", "gaps_ptr", "out_ptr"])
        except TypeError:  # Triton before 3.2
            k = triton.jit(triton_kernel.decode_kernel, do_not_specialize=sizes)
        _KERNELS[interpret] = k
    return k


def _lanes(windows_per_block: int) -> int:
    """Lanes per program: the block's windows rounded up to a power of two (16 to 1024)."""
    return min(MAX_LANES, max(16, 1 << (windows_per_block - 1).bit_length()))


def explain(flags: int) -> str:
    why = []
    if flags & triton_kernel.STATUS_BAD_POSITIONS:
        why.append("its output positions are out of order or out of range")
    if flags & triton_kernel.STATUS_BAD_CODE:
        why.append("it holds a bit pattern that is no code")
    if flags & triton_kernel.STATUS_BAD_COUNT:
        why.append("its codes disagree with the output positions")
    if flags & triton_kernel.STATUS_BAD_GAP:
        why.append("window start offsets disagree with the codes")
    return "; ".join(why) or f"status {flags:#x}"


def subtable_depth(tables: np.ndarray) -> int:
    """How many subtable lookups the longest code needs after the first table (0 to 3): the kernel's EXTRA."""
    depth = {0: 0}
    todo = [0]
    while todo:
        t = todo.pop()
        for p in {int(-e) for e in tables[t] if 0 < -e < len(tables)}:
            if p not in depth:
                depth[p] = depth[t] + 1
                todo.append(p)
    return max(depth.values())


def _device_tables(ct, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The unit's decode tables and multi-symbol tables on ``device`` and their depth, cached on the unit."""
    key = ("triton_tables", str(device))
    got = ct._cache.get(key)
    if got is None:
        from dfloat.kernels.cuda_decode import host_tables  # pure numpy: no CuPy needed

        arrays = host_tables(ct)
        depth = subtable_depth(arrays[0])
        if depth > 3:
            raise CorruptStreamError(f"unit {ct.members[0].name if ct.members else '?'}: its code tables nest "
                                     f"{depth} deep (codes of more than 32 bits)")
        got = (*(torch.from_numpy(a.view(np.int32).reshape(-1)).to(device) for a in arrays), depth)
        ct._cache[key] = got
    return got


_SCRATCH: dict[str, torch.Tensor] = {}


def _scratch_status(device: torch.device) -> torch.Tensor:
    """A status word nobody reads (decodes that do not check still need somewhere to report)."""
    t = _SCRATCH.get(str(device))
    if t is None:
        t = _SCRATCH[str(device)] = torch.zeros(2, dtype=torch.int32, device=device)
    return t


def decode(ct, out: torch.Tensor, check: bool = False) -> None:
    """Decode coded unit ``ct`` into ``out`` (flat, contiguous BF16, ``ct.numel`` elements, on ct's device).

    On a GPU it is asynchronous on the current stream. With ``check=True`` (or ``DFLOAT_CHECK=1``) it waits for
    the kernel and raises `CorruptStreamError` naming the unit and the first bad block if the stream is corrupt.
    """
    device = out.device
    prepared = launch_arrays(ct, out)
    if prepared is None:
        return
    enc, sm, gaps, positions = prepared
    check = wants_check(check)
    kernel = _kernel()
    tables, msym, minfo, extra = _device_tables(ct, device)
    lanes = _lanes(ct.windows_per_block)
    status = new_status(device) if check else _scratch_status(device)
    num_warps = triton_kernel.num_warps(lanes, 64 if device.type == "cuda" and torch.version.hip else 32)
    ctx = torch.cuda.device(device) if device.type == "cuda" else _null()
    with ctx:
        kernel[(ct.n_blocks,)](
            enc, enc.numel(), sm, gaps, gaps.numel(), positions, ct.n_blocks, tables, tables.numel() // 256, msym,
            minfo, out.view(torch.int16), ct.numel, status, ct.bytes_per_window, ct.windows_per_block,
            LANES=lanes, UNROLL=UNROLL, EXTRA=extra, num_warps=num_warps,
        )
    if check:
        raise_if_flagged(ct, status, explain, "triton")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
