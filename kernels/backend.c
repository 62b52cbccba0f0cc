/* The device: options, the budget, memory and the workspace (kernels/backend.h). */
#include "backend.h"

#include <ctype.h>
#include <dlfcn.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend_impl.h"
#include "log.h"

/* ---- options ---------------------------------------------------------------------------- */

int es_device_parse_name(const char *text, es_device_kind *kind, int *ordinal) {
    *ordinal = 0;
    if (!strcmp(text, "cpu")) {
        *kind = ES_DEVICE_CPU;
        return 0;
    }
    if (strncmp(text, "cuda", 4)) return -1;
    *kind = ES_DEVICE_CUDA;
    if (!text[4]) return 0;
    if (text[4] != ':' || !isdigit((unsigned char)text[5])) return -1;
    char *end;
    long n = strtol(text + 5, &end, 10);
    if (*end || n < 0 || n > 1023) return -1;
    *ordinal = (int)n;
    return 0;
}

int es_parse_size(const char *text, size_t *bytes) {
    *bytes = 0;
    if (!strcmp(text, "auto")) return 0;
    char *end;
    double value = strtod(text, &end);
    if (end == text || !isfinite(value) || value < 0) return -1;
    double unit = 1;
    switch (toupper((unsigned char)*end)) {
    case 'K': unit = 1024.0, end++; break;
    case 'M': unit = 1024.0 * 1024, end++; break;
    case 'G': unit = 1024.0 * 1024 * 1024, end++; break;
    case 'T': unit = 1024.0 * 1024 * 1024 * 1024, end++; break;
    default: break;
    }
    if (unit > 1 && (!strcmp(end, "iB") || !strcmp(end, "B") || !strcmp(end, "ib") || !strcmp(end, "b"))) end += strlen(end);
    else if (unit == 1 && (!strcmp(end, "B") || !strcmp(end, "b"))) end++;
    if (*end) return -1;
    double total = value * unit;
    if (total > 1e18) return -1;
    *bytes = (size_t)total;
    return 0;
}

const char *es_format_size(size_t bytes, char *buf, size_t size) {
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double value = (double)bytes;
    int u = 0;
    while (value >= 1024 && u < 4) value /= 1024, u++;
    if (u == 0) snprintf(buf, size, "%zu B", bytes);
    else snprintf(buf, size, "%.2f %s", value, units[u]);
    return buf;
}

int es_device_options_from_config(const es_config *cfg, es_device_options *out, es_error *err) {
    memset(out, 0, sizeof *out);
    const char *device = es_config_str(cfg, "device"), *memory = es_config_str(cfg, "max-memory");
    if (es_device_parse_name(device, &out->kind, &out->ordinal))
        return es_fail(err, ES_ERR_USAGE, "--device %s: expected cpu, cuda or cuda:N", device);
    int64_t threads = es_config_int(cfg, "threads");
    if (threads < 0 || threads > 4096) return es_fail(err, ES_ERR_USAGE, "--threads %lld: expected 0..4096", (long long)threads);
    out->threads = (int)threads;
    if (es_parse_size(memory, &out->max_memory) || (!out->max_memory && strcmp(memory, "auto")))
        return es_fail(err, ES_ERR_USAGE, "--max-memory %s: expected a size such as 8G, 512M or auto", memory);
    return ES_OK;
}

/* ---- the device -------------------------------------------------------------------------- */

#ifdef ES_HAVE_CUDA
/* The CUDA backend is a shared library loaded only when a program asks for it (Makefile): beside
 * the program (build/), one folder up (build/gpu/, build/tests/), or in ../lib/essence (installed);
 * $ESSENCE_CUDA_BACKEND names another. */
static int open_cuda(es_device *dev, const es_device_options *options, es_error *err) {
    static const char *const places[] = {"%s/libessence-cuda.so", "%s/../libessence-cuda.so", "%s/../lib/essence/libessence-cuda.so"};
    char exe[PATH_MAX], path[PATH_MAX + 64], tried[3 * (PATH_MAX + 64)] = "";
    const char *chosen = getenv("ESSENCE_CUDA_BACKEND");
    void *handle = NULL;
    if (chosen && *chosen) {
        handle = dlopen(chosen, RTLD_NOW | RTLD_LOCAL);
        if (!handle)
            return es_fail(err, ES_ERR_RUNTIME, "--device cuda: cannot load the CUDA backend $ESSENCE_CUDA_BACKEND=%s: %s", chosen,
                           dlerror());
    } else {
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        exe[n > 0 ? n : 0] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) *slash = '\0';
        const char *why = "";
        for (size_t i = 0; !handle && i < sizeof places / sizeof *places; i++) {
            snprintf(path, sizeof path, places[i], exe);
            if (access(path, F_OK)) continue;
            if (!(handle = dlopen(path, RTLD_NOW | RTLD_LOCAL))) why = dlerror();
            snprintf(tried + strlen(tried), sizeof tried - strlen(tried), "%s%s", *tried ? ", " : "", path);
        }
        if (!handle)
            return es_fail(err, ES_ERR_RUNTIME, "--device cuda: cannot load the CUDA backend (libessence-cuda.so %s%s%s); use --device cpu",
                           *tried ? "at " : "not found beside the program", tried, *why ? why : "");
    }
    int (*open_fn)(es_device *, const es_device_options *, es_error *) = NULL;
    *(void **)&open_fn = dlsym(handle, "es_cuda_open");
    if (!open_fn) return es_fail(err, ES_ERR_RUNTIME, "--device cuda: the CUDA backend has no es_cuda_open: %s", dlerror());
    return open_fn(dev, options, err); /* the library stays loaded for the process */
}
#endif

int es_device_open(es_device **out, const es_device_options *options, es_error *err) {
    *out = NULL;
    es_device *dev = calloc(1, sizeof *dev);
    if (!dev) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    dev->kind = options->kind;
    int rc;
    if (options->kind == ES_DEVICE_CPU) {
        rc = es_cpu_open(dev, options, err);
    } else {
#ifdef ES_HAVE_CUDA
        rc = open_cuda(dev, options, err);
#else
        rc = es_fail(err, ES_ERR_RUNTIME, "--device cuda: this build has no CUDA backend (nvcc was not found when it was built); "
                                          "use --device cpu");
#endif
    }
    if (rc) {
        free(dev);
        return rc;
    }
    *out = dev;
    return ES_OK;
}

void es_device_close(es_device *dev) {
    if (!dev) return;
    if (dev->workspace) dev->ops->free(dev, dev->workspace);
    dev->ops->close(dev);
    free(dev);
}

int es_device_alloc(es_device *dev, size_t bytes, void **ptr, const char *what, es_error *err) {
    *ptr = NULL;
    char need[32], budget[32], held[32];
    if (bytes > dev->max_memory || dev->used > dev->max_memory - bytes)
        return es_fail(err, ES_ERR_RUNTIME, "%s: %s for %s would pass --max-memory %s (%s held already)", dev->name,
                       es_format_size(bytes, need, sizeof need), what, es_format_size(dev->max_memory, budget, sizeof budget),
                       es_format_size(dev->used, held, sizeof held));
    void *p = dev->ops->alloc(dev, bytes ? bytes : 1);
    if (!p)
        return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory: %s for %s (%s held already)", dev->name,
                       es_format_size(bytes, need, sizeof need), what, es_format_size(dev->used, held, sizeof held));
    dev->used += bytes;
    if (dev->used > dev->peak) dev->peak = dev->used;
    *ptr = p;
    return ES_OK;
}

void es_device_free(es_device *dev, void *ptr, size_t bytes) {
    if (!ptr) return;
    dev->ops->free(dev, ptr);
    dev->used -= bytes;
}

/* The backend's entry returns nonzero with the message in dev->error. */
#define PASS_THROUGH(call) return (call) ? es_device_take_error(dev, err) : ES_OK

int es_device_upload(es_device *dev, void *dst, const void *src, size_t bytes, es_error *err) {
    PASS_THROUGH(bytes && dev->ops->upload(dev, dst, src, bytes));
}
int es_device_has_group(const es_device *dev) { return dev->ops->group_join != NULL; }
int es_device_group_id(es_device *dev, unsigned char id[ES_GROUP_ID_BYTES], es_error *err) {
    if (!dev->ops->group_id) return es_fail(err, ES_ERR_RUNTIME, "%s: no collectives on this device", dev->name);
    PASS_THROUGH(dev->ops->group_id(dev, id));
}
int es_device_group_join(es_device *dev, const unsigned char id[ES_GROUP_ID_BYTES], int rank, int world, es_error *err) {
    if (!dev->ops->group_join) return es_fail(err, ES_ERR_RUNTIME, "%s: no collectives on this device", dev->name);
    PASS_THROUGH(dev->ops->group_join(dev, id, rank, world));
}
int es_device_group_allreduce(es_device *dev, void *data, size_t n, es_group_op op, es_error *err) {
    if (!dev->ops->group_allreduce) return es_fail(err, ES_ERR_RUNTIME, "%s: no collectives on this device", dev->name);
    PASS_THROUGH(n && dev->ops->group_allreduce(dev, data, n, op));
}
int es_device_group_start(es_device *dev, es_group_call call, float *data, size_t n, int root, es_error *err) {
    if (!dev->ops->group_start) return es_fail(err, ES_ERR_RUNTIME, "%s: no collectives on this device", dev->name);
    PASS_THROUGH(n && dev->ops->group_start(dev, call, data, n, root));
}
int es_device_group_wait(es_device *dev, es_error *err) {
    if (!dev->ops->group_wait) return es_fail(err, ES_ERR_RUNTIME, "%s: no collectives on this device", dev->name);
    PASS_THROUGH(dev->ops->group_wait(dev));
}
int es_device_download(es_device *dev, void *dst, const void *src, size_t bytes, es_error *err) {
    PASS_THROUGH(bytes && dev->ops->download(dev, dst, src, bytes));
}
int es_device_zero(es_device *dev, void *ptr, size_t bytes, es_error *err) {
    PASS_THROUGH(bytes && dev->ops->zero(dev, ptr, bytes));
}
int es_device_sync(es_device *dev, es_error *err) { PASS_THROUGH(dev->ops->sync(dev)); }
int es_device_load_begin(es_device *dev, es_load_job *job, es_error *err) { PASS_THROUGH(dev->ops->load_begin(dev, job)); }
int es_device_load_wait(es_device *dev, es_load_job *job, es_error *err) { PASS_THROUGH(dev->ops->load_wait(dev, job)); }
void es_device_load_forget(es_device *dev) {
    if (dev->ops->load_forget) dev->ops->load_forget(dev);
}

void *es_device_host_alloc(es_device *dev, size_t bytes) {
    if (dev->ops->host_alloc) return dev->ops->host_alloc(dev, bytes ? bytes : 1);
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 1) ? NULL : p;
}
void es_device_host_free(es_device *dev, void *ptr) {
    if (!ptr) return;
    if (dev->ops->host_free) dev->ops->host_free(dev, ptr);
    else free(ptr);
}
int es_device_download_begin(es_device *dev, void *dst, const void *src, size_t bytes, es_error *err) {
    if (!dev->ops->download_begin) return es_device_download(dev, dst, src, bytes, err);
    PASS_THROUGH(bytes && dev->ops->download_begin(dev, dst, src, bytes));
}
int es_device_download_wait(es_device *dev, es_error *err) { PASS_THROUGH(dev->ops->download_wait && dev->ops->download_wait(dev)); }
int es_device_download_reserve(es_device *dev, size_t bytes, es_error *err) {
    PASS_THROUGH(dev->ops->download_reserve && dev->ops->download_reserve(dev, bytes));
}

int es_device_load_prepare(es_device *dev, const es_tensor *const *tensors, int n, es_dtype dtype, es_error *err) {
    PASS_THROUGH(dev->ops->load_prepare && dev->ops->load_prepare(dev, tensors, n, dtype));
}

int es_device_upload_weights(es_device *dev, void *dst, const float *src, size_t n, es_error *err) {
    if (dev->weight_dtype == ES_DT_F32) return es_device_upload(dev, dst, src, n * sizeof *src, err);
    if (dev->weight_dtype != ES_DT_BF16) return es_fail(err, ES_ERR_RUNTIME, "%s: weights in %s", dev->name, es_dtype_name(dev->weight_dtype));
    enum { CHUNK = 1 << 20 }; /* values per staging buffer */
    uint16_t *staging = malloc((n < CHUNK ? n : CHUNK) * sizeof *staging + 1);
    if (!staging) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int rc = ES_OK;
    for (size_t at = 0; !rc && at < n; at += CHUNK) {
        const size_t part = n - at < CHUNK ? n - at : CHUNK;
        es_f32_to_bf16_array(staging, src + at, part);
        rc = es_device_upload(dev, (uint16_t *)dst + at, staging, part * sizeof *staging, err);
    }
    free(staging);
    return rc;
}

/* ---- the workspace ----------------------------------------------------------------------- */

/* The workspace is replaced, not realloc'd: its content does not outlive an op. */
static int grow_workspace(es_device *dev, size_t bytes, es_error *err) {
    if (bytes <= dev->workspace_bytes) return ES_OK;
    if (dev->workspace) es_device_free(dev, dev->workspace, dev->workspace_bytes);
    dev->workspace = NULL, dev->workspace_bytes = 0;
    int rc = es_device_alloc(dev, bytes, &dev->workspace, "the ops' workspace", err);
    if (rc) return rc;
    dev->workspace_bytes = bytes;
    dev->workspace_grows++;
    return ES_OK;
}

int es_device_reserve(es_device *dev, const es_workspace_plan *plan, es_error *err) {
    return grow_workspace(dev, dev->ops->workspace_estimate(dev, plan), err);
}

void *es_device_scratch(es_device *dev, size_t bytes) {
    es_error ignored = {0};
    if (grow_workspace(dev, bytes, &ignored)) {
        es_device_fail(dev, ES_ERR_RUNTIME, "%s", ignored.msg);
        return NULL;
    }
    return dev->workspace;
}

/* ---- errors -------------------------------------------------------------------------------- */

int es_device_fail(es_device *dev, int code, const char *fmt, ...) {
    if (dev->error.code) return dev->error.code; /* the first error wins */
    va_list args;
    va_start(args, fmt);
    vsnprintf(dev->error.msg, sizeof dev->error.msg, fmt, args);
    va_end(args);
    dev->error.code = code;
    return code;
}

int es_device_take_error(es_device *dev, es_error *err) {
    int code = dev->error.code ? dev->error.code : ES_ERR_RUNTIME;
    if (dev->error.code) es_fail(err, code, "%s", dev->error.msg);
    else es_fail(err, code, "%s: an op failed", dev->name);
    es_error_clear(&dev->error);
    return code;
}

void es_device_log_peak(const es_device *dev) {
    char peak[32], budget[32];
    es_log("device: %s held at most (budget %s)", es_format_size(dev->peak, peak, sizeof peak),
           es_format_size(dev->max_memory, budget, sizeof budget));
}

void es_device_log(const es_device *dev) {
    char budget[32];
    es_log("device: %s, budget %s", dev->name, es_format_size(dev->max_memory, budget, sizeof budget));
    if (!dev->batch_independent)
        es_log("note: on %s a token's results depend on the batching (the same bits for any --threads, not for "
               "another --batch-tokens or --shard; docs/engine.md)", dev->name);
}
