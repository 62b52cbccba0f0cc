/* CPU backend of kernels/ops_backward.h.
 *
 * Determinism: results do not depend on the number of threads. Every reduction written here
 * runs in a fixed order, and every sgemm runs single-threaded on a tile whose shape depends
 * only on the problem's shape, the pool (when there is one) running tiles side by side.
 * OpenBLAS's own threads are not used because its threaded driver cuts the inner dimension
 * into different blocks from its single-threaded one (OpenBLAS 0.3.21, Cooper Lake: for
 * nearly every K > 320 that is not a multiple of 32 the bits differ between 1 and 2 threads),
 * so a product's result would depend on the thread count. Without a pool everything runs on
 * the calling thread. */
#include <math.h>
#include <stdlib.h>

#include <cblas.h>

#include "ops.h"
#include "ops_backward.h"

/* es_pool_for without a pool: the same items in order on the calling thread. */
static void for_each(es_pool *pool, size_t n, void (*fn)(void *arg, size_t i, int worker), void *arg) {
    if (pool) es_pool_for(pool, n, fn, arg);
    else
        for (size_t i = 0; i < n; i++) fn(arg, i, 0);
}

void es_embedding_backward(float *dtable, const int32_t *ids, const float *dout, int T, int C) {
    /* In token order: a repeated id adds its rows in the same order every time. */
    for (int t = 0; t < T; t++) {
        float *row = dtable + (size_t)ids[t] * C;
        const float *g = dout + (size_t)t * C;
        for (int c = 0; c < C; c++) row[c] += g[c];
    }
}

/* With r = 1/sqrt(mean(x²) + eps) and y = x r w:
 *   ∂r/∂x_j = −r³ x_j / C, so dx_j = r w_j dy_j − x_j r³ · mean_c(x_c w_c dy_c),
 *   dw_c += dy_c x_c r.
 * dx uses r in double; dweight uses r rounded to fp32 as the forward's y = x r w does. */
void es_rmsnorm_backward(float *din, float *dweight, const float *dout, const float *in, const float *weight, int T, int C,
                         float eps) {
    /* Tokens go in blocks: dweight gets one double sum per block and column, so it is rounded
     * to fp32 T / BLOCK times rather than T times, with no scratch beyond the stack. */
    enum { BLOCK = 64 };
    for (int t0 = 0; t0 < T; t0 += BLOCK) {
        const int rows = T - t0 < BLOCK ? T - t0 : BLOCK;
        float r_fp32[BLOCK]; /* r as the forward rounds it */
        for (int t = t0; t < t0 + rows; t++) {
            const float *x = in + (size_t)t * C, *dy = dout + (size_t)t * C;
            float *dx = din + (size_t)t * C;
            double sum_sq = 0, dot = 0;
            for (int c = 0; c < C; c++) {
                sum_sq += (double)x[c] * x[c];
                dot += (double)x[c] * weight[c] * dy[c];
            }
            const double r = 1.0 / sqrt(sum_sq / C + eps);
            const double correction = r * r * r * dot / C;
            for (int c = 0; c < C; c++) dx[c] = (float)(r * weight[c] * dy[c] - x[c] * correction);
            r_fp32[t - t0] = (float)r;
        }
        for (int c = 0; c < C; c++) {
            double sum = 0;
            for (int t = 0; t < rows; t++) {
                const size_t at = (size_t)(t0 + t) * C + c;
                sum += (double)dout[at] * (in[at] * r_fp32[t]);
            }
            dweight[c] += (float)sum;
        }
    }
}

/* ---- matmul -------------------------------------------------------------------------- */

/* OpenBLAS single-threaded for the duration of an op (restored after), so tiles can run on
 * the pool's workers; returns the previous thread count. */
static int blas_single(void) {
    const int threads = openblas_get_num_threads();
    if (threads > 1) openblas_set_num_threads(1);
    return threads;
}
static void blas_restore(int threads) {
    if (threads > 1) openblas_set_num_threads(threads);
}

/* Tiles of this many output rows, one single-threaded sgemm each. */
enum { TILE_ROWS = 128 };

typedef struct {
    float *din, *dweight;
    const float *dout, *in, *weight;
    int T, C, OC, din_tiles;
} matmul_grad_job;

static void matmul_grad_tile(void *arg, size_t index, int worker) {
    (void)worker;
    const matmul_grad_job *job = arg;
    const int T = job->T, C = job->C, OC = job->OC;
    if ((int)index < job->din_tiles) {
        // din rows [t0, t0 + rows) = dout rows @ weight  (rows, C)
        const int t0 = (int)index * TILE_ROWS, rows = T - t0 < TILE_ROWS ? T - t0 : TILE_ROWS;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, C, OC, 1.0f, job->dout + (size_t)t0 * OC, OC,
                    job->weight, C, 0.0f, job->din + (size_t)t0 * C, C);
    } else {
        // dweight rows [o0, o0 + rows) += (dout columns o0..)ᵀ @ in  (rows, C), summed over T
        const int o0 = ((int)index - job->din_tiles) * TILE_ROWS, rows = OC - o0 < TILE_ROWS ? OC - o0 : TILE_ROWS;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, C, T, 1.0f, job->dout + o0, OC, job->in, C, 1.0f,
                    job->dweight + (size_t)o0 * C, C);
    }
}

int es_matmul_backward(es_pool *pool, float *din, float *dweight, float *dbias, const float *dout, const float *in,
                       const float *weight, int T, int C, int OC) {
    if (T <= 0) return 0;
    double *sum = dbias ? calloc((size_t)OC, sizeof *sum) : NULL;
    if (dbias && !sum) return -1;
    matmul_grad_job job = {din, dweight, dout, in, weight, T, C, OC, din ? (T + TILE_ROWS - 1) / TILE_ROWS : 0};
    const int threads = blas_single();
    for_each(pool, (size_t)job.din_tiles + (size_t)(OC + TILE_ROWS - 1) / TILE_ROWS, matmul_grad_tile, &job);
    blas_restore(threads);
    if (dbias) {
        /* column sums of dout, in double, tokens in order */
        for (int t = 0; t < T; t++) {
            const float *row = dout + (size_t)t * OC;
            for (int o = 0; o < OC; o++) sum[o] += row[o];
        }
        for (int o = 0; o < OC; o++) dbias[o] += (float)sum[o];
        free(sum);
    }
    return 0;
}

/* ---- rope ---------------------------------------------------------------------------- */

/* The forward rotates each pair (a, b) = (x[i], x[i + hd/2]) by +angle; the transpose of a
 * rotation is the rotation by −angle. cos and sin are rounded to fp32 as in the forward. */
void es_rope_backward(float *dx, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    es_rope_rotate(dx, positions, inv_freq, T, n_heads, hd, 1);
}

/* ---- attention ----------------------------------------------------------------------- */

/* Per (sequence, query head h, kv head kv = h / (H / KV)), with P = softmax(scale Q Kᵀ) causal:
 *   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(dP ∘ P)),  dQ = scale dS K,  dK = scale dSᵀ Q,
 * dK and dV summed over the query heads of kv in head order. Query rows [a, b) need only
 * keys [0, b) (causality) and give P, dS and dQ of those rows; key rows [a, b) of dK and dV
 * need only query rows [a, L) of P and dS. So the work is cut into blocks of query rows
 * (then blocks of key rows) that write disjoint rows. */
typedef struct {
    float *dq, *dk, *dv;
    const float *dout, *q, *k, *v;
    const int32_t *seq_start;
    int H, KV, hd, longest;
    float *scratch; /* (workers, 2, longest, longest): P and dP/dS */
    int seq, h;     /* the large path's current (sequence, query head) */
} attention_grad_job;

/* Pointers of one (sequence, query head) and its kv head: (L, hd) matrices read in place
 * through their row strides H*hd and KV*hd. */
typedef struct {
    int L;
    const float *q, *k, *v, *dout;
    float *dq, *dk, *dv, *probs, *dprobs;
} head_view;

static head_view view_of(const attention_grad_job *job, int s, int h, float *probs) {
    const int H = job->H, KV = job->KV, hd = job->hd, kv = h / (H / KV), first = job->seq_start[s];
    return (head_view){job->seq_start[s + 1] - first,
                       job->q + ((size_t)first * H + h) * hd,   job->k + ((size_t)first * KV + kv) * hd,
                       job->v + ((size_t)first * KV + kv) * hd, job->dout + ((size_t)first * H + h) * hd,
                       job->dq + ((size_t)first * H + h) * hd,  job->dk + ((size_t)first * KV + kv) * hd,
                       job->dv + ((size_t)first * KV + kv) * hd, probs, probs + (size_t)job->longest * job->longest};
}

/* Query rows [a, b): P (recomputed), dS, dQ. With a = 0, b = L the scores and the softmax
 * are es_attention_forward's own calls and arithmetic, so P is the forward's bit for bit. */
static void query_rows(const attention_grad_job *job, const head_view *x, int a, int b) {
    const int L = x->L, H = job->H, KV = job->KV, hd = job->hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float *probs = x->probs + (size_t)a * L, *dprobs = x->dprobs + (size_t)a * L; // (b - a, L)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, b - a, b, hd, 1.0f / sqrtf((float)hd), x->q + (size_t)a * H * hd,
                H * hd, x->k, KV * hd, 0.0f, probs, L);
    for (int t = a; t < b; t++) {
        float *row = probs + (size_t)(t - a) * L;
        float max_score = -INFINITY;
        for (int u = 0; u <= t; u++)
            if (row[u] > max_score) max_score = row[u];
        double total = 0;
        for (int u = 0; u <= t; u++) total += row[u] = expf(row[u] - max_score);
        const float inverse = (float)(1.0 / total);
        for (int u = 0; u <= t; u++) row[u] *= inverse;
        for (int u = t + 1; u < L; u++) row[u] = 0.0f; /* causal; key blocks read these zeros */
    }
    // dP = dO Vᵀ  (b - a, b)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, b - a, b, hd, 1.0f, x->dout + (size_t)a * H * hd, H * hd, x->v,
                KV * hd, 0.0f, dprobs, L);
    /* dS, row by row; zero above the diagonal, where P is zero */
    for (int t = a; t < b; t++) {
        const float *p = probs + (size_t)(t - a) * L;
        float *d = dprobs + (size_t)(t - a) * L;
        double dot = 0;
        for (int u = 0; u <= t; u++) dot += (double)p[u] * d[u];
        for (int u = 0; u <= t; u++) d[u] = p[u] * (float)(d[u] - dot);
        for (int u = t + 1; u < L; u++) d[u] = 0.0f;
    }
    // dQ = scale · dS K  (b - a, hd)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, b - a, hd, b, scale, dprobs, L, x->k, KV * hd, 0.0f,
                x->dq + (size_t)a * H * hd, H * hd);
}

/* Key rows [a, b) of dV and dK, from query rows [a, L); beta 0 writes, 1 adds. */
static void key_rows(const attention_grad_job *job, const head_view *x, int a, int b, float beta) {
    const int L = x->L, H = job->H, KV = job->KV, hd = job->hd;
    const float scale = 1.0f / sqrtf((float)hd);
    // dV += Pᵀ dO  (b - a, hd)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, b - a, hd, L - a, 1.0f, x->probs + (size_t)a * L + a, L,
                x->dout + (size_t)a * H * hd, H * hd, beta, x->dv + (size_t)a * KV * hd, KV * hd);
    // dK += scale · dSᵀ Q  (b - a, hd)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, b - a, hd, L - a, scale, x->dprobs + (size_t)a * L + a, L,
                x->q + (size_t)a * H * hd, H * hd, beta, x->dk + (size_t)a * KV * hd, KV * hd);
}

/* Small problems: one task per (sequence, kv head), its query heads in order, so dk and dv
 * of the kv head are summed in a fixed order by one thread. */
static void attend_backward(void *arg, size_t index, int worker) {
    attention_grad_job *job = arg;
    const int KV = job->KV, group = job->H / KV;
    const int s = (int)(index / (size_t)KV), kv = (int)(index % (size_t)KV);
    float *probs = job->scratch + (size_t)worker * 2 * job->longest * job->longest;
    for (int g = 0; g < group; g++) {
        const head_view x = view_of(job, s, kv * group + g, probs);
        if (x.L == 0) return;
        query_rows(job, &x, 0, x.L);
        key_rows(job, &x, 0, x.L, g ? 1.0f : 0.0f);
    }
}

/* Large problems: one (sequence, query head) at a time, its blocks of rows on the pool.
 * Later query blocks (and earlier key blocks) cost more; the order pairs a cheap block with
 * a dear one, so the pool's contiguous ranges get even work. */
enum { ROW_BLOCK = 128 };

static int paired_block(size_t index, int blocks) {
    return index % 2 ? blocks - 1 - (int)(index / 2) : (int)(index / 2);
}

static void query_block(void *arg, size_t index, int worker) {
    (void)worker;
    const attention_grad_job *job = arg;
    const head_view x = view_of(job, job->seq, job->h, job->scratch);
    const int a = paired_block(index, (x.L + ROW_BLOCK - 1) / ROW_BLOCK) * ROW_BLOCK;
    query_rows(job, &x, a, a + ROW_BLOCK < x.L ? a + ROW_BLOCK : x.L);
}

static void key_block(void *arg, size_t index, int worker) {
    (void)worker;
    const attention_grad_job *job = arg;
    const head_view x = view_of(job, job->seq, job->h, job->scratch);
    const int a = paired_block(index, (x.L + ROW_BLOCK - 1) / ROW_BLOCK) * ROW_BLOCK;
    key_rows(job, &x, a, a + ROW_BLOCK < x.L ? a + ROW_BLOCK : x.L, job->h % (job->H / job->KV) ? 1.0f : 0.0f);
}

/* The forward's threshold: below it (sequence, head) tasks, above it one at a time. */
#define SMALL_PRODUCT (1L << 24)

int es_attention_backward(es_pool *pool, float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                          const float *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd) {
    int longest = 0;
    for (int s = 0; s < n_seqs; s++)
        if (seq_start[s + 1] - seq_start[s] > longest) longest = seq_start[s + 1] - seq_start[s];
    if (!longest) return 0;
    const int small = (long)longest * longest * hd < SMALL_PRODUCT;
    const int workers = small && pool ? es_pool_threads(pool) : 1;
    attention_grad_job job = {dq, dk, dv, dout, q, k, v, seq_start, H, KV, hd, longest,
                              malloc((size_t)workers * 2 * longest * longest * sizeof(float)), 0, 0};
    if (!job.scratch) return -1;
    const int threads = blas_single();
    if (small) {
        for_each(pool, (size_t)n_seqs * KV, attend_backward, &job);
    } else {
        /* query heads grouped by kv head, in order: the first of each group writes dk, dv */
        for (job.seq = 0; job.seq < n_seqs; job.seq++) {
            const int L = seq_start[job.seq + 1] - seq_start[job.seq], blocks = (L + ROW_BLOCK - 1) / ROW_BLOCK;
            for (job.h = 0; job.h < H && L > 0; job.h++) {
                for_each(pool, (size_t)blocks, query_block, &job);
                for_each(pool, (size_t)blocks, key_block, &job);
            }
        }
    }
    blas_restore(threads);
    free(job.scratch);
    return 0;
}

/* ---- swiglu -------------------------------------------------------------------------- */

/* out = silu(g) u with silu(g) = g σ(g):  ∂out/∂u = silu(g),  ∂out/∂g = u σ(g) (1 + g (1 − σ(g))). */
void es_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, long n) {
    for (long i = 0; i < n; i++) {
        const float g = gate[i], sigmoid = 1.0f / (1.0f + expf(-g));
        dup[i] = dout[i] * (g / (1.0f + expf(-g))); /* silu exactly as the forward rounds it */
        dgate[i] = dout[i] * up[i] * sigmoid * (1.0f + g * (1.0f - sigmoid));
    }
}
