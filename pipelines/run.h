/* essence-run (docs/run.md): a pipeline file becomes a plan, a list of stages in dependency order
 * with their command lines and fingerprints, and an executor carries the plan out (run_local.c
 * here and now; run_slurm.c through sbatch). The truth of "done" is in the outputs: a complete
 * output storing the stage's fingerprint (HDF5 root attribute `fingerprint`, or the file
 * OUT/fingerprint of a folder output). essence.lock records what ran and caches file hashes. */
#ifndef ES_PIPELINES_RUN_H
#define ES_PIPELINES_RUN_H

#include "error.h"
#include "fingerprint.h"

typedef struct run_slurm {
    char partition[64], account[64], time[32], mem[32]; /* "" when not set */
    int gpus, cpus, nodes;                              /* 0 when not set */
} run_slurm;

typedef enum { RUN_PARAM, RUN_INPUT, RUN_OUTPUT } run_arg_kind;

typedef struct run_arg {
    char *flag;   /* without "--" */
    char *value;  /* absolute paths for inputs and outputs; NULL: a bare flag (a true boolean) */
    run_arg_kind kind;
    int line;     /* in the pipeline file */
    int ref_stage;     /* an input another stage writes: that stage's index in plan order, else -1 */
    char *ref_output;  /* and which of its outputs (its flag) */
    char *text;        /* the value as written (outputs: the path relative to the pipeline) */
} run_arg;

typedef struct run_stage {
    char *name;
    int line;                  /* where the stage starts in the pipeline file */
    char *program;             /* absolute path of the program */
    int shards;                /* 1: not sharded */
    run_arg *args;             /* params and inputs, in file order */
    int n_args;
    run_arg *outputs;          /* declared outputs (absolute; a sharded stage's unsharded name) */
    int n_outputs;
    char fingerprint[ES_FINGERPRINT_HEX];
    int will_run;              /* after planning */
    char *reason;              /* why it will run ("" when up to date) */
    int *shards_to_run;        /* the shard indices that will run (all of them unless some are done) */
    int n_shards_to_run;
    int *deps;                 /* indices (in plan order) of the stages it reads from */
    int n_deps;
    run_slurm slurm;           /* the pipeline's slurm: block with the stage's overrides */
    void *params;              /* json_t object: the params as YAML typed them (for the fingerprint) */
} run_stage;

typedef struct run_plan {
    char *pipeline_path;       /* absolute */
    char *dir;                 /* its folder: relative paths start here */
    run_stage *stages;         /* in dependency order */
    int n_stages;
} run_plan;

/* Why `value` cannot be slurm.KEY (partition, account, time, mem), or NULL when it can: each
 * must match the syntax sbatch expects, which leaves nothing for a shell or for sbatch's own
 * option parser (no white space, quotes, $, `, ;, newline, leading '-'). */
const char *run_slurm_value_problem(const char *key, const char *value);

/* Reads and checks PIPELINE (docs/run.md): errors name FILE:LINE (ES_ERR_USAGE). `sets` are
 * --set STAGE.KEY=VALUE texts applied to the stages' params (or shards, or an input's path). */
int run_plan_load(run_plan *plan, const char *path, char *const *sets, int n_sets, es_error *err);
void run_plan_free(run_plan *plan);

/* essence.lock beside the pipeline: the record of what ran and a cache of file hashes. */
typedef struct run_lock run_lock;
int run_lock_open(run_lock **lock, const run_plan *plan, es_error *err);
void run_lock_free(run_lock *lock);
/* Records a stage whose outputs are complete with its fingerprint. */
int run_lock_record(run_lock *lock, const run_plan *plan, int stage, es_error *err);

/* Fingerprints every stage (inputs by content, through the lock's cache) and decides what will
 * run and why; `force` names stages to run anyway. Stages found complete are recorded. */
int run_plan_status(run_plan *plan, run_lock *lock, char *const *force, int n_force, es_error *err);
/* The fingerprint stored in an output (HDF5 root attribute, or OUT/fingerprint of a folder):
 * 1 and *fingerprint, 0 when missing or incomplete (*why says which), -1 on error. */
int run_output_fingerprint(const char *path, char fingerprint[ES_FINGERPRINT_HEX], const char **why);

/* Saves essence.lock when it changed: what this process hashed and recorded is laid over the
 * lock as it is on disk now, written to a unique temporary name, fsync'd and renamed into place.
 * The caller holds the folder's run_mutex. */
int run_lock_save(run_lock *lock, es_error *err);
/* Whether there is anything to save. */
int run_lock_changed(const run_lock *lock);
/* Removes the temporary files of saves that a killed essence-run left (caller holds the mutex). */
void run_lock_remove_temporaries(const run_plan *plan);

/* The folder's advisory lock (run_mutex.c): PIPELINE_DIR/essence-run.lock, an flock held by a
 * `run` and inherited by its stage. */
#define RUN_MUTEX_FILE "essence-run.lock"
typedef struct run_mutex run_mutex;
/* For `run`: takes the lock, retrying for about a second; else ES_ERR_RUNTIME naming the
 * pipeline and the pid that holds it (and its stage). */
int run_mutex_acquire(run_mutex **mutex, const run_plan *plan, es_error *err);
/* For `status`: 1 and the lock when it is free now, else 0 (never waits, never fails). */
int run_mutex_try(run_mutex **mutex, const char *dir);
/* The lock's file descriptor, for a stage to inherit (-1 without a mutex). */
int run_mutex_fd(const run_mutex *mutex);
/* Records in the lock file the stage now running and its pid (for a refusal's message). */
void run_mutex_note_stage(run_mutex *mutex, const char *stage, long pid);
void run_mutex_release(run_mutex *mutex);

/* The local executor: runs every stage that will run, shard after shard, and records it. Each
 * stage inherits `mutex`'s lock and dies with essence-run (PR_SET_PDEATHSIG). */
int run_local_execute(run_plan *plan, run_lock *lock, run_mutex *mutex, int dry_run, es_error *err);
/* argv as one line a shell would read back (every argument quoted where needed); malloc'd. */
char *run_quote_argv(char *const *argv);

/* PATH (relative to DIR) spelt one way per place: the existing folders above its last component
 * through realpath, the rest normalised lexically (".", "..", "//"). malloc'd. */
char *run_normalise_path(const char *dir, const char *path);

/* The path shard `shard` of `n` writes for a declared output: work/teacher.h5 ->
 * work/teacher-00000-of-00002.h5 (malloc'd). */
char *run_shard_path(const char *path, int shard, int n);

/* The command line of a stage (shard = -1 when not sharded): program, the args, the outputs
 * (shard paths for a sharded stage), --shard I/N, --fingerprint FP. A NULL-terminated argv,
 * every string malloc'd; free with run_free_argv. */
char **run_stage_argv(const run_stage *stage, int shard);
void run_free_argv(char **argv);

/* The Slurm executor: submits every stage that will run, in plan order, with sbatch (job arrays
 * over the shards to run, --dependency=afterok on the jobs of the stages it reads from); prints
 * the job ids. With `wait`, polls until every job has ended and returns ES_ERR_RUNTIME naming the
 * stages and shards that failed. With `dry_run`, prints the scripts instead of submitting.
 * `templates` is the folder of the sbatch templates (pipelines/slurm). */
int run_slurm_execute(const run_plan *plan, const char *templates, int wait, int dry_run, es_error *err);

#endif
