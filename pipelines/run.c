/* essence-run: runs a pipeline of essence's stages, re-running only what changed (docs/run.md).
 *
 * main() is the story: read the pipeline into a plan, fingerprint it against the outputs and
 * essence.lock, then print the status, or carry the plan out locally or on Slurm. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "run.h"

static const char usage[] =
    "usage: essence-run PIPELINE.yaml [status|run] [--executor local|slurm] [--set STAGE.KEY=VALUE ...] [--force STAGE]\n"
    "                   [--dry-run] [--wait]\n"
    "  status    one line per stage: STAGE up-to-date, or STAGE will-run: REASON (the default; read-only,\n"
    "            it never waits for a run)\n"
    "  run       run the stages that need it, in dependency order; one run at a time per folder: a second\n"
    "            one exits 1 at once, naming the pid that holds PIPELINE_DIR/essence-run.lock. Stages\n"
    "            die with essence-run; after a kill, run again: what is complete is kept\n"
    "  --executor local|slurm   where stages run (slurm: sbatch, job arrays over shards)\n"
    "  --set STAGE.KEY=VALUE    override a parameter for this invocation (repeatable)\n"
    "  --force STAGE            run STAGE even when it is up to date (repeatable)\n"
    "  --dry-run                print what run would do\n"
    "  --wait                   (slurm) wait for the jobs and report failures\n"
    "Stage programs: essence-extract, essence-project, essence-align, essence-eval, from essence-run's folder.\n"
    "See docs/run.md for the pipeline file.\n";

/* The sbatch templates: pipelines/slurm beside the build folder, or PREFIX/share/essence/slurm. */
static void templates_folder(char *out, size_t size) {
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = '\0';
    char *slash = strrchr(self, '/');
    if (slash) *slash = '\0';
    snprintf(out, size, "%s/../pipelines/slurm", self);
    if (access(out, R_OK) == 0) return;
    snprintf(out, size, "%s/../share/essence/slurm", self);
}

int main(int argc, char **argv) {
    es_set_program("essence-run");
    es_error err = {0};
    const char *pipeline = NULL, *command = "status", *executor = "local";
    char **sets = calloc((size_t)argc, sizeof *sets), **force = calloc((size_t)argc, sizeof *force);
    int n_sets = 0, n_force = 0, dry_run = 0, wait = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            return 0;
        } else if (!strcmp(a, "--set") || !strcmp(a, "--force") || !strcmp(a, "--executor")) {
            if (i + 1 >= argc) {
                es_fail(&err, ES_ERR_USAGE, "%s needs a value\n%s", a, usage);
                es_exit_error(&err);
            }
            if (!strcmp(a, "--set")) sets[n_sets++] = argv[++i];
            else if (!strcmp(a, "--force")) force[n_force++] = argv[++i];
            else executor = argv[++i];
        } else if (!strcmp(a, "--dry-run")) {
            dry_run = 1;
        } else if (!strcmp(a, "--wait")) {
            wait = 1;
        } else if (a[0] == '-') {
            es_fail(&err, ES_ERR_USAGE, "unknown option %s\n%s", a, usage);
            es_exit_error(&err);
        } else if (!pipeline) {
            pipeline = a;
        } else if (!strcmp(a, "status") || !strcmp(a, "run")) {
            command = a;
        } else {
            es_fail(&err, ES_ERR_USAGE, "unexpected argument \"%s\"\n%s", a, usage);
            es_exit_error(&err);
        }
    }
    if (!pipeline) {
        es_fail(&err, ES_ERR_USAGE, "no pipeline file\n%s", usage);
        es_exit_error(&err);
    }
    if (strcmp(executor, "local") && strcmp(executor, "slurm")) {
        es_fail(&err, ES_ERR_USAGE, "--executor %s: expected local or slurm", executor);
        es_exit_error(&err);
    }

    // 1. The plan, checked; a `run` takes the folder's lock (or refuses: another one runs); every
    //    stage fingerprinted and compared with its outputs.
    run_plan plan;
    run_lock *lock = NULL;
    run_mutex *mutex = NULL;
    int writes = !strcmp(command, "run") && !dry_run;
    if (run_plan_load(&plan, pipeline, sets, n_sets, &err) || (writes && run_mutex_acquire(&mutex, &plan, &err))) es_exit_error(&err);
    if (writes) run_lock_remove_temporaries(&plan);
    if (run_lock_open(&lock, &plan, &err)) es_exit_error(&err);
    for (int f = 0; f < n_force; f++) {
        int known = 0;
        for (int s = 0; s < plan.n_stages; s++) known |= !strcmp(plan.stages[s].name, force[f]);
        if (!known) {
            es_fail(&err, ES_ERR_USAGE, "--force %s: %s has no such stage", force[f], pipeline);
            es_exit_error(&err);
        }
    }
    int rc = run_plan_status(&plan, lock, force, n_force, &err);

    // 2. The status, or the run.
    if (!rc && !strcmp(command, "status")) {
        for (int s = 0; s < plan.n_stages; s++)
            if (plan.stages[s].will_run) printf("%s will-run: %s\n", plan.stages[s].name, plan.stages[s].reason);
            else printf("%s up-to-date\n", plan.stages[s].name);
    } else if (!rc) {
        int nothing = 1;
        for (int s = 0; s < plan.n_stages; s++) nothing &= !plan.stages[s].will_run;
        if (nothing) {
            printf("every stage is up to date\n");
        } else if (!strcmp(executor, "local")) {
            rc = run_local_execute(&plan, lock, mutex, dry_run, &err);
        } else {
            char templates[PATH_MAX + 64];
            templates_folder(templates, sizeof templates);
            rc = run_slurm_execute(&plan, templates, wait, dry_run, &err);
            /* Finished jobs left their outputs: what is complete now goes into the lock. */
            if (!rc && wait && !dry_run) rc = run_plan_status(&plan, lock, NULL, 0, &err);
        }
    }
    if (!rc && writes) {
        rc = run_lock_save(lock, &err);
    } else if (!rc) {
        /* status and --dry-run are read-only: they save the hashes they made (so that the next
         * one need not read those files again) only when no run holds the folder, and a save
         * that fails is a warning, not a failed status. */
        run_mutex *brief = NULL;
        es_error ignored = {0};
        if (run_lock_changed(lock) && run_mutex_try(&brief, plan.dir) && run_lock_save(lock, &ignored))
            fprintf(stderr, "essence-run: warning: %s (the hash cache is not updated)\n", ignored.msg);
        run_mutex_release(brief);
    }
    run_mutex_release(mutex);
    run_lock_free(lock);
    run_plan_free(&plan);
    free(sets), free(force);
    if (rc) es_exit_error(&err);
    return 0;
}
