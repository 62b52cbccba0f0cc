#include "teacher.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "h5commit.h"

static void layer_path(char *buf, size_t size, const char *group, int layer, const char *leaf) {
    snprintf(buf, size, "%s/layer_%03d%s%s", group, layer, leaf ? "/" : "", leaf ? leaf : "");
}

static int setup(teacher_writer *w, const teacher_options *options, es_error *err) {
    w->n_layers = options->n_layers;
    w->width = options->width;
    w->samples.ids = -1;
    for (int i = 0; i < ES_SAMPLE_DATASETS; i++) w->samples.rows[i].dataset = -1;
    w->layers = malloc((size_t)options->n_layers * sizeof *w->layers);
    w->latents = calloc((size_t)options->n_layers, sizeof *w->latents);
    w->stats = calloc((size_t)options->n_layers, sizeof *w->stats);
    if (!w->layers || !w->latents || !w->stats) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    memcpy(w->layers, options->layers, (size_t)options->n_layers * sizeof *w->layers);
    for (int i = 0; i < w->n_layers; i++) {
        w->latents[i].dataset = -1;
        w->stats[i].mean = calloc((size_t)w->width, sizeof(double));
        w->stats[i].m2 = calloc((size_t)w->width, sizeof(double));
        if (!w->stats[i].mean || !w->stats[i].m2) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    return ES_OK;
}

int teacher_create(teacher_writer *w, const char *path, const teacher_options *options, es_error *err) {
    memset(w, 0, sizeof *w);
    w->file.id = -1;
    int rc = setup(w, options, err);
    if (!rc) rc = es_h5_create(&w->file, path, err);
    if (!rc) rc = es_samples_create(&w->samples, w->file.id, options->zstd_level, err);
    for (int i = 0; !rc && i < w->n_layers; i++) {
        char name[64];
        layer_path(name, sizeof name, "/latents", w->layers[i], NULL);
        rc = es_rows_create(&w->latents[i], w->file.id, name, ES_H5_BF16, w->width, options->chunk_rows,
                            options->zstd_level, options->pool, err);
    }
    if (!rc) rc = es_h5_attr_set_str(w->file.id, "format", "essence.teacher", err);
    if (!rc) rc = es_h5_attr_set_i64(w->file.id, "format_version", 1, err);
    /* What a --resume must share with this run, on disk before anything is committed. */
    if (!rc) rc = es_h5_attr_set_str(w->file.id, "resume_key", options->resume_key ? options->resume_key : "", err);
    if (!rc) rc = es_h5_sync(&w->file, err);
    if (rc) teacher_abandon(w, 1);
    return rc;
}

int teacher_add(teacher_writer *w, const char *id, const char *text, size_t text_len, int truncated, int add_special_tokens,
                const int32_t *ids, const int32_t (*spans)[2], int n_tokens, const float *const *layer_rows, es_error *err) {
    int rc = es_samples_add(&w->samples, id, text, text_len, truncated, add_special_tokens, ids, spans, n_tokens, err);
    for (int i = 0; !rc && i < w->n_layers; i++) {
        rc = es_rows_append_f32(&w->latents[i], layer_rows[i], n_tokens, err);
        /* Welford, token by token in input order: the statistics do not depend on batching.
         * Taken over the stored (bf16) values, which is what readers see. */
        teacher_stats *stats = &w->stats[i];
        for (int t = 0; !rc && t < n_tokens; t++) {
            const float *row = layer_rows[i] + (size_t)t * w->width;
            stats->count++;
            for (int k = 0; k < w->width; k++) {
                double x = es_bf16_to_f32(es_f32_to_bf16(row[k]));
                double delta = x - stats->mean[k];
                stats->mean[k] += delta / (double)stats->count;
                stats->m2[k] += delta * (x - stats->mean[k]);
            }
        }
    }
    return rc;
}
static int write_array(hid_t file, const char *name, hid_t type, hsize_t n, const void *data, es_error *err) {
    hid_t dataset = H5Lexists(file, name, H5P_DEFAULT) > 0 ? H5Dopen2(file, name, H5P_DEFAULT) : -1;
    if (dataset < 0) {
        hid_t space = H5Screate_simple(1, &n, NULL), lcpl = H5Pcreate(H5P_LINK_CREATE);
        H5Pset_create_intermediate_group(lcpl, 1);
        dataset = H5Dcreate2(file, name, type, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
        H5Sclose(space), H5Pclose(lcpl);
    }
    herr_t status = dataset >= 0 ? H5Dwrite(dataset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) : -1;
    if (dataset >= 0) H5Dclose(dataset);
    if (status < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot write %s: %s", es_h5_filename(file), name, es_h5_last_error());
    return ES_OK;
}

/* The record's name for a layer's running statistics: [count][mean (d)][m2 (d)]. */
static void stats_part_name(char *buf, size_t size, int layer) { snprintf(buf, size, "stats/layer_%03d", layer); }

int teacher_commit(teacher_writer *w, es_error *err) {
    es_commit_record record = {0};
    int rc = es_samples_commit(&w->samples, &record, err);
    for (int i = 0; !rc && i < w->n_layers; i++) rc = es_rows_commit(&w->latents[i], &record, err);
    const size_t d = (size_t)w->width;
    double *stats = rc ? NULL : malloc((1 + 2 * d) * sizeof *stats);
    if (!rc && !stats) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int i = 0; !rc && i < w->n_layers; i++) {
        char name[64];
        stats_part_name(name, sizeof name, w->layers[i]);
        memcpy(stats, &w->stats[i].count, sizeof(int64_t));
        memcpy(stats + 1, w->stats[i].mean, d * sizeof *stats), memcpy(stats + 1 + d, w->stats[i].m2, d * sizeof *stats);
        rc = es_commit_record_add(&record, name, stats, (1 + 2 * d) * sizeof *stats, err);
    }
    free(stats);
    /* The commit marks (docs/teacher-h5.md) travel with the record's mark. */
    const es_commit_mark marks[] = {{"committed_samples", w->samples.samples}, {"committed_tokens", w->samples.tokens}};
    if (!rc) rc = es_h5_commit_point(&w->file, &record, marks, 2, err);
    if (!rc) w->committed = w->samples.samples;
    es_commit_record_free(&record);
    return rc;
}

static void close_datasets(teacher_writer *w) {
    es_samples_close(&w->samples, NULL);
    for (int i = 0; w->latents && i < w->n_layers; i++) es_rows_discard(&w->latents[i]);
}

static void free_memory(teacher_writer *w) {
    for (int i = 0; w->stats && i < w->n_layers; i++) free(w->stats[i].mean), free(w->stats[i].m2);
    free(w->stats), free(w->latents), free(w->layers);
    w->stats = NULL, w->latents = NULL, w->layers = NULL;
}

int teacher_finish(teacher_writer *w, const char *const *attributes, int n_attributes, es_error *err) {
    /* The last chunks and the statistics, written once; the commit marks mean nothing in a complete file. */
    int rc = es_samples_close(&w->samples, err);
    for (int i = 0; !rc && i < w->n_layers; i++) rc = es_rows_close(&w->latents[i], err);
    for (int i = 0; !rc && i < w->n_layers; i++) {
        char name[64];
        layer_path(name, sizeof name, "/stats", w->layers[i], "count");
        rc = write_array(w->file.id, name, H5T_STD_I64LE, 1, &w->stats[i].count, err);
        layer_path(name, sizeof name, "/stats", w->layers[i], "mean");
        if (!rc) rc = write_array(w->file.id, name, H5T_IEEE_F64LE, (hsize_t)w->width, w->stats[i].mean, err);
        layer_path(name, sizeof name, "/stats", w->layers[i], "m2");
        if (!rc) rc = write_array(w->file.id, name, H5T_IEEE_F64LE, (hsize_t)w->width, w->stats[i].m2, err);
    }
    for (int i = 0; !rc && i < n_attributes; i++) rc = es_h5_attr_set_str(w->file.id, attributes[2 * i], attributes[2 * i + 1], err);
    static const char *const marks[] = {"committed_samples", "committed_tokens", NULL}; /* resume_key stays: what made it */
    if (!rc) rc = es_h5_sync(&w->file, err); /* all of it on disk before the last commit's record goes */
    if (!rc) rc = es_h5_drop_commits(&w->file, marks, err);
    if (rc) {
        teacher_abandon(w, 0);
        return rc;
    }
    rc = es_h5_commit(&w->file, err);
    free_memory(w);
    return rc;
}

void teacher_abandon(teacher_writer *w, int remove) {
    close_datasets(w);
    if (w->file.id >= 0 || w->file.path) es_h5_close(&w->file, remove);
    free_memory(w);
}

int teacher_resume(teacher_writer *w, const char *path, const teacher_options *options, int64_t *samples_done, es_error *err) {
    memset(w, 0, sizeof *w);
    w->file.id = -1;
    *samples_done = 0;
    es_commit_record record = {0};
    int found = 0;
    int rc = setup(w, options, err);
    if (!rc) rc = es_h5_open_partial(&w->file, path, err);
    if (!rc) rc = es_h5_read_commit(&w->file, &record, &found, err);
    if (!rc && !found) rc = es_fail(err, ES_ERR_DATA, "%s: nothing was committed yet", w->file.open_path);
    int64_t samples = 0, tokens = 0;
    if (!rc) rc = es_h5_attr_get_i64(w->file.id, "committed_samples", &samples, err);
    if (!rc) rc = es_h5_attr_get_i64(w->file.id, "committed_tokens", &tokens, err);
    /* Cut everything back to the last commit. */
    if (!rc) rc = es_samples_resume(&w->samples, w->file.id, &record, err);
    if (!rc && (w->samples.samples != samples || w->samples.tokens != tokens))
        rc = es_fail(err, ES_ERR_DATA, "%s: the sample datasets disagree with the commit marks", w->file.open_path);
    const size_t d = (size_t)w->width;
    for (int i = 0; !rc && i < w->n_layers; i++) {
        char name[64];
        layer_path(name, sizeof name, "/latents", w->layers[i], NULL);
        rc = es_rows_resume(&w->latents[i], w->file.id, name, &record, options->pool, err);
        if (!rc && w->latents[i].width != w->width)
            rc = es_fail(err, ES_ERR_DATA, "%s: %s has width %lld, the model %d", path, name, (long long)w->latents[i].width, w->width);
        if (!rc && w->latents[i].rows != tokens)
            rc = es_fail(err, ES_ERR_DATA, "%s: %s disagrees with the commit marks", w->file.open_path, name);
        stats_part_name(name, sizeof name, w->layers[i]);
        const es_commit_part *part = rc ? NULL : es_commit_record_find(&record, name);
        if (!rc && (!part || part->size != (1 + 2 * d) * sizeof(double)))
            rc = es_fail(err, ES_ERR_DATA, "%s: the last commit has no statistics of layer %d", w->file.open_path, w->layers[i]);
        if (!rc) {
            memcpy(&w->stats[i].count, part->data, sizeof(int64_t));
            memcpy(w->stats[i].mean, part->data + sizeof(double), d * sizeof(double));
            memcpy(w->stats[i].m2, part->data + (1 + d) * sizeof(double), d * sizeof(double));
            if (w->stats[i].count != tokens) rc = es_fail(err, ES_ERR_DATA, "%s: statistics disagree with the commit", w->file.open_path);
        }
    }
    es_commit_record_free(&record);
    if (rc) {
        teacher_abandon(w, 0);
        return rc;
    }
    *samples_done = w->committed = samples;
    return ES_OK;
}
