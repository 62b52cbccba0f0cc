/* essence-inspect geometry --model: a student checkpoint's hidden states at sampled tokens of a
 * student.h5 (docs/geometry.md "(c)"), normalised as essence-align's latent loss sees them. Each
 * sample is run from its first token to its last sampled one, on the CPU device, layers streamed
 * from the checkpoint as essence-extract runs them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decoder.h"
#include "h5rows.h"
#include "inspect.h"
#include "model.h"
#include "stream.h"

typedef struct states_job {
    const int *layers;     /* [n_layers] student layers, 1-based */
    int n_layers, C;
    double eps;
    const int32_t *local;  /* [n_here] positions in the forward of the sampled tokens */
    const int *slot;       /* [n_here] their rows in states */
    int n_here;
    double **states;       /* [n_layers] (n, C) */
} states_job;

/* After each layer: the sampled tokens' rows of a kept layer, ĥ = h / sqrt(mean h² + eps). */
static int keep_rows(void *ctx, int layer, const float *hidden, int T, es_error *err) {
    (void)T, (void)err;
    const states_job *job = ctx;
    for (int l = 0; l < job->n_layers; l++) {
        if (job->layers[l] != layer) continue;
        for (int i = 0; i < job->n_here; i++) {
            const float *h = hidden + (size_t)job->local[i] * job->C;
            double *out = job->states[l] + (size_t)job->slot[i] * job->C, sq = 0;
            for (int c = 0; c < job->C; c++) sq += (double)h[c] * h[c];
            const double inverse = 1 / sqrt(sq / job->C + job->eps);
            for (int c = 0; c < job->C; c++) out[c] = h[c] * inverse;
        }
    }
    return 0;
}

typedef struct token_ref {
    int64_t token;
    int row; /* in the caller's order */
} token_ref;

static int by_token(const void *a, const void *b) {
    const token_ref *x = a, *y = b;
    return (x->token > y->token) - (x->token < y->token);
}

int geometry_model_states(const char *model_dir, const char *path, hid_t file, const int64_t *tokens, int n, const int *layers,
                          int n_layers, int width, int threads, double **states, es_error *err) {
    // the student file's samples and token ids
    int64_t n_samples = 0, *token_start = NULL;
    int32_t *ids = NULL;
    es_rows_reader reader;
    int rc = H5Lexists(file, "/samples", H5P_DEFAULT) > 0 && H5Lexists(file, "/samples/token_start", H5P_DEFAULT) > 0 &&
                     H5Lexists(file, "/tokens/id", H5P_DEFAULT) > 0
                 ? ES_OK
                 : es_fail(err, ES_ERR_DATA, "%s: /samples/token_start or /tokens/id is missing", path);
    if (!rc && !(rc = es_rows_open_column(&reader, file, "/samples/token_start", ES_H5_I64, NULL, err))) {
        n_samples = reader.rows - 1;
        es_rows_close_reader(&reader);
    }
    int64_t n_tokens = 0;
    if (!rc && !(rc = es_rows_open_column(&reader, file, "/tokens/id", ES_H5_I32, NULL, err))) {
        n_tokens = reader.rows;
        es_rows_close_reader(&reader);
    }
    if (!rc && n_samples < 1) rc = es_fail(err, ES_ERR_DATA, "%s: /samples/token_start holds no sample", path);
    if (!rc && (!(token_start = malloc((size_t)(n_samples + 1) * sizeof *token_start)) ||
                !(ids = malloc((size_t)(n_tokens > 0 ? n_tokens : 1) * sizeof *ids))))
        rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) rc = es_rows_read_column(file, "/samples/token_start", ES_H5_I64, 0, n_samples + 1, token_start, err);
    if (!rc) rc = es_rows_read_column(file, "/tokens/id", ES_H5_I32, 0, n_tokens, ids, err);
    for (int64_t s = 0; !rc && s < n_samples; s++)
        if (token_start[0] != 0 || token_start[s + 1] < token_start[s] || token_start[n_samples] != n_tokens)
            rc = es_fail(err, ES_ERR_DATA, "%s: /samples/token_start is not a partition of the %lld tokens", path, (long long)n_tokens);
    // the checkpoint, up to the deepest layer asked for
    int deepest = 0;
    for (int l = 0; l < n_layers; l++) deepest = layers[l] > deepest ? layers[l] : deepest;
    es_model_store store;
    int store_open = 0;
    if (!rc && !(rc = es_model_open(model_dir, deepest, 0, &store, err))) store_open = 1;
    if (!rc && store.config.hidden_size != width)
        rc = es_fail(err, ES_ERR_DATA, "%s: hidden size %d, but %s's targets have width %d: not its student", model_dir,
                     store.config.hidden_size, path, width);
    if (!rc && deepest > store.config.n_layers)
        rc = es_fail(err, ES_ERR_DATA, "%s: %d layers, but %s maps a target to layer %d", model_dir, store.config.n_layers, path, deepest);
    for (int64_t t = 0; !rc && t < n_tokens; t++)
        if (ids[t] < 0 || ids[t] >= store.config.vocab_size)
            rc = es_fail(err, ES_ERR_DATA, "%s: /tokens/id[%lld] = %d is outside %s's vocabulary (%d)", path, (long long)t, ids[t], model_dir,
                         store.config.vocab_size);
    // the sampled tokens by sample, and the longest prefix a forward needs
    token_ref *refs = rc ? NULL : malloc((size_t)(n > 0 ? n : 1) * sizeof *refs);
    if (!rc && !refs) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int i = 0; !rc && i < n; i++) refs[i] = (token_ref){tokens[i], i};
    if (!rc) qsort(refs, (size_t)n, sizeof *refs, by_token);
    int longest = 1;
    for (int i = 0, s = 0; !rc && i < n; i++) {
        while (s < n_samples && token_start[s + 1] <= refs[i].token) s++;
        const int64_t need = refs[i].token - token_start[s] + 1;
        if (need > 1 << 20) rc = es_fail(err, ES_ERR_DATA, "%s: sample %d is longer than 2^20 tokens", path, s);
        longest = need > longest ? (int)need : longest;
    }
    es_device *dev = NULL;
    es_decoder *decoder = NULL;
    es_layer_stream *stream = NULL;
    es_device_options options = {.kind = ES_DEVICE_CPU, .threads = threads};
    if (!rc) rc = es_device_open(&dev, &options, err);
    if (!rc) rc = es_decoder_create(&decoder, dev, &store.config, longest, longest, 0, err);
    es_workspace_plan plan = {0};
    if (!rc) es_decoder_plan(decoder, &plan), rc = es_device_reserve(dev, &plan, err);
    if (!rc) rc = es_stream_open(&stream, dev, &store, deepest, err);
    int32_t *local = rc ? NULL : malloc((size_t)(n > 0 ? n : 1) * sizeof *local);
    int *slot = rc ? NULL : malloc((size_t)(n > 0 ? n : 1) * sizeof *slot);
    if (!rc && (!local || !slot)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    // one forward per sample that holds sampled tokens, over its tokens up to the last of them
    for (int i = 0, s = 0; !rc && i < n;) {
        while (token_start[s + 1] <= refs[i].token) s++;
        int here = 0;
        for (; i < n && refs[i].token < token_start[s + 1]; i++, here++)
            local[here] = (int32_t)(refs[i].token - token_start[s]), slot[here] = refs[i].row;
        const int32_t seq_start[2] = {0, local[here - 1] + 1};
        const es_decoder_batch batch = {.ids = ids + token_start[s], .seq_start = seq_start, .n_seqs = 1};
        states_job job = {layers, n_layers, width, store.config.rms_norm_eps, local, slot, here, states};
        rc = es_decoder_forward(decoder, &batch, store.embed->data, store.embed->dtype, stream, deepest, NULL, keep_rows, &job, err);
        if (rc) es_error_prefix(err, "%s: sample %d", model_dir, s);
    }
    free(local), free(slot), free(refs), free(token_start), free(ids);
    es_stream_close(stream);
    es_decoder_free(decoder);
    if (dev) es_device_close(dev);
    if (store_open) es_model_close(&store);
    return rc;
}
