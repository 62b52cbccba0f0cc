/* The seam between the stages and the engine (docs/engine.md): a device that owns its memory,
 * its workspace and its streams, and a table of ops that each backend fills in.
 *
 * Memory. Every buffer an op reads or writes is device memory from es_device_alloc (on the
 * CPU that is host memory; on CUDA, VRAM), except where an op says otherwise. What a device
 * holds is counted against its budget (--max-memory): an allocation past it fails with a
 * message naming what it was for. Host data crosses with es_device_upload / es_device_download.
 *
 * Ops. kernels/ops.h is the list; each is a function of the table below, called through a
 * wrapper that checks its arguments. Ops run in order on the device's compute stream (on the
 * CPU: the calling thread and the device's pool of workers); an op returns ES_OK or an error
 * code, with the message kept by the device (es_device_take_error). Results are the same bits
 * whatever the number of threads: a backend cuts its work into pieces whose shape depends on
 * the problem's shape only, and reduces them in a fixed order.
 *
 * Workspace. Scratch an op needs comes from the device's one workspace, grown (never shrunk)
 * when an op asks for more than it holds; a composition reserves it once up front from the
 * backend's own estimate (es_device_reserve), so a run allocates nothing batch after batch. */
#ifndef ES_KERNELS_BACKEND_H
#define ES_KERNELS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "error.h"
#include "safetensors.h"
#include "threadpool.h"

typedef enum { ES_DEVICE_CPU, ES_DEVICE_CUDA } es_device_kind;

/* What a program asks for: --device, --threads, --max-memory. */
typedef struct es_device_options {
    es_device_kind kind;
    int ordinal;           /* cuda:N */
    int threads;           /* CPU workers (0: one per CPU) */
    size_t max_memory;     /* bytes the device may hold; 0: automatic (docs/engine.md) */
    es_pool *pool;         /* CPU: run on this pool rather than a pool of its own (may be NULL) */
} es_device_options;

/* The three option entries every program's table carries (YAML keys device, threads, max_memory). */
#define ES_DEVICE_OPTIONS                                                                                    \
    {"device", ES_OPT_STRING, "cpu", "cpu, or cuda[:N] (the GPU backend)", NULL},                                  \
    {"threads", ES_OPT_INT, "0", "CPU threads (0: one per CPU); the results do not depend on it", "[0,4096]"},           \
    {"max-memory", ES_OPT_STRING, "auto",                                                                   \
     "memory the backend may hold for weights and activations, e.g. 8G (auto: 90% of what is free)", NULL}

/* Of those, the ones that change no bit of any output: fingerprints leave them out. */
#define ES_RESULT_NEUTRAL_OPTIONS ((const char *const[]){"threads", "max-memory", NULL})

/* Reads those three options (usage errors name the flag). */
int es_device_options_from_config(const es_config *cfg, es_device_options *out, es_error *err);
/* "cpu", "cuda", "cuda:1". Returns 0, or -1 for anything else. */
int es_device_parse_name(const char *text, es_device_kind *kind, int *ordinal);
/* "8G", "8GiB", "512M", "1.5T", "4096" (bytes; K/M/G/T are powers of 1024, with or without
 * "iB"/"B"); "auto" and "0" give 0. Returns 0, or -1 for anything else. */
int es_parse_size(const char *text, size_t *bytes);
/* "8.00 GiB" into buf. */
const char *es_format_size(size_t bytes, char *buf, size_t size);

typedef struct es_backend es_backend;

/* The first call of every main(): when OpenBLAS chose kernels below what this CPU supports, it
 * runs the program again with better ones (kernels/cpu/blas_core.c; OPENBLAS_CORETYPE set by
 * the user wins). */
void es_device_prepare(char **argv);

/* A unit of layer loading: tensors in their file dtype (host, e.g. mapped safetensors)
 * brought into device memory as `dtype` (the device's weight format, or fp32 for training's
 * master weights; a backend refuses a dtype it does not write), asynchronously on the
 * device's copy stream (on the CPU: its loader thread; on CUDA: a copy stream the compute
 * stream waits for, so es_device_load_wait does not block the host there). */
typedef struct es_load_job {
    int n;
    const es_tensor *const *src; /* [n] */
    void *const *dst;            /* [n] device memory, es_tensor_numel elements of `dtype` each */
    es_dtype dtype;
    /* owned by the backend */
    int state;                   /* 0 idle, 1 queued, 2 done */
    void *impl;                  /* the backend's own (CUDA: the event the compute stream waits for) */
    int rc;
    es_error error;
    struct es_load_job *next;
} es_load_job;

/* The largest shapes a run will hand each op: what es_device_reserve sizes the workspace by.
 * Fields a run does not use stay 0. */
typedef struct es_workspace_plan {
    int tokens;            /* tokens per call (T) */
    int longest;           /* longest sequence */
    int heads, kv_heads, head_dim; /* attention */
    int max_in, max_out;   /* widest input (C) and output (OC) of any matrix product */
    int latent_width;      /* latent MSE: C */
    int vocab, ce_width;   /* cross entropy: V, C */
    int train;             /* backward ops too */
    size_t reduce_n;       /* longest vector summed by es_sum_squares */
    int feature_in, feature_phases; /* Fourier features: d, m */
} es_workspace_plan;

typedef struct es_device {
    const es_backend *ops;
    es_device_kind kind;
    char name[160];         /* for logs: "cpu (2 threads, OpenBLAS SkylakeX)" */
    char where[64];         /* which physical device ("" on the CPU; CUDA: its PCI address): ranks that share one cannot be a group */
    int host_memory;        /* device memory is host memory: callers may read and write it in place */
    es_dtype weight_dtype;  /* what the ops read weights in (ops.h): ES_DT_F32 on the CPU, ES_DT_BF16 on CUDA */
    int batch_independent;  /* a token's results are the same bits whatever else shares its batch */
    size_t max_memory;      /* the budget */
    size_t used, peak;      /* bytes held now, and the most ever held */
    void *workspace;
    size_t workspace_bytes;
    int workspace_grows;    /* times the workspace was (re)allocated */
    es_error error;         /* the last failing op's message */
    void *impl;             /* the backend's own state */
} es_device;

/* Opens the device the options name, with its budget (0: the automatic one). A CUDA device in
 * a build without nvcc is a usage error saying so. */
int es_device_open(es_device **out, const es_device_options *options, es_error *err);
void es_device_close(es_device *dev); /* NULL is fine */

/* Device memory, counted against the budget; `what` names it in the error ("the activations
 * of 8192 tokens"). es_device_free takes the size es_device_alloc was given. */
int es_device_alloc(es_device *dev, size_t bytes, void **ptr, const char *what, es_error *err);
void es_device_free(es_device *dev, void *ptr, size_t bytes);
int es_device_upload(es_device *dev, void *dst, const void *src, size_t bytes, es_error *err);
int es_device_download(es_device *dev, void *dst, const void *src, size_t bytes, es_error *err);
int es_device_zero(es_device *dev, void *ptr, size_t bytes, es_error *err);
/* Host memory that device copies reach fastest (CUDA: pinned), not counted against the budget;
 * NULL when the host has no more. */
void *es_device_host_alloc(es_device *dev, size_t bytes);
void es_device_host_free(es_device *dev, void *ptr);
/* Starts copying device memory src into host memory dst (best from es_device_host_alloc) after
 * everything queued on the compute stream so far; ops queued after this returns may overwrite src
 * at once (the backend takes its copy first), and dst is complete once es_device_download_wait
 * returns, which waits for every copy begun. The CPU copies at once. */
int es_device_download_begin(es_device *dev, void *dst, const void *src, size_t bytes, es_error *err);
int es_device_download_wait(es_device *dev, es_error *err);
/* Room for copies to the host in flight at once, `bytes` in all (CUDA: device snapshots of what
 * is copied, under the budget): reserve it before the layer stream plans its slots. Copies
 * beyond the room (or without one) wait for the compute stream instead. A room that does not fit
 * the budget is an error, and the device is left as it was. */
int es_device_download_reserve(es_device *dev, size_t bytes, es_error *err);
/* Host fp32 values into device memory in the device's weight format (dev->weight_dtype). */
int es_device_upload_weights(es_device *dev, void *dst, const float *src, size_t n, es_error *err);
/* Waits for everything queued on the compute stream. */
int es_device_sync(es_device *dev, es_error *err);

/* Layer loading on the copy stream: begin queues the job (after everything the compute stream
 * holds so far: a slot in use is not overwritten under it), wait returns when ops queued after
 * it will see the weights (on the CPU: when they are in place). */
int es_device_load_begin(es_device *dev, es_load_job *job, es_error *err);
int es_device_load_wait(es_device *dev, es_load_job *job, es_error *err);
/* Says that these tensors will be loaded again and again as `dtype` (a layer stream through
 * slots), so that the backend may keep them where its copy stream reads them fastest (CUDA:
 * pinned host memory, not counted against --max-memory). */
int es_device_load_prepare(es_device *dev, const es_tensor *const *tensors, int n, es_dtype dtype, es_error *err);
/* The prepared tensors will not be loaded again (their store is closing): the backend lets go of
 * what it kept for them. */
void es_device_load_forget(es_device *dev);

/* ---- collectives: one device per process, `world` processes summing arrays in device memory ---
 * (CUDA: NCCL, loaded when first asked for). A backend without them (the CPU: its ranks sum
 * through MPI on the host) answers es_device_has_group 0. */
enum { ES_GROUP_ID_BYTES = 128 };
typedef enum { ES_GROUP_SUM_F32, ES_GROUP_SUM_F64, ES_GROUP_MAX_I32 } es_group_op;
int es_device_has_group(const es_device *dev);
/* Rank 0 makes the group's id; every rank joins with it (blocking until all have). */
int es_device_group_id(es_device *dev, unsigned char id[ES_GROUP_ID_BYTES], es_error *err);
int es_device_group_join(es_device *dev, const unsigned char id[ES_GROUP_ID_BYTES], int rank, int world, es_error *err);
/* data (device memory, n values of the op's type) combined over the ranks in place, queued on the
 * compute stream after what is there (every rank in the same order of calls). */
int es_device_group_allreduce(es_device *dev, void *data, size_t n, es_group_op op, es_error *err);
/* The collectives a training step overlaps with its backward, on n floats of device memory:
 * queued on the group's own stream after what the compute stream holds now, so that the ops
 * queued after them do not wait; es_device_group_wait makes the compute stream wait for every
 * one started. A sum over the ranks in place (ALLREDUCE), into root's data only (REDUCE; the
 * others' data is left undefined), or root's data copied to every rank (BROADCAST). */
typedef enum { ES_GROUP_ALLREDUCE, ES_GROUP_REDUCE, ES_GROUP_BROADCAST } es_group_call;
int es_device_group_start(es_device *dev, es_group_call call, float *data, size_t n, int root, es_error *err);
int es_device_group_wait(es_device *dev, es_error *err);

/* Makes the workspace at least as large as the backend estimates that plan needs. */
int es_device_reserve(es_device *dev, const es_workspace_plan *plan, es_error *err);

/* For backends' ops: at least `bytes` of scratch, valid until the op returns (grows the
 * workspace when needed; NULL when the budget or memory does not allow). */
void *es_device_scratch(es_device *dev, size_t bytes);

/* Moves the last failing op's message into err (prefixed with the device) and returns its code. */
int es_device_take_error(es_device *dev, es_error *err);
/* For backends: records an op's failure and returns code. */
int es_device_fail(es_device *dev, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Logs the device line once per program ("device: cpu, 2 threads, OpenBLAS SkylakeX kernels,
 * budget 21.4 GiB"). */
void es_device_log(const es_device *dev);
/* ... and at the end, the most it held ("device: 6.93 GiB held at most (budget 8.00 GiB)"). */
void es_device_log_peak(const es_device *dev);

#endif
