/* CPU forward benchmark, our side: bench_forward MODEL_DIR SEQUENCES TOKENS THREADS
 * runs every decoder layer over SEQUENCES sequences of TOKENS random ids (no head), REPEATS
 * times ($ESSENCE_BENCH_REPEATS, default 10), and prints one JSON line with the best tokens/s. tests/bench/bench_forward.py runs
 * PyTorch (transformers) on the same weights and threads beside it. */
#include <stdio.h>
#include <stdlib.h>

#include <cblas.h>

#include "forward.h"
#include "log.h"
#include "model.h"
#include "progress.h"

int main(int argc, char **argv) {
    es_set_program("bench_forward");
    if (argc != 5) {
        fprintf(stderr, "usage: bench_forward MODEL_DIR SEQUENCES TOKENS THREADS\n");
        return ES_ERR_USAGE;
    }
    int sequences = atoi(argv[2]), tokens = atoi(argv[3]), threads = atoi(argv[4]);
    es_error err = {0};
    es_model model;
    if (es_model_load(argv[1], -1, 0, &model, &err)) es_exit_error(&err);
    es_pool *pool = es_pool_create(threads);
    openblas_set_num_threads(threads);
    int T = sequences * tokens;
    int32_t *ids = malloc((size_t)T * sizeof *ids), *seq_start = malloc((size_t)(sequences + 1) * sizeof *seq_start);
    uint64_t state = 42;
    for (int t = 0; t < T; t++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        ids[t] = (int32_t)((state >> 33) % (uint64_t)model.config.vocab_size);
    }
    for (int s = 0; s <= sequences; s++) seq_start[s] = s * tokens;
    double best = 1e30;
    const char *repeats_text = getenv("ESSENCE_BENCH_REPEATS");
    int repeats = repeats_text && atoi(repeats_text) > 0 ? atoi(repeats_text) : 10;
    for (int run = 0; run < repeats; run++) {
        double start = es_now();
        if (es_forward(&model, pool, ids, seq_start, sequences, model.config.n_layers, NULL, NULL, NULL, &err)) es_exit_error(&err);
        double seconds = es_now() - start;
        if (seconds < best) best = seconds;
    }
    printf("{\"tokens_per_s\": %.1f, \"seconds\": %.4f, \"tokens\": %d}\n", T / best, best, T);
    free(ids), free(seq_start);
    es_pool_destroy(pool);
    es_model_free(&model);
    return 0;
}
