#include "generate.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ops.h"

const char *eval_stop_name(eval_stop stop) {
    return stop == EVAL_STOP_EOS ? "eos" : stop == EVAL_STOP_LENGTH ? "length" : "context";
}

/* eos_token_id (an id or a list) of generation_config.json, as transformers' generate reads it,
 * else of config.json; none: generation runs to its length. */
static int read_stop_ids(eval_model *m, const char *dir, es_error *err) {
    char path[4200];
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    if (access(path, F_OK) != 0) snprintf(path, sizeof path, "%s/config.json", dir);
    json_error_t json_err;
    json_t *root = json_load_file(path, 0, &json_err);
    if (!root) return es_fail(err, ES_ERR_DATA, "%s:%d: %s", path, json_err.line, json_err.text);
    const json_t *eos = json_object_get(root, "eos_token_id");
    const size_t n = json_is_array(eos) ? json_array_size(eos) : json_is_integer(eos) ? 1 : 0;
    int rc = ES_OK;
    if (eos && !json_is_null(eos) && !n && !json_is_array(eos)) rc = es_fail(err, ES_ERR_DATA, "%s: eos_token_id is not an id or a list of ids", path);
    for (size_t i = 0; !rc && i < n; i++) {
        const json_t *id = json_is_array(eos) ? json_array_get(eos, i) : eos;
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= m->store.config.vocab_size)
            rc = es_fail(err, ES_ERR_DATA, "%s: eos_token_id: %s is not a token id of the model", path, json_is_integer(id) ? "an id" : "an entry");
        else if (m->n_stop < (int)(sizeof m->stop_ids / sizeof *m->stop_ids)) m->stop_ids[m->n_stop++] = (int32_t)json_integer_value(id);
    }
    json_decref(root);
    return rc;
}

/* A (rows, C) tensor of the checkpoint into device memory in the device's weight format, a
 * block of rows at a time (the head of a large vocabulary is not widened whole on the host). */
static int upload_rows(es_device *dev, void *dst, const es_tensor *t, int64_t rows, int64_t C, es_error *err) {
    const int64_t block = 4096;
    float *host = malloc((size_t)(rows < block ? rows : block) * (size_t)C * sizeof *host);
    if (!host) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    const size_t element = t->nbytes / (size_t)(rows * C), wide = es_dtype_size(dev->weight_dtype);
    int rc = ES_OK;
    for (int64_t at = 0; !rc && at < rows; at += block) {
        const int64_t n = rows - at < block ? rows - at : block;
        es_tensor part = *t;
        part.ndim = 2, part.shape[0] = n, part.shape[1] = C;
        part.data = (const char *)t->data + (size_t)(at * C) * element, part.nbytes = (size_t)(n * C) * element;
        rc = es_tensor_to_f32(&part, host, err);
        if (!rc) rc = es_device_upload_weights(dev, (char *)dst + (size_t)(at * C) * wide, host, (size_t)(n * C), err);
    }
    free(host);
    return rc;
}

int eval_model_open(eval_model *m, es_device *dev, const char *dir, int slots, int max_seq, int capacity, es_error *err) {
    memset(m, 0, sizeof *m);
    m->dev = dev, m->slots = slots, m->max_seq = max_seq, m->capacity = capacity;
    int rc = es_model_open(dir, -1, 1, &m->store, err);
    if (rc) return rc;
    const es_model_config *c = &m->store.config;
    const int C = c->hidden_size, V = c->vocab_size;
    /* a text's rows through the head at a time: 256, the CPU's block of rows in every product
     * (kernels/cpu/ops.c), since fewer cost as much there; 155 MB of logits for a 151,936-token head */
    m->logit_rows = capacity < 256 ? capacity : 256;
    if (m->logit_rows < slots) m->logit_rows = slots;
    const size_t wide = es_dtype_size(dev->weight_dtype);
    rc = read_stop_ids(m, dir, err);
    if (!rc) rc = es_decoder_create(&m->decoder, dev, c, capacity, max_seq, 0, err);
    if (!rc) rc = es_kv_cache_create(&m->cache, dev, c, c->n_layers, slots, max_seq, err);
    if (!rc) rc = es_device_alloc(dev, (size_t)C * wide, &m->final_norm, "the final norm", err);
    if (!rc) rc = es_device_alloc(dev, (size_t)V * C * wide, &m->lm_head, "the output head", err);
    if (!rc) rc = es_device_alloc(dev, (size_t)m->logit_rows * V * sizeof(float), (void **)&m->logits, "the logits", err);
    if (!rc && !(m->host_logits = malloc((size_t)m->logit_rows * V * sizeof(float)))) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) rc = upload_rows(dev, m->final_norm, m->store.final_norm, 1, C, err);
    if (!rc) rc = upload_rows(dev, m->lm_head, m->store.lm_head, V, C, err);
    es_workspace_plan plan = {0};
    if (!rc) {
        es_decoder_plan(m->decoder, &plan);
        plan.max_out = plan.max_out > V ? plan.max_out : V;
        rc = es_device_reserve(dev, &plan, err);
    }
    if (!rc) rc = es_stream_open(&m->layers, dev, &m->store, c->n_layers, err); /* last: it takes what memory is left */
    if (rc) eval_model_close(m);
    return rc;
}

void eval_model_close(eval_model *m) {
    const es_model_config *c = &m->store.config;
    const size_t wide = m->dev ? es_dtype_size(m->dev->weight_dtype) : 0;
    es_stream_close(m->layers);
    if (m->logits) es_device_free(m->dev, m->logits, (size_t)m->logit_rows * c->vocab_size * sizeof(float));
    if (m->lm_head) es_device_free(m->dev, m->lm_head, (size_t)c->vocab_size * c->hidden_size * wide);
    if (m->final_norm) es_device_free(m->dev, m->final_norm, (size_t)c->hidden_size * wide);
    es_kv_cache_free(m->cache);
    es_decoder_free(m->decoder);
    free(m->host_logits);
    if (m->store.dir) es_model_close(&m->store);
    memset(m, 0, sizeof *m);
}

static int forward(eval_model *m, const int32_t *ids, const int32_t *seq_start, const int32_t *slots, int n_seqs, es_error *err) {
    const es_decoder_batch batch = {.ids = ids, .seq_start = seq_start, .n_seqs = n_seqs, .cache = m->cache, .slots = slots};
    return es_decoder_forward(m->decoder, &batch, m->store.embed->data, m->store.embed->dtype, m->layers, m->store.config.n_layers,
                              m->final_norm, NULL, NULL, err);
}

/* Logits of rows [first, first + n) of the last forward's final norm into host_logits (n <= logit_rows). */
static int logits_of(eval_model *m, int first, int n, es_error *err) {
    const int C = m->store.config.hidden_size, V = m->store.config.vocab_size;
    const float *rows = es_decoder_normed(m->decoder) + (size_t)first * C; // (n, C) device
    if (es_matmul_forward(m->dev, m->logits, rows, m->lm_head, NULL, n, C, V)) return es_device_take_error(m->dev, err);
    return es_device_download(m->dev, m->host_logits, m->logits, (size_t)n * V * sizeof(float), err);
}

/* Every prompt but its last token into its slot, in forwards that fill the token budget. */
static int prefill(eval_model *m, eval_generation *gens, int n, int32_t *ids, int32_t *seq_start, int32_t *slots, es_error *err) {
    int *done = calloc((size_t)n, sizeof *done);
    if (!done) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int rc = ES_OK;
    for (int left = 1; !rc && left;) {
        int used = 0, seqs = 0;
        left = 0;
        seq_start[0] = 0;
        for (int i = 0; i < n; i++) {
            const int want = gens[i].prompt_len - 1 - done[i], take = want < m->capacity - used ? want : m->capacity - used;
            if (want > take) left = 1;
            if (take <= 0) continue;
            memcpy(ids + used, gens[i].prompt + done[i], (size_t)take * sizeof *ids);
            used += take, done[i] += take;
            slots[seqs] = i, seq_start[++seqs] = used;
        }
        if (seqs) rc = forward(m, ids, seq_start, slots, seqs, err);
    }
    free(done);
    return rc;
}

static int is_stop(const eval_model *m, int32_t id) {
    for (int i = 0; i < m->n_stop; i++)
        if (m->stop_ids[i] == id) return 1;
    return 0;
}

int eval_generate(eval_model *m, eval_generation *gens, int n, int max_new, es_error *err) {
    const int V = m->store.config.vocab_size;
    if (n > m->slots) return es_fail(err, ES_ERR_RUNTIME, "%d prompts side by side: the cache holds %d", n, m->slots);
    int32_t *ids = malloc((size_t)m->capacity * sizeof *ids), *seq_start = malloc(((size_t)m->capacity + 1) * sizeof *seq_start);
    int32_t *slots = malloc((size_t)m->capacity * sizeof *slots), *active = malloc((size_t)n * sizeof *active);
    int rc = ids && seq_start && slots && active ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int i = 0; i < n; i++) es_kv_cache_clear(m->cache, i), gens[i].n = 0, gens[i].stop = EVAL_STOP_LENGTH;
    if (!rc) rc = prefill(m, gens, n, ids, seq_start, slots, err);
    int n_active = 0;
    for (int i = 0; i < n; i++) {
        if (max_new <= 0) continue;
        if (gens[i].prompt_len >= m->max_seq) gens[i].stop = EVAL_STOP_CONTEXT; /* no room for one more token */
        else active[n_active++] = i;
    }
    while (!rc && n_active) {
        // one token per unfinished prompt: its last prompt token, then what it generated
        for (int a = 0; a < n_active; a++) {
            const eval_generation *g = &gens[active[a]];
            ids[a] = g->n ? g->ids[g->n - 1] : g->prompt[g->prompt_len - 1];
            seq_start[a] = a, slots[a] = active[a];
        }
        seq_start[n_active] = n_active;
        rc = forward(m, ids, seq_start, slots, n_active, err);
        if (!rc) rc = logits_of(m, 0, n_active, err);
        int still = 0;
        for (int a = 0; !rc && a < n_active; a++) {
            eval_generation *g = &gens[active[a]];
            const float *row = m->host_logits + (size_t)a * V;
            int best = 0;
            for (int j = 1; j < V; j++)
                if (row[j] > row[best]) best = j; /* the first largest, as torch.argmax */
            g->ids[g->n++] = best;
            if (is_stop(m, best)) g->stop = EVAL_STOP_EOS;
            else if (g->n >= max_new) g->stop = EVAL_STOP_LENGTH;
            else if (g->prompt_len + g->n >= m->max_seq) g->stop = EVAL_STOP_CONTEXT;
            else active[still++] = active[a];
        }
        n_active = still;
    }
    free(ids), free(seq_start), free(slots), free(active);
    return rc;
}

int eval_cross_entropy(eval_model *m, const int32_t *ids, int n, double *ce_sum, es_error *err) {
    const int V = m->store.config.vocab_size;
    *ce_sum = 0;
    if (n > m->max_seq) return es_fail(err, ES_ERR_RUNTIME, "a text of %d tokens: the cache holds %d", n, m->max_seq);
    es_kv_cache_clear(m->cache, 0);
    const int32_t slot = 0;
    int rc = ES_OK;
    for (int at = 0; !rc && at < n - 1; at += m->capacity) { /* the last token predicts nothing */
        const int piece = n - 1 - at < m->capacity ? n - 1 - at : m->capacity;
        const int32_t seq_start[2] = {0, piece};
        rc = forward(m, ids + at, seq_start, &slot, 1, err);
        for (int first = 0; !rc && first < piece; first += m->logit_rows) {
            const int rows = piece - first < m->logit_rows ? piece - first : m->logit_rows;
            rc = logits_of(m, first, rows, err);
            for (int r = 0; !rc && r < rows; r++) {
                const float *row = m->host_logits + (size_t)r * V;
                float top = row[0];
                for (int j = 1; j < V; j++) top = row[j] > top ? row[j] : top;
                double total = 0;
                for (int j = 0; j < V; j++) total += exp((double)row[j] - top);
                *ce_sum += (double)top + log(total) - row[ids[at + first + r + 1]];
            }
        }
    }
    return rc;
}
