/* The loss terms of align/loss.h, forward and backward in one pass over chunks of rows.
 *
 * Results do not depend on the thread count: every sum is taken in a fixed order, and no
 * sgemm lets OpenBLAS's threaded driver cut a long inner dimension (it cuts it differently
 * from the single-threaded driver, so the bits would change with the thread count; see
 * kernels/cpu_backward.c). cross_entropy runs single-threaded products on fixed tiles of the
 * vocabulary, side by side on the pool; latent_mse, which has no pool, keeps OpenBLAS's
 * threads but hands it inner dimensions of at most K_BLOCK, which no driver cuts. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "loss.h"

/* ---- latent MSE ---------------------------------------------------------------------- */

/* Below OpenBLAS's inner blocking (320 for sgemm on Cooper Lake, 384 on Haswell): a product
 * with K <= K_BLOCK is one block for every driver and thread count. */
enum { K_BLOCK = 256 };

// c (M, N) = a (M, K) @ op(b) + beta · c, the K sum cut into fixed blocks of K_BLOCK
static void sgemm_k_blocks(enum CBLAS_TRANSPOSE trans_b, int M, int N, int K, const float *a, int lda, const float *b,
                           int ldb, float beta, float *c, int ldc) {
    for (int k0 = 0; k0 < K; k0 += K_BLOCK) {
        const int width = K - k0 < K_BLOCK ? K - k0 : K_BLOCK;
        const float *b_block = trans_b == CblasNoTrans ? b + (size_t)k0 * ldb : b + k0;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b, M, N, width, 1.0f, a + k0, lda, b_block, ldb, k0 ? 1.0f : beta, c,
                    ldc);
    }
}

/* Rows per chunk: bounds the scratch to a few (MSE_ROWS, C) buffers whatever T is, is large
 * enough for the head's products to run at sgemm speed, and is at most K_BLOCK (it is the
 * inner dimension of dhead's product). */
enum { MSE_ROWS = 256 };

/* Returns NaN when out of memory: the signature has no error code, and a NaN loss cannot be
 * mistaken for a result. */
double latent_mse(float *dh, float *dhead, double *cosine_sum, const float *h, const float *target, const uint8_t *mask,
                  const float *head, int T, int C, float eps, float scale) {
    const int rows_max = T < MSE_ROWS ? T : MSE_ROWS;
    float *normed = malloc((size_t)rows_max * C * sizeof *normed); // (rows, C) ĥ, later ∂/∂ĥ
    float *y = malloc((size_t)rows_max * C * sizeof *y);           // (rows, C) y, later ∂/∂y
    double *r = malloc((size_t)rows_max * sizeof *r);              // (rows) 1/rms
    double total = 0, cosines = 0;
    if (T > 0 && (!normed || !y || !r)) {
        free(normed), free(y), free(r);
        return NAN;
    }
    for (int t0 = 0; t0 < T; t0 += MSE_ROWS) {
        const int rows = T - t0 < MSE_ROWS ? T - t0 : MSE_ROWS;
        /* ĥ; unmasked rows are zero so they add nothing to dhead below */
        for (int i = 0; i < rows; i++) {
            const float *x = h + (size_t)(t0 + i) * C;
            float *n = normed + (size_t)i * C;
            if (!mask[t0 + i]) {
                memset(n, 0, (size_t)C * sizeof *n);
                r[i] = 0;
                continue;
            }
            double sum_sq = 0;
            for (int c = 0; c < C; c++) sum_sq += (double)x[c] * x[c];
            r[i] = 1.0 / sqrt(sum_sq / C + eps);
            for (int c = 0; c < C; c++) n[c] = (float)(x[c] * r[i]);
        }
        // y = ĥ @ headᵀ  (rows, C)
        if (head) sgemm_k_blocks(CblasTrans, rows, C, C, normed, C, head, C, 0.0f, y, C);
        else memcpy(y, normed, (size_t)rows * C * sizeof *y);
        /* e_t, cos, and y becomes ∂(scale Σ e)/∂y = scale · 2 (y − target) / C */
        const double grad_scale = 2.0 * scale / C;
        for (int i = 0; i < rows; i++) {
            float *yi = y + (size_t)i * C;
            if (!mask[t0 + i]) {
                memset(yi, 0, (size_t)C * sizeof *yi);
                continue;
            }
            const float *ti = target + (size_t)(t0 + i) * C;
            double sq = 0, dot = 0, yy = 0, tt = 0;
            for (int c = 0; c < C; c++) {
                const double diff = (double)yi[c] - ti[c];
                sq += diff * diff;
                dot += (double)yi[c] * ti[c], yy += (double)yi[c] * yi[c], tt += (double)ti[c] * ti[c];
                yi[c] = (float)(grad_scale * diff);
            }
            total += sq / C;
            if (yy > 0 && tt > 0) cosines += dot / sqrt(yy * tt);
        }
        if (!dh) continue;
        if (head) {
            // dhead += dyᵀ ĥ  (C, C): the sum over this chunk's rows inside one sgemm
            if (dhead)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, C, C, rows, 1.0f, y, C, normed, C, 1.0f, dhead, C);
            // ∂/∂ĥ = dy @ head  (rows, C)
            sgemm_k_blocks(CblasNoTrans, rows, C, C, y, C, head, C, 0.0f, normed, C);
        } else {
            memcpy(normed, y, (size_t)rows * C * sizeof *normed);
        }
        /* through the normalisation (rmsnorm with unit weight):
         * dh = r dĥ − h r³ mean(h ∘ dĥ) */
        for (int i = 0; i < rows; i++) {
            float *out = dh + (size_t)(t0 + i) * C;
            if (!mask[t0 + i]) {
                memset(out, 0, (size_t)C * sizeof *out);
                continue;
            }
            const float *x = h + (size_t)(t0 + i) * C, *dn = normed + (size_t)i * C;
            double dot = 0;
            for (int c = 0; c < C; c++) dot += (double)x[c] * dn[c];
            const double correction = r[i] * r[i] * r[i] * dot / C;
            for (int c = 0; c < C; c++) out[c] = (float)(r[i] * dn[c] - x[c] * correction);
        }
    }
    free(normed), free(y), free(r);
    if (cosine_sum) *cosine_sum = cosines;
    return total;
}

/* ---- cross entropy ------------------------------------------------------------------- */

/* Labelled rows per chunk: the (CE_ROWS, V) logits are the largest scratch (78 MB at
 * V = 151936). Each chunk reads and writes all of dW once (0.9 GB at C = 1536), so chunks
 * must not be small for the products to outweigh that traffic. */
enum { CE_ROWS = 128 };
/* Vocabulary tiles: one single-threaded task each, enough of them to keep 16 workers busy. */
enum { VOCAB_TILE = 4096 };

typedef struct {
    float *logits;            // (rows, V): logits, then ∂loss/∂logits
    float *tile_max;          // (rows, tiles) max logit of each row in each tile
    double *tile_sum;         // (rows, tiles) Σ exp(logit − tile max)
    float *row_max;           // (rows) over the whole vocabulary
    double *row_sum;          // (rows) Σ exp(logit − row max)
    float *dx_part;           // (tiles, rows, C) each tile's share of dx
    float *dW;                // (V, C) or NULL
    const float *x, *W;       // (rows, C) the gathered rows, (V, C)
    const int32_t *labels;    // (rows)
    int rows, C, V, tiles;
    float scale;
} ce_job;

// logits of one tile (rows, width) and their per-row max and sum of exponentials
static void ce_forward_tile(void *arg, size_t j, int worker) {
    (void)worker;
    ce_job *job = arg;
    const int v0 = (int)j * VOCAB_TILE, width = job->V - v0 < VOCAB_TILE ? job->V - v0 : VOCAB_TILE;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, job->rows, width, job->C, 1.0f, job->x, job->C,
                job->W + (size_t)v0 * job->C, job->C, 0.0f, job->logits + v0, job->V);
    for (int i = 0; i < job->rows; i++) {
        const float *row = job->logits + (size_t)i * job->V + v0;
        float max_logit = -INFINITY;
        for (int v = 0; v < width; v++)
            if (row[v] > max_logit) max_logit = row[v];
        double total = 0;
        for (int v = 0; v < width; v++) total += expf(row[v] - max_logit);
        job->tile_max[(size_t)i * job->tiles + j] = max_logit;
        job->tile_sum[(size_t)i * job->tiles + j] = total;
    }
}

/* dlogits = scale · (softmax − onehot) of one tile, then its products:
 * dW tile += dlogitsᵀ x and the tile's share of dx = dlogits @ W tile. */
static void ce_backward_tile(void *arg, size_t j, int worker) {
    (void)worker;
    ce_job *job = arg;
    const int v0 = (int)j * VOCAB_TILE, width = job->V - v0 < VOCAB_TILE ? job->V - v0 : VOCAB_TILE, C = job->C;
    for (int i = 0; i < job->rows; i++) {
        float *row = job->logits + (size_t)i * job->V + v0;
        const float max_logit = job->row_max[i], factor = (float)(job->scale / job->row_sum[i]);
        for (int v = 0; v < width; v++) row[v] = expf(row[v] - max_logit) * factor;
        if (job->labels[i] >= v0 && job->labels[i] < v0 + width) row[job->labels[i] - v0] -= job->scale;
    }
    if (job->dW)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, width, C, job->rows, 1.0f, job->logits + v0, job->V, job->x, C,
                    1.0f, job->dW + (size_t)v0 * C, C);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, job->rows, C, width, 1.0f, job->logits + v0, job->V,
                job->W + (size_t)v0 * C, C, 0.0f, job->dx_part + j * job->rows * C, C);
}

static void run_tiles(es_pool *pool, size_t n, void (*fn)(void *, size_t, int), void *arg) {
    if (pool) es_pool_for(pool, n, fn, arg);
    else
        for (size_t i = 0; i < n; i++) fn(arg, i, 0);
}

/* Labels outside [-1, V) are a caller's bug and return -1 like an allocation failure, rather
 * than reading out of bounds. */
int cross_entropy(es_pool *pool, double *loss_sum, float *dx, float *dW, const float *x, const float *W,
                  const int32_t *labels, int T, int C, int V, float scale) {
    *loss_sum = 0;
    int labelled = 0;
    for (int t = 0; t < T; t++) {
        if (labels[t] < -1 || labels[t] >= V) return -1;
        labelled += labels[t] >= 0;
    }
    if (dx) memset(dx, 0, (size_t)T * C * sizeof *dx);
    if (!labelled) return 0;
    const int rows_max = labelled < CE_ROWS ? labelled : CE_ROWS, tiles = (V + VOCAB_TILE - 1) / VOCAB_TILE;
    ce_job job = {.logits = malloc((size_t)rows_max * V * sizeof(float)),
                  .tile_max = malloc((size_t)rows_max * tiles * sizeof(float)),
                  .tile_sum = malloc((size_t)rows_max * tiles * sizeof(double)),
                  .row_max = malloc((size_t)rows_max * sizeof(float)),
                  .row_sum = malloc((size_t)rows_max * sizeof(double)),
                  .dx_part = dx ? malloc((size_t)tiles * rows_max * C * sizeof(float)) : NULL,
                  .dW = dW, .W = W, .C = C, .V = V, .tiles = tiles, .scale = scale};
    float *rows_x = malloc((size_t)rows_max * C * sizeof *rows_x); // (rows, C) gathered x
    int32_t *rows_label = malloc((size_t)rows_max * sizeof *rows_label);
    int *rows_t = malloc((size_t)rows_max * sizeof *rows_t);
    int rc = 0;
    if (!job.logits || !job.tile_max || !job.tile_sum || !job.row_max || !job.row_sum || (dx && !job.dx_part) || !rows_x ||
        !rows_label || !rows_t)
        rc = -1;
    job.x = rows_x, job.labels = rows_label;
    const int threads = openblas_get_num_threads();
    if (threads > 1) openblas_set_num_threads(1);
    double total = 0;
    for (int next = 0; next < T && !rc;) {
        /* gather the next CE_ROWS labelled rows: unlabelled ones cost nothing */
        int rows = 0;
        for (; next < T && rows < CE_ROWS; next++) {
            if (labels[next] < 0) continue;
            memcpy(rows_x + (size_t)rows * C, x + (size_t)next * C, (size_t)C * sizeof *rows_x);
            rows_label[rows] = labels[next], rows_t[rows] = next, rows++;
        }
        if (!rows) break;
        job.rows = rows;
        run_tiles(pool, (size_t)tiles, ce_forward_tile, &job);
        /* logsumexp of each row from its tiles', in tile order */
        for (int i = 0; i < rows; i++) {
            const float *tile_max = job.tile_max + (size_t)i * tiles;
            const double *tile_sum = job.tile_sum + (size_t)i * tiles;
            float max_logit = -INFINITY;
            for (int j = 0; j < tiles; j++)
                if (tile_max[j] > max_logit) max_logit = tile_max[j];
            double sum = 0;
            for (int j = 0; j < tiles; j++) sum += tile_sum[j] * exp((double)tile_max[j] - max_logit);
            job.row_max[i] = max_logit, job.row_sum[i] = sum;
            total += (double)max_logit + log(sum) - job.logits[(size_t)i * V + rows_label[i]];
        }
        if (!dx) continue;
        run_tiles(pool, (size_t)tiles, ce_backward_tile, &job);
        /* dx rows: the tiles' shares summed in tile order */
        for (int i = 0; i < rows; i++) {
            float *out = dx + (size_t)rows_t[i] * C;
            for (int j = 0; j < tiles; j++) {
                const float *part = job.dx_part + ((size_t)j * rows + i) * C;
                for (int c = 0; c < C; c++) out[c] += part[c];
            }
        }
    }
    if (threads > 1) openblas_set_num_threads(threads);
    free(job.logits), free(job.tile_max), free(job.tile_sum), free(job.row_max), free(job.row_sum), free(job.dx_part);
    free(rows_x), free(rows_label), free(rows_t);
    if (!rc) *loss_sum = total;
    return rc;
}
