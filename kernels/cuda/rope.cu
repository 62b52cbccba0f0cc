// Rotary embedding forward on CUDA (kernels/ops.h), Hugging Face's rotate-half convention: the
// pairs (i, i + hd/2) of each head. The arithmetic is the CPU's (kernels/cpu/ops.c): the angle
// and its cosine and sine in double, each rounded to fp32 once, the rotation in fp32 with every
// product rounded on its own (the _rn intrinsics keep nvcc from fusing them into FMAs, which
// the CPU build never does).
#include "cuda_internal.h"

namespace {

constexpr unsigned THREADS = 256;

/* One thread per (token, pair index): the double angle, slow on GPUs with little FP64, is
 * computed once and applied to every head of the token. Neighbouring threads take neighbouring
 * i, so each head's accesses are contiguous. Each element belongs to one thread: in place is safe. */
__global__ void rope_kernel(float *x /* (T, n_heads, hd) */, const int32_t *positions /* (T) */, const double *inv_freq /* (hd / 2) */,
                            int T, int n_heads, int hd, bool inverse) {
    const unsigned half = (unsigned)hd / 2;
    const size_t pairs = (size_t)T * half, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += stride) {
        const size_t t = p / half;
        const unsigned i = (unsigned)(p % half);
        const double angle = (double)positions[t] * inv_freq[i];
        /* the inverse rotation (the backward) negates the fp32 sine: the CPU's bits */
        const float cos_a = (float)cos(angle), sin_a = inverse ? -(float)sin(angle) : (float)sin(angle);
        float *token = x + t * n_heads * hd; // (n_heads, hd)
        for (int h = 0; h < n_heads; h++) {
            float *head = token + (size_t)h * hd; // (hd)
            const float first = head[i], second = head[i + half];
            head[i] = __fsub_rn(__fmul_rn(first, cos_a), __fmul_rn(second, sin_a));
            head[i + half] = __fadd_rn(__fmul_rn(second, cos_a), __fmul_rn(first, sin_a));
        }
    }
}

} // namespace

int cuda_rope_forward(es_device *dev, float *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    if (T <= 0 || n_heads <= 0 || hd < 2) return 0;
    const size_t pairs = (size_t)T * (size_t)(hd / 2);
    rope_kernel<<<cuda_blocks(pairs, THREADS), THREADS, 0, cuda_stream(dev)>>>(x, positions, inv_freq, T, n_heads, hd, false);
    CUDA_LAUNCHED(dev, "rope_forward");
    return 0;
}

int cuda_rope_backward(es_device *dev, float *dx, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    if (T <= 0 || n_heads <= 0 || hd < 2) return 0;
    const size_t pairs = (size_t)T * (size_t)(hd / 2);
    rope_kernel<<<cuda_blocks(pairs, THREADS), THREADS, 0, cuda_stream(dev)>>>(dx, positions, inv_freq, T, n_heads, hd, true);
    CUDA_LAUNCHED(dev, "rope_backward");
    return 0;
}
