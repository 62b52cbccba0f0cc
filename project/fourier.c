#include "fourier.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "progress.h"

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

typedef struct epilogue {
    float *targets;
    const float *phases;
    int first, rows, m;
} epilogue;

enum { EPILOGUE_ROWS = 16 };

static void epilogue_rows(void *arg, size_t part, int worker) {
    (void)worker;
    const epilogue *e = arg;
    const double root2 = sqrt(2.0);
    int begin = (int)part * EPILOGUE_ROWS, end = begin + EPILOGUE_ROWS < e->rows ? begin + EPILOGUE_ROWS : e->rows;
    for (int t = begin; t < end; t++) {
        float *out = e->targets + (size_t)(e->first + t) * 2 * e->m;
        const float *phase = e->phases + (size_t)t * e->m;
        for (int k = 0; k < e->m; k++) {
            out[k] = (float)(root2 * cos((double)phase[k]));
            out[e->m + k] = (float)(root2 * sin((double)phase[k]));
        }
    }
}

int fourier_features(float *targets, const float *x_hat, const float *omega, int T, int d, int m, es_pool *pool,
                     fourier_timing *timing) {
    float *phases = malloc((size_t)FEATURE_ROWS * m * sizeof *phases);   // (FEATURE_ROWS, m)
    float *padded = calloc((size_t)FEATURE_ROWS * d, sizeof *padded);    // (FEATURE_ROWS, d)
    if (!phases || !padded) {
        free(phases), free(padded);
        return -1;
    }
    for (int first = 0; first < T; first += FEATURE_ROWS) {
        int rows = T - first < FEATURE_ROWS ? T - first : FEATURE_ROWS;
        const float *block = x_hat + (size_t)first * d;
        if (rows < FEATURE_ROWS) {
            memcpy(padded, block, (size_t)rows * d * sizeof *padded);
            block = padded;
        }
        double start = es_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, FEATURE_ROWS, m, d, 1.0f, block, d, omega, d, 0.0f, phases, m);
        double middle = es_now();
        /* sin and cos cost about as much as the product's share of a row: spread them out. */
        epilogue e = {targets, phases, first, rows, m};
        size_t parts = (size_t)(rows + EPILOGUE_ROWS - 1) / EPILOGUE_ROWS;
        if (pool) es_pool_for(pool, parts, epilogue_rows, &e);
        else
            for (size_t part = 0; part < parts; part++) epilogue_rows(&e, part, 0);
        if (timing) {
            timing->gemm_seconds += middle - start;
            timing->epilogue_seconds += es_now() - middle;
            timing->gemm_flops += 2.0 * FEATURE_ROWS * m * (double)d;
        }
    }
    free(phases), free(padded);
    return 0;
}

/* (end, index) pairs of non-empty teacher tokens, ordered by end then index. */
typedef struct end_index {
    int32_t end;
    int32_t index;
} end_index;

static int by_end_then_index(const void *a, const void *b) {
    const end_index *x = a, *y = b;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* The rules are applied literally ("the last teacher token with ..."), so they hold whatever
 * the order of the spans (an EOS appended with an empty span ends before the text does). */
int align_tokens(int64_t *teacher_row, const int32_t *student_start, const int32_t *student_end, int n_student,
                 const int32_t *teacher_start, const int32_t *teacher_end, int n_teacher, align_rule rule) {
    if (rule == ALIGN_CAUSAL) {
        /* suffix_min[j] = min(end[j..]) never decreases, and the last j with
         * suffix_min[j] <= e is the last teacher token ending at or before e. */
        int32_t *suffix_min = malloc((size_t)(n_teacher ? n_teacher : 1) * sizeof *suffix_min);
        if (!suffix_min) return -1;
        for (int j = n_teacher - 1; j >= 0; j--)
            suffix_min[j] = j + 1 < n_teacher && suffix_min[j + 1] < teacher_end[j] ? suffix_min[j + 1] : teacher_end[j];
        for (int i = 0; i < n_student; i++) {
            int low = 0, high = n_teacher; /* first j with suffix_min[j] > e */
            while (low < high) {
                int mid = low + (high - low) / 2;
                if (suffix_min[mid] <= student_end[i]) low = mid + 1;
                else high = mid;
            }
            teacher_row[i] = low - 1;
        }
        free(suffix_min);
        return 0;
    }
    end_index *ends = malloc((size_t)(n_teacher ? n_teacher : 1) * sizeof *ends);
    if (!ends) return -1;
    int n = 0;
    for (int j = 0; j < n_teacher; j++)
        if (teacher_end[j] > teacher_start[j]) ends[n++] = (end_index){teacher_end[j], j};
    qsort(ends, (size_t)n, sizeof *ends, by_end_then_index);
    for (int i = 0; i < n_student; i++) {
        teacher_row[i] = -1;
        if (student_end[i] <= student_start[i]) continue;
        int low = 0, high = n; /* first entry with end > e */
        while (low < high) {
            int mid = low + (high - low) / 2;
            if (ends[mid].end <= student_end[i]) low = mid + 1;
            else high = mid;
        }
        if (low > 0 && ends[low - 1].end == student_end[i]) teacher_row[i] = ends[low - 1].index;
    }
    free(ends);
    return 0;
}
