/* essence-inspect compare A.h5 B.h5 [--tol X]: are two HDF5 files the same, and if not, by how
 * much? The thread, stream and CPU-against-GPU checks rest on it.
 *
 * Every dataset of both files (all groups, sorted by path) gets one line: "identical" when
 * bit-equal, otherwise its figures (inspect_compare.h). Without --tol the files agree only when
 * every dataset is identical; with --tol X, a float dataset agrees when no NaN/Inf position
 * differs and its max relative error (per row, L2) is <= X, and integers and strings must be
 * equal. A dataset in one file only, or of another shape or type class, never agrees. Root
 * attributes that differ are listed but not judged: files made at different times differ in
 * `created`. Exit: 0 agree, 1 differ (the one-line error says so), 2 usage, 3 bad input. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h5file.h"
#include "inspect.h"
#include "inspect_compare.h"

/* ---- shared helpers (inspect_compare.h) --------------------------------------------- */

hid_t compare_select_rows(const compare_pair *pair, hid_t dataset, int64_t first, int64_t n, hid_t *mem_space) {
    *mem_space = -1;
    hid_t space = H5Dget_space(dataset);
    if (space < 0) return -1;
    if (pair->rank == 0) { /* a scalar: its one value */
        *mem_space = H5Screate(H5S_SCALAR);
    } else {
        hsize_t start[H5S_MAX_RANK] = {0}, count[H5S_MAX_RANK];
        memcpy(count, pair->dims, sizeof count);
        start[0] = (hsize_t)first, count[0] = (hsize_t)n;
        if (H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL) >= 0)
            *mem_space = H5Screate_simple(pair->rank, count, NULL);
    }
    if (*mem_space < 0) {
        H5Sclose(space);
        return -1;
    }
    return space;
}

int64_t compare_block_rows(const compare_pair *pair, hid_t dataset, size_t value_bytes, size_t target) {
    double row_bytes = (double)pair->row_values * (double)value_bytes;
    int64_t rows = row_bytes > 0 && row_bytes < (double)target ? (int64_t)((double)target / row_bytes) : 1;
    hid_t dcpl = H5Dget_create_plist(dataset);
    hsize_t chunk[H5S_MAX_RANK] = {0};
    if (dcpl >= 0 && pair->rank > 0 && H5Pget_layout(dcpl) == H5D_CHUNKED && H5Pget_chunk(dcpl, H5S_MAX_RANK, chunk) > 0 &&
        chunk[0] > 0)
        rows = (rows + (int64_t)chunk[0] - 1) / (int64_t)chunk[0] * (int64_t)chunk[0]; /* whole chunks */
    if (dcpl >= 0) H5Pclose(dcpl);
    return rows < pair->rows ? rows : pair->rows > 0 ? pair->rows : 1;
}

/* ---- the list of datasets ------------------------------------------------------------ */

typedef struct name_list {
    char **names;
    size_t count, cap;
    int out_of_memory;
} name_list;

static herr_t collect_dataset(hid_t root, const char *name, const H5O_info_t *info, void *data) {
    (void)root;
    name_list *list = data;
    if (info->type != H5O_TYPE_DATASET) return 0;
    if (list->count == list->cap) {
        size_t cap = list->cap ? 2 * list->cap : 64;
        char **bigger = realloc(list->names, cap * sizeof *bigger);
        if (!bigger) return list->out_of_memory = 1, -1;
        list->names = bigger, list->cap = cap;
    }
    if (asprintf(&list->names[list->count], "/%s", name) < 0) return list->out_of_memory = 1, -1;
    list->count++;
    return 0;
}

static int by_name(const void *x, const void *y) { return strcmp(*(char *const *)x, *(char *const *)y); }

static void free_list(name_list *list) {
    for (size_t i = 0; i < list->count; i++) free(list->names[i]);
    free(list->names);
}

static int list_datasets(hid_t file, const char *path, name_list *list, es_error *err) {
    memset(list, 0, sizeof *list);
    if (H5Ovisit2(file, H5_INDEX_NAME, H5_ITER_INC, collect_dataset, list, H5O_INFO_BASIC) < 0) {
        int rc = list->out_of_memory ? es_fail(err, ES_ERR_RUNTIME, "out of memory")
                                     : es_fail(err, ES_ERR_DATA, "%s: cannot list the file's objects: %s", path, es_h5_last_error());
        free_list(list);
        return rc;
    }
    /* Byte order of the full paths: the same order whatever each file's link order. */
    if (list->count) qsort(list->names, list->count, sizeof *list->names, by_name);
    return ES_OK;
}

/* ---- one dataset ---------------------------------------------------------------------- */

typedef enum { SAME, WITHIN, DIFFER } verdict;

typedef struct tally {
    int datasets, identical, within, differ, only_a, only_b;
} tally;

static void index_text(const compare_pair *pair, int64_t flat, char *buf, size_t size) {
    hsize_t at[H5S_MAX_RANK];
    for (int d = pair->rank - 1; d >= 0; d--) {
        at[d] = (hsize_t)flat % pair->dims[d];
        flat /= (int64_t)pair->dims[d];
    }
    inspect_dims_text(at, pair->rank, buf, size);
}

static void print_figures(const compare_pair *pair, const compare_figures *f) {
    char at[128];
    printf("%lld of %lld values differ", (long long)f->differing, (long long)f->values);
    if (f->numeric && f->differing > f->nonfinite) {
        index_text(pair, f->max_abs_at, at, sizeof at);
        printf(", max abs %.9g at %s, max rel %.6g", f->max_abs, at, f->max_rel);
        if (pair->rank >= 2) printf(" at row %lld", (long long)f->max_rel_row);
        printf(", nmse %.6g", f->nmse);
    } else if (!f->numeric && f->differing) {
        index_text(pair, f->first_diff, at, sizeof at);
        printf(", first at %s", at);
    }
    if (f->nonfinite) printf(", %lld NaN/Inf mismatches", (long long)f->nonfinite);
    if (!f->differing && pair->same_type && f->numeric) printf(" (the bits differ: -0 against +0, or NaN payloads)");
    if (f->note[0]) printf(" (%s)", f->note);
}

static verdict judge(const compare_pair *pair, const compare_figures *f, int tol_set, double tol) {
    if (f->not_compared) return DIFFER;
    if (pair->same_type && f->bits_equal && !f->differing) return SAME;
    if (!tol_set) return DIFFER;
    if (f->integer || !f->numeric) return f->differing ? DIFFER : WITHIN;
    return f->nonfinite == 0 && f->max_rel <= tol ? WITHIN : DIFFER;
}

static int shape_of(hid_t dataset, int *rank, hsize_t *dims) {
    hid_t space = H5Dget_space(dataset);
    if (space < 0) return -1;
    H5S_class_t cls = H5Sget_simple_extent_type(space);
    *rank = cls == H5S_NULL ? -1 : H5Sget_simple_extent_ndims(space); /* -1: no dataspace at all */
    if (*rank > 0) H5Sget_simple_extent_dims(space, dims, NULL);
    H5Sclose(space);
    return *rank < -1 ? -1 : 0;
}

static int is_number(H5T_class_t cls) { return cls == H5T_INTEGER || cls == H5T_FLOAT; }

static int compare_dataset(compare_pair *pair, es_pool *pool, int tol_set, double tol, tally *counts, es_error *err) {
    int rc = ES_OK, rank_a = 0, rank_b = 0;
    hsize_t dims_b[H5S_MAX_RANK] = {0};
    char type_a[64] = "?", type_b[64] = "?", shape_a[256], shape_b[256];
    pair->a = H5Dopen2(pair->file_a, pair->path, H5P_DEFAULT);
    pair->b = H5Dopen2(pair->file_b, pair->path, H5P_DEFAULT);
    pair->type_a = pair->a < 0 ? -1 : H5Dget_type(pair->a);
    pair->type_b = pair->b < 0 ? -1 : H5Dget_type(pair->b);
    if (pair->type_a < 0 || shape_of(pair->a, &rank_a, pair->dims) < 0)
        rc = es_fail(err, ES_ERR_DATA, "%s: cannot open the dataset: %s", pair->name_a, es_h5_last_error());
    else if (pair->type_b < 0 || shape_of(pair->b, &rank_b, dims_b) < 0)
        rc = es_fail(err, ES_ERR_DATA, "%s: cannot open the dataset: %s", pair->name_b, es_h5_last_error());
    if (!rc) {
        inspect_type_name(pair->type_a, type_a, sizeof type_a);
        inspect_type_name(pair->type_b, type_b, sizeof type_b);
        inspect_dims_text(pair->dims, rank_a > 0 ? rank_a : 0, shape_a, sizeof shape_a);
        inspect_dims_text(dims_b, rank_b > 0 ? rank_b : 0, shape_b, sizeof shape_b);
        pair->same_type = H5Tequal(pair->type_a, pair->type_b) > 0;
        H5T_class_t cls_a = H5Tget_class(pair->type_a), cls_b = H5Tget_class(pair->type_b);
        char types[160];
        snprintf(types, sizeof types, pair->same_type ? "%s" : "%s vs %s", type_a, type_b);
        if (rank_a != rank_b || memcmp(pair->dims, dims_b, sizeof dims_b) != 0) {
            printf("%s: shape %s vs %s: differ\n", pair->path, rank_a < 0 ? "null" : shape_a, rank_b < 0 ? "null" : shape_b);
            counts->differ++;
        } else if (cls_a != cls_b) { /* integer against float too: a value of another kind is a change */
            printf("%s %s: type %s: differ\n", pair->path, shape_a, types);
            counts->differ++;
        } else {
            compare_figures figures;
            pair->rank = rank_a > 0 ? rank_a : 0;
            pair->rows = rank_a < 0 ? 0 : rank_a == 0 ? 1 : (int64_t)pair->dims[0];
            pair->row_values = 1;
            for (int d = 1; d < pair->rank; d++) pair->row_values *= (int64_t)pair->dims[d];
            rc = is_number(cls_a) ? compare_numeric(pair, pool, &figures, err) : compare_other(pair, &figures, err);
            if (!rc) {
                verdict v = judge(pair, &figures, tol_set, tol);
                printf("%s %s %s: %s", pair->path, rank_a < 0 ? "null" : shape_a, types,
                       v == SAME ? "identical" : v == WITHIN ? "within tolerance: " : "differ: ");
                if (v != SAME) print_figures(pair, &figures);
                printf("\n");
                counts->identical += v == SAME, counts->within += v == WITHIN, counts->differ += v == DIFFER;
            }
        }
    }
    if (pair->type_a >= 0) H5Tclose(pair->type_a);
    if (pair->type_b >= 0) H5Tclose(pair->type_b);
    if (pair->a >= 0) H5Dclose(pair->a);
    if (pair->b >= 0) H5Dclose(pair->b);
    return rc;
}

/* ---- the command ------------------------------------------------------------------------ */

static int compare_files(es_h5file *a, es_h5file *b, es_pool *pool, int tol_set, double tol, tally *counts, es_error *err) {
    name_list list_a, list_b;
    int rc = list_datasets(a->id, a->path, &list_a, err);
    if (rc) return rc;
    rc = list_datasets(b->id, b->path, &list_b, err);
    if (rc) {
        free_list(&list_a);
        return rc;
    }
    size_t i = 0, j = 0;
    while (!rc && (i < list_a.count || j < list_b.count)) {
        int order = i == list_a.count ? 1 : j == list_b.count ? -1 : strcmp(list_a.names[i], list_b.names[j]);
        counts->datasets++;
        if (order != 0) {
            const char *path = order < 0 ? list_a.names[i++] : list_b.names[j++];
            printf("%s: only in %s\n", path, order < 0 ? a->path : b->path);
            if (order < 0) counts->only_a++;
            else counts->only_b++;
            continue;
        }
        char *name_a = NULL, *name_b = NULL;
        const char *path = list_a.names[i++];
        j++;
        if (asprintf(&name_a, "%s:%s", a->path, path) < 0) name_a = NULL;
        if (asprintf(&name_b, "%s:%s", b->path, path) < 0) name_b = NULL;
        if (!name_a || !name_b) {
            rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        } else {
            compare_pair pair = {.file_a = a->id, .file_b = b->id, .path = path, .name_a = name_a, .name_b = name_b};
            rc = compare_dataset(&pair, pool, tol_set, tol, counts, err);
        }
        free(name_a), free(name_b);
        fflush(stdout); /* a line per dataset as it is done: large files take a while */
    }
    free_list(&list_a);
    free_list(&list_b);
    return rc;
}

int inspect_compare(const char *path_a, const char *path_b, const es_config *cfg, es_error *err) {
    const int tol_set = es_config_is_set(cfg, "tol");
    const double tol = tol_set ? es_config_float(cfg, "tol") : 0;
    if (tol_set && !(tol >= 0))
        return es_fail(err, ES_ERR_USAGE, "--tol %s: the tolerance must be a number >= 0", es_config_str(cfg, "tol"));
    es_h5file a, b;
    int rc = es_h5_open(&a, path_a, err);
    if (rc) return rc;
    if ((rc = es_h5_open(&b, path_b, err))) {
        es_h5_close(&a, 0);
        return rc;
    }
    es_pool *pool = es_pool_create((int)es_config_int(cfg, "threads"));
    tally counts = {0};
    if (!pool) rc = es_fail(err, ES_ERR_RUNTIME, "cannot start worker threads");
    if (!rc) printf("comparing %s with %s (the reference)\n", path_a, path_b);
    if (!rc) rc = compare_files(&a, &b, pool, tol_set, tol, &counts, err);
    if (!rc) rc = compare_root_attributes(a.id, path_a, b.id, path_b, err);
    if (!rc) {
        int only = counts.only_a + counts.only_b, bad = counts.differ + only;
        printf("summary: %d dataset%s: %d identical, %d within tolerance, %d differ, %d only in one file; ", counts.datasets,
               counts.datasets == 1 ? "" : "s", counts.identical, counts.within, counts.differ, only);
        if (bad) printf("the files differ\n");
        else if (counts.within) printf("the files agree within --tol %g\n", tol);
        else printf("the files are identical\n");
        if (bad)
            rc = es_fail(err, ES_ERR_RUNTIME, "%s and %s differ in %d of %d datasets", path_a, path_b, bad, counts.datasets);
    }
    es_pool_destroy(pool);
    es_h5_close(&a, 0);
    es_h5_close(&b, 0);
    return rc;
}
