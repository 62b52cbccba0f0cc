/* The decoder stack, one screenful per layer. */
#include "forward.h"

#include <stdlib.h>
#include <string.h>

#include "ops.h"

/* Every product can fail only for memory; one message for all of them. */
#define MATMUL(...)                                                                        \
    do {                                                                                   \
        if (es_matmul_forward(pool, __VA_ARGS__)) {                                        \
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory in a matrix product");        \
            goto done;                                                                     \
        }                                                                                  \
    } while (0)

int es_forward(const es_model *model, es_pool *pool, const int32_t *ids, const int32_t *seq_start, int n_seqs,
               int last_layer, es_layer_fn on_layer, void *ctx, float *final_norm, es_error *err) {
    const es_model_config *c = &model->config;
    const int T = seq_start[n_seqs], C = c->hidden_size, I = c->intermediate_size;
    const int H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim;
    const float eps = (float)c->rms_norm_eps;
    if (last_layer > model->n_layers_loaded)
        return es_fail(err, ES_ERR_RUNTIME, "layer %d requested, %d loaded", last_layer, model->n_layers_loaded);
    for (int t = 0; t < T; t++)
        if (ids[t] < 0 || ids[t] >= c->vocab_size)
            return es_fail(err, ES_ERR_DATA, "token %d: id %d is outside the vocabulary (%d)", t, ids[t], c->vocab_size);

    float *x = malloc((size_t)T * C * sizeof *x);              // (T, C) the residual stream
    float *normed = malloc((size_t)T * C * sizeof *normed);    // (T, C)
    float *q = malloc((size_t)T * H * hd * sizeof *q);         // (T, H, hd)
    float *k = malloc((size_t)T * KV * hd * sizeof *k);        // (T, KV, hd)
    float *v = malloc((size_t)T * KV * hd * sizeof *v);        // (T, KV, hd)
    float *att = malloc((size_t)T * H * hd * sizeof *att);     // (T, H, hd)
    float *gate = malloc((size_t)T * I * sizeof *gate);        // (T, I)
    float *up = malloc((size_t)T * I * sizeof *up);            // (T, I)
    float *branch = malloc((size_t)T * C * sizeof *branch);    // (T, C)
    int32_t *positions = malloc((size_t)(T ? T : 1) * sizeof *positions);
    double *inv_freq = malloc((size_t)hd / 2 * sizeof *inv_freq);
    int rc = ES_OK;
    if (!x || !normed || !q || !k || !v || !att || !gate || !up || !branch || !positions || !inv_freq) {
        rc = es_fail(err, ES_ERR_RUNTIME, "out of memory for %d tokens", T);
        goto done;
    }
    for (int s = 0; s < n_seqs; s++)
        for (int t = seq_start[s]; t < seq_start[s + 1]; t++) positions[t] = t - seq_start[s];
    es_rope_inv_freq(c, inv_freq);

    es_embedding_forward(x, ids, model->embed, T, C);
    if (on_layer && (rc = on_layer(ctx, 0, x, T, err))) goto done;
    for (int l = 0; l < last_layer; l++) {
        const es_layer_weights *w = &model->layers[l];
        // attention block
        es_rmsnorm_forward(normed, x, w->input_norm, T, C, eps);
        MATMUL(q, normed, w->q, w->q_bias, T, C, H * hd);
        MATMUL(k, normed, w->k, w->k_bias, T, C, KV * hd);
        MATMUL(v, normed, w->v, w->v_bias, T, C, KV * hd);
        es_rope_forward(q, positions, inv_freq, T, H, hd);
        es_rope_forward(k, positions, inv_freq, T, KV, hd);
        if (es_attention_forward(pool, att, q, k, v, seq_start, n_seqs, H, KV, hd)) {
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory in attention");
            goto done;
        }
        MATMUL(branch, att, w->o, w->o_bias, T, H * hd, C);
        es_residual_forward(x, branch, (long)T * C);
        // MLP block
        es_rmsnorm_forward(normed, x, w->post_norm, T, C, eps);
        MATMUL(gate, normed, w->gate, w->gate_bias, T, C, I);
        MATMUL(up, normed, w->up, w->up_bias, T, C, I);
        es_swiglu_forward(gate, gate, up, (long)T * I);
        MATMUL(branch, gate, w->down, w->down_bias, T, I, C);
        es_residual_forward(x, branch, (long)T * C);
        if (on_layer && (rc = on_layer(ctx, l + 1, x, T, err))) goto done;
    }
    if (final_norm) {
        if (!model->final_norm || last_layer != c->n_layers) rc = es_fail(err, ES_ERR_RUNTIME, "final norm needs every layer and the head");
        else es_rmsnorm_forward(final_norm, x, model->final_norm, T, C, eps);
    }
done:
    free(x), free(normed), free(q), free(k), free(v), free(att), free(gate), free(up), free(branch), free(positions), free(inv_freq);
    return rc;
}
