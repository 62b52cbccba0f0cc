/* JSONL reader (see jsonl.h and docs/config.md). */
#include "jsonl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int open_stream(es_jsonl *r, FILE *f, const char *name, int owns, es_error *err) {
    memset(r, 0, sizeof *r);
    r->path = strdup(name);
    if (!r->path) {
        if (owns && f) fclose(f);
        return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", name);
    }
    r->file = f;
    r->owns_file = owns;
    return ES_OK;
}

int es_jsonl_open(es_jsonl *reader, const char *path, es_error *err) {
    if (!strcmp(path, "-")) return open_stream(reader, stdin, "<stdin>", 0, err);
    FILE *f = fopen(path, "rb");
    if (!f) {
        memset(reader, 0, sizeof *reader);
        return es_fail(err, ES_ERR_USAGE, "%s: cannot open: %s", path, strerror(errno));
    }
    return open_stream(reader, f, path, 1, err);
}

int es_jsonl_open_memory(es_jsonl *reader, const void *data, size_t len, const char *name,
                         es_error *err) {
    if (!name) name = "<memory>";
    /* fmemopen refuses a size of 0: an empty input is a reader without a stream. */
    if (len == 0) return open_stream(reader, NULL, name, 0, err);
    FILE *f = fmemopen((void *)data, len, "r");
    if (!f) {
        memset(reader, 0, sizeof *reader);
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot open the buffer: %s", name, strerror(errno));
    }
    return open_stream(reader, f, name, 1, err);
}

/* jansson's message, with control bytes (which it may quote from the input) made visible. */
static void clean_text(char *s) {
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f) *s = '?';
}

int es_jsonl_next(es_jsonl *r, json_t **out, es_error *err) {
    *out = NULL;
    if (!r->file) return 0;
    for (;;) {
        errno = 0;
        ssize_t got = getline(&r->buf, &r->cap, r->file);
        if (got < 0) {
            if (ferror(r->file))
                return es_fail(err, ES_ERR_RUNTIME, "%s:%ld: read error: %s", r->path, r->line + 1,
                               strerror(errno ? errno : EIO)), -1;
            if (errno == ENOMEM)
                return es_fail(err, ES_ERR_RUNTIME, "%s:%ld: out of memory", r->path, r->line + 1), -1;
            return 0;
        }
        r->line++;
        size_t n = (size_t)got;
        if (n && r->buf[n - 1] == '\n') {
            n--;
            if (n && r->buf[n - 1] == '\r') n--;
        }
        const char *text = r->buf;
        if (r->line == 1 && n >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) { /* a UTF-8 byte-order mark */
            text += 3;
            n -= 3;
        }
        size_t i = 0;
        while (i < n && (text[i] == ' ' || text[i] == '\t' || text[i] == '\r')) i++;
        if (i == n) continue; /* a blank line */

        json_error_t jerr;
        json_t *v = json_loadb(text, n, JSON_DECODE_ANY | JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, &jerr);
        if (!v) {
            clean_text(jerr.text);
            if (json_error_code(&jerr) == json_error_invalid_utf8)
                return es_fail(err, ES_ERR_DATA, "%s:%ld: invalid UTF-8 (column %d)", r->path, r->line,
                               jerr.column), -1;
            return es_fail(err, ES_ERR_DATA, "%s:%ld: invalid JSON: %s (column %d)", r->path, r->line,
                           jerr.text, jerr.column), -1;
        }
        if (!json_is_object(v)) {
            json_decref(v);
            return es_fail(err, ES_ERR_DATA, "%s:%ld: expected a JSON object", r->path, r->line), -1;
        }
        *out = v;
        return 1;
    }
}

void es_jsonl_close(es_jsonl *reader) {
    if (!reader) return;
    if (reader->file && reader->owns_file) fclose(reader->file);
    free(reader->buf);
    free(reader->path);
    memset(reader, 0, sizeof *reader);
}
