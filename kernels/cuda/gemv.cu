// dfloat: y = x @ W.T straight from a GEMV-layout coded matrix (docs/FORMAT.md section 9), W never written out.
//
// Compiled at run time with NVRTC (through CuPy) by dfloat/kernels/cuda_gemv.py; no headers, raw pointers only.
// The same source runs on the CPU under tests/kernels/gemv_emu.cpp, thread by thread.
//
// ---- The layout (built by dfloat/kernels/gemv_layout.py) ---------------------------------------------------------
//   W is N x K BF16. A tile is R consecutive rows (R = rows_per_tile, a template parameter); one CUDA block of
//   T threads (T = 32 * n_warps) owns one tile and writes whole output rows: no reduction across blocks.
//   Columns are handed out in groups of 4: thread t owns the groups t, t + T, t + 2T, ... (G = ceil(K / 4T) of
//   them), i.e. columns c = 4 * (t + T * i) + j for i < G, j < 4. Rows >= N and columns >= K are padding weights
//   whose BF16 bits are 0 (coded like any weight), so every thread decodes exactly G * R * 4 codes in the order
//       for i < G:  for r < R:  for j < 4:  W[tile * R + r][4 * (t + T * i) + j]
//   sm      u32[n_tiles * G * R * T]  sign|mantissa bytes: word ((tile * G + i) * R + r) * T + t holds the 4 bytes
//           of (r, i, j = 0..3) of thread t, weight j in byte j (little-endian). A warp's loads are coalesced.
//   enc     u32[...]  each thread's exponent codes, MSB-first, as its own stream of 32-bit words. The streams of a
//           warp are interleaved word by word: lane l's word q is enc[woff[tile * n_warps + w] + 32 * q + l],
//           each lane padded with zero words to the longest stream of its warp (so a warp's loads are coalesced
//           and every lane starts on its own: the "index" is one offset per warp).
//   woff    i64[n_tiles * n_warps + 1]  word offset of each warp's interleaved region; the last entry = len(enc).
//   lut     u32[2 << peek]  for the next `peek` bits of a stream (peek = the longest code, at most 12), a pair
//           (exponent << 23, code_length). 32 KiB at most: it lives in shared memory.
//   BF16 word = ((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F); as an f32: (sm & 0x80) << 24 | exponent << 23
//           | (sm & 0x7F) << 16, built with one byte_perm and one bit-select.
//
// ---- The product ------------------------------------------------------------------------------------------------
// x is B x K BF16 (row stride ldx), y is B x N BF16 (row stride ldy). B rows are done in passes of NB rows (a
// template parameter: at most 16 for R = 4, else 8); each pass re-reads the tile's stream (from L1/L2). Thread t
// accumulates, in f32 with fused multiply-adds in the stream order above, acc[r][b] += W[r][c] * x[b][c]; then the
// block sums the threads' partial sums in a fixed order (a butterfly inside each warp, then warp 0 + warp 1 + ...
// in shared memory) and rounds to BF16 (nearest even). Each y[b] depends on x[b] alone (not on B or other rows).
//
// ---- The twin ---------------------------------------------------------------------------------------------------
// dfloat_gemv_twin<R, NB> is this very function with CODED = false: it reads each weight from a plain row-major BF16 W
// instead of decoding it; everything else (order of products, reduction, rounding) is the same code. So the fused
// product is bit-identical to the twin on the same weights, which is the contract the tests check.
//
// Safety: stream reads stay inside the warp's region (woff, checked against n_enc), table lookups are masked to
// the table, outputs are written only for rows < N and b < B. A corrupt stream gives wrong values, never an
// access outside the arrays. The kernel never synchronizes with the host and launches on the caller's stream,
// so it can be captured in a CUDA graph.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// benchmarks/gemv_sass_proxy.py sets this to 1 to drop the edge-of-matrix path (unaligned x, the last partial
// group of columns) from the loop it counts; kernels built for use never set it.
#ifndef DFG_PROXY_FULL_GROUPS
#define DFG_PROXY_FULL_GROUPS 0
#endif

struct GemvArgs {
    const u32* enc;
    i64 n_enc;
    const i64* woff;
    const u32* sm;
    const u32* lut;
    int peek;                    // bits looked up per code (the longest code length)
    const unsigned short* w;     // the twin's plain BF16 weights, N x K row-major
    const unsigned short* x;     // B x K, row stride ldx
    unsigned short* y;           // B x N, row stride ldy
    int n;
    int k;
    int groups;                  // G
    int b;                       // rows of x
    i64 ldx;
    i64 ldy;
    int vec_x;                   // 1: x rows are 8-byte aligned and ldx % 4 == 0 (4 columns per load)
};

#define DFG_PARAMS                                                                                            \
    const u32* __restrict__ enc, i64 n_enc, const i64* __restrict__ woff, const u32* __restrict__ sm,         \
        const u32* __restrict__ lut, int peek, const unsigned short* __restrict__ w,                          \
        const unsigned short* __restrict__ x, unsigned short* __restrict__ y, int n, int k, int groups, int b, \
        i64 ldx, i64 ldy, int vec_x
#define DFG_ARGS {enc, n_enc, woff, sm, lut, peek, w, x, y, n, k, groups, b, ldx, ldy, vec_x}

__device__ __forceinline__ unsigned short dfg_bf16_rn(float f) {
    const u32 u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((u >> 16) | 0x0040u);  // NaN stays NaN
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// One lane's exponent stream: a left-aligned 64-bit buffer holding `nbits` valid bits, and the next two words
// (fetched ahead, so a load has about 20 codes of work to arrive in).
struct DfgReader {
    u64 buf;
    int nbits;
    int q;       // index of the next word to fetch
    u32 next0;   // word q - 2
    u32 next1;   // word q - 1
};

__device__ __forceinline__ u32 dfg_word(const u32* __restrict__ p, int q, int n_words) {
    return q < n_words ? __ldg(p + 32 * q) : 0u;
}

__device__ __forceinline__ void dfg_start(DfgReader& s, const u32* __restrict__ p, int n_words) {
    s.buf = ((u64)dfg_word(p, 0, n_words) << 32) | (u64)dfg_word(p, 1, n_words);
    s.nbits = 64;
    s.next0 = dfg_word(p, 2, n_words);
    s.next1 = dfg_word(p, 3, n_words);
    s.q = 4;
}

// Called after every second code: keeps nbits >= 33 at the start of each pair, enough for two codes of <= 12 bits.
__device__ __forceinline__ void dfg_refill(DfgReader& s, const u32* __restrict__ p, int n_words) {
    if (s.nbits <= 32) {
        s.buf |= (u64)s.next0 << (32 - s.nbits);
        s.nbits += 32;
        s.next0 = s.next1;
        s.next1 = dfg_word(p, s.q, n_words);
        s.q += 1;
    }
}

// Decode one weight as f32 bits: exponent from the table, sign and mantissa from byte j of `smw`.
template <int J>
__device__ __forceinline__ u32 dfg_decode(DfgReader& s, const uint2* s_lut, int peek, u32 smw) {
    const uint2 e = s_lut[(u32)(s.buf >> (64 - peek))];  // (exponent << 23, code length)
    s.buf <<= e.y;
    s.nbits -= (int)e.y;
    const u32 v = __byte_perm(smw, 0u, 0x0044u | (J * 0x1100u));  // sm byte in bits 31..24 and 23..16
    return (v & 0x807F0000u) | e.x;
}

template <int R, int NB, bool CODED>
__device__ __forceinline__ void dfg_gemv(const GemvArgs& a) {
    extern __shared__ u32 dfg_smem[];
    const int T = (int)blockDim.x;
    const int tid = (int)threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n_warps = T >> 5;
    const int tile = (int)blockIdx.x;
    const int row0 = tile * R;
    const int peek = a.peek;

    const uint2* s_lut = reinterpret_cast<const uint2*>(dfg_smem);
    float* s_red = reinterpret_cast<float*>(dfg_smem + (CODED ? (2 << peek) : 0));  // [n_warps][R * NB]
    if (CODED) {
        for (int i = tid; i < (2 << peek); i += T) dfg_smem[i] = __ldg(a.lut + i);
    }
    __syncthreads();

    const u32* __restrict__ smp = a.sm + (i64)tile * a.groups * R * T + tid;
    const u32* __restrict__ ep = a.enc;
    int n_words = 0;
    if (CODED) {
        i64 w0 = a.woff[(i64)tile * n_warps + warp];
        i64 w1 = a.woff[(i64)tile * n_warps + warp + 1];
        if (w0 < 0 || w1 < w0 || w1 > a.n_enc) w0 = w1 = 0;  // corrupt offsets: decode zeros, stay in bounds
        n_words = (int)((w1 - w0) >> 5);
        ep = a.enc + w0 + lane;
    }

    for (int b0 = 0; b0 < a.b; b0 += NB) {
        float acc[R][NB];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) acc[r][nb] = 0.0f;

        DfgReader s;
        if (CODED) dfg_start(s, ep, n_words);

        // Pointers advance by one group per iteration (no 64-bit index arithmetic in the loop). The sign|mantissa
        // words of the next group are loaded one group ahead.
        const unsigned short* __restrict__ xg = a.x + (i64)b0 * a.ldx + 4 * tid;
        const u32* __restrict__ smg = smp;
        u32 sm_next[R];
#pragma unroll
        for (int r = 0; r < R; ++r) sm_next[r] = (CODED && a.groups > 0) ? __ldg(smg + r * T) : 0u;
        for (int i = 0; i < a.groups; ++i, xg += 4 * T, smg += R * T) {
            const int col = 4 * (tid + T * i);
            u32 sm_now[R];
            const u32* __restrict__ sm_ahead = i + 1 < a.groups ? smg + R * T : smg;  // the last group reloads itself
#pragma unroll
            for (int r = 0; r < R; ++r) {
                sm_now[r] = sm_next[r];
                if (CODED) sm_next[r] = __ldg(sm_ahead + r * T);
            }
            float xv[NB][4];
            // uniform: a whole group of columns and rows of x
            if (DFG_PROXY_FULL_GROUPS || (a.vec_x && 4 * T * (i + 1) <= a.k && b0 + NB <= a.b)) {
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
                    const uint2 u = __ldg(reinterpret_cast<const uint2*>(xg + nb * a.ldx));
                    xv[nb][0] = __uint_as_float(u.x << 16);
                    xv[nb][1] = __uint_as_float(u.x & 0xFFFF0000u);
                    xv[nb][2] = __uint_as_float(u.y << 16);
                    xv[nb][3] = __uint_as_float(u.y & 0xFFFF0000u);
                }
            } else {
#pragma unroll
                for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        xv[nb][j] = (b0 + nb < a.b && col + j < a.k)
                                        ? __uint_as_float((u32)__ldg(xg + nb * a.ldx + j) << 16)
                                        : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                u32 f[4];
                if (CODED) {
                    const u32 smw = sm_now[r];
                    f[0] = dfg_decode<0>(s, s_lut, peek, smw);
                    f[1] = dfg_decode<1>(s, s_lut, peek, smw);
                    dfg_refill(s, ep, n_words);
                    f[2] = dfg_decode<2>(s, s_lut, peek, smw);
                    f[3] = dfg_decode<3>(s, s_lut, peek, smw);
                    dfg_refill(s, ep, n_words);
                } else {
                    const int row = row0 + r;
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        f[j] = (row < a.n && col + j < a.k) ? (u32)__ldg(a.w + (i64)row * a.k + col + j) << 16 : 0u;
                }
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float wv = __uint_as_float(f[j]);
#pragma unroll
                    for (int nb = 0; nb < NB; ++nb) acc[r][nb] = __fmaf_rn(wv, xv[nb][j], acc[r][nb]);
                }
            }
        }

        // Fixed-order reduction: butterfly inside the warp (every lane ends with the same sum), then warps in order.
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                float v = acc[r][nb];
#pragma unroll
                for (int d = 16; d > 0; d >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, d));
                if (lane == 0) s_red[warp * (R * NB) + r * NB + nb] = v;
            }
        __syncthreads();
        for (int o = tid; o < R * NB; o += T) {
            const int r = o / NB;
            const int nb = o - r * NB;
            float v = s_red[o];
            for (int wi = 1; wi < n_warps; ++wi) v = __fadd_rn(v, s_red[wi * (R * NB) + o]);
            if (row0 + r < a.n && b0 + nb < a.b) a.y[(i64)(b0 + nb) * a.ldy + row0 + r] = dfg_bf16_rn(v);
        }
        __syncthreads();
    }
}

// Decode the matrix to plain BF16 (N x K row-major): for prefill (more than 16 rows), decode then cuBLAS.
template <int R>
__device__ __forceinline__ void dfg_decode_matrix(const GemvArgs& a, unsigned short* __restrict__ out) {
    extern __shared__ u32 dfg_smem[];
    const int T = (int)blockDim.x;
    const int tid = (int)threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n_warps = T >> 5;
    const int tile = (int)blockIdx.x;
    const int row0 = tile * R;
    for (int i = tid; i < (2 << a.peek); i += T) dfg_smem[i] = __ldg(a.lut + i);
    const uint2* s_lut = reinterpret_cast<const uint2*>(dfg_smem);
    __syncthreads();
    i64 w0 = a.woff[(i64)tile * n_warps + warp];
    i64 w1 = a.woff[(i64)tile * n_warps + warp + 1];
    if (w0 < 0 || w1 < w0 || w1 > a.n_enc) w0 = w1 = 0;
    const int n_words = (int)((w1 - w0) >> 5);
    const u32* __restrict__ ep = a.enc + w0 + lane;
    const u32* __restrict__ smp = a.sm + (i64)tile * a.groups * R * T + tid;
    DfgReader s;
    dfg_start(s, ep, n_words);
    for (int i = 0; i < a.groups; ++i) {
        const int col = 4 * (tid + T * i);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const u32 smw = __ldg(smp + ((i64)i * R + r) * T);
            u32 f[4];
            f[0] = dfg_decode<0>(s, s_lut, a.peek, smw);
            f[1] = dfg_decode<1>(s, s_lut, a.peek, smw);
            dfg_refill(s, ep, n_words);
            f[2] = dfg_decode<2>(s, s_lut, a.peek, smw);
            f[3] = dfg_decode<3>(s, s_lut, a.peek, smw);
            dfg_refill(s, ep, n_words);
            const int row = row0 + r;
            if (row < a.n) {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    if (col + j < a.k) out[(i64)row * a.k + col + j] = (unsigned short)(f[j] >> 16);
            }
        }
    }
}

// MINB = 0: no bound beyond 256 threads (ptxas picks the registers). MINB > 0: blocks of at most 128 threads, MINB
// of them per SM, i.e. at most 65536 / (128 * MINB) registers; dfloat/kernels/cuda_gemv.py chooses MINB = 3 for
// the instances with the most accumulators (R * NB > 48), which ptxas would otherwise give 2 blocks per SM.
template <int R, int NB, int MINB>
__global__ void __launch_bounds__(MINB ? 128 : 256, MINB) dfloat_gemv(DFG_PARAMS) {
    const GemvArgs a = DFG_ARGS;
    dfg_gemv<R, NB, true>(a);
}

template <int R, int NB>
__global__ void __launch_bounds__(256) dfloat_gemv_twin(DFG_PARAMS) {
    const GemvArgs a = DFG_ARGS;
    dfg_gemv<R, NB, false>(a);
}

template <int R>
__global__ void __launch_bounds__(256) dfloat_gemv_decode(DFG_PARAMS, unsigned short* __restrict__ out) {
    const GemvArgs a = DFG_ARGS;
    dfg_decode_matrix<R>(a, out);
}
