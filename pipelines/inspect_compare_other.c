/* essence-inspect compare: datasets that are not numbers. Strings compare by their text
 * (fixed-length ones up to their padding, so a fixed and a variable-length string dataset of
 * the same texts have no differing element); variable-length sequences by length and
 * elements; every other fixed-size type (opaque, compound, enum, array, ...) by its bytes.
 * Only the count of differing elements is reported. Read in row blocks like the numbers. */
#include <stdlib.h>
#include <string.h>

#include "h5file.h"
#include "inspect_compare.h"

typedef enum { READ_TEXT, READ_SEQUENCE, READ_BYTES } read_mode;

/* One file's side: how its elements are read and how one is seen. */
typedef struct side {
    hid_t dataset;
    const char *name;
    hid_t mem_type;
    read_mode mode;
    int variable;           /* READ_TEXT: char * elements */
    H5T_str_t pad;          /* READ_TEXT, fixed length: how the text ends */
    size_t size;            /* bytes per element in memory */
    size_t base_size;       /* READ_SEQUENCE: bytes per sequence element */
    uint8_t *buf;
    hid_t mem_space;        /* of the block in buf, kept to free variable-length data */
} side;

/* Any part of the type whose data HDF5 allocates (vlen strings count: their class says
 * string, H5Tdetect_class reports them as variable length too). */
static int has_variable_parts(hid_t type) {
    return H5Tdetect_class(type, H5T_VLEN) > 0 || H5Tis_variable_str(type) > 0;
}

static int open_side(const compare_pair *pair, int which, read_mode mode, side *s, es_error *err) {
    memset(s, 0, sizeof *s);
    s->dataset = which ? pair->b : pair->a;
    s->name = which ? pair->name_b : pair->name_a;
    s->mem_space = -1;
    s->mode = mode;
    hid_t type = which ? pair->type_b : pair->type_a;
    if (mode == READ_TEXT && H5Tis_variable_str(type) > 0) {
        s->variable = 1;
        s->mem_type = H5Tcopy(H5T_C_S1);
        if (s->mem_type >= 0 && (H5Tset_size(s->mem_type, H5T_VARIABLE) < 0 || H5Tset_cset(s->mem_type, H5Tget_cset(type)) < 0)) {
            H5Tclose(s->mem_type);
            s->mem_type = -1;
        }
    } else if (mode == READ_SEQUENCE) {
        s->mem_type = H5Tget_native_type(type, H5T_DIR_DEFAULT);
        hid_t base = s->mem_type >= 0 ? H5Tget_super(s->mem_type) : -1;
        s->base_size = base >= 0 ? H5Tget_size(base) : 0;
        if (base >= 0) H5Tclose(base);
    } else {
        /* The file type itself: no conversion, the stored bytes (and a fixed string's padding rule). */
        s->mem_type = H5Tcopy(type);
        if (mode == READ_TEXT) s->pad = H5Tget_strpad(type);
    }
    if (s->mem_type < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot make a memory type: %s", s->name, es_h5_last_error());
    s->size = H5Tget_size(s->mem_type);
    return ES_OK;
}

static void release_block(side *s) {
    /* Variable-length data in buf was allocated by HDF5: hand it back before the next block. */
    if (s->mem_space >= 0 && (s->variable || s->mode == READ_SEQUENCE)) compare_reclaim(s->mem_type, s->mem_space, s->buf);
    if (s->mem_space >= 0) H5Sclose(s->mem_space);
    s->mem_space = -1;
}

static void close_side(side *s) {
    release_block(s);
    if (s->mem_type >= 0) H5Tclose(s->mem_type);
    free(s->buf);
}

static int read_side(const compare_pair *pair, side *s, int64_t first, int64_t n, es_error *err) {
    release_block(s);
    hid_t file_space = compare_select_rows(pair, s->dataset, first, n, &s->mem_space);
    herr_t status = file_space < 0 ? -1 : H5Dread(s->dataset, s->mem_type, s->mem_space, file_space, H5P_DEFAULT, s->buf);
    if (file_space >= 0) H5Sclose(file_space);
    if (status < 0) {
        /* Nothing was allocated for a failed read; do not reclaim it. */
        if (s->mem_space >= 0) H5Sclose(s->mem_space);
        s->mem_space = -1;
        return es_fail(err, ES_ERR_DATA, "%s: cannot read rows %lld..%lld: %s", s->name, (long long)first,
                       (long long)(first + n - 1), es_h5_last_error());
    }
    return ES_OK;
}

/* Element i's text, without the padding of a fixed-length string. */
static const char *text_of(const side *s, size_t i, size_t *len) {
    if (s->variable) {
        const char *text = ((char *const *)s->buf)[i];
        *len = text ? strlen(text) : 0;
        return text ? text : "";
    }
    const char *text = (const char *)s->buf + i * s->size;
    size_t n = s->size;
    if (s->pad == H5T_STR_SPACEPAD) while (n > 0 && text[n - 1] == ' ') n--;
    else n = strnlen(text, n);
    *len = n;
    return text;
}

static int element_equal(const side *a, const side *b, size_t i) {
    if (a->mode == READ_TEXT) {
        size_t la, lb;
        const char *ta = text_of(a, i, &la), *tb = text_of(b, i, &lb);
        return la == lb && memcmp(ta, tb, la) == 0;
    }
    if (a->mode == READ_SEQUENCE) {
        const hvl_t *sa = (const hvl_t *)a->buf + i, *sb = (const hvl_t *)b->buf + i;
        return sa->len == sb->len && (sa->len == 0 || memcmp(sa->p, sb->p, sa->len * a->base_size) == 0);
    }
    return memcmp(a->buf + i * a->size, b->buf + i * b->size, a->size) == 0;
}

int compare_other(const compare_pair *pair, compare_figures *out, es_error *err) {
    *out = (compare_figures){.first_diff = -1, .max_abs_at = -1, .max_rel_row = -1, .bits_equal = 1};
    out->values = pair->rows * pair->row_values;
    H5T_class_t cls = H5Tget_class(pair->type_a);
    read_mode mode = cls == H5T_STRING ? READ_TEXT : cls == H5T_VLEN ? READ_SEQUENCE : READ_BYTES;
    /* Outside strings, values are only comparable in the very same type. */
    if (mode != READ_TEXT && !pair->same_type) {
        out->not_compared = 1;
        snprintf(out->note, sizeof out->note, "the element types differ");
        return ES_OK;
    }
    hid_t base = mode == READ_SEQUENCE ? H5Tget_super(pair->type_a) : -1;
    int nested = mode == READ_SEQUENCE ? base < 0 || has_variable_parts(base) : mode == READ_BYTES && has_variable_parts(pair->type_a);
    if (base >= 0) H5Tclose(base);
    if (nested) {
        out->not_compared = 1;
        snprintf(out->note, sizeof out->note, "elements with variable-length parts inside are not compared");
        return ES_OK;
    }
    if (out->values == 0) return ES_OK;
    side a, b;
    int rc = open_side(pair, 0, mode, &a, err);
    if (rc) return rc;
    rc = open_side(pair, 1, mode, &b, err);
    if (rc) {
        close_side(&a);
        return rc;
    }
    size_t widest = a.size > b.size ? a.size : b.size;
    const int64_t block = compare_block_rows(pair, pair->a, widest, (size_t)8 << 20);
    a.buf = calloc((size_t)(block * pair->row_values), a.size);
    b.buf = calloc((size_t)(block * pair->row_values), b.size);
    if (!a.buf || !b.buf) rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory for %lld-row blocks", pair->name_a, (long long)block);
    for (int64_t first = 0; !rc && first < pair->rows; first += block) {
        int64_t n = pair->rows - first < block ? pair->rows - first : block;
        rc = read_side(pair, &a, first, n, err);
        if (!rc) rc = read_side(pair, &b, first, n, err);
        size_t count = (size_t)(n * pair->row_values);
        for (size_t i = 0; !rc && i < count; i++) {
            if (element_equal(&a, &b, i)) continue;
            if (out->first_diff < 0) out->first_diff = first * pair->row_values + (int64_t)i;
            out->differing++;
        }
        /* Fixed-size elements: bytes equal means identical; strings: texts equal does. */
        if (!rc && mode == READ_BYTES && memcmp(a.buf, b.buf, count * a.size) != 0) out->bits_equal = 0;
    }
    if (out->differing) out->bits_equal = 0;
    close_side(&a);
    close_side(&b);
    return rc;
}
