/* essence-extract's batches (batches.h): forward, check, store, commit. */
#include "batches.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "h5file.h"
#include "log.h"
#include "progress.h"

/* A batch that went forward: its samples, sequence table and stored layers' rows, to be stored. */
typedef struct computed_batch {
    extract_batch b;
    int32_t *seq_start;  // (n + 1)
    float **rows;        /* [n_layers] (T, width) host, one of the row sets (not owned) */
} computed_batch;

/* Where the stored layers' rows come back to: host memory the device copies into fastest, one
 * set while storing is in line, two with a writer thread (the batch being stored, and the next
 * one coming back). Batch k uses set k % n_sets: when batch k + 2 computes, batch k is stored. */
enum { MAX_SETS = 2 };

struct extract_batches {
    teacher_model *teacher;
    teacher_writer *writer;
    const int *layers;
    int n_layers, width;
    const char *data, *model_dir;
    float **sets[MAX_SETS];  /* [n_sets][n_layers] (capacity, width) host */
    int n_sets, capacity;
    /* the writer thread (devices whose memory is not the host's) */
    int threaded, started, stopping, has_pending;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    computed_batch pending;
    int writer_rc;
    es_error writer_error;
    /* where the time went, seconds */
    double forward, download, check, store, waited; /* download: waiting for the copies after the forward */
    int64_t batches_run;
};

void extract_batch_free(extract_batch *b) {
    for (int s = 0; s < b->n; s++) extract_sample_free(&b->samples[s]);
    free(b->samples);
    memset(b, 0, sizeof *b);
}

int extract_batch_add(extract_batch *b, extract_sample *sample, es_error *err) {
    if (b->n == b->cap) {
        const int cap = b->cap ? 2 * b->cap : 64;
        extract_sample *grown = realloc(b->samples, (size_t)cap * sizeof *grown);
        if (!grown) {
            extract_sample_free(sample);
            return es_fail(err, ES_ERR_RUNTIME, "out of memory");
        }
        b->samples = grown, b->cap = cap;
    }
    b->samples[b->n++] = *sample;
    b->tokens += sample->n_tokens;
    return ES_OK;
}

static void computed_free(computed_batch *c) {
    free(c->seq_start);
    extract_batch_free(&c->b);
}

/* ---- forward ------------------------------------------------------------------------------------- */

typedef struct collector {
    extract_batches *batches;
    float **rows;
} collector;

/* Called after each layer: the stored ones start coming back to the host while the next layers
 * compute (es_device_download_begin); compute() waits for them after the forward. */
static int collect(void *ctx, int layer, const float *hidden, int T, es_error *err) {
    collector *c = ctx;
    extract_batches *x = c->batches;
    for (int i = 0; i < x->n_layers; i++)
        if (x->layers[i] == layer) {
            int rc = es_device_download_begin(x->teacher->dev, c->rows[i], hidden, (size_t)T * x->width * sizeof(float), err);
            if (rc) return rc;
        }
    return ES_OK;
}

/* A stored hidden state that is inf or NaN is refused, not recorded (docs/extract.md): it names
 * the sample, the layer and the token. */
static int check_finite(const extract_batches *x, const computed_batch *c, es_error *err) {
    for (int i = 0; i < x->n_layers; i++)
        for (int s = 0; s < c->b.n; s++)
            for (int t = c->seq_start[s]; t < c->seq_start[s + 1]; t++) {
                const float *row = c->rows[i] + (size_t)t * x->width;
                for (int k = 0; k < x->width; k++)
                    if (!isfinite(row[k]))
                        return es_fail(err, ES_ERR_DATA,
                                       "%s:%ld: sample \"%s\": the teacher's hidden state at layer %d, token %d is not finite "
                                       "(%g): the weights in %s overflow fp32 or hold inf/NaN at or before layer %d; check the "
                                       "checkpoint (nothing of this batch was stored)",
                                       x->data, c->b.samples[s].line, c->b.samples[s].id ? c->b.samples[s].id : "", x->layers[i],
                                       t - c->seq_start[s], (double)row[k], x->model_dir, x->layers[i]);
            }
    return ES_OK;
}

/* b's samples move into c, which then holds the batch's stored rows. */
static int compute(extract_batches *x, extract_batch *b, computed_batch *c, es_error *err) {
    memset(c, 0, sizeof *c);
    c->b = *b;
    memset(b, 0, sizeof *b);
    const int T = c->b.tokens, n = c->b.n;
    int32_t *ids = malloc((size_t)T * sizeof *ids + 1);
    c->seq_start = malloc(((size_t)n + 1) * sizeof *c->seq_start);
    c->rows = x->sets[x->batches_run % x->n_sets];
    int rc = ids && c->seq_start ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc && T > x->capacity) rc = es_fail(err, ES_ERR_RUNTIME, "a batch of %d tokens: the rows hold %d", T, x->capacity);
    int at = 0;
    for (int s = 0; !rc && s < n; s++) {
        c->seq_start[s] = at;
        memcpy(ids + at, c->b.samples[s].ids, (size_t)c->b.samples[s].n_tokens * sizeof *ids);
        at += c->b.samples[s].n_tokens;
    }
    if (!rc) c->seq_start[n] = at;
    const es_decoder_batch tokens = {.ids = ids, .seq_start = c->seq_start, .n_seqs = n};
    const es_tensor *embed = x->teacher->store.embed;
    collector gather = {x, c->rows};
    const double start = es_now();
    if (!rc) rc = es_decoder_forward(x->teacher->decoder, &tokens, embed->data, embed->dtype, x->teacher->layers, x->teacher->deepest,
                                     NULL, collect, &gather, err);
    const double copied = es_now();
    const int copies_rc = es_device_download_wait(x->teacher->dev, err); /* also after a failure: no copy may still land */
    if (!rc) rc = copies_rc;
    x->forward += copied - start, x->download += es_now() - copied;
    free(ids);
    return rc;
}

/* ---- storing ------------------------------------------------------------------------------------ */

/* Checks, then stores and commits c (on the writer thread when there is one). */
static int store(extract_batches *x, computed_batch *c, es_error *err) {
    const double checked = es_now();
    int rc = check_finite(x, c, err);
    const double start = es_now();
    x->check += start - checked;
    const float **sample_rows = rc ? NULL : malloc((size_t)x->n_layers * sizeof *sample_rows + 1);
    if (!rc && !sample_rows) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int s = 0; !rc && s < c->b.n; s++) {
        const extract_sample *sample = &c->b.samples[s];
        for (int i = 0; i < x->n_layers; i++) sample_rows[i] = c->rows[i] + (size_t)c->seq_start[s] * x->width;
        rc = teacher_add(x->writer, sample->id, sample->text ? sample->text : "", sample->text ? sample->text_len : 0,
                         sample->truncated, sample->add_special_tokens, sample->ids, (const int32_t(*)[2])sample->spans,
                         sample->n_tokens, sample_rows, err);
    }
    if (!rc) rc = teacher_commit(x->writer, err);
    free(sample_rows);
    computed_free(c);
    x->store += es_now() - start;
    return rc;
}

static void *writer_main(void *arg) {
    extract_batches *x = arg;
    es_h5_quiet_thread();
    pthread_mutex_lock(&x->lock);
    for (;;) {
        while (!x->has_pending && !x->stopping) pthread_cond_wait(&x->changed, &x->lock);
        if (!x->has_pending) break;
        computed_batch c = x->pending; /* its rows stay put: the next batch fills the other set */
        const int failed = x->writer_rc != 0;
        pthread_mutex_unlock(&x->lock);
        es_error err = {0};
        /* after a failure nothing more is stored: the file keeps what was committed */
        int rc = failed ? ES_OK : store(x, &c, &err);
        if (failed) computed_free(&c);
        pthread_mutex_lock(&x->lock);
        if (rc && !x->writer_rc) x->writer_rc = rc, x->writer_error = err;
        x->has_pending = 0;
        pthread_cond_broadcast(&x->changed);
    }
    pthread_mutex_unlock(&x->lock);
    return NULL;
}

static void free_sets(extract_batches *x) {
    for (int k = 0; k < MAX_SETS; k++) {
        for (int i = 0; x->sets[k] && i < x->n_layers; i++) es_device_host_free(x->teacher->dev, x->sets[k][i]);
        free(x->sets[k]), x->sets[k] = NULL;
    }
}

int extract_batches_start(extract_batches **out, teacher_model *teacher, teacher_writer *writer, const int *layers, int n_layers,
                          int width, int capacity, const char *data, const char *model_dir, es_error *err) {
    *out = NULL;
    extract_batches *x = calloc(1, sizeof *x);
    if (!x) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    x->teacher = teacher, x->writer = writer, x->layers = layers, x->n_layers = n_layers, x->width = width;
    x->data = data, x->model_dir = model_dir, x->capacity = capacity;
    /* $ESSENCE_WRITER_THREAD=1: the writer thread on the CPU too, for the tests of its order and
     * errors (tests/python/test_extract.py); the forward and the compression then share the pool */
    const char *forced = getenv("ESSENCE_WRITER_THREAD");
    x->threaded = !teacher->dev->host_memory || (forced && !strcmp(forced, "1"));
    x->n_sets = x->threaded ? 2 : 1;
    const size_t bytes = (size_t)capacity * width * sizeof(float);
    for (int k = 0; k < x->n_sets; k++) {
        x->sets[k] = calloc((size_t)n_layers + 1, sizeof *x->sets[k]);
        for (int i = 0; x->sets[k] && i < n_layers; i++)
            if (!(x->sets[k][i] = es_device_host_alloc(teacher->dev, bytes))) {
                free_sets(x), free(x);
                char size[32];
                return es_fail(err, ES_ERR_RUNTIME, "out of host memory for the stored layers' rows (%s each)",
                               es_format_size(bytes, size, sizeof size));
            }
        if (!x->sets[k]) {
            free_sets(x), free(x);
            return es_fail(err, ES_ERR_RUNTIME, "out of memory");
        }
    }
    pthread_mutex_init(&x->lock, NULL);
    pthread_cond_init(&x->changed, NULL);
    if (x->threaded && pthread_create(&x->thread, NULL, writer_main, x)) x->threaded = 0; /* store in line instead */
    x->started = x->threaded;
    *out = x;
    return ES_OK;
}

int extract_batches_run(extract_batches *x, extract_batch *b, es_error *err) {
    computed_batch c;
    int rc = compute(x, b, &c, err);
    x->batches_run++;
    if (rc) {
        computed_free(&c);
        return rc;
    }
    if (!x->threaded) return store(x, &c, err);
    const double start = es_now();
    pthread_mutex_lock(&x->lock);
    while (x->has_pending && !x->writer_rc) pthread_cond_wait(&x->changed, &x->lock);
    x->waited += es_now() - start;
    if ((rc = x->writer_rc)) {
        es_fail(err, rc, "%s", x->writer_error.msg);
        pthread_mutex_unlock(&x->lock);
        computed_free(&c);
        return rc;
    }
    x->pending = c, x->has_pending = 1;
    pthread_cond_broadcast(&x->changed);
    pthread_mutex_unlock(&x->lock);
    return ES_OK;
}

int extract_batches_finish(extract_batches *x, int rc, es_error *err) {
    if (x->started) {
        const double start = es_now();
        pthread_mutex_lock(&x->lock);
        while (x->has_pending) pthread_cond_wait(&x->changed, &x->lock);
        x->waited += es_now() - start;
        x->stopping = 1;
        pthread_cond_broadcast(&x->changed);
        pthread_mutex_unlock(&x->lock);
        pthread_join(x->thread, NULL);
        if (!rc && x->writer_rc) rc = es_fail(err, x->writer_rc, "%s", x->writer_error.msg);
    }
    free_sets(x);
    if (x->batches_run)
        es_log("time: forward %.2f s on the device, waiting for its device->host copies %.2f s, checks %.2f s, storing (compression, "
               "HDF5) %.2f s%s",
               x->forward, x->download, x->check, x->store,
               x->threaded ? (x->waited > 0.05 * (x->forward + x->download) ? " on the writer thread, which held the device back"
                                                                             : " on the writer thread, which kept up")
                           : " in line");
    if (x->threaded && x->batches_run) es_log("time: the forward waited %.2f s for the writer", x->waited);
    pthread_mutex_destroy(&x->lock);
    pthread_cond_destroy(&x->changed);
    free(x);
    return rc;
}
