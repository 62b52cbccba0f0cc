/* The student under training on a device: fp32 master weights and their gradients (one arena
 * each), the optional student heads, the decoder's activations, the loss terms' buffers, and one
 * micro-batch's forward and backward (DESIGN.md "Training objective"), composed from
 * kernels/decoder.h and the loss ops. */
#ifndef ES_ALIGN_TRAIN_H
#define ES_ALIGN_TRAIN_H

#include <stdint.h>

#include "backend.h"
#include "data.h"
#include "decoder.h"
#include "error.h"
#include "model.h"
#include "weights.h"

enum { TRAIN_MAX_MAPPED = 64 };

typedef struct train_model {
    es_device *dev;
    es_model_store store;
    es_params params;        /* every layer, the final norm and the head: fp32 master weights */
    es_params grads;         /* the gradient of each trained parameter, same layout, the arena's first trained_floats */
    size_t trained_floats;   /* the prefix of the arena that holds every trained tensor (the tensors past it do not train) */
    es_working working;      /* what the ops read: the master weights, or their bf16 copy (CUDA) */
    int n_mapped;
    int mapped[TRAIN_MAX_MAPPED]; /* student layers with targets, ascending (1-based) */
    int run_layers;          /* layers the training forward and backward go through */
    int with_ce;             /* the CE term is on: the final norm and the head run and train */
    float *heads;            // (n_mapped, C, C) the student heads (identity at start), or NULL
    float *head_grads;       // (n_mapped, C, C) or NULL
    float latent_weight, ce_weight;
    int max_tokens;          /* tokens per micro-batch the buffers hold */
    es_decoder *decoder;     /* training: keeps run_layers layers' activations */
    es_decoder *eval_decoder; /* inference through every layer, for eval */
    es_layer_stream *layers; /* the working weights, resident */
    /* the loss terms' buffers (device) */
    float *targets;          // (n_mapped, max_tokens, C)
    float *dh;               // (n_mapped, max_tokens, C) gradients of the mapped layers' states
    float *dnormed;          // (max_tokens, C) gradient of the final norm's output
    uint8_t *mask;           // (max_tokens)
    int32_t *labels;         // (max_tokens)
    const float **dhidden;   /* [run_layers + 1] host: the loss gradient at each layer's output, or NULL */
} train_model;

/* Opens the model on the device and sets what runs: with ce_weight 0 only layers up to the
 * deepest mapped one run and train. head_linear adds one D×D head per mapped layer. Buffers hold
 * micro-batches of up to max_tokens tokens in sequences of up to max_seq. recompute keeps each
 * layer's input only and runs its forward again in the backward (es_decoder_create_training). */
int train_model_init(train_model *tm, es_device *dev, const char *model_dir, const int *mapped, int n_mapped,
                     float latent_weight, float ce_weight, int head_linear, int max_tokens, int max_seq, int recompute,
                     es_error *err);
void train_model_free(train_model *tm);

/* Whether the tensor trains: the forward of a training step reaches it. With ce_weight 0 the layers
 * above the deepest mapped one, the final norm and the head never get a gradient: the optimizer,
 * the gradient norm, the all-reduce and the zeroing skip them, and no gradients or moments are
 * held for them (they come last in the arena: trained_floats). */
int train_tensor_trains(const train_model *tm, const char *name);

/* The gradient of a trained parameter (a pointer into params.arena). */
static inline float *train_grad_of(const train_model *tm, const float *param) {
    return es_params_at(&tm->params, &tm->grads, param);
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
 * Without backward (eval), every layer runs and the CE term is computed too. With backward,
 * on_grads (kernels/decoder.h; NULL: none) is called as the gradients become final: with
 * run_layers + 1 once the heads', the output head's and the final norm's are, then down the
 * layers to 0 (the embedding's). A micro-batch of no tokens makes no calls. */
int train_forward_backward(train_model *tm, const align_batch *batch, int backward, float scale, es_grads_fn on_grads, void *ctx,
                           train_sums *sums, es_error *err);

#endif
