// Causal attention backward on CUDA (kernels/ops.h), the plain version: fp32 throughout, no score
// matrix held, and no atomics, so dq, dk and dv have the same bits every step. Two passes, as
// FlashAttention-2's backward splits the work, but one row per block rather than tiles on tensor
// cores (a fast kernel is to come; this one is the oracle it will be checked against):
//   1. per (query token i, head h): the softmax's log-sum-exp L_i, delta_i = Σ_j P_ij dP_ij with
//      dP_ij = dout_i · v_j, and dq_i = scale Σ_j P_ij (dP_ij − delta_i) k_j;
//   2. per (key token j, kv head g): dk_j = scale Σ dS_ij q_ih and dv_j = Σ P_ij dout_ih over the
//      queries i ≥ j of its sequence and the query heads h that share g (P recomputed from L).
// The CPU reference is kernels/cpu/attention.c; the harness compares the two (tests/ops/).
#include <math.h>

#include "cuda_internal.h"

namespace {

constexpr unsigned THREADS = 128;

/* The sequence holding token t: the largest s with seq_start[s] <= t. */
__device__ int sequence_of(const int32_t *seq_start, int n_seqs, int t) {
    int lo = 0, hi = n_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (seq_start[mid] <= t) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

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
        const int first = seq_start[sequence_of(seq_start, n_seqs, t)];
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
        const int end = seq_start[sequence_of(seq_start, n_seqs, j) + 1];
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

int allow_shared(es_device *dev, const void *kernel, size_t bytes) {
    if (bytes <= 48 * 1024) return 0;
    CUDA_TRY(dev, "attention_backward", cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return 0;
}

} // namespace

size_t cuda_attention_backward_workspace(const es_workspace_plan *plan) {
    // the log-sum-exp and delta of every (token, head)
    return plan->train ? 2 * (size_t)plan->tokens * (size_t)(plan->heads > 0 ? plan->heads : 1) * sizeof(float) + 256 : 0;
}

int cuda_attention_backward(es_device *dev, float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                            const float *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd) {
    if (n_seqs == 0) return 0;
    const int32_t *host;
    int rc = cuda_host_seq_start(dev, seq_start, n_seqs, &host);
    if (rc) return rc;
    const int first = host[0], T_end = host[n_seqs];
    if (T_end <= first) return 0;
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
    if ((rc = allow_shared(dev, (const void *)query_pass, query_smem)) || (rc = allow_shared(dev, (const void *)key_pass, key_smem)))
        return rc;
    const unsigned query_blocks = (unsigned)(query_items < (1 << 30) ? query_items : (1 << 30));
    const unsigned key_blocks = (unsigned)(key_items < (1 << 30) ? key_items : (1 << 30));
    query_pass<<<query_blocks, THREADS, query_smem, stream>>>(dq, lse, delta, dout, q, k, v, seq_start, n_seqs, H, KV, hd, scale,
                                                              (long long)first * H, (long long)T_end * H);
    CUDA_LAUNCHED(dev, "attention_backward");
    key_pass<<<key_blocks, THREADS, key_smem, stream>>>(dk, dv, lse, delta, dout, q, k, v, seq_start, n_seqs, H, KV, hd, scale,
                                                        (long long)first * KV, (long long)T_end * KV);
    CUDA_LAUNCHED(dev, "attention_backward");
    return 0;
}
