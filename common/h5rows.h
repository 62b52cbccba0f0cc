/* Row datasets: the HDF5 latent store's workhorse.
 *
 * A row dataset is [rows] or [rows, width], chunked by `chunk_rows` whole rows, filtered
 * with shuffle + Zstandard (32015), and growable in rows. Chunks are compressed and
 * decompressed on a worker pool and moved with direct chunk I/O (H5Dwrite_chunk /
 * H5Dread_chunk), so the HDF5 library only ever sees finished bytes, on the calling thread.
 * Any HDF5 reader can read the result (h5py + hdf5plugin, h5dump with libh5zstd.so). */
#ifndef ES_H5ROWS_H
#define ES_H5ROWS_H

#include <hdf5.h>
#include <stdint.h>

#include "error.h"
#include "h5commit.h"
#include "threadpool.h"

typedef enum { ES_H5_BF16, ES_H5_F32, ES_H5_F64, ES_H5_I64, ES_H5_I32, ES_H5_U8 } es_h5_elem;

size_t es_h5_elem_size(es_h5_elem elem);
const char *es_h5_elem_name(es_h5_elem elem); /* "bf16", "float32", ... */
hid_t es_h5_elem_type(es_h5_elem elem);       /* the file/memory type; do not close */

/* Rows per chunk so that one chunk is about 1 MiB (h5py's default chunk cache size). */
int64_t es_h5_default_chunk_rows(es_h5_elem elem, int64_t width);

typedef struct es_chunk_slot es_chunk_slot;

typedef struct es_rows_writer {
    hid_t dataset;
    char *name;          /* "FILE:/path" for messages */
    es_h5_elem elem;
    size_t elem_size;
    int64_t width;       /* values per row; 1 for a 1-D dataset */
    int rank;            /* 1 or 2 */
    int64_t chunk_rows;
    int level;
    int64_t rows;        /* rows appended so far */
    int64_t extent;      /* rows the dataset has on disk */
    es_pool *pool;       /* NULL: everything on the calling thread */
    es_chunk_slot *slots; /* ring of chunks in flight, in chunk order */
    int n_slots, head, count; /* the oldest slot and how many are in use */
    int filling;         /* 1 when the newest slot is a chunk still being filled */
} es_rows_writer;

/* Creates dataset `name` (a path; missing groups are created) under `parent`.
 * width 0 makes a 1-D dataset. */
int es_rows_create(es_rows_writer *writer, hid_t parent, const char *name, es_h5_elem elem,
                   int64_t width, int64_t chunk_rows, int level, es_pool *pool, es_error *err);
/* Reopens an existing row dataset to append after its first `keep_rows` rows (-1: all of
 * them; rows past keep_rows are cut off). The last partial chunk is read back. */
int es_rows_open_append(es_rows_writer *writer, hid_t parent, const char *name, int64_t keep_rows,
                        es_pool *pool, es_error *err);
/* Appends `n` rows of the dataset's element type (bf16 as uint16_t bits). */
int es_rows_append(es_rows_writer *writer, const void *rows, int64_t n, es_error *err);
/* Appends fp32 rows to a bf16 or float32 dataset (bf16 rounding: common/dtype.h). */
int es_rows_append_f32(es_rows_writer *writer, const float *rows, int64_t n, es_error *err);
/* Makes every appended row part of the dataset on disk (the partial last chunk is written
 * padded, and rewritten when it fills). Follow with es_h5_flush for a commit point. */
int es_rows_flush(es_rows_writer *writer, es_error *err);
/* Flushes and closes. On error the dataset is closed all the same. */
int es_rows_close(es_rows_writer *writer, es_error *err);
/* Closes without writing anything more (a run that stopped: what the last commit covers stays,
 * the rest is cut off on resume). */
void es_rows_discard(es_rows_writer *writer);

/* For a commit point (common/h5commit.h): writes every whole chunk appended, sets the extent to
 * the rows appended, and adds the part NAME (the dataset's path) = [int64 rows][the rows of the
 * unfinished last chunk] to the record. That chunk is not written: a chunk a commit relies on
 * must never be rewritten. */
int es_rows_commit(es_rows_writer *writer, es_commit_record *record, es_error *err);
/* Reopens a row dataset of a .partial file to append after the rows the record's part for it
 * gives: the dataset is cut back to its whole chunks (what was written after the commit goes, torn
 * or not, without being read) and the unfinished chunk's rows come from the record. */
int es_rows_resume(es_rows_writer *writer, hid_t parent, const char *name, const es_commit_record *record, es_pool *pool,
                   es_error *err);

typedef struct es_rows_reader {
    hid_t dataset;
    char *name;
    es_h5_elem elem;     /* what reads deliver */
    hid_t stored;        /* the dataset's own element type (a copy) */
    int convert;         /* stored is not elem's type: HDF5 converts, range-checked */
    size_t elem_size;
    int64_t width, rows, chunk_rows;
    int rank;
    int direct;          /* chunks we can decode ourselves: [shuffle] + zstd, whole rows */
    int shuffled;        /* the shuffle filter is in the pipeline (before zstd) */
    es_pool *pool;
    es_chunk_slot *slots;
    int n_slots;
    uint8_t *cache[4];       /* the last chunks reads within one chunk decoded, whole */
    int64_t cache_chunk[4];  /* their indices, -1 when none */
    uint64_t cache_used[4];  /* when each was last used (least recently used goes first) */
    uint64_t cache_clock;
    int filling;             /* the cache is being filled (no recursion) */
} es_rows_reader;

/* Opens a 1-D or 2-D numeric dataset. `elem` is the stored type where it is one of ours,
 * else the nearest wider one HDF5 converts to (float16 -> float32, int16 -> int32,
 * uint32 -> int64, an enum (h5py's bool) -> its base's, a big-endian type -> ours, ...).
 * Any layout and filter pipeline HDF5 can read is accepted (a filter that cannot be loaded
 * is ES_ERR_DATA naming it); the fast path needs our own type in chunks of whole rows
 * filtered by [shuffle,] zstd. Strings, compounds and the like are ES_ERR_DATA naming the
 * type. */
int es_rows_open(es_rows_reader *reader, hid_t parent, const char *name, es_pool *pool, es_error *err);
/* A 1-D dataset (or [n, 1]) read as `elem` whatever its stored numeric type: HDF5 converts,
 * and a value that does not fit (out of range; to an integer type, a fraction or NaN) is
 * ES_ERR_DATA naming the file, dataset, row and value. */
int es_rows_open_column(es_rows_reader *reader, hid_t parent, const char *name, es_h5_elem elem, es_pool *pool,
                        es_error *err);
/* Reads rows [first, first + n) as `elem` (width values a row). A corrupted chunk is
 * ES_ERR_DATA naming the file, dataset, chunk and rows. A read within one chunk keeps that
 * chunk decoded, so reading a sample at a time (shuffled training) decodes each chunk once
 * while it is being read, not once per sample. */
int es_rows_read(es_rows_reader *reader, int64_t first, int64_t n, void *out, es_error *err);
/* Opens the 1-D dataset `name` as es_rows_open_column does, reads rows [first, first + n) and closes it. */
int es_rows_read_column(hid_t parent, const char *name, es_h5_elem elem, int64_t first, int64_t n, void *out, es_error *err);
/* The same into fp32, from any float type (bf16 widened exactly, float16 exactly, float64
 * rounded by HDF5); integer datasets are ES_ERR_DATA. */
int es_rows_read_f32(es_rows_reader *reader, int64_t first, int64_t n, float *out, es_error *err);
/* Whether reads of this dataset deliver floats (bf16, float32 or float64). */
int es_rows_is_float(const es_rows_reader *reader);
void es_rows_close_reader(es_rows_reader *reader);

#endif
