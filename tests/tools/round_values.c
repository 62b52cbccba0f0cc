/* Test tool: the es_round_precision op over float32 values, on a device, for the check against
 * ml_dtypes (tests/python/test_precision_reference.py).
 *   round_values PRECISION DEVICE < IN.f32 > OUT.f32
 * PRECISION: bf16, tf32 or fp8 (DESIGN.md's --precision names); DEVICE: cpu or cuda[:N]. IN and OUT
 * are little-endian float32, the same count. */
#include <stdio.h>
#include <stdlib.h>

#include "backend.h"
#include "log.h"
#include "ops.h"
#include "precision.h"

int main(int argc, char **argv) {
    es_set_program("round_values");
    es_precision precision;
    es_device_options options = {.threads = 1};
    if (argc != 3 || precision_parse(argv[1], &precision) || es_device_parse_name(argv[2], &options.kind, &options.ordinal)) {
        fprintf(stderr, "usage: round_values bf16|tf32|fp8 cpu|cuda[:N] < IN.f32 > OUT.f32\n");
        return ES_ERR_USAGE;
    }
    size_t n = 0, room = 1 << 16;
    float *values = malloc(room * sizeof *values);
    for (size_t got; values && (got = fread(values + n, sizeof *values, room - n, stdin)) > 0;) {
        n += got;
        if (n == room) values = realloc(values, (room *= 2) * sizeof *values);
    }
    if (!values) return ES_ERR_RUNTIME;
    es_error err = {0};
    es_device *dev = NULL;
    float *on_device = NULL;
    int rc = es_device_open(&dev, &options, &err);
    if (!rc) rc = es_device_alloc(dev, n * sizeof *values + 1, (void **)&on_device, "the values", &err);
    if (!rc) rc = es_device_upload(dev, on_device, values, n * sizeof *values, &err);
    if (!rc && es_round_precision(dev, on_device, n, precision)) rc = es_device_take_error(dev, &err);
    if (!rc) rc = es_device_download(dev, values, on_device, n * sizeof *values, &err);
    if (!rc && fwrite(values, sizeof *values, n, stdout) != n) rc = es_fail(&err, ES_ERR_RUNTIME, "stdout: write failed");
    if (rc) fprintf(stderr, "round_values: %s\n", err.msg);
    if (dev) es_device_free(dev, on_device, n * sizeof *values + 1);
    es_device_close(dev);
    free(values);
    return rc;
}
