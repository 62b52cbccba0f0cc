/* safetensors: read (mmap, validated), model folders (sharded index), write (atomically).
 *
 * Format: 8-byte little-endian header length N, N bytes of JSON header, then the data
 * section. The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]}
 * (offsets relative to the data section) plus an optional "__metadata__" string map.
 * docs/safetensors.md lists what is accepted; every malformed file is ES_ERR_DATA with a
 * message naming the file and, where it applies, the tensor or shard.
 *
 * Tensor views point straight into the mapping (or the caller's buffer): data may be
 * unaligned, so read it with memcpy or es_tensor_to_f32. Views stay valid until the
 * owning es_safetensors / es_weights is closed. */
#ifndef ES_SAFETENSORS_H
#define ES_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "error.h"

#define ES_ST_MAX_DIMS 8
/* The Hugging Face library's limit; a larger length is a corrupt or hostile file. */
#define ES_ST_MAX_HEADER 100000000ULL

typedef struct es_tensor {
    const char *name;
    es_dtype dtype;
    int ndim; /* 0 for a scalar (one element) */
    int64_t shape[ES_ST_MAX_DIMS];
    const void *data; /* nbytes bytes; not necessarily aligned */
    size_t nbytes;
    const char *file; /* the file it lives in, for messages (ignored by the writer) */
} es_tensor;

typedef struct es_meta_kv {
    const char *key;
    const char *value;
} es_meta_kv;

typedef struct es_safetensors {
    char *path;           /* as given to open / the name given to parse */
    size_t n_tensors;
    es_tensor *tensors;   /* sorted by name */
    size_t n_meta;
    es_meta_kv *meta;     /* "__metadata__", in file order */
    /* private */
    void *map;
    size_t map_size;
    char *strings;
} es_safetensors;

/* Parses a whole safetensors image held in memory. The views point into buf, which must
 * outlive *out; name is used in messages. */
int es_safetensors_parse(const void *buf, size_t size, const char *name, es_safetensors **out,
                         es_error *err);
/* mmaps (read-only) and parses one file. A missing file is ES_ERR_DATA. */
int es_safetensors_open(const char *path, es_safetensors **out, es_error *err);
void es_safetensors_close(es_safetensors *st); /* NULL is fine */

const es_tensor *es_safetensors_find(const es_safetensors *st, const char *name);
const char *es_safetensors_meta(const es_safetensors *st, const char *key); /* NULL if absent */

/* Elements in a tensor (1 for a scalar). Validated tensors cannot overflow. */
size_t es_tensor_numel(const es_tensor *t);
/* Converts a BF16/F16/F32/F8_E4M3 tensor into out[es_tensor_numel(t)]; integer dtypes
 * are ES_ERR_DATA naming the tensor. */
int es_tensor_to_f32(const es_tensor *t, float *out, es_error *err);
/* "[128256, 64]" into buf (truncated to size); returns buf. */
char *es_tensor_shape_str(const es_tensor *t, char *buf, size_t size);

/* A model's weights: a folder with model.safetensors.index.json (sharded) or
 * model.safetensors, or the path of one .safetensors file. */
typedef struct es_weights {
    char *path;
    size_t n_files;
    es_safetensors **files;
    size_t n_tensors;
    const es_tensor **tensors; /* all tensors of all files, sorted by name */
} es_weights;

int es_weights_open(const char *path, es_weights **out, es_error *err);
void es_weights_close(es_weights *w); /* NULL is fine */
const es_tensor *es_weights_find(const es_weights *w, const char *name);
/* The shards a model.safetensors.index.json text names (fuzzing, tests): its "weight_map" must be
 * a non-empty object of tensor name -> shard, each shard a plain .safetensors file name in the
 * index's folder (no '/', '\\', "..", NUL). *shards: sorted, unique, NULL-terminated; caller frees
 * each and the array. Errors are ES_ERR_DATA naming `name` and the entry. */
int es_safetensors_index_parse(const char *text, size_t len, const char *name, char ***shards, size_t *n_shards, es_error *err);

/* Writes a safetensors file: header with the tensors in the given order (and
 * "__metadata__" first when n_meta > 0), padded with spaces to a multiple of 8 bytes,
 * then the data contiguously in the same order. Goes through PATH.partial, fsync and
 * rename, then fsyncs the folder: PATH is never half-written, and on failure the
 * .partial is removed. Bad entries (empty, duplicate or "__metadata__" names, nbytes not
 * matching the shape, NULL data) are ES_ERR_DATA before anything is created; I/O
 * failures are ES_ERR_RUNTIME. The entries' file field is ignored. */
int es_safetensors_write(const char *path, const es_tensor *entries, size_t n,
                         const es_meta_kv *meta, size_t n_meta, es_error *err);

#endif
