/* The Zstandard HDF5 filter, registered id 32015, cd_values[0] = compression level (the
 * hdf5plugin convention), every frame with its content checksum.
 *
 * The same source builds the in-process filter (es_h5zstd_register) and, with
 * -DES_H5ZSTD_PLUGIN, build/plugins/libh5zstd.so for h5dump and plain h5py
 * (HDF5_PLUGIN_PATH). The filter calls no HDF5 function, so the plugin loads into any
 * HDF5 >= 1.10 whatever version the reader was built with. */
#ifndef ES_H5ZSTD_H
#define ES_H5ZSTD_H

#include <stddef.h>

#define ES_H5Z_FILTER_ZSTD 32015
#define ES_ZSTD_DEFAULT_LEVEL 3

/* Registers the filter with the HDF5 library in this process (idempotent, thread-safe).
 * Returns 0, or -1 when HDF5 refused it. */
int es_h5zstd_register(void);

/* The most bytes one chunk decompresses to: a frame that claims more, or streams past it, is
 * refused as corrupt instead of being allocated. HDF5 1.10 chunks are under 4 GiB, the
 * default; the fuzz target lowers it to its memory limit. Direct chunk reads (h5rows.c)
 * take larger chunks through HDF5's own path. */
extern size_t es_h5zstd_max_chunk_bytes;

/* The filter function itself (HDF5's H5Z_func_t), exposed for tests. */
size_t es_h5zstd_filter(unsigned int flags, size_t cd_nelmts, const unsigned int cd_values[],
                        size_t nbytes, size_t *buf_size, void **buf);

#endif
