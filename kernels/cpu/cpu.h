/* The CPU backend's internals (C + OpenBLAS, fp32: the reference every other backend is
 * checked against). Device memory is host memory; the compute stream is the calling thread
 * and the device's pool; the copy stream is one loader thread.
 *
 * Determinism: OpenBLAS runs single-threaded (its threaded driver cuts the inner dimension
 * into other blocks than its single-threaded one, so bits would follow the thread count);
 * every product is cut by cpu_gemm into tiles whose shape depends on the problem's shape
 * only, the pool running tiles side by side, and every reduction here runs in a fixed order. */
#ifndef ES_KERNELS_CPU_H
#define ES_KERNELS_CPU_H

#include <stddef.h>

#include "backend_impl.h"
#include "threadpool.h"

es_pool *cpu_pool(const es_device *dev);
int cpu_workers(const es_device *dev);

/* fn(arg, i, worker) for i in [0, n), on the pool (any order, any worker). */
void cpu_for(es_device *dev, size_t n, void (*fn)(void *arg, size_t i, int worker), void *arg);

/* C (M, N) = alpha · op(A) op(B) + beta · C, row-major, op = transpose when trans_* is set,
 * cut into tiles of CPU_TILE_ROWS × CPU_TILE_COLS of C, each one single-threaded sgemm with the
 * whole inner dimension K, run side by side on the pool. */
enum { CPU_TILE_ROWS = 256, CPU_TILE_COLS = 512 };
/* A matrix product's rows (tokens) go through OpenBLAS in blocks of exactly this many, the last
 * one padded (kernels/cpu/ops.c). */
enum { CPU_MATMUL_ROWS = 256 };
/* 1 when OpenBLAS's kernels give a row the same bits at any place in such a block. */
int cpu_rows_independent(void);
void cpu_gemm(es_device *dev, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc);
/* One single-threaded sgemm on the calling thread (for ops that make their own tasks). */
/* Checks that OpenBLAS's per-thread buffers fit in the address space and has each pool worker
 * take its own before the first product (kernels/cpu/blas_memory.c): ES_ERR_RUNTIME, never a hang. */
int cpu_blas_memory_prepare(es_pool *pool, es_error *err);
void cpu_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
               float beta, float *C, int ldc);

/* The ops (kernels/cpu/ops.c, backward.c, attention.c, loss.c, optimizer.c, project.c). */
int cpu_embedding_forward(es_device *, float *, const int32_t *, const void *, es_dtype, int, int);
int cpu_rmsnorm_forward(es_device *, float *, const float *, const void *, int, int, float);
int cpu_matmul_forward(es_device *, float *, const float *, const void *, const void *, int, int, int);
int cpu_rope_forward(es_device *, float *, const int32_t *, const double *, int, int, int);
int cpu_swiglu_forward(es_device *, float *, const float *, const float *, size_t);
int cpu_add(es_device *, float *, const float *, const float *, size_t);
int cpu_swiglu_down_forward(es_device *, float *, const float *, const float *, const float *, const void *, const void *, int, int, int);
int cpu_swiglu_down_backward(es_device *, float *, float *, float *, float *, const float *, const float *, const float *, const void *,
                             int, int, int);
int cpu_embedding_backward(es_device *, float *, const int32_t *, const float *, int, int);
int cpu_rmsnorm_backward(es_device *, float *, float *, const float *, const float *, const void *, int, int, float);
int cpu_matmul_backward(es_device *, float *, float *, float *, const float *, const float *, const void *, int, int, int);
int cpu_matmul_backward_group(es_device *, float *, const es_matmul_part_grad *, const es_matmul_part *, int, const float *, int, int);
int cpu_rope_backward(es_device *, float *, const int32_t *, const double *, int, int, int);
int cpu_swiglu_backward(es_device *, float *, float *, const float *, const float *, const float *, size_t);
int cpu_attention_forward(es_device *, float *, const float *, const float *, const float *, const int32_t *, int, int, int, int);
int cpu_attention_cached_forward(es_device *, float *, float *, float *, const float *, const float *, const float *,
                                 const int32_t *, const int32_t *, const int32_t *, int, int, int, int, int);
int cpu_attention_backward(es_device *, float *, float *, float *, const float *, const float *, const float *, const float *,
                           const int32_t *, int, int, int, int);
int cpu_latent_mse(es_device *, double *, double *, float *, float *, const float *, const float *, const uint8_t *, const float *,
                   int, int, float, float);
int cpu_cross_entropy(es_device *, double *, float *, float *, const float *, const void *, const int32_t *, int, int, int, float);
int cpu_adamw_update(es_device *, float *, void *, const float *, float *, float *, size_t, int64_t, double, const es_adamw_config *);
int cpu_round_weights(es_device *, void *, const float *, size_t);
int cpu_sum_squares(es_device *, double *, const float *, size_t);
int cpu_scale(es_device *, float *, size_t, float);
int cpu_round_precision(es_device *, float *, size_t, es_precision);
int cpu_standardise(es_device *, float *, int64_t *, const float *, const int64_t *, const float *, const float *, int64_t, int,
                    es_precision);
int cpu_fourier_features(es_device *, float *, const float *, const float *, float, int, int, int, es_precision, es_fourier_timing *);

/* Scratch each op takes from the workspace for the largest shapes of a plan (bytes). */
size_t cpu_matmul_workspace(const es_workspace_plan *plan);
/* swiglu_down's: the activation (forward) or its gradient (backward), (T, I), and the product's padding. */
size_t cpu_swiglu_down_workspace(const es_workspace_plan *plan);
size_t cpu_attention_workspace(const es_device *dev, const es_workspace_plan *plan);
size_t cpu_loss_workspace(const es_device *dev, const es_workspace_plan *plan);
size_t cpu_project_workspace(const es_device *dev, const es_workspace_plan *plan);
size_t cpu_optimizer_workspace(const es_workspace_plan *plan);

/* OpenBLAS's kernels (kernels/cpu/blas_core.c): the core it runs, and the one es_device_prepare
 * switches to when OpenBLAS chose one below what the CPU supports (NULL: keep it). */
const char *cpu_blas_core(void);
typedef struct cpu_features {
    int avx, avx2_fma, avx512, avx512_bf16;
} cpu_features;
const char *cpu_blas_upgrade(const char *current, const cpu_features *cpu);

#endif
