/* The Slurm executor (docs/run.md): one sbatch script per stage that will run, made from the
 * template pipelines/slurm/stage.sbatch, submitted in plan order with --dependency=afterok on
 * the stages it reads from; a sharded stage is one job array over the shards still to run.
 *
 * Nothing from the pipeline file reaches a shell unchecked: the #SBATCH values must match strict
 * patterns, and every argument of a command line is single-quoted. sbatch, squeue and scancel
 * are started with posix_spawnp, without a shell.
 *
 * --wait polls squeue until no job of this call is pending or running, then judges each shard
 * as the local executor does, by its outputs: complete and carrying the stage's fingerprint. A
 * task squeue saw end in another state than COMPLETED failed whatever its outputs; a job squeue
 * has forgotten is judged by its outputs alone. sacct is not used: a small Slurm often has no
 * accounting storage. A stage that can never start because one before it failed is cancelled. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "files.h"
#include "run.h"

extern char **environ;

/* How long the outputs of a job that left the queue may take to appear: a shared file system
 * (NFS) can show the submitting host a file another node just renamed into place only after its
 * attribute cache expires. */
#define OUTPUT_GRACE_S 15
/* squeue failing this many times in a row (slurmctld down, not busy) ends the wait. */
#define SQUEUE_TRIES 60

/* ---- a growing string ------------------------------------------------------------------ */

typedef struct sbuf {
    char *s;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_addn(sbuf *b, const char *text, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *grown = realloc(b->s, cap);
        if (!grown) {
            b->oom = 1;
            return;
        }
        b->s = grown, b->cap = cap;
    }
    memcpy(b->s + b->len, text, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void sb_add(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_add(sbuf *b, const char *fmt, ...) {
    char *text = NULL;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&text, fmt, ap);
    va_end(ap);
    if (n < 0) b->oom = 1;
    else sb_addn(b, text, (size_t)n);
    free(text);
}

/* One shell word that the shell reads back verbatim: inside single quotes nothing is special
 * but the quote itself, which closes the quotes, is written escaped and reopens them. */
static void sb_quote(sbuf *b, const char *word) {
    sb_addn(b, "'", 1);
    for (const char *c = word; *c; c++)
        if (*c == '\'') sb_addn(b, "'\\''", 4);
        else sb_addn(b, c, 1);
    sb_addn(b, "'", 1);
}

/* ---- what the plan may put into #SBATCH lines --------------------------------------------- */

/* Non-empty and made only of `allowed` (and ASCII letters and digits when `alnum`). */
static int only(const char *s, const char *allowed, int alnum) {
    if (!*s) return 0;
    for (const char *c = s; *c; c++) {
        int letter = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9');
        if (!(alnum && letter) && !strchr(allowed, *c)) return 0;
    }
    return 1;
}

static int is_align(const run_stage *stage) {
    const char *base = strrchr(stage->program, '/');
    return !strcmp(base ? base + 1 : stage->program, "essence-align");
}

/* Several processes under srun: essence-align only (DESIGN.md: one process per GPU). */
static int uses_srun(const run_stage *stage) {
    return is_align(stage) && (stage->slurm.nodes > 1 || stage->slurm.gpus > 1);
}

/* Whether this call submits a job for the stage. */
static int submits(const run_stage *stage) {
    return stage->will_run && (stage->shards == 1 || stage->n_shards_to_run > 0);
}

static int check_stage(const run_plan *plan, const run_stage *stage, es_error *err) {
    const run_slurm *s = &stage->slurm;
    const char *file = plan->pipeline_path;
    if (!only(stage->name, "_-", 1)) return es_fail(err, ES_ERR_USAGE, "%s: stage \"%s\": the name is not [A-Za-z0-9_-]+", file, stage->name);
    /* The loader checked them already (FILE:LINE); a plan made otherwise is checked here. */
    const char *keys[] = {"partition", "account", "time", "mem"}, *values[] = {s->partition, s->account, s->time, s->mem};
    for (int k = 0; k < 4; k++) {
        const char *problem = values[k][0] ? run_slurm_value_problem(keys[k], values[k]) : NULL;
        if (problem) return es_fail(err, ES_ERR_USAGE, "%s: stage %s: slurm.%s \"%s\": %s", file, stage->name, keys[k], values[k], problem);
    }
    if (s->gpus < 0 || s->cpus < 0 || s->nodes < 0)
        return es_fail(err, ES_ERR_USAGE, "%s: stage %s: slurm gpus, cpus and nodes must not be negative", file, stage->name);
    if (s->nodes > 1 && !is_align(stage))
        return es_fail(err, ES_ERR_USAGE, "%s: stage %s: slurm.nodes %d: only essence-align runs on several nodes", file, stage->name, s->nodes);
    /* The log path goes into an #SBATCH line, which sbatch splits at white space and in which
     * Slurm expands %-patterns: the folder must be plain. */
    if (!only(plan->dir, "/_.:+,=@-", 1))
        return es_fail(err, ES_ERR_USAGE, "%s: the pipeline's folder \"%s\" has characters an #SBATCH --output line cannot carry (white space, %%, quotes...)",
                       file, plan->dir);
    return ES_OK;
}

/* ---- the script ---------------------------------------------------------------------------- */

static int read_template(const char *templates, char **text, es_error *err) {
    char *path;
    if (asprintf(&path, "%s/stage.sbatch", templates) < 0) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    FILE *f = fopen(path, "rb");
    if (!f) {
        int rc = es_fail(err, ES_ERR_RUNTIME, "%s: %s (the sbatch template)", path, strerror(errno));
        return free(path), rc;
    }
    sbuf b = {0};
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0 && b.len < (1 << 20)) sb_addn(&b, chunk, n);
    int failed = ferror(f);
    fclose(f);
    int rc = ES_OK;
    if (failed || b.oom || !b.s) rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot read the sbatch template", path);
    else if (!strstr(b.s, "@SBATCH_LINES@") || !strstr(b.s, "@COMMAND@"))
        rc = es_fail(err, ES_ERR_DATA, "%s: the sbatch template needs @SBATCH_LINES@ and @COMMAND@", path);
    free(path);
    if (rc) free(b.s);
    else *text = b.s;
    return rc;
}

/* One command line: `exec [srun --ntasks-per-node=G] 'ARG' ...`. exec: the job's exit status
 * is the program's, and scancel's or the time limit's signal reaches the program itself. */
static int add_command(sbuf *b, const run_stage *stage, int shard, const char *indent) {
    char **argv = run_stage_argv(stage, shard);
    if (!argv) return -1;
    sb_add(b, "%sexec", indent);
    if (uses_srun(stage)) sb_add(b, " srun --ntasks-per-node=%d", stage->slurm.gpus > 1 ? stage->slurm.gpus : 1);
    for (int i = 0; argv[i]; i++) {
        sb_addn(b, " ", 1);
        sb_quote(b, argv[i]);
    }
    sb_addn(b, "\n", 1);
    run_free_argv(argv);
    return 0;
}

/* The #SBATCH lines and the command of `stage`. `job_of` holds the job ids of the stages
 * submitted so far (dry run: NULL, and the stages it waits for are named instead). */
static int stage_parts(const run_plan *plan, const run_stage *stage, const long *job_of, sbuf *lines, sbuf *command) {
    const run_slurm *s = &stage->slurm;
    int array = stage->shards > 1;
    if (s->partition[0]) sb_add(lines, "#SBATCH --partition=%s\n", s->partition);
    if (s->account[0]) sb_add(lines, "#SBATCH --account=%s\n", s->account);
    if (s->time[0]) sb_add(lines, "#SBATCH --time=%s\n", s->time);
    if (s->nodes > 0) sb_add(lines, "#SBATCH --nodes=%d\n", s->nodes);
    if (uses_srun(stage)) sb_add(lines, "#SBATCH --ntasks-per-node=%d\n", s->gpus > 1 ? s->gpus : 1);
    if (s->gpus > 0) sb_add(lines, "#SBATCH --gres=gpu:%d\n", s->gpus);
    if (s->cpus > 0) sb_add(lines, "#SBATCH --cpus-per-task=%d\n", s->cpus);
    if (s->mem[0]) sb_add(lines, "#SBATCH --mem=%s\n", s->mem);
    /* The pipeline's folder as the working folder: the same on every node, wherever
     * essence-run was started (the command lines hold absolute paths anyway). */
    sb_add(lines, "#SBATCH --chdir=%s\n", plan->dir);
    sb_add(lines, "#SBATCH --output=%s/slurm-logs/%s-%s.out\n", plan->dir, stage->name, array ? "%A_%a" : "%j");
    if (array) {
        sb_add(lines, "#SBATCH --array=");
        for (int k = 0; k < stage->n_shards_to_run; k++) sb_add(lines, "%s%d", k ? "," : "", stage->shards_to_run[k]);
        sb_add(lines, "\n");
    }
    int first = 1;
    for (int d = 0; d < stage->n_deps; d++) {
        int dep = stage->deps[d];
        if (!submits(&plan->stages[dep]) || (job_of && job_of[dep] <= 0)) continue; /* done already */
        sb_add(lines, "%s", first ? "#SBATCH --dependency=afterok" : "");
        if (job_of) sb_add(lines, ":%ld", job_of[dep]);
        else sb_add(lines, ":<job of %s>", plan->stages[dep].name);
        first = 0;
    }
    if (!first) sb_add(lines, "\n");
    if (lines->len && lines->s[lines->len - 1] == '\n') lines->s[--lines->len] = '\0'; /* the template ends the line */

    if (!array) return add_command(command, stage, -1, "");
    /* The shell only compares the index with the literal shard numbers. */
    sb_add(command, "case \"${SLURM_ARRAY_TASK_ID-}\" in\n");
    for (int k = 0; k < stage->n_shards_to_run; k++) {
        sb_add(command, "%d)\n", stage->shards_to_run[k]);
        if (add_command(command, stage, stage->shards_to_run[k], "    ")) return -1;
        sb_add(command, "    ;;\n");
    }
    sb_add(command, "*)\n    echo \"essence-run: stage %s has no shard ${SLURM_ARRAY_TASK_ID-} to run\" >&2\n    exit 2 ;;\nesac", stage->name);
    return 0;
}

/* The template with the placeholders replaced and its "##" lines left out. */
static int render(const char *template, const run_plan *plan, const run_stage *stage, const long *job_of, sbuf *out) {
    sbuf lines = {0}, command = {0};
    if (stage_parts(plan, stage, job_of, &lines, &command) || lines.oom || command.oom) {
        free(lines.s), free(command.s);
        return -1;
    }
    char job_name[256];
    snprintf(job_name, sizeof job_name, "essence-%s", stage->name);
    /* The command may end without a newline (the case); the template's line supplies it. */
    if (command.len && command.s[command.len - 1] == '\n') command.s[--command.len] = '\0';
    const char *names[] = {"@STAGE@", "@JOB_NAME@", "@FINGERPRINT@", "@SBATCH_LINES@", "@COMMAND@"};
    const char *values[] = {stage->name, job_name, stage->fingerprint, lines.s ? lines.s : "", command.s ? command.s : ""};
    const char *at = template;
    while (*at) {
        const char *end = strchr(at, '\n');
        end = end ? end + 1 : at + strlen(at);
        if (!(at[0] == '#' && at[1] == '#')) {
            const char *c = at;
            while (c < end) {
                int matched = 0;
                for (size_t p = 0; *c == '@' && p < sizeof names / sizeof *names && !matched; p++)
                    if (!strncmp(c, names[p], strlen(names[p]))) {
                        sb_add(out, "%s", values[p]);
                        c += strlen(names[p]);
                        matched = 1;
                    }
                if (!matched) sb_addn(out, c++, 1);
            }
        }
        at = end;
    }
    free(lines.s), free(command.s);
    return out->oom ? -1 : 0;
}

/* ---- files and child processes ------------------------------------------------------------ */



/* Written under a temporary name and renamed: a script is there whole or not at all. */
static int write_file(const char *path, const char *text, es_error *err) {
    char *tmp;
    if (asprintf(&tmp, "%s.partial", path) < 0) return es_fail(err, ES_ERR_RUNTIME, "%s: out of memory", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        int rc = es_fail(err, ES_ERR_RUNTIME, "%s: %s", tmp, strerror(errno));
        return free(tmp), rc;
    }
    int ok = fputs(text, f) >= 0;
    ok &= fclose(f) == 0;
    int rc = ES_OK;
    if (!ok || rename(tmp, path)) {
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot write: %s", path, strerror(errno));
        unlink(tmp);
    }
    free(tmp);
    return rc;
}

/* Runs argv (found on PATH, no shell) and collects what it prints on stdout and stderr.
 * Returns 0 and *status (as waitpid gives it), or the errno of a start that failed. */
static int capture(char *const argv[], char **out, char **errs, int *status) {
    int pipes[2][2] = {{-1, -1}, {-1, -1}};
    *out = *errs = NULL;
    if (pipe2(pipes[0], O_CLOEXEC) || pipe2(pipes[1], O_CLOEXEC)) {
        int e = errno;
        for (int i = 0; i < 4; i++)
            if (pipes[i / 2][i % 2] >= 0) close(pipes[i / 2][i % 2]);
        return e;
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, pipes[0][1], 1);
    posix_spawn_file_actions_adddup2(&actions, pipes[1][1], 2);
    pid_t pid;
    fflush(stdout);
    int spawned = posix_spawnp(&pid, argv[0], &actions, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    close(pipes[0][1]), close(pipes[1][1]);
    sbuf text[2] = {{0}, {0}};
    /* Both pipes at once: a child that fills one while we block on the other would hang. */
    struct pollfd fds[2] = {{pipes[0][0], POLLIN, 0}, {pipes[1][0], POLLIN, 0}};
    int open_fds = spawned ? 0 : 2;
    while (open_fds > 0) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (fds[i].fd < 0 || !fds[i].revents) continue;
            char chunk[4096];
            ssize_t n = read(fds[i].fd, chunk, sizeof chunk);
            if (n > 0) {
                sb_addn(&text[i], chunk, (size_t)n);
            } else if (n == 0 || errno != EINTR) {
                fds[i].fd = -1;
                open_fds--;
            }
        }
    }
    close(pipes[0][0]), close(pipes[1][0]);
    if (spawned) return spawned;
    while (waitpid(pid, status, 0) < 0 && errno == EINTR) {
    }
    *out = text[0].s ? text[0].s : strdup("");
    *errs = text[1].s ? text[1].s : strdup("");
    return 0;
}

/* The first line of a program's complaint, for an error message. */
static const char *first_line(char *text) {
    text[strcspn(text, "\n")] = '\0';
    return text[0] ? text : "(no message)";
}

/* ---- submitting ----------------------------------------------------------------------------- */

static int submit(const char *script, const char *stage, long *job, es_error *err) {
    char *argv[] = {"sbatch", "--parsable", (char *)script, NULL}, *out, *errs;
    int status = 0, spawned = capture(argv, &out, &errs, &status);
    if (spawned)
        return es_fail(err, ES_ERR_RUNTIME, "stage %s: cannot run sbatch: %s (is Slurm installed and on PATH?)", stage, strerror(spawned));
    int rc = ES_OK;
    char *end = NULL;
    /* --parsable prints "ID" or "ID;CLUSTER". */
    long id = strtol(out, &end, 10);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        rc = es_fail(err, ES_ERR_RUNTIME, "stage %s: sbatch %s failed: %s", stage, script, first_line(errs));
    else if (id <= 0 || end == out || (*end && *end != ';' && *end != '\n'))
        rc = es_fail(err, ES_ERR_RUNTIME, "stage %s: sbatch %s printed no job id: \"%s\"", stage, script, first_line(out));
    else *job = id;
    free(out), free(errs);
    return rc;
}

/* ---- waiting -------------------------------------------------------------------------------- */

enum { JOB_NONE, JOB_QUEUED, JOB_ENDED, JOB_DONE, JOB_FAILED, JOB_NOT_RUN };

typedef struct job_state {
    int state;
    time_t ended;        /* when its last task left the running states */
    char (*final)[4];    /* per shard (one slot when not sharded): the final state squeue showed, "" if none */
} job_state;

/* squeue's compact states in which a job or array task is over; the others (PD, R, CG, S, ...)
 * mean it is still to run or running. */
static int is_final(const char *state) {
    static const char *const over[] = {"CD", "F", "CA", "TO", "NF", "OOM", "BF", "DL", "PR"};
    for (size_t i = 0; i < sizeof over / sizeof *over; i++)
        if (!strcmp(state, over[i])) return 1;
    return 0;
}

/* Whether one shard's (shard -1: the stage's) outputs are complete and carry its fingerprint. */
static int shard_outputs_ok(const run_stage *stage, int shard) {
    int ok = 1;
    for (int o = 0; o < stage->n_outputs && ok; o++) {
        const char *declared = stage->outputs[o].value;
        char *path = shard >= 0 ? run_shard_path(declared, shard, stage->shards) : strdup(declared);
        char stored[ES_FINGERPRINT_HEX];
        const char *why = "";
        ok = path && run_output_fingerprint(path, stored, &why) == 1 && !strcmp(stored, stage->fingerprint);
        free(path);
    }
    return ok;
}

static void cancel(long job) {
    char id[32], *argv[] = {"scancel", id, NULL}, *out = NULL, *errs = NULL;
    int status;
    snprintf(id, sizeof id, "%ld", job);
    if (capture(argv, &out, &errs, &status) == 0) free(out), free(errs);
}

/* One squeue over the jobs still queued: records the final state of each task that is over,
 * marks the stages none of whose tasks still runs (JOB_ENDED), and cancels the jobs Slurm will
 * never start because one they depend on failed (reason DependencyNeverSatisfied: a site without
 * SchedulerParameters=kill_invalid_depend keeps them pending for ever). Without accounting
 * storage squeue is the one witness of exit states, for MinJobAge after the end (5 minutes by
 * default); a job it has forgotten is judged by its outputs alone.
 * Returns 0, or -1 when squeue failed (*why: its message, malloc'd). */
static int poll_queue(const run_plan *plan, const long *job_of, job_state *jobs, char **why) {
    sbuf ids = {0};
    for (int s = 0; s < plan->n_stages; s++)
        if (jobs[s].state == JOB_QUEUED) sb_add(&ids, "%s%ld", ids.len ? "," : "", job_of[s]);
    if (!ids.len) return 0;
    if (ids.oom) return free(ids.s), *why = strdup("out of memory"), -1;
    char *argv[] = {"squeue", "-h", "-t", "all", "-j", ids.s, "-o", "%F|%K|%t|%r", NULL}, *out, *errs;
    int status = 0, spawned = capture(argv, &out, &errs, &status);
    free(ids.s);
    if (spawned) return *why = strdup(strerror(spawned)), -1;
    int failed = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    /* squeue -j naming only jobs that Slurm has forgotten says "Invalid job id". */
    int gone = failed && strstr(errs, "Invalid job id");
    if (failed && !gone) {
        *why = strdup(first_line(errs));
        free(out), free(errs);
        return -1;
    }
    int *active = calloc((size_t)plan->n_stages, sizeof *active);
    if (!active) return free(out), free(errs), *why = strdup("out of memory"), -1;
    /* Lines "ARRAY_JOB_ID|TASK|STATE|REASON": TASK is N/A for a plain job, a list for the
     * pending tasks of an array. */
    for (char *save = NULL, *line = gone ? NULL : strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *field[4] = {line, NULL, NULL, NULL};
        for (int f = 1; f < 4 && field[f - 1]; f++)
            if ((field[f] = strchr(field[f - 1], '|'))) *field[f]++ = '\0';
        if (!field[3]) continue;
        long job = strtol(field[0], NULL, 10);
        for (int s = 0; s < plan->n_stages; s++) {
            if (jobs[s].state != JOB_QUEUED || job_of[s] != job) continue;
            const run_stage *stage = &plan->stages[s];
            if (!is_final(field[2])) {
                active[s] = 1;
                if (!strcmp(field[3], "DependencyNeverSatisfied")) {
                    cancel(job);
                    jobs[s].state = JOB_NOT_RUN;
                    printf("%s not run: a stage it reads from failed (job %ld cancelled)\n", stage->name, job);
                    fflush(stdout);
                }
                continue;
            }
            char *end;
            long task = strtol(field[1], &end, 10);
            int slot = stage->shards > 1 ? (end != field[1] && !*end && task >= 0 && task < stage->shards ? (int)task : -1) : 0;
            if (slot >= 0) snprintf(jobs[s].final[slot], sizeof jobs[s].final[slot], "%.3s", field[2]);
        }
    }
    time_t now = time(NULL);
    for (int s = 0; s < plan->n_stages; s++)
        if (jobs[s].state == JOB_QUEUED && !active[s]) jobs[s].state = JOB_ENDED, jobs[s].ended = now;
    free(active), free(out), free(errs);
    return 0;
}

/* The verdict on a stage whose jobs are over: each shard succeeded when its outputs are
 * complete with the stage's fingerprint. A shard squeue saw end in another state than CD failed;
 * one that completed, or that squeue has forgotten, gets OUTPUT_GRACE_S for its outputs to show. */
static void judge(const run_plan *plan, int s, const long *job_of, job_state *jobs, time_t now) {
    const run_stage *stage = &plan->stages[s];
    job_state *job = &jobs[s];
    int upstream_failed = 0, n = stage->shards > 1 ? stage->n_shards_to_run : 1, unsure = 0, bad = 0;
    for (int d = 0; d < stage->n_deps; d++) upstream_failed |= jobs[stage->deps[d]].state == JOB_FAILED || jobs[stage->deps[d]].state == JOB_NOT_RUN;
    for (int k = 0; k < n; k++) {
        int shard = stage->shards > 1 ? stage->shards_to_run[k] : -1;
        const char *final = job->final[shard >= 0 ? shard : 0];
        if (final[0] && strcmp(final, "CD")) bad++;
        else if (!shard_outputs_ok(stage, shard)) unsure++;
    }
    if (!bad && !unsure) {
        job->state = JOB_DONE;
        printf("%s done (job %ld)\n", stage->name, job_of[s]);
    } else if (!bad && upstream_failed) {
        /* Slurm cancelled it itself (SchedulerParameters=kill_invalid_depend). */
        job->state = JOB_NOT_RUN;
        printf("%s not run: a stage it reads from failed (job %ld)\n", stage->name, job_of[s]);
    } else if (!unsure || now - job->ended >= OUTPUT_GRACE_S) {
        job->state = JOB_FAILED;
        for (int k = 0; k < n; k++) {
            int shard = stage->shards > 1 ? stage->shards_to_run[k] : -1;
            const char *final = job->final[shard >= 0 ? shard : 0];
            int failed = final[0] && strcmp(final, "CD");
            if (!failed && shard_outputs_ok(stage, shard)) continue;
            char state[64];
            snprintf(state, sizeof state, "%s%s", failed ? "squeue state " : "", failed ? final : "outputs incomplete");
            if (shard >= 0)
                printf("%s shard %d failed (%s): see %s/slurm-logs/%s-%ld_%d.out\n", stage->name, shard, state, plan->dir, stage->name, job_of[s], shard);
            else printf("%s failed (%s): see %s/slurm-logs/%s-%ld.out\n", stage->name, state, plan->dir, stage->name, job_of[s]);
        }
    }
    fflush(stdout);
}

static int wait_jobs(const run_plan *plan, const long *job_of, es_error *err) {
    int n = plan->n_stages, rc = ES_OK;
    job_state *jobs = calloc((size_t)n, sizeof *jobs);
    if (!jobs) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    sbuf list = {0};
    for (int s = 0; s < n && !rc; s++)
        if (job_of[s] > 0) {
            jobs[s].state = JOB_QUEUED;
            if (!(jobs[s].final = calloc((size_t)plan->stages[s].shards, sizeof *jobs[s].final))) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
            sb_add(&list, "%s%ld", list.len ? " " : "", job_of[s]);
        }
    if (!rc) printf("waiting for job%s %s\n", list.s && strchr(list.s, ' ') ? "s" : "", list.s ? list.s : "");
    fflush(stdout);
    free(list.s);
    time_t start = time(NULL);
    int squeue_failures = 0, busy = 1;
    while (busy && !rc) {
        char *why = NULL;
        if (poll_queue(plan, job_of, jobs, &why)) {
            if (++squeue_failures >= SQUEUE_TRIES)
                rc = es_fail(err, ES_ERR_RUNTIME, "squeue failed %d times in a row: %s (the jobs may still run)", squeue_failures, why ? why : "?");
        } else {
            squeue_failures = 0;
        }
        free(why);
        time_t now = time(NULL);
        busy = 0;
        /* Plan order: a stage's upstream stages are judged before it. */
        for (int s = 0; s < n; s++) {
            if (jobs[s].state == JOB_ENDED) judge(plan, s, job_of, jobs, now);
            busy |= jobs[s].state == JOB_QUEUED || jobs[s].state == JOB_ENDED;
        }
        if (busy && !rc) {
            /* Every second at first; a long wait asks slurmctld less often. */
            long pause = 1 + (long)(time(NULL) - start) / 60;
            sleep((unsigned)(pause < 15 ? pause : 15));
        }
    }
    int failures = 0;
    for (int s = 0; !rc && s < n; s++)
        if ((jobs[s].state == JOB_FAILED || jobs[s].state == JOB_NOT_RUN) && !failures++)
            es_fail(err, ES_ERR_RUNTIME, "stage %s %s (job %ld)", plan->stages[s].name, jobs[s].state == JOB_FAILED ? "failed" : "was not run", job_of[s]);
    if (failures) {
        size_t len = strlen(err->msg);
        if (failures > 1) snprintf(err->msg + len, sizeof err->msg - len, ", and %d other stage%s failed or did not run", failures - 1, failures > 2 ? "s" : "");
        len = strlen(err->msg);
        snprintf(err->msg + len, sizeof err->msg - len, "; the lines above name the logs");
        rc = ES_ERR_RUNTIME;
    }
    for (int s = 0; s < n; s++) free(jobs[s].final);
    free(jobs);
    return rc;
}

/* ---- the executor --------------------------------------------------------------------------- */

int run_slurm_execute(const run_plan *plan, const char *templates, int wait, int dry_run, es_error *err) {
    char *template = NULL;
    int rc = read_template(templates, &template, err);
    for (int s = 0; !rc && s < plan->n_stages; s++)
        if (submits(&plan->stages[s])) rc = check_stage(plan, &plan->stages[s], err);
    long *job_of = rc ? NULL : calloc((size_t)plan->n_stages, sizeof *job_of);
    if (!rc && !job_of) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    char *logs = NULL, *scripts = NULL;
    if (!rc && (asprintf(&logs, "%s/slurm-logs", plan->dir) < 0 || asprintf(&scripts, "%s/slurm-scripts", plan->dir) < 0))
        rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    /* Slurm does not create the log folder: a job whose --output cannot be opened fails unseen. */
    if (!rc && !dry_run && (es_make_dirs(logs) || es_make_dirs(scripts)))
        rc = es_fail(err, ES_ERR_RUNTIME, "%s: cannot create %s and %s: %s", plan->pipeline_path, logs, scripts, strerror(errno));
    int submitted = 0;
    for (int s = 0; !rc && s < plan->n_stages; s++) {
        const run_stage *stage = &plan->stages[s];
        if (!submits(stage)) continue;
        sbuf text = {0};
        char *path = NULL;
        if (asprintf(&path, "%s/%s.sbatch", scripts, stage->name) < 0) path = NULL;
        if (!path || render(template, plan, stage, dry_run ? NULL : job_of, &text)) {
            free(text.s), free(path);
            rc = es_fail(err, ES_ERR_RUNTIME, "stage %s: out of memory", stage->name);
            break;
        }
        if (dry_run) {
            printf("# %s: %s\n%s\n", stage->name, path, text.s);
            free(text.s), free(path);
            continue;
        }
        for (int o = 0; !rc && o < stage->n_outputs; o++)
            if (es_make_parent_dirs(stage->outputs[o].value))
                rc = es_fail(err, ES_ERR_RUNTIME, "stage %s: %s: cannot create its folder: %s", stage->name, stage->outputs[o].value, strerror(errno));
        if (!rc) rc = write_file(path, text.s, err);
        free(text.s);
        if (!rc) rc = submit(path, stage->name, &job_of[s], err);
        free(path);
        if (!rc) {
            submitted++;
            printf("%s submitted as job %ld\n", stage->name, job_of[s]);
            fflush(stdout);
        }
    }
    if (rc && submitted) {
        /* The jobs already queued stay: the message names them, to be found and cancelled. */
        size_t len = strlen(err->msg);
        snprintf(err->msg + len, sizeof err->msg - len, " (already submitted:");
        for (int s = 0; s < plan->n_stages; s++)
            if (job_of[s] > 0 && (len = strlen(err->msg)) < sizeof err->msg) snprintf(err->msg + len, sizeof err->msg - len, " %ld", job_of[s]);
        if ((len = strlen(err->msg)) < sizeof err->msg) snprintf(err->msg + len, sizeof err->msg - len, ")");
    }
    if (!rc && wait && !dry_run && submitted) rc = wait_jobs(plan, job_of, err);
    free(job_of), free(template), free(logs), free(scripts);
    return rc;
}
