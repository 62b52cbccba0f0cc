/* essence-inspect mkmodel --like CONFIG.json [--layers N] [--hidden N] [--seed N] --out DIR
 * A random-weight checkpoint in the Hugging Face layout (config.json + bf16 model.safetensors)
 * of a real model's shape, for tests, benchmarks and the demo. Weights: normal with standard
 * deviation 0.02 (biases too), norm weights 1; drawn from a seeded splitmix64 generator, so
 * the same seed gives the same file everywhere. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dtype.h"
#include "inspect.h"
#include "model.h"
#include "safetensors.h"

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Normal deviates by Box-Muller, in bf16. */
static void fill_normal(uint16_t *out, size_t n, double std, uint64_t *state) {
    for (size_t i = 0; i < n; i += 2) {
        double u1 = ((splitmix64(state) >> 11) + 1.0) / 9007199254740993.0, u2 = (splitmix64(state) >> 11) / 9007199254740992.0;
        double radius = sqrt(-2.0 * log(u1)) * std;
        out[i] = es_f32_to_bf16((float)(radius * cos(2 * M_PI * u2)));
        if (i + 1 < n) out[i + 1] = es_f32_to_bf16((float)(radius * sin(2 * M_PI * u2)));
    }
}

typedef struct {
    es_tensor *tensors;
    int n;
    uint64_t rng;
    int failed;
} builder;

static void add(builder *b, const char *name, int64_t rows, int64_t cols, int ones) {
    es_tensor *t = &b->tensors[b->n++];
    size_t count = (size_t)rows * (size_t)(cols ? cols : 1);
    uint16_t *data = malloc(count * sizeof *data);
    if (!data) {
        b->failed = 1;
        return;
    }
    if (ones) for (size_t i = 0; i < count; i++) data[i] = es_f32_to_bf16(1.0f);
    else fill_normal(data, count, 0.02, &b->rng);
    t->name = strdup(name);
    t->dtype = ES_DT_BF16;
    t->ndim = cols ? 2 : 1;
    t->shape[0] = rows, t->shape[1] = cols;
    t->data = data;
    t->nbytes = count * sizeof *data;
    if (!t->name) b->failed = 1;
}

int inspect_mkmodel(const es_config *cfg, es_error *err) {
    if (!es_config_is_set(cfg, "like") || !es_config_is_set(cfg, "out"))
        return es_fail(err, ES_ERR_USAGE, "usage: essence-inspect mkmodel --like CONFIG.json [--layers N] [--hidden N] [--seed N] --out DIR");
    const char *like = es_config_str(cfg, "like"), *out = es_config_str(cfg, "out");
    json_error_t json_error;
    json_t *config = json_load_file(like, JSON_PRESERVE_ORDER, &json_error);
    if (!config) return es_fail(err, ES_ERR_USAGE, "%s:%d: %s", like, json_error.line, json_error.text);
    if (es_config_is_set(cfg, "layers")) json_object_set_new(config, "num_hidden_layers", json_integer(es_config_int(cfg, "layers")));
    if (es_config_is_set(cfg, "hidden")) {
        json_object_set_new(config, "hidden_size", json_integer(es_config_int(cfg, "hidden")));
        json_object_del(config, "head_dim"); /* back to hidden / heads */
    }
    mkdir(out, 0777);
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", out);
    int rc = json_dump_file(config, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER) == 0 ? ES_OK
                                                                                     : es_fail(err, ES_ERR_RUNTIME, "%s: cannot write", path);
    json_decref(config);
    es_model_config c;
    if (!rc) rc = es_model_config_load(path, &c, NULL, err);
    if (rc) return rc;
    es_tensor_spec *specs = calloc((size_t)es_model_max_tensors(c.n_layers), sizeof *specs);
    builder b = {calloc((size_t)es_model_max_tensors(c.n_layers), sizeof(es_tensor)), 0, (uint64_t)es_config_int(cfg, "seed"), 0};
    if (!specs || !b.tensors) {
        free(specs), free(b.tensors);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    int n_specs = es_model_tensor_list(&c, c.n_layers, 1, specs);
    for (int i = 0; i < n_specs && !b.failed; i++) add(&b, specs[i].name, specs[i].shape[0], specs[i].shape[1], specs[i].is_norm);
    free(specs);
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    es_meta_kv meta[] = {{"format", "pt"}};
    rc = b.failed ? es_fail(err, ES_ERR_RUNTIME, "out of memory") : es_safetensors_write(path, b.tensors, (size_t)b.n, meta, 1, err);
    size_t parameters = 0;
    for (int i = 0; i < b.n; i++) {
        parameters += b.tensors[i].nbytes / 2;
        free((void *)b.tensors[i].name), free((void *)b.tensors[i].data);
    }
    free(b.tensors);
    if (!rc) printf("%s: %d layers, hidden %lld, %zu parameters (bf16, seed %lld)\n", out, c.n_layers, (long long)c.hidden_size, parameters,
                    (long long)es_config_int(cfg, "seed"));
    return rc;
}
