// The CUDA device (docs/engine.md "CUDA"): VRAM and its budget, the compute and copy streams,
// layer loads from pinned host memory, the workspace estimate and the op table.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda.h"
#include "cuda_internal.h"

#define _Noreturn [[noreturn]] /* log.h is C11 */
extern "C" {
#include "log.h"
}
#undef _Noreturn

static const char *cublas_status_name(cublasStatus_t status) {
    switch (status) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialised";
    case CUBLAS_STATUS_ALLOC_FAILED: return "allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "not supported on this GPU";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "internal error";
    default: return "error";
    }
}

int cuda_fail(es_device *dev, const char *op, const char *what, cudaError_t code) {
    (void)cudaGetLastError(); /* a failure that is not sticky must not resurface at the next launch */
    return es_device_fail(dev, ES_ERR_RUNTIME, "%s: %s: %s failed: %s", dev->name, op, what, cudaGetErrorString(code));
}

int cublas_fail(es_device *dev, const char *op, const char *what, cublasStatus_t status) {
    return es_device_fail(dev, ES_ERR_RUNTIME, "%s: %s: %s failed: cuBLAS status %d (%s)", dev->name, op, what, (int)status,
                          cublas_status_name(status));
}

/* ---- memory -------------------------------------------------------------------------------------- */

static void *cuda_alloc(es_device *dev, size_t bytes) {
    void *ptr = NULL;
    if (cudaMalloc(&ptr, bytes) != cudaSuccess) {
        cudaGetLastError(); /* an allocation failure is not sticky: clear it */
        return NULL;
    }
    (void)dev;
    return ptr;
}

/* The streams may still use the memory: cudaFree waits for the whole device anyway, this says so. */
static void cuda_release(es_device *dev, void *ptr) {
    if (cuda_of(dev)->download) cudaStreamSynchronize(cuda_of(dev)->download);
    cudaStreamSynchronize(cuda_of(dev)->copy);
    cudaStreamSynchronize(cuda_of(dev)->compute);
    cudaFree(ptr);
}

/* Uploads wait for the copy: es_device_upload promises that src may change once it returns. */
static int cuda_upload(es_device *dev, void *dst, const void *src, size_t bytes) {
    CUDA_TRY(dev, "upload", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cuda_stream(dev)));
    CUDA_TRY(dev, "upload", cudaStreamSynchronize(cuda_stream(dev)));
    return 0;
}

static int cuda_download(es_device *dev, void *dst, const void *src, size_t bytes) {
    CUDA_TRY(dev, "download", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cuda_stream(dev)));
    CUDA_TRY(dev, "download", cudaStreamSynchronize(cuda_stream(dev)));
    return 0;
}

static int cuda_zero(es_device *dev, void *ptr, size_t bytes) {
    CUDA_TRY(dev, "zero", cudaMemsetAsync(ptr, 0, bytes, cuda_stream(dev)));
    return 0;
}

/* Waits for the compute stream; an error of an earlier asynchronous op shows here. */
static int cuda_sync(es_device *dev) {
    CUDA_TRY(dev, "sync", cudaStreamSynchronize(cuda_stream(dev)));
    return 0;
}

/* The pinned landing place of small results (losses, sequence tables), grown when needed. */
int cuda_pinned_room(es_device *dev, size_t bytes, void **out) {
    cuda_device *cd = cuda_of(dev);
    if (bytes > cd->pinned_bytes) {
        CUDA_TRY(dev, "pinned buffer", cudaStreamSynchronize(cd->compute));
        if (cd->pinned) cudaFreeHost(cd->pinned);
        cd->pinned = NULL, cd->pinned_bytes = 0;
        size_t want = bytes < ((size_t)1 << 20) ? (size_t)1 << 20 : bytes;
        CUDA_TRY(dev, "pinned buffer", cudaHostAlloc(&cd->pinned, want, cudaHostAllocDefault));
        cd->pinned_bytes = want;
    }
    *out = cd->pinned;
    return 0;
}

int cuda_host_seq_start(es_device *dev, const int32_t *seq_start, int n_seqs, const int32_t **host) {
    void *room = NULL;
    const size_t bytes = ((size_t)n_seqs + 1) * sizeof(int32_t);
    int rc = cuda_pinned_room(dev, bytes, &room);
    if (rc) return rc;
    CUDA_TRY(dev, "attention", cudaMemcpyAsync(room, seq_start, bytes, cudaMemcpyDeviceToHost, cuda_stream(dev)));
    CUDA_TRY(dev, "attention", cudaStreamSynchronize(cuda_stream(dev)));
    *host = (const int32_t *)room;
    return 0;
}

/* ---- layer loads: the copy stream ------------------------------------------------------------------ */

/* Tensors a layer stream brings in again and again, kept in pinned host memory in the weight
 * format: every load of them is then one DMA at the link's speed, not a copy out of the page
 * cache through the driver's staging buffers. */
typedef struct cuda_host_cache {
    void *pinned;                  /* bytes, cudaHostAlloc'd */
    size_t bytes;
    const es_tensor **tensors;     /* [n], sorted by address */
    char **copies;                 /* [n] into pinned */
    const void **data;             /* [n] each tensor's data and size when it was copied */
    size_t *nbytes;
    int n;
    es_dtype dtype;
} cuda_host_cache;

/* A staging buffer for tensors converted on the host as they load (not cached). */
enum { STAGING_BYTES = 64 << 20 };
typedef struct cuda_loader {
    void *staging;
} cuda_loader;

static int by_address(const void *a, const void *b) {
    const es_tensor *x = *(const es_tensor *const *)a, *y = *(const es_tensor *const *)b;
    return x < y ? -1 : x > y;
}

static size_t padded(size_t bytes) { return (bytes + 255) / 256 * 256; }

/* Elements [first, first + count) of t as `dtype` (bf16 or fp32) into dst (host), through fp32
 * for every source dtype but the same one, so the bits are the CPU's conversions. */
static int convert_range(const es_tensor *t, size_t first, size_t count, es_dtype dtype, void *dst, float *scratch, es_error *err) {
    const size_t element = es_dtype_size(t->dtype);
    const char *from = (const char *)t->data + first * element;
    if (t->dtype == dtype) {
        memcpy(dst, from, count * element);
        return 0;
    }
    es_tensor part = {.name = t->name, .dtype = t->dtype, .ndim = 1, .shape = {(int64_t)count}, .data = from,
                      .nbytes = count * element, .file = t->file};
    float *f32 = dtype == ES_DT_F32 ? (float *)dst : scratch;
    int rc = es_tensor_to_f32(&part, f32, err);
    if (!rc && dtype == ES_DT_BF16) es_f32_to_bf16_array((uint16_t *)dst, f32, count);
    return rc;
}

static void free_host_cache(cuda_host_cache *cache) {
    if (!cache) return;
    if (cache->pinned) cudaFreeHost(cache->pinned);
    free(cache->tensors), free(cache->copies), free(cache->data), free(cache->nbytes), free(cache);
}

static int cuda_load_prepare(es_device *dev, const es_tensor *const *tensors, int n, es_dtype dtype) {
    cuda_device *cd = cuda_of(dev);
    if (cd->host_cache || n == 0) return 0;
    size_t bytes = 0;
    for (int i = 0; i < n; i++) bytes += padded(es_tensor_numel(tensors[i]) * es_dtype_size(dtype));
    cuda_host_cache *cache = (cuda_host_cache *)calloc(1, sizeof *cache);
    if (cache) cache->tensors = (const es_tensor **)malloc((size_t)n * sizeof *cache->tensors);
    if (cache && cache->tensors) cache->copies = (char **)malloc((size_t)n * sizeof *cache->copies);
    if (cache && cache->copies) cache->data = (const void **)malloc((size_t)n * sizeof *cache->data);
    if (cache && cache->data) cache->nbytes = (size_t *)malloc((size_t)n * sizeof *cache->nbytes);
    float *scratch = (float *)malloc(STAGING_BYTES);
    char size_text[32];
    es_format_size(bytes, size_text, sizeof size_text);
    if (!cache || !cache->nbytes || !scratch || cudaHostAlloc(&cache->pinned, bytes, cudaHostAllocPortable) != cudaSuccess) {
        cudaGetLastError();
        es_log("%s: cannot pin %s of host memory for the streamed layers: each load copies from the checkpoint's mapping "
               "(slower)", dev->name, size_text);
        if (cache) cache->pinned = NULL, free(cache->tensors), free(cache->copies), free(cache->data), free(cache->nbytes);
        free(cache), free(scratch);
        return 0;
    }
    memcpy(cache->tensors, tensors, (size_t)n * sizeof *tensors);
    qsort(cache->tensors, (size_t)n, sizeof *cache->tensors, by_address);
    cache->n = n, cache->bytes = bytes, cache->dtype = dtype;
    es_error err = {};
    int rc = 0;
    size_t at = 0;
    const size_t chunk = STAGING_BYTES / sizeof(float);
    for (int i = 0; !rc && i < n; i++) {
        const es_tensor *t = cache->tensors[i];
        cache->copies[i] = (char *)cache->pinned + at;
        cache->data[i] = t->data, cache->nbytes[i] = t->nbytes;
        const size_t numel = es_tensor_numel(t);
        for (size_t first = 0; !rc && first < numel; first += chunk) {
            const size_t count = numel - first < chunk ? numel - first : chunk;
            rc = convert_range(t, first, count, dtype, cache->copies[i] + first * es_dtype_size(dtype), scratch, &err);
        }
        at += padded(numel * es_dtype_size(dtype));
    }
    free(scratch);
    if (rc) {
        free_host_cache(cache);
        return es_device_fail(dev, rc, "%s", err.msg);
    }
    es_log("%s: the streamed layers (%s) are held in pinned host memory", dev->name, size_text);
    cd->host_cache = cache;
    return 0;
}


/* The stream that prepared the tensors is closing: no load reads the copies any more once the
 * copy stream is done. */
static void cuda_load_forget(es_device *dev) {
    cuda_device *cd = cuda_of(dev);
    cudaStreamSynchronize(cd->copy);
    free_host_cache(cd->host_cache);
    cd->host_cache = NULL;
}

/* The kept copy of t, found by the tensor's address and checked against its data (a tensor at
 * the same address in another store is another tensor). */
static const char *cached_copy(const cuda_host_cache *cache, const es_tensor *t, es_dtype dtype) {
    if (!cache || cache->dtype != dtype) return NULL;
    const es_tensor **found = (const es_tensor **)bsearch(&t, cache->tensors, (size_t)cache->n, sizeof *cache->tensors, by_address);
    if (!found) return NULL;
    const size_t i = (size_t)(found - cache->tensors);
    return cache->data[i] == t->data && cache->nbytes[i] == t->nbytes ? cache->copies[i] : NULL;
}

/* A tensor not kept in pinned memory: converted on the host through the staging buffer, which
 * waits for its previous copy before it is refilled. */
static int load_staged(es_device *dev, const es_tensor *t, void *dst, es_dtype dtype, float *scratch, es_error *error) {
    cuda_device *cd = cuda_of(dev);
    const size_t numel = es_tensor_numel(t), element = es_dtype_size(dtype), chunk = STAGING_BYTES / 2 / sizeof(float);
    if (!cd->loader->staging) CUDA_TRY(dev, "layer load", cudaHostAlloc(&cd->loader->staging, STAGING_BYTES, cudaHostAllocDefault));
    for (size_t first = 0; first < numel; first += chunk) {
        const size_t count = numel - first < chunk ? numel - first : chunk;
        CUDA_TRY(dev, "layer load", cudaStreamSynchronize(cd->copy)); /* the staging buffer is free again */
        if (convert_range(t, first, count, dtype, cd->loader->staging, scratch, error))
            return es_device_fail(dev, error->code, "%s", error->msg);
        CUDA_TRY(dev, "layer load", cudaMemcpyAsync((char *)dst + first * element, cd->loader->staging, count * element,
                                                    cudaMemcpyHostToDevice, cd->copy));
    }
    return 0;
}

/* Queues job on the copy stream after everything the compute stream holds now (the slot it
 * overwrites may still be read by ops queued before), and an event the compute stream waits for.
 * Tensors kept in pinned memory go as one DMA each; others through load_staged. */
static int cuda_load_begin(es_device *dev, es_load_job *job) {
    cuda_device *cd = cuda_of(dev);
    es_error_clear(&job->error);
    job->rc = 0, job->state = 1, job->impl = NULL;
    if (job->dtype != ES_DT_BF16 && job->dtype != ES_DT_F32)
        return es_device_fail(dev, ES_ERR_RUNTIME, "%s: weights in %s", dev->name, es_dtype_name(job->dtype));
    CUDA_TRY(dev, "layer load", cudaEventRecord(cd->compute_mark, cd->compute));
    CUDA_TRY(dev, "layer load", cudaStreamWaitEvent(cd->copy, cd->compute_mark, 0));
    const size_t element = es_dtype_size(job->dtype);
    float *scratch = NULL; // (STAGING_BYTES / 2 / 4) host, for conversions
    int rc = 0;
    for (int i = 0; !rc && i < job->n; i++) {
        const es_tensor *t = job->src[i];
        const char *pinned = cached_copy(cd->host_cache, t, job->dtype);
        if (pinned) {
            cudaError_t copied = cudaMemcpyAsync(job->dst[i], pinned, es_tensor_numel(t) * element, cudaMemcpyHostToDevice, cd->copy);
            if (copied != cudaSuccess) rc = cuda_fail(dev, "layer load", "cudaMemcpyAsync", copied);
            continue;
        }
        if (!scratch && !(scratch = (float *)malloc(STAGING_BYTES / 2))) rc = es_device_fail(dev, ES_ERR_RUNTIME, "%s: out of memory", dev->name);
        if (!rc) rc = load_staged(dev, t, job->dst[i], job->dtype, scratch, &job->error);
    }
    free(scratch);
    if (rc) return rc;
    cudaEvent_t done;
    CUDA_TRY(dev, "layer load", cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    cudaError_t recorded = cudaEventRecord(done, cd->copy);
    if (recorded != cudaSuccess) {
        cudaEventDestroy(done);
        return cuda_fail(dev, "layer load", "cudaEventRecord", recorded);
    }
    job->impl = (void *)done;
    return 0;
}

/* The compute stream waits for the copy; the host does not (cudaEventDestroy of an event still
 * pending releases it once it completes). */
static int cuda_load_wait(es_device *dev, es_load_job *job) {
    job->state = 0;
    if (!job->impl) return 0;
    cudaEvent_t done = (cudaEvent_t)job->impl;
    job->impl = NULL;
    cudaError_t rc = cudaStreamWaitEvent(cuda_stream(dev), done, 0);
    cudaEventDestroy(done);
    return rc == cudaSuccess ? 0 : cuda_fail(dev, "layer load", "cudaStreamWaitEvent", rc);
}

/* ---- copies to the host that overlap the compute --------------------------------------------------- */

static void *cuda_host_alloc(es_device *dev, size_t bytes) {
    void *ptr = NULL;
    (void)dev;
    if (cudaHostAlloc(&ptr, bytes, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return ptr;
}

static void cuda_host_free(es_device *dev, void *ptr) {
    cudaStreamSynchronize(cuda_of(dev)->download); /* no copy may still land there */
    cudaFreeHost(ptr);
}

/* src is copied aside on the device (a snapshot, at the device's bandwidth), and the snapshot goes
 * to the host on the download stream while the compute stream goes on. The snapshots' room is
 * reserved up front (es_device_download_reserve); when the next copy does not fit in what is left,
 * the copies from it are waited for (long done, as a rule) and it is used again from the start.
 * A copy larger than the whole room (or without one) waits for the compute stream instead. */
static int cuda_download_begin(es_device *dev, void *dst, const void *src, size_t bytes) {
    cuda_device *cd = cuda_of(dev);
    const size_t room = padded(bytes);
    if (room > cd->snapshot_bytes) {
        CUDA_TRY(dev, "download", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cd->compute));
        CUDA_TRY(dev, "download", cudaStreamSynchronize(cd->compute));
        return 0;
    }
    if (cd->snapshot_used + room > cd->snapshot_bytes) {
        CUDA_TRY(dev, "download", cudaStreamSynchronize(cd->download));
        cd->snapshot_used = 0;
    }
    char *snapshot = cd->snapshots + cd->snapshot_used;
    cd->snapshot_used += room;
    CUDA_TRY(dev, "download", cudaMemcpyAsync(snapshot, src, bytes, cudaMemcpyDeviceToDevice, cd->compute));
    CUDA_TRY(dev, "download", cudaEventRecord(cd->download_mark, cd->compute));
    CUDA_TRY(dev, "download", cudaStreamWaitEvent(cd->download, cd->download_mark, 0));
    CUDA_TRY(dev, "download", cudaMemcpyAsync(dst, snapshot, bytes, cudaMemcpyDeviceToHost, cd->download));
    return 0;
}

static int cuda_download_reserve(es_device *dev, size_t bytes) {
    cuda_device *cd = cuda_of(dev);
    const size_t room = padded(bytes);
    if (room <= cd->snapshot_bytes) return 0;
    CUDA_TRY(dev, "download", cudaStreamSynchronize(cd->download));
    char *grown = NULL;
    es_error err = {};
    if (es_device_alloc(dev, room, (void **)&grown, "copies of the stored layers on their way to the host", &err))
        return es_device_fail(dev, err.code, "%s", err.msg);
    if (cd->snapshots) es_device_free(dev, cd->snapshots, cd->snapshot_bytes);
    cd->snapshots = grown, cd->snapshot_bytes = room, cd->snapshot_used = 0;
    return 0;
}

static int cuda_download_wait(es_device *dev) {
    cuda_device *cd = cuda_of(dev);
    CUDA_TRY(dev, "download", cudaStreamSynchronize(cd->download));
    cd->snapshot_used = 0;
    return 0;
}

/* ---- the workspace ------------------------------------------------------------------------------ */

static size_t larger(size_t a, size_t b) { return a > b ? a : b; }

static size_t cuda_workspace_estimate(const es_device *dev, const es_workspace_plan *plan) {
    (void)dev;
    size_t bytes = cuda_matmul_workspace(plan);
    bytes = larger(bytes, cuda_attention_workspace(plan));
    bytes = larger(bytes, cuda_backward_workspace(plan));
    bytes = larger(bytes, cuda_attention_backward_workspace(plan));
    bytes = larger(bytes, cuda_loss_workspace(plan));
    return larger(bytes, cuda_fourier_workspace(plan));
}

/* ---- the device --------------------------------------------------------------------------------- */

static void cuda_close(es_device *dev) {
    cuda_device *cd = cuda_of(dev);
    if (!cd) return;
    cudaStreamSynchronize(cd->copy);
    cudaStreamSynchronize(cd->compute);
    cuda_group_leave();
    if (cd->download) cudaStreamSynchronize(cd->download);
    if (cd->snapshots) es_device_free(dev, cd->snapshots, cd->snapshot_bytes), cd->snapshots = NULL;
    if (cd->lt_workspace) cudaFree(cd->lt_workspace), dev->used -= cd->lt_workspace_bytes;
    if (cd->lt) cublasLtDestroy(cd->lt);
    if (cd->pinned) cudaFreeHost(cd->pinned);
    if (cd->embed_staging) cudaFreeHost(cd->embed_staging);
    free_host_cache(cd->host_cache);
    if (cd->loader) {
        if (cd->loader->staging) cudaFreeHost(cd->loader->staging);
        free(cd->loader);
    }
    if (cd->compute_mark) cudaEventDestroy(cd->compute_mark);
    if (cd->copy) cudaStreamDestroy(cd->copy);
    if (cd->download) cudaStreamDestroy(cd->download);
    if (cd->download_mark) cudaEventDestroy(cd->download_mark);
    if (cd->compute) cudaStreamDestroy(cd->compute);
    free(cd);
    dev->impl = NULL;
}

static const es_backend cuda_backend = {
    .name = "cuda",
    .close = cuda_close,
    .alloc = cuda_alloc,
    .free = cuda_release,
    .upload = cuda_upload,
    .download = cuda_download,
    .zero = cuda_zero,
    .sync = cuda_sync,
    .load_begin = cuda_load_begin,
    .load_wait = cuda_load_wait,
    .load_prepare = cuda_load_prepare,
    .load_forget = cuda_load_forget,
    .workspace_estimate = cuda_workspace_estimate,
    .host_alloc = cuda_host_alloc,
    .host_free = cuda_host_free,
    .download_begin = cuda_download_begin,
    .download_wait = cuda_download_wait,
    .download_reserve = cuda_download_reserve,
    .group_id = cuda_group_id,
    .group_join = cuda_group_join,
    .group_allreduce = cuda_group_allreduce,
    .group_start = cuda_group_start,
    .group_wait = cuda_group_wait,

    .embedding_forward = cuda_embedding_forward,
    .rmsnorm_forward = cuda_rmsnorm_forward,
    .matmul_forward = cuda_matmul_forward,
    .matmul_forward_group = cuda_matmul_forward_group,
    .matmul_forward_residual = cuda_matmul_forward_residual,
    .rope_forward = cuda_rope_forward,
    .attention_forward = cuda_attention_forward,
    .attention_cached_forward = cuda_attention_cached_forward,
    .swiglu_forward = cuda_swiglu_forward,
    .swiglu_down_forward = cuda_swiglu_down_forward,
    .add = cuda_add,
    .embedding_backward = cuda_embedding_backward,
    .rmsnorm_backward = cuda_rmsnorm_backward,
    .matmul_backward = cuda_matmul_backward,
    .matmul_backward_group = cuda_matmul_backward_group,
    .rope_backward = cuda_rope_backward,
    .attention_backward = cuda_attention_backward,
    .swiglu_backward = cuda_swiglu_backward,
    .swiglu_down_backward = cuda_swiglu_down_backward,
    .latent_mse = cuda_latent_mse,
    .cross_entropy = cuda_cross_entropy,
    .adamw_update = cuda_adamw_update,
    .round_weights = cuda_round_weights,
    .sum_squares = cuda_sum_squares,
    .scale = cuda_scale,

    .round_precision = cuda_round_precision,
    .standardise = cuda_standardise,
    .fourier_features = cuda_fourier_features,
};

extern "C" int es_cuda_attention_forward_plain(es_device *dev, float *out, const float *q, const float *k, const float *v,
                                               const int32_t *seq_start, int n_seqs, int H, int KV, int hd) {
    return cuda_attention_forward_plain(dev, out, q, k, v, seq_start, n_seqs, H, KV, hd);
}

extern "C" int es_cuda_attention_backward_plain(es_device *dev, float *dq, float *dk, float *dv, const float *dout, const float *q,
                                                const float *k, const float *v, const int32_t *seq_start, int n_seqs, int H, int KV,
                                                int hd) {
    return cuda_attention_backward_plain(dev, dq, dk, dv, dout, q, k, v, seq_start, n_seqs, H, KV, hd);
}

/* Never launched: whether this build holds machine code for the GPU is asked of it at open. */
__global__ void probe_kernel(int *unused) {
    if (unused) *unused = 0;
}

/* An open that fails part way leaves the device closable: every handle starts NULL. */
static int open_device(es_device *dev, cuda_device *cd, const es_device_options *options, es_error *err) {
    int count = 0;
    cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess || count == 0)
        return es_fail(err, ES_ERR_RUNTIME, "--device cuda: no CUDA device is usable here (%s); use --device cpu",
                       rc != cudaSuccess ? cudaGetErrorString(rc) : "none found");
    if (options->ordinal >= count)
        return es_fail(err, ES_ERR_RUNTIME, "--device cuda:%d: this machine has %d CUDA device%s (cuda:0..%d)", options->ordinal,
                       count, count == 1 ? "" : "s", count - 1);
#define OPEN_TRY(call)                                                                                              \
    do {                                                                                                            \
        cudaError_t open_rc_ = (call);                                                                              \
        if (open_rc_ != cudaSuccess)                                                                                \
            return es_fail(err, ES_ERR_RUNTIME, "cuda:%d: %s failed: %s", options->ordinal, #call, cudaGetErrorString(open_rc_)); \
    } while (0)
    cd->ordinal = options->ordinal;
    OPEN_TRY(cudaSetDevice(cd->ordinal));
    OPEN_TRY(cudaGetDeviceProperties(&cd->prop, cd->ordinal));
    cudaFuncAttributes probe;
    if (cudaFuncGetAttributes(&probe, probe_kernel) != cudaSuccess) {
        cudaGetLastError();
        return es_fail(err, ES_ERR_RUNTIME, "cuda:%d: %s (sm_%d%d): this build has kernels for sm_90a, sm_100a and sm_120 only "
                       "(rebuild with CUDA_ARCHS for this GPU, or use --device cpu)", cd->ordinal, cd->prop.name, cd->prop.major,
                       cd->prop.minor);
    }
    OPEN_TRY(cudaStreamCreateWithFlags(&cd->compute, cudaStreamNonBlocking));
    OPEN_TRY(cudaStreamCreateWithFlags(&cd->copy, cudaStreamNonBlocking));
    OPEN_TRY(cudaEventCreateWithFlags(&cd->compute_mark, cudaEventDisableTiming));
    OPEN_TRY(cudaStreamCreateWithFlags(&cd->download, cudaStreamNonBlocking));
    OPEN_TRY(cudaEventCreateWithFlags(&cd->download_mark, cudaEventDisableTiming));
    size_t free_bytes = 0, total_bytes = 0;
    OPEN_TRY(cudaMemGetInfo(&free_bytes, &total_bytes));
    if (cublasLtCreate(&cd->lt) != CUBLAS_STATUS_SUCCESS) return es_fail(err, ES_ERR_RUNTIME, "cuda:%d: cublasLtCreate failed", cd->ordinal);
    if (!(cd->loader = (cuda_loader *)calloc(1, sizeof *cd->loader))) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    dev->max_memory = options->max_memory ? options->max_memory : free_bytes / 10 * 9;
    /* cuBLASLt's scratch counts against the budget like everything else the device holds */
    cd->lt_workspace_bytes = (size_t)32 << 20;
    if (cd->lt_workspace_bytes > dev->max_memory)
        return es_fail(err, ES_ERR_RUNTIME, "--max-memory: too small for the CUDA backend's own 32 MiB");
    OPEN_TRY(cudaMalloc(&cd->lt_workspace, cd->lt_workspace_bytes));
    dev->used += cd->lt_workspace_bytes, dev->peak = dev->used;
    /* where small results land (losses, a first bad row, sequence tables); grown when needed */
    cd->pinned_bytes = (size_t)1 << 20;
    OPEN_TRY(cudaHostAlloc(&cd->pinned, cd->pinned_bytes, cudaHostAllocDefault));
#undef OPEN_TRY
    char total_text[32];
    snprintf(dev->where, sizeof dev->where, "%04x:%02x:%02x", cd->prop.pciDomainID, cd->prop.pciBusID, cd->prop.pciDeviceID);
    snprintf(dev->name, sizeof dev->name, "cuda:%d (%s, sm_%d%d, %s)", cd->ordinal, cd->prop.name, cd->prop.major, cd->prop.minor,
             es_format_size(total_bytes, total_text, sizeof total_text));
    return ES_OK;
}

int es_cuda_open(es_device *dev, const es_device_options *options, es_error *err) {
    cuda_device *cd = (cuda_device *)calloc(1, sizeof *cd);
    if (!cd) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    dev->impl = cd;
    dev->ops = &cuda_backend;
    dev->host_memory = 0;
    dev->weight_dtype = ES_DT_BF16;
    /* Products pick their algorithm by (N, K) only and never split K (gemm.cu), attention and the
     * row-wise ops work per token: a row does not depend on its batch. tests/gpu/ checks it
     * (harness_check_rows); until that has run on a GPU, the log says it depends. */
    dev->batch_independent = 0;
    int rc = open_device(dev, cd, options, err);
    if (rc) {
        cuda_close(dev);
        dev->ops = NULL;
    }
    return rc;
}
