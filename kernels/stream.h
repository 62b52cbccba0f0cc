/* The layer stream: a model's decoder layers brought into a device as the forward pass reaches
 * them, within the memory the device has left (--max-memory). When every layer fits, all are
 * brought in once and stay; otherwise layers pass through two slots, layer ℓ+1 coming in on the
 * device's copy stream while layer ℓ computes (after the last layer, the first comes in again
 * for the next batch); with room for one layer only, one slot, without overlap. Either way the
 * weights are the same bits, so outputs do not depend on the memory given. */
#ifndef ES_KERNELS_STREAM_H
#define ES_KERNELS_STREAM_H

#include "backend.h"
#include "model.h"

typedef struct es_layer_stream es_layer_stream;

/* Layers 1..last_layer of the store, planned against what the device has left now (so open it
 * after the activations and the workspace are allocated). Too little room for one layer is
 * ES_ERR_RUNTIME naming the sizes. */
int es_stream_open(es_layer_stream **out, es_device *dev, const es_model_store *store, int last_layer, es_error *err);
/* Weights already on the device (the training's master weights): acquire just hands them out. */
int es_stream_resident(es_layer_stream **out, es_layer_weights *layers, int n_layers, es_error *err);
void es_stream_close(es_layer_stream *stream);

/* Layer `layer` (1-based) on the device, waiting for it if it is still coming in. Layers are
 * acquired in order, each released before the next is acquired. */
int es_stream_acquire(es_layer_stream *stream, int layer, const es_layer_weights **weights, es_error *err);
void es_stream_release(es_layer_stream *stream, int layer);

/* How the layers are held: 0 resident, else the number of slots they pass through (1 or 2). */
int es_stream_slots(const es_layer_stream *stream);

#endif
