/* CPU backend of kernels/ops.h. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "ops.h"

void es_embedding_forward(float *out, const int32_t *ids, const float *table, int T, int C) {
    for (int t = 0; t < T; t++) memcpy(out + (size_t)t * C, table + (size_t)ids[t] * C, (size_t)C * sizeof(float));
}

void es_rmsnorm_forward(float *out, const float *in, const float *weight, int T, int C, float eps) {
    for (int t = 0; t < T; t++) {
        const float *x = in + (size_t)t * C;
        float *y = out + (size_t)t * C;
        double sum_sq = 0;
        for (int c = 0; c < C; c++) sum_sq += (double)x[c] * x[c];
        float scale = (float)(1.0 / sqrt(sum_sq / C + eps));
        for (int c = 0; c < C; c++) y[c] = x[c] * scale * weight[c];
    }
}

/* Rows go through sgemm in blocks of exactly MATMUL_ROWS (the last one padded): OpenBLAS picks
 * its kernels by the matrix sizes, so a token's result would otherwise depend on how many
 * other tokens share its batch. Fixed blocks make outputs independent of batching. */
enum { MATMUL_ROWS = 1024 };

/* Below this many multiply-adds OpenBLAS's threads cost more in waking and yielding than
 * they save: a small product's block is cut into one slice of rows per pool worker, each
 * slice a single-threaded sgemm of fixed size. */
#define SMALL_PRODUCT (1L << 24)

typedef struct {
    float *out;
    const float *in, *weight;
    int C, OC, rows_per_slice;
    float beta;
} matmul_slices;

static void matmul_slice(void *arg, size_t index, int worker) {
    (void)worker;
    matmul_slices *job = arg;
    size_t first = index * (size_t)job->rows_per_slice;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, job->rows_per_slice, job->OC, job->C, 1.0f,
                job->in + first * job->C, job->C, job->weight, job->C, job->beta, job->out + first * job->OC, job->OC);
}

int es_matmul_forward(es_pool *pool, float *out, const float *in, const float *weight, const float *bias, int T, int C, int OC) {
    float *padded_in = NULL, *padded_out = NULL;
    const int threads = openblas_get_num_threads();
    int slices = (long)MATMUL_ROWS * OC * C < SMALL_PRODUCT && pool ? es_pool_threads(pool) : 1;
    while (MATMUL_ROWS % slices) slices--; /* equal slices */
    if (slices > 1 && threads > 1) openblas_set_num_threads(1);
    int rc = 0;
    for (int first = 0; first < T && !rc; first += MATMUL_ROWS) {
        int rows = T - first < MATMUL_ROWS ? T - first : MATMUL_ROWS;
        const float *block_in = in + (size_t)first * C;
        float *block_out = out + (size_t)first * OC;
        if (rows < MATMUL_ROWS) {
            if (!padded_in) {
                padded_in = calloc((size_t)MATMUL_ROWS * C, sizeof *padded_in);
                padded_out = malloc((size_t)MATMUL_ROWS * OC * sizeof *padded_out);
            }
            if (!padded_in || !padded_out) {
                rc = -1;
                break;
            }
            memcpy(padded_in, block_in, (size_t)rows * C * sizeof *padded_in);
            block_in = padded_in, block_out = padded_out;
        }
        if (bias)
            for (int t = 0; t < MATMUL_ROWS; t++) memcpy(block_out + (size_t)t * OC, bias, (size_t)OC * sizeof(float));
        matmul_slices job = {block_out, block_in, weight, C, OC, MATMUL_ROWS / slices, bias ? 1.0f : 0.0f};
        if (slices > 1) es_pool_for(pool, (size_t)slices, matmul_slice, &job);
        else matmul_slice(&job, 0, 0);
        if (rows < MATMUL_ROWS) memcpy(out + (size_t)first * OC, padded_out, (size_t)rows * OC * sizeof *out);
    }
    if (slices > 1 && threads > 1) openblas_set_num_threads(threads);
    free(padded_in), free(padded_out);
    return rc;
}

void es_rope_forward(float *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    es_rope_rotate(x, positions, inv_freq, T, n_heads, hd, 0);
}

void es_rope_rotate(float *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd, int inverse) {
    const int half = hd / 2;
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < half; i++) {
            double angle = (double)positions[t] * inv_freq[i];
            /* the inverse rotation negates the (fp32-rounded) sine: the same bits as the forward's */
            float cos_a = (float)cos(angle), sin_a = inverse ? -(float)sin(angle) : (float)sin(angle);
            for (int h = 0; h < n_heads; h++) {
                float *head = x + ((size_t)t * n_heads + h) * hd;
                float first = head[i], second = head[i + half];
                head[i] = first * cos_a - second * sin_a;
                head[i + half] = second * cos_a + first * sin_a;
            }
        }
    }
}

/* Per sequence and query head, two matrix products: scores = Q K^T (the upper triangle is
 * computed and then masked), a causal softmax per row, out = P V. K and V of the shared
 * key/value head are read in place through the leading dimension. A sequence's result depends
 * only on the sequence, not on what else is in the batch. Small problems run one (sequence,
 * head) per worker with single-threaded products; large ones one at a time with OpenBLAS's
 * threads. */
typedef struct {
    float *out;
    const float *q, *k, *v;
    const int32_t *seq_start;
    int H, KV, hd, longest;
    float *scores; /* (workers, longest, longest) */
} attention_job;

static void attend(void *arg, size_t index, int worker) {
    attention_job *job = arg;
    const int H = job->H, KV = job->KV, hd = job->hd;
    const int s = (int)(index / (size_t)H), h = (int)(index % (size_t)H), kv = h / (H / KV);
    const int first = job->seq_start[s], L = job->seq_start[s + 1] - first;
    if (L == 0) return;
    float *scores = job->scores + (size_t)worker * job->longest * job->longest; // (L, L)
    const float *q_h = job->q + ((size_t)first * H + h) * hd;    // (L, hd), row stride H*hd
    const float *k_h = job->k + ((size_t)first * KV + kv) * hd;  // (L, hd), row stride KV*hd
    const float *v_h = job->v + ((size_t)first * KV + kv) * hd;  // (L, hd), row stride KV*hd
    float *out_h = job->out + ((size_t)first * H + h) * hd;      // (L, hd), row stride H*hd
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, L, L, hd, 1.0f / sqrtf((float)hd), q_h, H * hd, k_h, KV * hd,
                0.0f, scores, L);
    for (int t = 0; t < L; t++) {
        float *row = scores + (size_t)t * L;
        float max_score = -INFINITY;
        for (int u = 0; u <= t; u++)
            if (row[u] > max_score) max_score = row[u];
        double total = 0;
        for (int u = 0; u <= t; u++) total += row[u] = expf(row[u] - max_score);
        const float inverse = (float)(1.0 / total);
        for (int u = 0; u <= t; u++) row[u] *= inverse;
        for (int u = t + 1; u < L; u++) row[u] = 0.0f; /* causal */
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, L, hd, L, 1.0f, scores, L, v_h, KV * hd, 0.0f, out_h, H * hd);
}

int es_attention_forward(es_pool *pool, float *out, const float *q, const float *k, const float *v, const int32_t *seq_start,
                         int n_seqs, int H, int KV, int hd) {
    int longest = 0;
    for (int s = 0; s < n_seqs; s++)
        if (seq_start[s + 1] - seq_start[s] > longest) longest = seq_start[s + 1] - seq_start[s];
    if (!longest) return 0;
    const int threads = openblas_get_num_threads();
    const int small = (long)longest * longest * hd < SMALL_PRODUCT;
    const int workers = small ? es_pool_threads(pool) : 1;
    attention_job job = {out, q, k, v, seq_start, H, KV, hd, longest,
                         malloc((size_t)workers * longest * longest * sizeof(float))};
    if (!job.scores) return -1;
    if (small) {
        if (threads > 1) openblas_set_num_threads(1);
        es_pool_for(pool, (size_t)n_seqs * H, attend, &job);
        if (threads > 1) openblas_set_num_threads(threads);
    } else {
        for (size_t index = 0; index < (size_t)n_seqs * H; index++) attend(&job, index, 0);
    }
    free(job.scores);
    return 0;
}

void es_swiglu_forward(float *out, const float *gate, const float *up, long n) {
    for (long i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

void es_residual_forward(float *x, const float *y, long n) {
    for (long i = 0; i < n; i++) x[i] += y[i];
}
