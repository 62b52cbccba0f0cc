/* Configuration: defaults < --config FILE < flags, YAML forms and errors (with FILE:LINE),
 * type checks, bool flags, positional arguments and "--", help, and the YAML printer's
 * quoting (every value must read back unchanged). */
#include <stdarg.h>
#include <unistd.h>

#include "config.h"
#include "../testlib.h"

static const es_option OPTS[] = {
    {"model", ES_OPT_STRING, NULL, "model folder", NULL},
    {"layers", ES_OPT_STRING, "20", "layers to capture", NULL},
    {"batch-tokens", ES_OPT_INT, "4096", "tokens per batch", NULL},
    {"lr", ES_OPT_FLOAT, "0.001", "learning rate", NULL},
    {"resume", ES_OPT_BOOL, "false", "resume from the last checkpoint", NULL},
    {"no-shuffle", ES_OPT_BOOL, "false", "keep the data order", NULL},
    {"template", ES_OPT_STRING, NULL, "prompt template", NULL},
    {"threads", ES_OPT_INT, NULL, "worker threads", NULL},
    {NULL, 0, NULL, NULL, NULL},
};

#ifdef SHOW_MESSAGES
#define SHOW(err) printf("  message: %s\n", (err).msg)
#else
#define SHOW(err) ((void)0)
#endif

static int contains(const char *msg, const char *sub) { return strstr(msg, sub) != NULL; }

static char *write_file(const char *name, const char *text) {
    char *path = test_path(name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(text, 1, strlen(text), f) != strlen(text) || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
    return path;
}

/* Parses "prog" + the NULL-terminated arguments. */
static int parse(es_config *cfg, es_error *err, ...) {
    char *argv[64];
    int argc = 0;
    argv[argc++] = "prog";
    va_list ap;
    va_start(ap, err);
    char *a;
    while ((a = va_arg(ap, char *)) && argc < 63) argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    es_error_clear(err);
    return es_config_parse(cfg, OPTS, argc, argv, err);
}

/* Loads a YAML text named "config.yaml" into a fresh configuration. */
static int load(es_config *cfg, es_error *err, const char *yaml) {
    es_error_clear(err);
    if (es_config_init(cfg, OPTS, err)) return err->code;
    return es_config_load_yaml(cfg, yaml, strlen(yaml), "config.yaml", err);
}

static int str_eq(const char *a, const char *b) { return a && b && !strcmp(a, b); }

/* ---- precedence ------------------------------------------------------------------------ */

TEST(defaults) {
    es_config cfg;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, NULL) == ES_OK);
    CHECK(str_eq(es_config_str(&cfg, "layers"), "20"));
    CHECK(es_config_int(&cfg, "batch-tokens") == 4096);
    CHECK(es_config_float(&cfg, "lr") == 0.001);
    CHECK(es_config_bool(&cfg, "resume") == 0);
    CHECK(!es_config_is_set(&cfg, "model"));
    CHECK(es_config_str(&cfg, "model") == NULL);
    CHECK(es_config_int(&cfg, "threads") == 0);
    CHECK(es_config_int_or(&cfg, "threads", 7) == 7);
    CHECK(str_eq(es_config_str_or(&cfg, "model", "m"), "m"));
    CHECK(es_config_float_or(&cfg, "lr", 5.0) == 0.001);
    CHECK(es_config_bool_or(&cfg, "resume", 1) == 0);
    CHECK(cfg.sources[1] == ES_SRC_DEFAULT && cfg.sources[0] == ES_SRC_UNSET);
    CHECK(cfg.n_options == 8 && cfg.n_positional == 0 && !cfg.help && !cfg.print_config);
    CHECK(cfg.config_path == NULL);
    /* The '_' spelling finds the same option. */
    CHECK(es_config_int(&cfg, "batch_tokens") == 4096);
    es_config_free(&cfg);
}

TEST(file_overrides_default) {
    char *path = write_file("over.yaml", "# comment\nbatch_tokens: 8192\nlr: 1e-4\nmodel: /m/x\n");
    es_config cfg;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, "--config", path, NULL) == ES_OK);
    CHECK(es_config_int(&cfg, "batch-tokens") == 8192);
    CHECK(es_config_float(&cfg, "lr") == 1e-4);
    CHECK(str_eq(es_config_str(&cfg, "model"), "/m/x"));
    CHECK(str_eq(es_config_str(&cfg, "layers"), "20"));
    CHECK(cfg.sources[2] == ES_SRC_FILE && cfg.sources[1] == ES_SRC_DEFAULT);
    CHECK(str_eq(cfg.config_path, path));
    es_config_free(&cfg);
}

TEST(flag_overrides_file_wherever_config_stands) {
    char *path = write_file("prec.yaml", "batch_tokens: 8192\nthreads: 3\n");
    for (int order = 0; order < 3; order++) {
        es_config cfg;
        es_error err = {0};
        int rc;
        if (order == 0) rc = parse(&cfg, &err, "--batch-tokens", "100", "--config", path, NULL);
        else if (order == 1) rc = parse(&cfg, &err, "--config", path, "--batch-tokens", "100", NULL);
        else {
            char arg[1100];
            snprintf(arg, sizeof arg, "--config=%s", path);
            rc = parse(&cfg, &err, "--batch-tokens=100", arg, NULL);
        }
        CHECKF(rc == ES_OK, "order %d: %s", order, err.msg);
        CHECKF(es_config_int(&cfg, "batch-tokens") == 100, "order %d", order);
        CHECKF(es_config_int(&cfg, "threads") == 3, "order %d", order);
        CHECK(cfg.sources[2] == ES_SRC_FLAG && cfg.sources[7] == ES_SRC_FILE);
        es_config_free(&cfg);
    }
}

TEST(key_equals_value) {
    es_config cfg;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, "--model=/a=b", "--threads=4", "--lr=2.5", "--template=", NULL) == ES_OK);
    CHECK(str_eq(es_config_str(&cfg, "model"), "/a=b"));
    CHECK(es_config_int(&cfg, "threads") == 4);
    CHECK(es_config_float(&cfg, "lr") == 2.5);
    CHECK(str_eq(es_config_str(&cfg, "template"), ""));
    es_config_free(&cfg);
    /* The '_' spelling of a flag is accepted too; the later flag wins. */
    REQUIRE(parse(&cfg, &err, "--batch_tokens", "7", "--batch-tokens", "8", NULL) == ES_OK);
    CHECK(es_config_int(&cfg, "batch-tokens") == 8);
    es_config_free(&cfg);
}

TEST(bools) {
    es_config cfg;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, "--resume", "--no-shuffle", NULL) == ES_OK);
    CHECK(es_config_bool(&cfg, "resume") == 1);
    CHECK(es_config_bool(&cfg, "no-shuffle") == 1);
    CHECK(cfg.n_positional == 0);
    es_config_free(&cfg);

    /* A bool flag takes no value: the next word is positional. */
    REQUIRE(parse(&cfg, &err, "--resume", "false", NULL) == ES_OK);
    CHECK(es_config_bool(&cfg, "resume") == 1);
    CHECK(cfg.n_positional == 1 && str_eq(cfg.positional[0], "false"));
    es_config_free(&cfg);

    const char *spell_true[] = {"true", "True", "YES", "on", "1"};
    const char *spell_false[] = {"false", "FALSE", "no", "Off", "0"};
    for (int i = 0; i < 5; i++) {
        char a[64], b[64];
        snprintf(a, sizeof a, "--resume=%s", spell_true[i]);
        snprintf(b, sizeof b, "--no-shuffle=%s", spell_false[i]);
        REQUIRE(parse(&cfg, &err, a, b, NULL) == ES_OK);
        CHECKF(es_config_bool(&cfg, "resume") == 1, "%s", a);
        CHECKF(es_config_bool(&cfg, "no-shuffle") == 0, "%s", b);
        /* Stored in the normal form. */
        CHECK(str_eq(es_config_str(&cfg, "resume"), "true"));
        es_config_free(&cfg);
    }
    /* --no-NAME is not a negation: "--no-resume" is an unknown option. */
    CHECK(parse(&cfg, &err, "--no-resume", NULL) == ES_ERR_USAGE);
    CHECK(contains(err.msg, "unknown option --no-resume"));
    SHOW(err);
    es_config_free(&cfg);
    CHECK(parse(&cfg, &err, "--resume=maybe", NULL) == ES_ERR_USAGE);
    CHECK(contains(err.msg, "--resume: \"maybe\" is not a boolean"));
    SHOW(err);
    es_config_free(&cfg);

    REQUIRE(load(&cfg, &err, "resume: Yes\nno_shuffle: off\n") == ES_OK);
    CHECK(es_config_bool(&cfg, "resume") == 1 && es_config_bool(&cfg, "no-shuffle") == 0);
    es_config_free(&cfg);
    CHECK(load(&cfg, &err, "resume: yes\nno_shuffle: 2\n") == ES_ERR_USAGE);
    CHECK(contains(err.msg, "config.yaml:2:") && contains(err.msg, "not a boolean"));
    SHOW(err);
    es_config_free(&cfg);
}

TEST(sequences) {
    const char *forms[] = {"layers: [20, 40]\n", "layers:\n  - 20\n  - 40\n", "layers: 20,40\n",
                           "layers: ['20', \"40\"]\n", "layers: &l [20, 40]\nmodel: *l\n"};
    for (int i = 0; i < 5; i++) {
        es_config cfg;
        es_error err = {0};
        CHECKF(load(&cfg, &err, forms[i]) == ES_OK, "%s: %s", forms[i], err.msg);
        CHECKF(str_eq(es_config_str(&cfg, "layers"), "20,40"), "form %d: %s", i,
               es_config_str(&cfg, "layers"));
        es_config_free(&cfg);
    }
    es_config cfg;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, "--layers", "20,40", NULL) == ES_OK);
    CHECK(str_eq(es_config_str(&cfg, "layers"), "20,40"));
    es_config_free(&cfg);
    /* An empty sequence is the empty string; a sequence for an INT option must be one integer. */
    REQUIRE(load(&cfg, &err, "layers: []\n") == ES_OK);
    CHECK(str_eq(es_config_str(&cfg, "layers"), ""));
    es_config_free(&cfg);
    CHECK(load(&cfg, &err, "threads: [1, 2]\n") == ES_ERR_USAGE);
    CHECK(contains(err.msg, "config.yaml:1: threads: \"1,2\" is not an integer"));
    SHOW(err);
    es_config_free(&cfg);
    CHECK(load(&cfg, &err, "layers:\n  - 20\n  - [40]\n") == ES_ERR_USAGE);
    CHECK(contains(err.msg, "config.yaml:3:") && contains(err.msg, "only scalars"));
    SHOW(err);
    es_config_free(&cfg);
    CHECK(load(&cfg, &err, "layers:\n  - 20\n  - a: 1\n") == ES_ERR_USAGE);
    CHECK(contains(err.msg, "config.yaml:3:"));
    SHOW(err);
    es_config_free(&cfg);
}

/* ---- errors ---------------------------------------------------------------------------- */

TEST(unknown_key_names_line) {
    es_config cfg;
    es_error err = {0};
    CHECK(load(&cfg, &err, "model: m\n\n# comment\nbatch_tokns: 5\n") == ES_ERR_USAGE);
    CHECKF(contains(err.msg, "config.yaml:4: unknown key \"batch_tokns\""), "%s", err.msg);
    CHECK(contains(err.msg, "did you mean \"batch_tokens\""));
    SHOW(err);
    /* A failed load leaves the configuration as it was. */
    CHECK(es_config_str(&cfg, "model") == NULL);
    es_config_free(&cfg);

    char *path = write_file("unknown.yaml", "threads: 2\nlayers: 20\nfoo: 1\n");
    CHECK(parse(&cfg, &err, "--config", path, NULL) == ES_ERR_USAGE);
    char want[1100];
    snprintf(want, sizeof want, "%s:3: unknown key \"foo\"", path);
    CHECKF(contains(err.msg, want), "%s", err.msg);
    es_config_free(&cfg);

    CHECK(parse(&cfg, &err, "--batch-tokns", "5", NULL) == ES_ERR_USAGE);
    CHECKF(contains(err.msg, "unknown option --batch-tokns (did you mean --batch-tokens?)"), "%s", err.msg);
    SHOW(err);
    es_config_free(&cfg);
    CHECK(parse(&cfg, &err, "-x", NULL) == ES_ERR_USAGE);
    CHECK(contains(err.msg, "unknown option -x"));
    es_config_free(&cfg);
}

TEST(type_errors) {
    struct {
        const char *flag, *value, *msg;
    } cases[] = {
        {"threads", "abc", "--threads: \"abc\" is not an integer"},
        {"threads", "5x", "--threads: \"5x\" is not an integer"},
        {"threads", "", "--threads: \"\" is not an integer"},
        {"threads", " 5", "is not an integer"},
        {"threads", "1.5", "is not an integer"},
        {"threads", "99999999999999999999", "is out of range"},
        {"lr", "abc", "--lr: \"abc\" is not a number"},
        {"lr", "1e999", "is not a finite number"},
        {"lr", "nan", "is not a finite number"},
        {"lr", "inf", "is not a finite number"},
        {"lr", "1.5.2", "is not a number"},
        {"model", "\xff\xfe", "is not valid UTF-8"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        es_config cfg;
        es_error err = {0};
        char flag[64];
        snprintf(flag, sizeof flag, "--%s", cases[i].flag);
        CHECKF(parse(&cfg, &err, flag, cases[i].value, NULL) == ES_ERR_USAGE, "%s %s", flag, cases[i].value);
        CHECKF(contains(err.msg, cases[i].msg), "%s", err.msg);
        SHOW(err);
        es_config_free(&cfg);
    }
    es_config cfg;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, "--threads", "-3", "--lr", "-1e-3", NULL) == ES_OK);
    CHECK(es_config_int(&cfg, "threads") == -3 && es_config_float(&cfg, "lr") == -1e-3);
    es_config_free(&cfg);
    REQUIRE(parse(&cfg, &err, "--threads", "+007", NULL) == ES_OK);
    CHECK(str_eq(es_config_str(&cfg, "threads"), "7")); /* the normal form */
    es_config_free(&cfg);

    CHECK(load(&cfg, &err, "model: m\nthreads: 1.5\n") == ES_ERR_USAGE);
    CHECKF(contains(err.msg, "config.yaml:2: threads: \"1.5\" is not an integer"), "%s", err.msg);
    SHOW(err);
    es_config_free(&cfg);
    CHECK(load(&cfg, &err, "model: \"a\\0b\"\n") == ES_ERR_USAGE);
    CHECK(contains(err.msg, "config.yaml:1:") && contains(err.msg, "NUL"));
    SHOW(err);
    es_config_free(&cfg);
}

TEST(missing_values) {
    es_config cfg;
    es_error err = {0};
    CHECK(parse(&cfg, &err, "--threads", NULL) == ES_ERR_USAGE);
    CHECK(contains(err.msg, "--threads: missing value"));
    es_config_free(&cfg);
    CHECK(parse(&cfg, &err, "--model", "--resume", NULL) == ES_ERR_USAGE);
    CHECK(contains(err.msg, "--model: missing value"));
    es_config_free(&cfg);
    CHECK(parse(&cfg, &err, "--config", NULL) == ES_ERR_USAGE);
    CHECK(contains(err.msg, "--config: missing value"));
    es_config_free(&cfg);
    /* A value that starts with "--" can be given with '='. */
    REQUIRE(parse(&cfg, &err, "--template=--x", NULL) == ES_OK);
    CHECK(str_eq(es_config_str(&cfg, "template"), "--x"));
    es_config_free(&cfg);
}

TEST(yaml_structure_errors) {
    struct {
        const char *yaml, *msg;
    } cases[] = {
        {"model: m\nlayers:\n  a: 1\n", "config.yaml:3: layers: nested mappings are not supported"},
        {"- a\n- b\n", "config.yaml:1: expected a mapping"},
        {"just text\n", "config.yaml:1: expected a mapping"},
        {"model: a\n---\nmodel: b\n", "config.yaml:2: more than one YAML document"},
        {"model: !!str a\n", "config.yaml:1: YAML tags are not supported"},
        {"!!map\nmodel: a\n", "config.yaml:1: YAML tags are not supported"},
        {"base: &b\n  x: 1\n", "config.yaml:1: unknown key \"base\""},
        {"model: a\nthreads: 2\nmodel: b\n", "config.yaml:3: duplicate key \"model\" (first given on line 1)"},
        {"batch_tokens: 1\nbatch-tokens: 2\n", "config.yaml:2: duplicate key \"batch-tokens\""},
        {"model: *nothing\n", "config.yaml:1: undefined alias"},
        {"model: [a\nthreads: 2\n", "config.yaml:"},
        {"model: a\n  threads: 2\n", "config.yaml:2: invalid YAML"},
        {"model: \"a\x01\"\n", "config.yaml:1: invalid YAML: control characters are not allowed"},
        {"model: a\nlayers: \xff\n", "config.yaml:2: invalid YAML"},
        {"? [a, b]\n: c\n", "config.yaml:1: a key must be a plain name"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        es_config cfg;
        es_error err = {0};
        CHECKF(load(&cfg, &err, cases[i].yaml) == ES_ERR_USAGE, "case %zu", i);
        CHECKF(contains(err.msg, cases[i].msg), "case %zu: %s", i, err.msg);
        SHOW(err);
        es_config_free(&cfg);
    }
    /* An alias of a mapping: the document's own root. */
    es_config cfg;
    es_error err = {0};
    CHECK(load(&cfg, &err, "&root\nmodel: *root\n") == ES_ERR_USAGE);
    CHECKF(contains(err.msg, "config.yaml:2: model: an alias of a mapping"), "%s", err.msg);
    es_config_free(&cfg);
}

TEST(yaml_accepted_forms) {
    es_config cfg;
    es_error err = {0};
    const char *empties[] = {"", "\n\n", "# only a comment\n", "---\n", "--- ~\n...\n", "{}\n", "null\n"};
    for (int i = 0; i < 7; i++) {
        CHECKF(load(&cfg, &err, empties[i]) == ES_OK, "%d: %s", i, err.msg);
        CHECK(es_config_int(&cfg, "batch-tokens") == 4096 && !es_config_is_set(&cfg, "model"));
        es_config_free(&cfg);
    }
    /* A null value leaves the option as it was; "~" quoted is a string. */
    REQUIRE(load(&cfg, &err, "batch_tokens:\nmodel: ~\ntemplate: \"~\"\nthreads: null\n") == ES_OK);
    CHECK(es_config_int(&cfg, "batch-tokens") == 4096 && !es_config_is_set(&cfg, "model"));
    CHECK(str_eq(es_config_str(&cfg, "template"), "~") && !es_config_is_set(&cfg, "threads"));
    es_config_free(&cfg);
    /* Flow mapping, '-' spelling, scalar anchors and aliases, a document marker, CRLF. */
    REQUIRE(load(&cfg, &err, "{batch-tokens: 12, model: &m x}") == ES_OK);
    CHECK(es_config_int(&cfg, "batch-tokens") == 12 && str_eq(es_config_str(&cfg, "model"), "x"));
    es_config_free(&cfg);
    REQUIRE(load(&cfg, &err, "---\r\nmodel: &m abc\r\ntemplate: *m\r\n...\r\n") == ES_OK);
    CHECK(str_eq(es_config_str(&cfg, "template"), "abc"));
    es_config_free(&cfg);
    /* Block scalars, quotes and escapes. */
    REQUIRE(load(&cfg, &err, "template: |\n  line 1\n  line 2\nmodel: 'it''s'\nlayers: \"\\u00e9\\t\"\n") == ES_OK);
    CHECK(str_eq(es_config_str(&cfg, "template"), "line 1\nline 2\n"));
    CHECK(str_eq(es_config_str(&cfg, "model"), "it's"));
    CHECK(str_eq(es_config_str(&cfg, "layers"), "\xc3\xa9\t"));
    es_config_free(&cfg);
}

TEST(unreadable_config_file) {
    es_config cfg;
    es_error err = {0};
    char *path = test_path("does-not-exist.yaml");
    CHECK(parse(&cfg, &err, "--config", path, NULL) == ES_ERR_USAGE);
    CHECK(contains(err.msg, path) && contains(err.msg, "cannot read"));
    SHOW(err);
    es_config_free(&cfg);
    /* A folder is not readable as a file either. */
    CHECK(parse(&cfg, &err, "--config", (char *)test_tmpdir(), NULL) == ES_ERR_USAGE);
    CHECK(contains(err.msg, test_tmpdir()));
    SHOW(err);
    es_config_free(&cfg);
}

/* ---- positional, "--", help -------------------------------------------------------------- */

TEST(positional_args) {
    es_config cfg;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, "in.h5", "--threads", "2", "out", "-", "-5", "--resume", "x", NULL) == ES_OK);
    REQUIRE(cfg.n_positional == 5);
    CHECK(str_eq(cfg.positional[0], "in.h5") && str_eq(cfg.positional[1], "out"));
    CHECK(str_eq(cfg.positional[2], "-") && str_eq(cfg.positional[3], "-5") && str_eq(cfg.positional[4], "x"));
    CHECK(es_config_int(&cfg, "threads") == 2 && es_config_bool(&cfg, "resume"));
    es_config_free(&cfg);
}

TEST(double_dash) {
    char *path = write_file("dd.yaml", "threads: 9\n");
    es_config cfg;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, "--threads", "2", "--", "--resume", "--config", path, "x", NULL) == ES_OK);
    CHECK(es_config_int(&cfg, "threads") == 2);
    CHECK(!es_config_bool(&cfg, "resume"));
    CHECK(cfg.config_path == NULL);
    REQUIRE(cfg.n_positional == 4);
    CHECK(str_eq(cfg.positional[0], "--resume") && str_eq(cfg.positional[3], "x"));
    es_config_free(&cfg);
    /* After "--", even --help is an argument. */
    REQUIRE(parse(&cfg, &err, "--", "--help", NULL) == ES_OK);
    CHECK(!cfg.help && cfg.n_positional == 1);
    es_config_free(&cfg);
}

/* Runs es_config_print_help with stdout sent to a file; returns the text (static). */
static const char *capture_help(const es_config *cfg) {
    static char text[8192];
    char *path = test_path("help.txt");
    fflush(stdout);
    int saved = dup(1);
    FILE *f = fopen(path, "w");
    if (!f || saved < 0) return "";
    dup2(fileno(f), 1);
    es_config_print_help(cfg, "prog [options] FILE", "Does things.");
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    fclose(f);
    f = fopen(path, "r");
    size_t n = fread(text, 1, sizeof text - 1, f);
    text[n] = '\0';
    fclose(f);
    return text;
}

TEST(help_flag) {
    es_config cfg;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, "--help", NULL) == ES_OK);
    CHECK(cfg.help == 1);
    es_config_free(&cfg);
    REQUIRE(parse(&cfg, &err, "-h", NULL) == ES_OK);
    CHECK(cfg.help == 1);
    es_config_free(&cfg);
    /* --help wins over a bad flag and an unreadable config file. */
    REQUIRE(parse(&cfg, &err, "--bogus", "--help", NULL) == ES_OK);
    CHECK(cfg.help == 1);
    es_config_free(&cfg);
    REQUIRE(parse(&cfg, &err, "--config", "/nonexistent.yaml", "--help", NULL) == ES_OK);
    CHECK(cfg.help == 1);
    es_config_free(&cfg);
    REQUIRE(parse(&cfg, &err, "--print-config", "--threads", "3", NULL) == ES_OK);
    CHECK(cfg.print_config == 1 && !cfg.help);
    es_config_free(&cfg);

    REQUIRE(es_config_init(&cfg, OPTS, &err) == ES_OK);
    const char *text = capture_help(&cfg);
    CHECKF(!strncmp(text, "usage: prog [options] FILE\n", 27), "%s", text);
    CHECK(contains(text, "Does things."));
    CHECKF(contains(text, "  --batch-tokens N  ") && contains(text, "tokens per batch (default: 4096)"), "%s", text);
    CHECK(contains(text, "  --model VALUE  ") && contains(text, "  --lr X  "));
    CHECK(contains(text, "  --resume   ") || contains(text, "  --resume  "));
    CHECK(contains(text, "--config FILE") && contains(text, "--print-config") && contains(text, "--help"));
    CHECK(!contains(text, "model folder (default"));
    es_config_free(&cfg);
}

/* ---- es_config_set, bad tables ----------------------------------------------------------- */

TEST(set_and_table_errors) {
    es_config cfg;
    es_error err = {0};
    REQUIRE(es_config_init(&cfg, OPTS, &err) == ES_OK);
    CHECK(es_config_set(&cfg, "threads", "12", &err) == ES_OK && es_config_int(&cfg, "threads") == 12);
    CHECK(cfg.sources[7] == ES_SRC_FLAG);
    CHECK(es_config_set(&cfg, "threads", "x", &err) == ES_ERR_USAGE);
    CHECK(contains(err.msg, "--threads: \"x\" is not an integer"));
    CHECK(es_config_int(&cfg, "threads") == 12);
    es_error_clear(&err);
    CHECK(es_config_set(&cfg, "nope", "1", &err) == ES_ERR_USAGE && contains(err.msg, "nope"));
    CHECK(es_config_set(&cfg, "layers", NULL, &err) == ES_OK && !es_config_is_set(&cfg, "layers"));
    CHECK(cfg.sources[1] == ES_SRC_UNSET);
    es_config_free(&cfg);

    static const es_option bad_default[] = {{"n", ES_OPT_INT, "ten", "", NULL}, {NULL, 0, NULL, NULL, NULL}};
    es_error_clear(&err);
    CHECK(es_config_init(&cfg, bad_default, &err) == ES_ERR_RUNTIME);
    CHECK(contains(err.msg, "--n") && contains(err.msg, "not an integer"));
    es_config_free(&cfg);
    static const es_option twice[] = {{"a-b", ES_OPT_INT, NULL, "", NULL}, {"a_b", ES_OPT_INT, NULL, "", NULL}, {NULL, 0, NULL, NULL, NULL}};
    es_error_clear(&err);
    CHECK(es_config_init(&cfg, twice, &err) == ES_ERR_RUNTIME);
    es_config_free(&cfg);
}

/* ---- printing and round trips ------------------------------------------------------------ */

TEST(to_yaml_form) {
    es_config cfg;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, "--template", "yes", "--model", "/data/m 1", "--no-shuffle", "--lr", "1e-4", NULL) == ES_OK);
    char *y = es_config_to_yaml(&cfg);
    const char *want = "model: /data/m 1\n"
                       "layers: \"20\"\n"
                       "batch_tokens: 4096\n"
                       "lr: 1e-4\n"
                       "resume: false\n"
                       "no_shuffle: true\n"
                       "template: \"yes\"\n";
    CHECKF(str_eq(y, want), "got:\n%s", y);
    free(y);
    es_config_free(&cfg);

    static const es_option none[] = {{"a", ES_OPT_STRING, NULL, "", NULL}, {NULL, 0, NULL, NULL, NULL}};
    REQUIRE(es_config_init(&cfg, none, &err) == ES_OK);
    y = es_config_to_yaml(&cfg);
    CHECK(str_eq(y, "{}\n"));
    es_config c2;
    REQUIRE(es_config_init(&c2, none, &err) == ES_OK);
    CHECK(es_config_load_yaml(&c2, y, strlen(y), "p", &err) == ES_OK && !es_config_is_set(&c2, "a"));
    free(y);
    es_config_free(&c2);
    es_config_free(&cfg);
}

TEST(to_yaml_round_trip) {
    const char *tricky[] = {
        "yes", "No", "ON", "y", "", " lead", "trail ", "a: b", "a:b", "a:", "#x", "a #b", "a#b",
        "1e5", "0x1F", "0o17", "1_000", ".5", "-.5", "+1", "-1", "1:20", ".inf", "-.Inf", ".NaN",
        "null", "Null", "~", "- x", "-", "-x", "--", "---", "...", "? x", "?x", ": x", "[a]", "{a}",
        "a, b", "&a", "*a", "!t", "%x", "@x", "`x", "|x", ">x", "'x'", "\"x\"", "it's", "<<", "=",
        "a\\b", "line\nbreak", "tab\there", "cr\r", "\x01\x1f\x7f", "Gr\xc3\xbc\xc3\x9f" "e \xe2\x9c\x93 \xf0\x9f\x98\x80",
        "\xc2\x85nel", "\xc2\xa0nbsp", "x\xe2\x80\xa8y", "\xef\xbb\xbf" "bom", "\xef\xbf\xbe", "a  b",
        "hello world", "/path/to/file.h5", "{{text}}", "C:\\dir", "\xc2\x80", "\xe2\x80\xa9",
    };
    for (size_t i = 0; i < sizeof tricky / sizeof *tricky; i++) {
        es_config cfg, back;
        es_error err = {0};
        REQUIRE(es_config_init(&cfg, OPTS, &err) == ES_OK);
        CHECKF(es_config_set(&cfg, "template", tricky[i], &err) == ES_OK, "%zu: %s", i, err.msg);
        CHECK(es_config_set(&cfg, "model", tricky[i], &err) == ES_OK);
        char *y = es_config_to_yaml(&cfg);
        REQUIRE(es_config_init(&back, OPTS, &err) == ES_OK);
        int rc = es_config_load_yaml(&back, y, strlen(y), "printed.yaml", &err);
        CHECKF(rc == ES_OK, "value %zu: %s\n%s", i, err.msg, y);
        for (int k = 0; rc == ES_OK && k < cfg.n_options; k++) {
            const char *a = cfg.values[k], *b = back.values[k];
            CHECKF((!a && !b) || str_eq(a, b), "value %zu, option %s: \"%s\" came back as \"%s\"\n%s", i,
                   OPTS[k].name, a ? a : "(unset)", b ? b : "(unset)", y);
        }
        free(y);
        es_config_free(&back);
        es_config_free(&cfg);
    }
    /* Values that need no quotes are printed plain. */
    es_config cfg;
    es_error err = {0};
    REQUIRE(es_config_init(&cfg, OPTS, &err) == ES_OK);
    REQUIRE(es_config_set(&cfg, "template", "Gr\xc3\xbc\xc3\x9f" "e", &err) == ES_OK);
    REQUIRE(es_config_set(&cfg, "model", "a: b", &err) == ES_OK);
    char *y = es_config_to_yaml(&cfg);
    CHECKF(contains(y, "template: Gr\xc3\xbc\xc3\x9f" "e\n") && contains(y, "model: \"a: b\"\n"), "%s", y);
    free(y);
    es_config_free(&cfg);
}

TEST(round_trip_all_types) {
    es_config cfg, back;
    es_error err = {0};
    REQUIRE(parse(&cfg, &err, "--threads=-12", "--lr", "6.02e23", "--resume", "--layers", "20,40,60", "--model",
                  "m", NULL) == ES_OK);
    char *y = es_config_to_yaml(&cfg);
    REQUIRE(es_config_init(&back, OPTS, &err) == ES_OK);
    REQUIRE(es_config_load_yaml(&back, y, strlen(y), "p.yaml", &err) == ES_OK);
    CHECK(es_config_int(&back, "threads") == -12 && es_config_float(&back, "lr") == 6.02e23);
    CHECK(es_config_bool(&back, "resume") && str_eq(es_config_str(&back, "layers"), "20,40,60"));
    CHECK(!es_config_is_set(&back, "template"));
    free(y);
    es_config_free(&back);
    es_config_free(&cfg);
}

/* Ranges in the table: inside is fine, outside is a usage error naming the option (flag) or the
 * key and FILE:LINE (YAML); a malformed range is a table error. es_parse_shard is strict. */
TEST(ranges_and_shards) {
    static const es_option ranged[] = {{"beta", ES_OPT_FLOAT, "0.9", "", "[0,1)"},
                                       {"eps", ES_OPT_FLOAT, "1e-8", "", "(0,)"},
                                       {"count", ES_OPT_INT, "1", "", "[1,2147483647]"},
                                       {"threads", ES_OPT_INT, "0", "", "[0,4096]"},
                                       {NULL, 0, NULL, NULL, NULL}};
    static const struct {
        const char *flag, *value;
        int ok;
    } cases[] = {{"--beta", "0", 1},       {"--beta", "0.999", 1}, {"--beta", "1", 0},         {"--beta", "-0.1", 0},
                 {"--beta", "1e999", 0},   {"--beta", "nan", 0},   {"--eps", "0", 0},          {"--eps", "1e-300", 1},
                 {"--count", "0", 0},      {"--count", "1", 1},    {"--count", "2147483648", 0}, {"--count", "9223372036854775808", 0},
                 {"--threads", "-1", 0},   {"--threads", "4096", 1}, {"--threads", "4097", 0}, {"--count", "12abc", 0}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        es_config cfg;
        es_error err = {0};
        char *argv[] = {"prog", (char *)cases[i].flag, (char *)cases[i].value, NULL};
        int rc = es_config_parse(&cfg, ranged, 3, argv, &err);
        CHECKF(cases[i].ok ? rc == ES_OK : rc == ES_ERR_USAGE && contains(err.msg, cases[i].flag), "case %zu: %s %s: %d %s", i,
               cases[i].flag, cases[i].value, rc, err.msg);
        es_config_free(&cfg);
    }
    es_config cfg;
    es_error err = {0};
    REQUIRE(es_config_init(&cfg, ranged, &err) == ES_OK);
    const char *yaml = "beta: 0.5\ncount: 0\n";
    CHECKF(es_config_load_yaml(&cfg, yaml, strlen(yaml), "c.yaml", &err) == ES_ERR_USAGE && contains(err.msg, "c.yaml:2") &&
               contains(err.msg, "count") && contains(err.msg, "out of range"),
           "%s", err.msg);
    es_config_free(&cfg);
    static const es_option malformed[] = {{"n", ES_OPT_INT, NULL, "", "[1;2]"}, {NULL, 0, NULL, NULL, NULL}};
    es_error_clear(&err);
    CHECK(es_config_init(&cfg, malformed, &err) == ES_ERR_RUNTIME && contains(err.msg, "malformed range"));
    es_config_free(&cfg);
    int index = -1, count = -1;
    CHECK(es_parse_shard("0/1", &index, &count) == 0 && index == 0 && count == 1);
    CHECK(es_parse_shard("63/64", &index, &count) == 0 && index == 63 && count == 64);
    static const char *const bad_shards[] = {"1/2x", "1/2/3", "1/2.5", "1/ 2", " 1/2", "-1/2", "+1/2", "2/2", "1/0", "1", "/2",
                                             "1/", "", "99999999999/99999999999"};
    for (size_t i = 0; i < sizeof bad_shards / sizeof *bad_shards; i++)
        CHECKF(es_parse_shard(bad_shards[i], &index, &count) == -1, "\"%s\"", bad_shards[i]);
}

int main(void) {
    RUN(ranges_and_shards);
    RUN(defaults);
    RUN(file_overrides_default);
    RUN(flag_overrides_file_wherever_config_stands);
    RUN(key_equals_value);
    RUN(bools);
    RUN(sequences);
    RUN(unknown_key_names_line);
    RUN(type_errors);
    RUN(missing_values);
    RUN(yaml_structure_errors);
    RUN(yaml_accepted_forms);
    RUN(unreadable_config_file);
    RUN(positional_args);
    RUN(double_dash);
    RUN(help_flag);
    RUN(set_and_table_errors);
    RUN(to_yaml_form);
    RUN(to_yaml_round_trip);
    RUN(round_trip_all_types);
    return test_summary();
}
