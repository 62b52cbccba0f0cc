#include "h5zstd.h"

#include <hdf5.h>
#include <stdlib.h>
#include <zstd.h>

static size_t compress_chunk(unsigned level_arg, size_t nbytes, size_t *buf_size, void **buf) {
    size_t bound = ZSTD_compressBound(nbytes);
    void *out = malloc(bound);
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    if (!out || !cctx) goto fail;
    int level = (int)level_arg;
    if (level < ZSTD_minCLevel()) level = ZSTD_minCLevel();
    if (level > ZSTD_maxCLevel()) level = ZSTD_maxCLevel();
    if (ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1)))
        goto fail;
    size_t written = ZSTD_compress2(cctx, out, bound, *buf, nbytes);
    if (ZSTD_isError(written)) goto fail;
    ZSTD_freeCCtx(cctx);
    free(*buf);
    *buf = out;
    *buf_size = bound;
    return written;
fail:
    ZSTD_freeCCtx(cctx);
    free(out);
    return 0; /* HDF5 reads 0 as failure */
}

size_t es_h5zstd_max_chunk_bytes = (size_t)4 << 30;

/* Decompresses all frames in the buffer; frames that do not record their size are streamed
 * into a growing buffer. A checksum mismatch or any corruption returns 0 (an HDF5 read error). */
static size_t decompress_chunk(size_t nbytes, size_t *buf_size, void **buf) {
    unsigned long long known = ZSTD_getFrameContentSize(*buf, nbytes);
    if (known == ZSTD_CONTENTSIZE_ERROR) return 0;
    if (known != ZSTD_CONTENTSIZE_UNKNOWN && known > es_h5zstd_max_chunk_bytes) return 0; /* no chunk is that large */
    size_t cap = known != ZSTD_CONTENTSIZE_UNKNOWN ? (size_t)known : 4 * nbytes + 4096;
    if (cap > es_h5zstd_max_chunk_bytes) cap = es_h5zstd_max_chunk_bytes;
    if (cap == 0) cap = 1;
    void *out = malloc(cap);
    ZSTD_DStream *stream = ZSTD_createDStream();
    if (!out || !stream) goto fail;
    ZSTD_inBuffer in = {*buf, nbytes, 0};
    ZSTD_outBuffer dst = {out, cap, 0};
    for (;;) {
        if (dst.pos == dst.size) {
            if (cap >= es_h5zstd_max_chunk_bytes) goto fail; /* more than any chunk holds */
            if (cap * 2 > es_h5zstd_max_chunk_bytes) cap = es_h5zstd_max_chunk_bytes / 2;
            void *bigger = realloc(out, cap * 2);
            if (!bigger) goto fail;
            out = bigger;
            cap *= 2;
            dst.dst = out;
            dst.size = cap;
        }
        size_t status = ZSTD_decompressStream(stream, &dst, &in);
        if (ZSTD_isError(status)) goto fail;
        if (status == 0 && in.pos == in.size) break;                /* every frame complete */
        if (in.pos == in.size && dst.pos < dst.size) goto fail;     /* truncated frame */
    }
    ZSTD_freeDStream(stream);
    free(*buf);
    *buf = out;
    *buf_size = cap;
    return dst.pos;
fail:
    ZSTD_freeDStream(stream);
    free(out);
    return 0;
}

size_t es_h5zstd_filter(unsigned int flags, size_t cd_nelmts, const unsigned int cd_values[],
                        size_t nbytes, size_t *buf_size, void **buf) {
    if (flags & H5Z_FLAG_REVERSE) return decompress_chunk(nbytes, buf_size, buf);
    unsigned level = cd_nelmts > 0 ? cd_values[0] : ES_ZSTD_DEFAULT_LEVEL;
    return compress_chunk(level, nbytes, buf_size, buf);
}

static const H5Z_class2_t zstd_class = {
    .version = H5Z_CLASS_T_VERS,
    .id = ES_H5Z_FILTER_ZSTD,
    .encoder_present = 1,
    .decoder_present = 1,
    .name = "Zstandard (essence; hdf5plugin-compatible)",
    .can_apply = NULL,
    .set_local = NULL,
    .filter = es_h5zstd_filter,
};

#ifdef ES_H5ZSTD_PLUGIN
/* The two entry points HDF5's plugin loader looks up by name. */
H5PL_type_t H5PLget_plugin_type(void);
const void *H5PLget_plugin_info(void);
H5PL_type_t H5PLget_plugin_type(void) { return H5PL_TYPE_FILTER; }
const void *H5PLget_plugin_info(void) { return &zstd_class; }
#else
#include <pthread.h>

static int register_status = -1;
static void register_once(void) {
    if (H5Zfilter_avail(ES_H5Z_FILTER_ZSTD) > 0 || H5Zregister(&zstd_class) >= 0) register_status = 0;
}

int es_h5zstd_register(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_once);
    return register_status;
}
#endif
