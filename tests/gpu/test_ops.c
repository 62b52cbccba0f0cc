/* GPU check (tests/gpu/run.sh, on a GPU machine): every op of the CUDA backend over the op
 * harness's grid (tests/ops/, docs/ops-harness.md), against the double reference and against the
 * CPU backend, with the row-independence check on CUDA, then against the reference again with every
 * buffer off its allocation's 16-byte alignment (harness_options.offset). Prints "SKIP ops_cuda: <why>" when no
 * CUDA device opens (no GPU, no driver, or no CUDA backend library). Training ops the CUDA table
 * leaves NULL print SKIP lines (issue 14).
 *
 * $ESSENCE_OPS=matmul_forward,attention_backward limits the run to those ops; $ESSENCE_OPS_VERBOSE=1
 * adds a line per shape with its nmse. */
#include <stdio.h>
#include <stdlib.h>

#include "../ops/harness.h"
#include "../ops/reference.h"
#include "backend.h"

int main(void) {
    es_device_options cuda_options = {.kind = ES_DEVICE_CUDA, .ordinal = 0};
    es_device *cuda = NULL;
    es_error err = {0};
    if (es_device_open(&cuda, &cuda_options, &err)) {
        printf("SKIP ops_cuda: %s\n", err.msg);
        return 0;
    }
    es_device_options cpu_options = {.kind = ES_DEVICE_CPU, .threads = 0};
    es_device *cpu = NULL;
    es_error_clear(&err);
    if (es_device_open(&cpu, &cpu_options, &err)) {
        printf("FAIL ops_cuda: the CPU reference device does not open: %s\n", err.msg);
        es_device_close(cuda);
        return 1;
    }
    printf("  ops_cuda: %s against %s and the double reference\n", cuda->name, cpu->name);
    /* the reference judges the devices only once it has passed its own test */
    int failures = ref_check_gradients(stdout);
    const char *only = getenv("ESSENCE_OPS");
    harness_options options = {.log = stdout, .only = only && *only ? only : NULL,
                               .verbose = getenv("ESSENCE_OPS_VERBOSE") != NULL};
    options.cache = harness_cache_create();
    if (!options.cache) {
        printf("FAIL ops_cuda: out of memory\n");
        failures++;
    } else {
        failures += harness_run(cuda, cpu, &options, NULL);
        failures += harness_check_rows(cuda, &options);
        /* the grid again with every buffer off its 16-byte alignment: the vector paths' fallbacks */
        options.offset = 1;
        failures += harness_run(cuda, NULL, &options, NULL);
    }
    harness_cache_destroy(options.cache);
    es_device_close(cpu);
    es_device_close(cuda);
    return failures ? 1 : 0;
}
