/* The CPU forward ops of a decoder layer (kernels/ops.h): embedding, RMSNorm, matmul, RoPE,
 * SwiGLU, add. Attention is in attention.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "safetensors.h"

/* Element-wise and row-wise work goes to the pool in blocks of this many values: large enough
 * that handing a block over costs nothing, and the blocks do not depend on the thread count. */
enum { ELEMENT_BLOCK = 1 << 15 };

/* ---- embedding ---------------------------------------------------------------------------- */

int cpu_embedding_forward(es_device *dev, float *out, const int32_t *ids, const void *table, es_dtype dtype, int T, int C) {
    const size_t row_bytes = (size_t)C * es_dtype_size(dtype);
    for (int t = 0; t < T; t++) {
        /* a one-row view of the table, so every dtype converts through one function */
        es_tensor row = {.name = "embedding row", .dtype = dtype, .ndim = 1, .shape = {C},
                         .data = (const char *)table + (size_t)ids[t] * row_bytes, .nbytes = row_bytes};
        es_error err = {0};
        if (es_tensor_to_f32(&row, out + (size_t)t * C, &err)) return es_device_fail(dev, err.code, "%s", err.msg);
    }
    return 0;
}

/* ---- RMSNorm -------------------------------------------------------------------------------- */

typedef struct rows_job {
    float *out;
    const float *in, *weight;
    int T, C, rows_per_block;
    float eps;
} rows_job;

static void rmsnorm_block(void *arg, size_t block, int worker) {
    (void)worker;
    const rows_job *job = arg;
    const int C = job->C, t0 = (int)block * job->rows_per_block;
    const int t1 = t0 + job->rows_per_block < job->T ? t0 + job->rows_per_block : job->T;
    for (int t = t0; t < t1; t++) {
        const float *x = job->in + (size_t)t * C;
        float *y = job->out + (size_t)t * C;
        double sum_sq = 0;
        for (int c = 0; c < C; c++) sum_sq += (double)x[c] * x[c];
        const float scale = (float)(1.0 / sqrt(sum_sq / C + job->eps));
        for (int c = 0; c < C; c++) y[c] = x[c] * scale * job->weight[c];
    }
}

static int rows_per_block(int C) { return C >= ELEMENT_BLOCK ? 1 : ELEMENT_BLOCK / C; }

int cpu_rmsnorm_forward(es_device *dev, float *out, const float *in, const void *weight, int T, int C, float eps) {
    rows_job job = {out, in, (const float *)weight, T, C, rows_per_block(C), eps};
    cpu_for(dev, (size_t)(T + job.rows_per_block - 1) / job.rows_per_block, rmsnorm_block, &job);
    return 0;
}

/* ---- matmul ----------------------------------------------------------------------------- */

/* Rows go through the products in blocks of exactly CPU_MATMUL_ROWS, the last one padded:
 * OpenBLAS picks its code by the matrix sizes, so without the padding a token's result would
 * depend on how many other tokens share its call. Each block is cut into CPU_TILE_COLS-wide
 * tiles of output columns, one single-threaded product each. */
size_t cpu_matmul_workspace(const es_workspace_plan *plan) {
    return (size_t)CPU_MATMUL_ROWS * ((size_t)plan->max_in + (size_t)plan->max_out) * sizeof(float);
}

typedef struct matmul_job {
    float *out, *padded_out;
    const float *in, *padded_in, *weight;
    int full_blocks, col_tiles, C, OC;
    float beta;
} matmul_job;

static void matmul_tile(void *arg, size_t index, int worker) {
    (void)worker;
    const matmul_job *job = arg;
    const int block = (int)(index / (size_t)job->col_tiles), j0 = (int)(index % (size_t)job->col_tiles) * CPU_TILE_COLS;
    const int cols = job->OC - j0 < CPU_TILE_COLS ? job->OC - j0 : CPU_TILE_COLS;
    const float *in = block < job->full_blocks ? job->in + (size_t)block * CPU_MATMUL_ROWS * job->C : job->padded_in;
    float *out = block < job->full_blocks ? job->out + (size_t)block * CPU_MATMUL_ROWS * job->OC : job->padded_out;
    cpu_sgemm(0, 1, CPU_MATMUL_ROWS, cols, job->C, 1.0f, in, job->C, job->weight + (size_t)j0 * job->C, job->C, job->beta,
              out + j0, job->OC);
}

static void fill_bias(float *out, const float *bias, int rows, int OC) {
    for (int t = 0; t < rows; t++) memcpy(out + (size_t)t * OC, bias, (size_t)OC * sizeof *out);
}

/* The product with its padding rows at `padding` (cpu_matmul_workspace's bytes), or in the scratch
 * when NULL. */
static int matmul_rows(es_device *dev, float *out, const float *in, const float *weight, const float *bias, int T, int C, int OC,
                       float *padding) {
    const int full_blocks = T / CPU_MATMUL_ROWS, rest = T - full_blocks * CPU_MATMUL_ROWS;
    matmul_job job = {out, NULL, in, NULL, weight, full_blocks, (OC + CPU_TILE_COLS - 1) / CPU_TILE_COLS, C, OC, bias ? 1.0f : 0.0f};
    if (rest) {
        float *padded_in = padding ? padding : es_device_scratch(dev, cpu_matmul_workspace(&(es_workspace_plan){.max_in = C, .max_out = OC}));
        if (!padded_in) return ES_ERR_RUNTIME;
        float *padded_out = padded_in + (size_t)CPU_MATMUL_ROWS * C; // (CPU_MATMUL_ROWS, OC)
        memcpy(padded_in, in + (size_t)full_blocks * CPU_MATMUL_ROWS * C, (size_t)rest * C * sizeof *padded_in);
        memset(padded_in + (size_t)rest * C, 0, (size_t)(CPU_MATMUL_ROWS - rest) * C * sizeof *padded_in);
        if (bias) fill_bias(padded_out, bias, CPU_MATMUL_ROWS, OC);
        job.padded_in = padded_in, job.padded_out = padded_out;
    }
    if (bias) fill_bias(out, bias, full_blocks * CPU_MATMUL_ROWS, OC);
    cpu_for(dev, (size_t)(full_blocks + (rest > 0)) * (size_t)job.col_tiles, matmul_tile, &job);
    if (rest) memcpy(out + (size_t)full_blocks * CPU_MATMUL_ROWS * OC, job.padded_out, (size_t)rest * OC * sizeof *out);
    return 0;
}

int cpu_matmul_forward(es_device *dev, float *out, const float *in, const void *weight_f32, const void *bias_f32, int T, int C,
                       int OC) {
    return matmul_rows(dev, out, in, weight_f32, bias_f32, T, C, OC, NULL); /* the CPU's weight format is fp32 */
}

/* The forward's activation goes through the product a chunk of whole row blocks at a time (a
 * row's bits do not depend on its call: the blocks above), so its scratch is at most about
 * SWIGLU_DOWN_FLOATS floats and not (T, I), which for the 70B shape at 8192 tokens would be 0.9 GB
 * beside a gate buffer that inference used to overwrite in place. */
enum { SWIGLU_DOWN_FLOATS = 1 << 24 };
static int swiglu_down_rows(int T, int I) {
    const int most = SWIGLU_DOWN_FLOATS / CPU_MATMUL_ROWS / (I > 0 ? I : 1), needed = (T + CPU_MATMUL_ROWS - 1) / CPU_MATMUL_ROWS;
    const int blocks = most < needed ? most : needed;
    return (blocks > 1 ? blocks : 1) * CPU_MATMUL_ROWS;
}

size_t cpu_swiglu_down_workspace(const es_workspace_plan *plan) {
    const size_t I = (size_t)plan->max_in, rows = (size_t)swiglu_down_rows(plan->tokens, plan->max_in);
    const size_t forward = rows * I * sizeof(float) + cpu_matmul_workspace(plan);
    const size_t backward = plan->train ? (size_t)plan->tokens * I * sizeof(float) : 0; /* the activation's gradient */
    return forward > backward ? forward : backward;
}

/* ---- RoPE --------------------------------------------------------------------------------- */

typedef struct rope_job {
    float *x;
    const int32_t *positions;
    const double *inv_freq;
    int T, n_heads, hd, tokens_per_block, inverse;
} rope_job;

static void rope_block(void *arg, size_t block, int worker) {
    (void)worker;
    const rope_job *job = arg;
    const int half = job->hd / 2, t0 = (int)block * job->tokens_per_block;
    const int t1 = t0 + job->tokens_per_block < job->T ? t0 + job->tokens_per_block : job->T;
    for (int t = t0; t < t1; t++)
        for (int i = 0; i < half; i++) {
            const double angle = (double)job->positions[t] * job->inv_freq[i];
            /* the inverse rotation negates the fp32-rounded sine: the same bits as the forward's */
            const float cos_a = (float)cos(angle), sin_a = job->inverse ? -(float)sin(angle) : (float)sin(angle);
            for (int h = 0; h < job->n_heads; h++) {
                float *head = job->x + ((size_t)t * job->n_heads + h) * job->hd;
                const float first = head[i], second = head[i + half];
                head[i] = first * cos_a - second * sin_a;
                head[i + half] = second * cos_a + first * sin_a;
            }
        }
}

static int rope(es_device *dev, float *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd, int inverse) {
    rope_job job = {x, positions, inv_freq, T, n_heads, hd, rows_per_block(n_heads * hd), inverse};
    cpu_for(dev, (size_t)(T + job.tokens_per_block - 1) / job.tokens_per_block, rope_block, &job);
    return 0;
}

int cpu_rope_forward(es_device *dev, float *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    return rope(dev, x, positions, inv_freq, T, n_heads, hd, 0);
}

/* The transpose of a rotation is the rotation by the opposite angle. */
int cpu_rope_backward(es_device *dev, float *dx, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    return rope(dev, dx, positions, inv_freq, T, n_heads, hd, 1);
}

/* ---- element-wise ------------------------------------------------------------------------------ */

typedef struct elementwise_job {
    float *out, *out2;
    const float *a, *b, *c;
    size_t n;
} elementwise_job;

#define BLOCK_RANGE(job, block)                                                                     \
    const size_t begin = (block) * (size_t)ELEMENT_BLOCK,                                            \
                 end = begin + ELEMENT_BLOCK < (job)->n ? begin + ELEMENT_BLOCK : (job)->n

static void swiglu_block(void *arg, size_t block, int worker) {
    (void)worker;
    const elementwise_job *job = arg;
    BLOCK_RANGE(job, block);
    for (size_t i = begin; i < end; i++) job->out[i] = job->a[i] / (1.0f + expf(-job->a[i])) * job->b[i];
}

static void add_block(void *arg, size_t block, int worker) {
    (void)worker;
    const elementwise_job *job = arg;
    BLOCK_RANGE(job, block);
    for (size_t i = begin; i < end; i++) job->out[i] = job->a[i] + job->b[i];
}

/* out = silu(g) u with silu(g) = g σ(g):  ∂out/∂u = silu(g),  ∂out/∂g = u σ(g) (1 + g (1 − σ(g))). */
static void swiglu_backward_block(void *arg, size_t block, int worker) {
    (void)worker;
    const elementwise_job *job = arg;
    BLOCK_RANGE(job, block);
    for (size_t i = begin; i < end; i++) {
        const float g = job->b[i], sigmoid = 1.0f / (1.0f + expf(-g));
        job->out2[i] = job->a[i] * (g / (1.0f + expf(-g))); /* silu exactly as the forward rounds it */
        job->out[i] = job->a[i] * job->c[i] * sigmoid * (1.0f + g * (1.0f - sigmoid));
    }
}

static void elementwise(es_device *dev, void (*fn)(void *, size_t, int), elementwise_job *job) {
    cpu_for(dev, (job->n + ELEMENT_BLOCK - 1) / ELEMENT_BLOCK, fn, job);
}

int cpu_swiglu_forward(es_device *dev, float *out, const float *gate, const float *up, size_t n) {
    elementwise_job job = {out, NULL, gate, up, NULL, n};
    elementwise(dev, swiglu_block, &job);
    return 0;
}

int cpu_add(es_device *dev, float *out, const float *a, const float *b, size_t n) {
    elementwise_job job = {out, NULL, a, b, NULL, n};
    elementwise(dev, add_block, &job);
    return 0;
}

int cpu_swiglu_backward(es_device *dev, float *dgate, float *dup, const float *dout, const float *gate, const float *up, size_t n) {
    elementwise_job job = {dgate, dup, dout, gate, up, n};
    elementwise(dev, swiglu_backward_block, &job);
    return 0;
}

int cpu_swiglu_down_forward(es_device *dev, float *out, const float *residual, const float *gate, const float *up, const void *weight,
                            const void *bias, int T, int inner, int C) {
    // per chunk of rows: act (rows, inner) in the scratch, the product's padding after it; then the
    // sum with the stream
    if (T <= 0) return 0;
    const int chunk = swiglu_down_rows(T, inner);
    const size_t act_floats = (size_t)chunk * inner;
    float *act = es_device_scratch(dev, act_floats * sizeof(float) + cpu_matmul_workspace(&(es_workspace_plan){.max_in = inner, .max_out = C}));
    if (!act) return ES_ERR_RUNTIME;
    for (int t0 = 0; t0 < T; t0 += chunk) {
        const int rows = T - t0 < chunk ? T - t0 : chunk;
        const size_t at = (size_t)t0 * inner;
        cpu_swiglu_forward(dev, act, gate + at, up + at, (size_t)rows * inner);
        const int rc = matmul_rows(dev, out + (size_t)t0 * C, act, weight, bias, rows, inner, C, act + act_floats);
        if (rc) return rc;
    }
    return cpu_add(dev, out, residual, out, (size_t)T * C);
}
