/* The decoder stack's forward pass composed from kernels/ops.h (CPU backend). */
#ifndef ES_KERNELS_FORWARD_H
#define ES_KERNELS_FORWARD_H

#include <stdint.h>

#include "error.h"
#include "model.h"
#include "threadpool.h"

/* Called with the residual stream after each layer: layer 0 is the embedding output,
 * layer L the stream after decoder layer L (1-based), before any final norm. Return
 * nonzero (an error code already set in err) to stop. */
typedef int (*es_layer_fn)(void *ctx, int layer, const float *hidden /* (T, C) */, int T, es_error *err);

/* Runs tokens ids[0, T) packed as n_seqs sequences (seq_start: (n_seqs + 1) offsets; no
 * attention across sequences; positions restart at 0 in each) through layers 1..last_layer
 * of the model (last_layer <= model->n_layers_loaded), calling on_layer after each.
 * With final_norm != NULL (and last_layer == every layer, the head loaded) it also receives
 * the final-norm output (T, C). */
int es_forward(const es_model *model, es_pool *pool, const int32_t *ids, const int32_t *seq_start, int n_seqs,
               int last_layer, es_layer_fn on_layer, void *ctx, float *final_norm, es_error *err);

#endif
