/* The optimizer step (kernels/optimizer.h). */
#include "optimizer.h"

#include <math.h>

int es_grad_norm(es_device *dev, const es_param_group *groups, int n_groups, double *norm, es_error *err) {
    double total = 0;
    for (int i = 0; i < n_groups; i++) {
        double sum = 0;
        if (es_sum_squares(dev, &sum, groups[i].grads, groups[i].n)) return es_device_take_error(dev, err);
        total += sum;
    }
    *norm = sqrt(total);
    return ES_OK;
}

int es_adamw_step(es_device *dev, const es_param_group *groups, int n_groups, float clip_scale, int64_t step, double lr,
                  const es_adamw_config *config, es_error *err) {
    for (int i = 0; i < n_groups; i++) {
        const es_param_group *g = &groups[i];
        if ((clip_scale != 1.0f && es_scale(dev, g->grads, g->n, clip_scale)) ||
            es_adamw_update(dev, g->params, g->working, g->grads, g->m, g->v, g->n, step, lr, config) || es_scale(dev, g->grads, g->n, 0.0f))
            return es_device_take_error(dev, err);
    }
    return ES_OK;
}

double es_lr_at(int64_t step, int64_t warmup, int64_t total, double lr) {
    if (step < warmup) return lr * (double)(step + 1) / (double)warmup;
    if (total <= warmup) return lr;
    double progress = (double)(step - warmup) / (double)(total - warmup);
    if (progress > 1) progress = 1;
    return lr * 0.5 * (1.0 + cos(M_PI * progress));
}
