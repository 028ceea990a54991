"""CPU decoder: numba, one independent block of windows per task, both cores.

A block starts at its first window's start offset and holds ``output_positions[b+1] - output_positions[b]``
codes, so the CPU needs no counting phase. Reads past the stream see zero bits and writes stay inside the
block's output range (clamped to ``out`` and ``sign_mantissa`` whatever the positions say), so a corrupt stream
cannot touch memory it does not own; it is reported, not crashed on.

The gap rule (docs/kernels.md, shared with the GPU decoders): whenever a code with output index < numel is the
first to start at or after the start of window w >= 1, it must start exactly at ``8*B*w + gap[w]``; so every
gap the GPU decoders start a thread from is checked here too, and all decoders agree on every stream.
"""

from __future__ import annotations

import numpy as np
import torch

from dfloat.code_tables import decode_tables
from dfloat.errors import CorruptStreamError

from dfloat._numba import njit, prange  # isort: skip

STATUS_BAD_POSITIONS = 1
STATUS_BAD_CODE = 2
STATUS_OVERRUN = 3
STATUS_BAD_GAP = 4


@njit(inline="always", cache=True)
def _load32(enc, byte, n_enc):  # pragma: no cover - compiled
    """Four stream bytes big-endian; bytes past the end read as zero."""
    if byte + 4 <= n_enc:
        return ((np.int64(enc[byte]) << 24) | (np.int64(enc[byte + 1]) << 16)
                | (np.int64(enc[byte + 2]) << 8) | np.int64(enc[byte + 3]))
    v = np.int64(0)
    for k in range(4):
        v = (v << 8) | (np.int64(enc[byte + k]) if 0 <= byte + k < n_enc else np.int64(0))
    return v


@njit(inline="always", cache=True)
def _window_start(gaps, w, window_bits):  # pragma: no cover - compiled
    """s_w: the bit where window w's first code starts (its 5-bit gap; gap bits past the array read as 0)."""
    gbit = 5 * w
    gbyte = gbit >> 3
    n_gap = gaps.size
    hi = np.int64(gaps[gbyte]) if gbyte < n_gap else np.int64(0)
    lo = np.int64(gaps[gbyte + 1]) if gbyte + 1 < n_gap else np.int64(0)
    return np.int64(w) * window_bits + ((((hi << 8) | lo) >> (11 - (gbit & 7))) & 31)


@njit(parallel=True, cache=True, nogil=True)
def decode_blocks(enc, sm, gaps, positions, tables, window_bytes, windows_per_block, out, status,
                  sign_mantissa_bits, first_block, last_block):  # pragma: no cover
    """Decode blocks [first_block, last_block); ``out[0]`` is the first output of ``first_block``."""
    numel = sm.size
    n = sm.size
    n_enc = enc.size
    base = positions[first_block]
    n_out = out.size  # never write past out or read past sign_mantissa, whatever positions say
    window_bits = np.int64(window_bytes) * 8
    for k in prange(last_block - first_block):
        b = first_block + k
        start = positions[b]
        end = positions[b + 1]
        if base < 0 or start < base or end < start or end > n or end - base > n_out:
            status[k] = STATUS_BAD_POSITIONS
            continue
        if start == end == numel:
            continue  # trailing blocks without codes
        w = np.int64(b) * windows_per_block
        bit = _window_start(gaps, w, window_bits)
        next_window = (w + 1) * window_bits  # the next window whose first code start must match its gap
        byte = bit >> 3
        buf = _load32(enc, byte, n_enc) << (32 + (bit & 7))  # the stream left-aligned in a 64-bit buffer
        nbits = np.int64(32 - (bit & 7))
        byte += 4
        for i in range(start, end):
            p = byte * 8 - nbits  # where code i starts
            if p >= next_window:  # the first code in a new window: the gap rule
                if p != _window_start(gaps, next_window // window_bits, window_bits):
                    status[k] = STATUS_BAD_GAP
                    break
                next_window += window_bits
            if nbits < 32:  # codes are at most 32 bits long
                buf |= _load32(enc, byte, n_enc) << (32 - nbits)
                byte += 4
                nbits += 32
            e = tables[(buf >> 56) & 0xFF]
            if e < 0:  # codes longer than 8 bits: rare
                depth = 1
                while e < 0 and depth < 4:
                    e = tables[(-e) * 256 + ((buf >> (56 - 8 * depth)) & 0xFF)]
                    depth += 1
            if e <= 0:
                status[k] = STATUS_BAD_CODE
                break
            out[i - base] = sign_mantissa_bits[sm[i]] | (e & 0x7F80)
            ln = e >> 16
            buf <<= ln
            nbits -= ln
        if status[k] != 0:
            continue
        p = byte * 8 - nbits  # where the code after the block starts
        if p > n_enc * 8:
            status[k] = STATUS_OVERRUN
        elif end < numel:  # that code opens block b+1: it must start at the block's first window start, and
            # no window of this block may be left without a code start before it (it would be the first there)
            first_next = np.int64(b + 1) * windows_per_block
            if next_window != first_next * window_bits or p != _window_start(gaps, first_next, window_bits):
                status[k] = STATUS_BAD_GAP


# sign|mantissa byte -> its bits in place in the BF16 word
SIGN_MANTISSA_BITS = np.array([((s & 0x80) << 8) | (s & 0x7F) for s in range(256)], np.uint16).view(np.int16)


def cpu_tables(tables: np.ndarray) -> np.ndarray:
    """The shared decode tables with leaves rewritten as ``(length << 16) | (exponent << 7)``: the exponent lands
    in place in the BF16 word with one OR."""
    t = tables.astype(np.int64).reshape(-1)
    leaf = t > 0
    t[leaf] = ((t[leaf] >> 8) << 16) | ((t[leaf] & 0xFF) << 7)
    return np.ascontiguousarray(t, dtype=np.int32)


def decode(ct, out: torch.Tensor, check: bool = True) -> None:
    """Decode into ``out``; corrupt blocks are always reported (checking costs nothing on the CPU)."""
    decode_range(ct, 0, ct.n_blocks, out)


def decode_range(ct, first_block: int, last_block: int, out: torch.Tensor) -> None:
    """Decode only blocks [first_block, last_block) of ``ct`` into ``out`` (at least
    ``output_positions[last_block] - output_positions[first_block]`` elements; its element 0 is the first output of
    ``first_block``). The output positions tell which block holds which element (see `dfloat.blocks`)."""
    tables = ct._cache.get("cpu_tables")
    if tables is None:
        tables = ct._cache["cpu_tables"] = cpu_tables(decode_tables(ct))
    if ct.numel == 0 or last_block <= first_block:
        return
    status = np.zeros(last_block - first_block, np.int8)
    decode_blocks(
        ct.encoded_exponent.numpy(), ct.sign_mantissa.numpy(), ct.gaps.numpy(), ct.output_positions.numpy(),
        tables, ct.bytes_per_window, ct.windows_per_block, out.view(torch.int16).numpy(), status, SIGN_MANTISSA_BITS,
        first_block, last_block,
    )
    bad = np.flatnonzero(status)
    if bad.size:
        k = int(bad[0])
        b = first_block + k
        why = {STATUS_BAD_POSITIONS: "its output positions are out of order or out of range",
               STATUS_BAD_CODE: "it holds a bit pattern that is no code",
               STATUS_OVERRUN: "its codes run past the end of the stream",
               STATUS_BAD_GAP: "window start offsets disagree with the codes"}
        raise CorruptStreamError(f"unit {ct.members[0].name if ct.members else '?'}: block {b} of {ct.n_blocks} "
                                 f"is corrupt: {why.get(int(status[k]), 'unknown error')}")
