// The loss terms on CUDA (kernels/ops.h), forward and backward in one call, beside their CPU
// reference (kernels/cpu/loss.c):
//  - latent MSE: rows normalised in double as the CPU does, the student head's products in true
//    fp32 (cuda_gemm / cuda_gemm_train with CUDA_GEMM_F32: the head is small, its gradient is what
//    the latent term trains), per-row errors summed on the host in token order.
//  - cross entropy: chunks of labelled rows, so the fp32 logits of the whole batch never exist at
//    once (a chunk's logits are at most CE_LOGIT_BYTES, 512 MiB: 883 rows at V = 151936, where 4 ×
//    2048 tokens would need 5 GB); the products on tensor cores with bf16 inputs (x, the head W in
//    the device's weight format, and the logits' gradient) and fp32 accumulation.
#include <math.h>

#include "cuda_internal.h"

namespace {

constexpr unsigned THREADS = 256;
constexpr size_t CE_LOGIT_BYTES = (size_t)512 << 20;
constexpr int LATENT_ROWS = 4096; /* rows per chunk of the latent term */


/* ĥ = h r, r = 1/sqrt(mean h² + eps) in double; a masked row is zero (r = 0). One block per row. */
__global__ void latent_normalise(float *normed /* (rows, C) */, double *r_out /* (rows) */, const float *h /* (rows, C) */,
                                 const uint8_t *mask /* (rows) */, int C, float eps) {
    __shared__ double shared[THREADS];
    const size_t row = blockIdx.x;
    const float *x = h + row * C;
    float *n = normed + row * C;
    if (!mask[row]) {
        for (int c = threadIdx.x; c < C; c += blockDim.x) n[c] = 0.0f;
        if (threadIdx.x == 0) r_out[row] = 0;
        return;
    }
    double squares = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) squares += (double)x[c] * x[c];
    squares = cuda_block_sum(squares, shared);
    const double r = 1.0 / sqrt(squares / C + (double)eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) n[c] = (float)(x[c] * r);
    if (threadIdx.x == 0) r_out[row] = r;
}

/* e = mean (y − target)², cos(y, target), and y becomes scale · 2 (y − target) / C. */
__global__ void latent_errors(float *y /* (rows, C) */, double *errors /* (rows) */, double *cosines /* (rows) */,
                              const float *target /* (rows, C) */, const uint8_t *mask, int C, float scale) {
    __shared__ double shared[THREADS];
    const size_t row = blockIdx.x;
    float *yi = y + row * C;
    if (!mask[row]) {
        for (int c = threadIdx.x; c < C; c += blockDim.x) yi[c] = 0.0f;
        if (threadIdx.x == 0) errors[row] = 0, cosines[row] = 0;
        return;
    }
    const float *ti = target + row * C;
    const double grad_scale = 2.0 * scale / C;
    double sq = 0, dot = 0, yy = 0, tt = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const double diff = (double)yi[c] - ti[c];
        sq += diff * diff, dot += (double)yi[c] * ti[c], yy += (double)yi[c] * yi[c], tt += (double)ti[c] * ti[c];
    }
    sq = cuda_block_sum(sq, shared), dot = cuda_block_sum(dot, shared), yy = cuda_block_sum(yy, shared), tt = cuda_block_sum(tt, shared);
    for (int c = threadIdx.x; c < C; c += blockDim.x) yi[c] = (float)(grad_scale * ((double)yi[c] - ti[c]));
    if (threadIdx.x == 0) errors[row] = sq / C, cosines[row] = yy > 0 && tt > 0 ? dot / sqrt(yy * tt) : 0;
}

/* dh = r dĥ − h r³ mean(h ∘ dĥ); zero where masked. */
__global__ void latent_through_norm(float *dh /* (rows, C) */, const float *dnormed /* (rows, C) */, const float *h,
                                    const double *r, const uint8_t *mask, int C) {
    __shared__ double shared[THREADS];
    const size_t row = blockIdx.x;
    float *out = dh + row * C;
    if (!mask[row]) {
        for (int c = threadIdx.x; c < C; c += blockDim.x) out[c] = 0.0f;
        return;
    }
    const float *x = h + row * C, *dn = dnormed + row * C;
    double dot = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) dot += (double)x[c] * dn[c];
    dot = cuda_block_sum(dot, shared);
    const double ri = r[row], correction = ri * ri * ri * dot / C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) out[c] = (float)(ri * dn[c] - x[c] * correction);
}

/* ---- cross entropy ---- */

/* rows_x[i] = bf16(x[row_t[i]]). */
__global__ void gather_rows(__nv_bfloat16 *rows_x /* (rows, C) */, const float *x /* (T, C) */, const int32_t *row_t, int rows, int C) {
    const size_t n = (size_t)rows * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        rows_x[i] = __float2bfloat16_rn(x[(size_t)row_t[i / C] * C + i % C]);
}

/* One block per row: its max logit and Σ exp(logit − max) (double, fixed tree), its loss
 * max + log Σ − logit[label]; then, with dlogits, scale · (softmax − onehot) in bf16. */
__global__ void softmax_rows(__nv_bfloat16 *dlogits /* (rows, V) or NULL */, double *losses /* (rows) */, const float *logits,
                             const int32_t *row_label, int V, float scale) {
    __shared__ double shared[THREADS];
    __shared__ float shared_max[THREADS];
    const size_t row = blockIdx.x;
    const float *l = logits + row * V;
    float max_logit = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) max_logit = fmaxf(max_logit, l[v]);
    shared_max[threadIdx.x] = max_logit;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) shared_max[threadIdx.x] = fmaxf(shared_max[threadIdx.x], shared_max[threadIdx.x + half]);
        __syncthreads();
    }
    max_logit = shared_max[0];
    double total = 0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) total += expf(l[v] - max_logit);
    total = cuda_block_sum(total, shared);
    const int label = row_label[row];
    if (threadIdx.x == 0) losses[row] = (double)max_logit + log(total) - l[label];
    if (!dlogits) return;
    const float factor = (float)(scale / total);
    __nv_bfloat16 *d = dlogits + row * V;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float p = __fmul_rn(expf(l[v] - max_logit), factor);
        if (v == label) p = __fsub_rn(p, scale);
        d[v] = __float2bfloat16_rn(p);
    }
}

/* dx[row_t[i]] = dx_rows[i] (the other rows were zeroed). */
__global__ void scatter_rows(float *dx, const float *dx_rows, const int32_t *row_t, int rows, int C) {
    const size_t n = (size_t)rows * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dx[(size_t)row_t[i / C] * C + i % C] = dx_rows[i];
}

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

int ce_chunk_rows(int V) {
    const size_t rows = CE_LOGIT_BYTES / ((size_t)V * sizeof(float));
    return rows < 1 ? 1 : rows > 4096 ? 4096 : (int)rows;
}

/* The pieces of the cross entropy's scratch for chunks of `rows` rows. */
struct ce_layout {
    size_t logits, dlogits, rows_x, dx_rows, row_t, row_label, losses, total;
};

ce_layout ce_layout_of(int rows, int C, int V) {
    const size_t R = (size_t)rows;
    ce_layout l;
    size_t at = 0;
    l.logits = at, at += align_up(R * V * sizeof(float));
    l.dlogits = at, at += align_up(R * V * sizeof(__nv_bfloat16));
    l.rows_x = at, at += align_up(R * C * sizeof(__nv_bfloat16));
    l.dx_rows = at, at += align_up(R * C * sizeof(float));
    l.row_t = at, at += align_up(R * sizeof(int32_t));
    l.row_label = at, at += align_up(R * sizeof(int32_t));
    l.losses = at, at += align_up(R * sizeof(double));
    l.total = at;
    return l;
}

size_t latent_scratch(int rows, int C) { return 2 * align_up((size_t)rows * C * sizeof(float)) + 3 * align_up((size_t)rows * sizeof(double)); }

} // namespace

size_t cuda_loss_workspace(const es_workspace_plan *plan) {
    size_t bytes = 0;
    const int tokens = plan->tokens > 0 ? plan->tokens : 1;
    if (plan->latent_width) bytes = latent_scratch(tokens < LATENT_ROWS ? tokens : LATENT_ROWS, plan->latent_width);
    if (plan->vocab && plan->ce_width) {
        const int rows = ce_chunk_rows(plan->vocab) < tokens ? ce_chunk_rows(plan->vocab) : tokens;
        const size_t ce = ce_layout_of(rows, plan->ce_width, plan->vocab).total;
        bytes = ce > bytes ? ce : bytes;
    }
    return bytes;
}

int cuda_latent_mse(es_device *dev, double *loss_sum, double *cosine_sum, float *dh, float *dhead, const float *h,
                    const float *target, const uint8_t *mask, const float *head, int T, int C, float eps, float scale) {
    *loss_sum = 0;
    if (cosine_sum) *cosine_sum = 0;
    if (T <= 0) return 0;
    const int chunk = T < LATENT_ROWS ? T : LATENT_ROWS;
    char *scratch = (char *)es_device_scratch(dev, latent_scratch(chunk, C));
    if (!scratch) return ES_ERR_RUNTIME;
    float *normed = (float *)scratch;                                                   // (chunk, C) ĥ, then ∂/∂ĥ
    float *y = (float *)(scratch + align_up((size_t)chunk * C * sizeof(float)));        // (chunk, C) y, then ∂/∂y
    double *r = (double *)((char *)y + align_up((size_t)chunk * C * sizeof(float)));    // (chunk)
    double *errors = r + align_up((size_t)chunk * sizeof(double)) / sizeof(double);     // (chunk)
    double *cosines = errors + align_up((size_t)chunk * sizeof(double)) / sizeof(double); // (chunk)
    void *room = NULL;
    int rc = cuda_pinned_room(dev, 2 * (size_t)chunk * sizeof(double), &room);
    if (rc) return rc;
    double *host = (double *)room; // (2, chunk)
    cudaStream_t stream = cuda_stream(dev);
    double total = 0, cosine_total = 0;
    for (int t0 = 0; t0 < T; t0 += chunk) {
        const int rows = T - t0 < chunk ? T - t0 : chunk;
        const size_t at = (size_t)t0 * C;
        latent_normalise<<<(unsigned)rows, THREADS, 0, stream>>>(normed, r, h + at, mask + t0, C, eps);
        CUDA_LAUNCHED(dev, "latent_mse");
        // y = ĥ @ headᵀ  (rows, C)
        if (head) rc = cuda_gemm(dev, "latent_mse", y, normed, head, NULL, rows, C, C, 1.0f, CUDA_GEMM_F32);
        else CUDA_TRY(dev, "latent_mse", cudaMemcpyAsync(y, normed, (size_t)rows * C * sizeof *y, cudaMemcpyDeviceToDevice, stream));
        if (rc) return rc;
        latent_errors<<<(unsigned)rows, THREADS, 0, stream>>>(y, errors, cosines, target + at, mask + t0, C, scale);
        CUDA_LAUNCHED(dev, "latent_mse");
        if (dh) {
            if (head) {
                // dhead += dyᵀ ĥ  (C, C);  ∂/∂ĥ = dy @ head  (rows, C)
                if (dhead) rc = cuda_gemm_train(dev, "latent_mse", dhead, y, 1, normed, 0, C, C, rows, 1.0f, 1.0f, CUDA_GEMM_F32);
                if (!rc) rc = cuda_gemm_train(dev, "latent_mse", normed, y, 0, head, 0, rows, C, C, 1.0f, 0.0f, CUDA_GEMM_F32);
                if (rc) return rc;
            } else {
                CUDA_TRY(dev, "latent_mse", cudaMemcpyAsync(normed, y, (size_t)rows * C * sizeof *y, cudaMemcpyDeviceToDevice, stream));
            }
            latent_through_norm<<<(unsigned)rows, THREADS, 0, stream>>>(dh + at, normed, h + at, r, mask + t0, C);
            CUDA_LAUNCHED(dev, "latent_mse");
        }
        CUDA_TRY(dev, "latent_mse", cudaMemcpyAsync(host, errors, (size_t)rows * sizeof(double), cudaMemcpyDeviceToHost, stream));
        CUDA_TRY(dev, "latent_mse",
                 cudaMemcpyAsync(host + chunk, cosines, (size_t)rows * sizeof(double), cudaMemcpyDeviceToHost, stream));
        CUDA_TRY(dev, "latent_mse", cudaStreamSynchronize(stream));
        for (int i = 0; i < rows; i++) total += host[i], cosine_total += host[chunk + i]; /* token order, as the CPU */
    }
    *loss_sum = total;
    if (cosine_sum) *cosine_sum = cosine_total;
    return 0;
}

int cuda_cross_entropy(es_device *dev, double *loss_sum, float *dx, float *dW, const float *x, const void *W, const int32_t *labels,
                       int T, int C, int V, float scale) {
    *loss_sum = 0;
    if (T <= 0) {
        return 0;
    }
    cudaStream_t stream = cuda_stream(dev);
    // the labels on the host: checked, and the labelled rows listed
    void *room = NULL;
    int rc = cuda_pinned_room(dev, (size_t)T * sizeof(int32_t), &room);
    if (rc) return rc;
    int32_t *host_labels = (int32_t *)room;
    CUDA_TRY(dev, "cross_entropy", cudaMemcpyAsync(host_labels, labels, (size_t)T * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
    CUDA_TRY(dev, "cross_entropy", cudaStreamSynchronize(stream));
    int32_t *list = (int32_t *)malloc(2 * (size_t)T * sizeof(int32_t)); // (T) row_t, then (T) their labels
    if (!list) return es_device_fail(dev, ES_ERR_RUNTIME, "cross entropy: out of memory");
    int labelled = 0;
    for (int t = 0; t < T && !rc; t++) {
        if (host_labels[t] < -1 || host_labels[t] >= V)
            rc = es_device_fail(dev, ES_ERR_DATA, "cross entropy: token %d has label %d, outside [-1, %d)", t, host_labels[t], V);
        else if (host_labels[t] >= 0) list[labelled] = t, list[T + labelled] = host_labels[t], labelled++;
    }
    if (!rc && dx) {
        const cudaError_t zeroed = cudaMemsetAsync(dx, 0, (size_t)T * C * sizeof *dx, stream);
        if (zeroed != cudaSuccess) rc = cuda_fail(dev, "cross_entropy", "cudaMemsetAsync", zeroed);
    }
    const int chunk = ce_chunk_rows(V) < labelled ? ce_chunk_rows(V) : labelled;
    const ce_layout l = ce_layout_of(chunk > 0 ? chunk : 1, C, V);
    char *scratch = rc || !labelled ? NULL : (char *)es_device_scratch(dev, l.total);
    if (!rc && labelled && !scratch) rc = ES_ERR_RUNTIME;
    double total = 0;
    for (int r0 = 0; !rc && r0 < labelled; r0 += chunk) {
        const int rows = labelled - r0 < chunk ? labelled - r0 : chunk;
        float *logits = (float *)(scratch + l.logits), *dx_rows = (float *)(scratch + l.dx_rows);
        __nv_bfloat16 *dlogits = (__nv_bfloat16 *)(scratch + l.dlogits), *rows_x = (__nv_bfloat16 *)(scratch + l.rows_x);
        int32_t *row_t = (int32_t *)(scratch + l.row_t), *row_label = (int32_t *)(scratch + l.row_label);
        double *losses = (double *)(scratch + l.losses);
        cudaError_t copied = cudaMemcpyAsync(row_t, list + r0, (size_t)rows * sizeof(int32_t), cudaMemcpyHostToDevice, stream);
        if (copied == cudaSuccess)
            copied = cudaMemcpyAsync(row_label, list + T + r0, (size_t)rows * sizeof(int32_t), cudaMemcpyHostToDevice, stream);
        if (copied != cudaSuccess) {
            rc = cuda_fail(dev, "cross_entropy", "cudaMemcpyAsync", copied);
            break;
        }
        gather_rows<<<cuda_blocks((size_t)rows * C, THREADS), THREADS, 0, stream>>>(rows_x, x, row_t, rows, C);
        // logits (rows, V) = x rows @ Wᵀ
        if ((rc = cuda_gemm(dev, "cross_entropy", logits, rows_x, W, NULL, rows, V, C, 1.0f, CUDA_GEMM_BF16))) break;
        softmax_rows<<<(unsigned)rows, THREADS, 0, stream>>>(dx ? dlogits : NULL, losses, logits, row_label, V, scale);
        if (dx) {
            // dW (V, C) += dlogitsᵀ @ x rows;  dx rows (rows, C) = dlogits @ W
            if (dW && (rc = cuda_gemm_train(dev, "cross_entropy", dW, dlogits, 1, rows_x, 0, V, C, rows, 1.0f, 1.0f, CUDA_GEMM_BF16)))
                break;
            if ((rc = cuda_gemm_train(dev, "cross_entropy", dx_rows, dlogits, 0, W, 0, rows, C, V, 1.0f, 0.0f, CUDA_GEMM_BF16))) break;
            scatter_rows<<<cuda_blocks((size_t)rows * C, THREADS), THREADS, 0, stream>>>(dx, dx_rows, row_t, rows, C);
        }
        const cudaError_t launched = cudaGetLastError();
        if (launched != cudaSuccess) {
            rc = cuda_fail(dev, "cross_entropy", "a kernel launch", launched);
            break;
        }
        void *loss_room = NULL;
        if ((rc = cuda_pinned_room(dev, (size_t)rows * sizeof(double), &loss_room))) break;
        const double *host_losses = (const double *)loss_room;
        copied = cudaMemcpyAsync(loss_room, losses, (size_t)rows * sizeof(double), cudaMemcpyDeviceToHost, stream);
        if (copied == cudaSuccess) copied = cudaStreamSynchronize(stream);
        if (copied != cudaSuccess) {
            rc = cuda_fail(dev, "cross_entropy", "the losses' copy", copied);
            break;
        }
        for (int i = 0; i < rows; i++) total += host_losses[i]; /* row order, as the CPU */
    }
    free(list);
    if (!rc) *loss_sum = total;
    return rc;
}
