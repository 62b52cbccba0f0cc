/* Progress of long work: a bar redrawn on a terminal, periodic plain log lines otherwise
 * (Slurm logs), both with rate and ETA.  ESSENCE_PROGRESS_INTERVAL (seconds, default 30)
 * sets the log line period. */
#ifndef ES_PROGRESS_H
#define ES_PROGRESS_H

#include <stdint.h>

typedef struct es_progress {
    char label[64];
    char unit[16];     /* "tokens", "rows", ... */
    int64_t total;     /* 0 when unknown */
    int64_t done;
    int64_t tokens;    /* optional second count, shown as a rate (e.g. tokens while counting samples) */
    double started, last_shown;
    double interval;   /* seconds between log lines (terminal: redraws at most every 0.2 s) */
    int terminal;
    int shown;
} es_progress;

void es_progress_start(es_progress *progress, const char *label, const char *unit, int64_t total);
void es_progress_add(es_progress *progress, int64_t amount);
void es_progress_add_tokens(es_progress *progress, int64_t tokens); /* counted, shown with the next line */
void es_progress_finish(es_progress *progress); /* a last line with the totals */

/* Formats a rate/ETA line into buf (exposed for tests). */
void es_progress_format(const es_progress *progress, double now, char *buf, int size);
double es_now(void); /* monotonic seconds */

#endif
