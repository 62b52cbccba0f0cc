/* essence-inspect compare: what its files share. inspect_compare.c walks the two files and
 * judges; inspect_compare_numeric.c measures numeric datasets; inspect_compare_other.c counts
 * differing elements of strings and every other type; inspect_compare_attrs.c lists the root
 * attributes that differ. */
#ifndef ES_INSPECT_COMPARE_H
#define ES_INSPECT_COMPARE_H

#include <hdf5.h>
#include <stdint.h>

#include "error.h"
#include "threadpool.h"

/* One dataset in both files, already checked to have the same shape and type class. */
typedef struct compare_pair {
    hid_t file_a, file_b;
    const char *path;       /* the dataset's path, the same in both */
    hid_t a, b;             /* the datasets */
    hid_t type_a, type_b;   /* their file types */
    const char *name_a;     /* "A.h5:/path", for messages */
    const char *name_b;
    int rank;               /* 0 for a scalar */
    hsize_t dims[H5S_MAX_RANK];
    int64_t rows;           /* dims[0] (1 for a scalar) */
    int64_t row_values;     /* values per row: the product of dims[1..] */
    int same_type;          /* H5Tequal(type_a, type_b) */
} compare_pair;

/* What a comparison found. A "row" is one index of the first dimension (a token's latent
 * vector); 0-D and 1-D datasets count as one vector for the relative error. */
typedef struct compare_figures {
    int64_t values;         /* elements compared */
    int64_t differing;      /* elements whose values differ (non-finite mismatches included) */
    int64_t nonfinite;      /* NaN against a number, or an Inf against anything but the same Inf */
    int64_t first_diff;     /* flat index of the first differing element, -1 when none */
    double max_abs;         /* max |a - b| over finite pairs */
    int64_t max_abs_at;     /* its flat index (the first one), -1 when none */
    double max_rel;         /* max over rows of |a_r - b_r| / max(|a_r|, |b_r|) (L2 norms) */
    int64_t max_rel_row;    /* its row, -1 when none */
    double nmse;            /* sum (a - b)^2 / sum b^2; 0 when both are all zero, inf when only b is */
    int bits_equal;         /* every element has the same bytes (meaningful when same_type) */
    int numeric;            /* 1: the figures above are filled; 0: only counts (strings, ...) */
    int integer;            /* integer class: agreement needs exact equality */
    int not_compared;       /* the values could not be compared (types too different) */
    char note[160];         /* why, or a remark for the line ("float32 vs float64") */
} compare_figures;

/* Ints and floats (bf16 included): streamed in row blocks, decompressed and compared on `pool`. */
int compare_numeric(const compare_pair *pair, es_pool *pool, compare_figures *out, es_error *err);
/* Strings (fixed or variable length), variable-length sequences and any fixed-size type. */
int compare_other(const compare_pair *pair, compare_figures *out, es_error *err);

/* Prints one line naming the root attributes that differ or exist in one file only (created,
 * fingerprint, ...): information only, never part of the verdict. */
int compare_root_attributes(hid_t a, const char *path_a, hid_t b, const char *path_b, es_error *err);

/* Frees what HDF5 allocated for variable-length elements read into buf. */
static inline herr_t compare_reclaim(hid_t type, hid_t space, void *buf) {
#if H5_VERSION_GE(1, 12, 0)
    return H5Treclaim(type, space, H5P_DEFAULT, buf);
#else
    return H5Dvlen_reclaim(type, space, H5P_DEFAULT, buf);
#endif
}

/* The rows [first, first + n) of a dataset as a selection, for block reads (a scalar: all).
 * Returns the file space (caller closes) and sets *mem_space, or -1. */
hid_t compare_select_rows(const compare_pair *pair, hid_t dataset, int64_t first, int64_t n, hid_t *mem_space);
/* Rows per block so that one block of `value_bytes`-sized values is about `target` bytes,
 * rounded to whole chunks of `dataset` (so HDF5 decodes each chunk once). */
int64_t compare_block_rows(const compare_pair *pair, hid_t dataset, size_t value_bytes, size_t target);

#endif
