/* Golden parity of the decoder's forward pass on the CPU device: for tiny-llama3 and
 * tiny-qwen2, every golden tensor (embedding output, each layer, final norm, logits columns,
 * argmax, logsumexp) of every golden sequence, max |ours - golden| / max |golden| <= 1e-4,
 * with the layers streamed from the checkpoint as essence-extract runs them. The same bits come
 * out of the training's resident fp32 weights, and of a device whose --max-memory leaves room
 * for two layers or one (the stream's slots); the workspace is allocated once. Also: bad configs
 * are named errors. */
#include <math.h>

#include "../testlib.h"
#include "decoder.h"
#include "goldens.h"
#include "model.h"
#include "ops.h"
#include "safetensors.h"
#include "stream.h"
#include "test_device.h"
#include "weights.h"

#define TOLERANCE 1e-4

typedef struct {
    const es_safetensors *goldens;
    const char *seq;
    int T, C;
    double worst;
    char worst_name[64];
    int missing;
} layer_check;

static void note(layer_check *check, const char *name, double error) {
    if (error > check->worst) {
        check->worst = error;
        snprintf(check->worst_name, sizeof check->worst_name, "%s/%s", check->seq, name);
    }
}

static void compare_layer(void *ctx, int layer, const float *hidden, int T, es_error *err) {
    (void)err;
    layer_check *check = ctx;
    char name[64];
    if (layer == 0) snprintf(name, sizeof name, "%s/embed", check->seq);
    else snprintf(name, sizeof name, "%s/layer%02d", check->seq, layer);
    const es_tensor *golden = es_safetensors_find(check->goldens, name);
    if (!golden) {
        check->missing++;
        return;
    }
    float *values = malloc(es_tensor_numel(golden) * sizeof *values);
    es_tensor_to_f32(golden, values, NULL);
    note(check, name + strlen(check->seq) + 1, golden_relative_error(hidden, values, (size_t)T * check->C));
    free(values);
}

/* Every layer's output (and the final norm's) of one forward, copied out. */
typedef struct forward_result {
    float **hidden; /* [n_layers + 1] (T, C) */
    float *final;   /* (T, C) */
    int slots, workspace_grows;
    size_t used;    /* the device memory the run held before the layers came in */
} forward_result;

typedef struct keep_layers {
    forward_result *result;
    int C;
} keep_layers;

static int keep_layer(void *ctx, int layer, const float *hidden, int T, es_error *err) {
    (void)err;
    keep_layers *keep = ctx;
    keep->result->hidden[layer] = malloc((size_t)T * keep->C * sizeof(float));
    memcpy(keep->result->hidden[layer], hidden, (size_t)T * keep->C * sizeof(float));
    return 0;
}

static void free_result(forward_result *r, int n_layers) {
    for (int l = 0; r->hidden && l <= n_layers; l++) free(r->hidden[l]);
    free(r->hidden), free(r->final);
}

/* One forward of ids through every layer: streamed from the store (params NULL) or from the
 * resident fp32 weights. max_memory 0: the device's automatic budget. */
static int run_forward(const es_model_store *store, const es_params *params, size_t max_memory, const int32_t *ids, int T,
                       forward_result *out, es_error *err) {
    const es_model_config *c = &store->config;
    memset(out, 0, sizeof *out);
    out->hidden = calloc((size_t)c->n_layers + 1, sizeof *out->hidden);
    out->final = malloc((size_t)T * c->hidden_size * sizeof(float));
    es_device_options options = {.kind = ES_DEVICE_CPU, .threads = 2, .max_memory = max_memory};
    es_device *dev;
    int rc = es_device_open(&dev, &options, err);
    if (rc) return rc;
    es_decoder *decoder = NULL;
    es_layer_stream *layers = NULL;
    float *final_norm = NULL;
    es_params resident = {0};
    if (params) rc = es_params_load(dev, store, &resident, err);
    if (!rc) rc = es_decoder_create(&decoder, dev, c, T, T, 0, err);
    es_workspace_plan plan = {0};
    if (!rc) es_decoder_plan(decoder, &plan), rc = es_device_reserve(dev, &plan, err);
    if (!rc) rc = es_device_alloc(dev, (size_t)c->hidden_size * sizeof(float), (void **)&final_norm, "the final norm", err);
    if (!rc) rc = es_tensor_to_f32(store->final_norm, final_norm, err);
    out->used = dev->used;
    if (!rc) rc = params ? es_stream_resident(&layers, resident.layers, c->n_layers, err) : es_stream_open(&layers, dev, store, c->n_layers, err);
    const int32_t seq_start[2] = {0, T};
    const es_decoder_batch batch = {.ids = ids, .seq_start = seq_start, .n_seqs = 1};
    keep_layers keep = {out, c->hidden_size};
    const void *embed = params ? (const void *)resident.embed : store->embed->data;
    if (!rc) rc = es_decoder_forward(decoder, &batch, embed, params ? ES_DT_F32 : store->embed->dtype, layers, c->n_layers, final_norm,
                                     keep_layer, &keep, err);
    if (!rc) memcpy(out->final, es_decoder_normed(decoder), (size_t)T * c->hidden_size * sizeof(float));
    out->slots = layers ? es_stream_slots(layers) : -1;
    out->workspace_grows = dev->workspace_grows;
    es_stream_close(layers);
    es_decoder_free(decoder);
    es_device_free(dev, final_norm, (size_t)c->hidden_size * sizeof(float));
    es_params_free(dev, &resident);
    es_device_close(dev);
    return rc;
}

static int same_result(const forward_result *a, const forward_result *b, int n_layers, size_t TC) {
    int same = !memcmp(a->final, b->final, TC * sizeof(float));
    for (int l = 0; l <= n_layers; l++) same &= a->hidden[l] && b->hidden[l] && !memcmp(a->hidden[l], b->hidden[l], TC * sizeof(float));
    return same;
}

static void check_model(const char *tl_name, const char *fixtures, const char *name) {
    char dir[800], goldens_path[900];
    snprintf(dir, sizeof dir, "%s/models/%s", fixtures, name);
    snprintf(goldens_path, sizeof goldens_path, "%s/golden_hidden.safetensors", dir);
    FILE *probe = fopen(goldens_path, "r");
    if (!probe) SKIP("%s not found (set ESSENCE_FIXTURES)", goldens_path);
    fclose(probe);
    es_error err = {0};
    es_model_store store;
    REQUIRE(es_model_open(dir, -1, 1, &store, &err) == ES_OK);
    es_safetensors *goldens = NULL;
    REQUIRE(es_safetensors_open(goldens_path, &goldens, &err) == ES_OK);
    es_device *dev = test_cpu_device(2);
    const int C = store.config.hidden_size, V = store.config.vocab_size, L = store.config.n_layers;
    float *lm_head = malloc((size_t)V * C * sizeof *lm_head);
    REQUIRE(es_tensor_to_f32(store.lm_head, lm_head, &err) == ES_OK);
    const size_t layer_bytes = store.layers[0].numel * sizeof(float);
    for (int s = 0; s < 4; s++) {
        char seq[16];
        snprintf(seq, sizeof seq, "seq%d", s);
        size_t T = 0, n_cols = 0, n_check = 0;
        float *ids_f = golden_f32(goldens, seq, "input_ids", &T);
        REQUIRE(ids_f);
        int32_t *ids = malloc(T * sizeof *ids);
        for (size_t t = 0; t < T; t++) ids[t] = (int32_t)ids_f[t];
        forward_result streamed, resident, two_slots, one_slot;
        CHECKF(run_forward(&store, NULL, 0, ids, (int)T, &streamed, &err) == ES_OK, "%s", err.msg);
        CHECKF(run_forward(&store, &(es_params){0}, 0, ids, (int)T, &resident, &err) == ES_OK, "%s", err.msg);
        CHECKF(run_forward(&store, NULL, streamed.used + 2 * layer_bytes + layer_bytes / 2, ids, (int)T, &two_slots, &err) == ES_OK,
               "%s", err.msg);
        CHECKF(run_forward(&store, NULL, streamed.used + layer_bytes + layer_bytes / 2, ids, (int)T, &one_slot, &err) == ES_OK,
               "%s", err.msg);
        CHECKF(streamed.slots == 0 && two_slots.slots == 2 && one_slot.slots == 1, "slots %d %d %d", streamed.slots, two_slots.slots,
               one_slot.slots);
        CHECKF(same_result(&streamed, &resident, L, T * C), "%s %s: resident fp32 weights give other bits", name, seq);
        CHECKF(same_result(&streamed, &two_slots, L, T * C) && same_result(&streamed, &one_slot, L, T * C),
               "%s %s: streamed layers give other bits", name, seq);
        CHECKF(streamed.workspace_grows == 1 && two_slots.workspace_grows == 1, "the workspace grew %d times", streamed.workspace_grows);
        layer_check check = {goldens, seq, (int)T, C, 0, "", 0};
        for (int l = 0; l <= L; l++) compare_layer(&check, l, streamed.hidden[l], (int)T, &err);
        CHECK(check.missing == 0);
        float *golden_final = golden_f32(goldens, seq, "final_norm", &n_check);
        note(&check, "final_norm", golden_relative_error(streamed.final, golden_final, T * C));
        /* Logits over the whole vocabulary: the listed columns, argmax and logsumexp. */
        float *cols = golden_f32(goldens, seq, "logits_cols", &n_cols);
        float *golden_logits = golden_f32(goldens, seq, "logits", &n_check);
        float *golden_argmax = golden_f32(goldens, seq, "logits_argmax", &n_check);
        float *golden_lse = golden_f32(goldens, seq, "logits_logsumexp", &n_check);
        float *logits = malloc(T * (size_t)V * sizeof *logits), *picked = malloc(T * n_cols * sizeof *picked);
        float *lse = malloc(T * sizeof *lse);
        int argmax_bad = 0;
        CHECK(es_matmul_forward(dev, logits, streamed.final, lm_head, NULL, (int)T, C, V) == 0); /* (T, V) */
        for (size_t t = 0; t < T; t++) {
            const float *row = logits + t * V;
            double max_logit = -INFINITY, total = 0;
            int best = 0;
            for (int j = 0; j < V; j++)
                if (row[j] > max_logit) max_logit = row[j], best = j;
            for (int j = 0; j < V; j++) total += exp(row[j] - max_logit);
            lse[t] = (float)(max_logit + log(total));
            for (size_t j = 0; j < n_cols; j++) picked[t * n_cols + j] = row[(int)cols[j]];
            argmax_bad += best != (int)golden_argmax[t];
        }
        note(&check, "logits", golden_relative_error(picked, golden_logits, T * n_cols));
        note(&check, "logsumexp", golden_relative_error(lse, golden_lse, T));
        CHECKF(argmax_bad == 0, "%s %s: %d argmax differ", name, seq, argmax_bad);
        CHECKF(check.worst <= TOLERANCE, "%s: worst %s relative error %.3g", name, check.worst_name, check.worst);
        printf("  %s %s (T=%zu): worst relative error %.2e (%s)\n", name, seq, T, check.worst, check.worst_name);
        free_result(&streamed, L), free_result(&resident, L), free_result(&two_slots, L), free_result(&one_slot, L);
        free(ids_f), free(ids), free(golden_final), free(cols), free(golden_logits), free(golden_argmax), free(golden_lse);
        free(logits), free(picked), free(lse);
    }
    free(lm_head);
    es_device_close(dev);
    es_safetensors_close(goldens);
    es_model_close(&store);
}

/* Too little --max-memory for one layer is a clear error naming the sizes. */
TEST(max_memory_too_small_for_a_layer) {
    char dir[800];
    snprintf(dir, sizeof dir, "%s/models/tiny-qwen2", test_fixtures());
    es_error err = {0};
    es_model_store store;
    if (es_model_open(dir, -1, 0, &store, &err)) SKIP("%s: %s", dir, err.msg);
    es_device_options options = {.kind = ES_DEVICE_CPU, .threads = 1, .max_memory = store.layers[0].numel * sizeof(float) / 2};
    es_device *dev;
    REQUIRE(es_device_open(&dev, &options, &err) == ES_OK);
    es_layer_stream *layers = NULL;
    CHECK(es_stream_open(&layers, dev, &store, store.config.n_layers, &err) == ES_ERR_RUNTIME);
    CHECKF(strstr(err.msg, "one decoder layer needs") && strstr(err.msg, "--max-memory"), "%s", err.msg);
    es_device_close(dev);
    es_model_close(&store);
}

static int config_from(const char *text, es_model_config *config, es_error *err) {
    char path[700];
    snprintf(path, sizeof path, "%s/config.json", test_tmpdir());
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    es_error_clear(err);
    return es_model_config_load(path, config, NULL, err);
}

#define LLAMA_HEAD "{\"model_type\": \"llama\", \"vocab_size\": 100, \"hidden_size\": 64, \"intermediate_size\": 160, " \
                   "\"num_hidden_layers\": 2, \"num_attention_heads\": 8, \"num_key_value_heads\": 2, \"head_dim\": 8, "

TEST(config_spellings_and_errors) {
    es_error err = {0};
    es_model_config old_spelling, new_spelling;
    REQUIRE(config_from(LLAMA_HEAD "\"rope_theta\": 500000.0, \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, "
                        "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}, "
                        "\"attention_bias\": true, \"mlp_bias\": true}", &old_spelling, &err) == ES_OK);
    REQUIRE(config_from(LLAMA_HEAD "\"rope_parameters\": {\"rope_type\": \"llama3\", \"rope_theta\": 500000.0, \"factor\": 8.0, "
                        "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}}",
                        &new_spelling, &err) == ES_OK);
    CHECK(old_spelling.rope_llama3 && new_spelling.rope_llama3 && new_spelling.rope_theta == 500000.0);
    CHECK(old_spelling.qkv_bias && old_spelling.o_bias && old_spelling.mlp_bias && !new_spelling.qkv_bias);
    double a[4], b[4], plain[4];
    es_rope_inv_freq(&old_spelling, a);
    es_rope_inv_freq(&new_spelling, b);
    CHECK(memcmp(a, b, sizeof a) == 0);
    new_spelling.rope_llama3 = 0;
    es_rope_inv_freq(&new_spelling, plain);
    /* llama3 scaling slows the long wavelengths (the last ones) by the factor, keeps the first */
    CHECK(a[0] == plain[0] && fabs(a[3] - plain[3] / 8.0) < 1e-15 * plain[3]);
    static const struct {
        const char *json, *named;
        int code;
    } bad[] = {
        {"{\"model_type\": \"mistral\", \"hidden_size\": 8}", "mistral", ES_ERR_DATA},
        {LLAMA_HEAD "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}}", "rope_scaling.rope_type", ES_ERR_DATA},
        {LLAMA_HEAD "\"hidden_act\": \"gelu\"}", "hidden_act", ES_ERR_DATA},
        {"{\"model_type\": \"llama\", \"vocab_size\": 100}", "hidden_size", ES_ERR_DATA},
        {"{\"model_type\": \"llama\", \"vocab_size\": 100, \"hidden_size\": 64, \"intermediate_size\": 160, "
         "\"num_hidden_layers\": 2, \"num_attention_heads\": 8, \"num_key_value_heads\": 3, \"head_dim\": 8}",
         "num_key_value_heads", ES_ERR_DATA},
        {LLAMA_HEAD "\"num_key_value_heads\": 4}", "duplicate", ES_ERR_DATA},
        {"{not json", "invalid JSON", ES_ERR_DATA},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        es_model_config config;
        int rc = config_from(bad[i].json, &config, &err);
        CHECKF(rc == bad[i].code && strstr(err.msg, bad[i].named) && strstr(err.msg, "config.json"), "case %zu: %s", i, err.msg);
    }
}

TEST(golden_tiny_llama3) { check_model(tl_name, test_fixtures(), "tiny-llama3"); }
TEST(golden_tiny_qwen2) { check_model(tl_name, test_fixtures(), "tiny-qwen2"); }

int main(void) {
    RUN(config_spellings_and_errors);
    RUN(golden_tiny_llama3);
    RUN(golden_tiny_qwen2);
    RUN(max_memory_too_small_for_a_layer);
    return test_summary();
}
