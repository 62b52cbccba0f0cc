#include "utf8.h"

#include <stdint.h>
#include <sys/types.h>
#include <utf8proc.h>

size_t es_utf8_invalid_at(const void *s, size_t n) {
    const utf8proc_uint8_t *bytes = s;
    size_t i = 0;
    while (i < n) {
        if (bytes[i] < 0x80) { /* ASCII needs no library call */
            i++;
            continue;
        }
        utf8proc_int32_t codepoint;
        utf8proc_ssize_t length = utf8proc_iterate(bytes + i, (utf8proc_ssize_t)(n - i), &codepoint);
        if (length <= 0 || !utf8proc_codepoint_valid(codepoint)) return i;
        i += (size_t)length;
    }
    return (size_t)-1;
}
