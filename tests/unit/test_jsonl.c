/* JSONL reader: blank lines and CRLF, line numbers in every error, non-objects, invalid
 * UTF-8, "\u0000" and raw NUL bytes, very long lines, files and empty input. */
#include "jsonl.h"
#include "../testlib.h"

#include <errno.h>
#include <unistd.h>

#ifdef SHOW_MESSAGES
#define SHOW(err) printf("  message: %s\n", (err).msg)
#else
#define SHOW(err) ((void)0)
#endif

static int contains(const char *msg, const char *sub) { return strstr(msg, sub) != NULL; }

/* Reads a memory buffer to the end: the number of objects, or -code at the first error. */
static int read_all(const void *data, size_t len, es_error *err, long *last_line) {
    es_jsonl r;
    es_error_clear(err);
    if (es_jsonl_open_memory(&r, data, len, "data.jsonl", err)) return -err->code;
    int n = 0, rc;
    json_t *v;
    while ((rc = es_jsonl_next(&r, &v, err)) == 1) {
        n++;
        json_decref(v);
    }
    if (last_line) *last_line = r.line;
    es_jsonl_close(&r);
    return rc ? -err->code : n;
}

TEST(good_lines_blank_and_crlf) {
    const char *text = "{\"text\": \"a\"}\n"
                       "\n"
                       "   \t \n"
                       "{\"text\": \"b\"}\r\n"
                       "\r\n"
                       "{\"text\": \"c\", \"n\": 1}"; /* no final newline */
    es_jsonl r;
    es_error err = {0};
    REQUIRE(es_jsonl_open_memory(&r, text, strlen(text), "data.jsonl", &err) == ES_OK);
    json_t *v;
    const char *want[] = {"a", "b", "c"};
    long lines[] = {1, 4, 6};
    for (int i = 0; i < 3; i++) {
        REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
        CHECK(json_is_object(v));
        CHECKF(!strcmp(json_string_value(json_object_get(v, "text")), want[i]), "%d", i);
        CHECKF(r.line == lines[i], "object %d on line %ld", i, r.line);
        json_decref(v);
    }
    CHECK(es_jsonl_next(&r, &v, &err) == 0 && v == NULL);
    CHECK(es_jsonl_next(&r, &v, &err) == 0); /* stays at the end */
    CHECK(err.code == ES_OK);
    es_jsonl_close(&r);
    es_jsonl_close(&r); /* closing twice is harmless */
}

TEST(malformed_line_number) {
    const char *text = "{\"a\": 1}\n\n{\"a\": 2}\n{\"a\": 3,}\n{\"a\": 4}\n";
    es_jsonl r;
    es_error err = {0};
    REQUIRE(es_jsonl_open_memory(&r, text, strlen(text), "data.jsonl", &err) == ES_OK);
    json_t *v;
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
    json_decref(v);
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
    json_decref(v);
    CHECK(es_jsonl_next(&r, &v, &err) == -1 && err.code == ES_ERR_DATA && v == NULL);
    CHECKF(contains(err.msg, "data.jsonl:4: invalid JSON: ") && contains(err.msg, "(column "), "%s", err.msg);
    SHOW(err);
    /* The caller may go on after a bad line. */
    es_error_clear(&err);
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
    CHECK(json_integer_value(json_object_get(v, "a")) == 4 && r.line == 5);
    json_decref(v);
    es_jsonl_close(&r);

    const char *bad[] = {"{\"a\": 1} {}", "{\"a\"", "{'a': 1}", "{\"a\": 1, \"a\": 2}", "{\"a\": tru}",
                         "\x01{}"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        long line;
        char buf[64];
        snprintf(buf, sizeof buf, "{}\n%s\n", bad[i]);
        CHECKF(read_all(buf, strlen(buf), &err, &line) == -ES_ERR_DATA, "case %zu", i);
        CHECKF(contains(err.msg, "data.jsonl:2: invalid JSON: "), "case %zu: %s", i, err.msg);
        CHECK(line == 2);
        SHOW(err);
    }
}

TEST(not_an_object) {
    const char *values[] = {"[1, 2]", "\"text\"", "42", "null", "true"};
    for (size_t i = 0; i < 5; i++) {
        es_error err;
        char buf[64];
        snprintf(buf, sizeof buf, "{\"ok\": 1}\n%s\n", values[i]);
        CHECKF(read_all(buf, strlen(buf), &err, NULL) == -ES_ERR_DATA, "%s", values[i]);
        CHECKF(contains(err.msg, "data.jsonl:2: expected a JSON object"), "%s", err.msg);
        SHOW(err);
    }
}

TEST(invalid_utf8) {
    const char *bad[] = {"{\"text\": \"a\xff\"}", "{\"text\": \"\xc3\"}", "{\"text\": \"\xed\xa0\x80\"}",
                         "{\"t\xc0\xaf\": 1}"};
    for (size_t i = 0; i < 4; i++) {
        es_error err;
        char buf[64];
        snprintf(buf, sizeof buf, "\n\n%s\n", bad[i]);
        CHECKF(read_all(buf, strlen(buf), &err, NULL) == -ES_ERR_DATA, "case %zu", i);
        CHECKF(contains(err.msg, "data.jsonl:3: invalid UTF-8"), "%s", err.msg);
        SHOW(err);
    }
    /* A byte-order mark at the start is skipped; valid UTF-8 is kept as it is. */
    const char *ok = "\xef\xbb\xbf{\"text\": \"Gr\xc3\xbc\xc3\x9f" "e \xf0\x9f\x98\x80\"}\n";
    es_jsonl r;
    es_error err = {0};
    REQUIRE(es_jsonl_open_memory(&r, ok, strlen(ok), "data.jsonl", &err) == ES_OK);
    json_t *v;
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
    CHECK(!strcmp(json_string_value(json_object_get(v, "text")), "Gr\xc3\xbc\xc3\x9f" "e \xf0\x9f\x98\x80"));
    json_decref(v);
    es_jsonl_close(&r);
}

TEST(nul_escape_and_raw_nul) {
    const char *text = "{\"text\": \"a\\u0000b\"}\n";
    es_jsonl r;
    es_error err = {0};
    REQUIRE(es_jsonl_open_memory(&r, text, strlen(text), "data.jsonl", &err) == ES_OK);
    json_t *v;
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
    json_t *s = json_object_get(v, "text");
    CHECK(json_string_length(s) == 3 && !memcmp(json_string_value(s), "a\0b", 3));
    json_decref(v);
    es_jsonl_close(&r);

    /* A raw NUL byte inside and outside a string: an error on the right line, no truncation. */
    const char raw1[] = "{}\n{\"text\": \"a\0b\"}\n{}\n";
    const char raw2[] = "{}\n{}\0\n{}\n";
    const char raw3[] = "\0\n";
    const struct { const char *p; size_t n; } cases[] = {
        {raw1, sizeof raw1 - 1}, {raw2, sizeof raw2 - 1}, {raw3, sizeof raw3 - 1}};
    for (int i = 0; i < 3; i++) {
        long line;
        CHECKF(read_all(cases[i].p, cases[i].n, &err, &line) == -ES_ERR_DATA, "case %d", i);
        CHECKF(contains(err.msg, i < 2 ? "data.jsonl:2:" : "data.jsonl:1:"), "case %d: %s", i, err.msg);
        SHOW(err);
    }
}

TEST(megabyte_line) {
    size_t n = 1 << 20;
    char *text = malloc(n + 64);
    REQUIRE(text);
    size_t o = (size_t)sprintf(text, "{\"n\": 1}\n{\"text\": \"");
    size_t start = o;
    for (size_t i = 0; i < n; i++) text[o++] = (char)('a' + i % 26);
    o += (size_t)sprintf(text + o, "\"}\n{\"n\": 3}\n");
    es_jsonl r;
    es_error err = {0};
    REQUIRE(es_jsonl_open_memory(&r, text, o, "big.jsonl", &err) == ES_OK);
    json_t *v;
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
    json_decref(v);
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
    json_t *s = json_object_get(v, "text");
    CHECK(json_string_length(s) == n && !memcmp(json_string_value(s), text + start, n));
    CHECK(r.line == 2);
    json_decref(v);
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
    CHECK(r.line == 3);
    json_decref(v);
    CHECK(es_jsonl_next(&r, &v, &err) == 0);
    es_jsonl_close(&r);
    free(text);
}

TEST(empty_input) {
    es_error err = {0};
    CHECK(read_all("", 0, &err, NULL) == 0);
    CHECK(read_all(NULL, 0, &err, NULL) == 0);
    CHECK(read_all("\n\n  \n", 4, &err, NULL) == 0);
}

TEST(files) {
    char path[1024];
    snprintf(path, sizeof path, "%s/in.jsonl", test_tmpdir());
    FILE *f = fopen(path, "wb");
    REQUIRE(f);
    fputs("{\"a\": 1}\n\n[]\n", f);
    fclose(f);
    es_jsonl r;
    es_error err = {0};
    REQUIRE(es_jsonl_open(&r, path, &err) == ES_OK);
    json_t *v;
    CHECK(es_jsonl_next(&r, &v, &err) == 1);
    json_decref(v);
    CHECK(es_jsonl_next(&r, &v, &err) == -1 && err.code == ES_ERR_DATA);
    char want[1100];
    snprintf(want, sizeof want, "%s:3: expected a JSON object", path);
    CHECKF(contains(err.msg, want), "%s", err.msg);
    es_jsonl_close(&r);

    es_error_clear(&err);
    snprintf(path, sizeof path, "%s/missing.jsonl", test_tmpdir());
    CHECK(es_jsonl_open(&r, path, &err) == ES_ERR_USAGE);
    CHECK(contains(err.msg, path) && contains(err.msg, "No such file"));
    SHOW(err);
    es_jsonl_close(&r); /* a failed open leaves a closable reader */
}

/* A line longer than the limit is a data error naming its line, and the reader stays failed:
 * it never goes on from the middle of a line (getline grew without bound on /dev/zero). */
TEST(line_too_long) {
    const char *text = "{\"a\": 1}\n{\"text\": \"0123456789012345678901234567890123456789\"}\n{\"a\": 3}\n";
    es_jsonl r;
    es_error err = {0};
    REQUIRE(es_jsonl_open_memory(&r, text, strlen(text), "data.jsonl", &err) == ES_OK);
    r.max_line = 40;
    json_t *v;
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
    json_decref(v);
    CHECK(es_jsonl_next(&r, &v, &err) == -1 && err.code == ES_ERR_DATA && v == NULL);
    CHECKF(contains(err.msg, "data.jsonl:2: the line is longer than 40 bytes"), "%s", err.msg);
    es_error_clear(&err);
    CHECK(es_jsonl_next(&r, &v, &err) == -1 && v == NULL && contains(err.msg, "data.jsonl:2"));
    es_jsonl_close(&r);
    /* exactly at the limit is fine, with or without its newline */
    REQUIRE(es_jsonl_open_memory(&r, text, strlen(text), "data.jsonl", &err) == ES_OK);
    r.max_line = strlen("{\"text\": \"0123456789012345678901234567890123456789\"}");
    int64_t n = 0;
    CHECK(es_jsonl_count(&r, &n, &err) == ES_OK && n == 3);
    es_jsonl_close(&r);
    r.max_line = 0;
    REQUIRE(es_jsonl_open_memory(&r, text, strlen(text), "data.jsonl", &err) == ES_OK);
    r.max_line = 40;
    es_error_clear(&err);
    CHECKF(es_jsonl_count(&r, &n, &err) == ES_ERR_DATA && contains(err.msg, "data.jsonl:2: the line is longer"), "%s", err.msg);
    es_jsonl_close(&r);
}

/* A stream whose reads fail after `left` bytes, as a disk error midway would. */
typedef struct {
    const char *data;
    size_t at, len, left;
} failing;

static ssize_t failing_read(void *cookie, char *buf, size_t size) {
    failing *f = cookie;
    if (f->left == 0) {
        errno = EIO;
        return -1;
    }
    size_t n = size < f->left ? size : f->left;
    if (n > f->len - f->at) n = f->len - f->at;
    memcpy(buf, f->data + f->at, n);
    f->at += n, f->left -= n;
    return (ssize_t)n;
}

TEST(read_error_midway) {
    const char *text = "{\"a\": 1}\n{\"a\": 2}\n{\"a\": 3}\n";
    for (int counting = 0; counting < 2; counting++) {
        failing state = {text, 0, strlen(text), 12}; /* fails inside line 2 */
        FILE *f = fopencookie(&state, "r", (cookie_io_functions_t){.read = failing_read});
        REQUIRE(f);
        setvbuf(f, NULL, _IONBF, 0);
        es_jsonl r;
        es_error err = {0};
        REQUIRE(es_jsonl_open_stream(&r, f, "disk.jsonl", 1, &err) == ES_OK);
        json_t *v;
        if (counting) {
            int64_t n = 0;
            CHECK(es_jsonl_count(&r, &n, &err) == ES_ERR_RUNTIME);
        } else {
            REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
            json_decref(v);
            CHECK(es_jsonl_next(&r, &v, &err) == -1 && err.code == ES_ERR_RUNTIME);
        }
        /* never a short corpus: the error names the file, the line and the cause */
        CHECKF(contains(err.msg, "disk.jsonl:2: read error: Input/output error"), "%s", err.msg);
        es_jsonl_close(&r);
    }
}

/* A pipe is counted and then read: it is copied as it is counted, read once. */
TEST(count_then_read_a_pipe) {
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    const char *text = "{\"a\": 1}\n\n   \n{\"a\": 2}\r\n{\"a\": 3}";
    REQUIRE(write(fds[1], text, strlen(text)) == (ssize_t)strlen(text));
    close(fds[1]);
    FILE *f = fdopen(fds[0], "rb");
    REQUIRE(f);
    es_jsonl r;
    es_error err = {0};
    REQUIRE(es_jsonl_open_stream(&r, f, "<stdin>", 1, &err) == ES_OK);
    int64_t n = 0;
    CHECKF(es_jsonl_count(&r, &n, &err) == ES_OK && n == 3, "%lld %s", (long long)n, err.msg);
    json_t *v;
    long lines[] = {1, 4, 5};
    for (int i = 0; i < 3; i++) {
        REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
        CHECK(json_integer_value(json_object_get(v, "a")) == i + 1 && r.line == lines[i]);
        json_decref(v);
    }
    CHECK(es_jsonl_next(&r, &v, &err) == 0);
    es_jsonl_close(&r);
}

/* A file is counted from where the reader stands, and the reader is left there. */
TEST(count_a_file_in_place) {
    char path[1024];
    snprintf(path, sizeof path, "%s/count.jsonl", test_tmpdir());
    FILE *f = fopen(path, "wb");
    REQUIRE(f);
    fputs("\xEF\xBB\xBF\n{\"a\": 1}\n\n{\"a\": 2}\n", f); /* a BOM alone on line 1 is blank */
    fclose(f);
    es_jsonl r;
    es_error err = {0};
    REQUIRE(es_jsonl_open(&r, path, &err) == ES_OK);
    int64_t n = 0;
    CHECK(es_jsonl_count(&r, &n, &err) == ES_OK && n == 2);
    json_t *v;
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1);
    json_decref(v);
    CHECK(es_jsonl_count(&r, &n, &err) == ES_OK && n == 1);
    REQUIRE(es_jsonl_next(&r, &v, &err) == 1 && r.line == 4);
    json_decref(v);
    es_jsonl_close(&r);
    /* a folder is refused at open, not read as an empty input */
    CHECK(es_jsonl_open(&r, test_tmpdir(), &err) == ES_ERR_USAGE && contains(err.msg, "is a folder"));
    es_jsonl_close(&r);
}

int main(void) {
    RUN(good_lines_blank_and_crlf);
    RUN(line_too_long);
    RUN(read_error_midway);
    RUN(count_then_read_a_pipe);
    RUN(count_a_file_in_place);
    RUN(malformed_line_number);
    RUN(not_an_object);
    RUN(invalid_utf8);
    RUN(nul_escape_and_raw_nul);
    RUN(megabyte_line);
    RUN(empty_input);
    RUN(files);
    return test_summary();
}
