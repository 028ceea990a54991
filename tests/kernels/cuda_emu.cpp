// Runs kernels/cuda/decode.cu on the CPU: one std::thread per CUDA thread, std::barrier for __syncthreads and
// for warp shuffles, shared memory as one exactly-sized heap buffer per block. Slow (a few thousand threads a
// second) but it executes the very source the GPU compiles, so tests can check its logic without a GPU.
// Built by tests/kernels/test_cuda_emulated.py with g++ -std=c++20 (optionally -fsanitize=address).
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct dim3 { unsigned int x = 0, y = 1, z = 1; };

thread_local dim3 threadIdx;
dim3 blockIdx, blockDim;
static std::barrier<>* g_block_barrier = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
static int g_xchg[32][32];
uint4 (*g_smem_arr)[] = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__
#define df_smem (*g_smem_arr)

template <class T> inline T __ldg(const T* p) { return *p; }
inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
inline int __shfl_up_sync(unsigned, int v, int d) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_xchg[w][l] = v;
    g_warp_barriers[w]->arrive_and_wait();
    const int r = l >= d ? g_xchg[w][l - d] : v;
    g_warp_barriers[w]->arrive_and_wait();
    return r;
}
inline int atomicOr(int* p, int v) { return std::atomic_ref<int>(*p).fetch_or(v); }
inline int atomicMin(int* p, int v) {
    std::atomic_ref<int> a(*p);
    int old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old;
}
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
    const uint64_t v = ((uint64_t)hi << 32) | lo;
    return (unsigned int)((v << (shift & 31)) >> 32);
}
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned int)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return r;
}

#include DECODE_CU

extern "C" int emu_launch(const char* kernel, int grid, int block, long long smem_bytes,
                          const unsigned char* enc, i64 n_enc, const unsigned char* sm, const unsigned char* gaps,
                          i64 n_gaps, const i64* positions, int n_blocks, const int* tables, int n_tables,
                          int n_tables_smem, const u32* lut_sym, const unsigned short* lut_info, unsigned short* out, i64 numel,
                          int bpw, int wpb, int wpt, int stage_cap, int vec_out, int* status) {
    using K = void (*)(const unsigned char*, i64, const unsigned char*, const unsigned char*, i64, const i64*, int,
                       const int*, int, int, const u32*, const unsigned short*, unsigned short*, i64, int, int, int, int,
                       int, int*);
    K k = nullptr;
    const std::string name(kernel);
    if (name == "dfloat_decode_w32_t256") k = dfloat_decode_w32_t256;
    if (name == "dfloat_decode_w8_t512") k = dfloat_decode_w8_t512;
    if (name == "dfloat_decode_any") k = dfloat_decode_any;
    if (!k || block % 32 || block > 1024 || smem_bytes < 0) return 1;
    blockDim.x = block;
    g_warp_barriers.clear();
    for (int w = 0; w < block / 32; ++w) g_warp_barriers.emplace_back(new std::barrier<>(32));
    std::barrier<> bar(block);
    g_block_barrier = &bar;
    // exactly sized, so an out-of-range shared-memory access shows up under AddressSanitizer
    const size_t smem_size = ((size_t)smem_bytes + 15) / 16 * 16;
    void* raw = std::aligned_alloc(16, smem_size ? smem_size : 16);
    g_smem_arr = reinterpret_cast<uint4 (*)[]>(raw);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (int t = 0; t < block; ++t)
        threads.emplace_back([=, &bar] {
            threadIdx.x = t;
            for (int b = 0; b < grid; ++b) {  // blocks one after another; the same threads run each
                if (t == 0) {
                    blockIdx.x = b;
                    std::memset(raw, 0xCD, smem_size);  // no free zeros from the previous block
                }
                bar.arrive_and_wait();
                k(enc, n_enc, sm, gaps, n_gaps, positions, n_blocks, tables, n_tables, n_tables_smem, lut_sym,
                  lut_info, out, numel, bpw, wpb, wpt, stage_cap, vec_out, status);
                bar.arrive_and_wait();
            }
        });
    for (auto& th : threads) th.join();
    std::free(raw);
    return 0;
}
