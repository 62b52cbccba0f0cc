/* The ops of a decoder layer, CPU backend (fp32, the reference the CUDA backend is tested
 * against). Outputs first, shapes in comments: T tokens, C model width, H query heads,
 * KV key/value heads, hd head size, I MLP width. */
#ifndef ES_KERNELS_OPS_H
#define ES_KERNELS_OPS_H

#include <stdint.h>

#include "threadpool.h"

void es_embedding_forward(float *out,             // (T, C)
                          const int32_t *ids,     // (T)
                          const float *table,     // (V, C)
                          int T, int C);

/* y = x / sqrt(mean(x^2) + eps) * weight, the mean taken in double. */
void es_rmsnorm_forward(float *out,               // (T, C)
                        const float *in,          // (T, C)
                        const float *weight,      // (C)
                        int T, int C, float eps);

/* out = in @ weight^T + bias (OpenBLAS sgemm; small products split over the pool's workers,
 * pool may be NULL). Returns 0, or -1 when out of memory. */
int es_matmul_forward(es_pool *pool,
                      float *out,                 // (T, OC)
                       const float *in,           // (T, C)
                       const float *weight,       // (OC, C)
                       const float *bias,         // (OC) or NULL
                       int T, int C, int OC);

/* Rotary embedding in place, Hugging Face's rotate-half convention; angles in double. */
void es_rope_forward(float *x,                    // (T, n_heads, hd)
                     const int32_t *positions,    // (T)
                     const double *inv_freq,      // (hd / 2)
                     int T, int n_heads, int hd);

/* The rotation itself; `inverse` rotates by the opposite angles (the backward of the forward). */
void es_rope_rotate(float *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd, int inverse);

/* Causal attention within each sequence (tokens [seq_start[s], seq_start[s+1]) see only
 * their own sequence); query head h reads key/value head h / (H / KV) in place. */
int es_attention_forward(es_pool *pool,            /* 0, or -1 when out of memory */
                          float *out,             // (T, H, hd)
                          const float *q,         // (T, H, hd)
                          const float *k,         // (T, KV, hd)
                          const float *v,         // (T, KV, hd)
                          const int32_t *seq_start, // (n_seqs + 1)
                          int n_seqs, int H, int KV, int hd);

/* out = silu(gate) * up */
void es_swiglu_forward(float *out,                // (n)
                       const float *gate,         // (n)
                       const float *up,           // (n)
                       long n);

/* x += y */
void es_residual_forward(float *x,                // (n)
                         const float *y,          // (n)
                         long n);

#endif
