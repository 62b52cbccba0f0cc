#include "student.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h5commit.h"

/* A writer holding nothing yet (every handle -1) and its n_targets target writers. */
static int writer_init(student_writer *w, int n_targets, es_error *err) {
    memset(w, 0, sizeof *w);
    w->file.id = -1;
    w->samples.ids = -1;
    for (int i = 0; i < ES_SAMPLE_DATASETS; i++) w->samples.rows[i].dataset = -1;
    w->teacher_row.dataset = -1;
    w->targets = calloc((size_t)n_targets, sizeof *w->targets);
    if (!w->targets) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    w->n_targets = n_targets;
    for (int i = 0; i < n_targets; i++) w->targets[i].dataset = -1;
    return ES_OK;
}

int student_create(student_writer *w, const char *path, const int *student_layers, int n_targets, int width, es_pool *pool,
                   es_error *err) {
    int rc0 = writer_init(w, n_targets, err);
    if (rc0) return rc0;
    const int level = 3;
    int rc = es_h5_create(&w->file, path, err);
    if (!rc) rc = es_samples_create(&w->samples, w->file.id, level, err);
    if (!rc) rc = es_rows_create(&w->teacher_row, w->file.id, "/tokens/teacher_row", ES_H5_I64, 0, 0, level, NULL, err);
    for (int i = 0; !rc && i < n_targets; i++) {
        char name[64];
        snprintf(name, sizeof name, "/targets/layer_%03d", student_layers[i]);
        rc = es_rows_create(&w->targets[i], w->file.id, name, ES_H5_BF16, width, 0, level, pool, err);
    }
    if (!rc) rc = es_h5_attr_set_str(w->file.id, "format", "essence.student", err);
    if (!rc) rc = es_h5_attr_set_i64(w->file.id, "format_version", 1, err);
    if (rc) student_abandon(w, 1);
    return rc;
}

int student_add_sample(student_writer *w, const char *id, const char *text, size_t text_len, int truncated, int add_special_tokens,
                       const int32_t *ids, const int32_t (*spans)[2], const int64_t *teacher_row, int n_tokens, es_error *err) {
    int rc = es_samples_add(&w->samples, id, text, text_len, truncated, add_special_tokens, ids, spans, n_tokens, err);
    if (!rc) rc = es_rows_append(&w->teacher_row, teacher_row, n_tokens, err);
    return rc;
}

int student_add_targets(student_writer *w, int i, const float *rows, int64_t n, es_error *err) {
    return es_rows_append_f32(&w->targets[i], rows, n, err);
}

static int write_f32(hid_t file, const char *name, const float *values, int rank, const hsize_t *dims, es_error *err) {
    hid_t space = H5Screate_simple(rank, dims, NULL), lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t dataset = H5Dcreate2(file, name, H5T_IEEE_F32LE, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    herr_t status = dataset >= 0 ? H5Dwrite(dataset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values) : -1;
    if (dataset >= 0) H5Dclose(dataset);
    H5Sclose(space), H5Pclose(lcpl);
    if (status < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot write %s: %s", es_h5_filename(file), name, es_h5_last_error());
    return ES_OK;
}

int student_write_projection(student_writer *w, const float *omega, int m, int d, const int *teacher_layers,
                             const float *const *mean, const float *const *scale, int n_layers, es_error *err) {
    hsize_t omega_dims[2] = {(hsize_t)m, (hsize_t)d}, dims = (hsize_t)d;
    int rc = write_f32(w->file.id, "/projection/omega", omega, 2, omega_dims, err);
    for (int i = 0; !rc && i < n_layers; i++) {
        int seen = 0; /* a teacher layer mapped to two student layers is stored once */
        for (int k = 0; k < i; k++) seen |= teacher_layers[k] == teacher_layers[i];
        if (seen) continue;
        char name[80];
        snprintf(name, sizeof name, "/projection/layer_%03d/input_mean", teacher_layers[i]);
        rc = write_f32(w->file.id, name, mean[i], 1, &dims, err);
        snprintf(name, sizeof name, "/projection/layer_%03d/input_scale", teacher_layers[i]);
        if (!rc) rc = write_f32(w->file.id, name, scale[i], 1, &dims, err);
    }
    return rc;
}

int student_set_resume_key(student_writer *w, const char *key, es_error *err) {
    int rc = es_h5_attr_set_str(w->file.id, "resume_key", key, err);
    return rc ? rc : es_h5_sync(&w->file, err);
}

int student_commit(student_writer *w, es_error *err) {
    es_commit_record record = {0};
    int rc = es_samples_commit(&w->samples, &record, err);
    if (!rc) rc = es_rows_commit(&w->teacher_row, &record, err);
    for (int i = 0; !rc && i < w->n_targets; i++) rc = es_rows_commit(&w->targets[i], &record, err);
    const es_commit_mark marks[] = {{"committed_samples", w->samples.samples}, {"committed_tokens", w->samples.tokens}};
    if (!rc) rc = es_h5_commit_point(&w->file, &record, marks, 2, err);
    if (!rc) w->committed = w->samples.samples;
    es_commit_record_free(&record);
    return rc;
}

int student_resume(student_writer *w, const char *path, const int *student_layers, int n_targets, int width, es_pool *pool,
                   int64_t *samples_done, es_error *err) {
    *samples_done = 0;
    int rc0 = writer_init(w, n_targets, err);
    if (rc0) return rc0;
    es_commit_record record = {0};
    int found = 0, rc = es_h5_open_partial(&w->file, path, err);
    if (!rc) rc = es_h5_read_commit(&w->file, &record, &found, err);
    if (!rc && !found) rc = es_fail(err, ES_ERR_DATA, "%s: nothing was committed yet", w->file.open_path);
    if (!rc) rc = es_samples_resume(&w->samples, w->file.id, &record, err);
    if (!rc) rc = es_rows_resume(&w->teacher_row, w->file.id, "/tokens/teacher_row", &record, NULL, err);
    for (int i = 0; !rc && i < n_targets; i++) {
        char name[64];
        snprintf(name, sizeof name, "/targets/layer_%03d", student_layers[i]);
        rc = es_rows_resume(&w->targets[i], w->file.id, name, &record, pool, err);
        if (!rc && (w->targets[i].width != width || w->targets[i].rows != w->samples.tokens))
            rc = es_fail(err, ES_ERR_DATA, "%s: %s disagrees with the last commit", w->file.open_path, name);
    }
    if (!rc && w->teacher_row.rows != w->samples.tokens)
        rc = es_fail(err, ES_ERR_DATA, "%s: /tokens/teacher_row disagrees with the last commit", w->file.open_path);
    es_commit_record_free(&record);
    if (rc) {
        student_abandon(w, 0);
        return rc;
    }
    *samples_done = w->committed = w->samples.samples;
    return ES_OK;
}

int student_finish(student_writer *w, const student_attribute *attributes, int n_attributes, es_error *err) {
    int rc = ES_OK;
    for (int i = 0; !rc && i < n_attributes; i++) {
        const student_attribute *a = &attributes[i];
        rc = a->kind == 's'   ? es_h5_attr_set_str(w->file.id, a->name, a->text, err)
             : a->kind == 'i' ? es_h5_attr_set_i64(w->file.id, a->name, a->integer, err)
                              : es_h5_attr_set_f64(w->file.id, a->name, a->number, err);
    }
    if (!rc) rc = es_samples_close(&w->samples, err);
    if (!rc) rc = es_rows_close(&w->teacher_row, err);
    for (int i = 0; !rc && i < w->n_targets; i++) rc = es_rows_close(&w->targets[i], err);
    /* The commit marks mean nothing in a complete file; the last chunks are on disk before they go. */
    static const char *const marks[] = {"committed_samples", "committed_tokens", NULL}; /* resume_key stays: what made it */
    if (!rc) rc = es_h5_sync(&w->file, err);
    if (!rc) rc = es_h5_drop_commits(&w->file, marks, err);
    if (rc) {
        student_abandon(w, 0);
        return rc;
    }
    rc = es_h5_commit(&w->file, err);
    free(w->targets);
    w->targets = NULL;
    return rc;
}

void student_abandon(student_writer *w, int remove) {
    es_samples_close(&w->samples, NULL);
    es_rows_discard(&w->teacher_row);
    for (int i = 0; w->targets && i < w->n_targets; i++) es_rows_discard(&w->targets[i]);
    if (w->file.id >= 0 || w->file.path) es_h5_close(&w->file, remove);
    free(w->targets);
    w->targets = NULL;
}
