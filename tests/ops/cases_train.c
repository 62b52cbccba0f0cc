/* The harness's grid for the loss terms, the optimizer ops and the Fourier projection's ops
 * (kernels/ops.h): shapes, inputs, references, calls and thresholds (docs/ops-harness.md).
 *
 * Boundaries crossed: latent MSE's chunks of 256 rows and a head's 256 x 512 tiles; cross
 * entropy's vocabulary tiles of 4096 and chunks of 128 labelled rows; the 65536-value blocks of
 * AdamW, the sum of squares and scale; standardise's blocks of 64 rows (a non-finite row in more
 * than one block, for the smallest-index report); Fourier features' 256-row blocks. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "harness_internal.h"

#define PRESENT(op)                                                                                 \
    static int has_##op(const es_backend *b) { return b->op != NULL; }
#define COUNT(a) ((int)(sizeof(a) / sizeof *(a)))

static const char *const precision_names[] = {"fp32", "tf32", "bf16", "fp8"};

/* ---- latent MSE ------------------------------------------------------------------------------- */

typedef struct latent_case {
    int T, C, head, dh, dhead, cosine;
    float eps, scale;
    float *h, *target, *head_values, *dhead_start;
    uint8_t *mask;
} latent_case;

/* mask: 0 all set, 1 random (a third unset), 2 none set */
static const struct {
    int T, C, head, dh, dhead, cosine, mask;
    float eps, scale;
    double sd;
} latent_grid[] = {
    {1, 8, 0, 1, 0, 1, 0, 1e-6f, 1, 1},       {5, 24, 1, 1, 1, 1, 1, 1e-6f, 1, 1},
    {257, 64, 1, 1, 1, 0, 1, 1e-5f, 1, 1} /* 2 chunks */,
    {600, 130, 0, 1, 0, 1, 1, 1e-6f, 0.5f, 1} /* 3 chunks */,
    {260, 520, 1, 1, 1, 1, 1, 1e-6f, 1, 1} /* head products over 3 x 2 tiles */,
    {40, 16, 1, 0, 1, 1, 1, 1e-6f, 1, 1} /* loss only: dhead must keep its start */,
    {50, 32, 1, 1, 0, 1, 0, 1e-6f, 1, 1},     {20, 8, 1, 1, 1, 1, 2, 1e-6f, 1, 1} /* nothing unmasked */,
    {0, 8, 1, 1, 1, 1, 0, 1e-6f, 1, 1},       {33, 24, 0, 1, 0, 1, 1, 1e-5f, 0.37f, 1e-3} /* eps of the size of mean h² */,
    {20, 1536, 1, 1, 1, 1, 1, 1e-6f, 1, 1} /* a student's width */,
};

static void make_latent_mse(hcase *c, int index) {
    rng r = rng_seeded(3000 + (uint64_t)index);
    latent_case *l = c->data = hc_alloc(c, sizeof *l);
    l->T = latent_grid[index].T, l->C = latent_grid[index].C, l->head = latent_grid[index].head;
    l->dh = latent_grid[index].dh, l->dhead = latent_grid[index].dhead, l->cosine = latent_grid[index].cosine;
    l->eps = latent_grid[index].eps, l->scale = latent_grid[index].scale;
    const size_t n = (size_t)l->T * l->C, nn = (size_t)l->C * l->C;
    l->h = hc_normals(c, &r, n, latent_grid[index].sd);
    l->target = hc_normals(c, &r, n, 1.0);
    l->mask = hc_alloc(c, (size_t)l->T);
    for (int t = 0; t < l->T; t++) l->mask[t] = latent_grid[index].mask == 0 || (latent_grid[index].mask == 1 && rng_below(&r, 3));
    if (l->head) { /* near the identity the training starts from */
        l->head_values = hc_normals(c, &r, nn, 0.5 / sqrt((double)l->C));
        for (int i = 0; i < l->C; i++) l->head_values[(size_t)i * l->C + i] += 1.0f;
    }
    hc_param(c, "T", l->T), hc_param(c, "C", l->C);
    hc_note(c, "%s%s%s%s, mask %s, scale %g", l->head ? "head" : "no head", l->dh ? ", dh" : ", dh NULL",
            l->head && l->dhead ? ", dhead" : "", l->cosine ? ", cosine" : "",
            (const char *[]){"all", "random", "none"}[latent_grid[index].mask], l->scale);
    double *loss = hc_output(c, "loss_sum", 1, 0), *cosine = l->cosine ? hc_output(c, "cosine_sum", 1, 0) : NULL;
    double *dh = l->dh ? hc_output(c, "dh", n, 0) : NULL, *dhead = l->head && l->dhead ? hc_output(c, "dhead", nn, 0) : NULL;
    ref_latent_mse(loss, cosine, dh, dhead, hc_widen(c, l->h, n), hc_widen(c, l->target, n), l->mask,
                   l->head ? hc_widen(c, l->head_values, nn) : NULL, l->T, l->C, l->eps, l->scale);
    if (dhead) l->dhead_start = hc_accumulate_start(c, &r, dhead, nn);
}

static int call_latent_mse(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const latent_case *l = c->data;
    const size_t n = (size_t)l->T * l->C, nn = (size_t)l->C * l->C;
    dscope s;
    ds_begin(&s, dev, err);
    float *h, *target, *head = NULL, *dh = NULL, *dhead = NULL;
    uint8_t *mask;
    PUT(&s, h, l->h, n * sizeof *h);
    PUT(&s, target, l->target, n * sizeof *target);
    PUT(&s, mask, l->mask, (size_t)l->T);
    if (l->head) PUT(&s, head, l->head_values, nn * sizeof *head);
    if (l->dh) OUT(&s, dh, NULL, n);
    if (l->head && l->dhead) OUT(&s, dhead, l->dhead_start, nn);
    double loss = NAN, cosine = NAN;
    OP(&s, es_latent_mse(dev, &loss, l->cosine ? &cosine : NULL, dh, dhead, h, target, mask, head, l->T, l->C, l->eps, l->scale));
    int k = 0;
    got[k++][0] = loss;
    if (l->cosine) got[k++][0] = cosine;
    if (dh) GET(&s, got[k++], dh, n);
    if (dhead) GET(&s, got[k++], dhead, nn);
    return ds_end(&s, ES_OK);
}

/* ---- cross entropy ------------------------------------------------------------------------------ */

typedef struct ce_case {
    int T, C, V, dx, dW;
    float scale;
    float *x, *W, *dW_start;
    int32_t *labels;
} ce_case;

/* labels: 0 random with a tenth -1 (and 0 and V-1 among them), 1 all -1, 2 one label = V, 3 one = -2 */
static const struct {
    int T, C, V, dx, dW, labels;
    float scale;
} ce_grid[] = {
    {1, 1, 1, 1, 1, 0, 1},       {5, 8, 7, 1, 1, 0, 1},      {150, 24, 4097, 1, 1, 0, 1} /* 2 chunks, 2 tiles */,
    {40, 64, 9000, 0, 0, 0, 1} /* loss only, 3 tiles */,     {300, 16, 4096, 1, 0, 0, 0.5f} /* exactly one tile, dW NULL */,
    {20, 8, 50, 1, 1, 1, 1},     {0, 8, 10, 1, 1, 0, 1},     {260, 33, 5000, 1, 1, 0, 0.25f} /* 3 chunks */,
    {4, 8, 10, 1, 1, 2, 1},      {4, 8, 10, 1, 1, 3, 1},     {6, 32, 40000, 1, 1, 0, 1} /* 10 tiles */,
};

static void make_cross_entropy(hcase *c, int index) {
    rng r = rng_seeded(3100 + (uint64_t)index);
    ce_case *e = c->data = hc_alloc(c, sizeof *e);
    e->T = ce_grid[index].T, e->C = ce_grid[index].C, e->V = ce_grid[index].V, e->dx = ce_grid[index].dx, e->dW = ce_grid[index].dW;
    e->scale = ce_grid[index].scale;
    const size_t nx = (size_t)e->T * e->C, nw = (size_t)e->V * e->C;
    e->x = hc_normals(c, &r, nx, 1.0);
    e->W = hc_normals(c, &r, nw, 2.0 / sqrt((double)e->C)); /* logits of sd 2: confident, not saturated */
    e->labels = hc_alloc(c, (size_t)e->T * sizeof *e->labels);
    const int kind = ce_grid[index].labels;
    for (int t = 0; t < e->T; t++) e->labels[t] = kind == 1 || rng_below(&r, 10) == 0 ? -1 : rng_below(&r, e->V);
    if (kind == 0 && e->T >= 3) e->labels[0] = 0, e->labels[e->T - 1] = e->V - 1;
    if (kind >= 2) e->labels[e->T / 2] = kind == 2 ? e->V : -2, c->expect_rc = ES_ERR_DATA;
    hc_param(c, "T", e->T), hc_param(c, "C", e->C), hc_param(c, "V", e->V);
    hc_note(c, "%s%s, %s, scale %g", e->dx ? "dx" : "dx NULL", e->dx && e->dW ? ", dW" : "",
            (const char *[]){"labels random with -1s", "all labels -1", "a label = V: ES_ERR_DATA",
                             "a label = -2: ES_ERR_DATA"}[kind],
            e->scale);
    double *loss = hc_output(c, "loss_sum", 1, 0);
    double *dx = e->dx ? hc_output(c, "dx", nx, 0) : NULL, *dW = e->dx && e->dW ? hc_output(c, "dW", nw, 0) : NULL;
    ref_cross_entropy(loss, dx, dW, hc_widen(c, e->x, nx), hc_widen(c, e->W, nw), e->labels, e->T, e->C, e->V, e->scale);
    if (dW) e->dW_start = hc_accumulate_start(c, &r, dW, nw);
}

static int call_cross_entropy(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const ce_case *e = c->data;
    const size_t nx = (size_t)e->T * e->C, nw = (size_t)e->V * e->C;
    dscope s;
    ds_begin(&s, dev, err);
    float *x, *dx = NULL, *dW = NULL;
    void *W;
    int32_t *labels;
    PUT(&s, x, e->x, nx * sizeof *x);
    PUT_WEIGHTS(&s, W, e->W, nw);
    PUT(&s, labels, e->labels, (size_t)e->T * sizeof *labels);
    if (e->dx) OUT(&s, dx, NULL, nx);
    if (e->dx && e->dW) OUT(&s, dW, e->dW_start, nw);
    double loss = NAN;
    OP(&s, es_cross_entropy(dev, &loss, dx, dW, x, W, labels, e->T, e->C, e->V, e->scale));
    got[0][0] = loss;
    if (dx) GET(&s, got[1], dx, nx);
    if (dW) GET(&s, got[2], dW, nw);
    return ds_end(&s, ES_OK);
}

/* ---- AdamW, sum of squares, scale ---------------------------------------------------------------- */

typedef struct vector_case {
    size_t n;
    int64_t step;
    double lr;
    float scale;
    es_adamw_config config;
    float *x, *grads, *m, *v;
} vector_case;

/* step 1 from zero moments; later steps from moments of a run; gradients of 1e-6, where eps
 * weighs as much as sqrt(v); lr 0.3, where an error in the update is not hidden by p */
static const struct {
    size_t n;
    int64_t step;
    double lr, weight_decay, beta2, grad_sd;
} adamw_grid[] = {
    {1, 1, 1e-3, 0.1, 0.999, 1},   {7, 2, 0.3, 0, 0.999, 1},          {65536, 1000, 1e-3, 0.01, 0.95, 1},
    {65537, 10, 0.05, 0, 0.999, 1e-6}, {200003, 3, 1e-2, 0.1, 0.999, 1}, {0, 1, 1e-3, 0.1, 0.999, 1},
};

static void make_adamw_update(hcase *c, int index) {
    rng r = rng_seeded(3200 + (uint64_t)index);
    vector_case *a = c->data = hc_alloc(c, sizeof *a);
    a->n = adamw_grid[index].n, a->step = adamw_grid[index].step, a->lr = adamw_grid[index].lr;
    a->config = (es_adamw_config){.lr = 99.0 /* not read */, .beta1 = 0.9, .beta2 = adamw_grid[index].beta2, .eps = 1e-8,
                                  .weight_decay = adamw_grid[index].weight_decay};
    const double sd = adamw_grid[index].grad_sd;
    a->x = hc_normals(c, &r, a->n, 1.0);
    a->grads = hc_normals(c, &r, a->n, sd);
    a->m = hc_floats(c, a->n), a->v = hc_floats(c, a->n);
    if (a->step > 1)
        for (size_t i = 0; i < a->n; i++) {
            a->m[i] = (float)(0.5 * sd * rng_normal(&r));
            const double g = sd * rng_normal(&r);
            a->v[i] = (float)(g * g);
        }
    hc_param(c, "n", (long)a->n), hc_param(c, "step", (long)a->step);
    hc_note(c, "lr %g, wd %g, beta2 %g%s", a->lr, a->config.weight_decay, a->config.beta2, sd < 1 ? ", gradients 1e-6" : "");
    double *p = hc_output(c, "params", a->n, 0), *m = hc_output(c, "m", a->n, 0), *v = hc_output(c, "v", a->n, 0);
    for (size_t i = 0; i < a->n; i++) p[i] = a->x[i], m[i] = a->m[i], v[i] = a->v[i];
    ref_adamw_update(p, hc_widen(c, a->grads, a->n), m, v, a->n, a->step, a->lr, &a->config);
}

static int call_adamw_update(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const vector_case *a = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *p, *g, *m, *v;
    void *working;
    const size_t wide = es_dtype_size(dev->weight_dtype);
    OUT(&s, p, a->x, a->n);
    PUT(&s, g, a->grads, a->n * sizeof *g);
    OUT(&s, m, a->m, a->n);
    OUT(&s, v, a->v, a->n);
    PUT(&s, working, NULL, a->n * wide);
    OP(&s, es_adamw_update(dev, p, working, g, m, v, a->n, a->step, a->lr, &a->config));
    GET(&s, got[0], p, a->n);
    GET(&s, got[1], m, a->n);
    GET(&s, got[2], v, a->n);
    /* the working copy holds exactly the new params in the device's weight format */
    float *params = malloc(a->n * sizeof *params + 1);
    unsigned char *copy = malloc(a->n * wide + 1);
    int rc = params && copy ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) rc = es_device_download(dev, params, p, a->n * sizeof *params, err);
    if (!rc) rc = es_device_download(dev, copy, working, a->n * wide, err);
    for (size_t i = 0; !rc && i < a->n; i++) {
        uint32_t want, have;
        if (dev->weight_dtype == ES_DT_F32) memcpy(&want, &params[i], 4), memcpy(&have, copy + 4 * i, 4);
        else want = es_f32_to_bf16(params[i]), have = (uint32_t)copy[2 * i] | (uint32_t)copy[2 * i + 1] << 8;
        if (want != have)
            rc = es_fail(err, ES_ERR_RUNTIME, "adamw_update: the working copy's element %zu is 0x%x, not the new param's 0x%x", i,
                         have, want);
    }
    free(params), free(copy);
    return ds_end(&s, rc);
}

/* ---- the working copy of weights ------------------------------------------------------------ */

static const size_t round_weights_grid[] = {0, 1, 7, 65537, 300001};

static void make_round_weights(hcase *c, int index) {
    rng r = rng_seeded(3250 + (uint64_t)index);
    vector_case *a = c->data = hc_alloc(c, sizeof *a);
    a->n = round_weights_grid[index];
    hc_param(c, "n", (long)a->n);
    a->x = hc_normals(c, &r, a->n, 1.0);
    /* ties, subnormals and the saturating top, where rounding rules differ */
    const float special[] = {1.00390625f /* 1 + 2^-8: a tie */, -1.01171875f, 1e-40f, 3.4e38f, 0.0f, -0.0f};
    for (size_t i = 0; i < a->n && i < sizeof special / sizeof *special; i++) a->x[i] = special[i];
    double *want = hc_output(c, "working", a->n, 0);
    for (size_t i = 0; i < a->n; i++) want[i] = a->x[i];
}

/* The copy, widened back to fp32 (exact), and checked bit for bit against common/dtype.h's rounding. */
static int call_round_weights(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const vector_case *a = c->data;
    const size_t wide = es_dtype_size(dev->weight_dtype);
    dscope s;
    ds_begin(&s, dev, err);
    float *master;
    void *working;
    PUT(&s, master, a->x, a->n * sizeof *master);
    PUT(&s, working, NULL, a->n * wide);
    OP(&s, es_round_weights(dev, working, master, a->n));
    unsigned char *copy = malloc(a->n * wide + 1);
    int rc = copy ? es_device_download(dev, copy, working, a->n * wide, err) : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (size_t i = 0; !rc && i < a->n; i++) {
        float value;
        if (dev->weight_dtype == ES_DT_F32) memcpy(&value, copy + 4 * i, 4);
        else {
            const uint16_t bits = (uint16_t)(copy[2 * i] | copy[2 * i + 1] << 8);
            if (bits != es_f32_to_bf16(a->x[i]))
                rc = es_fail(err, ES_ERR_RUNTIME, "round_weights: element %zu (%a) became 0x%04x, not 0x%04x", i, a->x[i], bits,
                             es_f32_to_bf16(a->x[i]));
            value = es_bf16_to_f32(bits);
        }
        got[0][i] = value;
    }
    free(copy);
    return ds_end(&s, rc);
}

static const size_t sum_squares_grid[] = {0, 1, 7, 65536, 65537, 300001};

static void make_sum_squares(hcase *c, int index) {
    rng r = rng_seeded(3300 + (uint64_t)index);
    vector_case *a = c->data = hc_alloc(c, sizeof *a);
    a->n = sum_squares_grid[index];
    a->x = hc_normals(c, &r, a->n, 1.0);
    for (size_t i = 0; i < a->n; i += 97) a->x[i] *= 1000.0f; /* magnitudes that fp32 accumulation would lose */
    hc_param(c, "n", (long)a->n);
    *hc_output(c, "sum", 1, 0) = ref_sum_squares(hc_widen(c, a->x, a->n), a->n);
}

static int call_sum_squares(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const vector_case *a = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *x;
    PUT(&s, x, a->x, a->n * sizeof *x);
    double sum = NAN;
    OP(&s, es_sum_squares(dev, &sum, x, a->n));
    got[0][0] = sum;
    return ds_end(&s, ES_OK);
}

/* NaN and inf among the values: scale 0 must zero them, other scales keep them */
static const struct {
    size_t n;
    float scale;
} scale_grid[] = {{0, 2}, {1, -0.5f}, {7, 0}, {65537, -3.7f}, {131075, 1e-3f}, {70001, 0}};

static void make_scale(hcase *c, int index) {
    rng r = rng_seeded(3400 + (uint64_t)index);
    vector_case *a = c->data = hc_alloc(c, sizeof *a);
    a->n = scale_grid[index].n, a->scale = scale_grid[index].scale;
    a->x = hc_normals(c, &r, a->n, 1.0);
    if (a->n > 5) a->x[1] = NAN, a->x[a->n / 2] = INFINITY, a->x[a->n - 1] = -INFINITY;
    hc_param(c, "n", (long)a->n);
    hc_note(c, "scale %g%s", a->scale, a->n > 5 ? ", NaN and inf" : "");
    double *x = hc_output(c, "x", a->n, 0);
    for (size_t i = 0; i < a->n; i++) x[i] = a->x[i];
    ref_scale(x, a->n, a->scale);
}

static int call_scale(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const vector_case *a = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *x;
    OUT(&s, x, a->x, a->n);
    OP(&s, es_scale(dev, x, a->n, a->scale));
    GET(&s, got[0], x, a->n);
    return ds_end(&s, ES_OK);
}

/* ---- rounding to a precision --------------------------------------------------------------------- */

typedef struct round_case {
    size_t n;
    es_precision precision;
    float *x;
} round_case;

/* kind 0: values across the precision's range with a third exact ties; 1: the special values
 * (±0, NaN, ±inf, the largest finite, past it, the smallest subnormals); n = 0 */
static const struct {
    es_precision precision;
    int kind;
    size_t n;
} round_grid[] = {
    {ES_PRECISION_FP32, 0, 4099},  {ES_PRECISION_TF32, 0, 4099}, {ES_PRECISION_BF16, 0, 65537}, {ES_PRECISION_FP8, 0, 4099},
    {ES_PRECISION_FP32, 1, 0},     {ES_PRECISION_TF32, 1, 0},    {ES_PRECISION_BF16, 1, 0},     {ES_PRECISION_FP8, 1, 0},
    {ES_PRECISION_BF16, 0, 0},
};

static const int mantissa_bits[] = {23, 10, 7, 3};

static float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static void make_round_precision(hcase *c, int index) {
    rng r = rng_seeded(3500 + (uint64_t)index);
    round_case *p = c->data = hc_alloc(c, sizeof *p);
    p->precision = round_grid[index].precision;
    const int bits = mantissa_bits[p->precision], drop = 23 - bits;
    if (round_grid[index].kind == 1) {
        const float specials[] = {0.0f, -0.0f, NAN, INFINITY, -INFINITY, FLT_MAX, -FLT_MAX, from_bits(1), from_bits(0x80000003),
                                  FLT_MIN, 448.0f, 464.0f, 465.0f, -480.0f, 1e6f, 0x1p-10f, 0x1p-9f, 3 * 0x1p-10f};
        p->n = sizeof specials / sizeof *specials;
        p->x = hc_floats(c, p->n);
        memcpy(p->x, specials, sizeof specials);
        hc_note(c, "%s, ±0, NaN, ±inf, ±max, subnormals, 448..480", precision_names[p->precision]);
    } else {
        p->n = round_grid[index].n;
        p->x = hc_floats(c, p->n);
        for (size_t i = 0; i < p->n; i++) {
            uint32_t u;
            if (p->precision == ES_PRECISION_FP8) /* fp8's range, 2^-12..2^10, and past it */
                p->x[i] = (float)((rng_below(&r, 2) ? -1 : 1) * ldexp(1.0 + rng_uniform(&r), rng_below(&r, 23) - 12));
            else /* every exponent, subnormals, NaN payloads, ±inf */
                p->x[i] = from_bits((uint32_t)rng_next(&r));
            if (i % 3 == 0 && drop > 0 && isfinite(p->x[i])) { /* an exact tie: the dropped bits are 100..0 */
                memcpy(&u, &p->x[i], sizeof u);
                u = (u & ~((1u << drop) - 1)) | (1u << (drop - 1));
                p->x[i] = from_bits(u);
            }
        }
        hc_note(c, "%s, random%s", precision_names[p->precision], drop ? " with ties" : "");
    }
    hc_param(c, "n", (long)p->n);
    double *x = hc_output(c, "x", p->n, 0);
    for (size_t i = 0; i < p->n; i++) x[i] = ref_round(p->x[i], p->precision);
}

static int call_round_precision(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const round_case *p = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *x;
    OUT(&s, x, p->x, p->n);
    OP(&s, es_round_precision(dev, x, p->n, p->precision));
    GET(&s, got[0], x, p->n);
    return ds_end(&s, ES_OK);
}

/* ---- standardise ---------------------------------------------------------------------------------- */

typedef struct standardise_case {
    int64_t n;
    int d, R, with_mean;
    es_precision precision;
    float *rows, *mean, *scale, *start;
    int64_t *row_index;
} standardise_case;

/* bad: source rows made non-finite, used at i = 40 only (1: a NaN), or at i = 150 and i = 70, in
 * the third and the second block of 64 rows (2: a NaN and an inf), so that the smallest must win
 * whichever block finishes first */
typedef struct standardise_shape {
    int64_t n;
    int d, R, with_mean, bad, tiny;
} standardise_shape;

static const standardise_shape standardise_fp32_grid[] = {
    {1, 1, 1, 0, 0, 0},      {65, 24, 20, 1, 1, 0},   {200, 515, 150, 0, 2, 0}, {64, 8, 16, 0, 0, 1} /* zero and 1e-9 rows */,
    {0, 8, 4, 1, 0, 0},      {130, 33, 130, 1, 0, 0},
};
static const standardise_shape standardise_narrow_grid[] = {{200, 64, 100, 1, 2, 0}, {150, 515, 150, 0, 1, 0}};

static void make_standardise(hcase *c, const standardise_shape *shape, es_precision precision, uint64_t seed) {
    rng r = rng_seeded(seed);
    standardise_case *z = c->data = hc_alloc(c, sizeof *z);
    z->n = shape->n, z->d = shape->d, z->R = shape->R, z->with_mean = shape->with_mean, z->precision = precision;
    const size_t rows_n = (size_t)z->R * z->d, out_n = (size_t)z->n * z->d;
    z->rows = hc_floats(c, rows_n);
    for (int i = 0; i < z->R; i++) /* teacher-like rows: an offset per dimension, a few huge ones */
        for (int k = 0; k < z->d; k++)
            z->rows[(size_t)i * z->d + k] = (float)((k % 7 == 3 ? 40.0 : 1.0) * rng_normal(&r) + 0.3 * (k % 5));
    z->row_index = hc_alloc(c, (size_t)z->n * sizeof *z->row_index);
    for (int64_t i = 0; i < z->n; i++) z->row_index[i] = rng_below(&r, z->R - shape->bad); /* the last rows are for poison */
    if (shape->tiny)
        for (int k = 0; k < z->d; k++) z->rows[k] = 0.0f, z->rows[z->d + k] = 1e-9f;
    if (shape->with_mean) {
        z->mean = hc_floats(c, (size_t)z->d), z->scale = hc_floats(c, (size_t)z->d);
        for (int k = 0; k < z->d; k++) z->mean[k] = (float)(0.3 * (k % 5)), z->scale[k] = k % 7 == 3 ? 40.0f : 1.0f;
    }
    const float poison[] = {NAN, INFINITY};
    const int64_t at[2][2] = {{40}, {150, 70}};
    for (int b = 0; b < shape->bad && b < 2; b++) {
        const int64_t i = at[shape->bad - 1][b] < z->n ? at[shape->bad - 1][b] : z->n - 1, row = z->R - 1 - b;
        z->row_index[i] = row;
        z->rows[(size_t)row * z->d + (size_t)(b * 5) % z->d] = poison[b];
    }
    z->start = hc_normals(c, &r, out_n, 7.0); /* what rows that are not written must keep */
    hc_param(c, "n", (long)z->n), hc_param(c, "d", z->d), hc_param(c, "R", z->R);
    hc_note(c, "%s, %s%s%s", precision_names[precision], z->with_mean ? "mean and scale" : "rms", shape->bad ? ", non-finite rows" : "",
            shape->tiny ? ", zero and tiny rows" : "");
    double *x_hat = hc_output(c, "x_hat", out_n, 0), *first_bad = hc_output(c, "first_bad", 1, 1);
    for (size_t i = 0; i < out_n; i++) x_hat[i] = z->start[i];
    *first_bad = (double)ref_standardise(x_hat, hc_widen(c, z->rows, rows_n), z->row_index,
                                         z->with_mean ? hc_widen(c, z->mean, (size_t)z->d) : NULL,
                                         z->with_mean ? hc_widen(c, z->scale, (size_t)z->d) : NULL, z->n, z->d, precision);
}

static void make_standardise_fp32(hcase *c, int i) { make_standardise(c, &standardise_fp32_grid[i], ES_PRECISION_FP32, 3600 + i); }
static void make_standardise_tf32(hcase *c, int i) { make_standardise(c, &standardise_narrow_grid[i], ES_PRECISION_TF32, 3610 + i); }
static void make_standardise_bf16(hcase *c, int i) { make_standardise(c, &standardise_narrow_grid[i], ES_PRECISION_BF16, 3620 + i); }
static void make_standardise_fp8(hcase *c, int i) { make_standardise(c, &standardise_narrow_grid[i], ES_PRECISION_FP8, 3630 + i); }

static int call_standardise(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const standardise_case *z = c->data;
    const size_t out_n = (size_t)z->n * z->d;
    dscope s;
    ds_begin(&s, dev, err);
    float *x_hat, *rows, *mean = NULL, *scale = NULL;
    int64_t *row_index, first_bad = -7;
    PUT(&s, rows, z->rows, (size_t)z->R * z->d * sizeof *rows);
    PUT(&s, row_index, z->row_index, (size_t)z->n * sizeof *row_index);
    if (z->with_mean) {
        PUT(&s, mean, z->mean, (size_t)z->d * sizeof *mean);
        PUT(&s, scale, z->scale, (size_t)z->d * sizeof *scale);
    }
    OUT(&s, x_hat, z->start, out_n);
    OP(&s, es_standardise(dev, x_hat, &first_bad, rows, row_index, mean, scale, z->n, z->d, z->precision));
    GET(&s, got[0], x_hat, out_n);
    got[1][0] = (double)first_bad;
    return ds_end(&s, ES_OK);
}

/* ---- Fourier features ----------------------------------------------------------------------------- */

typedef struct fourier_case {
    int T, d, m, timing;
    es_precision precision;
    float *x_hat, *omega;
    float omega_scale;
} fourier_case;

/* σ up to 30 rad: the phases' fp32 accumulation error grows with them (DESIGN.md's table) */
static const struct {
    int T, d, m;
    double sigma;
    es_precision precision;
    int timing;
    int prescale_log2; /* Ω times 2^k before rounding, the phases times 2^-k (fp8's range, kernels/fourier.h) */
} fourier_grid[] = {
    {1, 1, 1, 1, ES_PRECISION_FP32, 0, 0},     {5, 24, 8, 1, ES_PRECISION_FP32, 1, 0},
    {255, 64, 300, 3, ES_PRECISION_TF32, 0, 0}, {257, 130, 513, 10, ES_PRECISION_BF16, 1, 0} /* 2 blocks of 256 rows */,
    {600, 40, 64, 30, ES_PRECISION_FP32, 0, 0}, {256, 515, 8, 1, ES_PRECISION_FP8, 0, 0},
    {0, 8, 4, 1, ES_PRECISION_FP32, 1, 0},     {3, 8192, 16, 1, ES_PRECISION_FP32, 0, 0} /* the teacher's width */,
    /* d = 1 in bf16: each phase is one product of two 8-bit significands, exact in fp32, so only
     * cos and sin of phases up to ~4e4 rad are measured (an fp32 range reduction by one constant
     * 2π, as fast intrinsics do, gives nmse ~1e-7 here) */
    {300, 1, 64, 10000, ES_PRECISION_BF16, 0, 0},
    /* fp8 with Ω (sd 0.044, largest ~0.2) scaled into e4m3's normal range as essence-project scales
     * it: times 2^10 before rounding, omega_scale 2^-10 */
    {256, 512, 16, 1, ES_PRECISION_FP8, 0, 10},
};

static void make_fourier_features(hcase *c, int index) {
    rng r = rng_seeded(3700 + (uint64_t)index);
    fourier_case *f = c->data = hc_alloc(c, sizeof *f);
    f->T = fourier_grid[index].T, f->d = fourier_grid[index].d, f->m = fourier_grid[index].m;
    f->precision = fourier_grid[index].precision, f->timing = fourier_grid[index].timing;
    const size_t nx = (size_t)f->T * f->d, nw = (size_t)f->m * f->d;
    f->x_hat = hc_normals(c, &r, nx, 1.0);
    f->omega = hc_normals(c, &r, nw, fourier_grid[index].sigma / sqrt((double)f->d));
    /* the caller rounds both inputs to the precision (ops.h): here with the reference's rounding */
    const int k = fourier_grid[index].prescale_log2;
    f->omega_scale = (float)ldexp(1.0, -k);
    for (size_t i = 0; i < nx; i++) f->x_hat[i] = (float)ref_round(f->x_hat[i], f->precision);
    for (size_t i = 0; i < nw; i++) f->omega[i] = (float)ref_round(ldexp(f->omega[i], k), f->precision);
    double *omega_used = hc_widen(c, f->omega, nw); /* the phases' Ω: the rounded one scaled back, exactly */
    for (size_t i = 0; i < nw; i++) omega_used[i] = ldexp(omega_used[i], -k);
    hc_param(c, "T", f->T), hc_param(c, "d", f->d), hc_param(c, "m", f->m);
    hc_note(c, "sigma %g, %s%s%s", fourier_grid[index].sigma, precision_names[f->precision], f->timing ? ", timing" : "",
            k ? ", Ω prescaled" : "");
    ref_fourier_features(hc_output(c, "targets", (size_t)f->T * 2 * f->m, 0), hc_widen(c, f->x_hat, nx), omega_used, f->T, f->d,
                         f->m);
    if (f->timing) *hc_output(c, "timing added to", 1, 1) = 1; /* host fields only grow, and stay finite */
}

static void rows_fourier_features(hcase *sub, const hcase *full, int T) {
    fourier_case *f = sub->data = hc_alloc(sub, sizeof *f);
    *f = *(const fourier_case *)full->data;
    f->T = T, f->timing = 0;
    hc_param(sub, "T", T), hc_param(sub, "d", f->d), hc_param(sub, "m", f->m);
    hc_output(sub, "targets", (size_t)T * 2 * f->m, 0);
}

static int call_fourier_features(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const fourier_case *f = c->data;
    const size_t nx = (size_t)f->T * f->d, nw = (size_t)f->m * f->d, nt = (size_t)f->T * 2 * f->m;
    dscope s;
    ds_begin(&s, dev, err);
    float *x_hat, *omega, *targets;
    PUT(&s, x_hat, f->x_hat, nx * sizeof *x_hat);
    PUT(&s, omega, f->omega, nw * sizeof *omega);
    OUT(&s, targets, NULL, nt);
    es_fourier_timing timing = {1.0, 1.0, 1.0};
    OP(&s, es_fourier_features(dev, targets, x_hat, omega, f->omega_scale, f->T, f->d, f->m, f->precision, f->timing ? &timing : NULL));
    GET(&s, got[0], targets, nt);
    if (f->timing)
        got[1][0] = isfinite(timing.gemm_seconds + timing.epilogue_seconds + timing.gemm_flops) && timing.gemm_seconds >= 1.0 &&
                    timing.epilogue_seconds >= 1.0 && timing.gemm_flops >= 1.0;
    return ds_end(&s, ES_OK);
}

/* ---- the table ------------------------------------------------------------------------------------ */

PRESENT(latent_mse)
PRESENT(cross_entropy)
PRESENT(adamw_update)
PRESENT(round_weights)
PRESENT(sum_squares)
PRESENT(scale)
PRESENT(round_precision)
PRESENT(standardise)
PRESENT(fourier_features)

#define SPEC(op_name, grid, limit, op, make_fn, ...)                                             \
    {.name = op_name, .n_cases = COUNT(grid), .threshold = (limit), .device_threshold = HARNESS_DEVICE_FACTOR * (limit), \
     .present = has_##op, .make = make_fn, .call = call_##op, __VA_ARGS__}

const op_spec harness_train_ops[] = {
    SPEC("latent_mse", latent_grid, HARNESS_REDUCTION, latent_mse, make_latent_mse),          /* measured 2.1e-13 */
    /* 9.2e-14; bf16: x, the head and the logits' gradient rounded for the tensor cores */
    SPEC("cross_entropy", ce_grid, HARNESS_REDUCTION, cross_entropy, make_cross_entropy, .bf16_threshold = HARNESS_BF16_PRODUCT),
    /* 2.3e-14; tighter than a reduction's, since the update is small against p and an error in
     * it (a bias correction, eps's place) shows only as a small change of p */
    SPEC("adamw_update", adamw_grid, 1e-11, adamw_update, make_adamw_update),
    /* a copy on fp32 devices; bf16: one rounding, checked bit for bit inside the call */
    /* bf16: one rounding, but the n = 1 case is the tie alone, 2^-8 off ((2^-8)^2 = 1.5e-5 of nmse, more than
     * HARNESS_BF16_ROUNDING's average); the call checks every bit against common/dtype.h anyway */
    SPEC("round_weights", round_weights_grid, 0, round_weights, make_round_weights, .bf16_threshold = 4e-5),
    /* 2.2e-28: ops.h promises a sum in double; fp32 partial sums would give ~1e-14 */
    SPEC("sum_squares", sum_squares_grid, 1e-20, sum_squares, make_sum_squares),
    SPEC("scale", scale_grid, HARNESS_ELEMENTWISE, scale, make_scale), /* 6.4e-16: one rounding */
    SPEC("round_precision", round_grid, 0, round_precision, make_round_precision), /* exact by definition */
    SPEC("standardise", standardise_fp32_grid, HARNESS_ELEMENTWISE, standardise, make_standardise_fp32), /* 2.9e-16 */
    /* Rounded to a narrow format, a value whose fp32 arithmetic lands one fp32 ulp from the
     * reference's exact one flips to the next grid point when that ulp straddles a rounding
     * boundary (probability 2^-(23 - bits) per value): one flip of a typical value costs
     * 2^(-2 bits) / (n d) of nmse. The thresholds allow tens of flips over the ~10^4 values here
     * and stay 20-50x below what rounding by truncation, or no rounding, gives (2^(-2 bits) / 3,
     * / 12): tf32 measured 9.4e-12 (one flip), bf16 7.3e-14, fp8 0. */
    SPEC("standardise_tf32", standardise_narrow_grid, 1e-8, standardise, make_standardise_tf32),
    SPEC("standardise_bf16", standardise_narrow_grid, 1e-6, standardise, make_standardise_bf16),
    SPEC("standardise_fp8", standardise_narrow_grid, 1e-4, standardise, make_standardise_fp8),
    /* 1.1e-11 at sigma 30: the phases accumulate in fp32 (ops.h), so their error, and the
     * features', grows with the phases (DESIGN.md's H200 table: 1e-5 relative at sigma 30, i.e.
     * 1e-10); the exact-phase case keeps fast sin/cos (no exact range reduction) visible */
    SPEC("fourier_features", fourier_grid, 1e-9, fourier_features, make_fourier_features, .rows = rows_fourier_features,
         /* CUDA: the phases come out of the product in turns (1/(2 pi) folded into alpha, rounded
          * to fp32 there), an error of ~|phi| 2^-24 rad: the d = 1 case's exact phases of ~4e4 rad
          * give ~1e-6, the sigma-30 cases ~1e-11 */
         .bf16_threshold = 1e-5),
};
const int harness_n_train_ops = COUNT(harness_train_ops);
