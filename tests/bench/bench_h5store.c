/* Benchmark: the HDF5 latent store against the zstd command line on the same bytes.
 *
 * Writes then reads a bf16 latent dataset of ESSENCE_BENCH_MB megabytes (default 2048) of
 * rows x 8192 at zstd level 3, and runs `zstd -T<threads> -3` and `zstd -d -T<threads>` on the
 * same raw bytes in the same run. Reports MB/s (of raw bf16 bytes) and compression ratios.
 * The data: normally distributed values, rounded to bf16 (a stand-in for latents). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dtype.h"
#include "h5file.h"
#include "h5rows.h"
#include "log.h"
#include "progress.h"

enum { WIDTH = 8192 };

static double file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (double)st.st_size : 0;
}

static double run_timed(const char *command) {
    double start = es_now();
    if (system(command) != 0) {
        fprintf(stderr, "bench_h5store: command failed: %s\n", command);
        exit(1);
    }
    return es_now() - start;
}

int main(void) {
    es_set_program("bench_h5store");
    const char *mb_text = getenv("ESSENCE_BENCH_MB");
    const char *tmp = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    long threads_online = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = threads_online > 0 ? (int)threads_online : 1;
    double megabytes = mb_text ? atof(mb_text) : 2048;
    int64_t rows = (int64_t)(megabytes * 1e6 / (WIDTH * 2.0));
    size_t raw_bytes = (size_t)rows * WIDTH * 2;
    double raw_mb = (double)raw_bytes / 1e6;

    /* A table of 64Ki normal values indexed by a fast generator: realistic bytes, cheap to make. */
    static uint16_t table[65536];
    uint64_t state = 88172645463325252ull;
    for (int i = 0; i < 65536; i++) {
        double u1 = (i + 0.5) / 65536.0;
        /* inverse-CDF by bisection on erfc: exact quantiles, no RNG needed for the table */
        double lo = -10, hi = 10;
        for (int it = 0; it < 60; it++) {
            double mid = (lo + hi) / 2;
            (0.5 * erfc(-mid / sqrt(2.0)) < u1 ? (lo = mid) : (hi = mid));
        }
        table[i] = es_f32_to_bf16((float)lo);
    }
    uint16_t *data = malloc(raw_bytes);
    if (!data) {
        fprintf(stderr, "bench_h5store: cannot allocate %.0f MB\n", raw_mb);
        return 1;
    }
    for (size_t i = 0; i < raw_bytes / 2; i++) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        data[i] = table[state & 0xffff];
    }

    char dir[600], raw_path[700], zst_path[700], h5_path[700], command[2400];
    snprintf(dir, sizeof dir, "%s/essence-bench-XXXXXX", tmp);
    if (!mkdtemp(dir)) return 1;
    snprintf(raw_path, sizeof raw_path, "%s/latents.raw", dir);
    snprintf(zst_path, sizeof zst_path, "%s/latents.raw.zst", dir);
    snprintf(h5_path, sizeof h5_path, "%s/latents.h5", dir);
    FILE *raw = fopen(raw_path, "wb");
    if (!raw || fwrite(data, 1, raw_bytes, raw) != raw_bytes || fclose(raw)) return 1;

    printf("HDF5 latent store benchmark: %lld rows x %d bf16 = %.0f MB, zstd level 3, %d threads\n",
           (long long)rows, WIDTH, raw_mb, threads);

    /* zstd command line on the raw bytes (they are in the page cache, as our input is in memory). */
    snprintf(command, sizeof command, "zstd -q -f -T%d -3 '%s' -o '%s'", threads, raw_path, zst_path);
    double zstd_write = run_timed(command);
    snprintf(command, sizeof command, "zstd -q -d -T%d -c '%s' > /dev/null", threads, zst_path);
    double zstd_read = run_timed(command);
    double zstd_ratio = (double)raw_bytes / file_size(zst_path);

    /* The store: write (ending with the commit's fsync and rename), then read back. */
    es_error err = {0};
    es_pool *pool = es_pool_create(threads);
    es_h5file file;
    es_rows_writer writer;
    double start = es_now();
    if (es_h5_create(&file, h5_path, &err) ||
        es_rows_create(&writer, file.id, "/latents/layer_040", ES_H5_BF16, WIDTH, 0, 3, pool, &err))
        es_exit_error(&err);
    const int64_t batch = 256;
    for (int64_t first = 0; first < rows; first += batch) {
        int64_t n = rows - first < batch ? rows - first : batch;
        if (es_rows_append(&writer, data + (size_t)first * WIDTH, n, &err)) es_exit_error(&err);
    }
    if (es_rows_close(&writer, &err)) es_exit_error(&err);
    double before_commit = es_now();
    if (es_h5_commit(&file, &err)) es_exit_error(&err);
    double ours_write = es_now() - start, commit_time = es_now() - before_commit;
    double ours_ratio = (double)raw_bytes / file_size(h5_path);

    uint16_t *back = malloc((size_t)batch * 4 * WIDTH * 2);
    es_rows_reader reader;
    start = es_now();
    if (es_h5_open(&file, h5_path, &err) || es_rows_open(&reader, file.id, "/latents/layer_040", pool, &err))
        es_exit_error(&err);
    int same = 1;
    for (int64_t first = 0; first < rows; first += batch * 4) {
        int64_t n = rows - first < batch * 4 ? rows - first : batch * 4;
        if (es_rows_read(&reader, first, n, back, &err)) es_exit_error(&err);
        same &= memcmp(back, data + (size_t)first * WIDTH, (size_t)n * WIDTH * 2) == 0;
    }
    es_rows_close_reader(&reader);
    es_h5_close(&file, 0);
    double ours_read = es_now() - start;
    if (!same) {
        fprintf(stderr, "bench_h5store: data read back differs\n");
        return 1;
    }

    printf("%-34s %10s %10s %8s\n", "", "write MB/s", "read MB/s", "ratio");
    printf("%-34s %10.0f %10.0f %8.3f\n", "zstd command (-3, same bytes)", raw_mb / zstd_write, raw_mb / zstd_read,
           zstd_ratio);
    printf("%-34s %10.0f %10.0f %8.3f\n", "essence store (shuffle+zstd 3)", raw_mb / ours_write, raw_mb / ours_read,
           ours_ratio);
    printf("%-34s %10.2fx %9.2fx\n", "essence / zstd", zstd_write / ours_write, zstd_read / ours_read);
    printf("(store write time includes the commit: fsync + rename, %.2f s; the read includes checking the bytes)\n",
           commit_time);
    free(back);
    free(data);
    es_pool_destroy(pool);
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    return system(command) == 0 ? 0 : 1;
}
