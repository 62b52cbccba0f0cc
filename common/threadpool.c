#include "threadpool.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

struct es_pool {
    pthread_mutex_t lock;
    pthread_cond_t work_ready; /* a task was queued, or the pool is stopping */
    pthread_cond_t work_done;  /* some task finished */
    es_task *head, *tail;
    int stopping;
    int n_threads;
    pthread_t *threads;
};

typedef struct {
    es_pool *pool;
    int worker;
} worker_arg;

static void *worker_main(void *p) {
    worker_arg *arg = p;
    es_pool *pool = arg->pool;
    int worker = arg->worker;
    free(arg);
    pthread_mutex_lock(&pool->lock);
    for (;;) {
        while (!pool->head && !pool->stopping) pthread_cond_wait(&pool->work_ready, &pool->lock);
        if (!pool->head) break; /* stopping and drained */
        es_task *task = pool->head;
        pool->head = task->next;
        if (!pool->head) pool->tail = NULL;
        pthread_mutex_unlock(&pool->lock);
        task->run(task, worker);
        pthread_mutex_lock(&pool->lock);
        task->done = 1;
        pthread_cond_broadcast(&pool->work_done);
    }
    pthread_mutex_unlock(&pool->lock);
    return NULL;
}

es_pool *es_pool_create(int n_threads) {
    if (n_threads <= 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = cpus > 0 ? (int)cpus : 1;
    }
    es_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->threads = calloc((size_t)n_threads, sizeof *pool->threads);
    if (!pool->threads) {
        free(pool);
        return NULL;
    }
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->work_ready, NULL);
    pthread_cond_init(&pool->work_done, NULL);
    for (int i = 0; i < n_threads; i++) {
        worker_arg *arg = malloc(sizeof *arg);
        if (arg) *arg = (worker_arg){pool, i};
        if (!arg || pthread_create(&pool->threads[i], NULL, worker_main, arg) != 0) {
            free(arg);
            es_pool_destroy(pool);
            return NULL;
        }
        pool->n_threads = i + 1;
    }
    return pool;
}

void es_pool_destroy(es_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->lock);
    pool->stopping = 1;
    pthread_cond_broadcast(&pool->work_ready);
    pthread_mutex_unlock(&pool->lock);
    for (int i = 0; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->work_ready);
    pthread_cond_destroy(&pool->work_done);
    free(pool->threads);
    free(pool);
}

int es_pool_threads(const es_pool *pool) { return pool->n_threads; }

void es_pool_submit(es_pool *pool, es_task *task) {
    task->next = NULL;
    task->done = 0;
    pthread_mutex_lock(&pool->lock);
    if (pool->tail) pool->tail->next = task;
    else pool->head = task;
    pool->tail = task;
    pthread_cond_signal(&pool->work_ready);
    pthread_mutex_unlock(&pool->lock);
}

void es_pool_wait(es_pool *pool, es_task *task) {
    pthread_mutex_lock(&pool->lock);
    while (!task->done) pthread_cond_wait(&pool->work_done, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
}

typedef struct {
    es_task task;
    void (*fn)(void *, size_t, int);
    void *arg;
    size_t begin, end;
} range_task;

static void run_range(es_task *task, int worker) {
    range_task *range = (range_task *)task;
    for (size_t i = range->begin; i < range->end; i++) range->fn(range->arg, i, worker);
}

void es_pool_for(es_pool *pool, size_t n, void (*fn)(void *arg, size_t i, int worker), void *arg) {
    if (n == 0) return;
    /* One contiguous range per worker: callers' items are of even cost. */
    enum { MAX_RANGES = 256 };
    range_task ranges[MAX_RANGES];
    size_t n_ranges = (size_t)pool->n_threads < n ? (size_t)pool->n_threads : n;
    if (n_ranges > MAX_RANGES) n_ranges = MAX_RANGES;
    for (size_t r = 0; r < n_ranges; r++) {
        ranges[r] = (range_task){.task = {.run = run_range}, .fn = fn, .arg = arg,
                                 .begin = n * r / n_ranges, .end = n * (r + 1) / n_ranges};
        es_pool_submit(pool, &ranges[r].task);
    }
    for (size_t r = 0; r < n_ranges; r++) es_pool_wait(pool, &ranges[r].task);
}
