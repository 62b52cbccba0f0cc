/* essence-inspect: opens every file essence writes (and the models it reads).
 *
 *   essence-inspect FILE.h5                  summary: format, samples, tokens, datasets, attributes
 *   essence-inspect FILE.safetensors | DIR   the tensors of a checkpoint (sharded or not)
 *   essence-inspect stats FILE.h5 [--layer L]
 *   essence-inspect sample FILE.h5 --index I
 *   essence-inspect compare A.h5 B.h5 [--tol X]
 *   essence-inspect mkmodel --like CONFIG.json [--layers N] [--hidden N] [--seed N] --out DIR
 *   essence-inspect tokenize --tokenizer DIR_OR_JSON [--jsonl FILE] [--add-special-tokens] [--decode]
 *   essence-inspect plot METRICS.jsonl -o OUT.png
 *   essence-inspect geometry STUDENT.h5 [--teacher T.h5,...] [--rows N] [--pairs N] [--k K] [--sigma-sweep] [--json]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "config.h"
#include "inspect.h"
#include "inspect_safetensors.h"
#include "log.h"

static const char usage[] =
    "essence-inspect FILE.h5 | FILE.safetensors | MODEL_DIR\n"
    "       essence-inspect stats FILE.h5 [--layer L] [--threads N]\n"
    "       essence-inspect sample FILE.h5 --index I\n"
    "       essence-inspect compare A.h5 B.h5 [--tol X] [--threads N]\n"
    "       essence-inspect mkmodel --like CONFIG.json [--layers N] [--hidden N] [--seed N] --out DIR\n"
    "       essence-inspect tokenize --tokenizer DIR_OR_JSON [--jsonl FILE] [--add-special-tokens] [--add-bos MODE] [--decode]\n"
    "       essence-inspect plot METRICS.jsonl -o OUT.png\n"
    "       essence-inspect geometry STUDENT.h5 [--teacher T.h5,...] [--model DIR] [--layer S] [--rows N] [--pairs N] [--k K] [--seed N]\n"
    "                                [--sigma-sweep] [--json]";

static const char description[] =
    "Shows what an essence file holds. FILE.h5: format, samples, tokens, every dataset's shape, type,\n"
    "chunking and compression ratio, and the attributes. A .safetensors file or a model folder: its tensors.\n"
    "stats: per latent layer, the distribution of row norms (percentiles), per-dimension mean and std\n"
    "extremes, and the count of NaN/Inf values.\n"
    "compare: every dataset of two HDF5 files (B is the reference): \"identical\" when bit-equal, else the\n"
    "count of differing values, max abs and max relative error (per row: |a-b|/max(|a|,|b|), L2) and\n"
    "normalised MSE sum (a-b)^2 / sum b^2. Exit 0 when every dataset is identical or, with --tol X, every\n"
    "float dataset has max rel <= X and the same NaN/Inf positions (integers and strings: equal); 1 otherwise.\n"
    "Root attributes that differ (created, ...) are listed, not counted.\n"
    "tokenize: JSONL {\"text\": ...} lines (or plain text lines on stdin) -> {\"ids\": [...], \"byte_offsets\": [[s, e], ...]};\n"
    "with --decode, {\"ids\": [...]} -> {\"text\": ...}.\n"
    "plot: essence-align's metrics.jsonl as a PNG (loss terms and eval MSEs; learning rate), drawn by gnuplot.\n"
    "geometry: how well a student.h5's targets keep its teacher's geometry, per layer pair, on a seeded sample of\n"
    "aligned rows: kernel fidelity (t.t'/D against exp(-sigma^2 |x^-x^'|^2/(2d)), measured error beside the error\n"
    "random-feature theory predicts), mutual k-NN overlap and linear CKA between x^ and t beside their values with\n"
    "the rows shuffled (chance), the best input-independent MSEs; --sigma-sweep: the same for sigma 0.25 ... 8.\n"
    "The teacher files default to the \"in\" the student file's config records. docs/geometry.md.";

static const es_option options[] = {
    {"layer", ES_OPT_INT, NULL, "stats: only this layer (default: every layer in the file); geometry: only this student layer", "[0,)"},
    {"index", ES_OPT_INT, NULL, "sample: the sample to show (0-based)", "[0,)"},
    {"like", ES_OPT_STRING, NULL, "mkmodel: the config.json whose shape to copy", NULL},
    {"layers", ES_OPT_INT, NULL, "mkmodel: number of decoder layers (default: the config's)", "[1,1073741824]"},
    {"hidden", ES_OPT_INT, NULL, "mkmodel: hidden size (default: the config's)", "[1,1073741824]"},
    {"seed", ES_OPT_INT, "0", "mkmodel: random seed of the weights; geometry: seed of the row and pair sample", NULL},
    {"out", ES_OPT_STRING, NULL, "mkmodel: the folder to write; plot: the PNG to write (-o for short)", NULL},
    {"threads", ES_OPT_INT, "0", "decompression (and compare) threads (0: one per CPU)", "[0,4096]"},
    {"tol", ES_OPT_FLOAT, NULL, "compare: the largest max relative error that still agrees (default: identical only)", "[0,)"},
    {"tokenizer", ES_OPT_STRING, NULL, "tokenize: a tokenizer.json, or a model folder holding one", NULL},
    {"jsonl", ES_OPT_STRING, NULL, "tokenize: read JSONL lines from FILE (default: plain text lines on stdin)", NULL},
    {"add-special-tokens", ES_OPT_BOOL, "false", "tokenize: add the post-processor's specials (BOS)", NULL},
    {"add-bos", ES_OPT_STRING, "auto", "tokenize: auto, always or never: whether the specials start with the BOS (docs/tokenizer.md)", NULL},
    {"decode", ES_OPT_BOOL, "false", "tokenize: read {\"ids\": [...]} lines and write {\"text\": ...}", NULL},
    {"teacher", ES_OPT_STRING, NULL, "geometry: the teacher.h5 (or its shards in order, a.h5,b.h5) (default: the student file's recorded --in)", NULL},
    {"rows", ES_OPT_INT, "2000", "geometry: aligned rows (distinct teacher rows) sampled for the neighbourhoods and pairs", "[3,100000]"},
    {"pairs", ES_OPT_INT, "2000", "geometry: random pairs of sampled rows for kernel fidelity", "[1,100000000]"},
    {"k", ES_OPT_INT, "10", "geometry: neighbours per row for the k-NN overlap", "[1,10000]"},
    {"sigma-sweep", ES_OPT_BOOL, "false", "geometry: also a table over sigma 0.25 ... 8 (overlap, CKA, input-independent MSEs)", NULL},
    {"json", ES_OPT_BOOL, "false", "geometry: print one JSON document instead of the tables", NULL},
    {"model", ES_OPT_STRING, NULL, "geometry: a student checkpoint whose hidden states to compare with the targets (and the teacher)", NULL},
    {NULL, 0, NULL, NULL, NULL},
};

static int is_directory(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int ends_with(const char *text, const char *suffix) {
    size_t n = strlen(text), m = strlen(suffix);
    return n >= m && strcmp(text + n - m, suffix) == 0;
}

/* DESIGN.md spells plot's output "-o OUT.png"; the option parser knows long flags only, so
 * "-o" (before any "--") becomes "--out". Returns a new argv, or NULL when out of memory. */
static char **expand_short_out(int argc, char **argv) {
    static char long_out[] = "--out";
    char **args = malloc(((size_t)argc + 1) * sizeof *args);
    if (!args) return NULL;
    int options_end = 0;
    for (int k = 0; k < argc; k++) {
        if (!strcmp(argv[k], "--")) options_end = 1;
        args[k] = k > 0 && !options_end && !strcmp(argv[k], "-o") ? long_out : argv[k];
    }
    args[argc] = NULL;
    return args;
}

int main(int argc, char **argv) {
    es_set_program("essence-inspect");
    es_config cfg;
    es_error err = {0};
    char **args = expand_short_out(argc, argv);
    if (!args) {
        es_fail(&err, ES_ERR_RUNTIME, "out of memory");
        es_exit_error(&err);
    }
    if (es_config_parse(&cfg, options, argc, args, &err)) es_exit_error(&err);
    free(args);
    if (cfg.help) {
        es_config_print_help(&cfg, usage, description);
        es_config_free(&cfg);
        return 0;
    }
    if (cfg.print_config) {
        char *yaml = es_config_to_yaml(&cfg);
        fputs(yaml ? yaml : "", stdout);
        free(yaml);
        es_config_free(&cfg);
        return 0;
    }
    int rc;
    const char *command = cfg.n_positional > 0 ? cfg.positional[0] : NULL;
    if (!command) {
        rc = es_fail(&err, ES_ERR_USAGE, "no file given\nusage: %s", usage);
    } else if (strcmp(command, "stats") == 0) {
        rc = cfg.n_positional == 2 ? inspect_stats(cfg.positional[1], &cfg, &err)
                                   : es_fail(&err, ES_ERR_USAGE, "usage: essence-inspect stats FILE.h5 [--layer L]");
    } else if (strcmp(command, "sample") == 0) {
        rc = cfg.n_positional == 2 ? inspect_sample(cfg.positional[1], &cfg, &err)
                                   : es_fail(&err, ES_ERR_USAGE, "usage: essence-inspect sample FILE.h5 --index I");
    } else if (strcmp(command, "compare") == 0) {
        rc = cfg.n_positional == 3 ? inspect_compare(cfg.positional[1], cfg.positional[2], &cfg, &err)
                                   : es_fail(&err, ES_ERR_USAGE, "usage: essence-inspect compare A.h5 B.h5 [--tol X]");
    } else if (strcmp(command, "mkmodel") == 0) {
        rc = cfg.n_positional == 1 ? inspect_mkmodel(&cfg, &err) : es_fail(&err, ES_ERR_USAGE, "mkmodel takes no file argument");
    } else if (strcmp(command, "tokenize") == 0) {
        rc = cfg.n_positional == 1 ? inspect_tokenize(&cfg, &err)
                                   : es_fail(&err, ES_ERR_USAGE, "tokenize takes no file argument (use --jsonl FILE)");
    } else if (strcmp(command, "plot") == 0) {
        rc = cfg.n_positional == 2 ? inspect_plot(cfg.positional[1], &cfg, &err)
                                   : es_fail(&err, ES_ERR_USAGE, "usage: essence-inspect plot METRICS.jsonl -o OUT.png");
    } else if (strcmp(command, "geometry") == 0) {
        rc = cfg.n_positional == 2 ? inspect_geometry(cfg.positional[1], &cfg, &err)
                                   : es_fail(&err, ES_ERR_USAGE, "usage: essence-inspect geometry STUDENT.h5 [--teacher T.h5,...]");
    } else if (cfg.n_positional != 1) {
        rc = es_fail(&err, ES_ERR_USAGE, "unknown command \"%s\"\nusage: %s", command, usage);
    } else if (ends_with(command, ".safetensors") || is_directory(command)) {
        rc = inspect_safetensors(command, &err);
    } else {
        rc = inspect_summary(command, &err);
    }
    es_config_free(&cfg);
    if (rc) es_exit_error(&err);
    return 0;
}
