/* The ops of the seam (kernels/backend.h): every piece of math the stages run, on whichever
 * device they opened. Outputs first, shapes in comments: T tokens, C width, OC output width,
 * H query heads, KV key/value heads, hd head size, I MLP width, V vocabulary, n elements.
 *
 * Every pointer is device memory unless its comment says "host". Every op returns ES_OK or an
 * error code (the message: es_device_take_error). What each op computes, and what a backend
 * must promise about it (precision, determinism, aliasing), is in docs/engine.md; the CPU
 * backend (kernels/cpu/) is the reference the others are checked against, op by op
 * (tests/unit/test_ops.c, tests/gpu/).
 *
 * Gradient conventions: a gradient d<x> of an activation is WRITTEN (overwritten); gradients of
 * parameters (weights, biases, tables, heads) are ACCUMULATED (+=), so micro-batches and layers
 * can add into one gradient arena. */
#ifndef ES_KERNELS_OPS_H
#define ES_KERNELS_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "dtype.h"

/* ---- decoder layer, forward ------------------------------------------------------------ */

/* out[t] = table[ids[t]]. The table is device memory in the device's weight format
 * (dtype == dev->weight_dtype), or (any float dtype) a host mapping of the checkpoint, which a
 * backend reads row by row. */
int es_embedding_forward(es_device *dev,
                         float *out,              // (T, C)
                         const int32_t *ids,      // (T)
                         const void *table,       // (V, C) of `dtype`
                         es_dtype dtype, int T, int C);

/* out = in / sqrt(mean(in²) + eps) * weight (the mean in double). out may alias in. */
int es_rmsnorm_forward(es_device *dev,
                       float *out,                // (T, C)
                       const float *in,           // (T, C)
                       const void *weight,        // (C) in dev->weight_dtype
                       int T, int C, float eps);

/* out = in @ weightᵀ + bias, weight and bias in dev->weight_dtype (fp32 on the CPU, bf16 on
 * CUDA, whose products take bf16 inputs with fp32 accumulation). A token's row does not depend on how many other tokens share the
 * call (fixed blocks of rows; docs/engine.md says where that holds bit for bit). */
int es_matmul_forward(es_device *dev,
                      float *out,                 // (T, OC)
                      const float *in,            // (T, C)
                      const void *weight,         // (OC, C) in dev->weight_dtype
                      const void *bias,           // (OC) in dev->weight_dtype, or NULL
                      int T, int C, int OC);

/* Rotary embedding in place, Hugging Face's rotate-half convention; angles in double. */
int es_rope_forward(es_device *dev,
                    float *x,                     // (T, n_heads, hd)
                    const int32_t *positions,     // (T)
                    const double *inv_freq,       // (hd / 2)
                    int T, int n_heads, int hd);

/* Causal attention within each sequence: tokens [seq_start[s], seq_start[s+1]) see only their
 * own sequence's earlier tokens; query head h reads key/value head h / (H / KV). */
int es_attention_forward(es_device *dev,
                         float *out,              // (T, H, hd)
                         const float *q,          // (T, H, hd) after RoPE
                         const float *k,          // (T, KV, hd) after RoPE
                         const float *v,          // (T, KV, hd)
                         const int32_t *seq_start, // (n_seqs + 1)
                         int n_seqs, int H, int KV, int hd);

/* Attention over a key/value cache, for generation. Sequence s of the batch, tokens
 * [seq_start[s], seq_start[s+1]), continues the past[s] tokens whose keys and values are rows
 * [0, past[s]) of cache slot slot[s]: its own keys and values are first written to rows
 * past[s].. of that slot, then its i-th token (position past[s] + i) attends to rows
 * 0..past[s] + i. With every past[s] = 0 this is es_attention_forward. past[s] + the sequence's
 * length is at most max_seq; no two sequences share a slot. */
int es_attention_cached_forward(es_device *dev,
                                float *out,             // (T, H, hd)
                                float *k_cache,         // (slots, max_seq, KV, hd) rows written
                                float *v_cache,         // (slots, max_seq, KV, hd) rows written
                                const float *q,         // (T, H, hd) after RoPE
                                const float *k,         // (T, KV, hd) after RoPE
                                const float *v,         // (T, KV, hd)
                                const int32_t *seq_start, // (n_seqs + 1)
                                const int32_t *past,    // (n_seqs)
                                const int32_t *slot,    // (n_seqs)
                                int n_seqs, int max_seq, int H, int KV, int hd);

/* out = silu(gate) * up. out may alias gate or up. */
int es_swiglu_forward(es_device *dev,
                      float *out,                 // (n)
                      const float *gate,          // (n)
                      const float *up,            // (n)
                      size_t n);

/* out = a + b. out may alias a or b. */
int es_add(es_device *dev,
           float *out,                            // (n)
           const float *a,                        // (n)
           const float *b,                        // (n)
           size_t n);

/* ---- decoder layer, backward ----------------------------------------------------------- */

/* dtable[ids[t]] += dout[t], tokens in order. */
int es_embedding_backward(es_device *dev,
                          float *dtable,          // (V, C) accumulated
                          const int32_t *ids,     // (T)
                          const float *dout,      // (T, C)
                          int T, int C);

/* din written (it may not alias dout), dweight accumulated. */
int es_rmsnorm_backward(es_device *dev,
                        float *din,               // (T, C)
                        float *dweight,           // (C) accumulated, or NULL (a unit weight's gradient is not wanted)
                        const float *dout,        // (T, C)
                        const float *in,          // (T, C) the forward's input
                        const void *weight,       // (C) in dev->weight_dtype
                        int T, int C, float eps);

/* out = residual + (in @ weightᵀ + bias): the product and es_add of the stream in one. A backend
 * may add the residual in the product's epilogue (CUDA: cuBLASLt's C with beta 1, instead of a pass
 * of its own over three tensors). out aliases neither residual nor in. */
int es_matmul_forward_residual(es_device *dev,
                               float *out,            // (T, OC)
                               const float *residual, // (T, OC)
                               const float *in,       // (T, C)
                               const void *weight,    // (OC, C) in dev->weight_dtype
                               const void *bias,      // (OC) in dev->weight_dtype, or NULL
                               int T, int C, int OC);

/* The MLP's second half with the residual stream: out = residual + act @ weightᵀ + bias with
 * act = silu(gate) · up, as es_swiglu_forward, es_matmul_forward and es_add give it; the
 * activation is not kept (the CPU holds it in its scratch for the product, CUDA rounds it
 * straight to bf16 there), and es_swiglu_down_backward makes it again. out aliases no input. */
int es_swiglu_down_forward(es_device *dev,
                           float *out,            // (T, C)
                           const float *residual, // (T, C)
                           const float *gate,     // (T, inner)
                           const float *up,       // (T, inner)
                           const void *weight,    // (C, inner) in dev->weight_dtype
                           const void *bias,      // (C) in dev->weight_dtype, or NULL
                           int T, int inner, int C);

/* Products that share their input: a layer's q, k and v, or its gate and up. part[i].out = in @
 * part[i].weightᵀ + part[i].bias, each what es_matmul_forward gives; a backend may do the work on
 * `in` once for the group (CUDA rounds it to bf16 once, not n times). */
typedef struct es_matmul_part {
    float *out;          // (T, OC) the forward's output (unused by the backward)
    const void *weight;  // (OC, C) in dev->weight_dtype
    const void *bias;    // (OC) in dev->weight_dtype, or NULL
    int OC;
} es_matmul_part;
int es_matmul_forward_group(es_device *dev, const es_matmul_part *part, int n, const float *in /* (T, C) */, int T, int C);

/* din written (NULL: not needed), dweight and dbias accumulated (dbias NULL: no bias). The
 * weight is the one the forward read (dev->weight_dtype); the gradients are fp32. */
int es_matmul_backward(es_device *dev,
                       float *din,                // (T, C) or NULL
                       float *dweight,            // (OC, C) accumulated
                       float *dbias,              // (OC) accumulated, or NULL
                       const float *dout,         // (T, OC)
                       const float *in,           // (T, C)
                       const void *weight,        // (OC, C) in dev->weight_dtype
                       int T, int C, int OC);

/* The backward of es_swiglu_down_forward (its residual's gradient is dout itself): dweight and
 * dbias (NULL: no bias) accumulated as es_matmul_backward's over act = silu(gate) · up made again,
 * then the activation's gradient dout @ weight through SwiGLU into dgate and dup (written). */
int es_swiglu_down_backward(es_device *dev,
                            float *dgate,          // (T, inner)
                            float *dup,            // (T, inner)
                            float *dweight,        // (C, inner) accumulated
                            float *dbias,          // (C) accumulated, or NULL
                            const float *dout,     // (T, C)
                            const float *gate,     // (T, inner)
                            const float *up,       // (T, inner)
                            const void *weight,    // (C, inner) in dev->weight_dtype
                            int T, int inner, int C);

/* The backward of es_matmul_forward_group: din = Σ_i grad[i].dout @ part[i].weight, the products
 * added into din in i order as a product with beta = 1 adds (the first one written); each
 * grad[i].dweight and grad[i].dbias (NULL: no bias) accumulated as es_matmul_backward's. */
typedef struct es_matmul_part_grad {
    const float *dout;   // (T, OC)
    float *dweight;      // (OC, C) accumulated
    float *dbias;        // (OC) accumulated, or NULL
} es_matmul_part_grad;
int es_matmul_backward_group(es_device *dev, float *din /* (T, C) */, const es_matmul_part_grad *grad, const es_matmul_part *part, int n,
                             const float *in /* (T, C) */, int T, int C);

/* In place: dx, the gradient of the rotated x, becomes that of the unrotated x. */
int es_rope_backward(es_device *dev,
                     float *dx,                   // (T, n_heads, hd)
                     const int32_t *positions,    // (T)
                     const double *inv_freq,      // (hd / 2)
                     int T, int n_heads, int hd);

/* dq, dk, dv written; the forward's probabilities are recomputed from q and k. */
int es_attention_backward(es_device *dev,
                          float *dq,              // (T, H, hd)
                          float *dk,              // (T, KV, hd)
                          float *dv,              // (T, KV, hd)
                          const float *dout,      // (T, H, hd)
                          const float *q,         // (T, H, hd) after RoPE
                          const float *k,         // (T, KV, hd) after RoPE
                          const float *v,         // (T, KV, hd)
                          const int32_t *seq_start, // (n_seqs + 1)
                          int n_seqs, int H, int KV, int hd);

/* dgate and dup written (they may not alias dout). */
int es_swiglu_backward(es_device *dev,
                       float *dgate,              // (n)
                       float *dup,                // (n)
                       const float *dout,         // (n)
                       const float *gate,         // (n)
                       const float *up,           // (n)
                       size_t n);

/* ---- loss terms (forward and backward in one pass; DESIGN.md "Training objective") ------- */

/* Latent MSE of one layer: for each token t with mask[t] != 0,
 *   ĥ_t = h_t / sqrt(mean_k h_t[k]² + eps),  y_t = head ? ĥ_t @ headᵀ : ĥ_t,
 *   e_t = mean_k (y_t[k] − target_t[k])².
 * *loss_sum (host) = Σ_t e_t; *cosine_sum (host, may be NULL) = Σ_t cos(y_t, target_t).
 * With dh != NULL: dh = scale · ∂(Σ e)/∂h (zero rows where mask is 0), and dhead (when not
 * NULL) += scale · ∂(Σ e)/∂head. */
int es_latent_mse(es_device *dev,
                  double *loss_sum,               // host
                  double *cosine_sum,             // host, or NULL
                  float *dh,                      // (T, C) or NULL
                  float *dhead,                   // (C, C) accumulated, or NULL (not read without a head)
                  const float *h,                 // (T, C)
                  const float *target,            // (T, C)
                  const uint8_t *mask,            // (T)
                  const float *head,              // (C, C) or NULL
                  int T, int C, float eps, float scale);

/* Next-token cross entropy through the head W, never holding all (T, V) logits at once:
 * *loss_sum (host) = Σ over t with labels[t] >= 0 of logsumexp(x_t Wᵀ) − (x_t Wᵀ)[labels[t]].
 * With dx != NULL: dx = scale · ∂sum/∂x (zero rows where the label is −1), and dW (when not
 * NULL) += scale · ∂sum/∂W. A label outside [−1, V) is ES_ERR_DATA. */
int es_cross_entropy(es_device *dev,
                     double *loss_sum,            // host
                     float *dx,                   // (T, C) or NULL
                     float *dW,                   // (V, C) accumulated, or NULL
                     const float *x,              // (T, C)
                     const void *W,               // (V, C) in dev->weight_dtype
                     const int32_t *labels,       // (T)
                     int T, int C, int V, float scale);

/* ---- optimizer ------------------------------------------------------------------------- */

typedef struct es_adamw_config {
    double lr, beta1, beta2, eps, weight_decay;
} es_adamw_config;

/* One AdamW update, torch.optim.AdamW's order of operations in fp32, `step` counting from 1:
 *   p ← p · (1 − lr·wd);  m ← m + (g − m)(1 − β1);  v ← β2·v + (1 − β2)·g²
 *   p ← p − lr/(1 − β1^step) · m / (sqrt(v) / sqrt(1 − β2^step) + eps)
 * (lr is this step's rate; config->lr is not read). With working != NULL the new p is also
 * written there in dev->weight_dtype (bf16 on CUDA: the copy the next forward reads), rounded as
 * es_round_weights rounds, in the same pass. */
int es_adamw_update(es_device *dev,
                    float *params,                // (n) fp32 master weights
                    void *working,                // (n) in dev->weight_dtype, or NULL
                    const float *grads,           // (n)
                    float *m,                     // (n)
                    float *v,                     // (n)
                    size_t n, int64_t step, double lr, const es_adamw_config *config);

/* working = master in dev->weight_dtype, rounded as es_device_upload_weights rounds weights
 * (common/dtype.h: to nearest, ties away from zero, saturating), so that a working copy holds the
 * bits an upload of the same values would; on an fp32 device a copy (nothing when the two are the
 * same memory). */
int es_round_weights(es_device *dev,
                     void *working,               // (n) in dev->weight_dtype
                     const float *master,         // (n)
                     size_t n);

/* *out (host) = Σ x², in double, over fixed blocks added in order. */
int es_sum_squares(es_device *dev, double *out, const float *x /* (n) */, size_t n);

/* x *= scale; scale 0 sets x to zero (NaN included). */
int es_scale(es_device *dev, float *x /* (n) */, size_t n, float scale);

/* ---- the Fourier projection (DESIGN.md "The Fourier projection") ------------------------ */

/* The GEMM inputs' precision: fp32 (as is), tf32 (10 mantissa bits), bf16 (7), fp8 e4m3
 * (3, saturating at ±448); the phases always accumulate in fp32. */
typedef enum { ES_PRECISION_FP32, ES_PRECISION_TF32, ES_PRECISION_BF16, ES_PRECISION_FP8 } es_precision;

/* Rounds x to the precision in place (round to nearest even; NaN kept; inf kept but in fp8,
 * which has no infinities: values past ±448, infinities too, saturate to ±448, as tensor cores'
 * saturating conversion does). */
int es_round_precision(es_device *dev, float *x /* (n) */, size_t n, es_precision precision);

/* x_hat[i] = standardised rows[row_index[i]], rounded to the precision:
 *   mean != NULL: (x − mean) / scale per dimension;  mean == NULL: x / max(rms(x), 1e-6).
 * A row with a non-finite value is not written; *first_bad (host) = the smallest i whose row is
 * not finite, or n when all are. */
int es_standardise(es_device *dev,
                   float *x_hat,                  // (n, d)
                   int64_t *first_bad,            // host
                   const float *rows,             // (R, d)
                   const int64_t *row_index,      // (n) into rows
                   const float *mean,             // (d) or NULL
                   const float *scale,            // (d) or NULL
                   int64_t n, int d, es_precision precision);

/* Where the time of es_fourier_features went (added to, host; a backend that cannot tell
 * leaves it). */
typedef struct es_fourier_timing {
    double gemm_seconds, epilogue_seconds, gemm_flops;
} es_fourier_timing;

/* targets = √2 · [cos φ, sin φ], φ = omega_scale · x_hat Ωᵀ accumulated in fp32, the GEMM's inputs in
 * `precision` (the caller has rounded both to it, so a backend that emulates the narrow formats
 * with an fp32 product gets what tensor cores compute); cos and sin with exact range reduction.
 * A row's result depends on that row alone. omega_scale is a power of two (scaling by it is exact):
 * 1, but for fp8, whose Ω the caller scales into e4m3's range before rounding (docs/project.md). */
int es_fourier_features(es_device *dev,
                        float *targets,           // (T, 2m)
                        const float *x_hat,       // (T, d)
                        const float *omega,       // (m, d)
                        float omega_scale,
                        int T, int d, int m, es_precision precision,
                        es_fourier_timing *timing); // host, or NULL

#endif
