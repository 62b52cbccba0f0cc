// Matrix products through cuBLASLt (cuda_gemm, kernels/cuda/cuda_internal.h).
//
// Row-major D (M, N) = alpha · A (M, K) · B (N, K)ᵀ is, in cuBLASLt's column-major view, Dᵀ (N×M, ld N)
// = op_T(B stored as K×N, ld K) · op_N(A stored as K×M, ld K): cuBLASLt's A operand is our B with
// TRANSA = T, its B operand is our A with TRANSB = N, m = N, n = M, k = K. That is the "TN" form
// cuBLASLt requires for fp8 inputs, so every input format takes the same path.
//
// Types (scale type always CUDA_R_32F, C = D = CUDA_R_32F; beta = 0 with C = D, or 1 with C a residual):
//   CUDA_GEMM_F32       A, B CUDA_R_32F,     CUBLAS_COMPUTE_32F (true fp32: in cuBLASLt only the compute
//                       type allows TF32 down-conversion, and the emulated fp32 paths have compute types of
//                       their own, CUBLAS_COMPUTE_32F_EMULATED_*)
//   CUDA_GEMM_TF32      A, B CUDA_R_32F,     CUBLAS_COMPUTE_32F_FAST_TF32
//   CUDA_GEMM_BF16      A, B CUDA_R_16BF,    CUBLAS_COMPUTE_32F
//   CUDA_GEMM_FP8_E4M3  A, B CUDA_R_8F_E4M3, CUBLAS_COMPUTE_32F, fast accumulation off (the fp8 table of
//                       cublasLtMatmul allows C = D = CUDA_R_32F for e4m3 × e4m3)
//
// Bias. CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE (cublasLt.h): the bias has D's type, except for fp8 kernels
// with an fp32 output, whose bias is bf16. So only the fp8 products take our bf16 bias in cuBLASLt's
// epilogue (CUBLASLT_EPILOGUE_BIAS); the others (an fp32 D wants an fp32 bias) get it from add_bias
// below, after the product, on the same stream. Should the fp8 epilogue find no algorithm, the fp8 product
// falls back to add_bias as well.
//
// Determinism and row independence (a row's bits must not depend on how many rows share the call):
//  - no split-K: the heuristic may only return algorithms without a reduction scheme
//    (CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK = NONE), and a returned algorithm whose configuration
//    still says SPLITK_NUM > 1 or a reduction scheme is passed over;
//  - the algorithm depends on (N, K, input, bias, pointer alignment) only, never on M: it is chosen once
//    for a representative M (PLAN_M rows), kept in a small table, and reused for every M after
//    cublasLtMatmulAlgoCheck accepts it for that M. Where the check refuses it, a heuristic query for the
//    actual M decides (and is kept too), so for such an M the bits may differ from those of other Ms.
//  - a residual (cuda_gemm_residual: D = alpha · A Bᵀ + residual) is cuBLASLt's C with beta 1, read in
//    the epilogue instead of by an add of its own; its alignment counts with the others', and it has
//    plans of its own (the heuristic sees C's alignment);
//  - the alignment the heuristic is told (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*) is the pointers' own,
//    capped at 16 bytes (what tensor-core kernels ask for), so the usual 16-byte aligned pointers (row
//    offsets into an activation included) all share one algorithm, and a less aligned pointer gets one
//    that can read it (cublasLtMatmul fails on pointers less aligned than its algorithm needs).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <mutex>

#include "cuda_internal.h"

namespace {

// The representative M the algorithm of a shape is chosen for: a typical token batch.
constexpr int PLAN_M = 4096;
// Algorithms kept: shapes times alignments times fallbacks; a full table reuses its oldest slot.
constexpr int PLAN_SLOTS = 128;
// Heuristic results asked for, to have some left after the split-K ones are passed over.
constexpr int HEURISTIC_RESULTS = 8;
// The largest alignment the heuristic is told about (bytes).
constexpr unsigned MAX_ALIGNMENT = 16;

struct gemm_types {
    cudaDataType_t data;          // A and B
    cublasComputeType_t compute;
};

gemm_types types_of(cuda_gemm_input input) {
    switch (input) {
    case CUDA_GEMM_TF32: return {CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32};
    case CUDA_GEMM_BF16: return {CUDA_R_16BF, CUBLAS_COMPUTE_32F};
    case CUDA_GEMM_FP8_E4M3: return {CUDA_R_8F_E4M3, CUBLAS_COMPUTE_32F};
    case CUDA_GEMM_F32: break;
    }
    return {CUDA_R_32F, CUBLAS_COMPUTE_32F};
}

const char *input_name(cuda_gemm_input input) {
    switch (input) {
    case CUDA_GEMM_TF32: return "tf32";
    case CUDA_GEMM_BF16: return "bf16";
    case CUDA_GEMM_FP8_E4M3: return "fp8 e4m3";
    case CUDA_GEMM_F32: break;
    }
    return "fp32";
}

// What an algorithm is chosen by. m == 0: the entry for every M (chosen at PLAN_M); m > 0: the fallback
// for that M alone.
struct plan_key {
    int ordinal;
    size_t lt_workspace_bytes;
    int n, k, input, bias, residual;
    unsigned alignment;
    int m;
};

bool same_key(const plan_key &a, const plan_key &b) {
    return a.ordinal == b.ordinal && a.lt_workspace_bytes == b.lt_workspace_bytes && a.n == b.n && a.k == b.k &&
           a.input == b.input && a.bias == b.bias && a.residual == b.residual && a.alignment == b.alignment && a.m == b.m;
}

struct plan {
    bool used;
    plan_key key;
    bool bias_fused;              // the bias is added in cuBLASLt's epilogue (else by add_bias)
    cublasLtMatmulAlgo_t algo;
};

// One process drives one device, so a static table (guarded: ops may come from more than one thread)
// serves; the ordinal in the key keeps devices apart all the same.
std::mutex plan_lock;
plan plans[PLAN_SLOTS];
int next_slot;

const plan *find_plan(const plan_key &key) {
    for (const plan &p : plans)
        if (p.used && same_key(p.key, key)) return &p;
    return nullptr;
}

const plan *keep_plan(const plan_key &key, bool bias_fused, const cublasLtMatmulAlgo_t &algo) {
    plan &p = plans[next_slot];
    next_slot = (next_slot + 1) % PLAN_SLOTS;
    p.used = true;
    p.key = key;
    p.bias_fused = bias_fused;
    p.algo = algo;
    return &p;
}

// The largest power of two (up to MAX_ALIGNMENT) that divides the address.
unsigned alignment_of(const void *ptr) {
    const uintptr_t address = (uintptr_t)ptr;
    unsigned alignment = MAX_ALIGNMENT;
    while (alignment > 1 && (address & (alignment - 1))) alignment >>= 1;
    return alignment;
}

// Descriptors of one product; destroyed with it.
struct lt_problem {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr; // cuBLASLt's A (our B), B (our A), C = D
    lt_problem() = default;
    lt_problem(const lt_problem &) = delete;
    lt_problem &operator=(const lt_problem &) = delete;
    ~lt_problem() {
        if (d) cublasLtMatrixLayoutDestroy(d);
        if (b) cublasLtMatrixLayoutDestroy(b);
        if (a) cublasLtMatrixLayoutDestroy(a);
        if (desc) cublasLtMatmulDescDestroy(desc);
    }
};

struct lt_preference {
    cublasLtMatmulPreference_t pref = nullptr;
    lt_preference() = default;
    lt_preference(const lt_preference &) = delete;
    lt_preference &operator=(const lt_preference &) = delete;
    ~lt_preference() {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
    }
};

// Returns the failing call's status, naming it in *what.
#define LT_CHECK(call)                                                                                      \
    do {                                                                                                    \
        cublasStatus_t lt_check_rc_ = (call);                                                               \
        if (lt_check_rc_ != CUBLAS_STATUS_SUCCESS) {                                                        \
            *what = #call;                                                                                  \
            return lt_check_rc_;                                                                            \
        }                                                                                                   \
    } while (0)

cublasStatus_t describe(lt_problem *p, cuda_gemm_input input, int M, int N, int K, const __nv_bfloat16 *bias,
                        bool fuse_bias, const char **what) {
    const gemm_types types = types_of(input);
    LT_CHECK(cublasLtMatmulDescCreate(&p->desc, types.compute, CUDA_R_32F));
    const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
    LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof transa));
    LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof transb));
    if (input == CUDA_GEMM_FP8_E4M3) {
        // The default already, said so: fast accumulation skips the periodic promotion to fp32.
        const int8_t fast_accumulation = 0;
        LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast_accumulation,
                                                sizeof fast_accumulation));
    }
    if (fuse_bias) {
        const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
        const int32_t bias_type = CUDA_R_16BF;
        LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue));
        LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
        // The heuristic reads the pointer's value for its alignment.
        LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    // Column-major views of our row-major matrices: B (N, K) is K×N with ld K, A (M, K) is K×M with ld K,
    // D (M, N) is N×M with ld N.
    LT_CHECK(cublasLtMatrixLayoutCreate(&p->a, types.data, (uint64_t)K, (uint64_t)N, (int64_t)K));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p->b, types.data, (uint64_t)K, (uint64_t)M, (int64_t)K));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p->d, CUDA_R_32F, (uint64_t)N, (uint64_t)M, (int64_t)N));
    return CUBLAS_STATUS_SUCCESS;
}

// An algorithm that computes each output's dot product in one pass (no K split, no reduction).
bool single_pass(const cublasLtMatmulAlgo_t *algo) {
    int32_t splits = 1;
    uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
    size_t written = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof splits, &written) !=
        CUBLAS_STATUS_SUCCESS)
        return false;
    if (cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof scheme,
                                             &written) != CUBLAS_STATUS_SUCCESS)
        return false;
    return splits <= 1 && scheme == CUBLASLT_REDUCTION_SCHEME_NONE;
}

// The heuristic's best single-pass algorithm for the problem within the workspace; *found = false when
// there is none (an unsupported combination included).
cublasStatus_t choose_algo(cublasLtHandle_t lt, const lt_problem &p, size_t workspace_bytes, unsigned alignment,
                           cuda_gemm_input input, cublasLtMatmulAlgo_t *algo, bool *found, const char **what) {
    *found = false;
    lt_preference preference;
    LT_CHECK(cublasLtMatmulPreferenceCreate(&preference.pref));
    const uint64_t workspace = workspace_bytes;
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                  sizeof workspace));
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE;
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes,
                                                  sizeof schemes));
    const uint32_t align = alignment;
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align,
                                                  sizeof align));
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align,
                                                  sizeof align));
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align,
                                                  sizeof align));
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align,
                                                  sizeof align));
    if (input == CUDA_GEMM_F32) {
        // fp32 stays fp32: no tensor-core implementation (TF32, or bf16 emulation should an environment
        // variable ask cuBLAS for it); only FMA ones pass.
        const uint64_t implementations = ~(uint64_t)CUBLASLT_NUMERICAL_IMPL_FLAGS_TENSOR_OP_MASK;
        LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.pref, CUBLASLT_MATMUL_PREF_IMPL_MASK, &implementations,
                                                      sizeof implementations));
    }
    cublasLtMatmulHeuristicResult_t results[HEURISTIC_RESULTS];
    memset(results, 0, sizeof results);
    int count = 0;
    const cublasStatus_t rc = cublasLtMatmulAlgoGetHeuristic(lt, p.desc, p.a, p.b, p.d, p.d, preference.pref,
                                                             HEURISTIC_RESULTS, results, &count);
    if (rc == CUBLAS_STATUS_NOT_SUPPORTED) return CUBLAS_STATUS_SUCCESS;
    if (rc != CUBLAS_STATUS_SUCCESS) {
        *what = "cublasLtMatmulAlgoGetHeuristic";
        return rc;
    }
    for (int i = 0; i < count; i++) { // best first
        if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > workspace_bytes) continue;
        if (!single_pass(&results[i].algo)) continue;
        *algo = results[i].algo;
        *found = true;
        break;
    }
    return CUBLAS_STATUS_SUCCESS;
}

// The algorithm of a shape, chosen at PLAN_M rows (fp8 with a bias: in the epilogue if cuBLASLt has one,
// else without). NULL with *what unset: no algorithm at all.
cublasStatus_t shape_plan(const cuda_device *cd, const plan_key &key, cuda_gemm_input input, const __nv_bfloat16 *bias,
                          const plan **out, const char **what) {
    *out = find_plan(key);
    if (*out) return CUBLAS_STATUS_SUCCESS;
    const bool try_fused = bias && input == CUDA_GEMM_FP8_E4M3;
    for (int fused = try_fused ? 1 : 0; fused >= 0; fused--) {
        lt_problem p;
        cublasLtMatmulAlgo_t algo;
        bool found = false;
        cublasStatus_t rc = describe(&p, input, key.m ? key.m : PLAN_M, key.n, key.k, bias, fused != 0, what);
        if (rc == CUBLAS_STATUS_SUCCESS)
            rc = choose_algo(cd->lt, p, cd->lt_workspace_bytes, key.alignment, input, &algo, &found, what);
        if (rc != CUBLAS_STATUS_SUCCESS) {
            if (fused) continue; // whatever refuses the fused bias, the product without it may still run
            return rc;
        }
        if (found) {
            *out = keep_plan(key, fused != 0, algo);
            return CUBLAS_STATUS_SUCCESS;
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

#undef LT_CHECK

// D[r][c] += bias[c]: the bias of the products whose epilogue does not take a bf16 one.
__global__ void add_bias_kernel(float *D /* (M, N) */, const __nv_bfloat16 *bias /* (N) */, size_t total, int N) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        D[i] += __bfloat162float(bias[i % (size_t)N]);
}

} // namespace

int cuda_gemm(es_device *dev, const char *op, float *D, const void *A, const void *B, const __nv_bfloat16 *bias, int M, int N,
              int K, float alpha, cuda_gemm_input input) {
    return cuda_gemm_residual(dev, op, D, nullptr, A, B, bias, M, N, K, alpha, input);
}

int cuda_gemm_residual(es_device *dev, const char *op, float *D, const float *residual, const void *A, const void *B,
                       const __nv_bfloat16 *bias, int M, int N, int K, float alpha, cuda_gemm_input input) {
    if (M == 0) return 0;
    if (M < 0 || N <= 0 || K <= 0)
        return es_device_fail(dev, ES_ERR_RUNTIME, "%s: %s: a product of shape M=%d N=%d K=%d", dev->name, op, M, N, K);
    if (input == CUDA_GEMM_FP8_E4M3 && (K % 16 || N % 16))
        return es_device_fail(dev, ES_ERR_RUNTIME, "%s: %s: an fp8 product needs K and N multiples of 16 (K=%d, N=%d)",
                              dev->name, op, K, N);
    cuda_device *cd = cuda_of(dev);
    unsigned alignment = alignment_of(A);
    if (alignment_of(B) < alignment) alignment = alignment_of(B);
    if (alignment_of(D) < alignment) alignment = alignment_of(D);
    if (bias && alignment_of(bias) < alignment) alignment = alignment_of(bias);
    if (residual && alignment_of(residual) < alignment) alignment = alignment_of(residual);

    std::lock_guard<std::mutex> hold(plan_lock);
    plan_key key = {cd->ordinal, cd->lt_workspace_bytes, N, K, (int)input, bias ? 1 : 0, residual ? 1 : 0, alignment, 0};
    const char *what = nullptr;
    const plan *chosen = nullptr;
    cublasStatus_t rc = shape_plan(cd, key, input, bias, &chosen, &what);
    if (rc != CUBLAS_STATUS_SUCCESS) return cublas_fail(dev, op, what, rc);
    if (!chosen)
        return es_device_fail(dev, ES_ERR_RUNTIME, "%s: %s: cuBLASLt has no algorithm for a %s product (N=%d, K=%d%s)",
                              dev->name, op, input_name(input), N, K, bias ? ", bias" : "");

    lt_problem p;
    rc = describe(&p, input, M, N, K, bias, chosen->bias_fused, &what);
    if (rc != CUBLAS_STATUS_SUCCESS) return cublas_fail(dev, op, what, rc);
    cublasLtMatmulHeuristicResult_t check;
    memset(&check, 0, sizeof check);
    const cublasStatus_t checked = cublasLtMatmulAlgoCheck(cd->lt, p.desc, p.a, p.b, p.d, p.d, &chosen->algo, &check);
    lt_problem fallback;
    const lt_problem *run = &p;
    if (checked != CUBLAS_STATUS_SUCCESS || check.workspaceSize > cd->lt_workspace_bytes) {
        // The shape's algorithm does not take this M: one chosen for this M alone (its bits may differ
        // from those the other Ms get).
        key.m = M;
        rc = shape_plan(cd, key, input, bias, &chosen, &what);
        if (rc != CUBLAS_STATUS_SUCCESS) return cublas_fail(dev, op, what, rc);
        if (!chosen)
            return es_device_fail(dev, ES_ERR_RUNTIME, "%s: %s: cuBLASLt has no algorithm for a %s product (M=%d, N=%d, K=%d%s)",
                                  dev->name, op, input_name(input), M, N, K, bias ? ", bias" : "");
        rc = describe(&fallback, input, M, N, K, bias, chosen->bias_fused, &what);
        if (rc != CUBLAS_STATUS_SUCCESS) return cublas_fail(dev, op, what, rc);
        run = &fallback;
    }
    // cuBLASLt's A is our B and its B our A (see the top); C is the residual with beta 1 (D's layout),
    // or D with beta 0, never read.
    const float beta = residual ? 1.0f : 0.0f;
    const void *C = residual ? (const void *)residual : (const void *)D;
    CUBLAS_TRY(dev, op,
               cublasLtMatmul(cd->lt, run->desc, &alpha, B, run->a, A, run->b, &beta, C, run->d, D, run->d, &chosen->algo,
                              cd->lt_workspace, cd->lt_workspace_bytes, cuda_stream(dev)));
    if (bias && !chosen->bias_fused) {
        const size_t total = (size_t)M * (size_t)N;
        add_bias_kernel<<<cuda_blocks(total, 256), 256, 0, cuda_stream(dev)>>>(D, bias, total, N);
        CUDA_LAUNCHED(dev, op);
    }
    return 0;
}
