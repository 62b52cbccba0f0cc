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
    REQUIRE(es_fourier_features(dev, targets, x, omega, T, D, M, ES_PRECISION_FP32, NULL) == 0);
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
    REQUIRE(es_fourier_features(dev, part, x + 256 * D, omega, T - 256, D, M, ES_PRECISION_FP32, NULL) == 0);
    CHECK(memcmp(part, targets + 256 * 2 * M, sizeof(float) * (T - 256) * 2 * M) == 0);
    /* nor on their place in a block, where OpenBLAS's kernels compute every row alike */
    REQUIRE(es_fourier_features(dev, part, x + 100 * D, omega, T - 100, D, M, ES_PRECISION_FP32, NULL) == 0);
    if (dev->batch_independent) CHECK(memcmp(part, targets + 100 * 2 * M, sizeof(float) * (T - 100) * 2 * M) == 0);
    else printf("  (rows moved within a block not compared: %s computes rows by their position)\n", dev->name);
    es_device_close(dev);
    /* nor on the threads that take sin and cos */
    dev = test_cpu_device(3);
    es_fourier_timing timing = {0};
    REQUIRE(es_fourier_features(dev, part, x, omega, T, D, M, ES_PRECISION_FP32, &timing) == 0);
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
    REQUIRE(es_fourier_features(dev, one, x, omega, T, D, M, ES_PRECISION_FP32, NULL) == 0);
    es_device_close(dev);
    dev = test_cpu_device(2);
    REQUIRE(es_fourier_features(dev, many, x, omega, T, D, M, ES_PRECISION_FP32, NULL) == 0);
    es_device_close(dev);
    CHECK(memcmp(one, many, sizeof one) == 0);
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
    RUN(alignment_rules);
    RUN(alignment_is_the_literal_rule);
    return test_summary();
}
