/* libFuzzer target: the config.json parser (common/model.c). Whatever the bytes: no crash, no
 * leak, no undefined behaviour; a rejection is ES_ERR_DATA naming "config.json" (or
 * ES_ERR_RUNTIME when memory runs out); an accepted configuration satisfies every invariant the
 * model code relies on (positive sizes, dividing head counts, an even head_dim, a finite positive
 * RoPE base and norm epsilon, ordered llama3 factors), and its RoPE frequencies are finite. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    es_model_config c;
    es_error err = {0};
    int rc = es_model_config_parse(buf, size, "config.json", &c, &err);
    if (rc == ES_OK) {
        if (c.vocab_size < 1 || c.hidden_size < 1 || c.intermediate_size < 1 || c.n_layers < 1 || c.n_heads < 1 ||
            c.n_kv_heads < 1 || c.n_heads % c.n_kv_heads || c.head_dim < 2 || c.head_dim % 2 || c.max_position_embeddings < 1)
            abort();
        if (!(c.rope_theta > 0) || !isfinite(c.rope_theta) || !(c.rms_norm_eps > 0) || !isfinite(c.rms_norm_eps)) abort();
        if (c.rope_llama3 && (!(c.rope_factor > 0) || !(c.rope_low_freq_factor > 0) ||
                              !(c.rope_high_freq_factor > c.rope_low_freq_factor) || c.rope_original_max_position < 1))
            abort();
        if (c.head_dim <= 4096) {
            double inv_freq[2048];
            es_rope_inv_freq(&c, inv_freq);
            for (int i = 0; i < c.head_dim / 2; i++)
                if (!isfinite(inv_freq[i]) || inv_freq[i] < 0) abort();
        }
    } else if (!((rc == ES_ERR_DATA && !strncmp(err.msg, "config.json", 11)) || rc == ES_ERR_RUNTIME)) {
        abort();
    }
    free(buf);
    return 0;
}
