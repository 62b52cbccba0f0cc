/* Ω (kernels/fourier.h). */
#include "fourier.h"

#include <math.h>
#include <stddef.h>

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

float es_fourier_omega_prescale(const float *omega, size_t n, es_precision precision) {
    if (precision != ES_PRECISION_FP8) return 1.0f;
    float largest = 0;
    for (size_t i = 0; i < n; i++) largest = fabsf(omega[i]) > largest ? fabsf(omega[i]) : largest;
    if (!(largest > 0) || !isfinite(largest)) return 1.0f;
    int k = (int)floor(log2(448.0 / largest));
    k = k < -100 ? -100 : k > 100 ? 100 : k;
    while (k > -100 && ldexp(largest, k) > 448.0) k--; /* log2's last bit, at a power of two */
    return ldexpf(1.0f, k);
}

void es_fourier_omega(float *omega, int m, int d, double sigma, uint64_t seed) {
    const double scale = sigma / sqrt((double)d);
    const size_t n = (size_t)m * (size_t)d;
    uint64_t state = seed;
    for (size_t i = 0; i < n; i += 2) {
        double u1 = ((double)(splitmix64(&state) >> 11) + 1.0) / 9007199254740993.0; /* (0, 1] */
        double u2 = (double)(splitmix64(&state) >> 11) / 9007199254740992.0;         /* [0, 1) */
        double radius = sqrt(-2.0 * log(u1)) * scale, angle = 2.0 * M_PI * u2;
        omega[i] = (float)(radius * cos(angle));
        if (i + 1 < n) omega[i + 1] = (float)(radius * sin(angle));
    }
}
