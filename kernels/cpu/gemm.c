/* Matrix products cut into fixed tiles (kernels/cpu/cpu.h): the only place OpenBLAS is called. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "cpu.h"

void cpu_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
               float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* sgemm would leave C untouched only for beta 1: do what the product means */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
        return;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
                B, ldb, beta, C, ldc);
}

typedef struct gemm_job {
    int trans_a, trans_b, M, N, K, lda, ldb, ldc, col_tiles;
    float alpha, beta;
    const float *A, *B;
    float *C;
} gemm_job;

static void gemm_tile(void *arg, size_t index, int worker) {
    (void)worker;
    const gemm_job *job = arg;
    const int i0 = (int)(index / (size_t)job->col_tiles) * CPU_TILE_ROWS, j0 = (int)(index % (size_t)job->col_tiles) * CPU_TILE_COLS;
    const int rows = job->M - i0 < CPU_TILE_ROWS ? job->M - i0 : CPU_TILE_ROWS;
    const int cols = job->N - j0 < CPU_TILE_COLS ? job->N - j0 : CPU_TILE_COLS;
    /* rows i0.. of op(A): A's rows, or (transposed) its columns */
    const float *a = job->trans_a ? job->A + i0 : job->A + (size_t)i0 * job->lda;
    /* columns j0.. of op(B): B's columns, or (transposed) its rows */
    const float *b = job->trans_b ? job->B + (size_t)j0 * job->ldb : job->B + j0;
    cpu_sgemm(job->trans_a, job->trans_b, rows, cols, job->K, job->alpha, a, job->lda, b, job->ldb, job->beta,
              job->C + (size_t)i0 * job->ldc + j0, job->ldc);
}

void cpu_gemm(es_device *dev, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    gemm_job job = {trans_a, trans_b, M, N, K, lda, ldb, ldc, (N + CPU_TILE_COLS - 1) / CPU_TILE_COLS, alpha, beta, A, B, C};
    const size_t tiles = (size_t)((M + CPU_TILE_ROWS - 1) / CPU_TILE_ROWS) * (size_t)job.col_tiles;
    cpu_for(dev, tiles, gemm_tile, &job);
}

/* Some of OpenBLAS's kernels (Haswell's, Zen's) compute a row of a product by other
 * instructions depending on its place in the block, so a token's bits would follow what else
 * shares its batch; others (SkylakeX's, Sandybridge's, Prescott's) compute every row alike.
 * One row is put at places 0..39 and 255 of a block of CPU_MATMUL_ROWS and compared. */
int cpu_rows_independent(void) {
    enum { N = 64, K = 96, PLACES = 41 };
    float *a = malloc(sizeof(float) * CPU_MATMUL_ROWS * K), *b = malloc(sizeof(float) * N * K);
    float *c = malloc(sizeof(float) * CPU_MATMUL_ROWS * N), *first = malloc(sizeof(float) * N);
    int same = a && b && c && first;
    uint32_t state = 12345;
    for (int i = 0; same && i < CPU_MATMUL_ROWS * K; i++) a[i] = (float)((state = state * 1664525u + 1013904223u) >> 8) / 16777216.0f - 0.5f;
    for (int i = 0; same && i < N * K; i++) b[i] = (float)((state = state * 1664525u + 1013904223u) >> 8) / 16777216.0f - 0.5f;
    for (int place = 0; same && place < PLACES; place++) {
        const int row = place < PLACES - 1 ? place : CPU_MATMUL_ROWS - 1;
        float *probe = a + (size_t)row * K, saved[K];
        memcpy(saved, probe, sizeof saved);
        memcpy(probe, a + (size_t)(CPU_MATMUL_ROWS / 2) * K, sizeof saved); /* the same row everywhere */
        cpu_sgemm(0, 1, CPU_MATMUL_ROWS, N, K, 1.0f, a, K, b, K, 0.0f, c, N);
        if (place == 0) memcpy(first, c, sizeof(float) * N);
        else same = !memcmp(first, c + (size_t)row * N, sizeof(float) * N);
        memcpy(probe, saved, sizeof saved);
    }
    free(a), free(b), free(c), free(first);
    return same;
}
