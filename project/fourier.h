/* The math of essence-project: the random Fourier-feature map and the token alignment
 * (DESIGN.md "The Fourier projection", "Token alignment"; docs/project.md). */
#ifndef ES_PROJECT_FOURIER_H
#define ES_PROJECT_FOURIER_H

#include <stdint.h>

#include "threadpool.h"

/* Fills omega (m, d) with Ω_ij = σ/√d · z_ij, z standard normal: splitmix64 seeded with
 * `seed` gives 64-bit words in row-major order, two words (53 bits each) make one Box-Muller
 * pair, whose cosine and sine branches fill two consecutive entries. The same seed gives the
 * same Ω on every machine (integer arithmetic, then IEEE double operations, then one
 * rounding to fp32). */
void fourier_omega(float *omega, int m, int d, double sigma, uint64_t seed);

/* Where the time of fourier_features goes (added to). */
typedef struct fourier_timing {
    double gemm_seconds, epilogue_seconds;
    double gemm_flops; /* of the products run, padding rows included */
} fourier_timing;

/* targets = √2 · [cos φ, sin φ] with φ = x_hat Ωᵀ: phases by sgemm (fp32 accumulation), sin
 * and cos in double (exact range reduction), then rounded to fp32. Rows are computed in
 * fixed blocks, each a single-threaded product on one of `pool`'s workers (NULL: the calling
 * thread), so a row's result depends neither on the other rows nor on the thread count.
 * `timing` (or NULL) receives the time spent. Returns 0 or -1 (memory). */
int fourier_features(float *targets,        // (T, 2m)
                     const float *x_hat,    // (T, d)
                     const float *omega,    // (m, d)
                     int T, int d, int m, es_pool *pool, fourier_timing *timing);

typedef enum { ALIGN_EXACT, ALIGN_CAUSAL } align_rule;

/* For each student token of one sample, the aligned teacher token (an index into the
 * teacher's tokens of the same sample) or -1:
 *   exact:  the last teacher token with byte_end == the student's byte_end, both spans non-empty;
 *   causal: the last teacher token with byte_end <= the student's byte_end (the teacher has
 *           read no more text than the student).
 * Returns 0, or -1 when out of memory. */
int align_tokens(int64_t *teacher_row,                       // (n_student)
                  const int32_t *student_start, const int32_t *student_end, int n_student,
                  const int32_t *teacher_start, const int32_t *teacher_end, int n_teacher, align_rule rule);

#endif
