#include "files.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
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

/* Appends the components of `rest` to the resolved folder `base` ("." dropped, ".." up one). */
static char *append_lexically(char *base, const char *rest) {
    size_t len = strlen(base), cap = len + strlen(rest) + 2;
    char *out = realloc(base, cap);
    if (!out) return free(base), NULL;
    for (const char *p = rest; *p;) {
        while (*p == '/') p++;
        const char *end = strchr(p, '/');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == 0) break;
        if (n == 1 && p[0] == '.') {
        } else if (n == 2 && p[0] == '.' && p[1] == '.') {
            char *slash = strrchr(out, '/');
            if (slash) slash == out ? (void)(out[1] = '\0') : (void)(*slash = '\0');
        } else {
            len = strlen(out);
            if (len > 1 || out[0] != '/') out[len++] = '/';
            memcpy(out + len, p, n);
            out[len + n] = '\0';
        }
        p += n;
    }
    return out;
}

char *es_resolve_path(const char *path) {
    char *resolved = realpath(path, NULL);
    if (resolved) return resolved;
    /* Not there yet: resolve the longest existing prefix that ends at a '/'. */
    char *copy = strdup(path);
    if (!copy) return NULL;
    char *rest = NULL;
    for (;;) {
        char *slash = strrchr(copy, '/');
        if (!slash) {
            resolved = realpath(".", NULL);
            rest = (char *)path;
            break;
        }
        if (slash == copy) {
            resolved = strdup("/");
            rest = (char *)path + 1;
            break;
        }
        *slash = '\0';
        if ((resolved = realpath(copy, NULL))) {
            rest = (char *)path + (slash - copy) + 1;
            break;
        }
    }
    char *out = resolved ? append_lexically(resolved, rest) : NULL;
    free(copy);
    return out;
}

/* "is", "holds" or "is inside", for resolved paths a (the output) and b (an input); NULL: apart. */
static const char *relation(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    if (!strcmp(a, b)) return "is";
    if (nb > na && !strncmp(a, b, na) && (b[na] == '/' || (na == 1 && a[0] == '/'))) return "holds";
    if (na > nb && !strncmp(a, b, nb) && (a[nb] == '/' || (nb == 1 && b[0] == '/'))) return "is inside";
    return NULL;
}

static int check_one(const char *option, const char *shown, const char *out, const es_named_path *in, es_error *err) {
    struct stat so, si;
    if (stat(out, &so) == 0 && stat(in->path, &si) == 0 && so.st_dev == si.st_dev && so.st_ino == si.st_ino)
        return es_fail(err, ES_ERR_USAGE, "--%s %s is the input --%s %s (the same file): refusing to overwrite an input", option,
                       shown, in->option, in->path);
    char *a = es_resolve_path(out), *b = realpath(in->path, NULL); /* an input not there is reported by its reader */
    if (!a) {
        free(b);
        return es_fail(err, ES_ERR_USAGE, "--%s %s: cannot resolve the path: %s", option, shown, strerror(errno));
    }
    const char *how = b ? relation(a, b) : NULL;
    int rc = how ? es_fail(err, ES_ERR_USAGE, "--%s %s %s the input --%s %s: refusing to overwrite an input", option, shown,
                           how, in->option, in->path)
                 : ES_OK;
    free(a), free(b);
    return rc;
}

int es_check_output_clear(const char *option, const char *out, int partial, const es_named_path *inputs, size_t n_inputs,
                          es_error *err) {
    char *partial_name = NULL;
    if (partial && asprintf(&partial_name, "%s.partial", out) < 0) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    int rc = ES_OK;
    for (size_t i = 0; !rc && i < n_inputs; i++) {
        const es_named_path *in = &inputs[i];
        if (!in->path || !*in->path || !strcmp(in->path, "-")) continue;
        rc = check_one(option, out, out, in, err);
        if (!rc && partial_name) rc = check_one(option, partial_name, partial_name, in, err);
    }
    free(partial_name);
    return rc;
}
