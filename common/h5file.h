/* HDF5 files of essence: the bf16 type, attributes, and the write-to-.partial-then-rename
 * life cycle (docs/formats.md). All HDF5 calls happen on the calling thread. */
#ifndef ES_H5FILE_H
#define ES_H5FILE_H

#include <hdf5.h>
#include <stdint.h>

#include "error.h"

/* bf16 as an HDF5 custom float: size 2, precision 16, sign bit 15, exponent bits 7..14
 * (bias 127), mantissa bits 0..6. Any reader asking for float32 gets exact values.
 * Owned by the library: do not close. Returns a negative id when HDF5 fails. */
hid_t es_h5_bf16_type(void);

/* Silences HDF5's own error stack printing (we report errors ourselves) and registers
 * the zstd filter. Called by every open/create below; safe to call again. */
int es_h5_init(es_error *err);

typedef struct es_h5file {
    hid_t id;          /* the HDF5 file */
    char *path;        /* the name the file has when complete */
    char *open_path;   /* the name it has now: PATH.partial while being written */
    int writable;
} es_h5file;

/* Creates PATH.partial (replacing an old one). */
int es_h5_create(es_h5file *file, const char *path, es_error *err);
/* Reopens PATH.partial to continue writing it (--resume). ES_ERR_USAGE when there is none. */
int es_h5_open_partial(es_h5file *file, const char *path, es_error *err);
/* Opens a complete file read-only. A missing file is ES_ERR_USAGE; a file HDF5 cannot
 * read (truncated, not HDF5) is ES_ERR_DATA. */
int es_h5_open(es_h5file *file, const char *path, es_error *err);
/* Flushes the file to disk (a commit point while writing). */
int es_h5_flush(es_h5file *file, es_error *err);
/* Finishes a written file: close, fsync the file, rename PATH.partial -> PATH, fsync the
 * folder. Every object in the file must be closed first (checked). */
int es_h5_commit(es_h5file *file, es_error *err);
/* Closes without committing; a written file stays under PATH.partial (for --resume)
 * unless `remove_partial`. */
void es_h5_close(es_h5file *file, int remove_partial);

/* Attributes on any object (file, group or dataset). Strings are variable-length UTF-8
 * scalars (h5py reads them as str). Reading a string accepts fixed-length ones too. */
int es_h5_attr_set_str(hid_t obj, const char *name, const char *value, es_error *err);
int es_h5_attr_set_i64(hid_t obj, const char *name, int64_t value, es_error *err);
int es_h5_attr_set_f64(hid_t obj, const char *name, double value, es_error *err);
int es_h5_attr_get_str(hid_t obj, const char *name, char **value, es_error *err); /* malloc'd */
int es_h5_attr_get_i64(hid_t obj, const char *name, int64_t *value, es_error *err);
int es_h5_attr_get_f64(hid_t obj, const char *name, double *value, es_error *err);

/* Creates every missing group along "/a/b/c" and returns the last one (caller closes). */
hid_t es_h5_group(hid_t file, const char *path, es_error *err);

/* The file name of any object, for messages ("?" when HDF5 cannot tell). Static buffer per
 * thread. */
const char *es_h5_filename(hid_t obj);

/* The last HDF5 error message of this thread's error stack, for messages. */
const char *es_h5_last_error(void);

#endif
