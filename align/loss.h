/* essence-align's loss terms (DESIGN.md "Training objective"), forward and backward together.
 *
 * Both return SUMS over tokens, not means: the caller divides by counts taken over the whole
 * global batch (every micro-batch and rank), so data parallelism and gradient accumulation
 * give the same gradient as one big batch. `scale` multiplies the gradients written, so a
 * caller passes weight / global_count. */
#ifndef ES_ALIGN_LOSS_H
#define ES_ALIGN_LOSS_H

#include <stdint.h>

#include "threadpool.h"

/* Latent MSE of one mapped layer. For each token t with mask[t] != 0:
 *   ĥ_t = h_t / sqrt(mean_k h_t[k]² + eps)          (in double, like es_rmsnorm_forward)
 *   y_t = head ? ĥ_t @ headᵀ : ĥ_t                   (the optional learned D×D student head)
 *   e_t = mean_k (y_t[k] − target_t[k])²
 * Returns Σ_t e_t over masked tokens. When dh != NULL: dh (T, C) is written with
 * scale · ∂(Σ e_t)/∂h (zero rows where mask is 0), and dhead (C, C), when not NULL, is
 * accumulated with scale · ∂(Σ e_t)/∂head. cosine_sum (may be NULL) receives Σ_t cos(y_t, target_t)
 * over masked tokens (for eval). */
double latent_mse(float *dh,                 // (T, C) or NULL
                  float *dhead,              // (C, C) accumulated, or NULL
                  double *cosine_sum,        // or NULL
                  const float *h,            // (T, C) residual stream after the layer
                  const float *target,       // (T, C)
                  const uint8_t *mask,       // (T)
                  const float *head,         // (C, C) or NULL
                  int T, int C, float eps, float scale);

/* Next-token cross entropy through the final norm's output x and the head W:
 *   Σ over t with labels[t] >= 0 of  logsumexp(x_t Wᵀ) − (x_t Wᵀ)[labels[t]]
 * computed in chunks of rows so the (T, V) logits never exist at once (V is 151936 for the
 * real student). When dx != NULL: dx (T, C) written with scale · ∂sum/∂x (zero rows where the
 * label is -1) and dW (V, C) accumulated with scale · ∂sum/∂W. Returns 0, or -1 when out of memory. */
int cross_entropy(es_pool *pool,
                  double *loss_sum,          // out: the sum above
                  float *dx,                 // (T, C) or NULL
                  float *dW,                 // (V, C) accumulated, or NULL (only with dx NULL)
                  const float *x,            // (T, C)
                  const float *W,            // (V, C)
                  const int32_t *labels,     // (T) next token id, -1 where none
                  int T, int C, int V, float scale);

#endif
