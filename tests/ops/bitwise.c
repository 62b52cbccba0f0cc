/* The byte-for-byte checks of tests/ops/harness.h, over the cases of the harness's grid (shared
 * through the cache, which crosses the tiles, blocks and chunks that make several tasks).
 *
 * Thread count: backend.h promises the same bits whatever the number of threads; the ops that cut
 * their work over the CPU pool are where that could break (a reduction split by worker rather than
 * by the problem's shape), so each of their cases runs on both devices.
 *
 * Rows: ops.h promises that a row of matmul forward (and of the Fourier features) does not depend
 * on the other rows of the call, which is what lets a run batch tokens freely; a backend that picks
 * its kernel by the number of rows (OpenBLAS does, hence the CPU's padding) breaks it. */
#include <stdlib.h>
#include <string.h>

#include "harness_internal.h"

static const char *const threaded_ops[] = {"matmul_forward",        "matmul_backward",          "matmul_forward_group",
                                           "matmul_backward_group", "matmul_forward_residual",  "attention_forward",
                                           "attention_cached_forward", "attention_backward",    "latent_mse",
                                           "cross_entropy",         "sum_squares",              "swiglu_down_forward",
                                           "swiglu_down_backward"};

static const op_spec *find_op(const char *name) {
    const op_spec *ops[HARNESS_MAX_OPS];
    const int n = harness_ops(ops, HARNESS_MAX_OPS);
    for (int i = 0; i < n; i++)
        if (!strcmp(ops[i]->name, name)) return ops[i];
    return NULL;
}

/* The first difference between the two runs of case c, into why; 0 when there is none. */
static int differs(const op_spec *op, const hcase *c, es_device *one, es_device *many, char *why, size_t size) {
    double **a = harness_new_outputs(c), **b = harness_new_outputs(c);
    int found = 0;
    if (!a || !b) {
        snprintf(why, size, "out of memory");
        found = 1;
        goto done;
    }
    es_error err_a = {0}, err_b = {0};
    const int rc_a = op->call(one, c, a, &err_a), rc_b = op->call(many, c, b, &err_b);
    if (rc_a != rc_b || rc_a != c->expect_rc) {
        snprintf(why, size, "returned %d (%.300s) on %.100s and %d (%.300s) on %.100s", rc_a, err_a.msg, one->name, rc_b, err_b.msg, many->name);
        found = 1;
        goto done;
    }
    for (int k = 0; k < c->n_out && !rc_a; k++)
        for (size_t i = 0; i < c->out[k].n; i++)
            if (memcmp(&a[k][i], &b[k][i], sizeof a[k][i])) {
                snprintf(why, size, "%s[%zu] is %.9g on %s and %.9g on %s", c->out[k].name, i, a[k][i], one->name, b[k][i],
                         many->name);
                found = 1;
                goto done;
            }
done:
    harness_free_outputs(a), harness_free_outputs(b);
    return found;
}

int harness_check_threads(es_device *one, es_device *many, const harness_options *options) {
    harness_options opt = options ? *options : (harness_options){0};
    harness_cache *own = NULL;
    if (!opt.cache && !(opt.cache = own = harness_cache_create())) {
        if (opt.log) fprintf(opt.log, "FAIL thread_count_bitwise: out of memory\n");
        return 1;
    }
    int shapes = 0, ops_run = 0, failed = 0;
    char why[1400] = "", skipped[400] = "";
    for (size_t o = 0; o < sizeof threaded_ops / sizeof *threaded_ops && !failed; o++) {
        const op_spec *op = find_op(threaded_ops[o]);
        if (!op || !op->present(one->ops) || !op->present(many->ops)) {
            snprintf(skipped + strlen(skipped), sizeof skipped - strlen(skipped), " %s", threaded_ops[o]);
            continue;
        }
        ops_run++;
        for (int i = 0; i < op->n_cases && !failed; i++) {
            const hcase *c = harness_case(opt.cache, op, i);
            char detail[1100], shape[200];
            shapes++;
            if (differs(op, c, one, many, detail, sizeof detail)) {
                harness_shape(c, shape, sizeof shape);
                snprintf(why, sizeof why, "%s, shape %s: %s", op->name, shape, detail);
                failed = 1;
            }
        }
    }
    if (opt.log) {
        fprintf(opt.log, "  thread_count_bitwise: %d ops, %d shapes, %s and %s compared byte for byte%s%s\n", ops_run, shapes,
                one->name, many->name, skipped[0] ? "; not implemented:" : "", skipped);
        if (failed) fprintf(opt.log, "FAIL thread_count_bitwise: %s\n", why);
        else if (!ops_run) fprintf(opt.log, "SKIP thread_count_bitwise: none of its ops is implemented\n");
        else fprintf(opt.log, "PASS thread_count_bitwise\n");
    }
    harness_cache_destroy(own);
    return failed;
}

/* ---- rows ------------------------------------------------------------------------------------- */

static long param_of(const hcase *c, const char *name) {
    for (int p = 0; p < c->n_params; p++)
        if (!strcmp(c->param_name[p], name)) return c->param[p];
    return -1;
}

/* Case c whole, then as a prefix of T rows: the prefix's outputs must be the first bytes of the
 * whole's. 0 when they are. */
static int prefix_differs(const op_spec *op, const hcase *c, int T, es_device *dev, double *const *whole, char *why, size_t size) {
    hcase sub = {0};
    op->rows(&sub, c, T);
    double **part = harness_new_outputs(&sub);
    int found = 0;
    es_error err = {0};
    if (!part) {
        snprintf(why, size, "out of memory");
        found = 1;
    } else if (op->call(dev, &sub, part, &err)) {
        snprintf(why, size, "the first %d rows: %.600s", T, err.msg);
        found = 1;
    } else {
        for (int k = 0; k < sub.n_out && !found; k++)
            for (size_t i = 0; i < sub.out[k].n; i++)
                if (memcmp(&part[k][i], &whole[k][i], sizeof part[k][i])) {
                    snprintf(why, size, "with the first %d rows only, %s[%zu] is %.9g instead of %.9g", T, sub.out[k].name, i,
                             part[k][i], whole[k][i]);
                    found = 1;
                    break;
                }
    }
    harness_free_outputs(part);
    harness_drop_case(&sub);
    return found;
}

int harness_check_rows(es_device *dev, const harness_options *options) {
    harness_options opt = options ? *options : (harness_options){0};
    harness_cache *own = NULL;
    if (!opt.cache && !(opt.cache = own = harness_cache_create())) {
        if (opt.log) fprintf(opt.log, "FAIL row_independence: out of memory\n");
        return 1;
    }
    const op_spec *ops[HARNESS_MAX_OPS];
    const int n = harness_ops(ops, HARNESS_MAX_OPS);
    int prefixes = 0, failed = 0;
    char why[1400] = "", names[200] = "";
    for (int o = 0; o < n && !failed; o++) {
        const op_spec *op = ops[o];
        if (!op->rows || !op->present(dev->ops)) continue;
        snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", names[0] ? ", " : "", op->name);
        for (int i = 0; i < op->n_cases && !failed; i++) {
            const hcase *c = harness_case(opt.cache, op, i);
            const long T = param_of(c, "T");
            if (T < 2) continue;
            double **whole = harness_new_outputs(c);
            es_error err = {0};
            char shape[200], detail[1000];
            harness_shape(c, shape, sizeof shape);
            if (!whole || op->call(dev, c, whole, &err)) {
                snprintf(why, sizeof why, "%s, shape %s: %.600s", op->name, shape, whole ? err.msg : "out of memory");
                failed = 1;
            }
            const long lengths[] = {1, 255, 256, 257, T / 2, T - 1};
            for (size_t p = 0; p < sizeof lengths / sizeof *lengths && !failed; p++) {
                if (lengths[p] < 1 || lengths[p] >= T || (p > 0 && lengths[p] == lengths[p - 1])) continue;
                prefixes++;
                if (prefix_differs(op, c, (int)lengths[p], dev, whole, detail, sizeof detail)) {
                    snprintf(why, sizeof why, "%s, shape %s: %s", op->name, shape, detail);
                    failed = 1;
                }
            }
            harness_free_outputs(whole);
        }
    }
    if (opt.log) {
        fprintf(opt.log, "  row_independence: %s: %d prefixes of calls, compared byte for byte with the whole call on %s\n",
                names[0] ? names : "no op", prefixes, dev->name);
        if (failed) fprintf(opt.log, "FAIL row_independence: %s\n", why);
        else if (!prefixes) fprintf(opt.log, "SKIP row_independence: none of its ops is implemented on %s\n", dev->name);
        else fprintf(opt.log, "PASS row_independence\n");
    }
    harness_cache_destroy(own);
    return failed;
}
