// Causal attention on the GPU, forward (kernels/ops.h es_attention_forward).
//
// Two kernels compute the same thing:
//  - the plain one (any head size, fp32 throughout) is the oracle the fast one is checked
//    against and the path for head sizes the fast one does not take;
//  - the fast one is flash-attention-2: per (query tile of one sequence, query head) it walks
//    the key tiles up to the causal limit, S = Q Kᵀ and O += P V on tensor cores (bf16 inputs,
//    fp32 accumulation) with an online softmax in fp32, so the T×T scores never exist. K and V
//    are rounded to bf16 once beforehand (a query head's block reads them from L2 at half the
//    bytes, and cp.async brings the next tile while the block computes on this one).
// Both read K and V of the shared key/value head in place through its row stride (GQA without
// copies), and both see the sequence table only through seq_start, so a sequence's result does
// not depend on what else shares the batch.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "flash.cuh"

namespace {

// ==== kernels ===================================================================================

constexpr int kThreads = 128; // 4 warps
constexpr int kBlockQ = kFlashQueryTile; // query rows per block (128): 32 per warp, two m16 tiles,
                                         // so every K/V fragment read from shared memory feeds two products
constexpr int kBlockK = 64;   // keys per step

template <int D> struct FlashShape {
    static_assert(D % 32 == 0, "whole 16-wide mma steps and 128-byte lines per row");
    // bf16 per shared row: the 16-byte pad puts the 8 rows one ldmatrix reads in distinct banks
    static constexpr int kStride = D + 8;
    static constexpr int kSubK = 32; // keys per softmax step: S beside O in registers, no spills
    static constexpr int kQElems = kBlockQ * kStride;
    static constexpr int kKVElems = kBlockK * kStride;
    // Q, then K and V twice: the tile computed on and the next, arriving
    static constexpr int kSmemBytes = (kQElems + 4 * kKVElems) * 2;
};

// One block per (query tile, query head): blockIdx.x = tile' · H + h with tile' counted from
// the last tile, so the costly tiles (late in their sequence) start first and the heads that
// share a K/V head run side by side on the same keys (L2 hits).
//
// Warp w owns rows [32w, 32w + 32) of the tile as two m16 tiles. Per lane, with g = lane / 4 and
// t = lane % 4, the fp32 accumulators of an m16n8 tile hold (row g, columns 2t, 2t+1) in [0], [1]
// and (row g + 8, same columns) in [2], [3]: each lane owns rows g, g+8, 16+g, 24+g of its warp
// (index mt * 2 + half below) and the four lanes of a quad share a row.
//
// kStats (the backward's first pass): no output; instead, per row, the softmax's log-sum-exp in
// the log2 domain of the scaled scores, lse2 = m · scale_log2 + log2 Σ 2^(s · scale_log2 − m ·
// scale_log2), and delta = dout · out (FlashAttention-2's D).
template <int D, bool kStats>
__global__ void __launch_bounds__(kThreads, D > 64 ? 2 : 3)
    flash_forward_kernel(float *__restrict__ out,                // (T, H, D), unused with kStats
                         float *__restrict__ lse2,               // (T, H), kStats only
                         float *__restrict__ delta,              // (T, H), kStats only
                         const float *__restrict__ dout,         // (T, H, D), kStats only
                         const float *__restrict__ q,            // (T, H, D)
                         const uint16_t *__restrict__ k,         // (T - kv_first, KV, D) bf16: tokens from kv_first
                         const uint16_t *__restrict__ v,         // (T - kv_first, KV, D) bf16
                         const int32_t *__restrict__ seq_start,  // (n_seqs + 1)
                         const int32_t *__restrict__ tile_start, // (n_seqs + 1)
                         int n_seqs, int n_tiles, int H, int KV, int kv_first, float scale_log2) {
    using Shape = FlashShape<D>;
    constexpr int kSubK = Shape::kSubK;
    constexpr int kStride = Shape::kStride, kRowBytes = kStride * 2;
    constexpr int kChunks = D / 4; // float4 per row
    uint16_t *sQ = reinterpret_cast<uint16_t *>(dynamic_smem()); // (kBlockQ, kStride) bf16
    uint16_t *sK = sQ + Shape::kQElems;                          // (2, kBlockK, kStride) bf16: tiles kt % 2
    uint16_t *sV = sK + 2 * Shape::kKVElems;                     // (2, kBlockK, kStride) bf16

    const int tile = n_tiles - 1 - (int)(blockIdx.x / (unsigned)H), h = (int)(blockIdx.x % (unsigned)H);
    const int s = cuda_last_at_or_before(tile_start, n_seqs, tile); // the tile's sequence
    const int first = seq_start[s], L = seq_start[s + 1] - first;
    const int q0 = (tile - tile_start[s]) * kBlockQ, rows = min(kBlockQ, L - q0);
    const size_t q_stride = (size_t)H * D, kv_stride = (size_t)KV * D;
    const float *q_tile = q + ((size_t)(first + q0) * H + h) * D;     // (rows, D), row stride H*D
    const uint16_t *k_seq = k + ((size_t)(first - kv_first) * KV + h / (H / KV)) * D; // (L, D), row stride KV*D
    const uint16_t *v_seq = v + ((size_t)(first - kv_first) * KV + h / (H / KV)) * D; // (L, D), row stride KV*D
    const int tid = (int)threadIdx.x, warp = tid / 32, lane = tid % 32;

    // Rows past the sequence's end are zeros: finite scores, never stored.
#pragma unroll 8
    for (int it = 0; it < kBlockQ * kChunks / kThreads; it++) {
        const int i = tid + it * kThreads, r = i / kChunks, c = (i % kChunks) * 4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < rows) x = __ldg(reinterpret_cast<const float4 *>(q_tile + r * q_stride + c));
        store_bf16x4(sQ + r * kStride + c, x);
    }

    const int row0 = q0 + warp * 32;       // the warp's first row, counted within the sequence
    const int row_end = min(row0 + 32, L); // past its last valid row (<= row0: the warp has none)
    const int n_key_tiles = (q0 + rows + kBlockK - 1) / kBlockK;

    // ldmatrix row addresses of this lane (bytes): Q as the A operand (matrices: rows 0-7 / 8-15
    // × columns 0-7 / 8-15, row-major), K as B (keys 0-7 × d 0-7, keys 0-7 × d 8-15, keys 8-15 ×
    // d 0-7, keys 8-15 × d 8-15: b0 b1 of two n8 tiles), V transposed as B (keys 0-7 / 8-15 of
    // d 0-7, then of d 8-15: b0 b1 of two n8 tiles).
    const uint32_t q_lane = smem_address(sQ) + ((warp * 32 + lane % 16) * kStride + (lane / 16) * 8) * 2;
    const uint32_t k_lane = smem_address(sK) + (((lane / 16) * 8 + lane % 8) * kStride + (lane / 8 % 2) * 8) * 2;
    const uint32_t v_lane = smem_address(sV) + (((lane / 8 % 2) * 8 + lane % 8) * kStride + (lane / 16) * 8) * 2;

    float o[2][D / 8][4];     // (32, D) of the warp: two m16 tiles × D/8 n8 tiles of accumulators
    float m_run[4], l_run[4]; // per owned row: running max of the raw scores, sum of exp (this lane's columns)
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[mt][dt][e] = 0.f;
#pragma unroll
    for (int r = 0; r < 4; r++) m_run[r] = -INFINITY, l_run[r] = 0.f;

    // Keys past the sequence's end are zeros: their P is 0, and 0 · V must not meet a NaN.
    copy_rows_async<D, kBlockK, kThreads>(sK, k_seq, kv_stride, L);
    copy_rows_async<D, kBlockK, kThreads>(sV, v_seq, kv_stride, L);
    cp_async_commit();
    for (int kt = 0; kt < n_key_tiles; kt++) {
        const int kv0 = kt * kBlockK;
        cp_async_wait<0>(); // this thread's copies of tile kt
        __syncthreads();    // everyone's; and every warp is done with tile kt - 1, whose buffers are the next's
        if (kt + 1 < n_key_tiles) {
            const int next = (kt + 1) % 2, kv1 = kv0 + kBlockK;
            copy_rows_async<D, kBlockK, kThreads>(sK + next * Shape::kKVElems, k_seq + kv1 * kv_stride, kv_stride, L - kv1);
            copy_rows_async<D, kBlockK, kThreads>(sV + next * Shape::kKVElems, v_seq + kv1 * kv_stride, kv_stride, L - kv1);
            cp_async_commit();
        }
        const uint32_t k_tile = k_lane + (kt % 2) * Shape::kKVElems * 2, v_tile = v_lane + (kt % 2) * Shape::kKVElems * 2;

        // The tile in sub-tiles of kSubK keys, each a full softmax step (a 64-key S would not fit
        // in registers beside O for D = 128, nor let three blocks share an SM for D = 64).
#pragma unroll 1
        for (int sub = 0; sub < kBlockK / kSubK; sub++) {
            const int key0 = kv0 + sub * kSubK;
            // Warp-uniform: no valid rows, or every key from here on lies after all of them.
            // Key 0 precedes every row, so each row's max is finite after the first step.
            if (row0 >= row_end || key0 >= row_end) break;
            const uint32_t k_sub = k_tile + sub * kSubK * kRowBytes, v_sub = v_tile + sub * kSubK * kRowBytes;

            float sc[2][kSubK / 8][4]; // S of the warp: (32, kSubK)
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nt = 0; nt < kSubK / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) sc[mt][nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t a0[4], a1[4];
                ldsm_x4(a0, q_lane + kk * 32);
                ldsm_x4(a1, q_lane + 16 * kRowBytes + kk * 32);
#pragma unroll
                for (int np = 0; np < kSubK / 16; np++) {
                    uint32_t b[4];
                    ldsm_x4(b, k_sub + np * 16 * kRowBytes + kk * 32);
                    mma_bf16(sc[0][2 * np], a0, b[0], b[1]);
                    mma_bf16(sc[0][2 * np + 1], a0, b[2], b[3]);
                    mma_bf16(sc[1][2 * np], a1, b[0], b[1]);
                    mma_bf16(sc[1][2 * np + 1], a1, b[2], b[3]);
                }
            }
            if (key0 + kSubK - 1 > row0) { // the keys reach past the warp's first row: causal mask
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int nt = 0; nt < kSubK / 8; nt++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int row = row0 + mt * 16 + lane / 4 + (e / 2) * 8;
                            const int key = key0 + nt * 8 + (lane % 4) * 2 + e % 2;
                            if (key > row) sc[mt][nt][e] = -INFINITY;
                        }
            }

            // Online softmax in the log2 domain: p = 2^(s·scale_log2 − m·scale_log2).
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    const int r = mt * 2 + half;
                    float mx = -INFINITY;
#pragma unroll
                    for (int nt = 0; nt < kSubK / 8; nt++)
                        mx = fmaxf(mx, fmaxf(sc[mt][nt][2 * half], sc[mt][nt][2 * half + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float m_new = fmaxf(m_run[r], mx);
                    // a row with no key yet would give −inf − −inf; cannot happen (key 0), costs nothing
                    const float base = m_new == -INFINITY ? 0.f : m_new * scale_log2;
                    const float alpha = exp2f(m_run[r] * scale_log2 - base); // 0 on the first step
                    m_run[r] = m_new;
                    float sum = 0.f;
#pragma unroll
                    for (int nt = 0; nt < kSubK / 8; nt++)
#pragma unroll
                        for (int j = 0; j < 2; j++) {
                            const float p = exp2f(fmaf(sc[mt][nt][2 * half + j], scale_log2, -base));
                            sc[mt][nt][2 * half + j] = p;
                            sum += p;
                        }
                    l_run[r] = l_run[r] * alpha + sum;
                    // Deep into a sequence most steps leave every max of the warp as it was
                    // (alpha exactly 1): skip the multiplies then.
                    if (__any_sync(0xffffffffu, alpha != 1.f)) {
#pragma unroll
                        for (int dt = 0; dt < D / 8; dt++) o[mt][dt][2 * half] *= alpha, o[mt][dt][2 * half + 1] *= alpha;
                    }
                }

            // O += P V: the S accumulators of n8 tiles 2kk, 2kk+1, packed to bf16, are exactly the
            // A fragment of keys [16kk, 16kk + 16) (a0a1: row g of tile 2kk, a2a3: row g+8 of it,
            // a4..a7: the same of tile 2kk+1).
#pragma unroll
            for (int kk = 0; kk < kSubK / 16; kk++) {
                uint32_t p0[4], p1[4];
                p0[0] = pack_bf16(sc[0][2 * kk][0], sc[0][2 * kk][1]);
                p0[1] = pack_bf16(sc[0][2 * kk][2], sc[0][2 * kk][3]);
                p0[2] = pack_bf16(sc[0][2 * kk + 1][0], sc[0][2 * kk + 1][1]);
                p0[3] = pack_bf16(sc[0][2 * kk + 1][2], sc[0][2 * kk + 1][3]);
                p1[0] = pack_bf16(sc[1][2 * kk][0], sc[1][2 * kk][1]);
                p1[1] = pack_bf16(sc[1][2 * kk][2], sc[1][2 * kk][3]);
                p1[2] = pack_bf16(sc[1][2 * kk + 1][0], sc[1][2 * kk + 1][1]);
                p1[3] = pack_bf16(sc[1][2 * kk + 1][2], sc[1][2 * kk + 1][3]);
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    uint32_t b[4];
                    ldsm_x4_trans(b, v_sub + kk * 16 * kRowBytes + dp * 32);
                    mma_bf16(o[0][2 * dp], p0, b[0], b[1]);
                    mma_bf16(o[0][2 * dp + 1], p0, b[2], b[3]);
                    mma_bf16(o[1][2 * dp], p1, b[0], b[1]);
                    mma_bf16(o[1][2 * dp + 1], p1, b[2], b[3]);
                }
            }
        }
    }

    if (row0 >= row_end) return; // warp-uniform
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float l = l_run[mt * 2 + half];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inverse = 1.f / l;
            const int row = row0 + mt * 16 + lane / 4 + half * 8;
            const size_t at = (size_t)(first + row) * H + h; // the row's (token, head)
            if (kStats) {
                float part = 0.f; // dout · out over this lane's columns; the quad's lanes share the row
                if (row < row_end) {
                    const float *g = dout + at * D + (lane % 4) * 2;
#pragma unroll
                    for (int dt = 0; dt < D / 8; dt++) {
                        const float2 x = __ldg(reinterpret_cast<const float2 *>(g + dt * 8));
                        part = fmaf(o[mt][dt][2 * half] * inverse, x.x, part);
                        part = fmaf(o[mt][dt][2 * half + 1] * inverse, x.y, part);
                    }
                }
                part += __shfl_xor_sync(0xffffffffu, part, 1);
                part += __shfl_xor_sync(0xffffffffu, part, 2);
                if (row < row_end && lane % 4 == 0) lse2[at] = fmaf(m_run[mt * 2 + half], scale_log2, log2f(l)), delta[at] = part;
                continue;
            }
            if (row >= row_end) continue;
            float *dst = out + at * D + (lane % 4) * 2; // (D) of the row, from this lane's columns
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++)
                *reinterpret_cast<float2 *>(dst + dt * 8) =
                    make_float2(o[mt][dt][2 * half] * inverse, o[mt][dt][2 * half + 1] * inverse);
        }
}

// The oracle: one block per (token, query head), thread i taking keys first + i, first + i + 128,
// ... of the token's causal range, each score one thread's loop over hd (no warp instructions: a
// butterfly per key was the kernel's whole cost, and more so on the host's emulated warps). Pass 1
// finds each thread's max and sum of exp, online, then combines them in thread order; pass 2 takes
// 128 keys at a time, each thread recomputing its key's score (identically) into exp(s − max) in
// shared memory, then each thread adding p · v over the tile, in key order, to the dimensions it
// owns (d, d + 128, ...). Any hd.
constexpr int kPlainThreads = 128;

__device__ __forceinline__ float plain_score(const float *q_row, const float *k_row, int hd, float scale) {
    float dot = 0.f; // q_row (hd) in shared memory, k_row (hd) in global memory
    for (int d = 0; d < hd; d++) dot = fmaf(q_row[d], k_row[d], dot);
    return dot * scale;
}

__global__ void __launch_bounds__(kPlainThreads)
    plain_forward_kernel(float *__restrict__ out,               // (T, H, hd)
                         const float *__restrict__ q,           // (T, H, hd)
                         const float *__restrict__ k,           // (T, KV, hd)
                         const float *__restrict__ v,           // (T, KV, hd)
                         const int32_t *__restrict__ seq_start, // (n_seqs + 1)
                         int n_seqs, int H, int KV, int hd, float scale) {
    float *q_row = reinterpret_cast<float *>(dynamic_smem()); // (hd)
    float *acc = q_row + hd;                                  // (hd): P V, dimension d kept by thread d % 128
    __shared__ float p_tile[kPlainThreads];                   // exp(s − max) of the tile's keys
    __shared__ float thread_max[kPlainThreads];
    __shared__ double thread_sum[kPlainThreads];
    const int tid = (int)threadIdx.x;
    const int t_first = seq_start[0];
    const long long items = (long long)(seq_start[n_seqs] - t_first) * H; // the host saw that it fits in 2^31

    // 64-bit: item + gridDim.x may pass 2^31 on the last round
    for (long long item = blockIdx.x; item < items; item += gridDim.x) {
        const int t = t_first + (int)(item / H), h = (int)(item % H), kvh = h / (H / KV);
        const int first = seq_start[cuda_last_at_or_before(seq_start, n_seqs, t)];
        const float *k_head = k + (size_t)kvh * hd; // row j at k_head + j * KV * hd
        const float *v_head = v + (size_t)kvh * hd;
        const size_t kv_stride = (size_t)KV * hd;
        for (int d = tid; d < hd; d += kPlainThreads) q_row[d] = q[((size_t)t * H + h) * hd + d], acc[d] = 0.f;
        __syncthreads();

        float m = -INFINITY;
        double l = 0.0;
        for (int j = first + tid; j <= t; j += kPlainThreads) {
            const float score = plain_score(q_row, k_head + j * kv_stride, hd, scale);
            if (score > m) {
                l = l * (double)expf(m - score) + 1.0;
                m = score;
            } else {
                l += (double)expf(score - m);
            }
        }
        thread_max[tid] = m, thread_sum[tid] = l;
        __syncthreads();
        const int holders = t - first + 1 < kPlainThreads ? t - first + 1 : kPlainThreads; // the threads with keys
        float row_max = thread_max[0]; // thread 0 always has key `first`: finite
        for (int i = 1; i < holders; i++) row_max = fmaxf(row_max, thread_max[i]);
        double total = 0.0;
        for (int i = 0; i < holders; i++) total += thread_sum[i] * (double)expf(thread_max[i] - row_max);

        for (int tile = first; tile <= t; tile += kPlainThreads) {
            const int j = tile + tid, keys = t - tile + 1 < kPlainThreads ? t - tile + 1 : kPlainThreads;
            if (tid < keys) p_tile[tid] = expf(plain_score(q_row, k_head + j * kv_stride, hd, scale) - row_max);
            __syncthreads();
            for (int d = tid; d < hd; d += kPlainThreads) {
                float sum = acc[d];
                for (int i = 0; i < keys; i++) sum = fmaf(p_tile[i], v_head[(size_t)(tile + i) * kv_stride + d], sum);
                acc[d] = sum;
            }
            __syncthreads(); // p_tile is the next tile's
        }
        const float inverse = 1.f / (float)total;
        for (int d = tid; d < hd; d += kPlainThreads) out[((size_t)t * H + h) * hd + d] = acc[d] * inverse;
        __syncthreads(); // q_row, acc and the thread totals are the next item's
    }
}

// ==== host =======================================================================================

size_t plain_smem_bytes(int hd) { return (size_t)2 * hd * sizeof(float); }

// One launch of flash_forward_kernel over `tiles` query tiles whose table is in tile_start.
template <int D, bool kStats>
int flash_launch(es_device *dev, const char *op, float *out, float *lse2, float *delta, const float *dout, const float *q,
                 const uint16_t *k, const uint16_t *v, const int32_t *seq_start, const int32_t *tile_start, int n_seqs, long long tiles,
                 int H, int KV, int kv_first) {
    constexpr int smem = FlashShape<D>::kSmemBytes;
    int rc = allow_smem(dev, op, flash_forward_kernel<D, kStats>, smem);
    if (rc) return rc;
    // as many blocks share an SM as registers allow (launch bounds): ask for the shared memory to hold them
    CUDA_TRY(dev, op, cudaFuncSetAttribute(flash_forward_kernel<D, kStats>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           (int)cudaSharedmemCarveoutMaxShared));
    const float scale_log2 = (float)(1.4426950408889634 / sqrt((double)D));
    flash_forward_kernel<D, kStats><<<(unsigned)(tiles * H), kThreads, smem, cuda_stream(dev)>>>(
        out, lse2, delta, dout, q, k, v, seq_start, tile_start, n_seqs, (int)tiles, H, KV, kv_first, scale_log2);
    CUDA_LAUNCHED(dev, op);
    return ES_OK;
}

template <int D>
int flash_forward(es_device *dev, float *out, const float *q, const float *k, const float *v, const int32_t *seq_start,
                  const int32_t *host, int n_seqs, int H, int KV) {
    const char *op = "attention_forward";
    const long long tiles = count_tiles(host, n_seqs, kBlockQ);
    if (!tiles) return ES_OK;
    // scratch: the tile table, then K and V in bf16 (the tokens of seq_start only)
    const size_t table_bytes = cuda_round_up(((size_t)n_seqs + 1) * sizeof(int32_t), 256);
    const size_t first = (size_t)host[0] * KV * D, n = ((size_t)host[n_seqs] - host[0]) * KV * D;
    const size_t kv_bytes = cuda_round_up(n * sizeof(uint16_t), 256);
    char *scratch = (char *)es_device_scratch(dev, table_bytes + 2 * kv_bytes);
    if (!scratch) return ES_ERR_RUNTIME;
    int32_t *tile_start = (int32_t *)scratch; // (n_seqs + 1)
    uint16_t *k_bf16 = (uint16_t *)(scratch + table_bytes), *v_bf16 = (uint16_t *)(scratch + table_bytes + kv_bytes);
    tile_start_kernel<kBlockQ><<<1, 256, 0, cuda_stream(dev)>>>(tile_start, seq_start, n_seqs);
    CUDA_LAUNCHED(dev, op);
    int rc = cuda_round_to_bf16(dev, op, k_bf16, k + first, n);
    if (!rc) rc = cuda_round_to_bf16(dev, op, v_bf16, v + first, n);
    if (rc) return rc;
    return flash_launch<D, false>(dev, op, out, NULL, NULL, NULL, q, k_bf16, v_bf16, seq_start, tile_start, n_seqs, tiles, H, KV,
                                  host[0]);
}

} // namespace

int cuda_attention_forward_plain(es_device *dev, float *out, const float *q, const float *k, const float *v,
                                 const int32_t *seq_start, int n_seqs, int H, int KV, int hd) {
    const char *op = "attention_forward_plain";
    if (n_seqs == 0) return ES_OK;
    const int32_t *host;
    int rc = cuda_host_seq_start(dev, seq_start, n_seqs, &host);
    if (rc) return rc;
    const long long items = (long long)(host[n_seqs] - host[0]) * H;
    if (!items) return ES_OK;
    if (items > 0x7fffffffLL)
        return es_device_fail(dev, ES_ERR_RUNTIME, "cuda: %s: %d tokens x %d heads exceed the 2^31 items the kernel counts", op,
                              host[n_seqs] - host[0], H);
    const size_t smem = plain_smem_bytes(hd);
    rc = allow_smem(dev, op, plain_forward_kernel, smem);
    if (rc) return rc;
    const unsigned blocks = (unsigned)(items < (1 << 30) ? items : (1 << 30));
    plain_forward_kernel<<<blocks, kPlainThreads, smem, cuda_stream(dev)>>>(out, q, k, v, seq_start, n_seqs, H, KV, hd,
                                                                             1.0f / sqrtf((float)hd));
    CUDA_LAUNCHED(dev, op);
    return ES_OK;
}

int cuda_attention_forward(es_device *dev, float *out, const float *q, const float *k, const float *v, const int32_t *seq_start,
                           int n_seqs, int H, int KV, int hd) {
    // float4 loads and float2 stores need 16-byte rows and bases
    const bool aligned = ((uintptr_t)out | (uintptr_t)q | (uintptr_t)k | (uintptr_t)v) % 16 == 0;
    if ((hd != 64 && hd != 96 && hd != 128) || !aligned)
        return cuda_attention_forward_plain(dev, out, q, k, v, seq_start, n_seqs, H, KV, hd);
    if (n_seqs == 0) return ES_OK;
    const int32_t *host;
    int rc = cuda_host_seq_start(dev, seq_start, n_seqs, &host);
    if (rc) return rc;
    if ((long long)(host[n_seqs] / kBlockQ + n_seqs) * H > 0x7fffffffLL) // more blocks than a grid holds
        return cuda_attention_forward_plain(dev, out, q, k, v, seq_start, n_seqs, H, KV, hd);
    if (hd == 64) return flash_forward<64>(dev, out, q, k, v, seq_start, host, n_seqs, H, KV);
    if (hd == 96) return flash_forward<96>(dev, out, q, k, v, seq_start, host, n_seqs, H, KV);
    return flash_forward<128>(dev, out, q, k, v, seq_start, host, n_seqs, H, KV);
}

size_t cuda_attention_workspace(const es_workspace_plan *plan) {
    // the fast path's tile table, one entry per sequence and one more, and K and V in bf16; the
    // plain path needs none
    if (plan->tokens <= 0) return 0;
    const size_t kv_bytes = cuda_round_up((size_t)plan->tokens * plan->kv_heads * plan->head_dim * sizeof(uint16_t), 256);
    return cuda_round_up(((size_t)plan->tokens + 1) * sizeof(int32_t), 256) + 2 * kv_bytes;
}

int cuda_attention_softmax_stats(es_device *dev, float *lse2, float *delta, const float *dout, const float *q, const uint16_t *k,
                                 const uint16_t *v, const int32_t *seq_start, const int32_t *tile_start, int n_seqs, long long tiles,
                                 int H, int KV, int kv_first, int hd) {
    const char *op = "attention_backward";
    if (hd == 64) return flash_launch<64, true>(dev, op, NULL, lse2, delta, dout, q, k, v, seq_start, tile_start, n_seqs, tiles, H, KV, kv_first);
    if (hd == 96) return flash_launch<96, true>(dev, op, NULL, lse2, delta, dout, q, k, v, seq_start, tile_start, n_seqs, tiles, H, KV, kv_first);
    if (hd == 128)
        return flash_launch<128, true>(dev, op, NULL, lse2, delta, dout, q, k, v, seq_start, tile_start, n_seqs, tiles, H, KV, kv_first);
    return es_device_fail(dev, ES_ERR_RUNTIME, "cuda: %s: the flash kernels take head sizes 64, 96 and 128, not %d", op, hd);
}
