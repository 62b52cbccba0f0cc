#include "fourier.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void fourier_omega(float *omega, int m, int d, double sigma, uint64_t seed) {
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

enum { FEATURE_ROWS = 256 }; /* fixed sgemm blocks: see es_matmul_forward */

int fourier_features(float *targets, const float *x_hat, const float *omega, int T, int d, int m) {
    float *phases = malloc((size_t)FEATURE_ROWS * m * sizeof *phases);   // (FEATURE_ROWS, m)
    float *padded = calloc((size_t)FEATURE_ROWS * d, sizeof *padded);    // (FEATURE_ROWS, d)
    if (!phases || !padded) {
        free(phases), free(padded);
        return -1;
    }
    const double root2 = sqrt(2.0);
    for (int first = 0; first < T; first += FEATURE_ROWS) {
        int rows = T - first < FEATURE_ROWS ? T - first : FEATURE_ROWS;
        const float *block = x_hat + (size_t)first * d;
        if (rows < FEATURE_ROWS) {
            memcpy(padded, block, (size_t)rows * d * sizeof *padded);
            block = padded;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, FEATURE_ROWS, m, d, 1.0f, block, d, omega, d, 0.0f, phases, m);
        for (int t = 0; t < rows; t++) {
            float *out = targets + (size_t)(first + t) * 2 * m;
            const float *phase = phases + (size_t)t * m;
            for (int k = 0; k < m; k++) {
                out[k] = (float)(root2 * cos((double)phase[k]));
                out[m + k] = (float)(root2 * sin((double)phase[k]));
            }
        }
    }
    free(phases), free(padded);
    return 0;
}

void align_tokens(int64_t *teacher_row, const int32_t *student_start, const int32_t *student_end, int n_student,
                  const int32_t *teacher_start, const int32_t *teacher_end, int n_teacher, align_rule rule) {
    int j = -1; /* the last teacher token with end <= the current student end */
    for (int i = 0; i < n_student; i++) {
        while (j + 1 < n_teacher && teacher_end[j + 1] <= student_end[i]) j++;
        int64_t row = -1;
        if (rule == ALIGN_CAUSAL) {
            row = j;
        } else if (student_end[i] > student_start[i]) {
            /* the last teacher token ending exactly here with a non-empty span */
            for (int k = j; k >= 0 && teacher_end[k] == student_end[i]; k--)
                if (teacher_end[k] > teacher_start[k]) {
                    row = k;
                    break;
                }
        }
        teacher_row[i] = row;
    }
}
