/* essence-project's GEMM precisions: rounding to tf32, bf16 and fp8 e4m3 (nearest even,
 * saturation; the es_round_precision op), and the predicted-error guard against DESIGN.md's
 * table. */
#include <math.h>

#include "../testlib.h"
#include "ops.h"
#include "precision.h"
#include "test_device.h"

static es_device *dev;

static float round_one(float value, es_precision precision) {
    if (es_round_precision(dev, &value, 1, precision)) return -12345.0f;
    return value;
}

TEST(rounding_to_nearest_even) {
    /* bf16 keeps 7 mantissa bits: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 -> even (1) */
    CHECK(round_one(1.0f + 0x1p-8f, ES_PRECISION_BF16) == 1.0f);
    CHECK(round_one(1.0f + 3 * 0x1p-8f, ES_PRECISION_BF16) == 1.0f + 0x1p-6f); /* tie -> even (up) */
    CHECK(round_one(1.0f + 0x1p-8f + 0x1p-20f, ES_PRECISION_BF16) == 1.0f + 0x1p-7f);
    CHECK(round_one(-1.0f - 0x1p-8f - 0x1p-20f, ES_PRECISION_BF16) == -1.0f - 0x1p-7f);
    /* tf32 keeps 10 */
    CHECK(round_one(1.0f + 0x1p-11f, ES_PRECISION_TF32) == 1.0f);
    CHECK(round_one(1.0f + 0x1p-11f + 0x1p-22f, ES_PRECISION_TF32) == 1.0f + 0x1p-10f);
    CHECK(round_one(3.14159265f, ES_PRECISION_FP32) == 3.14159265f);
    CHECK(isnan(round_one(NAN, ES_PRECISION_BF16)) && isinf(round_one(INFINITY, ES_PRECISION_TF32)));
    /* fp8 e4m3: 3 mantissa bits, ±448 saturation, subnormals in steps of 2^-9 */
    CHECK(round_one(1.0f + 0x1p-4f, ES_PRECISION_FP8) == 1.0f);        /* tie -> even */
    CHECK(round_one(1.0f + 0x1p-4f + 0x1p-10f, ES_PRECISION_FP8) == 1.125f);
    CHECK(round_one(1000.0f, ES_PRECISION_FP8) == 448.0f && round_one(-460.0f, ES_PRECISION_FP8) == -448.0f);
    CHECK(round_one(3 * 0x1p-10f, ES_PRECISION_FP8) == 0x1p-8f);       /* 1.5 steps of 2^-9 -> 2 (even) */
    CHECK(round_one(0x1p-11f, ES_PRECISION_FP8) == 0.0f);
    /* every e4m3 value is representable: a sweep stays on the grid and is idempotent */
    for (float x = -500; x < 500; x += 0.37f) {
        float once = round_one(x, ES_PRECISION_FP8);
        CHECKF(round_one(once, ES_PRECISION_FP8) == once, "%g -> %g", x, once);
    }
}

TEST(guard_follows_the_table) {
    CHECK(precision_predicted_error(ES_PRECISION_BF16, 1) == 0.003);
    CHECK(fabs(precision_predicted_error(ES_PRECISION_BF16, 3) - 0.009) < 1e-12);
    CHECK(fabs(precision_predicted_error(ES_PRECISION_TF32, 20) - 0.006) < 1e-12); /* halfway 10..30 */
    CHECK(precision_predicted_error(ES_PRECISION_FP32, 3) == 0);
    CHECK(precision_predicted_error(ES_PRECISION_FP8, 0.1) < 0.01 && precision_predicted_error(ES_PRECISION_FP8, 0.5) > 0.01);
    CHECK(precision_predicted_error(ES_PRECISION_FP8, 1000) == sqrt(2.0));
    /* the 1% line: bf16 allowed at 3, refused at 10; tf32 allowed at 30 */
    CHECK(precision_predicted_error(ES_PRECISION_BF16, 3) <= 0.01 && precision_predicted_error(ES_PRECISION_BF16, 10) > 0.01);
    CHECK(precision_predicted_error(ES_PRECISION_TF32, 30) <= 0.01);
    es_precision parsed;
    CHECK(precision_parse("bf16", &parsed) == 0 && parsed == ES_PRECISION_BF16 && precision_parse("int8", &parsed) == -1);
}

int main(void) {
    dev = test_cpu_device(1);
    RUN(rounding_to_nearest_even);
    RUN(guard_follows_the_table);
    es_device_close(dev);
    return test_summary();
}
