#include "teacher.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"

enum { N_SAMPLE_ROWS = 8 }; /* the row datasets other than latents, in the order below */

static es_rows_writer *sample_rows(teacher_writer *w, int i) {
    es_rows_writer *all[N_SAMPLE_ROWS] = {&w->text_bytes, &w->text_start, &w->token_start, &w->truncated,
                                          &w->add_special_tokens, &w->token_id, &w->byte_start, &w->byte_end};
    return all[i];
}

static const struct {
    const char *name;
    es_h5_elem elem;
} sample_layout[N_SAMPLE_ROWS] = {
    {"/samples/text_bytes", ES_H5_U8}, {"/samples/text_start", ES_H5_I64}, {"/samples/token_start", ES_H5_I64},
    {"/samples/truncated", ES_H5_U8}, {"/samples/add_special_tokens", ES_H5_U8}, {"/tokens/id", ES_H5_I32},
    {"/tokens/byte_start", ES_H5_I32}, {"/tokens/byte_end", ES_H5_I32},
};

static void layer_path(char *buf, size_t size, const char *group, int layer, const char *leaf) {
    snprintf(buf, size, "%s/layer_%03d%s%s", group, layer, leaf ? "/" : "", leaf ? leaf : "");
}

static int setup(teacher_writer *w, const teacher_options *options, es_error *err) {
    w->n_layers = options->n_layers;
    w->width = options->width;
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
    for (int i = 0; i < N_SAMPLE_ROWS; i++) sample_rows(w, i)->dataset = -1;
    w->sample_ids = -1;
    return ES_OK;
}

static hid_t string_type(void) {
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, H5T_VARIABLE);
    H5Tset_cset(type, H5T_CSET_UTF8);
    return type;
}

int teacher_create(teacher_writer *w, const char *path, const teacher_options *options, es_error *err) {
    memset(w, 0, sizeof *w);
    w->file.id = -1;
    int rc = setup(w, options, err);
    if (!rc) rc = es_h5_create(&w->file, path, err);
    for (int i = 0; !rc && i < N_SAMPLE_ROWS; i++)
        rc = es_rows_create(sample_rows(w, i), w->file.id, sample_layout[i].name, sample_layout[i].elem, 0, 0,
                            options->zstd_level, NULL, err);
    for (int i = 0; !rc && i < w->n_layers; i++) {
        char name[64];
        layer_path(name, sizeof name, "/latents", w->layers[i], NULL);
        rc = es_rows_create(&w->latents[i], w->file.id, name, ES_H5_BF16, w->width, options->chunk_rows,
                            options->zstd_level, options->pool, err);
    }
    int64_t zero = 0;
    if (!rc) rc = es_rows_append(&w->text_start, &zero, 1, err);
    if (!rc) rc = es_rows_append(&w->token_start, &zero, 1, err);
    if (!rc) {
        hsize_t dims = 0, max_dims = H5S_UNLIMITED, chunk = 4096;
        hid_t space = H5Screate_simple(1, &dims, &max_dims), dcpl = H5Pcreate(H5P_DATASET_CREATE), type = string_type();
        H5Pset_chunk(dcpl, 1, &chunk);
        w->sample_ids = H5Dcreate2(w->file.id, "/samples/id", type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
        H5Sclose(space), H5Pclose(dcpl), H5Tclose(type);
        if (w->sample_ids < 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot create /samples/id", path);
    }
    if (!rc) rc = es_h5_attr_set_str(w->file.id, "format", "essence.teacher", err);
    if (!rc) rc = es_h5_attr_set_i64(w->file.id, "format_version", 1, err);
    if (rc) teacher_abandon(w, 1);
    return rc;
}

int teacher_add(teacher_writer *w, const char *id, const char *text, size_t text_len, int truncated, int add_special_tokens,
                const int32_t *ids, const int32_t (*spans)[2], int n_tokens, const float *const *layer_rows, es_error *err) {
    if (w->n_pending == w->cap_pending) {
        int cap = w->cap_pending ? 2 * w->cap_pending : 256;
        char **grown = realloc(w->pending_ids, (size_t)cap * sizeof *grown);
        if (!grown) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
        w->pending_ids = grown;
        w->cap_pending = cap;
    }
    if (!(w->pending_ids[w->n_pending] = strdup(id))) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    w->n_pending++;
    int32_t *starts = malloc((size_t)(n_tokens ? n_tokens : 1) * 2 * sizeof *starts), *ends = starts + (n_tokens ? n_tokens : 1);
    if (!starts) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int t = 0; t < n_tokens; t++) starts[t] = spans[t][0], ends[t] = spans[t][1];
    uint8_t flags[2] = {(uint8_t)(truncated != 0), (uint8_t)(add_special_tokens != 0)};
    int64_t text_end = w->text_total + (int64_t)text_len, token_end = w->tokens + n_tokens;
    int rc = es_rows_append(&w->text_bytes, text, (int64_t)text_len, err);
    if (!rc) rc = es_rows_append(&w->text_start, &text_end, 1, err);
    if (!rc) rc = es_rows_append(&w->token_start, &token_end, 1, err);
    if (!rc) rc = es_rows_append(&w->truncated, &flags[0], 1, err);
    if (!rc) rc = es_rows_append(&w->add_special_tokens, &flags[1], 1, err);
    if (!rc) rc = es_rows_append(&w->token_id, ids, n_tokens, err);
    if (!rc) rc = es_rows_append(&w->byte_start, starts, n_tokens, err);
    if (!rc) rc = es_rows_append(&w->byte_end, ends, n_tokens, err);
    free(starts);
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
    if (!rc) w->samples++, w->tokens = token_end, w->text_total = text_end;
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

int teacher_commit(teacher_writer *w, es_error *err) {
    int rc = ES_OK;
    if (w->n_pending) { /* the buffered sample ids */
        hsize_t old = (hsize_t)(w->samples - w->n_pending), n = (hsize_t)w->n_pending, size = old + n;
        hid_t type = string_type();
        if (H5Dset_extent(w->sample_ids, &size) < 0) rc = es_fail(err, ES_ERR_RUNTIME, "cannot grow /samples/id");
        hid_t space = rc ? -1 : H5Dget_space(w->sample_ids), memory = H5Screate_simple(1, &n, NULL);
        if (!rc && (H5Sselect_hyperslab(space, H5S_SELECT_SET, &old, NULL, &n, NULL) < 0 ||
                    H5Dwrite(w->sample_ids, type, memory, space, H5P_DEFAULT, w->pending_ids) < 0))
            rc = es_fail(err, ES_ERR_RUNTIME, "cannot write /samples/id: %s", es_h5_last_error());
        if (space >= 0) H5Sclose(space);
        H5Sclose(memory), H5Tclose(type);
        for (int i = 0; i < w->n_pending; i++) free(w->pending_ids[i]);
        w->n_pending = 0;
    }
    for (int i = 0; !rc && i < N_SAMPLE_ROWS; i++) rc = es_rows_flush(sample_rows(w, i), err);
    for (int i = 0; !rc && i < w->n_layers; i++) rc = es_rows_flush(&w->latents[i], err);
    for (int i = 0; !rc && i < w->n_layers; i++) {
        char name[64];
        layer_path(name, sizeof name, "/stats", w->layers[i], "count");
        rc = write_array(w->file.id, name, H5T_STD_I64LE, 1, &w->stats[i].count, err);
        layer_path(name, sizeof name, "/stats", w->layers[i], "mean");
        if (!rc) rc = write_array(w->file.id, name, H5T_IEEE_F64LE, (hsize_t)w->width, w->stats[i].mean, err);
        layer_path(name, sizeof name, "/stats", w->layers[i], "m2");
        if (!rc) rc = write_array(w->file.id, name, H5T_IEEE_F64LE, (hsize_t)w->width, w->stats[i].m2, err);
    }
    /* The commit mark, written last: a resumed run trusts only what it counts. */
    if (!rc) rc = es_h5_attr_set_i64(w->file.id, "committed_samples", w->samples, err);
    if (!rc) rc = es_h5_attr_set_i64(w->file.id, "committed_tokens", w->tokens, err);
    if (!rc) rc = es_h5_flush(&w->file, err);
    return rc;
}

static void close_datasets(teacher_writer *w) {
    es_error ignored = {0};
    for (int i = 0; i < N_SAMPLE_ROWS; i++)
        if (sample_rows(w, i)->dataset >= 0) es_rows_close(sample_rows(w, i), &ignored);
    for (int i = 0; w->latents && i < w->n_layers; i++)
        if (w->latents[i].dataset >= 0) es_rows_close(&w->latents[i], &ignored);
    if (w->sample_ids >= 0) H5Dclose(w->sample_ids);
    w->sample_ids = -1;
}

static void free_memory(teacher_writer *w) {
    for (int i = 0; w->stats && i < w->n_layers; i++) free(w->stats[i].mean), free(w->stats[i].m2);
    for (int i = 0; i < w->n_pending; i++) free(w->pending_ids[i]);
    free(w->pending_ids), free(w->stats), free(w->latents), free(w->layers);
    w->pending_ids = NULL, w->stats = NULL, w->latents = NULL, w->layers = NULL;
}

int teacher_finish(teacher_writer *w, const char *const *attributes, int n_attributes, es_error *err) {
    int rc = teacher_commit(w, err);
    for (int i = 0; !rc && i < n_attributes; i++) rc = es_h5_attr_set_str(w->file.id, attributes[2 * i], attributes[2 * i + 1], err);
    /* The commit marks mean nothing in a complete file. */
    if (!rc && (H5Adelete(w->file.id, "committed_samples") < 0 || H5Adelete(w->file.id, "committed_tokens") < 0))
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot remove the commit marks", w->file.open_path);
    for (int i = 0; !rc && i < N_SAMPLE_ROWS; i++) rc = es_rows_close(sample_rows(w, i), err);
    for (int i = 0; !rc && i < w->n_layers; i++) rc = es_rows_close(&w->latents[i], err);
    if (rc) {
        teacher_abandon(w, 0);
        return rc;
    }
    H5Dclose(w->sample_ids);
    w->sample_ids = -1;
    rc = es_h5_commit(&w->file, err);
    free_memory(w);
    return rc;
}

void teacher_abandon(teacher_writer *w, int remove) {
    close_datasets(w);
    if (w->file.id >= 0 || w->file.path) es_h5_close(&w->file, remove);
    free_memory(w);
}

static int read_array(hid_t file, const char *name, hid_t type, hsize_t n, void *data, es_error *err) {
    hid_t dataset = H5Lexists(file, name, H5P_DEFAULT) > 0 ? H5Dopen2(file, name, H5P_DEFAULT) : -1;
    hid_t space = dataset >= 0 ? H5Dget_space(dataset) : -1;
    int ok = space >= 0 && H5Sget_simple_extent_npoints(space) == (hssize_t)n &&
             H5Dread(dataset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0;
    if (space >= 0) H5Sclose(space);
    if (dataset >= 0) H5Dclose(dataset);
    return ok ? ES_OK : es_fail(err, ES_ERR_DATA, "%s: %s is missing or of the wrong size", es_h5_filename(file), name);
}

int teacher_resume(teacher_writer *w, const char *path, const teacher_options *options, int64_t *samples_done, es_error *err) {
    memset(w, 0, sizeof *w);
    w->file.id = -1;
    int rc = setup(w, options, err);
    if (!rc) rc = es_h5_open_partial(&w->file, path, err);
    int64_t samples = 0, tokens = 0, text_total = 0;
    if (!rc) rc = es_h5_attr_get_i64(w->file.id, "committed_samples", &samples, err);
    if (!rc) rc = es_h5_attr_get_i64(w->file.id, "committed_tokens", &tokens, err);
    if (!rc) {
        es_rows_reader reader;
        rc = es_rows_open(&reader, w->file.id, "/samples/text_start", NULL, err);
        if (!rc) {
            rc = reader.rows > samples ? es_rows_read(&reader, samples, 1, &text_total, err)
                                       : es_fail(err, ES_ERR_DATA, "%s: text_start is shorter than the commit", path);
            es_rows_close_reader(&reader);
        }
    }
    /* Cut everything back to the last commit. */
    const int64_t keep[N_SAMPLE_ROWS] = {text_total, samples + 1, samples + 1, samples, samples, tokens, tokens, tokens};
    for (int i = 0; !rc && i < N_SAMPLE_ROWS; i++)
        rc = es_rows_open_append(sample_rows(w, i), w->file.id, sample_layout[i].name, keep[i], NULL, err);
    for (int i = 0; !rc && i < w->n_layers; i++) {
        char name[64];
        layer_path(name, sizeof name, "/latents", w->layers[i], NULL);
        rc = es_rows_open_append(&w->latents[i], w->file.id, name, tokens, options->pool, err);
        if (!rc && w->latents[i].width != w->width)
            rc = es_fail(err, ES_ERR_DATA, "%s: %s has width %lld, the model %d", path, name, (long long)w->latents[i].width, w->width);
        layer_path(name, sizeof name, "/stats", w->layers[i], "count");
        if (!rc) rc = read_array(w->file.id, name, H5T_NATIVE_INT64, 1, &w->stats[i].count, err);
        layer_path(name, sizeof name, "/stats", w->layers[i], "mean");
        if (!rc) rc = read_array(w->file.id, name, H5T_NATIVE_DOUBLE, (hsize_t)w->width, w->stats[i].mean, err);
        layer_path(name, sizeof name, "/stats", w->layers[i], "m2");
        if (!rc) rc = read_array(w->file.id, name, H5T_NATIVE_DOUBLE, (hsize_t)w->width, w->stats[i].m2, err);
        if (!rc && w->stats[i].count != tokens) rc = es_fail(err, ES_ERR_DATA, "%s: statistics disagree with the commit", path);
    }
    if (!rc) {
        hsize_t size = (hsize_t)samples;
        w->sample_ids = H5Dopen2(w->file.id, "/samples/id", H5P_DEFAULT);
        if (w->sample_ids < 0 || H5Dset_extent(w->sample_ids, &size) < 0)
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot reopen /samples/id", path);
    }
    if (rc) {
        teacher_abandon(w, 0);
        return rc;
    }
    w->samples = samples, w->tokens = tokens, w->text_total = text_total;
    *samples_done = samples;
    return ES_OK;
}
