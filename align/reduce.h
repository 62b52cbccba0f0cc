/* Gradients summed over the ranks while the backward goes on (the seed's "asynchronous
 * weight-gradient pipelining"): the trained ranges of the gradient arenas are cut into buckets by
 * the layer whose backward makes them final, and each bucket's all-reduce is started (comm_start)
 * as the decoder reports that layer done (kernels/decoder.h es_grads_fn), on CUDA on the group's
 * own stream while the layers below compute. Every rank starts the same buckets in the same
 * order (the order is fixed by the model, not by timing), so the collectives match. */
#ifndef ES_ALIGN_REDUCE_H
#define ES_ALIGN_REDUCE_H

#include <stddef.h>

#include "comm.h"
#include "error.h"
#include "optimizer.h"
#include "train.h"

typedef struct grad_bucket {
    /* params, grads, m and v (where the checkpoint sees them), working: the trained range with the
     * padding between its tensors (zeros on every rank) */
    es_param_group range;
    int ready;      /* the es_grads_fn layer after which they are final (run_layers + 1: before the layers) */
} grad_bucket;

typedef struct grad_reducer {
    align_comm *comm;
    es_device *dev;
    grad_bucket *buckets;   /* in starting order: `ready` from the top down, then arena order */
    int n_buckets;
    int started;            /* buckets started this step */
    double *sums;           /* [n_buckets] their sums of squares (the global norm) */
    int to_all;             /* with zero1: this step sums onto every rank (--dump-step reads them on rank 0) */
    /* ZeRO-1 (zero1): each bucket belongs to one rank, which alone keeps its AdamW moments (m, v
     * here, packed) and updates it; the gradients are summed onto it and its weights broadcast */
    int zero1;
    int *owner;             /* [n_buckets] */
    size_t *offset;         /* [n_buckets] where an owned bucket's moments are in m and v */
    float *m, *v;           // (shard_n) device memory
    size_t shard_n;
    es_param_group *owned;  /* [n_owned] the owned buckets with their moments here */
    int n_owned;
    float *staging;         // (staging_n) device memory: a piece of another rank's moments on its way to rank 0
    size_t staging_n;
} grad_reducer;

/* The buckets of the trained groups (align.c; the heads' group, outside the parameter arena, is
 * final before the layers). Nothing is reduced with one rank. With zero1 (more than one rank)
 * the groups' m and v are host memory, the checkpoint's view of the moments, and the device holds
 * this rank's share (grad_reducer_gather / grad_reducer_scatter move them). */
int grad_reducer_init(grad_reducer *r, const train_model *tm, const es_param_group *groups, int n_groups, align_comm *comm,
                      int zero1, es_error *err);
/* An es_grads_fn (ctx: the reducer): starts every bucket that `layer` makes final. Pass it for
 * the last micro-batch of a step only: the earlier ones' gradients are not final. */
int grad_reducer_layer_done(void *ctx, int layer, es_error *err);
/* Starts the buckets not started yet (a rank whose micro-batch had no tokens gets no calls), then
 * waits for all: the gradients are the sums over the ranks once this returns (with zero1, on
 * each bucket's owner only, unless to_all). */
int grad_reducer_finish(grad_reducer *r, es_error *err);
/* The global gradient norm: each bucket's sum of squares (on its owner with zero1, shared), added
 * in bucket order, so that sharding does not change a bit of it. */
int grad_reducer_norm(grad_reducer *r, double *norm, es_error *err);
/* The optimizer step (kernels/optimizer.h es_adamw_step) of every bucket: with zero1, on its
 * owner, then its weights broadcast from there (and the working copy refreshed), the gradients
 * zeroed everywhere; without, on every rank with the groups' own moments. */
int grad_reducer_step(grad_reducer *r, float clip_scale, int64_t step, double lr, const es_adamw_config *config, es_error *err);
/* zero1: every rank's moments into the groups' m and v on rank 0 (before a checkpoint is
 * written; every rank calls it), and this rank's share from them back to the device (after one
 * was read). Without zero1: nothing to do. */
int grad_reducer_gather(grad_reducer *r, es_error *err);
int grad_reducer_scatter(grad_reducer *r, es_error *err);
void grad_reducer_free(grad_reducer *r);

#endif
