"""The Triton decode kernel alone: plain Triton, no torch or dfloat imports.

Kept apart from the launcher (triton_decode.py) so that scripts/triton_aot_check.py can compile this very source
ahead of time in a venv that holds only triton and numpy (CI does that under Triton 3.6.0).

Written to compile with every Triton from 3.3 on, for NVIDIA and AMD targets. Triton 3.6 aborted (assertion in
TritonGPURemoveLayoutConversions) on the previous version, whose `while busy > 0:` loops carried the scalar
`busy` next to the lanes' tensors: for an scf.while that pass indexed the loop's results by the position of the
yielded value, which runs past the end when a value after the condition is a tensor (fixed upstream later). So the
while conditions here are computed from the carried tensors themselves (`while tl.max(...) > 0:`), every tensor is
one-dimensional [LANES], and each decode loop carries two or three int32 vectors: the stream is re-read at the
code's bit position on every step (4 byte loads that hit L1) instead of being kept in a refilled 64-bit buffer.

Layout (see docs/kernels.md): one program per block; lane l of round r decodes window ``b * wpb + r * LANES + l``
(rounds = ceil(wpb / LANES), one unless a block has more than 1024 windows). Per round, phase 1 counts the codes
that start in each lane's window, a prefix sum gives each lane its first output, and phase 2 decodes again and
writes the BF16 words. The status word gets flags 1 (bad output positions), 2 (no code), 4 (codes disagree with
the output positions) and 8 (a window's start offset disagrees with where the previous window's codes ended: the
gap rule of docs/FORMAT.md), and in its second int the lowest flagged block.
"""

from __future__ import annotations

try:
    import triton.language as tl
except ImportError:  # the launcher reports a missing Triton; this module must still import for the registry
    tl = None

STATUS_BAD_POSITIONS, STATUS_BAD_CODE, STATUS_BAD_COUNT, STATUS_BAD_GAP = 1, 2, 4, 8
MAX_LANES = 1024

# The kernel's arguments, for ahead-of-time compiles: Triton type of each runtime argument (pointers to what the
# launcher passes), and the constexprs.
SIGNATURE = {
    "enc_ptr": "*u8", "n_enc": "i64", "sm_ptr": "*u8", "gaps_ptr": "*u8", "n_gaps": "i64", "pos_ptr": "*i64",
    "n_blocks": "i64", "tab_ptr": "*i32", "n_tab": "i32", "msym_ptr": "*i32", "minfo_ptr": "*i32",
    "out_ptr": "*i16", "numel": "i64", "status_ptr": "*i32", "bpw": "i32", "wpb": "i32",
}
CONSTEXPRS = ("LANES", "UNROLL", "EXTRA")


def num_warps(lanes: int, warp_size: int) -> int:
    """Warps per program: one lane per thread (NVIDIA warps are 32 threads, AMD wavefronts 64)."""
    return max(1, lanes // warp_size)


def decode_kernel(enc_ptr, n_enc, sm_ptr, gaps_ptr, n_gaps, pos_ptr, n_blocks, tab_ptr, n_tab, msym_ptr,
                  minfo_ptr, out_ptr, numel, status_ptr, bpw, wpb,
                  LANES: tl.constexpr, UNROLL: tl.constexpr, EXTRA: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p0 = tl.load(pos_ptr + b)
    p1 = tl.load(pos_ptr + b + 1)
    bad_pos = (p0 < 0) | (p1 < p0) | (p1 > numel)
    block_n = tl.where(bad_pos, 0, p1 - p0)
    flags = tl.where(bad_pos, 1, 0)

    lanes = tl.arange(0, LANES)
    zero = tl.zeros([LANES], tl.int32)
    # (scalars are widened to vectors before `&`: the interpreter mishandles vector & scalar masks)
    has_work = (zero.to(tl.int64) + block_n) > 0
    n_windows = (n_enc + bpw - 1) // bpw
    W = bpw * 8  # bits per window
    carry = p0 * 0  # outputs of the earlier rounds
    rounds = (wpb + LANES - 1) // LANES
    for r in range(0, rounds):
        slot = r * LANES + lanes
        w = b * wpb + slot.to(tl.int64)  # my window
        live = (slot < wpb) & (w < n_windows) & has_work
        lane_enc = enc_ptr + w * bpw
        avail = tl.minimum(n_enc - w * bpw, bpw + 8).to(tl.int32)  # stream bytes I may read (mine and a few more)
        end_bits = tl.where(live, tl.minimum(avail, bpw) * 8, 0)

        # the 5-bit start offsets of my window and the next one (packed MSB-first: 10 bits in at most 3 bytes)
        gbit = w * 5
        gbyte = gbit >> 3
        g3 = zero
        for q in tl.static_range(3):
            x = tl.load(gaps_ptr + gbyte + q, mask=live & (gbyte + q < n_gaps), other=0).to(tl.int32)
            g3 = (g3 << 8) | x
        g3 = g3 << (gbit & 7).to(tl.int32)
        gap = (g3 >> 19) & 31
        next_gap = (g3 >> 14) & 31

        # ---- phase 1: count the codes that start in my window ----
        pos = gap  # bit of my next code, relative to my window's first bit
        count = zero
        bad = zero
        while tl.max(((pos < end_bits) & (bad == 0)).to(tl.int32), axis=0) > 0:
            for _u in tl.static_range(UNROLL):
                act = (pos < end_bits) & (bad == 0)
                at = pos >> 3
                word = zero  # the stream from my next code's byte on: 2 bytes, one more per subtable level, at most 4
                for q in tl.static_range(2 + EXTRA - EXTRA // 3):
                    x = tl.load(lane_enc + at + q, mask=act & (at + q < avail), other=0).to(tl.int32)
                    word = word | (x << (24 - 8 * q))
                word = word << (pos & 7)  # the next code's first bit is now bit 31
                top = (word >> 24) & 0xFF
                info = tl.load(minfo_ptr + top, mask=act, other=0)
                n1 = info & 15
                multi = act & (n1 > 0) & (pos + 8 <= end_bits)  # whole codes in the next 8 bits, all mine
                single = act & ~multi
                e = tl.load(tab_ptr + top, mask=single, other=0)
                for d in tl.static_range(1, EXTRA + 1):
                    follow = single & (e < 0) & (-e < n_tab)
                    if d < 3:
                        nxt = (word >> (24 - 8 * d)) & 0xFF
                    else:  # bits 24..31 of a code: the fifth byte's high bits come in
                        x = tl.load(lane_enc + at + 4, mask=follow & (at + 4 < avail), other=0).to(tl.int32)
                        nxt = (word & 0xFF) | (x >> (8 - (pos & 7)))
                    e2 = tl.load(tab_ptr + tl.where(follow, -e * 256 + nxt, 0), mask=follow, other=0)
                    e = tl.where(e < 0, e2, e)
                ok = single & (e > 0)
                pos += tl.where(multi, (info >> 4) & 15, tl.where(ok, e >> 8, 0))
                count += tl.where(multi, n1, ok.to(tl.int32))
                bad = tl.where(single & (e <= 0), 1, bad)

        first = carry + (tl.cumsum(count, axis=0) - count).to(tl.int64)  # my first output, relative to p0
        done = first + count  # outputs of the block before my next code
        code_bad = tl.max(((bad != 0) & (done < block_n)).to(tl.int32), axis=0)
        # the gap rule: where my decode ended must be where the next window says its first code starts
        gap_bad = tl.max((live & (bad == 0) & (w + 1 < n_windows) & (p0 + done < numel)
                          & (pos != W + next_gap)).to(tl.int32), axis=0)
        flags = flags | tl.where(code_bad > 0, 2, 0) | tl.where(gap_bad > 0, 8, 0)

        # ---- phase 2: decode again; write BF16 words to p0 + first + k ----
        kend = tl.maximum(tl.minimum(block_n - first, count.to(tl.int64)), 0).to(tl.int32)
        lane_sm = sm_ptr + p0 + first
        lane_out = out_ptr + p0 + first
        pos = gap
        k = zero
        while tl.max((k < kend).to(tl.int32), axis=0) > 0:
            for _u in tl.static_range(UNROLL):
                act = k < kend
                at = pos >> 3
                word = zero  # the stream from my next code's byte on: 2 bytes, one more per subtable level, at most 4
                for q in tl.static_range(2 + EXTRA - EXTRA // 3):
                    x = tl.load(lane_enc + at + q, mask=act & (at + q < avail), other=0).to(tl.int32)
                    word = word | (x << (24 - 8 * q))
                word = word << (pos & 7)
                top = (word >> 24) & 0xFF
                info = tl.load(minfo_ptr + top, mask=act, other=0)
                n2 = (info >> 8) & 15
                multi = act & (n2 > 0)
                single = act & (n2 == 0)
                e = tl.load(tab_ptr + top, mask=single, other=0)
                for d in tl.static_range(1, EXTRA + 1):
                    follow = single & (e < 0) & (-e < n_tab)
                    if d < 3:
                        nxt = (word >> (24 - 8 * d)) & 0xFF
                    else:
                        x = tl.load(lane_enc + at + 4, mask=follow & (at + 4 < avail), other=0).to(tl.int32)
                        nxt = (word & 0xFF) | (x >> (8 - (pos & 7)))
                    e2 = tl.load(tab_ptr + tl.where(follow, -e * 256 + nxt, 0), mask=follow, other=0)
                    e = tl.where(e < 0, e2, e)
                e = tl.where(e <= 0, 0x100, e)  # phase 1 flagged a broken code; keep going safely regardless
                syms = tl.where(multi, tl.load(msym_ptr + top, mask=multi, other=0), e & 0xFF)
                n = tl.where(multi, n2, 1)
                nout = tl.where(act, tl.minimum(n, kend - k), 0)
                for j in tl.static_range(4):
                    put = nout > j
                    s = tl.load(lane_sm + k + j, mask=put, other=0).to(tl.int32)
                    bits = ((s & 0x80) << 8) | (((syms >> (8 * j)) & 0xFF) << 7) | (s & 0x7F)
                    tl.store(lane_out + k + j, bits.to(tl.int16), mask=put)
                pos += tl.where(act, tl.where(multi, (info >> 12) & 15, e >> 8), 0)
                k += tl.where(act, n, 0)
        carry += tl.sum(count, axis=0).to(tl.int64)

    total = carry
    count_bad = (block_n > 0) & ((total < block_n) | ((b != n_blocks - 1) & (total != block_n)))
    flags = flags | tl.where(count_bad, 4, 0)
    tl.atomic_or(status_ptr, flags, mask=flags != 0)
    tl.atomic_min(status_ptr + 1, b.to(tl.int32), mask=flags != 0)
