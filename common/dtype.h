/* Element types of tensors (safetensors) and the bf16 of the HDF5 latent store.
 *
 * fp32 -> bf16 rounds as HDF5's own conversion does (docs/formats.md): to nearest, ties
 * away from zero; finite values that would round past the largest bf16 saturate to it;
 * NaN becomes the quiet NaN 0x7fff with its sign. The one known difference: HDF5 1.10
 * mis-rounds fp32 subnormals (|x| < 2^-126); we round them like every other value. */
#ifndef ES_DTYPE_H
#define ES_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum {
    ES_DT_BF16,
    ES_DT_F16,
    ES_DT_F32,
    ES_DT_F8_E4M3,
    ES_DT_I64,
    ES_DT_I32,
    ES_DT_U8,
    ES_DT_COUNT
} es_dtype;

size_t es_dtype_size(es_dtype dtype);
const char *es_dtype_name(es_dtype dtype); /* the safetensors spelling: "BF16", "F8_E4M3", ... */
/* Returns 0 and sets *out, or -1 for a name not in the list above. */
int es_dtype_from_name(const char *name, es_dtype *out);
int es_dtype_is_float(es_dtype dtype);

static inline float es_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t es_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = u & 0x80000000u, mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return (uint16_t)((sign >> 16) | 0x7fffu); /* NaN */
    if (mag == 0x7f800000u) return (uint16_t)(u >> 16);                /* +-inf */
    mag += 0x8000u;                                                    /* ties away from zero */
    if (mag >= 0x7f800000u) mag = 0x7f7f0000u;                         /* saturate, as HDF5 */
    return (uint16_t)((sign | mag) >> 16);
}

float es_f16_to_f32(uint16_t h);
float es_f8e4m3_to_f32(uint8_t v); /* e4m3fn: no infinities, 0x7f/0xff are NaN */

void es_bf16_to_f32_array(float *dst, const uint16_t *src, size_t n);
void es_f32_to_bf16_array(uint16_t *dst, const float *src, size_t n);

#endif
