/* The HDF5 latent store: bf16 type and rounding, row datasets through the worker pool and
 * direct chunk I/O, interoperability with HDF5's own read path, .partial/commit, resume,
 * corruption detection, attributes. */
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <math.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../testlib.h"
#include "dtype.h"
#include "h5file.h"
#include "h5rows.h"
#include "h5zstd.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rng_next(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12, rng_state ^= rng_state << 25, rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545f4914f6cdd1dull) >> 32);
}
static float rng_normal(void) {
    double u1 = (rng_next() + 1.0) / 4294967297.0, u2 = rng_next() / 4294967296.0;
    return (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

TEST(bf16_rounding_matches_hdf5) {
    es_error err = {0};
    REQUIRE(es_h5_init(&err) == ES_OK);
    enum { N = 200000 };
    static uint32_t bits[N];
    static float values[N];
    for (int i = 0; i < N; i++) {
        uint32_t u = rng_next();
        if (i % 4 == 1) u = (u & 0xffff0000u) | 0x8000u;           /* exact ties */
        if (i % 4 == 2) u = (u & 0x807fffffu) | ((uint32_t)(1 + i % 253) << 23); /* normal */
        if ((u & 0x7f800000u) == 0) u |= 0x00800000u;                /* no subnormals (docs/formats.md) */
        bits[i] = u;
    }
    uint32_t specials[] = {0x7f7fffffu, 0xff7fffffu, 0x7f7f8000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                           0xffc00001u, 0x7f800001u, 0x00000000u, 0x80000000u, 0x3f808000u, 0x3f818000u};
    memcpy(bits, specials, sizeof specials);
    memcpy(values, bits, sizeof values);
    static uint16_t ours[N];
    es_f32_to_bf16_array(ours, values, N);
    /* HDF5 converts in place, fp32 -> bf16. */
    REQUIRE(H5Tconvert(H5T_IEEE_F32LE, es_h5_bf16_type(), N, values, NULL, H5P_DEFAULT) >= 0);
    const uint16_t *theirs = (const uint16_t *)values;
    int mismatches = 0;
    for (int i = 0; i < N; i++) {
        if (ours[i] != theirs[i]) {
            if (mismatches++ < 5) printf("  fp32 %08x: ours %04x, HDF5 %04x\n", bits[i], ours[i], theirs[i]);
        }
    }
    CHECKF(mismatches == 0, "%d of %d values round differently", mismatches, N);
    /* And back: bf16 -> fp32 is exact both ways. */
    for (int i = 0; i < 1000; i++) {
        uint16_t h = (uint16_t)rng_next();
        if ((h & 0x7f80) == 0x7f80 && (h & 0x7f)) continue; /* NaN payloads may differ */
        float via_hdf5;
        memcpy(&via_hdf5, &h, 2);
        CHECK(H5Tconvert(es_h5_bf16_type(), H5T_IEEE_F32LE, 1, &via_hdf5, NULL, H5P_DEFAULT) >= 0);
        float ours_f = es_bf16_to_f32(h);
        CHECK(memcmp(&ours_f, &via_hdf5, 4) == 0);
    }
}

/* Writes rows of random bf16 in uneven appends, then checks every row read back three ways. */
static void roundtrip(const char *tl_name, es_pool *pool, int64_t rows, int64_t width, int64_t chunk_rows) {
    es_error err = {0};
    const char *path = test_path(pool ? "rows_pool.h5" : "rows_serial.h5");
    char partial[700];
    snprintf(partial, sizeof partial, "%s.partial", path);
    float *values = malloc(sizeof(float) * (size_t)(rows * width));
    uint16_t *bits = malloc(2 * (size_t)(rows * width));
    for (int64_t i = 0; i < rows * width; i++) {
        bits[i] = es_f32_to_bf16(rng_normal() * 3);
        values[i] = es_bf16_to_f32(bits[i]);
    }
    es_h5file file;
    REQUIRE(es_h5_create(&file, path, &err) == ES_OK);
    es_rows_writer writer;
    REQUIRE(es_rows_create(&writer, file.id, "/latents/layer_001", ES_H5_BF16, width, chunk_rows, 3, pool, &err) == ES_OK);
    int64_t done = 0, step = 1;
    while (done < rows) { /* appends of 1, 2, 3, ... rows, with a flush now and then */
        int64_t take = rows - done < step ? rows - done : step;
        CHECK(es_rows_append_f32(&writer, values + done * width, take, &err) == ES_OK);
        done += take;
        if (step++ % 5 == 0) CHECK(es_rows_flush(&writer, &err) == ES_OK);
    }
    CHECK(es_rows_close(&writer, &err) == ES_OK);
    CHECK(!file_exists(path) && file_exists(partial));
    CHECKF(es_h5_commit(&file, &err) == ES_OK, "%s", err.msg);
    CHECK(file_exists(path) && !file_exists(partial));

    REQUIRE(es_h5_open(&file, path, &err) == ES_OK);
    es_rows_reader reader;
    REQUIRE(es_rows_open(&reader, file.id, "/latents/layer_001", pool, &err) == ES_OK);
    CHECK(reader.direct && reader.shuffled && reader.elem == ES_H5_BF16);
    CHECK(reader.rows == rows && reader.width == width && reader.chunk_rows == chunk_rows);
    float *back = malloc(sizeof(float) * (size_t)(rows * width));
    CHECK(es_rows_read_f32(&reader, 0, rows, back, &err) == ES_OK);
    CHECK(memcmp(back, values, sizeof(float) * (size_t)(rows * width)) == 0);
    /* Ranges that start and end inside chunks. */
    for (int64_t first = 0; first < rows; first += chunk_rows / 3 + 1) {
        int64_t n = rows - first < chunk_rows + 2 ? rows - first : chunk_rows + 2;
        memset(back, 0xff, sizeof(float) * (size_t)(n * width));
        CHECK(es_rows_read_f32(&reader, first, n, back, &err) == ES_OK);
        CHECK(memcmp(back, values + first * width, sizeof(float) * (size_t)(n * width)) == 0);
    }
    CHECK(es_rows_read_f32(&reader, rows - 1, 2, back, &err) == ES_ERR_DATA);
    es_rows_close_reader(&reader);
    /* HDF5's own read path (the registered filter), asking for float32: exact values. */
    hid_t dataset = H5Dopen2(file.id, "/latents/layer_001", H5P_DEFAULT);
    memset(back, 0, sizeof(float) * (size_t)(rows * width));
    CHECK(H5Dread(dataset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, back) >= 0);
    CHECK(memcmp(back, values, sizeof(float) * (size_t)(rows * width)) == 0);
    H5Dclose(dataset);
    es_h5_close(&file, 0);
    free(values), free(bits), free(back);
}

TEST(rows_roundtrip_pool) {
    es_pool *pool = es_pool_create(3);
    REQUIRE(pool);
    roundtrip(tl_name, pool, 1000, 40, 64); /* 15 full chunks + a partial one */
    es_pool_destroy(pool);
}

TEST(rows_roundtrip_serial) { roundtrip(tl_name, NULL, 77, 5, 16); }

TEST(rows_other_types) {
    es_error err = {0};
    const char *path = test_path("types.h5");
    es_h5file file;
    REQUIRE(es_h5_create(&file, path, &err) == ES_OK);
    int64_t ids[300];
    int32_t small[300];
    uint8_t bytes[300];
    for (int i = 0; i < 300; i++) ids[i] = (int64_t)rng_next() << 20, small[i] = (int32_t)rng_next(), bytes[i] = (uint8_t)i;
    es_rows_writer writer;
    REQUIRE(es_rows_create(&writer, file.id, "/tokens/id64", ES_H5_I64, 0, 128, 3, NULL, &err) == ES_OK);
    CHECK(es_rows_append(&writer, ids, 300, &err) == ES_OK && es_rows_close(&writer, &err) == ES_OK);
    REQUIRE(es_rows_create(&writer, file.id, "/tokens/id32", ES_H5_I32, 0, 0, 3, NULL, &err) == ES_OK);
    CHECK(es_rows_append(&writer, small, 300, &err) == ES_OK && es_rows_close(&writer, &err) == ES_OK);
    REQUIRE(es_rows_create(&writer, file.id, "/samples/text_bytes", ES_H5_U8, 0, 100, 19, NULL, &err) == ES_OK);
    CHECK(es_rows_append(&writer, bytes, 300, &err) == ES_OK && es_rows_close(&writer, &err) == ES_OK);
    REQUIRE(es_h5_commit(&file, &err) == ES_OK);
    REQUIRE(es_h5_open(&file, path, &err) == ES_OK);
    es_rows_reader reader;
    int64_t ids_back[300];
    int32_t small_back[300];
    uint8_t bytes_back[300];
    REQUIRE(es_rows_open(&reader, file.id, "/tokens/id64", NULL, &err) == ES_OK);
    CHECK(reader.elem == ES_H5_I64 && reader.rank == 1 && reader.rows == 300);
    CHECK(es_rows_read(&reader, 0, 300, ids_back, &err) == ES_OK && !memcmp(ids, ids_back, sizeof ids));
    es_rows_close_reader(&reader);
    REQUIRE(es_rows_open(&reader, file.id, "/tokens/id32", NULL, &err) == ES_OK);
    CHECK(es_rows_read(&reader, 0, 300, small_back, &err) == ES_OK && !memcmp(small, small_back, sizeof small));
    es_rows_close_reader(&reader);
    REQUIRE(es_rows_open(&reader, file.id, "/samples/text_bytes", NULL, &err) == ES_OK);
    CHECK(es_rows_read(&reader, 0, 300, bytes_back, &err) == ES_OK && !memcmp(bytes, bytes_back, sizeof bytes));
    CHECK(es_rows_read_f32(&reader, 0, 1, (float *)small_back, &err) == ES_ERR_DATA);
    es_rows_close_reader(&reader);
    es_h5_close(&file, 0);
}

TEST(resume_partial) {
    es_error err = {0};
    const char *path = test_path("resume.h5");
    enum { W = 12, CHUNK = 10, ROWS = 95 };
    float values[ROWS * W];
    for (int i = 0; i < ROWS * W; i++) values[i] = es_bf16_to_f32(es_f32_to_bf16(rng_normal()));
    es_pool *pool = es_pool_create(2);
    es_h5file file;
    REQUIRE(es_h5_create(&file, path, &err) == ES_OK);
    es_rows_writer writer;
    REQUIRE(es_rows_create(&writer, file.id, "/latents/layer_002", ES_H5_BF16, W, CHUNK, 3, pool, &err) == ES_OK);
    CHECK(es_rows_append_f32(&writer, values, 37, &err) == ES_OK);
    CHECK(es_rows_close(&writer, &err) == ES_OK);
    es_h5_close(&file, 0); /* as if the run stopped here: only the .partial remains */
    CHECK(!file_exists(path));

    /* Resume: keep 33 of the 37 rows (the last committed sample ended there), append the rest. */
    REQUIRE(es_h5_open_partial(&file, path, &err) == ES_OK);
    REQUIRE(es_rows_open_append(&writer, file.id, "/latents/layer_002", 33, pool, &err) == ES_OK);
    CHECK(writer.rows == 33 && writer.chunk_rows == CHUNK && writer.width == W);
    CHECK(es_rows_append_f32(&writer, values + 33 * W, ROWS - 33, &err) == ES_OK);
    CHECK(es_rows_close(&writer, &err) == ES_OK);
    CHECK(es_h5_commit(&file, &err) == ES_OK);

    REQUIRE(es_h5_open(&file, path, &err) == ES_OK);
    es_rows_reader reader;
    REQUIRE(es_rows_open(&reader, file.id, "/latents/layer_002", pool, &err) == ES_OK);
    CHECK(reader.rows == ROWS);
    float back[ROWS * W];
    CHECK(es_rows_read_f32(&reader, 0, ROWS, back, &err) == ES_OK);
    CHECK(memcmp(back, values, sizeof back) == 0);
    es_rows_close_reader(&reader);
    es_h5_close(&file, 0);
    /* Asking to keep more rows than there are is a data error. */
    REQUIRE(es_h5_create(&file, path, &err) == ES_OK);
    REQUIRE(es_rows_create(&writer, file.id, "x", ES_H5_BF16, W, CHUNK, 3, pool, &err) == ES_OK);
    CHECK(es_rows_append_f32(&writer, values, 5, &err) == ES_OK && es_rows_close(&writer, &err) == ES_OK);
    CHECK(es_rows_open_append(&writer, file.id, "x", 6, pool, &err) == ES_ERR_DATA);
    es_h5_close(&file, 1);
    es_pool_destroy(pool);
}

TEST(corrupt_chunk_is_reported) {
    es_error err = {0};
    const char *path = test_path("corrupt.h5");
    enum { W = 64, ROWS = 256 };
    static float values[ROWS * W];
    for (int i = 0; i < ROWS * W; i++) values[i] = rng_normal();
    es_h5file file;
    REQUIRE(es_h5_create(&file, path, &err) == ES_OK);
    es_rows_writer writer;
    REQUIRE(es_rows_create(&writer, file.id, "d", ES_H5_BF16, W, 64, 3, NULL, &err) == ES_OK);
    CHECK(es_rows_append_f32(&writer, values, ROWS, &err) == ES_OK && es_rows_close(&writer, &err) == ES_OK);
    REQUIRE(es_h5_commit(&file, &err) == ES_OK);
    /* Find chunk 2's bytes in the file and flip one in the middle. */
    REQUIRE(es_h5_open(&file, path, &err) == ES_OK);
    hid_t dataset = H5Dopen2(file.id, "d", H5P_DEFAULT);
    hsize_t offset[2] = {128, 0}, size = 0;
    haddr_t address = 0;
    unsigned mask = 0;
    REQUIRE(H5Dget_chunk_info_by_coord(dataset, offset, &mask, &address, &size) >= 0);
    H5Dclose(dataset);
    es_h5_close(&file, 0);
    int fd = open(path, O_RDWR);
    REQUIRE(fd >= 0);
    uint8_t byte;
    off_t at = (off_t)(address + size / 2);
    CHECK(pread(fd, &byte, 1, at) == 1);
    byte ^= 0x10;
    CHECK(pwrite(fd, &byte, 1, at) == 1);
    close(fd);

    REQUIRE(es_h5_open(&file, path, &err) == ES_OK);
    es_rows_reader reader;
    REQUIRE(es_rows_open(&reader, file.id, "d", NULL, &err) == ES_OK);
    static float back[ROWS * W];
    CHECK(es_rows_read_f32(&reader, 0, 128, back, &err) == ES_OK); /* chunks 0 and 1 are intact */
    CHECK(es_rows_read_f32(&reader, 100, 100, back, &err) == ES_ERR_DATA);
    CHECKF(strstr(err.msg, "corrupt.h5") && strstr(err.msg, "chunk 2") && strstr(err.msg, "rows 128..191"),
           "%s", err.msg);
    es_rows_close_reader(&reader);
    es_h5_close(&file, 0);
}

TEST(open_errors) {
    es_error err = {0};
    es_h5file file;
    CHECK(es_h5_open(&file, test_path("missing.h5"), &err) == ES_ERR_USAGE);
    CHECK(strstr(err.msg, "missing.h5") != NULL);
    const char *junk = test_path("junk.h5");
    FILE *f = fopen(junk, "w");
    fputs("this is not HDF5\n", f);
    fclose(f);
    es_error_clear(&err);
    CHECK(es_h5_open(&file, junk, &err) == ES_ERR_DATA);
    CHECK(strstr(err.msg, "junk.h5") != NULL);
    es_error_clear(&err);
    CHECK(es_h5_open_partial(&file, junk, &err) == ES_ERR_USAGE); /* no junk.h5.partial */
}

TEST(attributes) {
    es_error err = {0};
    const char *path = test_path("attrs.h5");
    es_h5file file;
    REQUIRE(es_h5_create(&file, path, &err) == ES_OK);
    CHECK(es_h5_attr_set_str(file.id, "format", "essence.teacher", &err) == ES_OK);
    CHECK(es_h5_attr_set_str(file.id, "config", "layers: \"20,40\"\nnote: \xe2\x9c\x93\n", &err) == ES_OK);
    CHECK(es_h5_attr_set_i64(file.id, "format_version", 1, &err) == ES_OK);
    CHECK(es_h5_attr_set_f64(file.id, "sigma", 1.5, &err) == ES_OK);
    CHECK(es_h5_attr_set_i64(file.id, "format_version", 2, &err) == ES_OK); /* replaced */
    hid_t group = es_h5_group(file.id, "/stats/layer_020", &err);
    CHECK(group >= 0);
    H5Gclose(group);
    REQUIRE(es_h5_commit(&file, &err) == ES_OK);
    REQUIRE(es_h5_open(&file, path, &err) == ES_OK);
    char *text = NULL;
    int64_t version = 0;
    double sigma = 0;
    CHECK(es_h5_attr_get_str(file.id, "format", &text, &err) == ES_OK && text && !strcmp(text, "essence.teacher"));
    free(text);
    CHECK(es_h5_attr_get_str(file.id, "config", &text, &err) == ES_OK && text && strstr(text, "\xe2\x9c\x93"));
    free(text);
    CHECK(es_h5_attr_get_i64(file.id, "format_version", &version, &err) == ES_OK && version == 2);
    CHECK(es_h5_attr_get_f64(file.id, "sigma", &sigma, &err) == ES_OK && sigma == 1.5);
    CHECK(es_h5_attr_get_i64(file.id, "format", &version, &err) == ES_ERR_DATA);
    es_error_clear(&err);
    CHECK(es_h5_attr_get_str(file.id, "nope", &text, &err) == ES_ERR_DATA && strstr(err.msg, "nope"));
    CHECK(H5Lexists(file.id, "/stats/layer_020", H5P_DEFAULT) > 0);
    es_h5_close(&file, 0);
}

TEST(zstd_filter_frames) {
    /* The filter function as HDF5 calls it: compress, then decompress; garbage fails. */
    size_t n = 100000, cap = n;
    void *buf = malloc(n);
    for (size_t i = 0; i < n; i++) ((uint8_t *)buf)[i] = (uint8_t)(i % 251);
    unsigned level = 5;
    size_t packed = es_h5zstd_filter(0, 1, &level, n, &cap, &buf);
    REQUIRE(packed > 0 && packed < n);
    size_t plain = es_h5zstd_filter(H5Z_FLAG_REVERSE, 1, &level, packed, &cap, &buf);
    CHECK(plain == n);
    int same = 1;
    for (size_t i = 0; i < n && same; i++) same = ((uint8_t *)buf)[i] == (uint8_t)(i % 251);
    CHECK(same);
    packed = es_h5zstd_filter(0, 0, NULL, n, &cap, &buf);
    ((uint8_t *)buf)[packed / 2] ^= 1; /* content checksum must catch it */
    CHECK(es_h5zstd_filter(H5Z_FLAG_REVERSE, 0, NULL, packed, &cap, &buf) == 0);
    CHECK(es_h5zstd_filter(H5Z_FLAG_REVERSE, 0, NULL, packed / 2, &cap, &buf) == 0); /* truncated */
    free(buf);
}

/* A disk that fills up mid-write (a file size limit, as a full disk would): the write fails
 * with a runtime error naming the file, and nothing is left under the final name. */
TEST(write_error_leaves_nothing_complete) {
    const char *path = test_path("full.h5");
    char partial[700];
    snprintf(partial, sizeof partial, "%s.partial", path);
    int pipe_fds[2];
    REQUIRE(pipe(pipe_fds) == 0);
    pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        signal(SIGXFSZ, SIG_IGN); /* make write() fail with EFBIG instead of killing us */
        struct rlimit limit = {512 * 1024, 512 * 1024};
        setrlimit(RLIMIT_FSIZE, &limit);
        es_error err = {0};
        es_pool *pool = es_pool_create(2);
        es_h5file file;
        es_rows_writer writer = {.dataset = -1};
        static float rows[64 * 1024];
        for (size_t i = 0; i < sizeof rows / sizeof *rows; i++) rows[i] = rng_normal();
        int rc = es_h5_create(&file, path, &err);
        if (!rc) rc = es_rows_create(&writer, file.id, "/latents/layer_001", ES_H5_BF16, 1024, 16, 1, pool, &err);
        for (int i = 0; !rc && i < 64; i++) rc = es_rows_append_f32(&writer, rows, 64, &err);
        if (writer.dataset >= 0) {
            int close_rc = es_rows_close(&writer, &err);
            if (!rc) rc = close_rc;
        }
        if (!rc) rc = es_h5_commit(&file, &err);
        else es_h5_close(&file, 1); /* what a program does on failure: drop the .partial */
        dprintf(pipe_fds[1], "%d %s", rc, err.msg);
        _exit(0);
    }
    close(pipe_fds[1]);
    char report[1200] = {0};
    ssize_t got = read(pipe_fds[0], report, sizeof report - 1);
    close(pipe_fds[0]);
    int status;
    waitpid(child, &status, 0);
    REQUIRE(got > 0);
    CHECKF(atoi(report) == ES_ERR_RUNTIME && strstr(report, "full.h5"), "%s", report);
    printf("  (reported: %s)\n", strchr(report, ' ') ? strchr(report, ' ') + 1 : report);
    CHECK(!file_exists(path) && !file_exists(partial));
}

int main(void) {
    RUN(bf16_rounding_matches_hdf5);
    RUN(rows_roundtrip_pool);
    RUN(rows_roundtrip_serial);
    RUN(rows_other_types);
    RUN(resume_partial);
    RUN(corrupt_chunk_is_reported);
    RUN(open_errors);
    RUN(attributes);
    RUN(zstd_filter_frames);
    RUN(write_error_leaves_nothing_complete);
    return test_summary();
}
