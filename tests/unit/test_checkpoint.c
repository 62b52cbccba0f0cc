/* essence-align's checkpoints: what a save writes (bf16 model, fp32 head and state, copied
 * config and tokenizer files, the top-level copy), loading the state back, retention, finding
 * the newest complete checkpoint, re-saving a step, and a failed save (a file size limit makes
 * writes fail with EFBIG) that must leave the previous checkpoint as it was. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../testlib.h"
#include "checkpoint.h"
#include "dtype.h"
#include "safetensors.h"

enum { ROWS = 64, COLS = 48, BIAS = 7, HEAD = 4 };

/* One model's worth of tensors; `seed` makes saves of different steps tell apart. */
typedef struct fixture {
    float weight[ROWS * COLS], bias[BIAS], head[HEAD * HEAD];
    float master[3][ROWS * COLS], m[3][ROWS * COLS], v[3][ROWS * COLS];
    checkpoint_tensor weights[2], heads[1], st_master[3], st_m[3], st_v[3];
    checkpoint_content content;
    char state_json[128];
} fixture;

static float value_at(uint64_t *state) {
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(((double)(*state >> 11) / 9007199254740992.0 - 0.5) * 4.0);
}

static void fill(float *out, size_t n, uint64_t *state) {
    for (size_t i = 0; i < n; i++) out[i] = value_at(state);
}

static void make_fixture(fixture *f, const char *model_dir, uint64_t seed, int64_t step) {
    uint64_t state = seed;
    fill(f->weight, ROWS * COLS, &state);
    fill(f->bias, BIAS, &state);
    fill(f->head, HEAD * HEAD, &state);
    f->weight[0] = 1.00390625f;      /* exactly half way between two bf16 values */
    f->weight[1] = -1.01171875f;     /* the same, negative */
    for (int k = 0; k < 3; k++) {
        fill(f->master[k], ROWS * COLS, &state);
        fill(f->m[k], ROWS * COLS, &state);
        fill(f->v[k], ROWS * COLS, &state);
    }
    f->weights[0] = (checkpoint_tensor){"model.layers.0.mlp.up_proj.weight", f->weight, 2, {ROWS, COLS}};
    f->weights[1] = (checkpoint_tensor){"model.norm.weight", f->bias, 1, {BIAS, 0}};
    f->heads[0] = (checkpoint_tensor){"head.0", f->head, 2, {HEAD, HEAD}};
    const char *names[3] = {"model.layers.0.mlp.up_proj.weight", "model.norm.weight", "head.0"};
    const int64_t numel[3] = {ROWS * COLS, BIAS, HEAD * HEAD};
    for (int k = 0; k < 3; k++) {
        checkpoint_tensor shape = {names[k], NULL, 1, {numel[k], 0}};
        f->st_master[k] = shape, f->st_master[k].data = f->master[k];
        f->st_m[k] = shape, f->st_m[k].data = f->m[k];
        f->st_v[k] = shape, f->st_v[k].data = f->v[k];
    }
    snprintf(f->state_json, sizeof f->state_json, "{\"step\": %lld, \"data_position\": [3, 17]}", (long long)step);
    f->content = (checkpoint_content){model_dir, f->weights, 2, f->heads, 1, f->st_master, f->st_m, f->st_v, 3,
                                      f->state_json};
}

static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int bad = fputs(text, f) < 0;
    return (fclose(f) != 0 || bad) ? -1 : 0;
}

/* The whole file, malloc'd (NULL when unreadable). */
static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    if (len) *len = n;
    return buf;
}

static int same_file(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    char *x = slurp(a, &na), *y = slurp(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

static int exists(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0;
}

/* A model folder with config.json and two of the four tokenizer files. */
static const char *make_model_dir(void) {
    const char *dir = test_path("model");
    if (!exists(dir)) {
        mkdir(dir, 0755);
        char path[1200];
        snprintf(path, sizeof path, "%s/config.json", dir);
        write_text(path, "{\"model_type\": \"llama\", \"hidden_size\": 40}\n");
        snprintf(path, sizeof path, "%s/tokenizer.json", dir);
        write_text(path, "{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\"}}\n\xc3\xa9\n");
        snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
        write_text(path, "{\"add_bos_token\": true}");
    }
    return dir;
}

/* Checks that dir holds exactly f's weights (bf16 of the inputs), head and (with_state) the
 * training state. */
static void check_files(const char *tl_name, const char *dir, const fixture *f, int with_state) {
    char path[1200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    es_safetensors *st = NULL;
    es_error err = {0};
    REQUIRE(es_safetensors_open(path, &st, &err) == ES_OK);
    const char *format = es_safetensors_meta(st, "format");
    CHECK(format && strcmp(format, "pt") == 0);
    CHECK(st->n_tensors == 2);
    for (int i = 0; i < 2; i++) {
        const es_tensor *t = es_safetensors_find(st, f->weights[i].name);
        CHECKF(t && t->dtype == ES_DT_BF16 && t->ndim == f->weights[i].ndim && t->shape[0] == f->weights[i].shape[0],
               "tensor %s", f->weights[i].name);
        if (!t) continue;
        size_t n = es_tensor_numel(t), bad = 0;
        for (size_t k = 0; k < n; k++) {
            uint16_t got;
            memcpy(&got, (const char *)t->data + 2 * k, 2);
            bad += got != es_f32_to_bf16(f->weights[i].data[k]);
        }
        CHECKF(bad == 0, "%zu bf16 values of %s differ", bad, f->weights[i].name);
    }
    es_safetensors_close(st);

    snprintf(path, sizeof path, "%s/student_head.safetensors", dir);
    st = NULL;
    REQUIRE(es_safetensors_open(path, &st, &err) == ES_OK);
    const es_tensor *head = es_safetensors_find(st, "head.0");
    CHECK(head && head->dtype == ES_DT_F32 && head->ndim == 2 && head->shape[1] == HEAD &&
          memcmp(head->data, f->head, sizeof f->head) == 0);
    es_safetensors_close(st);
    if (!with_state) return;

    static float master[3][ROWS * COLS], m[3][ROWS * COLS], v[3][ROWS * COLS];
    checkpoint_buffer bm[3], bmm[3], bv[3];
    for (int k = 0; k < 3; k++) {
        memset(master[k], 0xff, sizeof master[k]);
        bm[k] = (checkpoint_buffer){f->st_master[k].name, master[k], f->st_master[k].shape[0]};
        bmm[k] = (checkpoint_buffer){f->st_m[k].name, m[k], f->st_m[k].shape[0]};
        bv[k] = (checkpoint_buffer){f->st_v[k].name, v[k], f->st_v[k].shape[0]};
    }
    char *json = NULL;
    int rc = checkpoint_load_state(dir, bm, bmm, bv, 3, &json, &err);
    CHECKF(rc == ES_OK, "%s", err.msg);
    if (rc) return;
    for (int k = 0; k < 3; k++) {
        size_t bytes = (size_t)f->st_master[k].shape[0] * sizeof(float);
        CHECKF(memcmp(master[k], f->master[k], bytes) == 0 && memcmp(m[k], f->m[k], bytes) == 0 &&
                   memcmp(v[k], f->v[k], bytes) == 0,
               "state of %s", f->st_master[k].name);
    }
    CHECKF(json && strcmp(json, f->state_json) == 0, "state.json: %s", json ? json : "(null)");
    free(json);
}

#define check_checkpoint(name, dir, f) check_files(name, dir, f, 1)
#define check_top_level(name, dir, f) check_files(name, dir, f, 0)

static fixture fx, fx2;

TEST(save_and_load_round_trip) {
    const char *model = make_model_dir(), *out = test_path("round");
    make_fixture(&fx, model, 1, 10);
    es_error err = {0};
    int rc = checkpoint_save(out, 10, &fx.content, 2, &err);
    REQUIRE(rc == ES_OK || (printf("  %s\n", err.msg), 0));
    char dir[1200], a[1300], b[1300];
    snprintf(dir, sizeof dir, "%s/checkpoint-10", out);
    check_checkpoint(tl_name, dir, &fx);
    /* config and tokenizer files copied byte for byte, absent ones not invented */
    const char *copied[] = {"config.json", "tokenizer.json", "tokenizer_config.json"};
    for (int i = 0; i < 3; i++) {
        snprintf(a, sizeof a, "%s/%s", model, copied[i]);
        snprintf(b, sizeof b, "%s/%s", dir, copied[i]);
        CHECKF(same_file(a, b), "%s", copied[i]);
        snprintf(b, sizeof b, "%s/%s", out, copied[i]);
        CHECKF(same_file(a, b), "top-level %s", copied[i]);
    }
    snprintf(b, sizeof b, "%s/special_tokens_map.json", dir);
    CHECK(!exists(b));
    snprintf(b, sizeof b, "%s/generation_config.json", out);
    CHECK(!exists(b));
    /* the top level loads like the checkpoint */
    const char *big[] = {"model.safetensors", "student_head.safetensors"};
    for (int i = 0; i < 2; i++) {
        snprintf(a, sizeof a, "%s/%s", dir, big[i]);
        snprintf(b, sizeof b, "%s/%s", out, big[i]);
        CHECKF(same_file(a, b), "top-level %s", big[i]);
        /* a hard link, not a second copy of the model (every local file system has links) */
        struct stat sa, sb;
        CHECKF(stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_ino == sb.st_ino && sa.st_dev == sb.st_dev,
               "top-level %s is a copy", big[i]);
    }
    snprintf(b, sizeof b, "%s/checkpoint-10.partial", out);
    CHECK(!exists(b));
    snprintf(b, sizeof b, "%s/model.safetensors.partial", out);
    CHECK(!exists(b));
    char *latest = NULL;
    int64_t step = 0;
    CHECK(checkpoint_find_latest(out, &latest, &step, &err) == ES_OK && latest && strcmp(latest, dir) == 0 && step == 10);
    free(latest);
}

TEST(load_state_checks_names_and_sizes) {
    const char *out = test_path("round");
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/checkpoint-10", out);
    static float buf[3][ROWS * COLS];
    checkpoint_buffer ok[1] = {{"model.norm.weight", buf[0], BIAS}};
    checkpoint_buffer missing[1] = {{"model.nope", buf[1], BIAS}};
    checkpoint_buffer wrong[1] = {{"model.norm.weight", buf[2], BIAS + 1}};
    char *json = NULL;
    es_error err = {0};
    CHECK(checkpoint_load_state(dir, ok, ok, ok, 1, &json, &err) == ES_OK && json);
    free(json);
    json = NULL;
    int rc = checkpoint_load_state(dir, ok, missing, ok, 1, &json, &err);
    CHECKF(rc == ES_ERR_DATA && strstr(err.msg, "m/model.nope") && strstr(err.msg, "state.safetensors") && !json, "%s",
           err.msg);
    es_error_clear(&err);
    rc = checkpoint_load_state(dir, ok, ok, wrong, 1, &json, &err);
    CHECKF(rc == ES_ERR_DATA && strstr(err.msg, "v/model.norm.weight") && strstr(err.msg, "8"), "%s", err.msg);
    es_error_clear(&err);
    rc = checkpoint_load_state(test_path("nowhere"), ok, ok, ok, 1, &json, &err);
    CHECKF(rc == ES_ERR_DATA && strstr(err.msg, "nowhere"), "%s", err.msg);
}

static int count_checkpoints(const char *out, int64_t steps[8]) {
    DIR *dir = opendir(out);
    if (!dir) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL)
        if (!strncmp(e->d_name, "checkpoint-", 11)) {
            if (n < 8) steps[n] = strtoll(e->d_name + 11, NULL, 10);
            n++;
        }
    closedir(dir);
    return n;
}

TEST(keeps_the_newest_two) {
    const char *model = make_model_dir(), *out = test_path("keep");
    es_error err = {0};
    for (int64_t step = 100; step <= 400; step += 100) {
        make_fixture(&fx, model, (uint64_t)step, step);
        REQUIRE(checkpoint_save(out, step, &fx.content, 2, &err) == ES_OK);
    }
    int64_t steps[8] = {0};
    int n = count_checkpoints(out, steps);
    CHECKF(n == 2 && ((steps[0] == 300 && steps[1] == 400) || (steps[0] == 400 && steps[1] == 300)),
           "%d folders: %lld %lld", n, (long long)steps[0], (long long)steps[1]);
    /* the top level is the newest */
    check_top_level(tl_name, out, &fx);
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/checkpoint-300", out);
    make_fixture(&fx2, model, 300, 300);
    check_checkpoint(tl_name, dir, &fx2);
    /* keep <= 0: nothing removed */
    make_fixture(&fx, model, 500, 500);
    REQUIRE(checkpoint_save(out, 500, &fx.content, 0, &err) == ES_OK);
    CHECK(count_checkpoints(out, steps) == 3);
}

TEST(find_latest_skips_partial_and_foreign_folders) {
    const char *out = test_path("latest");
    char *path = (char *)"unset";
    int64_t step = 7;
    es_error err = {0};
    CHECK(checkpoint_find_latest(out, &path, &step, &err) == ES_OK && path == NULL); /* no folder at all */
    mkdir(out, 0755);
    const char *complete[] = {"checkpoint-20", "checkpoint-3"};
    const char *ignored[] = {"checkpoint-90.partial", "checkpoint-80.replaced", "checkpoint-070", "checkpoint-x1",
                             "checkpoint-", "checkpoint--5", "checkpoint-+60", "checkpoint-99999999999999999999",
                             "Checkpoint-95", "run-99"};
    char p[1300];
    for (size_t i = 0; i < sizeof complete / sizeof *complete + sizeof ignored / sizeof *ignored; i++) {
        const char *name = i < 2 ? complete[i] : ignored[i - 2];
        snprintf(p, sizeof p, "%s/%s", out, name);
        mkdir(p, 0755);
        snprintf(p, sizeof p, "%s/%s/essence-state", out, name);
        mkdir(p, 0755);
        snprintf(p, sizeof p, "%s/%s/essence-state/state.json", out, name);
        REQUIRE(write_text(p, "{}") == 0);
    }
    /* newer, but without state.json; and a plain file with a checkpoint's name */
    snprintf(p, sizeof p, "%s/checkpoint-50", out);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/checkpoint-60", out);
    REQUIRE(write_text(p, "not a folder") == 0);
    REQUIRE(checkpoint_find_latest(out, &path, &step, &err) == ES_OK);
    char want[1200];
    snprintf(want, sizeof want, "%s/checkpoint-20", out);
    CHECKF(path && strcmp(path, want) == 0 && step == 20, "%s step %lld", path ? path : "(null)", (long long)step);
    free(path);
}

TEST(saving_a_step_again_replaces_it) {
    const char *model = make_model_dir(), *out = test_path("again");
    es_error err = {0};
    make_fixture(&fx, model, 11, 5);
    REQUIRE(checkpoint_save(out, 5, &fx.content, 3, &err) == ES_OK);
    make_fixture(&fx2, model, 22, 5);
    int rc = checkpoint_save(out, 5, &fx2.content, 3, &err);
    REQUIRE(rc == ES_OK || (printf("  %s\n", err.msg), 0));
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/checkpoint-5", out);
    check_checkpoint(tl_name, dir, &fx2);
    check_top_level(tl_name, out, &fx2);
    int64_t steps[8];
    CHECK(count_checkpoints(out, steps) == 1); /* no .partial or .replaced left */
}

/* Saves with the process's file size limit at `limit` bytes: writes past it fail with EFBIG. */
static int save_limited(const char *out, int64_t step, const checkpoint_content *content, rlim_t limit, es_error *err) {
    struct rlimit old, small;
    if (getrlimit(RLIMIT_FSIZE, &old) != 0) return -1;
    small = old;
    small.rlim_cur = limit;
    if (setrlimit(RLIMIT_FSIZE, &small) != 0) return -1;
    int rc = checkpoint_save(out, step, content, 1, err);
    setrlimit(RLIMIT_FSIZE, &old);
    return rc;
}

TEST(failed_save_keeps_the_previous_checkpoint) {
    signal(SIGXFSZ, SIG_IGN); /* a failed write, not a dead process */
    const char *model = make_model_dir(), *out = test_path("full");
    es_error err = {0};
    make_fixture(&fx, model, 33, 1);
    REQUIRE(checkpoint_save(out, 1, &fx.content, 1, &err) == ES_OK);
    char dir[1200], p[1300];
    snprintf(dir, sizeof dir, "%s/checkpoint-1", out);
    size_t model_size = 0;
    snprintf(p, sizeof p, "%s/model.safetensors", out);
    free(slurp(p, &model_size));
    REQUIRE(model_size > 4096);

    /* the next step: model.safetensors cannot be written */
    make_fixture(&fx2, model, 44, 2);
    int rc = save_limited(out, 2, &fx2.content, 4096, &err);
    CHECKF(rc == ES_ERR_RUNTIME && strstr(err.msg, "model.safetensors") && strstr(err.msg, strerror(EFBIG)), "rc %d: %s",
           rc, err.msg);
    snprintf(p, sizeof p, "%s/checkpoint-2.partial", out);
    CHECK(!exists(p));
    snprintf(p, sizeof p, "%s/checkpoint-2", out);
    CHECK(!exists(p));
    check_checkpoint(tl_name, dir, &fx);
    check_top_level(tl_name, out, &fx);

    /* the same step again (a resumed run): the old one must survive the failure */
    es_error_clear(&err);
    rc = save_limited(out, 1, &fx2.content, 4096, &err);
    CHECKF(rc == ES_ERR_RUNTIME && strstr(err.msg, strerror(EFBIG)), "rc %d: %s", rc, err.msg);
    snprintf(p, sizeof p, "%s/checkpoint-1.partial", out);
    CHECK(!exists(p));
    check_checkpoint(tl_name, dir, &fx);
    char *latest = NULL;
    int64_t step = 0;
    CHECK(checkpoint_find_latest(out, &latest, &step, &err) == ES_OK && latest && step == 1);
    free(latest);

    /* a model folder without config.json */
    es_error_clear(&err);
    fixture *broken = &fx2;
    broken->content.model_dir = test_path("no-model");
    rc = checkpoint_save(out, 3, &broken->content, 1, &err);
    CHECKF(rc == ES_ERR_RUNTIME && strstr(err.msg, "no-model/config.json") && strstr(err.msg, strerror(ENOENT)),
           "rc %d: %s", rc, err.msg);
    snprintf(p, sizeof p, "%s/checkpoint-3.partial", out);
    CHECK(!exists(p));
    check_top_level(tl_name, out, &fx);
    int64_t steps[8];
    CHECK(count_checkpoints(out, steps) == 1 && steps[0] == 1);
}

TEST(bad_content_is_refused) {
    const char *model = make_model_dir(), *out = test_path("refused");
    es_error err = {0};
    make_fixture(&fx, model, 5, 1);
    fx.content.state_json = "[1, 2]";
    CHECK(checkpoint_save(out, 1, &fx.content, 1, &err) == ES_ERR_DATA && strstr(err.msg, "JSON object"));
    es_error_clear(&err);
    make_fixture(&fx, model, 5, 1);
    fx.weights[1].ndim = 3;
    CHECK(checkpoint_save(out, 1, &fx.content, 1, &err) == ES_ERR_DATA && strstr(err.msg, "model.norm.weight"));
    char p[1200];
    snprintf(p, sizeof p, "%s/checkpoint-1", out);
    CHECK(!exists(p));
    snprintf(p, sizeof p, "%s/checkpoint-1.partial", out);
    CHECK(!exists(p));
}

int main(void) {
    RUN(save_and_load_round_trip);
    RUN(load_state_checks_names_and_sizes);
    RUN(keeps_the_newest_two);
    RUN(find_latest_skips_partial_and_foreign_folders);
    RUN(saving_a_step_again_replaces_it);
    RUN(failed_save_keeps_the_previous_checkpoint);
    RUN(bad_content_is_refused);
    return test_summary();
}
