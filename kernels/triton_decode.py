"""Triton decoder: the same format and the same two phases as the CUDA kernel, for any GPU Triton targets.

Tested with: Triton 3.9 under TRITON_INTERPRET=1 on CPU tensors (bit-exact against dfloat.reference in CI), and
compiled ahead of time with Triton 3.9 for sm_90 and gfx942; written for Triton >= 3.2 on NVIDIA (the GPU check
runs it with Triton 3.6 on an H100) and AMD/Intel GPUs, using only long-standing language features (masked
tl.load/tl.store, tl.where, tl.cumsum, tl.arange, tl.static_range, while loops, scalar atomics).

Caution:
- Under TRITON_INTERPRET=1 the kernel runs on CPU tensors, slowly (numpy per operation): keep inputs small.
  The interpreter is chosen when the kernel is first built, from TRITON_INTERPRET at that moment, so this module
  builds it lazily (and again if the variable changes) instead of at import.
- Blocks of more than 1024 windows are decoded with several windows per lane, like the CUDA kernel.

Differences from the CUDA version:
- No explicit shared memory: the decode tables are gathered from global memory (they stay in L1/L2), each lane
  reads its stream bytes from global memory, and phase 2 writes BF16 words straight to their output positions
  (up to 4 consecutive words per lane and step) instead of staging exponents for 16-byte stores. Expect it to be
  slower than the CUDA kernel, most where output bandwidth dominates.
- Lanes that finish early stay masked until the whole block is done (a while loop on the block's maximum).
- Corruption is reported through the same status word, with the same flags.
"""

from __future__ import annotations

import os

import torch

from dfloat.errors import BackendUnavailableError
from dfloat.kernels.gpu_common import launch_arrays, new_status, raise_if_flagged, wants_check

try:
    import triton
    import triton.language as tl
except ImportError as _e:  # the registry only picks this backend when triton is installed
    triton = tl = None
    _IMPORT_ERROR = _e

STATUS_BAD_POSITIONS, STATUS_BAD_CODE, STATUS_BAD_COUNT = 1, 2, 4
MAX_LANES = 1024
UNROLL = 2  # decode steps between two checks of "is any lane still busy" (a block-wide reduction)

_KERNELS: dict[bool, object] = {}


def _decode_kernel(enc_ptr, n_enc, sm_ptr, gaps_ptr, n_gaps, pos_ptr, n_blocks, tab_ptr, n_tab, msym_ptr,
                   minfo_ptr, out_ptr, numel, status_ptr, bpw, wpb, wpt,
                   LANES: tl.constexpr, UNROLL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p0 = tl.load(pos_ptr + b)
    p1 = tl.load(pos_ptr + b + 1)
    bad_pos = (p0 < 0) | (p1 < p0) | (p1 > numel)
    tl.atomic_or(status_ptr, 1, mask=bad_pos)
    tl.atomic_min(status_ptr + 1, b.to(tl.int32), mask=bad_pos)
    block_n = tl.where(bad_pos, 0, p1 - p0)

    lanes = tl.arange(0, LANES)
    J = tl.arange(0, 4)
    n_slots = (wpb + wpt - 1) // wpt
    L = bpw * wpt  # encoded bytes per lane
    w0 = b * wpb + lanes.to(tl.int64) * wpt  # my first window
    my_byte = w0 * bpw
    lim = tl.minimum(tl.minimum((wpb - lanes * wpt).to(tl.int64) * bpw, L), n_enc - my_byte)
    # (a scalar condition is widened to a vector before `&`: the interpreter mishandles vector & scalar masks)
    live = (lanes < n_slots) & (my_byte < n_enc) & ((tl.zeros([LANES], tl.int64) + block_n) > 0)
    end_bits = tl.where(live, lim * 8, 0).to(tl.int32)

    # the 5-bit start offset of my first window (packed MSB-first)
    gbit = w0 * 5
    gbyte = gbit >> 3
    ghi = tl.load(gaps_ptr + gbyte, mask=live & (gbyte < n_gaps), other=0).to(tl.int32)
    glo = tl.load(gaps_ptr + gbyte + 1, mask=live & (gbyte + 1 < n_gaps), other=0).to(tl.int32)
    gap = (((ghi << 8) | glo) >> (11 - (gbit & 7).to(tl.int32))) & 31

    # ---- phase 1: count the codes that start in my bytes ----
    start = my_byte * 8 + gap
    rb = start >> 3  # next stream byte to load
    buf = tl.zeros([LANES], tl.int64)
    for q in tl.static_range(4):
        x = tl.load(enc_ptr + rb + q, mask=live & (rb + q < n_enc), other=0).to(tl.int64)
        buf = buf | (x << (56 - 8 * q))
    buf = buf << (start & 7)
    nb = 32 - (start & 7).to(tl.int32)  # valid bits in buf (left-aligned)
    rb = rb + 4
    pos = gap  # bit of my next code, relative to my first byte
    count = tl.zeros([LANES], tl.int32)
    bad = tl.zeros([LANES], tl.int32)
    busy = tl.max((pos < end_bits).to(tl.int32), axis=0)
    while busy > 0:
        for _u in tl.static_range(UNROLL):
            act = (pos < end_bits) & (bad == 0)
            need = act & (nb < 32)
            word = tl.zeros([LANES], tl.int64)
            for q in tl.static_range(4):
                x = tl.load(enc_ptr + rb + q, mask=need & (rb + q < n_enc), other=0).to(tl.int64)
                word = word | (x << (24 - 8 * q))
            buf = tl.where(need, buf | (word << (32 - nb).to(tl.int64)), buf)
            nb = tl.where(need, nb + 32, nb)
            rb = tl.where(need, rb + 4, rb)

            top = ((buf >> 56) & 0xFF).to(tl.int32)
            info = tl.load(minfo_ptr + top, mask=act, other=0)
            n1 = info & 15
            multi = act & (pos + 8 <= end_bits) & (n1 > 0)
            single = act & ~multi
            e = tl.load(tab_ptr + top, mask=single, other=0)
            for d in tl.static_range(1, 4):
                ptr = single & (e < 0) & (-e < n_tab)
                byte = ((buf >> (56 - 8 * d)) & 0xFF).to(tl.int32)
                e2 = tl.load(tab_ptr + tl.where(ptr, -e * 256 + byte, 0), mask=ptr, other=0)
                e = tl.where(e < 0, e2, e)
            broken = single & (e <= 0)
            ln = tl.where(multi, (info >> 4) & 15, e >> 8)
            adv = multi | (single & (e > 0))
            buf = tl.where(adv, buf << ln.to(tl.int64), buf)
            nb = tl.where(adv, nb - ln, nb)
            pos = tl.where(adv, pos + ln, pos)
            count = tl.where(adv, count + tl.where(multi, n1, 1), count)
            bad = tl.where(broken, 1, bad)
        busy = tl.max(((pos < end_bits) & (bad == 0)).to(tl.int32), axis=0)

    first = tl.cumsum(count, axis=0) - count  # my first output, relative to p0
    total = tl.sum(count, axis=0)
    code_bad = tl.max(((bad != 0) & (first.to(tl.int64) + count < block_n)).to(tl.int32), axis=0) > 0
    tl.atomic_or(status_ptr, 2, mask=code_bad)
    tl.atomic_min(status_ptr + 1, b.to(tl.int32), mask=code_bad)
    count_bad = (block_n > 0) & ((total < block_n) | ((b != n_blocks - 1) & (total != block_n)))
    tl.atomic_or(status_ptr, 4, mask=count_bad)
    tl.atomic_min(status_ptr + 1, b.to(tl.int32), mask=count_bad)

    # ---- phase 2: decode again; write BF16 words to p0 + first + k ----
    kend = tl.maximum(tl.minimum(block_n - first, count.to(tl.int64)), 0).to(tl.int32)
    rb = start >> 3
    buf = tl.zeros([LANES], tl.int64)
    for q in tl.static_range(4):
        x = tl.load(enc_ptr + rb + q, mask=live & (rb + q < n_enc), other=0).to(tl.int64)
        buf = buf | (x << (56 - 8 * q))
    buf = buf << (start & 7)
    nb = 32 - (start & 7).to(tl.int32)
    rb = rb + 4
    k = tl.zeros([LANES], tl.int32)
    base = p0 + first.to(tl.int64)
    busy = tl.max((k < kend).to(tl.int32), axis=0)
    while busy > 0:
        for _u in tl.static_range(UNROLL):
            act = k < kend
            need = act & (nb < 32)
            word = tl.zeros([LANES], tl.int64)
            for q in tl.static_range(4):
                x = tl.load(enc_ptr + rb + q, mask=need & (rb + q < n_enc), other=0).to(tl.int64)
                word = word | (x << (24 - 8 * q))
            buf = tl.where(need, buf | (word << (32 - nb).to(tl.int64)), buf)
            nb = tl.where(need, nb + 32, nb)
            rb = tl.where(need, rb + 4, rb)

            top = ((buf >> 56) & 0xFF).to(tl.int32)
            info = tl.load(minfo_ptr + top, mask=act, other=0)
            n2 = (info >> 8) & 15
            multi = act & (n2 > 0)
            single = act & (n2 == 0)
            e = tl.load(tab_ptr + top, mask=single, other=0)
            for d in tl.static_range(1, 4):
                ptr = single & (e < 0) & (-e < n_tab)
                byte = ((buf >> (56 - 8 * d)) & 0xFF).to(tl.int32)
                e2 = tl.load(tab_ptr + tl.where(ptr, -e * 256 + byte, 0), mask=ptr, other=0)
                e = tl.where(e < 0, e2, e)
            e = tl.where(e <= 0, 0x100, e)  # phase 1 counted a code here; keep going safely regardless
            syms = tl.where(multi, tl.load(msym_ptr + top, mask=multi, other=0), e & 0xFF)
            n = tl.where(multi, n2, 1)
            # three vectors cross into the [lanes, 4] layout of the store: symbols, first output, how many
            nout = tl.where(act, tl.minimum(n, kend - k), 0)
            g = (base + k.to(tl.int64))[:, None] + J[None, :].to(tl.int64)
            ok = J[None, :] < nout[:, None]
            sym = (syms[:, None] >> (8 * J[None, :])) & 0xFF
            s = tl.load(sm_ptr + g, mask=ok, other=0).to(tl.int32)
            w = ((s & 0x80) << 8) | (sym << 7) | (s & 0x7F)
            tl.store(out_ptr + g, w.to(tl.int16), mask=ok)
            ln = tl.where(multi, (info >> 12) & 15, e >> 8)
            buf = tl.where(act, buf << ln.to(tl.int64), buf)
            nb = tl.where(act, nb - ln, nb)
            k = tl.where(act, k + n, k)
        busy = tl.max((k < kend).to(tl.int32), axis=0)


def _kernel():
    """The triton.jit kernel, built on first use (and rebuilt if TRITON_INTERPRET changes)."""
    if triton is None:
        raise BackendUnavailableError(
            f"the triton backend needs Triton: pip install 'dfloat[triton]' ({_IMPORT_ERROR})") from None
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    k = _KERNELS.get(interpret)
    if k is None:
        # Sizes and buffer offsets vary per unit and the kernel only gathers, so one compiled variant serves them
        # all (the layout parameters bytes_per_window, windows_per_block, windows_per_lane still specialise).
        sizes = ["n_enc", "n_gaps", "n_blocks", "n_tab", "numel"]
        try:
            k = triton.jit(_decode_kernel, do_not_specialize=sizes,
                           do_not_specialize_on_alignment=["enc_ptr", "sm_ptr", "gaps_ptr", "out_ptr"])
        except TypeError:  # Triton before 3.2
            k = triton.jit(_decode_kernel, do_not_specialize=sizes)
        _KERNELS[interpret] = k
    return k


def _lanes(windows_per_block: int) -> tuple[int, int, int]:
    """(windows per lane, lanes in use, lanes as a power of two)."""
    wpt = -(-windows_per_block // MAX_LANES)
    n_slots = -(-windows_per_block // wpt)
    return wpt, n_slots, max(16, 1 << (n_slots - 1).bit_length())


def decode(ct, out: torch.Tensor, check: bool = False) -> None:
    """Decode coded unit ``ct`` into ``out`` (flat, contiguous BF16, ``ct.numel`` elements, on ct's device).

    On a GPU it is asynchronous on the current stream. With ``check=True`` (or ``DFLOAT_CHECK=1``) it waits for
    the kernel and raises `CorruptStreamError` naming the unit and the first bad block if the stream is corrupt.
    """
    from dfloat.kernels.cuda_decode import _device_tables, _scratch_status, explain

    device = out.device
    prepared = launch_arrays(ct, out)
    if prepared is None:
        return
    enc, sm, gaps, positions = prepared
    check = wants_check(check)
    kernel = _kernel()
    tables, msym, minfo = _device_tables(ct, device)
    wpt, _, lanes = _lanes(ct.windows_per_block)
    status = new_status(device) if check else _scratch_status(device)
    num_warps = min(16, max(1, lanes // 32))
    ctx = torch.cuda.device(device) if device.type == "cuda" else _null()
    with ctx:
        kernel[(ct.n_blocks,)](
            enc, enc.numel(), sm, gaps, gaps.numel(), positions, ct.n_blocks, tables, tables.numel() // 256, msym,
            minfo, out.view(torch.int16), ct.numel, status, ct.bytes_per_window, ct.windows_per_block, wpt,
            LANES=lanes, UNROLL=UNROLL, num_warps=num_warps,
        )
    if check:
        raise_if_flagged(ct, status, explain, "triton")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
