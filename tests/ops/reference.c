/* The double-precision reference of kernels/ops.h (tests/ops/reference.h): each op as its
 * formula, one loop per sum, in the most direct order. Speed does not matter here beyond keeping
 * the harness's grid affordable; clarity does, since every backend is judged against this. */
#include "reference.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The reference runs inside a test: running out of memory there ends the test loudly. */
static void *scratch(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size);
    if (!p) {
        fprintf(stderr, "FAIL reference: out of memory (%zu x %zu bytes)\n", count, size);
        exit(1);
    }
    return p;
}

/* ---- table formats --------------------------------------------------------------------------- */

static double decode_bf16(uint16_t bits) { /* the upper half of an IEEE binary32 */
    const uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static double decode_f16(uint16_t bits) { /* IEEE binary16: 5 exponent bits (bias 15), 10 mantissa bits */
    const int exponent = (bits >> 10) & 31, mantissa = bits & 1023;
    double value;
    if (exponent == 0) value = ldexp(mantissa, -24);
    else if (exponent == 31) value = mantissa ? NAN : INFINITY;
    else value = ldexp(1024 + mantissa, exponent - 25);
    return bits & 0x8000 ? -value : value;
}

static double decode_e4m3(uint8_t bits) { /* e4m3fn: 4 exponent bits (bias 7), 3 mantissa bits, no inf, S.1111.111 NaN */
    const int exponent = (bits >> 3) & 15, mantissa = bits & 7;
    double value;
    if (exponent == 15 && mantissa == 7) value = NAN;
    else if (exponent == 0) value = ldexp(mantissa, -9);
    else value = ldexp(8 + mantissa, exponent - 10);
    return bits & 0x80 ? -value : value;
}

void ref_decode(double *out, const void *data, es_dtype dtype, size_t n) {
    const unsigned char *bytes = data;
    for (size_t i = 0; i < n; i++) {
        uint16_t half;
        float f;
        switch (dtype) {
        case ES_DT_F32: memcpy(&f, bytes + 4 * i, 4), out[i] = f; break;
        case ES_DT_BF16: memcpy(&half, bytes + 2 * i, 2), out[i] = decode_bf16(half); break;
        case ES_DT_F16: memcpy(&half, bytes + 2 * i, 2), out[i] = decode_f16(half); break;
        case ES_DT_F8_E4M3: out[i] = decode_e4m3(bytes[i]); break;
        default: out[i] = NAN; break;
        }
    }
}

/* ---- decoder layer, forward ------------------------------------------------------------------- */

void ref_embedding_forward(double *out, const int32_t *ids, const double *table, int T, int C) {
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C; c++) out[(size_t)t * C + c] = table[(size_t)ids[t] * C + c];
}

static double inverse_rms(const double *x, int C, double eps) {
    double sum_sq = 0;
    for (int c = 0; c < C; c++) sum_sq += x[c] * x[c];
    return 1.0 / sqrt(sum_sq / C + eps);
}

void ref_rmsnorm_forward(double *out, const double *in, const double *weight, int T, int C, double eps) {
    for (int t = 0; t < T; t++) {
        const double *x = in + (size_t)t * C;
        const double r = inverse_rms(x, C, eps);
        for (int c = 0; c < C; c++) out[(size_t)t * C + c] = x[c] * r * weight[c];
    }
}

void ref_matmul_forward(double *out, const double *in, const double *weight, const double *bias, int T, int C, int OC) {
    for (int t = 0; t < T; t++)
        for (int o = 0; o < OC; o++) {
            double sum = bias ? bias[o] : 0.0;
            for (int c = 0; c < C; c++) sum += in[(size_t)t * C + c] * weight[(size_t)o * C + c];
            out[(size_t)t * OC + o] = sum;
        }
}

/* Rotate-half: the pair (x[i], x[i + hd/2]) turns by positions[t] · inv_freq[i]. */
void ref_rope_forward(double *x, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    const int half = hd / 2;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            const double angle = positions[t] * inv_freq[i], c = cos(angle), s = sin(angle);
            for (int h = 0; h < n_heads; h++) {
                double *head = x + ((size_t)t * n_heads + h) * hd;
                const double a = head[i], b = head[i + half];
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
}

void ref_attention_forward(double *out, const double *q, const double *k, const double *v, const int32_t *seq_start, int n_seqs,
                           int H, int KV, int hd) {
    const int group = H / KV;
    const double scale = 1.0 / sqrt((double)hd);
    for (int s = 0; s < n_seqs; s++) {
        const int first = seq_start[s], L = seq_start[s + 1] - first;
        double *p = scratch((size_t)L, sizeof *p);
        for (int h = 0; h < H; h++) {
            const int kv = h / group;
            for (int i = 0; i < L; i++) {
                const double *qi = q + ((size_t)(first + i) * H + h) * hd;
                double max_score = -INFINITY, total = 0;
                for (int u = 0; u <= i; u++) { /* causal: keys of this sequence up to the query itself */
                    const double *ku = k + ((size_t)(first + u) * KV + kv) * hd;
                    double dot = 0;
                    for (int e = 0; e < hd; e++) dot += qi[e] * ku[e];
                    p[u] = dot * scale;
                    if (p[u] > max_score) max_score = p[u];
                }
                for (int u = 0; u <= i; u++) total += p[u] = exp(p[u] - max_score);
                double *o = out + ((size_t)(first + i) * H + h) * hd;
                for (int e = 0; e < hd; e++) {
                    double sum = 0;
                    for (int u = 0; u <= i; u++) sum += p[u] * v[((size_t)(first + u) * KV + kv) * hd + e];
                    o[e] = sum / total;
                }
            }
        }
        free(p);
    }
}

static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

void ref_swiglu_forward(double *out, const double *gate, const double *up, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

void ref_add(double *out, const double *a, const double *b, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* ---- decoder layer, backward ------------------------------------------------------------------ */

void ref_embedding_backward(double *dtable, const int32_t *ids, const double *dout, int T, int C) {
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C; c++) dtable[(size_t)ids[t] * C + c] += dout[(size_t)t * C + c];
}

/* y_c = x_c r w_c with r = (mean x² + eps)^(-1/2), ∂r/∂x_j = −r³ x_j / C:
 *   dx_j = r w_j dy_j − x_j r³/C · Σ_c x_c w_c dy_c,   dw_c = Σ_t dy_c x_c r. */
void ref_rmsnorm_backward(double *din, double *dweight, const double *dout, const double *in, const double *weight, int T, int C,
                          double eps) {
    for (int t = 0; t < T; t++) {
        const double *x = in + (size_t)t * C, *dy = dout + (size_t)t * C;
        const double r = inverse_rms(x, C, eps);
        double dot = 0;
        for (int c = 0; c < C; c++) dot += x[c] * weight[c] * dy[c];
        for (int c = 0; c < C; c++) din[(size_t)t * C + c] = r * weight[c] * dy[c] - x[c] * r * r * r * dot / C;
        if (dweight)
            for (int c = 0; c < C; c++) dweight[c] += dy[c] * x[c] * r;
    }
}

void ref_matmul_backward(double *din, double *dweight, double *dbias, const double *dout, const double *in, const double *weight,
                         int T, int C, int OC) {
    for (int t = 0; t < T; t++) {
        const double *dy = dout + (size_t)t * OC, *x = in + (size_t)t * C;
        if (din)
            for (int c = 0; c < C; c++) {
                double sum = 0;
                for (int o = 0; o < OC; o++) sum += dy[o] * weight[(size_t)o * C + c];
                din[(size_t)t * C + c] = sum;
            }
        for (int o = 0; o < OC; o++) {
            for (int c = 0; c < C; c++) dweight[(size_t)o * C + c] += dy[o] * x[c];
            if (dbias) dbias[o] += dy[o];
        }
    }
}

/* The forward maps (a, b) to (a c − b s, b c + a s); its transpose maps (da', db') to
 * (c da' + s db', −s da' + c db'). */
void ref_rope_backward(double *dx, const int32_t *positions, const double *inv_freq, int T, int n_heads, int hd) {
    const int half = hd / 2;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            const double angle = positions[t] * inv_freq[i], c = cos(angle), s = sin(angle);
            for (int h = 0; h < n_heads; h++) {
                double *head = dx + ((size_t)t * n_heads + h) * hd;
                const double da = head[i], db = head[i + half];
                head[i] = c * da + s * db;
                head[i + half] = -s * da + c * db;
            }
        }
}

/* Per sequence and query head, with P the causal softmax of scale·Q Kᵀ:
 *   dV += Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(P ∘ dP)),  dQ = scale dS K,  dK += scale dSᵀ Q,
 * dK and dV summed over the query heads that share a key/value head. */
void ref_attention_backward(double *dq, double *dk, double *dv, const double *dout, const double *q, const double *k,
                            const double *v, const int32_t *seq_start, int n_seqs, int H, int KV, int hd) {
    const int group = H / KV;
    const double scale = 1.0 / sqrt((double)hd);
    for (int s = 0; s < n_seqs; s++) {
        const int first = seq_start[s], L = seq_start[s + 1] - first;
        memset(dk + (size_t)first * KV * hd, 0, (size_t)L * KV * hd * sizeof *dk);
        memset(dv + (size_t)first * KV * hd, 0, (size_t)L * KV * hd * sizeof *dv);
        double *p = scratch((size_t)L * L, sizeof *p), *ds = scratch((size_t)L * L, sizeof *ds);
#define Q(i) (q + ((size_t)(first + (i)) * H + h) * hd)
#define DO(i) (dout + ((size_t)(first + (i)) * H + h) * hd)
#define K(u) (k + ((size_t)(first + (u)) * KV + kv) * hd)
#define V(u) (v + ((size_t)(first + (u)) * KV + kv) * hd)
        for (int h = 0; h < H; h++) {
            const int kv = h / group;
            for (int i = 0; i < L; i++) {
                double *pi = p + (size_t)i * L, *dsi = ds + (size_t)i * L, max_score = -INFINITY, total = 0, dot_pd = 0;
                for (int u = 0; u <= i; u++) {
                    double dot = 0;
                    for (int e = 0; e < hd; e++) dot += Q(i)[e] * K(u)[e];
                    pi[u] = dot * scale;
                    if (pi[u] > max_score) max_score = pi[u];
                }
                for (int u = 0; u <= i; u++) total += pi[u] = exp(pi[u] - max_score);
                for (int u = 0; u <= i; u++) {
                    pi[u] /= total;
                    double dp = 0;
                    for (int e = 0; e < hd; e++) dp += DO(i)[e] * V(u)[e];
                    dsi[u] = dp;
                    dot_pd += pi[u] * dp;
                }
                for (int u = 0; u <= i; u++) dsi[u] = pi[u] * (dsi[u] - dot_pd);
                double *dqi = dq + ((size_t)(first + i) * H + h) * hd;
                for (int e = 0; e < hd; e++) {
                    double sum = 0;
                    for (int u = 0; u <= i; u++) sum += dsi[u] * K(u)[e];
                    dqi[e] = scale * sum;
                }
            }
            for (int u = 0; u < L; u++) {
                double *dku = dk + ((size_t)(first + u) * KV + kv) * hd, *dvu = dv + ((size_t)(first + u) * KV + kv) * hd;
                for (int e = 0; e < hd; e++) {
                    double sum_k = 0, sum_v = 0;
                    for (int i = u; i < L; i++) {
                        sum_k += ds[(size_t)i * L + u] * Q(i)[e];
                        sum_v += p[(size_t)i * L + u] * DO(i)[e];
                    }
                    dku[e] += scale * sum_k;
                    dvu[e] += sum_v;
                }
            }
        }
#undef Q
#undef DO
#undef K
#undef V
        free(p);
        free(ds);
    }
}

/* out = g σ(g) u:  ∂/∂u = g σ(g),  ∂/∂g = u σ(g) (1 + g (1 − σ(g))). */
void ref_swiglu_backward(double *dgate, double *dup, const double *dout, const double *gate, const double *up, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const double g = gate[i], sg = sigmoid(g);
        dup[i] = dout[i] * g * sg;
        dgate[i] = dout[i] * up[i] * sg * (1.0 + g * (1.0 - sg));
    }
}

/* ---- loss terms ----------------------------------------------------------------------------- */

/* Per unmasked token: ĥ = h r, y = head ? ĥ headᵀ : ĥ, e = mean_k (y_k − target_k)².
 * Backward of scale·Σ e: dy = scale · 2 (y − target) / C; dhead += dyᵀ ĥ; dĥ = dy head;
 * dh = r dĥ − h r³ (h · dĥ) / C (RMSNorm with a unit weight). */
void ref_latent_mse(double *loss_sum, double *cosine_sum, double *dh, double *dhead, const double *h, const double *target,
                    const uint8_t *mask, const double *head, int T, int C, double eps, double scale) {
    double *normed = scratch((size_t)C, sizeof *normed), *y = scratch((size_t)C, sizeof *y);
    double *dy = scratch((size_t)C, sizeof *dy), *dnormed = scratch((size_t)C, sizeof *dnormed);
    double loss = 0, cosines = 0;
    for (int t = 0; t < T; t++) {
        const double *x = h + (size_t)t * C, *tg = target + (size_t)t * C;
        if (!mask[t]) {
            if (dh) memset(dh + (size_t)t * C, 0, (size_t)C * sizeof *dh);
            continue;
        }
        const double r = inverse_rms(x, C, eps);
        for (int c = 0; c < C; c++) normed[c] = x[c] * r;
        for (int kk = 0; kk < C; kk++) {
            if (!head) {
                y[kk] = normed[kk];
                continue;
            }
            double sum = 0;
            for (int j = 0; j < C; j++) sum += head[(size_t)kk * C + j] * normed[j];
            y[kk] = sum;
        }
        double sq = 0, dot = 0, yy = 0, tt = 0;
        for (int c = 0; c < C; c++) {
            sq += (y[c] - tg[c]) * (y[c] - tg[c]);
            dot += y[c] * tg[c], yy += y[c] * y[c], tt += tg[c] * tg[c];
        }
        loss += sq / C;
        /* cos of a zero vector is undefined; ops.h does not say, the CPU adds nothing: so do we */
        if (yy > 0 && tt > 0) cosines += dot / sqrt(yy * tt);
        if (!dh) continue;
        for (int c = 0; c < C; c++) dy[c] = scale * 2.0 * (y[c] - tg[c]) / C;
        if (head) {
            for (int j = 0; j < C; j++) {
                double sum = 0;
                for (int kk = 0; kk < C; kk++) sum += dy[kk] * head[(size_t)kk * C + j];
                dnormed[j] = sum;
            }
            if (dhead)
                for (int kk = 0; kk < C; kk++)
                    for (int j = 0; j < C; j++) dhead[(size_t)kk * C + j] += dy[kk] * normed[j];
        } else {
            memcpy(dnormed, dy, (size_t)C * sizeof *dy);
        }
        double hd = 0;
        for (int c = 0; c < C; c++) hd += x[c] * dnormed[c];
        for (int c = 0; c < C; c++) dh[(size_t)t * C + c] = r * dnormed[c] - x[c] * r * r * r * hd / C;
    }
    *loss_sum = loss;
    if (cosine_sum) *cosine_sum = cosines;
    free(normed), free(y), free(dy), free(dnormed);
}

/* loss = Σ_t lse(z_t) − z_t[label_t], z = x Wᵀ; dz = scale (softmax(z) − onehot(label)),
 * dx = dz W, dW += dzᵀ x. */
int ref_cross_entropy(double *loss_sum, double *dx, double *dW, const double *x, const double *W, const int32_t *labels, int T,
                      int C, int V, double scale) {
    for (int t = 0; t < T; t++)
        if (labels[t] < -1 || labels[t] >= V) return -1;
    double *z = scratch((size_t)V, sizeof *z), loss = 0;
    if (dx) memset(dx, 0, (size_t)T * C * sizeof *dx);
    for (int t = 0; t < T; t++) {
        if (labels[t] < 0) continue;
        const double *xt = x + (size_t)t * C;
        double max_z = -INFINITY, total = 0;
        for (int v = 0; v < V; v++) {
            double sum = 0;
            for (int c = 0; c < C; c++) sum += xt[c] * W[(size_t)v * C + c];
            z[v] = sum;
            if (sum > max_z) max_z = sum;
        }
        for (int v = 0; v < V; v++) total += exp(z[v] - max_z);
        const double lse = max_z + log(total);
        loss += lse - z[labels[t]];
        if (!dx) continue;
        for (int v = 0; v < V; v++) {
            const double dz = scale * (exp(z[v] - lse) - (v == labels[t]));
            for (int c = 0; c < C; c++) {
                dx[(size_t)t * C + c] += dz * W[(size_t)v * C + c];
                if (dW) dW[(size_t)v * C + c] += dz * xt[c];
            }
        }
    }
    *loss_sum = loss;
    free(z);
    return 0;
}

/* ---- optimizer -------------------------------------------------------------------------------- */

void ref_adamw_update(double *params, const double *grads, double *m, double *v, size_t n, int64_t step, double lr,
                      const es_adamw_config *config) {
    const double correction1 = 1.0 - pow(config->beta1, (double)step), correction2 = 1.0 - pow(config->beta2, (double)step);
    for (size_t i = 0; i < n; i++) {
        const double g = grads[i];
        params[i] *= 1.0 - lr * config->weight_decay;
        m[i] += (g - m[i]) * (1.0 - config->beta1);
        v[i] = config->beta2 * v[i] + (1.0 - config->beta2) * g * g;
        params[i] -= lr / correction1 * m[i] / (sqrt(v[i]) / sqrt(correction2) + config->eps);
    }
}

double ref_sum_squares(const double *x, size_t n) {
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += x[i] * x[i];
    return sum;
}

void ref_scale(double *x, size_t n, double scale) {
    for (size_t i = 0; i < n; i++) x[i] = scale == 0.0 ? 0.0 : x[i] * scale;
}

/* ---- the Fourier projection ------------------------------------------------------------------- */

/* Nearest multiple of the grid spacing at x's binade (clamped below at the smallest normal's,
 * which gives the subnormals), ties to even: nearbyint in the default rounding mode. */
static double round_to_grid(double x, int bits, int min_exponent, double max_finite, int saturate) {
    if (isnan(x) || x == 0.0) return x;
    if (isinf(x)) return saturate ? copysign(max_finite, x) : x; /* e4m3fn has no infinities */
    int exponent;
    frexp(x, &exponent); /* |x| in [2^(exponent-1), 2^exponent) */
    const int lead = exponent - 1 < min_exponent ? min_exponent : exponent - 1;
    const double spacing = ldexp(1.0, lead - bits), rounded = nearbyint(x / spacing) * spacing;
    if (fabs(rounded) > max_finite) return saturate ? copysign(max_finite, x) : copysign(INFINITY, x);
    return rounded;
}

double ref_round(double x, es_precision precision) {
    switch (precision) {
    case ES_PRECISION_FP32: return round_to_grid(x, 23, -126, FLT_MAX, 0);
    case ES_PRECISION_TF32: return round_to_grid(x, 10, -126, ldexp(2.0 - ldexp(1.0, -10), 127), 0);
    case ES_PRECISION_BF16: return round_to_grid(x, 7, -126, ldexp(2.0 - ldexp(1.0, -7), 127), 0);
    case ES_PRECISION_FP8: return round_to_grid(x, 3, -6, 448.0, 1);
    }
    return NAN;
}

void ref_round_precision(double *x, size_t n, es_precision precision) {
    for (size_t i = 0; i < n; i++) x[i] = ref_round(x[i], precision);
}

int64_t ref_standardise(double *x_hat, const double *rows, const int64_t *row_index, const double *mean, const double *scale,
                        int64_t n, int d, es_precision precision) {
    int64_t first_bad = n;
    for (int64_t i = 0; i < n; i++) {
        const double *x = rows + (size_t)row_index[i] * d;
        int finite = 1;
        for (int k = 0; k < d; k++) finite &= isfinite(x[k]) != 0;
        if (!finite) {
            if (i < first_bad) first_bad = i;
            continue;
        }
        double divisor = 0;
        if (!mean) {
            for (int k = 0; k < d; k++) divisor += x[k] * x[k];
            divisor = sqrt(divisor / d);
            if (divisor < 1e-6) divisor = 1e-6;
        }
        for (int k = 0; k < d; k++)
            x_hat[(size_t)i * d + k] = ref_round(mean ? (x[k] - mean[k]) / scale[k] : x[k] / divisor, precision);
    }
    return first_bad;
}

void ref_fourier_features(double *targets, const double *x_hat, const double *omega, int T, int d, int m) {
    for (int t = 0; t < T; t++)
        for (int k = 0; k < m; k++) {
            double phase = 0;
            for (int j = 0; j < d; j++) phase += x_hat[(size_t)t * d + j] * omega[(size_t)k * d + j];
            targets[(size_t)t * 2 * m + k] = sqrt(2.0) * cos(phase);
            targets[(size_t)t * 2 * m + m + k] = sqrt(2.0) * sin(phase);
        }
}
