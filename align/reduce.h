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
#include "state.h"
#include "train.h"

typedef struct grad_bucket {
    float *grads;   // (n) device memory: gradients, and the padding between tensors (zeros)
    size_t n;
    int ready;      /* the es_grads_fn layer after which they are final (run_layers + 1: before the layers) */
} grad_bucket;

typedef struct grad_reducer {
    align_comm *comm;
    host_state *host;
    grad_bucket *buckets;   /* in starting order: `ready` from the top down, then arena order */
    int n_buckets;
    int started;            /* buckets started this step */
} grad_reducer;

/* The buckets of the trained groups (align.c; the heads' group, outside the parameter arena, is
 * final before the layers). Nothing is reduced with one rank. */
int grad_reducer_init(grad_reducer *r, const train_model *tm, const es_param_group *groups, int n_groups, align_comm *comm,
                      host_state *host, es_error *err);
/* An es_grads_fn (ctx: the reducer): starts every bucket that `layer` makes final. Pass it for
 * the last micro-batch of a step only: the earlier ones' gradients are not final. */
int grad_reducer_layer_done(void *ctx, int layer, es_error *err);
/* Starts the buckets not started yet (a rank whose micro-batch had no tokens gets no calls), then
 * waits for all: the gradients are the sums over the ranks once this returns. */
int grad_reducer_finish(grad_reducer *r, es_error *err);
void grad_reducer_free(grad_reducer *r);

#endif
