/* Golden parity of the CPU forward pass: for tiny-llama3 and tiny-qwen2, every golden tensor
 * (embedding output, each layer, final norm, logits columns, argmax, logsumexp) of every
 * golden sequence, max |ours - golden| / max |golden| <= 1e-4. Also: the result does not
 * depend on packing sequences together, and bad configs are named errors. */
#include <math.h>

#include "../testlib.h"
#include "forward.h"
#include "model.h"
#include "ops.h"
#include "safetensors.h"

#define TOLERANCE 1e-4

static double relative_error(const float *ours, const float *golden, size_t n) {
    double max_diff = 0, max_ref = 0;
    for (size_t i = 0; i < n; i++) {
        double diff = fabs((double)ours[i] - golden[i]);
        if (diff > max_diff || isnan(diff)) max_diff = isnan(diff) ? INFINITY : diff;
        if (fabs(golden[i]) > max_ref) max_ref = fabs(golden[i]);
    }
    return max_ref > 0 ? max_diff / max_ref : max_diff;
}

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

static int compare_layer(void *ctx, int layer, const float *hidden, int T, es_error *err) {
    (void)err;
    layer_check *check = ctx;
    char name[64];
    if (layer == 0) snprintf(name, sizeof name, "%s/embed", check->seq);
    else snprintf(name, sizeof name, "%s/layer%02d", check->seq, layer);
    const es_tensor *golden = es_safetensors_find(check->goldens, name);
    if (!golden) {
        check->missing++;
        return 0;
    }
    float *values = malloc(es_tensor_numel(golden) * sizeof *values);
    es_tensor_to_f32(golden, values, NULL);
    note(check, name + strlen(check->seq) + 1, relative_error(hidden, values, (size_t)T * check->C));
    free(values);
    return 0;
}

static float *golden_f32(const es_safetensors *goldens, const char *seq, const char *what, size_t *n) {
    char name[64];
    snprintf(name, sizeof name, "%s/%s", seq, what);
    const es_tensor *t = es_safetensors_find(goldens, name);
    if (!t) return NULL;
    *n = es_tensor_numel(t);
    float *values = malloc(*n * sizeof *values);
    if (t->dtype == ES_DT_I64) {
        for (size_t i = 0; i < *n; i++) {
            int64_t v;
            memcpy(&v, (const char *)t->data + i * 8, 8);
            values[i] = (float)v;
        }
    } else {
        es_tensor_to_f32(t, values, NULL);
    }
    return values;
}

static void check_model(const char *tl_name, const char *name) {
    char dir[800], goldens_path[900];
    snprintf(dir, sizeof dir, "%s/models/%s", test_fixtures(), name);
    snprintf(goldens_path, sizeof goldens_path, "%s/golden_hidden.safetensors", dir);
    FILE *probe = fopen(goldens_path, "r");
    if (!probe) SKIP("%s not found (set ESSENCE_FIXTURES)", goldens_path);
    fclose(probe);
    es_error err = {0};
    es_model model;
    REQUIRE(es_model_load(dir, -1, 1, &model, &err) == ES_OK);
    es_safetensors *goldens = NULL;
    REQUIRE(es_safetensors_open(goldens_path, &goldens, &err) == ES_OK);
    es_pool *pool = es_pool_create(2);
    const int C = model.config.hidden_size, V = model.config.vocab_size;
    for (int s = 0; s < 4; s++) {
        char seq[16];
        snprintf(seq, sizeof seq, "seq%d", s);
        size_t T = 0, n_cols = 0, n_check = 0;
        float *ids_f = golden_f32(goldens, seq, "input_ids", &T);
        REQUIRE(ids_f);
        int32_t *ids = malloc(T * sizeof *ids);
        for (size_t t = 0; t < T; t++) ids[t] = (int32_t)ids_f[t];
        int32_t seq_start[2] = {0, (int32_t)T};
        layer_check check = {goldens, seq, (int)T, C, 0, "", 0};
        float *final = malloc(T * C * sizeof *final);
        CHECKF(es_forward(&model, pool, ids, seq_start, 1, model.config.n_layers, compare_layer, &check, final, &err) == ES_OK,
               "%s", err.msg);
        CHECK(check.missing == 0);
        float *golden_final = golden_f32(goldens, seq, "final_norm", &n_check);
        note(&check, "final_norm", relative_error(final, golden_final, T * C));
        /* Logits over the whole vocabulary: the listed columns, argmax and logsumexp. */
        float *cols = golden_f32(goldens, seq, "logits_cols", &n_cols);
        float *golden_logits = golden_f32(goldens, seq, "logits", &n_check);
        float *golden_argmax = golden_f32(goldens, seq, "logits_argmax", &n_check);
        float *golden_lse = golden_f32(goldens, seq, "logits_logsumexp", &n_check);
        float *logits = malloc(T * (size_t)V * sizeof *logits), *picked = malloc(T * n_cols * sizeof *picked);
        float *lse = malloc(T * sizeof *lse);
        int argmax_bad = 0;
        CHECK(es_matmul_forward(pool, logits, final, model.lm_head, NULL, (int)T, C, V) == 0); /* (T, V) */
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
        note(&check, "logits", relative_error(picked, golden_logits, T * n_cols));
        note(&check, "logsumexp", relative_error(lse, golden_lse, T));
        CHECKF(argmax_bad == 0, "%s %s: %d argmax differ", name, seq, argmax_bad);
        CHECKF(check.worst <= TOLERANCE, "%s: worst %s relative error %.3g", name, check.worst_name, check.worst);
        printf("  %s %s (T=%zu): worst relative error %.2e (%s)\n", name, seq, T, check.worst, check.worst_name);
        free(ids_f), free(ids), free(final), free(golden_final), free(cols), free(golden_logits), free(golden_argmax),
            free(golden_lse), free(logits), free(picked), free(lse);
    }
    es_pool_destroy(pool);
    es_safetensors_close(goldens);
    es_model_free(&model);
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
        {LLAMA_HEAD "\"num_key_value_heads\": 3}", "num_key_value_heads", ES_ERR_DATA},
        {"{not json", "invalid JSON", ES_ERR_DATA},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        es_model_config config;
        int rc = config_from(bad[i].json, &config, &err);
        CHECKF(rc == bad[i].code && strstr(err.msg, bad[i].named) && strstr(err.msg, "config.json"), "case %zu: %s", i, err.msg);
    }
}

TEST(golden_tiny_llama3) { check_model(tl_name, "tiny-llama3"); }
TEST(golden_tiny_qwen2) { check_model(tl_name, "tiny-qwen2"); }

int main(void) {
    RUN(config_spellings_and_errors);
    RUN(golden_tiny_llama3);
    RUN(golden_tiny_qwen2);
    return test_summary();
}
