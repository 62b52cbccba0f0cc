// The emulated cuBLASLt: the part of it kernels/cuda/gemm*.cu uses.
//
// The product itself in fp32, k in order, from operands decoded to float (tf32: rounded to 10
// mantissa bits first). The heuristic offers no algorithm for fp8 inputs outside cuBLASLt's fp8 rules
// (fp8_shape_supported), else one where every operand is aligned to its element (the alignment the caller says, and each column's); the algorithm remembers the
// alignment it was chosen for (up to 16 bytes) and a product on less aligned pointers fails, as
// on a GPU.
#include "emulation.h"

#include <vector>

struct emu_lt {
    int unused;
};
struct emu_lt_desc {
    cublasComputeType_t compute;
    cublasOperation_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void *bias = nullptr;
    int bias_type = CUDA_R_32F;
};
struct emu_lt_layout {
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
};
struct emu_lt_preference {
    uint32_t alignment[4] = {256, 256, 256, 256};
};

static size_t element_bytes(cudaDataType_t type) { return type == CUDA_R_32F ? 4 : type == CUDA_R_16BF ? 2 : 1; }

cublasStatus_t cublasLtCreate(cublasLtHandle_t *handle) {
    *handle = new emu_lt{0};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *desc, cublasComputeType_t compute, cudaDataType_t scale) {
    if (scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    *desc = new emu_lt_desc;
    (*desc)->compute = compute;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
    delete desc;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const void *value,
                                              size_t bytes) {
    switch (attribute) {
    case CUBLASLT_MATMUL_DESC_TRANSA: memcpy(&desc->transa, value, std::min(bytes, sizeof desc->transa)); break;
    case CUBLASLT_MATMUL_DESC_TRANSB: memcpy(&desc->transb, value, std::min(bytes, sizeof desc->transb)); break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE: memcpy(&desc->epilogue, value, std::min(bytes, sizeof desc->epilogue)); break;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: memcpy(&desc->bias, value, std::min(bytes, sizeof desc->bias)); break;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: memcpy(&desc->bias_type, value, std::min(bytes, sizeof desc->bias_type)); break;
    case CUBLASLT_MATMUL_DESC_FAST_ACCUM: break; // fp8's fast accumulation: the sums here are fp32 anyway
    }
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *layout, cudaDataType_t type, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
    if (ld < (int64_t)rows) return CUBLAS_STATUS_INVALID_VALUE;
    *layout = new emu_lt_layout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
    delete layout;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref) {
    *pref = new emu_lt_preference;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
    delete pref;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attribute,
                                                    const void *value, size_t bytes) {
    uint32_t v = 0;
    memcpy(&v, value, std::min(bytes, sizeof v));
    switch (attribute) {
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: pref->alignment[0] = v; break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: pref->alignment[1] = v; break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: pref->alignment[2] = v; break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: pref->alignment[3] = v; break;
    default: break;
    }
    return CUBLAS_STATUS_SUCCESS;
}

static bool shapes_agree(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                         cublasLtMatrixLayout_t d) {
    const uint64_t m = d->rows, n = d->cols;
    const uint64_t a_rows = desc->transa == CUBLAS_OP_N ? a->rows : a->cols, k = desc->transa == CUBLAS_OP_N ? a->cols : a->rows;
    const uint64_t b_rows = desc->transb == CUBLAS_OP_N ? b->rows : b->cols, b_cols = desc->transb == CUBLAS_OP_N ? b->cols : b->rows;
    return a_rows == m && b_rows == k && b_cols == n && c->rows == m && c->cols == n && a->type == b->type && d->type == CUDA_R_32F;
}

// cublasLtMatmul's rules for fp8 inputs on sm_89 / sm_90 (sm_100 relaxes the first): A transposed
// and B not (the "TN" form), and the dimensions k and m (and so the leading dimensions) multiples of
// 16; n, the tokens here, may be anything.
static bool fp8_shape_supported(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t d) {
    const uint64_t k = desc->transa == CUBLAS_OP_N ? a->cols : a->rows;
    return desc->transa == CUBLAS_OP_T && desc->transb == CUBLAS_OP_N && k % 16 == 0 && d->rows % 16 == 0;
}

static uint32_t algorithm_alignment(cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t d,
                                    const uint32_t *preferred) {
    uint32_t alignment = 16;
    for (int i = 0; i < 4; i++) alignment = std::min(alignment, preferred[i]);
    const cublasLtMatrixLayout_t layouts[3] = {a, b, d};
    for (auto l : layouts) {
        const uint64_t column = (uint64_t)l->ld * element_bytes(l->type);
        while (alignment > 1 && column % alignment) alignment /= 2;
    }
    return alignment;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                              cublasLtMatmulPreference_t pref, int requested, cublasLtMatmulHeuristicResult_t *results,
                                              int *returned) {
    *returned = 0;
    if (!shapes_agree(desc, a, b, c, d)) return CUBLAS_STATUS_INVALID_VALUE;
    if (a->type == CUDA_R_8F_E4M3 && !fp8_shape_supported(desc, a, d)) return CUBLAS_STATUS_NOT_SUPPORTED;
    const uint32_t alignment = algorithm_alignment(a, b, d, pref->alignment);
    if (alignment < element_bytes(a->type) || requested < 1) return CUBLAS_STATUS_NOT_SUPPORTED;
    memset(&results[0], 0, sizeof results[0]);
    results[0].algo.data[0] = alignment;
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulAlgoCheck(cublasLtHandle_t, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                       cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d, const cublasLtMatmulAlgo_t *algo,
                                       cublasLtMatmulHeuristicResult_t *result) {
    if (!shapes_agree(desc, a, b, c, d)) return CUBLAS_STATUS_INVALID_VALUE;
    const uint32_t unlimited[4] = {256, 256, 256, 256};
    if (algorithm_alignment(a, b, d, unlimited) < algo->data[0]) return CUBLAS_STATUS_NOT_SUPPORTED;
    memset(result, 0, sizeof *result);
    result->algo = *algo, result->state = CUBLAS_STATUS_SUCCESS;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulAlgoConfigGetAttribute(const cublasLtMatmulAlgo_t *, cublasLtMatmulAlgoConfigAttributes_t attribute,
                                                    void *value, size_t bytes, size_t *written) {
    const uint32_t v = attribute == CUBLASLT_ALGO_CONFIG_SPLITK_NUM ? 1 : CUBLASLT_REDUCTION_SCHEME_NONE;
    memset(value, 0, bytes);
    memcpy(value, &v, std::min(bytes, sizeof v));
    if (written) *written = std::min(bytes, sizeof v);
    return CUBLAS_STATUS_SUCCESS;
}

static float tf32(float x) { // 10 mantissa bits, to nearest (even)
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;
    u += 0xfffu + ((u >> 13) & 1);
    return __uint_as_float(u & 0xffffe000u);
}

static float element(const void *base, cudaDataType_t type, size_t at, bool round_tf32) {
    switch (type) {
    case CUDA_R_32F: {
        const float x = ((const float *)base)[at];
        return round_tf32 ? tf32(x) : x;
    }
    case CUDA_R_16BF: return __bfloat162float(((const __nv_bfloat16 *)base)[at]);
    case CUDA_R_8F_E4M3: return emu_fp8_e4m3_value(((const unsigned char *)base)[at]);
    }
    return NAN;
}

// D = alpha op(A) op(B) + beta C (+ bias), from the snapshots of the descriptors the call had.
static void product(const emu_lt_desc &desc, float alpha, const void *A, const emu_lt_layout &a, const void *B, const emu_lt_layout &b,
                    float beta, const void *C, const emu_lt_layout &c, void *D, const emu_lt_layout &d) {
    const bool round_tf32 = desc.compute == CUBLAS_COMPUTE_32F_FAST_TF32;
    const uint64_t m = d.rows, n = d.cols, k = desc.transa == CUBLAS_OP_N ? a.cols : a.rows;
    std::vector<float> op_a(m * k), op_b(n * k); // op(A) row i and op(B) column j, each k contiguous
    for (uint64_t i = 0; i < m; i++)
        for (uint64_t kk = 0; kk < k; kk++)
            op_a[i * k + kk] = element(A, a.type, desc.transa == CUBLAS_OP_N ? i + kk * a.ld : kk + i * a.ld, round_tf32);
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t kk = 0; kk < k; kk++)
            op_b[j * k + kk] = element(B, b.type, desc.transb == CUBLAS_OP_N ? kk + j * b.ld : j + kk * b.ld, round_tf32);
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t i = 0; i < m; i++) {
            float sum = 0.0f;
            for (uint64_t kk = 0; kk < k; kk++) sum = fmaf(op_a[i * k + kk], op_b[j * k + kk], sum);
            float out = alpha * sum;
            if (beta != 0.0f) out += beta * ((const float *)C)[i + j * c.ld];
            if (desc.epilogue == CUBLASLT_EPILOGUE_BIAS && desc.bias)
                out += desc.bias_type == CUDA_R_16BF ? __bfloat162float(((const __nv_bfloat16 *)desc.bias)[i])
                                                     : ((const float *)desc.bias)[i];
            ((float *)D)[i + j * d.ld] = out;
        }
}

static bool on_device(const void *base, const emu_lt_layout &l) { // every column, as its leading dimension spaces them
    return !l.rows || !l.cols || emu_device_range(base, ((l.cols - 1) * (uint64_t)l.ld + l.rows) * element_bytes(l.type));
}

// Checked when called, as cuBLASLt checks; alpha and beta (host pointers) read then too; the
// product runs in the stream's turn.
cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void *alpha_ptr, const void *A,
                              cublasLtMatrixLayout_t a, const void *B, cublasLtMatrixLayout_t b, const void *beta_ptr, const void *C,
                              cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t d, const cublasLtMatmulAlgo_t *algo, void *,
                              size_t, cudaStream_t stream) {
    if (!shapes_agree(desc, a, b, c, d)) return CUBLAS_STATUS_INVALID_VALUE;
    if (a->type == CUDA_R_8F_E4M3 && !fp8_shape_supported(desc, a, d)) return CUBLAS_STATUS_NOT_SUPPORTED;
    const uintptr_t need = algo ? algo->data[0] : 16;
    if (need && (((uintptr_t)A | (uintptr_t)B | (uintptr_t)D | (uintptr_t)C) % need)) return CUBLAS_STATUS_INVALID_VALUE;
    const float alpha = *(const float *)alpha_ptr, beta = *(const float *)beta_ptr;
    if (!on_device(A, *a) || !on_device(B, *b) || !on_device(D, *d) || (beta != 0.0f && !on_device(C, *c)))
        return CUBLAS_STATUS_INVALID_VALUE; // (a GPU would fault)
    const emu_lt_desc desc_then = *desc;
    const emu_lt_layout a_then = *a, b_then = *b, c_then = *c, d_then = *d;
    if (emu_dry()) return CUBLAS_STATUS_SUCCESS; // checked, not run
    emu_enqueue(stream, [=] { product(desc_then, alpha, A, a_then, B, b_then, beta, C, c_then, D, d_then); });
    return CUBLAS_STATUS_SUCCESS;
}
