/* essence-inspect compare: numeric datasets (ints, floats, bf16).
 *
 * Both datasets are read in blocks of whole rows, so a latent dataset of millions of rows is
 * never held whole. Where the row store can read a dataset (1-D/2-D of its element types) it
 * does, with its threaded direct-chunk decompression and its own bf16 widening; anything else
 * goes through HDF5's conversion to float64 or int64. Each block is then cut into a fixed
 * number of parts measured on the worker pool and merged in part order, so the figures do
 * not depend on the thread count. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "h5file.h"
#include "h5rows.h"
#include "inspect_compare.h"
#include "progress.h"

/* How the values of one block lie in memory. */
typedef enum { V_BF16, V_F32, V_F64, V_I32, V_I64, V_U8, V_U64 } value_kind;

static size_t kind_size(value_kind kind) {
    static const size_t sizes[] = {2, 4, 8, 4, 8, 1, 8};
    return sizes[kind];
}

typedef struct source {
    es_rows_reader rows;    /* used when use_rows */
    int use_rows;
    hid_t dataset;          /* otherwise: read through HDF5 as mem_type */
    hid_t mem_type;
    const char *name;
    value_kind kind;
    uint8_t *raw;           /* one block */
} source;

static value_kind kind_of_elem(es_h5_elem elem) {
    switch (elem) {
    case ES_H5_BF16: return V_BF16;
    case ES_H5_F32: return V_F32;
    case ES_H5_F64: return V_F64;
    case ES_H5_I32: return V_I32;
    case ES_H5_I64: return V_I64;
    case ES_H5_U8: return V_U8;
    }
    return V_F64;
}

static int is_u64(hid_t type) { return H5Tget_size(type) == 8 && H5Tget_sign(type) == H5T_SGN_NONE; }

static void open_source(const compare_pair *pair, int which, es_pool *pool, source *src) {
    memset(src, 0, sizeof *src);
    src->dataset = which ? pair->b : pair->a;
    src->name = which ? pair->name_b : pair->name_a;
    hid_t file = which ? pair->file_b : pair->file_a;
    int integer = H5Tget_class(pair->type_a) == H5T_INTEGER;
    /* uint64 needs its own memory type (int64 would saturate); the row store has no uint64. */
    int both_u64 = integer && is_u64(pair->type_a) && is_u64(pair->type_b);
    if (!both_u64 && (pair->rank == 1 || pair->rank == 2)) {
        /* The row store reads what it can (int16 as int32, float16 as float32, ...); what it
         * refuses (strings, rank 3, ...) HDF5 converts below. */
        es_error ignored = {0};
        if (es_rows_open(&src->rows, file, pair->path, pool, &ignored) == ES_OK) {
            src->use_rows = 1;
            src->kind = kind_of_elem(src->rows.elem);
            return;
        }
    }
    src->kind = both_u64 ? V_U64 : integer ? V_I64 : V_F64;
    src->mem_type = both_u64 ? H5T_NATIVE_UINT64 : integer ? H5T_NATIVE_INT64 : H5T_NATIVE_DOUBLE;
}

static void close_source(source *src) {
    if (src->use_rows) es_rows_close_reader(&src->rows);
    free(src->raw);
    src->raw = NULL;
}

static int read_block(const compare_pair *pair, source *src, int64_t first, int64_t n, es_error *err) {
    if (src->use_rows) return es_rows_read(&src->rows, first, n, src->raw, err);
    hid_t mem_space = -1;
    hid_t file_space = compare_select_rows(pair, src->dataset, first, n, &mem_space);
    herr_t status = file_space < 0 ? -1 : H5Dread(src->dataset, src->mem_type, mem_space, file_space, H5P_DEFAULT, src->raw);
    if (file_space >= 0) H5Sclose(file_space);
    if (mem_space >= 0) H5Sclose(mem_space);
    if (status < 0)
        return es_fail(err, ES_ERR_DATA, "%s: cannot read rows %lld..%lld: %s", src->name, (long long)first,
                       (long long)(first + n - 1), es_h5_last_error());
    return ES_OK;
}

/* ---- measuring one part of a block ---------------------------------------------------- */

typedef struct part_result {
    int64_t differing, nonfinite, first_diff, max_abs_at, max_rel_row;
    double max_abs, max_rel, sum_d2, sum_a2, sum_b2;
    int bits_equal;
} part_result;

typedef struct block_job {
    const source *a, *b;
    int64_t first_row, rows, row_values, rows_per_part;
    int per_row_rel;        /* rank >= 2: the relative error is per row */
    int integer, same_kind;
    part_result *parts;
} block_job;

enum { PIECE = 1024, PARTS = 64 };

static void to_double(value_kind kind, const uint8_t *raw, int64_t start, int64_t n, double *out) {
    /* One loop per kind; the latents' kinds in groups of 8, which the compiler vectorises. */
    const uint8_t *p = raw + (size_t)start * kind_size(kind);
    int64_t i = 0;
    switch (kind) {
    case V_BF16: {
        const uint16_t *bits = (const uint16_t *)p; /* blocks are malloc'd: aligned for any element */
        for (; i + 8 <= n; i += 8)
            for (int k = 0; k < 8; k++) out[i + k] = es_bf16_to_f32(bits[i + k]);
        for (; i < n; i++) out[i] = es_bf16_to_f32(bits[i]);
        break;
    }
    case V_F32: {
        const float *values = (const float *)p;
        for (; i + 8 <= n; i += 8)
            for (int k = 0; k < 8; k++) out[i + k] = values[i + k];
        for (; i < n; i++) out[i] = values[i];
        break;
    }
    case V_F64: memcpy(out, p, (size_t)n * 8); break;
    case V_I32: for (; i < n; i++) { int32_t v; memcpy(&v, p + 4 * i, 4); out[i] = v; } break;
    case V_I64: for (; i < n; i++) { int64_t v; memcpy(&v, p + 8 * i, 8); out[i] = (double)v; } break;
    case V_U8: for (; i < n; i++) out[i] = p[i]; break;
    case V_U64: for (; i < n; i++) { uint64_t v; memcpy(&v, p + 8 * i, 8); out[i] = (double)v; } break;
    }
}

/* Integers keep their exact value (uint64 as its bit pattern: both sides are uint64 then). */
static void to_int64(value_kind kind, const uint8_t *raw, int64_t start, int64_t n, int64_t *out) {
    const uint8_t *p = raw + (size_t)start * kind_size(kind);
    switch (kind) {
    case V_I32: for (int64_t i = 0; i < n; i++) { int32_t v; memcpy(&v, p + 4 * i, 4); out[i] = v; } break;
    case V_U8: for (int64_t i = 0; i < n; i++) out[i] = p[i]; break;
    default: memcpy(out, p, (size_t)n * 8); break;
    }
}

/* Per-row sums close a row: its relative error, and the part's totals. */
typedef struct row_sums {
    double d2, a2, b2;
} row_sums;

static void close_row(part_result *part, row_sums *row, int64_t row_index, int per_row_rel) {
    if (per_row_rel && row->d2 > 0) {
        double scale = row->a2 > row->b2 ? row->a2 : row->b2;
        double rel = sqrt(row->d2 / scale);
        if (rel > part->max_rel) part->max_rel = rel, part->max_rel_row = row_index;
    }
    part->sum_d2 += row->d2, part->sum_a2 += row->a2, part->sum_b2 += row->b2;
    *row = (row_sums){0, 0, 0};
}

/* Elements [0, n) of a piece, all in one row, in the common case: every value finite. Four
 * independent lanes let the additions overlap (a single chain of sums is bound by add latency);
 * the order is fixed, so the result still does not depend on the thread count. Returns 0 when a
 * value is not finite or a sum overflowed: the piece is then measured element by element. */
static int piece_fast(part_result *part, row_sums *row, const double *x, const double *y, int64_t n, int64_t at) {
    double d2[4] = {0}, a2[4] = {0}, b2[4] = {0}, top[4] = {0};
    int64_t differ[4] = {0};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
#pragma GCC unroll 4
        for (int l = 0; l < 4; l++) { /* unrolled whole, so the lanes live in registers */
            double d = x[j + l] - y[j + l], size = fabs(d);
            d2[l] += d * d, a2[l] += x[j + l] * x[j + l], b2[l] += y[j + l] * y[j + l];
            top[l] = size > top[l] ? size : top[l];
            differ[l] += x[j + l] != y[j + l];
        }
    for (; j < n; j++) {
        double d = x[j] - y[j], size = fabs(d);
        d2[0] += d * d, a2[0] += x[j] * x[j], b2[0] += y[j] * y[j];
        top[0] = size > top[0] ? size : top[0];
        differ[0] += x[j] != y[j];
    }
    double sum_d2 = (d2[0] + d2[1]) + (d2[2] + d2[3]), sum_a2 = (a2[0] + a2[1]) + (a2[2] + a2[3]);
    double sum_b2 = (b2[0] + b2[1]) + (b2[2] + b2[3]);
    if (!isfinite(sum_d2) || !isfinite(sum_a2) || !isfinite(sum_b2)) return 0;
    int64_t n_differ = differ[0] + differ[1] + differ[2] + differ[3];
    double largest = top[0] > top[1] ? top[0] : top[1];
    largest = top[2] > largest ? top[2] : largest;
    largest = top[3] > largest ? top[3] : largest;
    /* Positions are looked up only when they matter: rarely, once a part has seen some data. */
    if (n_differ && part->first_diff < 0)
        for (int64_t j = 0; j < n; j++)
            if (x[j] != y[j]) {
                part->first_diff = at + j;
                break;
            }
    if (largest > part->max_abs)
        for (int64_t j = 0; j < n; j++)
            if (fabs(x[j] - y[j]) == largest) {
                part->max_abs = largest, part->max_abs_at = at + j;
                break;
            }
    part->differing += n_differ;
    row->d2 += sum_d2, row->a2 += sum_a2, row->b2 += sum_b2;
    return 1;
}

/* The same, element by element: NaN/Inf, and integers (exact, on their int64 values). */
static void piece_exact(part_result *part, row_sums *row, const double *x, const double *y, const int64_t *ix,
                        const int64_t *iy, int64_t n, int64_t at) {
    for (int64_t j = 0; j < n; j++) {
        int equal = ix ? ix[j] == iy[j] : (x[j] == y[j] || (isnan(x[j]) && isnan(y[j])));
        if (equal) {
            if (isfinite(x[j])) row->a2 += x[j] * x[j], row->b2 += x[j] * x[j];
            continue;
        }
        part->differing++;
        if (part->first_diff < 0) part->first_diff = at + j;
        if (!isfinite(x[j]) || !isfinite(y[j])) {
            part->nonfinite++; /* left out of the figures: they would all be NaN or Inf */
            continue;
        }
        double d = x[j] - y[j];
        row->d2 += d * d, row->a2 += x[j] * x[j], row->b2 += y[j] * y[j];
        if (fabs(d) > part->max_abs) part->max_abs = fabs(d), part->max_abs_at = at + j;
    }
}

static void measure_part(void *arg, size_t index, int worker) {
    (void)worker;
    block_job *job = arg;
    part_result *part = &job->parts[index];
    *part = (part_result){.first_diff = -1, .max_abs_at = -1, .max_rel_row = -1};
    int64_t r0 = (int64_t)index * job->rows_per_part;
    int64_t r1 = r0 + job->rows_per_part < job->rows ? r0 + job->rows_per_part : job->rows;
    if (r0 >= r1) {
        part->bits_equal = 1;
        return;
    }
    const int64_t width = job->row_values, e0 = r0 * width, e1 = r1 * width;
    const int64_t base = job->first_row * width; /* flat index of the block's first element */
    size_t bytes = kind_size(job->a->kind);
    part->bits_equal = job->same_kind &&
                       memcmp(job->a->raw + (size_t)e0 * bytes, job->b->raw + (size_t)e0 * bytes, (size_t)(e1 - e0) * bytes) == 0;
    double va[PIECE], vb[PIECE];
    int64_t ia[PIECE], ib[PIECE];
    row_sums row = {0, 0, 0};
    /* Pieces never cross a row (rank >= 2), so each closes at most one; otherwise the part is one sum. */
    int64_t row_index = job->first_row + r0, row_left = job->per_row_rel ? width : INT64_MAX;
    for (int64_t e = e0; e < e1;) {
        int64_t n = e1 - e < PIECE ? e1 - e : PIECE;
        if (n > row_left) n = row_left;
        to_double(job->a->kind, job->a->raw, e, n, va);
        /* Equal bytes: B's values are A's, and the differences all zero. */
        const double *y = va;
        if (!part->bits_equal) {
            to_double(job->b->kind, job->b->raw, e, n, vb);
            y = vb;
        }
        if (job->integer && !part->bits_equal) {
            to_int64(job->a->kind, job->a->raw, e, n, ia);
            to_int64(job->b->kind, job->b->raw, e, n, ib);
            piece_exact(part, &row, va, y, ia, ib, n, base + e);
        } else if (!piece_fast(part, &row, va, y, n, base + e)) {
            piece_exact(part, &row, va, y, NULL, NULL, n, base + e);
        }
        e += n;
        if ((row_left -= n) == 0) {
            close_row(part, &row, row_index++, job->per_row_rel);
            row_left = width;
        }
    }
    if (!job->per_row_rel) close_row(part, &row, row_index, 0);
}

static void merge(compare_figures *out, const part_result *part, double *sums) {
    out->differing += part->differing;
    out->nonfinite += part->nonfinite;
    if (out->first_diff < 0) out->first_diff = part->first_diff;
    if (part->max_abs > out->max_abs) out->max_abs = part->max_abs, out->max_abs_at = part->max_abs_at;
    if (part->max_rel > out->max_rel) out->max_rel = part->max_rel, out->max_rel_row = part->max_rel_row;
    sums[0] += part->sum_d2, sums[1] += part->sum_a2, sums[2] += part->sum_b2;
    out->bits_equal = out->bits_equal && part->bits_equal;
}

static void finish_figures(compare_figures *out, const compare_pair *pair, const double *sums) {
    const double d2 = sums[0], a2 = sums[1], b2 = sums[2];
    out->nmse = b2 > 0 ? d2 / b2 : d2 > 0 ? INFINITY : 0;
    if (pair->rank <= 1 && d2 > 0) { /* one vector: its relative error */
        out->max_rel = sqrt(d2 / (a2 > b2 ? a2 : b2));
        out->max_rel_row = 0;
    }
}

int compare_numeric(const compare_pair *pair, es_pool *pool, compare_figures *out, es_error *err) {
    *out = (compare_figures){.numeric = 1, .bits_equal = 1, .first_diff = -1, .max_abs_at = -1, .max_rel_row = -1};
    out->integer = H5Tget_class(pair->type_a) == H5T_INTEGER;
    out->values = pair->rows * pair->row_values;
    if (out->values == 0) return ES_OK;
    source a, b;
    open_source(pair, 0, pool, &a);
    open_source(pair, 1, pool, &b);
    int rc = ES_OK;
    /* About 32 MB per file per block, in whole chunks of the first file. */
    size_t widest = kind_size(a.kind) > kind_size(b.kind) ? kind_size(a.kind) : kind_size(b.kind);
    const int64_t block = compare_block_rows(pair, pair->a, widest, (size_t)32 << 20);
    a.raw = malloc((size_t)(block * pair->row_values) * kind_size(a.kind));
    b.raw = malloc((size_t)(block * pair->row_values) * kind_size(b.kind));
    part_result parts[PARTS];
    if (!a.raw || !b.raw) rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory for %lld-row blocks", pair->name_a, (long long)block);
    block_job job = {.a = &a, .b = &b, .row_values = pair->row_values, .per_row_rel = pair->rank >= 2,
                     .integer = out->integer, .same_kind = a.kind == b.kind && pair->same_type, .parts = parts};
    double sums[3] = {0, 0, 0};
    es_progress progress;
    es_progress_start(&progress, pair->path, "rows", pair->rows);
    for (int64_t first = 0; !rc && first < pair->rows; first += block) {
        int64_t n = pair->rows - first < block ? pair->rows - first : block;
        rc = read_block(pair, &a, first, n, err);
        if (!rc) rc = read_block(pair, &b, first, n, err);
        if (rc) break;
        job.first_row = first, job.rows = n;
        job.rows_per_part = (n + PARTS - 1) / PARTS;
        size_t n_parts = (size_t)((n + job.rows_per_part - 1) / job.rows_per_part);
        if (pool) es_pool_for(pool, n_parts, measure_part, &job);
        else for (size_t i = 0; i < n_parts; i++) measure_part(&job, i, 0);
        for (size_t i = 0; i < n_parts; i++) merge(out, &parts[i], sums);
        es_progress_add(&progress, n);
    }
    es_progress_finish(&progress);
    if (!rc) finish_figures(out, pair, sums);
    close_source(&a);
    close_source(&b);
    return rc;
}
