/* The local executor: every stage that will run, in plan order, shard after shard, as a child
 * process (no shell); a stage is recorded in essence.lock once its outputs carry its fingerprint. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "files.h"
#include "run.h"

/* Starts argv[0] with the stage's lifetime tied to essence-run's: the child asks for SIGKILL
 * when its parent dies (PR_SET_PDEATHSIG), then checks that the parent did not die before it
 * asked (getppid() is no longer the parent's pid), and keeps the run lock's file open across
 * exec (lock_fd, else -1), so the folder stays locked until the stage is gone too. A failed exec
 * comes back through a close-on-exec pipe: 0 and *pid, or the errno of the failure. Between fork
 * and exec only async-signal-safe calls. */
static int start_stage(char *const *argv, int lock_fd, pid_t *pid) {
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0) return errno;
    pid_t parent = getpid();
    fflush(stdout), fflush(stderr);
    pid_t child = fork();
    if (child < 0) {
        int e = errno;
        close(report[0]), close(report[1]);
        return e;
    }
    if (child == 0) {
        int e = 0;
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) e = errno;
        else if (getppid() != parent) _exit(127); /* essence-run died before the request: no stage */
        else if (lock_fd >= 0 && fcntl(lock_fd, F_SETFD, 0) != 0) e = errno;
        else execv(argv[0], argv), e = errno;
        while (write(report[1], &e, sizeof e) < 0 && errno == EINTR) {
        }
        _exit(127);
    }
    close(report[1]);
    int e = 0;
    ssize_t n;
    while ((n = read(report[0], &e, sizeof e)) < 0 && errno == EINTR) {
    }
    close(report[0]);
    if (n == (ssize_t)sizeof e && e) { /* it did not start: collect it */
        while (waitpid(child, NULL, 0) < 0 && errno == EINTR) {
        }
        return e;
    }
    *pid = child;
    return 0;
}

int run_local_execute(run_plan *plan, run_lock *lock, run_mutex *mutex, int dry_run, es_error *err) {
    int rc = ES_OK;
    for (int s = 0; !rc && s < plan->n_stages; s++) {
        run_stage *stage = &plan->stages[s];
        if (!stage->will_run) continue;
        for (int o = 0; o < stage->n_outputs; o++)
            if (!dry_run && es_make_parent_dirs(stage->outputs[o].value))
                return es_fail(err, ES_ERR_RUNTIME, "%s: cannot create its folder: %s", stage->outputs[o].value, strerror(errno));
        for (int k = 0; !rc && k < stage->n_shards_to_run; k++) {
            int shard = stage->shards > 1 ? stage->shards_to_run[k] : -1;
            char **argv = run_stage_argv(stage, shard);
            char *line = argv ? run_quote_argv(argv) : NULL;
            if (!argv || !line) {
                run_free_argv(argv);
                return es_fail(err, ES_ERR_RUNTIME, "out of memory");
            }
            printf("%s%s: %s\n", stage->name, dry_run ? " would run" : "", line);
            fflush(stdout);
            free(line);
            if (dry_run) {
                run_free_argv(argv);
                continue;
            }
            pid_t pid = -1;
            int status = 0, spawned = start_stage(argv, run_mutex_fd(mutex), &pid);
            run_free_argv(argv);
            if (spawned) return es_fail(err, ES_ERR_RUNTIME, "stage %s: cannot start %s: %s", stage->name, stage->program, strerror(spawned));
            run_mutex_note_stage(mutex, stage->name, (long)pid);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
            }
            run_mutex_note_stage(mutex, NULL, 0);
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                char shard_text[32] = "";
                if (shard >= 0) snprintf(shard_text, sizeof shard_text, " shard %d", shard);
                rc = es_fail(err, ES_ERR_RUNTIME, "stage %s%s failed (%s %d): later stages not run", stage->name, shard_text,
                             WIFEXITED(status) ? "exit status" : "signal", WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
            }
        }
        if (rc || dry_run) continue;
        /* The outputs must now carry the stage's fingerprint. */
        for (int shard = 0; !rc && shard < stage->shards; shard++)
            for (int o = 0; !rc && o < stage->n_outputs; o++) {
                char *path = stage->shards > 1 ? run_shard_path(stage->outputs[o].value, shard, stage->shards) : strdup(stage->outputs[o].value);
                char stored[ES_FINGERPRINT_HEX];
                const char *why = "";
                if (!path || run_output_fingerprint(path, stored, &why) != 1 || strcmp(stored, stage->fingerprint))
                    rc = es_fail(err, ES_ERR_RUNTIME, "stage %s: %s does not carry the stage's fingerprint after the run (%s)", stage->name,
                                 path ? path : "?", why[0] ? why : "a different one");
                free(path);
            }
        if (!rc) rc = run_lock_record(lock, plan, s, err);
        if (!rc) rc = run_lock_save(lock, err);
    }
    return rc;
}
