/* A double-precision reference of every op of kernels/ops.h, written from the documented math
 * (the comments in ops.h; DESIGN.md "Training objective", "The Fourier projection") with plain
 * loops and no BLAS, so that it shares nothing with a backend but the definition.
 *
 * Same argument order and shapes as the op it mirrors, every array in double (host memory).
 * Gradient conventions are the ops': activation gradients are written, parameter gradients are
 * added to what their arrays hold. Scalars that the op receives as float (eps, scale) are passed
 * here as the double of that float, so both sides start from the same number.
 *
 * The backward references are checked against central differences of the forward ones by
 * ref_check_gradients (tests/ops/selftest.c), run before any device is compared with them. */
#ifndef ES_TESTS_OPS_REFERENCE_H
#define ES_TESTS_OPS_REFERENCE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "dtype.h"
#include "ops.h"

/* The n values of a table stored as dtype (F32, BF16, F16 or F8_E4M3), decoded from the formats'
 * definitions (not from common/dtype.c, which the backends use). */
void ref_decode(double *out, const void *data, es_dtype dtype, size_t n);

/* ---- decoder layer ---- */
void ref_embedding_forward(double *out, const int32_t *ids, const double *table, int T, int C);
void ref_rmsnorm_forward(double *out, const double *in, const double *weight, int T, int C, double eps);
void ref_matmul_forward(double *out, const double *in, const double *weight, const double *bias, int T, int C, int OC);
void ref_rope_forward(double *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd);
void ref_attention_forward(double *out, const double *q, const double *k, const double *v, const int32_t *seq_start, int n_seqs,
                           int H, int KV, int hd);
void ref_swiglu_forward(double *out, const double *gate, const double *up, size_t n);
void ref_add(double *out, const double *a, const double *b, size_t n);

void ref_embedding_backward(double *dtable, const int32_t *ids, const double *dout, int T, int C);
/* dweight may be NULL */
void ref_rmsnorm_backward(double *din, double *dweight, const double *dout, const double *in, const double *weight, int T, int C,
                          double eps);
/* din and dbias may be NULL */
void ref_matmul_backward(double *din, double *dweight, double *dbias, const double *dout, const double *in, const double *weight,
                         int T, int C, int OC);
void ref_rope_backward(double *dx, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd);
void ref_attention_backward(double *dq, double *dk, double *dv, const double *dout, const double *q, const double *k,
                            const double *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd);
void ref_swiglu_backward(double *dgate, double *dup, const double *dout, const double *gate, const double *up, size_t n);

/* ---- loss terms ---- */
/* cosine_sum, dh, dhead, head may be NULL as in es_latent_mse (dhead is added to only with dh). */
void ref_latent_mse(double *loss_sum, double *cosine_sum, double *dh, double *dhead, const double *h, const double *target,
                    const uint8_t *mask, const double *head, int T, int C, double eps, double scale);
/* Returns 0, or -1 (nothing written) when a label is outside [-1, V). */
int ref_cross_entropy(double *loss_sum, double *dx, double *dW, const double *x, const double *W, const int32_t *labels, int T,
                      int C, int V, double scale);

/* ---- optimizer ---- */
void ref_adamw_update(double *params, const double *grads, double *m, double *v, size_t n, int64_t step, double lr,
                      const es_adamw_config *config);
double ref_sum_squares(const double *x, size_t n);
void ref_scale(double *x, size_t n, double scale);

/* ---- the Fourier projection ---- */
/* x rounded to the precision's grid: its mantissa bits, fp32's exponent range (fp8: e4m3's, with
 * subnormals, saturating at ±448), ties to even; NaN and ±inf as they are (ops.h). */
double ref_round(double x, es_precision precision);
void ref_round_precision(double *x, size_t n, es_precision precision);
/* Returns first_bad; rows of x_hat whose source row is not finite are left as they were. */
int64_t ref_standardise(double *x_hat, const double *rows, const int64_t *row_index, const double *mean, const double *scale,
                        int64_t n, int d, es_precision precision);
void ref_fourier_features(double *targets, const double *x_hat, const double *omega, int T, int d, int m);

/* The self-test of this file (tests/ops/selftest.c): every backward reference against central
 * differences of its forward, and the rounding against values worked out by hand. Prints one
 * indented line and one PASS/FAIL line per check to log; returns the number of failures. */
int ref_check_gradients(FILE *log);

#endif
