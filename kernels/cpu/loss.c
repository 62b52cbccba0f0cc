/* The loss terms on the CPU (kernels/ops.h): latent MSE and a chunked cross entropy, forward
 * and backward in one pass over chunks of rows. Every product is cpu_gemm's or a single-threaded
 * tile on the pool, every sum is taken in a fixed order. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

/* ---- latent MSE ---------------------------------------------------------------------- */

/* Rows per chunk: bounds the scratch to two (MSE_ROWS, C) buffers whatever T is, and is large
 * enough for the head's products to run at sgemm speed. */
enum { MSE_ROWS = 256 };

static size_t latent_workspace(int C) { return (size_t)MSE_ROWS * (2 * (size_t)C * sizeof(float) + sizeof(double)); }

int cpu_latent_mse(es_device *dev, double *loss_sum, double *cosine_sum, float *dh, float *dhead, const float *h,
                   const float *target, const uint8_t *mask, const float *head, int T, int C, float eps, float scale) {
    *loss_sum = 0;
    if (cosine_sum) *cosine_sum = 0;
    if (T <= 0) return 0;
    char *scratch = es_device_scratch(dev, latent_workspace(C));
    if (!scratch) return ES_ERR_RUNTIME;
    float *normed = (float *)scratch;                    // (MSE_ROWS, C) ĥ, later ∂/∂ĥ
    float *y = normed + (size_t)MSE_ROWS * C;            // (MSE_ROWS, C) y, later ∂/∂y
    double *r = (double *)(y + (size_t)MSE_ROWS * C);    // (MSE_ROWS) 1/rms
    double total = 0, cosines = 0;
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
        if (head) cpu_gemm(dev, 0, 1, rows, C, C, 1.0f, normed, C, head, C, 0.0f, y, C);
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
            // dhead += dyᵀ ĥ  (C, C): this chunk's rows summed inside the product
            if (dhead) cpu_gemm(dev, 1, 0, C, C, rows, 1.0f, y, C, normed, C, 1.0f, dhead, C);
            // ∂/∂ĥ = dy @ head  (rows, C)
            cpu_gemm(dev, 0, 0, rows, C, C, 1.0f, y, C, head, C, 0.0f, normed, C);
        } else {
            memcpy(normed, y, (size_t)rows * C * sizeof *normed);
        }
        /* through the normalisation (RMSNorm with a unit weight): dh = r dĥ − h r³ mean(h ∘ dĥ) */
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
    *loss_sum = total;
    if (cosine_sum) *cosine_sum = cosines;
    return 0;
}

/* ---- cross entropy ------------------------------------------------------------------- */

/* Labelled rows per chunk: the (CE_ROWS, V) logits are the largest scratch (78 MB at
 * V = 151936). Each chunk reads and writes all of dW once (0.9 GB at C = 1536), so chunks
 * must not be small for the products to outweigh that traffic. */
enum { CE_ROWS = 128 };
/* Vocabulary tiles: one single-threaded task each, enough of them to keep 16 workers busy. */
enum { VOCAB_TILE = 4096 };

typedef struct ce_job {
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

/* The pieces of the workspace, in order, for `rows` rows (with dx when backward). */
typedef struct ce_layout {
    size_t logits, tile_max, tile_sum, row_max, row_sum, dx_part, rows_x, rows_label, rows_t, total;
} ce_layout;

static size_t align_up(size_t n) { return (n + 63) / 64 * 64; }

static ce_layout ce_layout_of(int rows, int C, int V, int backward) {
    const size_t tiles = ((size_t)V + VOCAB_TILE - 1) / VOCAB_TILE, R = (size_t)rows;
    ce_layout l;
    size_t at = 0;
    l.logits = at, at += align_up(R * V * sizeof(float));
    l.tile_max = at, at += align_up(R * tiles * sizeof(float));
    l.tile_sum = at, at += align_up(R * tiles * sizeof(double));
    l.row_max = at, at += align_up(R * sizeof(float));
    l.row_sum = at, at += align_up(R * sizeof(double));
    l.dx_part = at, at += backward ? align_up(tiles * R * C * sizeof(float)) : 0;
    l.rows_x = at, at += align_up(R * C * sizeof(float));
    l.rows_label = at, at += align_up(R * sizeof(int32_t));
    l.rows_t = at, at += align_up(R * sizeof(int));
    l.total = at;
    return l;
}

// logits of one tile (rows, width) and their per-row max and sum of exponentials
static void ce_forward_tile(void *arg, size_t j, int worker) {
    (void)worker;
    ce_job *job = arg;
    const int v0 = (int)j * VOCAB_TILE, width = job->V - v0 < VOCAB_TILE ? job->V - v0 : VOCAB_TILE;
    cpu_sgemm(0, 1, job->rows, width, job->C, 1.0f, job->x, job->C, job->W + (size_t)v0 * job->C, job->C, 0.0f, job->logits + v0,
              job->V);
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
        cpu_sgemm(1, 0, width, C, job->rows, 1.0f, job->logits + v0, job->V, job->x, C, 1.0f, job->dW + (size_t)v0 * C, C);
    cpu_sgemm(0, 0, job->rows, C, width, 1.0f, job->logits + v0, job->V, job->W + (size_t)v0 * C, C, 0.0f,
              job->dx_part + j * job->rows * C, C);
}

int cpu_cross_entropy(es_device *dev, double *loss_sum, float *dx, float *dW, const float *x, const void *W_any,
                      const int32_t *labels, int T, int C, int V, float scale) {
    const float *W = W_any; /* the CPU's weight format is fp32 */
    *loss_sum = 0;
    int labelled = 0;
    for (int t = 0; t < T; t++) {
        if (labels[t] < -1 || labels[t] >= V)
            return es_device_fail(dev, ES_ERR_DATA, "cross entropy: token %d has label %d, outside [-1, %d)", t, labels[t], V);
        labelled += labels[t] >= 0;
    }
    if (dx) memset(dx, 0, (size_t)T * C * sizeof *dx);
    if (!labelled) return 0;
    const int rows_max = labelled < CE_ROWS ? labelled : CE_ROWS, tiles = (V + VOCAB_TILE - 1) / VOCAB_TILE;
    const ce_layout l = ce_layout_of(rows_max, C, V, dx != NULL);
    char *scratch = es_device_scratch(dev, l.total);
    if (!scratch) return ES_ERR_RUNTIME;
    float *rows_x = (float *)(scratch + l.rows_x); // (rows, C) gathered x
    int32_t *rows_label = (int32_t *)(scratch + l.rows_label);
    int *rows_t = (int *)(scratch + l.rows_t);
    ce_job job = {(float *)(scratch + l.logits), (float *)(scratch + l.tile_max), (double *)(scratch + l.tile_sum),
                  (float *)(scratch + l.row_max), (double *)(scratch + l.row_sum), (float *)(scratch + l.dx_part),
                  dW, rows_x, W, rows_label, 0, C, V, tiles, scale};
    double total = 0;
    for (int next = 0; next < T;) {
        /* gather the next CE_ROWS labelled rows: unlabelled ones cost nothing */
        int rows = 0;
        for (; next < T && rows < CE_ROWS; next++) {
            if (labels[next] < 0) continue;
            memcpy(rows_x + (size_t)rows * C, x + (size_t)next * C, (size_t)C * sizeof *rows_x);
            rows_label[rows] = labels[next], rows_t[rows] = next, rows++;
        }
        if (!rows) break;
        job.rows = rows;
        cpu_for(dev, (size_t)tiles, ce_forward_tile, &job);
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
        cpu_for(dev, (size_t)tiles, ce_backward_tile, &job);
        /* dx rows: the tiles' shares summed in tile order */
        for (int i = 0; i < rows; i++) {
            float *out = dx + (size_t)rows_t[i] * C;
            for (int j = 0; j < tiles; j++) {
                const float *part = job.dx_part + ((size_t)j * rows + i) * C;
                for (int c = 0; c < C; c++) out[c] += part[c];
            }
        }
    }
    *loss_sum = total;
    return 0;
}

size_t cpu_loss_workspace(const es_device *dev, const es_workspace_plan *plan) {
    (void)dev;
    size_t bytes = plan->latent_width ? latent_workspace(plan->latent_width) : 0;
    if (plan->vocab && plan->ce_width) {
        const int rows = plan->tokens < CE_ROWS ? (plan->tokens > 0 ? plan->tokens : 1) : CE_ROWS;
        const size_t ce = ce_layout_of(rows, plan->ce_width, plan->vocab, plan->train).total;
        bytes = ce > bytes ? ce : bytes;
    }
    return bytes;
}
