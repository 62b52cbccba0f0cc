/* The GEMM input precision of essence-project (DESIGN.md "The Fourier projection").
 *
 * The phases always accumulate in fp32. `--precision` picks what the GEMM's inputs are
 * rounded to first: fp32 (nothing), tf32 (10 mantissa bits), bf16 (7) or fp8 e4m3 (3, with
 * saturation at ±448). The CPU backend emulates the narrow formats by rounding x̂ and Ω
 * before its fp32 sgemm, which is what tensor cores compute. A precision whose predicted
 * feature error exceeds 1% at the chosen σ is refused unless forced. */
#ifndef ES_PROJECT_PRECISION_H
#define ES_PROJECT_PRECISION_H

#include <stddef.h>

typedef enum { PRECISION_FP32, PRECISION_TF32, PRECISION_BF16, PRECISION_FP8 } gemm_precision;

/* "fp32", "tf32", "bf16", "fp8" -> 0 and *out, or -1. */
int precision_parse(const char *name, gemm_precision *out);
const char *precision_name(gemm_precision precision);

/* The relative feature error measured on an H200 against float64 (DESIGN.md's table),
 * interpolated linearly in σ between the measured points and proportionally to σ outside
 * them (capped at √2, the error of features that are pure noise). */
double precision_predicted_error(gemm_precision precision, double sigma);

/* Rounds n values in place to the precision (round to nearest even). */
void precision_round(float *values, size_t n, gemm_precision precision);

#endif
