#include "files.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int es_write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n > (1u << 30) ? (1u << 30) : n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int es_fsync_folder(const char *dir, es_error *err) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: cannot open folder: %s", dir, strerror(errno));
    int rc = ES_OK;
    if (fsync(fd) != 0 && errno != EINVAL) rc = es_fail(err, ES_ERR_RUNTIME, "%s: fsync failed: %s", dir, strerror(errno));
    if (close(fd) != 0 && rc == ES_OK) rc = es_fail(err, ES_ERR_RUNTIME, "%s: close failed: %s", dir, strerror(errno));
    return rc;
}

int es_fsync_parent(const char *path, es_error *err) {
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!dir) return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
    int rc = es_fsync_folder(dir, err);
    free(dir);
    return rc;
}

int es_make_dirs(const char *dir) {
    char *copy = strdup(dir);
    if (!copy) return -1;
    int rc = 0;
    for (char *p = copy + 1; *p && !rc; p++)
        if (*p == '/') {
            *p = '\0';
            rc = mkdir(copy, 0777) && errno != EEXIST ? -1 : 0;
            *p = '/';
        }
    if (!rc) rc = mkdir(copy, 0777) && errno != EEXIST ? -1 : 0;
    int saved = errno;
    free(copy);
    errno = saved;
    return rc;
}

int es_make_parent_dirs(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash || slash == path) return 0;
    char *dir = strndup(path, (size_t)(slash - path));
    if (!dir) return -1;
    int rc = es_make_dirs(dir), saved = errno;
    free(dir);
    errno = saved;
    return rc;
}
