/* The harness's cases for the products beyond one es_matmul_forward (docs/ops-harness.md):
 *  - those that share their input (es_matmul_forward_group, es_matmul_backward_group: a layer's
 *    q, k and v, its gate and up): each part against the double reference of its own product, din
 *    against the sum of the parts'. The parts' outputs are compared as one concatenated output
 *    each (out; dweight, dbias), so that a part written over another's, or left out, shows as much
 *    as a wrong value. The grid mixes widths and biases as a layer does, and a part of one column;
 *  - the product with the residual stream added (es_matmul_forward_residual: a layer's o
 *    projection), over matmul_forward's grid;
 *  - the MLP's second half (es_swiglu_down_forward, es_swiglu_down_backward: the activation made
 *    from gate and up where it is needed, never stored), against SwiGLU's and the product's
 *    references chained; gates of sd 3 with some far out, as swiglu's own cases. */
#include <math.h>
#include <string.h>

#include "harness_internal.h"

#define COUNT(a) ((int)(sizeof(a) / sizeof *(a)))
enum { MAX_PARTS = 3 };

typedef struct group_case {
    int T, C, n, OC[MAX_PARTS], bias[MAX_PARTS];
    size_t out_total, weight_total, bias_total; /* the parts' sizes, concatenated */
    float *in, *weight[MAX_PARTS], *bias_values[MAX_PARTS], *dout[MAX_PARTS];
    float *dweight_start, *dbias_start; /* (weight_total), (bias_total) */
} group_case;

static const struct {
    int T, C, n, OC[MAX_PARTS], bias; /* bias: bit i for part i */
} group_grid[] = {
    {1, 1, 2, {1, 3}, 1},           {3, 7, 3, {5, 1, 1}, 7},       {257, 24, 3, {513, 64, 64}, 7} /* q, k, v */,
    {300, 130, 2, {1030, 1030}, 0} /* gate, up */, {0, 8, 2, {8, 8}, 3} /* no tokens */,
    {64, 1536, 3, {1536, 256, 256}, 7} /* the student's q, k, v */, {40, 96, 3, {200, 17, 600}, 2},
};

static group_case *group_inputs(hcase *c, rng *r, int index) {
    group_case *g = c->data = hc_alloc(c, sizeof *g);
    g->T = group_grid[index].T, g->C = group_grid[index].C, g->n = group_grid[index].n;
    g->in = hc_normals(c, r, (size_t)g->T * g->C, 1.0);
    for (int i = 0; i < g->n; i++) {
        g->OC[i] = group_grid[index].OC[i], g->bias[i] = group_grid[index].bias >> i & 1;
        g->weight[i] = hc_normals(c, r, (size_t)g->OC[i] * g->C, 1.0 / sqrt((double)g->C));
        if (g->bias[i]) g->bias_values[i] = hc_normals(c, r, (size_t)g->OC[i], 1.0);
        g->out_total += (size_t)g->T * g->OC[i], g->weight_total += (size_t)g->OC[i] * g->C, g->bias_total += g->bias[i] ? g->OC[i] : 0;
    }
    hc_param(c, "T", g->T), hc_param(c, "C", g->C), hc_param(c, "parts", g->n);
    for (int i = 0; i < g->n; i++) hc_param(c, i == 0 ? "OC0" : i == 1 ? "OC1" : "OC2", g->OC[i]);
    hc_note(c, "biases %d%d%d", g->bias[0], g->bias[1], g->n > 2 ? g->bias[2] : 0);
    return g;
}

static void make_matmul_forward_group(hcase *c, int index) {
    rng r = rng_seeded(3100 + (uint64_t)index);
    group_case *g = group_inputs(c, &r, index);
    double *out = hc_output(c, "out", g->out_total, 0), *in = hc_widen(c, g->in, (size_t)g->T * g->C);
    for (int i = 0; i < g->n; i++) {
        ref_matmul_forward(out, in, hc_widen(c, g->weight[i], (size_t)g->OC[i] * g->C),
                           g->bias[i] ? hc_widen(c, g->bias_values[i], (size_t)g->OC[i]) : NULL, g->T, g->C, g->OC[i]);
        out += (size_t)g->T * g->OC[i];
    }
}

/* The parts' weights and biases on the device, into part[] (out left NULL); nonzero: the scope
 * has ended with that code. */
static int put_parts(dscope *s, const group_case *g, es_matmul_part *part) {
    for (int i = 0; i < g->n; i++) {
        void *weight, *bias = NULL;
        PUT_WEIGHTS(s, weight, g->weight[i], (size_t)g->OC[i] * g->C);
        if (g->bias[i]) PUT_WEIGHTS(s, bias, g->bias_values[i], (size_t)g->OC[i]);
        part[i] = (es_matmul_part){NULL, weight, bias, g->OC[i]};
    }
    return 0;
}

static int call_matmul_forward_group(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const group_case *g = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *in, *out;
    es_matmul_part part[MAX_PARTS];
    PUT(&s, in, g->in, (size_t)g->T * g->C * sizeof *in);
    const int rc = put_parts(&s, g, part);
    if (rc) return rc;
    OUT(&s, out, NULL, g->out_total); /* the parts' outputs side by side in one allocation */
    for (size_t i = 0, at = 0; i < (size_t)g->n; at += (size_t)g->T * g->OC[i], i++) part[i].out = out + at;
    OP(&s, es_matmul_forward_group(dev, part, g->n, in, g->T, g->C));
    GET(&s, got[0], out, g->out_total);
    return ds_end(&s, ES_OK);
}

static void make_matmul_backward_group(hcase *c, int index) {
    rng r = rng_seeded(3200 + (uint64_t)index);
    group_case *g = group_inputs(c, &r, index);
    const size_t TC = (size_t)g->T * g->C;
    double *din = hc_output(c, "din", TC, 0), *dweight = hc_output(c, "dweight", g->weight_total, 0);
    double *dbias = g->bias_total ? hc_output(c, "dbias", g->bias_total, 0) : NULL;
    double *din_part = hc_doubles(c, TC), *in = hc_widen(c, g->in, TC);
    double *dw = dweight, *db = dbias;
    for (int i = 0; i < g->n; i++) {
        g->dout[i] = hc_normals(c, &r, (size_t)g->T * g->OC[i], 1.0);
        ref_matmul_backward(din_part, dw, g->bias[i] ? db : NULL, hc_widen(c, g->dout[i], (size_t)g->T * g->OC[i]), in,
                            hc_widen(c, g->weight[i], (size_t)g->OC[i] * g->C), g->T, g->C, g->OC[i]);
        for (size_t k = 0; k < TC; k++) din[k] += din_part[k];
        dw += (size_t)g->OC[i] * g->C, db += g->bias[i] ? g->OC[i] : 0;
    }
    g->dweight_start = hc_accumulate_start(c, &r, dweight, g->weight_total);
    if (dbias) g->dbias_start = hc_accumulate_start(c, &r, dbias, g->bias_total);
}

static int call_matmul_backward_group(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const group_case *g = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *in, *din, *dweight, *dbias = NULL, *dout[MAX_PARTS];
    es_matmul_part part[MAX_PARTS];
    es_matmul_part_grad grad[MAX_PARTS];
    PUT(&s, in, g->in, (size_t)g->T * g->C * sizeof *in);
    const int rc = put_parts(&s, g, part);
    if (rc) return rc;
    for (int i = 0; i < g->n; i++) PUT(&s, dout[i], g->dout[i], (size_t)g->T * g->OC[i] * sizeof *dout[i]);
    OUT(&s, din, NULL, (size_t)g->T * g->C);
    OUT(&s, dweight, g->dweight_start, g->weight_total);
    if (g->bias_total) OUT(&s, dbias, g->dbias_start, g->bias_total);
    size_t w_at = 0, b_at = 0;
    for (int i = 0; i < g->n; i++) {
        grad[i] = (es_matmul_part_grad){dout[i], dweight + w_at, g->bias[i] ? dbias + b_at : NULL};
        w_at += (size_t)g->OC[i] * g->C, b_at += g->bias[i] ? g->OC[i] : 0;
    }
    OP(&s, es_matmul_backward_group(dev, din, grad, part, g->n, in, g->T, g->C));
    GET(&s, got[0], din, (size_t)g->T * g->C);
    GET(&s, got[1], dweight, g->weight_total);
    if (dbias) GET(&s, got[2], dbias, g->bias_total);
    return ds_end(&s, ES_OK);
}

/* ---- the product with a residual ------------------------------------------------------------ */

typedef struct residual_case {
    int T, C, OC, bias;
    float *in, *weight, *bias_values, *residual;
} residual_case;

static const struct {
    int T, C, OC, bias;
} residual_grid[] = {
    {1, 1, 1, 1}, {3, 7, 5, 0}, {257, 24, 513, 1}, {513, 130, 1030, 0}, {0, 8, 8, 0}, {300, 515, 3, 1}, {64, 1536, 600, 0},
};

static void make_matmul_forward_residual(hcase *c, int index) {
    rng r = rng_seeded(3300 + (uint64_t)index);
    residual_case *m = c->data = hc_alloc(c, sizeof *m);
    m->T = residual_grid[index].T, m->C = residual_grid[index].C, m->OC = residual_grid[index].OC, m->bias = residual_grid[index].bias;
    m->in = hc_normals(c, &r, (size_t)m->T * m->C, 1.0);
    m->weight = hc_normals(c, &r, (size_t)m->OC * m->C, 1.0 / sqrt((double)m->C));
    if (m->bias) m->bias_values = hc_normals(c, &r, (size_t)m->OC, 1.0);
    m->residual = hc_normals(c, &r, (size_t)m->T * m->OC, 3.0); /* a stream larger than the branch, as a layer's */
    hc_param(c, "T", m->T), hc_param(c, "C", m->C), hc_param(c, "OC", m->OC);
    hc_note(c, m->bias ? "bias" : "no bias");
    const size_t n = (size_t)m->T * m->OC;
    double *out = hc_output(c, "out", n, 0);
    ref_matmul_forward(out, hc_widen(c, m->in, (size_t)m->T * m->C), hc_widen(c, m->weight, (size_t)m->OC * m->C),
                       m->bias ? hc_widen(c, m->bias_values, (size_t)m->OC) : NULL, m->T, m->C, m->OC);
    for (size_t i = 0; i < n; i++) out[i] += m->residual[i];
}

static int call_matmul_forward_residual(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const residual_case *m = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *in, *residual, *out;
    void *weight, *bias = NULL;
    PUT(&s, in, m->in, (size_t)m->T * m->C * sizeof *in);
    PUT(&s, residual, m->residual, (size_t)m->T * m->OC * sizeof *residual);
    PUT_WEIGHTS(&s, weight, m->weight, (size_t)m->OC * m->C);
    if (m->bias) PUT_WEIGHTS(&s, bias, m->bias_values, (size_t)m->OC);
    OUT(&s, out, NULL, (size_t)m->T * m->OC);
    OP(&s, es_matmul_forward_residual(dev, out, residual, in, weight, bias, m->T, m->C, m->OC));
    GET(&s, got[0], out, (size_t)m->T * m->OC);
    return ds_end(&s, ES_OK);
}

/* ---- the MLP's second half ------------------------------------------------------------------- */

typedef struct down_case {
    int T, I, C, bias;
    float *gate, *up, *weight, *bias_values, *residual, *dout, *dweight_start, *dbias_start;
} down_case;

static const struct {
    int T, I, C, bias;
} down_grid[] = {
    {1, 1, 1, 1}, {3, 7, 5, 0}, {257, 130, 24, 1}, {300, 515, 64, 0}, {0, 8, 8, 1}, {64, 600, 1536, 0} /* a student's down */,
    {257, 32769, 3, 1} /* wide enough that the CPU takes the rows in chunks (256, then 1 padded) */,
};

static down_case *down_inputs(hcase *c, rng *r, int index) {
    down_case *m = c->data = hc_alloc(c, sizeof *m);
    m->T = down_grid[index].T, m->I = down_grid[index].I, m->C = down_grid[index].C, m->bias = down_grid[index].bias;
    const size_t n = (size_t)m->T * m->I;
    m->gate = hc_normals(c, r, n, 3.0);
    if (n > 4) m->gate[0] = 30.0f, m->gate[1] = -30.0f, m->gate[2] = 88.5f, m->gate[3] = -100.0f; /* silu's far ends */
    m->up = hc_normals(c, r, n, 1.0);
    m->weight = hc_normals(c, r, (size_t)m->C * m->I, 1.0 / sqrt((double)m->I));
    if (m->bias) m->bias_values = hc_normals(c, r, (size_t)m->C, 1.0);
    hc_param(c, "T", m->T), hc_param(c, "I", m->I), hc_param(c, "C", m->C);
    hc_note(c, m->bias ? "bias" : "no bias");
    return m;
}

/* The double reference's activation, silu(gate) · up (T, I). */
static double *down_act(hcase *c, const down_case *m) {
    const size_t n = (size_t)m->T * m->I;
    double *act = hc_doubles(c, n);
    ref_swiglu_forward(act, hc_widen(c, m->gate, n), hc_widen(c, m->up, n), n);
    return act;
}

static void make_swiglu_down_forward(hcase *c, int index) {
    rng r = rng_seeded(3400 + (uint64_t)index);
    down_case *m = down_inputs(c, &r, index);
    m->residual = hc_normals(c, &r, (size_t)m->T * m->C, 3.0);
    double *out = hc_output(c, "out", (size_t)m->T * m->C, 0);
    ref_matmul_forward(out, down_act(c, m), hc_widen(c, m->weight, (size_t)m->C * m->I),
                       m->bias ? hc_widen(c, m->bias_values, (size_t)m->C) : NULL, m->T, m->I, m->C);
    for (size_t i = 0; i < (size_t)m->T * m->C; i++) out[i] += m->residual[i];
}

static int call_swiglu_down_forward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const down_case *m = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *gate, *up, *residual, *out;
    void *weight, *bias = NULL;
    const size_t n = (size_t)m->T * m->I;
    PUT(&s, gate, m->gate, n * sizeof *gate);
    PUT(&s, up, m->up, n * sizeof *up);
    PUT(&s, residual, m->residual, (size_t)m->T * m->C * sizeof *residual);
    PUT_WEIGHTS(&s, weight, m->weight, (size_t)m->C * m->I);
    if (m->bias) PUT_WEIGHTS(&s, bias, m->bias_values, (size_t)m->C);
    OUT(&s, out, NULL, (size_t)m->T * m->C);
    OP(&s, es_swiglu_down_forward(dev, out, residual, gate, up, weight, bias, m->T, m->I, m->C));
    GET(&s, got[0], out, (size_t)m->T * m->C);
    return ds_end(&s, ES_OK);
}

static void make_swiglu_down_backward(hcase *c, int index) {
    rng r = rng_seeded(3500 + (uint64_t)index);
    down_case *m = down_inputs(c, &r, index);
    const size_t n = (size_t)m->T * m->I;
    m->dout = hc_normals(c, &r, (size_t)m->T * m->C, 1.0);
    double *dgate = hc_output(c, "dgate", n, 0), *dup = hc_output(c, "dup", n, 0);
    double *dweight = hc_output(c, "dweight", (size_t)m->C * m->I, 0);
    double *dbias = m->bias ? hc_output(c, "dbias", (size_t)m->C, 0) : NULL;
    double *dact = hc_doubles(c, n);
    ref_matmul_backward(dact, dweight, dbias, hc_widen(c, m->dout, (size_t)m->T * m->C), down_act(c, m),
                        hc_widen(c, m->weight, (size_t)m->C * m->I), m->T, m->I, m->C);
    ref_swiglu_backward(dgate, dup, dact, hc_widen(c, m->gate, n), hc_widen(c, m->up, n), n);
    m->dweight_start = hc_accumulate_start(c, &r, dweight, (size_t)m->C * m->I);
    if (dbias) m->dbias_start = hc_accumulate_start(c, &r, dbias, (size_t)m->C);
}

static int call_swiglu_down_backward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const down_case *m = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *gate, *up, *dout, *dgate, *dup, *dweight, *dbias = NULL;
    void *weight;
    const size_t n = (size_t)m->T * m->I;
    PUT(&s, gate, m->gate, n * sizeof *gate);
    PUT(&s, up, m->up, n * sizeof *up);
    PUT(&s, dout, m->dout, (size_t)m->T * m->C * sizeof *dout);
    PUT_WEIGHTS(&s, weight, m->weight, (size_t)m->C * m->I);
    OUT(&s, dgate, NULL, n);
    OUT(&s, dup, NULL, n);
    OUT(&s, dweight, m->dweight_start, (size_t)m->C * m->I);
    if (m->bias) OUT(&s, dbias, m->dbias_start, (size_t)m->C);
    OP(&s, es_swiglu_down_backward(dev, dgate, dup, dweight, dbias, dout, gate, up, weight, m->T, m->I, m->C));
    GET(&s, got[0], dgate, n);
    GET(&s, got[1], dup, n);
    GET(&s, got[2], dweight, (size_t)m->C * m->I);
    if (dbias) GET(&s, got[3], dbias, (size_t)m->C);
    return ds_end(&s, ES_OK);
}

/* ---- the table ------------------------------------------------------------------------------------ */

/* Every backend has the forwards (without an entry of its own, es_matmul_forward_group makes one
 * product per part, es_matmul_forward_residual a product and an add); the group's backward is the
 * backend's own. */
static int has_matmul_forward_group(const es_backend *b) { return b->matmul_forward != NULL; }
static int has_matmul_forward_residual(const es_backend *b) { return b->matmul_forward != NULL && b->add != NULL; }
static int has_swiglu_down_forward(const es_backend *b) { return b->swiglu_down_forward != NULL; }
static int has_swiglu_down_backward(const es_backend *b) { return b->swiglu_down_backward != NULL; }
static int has_matmul_backward_group(const es_backend *b) { return b->matmul_backward_group != NULL; }

const op_spec harness_product_ops[] = {
    /* as matmul_forward's: each part is one such product */
    {.name = "matmul_forward_group", .n_cases = COUNT(group_grid), .threshold = HARNESS_REDUCTION,
     .device_threshold = HARNESS_DEVICE_FACTOR * HARNESS_REDUCTION, .bf16_threshold = HARNESS_BF16_PRODUCT,
     .present = has_matmul_forward_group, .make = make_matmul_forward_group, .call = call_matmul_forward_group},
    /* as matmul_backward's: din sums up to three such products */
    {.name = "matmul_backward_group", .n_cases = COUNT(group_grid), .threshold = HARNESS_REDUCTION,
     .device_threshold = HARNESS_DEVICE_FACTOR * HARNESS_REDUCTION, .bf16_threshold = HARNESS_BF16_PRODUCT,
     .present = has_matmul_backward_group, .make = make_matmul_backward_group, .call = call_matmul_backward_group},
    /* as matmul_forward's, the residual added exactly or by one more rounding */
    {.name = "matmul_forward_residual", .n_cases = COUNT(residual_grid), .threshold = HARNESS_REDUCTION,
     .device_threshold = HARNESS_DEVICE_FACTOR * HARNESS_REDUCTION, .bf16_threshold = HARNESS_BF16_PRODUCT,
     .present = has_matmul_forward_residual, .make = make_matmul_forward_residual, .call = call_matmul_forward_residual},
    /* a product over an element-wise op's values, as matmul_forward's; bf16: the activation and
     * the weight rounded */
    {.name = "swiglu_down_forward", .n_cases = COUNT(down_grid), .threshold = HARNESS_REDUCTION,
     .device_threshold = HARNESS_DEVICE_FACTOR * HARNESS_REDUCTION, .bf16_threshold = HARNESS_BF16_PRODUCT,
     .present = has_swiglu_down_forward, .make = make_swiglu_down_forward, .call = call_swiglu_down_forward},
    /* as matmul_backward's and swiglu_backward's chained; bf16: the activation's gradient is a bf16
     * product that SwiGLU's backward then scales (1.8e-5 measured on the emulated backend, on the
     * case of one element: a chain's threshold) */
    {.name = "swiglu_down_backward", .n_cases = COUNT(down_grid), .threshold = HARNESS_REDUCTION,
     .device_threshold = HARNESS_DEVICE_FACTOR * HARNESS_REDUCTION, .bf16_threshold = HARNESS_BF16_CHAIN,
     .present = has_swiglu_down_backward, .make = make_swiglu_down_backward, .call = call_swiglu_down_backward},
};
const int harness_n_product_ops = COUNT(harness_product_ops);
