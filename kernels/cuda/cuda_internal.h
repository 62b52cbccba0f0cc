/* Internal to kernels/cuda/: the CUDA device's state and what every op file shares.
 *
 * Conventions of the CUDA backend (docs/engine.md "CUDA"):
 *  - activations are fp32 in device memory, as the seam's float pointers say; weights (matmul
 *    weights and biases, RMSNorm weights, a device embedding table) are bf16 (dev->weight_dtype);
 *    products run on tensor cores with bf16 inputs and fp32 accumulation.
 *  - every op is queued on the device's compute stream and returns without waiting, except where
 *    it needs a value on the host (a loss sum, attention's sequence table); kernels never use the
 *    default stream.
 *  - an op's scratch comes from es_device_scratch (the one workspace, stream-ordered);
 *    cuBLASLt's own workspace is the device's lt_workspace.
 *  - a failing CUDA or cuBLAS call is recorded on the device with cuda_fail / cublas_fail,
 *    naming the op, and the op returns ES_ERR_RUNTIME. */
#ifndef ES_KERNELS_CUDA_INTERNAL_H
#define ES_KERNELS_CUDA_INTERNAL_H

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "backend.h"
#include "backend_impl.h"
#include "ops.h"
}

typedef struct cuda_device {
    int ordinal;
    cudaDeviceProp prop;
    cudaStream_t compute;          /* every op */
    cudaStream_t copy;             /* layer loads (es_device_load_begin) */
    cudaStream_t download;         /* copies to the host (es_device_download_begin) */
    cudaEvent_t download_mark;     /* recorded on compute when a snapshot is taken */
    char *snapshots;               /* device copies of what is being downloaded, snapshot_bytes */
    size_t snapshot_bytes, snapshot_used;
    cudaEvent_t compute_mark;      /* recorded on compute before a load may overwrite a slot */
    cublasLtHandle_t lt;
    void *lt_workspace;            /* cuBLASLt's scratch (device), lt_workspace_bytes */
    size_t lt_workspace_bytes;
    void *pinned;                  /* a small pinned host buffer (pinned_bytes) for results an op returns */
    size_t pinned_bytes;
    void *embed_staging;           /* pinned, embed_staging_bytes: bf16 embedding rows on their way (embedding.cu) */
    size_t embed_staging_bytes;
    struct cuda_host_cache *host_cache; /* layer tensors kept in pinned host memory (backend.cu) */
    struct cuda_loader *loader;    /* the load jobs in flight (backend.cu) */
} cuda_device;

static inline cuda_device *cuda_of(es_device *dev) { return (cuda_device *)dev->impl; }
static inline cudaStream_t cuda_stream(es_device *dev) { return cuda_of(dev)->compute; }

/* Record a failure on the device ("cuda: OP: WHAT: <error string>") and return ES_ERR_RUNTIME. */
int cuda_fail(es_device *dev, const char *op, const char *what, cudaError_t code);
int cublas_fail(es_device *dev, const char *op, const char *what, cublasStatus_t status);

#define CUDA_TRY(dev, op, call)                                                                         \
    do {                                                                                                \
        cudaError_t cuda_try_rc_ = (call);                                                              \
        if (cuda_try_rc_ != cudaSuccess) return cuda_fail((dev), (op), #call, cuda_try_rc_);            \
    } while (0)
#define CUBLAS_TRY(dev, op, call)                                                                       \
    do {                                                                                                \
        cublasStatus_t cublas_try_rc_ = (call);                                                         \
        if (cublas_try_rc_ != CUBLAS_STATUS_SUCCESS) return cublas_fail((dev), (op), #call, cublas_try_rc_); \
    } while (0)
/* After a kernel launch: a bad launch configuration shows here. */
#define CUDA_LAUNCHED(dev, op) CUDA_TRY(dev, op, cudaGetLastError())

/* Blocks for a grid-stride loop over n elements. */
static inline unsigned cuda_blocks(size_t n, unsigned threads) {
    size_t blocks = (n + threads - 1) / threads;
    return (unsigned)(blocks < 1 ? 1 : blocks > 1048576 ? 1048576 : blocks);
}

/* n rounded up to a multiple of `to`: the 256-byte pieces one scratch is cut into. */
static inline size_t cuda_round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

/* out = in rounded to bf16 (to nearest even, as PyTorch's .to(torch.bfloat16); NaN stays NaN): the
 * rounding every tensor-core input of an activation gets (elementwise.cu). */
int cuda_round_to_bf16(es_device *dev, const char *op, uint16_t *out /* (n) */, const float *in /* (n) */, size_t n);
/* out = silu(gate) · up (the fp32 value swiglu_forward stores) rounded to bf16 the same way. */
int cuda_swiglu_to_bf16(es_device *dev, const char *op, uint16_t *out /* (n) */, const float *gate /* (n) */, const float *up /* (n) */,
                        size_t n);

/* ---- matrix products (gemm.cu) ------------------------------------------------------------- */

/* The input formats of a product (both operands the same). */
typedef enum { CUDA_GEMM_F32, CUDA_GEMM_TF32, CUDA_GEMM_BF16, CUDA_GEMM_FP8_E4M3 } cuda_gemm_input;

/* D = alpha · A Bᵀ (+ bias), all row-major, D in fp32, accumulated in fp32, on the compute stream:
 *   D     (M, N) fp32, leading dimension N
 *   A     (M, K) in `input` (tf32: fp32 storage; fp8: __nv_fp8_e4m3 bytes)
 *   B     (N, K) in `input`
 *   bias  (N) bf16 or NULL, added to every row.
 * M = 0 is a no-op. fp8 needs K % 16 == 0 and N % 16 == 0 (cuBLASLt's rule); the caller checks. */
int cuda_gemm(es_device *dev, const char *op, float *D, const void *A, const void *B, const __nv_bfloat16 *bias, int M, int N,
              int K, float alpha, cuda_gemm_input input);
/* The same plus residual (M, N) fp32 (NULL: none), added in the product's epilogue before the
 * bias when cuBLASLt's epilogue does not take the bias; D must not alias A, B or the residual. */
int cuda_gemm_residual(es_device *dev, const char *op, float *D, const float *residual, const void *A, const void *B,
                       const __nv_bfloat16 *bias, int M, int N, int K, float alpha, cuda_gemm_input input);

/* Training's products (gemm_train.cu): D (M, N) = alpha · op(A) · op(B) + beta · D, row-major,
 * op(A) (M, K) being A (M, K) or, with trans_a, the transpose of A stored (K, M); op(B) (K, N)
 * being B (K, N) or, with trans_b, the transpose of B stored (N, K). Inputs fp32 or bf16 (both
 * operands the same), D fp32; no split K, one algorithm per shape. */
int cuda_gemm_train(es_device *dev, const char *op, float *D, const void *A, int trans_a, const void *B, int trans_b, int M, int N,
                    int K, float alpha, float beta, cuda_gemm_input input);

/* Pinned host memory for small results an op returns (cuda_device.pinned, grown when needed;
 * valid until the next op asks for it). */
int cuda_pinned_room(es_device *dev, size_t bytes, void **room);

/* fp32 -> bf16 bits as common/dtype.h rounds (to nearest, ties away from zero, saturating; NaN
 * quiet with its sign): the rounding of every weight upload, so a copy made on the device holds
 * the bits an upload of the same values would. */
__device__ __forceinline__ uint16_t cuda_f32_to_bf16_bits(float value) {
    uint32_t u = __float_as_uint(value);
    uint32_t sign = u & 0x80000000u, mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return (uint16_t)((sign >> 16) | 0x7fffu);
    if (mag == 0x7f800000u) return (uint16_t)(u >> 16);
    mag += 0x8000u;
    if (mag >= 0x7f800000u) mag = 0x7f7f0000u;
    return (uint16_t)((sign | mag) >> 16);
}

/* The last s in [0, n) with table[s] <= x (0 if none): the sequence holding token x of a
 * seq_start table, or holding tile x of a table of each sequence's first tile. Either table is
 * non-decreasing and x precedes its entry n, so the s found is never an empty sequence. */
__device__ __forceinline__ int cuda_last_at_or_before(const int32_t *table, int n, int x) {
    int s = 0;
    for (int high = n - 1; s < high;) {
        const int mid = (s + high + 1) / 2;
        if (table[mid] <= x) s = mid;
        else high = mid - 1;
    }
    return s;
}

/* Σ over the block's threads of a double, in a fixed tree (the same bits every run); shared holds
 * blockDim.x doubles, blockDim.x a power of two; every thread of the block must call it. */
__device__ __forceinline__ double cuda_block_sum(double value, double *shared) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
        __syncthreads();
    }
    const double total = shared[0];
    __syncthreads();
    return total;
}

/* ---- workspace: bytes of es_device_scratch each family needs for a plan's largest shapes ---- */
size_t cuda_matmul_workspace(const es_workspace_plan *plan);
size_t cuda_attention_workspace(const es_workspace_plan *plan);
size_t cuda_fourier_workspace(const es_workspace_plan *plan);
size_t cuda_backward_workspace(const es_workspace_plan *plan);
size_t cuda_attention_backward_workspace(const es_workspace_plan *plan);
size_t cuda_loss_workspace(const es_workspace_plan *plan);

/* ---- the ops (one file each; names as kernels/backend_impl.h's entries) ------------------------ */

int cuda_embedding_forward(es_device *dev, float *out, const int32_t *ids, const void *table, es_dtype dtype, int T, int C);
int cuda_rmsnorm_forward(es_device *dev, float *out, const float *in, const void *weight, int T, int C, float eps);
int cuda_matmul_forward(es_device *dev, float *out, const float *in, const void *weight, const void *bias, int T, int C, int OC);
int cuda_matmul_forward_group(es_device *dev, const es_matmul_part *part, int n, const float *in, int T, int C);
int cuda_swiglu_down_forward(es_device *dev, float *out, const float *residual, const float *gate, const float *up, const void *weight,
                             const void *bias, int T, int inner, int C);
int cuda_matmul_forward_residual(es_device *dev, float *out, const float *residual, const float *in, const void *weight,
                                 const void *bias, int T, int C, int OC);
int cuda_rope_forward(es_device *dev, float *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd);
int cuda_attention_forward(es_device *dev, float *out, const float *q, const float *k, const float *v, const int32_t *seq_start,
                           int n_seqs, int H, int KV, int hd);
/* The plain attention (any hd, fp32, two passes over the keys, no score buffer): the oracle the
 * fast one is checked against (tests/gpu/), and the path for head sizes the fast kernel does not
 * take (it takes 64, 96 and 128). */
int cuda_attention_forward_plain(es_device *dev, float *out, const float *q, const float *k, const float *v,
                                 const int32_t *seq_start, int n_seqs, int H, int KV, int hd);
int cuda_attention_cached_forward(es_device *dev, float *out, float *k_cache, float *v_cache, const float *q, const float *k,
                                  const float *v, const int32_t *seq_start, const int32_t *past, const int32_t *slot,
                                  int n_seqs, int max_seq, int H, int KV, int hd);
int cuda_swiglu_forward(es_device *dev, float *out, const float *gate, const float *up, size_t n);
int cuda_add(es_device *dev, float *out, const float *a, const float *b, size_t n);
int cuda_sum_squares(es_device *dev, double *out, const float *x, size_t n);
int cuda_scale(es_device *dev, float *x, size_t n, float scale);
int cuda_round_precision(es_device *dev, float *x, size_t n, es_precision precision);
int cuda_standardise(es_device *dev, float *x_hat, int64_t *first_bad, const float *rows, const int64_t *row_index,
                     const float *mean, const float *scale, int64_t n, int d, es_precision precision);
int cuda_fourier_features(es_device *dev, float *targets, const float *x_hat, const float *omega, float omega_scale, int T, int d, int m,
                          es_precision precision, es_fourier_timing *timing);

/* training (backward.cu, attention_backward.cu, loss.cu, optimizer.cu) */
int cuda_embedding_backward(es_device *dev, float *dtable, const int32_t *ids, const float *dout, int T, int C);
int cuda_rmsnorm_backward(es_device *dev, float *din, float *dweight, const float *dout, const float *in, const void *weight, int T,
                          int C, float eps);
int cuda_matmul_backward(es_device *dev, float *din, float *dweight, float *dbias, const float *dout, const float *in,
                         const void *weight, int T, int C, int OC);
int cuda_swiglu_down_backward(es_device *dev, float *dgate, float *dup, float *dweight, float *dbias, const float *dout,
                              const float *gate, const float *up, const void *weight, int T, int inner, int C);
int cuda_matmul_backward_group(es_device *dev, float *din, const es_matmul_part_grad *grad, const es_matmul_part *part, int n,
                               const float *in, int T, int C);
int cuda_rope_backward(es_device *dev, float *dx, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd);
int cuda_swiglu_backward(es_device *dev, float *dgate, float *dup, const float *dout, const float *gate, const float *up, size_t n);
/* The plain backward (fp32, any hd): the oracle of the flash one behind cuda_attention_backward. */
int cuda_attention_backward_plain(es_device *dev, float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                                  const float *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd);
int cuda_attention_backward(es_device *dev, float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                            const float *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd);
int cuda_latent_mse(es_device *dev, double *loss_sum, double *cosine_sum, float *dh, float *dhead, const float *h,
                    const float *target, const uint8_t *mask, const float *head, int T, int C, float eps, float scale);
int cuda_cross_entropy(es_device *dev, double *loss_sum, float *dx, float *dW, const float *x, const void *W,
                       const int32_t *labels, int T, int C, int V, float scale);
int cuda_adamw_update(es_device *dev, float *params, void *working, const float *grads, float *m, float *v, size_t n,
                      int64_t step, double lr, const es_adamw_config *config);
int cuda_round_weights(es_device *dev, void *working, const float *master, size_t n);

/* collectives (group.cu) */
int cuda_group_id(es_device *dev, unsigned char *id);
int cuda_group_join(es_device *dev, const unsigned char *id, int rank, int world);
int cuda_group_allreduce(es_device *dev, void *data, size_t n, es_group_op op);
int cuda_group_start(es_device *dev, es_group_call call, float *data, size_t n, int root);
int cuda_group_wait(es_device *dev);
void cuda_group_leave(void);

/* Sequence table on the host: attention needs its shape to size its grid. Copies seq_start
 * (device, n_seqs + 1) into host memory (cuda_device.pinned) after the compute stream reaches it. */
int cuda_host_seq_start(es_device *dev, const int32_t *seq_start, int n_seqs, const int32_t **host);

#endif
