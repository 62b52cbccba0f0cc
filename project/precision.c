#include "precision.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

static const char *const names[] = {"fp32", "tf32", "bf16", "fp8"};

int precision_parse(const char *name, gemm_precision *out) {
    for (int i = 0; i < 4; i++)
        if (!strcmp(name, names[i])) {
            *out = (gemm_precision)i;
            return 0;
        }
    return -1;
}

const char *precision_name(gemm_precision precision) { return names[precision]; }

/* DESIGN.md: relative error of the features by σ (rows) and precision (columns). */
static const double table_sigma[4] = {1, 3, 10, 30};
static const double table_error[4][4] = {
    {0, 0.0003, 0.003, 0.037}, {0, 0.0009, 0.009, 0.11}, {0, 0.003, 0.029, 0.37}, {1e-5, 0.009, 0.086, 0.97}};

double precision_predicted_error(gemm_precision precision, double sigma) {
    int p = (int)precision;
    double error;
    if (sigma <= table_sigma[0]) {
        error = table_error[0][p] * sigma / table_sigma[0];
    } else if (sigma >= table_sigma[3]) {
        error = table_error[3][p] * sigma / table_sigma[3];
    } else {
        int i = 0;
        while (sigma > table_sigma[i + 1]) i++;
        double t = (sigma - table_sigma[i]) / (table_sigma[i + 1] - table_sigma[i]);
        error = table_error[i][p] + t * (table_error[i + 1][p] - table_error[i][p]);
    }
    return error < M_SQRT2 ? error : M_SQRT2;
}

/* Keeps `bits` mantissa bits of a float32, rounding to nearest even (NaN and inf kept). */
static float round_mantissa(float value, int bits) {
    uint32_t u;
    memcpy(&u, &value, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return value;
    int drop = 23 - bits;
    uint32_t half = 1u << (drop - 1), lsb = (u >> drop) & 1u;
    u = (u + half - 1 + lsb) & ~((1u << drop) - 1);
    memcpy(&value, &u, 4);
    return value;
}

/* fp8 e4m3fn: 3 mantissa bits, normals down to 2^-6, subnormals in steps of 2^-9, largest
 * finite 448 (out-of-range values saturate, as the conversion to e4m3 with saturation does). */
static float round_e4m3(float value) {
    if (isnan(value)) return value;
    float magnitude = fabsf(value);
    if (magnitude >= 448.0f) return copysignf(448.0f, value);
    if (magnitude < 0x1p-6f) return copysignf(nearbyintf(magnitude * 0x1p9f) * 0x1p-9f, value);
    float rounded = round_mantissa(magnitude, 3);
    return copysignf(rounded > 448.0f ? 448.0f : rounded, value);
}

void precision_round(float *values, size_t n, gemm_precision precision) {
    switch (precision) {
    case PRECISION_FP32: break;
    case PRECISION_TF32:
        for (size_t i = 0; i < n; i++) values[i] = round_mantissa(values[i], 10);
        break;
    case PRECISION_BF16:
        for (size_t i = 0; i < n; i++) values[i] = round_mantissa(values[i], 7);
        break;
    case PRECISION_FP8:
        for (size_t i = 0; i < n; i++) values[i] = round_e4m3(values[i]);
        break;
    }
}
