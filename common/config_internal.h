/* Private helpers shared by config.c and config_yaml.c; not part of the public API. */
#ifndef ES_CONFIG_INTERNAL_H
#define ES_CONFIG_INTERNAL_H

#include <stddef.h>
#include <string.h>

#include "config.h"
#include "error.h"

/* Prints "essence: out of memory while reading the configuration" and exits with code 1. */
void es_cfg_oom(void);
char *es_cfg_xstrndup(const char *s, size_t n); /* exits (code 1) when out of memory */
static inline char *es_cfg_xstrdup(const char *s) { return es_cfg_xstrndup(s, strlen(s)); }

/* A value for a message: quoted, control bytes escaped, cut after 60 bytes. `buf` holds
 * ES_CFG_SHOWBUF bytes; returns it. */
#define ES_CFG_SHOWBUF 320
const char *es_cfg_show(const char *s, size_t len, char *buf, size_t cap);

/* Index of the option named name[0, n) ('-' and '_' alike), or -1. */
int es_cfg_find_option(const es_config *cfg, const char *name, size_t n);
/* The option name closest to name[0, n), for "did you mean", or NULL. */
const char *es_cfg_suggest(const es_config *cfg, const char *name, size_t n);

/* Checks `text` (len bytes) against the option's type. On success *out is the value to
 * store (a new string); otherwise `why` says what is wrong, e.g. "is not an integer". */
int es_cfg_check_value(const es_option *opt, const char *text, size_t len, char **out,
                       const char **why);
/* Stores value (taking it; NULL unsets) as option i's, from src. */
void es_cfg_set_value(es_config *cfg, int i, char *value, es_value_source src);

/* Reads the YAML file at path into cfg (config_yaml.c). */
int es_cfg_load_file(es_config *cfg, const char *path, es_error *err);

#endif
