/* One micro-batch through the student: the forward keeps every activation the backward needs,
 * the loss terms give the gradients of the mapped layers' states and of the final norm's output,
 * and the backward walks the layers top to bottom, a screenful each. */
#include "train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loss.h"
#include "ops.h"
#include "ops_backward.h"

/* What the backward of one layer reads from its forward. */
typedef struct layer_acts {
    float *x_in;     // (T, C) the residual stream entering the layer
    float *normed1;  // (T, C) input_layernorm output
    float *q, *k, *v; // (T, H*hd), (T, KV*hd), (T, KV*hd) after RoPE
    float *att;      // (T, H*hd) attention output
    float *x_mid;    // (T, C) the stream after the attention block
    float *normed2;  // (T, C) post_attention_layernorm output
    float *gate, *up; // (T, I) before the activation
    float *act;      // (T, I) silu(gate) * up
} layer_acts;

typedef struct train_buffers {
    int capacity, layers;  /* tokens and layers the buffers hold */
    layer_acts *acts;      /* [layers] */
    float *x_final;        // (T, C) the stream after the last layer run
    float *normed_final;   // (T, C) the final norm's output
    float *dh;             // (n_mapped, T, C) gradients of the mapped layers' states
    float *dx, *dx_mid;    // (T, C) gradient of the stream
    float *dn, *dn_part;   // (T, C) gradient of a norm's output, and one product's share
    float *dq, *dk, *dv, *datt; // (T, H*hd), (T, KV*hd), (T, KV*hd), (T, H*hd)
    float *dgate, *dup, *dact;  // (T, I)
    float *branch;         // (T, C)
    int32_t *positions;    // (T)
    double *inv_freq;      // (hd / 2)
} train_buffers;

static void free_buffers(train_buffers *b) {
    if (!b) return;
    for (int l = 0; b->acts && l < b->layers; l++) {
        layer_acts *a = &b->acts[l];
        free(a->x_in), free(a->normed1), free(a->q), free(a->k), free(a->v), free(a->att), free(a->x_mid);
        free(a->normed2), free(a->gate), free(a->up), free(a->act);
    }
    free(b->acts), free(b->x_final), free(b->normed_final), free(b->dh), free(b->dx), free(b->dx_mid), free(b->dn);
    free(b->dn_part), free(b->dq), free(b->dk), free(b->dv), free(b->datt), free(b->dgate), free(b->dup), free(b->dact);
    free(b->branch), free(b->positions), free(b->inv_freq);
    free(b);
}

/* Buffers for T tokens through `layers` layers (grown, never shrunk). */
static int ensure_buffers(train_model *tm, int T, int layers, es_error *err) {
    train_buffers *b = tm->buffers;
    if (b && b->capacity >= T && b->layers >= layers) return ES_OK;
    if (b) T = T > b->capacity ? T : b->capacity, layers = layers > b->layers ? layers : b->layers;
    free_buffers(b);
    tm->buffers = b = calloc(1, sizeof *b);
    if (!b) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    const es_model_config *c = &tm->model.config;
    const size_t C = (size_t)c->hidden_size, I = (size_t)c->intermediate_size, Q = (size_t)c->n_heads * c->head_dim,
                 KVd = (size_t)c->n_kv_heads * c->head_dim, n = (size_t)T;
    b->capacity = T, b->layers = layers;
    int ok = (b->acts = calloc((size_t)layers, sizeof *b->acts)) != NULL;
    for (int l = 0; ok && l < layers; l++) {
        layer_acts *a = &b->acts[l];
        ok = (a->x_in = malloc(n * C * 4)) && (a->normed1 = malloc(n * C * 4)) && (a->q = malloc(n * Q * 4)) &&
             (a->k = malloc(n * KVd * 4)) && (a->v = malloc(n * KVd * 4)) && (a->att = malloc(n * Q * 4)) &&
             (a->x_mid = malloc(n * C * 4)) && (a->normed2 = malloc(n * C * 4)) && (a->gate = malloc(n * I * 4)) &&
             (a->up = malloc(n * I * 4)) && (a->act = malloc(n * I * 4));
    }
    ok = ok && (b->x_final = malloc(n * C * 4)) && (b->normed_final = malloc(n * C * 4)) &&
         (b->dh = malloc((size_t)(tm->n_mapped ? tm->n_mapped : 1) * n * C * 4)) && (b->dx = malloc(n * C * 4)) &&
         (b->dx_mid = malloc(n * C * 4)) && (b->dn = malloc(n * C * 4)) && (b->dn_part = malloc(n * C * 4)) &&
         (b->dq = malloc(n * Q * 4)) && (b->dk = malloc(n * KVd * 4)) && (b->dv = malloc(n * KVd * 4)) &&
         (b->datt = malloc(n * Q * 4)) && (b->dgate = malloc(n * I * 4)) && (b->dup = malloc(n * I * 4)) &&
         (b->dact = malloc(n * I * 4)) && (b->branch = malloc(n * C * 4)) && (b->positions = malloc(n * 4)) &&
         (b->inv_freq = malloc((size_t)c->head_dim / 2 * sizeof(double)));
    if (!ok) {
        free_buffers(b);
        tm->buffers = NULL;
        return es_fail(err, ES_ERR_RUNTIME, "out of memory for the activations of %d tokens through %d layers", T, layers);
    }
    es_rope_inv_freq(c, b->inv_freq);
    return ES_OK;
}

int train_model_init(train_model *tm, const char *model_dir, const int *mapped, int n_mapped, float latent_weight, float ce_weight,
                     int head_linear, es_error *err) {
    memset(tm, 0, sizeof *tm);
    if (n_mapped > TRAIN_MAX_MAPPED) return es_fail(err, ES_ERR_DATA, "%d target layers: at most %d are supported", n_mapped, TRAIN_MAX_MAPPED);
    int rc = es_model_load(model_dir, -1, 1, &tm->model, err);
    if (rc) return rc;
    const int C = tm->model.config.hidden_size;
    tm->n_mapped = n_mapped;
    memcpy(tm->mapped, mapped, (size_t)n_mapped * sizeof *mapped);
    tm->latent_weight = latent_weight, tm->ce_weight = ce_weight;
    tm->with_ce = ce_weight != 0;
    tm->run_layers = tm->with_ce || !n_mapped ? tm->model.config.n_layers : mapped[n_mapped - 1];
    tm->grads = calloc(tm->model.arena_floats, sizeof *tm->grads);
    if (!tm->grads) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory for the gradients");
    if (!rc && head_linear) {
        tm->heads = calloc((size_t)n_mapped * C * C, sizeof *tm->heads);
        tm->head_grads = calloc((size_t)n_mapped * C * C, sizeof *tm->head_grads);
        if (!tm->heads || !tm->head_grads) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory for the student heads");
        for (int i = 0; !rc && i < n_mapped; i++)
            for (int k = 0; k < C; k++) tm->heads[((size_t)i * C + k) * C + k] = 1.0f;
    }
    if (rc) train_model_free(tm);
    return rc;
}

void train_model_free(train_model *tm) {
    es_model_free(&tm->model);
    free(tm->grads), free(tm->heads), free(tm->head_grads);
    free_buffers(tm->buffers);
    memset(tm, 0, sizeof *tm);
}

/* Every product can fail only for memory; one message for all of them. */
#define CHECKED(call)                                                                      \
    do {                                                                                   \
        if (call) {                                                                        \
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory in %s", #call);               \
            goto done;                                                                     \
        }                                                                                  \
    } while (0)

/* The mapped-layer index of student layer `layer`, or -1. */
static int mapped_index(const train_model *tm, int layer) {
    for (int i = 0; i < tm->n_mapped; i++)
        if (tm->mapped[i] == layer) return i;
    return -1;
}

int train_forward_backward(train_model *tm, es_pool *pool, const align_batch *batch, int backward, float scale,
                           train_sums *sums, es_error *err) {
    const es_model *m = &tm->model;
    const es_model_config *c = &m->config;
    const int T = batch->T, C = c->hidden_size, I = c->intermediate_size, H = c->n_heads, KV = c->n_kv_heads,
              hd = c->head_dim, V = c->vocab_size;
    const float eps = (float)c->rms_norm_eps;
    /* Eval reports the CE even when training leaves it out: then every layer runs. */
    const int with_ce = tm->with_ce || !backward, layers = with_ce ? c->n_layers : tm->run_layers;
    memset(sums, 0, sizeof *sums);
    if (T == 0) return ES_OK;
    int rc = ensure_buffers(tm, T, layers, err);
    if (rc) return rc;
    train_buffers *b = tm->buffers;
    for (int s = 0; s < batch->n_seqs; s++)
        for (int t = batch->seq_start[s]; t < batch->seq_start[s + 1]; t++) b->positions[t] = t - batch->seq_start[s];
    for (int t = 0; t < T; t++) sums->aligned += batch->mask[t] != 0, sums->labelled += batch->labels[t] >= 0;
    const size_t TC = (size_t)T * C;

    // ---- forward, keeping what the backward reads
    es_embedding_forward(layers ? b->acts[0].x_in : b->x_final, batch->ids, m->embed, T, C);
    for (int l = 0; l < layers; l++) {
        const es_layer_weights *w = &m->layers[l];
        layer_acts *a = &b->acts[l];
        float *x_out = l + 1 < layers ? b->acts[l + 1].x_in : b->x_final;
        es_rmsnorm_forward(a->normed1, a->x_in, w->input_norm, T, C, eps);
        CHECKED(es_matmul_forward(pool, a->q, a->normed1, w->q, w->q_bias, T, C, H * hd));
        CHECKED(es_matmul_forward(pool, a->k, a->normed1, w->k, w->k_bias, T, C, KV * hd));
        CHECKED(es_matmul_forward(pool, a->v, a->normed1, w->v, w->v_bias, T, C, KV * hd));
        es_rope_forward(a->q, b->positions, b->inv_freq, T, H, hd);
        es_rope_forward(a->k, b->positions, b->inv_freq, T, KV, hd);
        CHECKED(es_attention_forward(pool, a->att, a->q, a->k, a->v, batch->seq_start, batch->n_seqs, H, KV, hd));
        CHECKED(es_matmul_forward(pool, b->branch, a->att, w->o, w->o_bias, T, H * hd, C));
        for (size_t i = 0; i < TC; i++) a->x_mid[i] = a->x_in[i] + b->branch[i];
        es_rmsnorm_forward(a->normed2, a->x_mid, w->post_norm, T, C, eps);
        CHECKED(es_matmul_forward(pool, a->gate, a->normed2, w->gate, w->gate_bias, T, C, I));
        CHECKED(es_matmul_forward(pool, a->up, a->normed2, w->up, w->up_bias, T, C, I));
        es_swiglu_forward(a->act, a->gate, a->up, (long)T * I);
        CHECKED(es_matmul_forward(pool, b->branch, a->act, w->down, w->down_bias, T, I, C));
        for (size_t i = 0; i < TC; i++) x_out[i] = a->x_mid[i] + b->branch[i];
    }

    // ---- the loss terms: gradients of the mapped states (dh) and of the final norm's output (dn)
    const double aligned = (double)(batch->global_aligned ? batch->global_aligned : 1);
    const double labelled = (double)(batch->global_labels ? batch->global_labels : 1);
    const float latent_scale = (float)(scale * tm->latent_weight / tm->n_mapped / aligned);
    for (int i = 0; i < tm->n_mapped; i++) {
        int layer = tm->mapped[i];
        if (layer > layers) continue;
        const float *h = layer < layers ? b->acts[layer].x_in : b->x_final;
        const float *head = tm->heads ? tm->heads + (size_t)i * C * C : NULL;
        float *dhead = tm->head_grads && backward ? tm->head_grads + (size_t)i * C * C : NULL;
        sums->latent[i] = latent_mse(backward ? b->dh + (size_t)i * TC : NULL, dhead, &sums->cosine[i], h, batch->targets[i],
                                     batch->mask, head, T, C, eps, latent_scale);
    }
    if (with_ce) {
        es_rmsnorm_forward(b->normed_final, b->x_final, m->final_norm, T, C, eps);
        const int ce_backward = backward && tm->with_ce;
        CHECKED(cross_entropy(pool, &sums->ce, ce_backward ? b->dn : NULL, ce_backward ? train_grad_of(tm, m->lm_head) : NULL,
                              b->normed_final, m->lm_head, batch->labels, T, C, V, (float)(scale * tm->ce_weight / labelled)));
    }
    if (!backward) goto done;

    // ---- backward, top layer first; dx is the gradient of the stream
    if (tm->with_ce) es_rmsnorm_backward(b->dx, train_grad_of(tm, m->final_norm), b->dn, b->x_final, m->final_norm, T, C, eps);
    else memset(b->dx, 0, TC * sizeof *b->dx);
    for (int l = layers; l >= 1; l--) {
        int i = mapped_index(tm, l); /* the state after layer l is mapped: its loss gradient joins here */
        if (i >= 0)
            for (size_t k = 0; k < TC; k++) b->dx[k] += b->dh[(size_t)i * TC + k];
        const es_layer_weights *w = &m->layers[l - 1];
        layer_acts *a = &b->acts[l - 1];
        // MLP block: x_out = x_mid + down(silu(gate(n2)) * up(n2)), n2 = norm(x_mid)
        CHECKED(es_matmul_backward(pool, b->dact, train_grad_of(tm, w->down), w->down_bias ? train_grad_of(tm, w->down_bias) : NULL,
                                   b->dx, a->act, w->down, T, I, C));
        es_swiglu_backward(b->dgate, b->dup, b->dact, a->gate, a->up, (long)T * I);
        CHECKED(es_matmul_backward(pool, b->dn, train_grad_of(tm, w->gate), w->gate_bias ? train_grad_of(tm, w->gate_bias) : NULL,
                                   b->dgate, a->normed2, w->gate, T, C, I));
        CHECKED(es_matmul_backward(pool, b->dn_part, train_grad_of(tm, w->up), w->up_bias ? train_grad_of(tm, w->up_bias) : NULL,
                                   b->dup, a->normed2, w->up, T, C, I));
        for (size_t k = 0; k < TC; k++) b->dn[k] += b->dn_part[k];
        es_rmsnorm_backward(b->dx_mid, train_grad_of(tm, w->post_norm), b->dn, a->x_mid, w->post_norm, T, C, eps);
        for (size_t k = 0; k < TC; k++) b->dx_mid[k] += b->dx[k];
        // attention block: x_mid = x_in + o(attention(rope(q(n1)), rope(k(n1)), v(n1))), n1 = norm(x_in)
        CHECKED(es_matmul_backward(pool, b->datt, train_grad_of(tm, w->o), w->o_bias ? train_grad_of(tm, w->o_bias) : NULL,
                                   b->dx_mid, a->att, w->o, T, H * hd, C));
        CHECKED(es_attention_backward(pool, b->dq, b->dk, b->dv, b->datt, a->q, a->k, a->v, batch->seq_start, batch->n_seqs, H,
                                      KV, hd));
        es_rope_backward(b->dq, b->positions, b->inv_freq, T, H, hd);
        es_rope_backward(b->dk, b->positions, b->inv_freq, T, KV, hd);
        CHECKED(es_matmul_backward(pool, b->dn, train_grad_of(tm, w->q), w->q_bias ? train_grad_of(tm, w->q_bias) : NULL, b->dq,
                                   a->normed1, w->q, T, C, H * hd));
        CHECKED(es_matmul_backward(pool, b->dn_part, train_grad_of(tm, w->k), w->k_bias ? train_grad_of(tm, w->k_bias) : NULL,
                                   b->dk, a->normed1, w->k, T, C, KV * hd));
        for (size_t k = 0; k < TC; k++) b->dn[k] += b->dn_part[k];
        CHECKED(es_matmul_backward(pool, b->dn_part, train_grad_of(tm, w->v), w->v_bias ? train_grad_of(tm, w->v_bias) : NULL,
                                   b->dv, a->normed1, w->v, T, C, KV * hd));
        for (size_t k = 0; k < TC; k++) b->dn[k] += b->dn_part[k];
        es_rmsnorm_backward(b->dx, train_grad_of(tm, w->input_norm), b->dn, a->x_in, w->input_norm, T, C, eps);
        for (size_t k = 0; k < TC; k++) b->dx[k] += b->dx_mid[k];
    }
    es_embedding_backward(train_grad_of(tm, m->embed), batch->ids, b->dx, T, C);
done:
    return rc;
}
