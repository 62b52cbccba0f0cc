/* The CPU device: host memory, the pool, the loader thread (its copy stream), the workspace
 * estimate and the op table. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "cpu.h"
#include "log.h"

typedef struct cpu_state {
    es_pool *pool;
    int own_pool;
    /* the copy stream: one thread converting checkpoint tensors into fp32, jobs in order */
    pthread_t loader;
    int loader_started, stopping;
    pthread_mutex_t lock;
    pthread_cond_t queued, finished;
    es_load_job *head, *tail;
} cpu_state;

static cpu_state *state_of(const es_device *dev) { return dev->impl; }
es_pool *cpu_pool(const es_device *dev) { return state_of(dev)->pool; }
int cpu_workers(const es_device *dev) { return es_pool_threads(state_of(dev)->pool); }

void cpu_for(es_device *dev, size_t n, void (*fn)(void *arg, size_t i, int worker), void *arg) {
    if (n == 1) fn(arg, 0, 0); /* worker 0's scratch: no task is running on the pool meanwhile */
    else es_pool_for(state_of(dev)->pool, n, fn, arg);
}

/* ---- memory ------------------------------------------------------------------------------ */

static void *cpu_alloc(es_device *dev, size_t bytes) {
    (void)dev;
    void *p = NULL;
    return posix_memalign(&p, 64, bytes) ? NULL : p;
}
static void cpu_free(es_device *dev, void *ptr) { (void)dev, free(ptr); }
static int cpu_copy(es_device *dev, void *dst, const void *src, size_t bytes) {
    (void)dev;
    if (dst != src) memmove(dst, src, bytes);
    return 0;
}
static int cpu_zero(es_device *dev, void *ptr, size_t bytes) {
    (void)dev;
    memset(ptr, 0, bytes);
    return 0;
}
static int cpu_sync(es_device *dev) { return (void)dev, 0; }

/* ---- the copy stream ----------------------------------------------------------------------- */

static void run_load(es_load_job *job) {
    job->rc = job->dtype == ES_DT_F32 ? ES_OK : es_fail(&job->error, ES_ERR_RUNTIME, "cpu: weights in %s", es_dtype_name(job->dtype));
    for (int i = 0; i < job->n && !job->rc; i++) job->rc = es_tensor_to_f32(job->src[i], job->dst[i], &job->error);
}

static void *loader_main(void *arg) {
    cpu_state *s = arg;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->head && !s->stopping) pthread_cond_wait(&s->queued, &s->lock);
        if (!s->head) break;
        es_load_job *job = s->head;
        pthread_mutex_unlock(&s->lock);
        run_load(job);
        pthread_mutex_lock(&s->lock);
        s->head = job->next;
        if (!s->head) s->tail = NULL;
        job->state = 2;
        pthread_cond_broadcast(&s->finished);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static int cpu_load_begin(es_device *dev, es_load_job *job) {
    cpu_state *s = state_of(dev);
    es_error_clear(&job->error);
    job->next = NULL;
    pthread_mutex_lock(&s->lock);
    if (!s->loader_started) {
        if (pthread_create(&s->loader, NULL, loader_main, s)) {
            pthread_mutex_unlock(&s->lock);
            return es_device_fail(dev, ES_ERR_RUNTIME, "%s: cannot start the loader thread", dev->name);
        }
        s->loader_started = 1;
    }
    job->state = 1;
    if (s->tail) s->tail->next = job;
    else s->head = job;
    s->tail = job;
    pthread_cond_signal(&s->queued);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int cpu_load_wait(es_device *dev, es_load_job *job) {
    cpu_state *s = state_of(dev);
    pthread_mutex_lock(&s->lock);
    while (job->state == 1) pthread_cond_wait(&s->finished, &s->lock);
    pthread_mutex_unlock(&s->lock);
    job->state = 0;
    return job->rc ? es_device_fail(dev, job->rc, "%s", job->error.msg) : 0;
}

/* ---- the workspace --------------------------------------------------------------------------- */

static size_t larger(size_t a, size_t b) { return a > b ? a : b; }

static size_t cpu_workspace_estimate(const es_device *dev, const es_workspace_plan *plan) {
    size_t bytes = cpu_matmul_workspace(plan);
    bytes = larger(bytes, cpu_swiglu_down_workspace(plan));
    bytes = larger(bytes, cpu_attention_workspace(dev, plan));
    bytes = larger(bytes, cpu_loss_workspace(dev, plan));
    bytes = larger(bytes, cpu_project_workspace(dev, plan));
    return larger(bytes, cpu_optimizer_workspace(plan));
}

/* ---- the device ---------------------------------------------------------------------------- */

static void cpu_close(es_device *dev) {
    cpu_state *s = state_of(dev);
    if (!s) return;
    if (s->loader_started) {
        pthread_mutex_lock(&s->lock);
        s->stopping = 1;
        pthread_cond_broadcast(&s->queued);
        pthread_mutex_unlock(&s->lock);
        pthread_join(s->loader, NULL);
    }
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->queued);
    pthread_cond_destroy(&s->finished);
    if (s->own_pool) es_pool_destroy(s->pool);
    free(s);
    dev->impl = NULL;
}

static const es_backend cpu_backend = {
    .name = "cpu",
    .close = cpu_close,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .zero = cpu_zero,
    .sync = cpu_sync,
    .load_begin = cpu_load_begin,
    .load_wait = cpu_load_wait,
    .workspace_estimate = cpu_workspace_estimate,
    .embedding_forward = cpu_embedding_forward,
    .rmsnorm_forward = cpu_rmsnorm_forward,
    .matmul_forward = cpu_matmul_forward,
    .rope_forward = cpu_rope_forward,
    .attention_forward = cpu_attention_forward,
    .attention_cached_forward = cpu_attention_cached_forward,
    .swiglu_forward = cpu_swiglu_forward,
    .swiglu_down_forward = cpu_swiglu_down_forward,
    .add = cpu_add,
    .embedding_backward = cpu_embedding_backward,
    .rmsnorm_backward = cpu_rmsnorm_backward,
    .matmul_backward = cpu_matmul_backward,
    .matmul_backward_group = cpu_matmul_backward_group,
    .rope_backward = cpu_rope_backward,
    .attention_backward = cpu_attention_backward,
    .swiglu_backward = cpu_swiglu_backward,
    .swiglu_down_backward = cpu_swiglu_down_backward,
    .latent_mse = cpu_latent_mse,
    .cross_entropy = cpu_cross_entropy,
    .adamw_update = cpu_adamw_update,
    .round_weights = cpu_round_weights,
    .sum_squares = cpu_sum_squares,
    .scale = cpu_scale,
    .round_precision = cpu_round_precision,
    .standardise = cpu_standardise,
    .fourier_features = cpu_fourier_features,
};

/* A value of KEY from a "KEY: N kB" file such as /proc/meminfo, in bytes (0 when absent). */
static size_t meminfo_bytes(const char *key) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    size_t bytes = 0, n = strlen(key);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ':') {
            bytes = (size_t)strtoull(line + n + 1, NULL, 10) * 1024;
            break;
        }
    fclose(f);
    return bytes;
}

/* A cgroup v2 limit (Slurm's, a container's) left to this process, or 0 when there is none. */
static size_t cgroup_room(void) {
    FILE *f = fopen("/sys/fs/cgroup/memory.max", "r"), *g = fopen("/sys/fs/cgroup/memory.current", "r");
    unsigned long long max = 0, current = 0;
    int ok = f && g && fscanf(f, "%llu", &max) == 1 && fscanf(g, "%llu", &current) == 1;
    if (f) fclose(f);
    if (g) fclose(g);
    return ok && max > current ? (size_t)(max - current) : 0;
}

/* The automatic budget: 90% of the memory available now (the smaller of MemAvailable and what
 * a cgroup leaves). */
static size_t automatic_budget(void) {
    size_t available = meminfo_bytes("MemAvailable"), room = cgroup_room();
    if (room && (!available || room < available)) available = room;
    return available ? available / 10 * 9 : (size_t)1 << 32;
}

int es_cpu_open(es_device *dev, const es_device_options *options, es_error *err) {
    cpu_state *s = calloc(1, sizeof *s);
    if (!s) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    s->pool = options->pool;
    if (!s->pool) {
        s->pool = es_pool_create(options->threads);
        s->own_pool = 1;
    }
    if (!s->pool) {
        free(s);
        return es_fail(err, ES_ERR_RUNTIME, "cannot start %d worker threads (out of memory, or the limit of processes)", options->threads);
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->queued, NULL);
    pthread_cond_init(&s->finished, NULL);
    openblas_set_num_threads(1); /* every product is tiled over the pool instead: see cpu.h */
    if (cpu_blas_memory_prepare(s->pool, err)) {
        if (s->own_pool) es_pool_destroy(s->pool);
        free(s);
        return err->code;
    }
    dev->ops = &cpu_backend;
    dev->impl = s;
    dev->host_memory = 1;
    dev->weight_dtype = ES_DT_F32;
    dev->batch_independent = cpu_rows_independent();
    dev->max_memory = options->max_memory ? options->max_memory : automatic_budget();
    snprintf(dev->name, sizeof dev->name, "cpu (%d threads, OpenBLAS %s kernels)", es_pool_threads(s->pool), cpu_blas_core());
    return ES_OK;
}
