/* essence-align's input: student.h5 in batches (align/data.h).
 *
 * The rules, exactly (a resumed or multi-rank run depends on every rank and every restart
 * computing the same thing):
 *
 * Random numbers: splitmix64 (docs/project.md: add 0x9e3779b97f4a7c15, mix with 0xbf58476d1ce4e5b9
 * and 0x94d049bb133111eb). A draw in [0, n) is `next() % n` (the bias is below n / 2^64).
 *
 * Eval split: n_eval = llround(eval_fraction · S), raised to 1 when eval_fraction > 0 and S > 1,
 * lowered to S − 1 so one training sample remains. The generator is seeded with `seed` itself; a
 * partial Fisher–Yates over p = [0, 1, ..., S−1] does, for i = 0 .. n_eval−1,
 * `j = i + next() % (S − i); swap(p[i], p[j])`, and p[0 .. n_eval) are the eval samples. Both sets
 * are then used in file order.
 *
 * Epoch order: the train samples in file order; with shuffle, epoch e permutes them with a
 * generator seeded with `seed ^ (0xa0761d6478bd642f · (e + 1))` (mod 2^64: an odd multiplier is a
 * bijection, so each epoch has its own start state and none is the eval split's `seed`), by the
 * classic Fisher–Yates: for i = n−1 down to 1, `j = next() % (i + 1); swap(o[i], o[j])`.
 *
 * Pieces: a sample of n tokens is pieces [k·seq_len, min((k+1)·seq_len, n)), k = 0 .. ceil(n/seq_len)−1;
 * empty samples have none. Global batches take pieces in order until the next would pass
 * world · batch_tokens tokens (one piece at least) and roll over from one epoch into the next.
 *
 * Rank split: with k pieces of cumulative token counts c_0 = 0 < c_1 < ... < c_k = G, rank r gets
 * pieces [b_r, b_{r+1}). b_0 = 0 and b_world = k; for 0 < r < world, b_r is the boundary i that
 * minimises |c_i · world − r · G| (the smaller i on a tie), kept within [b_{r−1} + 1, k − (world − r)]
 * so every rank has at least one piece. With fewer pieces than ranks, rank r < k gets piece r and
 * the others an empty batch (T = 0). The concatenation over ranks is the global batch in order.
 *
 * Threads: one prefetch thread reads the next training batch while the caller trains on the
 * current one; it fills one batch per request (memory: the handed-out batch and the one being
 * read). Eval and set_position first cancel the prefetch (waiting for a read in flight and dropping
 * its batch; the position is unchanged, so the next training call reads it again), then eval reads
 * synchronously on the caller's thread into the idle buffer. So exactly one thread touches the
 * file at any time, and eval costs one extra batch read, not a third batch of memory.
 *
 * Texts (a .jsonl --data): the records are read and tokenised once at open (common/inputs.h:
 * {"id","text"} with the tokenizer's specials, {"id","prompt","response"} rendered with
 * essence-extract's default template, {"id","ids"} as given; add_bos "auto"), their ids kept in
 * memory with the same token_start index; the samples are the records in file order. There is no
 * teacher_row (every mask 0, global_aligned 0) and no target layer; batches are the same pieces as
 * a student.h5 with those samples would give. */
#include "data.h"

#include <hdf5.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "h5file.h"
#include "h5rows.h"
#include "inputs.h"
#include "threadpool.h"

/* One attention sequence: rows [row, row + len) of sample `sample`. */
typedef struct piece {
    int64_t sample, row;
    int32_t len;
} piece;

typedef struct batch_buffer {
    align_batch batch;           /* points into the arrays below */
    piece *pieces;               /* the whole global batch */
    int64_t *cum;                /* (pieces + 1) cumulative tokens */
    size_t pieces_cap;
    int64_t *teacher_row;        /* (G) the whole global batch's rows, for global_aligned */
    size_t rows_cap;
    size_t tokens_cap, seqs_cap; /* this rank's arrays in `batch` */
    align_data_position end;     /* where the data stands after this batch */
    int rc;
    es_error err;
} batch_buffer;

struct align_data {
    align_data_options opt;
    char *path;
    es_h5file file;
    es_pool *pool;
    es_rows_reader ids, teacher_row, *targets;
    int *layers, n_targets;
    int64_t samples, tokens, *token_start;
    int text;                    /* a JSONL of texts: ids in memory, no teacher rows or targets */
    int32_t *text_ids;           /* (tokens) */
    char **text_names;           /* (samples) the records' ids, for messages */
    uint8_t *is_eval;            /* bitmap over samples */
    int64_t *eval, n_eval;       /* eval samples, file order */
    int64_t *order, n_train;     /* the train samples in epoch order_epoch's order */
    int64_t order_epoch;         /* -1: not built */
    align_data_position pos;     /* after the batch last handed out */
    align_data_position eval_pos;
    int eval_started;
    batch_buffer buffers[2];
    int current;                 /* the buffer handed out; the other one is filled */

    pthread_t thread;
    int thread_started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int request, busy, ready, quit, pending; /* pending: a fill of `pos` was requested */
    align_data_position fill_from;
};

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int is_eval(const align_data *d, int64_t s) { return (d->is_eval[s >> 3] >> (s & 7)) & 1; }

static int64_t sample_tokens(const align_data *d, int64_t s) { return d->token_start[s + 1] - d->token_start[s]; }

static void build_order(align_data *d, int64_t epoch) {
    if (d->order_epoch == epoch || (!d->opt.shuffle && d->order_epoch >= 0)) return;
    int64_t n = 0;
    for (int64_t s = 0; s < d->samples; s++)
        if (!is_eval(d, s)) d->order[n++] = s;
    if (d->opt.shuffle) {
        uint64_t state = d->opt.seed ^ (0xa0761d6478bd642full * (uint64_t)(epoch + 1));
        for (int64_t i = n - 1; i > 0; i--) {
            int64_t j = (int64_t)(splitmix64(&state) % (uint64_t)(i + 1)), t = d->order[i];
            d->order[i] = d->order[j], d->order[j] = t;
        }
    }
    d->order_epoch = epoch;
}

/* The piece at *pos, moving *pos past empty samples and ends of epochs first (train never
 * ends: open checked that it has tokens). Returns 0 at the end of the eval set. */
static int peek_piece(align_data *d, int eval, align_data_position *pos, piece *out) {
    for (;;) {
        int64_t s;
        if (eval) {
            if (pos->index >= d->n_eval) return 0;
            s = d->eval[pos->index];
        } else {
            if (pos->index >= d->n_train) pos->epoch++, pos->index = 0, pos->piece = 0;
            build_order(d, pos->epoch);
            s = d->order[pos->index];
        }
        int64_t n = sample_tokens(d, s), first = pos->piece * d->opt.seq_len;
        if (first < n) {
            out->sample = s;
            out->row = d->token_start[s] + first;
            out->len = (int32_t)(n - first < d->opt.seq_len ? n - first : d->opt.seq_len);
            return 1;
        }
        pos->index++, pos->piece = 0;
    }
}

/* Room for `need` elements; grows geometrically (pieces arrive one by one). */
static int grow(void *pointer, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t n = *cap * 2 > need ? *cap * 2 : need < 64 ? 64 : need;
    void **p = pointer;
    void *bigger = realloc(*p, n * elem);
    if (!bigger) return -1;
    *p = bigger;
    *cap = n;
    return 0;
}

/* Room for this rank's T tokens in n_seqs sequences. The per-token arrays grow to the exact
 * need: targets are the bulk of a batch (T · D floats a layer), so no slack. */
static int reserve_rank(const align_data *d, batch_buffer *b, size_t T, size_t n_seqs) {
    align_batch *o = &b->batch;
    if (T > b->tokens_cap) {
        void *p;
        if (!(p = realloc(o->ids, T * sizeof *o->ids))) return -1;
        o->ids = p;
        if (!(p = realloc(o->labels, T * sizeof *o->labels))) return -1;
        o->labels = p;
        if (!(p = realloc(o->mask, T * sizeof *o->mask))) return -1;
        o->mask = p;
        for (int l = 0; l < d->n_targets; l++) {
            if (!(p = realloc(o->targets[l], T * (size_t)d->opt.hidden_size * sizeof(float)))) return -1;
            o->targets[l] = p;
        }
        b->tokens_cap = T;
    }
    if (n_seqs + 1 > b->seqs_cap) {
        size_t cap = b->seqs_cap, cap2 = b->seqs_cap;
        if (grow(&o->seq_start, &cap, n_seqs + 1, sizeof *o->seq_start) || grow(&o->sample, &cap2, n_seqs + 1, sizeof *o->sample))
            return -1;
        b->seqs_cap = cap < cap2 ? cap : cap2;
    }
    return 0;
}

/* Reads the rows of pieces[lo, hi) one after the other into out, merging runs of adjacent rows
 * into one read (consecutive pieces of a sample, or samples in file order). */
static int read_pieces(es_rows_reader *reader, const piece *pieces, int lo, int hi, void *out, size_t row_bytes, int as_f32,
                       es_error *err) {
    size_t at = 0;
    for (int i = lo; i < hi;) {
        int64_t row = pieces[i].row, n = pieces[i].len;
        int j = i + 1;
        while (j < hi && pieces[j].row == row + n) n += pieces[j++].len;
        char *dest = (char *)out + at * row_bytes;
        int rc = as_f32 ? es_rows_read_f32(reader, row, n, (float *)dest, err) : es_rows_read(reader, row, n, dest, err);
        if (rc) return rc;
        at += (size_t)n;
        i = j;
    }
    return ES_OK;
}

/* A sample's id for messages ("?" when it cannot be read). */
static void sample_id(const align_data *d, int64_t s, char *out, size_t size) {
    snprintf(out, size, "?");
    if (d->text) {
        if (d->text_names && d->text_names[s]) snprintf(out, size, "%s", d->text_names[s]);
        return;
    }
    hid_t dataset = H5Lexists(d->file.id, "/samples/id", H5P_DEFAULT) > 0 ? H5Dopen2(d->file.id, "/samples/id", H5P_DEFAULT) : -1;
    char *value = NULL;
    es_error ignored = {0};
    if (dataset >= 0 && es_h5_read_strings(dataset, "/samples/id", s, 1, &value, &ignored) == ES_OK) snprintf(out, size, "%s", value);
    free(value);
    if (dataset >= 0) H5Dclose(dataset);
}

/* Rank r's pieces [*lo, *hi) of k (the rule in the header comment). */
static void rank_cut(const int64_t *cum, int k, int world, int rank, int *lo, int *hi) {
    if (k < world) {
        *lo = rank < k ? rank : k;
        *hi = rank + 1 < k ? rank + 1 : k;
        return;
    }
    const int64_t G = cum[k];
    int b = 0;
    for (int r = 1; r <= rank + 1; r++) {
        int next;
        if (r == world) {
            next = k;
        } else {
            int first = b + 1, last = k - (world - r);
            const int64_t target = (int64_t)r * G;
            next = first;
            /* |c_i·world − target| falls then rises along i: stop where it stops falling. */
            while (next < last && llabs(cum[next + 1] * world - target) < llabs(cum[next] * world - target)) next++;
        }
        if (r == rank) *lo = next;
        if (r == rank + 1) *hi = next;
        b = next;
    }
    if (rank == 0) *lo = 0;
}

/* Fills b with this rank's share of the global batch at *pos (leaving *pos after it).
 * b->batch.n_seqs == 0 with global_tokens == 0: the eval set is exhausted. */
static int fill(align_data *d, batch_buffer *b, int eval, align_data_position *pos, es_error *err) {
    const int64_t cap = (int64_t)d->opt.world * d->opt.batch_tokens;
    align_batch *out = &b->batch;
    int k = 0;
    int64_t total = 0;
    piece p;
    while (peek_piece(d, eval, pos, &p)) {
        if (k > 0 && total + p.len > cap) break;
        if ((size_t)k + 2 > b->pieces_cap) {
            size_t pieces_cap = b->pieces_cap, cum_cap = b->pieces_cap;
            if (grow(&b->pieces, &pieces_cap, (size_t)k + 2, sizeof *b->pieces) || grow(&b->cum, &cum_cap, (size_t)k + 2, sizeof *b->cum))
                return es_fail(err, ES_ERR_RUNTIME, "out of memory");
            b->pieces_cap = pieces_cap < cum_cap ? pieces_cap : cum_cap;
        }
        b->cum[0] = 0;
        b->pieces[k++] = p;
        total += p.len;
        b->cum[k] = total;
        pos->piece++;
    }
    out->T = 0, out->n_seqs = 0;
    out->global_tokens = total, out->global_labels = total - k, out->global_aligned = 0;
    if (k == 0) return ES_OK;

    if (grow(&b->teacher_row, &b->rows_cap, (size_t)total, sizeof *b->teacher_row))
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int rc = ES_OK;
    if (d->text) for (int64_t t = 0; t < total; t++) b->teacher_row[t] = -1; /* texts: no teacher, nothing aligned */
    else rc = read_pieces(&d->teacher_row, b->pieces, 0, k, b->teacher_row, sizeof *b->teacher_row, 0, err);
    if (rc) return rc;
    for (int64_t t = 0; t < total; t++) out->global_aligned += b->teacher_row[t] >= 0;

    int lo = 0, hi = 0;
    rank_cut(b->cum, k, d->opt.world, d->opt.rank, &lo, &hi);
    const int n_seqs = hi - lo;
    const int64_t T = b->cum[hi] - b->cum[lo], base = b->cum[lo];
    const int D = d->opt.hidden_size;
    if (reserve_rank(d, b, (size_t)T, (size_t)n_seqs))
        return es_fail(err, ES_ERR_RUNTIME, "out of memory for a batch of %lld tokens", (long long)T);
    out->T = (int)T, out->n_seqs = n_seqs;
    if (T == 0) {
        out->seq_start[0] = 0;
        return ES_OK;
    }

    if (d->text) {
        size_t at = 0;
        for (int i = lo; i < hi; i++) {
            memcpy(out->ids + at, d->text_ids + b->pieces[i].row, (size_t)b->pieces[i].len * sizeof *out->ids);
            at += (size_t)b->pieces[i].len;
        }
        rc = ES_OK;
    } else {
        rc = read_pieces(&d->ids, b->pieces, lo, hi, out->ids, sizeof *out->ids, 0, err);
    }
    for (int l = 0; !rc && l < d->n_targets; l++)
        rc = read_pieces(&d->targets[l], b->pieces, lo, hi, out->targets[l], (size_t)D * sizeof(float), 1, err);
    if (rc) return rc;
    out->seq_start[0] = 0;
    for (int i = lo; i < hi; i++) {
        const piece *q = &b->pieces[i];
        const int32_t start = (int32_t)(b->cum[i] - base), end = start + q->len;
        out->seq_start[i - lo + 1] = end;
        out->sample[i - lo] = q->sample;
        const int64_t token0 = q->row - d->token_start[q->sample]; /* the piece's first token in its sample */
        for (int32_t t = start; t < end; t++) {
            int32_t id = out->ids[t];
            if (id < 0 || id >= d->opt.vocab_size) {
                char name[256];
                sample_id(d, q->sample, name, sizeof name);
                return es_fail(err, ES_ERR_DATA, "%s: sample %lld (\"%s\"): token %lld has id %d outside the vocabulary (vocab_size %d)",
                               d->path, (long long)q->sample, name, (long long)(token0 + t - start), id, d->opt.vocab_size);
            }
            out->labels[t] = t + 1 < end ? out->ids[t + 1] : -1;
            out->mask[t] = b->teacher_row[base + t] >= 0;
        }
        for (int l = 0; l < d->n_targets; l++) {
            const float *rows = out->targets[l] + (size_t)start * (size_t)D;
            for (size_t v = 0; v < (size_t)q->len * (size_t)D; v++)
                if (!isfinite(rows[v])) {
                    char name[256];
                    sample_id(d, q->sample, name, sizeof name);
                    return es_fail(err, ES_ERR_DATA, "%s: sample %lld (\"%s\"): target layer %d has a non-finite value at token %lld "
                                   "(a damaged file, or not written by essence-project: project it again)",
                                   d->path, (long long)q->sample, name, d->layers[l], (long long)(token0 + (int64_t)(v / (size_t)D)));
                }
        }
    }
    return ES_OK;
}

/* ---- the prefetch thread -------------------------------------------------------------- */

static void *prefetch_main(void *arg) {
    align_data *d = arg;
    es_h5_quiet_thread();
    pthread_mutex_lock(&d->lock);
    for (;;) {
        while (!d->quit && !d->request) pthread_cond_wait(&d->cond, &d->lock);
        if (d->quit) break;
        d->request = 0, d->busy = 1;
        batch_buffer *b = &d->buffers[1 - d->current];
        b->end = d->fill_from;
        pthread_mutex_unlock(&d->lock);
        es_error_clear(&b->err);
        b->rc = fill(d, b, 0, &b->end, &b->err);
        pthread_mutex_lock(&d->lock);
        d->busy = 0, d->ready = 1;
        pthread_cond_broadcast(&d->cond);
    }
    pthread_mutex_unlock(&d->lock);
    return NULL;
}

static void prefetch_request(align_data *d, align_data_position from) {
    pthread_mutex_lock(&d->lock);
    d->fill_from = from;
    d->ready = 0, d->request = 1, d->pending = 1;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
}

/* Waits for a read in flight and drops its batch: afterwards only the caller touches the file. */
static void prefetch_cancel(align_data *d) {
    pthread_mutex_lock(&d->lock);
    d->request = 0;
    while (d->busy) pthread_cond_wait(&d->cond, &d->lock);
    d->ready = 0, d->pending = 0;
    pthread_mutex_unlock(&d->lock);
}

/* ---- open ------------------------------------------------------------------------------ */

static int options_check(const align_data_options *o, es_error *err) {
    if (!o->path || !*o->path) return es_fail(err, ES_ERR_USAGE, "no student.h5 or texts.jsonl given (--data)");
    if (align_data_path_is_text(o->path) && (!o->model_dir || !*o->model_dir))
        return es_fail(err, ES_ERR_USAGE, "%s: a JSONL of texts needs the student folder's tokenizer (--model)", o->path);
    if (o->hidden_size < 1 || o->n_layers < 1 || o->vocab_size < 1)
        return es_fail(err, ES_ERR_USAGE, "%s: the model's hidden_size, layers and vocab_size must be positive (%d, %d, %d)",
                       o->path, o->hidden_size, o->n_layers, o->vocab_size);
    if (!(o->eval_fraction >= 0 && o->eval_fraction < 1))
        return es_fail(err, ES_ERR_USAGE, "--eval-fraction %g is outside [0, 1)", o->eval_fraction);
    if (o->seq_len < 1 || o->seq_len > (1 << 30) || o->batch_tokens < 1)
        return es_fail(err, ES_ERR_USAGE, "--seq-len %d and --batch-tokens %d must be positive", o->seq_len, o->batch_tokens);
    if (o->world < 1 || o->rank < 0 || o->rank >= o->world)
        return es_fail(err, ES_ERR_USAGE, "rank %d of %d: not a valid process rank", o->rank, o->world);
    if ((int64_t)o->world * o->batch_tokens > (1 << 30))
        return es_fail(err, ES_ERR_USAGE, "--batch-tokens %d times %d processes is too large", o->batch_tokens, o->world);
    return ES_OK;
}

/* A 1-D dataset read as `elem` (HDF5 converts another stored type, checked) with `rows`
 * rows (-1: any), opened on the prefetch pool. */
static int open_column(align_data *d, es_rows_reader *reader, const char *name, es_h5_elem elem, int64_t rows, es_error *err) {
    int rc = es_rows_open_column(reader, d->file.id, name, elem, d->pool, err);
    if (rc) return rc;
    if (rows >= 0 && reader->rows != rows)
        return es_fail(err, ES_ERR_DATA, "%s: %s has %lld rows, expected %lld (one per token)", d->path, name,
                       (long long)reader->rows, (long long)rows);
    return ES_OK;
}

typedef struct target_name {
    int layer;
    char name[64];
} target_name;

static int compare_layers(const void *a, const void *b) {
    int x = ((const target_name *)a)->layer, y = ((const target_name *)b)->layer;
    return (x > y) - (x < y);
}

/* The /targets/layer_LLL datasets, ascending, each checked against the model. */
static int open_targets(align_data *d, es_error *err) {
    hid_t group = H5Lexists(d->file.id, "/targets", H5P_DEFAULT) > 0 ? H5Gopen2(d->file.id, "/targets", H5P_DEFAULT) : -1;
    H5G_info_t info = {0};
    if (group < 0 || H5Gget_info(group, &info) < 0 || info.nlinks == 0) {
        if (group >= 0) H5Gclose(group);
        return es_fail(err, ES_ERR_DATA, "%s: the file has no targets (/targets has no layer_LLL datasets)", d->path);
    }
    target_name *names = calloc((size_t)info.nlinks, sizeof *names);
    int rc = names ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int n = 0;
    for (hsize_t i = 0; !rc && i < info.nlinks; i++) {
        char *name = names[n].name, *end = NULL;
        ssize_t length = H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof names[n].name, H5P_DEFAULT);
        int digits = length > 6 && length < (ssize_t)sizeof names[n].name && !strncmp(name, "layer_", 6);
        for (ssize_t c = 6; digits && c < length; c++) digits = name[c] >= '0' && name[c] <= '9';
        long layer = digits ? strtol(name + 6, &end, 10) : -1;
        if (!digits || length > 11)
            rc = es_fail(err, ES_ERR_DATA, "%s: /targets/%s is not a layer_LLL dataset", d->path, length > 0 ? name : "?");
        else
            names[n++].layer = (int)layer;
    }
    if (!rc) qsort(names, (size_t)n, sizeof *names, compare_layers);
    d->layers = calloc((size_t)n + 1, sizeof *d->layers);
    d->targets = calloc((size_t)n + 1, sizeof *d->targets);
    if (!rc && (!d->layers || !d->targets)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int l = 0; !rc && l < n; l++) {
        const char *name = names[l].name;
        const int layer = names[l].layer;
        if (l > 0 && layer == names[l - 1].layer)
            rc = es_fail(err, ES_ERR_DATA, "%s: /targets/%s and /targets/%s are both student layer %d", d->path, names[l - 1].name,
                         name, layer);
        else if (layer < 1 || layer > d->opt.n_layers)
            rc = es_fail(err, ES_ERR_DATA, "%s: /targets/%s is for student layer %d but the model has %d layers (1..%d)", d->path,
                         name, layer, d->opt.n_layers, d->opt.n_layers);
        if (rc) break;
        d->targets[l].dataset = -1;
        if ((rc = es_rows_open(&d->targets[l], group, name, d->pool, err))) break;
        d->layers[l] = layer;
        d->n_targets = l + 1;
        const es_rows_reader *r = &d->targets[l];
        if (r->rank != 2)
            rc = es_fail(err, ES_ERR_DATA, "%s: /targets/%s is 1-D, expected [%lld, %d]", d->path, name, (long long)d->tokens,
                         d->opt.hidden_size);
        else if (r->width != d->opt.hidden_size)
            rc = es_fail(err, ES_ERR_DATA, "%s: /targets/%s is %lld wide but the model's hidden_size is %d (a student.h5 made for another model?)",
                         d->path, name, (long long)r->width, d->opt.hidden_size);
        else if (r->rows != d->tokens)
            rc = es_fail(err, ES_ERR_DATA, "%s: /targets/%s has %lld rows but the file has %lld tokens", d->path, name,
                         (long long)r->rows, (long long)d->tokens);
        else if (!es_rows_is_float(r)) {
            char type_name[64];
            es_h5_type_name(r->stored, type_name, sizeof type_name);
            rc = es_fail(err, ES_ERR_DATA, "%s: /targets/%s holds %s values, expected floats (bf16)", d->path, name, type_name);
        }
    }
    H5Gclose(group);
    free(names);
    return rc;
}

/* The eval/train split of the header comment. */
static int split(align_data *d, es_error *err) {
    const int64_t S = d->samples;
    int64_t n_eval = llround(d->opt.eval_fraction * (double)S);
    if (d->opt.eval_fraction > 0 && S > 1 && n_eval < 1) n_eval = 1;
    if (n_eval > S - 1) n_eval = S > 0 ? S - 1 : 0;
    d->is_eval = calloc((size_t)(S + 7) / 8, 1);
    int64_t *p = malloc((size_t)S * sizeof *p);
    if (!d->is_eval || !p) {
        free(p);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory for the index of %lld samples", (long long)S);
    }
    for (int64_t i = 0; i < S; i++) p[i] = i;
    uint64_t state = d->opt.seed;
    for (int64_t i = 0; i < n_eval; i++) {
        int64_t j = i + (int64_t)(splitmix64(&state) % (uint64_t)(S - i)), t = p[i];
        p[i] = p[j], p[j] = t;
        d->is_eval[p[i] >> 3] |= (uint8_t)(1u << (p[i] & 7));
    }
    free(p);
    d->n_eval = n_eval, d->n_train = S - n_eval;
    d->eval = malloc((size_t)(n_eval ? n_eval : 1) * sizeof *d->eval);
    d->order = malloc((size_t)(d->n_train ? d->n_train : 1) * sizeof *d->order);
    if (!d->eval || !d->order) return es_fail(err, ES_ERR_RUNTIME, "out of memory for the index of %lld samples", (long long)S);
    int64_t e = 0, train_tokens = 0;
    for (int64_t s = 0; s < S; s++) {
        if (is_eval(d, s)) d->eval[e++] = s;
        else train_tokens += sample_tokens(d, s);
    }
    if (train_tokens == 0)
        return es_fail(err, ES_ERR_DATA, "%s: the %lld training samples have no tokens", d->path, (long long)d->n_train);
    return ES_OK;
}

int align_data_path_is_text(const char *path) {
    size_t n = path ? strlen(path) : 0;
    return n > 6 && !strcmp(path + n - 6, ".jsonl");
}

/* Texts: every record tokenised (common/inputs.h), the ids appended in file order. */
static int open_text(align_data *d, es_error *err) {
    extract_input input;
    int rc = extract_input_open(&input, d->path, d->opt.model_dir, ES_ADD_BOS_AUTO, EXTRACT_DEFAULT_TEMPLATE, 0, 0,
                                d->opt.vocab_size, err);
    int64_t cap_samples = input.total > 0 ? input.total : 1;
    size_t cap_tokens = 0;
    d->token_start = rc ? NULL : malloc((size_t)(cap_samples + 1) * sizeof *d->token_start);
    d->text_names = rc ? NULL : calloc((size_t)cap_samples, sizeof *d->text_names);
    if (!rc && (!d->token_start || !d->text_names)) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory for the index of %lld texts", (long long)cap_samples);
    if (!rc) d->token_start[0] = 0;
    while (!rc) {
        extract_sample sample;
        int got = extract_input_next(&input, &sample, err);
        if (got < 0) rc = err->code ? err->code : ES_ERR_DATA;
        if (got <= 0) break;
        if (d->samples >= cap_samples) { /* more records than counted: cannot happen for a file */
            extract_sample_free(&sample);
            rc = es_fail(err, ES_ERR_DATA, "%s: changed while it was read (more than %lld records)", d->path, (long long)cap_samples);
            break;
        }
        if (grow(&d->text_ids, &cap_tokens, (size_t)(d->tokens + sample.n_tokens), sizeof *d->text_ids)) {
            extract_sample_free(&sample);
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory for the tokens of %s (%lld so far)", d->path, (long long)d->tokens);
            break;
        }
        memcpy(d->text_ids + d->tokens, sample.ids, (size_t)sample.n_tokens * sizeof *d->text_ids);
        d->tokens += sample.n_tokens;
        d->text_names[d->samples] = sample.id, sample.id = NULL;
        d->token_start[++d->samples] = d->tokens;
        extract_sample_free(&sample);
    }
    extract_input_close(&input);
    if (rc) return rc;
    if (d->samples == 0) return es_fail(err, ES_ERR_DATA, "%s: the file has no records (nothing to train on)", d->path);
    return split(d, err);
}

static int open_file(align_data *d, es_error *err) {
    const char *path = d->path;
    int rc = es_h5_open(&d->file, path, err);
    if (rc) return rc;
    char *format = NULL;
    int64_t version = 0;
    if (es_h5_attr_get_str(d->file.id, "format", &format, err) || strcmp(format, "essence.student")) {
        es_error_clear(err);
        rc = es_fail(err, ES_ERR_DATA, "%s: not an essence student file (format = \"%s\", expected \"essence.student\")", path,
                     format ? format : "none");
    }
    free(format);
    if (rc) return rc;
    if (es_h5_attr_get_i64(d->file.id, "format_version", &version, err) || version != 1) {
        es_error_clear(err);
        return es_fail(err, ES_ERR_DATA, "%s: student.h5 format_version %lld is not supported (expected 1)", path, (long long)version);
    }

    es_rows_reader starts;
    rc = open_column(d, &starts, "/samples/token_start", ES_H5_I64, -1, err);
    if (!rc && starts.rows < 1) rc = es_fail(err, ES_ERR_DATA, "%s: /samples/token_start is empty (it has S + 1 values)", path);
    if (!rc) {
        d->samples = starts.rows - 1;
        if (!(d->token_start = malloc((size_t)starts.rows * sizeof *d->token_start)))
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory for the index of %lld samples", (long long)d->samples);
    }
    if (!rc) rc = es_rows_read(&starts, 0, starts.rows, d->token_start, err);
    if (starts.dataset >= 0) es_rows_close_reader(&starts);
    if (rc) return rc;
    if (!rc) rc = open_column(d, &d->ids, "/tokens/id", ES_H5_I32, -1, err);
    if (rc) return rc;
    d->tokens = d->ids.rows;
    if ((rc = open_column(d, &d->teacher_row, "/tokens/teacher_row", ES_H5_I64, d->tokens, err))) return rc;

    if (d->token_start[0] != 0)
        return es_fail(err, ES_ERR_DATA, "%s: /samples/token_start[0] is %lld, not 0", path, (long long)d->token_start[0]);
    for (int64_t s = 0; s < d->samples; s++)
        if (d->token_start[s + 1] < d->token_start[s])
            return es_fail(err, ES_ERR_DATA, "%s: /samples/token_start decreases at sample %lld", path, (long long)s);
    if (d->token_start[d->samples] != d->tokens)
        return es_fail(err, ES_ERR_DATA, "%s: /samples/token_start ends at %lld but /tokens/id has %lld rows", path,
                       (long long)d->token_start[d->samples], (long long)d->tokens);
    hid_t ids = H5Lexists(d->file.id, "/samples/id", H5P_DEFAULT) > 0 ? H5Dopen2(d->file.id, "/samples/id", H5P_DEFAULT) : -1;
    hid_t space = ids >= 0 ? H5Dget_space(ids) : -1;
    hssize_t n_ids = space >= 0 ? H5Sget_simple_extent_npoints(space) : -1;
    if (space >= 0) H5Sclose(space);
    if (ids >= 0) H5Dclose(ids);
    if (n_ids != d->samples)
        return es_fail(err, ES_ERR_DATA, "%s: /samples/id has %lld entries but /samples/token_start describes %lld samples", path,
                       (long long)n_ids, (long long)d->samples);
    if (d->samples == 0) return es_fail(err, ES_ERR_DATA, "%s: the file has no samples (nothing to train on)", path);
    if (d->tokens == 0) return es_fail(err, ES_ERR_DATA, "%s: the file has no tokens (its %lld samples are empty)", path, (long long)d->samples);
    if ((rc = open_targets(d, err))) return rc;
    return split(d, err);
}

int align_data_open(align_data **out, const align_data_options *options, es_error *err) {
    *out = NULL;
    int rc = options_check(options, err);
    if (rc) return rc;
    align_data *d = calloc(1, sizeof *d);
    if (!d) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    d->opt = *options;
    d->file.id = -1;
    d->ids.dataset = d->teacher_row.dataset = -1;
    d->order_epoch = -1;
    pthread_mutex_init(&d->lock, NULL);
    pthread_cond_init(&d->cond, NULL);
    if (!(d->path = strdup(options->path))) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    d->opt.path = d->path;
    /* Decompression overlaps training already (prefetch); a few workers keep one batch's read
     * short without taking the trainer's cores. */
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (!rc && !(d->pool = es_pool_create(cpus >= 4 ? 4 : cpus > 1 ? (int)cpus : 1)))
        rc = es_fail(err, ES_ERR_RUNTIME, "cannot start the data reader's threads");
    d->text = align_data_path_is_text(d->path);
    if (!rc) rc = d->text ? open_text(d, err) : open_file(d, err);
    for (int i = 0; !rc && i < 2; i++) {
        batch_buffer *b = &d->buffers[i];
        if (!(b->batch.targets = calloc((size_t)d->n_targets + 1, sizeof *b->batch.targets))) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    if (!rc) {
        if (pthread_create(&d->thread, NULL, prefetch_main, d)) rc = es_fail(err, ES_ERR_RUNTIME, "cannot start the prefetch thread");
        else d->thread_started = 1;
    }
    if (rc) {
        align_data_close(d);
        return rc;
    }
    *out = d;
    return ES_OK;
}

void align_data_close(align_data *d) {
    if (!d) return;
    if (d->thread_started) {
        pthread_mutex_lock(&d->lock);
        d->quit = 1;
        pthread_cond_broadcast(&d->cond);
        pthread_mutex_unlock(&d->lock);
        pthread_join(d->thread, NULL);
    }
    for (int i = 0; i < 2; i++) {
        batch_buffer *b = &d->buffers[i];
        for (int l = 0; b->batch.targets && l < d->n_targets; l++) free(b->batch.targets[l]);
        free(b->batch.targets), free(b->batch.seq_start), free(b->batch.ids), free(b->batch.labels), free(b->batch.mask);
        free(b->batch.sample), free(b->pieces), free(b->cum), free(b->teacher_row);
    }
    for (int l = 0; d->targets && l < d->n_targets; l++)
        if (d->targets[l].dataset >= 0) es_rows_close_reader(&d->targets[l]);
    if (d->ids.dataset >= 0) es_rows_close_reader(&d->ids);
    if (d->teacher_row.dataset >= 0) es_rows_close_reader(&d->teacher_row);
    if (d->file.id >= 0) es_h5_close(&d->file, 0);
    if (d->pool) es_pool_destroy(d->pool);
    pthread_mutex_destroy(&d->lock);
    pthread_cond_destroy(&d->cond);
    for (int64_t s = 0; d->text_names && s < d->samples; s++) free(d->text_names[s]);
    free(d->text_names), free(d->text_ids);
    free(d->targets), free(d->layers), free(d->token_start), free(d->is_eval), free(d->eval), free(d->order), free(d->path);
    free(d);
}

int align_data_target_layers(const align_data *d, const int **layers) {
    *layers = d->layers;
    return d->n_targets;
}

int64_t align_data_train_samples(const align_data *d) { return d->n_train; }
int64_t align_data_eval_samples(const align_data *d) { return d->n_eval; }

/* ---- batches --------------------------------------------------------------------------- */

int align_data_next_train(align_data *d, align_batch *batch, es_error *err) {
    if (!d->pending) prefetch_request(d, d->pos);
    pthread_mutex_lock(&d->lock);
    while (!d->ready) pthread_cond_wait(&d->cond, &d->lock);
    d->ready = 0, d->pending = 0;
    pthread_mutex_unlock(&d->lock);
    batch_buffer *b = &d->buffers[1 - d->current];
    if (b->rc) return es_fail(err, b->rc, "%s", b->err.msg);
    d->current = 1 - d->current;
    d->pos = b->end;
    prefetch_request(d, d->pos);
    *batch = b->batch;
    return ES_OK;
}

align_data_position align_data_get_position(const align_data *d) { return d->pos; }

int align_data_set_position(align_data *d, align_data_position p, es_error *err) {
    prefetch_cancel(d);
    if (p.epoch < 0 || p.index < 0 || p.index > d->n_train || p.piece < 0)
        return es_fail(err, ES_ERR_DATA, "%s: data position (epoch %lld, sample %lld, piece %lld) is outside the %lld training samples",
                       d->path, (long long)p.epoch, (long long)p.index, (long long)p.piece, (long long)d->n_train);
    if (p.index < d->n_train) {
        build_order(d, p.epoch);
        int64_t n = sample_tokens(d, d->order[p.index]);
        if (p.piece > 0 && p.piece * (int64_t)d->opt.seq_len >= n)
            return es_fail(err, ES_ERR_DATA, "%s: data position (epoch %lld, sample %lld, piece %lld) is past that sample's %lld tokens "
                           "(was the checkpoint made with another --seq-len or data file?)",
                           d->path, (long long)p.epoch, (long long)p.index, (long long)p.piece, (long long)n);
    } else if (p.piece != 0) {
        return es_fail(err, ES_ERR_DATA, "%s: data position (epoch %lld, sample %lld, piece %lld) is past the end of the epoch", d->path,
                       (long long)p.epoch, (long long)p.index, (long long)p.piece);
    }
    d->pos = p;
    return ES_OK;
}

int align_data_eval_begin(align_data *d, es_error *err) {
    (void)err;
    prefetch_cancel(d);
    d->eval_pos = (align_data_position){0, 0, 0};
    d->eval_started = 1;
    return ES_OK;
}

int align_data_eval_next(align_data *d, align_batch *batch, es_error *err) {
    if (!d->eval_started) {
        es_fail(err, ES_ERR_RUNTIME, "align_data_eval_next without align_data_eval_begin");
        return -1;
    }
    prefetch_cancel(d); /* no-op unless a training batch was asked for since eval_begin */
    batch_buffer *b = &d->buffers[1 - d->current];
    int rc = fill(d, b, 1, &d->eval_pos, err);
    if (rc) return -1;
    if (b->batch.global_tokens == 0) {
        d->eval_started = 0;
        return 0;
    }
    *batch = b->batch;
    return 1;
}
