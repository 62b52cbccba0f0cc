/* The sample and token datasets that teacher.h5 and student.h5 share (docs/formats.md):
 *   /samples/id, text_bytes, text_start, token_start, truncated, add_special_tokens
 *   /tokens/id, byte_start, byte_end
 * Samples are appended one by one; flush() makes every appended sample part of the file
 * (the ids are buffered until then). All HDF5 calls happen on the calling thread. */
#ifndef ES_H5SAMPLES_H
#define ES_H5SAMPLES_H

#include <hdf5.h>
#include <stdint.h>

#include "error.h"
#include "h5rows.h"

enum { ES_SAMPLE_DATASETS = 8 }; /* the row datasets besides /samples/id */

typedef struct es_samples_writer {
    es_rows_writer rows[ES_SAMPLE_DATASETS];
    hid_t ids;                /* /samples/id, vlen UTF-8 */
    char **pending_ids;       /* appended since the last flush */
    int n_pending, cap_pending;
    int64_t samples, tokens, text_total;
} es_samples_writer;

int es_samples_create(es_samples_writer *writer, hid_t file, int zstd_level, es_error *err);
/* One sample: its id, text, flags and tokens (ids and byte spans [start, end)). */
int es_samples_add(es_samples_writer *writer, const char *id, const char *text, size_t text_len, int truncated,
                   int add_special_tokens, const int32_t *ids, const int32_t (*spans)[2], int n_tokens, es_error *err);
int es_samples_flush(es_samples_writer *writer, es_error *err);
/* For a commit point: writes the ids appended, and commits every row dataset into the record
 * (es_rows_commit). */
int es_samples_commit(es_samples_writer *writer, es_commit_record *record, es_error *err);
/* Reopens the datasets of a .partial file at the samples the record covers. */
int es_samples_resume(es_samples_writer *writer, hid_t file, const es_commit_record *record, es_error *err);
/* Flushes and closes every dataset; err NULL: abandons them, writing nothing more (es_rows_discard). */
int es_samples_close(es_samples_writer *writer, es_error *err);

#endif
