/* The op harness (tests/ops/, docs/ops-harness.md) on the CPU backend, and a test of the harness
 * itself.
 *
 * 1. The reference's self-test: backward references against central differences.
 * 2. Every op of the CPU table over the grid against the double reference, and against a second
 *    CPU device with one thread (the path tests/gpu/test_ops.c takes with CUDA against the CPU).
 * 3. The byte-for-byte checks: 1 and 3 threads give the same bytes; a row of matmul forward and of
 *    the Fourier features is the same whatever the other rows of the call.
 * 4. The harness catches broken ops: the CPU table with one op replaced by a subtly wrong one must
 *    make the harness report FAIL for that op and nothing else; a NULL entry must be a SKIP; an op
 *    whose bits follow the thread count, or the number of rows, must fail the byte-for-byte checks.
 *
 * $ESSENCE_OPS=matmul_forward,attention_backward limits steps 2 and 4 to those ops;
 * $ESSENCE_OPS_VERBOSE=1 adds a line per shape with its nmse. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../ops/harness.h"
#include "../ops/reference.h"
#include "../testlib.h"
#include "backend_impl.h"

static harness_cache *cache;
static harness_report genuine; /* the CPU's own table */
static const es_backend *cpu_table;
static es_device *cpu2, *cpu1, *cpu3;
static const char *only;

static es_device *open_cpu(int threads) {
    es_device_options options = {.kind = ES_DEVICE_CPU, .threads = threads};
    es_device *dev = NULL;
    es_error err = {0};
    if (es_device_open(&dev, &options, &err)) {
        printf("FAIL open_cpu_%d_threads: %s\n", threads, err.msg);
        return NULL;
    }
    return dev;
}

/* ---- broken ops: the CPU's, each with one subtle mistake --------------------------------------- */

/* The bias of the last output column is left out. */
static int broken_matmul_forward(es_device *dev, float *out, const float *in, const void *weight, const void *bias_f32, int T, int C,
                                 int OC) {
    const float *bias = bias_f32;
    const int rc = cpu_table->matmul_forward(dev, out, in, weight, bias, T, C, OC);
    if (!rc && bias)
        for (int t = 0; t < T; t++) out[(size_t)t * OC + OC - 1] -= bias[OC - 1];
    return rc;
}

/* eps added to the rms instead of to the mean square. */
static int broken_rmsnorm_forward(es_device *dev, float *out, const float *in, const void *weight_f32, int T, int C, float eps) {
    (void)dev;
    const float *weight = weight_f32;
    for (int t = 0; t < T; t++) {
        const float *x = in + (size_t)t * C;
        double sum_sq = 0;
        for (int c = 0; c < C; c++) sum_sq += (double)x[c] * x[c];
        const float scale = (float)(1.0 / (sqrt(sum_sq / C) + eps));
        for (int c = 0; c < C; c++) out[(size_t)t * C + c] = x[c] * scale * weight[c];
    }
    return 0;
}

/* Each token also sees the next token of its sequence. */
static int broken_attention_forward(es_device *dev, float *out, const float *q, const float *k, const float *v,
                                    const int32_t *seq_start, int n_seqs, int H, int KV, int hd) {
    (void)dev;
    const int group = H / KV;
    for (int s = 0; s < n_seqs; s++) {
        const int first = seq_start[s], L = seq_start[s + 1] - first;
        double *p = malloc(((size_t)L + 1) * sizeof *p);
        if (!p) return es_device_fail(dev, ES_ERR_RUNTIME, "out of memory");
        for (int h = 0; h < H; h++)
            for (int i = 0; i < L; i++) {
                const int last = i + 1 < L ? i + 1 : i; /* the mistake: i + 1, not i */
                const float *qi = q + ((size_t)(first + i) * H + h) * hd;
                double max_score = -INFINITY, total = 0;
                for (int u = 0; u <= last; u++) {
                    const float *ku = k + ((size_t)(first + u) * KV + h / group) * hd;
                    double dot = 0;
                    for (int e = 0; e < hd; e++) dot += (double)qi[e] * ku[e];
                    p[u] = dot / sqrt((double)hd);
                    if (p[u] > max_score) max_score = p[u];
                }
                for (int u = 0; u <= last; u++) total += p[u] = exp(p[u] - max_score);
                for (int e = 0; e < hd; e++) {
                    double sum = 0;
                    for (int u = 0; u <= last; u++) sum += p[u] * v[((size_t)(first + u) * KV + h / group) * hd + e];
                    out[((size_t)(first + i) * H + h) * hd + e] = (float)(sum / total);
                }
            }
        free(p);
    }
    return 0;
}

/* The labels shifted once more: row t is scored against labels[t + 1]. */
static int broken_cross_entropy(es_device *dev, double *loss_sum, float *dx, float *dW, const float *x, const void *W,
                                const int32_t *labels, int T, int C, int V, float scale) {
    int32_t *shifted = malloc(((size_t)T + 1) * sizeof *shifted);
    if (!shifted) return es_device_fail(dev, ES_ERR_RUNTIME, "out of memory");
    for (int t = 0; t < T; t++) shifted[t] = t + 1 < T ? labels[t + 1] : -1;
    const int rc = cpu_table->cross_entropy(dev, loss_sum, dx, dW, x, W, shifted, T, C, V, scale);
    free(shifted);
    return rc;
}

/* dweight and dbias overwritten instead of added to. */
static int broken_matmul_backward(es_device *dev, float *din, float *dweight, float *dbias, const float *dout, const float *in,
                                  const void *weight, int T, int C, int OC) {
    memset(dweight, 0, (size_t)OC * C * sizeof *dweight);
    if (dbias) memset(dbias, 0, (size_t)OC * sizeof *dbias);
    return cpu_table->matmul_backward(dev, din, dweight, dbias, dout, in, weight, T, C, OC);
}

/* The last token's row of din is never written (dweight is right). */
static int broken_rmsnorm_backward(es_device *dev, float *din, float *dweight, const float *dout, const float *in,
                                   const void *weight, int T, int C, float eps) {
    float *kept = malloc((size_t)C * sizeof *kept);
    if (!kept) return es_device_fail(dev, ES_ERR_RUNTIME, "out of memory");
    if (T > 0) memcpy(kept, din + (size_t)(T - 1) * C, (size_t)C * sizeof *kept);
    const int rc = cpu_table->rmsnorm_backward(dev, din, dweight, dout, in, weight, T, C, eps);
    if (T > 0) memcpy(din + (size_t)(T - 1) * C, kept, (size_t)C * sizeof *kept);
    free(kept);
    return rc;
}

/* The product without its residual. */
static int broken_matmul_forward_residual(es_device *dev, float *out, const float *residual, const float *in, const void *weight,
                                          const void *bias, int T, int C, int OC) {
    (void)residual;
    return cpu_table->matmul_forward(dev, out, in, weight, bias, T, C, OC);
}

/* The MLP's second half over its gate instead of silu(gate) · up. */
static int broken_swiglu_down_forward(es_device *dev, float *out, const float *residual, const float *gate, const float *up,
                                      const void *weight, const void *bias, int T, int inner, int C) {
    (void)up;
    const int rc = cpu_table->matmul_forward(dev, out, gate, weight, bias, T, inner, C);
    return rc ? rc : cpu_table->add(dev, out, residual, out, (size_t)T * C);
}

/* Each part's din written over the last one's instead of added to it. */
static int broken_matmul_backward_group(es_device *dev, float *din, const es_matmul_part_grad *grad, const es_matmul_part *part, int n,
                                        const float *in, int T, int C) {
    for (int i = 0; i < n; i++) {
        const int rc = cpu_table->matmul_backward(dev, din, grad[i].dweight, grad[i].dbias, grad[i].dout, in, part[i].weight, T, C,
                                                  part[i].OC);
        if (rc) return rc;
    }
    return 0;
}

/* On the 3-thread device the sum is cut into one fp32 partial sum per thread. */
static int broken_sum_squares(es_device *dev, double *out, const float *x, size_t n) {
    if (dev != cpu3) return cpu_table->sum_squares(dev, out, x, n);
    float partial[3] = {0};
    for (size_t i = 0; i < n; i++) partial[i % 3] += x[i] * x[i];
    *out = (double)partial[0] + partial[1] + partial[2];
    return 0;
}

/* ---- the harness against the broken tables ------------------------------------------------------- */

static int in_selection(const char *op) { return !only || harness_find(&genuine, op); }

/* Runs the harness on cpu2 with `table` and checks that `op` (and only it, and the ops in
 * `built_on_it`, those the backend makes from it, a list of names each followed by a space, if not
 * NULL) differs from the genuine run, with the status `expected`. */
static void expect_verdict(const char *tl_name, const es_backend *table, const char *op, const char *built_on_it,
                           harness_status expected) {
    const es_backend *saved = cpu2->ops;
    harness_report broken;
    cpu2->ops = table;
    harness_options options = {.log = NULL, .cache = cache, .only = only};
    harness_run(cpu2, NULL, &options, &broken);
    cpu2->ops = saved;
    const harness_op_result *bad = harness_find(&broken, op), *good = harness_find(&genuine, op);
    REQUIRE(bad && good);
    CHECKF(good->status == HARNESS_PASS, "%s does not pass with the genuine CPU table, so the test shows nothing", op);
    CHECKF(bad->status == expected, "the harness gave %s status %d for the broken op, expected %d (worst nmse %g)", op,
           (int)bad->status, (int)expected, bad->worst);
    int others = 0;
    for (int i = 0; i < broken.n_ops; i++) {
        if (!strcmp(broken.ops[i].name, op)) continue;
        char listed[64];
        snprintf(listed, sizeof listed, "%s ", broken.ops[i].name);
        if (built_on_it && strstr(built_on_it, listed)) {
            CHECKF(broken.ops[i].status == expected, "%s, made from %s, has status %d, expected %d", broken.ops[i].name, op,
                   (int)broken.ops[i].status, (int)expected);
            continue;
        }
        const harness_op_result *g = harness_find(&genuine, broken.ops[i].name);
        CHECKF(g && g->status == broken.ops[i].status, "%s changed status although only %s was broken", broken.ops[i].name, op);
        others++;
    }
    printf("  %s: %s %s (worst nmse %.2g, %d of %d shapes)%s%s; the %d other ops as with the genuine table\n", tl_name, op,
           expected == HARNESS_FAIL ? "fails" : "skipped", bad->worst, bad->failed_shapes, bad->shapes,
           built_on_it ? ", and so do the ops made from it: " : "", built_on_it ? built_on_it : "", others);
}

#define BROKEN_TEST_OF(test_name, op, built_on_it, field, replacement, expected)                        \
    TEST(test_name) {                                                                                   \
        if (!in_selection(op)) SKIP("%s is not in $ESSENCE_OPS", op);                                   \
        es_backend broken = *cpu_table;                                                                 \
        broken.field = replacement;                                                                     \
        expect_verdict(tl_name, &broken, op, built_on_it, expected);                                    \
    }
#define BROKEN_TEST(test_name, op, field, replacement, expected) BROKEN_TEST_OF(test_name, op, NULL, field, replacement, expected)

/* The CPU has no group or residual forward of its own: es_matmul_forward_group makes one
 * matmul_forward per part, es_matmul_forward_residual one and an add. */
BROKEN_TEST_OF(harness_catches_matmul_last_bias, "matmul_forward", "matmul_forward_group matmul_forward_residual ", matmul_forward,
               broken_matmul_forward, HARNESS_FAIL)
BROKEN_TEST(harness_catches_rmsnorm_eps, "rmsnorm_forward", rmsnorm_forward, broken_rmsnorm_forward, HARNESS_FAIL)
BROKEN_TEST(harness_catches_attention_future_token, "attention_forward", attention_forward, broken_attention_forward,
            HARNESS_FAIL)
BROKEN_TEST(harness_catches_cross_entropy_label_shift, "cross_entropy", cross_entropy, broken_cross_entropy, HARNESS_FAIL)
BROKEN_TEST(harness_catches_matmul_backward_overwrite, "matmul_backward", matmul_backward, broken_matmul_backward,
            HARNESS_FAIL)
BROKEN_TEST(harness_catches_residual_left_out, "matmul_forward_residual", matmul_forward_residual, broken_matmul_forward_residual,
            HARNESS_FAIL)
BROKEN_TEST(harness_catches_swiglu_down_without_activation, "swiglu_down_forward", swiglu_down_forward, broken_swiglu_down_forward,
            HARNESS_FAIL)
BROKEN_TEST(harness_catches_matmul_backward_group_overwrite, "matmul_backward_group", matmul_backward_group,
            broken_matmul_backward_group, HARNESS_FAIL)
BROKEN_TEST(harness_catches_rmsnorm_backward_unwritten_row, "rmsnorm_backward", rmsnorm_backward, broken_rmsnorm_backward,
            HARNESS_FAIL)
BROKEN_TEST(harness_skips_missing_op, "scale", scale, NULL, HARNESS_SKIP)

/* One ulp more in the first value when the call has an odd number of rows: right to fp32
 * accuracy, wrong by the row-independence promise. */
static int broken_matmul_rows(es_device *dev, float *out, const float *in, const void *weight, const void *bias, int T, int C,
                              int OC) {
    const int rc = cpu_table->matmul_forward(dev, out, in, weight, bias, T, C, OC);
    if (!rc && T % 2) out[0] = nextafterf(out[0], INFINITY);
    return rc;
}

TEST(harness_catches_row_dependence) {
    es_backend broken = *cpu_table;
    broken.matmul_forward = broken_matmul_rows;
    cpu2->ops = &broken;
    harness_options options = {.log = NULL, .cache = cache};
    const int failed = harness_check_rows(cpu2, &options);
    cpu2->ops = cpu_table;
    CHECKF(failed == 1, "the row-independence check passed a matmul whose first row depends on the number of rows");
}

TEST(harness_catches_thread_dependence) {
    es_backend broken = *cpu_table;
    broken.sum_squares = broken_sum_squares;
    cpu3->ops = &broken;
    harness_options options = {.log = NULL, .cache = cache};
    const int failed = harness_check_threads(cpu1, cpu3, &options);
    cpu3->ops = cpu_table;
    CHECKF(failed == 1, "the thread-count check passed an op whose sum depends on the thread count");
}

int main(void) {
    only = getenv("ESSENCE_OPS");
    if (only && !*only) only = NULL;
    int failures = ref_check_gradients(stdout);
    cache = harness_cache_create();
    cpu2 = open_cpu(2), cpu1 = open_cpu(1), cpu3 = open_cpu(3);
    if (!cache || !cpu2 || !cpu1 || !cpu3) {
        printf("FAIL ops_cpu: cannot start (out of memory or no CPU device)\n");
        return 1;
    }
    cpu_table = cpu2->ops;
    harness_options options = {.log = stdout, .cache = cache, .only = only, .verbose = getenv("ESSENCE_OPS_VERBOSE") != NULL};
    failures += harness_run(cpu2, cpu1, &options, &genuine);
    failures += harness_check_threads(cpu1, cpu3, &options);
    failures += harness_check_rows(cpu2, &options);
    RUN(harness_catches_matmul_last_bias);
    RUN(harness_catches_rmsnorm_eps);
    RUN(harness_catches_attention_future_token);
    RUN(harness_catches_cross_entropy_label_shift);
    RUN(harness_catches_matmul_backward_overwrite);
    RUN(harness_catches_matmul_backward_group_overwrite);
    RUN(harness_catches_residual_left_out);
    RUN(harness_catches_swiglu_down_without_activation);
    RUN(harness_catches_rmsnorm_backward_unwritten_row);
    RUN(harness_skips_missing_op);
    RUN(harness_catches_thread_dependence);
    RUN(harness_catches_row_dependence);
    es_device_close(cpu3), es_device_close(cpu1), es_device_close(cpu2);
    harness_cache_destroy(cache);
    return failures || test_summary() ? 1 : 0;
}
