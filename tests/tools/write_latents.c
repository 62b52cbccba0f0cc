/* Test tool: writes a latent dataset with the store, and the exact float32 values a reader
 * must get back, for the interoperability tests (h5py + hdf5plugin, h5dump).
 *   write_latents OUT.h5 ROWS WIDTH CHUNK_ROWS SEED [nonfinite]
 * writes OUT.h5 (/latents/layer_001, bf16 [ROWS, WIDTH], shuffle + zstd, root attributes)
 * and OUT.h5.f32 (ROWS*WIDTH little-endian float32). With "nonfinite", value (3, 1) is NaN,
 * (7, 0) is +Inf and (9, 2) is -Inf (ROWS >= 10, WIDTH >= 3). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "dtype.h"
#include "h5file.h"
#include "h5rows.h"
#include "log.h"

int main(int argc, char **argv) {
    es_set_program("write_latents");
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: write_latents OUT.h5 ROWS WIDTH CHUNK_ROWS SEED [nonfinite]\n");
        return ES_ERR_USAGE;
    }
    const char *path = argv[1];
    long long rows = atoll(argv[2]), width = atoll(argv[3]), chunk_rows = atoll(argv[4]);
    unsigned long long state = strtoull(argv[5], NULL, 10) * 0x9e3779b97f4a7c15ull + 1;
    float *values = malloc(sizeof(float) * (size_t)(rows * width));
    if (!values) return ES_ERR_RUNTIME;
    for (long long i = 0; i < rows * width; i++) {
        /* Box-Muller on a 64-bit LCG; scaled so that large and tiny magnitudes both occur. */
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        double u1 = ((state >> 11) + 1.0) / 9007199254740993.0;
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        double u2 = (state >> 11) / 9007199254740992.0;
        double normal = sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2);
        values[i] = es_bf16_to_f32(es_f32_to_bf16((float)(normal * (i % 97 == 0 ? 1000.0 : 1.0))));
    }
    if (argc == 7 && rows >= 10 && width >= 3) {
        values[3 * width + 1] = NAN;
        values[7 * width + 0] = INFINITY;
        values[9 * width + 2] = -INFINITY;
    }
    es_error err = {0};
    es_pool *pool = es_pool_create(0);
    es_h5file file;
    es_rows_writer writer;
    if (es_h5_create(&file, path, &err) ||
        es_h5_attr_set_str(file.id, "format", "essence.test", &err) ||
        es_h5_attr_set_i64(file.id, "format_version", 1, &err) ||
        es_rows_create(&writer, file.id, "/latents/layer_001", ES_H5_BF16, width, chunk_rows, 3, pool, &err) ||
        es_rows_append_f32(&writer, values, rows, &err) || es_rows_close(&writer, &err) ||
        es_h5_commit(&file, &err))
        es_exit_error(&err);
    char raw_path[4096];
    snprintf(raw_path, sizeof raw_path, "%s.f32", path);
    FILE *raw = fopen(raw_path, "wb");
    if (!raw || fwrite(values, sizeof(float), (size_t)(rows * width), raw) != (size_t)(rows * width) || fclose(raw)) {
        fprintf(stderr, "write_latents: cannot write %s\n", raw_path);
        return ES_ERR_RUNTIME;
    }
    es_pool_destroy(pool);
    free(values);
    return 0;
}
