// The forward products on CUDA (matmul_forward, its group of one input, with a residual, and the
// MLP's down projection over silu(gate) · up): the fp32 activations rounded to bf16 once, then
// tensor-core products against the bf16 weights with fp32 accumulation and output (gemm.cu).
#include "cuda_internal.h"

size_t cuda_matmul_workspace(const es_workspace_plan *plan) {
    return (size_t)plan->tokens * (size_t)plan->max_in * sizeof(__nv_bfloat16);
}

// in (n) fp32 rounded to bf16 in the scratch (its first n · 2 bytes), or NULL with the device's
// error set.
static const __nv_bfloat16 *rounded_input(es_device *dev, const char *op, const float *in, size_t n) {
    __nv_bfloat16 *in_bf16 = (__nv_bfloat16 *)es_device_scratch(dev, n * sizeof *in_bf16);
    if (!in_bf16 || cuda_round_to_bf16(dev, op, (uint16_t *)in_bf16, in, n)) return nullptr;
    return in_bf16;
}

int cuda_matmul_forward(es_device *dev, float *out, const float *in, const void *weight, const void *bias, int T, int C, int OC) {
    // out (T, OC) fp32, in (T, C) fp32, weight (OC, C) bf16, bias (OC) bf16 or NULL
    if (T == 0) return 0;
    const __nv_bfloat16 *in_bf16 = rounded_input(dev, "matmul_forward", in, (size_t)T * C); // (T, C)
    if (!in_bf16) return ES_ERR_RUNTIME;
    return cuda_gemm(dev, "matmul_forward", out, in_bf16, weight, (const __nv_bfloat16 *)bias, T, OC, C, 1.0f, CUDA_GEMM_BF16);
}

int cuda_matmul_forward_residual(es_device *dev, float *out, const float *residual, const float *in, const void *weight,
                                 const void *bias, int T, int C, int OC) {
    // out (T, OC) = residual (T, OC) + in (T, C) @ weightᵀ + bias: the residual read by the product's epilogue
    if (T == 0) return 0;
    const __nv_bfloat16 *in_bf16 = rounded_input(dev, "matmul_forward_residual", in, (size_t)T * C); // (T, C)
    if (!in_bf16) return ES_ERR_RUNTIME;
    return cuda_gemm_residual(dev, "matmul_forward_residual", out, residual, in_bf16, weight, (const __nv_bfloat16 *)bias, T, OC, C,
                              1.0f, CUDA_GEMM_BF16);
}

int cuda_swiglu_down_forward(es_device *dev, float *out, const float *residual, const float *gate, const float *up, const void *weight,
                             const void *bias, int T, int inner, int C) {
    // out (T, C) = residual + bf16(silu(gate) · up) (T, inner) @ weightᵀ + bias: the activation goes
    // from the two fp32 inputs straight to the product's bf16 input
    if (T == 0) return 0;
    const size_t n = (size_t)T * inner;
    uint16_t *act_bf16 = (uint16_t *)es_device_scratch(dev, n * sizeof *act_bf16); // (T, inner)
    if (!act_bf16) return ES_ERR_RUNTIME;
    const int rc = cuda_swiglu_to_bf16(dev, "swiglu_down_forward", act_bf16, gate, up, n);
    if (rc) return rc;
    return cuda_gemm_residual(dev, "swiglu_down_forward", out, residual, act_bf16, weight, (const __nv_bfloat16 *)bias, T, C, inner,
                              1.0f, CUDA_GEMM_BF16);
}

int cuda_matmul_forward_group(es_device *dev, const es_matmul_part *part, int n, const float *in, int T, int C) {
    // part[i].out (T, OC_i) fp32 = in (T, C) @ weight_iᵀ + bias_i: the input rounded to bf16 once for all
    if (T == 0) return 0;
    const __nv_bfloat16 *in_bf16 = rounded_input(dev, "matmul_forward_group", in, (size_t)T * C); // (T, C)
    if (!in_bf16) return ES_ERR_RUNTIME;
    int rc = 0;
    for (int i = 0; i < n && !rc; i++)
        rc = cuda_gemm(dev, "matmul_forward_group", part[i].out, in_bf16, part[i].weight, (const __nv_bfloat16 *)part[i].bias, T,
                       part[i].OC, C, 1.0f, CUDA_GEMM_BF16);
    return rc;
}
