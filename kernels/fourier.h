/* The Fourier projection's backend-independent part: Ω, drawn from a documented seeded
 * generator (docs/project.md), so anyone can draw it again. The features are ops
 * (es_standardise, es_round_precision, es_fourier_features in kernels/ops.h). */
#ifndef ES_KERNELS_FOURIER_H
#define ES_KERNELS_FOURIER_H

#include <stddef.h>
#include <stdint.h>

#include "ops.h"

/* Fills omega (m, d) with Ω_ij = σ/√d · z_ij, z standard normal: splitmix64 seeded with
 * `seed` gives 64-bit words in row-major order, two words (53 bits each) make one Box-Muller
 * pair, whose cosine and sine branches fill two consecutive entries. The same seed gives the
 * same Ω on every machine (integer arithmetic, then IEEE double operations, then one
 * rounding to fp32). Host memory. */
void es_fourier_omega(float *omega, int m, int d, double sigma, uint64_t seed);

/* The power of two 2^k that Ω (host, n values) is multiplied by before it is rounded to
 * `precision`: for fp8 the one bringing its largest magnitude into (224, 448], since Ω ~
 * N(0, σ²/d) would otherwise sit among e4m3's subnormals (below 2^-6; a per-tensor scale, as
 * scaled fp8 products take); 1 for the other precisions. The phases then take omega_scale =
 * 1 / 2^k (es_fourier_features): both scalings are exact. */
float es_fourier_omega_prescale(const float *omega, size_t n, es_precision precision);

#endif
