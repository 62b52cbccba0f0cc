/* essence-run's Slurm executor (pipelines/run_slurm.c) on hand-made plans, against a fake
 * sbatch/squeue/scancel that run the generated scripts at once: the #SBATCH lines of a job array
 * and of a plain job, the dry run, values that must not reach an #SBATCH line, arguments that
 * must reach the program byte for byte through the shell, dependencies, a failed shard and the
 * stage after it, and sbatch refusing a job. tests/slurm/ runs the same code on a real Slurm. */
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../pipelines/run.h"
#include "../testlib.h"

#define FP_EXTRACT "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define FP_PROJECT "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

/* An argument the shell must pass on untouched. */
static const char hostile[] = "it's $(touch PWNED) `touch PWNED2` \"q\" ${HOME} * ?\n#SBATCH --x; rm -rf /";

/* The program the fake jobs run: records its argv (NUL-separated) beside --out, fails when
 * OUT.fail exists, else writes OUT/fingerprint as essence's stages do for a folder output. */
static const char fake_program[] =
    "#!/bin/bash\n"
    "args=(\"$@\") out= fp=\n"
    "for ((i = 0; i < $#; i++)); do\n"
    "  case ${args[i]} in --out) out=${args[i+1]} ;; --fingerprint) fp=${args[i+1]} ;; esac\n"
    "done\n"
    "printf '%s\\0' \"$0\" \"$@\" > \"$out.argv\"\n"
    "[ -e \"$out.fail\" ] && { echo \"fake: told to fail\" >&2; exit 1; }\n"
    "mkdir -p \"$out\" && printf '%s\\n' \"$fp\" > \"$out/fingerprint\"\n";

/* sbatch --parsable FILE: a new id; runs every array task now (state CD or F in the queue file)
 * unless a job it depends on failed, then it stays pending with DependencyNeverSatisfied. */
static const char fake_sbatch[] =
    "#!/bin/bash\n"
    "[ \"$1\" = --parsable ] && [ $# = 2 ] || { echo \"fake sbatch: bad arguments: $*\" >&2; exit 2; }\n"
    "st=$FAKE_SLURM file=$2\n"
    "name=$(sed -n 's/^#SBATCH --job-name=//p' \"$file\")\n"
    "if grep -qx \"$name\" \"$st/reject\" 2>/dev/null; then echo 'sbatch: error: Invalid account or account/partition combination specified' >&2; exit 1; fi\n"
    "id=$(( $(cat \"$st/next\" 2>/dev/null || echo 100) + 1 )); echo $id > \"$st/next\"\n"
    "cp \"$file\" \"$st/job-$id.sbatch\"\n"
    "array=$(sed -n 's/^#SBATCH --array=//p' \"$file\")\n"
    "dep=$(sed -n 's/^#SBATCH --dependency=afterok://p' \"$file\")\n"
    "for d in ${dep//:/ }; do\n"
    "  if grep -q \"^$d|[^|]*|F|\" \"$st/queue\" 2>/dev/null; then echo \"$id|N/A|PD|DependencyNeverSatisfied\" >> \"$st/queue\"; echo $id; exit 0; fi\n"
    "done\n"
    "for t in ${array//,/ }; do\n"
    "  if SLURM_ARRAY_TASK_ID=$t bash \"$file\" > \"$st/job-${id}_$t.log\" 2>&1; then s=CD; else s=F; fi\n"
    "  echo \"$id|$t|$s|None\" >> \"$st/queue\"\n"
    "done\n"
    "if [ -z \"$array\" ]; then\n"
    "  if bash \"$file\" > \"$st/job-$id.log\" 2>&1; then s=CD; else s=F; fi\n"
    "  echo \"$id|N/A|$s|None\" >> \"$st/queue\"\n"
    "fi\n"
    "echo \"$id;cluster\"\n";

/* squeue -h -t all -j IDS -o FORMAT: the queue file's lines for IDS; with FAKE_SLURM/forget,
 * Slurm has forgotten every job. */
static const char fake_squeue[] =
    "#!/bin/bash\n"
    "[ \"$1 $2 $3 $4 $6\" = '-h -t all -j -o' ] || { echo \"fake squeue: bad arguments: $*\" >&2; exit 2; }\n"
    "[ -e \"$FAKE_SLURM/forget\" ] && { echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1; }\n"
    "for id in ${5//,/ }; do grep \"^$id|\" \"$FAKE_SLURM/queue\"; done\n"
    "exit 0\n";

static const char fake_scancel[] =
    "#!/bin/bash\n"
    "echo \"$1\" >> \"$FAKE_SLURM/cancelled\"\n"
    "sed -i \"s/^$1|\\([^|]*\\)|PD|/$1|\\1|CA|/\" \"$FAKE_SLURM/queue\"\n";

static char root[1024], dir[512], bin[512], state[512], templates[4200], cwd[512];

static int write_text(const char *path, const char *text, int mode) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    int ok = fputs(text, f) >= 0;
    ok &= fclose(f) == 0;
    return ok && chmod(path, (mode_t)mode) == 0 ? 0 : -1;
}

static char *read_text(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *text = malloc(cap + 1);
    size_t got;
    while (text && (got = fread(text + n, 1, cap - n, f)) > 0)
        if ((n += got) == cap) text = realloc(text, (cap *= 2) + 1);
    fclose(f);
    if (text) text[n] = '\0';
    if (len) *len = n;
    return text;
}

static int exists(const char *path) { return access(path, F_OK) == 0; }

/* Empties the fake Slurm's state and the pipeline folder's outputs. */
static void reset(void) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s/work' '%s/slurm-logs' '%s/slurm-scripts' && mkdir -p '%s' '%s/work'", state, dir, dir, dir, state, dir);
    if (system(cmd) != 0) printf("  reset failed: %s\n", cmd);
}

static run_arg arg(const char *flag, const char *value) {
    run_arg a = {0};
    a.flag = strdup(flag), a.value = value ? strdup(value) : NULL, a.ref_stage = -1;
    return a;
}

/* extract: 4 shards (those in `todo` to run), writing folders work/teacher-0000I-of-00004;
 * project: reads them, writes work/student, and runs when `project_runs`. */
static void make_plan(run_plan *plan, const int *todo, int n_todo, int project_runs) {
    memset(plan, 0, sizeof *plan);
    plan->pipeline_path = malloc(strlen(dir) + 32), sprintf(plan->pipeline_path, "%s/pipeline.yaml", dir);
    plan->dir = strdup(dir);
    plan->n_stages = 2;
    plan->stages = calloc(2, sizeof *plan->stages);
    char path[2048], program[2048];
    snprintf(program, sizeof program, "%s/fake-stage", bin);

    run_stage *e = &plan->stages[0];
    e->name = strdup("extract"), e->program = strdup(program), e->shards = 4;
    e->args = calloc(3, sizeof *e->args), e->n_args = 3;
    e->args[0] = arg("note", hostile);
    e->args[1] = arg("empty", "");
    e->args[2] = arg("flag", NULL);
    snprintf(path, sizeof path, "%s/work/teacher", dir);
    e->outputs = calloc(1, sizeof *e->outputs), e->n_outputs = 1, e->outputs[0] = arg("out", path);
    strcpy(e->fingerprint, FP_EXTRACT);
    e->will_run = n_todo > 0, e->reason = strdup("");
    e->shards_to_run = malloc(4 * sizeof(int)), e->n_shards_to_run = n_todo;
    memcpy(e->shards_to_run, todo, (size_t)n_todo * sizeof(int));
    strcpy(e->slurm.partition, "gpu"), strcpy(e->slurm.account, "proj-1"), strcpy(e->slurm.time, "04:00:00"), strcpy(e->slurm.mem, "120G");
    e->slurm.gpus = 1, e->slurm.cpus = 4;

    run_stage *p = &plan->stages[1];
    p->name = strdup("project"), p->program = strdup(program), p->shards = 1;
    snprintf(path, sizeof path, "%s/work/teacher-00000-of-00004,%s/work/teacher-00001-of-00004", dir, dir);
    p->args = calloc(1, sizeof *p->args), p->n_args = 1, p->args[0] = arg("in", path);
    snprintf(path, sizeof path, "%s/work/student", dir);
    p->outputs = calloc(1, sizeof *p->outputs), p->n_outputs = 1, p->outputs[0] = arg("out", path);
    strcpy(p->fingerprint, FP_PROJECT);
    p->will_run = project_runs, p->reason = strdup("");
    p->shards_to_run = calloc(1, sizeof(int)), p->n_shards_to_run = 1;
    p->deps = malloc(sizeof(int)), p->deps[0] = 0, p->n_deps = 1;
    strcpy(p->slurm.time, "1-00:00:00");
}

/* run_slurm_execute with its stdout caught in *out (malloc'd). */
static int execute(const run_plan *plan, const char *tpl, int wait, int dry_run, es_error *err, char **out) {
    char *path = test_path("stdout.txt");
    fflush(stdout);
    int saved = dup(1), fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (saved < 0 || fd < 0) return -100;
    dup2(fd, 1), close(fd);
    es_error_clear(err);
    int rc = run_slurm_execute(plan, tpl, wait, dry_run, err);
    fflush(stdout);
    dup2(saved, 1), close(saved);
    *out = read_text(path, NULL);
    if (!*out) *out = strdup("");
    return rc;
}

static char *job_script(int id) {
    char path[2048];
    snprintf(path, sizeof path, "%s/job-%d.sbatch", state, id);
    return read_text(path, NULL);
}

TEST(dry_run_prints_the_scripts) {
    reset();
    run_plan plan;
    int todo[] = {1, 3};
    make_plan(&plan, todo, 2, 1);
    es_error err;
    char *out = NULL, want[2048];
    int rc = execute(&plan, templates, 0, 1, &err, &out);
    CHECKF(rc == ES_OK, "%s", err.msg);
    const char *lines[] = {"#!/bin/bash\n#SBATCH --job-name=essence-extract\n", "#SBATCH --partition=gpu\n", "#SBATCH --account=proj-1\n",
                           "#SBATCH --time=04:00:00\n", "#SBATCH --gres=gpu:1\n", "#SBATCH --cpus-per-task=4\n", "#SBATCH --mem=120G\n",
                           "#SBATCH --array=1,3\n", "#SBATCH --job-name=essence-project\n", "#SBATCH --time=1-00:00:00\n",
                           "#SBATCH --dependency=afterok:<job of extract>\n", "case \"${SLURM_ARRAY_TASK_ID-}\" in\n1)\n    exec '",
                           "'--shard' '1/4' '--fingerprint' '" FP_EXTRACT "'\n    ;;\n3)\n", "'--empty' '' '--flag' '--out'"};
    for (size_t i = 0; i < sizeof lines / sizeof *lines; i++) CHECKF(strstr(out, lines[i]), "no \"%s\" in:\n%s", lines[i], out);
    snprintf(want, sizeof want, "#SBATCH --output=%s/slurm-logs/extract-%%A_%%a.out\n", dir);
    CHECKF(strstr(out, want), "no %s", want);
    snprintf(want, sizeof want, "#SBATCH --chdir=%s\n#SBATCH --output=%s/slurm-logs/project-%%j.out\n", dir, dir);
    CHECKF(strstr(out, want), "no %s", want);
    CHECK(!strstr(out, "--shard' '0/4'") && !strstr(out, "--shard' '2/4'")); /* only the shards to run */
    CHECK(!strstr(out, "##") && !strstr(out, "@COMMAND@") && !strstr(out, "@SBATCH_LINES@"));
    CHECK(!strstr(out, "srun")); /* not essence-align */
    snprintf(want, sizeof want, "%s/slurm-scripts", dir);
    CHECK(!exists(want)); /* a dry run writes nothing */
    free(out);
    run_plan_free(&plan);
}

TEST(values_that_cannot_reach_sbatch) {
    /* Shell syntax, sbatch options, white space and leading dashes, for every key. */
    struct { const char *key, *value; } bad[] = {
        {"partition", "gpu;rm -rf /"},  {"partition", "gpu x"},          {"partition", "$(touch /tmp/pwned)"},
        {"partition", "`touch pwned`"}, {"partition", "gpu\n#SBATCH -x"}, {"partition", "'gpu'"},
        {"partition", "\"gpu\""},       {"partition", "--"},             {"partition", "-p"},
        {"partition", "--x=y"},         {"partition", "gpu,"},           {"partition", ",gpu"},
        {"partition", "gpu,,cpu"},      {"partition", "gpu,-x"},         {"partition", "%x"},
        {"account", "a'b"},             {"account", "$(id)"},            {"account", "`id`"},
        {"account", "a;b"},             {"account", "--"},               {"account", "-a"},
        {"account", "a b"},             {"account", "a\nb"},             {"account", "a,b"},
        {"time", "4h"},                 {"time", "04:00 --x"},           {"time", "$(id)"},
        {"time", "--"},                 {"time", "-1"},                  {"time", "1-"},
        {"time", "1:2:3:4"},            {"time", "1-2-3"},               {"time", ":30"},
        {"time", "30:"},                {"time", "1;2"},                 {"time", "1\n2"},
        {"mem", "12G\n#SBATCH --x"},     {"mem", "lots"},                 {"mem", "-1G"},
        {"mem", "--"},                  {"mem", "1GB"},                  {"mem", "$(id)"},
        {"mem", "1G;id"},               {"mem", "G"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        run_plan plan;
        int todo[] = {0};
        make_plan(&plan, todo, 1, 1);
        run_slurm *s = &plan.stages[1].slurm;
        char *field = !strcmp(bad[i].key, "partition") ? s->partition : !strcmp(bad[i].key, "account") ? s->account
                      : !strcmp(bad[i].key, "time")    ? s->time
                                                       : s->mem;
        snprintf(field, 32, "%s", bad[i].value);
        es_error err;
        char *out = NULL, key[64];
        int rc = execute(&plan, templates, 0, 1, &err, &out);
        snprintf(key, sizeof key, "slurm.%s", bad[i].key);
        CHECKF(rc == ES_ERR_USAGE && strstr(err.msg, "stage project") && strstr(err.msg, key) && strstr(err.msg, "pipeline.yaml"),
               "%s=%s: rc %d, %s", bad[i].key, bad[i].value, rc, err.msg);
        CHECKF(!*out, "printed %s", out);
        free(out);
        run_plan_free(&plan);
    }
    /* Several nodes: essence-align only. */
    run_plan plan;
    int todo[] = {0};
    make_plan(&plan, todo, 1, 1);
    plan.stages[0].slurm.nodes = 2;
    es_error err;
    char *out = NULL;
    CHECKF(execute(&plan, templates, 0, 1, &err, &out) == ES_ERR_USAGE && strstr(err.msg, "slurm.nodes"), "%s", err.msg);
    free(out);
    /* A folder an #SBATCH --output line cannot carry. */
    plan.stages[0].slurm.nodes = 0;
    free(plan.dir);
    plan.dir = strdup("/tmp/my pipelines");
    CHECKF(execute(&plan, templates, 0, 1, &err, &out) == ES_ERR_USAGE && strstr(err.msg, "my pipelines"), "%s", err.msg);
    free(out);
    run_plan_free(&plan);
}

TEST(values_sbatch_takes) {
    /* Every form of the syntax reaches its #SBATCH line as written. */
    struct { const char *key, *value; } good[] = {
        {"partition", "gpu"},  {"partition", "gpu,debug"}, {"partition", "a100.x:1+2_b-c"}, {"account", "proj-1"},
        {"account", "Ab.9"},   {"time", "30"},             {"time", "30:00"},               {"time", "04:00:00"},
        {"time", "1-12"},      {"time", "1-12:30"},        {"time", "1-00:00:00"},          {"mem", "512"},
        {"mem", "120G"},       {"mem", "4096m"},
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        run_plan plan;
        int todo[] = {0};
        make_plan(&plan, todo, 1, 1);
        run_slurm *s = &plan.stages[1].slurm;
        char *field = !strcmp(good[i].key, "partition") ? s->partition : !strcmp(good[i].key, "account") ? s->account
                      : !strcmp(good[i].key, "time")    ? s->time
                                                        : s->mem;
        snprintf(field, 32, "%s", good[i].value);
        es_error err;
        char *out = NULL, line[128];
        int rc = execute(&plan, templates, 0, 1, &err, &out);
        snprintf(line, sizeof line, "#SBATCH --%s=%s\n", good[i].key, good[i].value);
        CHECKF(rc == ES_OK && strstr(out, line), "%s=%s: rc %d, %s", good[i].key, good[i].value, rc, err.msg);
        CHECKF(run_slurm_value_problem(good[i].key, good[i].value) == NULL, "%s=%s refused", good[i].key, good[i].value);
        free(out);
        run_plan_free(&plan);
    }
}

TEST(align_on_several_gpus_under_srun) {
    run_plan plan;
    int todo[] = {0};
    make_plan(&plan, todo, 0, 1);
    run_stage *p = &plan.stages[1];
    free(p->program);
    p->program = strdup("/opt/essence/bin/essence-align");
    p->slurm.gpus = 4, p->slurm.nodes = 2, p->slurm.cpus = 8;
    es_error err;
    char *out = NULL;
    CHECKF(execute(&plan, templates, 0, 1, &err, &out) == ES_OK, "%s", err.msg);
    CHECKF(strstr(out, "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=4\n#SBATCH --gres=gpu:4\n#SBATCH --cpus-per-task=8\n"), "%s", out);
    CHECKF(strstr(out, "\nexec srun --ntasks-per-node=4 '/opt/essence/bin/essence-align' '--in' '"), "%s", out);
    CHECK(!strstr(out, "--dependency")); /* extract is done */
    free(out);
    run_plan_free(&plan);
}

/* The argv the fake program recorded for `out` equals run_stage_argv's. */
static int same_argv(const run_stage *stage, int shard, const char *out_path) {
    char path[2048];
    snprintf(path, sizeof path, "%s.argv", out_path);
    size_t len = 0;
    char *got = read_text(path, &len), **argv = run_stage_argv(stage, shard);
    size_t at = 0;
    int same = got && argv;
    for (int i = 0; same && argv[i]; i++) {
        size_t n = strlen(argv[i]) + 1;
        same = at + n <= len && !memcmp(got + at, argv[i], n);
        at += n;
    }
    same &= at == len;
    free(got), run_free_argv(argv);
    return same;
}

TEST(submits_runs_and_waits) {
    reset();
    run_plan plan;
    int todo[] = {0, 1, 2, 3};
    make_plan(&plan, todo, 4, 1);
    es_error err;
    char *out = NULL, path[2048];
    int rc = execute(&plan, templates, 1, 0, &err, &out);
    CHECKF(rc == ES_OK, "%s\n%s", err.msg, out);
    CHECKF(strstr(out, "extract submitted as job 101\nproject submitted as job 102\n"), "%s", out);
    CHECKF(strstr(out, "extract done (job 101)") && strstr(out, "project done (job 102)"), "%s", out);
    char *script = job_script(102);
    CHECKF(script && strstr(script, "#SBATCH --dependency=afterok:101\n"), "%s", script ? script : "no job 102");
    free(script);
    snprintf(path, sizeof path, "%s/slurm-scripts/extract.sbatch", dir);
    CHECK(exists(path));
    snprintf(path, sizeof path, "%s/slurm-logs", dir);
    CHECK(exists(path));
    for (int shard = 0; shard < 4; shard++) {
        char *shard_path = run_shard_path(plan.stages[0].outputs[0].value, shard, 4);
        CHECKF(same_argv(&plan.stages[0], shard, shard_path), "shard %d: the program got other arguments", shard);
        free(shard_path);
    }
    CHECK(same_argv(&plan.stages[1], -1, plan.stages[1].outputs[0].value));
    CHECK(!exists("PWNED") && !exists("PWNED2")); /* in cwd, where the jobs ran */
    free(out);
    run_plan_free(&plan);

    /* Slurm has forgotten the jobs by the time we ask: the outputs decide. */
    reset();
    snprintf(path, sizeof path, "%s/forget", state);
    REQUIRE(write_text(path, "", 0644) == 0);
    int one[] = {2};
    make_plan(&plan, one, 1, 0);
    rc = execute(&plan, templates, 1, 0, &err, &out);
    CHECKF(rc == ES_OK && strstr(out, "extract done (job 101)"), "%s\n%s", err.msg, out);
    free(out);
    run_plan_free(&plan);
}

/* Paths and parameters with shell syntax in them reach the program byte for byte through the
 * generated script and the shell running it, and run nothing: not in the jobs' folder (PWNED),
 * not in /tmp. */
TEST(hostile_paths_and_params_reach_the_program_literally) {
    reset();
    char marker[256], hostile_name[1024], path[4096], input[4096];
    snprintf(marker, sizeof marker, "/tmp/essence-pwned-%d", (int)getpid());
    snprintf(hostile_name, sizeof hostile_name, "t $(touch %s) `touch PWNED3`; rm -rf NOPE 'q' \"dq\" \\ $HOME\n#SBATCH --x -- -x", marker);
    run_plan plan;
    int todo[] = {0, 1, 2, 3};
    make_plan(&plan, todo, 4, 1);
    run_stage *e = &plan.stages[0], *p = &plan.stages[1];
    free(e->outputs[0].value);
    snprintf(path, sizeof path, "%s/work/%s.h5", dir, hostile_name);
    e->outputs[0].value = strdup(path);
    free(e->args[1].value);
    e->args[1].value = strdup("--"); /* a value that looks like an option */
    free(e->args[2].value);
    e->args[2].value = strdup("-x");
    free(p->args[0].value);
    snprintf(input, sizeof input, "%s/work/in `touch PWNED4` $(touch %s).h5", dir, marker);
    p->args[0].value = strdup(input);
    free(p->outputs[0].value);
    snprintf(path, sizeof path, "%s/work/student; touch PWNED5 #", dir);
    p->outputs[0].value = strdup(path);
    es_error err;
    char *out = NULL;
    int rc = execute(&plan, templates, 1, 0, &err, &out);
    CHECKF(rc == ES_OK, "%s\n%s", err.msg, out);
    for (int shard = 0; shard < 4; shard++) {
        char *shard_path = run_shard_path(e->outputs[0].value, shard, 4);
        CHECKF(same_argv(e, shard, shard_path), "shard %d: the program got other arguments", shard);
        free(shard_path);
    }
    CHECK(same_argv(p, -1, p->outputs[0].value));
    const char *pwned[] = {"PWNED", "PWNED2", "PWNED3", "PWNED4", "PWNED5"};
    for (size_t i = 0; i < sizeof pwned / sizeof *pwned; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, pwned[i]);
        CHECKF(!exists(pwned[i]) && !exists(path), "%s was made", pwned[i]);
    }
    CHECKF(!exists(marker), "%s was made", marker);
    unlink(marker);
    free(out);
    run_plan_free(&plan);
    /* A stage name is not a place for them either (the loader refuses them first). */
    make_plan(&plan, todo, 4, 1);
    free(plan.stages[1].name);
    plan.stages[1].name = strdup("p;touch PWNED");
    CHECKF(execute(&plan, templates, 0, 1, &err, &out) == ES_ERR_USAGE && strstr(err.msg, "p;touch PWNED"), "%s", err.msg);
    free(out);
    run_plan_free(&plan);
}

TEST(failed_shard_then_rerun_alone) {
    reset();
    char path[2048];
    snprintf(path, sizeof path, "%s/work/teacher-00002-of-00004.fail", dir);
    REQUIRE(write_text(path, "", 0644) == 0);
    run_plan plan;
    int todo[] = {0, 1, 2, 3};
    make_plan(&plan, todo, 4, 1);
    es_error err;
    char *out = NULL, want[2048];
    int rc = execute(&plan, templates, 1, 0, &err, &out);
    CHECKF(rc == ES_ERR_RUNTIME && strstr(err.msg, "stage extract failed (job 101), and 1 other stage failed or did not run"), "rc %d: %s", rc, err.msg);
    snprintf(want, sizeof want, "extract shard 2 failed (squeue state F): see %s/slurm-logs/extract-101_2.out\n", dir);
    CHECKF(strstr(out, want), "no \"%s\" in\n%s", want, out);
    CHECK(!strstr(out, "shard 0 failed") && !strstr(out, "shard 1 failed") && !strstr(out, "shard 3 failed"));
    CHECKF(strstr(out, "project not run: a stage it reads from failed (job 102 cancelled)"), "%s", out);
    snprintf(path, sizeof path, "%s/cancelled", state);
    char *cancelled = read_text(path, NULL);
    CHECKF(cancelled && !strcmp(cancelled, "102\n"), "%s", cancelled ? cancelled : "scancel not run");
    free(cancelled), free(out);
    run_plan_free(&plan);

    /* The next run: shard 2 alone, project after it. */
    snprintf(path, sizeof path, "%s/work/teacher-00002-of-00004.fail", dir);
    unlink(path);
    int two[] = {2};
    make_plan(&plan, two, 1, 1);
    rc = execute(&plan, templates, 1, 0, &err, &out);
    CHECKF(rc == ES_OK && strstr(out, "extract submitted as job 103") && strstr(out, "project done (job 104)"), "%s\n%s", err.msg, out);
    char *script = job_script(103);
    CHECKF(script && strstr(script, "#SBATCH --array=2\n") && !strstr(script, "'0/4'"), "%s", script ? script : "no job 103");
    free(script);
    script = job_script(104);
    CHECKF(script && strstr(script, "#SBATCH --dependency=afterok:103\n"), "%s", script ? script : "no job 104");
    free(script), free(out);
    run_plan_free(&plan);
}

TEST(sbatch_refuses) {
    reset();
    char path[2048];
    snprintf(path, sizeof path, "%s/reject", state);
    REQUIRE(write_text(path, "essence-project\n", 0644) == 0);
    run_plan plan;
    int todo[] = {0};
    make_plan(&plan, todo, 1, 1);
    es_error err;
    char *out = NULL;
    int rc = execute(&plan, templates, 1, 0, &err, &out);
    CHECKF(rc == ES_ERR_RUNTIME && strstr(err.msg, "stage project: sbatch ") && strstr(err.msg, "slurm-scripts/project.sbatch") &&
               strstr(err.msg, "Invalid account") && strstr(err.msg, "already submitted: 101"),
           "rc %d: %s", rc, err.msg);
    free(out);
    run_plan_free(&plan);
}

TEST(template_errors) {
    run_plan plan;
    int todo[] = {0};
    make_plan(&plan, todo, 1, 1);
    es_error err;
    char *out = NULL, path[2048], folder[1024];
    snprintf(folder, sizeof folder, "%s/templates", test_tmpdir());
    mkdir(folder, 0755);
    CHECKF(execute(&plan, folder, 0, 1, &err, &out) == ES_ERR_RUNTIME && strstr(err.msg, "templates/stage.sbatch"), "%s", err.msg);
    free(out);
    snprintf(path, sizeof path, "%s/stage.sbatch", folder);
    REQUIRE(write_text(path, "#!/bin/bash\n@SBATCH_LINES@\nrun-something\n", 0644) == 0);
    CHECKF(execute(&plan, folder, 0, 1, &err, &out) == ES_ERR_DATA && strstr(err.msg, "@COMMAND@") && strstr(err.msg, path), "%s", err.msg);
    free(out);
    run_plan_free(&plan);
}

int main(void) {
    const char *env_root = getenv("ESSENCE_ROOT");
    snprintf(root, sizeof root, "%s", env_root && *env_root ? env_root : ".");
    snprintf(templates, sizeof templates, "%s/pipelines/slurm", root);
    snprintf(dir, sizeof dir, "%s/pipe", test_tmpdir());
    snprintf(bin, sizeof bin, "%s/bin", test_tmpdir());
    snprintf(state, sizeof state, "%s/fake-slurm", test_tmpdir());
    mkdir(dir, 0755), mkdir(bin, 0755);
    char path[2048], *old = getenv("PATH"), *new_path;
    const char *names[] = {"fake-stage", "sbatch", "squeue", "scancel"}, *texts[] = {fake_program, fake_sbatch, fake_squeue, fake_scancel};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", bin, names[i]);
        if (write_text(path, texts[i], 0755)) return printf("FAIL setup: cannot write %s: %s\n", path, strerror(errno)), 1;
    }
    if (asprintf(&new_path, "%s:%s", bin, old ? old : "/usr/bin:/bin") < 0) return 1;
    setenv("PATH", new_path, 1), setenv("FAKE_SLURM", state, 1);
    free(new_path);
    /* The fake jobs run in a folder of their own: whatever a broken quoting would create lands
     * there (PWNED). */
    char resolved[4096];
    if (!realpath(templates, resolved)) return printf("FAIL setup: %s: %s\n", templates, strerror(errno)), 1;
    snprintf(templates, sizeof templates, "%s", resolved);
    snprintf(cwd, sizeof cwd, "%s/cwd", test_tmpdir());
    if (mkdir(cwd, 0755) || chdir(cwd)) return printf("FAIL setup: %s: %s\n", cwd, strerror(errno)), 1;
    RUN(dry_run_prints_the_scripts);
    RUN(values_that_cannot_reach_sbatch);
    RUN(values_sbatch_takes);
    RUN(align_on_several_gpus_under_srun);
    RUN(submits_runs_and_waits);
    RUN(hostile_paths_and_params_reach_the_program_literally);
    RUN(failed_shard_then_rerun_alone);
    RUN(sbatch_refuses);
    RUN(template_errors);
    return test_summary();
}
