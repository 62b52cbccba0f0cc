/* Reading HDF5 files other tools wrote (issue 12): columns converted to a fixed memory type
 * with range checks, integer/real/string attributes of any type, fixed-length strings, chunks
 * that were never written, a corrupt chunk among several on HDF5's own read path. The Python
 * test (tests/python/test_h5_read.py) does the same through the programs with h5py files. */
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <unistd.h>

#include "../testlib.h"
#include "h5file.h"
#include "h5rows.h"
#include "h5zstd.h"

/* A 1-D dataset of `type` holding `n` values given in memory as `mem_type`. */
static void write_column(hid_t file, const char *name, hid_t type, hid_t mem_type, const void *values, hsize_t n, hsize_t chunk,
                         int gzip) {
    hid_t space = H5Screate_simple(1, &n, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (chunk) H5Pset_chunk(dcpl, 1, &chunk);
    if (gzip) H5Pset_deflate(dcpl, 6);
    hid_t dataset = H5Dcreate2(file, name, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Dwrite(dataset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values);
    H5Dclose(dataset), H5Pclose(dcpl), H5Sclose(space);
}

TEST(columns_convert_to_the_type_read) {
    es_error err = {0};
    REQUIRE(es_h5_init(&err) == ES_OK);
    const char *path = test_path("columns.h5");
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    REQUIRE(file >= 0);
    int64_t wide[6] = {0, 7, -3, 2147483647, 12, 5};
    double floats[6] = {0, 1, 2, 3.0, 40000, -2};
    int64_t too_big[3] = {1, 2147483648LL, 3};
    double fraction[3] = {1, 2.5, 3};
    double nan_value[2] = {1, NAN};
    int16_t negative[3] = {1, -1, 0};
    write_column(file, "wide", H5T_STD_I64LE, H5T_NATIVE_INT64, wide, 6, 0, 0);
    write_column(file, "big_endian", H5T_STD_I64BE, H5T_NATIVE_INT64, wide, 6, 4, 1);
    write_column(file, "floats", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, floats, 6, 0, 0);
    write_column(file, "too_big", H5T_STD_I64LE, H5T_NATIVE_INT64, too_big, 3, 0, 0);
    write_column(file, "fraction", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, fraction, 3, 0, 0);
    write_column(file, "nan", H5T_IEEE_F32LE, H5T_NATIVE_DOUBLE, nan_value, 2, 0, 0);
    write_column(file, "negative", H5T_STD_I16LE, H5T_NATIVE_INT16, negative, 3, 0, 0);
    /* h5py's bool: an enum of int8 {FALSE = 0, TRUE = 1}, which HDF5 converts to no integer */
    hid_t boolean = H5Tenum_create(H5T_NATIVE_INT8);
    int8_t member = 0;
    H5Tenum_insert(boolean, "FALSE", &member);
    member = 1;
    H5Tenum_insert(boolean, "TRUE", &member);
    int8_t flags[4] = {0, 1, 1, 0};
    write_column(file, "bool", boolean, boolean, flags, 4, 0, 0);
    H5Tclose(boolean);
    hsize_t dims[2] = {3, 2};
    hid_t space = H5Screate_simple(2, dims, NULL);
    int32_t pairs[6] = {1, 2, 3, 4, 5, 6};
    hid_t two_d = H5Dcreate2(file, "two_d", H5T_STD_I32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(two_d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, pairs);
    H5Dclose(two_d), H5Sclose(space);
    H5Fclose(file);

    file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    REQUIRE(file >= 0);
    /* Each read lands in a buffer sized for the type read, with a guard after it. */
    int32_t ids[7];
    ids[6] = 0x5a5a5a5a;
    CHECK(es_rows_read_column(file, "wide", ES_H5_I32, 0, 6, ids, &err) == ES_OK && ids[3] == 2147483647 && ids[2] == -3 && ids[6] == 0x5a5a5a5a);
    CHECK(es_rows_read_column(file, "big_endian", ES_H5_I32, 1, 5, ids, &err) == ES_OK && ids[0] == 7 && ids[4] == 5);
    int64_t pointer[6];
    CHECK(es_rows_read_column(file, "floats", ES_H5_I64, 0, 6, pointer, &err) == ES_OK && pointer[4] == 40000 && pointer[5] == -2);
    uint8_t bytes[5] = {9, 9, 9, 9, 0x77};
    CHECK(es_rows_read_column(file, "bool", ES_H5_U8, 0, 4, bytes, &err) == ES_OK && bytes[1] == 1 && bytes[3] == 0 && bytes[4] == 0x77);
    es_error_clear(&err);
    CHECKF(es_rows_read_column(file, "too_big", ES_H5_I32, 0, 3, ids, &err) == ES_ERR_DATA && strstr(err.msg, "columns.h5:/too_big") &&
               strstr(err.msg, "row 1") && strstr(err.msg, "above the range of int32") && strstr(err.msg, "2147483648") &&
               strstr(err.msg, "int64"),
           "%s", err.msg);
    es_error_clear(&err);
    CHECKF(es_rows_read_column(file, "fraction", ES_H5_I64, 0, 3, pointer, &err) == ES_ERR_DATA && strstr(err.msg, "row 1") &&
               strstr(err.msg, "not an integer") && strstr(err.msg, "2.5"),
           "%s", err.msg);
    es_error_clear(&err);
    CHECKF(es_rows_read_column(file, "nan", ES_H5_I32, 0, 2, ids, &err) == ES_ERR_DATA && strstr(err.msg, "row 1"), "%s", err.msg);
    es_error_clear(&err);
    CHECKF(es_rows_read_column(file, "negative", ES_H5_U8, 0, 3, bytes, &err) == ES_ERR_DATA && strstr(err.msg, "below the range of uint8"),
           "%s", err.msg);
    es_error_clear(&err);
    CHECKF(es_rows_read_column(file, "two_d", ES_H5_I32, 0, 3, ids, &err) == ES_ERR_DATA && strstr(err.msg, "expected 1-D"), "%s", err.msg);
    es_error_clear(&err);
    /* the natural reader: int16 is read as int32, the enum as its base (int8 -> int32) */
    es_rows_reader reader;
    REQUIRE(es_rows_open(&reader, file, "negative", NULL, &err) == ES_OK);
    CHECK(reader.elem == ES_H5_I32 && reader.convert && es_rows_read(&reader, 0, 3, ids, &err) == ES_OK && ids[1] == -1);
    es_rows_close_reader(&reader);
    REQUIRE(es_rows_open(&reader, file, "wide", NULL, &err) == ES_OK);
    CHECK(reader.elem == ES_H5_I64 && !reader.convert);
    es_rows_close_reader(&reader);
    H5Fclose(file);
}

/* float16 and float64 latents come back as float32; integers are refused by read_f32. */
TEST(latents_of_other_float_types) {
    es_error err = {0};
    REQUIRE(es_h5_init(&err) == ES_OK);
    const char *path = test_path("latents.h5");
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hid_t half = H5Tcopy(H5T_IEEE_F32LE); /* IEEE binary16 */
    H5Tset_fields(half, 15, 10, 5, 0, 10), H5Tset_precision(half, 16), H5Tset_size(half, 2), H5Tset_ebias(half, 15);
    float values[4 * 3] = {1, -2, 0.5f, 65504, 3, 0.25f, -1, 8, 1024, 0, -0.125f, 7};
    hsize_t dims[2] = {4, 3};
    const struct { const char *name; hid_t type; } cases[] = {{"f16", half}, {"f64", H5T_IEEE_F64LE}, {"i32", H5T_STD_I32LE}};
    for (int c = 0; c < 3; c++) {
        hid_t space = H5Screate_simple(2, dims, NULL);
        hid_t dataset = H5Dcreate2(file, cases[c].name, cases[c].type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        H5Dwrite(dataset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values);
        H5Dclose(dataset), H5Sclose(space);
    }
    H5Tclose(half);
    H5Fclose(file);
    file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    float back[4 * 3 + 1];
    for (int c = 0; c < 2; c++) {
        es_rows_reader reader;
        REQUIRE(es_rows_open(&reader, file, cases[c].name, NULL, &err) == ES_OK);
        back[9] = 42;
        CHECKF(es_rows_is_float(&reader) && es_rows_read_f32(&reader, 1, 3, back, &err) == ES_OK && back[0] == 65504 &&
                   back[8] == 7 && back[9] == 42,
               "%s: %s", cases[c].name, err.msg);
        es_rows_close_reader(&reader);
    }
    es_rows_reader reader;
    REQUIRE(es_rows_open(&reader, file, "i32", NULL, &err) == ES_OK);
    CHECKF(!es_rows_is_float(&reader) && es_rows_read_f32(&reader, 0, 1, back, &err) == ES_ERR_DATA && strstr(err.msg, "int32"),
           "%s", err.msg);
    es_rows_close_reader(&reader);
    H5Fclose(file);
}

static void set_attr(hid_t obj, const char *name, hid_t type, const void *value, hsize_t points) {
    hid_t space = points ? H5Screate_simple(1, &points, NULL) : H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(attr, type, value);
    H5Aclose(attr), H5Sclose(space);
}

TEST(attributes_of_other_types) {
    es_error err = {0};
    REQUIRE(es_h5_init(&err) == ES_OK);
    const char *path = test_path("attrs.h5");
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    int32_t i32 = 64;
    uint64_t huge = UINT64_MAX;
    double integral = 64.0, fraction = 64.5;
    int16_t be = 300;
    int64_t pair[2] = {1, 2};
    set_attr(file, "i32", H5T_NATIVE_INT32, &i32, 0);
    set_attr(file, "u64", H5T_NATIVE_UINT64, &huge, 0);
    set_attr(file, "f_integral", H5T_NATIVE_DOUBLE, &integral, 0);
    set_attr(file, "f_fraction", H5T_NATIVE_DOUBLE, &fraction, 0);
    hid_t be16 = H5Tcopy(H5T_STD_I16BE);
    int16_t be_bytes = (int16_t)((be >> 8 & 0xff) | (be & 0xff) << 8);
    set_attr(file, "i16_be", be16, &be_bytes, 0);
    H5Tclose(be16);
    set_attr(file, "one_element", H5T_NATIVE_INT64, pair, 1);
    set_attr(file, "pair", H5T_NATIVE_INT64, pair, 2);
    CHECK(es_h5_attr_set_str(file, "digits", " 64 ", &err) == ES_OK);
    CHECK(es_h5_attr_set_str(file, "words", "64 wide", &err) == ES_OK);
    CHECK(es_h5_attr_set_str(file, "real", "1.5e-3", &err) == ES_OK);
    hid_t fixed = H5Tcopy(H5T_C_S1); /* h5py's np.bytes_: fixed-length, null-padded */
    H5Tset_size(fixed, 16), H5Tset_strpad(fixed, H5T_STR_NULLPAD);
    char text[16] = "essence.teacher";
    set_attr(file, "fixed", fixed, text, 0);
    H5Tset_strpad(fixed, H5T_STR_SPACEPAD);
    char padded[16] = "teacher        ";
    set_attr(file, "space_padded", fixed, padded, 0);
    H5Tclose(fixed);
    H5Fclose(file);

    file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    int64_t value = 0;
    double real = 0;
    char *string = NULL;
    CHECK(es_h5_attr_get_i64(file, "i32", &value, &err) == ES_OK && value == 64);
    CHECK(es_h5_attr_get_i64(file, "f_integral", &value, &err) == ES_OK && value == 64);
    CHECK(es_h5_attr_get_i64(file, "digits", &value, &err) == ES_OK && value == 64);
    CHECK(es_h5_attr_get_i64(file, "i16_be", &value, &err) == ES_OK && value == 300);
    CHECK(es_h5_attr_get_i64(file, "one_element", &value, &err) == ES_OK && value == 1);
    CHECK(es_h5_attr_get_f64(file, "i32", &real, &err) == ES_OK && real == 64);
    CHECK(es_h5_attr_get_f64(file, "real", &real, &err) == ES_OK && real == 1.5e-3);
    CHECK(es_h5_attr_get_str(file, "fixed", &string, &err) == ES_OK && string && !strcmp(string, "essence.teacher"));
    free(string);
    CHECK(es_h5_attr_get_str(file, "space_padded", &string, &err) == ES_OK && string && !strcmp(string, "teacher"));
    free(string);
    const struct { const char *name; const char *words[3]; } refused[] = {
        {"u64", {"u64", "uint64", "above the range of int64"}},
        {"f_fraction", {"f_fraction", "float64", "not an integer"}},
        {"words", {"words", "64 wide", "not an integer"}},
        {"pair", {"pair", "2 values", "single"}},
        {"fixed", {"fixed", "essence.teacher", "not an integer"}},
        {"absent", {"absent", "missing", "attrs.h5"}},
    };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        es_error_clear(&err);
        int rc = es_h5_attr_get_i64(file, refused[i].name, &value, &err);
        CHECKF(rc == ES_ERR_DATA && strstr(err.msg, refused[i].words[0]) && strstr(err.msg, refused[i].words[1]) &&
                   strstr(err.msg, refused[i].words[2]) && strstr(err.msg, "attrs.h5"),
               "%s: %s", refused[i].name, err.msg);
    }
    es_error_clear(&err);
    CHECKF(es_h5_attr_get_str(file, "i32", &string, &err) == ES_ERR_DATA && strstr(err.msg, "int32") && strstr(err.msg, "expected a string"),
           "%s", err.msg);
    H5Fclose(file);
}

TEST(strings_fixed_and_variable) {
    es_error err = {0};
    REQUIRE(es_h5_init(&err) == ES_OK);
    const char *path = test_path("strings.h5");
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t n = 3;
    hid_t space = H5Screate_simple(1, &n, NULL);
    hid_t fixed = H5Tcopy(H5T_C_S1);
    H5Tset_size(fixed, 4);
    char raw[12] = {'a', 'b', 'c', 'd', 'x', 0, 0, 0, 'y', 'z', 0, 0}; /* a full one: no NUL at all */
    hid_t dataset = H5Dcreate2(file, "fixed", fixed, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(dataset, fixed, H5S_ALL, H5S_ALL, H5P_DEFAULT, raw);
    H5Dclose(dataset);
    hid_t vlen = H5Tcopy(H5T_C_S1);
    H5Tset_size(vlen, H5T_VARIABLE); /* ASCII, as h5py writes bytes objects */
    const char *texts[3] = {"first", "", "third"};
    dataset = H5Dcreate2(file, "vlen_ascii", vlen, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(dataset, vlen, H5S_ALL, H5S_ALL, H5P_DEFAULT, texts);
    H5Dclose(dataset);
    int32_t numbers[3] = {1, 2, 3};
    dataset = H5Dcreate2(file, "numbers", H5T_STD_I32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(dataset, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, numbers);
    H5Dclose(dataset);
    H5Tclose(fixed), H5Tclose(vlen), H5Sclose(space);
    H5Fclose(file);

    file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    char *out[3] = {0};
    dataset = H5Dopen2(file, "fixed", H5P_DEFAULT);
    CHECK(es_h5_read_strings(dataset, "fixed", 0, 3, out, &err) == ES_OK && out[0] && !strcmp(out[0], "abcd") && !strcmp(out[1], "x") &&
          !strcmp(out[2], "yz"));
    for (int i = 0; i < 3; i++) free(out[i]), out[i] = NULL;
    CHECK(es_h5_read_strings(dataset, "fixed", 2, 2, out, &err) == ES_ERR_DATA && strstr(err.msg, "the dataset has 3"));
    H5Dclose(dataset);
    es_error_clear(&err);
    dataset = H5Dopen2(file, "vlen_ascii", H5P_DEFAULT);
    CHECK(es_h5_read_strings(dataset, "vlen_ascii", 1, 2, out, &err) == ES_OK && !strcmp(out[0], "") && !strcmp(out[1], "third"));
    for (int i = 0; i < 3; i++) free(out[i]), out[i] = NULL;
    H5Dclose(dataset);
    dataset = H5Dopen2(file, "numbers", H5P_DEFAULT);
    CHECKF(es_h5_read_strings(dataset, "numbers", 0, 1, out, &err) == ES_ERR_DATA && strstr(err.msg, "int32") && !out[0], "%s", err.msg);
    H5Dclose(dataset);
    H5Fclose(file);
}

/* Chunks never written read as the fill value HDF5 knows; a corrupt chunk among several on
 * HDF5's own path (gzip here) is found and named with its rows. */
TEST(unwritten_and_corrupt_chunks) {
    es_error err = {0};
    REQUIRE(es_h5_init(&err) == ES_OK);
    const char *path = test_path("chunks.h5");
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    enum { N = 100 };
    int32_t values[N];
    for (int i = 0; i < N; i++) values[i] = i * 1000 + 7;
    write_column(file, "gzip", H5T_STD_I32LE, H5T_NATIVE_INT32, values, N, 10, 1);
    /* our own layout ([shuffle,] zstd whole-row chunks) where only the first chunk was written */
    es_rows_writer writer;
    REQUIRE(es_rows_create(&writer, file, "sparse", ES_H5_I32, 0, 16, 3, NULL, &err) == ES_OK);
    CHECK(es_rows_append(&writer, values, 16, &err) == ES_OK && es_rows_close(&writer, &err) == ES_OK);
    hid_t dataset = H5Dopen2(file, "sparse", H5P_DEFAULT);
    hsize_t size = 50;
    CHECK(H5Dset_extent(dataset, &size) >= 0); /* rows 16..49: chunks 1..3 never written */
    H5Dclose(dataset);
    H5Fclose(file);

    file = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    es_rows_reader reader;
    REQUIRE(es_rows_open(&reader, file, "sparse", NULL, &err) == ES_OK);
    CHECK(reader.direct);
    int32_t back[N];
    memset(back, 0x55, sizeof back);
    CHECKF(es_rows_read(&reader, 10, 40, back, &err) == ES_OK && back[0] == 10007 && back[5] == 15007 && back[6] == 0 && back[39] == 0,
           "%s", err.msg);
    es_rows_close_reader(&reader);
    dataset = H5Dopen2(file, "gzip", H5P_DEFAULT);
    hsize_t offset = 30, chunk_size = 0;
    haddr_t address = 0;
    unsigned mask = 0;
    REQUIRE(H5Dget_chunk_info_by_coord(dataset, &offset, &mask, &address, &chunk_size) >= 0);
    H5Dclose(dataset);
    H5Fclose(file);
    int fd = open(path, O_RDWR);
    REQUIRE(fd >= 0);
    uint8_t byte = 0;
    CHECK(pread(fd, &byte, 1, (off_t)(address + chunk_size / 2)) == 1);
    byte ^= 0xff;
    CHECK(pwrite(fd, &byte, 1, (off_t)(address + chunk_size / 2)) == 1);
    close(fd);

    file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    CHECK(es_rows_read_column(file, "gzip", ES_H5_I32, 0, 30, back, &err) == ES_OK && back[29] == 29007);
    CHECKF(es_rows_read_column(file, "gzip", ES_H5_I32, 5, 90, back, &err) == ES_ERR_DATA && strstr(err.msg, "chunks.h5:/gzip") &&
               strstr(err.msg, "chunk 3 (rows 30..39)"),
           "%s", err.msg);
    H5Fclose(file);
}

/* Sizes a corrupt file could claim are refused before they are allocated. */
TEST(claimed_sizes_are_bounded) {
    es_error err = {0};
    REQUIRE(es_h5_init(&err) == ES_OK);
    size_t n = 100000, cap = n;
    void *buf = calloc(1, n);
    REQUIRE(buf);
    unsigned level = 3;
    size_t packed = es_h5zstd_filter(0, 1, &level, n, &cap, &buf);
    REQUIRE(packed > 0);
    size_t saved = es_h5zstd_max_chunk_bytes;
    es_h5zstd_max_chunk_bytes = 50000; /* the frame says 100000 */
    CHECK(es_h5zstd_filter(H5Z_FLAG_REVERSE, 1, &level, packed, &cap, &buf) == 0);
    es_h5zstd_max_chunk_bytes = saved;
    CHECK(es_h5zstd_filter(H5Z_FLAG_REVERSE, 1, &level, packed, &cap, &buf) == n);
    free(buf);

    const char *path = test_path("long_strings.h5");
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, (size_t)2 << 20);
    hsize_t one = 1;
    hid_t space = H5Screate_simple(1, &one, NULL);
    hid_t dataset = H5Dcreate2(file, "ids", type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    char *out[1] = {NULL};
    CHECKF(es_h5_read_strings(dataset, "long_strings.h5:/ids", 0, 1, out, &err) == ES_ERR_DATA && strstr(err.msg, "2097152 bytes") &&
               !out[0],
           "%s", err.msg);
    H5Dclose(dataset), H5Sclose(space), H5Tclose(type), H5Fclose(file);
}

int main(void) {
    RUN(columns_convert_to_the_type_read);
    RUN(latents_of_other_float_types);
    RUN(attributes_of_other_types);
    RUN(strings_fixed_and_variable);
    RUN(unwritten_and_corrupt_chunks);
    RUN(claimed_sizes_are_bounded);
    return test_summary();
}
