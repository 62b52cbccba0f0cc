/* Reading rows through HDF5's own path (common/h5rows_internal.h).
 *
 * Files written by other tools (h5py, most often) store our datasets in their own types:
 * int64 token ids, float64 flags, float16 latents, h5py's bool enum. HDF5 converts any of
 * them to the type we read, but silently clamps what is out of range and truncates
 * fractions; the conversion callback (es_h5_conversion) stops both. An enum has no HDF5
 * conversion to an integer type, so its stored bytes are read as they are and converted from
 * the enum's base type. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h5file.h"
#include "h5rows_internal.h"

int es_rows_type_elem(hid_t type, es_h5_elem *elem) {
    H5T_class_t cls = H5Tget_class(type);
    size_t size = H5Tget_size(type);
    if (cls == H5T_ENUM) {
        hid_t base = H5Tget_super(type);
        int rc = base >= 0 && H5Tget_class(base) == H5T_INTEGER ? es_rows_type_elem(base, elem) : -1;
        if (base >= 0) H5Tclose(base);
        return rc;
    }
    if (cls == H5T_FLOAT) {
        size_t spos = 0, epos = 0, esize = 0, mpos = 0, msize = 0;
        if (H5Tget_fields(type, &spos, &epos, &esize, &mpos, &msize) < 0) return -1;
        if (size == 2 && spos == 15 && epos == 7 && esize == 8 && mpos == 0 && msize == 7) *elem = ES_H5_BF16;
        else *elem = size <= 4 ? ES_H5_F32 : ES_H5_F64;
        return 0;
    }
    if (cls == H5T_INTEGER) {
        if (H5Tget_sign(type) == H5T_SGN_NONE) *elem = size == 1 ? ES_H5_U8 : size <= 2 ? ES_H5_I32 : ES_H5_I64;
        else *elem = size <= 4 ? ES_H5_I32 : ES_H5_I64;
        return 0;
    }
    return -1;
}

/* One read of rows [first, first + n) as mem_type; < 0 on failure (state says whether a
 * conversion refused a value). */
static herr_t read_rows(const es_rows_reader *reader, int64_t first, int64_t n, void *out, hid_t mem_type,
                        es_h5_conversion *state) {
    hsize_t start[2] = {(hsize_t)first, 0}, count[2] = {(hsize_t)n, (hsize_t)reader->width};
    hid_t file_space = H5Dget_space(reader->dataset);
    hid_t mem_space = H5Screate_simple(reader->rank, count, NULL);
    hid_t xfer = es_h5_conversion_xfer(state, H5Tget_class(mem_type) == H5T_INTEGER);
    herr_t status = -1;
    if (file_space >= 0 && mem_space >= 0 && xfer >= 0 &&
        H5Sselect_hyperslab(file_space, H5S_SELECT_SET, start, NULL, count, NULL) >= 0) {
        if (H5Tget_class(reader->stored) == H5T_ENUM) {
            size_t values = (size_t)n * (size_t)reader->width, stored_size = H5Tget_size(reader->stored);
            size_t mem_size = H5Tget_size(mem_type), size = stored_size > mem_size ? stored_size : mem_size;
            uint8_t *raw = malloc(values * size);
            hid_t base = H5Tget_super(reader->stored);
            if (raw && base >= 0 && H5Dread(reader->dataset, reader->stored, mem_space, file_space, xfer, raw) >= 0 &&
                H5Tconvert(base, mem_type, values, raw, NULL, xfer) >= 0) {
                memcpy(out, raw, values * mem_size);
                status = 0;
            }
            if (base >= 0) H5Tclose(base);
            free(raw);
        } else {
            status = H5Dread(reader->dataset, mem_type, mem_space, file_space, xfer, out);
        }
    }
    if (xfer >= 0) H5Pclose(xfer);
    if (file_space >= 0) H5Sclose(file_space);
    if (mem_space >= 0) H5Sclose(mem_space);
    return status;
}

/* The value of a one-value row, as text for a message ("" when it cannot be had): read as
 * stored, converted to double without checks. */
static void row_value(const es_rows_reader *reader, int64_t row, char *text, size_t size) {
    text[0] = '\0';
    if (reader->width != 1) return;
    int is_enum = H5Tget_class(reader->stored) == H5T_ENUM;
    hid_t from = is_enum ? H5Tget_super(reader->stored) : H5Tcopy(reader->stored);
    size_t stored_size = H5Tget_size(reader->stored);
    uint8_t raw[64] = {0};
    hsize_t start[2] = {(hsize_t)row, 0}, one[2] = {1, 1};
    hid_t file_space = H5Dget_space(reader->dataset), mem_space = H5Screate_simple(reader->rank, one, NULL);
    if (from >= 0 && stored_size <= sizeof raw / 2 && file_space >= 0 && mem_space >= 0 &&
        H5Sselect_hyperslab(file_space, H5S_SELECT_SET, start, NULL, one, NULL) >= 0 &&
        H5Dread(reader->dataset, reader->stored, mem_space, file_space, H5P_DEFAULT, raw) >= 0 &&
        H5Tconvert(from, H5T_NATIVE_DOUBLE, 1, raw, NULL, H5P_DEFAULT) >= 0) {
        double value;
        memcpy(&value, raw, sizeof value);
        snprintf(text, size, ": %.17g", value);
    }
    if (from >= 0) H5Tclose(from);
    if (file_space >= 0) H5Sclose(file_space);
    if (mem_space >= 0) H5Sclose(mem_space);
}

int es_rows_read_hdf5(const es_rows_reader *reader, int64_t first, int64_t n, void *out, hid_t mem_type,
                      const char *mem_name, es_error *err) {
    es_h5_conversion state;
    if (read_rows(reader, first, n, out, mem_type, &state) >= 0) return ES_OK;
    char why[512];
    snprintf(why, sizeof why, "%s", es_h5_last_error());
    char stored_name[64] = "?";
    es_h5_type_name(reader->stored, stored_name, sizeof stored_name);
    /* Halve [lo, hi), which holds a bad row, down to that row. */
    int64_t lo = first, hi = first + n;
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        if (read_rows(reader, lo, mid - lo, out, mem_type, &state) < 0) hi = mid;
        else lo = mid;
    }
    if (read_rows(reader, lo, 1, out, mem_type, &state) >= 0) /* not repeatable: say what HDF5 said first */
        return es_fail(err, ES_ERR_DATA, "%s: cannot read rows %lld..%lld: %s", reader->name, (long long)first,
                       (long long)(first + n - 1), why);
    if (state.problem >= 0) {
        char value[64];
        row_value(reader, lo, value, sizeof value);
        return es_fail(err, ES_ERR_DATA, "%s: row %lld holds %s%s (stored as %s, read as %s)", reader->name, (long long)lo,
                       es_h5_conversion_problem(&state, mem_name), value, stored_name, mem_name);
    }
    snprintf(why, sizeof why, "%s", es_h5_last_error());
    if (reader->chunk_rows > 0) {
        int64_t chunk = lo / reader->chunk_rows, chunk_first = chunk * reader->chunk_rows;
        int64_t chunk_end = chunk_first + reader->chunk_rows < reader->rows ? chunk_first + reader->chunk_rows : reader->rows;
        return es_fail(err, ES_ERR_DATA, "%s: chunk %lld (rows %lld..%lld) is corrupt or unreadable: %s", reader->name,
                       (long long)chunk, (long long)chunk_first, (long long)(chunk_end - 1), why);
    }
    return es_fail(err, ES_ERR_DATA, "%s: row %lld is corrupt or unreadable: %s", reader->name, (long long)lo, why);
}
