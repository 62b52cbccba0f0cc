/* A pipeline file (docs/run.md) read into a plan: stages checked, references resolved, paths made
 * absolute, stages put in dependency order. Every error names FILE:LINE. */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <yaml.h>

#include "run.h"

typedef struct loader {
    const char *path;
    yaml_document_t doc;
    es_error *err;
} loader;

static int lfail(loader *l, const yaml_node_t *node, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int lfail(loader *l, const yaml_node_t *node, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return es_fail(l->err, ES_ERR_USAGE, "%s:%lu: %s", l->path, node ? (unsigned long)node->start_mark.line + 1 : 1UL, msg);
}

/* Stage names and flags: [A-Za-z0-9][A-Za-z0-9_-]* (a leading '-' would read as an option). */
static int valid_name(const char *s) {
    if (!isalnum((unsigned char)*s)) return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '_' && *s != '-') return 0;
    return 1;
}

static const char *scalar(const yaml_node_t *node) {
    return node && node->type == YAML_SCALAR_NODE ? (const char *)node->data.scalar.value : NULL;
}

/* A plain scalar as YAML 1.2's core schema types it; quoted ones are strings. */
static json_t *typed_scalar(const yaml_node_t *node) {
    const char *text = scalar(node);
    if (node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return json_string(text);
    if (!strcmp(text, "true") || !strcmp(text, "True") || !strcmp(text, "TRUE")) return json_true();
    if (!strcmp(text, "false") || !strcmp(text, "False") || !strcmp(text, "FALSE")) return json_false();
    if (!*text || !strcmp(text, "~") || !strcmp(text, "null")) return json_null();
    char *end;
    errno = 0;
    long long integer = strtoll(text, &end, 10);
    if (!*end && end != text && !errno) return json_integer(integer);
    double real = strtod(text, &end);
    if (!*end && end != text && strspn(text, "0123456789+-.eE") == strlen(text)) return json_real(real);
    return json_string(text);
}

/* A parameter value: a scalar, or a flow sequence of scalars joined with ',' (as the programs'
 * configuration reads `layers: [20, 40]`). */
static json_t *param_value(loader *l, yaml_node_t *node) {
    if (node->type == YAML_SCALAR_NODE) return typed_scalar(node);
    if (node->type != YAML_SEQUENCE_NODE) return NULL;
    size_t cap = 1, len = 0;
    char *joined = calloc(1, 1);
    for (yaml_node_item_t *item = node->data.sequence.items.start; joined && item < node->data.sequence.items.top; item++) {
        const char *text = scalar(yaml_document_get_node(&l->doc, *item));
        if (!text) {
            free(joined);
            return NULL;
        }
        size_t need = len + strlen(text) + 2;
        if (need > cap) joined = realloc(joined, cap = 2 * need);
        if (joined) len += (size_t)sprintf(joined + len, "%s%s", len ? "," : "", text);
    }
    json_t *value = joined ? json_string(joined) : NULL;
    free(joined);
    return value;
}

/* `path` (relative to `dir`) as one spelling per place, so that work/t.h5, work/./t.h5,
 * work//t.h5, a/../work/t.h5 and a symbolic link to the folder work compare equal: the longest
 * existing folder above the last component goes through realpath (links and ".." resolved as
 * the system resolves them), the components below it, which do not exist yet, are normalised
 * lexically. The last component itself is kept (an output that is a link is replaced, not
 * followed, by the rename that completes it). malloc'd; NULL when out of memory. */
char *run_normalise_path(const char *dir, const char *path) {
    char *joined = NULL;
    if (path[0] == '/' ? !(joined = strdup(path)) : asprintf(&joined, "%s/%s", dir, path) < 0) return NULL;
    /* the components, "" and "." dropped (".." kept: realpath must see it) */
    size_t n = 0, cap = strlen(joined) / 2 + 2;
    char **parts = malloc(cap * sizeof *parts), *save = NULL;
    for (char *part = parts ? strtok_r(joined, "/", &save) : NULL; part; part = strtok_r(NULL, "/", &save))
        if (strcmp(part, ".")) parts[n++] = part;
    size_t size = strlen(path) + PATH_MAX + 2;
    char *out = parts ? malloc(size) : NULL, *prefix = out ? malloc(size) : NULL, resolved[PATH_MAX];
    if (!out || !prefix) {
        free(joined), free(parts), free(out), free(prefix);
        return NULL;
    }
    /* the longest prefix of the folders above the last component that realpath resolves */
    size_t parents = n && strcmp(parts[n - 1], "..") ? n - 1 : n, known = parents;
    for (;; known--) {
        size_t len = 0;
        prefix[0] = '\0';
        for (size_t i = 0; i < known; i++) len += (size_t)snprintf(prefix + len, size - len, "/%s", parts[i]);
        if (!known) strcpy(prefix, "/");
        struct stat st;
        if (realpath(prefix, resolved) && stat(resolved, &st) == 0 && S_ISDIR(st.st_mode)) break;
        if (!known) {
            strcpy(resolved, "/");
            break;
        }
    }
    snprintf(out, size, "%s", strcmp(resolved, "/") ? resolved : "");
    for (size_t i = known; i < n; i++) {
        if (!strcmp(parts[i], "..")) { /* out has no links from here on: its parent is lexical */
            char *slash = strrchr(out, '/');
            if (slash) *slash = '\0';
        } else {
            size_t len = strlen(out);
            snprintf(out + len, size - len, "/%s", parts[i]);
        }
    }
    if (!out[0]) strcpy(out, "/");
    free(joined), free(parts), free(prefix);
    return out;
}

/* Text of a json scalar as a flag value (NULL for true; the caller drops false and null). */
static char *flag_text(const json_t *value) {
    char *out = NULL;
    if (json_is_string(value)) return strdup(json_string_value(value));
    if (json_is_integer(value) && asprintf(&out, "%lld", (long long)json_integer_value(value)) < 0) return NULL;
    if (json_is_real(value)) { /* the shortest text that reads back as the same double */
        char buf[64];
        for (int precision = 1; precision <= 17; precision++) {
            snprintf(buf, sizeof buf, "%.*g", precision, json_real_value(value));
            if (strtod(buf, NULL) == json_real_value(value)) break;
        }
        return strdup(buf);
    }
    return out;
}

/* The programs a stage may run (DESIGN.md): essence's own, which take --fingerprint and store
 * it in their outputs; anything else would be a way to run any command from a pipeline file. */
static const char *const essence_programs[] = {"essence-extract", "essence-project", "essence-align", "essence-eval"};

static int is_essence_program(const char *name) {
    for (size_t i = 0; i < sizeof essence_programs / sizeof *essence_programs; i++)
        if (!strcmp(name, essence_programs[i])) return 1;
    return 0;
}

/* An essence program beside this essence-run (the build folder, or PREFIX/bin), never from PATH:
 * the stages must be the build that essence-run fingerprints them as. 0 and *out (malloc'd),
 * else -1 with *folder set to where it looked. */
static int find_program(const char *name, char **out, char folder[PATH_MAX]) {
    char candidate[PATH_MAX + 256];
    ssize_t n = readlink("/proc/self/exe", folder, PATH_MAX - 1);
    folder[n > 0 ? n : 0] = '\0';
    char *slash = strrchr(folder, '/');
    if (slash) *slash = '\0';
    snprintf(candidate, sizeof candidate, "%s/%s", folder, name);
    if (n > 0 && access(candidate, X_OK) == 0) return (*out = strdup(candidate)) ? 0 : -1;
    return -1;
}

static int add_arg(run_stage *stage, run_arg_kind kind, const char *key, char *value, char *text, int line, int outputs) {
    run_arg **list = outputs ? &stage->outputs : &stage->args;
    int *count = outputs ? &stage->n_outputs : &stage->n_args;
    run_arg *grown = realloc(*list, (size_t)(*count + 1) * sizeof *grown);
    if (!grown) return -1;
    *list = grown;
    char *flag = strdup(key);
    if (!flag) return -1;
    for (char *c = flag; *c; c++)
        if (*c == '_') *c = '-';
    grown[(*count)++] = (run_arg){flag, value, kind, line, -1, NULL, text};
    return 0;
}

/* ---- the slurm: block --------------------------------------------------------------------- */

static int is_alnum_ascii(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }

/* A name Slurm takes for a partition or an account: a letter or digit, then letters, digits and
 * _ . : + - (no white space, quote, $, `, ;, %, newline; no leading '-', which would read as an
 * option). */
static int slurm_name(const char *s, size_t n) {
    if (!n || !is_alnum_ascii(s[0])) return 0;
    for (size_t i = 0; i < n; i++)
        if (!is_alnum_ascii(s[i]) && !strchr("_.:+-", s[i])) return 0;
    return 1;
}

static int digits(const char **s) {
    size_t n = strspn(*s, "0123456789");
    *s += n;
    return n > 0;
}

const char *run_slurm_value_problem(const char *key, const char *value) {
    if (!strcmp(key, "partition")) { /* a comma-separated list of names */
        for (const char *at = value;; at += strcspn(at, ",") + 1) {
            if (!slurm_name(at, strcspn(at, ","))) return "expected partition names separated by commas, each [A-Za-z0-9][A-Za-z0-9_.:+-]*";
            if (!at[strcspn(at, ",")]) return NULL;
        }
    }
    if (!strcmp(key, "account")) return slurm_name(value, strlen(value)) ? NULL : "expected [A-Za-z0-9][A-Za-z0-9_.:+-]*";
    if (!strcmp(key, "time")) { /* [DAYS-]N[:N[:N]]: minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S */
        const char *at = value;
        if (!digits(&at)) return "expected MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS or DAYS-HOURS[:MINUTES[:SECONDS]]";
        if (*at == '-' && (at++, !digits(&at))) return "expected DAYS-HOURS[:MINUTES[:SECONDS]] after the days";
        for (int groups = 0; *at == ':' && groups < 2; groups++)
            if (at++, !digits(&at)) return "expected digits after ':'";
        return *at ? "expected MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS or DAYS-HOURS[:MINUTES[:SECONDS]] (e.g. 04:00:00, 1-00:00:00)" : NULL;
    }
    if (!strcmp(key, "mem")) {
        const char *at = value;
        return digits(&at) && (!*at || (strchr("KMGTkmgt", *at) && !at[1])) ? NULL : "expected a number with an optional unit K, M, G or T";
    }
    return "not a slurm key";
}

static int read_slurm(loader *l, yaml_node_t *node, run_slurm *slurm) {
    if (node->type != YAML_MAPPING_NODE) return lfail(l, node, "slurm: expected a mapping");
    for (yaml_node_pair_t *pair = node->data.mapping.pairs.start; pair < node->data.mapping.pairs.top; pair++) {
        yaml_node_t *key = yaml_document_get_node(&l->doc, pair->key), *value = yaml_document_get_node(&l->doc, pair->value);
        const char *k = scalar(key), *v = scalar(value);
        if (!k || !v) return lfail(l, key, "slurm: keys and values must be scalars");
        char *field = !strcmp(k, "partition") ? slurm->partition : !strcmp(k, "account") ? slurm->account
                      : !strcmp(k, "time")    ? slurm->time
                      : !strcmp(k, "mem")     ? slurm->mem
                                              : NULL;
        int *number = !strcmp(k, "gpus") ? &slurm->gpus : !strcmp(k, "cpus") ? &slurm->cpus : !strcmp(k, "nodes") ? &slurm->nodes : NULL;
        if (field) {
            /* Validated here, whatever the executor: these values go into #SBATCH lines. */
            const char *problem = run_slurm_value_problem(k, v);
            if (strlen(v) >= 32) return lfail(l, value, "slurm.%s: value too long (at most 31 characters)", k);
            if (problem) return lfail(l, value, "slurm.%s \"%s\": %s", k, v, problem);
            strcpy(field, v);
        } else if (number) {
            char *end;
            long parsed = strtol(v, &end, 10);
            if (*end || end == v || parsed < 0 || parsed > 100000 || !isdigit((unsigned char)v[0]))
                return lfail(l, value, "slurm.%s: expected a count, not \"%s\"", k, v);
            *number = (int)parsed;
        } else {
            return lfail(l, key, "slurm: unknown key \"%s\" (partition, account, time, gpus, cpus, mem, nodes)", k);
        }
    }
    return ES_OK;
}

/* One stage's mapping. Inputs are kept as written; resolve() turns them into paths or references. */
static int read_stage(loader *l, yaml_node_t *name_node, yaml_node_t *node, const run_slurm *defaults, run_stage *stage,
                      const char *dir) {
    const char *name = scalar(name_node);
    stage->line = (int)name_node->start_mark.line + 1;
    stage->shards = 1;
    stage->slurm = *defaults;
    if (!(stage->name = strdup(name)) || !(stage->params = json_object())) return es_fail(l->err, ES_ERR_RUNTIME, "out of memory");
    if (!valid_name(name)) return lfail(l, name_node, "stage name \"%s\": use letters, digits, '_' and '-', starting with a letter or digit", name);
    if (node->type != YAML_MAPPING_NODE) return lfail(l, node, "stage %s: expected a mapping", name);
    yaml_node_t *slurm_node = NULL;
    for (yaml_node_pair_t *pair = node->data.mapping.pairs.start; pair < node->data.mapping.pairs.top; pair++) {
        yaml_node_t *key = yaml_document_get_node(&l->doc, pair->key), *value = yaml_document_get_node(&l->doc, pair->value);
        const char *k = scalar(key);
        if (!k) return lfail(l, key, "stage %s: keys must be scalars", name);
        if (!strcmp(k, "program")) {
            const char *program = scalar(value);
            char folder[PATH_MAX];
            if (!program || !is_essence_program(program))
                return lfail(l, value, "stage %s: program \"%s\" is not a program of essence (essence-extract, essence-project, essence-align, essence-eval)",
                             name, program ? program : "(not a scalar)");
            if (find_program(program, &stage->program, folder))
                return lfail(l, value, "stage %s: program %s not found beside essence-run (in %s): is it built or installed?", name, program, folder);
        } else if (!strcmp(k, "shards")) {
            const char *text = scalar(value);
            char *end;
            long shards = text ? strtol(text, &end, 10) : 0;
            if (!text || *end || shards < 1 || shards > 99999) return lfail(l, value, "stage %s: shards: expected a count from 1", name);
            stage->shards = (int)shards;
        } else if (!strcmp(k, "slurm")) {
            slurm_node = value;
        } else if (!strcmp(k, "params") || !strcmp(k, "inputs") || !strcmp(k, "outputs")) {
            if (value->type != YAML_MAPPING_NODE) return lfail(l, value, "stage %s: %s: expected a mapping of flags", name, k);
            for (yaml_node_pair_t *item = value->data.mapping.pairs.start; item < value->data.mapping.pairs.top; item++) {
                yaml_node_t *flag_node = yaml_document_get_node(&l->doc, item->key), *v = yaml_document_get_node(&l->doc, item->value);
                const char *flag = scalar(flag_node);
                int line = (int)flag_node->start_mark.line + 1;
                if (!flag || !valid_name(flag)) return lfail(l, flag_node, "stage %s: %s: a flag name of letters, digits, '_', '-', starting with a letter or digit", name, k);
                if (!strcmp(flag, "shard") || !strcmp(flag, "fingerprint") || !strcmp(flag, "config"))
                    return lfail(l, flag_node, "stage %s: --%s is set by essence-run", name, flag);
                if (!strcmp(k, "params")) {
                    json_t *typed = param_value(l, v);
                    if (!typed) return lfail(l, v, "stage %s: param %s: expected a scalar or a list of scalars", name, flag);
                    json_object_set_new(stage->params, flag, typed);
                } else {
                    const char *text = scalar(v);
                    if (!text || !*text) return lfail(l, v, "stage %s: %s %s: expected a path", name, k, flag);
                    char *copy = strdup(text), *absolute = run_normalise_path(dir, text);
                    if (!copy || !absolute ||
                        add_arg(stage, !strcmp(k, "inputs") ? RUN_INPUT : RUN_OUTPUT, flag, absolute, copy, line, !strcmp(k, "outputs")))
                        return es_fail(l->err, ES_ERR_RUNTIME, "out of memory");
                }
            }
        } else {
            return lfail(l, key, "stage %s: unknown key \"%s\" (program, inputs, params, outputs, shards, slurm)", name, k);
        }
    }
    if (!stage->program) return lfail(l, name_node, "stage %s: program is missing", name);
    if (!stage->n_outputs) return lfail(l, name_node, "stage %s: no outputs", name);
    return slurm_node ? read_slurm(l, slurm_node, &stage->slurm) : ES_OK;
}

/* Turns the params into flags (after --set). */
static int params_to_args(run_stage *stage) {
    const char *key;
    json_t *value;
    json_object_foreach((json_t *)stage->params, key, value) {
        if (json_is_false(value) || json_is_null(value)) continue;
        char *text = json_is_true(value) ? NULL : flag_text(value);
        if (!json_is_true(value) && !text) return -1;
        if (add_arg(stage, RUN_PARAM, key, text, NULL, stage->line, 0)) return -1;
    }
    return 0;
}

static int apply_set(run_plan *plan, const char *set, es_error *err) {
    const char *dot = strchr(set, '.'), *equals = dot ? strchr(dot, '=') : NULL;
    if (!dot || !equals || dot == set || equals == dot + 1)
        return es_fail(err, ES_ERR_USAGE, "--set %s: expected STAGE.KEY=VALUE", set);
    char stage_name[256], key[256];
    snprintf(stage_name, sizeof stage_name, "%.*s", (int)(dot - set), set);
    snprintf(key, sizeof key, "%.*s", (int)(equals - dot - 1), dot + 1);
    const char *value = equals + 1;
    for (char *c = key; *c; c++)
        if (*c == '-') *c = '_';
    for (int s = 0; s < plan->n_stages; s++) {
        run_stage *stage = &plan->stages[s];
        if (strcmp(stage->name, stage_name)) continue;
        if (!strcmp(key, "shards")) {
            char *end;
            long shards = strtol(value, &end, 10);
            if (*end || shards < 1 || shards > 99999) return es_fail(err, ES_ERR_USAGE, "--set %s: shards must be a count from 1", set);
            stage->shards = (int)shards;
            return ES_OK;
        }
        for (int i = 0; i < stage->n_args; i++) { /* an input's path */
            char flag[256];
            snprintf(flag, sizeof flag, "%s", key);
            for (char *c = flag; *c; c++)
                if (*c == '_') *c = '-';
            if (stage->args[i].kind == RUN_INPUT && !strcmp(stage->args[i].flag, flag)) {
                free(stage->args[i].value), free(stage->args[i].text);
                stage->args[i].text = strdup(value);
                stage->args[i].value = run_normalise_path(plan->dir, value);
                return ES_OK;
            }
        }
        /* a parameter, typed as a plain YAML scalar would be */
        yaml_node_t node = {.type = YAML_SCALAR_NODE};
        node.data.scalar.value = (yaml_char_t *)value;
        node.data.scalar.style = YAML_PLAIN_SCALAR_STYLE;
        json_object_set_new(stage->params, key, typed_scalar(&node));
        return ES_OK;
    }
    return es_fail(err, ES_ERR_USAGE, "--set %s: the pipeline has no stage \"%s\"", set, stage_name);
}

/* One path a stage writes: an output, or one shard of it. */
typedef struct written {
    char *path;
    int stage, output, shard; /* shard -1: not sharded */
} written;

static int by_path_then_place(const void *a, const void *b) {
    const written *x = a, *y = b;
    int c = strcmp(x->path, y->path);
    return c ? c : x->stage != y->stage ? x->stage - y->stage : x->output != y->output ? x->output - y->output : x->shard - y->shard;
}

/* No path written twice: outputs compared as normalised paths, and as the shard files they
 * become (a stage's work/t.h5 in 2 shards writes work/t-00000-of-00002.h5, which another stage
 * may name). The later of the two in the file is the one named. */
static int check_outputs_apart(const run_plan *plan, es_error *err) {
    size_t n = 0, cap = 0;
    for (int s = 0; s < plan->n_stages; s++) cap += (size_t)plan->stages[s].n_outputs * (size_t)plan->stages[s].shards;
    written *all = calloc(cap ? cap : 1, sizeof *all);
    int rc = all ? ES_OK : es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int s = 0; !rc && s < plan->n_stages; s++) {
        const run_stage *stage = &plan->stages[s];
        for (int o = 0; !rc && o < stage->n_outputs; o++)
            for (int k = 0; !rc && k < stage->shards; k++) {
                int shard = stage->shards > 1 ? k : -1;
                char *path = shard >= 0 ? run_shard_path(stage->outputs[o].value, k, stage->shards) : strdup(stage->outputs[o].value);
                if (!path) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
                else all[n++] = (written){path, s, o, shard};
            }
    }
    if (!rc) qsort(all, n, sizeof *all, by_path_then_place);
    for (size_t i = 1; !rc && i < n; i++) {
        if (strcmp(all[i].path, all[i - 1].path)) continue;
        const written *first = &all[i - 1], *second = &all[i];
        const run_stage *a = &plan->stages[first->stage], *b = &plan->stages[second->stage];
        char as[64] = "";
        if (first->shard >= 0) snprintf(as, sizeof as, " (its shard %d)", first->shard);
        rc = es_fail(err, ES_ERR_USAGE, "%s:%d: stage %s writes %s, as stage %s does%s: two outputs cannot be one file", plan->pipeline_path,
                     b->outputs[second->output].line, b->name, second->shard >= 0 ? second->path : b->outputs[second->output].text, a->name, as);
    }
    for (size_t i = 0; i < n; i++) free(all[i].path);
    free(all);
    return rc;
}

/* Inputs become references to the stages that write them; then stages are ordered. */
static int resolve(run_plan *plan, es_error *err) {
    const char *path = plan->pipeline_path;
    if (check_outputs_apart(plan, err)) return err->code;
    for (int s = 0; s < plan->n_stages; s++) {
        run_stage *stage = &plan->stages[s];
        for (int i = 0; i < stage->n_args; i++) {
            run_arg *arg = &stage->args[i];
            if (arg->kind != RUN_INPUT) continue;
            const char *dot = strchr(arg->text, '.');
            for (int t = 0; t < plan->n_stages && arg->ref_stage < 0; t++) {
                const run_stage *other = &plan->stages[t];
                size_t name_len = strlen(other->name);
                int named = dot && (size_t)(dot - arg->text) == name_len && !strncmp(arg->text, other->name, name_len);
                for (int o = 0; o < other->n_outputs && arg->ref_stage < 0; o++) {
                    if ((named && !strcmp(dot + 1, other->outputs[o].flag)) || !strcmp(arg->value, other->outputs[o].value)) {
                        arg->ref_stage = t;
                        arg->ref_output = strdup(other->outputs[o].flag);
                        free(arg->value);
                        arg->value = strdup(other->outputs[o].value);
                    }
                }
                if (named && arg->ref_stage < 0)
                    return es_fail(err, ES_ERR_USAGE, "%s:%d: stage %s: input %s: stage %s has no output \"%s\"", path, arg->line,
                                   stage->name, arg->flag, other->name, dot + 1);
            }
            if (arg->ref_stage == s)
                return es_fail(err, ES_ERR_USAGE, "%s:%d: stage %s reads its own output %s", path, arg->line, stage->name, arg->text);
            struct stat st;
            if (arg->ref_stage < 0 && stat(arg->value, &st) != 0)
                return es_fail(err, ES_ERR_USAGE, "%s:%d: stage %s: input %s: %s does not exist and no stage writes it", path, arg->line,
                               stage->name, arg->flag, arg->text);
        }
    }
    /* Dependency order (depth-first); a stage met again while on the path is a cycle. */
    int n = plan->n_stages, *state = calloc((size_t)n, sizeof *state), *order = malloc((size_t)n * sizeof *order), placed = 0;
    int *stack = malloc((size_t)n * sizeof *stack), *next_arg = calloc((size_t)n, sizeof *next_arg);
    if (!state || !order || !stack || !next_arg) {
        free(state), free(order), free(stack), free(next_arg);
        return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    }
    int rc = ES_OK;
    for (int root = 0; root < n && !rc; root++) {
        if (state[root]) continue;
        int depth = 0;
        stack[depth++] = root, state[root] = 1;
        while (depth && !rc) {
            int s = stack[depth - 1];
            run_stage *stage = &plan->stages[s];
            int pushed = 0;
            while (next_arg[s] < stage->n_args && !pushed) {
                int t = stage->args[next_arg[s]++].ref_stage;
                if (t < 0 || state[t] == 2) continue;
                if (state[t] == 1) {
                    rc = es_fail(err, ES_ERR_USAGE, "%s:%d: stages %s and %s depend on each other (a cycle)", path, stage->line, stage->name,
                                 plan->stages[t].name);
                    break;
                }
                state[t] = 1, stack[depth++] = t, pushed = 1;
            }
            if (!pushed && !rc) state[s] = 2, order[placed++] = s, depth--;
        }
    }
    if (!rc) { /* reorder the stages and renumber the references */
        run_stage *sorted = malloc((size_t)n * sizeof *sorted);
        int *position = malloc((size_t)n * sizeof *position);
        if (!sorted || !position) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
        for (int i = 0; !rc && i < n; i++) sorted[i] = plan->stages[order[i]], position[order[i]] = i;
        for (int i = 0; !rc && i < n; i++) {
            run_stage *stage = &sorted[i];
            stage->deps = malloc((size_t)(stage->n_args + 1) * sizeof *stage->deps);
            if (!stage->deps) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
            for (int a = 0; !rc && a < stage->n_args; a++) {
                run_arg *arg = &stage->args[a];
                if (arg->ref_stage < 0) continue;
                arg->ref_stage = position[arg->ref_stage];
                int seen = 0;
                for (int d = 0; d < stage->n_deps; d++) seen |= stage->deps[d] == arg->ref_stage;
                if (!seen) stage->deps[stage->n_deps++] = arg->ref_stage;
            }
        }
        if (!rc) free(plan->stages), plan->stages = sorted;
        else free(sorted);
        free(position);
    }
    free(state), free(order), free(stack), free(next_arg);
    return rc;
}

char *run_shard_path(const char *path, int shard, int n) {
    const char *slash = strrchr(path, '/'), *dot = strrchr(path, '.');
    if (!dot || (slash && dot < slash) || dot == (slash ? slash + 1 : path)) dot = path + strlen(path);
    char *out;
    return asprintf(&out, "%.*s-%05d-of-%05d%s", (int)(dot - path), path, shard, n, dot) < 0 ? NULL : out;
}

/* Arguments that reference a sharded stage's output become its shards, joined with ','. */
static char *input_value(const run_plan *plan, const run_arg *arg) {
    if (arg->ref_stage < 0) return strdup(arg->value);
    const run_stage *from = &plan->stages[arg->ref_stage];
    if (from->shards == 1) return strdup(arg->value);
    size_t size = 1;
    char **parts = calloc((size_t)from->shards, sizeof *parts), *joined = NULL;
    for (int i = 0; parts && i < from->shards; i++) {
        parts[i] = run_shard_path(arg->value, i, from->shards);
        size += parts[i] ? strlen(parts[i]) + 1 : 0;
    }
    if (parts && (joined = calloc(1, size)))
        for (int i = 0; i < from->shards; i++)
            if (parts[i]) strcat(strcat(joined, i ? "," : ""), parts[i]);
    for (int i = 0; parts && i < from->shards; i++) free(parts[i]);
    free(parts);
    return joined;
}

int run_plan_load(run_plan *plan, const char *path, char *const *sets, int n_sets, es_error *err) {
    memset(plan, 0, sizeof *plan);
    char resolved[PATH_MAX];
    if (!realpath(path, resolved)) return es_fail(err, ES_ERR_USAGE, "%s: %s", path, strerror(errno));
    plan->pipeline_path = strdup(resolved);
    plan->dir = strdup(resolved);
    if (!plan->pipeline_path || !plan->dir) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    *strrchr(plan->dir, '/') = '\0';
    FILE *file = fopen(resolved, "rb");
    if (!file) return es_fail(err, ES_ERR_USAGE, "%s: %s", path, strerror(errno));
    yaml_parser_t parser;
    loader l;
    memset(&l, 0, sizeof l);
    l.path = path, l.err = err;
    yaml_parser_initialize(&parser);
    yaml_parser_set_input_file(&parser, file);
    int loaded = yaml_parser_load(&parser, &l.doc);
    fclose(file);
    if (!loaded) {
        int rc = es_fail(err, ES_ERR_USAGE, "%s:%lu: %s", path, (unsigned long)parser.problem_mark.line + 1,
                         parser.problem ? parser.problem : "not valid YAML");
        yaml_parser_delete(&parser);
        return rc;
    }
    yaml_parser_delete(&parser);
    int rc = ES_OK;
    yaml_node_t *root = yaml_document_get_root_node(&l.doc), *stages = NULL, *slurm = NULL;
    run_slurm defaults = {0};
    if (!root || root->type != YAML_MAPPING_NODE) rc = lfail(&l, root, "expected a mapping with \"stages\"");
    for (yaml_node_pair_t *pair = rc ? NULL : root->data.mapping.pairs.start; pair && pair < root->data.mapping.pairs.top && !rc; pair++) {
        yaml_node_t *key = yaml_document_get_node(&l.doc, pair->key);
        const char *k = scalar(key);
        if (k && !strcmp(k, "stages")) stages = yaml_document_get_node(&l.doc, pair->value);
        else if (k && !strcmp(k, "slurm")) slurm = yaml_document_get_node(&l.doc, pair->value);
        else rc = lfail(&l, key, "unknown key \"%s\" (stages, slurm)", k ? k : "?");
    }
    if (!rc && slurm) rc = read_slurm(&l, slurm, &defaults);
    if (!rc && (!stages || stages->type != YAML_MAPPING_NODE || stages->data.mapping.pairs.start == stages->data.mapping.pairs.top))
        rc = lfail(&l, stages ? stages : root, "\"stages\" must be a mapping of stage names to stages");
    int n = rc ? 0 : (int)(stages->data.mapping.pairs.top - stages->data.mapping.pairs.start);
    if (!rc && !(plan->stages = calloc((size_t)n, sizeof *plan->stages))) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    for (int i = 0; !rc && i < n; i++) {
        yaml_node_pair_t *pair = stages->data.mapping.pairs.start + i;
        yaml_node_t *name = yaml_document_get_node(&l.doc, pair->key);
        if (!scalar(name)) {
            rc = lfail(&l, name, "a stage name must be a scalar");
            break;
        }
        for (int j = 0; j < i; j++)
            if (!strcmp(plan->stages[j].name, scalar(name))) rc = lfail(&l, name, "stage %s is defined twice", scalar(name));
        plan->n_stages++;
        if (!rc) rc = read_stage(&l, name, yaml_document_get_node(&l.doc, pair->value), &defaults, &plan->stages[i], plan->dir);
    }
    yaml_document_delete(&l.doc);
    for (int i = 0; !rc && i < n_sets; i++) rc = apply_set(plan, sets[i], err);
    for (int i = 0; !rc && i < plan->n_stages; i++)
        if (params_to_args(&plan->stages[i])) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (!rc) rc = resolve(plan, err);
    for (int s = 0; !rc && s < plan->n_stages; s++)
        for (int i = 0; !rc && i < plan->stages[s].n_args; i++) {
            run_arg *arg = &plan->stages[s].args[i];
            if (arg->ref_stage < 0 || plan->stages[arg->ref_stage].shards == 1) continue;
            char *shards = input_value(plan, arg);
            if (!shards) rc = es_fail(err, ES_ERR_RUNTIME, "out of memory");
            else free(arg->value), arg->value = shards;
        }
    return rc;
}

static void free_args(run_arg *args, int n) {
    for (int i = 0; i < n; i++) free(args[i].flag), free(args[i].value), free(args[i].ref_output), free(args[i].text);
    free(args);
}

void run_plan_free(run_plan *plan) {
    for (int s = 0; plan->stages && s < plan->n_stages; s++) {
        run_stage *stage = &plan->stages[s];
        free(stage->name), free(stage->program), free(stage->reason), free(stage->shards_to_run), free(stage->deps);
        free_args(stage->args, stage->n_args), free_args(stage->outputs, stage->n_outputs);
        json_decref(stage->params);
    }
    free(plan->stages), free(plan->pipeline_path), free(plan->dir);
    memset(plan, 0, sizeof *plan);
}


char **run_stage_argv(const run_stage *stage, int shard) {
    int cap = 2 * (stage->n_args + stage->n_outputs) + 8, n = 0;
    char **argv = calloc((size_t)cap, sizeof *argv);
    if (!argv) return NULL;
    argv[n++] = strdup(stage->program);
    for (int i = 0; i < stage->n_args; i++) {
        const run_arg *arg = &stage->args[i];
        if (asprintf(&argv[n++], "--%s", arg->flag) < 0) argv[n - 1] = NULL;
        if (arg->value) argv[n++] = strdup(arg->value);
    }
    for (int i = 0; i < stage->n_outputs; i++) {
        if (asprintf(&argv[n++], "--%s", stage->outputs[i].flag) < 0) argv[n - 1] = NULL;
        argv[n++] = shard >= 0 ? run_shard_path(stage->outputs[i].value, shard, stage->shards) : strdup(stage->outputs[i].value);
    }
    if (shard >= 0) {
        argv[n++] = strdup("--shard");
        if (asprintf(&argv[n++], "%d/%d", shard, stage->shards) < 0) argv[n - 1] = NULL;
    }
    argv[n++] = strdup("--fingerprint");
    argv[n++] = strdup(stage->fingerprint);
    /* A stage runs because its fingerprint changed or its output is incomplete: essence-align then
     * starts afresh, and refuses a used --out unless told to clear it (docs/align.md). */
    const char *base = strrchr(stage->program, '/');
    if (!strcmp(base ? base + 1 : stage->program, "essence-align")) argv[n++] = strdup("--force");
    for (int i = 0; i < n; i++)
        if (!argv[i]) {
            run_free_argv(argv);
            return NULL;
        }
    return argv;
}

void run_free_argv(char **argv) {
    for (int i = 0; argv && argv[i]; i++) free(argv[i]);
    free(argv);
}

char *run_quote_argv(char *const *argv) {
    size_t size = 1;
    for (int i = 0; argv[i]; i++) size += 4 * strlen(argv[i]) + 3;
    char *out = malloc(size), *at = out;
    if (!out) return NULL;
    for (int i = 0; argv[i]; i++) {
        const char *a = argv[i];
        int plain = *a != '\0';
        for (const char *c = a; *c; c++) plain &= isalnum((unsigned char)*c) || strchr("-_./,:=+@%", *c) != NULL;
        if (i) *at++ = ' ';
        if (plain) {
            at += sprintf(at, "%s", a);
            continue;
        }
        *at++ = '\'';
        for (const char *c = a; *c; c++) {
            if (*c == '\'') at += sprintf(at, "'\\''");
            else *at++ = *c;
        }
        *at++ = '\'';
    }
    *at = '\0';
    return out;
}
