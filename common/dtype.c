#include "dtype.h"

#include <math.h>

static const struct {
    const char *name;
    size_t size;
    int is_float;
} dtype_table[ES_DT_COUNT] = {
    [ES_DT_BF16] = {"BF16", 2, 1}, [ES_DT_F16] = {"F16", 2, 1}, [ES_DT_F32] = {"F32", 4, 1},
    [ES_DT_F8_E4M3] = {"F8_E4M3", 1, 1}, [ES_DT_I64] = {"I64", 8, 0}, [ES_DT_I32] = {"I32", 4, 0},
    [ES_DT_U8] = {"U8", 1, 0},
};

size_t es_dtype_size(es_dtype dtype) { return dtype_table[dtype].size; }
const char *es_dtype_name(es_dtype dtype) { return dtype_table[dtype].name; }
int es_dtype_is_float(es_dtype dtype) { return dtype_table[dtype].is_float; }

int es_dtype_from_name(const char *name, es_dtype *out) {
    for (int i = 0; i < ES_DT_COUNT; i++) {
        if (strcmp(name, dtype_table[i].name) == 0) {
            *out = (es_dtype)i;
            return 0;
        }
    }
    return -1;
}

float es_f16_to_f32(uint16_t h) {
    int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float value;
    if (exponent == 0) value = ldexpf((float)mantissa, -24);
    else if (exponent == 31) value = mantissa ? NAN : INFINITY;
    else value = ldexpf((float)(mantissa | 0x400), exponent - 25);
    return sign ? -value : value;
}

float es_f8e4m3_to_f32(uint8_t v) {
    int sign = v >> 7, exponent = (v >> 3) & 0xf, mantissa = v & 0x7;
    float value;
    if (exponent == 15 && mantissa == 7) value = NAN;
    else if (exponent == 0) value = ldexpf((float)mantissa, -9);
    else value = ldexpf((float)(mantissa | 0x8), exponent - 10);
    return sign ? -value : value;
}

void es_bf16_to_f32_array(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = es_bf16_to_f32(src[i]);
}

void es_f32_to_bf16_array(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = es_f32_to_bf16(src[i]);
}
