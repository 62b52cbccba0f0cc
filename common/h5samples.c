#include "h5samples.h"

#include <stdlib.h>
#include <string.h>

#include "h5file.h"

enum { TEXT_BYTES, TEXT_START, TOKEN_START, TRUNCATED, ADD_SPECIAL, TOKEN_ID, BYTE_START, BYTE_END };

static const struct {
    const char *name;
    es_h5_elem elem;
} layout[ES_SAMPLE_DATASETS] = {
    {"/samples/text_bytes", ES_H5_U8}, {"/samples/text_start", ES_H5_I64}, {"/samples/token_start", ES_H5_I64},
    {"/samples/truncated", ES_H5_U8}, {"/samples/add_special_tokens", ES_H5_U8}, {"/tokens/id", ES_H5_I32},
    {"/tokens/byte_start", ES_H5_I32}, {"/tokens/byte_end", ES_H5_I32},
};

static hid_t string_type(void) {
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, H5T_VARIABLE);
    H5Tset_cset(type, H5T_CSET_UTF8);
    return type;
}

static void reset(es_samples_writer *w) {
    memset(w, 0, sizeof *w);
    for (int i = 0; i < ES_SAMPLE_DATASETS; i++) w->rows[i].dataset = -1;
    w->ids = -1;
}

int es_samples_create(es_samples_writer *w, hid_t file, int zstd_level, es_error *err) {
    reset(w);
    int rc = ES_OK;
    for (int i = 0; !rc && i < ES_SAMPLE_DATASETS; i++)
        rc = es_rows_create(&w->rows[i], file, layout[i].name, layout[i].elem, 0, 0, zstd_level, NULL, err);
    int64_t zero = 0;
    if (!rc) rc = es_rows_append(&w->rows[TEXT_START], &zero, 1, err);
    if (!rc) rc = es_rows_append(&w->rows[TOKEN_START], &zero, 1, err);
    if (!rc) {
        hsize_t dims = 0, max_dims = H5S_UNLIMITED, chunk = 4096;
        hid_t space = H5Screate_simple(1, &dims, &max_dims), dcpl = H5Pcreate(H5P_DATASET_CREATE), type = string_type();
        H5Pset_chunk(dcpl, 1, &chunk);
        w->ids = H5Dcreate2(file, "/samples/id", type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
        H5Sclose(space), H5Pclose(dcpl), H5Tclose(type);
        if (w->ids < 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot create /samples/id", es_h5_filename(file));
    }
    if (rc) es_samples_close(w, NULL);
    return rc;
}

static int read_one(hid_t file, const char *name, int64_t row, int64_t *value, es_error *err) {
    es_rows_reader reader;
    int rc = es_rows_open_column(&reader, file, name, ES_H5_I64, NULL, err);
    if (rc) return rc;
    rc = reader.rows > row ? es_rows_read(&reader, row, 1, value, err)
                           : es_fail(err, ES_ERR_DATA, "%s: %s is shorter than the commit", es_h5_filename(file), name);
    es_rows_close_reader(&reader);
    return rc;
}

int es_samples_open_append(es_samples_writer *w, hid_t file, int64_t samples, es_error *err) {
    reset(w);
    int64_t tokens = 0, text_total = 0;
    int rc = read_one(file, "/samples/text_start", samples, &text_total, err);
    if (!rc) rc = read_one(file, "/samples/token_start", samples, &tokens, err);
    const int64_t keep[ES_SAMPLE_DATASETS] = {text_total, samples + 1, samples + 1, samples, samples, tokens, tokens, tokens};
    for (int i = 0; !rc && i < ES_SAMPLE_DATASETS; i++) rc = es_rows_open_append(&w->rows[i], file, layout[i].name, keep[i], NULL, err);
    if (!rc) {
        hsize_t size = (hsize_t)samples;
        w->ids = H5Dopen2(file, "/samples/id", H5P_DEFAULT);
        if (w->ids < 0 || H5Dset_extent(w->ids, &size) < 0)
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot reopen /samples/id", es_h5_filename(file));
    }
    if (rc) {
        es_samples_close(w, NULL);
        return rc;
    }
    w->samples = samples, w->tokens = tokens, w->text_total = text_total;
    return ES_OK;
}

int es_samples_add(es_samples_writer *w, const char *id, const char *text, size_t text_len, int truncated, int add_special_tokens,
                   const int32_t *ids, const int32_t (*spans)[2], int n_tokens, es_error *err) {
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
    int rc = es_rows_append(&w->rows[TEXT_BYTES], text, (int64_t)text_len, err);
    if (!rc) rc = es_rows_append(&w->rows[TEXT_START], &text_end, 1, err);
    if (!rc) rc = es_rows_append(&w->rows[TOKEN_START], &token_end, 1, err);
    if (!rc) rc = es_rows_append(&w->rows[TRUNCATED], &flags[0], 1, err);
    if (!rc) rc = es_rows_append(&w->rows[ADD_SPECIAL], &flags[1], 1, err);
    if (!rc) rc = es_rows_append(&w->rows[TOKEN_ID], ids, n_tokens, err);
    if (!rc) rc = es_rows_append(&w->rows[BYTE_START], starts, n_tokens, err);
    if (!rc) rc = es_rows_append(&w->rows[BYTE_END], ends, n_tokens, err);
    free(starts);
    if (!rc) w->samples++, w->tokens = token_end, w->text_total = text_end;
    return rc;
}

int es_samples_flush(es_samples_writer *w, es_error *err) {
    int rc = ES_OK;
    if (w->n_pending) {
        hsize_t old = (hsize_t)(w->samples - w->n_pending), n = (hsize_t)w->n_pending, size = old + n;
        hid_t type = string_type();
        if (H5Dset_extent(w->ids, &size) < 0) rc = es_fail(err, ES_ERR_RUNTIME, "cannot grow /samples/id");
        hid_t space = rc ? -1 : H5Dget_space(w->ids), memory = H5Screate_simple(1, &n, NULL);
        if (!rc && (H5Sselect_hyperslab(space, H5S_SELECT_SET, &old, NULL, &n, NULL) < 0 ||
                    H5Dwrite(w->ids, type, memory, space, H5P_DEFAULT, w->pending_ids) < 0))
            rc = es_fail(err, ES_ERR_RUNTIME, "cannot write /samples/id: %s", es_h5_last_error());
        if (space >= 0) H5Sclose(space);
        H5Sclose(memory), H5Tclose(type);
        for (int i = 0; i < w->n_pending; i++) free(w->pending_ids[i]);
        w->n_pending = 0;
    }
    for (int i = 0; !rc && i < ES_SAMPLE_DATASETS; i++) rc = es_rows_flush(&w->rows[i], err);
    return rc;
}

int es_samples_close(es_samples_writer *w, es_error *err) {
    es_error ignored = {0};
    int rc = err ? es_samples_flush(w, err) : ES_OK;
    for (int i = 0; i < ES_SAMPLE_DATASETS; i++)
        if (w->rows[i].dataset >= 0) {
            int closed = es_rows_close(&w->rows[i], rc || !err ? &ignored : err);
            if (!rc && err) rc = closed;
        }
    if (w->ids >= 0) H5Dclose(w->ids);
    for (int i = 0; i < w->n_pending; i++) free(w->pending_ids[i]);
    free(w->pending_ids);
    reset(w);
    return rc;
}
