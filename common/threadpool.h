/* A fixed pool of worker threads with a FIFO of tasks.
 *
 * Workers are numbered 0..n-1 and a task learns which worker runs it, so callers can keep
 * per-thread scratch (e.g. one zstd context per worker) without locks. */
#ifndef ES_THREADPOOL_H
#define ES_THREADPOOL_H

#include <stddef.h>

typedef struct es_pool es_pool;

typedef struct es_task {
    void (*run)(struct es_task *task, int worker); /* set by the caller */
    struct es_task *next;                          /* owned by the pool while queued */
    int done;                                      /* owned by the pool: set when run() returned */
} es_task;

/* n_threads <= 0: one per online CPU. Returns NULL when threads cannot be started. */
es_pool *es_pool_create(int n_threads);
void es_pool_destroy(es_pool *pool); /* waits for queued tasks */
int es_pool_threads(const es_pool *pool);

void es_pool_submit(es_pool *pool, es_task *task);
void es_pool_wait(es_pool *pool, es_task *task); /* until task->run has returned */

/* Runs fn(arg, i, worker) for i in [0, n) on the pool and returns when all are done. */
void es_pool_for(es_pool *pool, size_t n, void (*fn)(void *arg, size_t i, int worker), void *arg);

#endif
