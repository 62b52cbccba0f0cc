/* The training state on the host (align/state.h). */
#include "state.h"

#include <stdlib.h>
#include <string.h>

static int is_state(int k) { return k != HOST_GRADS && k != HOST_HEAD_GRADS; }

int host_state_init(host_state *s, es_device *dev, float *const device[HOST_ARRAYS], const size_t n[HOST_ARRAYS],
                         unsigned host_only, es_error *err) {
    memset(s, 0, sizeof *s);
    s->dev = dev;
    s->copies = !dev->host_memory;
    for (int k = 0; k < HOST_ARRAYS; k++) {
        host_array *a = &s->arrays[k];
        a->device = device[k], a->n = device[k] ? n[k] : 0;
        a->host_only = !!(host_only & (1u << k));
        if (!s->copies || a->host_only) a->host = a->device;
        else if (a->n && is_state(k) && !(a->host = malloc(a->n * sizeof *a->host))) {
            host_state_free(s);
            return es_fail(err, ES_ERR_RUNTIME, "out of host memory for a copy of the training state (%zu floats)", a->n);
        }
    }
    return ES_OK;
}

void host_state_free(host_state *s) {
    if (s->copies)
        for (int k = 0; k < HOST_ARRAYS; k++)
            if (!s->arrays[k].host_only) free(s->arrays[k].host);
    memset(s, 0, sizeof *s);
}

/* The array holding device pointer p, or NULL. */
static const host_array *array_of(const host_state *s, const float *p) {
    for (int k = 0; k < HOST_ARRAYS; k++) {
        const host_array *a = &s->arrays[k];
        if (a->n && p >= a->device && p < a->device + a->n) return a;
    }
    return NULL;
}

float *host_state_at(const host_state *s, const float *device) {
    const host_array *a = array_of(s, device);
    if (!a || !a->host) return NULL;
    return a->host + (device - a->device);
}

static int move_state(host_state *s, int to_host, es_error *err) {
    if (!s->copies) return ES_OK;
    for (int k = 0; k < HOST_ARRAYS; k++) {
        host_array *a = &s->arrays[k];
        if (!a->n || !is_state(k) || a->host_only) continue;
        const size_t bytes = a->n * sizeof *a->host;
        const int rc = to_host ? es_device_download(s->dev, a->host, a->device, bytes, err)
                               : es_device_upload(s->dev, a->device, a->host, bytes, err);
        if (rc) return rc;
    }
    return ES_OK;
}

int host_state_pull(host_state *s, es_error *err) { return move_state(s, 1, err); }
int host_state_push(host_state *s, es_error *err) { return move_state(s, 0, err); }

/* The host copy of a gradient array, allocated on first use. */
static float *grads_on_host(host_state *s, const float *grads, size_t n, es_error *err) {
    host_array *a = (host_array *)array_of(s, grads);
    if (!a || grads + n > a->device + a->n) {
        es_fail(err, ES_ERR_RUNTIME, "gradients outside the training state (an internal error)");
        return NULL;
    }
    if (!a->host && !(a->host = malloc(a->n * sizeof *a->host))) {
        es_fail(err, ES_ERR_RUNTIME, "out of host memory for a copy of the gradients (%zu floats)", a->n);
        return NULL;
    }
    return a->host + (grads - a->device);
}

int host_state_pull_grads(host_state *s, const float *grads, size_t n, es_error *err) {
    if (!s->copies) return ES_OK;
    float *host = grads_on_host(s, grads, n, err);
    return host ? es_device_download(s->dev, host, grads, n * sizeof *host, err) : err->code;
}
