// Runs kernels/cuda/gemv.cu on the CPU: one std::thread per CUDA thread, std::barrier for __syncthreads and for
// warp shuffles, shared memory as one exactly-sized heap buffer. It executes the very source the GPU compiles, so
// the fused kernel, its twin and the matrix decoder can be checked bit for bit without a GPU.
// Built by tests/kernels/test_gemv_emulated.py with g++ -std=c++20 -ffp-contract=off (fmaf is the only fused op).
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct alignas(8) uint2 { unsigned int x, y; };
struct dim3 { unsigned int x = 0, y = 1, z = 1; };

thread_local dim3 threadIdx;
dim3 blockIdx, blockDim;
static std::barrier<>* g_block_barrier = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
static float g_xchg[32][32];
unsigned int (*g_smem_arr)[] = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__
#define dfg_smem (*g_smem_arr)  // `extern __shared__ u32 dfg_smem[];` declares this global

template <class T> inline T __ldg(const T* p) { return *p; }
inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
// NVIDIA GPUs return the canonical NaN (0x7FFFFFFF) from FP32 arithmetic; x86 propagates an operand's payload,
// which depends on the instruction form the compiler picks. Canonicalise, as the GPU does.
inline float dfg_canonical(float r) { return std::isnan(r) ? __uint_as_float(0x7FFFFFFFu) : r; }
inline float __fmaf_rn(float a, float b, float c) { return dfg_canonical(std::fmaf(a, b, c)); }
inline float __fadd_rn(float a, float b) { return dfg_canonical(a + b); }
inline float __shfl_xor_sync(unsigned, float v, int d) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_xchg[w][l] = v;
    g_warp_barriers[w]->arrive_and_wait();
    const float r = g_xchg[w][l ^ d];
    g_warp_barriers[w]->arrive_and_wait();
    return r;
}
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned int)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return r;
}

#include GEMV_CU

using Kernel = void (*)(DFG_PARAMS);
using DecodeKernel = void (*)(DFG_PARAMS, unsigned short*);

#define DFG_CASE(NB) case NB: return twin ? dfloat_gemv_twin<R, NB> : dfloat_gemv<R, NB, 0>;  // MINB: launch bounds only
template <int R>
static Kernel pick(bool twin, int nb) {
    switch (nb) { DFG_CASE(1) DFG_CASE(2) DFG_CASE(3) DFG_CASE(4) DFG_CASE(5) DFG_CASE(6) DFG_CASE(7) DFG_CASE(8) }
    return nullptr;
}

template <int R>
static Kernel pick16(bool twin, int nb) {  // rows_per_tile 4 takes up to 16 rows of x per pass
    switch (nb) { DFG_CASE(9) DFG_CASE(10) DFG_CASE(11) DFG_CASE(12) DFG_CASE(13) DFG_CASE(14) DFG_CASE(15)
                  DFG_CASE(16) }
    return pick<R>(twin, nb);
}
#undef DFG_CASE

static Kernel pick_kernel(const std::string& kind, int r, int nb) {
    const bool twin = kind == "twin";
    if (kind != "twin" && kind != "fused") return nullptr;
    switch (r) {
        case 1: return pick<1>(twin, nb);
        case 2: return pick<2>(twin, nb);
        case 4: return pick16<4>(twin, nb);
        case 8: return pick<8>(twin, nb);
    }
    return nullptr;
}

static DecodeKernel pick_decode(int r) {
    switch (r) {
        case 1: return dfloat_gemv_decode<1>;
        case 2: return dfloat_gemv_decode<2>;
        case 4: return dfloat_gemv_decode<4>;
        case 8: return dfloat_gemv_decode<8>;
    }
    return nullptr;
}

// kind: "fused", "twin" or "decode" (then `out` receives the matrix).
extern "C" int emu_gemv(const char* kind, int r, int nb, int grid, int block, long long smem_bytes,
                        const u32* enc, i64 n_enc, const i64* woff, const u32* sm, const u32* lut, int peek,
                        const unsigned short* w, const unsigned short* x, unsigned short* y, int n, int k,
                        int groups, int b, i64 ldx, i64 ldy, int vec_x, unsigned short* out) {
    const std::string name(kind);
    Kernel kern = name == "decode" ? nullptr : pick_kernel(name, r, nb);
    DecodeKernel dec = name == "decode" ? pick_decode(r) : nullptr;
    if ((!kern && !dec) || block % 32 || block > 1024 || smem_bytes < 0) return 1;
    blockDim.x = block;
    g_warp_barriers.clear();
    for (int i = 0; i < block / 32; ++i) g_warp_barriers.emplace_back(new std::barrier<>(32));
    std::barrier<> bar(block);
    g_block_barrier = &bar;
    const size_t smem_size = ((size_t)smem_bytes + 15) / 16 * 16;  // exact: overruns show under ASan
    void* raw = std::aligned_alloc(16, smem_size ? smem_size : 16);
    g_smem_arr = reinterpret_cast<unsigned int (*)[]>(raw);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (int t = 0; t < block; ++t)
        threads.emplace_back([=, &bar] {
            threadIdx.x = t;
            for (int bi = 0; bi < grid; ++bi) {
                if (t == 0) {
                    blockIdx.x = bi;
                    std::memset(raw, 0xCD, smem_size);
                }
                bar.arrive_and_wait();
                if (kern)
                    kern(enc, n_enc, woff, sm, lut, peek, w, x, y, n, k, groups, b, ldx, ldy, vec_x);
                else
                    dec(enc, n_enc, woff, sm, lut, peek, w, x, y, n, k, groups, b, ldx, ldy, vec_x, out);
                bar.arrive_and_wait();
            }
        });
    for (auto& th : threads) th.join();
    std::free(raw);
    return 0;
}
