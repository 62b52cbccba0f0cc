/* libFuzzer: arbitrary bytes as a tokenizer.json. Loading either fails with a data error
 * naming the file or gives a tokenizer that encodes and decodes a fixed text. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    es_error err = {0};
    es_tokenizer *tok = NULL;
    int rc = es_tokenizer_load_json((const char *)data, size, "fuzz.json", &tok, &err);
    if (rc) {
        if (rc != ES_ERR_DATA && rc != ES_ERR_RUNTIME) abort();
        if (rc == ES_ERR_DATA && !strstr(err.msg, "fuzz.json")) abort();
        return 0;
    }
    static const char text[] = "The <s> cat\xe2\x80\x99s caf\xc3\xa9  2024!\n\xf0\x9f\xa4\x97";
    es_encoding encoding = {0};
    if (es_tokenizer_encode(tok, text, sizeof text - 1, 1, &encoding, &err) == ES_OK) {
        char *decoded = NULL;
        size_t len = 0;
        for (size_t i = 0; i < encoding.n; i++)
            if (encoding.spans[i][1] > (int32_t)(sizeof text - 1)) abort();
        if (es_tokenizer_decode(tok, encoding.ids, encoding.n, &decoded, &len, &err) == ES_OK) free(decoded);
    }
    es_encoding_free(&encoding);
    es_tokenizer_free(tok);
    return 0;
}
