/* essence-inspect's subcommands, one function each; main() in inspect.c dispatches. */
#ifndef ES_INSPECT_H
#define ES_INSPECT_H

#include "config.h"
#include "error.h"

int inspect_summary(const char *path, es_error *err);
int inspect_stats(const char *path, const es_config *cfg, es_error *err);
int inspect_tokenize(const es_config *cfg, es_error *err);
int inspect_sample(const char *path, const es_config *cfg, es_error *err);
int inspect_mkmodel(const es_config *cfg, es_error *err);

#endif
