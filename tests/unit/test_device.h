/* A CPU device for the unit tests. Its memory is host memory, so the tests hand its ops host
 * arrays (the op harness, tests/unit/test_ops.c, goes through es_device_alloc as any backend
 * needs). */
#ifndef ES_TEST_DEVICE_H
#define ES_TEST_DEVICE_H

#include <stdio.h>
#include <stdlib.h>

#include "backend.h"

static inline es_device *test_cpu_device(int threads) {
    es_device_options options = {.kind = ES_DEVICE_CPU, .threads = threads};
    es_device *dev;
    es_error err = {0};
    if (es_device_open(&dev, &options, &err)) {
        printf("FAIL cannot open a cpu device: %s\n", err.msg);
        exit(1);
    }
    return dev;
}

#endif
