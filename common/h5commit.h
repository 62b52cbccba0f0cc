/* Commit points of an HDF5 file being written, and the checks before resuming it
 * (docs/formats.md, "Writing safely").
 *
 * Why a record: HDF5 frees a chunk's old space when the chunk is rewritten with another size and
 * may give it to the next chunk at once, while the file on disk still points at it. So a chunk
 * that a commit relies on is never rewritten: row datasets write only whole chunks while a file
 * is being written (common/h5rows.h), and the rows of each one's unfinished last chunk, with
 * anything else the writer needs to go on (running statistics), go into a commit record: a new
 * small dataset per commit, written once, zstd-compressed with a checksum.
 *
 * A commit point is, in this order: every chunk and the record written, the file flushed
 * (H5Fflush) and fsync'd; then the mark (the root attribute `commit` = the record's number, and
 * the caller's marks such as committed_samples) written, flushed and fsync'd; then the records
 * before it deleted. A run killed at any moment leaves a mark naming a complete, durable record
 * whose rows are all in chunks that nothing overwrites; whatever was written after the mark is
 * cut off on resume and written again. */
#ifndef ES_H5COMMIT_H
#define ES_H5COMMIT_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "h5file.h"

typedef struct es_commit_part {
    char *name;      /* e.g. "/latents/layer_020" (a row dataset's tail) or "stats/layer_020" */
    uint8_t *data;
    size_t size;
} es_commit_part;

typedef struct es_commit_record {
    es_commit_part *parts;
    int n, cap;
} es_commit_record;

/* Adds a copy of data under name. */
int es_commit_record_add(es_commit_record *record, const char *name, const void *data, size_t size, es_error *err);
const es_commit_part *es_commit_record_find(const es_commit_record *record, const char *name);
void es_commit_record_free(es_commit_record *record);

typedef struct es_commit_mark {
    const char *name;
    int64_t value;
} es_commit_mark;

/* Flushes the file (H5Fflush) and fsyncs it: what was written so far is on disk. */
int es_h5_sync(es_h5file *file, es_error *err);
/* The commit point described above. */
int es_h5_commit_point(es_h5file *file, const es_commit_record *record, const es_commit_mark *marks, int n_marks,
                       es_error *err);
/* The record the mark names. *found = 0 (and ES_OK) when the file has no mark: nothing was
 * committed. A missing or damaged record is ES_ERR_DATA naming the file. */
int es_h5_read_commit(es_h5file *file, es_commit_record *record, int *found, es_error *err);
/* Before a file is finished: removes the mark, the caller's marks (NULL-terminated names) and
 * the records. */
int es_h5_drop_commits(es_h5file *file, const char *const *mark_names, es_error *err);

/* What --resume finds at PATH.partial, looked at without changing it (but for the superblock's
 * end-of-allocation when a kill left it short: es_h5_open_partial). */
typedef enum { ES_PARTIAL_ABSENT, ES_PARTIAL_UNCOMMITTED, ES_PARTIAL_COMMITTED, ES_PARTIAL_FINISHED } es_partial_state;
/* ES_ERR_DATA (naming the file) when it exists but HDF5 cannot open it; ES_ERR_USAGE (from
 * es_resume_key_compare) when it holds a commit and its root attribute resume_key differs from
 * `key`. The key of an uncommitted file is not checked: nothing of it is kept. FINISHED: the run
 * was stopped while finishing, after everything was on disk (the root attribute `created`, written
 * only then, is there): es_h5_finish_partial completes it. */
int es_h5_check_partial(const char *path, const char *key, es_partial_state *state, es_error *err);
/* Completes a FINISHED PATH.partial: removes what is left of its commits (the marks named, NULL-
 * terminated, and the records), then closes, fsyncs and renames it as es_h5_commit does. */
int es_h5_finish_partial(const char *path, const char *const *mark_names, es_error *err);
/* What a stage's --resume does with PATH.partial, said in the log: one HDF5 cannot open (cut short
 * before its first commit) is started again (*state ABSENT); another run's is an error, the file
 * kept; a FINISHED one is completed (samples and tokens marks) and *state says so: the stage has
 * nothing left to do. */
int es_h5_resume_partial(const char *path, const char *key, es_partial_state *state, es_error *err);

#endif
