/* YAML configuration: loading a file or text into an es_config (libyaml events, anchors
 * and aliases) and printing the effective configuration back as YAML (see config.h and
 * docs/config.md). */
#include "config.h"
#include "config_internal.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

/* ---- small helpers ------------------------------------------------------------------ */

/* A growable byte string. */
typedef struct {
    char *p;
    size_t len, cap;
} sbuf;

static void sb_add(sbuf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) es_cfg_oom();
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_str(sbuf *b, const char *s) { sb_add(b, s, strlen(s)); }

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof tmp) {
        sb_add(b, tmp, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (!big) es_cfg_oom();
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    sb_add(b, big, (size_t)n);
    free(big);
}

/* Decodes one UTF-8 character of a string already checked to be valid UTF-8. */
static unsigned utf8_next(const unsigned char *s, size_t *i) {
    unsigned c = s[*i];
    if (c < 0x80) {
        (*i)++;
        return c;
    }
    size_t k = (c & 0xe0) == 0xc0 ? 1 : (c & 0xf0) == 0xe0 ? 2 : 3;
    unsigned cp = c & (k == 1 ? 0x1f : k == 2 ? 0x0f : 0x07);
    for (size_t j = 1; j <= k; j++) cp = (cp << 6) | (s[*i + j] & 0x3f);
    *i += k + 1;
    return cp;
}

/* ---- loading ---------------------------------------------------------------------------- */

enum { A_SCALAR, A_SEQUENCE, A_MAPPING };
#define MAX_VALUE (1 << 20) /* bytes in a sequence joined with ',' */

typedef struct {
    char *name;
    int kind;
    int is_null; /* a plain null scalar */
    char *text;  /* scalar text or the sequence joined with ',' */
    size_t len;
} anchor;

typedef struct {
    yaml_parser_t parser;
    const char *src;
    const char *text; /* the input, for line numbers of reader errors */
    size_t len;
    es_config *cfg;
    es_error *err;
    anchor *anchors;
    size_t n_anchors, cap_anchors;
    int failed;
} yload;

static int yfail(yload *y, const yaml_mark_t *mark, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int yfail(yload *y, const yaml_mark_t *mark, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    y->failed = 1;
    return es_fail(y->err, ES_ERR_USAGE, "%s:%lu: %s", y->src, (unsigned long)mark->line + 1, msg);
}

/* The next event; on a syntax error, fails naming libyaml's problem and its line. */
static int next_event(yload *y, yaml_event_t *ev) {
    if (yaml_parser_parse(&y->parser, ev)) return 0;
    const yaml_parser_t *p = &y->parser;
    yaml_mark_t mark = p->problem_mark;
    char where[64] = "";
    if (p->error == YAML_READER_ERROR) {
        /* Reader errors carry a byte offset, not a line: count the lines before it. */
        size_t end = p->problem_offset < y->len ? p->problem_offset : y->len;
        mark.line = 0;
        for (size_t i = 0; i < end; i++) mark.line += y->text[i] == '\n';
        if (p->problem_value >= 0)
            snprintf(where, sizeof where,
                     p->problem_value > 0xff ? " (U+%04X at offset %lu)" : " (byte 0x%02X at offset %lu)",
                     (unsigned)p->problem_value, (unsigned long)p->problem_offset);
    } else if (p->error != YAML_MEMORY_ERROR) {
        snprintf(where, sizeof where, " (column %lu)", (unsigned long)mark.column + 1);
    }
    const char *problem = p->error == YAML_MEMORY_ERROR ? "out of memory"
                          : p->problem                  ? p->problem
                                                        : "syntax error";
    char context[160] = "";
    if (p->context && p->error != YAML_READER_ERROR) {
        if (p->context_mark.line != mark.line)
            snprintf(context, sizeof context, "%s (from line %lu), ", p->context,
                     (unsigned long)p->context_mark.line + 1);
        else
            snprintf(context, sizeof context, "%s, ", p->context);
    }
    yfail(y, &mark, "invalid YAML: %s%s%s", context, problem, where);
    memset(ev, 0, sizeof *ev);
    return -1;
}

static int is_plain_null(const yaml_event_t *ev) {
    if (ev->type != YAML_SCALAR_EVENT || ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE ||
        ev->data.scalar.tag)
        return 0;
    const char *s = (const char *)ev->data.scalar.value;
    size_t n = ev->data.scalar.length;
    return n == 0 || (n == 1 && s[0] == '~') ||
           (n == 4 && (!memcmp(s, "null", 4) || !memcmp(s, "Null", 4) || !memcmp(s, "NULL", 4)));
}

static void add_anchor(yload *y, const yaml_char_t *name, int kind, int is_null, const char *text,
                       size_t len) {
    if (!name) return;
    if (y->n_anchors == y->cap_anchors) {
        size_t cap = y->cap_anchors ? 2 * y->cap_anchors : 8;
        anchor *a = realloc(y->anchors, cap * sizeof *a);
        if (!a) es_cfg_oom();
        y->anchors = a;
        y->cap_anchors = cap;
    }
    anchor *a = &y->anchors[y->n_anchors++];
    a->name = es_cfg_xstrdup((const char *)name);
    a->kind = kind;
    a->is_null = is_null;
    a->text = text ? es_cfg_xstrndup(text, len) : NULL;
    a->len = len;
}

static const anchor *find_anchor(const yload *y, const yaml_char_t *name) {
    for (size_t i = y->n_anchors; i-- > 0;) /* the latest definition wins */
        if (!strcmp(y->anchors[i].name, (const char *)name)) return &y->anchors[i];
    return NULL;
}

static int check_tag(yload *y, const yaml_event_t *ev) {
    const yaml_char_t *tag = NULL;
    if (ev->type == YAML_SCALAR_EVENT) tag = ev->data.scalar.tag;
    else if (ev->type == YAML_SEQUENCE_START_EVENT) tag = ev->data.sequence_start.tag;
    else if (ev->type == YAML_MAPPING_START_EVENT) tag = ev->data.mapping_start.tag;
    if (!tag) return 0;
    char b[ES_CFG_SHOWBUF];
    return yfail(y, &ev->start_mark, "YAML tags are not supported (%s)",
                 es_cfg_show((const char *)tag, strlen((const char *)tag), b, sizeof b));
}

/* Reads one value starting at event *first (which this function deletes): a scalar, an
 * alias of a scalar or sequence, or a sequence of those. `what` names the key in errors. */
static int read_value(yload *y, yaml_event_t *first, const char *what, sbuf *out, int *is_null) {
    *is_null = 0;
    out->len = 0;
    sb_add(out, "", 0);
    int rc = 0;
    switch (first->type) {
    case YAML_SCALAR_EVENT:
        if (check_tag(y, first)) break;
        *is_null = is_plain_null(first);
        sb_add(out, (const char *)first->data.scalar.value, first->data.scalar.length);
        add_anchor(y, first->data.scalar.anchor, A_SCALAR, *is_null, out->p, out->len);
        break;
    case YAML_ALIAS_EVENT: {
        const anchor *a = find_anchor(y, first->data.alias.anchor);
        char b[ES_CFG_SHOWBUF];
        char an[80];
        snprintf(an, sizeof an, "*%.70s", (const char *)first->data.alias.anchor);
        if (!a)
            rc = yfail(y, &first->start_mark, "undefined alias %s",
                       es_cfg_show(an, strlen(an), b, sizeof b));
        else if (a->kind == A_MAPPING)
            rc = yfail(y, &first->start_mark, "%s: an alias of a mapping is not supported", what);
        else {
            *is_null = a->is_null;
            sb_add(out, a->text, a->len);
        }
        break;
    }
    case YAML_SEQUENCE_START_EVENT: {
        if (check_tag(y, first)) break;
        yaml_char_t *seq_anchor = first->data.sequence_start.anchor;
        first->data.sequence_start.anchor = NULL; /* keep it past the delete below */
        int n = 0;
        for (;;) {
            yaml_event_t ev;
            if (next_event(y, &ev)) break;
            if (ev.type == YAML_SEQUENCE_END_EVENT) {
                yaml_event_delete(&ev);
                add_anchor(y, seq_anchor, A_SEQUENCE, 0, out->p, out->len);
                break;
            }
            if (ev.type == YAML_SCALAR_EVENT) {
                if (check_tag(y, &ev)) {
                    yaml_event_delete(&ev);
                    break;
                }
                if (n++) sb_add(out, ",", 1);
                sb_add(out, (const char *)ev.data.scalar.value, ev.data.scalar.length);
                add_anchor(y, ev.data.scalar.anchor, A_SCALAR, is_plain_null(&ev),
                           (const char *)ev.data.scalar.value, ev.data.scalar.length);
            } else if (ev.type == YAML_ALIAS_EVENT && find_anchor(y, ev.data.alias.anchor) &&
                       find_anchor(y, ev.data.alias.anchor)->kind == A_SCALAR) {
                const anchor *a = find_anchor(y, ev.data.alias.anchor);
                if (n++) sb_add(out, ",", 1);
                sb_add(out, a->text, a->len);
            } else if (ev.type == YAML_ALIAS_EVENT && !find_anchor(y, ev.data.alias.anchor)) {
                char b[ES_CFG_SHOWBUF];
                char an[80];
                snprintf(an, sizeof an, "*%.70s", (const char *)ev.data.alias.anchor);
                yfail(y, &ev.start_mark, "undefined alias %s", es_cfg_show(an, strlen(an), b, sizeof b));
            } else {
                yfail(y, &ev.start_mark,
                      "%s: a sequence may hold only scalars (nested sequences and mappings are "
                      "not supported)",
                      what);
            }
            if (!y->failed && out->len > MAX_VALUE)
                yfail(y, &ev.start_mark, "%s: the value is longer than %d bytes", what, MAX_VALUE);
            yaml_event_delete(&ev);
            if (y->failed) break;
        }
        free(seq_anchor);
        break;
    }
    case YAML_MAPPING_START_EVENT:
        rc = yfail(y, &first->start_mark, "%s: nested mappings are not supported", what);
        break;
    default:
        rc = yfail(y, &first->start_mark, "%s: unexpected YAML event", what);
        break;
    }
    yaml_event_delete(first);
    return y->failed ? ES_ERR_USAGE : rc;
}

int es_config_load_yaml(es_config *cfg, const char *yaml, size_t len, const char *source_name,
                        es_error *err) {
    yload y;
    memset(&y, 0, sizeof y);
    y.src = source_name ? source_name : "<config>";
    y.cfg = cfg;
    y.err = err;
    y.text = yaml ? yaml : "";
    y.len = yaml ? len : 0;
    if (!yaml_parser_initialize(&y.parser)) es_cfg_oom();
    yaml_parser_set_input_string(&y.parser, (const unsigned char *)(yaml ? yaml : ""),
                                 yaml ? len : 0);
    int n = cfg->n_options;
    char **pending = calloc((size_t)n + 1, sizeof *pending);
    unsigned long *key_line = calloc((size_t)n + 1, sizeof *key_line); /* 0: not seen yet */
    if (!pending || !key_line) es_cfg_oom();
    sbuf key = {0}, val = {0};
    yaml_event_t ev;
    int state = 0; /* 0 stream start, 1 document start, 2 root, 3 keys, 4 document end, 5 stream end */
    while (!y.failed && state < 6) {
        if (next_event(&y, &ev)) break;
        switch (state) {
        case 0: /* STREAM-START */
            state = 1;
            break;
        case 1: /* DOCUMENT-START, or STREAM-END for an empty file */
            if (ev.type == YAML_STREAM_END_EVENT) state = 6;
            else state = 2;
            break;
        case 2: /* the root: a mapping, or a plain null for an empty document */
            if (ev.type == YAML_MAPPING_START_EVENT) {
                if (check_tag(&y, &ev)) break;
                add_anchor(&y, ev.data.mapping_start.anchor, A_MAPPING, 0, NULL, 0);
                state = 3;
            } else if (is_plain_null(&ev) && !ev.data.scalar.anchor) {
                state = 4;
            } else {
                yfail(&y, &ev.start_mark, "expected a mapping of keys to values");
            }
            break;
        case 3: { /* a key and its value, or MAPPING-END */
            if (ev.type == YAML_MAPPING_END_EVENT) {
                state = 4;
                break;
            }
            const yaml_mark_t mark = ev.start_mark;
            int key_null;
            yaml_event_t kev = ev;
            memset(&ev, 0, sizeof ev); /* read_value deletes it */
            if (kev.type != YAML_SCALAR_EVENT && kev.type != YAML_ALIAS_EVENT) {
                yfail(&y, &mark, "a key must be a plain name");
                yaml_event_delete(&kev);
                break;
            }
            if (read_value(&y, &kev, "key", &key, &key_null)) break;
            char b[ES_CFG_SHOWBUF];
            int i = es_cfg_find_option(cfg, key.p, key.len);
            if (i < 0) {
                const char *s = es_cfg_suggest(cfg, key.p, key.len);
                char hint[160] = "";
                if (s) {
                    snprintf(hint, sizeof hint, " (did you mean \"");
                    size_t o = strlen(hint);
                    for (const char *c = s; *c && o + 4 < sizeof hint; c++) hint[o++] = *c == '-' ? '_' : *c;
                    snprintf(hint + o, sizeof hint - o, "\"?)");
                }
                yfail(&y, &mark, "unknown key %s%s", es_cfg_show(key.p, key.len, b, sizeof b), hint);
                break;
            }
            if (key_line[i]) {
                yfail(&y, &mark, "duplicate key %s (first given on line %lu)",
                      es_cfg_show(key.p, key.len, b, sizeof b), key_line[i]);
                break;
            }
            key_line[i] = (unsigned long)mark.line + 1;
            char keyname[128];
            snprintf(keyname, sizeof keyname, "%.*s", (int)(key.len < 100 ? key.len : 100), key.p);
            yaml_event_t vev;
            if (next_event(&y, &vev)) break;
            const yaml_mark_t vmark = vev.start_mark;
            int is_null;
            if (read_value(&y, &vev, keyname, &val, &is_null)) break;
            if (is_null) break; /* `key:` or `key: null` leaves the value as it was */
            const char *why;
            char *v;
            if (es_cfg_check_value(&cfg->options[i], val.p, val.len, &v, &why) != 0) {
                yfail(&y, &vmark, "%s: %s %s", keyname, es_cfg_show(val.p, val.len, b, sizeof b), why);
                break;
            }
            free(pending[i]);
            pending[i] = v;
            break;
        }
        case 4: /* DOCUMENT-END */
            state = 5;
            break;
        case 5: /* STREAM-END, or a second document */
            if (ev.type == YAML_STREAM_END_EVENT) state = 6;
            else yfail(&y, &ev.start_mark, "more than one YAML document");
            break;
        }
        yaml_event_delete(&ev);
    }
    int rc = y.failed ? (err && err->code ? err->code : ES_ERR_USAGE) : ES_OK;
    for (int i = 0; i < n; i++) {
        if (rc == ES_OK && pending[i]) es_cfg_set_value(cfg, i, pending[i], ES_SRC_FILE);
        else free(pending[i]);
    }
    free(pending);
    free(key_line);
    free(key.p);
    free(val.p);
    for (size_t i = 0; i < y.n_anchors; i++) {
        free(y.anchors[i].name);
        free(y.anchors[i].text);
    }
    free(y.anchors);
    yaml_parser_delete(&y.parser);
    return rc;
}

int es_cfg_load_file(es_config *cfg, const char *path, es_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return es_fail(err, ES_ERR_USAGE, "%s: cannot read the configuration: %s", path, strerror(errno));
    sbuf b = {0};
    char chunk[65536];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) sb_add(&b, chunk, got);
    int bad = ferror(f);
    int e = errno;
    fclose(f);
    if (bad) {
        free(b.p);
        return es_fail(err, ES_ERR_USAGE, "%s: cannot read the configuration: %s", path, strerror(e));
    }
    int rc = es_config_load_yaml(cfg, b.p ? b.p : "", b.len, path, err);
    free(b.p);
    return rc;
}

/* ---- output ------------------------------------------------------------------------------ */

static int ieq(const char *a, const char *b) { return strcasecmp(a, b) == 0; }

/* Would another YAML reader take this plain scalar as something else than a string
 * (null, bool, number; YAML 1.1 and 1.2 spellings)? */
static int looks_typed(const char *s) {
    static const char *const words[] = {"~", "null", "true", "false", "yes", "no", "on", "off",
                                        "y", "n", ".inf", "-.inf", "+.inf", ".nan"};
    for (size_t i = 0; i < sizeof words / sizeof *words; i++)
        if (ieq(s, words[i])) return 1;
    /* Numbers: integers in any base, reals, sexagesimal; "20,40" or "3 cats" are strings. */
    const char *p = s;
    if (*p == '+' || *p == '-') p++;
    if (*p == '.') p++;
    if (!isdigit((unsigned char)*p)) return 0;
    return strspn(s, "0123456789abcdefABCDEFxXoO+-._:") == strlen(s);
}

/* Can the string be written as a plain scalar that reads back as the same text? */
static int plain_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || s[n - 1] == ' ') return 0;
    unsigned char c0 = (unsigned char)s[0];
    if (!(isalnum(c0) || c0 == '_' || c0 == '.' || c0 == '/' || c0 == '+' || c0 >= 0x80 ||
          (c0 == '-' && n > 1 && s[1] != ' ')))
        return 0;
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            unsigned cp = utf8_next((const unsigned char *)s, &i);
            if (cp <= 0xa0 || cp == 0x2028 || cp == 0x2029 || cp == 0xfeff || cp == 0xfffe ||
                cp == 0xffff)
                return 0;
            continue;
        }
        if (!(isalnum(c) || strchr("_-./+,=@()^$%;", c) || (c == ' ' && s[i + 1] != ' ')))
            return 0;
        i++;
    }
    return 1;
}

/* A YAML double-quoted scalar: UTF-8 kept, characters YAML would not read as-is escaped. */
static void put_quoted(sbuf *b, const char *s) {
    sb_add(b, "\"", 1);
    size_t n = strlen(s), i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            size_t start = i;
            unsigned cp = utf8_next((const unsigned char *)s, &i);
            if (cp <= 0x9f || cp == 0x2028 || cp == 0x2029 || cp == 0xfeff || cp == 0xfffe ||
                cp == 0xffff)
                sb_printf(b, cp <= 0xff ? "\\x%02x" : "\\u%04x", cp);
            else
                sb_add(b, s + start, i - start);
            continue;
        }
        i++;
        switch (c) {
        case '"': sb_str(b, "\\\""); break;
        case '\\': sb_str(b, "\\\\"); break;
        case '\n': sb_str(b, "\\n"); break;
        case '\t': sb_str(b, "\\t"); break;
        case '\r': sb_str(b, "\\r"); break;
        default:
            if (c < 0x20 || c == 0x7f) sb_printf(b, "\\x%02x", c);
            else sb_add(b, (const char *)&c, 1);
        }
    }
    sb_add(b, "\"", 1);
}

static int listed(const char *name, const char *const *names) {
    for (; names && *names; names++)
        if (!strcmp(name, *names)) return 1;
    return 0;
}

char *es_config_to_yaml(const es_config *cfg) { return es_config_to_yaml_without(cfg, NULL); }

char *es_config_to_yaml_without(const es_config *cfg, const char *const *leave_out) {
    sbuf b = {0};
    sb_add(&b, "", 0);
    for (int i = 0; i < cfg->n_options; i++) {
        const char *v = cfg->values[i];
        if (!v || listed(cfg->options[i].name, leave_out)) continue;
        for (const char *c = cfg->options[i].name; *c; c++) sb_add(&b, *c == '-' ? "_" : c, 1);
        sb_add(&b, ": ", 2);
        int quote = !plain_ok(v) || (cfg->options[i].type == ES_OPT_STRING && looks_typed(v));
        if (quote) put_quoted(&b, v);
        else sb_str(&b, v);
        sb_add(&b, "\n", 1);
    }
    if (b.len == 0) sb_str(&b, "{}\n");
    return b.p;
}
