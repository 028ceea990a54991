"""The encoder's hot loops, compiled with numba and split into chunks so both cores work.

Packing is done per chunk of symbols at a known starting bit; a chunk's first byte may be shared with the
previous chunk, so it is kept aside and OR-ed in afterwards (no two threads ever store the same byte).
"""

from __future__ import annotations

import numpy as np

from dfloat._numba import njit, prange


@njit(parallel=True, cache=True, nogil=True)
def chunk_histograms(words, n_chunks):  # pragma: no cover - compiled
    """Exponent histogram of each chunk (their sums give the code; with the code they give each chunk's bits)."""
    n = words.size
    step = (n + n_chunks - 1) // n_chunks
    hist = np.zeros((n_chunks, 4, 256), np.int64)
    for c in prange(n_chunks):
        lo = c * step
        hi = min(n, lo + step)
        h = hist[c]
        i = lo
        while i + 4 <= hi:  # four counters break the store-to-load dependency on repeated exponents
            h[0, (words[i] >> 7) & 0xFF] += 1
            h[1, (words[i + 1] >> 7) & 0xFF] += 1
            h[2, (words[i + 2] >> 7) & 0xFF] += 1
            h[3, (words[i + 3] >> 7) & 0xFF] += 1
            i += 4
        while i < hi:
            h[0, (words[i] >> 7) & 0xFF] += 1
            i += 1
    return hist.sum(axis=1)


@njit(parallel=True, cache=True, nogil=True)
def pack(words, codes, lengths, chunk_start_bit, out, sm, window_bits, first_symbol, gap):  # pragma: no cover
    """Write the MSB-first code stream and the sign|mantissa bytes, and for each window the first symbol that
    starts in it and its bit offset. Chunks match `chunk_histograms`' split."""
    n = words.size
    n_chunks = chunk_start_bit.size
    step = (n + n_chunks - 1) // n_chunks
    heads = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        lo = c * step
        hi = min(n, lo + step)
        if lo >= hi:
            continue
        bitpos = chunk_start_bit[c]
        lead = bitpos & 7
        first_byte = bitpos >> 3
        byte_idx = first_byte
        acc = np.int64(0)
        nacc = lead  # the leading bits belong to the previous chunk: zero placeholders, OR-ed in at the end
        if lo == 0:
            next_boundary = np.int64(0)
        else:
            prev_w = (bitpos - lengths[(words[lo - 1] >> 7) & 0xFF]) // window_bits
            next_boundary = (prev_w + 1) * window_bits
        for i in range(lo, hi):
            v = np.int64(words[i])
            sm[i] = ((v >> 8) & 0x80) | (v & 0x7F)
            e = (v >> 7) & 0xFF
            if bitpos >= next_boundary:
                w = bitpos // window_bits
                first_symbol[w] = i
                gap[w] = bitpos - w * window_bits
                next_boundary = (w + 1) * window_bits
            ln = lengths[e]
            acc = (acc << ln) | codes[e]
            nacc += ln
            bitpos += ln
            if nacc >= 32:
                nacc -= 32
                word = acc >> nacc
                if byte_idx == first_byte and lead != 0:
                    heads[c] |= (word >> 24) & 0xFF
                else:
                    out[byte_idx] = (word >> 24) & 0xFF
                out[byte_idx + 1] = (word >> 16) & 0xFF
                out[byte_idx + 2] = (word >> 8) & 0xFF
                out[byte_idx + 3] = word & 0xFF
                byte_idx += 4
        while nacc >= 8:
            nacc -= 8
            b = (acc >> nacc) & 0xFF
            if byte_idx == first_byte and lead != 0:
                heads[c] |= b
            else:
                out[byte_idx] = b
            byte_idx += 1
        if nacc > 0:
            b = (acc << (8 - nacc)) & 0xFF
            if byte_idx == first_byte and lead != 0:
                heads[c] |= b
            else:
                out[byte_idx] = b
    for c in range(n_chunks):
        if heads[c] != 0:
            out[chunk_start_bit[c] >> 3] |= heads[c]


def pack_gaps(gap: np.ndarray) -> np.ndarray:
    """5-bit big-endian digits packed MSB-first (numpy packbits), as the official release stores them."""
    bits = ((gap.astype(np.uint8)[:, None] >> np.arange(4, -1, -1, dtype=np.uint8)) & 1).reshape(-1)
    return np.packbits(bits)


def unpack_gaps(packed: np.ndarray, count: int) -> np.ndarray:
    bits = np.unpackbits(packed)[: count * 5].reshape(-1, 5).astype(np.uint8)
    return (bits << np.arange(4, -1, -1, dtype=np.uint8)).sum(axis=1).astype(np.uint8)
