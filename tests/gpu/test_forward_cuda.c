/* GPU check (tests/gpu/run.sh): golden parity of the decoder on the CUDA device. For tiny-llama3
 * and tiny-qwen2, every golden tensor (embedding output, each layer, final norm) of every golden
 * sequence within max |ours - golden| / max |golden| <= 2e-2 (bf16 weights and bf16 tensor-core
 * inputs against Hugging Face's fp32 goldens: docs/engine.md "CUDA"), with the layers resident;
 * and for the first sequence streamed through two slots and through one as well: the same bits
 * all three ways. Prints one SKIP when no CUDA device opens. */
#include <math.h>

#include "../testlib.h"
#include "../unit/goldens.h"
#include "decoder.h"
#include "model.h"
#include "safetensors.h"
#include "stream.h"

#define TOLERANCE 2e-2

typedef struct forward_result {
    float **hidden; /* [n_layers + 1] (T, C) host */
    float *final;   /* (T, C) host */
    int slots;
    size_t used;    /* device memory held before the layers came in */
} forward_result;

typedef struct keep_layers {
    es_device *dev;
    float **pinned; /* [n_layers + 1] (T, C) host, es_device_host_alloc */
    int C;
} keep_layers;

/* As essence-extract keeps its layers: each copy starts after the layer and lands while the next
 * ones compute (no wait for the device until the forward is queued), so that the layer stream's
 * copies and the compute overlap as they do there. */
static int keep_layer(void *ctx, int layer, const float *hidden, int T, es_error *err) {
    keep_layers *keep = ctx;
    const size_t bytes = (size_t)T * keep->C * sizeof(float);
    keep->pinned[layer] = es_device_host_alloc(keep->dev, bytes);
    if (!keep->pinned[layer]) return es_fail(err, ES_ERR_RUNTIME, "out of pinned memory");
    return es_device_download_begin(keep->dev, keep->pinned[layer], hidden, bytes, err);
}

static void free_result(forward_result *r, int n_layers) {
    for (int l = 0; r->hidden && l <= n_layers; l++) free(r->hidden[l]);
    free(r->hidden), free(r->final);
}

/* The bytes of one layer in the stream's slots (bf16, every tensor padded to 256 bytes). */
static size_t layer_bytes(const es_model_store *store) {
    size_t bytes = 0;
    for (int part = 0; part < ES_LAYER_PARTS; part++)
        if (store->layers[0].part[part]) bytes += (es_tensor_numel(store->layers[0].part[part]) * 2 + 255) / 256 * 256;
    return bytes;
}

/* One forward of ids through every layer on a CUDA device of max_memory (0: automatic); the
 * embedding comes from the checkpoint's mapping, as essence-extract reads it. */
static int run_forward(const es_model_store *store, size_t max_memory, const int32_t *ids, int T, forward_result *out,
                       es_error *err) {
    const es_model_config *c = &store->config;
    memset(out, 0, sizeof *out);
    out->hidden = calloc((size_t)c->n_layers + 1, sizeof *out->hidden);
    out->final = malloc((size_t)T * c->hidden_size * sizeof(float));
    es_device_options options = {.kind = ES_DEVICE_CUDA, .max_memory = max_memory};
    es_device *dev;
    int rc = es_device_open(&dev, &options, err);
    if (rc) return rc;
    es_decoder *decoder = NULL;
    es_layer_stream *layers = NULL;
    void *final_norm = NULL;
    float *norm_f32 = malloc((size_t)c->hidden_size * sizeof *norm_f32);
    rc = norm_f32 ? es_decoder_create(&decoder, dev, c, T, T, 0, err) : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    es_workspace_plan plan = {0};
    if (!rc) es_decoder_plan(decoder, &plan), rc = es_device_reserve(dev, &plan, err);
    const size_t layer_out = (size_t)T * c->hidden_size * sizeof(float);
    if (!rc) rc = es_device_download_reserve(dev, ((size_t)c->n_layers + 1) * layer_out, err);
    const size_t norm_bytes = (size_t)c->hidden_size * es_dtype_size(dev->weight_dtype);
    if (!rc) rc = es_device_alloc(dev, norm_bytes, &final_norm, "the final norm", err);
    if (!rc) rc = es_tensor_to_f32(store->final_norm, norm_f32, err);
    if (!rc) rc = es_device_upload_weights(dev, final_norm, norm_f32, (size_t)c->hidden_size, err);
    out->used = dev->used;
    if (!rc) rc = es_stream_open(&layers, dev, store, c->n_layers, err);
    const int32_t seq_start[2] = {0, T};
    const es_decoder_batch batch = {.ids = ids, .seq_start = seq_start, .n_seqs = 1};
    keep_layers keep = {dev, calloc((size_t)c->n_layers + 1, sizeof(float *)), c->hidden_size};
    if (!rc) rc = keep.pinned ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) rc = es_decoder_forward(decoder, &batch, store->embed->data, store->embed->dtype, layers, c->n_layers, final_norm,
                                     keep_layer, &keep, err);
    es_error copies_err = {0};
    const int copies_rc = es_device_download_wait(dev, &copies_err); /* also after a failure: no copy may still land */
    if (!rc && copies_rc) rc = copies_rc, *err = copies_err;
    for (int l = 0; keep.pinned && l <= c->n_layers; l++) {
        if (!rc && keep.pinned[l] && (out->hidden[l] = malloc(layer_out))) memcpy(out->hidden[l], keep.pinned[l], layer_out);
        if (keep.pinned[l]) es_device_host_free(dev, keep.pinned[l]);
    }
    free(keep.pinned);
    if (!rc) rc = es_device_download(dev, out->final, es_decoder_normed(decoder), (size_t)T * c->hidden_size * sizeof(float), err);
    out->slots = layers ? es_stream_slots(layers) : -1;
    es_stream_close(layers);
    es_decoder_free(decoder);
    es_device_free(dev, final_norm, norm_bytes);
    free(norm_f32);
    es_device_close(dev);
    return rc;
}

static int same_result(const forward_result *a, const forward_result *b, int n_layers, size_t TC) {
    int same = !memcmp(a->final, b->final, TC * sizeof(float));
    for (int l = 0; l <= n_layers; l++) same &= a->hidden[l] && b->hidden[l] && !memcmp(a->hidden[l], b->hidden[l], TC * sizeof(float));
    return same;
}

static void check_model(const char *tl_name, const char *name) {
    char dir[800], goldens_path[900];
    snprintf(dir, sizeof dir, "%s/models/%s", test_fixtures(), name);
    snprintf(goldens_path, sizeof goldens_path, "%s/golden_hidden.safetensors", dir);
    es_device_options probe_options = {.kind = ES_DEVICE_CUDA};
    es_device *probe;
    es_error err = {0};
    if (es_device_open(&probe, &probe_options, &err)) SKIP("no CUDA device: %s", err.msg);
    es_device_close(probe);
    es_model_store store;
    REQUIRE(es_model_open(dir, -1, 1, &store, &err) == ES_OK);
    es_safetensors *goldens = NULL;
    REQUIRE(es_safetensors_open(goldens_path, &goldens, &err) == ES_OK);
    const int C = store.config.hidden_size, L = store.config.n_layers;
    const size_t one_layer = layer_bytes(&store);
    for (int s = 0; s < 4; s++) {
        char seq[16];
        snprintf(seq, sizeof seq, "seq%d", s);
        size_t T = 0, n = 0;
        float *ids_f = golden_f32(goldens, seq, "input_ids", &T);
        REQUIRE(ids_f);
        int32_t *ids = malloc(T * sizeof *ids);
        for (size_t t = 0; t < T; t++) ids[t] = (int32_t)ids_f[t];
        forward_result resident;
        CHECKF(run_forward(&store, 0, ids, (int)T, &resident, &err) == ES_OK, "%s", err.msg);
        /* Streamed layers: on the first sequence only, since how layers travel does not depend on
         * the tokens (and the emulated backend takes seconds a forward). */
        if (s == 0) {
            forward_result two_slots, one_slot;
            CHECKF(run_forward(&store, resident.used + 2 * one_layer + one_layer / 2, ids, (int)T, &two_slots, &err) == ES_OK, "%s",
                   err.msg);
            CHECKF(run_forward(&store, resident.used + one_layer + one_layer / 2, ids, (int)T, &one_slot, &err) == ES_OK, "%s", err.msg);
            CHECKF(resident.slots == 0 && two_slots.slots == 2 && one_slot.slots == 1, "slots %d %d %d", resident.slots, two_slots.slots,
                   one_slot.slots);
            CHECKF(same_result(&resident, &two_slots, L, T * C) && same_result(&resident, &one_slot, L, T * C),
                   "%s %s: streamed layers give other bits than resident ones", name, seq);
            free_result(&two_slots, L), free_result(&one_slot, L);
        }
        double worst = 0;
        char worst_name[64] = "";
        for (int l = 0; l <= L + 1; l++) {
            char what[32];
            if (l == 0) snprintf(what, sizeof what, "embed");
            else if (l <= L) snprintf(what, sizeof what, "layer%02d", l);
            else snprintf(what, sizeof what, "final_norm");
            float *golden = golden_f32(goldens, seq, what, &n);
            CHECKF(golden != NULL, "%s: no golden %s/%s", name, seq, what);
            if (!golden) continue;
            const float *ours = l <= L ? resident.hidden[l] : resident.final;
            const double error = ours ? golden_relative_error(ours, golden, T * C) : INFINITY;
            if (error > worst || isnan(error)) worst = error, snprintf(worst_name, sizeof worst_name, "%s/%s", seq, what);
            free(golden);
        }
        CHECKF(worst <= TOLERANCE, "%s: worst %s relative error %.3g (tolerance %g)", name, worst_name, worst, TOLERANCE);
        printf("  %s %s (T=%zu): worst relative error %.2e (%s)\n", name, seq, T, worst, worst_name);
        free_result(&resident, L);
        free(ids_f), free(ids);
    }
    es_safetensors_close(goldens);
    es_model_close(&store);
}

TEST(cuda_tiny_llama3_goldens) { check_model(tl_name, "tiny-llama3"); }
TEST(cuda_tiny_qwen2_goldens) { check_model(tl_name, "tiny-qwen2"); }

int main(void) {
    RUN(cuda_tiny_llama3_goldens);
    RUN(cuda_tiny_qwen2_goldens);
    return test_summary();
}
