/* GPU benchmark (tests/gpu/run.sh): one Llama-70B-shaped decoder layer forward on CUDA, 4
 * sequences × 4096 tokens, beside ../shared/tools/gpu_baselines.py's "llama70b_layer_fwd" (the
 * same shapes, the same FLOP formula, halved: the baseline times and counts two layers).
 *   bench_layer OUT_DIR CONFIG   (CONFIG: the 70B config.json or its folder)
 * Writes OUT_DIR/bench_layer.json (flat keys, the baseline's names where the figure is the same)
 * and one line per figure; then times attention alone and the layer's 7 products alone, so the
 * report can say where the time goes. No CUDA device: "SKIP bench_layer: ..." and exit 0. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_report.h"
#include "backend.h"
#include "decoder.h"
#include "dtype.h"
#include "log.h"
#include "model.h"
#include "ops.h"
#include "stream.h"

#define SEQS 4
#define SEQ_LEN 4096
#define TOKENS (SEQS * SEQ_LEN)
#define BLOCK ((size_t)1 << 24) /* random values generated once, uploaded again and again */

/* Uniform on ±sqrt(3)·sd: standard deviation sd, like the baseline's normal_(0, 0.02). */
static void fill_uniform(float *x, size_t n, double sd, uint64_t seed) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(((double)(splitmix64(&seed) >> 11) / 9007199254740992.0 * 2 - 1) * 1.7320508075688772 * sd);
}

/* n values of `block` (repeated) into device memory: bf16 bits as they are, fp32 as activations,
 * or through es_device_upload_weights into the device's weight format. */
typedef enum { AS_BF16, AS_F32, AS_WEIGHTS } fill_kind;
static void fill_device(es_device *dev, void *dst, size_t n, const void *block, fill_kind kind) {
    const size_t element = kind == AS_BF16 ? 2 : kind == AS_F32 ? 4 : es_dtype_size(dev->weight_dtype);
    for (size_t at = 0; at < n; at += BLOCK) {
        const size_t part = n - at < BLOCK ? n - at : BLOCK;
        char *to = (char *)dst + at * element;
        if (kind == AS_WEIGHTS) check(es_device_upload_weights(dev, to, block, part, &err));
        else check(es_device_upload(dev, to, block, part * element, &err));
    }
}
static void *device_alloc(es_device *dev, size_t bytes, const char *what) {
    void *p = NULL;
    check(es_device_alloc(dev, bytes, &p, what, &err));
    return p;
}

typedef struct layer_run {
    es_device *dev;
    es_decoder *decoder;
    es_decoder_batch batch;
    const void *embed;
    es_layer_stream *layers;
    const es_layer_weights *w;
    const es_model_config *c;
    float *q, *k, *v, *att, *in, *out; // attention's and the products' own buffers
    int32_t *seq_start;                // (SEQS + 1) device
} layer_run;

static void run_forward(void *ctx) {
    layer_run *r = ctx;
    check(es_decoder_forward(r->decoder, &r->batch, r->embed, r->dev->weight_dtype, r->layers, 1, NULL, NULL, NULL, &err));
}
static void run_attention(void *ctx) {
    layer_run *r = ctx;
    OP(r->dev, es_attention_forward(r->dev, r->att, r->q, r->k, r->v, r->seq_start, SEQS, r->c->n_heads, r->c->n_kv_heads, r->c->head_dim));
}
/* The layer's 7 products in the decoder's order, on its shapes (inputs all read from `in`). */
static void run_matmuls(void *ctx) {
    layer_run *r = ctx;
    const es_layer_weights *w = r->w;
    const int C = r->c->hidden_size, I = r->c->intermediate_size, Q = r->c->n_heads * r->c->head_dim, KVd = r->c->n_kv_heads * r->c->head_dim;
    OP(r->dev, es_matmul_forward(r->dev, r->out, r->in, w->q, w->q_bias, TOKENS, C, Q));
    OP(r->dev, es_matmul_forward(r->dev, r->out, r->in, w->k, w->k_bias, TOKENS, C, KVd));
    OP(r->dev, es_matmul_forward(r->dev, r->out, r->in, w->v, w->v_bias, TOKENS, C, KVd));
    OP(r->dev, es_matmul_forward(r->dev, r->out, r->in, w->o, w->o_bias, TOKENS, Q, C));
    OP(r->dev, es_matmul_forward(r->dev, r->out, r->in, w->gate, w->gate_bias, TOKENS, C, I));
    OP(r->dev, es_matmul_forward(r->dev, r->out, r->in, w->up, w->up_bias, TOKENS, C, I));
    OP(r->dev, es_matmul_forward(r->dev, r->out, r->in, w->down, w->down_bias, TOKENS, I, C));
}

int main(int argc, char **argv) {
    es_set_program("bench_layer");
    es_device_prepare(argv);
    if (argc != 3) {
        fprintf(stderr, "usage: bench_layer OUT_DIR CONFIG\n");
        return ES_ERR_USAGE;
    }
    bench_start("bench_layer", argv[1]);
    es_device_options options = {.kind = ES_DEVICE_CUDA};
    es_device *dev = NULL;
    if (es_device_open(&dev, &options, &err)) {
        printf("SKIP bench_layer: %s\n", err.msg);
        return 0;
    }
    bench_str("device", dev->name);
    es_model_config config;
    check(es_model_config_load(argv[2], &config, NULL, &err));
    config.vocab_size = 1024, config.n_layers = 1; /* the baseline's shape: one layer, a small table */
    const es_model_config *c = &config;
    const size_t C = (size_t)c->hidden_size, I = (size_t)c->intermediate_size;
    const size_t Q = (size_t)c->n_heads * c->head_dim, KVd = (size_t)c->n_kv_heads * c->head_dim;

    /* One block of random values serves every tensor: timing does not depend on them. */
    float *acts = malloc(BLOCK * sizeof *acts), *weights = malloc(BLOCK * sizeof *weights), *ones = malloc(C * sizeof *ones);
    uint16_t *weights_bf16 = malloc(BLOCK * sizeof *weights_bf16);
    if (!acts || !weights || !ones || !weights_bf16) check(es_fail(&err, ES_ERR_RUNTIME, "out of host memory"));
    fill_uniform(acts, BLOCK, 1.0, 1), fill_uniform(weights, BLOCK, 0.02, 2);
    es_f32_to_bf16_array(weights_bf16, weights, BLOCK);
    for (size_t i = 0; i < C; i++) ones[i] = 1.0f;
    const int direct = dev->weight_dtype == ES_DT_BF16;
    const void *wblock = direct ? (const void *)weights_bf16 : weights;
    const fill_kind wkind = direct ? AS_BF16 : AS_WEIGHTS;

    /* The layer's parts, as the checkpoint's table has them (model.c): norms 1, the rest random. */
    es_tensor_spec specs[20]; /* es_model_max_tensors(1) */
    const int n_specs = es_model_tensor_list(c, 1, 0, specs);
    es_layer_weights w = {0};
    size_t layer_bytes = 0, matmul_params = 0;
    for (int i = 0; i < n_specs; i++) {
        const es_tensor_spec *s = &specs[i];
        if (s->layer != 0) continue;
        const size_t n = (size_t)s->shape[0] * (s->ndim == 2 ? (size_t)s->shape[1] : 1), bytes = n * es_dtype_size(dev->weight_dtype);
        void **slot = es_layer_slot(&w, s->part);
        *slot = device_alloc(dev, bytes, s->name);
        if (s->is_norm) check(es_device_upload_weights(dev, *slot, ones, n, &err));
        else fill_device(dev, *slot, n, wblock, wkind);
        layer_bytes += bytes, matmul_params += s->ndim == 2 ? n : 0;
    }
    const size_t embed_n = (size_t)c->vocab_size * C;
    void *embed = device_alloc(dev, embed_n * es_dtype_size(dev->weight_dtype), "the embedding table");
    fill_device(dev, embed, embed_n, wblock, wkind);

    layer_run r = {.dev = dev, .embed = embed, .w = &w, .c = c};
    check(es_decoder_create(&r.decoder, dev, c, TOKENS, SEQ_LEN, 0, &err));
    es_workspace_plan plan = {0};
    es_decoder_plan(r.decoder, &plan);
    check(es_device_reserve(dev, &plan, &err));
    check(es_stream_resident(&r.layers, &w, 1, &err));
    int32_t *ids = malloc(TOKENS * sizeof *ids), seq_start[SEQS + 1];
    if (!ids) check(es_fail(&err, ES_ERR_RUNTIME, "out of host memory"));
    uint64_t state = 3;
    for (int t = 0; t < TOKENS; t++) ids[t] = (int32_t)(splitmix64(&state) % (uint64_t)c->vocab_size);
    for (int s = 0; s <= SEQS; s++) seq_start[s] = s * SEQ_LEN;
    r.batch = (es_decoder_batch){.ids = ids, .seq_start = seq_start, .n_seqs = SEQS};

    /* The baseline's formula, flops = 2·(2·P)·toks + 2·2·(4·8192·T/2)·toks for two layers, halved; with
     * P = 8192·(8192·2 + 1024·2) + 3·8192·28672, which is C·(2Q + 2KVd) + 3·C·I for this config. */
    const double toks = TOKENS, P = (double)C * (2 * Q + 2 * KVd) + 3.0 * C * I;
    const double attention_flops = 2 * (4 * (double)Q * SEQ_LEN / 2) * toks, layer_flops = 2 * P * toks + attention_flops;
    const double s_layer = timed(dev, run_forward, &r, 3);
    figure("tokens", toks, "tokens per forward (4 x 4096)");
    figure("llama_layer_fwd_s", s_layer, "seconds per layer");
    figure("llama_layer_tflops", layer_flops / s_layer / 1e12, "TFLOPS (the baseline's count)");
    figure("llama_70b_est_tok_per_s", toks / (s_layer * 80), "estimated 80-layer tokens/s");
    figure("llama_peak_GiB", (double)dev->peak / GIB, "device memory held at most, GiB");
    figure("layer_weights_GiB", (double)layer_bytes / GIB, "one layer's weights, GiB");
    es_stream_close(r.layers);
    es_decoder_free(r.decoder);

    /* Attention alone, on the decoder's q/k/v shapes, its own buffers of random values. */
    r.q = device_alloc(dev, TOKENS * Q * sizeof(float), "q"), r.att = device_alloc(dev, TOKENS * Q * sizeof(float), "attention output");
    r.k = device_alloc(dev, TOKENS * KVd * sizeof(float), "k"), r.v = device_alloc(dev, TOKENS * KVd * sizeof(float), "v");
    r.seq_start = device_alloc(dev, sizeof seq_start, "the sequence table");
    fill_device(dev, r.q, TOKENS * Q, acts, AS_F32), fill_device(dev, r.k, TOKENS * KVd, acts, AS_F32);
    fill_device(dev, r.v, TOKENS * KVd, acts, AS_F32);
    check(es_device_upload(dev, r.seq_start, seq_start, sizeof seq_start, &err));
    const double s_attention = timed(dev, run_attention, &r, 5);
    figure("attention_s", s_attention, "attention alone, seconds");
    figure("attention_tflops", attention_flops / s_attention / 1e12, "attention TFLOPS (the baseline's count)");
    es_device_free(dev, r.q, TOKENS * Q * sizeof(float)), es_device_free(dev, r.att, TOKENS * Q * sizeof(float));
    es_device_free(dev, r.k, TOKENS * KVd * sizeof(float)), es_device_free(dev, r.v, TOKENS * KVd * sizeof(float));

    /* The 7 products alone: inputs and outputs as wide as the widest (I). */
    const size_t wide = I > Q ? (I > C ? I : C) : (Q > C ? Q : C);
    r.in = device_alloc(dev, TOKENS * wide * sizeof(float), "product inputs");
    r.out = device_alloc(dev, TOKENS * wide * sizeof(float), "product outputs");
    fill_device(dev, r.in, TOKENS * wide, acts, AS_F32);
    const double s_matmuls = timed(dev, run_matmuls, &r, 5);
    figure("matmuls_s", s_matmuls, "the 7 products alone, seconds");
    figure("matmul_tflops", 2 * (double)matmul_params * toks / s_matmuls / 1e12, "products TFLOPS");
    figure("other_s", s_layer - s_attention - s_matmuls, "the rest (norms, rope, swiglu, adds, embedding)");
    es_device_free(dev, r.in, TOKENS * wide * sizeof(float)), es_device_free(dev, r.out, TOKENS * wide * sizeof(float));
    es_device_free(dev, r.seq_start, sizeof seq_start);

    for (int i = 0; i < n_specs; i++)
        if (specs[i].layer == 0)
            es_device_free(dev, *es_layer_slot(&w, specs[i].part),
                           (size_t)specs[i].shape[0] * (specs[i].ndim == 2 ? (size_t)specs[i].shape[1] : 1) * es_dtype_size(dev->weight_dtype));
    es_device_free(dev, embed, embed_n * es_dtype_size(dev->weight_dtype));
    es_device_close(dev);
    free(acts), free(weights), free(ones), free(weights_bf16), free(ids);
    return 0;
}
