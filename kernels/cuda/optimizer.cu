// AdamW on CUDA (kernels/ops.h), fused: one pass reads a parameter's gradient and moments, writes
// the fp32 master, both moments and the bf16 working copy the next forward reads. The arithmetic
// is the CPU's (kernels/cpu/optimizer.c) operation for operation in fp32, each rounded on its own
// (the _rn intrinsics keep nvcc from fusing them), so the two give the same bits.
#include <math.h>

#include "cuda_internal.h"

namespace {

constexpr unsigned THREADS = 256;

struct adamw_constants {
    float decay, one_minus_beta1, beta2, one_minus_beta2, step_size, root_correction2, eps;
};

__global__ void adamw_kernel(float *params, uint16_t *working /* bf16 bits, or NULL */, const float *grads, float *m, float *v,
                             size_t n, adamw_constants k) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = grads[i];
        float p = __fmul_rn(params[i], k.decay);
        const float mi = __fadd_rn(m[i], __fmul_rn(__fsub_rn(g, m[i]), k.one_minus_beta1));
        const float vi = __fadd_rn(__fmul_rn(v[i], k.beta2), __fmul_rn(__fmul_rn(k.one_minus_beta2, g), g));
        const float denominator = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), k.root_correction2), k.eps);
        p = __fsub_rn(p, __fmul_rn(k.step_size, __fdiv_rn(mi, denominator)));
        params[i] = p, m[i] = mi, v[i] = vi;
        if (working) working[i] = cuda_f32_to_bf16_bits(p);
    }
}

__global__ void round_weights_kernel(uint16_t *working, const float *master, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        working[i] = cuda_f32_to_bf16_bits(master[i]);
}

} // namespace

int cuda_adamw_update(es_device *dev, float *params, void *working, const float *grads, float *m, float *v, size_t n, int64_t step,
                      double lr, const es_adamw_config *config) {
    if (n == 0) return 0;
    const double bias_correction1 = 1.0 - pow(config->beta1, (double)step);
    const double bias_correction2 = 1.0 - pow(config->beta2, (double)step);
    const adamw_constants k = {(float)(1.0 - lr * config->weight_decay), (float)(1.0 - config->beta1), (float)config->beta2,
                               (float)(1.0 - config->beta2), (float)(lr / bias_correction1), (float)sqrt(bias_correction2),
                               (float)config->eps};
    adamw_kernel<<<cuda_blocks(n, THREADS), THREADS, 0, cuda_stream(dev)>>>(params, (uint16_t *)working, grads, m, v, n, k);
    CUDA_LAUNCHED(dev, "adamw_update");
    return 0;
}

int cuda_round_weights(es_device *dev, void *working, const float *master, size_t n) {
    if (n == 0) return 0;
    round_weights_kernel<<<cuda_blocks(n, THREADS), THREADS, 0, cuda_stream(dev)>>>((uint16_t *)working, master, n);
    CUDA_LAUNCHED(dev, "round_weights");
    return 0;
}
