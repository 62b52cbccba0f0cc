/* AdamW with fp32 master weights, as torch.optim.AdamW computes it (decoupled weight decay,
 * bias correction), the learning-rate schedule and global-norm clipping. */
#ifndef ES_ALIGN_ADAMW_H
#define ES_ALIGN_ADAMW_H

#include <stddef.h>
#include <stdint.h>

#include "threadpool.h"

typedef struct adamw_config {
    double lr, beta1, beta2, eps, weight_decay;
} adamw_config;

/* One update of n parameters, `step` counting from 1 (torch's state["step"] after its
 * increment), in fp32 in torch's order of operations, spread over the pool (element-wise, so
 * the result does not depend on the thread count):
 *   p ← p · (1 − lr·wd);  m ← m + (g − m)(1 − β1);  v ← β2·v + (1 − β2)·g²
 *   p ← p − lr/(1 − β1^step) · m / (sqrt(v) / sqrt(1 − β2^step) + eps) */
void adamw_update(es_pool *pool, float *params, const float *grads, float *m, float *v, size_t n, int64_t step, double lr,
                  const adamw_config *config);

/* Linear warmup over `warmup` steps, then cosine decay to 0 at `total` steps (Hugging Face's
 * get_cosine_schedule_with_warmup): the learning rate of update `step` (0-based). */
double lr_at(int64_t step, int64_t warmup, int64_t total, double lr);

/* Σ g² over n gradients, in double: partial sums over fixed blocks, added in block order, so
 * the result does not depend on the thread count. */
double grad_sum_squares(es_pool *pool, const float *grads, size_t n);
/* values *= scale, and memset to 0 (scale 0), spread over the pool. */
void scale_values(es_pool *pool, float *values, size_t n, float scale);

#endif
