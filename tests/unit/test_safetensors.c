/* safetensors: the fixtures (sharded and single-file), write/read round trips, every
 * malformed-file case, model-folder index rules and the atomic writer. */
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"
#include "../testlib.h"

/* ---- helpers ------------------------------------------------------------------------ */

static int exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static void write_bytes(const char *path, const void *buf, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
}

/* A raw file: 8-byte length (hlen, or the header's length when hlen < 0), the header,
 * then data_len bytes of data (a counting pattern). Returns the path. */
static char *raw_file(const char *name, const char *header, long long hlen, size_t data_len) {
    size_t hl = strlen(header), len = 8 + hl + data_len;
    unsigned char *buf = malloc(len);
    unsigned long long n = hlen < 0 ? hl : (unsigned long long)hlen;
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(n >> (8 * i));
    memcpy(buf + 8, header, hl);
    for (size_t i = 0; i < data_len; i++) buf[8 + hl + i] = (unsigned char)i;
    char *path = test_path(name);
    write_bytes(path, buf, len);
    free(buf);
    return path;
}

static int contains(const char *msg, const char *sub) { return strstr(msg, sub) != NULL; }

/* Opening must fail with ES_ERR_DATA and a message holding each given substring.
 * -DSHOW_MESSAGES prints every message, to proofread them. */
#ifdef SHOW_MESSAGES
#define SHOW(err) printf("  message: %s\n", (err).msg)
#else
#define SHOW(err) ((void)0)
#endif
#define CHECK_DATA_ERR(rc, err, s1, s2)                                                          \
    do {                                                                                         \
        int rc_ = (rc);                                                                          \
        SHOW(err);                                                                               \
        CHECKF(rc_ == ES_ERR_DATA, "rc %d, message: %s", rc_, (err).msg);                        \
        CHECKF(contains((err).msg, s1), "message lacks \"%s\": %s", (const char *)(s1), (err).msg); \
        CHECKF(contains((err).msg, s2), "message lacks \"%s\": %s", (const char *)(s2), (err).msg); \
    } while (0)

static int open_raw(const char *name, const char *header, size_t data_len, es_error *err) {
    es_safetensors *st = NULL;
    int rc = es_safetensors_open(raw_file(name, header, -1, data_len), &st, err);
    es_safetensors_close(st);
    return rc;
}

static es_tensor tensor(const char *name, es_dtype dt, int ndim, const int64_t *shape, const void *data) {
    es_tensor t = {.name = name, .dtype = dt, .ndim = ndim, .data = data};
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)(t.shape[i] = shape[i]);
    t.nbytes = n * es_dtype_size(dt);
    return t;
}

static double sum_f32(const es_tensor *t) {
    size_t n = es_tensor_numel(t);
    float *v = malloc(n * sizeof *v + 1);
    es_error err = {0};
    double s = NAN;
    if (es_tensor_to_f32(t, v, &err) == ES_OK) {
        s = 0;
        for (size_t i = 0; i < n; i++) s += v[i];
    }
    free(v);
    return s;
}

static int shape_is(const es_tensor *t, int ndim, int64_t d0, int64_t d1) {
    if (!t || t->ndim != ndim) return 0;
    if (ndim >= 1 && t->shape[0] != d0) return 0;
    if (ndim >= 2 && t->shape[1] != d1) return 0;
    return 1;
}

/* ---- fixtures ----------------------------------------------------------------------- */

/* What each fixture set's checkpoints hold beyond their config.json: float64 sums of some bf16
 * tensors (exact for the norms) and the first embedding value's bits. In-repo: printed by
 * tests/fixtures/make_fixtures.py and re-read with numpy from the files; shared: read with
 * numpy (../shared/tools/st.py) from the files, float(x.astype(np.float64).sum()). */
typedef struct {
    const char *label;
    uint16_t first_embedding_bits;
    double llama_norm0, llama_norm, llama_k0, qwen_q0_bias, qwen_norm;
} fixture_values;

static const fixture_values repo_values = {"repo", 0xbe43, 65.95703125, 64.30078125, 0.4552754610776901, -0.6882781982421875, 48.5703125};
static const fixture_values shared_values = {"shared", 0xbe1f, 62.1640625, 63.96484375, -3.36794376373291, -1.1584587097167969, 48.12109375};

static int64_t config_int(json_t *config, const char *key) { return json_integer_value(json_object_get(config, key)); }

static void fixture_llama3_sharded(const char *tl_name, const char *fixtures, const fixture_values *want_values) {
    char dir[1024], index[1100], config_path[1100];
    snprintf(dir, sizeof dir, "%s/models/tiny-llama3", fixtures);
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
    snprintf(config_path, sizeof config_path, "%s/config.json", dir);
    json_t *root = json_load_file(index, 0, NULL), *config = json_load_file(config_path, 0, NULL);
    REQUIRE(root && config);
    json_t *map = json_object_get(root, "weight_map");
    size_t expected = json_object_size(map);
    /* config.json: hidden 64, 4 layers, intermediate 160, 8 heads / 2 KV heads, head_dim 8 (both
     * sets); the vocabulary is the set's own. */
    const int64_t V = config_int(config, "vocab_size"), C = config_int(config, "hidden_size");
    const int64_t kv = config_int(config, "num_key_value_heads") * config_int(config, "head_dim");
    const int64_t I = config_int(config, "intermediate_size"), L = config_int(config, "num_hidden_layers");
    json_decref(config);
    CHECK(C == 64 && kv == 16 && I == 160 && L == 4);

    es_weights *w = NULL;
    es_error err = {0};
    int rc = es_weights_open(dir, &w, &err);
    CHECKF(rc == ES_OK, "%s", err.msg);
    if (rc != ES_OK) {
        json_decref(root);
        return;
    }
    CHECK(w->n_files == 3);
    CHECKF(w->n_tensors == expected, "%zu tensors, weight_map has %zu", w->n_tensors, expected);
    const char *name;
    json_t *shard;
    json_object_foreach(map, name, shard) {
        const es_tensor *t = es_weights_find(w, name);
        CHECKF(t != NULL, "%s not found", name);
        if (t) CHECKF(contains(t->file, json_string_value(shard)), "%s in %s", name, t->file);
    }
    json_decref(root);
    for (size_t i = 1; i < w->n_tensors; i++) CHECK(strcmp(w->tensors[i - 1]->name, w->tensors[i]->name) < 0);
    for (size_t f = 0; f < w->n_files; f++) {
        const char *fmt = es_safetensors_meta(w->files[f], "format");
        CHECK(fmt && strcmp(fmt, "pt") == 0);
    }

    const es_tensor *emb = es_weights_find(w, "model.embed_tokens.weight");
    CHECK(shape_is(emb, 2, V, C) && emb->dtype == ES_DT_BF16);
    CHECK(shape_is(es_weights_find(w, "lm_head.weight"), 2, V, C));
    CHECK(shape_is(es_weights_find(w, "model.norm.weight"), 1, C, 0));
    CHECK(es_weights_find(w, "model.layers.4.self_attn.q_proj.weight") == NULL);
    for (int l = 0; l < L; l++) {
        const struct {
            const char *suffix;
            int ndim;
            int64_t d0, d1;
        } want[] = {
            {"self_attn.q_proj.weight", 2, C, C},  {"self_attn.k_proj.weight", 2, kv, C},
            {"self_attn.v_proj.weight", 2, kv, C}, {"self_attn.o_proj.weight", 2, C, C},
            {"mlp.gate_proj.weight", 2, I, C},     {"mlp.up_proj.weight", 2, I, C},
            {"mlp.down_proj.weight", 2, C, I},     {"input_layernorm.weight", 1, C, 0},
            {"post_attention_layernorm.weight", 1, C, 0},
        };
        for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
            char n[256];
            snprintf(n, sizeof n, "model.layers.%d.%s", l, want[k].suffix);
            const es_tensor *t = es_weights_find(w, n);
            CHECKF(shape_is(t, want[k].ndim, want[k].d0, want[k].d1), "%s", n);
            if (t) {
                float *v = malloc(es_tensor_numel(t) * sizeof *v);
                CHECK(es_tensor_to_f32(t, v, &err) == ES_OK);
                for (size_t i = 0; i < es_tensor_numel(t); i++) CHECKF(isfinite(v[i]), "%s[%zu]", n, i);
                free(v);
            }
        }
    }

    /* The first embedding row: bf16 -> f32 is the raw bits shifted left by 16. */
    if (emb) {
        es_tensor row = *emb;
        row.ndim = 1;
        row.shape[0] = C;
        row.nbytes = C * 2;
        float v[64];
        CHECK(es_tensor_to_f32(&row, v, &err) == ES_OK);
        for (int i = 0; i < C; i++) {
            uint16_t raw;
            memcpy(&raw, (const char *)emb->data + 2 * i, 2);
            uint32_t bits = (uint32_t)raw << 16, got;
            memcpy(&got, &v[i], 4);
            CHECKF(got == bits, "element %d", i);
        }
        uint16_t first;
        memcpy(&first, emb->data, 2);
        CHECKF(first == want_values->first_embedding_bits, "first embedding bits 0x%04x", first);
    }
    /* Sums of bf16 in double are exact for the norms. */
    CHECK(sum_f32(es_weights_find(w, "model.layers.0.input_layernorm.weight")) == want_values->llama_norm0);
    CHECK(sum_f32(es_weights_find(w, "model.norm.weight")) == want_values->llama_norm);
    CHECK(fabs(sum_f32(es_weights_find(w, "model.layers.0.self_attn.k_proj.weight")) - want_values->llama_k0) < 1e-9);
    es_weights_close(w);
}

static void fixture_qwen2_single(const char *tl_name, const char *fixtures, const fixture_values *want_values) {
    char dir[1024], file[1100];
    snprintf(dir, sizeof dir, "%s/models/tiny-qwen2", fixtures);
    snprintf(file, sizeof file, "%s/config.json", dir);
    json_t *config = json_load_file(file, 0, NULL);
    REQUIRE(config);
    const int64_t V = config_int(config, "vocab_size");
    json_decref(config);
    snprintf(file, sizeof file, "%s/model.safetensors", dir);

    es_error err = {0};
    es_weights *w = NULL;
    int rc = es_weights_open(dir, &w, &err);
    CHECKF(rc == ES_OK, "%s", err.msg);
    if (rc) return;
    /* hidden 48, 3 layers, intermediate 96, 6 heads / 2 KV heads (head_dim 8), q/k/v biases:
     * embed + lm_head + norm + 3 x 12 per layer. */
    CHECK(w->n_files == 1);
    CHECKF(w->n_tensors == 39, "%zu", w->n_tensors);
    CHECK(shape_is(es_weights_find(w, "model.embed_tokens.weight"), 2, V, 48));
    CHECK(shape_is(es_weights_find(w, "lm_head.weight"), 2, V, 48));
    CHECK(shape_is(es_weights_find(w, "model.layers.0.self_attn.q_proj.weight"), 2, 48, 48));
    CHECK(shape_is(es_weights_find(w, "model.layers.0.self_attn.q_proj.bias"), 1, 48, 0));
    CHECK(shape_is(es_weights_find(w, "model.layers.1.self_attn.k_proj.weight"), 2, 16, 48));
    CHECK(shape_is(es_weights_find(w, "model.layers.1.self_attn.v_proj.bias"), 1, 16, 0));
    CHECK(shape_is(es_weights_find(w, "model.layers.2.mlp.gate_proj.weight"), 2, 96, 48));
    CHECK(shape_is(es_weights_find(w, "model.layers.2.mlp.down_proj.weight"), 2, 48, 96));
    CHECK(es_weights_find(w, "model.layers.3.mlp.down_proj.weight") == NULL);
    CHECK(fabs(sum_f32(es_weights_find(w, "model.layers.0.self_attn.q_proj.bias")) - want_values->qwen_q0_bias) < 1e-9);
    CHECK(sum_f32(es_weights_find(w, "model.norm.weight")) == want_values->qwen_norm);
    es_weights_close(w);

    /* The file path itself works too, through both entry points. */
    CHECK(es_weights_open(file, &w, &err) == ES_OK && w->n_tensors == 39);
    es_weights_close(w);
    es_safetensors *st = NULL;
    CHECK(es_safetensors_open(file, &st, &err) == ES_OK && st->n_tensors == 39);
    if (st) CHECK(es_safetensors_find(st, "model.norm.weight") && !es_safetensors_find(st, "model.norm"));
    es_safetensors_close(st);
}

/* Both checkpoints of the in-repo set, then of the shared one (one SKIP where it is absent). */
static void fixture_sets(void) {
    RUN_AS("fixture_llama3_sharded[repo]", fixture_llama3_sharded(tl_name, test_fixtures(), &repo_values));
    RUN_AS("fixture_qwen2_single[repo]", fixture_qwen2_single(tl_name, test_fixtures(), &repo_values));
    const char *shared = test_shared_fixtures();
    if (!shared) {
        test_skip_shared("safetensors_fixtures");
        return;
    }
    RUN_AS("fixture_llama3_sharded[shared]", fixture_llama3_sharded(tl_name, shared, &shared_values));
    RUN_AS("fixture_qwen2_single[shared]", fixture_qwen2_single(tl_name, shared, &shared_values));
}

/* ---- round trip ---------------------------------------------------------------------- */

TEST(roundtrip_all_dtypes) {
    uint8_t f8[5] = {0x38, 0xb8, 0x00, 0x7f, 0x40}; /* 1, -1, 0, NaN, 2 */
    uint16_t bf16[6] = {0x3f80, 0xc000, 0x0000, 0x3e80, 0x7f80, 0x4040};
    uint16_t f16[4] = {0x3c00, 0xc000, 0x3800, 0x0001};
    float f32[8] = {1.5f, -2.25f, 0, 3e38f, -1e-30f, 7, 8, 9};
    int64_t i64[3] = {-1, INT64_MAX, 42};
    int32_t i32[2] = {-7, 123456};
    uint8_t u8 = 200;
    const int64_t s5[] = {5}, s23[] = {2, 3}, s4[] = {4}, s222[] = {2, 2, 2}, s3[] = {3},
                  s6[] = {1, 1, 1, 1, 1, 2}, s04[] = {0, 4};
    /* F8 first, so every later tensor starts unaligned in the data section. */
    es_tensor in[] = {
        tensor("f8", ES_DT_F8_E4M3, 1, s5, f8),   tensor("bf16.weight", ES_DT_BF16, 2, s23, bf16),
        tensor("f16", ES_DT_F16, 1, s4, f16),      tensor("f32", ES_DT_F32, 3, s222, f32),
        tensor("i64", ES_DT_I64, 1, s3, i64),      tensor("i32", ES_DT_I32, 6, s6, i32),
        tensor("empty", ES_DT_F32, 2, s04, NULL),  tensor("scalar", ES_DT_U8, 0, NULL, &u8),
        tensor("名前 ünicode", ES_DT_U8, 0, NULL, &u8),
    };
    size_t n = sizeof in / sizeof in[0];
    es_meta_kv meta[] = {{"format", "pt"}, {"note", "quote \" and ü"}};
    char *path = test_path("roundtrip.safetensors");
    es_error err = {0};
    int rc = es_safetensors_write(path, in, n, meta, 2, &err);
    REQUIRE(rc == ES_OK);
    CHECK(!exists(test_path("roundtrip.safetensors.partial")));

    /* Layout: header padded with spaces to a multiple of 8, data contiguous. */
    FILE *f = fopen(path, "rb");
    REQUIRE(f);
    unsigned char buf[4096];
    size_t len = fread(buf, 1, sizeof buf, f);
    fclose(f);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | buf[i];
    size_t data_total = 0;
    for (size_t i = 0; i < n; i++) data_total += in[i].nbytes;
    CHECK(hlen % 8 == 0);
    CHECKF(len == 8 + hlen + data_total, "file %zu bytes, header %llu, data %zu", len, (unsigned long long)hlen,
           data_total);
    CHECK(buf[8] == '{');
    CHECK(memcmp(buf + 8, "{\"__metadata__\":{\"format\":\"pt\"", 30) == 0);
    size_t last = 8 + hlen - 1;
    while (buf[last] == ' ') last--;
    CHECK(buf[last] == '}' && 8 + hlen - 1 - last < 8);
    CHECK(memcmp(buf + 8 + hlen, f8, 5) == 0 && memcmp(buf + 8 + hlen + 5, bf16, 12) == 0);

    es_safetensors *st = NULL;
    rc = es_safetensors_open(path, &st, &err);
    CHECKF(rc == ES_OK, "%s", err.msg);
    if (rc) return;
    CHECK(st->n_tensors == n);
    CHECK(st->n_meta == 2 && strcmp(st->meta[0].key, "format") == 0);
    CHECK(es_safetensors_meta(st, "note") && strcmp(es_safetensors_meta(st, "note"), "quote \" and ü") == 0);
    CHECK(es_safetensors_meta(st, "absent") == NULL);
    for (size_t i = 0; i < n; i++) {
        const es_tensor *t = es_safetensors_find(st, in[i].name);
        CHECKF(t != NULL, "%s", in[i].name);
        if (!t) continue;
        CHECKF(t->dtype == in[i].dtype && t->ndim == in[i].ndim && t->nbytes == in[i].nbytes, "%s", in[i].name);
        for (int d = 0; d < t->ndim; d++) CHECK(t->shape[d] == in[i].shape[d]);
        if (t->nbytes) CHECKF(memcmp(t->data, in[i].data, t->nbytes) == 0, "%s data", in[i].name);
        CHECK(strcmp(t->file, path) == 0);
    }

    float v[8];
    CHECK(es_tensor_to_f32(es_safetensors_find(st, "f8"), v, &err) == ES_OK);
    CHECK(v[0] == 1 && v[1] == -1 && v[2] == 0 && isnan(v[3]) && v[4] == 2);
    CHECK(es_tensor_to_f32(es_safetensors_find(st, "bf16.weight"), v, &err) == ES_OK);
    CHECK(v[0] == 1 && v[1] == -2 && v[3] == 0.25f && isinf(v[4]) && v[5] == 3);
    CHECK(es_tensor_to_f32(es_safetensors_find(st, "f16"), v, &err) == ES_OK);
    CHECK(v[0] == 1 && v[1] == -2 && v[2] == 0.5f && v[3] == ldexpf(1, -24));
    CHECK(es_tensor_to_f32(es_safetensors_find(st, "f32"), v, &err) == ES_OK);
    CHECK(memcmp(v, f32, sizeof f32) == 0);
    CHECK(es_tensor_to_f32(es_safetensors_find(st, "empty"), v, &err) == ES_OK);
    CHECK(es_tensor_numel(es_safetensors_find(st, "scalar")) == 1);
    es_error ierr = {0};
    CHECK(es_tensor_to_f32(es_safetensors_find(st, "i32"), v, &ierr) == ES_ERR_DATA);
    CHECK(contains(ierr.msg, "\"i32\"") && contains(ierr.msg, "roundtrip.safetensors"));
    char sh[64];
    CHECK(strcmp(es_tensor_shape_str(es_safetensors_find(st, "f32"), sh, sizeof sh), "[2, 2, 2]") == 0);
    CHECK(strcmp(es_tensor_shape_str(es_safetensors_find(st, "scalar"), sh, sizeof sh), "[]") == 0);
    es_safetensors_close(st);

    /* The memory entry point sees the same. */
    es_safetensors *mem = NULL;
    CHECK(es_safetensors_parse(buf, len, "in-memory", &mem, &err) == ES_OK);
    if (mem) {
        CHECK(mem->n_tensors == n && strcmp(mem->path, "in-memory") == 0);
        const es_tensor *t = es_safetensors_find(mem, "i64");
        CHECK(t && t->data == buf + 8 + hlen + 5 + 12 + 8 + 32);
    }
    es_safetensors_close(mem);

    /* No metadata, no tensors: still a valid (empty) file. */
    char *p2 = test_path("empty.safetensors");
    CHECK(es_safetensors_write(p2, NULL, 0, NULL, 0, &err) == ES_OK);
    CHECK(es_safetensors_open(p2, &st, &err) == ES_OK && st->n_tensors == 0 && st->n_meta == 0);
    es_safetensors_close(st);
}

/* ---- malformed files ----------------------------------------------------------------- */

static const char *GOOD = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}";

TEST(bad_short_file) {
    es_error err = {0};
    es_safetensors *st = NULL;
    char *p = test_path("short.safetensors");
    write_bytes(p, "\x10\0\0", 3);
    CHECK_DATA_ERR(es_safetensors_open(p, &st, &err), err, "short.safetensors", "too short");
    es_error err2 = {0};
    p = test_path("zero.safetensors");
    write_bytes(p, "", 0);
    CHECK_DATA_ERR(es_safetensors_open(p, &st, &err2), err2, "zero.safetensors", "0 bytes");
}

TEST(bad_truncated) {
    es_error err = {0};
    /* Valid header promising 16 bytes of data, file holds 10. */
    CHECK_DATA_ERR(open_raw("truncated.safetensors", GOOD, 10, &err), err, "truncated.safetensors", "\"a\"");
    CHECK(contains(err.msg, "truncated"));
    es_error ok = {0};
    CHECK(open_raw("good.safetensors", GOOD, 16, &ok) == ES_OK);
}

TEST(bad_header_length) {
    es_error err = {0};
    es_safetensors *st = NULL;
    CHECK_DATA_ERR(es_safetensors_open(raw_file("hlen_past.safetensors", GOOD, 1000, 16), &st, &err), err,
                   "hlen_past.safetensors", "past the end");
    es_error err2 = {0};
    CHECK_DATA_ERR(es_safetensors_open(raw_file("hlen_huge.safetensors", GOOD, 1LL << 40, 16), &st, &err2), err2,
                   "hlen_huge.safetensors", "limit");
    es_error err3 = {0};
    CHECK_DATA_ERR(es_safetensors_open(raw_file("hlen_neg.safetensors", GOOD, -2 & 0x7fffffffffffffffLL, 16), &st,
                                       &err3),
                   err3, "hlen_neg.safetensors", "limit");
}

TEST(bad_overlap) {
    es_error err = {0};
    const char *h = "{\"model.embed_tokens.weight\":{\"dtype\":\"U8\",\"shape\":[100],\"data_offsets\":[0,100]},"
                    "\"x\":{\"dtype\":\"U8\",\"shape\":[100],\"data_offsets\":[50,150]}}";
    CHECK_DATA_ERR(open_raw("overlap.safetensors", h, 150, &err), err, "overlap.safetensors",
                   "\"x\": data_offsets [50, 150) overlap tensor \"model.embed_tokens.weight\" [0, 100)");
    /* A tensor inside a larger one that is not its neighbour by begin. */
    es_error err2 = {0};
    h = "{\"big\":{\"dtype\":\"U8\",\"shape\":[100],\"data_offsets\":[0,100]},"
        "\"small\":{\"dtype\":\"U8\",\"shape\":[10],\"data_offsets\":[10,20]},"
        "\"inner\":{\"dtype\":\"U8\",\"shape\":[10],\"data_offsets\":[60,70]},"
        "\"after\":{\"dtype\":\"U8\",\"shape\":[10],\"data_offsets\":[100,110]}}";
    CHECK_DATA_ERR(open_raw("overlap2.safetensors", h, 110, &err2), err2, "overlap2.safetensors", "\"big\"");
    /* Adjacent ranges and empty tensors do not overlap. */
    es_error ok = {0};
    h = "{\"a\":{\"dtype\":\"U8\",\"shape\":[10],\"data_offsets\":[0,10]},"
        "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[5,5]},"
        "\"b\":{\"dtype\":\"U8\",\"shape\":[10],\"data_offsets\":[10,20]}}";
    CHECKF(open_raw("adjacent.safetensors", h, 20, &ok) == ES_OK, "%s", ok.msg);
}

TEST(bad_unknown_dtype) {
    es_error err = {0};
    CHECK_DATA_ERR(open_raw("f64.safetensors", "{\"w\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16,
                            &err),
                   err, "f64.safetensors", "tensor \"w\": unsupported dtype \"F64\"");
}

TEST(bad_shape_size_mismatch) {
    es_error err = {0};
    CHECK_DATA_ERR(open_raw("mismatch.safetensors", "{\"w\":{\"dtype\":\"BF16\",\"shape\":[3,2],\"data_offsets\":[0,16]}}",
                            16, &err),
                   err, "mismatch.safetensors", "tensor \"w\"");
    CHECK(contains(err.msg, "12 bytes"));
}

TEST(bad_utf8_name) {
    es_error err = {0};
    CHECK_DATA_ERR(open_raw("utf8.safetensors", "{\"w\xff\xfe\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
                            &err),
                   err, "utf8.safetensors", "not valid UTF-8 at byte offset 3");
    es_error e2 = {0}, e3 = {0};
    /* Overlong '/' and an encoded surrogate are ill-formed too. */
    CHECK_DATA_ERR(open_raw("overlong.safetensors", "{\"\xc0\xaf\":{}}", 0, &e2), e2, "overlong.safetensors", "UTF-8");
    CHECK_DATA_ERR(open_raw("surrogate.safetensors", "{\"\xed\xa0\x80\":{}}", 0, &e3), e3, "surrogate.safetensors",
                   "UTF-8");
}

TEST(bad_json) {
    es_error err = {0};
    CHECK_DATA_ERR(open_raw("json.safetensors", "{\"w\":{\"dtype\":\"U8\",\n\"shape\":[1] \"data_offsets\":[0,1]}}", 1,
                            &err),
                   err, "json.safetensors", "line 2");
    es_error e2 = {0}, e3 = {0};
    CHECK_DATA_ERR(open_raw("array.safetensors", "[1, 2]", 0, &e2), e2, "array.safetensors", "not a JSON object");
    CHECK_DATA_ERR(open_raw("hempty.safetensors", "", 0, &e3), e3, "hempty.safetensors", "not valid JSON");
}

TEST(bad_duplicate_key) {
    es_error err = {0};
    CHECK_DATA_ERR(open_raw("dup.safetensors",
                            "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                            "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                            2, &err),
                   err, "dup.safetensors", "w");
    CHECK(contains(err.msg, "duplicate"));
}

TEST(bad_entries) {
    static const struct {
        const char *header, *want;
    } cases[] = {
        {"{\"w\":[1]}", "entry is not an object"},
        {"{\"w\":{\"shape\":[1],\"data_offsets\":[0,1]}}", "\"dtype\" is missing"},
        {"{\"w\":{\"dtype\":8,\"shape\":[1],\"data_offsets\":[0,1]}}", "\"dtype\" is missing or not a string"},
        {"{\"w\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", "\"shape\" is missing"},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]}}", "shape[0]"},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1.0],\"data_offsets\":[0,1]}}", "shape[0]"},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", "9 dimensions"},
        {"{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,1]}}", "overflows"},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1]}}", "\"data_offsets\""},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0]}}", "\"data_offsets\""},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", "\"data_offsets\""},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}}", "\"data_offsets\""},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[\"0\",1]}}", "\"data_offsets\""},
        {"{\"w\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[1,0]}}", "begin is after end"},
        {"{\"\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "empty name"},
        {"{\"__metadata__\":{\"k\":1}}", "__metadata__ \"k\" is not a string"},
        {"{\"__metadata__\":[]}", "__metadata__ is not an object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "entry%zu.safetensors", i);
        es_error err = {0};
        int rc = open_raw(name, cases[i].header, 4, &err);
        CHECK_DATA_ERR(rc, err, name, cases[i].want);
        if (strncmp(cases[i].header, "{\"w\"", 4) == 0) CHECKF(contains(err.msg, "tensor \"w\""), "%s", err.msg);
    }
    es_error ok = {0};
    CHECKF(open_raw("metanull.safetensors", "{\"__metadata__\":null}", 0, &ok) == ES_OK, "%s", ok.msg);
}

TEST(bad_not_a_file) {
    es_error err = {0}, e2 = {0};
    es_safetensors *st = NULL;
    CHECK_DATA_ERR(es_safetensors_open(test_path("nonexistent.safetensors"), &st, &err), err, "nonexistent.safetensors",
                   "");
    CHECK_DATA_ERR(es_safetensors_open(test_tmpdir(), &st, &e2), e2, test_tmpdir(), "not a regular file");
}

/* ---- model folders ------------------------------------------------------------------- */

static char *model_dir(const char *name) {
    char *d = test_path(name);
    mkdir(d, 0755);
    return d;
}

static void write_shard(const char *dir, const char *file, const char *tensor_name) {
    char path[1100];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    float v[2] = {1, 2};
    const int64_t s[] = {2};
    es_tensor t = tensor(tensor_name, ES_DT_F32, 1, s, v);
    es_error err = {0};
    if (es_safetensors_write(path, &t, 1, NULL, 0, &err)) {
        printf("write_shard: %s\n", err.msg);
        exit(1);
    }
}

static void write_index(const char *dir, const char *weight_map) {
    char path[1100], text[2048];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    snprintf(text, sizeof text, "{\"metadata\": {\"total_size\": 8}, \"weight_map\": %s}", weight_map);
    write_bytes(path, text, strlen(text));
}

static int open_dir(const char *dir, es_error *err) {
    es_weights *w = NULL;
    int rc = es_weights_open(dir, &w, err);
    es_weights_close(w);
    return rc;
}

TEST(index_valid) {
    char *d = model_dir("idx_ok");
    write_shard(d, "a.safetensors", "x");
    write_shard(d, "b.safetensors", "y");
    write_index(d, "{\"x\": \"a.safetensors\", \"y\": \"b.safetensors\"}");
    es_weights *w = NULL;
    es_error err = {0};
    int rc = es_weights_open(d, &w, &err);
    CHECKF(rc == ES_OK, "%s", err.msg);
    if (rc) return;
    CHECK(w->n_files == 2 && w->n_tensors == 2);
    const es_tensor *y = es_weights_find(w, "y");
    CHECK(y && contains(y->file, "b.safetensors") && !es_weights_find(w, "z"));
    es_weights_close(w);
}

TEST(index_shard_outside_folder) {
    static const char *bad[] = {"../x", "/abs.safetensors", "sub/x.safetensors", "..\\x.safetensors", "..", ".", ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char dname[32], map[256], shard_json[64];
        snprintf(dname, sizeof dname, "idx_out%zu", i);
        char *d = model_dir(dname);
        /* JSON-escape the backslash. */
        size_t k = 0;
        for (const char *c = bad[i]; *c && k < sizeof shard_json - 2; c++) {
            if (*c == '\\') shard_json[k++] = '\\';
            shard_json[k++] = *c;
        }
        shard_json[k] = '\0';
        snprintf(map, sizeof map, "{\"x\": \"%s\"}", shard_json);
        write_index(d, map);
        es_error err = {0};
        char want[128];
        snprintf(want, sizeof want, "shard \"%s\" is outside the model folder", bad[i]);
        CHECK_DATA_ERR(open_dir(d, &err), err, "model.safetensors.index.json", want);
    }
    char *d = model_dir("idx_suffix");
    write_index(d, "{\"x\": \"config.json\"}");
    es_error err = {0};
    CHECK_DATA_ERR(open_dir(d, &err), err, "model.safetensors.index.json", "shard \"config.json\"");
}

TEST(index_tensor_missing_from_shard) {
    char *d = model_dir("idx_missing_tensor");
    write_shard(d, "a.safetensors", "x");
    write_index(d, "{\"x\": \"a.safetensors\", \"ghost\": \"a.safetensors\"}");
    es_error err = {0};
    CHECK_DATA_ERR(open_dir(d, &err), err, "model.safetensors.index.json",
                   "tensor \"ghost\" is not in shard \"a.safetensors\"");
}

TEST(index_missing_shard_file) {
    char *d = model_dir("idx_missing_shard");
    write_shard(d, "a.safetensors", "x");
    write_index(d, "{\"x\": \"a.safetensors\", \"y\": \"model-00002-of-00002.safetensors\"}");
    es_error err = {0};
    CHECK_DATA_ERR(open_dir(d, &err), err, "model.safetensors.index.json", "model-00002-of-00002.safetensors");
}

TEST(index_tensor_in_two_shards) {
    /* Both shards hold "x"; the index lists it once. */
    char *d3 = model_dir("idx_twice3");
    float v[2] = {1, 2};
    const int64_t s[] = {2};
    es_tensor ts[2] = {tensor("x", ES_DT_F32, 1, s, v), tensor("y", ES_DT_F32, 1, s, v)};
    char p[1100];
    snprintf(p, sizeof p, "%s/a.safetensors", d3);
    es_error we = {0};
    CHECK(es_safetensors_write(p, ts, 2, NULL, 0, &we) == ES_OK);
    write_shard(d3, "b.safetensors", "x");
    write_index(d3, "{\"y\": \"a.safetensors\", \"x\": \"b.safetensors\"}");
    es_error e3 = {0};
    CHECK_DATA_ERR(open_dir(d3, &e3), e3, "tensor \"x\" is in two shards", "a.safetensors");
}

TEST(index_malformed) {
    char *d = model_dir("idx_badjson");
    write_bytes(test_path("idx_badjson/model.safetensors.index.json"), "{\"weight_map\": {", 16);
    es_error err = {0};
    CHECK_DATA_ERR(open_dir(d, &err), err, "model.safetensors.index.json", "JSON");
    d = model_dir("idx_nomap");
    write_bytes(test_path("idx_nomap/model.safetensors.index.json"), "{}", 2);
    es_error e2 = {0};
    CHECK_DATA_ERR(open_dir(d, &e2), e2, "model.safetensors.index.json", "weight_map");
    d = model_dir("idx_nonstring");
    write_index(d, "{\"x\": 3}");
    es_error e3 = {0};
    CHECK_DATA_ERR(open_dir(d, &e3), e3, "model.safetensors.index.json", "\"x\"");
}

TEST(weights_no_model) {
    char *d = model_dir("empty_model");
    es_error err = {0};
    CHECK_DATA_ERR(open_dir(d, &err), err, "empty_model", "no model.safetensors or model.safetensors.index.json in");
    es_error e2 = {0};
    CHECK_DATA_ERR(open_dir(test_path("no_such_folder"), &e2), e2, "no_such_folder", "");
    /* A bad shard's own message comes through unchanged. */
    char *d3 = model_dir("single_bad");
    write_bytes(test_path("single_bad/model.safetensors"), "abc", 3);
    es_error e3 = {0};
    CHECK_DATA_ERR(open_dir(d3, &e3), e3, "single_bad/model.safetensors", "too short");
}

/* ---- writer ----------------------------------------------------------------------------- */

TEST(write_failures_leave_nothing) {
    float v[4] = {1, 2, 3, 4};
    const int64_t s[] = {4}, s2[] = {2};
    es_tensor t = tensor("w", ES_DT_F32, 1, s, v);
    es_error err = {0};

    char *p = test_path("no_such_dir/out.safetensors");
    CHECK(es_safetensors_write(p, &t, 1, NULL, 0, &err) == ES_ERR_RUNTIME);
    CHECK(contains(err.msg, "no_such_dir/out.safetensors.partial"));
    CHECK(!exists(p));

    p = test_path("nulldata.safetensors");
    es_tensor bad = tensor("w", ES_DT_F32, 1, s, NULL);
    es_error e2 = {0};
    CHECK_DATA_ERR(es_safetensors_write(p, &bad, 1, NULL, 0, &e2), e2, "nulldata.safetensors", "\"w\"");
    CHECK(!exists(p) && !exists(test_path("nulldata.safetensors.partial")));

    es_tensor wrong = tensor("w", ES_DT_F32, 1, s2, v);
    wrong.nbytes = 12;
    es_error e3 = {0};
    CHECK(es_safetensors_write(p, &wrong, 1, NULL, 0, &e3) == ES_ERR_DATA);
    es_tensor dup[2] = {t, t};
    es_error e4 = {0};
    CHECK(es_safetensors_write(p, dup, 2, NULL, 0, &e4) == ES_ERR_DATA && contains(e4.msg, "twice"));
    es_tensor reserved = tensor("__metadata__", ES_DT_F32, 1, s, v);
    es_error e5 = {0};
    CHECK(es_safetensors_write(p, &reserved, 1, NULL, 0, &e5) == ES_ERR_DATA);
    CHECK(!exists(p));

    /* A failure in the middle of writing the data (file size limit): the .partial is
     * removed and a file already under PATH is left as it was. */
    p = test_path("efbig.safetensors");
    write_bytes(p, "old", 3);
    size_t big_n = 1 << 18;
    float *big = calloc(big_n, sizeof *big);
    const int64_t sb[] = {(int64_t)big_n};
    es_tensor bt = tensor("big", ES_DT_F32, 1, sb, big);
    struct rlimit old;
    getrlimit(RLIMIT_FSIZE, &old);
    struct rlimit lim = {65536, old.rlim_max};
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    if (setrlimit(RLIMIT_FSIZE, &lim) == 0) {
        es_error e6 = {0};
        int rc = es_safetensors_write(p, &bt, 1, NULL, 0, &e6);
        setrlimit(RLIMIT_FSIZE, &old);
        CHECKF(rc == ES_ERR_RUNTIME, "rc %d: %s", rc, e6.msg);
        CHECK(contains(e6.msg, "efbig.safetensors.partial") && contains(e6.msg, "write failed"));
        CHECK(!exists(test_path("efbig.safetensors.partial")));
        struct stat st;
        CHECK(stat(p, &st) == 0 && st.st_size == 3);
    }
    signal(SIGXFSZ, prev);
    /* Without the limit the same write replaces the old file. */
    es_error e7 = {0};
    CHECK(es_safetensors_write(p, &bt, 1, NULL, 0, &e7) == ES_OK);
    struct stat st;
    CHECK(stat(p, &st) == 0 && (size_t)st.st_size > big_n * 4);
    free(big);
}

int main(void) {
    fixture_sets();
    RUN(roundtrip_all_dtypes);
    RUN(bad_short_file);
    RUN(bad_truncated);
    RUN(bad_header_length);
    RUN(bad_overlap);
    RUN(bad_unknown_dtype);
    RUN(bad_shape_size_mismatch);
    RUN(bad_utf8_name);
    RUN(bad_json);
    RUN(bad_duplicate_key);
    RUN(bad_entries);
    RUN(bad_not_a_file);
    RUN(index_valid);
    RUN(index_shard_outside_folder);
    RUN(index_tensor_missing_from_shard);
    RUN(index_missing_shard_file);
    RUN(index_tensor_in_two_shards);
    RUN(index_malformed);
    RUN(weights_no_model);
    RUN(write_failures_leave_nothing);
    return test_summary();
}
