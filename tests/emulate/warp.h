/* A host emulation of what the flash-attention kernels (kernels/cuda/attention.cu and
 * attention_backward.cu, between their "==== kernels" and "==== host" markers) use of CUDA, so
 * that their logic (fragment layouts, masks, tile walks, online softmax) runs and is checked on a
 * machine without a GPU (test_flash_emulated.cpp).
 *
 * Each CUDA thread of a block is a host thread; the block's threads run one block after another,
 * so a function-local `static` is the block's shared memory. Warp-wide instructions (ldmatrix,
 * mma.sync, shuffles, votes) are collective: every lane posts its operands, the warp meets at a
 * barrier, each lane computes its own result from all the posted operands, and the warp meets
 * again before the slots are reused. mma.sync's products are summed in fp32 in k order (the
 * tensor cores' order is not specified; the comparisons allow for rounding of that size); bf16
 * conversions round to nearest even as __floats2bfloat162_rn does. */
#ifndef ES_TESTS_EMULATE_WARP_H
#define ES_TESTS_EMULATE_WARP_H

#include <sched.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

using std::max;
using std::min;

struct dim3 {
    unsigned x = 0, y = 0, z = 0;
};
struct float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct uint2 {
    uint32_t x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
template <typename T> inline T __ldg(const T *p) { return *p; }

/* ---- the emulated machine --------------------------------------------------------------------- */

/* A barrier for threads that far outnumber the cores: waiters yield the core rather than sleep
 * (the warp instructions meet at one twice each, and a futex round trip per meeting costs more
 * than the arithmetic). */
struct emu_barrier {
    std::atomic<unsigned> arrived{0}, generation{0};
    unsigned count = 0;
    void wait() {
        const unsigned gen = generation.load(std::memory_order_acquire);
        if (arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == count) {
            arrived.store(0, std::memory_order_relaxed);
            generation.store(gen + 1, std::memory_order_release);
            return;
        }
        while (generation.load(std::memory_order_acquire) == gen) sched_yield();
    }
};

struct emu_warp {
    emu_barrier barrier;
    uint32_t words[32][10]; /* each lane's posted operands */
    float floats[32][4];
};

struct emu_block {
    emu_barrier barrier;
    std::vector<emu_warp> warps;
    std::vector<unsigned char> smem; /* dynamic shared memory */
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline thread_local emu_block *emu_this_block;

inline int emu_lane() { return (int)threadIdx.x % 32; }
inline emu_warp &emu_my_warp() { return emu_this_block->warps[threadIdx.x / 32]; }
inline void emu_warp_sync() { emu_my_warp().barrier.wait(); }
inline void __syncthreads() { emu_this_block->barrier.wait(); }

/* Runs kernel() for every block of a grid of `blocks` blocks of `threads` threads (a multiple of
 * 32), with `smem_bytes` of dynamic shared memory zeroed before the first block. */
inline void emu_launch(unsigned blocks, unsigned threads, size_t smem_bytes, const std::function<void()> &kernel) {
    emu_block block;
    block.warps = std::vector<emu_warp>(threads / 32);
    block.smem.assign(smem_bytes + 16, 0);
    block.barrier.count = threads;
    for (auto &w : block.warps) w.barrier.count = 32;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; t++)
        pool.emplace_back([&, t] {
            threadIdx.x = t, blockDim.x = threads, gridDim.x = blocks, emu_this_block = &block;
            for (unsigned b = 0; b < blocks; b++) {
                blockIdx.x = b;
                kernel();
                __syncthreads(); /* the block is done before the next one takes its shared memory */
            }
        });
    for (auto &thread : pool) thread.join();
}

/* ---- warp-wide instructions -------------------------------------------------------------------- */

inline float __shfl_xor_sync(unsigned, float value, int mask) {
    emu_warp &w = emu_my_warp();
    memcpy(&w.floats[emu_lane()][0], &value, sizeof value);
    emu_warp_sync();
    const float other = w.floats[emu_lane() ^ mask][0];
    emu_warp_sync();
    return other;
}

inline bool __any_sync(unsigned, bool predicate) {
    emu_warp &w = emu_my_warp();
    w.words[emu_lane()][0] = predicate;
    emu_warp_sync();
    bool any = false;
    for (int l = 0; l < 32; l++) any = any || w.words[l][0];
    emu_warp_sync();
    return any;
}

/* ---- bf16 and shared memory -------------------------------------------------------------------- */

inline uint16_t emu_bf16_bits(float x) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
inline float emu_bf16_value(uint16_t bits) {
    const uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

inline unsigned char *dynamic_smem() { return emu_this_block->smem.data(); }
/* "Shared addresses" are offsets into the block's dynamic shared memory. */
inline uint32_t smem_address(const void *p) { return (uint32_t)((const unsigned char *)p - dynamic_smem()); }

inline uint32_t pack_bf16(float lo, float hi) { return (uint32_t)emu_bf16_bits(lo) | (uint32_t)emu_bf16_bits(hi) << 16; }
inline void store_bf16x4(uint16_t *p, float4 x) {
    p[0] = emu_bf16_bits(x.x), p[1] = emu_bf16_bits(x.y), p[2] = emu_bf16_bits(x.z), p[3] = emu_bf16_bits(x.w);
}
inline void prefetch_l2(const void *) {}

inline uint16_t emu_smem_half(uint32_t address) {
    uint16_t h;
    memcpy(&h, dynamic_smem() + address, sizeof h);
    return h;
}

/* ldmatrix .x4: lane l names row l % 8 of matrix l / 8; lane l receives, of each matrix i, row
 * l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (low half first), or transposed, rows 2 (l % 4) and
 * 2 (l % 4) + 1 of column l / 4. */
inline void emu_ldsm(uint32_t (&r)[4], uint32_t address, bool transposed) {
    emu_warp &w = emu_my_warp();
    const int lane = emu_lane();
    if (address % 16) abort(); /* ldmatrix rows are 16-byte aligned */
    w.words[lane][0] = address;
    emu_warp_sync();
    for (int i = 0; i < 4; i++) {
        uint16_t lo, hi;
        if (!transposed) {
            const uint32_t row = w.words[i * 8 + lane / 4][0];
            lo = emu_smem_half(row + (lane % 4) * 4), hi = emu_smem_half(row + (lane % 4) * 4 + 2);
        } else {
            lo = emu_smem_half(w.words[i * 8 + (lane % 4) * 2][0] + (lane / 4) * 2);
            hi = emu_smem_half(w.words[i * 8 + (lane % 4) * 2 + 1][0] + (lane / 4) * 2);
        }
        r[i] = (uint32_t)lo | (uint32_t)hi << 16;
    }
    emu_warp_sync();
}
inline void ldsm_x4(uint32_t (&r)[4], uint32_t address) { emu_ldsm(r, address, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t address) { emu_ldsm(r, address, true); }

/* mma.sync m16n8k16 bf16 -> fp32: lane l (g = l / 4, t = l % 4) holds A rows g, g + 8 at columns
 * 2t, 2t + 1 (a0 a1) and 2t + 8, 2t + 9 (a2 a3), B columns g at rows 2t, 2t + 1 (b0) and 2t + 8,
 * 2t + 9 (b1), and D rows g, g + 8 at columns 2t, 2t + 1. */
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu_warp &w = emu_my_warp();
    const int lane = emu_lane();
    for (int i = 0; i < 4; i++) w.words[lane][i] = a[i];
    w.words[lane][4] = b0, w.words[lane][5] = b1;
    emu_warp_sync();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; i++) {
            const int row = g + (i % 2) * 8, col = 2 * t + (i / 2) * 8;
            A[row][col] = emu_bf16_value((uint16_t)(w.words[l][i] & 0xffff));
            A[row][col + 1] = emu_bf16_value((uint16_t)(w.words[l][i] >> 16));
        }
        for (int i = 0; i < 2; i++) {
            const uint32_t bits = w.words[l][4 + i];
            B[2 * t + i * 8][g] = emu_bf16_value((uint16_t)(bits & 0xffff));
            B[2 * t + i * 8 + 1][g] = emu_bf16_value((uint16_t)(bits >> 16));
        }
    }
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; e++) {
        const int row = g + (e / 2) * 8, col = 2 * t + e % 2;
        float sum = d[e];
        for (int kk = 0; kk < 16; kk++) sum = std::fma(A[row][kk], B[kk][col], sum);
        d[e] = sum;
    }
    emu_warp_sync();
}

#endif
