/* Backward passes of the ops in kernels/ops.h, CPU backend (fp32). Outputs first, shapes in
 * comments (T tokens, C width, H query heads, KV key/value heads, hd head size, I MLP width,
 * OC output width).
 *
 * Conventions: a gradient named d<x> for an activation input is WRITTEN (overwritten) unless the
 * comment says "accumulated"; gradients of parameters (weights, biases, tables) are always
 * ACCUMULATED (+=), so micro-batches and layers can add into one gradient arena. Every function
 * that allocates returns 0, or -1 when out of memory.
 *
 * The results are the same bits whatever the pool's size or OpenBLAS's thread count: the
 * products run single-threaded on fixed tiles, side by side on the pool (pool may be NULL:
 * then on the calling thread alone, slowly). */
#ifndef ES_KERNELS_OPS_BACKWARD_H
#define ES_KERNELS_OPS_BACKWARD_H

#include <stdint.h>

#include "threadpool.h"

/* dtable[ids[t]] += dout[t] */
void es_embedding_backward(float *dtable,           // (V, C) accumulated
                           const int32_t *ids,      // (T)
                           const float *dout,       // (T, C)
                           int T, int C);

/* Forward: y = x / sqrt(mean(x^2) + eps) * weight. din written, dweight accumulated. */
void es_rmsnorm_backward(float *din,                // (T, C)
                         float *dweight,            // (C) accumulated
                         const float *dout,         // (T, C)
                         const float *in,           // (T, C) the forward input x
                         const float *weight,       // (C)
                         int T, int C, float eps);

/* Forward: out = in @ weight^T + bias. din written (NULL: not needed), dweight accumulated,
 * dbias accumulated (NULL when there is no bias). */
int es_matmul_backward(es_pool *pool,
                       float *din,                  // (T, C) or NULL
                       float *dweight,              // (OC, C) accumulated
                       float *dbias,                // (OC) accumulated, or NULL
                       const float *dout,           // (T, OC)
                       const float *in,             // (T, C)
                       const float *weight,         // (OC, C)
                       int T, int C, int OC);

/* Rotary embedding backward in place: dx (the gradient w.r.t. the rotated x) becomes the
 * gradient w.r.t. the unrotated x (rotation by the opposite angle). */
void es_rope_backward(float *dx,                    // (T, n_heads, hd)
                      const int32_t *positions,     // (T)
                      const double *inv_freq,       // (hd / 2)
                      int T, int n_heads, int hd);

/* Causal attention backward (the forward's probabilities are recomputed from q and k).
 * q, k are the rotated ones the forward used. dq, dk, dv written. */
int es_attention_backward(es_pool *pool,
                          float *dq,                // (T, H, hd)
                          float *dk,                // (T, KV, hd)
                          float *dv,                // (T, KV, hd)
                          const float *dout,        // (T, H, hd)
                          const float *q,           // (T, H, hd)
                          const float *k,           // (T, KV, hd)
                          const float *v,           // (T, KV, hd)
                          const int32_t *seq_start, // (n_seqs + 1)
                          int n_seqs, int H, int KV, int hd);

/* Forward: out = silu(gate) * up. dgate and dup written (they may not alias dout). */
void es_swiglu_backward(float *dgate,               // (n)
                        float *dup,                 // (n)
                        const float *dout,          // (n)
                        const float *gate,          // (n)
                        const float *up,            // (n)
                        long n);

#endif
