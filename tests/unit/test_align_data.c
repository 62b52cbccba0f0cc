/* essence-align's data stream (align/data.h) on small student.h5 files made with project's own
 * writer: the eval split, the epoch orders, pieces and labels, masks and bf16 targets, the rank
 * split against one rank with the whole batch, exact resume, and the errors. Every value in the
 * files is a function of (sample, token), so a batch can be checked token by token. */
#include <hdf5.h>
#include <math.h>
#include <stdint.h>
#include <time.h>

#include "../testlib.h"
#include "data.h"
#include "h5file.h"
#include "student.h"

enum { D = 8, VOCAB = 100 };
static const int LAYERS[2] = {2, 4};

static int id_of(int s, int t) { return (s * 31 + t * 7) % 97 + 1; }
static int aligned_of(int s, int t) { return (s + t) % 3 != 0; }
/* Exact in bf16: small integers and multiples of 0.5 (s, t < 256). */
static float target_of(int s, int t, int layer, int k) { return k == 0 ? (float)s : k == 1 ? (float)t : k == 2 ? (float)layer : 0.5f * (float)k; }

typedef struct file_spec {
    int S;
    const int *lens;
    int n_layers;                      /* target layers written: LAYERS[0 .. n_layers) */
    int bad_sample, bad_token, bad_layer; /* a NaN target there (bad_layer: an index), or -1 */
    float bad_value;
    int bad_id_sample;                 /* token 1 of that sample gets id VOCAB, or -1 */
} file_spec;

static int make_file(const char *path, const file_spec *spec) {
    es_error err = {0};
    student_writer w;
    int rc = student_create(&w, path, LAYERS, spec->n_layers, D, NULL, &err);
    for (int s = 0; !rc && s < spec->S; s++) {
        int n = spec->lens[s];
        int32_t ids[256], spans[256][2];
        int64_t rows[256];
        static float target[256 * D];
        for (int t = 0; t < n; t++) {
            ids[t] = s == spec->bad_id_sample && t == 1 ? VOCAB : id_of(s, t);
            spans[t][0] = 0, spans[t][1] = 1;
            rows[t] = aligned_of(s, t) ? 1000 + s * 256 + t : -1;
        }
        char id[32];
        snprintf(id, sizeof id, "id-%d", s);
        rc = student_add_sample(&w, id, "abc", 3, 0, 1, ids, (const int32_t(*)[2])spans, rows, n, &err);
        for (int l = 0; !rc && l < spec->n_layers; l++) {
            for (int t = 0; t < n; t++)
                for (int k = 0; k < D; k++)
                    target[t * D + k] = s == spec->bad_sample && t == spec->bad_token && l == spec->bad_layer && k == 5
                                            ? spec->bad_value
                                            : target_of(s, t, LAYERS[l], k);
            if (n) rc = student_add_targets(&w, l, target, n, &err);
        }
    }
    if (!rc) rc = student_finish(&w, NULL, 0, &err);
    if (rc) printf("  make_file %s: %s\n", path, err.msg);
    return rc;
}

/* 40 samples of 3..13 tokens. */
static int split_lens[40];
static char split_path[1024], pieces_path[1024];
static const int piece_lens[5] = {10, 3, 25, 0, 8};

static align_data_options base_options(const char *path) {
    align_data_options o = {.path = path, .hidden_size = D, .n_layers = 4, .vocab_size = VOCAB, .eval_fraction = 0.25,
                            .seed = 7, .shuffle = 1, .seq_len = 16, .batch_tokens = 64, .rank = 0, .world = 1};
    return o;
}

/* ---- copies of batches, for comparisons -------------------------------------------------- */

typedef struct saved {
    int T, n_seqs;
    int32_t *seq_start, *ids, *labels;
    uint8_t *mask;
    float *targets; /* [2][T][D] */
    int64_t *sample, global[3];
} saved;

static void saved_free(saved *s) {
    free(s->seq_start), free(s->ids), free(s->labels), free(s->mask), free(s->targets), free(s->sample);
    memset(s, 0, sizeof *s);
}

/* Appends batch b to s (seq_start shifted): the concatenation of ranks. */
static void saved_append(saved *s, const align_batch *b) {
    int T = s->T + b->T, n = s->n_seqs + b->n_seqs;
    s->seq_start = realloc(s->seq_start, sizeof(int32_t) * (size_t)(n + 1));
    s->ids = realloc(s->ids, sizeof(int32_t) * (size_t)(T + 1));
    s->labels = realloc(s->labels, sizeof(int32_t) * (size_t)(T + 1));
    s->mask = realloc(s->mask, (size_t)T + 1);
    s->sample = realloc(s->sample, sizeof(int64_t) * (size_t)(n + 1));
    float *targets = malloc(sizeof(float) * 2 * (size_t)(T + 1) * D);
    for (int l = 0; l < 2; l++) {
        if (s->T) memcpy(targets + (size_t)l * T * D, s->targets + (size_t)l * s->T * D, sizeof(float) * (size_t)s->T * D);
        if (b->T) memcpy(targets + ((size_t)l * T + s->T) * D, b->targets[l], sizeof(float) * (size_t)b->T * D);
    }
    free(s->targets);
    s->targets = targets;
    if (s->n_seqs == 0) s->seq_start[0] = 0;
    for (int i = 0; i < b->n_seqs; i++) {
        s->seq_start[s->n_seqs + i + 1] = s->T + b->seq_start[i + 1];
        s->sample[s->n_seqs + i] = b->sample[i];
    }
    if (b->T) {
        memcpy(s->ids + s->T, b->ids, sizeof(int32_t) * (size_t)b->T);
        memcpy(s->labels + s->T, b->labels, sizeof(int32_t) * (size_t)b->T);
        memcpy(s->mask + s->T, b->mask, (size_t)b->T);
    }
    s->global[0] = b->global_tokens, s->global[1] = b->global_aligned, s->global[2] = b->global_labels;
    s->T = T, s->n_seqs = n;
}

static int saved_equal(const saved *a, const saved *b) {
    if (a->T != b->T || a->n_seqs != b->n_seqs || memcmp(a->global, b->global, sizeof a->global)) return 0;
    return !memcmp(a->seq_start, b->seq_start, sizeof(int32_t) * (size_t)(a->n_seqs + 1)) &&
           !memcmp(a->sample, b->sample, sizeof(int64_t) * (size_t)a->n_seqs) &&
           !memcmp(a->ids, b->ids, sizeof(int32_t) * (size_t)a->T) && !memcmp(a->labels, b->labels, sizeof(int32_t) * (size_t)a->T) &&
           !memcmp(a->mask, b->mask, (size_t)a->T) && !memcmp(a->targets, b->targets, sizeof(float) * 2 * (size_t)a->T * D);
}

/* The next n training batches. */
static int take(align_data *data, saved *out, int n) {
    es_error err = {0};
    for (int i = 0; i < n; i++) {
        align_batch b;
        if (align_data_next_train(data, &b, &err)) {
            printf("  next_train: %s\n", err.msg);
            return -1;
        }
        saved_append(&out[i], &b);
    }
    return 0;
}

/* The samples of the first n sequences of training (each a whole sample when seq_len is large). */
static int train_samples(const align_data_options *o, int64_t *out, int n) {
    es_error err = {0};
    align_data *data;
    if (align_data_open(&data, o, &err)) return printf("  open: %s\n", err.msg), -1;
    int got = 0;
    while (got < n) {
        align_batch b;
        if (align_data_next_train(data, &b, &err)) break;
        for (int i = 0; i < b.n_seqs && got < n; i++) out[got++] = b.sample[i];
    }
    align_data_close(data);
    return got == n ? 0 : -1;
}

/* Every eval sequence's sample, in order; returns their count or -1. */
static int eval_samples(align_data *data, int64_t *out, int cap) {
    es_error err = {0};
    if (align_data_eval_begin(data, &err)) return -1;
    int got = 0, rc;
    align_batch b;
    while ((rc = align_data_eval_next(data, &b, &err)) == 1)
        for (int i = 0; i < b.n_seqs && got < cap; i++) out[got++] = b.sample[i];
    return rc == 0 ? got : -1;
}

/* ---- tests ------------------------------------------------------------------------------- */

TEST(eval_split) {
    es_error err = {0};
    align_data_options o = base_options(split_path);
    align_data *data;
    REQUIRE(align_data_open(&data, &o, &err) == ES_OK);
    CHECK(align_data_train_samples(data) == 30 && align_data_eval_samples(data) == 10);
    const int *layers;
    CHECK(align_data_target_layers(data, &layers) == 2 && layers[0] == 2 && layers[1] == 4);
    int64_t eval[40], again[40], other[40], train[30];
    int n = eval_samples(data, eval, 40);
    CHECKF(n == 10, "%d eval sequences", n);
    for (int i = 1; i < n; i++) CHECKF(eval[i] > eval[i - 1], "eval sample %lld after %lld", (long long)eval[i], (long long)eval[i - 1]);
    /* a second pass gives the same */
    CHECK(eval_samples(data, again, 40) == 10 && memcmp(eval, again, sizeof(int64_t) * 10) == 0);
    align_data_close(data);
    /* the same seed chooses the same samples, another seed others */
    REQUIRE(align_data_open(&data, &o, &err) == ES_OK);
    CHECK(eval_samples(data, again, 40) == 10 && memcmp(eval, again, sizeof(int64_t) * 10) == 0);
    align_data_close(data);
    o.seed = 8;
    REQUIRE(align_data_open(&data, &o, &err) == ES_OK);
    CHECK(eval_samples(data, other, 40) == 10 && memcmp(eval, other, sizeof(int64_t) * 10) != 0);
    align_data_close(data);
    /* train = the other samples, in file order without shuffle */
    o.seed = 7, o.shuffle = 0;
    REQUIRE(train_samples(&o, train, 30) == 0);
    int seen[40] = {0};
    for (int i = 0; i < 10; i++) seen[eval[i]]++;
    for (int i = 0; i < 30; i++) {
        seen[train[i]]++;
        if (i) CHECK(train[i] > train[i - 1]);
    }
    for (int s = 0; s < 40; s++) CHECKF(seen[s] == 1, "sample %d is in %d sets", s, seen[s]);
    /* sizes: round(f·S), at least one, at most S − 1; f = 0: none */
    const double fractions[] = {0, 0.001, 0.1, 0.99};
    const int64_t expected[] = {0, 1, 4, 39};
    for (int i = 0; i < 4; i++) {
        o.eval_fraction = fractions[i];
        REQUIRE(align_data_open(&data, &o, &err) == ES_OK);
        CHECKF(align_data_eval_samples(data) == expected[i] && align_data_train_samples(data) == 40 - expected[i],
               "fraction %g: %lld eval", fractions[i], (long long)align_data_eval_samples(data));
        CHECK(eval_samples(data, other, 40) == expected[i]);
        align_data_close(data);
    }
    o.eval_fraction = 1;
    CHECK(align_data_open(&data, &o, &err) == ES_ERR_USAGE && data == NULL);
}

TEST(epoch_orders) {
    align_data_options o = base_options(split_path);
    int64_t seq[90], again[90], other[90], file_order[30];
    REQUIRE(train_samples(&o, seq, 90) == 0);
    REQUIRE(train_samples(&o, again, 90) == 0);
    CHECK(memcmp(seq, again, sizeof seq) == 0);
    o.shuffle = 0;
    REQUIRE(train_samples(&o, other, 90) == 0);
    memcpy(file_order, other, sizeof file_order);
    for (int e = 0; e < 3; e++) {
        CHECKF(memcmp(other + 30 * e, file_order, sizeof file_order) == 0, "epoch %d without shuffle", e);
        /* with shuffle each epoch is a permutation of the train set, and differs from file order */
        int64_t sorted[30];
        memcpy(sorted, seq + 30 * e, sizeof sorted);
        for (int i = 1; i < 30; i++)
            for (int j = i; j > 0 && sorted[j] < sorted[j - 1]; j--) {
                int64_t t = sorted[j];
                sorted[j] = sorted[j - 1], sorted[j - 1] = t;
            }
        CHECKF(memcmp(sorted, file_order, sizeof sorted) == 0, "epoch %d is not a permutation of the train set", e);
        CHECK(memcmp(seq + 30 * e, file_order, sizeof file_order) != 0);
    }
    CHECK(memcmp(seq, seq + 30, sizeof file_order) != 0 && memcmp(seq + 30, seq + 60, sizeof file_order) != 0);
    o.shuffle = 1, o.seed = 9;
    REQUIRE(train_samples(&o, other, 90) == 0);
    CHECK(memcmp(seq, other, sizeof seq) != 0);
}

/* lens {10, 3, 25, 0, 8}, seq_len 8, cap 12, file order: the pieces and batches by hand. */
TEST(pieces_and_labels) {
    es_error err = {0};
    align_data_options o = base_options(pieces_path);
    o.eval_fraction = 0, o.shuffle = 0, o.seq_len = 8, o.batch_tokens = 12;
    align_data *data;
    REQUIRE(align_data_open(&data, &o, &err) == ES_OK);
    static const struct { int sample, first, len; } pieces[] = {{0, 0, 8}, {0, 8, 2}, {1, 0, 3}, {2, 0, 8}, {2, 8, 8},
                                                                {2, 16, 8}, {2, 24, 1}, {4, 0, 8}, {0, 0, 8}, {0, 8, 2}};
    static const int per_batch[] = {2, 2, 1, 2, 1, 2};
    static const align_data_position after[] = {{0, 1, 0}, {0, 2, 1}, {0, 2, 2}, {0, 4, 0}, {1, 0, 0}, {1, 1, 0}};
    int next = 0;
    for (int k = 0; k < 6; k++) {
        align_batch b;
        REQUIRE(align_data_next_train(data, &b, &err) == ES_OK);
        CHECKF(b.n_seqs == per_batch[k], "batch %d has %d sequences", k, b.n_seqs);
        if (b.n_seqs != per_batch[k]) break;
        int64_t aligned = 0;
        for (int i = 0; i < b.n_seqs; i++, next++) {
            const int s = pieces[next].sample, first = pieces[next].first, len = pieces[next].len;
            CHECKF(b.sample[i] == s && b.seq_start[i + 1] - b.seq_start[i] == len, "batch %d sequence %d: sample %lld, %d tokens", k, i,
                   (long long)b.sample[i], b.seq_start[i + 1] - b.seq_start[i]);
            for (int j = 0; j < len; j++) {
                const int t = b.seq_start[i] + j, token = first + j;
                CHECKF(b.ids[t] == id_of(s, token), "batch %d token %d", k, t);
                const int label = j + 1 < len ? id_of(s, token + 1) : -1;
                CHECKF(b.labels[t] == label, "batch %d token %d: label %d, expected %d", k, t, b.labels[t], label);
                CHECKF(b.mask[t] == aligned_of(s, token), "batch %d token %d: mask", k, t);
                aligned += b.mask[t];
                for (int l = 0; l < 2; l++)
                    for (int c = 0; c < D; c++)
                        CHECKF(b.targets[l][t * D + c] == target_of(s, token, LAYERS[l], c), "batch %d token %d layer %d [%d] = %g", k, t,
                               LAYERS[l], c, b.targets[l][t * D + c]);
            }
        }
        CHECK(b.seq_start[0] == 0 && b.T == b.seq_start[b.n_seqs]);
        CHECK(b.global_tokens == b.T && b.global_labels == b.T - b.n_seqs && b.global_aligned == aligned);
        align_data_position p = align_data_get_position(data);
        CHECKF(p.epoch == after[k].epoch && p.index == after[k].index && p.piece == after[k].piece,
               "after batch %d: (%lld, %lld, %lld)", k, (long long)p.epoch, (long long)p.index, (long long)p.piece);
    }
    align_data_close(data);
    /* a piece longer than batch_tokens still makes a batch of its own */
    o.batch_tokens = 5;
    REQUIRE(align_data_open(&data, &o, &err) == ES_OK);
    align_batch b;
    REQUIRE(align_data_next_train(data, &b, &err) == ES_OK);
    CHECK(b.n_seqs == 1 && b.T == 8 && b.global_tokens == 8);
    REQUIRE(align_data_next_train(data, &b, &err) == ES_OK); /* 2 + 3 tokens: exactly batch_tokens fits */
    CHECK(b.n_seqs == 2 && b.T == 5 && b.sample[0] == 0 && b.sample[1] == 1);
    align_data_close(data);
}

/* Ranks 0..world−1 with batch_tokens B, concatenated, against one rank with world·B. */
static void check_ranks(const char *tl_name, int world, int B, int seq_len, int n_batches) {
    es_error err = {0};
    align_data_options o = base_options(split_path);
    o.seq_len = seq_len, o.batch_tokens = B * world;
    align_data *one, *ranks[4];
    saved whole[16] = {{0}}, joined[16] = {{0}}, whole_eval[16] = {{0}}, joined_eval[16] = {{0}};
    REQUIRE(align_data_open(&one, &o, &err) == ES_OK);
    REQUIRE(take(one, whole, n_batches) == 0);
    align_batch b;
    int n_eval = 0;
    REQUIRE(align_data_eval_begin(one, &err) == ES_OK);
    while (n_eval < 16 && align_data_eval_next(one, &b, &err) == 1) saved_append(&whole_eval[n_eval++], &b);
    align_data_close(one);
    o.world = world, o.batch_tokens = B;
    for (int r = 0; r < world; r++) {
        o.rank = r;
        REQUIRE(align_data_open(&ranks[r], &o, &err) == ES_OK);
    }
    int empty = 0;
    for (int k = 0; k < n_batches; k++) {
        int64_t sum = 0;
        for (int r = 0; r < world; r++) {
            REQUIRE(align_data_next_train(ranks[r], &b, &err) == ES_OK);
            sum += b.T, empty += b.T == 0;
            saved_append(&joined[k], &b);
            CHECKF(b.global_tokens == whole[k].T, "batch %d rank %d: global_tokens %lld, one rank has %d", k, r, (long long)b.global_tokens,
                   whole[k].T);
        }
        CHECK(sum == whole[k].global[0]);
        CHECKF(saved_equal(&joined[k], &whole[k]), "batch %d: the ranks' union differs from one rank's batch", k);
        CHECK(whole[k].global[2] == whole[k].T - whole[k].n_seqs);
        int64_t aligned = 0;
        for (int t = 0; t < whole[k].T; t++) aligned += whole[k].mask[t];
        CHECK(whole[k].global[1] == aligned);
    }
    CHECKF(empty == 0, "%d empty rank batches", empty);
    for (int r = 0; r < world; r++) REQUIRE(align_data_eval_begin(ranks[r], &err) == ES_OK);
    for (int k = 0; k < n_eval; k++) {
        for (int r = 0; r < world; r++) {
            REQUIRE(align_data_eval_next(ranks[r], &b, &err) == 1);
            saved_append(&joined_eval[k], &b);
        }
        CHECKF(saved_equal(&joined_eval[k], &whole_eval[k]), "eval batch %d differs", k);
    }
    for (int r = 0; r < world; r++) {
        CHECK(align_data_eval_next(ranks[r], &b, &err) == 0);
        align_data_close(ranks[r]);
    }
    for (int k = 0; k < 16; k++) saved_free(&whole[k]), saved_free(&joined[k]), saved_free(&whole_eval[k]), saved_free(&joined_eval[k]);
}

TEST(rank_split_two) { check_ranks(tl_name, 2, 20, 5, 14); } /* ~240 train tokens: crosses epochs */
TEST(rank_split_three) { check_ranks(tl_name, 3, 13, 7, 12); }

TEST(rank_split_few_pieces) {
    /* seq_len > batch_tokens: a global batch can be a single piece; the other rank gets none */
    es_error err = {0};
    align_data_options o = base_options(split_path);
    o.seq_len = 16, o.batch_tokens = 4, o.world = 2;
    align_data *r0, *r1;
    REQUIRE(align_data_open(&r0, &o, &err) == ES_OK);
    o.rank = 1;
    REQUIRE(align_data_open(&r1, &o, &err) == ES_OK);
    align_batch a, b;
    REQUIRE(align_data_next_train(r0, &a, &err) == ES_OK && align_data_next_train(r1, &b, &err) == ES_OK);
    CHECK(a.n_seqs == 1 && b.n_seqs == 0 && b.T == 0 && b.seq_start[0] == 0);
    CHECK(a.global_tokens == a.T && b.global_tokens == a.T && b.global_labels == a.T - 1 && b.global_aligned == a.global_aligned);
    align_data_close(r0), align_data_close(r1);
}

TEST(resume_position) {
    es_error err = {0};
    align_data_options o = base_options(split_path);
    o.seq_len = 5, o.batch_tokens = 30;
    align_data *a, *b;
    saved reference[20] = {{0}}, replay[20] = {{0}};
    REQUIRE(align_data_open(&a, &o, &err) == ES_OK);
    align_data_position positions[21];
    positions[0] = align_data_get_position(a);
    for (int k = 0; k < 20; k++) {
        REQUIRE(take(a, &reference[k], 1) == 0);
        positions[k + 1] = align_data_get_position(a);
    }
    int mid_sample = 0, later_epoch = 0;
    for (int k = 0; k <= 14; k += 2) {
        mid_sample += positions[k].piece > 0;
        later_epoch += positions[k].epoch > 0;
        REQUIRE(align_data_open(&b, &o, &err) == ES_OK);
        REQUIRE(align_data_set_position(b, positions[k], &err) == ES_OK);
        REQUIRE(take(b, replay, 5) == 0);
        for (int i = 0; i < 5; i++) {
            CHECKF(saved_equal(&replay[i], &reference[k + i]), "resumed at batch %d: batch %d differs", k, k + i);
            saved_free(&replay[i]);
        }
        align_data_close(b);
    }
    CHECKF(mid_sample > 0 && later_epoch > 0, "the positions tried: %d inside a sample, %d in a later epoch", mid_sample, later_epoch);
    /* set_position on a running stream (its prefetched batch is dropped) */
    REQUIRE(align_data_set_position(a, positions[3], &err) == ES_OK);
    REQUIRE(take(a, replay, 4) == 0);
    for (int i = 0; i < 4; i++) {
        CHECKF(saved_equal(&replay[i], &reference[3 + i]), "batch %d after set_position on a running stream", 3 + i);
        saved_free(&replay[i]);
    }
    /* an eval pass between training batches changes nothing */
    REQUIRE(align_data_set_position(a, positions[0], &err) == ES_OK);
    REQUIRE(take(a, replay, 2) == 0);
    int64_t samples[40];
    /* Give the prefetch of batch 2 time to finish: an eval that did not stop the prefetcher
     * would then overwrite that batch. */
    nanosleep(&(struct timespec){0, 50 * 1000 * 1000}, NULL);
    CHECK(eval_samples(a, samples, 40) >= 10); /* sequences: some eval samples are cut in pieces */
    REQUIRE(take(a, replay + 2, 3) == 0);
    for (int i = 0; i < 5; i++) {
        CHECKF(saved_equal(&replay[i], &reference[i]), "batch %d with an eval pass after batch 1", i);
        saved_free(&replay[i]);
    }
    /* positions that cannot come from this data */
    align_data_position bad = {0, 31, 0};
    CHECK(align_data_set_position(a, bad, &err) == ES_ERR_DATA);
    es_error_clear(&err);
    bad = (align_data_position){0, 0, 9};
    CHECK(align_data_set_position(a, bad, &err) == ES_ERR_DATA && strstr(err.msg, "piece 9"));
    align_data_close(a);
    for (int k = 0; k < 20; k++) saved_free(&reference[k]);
}

/* Opens with `o` and returns the first error of opening or of reading `batches` batches. */
static int first_error(const align_data_options *o, int batches, es_error *err) {
    align_data *data;
    int rc = align_data_open(&data, o, err);
    if (rc) return rc;
    align_batch b;
    for (int i = 0; !rc && i < batches; i++) rc = align_data_next_train(data, &b, err);
    align_data_close(data);
    return rc;
}

TEST(errors_in_the_file) {
    es_error err = {0};
    align_data_options o = base_options(pieces_path);
    o.hidden_size = 16;
    CHECK(first_error(&o, 0, &err) == ES_ERR_DATA && strstr(err.msg, pieces_path) && strstr(err.msg, "/targets/layer_002") &&
          strstr(err.msg, " 8 wide") && strstr(err.msg, "16"));
    es_error_clear(&err);
    o = base_options(pieces_path);
    o.n_layers = 3;
    CHECKF(first_error(&o, 0, &err) == ES_ERR_DATA && strstr(err.msg, "layer 4") && strstr(err.msg, "3 layers"), "%s", err.msg);
    es_error_clear(&err);

    file_spec spec = {.S = 0, .lens = piece_lens, .n_layers = 2, .bad_sample = -1, .bad_id_sample = -1};
    char path[1024];
    snprintf(path, sizeof path, "%s", test_path("empty.h5"));
    REQUIRE(make_file(path, &spec) == 0);
    o = base_options(path);
    CHECKF(first_error(&o, 0, &err) == ES_ERR_DATA && strstr(err.msg, path) && strstr(err.msg, "has no samples"), "%s", err.msg);
    es_error_clear(&err);
    static const int zeros[3] = {0, 0, 0};
    spec.S = 3, spec.lens = zeros;
    snprintf(path, sizeof path, "%s", test_path("no-tokens.h5"));
    REQUIRE(make_file(path, &spec) == 0);
    CHECKF(first_error(&o, 0, &err) == ES_ERR_DATA && strstr(err.msg, "has no tokens"), "%s", err.msg);
    es_error_clear(&err);
    spec.S = 5, spec.lens = piece_lens, spec.n_layers = 0;
    snprintf(path, sizeof path, "%s", test_path("no-targets.h5"));
    REQUIRE(make_file(path, &spec) == 0);
    CHECKF(first_error(&o, 0, &err) == ES_ERR_DATA && strstr(err.msg, "has no targets"), "%s", err.msg);
    es_error_clear(&err);

    /* NaN and infinity in a target row: found while reading, named by sample index and id */
    const float bad[2] = {NAN, -INFINITY};
    for (int i = 0; i < 2; i++) {
        spec = (file_spec){.S = 5, .lens = piece_lens, .n_layers = 2, .bad_sample = 2, .bad_token = 19, .bad_layer = 1,
                           .bad_value = bad[i], .bad_id_sample = -1};
        snprintf(path, sizeof path, "%s", test_path(i ? "inf.h5" : "nan.h5"));
        REQUIRE(make_file(path, &spec) == 0);
        o = base_options(path);
        o.eval_fraction = 0, o.shuffle = 0, o.seq_len = 8, o.batch_tokens = 8; /* token 19: the fifth batch */
        CHECKF(first_error(&o, 8, &err) == ES_ERR_DATA && strstr(err.msg, path) &&
                   strstr(err.msg, "sample 2 (\"id-2\"): target layer 4 has a non-finite value at token 19"),
               "%s", err.msg);
        es_error_clear(&err);
        /* the batches before it are fine */
        CHECKF(first_error(&o, 4, &err) == ES_OK, "%s", err.msg);
    }
    spec = (file_spec){.S = 5, .lens = piece_lens, .n_layers = 2, .bad_sample = -1, .bad_id_sample = 1};
    snprintf(path, sizeof path, "%s", test_path("bad-id.h5"));
    REQUIRE(make_file(path, &spec) == 0);
    o = base_options(path);
    o.eval_fraction = 0;
    CHECKF(first_error(&o, 3, &err) == ES_ERR_DATA && strstr(err.msg, "sample 1 (\"id-1\"): token 1 has id 100"), "%s", err.msg);
    es_error_clear(&err);

    /* another format version */
    hid_t id = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    REQUIRE(id >= 0);
    CHECK(es_h5_attr_set_i64(id, "format_version", 2, &err) == ES_OK);
    H5Fclose(id);
    CHECKF(first_error(&o, 0, &err) == ES_ERR_DATA && strstr(err.msg, "format_version 2"), "%s", err.msg);
    es_error_clear(&err);
}

TEST(errors_of_the_input) {
    es_error err = {0};
    align_data_options o = base_options(test_path("missing.h5"));
    align_data *data = (align_data *)&err;
    CHECKF(align_data_open(&data, &o, &err) == ES_ERR_USAGE && data == NULL && strstr(err.msg, "missing.h5"), "%s", err.msg);
    es_error_clear(&err);
    /* an HDF5 file of something else */
    char path[1024];
    snprintf(path, sizeof path, "%s", test_path("foreign.h5"));
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    REQUIRE(file >= 0);
    hsize_t n = 4;
    hid_t space = H5Screate_simple(1, &n, NULL);
    hid_t dataset = H5Dcreate2(file, "/values", H5T_NATIVE_INT, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    CHECK(dataset >= 0);
    H5Dclose(dataset), H5Sclose(space), H5Fclose(file);
    o = base_options(path);
    CHECKF(first_error(&o, 0, &err) == ES_ERR_DATA && strstr(err.msg, path) && strstr(err.msg, "not an essence student file"), "%s",
           err.msg);
    es_error_clear(&err);
    /* the teacher's format is not the student's */
    REQUIRE((file = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT)) >= 0);
    CHECK(es_h5_attr_set_str(file, "format", "essence.teacher", &err) == ES_OK);
    H5Fclose(file);
    CHECKF(first_error(&o, 0, &err) == ES_ERR_DATA && strstr(err.msg, "\"essence.teacher\""), "%s", err.msg);
    es_error_clear(&err);
    /* not HDF5 at all */
    snprintf(path, sizeof path, "%s", test_path("text.h5"));
    FILE *f = fopen(path, "w");
    REQUIRE(f);
    fputs("{\"id\": 1}\n", f);
    fclose(f);
    o = base_options(path);
    CHECKF(first_error(&o, 0, &err) == ES_ERR_DATA, "%s", err.msg);
    es_error_clear(&err);
    /* options the command line should not have let through */
    o = base_options(split_path);
    o.world = 2, o.rank = 2;
    CHECK(first_error(&o, 0, &err) == ES_ERR_USAGE);
    es_error_clear(&err);
    o = base_options(split_path);
    o.seq_len = 0;
    CHECK(first_error(&o, 0, &err) == ES_ERR_USAGE);
    es_error_clear(&err);
}

/* A JSONL of {"id","ids"} records with split.h5's samples gives the same batches (pieces, ids,
 * labels, sample indices, global counts), the same eval split and the same resumed positions,
 * on one rank and two; with no targets: no target layers, every mask 0, nothing aligned. */
static int same_as_h5(const align_batch *a, const align_batch *t) {
    if (a->T != t->T || a->n_seqs != t->n_seqs || a->global_tokens != t->global_tokens || a->global_labels != t->global_labels ||
        t->global_aligned != 0)
        return 0;
    for (int i = 0; i < t->T; i++)
        if (t->mask[i]) return 0;
    return !memcmp(a->seq_start, t->seq_start, sizeof(int32_t) * (size_t)(a->n_seqs + 1)) &&
           !memcmp(a->sample, t->sample, sizeof(int64_t) * (size_t)a->n_seqs) && !memcmp(a->ids, t->ids, sizeof(int32_t) * (size_t)a->T) &&
           !memcmp(a->labels, t->labels, sizeof(int32_t) * (size_t)a->T);
}

TEST(texts_batch_like_student_h5) {
    char jsonl[1100];
    snprintf(jsonl, sizeof jsonl, "%s", test_path("split.jsonl"));
    FILE *f = fopen(jsonl, "w");
    REQUIRE(f != NULL);
    for (int s = 0; s < 40; s++) {
        fprintf(f, "{\"id\": \"id-%d\", \"ids\": [", s);
        for (int t = 0; t < split_lens[s]; t++) fprintf(f, "%s%d", t ? ", " : "", id_of(s, t));
        fprintf(f, "]}\n");
    }
    fclose(f);
    CHECK(align_data_path_is_text(jsonl) && !align_data_path_is_text(split_path));
    es_error err = {0};
    for (int world = 1; world <= 2; world++)
        for (int rank = 0; rank < world; rank++) {
            align_data_options o = base_options(split_path), ot = base_options(jsonl);
            o.seq_len = ot.seq_len = 5, o.batch_tokens = ot.batch_tokens = 23; /* pieces, several epochs */
            o.world = ot.world = world, o.rank = ot.rank = rank;
            ot.model_dir = "unused: the ids form needs no tokenizer";
            align_data *h5 = NULL, *texts = NULL;
            REQUIRE(align_data_open(&h5, &o, &err) == 0);
            if (align_data_open(&texts, &ot, &err)) {
                printf("  open %s: %s\n", jsonl, err.msg);
                align_data_close(h5);
                CHECK(0);
                return;
            }
            const int *layers;
            CHECK(align_data_target_layers(texts, &layers) == 0);
            CHECK(align_data_train_samples(texts) == align_data_train_samples(h5) && align_data_eval_samples(texts) == align_data_eval_samples(h5));
            int same = 1;
            for (int i = 0; i < 40 && same; i++) {
                align_batch a, t;
                same = !align_data_next_train(h5, &a, &err) && !align_data_next_train(texts, &t, &err) && same_as_h5(&a, &t);
                if (i == 20) { /* a resumed position */
                    align_data_position p = align_data_get_position(h5), q = align_data_get_position(texts);
                    same = same && p.epoch == q.epoch && p.index == q.index && p.piece == q.piece && !align_data_set_position(texts, p, &err);
                }
            }
            CHECKF(same, "world %d rank %d: the texts' batches differ from student.h5's", world, rank);
            int64_t eval_a[40], eval_t[40];
            int na = eval_samples(h5, eval_a, 40), nt = eval_samples(texts, eval_t, 40);
            CHECK(na > 0 && na == nt && !memcmp(eval_a, eval_t, sizeof(int64_t) * (size_t)na));
            align_data_close(h5), align_data_close(texts);
        }
    align_data_options o = base_options(jsonl); /* texts need the model folder's tokenizer */
    align_data *none = NULL;
    CHECK(align_data_open(&none, &o, &err) == ES_ERR_USAGE && none == NULL);
    es_error_clear(&err);
}

int main(void) {
    for (int s = 0; s < 40; s++) split_lens[s] = 3 + (s * 5) % 11;
    snprintf(split_path, sizeof split_path, "%s", test_path("split.h5"));
    snprintf(pieces_path, sizeof pieces_path, "%s", test_path("pieces.h5"));
    file_spec split = {.S = 40, .lens = split_lens, .n_layers = 2, .bad_sample = -1, .bad_id_sample = -1};
    file_spec pieces = {.S = 5, .lens = piece_lens, .n_layers = 2, .bad_sample = -1, .bad_id_sample = -1};
    if (make_file(split_path, &split) || make_file(pieces_path, &pieces)) return 1;
    RUN(eval_split);
    RUN(epoch_orders);
    RUN(pieces_and_labels);
    RUN(rank_split_two);
    RUN(rank_split_three);
    RUN(rank_split_few_pieces);
    RUN(resume_position);
    RUN(errors_in_the_file);
    RUN(errors_of_the_input);
    RUN(texts_batch_like_student_h5);
    return test_summary();
}
