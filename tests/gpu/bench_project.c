/* GPU benchmark (tests/gpu/run.sh): the Fourier projection 8192 → 1536 (m = 768 phases) on
 * N = 131072 tokens, beside ../shared/tools/gpu_baselines.py's "projection": speed of
 * es_standardise (rms mode) + es_fourier_features, and of the features alone, per GEMM precision;
 * then the precision of the features against a double reference on the host, per σ, next to
 * DESIGN.md's table ("The Fourier projection"), one PASS/FAIL line per (σ, precision).
 *   bench_project OUT_DIR
 * Writes OUT_DIR/bench_project.json (flat keys) and one line per figure. No CUDA device:
 * "SKIP bench_project: ..." and exit 0. Exit 1 when an op fails or a precision is past its bound. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_report.h"
#include "precision.h"
#include "backend.h"
#include "fourier.h"
#include "log.h"
#include "ops.h"
#include "threadpool.h"

#define D 8192            /* the teacher's width */
#define M 768             /* phases: 2M = 1536 features */
#define N_TOKENS 131072
#define REF_ROWS 2048     /* rows generated on the host (the rest repeat them) and checked in double */
#define SEED 1234

static const double sigmas[4] = {1, 3, 10, 30};

typedef struct proj_run {
    es_device *dev;
    float *rows, *x_hat, *targets, *omega; // (N, D), (N, D), (N, 2M), (M, D) device
    int64_t *row_index;                    // (N) device: the identity
    int64_t n;
    es_precision precision;
    float omega_scale;                     /* as essence-project: fp8's Ω scaled into range (kernels/fourier.h) */
    es_fourier_timing timing;
} proj_run;

static void run_standardise(proj_run *r) {
    int64_t first_bad = -1;
    OP(r->dev, es_standardise(r->dev, r->x_hat, &first_bad, r->rows, r->row_index, NULL, NULL, r->n, D, r->precision));
    if (first_bad != r->n) check(es_fail(&err, ES_ERR_RUNTIME, "es_standardise: row %lld is not finite", (long long)first_bad));
}
static void run_features(void *ctx) {
    proj_run *r = ctx;
    OP(r->dev, es_fourier_features(r->dev, r->targets, r->x_hat, r->omega, r->omega_scale, (int)r->n, D, M, r->precision, &r->timing));
}
static void run_both(void *ctx) {
    run_standardise(ctx);
    run_features(ctx);
}

/* Ω for σ onto the device, rounded there to the run's precision (as essence-project does). */
static void load_omega(proj_run *r, const float *omega) {
    check(es_device_upload(r->dev, r->omega, omega, (size_t)M * D * sizeof(float), &err));
    const float prescale = es_fourier_omega_prescale(omega, (size_t)M * D, r->precision);
    r->omega_scale = 1.0f / prescale;
    if (prescale != 1.0f) OP(r->dev, es_scale(r->dev, r->omega, (size_t)M * D, prescale));
    OP(r->dev, es_round_precision(r->dev, r->omega, (size_t)M * D, r->precision));
}

/* The reference phases x̂·Ωᵀ in double, 4 rows × 4 phases at a time (16 independent sums). */
typedef struct reference {
    const double *x_hat, *omega; // (REF_ROWS, D), (M, D)
    double *phase;               // (REF_ROWS, M)
} reference;
static void reference_rows(void *arg, size_t block, int worker) {
    (void)worker;
    const reference *ref = arg;
    const double *x[4];
    for (int a = 0; a < 4; a++) x[a] = ref->x_hat + (block * 4 + a) * D;
    for (int p = 0; p < M; p += 4) {
        const double *w[4] = {ref->omega + (size_t)p * D, ref->omega + (size_t)(p + 1) * D, ref->omega + (size_t)(p + 2) * D,
                              ref->omega + (size_t)(p + 3) * D};
        double acc[4][4] = {{0}};
        for (int k = 0; k < D; k++)
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++) acc[a][b] += x[a][k] * w[b][k];
        for (int a = 0; a < 4; a++)
            for (int b = 0; b < 4; b++) ref->phase[(block * 4 + a) * M + p + b] = acc[a][b];
    }
}

int main(int argc, char **argv) {
    es_set_program("bench_project");
    es_device_prepare(argv);
    if (argc != 2) {
        fprintf(stderr, "usage: bench_project OUT_DIR\n");
        return ES_ERR_USAGE;
    }
    bench_start("bench_project", argv[1]);
    es_device_options options = {.kind = ES_DEVICE_CUDA};
    proj_run r = {0};
    if (es_device_open(&r.dev, &options, &err)) {
        printf("SKIP bench_project: %s\n", err.msg);
        return 0;
    }
    es_device *dev = r.dev;
    bench_str("device", dev->name);

    /* REF_ROWS rows x ~ N(0, 1) (Box-Muller over splitmix64), generated once; the device's N rows
     * repeat them (speed does not depend on the values; precision is checked on the first ones). */
    float *block = malloc((size_t)REF_ROWS * D * sizeof *block), *omega = malloc((size_t)M * D * sizeof *omega);
    float *features = malloc((size_t)REF_ROWS * 2 * M * sizeof *features);
    double *x_ref = malloc((size_t)REF_ROWS * D * sizeof *x_ref), *omega_ref = malloc((size_t)M * D * sizeof *omega_ref);
    double *phase = malloc((size_t)REF_ROWS * M * sizeof *phase);
    int64_t *index = malloc((size_t)N_TOKENS * sizeof *index);
    es_pool *pool = es_pool_create(0);
    if (!block || !omega || !features || !x_ref || !omega_ref || !phase || !index || !pool)
        check(es_fail(&err, ES_ERR_RUNTIME, "out of host memory"));
    uint64_t state = 42;
    for (size_t i = 0; i < (size_t)REF_ROWS * D; i += 2) {
        double u1 = ((double)(splitmix64(&state) >> 11) + 1.0) / 9007199254740993.0, u2 = (double)(splitmix64(&state) >> 11) / 9007199254740992.0;
        block[i] = (float)(sqrt(-2 * log(u1)) * cos(2 * M_PI * u2)), block[i + 1] = (float)(sqrt(-2 * log(u1)) * sin(2 * M_PI * u2));
    }
    for (int64_t i = 0; i < N_TOKENS; i++) index[i] = i;

    /* 4 GiB of rows + 4 GiB of x̂ + 0.75 GiB of targets; halve N while that does not fit. */
    check(es_device_alloc(dev, (size_t)M * D * sizeof(float), (void **)&r.omega, "Ω", &err));
    for (r.n = N_TOKENS;; r.n /= 2) {
        const size_t n = (size_t)r.n;
        int rc = es_device_alloc(dev, n * D * sizeof(float), (void **)&r.rows, "the rows", &err);
        if (!rc) rc = es_device_alloc(dev, n * D * sizeof(float), (void **)&r.x_hat, "x̂", &err);
        if (!rc) rc = es_device_alloc(dev, n * 2 * M * sizeof(float), (void **)&r.targets, "the targets", &err);
        if (!rc) rc = es_device_alloc(dev, n * sizeof(int64_t), (void **)&r.row_index, "the row index", &err);
        if (!rc) break;
        es_device_free(dev, r.rows, n * D * sizeof(float)), es_device_free(dev, r.x_hat, n * D * sizeof(float));
        es_device_free(dev, r.targets, n * 2 * M * sizeof(float)), es_device_free(dev, r.row_index, n * sizeof(int64_t));
        r.rows = r.x_hat = r.targets = NULL, r.row_index = NULL;
        if (r.n <= REF_ROWS) check(rc);
        printf("bench_project: %s: N halved to %lld\n", err.msg, (long long)r.n / 2);
        es_error_clear(&err);
    }
    figure("proj_N", (double)r.n, "tokens (N)");
    for (int64_t at = 0; at < r.n; at += REF_ROWS)
        check(es_device_upload(dev, r.rows + (size_t)at * D, block, (size_t)REF_ROWS * D * sizeof(float), &err));
    check(es_device_upload(dev, r.row_index, index, (size_t)r.n * sizeof(int64_t), &err));
    es_workspace_plan plan = {.tokens = (int)r.n, .feature_in = D, .feature_phases = M};
    check(es_device_reserve(dev, &plan, &err));

    /* Speed, σ = 1: standardise + features, and features alone, per precision. */
    es_fourier_omega(omega, M, D, 1.0, SEED);
    const int64_t n_all = r.n;
    char key[96], what[128];
    for (int p = 0; p < 4; p++) {
        r.precision = (es_precision)p;
        load_omega(&r, omega);
        const double both = timed(dev, run_both, &r, 5);
        r.timing = (es_fourier_timing){0};
        const double alone = timed(dev, run_features, &r, 5);
        snprintf(key, sizeof key, "proj_%s_tok_per_s", precision_name((es_precision)p));
        snprintf(what, sizeof what, "%s: standardise + features, tokens/s", precision_name((es_precision)p));
        figure(key, (double)n_all / both, what);
        snprintf(key, sizeof key, "proj_%s_features_tok_per_s", precision_name((es_precision)p));
        snprintf(what, sizeof what, "%s: features alone, tokens/s", precision_name((es_precision)p));
        figure(key, (double)n_all / alone, what);
        if (r.timing.gemm_seconds > 0) { /* the backend's own split, per call (6: the warm-up too) */
            snprintf(key, sizeof key, "proj_%s_gemm_s", precision_name((es_precision)p));
            snprintf(what, sizeof what, "%s: features' product, s per call", precision_name((es_precision)p));
            figure(key, r.timing.gemm_seconds / 6, what);
            snprintf(key, sizeof key, "proj_%s_epilogue_s", precision_name((es_precision)p));
            snprintf(what, sizeof what, "%s: features' cos/sin, s per call", precision_name((es_precision)p));
            figure(key, r.timing.epilogue_seconds / 6, what);
        }
    }

    /* Precision: x̂ = x / max(rms(x), 1e-6) in double; φ = x̂·Ωᵀ with Ω's fp32 values; √2·[cos, sin]. */
    for (int i = 0; i < REF_ROWS; i++) {
        const float *x = block + (size_t)i * D;
        double sum = 0;
        for (int k = 0; k < D; k++) sum += (double)x[k] * x[k];
        const double rms = fmax(sqrt(sum / D), 1e-6);
        for (int k = 0; k < D; k++) x_ref[(size_t)i * D + k] = x[k] / rms;
    }
    r.n = REF_ROWS;
    int failures = 0;
    for (int s = 0; s < 4; s++) {
        es_fourier_omega(omega, M, D, sigmas[s], SEED);
        for (size_t i = 0; i < (size_t)M * D; i++) omega_ref[i] = omega[i];
        reference ref = {x_ref, omega_ref, phase};
        double t0 = es_now();
        es_pool_for(pool, REF_ROWS / 4, reference_rows, &ref);
        printf("bench_project: sigma %g: double reference in %.2f s\n", sigmas[s], es_now() - t0);
        for (int p = 0; p < 4; p++) {
            r.precision = (es_precision)p;
            load_omega(&r, omega);
            run_both(&r);
            check(es_device_download(dev, features, r.targets, (size_t)REF_ROWS * 2 * M * sizeof(float), &err));
            double diff = 0, norm = 0;
            for (size_t i = 0; i < (size_t)REF_ROWS * M; i++) {
                const size_t row = i / M, j = i % M;
                const double c = M_SQRT2 * cos(phase[i]), sn = M_SQRT2 * sin(phase[i]);
                const double dc = features[row * 2 * M + j] - c, ds = features[row * 2 * M + M + j] - sn;
                diff += dc * dc + ds * ds, norm += c * c + sn * sn;
            }
            const double error = sqrt(diff / norm), expected = precision_predicted_error((es_precision)p, sigmas[s]), /* DESIGN.md's table */ limit = p == 0 ? 1e-4 : 1.5 * expected;
            const int pass = error <= limit; /* NaN fails */
            failures += !pass;
            snprintf(key, sizeof key, "proj_err_s%g_%s", sigmas[s], precision_name((es_precision)p));
            bench_num(key, error);
            snprintf(key, sizeof key, "proj_table_s%g_%s", sigmas[s], precision_name((es_precision)p));
            bench_num(key, expected);
            printf("%s bench_project: sigma %g %s: feature_rel_err %.3g (DESIGN.md %g, bound %g)\n", pass ? "PASS" : "FAIL", sigmas[s],
                   precision_name((es_precision)p), error, expected, limit);
        }
    }
    bench_num("proj_precision_failures", failures);

    es_device_free(dev, r.rows, (size_t)n_all * D * sizeof(float)), es_device_free(dev, r.x_hat, (size_t)n_all * D * sizeof(float));
    es_device_free(dev, r.targets, (size_t)n_all * 2 * M * sizeof(float));
    es_device_free(dev, r.row_index, (size_t)n_all * sizeof(int64_t));
    es_device_free(dev, r.omega, (size_t)M * D * sizeof(float));
    es_device_close(dev);
    es_pool_destroy(pool);
    free(block), free(omega), free(features), free(x_ref), free(omega_ref), free(phase), free(index);
    return failures ? 1 : 0;
}
