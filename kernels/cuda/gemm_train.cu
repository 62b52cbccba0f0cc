// The products of training on CUDA (cuda_gemm_train, cuda_internal.h): any transposes and an
// accumulating beta, which the forward's cuda_gemm (gemm.cu, always D = A Bᵀ, beta 0) does not take.
//
// Row-major D (M, N) = alpha · op(A) (M, K) · op(B) (K, N) + beta · D. In cuBLASLt's column-major
// view D is Dᵀ (N×M, ld N) = op(B)ᵀ · op(A)ᵀ, so cuBLASLt's A operand is our B and its B our A:
//   B stored (K, N) (trans_b 0) is, column-major, the N×K matrix op(B)ᵀ itself: OP_N, N×K, ld N;
//   B stored (N, K) (trans_b 1) is K×N, whose transpose is op(B)ᵀ:          OP_T, K×N, ld K;
//   A stored (M, K) (trans_a 0) is K×M = op(A)ᵀ:                            OP_N, K×M, ld K;
//   A stored (K, M) (trans_a 1) is M×K, transposed:                         OP_T, M×K, ld M.
// Inputs fp32 (true fp32, no TF32) or bf16, D fp32, accumulation fp32. As in gemm.cu no algorithm
// splits K (a gradient's bits do not depend on a reduction's schedule), and a shape's algorithm is
// chosen once and kept: the same shape gets the same bits every step, which --resume relies on. The
// heuristic is told the pointers' alignment (a tensor in the parameter arena may start on any float).
#include <cublasLt.h>
#include <string.h>

#include <mutex>

#include "cuda_internal.h"

namespace {

constexpr int SLOTS = 128;
constexpr int HEURISTIC_RESULTS = 8;

struct key {
    int ordinal, trans_a, trans_b, m, n, k, input, accumulate;
    unsigned alignment; // of the pointers, capped at 16 bytes: the heuristic is told it
    bool operator==(const key &o) const { return !memcmp(this, &o, sizeof o); }
};

struct kept {
    bool used;
    key shape;
    cublasLtMatmulAlgo_t algo;
};

std::mutex lock;
kept table[SLOTS];
int next_slot;

struct problem {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    problem() = default;
    problem(const problem &) = delete;
    problem &operator=(const problem &) = delete;
    ~problem() {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (d) cublasLtMatrixLayoutDestroy(d);
        if (b) cublasLtMatrixLayoutDestroy(b);
        if (a) cublasLtMatrixLayoutDestroy(a);
        if (desc) cublasLtMatmulDescDestroy(desc);
    }
};

#define LT(call)                                                                                            \
    do {                                                                                                    \
        cublasStatus_t lt_rc_ = (call);                                                                     \
        if (lt_rc_ != CUBLAS_STATUS_SUCCESS) {                                                              \
            *what = #call;                                                                                  \
            return lt_rc_;                                                                                  \
        }                                                                                                   \
    } while (0)

cublasStatus_t describe(problem *p, const key &s, const char **what) {
    const cudaDataType_t data = s.input == CUDA_GEMM_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    LT(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_a = s.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = s.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a));
    LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b));
    const uint64_t M = (uint64_t)s.m, N = (uint64_t)s.n, K = (uint64_t)s.k;
    if (s.trans_b) LT(cublasLtMatrixLayoutCreate(&p->a, data, K, N, (int64_t)K));
    else LT(cublasLtMatrixLayoutCreate(&p->a, data, N, K, (int64_t)N));
    if (s.trans_a) LT(cublasLtMatrixLayoutCreate(&p->b, data, M, K, (int64_t)M));
    else LT(cublasLtMatrixLayoutCreate(&p->b, data, K, M, (int64_t)K));
    LT(cublasLtMatrixLayoutCreate(&p->d, CUDA_R_32F, N, M, (int64_t)N));
    return CUBLAS_STATUS_SUCCESS;
}

bool single_pass(const cublasLtMatmulAlgo_t *algo) {
    int32_t splits = 1;
    uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
    size_t written = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof splits, &written) ||
        cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof scheme, &written))
        return false;
    return splits <= 1 && scheme == CUBLASLT_REDUCTION_SCHEME_NONE;
}

cublasStatus_t choose(cublasLtHandle_t lt, problem *p, const key &s, size_t workspace_bytes, cublasLtMatmulAlgo_t *algo, bool *found,
                      const char **what) {
    *found = false;
    LT(cublasLtMatmulPreferenceCreate(&p->pref));
    // a tensor of the parameter arena starts wherever the one before it ended: tell the heuristic
    const uint32_t align = s.alignment;
    LT(cublasLtMatmulPreferenceSetAttribute(p->pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align, sizeof align));
    LT(cublasLtMatmulPreferenceSetAttribute(p->pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align, sizeof align));
    LT(cublasLtMatmulPreferenceSetAttribute(p->pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align, sizeof align));
    LT(cublasLtMatmulPreferenceSetAttribute(p->pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align, sizeof align));
    const uint64_t workspace = workspace_bytes;
    LT(cublasLtMatmulPreferenceSetAttribute(p->pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof workspace));
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE;
    LT(cublasLtMatmulPreferenceSetAttribute(p->pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof schemes));
    if (s.input == CUDA_GEMM_F32) { // fp32 stays fp32: FMA kernels only
        const uint64_t implementations = ~(uint64_t)CUBLASLT_NUMERICAL_IMPL_FLAGS_TENSOR_OP_MASK;
        LT(cublasLtMatmulPreferenceSetAttribute(p->pref, CUBLASLT_MATMUL_PREF_IMPL_MASK, &implementations, sizeof implementations));
    }
    cublasLtMatmulHeuristicResult_t results[HEURISTIC_RESULTS];
    memset(results, 0, sizeof results);
    int count = 0;
    const cublasStatus_t rc =
        cublasLtMatmulAlgoGetHeuristic(lt, p->desc, p->a, p->b, p->d, p->d, p->pref, HEURISTIC_RESULTS, results, &count);
    if (rc == CUBLAS_STATUS_NOT_SUPPORTED) return CUBLAS_STATUS_SUCCESS;
    if (rc != CUBLAS_STATUS_SUCCESS) {
        *what = "cublasLtMatmulAlgoGetHeuristic";
        return rc;
    }
    for (int i = 0; i < count; i++) {
        if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > workspace_bytes) continue;
        if (!single_pass(&results[i].algo)) continue;
        *algo = results[i].algo;
        *found = true;
        break;
    }
    return CUBLAS_STATUS_SUCCESS;
}

#undef LT

/* The fallback for shapes cuBLASLt has no algorithm for (odd sizes, unaligned rows): one thread
 * per output, the k-sum in order in fp32. Slow, and only for what the library refuses. */
template <typename T> __device__ __forceinline__ float load(const T *p, size_t i);
template <> __device__ __forceinline__ float load<float>(const float *p, size_t i) { return p[i]; }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }

template <typename T>
__global__ void plain_gemm(float *D, const T *A, int trans_a, const T *B, int trans_b, int M, int N, int K, float alpha, float beta) {
    const size_t total = (size_t)M * N;
    for (size_t at = blockIdx.x * (size_t)blockDim.x + threadIdx.x; at < total; at += (size_t)gridDim.x * blockDim.x) {
        const size_t m = at / N, n = at % N;
        float sum = 0.0f;
        for (int k = 0; k < K; k++) {
            const float a = load(A, trans_a ? (size_t)k * M + m : m * K + k), b = load(B, trans_b ? n * K + k : (size_t)k * N + n);
            sum = __fmaf_rn(a, b, sum);
        }
        D[at] = beta == 0.0f ? alpha * sum : __fmaf_rn(alpha, sum, beta * D[at]);
    }
}

unsigned alignment_of(const void *ptr) {
    const uintptr_t address = (uintptr_t)ptr;
    unsigned alignment = 16;
    while (alignment > 1 && (address & (alignment - 1))) alignment >>= 1;
    return alignment;
}

} // namespace

int cuda_gemm_train(es_device *dev, const char *op, float *D, const void *A, int trans_a, const void *B, int trans_b, int M, int N,
                    int K, float alpha, float beta, cuda_gemm_input input) {
    if (M == 0 || N == 0) return 0;
    if (M < 0 || N < 0 || K < 0 || (input != CUDA_GEMM_F32 && input != CUDA_GEMM_BF16))
        return es_device_fail(dev, ES_ERR_RUNTIME, "%s: %s: a training product of shape M=%d N=%d K=%d (input %d)", dev->name, op, M,
                              N, K, (int)input);
    if (K == 0) { // an empty sum: D = beta · D
        if (beta == 1.0f) return 0;
        return beta == 0.0f ? (cudaMemsetAsync(D, 0, (size_t)M * N * sizeof *D, cuda_stream(dev)) == cudaSuccess
                                   ? 0
                                   : cuda_fail(dev, op, "cudaMemsetAsync", cudaGetLastError()))
                            : cuda_scale(dev, D, (size_t)M * N, beta);
    }
    cuda_device *cd = cuda_of(dev);
    unsigned alignment = alignment_of(A);
    if (alignment_of(B) < alignment) alignment = alignment_of(B);
    if (alignment_of(D) < alignment) alignment = alignment_of(D);
    key shape;
    memset(&shape, 0, sizeof shape); // compared with memcmp: no stray padding bytes
    shape = {cd->ordinal, trans_a ? 1 : 0, trans_b ? 1 : 0, M, N, K, (int)input, beta != 0.0f, alignment};
    const char *what = nullptr;
    problem p;
    cublasStatus_t rc = describe(&p, shape, &what);
    if (rc != CUBLAS_STATUS_SUCCESS) return cublas_fail(dev, op, what, rc);
    cublasLtMatmulAlgo_t algo;
    {
        std::lock_guard<std::mutex> hold(lock);
        const kept *found = nullptr;
        for (const kept &k : table)
            if (k.used && k.shape == shape) found = &k;
        if (found) algo = found->algo;
        else {
            bool any = false;
            rc = choose(cd->lt, &p, shape, cd->lt_workspace_bytes, &algo, &any, &what);
            if (rc != CUBLAS_STATUS_SUCCESS) return cublas_fail(dev, op, what, rc);
            if (!any) { // cuBLASLt takes no algorithm for this shape: the plain kernel
                const size_t total = (size_t)M * N;
                if (input == CUDA_GEMM_BF16)
                    plain_gemm<__nv_bfloat16><<<cuda_blocks(total, 256), 256, 0, cuda_stream(dev)>>>(
                        D, (const __nv_bfloat16 *)A, trans_a, (const __nv_bfloat16 *)B, trans_b, M, N, K, alpha, beta);
                else
                    plain_gemm<float><<<cuda_blocks(total, 256), 256, 0, cuda_stream(dev)>>>(D, (const float *)A, trans_a, (const float *)B,
                                                                                           trans_b, M, N, K, alpha, beta);
                CUDA_LAUNCHED(dev, op);
                return 0;
            }
            kept &slot = table[next_slot];
            next_slot = (next_slot + 1) % SLOTS;
            slot.used = true, slot.shape = shape, slot.algo = algo;
        }
    }
    CUBLAS_TRY(dev, op,
               cublasLtMatmul(cd->lt, p.desc, &alpha, B, p.a, A, p.b, &beta, D, p.d, D, p.d, &algo, cd->lt_workspace,
                              cd->lt_workspace_bytes, cuda_stream(dev)));
    return 0;
}
