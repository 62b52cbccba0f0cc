/* libFuzzer target: the model.safetensors.index.json parser (common/safetensors.c). Whatever the
 * bytes: no crash, no leak; a rejection is ES_ERR_DATA naming the index (ES_ERR_RUNTIME only when
 * memory runs out); every shard of an accepted index is a plain .safetensors file name that
 * cannot leave the model folder, and the list is sorted and free of repeats. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

static const char NAME[] = "model.safetensors.index.json";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    char **shards = NULL;
    size_t n = 0;
    es_error err = {0};
    int rc = es_safetensors_index_parse(buf, size, NAME, &shards, &n, &err);
    if (rc == ES_OK) {
        if (n == 0 || shards[n]) abort();
        for (size_t k = 0; k < n; k++) {
            const char *s = shards[k];
            size_t len = strlen(s);
            if (strchr(s, '/') || strchr(s, '\\') || len < 12 || strcmp(s + len - 12, ".safetensors")) abort();
            if (k && strcmp(shards[k - 1], s) >= 0) abort();
        }
        for (size_t k = 0; k < n; k++) free(shards[k]);
        free(shards);
    } else if (shards || !((rc == ES_ERR_DATA && !strncmp(err.msg, NAME, strlen(NAME))) || rc == ES_ERR_RUNTIME)) {
        abort();
    }
    free(buf);
    return 0;
}
