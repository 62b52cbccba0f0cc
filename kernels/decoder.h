/* The decoder stack, forward and backward, composed once from the ops (kernels/ops.h) for
 * every stage and backend: extract runs it forward over a layer stream; align keeps the
 * activations and runs it backward. Llama and Qwen2 layers (RMSNorm, GQA attention with RoPE,
 * SwiGLU, optional biases), before the final norm unless asked for it.
 *
 * The decoder owns one activation arena on the device, sized at creation for a number of
 * tokens (and, to train, for the activations the backward reads), with a table of named
 * tensors as llm.c's; the ops' workspace is reserved by the caller with es_decoder_plan. */
#ifndef ES_KERNELS_DECODER_H
#define ES_KERNELS_DECODER_H

#include <stdint.h>

#include "backend.h"
#include "model.h"
#include "stream.h"
#include "weights.h"

typedef struct es_decoder es_decoder;

/* Keys and values of the tokens generated so far, for a forward that continues them: per decoder
 * layer, `slots` sequences of up to max_seq tokens each (device memory, fp32). */
typedef struct es_kv_cache es_kv_cache;
int es_kv_cache_create(es_kv_cache **out, es_device *dev, const es_model_config *config, int n_layers, int slots, int max_seq,
                       es_error *err);
void es_kv_cache_free(es_kv_cache *cache);
/* The tokens slot holds (0 when new or cleared). */
int es_kv_cache_length(const es_kv_cache *cache, int slot);
/* Forgets the slot's tokens: its next sequence starts at position 0. */
void es_kv_cache_clear(es_kv_cache *cache, int slot);

/* Activations for up to max_tokens tokens per batch, sequences up to max_seq long (it sizes the
 * workspace plan only); train_layers > 0 keeps what the backward of that many layers reads, and
 * its gradient buffers. */
int es_decoder_create(es_decoder **out, es_device *dev, const es_model_config *config, int max_tokens, int max_seq,
                      int train_layers, es_error *err);
/* The same for training, with recompute: keeps each layer's input only, and the backward runs each
 * layer's forward again (the same ops on the same input: the same bits) before its backward:
 * activation memory per layer falls from 4C + 2Q + 2KVd + 3I floats per token to C, for about
 * one more forward pass. */
int es_decoder_create_training(es_decoder **out, es_device *dev, const es_model_config *config, int max_tokens, int max_seq,
                               int train_layers, int recompute, es_error *err);
void es_decoder_free(es_decoder *decoder);
/* Adds the decoder's ops' shapes to plan (for es_device_reserve). */
void es_decoder_plan(const es_decoder *decoder, es_workspace_plan *plan);

/* A batch: tokens ids[0, T) packed as n_seqs sequences (host memory). Positions restart at 0
 * in each sequence and no token attends across sequences. */
typedef struct es_decoder_batch {
    const int32_t *ids;        // (T) host
    const int32_t *seq_start;  // (n_seqs + 1) host; T = seq_start[n_seqs]
    int n_seqs;
    /* Generation (an inference decoder): with a cache, sequence s continues the tokens held in
     * cache slot slots[s] (positions go on from there, attention sees them) and the forward
     * appends its tokens to that slot. NULL: every sequence starts at position 0. */
    es_kv_cache *cache;
    const int32_t *slots;      // (n_seqs) host, distinct
} es_decoder_batch;

/* Called with the residual stream after each layer: layer 0 is the embedding output, layer L
 * the stream after decoder layer L (1-based), before any final norm; hidden is device memory.
 * Return nonzero (an error code already set in err) to stop. */
typedef int (*es_layer_fn)(void *ctx, int layer, const float *hidden /* (T, C) */, int T, es_error *err);

/* Runs the batch through the embedding (table: device memory in the device's weight format, or a
 * host mapping of the checkpoint in its dtype; ids outside the vocabulary are ES_ERR_DATA) and
 * layers 1..last_layer of `layers`, calling on_layer (may be NULL) after each. With final_norm !=
 * NULL (the weight, (C), in the device's weight format) the final norm's output follows
 * (es_decoder_normed). A training decoder keeps activations
 * for es_decoder_backward (last_layer <= train_layers). */
int es_decoder_forward(es_decoder *decoder, const es_decoder_batch *batch, const void *embed, es_dtype embed_dtype,
                       es_layer_stream *layers, int last_layer, const void *final_norm, es_layer_fn on_layer, void *ctx,
                       es_error *err);

/* After a forward: the stream after `layer` (0..last_layer; a training decoder keeps every one,
 * an inference decoder only the last), and the final norm's output (or NULL). (T, C) device. */
float *es_decoder_hidden(es_decoder *decoder, int layer);
float *es_decoder_normed(es_decoder *decoder);

/* Called by es_decoder_backward (when not NULL) as gradients become final, so that they can be
 * summed over ranks while the backward goes on: with last_layer + 1 after the final norm's, with
 * l after layer l's (l = last_layer down to 1), and with 0 after the embedding's; the ops are
 * queued, not finished. Return nonzero (an error code already set in err) to stop. */
typedef int (*es_grads_fn)(void *ctx, int layer, es_error *err);

/* The backward of the last (training) forward: dnormed, the gradient of the final norm's output
 * (or NULL when no loss reads it), and dhidden[l] for l in 0..last_layer, the gradient of the
 * stream after layer l (NULL where none), feed the gradients ACCUMULATED into grads (same
 * layout as weights: embedding, every layer run, and the final norm when dnormed is given). */
int es_decoder_backward(es_decoder *decoder, const es_working *weights, es_params *grads, const float *dnormed,
                        const float *const *dhidden, es_grads_fn on_grads, void *ctx, es_error *err);

#endif
