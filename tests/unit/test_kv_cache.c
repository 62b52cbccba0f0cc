/* The decoder's key/value cache (kernels/decoder.h): a sequence fed in pieces (a prompt, then one
 * token at a time, then a longer piece), two sequences side by side in swapped slots, gives the
 * final norm's rows of one uncached forward over the whole sequence, to fp32 rounding; a cleared
 * slot starts again at position 0; a full slot, a shared slot and a training decoder are errors. */
#include <math.h>

#include "../testlib.h"
#include "decoder.h"
#include "goldens.h"
#include "model.h"
#include "stream.h"
#include "test_device.h"

#define TOLERANCE 1e-5

typedef struct model_run {
    es_model_store store;
    es_device *dev;
    es_decoder *decoder;
    es_layer_stream *layers;
    float *final_norm; // (C)
    int C;
} model_run;

static void open_run(const char *tl_name, model_run *r, const char *dir, int max_tokens, int max_seq) {
    es_error err = {0};
    REQUIRE(es_model_open(dir, -1, 1, &r->store, &err) == ES_OK);
    r->dev = test_cpu_device(2);
    r->C = r->store.config.hidden_size;
    REQUIRE(es_decoder_create(&r->decoder, r->dev, &r->store.config, max_tokens, max_seq, 0, &err) == ES_OK);
    es_workspace_plan plan = {0};
    es_decoder_plan(r->decoder, &plan);
    REQUIRE(es_device_reserve(r->dev, &plan, &err) == ES_OK);
    REQUIRE(es_device_alloc(r->dev, (size_t)r->C * sizeof(float), (void **)&r->final_norm, "final norm", &err) == ES_OK);
    REQUIRE(es_tensor_to_f32(r->store.final_norm, r->final_norm, &err) == ES_OK);
    REQUIRE(es_stream_open(&r->layers, r->dev, &r->store, r->store.config.n_layers, &err) == ES_OK);
}

static void close_run(model_run *r) {
    es_stream_close(r->layers);
    es_decoder_free(r->decoder);
    es_device_free(r->dev, r->final_norm, (size_t)r->C * sizeof(float));
    es_device_close(r->dev);
    es_model_close(&r->store);
}

static int forward(model_run *r, const es_decoder_batch *batch, es_error *err) {
    return es_decoder_forward(r->decoder, batch, r->store.embed->data, r->store.embed->dtype, r->layers, r->store.config.n_layers,
                              r->final_norm, NULL, NULL, err);
}

static int32_t *golden_ids(const es_safetensors *goldens, const char *seq, size_t *T) {
    float *values = golden_f32(goldens, seq, "input_ids", T);
    if (!values) return NULL;
    int32_t *ids = malloc(*T * sizeof *ids);
    for (size_t t = 0; t < *T; t++) ids[t] = (int32_t)values[t];
    free(values);
    return ids;
}

static void check_model(const char *tl_name, const char *name) {
    char dir[800], goldens_path[900];
    snprintf(dir, sizeof dir, "%s/models/%s", test_fixtures(), name);
    snprintf(goldens_path, sizeof goldens_path, "%s/golden_hidden.safetensors", dir);
    FILE *probe = fopen(goldens_path, "r");
    if (!probe) SKIP("%s not found (set ESSENCE_FIXTURES)", goldens_path);
    fclose(probe);
    es_error err = {0};
    es_safetensors *goldens = NULL;
    REQUIRE(es_safetensors_open(goldens_path, &goldens, &err) == ES_OK);
    size_t TA, TB;
    int32_t *a = golden_ids(goldens, "seq3", &TA), *b = golden_ids(goldens, "seq2", &TB);
    REQUIRE(a && b);
    es_safetensors_close(goldens);
    const int max_seq = (int)(TA > TB ? TA : TB);
    model_run r;
    open_run(tl_name, &r, dir, (int)(TA + TB), max_seq);
    const int C = r.C;

    /* the references: each sequence alone, uncached */
    float *whole_a = malloc(TA * C * sizeof(float)), *whole_b = malloc(TB * C * sizeof(float));
    const int32_t start_a[2] = {0, (int)TA}, start_b[2] = {0, (int)TB};
    CHECKF(forward(&r, &(es_decoder_batch){.ids = a, .seq_start = start_a, .n_seqs = 1}, &err) == ES_OK, "%s", err.msg);
    memcpy(whole_a, es_decoder_normed(r.decoder), TA * C * sizeof(float));
    CHECKF(forward(&r, &(es_decoder_batch){.ids = b, .seq_start = start_b, .n_seqs = 1}, &err) == ES_OK, "%s", err.msg);
    memcpy(whole_b, es_decoder_normed(r.decoder), TB * C * sizeof(float));

    /* both in pieces, side by side: A in slot 1, B in slot 0 of a three-slot cache */
    es_kv_cache *cache;
    REQUIRE(es_kv_cache_create(&cache, r.dev, &r.store.config, r.store.config.n_layers, 3, max_seq, &err) == ES_OK);
    const int cuts[] = {40, 41, 42, 43, 44, 100, 101, max_seq}; /* piece ends: a prompt, single tokens, longer pieces */
    double worst = 0;
    int done_a = 0, done_b = 0;
    for (int round = 0; round < 2; round++) {
        done_a = done_b = 0;
        if (round) es_kv_cache_clear(cache, 1), es_kv_cache_clear(cache, 0); /* the second round reuses the slots */
        for (size_t piece = 0; piece < sizeof cuts / sizeof *cuts; piece++) {
            const int end_a = cuts[piece] < (int)TA ? cuts[piece] : (int)TA, end_b = cuts[piece] < (int)TB ? cuts[piece] : (int)TB;
            const int na = end_a - done_a, nb = end_b - done_b;
            int32_t ids[2 * 300], seq_start[3] = {0, na, na + nb}, slots[2] = {1, 0};
            memcpy(ids, a + done_a, (size_t)na * sizeof *ids), memcpy(ids + na, b + done_b, (size_t)nb * sizeof *ids);
            CHECKF(es_kv_cache_length(cache, 1) == done_a && es_kv_cache_length(cache, 0) == done_b, "lengths %d %d",
                   es_kv_cache_length(cache, 1), es_kv_cache_length(cache, 0));
            const es_decoder_batch batch = {.ids = ids, .seq_start = seq_start, .n_seqs = 2, .cache = cache, .slots = slots};
            CHECKF(forward(&r, &batch, &err) == ES_OK, "%s", err.msg);
            const float *normed = es_decoder_normed(r.decoder);
            double error_a = golden_relative_error(normed, whole_a + (size_t)done_a * C, (size_t)na * C);
            double error_b = golden_relative_error(normed + (size_t)na * C, whole_b + (size_t)done_b * C, (size_t)nb * C);
            if (na && error_a > worst) worst = error_a;
            if (nb && error_b > worst) worst = error_b;
            done_a = end_a, done_b = end_b;
        }
    }
    CHECKF(worst <= TOLERANCE, "%s: cached pieces differ from the whole forward by %.3g", name, worst);
    printf("  %s: %zu and %zu tokens in 8 pieces, twice: worst relative error %.2e\n", name, TA, TB, worst);

    /* a full slot, a shared slot */
    int32_t one = a[0], two[2] = {a[0], a[1]}, one_start[2] = {0, 1}, two_start[3] = {0, 1, 2}, full[1] = {1}, shared[2] = {2, 2};
    err = (es_error){0};
    CHECK(forward(&r, &(es_decoder_batch){.ids = &one, .seq_start = one_start, .n_seqs = 1, .cache = cache, .slots = full}, &err) ==
          ES_ERR_RUNTIME);
    CHECKF(strstr(err.msg, "cache slot 1") != NULL, "%s", err.msg);
    err = (es_error){0};
    CHECK(forward(&r, &(es_decoder_batch){.ids = two, .seq_start = two_start, .n_seqs = 2, .cache = cache, .slots = shared}, &err) ==
          ES_ERR_RUNTIME);
    CHECKF(strstr(err.msg, "share cache slot 2") != NULL, "%s", err.msg);
    CHECK(es_kv_cache_length(cache, 2) == 0);
    es_kv_cache_free(cache);
    free(whole_a), free(whole_b), free(a), free(b);
    close_run(&r);
}

TEST(cached_pieces_tiny_llama3) { check_model(tl_name, "tiny-llama3"); }
TEST(cached_pieces_tiny_qwen2) { check_model(tl_name, "tiny-qwen2"); }

/* A training decoder keeps every activation for the backward: it takes no cache. */
TEST(training_decoder_refuses_a_cache) {
    char dir[800];
    snprintf(dir, sizeof dir, "%s/models/tiny-qwen2", test_fixtures());
    es_error err = {0};
    es_model_store store;
    if (es_model_open(dir, -1, 1, &store, &err) != ES_OK) SKIP("%s: %s", dir, err.msg);
    es_device *dev = test_cpu_device(1);
    es_decoder *decoder;
    es_kv_cache *cache;
    REQUIRE(es_decoder_create(&decoder, dev, &store.config, 4, 4, 1, &err) == ES_OK);
    REQUIRE(es_kv_cache_create(&cache, dev, &store.config, 1, 1, 4, &err) == ES_OK);
    es_layer_stream *layers;
    REQUIRE(es_stream_open(&layers, dev, &store, 1, &err) == ES_OK);
    int32_t ids[1] = {3}, seq_start[2] = {0, 1}, slots[1] = {0};
    const es_decoder_batch batch = {.ids = ids, .seq_start = seq_start, .n_seqs = 1, .cache = cache, .slots = slots};
    CHECK(es_decoder_forward(decoder, &batch, store.embed->data, store.embed->dtype, layers, 1, NULL, NULL, NULL, &err) ==
          ES_ERR_RUNTIME);
    CHECKF(strstr(err.msg, "training") != NULL, "%s", err.msg);
    es_stream_close(layers);
    es_kv_cache_free(cache);
    es_decoder_free(decoder);
    es_device_close(dev);
    es_model_close(&store);
}

int main(void) {
    RUN(cached_pieces_tiny_llama3);
    RUN(cached_pieces_tiny_qwen2);
    RUN(training_decoder_refuses_a_cache);
    return test_summary();
}
