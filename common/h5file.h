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
/* The same silence for the calling thread: a thread-safe HDF5 keeps an error stack per thread,
 * so a thread of ours that calls HDF5 (extract's writer, align's prefetch) calls this first. */
void es_h5_quiet_thread(void);

typedef struct es_h5file {
    hid_t id;          /* the HDF5 file */
    char *path;        /* the name the file has when complete */
    char *open_path;   /* the name it has now: PATH.partial while being written */
    int writable;
} es_h5file;

/* Creates PATH.partial (replacing an old one). */
int es_h5_create(es_h5file *file, const char *path, es_error *err);
/* Reopens PATH.partial to continue writing it (--resume). ES_ERR_USAGE when there is none. Takes
 * the whole file as allocated (a kill during a flush can leave the superblock's end-of-allocation
 * short of metadata already on disk). */
int es_h5_open_partial(es_h5file *file, const char *path, es_error *err);
/* Opens a complete file read-only. A missing file is ES_ERR_USAGE; a file HDF5 cannot
 * read (truncated, not HDF5) is ES_ERR_DATA. */
int es_h5_open(es_h5file *file, const char *path, es_error *err);
/* Reads every variable-length value of the HDF5 file PATH (with `attributes_only`, those of
 * attributes) in a child process, and says how that went: libhdf5 crashes or loops on some
 * damaged global heaps, and a crash there must be an error (ES_ERR_DATA naming the file and the
 * attribute or rows), not ours. es_h5_open and es_h5_open_partial call it before opening; see
 * common/h5heap.c. */
int es_h5_check_heap(const char *path, int attributes_only, es_error *err);
/* CPU seconds the child may spend without progress before it counts as looping (3; the fuzzer
 * lowers it). */
extern double es_h5_heap_spin_seconds;
/* Flushes the file to disk (a commit point while writing). */
int es_h5_flush(es_h5file *file, es_error *err);
/* Finishes a written file: close, fsync the file, rename PATH.partial -> PATH, fsync the
 * folder. Every object in the file must be closed first (checked). */
int es_h5_commit(es_h5file *file, es_error *err);
/* Closes without committing; a written file stays under PATH.partial (for --resume)
 * unless `remove_partial`. */
void es_h5_close(es_h5file *file, int remove_partial);

/* Attributes on any object (file, group or dataset). Strings are variable-length UTF-8
 * scalars (h5py reads them as str); integers int64, reals float64. Reading is lenient about
 * how another tool stored a value, strict about the value: a string accepts fixed-length
 * strings too; an integer accepts any integer type (range-checked), a float holding an
 * integer, or a string of decimal digits (files before integers were written as integers);
 * a real accepts any integer or float, or a string holding a number. Anything else is
 * ES_ERR_DATA naming the file, the attribute and its type. */
int es_h5_attr_set_str(hid_t obj, const char *name, const char *value, es_error *err);
int es_h5_attr_set_i64(hid_t obj, const char *name, int64_t value, es_error *err);
int es_h5_attr_set_f64(hid_t obj, const char *name, double value, es_error *err);
int es_h5_attr_get_str(hid_t obj, const char *name, char **value, es_error *err); /* malloc'd */
int es_h5_attr_get_i64(hid_t obj, const char *name, int64_t *value, es_error *err);
int es_h5_attr_get_f64(hid_t obj, const char *name, double *value, es_error *err);

/* ---- reading datasets written by any tool ---------------------------------------------- */

/* A dataset's element type in words for messages: "int64", "uint16", "float16", "bf16",
 * "float64 big-endian", "string (vlen)", "string[12]", "enum of int8", "compound", ... */
void es_h5_type_name(hid_t type, char *buf, size_t size);

/* Every filter of the dataset's pipeline must be available to decode it: a missing one
 * (LZ4 or Blosc written through hdf5plugin, say) is ES_ERR_DATA naming `name`, the filter's
 * id and name, and HDF5_PLUGIN_PATH. */
int es_h5_check_filters(hid_t dataset, const char *name, es_error *err);

/* How HDF5 converts values for our reads: to an integer type, a value out of range, a
 * fraction, NaN or infinity stops the conversion (HDF5 would clamp or truncate silently);
 * to a float type, HDF5's rules apply (a float64 beyond float32's range becomes infinite). */
typedef struct es_h5_conversion {
    int to_integer; /* the memory type is an integer type */
    int problem;    /* -1: none; else the H5T_conv_except_t that stopped the conversion */
} es_h5_conversion;
/* A transfer property list (caller closes) whose conversion callback records into *state. */
hid_t es_h5_conversion_xfer(es_h5_conversion *state, int to_integer);
/* "a value above the range of int32", "a value that is not an integer", ... */
const char *es_h5_conversion_problem(const es_h5_conversion *state, const char *target_name);

/* Strings [first, first + n) of a 1-D string dataset (variable- or fixed-length, any
 * character set), each malloc'd into out[] (fixed-length ones end at their first NUL, or lose
 * their padding spaces). Other types are ES_ERR_DATA naming `name` and the type. */
int es_h5_read_strings(hid_t dataset, const char *name, int64_t first, int64_t n, char **out, es_error *err);

/* Creates every missing group along "/a/b/c" and returns the last one (caller closes). */
hid_t es_h5_group(hid_t file, const char *path, es_error *err);

/* The file name of any object, for messages ("?" when HDF5 cannot tell). Static buffer per
 * thread. */
const char *es_h5_filename(hid_t obj);

/* The last HDF5 error message of this thread's error stack, for messages. */
const char *es_h5_last_error(void);

#endif
