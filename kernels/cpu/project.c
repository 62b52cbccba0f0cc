/* The Fourier projection's ops on the CPU (kernels/ops.h): rounding to a GEMM precision,
 * standardisation, and the features (phases by single-threaded products on fixed blocks of
 * rows, then sin and cos in double). */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "cpu.h"
#include "progress.h"

/* ---- precision ------------------------------------------------------------------------------ */

/* Keeps `bits` mantissa bits of a float32, rounding to nearest even (NaN and inf kept). */
static float round_mantissa(float value, int bits) {
    uint32_t u;
    memcpy(&u, &value, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return value;
    const int drop = 23 - bits;
    const uint32_t half = 1u << (drop - 1), lsb = (u >> drop) & 1u;
    u = (u + half - 1 + lsb) & ~((1u << drop) - 1);
    memcpy(&value, &u, 4);
    return value;
}

/* fp8 e4m3fn: 3 mantissa bits, normals down to 2^-6, subnormals in steps of 2^-9, largest
 * finite 448 (out-of-range values saturate, as the conversion to e4m3 with saturation does). */
static float round_e4m3(float value) {
    if (isnan(value)) return value;
    const float magnitude = fabsf(value);
    if (magnitude >= 448.0f) return copysignf(448.0f, value);
    if (magnitude < 0x1p-6f) return copysignf(nearbyintf(magnitude * 0x1p9f) * 0x1p-9f, value);
    const float rounded = round_mantissa(magnitude, 3);
    return copysignf(rounded > 448.0f ? 448.0f : rounded, value);
}

static void round_values(float *values, size_t n, es_precision precision) {
    switch (precision) {
    case ES_PRECISION_FP32: break;
    case ES_PRECISION_TF32:
        for (size_t i = 0; i < n; i++) values[i] = round_mantissa(values[i], 10);
        break;
    case ES_PRECISION_BF16:
        for (size_t i = 0; i < n; i++) values[i] = round_mantissa(values[i], 7);
        break;
    case ES_PRECISION_FP8:
        for (size_t i = 0; i < n; i++) values[i] = round_e4m3(values[i]);
        break;
    }
}

int cpu_round_precision(es_device *dev, float *x, size_t n, es_precision precision) {
    (void)dev;
    round_values(x, n, precision);
    return 0;
}

/* ---- standardisation ---------------------------------------------------------------------------- */

enum { STANDARDISE_ROWS = 64 };

typedef struct standardise_job {
    float *x_hat;               // (n, d)
    const float *rows;          // (R, d)
    const int64_t *row_index;   // (n)
    const float *mean, *scale;  // (d) or NULL
    int64_t n;
    int d;
    es_precision precision;
    _Atomic int64_t first_bad;  // the smallest index whose row is not finite, or n
} standardise_job;

static void standardise_block(void *arg, size_t part, int worker) {
    (void)worker;
    standardise_job *job = arg;
    const int d = job->d;
    const int64_t begin = (int64_t)part * STANDARDISE_ROWS, end = begin + STANDARDISE_ROWS < job->n ? begin + STANDARDISE_ROWS : job->n;
    for (int64_t r = begin; r < end; r++) {
        const float *x = job->rows + (size_t)job->row_index[r] * d;
        float *out = job->x_hat + (size_t)r * d;
        double sum_sq = 0;
        int finite = 1;
        for (int k = 0; k < d; k++) finite &= isfinite(x[k]), sum_sq += (double)x[k] * x[k];
        if (!finite) {
            int64_t seen = atomic_load(&job->first_bad);
            while (r < seen && !atomic_compare_exchange_weak(&job->first_bad, &seen, r)) {}
            continue;
        }
        if (!job->mean) {
            double rms = sqrt(sum_sq / d);
            rms = rms > 1e-6 ? rms : 1e-6;
            for (int k = 0; k < d; k++) out[k] = (float)(x[k] / rms);
        } else {
            for (int k = 0; k < d; k++) out[k] = (x[k] - job->mean[k]) / job->scale[k];
        }
        round_values(out, (size_t)d, job->precision);
    }
}

int cpu_standardise(es_device *dev, float *x_hat, int64_t *first_bad, const float *rows, const int64_t *row_index, const float *mean,
                    const float *scale, int64_t n, int d, es_precision precision) {
    standardise_job job = {x_hat, rows, row_index, mean, scale, n, d, precision, n};
    cpu_for(dev, (size_t)((n + STANDARDISE_ROWS - 1) / STANDARDISE_ROWS), standardise_block, &job);
    *first_bad = atomic_load(&job.first_bad);
    return 0;
}

/* ---- features -------------------------------------------------------------------------------- */

/* Each block of FEATURE_ROWS rows is one task: a single-threaded product for its phases (padded
 * to the full block, so a row's bits depend neither on the other rows nor on the thread count),
 * then its sin and cos. */
enum { FEATURE_ROWS = 256 };

typedef struct feature_job {
    float *targets;
    const float *x_hat, *omega;
    float omega_scale;                       /* a power of two: alpha of the product, exact */
    int T, d, m;
    float *scratch;                          /* per worker: phases (FEATURE_ROWS, m), padded (FEATURE_ROWS, d) */
    double *gemm_seconds, *epilogue_seconds; /* per worker */
} feature_job;

static void feature_block(void *arg, size_t block, int worker) {
    feature_job *job = arg;
    const int d = job->d, m = job->m, first = (int)block * FEATURE_ROWS;
    const int rows = job->T - first < FEATURE_ROWS ? job->T - first : FEATURE_ROWS;
    float *phases = job->scratch + (size_t)worker * FEATURE_ROWS * (m + d); // (FEATURE_ROWS, m)
    float *padded = phases + (size_t)FEATURE_ROWS * m;                     // (FEATURE_ROWS, d)
    const float *x = job->x_hat + (size_t)first * d;
    if (rows < FEATURE_ROWS) {
        memcpy(padded, x, (size_t)rows * d * sizeof *padded);
        memset(padded + (size_t)rows * d, 0, (size_t)(FEATURE_ROWS - rows) * d * sizeof *padded);
        x = padded;
    }
    const double start = es_now();
    cpu_sgemm(0, 1, FEATURE_ROWS, m, d, job->omega_scale, x, d, job->omega, d, 0.0f, phases, m);
    const double middle = es_now();
    const double root2 = sqrt(2.0);
    for (int t = 0; t < rows; t++) {
        float *out = job->targets + (size_t)(first + t) * 2 * m;
        const float *phase = phases + (size_t)t * m;
        for (int k = 0; k < m; k++) {
            out[k] = (float)(root2 * cos((double)phase[k]));
            out[m + k] = (float)(root2 * sin((double)phase[k]));
        }
    }
    job->gemm_seconds[worker] += middle - start;
    job->epilogue_seconds[worker] += es_now() - middle;
}

static size_t feature_workspace(int workers, int d, int m) {
    return (size_t)workers * ((size_t)FEATURE_ROWS * ((size_t)m + d) * sizeof(float) + 2 * sizeof(double));
}

size_t cpu_project_workspace(const es_device *dev, const es_workspace_plan *plan) {
    return plan->feature_in ? feature_workspace(cpu_workers(dev), plan->feature_in, plan->feature_phases) : 0;
}

int cpu_fourier_features(es_device *dev, float *targets, const float *x_hat, const float *omega, float omega_scale, int T, int d,
                         int m, es_precision precision, es_fourier_timing *timing) {
    (void)precision; /* the inputs are rounded already: an fp32 product of them is what tensor cores compute */
    if (T <= 0) return 0;
    const int workers = cpu_workers(dev);
    float *scratch = es_device_scratch(dev, feature_workspace(workers, d, m));
    if (!scratch) return ES_ERR_RUNTIME;
    double *seconds = (double *)(scratch + (size_t)workers * FEATURE_ROWS * ((size_t)m + d));
    memset(seconds, 0, 2 * (size_t)workers * sizeof *seconds);
    feature_job job = {targets, x_hat, omega, omega_scale, T, d, m, scratch, seconds, seconds + workers};
    const size_t blocks = (size_t)(T + FEATURE_ROWS - 1) / FEATURE_ROWS;
    const double start = es_now();
    cpu_for(dev, blocks, feature_block, &job);
    if (timing) { /* the wall time, shared between the two phases as the workers spent it */
        double gemm = 0, epilogue = 0, wall = es_now() - start;
        for (int w = 0; w < workers; w++) gemm += seconds[w], epilogue += seconds[workers + w];
        const double share = gemm + epilogue > 0 ? gemm / (gemm + epilogue) : 1;
        timing->gemm_seconds += wall * share;
        timing->epilogue_seconds += wall * (1 - share);
        timing->gemm_flops += 2.0 * FEATURE_ROWS * (double)blocks * m * (double)d;
    }
    return 0;
}
