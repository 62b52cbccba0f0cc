// Causal attention backward on CUDA (kernels/ops.h). Two kernels compute the same thing, neither
// holds a score matrix, and neither uses atomics, so dq, dk and dv have the same bits every step:
//  - the plain one (fp32 throughout, any head size, one row per block) is the oracle the fast one
//    is checked against (tests/gpu/test_attention_cuda.c) and the path for other head sizes:
//      1. per (query token i, head h): the softmax's log-sum-exp L_i, delta_i = Σ_j P_ij dP_ij
//         with dP_ij = dout_i · v_j, and dq_i = scale Σ_j P_ij (dP_ij − delta_i) k_j;
//      2. per (key token j, kv head g): dk_j = scale Σ dS_ij q_ih and dv_j = Σ P_ij dout_ih over
//         the queries i ≥ j of its sequence and the query heads h that share g (P from L).
//  - the fast one is FlashAttention-2's backward on tensor cores (bf16 inputs, fp32 accumulation),
//    with q, k, v and dout rounded to bf16 once beforehand (each pass streams them from L2 by
//    cp.async at half the bytes), in three passes so that no two blocks add to the same output:
//      1. the forward kernel again (attention.cu, kStats): per row the log2-domain log-sum-exp and
//         delta = dout · out;
//      2. per (64-key tile, query head h): S and dP of the tile against every later query, P, dS,
//         dv_h += Pᵀ dout and dk_h += dSᵀ q, with the keys in the rows (the products' M);
//      3. per (128-query tile, head h): dq += dS k over the keys up to the causal limit;
//    and, where query heads share a key/value head, one more kernel sums the heads' dk_h and
//    dv_h in head order.
// The CPU reference is kernels/cpu/attention.c; the harness compares the two (tests/ops/).
#include <math.h>

#include "flash.cuh"

namespace {

constexpr unsigned THREADS = 128;

__device__ float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
    for (int d = 0; d < n; d++) sum = __fmaf_rn(a[d], b[d], sum);
    return sum;
}


__device__ float max_floats(float value, float *shared) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) shared[threadIdx.x] = fmaxf(shared[threadIdx.x], shared[threadIdx.x + half]);
        __syncthreads();
    }
    const float total = shared[0];
    __syncthreads();
    return total;
}

/* Shared memory: (3 hd + 2 THREADS) floats and THREADS doubles. */
__global__ void query_pass(float *dq /* (T, H, hd) */, float *lse /* (T, H) */, float *delta /* (T, H) */,
                           const float *dout /* (T, H, hd) */, const float *q /* (T, H, hd) */, const float *k /* (T, KV, hd) */,
                           const float *v /* (T, KV, hd) */, const int32_t *seq_start, int n_seqs, int H, int KV, int hd, float scale,
                           long long begin, long long end) {
    extern __shared__ double shared_doubles[];
    double *reduce = shared_doubles;                            // (THREADS)
    float *q_row = (float *)(shared_doubles + THREADS);         // (hd)
    float *dout_row = q_row + hd;                               // (hd)
    float *acc = dout_row + hd;                                 // (hd)
    float *chunk = acc + hd;                                    // (THREADS) dS of a chunk of keys
    float *reduce_max = chunk + THREADS;                        // (THREADS)
    const int group = H / KV;
    for (long long item = begin + blockIdx.x; item < end; item += gridDim.x) {
        const int t = (int)(item / H), h = (int)(item % H), g = h / group;
        const int first = seq_start[cuda_last_at_or_before(seq_start, n_seqs, t)];
        const float *q_t = q + ((size_t)t * H + h) * hd, *dout_t = dout + ((size_t)t * H + h) * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) q_row[d] = q_t[d], dout_row[d] = dout_t[d], acc[d] = 0.0f;
        __syncthreads();
        // the softmax of scale q·k over keys first..t
        float max_score = -INFINITY;
        for (int j = first + threadIdx.x; j <= t; j += blockDim.x)
            max_score = fmaxf(max_score, scale * dot(q_row, k + ((size_t)j * KV + g) * hd, hd));
        max_score = max_floats(max_score, reduce_max);
        double total = 0;
        for (int j = first + threadIdx.x; j <= t; j += blockDim.x)
            total += expf(scale * dot(q_row, k + ((size_t)j * KV + g) * hd, hd) - max_score);
        total = cuda_block_sum(total, reduce);
        const float log_sum = max_score + (float)log(total);
        double weighted = 0;
        for (int j = first + threadIdx.x; j <= t; j += blockDim.x) {
            const float p = expf(scale * dot(q_row, k + ((size_t)j * KV + g) * hd, hd) - log_sum);
            weighted += (double)p * dot(dout_row, v + ((size_t)j * KV + g) * hd, hd);
        }
        const float row_delta = (float)cuda_block_sum(weighted, reduce);
        // dq = scale Σ_j dS_j k_j, a chunk of keys at a time, each d summed by one thread in key order
        for (int j0 = first; j0 <= t; j0 += blockDim.x) {
            const int j = j0 + threadIdx.x;
            if (j <= t) {
                const float *k_j = k + ((size_t)j * KV + g) * hd;
                const float p = expf(scale * dot(q_row, k_j, hd) - log_sum);
                chunk[threadIdx.x] = p * (dot(dout_row, v + ((size_t)j * KV + g) * hd, hd) - row_delta);
            }
            __syncthreads();
            const int count = t - j0 + 1 < (int)blockDim.x ? t - j0 + 1 : (int)blockDim.x;
            for (int d = threadIdx.x; d < hd; d += blockDim.x)
                for (int e = 0; e < count; e++) acc[d] = __fmaf_rn(chunk[e], k[((size_t)(j0 + e) * KV + g) * hd + d], acc[d]);
            __syncthreads();
        }
        float *dq_t = dq + ((size_t)t * H + h) * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) dq_t[d] = scale * acc[d];
        if (threadIdx.x == 0) lse[(size_t)t * H + h] = log_sum, delta[(size_t)t * H + h] = row_delta;
        __syncthreads();
    }
}

/* Shared memory: (4 hd + 2 THREADS) floats. */
__global__ void key_pass(float *dk /* (T, KV, hd) */, float *dv /* (T, KV, hd) */, const float *lse, const float *delta,
                         const float *dout, const float *q, const float *k, const float *v, const int32_t *seq_start, int n_seqs,
                         int H, int KV, int hd, float scale, long long begin, long long end) {
    extern __shared__ float shared_floats[];
    float *k_row = shared_floats, *v_row = k_row + hd, *dk_acc = v_row + hd, *dv_acc = dk_acc + hd; // (hd) each
    float *probs = dv_acc + hd, *dscores = probs + THREADS;                                       // (THREADS) each
    const int group = H / KV;
    for (long long item = begin + blockIdx.x; item < end; item += gridDim.x) {
        const int j = (int)(item / KV), g = (int)(item % KV);
        const int end = seq_start[cuda_last_at_or_before(seq_start, n_seqs, j) + 1];
        const float *k_j = k + ((size_t)j * KV + g) * hd, *v_j = v + ((size_t)j * KV + g) * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) k_row[d] = k_j[d], v_row[d] = v_j[d], dk_acc[d] = 0.0f, dv_acc[d] = 0.0f;
        __syncthreads();
        // the pairs (query i ≥ j, head h of group g), i-major
        const long long pairs = (long long)(end - j) * group;
        for (long long e0 = 0; e0 < pairs; e0 += blockDim.x) {
            const long long e = e0 + threadIdx.x;
            if (e < pairs) {
                const int i = j + (int)(e / group), h = g * group + (int)(e % group);
                const size_t row = (size_t)i * H + h;
                const float p = expf(scale * dot(q + row * hd, k_row, hd) - lse[row]);
                probs[threadIdx.x] = p;
                dscores[threadIdx.x] = p * (dot(dout + row * hd, v_row, hd) - delta[row]);
            }
            __syncthreads();
            const int count = pairs - e0 < (long long)blockDim.x ? (int)(pairs - e0) : (int)blockDim.x;
            for (int d = threadIdx.x; d < hd; d += blockDim.x)
                for (int c = 0; c < count; c++) {
                    const long long pair = e0 + c;
                    const size_t row = (size_t)(j + (int)(pair / group)) * H + (size_t)(g * group + (int)(pair % group));
                    dv_acc[d] = __fmaf_rn(probs[c], dout[row * hd + d], dv_acc[d]);
                    dk_acc[d] = __fmaf_rn(dscores[c], q[row * hd + d], dk_acc[d]);
                }
            __syncthreads();
        }
        float *dk_j = dk + ((size_t)j * KV + g) * hd, *dv_j = dv + ((size_t)j * KV + g) * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) dk_j[d] = scale * dk_acc[d], dv_j[d] = dv_acc[d];
        __syncthreads();
    }
}

// ==== kernels ===================================================================================

constexpr int kBwdThreads = 128; // 4 warps
constexpr int kKeyTile = 64;     // keys per block of pass 2: 16 per warp, the rows of its products
constexpr int kQueryStep = 64;   // query rows of pass 2 in shared memory at a time
constexpr int kSub = 16;         // queries (pass 2) or keys (pass 3) per register step: one k16 step of the second product

template <int D> struct BackwardShape {
    static_assert(D % 32 == 0, "whole 16-wide mma steps");
    static constexpr int kStride = D + 8; // bf16 per shared row, padded as the forward's
    static constexpr int kRowBytes = kStride * 2;
    // pass 2: K, V of the tile; twice (the step computed on and the next, arriving) Q and dout of
    // the query rows (bf16), their lse2 and delta (fp32)
    static constexpr int kStepElems = kQueryStep * kStride;
    static constexpr int kKeySmem = (2 * kKeyTile + 4 * kQueryStep) * kRowBytes + 4 * kQueryStep * 4;
    // pass 3: Q, dout of the tile, K, V of the key rows
    static constexpr int kQuerySmem = (2 * kFlashQueryTile + 2 * kKeyTile) * kRowBytes;
};

// Pass 2. One block per (key tile, query head h), blockIdx.x = tile · H + h: the first tiles of a
// sequence, which see the most queries, start first. Warp w owns keys [16w, 16w + 16) of the
// tile: per lane (g = lane / 4, t = lane % 4) the accumulators hold keys g and g + 8 in their
// rows and queries (or d) 2t, 2t + 1 of each n8 tile in their columns. The products per step of
// kSub queries: Sᵀ = K Qᵀ and dPᵀ = V doutᵀ (16 × kSub), then dv += Pᵀ dout and dk += dSᵀ Q
// (16 × D), Pᵀ and dSᵀ going from accumulators to A fragments in registers.
template <int D>
__global__ void __launch_bounds__(kBwdThreads, 2)
    flash_key_kernel(float *__restrict__ dk_out,             // (T, H, D): dk from query head h alone, times scale
                     float *__restrict__ dv_out,             // (T, H, D)
                     const float *__restrict__ lse2,         // (T, H)
                     const float *__restrict__ delta,        // (T, H)
                     const uint16_t *__restrict__ dout,      // (T, H, D) bf16
                     const uint16_t *__restrict__ q,         // (T, H, D) bf16
                     const uint16_t *__restrict__ k,         // (T, KV, D) bf16
                     const uint16_t *__restrict__ v,         // (T, KV, D) bf16
                     const int32_t *__restrict__ seq_start,  // (n_seqs + 1)
                     const int32_t *__restrict__ tile_start, // (n_seqs + 1), tiles of kKeyTile
                     int n_seqs, int H, int KV, float scale_log2, float scale) {
    using Shape = BackwardShape<D>;
    constexpr int kStride = Shape::kStride, kRowBytes = Shape::kRowBytes;
    uint16_t *sK = reinterpret_cast<uint16_t *>(dynamic_smem()); // (kKeyTile, kStride) bf16
    uint16_t *sV = sK + kKeyTile * kStride;                        // (kKeyTile, kStride)
    uint16_t *sQ = sV + kKeyTile * kStride;                        // (2, kQueryStep, kStride): steps % 2
    uint16_t *sO = sQ + 2 * Shape::kStepElems;                     // (2, kQueryStep, kStride): dout
    float *sLse = reinterpret_cast<float *>(sO + 2 * Shape::kStepElems); // (2, kQueryStep)
    float *sDelta = sLse + 2 * kQueryStep;                                // (2, kQueryStep)

    const int tile = (int)(blockIdx.x / (unsigned)H), h = (int)(blockIdx.x % (unsigned)H);
    const int s = cuda_last_at_or_before(tile_start, n_seqs, tile);
    const int first = seq_start[s], L = seq_start[s + 1] - first;
    const int kv0 = (tile - tile_start[s]) * kKeyTile; // within the sequence
    const size_t q_stride = (size_t)H * D, kv_stride = (size_t)KV * D;
    const int kvh = h / (H / KV);
    const uint16_t *q_seq = q + ((size_t)first * H + h) * D, *dout_seq = dout + ((size_t)first * H + h) * D; // (L, D), stride H*D
    // The rows of step `step` (queries q0 = kv0 + step · kQueryStep on) into buffer step % 2: rows
    // past the end zeros (finite scores; their P is 0 through lse2 = ∞)
    auto load_step = [&](int step) {
        const int q0 = kv0 + step * kQueryStep, buffer = step % 2;
        copy_rows_async<D, kQueryStep, kBwdThreads>(sQ + buffer * Shape::kStepElems, q_seq + (size_t)q0 * q_stride, q_stride, L - q0);
        copy_rows_async<D, kQueryStep, kBwdThreads>(sO + buffer * Shape::kStepElems, dout_seq + (size_t)q0 * q_stride, q_stride, L - q0);
        cp_async_commit();
        for (int r = (int)threadIdx.x; r < kQueryStep; r += kBwdThreads) {
            const bool valid = q0 + r < L;
            sLse[buffer * kQueryStep + r] = valid ? lse2[(size_t)(first + q0 + r) * H + h] : INFINITY;
            sDelta[buffer * kQueryStep + r] = valid ? delta[(size_t)(first + q0 + r) * H + h] : 0.f;
        }
    };
    copy_rows_async<D, kKeyTile, kBwdThreads>(sK, k + ((size_t)(first + kv0) * KV + kvh) * D, kv_stride, L - kv0);
    copy_rows_async<D, kKeyTile, kBwdThreads>(sV, v + ((size_t)(first + kv0) * KV + kvh) * D, kv_stride, L - kv0);
    load_step(0);
    const int tid = (int)threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int key_w0 = kv0 + warp * 16; // the warp's first key; >= L: the warp has none (warp-uniform)

    // ldmatrix row addresses (bytes): K, V as A (the warp's 16 keys × 16 d, row-major); Q, dout
    // as B of the first products (16 queries × 16 d: b0 b1 of two n8 tiles of queries); Q, dout
    // transposed as B of the second (16 queries × 16 d: b0 b1 of two n8 tiles of d).
    const uint32_t a_off = ((warp * 16 + lane % 16) * kStride + (lane / 16) * 8) * 2;
    const uint32_t b_off = (((lane / 16) * 8 + lane % 8) * kStride + (lane / 8 % 2) * 8) * 2;
    const uint32_t bt_off = (((lane / 8 % 2) * 8 + lane % 8) * kStride + (lane / 16) * 8) * 2;
    const uint32_t k_lane = smem_address(sK) + a_off, v_lane = smem_address(sV) + a_off;
    const uint32_t q_lane = smem_address(sQ) + b_off, o_lane = smem_address(sO) + b_off;
    const uint32_t qt_lane = smem_address(sQ) + bt_off, ot_lane = smem_address(sO) + bt_off;

    float dk[D / 8][4], dv[D / 8][4]; // (16, D) of the warp
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[dt][e] = 0.f, dv[dt][e] = 0.f;

    for (int q0 = kv0, step = 0; q0 < L; q0 += kQueryStep, step++) { // the queries at or after the tile's first key
        cp_async_wait<0>(); // this thread's copies of the step (the first time: of K and V too)
        __syncthreads();    // everyone's; and every warp is done with the previous step, whose buffers are the next's
        if (q0 + kQueryStep < L) load_step(step + 1);
        if (key_w0 >= L) continue;
        const int buffer = step % 2;
        const float *step_lse = sLse + buffer * kQueryStep, *step_delta = sDelta + buffer * kQueryStep;
#pragma unroll 1
        for (int sub = 0; sub < kQueryStep / kSub; sub++) {
            const int qs = q0 + sub * kSub;
            if (qs >= L) break;
            if (qs + kSub <= key_w0) continue; // every query of the step precedes the warp's keys
            const uint32_t rows_at = (buffer * kQueryStep + sub * kSub) * kRowBytes;
            float st[2][4], dpt[2][4]; // Sᵀ and dPᵀ: (16 keys, kSub queries)
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) st[nt][e] = 0.f, dpt[nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t a[4], b[4];
                ldsm_x4(a, k_lane + kk * 32);
                ldsm_x4(b, q_lane + rows_at + kk * 32);
                mma_bf16(st[0], a, b[0], b[1]);
                mma_bf16(st[1], a, b[2], b[3]);
                ldsm_x4(a, v_lane + kk * 32);
                ldsm_x4(b, o_lane + rows_at + kk * 32);
                mma_bf16(dpt[0], a, b[0], b[1]);
                mma_bf16(dpt[1], a, b[2], b[3]);
            }
            // Pᵀ = 2^(s · scale_log2 − lse2) where query >= key, else 0; dSᵀ = Pᵀ (dPᵀ − delta)
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = key_w0 + lane / 4 + (e / 2) * 8;
                    const int r = qs - q0 + nt * 8 + (lane % 4) * 2 + e % 2, query = q0 + r;
                    const float p = query >= key ? exp2f(fmaf(st[nt][e], scale_log2, -step_lse[r])) : 0.f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - step_delta[r]);
                }
            const uint32_t pa[4] = {pack_bf16(st[0][0], st[0][1]), pack_bf16(st[0][2], st[0][3]), pack_bf16(st[1][0], st[1][1]),
                                    pack_bf16(st[1][2], st[1][3])};
            const uint32_t sa[4] = {pack_bf16(dpt[0][0], dpt[0][1]), pack_bf16(dpt[0][2], dpt[0][3]),
                                    pack_bf16(dpt[1][0], dpt[1][1]), pack_bf16(dpt[1][2], dpt[1][3])};
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t b[4];
                ldsm_x4_trans(b, ot_lane + rows_at + dp * 32);
                mma_bf16(dv[2 * dp], pa, b[0], b[1]);
                mma_bf16(dv[2 * dp + 1], pa, b[2], b[3]);
                ldsm_x4_trans(b, qt_lane + rows_at + dp * 32);
                mma_bf16(dk[2 * dp], sa, b[0], b[1]);
                mma_bf16(dk[2 * dp + 1], sa, b[2], b[3]);
            }
        }
    }

#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int key = key_w0 + lane / 4 + half * 8;
        if (key >= L) continue;
        const size_t at = ((size_t)(first + key) * H + h) * D + (lane % 4) * 2;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            *reinterpret_cast<float2 *>(dk_out + at + dt * 8) = make_float2(scale * dk[dt][2 * half], scale * dk[dt][2 * half + 1]);
            *reinterpret_cast<float2 *>(dv_out + at + dt * 8) = make_float2(dv[dt][2 * half], dv[dt][2 * half + 1]);
        }
    }
}

// Pass 3. One block per (query tile of kFlashQueryTile rows, head h), the late tiles first as in
// the forward; warp w owns rows [32w, 32w + 32) as two m16 tiles (the forward's layout). Per
// step of kSub keys: S = Q Kᵀ and dP = dout Vᵀ (32 × kSub), then dq += dS K (32 × D).
template <int D>
__global__ void __launch_bounds__(kBwdThreads, 2)
    flash_query_kernel(float *__restrict__ dq,               // (T, H, D)
                       const float *__restrict__ lse2,       // (T, H)
                       const float *__restrict__ delta,      // (T, H)
                       const uint16_t *__restrict__ dout,    // (T, H, D) bf16
                       const uint16_t *__restrict__ q,       // (T, H, D) bf16
                       const uint16_t *__restrict__ k,       // (T, KV, D) bf16
                       const uint16_t *__restrict__ v,       // (T, KV, D) bf16
                       const int32_t *__restrict__ seq_start,  // (n_seqs + 1)
                       const int32_t *__restrict__ tile_start, // (n_seqs + 1), tiles of kFlashQueryTile
                       int n_seqs, int n_tiles, int H, int KV, float scale_log2, float scale) {
    using Shape = BackwardShape<D>;
    constexpr int kStride = Shape::kStride, kRowBytes = Shape::kRowBytes;
    uint16_t *sQ = reinterpret_cast<uint16_t *>(dynamic_smem()); // (kFlashQueryTile, kStride) bf16
    uint16_t *sO = sQ + kFlashQueryTile * kStride;                 // (kFlashQueryTile, kStride): dout
    uint16_t *sK = sO + kFlashQueryTile * kStride;                 // (kKeyTile, kStride)
    uint16_t *sV = sK + kKeyTile * kStride;                        // (kKeyTile, kStride)

    const int tile = n_tiles - 1 - (int)(blockIdx.x / (unsigned)H), h = (int)(blockIdx.x % (unsigned)H);
    const int s = cuda_last_at_or_before(tile_start, n_seqs, tile);
    const int first = seq_start[s], L = seq_start[s + 1] - first;
    const int q0 = (tile - tile_start[s]) * kFlashQueryTile, rows = min(kFlashQueryTile, L - q0);
    const size_t q_stride = (size_t)H * D, kv_stride = (size_t)KV * D;
    const int kvh = h / (H / KV);
    copy_rows_async<D, kFlashQueryTile, kBwdThreads>(sQ, q + ((size_t)(first + q0) * H + h) * D, q_stride, rows);
    copy_rows_async<D, kFlashQueryTile, kBwdThreads>(sO, dout + ((size_t)(first + q0) * H + h) * D, q_stride, rows);
    cp_async_commit();
    const uint16_t *k_seq = k + ((size_t)first * KV + kvh) * D, *v_seq = v + ((size_t)first * KV + kvh) * D; // (L, D), stride KV*D
    const int tid = (int)threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int row0 = q0 + warp * 32, row_end = min(row0 + 32, L); // row_end <= row0: the warp has no rows

    float row_lse[4], row_delta[4]; // per owned row (mt * 2 + half); rows past the end: P = 0
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const int row = row0 + (r / 2) * 16 + lane / 4 + (r % 2) * 8;
        row_lse[r] = row < L ? lse2[(size_t)(first + row) * H + h] : INFINITY;
        row_delta[r] = row < L ? delta[(size_t)(first + row) * H + h] : 0.f;
    }
    // Q, dout as A (rows of the warp × 16 d); K, V as B of the first products (16 keys × 16 d);
    // K transposed as B of dS K (16 keys × 16 d: b0 b1 of two n8 tiles of d)
    const uint32_t a_off = ((warp * 32 + lane % 16) * kStride + (lane / 16) * 8) * 2;
    const uint32_t b_off = (((lane / 16) * 8 + lane % 8) * kStride + (lane / 8 % 2) * 8) * 2;
    const uint32_t bt_off = (((lane / 8 % 2) * 8 + lane % 8) * kStride + (lane / 16) * 8) * 2;
    const uint32_t q_lane = smem_address(sQ) + a_off, o_lane = smem_address(sO) + a_off;
    const uint32_t k_lane = smem_address(sK) + b_off, v_lane = smem_address(sV) + b_off, kt_lane = smem_address(sK) + bt_off;

    float acc[2][D / 8][4]; // dq of the warp's rows: (32, D)
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[mt][dt][e] = 0.f;

    const int n_key_tiles = (q0 + rows + kKeyTile - 1) / kKeyTile;
    for (int kt = 0; kt < n_key_tiles; kt++) {
        const int kv0 = kt * kKeyTile;
        if (kt) __syncthreads(); // every warp is done with the previous keys
        copy_rows_async<D, kKeyTile, kBwdThreads>(sK, k_seq + (size_t)kv0 * kv_stride, kv_stride, L - kv0);
        copy_rows_async<D, kKeyTile, kBwdThreads>(sV, v_seq + (size_t)kv0 * kv_stride, kv_stride, L - kv0);
        cp_async_commit();
        cp_async_wait<0>(); // this thread's copies (the first time: of Q and dout too)
        __syncthreads();    // everyone's
#pragma unroll 1
        for (int sub = 0; sub < kKeyTile / kSub; sub++) {
            const int key0 = kv0 + sub * kSub;
            if (row0 >= row_end || key0 >= row_end) break; // warp-uniform: every key from here on follows every row
            const uint32_t step = sub * kSub * kRowBytes;
            float sc[2][2][4], dp[2][2][4]; // S and dP: (32 rows, kSub keys)
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nt = 0; nt < 2; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) sc[mt][nt][e] = 0.f, dp[mt][nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t a0[4], a1[4], b[4];
                ldsm_x4(b, k_lane + step + kk * 32);
                ldsm_x4(a0, q_lane + kk * 32);
                ldsm_x4(a1, q_lane + 16 * kRowBytes + kk * 32);
                mma_bf16(sc[0][0], a0, b[0], b[1]);
                mma_bf16(sc[0][1], a0, b[2], b[3]);
                mma_bf16(sc[1][0], a1, b[0], b[1]);
                mma_bf16(sc[1][1], a1, b[2], b[3]);
                ldsm_x4(b, v_lane + step + kk * 32);
                ldsm_x4(a0, o_lane + kk * 32);
                ldsm_x4(a1, o_lane + 16 * kRowBytes + kk * 32);
                mma_bf16(dp[0][0], a0, b[0], b[1]);
                mma_bf16(dp[0][1], a0, b[2], b[3]);
                mma_bf16(dp[1][0], a1, b[0], b[1]);
                mma_bf16(dp[1][1], a1, b[2], b[3]);
            }
            // P = 2^(s · scale_log2 − lse2) where key <= row, else 0; dS = P (dP − delta), as A fragments
            uint32_t ds[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
#pragma unroll
                for (int nt = 0; nt < 2; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int r = mt * 2 + e / 2, row = row0 + mt * 16 + lane / 4 + (e / 2) * 8;
                        const int key = key0 + nt * 8 + (lane % 4) * 2 + e % 2;
                        const float p = key <= row ? exp2f(fmaf(sc[mt][nt][e], scale_log2, -row_lse[r])) : 0.f;
                        dp[mt][nt][e] = p * (dp[mt][nt][e] - row_delta[r]);
                    }
                ds[mt][0] = pack_bf16(dp[mt][0][0], dp[mt][0][1]);
                ds[mt][1] = pack_bf16(dp[mt][0][2], dp[mt][0][3]);
                ds[mt][2] = pack_bf16(dp[mt][1][0], dp[mt][1][1]);
                ds[mt][3] = pack_bf16(dp[mt][1][2], dp[mt][1][3]);
            }
#pragma unroll
            for (int dt2 = 0; dt2 < D / 16; dt2++) {
                uint32_t b[4];
                ldsm_x4_trans(b, kt_lane + step + dt2 * 32);
                mma_bf16(acc[0][2 * dt2], ds[0], b[0], b[1]);
                mma_bf16(acc[0][2 * dt2 + 1], ds[0], b[2], b[3]);
                mma_bf16(acc[1][2 * dt2], ds[1], b[0], b[1]);
                mma_bf16(acc[1][2 * dt2 + 1], ds[1], b[2], b[3]);
            }
        }
    }

    if (row0 >= row_end) return; // warp-uniform
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const int mt = r / 2, half = r % 2, row = row0 + mt * 16 + lane / 4 + half * 8;
        if (row >= row_end) continue;
        float *dst = dq + ((size_t)(first + row) * H + h) * D + (lane % 4) * 2;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
            *reinterpret_cast<float2 *>(dst + dt * 8) = make_float2(scale * acc[mt][dt][2 * half], scale * acc[mt][dt][2 * half + 1]);
    }
}

// dk, dv of each key/value head: the sum, in head order, of its query heads' dk_h, dv_h.
__global__ void sum_group_heads(float *__restrict__ dk,             // (T, KV, D)
                                float *__restrict__ dv,             // (T, KV, D)
                                const float *__restrict__ dk_heads, // (T, H, D)
                                const float *__restrict__ dv_heads, // (T, H, D)
                                long long begin, long long end,     // of (token, kv head, d), flat
                                int H, int KV, int D) {
    const int group = H / KV;
    for (long long i = begin + blockIdx.x * (long long)blockDim.x + threadIdx.x; i < end; i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / ((long long)KV * D);
        const int g = (int)(i / D % KV), d = (int)(i % D);
        const size_t from = ((size_t)t * H + (size_t)g * group) * D + d;
        float sum_k = 0.f, sum_v = 0.f;
        for (int j = 0; j < group; j++) sum_k += dk_heads[from + (size_t)j * D], sum_v += dv_heads[from + (size_t)j * D];
        dk[i] = sum_k, dv[i] = sum_v;
    }
}

// ==== host =======================================================================================

template <int D>
int flash_backward(es_device *dev, float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                   const float *v, const int32_t *seq_start, const int32_t *host, int n_seqs, int H, int KV) {
    const char *op = "attention_backward";
    using Shape = BackwardShape<D>;
    const long long query_tiles = count_tiles(host, n_seqs, kFlashQueryTile), key_tiles = count_tiles(host, n_seqs, kKeyTile);
    if (!query_tiles) return ES_OK;
    const int group = H / KV;
    // scratch: lse2 and delta (T, H) each, the two tile tables, with shared KV heads each query
    // head's dk_h and dv_h (T, H, D) each, then q, dout (T, H, D) and k, v (T, KV, D) in bf16;
    // indexed by absolute token, as seq_start is
    const size_t rows = (size_t)host[n_seqs] * H, row_floats = (rows + 63) / 64 * 64, table = ((size_t)n_seqs + 1 + 63) / 64 * 64;
    const size_t head_floats = group > 1 ? rows * D : 0;
    const size_t fp32_bytes = cuda_round_up((2 * row_floats + 2 * table + 2 * head_floats) * 4, 256);
    const size_t q_bytes = cuda_round_up(rows * D * 2, 256), kv_bytes = cuda_round_up((size_t)host[n_seqs] * KV * D * 2, 256);
    char *scratch = (char *)es_device_scratch(dev, fp32_bytes + 2 * q_bytes + 2 * kv_bytes);
    if (!scratch) return ES_ERR_RUNTIME;
    float *lse2 = (float *)scratch, *delta = lse2 + row_floats;
    int32_t *query_table = (int32_t *)(delta + row_floats), *key_table = query_table + table;
    float *dk_heads = group > 1 ? (float *)(key_table + table) : dk, *dv_heads = group > 1 ? dk_heads + head_floats : dv;
    uint16_t *q_bf16 = (uint16_t *)(scratch + fp32_bytes), *dout_bf16 = (uint16_t *)(scratch + fp32_bytes + q_bytes);
    uint16_t *k_bf16 = (uint16_t *)(scratch + fp32_bytes + 2 * q_bytes), *v_bf16 = (uint16_t *)(scratch + fp32_bytes + 2 * q_bytes + kv_bytes);
    const size_t q_first = (size_t)host[0] * H * D, q_n = rows * D - q_first;
    const size_t kv_first = (size_t)host[0] * KV * D, kv_n = (size_t)host[n_seqs] * KV * D - kv_first;
    int rc = cuda_round_to_bf16(dev, op, q_bf16 + q_first, q + q_first, q_n);
    if (!rc) rc = cuda_round_to_bf16(dev, op, dout_bf16 + q_first, dout + q_first, q_n);
    if (!rc) rc = cuda_round_to_bf16(dev, op, k_bf16 + kv_first, k + kv_first, kv_n);
    if (!rc) rc = cuda_round_to_bf16(dev, op, v_bf16 + kv_first, v + kv_first, kv_n);
    if (rc) return rc;
    const cudaStream_t stream = cuda_stream(dev);
    tile_start_kernel<kFlashQueryTile><<<1, 256, 0, stream>>>(query_table, seq_start, n_seqs);
    CUDA_LAUNCHED(dev, op);
    tile_start_kernel<kKeyTile><<<1, 256, 0, stream>>>(key_table, seq_start, n_seqs);
    CUDA_LAUNCHED(dev, op);
    rc = cuda_attention_softmax_stats(dev, lse2, delta, dout, q, k_bf16, v_bf16, seq_start, query_table, n_seqs, query_tiles, H, KV,
                                      0, D);
    if (rc) return rc;

    const float scale = 1.0f / sqrtf((float)D), scale_log2 = (float)(1.4426950408889634 / sqrt((double)D));
    if ((rc = allow_smem(dev, op, flash_key_kernel<D>, Shape::kKeySmem)) || (rc = allow_smem(dev, op, flash_query_kernel<D>, Shape::kQuerySmem)))
        return rc;
    flash_key_kernel<D><<<(unsigned)(key_tiles * H), kBwdThreads, Shape::kKeySmem, stream>>>(
        dk_heads, dv_heads, lse2, delta, dout_bf16, q_bf16, k_bf16, v_bf16, seq_start, key_table, n_seqs, H, KV, scale_log2, scale);
    CUDA_LAUNCHED(dev, op);
    flash_query_kernel<D><<<(unsigned)(query_tiles * H), kBwdThreads, Shape::kQuerySmem, stream>>>(
        dq, lse2, delta, dout_bf16, q_bf16, k_bf16, v_bf16, seq_start, query_table, n_seqs, (int)query_tiles, H, KV, scale_log2, scale);
    CUDA_LAUNCHED(dev, op);
    if (group > 1) {
        const long long begin = (long long)host[0] * KV * D, end = (long long)host[n_seqs] * KV * D;
        sum_group_heads<<<cuda_blocks((size_t)(end - begin), 256), 256, 0, stream>>>(dk, dv, dk_heads, dv_heads, begin, end, H, KV, D);
        CUDA_LAUNCHED(dev, op);
    }
    return ES_OK;
}

} // namespace

size_t cuda_attention_backward_workspace(const es_workspace_plan *plan) {
    if (!plan->train) return 0;
    // lse2 and delta of every (token, head), the tile tables, each query head's dk_h, dv_h, and q,
    // dout (T, H, hd), k, v (T, KV, hd) in bf16
    const size_t rows = (size_t)plan->tokens * (size_t)(plan->heads > 0 ? plan->heads : 1);
    const size_t kv_rows = (size_t)plan->tokens * (size_t)(plan->kv_heads > 0 ? plan->kv_heads : 1);
    const size_t hd = plan->head_dim > 0 ? (size_t)plan->head_dim : 1;
    return (2 * rows + 2 * ((size_t)plan->tokens + 65) + 2 * rows * hd) * sizeof(float) + (2 * rows + 2 * kv_rows) * hd * 2 + 2048;
}

int cuda_attention_backward_plain(es_device *dev, float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                                  const float *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd) {
    const char *op = "attention_backward_plain";
    if (n_seqs == 0) return ES_OK;
    const int32_t *host;
    int rc = cuda_host_seq_start(dev, seq_start, n_seqs, &host);
    if (rc) return rc;
    const int first = host[0], T_end = host[n_seqs];
    if (T_end <= first) return ES_OK;
    const size_t rows = (size_t)T_end * H; // indexed by absolute token, as seq_start is
    float *lse = (float *)es_device_scratch(dev, 2 * rows * sizeof(float) + 256);
    if (!lse) return ES_ERR_RUNTIME;
    float *delta = lse + (rows + 63) / 64 * 64;
    const float scale = 1.0f / sqrtf((float)hd);
    cudaStream_t stream = cuda_stream(dev);
    // tokens before the first sequence (first > 0) belong to none: the passes start at `first`
    const long long query_items = (long long)(T_end - first) * H, key_items = (long long)(T_end - first) * KV;
    const size_t query_smem = THREADS * sizeof(double) + (3 * (size_t)hd + 2 * THREADS) * sizeof(float);
    const size_t key_smem = (4 * (size_t)hd + 2 * THREADS) * sizeof(float);
    if ((rc = allow_smem(dev, op, query_pass, query_smem)) || (rc = allow_smem(dev, op, key_pass, key_smem))) return rc;
    const unsigned query_blocks = (unsigned)(query_items < (1 << 30) ? query_items : (1 << 30));
    const unsigned key_blocks = (unsigned)(key_items < (1 << 30) ? key_items : (1 << 30));
    query_pass<<<query_blocks, THREADS, query_smem, stream>>>(dq, lse, delta, dout, q, k, v, seq_start, n_seqs, H, KV, hd, scale,
                                                              (long long)first * H, (long long)T_end * H);
    CUDA_LAUNCHED(dev, op);
    key_pass<<<key_blocks, THREADS, key_smem, stream>>>(dk, dv, lse, delta, dout, q, k, v, seq_start, n_seqs, H, KV, hd, scale,
                                                        (long long)first * KV, (long long)T_end * KV);
    CUDA_LAUNCHED(dev, op);
    return ES_OK;
}

int cuda_attention_backward(es_device *dev, float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                            const float *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd) {
    // float4 loads and float2 stores need 16-byte rows and bases
    const bool aligned = ((uintptr_t)dq | (uintptr_t)dk | (uintptr_t)dv | (uintptr_t)dout | (uintptr_t)q | (uintptr_t)k |
                          (uintptr_t)v) % 16 == 0;
    if ((hd != 64 && hd != 96 && hd != 128) || !aligned)
        return cuda_attention_backward_plain(dev, dq, dk, dv, dout, q, k, v, seq_start, n_seqs, H, KV, hd);
    if (n_seqs == 0) return ES_OK;
    const int32_t *host;
    int rc = cuda_host_seq_start(dev, seq_start, n_seqs, &host);
    if (rc) return rc;
    if ((long long)(host[n_seqs] / kKeyTile + n_seqs) * H > 0x7fffffffLL) // more blocks than a grid holds
        return cuda_attention_backward_plain(dev, dq, dk, dv, dout, q, k, v, seq_start, n_seqs, H, KV, hd);
    if (hd == 64) return flash_backward<64>(dev, dq, dk, dv, dout, q, k, v, seq_start, host, n_seqs, H, KV);
    if (hd == 96) return flash_backward<96>(dev, dq, dk, dv, dout, q, k, v, seq_start, host, n_seqs, H, KV);
    return flash_backward<128>(dev, dq, dk, dv, dout, q, k, v, seq_start, host, n_seqs, H, KV);
}
