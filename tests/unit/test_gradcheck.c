/* Finite-difference gradient checks of every backward op (kernels/ops_backward.h) and both
 * loss terms (align/loss.h).
 *
 * For each op: a scalar L = Σ R ∘ out with a fixed random R (the loss terms are scalars
 * already), the analytic gradients from the fp32 backward, and central differences of L
 * computed by a double-precision reference forward written here. The reference is first
 * compared with the fp32 forward, so it is the function the backward must differentiate;
 * the differences are then accurate to ~1e-9 and the tolerance can be tight (1e-4, fp32
 * rounding of the analytic side). Parameter gradients start from non-zero values to check
 * they are accumulated; activation gradients start as NaN to check every value is written.
 * Shapes are cut to reach every tile and chunk boundary of the ops; the results must also be
 * the same bits with any pool size, without a pool, and with any OpenBLAS thread count. */
#include <math.h>
#include <stdint.h>

#include <cblas.h>

#include "../testlib.h"
#include "ops.h"
#include "test_device.h"

/* CPU devices of 1, 2 and 3 threads: every result must be the same bits on each. */
static es_device *dev1, *dev2, *dev3;

/* The latent MSE op's loss as a value (NaN when the op fails). */
static double latent_mse_on(es_device *dev, float *dh, float *dhead, double *cosine_sum, const float *h, const float *target,
                            const uint8_t *mask, const float *head, int T, int C, float eps, float scale) {
    double loss;
    return es_latent_mse(dev, &loss, cosine_sum, dh, dhead, h, target, mask, head, T, C, eps, scale) ? NAN : loss;
}

#define TOLERANCE 1e-4

static double worst_error; /* over every check, reported at the end */

/* ---- helpers --------------------------------------------------------------------------- */

static uint64_t rng_state = 12345;
static double uniform(void) { /* in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) / 4503599627370496.0 - 1.0;
}
static void fill(float *x, size_t n, double amplitude, double offset) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(offset + amplitude * uniform());
}
static void fill_value(float *x, size_t n, float value) {
    for (size_t i = 0; i < n; i++) x[i] = value;
}
static double *to_double(const float *x, size_t n) {
    double *out = malloc(n * sizeof *out);
    for (size_t i = 0; i < n; i++) out[i] = x[i];
    return out;
}

/* max |a - b| / max |b|, NaN counting as infinitely wrong */
static double relative_error(const float *a, const double *b, size_t n) {
    double max_diff = 0, max_ref = 0;
    for (size_t i = 0; i < n; i++) {
        double diff = fabs((double)a[i] - b[i]);
        if (isnan(diff)) diff = INFINITY;
        if (diff > max_diff) max_diff = diff;
        if (fabs(b[i]) > max_ref) max_ref = fabs(b[i]);
    }
    return max_ref > 0 ? max_diff / max_ref : max_diff;
}

/* The reference loss as a function of a context holding double copies of the inputs. */
typedef double (*loss_fn)(void *ctx);

/* Central differences of f with respect to param[i] against analytic[i] / divide (minus
 * base[i], the value an accumulated gradient started from, when base is not NULL), for i in
 * [0, n) or, when picks is not NULL, for i in picks[0..n). Returns
 * max |analytic − numeric| / max |numeric|. */
static double gradient_error_at(loss_fn f, void *ctx, double *param, const size_t *picks, size_t n, const float *analytic,
                                const double *base, double divide) {
    double max_diff = 0, max_ref = 0;
    for (size_t pick = 0; pick < n; pick++) {
        const size_t i = picks ? picks[pick] : pick;
        const double saved = param[i], step = 1e-5 * fmax(1.0, fabs(saved));
        const double up_x = saved + step, down_x = saved - step;
        param[i] = up_x;
        const double up = f(ctx);
        param[i] = down_x;
        const double down = f(ctx);
        param[i] = saved;
        const double numeric = (up - down) / (up_x - down_x);
        const double ours = ((double)analytic[i] - (base ? base[i] : 0.0)) / divide;
        double diff = fabs(ours - numeric);
        if (isnan(diff)) diff = INFINITY;
        if (diff > max_diff) max_diff = diff;
        if (fabs(numeric) > max_ref) max_ref = fabs(numeric);
    }
    const double error = max_ref > 0 ? max_diff / max_ref : max_diff;
    if (error > worst_error) worst_error = error;
    return error;
}

static double gradient_error(loss_fn f, void *ctx, double *param, size_t n, const float *analytic, const double *base,
                             double divide) {
    return gradient_error_at(f, ctx, param, NULL, n, analytic, base, divide);
}

/* prints every error measured (indented: the test runner counts only PASS/FAIL/SKIP lines) */
#define CHECK_GRAD(what, error)                                                            \
    do {                                                                                   \
        double e_ = (error);                                                               \
        printf("  %s %s: normalised error %.2g\n", tl_name, what, e_);                     \
        CHECKF(e_ <= TOLERANCE, "%s: normalised error %.3g", what, e_);                    \
    } while (0)

static double dot(const double *a, const double *b, size_t n) {
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* ---- matmul ---------------------------------------------------------------------------- */

typedef struct {
    double *in, *weight, *bias, *R, *out;
    int T, C, OC;
} matmul_ref;

static void matmul_ref_forward(matmul_ref *m) {
    for (int t = 0; t < m->T; t++)
        for (int o = 0; o < m->OC; o++) {
            double sum = m->bias ? m->bias[o] : 0.0;
            for (int c = 0; c < m->C; c++) sum += m->in[t * m->C + c] * m->weight[o * m->C + c];
            m->out[t * m->OC + o] = sum;
        }
}
static double matmul_ref_loss(void *ctx) {
    matmul_ref *m = ctx;
    matmul_ref_forward(m);
    return dot(m->R, m->out, (size_t)m->T * m->OC);
}

static void check_matmul(const char *tl_name, int T, int C, int OC, int with_bias) {
    float *in = malloc(sizeof(float) * T * C), *weight = malloc(sizeof(float) * OC * C), *bias = malloc(sizeof(float) * OC);
    float *R = malloc(sizeof(float) * T * OC), *out = malloc(sizeof(float) * T * OC);
    float *din = malloc(sizeof(float) * T * C), *dweight = malloc(sizeof(float) * OC * C);
    float *dbias = malloc(sizeof(float) * OC), *base_w = malloc(sizeof(float) * OC * C), *base_b = malloc(sizeof(float) * OC);
    fill(in, (size_t)T * C, 1, 0), fill(weight, (size_t)OC * C, 0.5, 0), fill(bias, OC, 1, 0), fill(R, (size_t)T * OC, 1, 0);
    fill(base_w, (size_t)OC * C, 1, 0), fill(base_b, OC, 1, 0);
    matmul_ref m = {to_double(in, (size_t)T * C), to_double(weight, (size_t)OC * C), with_bias ? to_double(bias, OC) : NULL,
                    to_double(R, (size_t)T * OC), malloc(sizeof(double) * T * OC), T, C, OC};
    REQUIRE(es_matmul_forward(dev1, out, in, weight, with_bias ? bias : NULL, T, C, OC) == 0);
    matmul_ref_forward(&m);
    CHECKF(relative_error(out, m.out, (size_t)T * OC) < 1e-5, "reference forward differs");

    es_device *pool = dev2;
    REQUIRE(pool);
    fill_value(din, (size_t)T * C, NAN);
    memcpy(dweight, base_w, sizeof(float) * OC * C), memcpy(dbias, base_b, sizeof(float) * OC);
    REQUIRE(es_matmul_backward(pool, din, dweight, with_bias ? dbias : NULL, R, in, weight, T, C, OC) == 0);
    double *bw = to_double(base_w, (size_t)OC * C), *bb = to_double(base_b, OC);
    CHECK_GRAD("din", gradient_error(matmul_ref_loss, &m, m.in, (size_t)T * C, din, NULL, 1));
    CHECK_GRAD("dweight", gradient_error(matmul_ref_loss, &m, m.weight, (size_t)OC * C, dweight, bw, 1));
    if (with_bias) CHECK_GRAD("dbias", gradient_error(matmul_ref_loss, &m, m.bias, OC, dbias, bb, 1));
    else CHECK(memcmp(dbias, base_b, sizeof(float) * OC) == 0);

    /* the same bits without a pool, with another pool size, and with din not wanted */
    float *din2 = malloc(sizeof(float) * T * C), *dweight2 = malloc(sizeof(float) * OC * C), *dbias2 = malloc(sizeof(float) * OC);
    es_device *pool3 = dev3;
    REQUIRE(pool3);
    for (int variant = 0; variant < 3; variant++) {
        memcpy(dweight2, base_w, sizeof(float) * OC * C), memcpy(dbias2, base_b, sizeof(float) * OC);
        fill_value(din2, (size_t)T * C, NAN);
        es_device *use = variant == 0 ? dev1 : pool3;
        REQUIRE(es_matmul_backward(use, variant == 2 ? NULL : din2, dweight2, with_bias ? dbias2 : NULL, R, in, weight, T, C,
                                   OC) == 0);
        if (variant < 2) CHECKF(memcmp(din, din2, sizeof(float) * T * C) == 0, "din differs in variant %d", variant);
        else CHECK(isnan(din2[0]));
        CHECKF(memcmp(dweight, dweight2, sizeof(float) * OC * C) == 0, "dweight differs in variant %d", variant);
        CHECKF(memcmp(dbias, dbias2, sizeof(float) * OC) == 0, "dbias differs in variant %d", variant);
    }
    
    free(in), free(weight), free(bias), free(R), free(out), free(din), free(dweight), free(dbias), free(base_w), free(base_b);
    free(din2), free(dweight2), free(dbias2), free(bw), free(bb);
    free(m.in), free(m.weight), free(m.bias), free(m.R), free(m.out);
}

TEST(matmul_with_bias) { check_matmul(tl_name, 5, 7, 6, 1); }
TEST(matmul_without_bias) { check_matmul(tl_name, 4, 3, 9, 0); }
/* more rows and outputs than one tile of the backward's products */
TEST(matmul_several_tiles) { check_matmul(tl_name, 131, 3, 133, 1); }

/* ---- rmsnorm --------------------------------------------------------------------------- */

typedef struct {
    double *in, *weight, *R, *out;
    int T, C;
    double eps;
} rmsnorm_ref;

static void rmsnorm_ref_forward(rmsnorm_ref *m) {
    for (int t = 0; t < m->T; t++) {
        const double *x = m->in + (size_t)t * m->C;
        double sum_sq = 0;
        for (int c = 0; c < m->C; c++) sum_sq += x[c] * x[c];
        const double r = 1.0 / sqrt(sum_sq / m->C + m->eps);
        for (int c = 0; c < m->C; c++) m->out[(size_t)t * m->C + c] = x[c] * r * m->weight[c];
    }
}
static double rmsnorm_ref_loss(void *ctx) {
    rmsnorm_ref *m = ctx;
    rmsnorm_ref_forward(m);
    return dot(m->R, m->out, (size_t)m->T * m->C);
}

static void check_rmsnorm(const char *tl_name, int T, int C, float eps) {
    const size_t n = (size_t)T * C;
    float *in = malloc(sizeof(float) * n), *weight = malloc(sizeof(float) * C), *R = malloc(sizeof(float) * n);
    float *out = malloc(sizeof(float) * n), *din = malloc(sizeof(float) * n), *dweight = malloc(sizeof(float) * C);
    float *base = malloc(sizeof(float) * C);
    fill(in, n, 1.5, 0.2), fill(weight, C, 0.5, 1.0), fill(R, n, 1, 0), fill(base, C, 1, 0);
    for (int c = 0; c < C; c++) in[c] *= 0.05f; /* a small row, where eps matters */
    rmsnorm_ref m = {to_double(in, n), to_double(weight, C), to_double(R, n), malloc(sizeof(double) * n), T, C, eps};
    es_rmsnorm_forward(dev1, out, in, weight, T, C, eps);
    rmsnorm_ref_forward(&m);
    CHECKF(relative_error(out, m.out, n) < 1e-5, "reference forward differs");
    fill_value(din, n, NAN);
    memcpy(dweight, base, sizeof(float) * C);
    es_rmsnorm_backward(dev1, din, dweight, R, in, weight, T, C, eps);
    double *based = to_double(base, C);
    CHECK_GRAD("din", gradient_error(rmsnorm_ref_loss, &m, m.in, n, din, NULL, 1));
    CHECK_GRAD("dweight", gradient_error(rmsnorm_ref_loss, &m, m.weight, C, dweight, based, 1));
    free(in), free(weight), free(R), free(out), free(din), free(dweight), free(base), free(based);
    free(m.in), free(m.weight), free(m.R), free(m.out);
}

TEST(rmsnorm) { check_rmsnorm(tl_name, 5, 8, 1e-6f); }
/* more tokens than one of dweight's blocks, and an eps large enough to matter everywhere */
TEST(rmsnorm_many_tokens_large_eps) { check_rmsnorm(tl_name, 70, 6, 0.3f); }

/* ---- rope ------------------------------------------------------------------------------ */

typedef struct {
    double *x, *R, *out;
    const int32_t *positions;
    const double *inv_freq;
    int T, n_heads, hd;
} rope_ref;

static double rope_ref_loss(void *ctx) {
    rope_ref *m = ctx;
    const int half = m->hd / 2;
    for (int t = 0; t < m->T; t++)
        for (int h = 0; h < m->n_heads; h++)
            for (int i = 0; i < half; i++) {
                const double angle = m->positions[t] * m->inv_freq[i];
                const size_t at = ((size_t)t * m->n_heads + h) * m->hd + i;
                const double a = m->x[at], b = m->x[at + half];
                m->out[at] = a * cos(angle) - b * sin(angle);
                m->out[at + half] = b * cos(angle) + a * sin(angle);
            }
    return dot(m->R, m->out, (size_t)m->T * m->n_heads * m->hd);
}

TEST(rope) {
    enum { T = 6, NH = 3, HD = 8 };
    const size_t n = (size_t)T * NH * HD;
    const int32_t positions[T] = {0, 1, 7, 3, 100, 4095};
    double inv_freq[HD / 2];
    for (int i = 0; i < HD / 2; i++) inv_freq[i] = pow(10000.0, -2.0 * i / HD);
    float x[T * NH * HD], R[T * NH * HD], out[T * NH * HD];
    fill(x, n, 1, 0), fill(R, n, 1, 0);
    rope_ref m = {to_double(x, n), to_double(R, n), malloc(sizeof(double) * n), positions, inv_freq, T, NH, HD};
    memcpy(out, x, sizeof x);
    es_rope_forward(dev1, out, positions, inv_freq, T, NH, HD);
    rope_ref_loss(&m);
    CHECKF(relative_error(out, m.out, n) < 1e-5, "reference forward differs");
    float dx[T * NH * HD];
    memcpy(dx, R, sizeof dx);
    es_rope_backward(dev1, dx, positions, inv_freq, T, NH, HD);
    CHECK_GRAD("dx", gradient_error(rope_ref_loss, &m, m.x, n, dx, NULL, 1));
    free(m.x), free(m.R), free(m.out);
}

/* ---- attention ------------------------------------------------------------------------- */

typedef struct {
    double *q, *k, *v, *R, *out;
    const int32_t *seq_start;
    int n_seqs, H, KV, hd;
} attention_ref;

static double attention_ref_loss(void *ctx) {
    attention_ref *m = ctx;
    const int H = m->H, KV = m->KV, hd = m->hd;
    double scores[64]; /* sequences of up to 64 tokens */
    for (int s = 0; s < m->n_seqs; s++)
        for (int h = 0; h < H; h++) {
            const int kv = h / (H / KV);
            for (int t = m->seq_start[s]; t < m->seq_start[s + 1]; t++) {
                const int first = m->seq_start[s], n = t - first + 1;
                double max_score = -INFINITY, total = 0;
                for (int u = 0; u < n; u++) {
                    scores[u] = dot(m->q + ((size_t)t * H + h) * hd, m->k + ((size_t)(first + u) * KV + kv) * hd, hd) / sqrt(hd);
                    max_score = fmax(max_score, scores[u]);
                }
                for (int u = 0; u < n; u++) total += scores[u] = exp(scores[u] - max_score);
                double *o = m->out + ((size_t)t * H + h) * hd;
                for (int d = 0; d < hd; d++) {
                    double sum = 0;
                    for (int u = 0; u < n; u++) sum += scores[u] * m->v[((size_t)(first + u) * KV + kv) * hd + d];
                    o[d] = sum / total;
                }
            }
        }
    return dot(m->R, m->out, (size_t)m->seq_start[m->n_seqs] * H * hd);
}

TEST(attention_gqa_three_sequences) {
    enum { H = 4, KV = 2, HD = 8, S = 3, T = 13 };
    const int32_t seq_start[S + 1] = {0, 5, 6, 13}; /* lengths 5, 1, 7 */
    const size_t nq = (size_t)T * H * HD, nk = (size_t)T * KV * HD;
    float *q = malloc(sizeof(float) * nq), *k = malloc(sizeof(float) * nk), *v = malloc(sizeof(float) * nk);
    float *R = malloc(sizeof(float) * nq), *out = malloc(sizeof(float) * nq);
    float *dq = malloc(sizeof(float) * nq), *dk = malloc(sizeof(float) * nk), *dv = malloc(sizeof(float) * nk);
    /* scores of a few units: softmax far from uniform and far from one-hot */
    fill(q, nq, 1.2, 0), fill(k, nk, 1.2, 0), fill(v, nk, 1, 0), fill(R, nq, 1, 0);
    attention_ref m = {to_double(q, nq), to_double(k, nk), to_double(v, nk), to_double(R, nq), malloc(sizeof(double) * nq),
                       seq_start, S, H, KV, HD};
    es_device *pool = dev2;
    REQUIRE(pool);
    REQUIRE(es_attention_forward(pool, out, q, k, v, seq_start, S, H, KV, HD) == 0);
    attention_ref_loss(&m);
    CHECKF(relative_error(out, m.out, nq) < 1e-5, "reference forward differs");
    fill_value(dq, nq, NAN), fill_value(dk, nk, NAN), fill_value(dv, nk, NAN);
    REQUIRE(es_attention_backward(pool, dq, dk, dv, R, q, k, v, seq_start, S, H, KV, HD) == 0);
    CHECK_GRAD("dq", gradient_error(attention_ref_loss, &m, m.q, nq, dq, NULL, 1));
    CHECK_GRAD("dk", gradient_error(attention_ref_loss, &m, m.k, nk, dk, NULL, 1));
    CHECK_GRAD("dv", gradient_error(attention_ref_loss, &m, m.v, nk, dv, NULL, 1));
    /* the same bits without a pool and with another pool size */
    float *dq2 = malloc(sizeof(float) * nq), *dk2 = malloc(sizeof(float) * nk), *dv2 = malloc(sizeof(float) * nk);
    es_device *pool3 = dev3;
    REQUIRE(pool3);
    for (int variant = 0; variant < 2; variant++) {
        REQUIRE(es_attention_backward(variant ? pool3 : dev1, dq2, dk2, dv2, R, q, k, v, seq_start, S, H, KV, HD) == 0);
        CHECKF(memcmp(dq, dq2, sizeof(float) * nq) == 0 && memcmp(dk, dk2, sizeof(float) * nk) == 0 &&
                   memcmp(dv, dv2, sizeof(float) * nk) == 0,
               "gradients differ in variant %d", variant);
    }
    
    free(q), free(k), free(v), free(R), free(out), free(dq), free(dk), free(dv), free(dq2), free(dk2), free(dv2);
    free(m.q), free(m.k), free(m.v), free(m.R), free(m.out);
}

/* A sequence long enough for the op's large-problem path (one head at a time, blocks of rows
 * on the pool): finite differences would be slow, so the gradients are compared with the
 * formulas the test above verified, evaluated in double. */
static void attention_ref_backward(double *dq, double *dk, double *dv, const attention_ref *m) {
    const int H = m->H, KV = m->KV, hd = m->hd, T = m->seq_start[m->n_seqs];
    const double scale = 1.0 / sqrt(hd);
    memset(dk, 0, sizeof(double) * T * KV * hd), memset(dv, 0, sizeof(double) * T * KV * hd);
    int longest = 0;
    for (int s = 0; s < m->n_seqs; s++)
        if (m->seq_start[s + 1] - m->seq_start[s] > longest) longest = m->seq_start[s + 1] - m->seq_start[s];
    double *p = malloc(sizeof(double) * longest), *ds = malloc(sizeof(double) * longest);
    for (int s = 0; s < m->n_seqs; s++)
        for (int h = 0; h < H; h++) {
            const int kv = h / (H / KV), first = m->seq_start[s];
#define ROW(x, t, heads, head) ((x) + ((size_t)(t) * (heads) + (head)) * hd)
            for (int t = first; t < m->seq_start[s + 1]; t++) {
                const int n = t - first + 1;
                double max_score = -INFINITY, total = 0, dp_dot_p = 0;
                for (int u = 0; u < n; u++) {
                    p[u] = dot(ROW(m->q, t, H, h), ROW(m->k, first + u, KV, kv), hd) * scale;
                    max_score = fmax(max_score, p[u]);
                }
                for (int u = 0; u < n; u++) total += p[u] = exp(p[u] - max_score);
                for (int u = 0; u < n; u++) {
                    p[u] /= total;
                    ds[u] = dot(ROW(m->R, t, H, h), ROW(m->v, first + u, KV, kv), hd); /* dP */
                    dp_dot_p += ds[u] * p[u];
                }
                double *dq_t = ROW(dq, t, H, h);
                memset(dq_t, 0, sizeof(double) * hd);
                for (int u = 0; u < n; u++) {
                    ds[u] = p[u] * (ds[u] - dp_dot_p);
                    for (int d = 0; d < hd; d++) {
                        dq_t[d] += scale * ds[u] * ROW(m->k, first + u, KV, kv)[d];
                        ROW(dk, first + u, KV, kv)[d] += scale * ds[u] * ROW(m->q, t, H, h)[d];
                        ROW(dv, first + u, KV, kv)[d] += p[u] * ROW(m->R, t, H, h)[d];
                    }
                }
            }
#undef ROW
        }
    free(p), free(ds);
}

TEST(attention_long_sequence_row_blocks) {
    enum { H = 4, KV = 2, HD = 64, S = 3, T = 610 };
    const int32_t seq_start[S + 1] = {0, 530, 540, 610}; /* 530² · 64 is past the one-task-per-head limit */
    const size_t nq = (size_t)T * H * HD, nk = (size_t)T * KV * HD;
    float *q = malloc(sizeof(float) * nq), *k = malloc(sizeof(float) * nk), *v = malloc(sizeof(float) * nk);
    float *R = malloc(sizeof(float) * nq), *grads[3][3];
    fill(q, nq, 0.4, 0), fill(k, nk, 0.4, 0), fill(v, nk, 1, 0), fill(R, nq, 1, 0);
    attention_ref m = {to_double(q, nq), to_double(k, nk), to_double(v, nk), to_double(R, nq), NULL, seq_start, S, H, KV, HD};
    double *dq = malloc(sizeof(double) * nq), *dk = malloc(sizeof(double) * nk), *dv = malloc(sizeof(double) * nk);
    attention_ref_backward(dq, dk, dv, &m);
    es_device *pool = dev2, *pool3 = dev3;
    REQUIRE(pool && pool3);
    /* on devices of 2, 1 and 3 threads */
    for (int variant = 0; variant < 3; variant++) {
        for (int g = 0; g < 3; g++) grads[variant][g] = malloc(sizeof(float) * (g ? nk : nq));
        fill_value(grads[variant][0], nq, NAN), fill_value(grads[variant][1], nk, NAN), fill_value(grads[variant][2], nk, NAN);
        REQUIRE(es_attention_backward(variant == 0 ? pool : variant == 1 ? dev1 : pool3, grads[variant][0], grads[variant][1],
                                      grads[variant][2], R, q, k, v, seq_start, S, H, KV, HD) == 0);
    }
    const double errors[3] = {relative_error(grads[0][0], dq, nq), relative_error(grads[0][1], dk, nk),
                              relative_error(grads[0][2], dv, nk)};
    const char *names[3] = {"dq", "dk", "dv"};
    for (int g = 0; g < 3; g++) {
        printf("  %s %s (against double formulas): normalised error %.2g\n", tl_name, names[g], errors[g]);
        if (errors[g] > worst_error) worst_error = errors[g];
        CHECKF(errors[g] <= TOLERANCE, "%s: normalised error %.3g", names[g], errors[g]);
        for (int variant = 1; variant < 3; variant++)
            CHECKF(memcmp(grads[0][g], grads[variant][g], sizeof(float) * (g ? nk : nq)) == 0, "%s differs in variant %d",
                   names[g], variant);
    }
    
    for (int variant = 0; variant < 3; variant++)
        for (int g = 0; g < 3; g++) free(grads[variant][g]);
    free(q), free(k), free(v), free(R), free(dq), free(dk), free(dv), free(m.q), free(m.k), free(m.v), free(m.R);
}

/* ---- swiglu, embedding ----------------------------------------------------------------- */

typedef struct {
    double *gate, *up, *R;
    long n;
} swiglu_ref;

static double swiglu_ref_loss(void *ctx) {
    swiglu_ref *m = ctx;
    double sum = 0;
    for (long i = 0; i < m->n; i++) sum += m->R[i] * m->gate[i] / (1.0 + exp(-m->gate[i])) * m->up[i];
    return sum;
}

TEST(swiglu) {
    enum { N = 64 };
    float gate[N], up[N], R[N], out[N], dgate[N], dup[N];
    fill(gate, N, 6, 0), fill(up, N, 2, 0), fill(R, N, 1, 0);
    swiglu_ref m = {to_double(gate, N), to_double(up, N), to_double(R, N), N};
    es_swiglu_forward(dev1, out, gate, up, N);
    double expected[N];
    for (int i = 0; i < N; i++) expected[i] = m.gate[i] / (1.0 + exp(-m.gate[i])) * m.up[i];
    CHECKF(relative_error(out, expected, N) < 1e-5, "reference forward differs");
    fill_value(dgate, N, NAN), fill_value(dup, N, NAN);
    es_swiglu_backward(dev1, dgate, dup, R, gate, up, N);
    CHECK_GRAD("dgate", gradient_error(swiglu_ref_loss, &m, m.gate, N, dgate, NULL, 1));
    CHECK_GRAD("dup", gradient_error(swiglu_ref_loss, &m, m.up, N, dup, NULL, 1));
    free(m.gate), free(m.up), free(m.R);
}

typedef struct {
    double *table, *R;
    const int32_t *ids;
    int T, C;
} embedding_ref;

static double embedding_ref_loss(void *ctx) {
    embedding_ref *m = ctx;
    double sum = 0;
    for (int t = 0; t < m->T; t++) sum += dot(m->R + (size_t)t * m->C, m->table + (size_t)m->ids[t] * m->C, m->C);
    return sum;
}

TEST(embedding_repeated_ids) {
    enum { V = 10, C = 4, T = 8 };
    const int32_t ids[T] = {3, 1, 3, 9, 0, 3, 1, 7};
    float table[V * C], R[T * C], out[T * C], dtable[V * C], base[V * C];
    fill(table, V * C, 1, 0), fill(R, T * C, 1, 0), fill(base, V * C, 1, 0);
    embedding_ref m = {to_double(table, V * C), to_double(R, T * C), ids, T, C};
    es_embedding_forward(dev1, out, ids, table, ES_DT_F32, T, C);
    for (int t = 0; t < T; t++) CHECK(memcmp(out + t * C, table + ids[t] * C, sizeof(float) * C) == 0);
    memcpy(dtable, base, sizeof dtable);
    es_embedding_backward(dev1, dtable, ids, R, T, C);
    double *based = to_double(base, V * C);
    CHECK_GRAD("dtable", gradient_error(embedding_ref_loss, &m, m.table, V * C, dtable, based, 1));
    free(m.table), free(m.R), free(based);
}

/* ---- latent MSE ------------------------------------------------------------------------ */

typedef struct {
    double *h, *target, *head, *cosines;
    const uint8_t *mask;
    int T, C;
    double eps;
} mse_ref;

static double mse_ref_loss(void *ctx) {
    mse_ref *m = ctx;
    const int C = m->C;
    double total = 0, normed[64], y[64]; /* C <= 64 */
    *m->cosines = 0;
    for (int t = 0; t < m->T; t++) {
        if (!m->mask[t]) continue;
        const double *x = m->h + (size_t)t * C, *target = m->target + (size_t)t * C;
        const double r = 1.0 / sqrt(dot(x, x, C) / C + m->eps);
        for (int c = 0; c < C; c++) normed[c] = x[c] * r;
        for (int o = 0; o < C; o++) y[o] = m->head ? dot(m->head + (size_t)o * C, normed, C) : normed[o];
        double e = 0;
        for (int c = 0; c < C; c++) e += (y[c] - target[c]) * (y[c] - target[c]);
        total += e / C;
        *m->cosines += dot(y, target, C) / sqrt(dot(y, y, C) * dot(target, target, C));
    }
    return total;
}

static void check_latent_mse(const char *tl_name, int T, int C, int with_head, float eps) {
    const size_t n = (size_t)T * C;
    const float scale = 0.37f;
    float *h = malloc(sizeof(float) * n), *target = malloc(sizeof(float) * n), *head = malloc(sizeof(float) * C * C);
    float *dh = malloc(sizeof(float) * n), *dhead = malloc(sizeof(float) * C * C), *base = malloc(sizeof(float) * C * C);
    uint8_t *mask = malloc((size_t)T);
    fill(h, n, 3, 0.5), fill(target, n, 1.5, 0), fill(base, (size_t)C * C, 1, 0);
    fill(head, (size_t)C * C, 0.3, 0);
    for (int c = 0; c < C; c++) head[c * C + c] += 1.0f; /* identity plus noise, as after some training */
    for (int t = 0; t < T; t++) mask[t] = t % 3 != 1 && t != T - 1;
    double cosines_ref = 0;
    mse_ref m = {to_double(h, n), to_double(target, n), with_head ? to_double(head, (size_t)C * C) : NULL, &cosines_ref,
                 mask, T, C, eps};
    const double expected = mse_ref_loss(&m);
    fill_value(dh, n, NAN);
    memcpy(dhead, base, sizeof(float) * C * C);
    double cosines = 0;
    const double loss = latent_mse_on(dev1, dh, dhead, &cosines, h, target, mask, with_head ? head : NULL, T, C, eps, scale);
    CHECKF(fabs(loss - expected) <= 1e-5 * expected, "loss %.9g, reference %.9g", loss, expected);
    CHECKF(fabs(cosines - cosines_ref) <= 1e-5 * T, "cosine sum %.9g, reference %.9g", cosines, cosines_ref);
    /* no gradients asked: the same loss, dhead untouched */
    float *dhead2 = malloc(sizeof(float) * C * C);
    memcpy(dhead2, base, sizeof(float) * C * C);
    CHECK(latent_mse_on(dev1, NULL, dhead2, NULL, h, target, mask, with_head ? head : NULL, T, C, eps, scale) == loss);
    CHECK(memcmp(dhead2, base, sizeof(float) * C * C) == 0);
    for (int t = 0; t < T; t++)
        if (!mask[t])
            for (int c = 0; c < C; c++) CHECK(dh[(size_t)t * C + c] == 0.0f);
    CHECK_GRAD("dh", gradient_error(mse_ref_loss, &m, m.h, n, dh, NULL, scale));
    double *based = to_double(base, (size_t)C * C);
    if (with_head) CHECK_GRAD("dhead", gradient_error(mse_ref_loss, &m, m.head, (size_t)C * C, dhead, based, scale));
    free(h), free(target), free(head), free(dh), free(dhead), free(dhead2), free(base), free(mask), free(based);
    free(m.h), free(m.target), free(m.head);
}

TEST(latent_mse_masked_no_head) { check_latent_mse(tl_name, 7, 6, 0, 1e-6f); }
TEST(latent_mse_masked_head) { check_latent_mse(tl_name, 9, 5, 1, 0.05f); }
/* more rows than one of latent_mse's chunks */
TEST(latent_mse_several_chunks_head) { check_latent_mse(tl_name, 300, 4, 1, 1e-6f); }

/* ---- cross entropy --------------------------------------------------------------------- */

typedef struct {
    double *x, *W, *logits; /* logits: (V) scratch */
    const int32_t *labels;
    int T, C, V;
} ce_ref;

static double ce_ref_loss(void *ctx) {
    ce_ref *m = ctx;
    double total = 0, *logits = m->logits;
    for (int t = 0; t < m->T; t++) {
        if (m->labels[t] < 0) continue;
        double max_logit = -INFINITY, sum = 0;
        for (int v = 0; v < m->V; v++) {
            logits[v] = dot(m->x + (size_t)t * m->C, m->W + (size_t)v * m->C, m->C);
            max_logit = fmax(max_logit, logits[v]);
        }
        for (int v = 0; v < m->V; v++) sum += exp(logits[v] - max_logit);
        total += max_logit + log(sum) - logits[m->labels[t]];
    }
    return total;
}

static void check_cross_entropy(const char *tl_name, int T, int C, int V, double amplitude) {
    const size_t nx = (size_t)T * C, nw = (size_t)V * C;
    const float scale = 0.29f;
    float *x = malloc(sizeof(float) * nx), *W = malloc(sizeof(float) * nw), *dx = malloc(sizeof(float) * nx);
    float *dW = malloc(sizeof(float) * nw), *base = malloc(sizeof(float) * nw);
    int32_t *labels = malloc(sizeof(int32_t) * T);
    fill(x, nx, amplitude, 0), fill(W, nw, 1, 0), fill(base, nw, 1, 0);
    for (int t = 0; t < T; t++) labels[t] = t % 7 == 3 || t == 0 ? -1 : (int32_t)((t * 2477 + 2) % V); /* spread over V */
    ce_ref m = {to_double(x, nx), to_double(W, nw), malloc(sizeof(double) * V), labels, T, C, V};
    const double expected = ce_ref_loss(&m);
    es_device *pool = dev2;
    REQUIRE(pool);
    double loss = NAN;
    fill_value(dx, nx, NAN);
    memcpy(dW, base, sizeof(float) * nw);
    REQUIRE(es_cross_entropy(pool, &loss, dx, dW, x, W, labels, T, C, V, scale) == 0);
    CHECKF(isfinite(loss) && fabs(loss - expected) <= 1e-5 * expected, "loss %.9g, reference %.9g", loss, expected);
    for (int t = 0; t < T; t++)
        if (labels[t] < 0)
            for (int c = 0; c < C; c++) CHECK(dx[(size_t)t * C + c] == 0.0f);
    double *based = to_double(base, nw);
    CHECK_GRAD("dx", gradient_error(ce_ref_loss, &m, m.x, nx, dx, NULL, scale));
    if (nw <= 4096) {
        CHECK_GRAD("dW", gradient_error(ce_ref_loss, &m, m.W, nw, dW, based, scale));
    } else { /* a large vocabulary: the labels' rows of W and a spread of others */
        size_t picks[256], n_picks = 0;
        for (int t = 0; t < T && n_picks + C <= 128; t++)
            for (int c = 0; c < C && labels[t] >= 0; c++) picks[n_picks++] = (size_t)labels[t] * C + c;
        for (size_t i = 0; n_picks < 256; i++) picks[n_picks++] = i * 7919 % nw;
        CHECK_GRAD("dW (sampled)", gradient_error_at(ce_ref_loss, &m, m.W, picks, n_picks, dW, based, scale));
    }
    /* the same loss without gradients, the same bits without a pool and with 3 threads */
    double loss2 = NAN;
    REQUIRE(es_cross_entropy(dev1, &loss2, NULL, NULL, x, W, labels, T, C, V, scale) == 0);
    CHECK(loss2 == loss);
    float *dx2 = malloc(sizeof(float) * nx), *dW2 = malloc(sizeof(float) * nw);
    es_device *pool3 = dev3;
    REQUIRE(pool3);
    for (int variant = 0; variant < 2; variant++) {
        memcpy(dW2, base, sizeof(float) * nw);
        REQUIRE(es_cross_entropy(variant ? pool3 : dev1, &loss2, dx2, dW2, x, W, labels, T, C, V, scale) == 0);
        CHECKF(loss2 == loss && memcmp(dx, dx2, sizeof(float) * nx) == 0 && memcmp(dW, dW2, sizeof(float) * nw) == 0,
               "results differ in variant %d", variant);
    }
    /* labels out of range are refused */
    labels[1] = V;
    CHECK(es_cross_entropy(dev1, &loss2, NULL, NULL, x, W, labels, T, C, V, scale) == ES_ERR_DATA);
    es_error refused = {0};
    es_device_take_error(dev1, &refused);
    CHECKF(strstr(refused.msg, "label"), "%s", refused.msg);
    free(x), free(W), free(dx), free(dW), free(base), free(labels), free(based), free(dx2), free(dW2);
    free(m.x), free(m.W), free(m.logits);
}

TEST(cross_entropy_small) { check_cross_entropy(tl_name, 9, 6, 13, 1.0); }
/* more labelled rows than three of cross_entropy's chunks, some unlabelled */
TEST(cross_entropy_several_chunks) { check_cross_entropy(tl_name, 400, 5, 11, 1.0); }
/* a vocabulary of several tiles of the op's products, the last one partial */
TEST(cross_entropy_several_vocabulary_tiles) { check_cross_entropy(tl_name, 30, 4, 9000, 1.0); }
/* logits in the hundreds: a naive exp would overflow */
TEST(cross_entropy_large_logits) { check_cross_entropy(tl_name, 20, 4, 7, 150.0); }

/* ---- thread counts -------------------------------------------------------------------- */

/* OpenBLAS's threaded sgemm cuts an inner dimension K > 320 that is not a multiple of 32 into
 * other blocks than its single-threaded one, so its bits depend on the thread count: inner
 * dimensions of 333 here make sure no product of the ops meets that. The device makes OpenBLAS
 * single-threaded and tiles the products over its own pool, so neither OpenBLAS's thread count
 * when the device opens nor the device's own changes a bit. */
TEST(openblas_threads_do_not_matter) {
    enum { T = 333, C = 333, V = 5000 };
    float *in = malloc(sizeof(float) * T * C), *weight = malloc(sizeof(float) * C * C), *dout = malloc(sizeof(float) * T * C);
    float *target = malloc(sizeof(float) * T * C), *W = malloc(sizeof(float) * V * C);
    int32_t labels[T];
    uint8_t mask[T];
    fill(in, (size_t)T * C, 1, 0), fill(weight, (size_t)C * C, 0.1, 0), fill(dout, (size_t)T * C, 1, 0);
    fill(target, (size_t)T * C, 1, 0), fill(W, (size_t)V * C, 0.1, 0);
    for (int t = 0; t < T; t++) labels[t] = t * 37 % V, mask[t] = t % 5 != 0;
    const int threads = openblas_get_num_threads();
    float *results[3][6];
    double losses[3][2];
    for (int variant = 0; variant < 3; variant++) {
        openblas_set_num_threads(variant == 1 ? 1 : 2);
        es_device *dev = test_cpu_device(variant == 2 ? 1 : 2);
        float **r = results[variant];
        r[0] = malloc(sizeof(float) * T * C), r[1] = calloc((size_t)C * C, sizeof(float)); /* matmul din, dweight */
        r[2] = malloc(sizeof(float) * T * C), r[3] = calloc((size_t)C * C, sizeof(float)); /* latent_mse dh, dhead */
        r[4] = malloc(sizeof(float) * T * C), r[5] = calloc((size_t)V * C, sizeof(float)); /* cross_entropy dx, dW */
        REQUIRE(es_matmul_backward(dev, r[0], r[1], NULL, dout, in, weight, T, C, C) == 0);
        losses[variant][0] = latent_mse_on(dev, r[2], r[3], NULL, in, target, mask, weight, T, C, 1e-6f, 1.0f);
        REQUIRE(es_cross_entropy(dev, &losses[variant][1], r[4], r[5], in, W, labels, T, C, V, 1.0f) == 0);
        es_device_close(dev);
    }
    openblas_set_num_threads(threads);
    const size_t sizes[6] = {(size_t)T * C, (size_t)C * C, (size_t)T * C, (size_t)C * C, (size_t)T * C, (size_t)V * C};
    for (int variant = 1; variant < 3; variant++) {
        CHECKF(losses[0][0] == losses[variant][0] && losses[0][1] == losses[variant][1], "losses differ in variant %d", variant);
        for (int i = 0; i < 6; i++) CHECKF(memcmp(results[0][i], results[variant][i], sizeof(float) * sizes[i]) == 0, "gradient %d differs in variant %d", i, variant);
    }
    for (int variant = 0; variant < 3; variant++)
        for (int i = 0; i < 6; i++) free(results[variant][i]);
    free(in), free(weight), free(dout), free(target), free(W);
}

int main(void) {
    dev1 = test_cpu_device(1), dev2 = test_cpu_device(2), dev3 = test_cpu_device(3);
    RUN(matmul_with_bias);
    RUN(matmul_without_bias);
    RUN(matmul_several_tiles);
    RUN(rmsnorm);
    RUN(rmsnorm_many_tokens_large_eps);
    RUN(rope);
    RUN(attention_gqa_three_sequences);
    RUN(attention_long_sequence_row_blocks);
    RUN(swiglu);
    RUN(embedding_repeated_ids);
    RUN(latent_mse_masked_no_head);
    RUN(latent_mse_masked_head);
    RUN(latent_mse_several_chunks_head);
    RUN(cross_entropy_small);
    RUN(cross_entropy_several_chunks);
    RUN(cross_entropy_several_vocabulary_tiles);
    RUN(cross_entropy_large_logits);
    RUN(openblas_threads_do_not_matter);
    printf("  worst normalised gradient error over all checks: %.3g (tolerance %g)\n", worst_error, TOLERANCE);
    es_device_close(dev1), es_device_close(dev2), es_device_close(dev3);
    return test_summary();
}
