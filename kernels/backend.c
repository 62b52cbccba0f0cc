/* The device: options, the budget, memory and the workspace (kernels/backend.h). */
#include "backend.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
        rc = es_fail(err, ES_ERR_USAGE, "--device cuda: the CUDA backend's ops are not written yet (this build has its bf16 "
                                        "conversion kernels only); use --device cpu");
#else
        rc = es_fail(err, ES_ERR_USAGE, "--device cuda: this build has no CUDA backend (nvcc was not found when it was built)");
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
int es_device_download(es_device *dev, void *dst, const void *src, size_t bytes, es_error *err) {
    PASS_THROUGH(bytes && dev->ops->download(dev, dst, src, bytes));
}
int es_device_zero(es_device *dev, void *ptr, size_t bytes, es_error *err) {
    PASS_THROUGH(bytes && dev->ops->zero(dev, ptr, bytes));
}
int es_device_sync(es_device *dev, es_error *err) { PASS_THROUGH(dev->ops->sync(dev)); }
int es_device_load_begin(es_device *dev, es_load_job *job, es_error *err) { PASS_THROUGH(dev->ops->load_begin(dev, job)); }
int es_device_load_wait(es_device *dev, es_load_job *job, es_error *err) { PASS_THROUGH(dev->ops->load_wait(dev, job)); }

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
