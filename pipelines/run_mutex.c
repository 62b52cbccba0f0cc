/* One essence-run at a time in a pipeline's folder (docs/run.md "Two essence-runs at once").
 *
 * essence.lock is shared by the pipelines of a folder, so the folder is the unit: `run` holds an
 * flock(2) on PIPELINE_DIR/essence-run.lock for as long as it runs, and the stage it starts
 * inherits that open file, so the lock is free only once the runner and its stage are both gone
 * (a stage that outlived a SIGKILLed runner still holds it, and the next `run` refuses). The
 * file's text says who holds it (key=value lines), for the refusal message; the lock itself is
 * the flock, never the file's existence, so a stale file from a killed run means nothing.
 * `status` takes the lock only for the moment it saves essence.lock's cache, and never waits. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "files.h"
#include "run.h"

/* How long `run` retries a busy lock before refusing: long enough for a `status` saving the
 * cache (milliseconds) or a stage still dying after its runner's SIGKILL, short enough to be
 * "at once" for a person. */
#define RETRY_MS 1000
#define RETRY_STEP_MS 20

struct run_mutex {
    int fd;
    char *path;
    char *pipeline; /* the holder's pipeline file, for its text */
};

static void sleep_ms(long ms) {
    struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&pause, &pause) < 0 && errno == EINTR) {
    }
}

/* Opens (creating) the lock file; NULL with errno set. */
static run_mutex *open_mutex(const char *dir) {
    run_mutex *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    if (asprintf(&m->path, "%s/%s", dir, RUN_MUTEX_FILE) < 0) {
        free(m);
        errno = ENOMEM;
        return NULL;
    }
    m->fd = open(m->path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (m->fd < 0) {
        int e = errno;
        free(m->path), free(m);
        errno = e;
        return NULL;
    }
    return m;
}

static void close_mutex(run_mutex *m) {
    if (!m) return;
    if (m->fd >= 0) close(m->fd); /* releases the flock unless a live stage shares the file */
    free(m->path), free(m->pipeline);
    free(m);
}

/* The holder's text, in place: ftruncate then one write; a reader that comes in between sees an
 * empty file and retries. role=run for a run, role=status for a status saving the cache. */
static void write_holder(run_mutex *m, const char *stage, long stage_pid) {
    char text[8192];
    int n = m->pipeline ? snprintf(text, sizeof text, "pid=%ld\nrole=run\npipeline=%s\n", (long)getpid(), m->pipeline)
                        : snprintf(text, sizeof text, "pid=%ld\nrole=status\n", (long)getpid());
    if (stage && n > 0 && (size_t)n < sizeof text)
        n += snprintf(text + n, sizeof text - (size_t)n, "stage=%s\nstage_pid=%ld\n", stage, stage_pid);
    if (n <= 0 || (size_t)n >= sizeof text) return;
    /* Best effort: the text only words the refusal; the flock is the lock. */
    if (ftruncate(m->fd, 0) == 0 && pwrite(m->fd, text, (size_t)n, 0) < 0) {
    }
}

/* The value of `key=` in the holder's text, copied into out ("" when absent). */
static void holder_value(const char *text, const char *key, char *out, size_t size) {
    size_t len = strlen(key);
    out[0] = '\0';
    for (const char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
        if (!strncmp(line, key, len) && line[len] == '=') {
            size_t n = strcspn(line + len + 1, "\n");
            snprintf(out, size, "%.*s", (int)(n < size ? n : size - 1), line + len + 1);
            return;
        }
}

static int alive(long pid) { return pid > 0 && (kill((pid_t)pid, 0) == 0 || errno == EPERM); }

/* The holder's text (retried while it is being rewritten: empty). */
static void read_holder(run_mutex *m, char *text, size_t size) {
    text[0] = '\0';
    for (int tries = 0; tries < 10 && !strstr(text, "role="); tries++) {
        ssize_t n = pread(m->fd, text, size - 1, 0);
        text[n > 0 ? n : 0] = '\0';
        if (!strstr(text, "role=")) sleep_ms(RETRY_STEP_MS);
    }
}

/* Whether the lock is held by a live `run` (refused at once) rather than by a status saving
 * the cache or a stage still dying (worth a short wait). */
static int held_by_live_run(run_mutex *m) {
    char text[8192], pid[32], role[16];
    read_holder(m, text, sizeof text);
    holder_value(text, "pid", pid, sizeof pid);
    holder_value(text, "role", role, sizeof role);
    return !strcmp(role, "run") && alive(strtol(pid, NULL, 10));
}

/* The refusal: who holds the lock, from its text. */
static int refuse(run_mutex *m, const run_plan *plan, es_error *err) {
    char text[8192] = "", pid[32], pipeline[4096], stage[256], stage_pid[32];
    read_holder(m, text, sizeof text);
    holder_value(text, "pid", pid, sizeof pid);
    holder_value(text, "pipeline", pipeline, sizeof pipeline);
    holder_value(text, "stage", stage, sizeof stage);
    holder_value(text, "stage_pid", stage_pid, sizeof stage_pid);
    const char *name = strrchr(pipeline, '/') ? strrchr(pipeline, '/') + 1 : pipeline;
    int rc;
    if (!pid[0]) {
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: another essence-run holds %s (it did not say which); not starting a second one in %s",
                     plan->pipeline_path, m->path, plan->dir);
    } else if (alive(strtol(pid, NULL, 10))) {
        char doing[512] = "";
        if (stage[0]) snprintf(doing, sizeof doing, ", stage %s as pid %s", stage, stage_pid);
        rc = es_fail(err, ES_ERR_RUNTIME,
                     "%s: another essence-run (pid %s) is running %s in this folder%s; not starting a second one (wait for it, or stop it: kill %s)",
                     plan->pipeline_path, pid, name[0] ? name : "a pipeline", doing, pid);
    } else if (stage[0] && alive(strtol(stage_pid, NULL, 10))) {
        rc = es_fail(err, ES_ERR_RUNTIME,
                     "%s: the essence-run (pid %s) that ran %s here is gone, but its stage %s (pid %s) still runs and holds %s; "
                     "wait for it to end, or stop it (kill %s), then run again",
                     plan->pipeline_path, pid, name[0] ? name : "a pipeline", stage, stage_pid, m->path, stage_pid);
    } else {
        rc = es_fail(err, ES_ERR_RUNTIME,
                     "%s: the essence-run (pid %s) that ran %s here is gone, but a process it started still holds %s "
                     "(fuser -v %s names it); wait for it to end, then run again",
                     plan->pipeline_path, pid, name[0] ? name : "a pipeline", m->path, m->path);
    }
    return rc;
}

int run_mutex_acquire(run_mutex **out, const run_plan *plan, es_error *err) {
    *out = NULL;
    run_mutex *m = open_mutex(plan->dir);
    if (!m) return es_fail(err, ES_ERR_RUNTIME, "%s/%s: cannot open the run lock: %s", plan->dir, RUN_MUTEX_FILE, strerror(errno));
    int waited = 0;
    while (flock(m->fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EINTR) continue;
        if (errno != EWOULDBLOCK || waited >= RETRY_MS || held_by_live_run(m)) {
            int rc = errno == EWOULDBLOCK ? refuse(m, plan, err)
                                          : es_fail(err, ES_ERR_RUNTIME, "%s: cannot lock: %s", m->path, strerror(errno));
            close_mutex(m);
            return rc;
        }
        sleep_ms(RETRY_STEP_MS);
        waited += RETRY_STEP_MS;
    }
    if (!(m->pipeline = strdup(plan->pipeline_path))) {
        close_mutex(m);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    write_holder(m, NULL, 0);
    *out = m;
    return ES_OK;
}

int run_mutex_try(run_mutex **out, const char *dir) {
    *out = NULL;
    run_mutex *m = open_mutex(dir);
    if (!m) return 0; /* a folder we may not write: nothing to save there anyway */
    int rc;
    while ((rc = flock(m->fd, LOCK_EX | LOCK_NB)) != 0 && errno == EINTR) {
    }
    if (rc) {
        close_mutex(m);
        return 0;
    }
    write_holder(m, NULL, 0); /* role=status: a run that meets it waits a moment */
    *out = m;
    return 1;
}

int run_mutex_fd(const run_mutex *m) { return m ? m->fd : -1; }

void run_mutex_note_stage(run_mutex *m, const char *stage, long stage_pid) {
    if (m) write_holder(m, stage, stage_pid);
}

void run_mutex_release(run_mutex *m) {
    if (m && m->pipeline) write_holder(m, NULL, 0); /* no stage any more */
    close_mutex(m);
}
