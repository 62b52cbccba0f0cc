/* The harness's grid for the decoder-layer ops (kernels/ops.h, forward and backward): shapes,
 * inputs, references, how each op is called, and the thresholds (docs/ops-harness.md says why
 * each is what it is).
 *
 * The grids cross every boundary where the CPU backend cuts work, so that a tile, chunk or block
 * edge handled wrongly shows: products tile by 256 rows x 512 columns (matmul forward pads its last
 * row tile to 256), row-wise ops go by blocks of 32768 values (ELEMENT_BLOCK / C rows), attention by
 * query blocks of 128 and switches to its large backward path past 2^24 multiply-adds per head
 * (520² x 64), RMSNorm's dweight by 64 tokens x 256 columns. Written outputs start as NaN, accumulated
 * ones as random values of the gradient's size. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "harness_internal.h"

#define PRESENT(op)                                                                                 \
    static int has_##op(const es_backend *b) { return b->op != NULL; }
#define COUNT(a) ((int)(sizeof(a) / sizeof *(a)))

/* ---- embedding ------------------------------------------------------------------------------- */

typedef struct embedding_case {
    int T, C, V;
    es_dtype dtype;
    int32_t *ids;
    void *table;     /* (V, C) of dtype: device memory when fp32, else read from the host (a mapping) */
    size_t table_bytes;
    float *dout, *dtable_start;
} embedding_case;

static const struct {
    int T, C, V;
    es_dtype dtype;
} embedding_grid[] = {
    {1, 1, 1, ES_DT_F32},          {7, 24, 5, ES_DT_F32},      {300, 515, 40, ES_DT_F32},
    {0, 8, 3, ES_DT_F32},
    {256, 256, 256, ES_DT_BF16}, /* every bf16 value once: NaN, ±inf, subnormals */
    {256, 256, 256, ES_DT_F16},  /* every fp16 value once */
    {16, 16, 16, ES_DT_F8_E4M3}, /* every e4m3 value once */
};

static embedding_case *embedding_inputs(hcase *c, int index, rng *r) {
    embedding_case *e = c->data = hc_alloc(c, sizeof *e);
    e->T = embedding_grid[index].T, e->C = embedding_grid[index].C, e->V = embedding_grid[index].V;
    e->dtype = embedding_grid[index].dtype;
    const size_t n = (size_t)e->V * e->C;
    e->ids = hc_alloc(c, (size_t)e->T * sizeof *e->ids);
    if (e->dtype == ES_DT_F32) {
        e->table = hc_normals(c, r, n, 1.0), e->table_bytes = n * sizeof(float);
        for (int t = 0; t < e->T; t++) e->ids[t] = t == 0 ? e->V - 1 : rng_below(r, e->V);
    } else {
        /* value i of the table holds the bit pattern i; the ids visit every row once, shuffled */
        const size_t width = es_dtype_size(e->dtype);
        unsigned char *bytes = e->table = hc_alloc(c, n * width);
        e->table_bytes = n * width;
        for (size_t i = 0; i < n; i++) {
            const uint16_t pattern = (uint16_t)i;
            if (width == 2) memcpy(bytes + 2 * i, &pattern, 2);
            else bytes[i] = (unsigned char)i;
        }
        for (int t = 0; t < e->T; t++) e->ids[t] = t;
        for (int t = e->T - 1; t > 0; t--) {
            const int u = rng_below(r, t + 1);
            const int32_t swap = e->ids[t];
            e->ids[t] = e->ids[u], e->ids[u] = swap;
        }
    }
    hc_param(c, "T", e->T), hc_param(c, "C", e->C), hc_param(c, "V", e->V);
    hc_note(c, "%s table%s", es_dtype_name(e->dtype), e->dtype == ES_DT_F32 ? "" : " on the host");
    return e;
}

static void make_embedding_forward(hcase *c, int index) {
    rng r = rng_seeded(1000 + (uint64_t)index);
    embedding_case *e = embedding_inputs(c, index, &r);
    double *table = hc_doubles(c, (size_t)e->V * e->C);
    ref_decode(table, e->table, e->dtype, (size_t)e->V * e->C);
    ref_embedding_forward(hc_output(c, "out", (size_t)e->T * e->C, 0), e->ids, table, e->T, e->C);
}

static int call_embedding_forward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const embedding_case *e = c->data;
    const size_t n = (size_t)e->T * e->C;
    dscope s;
    ds_begin(&s, dev, err);
    int32_t *ids;
    float *out;
    const void *table = e->table;
    PUT(&s, ids, e->ids, (size_t)e->T * sizeof *ids);
    es_dtype dtype = e->dtype;
    if (e->dtype == ES_DT_F32) { /* a device table is in the device's weight format */
        void *on_device;
        PUT_WEIGHTS(&s, on_device, e->table, e->table_bytes / sizeof(float));
        table = on_device, dtype = dev->weight_dtype;
    }
    OUT(&s, out, NULL, n);
    OP(&s, es_embedding_forward(dev, out, ids, table, dtype, e->T, e->C));
    GET(&s, got[0], out, n);
    return ds_end(&s, ES_OK);
}

static const struct {
    int T, C, V;
} embedding_backward_grid[] = {{1, 1, 1}, {9, 24, 5}, {300, 515, 40}, {0, 8, 3}, {70, 33, 2} /* ids repeat many times */};

static void make_embedding_backward(hcase *c, int index) {
    rng r = rng_seeded(1100 + (uint64_t)index);
    embedding_case *e = c->data = hc_alloc(c, sizeof *e);
    e->T = embedding_backward_grid[index].T, e->C = embedding_backward_grid[index].C, e->V = embedding_backward_grid[index].V;
    e->ids = hc_alloc(c, (size_t)e->T * sizeof *e->ids);
    for (int t = 0; t < e->T; t++) e->ids[t] = rng_below(&r, e->V);
    e->dout = hc_normals(c, &r, (size_t)e->T * e->C, 1.0);
    hc_param(c, "T", e->T), hc_param(c, "C", e->C), hc_param(c, "V", e->V);
    double *dtable = hc_output(c, "dtable", (size_t)e->V * e->C, 0);
    ref_embedding_backward(dtable, e->ids, hc_widen(c, e->dout, (size_t)e->T * e->C), e->T, e->C);
    e->dtable_start = hc_accumulate_start(c, &r, dtable, (size_t)e->V * e->C);
}

static int call_embedding_backward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const embedding_case *e = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    int32_t *ids;
    float *dout, *dtable;
    PUT(&s, ids, e->ids, (size_t)e->T * sizeof *ids);
    PUT(&s, dout, e->dout, (size_t)e->T * e->C * sizeof *dout);
    OUT(&s, dtable, e->dtable_start, (size_t)e->V * e->C);
    OP(&s, es_embedding_backward(dev, dtable, ids, dout, e->T, e->C));
    GET(&s, got[0], dtable, (size_t)e->V * e->C);
    return ds_end(&s, ES_OK);
}

/* ---- RMSNorm ------------------------------------------------------------------------------------ */

typedef struct rmsnorm_case {
    int T, C, alias, with_dweight;
    float eps;
    float *in, *weight, *dout, *dweight_start;
} rmsnorm_case;

/* eps 0.5, or inputs of rms 1e-3 against eps 1e-5, make eps's place in the formula visible */
static const struct {
    int T, C;
    float eps;
    double sd;
    int alias;
} rmsnorm_grid[] = {
    {1, 1, 1e-6f, 1, 0},    {3, 7, 1e-5f, 1, 1}, {5, 515, 1e-6f, 1, 0},  {700, 100, 1e-5f, 1, 1} /* 3 blocks of 327 rows */,
    {2, 40000, 1e-6f, 1, 0}, {33, 64, 1e-5f, 1e-3, 0}, {17, 24, 0.5f, 1, 0}, {0, 16, 1e-5f, 1, 0},
    {300, 1536, 1e-6f, 1, 1},
};

static rmsnorm_case *rmsnorm_inputs(hcase *c, rng *r, int T, int C, float eps, double sd) {
    rmsnorm_case *n = c->data = hc_alloc(c, sizeof *n);
    n->T = T, n->C = C, n->eps = eps;
    n->in = hc_normals(c, r, (size_t)T * C, sd);
    n->weight = hc_floats(c, (size_t)C);
    for (int i = 0; i < C; i++) n->weight[i] = (float)(1.0 + 0.3 * rng_normal(r));
    hc_param(c, "T", T), hc_param(c, "C", C);
    hc_note(c, "eps %g%s", eps, sd != 1 ? ", rms 1e-3" : "");
    return n;
}

static void make_rmsnorm_forward(hcase *c, int index) {
    rng r = rng_seeded(1200 + (uint64_t)index);
    rmsnorm_case *n = rmsnorm_inputs(c, &r, rmsnorm_grid[index].T, rmsnorm_grid[index].C, rmsnorm_grid[index].eps,
                                     rmsnorm_grid[index].sd);
    n->alias = rmsnorm_grid[index].alias;
    if (n->alias) hc_note(c, "out = in");
    const size_t size = (size_t)n->T * n->C;
    ref_rmsnorm_forward(hc_output(c, "out", size, 0), hc_widen(c, n->in, size), hc_widen(c, n->weight, (size_t)n->C), n->T, n->C,
                        n->eps);
}

static int call_rmsnorm_forward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const rmsnorm_case *n = c->data;
    const size_t size = (size_t)n->T * n->C;
    dscope s;
    ds_begin(&s, dev, err);
    float *in, *out;
    void *weight;
    PUT(&s, in, n->in, size * sizeof *in);
    PUT_WEIGHTS(&s, weight, n->weight, (size_t)n->C);
    if (n->alias) out = in;
    else OUT(&s, out, NULL, size);
    OP(&s, es_rmsnorm_forward(dev, out, in, weight, n->T, n->C, n->eps));
    GET(&s, got[0], out, size);
    return ds_end(&s, ES_OK);
}

static const struct {
    int T, C;
    float eps;
    double sd;
    int with_dweight;
} rmsnorm_backward_grid[] = {
    {1, 1, 1e-6f, 1, 1},      {3, 7, 0.5f, 1, 1},       {65, 515, 1e-5f, 1, 1} /* 64-token, 256-column blocks */,
    {300, 24, 1e-5f, 1e-3, 1}, {5, 8, 1e-6f, 1, 0},      {0, 16, 1e-5f, 1, 1},
    {2, 40000, 1e-6f, 1, 1},
};

static void make_rmsnorm_backward(hcase *c, int index) {
    rng r = rng_seeded(1300 + (uint64_t)index);
    rmsnorm_case *n = rmsnorm_inputs(c, &r, rmsnorm_backward_grid[index].T, rmsnorm_backward_grid[index].C,
                                     rmsnorm_backward_grid[index].eps, rmsnorm_backward_grid[index].sd);
    n->with_dweight = rmsnorm_backward_grid[index].with_dweight;
    if (!n->with_dweight) hc_note(c, "dweight NULL");
    const size_t size = (size_t)n->T * n->C;
    n->dout = hc_normals(c, &r, size, 1.0);
    double *din = hc_output(c, "din", size, 0), *dweight = n->with_dweight ? hc_output(c, "dweight", (size_t)n->C, 0) : NULL;
    ref_rmsnorm_backward(din, dweight, hc_widen(c, n->dout, size), hc_widen(c, n->in, size), hc_widen(c, n->weight, (size_t)n->C),
                         n->T, n->C, n->eps);
    if (dweight) n->dweight_start = hc_accumulate_start(c, &r, dweight, (size_t)n->C);
}

static int call_rmsnorm_backward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const rmsnorm_case *n = c->data;
    const size_t size = (size_t)n->T * n->C;
    dscope s;
    ds_begin(&s, dev, err);
    float *in, *dout, *din, *dweight = NULL;
    void *weight;
    PUT(&s, in, n->in, size * sizeof *in);
    PUT_WEIGHTS(&s, weight, n->weight, (size_t)n->C);
    PUT(&s, dout, n->dout, size * sizeof *dout);
    OUT(&s, din, NULL, size);
    if (n->with_dweight) OUT(&s, dweight, n->dweight_start, (size_t)n->C);
    OP(&s, es_rmsnorm_backward(dev, din, dweight, dout, in, weight, n->T, n->C, n->eps));
    GET(&s, got[0], din, size);
    if (dweight) GET(&s, got[1], dweight, (size_t)n->C);
    return ds_end(&s, ES_OK);
}

/* ---- matmul ------------------------------------------------------------------------------------ */

typedef struct matmul_case {
    int T, C, OC, bias, with_din, with_dbias;
    float *in, *weight, *bias_values, *dout, *dweight_start, *dbias_start;
} matmul_case;

static const struct {
    int T, C, OC, bias;
} matmul_grid[] = {
    {1, 1, 1, 1},       {1, 16, 513, 1},   {3, 7, 5, 0},       {255, 33, 17, 1}, {256, 64, 512, 0} /* exactly one tile */,
    {257, 24, 513, 1},  {513, 130, 1030, 1} /* 3 x 3 tiles, a padded last row tile */, {0, 8, 8, 1},
    {300, 515, 3, 0},   {64, 1536, 600, 1} /* a student's width */,
};

static matmul_case *matmul_inputs(hcase *c, rng *r, int T, int C, int OC) {
    matmul_case *m = c->data = hc_alloc(c, sizeof *m);
    m->T = T, m->C = C, m->OC = OC;
    m->in = hc_normals(c, r, (size_t)T * C, 1.0);
    m->weight = hc_normals(c, r, (size_t)OC * C, 1.0 / sqrt((double)C));
    hc_param(c, "T", T), hc_param(c, "C", C), hc_param(c, "OC", OC);
    return m;
}

static void make_matmul_forward(hcase *c, int index) {
    rng r = rng_seeded(1400 + (uint64_t)index);
    matmul_case *m = matmul_inputs(c, &r, matmul_grid[index].T, matmul_grid[index].C, matmul_grid[index].OC);
    m->bias = matmul_grid[index].bias;
    hc_note(c, m->bias ? "bias" : "no bias");
    if (m->bias) m->bias_values = hc_normals(c, &r, (size_t)m->OC, 1.0);
    ref_matmul_forward(hc_output(c, "out", (size_t)m->T * m->OC, 0), hc_widen(c, m->in, (size_t)m->T * m->C),
                       hc_widen(c, m->weight, (size_t)m->OC * m->C), m->bias ? hc_widen(c, m->bias_values, (size_t)m->OC) : NULL,
                       m->T, m->C, m->OC);
}

static void rows_matmul_forward(hcase *sub, const hcase *full, int T) {
    matmul_case *m = sub->data = hc_alloc(sub, sizeof *m);
    *m = *(const matmul_case *)full->data;
    m->T = T;
    hc_param(sub, "T", T), hc_param(sub, "C", m->C), hc_param(sub, "OC", m->OC);
    hc_output(sub, "out", (size_t)T * m->OC, 0);
}

static int call_matmul_forward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const matmul_case *m = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *in, *out;
    void *weight, *bias = NULL;
    PUT(&s, in, m->in, (size_t)m->T * m->C * sizeof *in);
    PUT_WEIGHTS(&s, weight, m->weight, (size_t)m->OC * m->C);
    if (m->bias) PUT_WEIGHTS(&s, bias, m->bias_values, (size_t)m->OC);
    OUT(&s, out, NULL, (size_t)m->T * m->OC);
    OP(&s, es_matmul_forward(dev, out, in, weight, bias, m->T, m->C, m->OC));
    GET(&s, got[0], out, (size_t)m->T * m->OC);
    return ds_end(&s, ES_OK);
}

static const struct {
    int T, C, OC, din, dbias;
} matmul_backward_grid[] = {
    {1, 1, 1, 1, 1},     {1, 16, 513, 1, 1}, {3, 7, 5, 0, 1},   {257, 24, 513, 1, 0},
    {513, 130, 1030, 1, 1}, {0, 8, 8, 1, 1} /* no tokens: the gradients keep their start */,
    {40, 600, 300, 1, 1} /* dweight (OC, C) over 2 x 2 tiles */, {64, 1536, 600, 1, 1},
};

static void make_matmul_backward(hcase *c, int index) {
    rng r = rng_seeded(1500 + (uint64_t)index);
    matmul_case *m = matmul_inputs(c, &r, matmul_backward_grid[index].T, matmul_backward_grid[index].C, matmul_backward_grid[index].OC);
    m->with_din = matmul_backward_grid[index].din, m->with_dbias = matmul_backward_grid[index].dbias;
    hc_note(c, "%s, %s", m->with_din ? "din" : "din NULL", m->with_dbias ? "dbias" : "dbias NULL");
    m->dout = hc_normals(c, &r, (size_t)m->T * m->OC, 1.0);
    double *din = m->with_din ? hc_output(c, "din", (size_t)m->T * m->C, 0) : NULL;
    double *dweight = hc_output(c, "dweight", (size_t)m->OC * m->C, 0);
    double *dbias = m->with_dbias ? hc_output(c, "dbias", (size_t)m->OC, 0) : NULL;
    ref_matmul_backward(din, dweight, dbias, hc_widen(c, m->dout, (size_t)m->T * m->OC), hc_widen(c, m->in, (size_t)m->T * m->C),
                        hc_widen(c, m->weight, (size_t)m->OC * m->C), m->T, m->C, m->OC);
    m->dweight_start = hc_accumulate_start(c, &r, dweight, (size_t)m->OC * m->C);
    if (dbias) m->dbias_start = hc_accumulate_start(c, &r, dbias, (size_t)m->OC);
}

static int call_matmul_backward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const matmul_case *m = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *in, *dout, *din = NULL, *dweight, *dbias = NULL;
    void *weight;
    PUT(&s, in, m->in, (size_t)m->T * m->C * sizeof *in);
    PUT_WEIGHTS(&s, weight, m->weight, (size_t)m->OC * m->C);
    PUT(&s, dout, m->dout, (size_t)m->T * m->OC * sizeof *dout);
    if (m->with_din) OUT(&s, din, NULL, (size_t)m->T * m->C);
    OUT(&s, dweight, m->dweight_start, (size_t)m->OC * m->C);
    if (m->with_dbias) OUT(&s, dbias, m->dbias_start, (size_t)m->OC);
    OP(&s, es_matmul_backward(dev, din, dweight, dbias, dout, in, weight, m->T, m->C, m->OC));
    int k = 0;
    if (din) GET(&s, got[k++], din, (size_t)m->T * m->C);
    GET(&s, got[k++], dweight, (size_t)m->OC * m->C);
    if (dbias) GET(&s, got[k++], dbias, (size_t)m->OC);
    return ds_end(&s, ES_OK);
}

/* ---- RoPE -------------------------------------------------------------------------------------- */

typedef struct rope_case {
    int T, n_heads, hd;
    float *x;
    int32_t *positions;
    double *inv_freq;
} rope_case;

/* positions up to 131072: the angles are large, so their double precision matters */
static const struct {
    int T, n_heads, hd;
    double base;
    int max_position;
} rope_grid[] = {
    {1, 1, 2, 1e4, 1},         {5, 3, 8, 1e4, 131072}, {300, 8, 64, 5e5, 8192} /* 64-token blocks */,
    {7, 2, 128, 1e4, 100},     {11, 5, 24, 1e4, 40000}, {0, 2, 16, 1e4, 1},  {40, 16, 128, 1e6, 131072},
};

static void make_rope(hcase *c, int index, int backward) {
    rng r = rng_seeded((backward ? 1700 : 1600) + (uint64_t)index);
    rope_case *p = c->data = hc_alloc(c, sizeof *p);
    p->T = rope_grid[index].T, p->n_heads = rope_grid[index].n_heads, p->hd = rope_grid[index].hd;
    const size_t n = (size_t)p->T * p->n_heads * p->hd;
    p->x = hc_normals(c, &r, n, 1.0);
    p->positions = hc_alloc(c, (size_t)p->T * sizeof *p->positions);
    for (int t = 0; t < p->T; t++) p->positions[t] = rng_below(&r, rope_grid[index].max_position);
    p->inv_freq = hc_doubles(c, (size_t)p->hd / 2);
    for (int i = 0; i < p->hd / 2; i++) p->inv_freq[i] = pow(rope_grid[index].base, -2.0 * i / p->hd);
    hc_param(c, "T", p->T), hc_param(c, "heads", p->n_heads), hc_param(c, "hd", p->hd);
    hc_note(c, "positions < %d", rope_grid[index].max_position);
    double *x = hc_output(c, backward ? "dx" : "x", n, 0);
    for (size_t i = 0; i < n; i++) x[i] = p->x[i];
    if (backward) ref_rope_backward(x, p->positions, p->inv_freq, p->T, p->n_heads, p->hd);
    else ref_rope_forward(x, p->positions, p->inv_freq, p->T, p->n_heads, p->hd);
}

static void make_rope_forward(hcase *c, int index) { make_rope(c, index, 0); }
static void make_rope_backward(hcase *c, int index) { make_rope(c, index, 1); }

static int call_rope(es_device *dev, const hcase *c, double *const *got, es_error *err, int backward) {
    const rope_case *p = c->data;
    const size_t n = (size_t)p->T * p->n_heads * p->hd;
    dscope s;
    ds_begin(&s, dev, err);
    float *x;
    int32_t *positions;
    double *inv_freq;
    OUT(&s, x, p->x, n);
    PUT(&s, positions, p->positions, (size_t)p->T * sizeof *positions);
    PUT(&s, inv_freq, p->inv_freq, (size_t)p->hd / 2 * sizeof *inv_freq);
    if (backward) OP(&s, es_rope_backward(dev, x, positions, inv_freq, p->T, p->n_heads, p->hd));
    else OP(&s, es_rope_forward(dev, x, positions, inv_freq, p->T, p->n_heads, p->hd));
    GET(&s, got[0], x, n);
    return ds_end(&s, ES_OK);
}

static int call_rope_forward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    return call_rope(dev, c, got, err, 0);
}
static int call_rope_backward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    return call_rope(dev, c, got, err, 1);
}

/* ---- attention ------------------------------------------------------------------------------------ */

typedef struct attention_case {
    int n_seqs, T, H, KV, hd;
    int32_t *seq_start;
    float *q, *k, *v, *dout;
} attention_case;

/* one token; several sequences with empty ones and ones of length 1; query blocks of 128 crossed;
 * GQA 1, 2, 3, 4, 8; head sizes 8..128 (64, 96 and 128 take CUDA's flash kernels); no sequence at
 * all; 520 tokens x hd 64 for the large backward */
static const struct {
    int n_seqs, lengths[5], H, KV, hd;
} attention_grid[] = {
    {1, {1}, 2, 2, 8},         {5, {3, 0, 1, 5, 1}, 8, 2, 16}, {1, {130}, 8, 1, 24},   {2, {300, 2}, 4, 1, 64},
    {3, {0, 6, 0}, 2, 2, 128}, {3, {129, 1, 127}, 4, 4, 136}, {0, {0}, 2, 1, 8},      {1, {520}, 4, 1, 64},
    {2, {200, 57}, 16, 2, 128} /* a student's heads: GQA 8, hd 128 */, {3, {70, 0, 130}, 6, 2, 96} /* GQA 3, hd 96 */,
};

static void make_attention(hcase *c, int index, int backward) {
    rng r = rng_seeded((backward ? 1900 : 1800) + (uint64_t)index);
    attention_case *a = c->data = hc_alloc(c, sizeof *a);
    a->n_seqs = attention_grid[index].n_seqs, a->H = attention_grid[index].H, a->KV = attention_grid[index].KV;
    a->hd = attention_grid[index].hd;
    a->seq_start = hc_alloc(c, ((size_t)a->n_seqs + 1) * sizeof *a->seq_start);
    int longest = 0;
    char lengths[64] = "";
    for (int s = 0; s < a->n_seqs; s++) {
        const int L = attention_grid[index].lengths[s];
        a->seq_start[s + 1] = a->seq_start[s] + L;
        if (L > longest) longest = L;
        snprintf(lengths + strlen(lengths), sizeof lengths - strlen(lengths), "%s%d", s ? " " : "", L);
    }
    a->T = a->seq_start[a->n_seqs];
    const size_t nq = (size_t)a->T * a->H * a->hd, nkv = (size_t)a->T * a->KV * a->hd;
    a->q = hc_normals(c, &r, nq, 1.5); /* scores of sd 1.5: softmaxes between flat and peaked */
    a->k = hc_normals(c, &r, nkv, 1.0);
    a->v = hc_normals(c, &r, nkv, 1.0);
    hc_param(c, "T", a->T), hc_param(c, "seqs", a->n_seqs), hc_param(c, "longest", longest);
    hc_param(c, "H", a->H), hc_param(c, "KV", a->KV), hc_param(c, "hd", a->hd);
    hc_note(c, "lengths %s", a->n_seqs ? lengths : "none");
    const double *q = hc_widen(c, a->q, nq), *k = hc_widen(c, a->k, nkv), *v = hc_widen(c, a->v, nkv);
    if (!backward) {
        ref_attention_forward(hc_output(c, "out", nq, 0), q, k, v, a->seq_start, a->n_seqs, a->H, a->KV, a->hd);
        return;
    }
    a->dout = hc_normals(c, &r, nq, 1.0);
    double *dq = hc_output(c, "dq", nq, 0), *dk = hc_output(c, "dk", nkv, 0), *dv = hc_output(c, "dv", nkv, 0);
    ref_attention_backward(dq, dk, dv, hc_widen(c, a->dout, nq), q, k, v, a->seq_start, a->n_seqs, a->H, a->KV, a->hd);
}

static void make_attention_forward(hcase *c, int index) { make_attention(c, index, 0); }
static void make_attention_backward(hcase *c, int index) { make_attention(c, index, 1); }

static int call_attention(es_device *dev, const hcase *c, double *const *got, es_error *err, int backward) {
    const attention_case *a = c->data;
    const size_t nq = (size_t)a->T * a->H * a->hd, nkv = (size_t)a->T * a->KV * a->hd;
    dscope s;
    ds_begin(&s, dev, err);
    float *q, *k, *v;
    int32_t *seq_start;
    PUT(&s, q, a->q, nq * sizeof *q);
    PUT(&s, k, a->k, nkv * sizeof *k);
    PUT(&s, v, a->v, nkv * sizeof *v);
    PUT(&s, seq_start, a->seq_start, ((size_t)a->n_seqs + 1) * sizeof *seq_start);
    if (!backward) {
        float *out;
        OUT(&s, out, NULL, nq);
        OP(&s, es_attention_forward(dev, out, q, k, v, seq_start, a->n_seqs, a->H, a->KV, a->hd));
        GET(&s, got[0], out, nq);
        return ds_end(&s, ES_OK);
    }
    float *dout, *dq, *dk, *dv;
    PUT(&s, dout, a->dout, nq * sizeof *dout);
    OUT(&s, dq, NULL, nq);
    OUT(&s, dk, NULL, nkv);
    OUT(&s, dv, NULL, nkv);
    OP(&s, es_attention_backward(dev, dq, dk, dv, dout, q, k, v, seq_start, a->n_seqs, a->H, a->KV, a->hd));
    GET(&s, got[0], dq, nq);
    GET(&s, got[1], dk, nkv);
    GET(&s, got[2], dv, nkv);
    return ds_end(&s, ES_OK);
}

static int call_attention_forward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    return call_attention(dev, c, got, err, 0);
}
static int call_attention_backward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    return call_attention(dev, c, got, err, 1);
}

/* ---- attention over a key/value cache ---------------------------------------------------------- */

typedef struct cached_case {
    int n_seqs, T, H, KV, hd, max_seq, slots;
    int32_t *seq_start, *past, *slot;
    float *q, *k, *v, *k_cache, *v_cache; /* the caches as they are before the call */
} cached_case;

/* a decode step (one new token each, past crossing a query block), chunked prefill (several new
 * tokens after a past), no past at all (es_attention_forward's case), an empty sequence, a
 * student's heads, no sequence; slots in reverse order with one left unused */
static const struct {
    int n_seqs, lengths[4], past[4], H, KV, hd, max_seq;
} cached_grid[] = {
    {1, {1}, {0}, 2, 2, 8, 4},
    {3, {1, 1, 1}, {5, 0, 130}, 8, 2, 16, 140},
    {2, {7, 3}, {9, 0}, 4, 1, 64, 20},
    {1, {130}, {3}, 4, 4, 8, 140},
    {4, {1, 0, 1, 1}, {1, 3, 200, 17}, 16, 2, 128, 256},
    {0, {0}, {0}, 2, 1, 8, 8},
};

static void make_attention_cached_forward(hcase *c, int index) {
    rng r = rng_seeded(3100 + (uint64_t)index);
    cached_case *a = c->data = hc_alloc(c, sizeof *a);
    a->n_seqs = cached_grid[index].n_seqs, a->H = cached_grid[index].H, a->KV = cached_grid[index].KV;
    a->hd = cached_grid[index].hd, a->max_seq = cached_grid[index].max_seq, a->slots = a->n_seqs + 1;
    const int n = a->n_seqs;
    a->seq_start = hc_alloc(c, ((size_t)n + 1) * sizeof *a->seq_start);
    a->past = hc_alloc(c, ((size_t)n + 1) * sizeof *a->past);
    a->slot = hc_alloc(c, ((size_t)n + 1) * sizeof *a->slot);
    for (int s = 0; s < n; s++) {
        a->seq_start[s + 1] = a->seq_start[s] + cached_grid[index].lengths[s];
        a->past[s] = cached_grid[index].past[s], a->slot[s] = n - 1 - s;
    }
    a->T = a->seq_start[n];
    const size_t row = (size_t)a->KV * a->hd, nq = (size_t)a->T * a->H * a->hd, nkv = (size_t)a->T * row;
    const size_t ncache = (size_t)a->slots * a->max_seq * row;
    a->q = hc_normals(c, &r, nq, 1.5);
    a->k = hc_normals(c, &r, nkv, 1.0);
    a->v = hc_normals(c, &r, nkv, 1.0);
    a->k_cache = hc_normals(c, &r, ncache, 1.0); /* rows past a sequence's end too: the op must not read them */
    a->v_cache = hc_normals(c, &r, ncache, 1.0);
    hc_param(c, "T", a->T), hc_param(c, "seqs", n), hc_param(c, "max_seq", a->max_seq);
    hc_param(c, "H", a->H), hc_param(c, "KV", a->KV), hc_param(c, "hd", a->hd);
    // the reference: each sequence whole (its past rows from the cache, then its new rows) through
    // the plain causal attention, keeping the new rows; the caches with the new rows written
    double *out = hc_output(c, "out", nq, 0);
    double *k_after = hc_output(c, "k_cache", ncache, 1), *v_after = hc_output(c, "v_cache", ncache, 1);
    const double *kc = hc_widen(c, a->k_cache, ncache), *vc = hc_widen(c, a->v_cache, ncache);
    memcpy(k_after, kc, ncache * sizeof *k_after), memcpy(v_after, vc, ncache * sizeof *v_after);
    for (int s = 0; s < n; s++) {
        const int L = a->seq_start[s + 1] - a->seq_start[s], P = a->past[s], first = a->seq_start[s];
        double *k_rows = k_after + ((size_t)a->slot[s] * a->max_seq) * row, *v_rows = v_after + ((size_t)a->slot[s] * a->max_seq) * row;
        for (size_t i = 0; i < (size_t)L * row; i++) k_rows[P * row + i] = a->k[first * row + i], v_rows[P * row + i] = a->v[first * row + i];
        if (!L) continue;
        const size_t qrow = (size_t)a->H * a->hd;
        double *q_whole = hc_doubles(c, (size_t)(P + L) * qrow), *out_whole = hc_doubles(c, (size_t)(P + L) * qrow);
        for (size_t i = 0; i < (size_t)L * qrow; i++) q_whole[P * qrow + i] = a->q[first * qrow + i];
        const int32_t whole[2] = {0, P + L};
        ref_attention_forward(out_whole, q_whole, k_rows, v_rows, whole, 1, a->H, a->KV, a->hd);
        memcpy(out + first * qrow, out_whole + P * qrow, (size_t)L * qrow * sizeof *out);
    }
}

static int call_attention_cached_forward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const cached_case *a = c->data;
    const size_t row = (size_t)a->KV * a->hd, nq = (size_t)a->T * a->H * a->hd, nkv = (size_t)a->T * row;
    const size_t ncache = (size_t)a->slots * a->max_seq * row, nseq = (size_t)a->n_seqs + 1;
    dscope s;
    ds_begin(&s, dev, err);
    float *q, *k, *v, *out, *k_cache, *v_cache;
    int32_t *seq_start, *past, *slot;
    PUT(&s, q, a->q, nq * sizeof *q);
    PUT(&s, k, a->k, nkv * sizeof *k);
    PUT(&s, v, a->v, nkv * sizeof *v);
    PUT(&s, seq_start, a->seq_start, nseq * sizeof *seq_start);
    PUT(&s, past, a->past, nseq * sizeof *past);
    PUT(&s, slot, a->slot, nseq * sizeof *slot);
    OUT(&s, out, NULL, nq);
    OUT(&s, k_cache, a->k_cache, ncache);
    OUT(&s, v_cache, a->v_cache, ncache);
    OP(&s, es_attention_cached_forward(dev, out, k_cache, v_cache, q, k, v, seq_start, past, slot, a->n_seqs, a->max_seq, a->H,
                                       a->KV, a->hd));
    GET(&s, got[0], out, nq);
    GET(&s, got[1], k_cache, ncache);
    GET(&s, got[2], v_cache, ncache);
    return ds_end(&s, ES_OK);
}

/* ---- element-wise: SwiGLU and add ------------------------------------------------------------------ */

typedef struct elementwise_case {
    size_t n;
    int alias; /* 0 none, 1 out = first input, 2 out = second input, 3 out = both inputs */
    float *a, *b, *dout;
} elementwise_case;

/* blocks of 32768 values crossed; gates up to ±1000, where exp overflows in fp32 */
static const struct {
    size_t n;
    int alias;
} swiglu_grid[] = {{0, 0}, {1, 0}, {7, 1}, {32768, 0}, {32769, 2}, {100003, 0}},
  swiglu_backward_grid[] = {{1, 0}, {7, 0}, {32769, 0}, {100003, 0}},
  add_grid[] = {{0, 0}, {1, 0}, {7, 1}, {32769, 2}, {100003, 0}, {65537, 3}};

static const char *const alias_notes[] = {"", "out = first input", "out = second input", "out = both inputs"};

static elementwise_case *elementwise_inputs(hcase *c, rng *r, size_t n, int alias, double gate_sd) {
    elementwise_case *e = c->data = hc_alloc(c, sizeof *e);
    e->n = n, e->alias = alias;
    e->a = hc_normals(c, r, n, gate_sd);
    e->b = alias == 3 ? e->a : hc_normals(c, r, n, 1.0);
    static const float extremes[] = {30, -30, 100, -100, 1000, -1000, 88.5f, -88.5f};
    for (size_t i = 0; i < n && i < 8 && gate_sd > 1; i++) e->a[i * (n / 8)] = extremes[i];
    hc_param(c, "n", (long)n);
    if (alias) hc_note(c, "%s", alias_notes[alias]);
    return e;
}

static void make_swiglu_forward(hcase *c, int index) {
    rng r = rng_seeded(2000 + (uint64_t)index);
    elementwise_case *e = elementwise_inputs(c, &r, swiglu_grid[index].n, swiglu_grid[index].alias, 3.0);
    ref_swiglu_forward(hc_output(c, "out", e->n, 0), hc_widen(c, e->a, e->n), hc_widen(c, e->b, e->n), e->n);
}

static void make_add(hcase *c, int index) {
    rng r = rng_seeded(2100 + (uint64_t)index);
    elementwise_case *e = elementwise_inputs(c, &r, add_grid[index].n, add_grid[index].alias, 1.0);
    ref_add(hc_output(c, "out", e->n, 0), hc_widen(c, e->a, e->n), hc_widen(c, e->b, e->n), e->n);
}

static int call_elementwise(es_device *dev, const hcase *c, double *const *got, es_error *err, int swiglu) {
    const elementwise_case *e = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *a, *b, *out;
    PUT(&s, a, e->a, e->n * sizeof *a);
    if (e->alias == 3) b = a;
    else PUT(&s, b, e->b, e->n * sizeof *b);
    if (e->alias == 1 || e->alias == 3) out = a;
    else if (e->alias == 2) out = b;
    else OUT(&s, out, NULL, e->n);
    if (swiglu) OP(&s, es_swiglu_forward(dev, out, a, b, e->n));
    else OP(&s, es_add(dev, out, a, b, e->n));
    GET(&s, got[0], out, e->n);
    return ds_end(&s, ES_OK);
}

static int call_swiglu_forward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    return call_elementwise(dev, c, got, err, 1);
}
static int call_add(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    return call_elementwise(dev, c, got, err, 0);
}

static void make_swiglu_backward(hcase *c, int index) {
    rng r = rng_seeded(2200 + (uint64_t)index);
    elementwise_case *e = elementwise_inputs(c, &r, swiglu_backward_grid[index].n, 0, 3.0);
    e->dout = hc_normals(c, &r, e->n, 1.0);
    double *dgate = hc_output(c, "dgate", e->n, 0), *dup = hc_output(c, "dup", e->n, 0);
    ref_swiglu_backward(dgate, dup, hc_widen(c, e->dout, e->n), hc_widen(c, e->a, e->n), hc_widen(c, e->b, e->n), e->n);
}

static int call_swiglu_backward(es_device *dev, const hcase *c, double *const *got, es_error *err) {
    const elementwise_case *e = c->data;
    dscope s;
    ds_begin(&s, dev, err);
    float *gate, *up, *dout, *dgate, *dup;
    PUT(&s, gate, e->a, e->n * sizeof *gate);
    PUT(&s, up, e->b, e->n * sizeof *up);
    PUT(&s, dout, e->dout, e->n * sizeof *dout);
    OUT(&s, dgate, NULL, e->n);
    OUT(&s, dup, NULL, e->n);
    OP(&s, es_swiglu_backward(dev, dgate, dup, dout, gate, up, e->n));
    GET(&s, got[0], dgate, e->n);
    GET(&s, got[1], dup, e->n);
    return ds_end(&s, ES_OK);
}

/* ---- the table ------------------------------------------------------------------------------------ */

PRESENT(embedding_forward)
PRESENT(rmsnorm_forward)
PRESENT(matmul_forward)
PRESENT(rope_forward)
PRESENT(attention_forward)
PRESENT(attention_cached_forward)
PRESENT(swiglu_forward)
PRESENT(add)
PRESENT(embedding_backward)
PRESENT(rmsnorm_backward)
PRESENT(matmul_backward)
PRESENT(rope_backward)
PRESENT(attention_backward)
PRESENT(swiglu_backward)

#define SPEC(op, grid, limit, ...)                                                              \
    {.name = #op, .n_cases = COUNT(grid), .threshold = (limit), .device_threshold = HARNESS_DEVICE_FACTOR * (limit),  \
     .present = has_##op, .make = make_##op, .call = call_##op, __VA_ARGS__}

const op_spec harness_layer_ops[] = {
    /* a copy and exact format conversions: any difference is a bug; on bf16 the fp32 device table
     * is rounded to bf16 (nmse ~1.3e-6: (2^-9)^2 / 3) */
    SPEC(embedding_forward, embedding_grid, 0, .bf16_threshold = HARNESS_BF16_ROUNDING),
    /* measured 2.2e-15 (the mean square is in double); bf16: the weight's rounding */
    SPEC(rmsnorm_forward, rmsnorm_grid, HARNESS_ELEMENTWISE, .bf16_threshold = HARNESS_BF16_ROUNDING),
    /* 8.9e-14; bf16: both operands rounded */
    SPEC(matmul_forward, matmul_grid, HARNESS_REDUCTION, .rows = rows_matmul_forward, .bf16_threshold = HARNESS_BF16_PRODUCT),
    SPEC(rope_forward, rope_grid, HARNESS_ELEMENTWISE),       /* 1.9e-15 (angles in double) */
    /* 1.5e-13; bf16: q, k, v and the probabilities rounded for the tensor cores */
    SPEC(attention_forward, attention_grid, HARNESS_REDUCTION, .bf16_threshold = HARNESS_BF16_PRODUCT),
    /* fp32 on every backend (generation is latency-bound: no tensor cores); the caches exact */
    SPEC(attention_cached_forward, cached_grid, HARNESS_REDUCTION),
    SPEC(swiglu_forward, swiglu_grid, HARNESS_ELEMENTWISE),   /* 2.3e-15 */
    SPEC(add, add_grid, HARNESS_ELEMENTWISE),                 /* 1.3e-15 */
    SPEC(embedding_backward, embedding_backward_grid, HARNESS_REDUCTION), /* 1.7e-14: sums over repeated ids */
    /* 3.1e-15; dweight sums over tokens; bf16: the weight's rounding */
    SPEC(rmsnorm_backward, rmsnorm_backward_grid, HARNESS_REDUCTION, .bf16_threshold = HARNESS_BF16_ROUNDING),
    /* 1.0e-13; bf16: dout, the weight and (for dweight) the input rounded for the tensor cores */
    SPEC(matmul_backward, matmul_backward_grid, HARNESS_REDUCTION, .bf16_threshold = HARNESS_BF16_PRODUCT),
    SPEC(rope_backward, rope_grid, HARNESS_ELEMENTWISE),                  /* 1.8e-15 */
    /* 2.5e-13 in fp32; bf16: the flash backward's chained products */
    SPEC(attention_backward, attention_grid, HARNESS_REDUCTION, .bf16_threshold = HARNESS_BF16_CHAIN),
    SPEC(swiglu_backward, swiglu_backward_grid, HARNESS_ELEMENTWISE),     /* 9.8e-15 */
};
const int harness_n_layer_ops = COUNT(harness_layer_ops);
