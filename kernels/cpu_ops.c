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
enum { MATMUL_ROWS = 256 };

void es_matmul_forward(float *out, const float *in, const float *weight, const float *bias, int T, int C, int OC) {
    float *padded_in = NULL, *padded_out = NULL;
    for (int first = 0; first < T; first += MATMUL_ROWS) {
        int rows = T - first < MATMUL_ROWS ? T - first : MATMUL_ROWS;
        const float *block_in = in + (size_t)first * C;
        float *block_out = out + (size_t)first * OC;
        if (rows < MATMUL_ROWS) {
            if (!padded_in) {
                padded_in = calloc((size_t)MATMUL_ROWS * C, sizeof *padded_in);
                padded_out = malloc((size_t)MATMUL_ROWS * OC * sizeof *padded_out);
            }
            if (!padded_in || !padded_out) abort(); /* a few hundred kilobytes */
            memcpy(padded_in, block_in, (size_t)rows * C * sizeof *padded_in);
            block_in = padded_in, block_out = padded_out;
        }
        if (bias)
            for (int t = 0; t < MATMUL_ROWS; t++) memcpy(block_out + (size_t)t * OC, bias, (size_t)OC * sizeof(float));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, MATMUL_ROWS, OC, C, 1.0f, block_in, C, weight, C,
                    bias ? 1.0f : 0.0f, block_out, OC);
        if (rows < MATMUL_ROWS) memcpy(out + (size_t)first * OC, padded_out, (size_t)rows * OC * sizeof *out);
    }
    free(padded_in), free(padded_out);
}

void es_rope_forward(float *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    const int half = hd / 2;
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < half; i++) {
            double angle = (double)positions[t] * inv_freq[i];
            float cos_a = (float)cos(angle), sin_a = (float)sin(angle);
            for (int h = 0; h < n_heads; h++) {
                float *head = x + ((size_t)t * n_heads + h) * hd;
                float first = head[i], second = head[i + half];
                head[i] = first * cos_a - second * sin_a;
                head[i + half] = second * cos_a + first * sin_a;
            }
        }
    }
}

typedef struct {
    float *out;
    const float *q, *k, *v;
    const int32_t *seq_start;
    int n_seqs, H, KV, hd;
    int32_t T;
    float *scores; /* (workers, longest sequence) */
    int longest;
} attention_job;

/* One (token, head) row of attention: softmax over the token's own sequence, up to itself. */
static void attention_row(void *arg, size_t index, int worker) {
    attention_job *job = arg;
    const int H = job->H, KV = job->KV, hd = job->hd;
    int t = (int)(index / (size_t)H), h = (int)(index % (size_t)H), kv = h / (H / KV);
    int s = 0;
    while (job->seq_start[s + 1] <= t) s++;
    const int first = job->seq_start[s];
    const float *query = job->q + ((size_t)t * H + h) * hd;
    float *scores = job->scores + (size_t)worker * job->longest;
    const float scale = 1.0f / sqrtf((float)hd);
    float max_score = -INFINITY;
    for (int u = first; u <= t; u++) {
        const float *key = job->k + ((size_t)u * KV + kv) * hd;
        float dot = 0;
        for (int d = 0; d < hd; d++) dot += query[d] * key[d];
        scores[u - first] = dot * scale;
        if (scores[u - first] > max_score) max_score = scores[u - first];
    }
    double total = 0;
    for (int u = first; u <= t; u++) total += scores[u - first] = expf(scores[u - first] - max_score);
    float *out = job->out + ((size_t)t * H + h) * hd;
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int u = first; u <= t; u++) {
        const float weight = (float)(scores[u - first] / total);
        const float *value = job->v + ((size_t)u * KV + kv) * hd;
        for (int d = 0; d < hd; d++) out[d] += weight * value[d];
    }
}

int es_attention_forward(es_pool *pool, float *out, const float *q, const float *k, const float *v, const int32_t *seq_start,
                          int n_seqs, int H, int KV, int hd) {
    int longest = 0;
    for (int s = 0; s < n_seqs; s++)
        if (seq_start[s + 1] - seq_start[s] > longest) longest = seq_start[s + 1] - seq_start[s];
    const int T = seq_start[n_seqs];
    int workers = es_pool_threads(pool);
    attention_job job = {out, q, k, v, seq_start, n_seqs, H, KV, hd, T, malloc((size_t)workers * (size_t)(longest ? longest : 1) * sizeof(float)), longest};
    if (!job.scores) return -1;
    es_pool_for(pool, (size_t)T * (size_t)H, attention_row, &job);
    free(job.scores);
    return 0;
}

void es_swiglu_forward(float *out, const float *gate, const float *up, long n) {
    for (long i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

void es_residual_forward(float *x, const float *y, long n) {
    for (long i = 0; i < n; i++) x[i] += y[i];
}
