/* A device group's id through a file (align/group_file.h). */
#include "group_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void path_of(char *path, size_t size, const char *dir, const char *job, const char *step, const char *suffix) {
    snprintf(path, size, "%s/.essence-group-%s.%s%s", dir, job, step, suffix);
}

static int write_all(int fd, const unsigned char *data, size_t size) {
    for (size_t done = 0; done < size;) {
        const ssize_t n = write(fd, data + done, size - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        done += (size_t)n;
    }
    return 0;
}

int group_file_share(const char *dir, const char *job, const char *step, int rank, unsigned char *id, size_t size, double timeout_s,
                     es_error *err) {
    char path[4200], partial[4300];
    path_of(path, sizeof path, dir, job, step, "");
    if (rank == 0) {
        path_of(partial, sizeof partial, dir, job, step, ".partial");
        const int fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: %s", partial, strerror(errno));
        const int failed = write_all(fd, id, size) || fsync(fd);
        const int saved = errno;
        if (close(fd) || failed) {
            unlink(partial);
            return es_fail(err, ES_ERR_RUNTIME, "%s: %s", partial, strerror(failed ? saved : errno));
        }
        if (rename(partial, path)) {
            const int saved_rename = errno;
            unlink(partial);
            return es_fail(err, ES_ERR_RUNTIME, "%s: %s", path, strerror(saved_rename));
        }
        return ES_OK;
    }
    struct timespec start, now, pause = {0, 10 * 1000 * 1000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        const int fd = open(path, O_RDONLY);
        if (fd >= 0) {
            size_t done = 0;
            while (done < size) {
                const ssize_t n = read(fd, id + done, size - done);
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) break;
                done += (size_t)n;
            }
            close(fd);
            if (done == size) return ES_OK;
            return es_fail(err, ES_ERR_RUNTIME, "%s: %zu bytes, not the %zu of a group id", path, done, size);
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((double)(now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) * 1e-9 > timeout_s)
            return es_fail(err, ES_ERR_RUNTIME, "rank %d waited %.0f s for %s from rank 0 (is --out on a file system every node shares?)",
                           rank, timeout_s, path);
        nanosleep(&pause, NULL);
    }
}

void group_file_remove(const char *dir, const char *job, const char *step) {
    char path[4200];
    path_of(path, sizeof path, dir, job, step, "");
    unlink(path);
}
