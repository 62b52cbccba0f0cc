// RMSNorm forward on CUDA (kernels/ops.h), the weight in bf16. The arithmetic is the CPU's
// (kernels/cpu/ops.c): the squares summed in double, the scale 1 / sqrt(sum / C + eps) in double
// rounded to fp32 once, then (x · scale) · weight in fp32. Only the order of the double sum
// differs (a tree here, a running sum there), which the rounding of the scale to fp32 hides but
// for a value within a hair of a tie.
#include "cuda_internal.h"

namespace {

constexpr unsigned THREADS = 256, WARP = 32, ROWS_PER_BLOCK = THREADS / WARP;
/* Rows up to this wide get a warp each (eight rows to a block); wider ones a block each. */
constexpr int WARP_ROW_MAX = 1024;

/* The elements a lane visits, in the order it sums them: with C % 4 == 0, groups of four
 * consecutive elements, the group stepping by `lanes`; otherwise single elements stepping by
 * `lanes`. Both passes visit the same elements with the same lane, so each element is read and
 * then written by one thread only, which is what makes out == in safe. `vec` (in and out
 * 16-byte aligned) changes only how a group is loaded, never the order: a row's bits do not
 * depend on where it lies. */
__device__ __forceinline__ float4 load4(const float *p, bool vec) {
    return vec ? *reinterpret_cast<const float4 *>(p) : make_float4(p[0], p[1], p[2], p[3]);
}

__device__ __forceinline__ void store4(float *p, float4 v, bool vec) {
    if (vec) *reinterpret_cast<float4 *>(p) = v;
    else p[0] = v.x, p[1] = v.y, p[2] = v.z, p[3] = v.w;
}

/* A lane's share of Σ x². x² of a float is exact in double, so a fused multiply-add is the same sum. */
__device__ double lane_squares(const float *x /* (C) */, int C, unsigned lane, unsigned lanes, bool vec) {
    double sum = 0;
    if (C % 4 == 0) {
        for (unsigned g = lane; g < (unsigned)C / 4; g += lanes) {
            const float4 v = load4(x + 4 * g, vec);
            sum += (double)v.x * v.x;
            sum += (double)v.y * v.y;
            sum += (double)v.z * v.z;
            sum += (double)v.w * v.w;
        }
    } else {
        for (unsigned c = lane; c < (unsigned)C; c += lanes) sum += (double)x[c] * x[c];
    }
    return sum;
}

/* As the CPU rounds it: the mean and eps in double, one rounding to fp32. */
__device__ __forceinline__ float row_scale(double sum_sq, int C, float eps) {
    return (float)(1.0 / sqrt(sum_sq / C + (double)eps));
}

/* bf16 widens to fp32 exactly: its bits are fp32's upper half. */
__device__ __forceinline__ float widen(__nv_bfloat16 w) { return __uint_as_float((uint32_t)__bfloat16_as_ushort(w) << 16); }

/* (x · scale) · w, the two products rounded separately as the CPU's are. */
__device__ __forceinline__ float scaled(float x, float scale, __nv_bfloat16 w) { return __fmul_rn(__fmul_rn(x, scale), widen(w)); }

__device__ void lane_write(float *y /* (C) */, const float *x /* (C) */, const __nv_bfloat16 *w /* (C) */, int C, float scale,
                           unsigned lane, unsigned lanes, bool vec) {
    if (C % 4 == 0) {
        for (unsigned g = lane; g < (unsigned)C / 4; g += lanes) {
            const unsigned c = 4 * g;
            const float4 v = load4(x + c, vec);
            store4(y + c, make_float4(scaled(v.x, scale, w[c]), scaled(v.y, scale, w[c + 1]), scaled(v.z, scale, w[c + 2]),
                                      scaled(v.w, scale, w[c + 3])),
                   vec);
        }
    } else {
        for (unsigned c = lane; c < (unsigned)C; c += lanes) y[c] = scaled(x[c], scale, w[c]);
    }
}

/* One warp per row. The butterfly leaves the same sum in every lane (IEEE addition commutes),
 * and its shape is fixed, so the result is deterministic. No block-wide barrier: a warp past
 * the last row may leave at once. */
__global__ void rmsnorm_warp_kernel(float *out /* (T, C) */, const float *in /* (T, C) */, const __nv_bfloat16 *weight /* (C) */,
                                    int T, int C, float eps, bool vec) {
    const unsigned lane = threadIdx.x % WARP;
    const size_t t = (size_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    if (t >= (size_t)T) return;
    const float *x = in + t * C; // (C)
    double sum = lane_squares(x, C, lane, WARP, vec);
    for (unsigned offset = WARP / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    lane_write(out + t * C, x, weight, C, row_scale(sum, C, eps), lane, WARP, vec);
}

/* One block per row, its partial sums added by a fixed tree. */
__global__ void rmsnorm_block_kernel(float *out /* (T, C) */, const float *in /* (T, C) */, const __nv_bfloat16 *weight /* (C) */,
                                     int C, float eps, bool vec) {
    __shared__ double shared[THREADS];
    const size_t t = blockIdx.x;
    const float *x = in + t * C; // (C)
    shared[threadIdx.x] = lane_squares(x, C, threadIdx.x, THREADS, vec);
    __syncthreads();
    for (unsigned s = THREADS / 2; s > 0; s /= 2) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    lane_write(out + t * C, x, weight, C, row_scale(shared[0], C, eps), threadIdx.x, THREADS, vec);
}

} // namespace

int cuda_rmsnorm_forward(es_device *dev, float *out, const float *in, const void *weight, int T, int C, float eps) {
    if (T <= 0 || C <= 0) return 0;
    const __nv_bfloat16 *w = (const __nv_bfloat16 *)weight; // (C), the CUDA backend's weight format
    /* rows start 16-byte aligned when the buffers do and C % 4 == 0 */
    const bool vec = C % 4 == 0 && (((uintptr_t)in | (uintptr_t)out) & 15) == 0;
    if (C <= WARP_ROW_MAX) {
        const unsigned blocks = (unsigned)(((size_t)T + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK);
        rmsnorm_warp_kernel<<<blocks, THREADS, 0, cuda_stream(dev)>>>(out, in, w, T, C, eps, vec);
    } else {
        rmsnorm_block_kernel<<<(unsigned)T, THREADS, 0, cuda_stream(dev)>>>(out, in, w, C, eps, vec);
    }
    CUDA_LAUNCHED(dev, "rmsnorm_forward");
    return 0;
}
