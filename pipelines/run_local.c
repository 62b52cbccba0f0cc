/* The local executor: every stage that will run, in plan order, shard after shard, as a child
 * process (no shell); a stage is recorded in essence.lock once its outputs carry its fingerprint. */
#include <errno.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "files.h"
#include "run.h"

extern char **environ;


int run_local_execute(run_plan *plan, run_lock *lock, int dry_run, es_error *err) {
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
            pid_t pid;
            int status = 0, spawned = posix_spawn(&pid, argv[0], NULL, NULL, argv, environ);
            run_free_argv(argv);
            if (spawned) return es_fail(err, ES_ERR_RUNTIME, "stage %s: cannot start %s: %s", stage->name, stage->program, strerror(spawned));
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
            }
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
