/* Benchmark: essence-project, d = 8192 -> D = 1536, on a synthetic teacher.h5, against
 * OpenBLAS sgemm's own rate on the same product shapes measured in the same run.
 *
 * Writes ESSENCE_BENCH_TOKENS (default 16384) teacher rows of random values (one layer, 40)
 * with texts of random words (one teacher token per word), a student folder with the
 * DeepSeek-R1-Distill-Qwen-1.5B config and the qwen3 tokenizer, runs BUILD/essence-project
 * on them and reads its timing line. Reports tokens/s and the shares of time in the GEMM, the
 * feature epilogue (sin, cos), HDF5/zstd I/O and tokenisation; the goal is the GEMM part at
 * >= 70% of sgemm's rate on (256 x 8192) · (8192 x 768). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>

#include "backend.h"
#include "log.h"
#include "progress.h"
#include "teacher.h"

char *openblas_get_corename(void);

enum { D_TEACHER = 8192, D_STUDENT = 1536, BLOCK_ROWS = 256, LAYER = 40 };

static uint64_t state = 88172645463325252ull;
static double uniform(void) { /* xorshift64: fast and good enough for noise */
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (double)(state >> 11) / 9007199254740992.0;
}

static int write_teacher(const char *path, int64_t tokens) {
    static const char *words[] = {"the", "proof", "follows", "since", "x", "is", "even", "and", "therefore", "we",
                                  "conclude", "that", "42", "holds", "for", "all", "n", "≥", "1", "量子"};
    int layers[1] = {LAYER};
    es_pool *pool = es_pool_create(0);
    teacher_options options = {layers, 1, D_TEACHER, 0, 3, pool, NULL};
    teacher_writer writer;
    es_error err = {0};
    if (teacher_create(&writer, path, &options, &err)) es_exit_error(&err);
    enum { SAMPLE_TOKENS = 512 };
    float *rows = malloc(sizeof(float) * SAMPLE_TOKENS * D_TEACHER);
    char *text = malloc(SAMPLE_TOKENS * 16);
    int32_t ids[SAMPLE_TOKENS], spans[SAMPLE_TOKENS][2];
    for (int64_t done = 0, sample = 0; done < tokens; sample++) {
        int n = tokens - done < SAMPLE_TOKENS ? (int)(tokens - done) : SAMPLE_TOKENS, len = 0;
        for (int t = 0; t < n; t++) {
            const char *word = words[(int)(uniform() * 20)];
            spans[t][0] = len;
            len += sprintf(text + len, "%s%s", t ? " " : "", word);
            spans[t][1] = len, ids[t] = t;
        }
        for (size_t i = 0; i < (size_t)n * D_TEACHER; i++) /* residual-stream-like: mostly small, a few large */
            rows[i] = (float)((uniform() - 0.5) * (i % D_TEACHER < 4 ? 200.0 : 2.0));
        char id[32];
        snprintf(id, sizeof id, "s%lld", (long long)sample);
        const float *layer_rows[1] = {rows};
        if (teacher_add(&writer, id, text, (size_t)len, 0, 0, ids, (const int32_t(*)[2])spans, n, layer_rows, &err) ||
            teacher_commit(&writer, &err))
            es_exit_error(&err);
        done += n;
    }
    const char *attributes[] = {"hidden_size", "8192", "layers", "40", "fingerprint", "bench"};
    if (teacher_finish(&writer, attributes, 3, &err)) es_exit_error(&err);
    free(rows), free(text);
    es_pool_destroy(pool);
    return 0;
}

/* sgemm's rate on the projection's own block shape, best of three runs of `blocks` products. */
static double sgemm_rate(int blocks) {
    float *x = malloc(sizeof(float) * BLOCK_ROWS * D_TEACHER), *omega = malloc(sizeof(float) * (D_STUDENT / 2) * D_TEACHER);
    float *phases = malloc(sizeof(float) * BLOCK_ROWS * (D_STUDENT / 2));
    for (size_t i = 0; i < (size_t)BLOCK_ROWS * D_TEACHER; i++) x[i] = (float)uniform();
    for (size_t i = 0; i < (size_t)(D_STUDENT / 2) * D_TEACHER; i++) omega[i] = (float)uniform();
    double best = 1e30;
    for (int run = 0; run < 3; run++) {
        double start = es_now();
        for (int b = 0; b < blocks; b++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, BLOCK_ROWS, D_STUDENT / 2, D_TEACHER, 1.0f, x, D_TEACHER, omega,
                        D_TEACHER, 0.0f, phases, D_STUDENT / 2);
        double seconds = es_now() - start;
        best = seconds < best ? seconds : best;
    }
    free(x), free(omega), free(phases);
    return 2.0 * BLOCK_ROWS * (D_STUDENT / 2) * (double)D_TEACHER * blocks / best / 1e9;
}

int main(int argc, char **argv) {
    (void)argc;
    es_set_program("bench_project");
    es_device_prepare(argv); /* the kernels essence-project runs with */
    const char *tmp = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    int64_t tokens = getenv("ESSENCE_BENCH_TOKENS") ? atoll(getenv("ESSENCE_BENCH_TOKENS")) : 16384;
    char dir[1024], command[32768], build[1024];
    snprintf(dir, sizeof dir, "%s/essence-bench-project-%d", tmp, (int)getpid());
    snprintf(build, sizeof build, "%s", argv[0]);
    char *slash = strrchr(build, '/');
    if (slash) *slash = '\0';
    snprintf(command, sizeof command, "mkdir -p '%s/student' && cp tests/bench/configs/deepseek-r1-distill-qwen-1.5b.json '%s/student/config.json' && zstd -q -d -c pipelines/demo/qwen.tokenizer.json.zst > '%s/student/tokenizer.json'",
             dir, dir, dir);
    if (system(command)) return 1;
    char teacher[4200];
    snprintf(teacher, sizeof teacher, "%s/teacher.h5", dir);
    double start = es_now();
    write_teacher(teacher, tokens);
    printf("synthetic teacher.h5: %lld rows x %d written in %.1f s\n", (long long)tokens, D_TEACHER, es_now() - start);

    openblas_set_num_threads((int)sysconf(_SC_NPROCESSORS_ONLN));
    double blas = sgemm_rate((int)((tokens + BLOCK_ROWS - 1) / BLOCK_ROWS < 16 ? (tokens + BLOCK_ROWS - 1) / BLOCK_ROWS : 16));

    snprintf(command, sizeof command, "'%s/../essence-project' --in '%s' --student '%s/student' --out '%s/student.h5' --layer-map 40:14 2>&1",
             build, teacher, dir, dir);
    start = es_now();
    FILE *pipe = popen(command, "r");
    char line[1024];
    double gemm = 0, rate = 0, standardise = 0, features = 0, io = 0, tokenize = 0, inside = 0;
    int found = 0;
    while (pipe && fgets(line, sizeof line, pipe))
        if (strstr(line, "time: gemm")) found = sscanf(strstr(line, "time:"),
                               "time: gemm %lf s (%lf GFLOP/s), standardise %lf s, features %lf s, hdf5+zstd %lf s, tokenize %lf s, total %lf s",
                               &gemm, &rate, &standardise, &features, &io, &tokenize, &inside) == 7;
    int status = pipe ? pclose(pipe) : -1;
    double total = es_now() - start;
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    if (system(command)) fprintf(stderr, "bench_project: cannot remove %s\n", dir);
    if (status != 0 || !found) {
        fprintf(stderr, "bench_project: essence-project failed or printed no timing line\n");
        return 1;
    }
    double other = total - gemm - standardise - features - io - tokenize;
    printf("essence-project d=%d -> D=%d, %lld tokens, %ld threads: %.0f tokens/s (%.2f s)\n", D_TEACHER, D_STUDENT, (long long)tokens,
           sysconf(_SC_NPROCESSORS_ONLN), (double)tokens / total, total);
    printf("  %-22s %8.3f s  %5.1f%%\n", "GEMM (sgemm phases)", gemm, 100 * gemm / total);
    printf("  %-22s %8.3f s  %5.1f%%\n", "standardise (x - μ)/s", standardise, 100 * standardise / total);
    printf("  %-22s %8.3f s  %5.1f%%\n", "features (sin, cos)", features, 100 * features / total);
    printf("  %-22s %8.3f s  %5.1f%%\n", "HDF5/zstd I/O", io, 100 * io / total);
    printf("  %-22s %8.3f s  %5.1f%%\n", "student tokenizer", tokenize, 100 * tokenize / total);
    printf("  %-22s %8.3f s  %5.1f%%\n", "other (start, Ω, exit)", other, 100 * other / total);
    printf("GEMM rate: %.1f GFLOP/s in essence-project vs %.1f GFLOP/s for OpenBLAS sgemm alone on 256x8192 . 8192x768: %.2fx (goal >= 0.70); "
           "OpenBLAS %s kernels\n", rate, blas, rate / blas, openblas_get_corename());
    return 0;
}
