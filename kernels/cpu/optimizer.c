/* AdamW, the sum of squares and scaling on the CPU (kernels/ops.h): element-wise over fixed
 * blocks on the pool, so the result does not depend on the thread count. */
#include <math.h>
#include <string.h>

#include "cpu.h"

enum { BLOCK = 1 << 16 }; /* elements per task */

static size_t blocks_of(size_t n) { return (n + BLOCK - 1) / BLOCK; }

typedef struct adamw_job {
    float *params, *m, *v;
    float *working; /* NULL, or a copy of params to keep (the CPU's weight format is fp32) */
    const float *grads;
    size_t n;
    float decay, one_minus_beta1, beta2, one_minus_beta2, step_size, root_correction2, eps;
} adamw_job;

static void adamw_block(void *arg, size_t block, int worker) {
    (void)worker;
    const adamw_job *job = arg;
    const size_t begin = block * BLOCK, end = begin + BLOCK < job->n ? begin + BLOCK : job->n;
    for (size_t i = begin; i < end; i++) {
        const float g = job->grads[i];
        job->params[i] *= job->decay;
        job->m[i] += (g - job->m[i]) * job->one_minus_beta1;
        job->v[i] = job->v[i] * job->beta2 + job->one_minus_beta2 * g * g;
        const float denominator = sqrtf(job->v[i]) / job->root_correction2 + job->eps;
        job->params[i] -= job->step_size * (job->m[i] / denominator);
    }
    if (job->working) memcpy(job->working + begin, job->params + begin, (end - begin) * sizeof *job->params);
}

int cpu_adamw_update(es_device *dev, float *params, void *working, const float *grads, float *m, float *v, size_t n, int64_t step,
                     double lr, const es_adamw_config *config) {
    const double bias_correction1 = 1.0 - pow(config->beta1, (double)step);
    const double bias_correction2 = 1.0 - pow(config->beta2, (double)step);
    adamw_job job = {params, m, v, working == (void *)params ? NULL : working, grads, n, (float)(1.0 - lr * config->weight_decay), (float)(1.0 - config->beta1),
                     (float)config->beta2, (float)(1.0 - config->beta2), (float)(lr / bias_correction1),
                     (float)sqrt(bias_correction2), (float)config->eps};
    cpu_for(dev, blocks_of(n), adamw_block, &job);
    return 0;
}

int cpu_round_weights(es_device *dev, void *working, const float *master, size_t n) {
    (void)dev;
    if (working != (const void *)master) memmove(working, master, n * sizeof *master);
    return 0;
}

typedef struct squares_job {
    const float *values;
    size_t n;
    double *partial; /* (blocks) */
} squares_job;

static void squares_block(void *arg, size_t block, int worker) {
    (void)worker;
    squares_job *job = arg;
    const size_t begin = block * BLOCK, end = begin + BLOCK < job->n ? begin + BLOCK : job->n;
    double sum = 0;
    for (size_t i = begin; i < end; i++) sum += (double)job->values[i] * job->values[i];
    job->partial[block] = sum;
}

size_t cpu_optimizer_workspace(const es_workspace_plan *plan) { return (blocks_of(plan->reduce_n) + 1) * sizeof(double); }

int cpu_sum_squares(es_device *dev, double *out, const float *x, size_t n) {
    *out = 0;
    const size_t blocks = blocks_of(n);
    if (!blocks) return 0;
    double *partial = es_device_scratch(dev, blocks * sizeof *partial);
    if (!partial) return ES_ERR_RUNTIME;
    squares_job job = {x, n, partial};
    cpu_for(dev, blocks, squares_block, &job);
    double sum = 0; /* the blocks in order, whichever worker ran them */
    for (size_t b = 0; b < blocks; b++) sum += partial[b];
    *out = sum;
    return 0;
}

typedef struct scale_job {
    float *values;
    size_t n;
    float scale;
} scale_job;

static void scale_block(void *arg, size_t block, int worker) {
    (void)worker;
    const scale_job *job = arg;
    const size_t begin = block * BLOCK, end = begin + BLOCK < job->n ? begin + BLOCK : job->n;
    if (job->scale == 0.0f) memset(job->values + begin, 0, (end - begin) * sizeof *job->values);
    else
        for (size_t i = begin; i < end; i++) job->values[i] *= job->scale;
}

int cpu_scale(es_device *dev, float *x, size_t n, float scale) {
    scale_job job = {x, n, scale};
    cpu_for(dev, blocks_of(n), scale_block, &job);
    return 0;
}
