/* The training state where the host reads and writes it: checkpoints, the all-reduce over ranks
 * and --dump-step. On a device whose memory is host memory (the CPU) these are the device's own
 * arrays; on one whose memory is not (CUDA), host copies of them, brought over when a checkpoint
 * is saved or loaded, and, for the gradients, when ranks sum them or a step is dumped. */
#ifndef ES_ALIGN_STATE_H
#define ES_ALIGN_STATE_H

#include <stddef.h>

#include "backend.h"
#include "comm.h"
#include "error.h"

/* One device array and its place on the host. */
typedef struct host_array {
    float *device;   // (n) device memory (or host memory: host_only)
    float *host;     // (n) the same memory (host_memory devices) or a malloc'd copy; NULL until needed
    size_t n;
    int host_only;   /* device is host memory: nothing to copy */
} host_array;

enum { HOST_MASTER, HOST_M, HOST_V, HOST_GRADS, HOST_HEADS, HOST_HEAD_M, HOST_HEAD_V, HOST_HEAD_GRADS, HOST_ARRAYS };

typedef struct host_state {
    es_device *dev;
    int copies;                 /* the host holds copies (the device's memory is not the host's) */
    host_array arrays[HOST_ARRAYS];
} host_state;

/* The arrays: the parameter arena, its AdamW moments and gradients (arena floats each), and the
 * heads with theirs (head floats each; NULL and 0 without heads). Copies of the optimizer state
 * are allocated at once (a checkpoint needs them), those of the gradients when first pulled. */
/* The arrays with bit (1u << k) set in host_only are host memory already (ZeRO-1's full moments,
 * align/reduce.h): their host place is themselves, and pull and push skip them. */
int host_state_init(host_state *s, es_device *dev, float *const device[HOST_ARRAYS], const size_t n[HOST_ARRAYS],
                    unsigned host_only, es_error *err);
void host_state_free(host_state *s);
/* The host place of a device pointer into one of the arrays (NULL when it is in none). */
float *host_state_at(const host_state *s, const float *device);
/* Device → host (before a checkpoint is written) and host → device (after one was read) of the
 * master weights, the heads and the moments; the gradients are not moved. */
int host_state_pull(host_state *s, es_error *err);
int host_state_push(host_state *s, es_error *err);
/* Device → host of the n gradients at device pointer grads (before --dump-step reads them). */
int host_state_pull_grads(host_state *s, const float *grads, size_t n, es_error *err);

#endif
