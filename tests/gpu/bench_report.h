/* What the GPU benchmarks (tests/gpu/bench_*.c) share: their report — a JSON file of flat keys,
 * rewritten after every figure so that a failure part way keeps what was measured — with one line
 * per figure on stdout, the failure path, and the timing of asynchronous work. */
#ifndef ES_TESTS_GPU_BENCH_REPORT_H
#define ES_TESTS_GPU_BENCH_REPORT_H

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "../ops/rng.h"
#include "backend.h"
#include "progress.h"

#define GIB (1024.0 * 1024.0 * 1024.0)

static es_error err;
static const char *bench_name;
static json_t *bench_json;
static char bench_path[4096];

static void bench_start(const char *name, const char *out_dir) {
    bench_name = name;
    bench_json = json_object();
    snprintf(bench_path, sizeof bench_path, "%s/%s.json", out_dir, name);
}
static void bench_set(const char *key, json_t *value) {
    json_object_set_new(bench_json, key, value);
    json_dump_file(bench_json, bench_path, JSON_INDENT(2));
}
static void bench_str(const char *key, const char *value) { bench_set(key, json_string(value)); }
static void bench_num(const char *key, double value) { bench_set(key, isfinite(value) ? json_real(value) : json_null()); }
/* A figure: into the report, and a line for the log. */
static void figure(const char *key, double value, const char *what) {
    bench_num(key, value);
    printf("%s: %-48s %14.6g  (%s)\n", bench_name, what, value, key);
}

static void check(int rc) {
    if (!rc) return;
    printf("FAIL %s: %s\n", bench_name, err.msg);
    bench_str("error", err.msg);
    exit(1);
}
/* An op failed: its message is held by the device. */
#define OP(dev, call) check((call) ? es_device_take_error(dev, &err) : ES_OK)

/* splitmix64 (tests/ops/rng.h) from a plain state */
static uint64_t splitmix64(uint64_t *state) {
    rng r = {*state};
    const uint64_t value = rng_next(&r);
    *state = r.state;
    return value;
}

/* One warm-up, then the median of reps (at most 8) runs, each bracketed by syncs: ops are
 * asynchronous. */
static double timed(es_device *dev, void (*work)(void *), void *ctx, int reps) {
    double t[8];
    reps = reps < 1 ? 1 : reps > 8 ? 8 : reps;
    work(ctx);
    check(es_device_sync(dev, &err));
    for (int r = 0; r < reps; r++) {
        check(es_device_sync(dev, &err));
        const double start = es_now();
        work(ctx);
        check(es_device_sync(dev, &err));
        t[r] = es_now() - start;
    }
    for (int i = 1; i < reps; i++)
        for (int j = i; j > 0 && t[j] < t[j - 1]; j--) {
            const double swap = t[j];
            t[j] = t[j - 1], t[j - 1] = swap;
        }
    return t[reps / 2];
}

#endif
