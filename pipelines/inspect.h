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

/* "bf16", "float32", "uint8", "string (vlen)", ... and "[700, 33]": the summary's words, shared
 * with compare. */
void inspect_type_name(hid_t type, char *buf, size_t size);
void inspect_dims_text(const hsize_t *dims, int rank, char *buf, size_t size);

int inspect_summary(const char *path, es_error *err);
int inspect_stats(const char *path, const es_config *cfg, es_error *err);
int inspect_tokenize(const es_config *cfg, es_error *err);
int inspect_sample(const char *path, const es_config *cfg, es_error *err);
int inspect_mkmodel(const es_config *cfg, es_error *err);
/* compare A.h5 B.h5 [--tol X]: per dataset, differing values and error figures; ES_OK when the
 * files agree, ES_ERR_RUNTIME (exit 1) when they differ (inspect_compare.c, docs/cli.md). */
int inspect_compare(const char *path_a, const char *path_b, const es_config *cfg, es_error *err);
/* plot METRICS.jsonl --out OUT.png (-o): essence-align's curves as a PNG, drawn by gnuplot. */
int inspect_plot(const char *metrics, const es_config *cfg, es_error *err);
/* geometry STUDENT.h5 [--teacher ...]: kernel fidelity, neighbourhood overlap and CKA against their
 * shuffled nulls, and the σ sweep (inspect_geometry.c, docs/geometry.md). */
int inspect_geometry(const char *path, const es_config *cfg, es_error *err);
/* geometry --model: the checkpoint's states after each of layers[0, n_layers) at student tokens
 * tokens[0, n) of the student file, normalised as align's latent loss sees them: states[l] (n, width). */
int geometry_model_states(const char *model_dir, const char *path, hid_t file, const int64_t *tokens, int n, const int *layers,
                          int n_layers, int width, int threads, double **states, es_error *err);

#endif
