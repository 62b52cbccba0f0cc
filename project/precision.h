/* The GEMM input precision of essence-project (DESIGN.md "The Fourier projection").
 *
 * The phases always accumulate in fp32. `--precision` picks what the GEMM's inputs are
 * rounded to first: fp32 (nothing), tf32 (10 mantissa bits), bf16 (7) or fp8 e4m3 (3, with
 * saturation at ±448): the ops es_round_precision and es_standardise round them, and the CPU
 * backend's fp32 product of rounded inputs is what tensor cores compute. A precision whose
 * predicted feature error exceeds 1% at the chosen σ is refused unless forced. */
#ifndef ES_PROJECT_PRECISION_H
#define ES_PROJECT_PRECISION_H

#include "ops.h"

/* "fp32", "tf32", "bf16", "fp8" -> 0 and *out, or -1. */
int precision_parse(const char *name, es_precision *out);
const char *precision_name(es_precision precision);

/* The relative feature error measured on an H200 against float64 (DESIGN.md's table),
 * interpolated linearly in σ between the measured points and proportionally to σ outside
 * them (capped at √2, the error of features that are pure noise). */
double precision_predicted_error(es_precision precision, double sigma);

#endif
