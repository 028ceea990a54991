// dfloat: decode one compressed unit to BF16 on an NVIDIA GPU.
//
// Compiled at run time with NVRTC (through CuPy) by dfloat/kernels/cuda_decode.py; no headers are included so
// the source compiles with NVRTC's built-ins alone. Everything the kernel needs is passed as raw pointers.
//
// ---- The stream (docs/FORMAT.md; the same semantics as the official DFloat11 release) ------------------------
//   encoded_exponent  uint8[n_enc]   Huffman codes of the exponents, MSB-first, back to back; last byte padded.
//   sign_mantissa     uint8[numel]   one raw byte per weight: bit 7 = sign, bits 6..0 = mantissa.
//   gaps              uint8[...]     one 5-bit number per window of `bpw` encoded bytes, packed MSB-first
//                                    (big-endian 5-bit digits): the bit offset, inside the window, of the first
//                                    code that starts in that window.
//   output_positions  int64[n_blocks+1]  the output index of the first code that starts in each block of `wpb`
//                                    windows; the last entry is numel.
//   BF16 word = ((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F).
//   Codes are at most 32 bits long, so a code that starts in a window ends at most 4 bytes past it.
//
// ---- Decode tables (built on the host from the unit's code, trusted) -------------------------------------------
//   tables  int32[n_tables][256]: 8-bit multi-level lookup. Entry > 0: a code ends here,
//           (total_length << 8) | symbol; entry < 0: continue in table -entry with the next 8 bits; 0: no code.
//   lut_sym  uint32[4096]: for the next 12 bits, up to 4 whole codes' symbols, first in the lowest byte.
//   lut_info uint16[4096]: bits 0-3 nc = whole codes in the next 12 bits (up to 12), bits 4-7 their total length;
//           bits 8-10 nd = min(nc, 4) (the codes in lut_sym), bits 12-15 their total length. nc = 0 means the
//           first code is longer than 12 bits (or no code): use `tables`.
//
// ---- The kernel ---------------------------------------------------------------------------------------------------
// One CUDA block per block of windows; thread t owns `wpt` consecutive windows (1 unless a block has more than
// 1024 windows), i.e. L = wpt * bpw encoded bytes. Shared memory holds the decode tables, each thread's L + 4
// encoded bytes (a slot of an odd number of 32-bit words, so threads reading their slots hit distinct banks),
// a 32-entry scan scratch, and a staging area for up to `stage_cap` decoded exponents.
// A thread reads its stream without a bit buffer: the 32 bits at slot bit `pos` are one funnel shift of the two
// slot words around it (no refill branch, no 64-bit shifts), and one 12-bit lookup consumes every whole code in
// them (about 4 typical 2-3-bit codes).
//   1. count: each thread counts the codes that start in its L bytes (from its first window's gap), up to 12 per
//      lookup; an exclusive block scan of the counts gives each thread's first output inside the block. Where its
//      counting stopped (the first code start at or after its bytes' end) must be the next window's start offset
//      (the gap rule, docs/FORMAT.md): a thread checks it against that window's gap.
//   2. decode again, 4 codes per lookup, and put each exponent in the staging area at its output index; then the
//      whole block writes BF16 words out coalesced, 8 at a time (16-byte stores) combining staged exponents with
//      sign_mantissa. A block with more codes than the staging area holds does it in rounds; each thread keeps
//      its place.
// Safety: every global read is bounds-checked (bytes past the stream read as 0); a thread decodes in phase 2 only
// codes that phase 1 counted inside its own bytes and whose output index lies inside the block's range, and a
// block writes only [output_positions[b], output_positions[b+1]) after checking 0 <= start <= end <= numel. So a
// corrupt stream yields wrong values inside `out`, never a write outside it. Corruption that is visible here sets
// bits in status[0] (atomicOr) and the lowest such block in status[1] (atomicMin); the host reads them only when
// asked to check, so the normal path never synchronizes.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define DF_STATUS_BAD_POSITIONS 1  // output_positions out of order or out of range
#define DF_STATUS_BAD_CODE 2       // a bit pattern that is no code, where an output was expected
#define DF_STATUS_BAD_COUNT 4      // the codes in a block disagree with output_positions
#define DF_STATUS_BAD_GAP 8        // a window's start offset is not where the previous window's codes end

#define DF_LUT_BITS 12
#define DF_LUT_SIZE (1 << DF_LUT_BITS)

#define DF_SCAN_WORDS 40

struct DecodeArgs {
    const unsigned char* enc;
    i64 n_enc;
    const unsigned char* sm;
    const unsigned char* gaps;
    i64 n_gaps;
    const i64* positions;
    int n_blocks;
    const int* tables;
    int n_tables;
    int n_tables_smem;  // tables copied to shared memory (the rest are read from global memory)
    const u32* lut_sym;
    const unsigned short* lut_info;
    unsigned short* out;
    i64 numel;
    int bpw;        // encoded bytes per window
    int wpb;        // windows per block
    int wpt;        // windows per thread
    int stage_cap;  // exponents staged per round (a multiple of 16)
    int vec_out;    // 1: out is 16-byte aligned and sign_mantissa 8-byte aligned
    int* status;    // [flags, first bad block]
};

// The kernels' parameters, in this order (the host passes them one by one).
#define DF_PARAMS                                                                                          \
    const unsigned char* __restrict__ enc, i64 n_enc, const unsigned char* __restrict__ sm,                \
        const unsigned char* __restrict__ gaps, i64 n_gaps, const i64* __restrict__ positions, int n_blocks, \
        const int* __restrict__ tables, int n_tables, int n_tables_smem, const u32* __restrict__ lut_sym, \
        const unsigned short* __restrict__ lut_info, unsigned short* __restrict__ out, i64 numel, int bpw, int wpb,      \
        int wpt, int stage_cap, int vec_out, int* status
#define DF_ARGS                                                                                            \
    {enc, n_enc, sm, gaps, n_gaps, positions, n_blocks, tables, n_tables, n_tables_smem, lut_sym, lut_info, out, \
     numel, bpw, wpb, wpt, stage_cap, vec_out, status}

__device__ __forceinline__ void df_report(int* status, int flag, int block) {
    atomicOr(status, flag);
    atomicMin(status + 1, block);
}

__device__ __forceinline__ i64 df_min64(i64 a, i64 b) { return a < b ? a : b; }

__device__ __forceinline__ u32 df_bswap(u32 x) { return __byte_perm(x, 0u, 0x0123u); }

// Slot words per thread: ceil((L + 4) / 4), made odd so that consecutive threads start in different banks.
__host__ __device__ constexpr int df_slot_words(int L) { return ((L + 7) >> 2) | 1; }

// The 5-bit start offset of window w (packed MSB-first); missing bytes read as 0.
__device__ __forceinline__ int df_gap(const unsigned char* __restrict__ gaps, i64 n_gaps, i64 w) {
    const i64 bit = 5 * w;
    const i64 byte = bit >> 3;
    const u32 hi = byte < n_gaps ? (u32)__ldg(gaps + byte) : 0u;
    const u32 lo = byte + 1 < n_gaps ? (u32)__ldg(gaps + byte + 1) : 0u;
    return (int)((((hi << 8) | lo) >> (11 - (int)(bit & 7))) & 31u);
}

// The 32 stream bits at slot bit `pos`, MSB-first (a slot holds big-endian words).
__device__ __forceinline__ u32 df_peek(const u32* slot, int pos) {
    const int w = pos >> 5;
    return __funnelshift_l(slot[w + 1], slot[w], (u32)pos);
}

// The code at the top of `x` through the multi-level tables (at most 4 levels for 32-bit codes): (length << 8) |
// symbol, or 0 = no code. Out of line: only codes longer than 12 bits (rare) and the last few codes of a thread
// come here.
__device__ __noinline__ int df_lookup(u32 x, const int* s_tab, const int* __restrict__ g_tab, int n_smem,
                                      int n_tab) {
    int e = s_tab[x >> 24];
#pragma unroll
    for (int d = 1; d < 4; ++d) {
        if (e >= 0) break;
        const int t = -e;
        if (t <= 0 || t >= n_tab) return 0;
        const int idx = t * 256 + (int)((x >> (24 - 8 * d)) & 0xFFu);
        e = t < n_smem ? s_tab[idx] : __ldg(g_tab + idx);
    }
    return e < 0 ? 0 : e;
}

// Exclusive scan of v over the block (blockDim.x a multiple of 32); *total gets the sum.
__device__ __forceinline__ int df_block_scan(int v, int* s_scan, int* total) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    int x = v;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, d);
        if (lane >= d) x += y;
    }
    if (lane == 31) s_scan[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < n_warps ? s_scan[lane] : 0;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, w, d);
            if (lane >= d) w += y;
        }
        s_scan[lane] = w;
    }
    __syncthreads();
    *total = s_scan[n_warps - 1];
    return (warp > 0 ? s_scan[warp - 1] : 0) + x - v;
}

// Two BF16 words (little-endian in a u32) from two exponent bytes and two sign|mantissa bytes.
__device__ __forceinline__ u32 df_pair(u32 e2, u32 s2) {
    return ((s2 & 0x00800080u) << 8) | (e2 << 7) | (s2 & 0x007F007Fu);
}

__device__ __forceinline__ unsigned short df_word(u32 e, u32 s) {
    return (unsigned short)(((s & 0x80u) << 8) | (e << 7) | (s & 0x7Fu));
}

template <int BPW, int NT>
__device__ __forceinline__ void df_decode(const DecodeArgs& a) {
    extern __shared__ uint4 df_smem[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(df_smem);

    const int tid = threadIdx.x;
    const int nthr = NT > 0 ? NT : (int)blockDim.x;
    const int b = blockIdx.x;
    const int L = BPW > 0 ? BPW : a.bpw * a.wpt;  // encoded bytes per thread
    const int SW = df_slot_words(L);
    const int n_slots = BPW > 0 ? NT : (a.wpb + a.wpt - 1) / a.wpt;

    const i64 p0 = a.positions[b];
    const i64 p1 = a.positions[b + 1];
    if (p0 < 0 || p1 < p0 || p1 > a.numel) {  // uniform over the block
        if (tid == 0) df_report(a.status, DF_STATUS_BAD_POSITIONS, b);
        return;
    }
    const i64 block_n = p1 - p0;
    if (block_n == 0) return;  // the last block may start after the last code

    // ---- shared memory layout (every part a multiple of 16 bytes) ----
    int* s_tab = reinterpret_cast<int*>(smem);
    u32* s_sym = reinterpret_cast<u32*>(smem + a.n_tables_smem * 1024);
    unsigned short* s_info = reinterpret_cast<unsigned short*>(s_sym + DF_LUT_SIZE);
    int* s_scan = reinterpret_cast<int*>(s_info + DF_LUT_SIZE);
    u32* s_slots = reinterpret_cast<u32*>(s_scan + DF_SCAN_WORDS);
    unsigned char* s_stage = reinterpret_cast<unsigned char*>(s_slots + ((n_slots * SW + 3) & ~3));

    for (int i = tid; i < a.n_tables_smem * 256; i += nthr) s_tab[i] = __ldg(a.tables + i);
    {  // the 12-bit tables: 16-byte loads (the host passes 16-byte aligned arrays)
        const uint4* __restrict__ gs = reinterpret_cast<const uint4*>(a.lut_sym);
        const uint4* __restrict__ gi = reinterpret_cast<const uint4*>(a.lut_info);
        uint4* ss = reinterpret_cast<uint4*>(s_sym);
        uint4* si = reinterpret_cast<uint4*>(s_info);
        for (int i = tid; i < DF_LUT_SIZE / 4; i += nthr) ss[i] = __ldg(gs + i);
        for (int i = tid; i < DF_LUT_SIZE / 8; i += nthr) si[i] = __ldg(gi + i);
    }

    // ---- this block's encoded bytes, L + 4 per thread, as big-endian words ----
    const i64 B0 = (i64)b * a.wpb * a.bpw;
    const int n_words = n_slots * SW;
    const bool fast = (L & 3) == 0 && ((reinterpret_cast<unsigned long long>(a.enc) + (u64)B0) & 3) == 0 &&
                      B0 + (i64)n_slots * L + 4 <= a.n_enc;
    if (fast) {
        const u32* __restrict__ src = reinterpret_cast<const u32*>(a.enc + B0);
        if constexpr (BPW > 0) {
#pragma unroll
            for (int r = 0; r < df_slot_words(BPW); ++r) {  // NT threads, NT slots of df_slot_words(BPW) words
                const int i = r * NT + tid;
                if (i < n_words) {
                    const int t = i / SW;
                    const int j = i - t * SW;
                    s_slots[i] = 4 * j < L + 4 ? df_bswap(__ldg(src + t * (L >> 2) + j)) : 0u;
                }
            }
        } else {
            for (int i = tid; i < n_words; i += nthr) {
                const int t = i / SW;
                const int j = i - t * SW;
                s_slots[i] = 4 * j < L + 4 ? df_bswap(__ldg(src + t * (L >> 2) + j)) : 0u;
            }
        }
    } else {
        for (int i = tid; i < n_words; i += nthr) {
            const int t = i / SW;
            const int j = i - t * SW;
            const i64 at = B0 + (i64)t * L + 4 * j;
            u32 w = 0;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const u32 byte = (4 * j + q < L + 4 && at + q < a.n_enc) ? (u32)__ldg(a.enc + at + q) : 0u;
                w |= byte << (24 - 8 * q);
            }
            s_slots[i] = w;
        }
    }
    __syncthreads();

    // ---- phase 1: count the codes that start in my bytes ----
    const u32* slot = s_slots + tid * SW;
    const i64 my_byte = B0 + (i64)tid * L;
    const int my_windows = BPW > 0 ? 1 : (a.wpb - tid * a.wpt < a.wpt ? a.wpb - tid * a.wpt : a.wpt);  // last: fewer
    int end_bits = 0;  // my bytes end at my last window or the stream's end
    if (tid < n_slots && my_byte < a.n_enc)
        end_bits = (int)df_min64((i64)my_windows * a.bpw, a.n_enc - my_byte) * 8;
    const int gap = end_bits > 0 ? df_gap(a.gaps, a.n_gaps, (i64)b * a.wpb + (i64)tid * a.wpt) : 0;

    int pos = gap;  // slot bit of my next code
    int count = 0;
    bool bad = false;
    // Several windows per thread (the generic kernel only): count window by window, and check the gap rule at
    // each inner window's start too; bad_gap_at = my local index of the first code that broke it.
    int bad_gap_at = -1;
    int wend = end_bits;  // the end of the window being counted
    if constexpr (BPW == 0) {
        if (a.wpt > 1 && a.bpw * 8 < end_bits) wend = a.bpw * 8;
    }
    for (int wi = 1;; ++wi) {
        const int wend_lut = wend - DF_LUT_BITS;
        while (pos <= wend_lut) {  // every whole code in the next 12 bits, in one lookup
            const u32 x = df_peek(slot, pos);
            const u32 info = s_info[x >> (32 - DF_LUT_BITS)];
            int n = (int)(info & 15u);
            int len = (int)((info >> 4) & 15u);
            if (n == 0) {  // a code longer than 12 bits, or no code
                const int e = df_lookup(x, s_tab, a.tables, a.n_tables_smem, a.n_tables);
                if (e <= 0) {
                    bad = true;
                    break;
                }
                n = 1;
                len = e >> 8;
            }
            pos += len;
            count += n;
        }
        while (!bad && pos < wend) {  // the last few bits one code at a time
            const int e = df_lookup(df_peek(slot, pos), s_tab, a.tables, a.n_tables_smem, a.n_tables);
            if (e <= 0) {
                bad = true;
                break;
            }
            pos += e >> 8;
            count += 1;
        }
        if (bad || wend >= end_bits) break;
        if (bad_gap_at < 0 &&
            pos != wi * a.bpw * 8 + df_gap(a.gaps, a.n_gaps, (i64)b * a.wpb + (i64)tid * a.wpt + wi))
            bad_gap_at = count;
        wend = (wi + 1) * a.bpw * 8 < end_bits ? (wi + 1) * a.bpw * 8 : end_bits;
    }

    int total = 0;
    const int first = df_block_scan(count, s_scan, &total);  // my first output, relative to p0
    if (bad && (i64)first + count < block_n) df_report(a.status, DF_STATUS_BAD_CODE, b);
    if (tid == 0 && ((i64)total < block_n || (b != a.n_blocks - 1 && (i64)total != block_n)))
        df_report(a.status, DF_STATUS_BAD_COUNT, b);
    // The gap rule: my counting stopped at the first code start at or after my bytes' end; if that code is an
    // output (index < numel), it is the first code of the next window and must start at that window's offset.
    if (bad_gap_at >= 0 && p0 + first + bad_gap_at < a.numel) df_report(a.status, DF_STATUS_BAD_GAP, b);
    if (end_bits > 0 && !bad && p0 + first + count < a.numel) {
        const i64 wn = (i64)b * a.wpb + (i64)tid * a.wpt + my_windows;  // the next window (maybe the next block's)
        if (wn * a.bpw < a.n_enc && pos != my_windows * a.bpw * 8 + df_gap(a.gaps, a.n_gaps, wn))
            df_report(a.status, DF_STATUS_BAD_GAP, b);
    }

    // ---- phase 2: decode again into the staging area, then write BF16 out, in rounds of stage_cap ----
    pos = gap;
    int k = 0;  // codes of mine already staged
    const int S = a.stage_cap;
    for (i64 lo = 0; lo < block_n; lo += S) {
        const int cnt = (int)df_min64((i64)S, block_n - lo);
        const i64 g0 = p0 + lo;
        const int shift = a.vec_out ? (int)(g0 & 7) : 0;  // stage index of output g is g - g0 + shift
        const i64 ke = lo + cnt - first;
        const int k_end = ke <= 0 ? 0 : (ke >= count ? count : (int)ke);
        if (k < k_end) {
            unsigned char* dst = s_stage + (shift + (int)((i64)first - lo));  // dst[k], k >= lo - first
            const int k_end4 = k_end - 4;
            while (k <= k_end4) {  // up to 4 codes per lookup
                const u32 x = df_peek(slot, pos);
                const u32 info = s_info[x >> (32 - DF_LUT_BITS)];
                const int n = (int)((info >> 8) & 7u);
                if (n == 0) {
                    int e = df_lookup(x, s_tab, a.tables, a.n_tables_smem, a.n_tables);
                    if (e <= 0) e = 0x100;  // phase 1 counted a code here; keep going safely regardless
                    dst[k] = (unsigned char)e;
                    pos += e >> 8;
                    k += 1;
                } else {
                    const u32 syms = s_sym[x >> (32 - DF_LUT_BITS)];
                    dst[k] = (unsigned char)syms;  // all four are mine (k + 4 <= k_end); extras get overwritten
                    dst[k + 1] = (unsigned char)(syms >> 8);
                    dst[k + 2] = (unsigned char)(syms >> 16);
                    dst[k + 3] = (unsigned char)(syms >> 24);
                    pos += (int)(info >> 12);
                    k += n;
                }
            }
            while (k < k_end) {
                int e = df_lookup(df_peek(slot, pos), s_tab, a.tables, a.n_tables_smem, a.n_tables);
                if (e <= 0) e = 0x100;
                dst[k] = (unsigned char)e;
                pos += e >> 8;
                k += 1;
            }
        }
        __syncthreads();

        // write outputs [g0, g0 + cnt): BF16 from the staged exponent and the sign|mantissa byte
        const i64 g1 = g0 + cnt;
        if (a.vec_out) {
            i64 ga = (g0 + 7) & ~(i64)7;
            if (ga > g1) ga = g1;
            i64 ge = g1 & ~(i64)7;
            if (ge < ga) ge = ga;
            for (i64 g = g0 + tid; g < ga; g += nthr)
                a.out[g] = df_word(s_stage[g - g0 + shift], __ldg(a.sm + g));
            for (i64 g = ge + tid; g < g1; g += nthr)
                a.out[g] = df_word(s_stage[g - g0 + shift], __ldg(a.sm + g));
            const uint2* __restrict__ smv = reinterpret_cast<const uint2*>(a.sm);
            uint4* outv = reinterpret_cast<uint4*>(a.out);
            const i64 base = g0 - shift;  // a multiple of 8
            for (i64 c = (ga >> 3) + tid; c < (ge >> 3); c += nthr) {
                const uint2 s = __ldg(smv + c);
                const uint2 e = *reinterpret_cast<const uint2*>(s_stage + (int)(8 * c - base));
                uint4 o;
                o.x = df_pair(__byte_perm(e.x, 0u, 0x4140u), __byte_perm(s.x, 0u, 0x4140u));
                o.y = df_pair(__byte_perm(e.x, 0u, 0x4342u), __byte_perm(s.x, 0u, 0x4342u));
                o.z = df_pair(__byte_perm(e.y, 0u, 0x4140u), __byte_perm(s.y, 0u, 0x4140u));
                o.w = df_pair(__byte_perm(e.y, 0u, 0x4342u), __byte_perm(s.y, 0u, 0x4342u));
                outv[c] = o;
            }
        } else {
            for (i64 g = g0 + tid; g < g1; g += nthr)
                a.out[g] = df_word(s_stage[g - g0], __ldg(a.sm + g));
        }
        __syncthreads();
    }
}

// Our default layout: 32-byte windows, 256 windows per block (blockDim must be 256). 5 blocks per SM: at most 51
// registers (45 on sm_90, no spills), so 62.5% occupancy when shared memory allows (cuda_decode.plan).
extern "C" __global__ void __launch_bounds__(256, 5) dfloat_decode_w32_t256(DF_PARAMS) {
    const DecodeArgs a = DF_ARGS;
    df_decode<32, 256>(a);
}

// The official DFloat11 layout: 8-byte windows, 512 windows per block (blockDim must be 512). 3 blocks per SM:
// at most 42 registers (39 on sm_90), 75% occupancy.
extern "C" __global__ void __launch_bounds__(512, 3) dfloat_decode_w8_t512(DF_PARAMS) {
    const DecodeArgs a = DF_ARGS;
    df_decode<8, 512>(a);
}

// Any other parameters: blockDim = ceil(ceil(wpb / wpt) / 32) * 32 <= 1024 threads.
extern "C" __global__ void __launch_bounds__(1024, 1) dfloat_decode_any(DF_PARAMS) {
    const DecodeArgs a = DF_ARGS;
    df_decode<0, 0>(a);
}
