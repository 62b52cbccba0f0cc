// Attention over a key/value cache (kernels/ops.h es_attention_cached_forward), for generation:
// most calls bring one new token per sequence, so the work is one block per (new token, query
// head) reading its slot's keys in place, fp32 throughout, as the plain kernel of attention.cu.
//  1. append: the batch's keys and values into their slots' rows past[s]..;
//  2. attend: pass 1 the row's max and sum of exp over the visible keys (warps online, then
//     combined), pass 2 the same scores again and exp(s − max) · v accumulated per warp.
#include <math.h>

#include "cuda_internal.h"

namespace {

constexpr int kWarps = 4;

__global__ void append_kernel(float *__restrict__ k_cache,         // (slots, max_seq, KV*hd)
                              float *__restrict__ v_cache,         // (slots, max_seq, KV*hd)
                              const float *__restrict__ k,         // (T, KV*hd)
                              const float *__restrict__ v,         // (T, KV*hd)
                              const int32_t *__restrict__ seq_start, const int32_t *__restrict__ past,
                              const int32_t *__restrict__ slot, int n_seqs, int max_seq, int row) {
    const int t = (int)blockIdx.x + seq_start[0];
    const int s = cuda_last_at_or_before(seq_start, n_seqs, t);
    const size_t to = ((size_t)slot[s] * max_seq + past[s] + (t - seq_start[s])) * row;
    for (int i = (int)threadIdx.x; i < row; i += blockDim.x) {
        k_cache[to + i] = k[(size_t)t * row + i];
        v_cache[to + i] = v[(size_t)t * row + i];
    }
}

__device__ __forceinline__ float score_of(const float *q_row, const float *k_row, int hd, int lane, float scale) {
    float dot = 0.f; // q_row (hd) in shared memory, k_row (hd) in global memory
    for (int d = lane; d < hd; d += 32) dot = fmaf(q_row[d], k_row[d], dot);
    for (int m = 16; m > 0; m /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, m); // the same bits in every lane
    return dot * scale;
}

__global__ void __launch_bounds__(kWarps * 32)
    attend_kernel(float *__restrict__ out,                // (T, H, hd)
                  const float *__restrict__ q,            // (T, H, hd)
                  const float *__restrict__ k_cache,      // (slots, max_seq, KV, hd)
                  const float *__restrict__ v_cache,      // (slots, max_seq, KV, hd)
                  const int32_t *__restrict__ seq_start,  // (n_seqs + 1)
                  const int32_t *__restrict__ past,       // (n_seqs)
                  const int32_t *__restrict__ slot,       // (n_seqs)
                  int n_seqs, int max_seq, int H, int KV, int hd, float scale) {
    extern __shared__ float shared[];
    float *q_row = shared;    // (hd)
    float *acc = q_row + hd;  // (kWarps, hd): each warp's P V
    __shared__ float warp_max[kWarps];
    __shared__ double warp_sum[kWarps];
    const int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    const int t = seq_start[0] + (int)(blockIdx.x / H), h = (int)(blockIdx.x % H), kvh = h / (H / KV);
    const int s = cuda_last_at_or_before(seq_start, n_seqs, t);
    const int last = past[s] + (t - seq_start[s]); // the token's position: keys 0..last
    const size_t kv_stride = (size_t)KV * hd;
    const float *k_head = k_cache + (size_t)slot[s] * max_seq * kv_stride + (size_t)kvh * hd; // row j at + j * kv_stride
    const float *v_head = v_cache + (size_t)slot[s] * max_seq * kv_stride + (size_t)kvh * hd;
    for (int d = (int)threadIdx.x; d < hd; d += blockDim.x) q_row[d] = q[((size_t)t * H + h) * hd + d];
    for (int d = lane; d < hd; d += 32) acc[warp * hd + d] = 0.f;
    __syncthreads();

    float m = -INFINITY;
    double l = 0.0;
    for (int j = warp; j <= last; j += kWarps) {
        const float score = score_of(q_row, k_head + j * kv_stride, hd, lane, scale);
        if (score > m) l = l * (double)expf(m - score) + 1.0, m = score;
        else l += (double)expf(score - m);
    }
    if (lane == 0) warp_max[warp] = m, warp_sum[warp] = l;
    __syncthreads();
    float row_max = warp_max[0]; // warp 0 always has key 0: finite
    for (int w = 1; w < kWarps; w++) row_max = fmaxf(row_max, warp_max[w]);
    double total = 0.0;
    for (int w = 0; w < kWarps; w++)
        if (warp_max[w] > -INFINITY) total += warp_sum[w] * (double)expf(warp_max[w] - row_max);

    for (int j = warp; j <= last; j += kWarps) {
        const float p = expf(score_of(q_row, k_head + j * kv_stride, hd, lane, scale) - row_max);
        const float *v_row = v_head + j * kv_stride;
        for (int d = lane; d < hd; d += 32) acc[warp * hd + d] = fmaf(p, v_row[d], acc[warp * hd + d]);
    }
    __syncthreads();
    const float inverse = 1.f / (float)total;
    for (int d = (int)threadIdx.x; d < hd; d += blockDim.x) {
        float sum = 0.f;
        for (int w = 0; w < kWarps; w++) sum += acc[w * hd + d];
        out[((size_t)t * H + h) * hd + d] = sum * inverse;
    }
}

} // namespace

int cuda_attention_cached_forward(es_device *dev, float *out, float *k_cache, float *v_cache, const float *q, const float *k,
                                  const float *v, const int32_t *seq_start, const int32_t *past, const int32_t *slot,
                                  int n_seqs, int max_seq, int H, int KV, int hd) {
    const char *op = "attention_cached_forward";
    if (n_seqs == 0) return ES_OK;
    const int32_t *host;
    int rc = cuda_host_seq_start(dev, seq_start, n_seqs, &host);
    if (rc) return rc;
    const int T = host[n_seqs] - host[0];
    if (!T) return ES_OK;
    if ((long long)T * H > 0x7fffffffLL)
        return es_device_fail(dev, ES_ERR_RUNTIME, "cuda: %s: %d tokens x %d heads exceed the grid", op, T, H);
    const size_t smem = (size_t)(1 + kWarps) * hd * sizeof(float);
    if (smem > 48 * 1024) {
        if (smem > cuda_of(dev)->prop.sharedMemPerBlockOptin)
            return es_device_fail(dev, ES_ERR_RUNTIME, "cuda: %s: head size %d needs %zu bytes of shared memory per block", op, hd,
                                  smem);
        CUDA_TRY(dev, op, cudaFuncSetAttribute(attend_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    }
    const cudaStream_t stream = cuda_stream(dev);
    append_kernel<<<(unsigned)T, 128, 0, stream>>>(k_cache, v_cache, k, v, seq_start, past, slot, n_seqs, max_seq, KV * hd);
    CUDA_LAUNCHED(dev, op);
    attend_kernel<<<(unsigned)((long long)T * H), kWarps * 32, smem, stream>>>(out, q, k_cache, v_cache, seq_start, past, slot,
                                                                             n_seqs, max_seq, H, KV, hd,
                                                                             1.0f / sqrtf((float)hd));
    CUDA_LAUNCHED(dev, op);
    return ES_OK;
}
