/* What the forward pass's golden checks share (tests/unit/test_forward.c on the CPU,
 * tests/gpu/test_forward_cuda.c on CUDA): reading a golden tensor of
 * golden_hidden.safetensors, and the measure they are held to. */
#ifndef ES_TESTS_GOLDENS_H
#define ES_TESTS_GOLDENS_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

/* max |ours − golden| / max |golden| (a NaN anywhere: infinity). */
static inline double golden_relative_error(const float *ours, const float *golden, size_t n) {
    double max_diff = 0, max_ref = 0;
    for (size_t i = 0; i < n; i++) {
        double diff = fabs((double)ours[i] - golden[i]);
        if (diff > max_diff || isnan(diff)) max_diff = isnan(diff) ? INFINITY : diff;
        if (fabs(golden[i]) > max_ref) max_ref = fabs(golden[i]);
    }
    return max_ref > 0 ? max_diff / max_ref : max_diff;
}

/* The golden "SEQ/WHAT" as floats (int64 ids converted), malloc'd, *n its size; NULL when absent. */
static inline float *golden_f32(const es_safetensors *goldens, const char *seq, const char *what, size_t *n) {
    char name[64];
    snprintf(name, sizeof name, "%s/%s", seq, what);
    const es_tensor *t = es_safetensors_find(goldens, name);
    if (!t) return NULL;
    *n = es_tensor_numel(t);
    float *values = malloc(*n * sizeof *values + 1);
    if (!values) return NULL;
    if (t->dtype == ES_DT_I64) {
        for (size_t i = 0; i < *n; i++) {
            int64_t v;
            memcpy(&v, (const char *)t->data + i * 8, 8);
            values[i] = (float)v;
        }
    } else {
        es_tensor_to_f32(t, values, NULL);
    }
    return values;
}

#endif
