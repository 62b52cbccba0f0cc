/* Command-line and YAML configuration.
 *
 * A program declares its options once, in a table; every option is a flag `--NAME` and a
 * YAML key of the same name with '-' turned into '_'. Precedence: the table's defaults <
 * `--config FILE.yaml` < flags. `--print-config` prints the effective configuration as YAML
 * and exits 0; `--help` prints usage and the table and exits 0. */
#ifndef ES_CONFIG_H
#define ES_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef enum { ES_OPT_STRING, ES_OPT_INT, ES_OPT_FLOAT, ES_OPT_BOOL } es_opt_type;

typedef struct es_option {
    const char *name;          /* flag spelling without "--", e.g. "batch-tokens" */
    es_opt_type type;          /* BOOL flags take no value on the command line ("--resume") */
    const char *default_value; /* text form; NULL: no default (unset until given) */
    const char *help;          /* one line for --help */
    /* INT and FLOAT: the values allowed, as an interval: "[1,)" (>= 1), "[0,1)", "(0,)" (> 0),
     * "[0,4096]"; a missing bound is unbounded. NULL: any value of the type. A value outside
     * is a usage error naming the option (or FILE:LINE and the key), as a value of the wrong
     * type is. */
    const char *range;
} es_option;

typedef enum { ES_SRC_UNSET, ES_SRC_DEFAULT, ES_SRC_FILE, ES_SRC_FLAG } es_value_source;

typedef struct es_config {
    const es_option *options; /* the table, terminated by an entry with name == NULL */
    int n_options;
    char **values;            /* [n_options], text form, NULL when unset */
    es_value_source *sources; /* [n_options] */
    char **positional;        /* arguments that are not options, in order */
    int n_positional;
    int print_config;         /* --print-config was given */
    int help;                 /* --help was given */
    char *config_path;        /* --config FILE, or NULL */
} es_config;

/* Parses defaults, then --config FILE (wherever it stands among the flags), then the flags.
 * Errors (exit code ES_ERR_USAGE) name the flag, or FILE:LINE for the YAML file: unknown
 * option or key, missing value, a value that is not of the option's type, a YAML document
 * that is not a mapping of scalars (a sequence of scalars is accepted and joined with ','
 * so `layers: [20, 40]` equals `--layers 20,40`). A bool accepts true/false/yes/no/on/off/1/0
 * (any case). `--` ends the options. argv[0] is skipped. With --help (or -h) anywhere before
 * `--`, it returns ES_OK with cfg->help set and the defaults only: no file is read and other
 * flags are not checked. A YAML key whose value is a plain null (`key:`, `~`, `null`) is
 * ignored. The details are in docs/config.md. */
int es_config_parse(es_config *cfg, const es_option *options, int argc, char **argv, es_error *err);

/* Parses only a YAML text (for tests and fuzzing); `source_name` names it in errors. */
int es_config_load_yaml(es_config *cfg, const char *yaml, size_t len, const char *source_name,
                        es_error *err);

/* Initialises cfg with the table's defaults (es_config_parse calls it). After es_config_parse
 * or es_config_init, call es_config_free whatever they returned (it is safe after a failure). */
int es_config_init(es_config *cfg, const es_option *options, es_error *err);
void es_config_free(es_config *cfg);

/* Getters by option name (assert that the name is in the table). Typed getters convert the
 * text already validated by the parser; *_or variants return `fallback` when unset. */
const char *es_config_str(const es_config *cfg, const char *name); /* NULL when unset */
int64_t es_config_int(const es_config *cfg, const char *name);
double es_config_float(const es_config *cfg, const char *name);
int es_config_bool(const es_config *cfg, const char *name);
int es_config_is_set(const es_config *cfg, const char *name);
/* Unset values read as NULL / 0 / 0.0 / false above; these return `fallback` instead. A
 * getter for a name not in the table, or of the wrong type (es_config_float also reads an
 * INT option), aborts: that is a programming error. */
const char *es_config_str_or(const es_config *cfg, const char *name, const char *fallback);
int64_t es_config_int_or(const es_config *cfg, const char *name, int64_t fallback);
double es_config_float_or(const es_config *cfg, const char *name, double fallback);
int es_config_bool_or(const es_config *cfg, const char *name, int fallback);
/* Sets a value as if given by a flag (validated like one); value NULL unsets it. */
int es_config_set(es_config *cfg, const char *name, const char *value, es_error *err);

/* The effective configuration as YAML (keys with '_', in table order, unset keys left out,
 * strings quoted when YAML would misread them). Caller frees. Stored in every output file. */
char *es_config_to_yaml(const es_config *cfg);
/* The same without the options named in leave_out (NULL-terminated): a fingerprint's input
 * leaves out what changes no bit of the results (ES_RESULT_NEUTRAL_OPTIONS in kernels/backend.h). */
char *es_config_to_yaml_without(const es_config *cfg, const char *const *leave_out);

/* The start every stage program's main() shares: parses the flags; with --help or --print-config
 * prints it and returns ES_CONFIG_DONE (the program exits 0); checks that every option named in
 * `required` (NULL-terminated) is set and that no positional argument is left (ES_ERR_USAGE).
 * ES_OK: go on; otherwise an error code with err set. */
#define ES_CONFIG_DONE (-1)
int es_config_start(es_config *cfg, const es_option *options, int argc, char **argv, const char *usage,
                    const char *description, const char *const *required, es_error *err);
/* Parses --shard's "I/N" strictly (decimal digits only, nothing else, 0 <= I < N <= 2^31-1):
 * 0, or -1 for anything else ("1/2x", "1/ 2", "1/2/3", "-1/2"). */
int es_parse_shard(const char *text, int *index, int *count);

/* Prints "usage: USAGE" then one line per option with its default and help. */
void es_config_print_help(const es_config *cfg, const char *usage, const char *description);

#endif
