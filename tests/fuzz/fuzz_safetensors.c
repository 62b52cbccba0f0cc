/* libFuzzer target: the safetensors header parser. Whatever the bytes, parsing must not
 * crash or read outside the input, and every view of a file it accepts must lie inside
 * the input: reading each tensor whole (bytes, and floats converted in bounded blocks)
 * lets AddressSanitizer prove it. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

#define BLOCK 4096 /* elements converted at a time */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* A private copy sized exactly, so a read past the end is caught, not hidden by slack. */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    es_safetensors *st = NULL;
    es_error err = {0};
    if (es_safetensors_parse(buf, size, "fuzz.safetensors", &st, &err) == ES_OK) {
        static float scratch[BLOCK];
        volatile unsigned sum = 0;
        for (size_t i = 0; i < st->n_tensors; i++) {
            const es_tensor *t = &st->tensors[i];
            const uint8_t *p = t->data;
            for (size_t b = 0; b < t->nbytes; b++) sum += p[b];
            if (es_tensor_numel(t) * es_dtype_size(t->dtype) != t->nbytes) abort();
            if (es_safetensors_find(st, t->name) != t) abort();
            if (!es_dtype_is_float(t->dtype)) {
                es_error e2 = {0};
                if (es_tensor_to_f32(t, scratch, &e2) != ES_ERR_DATA) abort();
                continue;
            }
            size_t n = es_tensor_numel(t), es = es_dtype_size(t->dtype);
            for (size_t k = 0; k < n; k += BLOCK) {
                es_tensor part = *t;
                size_t m = n - k < BLOCK ? n - k : BLOCK;
                part.ndim = 1;
                part.shape[0] = (int64_t)m;
                part.data = p + k * es;
                part.nbytes = m * es;
                if (es_tensor_to_f32(&part, scratch, &err) != ES_OK) abort();
            }
        }
        for (size_t i = 0; i < st->n_meta; i++)
            if (es_safetensors_meta(st, st->meta[i].key) == NULL) abort();
        (void)sum;
        es_safetensors_close(st);
    } else if (err.code != ES_ERR_DATA || strncmp(err.msg, "fuzz.safetensors: ", 18) != 0) {
        abort(); /* every rejection is a data error naming the file */
    }
    free(buf);
    return 0;
}
