/* libFuzzer target: our HDF5 readers over any bytes. The input is written to a file in /dev/shm,
 * opened by es_h5_open (which first reads every variable-length value in a child process: see
 * common/h5heap.c) and read as essence-project, essence-align and essence-inspect read
 * teacher.h5 / student.h5: the root attributes (variable-length strings included), the samples
 * and tokens tables as their fixed types, the sample ids, and rows of every /latents and
 * /targets layer in fp32. Whatever the bytes: no crash, no leak, no read outside a buffer; every refusal is
 * ES_ERR_DATA or ES_ERR_RUNTIME (out of memory) with a message, never a signal.
 *
 * Limits of the target itself, not of the readers: at most 64 rows and 4096 values per row are
 * read from a dataset, and a dataset whose declared chunk exceeds 16 MiB is not read (HDF5
 * allocates a whole chunk to read one; the readers take such files, the fuzzer's memory limit
 * would not). */
#include <hdf5.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "h5file.h"
#include "h5rows.h"
#include "h5zstd.h"

/* libhdf5 1.10.8 itself leaks on some malformed files: H5Dopen2 on a corrupt object header
 * (H5D__open_name -> H5O_obj_type -> H5O_protect -> H5C_protect) keeps the metadata cache
 * entry it allocated. Allocations made inside libhdf5 are not reported; ours still are (an
 * HDF5 object we forgot to close is no leak: the library's id table holds it). */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) { return "leak:libhdf5_serial.so\n"; }

enum { MAX_ROWS = 64, MAX_WIDTH = 4096, MAX_LAYERS = 8 };
#define MAX_CHUNK_BYTES ((size_t)16 << 20)

static void expect_refusal(int rc, const es_error *err) {
    if (rc == ES_OK) return;
    /* A refusal says why: bad data, or (rarely) a resource that ran out. */
    if ((rc != ES_ERR_DATA && rc != ES_ERR_RUNTIME) || err->code != rc || !err->msg[0]) abort();
}

/* Whether HDF5 would have to allocate more than the target allows to read one chunk. */
static int chunk_too_large(hid_t file, const char *name) {
    hid_t dataset = H5Dopen2(file, name, H5P_DEFAULT);
    if (dataset < 0) return 0; /* the reader reports it */
    hid_t dcpl = H5Dget_create_plist(dataset), type = H5Dget_type(dataset);
    int large = 0;
    if (dcpl >= 0 && type >= 0 && H5Pget_layout(dcpl) == H5D_CHUNKED) {
        hsize_t chunk[H5S_MAX_RANK];
        int rank = H5Pget_chunk(dcpl, H5S_MAX_RANK, chunk);
        double bytes = (double)H5Tget_size(type);
        for (int i = 0; i < rank; i++) bytes *= (double)chunk[i];
        large = rank < 0 || bytes > (double)MAX_CHUNK_BYTES;
    }
    if (type >= 0) H5Tclose(type);
    if (dcpl >= 0) H5Pclose(dcpl);
    H5Dclose(dataset);
    return large;
}

static int exists(hid_t file, const char *path) {
    /* H5Lexists fails on a missing group along the path: check each prefix. */
    char prefix[128];
    for (const char *p = path + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            size_t len = (size_t)(p - path);
            if (len >= sizeof prefix) return 0;
            memcpy(prefix, path, len);
            prefix[len] = '\0';
            if (H5Lexists(file, prefix, H5P_DEFAULT) <= 0) return 0;
            if (*p == '\0') return 1;
        }
    }
}

static void read_column(hid_t file, const char *name, es_h5_elem elem) {
    if (!exists(file, name) || chunk_too_large(file, name)) return;
    es_rows_reader reader;
    es_error err = {0};
    int rc = es_rows_open_column(&reader, file, name, elem, NULL, &err);
    expect_refusal(rc, &err);
    if (rc) return;
    int64_t values[2 * MAX_ROWS + 1];
    int64_t n = reader.rows < MAX_ROWS ? reader.rows : MAX_ROWS;
    rc = es_rows_read(&reader, 0, n, values, &err);
    expect_refusal(rc, &err);
    if (reader.rows > n) { /* the last rows too: another chunk, maybe a partial one */
        es_error_clear(&err);
        expect_refusal(es_rows_read(&reader, reader.rows - n, n, values, &err), &err);
    }
    es_rows_close_reader(&reader);
}

static void read_layer(hid_t file, const char *name) {
    if (chunk_too_large(file, name)) return;
    es_rows_reader reader;
    es_error err = {0};
    int rc = es_rows_open(&reader, file, name, NULL, &err);
    expect_refusal(rc, &err);
    if (rc) return;
    if (reader.width <= MAX_WIDTH) {
        static float rows[MAX_ROWS * MAX_WIDTH];
        int64_t n = reader.rows < MAX_ROWS ? reader.rows : MAX_ROWS;
        rc = es_rows_read_f32(&reader, 0, n, rows, &err);
        if (!es_rows_is_float(&reader) && rc != ES_ERR_DATA) abort(); /* integers are not latents */
        expect_refusal(rc, &err);
        if (!rc && n > 1) { /* one row at a time: the chunk cache's path */
            expect_refusal(es_rows_read_f32(&reader, n - 1, 1, rows, &err), &err);
            expect_refusal(es_rows_read_f32(&reader, 0, 1, rows, &err), &err);
        }
    }
    es_rows_close_reader(&reader);
}

typedef struct {
    char names[MAX_LAYERS][64];
    int count;
} layer_list;

static herr_t collect(hid_t group, const char *name, const H5L_info_t *info, void *data) {
    (void)group, (void)info;
    layer_list *list = data;
    if (list->count < MAX_LAYERS && strlen(name) < sizeof list->names[0] - 1) strcpy(list->names[list->count++], name);
    return list->count < MAX_LAYERS ? 0 : 1;
}

static void read_layers(hid_t file, const char *group_name) {
    if (!exists(file, group_name)) return;
    hid_t group = H5Gopen2(file, group_name, H5P_DEFAULT);
    if (group < 0) return;
    layer_list list = {.count = 0};
    H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, NULL, collect, &list);
    for (int i = 0; i < list.count; i++) read_layer(group, list.names[i]);
    H5Gclose(group);
}

static void read_attributes(hid_t file) {
    static const char *strings[] = {"format", "layers", "fingerprint", "model_fingerprint", "config", "layer_map"};
    static const char *integers[] = {"format_version", "hidden_size", "seed", "committed_samples"};
    for (size_t i = 0; i < sizeof strings / sizeof *strings; i++) {
        char *text = NULL;
        es_error err = {0};
        int rc = es_h5_attr_get_str(file, strings[i], &text, &err);
        expect_refusal(rc, &err);
        if (!rc && !text) abort();
        free(text);
    }
    for (size_t i = 0; i < sizeof integers / sizeof *integers; i++) {
        int64_t value;
        es_error err = {0};
        expect_refusal(es_h5_attr_get_i64(file, integers[i], &value, &err), &err);
    }
    double sigma;
    es_error err = {0};
    expect_refusal(es_h5_attr_get_f64(file, "sigma", &sigma, &err), &err);
}

static void read_ids(hid_t file) {
    if (!exists(file, "/samples/id") || chunk_too_large(file, "/samples/id")) return;
    hid_t dataset = H5Dopen2(file, "/samples/id", H5P_DEFAULT);
    if (dataset < 0) return;
    hid_t space = H5Dget_space(dataset);
    hssize_t points = space >= 0 ? H5Sget_simple_extent_npoints(space) : 0;
    if (space >= 0) H5Sclose(space);
    int64_t n = points < 8 ? (points > 0 ? points : 1) : 8; /* one past an empty dataset: a refusal */
    char *ids[8] = {0};
    es_error err = {0};
    int rc = es_h5_read_strings(dataset, "fuzz.h5:/samples/id", 0, n, ids, &err);
    expect_refusal(rc, &err);
    if (rc == ES_OK)
        for (int64_t i = 0; i < n; i++)
            if (!ids[i]) abort();
    for (int i = 0; i < 8; i++) free(ids[i]);
    H5Dclose(dataset);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    if (!ready) {
        es_error err = {0};
        if (es_h5_init(&err)) abort();
        es_h5zstd_max_chunk_bytes = MAX_CHUNK_BYTES;
        es_h5_heap_spin_seconds = 0.5; /* a looping child costs the run this much per input */
        /* HDF5's free lists keep freed blocks: every input would look like a leak and cost a
         * full leak check. Without them a run frees what it allocated. */
        H5set_free_list_limits(0, 0, 0, 0, 0, 0);
        ready = 1;
    }
    if (size == 0) return 0;
    /* Through the file system, as the programs open it: es_h5_open reads every variable-length
     * value in a child first (libhdf5 crashes or loops on some damaged global heaps) and refuses
     * the file when that child does not come back. */
    static char path[64];
    if (!path[0]) snprintf(path, sizeof path, "/dev/shm/fuzz_h5.%d.h5", (int)getpid());
    FILE *image = fopen(path, "wb");
    if (!image || fwrite(data, 1, size, image) != size || fclose(image) != 0) abort();
    es_h5file opened;
    es_error open_err = {0};
    int rc = es_h5_open(&opened, path, &open_err);
    if (rc) { /* not an HDF5 file, or one whose heap the child could not read */
        if (rc != ES_ERR_DATA || !open_err.msg[0]) abort();
        return 0;
    }
    hid_t file = opened.id;
    read_attributes(file);
    read_ids(file);
    static const struct { const char *name; es_h5_elem elem; } columns[] = {
        {"/samples/text_start", ES_H5_I64}, {"/samples/token_start", ES_H5_I64}, {"/samples/text_bytes", ES_H5_U8},
        {"/samples/truncated", ES_H5_U8},   {"/samples/add_special_tokens", ES_H5_U8}, {"/tokens/id", ES_H5_I32},
        {"/tokens/byte_start", ES_H5_I32},  {"/tokens/byte_end", ES_H5_I32},         {"/tokens/teacher_row", ES_H5_I64},
        {"/stats/layer_001/count", ES_H5_I64}, {"/stats/layer_001/mean", ES_H5_F64},
    };
    for (size_t i = 0; i < sizeof columns / sizeof *columns; i++) read_column(file, columns[i].name, columns[i].elem);
    read_layers(file, "/latents");
    read_layers(file, "/targets");
    es_h5_close(&opened, 0);
    return 0;
}
