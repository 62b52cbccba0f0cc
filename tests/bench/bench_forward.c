/* CPU forward benchmark, our side: bench_forward MODEL_DIR SEQUENCES TOKENS THREADS
 * (or bench_forward --blas-core: the OpenBLAS kernels the programs run here) runs every decoder
 * layer over SEQUENCES sequences of TOKENS random ids (no head), REPEATS
 * times ($ESSENCE_BENCH_REPEATS, default 10), with the layers resident on a CPU device as
 * essence-extract runs them, and prints one JSON line with the best tokens/s and the BLAS core.
 * tests/bench/bench_forward.py runs PyTorch (transformers) on the same weights and threads
 * beside it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "decoder.h"
#include "log.h"
#include "model.h"
#include "progress.h"
#include "stream.h"

char *openblas_get_corename(void);

int main(int argc, char **argv) {
    es_set_program("bench_forward");
    es_device_prepare(argv);
    if (argc == 2 && !strcmp(argv[1], "--blas-core")) { /* for make bench's headers: the kernels the programs run */
        printf("%s\n", openblas_get_corename());
        return 0;
    }
    if (argc != 5) {
        fprintf(stderr, "usage: bench_forward MODEL_DIR SEQUENCES TOKENS THREADS\n");
        return ES_ERR_USAGE;
    }
    int sequences = atoi(argv[2]), tokens = atoi(argv[3]), threads = atoi(argv[4]);
    es_error err = {0};
    es_model_store store;
    if (es_model_open(argv[1], -1, 0, &store, &err)) es_exit_error(&err);
    es_device_options options = {.kind = ES_DEVICE_CPU, .threads = threads};
    es_device *dev;
    es_decoder *decoder;
    es_layer_stream *layers;
    es_workspace_plan plan = {0};
    const int T = sequences * tokens, L = store.config.n_layers;
    if (es_device_open(&dev, &options, &err) || es_decoder_create(&decoder, dev, &store.config, T, tokens, 0, &err)) es_exit_error(&err);
    es_decoder_plan(decoder, &plan);
    if (es_device_reserve(dev, &plan, &err) || es_stream_open(&layers, dev, &store, L, &err)) es_exit_error(&err);
    int32_t *ids = malloc((size_t)T * sizeof *ids), *seq_start = malloc((size_t)(sequences + 1) * sizeof *seq_start);
    uint64_t state = 42;
    for (int t = 0; t < T; t++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        ids[t] = (int32_t)((state >> 33) % (uint64_t)store.config.vocab_size);
    }
    for (int s = 0; s <= sequences; s++) seq_start[s] = s * tokens;
    const es_decoder_batch batch = {.ids = ids, .seq_start = seq_start, .n_seqs = sequences};
    double best = 1e30;
    const char *repeats_text = getenv("ESSENCE_BENCH_REPEATS");
    int repeats = repeats_text && atoi(repeats_text) > 0 ? atoi(repeats_text) : 10;
    for (int run = 0; run < repeats; run++) {
        double start = es_now();
        if (es_decoder_forward(decoder, &batch, store.embed->data, store.embed->dtype, layers, L, NULL, NULL, NULL, &err))
            es_exit_error(&err);
        double seconds = es_now() - start;
        if (seconds < best) best = seconds;
    }
    printf("{\"tokens_per_s\": %.1f, \"seconds\": %.4f, \"tokens\": %d, \"device\": \"%s\"}\n", T / best, best, T, dev->name);
    free(ids), free(seq_start);
    es_stream_close(layers);
    es_decoder_free(decoder);
    es_device_close(dev);
    es_model_close(&store);
    return 0;
}
