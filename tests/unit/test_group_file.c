/* The device group's id through a file (align/group_file.c): what srun's ranks use without MPI.
 * Rank 0 writes, another process waits and reads the same bytes; a partial file or another job's
 * or step's file is never read; a wait that finds nothing ends with an error naming the file. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../testlib.h"
#include "group_file.h"

enum { ID_BYTES = 128 };

static char *temp_dir(void) {
    char *dir = malloc(256);
    snprintf(dir, 256, "%s/essence-group-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    return mkdtemp(dir);
}

TEST(waiting_rank_reads_what_rank_0_wrote) {
    char *dir = temp_dir();
    REQUIRE(dir);
    unsigned char id[ID_BYTES];
    for (int i = 0; i < ID_BYTES; i++) id[i] = (unsigned char)(i * 37 + 11);
    fflush(stdout);
    const pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) { /* rank 1: starts waiting before the file exists */
        unsigned char got[ID_BYTES] = {0};
        es_error err = {0};
        const int rc = group_file_share(dir, "4242", "0", 1, got, ID_BYTES, 20.0, &err);
        _exit(rc ? 2 : memcmp(got, id, ID_BYTES) ? 3 : 0);
    }
    usleep(200 * 1000);
    es_error err = {0};
    CHECKF(group_file_share(dir, "4242", "0", 0, id, ID_BYTES, 20.0, &err) == 0, "%s", err.msg);
    int status = 0;
    REQUIRE(waitpid(child, &status, 0) == child);
    CHECKF(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the waiting rank ended with %d", WEXITSTATUS(status));
    char path[512];
    snprintf(path, sizeof path, "%s/.essence-group-4242.0", dir);
    CHECK(access(path, F_OK) == 0);
    group_file_remove(dir, "4242", "0");
    CHECK(access(path, F_OK) != 0);
    rmdir(dir);
    free(dir);
}

TEST(partial_and_foreign_files_are_not_read) {
    char *dir = temp_dir();
    REQUIRE(dir);
    char path[512];
    /* a partial file of this job and step, and complete files of another job and of another step */
    const char *names[] = {".essence-group-7.0.partial", ".essence-group-8.0", ".essence-group-7.1"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        FILE *f = fopen(path, "w");
        REQUIRE(f);
        for (int k = 0; k < ID_BYTES; k++) fputc(k, f);
        fclose(f);
    }
    unsigned char got[ID_BYTES];
    es_error err = {0};
    CHECK(group_file_share(dir, "7", "0", 3, got, ID_BYTES, 0.3, &err) != 0);
    CHECKF(strstr(err.msg, ".essence-group-7.0") && strstr(err.msg, "rank 3"), "message: %s", err.msg);
    /* a short file is refused, naming it */
    snprintf(path, sizeof path, "%s/.essence-group-9.0", dir);
    FILE *f = fopen(path, "w");
    REQUIRE(f);
    fputs("short", f);
    fclose(f);
    err = (es_error){0};
    CHECK(group_file_share(dir, "9", "0", 1, got, ID_BYTES, 1.0, &err) != 0);
    CHECKF(strstr(err.msg, "5 bytes"), "message: %s", err.msg);
    for (int i = 0; i < 3; i++) snprintf(path, sizeof path, "%s/%s", dir, names[i]), unlink(path);
    snprintf(path, sizeof path, "%s/.essence-group-9.0", dir), unlink(path);
    rmdir(dir);
    free(dir);
}

int main(void) {
    RUN(waiting_rank_reads_what_rank_0_wrote);
    RUN(partial_and_foreign_files_are_not_read);
    return test_summary();
}
