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

/* Each block of FEATURE_ROWS rows is one task: a single-threaded sgemm for its phases, then its
 * sin and cos. OpenBLAS's own threads would split the inner dimension differently by thread
 * count (it does for d > 320 not a multiple of 32), so a row's bits would depend on --threads. */
typedef struct feature_job {
    float *targets;
    const float *x_hat, *omega;
    int T, d, m;
    float *scratch;                  /* per worker: phases (FEATURE_ROWS, m), padded (FEATURE_ROWS, d) */
    double *gemm_seconds, *epilogue_seconds; /* per worker */
} feature_job;

static void feature_block(void *arg, size_t block, int worker) {
    feature_job *job = arg;
    const int d = job->d, m = job->m, first = (int)block * FEATURE_ROWS;
    const int rows = job->T - first < FEATURE_ROWS ? job->T - first : FEATURE_ROWS;
    float *phases = job->scratch + (size_t)worker * FEATURE_ROWS * (m + d); // (FEATURE_ROWS, m)
    float *padded = phases + (size_t)FEATURE_ROWS * m;                     // (FEATURE_ROWS, d)
    const float *x = job->x_hat + (size_t)first * d;
    if (rows < FEATURE_ROWS) {
        memcpy(padded, x, (size_t)rows * d * sizeof *padded);
        memset(padded + (size_t)rows * d, 0, (size_t)(FEATURE_ROWS - rows) * d * sizeof *padded);
        x = padded;
    }
    double start = es_now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, FEATURE_ROWS, m, d, 1.0f, x, d, job->omega, d, 0.0f, phases, m);
    double middle = es_now();
    const double root2 = sqrt(2.0);
    for (int t = 0; t < rows; t++) {
        float *out = job->targets + (size_t)(first + t) * 2 * m;
        const float *phase = phases + (size_t)t * m;
        for (int k = 0; k < m; k++) {
            out[k] = (float)(root2 * cos((double)phase[k]));
            out[m + k] = (float)(root2 * sin((double)phase[k]));
        }
    }
    job->gemm_seconds[worker] += middle - start;
    job->epilogue_seconds[worker] += es_now() - middle;
}

int fourier_features(float *targets, const float *x_hat, const float *omega, int T, int d, int m, es_pool *pool,
                     fourier_timing *timing) {
    const int workers = pool ? es_pool_threads(pool) : 1;
    float *scratch = malloc((size_t)workers * FEATURE_ROWS * (m + d) * sizeof *scratch);
    double *seconds = calloc(2 * (size_t)workers, sizeof *seconds);
    if (!scratch || !seconds) {
        free(scratch), free(seconds);
        return -1;
    }
    feature_job job = {targets, x_hat, omega, T, d, m, scratch, seconds, seconds + workers};
    const size_t blocks = (size_t)(T + FEATURE_ROWS - 1) / FEATURE_ROWS;
    const double start = es_now();
    const int blas_threads = openblas_get_num_threads();
    if (blas_threads > 1) openblas_set_num_threads(1);
    if (pool) es_pool_for(pool, blocks, feature_block, &job);
    else
        for (size_t b = 0; b < blocks; b++) feature_block(&job, b, 0);
    if (blas_threads > 1) openblas_set_num_threads(blas_threads);
    if (timing) { /* the wall time, shared between the two phases as the workers spent it */
        double gemm = 0, epilogue = 0, wall = es_now() - start;
        for (int w = 0; w < workers; w++) gemm += seconds[w], epilogue += seconds[workers + w];
        double share = gemm + epilogue > 0 ? gemm / (gemm + epilogue) : 1;
        timing->gemm_seconds += wall * share;
        timing->epilogue_seconds += wall * (1 - share);
        timing->gemm_flops += 2.0 * FEATURE_ROWS * (double)blocks * m * (double)d;
    }
    free(scratch), free(seconds);
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
