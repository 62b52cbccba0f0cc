/* The CUDA backend's C interface. Built only when nvcc is found (ES_HAVE_CUDA); every
 * function returns 0 on success or a cudaError_t code, and es_cuda_error_string names it. */
#ifndef ES_KERNELS_CUDA_H
#define ES_KERNELS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

const char *es_cuda_error_string(int code);
int es_cuda_device_count(int *count);
int es_cuda_malloc(void **ptr, size_t bytes);
int es_cuda_free(void *ptr);
int es_cuda_copy_to_device(void *dst, const void *src, size_t bytes);
int es_cuda_copy_to_host(void *dst, const void *src, size_t bytes);
int es_cuda_synchronize(void);

/* Device pointers. Same results, bit for bit, as es_bf16_to_f32 / es_f32_to_bf16 in
 * common/dtype.h (round to nearest, ties away from zero, saturating, NaN -> 0x7fff|sign). */
int es_cuda_bf16_to_f32(float *dst, const uint16_t *src, size_t n);   /* (n) <- (n) */
int es_cuda_f32_to_bf16(uint16_t *dst, const float *src, size_t n);   /* (n) <- (n) */

/* The plain attention kernel (fp32 throughout) on a CUDA device: the oracle the flash kernel
 * behind es_attention_forward is checked against (tests/gpu/test_attention_cuda.c). Arguments
 * as es_attention_forward's; dev is an es_device of kind CUDA. */
struct es_device;
int es_cuda_attention_forward_plain(struct es_device *dev, float *out, const float *q, const float *k, const float *v,
                                    const int32_t *seq_start, int n_seqs, int H, int KV, int hd);
/* The same for the backward: the plain fp32 kernels the flash backward behind
 * es_attention_backward is checked against; arguments as es_attention_backward's. */
int es_cuda_attention_backward_plain(struct es_device *dev, float *dq, float *dk, float *dv, const float *dout, const float *q,
                                     const float *k, const float *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd);

#ifdef __cplusplus
}
#endif

#endif
