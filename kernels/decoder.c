/* The decoder stack (kernels/decoder.h), one screenful per layer each way. */
#include "decoder.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

/* What the backward of one layer reads from its forward. */
typedef struct layer_acts {
    float *x_in;      // (T, C) the residual stream entering the layer
    float *normed1;   // (T, C) input_layernorm output
    float *q, *k, *v; // (T, H*hd), (T, KV*hd), (T, KV*hd) after RoPE
    float *att;       // (T, H*hd) attention output
    float *x_mid;     // (T, C) the stream after the attention block
    float *normed2;   // (T, C) post_attention_layernorm output
    float *gate, *up; // (T, I) before the activation (silu(gate) * up, made again where it is needed)
} layer_acts;

/* One entry of the arena's table: a named tensor and where its pointer goes. */
typedef struct named_buffer {
    char name[32];
    void **slot;
    size_t bytes;
} named_buffer;

struct es_kv_cache {
    es_device *dev;
    int n_layers, slots, max_seq, row; /* row: KV * hd */
    float *keys, *values;  // (n_layers, slots, max_seq, row) each
    size_t bytes;          /* of each */
    int *length;           /* [slots] host */
};

int es_kv_cache_create(es_kv_cache **out, es_device *dev, const es_model_config *config, int n_layers, int slots, int max_seq,
                       es_error *err) {
    *out = NULL;
    es_kv_cache *cache = calloc(1, sizeof *cache);
    if (!cache || !(cache->length = calloc((size_t)(slots > 0 ? slots : 1), sizeof *cache->length))) {
        free(cache);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    cache->dev = dev, cache->n_layers = n_layers, cache->slots = slots, cache->max_seq = max_seq;
    cache->row = config->n_kv_heads * config->head_dim;
    cache->bytes = (size_t)n_layers * slots * max_seq * cache->row * sizeof(float);
    char what[160];
    snprintf(what, sizeof what, "the key/value cache (%d layers, %d sequences of %d tokens)", n_layers, slots, max_seq);
    int rc = es_device_alloc(dev, cache->bytes ? cache->bytes : 64, (void **)&cache->keys, what, err);
    if (!rc) rc = es_device_alloc(dev, cache->bytes ? cache->bytes : 64, (void **)&cache->values, what, err);
    if (rc) {
        es_kv_cache_free(cache);
        return rc;
    }
    *out = cache;
    return ES_OK;
}

void es_kv_cache_free(es_kv_cache *cache) {
    if (!cache) return;
    const size_t bytes = cache->bytes ? cache->bytes : 64;
    if (cache->keys) es_device_free(cache->dev, cache->keys, bytes);
    if (cache->values) es_device_free(cache->dev, cache->values, bytes);
    free(cache->length);
    free(cache);
}

int es_kv_cache_length(const es_kv_cache *cache, int slot) { return cache->length[slot]; }
void es_kv_cache_clear(es_kv_cache *cache, int slot) { cache->length[slot] = 0; }

struct es_decoder {
    es_device *dev;
    es_model_config config;
    int max_tokens, max_seq, train_layers;
    int recompute;               /* training keeps each layer's input only; the backward redoes the rest */
    void *arena;
    size_t arena_bytes;
    named_buffer *table;
    int n_table;
    int32_t *host_positions;     // (max_tokens) host
    /* inputs */
    int32_t *ids, *seq_start, *positions; // (T), (n_seqs + 1), (T)
    int32_t *past, *slots;       // (n_seqs), (n_seqs): a cached batch's lengths before it, and its slots
    int32_t *host_past;          // (max_tokens) host
    double *inv_freq;            // (hd / 2)
    /* inference: one set of buffers reused by every layer, the stream x (and x_mid between its blocks) */
    float *x, *x_mid, *normed, *q, *k, *v, *att, *gate, *up; // (T, C|Q|KVd|I)
    float *normed_final;         // (T, C)
    /* training */
    layer_acts *acts;            /* [train_layers]; with recompute only their x_in are their own */
    layer_acts redo;             /* recompute: the one set of the other activations, shared by every layer */
    float *x_final;              // (T, C) the stream after the last layer run
    float *dx, *dx_mid, *dn, *dq, *dk, *dv, *datt, *dgate, *dup; // gradients, (T, ...)
    /* the last forward */
    int T, n_seqs, last_layer, has_normed;
};

static int add_buffer(es_decoder *d, const char *name, int index, void *slot, size_t bytes) {
    named_buffer *grown = realloc(d->table, (size_t)(d->n_table + 1) * sizeof *grown);
    if (!grown) return -1;
    d->table = grown;
    named_buffer *b = &d->table[d->n_table++];
    if (index >= 0) snprintf(b->name, sizeof b->name, "layer %d %s", index + 1, name);
    else snprintf(b->name, sizeof b->name, "%s", name);
    b->slot = slot, b->bytes = (bytes + 63) / 64 * 64;
    return 0;
}

/* The table of the arena for the decoder's shape (llm.c's malloc_and_point_activations). */
static int build_table(es_decoder *d) {
    const es_model_config *c = &d->config;
    const size_t n = (size_t)d->max_tokens, C = (size_t)c->hidden_size, I = (size_t)c->intermediate_size;
    const size_t Q = (size_t)c->n_heads * c->head_dim, KVd = (size_t)c->n_kv_heads * c->head_dim, f = sizeof(float);
    int bad = 0;
#define BUFFER(name, field, bytes) bad |= add_buffer(d, name, -1, &d->field, bytes)
    BUFFER("ids", ids, n * sizeof(int32_t));
    BUFFER("seq_start", seq_start, (n + 1) * sizeof(int32_t));
    BUFFER("positions", positions, n * sizeof(int32_t));
    BUFFER("past", past, n * sizeof(int32_t));
    BUFFER("slots", slots, n * sizeof(int32_t));
    BUFFER("inv_freq", inv_freq, (size_t)c->head_dim / 2 * sizeof(double));
    BUFFER("normed_final", normed_final, n * C * f);
    if (!d->train_layers) {
        BUFFER("x", x, n * C * f), BUFFER("x_mid", x_mid, n * C * f), BUFFER("normed", normed, n * C * f);
        BUFFER("q", q, n * Q * f), BUFFER("k", k, n * KVd * f), BUFFER("v", v, n * KVd * f), BUFFER("att", att, n * Q * f);
        BUFFER("gate", gate, n * I * f), BUFFER("up", up, n * I * f);
    } else {
        for (int l = 0; l < d->train_layers; l++) {
            layer_acts *a = &d->acts[l];
#define LAYER(name, bytes) bad |= add_buffer(d, #name, l, &a->name, bytes)
            LAYER(x_in, n * C * f);
            if (d->recompute) continue;
            LAYER(normed1, n * C * f), LAYER(q, n * Q * f), LAYER(k, n * KVd * f);
            LAYER(v, n * KVd * f), LAYER(att, n * Q * f), LAYER(x_mid, n * C * f), LAYER(normed2, n * C * f);
            LAYER(gate, n * I * f), LAYER(up, n * I * f);
#undef LAYER
        }
        if (d->recompute) {
            layer_acts *a = &d->redo;
#define REDO(name, bytes) bad |= add_buffer(d, "recomputed " #name, -1, &a->name, bytes)
            REDO(normed1, n * C * f), REDO(q, n * Q * f), REDO(k, n * KVd * f), REDO(v, n * KVd * f), REDO(att, n * Q * f);
            REDO(x_mid, n * C * f), REDO(normed2, n * C * f), REDO(gate, n * I * f), REDO(up, n * I * f);
#undef REDO
        }
        BUFFER("x_final", x_final, n * C * f), BUFFER("dx", dx, n * C * f), BUFFER("dx_mid", dx_mid, n * C * f);
        BUFFER("dn", dn, n * C * f), BUFFER("dq", dq, n * Q * f);
        BUFFER("dk", dk, n * KVd * f), BUFFER("dv", dv, n * KVd * f), BUFFER("datt", datt, n * Q * f);
        BUFFER("dgate", dgate, n * I * f), BUFFER("dup", dup, n * I * f);
    }
#undef BUFFER
    return bad ? -1 : 0;
}

int es_decoder_create(es_decoder **out, es_device *dev, const es_model_config *config, int max_tokens, int max_seq,
                      int train_layers, es_error *err) {
    return es_decoder_create_training(out, dev, config, max_tokens, max_seq, train_layers, 0, err);
}

int es_decoder_create_training(es_decoder **out, es_device *dev, const es_model_config *config, int max_tokens, int max_seq,
                               int train_layers, int recompute, es_error *err) {
    *out = NULL;
    es_decoder *d = calloc(1, sizeof *d);
    if (!d) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    d->dev = dev, d->config = *config;
    d->max_tokens = max_tokens > 0 ? max_tokens : 1, d->max_seq = max_seq, d->train_layers = train_layers;
    d->recompute = train_layers > 0 && recompute;
    d->acts = calloc((size_t)train_layers + 1, sizeof *d->acts);
    d->host_positions = malloc((size_t)d->max_tokens * sizeof *d->host_positions);
    d->host_past = malloc((size_t)d->max_tokens * sizeof *d->host_past);
    int rc = d->acts && d->host_positions && d->host_past && !build_table(d) ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int i = 0; i < d->n_table; i++) d->arena_bytes += d->table[i].bytes;
    char what[160];
    snprintf(what, sizeof what, "the activations of %d tokens%s", d->max_tokens,
             !train_layers ? "" : d->recompute ? " for training (recomputed in the backward)" : " for training");
    if (!rc) rc = es_device_alloc(dev, d->arena_bytes, &d->arena, what, err);
    for (size_t i = 0, at = 0; !rc && i < (size_t)d->n_table; at += d->table[i].bytes, i++) *d->table[i].slot = (char *)d->arena + at;
    if (!rc) {
        double *inv_freq = malloc((size_t)config->head_dim / 2 * sizeof *inv_freq);
        if (!inv_freq) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        else es_rope_inv_freq(config, inv_freq), rc = es_device_upload(dev, d->inv_freq, inv_freq, (size_t)config->head_dim / 2 * sizeof *inv_freq, err);
        free(inv_freq);
    }
    if (rc) {
        es_decoder_free(d);
        return rc;
    }
    *out = d;
    return ES_OK;
}

void es_decoder_free(es_decoder *d) {
    if (!d) return;
    es_device_free(d->dev, d->arena, d->arena_bytes);
    free(d->table), free(d->acts), free(d->host_positions), free(d->host_past);
    free(d);
}

void es_decoder_plan(const es_decoder *d, es_workspace_plan *plan) {
    const es_model_config *c = &d->config;
    const int Q = c->n_heads * c->head_dim, widest = c->intermediate_size > Q ? c->intermediate_size : Q;
    const int wide = widest > c->hidden_size ? widest : c->hidden_size;
#define AT_LEAST(field, value) plan->field = plan->field > (value) ? plan->field : (value)
    AT_LEAST(tokens, d->max_tokens);
    AT_LEAST(longest, d->max_seq);
    AT_LEAST(heads, c->n_heads);
    AT_LEAST(kv_heads, c->n_kv_heads);
    AT_LEAST(head_dim, c->head_dim);
    AT_LEAST(max_in, wide);
    AT_LEAST(max_out, wide);
    AT_LEAST(train, d->train_layers > 0);
#undef AT_LEAST
}

float *es_decoder_hidden(es_decoder *d, int layer) {
    if (!d->train_layers) return layer == d->last_layer ? d->x : NULL;
    return layer < d->last_layer ? d->acts[layer].x_in : layer == d->last_layer ? d->x_final : NULL;
}
float *es_decoder_normed(es_decoder *d) { return d->has_normed ? d->normed_final : NULL; }

/* Every op can fail; the device holds the message. */
#define OP(call)                                                                                            \
    do {                                                                                                    \
        if (call) {                                                                                         \
            rc = es_device_take_error(dev, err);                                                            \
            goto done;                                                                                      \
        }                                                                                                   \
    } while (0)

static int upload_batch(es_decoder *d, const es_decoder_batch *batch, es_error *err) {
    const es_model_config *c = &d->config;
    const int T = batch->seq_start[batch->n_seqs];
    if (T > d->max_tokens || batch->n_seqs > d->max_tokens)
        return es_fail(err, ES_ERR_RUNTIME, "a batch of %d tokens in %d sequences: the decoder holds %d", T, batch->n_seqs, d->max_tokens);
    for (int t = 0; t < T; t++)
        if (batch->ids[t] < 0 || batch->ids[t] >= c->vocab_size)
            return es_fail(err, ES_ERR_DATA, "token %d: id %d is outside the vocabulary (%d)", t, batch->ids[t], c->vocab_size);
    const es_kv_cache *cache = batch->cache;
    if (cache && d->train_layers) return es_fail(err, ES_ERR_RUNTIME, "a key/value cache on a decoder made for training");
    for (int s = 0; cache && s < batch->n_seqs; s++) {
        const int slot = batch->slots[s], L = batch->seq_start[s + 1] - batch->seq_start[s];
        if (slot < 0 || slot >= cache->slots || cache->length[slot] + L > cache->max_seq)
            return es_fail(err, ES_ERR_RUNTIME, "sequence %d: %d more tokens in cache slot %d (of %d), which holds %d of %d", s, L, slot,
                           cache->slots, slot >= 0 && slot < cache->slots ? cache->length[slot] : 0, cache->max_seq);
        for (int u = 0; u < s; u++)
            if (batch->slots[u] == slot) return es_fail(err, ES_ERR_RUNTIME, "sequences %d and %d share cache slot %d", u, s, slot);
        d->host_past[s] = cache->length[slot];
    }
    for (int s = 0; s < batch->n_seqs; s++)
        for (int t = batch->seq_start[s]; t < batch->seq_start[s + 1]; t++)
            d->host_positions[t] = (cache ? d->host_past[s] : 0) + t - batch->seq_start[s];
    int rc = es_device_upload(d->dev, d->ids, batch->ids, (size_t)T * sizeof(int32_t), err);
    if (!rc && cache) rc = es_device_upload(d->dev, d->past, d->host_past, (size_t)batch->n_seqs * sizeof(int32_t), err);
    if (!rc && cache) rc = es_device_upload(d->dev, d->slots, batch->slots, (size_t)batch->n_seqs * sizeof(int32_t), err);
    if (!rc) rc = es_device_upload(d->dev, d->seq_start, batch->seq_start, ((size_t)batch->n_seqs + 1) * sizeof(int32_t), err);
    if (!rc) rc = es_device_upload(d->dev, d->positions, d->host_positions, (size_t)T * sizeof(int32_t), err);
    d->T = T, d->n_seqs = batch->n_seqs;
    return rc;
}

/* One decoder layer (1-based `layer`) over the batch uploaded last: its activations into a, the
 * stream after it into x_out. x_out NULL stops after the MLP's gate and up (the backward's
 * recomputation: it reads nothing after them). */
static int layer_forward(es_decoder *d, const es_layer_weights *w, const layer_acts *a, float *x_out, int layer, es_kv_cache *cache,
                         es_error *err) {
    es_device *dev = d->dev;
    const es_model_config *c = &d->config;
    const int T = d->T, C = c->hidden_size, I = c->intermediate_size, H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim;
    const float eps = (float)c->rms_norm_eps;
    int rc = ES_OK;
    // attention block: x_mid = x_in + o(attention(rope(q(n1)), rope(k(n1)), v(n1))), n1 = norm(x_in)
    OP(es_rmsnorm_forward(dev, a->normed1, a->x_in, w->input_norm, T, C, eps));
    const es_matmul_part qkv[3] = {{a->q, w->q, w->q_bias, H * hd}, {a->k, w->k, w->k_bias, KV * hd}, {a->v, w->v, w->v_bias, KV * hd}};
    OP(es_matmul_forward_group(dev, qkv, 3, a->normed1, T, C));
    OP(es_rope_forward(dev, a->q, d->positions, d->inv_freq, T, H, hd));
    OP(es_rope_forward(dev, a->k, d->positions, d->inv_freq, T, KV, hd));
    if (cache) {
        const size_t layer_floats = (size_t)cache->slots * cache->max_seq * cache->row;
        OP(es_attention_cached_forward(dev, a->att, cache->keys + (size_t)(layer - 1) * layer_floats,
                                       cache->values + (size_t)(layer - 1) * layer_floats, a->q, a->k, a->v, d->seq_start, d->past,
                                       d->slots, d->n_seqs, cache->max_seq, H, KV, hd));
    } else {
        OP(es_attention_forward(dev, a->att, a->q, a->k, a->v, d->seq_start, d->n_seqs, H, KV, hd));
    }
    OP(es_matmul_forward_residual(dev, a->x_mid, a->x_in, a->att, w->o, w->o_bias, T, H * hd, C));
    // MLP block: x_out = x_mid + down(silu(gate(n2)) * up(n2)), n2 = norm(x_mid)
    OP(es_rmsnorm_forward(dev, a->normed2, a->x_mid, w->post_norm, T, C, eps));
    const es_matmul_part gate_up[2] = {{a->gate, w->gate, w->gate_bias, I}, {a->up, w->up, w->up_bias, I}};
    OP(es_matmul_forward_group(dev, gate_up, 2, a->normed2, T, C));
    if (!x_out) return ES_OK;
    OP(es_swiglu_down_forward(dev, x_out, a->x_mid, a->gate, a->up, w->down, w->down_bias, T, I, C));
done:
    return rc;
}

int es_decoder_forward(es_decoder *d, const es_decoder_batch *batch, const void *embed, es_dtype embed_dtype,
                       es_layer_stream *layers, int last_layer, const void *final_norm, es_layer_fn on_layer, void *ctx,
                       es_error *err) {
    es_device *dev = d->dev;
    const es_model_config *c = &d->config;
    const int C = c->hidden_size;
    const float eps = (float)c->rms_norm_eps;
    if (d->train_layers && last_layer > d->train_layers)
        return es_fail(err, ES_ERR_RUNTIME, "a forward through %d layers: the decoder keeps %d", last_layer, d->train_layers);
    es_kv_cache *cache = batch->cache;
    if (cache && last_layer > cache->n_layers)
        return es_fail(err, ES_ERR_RUNTIME, "a forward through %d layers: the key/value cache holds %d", last_layer, cache->n_layers);
    int rc = upload_batch(d, batch, err);
    if (rc) return rc;
    int held = 0; /* the layer acquired and not yet released: an op's failure releases it at done */
    const int T = d->T;
    d->last_layer = last_layer, d->has_normed = 0;
    float *x = !d->train_layers ? d->x : last_layer ? d->acts[0].x_in : d->x_final;
    OP(es_embedding_forward(dev, x, d->ids, embed, embed_dtype, T, C));
    if (on_layer && (rc = on_layer(ctx, 0, x, T, err))) goto done;
    for (int l = 1; l <= last_layer; l++) {
        const es_layer_weights *w;
        if ((rc = es_stream_acquire(layers, l, &w, err))) goto done;
        held = l;
        /* training keeps every layer's activations (with recompute only its input: the rest goes to one
         * shared set); inference reuses one set, x going to x_mid and back */
        layer_acts shared = {x, d->normed, d->q, d->k, d->v, d->att, d->x_mid, d->normed, d->gate, d->up};
        if (d->recompute) shared = d->redo, shared.x_in = d->acts[l - 1].x_in;
        const layer_acts *a = d->train_layers && !d->recompute ? &d->acts[l - 1] : &shared;
        float *x_out = !d->train_layers ? x : l < last_layer ? d->acts[l].x_in : d->x_final;
        if ((rc = layer_forward(d, w, a, x_out, l, cache, err))) goto done;
        es_stream_release(layers, l);
        held = 0;
        x = x_out;
        if (on_layer && (rc = on_layer(ctx, l, x, T, err))) goto done;
    }
    if (final_norm) {
        OP(es_rmsnorm_forward(dev, d->normed_final, x, final_norm, T, C, eps));
        d->has_normed = 1;
    }
    for (int s = 0; cache && s < batch->n_seqs; s++) cache->length[batch->slots[s]] += batch->seq_start[s + 1] - batch->seq_start[s];
done:
    if (held) es_stream_release(layers, held);
    return rc;
}

int es_decoder_backward(es_decoder *d, const es_working *weights, es_params *grads, const float *dnormed,
                        const float *const *dhidden, es_grads_fn on_grads, void *ctx, es_error *err) {
    es_device *dev = d->dev;
    const es_model_config *c = &d->config;
    const int T = d->T, C = c->hidden_size, I = c->intermediate_size, H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim;
    const int Q = H * hd, KVd = KV * hd;
    const float eps = (float)c->rms_norm_eps;
    const size_t TC = (size_t)T * C;
    int rc = ES_OK;
    if (!d->train_layers) return es_fail(err, ES_ERR_RUNTIME, "backward through a decoder made for inference");
    if (T == 0) return ES_OK;
    // dx: the gradient of the stream, from the top
    if (dnormed) OP(es_rmsnorm_backward(dev, d->dx, grads->final_norm, dnormed, d->x_final, weights->final_norm, T, C, eps));
    else if ((rc = es_device_zero(dev, d->dx, TC * sizeof(float), err))) return rc;
    if (on_grads && (rc = on_grads(ctx, d->last_layer + 1, err))) return rc;
    for (int l = d->last_layer; l >= 1; l--) {
        if (dhidden[l]) OP(es_add(dev, d->dx, d->dx, dhidden[l], TC)); /* a loss on the stream after layer l */
        const es_layer_weights *w = &weights->layers[l - 1];
        es_layer_weights *g = &grads->layers[l - 1];
        layer_acts redone = d->redo;
        const layer_acts *a = &d->acts[l - 1];
        if (d->recompute) {
            /* the layer's activations again from its input (the top layer's are still there) */
            redone.x_in = d->acts[l - 1].x_in, a = &redone;
            if (l < d->last_layer && (rc = layer_forward(d, w, a, NULL, l, NULL, err))) goto done;
        }
        // MLP block: x_out = x_mid + down(silu(gate(n2)) * up(n2)), n2 = norm(x_mid)
        OP(es_swiglu_down_backward(dev, d->dgate, d->dup, g->down, g->down_bias, d->dx, a->gate, a->up, w->down, T, I, C));
        const es_matmul_part gate_up[2] = {{NULL, w->gate, w->gate_bias, I}, {NULL, w->up, w->up_bias, I}};
        const es_matmul_part_grad dgate_up[2] = {{d->dgate, g->gate, g->gate_bias}, {d->dup, g->up, g->up_bias}};
        OP(es_matmul_backward_group(dev, d->dn, dgate_up, gate_up, 2, a->normed2, T, C));
        OP(es_rmsnorm_backward(dev, d->dx_mid, g->post_norm, d->dn, a->x_mid, w->post_norm, T, C, eps));
        OP(es_add(dev, d->dx_mid, d->dx_mid, d->dx, TC));
        // attention block: x_mid = x_in + o(attention(rope(q(n1)), rope(k(n1)), v(n1))), n1 = norm(x_in)
        OP(es_matmul_backward(dev, d->datt, g->o, g->o_bias, d->dx_mid, a->att, w->o, T, Q, C));
        OP(es_attention_backward(dev, d->dq, d->dk, d->dv, d->datt, a->q, a->k, a->v, d->seq_start, d->n_seqs, H, KV, hd));
        OP(es_rope_backward(dev, d->dq, d->positions, d->inv_freq, T, H, hd));
        OP(es_rope_backward(dev, d->dk, d->positions, d->inv_freq, T, KV, hd));
        const es_matmul_part qkv[3] = {{NULL, w->q, w->q_bias, Q}, {NULL, w->k, w->k_bias, KVd}, {NULL, w->v, w->v_bias, KVd}};
        const es_matmul_part_grad dqkv[3] = {{d->dq, g->q, g->q_bias}, {d->dk, g->k, g->k_bias}, {d->dv, g->v, g->v_bias}};
        OP(es_matmul_backward_group(dev, d->dn, dqkv, qkv, 3, a->normed1, T, C));
        OP(es_rmsnorm_backward(dev, d->dx, g->input_norm, d->dn, a->x_in, w->input_norm, T, C, eps));
        OP(es_add(dev, d->dx, d->dx, d->dx_mid, TC));
        if (on_grads && (rc = on_grads(ctx, l, err))) goto done;
    }
    if (dhidden[0]) OP(es_add(dev, d->dx, d->dx, dhidden[0], TC));
    OP(es_embedding_backward(dev, grads->embed, d->ids, d->dx, T, C));
    if (on_grads) rc = on_grads(ctx, 0, err);
done:
    return rc;
}
