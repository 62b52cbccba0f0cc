/* The harness's engine (tests/ops/harness.h): the cache of cases, the measure, the loop over
 * ops and shapes, and the lines it prints. The ops themselves, their grids and thresholds are in
 * tests/ops/cases_layer.c and cases_train.c. */
#include "harness_internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- cases ------------------------------------------------------------------------------------ */

/* Zeroed memory on one of a case's lists; exits the test when out of memory. */
static void *tracked(void ***list, int *n, int *cap, size_t bytes) {
    if (*n == *cap) {
        const int grown_cap = *cap ? 2 * *cap : 16;
        void **grown = realloc(*list, (size_t)grown_cap * sizeof *grown);
        if (!grown) goto out_of_memory;
        *list = grown, *cap = grown_cap;
    }
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) goto out_of_memory;
    (*list)[(*n)++] = p;
    return p;
out_of_memory:
    fprintf(stderr, "FAIL harness: out of memory making a case (%zu bytes)\n", bytes);
    exit(1);
}

static void free_list(void ***list, int *n, int *cap) {
    for (int i = 0; i < *n; i++) free((*list)[i]);
    free(*list);
    *list = NULL, *n = *cap = 0;
}

void *hc_alloc(hcase *c, size_t bytes) { return tracked(&c->allocs, &c->n_allocs, &c->cap_allocs, bytes); }

float *hc_floats(hcase *c, size_t n) { return hc_alloc(c, n * sizeof(float)); }
double *hc_doubles(hcase *c, size_t n) { return hc_alloc(c, n * sizeof(double)); }

double *hc_widen(hcase *c, const float *x, size_t n) {
    double *wide = tracked(&c->temps, &c->n_temps, &c->cap_temps, n * sizeof *wide);
    for (size_t i = 0; i < n; i++) wide[i] = x[i];
    return wide;
}

float *hc_normals(hcase *c, rng *r, size_t n, double sd) {
    float *x = hc_floats(c, n);
    rng_fill_normal(r, x, n, sd);
    return x;
}

void hc_param(hcase *c, const char *name, long value) {
    if (c->n_params == HC_PARAMS) return;
    c->param_name[c->n_params] = name;
    c->param[c->n_params++] = value;
}

void hc_note(hcase *c, const char *fmt, ...) {
    const size_t used = strlen(c->note);
    if (used + 2 >= sizeof c->note) return;
    if (used) strcat(c->note, ", ");
    va_list args;
    va_start(args, fmt);
    vsnprintf(c->note + strlen(c->note), sizeof c->note - strlen(c->note), fmt, args);
    va_end(args);
}

double *hc_output(hcase *c, const char *name, size_t n, int exact) {
    if (c->n_out == HC_OUTPUTS) {
        fprintf(stderr, "FAIL harness: more than %d outputs in a case\n", HC_OUTPUTS);
        exit(1);
    }
    hout *o = &c->out[c->n_out++];
    o->name = name, o->n = n, o->exact = exact, o->ref = hc_doubles(c, n);
    return o->ref;
}

float *hc_accumulate_start(hcase *c, rng *r, double *ref, size_t n) {
    double rms = 0;
    for (size_t i = 0; i < n; i++) rms += ref[i] * ref[i];
    rms = n && rms > 0 ? sqrt(rms / (double)n) : 1.0;
    float *start = hc_normals(c, r, n, rms);
    /* each of the sign of what is added to it, so that no sum cancels: what a bf16 device rounds
     * (the added part) stays a share of the sum, and an nmse over a few elements measures that
     * rounding, not the luck of a start that nearly cancels (a one-element case did) */
    for (size_t i = 0; i < n; i++) {
        if ((start[i] < 0) != (ref[i] < 0)) start[i] = -start[i];
        ref[i] += start[i];
    }
    return start;
}

void harness_drop_case(hcase *c) {
    free_list(&c->allocs, &c->n_allocs, &c->cap_allocs);
    free_list(&c->temps, &c->n_temps, &c->cap_temps);
    memset(c, 0, sizeof *c);
}

struct harness_cache {
    hcase *cases[HARNESS_MAX_OPS];
};

int harness_ops(const op_spec **ops, int max) {
    int n = 0;
    for (int i = 0; i < harness_n_layer_ops && n < max; i++) ops[n++] = &harness_layer_ops[i];
    for (int i = 0; i < harness_n_train_ops && n < max; i++) ops[n++] = &harness_train_ops[i];
    for (int i = 0; i < harness_n_product_ops && n < max; i++) ops[n++] = &harness_product_ops[i];
    return n;
}

harness_cache *harness_cache_create(void) { return calloc(1, sizeof(harness_cache)); }

void harness_cache_destroy(harness_cache *cache) {
    if (!cache) return;
    const op_spec *ops[HARNESS_MAX_OPS];
    const int n = harness_ops(ops, HARNESS_MAX_OPS);
    for (int i = 0; i < n; i++) {
        if (!cache->cases[i]) continue;
        for (int k = 0; k < ops[i]->n_cases; k++) harness_drop_case(&cache->cases[i][k]);
        free(cache->cases[i]);
    }
    free(cache);
}

hcase *harness_case(harness_cache *cache, const op_spec *op, int index) {
    const op_spec *ops[HARNESS_MAX_OPS];
    const int n = harness_ops(ops, HARNESS_MAX_OPS);
    int at = 0;
    while (at < n && ops[at] != op) at++;
    if (at == n || index < 0 || index >= op->n_cases) return NULL;
    if (!cache->cases[at] && !(cache->cases[at] = calloc((size_t)op->n_cases, sizeof(hcase)))) {
        fprintf(stderr, "FAIL harness: out of memory\n");
        exit(1);
    }
    hcase *c = &cache->cases[at][index];
    if (!c->made) {
        op->make(c, index);
        free_list(&c->temps, &c->n_temps, &c->cap_temps);
        c->made = 1;
    }
    return c;
}

/* ---- moving data through a device ----------------------------------------------------------- */

/* harness_options.offset of the run in progress (the cases' calls reach ds_put without options) */
static int offset_buffers;

void ds_begin(dscope *s, es_device *dev, es_error *err) {
    memset(s, 0, sizeof *s);
    s->dev = dev, s->err = err;
}

void *ds_put(dscope *s, const void *host, size_t bytes) {
    if (s->n == DS_MAX) {
        es_fail(s->err, ES_ERR_RUNTIME, "harness: more than %d buffers in one call", DS_MAX);
        return NULL;
    }
    const size_t offset = !offset_buffers ? 0 : bytes % 8 == 0 ? 8 : bytes % 4 == 0 ? 4 : bytes % 2 == 0 ? 2 : 0;
    void *allocated;
    if (es_device_alloc(s->dev, bytes + offset, &allocated, "an op test's buffer", s->err)) return NULL;
    s->ptr[s->n] = allocated, s->bytes[s->n++] = bytes + offset;
    void *p = (char *)allocated + offset;
    if (host && es_device_upload(s->dev, p, host, bytes, s->err)) return NULL;
    return p;
}

void *ds_put_weights(dscope *s, const float *host, size_t n) {
    void *p = ds_put(s, NULL, n * es_dtype_size(s->dev->weight_dtype));
    if (p && es_device_upload_weights(s->dev, p, host, n, s->err)) return NULL;
    return p;
}

float *ds_out(dscope *s, const float *start, size_t n) {
    if (start) return ds_put(s, start, n * sizeof *start);
    float *nan_filled = malloc((n ? n : 1) * sizeof *nan_filled);
    if (!nan_filled) {
        es_fail(s->err, ES_ERR_RUNTIME, "harness: out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n; i++) nan_filled[i] = NAN;
    float *p = ds_put(s, nan_filled, n * sizeof *nan_filled);
    free(nan_filled);
    return p;
}

int ds_get(dscope *s, double *got, const float *src, size_t n) {
    float *host = malloc((n ? n : 1) * sizeof *host);
    if (!host) return es_fail(s->err, ES_ERR_RUNTIME, "harness: out of memory"), -1;
    if (es_device_download(s->dev, host, src, n * sizeof *host, s->err)) {
        free(host);
        return -1;
    }
    for (size_t i = 0; i < n; i++) got[i] = host[i];
    free(host);
    return 0;
}

int ds_end(dscope *s, int rc) {
    for (int i = s->n - 1; i >= 0; i--) es_device_free(s->dev, s->ptr[i], s->bytes[i]);
    s->n = 0;
    if (!rc && s->err->code) rc = s->err->code;
    return rc;
}

int ds_op_failed(dscope *s, int rc) {
    es_device_take_error(s->dev, s->err);
    return ds_end(s, rc);
}

/* ---- the measure ------------------------------------------------------------------------------ */

/* nmse = Σ (got − ref)² / Σ ref² over the finite values of ref. A NaN or ±inf in ref must be
 * matched by the same in got (NaN by any NaN), a non-finite got where ref is finite fails, and
 * so does any difference in an exact output: those give +inf. An all-zero ref is matched only by
 * an all-zero got (0/0 is 0: nothing to compare and nothing wrong; x/0 is +inf). */
static double measure(const double *got, const double *ref, size_t n, int exact, char *why, size_t size) {
    double err = 0, norm = 0, largest = -1;
    size_t at = 0;
    why[0] = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(ref[i]) || !isfinite(got[i])) {
            if (isnan(ref[i]) ? isnan(got[i]) : got[i] == ref[i]) continue;
            snprintf(why, size, "at [%zu] %.9g where the reference has %.9g", i, got[i], ref[i]);
            return INFINITY;
        }
        const double d = got[i] - ref[i];
        if (exact && d != 0) {
            snprintf(why, size, "at [%zu] %.17g, expected %.17g", i, got[i], ref[i]);
            return INFINITY;
        }
        err += d * d, norm += ref[i] * ref[i];
        if (fabs(d) > largest) largest = fabs(d), at = i;
    }
    if (largest > 0) snprintf(why, size, "largest difference at [%zu]: %.9g vs %.9g", at, got[at], ref[at]);
    if (norm == 0) return err == 0 ? 0 : INFINITY;
    return err / norm;
}

/* ---- the run ---------------------------------------------------------------------------------- */

static int selected(const char *only, const char *name) {
    if (!only || !*only) return 1;
    const size_t len = strlen(name);
    for (const char *p = only; *p;) {
        const char *end = strchr(p, ',');
        const size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == len && !strncmp(p, name, n)) return 1;
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

void harness_shape(const hcase *c, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = 0;
    for (int i = 0; i < c->n_params && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%s=%ld", i ? " " : "", c->param_name[i], c->param[i]);
    if (c->note[0] && used < size) snprintf(buf + used, size - used, "%s%s", c->n_params ? ", " : "", c->note);
}

/* "T 0..513, C 1..515": each parameter's range over the op's cases, in order of appearance. */
static void ranges(harness_cache *cache, const op_spec *op, char *buf, size_t size) {
    const char *names[16];
    long low[16], high[16];
    int n = 0;
    for (int i = 0; i < op->n_cases; i++) {
        const hcase *c = harness_case(cache, op, i);
        for (int p = 0; p < c->n_params; p++) {
            int k = 0;
            while (k < n && strcmp(names[k], c->param_name[p])) k++;
            if (k == n) {
                if (n == 16) continue;
                names[n] = c->param_name[p], low[n] = high[n] = c->param[p], n++;
            }
            if (c->param[p] < low[k]) low[k] = c->param[p];
            if (c->param[p] > high[k]) high[k] = c->param[p];
        }
    }
    size_t used = 0;
    buf[0] = 0;
    for (int k = 0; k < n && used < size; k++) {
        if (low[k] == high[k]) used += (size_t)snprintf(buf + used, size - used, "%s%s %ld", k ? ", " : "", names[k], low[k]);
        else used += (size_t)snprintf(buf + used, size - used, "%s%s %ld..%ld", k ? ", " : "", names[k], low[k], high[k]);
    }
}

static const char *number(double x, char *buf, size_t size) {
    if (x == 0) snprintf(buf, size, "0");
    else snprintf(buf, size, "%.2g", x);
    return buf;
}

/* The worst shape of one comparison (against the reference, or against the reference device). */
typedef struct verdict {
    double worst, threshold;
    int failed;
    char shape[200], output[40], why[1200];
} verdict;

static void note_result(verdict *v, const hcase *c, const char *output, double nmse, const char *why) {
    const int fails = !(nmse <= v->threshold);
    v->failed += fails;
    if (!(nmse > v->worst || (isnan(nmse) && !isnan(v->worst)))) return;
    v->worst = nmse;
    harness_shape(c, v->shape, sizeof v->shape);
    snprintf(v->output, sizeof v->output, "%s", output);
    snprintf(v->why, sizeof v->why, "%s", why);
}

/* Compares got with ref (both already for case c) output by output into v; rc_got is the op's
 * code on the device, rc_ref the reference's (the case's expected code, or the reference device's). */
static double judge(verdict *v, const hcase *c, int rc_got, const es_error *err, int rc_ref, double *const *got,
                    double *const *ref_values) {
    char why[1100];
    if (rc_got != rc_ref) {
        if (rc_got) snprintf(why, sizeof why, "returned %d (%.900s), expected %d", rc_got, err->msg, rc_ref);
        else snprintf(why, sizeof why, "returned 0, expected the error %d", rc_ref);
        note_result(v, c, "return code", INFINITY, why);
        return INFINITY;
    }
    if (rc_got) {
        note_result(v, c, "return code", 0, "");
        return 0;
    }
    /* the case counts once, with its worst output */
    double worst = 0;
    int worst_k = 0;
    char worst_why[1100] = "";
    for (int k = 0; k < c->n_out; k++) {
        const double nmse = measure(got[k], ref_values[k], c->out[k].n, c->out[k].exact, why, sizeof why);
        if (k == 0 || nmse > worst || (isnan(nmse) && !isnan(worst))) {
            worst = nmse, worst_k = k;
            memcpy(worst_why, why, sizeof worst_why);
        }
    }
    note_result(v, c, c->n_out ? c->out[worst_k].name : "no output", worst, worst_why);
    return worst;
}

double **harness_new_outputs(const hcase *c) {
    double **outs = calloc(HC_OUTPUTS, sizeof *outs);
    if (!outs) return NULL;
    for (int k = 0; k < c->n_out; k++)
        if (!(outs[k] = malloc((c->out[k].n ? c->out[k].n : 1) * sizeof **outs))) {
            for (int j = 0; j < k; j++) free(outs[j]);
            free(outs);
            return NULL;
        }
    return outs;
}

void harness_free_outputs(double **outs) {
    if (!outs) return;
    for (int k = 0; k < HC_OUTPUTS; k++) free(outs[k]);
    free(outs);
}

/* "  subject: N shapes (grid), worst nmse X (threshold Y)", then the PASS or FAIL line of name. */
static void print_verdict(FILE *log, const char *name, const char *subject, int shapes, const char *grid, const verdict *v,
                          harness_report *rep) {
    char worst[32], threshold[32];
    number(v->worst, worst, sizeof worst), number(v->threshold, threshold, sizeof threshold);
    if (log)
        fprintf(log, "  %s: %d shapes%s%s%s, worst nmse %s (threshold %s)\n", subject, shapes, grid ? " (" : "", grid ? grid : "",
                grid ? ")" : "", worst, threshold);
    if (!v->failed) {
        rep->passed++;
        if (log) fprintf(log, "PASS %s\n", name);
        return;
    }
    rep->failed++;
    if (log)
        fprintf(log, "FAIL %s: shape %s, %s nmse %s (threshold %s; %s); %d of %d shapes fail\n", name, v->shape, v->output, worst,
                threshold, v->why, v->failed, shapes);
}

static void run_op(const op_spec *op, es_device *dev, es_device *other, const harness_options *opt, harness_op_result *res,
                   harness_report *rep) {
    harness_cache *cache = opt->cache;
    FILE *log = opt->log;
    *res = (harness_op_result){.name = op->name, .status = HARNESS_SKIP, .device_status = HARNESS_SKIP, .shapes = op->n_cases,
                               .threshold = op->threshold, .device_threshold = op->device_threshold};
    if (!op->present(dev->ops)) {
        rep->skipped++;
        if (log) fprintf(log, "SKIP %s: not implemented on %s\n", op->name, dev->name);
        return;
    }
    const int versus = other && op->present(other->ops);
    const int bf16 = op->bf16_threshold > 0 && (dev->weight_dtype == ES_DT_BF16 || (versus && other->weight_dtype == ES_DT_BF16));
    verdict against_ref = {.threshold = bf16 && dev->weight_dtype == ES_DT_BF16 ? op->bf16_threshold : op->threshold},
            against_dev = {.threshold = bf16 ? HARNESS_DEVICE_FACTOR * op->bf16_threshold : op->device_threshold};
    res->threshold = against_ref.threshold, res->device_threshold = against_dev.threshold;
    for (int i = 0; i < op->n_cases; i++) {
        const hcase *c = harness_case(cache, op, i);
        double **got = harness_new_outputs(c), **theirs = versus ? harness_new_outputs(c) : NULL, *refs[HC_OUTPUTS] = {0};
        if (!got || (versus && !theirs)) {
            note_result(&against_ref, c, "harness", INFINITY, "out of memory");
            harness_free_outputs(got), harness_free_outputs(theirs);
            continue;
        }
        for (int k = 0; k < c->n_out; k++) refs[k] = c->out[k].ref;
        es_error err = {0}, their_err = {0};
        const int rc = op->call(dev, c, got, &err);
        const double nmse = judge(&against_ref, c, rc, &err, c->expect_rc, got, refs);
        if (opt->verbose && log) {
            char shape[200], value[32];
            harness_shape(c, shape, sizeof shape);
            fprintf(log, "    %s %s: nmse %s\n", op->name, shape, number(nmse, value, sizeof value));
        }
        if (versus) {
            const int their_rc = op->call(other, c, theirs, &their_err);
            if (their_rc != c->expect_rc) {
                char why[1100];
                snprintf(why, sizeof why, "the reference device %.160s returned %d (%.600s)", other->name, their_rc, their_err.msg);
                note_result(&against_dev, c, "return code", INFINITY, why);
            } else {
                judge(&against_dev, c, rc, &err, their_rc, got, theirs);
            }
        }
        harness_free_outputs(got), harness_free_outputs(theirs);
    }
    char grid[400];
    ranges(cache, op, grid, sizeof grid);
    res->worst = against_ref.worst, res->failed_shapes = against_ref.failed;
    res->status = against_ref.failed ? HARNESS_FAIL : HARNESS_PASS;
    char own_name[96];
    snprintf(own_name, sizeof own_name, "%s%s", op->name, opt->offset ? "_offset" : "");
    print_verdict(log, own_name, own_name, op->n_cases, grid, &against_ref, rep);
    if (!other) return;
    char name[96], subject[300];
    snprintf(name, sizeof name, "%s_vs_%s%s", op->name, other->ops->name, opt->offset ? "_offset" : "");
    if (!versus) {
        rep->skipped++;
        if (log) fprintf(log, "SKIP %s: not implemented on %s\n", name, other->name);
        return;
    }
    snprintf(subject, sizeof subject, "%s vs %s", op->name, other->name);
    res->device_worst = against_dev.worst;
    res->device_status = against_dev.failed ? HARNESS_FAIL : HARNESS_PASS;
    print_verdict(log, name, subject, op->n_cases, NULL, &against_dev, rep);
}

int harness_run(es_device *dev, es_device *reference_device, const harness_options *options, harness_report *report) {
    harness_options opt = options ? *options : (harness_options){0};
    harness_report local, *rep = report ? report : &local;
    memset(rep, 0, sizeof *rep);
    harness_cache *own = NULL;
    if (!opt.cache && !(opt.cache = own = harness_cache_create())) {
        if (opt.log) fprintf(opt.log, "FAIL harness: out of memory\n");
        return rep->failed = 1;
    }
    const op_spec *ops[HARNESS_MAX_OPS];
    const int n = harness_ops(ops, HARNESS_MAX_OPS);
    offset_buffers = opt.offset;
    for (int i = 0; i < n; i++) {
        if (!selected(opt.only, ops[i]->name)) continue;
        run_op(ops[i], dev, reference_device, &opt, &rep->ops[rep->n_ops++], rep);
        if (opt.log) fflush(opt.log);
    }
    offset_buffers = 0;
    harness_cache_destroy(own);
    return rep->failed;
}

const harness_op_result *harness_find(const harness_report *report, const char *name) {
    for (int i = 0; i < report->n_ops; i++)
        if (!strcmp(report->ops[i].name, name)) return &report->ops[i];
    return NULL;
}
