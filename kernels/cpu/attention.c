/* Causal attention on the CPU, forward and backward (kernels/ops.h), as matrix products per
 * sequence and head. K and V of the shared key/value head are read in place through their row
 * stride, so GQA costs no copies. A sequence's result depends only on that sequence: its work
 * is cut into blocks of query rows counted from its own first token. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

/* ---- forward ------------------------------------------------------------------------------- */

/* One task per (sequence, query head, block of QUERY_BLOCK query rows): the block's scores
 * against the keys it may see, a softmax per row, then its rows of P V. */
enum { QUERY_BLOCK = 128 };

typedef struct attention_job {
    float *out;
    const float *q, *k, *v;   /* k, v: the batch's rows, or the cache's (slots, max_seq) rows */
    const int32_t *seq_start;
    const int32_t *past, *slot; /* NULL, or (n_seqs) each: the cached tokens before the batch's, and where they are */
    int n_seqs, H, KV, hd, longest, max_seq; /* longest: of the keys a sequence's last token sees */
    int *block_start;     /* (n_seqs + 1): the first task of each sequence, over its blocks and heads */
    float *scores;        /* (workers, QUERY_BLOCK, longest) */
} attention_job;

static int blocks_of(int length) { return (length + QUERY_BLOCK - 1) / QUERY_BLOCK; }

static void softmax_causal_rows(float *scores, int rows, int first_row, int width, int stride) {
    for (int i = 0; i < rows; i++) {
        float *row = scores + (size_t)i * stride;
        const int last = first_row + i; /* the row's own position: keys 0..last */
        float max_score = -INFINITY;
        for (int u = 0; u <= last; u++)
            if (row[u] > max_score) max_score = row[u];
        double total = 0;
        for (int u = 0; u <= last; u++) total += row[u] = expf(row[u] - max_score);
        const float inverse = (float)(1.0 / total);
        for (int u = 0; u <= last; u++) row[u] *= inverse;
        for (int u = last + 1; u < width; u++) row[u] = 0.0f;
    }
}

static void attend_block(void *arg, size_t task, int worker) {
    const attention_job *job = arg;
    const int H = job->H, KV = job->KV, hd = job->hd;
    int s = 0; /* the sequence of this task: the last whose first task is <= task (never an empty one) */
    for (int high = job->n_seqs - 1; s < high;) {
        const int mid = (s + high + 1) / 2;
        if (job->block_start[mid] <= (int)task) s = mid;
        else high = mid - 1;
    }
    const int first = job->seq_start[s], L = job->seq_start[s + 1] - first, blocks = blocks_of(L);
    const int local = (int)task - job->block_start[s], h = local / blocks, a = (local % blocks) * QUERY_BLOCK;
    /* with a cache, the sequence's token i sits at position past + i and its keys start at its slot's row 0 */
    const int past = job->past ? job->past[s] : 0;
    const size_t key_row0 = job->past ? (size_t)job->slot[s] * (size_t)job->max_seq : (size_t)first;
    const int rows = L - a < QUERY_BLOCK ? L - a : QUERY_BLOCK, keys = past + a + rows, kv = h / (H / KV);
    float *scores = job->scores + (size_t)worker * QUERY_BLOCK * job->longest; // (rows, keys), row stride `keys`
    const float *q_rows = job->q + ((size_t)(first + a) * H + h) * hd;        // (rows, hd), row stride H*hd
    const float *k_h = job->k + (key_row0 * KV + kv) * hd;                    // (keys, hd), row stride KV*hd
    const float *v_h = job->v + (key_row0 * KV + kv) * hd;                    // (keys, hd), row stride KV*hd
    float *out_rows = job->out + ((size_t)(first + a) * H + h) * hd;          // (rows, hd), row stride H*hd
    cpu_sgemm(0, 1, rows, keys, hd, 1.0f / sqrtf((float)hd), q_rows, H * hd, k_h, KV * hd, 0.0f, scores, keys);
    softmax_causal_rows(scores, rows, past + a, keys, keys);
    cpu_sgemm(0, 0, rows, hd, keys, 1.0f, scores, keys, v_h, KV * hd, 0.0f, out_rows, H * hd);
}

static int longest_of(const int32_t *seq_start, int n_seqs) {
    int longest = 0;
    for (int s = 0; s < n_seqs; s++)
        if (seq_start[s + 1] - seq_start[s] > longest) longest = seq_start[s + 1] - seq_start[s];
    return longest;
}

static size_t forward_workspace(int workers, int longest, int n_seqs) {
    return (size_t)workers * QUERY_BLOCK * (size_t)longest * sizeof(float) + ((size_t)n_seqs + 1) * sizeof(int) + 64;
}

/* The blocks of every sequence and head, over the keys in k and v (the batch's, or a cache's). */
static int attend(es_device *dev, attention_job *job) {
    const int n_seqs = job->n_seqs;
    char *scratch = es_device_scratch(dev, forward_workspace(cpu_workers(dev), job->longest, n_seqs));
    if (!scratch) return ES_ERR_RUNTIME;
    job->block_start = (int *)scratch;
    job->scores = (float *)(scratch + (((size_t)n_seqs + 1) * sizeof(int) + 63) / 64 * 64);
    job->block_start[0] = 0;
    for (int s = 0; s < n_seqs; s++)
        job->block_start[s + 1] = job->block_start[s] + job->H * blocks_of(job->seq_start[s + 1] - job->seq_start[s]);
    cpu_for(dev, (size_t)job->block_start[n_seqs], attend_block, job);
    return 0;
}

int cpu_attention_forward(es_device *dev, float *out, const float *q, const float *k, const float *v, const int32_t *seq_start,
                          int n_seqs, int H, int KV, int hd) {
    const int longest = longest_of(seq_start, n_seqs);
    if (!longest) return 0;
    attention_job job = {out, q, k, v, seq_start, NULL, NULL, n_seqs, H, KV, hd, longest, 0, NULL, NULL};
    return attend(dev, &job);
}

int cpu_attention_cached_forward(es_device *dev, float *out, float *k_cache, float *v_cache, const float *q, const float *k,
                                 const float *v, const int32_t *seq_start, const int32_t *past, const int32_t *slot, int n_seqs,
                                 int max_seq, int H, int KV, int hd) {
    const size_t row = (size_t)KV * hd;
    int longest = 0;
    for (int s = 0; s < n_seqs; s++) {
        const int L = seq_start[s + 1] - seq_start[s];
        float *k_rows = k_cache + ((size_t)slot[s] * max_seq + past[s]) * row; // (L, KV, hd)
        float *v_rows = v_cache + ((size_t)slot[s] * max_seq + past[s]) * row;
        if (L) memcpy(k_rows, k + (size_t)seq_start[s] * row, (size_t)L * row * sizeof(float));
        if (L) memcpy(v_rows, v + (size_t)seq_start[s] * row, (size_t)L * row * sizeof(float));
        if (L && past[s] + L > longest) longest = past[s] + L;
    }
    if (!longest) return 0;
    attention_job job = {out, q, k_cache, v_cache, seq_start, past, slot, n_seqs, H, KV, hd, longest, max_seq, NULL, NULL};
    return attend(dev, &job);
}

/* ---- backward ------------------------------------------------------------------------------ */

/* Per (sequence, query head h, kv head kv = h / (H / KV)), with P = softmax(scale Q Kᵀ) causal:
 *   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(dP ∘ P)),  dQ = scale dS K,  dK = scale dSᵀ Q,
 * dK and dV summed over the query heads of kv in head order. Query rows [a, b) need only
 * keys [0, b) and give P, dS and dQ of those rows; key rows [a, b) of dK and dV need only query
 * rows [a, L) of P and dS. Small problems run one task per (sequence, kv head); large ones one
 * (sequence, query head) at a time with its blocks of rows side by side. */
typedef struct attention_grad_job {
    float *dq, *dk, *dv;
    const float *dout, *q, *k, *v;
    const int32_t *seq_start;
    int H, KV, hd, longest;
    float *scratch; /* (workers, 2, longest, longest): P and dP/dS */
    int seq, h;     /* the large path's current (sequence, query head) */
} attention_grad_job;

/* (L, hd) matrices of one (sequence, query head) and its kv head, read through their strides. */
typedef struct head_view {
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

/* Query rows [a, b): P (recomputed), dS, dQ. */
static void query_rows(const attention_grad_job *job, const head_view *x, int a, int b) {
    const int L = x->L, H = job->H, KV = job->KV, hd = job->hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float *probs = x->probs + (size_t)a * L, *dprobs = x->dprobs + (size_t)a * L; // (b - a, L)
    cpu_sgemm(0, 1, b - a, b, hd, scale, x->q + (size_t)a * H * hd, H * hd, x->k, KV * hd, 0.0f, probs, L);
    softmax_causal_rows(probs, b - a, a, L, L); /* zeros up to L: key blocks read them */
    // dP = dO Vᵀ  (b - a, b)
    cpu_sgemm(0, 1, b - a, b, hd, 1.0f, x->dout + (size_t)a * H * hd, H * hd, x->v, KV * hd, 0.0f, dprobs, L);
    for (int t = a; t < b; t++) { /* dS; zero above the diagonal, where P is zero */
        const float *p = probs + (size_t)(t - a) * L;
        float *d = dprobs + (size_t)(t - a) * L;
        double dot = 0;
        for (int u = 0; u <= t; u++) dot += (double)p[u] * d[u];
        for (int u = 0; u <= t; u++) d[u] = p[u] * (float)(d[u] - dot);
        for (int u = t + 1; u < L; u++) d[u] = 0.0f;
    }
    // dQ = scale · dS K  (b - a, hd)
    cpu_sgemm(0, 0, b - a, hd, b, scale, dprobs, L, x->k, KV * hd, 0.0f, x->dq + (size_t)a * H * hd, H * hd);
}

/* Key rows [a, b) of dV and dK, from query rows [a, L); beta 0 writes, 1 adds. */
static void key_rows(const attention_grad_job *job, const head_view *x, int a, int b, float beta) {
    const int L = x->L, H = job->H, KV = job->KV, hd = job->hd;
    const float scale = 1.0f / sqrtf((float)hd);
    // dV += Pᵀ dO  (b - a, hd)
    cpu_sgemm(1, 0, b - a, hd, L - a, 1.0f, x->probs + (size_t)a * L + a, L, x->dout + (size_t)a * H * hd, H * hd, beta,
              x->dv + (size_t)a * KV * hd, KV * hd);
    // dK += scale · dSᵀ Q  (b - a, hd)
    cpu_sgemm(1, 0, b - a, hd, L - a, scale, x->dprobs + (size_t)a * L + a, L, x->q + (size_t)a * H * hd, H * hd, beta,
              x->dk + (size_t)a * KV * hd, KV * hd);
}

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

/* Later query blocks (and earlier key blocks) cost more; pairing a cheap block with a dear one
 * evens out the work. */
enum { ROW_BLOCK = 128 };

static int paired_block(size_t index, int blocks) { return index % 2 ? blocks - 1 - (int)(index / 2) : (int)(index / 2); }

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

/* Above this many multiply-adds per (sequence, head) the large path runs. */
#define SMALL_PROBLEM (1L << 24)

static int is_small(int longest, int hd) { return (long)longest * longest * hd < SMALL_PROBLEM; }

static size_t backward_workspace(int workers, int longest, int hd) {
    return (size_t)(is_small(longest, hd) ? workers : 1) * 2 * (size_t)longest * longest * sizeof(float);
}

size_t cpu_attention_workspace(const es_device *dev, const es_workspace_plan *plan) {
    if (!plan->longest) return 0;
    size_t bytes = forward_workspace(cpu_workers(dev), plan->longest, plan->tokens);
    if (plan->train) {
        size_t backward = backward_workspace(cpu_workers(dev), plan->longest, plan->head_dim);
        bytes = backward > bytes ? backward : bytes;
    }
    return bytes;
}

int cpu_attention_backward(es_device *dev, float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                           const float *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd) {
    const int longest = longest_of(seq_start, n_seqs);
    if (!longest) return 0;
    float *scratch = es_device_scratch(dev, backward_workspace(cpu_workers(dev), longest, hd));
    if (!scratch) return ES_ERR_RUNTIME;
    attention_grad_job job = {dq, dk, dv, dout, q, k, v, seq_start, H, KV, hd, longest, scratch, 0, 0};
    if (is_small(longest, hd)) {
        cpu_for(dev, (size_t)n_seqs * KV, attend_backward, &job);
        return 0;
    }
    /* query heads grouped by kv head, in order: the first of each group writes dk, dv */
    for (job.seq = 0; job.seq < n_seqs; job.seq++) {
        const int L = seq_start[job.seq + 1] - seq_start[job.seq], blocks = (L + ROW_BLOCK - 1) / ROW_BLOCK;
        for (job.h = 0; job.h < H && L > 0; job.h++) {
            cpu_for(dev, (size_t)blocks, query_block, &job);
            cpu_for(dev, (size_t)blocks, key_block, &job);
        }
    }
    return 0;
}
