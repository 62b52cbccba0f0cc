/* essence-project's math: Ω from its documented generator, the Fourier features (the op, on a
 * CPU device) against a double-precision recomputation, independence of each row from the
 * others and from the thread count, and the two alignment rules on hand-made spans. */
#include <math.h>
#include <stdint.h>

#include "../testlib.h"
#include "alignment.h"
#include "fourier.h"
#include "ops.h"
#include "test_device.h"

TEST(omega_is_the_documented_sequence) {
    float omega[32], again[32], other[32];
    es_fourier_omega(omega, 4, 8, 1.5, 12345);
    es_fourier_omega(again, 4, 8, 1.5, 12345);
    es_fourier_omega(other, 4, 8, 1.5, 12346);
    CHECK(memcmp(omega, again, sizeof omega) == 0 && memcmp(omega, other, sizeof omega) != 0);
    /* The first values, computed independently with Python's integers and math module
     * following docs/project.md's description (splitmix64, Box-Muller, σ/√d, fp32). */
    static const uint32_t expected[6] = {0x3e98bf34, 0x3f82e065, 0x3efa914c, 0x3f7a3654, 0xbea4992b, 0x3f072f95};
    for (int i = 0; i < 6; i++) {
        uint32_t bits;
        memcpy(&bits, &omega[i], 4);
        CHECKF(bits == expected[i], "omega[%d] = %08x, expected %08x", i, bits, expected[i]);
    }
    /* and its distribution: N(0, σ²/d) */
    enum { M = 64, D = 512 };
    static float big[M * D];
    es_fourier_omega(big, M, D, 2.0, 7);
    double sum = 0, sum_sq = 0;
    for (int i = 0; i < M * D; i++) sum += big[i], sum_sq += (double)big[i] * big[i];
    double mean = sum / (M * D), std = sqrt(sum_sq / (M * D) - mean * mean), want = 2.0 / sqrt((double)D);
    CHECKF(fabs(mean) < 0.02 * want && fabs(std / want - 1) < 0.02, "mean %g std %g (want %g)", mean, std, want);
}

TEST(features_match_double_precision) {
    enum { T = 300, D = 96, M = 24 };
    static float x[T * D], omega[M * D], targets[T * 2 * M], part[T * 2 * M];
    uint64_t state = 99;
    for (int i = 0; i < T * D; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)(((double)(state >> 11) / 9007199254740992.0 - 0.5) * 6.0);
    }
    es_fourier_omega(omega, M, D, 3.0, 1);
    es_device *dev = test_cpu_device(1);
    REQUIRE(es_fourier_features(dev, targets, x, omega, 1.0f, T, D, M, ES_PRECISION_FP32, NULL) == 0);
    double worst = 0, norm_error = 0;
    for (int t = 0; t < T; t++) {
        double norm_sq = 0;
        for (int k = 0; k < M; k++) {
            double phase = 0;
            for (int j = 0; j < D; j++) phase += (double)x[t * D + j] * omega[k * D + j];
            double c = sqrt(2.0) * cos(phase), s = sqrt(2.0) * sin(phase);
            worst = fmax(worst, fmax(fabs(targets[t * 2 * M + k] - c), fabs(targets[t * 2 * M + M + k] - s)));
            norm_sq += (double)targets[t * 2 * M + k] * targets[t * 2 * M + k] +
                       (double)targets[t * 2 * M + M + k] * targets[t * 2 * M + M + k];
        }
        norm_error = fmax(norm_error, fabs(norm_sq / (2 * M) - 1)); /* unit RMS by construction */
    }
    CHECKF(worst < 1e-5, "max |error| %g", worst);
    CHECKF(norm_error < 1e-6, "RMS off by %g", norm_error);
    /* rows do not depend on the rows of other blocks: start a call at the second block */
    REQUIRE(es_fourier_features(dev, part, x + 256 * D, omega, 1.0f, T - 256, D, M, ES_PRECISION_FP32, NULL) == 0);
    CHECK(memcmp(part, targets + 256 * 2 * M, sizeof(float) * (T - 256) * 2 * M) == 0);
    /* nor on their place in a block, where OpenBLAS's kernels compute every row alike */
    REQUIRE(es_fourier_features(dev, part, x + 100 * D, omega, 1.0f, T - 100, D, M, ES_PRECISION_FP32, NULL) == 0);
    if (dev->batch_independent) CHECK(memcmp(part, targets + 100 * 2 * M, sizeof(float) * (T - 100) * 2 * M) == 0);
    else printf("  (rows moved within a block not compared: %s computes rows by their position)\n", dev->name);
    es_device_close(dev);
    /* nor on the threads that take sin and cos */
    dev = test_cpu_device(3);
    es_fourier_timing timing = {0};
    REQUIRE(es_fourier_features(dev, part, x, omega, 1.0f, T, D, M, ES_PRECISION_FP32, &timing) == 0);
    CHECK(memcmp(part, targets, sizeof(float) * T * 2 * M) == 0);
    CHECK(timing.gemm_flops == 2.0 * 512 * M * D && timing.gemm_seconds > 0); /* two blocks of 256 rows */
    es_device_close(dev);
}

/* OpenBLAS's threaded sgemm splits the inner dimension by thread count when it is over 320 and
 * not a multiple of 32: the features must not follow the device's thread count. */
TEST(features_independent_of_threads) {
    enum { T = 300, D = 333, M = 40 };
    static float x[T * D], omega[M * D], one[T * 2 * M], many[T * 2 * M];
    uint64_t state = 3;
    for (int i = 0; i < T * D; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(state >> 11) / 9007199254740992.0 - 0.5) * 4.0f;
    }
    es_fourier_omega(omega, M, D, 1.0, 9);
    es_device *dev = test_cpu_device(1);
    REQUIRE(es_fourier_features(dev, one, x, omega, 1.0f, T, D, M, ES_PRECISION_FP32, NULL) == 0);
    es_device_close(dev);
    dev = test_cpu_device(2);
    REQUIRE(es_fourier_features(dev, many, x, omega, 1.0f, T, D, M, ES_PRECISION_FP32, NULL) == 0);
    es_device_close(dev);
    CHECK(memcmp(one, many, sizeof one) == 0);
}

/* fp8 at a σ the precision guard lets through (0.25: predicted 0.93%, DESIGN.md's table scaled):
 * the teacher's width puts Ω ~ N(0, σ²/d) among e4m3's subnormals, so unscaled rounding loses
 * most of it; scaled into range first (es_fourier_omega_prescale, as essence-project does) the
 * error is the table's. Measured on this shape: 0.94% scaled, 5.1% without. */
static double fp8_feature_error(es_device *dev, const float *x, const float *omega, int T, int d, int m, int prescaled) {
    float *x8 = malloc((size_t)T * d * sizeof *x8), *w8 = malloc((size_t)m * d * sizeof *w8);
    float *targets = malloc((size_t)T * 2 * m * sizeof *targets);
    memcpy(x8, x, (size_t)T * d * sizeof *x8), memcpy(w8, omega, (size_t)m * d * sizeof *w8);
    const float prescale = prescaled ? es_fourier_omega_prescale(omega, (size_t)m * d, ES_PRECISION_FP8) : 1.0f;
    for (size_t i = 0; i < (size_t)m * d; i++) w8[i] *= prescale;
    double error = INFINITY;
    if (!es_round_precision(dev, x8, (size_t)T * d, ES_PRECISION_FP8) && !es_round_precision(dev, w8, (size_t)m * d, ES_PRECISION_FP8) &&
        !es_fourier_features(dev, targets, x8, w8, 1.0f / prescale, T, d, m, ES_PRECISION_FP8, NULL)) {
        double diff = 0, norm = 0;
        for (int t = 0; t < T; t++)
            for (int k = 0; k < m; k++) {
                double phase = 0;
                for (int j = 0; j < d; j++) phase += (double)x[(size_t)t * d + j] * omega[(size_t)k * d + j];
                const double c = sqrt(2.0) * cos(phase), s = sqrt(2.0) * sin(phase);
                const float *row = targets + (size_t)t * 2 * m;
                diff += (row[k] - c) * (row[k] - c) + (row[m + k] - s) * (row[m + k] - s), norm += c * c + s * s;
            }
        error = sqrt(diff / norm);
    }
    free(x8), free(w8), free(targets);
    return error;
}

TEST(fp8_omega_scaled_into_range) {
    enum { T = 32, D = 8192, M = 64 };
    float *x = malloc((size_t)T * D * sizeof *x), *omega = malloc((size_t)M * D * sizeof *omega);
    REQUIRE(x && omega);
    es_fourier_omega(x, T, D, sqrt((double)D), 77); /* N(0, 1) rows */
    es_fourier_omega(omega, M, D, 0.25, 78);
    const float prescale = es_fourier_omega_prescale(omega, (size_t)M * D, ES_PRECISION_FP8);
    float largest = 0;
    for (size_t i = 0; i < (size_t)M * D; i++) largest = fabsf(omega[i]) > largest ? fabsf(omega[i]) : largest;
    CHECKF(largest * prescale > 224 && largest * prescale <= 448, "max |Ω| scaled to %g", largest * prescale);
    CHECK(frexpf(prescale, &(int){0}) == 0.5f); /* a power of two */
    CHECK(es_fourier_omega_prescale(omega, (size_t)M * D, ES_PRECISION_BF16) == 1.0f);
    es_device *dev = test_cpu_device(2);
    const double scaled = fp8_feature_error(dev, x, omega, T, D, M, 1), unscaled = fp8_feature_error(dev, x, omega, T, D, M, 0);
    printf("  fp8 at sigma 0.25, d 8192: feature error %.4f scaled into range, %.4f without\n", scaled, unscaled);
    CHECKF(scaled < 0.014, "fp8 feature error %.4f, the guard predicts 0.0093", scaled);
    CHECKF(unscaled > 2 * scaled, "without the scaling %.4f: this test no longer shows what it is for", unscaled);
    es_device_close(dev);
    free(x), free(omega);
}

TEST(alignment_rules) {
    /* text "<s>Hi 🤗!" : teacher [BOS][Hi][ 🤗 part][ 🤗 part][!]; student [BOS][H][i][ ][🤗][!] */
    const int32_t teacher_start[] = {0, 0, 2, 2, 7}, teacher_end[] = {0, 2, 7, 7, 8};
    const int32_t student_start[] = {0, 0, 1, 2, 3, 7}, student_end[] = {0, 1, 2, 3, 7, 8};
    int64_t rows[6];
    REQUIRE(align_tokens(rows, student_start, student_end, 6, teacher_start, teacher_end, 5, ALIGN_EXACT) == 0);
    const int64_t exact[] = {-1, -1, 1, -1, 3, 4};
    CHECK(memcmp(rows, exact, sizeof rows) == 0);
    REQUIRE(align_tokens(rows, student_start, student_end, 6, teacher_start, teacher_end, 5, ALIGN_CAUSAL) == 0);
    const int64_t causal[] = {0, 0, 1, 1, 3, 4};
    CHECK(memcmp(rows, causal, sizeof rows) == 0);
}

/* The rules are "the last teacher token with ...": checked against that sentence, written as
 * a search over every pair, on random spans in any order (an appended EOS has [0, 0)). */
TEST(alignment_is_the_literal_rule) {
    uint64_t state = 5;
    for (int round = 0; round < 300; round++) {
        int32_t ts[40], te[40], ss[40], se[40];
        int n_teacher = round % 40, n_student = (round * 7) % 40;
        for (int j = 0; j < n_teacher; j++) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            ts[j] = (int32_t)((state >> 33) % 20);
            te[j] = ts[j] + (int32_t)((state >> 50) % 4);
        }
        for (int i = 0; i < n_student; i++) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            ss[i] = (int32_t)((state >> 33) % 20);
            se[i] = ss[i] + (int32_t)((state >> 50) % 4);
        }
        int64_t exact[40], causal[40];
        REQUIRE(align_tokens(exact, ss, se, n_student, ts, te, n_teacher, ALIGN_EXACT) == 0);
        REQUIRE(align_tokens(causal, ss, se, n_student, ts, te, n_teacher, ALIGN_CAUSAL) == 0);
        for (int i = 0; i < n_student; i++) {
            int64_t want_exact = -1, want_causal = -1;
            for (int j = 0; j < n_teacher; j++) {
                if (te[j] == se[i] && te[j] > ts[j] && se[i] > ss[i]) want_exact = j;
                if (te[j] <= se[i]) want_causal = j;
            }
            CHECKF(exact[i] == want_exact && causal[i] == want_causal, "round %d token %d: exact %lld/%lld causal %lld/%lld", round, i,
                   (long long)exact[i], (long long)want_exact, (long long)causal[i], (long long)want_causal);
        }
    }
}

int main(void) {
    RUN(omega_is_the_documented_sequence);
    RUN(features_match_double_precision);
    RUN(features_independent_of_threads);
    RUN(fp8_omega_scaled_into_range);
    RUN(alignment_rules);
    RUN(alignment_is_the_literal_rule);
    return test_summary();
}
