/* A minimal test harness. Each test binary prints one line per test case:
 *   PASS name | FAIL name: file:line: what | SKIP name: why
 * and tests/run.sh adds them up. CHECK records a failure and goes on; REQUIRE returns. */
#ifndef ES_TESTLIB_H
#define ES_TESTLIB_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int tl_passed __attribute__((unused)), tl_failed, tl_skipped __attribute__((unused));
static int tl_case_failed;
static const char *tl_case_skip;
static char tl_skip_reason[2048] __attribute__((unused));

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            if (!tl_case_failed) printf("FAIL %s: %s:%d: %s\n", tl_name, __FILE__, __LINE__, #cond); \
            else printf("  also %s:%d: %s\n", __FILE__, __LINE__, #cond);             \
            tl_case_failed = 1;                                                       \
        }                                                                             \
    } while (0)

#define CHECKF(cond, ...)                                                             \
    do {                                                                              \
        if (!(cond)) {                                                                \
            if (!tl_case_failed) printf("FAIL %s: %s:%d: %s: ", tl_name, __FILE__, __LINE__, #cond); \
            else printf("  also %s:%d: %s: ", __FILE__, __LINE__, #cond);             \
            printf(__VA_ARGS__);                                                      \
            printf("\n");                                                             \
            tl_case_failed = 1;                                                       \
        }                                                                             \
    } while (0)

/* Evaluates cond once (it may have side effects) and returns from the case when false. */
#define REQUIRE(cond)                                                                 \
    do {                                                                              \
        int tl_ok = (cond) ? 1 : 0;                                                   \
        if (!tl_ok) {                                                                 \
            if (!tl_case_failed) printf("FAIL %s: %s:%d: %s\n", tl_name, __FILE__, __LINE__, #cond); \
            else printf("  also %s:%d: %s\n", __FILE__, __LINE__, #cond);            \
            tl_case_failed = 1;                                                       \
            return;                                                                   \
        }                                                                             \
    } while (0)

/* Marks the current case skipped, with the reason printed. */
#define SKIP(...)                                                                     \
    do {                                                                              \
        snprintf(tl_skip_reason, sizeof tl_skip_reason, __VA_ARGS__);                 \
        tl_case_skip = tl_skip_reason;                                                \
        return;                                                                       \
    } while (0)

#define RUN(fn) RUN_AS(#fn, fn(tl_name))

/* Runs `call` as one case named `label` (a string that outlives the call); `call` sees the
 * name as tl_name, e.g. RUN_AS("goldens_qwen[repo]", check(tl_name, "qwen")). */
#define RUN_AS(label, call)                                                           \
    do {                                                                              \
        const char *tl_name = (label);                                                \
        (void)tl_name;                                                                \
        tl_case_failed = 0;                                                           \
        tl_case_skip = NULL;                                                          \
        call;                                                                         \
        if (tl_case_failed) tl_failed++;                                              \
        else if (tl_case_skip) { printf("SKIP %s: %s\n", tl_name, tl_case_skip); tl_skipped++; } \
        else { printf("PASS %s\n", tl_name); tl_passed++; }                           \
        fflush(stdout);                                                               \
    } while (0)

#define TEST(fn) static void fn(const char *tl_name)

static inline int test_summary(void) { return tl_failed ? 1 : 0; }

/* The in-repo fixtures (tests/fixtures/README.md): $ESSENCE_FIXTURES, else tests/fixtures from
 * the project root. */
static inline const char *test_fixtures(void) {
    const char *dir = getenv("ESSENCE_FIXTURES");
    return dir && *dir ? dir : "tests/fixtures";
}

/* Where the large shared set is looked for: $ESSENCE_SHARED_FIXTURES, else ../shared/fixtures. */
static inline const char *test_shared_fixtures_path(void) {
    const char *dir = getenv("ESSENCE_SHARED_FIXTURES");
    return dir ? dir : "../shared/fixtures";
}

/* The shared set, or NULL where that folder does not exist (a test then prints one SKIP). Same
 * layout and formats as the in-repo set, so the same code checks both. */
static inline const char *test_shared_fixtures(void) {
    const char *dir = test_shared_fixtures_path();
    char models[4096];
    snprintf(models, sizeof models, "%s/models", dir);
    struct stat st;
    return *dir && stat(models, &st) == 0 && S_ISDIR(st.st_mode) ? dir : NULL;
}

/* The one SKIP line of a test family whose shared-set cases cannot run. */
static inline void test_skip_shared(const char *family) {
    const char *dir = test_shared_fixtures_path();
    printf("SKIP %s[shared]: no shared fixtures at %s; the in-repo set ran (set ESSENCE_SHARED_FIXTURES to add the large one)\n",
           family, *dir ? dir : "(ESSENCE_SHARED_FIXTURES is empty)");
}

/* A fresh scratch folder under $TMPDIR for one test binary. */
static inline const char *test_tmpdir(void) {
    static char dir[512];
    if (!dir[0]) {
        const char *base = getenv("TMPDIR");
        snprintf(dir, sizeof dir, "%s/essence-test-XXXXXX", base && *base ? base : "/tmp");
        extern char *mkdtemp(char *);
        if (!mkdtemp(dir)) { perror("mkdtemp"); exit(1); }
    }
    return dir;
}

/* TMPDIR-scratch path for a file name (one of 8 rotating buffers: up to 8 in use at once). */
static inline char *test_path(const char *name) {
    static char paths[8][1024];
    static int next;
    char *path = paths[next++ % 8];
    snprintf(path, sizeof paths[0], "%s/%s", test_tmpdir(), name);
    return path;
}

#endif
