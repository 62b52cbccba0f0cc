/* JSONL reader (see jsonl.h and docs/config.md). */
#include "jsonl.h"
#include "fingerprint.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int es_jsonl_open_stream(es_jsonl *r, FILE *f, const char *name, int owns, es_error *err) {
    memset(r, 0, sizeof *r);
    r->max_line = ES_JSONL_MAX_LINE;
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
    if (!strcmp(path, "-")) return es_jsonl_open_stream(reader, stdin, "<stdin>", 0, err);
    FILE *f = fopen(path, "rb");
    if (!f) {
        memset(reader, 0, sizeof *reader);
        return es_fail(err, ES_ERR_USAGE, "%s: cannot open: %s", path, strerror(errno));
    }
    /* fopen gives a folder a stream whose every read fails: say what it is instead. */
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
        fclose(f);
        memset(reader, 0, sizeof *reader);
        return es_fail(err, ES_ERR_USAGE, "%s: is a folder, not a JSONL file", path);
    }
    return es_jsonl_open_stream(reader, f, path, 1, err);
}

int es_jsonl_open_memory(es_jsonl *reader, const void *data, size_t len, const char *name,
                         es_error *err) {
    if (!name) name = "<memory>";
    /* fmemopen refuses a size of 0: an empty input is a reader without a stream. */
    if (len == 0) return es_jsonl_open_stream(reader, NULL, name, 0, err);
    FILE *f = fmemopen((void *)data, len, "r");
    if (!f) {
        memset(reader, 0, sizeof *reader);
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot open the buffer: %s", name, strerror(errno));
    }
    return es_jsonl_open_stream(reader, f, name, 1, err);
}

/* jansson's message, with control bytes (which it may quote from the input) made visible. */
static void clean_text(char *s) {
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f) *s = '?';
}

/* Reads the line numbered `number` into r->buf: 1 and *len (the newline included when there
 * is one), 0 at the end of the input, or -1 with err set and the reader failed. getline would
 * grow its buffer without bound on a stream with no newline; this stops at max_line. */
static int read_line(es_jsonl *r, long number, size_t *len, es_error *err) {
    size_t n = 0;
    int c = EOF;
    errno = 0;
    while ((c = getc_unlocked(r->file)) != EOF) {
        if (n + 2 > r->cap) {
            size_t cap = r->cap ? 2 * r->cap : 4096;
            char *buf = realloc(r->buf, cap);
            if (!buf) {
                r->failed = 1;
                return es_fail(err, ES_ERR_RUNTIME, "%s:%ld: out of memory while reading the line", r->path, number), -1;
            }
            r->buf = buf, r->cap = cap;
        }
        r->buf[n++] = (char)c;
        if (c == '\n') break;
        if (n > r->max_line) {
            r->failed = 1;
            return es_fail(err, ES_ERR_DATA, "%s:%ld: the line is longer than %zu bytes (the limit of a JSONL line)", r->path,
                           number, r->max_line), -1;
        }
    }
    if (c == EOF && ferror(r->file)) {
        r->failed = 1;
        return es_fail(err, ES_ERR_RUNTIME, "%s:%ld: read error: %s", r->path, number, strerror(errno ? errno : EIO)), -1;
    }
    if (n == 0) return 0;
    r->buf[n] = '\0';
    *len = n;
    return 1;
}

/* The content of the line in r->buf (n bytes read as line `number`): the newline, a CR before
 * it and a byte-order mark at the start of the file left out. Returns 0 for a blank line. */
static int line_content(const es_jsonl *r, long number, size_t n, const char **text, size_t *len) {
    if (n && r->buf[n - 1] == '\n') {
        n--;
        if (n && r->buf[n - 1] == '\r') n--;
    }
    const char *t = r->buf;
    if (number == 1 && n >= 3 && !memcmp(t, "\xEF\xBB\xBF", 3)) t += 3, n -= 3; /* a UTF-8 byte-order mark */
    size_t i = 0;
    while (i < n && (t[i] == ' ' || t[i] == '\t' || t[i] == '\r')) i++;
    *text = t, *len = n;
    return i < n;
}

/* A reader that failed repeats its error: it never resumes in the middle of a line. */
static int repeat_failure(const es_jsonl *r, es_error *err) {
    return es_fail(err, ES_ERR_DATA, "%s:%ld: the input stopped at an earlier error", r->path, r->line + 1), -1;
}

int es_jsonl_next(es_jsonl *r, json_t **out, es_error *err) {
    *out = NULL;
    if (!r->file) return 0;
    if (r->failed) return repeat_failure(r, err);
    for (;;) {
        size_t got;
        int rc = read_line(r, r->line + 1, &got, err);
        if (rc <= 0) return rc;
        r->line++;
        const char *text;
        size_t n;
        if (!line_content(r, r->line, got, &text, &n)) continue; /* a blank line */

        json_error_t jerr;
        json_t *v = json_loadb(text, n, JSON_DECODE_ANY | JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, &jerr);
        if (!v) {
            clean_text(jerr.text);
            if (json_error_code(&jerr) == json_error_out_of_memory)
                return es_fail(err, ES_ERR_RUNTIME, "%s:%ld: out of memory while parsing the line", r->path, r->line), -1;
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

/* An unlinked temporary file in $TMPDIR (or /tmp) for a stream that cannot seek back. */
static FILE *spool_file(const es_jsonl *r, es_error *err) {
    const char *dir = getenv("TMPDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/essence-input-XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot make a temporary copy of the stream in %s: %s", r->path,
                               dir && *dir ? dir : "/tmp", strerror(errno)), NULL;
    unlink(path);
    FILE *f = fdopen(fd, "w+b");
    if (!f) {
        close(fd);
        es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", r->path);
    }
    return f;
}

int es_jsonl_count(es_jsonl *r, int64_t *count, es_error *err) {
    *count = 0;
    if (!r->file) return ES_OK;
    if (r->failed) return repeat_failure(r, err), err->code;
    struct stat st;
    int fd = fileno(r->file);
    off_t start = ftello(r->file);
    int seekable = start >= 0 && (fd < 0 || (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)));
    FILE *copy = seekable ? NULL : spool_file(r, err);
    if (!seekable && !copy) return err->code;
    int rc = ES_OK;
    for (long number = r->line + 1;; number++) {
        size_t got;
        int more = read_line(r, number, &got, err);
        if (more < 0) rc = err->code;
        if (more <= 0) break;
        const char *text;
        size_t n;
        *count += line_content(r, number, got, &text, &n);
        if (copy && fwrite(r->buf, 1, got, copy) != got) {
            rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot write the temporary copy of the stream: %s", r->path, strerror(errno));
            break;
        }
    }
    if (!rc && copy && (fflush(copy) != 0 || fseeko(copy, 0, SEEK_SET) != 0))
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot write the temporary copy of the stream: %s", r->path, strerror(errno));
    if (copy) {
        if (rc) {
            fclose(copy);
            return rc;
        }
        if (r->owns_file) fclose(r->file);
        r->file = copy, r->owns_file = 1;
    } else if (!rc && fseeko(r->file, start, SEEK_SET) != 0) {
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot seek back after counting: %s", r->path, strerror(errno));
    }
    if (rc) r->failed = 1;
    return rc;
}

int es_jsonl_sha256(const es_jsonl *reader, char out[65], es_error *err) {
    out[0] = '\0';
    if (!reader->file || fileno(reader->file) < 0)
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot fingerprint an input held in memory", reader->path);
    /* /proc/self/fd/N opens the same file anew (an unlinked copy too), at offset 0 */
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fileno(reader->file));
    if (es_sha256_file(self, out, err)) {
        es_error_clear(err);
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot read it again to fingerprint it", reader->path);
    }
    return ES_OK;
}

void es_jsonl_close(es_jsonl *reader) {
    if (!reader) return;
    if (reader->file && reader->owns_file) fclose(reader->file);
    free(reader->buf);
    free(reader->path);
    memset(reader, 0, sizeof *reader);
}
