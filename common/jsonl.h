/* JSONL input: one JSON value per line, UTF-8. Every error names FILE:LINE.
 * Lines holding only white space are skipped (and still counted). A line may be any
 * length; strings may hold "\u0000" (use json_string_length, not strlen). */
#ifndef ES_JSONL_H
#define ES_JSONL_H

#include <jansson.h>
#include <stdio.h>

#include "error.h"

typedef struct es_jsonl {
    FILE *file;
    char *path;      /* for messages; "<stdin>" for standard input */
    long line;       /* 1-based number of the line last returned */
    char *buf;       /* getline buffer */
    size_t cap;
    int owns_file;
} es_jsonl;

/* Opens PATH ("-" = standard input). ES_ERR_USAGE when the file cannot be opened. */
int es_jsonl_open(es_jsonl *reader, const char *path, es_error *err);
/* Reads from a memory buffer (tests, fuzzing); `name` is used in messages. */
int es_jsonl_open_memory(es_jsonl *reader, const void *data, size_t len, const char *name,
                         es_error *err);

/* Next value: 1 and *out (a new reference; caller json_decref's it), 0 at end of file, or
 * -1 with err set: ES_ERR_DATA for a malformed line ("FILE:LINE: invalid JSON: ... (column C)"),
 * invalid UTF-8, or a line whose value is not an object ("FILE:LINE: expected a JSON object");
 * ES_ERR_RUNTIME for a read error. */
int es_jsonl_next(es_jsonl *reader, json_t **out, es_error *err);

void es_jsonl_close(es_jsonl *reader);

#endif
