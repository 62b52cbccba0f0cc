/* The student under training: fp32 master weights, a gradient arena of the same layout, the
 * optional student heads, and one micro-batch's forward and backward (DESIGN.md "Training
 * objective"). CPU backend, composed from kernels/ops.h and kernels/ops_backward.h. */
#ifndef ES_ALIGN_TRAIN_H
#define ES_ALIGN_TRAIN_H

#include <stdint.h>

#include "data.h"
#include "error.h"
#include "model.h"
#include "threadpool.h"

enum { TRAIN_MAX_MAPPED = 64 };

typedef struct train_model {
    es_model model;          /* every layer, the final norm and the head: fp32 master weights */
    float *grads;            /* (model.arena_floats): gradient of each parameter at the same offset */
    int n_mapped;
    int mapped[TRAIN_MAX_MAPPED]; /* student layers with targets, ascending (1-based) */
    int run_layers;          /* layers the forward and backward go through */
    int with_ce;             /* the CE term is on: the final norm and the head run and train */
    float *heads;            /* (n_mapped, C, C) the student heads (identity at start), or NULL */
    float *head_grads;       /* (n_mapped, C, C) or NULL */
    float latent_weight, ce_weight;
    struct train_buffers *buffers; /* activations, sized for the largest batch so far */
} train_model;

/* Loads the model and sets what runs: with ce_weight 0 only layers up to the deepest mapped
 * one run and train. head_linear adds one D×D head per mapped layer. */
int train_model_init(train_model *tm, const char *model_dir, const int *mapped, int n_mapped, float latent_weight,
                     float ce_weight, int head_linear, es_error *err);
void train_model_free(train_model *tm);

/* The gradient of a parameter (a pointer into model.arena). */
static inline float *train_grad_of(const train_model *tm, const float *param) {
    return tm->grads + (param - tm->model.arena);
}

/* Sums over one micro-batch (this rank's share): each term is a sum over tokens. */
typedef struct train_sums {
    double latent[TRAIN_MAX_MAPPED]; /* Σ over aligned tokens of mean_k (y − t)², per mapped layer */
    double cosine[TRAIN_MAX_MAPPED]; /* Σ over aligned tokens of cos(y, t) */
    double ce;                       /* Σ over labelled tokens of the next-token loss */
    int64_t aligned, labelled;       /* this rank's counts */
} train_sums;

/* Forward on one batch, and with `backward` the gradients, ACCUMULATED into tm->grads and
 * tm->head_grads: loss = latent_weight · mean over mapped layers of (Σ latent / global_aligned)
 * + ce_weight · Σ ce / global_labels, times `scale` (1/N for N accumulated micro-batches).
 * Without backward, the CE term is computed through every layer whenever the head exists
 * (for eval). */
int train_forward_backward(train_model *tm, es_pool *pool, const align_batch *batch, int backward, float scale,
                           train_sums *sums, es_error *err);

#endif
