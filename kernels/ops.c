/* The op wrappers of kernels/ops.h: check the arguments every backend may rely on, then call the
 * device's entry. A NULL entry is an op the backend does not have. */
#include "ops.h"

#include <assert.h>
#include <math.h>

#include "backend_impl.h"

#define DISPATCH(op, ...)                                                                                   \
    do {                                                                                                    \
        if (!dev->ops->op) return es_device_fail(dev, ES_ERR_RUNTIME, "%s: op " #op " is not implemented", dev->name); \
        return dev->ops->op(dev, __VA_ARGS__);                                                              \
    } while (0)

int es_embedding_forward(es_device *dev, float *out, const int32_t *ids, const void *table, es_dtype dtype, int T, int C) {
    assert(T >= 0 && C > 0 && es_dtype_is_float(dtype));
    DISPATCH(embedding_forward, out, ids, table, dtype, T, C);
}

int es_rmsnorm_forward(es_device *dev, float *out, const float *in, const void *weight, int T, int C, float eps) {
    assert(T >= 0 && C > 0 && weight);
    DISPATCH(rmsnorm_forward, out, in, weight, T, C, eps);
}

int es_matmul_forward(es_device *dev, float *out, const float *in, const void *weight, const void *bias, int T, int C, int OC) {
    assert(T >= 0 && C > 0 && OC > 0 && out != in);
    DISPATCH(matmul_forward, out, in, weight, bias, T, C, OC);
}

int es_matmul_forward_residual(es_device *dev, float *out, const float *residual, const float *in, const void *weight, const void *bias,
                               int T, int C, int OC) {
    assert(T >= 0 && C > 0 && OC > 0 && out != in && out != residual);
    if (dev->ops->matmul_forward_residual) return dev->ops->matmul_forward_residual(dev, out, residual, in, weight, bias, T, C, OC);
    const int rc = es_matmul_forward(dev, out, in, weight, bias, T, C, OC);
    return rc ? rc : es_add(dev, out, residual, out, (size_t)T * OC);
}

int es_swiglu_down_forward(es_device *dev, float *out, const float *residual, const float *gate, const float *up, const void *weight,
                           const void *bias, int T, int inner, int C) {
    assert(T >= 0 && inner > 0 && C > 0 && out != residual && out != gate && out != up);
    DISPATCH(swiglu_down_forward, out, residual, gate, up, weight, bias, T, inner, C);
}

int es_matmul_forward_group(es_device *dev, const es_matmul_part *part, int n, const float *in, int T, int C) {
    assert(n > 0 && T >= 0 && C > 0);
    for (int i = 0; i < n; i++) assert(part[i].OC > 0 && part[i].out != in);
    if (dev->ops->matmul_forward_group) return dev->ops->matmul_forward_group(dev, part, n, in, T, C);
    for (int i = 0; i < n; i++) {
        const int rc = es_matmul_forward(dev, part[i].out, in, part[i].weight, part[i].bias, T, C, part[i].OC);
        if (rc) return rc;
    }
    return ES_OK;
}

int es_rope_forward(es_device *dev, float *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    assert(T >= 0 && n_heads > 0 && hd > 0 && hd % 2 == 0);
    DISPATCH(rope_forward, x, positions, inv_freq, T, n_heads, hd);
}

int es_attention_forward(es_device *dev, float *out, const float *q, const float *k, const float *v, const int32_t *seq_start,
                         int n_seqs, int H, int KV, int hd) {
    assert(n_seqs >= 0 && H > 0 && KV > 0 && H % KV == 0 && hd > 0);
    DISPATCH(attention_forward, out, q, k, v, seq_start, n_seqs, H, KV, hd);
}

int es_attention_cached_forward(es_device *dev, float *out, float *k_cache, float *v_cache, const float *q, const float *k,
                                const float *v, const int32_t *seq_start, const int32_t *past, const int32_t *slot, int n_seqs,
                                int max_seq, int H, int KV, int hd) {
    assert(n_seqs >= 0 && max_seq > 0 && H > 0 && KV > 0 && H % KV == 0 && hd > 0);
    DISPATCH(attention_cached_forward, out, k_cache, v_cache, q, k, v, seq_start, past, slot, n_seqs, max_seq, H, KV, hd);
}

int es_swiglu_forward(es_device *dev, float *out, const float *gate, const float *up, size_t n) {
    DISPATCH(swiglu_forward, out, gate, up, n);
}

int es_add(es_device *dev, float *out, const float *a, const float *b, size_t n) { DISPATCH(add, out, a, b, n); }

int es_embedding_backward(es_device *dev, float *dtable, const int32_t *ids, const float *dout, int T, int C) {
    assert(T >= 0 && C > 0);
    DISPATCH(embedding_backward, dtable, ids, dout, T, C);
}

int es_rmsnorm_backward(es_device *dev, float *din, float *dweight, const float *dout, const float *in, const void *weight, int T,
                        int C, float eps) {
    assert(T >= 0 && C > 0 && din != dout);
    DISPATCH(rmsnorm_backward, din, dweight, dout, in, weight, T, C, eps);
}

int es_matmul_backward(es_device *dev, float *din, float *dweight, float *dbias, const float *dout, const float *in,
                       const void *weight, int T, int C, int OC) {
    assert(T >= 0 && C > 0 && OC > 0 && dweight);
    DISPATCH(matmul_backward, din, dweight, dbias, dout, in, weight, T, C, OC);
}

int es_swiglu_down_backward(es_device *dev, float *dgate, float *dup, float *dweight, float *dbias, const float *dout,
                            const float *gate, const float *up, const void *weight, int T, int inner, int C) {
    assert(T >= 0 && inner > 0 && C > 0 && dweight && dgate != dup);
    DISPATCH(swiglu_down_backward, dgate, dup, dweight, dbias, dout, gate, up, weight, T, inner, C);
}

int es_matmul_backward_group(es_device *dev, float *din, const es_matmul_part_grad *grad, const es_matmul_part *part, int n,
                             const float *in, int T, int C) {
    assert(n > 0 && T >= 0 && C > 0 && din);
    for (int i = 0; i < n; i++) assert(part[i].OC > 0 && grad[i].dweight && grad[i].dout != din);
    DISPATCH(matmul_backward_group, din, grad, part, n, in, T, C);
}

int es_rope_backward(es_device *dev, float *dx, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    assert(T >= 0 && n_heads > 0 && hd > 0 && hd % 2 == 0);
    DISPATCH(rope_backward, dx, positions, inv_freq, T, n_heads, hd);
}

int es_attention_backward(es_device *dev, float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                          const float *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd) {
    assert(n_seqs >= 0 && H > 0 && KV > 0 && H % KV == 0 && hd > 0);
    DISPATCH(attention_backward, dq, dk, dv, dout, q, k, v, seq_start, n_seqs, H, KV, hd);
}

int es_swiglu_backward(es_device *dev, float *dgate, float *dup, const float *dout, const float *gate, const float *up, size_t n) {
    assert(dgate != dout && dup != dout);
    DISPATCH(swiglu_backward, dgate, dup, dout, gate, up, n);
}

int es_latent_mse(es_device *dev, double *loss_sum, double *cosine_sum, float *dh, float *dhead, const float *h,
                  const float *target, const uint8_t *mask, const float *head, int T, int C, float eps, float scale) {
    assert(T >= 0 && C > 0 && loss_sum);
    DISPATCH(latent_mse, loss_sum, cosine_sum, dh, dhead, h, target, mask, head, T, C, eps, scale);
}

int es_cross_entropy(es_device *dev, double *loss_sum, float *dx, float *dW, const float *x, const void *W,
                     const int32_t *labels, int T, int C, int V, float scale) {
    assert(T >= 0 && C > 0 && V > 0 && loss_sum && (!dW || dx));
    DISPATCH(cross_entropy, loss_sum, dx, dW, x, W, labels, T, C, V, scale);
}

int es_adamw_update(es_device *dev, float *params, void *working, const float *grads, float *m, float *v, size_t n, int64_t step,
                    double lr, const es_adamw_config *config) {
    assert(step >= 1 && config && working != (void *)grads);
    DISPATCH(adamw_update, params, working, grads, m, v, n, step, lr, config);
}

int es_round_weights(es_device *dev, void *working, const float *master, size_t n) {
    DISPATCH(round_weights, working, master, n);
}

int es_sum_squares(es_device *dev, double *out, const float *x, size_t n) { DISPATCH(sum_squares, out, x, n); }

int es_scale(es_device *dev, float *x, size_t n, float scale) { DISPATCH(scale, x, n, scale); }

int es_round_precision(es_device *dev, float *x, size_t n, es_precision precision) {
    DISPATCH(round_precision, x, n, precision);
}

int es_standardise(es_device *dev, float *x_hat, int64_t *first_bad, const float *rows, const int64_t *row_index, const float *mean,
                   const float *scale, int64_t n, int d, es_precision precision) {
    assert(n >= 0 && d > 0 && first_bad && (!mean) == (!scale));
    DISPATCH(standardise, x_hat, first_bad, rows, row_index, mean, scale, n, d, precision);
}

int es_fourier_features(es_device *dev, float *targets, const float *x_hat, const float *omega, float omega_scale, int T, int d,
                        int m, es_precision precision, es_fourier_timing *timing) {
    int exponent;
    assert(T >= 0 && d > 0 && m > 0 && frexpf(omega_scale, &exponent) == 0.5f);
    (void)exponent;
    DISPATCH(fourier_features, targets, x_hat, omega, omega_scale, T, d, m, precision, timing);
}
