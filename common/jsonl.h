/* JSONL input: one JSON value per line, UTF-8. Every error names FILE:LINE.
 * Lines holding only white space are skipped (and still counted). A line may be up to
 * ES_JSONL_MAX_LINE bytes (a longer one is a data error: it bounds the memory a reader takes
 * from a stream with no newline, such as /dev/zero); strings may hold "\u0000" (use
 * json_string_length, not strlen). */
#ifndef ES_JSONL_H
#define ES_JSONL_H

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>

#include "error.h"

#define ES_JSONL_MAX_LINE ((size_t)64 << 20) /* 64 MiB, docs/config.md */

typedef struct es_jsonl {
    FILE *file;
    char *path;      /* for messages; "<stdin>" for standard input */
    long line;       /* 1-based number of the line last returned */
    char *buf;       /* the line being read */
    size_t cap;
    size_t max_line; /* bytes in a line, newline excluded (ES_JSONL_MAX_LINE; tests lower it) */
    int owns_file;
    int failed;      /* a line too long or a read error: every later call repeats the error */
} es_jsonl;

/* Opens PATH ("-" = standard input). ES_ERR_USAGE when the file cannot be opened or is a
 * folder. A FIFO or a character device is opened once and read as a stream. */
int es_jsonl_open(es_jsonl *reader, const char *path, es_error *err);
/* Reads from a memory buffer (tests, fuzzing); `name` is used in messages. */
int es_jsonl_open_memory(es_jsonl *reader, const void *data, size_t len, const char *name,
                         es_error *err);
/* Reads from an open stream (tests: a stream whose reads fail); with `owns`, close closes it. */
int es_jsonl_open_stream(es_jsonl *reader, FILE *file, const char *name, int owns, es_error *err);

/* Next value: 1 and *out (a new reference; caller json_decref's it), 0 at end of file, or
 * -1 with err set: ES_ERR_DATA for a malformed line ("FILE:LINE: invalid JSON: ... (column C)"),
 * invalid UTF-8, a line whose value is not an object ("FILE:LINE: expected a JSON object") or a
 * line longer than max_line; ES_ERR_RUNTIME for a read error or memory running out. */
int es_jsonl_next(es_jsonl *reader, json_t **out, es_error *err);

/* Counts the values still to come (non-blank lines) without parsing them, and leaves the reader
 * where it was, so that a caller can count and then read in what is one pass over the input: a
 * stream that cannot seek back (a pipe, a FIFO, standard input, a character device) is copied
 * into an unlinked temporary file as it is counted, and read from there. Errors as for
 * es_jsonl_next (line too long, read error), and ES_ERR_RUNTIME when the copy cannot be written. */
int es_jsonl_count(es_jsonl *reader, int64_t *count, es_error *err);

/* After es_jsonl_count: the SHA-256 of the whole input (of a stream, its copy), read through a
 * descriptor of its own so the reader's position is kept. ES_ERR_RUNTIME naming the file. */
int es_jsonl_sha256(const es_jsonl *reader, char out[65], es_error *err);

void es_jsonl_close(es_jsonl *reader);

#endif
