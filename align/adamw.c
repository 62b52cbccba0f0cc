#include "adamw.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { BLOCK = 1 << 16 }; /* elements per task */

typedef struct adamw_job {
    float *params, *m, *v;
    const float *grads;
    size_t n;
    float decay, one_minus_beta1, beta2, one_minus_beta2, step_size, root_correction2, eps;
} adamw_job;

static void adamw_block(void *arg, size_t block, int worker) {
    (void)worker;
    const adamw_job *job = arg;
    size_t begin = block * BLOCK, end = begin + BLOCK < job->n ? begin + BLOCK : job->n;
    for (size_t i = begin; i < end; i++) {
        float g = job->grads[i];
        job->params[i] *= job->decay;
        job->m[i] += (g - job->m[i]) * job->one_minus_beta1;
        job->v[i] = job->v[i] * job->beta2 + job->one_minus_beta2 * g * g;
        float denominator = sqrtf(job->v[i]) / job->root_correction2 + job->eps;
        job->params[i] -= job->step_size * (job->m[i] / denominator);
    }
}

void adamw_update(es_pool *pool, float *params, const float *grads, float *m, float *v, size_t n, int64_t step, double lr,
                  const adamw_config *config) {
    const double bias_correction1 = 1.0 - pow(config->beta1, (double)step);
    const double bias_correction2 = 1.0 - pow(config->beta2, (double)step);
    adamw_job job = {params, m, v, grads, n, (float)(1.0 - lr * config->weight_decay), (float)(1.0 - config->beta1),
                     (float)config->beta2, (float)(1.0 - config->beta2), (float)(lr / bias_correction1),
                     (float)sqrt(bias_correction2), (float)config->eps};
    size_t blocks = (n + BLOCK - 1) / BLOCK;
    if (pool && blocks > 1) es_pool_for(pool, blocks, adamw_block, &job);
    else
        for (size_t b = 0; b < blocks; b++) adamw_block(&job, b, 0);
}

double lr_at(int64_t step, int64_t warmup, int64_t total, double lr) {
    if (step < warmup) return lr * (double)(step + 1) / (double)warmup;
    if (total <= warmup) return lr;
    double progress = (double)(step - warmup) / (double)(total - warmup);
    if (progress > 1) progress = 1;
    return lr * 0.5 * (1.0 + cos(M_PI * progress));
}

static double block_squares(const float *values, size_t n, size_t block) {
    size_t begin = block * BLOCK, end = begin + BLOCK < n ? begin + BLOCK : n;
    double sum = 0;
    for (size_t i = begin; i < end; i++) sum += (double)values[i] * values[i];
    return sum;
}

typedef struct squares_job {
    const float *values;
    size_t n;
    double *partial;
} squares_job;

static void squares_block(void *arg, size_t block, int worker) {
    (void)worker;
    squares_job *job = arg;
    job->partial[block] = block_squares(job->values, job->n, block);
}

double grad_sum_squares(es_pool *pool, const float *grads, size_t n) {
    size_t blocks = (n + BLOCK - 1) / BLOCK;
    double *partial = pool && blocks > 1 ? calloc(blocks, sizeof *partial) : NULL, sum = 0;
    if (partial) {
        squares_job job = {grads, n, partial};
        es_pool_for(pool, blocks, squares_block, &job);
    }
    /* the same blocks added in the same order, whether they ran on the pool or here */
    for (size_t b = 0; b < blocks; b++) sum += partial ? partial[b] : block_squares(grads, n, b);
    free(partial);
    return sum;
}

typedef struct scale_job {
    float *values;
    size_t n;
    float scale;
} scale_job;

static void scale_block(void *arg, size_t block, int worker) {
    (void)worker;
    scale_job *job = arg;
    size_t begin = block * BLOCK, end = begin + BLOCK < job->n ? begin + BLOCK : job->n;
    if (job->scale == 0.0f) memset(job->values + begin, 0, (end - begin) * sizeof *job->values);
    else
        for (size_t i = begin; i < end; i++) job->values[i] *= job->scale;
}

void scale_values(es_pool *pool, float *values, size_t n, float scale) {
    scale_job job = {values, n, scale};
    size_t blocks = (n + BLOCK - 1) / BLOCK;
    if (pool && blocks > 1) es_pool_for(pool, blocks, scale_block, &job);
    else
        for (size_t b = 0; b < blocks; b++) scale_block(&job, b, 0);
}
