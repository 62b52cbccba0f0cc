/* The reference's self-test (ref_check_gradients in tests/ops/reference.h). The harness trusts
 * the backward references only because they agree here with central differences of the forward
 * references: a wrong derivation would otherwise make a correct backend fail, or worse, agree
 * with a backend that made the same mistake.
 *
 * For each backward op: L = Σ R ∘ forward(inputs) with a fixed random R (the loss terms are
 * scalars already, times their scale), its analytic gradient from the backward reference, and
 * (L(x + h) − L(x − h)) / 2h for every input value. In double with h = 1e-5 the differences are
 * good to ~1e-10 relative (truncation h², rounding 1e-16/h), so the nmse must stay under 1e-12;
 * a missing term or factor in a derivation gives 1e-4 or more. Shapes are small (every value is
 * perturbed) but exercise what the big ones do: several sequences with an empty one, GQA, a head,
 * masked tokens, ignored labels. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "reference.h"
#include "rng.h"

#define FD_STEP 1e-5
#define FD_THRESHOLD 1e-12

static double *zeros(size_t n) {
    double *p = calloc(n ? n : 1, sizeof *p);
    if (!p) {
        fprintf(stderr, "FAIL reference: out of memory\n");
        exit(1);
    }
    return p;
}

static double *normals(rng *r, size_t n, double sd) {
    double *p = zeros(n);
    rng_fill_normal_double(r, p, n, sd);
    return p;
}

static double dot(const double *a, const double *b, size_t n) {
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* The problem every check perturbs: named inputs and the scalar L they give. */
typedef struct problem {
    int T, C, OC, V, H, KV, hd, n_seqs;
    double eps, scale;
    double *a, *b, *c, *d, *r; /* inputs (meaning per op), R */
    double *out;               /* forward's output, scratch */
    const int32_t *ints;       /* ids, positions, seq_start, labels */
    const double *inv_freq;
    const uint8_t *mask;
    size_t n_out;
} problem;

/* nmse between the analytic gradient g of L with respect to x (n values) and central differences. */
static double fd_nmse(double (*loss)(problem *), problem *p, double *x, size_t n, const double *g) {
    double err = 0, norm = 0;
    for (size_t i = 0; i < n; i++) {
        const double saved = x[i];
        x[i] = saved + FD_STEP;
        const double plus = loss(p);
        x[i] = saved - FD_STEP;
        const double minus = loss(p);
        x[i] = saved;
        const double numeric = (plus - minus) / (2 * FD_STEP);
        err += (numeric - g[i]) * (numeric - g[i]), norm += numeric * numeric;
    }
    return norm > 0 ? err / norm : (err > 0 ? INFINITY : 0);
}

typedef struct report {
    FILE *log;
    int failures;
} report;

static void verdict(report *rep, const char *name, const char *what, double worst) {
    const int ok = worst <= FD_THRESHOLD;
    if (rep->log) {
        fprintf(rep->log, "  %s: %s vs central differences, worst nmse %.2e (threshold %.0e)\n", name, what, worst, FD_THRESHOLD);
        if (ok) fprintf(rep->log, "PASS %s\n", name);
        else fprintf(rep->log, "FAIL %s: the backward reference disagrees with its forward: nmse %.2e\n", name, worst);
    }
    rep->failures += !ok;
}

static double worst_of(double a, double b) { return a > b || isnan(a) ? a : b; }

/* ---- the forwards, as L = Σ R ∘ out ---- */

static double loss_rmsnorm(problem *p) {
    ref_rmsnorm_forward(p->out, p->a, p->b, p->T, p->C, p->eps);
    return dot(p->out, p->r, p->n_out);
}
static double loss_matmul(problem *p) {
    ref_matmul_forward(p->out, p->a, p->b, p->c, p->T, p->C, p->OC);
    return dot(p->out, p->r, p->n_out);
}
static double loss_rope(problem *p) {
    memcpy(p->out, p->a, p->n_out * sizeof *p->out);
    ref_rope_forward(p->out, p->ints, p->inv_freq, p->T, p->H, p->hd);
    return dot(p->out, p->r, p->n_out);
}
static double loss_attention(problem *p) {
    ref_attention_forward(p->out, p->a, p->b, p->c, p->ints, p->n_seqs, p->H, p->KV, p->hd);
    return dot(p->out, p->r, p->n_out);
}
static double loss_swiglu(problem *p) {
    ref_swiglu_forward(p->out, p->a, p->b, p->n_out);
    return dot(p->out, p->r, p->n_out);
}
static double loss_embedding(problem *p) {
    ref_embedding_forward(p->out, p->ints, p->a, p->T, p->C);
    return dot(p->out, p->r, p->n_out);
}
static double loss_latent(problem *p) {
    double loss;
    ref_latent_mse(&loss, NULL, NULL, NULL, p->a, p->b, p->mask, p->c, p->T, p->C, p->eps, p->scale);
    return p->scale * loss;
}
static double loss_cross_entropy(problem *p) {
    double loss;
    if (ref_cross_entropy(&loss, NULL, NULL, p->a, p->b, p->ints, p->T, p->C, p->V, p->scale)) return NAN;
    return p->scale * loss;
}

/* ---- the checks ---- */

static void check_rmsnorm(report *rep, rng *r) {
    problem p = {.T = 4, .C = 6, .eps = 0.3}; /* a large eps, so its place in the formula matters */
    p.n_out = (size_t)p.T * p.C;
    p.a = normals(r, p.n_out, 1.0), p.b = normals(r, (size_t)p.C, 1.0), p.r = normals(r, p.n_out, 1.0), p.out = zeros(p.n_out);
    double *din = zeros(p.n_out), *dw = zeros((size_t)p.C);
    ref_rmsnorm_backward(din, dw, p.r, p.a, p.b, p.T, p.C, p.eps);
    double worst = fd_nmse(loss_rmsnorm, &p, p.a, p.n_out, din);
    worst = worst_of(worst, fd_nmse(loss_rmsnorm, &p, p.b, (size_t)p.C, dw));
    verdict(rep, "reference_rmsnorm_backward", "din, dweight", worst);
    free(p.a), free(p.b), free(p.r), free(p.out), free(din), free(dw);
}

static void check_matmul(report *rep, rng *r) {
    problem p = {.T = 3, .C = 5, .OC = 4};
    p.n_out = (size_t)p.T * p.OC;
    p.a = normals(r, (size_t)p.T * p.C, 1.0), p.b = normals(r, (size_t)p.OC * p.C, 1.0), p.c = normals(r, (size_t)p.OC, 1.0);
    p.r = normals(r, p.n_out, 1.0), p.out = zeros(p.n_out);
    double *din = zeros((size_t)p.T * p.C), *dw = zeros((size_t)p.OC * p.C), *db = zeros((size_t)p.OC);
    ref_matmul_backward(din, dw, db, p.r, p.a, p.b, p.T, p.C, p.OC);
    double worst = fd_nmse(loss_matmul, &p, p.a, (size_t)p.T * p.C, din);
    worst = worst_of(worst, fd_nmse(loss_matmul, &p, p.b, (size_t)p.OC * p.C, dw));
    worst = worst_of(worst, fd_nmse(loss_matmul, &p, p.c, (size_t)p.OC, db));
    verdict(rep, "reference_matmul_backward", "din, dweight, dbias", worst);
    free(p.a), free(p.b), free(p.c), free(p.r), free(p.out), free(din), free(dw), free(db);
}

static void check_rope(report *rep, rng *r) {
    static const int32_t positions[] = {0, 7, 3, 1000};
    double inv_freq[4];
    problem p = {.T = 4, .H = 2, .hd = 8, .ints = positions, .inv_freq = inv_freq};
    for (int i = 0; i < p.hd / 2; i++) inv_freq[i] = pow(10000.0, -2.0 * i / p.hd);
    p.n_out = (size_t)p.T * p.H * p.hd;
    p.a = normals(r, p.n_out, 1.0), p.r = normals(r, p.n_out, 1.0), p.out = zeros(p.n_out);
    double *dx = zeros(p.n_out);
    memcpy(dx, p.r, p.n_out * sizeof *dx);
    ref_rope_backward(dx, positions, inv_freq, p.T, p.H, p.hd);
    verdict(rep, "reference_rope_backward", "dx", fd_nmse(loss_rope, &p, p.a, p.n_out, dx));
    free(p.a), free(p.r), free(p.out), free(dx);
}

static void check_attention(report *rep, rng *r) {
    static const int32_t seq_start[] = {0, 4, 4, 5, 7}; /* lengths 4, 0, 1, 2 */
    problem p = {.n_seqs = 4, .H = 4, .KV = 2, .hd = 3, .ints = seq_start};
    p.T = seq_start[p.n_seqs];
    p.n_out = (size_t)p.T * p.H * p.hd;
    const size_t n_kv = (size_t)p.T * p.KV * p.hd;
    p.a = normals(r, p.n_out, 1.5), p.b = normals(r, n_kv, 1.5), p.c = normals(r, n_kv, 1.0);
    p.r = normals(r, p.n_out, 1.0), p.out = zeros(p.n_out);
    double *dq = zeros(p.n_out), *dk = zeros(n_kv), *dv = zeros(n_kv);
    ref_attention_backward(dq, dk, dv, p.r, p.a, p.b, p.c, seq_start, p.n_seqs, p.H, p.KV, p.hd);
    double worst = fd_nmse(loss_attention, &p, p.a, p.n_out, dq);
    worst = worst_of(worst, fd_nmse(loss_attention, &p, p.b, n_kv, dk));
    worst = worst_of(worst, fd_nmse(loss_attention, &p, p.c, n_kv, dv));
    verdict(rep, "reference_attention_backward", "dq, dk, dv (GQA 4/2, lengths 4, 0, 1, 2)", worst);
    free(p.a), free(p.b), free(p.c), free(p.r), free(p.out), free(dq), free(dk), free(dv);
}

static void check_swiglu(report *rep, rng *r) {
    problem p = {.n_out = 9};
    p.a = normals(r, p.n_out, 3.0), p.b = normals(r, p.n_out, 1.0), p.r = normals(r, p.n_out, 1.0), p.out = zeros(p.n_out);
    double *dgate = zeros(p.n_out), *dup = zeros(p.n_out);
    ref_swiglu_backward(dgate, dup, p.r, p.a, p.b, p.n_out);
    double worst = fd_nmse(loss_swiglu, &p, p.a, p.n_out, dgate);
    worst = worst_of(worst, fd_nmse(loss_swiglu, &p, p.b, p.n_out, dup));
    verdict(rep, "reference_swiglu_backward", "dgate, dup", worst);
    free(p.a), free(p.b), free(p.r), free(p.out), free(dgate), free(dup);
}

static void check_embedding(report *rep, rng *r) {
    static const int32_t ids[] = {2, 0, 2, 4, 2}; /* a repeated id adds up */
    problem p = {.T = 5, .C = 3, .V = 5, .ints = ids};
    p.n_out = (size_t)p.T * p.C;
    p.a = normals(r, (size_t)p.V * p.C, 1.0), p.r = normals(r, p.n_out, 1.0), p.out = zeros(p.n_out);
    double *dtable = zeros((size_t)p.V * p.C);
    ref_embedding_backward(dtable, ids, p.r, p.T, p.C);
    verdict(rep, "reference_embedding_backward", "dtable", fd_nmse(loss_embedding, &p, p.a, (size_t)p.V * p.C, dtable));
    free(p.a), free(p.r), free(p.out), free(dtable);
}

static void check_latent(report *rep, rng *r) {
    static const uint8_t mask[] = {1, 0, 1, 1, 0};
    for (int with_head = 0; with_head < 2; with_head++) {
        problem p = {.T = 5, .C = 4, .eps = 0.2, .scale = 0.7, .mask = mask};
        const size_t n = (size_t)p.T * p.C;
        p.a = normals(r, n, 1.0), p.b = normals(r, n, 1.0), p.c = with_head ? normals(r, (size_t)p.C * p.C, 0.6) : NULL;
        double *dh = zeros(n), *dhead = zeros((size_t)p.C * p.C), loss, cosines;
        ref_latent_mse(&loss, &cosines, dh, with_head ? dhead : NULL, p.a, p.b, mask, p.c, p.T, p.C, p.eps, p.scale);
        double worst = fd_nmse(loss_latent, &p, p.a, n, dh);
        if (with_head) worst = worst_of(worst, fd_nmse(loss_latent, &p, p.c, (size_t)p.C * p.C, dhead));
        verdict(rep, with_head ? "reference_latent_mse_head" : "reference_latent_mse",
                with_head ? "dh, dhead (tokens 2 and 5 masked)" : "dh (tokens 2 and 5 masked)", worst);
        free(p.a), free(p.b), free(p.c), free(dh), free(dhead);
    }
}

static void check_cross_entropy(report *rep, rng *r) {
    static const int32_t labels[] = {3, -1, 0, 6, 3};
    problem p = {.T = 5, .C = 4, .V = 7, .scale = 0.5, .ints = labels};
    p.a = normals(r, (size_t)p.T * p.C, 1.0), p.b = normals(r, (size_t)p.V * p.C, 1.0);
    double *dx = zeros((size_t)p.T * p.C), *dW = zeros((size_t)p.V * p.C), loss;
    ref_cross_entropy(&loss, dx, dW, p.a, p.b, labels, p.T, p.C, p.V, p.scale);
    double worst = fd_nmse(loss_cross_entropy, &p, p.a, (size_t)p.T * p.C, dx);
    worst = worst_of(worst, fd_nmse(loss_cross_entropy, &p, p.b, (size_t)p.V * p.C, dW));
    verdict(rep, "reference_cross_entropy", "dx, dW (one label -1)", worst);
    free(p.a), free(p.b), free(dx), free(dW);
}

/* ---- rounding and decoding, against values worked out by hand from the formats ---- */

typedef struct known {
    double in;
    es_precision precision;
    double expected;
} known;

static void check_rounding(report *rep) {
    const double inf = INFINITY, flt_max = 0x1.fffffep127;
    const known cases[] = {
        {1 + 0x1p-8, ES_PRECISION_BF16, 1},                   /* half a bf16 ulp: tie, to the even 1 */
        {1 + 0x1p-7 + 0x1p-8, ES_PRECISION_BF16, 1 + 0x1p-6}, /* tie from the odd 1 + 2^-7 up to even */
        {1 + 0x1p-8 + 0x1p-20, ES_PRECISION_BF16, 1 + 0x1p-7}, /* just past the tie */
        {flt_max, ES_PRECISION_BF16, inf},                     /* past bf16's largest + half an ulp */
        {-0x1.fep127, ES_PRECISION_BF16, -0x1.fep127},         /* bf16's largest is kept */
        {5 * 0x1p-134, ES_PRECISION_BF16, 0x1p-132},          /* subnormal spacing 2^-133: 2.5 spacings, a tie to the even 2 */
        {1 + 0x1p-11, ES_PRECISION_TF32, 1},                   /* tf32: 10 bits, tie to even */
        {1 + 0x1p-11 + 0x1p-10, ES_PRECISION_TF32, 1 + 0x1p-9},
        {464, ES_PRECISION_FP8, 448},        /* tie between 448 (even) and 480 (past the top): 448 */
        {1000, ES_PRECISION_FP8, 448},       /* saturates */
        {-1e30, ES_PRECISION_FP8, -448},
        {0x1p-10, ES_PRECISION_FP8, 0},      /* half the subnormal spacing 2^-9: tie, to 0 */
        {3 * 0x1p-10, ES_PRECISION_FP8, 0x1p-8}, /* tie from the odd 2^-9 up to 2 · 2^-9 */
        {0.1, ES_PRECISION_FP8, 0.1015625},  /* 0.1 = 1.6 · 2^-4; 3 bits: 1.625 · 2^-4 */
        {17, ES_PRECISION_FP8, 16},          /* spacing 2 at 16: 17 is a tie, to the even 16 */
        {19, ES_PRECISION_FP8, 20},
        {inf, ES_PRECISION_FP8, 448.0},      /* ops.h: e4m3 has no infinities, they saturate */
        {-inf, ES_PRECISION_BF16, -inf},
        {0.1, ES_PRECISION_FP32, (float)0.1},
    };
    int wrong = 0;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const double got = ref_round(cases[i].in, cases[i].precision);
        if (got != cases[i].expected) {
            if (rep->log) fprintf(rep->log, "  reference_rounding: %a at precision %d gives %a, expected %a\n", cases[i].in,
                                  (int)cases[i].precision, got, cases[i].expected);
            wrong++;
        }
    }
    wrong += !isnan(ref_round(NAN, ES_PRECISION_FP8)) + !isnan(ref_round(NAN, ES_PRECISION_BF16));
    /* decoding: one value of each kind per format */
    const uint16_t bf16[] = {0x3f80, 0xc000, 0x0001, 0x7f80};
    const uint16_t f16[] = {0x3c00, 0x0001, 0x7bff, 0xfc00, 0x3555};
    const uint8_t e4m3[] = {0x38, 0x7e, 0x01, 0x08, 0xff};
    const double want_bf16[] = {1, -2, 0x1p-133, inf}, want_f16[] = {1, 0x1p-24, 65504, -inf, 0x1.554p-2};
    const double want_e4m3[] = {1, 448, 0x1p-9, 0x1p-6, NAN};
    double got[5];
    ref_decode(got, bf16, ES_DT_BF16, 4);
    for (int i = 0; i < 4; i++) wrong += got[i] != want_bf16[i];
    ref_decode(got, f16, ES_DT_F16, 5);
    for (int i = 0; i < 5; i++) wrong += got[i] != want_f16[i];
    ref_decode(got, e4m3, ES_DT_F8_E4M3, 5);
    for (int i = 0; i < 4; i++) wrong += got[i] != want_e4m3[i];
    wrong += !isnan(got[4]);
    if (rep->log) {
        fprintf(rep->log, "  reference_rounding: %zu rounding cases and 14 decodings worked out by hand, %d wrong\n",
                sizeof cases / sizeof *cases + 2, wrong);
        if (wrong) fprintf(rep->log, "FAIL reference_rounding: %d values differ from the hand-worked ones\n", wrong);
        else fprintf(rep->log, "PASS reference_rounding\n");
    }
    rep->failures += wrong > 0;
}

int ref_check_gradients(FILE *log) {
    report rep = {log, 0};
    rng r = rng_seeded(20261201);
    check_rmsnorm(&rep, &r);
    check_matmul(&rep, &r);
    check_rope(&rep, &r);
    check_attention(&rep, &r);
    check_swiglu(&rep, &r);
    check_embedding(&rep, &r);
    check_latent(&rep, &r);
    check_cross_entropy(&rep, &r);
    check_rounding(&rep);
    return rep.failures;
}
