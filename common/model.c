#include "model.h"

#include <jansson.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "safetensors.h"

#define BAD(...) es_fail(err, ES_ERR_DATA, __VA_ARGS__)

/* ---- config.json ---------------------------------------------------------------------- */

/* Every value the model uses is checked here, by type (an integer given as a string or a float is
 * refused) and by range, so that no later step meets a size of 0, a head count that does not
 * divide, or a RoPE base or norm epsilon that turns the latents into NaN (docs/safetensors.md). */
static int get_int(const json_t *root, const char *path, const char *key, int fallback, int required, int min, int max, int *out,
                   es_error *err) {
    const json_t *value = json_object_get(root, key);
    if (!value || json_is_null(value)) {
        if (required) return BAD("%s: missing \"%s\"", path, key);
        *out = fallback;
        return ES_OK;
    }
    if (!json_is_integer(value)) return BAD("%s: \"%s\" is not an integer", path, key);
    if (json_integer_value(value) < min || json_integer_value(value) > max)
        return BAD("%s: \"%s\" is %lld, outside %d..%d", path, key, (long long)json_integer_value(value), min, max);
    *out = (int)json_integer_value(value);
    return ES_OK;
}

/* A finite number above `min` (or at it, with min_ok). */
static int get_real(const json_t *root, const char *path, const char *key, double fallback, int required, double min, int min_ok,
                    double *out, es_error *err) {
    const json_t *value = json_object_get(root, key);
    if (!value || json_is_null(value)) {
        if (required) return BAD("%s: missing \"%s\"", path, key);
        *out = fallback;
        return ES_OK;
    }
    if (!json_is_number(value) || !isfinite(json_number_value(value)))
        return BAD("%s: \"%s\" is not a finite number", path, key);
    double v = json_number_value(value);
    if (min_ok ? v < min : v <= min) return BAD("%s: \"%s\" is %g: it must be %s %g", path, key, v, min_ok ? ">=" : ">", min);
    *out = v;
    return ES_OK;
}

/* true, false, or absent / null (false). */
static int get_flag(const json_t *root, const char *path, const char *key, int *out, es_error *err) {
    const json_t *value = json_object_get(root, key);
    *out = json_is_true(value);
    if (value && !json_is_null(value) && !json_is_boolean(value)) return BAD("%s: \"%s\" is not true or false", path, key);
    return ES_OK;
}

#define MAX_SIZE (1 << 30)  /* vocabulary, widths, positions */
#define MAX_LAYERS 100000

/* rope_scaling (older configs) or rope_parameters (newer ones, which may also hold rope_theta). */
static int load_rope(const json_t *root, const char *path, es_model_config *c, es_error *err) {
    const json_t *rope = json_object_get(root, "rope_parameters");
    const char *key = "rope_parameters";
    if (!rope || json_is_null(rope)) rope = json_object_get(root, "rope_scaling"), key = "rope_scaling";
    int rc = get_real(root, path, "rope_theta", 10000.0, 0, 0, 0, &c->rope_theta, err);
    if (rc || !rope || json_is_null(rope)) return rc;
    if (!json_is_object(rope)) return BAD("%s: \"%s\" is not an object", path, key);
    char where[4200]; /* messages name the key inside: "config.json: rope_scaling: \"factor\" ..." */
    snprintf(where, sizeof where, "%s: %s", path, key);
    if (json_object_get(rope, "rope_theta") && (rc = get_real(rope, where, "rope_theta", 10000.0, 1, 0, 0, &c->rope_theta, err)))
        return rc;
    const json_t *type = json_object_get(rope, "rope_type");
    if (!type) type = json_object_get(rope, "type");
    if (type && !json_is_string(type) && !json_is_null(type)) return BAD("%s: %s.rope_type is not a string", path, key);
    const char *name = json_is_string(type) ? json_string_value(type) : "default";
    if (!strcmp(name, "default")) return ES_OK;
    if (strcmp(name, "llama3")) return BAD("%s: %s.rope_type \"%s\" is not supported (default, llama3)", path, key, name);
    c->rope_llama3 = 1;
    if ((rc = get_real(rope, where, "factor", 0, 1, 0, 0, &c->rope_factor, err)) ||
        (rc = get_real(rope, where, "low_freq_factor", 0, 1, 0, 0, &c->rope_low_freq_factor, err)) ||
        (rc = get_real(rope, where, "high_freq_factor", 0, 1, 0, 0, &c->rope_high_freq_factor, err)) ||
        (rc = get_int(rope, where, "original_max_position_embeddings", 0, 1, 1, MAX_SIZE, &c->rope_original_max_position, err)))
        return rc;
    if (c->rope_high_freq_factor <= c->rope_low_freq_factor)
        return BAD("%s: %s: high_freq_factor (%g) must be above low_freq_factor (%g)", path, key, c->rope_high_freq_factor,
                   c->rope_low_freq_factor);
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
    if ((rc = get_int(root, path, "vocab_size", 0, 1, 1, MAX_SIZE, &c->vocab_size, err)) ||
        (rc = get_int(root, path, "hidden_size", 0, 1, 1, MAX_SIZE, &c->hidden_size, err)) ||
        (rc = get_int(root, path, "intermediate_size", 0, 1, 1, MAX_SIZE, &c->intermediate_size, err)) ||
        (rc = get_int(root, path, "num_hidden_layers", 0, 1, 1, MAX_LAYERS, &c->n_layers, err)) ||
        (rc = get_int(root, path, "num_attention_heads", 0, 1, 1, MAX_SIZE, &c->n_heads, err)) ||
        (rc = get_int(root, path, "max_position_embeddings", 131072, 0, 1, MAX_SIZE, &c->max_position_embeddings, err)) ||
        /* 0 is refused too: RMSNorm of an all-zero row would be 0/0 */
        (rc = get_real(root, path, "rms_norm_eps", 1e-6, 0, 0, 0, &c->rms_norm_eps, err)))
        return rc;
    const json_t *head_dim = json_object_get(root, "head_dim"); /* null is absent, as in transformers */
    if ((!head_dim || json_is_null(head_dim)) && c->hidden_size % c->n_heads)
        return BAD("%s: hidden_size (%d) is not a multiple of num_attention_heads (%d), and no head_dim is given", path,
                   c->hidden_size, c->n_heads);
    if ((rc = get_int(root, path, "num_key_value_heads", c->n_heads, 0, 1, MAX_SIZE, &c->n_kv_heads, err)) ||
        (rc = get_int(root, path, "head_dim", c->hidden_size / c->n_heads, 0, 1, MAX_SIZE, &c->head_dim, err)) ||
        (rc = load_rope(root, path, c, err)))
        return rc;
    if (c->n_heads % c->n_kv_heads)
        return BAD("%s: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)", path, c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2) return BAD("%s: head_dim %d must be even", path, c->head_dim);
    if ((int64_t)c->n_heads * c->head_dim > MAX_SIZE)
        return BAD("%s: num_attention_heads × head_dim (%d × %d) is too large", path, c->n_heads, c->head_dim);
    const json_t *act = json_object_get(root, "hidden_act");
    if (act && (!json_is_string(act) || strcmp(json_string_value(act), "silu")))
        return BAD("%s: hidden_act \"%s\" is not supported (silu)", path, json_is_string(act) ? json_string_value(act) : "?");
    int sliding = 0, attention_bias = 0, mlp_bias = 0;
    if ((rc = get_flag(root, path, "use_sliding_window", &sliding, err)) ||
        (rc = get_flag(root, path, "tie_word_embeddings", &c->tie_word_embeddings, err)) ||
        (rc = get_flag(root, path, "attention_bias", &attention_bias, err)) || (rc = get_flag(root, path, "mlp_bias", &mlp_bias, err)))
        return rc;
    if (sliding) return BAD("%s: use_sliding_window=true is not supported", path);
    if (c->arch == ES_ARCH_QWEN2) {
        c->qkv_bias = 1; /* Qwen2 always has q/k/v biases and none elsewhere */
    } else {
        c->qkv_bias = c->o_bias = attention_bias;
        c->mlp_bias = mlp_bias;
    }
    return ES_OK;
}

int es_model_config_parse(const char *text, size_t len, const char *name, es_model_config *config, es_error *err) {
    json_error_t json_error;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &json_error);
    if (!root) {
        if (json_error_code(&json_error) == json_error_out_of_memory)
            return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory while reading it", name);
        return BAD("%s:%d: invalid JSON: %s", name, json_error.line, json_error.text);
    }
    int rc = parse_config(root, name, config, err);
    json_decref(root);
    return rc;
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
    json_t *root = NULL;
    int rc = ES_OK;
    if (stat(file, &st) != 0) rc = es_fail(err, ES_ERR_USAGE, "%s: no such file", file);
    else if (!S_ISREG(st.st_mode)) rc = BAD("%s: not a regular file", file);
    else if (!(root = json_load_file(file, JSON_REJECT_DUPLICATES, &json_error)))
        rc = json_error_code(&json_error) == json_error_out_of_memory
                 ? es_fail(err, ES_ERR_RUNTIME, "%s: out of memory while reading it", file)
                 : BAD("%s:%d: invalid JSON: %s", file, json_error.line, json_error.text);
    if (!rc) {
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

/* The decoder layer's tensors: one table for loading, checking and making checkpoints. */
enum { DIM_NONE, DIM_C, DIM_I, DIM_Q, DIM_KV };
enum { ALWAYS, IF_QKV_BIAS, IF_O_BIAS, IF_MLP_BIAS };
static const struct {
    const char *part;
    size_t offset; /* of the pointer in es_layer_weights */
    int rows, cols, condition;
} layer_tensors[] = {
    {"input_layernorm.weight", offsetof(es_layer_weights, input_norm), DIM_C, DIM_NONE, ALWAYS},
    {"self_attn.q_proj.weight", offsetof(es_layer_weights, q), DIM_Q, DIM_C, ALWAYS},
    {"self_attn.k_proj.weight", offsetof(es_layer_weights, k), DIM_KV, DIM_C, ALWAYS},
    {"self_attn.v_proj.weight", offsetof(es_layer_weights, v), DIM_KV, DIM_C, ALWAYS},
    {"self_attn.o_proj.weight", offsetof(es_layer_weights, o), DIM_C, DIM_Q, ALWAYS},
    {"self_attn.q_proj.bias", offsetof(es_layer_weights, q_bias), DIM_Q, DIM_NONE, IF_QKV_BIAS},
    {"self_attn.k_proj.bias", offsetof(es_layer_weights, k_bias), DIM_KV, DIM_NONE, IF_QKV_BIAS},
    {"self_attn.v_proj.bias", offsetof(es_layer_weights, v_bias), DIM_KV, DIM_NONE, IF_QKV_BIAS},
    {"self_attn.o_proj.bias", offsetof(es_layer_weights, o_bias), DIM_C, DIM_NONE, IF_O_BIAS},
    {"post_attention_layernorm.weight", offsetof(es_layer_weights, post_norm), DIM_C, DIM_NONE, ALWAYS},
    {"mlp.gate_proj.weight", offsetof(es_layer_weights, gate), DIM_I, DIM_C, ALWAYS},
    {"mlp.up_proj.weight", offsetof(es_layer_weights, up), DIM_I, DIM_C, ALWAYS},
    {"mlp.down_proj.weight", offsetof(es_layer_weights, down), DIM_C, DIM_I, ALWAYS},
    {"mlp.gate_proj.bias", offsetof(es_layer_weights, gate_bias), DIM_I, DIM_NONE, IF_MLP_BIAS},
    {"mlp.up_proj.bias", offsetof(es_layer_weights, up_bias), DIM_I, DIM_NONE, IF_MLP_BIAS},
    {"mlp.down_proj.bias", offsetof(es_layer_weights, down_bias), DIM_C, DIM_NONE, IF_MLP_BIAS},
};
#define N_LAYER_TENSORS (int)(sizeof layer_tensors / sizeof *layer_tensors)

static int64_t dim(const es_model_config *c, int kind) {
    switch (kind) {
    case DIM_C: return c->hidden_size;
    case DIM_I: return c->intermediate_size;
    case DIM_Q: return (int64_t)c->n_heads * c->head_dim;
    case DIM_KV: return (int64_t)c->n_kv_heads * c->head_dim;
    default: return 0;
    }
}

static void spec(es_tensor_spec *s, const char *name, int64_t rows, int64_t cols, int is_norm, int layer, int part) {
    snprintf(s->name, sizeof s->name, "%s", name);
    s->ndim = cols ? 2 : 1;
    s->shape[0] = rows, s->shape[1] = cols;
    s->is_norm = is_norm;
    s->layer = layer, s->part = part;
}

int es_model_tensor_list(const es_model_config *c, int n_layers, int with_head, es_tensor_spec *list) {
    int n = 0;
    spec(&list[n++], "model.embed_tokens.weight", c->vocab_size, c->hidden_size, 0, -1, -1);
    for (int l = 0; l < n_layers; l++)
        for (int p = 0; p < N_LAYER_TENSORS; p++) {
            int condition = layer_tensors[p].condition;
            if ((condition == IF_QKV_BIAS && !c->qkv_bias) || (condition == IF_O_BIAS && !c->o_bias) ||
                (condition == IF_MLP_BIAS && !c->mlp_bias))
                continue;
            char name[96];
            snprintf(name, sizeof name, "model.layers.%d.%s", l, layer_tensors[p].part);
            spec(&list[n++], name, dim(c, layer_tensors[p].rows), dim(c, layer_tensors[p].cols),
                 strstr(layer_tensors[p].part, "layernorm") != NULL, l, p);
        }
    if (with_head) {
        spec(&list[n++], "model.norm.weight", c->hidden_size, 0, 1, -1, -2);
        if (!c->tie_word_embeddings) spec(&list[n++], "lm_head.weight", c->vocab_size, c->hidden_size, 0, -1, -3);
    }
    return n;
}

void **es_layer_slot(es_layer_weights *w, int part) { return (void **)((char *)w + layer_tensors[part].offset); }

int es_model_open(const char *dir, int n_layers, int with_head, es_model_store *store, es_error *err) {
    memset(store, 0, sizeof *store);
    int rc = es_model_config_load(dir, &store->config, NULL, err);
    if (rc) return rc;
    const es_model_config *c = &store->config;
    if (n_layers < 0 || n_layers > c->n_layers) n_layers = n_layers < 0 ? c->n_layers : -1;
    if (n_layers < 0) return es_fail(err, ES_ERR_USAGE, "%s: the model has %d layers", dir, c->n_layers);
    store->n_layers = n_layers;
    store->dir = strdup(dir);
    store->layers = calloc((size_t)(n_layers ? n_layers : 1), sizeof *store->layers);
    store->specs = calloc((size_t)es_model_max_tensors(n_layers), sizeof *store->specs);
    if (!store->dir || !store->layers || !store->specs) {
        es_model_close(store);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    const int n = es_model_tensor_list(c, n_layers, with_head, store->specs);
    store->n_specs = n;
    store->found = calloc((size_t)n, sizeof *store->found);
    rc = store->found ? es_weights_open(dir, &store->weights, err) : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int i = 0; !rc && i < n; i++) {
        const es_tensor_spec *want = &store->specs[i];
        const es_tensor *t = es_weights_find(store->weights, want->name);
        if (!t) {
            rc = BAD("%s: tensor \"%s\" is missing", dir, want->name);
            break;
        }
        int same = t->ndim == want->ndim && t->shape[0] == want->shape[0] && (t->ndim == 1 || t->shape[1] == want->shape[1]);
        if (!same) {
            char shape[64], expected[64];
            if (want->ndim == 2) snprintf(expected, sizeof expected, "[%lld, %lld]", (long long)want->shape[0], (long long)want->shape[1]);
            else snprintf(expected, sizeof expected, "[%lld]", (long long)want->shape[0]);
            rc = BAD("%s: tensor \"%s\" has shape %s, config.json implies %s", t->file, want->name,
                     es_tensor_shape_str(t, shape, sizeof shape), expected);
            break;
        }
        if (!es_dtype_is_float(t->dtype)) {
            rc = BAD("%s: tensor \"%s\" has integer dtype %s", t->file, want->name, es_dtype_name(t->dtype));
            break;
        }
        store->found[i] = t;
        if (want->layer >= 0) {
            store->layers[want->layer].part[want->part] = t;
            store->layers[want->layer].numel += es_tensor_numel(t);
        } else if (want->part == -1) store->embed = t;
        else if (want->part == -2) store->final_norm = t;
        else store->lm_head = t;
    }
    if (!rc && with_head && c->tie_word_embeddings) store->lm_head = store->embed;
    if (rc) es_model_close(store);
    return rc;
}

void es_model_close(es_model_store *store) {
    es_weights_close(store->weights);
    free(store->dir), free(store->layers), free(store->specs), free(store->found);
    memset(store, 0, sizeof *store);
}
