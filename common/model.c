#include "model.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "safetensors.h"

#define BAD(...) es_fail(err, ES_ERR_DATA, __VA_ARGS__)

/* ---- config.json ---------------------------------------------------------------------- */

static int get_int(const json_t *root, const char *path, const char *key, int fallback, int required, int *out, es_error *err) {
    const json_t *value = json_object_get(root, key);
    if (!value || json_is_null(value)) {
        if (required) return BAD("%s: missing \"%s\"", path, key);
        *out = fallback;
        return ES_OK;
    }
    if (!json_is_integer(value) || json_integer_value(value) < 0 || json_integer_value(value) > 1 << 30)
        return BAD("%s: \"%s\" is not a non-negative integer", path, key);
    *out = (int)json_integer_value(value);
    return ES_OK;
}

static int get_real(const json_t *root, const char *path, const char *key, double fallback, int required, double *out,
                    es_error *err) {
    const json_t *value = json_object_get(root, key);
    if (!value || json_is_null(value)) {
        if (required) return BAD("%s: missing \"%s\"", path, key);
        *out = fallback;
        return ES_OK;
    }
    if (!json_is_number(value) || !isfinite(json_number_value(value)))
        return BAD("%s: \"%s\" is not a number", path, key);
    *out = json_number_value(value);
    return ES_OK;
}

static int get_flag(const json_t *root, const char *key) { return json_is_true(json_object_get(root, key)); }

/* rope_scaling (older configs) or rope_parameters (newer ones, which may also hold rope_theta). */
static int load_rope(const json_t *root, const char *path, es_model_config *c, es_error *err) {
    const json_t *rope = json_object_get(root, "rope_parameters");
    const char *key = "rope_parameters";
    if (!rope || json_is_null(rope)) rope = json_object_get(root, "rope_scaling"), key = "rope_scaling";
    int rc = get_real(root, path, "rope_theta", 10000.0, 0, &c->rope_theta, err);
    if (rc || !rope || json_is_null(rope)) return rc;
    if (!json_is_object(rope)) return BAD("%s: \"%s\" is not an object", path, key);
    if (json_object_get(rope, "rope_theta")) {
        rc = get_real(rope, path, "rope_theta", 10000.0, 1, &c->rope_theta, err);
        if (rc) return rc;
    }
    const json_t *type = json_object_get(rope, "rope_type");
    if (!type) type = json_object_get(rope, "type");
    const char *name = json_is_string(type) ? json_string_value(type) : "default";
    if (!strcmp(name, "default")) return ES_OK;
    if (strcmp(name, "llama3")) return BAD("%s: %s.rope_type \"%s\" is not supported (default, llama3)", path, key, name);
    c->rope_llama3 = 1;
    double original;
    if ((rc = get_real(rope, path, "factor", 0, 1, &c->rope_factor, err)) ||
        (rc = get_real(rope, path, "low_freq_factor", 0, 1, &c->rope_low_freq_factor, err)) ||
        (rc = get_real(rope, path, "high_freq_factor", 0, 1, &c->rope_high_freq_factor, err)) ||
        (rc = get_real(rope, path, "original_max_position_embeddings", 0, 1, &original, err)))
        return rc;
    c->rope_original_max_position = (int)original;
    if (c->rope_factor <= 0 || c->rope_low_freq_factor <= 0 || c->rope_high_freq_factor <= c->rope_low_freq_factor ||
        original <= 0)
        return BAD("%s: %s: llama3 factors out of range", path, key);
    return ES_OK;
}

static int parse_config(const json_t *root, const char *path, es_model_config *c, es_error *err) {
    memset(c, 0, sizeof *c);
    if (!json_is_object(root)) return BAD("%s: not a JSON object", path);
    const json_t *type = json_object_get(root, "model_type");
    const char *model_type = json_is_string(type) ? json_string_value(type) : NULL;
    if (!model_type) return BAD("%s: missing \"model_type\"", path);
    if (!strcmp(model_type, "llama")) c->arch = ES_ARCH_LLAMA;
    else if (!strcmp(model_type, "qwen2")) c->arch = ES_ARCH_QWEN2;
    else return BAD("%s: model_type \"%s\" is not supported (llama, qwen2)", path, model_type);
    int rc;
    if ((rc = get_int(root, path, "vocab_size", 0, 1, &c->vocab_size, err)) ||
        (rc = get_int(root, path, "hidden_size", 0, 1, &c->hidden_size, err)) ||
        (rc = get_int(root, path, "intermediate_size", 0, 1, &c->intermediate_size, err)) ||
        (rc = get_int(root, path, "num_hidden_layers", 0, 1, &c->n_layers, err)) ||
        (rc = get_int(root, path, "num_attention_heads", 0, 1, &c->n_heads, err)) ||
        (rc = get_int(root, path, "max_position_embeddings", 131072, 0, &c->max_position_embeddings, err)) ||
        (rc = get_real(root, path, "rms_norm_eps", 1e-6, 0, &c->rms_norm_eps, err)))
        return rc;
    if (c->n_heads == 0 || c->hidden_size == 0 || c->vocab_size == 0 || c->intermediate_size == 0)
        return BAD("%s: sizes must be positive", path);
    if ((rc = get_int(root, path, "num_key_value_heads", c->n_heads, 0, &c->n_kv_heads, err)) ||
        (rc = get_int(root, path, "head_dim", c->hidden_size / c->n_heads, 0, &c->head_dim, err)) ||
        (rc = load_rope(root, path, c, err)))
        return rc;
    if (c->n_kv_heads == 0 || c->n_heads % c->n_kv_heads)
        return BAD("%s: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)", path, c->n_heads, c->n_kv_heads);
    if (c->head_dim == 0 || c->head_dim % 2) return BAD("%s: head_dim %d must be even", path, c->head_dim);
    const json_t *act = json_object_get(root, "hidden_act");
    if (act && (!json_is_string(act) || strcmp(json_string_value(act), "silu")))
        return BAD("%s: hidden_act \"%s\" is not supported (silu)", path, json_is_string(act) ? json_string_value(act) : "?");
    if (get_flag(root, "use_sliding_window")) return BAD("%s: use_sliding_window=true is not supported", path);
    c->tie_word_embeddings = get_flag(root, "tie_word_embeddings");
    if (c->arch == ES_ARCH_QWEN2) {
        c->qkv_bias = 1; /* Qwen2 always has q/k/v biases and none elsewhere */
    } else {
        c->qkv_bias = c->o_bias = get_flag(root, "attention_bias");
        c->mlp_bias = get_flag(root, "mlp_bias");
    }
    return ES_OK;
}

int es_model_config_load(const char *path, es_model_config *config, char **text, es_error *err) {
    struct stat st;
    char *file = NULL;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        if (asprintf(&file, "%s/config.json", path) < 0) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    } else if (!(file = strdup(path))) {
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    json_error_t json_error;
    json_t *root = json_load_file(file, 0, &json_error);
    int rc;
    if (!root) {
        rc = stat(file, &st) != 0 ? es_fail(err, ES_ERR_USAGE, "%s: no such file", file)
                                  : BAD("%s:%d: invalid JSON: %s", file, json_error.line, json_error.text);
    } else {
        rc = parse_config(root, file, config, err);
        if (!rc && text) {
            *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
            if (!*text) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        }
    }
    json_decref(root);
    free(file);
    return rc;
}

void es_rope_inv_freq(const es_model_config *c, double *inv_freq) {
    const int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        double freq = 1.0 / pow(c->rope_theta, (2.0 * i) / c->head_dim);
        if (c->rope_llama3) {
            /* Long wavelengths are slowed by `factor`, short ones kept, the band between blended. */
            double wavelength = 2 * M_PI / freq, original = c->rope_original_max_position;
            double low_wavelength = original / c->rope_low_freq_factor, high_wavelength = original / c->rope_high_freq_factor;
            if (wavelength > low_wavelength) freq /= c->rope_factor;
            else if (wavelength >= high_wavelength) {
                double smooth = (original / wavelength - c->rope_low_freq_factor) /
                                (c->rope_high_freq_factor - c->rope_low_freq_factor);
                freq = (1 - smooth) * freq / c->rope_factor + smooth * freq;
            }
        }
        inv_freq[i] = freq;
    }
}

/* ---- weights ----------------------------------------------------------------------------- */

typedef struct wanted {
    char name[96];
    int ndim;
    int64_t shape[2];
    float **slot;
} wanted;

static void want(wanted *list, int *n, float **slot, int64_t rows, int64_t cols, const char *fmt, int layer, const char *part) {
    wanted *w = &list[(*n)++];
    snprintf(w->name, sizeof w->name, fmt, layer, part);
    w->ndim = cols ? 2 : 1;
    w->shape[0] = rows, w->shape[1] = cols;
    w->slot = slot;
}

int es_model_load(const char *dir, int n_layers, int with_head, es_model *model, es_error *err) {
    memset(model, 0, sizeof *model);
    int rc = es_model_config_load(dir, &model->config, NULL, err);
    if (rc) return rc;
    const es_model_config *c = &model->config;
    if (n_layers < 0 || n_layers > c->n_layers) n_layers = n_layers < 0 ? c->n_layers : -1;
    if (n_layers < 0) return es_fail(err, ES_ERR_USAGE, "%s: the model has %d layers", dir, c->n_layers);
    model->n_layers_loaded = n_layers;
    model->layers = calloc((size_t)(n_layers ? n_layers : 1), sizeof *model->layers);
    wanted *list = calloc((size_t)n_layers * 16 + 4, sizeof *list);
    if (!model->layers || !list) {
        free(list);
        es_model_free(model);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    const int64_t C = c->hidden_size, I = c->intermediate_size, V = c->vocab_size;
    const int64_t q_rows = (int64_t)c->n_heads * c->head_dim, kv_rows = (int64_t)c->n_kv_heads * c->head_dim;
    int n = 0;
    want(list, &n, &model->embed, V, C, "model.embed_tokens.weight%.0d%s", 0, "");
    for (int l = 0; l < n_layers; l++) {
        es_layer_weights *w = &model->layers[l];
        const char *fmt = "model.layers.%d.%s";
        want(list, &n, &w->input_norm, C, 0, fmt, l, "input_layernorm.weight");
        want(list, &n, &w->q, q_rows, C, fmt, l, "self_attn.q_proj.weight");
        want(list, &n, &w->k, kv_rows, C, fmt, l, "self_attn.k_proj.weight");
        want(list, &n, &w->v, kv_rows, C, fmt, l, "self_attn.v_proj.weight");
        want(list, &n, &w->o, C, q_rows, fmt, l, "self_attn.o_proj.weight");
        if (c->qkv_bias) {
            want(list, &n, &w->q_bias, q_rows, 0, fmt, l, "self_attn.q_proj.bias");
            want(list, &n, &w->k_bias, kv_rows, 0, fmt, l, "self_attn.k_proj.bias");
            want(list, &n, &w->v_bias, kv_rows, 0, fmt, l, "self_attn.v_proj.bias");
        }
        if (c->o_bias) want(list, &n, &w->o_bias, C, 0, fmt, l, "self_attn.o_proj.bias");
        want(list, &n, &w->post_norm, C, 0, fmt, l, "post_attention_layernorm.weight");
        want(list, &n, &w->gate, I, C, fmt, l, "mlp.gate_proj.weight");
        want(list, &n, &w->up, I, C, fmt, l, "mlp.up_proj.weight");
        want(list, &n, &w->down, C, I, fmt, l, "mlp.down_proj.weight");
        if (c->mlp_bias) {
            want(list, &n, &w->gate_bias, I, 0, fmt, l, "mlp.gate_proj.bias");
            want(list, &n, &w->up_bias, I, 0, fmt, l, "mlp.up_proj.bias");
            want(list, &n, &w->down_bias, C, 0, fmt, l, "mlp.down_proj.bias");
        }
    }
    if (with_head) {
        want(list, &n, &model->final_norm, C, 0, "model.norm.weight%.0d%s", 0, "");
        if (!c->tie_word_embeddings) want(list, &n, &model->lm_head, V, C, "lm_head.weight%.0d%s", 0, "");
    }

    es_weights *weights = NULL;
    rc = es_weights_open(dir, &weights, err);
    const es_tensor **found = calloc((size_t)n, sizeof *found);
    if (!rc && !found) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    size_t total = 0;
    for (int i = 0; !rc && i < n; i++) {
        found[i] = es_weights_find(weights, list[i].name);
        if (!found[i]) {
            rc = BAD("%s: tensor \"%s\" is missing", dir, list[i].name);
            break;
        }
        const es_tensor *t = found[i];
        int same = t->ndim == list[i].ndim && t->shape[0] == list[i].shape[0] && (t->ndim == 1 || t->shape[1] == list[i].shape[1]);
        if (!same) {
            char shape[64], expected[64];
            if (list[i].ndim == 2) snprintf(expected, sizeof expected, "[%lld, %lld]", (long long)list[i].shape[0], (long long)list[i].shape[1]);
            else snprintf(expected, sizeof expected, "[%lld]", (long long)list[i].shape[0]);
            rc = BAD("%s: tensor \"%s\" has shape %s, config.json implies %s", t->file, list[i].name,
                     es_tensor_shape_str(t, shape, sizeof shape), expected);
            break;
        }
        if (!es_dtype_is_float(t->dtype)) {
            rc = BAD("%s: tensor \"%s\" has integer dtype %s", t->file, list[i].name, es_dtype_name(t->dtype));
            break;
        }
        total += es_tensor_numel(t);
    }
    if (!rc) {
        model->arena = malloc(total * sizeof(float));
        model->tensors = calloc((size_t)n, sizeof *model->tensors);
        if (!model->arena || !model->tensors) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory (%zu parameters)", total);
    }
    size_t at = 0;
    for (int i = 0; !rc && i < n; i++) {
        float *data = model->arena + at;
        rc = es_tensor_to_f32(found[i], data, err);
        at += es_tensor_numel(found[i]);
        *list[i].slot = data;
        es_named_tensor *named = &model->tensors[model->n_tensors++];
        snprintf(named->name, sizeof named->name, "%s", list[i].name);
        named->data = data, named->ndim = list[i].ndim;
        named->shape[0] = list[i].shape[0], named->shape[1] = list[i].shape[1];
    }
    model->arena_floats = total;
    if (!rc && with_head && c->tie_word_embeddings) model->lm_head = model->embed;
    free(found);
    free(list);
    es_weights_close(weights);
    if (rc) es_model_free(model);
    return rc;
}

void es_model_free(es_model *model) {
    free(model->arena), free(model->tensors), free(model->layers);
    memset(model, 0, sizeof *model);
}

const es_named_tensor *es_model_tensor(const es_model *model, const char *name) {
    for (int i = 0; i < model->n_tensors; i++)
        if (!strcmp(model->tensors[i].name, name)) return &model->tensors[i];
    return NULL;
}
