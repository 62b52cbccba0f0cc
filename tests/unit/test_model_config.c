/* config.json checks (common/model.c): every real configuration the repository and the shared
 * fixtures hold parses; each value the model uses, made wrong one at a time (type, range,
 * divisibility, RoPE fields), is ES_ERR_DATA naming the file and the key. */
#include <jansson.h>

#include "model.h"
#include "../testlib.h"

static int contains(const char *msg, const char *sub) { return strstr(msg, sub) != NULL; }

static json_t *load(const char *path) {
    json_error_t jerr;
    return json_load_file(path, 0, &jerr);
}

static int parse_json(const json_t *root, es_model_config *c, es_error *err) {
    char *text = json_dumps(root, 0);
    if (!text) return -1;
    es_error_clear(err);
    int rc = es_model_config_parse(text, strlen(text), "config.json", c, err);
    free(text);
    return rc;
}

TEST(real_configs_parse) {
    char paths[6][4200];
    int n = 0;
    snprintf(paths[n++], sizeof paths[0], "%s/models/tiny-llama3/config.json", test_fixtures());
    snprintf(paths[n++], sizeof paths[0], "%s/models/tiny-qwen2/config.json", test_fixtures());
    const char *root = getenv("ESSENCE_ROOT") ? getenv("ESSENCE_ROOT") : ".";
    snprintf(paths[n++], sizeof paths[0], "%s/tests/bench/configs/deepseek-r1-distill-llama-70b.json", root);
    snprintf(paths[n++], sizeof paths[0], "%s/tests/bench/configs/deepseek-r1-distill-qwen-1.5b.json", root);
    const char *shared = test_shared_fixtures();
    if (shared) {
        snprintf(paths[n++], sizeof paths[0], "%s/configs/deepseek-r1-distill-llama-70b.config.json", shared);
        snprintf(paths[n++], sizeof paths[0], "%s/configs/deepseek-r1-distill-qwen-1.5b.config.json", shared);
    }
    for (int i = 0; i < n; i++) {
        es_model_config c;
        es_error err = {0};
        CHECKF(es_model_config_load(paths[i], &c, NULL, &err) == ES_OK, "%s: %s", paths[i], err.msg);
        CHECKF(c.n_layers > 0 && c.head_dim > 0 && c.rope_theta > 0 && c.rms_norm_eps > 0, "%s", paths[i]);
    }
    if (!shared) test_skip_shared("real_configs_parse");
}

/* One key of the Llama fixture set to a value (JSON text; NULL removes it), in a sub-object when
 * `in` is given, and the words the message must hold. */
static const struct {
    const char *in, *key, *value, *says;
} bad[] = {
    {NULL, "rope_theta", "0", "\"rope_theta\" is 0"},
    {NULL, "rope_theta", "-10000", "\"rope_theta\""},
    {"rope_scaling", "rope_theta", "0", "rope_scaling: \"rope_theta\""},
    {NULL, "rms_norm_eps", "-1e-5", "\"rms_norm_eps\""},
    {NULL, "rms_norm_eps", "0", "\"rms_norm_eps\" is 0"},
    {NULL, "rms_norm_eps", "\"1e-5\"", "\"rms_norm_eps\" is not a finite number"},
    {NULL, "hidden_size", "\"64\"", "\"hidden_size\" is not an integer"},
    {NULL, "hidden_size", "64.0", "\"hidden_size\" is not an integer"},
    {NULL, "hidden_size", "0", "\"hidden_size\" is 0"},
    {NULL, "hidden_size", "-64", "\"hidden_size\""},
    {NULL, "hidden_size", "9223372036854775807", "\"hidden_size\""},
    {NULL, "vocab_size", "0", "\"vocab_size\""},
    {NULL, "vocab_size", "true", "\"vocab_size\" is not an integer"},
    {NULL, "vocab_size", NULL, "missing \"vocab_size\""},
    {NULL, "intermediate_size", "0", "\"intermediate_size\""},
    {NULL, "num_hidden_layers", "0", "\"num_hidden_layers\""},
    {NULL, "num_attention_heads", "0", "\"num_attention_heads\""},
    {NULL, "num_attention_heads", "7", "num_key_value_heads"},
    {NULL, "num_key_value_heads", "3", "num_key_value_heads"},
    {NULL, "num_key_value_heads", "0", "\"num_key_value_heads\""},
    {NULL, "head_dim", "7", "head_dim 7 must be even"},
    {NULL, "head_dim", "0", "\"head_dim\""},
    {NULL, "max_position_embeddings", "0", "\"max_position_embeddings\""},
    {NULL, "max_position_embeddings", "\"131072\"", "\"max_position_embeddings\" is not an integer"},
    {NULL, "tie_word_embeddings", "\"true\"", "\"tie_word_embeddings\" is not true or false"},
    {NULL, "attention_bias", "1", "\"attention_bias\" is not true or false"},
    {NULL, "use_sliding_window", "true", "use_sliding_window"},
    {NULL, "hidden_act", "\"gelu\"", "hidden_act"},
    {NULL, "model_type", "\"gpt2\"", "model_type"},
    {NULL, "rope_scaling", "[]", "\"rope_scaling\" is not an object"},
    {"rope_scaling", "factor", "0", "rope_scaling: \"factor\""},
    {"rope_scaling", "factor", "\"8\"", "rope_scaling: \"factor\" is not a finite number"},
    {"rope_scaling", "factor", NULL, "rope_scaling: missing \"factor\""},
    {"rope_scaling", "low_freq_factor", "-1", "rope_scaling: \"low_freq_factor\""},
    {"rope_scaling", "high_freq_factor", "0.5", "high_freq_factor"},
    {"rope_scaling", "original_max_position_embeddings", "8192.5", "\"original_max_position_embeddings\" is not an integer"},
    {"rope_scaling", "original_max_position_embeddings", "0", "\"original_max_position_embeddings\""},
    {"rope_scaling", "original_max_position_embeddings", "1e300", "\"original_max_position_embeddings\""},
    {"rope_scaling", "rope_type", "\"yarn\"", "rope_type \"yarn\""},
    {"rope_scaling", "rope_type", "3", "rope_type is not a string"},
};

TEST(bad_values_named) {
    char path[4200];
    snprintf(path, sizeof path, "%s/models/tiny-llama3/config.json", test_fixtures());
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        json_t *root = load(path);
        REQUIRE(root);
        json_t *target = bad[i].in ? json_object_get(root, bad[i].in) : root;
        REQUIRE(json_is_object(target));
        if (bad[i].value) {
            json_error_t jerr;
            json_t *v = json_loads(bad[i].value, JSON_DECODE_ANY, &jerr);
            REQUIRE(v);
            json_object_set_new(target, bad[i].key, v);
        } else {
            json_object_del(target, bad[i].key);
        }
        es_model_config c;
        es_error err = {0};
        int rc = parse_json(root, &c, &err);
        CHECKF(rc == ES_ERR_DATA && contains(err.msg, "config.json") && contains(err.msg, bad[i].says), "case %zu (%s = %s): rc %d: %s",
               i, bad[i].key, bad[i].value ? bad[i].value : "(removed)", rc, err.msg);
        json_decref(root);
    }
}

/* hidden_size that the head count does not divide is fine only with an explicit head_dim. */
TEST(heads_divide_hidden) {
    char path[4200];
    snprintf(path, sizeof path, "%s/models/tiny-llama3/config.json", test_fixtures());
    json_t *root = load(path);
    REQUIRE(root);
    json_object_set_new(root, "hidden_size", json_integer(60));
    es_model_config c;
    es_error err = {0};
    CHECKF(parse_json(root, &c, &err) == ES_OK && c.head_dim == 8, "%s", err.msg);
    json_object_del(root, "head_dim");
    CHECKF(parse_json(root, &c, &err) == ES_ERR_DATA && contains(err.msg, "not a multiple of num_attention_heads"), "%s", err.msg);
    /* a null head_dim is an absent one (transformers' reading), here and in the divisibility rule:
     * fewer hidden units than heads gave head_dim 0 (found by fuzz_model_config) */
    json_object_set_new(root, "head_dim", json_null());
    CHECKF(parse_json(root, &c, &err) == ES_ERR_DATA && contains(err.msg, "not a multiple of num_attention_heads"), "%s", err.msg);
    json_object_set_new(root, "hidden_size", json_integer(2));
    CHECKF(parse_json(root, &c, &err) == ES_ERR_DATA && contains(err.msg, "not a multiple of num_attention_heads"), "%s", err.msg);
    json_object_set_new(root, "hidden_size", json_integer(64));
    CHECKF(parse_json(root, &c, &err) == ES_OK && c.head_dim == 64 / c.n_heads, "%s", err.msg);
    json_decref(root);
}

TEST(not_json_and_not_a_file) {
    es_model_config c;
    es_error err = {0};
    CHECK(es_model_config_parse("{\"model_type\": ", 15, "config.json", &c, &err) == ES_ERR_DATA && contains(err.msg, "config.json:1"));
    es_error_clear(&err);
    CHECK(es_model_config_parse("{\"a\": 1, \"a\": 2}", 16, "config.json", &c, &err) == ES_ERR_DATA);
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/config-folder", test_tmpdir());
    mkdir(dir, 0777);
    char inner[4300];
    snprintf(inner, sizeof inner, "%s/config.json", dir);
    mkdir(inner, 0777); /* a folder where config.json should be */
    es_error_clear(&err);
    CHECKF(es_model_config_load(dir, &c, NULL, &err) == ES_ERR_DATA && contains(err.msg, "not a regular file"), "%s", err.msg);
}

int main(void) {
    RUN(real_configs_parse);
    RUN(bad_values_named);
    RUN(heads_divide_hidden);
    RUN(not_json_and_not_a_file);
    return test_summary();
}
