/* GPU benchmark (tests/gpu/run.sh): the 70B shape cut to 8 layers, weights in host memory
 * streamed through the layer stream (kernels/stream.h) under --max-memory 16G, beside
 * ../shared/tools/gpu_offload_baselines.py's hand-written PyTorch streaming loop (4 × 4096
 * tokens, double-buffered pinned uploads); then the same run with the 8 layers resident (the
 * automatic budget holds them all), the floor without transfers.
 *   bench_stream OUT_DIR CONFIG   (CONFIG: the 70B config.json or its folder)
 * Writes OUT_DIR/bench_stream.json (flat keys; stream_* named as the baseline's) and one line per
 * figure. No CUDA device: "SKIP bench_stream: ..." and exit 0.
 *
 * The checkpoint is made by hand in memory: an es_model_store whose layers' es_tensor views
 * (bf16, host) all point at one layer's random values, as es_model_open's views point into the
 * mapped files; the embedding is a host bf16 table read row by row, as extract reads it. */
#include <cuda_runtime_api.h> /* cudaMemGetInfo: what the process really holds, beside the budget's count */
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
#include "stream.h"

#define NL 8 /* layers, as the baseline */
#define SEQS 4
#define SEQ_LEN 4096
#define TOKENS (SEQS * SEQ_LEN)
#define VOCAB 1024
#define BLOCK ((size_t)1 << 24) /* random bf16 values generated once, copied again and again */

/* Bytes of VRAM in use on the device (the whole device's: this process's context included). */
static size_t vram_used(void) {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return total_bytes - free_bytes;
}

typedef struct stream_run {
    es_device *dev;
    es_decoder *decoder;
    es_decoder_batch batch;
    const es_model_store *store;
    es_layer_stream *layers;
    int last_layer;
    size_t vram_peak;
} stream_run;

/* One forward through last_layer layers (0: the embedding alone), then a VRAM sample. */
static void run_forward(void *ctx) {
    stream_run *r = ctx;
    check(es_decoder_forward(r->decoder, &r->batch, r->store->embed->data, r->store->embed->dtype, r->layers, r->last_layer, NULL,
                             NULL, NULL, &err));
    check(es_device_sync(r->dev, &err));
    const size_t used = vram_used();
    r->vram_peak = used > r->vram_peak ? used : r->vram_peak;
}

/* The 8 layers on dev (closed at the end), the figures under `prefix`. */
static void run_case(const char *prefix, es_device *dev, const es_model_store *store, const es_decoder_batch *batch) {
    stream_run r = {.dev = dev, .batch = *batch, .store = store, .last_layer = NL};
    char key[96];
#define FIGURE(name, value, what) (snprintf(key, sizeof key, "%s_%s", prefix, name), figure(key, value, what))
    FIGURE("budget_GiB", (double)dev->max_memory / GIB, "budget (--max-memory), GiB");
    check(es_decoder_create(&r.decoder, dev, &store->config, TOKENS, SEQ_LEN, 0, &err));
    es_workspace_plan plan = {0};
    es_decoder_plan(r.decoder, &plan);
    check(es_device_reserve(dev, &plan, &err));
    /* after the activations and the workspace: the stream plans against what is left */
    double t0 = es_now();
    check(es_stream_open(&r.layers, dev, store, NL, &err));
    FIGURE("open_s", es_now() - t0, "opening the stream (pinning, first loads), s");
    FIGURE("slots", es_stream_slots(r.layers), "slots (0: resident)");
    const double total = timed(dev, run_forward, &r, 3);
    FIGURE("s_per_layer_16k_tokens", total / NL, "seconds per layer (16384 tokens)");
    FIGURE("est_80layer_tok_per_s", TOKENS / (total / NL * 80), "estimated 80-layer tokens/s");
    FIGURE("peak_GiB", (double)dev->peak / GIB, "budget's count at most, GiB");
    FIGURE("vram_used_GiB", (double)r.vram_peak / GIB, "VRAM in use at most (cudaMemGetInfo), GiB");
    /* the host table's rows come in on every batch: how much of the total that is */
    r.last_layer = 0;
    FIGURE("embed_s", timed(dev, run_forward, &r, 3), "the embedding alone (host bf16 table), s");
#undef FIGURE
    es_stream_close(r.layers);
    es_decoder_free(r.decoder);
    es_device_close(dev);
}

int main(int argc, char **argv) {
    es_set_program("bench_stream");
    es_device_prepare(argv);
    if (argc != 3) {
        fprintf(stderr, "usage: bench_stream OUT_DIR CONFIG\n");
        return ES_ERR_USAGE;
    }
    bench_start("bench_stream", argv[1]);
    /* the streaming case's device first: without one, nothing else is worth building */
    es_device_options options = {.kind = ES_DEVICE_CUDA, .max_memory = (size_t)16 << 30};
    es_device *dev = NULL;
    if (es_device_open(&dev, &options, &err)) {
        printf("SKIP bench_stream: %s\n", err.msg);
        return 0;
    }
    bench_str("device", dev->name);
    es_model_store store;
    memset(&store, 0, sizeof store);
    check(es_model_config_load(argv[2], &store.config, NULL, &err));
    store.config.vocab_size = VOCAB, store.config.n_layers = NL;
    const es_model_config *c = &store.config;

    /* One block of random bf16 (uniform, sd 0.02 as the baseline's normal_(0, 0.02)) fills every
     * part of the one host layer that all 8 layers' views share; norms are 1. */
    uint16_t *block = malloc(BLOCK * sizeof *block);
    if (!block) check(es_fail(&err, ES_ERR_RUNTIME, "out of host memory"));
    uint64_t seed = 1;
    for (size_t i = 0; i < BLOCK; i++)
        block[i] = es_f32_to_bf16((float)(((double)(splitmix64(&seed) >> 11) / 9007199254740992.0 * 2 - 1) * 1.7320508075688772 * 0.02));
    es_tensor_spec *specs = malloc((size_t)es_model_max_tensors(NL) * sizeof *specs);
    es_tensor *tensors = calloc((size_t)es_model_max_tensors(NL), sizeof *tensors);
    store.layers = calloc(NL, sizeof *store.layers);
    void *host[ES_LAYER_PARTS] = {0};
    if (!specs || !tensors || !store.layers) check(es_fail(&err, ES_ERR_RUNTIME, "out of host memory"));
    const int n_specs = es_model_tensor_list(c, NL, 0, specs);
    size_t layer_bytes = 0;
    for (int i = 0; i < n_specs; i++) {
        const es_tensor_spec *s = &specs[i];
        es_tensor *t = &tensors[i];
        const size_t n = (size_t)s->shape[0] * (s->ndim == 2 ? (size_t)s->shape[1] : 1);
        const int part = s->layer >= 0 ? s->part : -1; /* -1: the embedding (the only other one without the head) */
        void **data = part >= 0 ? &host[part] : NULL, *embed_data = NULL;
        if (!data) data = &embed_data;
        if (!*data) {
            uint16_t *values = malloc(n * sizeof *values);
            if (!values) check(es_fail(&err, ES_ERR_RUNTIME, "out of host memory: %s", s->name));
            for (size_t at = 0; at < n; at += BLOCK) {
                const size_t count = n - at < BLOCK ? n - at : BLOCK;
                if (s->is_norm) for (size_t j = 0; j < count; j++) values[at + j] = 0x3f80; /* 1.0 */
                else memcpy(values + at, block, count * sizeof *values);
            }
            *data = values;
        }
        *t = (es_tensor){.name = s->name, .dtype = ES_DT_BF16, .ndim = s->ndim, .shape = {s->shape[0], s->shape[1]},
                         .data = *data, .nbytes = n * sizeof(uint16_t), .file = "bench"};
        if (part < 0) {
            store.embed = t;
            continue;
        }
        store.layers[s->layer].part[part] = t;
        store.layers[s->layer].numel += n;
        if (s->layer == 0) layer_bytes += t->nbytes;
    }
    char dir[] = "bench";
    store.dir = dir, store.n_layers = NL;
    if (!store.embed) check(es_fail(&err, ES_ERR_RUNTIME, "the tensor list has no embedding"));

    int32_t *ids = malloc(TOKENS * sizeof *ids), seq_start[SEQS + 1];
    if (!ids) check(es_fail(&err, ES_ERR_RUNTIME, "out of host memory"));
    for (int t = 0; t < TOKENS; t++) ids[t] = (int32_t)(splitmix64(&seed) % VOCAB);
    for (int s = 0; s <= SEQS; s++) seq_start[s] = s * SEQ_LEN;
    const es_decoder_batch batch = {.ids = ids, .seq_start = seq_start, .n_seqs = SEQS};

    figure("layer_GiB", (double)layer_bytes / GIB, "one layer's weights (bf16), GiB");
    run_case("stream", dev, &store, &batch);
    /* the automatic budget (90% of what is free) holds all 8 layers: no transfers */
    options.max_memory = 0;
    check(es_device_open(&dev, &options, &err));
    run_case("resident", dev, &store, &batch);

    for (int p = 0; p < ES_LAYER_PARTS; p++) free(host[p]);
    free((void *)store.embed->data);
    free(block), free(specs), free(tensors), free(store.layers), free(ids);
    return 0;
}
