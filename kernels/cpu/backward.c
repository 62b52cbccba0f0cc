/* The CPU backward ops of embedding, RMSNorm and matmul (kernels/ops.h); RoPE and SwiGLU sit
 * beside their forwards in ops.c, attention in attention.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

int cpu_embedding_backward(es_device *dev, float *dtable, const int32_t *ids, const float *dout, int T, int C) {
    (void)dev;
    /* in token order: a repeated id adds its rows in the same order every time */
    for (int t = 0; t < T; t++) {
        float *row = dtable + (size_t)ids[t] * C;
        const float *g = dout + (size_t)t * C;
        for (int c = 0; c < C; c++) row[c] += g[c];
    }
    return 0;
}

/* With r = 1/sqrt(mean(x²) + eps) and y = x r w:
 *   ∂r/∂x_j = −r³ x_j / C, so dx_j = r w_j dy_j − x_j r³ · mean_c(x_c w_c dy_c),
 *   dw_c += dy_c x_c r.
 * dx uses r in double; dweight uses r rounded to fp32 as the forward's y = x r w does, and is
 * summed in double over blocks of TOKEN_BLOCK tokens, each block's sum added in fp32 in order. */
enum { TOKEN_BLOCK = 64, COLUMN_BLOCK = 256 };

typedef struct rmsnorm_grad_job {
    float *din, *dweight, *r;      /* r: (T) the forward's scale in fp32 */
    const float *dout, *in, *weight;
    int T, C;
    float eps;
} rmsnorm_grad_job;

static void rmsnorm_grad_rows(void *arg, size_t block, int worker) {
    (void)worker;
    const rmsnorm_grad_job *job = arg;
    const int C = job->C, t0 = (int)block * TOKEN_BLOCK, t1 = t0 + TOKEN_BLOCK < job->T ? t0 + TOKEN_BLOCK : job->T;
    for (int t = t0; t < t1; t++) {
        const float *x = job->in + (size_t)t * C, *dy = job->dout + (size_t)t * C;
        float *dx = job->din + (size_t)t * C;
        double sum_sq = 0, dot = 0;
        for (int c = 0; c < C; c++) {
            sum_sq += (double)x[c] * x[c];
            dot += (double)x[c] * job->weight[c] * dy[c];
        }
        const double r = 1.0 / sqrt(sum_sq / C + job->eps);
        const double correction = r * r * r * dot / C;
        for (int c = 0; c < C; c++) dx[c] = (float)(r * job->weight[c] * dy[c] - x[c] * correction);
        job->r[t] = (float)r;
    }
}

static void rmsnorm_grad_columns(void *arg, size_t block, int worker) {
    (void)worker;
    const rmsnorm_grad_job *job = arg;
    const int C = job->C, c0 = (int)block * COLUMN_BLOCK, c1 = c0 + COLUMN_BLOCK < C ? c0 + COLUMN_BLOCK : C;
    for (int t0 = 0; t0 < job->T; t0 += TOKEN_BLOCK) {
        const int t1 = t0 + TOKEN_BLOCK < job->T ? t0 + TOKEN_BLOCK : job->T;
        for (int c = c0; c < c1; c++) {
            double sum = 0;
            for (int t = t0; t < t1; t++) {
                const size_t at = (size_t)t * C + c;
                sum += (double)job->dout[at] * (job->in[at] * job->r[t]);
            }
            job->dweight[c] += (float)sum;
        }
    }
}

int cpu_rmsnorm_backward(es_device *dev, float *din, float *dweight, const float *dout, const float *in, const void *weight_any,
                         int T, int C, float eps) {
    const float *weight = weight_any; /* the CPU's weight format is fp32 */
    if (T <= 0) return 0;
    float *r = es_device_scratch(dev, (size_t)T * sizeof *r);
    if (!r) return ES_ERR_RUNTIME;
    rmsnorm_grad_job job = {din, dweight, r, dout, in, weight, T, C, eps};
    cpu_for(dev, (size_t)(T + TOKEN_BLOCK - 1) / TOKEN_BLOCK, rmsnorm_grad_rows, &job);
    if (dweight) cpu_for(dev, (size_t)(C + COLUMN_BLOCK - 1) / COLUMN_BLOCK, rmsnorm_grad_columns, &job);
    return 0;
}

/* ---- matmul ------------------------------------------------------------------------------- */

typedef struct bias_grad_job {
    float *dbias;
    const float *dout;
    int T, OC;
} bias_grad_job;

/* column sums of dout, in double, tokens in order */
static void bias_grad_columns(void *arg, size_t block, int worker) {
    (void)worker;
    const bias_grad_job *job = arg;
    const int o0 = (int)block * COLUMN_BLOCK, n = job->OC - o0 < COLUMN_BLOCK ? job->OC - o0 : COLUMN_BLOCK;
    double sum[COLUMN_BLOCK] = {0};
    for (int t = 0; t < job->T; t++) {
        const float *row = job->dout + (size_t)t * job->OC + o0;
        for (int o = 0; o < n; o++) sum[o] += row[o];
    }
    for (int o = 0; o < n; o++) job->dbias[o0 + o] += (float)sum[o];
}

int cpu_matmul_backward(es_device *dev, float *din, float *dweight, float *dbias, const float *dout, const float *in,
                        const void *weight_any, int T, int C, int OC) {
    const float *weight = weight_any; /* the CPU's weight format is fp32 */
    if (T <= 0) return 0;
    // din = dout @ weight  (T, C)
    if (din) cpu_gemm(dev, 0, 0, T, C, OC, 1.0f, dout, OC, weight, C, 0.0f, din, C);
    // dweight += doutᵀ @ in  (OC, C), the sum over tokens inside each tile's product
    cpu_gemm(dev, 1, 0, OC, C, T, 1.0f, dout, OC, in, C, 1.0f, dweight, C);
    if (dbias) {
        bias_grad_job job = {dbias, dout, T, OC};
        cpu_for(dev, (size_t)(OC + COLUMN_BLOCK - 1) / COLUMN_BLOCK, bias_grad_columns, &job);
    }
    return 0;
}

int cpu_swiglu_down_backward(es_device *dev, float *dgate, float *dup, float *dweight, float *dbias, const float *dout,
                             const float *gate, const float *up, const void *weight, int T, int inner, int C) {
    // the activation made again in dgate (written last), its gradient in the scratch
    if (T <= 0) return 0;
    float *dact = es_device_scratch(dev, (size_t)T * inner * sizeof(float)); // (T, inner)
    if (!dact) return ES_ERR_RUNTIME;
    cpu_swiglu_forward(dev, dgate, gate, up, (size_t)T * inner);
    const int rc = cpu_matmul_backward(dev, dact, dweight, dbias, dout, dgate, weight, T, inner, C);
    return rc ? rc : cpu_swiglu_backward(dev, dgate, dup, dact, gate, up, (size_t)T * inner);
}

int cpu_matmul_backward_group(es_device *dev, float *din, const es_matmul_part_grad *grad, const es_matmul_part *part, int n,
                              const float *in, int T, int C) {
    if (T <= 0) return 0;
    for (int i = 0; i < n; i++) {
        // din (+)= dout_i @ weight_i  (T, C): the first product written, the others added as it is made
        cpu_gemm(dev, 0, 0, T, C, part[i].OC, 1.0f, grad[i].dout, part[i].OC, part[i].weight, C, i ? 1.0f : 0.0f, din, C);
        const int rc = cpu_matmul_backward(dev, NULL, grad[i].dweight, grad[i].dbias, grad[i].dout, in, part[i].weight, T, C, part[i].OC);
        if (rc) return rc;
    }
    return 0;
}
