#include "h5rows.h"

#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "dtype.h"
#include "h5file.h"
#include "h5rows_internal.h"
#include "h5zstd.h"

/* One chunk on its way between memory and the file. A slot is touched by one thread at a
 * time: the caller while it fills or inspects it, a worker while its task runs. */
struct es_chunk_slot {
    es_task task;
    int submitted;
    int64_t chunk;         /* chunk index = first row / chunk_rows */
    size_t chunk_bytes;    /* a whole chunk, edge chunks included (HDF5 stores them padded) */
    size_t elem_size;
    int shuffled;
    uint8_t *raw;          /* writer: the chunk's rows */
    uint8_t *scratch;      /* shuffled bytes */
    uint8_t *packed;       /* compressed bytes */
    size_t packed_cap, packed_size;
    uint32_t filter_mask;  /* reader: filters HDF5 says were skipped for this chunk */
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    int level;
    uint8_t *dest;         /* reader: where the requested elements go */
    size_t first_elem, n_elems;
    int failed;
    char message[256];
};

size_t es_h5_elem_size(es_h5_elem elem) {
    static const size_t sizes[] = {2, 4, 8, 8, 4, 1};
    return sizes[elem];
}

const char *es_h5_elem_name(es_h5_elem elem) {
    static const char *names[] = {"bf16", "float32", "float64", "int64", "int32", "uint8"};
    return names[elem];
}

hid_t es_h5_elem_type(es_h5_elem elem) {
    switch (elem) {
    case ES_H5_BF16: return es_h5_bf16_type();
    case ES_H5_F32: return H5T_IEEE_F32LE;
    case ES_H5_F64: return H5T_IEEE_F64LE;
    case ES_H5_I64: return H5T_STD_I64LE;
    case ES_H5_I32: return H5T_STD_I32LE;
    case ES_H5_U8: return H5T_STD_U8LE;
    }
    return -1;
}

int64_t es_h5_default_chunk_rows(es_h5_elem elem, int64_t width) {
    int64_t row_bytes = (int64_t)es_h5_elem_size(elem) * (width > 0 ? width : 1);
    int64_t rows = ((int64_t)1 << 20) / row_bytes;
    return rows > 0 ? rows : 1;
}

/* ---- shuffle (the byte transposition of HDF5's shuffle filter) ---------------------- */

static void shuffle_bytes(uint8_t *dst, const uint8_t *src, size_t n_elems, size_t elem_size) {
    if (elem_size == 2) {
        for (size_t i = 0; i < n_elems; i++) {
            dst[i] = src[2 * i];
            dst[n_elems + i] = src[2 * i + 1];
        }
        return;
    }
    for (size_t b = 0; b < elem_size; b++)
        for (size_t i = 0; i < n_elems; i++) dst[b * n_elems + i] = src[i * elem_size + b];
}

/* Elements [first, first + n) of a shuffled chunk of `total` elements. */
static void unshuffle_range(uint8_t *dst, const uint8_t *src, size_t total, size_t first, size_t n,
                            size_t elem_size) {
    if (elem_size == 2) {
        const uint8_t *low = src + first, *high = src + total + first;
        for (size_t i = 0; i < n; i++) {
            dst[2 * i] = low[i];
            dst[2 * i + 1] = high[i];
        }
        return;
    }
    for (size_t b = 0; b < elem_size; b++)
        for (size_t i = 0; i < n; i++) dst[i * elem_size + b] = src[b * total + first + i];
}

/* ---- slots -------------------------------------------------------------------------- */

static es_chunk_slot *slots_new(int n, size_t chunk_bytes, size_t elem_size, int writer) {
    es_chunk_slot *slots = calloc((size_t)n, sizeof *slots);
    if (!slots) return NULL;
    for (int i = 0; i < n; i++) {
        es_chunk_slot *slot = &slots[i];
        slot->chunk_bytes = chunk_bytes;
        slot->elem_size = elem_size;
        slot->scratch = malloc(chunk_bytes);
        int ok = slot->scratch != NULL;
        if (writer) {
            slot->raw = calloc(1, chunk_bytes);
            slot->packed_cap = ZSTD_compressBound(chunk_bytes);
            slot->packed = malloc(slot->packed_cap);
            slot->cctx = ZSTD_createCCtx();
            ok = ok && slot->raw && slot->packed && slot->cctx;
        } else {
            slot->dctx = ZSTD_createDCtx();
            ok = ok && slot->dctx;
        }
        if (!ok) {
            for (int j = 0; j <= i; j++) {
                free(slots[j].scratch), free(slots[j].raw), free(slots[j].packed);
                ZSTD_freeCCtx(slots[j].cctx), ZSTD_freeDCtx(slots[j].dctx);
            }
            free(slots);
            return NULL;
        }
    }
    return slots;
}

static void slots_free(es_chunk_slot *slots, int n) {
    if (!slots) return;
    for (int i = 0; i < n; i++) {
        free(slots[i].scratch), free(slots[i].raw), free(slots[i].packed);
        ZSTD_freeCCtx(slots[i].cctx), ZSTD_freeDCtx(slots[i].dctx);
    }
    free(slots);
}

static int slot_count(es_pool *pool) { return pool ? 2 * es_pool_threads(pool) + 2 : 1; }

static void run_or_submit(es_pool *pool, es_chunk_slot *slot) {
    slot->failed = 0;
    slot->submitted = 1;
    if (pool) es_pool_submit(pool, &slot->task);
    else slot->task.run(&slot->task, 0);
}

static void slot_wait(es_pool *pool, es_chunk_slot *slot) {
    if (slot->submitted && pool) es_pool_wait(pool, &slot->task);
    slot->submitted = 0;
}

static void compress_task(es_task *task, int worker) {
    (void)worker;
    es_chunk_slot *slot = (es_chunk_slot *)task;
    const uint8_t *input = slot->raw;
    if (slot->elem_size > 1) {
        shuffle_bytes(slot->scratch, slot->raw, slot->chunk_bytes / slot->elem_size, slot->elem_size);
        input = slot->scratch;
    }
    size_t written = ZSTD_compress2(slot->cctx, slot->packed, slot->packed_cap, input, slot->chunk_bytes);
    if (ZSTD_isError(written)) {
        slot->failed = 1;
        snprintf(slot->message, sizeof slot->message, "zstd: %s", ZSTD_getErrorName(written));
        return;
    }
    slot->packed_size = written;
}

static void decompress_task(es_task *task, int worker) {
    (void)worker;
    es_chunk_slot *slot = (es_chunk_slot *)task;
    const int zstd_skipped = (slot->filter_mask >> (slot->shuffled ? 1 : 0)) & 1;
    const int shuffle_skipped = slot->shuffled ? (slot->filter_mask & 1) : 1;
    const uint8_t *plain = slot->packed;
    size_t plain_size = slot->packed_size;
    if (!zstd_skipped) {
        plain_size = ZSTD_decompressDCtx(slot->dctx, slot->scratch, slot->chunk_bytes, slot->packed,
                                         slot->packed_size);
        if (ZSTD_isError(plain_size)) {
            slot->failed = 1;
            snprintf(slot->message, sizeof slot->message, "zstd: %s", ZSTD_getErrorName(plain_size));
            return;
        }
        plain = slot->scratch;
    }
    if (plain_size != slot->chunk_bytes) {
        slot->failed = 1;
        snprintf(slot->message, sizeof slot->message, "chunk holds %zu bytes, expected %zu", plain_size,
                 slot->chunk_bytes);
        return;
    }
    if (shuffle_skipped || slot->elem_size == 1)
        memcpy(slot->dest, plain + slot->first_elem * slot->elem_size, slot->n_elems * slot->elem_size);
    else
        unshuffle_range(slot->dest, plain, slot->chunk_bytes / slot->elem_size, slot->first_elem,
                        slot->n_elems, slot->elem_size);
}

/* "FILE:/group/name" for messages; a relative name is completed with its parent's path. */
static char *object_name(hid_t parent, const char *name) {
    char *full = NULL, parent_path[512] = "";
    if (name[0] != '/' && (H5Iget_name(parent, parent_path, sizeof parent_path) <= 0 || !strcmp(parent_path, "/")))
        parent_path[0] = '\0';
    if (asprintf(&full, "%s:%s%s%s", es_h5_filename(parent), name[0] == '/' ? "" : parent_path, name[0] == '/' ? "" : "/",
                 name) < 0)
        return NULL;
    return full;
}

/* ---- writer ------------------------------------------------------------------------- */

static int writer_setup(es_rows_writer *writer, es_error *err) {
    writer->n_slots = slot_count(writer->pool);
    size_t chunk_bytes = (size_t)writer->chunk_rows * (size_t)writer->width * writer->elem_size;
    writer->slots = slots_new(writer->n_slots, chunk_bytes, writer->elem_size, 1);
    if (!writer->slots) return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory for chunk buffers", writer->name);
    for (int i = 0; i < writer->n_slots; i++) {
        es_chunk_slot *slot = &writer->slots[i];
        slot->task.run = compress_task;
        slot->shuffled = 1;
        if (ZSTD_isError(ZSTD_CCtx_setParameter(slot->cctx, ZSTD_c_compressionLevel, writer->level)) ||
            ZSTD_isError(ZSTD_CCtx_setParameter(slot->cctx, ZSTD_c_checksumFlag, 1)))
            return es_fail(err, ES_ERR_RUNTIME, "%s: zstd rejected level %d", writer->name, writer->level);
    }
    return ES_OK;
}

int es_rows_create(es_rows_writer *writer, hid_t parent, const char *name, es_h5_elem elem,
                   int64_t width, int64_t chunk_rows, int level, es_pool *pool, es_error *err) {
    memset(writer, 0, sizeof *writer);
    writer->dataset = -1;
    writer->elem = elem;
    writer->elem_size = es_h5_elem_size(elem);
    writer->rank = width > 0 ? 2 : 1;
    writer->width = width > 0 ? width : 1;
    writer->chunk_rows = chunk_rows > 0 ? chunk_rows : es_h5_default_chunk_rows(elem, width);
    writer->level = level;
    writer->pool = pool;
    writer->name = object_name(parent, name);
    if (!writer->name) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (level < ZSTD_minCLevel() || level > ZSTD_maxCLevel())
        return es_fail(err, ES_ERR_USAGE, "zstd level %d is outside [%d, %d]", level, ZSTD_minCLevel(),
                       ZSTD_maxCLevel());

    hsize_t dims[2] = {0, (hsize_t)writer->width}, max_dims[2] = {H5S_UNLIMITED, (hsize_t)writer->width};
    hsize_t chunk[2] = {(hsize_t)writer->chunk_rows, (hsize_t)writer->width};
    unsigned cd_level = (unsigned)level;
    hid_t space = H5Screate_simple(writer->rank, dims, max_dims);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    if (space < 0 || dcpl < 0 || lcpl < 0 || H5Pset_chunk(dcpl, writer->rank, chunk) < 0 ||
        H5Pset_shuffle(dcpl) < 0 ||
        H5Pset_filter(dcpl, ES_H5Z_FILTER_ZSTD, H5Z_FLAG_MANDATORY, 1, &cd_level) < 0 ||
        H5Pset_create_intermediate_group(lcpl, 1) < 0) {
        es_fail(err, ES_ERR_RUNTIME, "%s: cannot set up the dataset: %s", writer->name, es_h5_last_error());
    } else {
        writer->dataset = H5Dcreate2(parent, name, es_h5_elem_type(elem), space, lcpl, dcpl, H5P_DEFAULT);
        if (writer->dataset < 0)
            es_fail(err, ES_ERR_RUNTIME, "%s: cannot create: %s", writer->name, es_h5_last_error());
    }
    if (space >= 0) H5Sclose(space);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (lcpl >= 0) H5Pclose(lcpl);
    if (writer->dataset < 0) {
        free(writer->name);
        writer->name = NULL;
        return err ? err->code : ES_ERR_RUNTIME;
    }
    return writer_setup(writer, err);
}

static int set_extent(es_rows_writer *writer, int64_t rows, es_error *err) {
    if (writer->extent == rows) return ES_OK;
    hsize_t dims[2] = {(hsize_t)rows, (hsize_t)writer->width};
    if (H5Dset_extent(writer->dataset, dims) < 0)
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot resize to %lld rows: %s", writer->name, (long long)rows,
                       es_h5_last_error());
    writer->extent = rows;
    return ES_OK;
}

static int write_slot(es_rows_writer *writer, es_chunk_slot *slot, es_error *err) {
    if (slot->failed)
        return es_fail(err, ES_ERR_RUNTIME, "%s: chunk %lld: %s", writer->name, (long long)slot->chunk, slot->message);
    int rc = writer->extent < writer->rows ? set_extent(writer, writer->rows, err) : ES_OK;
    if (rc) return rc;
    hsize_t offset[2] = {(hsize_t)(slot->chunk * writer->chunk_rows), 0};
    if (H5Dwrite_chunk(writer->dataset, H5P_DEFAULT, 0, offset, slot->packed_size, slot->packed) < 0)
        return es_fail(err, ES_ERR_RUNTIME, "%s: cannot write chunk %lld: %s", writer->name,
                       (long long)slot->chunk, es_h5_last_error());
    return ES_OK;
}

/* Waits for the oldest chunk in flight and writes it. */
static int retire_oldest(es_rows_writer *writer, es_error *err) {
    es_chunk_slot *slot = &writer->slots[writer->head];
    slot_wait(writer->pool, slot);
    writer->head = (writer->head + 1) % writer->n_slots;
    writer->count--;
    return write_slot(writer, slot, err);
}

int es_rows_append(es_rows_writer *writer, const void *rows, int64_t n, es_error *err) {
    const size_t row_bytes = (size_t)writer->width * writer->elem_size;
    const uint8_t *src = rows;
    while (n > 0) {
        if (!writer->filling) {
            if (writer->count == writer->n_slots) {
                int rc = retire_oldest(writer, err);
                if (rc) return rc;
            }
            es_chunk_slot *slot = &writer->slots[(writer->head + writer->count) % writer->n_slots];
            slot->chunk = writer->rows / writer->chunk_rows;
            writer->count++;
            writer->filling = 1;
        }
        es_chunk_slot *slot = &writer->slots[(writer->head + writer->count - 1) % writer->n_slots];
        int64_t in_chunk = writer->rows % writer->chunk_rows;
        int64_t take = writer->chunk_rows - in_chunk < n ? writer->chunk_rows - in_chunk : n;
        memcpy(slot->raw + (size_t)in_chunk * row_bytes, src, (size_t)take * row_bytes);
        src += (size_t)take * row_bytes;
        n -= take;
        writer->rows += take;
        if (writer->rows % writer->chunk_rows == 0) {
            run_or_submit(writer->pool, slot);
            writer->filling = 0;
        }
    }
    return ES_OK;
}

int es_rows_append_f32(es_rows_writer *writer, const float *rows, int64_t n, es_error *err) {
    if (writer->elem == ES_H5_F32) return es_rows_append(writer, rows, n, err);
    if (writer->elem != ES_H5_BF16)
        return es_fail(err, ES_ERR_RUNTIME, "%s: float rows given for a %s dataset", writer->name,
                       es_h5_elem_name(writer->elem));
    enum { BATCH = 16384 };
    uint16_t converted[BATCH];
    int64_t rows_per_batch = BATCH / writer->width > 0 ? BATCH / writer->width : 0;
    for (int64_t done = 0; done < n;) {
        if (rows_per_batch == 0) { /* rows wider than the batch: convert row by row */
            uint16_t *row = malloc((size_t)writer->width * sizeof *row);
            if (!row) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
            es_f32_to_bf16_array(row, rows + done * writer->width, (size_t)writer->width);
            int rc = es_rows_append(writer, row, 1, err);
            free(row);
            if (rc) return rc;
            done++;
            continue;
        }
        int64_t take = n - done < rows_per_batch ? n - done : rows_per_batch;
        es_f32_to_bf16_array(converted, rows + done * writer->width, (size_t)(take * writer->width));
        int rc = es_rows_append(writer, converted, take, err);
        if (rc) return rc;
        done += take;
    }
    return ES_OK;
}

int es_rows_flush(es_rows_writer *writer, es_error *err) {
    int rc = ES_OK;
    while (!rc && writer->count > (writer->filling ? 1 : 0)) rc = retire_oldest(writer, err);
    if (rc) return rc;
    if (writer->filling) {
        /* Write the partial chunk padded with zeros; it stays the filling slot. */
        es_chunk_slot *slot = &writer->slots[writer->head];
        size_t used = (size_t)(writer->rows % writer->chunk_rows) * (size_t)writer->width * writer->elem_size;
        memset(slot->raw + used, 0, slot->chunk_bytes - used);
        slot->failed = 0;
        compress_task(&slot->task, 0);
        rc = write_slot(writer, slot, err);
    }
    if (!rc) rc = set_extent(writer, writer->rows, err);
    return rc;
}

int es_rows_close(es_rows_writer *writer, es_error *err) {
    int rc = writer->dataset >= 0 && writer->slots ? es_rows_flush(writer, err) : ES_OK;
    for (int i = 0; writer->slots && i < writer->n_slots; i++) slot_wait(writer->pool, &writer->slots[i]);
    slots_free(writer->slots, writer->n_slots);
    writer->slots = NULL;
    if (writer->dataset >= 0 && H5Dclose(writer->dataset) < 0 && !rc)
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: close failed", writer->name);
    writer->dataset = -1;
    free(writer->name);
    writer->name = NULL;
    return rc;
}

/* Frees a writer's slots, dataset and name (its slots already waited for or never submitted). */
static void writer_release(es_rows_writer *writer) {
    slots_free(writer->slots, writer->n_slots);
    writer->slots = NULL;
    if (writer->dataset >= 0) H5Dclose(writer->dataset);
    writer->dataset = -1;
    free(writer->name);
    writer->name = NULL;
}

void es_rows_discard(es_rows_writer *writer) {
    for (int i = 0; writer->slots && i < writer->n_slots; i++) slot_wait(writer->pool, &writer->slots[i]);
    writer_release(writer);
}

/* ---- reader ------------------------------------------------------------------------- */

/* Whether chunks are whole rows filtered by [shuffle,] zstd only, in our byte order. */
static void classify_layout(es_rows_reader *reader, hid_t file_type) {
    hid_t dcpl = H5Dget_create_plist(reader->dataset);
    if (dcpl < 0) return;
    hsize_t chunk[2] = {0, 0};
    int nfilters = H5Pget_nfilters(dcpl);
    int chunked = H5Pget_layout(dcpl) == H5D_CHUNKED && H5Pget_chunk(dcpl, 2, chunk) == reader->rank && chunk[0] > 0;
    if (chunked) reader->chunk_rows = (int64_t)chunk[0]; /* for messages and block sizes on any path */
    /* A chunk our slots would hold must be of a sane size: the file says how large. */
    double chunk_bytes = chunked ? (double)chunk[0] * (double)reader->width * (double)reader->elem_size : 0;
    int ok = chunked && (reader->rank == 1 || (int64_t)chunk[1] == reader->width) && !reader->convert &&
             chunk_bytes <= (double)es_h5zstd_max_chunk_bytes && H5Tequal(file_type, es_h5_elem_type(reader->elem)) > 0 &&
             (nfilters == 1 || nfilters == 2);
    for (int i = 0; ok && i < nfilters; i++) {
        unsigned flags, cd[8], config;
        size_t n_cd = 8;
        char name[64];
        H5Z_filter_t id = H5Pget_filter2(dcpl, (unsigned)i, &flags, &n_cd, cd, sizeof name, name, &config);
        if (nfilters == 2 && i == 0) ok = id == H5Z_FILTER_SHUFFLE;
        else ok = id == ES_H5Z_FILTER_ZSTD;
    }
    if (ok) {
        reader->direct = 1;
        reader->shuffled = nfilters == 2;
    }
    H5Pclose(dcpl);
}

/* want < 0: the stored type's own elem (es_rows_type_elem); else a column read as want. */
static int open_reader(es_rows_reader *reader, hid_t parent, const char *name, int want, es_pool *pool, es_error *err) {
    memset(reader, 0, sizeof *reader);
    reader->dataset = reader->stored = -1;
    for (int i = 0; i < 4; i++) reader->cache_chunk[i] = -1;
    reader->pool = pool;
    int rc = es_h5_init(err);
    if (rc) return rc;
    reader->name = object_name(parent, name);
    if (!reader->name) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (H5Lexists(parent, name, H5P_DEFAULT) <= 0 ||
        (reader->dataset = H5Dopen2(parent, name, H5P_DEFAULT)) < 0) {
        rc = es_fail(err, ES_ERR_DATA, "%s: no such dataset", reader->name);
        es_rows_close_reader(reader);
        return rc;
    }
    reader->stored = H5Dget_type(reader->dataset);
    hid_t space = H5Dget_space(reader->dataset);
    hsize_t dims[2] = {0, 1};
    int rank = space >= 0 ? H5Sget_simple_extent_ndims(space) : -1;
    if (rank == 1 || rank == 2) H5Sget_simple_extent_dims(space, dims, NULL);
    char type_name[64] = "an unreadable type";
    if (reader->stored >= 0) es_h5_type_name(reader->stored, type_name, sizeof type_name);
    es_h5_elem natural = ES_H5_U8;
    if (reader->stored < 0 || es_rows_type_elem(reader->stored, &natural) < 0)
        rc = es_fail(err, ES_ERR_DATA, "%s: holds %s, expected numbers", reader->name, type_name);
    else if (rank != 1 && rank != 2)
        rc = es_fail(err, ES_ERR_DATA, "%s: expected a 1-D or 2-D dataset, found rank %d", reader->name, rank);
    else if (rank == 2 && dims[1] == 0)
        rc = es_fail(err, ES_ERR_DATA, "%s: rows of width 0", reader->name);
    else if (want >= 0 && rank == 2 && dims[1] != 1)
        rc = es_fail(err, ES_ERR_DATA, "%s: a [%llu, %llu] dataset, expected 1-D (one %s a row)", reader->name,
                     (unsigned long long)dims[0], (unsigned long long)dims[1], es_h5_elem_name((es_h5_elem)want));
    if (!rc) rc = es_h5_check_filters(reader->dataset, reader->name, err);
    if (!rc) {
        reader->elem = want >= 0 ? (es_h5_elem)want : natural;
        reader->convert = H5Tequal(reader->stored, es_h5_elem_type(reader->elem)) <= 0;
        reader->rank = rank;
        reader->rows = (int64_t)dims[0];
        reader->width = rank == 2 ? (int64_t)dims[1] : 1;
        reader->elem_size = es_h5_elem_size(reader->elem);
        classify_layout(reader, reader->stored);
    }
    if (space >= 0) H5Sclose(space);
    if (!rc && reader->direct) {
        reader->n_slots = slot_count(pool);
        size_t chunk_bytes = (size_t)reader->chunk_rows * (size_t)reader->width * reader->elem_size;
        reader->slots = slots_new(reader->n_slots, chunk_bytes, reader->elem_size, 0);
        if (!reader->slots) rc = es_fail(err, ES_ERR_RUNTIME, "%s: out of memory for chunk buffers", reader->name);
        for (int i = 0; !rc && i < reader->n_slots; i++) {
            reader->slots[i].task.run = decompress_task;
            reader->slots[i].shuffled = reader->shuffled;
        }
    }
    if (rc) es_rows_close_reader(reader);
    return rc;
}

int es_rows_open(es_rows_reader *reader, hid_t parent, const char *name, es_pool *pool, es_error *err) {
    return open_reader(reader, parent, name, -1, pool, err);
}

int es_rows_open_column(es_rows_reader *reader, hid_t parent, const char *name, es_h5_elem elem, es_pool *pool,
                        es_error *err) {
    return open_reader(reader, parent, name, (int)elem, pool, err);
}

int es_rows_is_float(const es_rows_reader *reader) {
    return reader->elem == ES_H5_BF16 || reader->elem == ES_H5_F32 || reader->elem == ES_H5_F64;
}

static int finish_slot(es_rows_reader *reader, es_chunk_slot *slot, es_error *err) {
    slot_wait(reader->pool, slot);
    if (!slot->failed) return ES_OK;
    int64_t first_row = slot->chunk * reader->chunk_rows, end = first_row + reader->chunk_rows;
    return es_fail(err, ES_ERR_DATA, "%s: chunk %lld (rows %lld..%lld) is corrupt: %s", reader->name,
                   (long long)slot->chunk, (long long)first_row, (long long)((end < reader->rows ? end : reader->rows) - 1),
                   slot->message);
}

int es_rows_read_column(hid_t parent, const char *name, es_h5_elem elem, int64_t first, int64_t n, void *out, es_error *err) {
    es_rows_reader reader;
    int rc = es_rows_open_column(&reader, parent, name, elem, NULL, err);
    if (rc) return rc;
    rc = es_rows_read(&reader, first, n, out, err);
    es_rows_close_reader(&reader);
    return rc;
}

int es_rows_read(es_rows_reader *reader, int64_t first, int64_t n, void *out, es_error *err) {
    if (first < 0 || n < 0 || first + n > reader->rows)
        return es_fail(err, ES_ERR_DATA, "%s: rows %lld..%lld requested, the dataset has %lld", reader->name,
                       (long long)first, (long long)(first + n - 1), (long long)reader->rows);
    if (n == 0) return ES_OK;
    if (!reader->direct)
        return es_rows_read_hdf5(reader, first, n, out, es_h5_elem_type(reader->elem), es_h5_elem_name(reader->elem), err);

    const size_t row_bytes = (size_t)reader->width * reader->elem_size;
    const int64_t first_chunk = first / reader->chunk_rows, last_chunk = (first + n - 1) / reader->chunk_rows;
    if (first_chunk == last_chunk && !reader->filling) {
        const int64_t chunk_first = first_chunk * reader->chunk_rows;
        int slot = 0;
        for (int i = 0; i < 4; i++) {
            if (reader->cache_chunk[i] == first_chunk) {
                slot = i;
                break;
            }
            if (reader->cache_used[i] < reader->cache_used[slot]) slot = i;
        }
        if (reader->cache_chunk[slot] != first_chunk) {
            const int64_t chunk_rows = reader->rows - chunk_first < reader->chunk_rows ? reader->rows - chunk_first : reader->chunk_rows;
            if (!reader->cache[slot] && !(reader->cache[slot] = malloc((size_t)reader->chunk_rows * row_bytes)))
                return es_fail(err, ES_ERR_RUNTIME, "out of memory");
            reader->filling = 1, reader->cache_chunk[slot] = -1;
            int rc = es_rows_read(reader, chunk_first, chunk_rows, reader->cache[slot], err);
            reader->filling = 0;
            if (rc) return rc;
            reader->cache_chunk[slot] = first_chunk;
        }
        reader->cache_used[slot] = ++reader->cache_clock;
        memcpy(out, reader->cache[slot] + (size_t)(first - chunk_first) * row_bytes, (size_t)n * row_bytes);
        return ES_OK;
    }
    int head = 0, count = 0, rc = ES_OK;
    /* The calling thread reads compressed chunks in order while workers decode earlier ones. */
    for (int64_t chunk = first_chunk; chunk <= last_chunk && !rc; chunk++) {
        if (count == reader->n_slots) {
            rc = finish_slot(reader, &reader->slots[head], err);
            head = (head + 1) % reader->n_slots;
            count--;
            if (rc) break;
        }
        es_chunk_slot *slot = &reader->slots[(head + count) % reader->n_slots];
        int64_t chunk_first = chunk * reader->chunk_rows;
        int64_t row0 = first > chunk_first ? first : chunk_first;
        int64_t row1 = first + n < chunk_first + reader->chunk_rows ? first + n : chunk_first + reader->chunk_rows;
        slot->chunk = chunk;
        slot->dest = (uint8_t *)out + (size_t)(row0 - first) * row_bytes;
        slot->first_elem = (size_t)(row0 - chunk_first) * (size_t)reader->width;
        slot->n_elems = (size_t)(row1 - row0) * (size_t)reader->width;

        hsize_t offset[2] = {(hsize_t)chunk_first, 0};
        hsize_t stored = 0;
        haddr_t address = HADDR_UNDEF;
        unsigned mask = 0;
        /* (H5Dget_chunk_storage_size fails alike for a chunk never written and a broken index.) */
        if (H5Dget_chunk_info_by_coord(reader->dataset, offset, &mask, &address, &stored) < 0) {
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot locate chunk %lld (rows from %lld): %s", reader->name, (long long)chunk,
                         (long long)chunk_first, es_h5_last_error());
            break;
        }
        if (address == HADDR_UNDEF || stored == 0) { /* never written: HDF5 knows the fill value */
            rc = es_rows_read_hdf5(reader, row0, row1 - row0, slot->dest, es_h5_elem_type(reader->elem),
                                   es_h5_elem_name(reader->elem), err);
            continue;
        }
        /* A zstd frame is never longer than its bound (an unfiltered chunk is shorter still). */
        if (stored > ZSTD_compressBound(slot->chunk_bytes) + 64) {
            rc = es_fail(err, ES_ERR_DATA, "%s: chunk %lld (rows from %lld) is corrupt: %llu bytes stored for %zu bytes of rows",
                         reader->name, (long long)chunk, (long long)chunk_first, (unsigned long long)stored, slot->chunk_bytes);
            break;
        }
        if (stored > slot->packed_cap) {
            uint8_t *bigger = realloc(slot->packed, (size_t)stored);
            if (!bigger) {
                rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
                break;
            }
            slot->packed = bigger;
            slot->packed_cap = (size_t)stored;
        }
        if (H5Dread_chunk(reader->dataset, H5P_DEFAULT, offset, &slot->filter_mask, slot->packed) < 0) {
            rc = es_fail(err, ES_ERR_DATA, "%s: cannot read chunk %lld: %s", reader->name, (long long)chunk,
                         es_h5_last_error());
            break;
        }
        slot->packed_size = (size_t)stored;
        run_or_submit(reader->pool, slot);
        count++;
    }
    /* Drain what is in flight even after an error: the slots must be idle when we return. */
    for (; count > 0; count--, head = (head + 1) % reader->n_slots) {
        int slot_rc = finish_slot(reader, &reader->slots[head], rc ? NULL : err);
        if (!rc) rc = slot_rc;
    }
    return rc;
}

int es_rows_read_f32(es_rows_reader *reader, int64_t first, int64_t n, float *out, es_error *err) {
    if (reader->elem == ES_H5_F32) return es_rows_read(reader, first, n, out, err);
    if (!es_rows_is_float(reader)) {
        char type_name[64] = "?";
        es_h5_type_name(reader->stored, type_name, sizeof type_name);
        return es_fail(err, ES_ERR_DATA, "%s: %s values where floats were expected", reader->name, type_name);
    }
    if (reader->elem == ES_H5_F64 || reader->convert) { /* HDF5 rounds to float32 */
        if (first < 0 || n < 0 || first + n > reader->rows)
            return es_fail(err, ES_ERR_DATA, "%s: rows %lld..%lld requested, the dataset has %lld", reader->name,
                           (long long)first, (long long)(first + n - 1), (long long)reader->rows);
        return n ? es_rows_read_hdf5(reader, first, n, out, H5T_NATIVE_FLOAT, "float32", err) : ES_OK;
    }
    /* Read the bf16 bits into the upper half of the output, then widen in place from the front:
     * element i's source (at byte 2n + 2i) always lies at or past its destination (4i). */
    size_t count = (size_t)n * (size_t)reader->width;
    uint16_t *bits = (uint16_t *)out + count;
    int rc = es_rows_read(reader, first, n, bits, err);
    if (rc) return rc;
    for (size_t i = 0; i < count; i++) out[i] = es_bf16_to_f32(bits[i]);
    return ES_OK;
}

void es_rows_close_reader(es_rows_reader *reader) {
    slots_free(reader->slots, reader->n_slots);
    reader->slots = NULL;
    for (int i = 0; i < 4; i++) free(reader->cache[i]), reader->cache[i] = NULL, reader->cache_chunk[i] = -1;
    if (reader->dataset >= 0) H5Dclose(reader->dataset);
    reader->dataset = -1;
    if (reader->stored >= 0) H5Tclose(reader->stored);
    reader->stored = -1;
    free(reader->name);
    reader->name = NULL;
}

/* ---- reopening for append ------------------------------------------------------------ */

static void reopen_failed(es_rows_writer *writer) {
    for (int i = 0; writer->slots && i < writer->n_slots; i++) writer->slots[i].submitted = 0;
    writer_release(writer);
}

/* The writer of an existing row dataset, at its current extent; `reader` stays open (the caller
 * closes it). */
static int reopen_writer(es_rows_writer *writer, hid_t parent, const char *name, es_pool *pool, es_rows_reader *reader,
                         es_error *err) {
    int rc = es_rows_open(reader, parent, name, NULL, err);
    memset(writer, 0, sizeof *writer);
    writer->dataset = -1;
    writer->pool = pool;
    if (rc) return rc;
    if (!reader->direct) {
        rc = es_fail(err, ES_ERR_DATA, "%s: not a row dataset written by essence (shuffle + zstd chunks of whole rows)",
                     reader->name);
        es_rows_close_reader(reader);
        return rc;
    }
    hid_t dcpl = H5Dget_create_plist(reader->dataset);
    unsigned flags, cd[4] = {ES_ZSTD_DEFAULT_LEVEL}, config;
    size_t n_cd = 4;
    if (dcpl >= 0) {
        H5Pget_filter_by_id2(dcpl, ES_H5Z_FILTER_ZSTD, &flags, &n_cd, cd, 0, NULL, &config);
        H5Pclose(dcpl);
    }
    writer->elem = reader->elem;
    writer->elem_size = reader->elem_size;
    writer->width = reader->width;
    writer->rank = reader->rank;
    writer->chunk_rows = reader->chunk_rows;
    writer->level = n_cd > 0 ? (int)cd[0] : ES_ZSTD_DEFAULT_LEVEL;
    writer->rows = writer->extent = reader->rows;
    writer->name = strdup(reader->name);
    writer->dataset = H5Dopen2(parent, name, H5P_DEFAULT);
    if (!writer->name || writer->dataset < 0) rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot reopen", reader->name);
    if (!rc) rc = writer_setup(writer, err);
    if (rc) {
        reopen_failed(writer);
        es_rows_close_reader(reader);
    }
    return rc;
}

int es_rows_open_append(es_rows_writer *writer, hid_t parent, const char *name, int64_t keep_rows,
                        es_pool *pool, es_error *err) {
    es_rows_reader reader;
    int rc = reopen_writer(writer, parent, name, pool, &reader, err);
    if (rc) return rc;
    if (keep_rows > reader.rows)
        rc = es_fail(err, ES_ERR_DATA, "%s: has %lld rows, %lld expected", reader.name, (long long)reader.rows,
                     (long long)keep_rows);
    if (!rc && keep_rows >= 0) {
        writer->rows = keep_rows;
        rc = set_extent(writer, keep_rows, err);
    }
    int64_t in_chunk = writer->rows % writer->chunk_rows;
    if (!rc && in_chunk) {
        /* Read the partial last chunk back into the filling slot. */
        es_chunk_slot *slot = &writer->slots[0];
        slot->chunk = writer->rows / writer->chunk_rows;
        rc = es_rows_read(&reader, writer->rows - in_chunk, in_chunk, slot->raw, err);
        writer->count = 1;
        writer->filling = 1;
    }
    es_rows_close_reader(&reader);
    if (rc) reopen_failed(writer);
    return rc;
}

/* The dataset's path inside its file ("/latents/layer_020"): the record's name for it. */
static int dataset_path(hid_t dataset, char *out, size_t size, const char *name, es_error *err) {
    ssize_t n = H5Iget_name(dataset, out, size);
    if (n <= 0 || (size_t)n >= size) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot tell the dataset's path", name);
    return ES_OK;
}

int es_rows_commit(es_rows_writer *writer, es_commit_record *record, es_error *err) {
    int rc = ES_OK;
    while (!rc && writer->count > (writer->filling ? 1 : 0)) rc = retire_oldest(writer, err);
    if (!rc) rc = set_extent(writer, writer->rows, err);
    char path[512];
    if (!rc) rc = dataset_path(writer->dataset, path, sizeof path, writer->name, err);
    if (rc) return rc;
    const size_t row_bytes = (size_t)writer->width * writer->elem_size;
    const size_t tail = writer->filling ? (size_t)(writer->rows % writer->chunk_rows) * row_bytes : 0;
    uint8_t *part = malloc(8 + tail);
    if (!part) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    memcpy(part, &writer->rows, 8);
    if (tail) memcpy(part + 8, writer->slots[writer->head].raw, tail);
    rc = es_commit_record_add(record, path, part, 8 + tail, err);
    free(part);
    return rc;
}

int es_rows_resume(es_rows_writer *writer, hid_t parent, const char *name, const es_commit_record *record, es_pool *pool,
                   es_error *err) {
    es_rows_reader reader;
    int rc = reopen_writer(writer, parent, name, pool, &reader, err);
    if (rc) return rc;
    char path[512];
    rc = dataset_path(writer->dataset, path, sizeof path, writer->name, err);
    const es_commit_part *part = rc ? NULL : es_commit_record_find(record, path);
    const size_t row_bytes = (size_t)writer->width * writer->elem_size;
    int64_t rows = 0;
    if (!rc && (!part || part->size < 8)) rc = es_fail(err, ES_ERR_DATA, "%s: the last commit's record does not cover it", writer->name);
    if (!rc) memcpy(&rows, part->data, 8);
    const int64_t whole = rc ? 0 : rows - rows % writer->chunk_rows;
    if (!rc && (rows < 0 || part->size - 8 != (size_t)(rows - whole) * row_bytes))
        rc = es_fail(err, ES_ERR_DATA, "%s: the last commit's record disagrees with the dataset's layout", writer->name);
    else if (!rc && reader.rows < whole)
        rc = es_fail(err, ES_ERR_DATA, "%s: has %lld rows, the last commit %lld", writer->name, (long long)reader.rows, (long long)rows);
    es_rows_close_reader(&reader);
    /* Cut to whole chunks first: HDF5 then drops the chunks past them without reading any (one
     * written after the commit may be torn), and the unfinished chunk starts again from the record. */
    if (!rc) rc = set_extent(writer, whole, err);
    if (!rc) rc = set_extent(writer, rows, err);
    if (!rc && rows > whole) {
        es_chunk_slot *slot = &writer->slots[0];
        slot->chunk = whole / writer->chunk_rows;
        memcpy(slot->raw, part->data + 8, part->size - 8);
        writer->count = 1;
        writer->filling = 1;
    }
    if (!rc) writer->rows = rows;
    if (rc) reopen_failed(writer);
    return rc;
}
