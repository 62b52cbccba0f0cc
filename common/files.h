/* Small file-system steps every writer of complete-or-absent outputs needs. */
#ifndef ES_FILES_H
#define ES_FILES_H

#include <stddef.h>

#include "error.h"

/* write() until n bytes are written (EINTR retried); 0, or -1 with errno set. */
int es_write_all(int fd, const void *buf, size_t n);
/* fsync a folder, so a rename inside it is durable. File systems that cannot fsync a folder
 * (EINVAL) are accepted: the rename is all they offer. Errors name the folder. */
int es_fsync_folder(const char *dir, es_error *err);
/* es_fsync_folder of the folder holding `path`. */
int es_fsync_parent(const char *path, es_error *err);
/* mkdir -p `dir`; 0, or -1 with errno set. */
int es_make_dirs(const char *dir);
/* mkdir -p of the folder holding `path`; 0, or -1 with errno set. */
int es_make_parent_dirs(const char *path);

#endif

/* An input a program reads, named by its option, for es_check_output_clear. */
typedef struct es_named_path {
    const char *option; /* "data", "model", ... */
    const char *path;   /* NULL, "" or "-" (standard input): nothing to compare */
} es_named_path;

/* Refuses (ES_ERR_USAGE, naming both options and paths) an output `out` (given by --OPTION)
 * that is one of the inputs, holds one (a folder output), or lies inside one (an input folder),
 * and, with `partial`, the same for OUT.partial, the name it is written under. Paths compare
 * after symbolic links and "." / ".." are resolved (an output that does not exist yet by its
 * nearest existing folder), and files also by device and inode (hard links). */
int es_check_output_clear(const char *option, const char *out, int partial, const es_named_path *inputs, size_t n_inputs,
                          es_error *err);
/* The absolute path with symbolic links resolved, for a path that may not exist yet: its nearest
 * existing ancestor resolved, the rest appended ("." and ".." taken lexically). Caller frees;
 * NULL when out of memory or when no ancestor resolves. */
char *es_resolve_path(const char *path);
