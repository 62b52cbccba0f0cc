/* The per-op test harness (docs/ops-harness.md): every op of a device's table over a grid of
 * shapes, compared with the double-precision reference (tests/ops/reference.h) by normalised
 * MSE, nmse = Σ (out − ref)² / Σ ref², against a threshold per op; and, when a second device is
 * given, with that device (the CPU, for a new backend) op by op with thresholds of their own.
 *
 * Two further checks compare a device with itself byte for byte: the same bits with any thread
 * count (harness_check_threads) and a row's bits whatever the other rows (harness_check_rows).
 *
 * The harness reaches a device only through kernels/backend.h and kernels/ops.h (alloc,
 * upload, download, the op wrappers), so it runs unchanged on any backend. For each op it prints
 *   "  op_name: N shapes (ranges), worst nmse X (threshold Y)"
 * then "PASS op_name", "FAIL op_name: shape ..., nmse ..." or "SKIP op_name: not implemented on
 * <device>" (tests/run.sh counts those lines). */
#ifndef ES_TESTS_OPS_HARNESS_H
#define ES_TESTS_OPS_HARNESS_H

#include <stdio.h>

#include "backend.h"

typedef enum { HARNESS_PASS, HARNESS_FAIL, HARNESS_SKIP } harness_status;

enum { HARNESS_MAX_OPS = 40 };

typedef struct harness_op_result {
    const char *name;
    harness_status status;        /* against the double reference */
    harness_status device_status; /* against the reference device (SKIP when none was given) */
    int shapes, failed_shapes;
    double worst, device_worst;   /* the largest nmse over the shapes (+inf: an error or a non-finite mismatch) */
    double threshold, device_threshold;
} harness_op_result;

typedef struct harness_report {
    int n_ops;
    harness_op_result ops[HARNESS_MAX_OPS];
    int passed, failed, skipped; /* PASS, FAIL, SKIP lines */
} harness_report;

/* The grid's inputs and double references, built once and kept for later runs (the reference of
 * the larger shapes is most of the harness's time; several runs over one cache pay it once). */
typedef struct harness_cache harness_cache;
harness_cache *harness_cache_create(void); /* NULL when out of memory */
void harness_cache_destroy(harness_cache *cache);

typedef struct harness_options {
    FILE *log;            /* where the lines go; NULL: nowhere (the report still says everything) */
    harness_cache *cache; /* NULL: one of its own for this run */
    const char *only;     /* NULL, or a comma-separated list of op names to run (e.g. from $ESSENCE_OPS) */
    int verbose;          /* also one line per shape with its nmse against the reference */
    /* Every buffer the cases put on the device starts off its allocation's 256-byte alignment, by
     * 8, 4 or 2 bytes (the most its size allows: its elements stay aligned), as a stage's row
     * offsets into an arena may: an op's vector loads must see that and take their narrow path
     * (on a GPU a misaligned vector load stops the kernel). The lines end "_offset". */
    int offset;
} harness_options;

/* Runs every op of dev's table over the grid against the double reference, and, when
 * reference_device is not NULL, against that device too (the lines then end "_vs_<its backend>",
 * e.g. "PASS matmul_forward_vs_cpu"). Fills *report (may be NULL); returns the number of FAIL
 * lines. */
int harness_run(es_device *dev, es_device *reference_device, const harness_options *options, harness_report *report);

/* The entry of an op in a report, or NULL. */
const harness_op_result *harness_find(const harness_report *report, const char *name);

/* The thread-count check: the ops whose CPU kernels cut work over the pool (matmul forward and
 * backward, attention forward and backward, latent MSE with a head, cross entropy, sum of
 * squares) give the same bits on `one` and `many` (CPU devices with different thread counts),
 * over their whole grid. Prints one indented line and "PASS thread_count_bitwise" or "FAIL
 * thread_count_bitwise: ..."; returns 0 when identical, 1 otherwise. */
int harness_check_threads(es_device *one, es_device *many, const harness_options *options);

/* The row-independence check: ops.h promises that a token's row of matmul forward, and a row of
 * the Fourier features, does not depend on the other rows of the call. Each case with several rows
 * runs whole and as prefixes of 1, 255, 256, 257 rows, half and all but one; the prefix's rows must
 * be the same bytes. Prints one indented line and "PASS row_independence" or "FAIL
 * row_independence: ..."; returns 0 when identical, 1 otherwise. */
int harness_check_rows(es_device *dev, const harness_options *options);

#endif
