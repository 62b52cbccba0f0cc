#include "progress.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

double es_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void es_progress_start(es_progress *progress, const char *label, const char *unit, int64_t total) {
    memset(progress, 0, sizeof *progress);
    snprintf(progress->label, sizeof progress->label, "%s", label);
    snprintf(progress->unit, sizeof progress->unit, "%s", unit);
    progress->total = total;
    progress->started = progress->last_shown = es_now();
    progress->terminal = isatty(STDERR_FILENO);
    const char *interval = getenv("ESSENCE_PROGRESS_INTERVAL");
    progress->interval = interval && atof(interval) > 0 ? atof(interval) : 30.0;
}

static void format_duration(double seconds, char *buf, int size) {
    long s = seconds > 0 ? (long)(seconds + 0.5) : 0;
    if (s >= 3600) snprintf(buf, (size_t)size, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
    else snprintf(buf, (size_t)size, "%ld:%02ld", s / 60, s % 60);
}

void es_progress_format(const es_progress *progress, double now, char *buf, int size) {
    double elapsed = now - progress->started;
    double rate = elapsed > 0 ? (double)progress->done / elapsed : 0;
    char spent[32], eta[32] = "?", extra[64] = "";
    format_duration(elapsed, spent, sizeof spent);
    if (progress->tokens > 0 && elapsed > 0)
        snprintf(extra, sizeof extra, ", %.0f tokens/s", (double)progress->tokens / elapsed);
    if (progress->total > 0) {
        if (rate > 0) format_duration((double)(progress->total - progress->done) / rate, eta, sizeof eta);
        snprintf(buf, (size_t)size, "%s: %lld/%lld %s (%.1f%%), %.0f %s/s%s, elapsed %s, ETA %s", progress->label,
                 (long long)progress->done, (long long)progress->total, progress->unit,
                 100.0 * (double)progress->done / (double)progress->total, rate, progress->unit, extra, spent, eta);
    } else {
        snprintf(buf, (size_t)size, "%s: %lld %s, %.0f %s/s%s, elapsed %s", progress->label, (long long)progress->done,
                 progress->unit, rate, progress->unit, extra, spent);
    }
}

static void show(es_progress *progress, double now, int final) {
    char line[256];
    es_progress_format(progress, now, line, sizeof line);
    if (progress->terminal) {
        int width = 24, filled = progress->total > 0 ? (int)(width * progress->done / progress->total) : 0;
        char bar[32];
        for (int i = 0; i < width; i++) bar[i] = i < filled ? '#' : '.';
        bar[width] = '\0';
        fprintf(stderr, "\r\033[K%s: [%s] %s%s", es_program(), bar, line, final ? "\n" : "");
    } else {
        es_log("%s", line);
    }
    progress->last_shown = now;
    progress->shown = 1;
}

void es_progress_add(es_progress *progress, int64_t amount) {
    progress->done += amount;
    double now = es_now();
    double period = progress->terminal ? 0.2 : progress->interval;
    if (now - progress->last_shown >= period) show(progress, now, 0);
}

void es_progress_add_tokens(es_progress *progress, int64_t tokens) { progress->tokens += tokens; }

void es_progress_finish(es_progress *progress) {
    /* Work shorter than a few seconds that never showed a line stays quiet. */
    double now = es_now();
    if (progress->shown || now - progress->started >= 3.0) show(progress, now, 1);
}
