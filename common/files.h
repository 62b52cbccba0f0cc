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
