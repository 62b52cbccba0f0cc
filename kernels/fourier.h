/* The Fourier projection's backend-independent part: Ω, drawn from a documented seeded
 * generator (docs/project.md), so anyone can draw it again. The features are ops
 * (es_standardise, es_round_precision, es_fourier_features in kernels/ops.h). */
#ifndef ES_KERNELS_FOURIER_H
#define ES_KERNELS_FOURIER_H

#include <stdint.h>

/* Fills omega (m, d) with Ω_ij = σ/√d · z_ij, z standard normal: splitmix64 seeded with
 * `seed` gives 64-bit words in row-major order, two words (53 bits each) make one Box-Muller
 * pair, whose cosine and sine branches fill two consecutive entries. The same seed gives the
 * same Ω on every machine (integer arithmetic, then IEEE double operations, then one
 * rounding to fp32). Host memory. */
void es_fourier_omega(float *omega, int m, int d, double sigma, uint64_t seed);

#endif
