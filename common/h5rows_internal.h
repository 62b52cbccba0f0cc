/* The row reader's path through HDF5's own H5Dread (common/h5rows_hdf5.c), shared with
 * common/h5rows.c: datasets of other layouts, filters or types than our fast path's. */
#ifndef ES_H5ROWS_INTERNAL_H
#define ES_H5ROWS_INTERNAL_H

#include "h5rows.h"

/* The elem a stored type is read as (es_rows_open's table); -1 for non-numeric types. */
int es_rows_type_elem(hid_t type, es_h5_elem *elem);

/* Rows [first, first + n) (within the dataset) read through H5Dread as mem_type (named
 * mem_name in messages), converted and checked as es_h5_conversion says. On failure the rows
 * are read again in halves to name the first bad row: its value when a conversion refused
 * it, its chunk and the chunk's rows when HDF5 could not read it (corrupt or truncated).
 * `out` holds n rows of mem_type and may be overwritten on failure. */
int es_rows_read_hdf5(const es_rows_reader *reader, int64_t first, int64_t n, void *out, hid_t mem_type,
                      const char *mem_name, es_error *err);

#endif
