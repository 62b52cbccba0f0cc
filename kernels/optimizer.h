/* The optimizer step, backend-independent: global-norm clipping, AdamW on every group of
 * parameters, and the learning-rate schedule (DESIGN.md "Training objective"). */
#ifndef ES_KERNELS_OPTIMIZER_H
#define ES_KERNELS_OPTIMIZER_H

#include <stddef.h>
#include <stdint.h>

#include "ops.h"

/* Parameters that train together: n values with their gradients and AdamW moments (device), and
 * the copy of them in the device's weight format that the ops read, or NULL when they read the
 * parameters themselves (es_adamw_update). */
typedef struct es_param_group {
    float *params, *grads, *m, *v;
    size_t n;
    void *working;
} es_param_group;

/* The global gradient norm over the groups (sums of squares in a fixed order). */
int es_grad_norm(es_device *dev, const es_param_group *groups, int n_groups, double *norm, es_error *err);

/* One step: gradients scaled by clip_scale (1: none), AdamW with this step's lr and `step`
 * counting from 1, then the gradients zeroed. */
int es_adamw_step(es_device *dev, const es_param_group *groups, int n_groups, float clip_scale, int64_t step, double lr,
                  const es_adamw_config *config, es_error *err);

/* Linear warmup over `warmup` steps, then cosine decay to 0 at `total` steps (Hugging Face's
 * get_cosine_schedule_with_warmup): the learning rate of update `step` (0-based). */
double es_lr_at(int64_t step, int64_t warmup, int64_t total, double lr);

#endif
