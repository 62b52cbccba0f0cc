// What the flash-attention kernels share (attention.cu's forward, attention_backward.cu's
// backward): the warp-level tensor-core primitives, the table of each sequence's first tile, and
// the shared-memory opt-in. The primitives are kept apart from the kernels so that a host
// emulation of the kernels (tests/emulate/) can stand in for them.
#ifndef ES_KERNELS_CUDA_FLASH_CUH
#define ES_KERNELS_CUDA_FLASH_CUH
#include <stdint.h>
#include <string.h>

#include "cuda_internal.h"

// Query rows per tile of the forward kernel, and of the backward's passes over query tiles.
constexpr int kFlashQueryTile = 128;

// The backward's first pass (attention.cu): per (token, head) of the tiles in tile_start (tiles
// of kFlashQueryTile rows, `tiles` of them), the softmax's log-sum-exp in the log2 domain of the
// scaled scores and delta = dout · out, each (T, H) fp32. k and v are bf16 (rounded to nearest
// even) from token kv_first on. hd is 64, 96 or 128.
int cuda_attention_softmax_stats(es_device *dev, float *lse2, float *delta, const float *dout, const float *q, const uint16_t *k,
                                 const uint16_t *v, const int32_t *seq_start, const int32_t *tile_start, int n_seqs, long long tiles,
                                 int H, int KV, int kv_first, int hd);

namespace {

// ---- warp-level primitives ---------------------------------------------------------------------

#ifdef ES_CUDA_HOST_EMULATION // tests/emulate/: the same instructions, lane by lane on the host
inline unsigned char *dynamic_smem() { return emu_dynamic_smem(); }
inline uint32_t smem_address(const void *p) { return (uint32_t)((const unsigned char *)p - emu_dynamic_smem()); }
inline uint32_t pack_bf16(float lo, float hi) { return (uint32_t)emu_bf16_round(lo) | (uint32_t)emu_bf16_round(hi) << 16; }
inline void store_bf16x4(uint16_t *p, float4 x) {
    emu_check_aligned(p, 8); // the GPU's store is one 8-byte uint2
    p[0] = emu_bf16_round(x.x), p[1] = emu_bf16_round(x.y), p[2] = emu_bf16_round(x.z), p[3] = emu_bf16_round(x.w);
}
// (each call's line goes along: the emulation checks that a warp's lanes meet at the same one)
inline void ldsm_x4(uint32_t (&r)[4], uint32_t address, int line = __builtin_LINE()) { emu_ldmatrix_x4(r, address, false, line); }
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t address, int line = __builtin_LINE()) { emu_ldmatrix_x4(r, address, true, line); }
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, int line = __builtin_LINE()) {
    emu_mma_bf16(d, a, b0, b1, line);
}
inline void cp_async_16(uint32_t address, const void *global, unsigned src_bytes) { emu_cp_async_16(address, global, src_bytes); }
inline void cp_async_commit() { emu_cp_async_commit(); }
template <int kNewest> inline void cp_async_wait() { emu_cp_async_wait(kNewest); }
#else
__device__ __forceinline__ unsigned char *dynamic_smem() {
    extern __shared__ __align__(16) unsigned char smem[];
    return smem;
}

__device__ __forceinline__ uint32_t smem_address(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

// Two floats as bf16 (round to nearest even) in one register, `lo` in the low half: the order
// in which mma fragments hold consecutive elements.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &pair, sizeof bits);
    return bits;
}

// Four consecutive floats as bf16 at p (8-byte aligned, shared memory).
__device__ __forceinline__ void store_bf16x4(uint16_t *p, float4 x) {
    *reinterpret_cast<uint2 *>(p) = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
}

// Four 8×8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8 and receives in
// r[i] row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// The same, transposed: r[i] holds rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4 of matrix i.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// d += A B for one 16×8×16 tile: A (16, 16) row-major fragment, B (16, 8) column fragment
// (b0: rows 0-7, b1: rows 8-15), d (16, 8) fp32.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes from global memory (16-byte aligned) to shared memory at `address` (16-byte aligned),
// asynchronously: the first src_bytes (0 or 16) copied, the rest zeros (src_bytes 0 reads nothing).
// The copy is the thread's own until cp_async_wait has seen its group land; other threads see it
// only after a barrier that follows that wait.
__device__ __forceinline__ void cp_async_16(uint32_t address, const void *global, unsigned src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" : : "r"(address), "l"(global), "r"(src_bytes) : "memory");
}

// Closes the group of the copies this thread issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" : : : "memory"); }

// Waits until at most kNewest of this thread's committed groups (the newest) are still in flight.
template <int kNewest> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" : : "n"(kNewest) : "memory");
}
#endif

// Rows [0, valid) of a (kRows, D) bf16 matrix in global memory, row stride `stride` elements (rows
// 16-byte aligned), into shared rows of D + 8 at dst, by cp.async (the caller commits and waits);
// rows from `valid` on zeros, without a read. Every thread of the kThreads takes its share.
template <int D, int kRows, int kThreads>
__device__ __forceinline__ void copy_rows_async(uint16_t *dst, const uint16_t *src, size_t stride, int valid) {
    constexpr int kChunks = D / 8; // 16-byte pieces per row
    static_assert(kRows * kChunks % kThreads == 0, "whole rounds of the block");
#pragma unroll
    for (int it = 0; it < kRows * kChunks / kThreads; it++) {
        const int i = (int)threadIdx.x + it * kThreads, r = i / kChunks, c = (i % kChunks) * 8;
        const bool inside = r < valid;
        cp_async_16(smem_address(dst + r * (D + 8) + c), inside ? src + r * stride + c : src, inside ? 16u : 0u);
    }
}

// ---- sequence tables -----------------------------------------------------------------------------

// tile_start[s] = the first tile of sequence s (tiles of kRows rows, counted from each
// sequence's own first token); tile_start[n_seqs] = all of them. One block: a run of sequences
// per thread, then a scan of the runs.
template <int kRows>
__global__ void __launch_bounds__(256) tile_start_kernel(int32_t *__restrict__ tile_start,      // (n_seqs + 1)
                                                         const int32_t *__restrict__ seq_start, // (n_seqs + 1)
                                                         int n_seqs) {
    __shared__ int run_first[256];
    const int per = (n_seqs + 255) / 256;
    const int begin = min(n_seqs, (int)threadIdx.x * per), end = min(n_seqs, begin + per);
    int tiles = 0;
    for (int s = begin; s < end; s++) tiles += (seq_start[s + 1] - seq_start[s] + kRows - 1) / kRows;
    run_first[threadIdx.x] = tiles;
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (int i = 0; i < 256; i++) {
            const int run = run_first[i];
            run_first[i] = total;
            total += run;
        }
        tile_start[n_seqs] = total;
    }
    __syncthreads();
    int next = run_first[threadIdx.x];
    for (int s = begin; s < end; s++) {
        tile_start[s] = next;
        next += (seq_start[s + 1] - seq_start[s] + kRows - 1) / kRows;
    }
}

// The tiles of kRows rows the sequences of a host copy of seq_start make.
inline long long count_tiles(const int32_t *host_seq_start, int n_seqs, int rows) {
    long long tiles = 0;
    for (int s = 0; s < n_seqs; s++) tiles += (host_seq_start[s + 1] - host_seq_start[s] + rows - 1) / rows;
    return tiles;
}

// Lets a kernel use `bytes` of dynamic shared memory (beyond the 48 KiB default), or says why not.
template <typename Kernel> int allow_smem(es_device *dev, const char *op, Kernel kernel, size_t bytes) {
    if (bytes <= 48 * 1024) return ES_OK;
    if (bytes > cuda_of(dev)->prop.sharedMemPerBlockOptin)
        return es_device_fail(dev, ES_ERR_RUNTIME, "cuda: %s: needs %zu bytes of shared memory per block, the device has %zu",
                              op, bytes, (size_t)cuda_of(dev)->prop.sharedMemPerBlockOptin);
    CUDA_TRY(dev, op, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return ES_OK;
}

} // namespace

#endif
