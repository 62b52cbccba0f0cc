/* teacher.h5 (docs/teacher-h5.md): the writer essence-extract fills sample by sample.
 *
 * Everything goes to NAME.partial. commit() makes every sample added so far durable: a commit
 * point (common/h5commit.h) whose record holds the unfinished chunks' rows and the running
 * statistics, with the root attributes committed_samples and committed_tokens as its marks. A
 * resumed run reopens the .partial, cuts every dataset back to the last commit and goes on;
 * finish() writes the last chunks and /stats, and renames the file to its final name. */
#ifndef ES_EXTRACT_TEACHER_H
#define ES_EXTRACT_TEACHER_H

#include <stdint.h>

#include "error.h"
#include "h5file.h"
#include "h5rows.h"
#include "h5samples.h"
#include "threadpool.h"

typedef struct teacher_stats {
    int64_t count;
    double *mean; /* (d) Welford running mean */
    double *m2;   /* (d) sum of squared deviations */
} teacher_stats;

typedef struct teacher_writer {
    es_h5file file;
    int n_layers;
    int *layers;            /* the layer indices stored, ascending (0 = embedding output) */
    int width;              /* hidden size */
    es_samples_writer samples; /* the sample and token datasets */
    es_rows_writer *latents; /* [n_layers] */
    teacher_stats *stats;    /* [n_layers] */
    int64_t committed;       /* samples the last commit covers */
} teacher_writer;

typedef struct teacher_options {
    const int *layers;
    int n_layers;
    int width;
    int64_t chunk_rows;     /* latent rows per chunk; 0: about 1 MiB */
    int zstd_level;
    es_pool *pool;
    const char *resume_key; /* stored at creation (common/resume.h) */
} teacher_options;

int teacher_create(teacher_writer *writer, const char *path, const teacher_options *options, es_error *err);
/* Reopens PATH.partial written with the same options (the caller has checked its resume key:
 * es_h5_check_partial); *samples_done receives the number of committed samples to skip. */
int teacher_resume(teacher_writer *writer, const char *path, const teacher_options *options, int64_t *samples_done,
                   es_error *err);
/* One sample: its rendered text, tokens and, per stored layer, its rows (n_tokens, width). */
int teacher_add(teacher_writer *writer, const char *id, const char *text, size_t text_len, int truncated,
                int add_special_tokens, const int32_t *ids, const int32_t (*spans)[2], int n_tokens,
                const float *const *layer_rows, es_error *err);
int teacher_commit(teacher_writer *writer, es_error *err);
/* Writes the root attributes (name = value pairs, strings) and renames to the final name. */
int teacher_finish(teacher_writer *writer, const char *const *attributes, int n_attributes, es_error *err);
/* Closes without finishing: the .partial stays for --resume unless `remove`. */
void teacher_abandon(teacher_writer *writer, int remove);

#endif
