// The backward of the embedding, RMSNorm, matmul and SwiGLU on CUDA (RoPE's is in rope.cu) (kernels/ops.h), each
// beside its CPU reference (kernels/cpu/backward.c, ops.c) and checked against it by the op harness
// (tests/ops/, on a GPU by tests/gpu/run.sh). Every sum runs in a fixed order, so a gradient has the
// same bits every step: no atomics.
#include "cuda_internal.h"

namespace {

constexpr unsigned THREADS = 256;
/* Tokens summed per block of a column sum, as the CPU's TOKEN_BLOCK (kernels/cpu/backward.c). */
constexpr int TOKEN_BLOCK = 64;

__device__ __forceinline__ float widen(__nv_bfloat16 w) { return __uint_as_float((uint32_t)__bfloat16_as_ushort(w) << 16); }

/* dtable[ids[t]] += dout[t] in token order: one thread per column walks the tokens, so a repeated
 * id adds its rows in the same order as the CPU does. */
__global__ void embedding_backward_kernel(float *dtable /* (V, C) */, const int32_t *ids /* (T) */, const float *dout /* (T, C) */,
                                          int T, int C) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x)
        for (int t = 0; t < T; t++) {
            float *at = dtable + (size_t)ids[t] * C + c;
            *at = __fadd_rn(*at, dout[(size_t)t * C + c]);
        }
}

/* One block per row: dx = r w dy − x r³ mean(x w dy), r in double as the CPU's; r rounded to fp32
 * is kept for the weight's gradient. */
__global__ void rmsnorm_backward_rows(float *din /* (T, C) */, float *r_out /* (T) */, const float *dout /* (T, C) */,
                                      const float *in /* (T, C) */, const __nv_bfloat16 *weight /* (C) */, int C, float eps) {
    __shared__ double shared[THREADS];
    const size_t row = blockIdx.x;
    const float *x = in + row * C, *dy = dout + row * C;
    double squares = 0, dot = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        squares += (double)x[c] * x[c];
        dot += (double)x[c] * widen(weight[c]) * dy[c];
    }
    squares = cuda_block_sum(squares, shared);
    dot = cuda_block_sum(dot, shared);
    const double r = 1.0 / sqrt(squares / C + (double)eps), correction = r * r * r * dot / C;
    float *dx = din + row * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) dx[c] = (float)(r * widen(weight[c]) * dy[c] - x[c] * correction);
    if (threadIdx.x == 0) r_out[row] = (float)r;
}

/* dweight[c] += Σ_t dout[t, c] (x[t, c] r[t]): one thread per column, each TOKEN_BLOCK tokens summed
 * in double and added in fp32, in token order (the CPU's order). */
__global__ void rmsnorm_backward_columns(float *dweight /* (C) */, const float *dout, const float *in, const float *r, int T, int C) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x)
        for (int t0 = 0; t0 < T; t0 += TOKEN_BLOCK) {
            const int t1 = t0 + TOKEN_BLOCK < T ? t0 + TOKEN_BLOCK : T;
            double sum = 0;
            for (int t = t0; t < t1; t++) {
                const size_t at = (size_t)t * C + c;
                sum += (double)dout[at] * __fmul_rn(in[at], r[t]);
            }
            dweight[c] = __fadd_rn(dweight[c], (float)sum);
        }
}

/* dbias[o] += Σ_t dout[t, o], in double, tokens in order. */
__global__ void bias_backward_kernel(float *dbias /* (OC) */, const float *dout /* (T, OC) */, int T, int OC) {
    for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < OC; o += gridDim.x * blockDim.x) {
        double sum = 0;
        for (int t = 0; t < T; t++) sum += dout[(size_t)t * OC + o];
        dbias[o] = __fadd_rn(dbias[o], (float)sum);
    }
}

/* dup = dout silu(gate), dgate = dout up σ (1 + gate (1 − σ)), as the CPU rounds them. */
__global__ void swiglu_backward_kernel(float *dgate, float *dup, const float *dout, const float *gate, const float *up, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i], sigmoid = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
        dup[i] = __fmul_rn(dout[i], __fdiv_rn(g, __fadd_rn(1.0f, expf(-g))));
        const float slope = __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, sigmoid)));
        dgate[i] = __fmul_rn(__fmul_rn(__fmul_rn(dout[i], up[i]), sigmoid), slope);
    }
}

unsigned column_blocks(int columns) { return (unsigned)((columns + THREADS - 1) / THREADS); }

} // namespace

int cuda_embedding_backward(es_device *dev, float *dtable, const int32_t *ids, const float *dout, int T, int C) {
    if (T <= 0) return 0;
    embedding_backward_kernel<<<column_blocks(C), THREADS, 0, cuda_stream(dev)>>>(dtable, ids, dout, T, C);
    CUDA_LAUNCHED(dev, "embedding_backward");
    return 0;
}

int cuda_rmsnorm_backward(es_device *dev, float *din, float *dweight, const float *dout, const float *in, const void *weight, int T,
                          int C, float eps) {
    if (T <= 0) return 0;
    float *r = (float *)es_device_scratch(dev, (size_t)T * sizeof *r); // (T)
    if (!r) return ES_ERR_RUNTIME;
    rmsnorm_backward_rows<<<(unsigned)T, THREADS, 0, cuda_stream(dev)>>>(din, r, dout, in, (const __nv_bfloat16 *)weight, C, eps);
    CUDA_LAUNCHED(dev, "rmsnorm_backward");
    if (dweight) {
        rmsnorm_backward_columns<<<column_blocks(C), THREADS, 0, cuda_stream(dev)>>>(dweight, dout, in, r, T, C);
        CUDA_LAUNCHED(dev, "rmsnorm_backward");
    }
    return 0;
}

size_t cuda_backward_workspace(const es_workspace_plan *plan) {
    if (!plan->train) return 0;
    // matmul_backward: dout and the input in bf16; rmsnorm_backward: one scale per token;
    // swiglu_down_backward: dout and the activation in bf16, the activation's gradient in fp32
    const size_t T = (size_t)plan->tokens;
    return T * ((size_t)plan->max_in + (size_t)plan->max_out) * sizeof(__nv_bfloat16) + T * (size_t)plan->max_in * sizeof(float) + 512;
}

int cuda_matmul_backward(es_device *dev, float *din, float *dweight, float *dbias, const float *dout, const float *in,
                         const void *weight, int T, int C, int OC) {
    // din (T, C) = dout (T, OC) @ weight (OC, C);  dweight (OC, C) += doutᵀ @ in;  bf16 inputs, fp32 sums
    if (T <= 0) return 0;
    const size_t n_out = (size_t)T * OC, n_in = (size_t)T * C;
    __nv_bfloat16 *dout_bf16 = (__nv_bfloat16 *)es_device_scratch(dev, (n_out + n_in) * sizeof(__nv_bfloat16) + 256); // (T, OC)
    if (!dout_bf16) return ES_ERR_RUNTIME;
    __nv_bfloat16 *in_bf16 = dout_bf16 + (n_out + 127) / 128 * 128; // (T, C), 256-byte aligned
    cudaStream_t stream = cuda_stream(dev);
    int rc = cuda_round_to_bf16(dev, "matmul_backward", (uint16_t *)dout_bf16, dout, n_out);
    if (!rc) rc = cuda_round_to_bf16(dev, "matmul_backward", (uint16_t *)in_bf16, in, n_in);
    if (!rc && din) rc = cuda_gemm_train(dev, "matmul_backward", din, dout_bf16, 0, weight, 0, T, C, OC, 1.0f, 0.0f, CUDA_GEMM_BF16);
    if (!rc) rc = cuda_gemm_train(dev, "matmul_backward", dweight, dout_bf16, 1, in_bf16, 0, OC, C, T, 1.0f, 1.0f, CUDA_GEMM_BF16);
    if (rc || !dbias) return rc;
    bias_backward_kernel<<<column_blocks(OC), THREADS, 0, stream>>>(dbias, dout, T, OC);
    CUDA_LAUNCHED(dev, "matmul_backward");
    return 0;
}

int cuda_swiglu_down_backward(es_device *dev, float *dgate, float *dup, float *dweight, float *dbias, const float *dout,
                              const float *gate, const float *up, const void *weight, int T, int inner, int C) {
    // scratch: dout (T, C) and the activation made again (T, inner) in bf16, the activation's gradient (T, inner) fp32
    if (T <= 0) return 0;
    const char *op = "swiglu_down_backward";
    const size_t n_out = (size_t)T * C, n_act = (size_t)T * inner;
    const size_t out_bytes = cuda_round_up(n_out * 2, 256), act_bytes = cuda_round_up(n_act * 2, 256);
    char *scratch = (char *)es_device_scratch(dev, out_bytes + act_bytes + n_act * sizeof(float));
    if (!scratch) return ES_ERR_RUNTIME;
    uint16_t *dout_bf16 = (uint16_t *)scratch, *act_bf16 = (uint16_t *)(scratch + out_bytes);
    float *dact = (float *)(scratch + out_bytes + act_bytes);
    int rc = cuda_round_to_bf16(dev, op, dout_bf16, dout, n_out);
    if (!rc) rc = cuda_swiglu_to_bf16(dev, op, act_bf16, gate, up, n_act);
    if (!rc) rc = cuda_gemm_train(dev, op, dact, dout_bf16, 0, weight, 0, T, inner, C, 1.0f, 0.0f, CUDA_GEMM_BF16);
    if (!rc) rc = cuda_gemm_train(dev, op, dweight, dout_bf16, 1, act_bf16, 0, C, inner, T, 1.0f, 1.0f, CUDA_GEMM_BF16);
    if (rc) return rc;
    cudaStream_t stream = cuda_stream(dev);
    if (dbias) {
        bias_backward_kernel<<<column_blocks(C), THREADS, 0, stream>>>(dbias, dout, T, C);
        CUDA_LAUNCHED(dev, op);
    }
    swiglu_backward_kernel<<<cuda_blocks(n_act, THREADS), THREADS, 0, stream>>>(dgate, dup, dact, gate, up, n_act);
    CUDA_LAUNCHED(dev, op);
    return 0;
}

int cuda_matmul_backward_group(es_device *dev, float *din, const es_matmul_part_grad *grad, const es_matmul_part *part, int n,
                               const float *in, int T, int C) {
    // din (T, C) = Σ dout_i @ weight_i, added product by product (beta 1 after the first);
    // dweight_i (OC_i, C) += dout_iᵀ @ in: the input rounded to bf16 once for the group
    if (T <= 0) return 0;
    int widest = 0;
    for (int i = 0; i < n; i++) widest = part[i].OC > widest ? part[i].OC : widest;
    const size_t n_in = (size_t)T * C, in_elems = (n_in + 127) / 128 * 128;
    __nv_bfloat16 *in_bf16 = (__nv_bfloat16 *)es_device_scratch(dev, (in_elems + (size_t)T * widest) * sizeof(__nv_bfloat16) + 256);
    if (!in_bf16) return ES_ERR_RUNTIME;
    __nv_bfloat16 *dout_bf16 = in_bf16 + in_elems; // (T, OC_i), 256-byte aligned
    cudaStream_t stream = cuda_stream(dev);
    const char *op = "matmul_backward_group";
    int rc = cuda_round_to_bf16(dev, op, (uint16_t *)in_bf16, in, n_in);
    for (int i = 0; i < n && !rc; i++) {
        const int OC = part[i].OC;
        const size_t n_out = (size_t)T * OC;
        rc = cuda_round_to_bf16(dev, op, (uint16_t *)dout_bf16, grad[i].dout, n_out);
        if (!rc) rc = cuda_gemm_train(dev, op, din, dout_bf16, 0, part[i].weight, 0, T, C, OC, 1.0f, i ? 1.0f : 0.0f, CUDA_GEMM_BF16);
        if (!rc) rc = cuda_gemm_train(dev, op, grad[i].dweight, dout_bf16, 1, in_bf16, 0, OC, C, T, 1.0f, 1.0f, CUDA_GEMM_BF16);
        if (rc) return rc;
        if (grad[i].dbias) {
            bias_backward_kernel<<<column_blocks(OC), THREADS, 0, stream>>>(grad[i].dbias, grad[i].dout, T, OC);
            CUDA_LAUNCHED(dev, op);
        }
    }
    return rc;
}

int cuda_swiglu_backward(es_device *dev, float *dgate, float *dup, const float *dout, const float *gate, const float *up, size_t n) {
    if (n == 0) return 0;
    swiglu_backward_kernel<<<cuda_blocks(n, THREADS), THREADS, 0, cuda_stream(dev)>>>(dgate, dup, dout, gate, up, n);
    CUDA_LAUNCHED(dev, "swiglu_backward");
    return 0;
}
