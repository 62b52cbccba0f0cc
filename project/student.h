/* student.h5 (docs/student-h5.md): the writer essence-project fills block by block.
 *
 * Everything goes to NAME.partial; commit() makes the samples added so far durable (a commit
 * point, common/h5commit.h); finish() writes the root attributes and renames it. A stopped run
 * leaves NAME.partial for --resume. */
#ifndef ES_PROJECT_STUDENT_H
#define ES_PROJECT_STUDENT_H

#include <stdint.h>

#include "error.h"
#include "h5file.h"
#include "h5rows.h"
#include "h5samples.h"
#include "threadpool.h"

typedef struct student_writer {
    es_h5file file;
    es_samples_writer samples;  /* the samples (as the teacher's) and the student's tokens */
    es_rows_writer teacher_row; /* /tokens/teacher_row */
    es_rows_writer *targets;    /* [n_targets] /targets/layer_LLL */
    int n_targets;
    int64_t committed;          /* samples the last commit covers */
} student_writer;

/* Creates PATH.partial with /targets/layer_LLL for each student layer (width D). */
int student_create(student_writer *writer, const char *path, const int *student_layers, int n_targets, int width,
                   es_pool *pool, es_error *err);
/* One sample: as es_samples_add, plus each student token's aligned teacher row (or -1). */
int student_add_sample(student_writer *writer, const char *id, const char *text, size_t text_len, int truncated,
                       int add_special_tokens, const int32_t *ids, const int32_t (*spans)[2], const int64_t *teacher_row,
                       int n_tokens, es_error *err);
/* Rows (n, D) of target i, appended in token order. */
int student_add_targets(student_writer *writer, int i, const float *rows, int64_t n, es_error *err);
/* /projection/omega (m, d) and, per teacher layer, /projection/layer_LLL/input_mean, input_scale (d). */
int student_write_projection(student_writer *writer, const float *omega, int m, int d, const int *teacher_layers,
                             const float *const *mean, const float *const *scale, int n_layers, es_error *err);
/* Flushes everything, writes the root attributes and renames to the final name. */
typedef struct student_attribute {
    const char *name;
    char kind;            /* 's' string, 'f' float64, 'i' int64 */
    const char *text;
    double number;
    int64_t integer;
} student_attribute;
int student_finish(student_writer *writer, const student_attribute *attributes, int n_attributes, es_error *err);
/* Closes without finishing: the .partial stays for --resume unless `remove`. */
void student_abandon(student_writer *writer, int remove);
/* Stores what a --resume must share with this run (common/resume.h), on disk before any commit. */
int student_set_resume_key(student_writer *writer, const char *key, es_error *err);
/* A commit point: every sample added so far (whole blocks) durable, with the marks
 * committed_samples and committed_tokens. */
int student_commit(student_writer *writer, es_error *err);
/* Reopens PATH.partial (its resume key already checked) at its last commit; *samples_done
 * receives the samples it holds. */
int student_resume(student_writer *writer, const char *path, const int *student_layers, int n_targets, int width, es_pool *pool,
                   int64_t *samples_done, es_error *err);

#endif
