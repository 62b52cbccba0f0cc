/* essence-inspect's subcommands, one function each; main() in inspect.c dispatches. */
#ifndef ES_INSPECT_H
#define ES_INSPECT_H

#include <hdf5.h>

#include "config.h"
#include "error.h"

/* The layer_LLL datasets of a group (/latents or /targets), in name order. */
#define INSPECT_MAX_LAYERS 256
typedef struct inspect_layers {
    char names[INSPECT_MAX_LAYERS][64];
    int count;
} inspect_layers;
int inspect_list_layers(hid_t file, const char *group_name, inspect_layers *layers); /* returns the count */

int inspect_summary(const char *path, es_error *err);
int inspect_stats(const char *path, const es_config *cfg, es_error *err);
int inspect_tokenize(const es_config *cfg, es_error *err);
int inspect_sample(const char *path, const es_config *cfg, es_error *err);
int inspect_mkmodel(const es_config *cfg, es_error *err);
/* plot METRICS.jsonl --out OUT.png (-o): essence-align's curves as a PNG, drawn by gnuplot. */
int inspect_plot(const char *metrics, const es_config *cfg, es_error *err);

#endif
