/* One micro-batch through the student (align/train.h): the decoder's forward keeps what its
 * backward reads, the loss terms give the gradients of the mapped layers' states and of the
 * final norm's output, and the decoder's backward takes them down to the embedding. */
#include "train.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

/* The device buffers of the loss terms, for max_tokens tokens. */
static size_t loss_bytes(const train_model *tm) {
    const size_t TC = (size_t)tm->max_tokens * tm->params.config.hidden_size, n = (size_t)(tm->n_mapped ? tm->n_mapped : 1);
    return (2 * n * TC + TC) * sizeof(float) + (size_t)tm->max_tokens * (sizeof(uint8_t) + sizeof(int32_t)) + 64;
}

static int alloc_loss_buffers(train_model *tm, es_error *err) {
    char *arena;
    int rc = es_device_alloc(tm->dev, loss_bytes(tm), (void **)&arena, "the loss terms' buffers", err);
    if (rc) return rc;
    const size_t TC = (size_t)tm->max_tokens * tm->params.config.hidden_size, n = (size_t)(tm->n_mapped ? tm->n_mapped : 1);
    tm->targets = (float *)arena;
    tm->dh = tm->targets + n * TC;
    tm->dnormed = tm->dh + n * TC;
    tm->labels = (int32_t *)(tm->dnormed + TC);
    tm->mask = (uint8_t *)(tm->labels + tm->max_tokens);
    return ES_OK;
}

static int init_heads(train_model *tm, es_error *err) {
    const size_t C = (size_t)tm->params.config.hidden_size, bytes = (size_t)tm->n_mapped * C * C * sizeof(float);
    float *identity = calloc((size_t)tm->n_mapped * C * C, sizeof *identity);
    int rc = identity ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory for the student heads");
    for (size_t i = 0; !rc && i < (size_t)tm->n_mapped; i++)
        for (size_t k = 0; k < C; k++) identity[(i * C + k) * C + k] = 1.0f;
    if (!rc) rc = es_device_alloc(tm->dev, bytes, (void **)&tm->heads, "the student heads", err);
    if (!rc) rc = es_device_alloc(tm->dev, bytes, (void **)&tm->head_grads, "the student heads' gradients", err);
    if (!rc) rc = es_device_upload(tm->dev, tm->heads, identity, bytes, err);
    if (!rc) rc = es_device_zero(tm->dev, tm->head_grads, bytes, err);
    free(identity);
    return rc;
}

int train_model_init(train_model *tm, es_device *dev, const char *model_dir, const int *mapped, int n_mapped,
                     float latent_weight, float ce_weight, int head_linear, int max_tokens, int max_seq, int recompute,
                     es_error *err) {
    memset(tm, 0, sizeof *tm);
    tm->dev = dev;
    if (n_mapped > TRAIN_MAX_MAPPED) return es_fail(err, ES_ERR_DATA, "%d target layers: at most %d are supported", n_mapped, TRAIN_MAX_MAPPED);
    tm->n_mapped = n_mapped;
    if (n_mapped) memcpy(tm->mapped, mapped, (size_t)n_mapped * sizeof *mapped); /* texts: no target layers, mapped NULL */
    tm->latent_weight = latent_weight, tm->ce_weight = ce_weight;
    tm->with_ce = ce_weight != 0;
    tm->max_tokens = max_tokens;
    int rc = es_model_open(model_dir, -1, 1, &tm->store, err);
    if (!rc) rc = es_params_load(dev, &tm->store, &tm->params, err);
    const es_model_config *c = &tm->params.config;
    if (!rc) {
        tm->run_layers = tm->with_ce || !n_mapped ? c->n_layers : mapped[n_mapped - 1];
        for (int i = 0; i < tm->params.n_tensors; i++)
            if (train_tensor_trains(tm, tm->params.tensors[i].name)) tm->trained_floats = es_params_extent_end(&tm->params, i);
        rc = es_params_alloc_prefix(dev, &tm->params, tm->trained_floats, "the gradients", &tm->grads, err);
    }
    if (!rc) rc = es_working_create(dev, &tm->params, &tm->working, err);
    if (rc) {
        train_model_free(tm);
        return rc;
    }
    tm->dhidden = calloc((size_t)tm->run_layers + 1, sizeof *tm->dhidden);
    if (!tm->dhidden) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) rc = es_decoder_create_training(&tm->decoder, dev, c, max_tokens, max_seq, tm->run_layers, recompute, err);
    if (!rc) rc = es_decoder_create(&tm->eval_decoder, dev, c, max_tokens, max_seq, 0, err);
    if (!rc) rc = es_stream_resident(&tm->layers, tm->working.layers, c->n_layers, err);
    if (!rc) rc = alloc_loss_buffers(tm, err);
    if (!rc && head_linear) rc = init_heads(tm, err);
    es_workspace_plan plan = {.latent_width = c->hidden_size, .vocab = c->vocab_size, .ce_width = c->hidden_size,
                              .reduce_n = tm->params.arena_floats};
    if (!rc) {
        es_decoder_plan(tm->decoder, &plan);
        rc = es_device_reserve(dev, &plan, err);
    }
    if (rc) train_model_free(tm);
    return rc;
}

int train_tensor_trains(const train_model *tm, const char *name) {
    int layer;
    if (sscanf(name, "model.layers.%d.", &layer) == 1) return layer < tm->run_layers;
    if (!strncmp(name, "model.embed_tokens", 18)) return 1;
    return tm->with_ce; /* the final norm and the head */
}

void train_model_free(train_model *tm) {
    const size_t C = (size_t)tm->params.config.hidden_size, heads = (size_t)tm->n_mapped * C * C * sizeof(float);
    if (tm->targets) es_device_free(tm->dev, tm->targets, loss_bytes(tm));
    es_device_free(tm->dev, tm->heads, heads), es_device_free(tm->dev, tm->head_grads, heads);
    es_stream_close(tm->layers);
    es_decoder_free(tm->decoder), es_decoder_free(tm->eval_decoder);
    es_working_free(tm->dev, &tm->working);
    es_params_free(tm->dev, &tm->grads), es_params_free(tm->dev, &tm->params);
    es_model_close(&tm->store);
    free(tm->dhidden);
    memset(tm, 0, sizeof *tm);
}

/* Every op can fail; the device holds the message. */
#define OP(call)                                                                                            \
    do {                                                                                                    \
        if (call) return es_device_take_error(dev, err);                                                   \
    } while (0)

static int upload_batch(train_model *tm, const align_batch *batch, es_error *err) {
    const size_t TC = (size_t)batch->T * tm->params.config.hidden_size;
    if (batch->T > tm->max_tokens) return es_fail(err, ES_ERR_RUNTIME, "a micro-batch of %d tokens: the buffers hold %d", batch->T, tm->max_tokens);
    int rc = es_device_upload(tm->dev, tm->mask, batch->mask, (size_t)batch->T, err);
    if (!rc) rc = es_device_upload(tm->dev, tm->labels, batch->labels, (size_t)batch->T * sizeof(int32_t), err);
    for (int i = 0; !rc && i < tm->n_mapped; i++)
        rc = es_device_upload(tm->dev, tm->targets + (size_t)i * TC, batch->targets[i], TC * sizeof(float), err);
    return rc;
}

/* The latent term of mapped layer i on the state h after its layer (dh written when training). */
static int latent_term(train_model *tm, int i, const float *h, int T, int backward, float scale, train_sums *sums, es_error *err) {
    es_device *dev = tm->dev;
    const int C = tm->params.config.hidden_size;
    const size_t TC = (size_t)T * C;
    const float *head = tm->heads ? tm->heads + (size_t)i * C * C : NULL;
    float *dhead = tm->head_grads && backward ? tm->head_grads + (size_t)i * C * C : NULL;
    OP(es_latent_mse(dev, &sums->latent[i], &sums->cosine[i], backward ? tm->dh + (size_t)i * TC : NULL, dhead, h,
                     tm->targets + (size_t)i * TC, tm->mask, head, T, C, (float)tm->params.config.rms_norm_eps, scale));
    return ES_OK;
}

/* Eval: a forward through every layer, the latent terms taken as each mapped layer passes. */
typedef struct eval_pass {
    train_model *tm;
    train_sums *sums;
} eval_pass;

static int eval_layer(void *ctx, int layer, const float *hidden, int T, es_error *err) {
    eval_pass *pass = ctx;
    for (int i = 0; i < pass->tm->n_mapped; i++)
        if (pass->tm->mapped[i] == layer) {
            int rc = latent_term(pass->tm, i, hidden, T, 0, 0.0f, pass->sums, err);
            if (rc) return rc;
        }
    return ES_OK;
}

int train_forward_backward(train_model *tm, const align_batch *batch, int backward, float scale, es_grads_fn on_grads, void *ctx,
                           train_sums *sums, es_error *err) {
    es_device *dev = tm->dev;
    const es_params *p = &tm->params;
    const es_working *w = &tm->working; /* what the ops read; gradients go to the master's layout */
    const es_model_config *c = &p->config;
    const int T = batch->T, C = c->hidden_size, V = c->vocab_size;
    memset(sums, 0, sizeof *sums);
    if (T == 0) return ES_OK;
    for (int t = 0; t < T; t++) sums->aligned += batch->mask[t] != 0, sums->labelled += batch->labels[t] >= 0;
    int rc = upload_batch(tm, batch, err);
    if (rc) return rc;
    const es_decoder_batch tokens = {.ids = batch->ids, .seq_start = batch->seq_start, .n_seqs = batch->n_seqs};
    const double aligned = (double)(batch->global_aligned ? batch->global_aligned : 1);
    const double labelled = (double)(batch->global_labels ? batch->global_labels : 1);
    if (!backward) {
        eval_pass pass = {tm, sums};
        rc = es_decoder_forward(tm->eval_decoder, &tokens, w->embed, w->dtype, tm->layers, c->n_layers, w->final_norm, eval_layer,
                                &pass, err);
        if (!rc) OP(es_cross_entropy(dev, &sums->ce, NULL, NULL, es_decoder_normed(tm->eval_decoder), w->lm_head, tm->labels, T, C,
                                     V, 0.0f));
        return rc;
    }
    // ---- forward, keeping what the backward reads
    rc = es_decoder_forward(tm->decoder, &tokens, w->embed, w->dtype, tm->layers, tm->run_layers, tm->with_ce ? w->final_norm : NULL,
                            NULL, NULL, err);
    if (rc) return rc;
    // ---- the loss terms: gradients of the mapped states (dh) and of the final norm's output (dnormed)
    const float **dhidden = tm->dhidden; /* indexed by layer 0..run_layers */
    memset(dhidden, 0, ((size_t)tm->run_layers + 1) * sizeof *dhidden);
    const float latent_scale = (float)(scale * tm->latent_weight / tm->n_mapped / aligned);
    for (int i = 0; i < tm->n_mapped; i++) {
        const int layer = tm->mapped[i];
        if (layer > tm->run_layers) continue;
        if ((rc = latent_term(tm, i, es_decoder_hidden(tm->decoder, layer), T, 1, latent_scale, sums, err))) return rc;
        dhidden[layer] = tm->dh + (size_t)i * T * C;
    }
    if (tm->with_ce)
        OP(es_cross_entropy(dev, &sums->ce, tm->dnormed, train_grad_of(tm, p->lm_head), es_decoder_normed(tm->decoder), w->lm_head,
                            tm->labels, T, C, V, (float)(scale * tm->ce_weight / labelled)));
    // ---- backward, top layer first
    return es_decoder_backward(tm->decoder, w, &tm->grads, tm->with_ce ? tm->dnormed : NULL, dhidden, on_grads, ctx, err);
}
