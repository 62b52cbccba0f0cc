/* The op tests' random numbers: splitmix64, seeded per case, so every run of the harness (and
 * every device it compares) sees the same inputs. */
#ifndef ES_TESTS_OPS_RNG_H
#define ES_TESTS_OPS_RNG_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

typedef struct rng {
    uint64_t state;
} rng;

static inline rng rng_seeded(uint64_t seed) { return (rng){seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull}; }

static inline uint64_t rng_next(rng *r) {
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* in [0, 1) */
static inline double rng_uniform(rng *r) { return (double)(rng_next(r) >> 11) * 0x1p-53; }

/* in [0, n) */
static inline int rng_below(rng *r, int n) { return (int)(rng_uniform(r) * n); }

static inline double rng_normal(rng *r) { /* Box-Muller */
    const double u = 1.0 - rng_uniform(r), v = rng_uniform(r);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static inline void rng_fill_normal(rng *r, float *x, size_t n, double sd) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(sd * rng_normal(r));
}

static inline void rng_fill_normal_double(rng *r, double *x, size_t n, double sd) {
    for (size_t i = 0; i < n; i++) x[i] = sd * rng_normal(r);
}

#endif
