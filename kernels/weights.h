/* A model's parameters on a device, every tensor in one arena with a table of named tensors
 * (Hugging Face names) and per-layer pointers: the training's fp32 master weights, and arenas
 * of the same layout for their gradients. (Inference brings layers in one at a time instead:
 * kernels/stream.h.) */
#ifndef ES_KERNELS_WEIGHTS_H
#define ES_KERNELS_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "model.h"

typedef struct es_named_tensor {
    char name[96];       /* the Hugging Face name */
    float *data;         /* into the arena (device memory) */
    int ndim;
    int64_t shape[2];
} es_named_tensor;

typedef struct es_params {
    es_model_config config;
    float *arena;                 // (arena_floats) device memory
    size_t arena_floats;          /* the tensors, each padded to 64 floats (zeros between them) */
    es_named_tensor *tensors;     /* [n_tensors], checkpoint order */
    int n_tensors;
    float *embed;                 // (V, C)
    es_layer_weights *layers;     /* [n_layers] */
    int n_layers;
    float *final_norm;            // (C), NULL unless opened with the head
    float *lm_head;               // (V, C), the embedding when tied; NULL unless opened with the head
} es_params;

/* Every tensor of the store, converted by the device into one arena. */
int es_params_load(es_device *dev, const es_model_store *store, es_params *params, es_error *err);
/* An arena of the same layout, zeroed (gradients, optimizer moments); `what` names it in errors. */
int es_params_alloc_like(es_device *dev, const es_params *like, const char *what, es_params *out, es_error *err);
/* The same for the first `floats` floats of the layout only, which end where a tensor's padded
 * extent ends: the tensors past them get NULL pointers (the gradients and moments of a run whose
 * last tensors do not train). */
int es_params_alloc_prefix(es_device *dev, const es_params *like, size_t floats, const char *what, es_params *out, es_error *err);
void es_params_free(es_device *dev, es_params *params);
/* Where tensor i's padded extent ends in the arena (floats from its start): the tensors lie in
 * table order. */
static inline size_t es_params_extent_end(const es_params *params, int i) {
    return i + 1 < params->n_tensors ? (size_t)(params->tensors[i + 1].data - params->arena) : params->arena_floats;
}
/* The element of `other` (same layout) at the place of `param` in `params`. */
static inline float *es_params_at(const es_params *params, const es_params *other, const float *param) {
    return other->arena + (param - params->arena);
}

/* The weights the ops read (dev->weight_dtype, ops.h), in the master's layout: on a device that
 * reads fp32 (the CPU) the master weights themselves; on one that reads bf16 (CUDA) a bf16 copy
 * of them, which AdamW refreshes in the same pass as it updates the master (es_adamw_update). */
typedef struct es_working {
    void *arena;                  // (arena elements) device memory, es_dtype_size(dtype) each
    es_dtype dtype;
    int owned;                    /* a copy (freed with it), not the master itself */
    size_t n;                     /* elements, as the master's arena_floats */
    void *embed, *final_norm, *lm_head;
    es_layer_weights *layers;     /* [n_layers] */
    int n_layers;
} es_working;

/* The working weights of master, filled from it. */
int es_working_create(es_device *dev, const es_params *master, es_working *out, es_error *err);
/* Fills working from master again (after the master was written some other way: a checkpoint). */
int es_working_refresh(es_device *dev, const es_params *master, es_working *working, es_error *err);
void es_working_free(es_device *dev, es_working *working);
/* The working copy of a master parameter (NULL when the working weights are the master's). */
static inline void *es_working_at(const es_working *working, const es_params *master, const float *param) {
    if (!working->owned) return NULL;
    return (char *)working->arena + (size_t)(param - master->arena) * es_dtype_size(working->dtype);
}

#endif
