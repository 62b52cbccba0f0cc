/* UTF-8 checks shared by every parser that must name where bad text is (utf8proc). */
#ifndef ES_UTF8_H
#define ES_UTF8_H

#include <stddef.h>

/* Byte offset of the first ill-formed UTF-8 sequence in s[0, n) (overlong forms,
 * surrogates and code points past U+10FFFF are ill-formed), or (size_t)-1 when all of it
 * is well formed. */
size_t es_utf8_invalid_at(const void *s, size_t n);

static inline int es_utf8_valid(const void *s, size_t n) { return es_utf8_invalid_at(s, n) == (size_t)-1; }

#endif
