/* Small pieces of common/: errors, progress lines, the thread pool, dtype conversions. */
#include <math.h>
#include <stdatomic.h>
#include <unistd.h>

#include "../testlib.h"
#include "dtype.h"
#include "error.h"
#include "log.h"
#include "progress.h"
#include "threadpool.h"
#include "utf8.h"

TEST(error_first_wins_and_prefix) {
    es_error err = {0};
    CHECK(es_fail(&err, ES_ERR_DATA, "line %d: bad", 17) == ES_ERR_DATA);
    CHECK(es_fail(&err, ES_ERR_RUNTIME, "later") == ES_ERR_RUNTIME); /* returned, not stored */
    CHECK(err.code == ES_ERR_DATA && strcmp(err.msg, "line 17: bad") == 0);
    es_error_prefix(&err, "%s", "data.jsonl");
    CHECKF(strcmp(err.msg, "data.jsonl: line 17: bad") == 0, "%s", err.msg);
    CHECK(es_fail(NULL, ES_ERR_USAGE, "no error object") == ES_ERR_USAGE);
    /* A prefix on a message that fills the buffer keeps the prefix and cuts the tail. */
    es_error_clear(&err);
    char long_text[2000];
    memset(long_text, 'x', sizeof long_text - 1);
    long_text[sizeof long_text - 1] = '\0';
    es_fail(&err, ES_ERR_DATA, "%s", long_text);
    es_error_prefix(&err, "file.h5");
    CHECK(strncmp(err.msg, "file.h5: xxx", 12) == 0 && strlen(err.msg) == sizeof err.msg - 1);
}

TEST(progress_lines) {
    es_progress progress;
    es_progress_start(&progress, "extract", "tokens", 1000);
    progress.started = 100.0;
    progress.done = 250;
    char line[256];
    es_progress_format(&progress, 110.0, line, sizeof line); /* 25 tokens/s, 750 to go: 30 s */
    CHECKF(strstr(line, "250/1000 tokens (25.0%)") && strstr(line, "25 tokens/s") && strstr(line, "ETA 0:30"),
           "%s", line);
    es_progress_add_tokens(&progress, 5000);
    es_progress_format(&progress, 110.0, line, sizeof line);
    CHECKF(strstr(line, "500 tokens/s"), "%s", line);
    progress.tokens = 0;
    progress.total = 0; /* unknown total: no ETA */
    es_progress_format(&progress, 110.0, line, sizeof line);
    CHECKF(strstr(line, "250 tokens") && !strstr(line, "ETA"), "%s", line);
    progress.total = 10000000;
    progress.done = 1;
    es_progress_format(&progress, 110.0, line, sizeof line);
    CHECKF(strstr(line, "ETA 27777:46:30"), "%s", line); /* 0.1 tokens/s: hours shown as h:mm:ss */

    /* Not a terminal: a plain log line once per interval, on stderr, and a final one. */
    char path[600];
    snprintf(path, sizeof path, "%s/progress.log", test_tmpdir());
    fflush(stderr);
    int saved = dup(2);
    FILE *log = freopen(path, "w", stderr);
    REQUIRE(log);
    setenv("ESSENCE_PROGRESS_INTERVAL", "0.05", 1);
    es_set_program("test-progress");
    es_progress_start(&progress, "stage", "rows", 40);
    for (int i = 0; i < 4; i++) {
        usleep(60000);
        es_progress_add(&progress, 10);
    }
    es_progress_finish(&progress);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    FILE *in = fopen(path, "r");
    REQUIRE(in);
    int lines = 0, last_complete = 0;
    char buf[512];
    while (fgets(buf, sizeof buf, in)) {
        lines++;
        CHECKF(strncmp(buf, "test-progress: stage: ", 22) == 0 && !strchr(buf, '\r'), "%s", buf);
        last_complete = strstr(buf, "40/40 rows (100.0%)") != NULL;
    }
    fclose(in);
    CHECKF(lines == 5 && last_complete, "%d lines", lines);
}

static void add_square(void *arg, size_t i, int worker) {
    (void)worker;
    atomic_fetch_add((atomic_llong *)arg, (long long)(i * i));
}

typedef struct {
    es_task task;
    int value;
    int worker;
} square_task;

static void run_square(es_task *task, int worker) {
    square_task *t = (square_task *)task;
    usleep(1000 * (t->value % 3));
    t->value *= t->value;
    t->worker = worker;
}

TEST(thread_pool) {
    es_pool *pool = es_pool_create(3);
    REQUIRE(pool && es_pool_threads(pool) == 3);
    atomic_llong sum = 0;
    es_pool_for(pool, 1000, add_square, &sum);
    CHECK(sum == 332833500LL); /* sum of i^2 for i < 1000 */
    es_pool_for(pool, 0, add_square, &sum);
    square_task tasks[50];
    for (int i = 0; i < 50; i++) {
        tasks[i] = (square_task){.task = {.run = run_square}, .value = i, .worker = -1};
        es_pool_submit(pool, &tasks[i].task);
    }
    for (int i = 49; i >= 0; i--) es_pool_wait(pool, &tasks[i].task);
    int ok = 1;
    for (int i = 0; i < 50; i++) ok &= tasks[i].value == i * i && tasks[i].worker >= 0 && tasks[i].worker < 3;
    CHECK(ok);
    es_pool_destroy(pool);
}

TEST(dtype_conversions) {
    CHECK(es_f16_to_f32(0x3c00) == 1.0f && es_f16_to_f32(0xc000) == -2.0f);
    CHECK(es_f16_to_f32(0x0001) == ldexpf(1, -24) && es_f16_to_f32(0x7bff) == 65504.0f);
    CHECK(isinf(es_f16_to_f32(0x7c00)) && isnan(es_f16_to_f32(0x7e00)));
    CHECK(es_f8e4m3_to_f32(0x38) == 1.0f && es_f8e4m3_to_f32(0x7e) == 448.0f);
    CHECK(es_f8e4m3_to_f32(0x01) == ldexpf(1, -9) && es_f8e4m3_to_f32(0xb8) == -1.0f);
    CHECK(isnan(es_f8e4m3_to_f32(0x7f)) && isnan(es_f8e4m3_to_f32(0xff)));
    CHECK(es_f32_to_bf16(1.0f) == 0x3f80 && es_bf16_to_f32(0x3f80) == 1.0f);
    es_dtype dtype;
    CHECK(es_dtype_from_name("F8_E4M3", &dtype) == 0 && dtype == ES_DT_F8_E4M3 && es_dtype_size(dtype) == 1);
    CHECK(es_dtype_from_name("F64", &dtype) == -1);
}

TEST(utf8_checks) {
    static const struct {
        const char *text;
        size_t len, bad_at;
    } cases[] = {
        {"abc", 3, (size_t)-1},          {"\xc3\xa9", 2, (size_t)-1},     {"a\xff", 2, 1},
        {"\xc0\xaf", 2, 0},              /* overlong '/' */              {"\xed\xa0\x80", 3, 0}, /* surrogate */
        {"\xf4\x90\x80\x80", 4, 0},      /* past U+10FFFF */            {"\xf0\x9f\x98\x80", 4, (size_t)-1},
        {"x\xe2\x82", 3, 1},             /* cut short */                 {"\xe0\x80\xaf", 3, 0},
        {"ok\0\xc3\xa9", 5, (size_t)-1}, /* NUL is valid UTF-8 */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        size_t got = es_utf8_invalid_at(cases[i].text, cases[i].len);
        CHECKF(got == cases[i].bad_at, "case %zu: %zd, expected %zd", i, (ssize_t)got, (ssize_t)cases[i].bad_at);
    }
}

int main(void) {
    RUN(error_first_wins_and_prefix);
    RUN(progress_lines);
    RUN(thread_pool);
    RUN(dtype_conversions);
    RUN(utf8_checks);
    return test_summary();
}
