/* Command-line configuration: the option table and its values, type checks, getters and
 * setters, flag parsing and --help (see config.h and docs/config.md; the YAML side is in
 * config_yaml.c).
 *
 * Values are kept as text. Every value is checked against its option's type when it is set
 * (default, file, flag or es_config_set); INT and BOOL values are stored in a normal form
 * ("+007" -> "7", "Yes" -> "true"), FLOAT and STRING values as given. */
#include "config.h"
#include "config_internal.h"
#include "utf8.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- small helpers ------------------------------------------------------------------ */

void es_cfg_oom(void) {
    /* Exit code 1, never a signal: a run out of memory is a runtime failure (docs/config.md). */
    fputs("essence: out of memory while reading the configuration\n", stderr);
    exit(ES_ERR_RUNTIME);
}

char *es_cfg_xstrndup(const char *s, size_t n) {
    char *p = malloc(n + 1);
    if (!p) es_cfg_oom();
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

const char *es_cfg_show(const char *s, size_t len, char *buf, size_t cap) {
    int raw_utf8 = es_utf8_valid(s, len); /* else bytes >= 0x80 are escaped */
    size_t o = 0;
    buf[o++] = '"';
    for (size_t i = 0; i < len && o + 8 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        if (i >= 60 && (c < 0x80 || c >= 0xc0)) { /* cut at a character boundary */
            memcpy(buf + o, "...", 3);
            o += 3;
            break;
        }
        if (c < 0x20 || c == 0x7f || (c >= 0x80 && !raw_utf8))
            o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", c);
        else if (c == '"' || c == '\\')
            o += (size_t)snprintf(buf + o, cap - o, "\\%c", c);
        else
            buf[o++] = (char)c;
    }
    buf[o++] = '"';
    buf[o] = '\0';
    return buf;
}

/* Option names compare with '-' and '_' as the same character. */
static int name_eq(const char *opt, const char *s, size_t n) {
    size_t i = 0;
    for (; i < n; i++) {
        char a = opt[i], b = s[i];
        if (a == '\0') return 0;
        if (a == '_') a = '-';
        if (b == '_') b = '-';
        if (a != b) return 0;
    }
    return opt[i] == '\0';
}

int es_cfg_find_option(const es_config *cfg, const char *name, size_t n) {
    for (int i = 0; i < cfg->n_options; i++)
        if (name_eq(cfg->options[i].name, name, n)) return i;
    return -1;
}

/* Edit distance (with '-' == '_'), for "did you mean"; large when either name is long. */
static size_t distance(const char *a, const char *b, size_t bn) {
    size_t an = strlen(a);
    if (an > 63 || bn > 63) return 99;
    size_t row[64];
    for (size_t j = 0; j <= bn; j++) row[j] = j;
    for (size_t i = 1; i <= an; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= bn; j++) {
            char x = a[i - 1] == '_' ? '-' : a[i - 1], y = b[j - 1] == '_' ? '-' : b[j - 1];
            size_t best = diag + (x != y);
            if (row[j] + 1 < best) best = row[j] + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            diag = row[j];
            row[j] = best;
        }
    }
    return row[bn];
}

const char *es_cfg_suggest(const es_config *cfg, const char *name, size_t n) {
    const char *best = NULL;
    size_t best_d = n < 4 ? 1 : n < 8 ? 2 : 3;
    for (int i = 0; i < cfg->n_options; i++) {
        size_t d = distance(cfg->options[i].name, name, n);
        if (d <= best_d && (!best || d < best_d)) {
            best = cfg->options[i].name;
            best_d = d;
        }
    }
    return best;
}

/* Checks value v (its text, already of the option's type) against opt->range. 0 when inside
 * or unbounded, 1 when outside, -1 when the range itself is malformed (a table error). */
static int outside_range(const es_option *opt, const char *text) {
    const char *r = opt->range;
    if (!r) return 0;
    size_t n = strlen(r);
    const char *comma = strchr(r, ',');
    if (n < 3 || (r[0] != '[' && r[0] != '(') || (r[n - 1] != ']' && r[n - 1] != ')') || !comma) return -1;
    int lo_open = r[0] == '(', hi_open = r[n - 1] == ')';
    const char *lo = r + 1, *hi = comma + 1;
    int has_lo = lo != comma, has_hi = hi != r + n - 1;
    char *end;
    if (opt->type == ES_OPT_INT) {
        long long v = strtoll(text, NULL, 10), a = 0, b = 0;
        if (has_lo && ((a = strtoll(lo, &end, 10)), end != comma)) return -1;
        if (has_hi && ((b = strtoll(hi, &end, 10)), end != r + n - 1)) return -1;
        return (has_lo && (lo_open ? v <= a : v < a)) || (has_hi && (hi_open ? v >= b : v > b));
    }
    if (opt->type != ES_OPT_FLOAT) return -1;
    double v = strtod(text, NULL), a = 0, b = 0;
    if (has_lo && ((a = strtod(lo, &end)), end != comma)) return -1;
    if (has_hi && ((b = strtod(hi, &end)), end != r + n - 1)) return -1;
    return (has_lo && (lo_open ? v <= a : v < a)) || (has_hi && (hi_open ? v >= b : v > b));
}

/* "is outside [0, 1)": the range as a reader writes it, for messages. */
static const char *range_why(const es_option *opt) {
    static _Thread_local char why[160];
    const char *r = opt->range, *comma = strchr(r, ',');
    size_t n = strlen(r);
    const char *lo = r + 1, *hi = comma + 1;
    int has_lo = lo != comma, has_hi = hi != r + n - 1;
    if (!has_hi) snprintf(why, sizeof why, "is out of range (expected %s %.*s)", r[0] == '(' ? ">" : ">=", (int)(comma - lo), lo);
    else if (!has_lo) snprintf(why, sizeof why, "is out of range (expected %s %.*s)", r[n - 1] == ')' ? "<" : "<=", (int)(r + n - 1 - hi), hi);
    else snprintf(why, sizeof why, "is out of range (expected a value in %c%.*s, %.*s%c)", r[0], (int)(comma - lo), lo,
                  (int)(r + n - 1 - hi), hi, r[n - 1]);
    return why;
}

int es_parse_shard(const char *text, int *index, int *count) {
    long long v[2];
    const char *p = text;
    for (int k = 0; k < 2; k++) {
        if (!isdigit((unsigned char)*p)) return -1;
        char *end;
        errno = 0;
        v[k] = strtoll(p, &end, 10);
        if (errno == ERANGE || v[k] > 2147483647LL) return -1;
        if (*end != (k == 0 ? '/' : '\0')) return -1;
        p = end + 1;
    }
    if (v[1] < 1 || v[0] >= v[1]) return -1;
    *index = (int)v[0], *count = (int)v[1];
    return 0;
}

static const char *const bool_true[] = {"true", "yes", "on", "1"};
static const char *const bool_false[] = {"false", "no", "off", "0"};

int es_cfg_check_value(const es_option *opt, const char *text, size_t len, char **out,
                       const char **why) {
    *out = NULL;
    if (memchr(text, '\0', len)) {
        *why = "contains a NUL character";
        return -1;
    }
    switch (opt->type) {
    case ES_OPT_INT: {
        if (len == 0 || isspace((unsigned char)text[0])) {
            *why = "is not an integer";
            return -1;
        }
        char *end;
        errno = 0;
        long long v = strtoll(text, &end, 10);
        if (end == text || *end != '\0') {
            *why = "is not an integer";
            return -1;
        }
        if (errno == ERANGE) {
            *why = "is out of range for a 64-bit integer";
            return -1;
        }
        char tmp[32];
        snprintf(tmp, sizeof tmp, "%lld", v);
        if (outside_range(opt, tmp)) {
            *why = outside_range(opt, tmp) < 0 ? "is checked against a malformed range" : range_why(opt);
            return -1;
        }
        *out = es_cfg_xstrdup(tmp);
        return 0;
    }
    case ES_OPT_FLOAT: {
        if (len == 0 || isspace((unsigned char)text[0])) {
            *why = "is not a number";
            return -1;
        }
        char *end;
        errno = 0;
        double v = strtod(text, &end);
        if (end == text || *end != '\0') {
            *why = "is not a number";
            return -1;
        }
        if (!isfinite(v) || (errno == ERANGE && fabs(v) > 1)) {
            *why = "is not a finite number";
            return -1;
        }
        if (outside_range(opt, text)) {
            *why = outside_range(opt, text) < 0 ? "is checked against a malformed range" : range_why(opt);
            return -1;
        }
        *out = es_cfg_xstrndup(text, len);
        return 0;
    }
    case ES_OPT_BOOL:
        for (size_t i = 0; i < 4; i++) {
            if (strcasecmp(text, bool_true[i]) == 0) {
                *out = es_cfg_xstrdup("true");
                return 0;
            }
            if (strcasecmp(text, bool_false[i]) == 0) {
                *out = es_cfg_xstrdup("false");
                return 0;
            }
        }
        *why = "is not a boolean (true/false, yes/no, on/off, 1/0)";
        return -1;
    case ES_OPT_STRING:
    default:
        if (!es_utf8_valid(text, len)) {
            *why = "is not valid UTF-8";
            return -1;
        }
        *out = es_cfg_xstrndup(text, len);
        return 0;
    }
}

void es_cfg_set_value(es_config *cfg, int i, char *value, es_value_source src) {
    free(cfg->values[i]);
    cfg->values[i] = value;
    cfg->sources[i] = value ? src : ES_SRC_UNSET;
}

/* ---- init, free, getters -------------------------------------------------------------- */

int es_config_init(es_config *cfg, const es_option *options, es_error *err) {
    memset(cfg, 0, sizeof *cfg);
    cfg->options = options;
    int n = 0;
    while (options[n].name) n++;
    cfg->n_options = n;
    cfg->values = calloc((size_t)n + 1, sizeof *cfg->values);
    cfg->sources = calloc((size_t)n + 1, sizeof *cfg->sources);
    if (!cfg->values || !cfg->sources) es_cfg_oom();
    for (int i = 0; i < n; i++) {
        const es_option *o = &options[i];
        if (!o->name[0] || strchr(o->name, '=') || es_cfg_find_option(cfg, o->name, strlen(o->name)) != i ||
            !strcmp(o->name, "config") || !strcmp(o->name, "help") ||
            !strcmp(o->name, "print-config")) {
            es_config_free(cfg);
            return es_fail(err, ES_ERR_RUNTIME, "option table: bad or repeated option name \"%s\"",
                           o->name);
        }
        if (o->range && outside_range(o, "0") < 0) {
            es_config_free(cfg);
            return es_fail(err, ES_ERR_RUNTIME, "option table: --%s: malformed range \"%s\"", o->name, o->range);
        }
        if (!o->default_value) continue;
        char *v;
        const char *why;
        if (es_cfg_check_value(o, o->default_value, strlen(o->default_value), &v, &why) != 0) {
            char b[ES_CFG_SHOWBUF];
            int rc = es_fail(err, ES_ERR_RUNTIME, "option table: default of --%s: %s %s", o->name,
                             es_cfg_show(o->default_value, strlen(o->default_value), b, sizeof b), why);
            es_config_free(cfg);
            return rc;
        }
        es_cfg_set_value(cfg, i, v, ES_SRC_DEFAULT);
    }
    return ES_OK;
}

void es_config_free(es_config *cfg) {
    if (!cfg) return;
    if (cfg->values)
        for (int i = 0; i < cfg->n_options; i++) free(cfg->values[i]);
    free(cfg->values);
    free(cfg->sources);
    for (int i = 0; i < cfg->n_positional; i++) free(cfg->positional[i]);
    free(cfg->positional);
    free(cfg->config_path);
    const es_option *options = cfg->options;
    memset(cfg, 0, sizeof *cfg);
    cfg->options = options;
}

static int lookup(const es_config *cfg, const char *name, const char *getter) {
    int i = es_cfg_find_option(cfg, name, strlen(name));
    if (i < 0) {
        fprintf(stderr, "essence: %s: no option \"%s\" in the table\n", getter, name);
        abort();
    }
    return i;
}

static void wrong_type(const es_config *cfg, int i, const char *getter) {
    fprintf(stderr, "essence: %s: option \"%s\" has another type\n", getter, cfg->options[i].name);
    abort();
}

const char *es_config_str(const es_config *cfg, const char *name) {
    return cfg->values[lookup(cfg, name, "es_config_str")];
}

const char *es_config_str_or(const es_config *cfg, const char *name, const char *fallback) {
    const char *v = cfg->values[lookup(cfg, name, "es_config_str_or")];
    return v ? v : fallback;
}

int64_t es_config_int_or(const es_config *cfg, const char *name, int64_t fallback) {
    int i = lookup(cfg, name, "es_config_int");
    if (cfg->options[i].type != ES_OPT_INT) wrong_type(cfg, i, "es_config_int");
    return cfg->values[i] ? (int64_t)strtoll(cfg->values[i], NULL, 10) : fallback;
}

int64_t es_config_int(const es_config *cfg, const char *name) {
    return es_config_int_or(cfg, name, 0);
}

double es_config_float_or(const es_config *cfg, const char *name, double fallback) {
    int i = lookup(cfg, name, "es_config_float");
    if (cfg->options[i].type != ES_OPT_FLOAT && cfg->options[i].type != ES_OPT_INT)
        wrong_type(cfg, i, "es_config_float");
    return cfg->values[i] ? strtod(cfg->values[i], NULL) : fallback;
}

double es_config_float(const es_config *cfg, const char *name) {
    return es_config_float_or(cfg, name, 0.0);
}

int es_config_bool_or(const es_config *cfg, const char *name, int fallback) {
    int i = lookup(cfg, name, "es_config_bool");
    if (cfg->options[i].type != ES_OPT_BOOL) wrong_type(cfg, i, "es_config_bool");
    return cfg->values[i] ? strcmp(cfg->values[i], "true") == 0 : fallback;
}

int es_config_bool(const es_config *cfg, const char *name) {
    return es_config_bool_or(cfg, name, 0);
}

int es_config_is_set(const es_config *cfg, const char *name) {
    return cfg->values[lookup(cfg, name, "es_config_is_set")] != NULL;
}

int es_config_set(es_config *cfg, const char *name, const char *value, es_error *err) {
    int i = es_cfg_find_option(cfg, name, strlen(name));
    if (i < 0) return es_fail(err, ES_ERR_USAGE, "unknown option --%s", name);
    if (!value) {
        es_cfg_set_value(cfg, i, NULL, ES_SRC_UNSET);
        return ES_OK;
    }
    char *v;
    const char *why;
    if (es_cfg_check_value(&cfg->options[i], value, strlen(value), &v, &why) != 0) {
        char b[ES_CFG_SHOWBUF];
        return es_fail(err, ES_ERR_USAGE, "--%s: %s %s", cfg->options[i].name,
                       es_cfg_show(value, strlen(value), b, sizeof b), why);
    }
    es_cfg_set_value(cfg, i, v, ES_SRC_FLAG);
    return ES_OK;
}

/* ---- command line ----------------------------------------------------------------------- */

static void add_positional(es_config *cfg, const char *arg) {
    char **p = realloc(cfg->positional, ((size_t)cfg->n_positional + 1) * sizeof *p);
    if (!p) es_cfg_oom();
    cfg->positional = p;
    cfg->positional[cfg->n_positional++] = es_cfg_xstrdup(arg);
}

/* A flag's value from "--name=value" or the next argument. A following argument that is
 * itself a long option ("--x") is not taken as a value: give it as --name=--x. */
static int flag_value(int argc, char **argv, int *k, const char *eq, const char *name,
                      const char **value, es_error *err) {
    if (eq) {
        *value = eq + 1;
        return ES_OK;
    }
    if (*k + 1 >= argc || (argv[*k + 1][0] == '-' && argv[*k + 1][1] == '-'))
        return es_fail(err, ES_ERR_USAGE, "--%s: missing value", name);
    *value = argv[++*k];
    return ES_OK;
}

static int is_number_like(const char *s) {
    if (*s == '-') s++;
    return isdigit((unsigned char)*s) || (*s == '.' && isdigit((unsigned char)s[1]));
}

/* One pass over argv. With apply == 0 it only finds --config and --help; with apply == 1
 * it sets the flags and collects the positional arguments. */
static int scan_args(es_config *cfg, int argc, char **argv, int apply, es_error *err) {
    for (int k = 1; k < argc; k++) {
        const char *arg = argv[k];
        if (!strcmp(arg, "--")) {
            if (apply)
                for (k++; k < argc; k++) add_positional(cfg, argv[k]);
            break;
        }
        if (!strcmp(arg, "-h")) {
            cfg->help = 1;
            continue;
        }
        if (arg[0] != '-' || !strcmp(arg, "-") || is_number_like(arg)) {
            if (apply) add_positional(cfg, arg);
            continue;
        }
        if (arg[1] != '-') return es_fail(err, ES_ERR_USAGE, "unknown option %s", arg);
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        char shown[96];
        snprintf(shown, sizeof shown, "%.*s", (int)(nlen < 80 ? nlen : 80), name);
        if (name_eq("config", name, nlen)) {
            const char *v;
            if (flag_value(argc, argv, &k, eq, "config", &v, err)) return ES_ERR_USAGE;
            if (!apply) {
                free(cfg->config_path);
                cfg->config_path = es_cfg_xstrdup(v);
            }
            continue;
        }
        if (name_eq("help", name, nlen) || name_eq("print-config", name, nlen)) {
            int on = 1;
            if (eq) {
                es_option b = {"", ES_OPT_BOOL, NULL, NULL, NULL};
                char *v;
                const char *why;
                if (es_cfg_check_value(&b, eq + 1, strlen(eq + 1), &v, &why) != 0) {
                    char sb[ES_CFG_SHOWBUF];
                    return es_fail(err, ES_ERR_USAGE, "--%s: %s %s", shown,
                                   es_cfg_show(eq + 1, strlen(eq + 1), sb, sizeof sb), why);
                }
                on = !strcmp(v, "true");
                free(v);
            }
            if (name_eq("help", name, nlen)) cfg->help = on;
            else cfg->print_config = on;
            continue;
        }
        int i = es_cfg_find_option(cfg, name, nlen);
        if (i < 0) {
            const char *s = es_cfg_suggest(cfg, name, nlen);
            if (s) return es_fail(err, ES_ERR_USAGE, "unknown option --%s (did you mean --%s?)", shown, s);
            return es_fail(err, ES_ERR_USAGE, "unknown option --%s", shown);
        }
        const es_option *o = &cfg->options[i];
        const char *v = "true";
        if (o->type != ES_OPT_BOOL || eq) {
            if (flag_value(argc, argv, &k, eq, o->name, &v, err)) return ES_ERR_USAGE;
        }
        if (apply) {
            char *nv;
            const char *why;
            if (es_cfg_check_value(o, v, strlen(v), &nv, &why) != 0) {
                char b[ES_CFG_SHOWBUF];
                return es_fail(err, ES_ERR_USAGE, "--%s: %s %s", o->name,
                               es_cfg_show(v, strlen(v), b, sizeof b), why);
            }
            es_cfg_set_value(cfg, i, nv, ES_SRC_FLAG);
        }
    }
    return ES_OK;
}

int es_config_parse(es_config *cfg, const es_option *options, int argc, char **argv, es_error *err) {
    int rc = es_config_init(cfg, options, err);
    if (rc) return rc;
    es_error scan_err = {0};
    int scan_rc = scan_args(cfg, argc, argv, 0, &scan_err);
    if (!scan_rc && cfg->help) return ES_OK;
    if (scan_rc) {
        /* --help anywhere still shows the help, even next to a bad flag. */
        for (int k = 1; k < argc && strcmp(argv[k], "--"); k++)
            if (!strcmp(argv[k], "--help") || !strcmp(argv[k], "-h")) {
                cfg->help = 1;
                return ES_OK;
            }
        return es_fail(err, scan_err.code, "%s", scan_err.msg);
    }
    if (cfg->config_path && (rc = es_cfg_load_file(cfg, cfg->config_path, err))) return rc;
    return scan_args(cfg, argc, argv, 1, err);
}

static const char *placeholder(es_opt_type t) {
    switch (t) {
    case ES_OPT_INT: return " N";
    case ES_OPT_FLOAT: return " X";
    case ES_OPT_BOOL: return "";
    case ES_OPT_STRING:
    default: return " VALUE";
    }
}

void es_config_print_help(const es_config *cfg, const char *usage, const char *description) {
    printf("usage: %s\n", usage ? usage : "");
    if (description && *description) printf("\n%s\n", description);
    printf("\noptions:\n");
    int width = (int)strlen("--print-config");
    for (int i = 0; i < cfg->n_options; i++) {
        int w = (int)(2 + strlen(cfg->options[i].name) + strlen(placeholder(cfg->options[i].type)));
        if (w > width) width = w;
    }
    if (width > 30) width = 30;
    for (int i = 0; i < cfg->n_options; i++) {
        const es_option *o = &cfg->options[i];
        char left[256];
        snprintf(left, sizeof left, "--%s%s", o->name, placeholder(o->type));
        printf("  %-*s   %s", width, left, o->help ? o->help : "");
        if (o->default_value) printf("%s(default: %s)", o->help && *o->help ? " " : "", o->default_value);
        if (o->range) printf(" (range %s)", o->range);
        printf("\n");
    }
    printf("  %-*s   %s\n", width, "--config FILE", "read options from a YAML file (flags override it)");
    printf("  %-*s   %s\n", width, "--print-config", "print the effective configuration as YAML and exit");
    printf("  %-*s   %s\n", width, "--help", "show this help and exit");
}

int es_config_start(es_config *cfg, const es_option *options, int argc, char **argv, const char *usage,
                    const char *description, const char *const *required, es_error *err) {
    int rc = es_config_parse(cfg, options, argc, argv, err);
    if (rc) return rc;
    if (cfg->help) {
        es_config_print_help(cfg, usage, description);
        return ES_CONFIG_DONE;
    }
    if (cfg->print_config) {
        char *yaml = es_config_to_yaml(cfg);
        fputs(yaml ? yaml : "", stdout);
        free(yaml);
        return ES_CONFIG_DONE;
    }
    for (int i = 0; required && required[i]; i++)
        if (!es_config_is_set(cfg, required[i])) return es_fail(err, ES_ERR_USAGE, "--%s is required\nusage: %s", required[i], usage);
    if (cfg->n_positional) return es_fail(err, ES_ERR_USAGE, "unexpected argument \"%s\"", cfg->positional[0]);
    return ES_OK;
}
