/* OpenBLAS's working buffers, set up while the address space is still free.
 *
 * Each thread that calls a level-3 routine takes a buffer of about 128 MiB of address space
 * from OpenBLAS's own table (blas_memory_alloc); the table keeps it for later calls. When the
 * allocation fails (a `ulimit -v`, a cgroup), OpenBLAS 0.3 retries forever instead of failing:
 * the program hangs. So the CPU backend checks, before the first product, that the address
 * space has room for one buffer per calling thread, and makes each pool worker take its buffer
 * then; later products reuse them. Too little room is ES_ERR_RUNTIME "out of memory while
 * starting OpenBLAS", exit code 1, instead of a hang. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include "cpu.h"

/* OpenBLAS's BUFFER_SIZE on x86-64 (128 MiB), with room for its guard pages and alignment. */
#define BLAS_BUFFER_BYTES ((size_t)144 << 20)
#define MAX_PROBES 512

/* OpenBLAS's exit handler joins its own threads, and one started when the library loaded may be
 * looping in the allocator already: once the check fails, the exit must not wait for it. The
 * check runs when the device opens, before any output is created, so nothing is left unwritten. */
static void exit_without_openblas(int status, void *arg) {
    (void)arg;
    fflush(stdout), fflush(stderr);
    _exit(status);
}

static void warm_up(void *arg, size_t index, int worker) {
    (void)index, (void)worker;
    const float *m = arg; /* A and B, read only; each call writes its own C */
    float c[64 * 64];
    cpu_sgemm(0, 0, 64, 64, 64, 1.0f, m, 64, m + 64 * 64, 64, 0.0f, c, 64);
}

int cpu_blas_memory_prepare(es_pool *pool, es_error *err) {
    struct rlimit limit;
    int callers = es_pool_threads(pool) + 1; /* the workers and the calling thread */
    if (callers > MAX_PROBES) callers = MAX_PROBES;
    if (getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
        /* Mapped at once, as the buffers will be held at once; PROT_NONE commits nothing. */
        void *probes[MAX_PROBES];
        int got = 0;
        while (got < callers && (probes[got] = mmap(NULL, BLAS_BUFFER_BYTES, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                                                    -1, 0)) != MAP_FAILED)
            got++;
        for (int i = 0; i < got; i++) munmap(probes[i], BLAS_BUFFER_BYTES);
        if (got < callers) {
            on_exit(exit_without_openblas, NULL);
            return es_fail(err, ES_ERR_RUNTIME,
                           "out of memory while starting OpenBLAS: its %d calling threads need %zu MiB of address space each, and the "
                           "address-space limit (ulimit -v: %llu MiB) leaves room for %d (fewer --threads, or a higher limit)",
                           callers, BLAS_BUFFER_BYTES >> 20, (unsigned long long)(limit.rlim_cur >> 20), got);
        }
    }
    static float operands[2 * 64 * 64];
    es_pool_for(pool, (size_t)es_pool_threads(pool) * 2, warm_up, operands);
    warm_up(operands, 0, -1);
    return ES_OK;
}
