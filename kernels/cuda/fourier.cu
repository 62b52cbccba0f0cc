// The Fourier projection's ops on the GPU (kernels/ops.h; DESIGN.md "The Fourier projection"): rounding
// to a GEMM precision, standardisation, and the features. kernels/cpu/project.c is the reference:
//  - rounding is bit for bit the CPU's (integer arithmetic on the bits, nothing from CUDA's conversions),
//  - standardisation is too: a row's sum of squares runs in double in the CPU's order (each square of a
//    float is exact in double, so a fused multiply-add gives the same sum), and the divisions are IEEE
//    ones on both sides (no --use_fast_math, whose -prec-div=false would break that),
//  - the features take one cuBLASLt product for the phases, in turns, and one epilogue with an exact range
//    reduction and full-precision sincospif.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "cuda_internal.h"

/* ---- precision ------------------------------------------------------------------------------- */

static __host__ __device__ inline uint32_t bits_of(float value) {
    uint32_t u;
    memcpy(&u, &value, 4);
    return u;
}

static __host__ __device__ inline float float_of(uint32_t u) {
    float value;
    memcpy(&value, &u, 4);
    return value;
}

// Keeps `bits` mantissa bits of a float32's bits, rounding to nearest even (NaN and inf kept); an overflow
// carries into the exponent and gives inf, as on the CPU.
static __host__ __device__ inline uint32_t round_mantissa_bits(uint32_t u, int bits) {
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    const int drop = 23 - bits;
    const uint32_t half = 1u << (drop - 1), lsb = (u >> drop) & 1u;
    return (u + half - 1 + lsb) & ~((1u << drop) - 1);
}

// fp8 e4m3fn: 3 mantissa bits, normals down to 2^-6, subnormals in steps of 2^-9, saturating at ±448
// (infinities too), NaN kept. The CPU's nearbyintf(|x|·2^9) for the subnormals is done on the integer
// significand here, so a flush-to-zero build could not change it either.
static __host__ __device__ inline uint32_t round_e4m3_bits(uint32_t u) {
    const uint32_t sign = u & 0x80000000u, magnitude = u & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return u;                     // NaN
    if (magnitude >= 0x43e00000u) return sign | 0x43e00000u;   // |x| >= 448 = 1.75 · 2^8, inf included
    if (magnitude < 0x3c800000u) {                             // |x| < 2^-6: the nearest multiple of 2^-9
        const uint32_t exponent = magnitude >> 23;
        uint32_t steps = 0;                                    // |x| / 2^-9, rounded; at most 8
        if (exponent) {                                        // an fp32 subnormal is below half a step
            // |x| · 2^9 = significand · 2^(exponent − 141), the shift at least 21 (exponent <= 120)
            const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
            const uint32_t shift = 141u - exponent;
            if (shift < 25) { // significand < 2^24, so a shift of 25 or more leaves less than half a step
                const uint32_t half = 1u << (shift - 1), lsb = (significand >> shift) & 1u;
                steps = (significand + half - 1 + lsb) >> shift;
            }
        }
        return sign | bits_of((float)steps * 0x1p-9f); // exact: a small integer times a power of two
    }
    const uint32_t rounded = round_mantissa_bits(magnitude, 3);
    return sign | (rounded > 0x43e00000u ? 0x43e00000u : rounded);
}

// The CPU's round_values for one value.
static __host__ __device__ inline float round_to_precision(float value, es_precision precision) {
    switch (precision) {
    case ES_PRECISION_TF32: return float_of(round_mantissa_bits(bits_of(value), 10));
    case ES_PRECISION_BF16: return float_of(round_mantissa_bits(bits_of(value), 7));
    case ES_PRECISION_FP8: return float_of(round_e4m3_bits(bits_of(value)));
    case ES_PRECISION_FP32: break;
    }
    return value;
}

__global__ void round_kernel(float *x /* (n) */, size_t n, es_precision precision) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = round_to_precision(x[i], precision);
}

int cuda_round_precision(es_device *dev, float *x, size_t n, es_precision precision) {
    if (n == 0 || precision == ES_PRECISION_FP32) return 0;
    round_kernel<<<cuda_blocks(n, 256), 256, 0, cuda_stream(dev)>>>(x, n, precision);
    CUDA_LAUNCHED(dev, "round_precision");
    return 0;
}

/* ---- scratch --------------------------------------------------------------------------------- */

static inline size_t aligned256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

// standardise: a double per row (its rms, or −1 for a row that is not finite), then the first bad index.
static size_t standardise_bytes(int64_t n) { return aligned256((size_t)n * sizeof(double)) + aligned256(sizeof(unsigned long long)); }

// fourier_features: the phases (T, m) fp32, then x_hat (T, d) and Ω (m, d) in the product's input format
// (2 bytes at most: bf16; fp32 and tf32 are read where they are).
static size_t features_bytes(int T, int d, int m, size_t input_bytes) {
    return aligned256((size_t)T * m * sizeof(float)) + aligned256((size_t)T * d * input_bytes) +
           aligned256((size_t)m * d * input_bytes);
}

size_t cuda_fourier_workspace(const es_workspace_plan *plan) {
    if (!plan->feature_in || plan->tokens <= 0) return 0;
    const size_t features = features_bytes(plan->tokens, plan->feature_in, plan->feature_phases, sizeof(__nv_bfloat16));
    const size_t standardise = standardise_bytes(plan->tokens);
    return features > standardise ? features : standardise;
}

/* ---- standardisation ------------------------------------------------------------------------- */

__global__ void first_bad_init_kernel(unsigned long long *first_bad, unsigned long long n) { *first_bad = n; }

// The host compiler (these helpers are __host__ __device__) knows no "#pragma unroll".
#ifdef __CUDA_ARCH__
#define DEVICE_UNROLL _Pragma("unroll")
#else
#define DEVICE_UNROLL
#endif

// A row's rms in the CPU's order (k = 0, 1, ...): max(sqrt(Σ x² / d), 1e-6), or −1 when a value is not
// finite. The loads come a 128-byte line at a time, ahead of the adds that wait on them (one thread per
// row has no other parallelism to hide memory latency with).
static __host__ __device__ inline double row_rms(const float *x /* (d) */, int d) {
    double sum_sq = 0;
    bool finite = true;
    int k = 0;
    for (; k + 32 <= d; k += 32) {
        float v[32];
        DEVICE_UNROLL
        for (int j = 0; j < 32; j++) v[j] = x[k + j];
        DEVICE_UNROLL
        for (int j = 0; j < 32; j++) finite &= isfinite(v[j]) != 0, sum_sq += (double)v[j] * v[j];
    }
    for (; k < d; k++) {
        const float v = x[k];
        finite &= isfinite(v) != 0, sum_sq += (double)v * v;
    }
    if (!finite) return -1.0;
    const double rms = sqrt(sum_sq / d);
    return rms > 1e-6 ? rms : 1e-6;
}

// One value of a finite row: (x − mean) / scale in float, or x / rms in double, then rounded.
static __host__ __device__ inline float standardised(float x, double rms, const float *mean, const float *scale, size_t k,
                                                      es_precision precision) {
    const float value = mean ? (x - mean[k]) / scale[k] : (float)((double)x / rms);
    return round_to_precision(value, precision);
}

// One thread per row (the sum is sequential, as the CPU's): rms[i] (unused where mean != NULL, but the
// finiteness test is the same), −1 for a row with a non-finite value, whose index goes into *first_bad.
__global__ void row_stats_kernel(double *rms /* (n) */, unsigned long long *first_bad, const float *__restrict__ rows /* (R, d) */,
                                 const int64_t *__restrict__ row_index /* (n) */, int64_t n, int d) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const double r = row_rms(rows + (size_t)row_index[i] * d, d);
        rms[i] = r;
        if (r < 0) atomicMin(first_bad, (unsigned long long)i);
    }
}

// x_hat[i][k] for the finite rows (the others are not written).
__global__ void standardise_kernel(float *x_hat /* (n, d) */, const double *rms /* (n) */, const float *rows /* (R, d) */,
                                   const int64_t *row_index /* (n) */, const float *mean /* (d) or NULL */,
                                   const float *scale /* (d) or NULL */, size_t total, int d, es_precision precision) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t i = e / (size_t)d, k = e % (size_t)d;
        const double r = rms[i];
        if (r < 0) continue;
        x_hat[e] = standardised(rows[(size_t)row_index[i] * d + k], r, mean, scale, k, precision);
    }
}

int cuda_standardise(es_device *dev, float *x_hat, int64_t *first_bad, const float *rows, const int64_t *row_index,
                     const float *mean, const float *scale, int64_t n, int d, es_precision precision) {
    const char *op = "standardise";
    if (n <= 0) {
        *first_bad = 0;
        return 0;
    }
    cuda_device *cd = cuda_of(dev);
    if (!cd->pinned || cd->pinned_bytes < sizeof(unsigned long long))
        return es_device_fail(dev, ES_ERR_RUNTIME, "%s: %s: no pinned host buffer for the result", dev->name, op);
    char *scratch = (char *)es_device_scratch(dev, standardise_bytes(n));
    if (!scratch) return ES_ERR_RUNTIME;
    double *rms = (double *)scratch;                                                          // (n)
    unsigned long long *bad = (unsigned long long *)(scratch + aligned256((size_t)n * sizeof(double))); // (1)
    cudaStream_t stream = cuda_stream(dev);

    first_bad_init_kernel<<<1, 1, 0, stream>>>(bad, (unsigned long long)n);
    CUDA_LAUNCHED(dev, op);
    row_stats_kernel<<<cuda_blocks((size_t)n, 128), 128, 0, stream>>>(rms, bad, rows, row_index, n, d);
    CUDA_LAUNCHED(dev, op);
    const size_t total = (size_t)n * (size_t)d;
    standardise_kernel<<<cuda_blocks(total, 256), 256, 0, stream>>>(x_hat, rms, rows, row_index, mean, scale, total, d,
                                                                     precision);
    CUDA_LAUNCHED(dev, op);
    CUDA_TRY(dev, op, cudaMemcpyAsync(cd->pinned, bad, sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream));
    CUDA_TRY(dev, op, cudaStreamSynchronize(stream));
    unsigned long long smallest;
    memcpy(&smallest, cd->pinned, sizeof smallest);
    *first_bad = (int64_t)smallest;
    return 0;
}

/* ---- features -------------------------------------------------------------------------------- */

__global__ void to_e4m3_kernel(__nv_fp8_storage_t *dst /* (n) */, const float *src /* (n) */, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __nv_cvt_float_to_fp8(src[i], __NV_SATFINITE, __NV_E4M3);
}

// targets[t] = √2 · [cos 2πy, sin 2πy] for the phases y in turns. r = y − rint(y) is exact (|y| < 2^23
// leaves the subtraction exact; beyond, y is an integer and r = 0), so sincospif(2r) sees the phase reduced
// to [−π, π] with no error of its own. √2 · c in double, then rounded, as the CPU's (float)(√2 · cos).
__global__ void features_kernel(float *targets /* (T, 2m) */, const float *turns /* (T, m) */, size_t total, int m) {
    const double root2 = 1.4142135623730951; // sqrt(2.0), as the CPU has it
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t t = e / (size_t)m, j = e % (size_t)m;
        const float y = turns[e];
        const float r = y - rintf(y);
        float s, c;
        sincospif(2.0f * r, &s, &c);
        float *out = targets + t * 2 * (size_t)m;
        out[j] = (float)(root2 * (double)c);
        out[m + j] = (float)(root2 * (double)s);
    }
}

// Events around the two phases of fourier_features, destroyed on every way out.
struct feature_events {
    cudaEvent_t start = nullptr, product = nullptr, end = nullptr;
    feature_events() = default;
    feature_events(const feature_events &) = delete;
    feature_events &operator=(const feature_events &) = delete;
    ~feature_events() {
        if (end) cudaEventDestroy(end);
        if (product) cudaEventDestroy(product);
        if (start) cudaEventDestroy(start);
    }
};

int cuda_fourier_features(es_device *dev, float *targets, const float *x_hat, const float *omega, float omega_scale, int T, int d, int m,
                          es_precision precision, es_fourier_timing *timing) {
    const char *op = "fourier_features";
    if (T <= 0) return 0;
    const cuda_device *cd = cuda_of(dev);
    // The product's input format. The inputs are rounded to the precision already, so converting them is
    // exact. fp8 needs d and m multiples of 16 (cuBLASLt's rule) and compute capability 8.9; elsewhere the
    // fp8 values go in as bf16, which holds every e4m3 value exactly: the same products, only their
    // accumulation order may differ.
    cuda_gemm_input input = CUDA_GEMM_F32;
    size_t input_bytes = 0; // 0: used where it is
    switch (precision) {
    case ES_PRECISION_FP32: break;
    case ES_PRECISION_TF32: input = CUDA_GEMM_TF32; break;
    case ES_PRECISION_BF16: input = CUDA_GEMM_BF16, input_bytes = 2; break;
    case ES_PRECISION_FP8: {
        const bool fp8 = d % 16 == 0 && m % 16 == 0 && cd->prop.major * 10 + cd->prop.minor >= 89;
        input = fp8 ? CUDA_GEMM_FP8_E4M3 : CUDA_GEMM_BF16;
        input_bytes = fp8 ? 1 : 2;
        break;
    }
    }
    char *scratch = (char *)es_device_scratch(dev, features_bytes(T, d, m, input_bytes));
    if (!scratch) return ES_ERR_RUNTIME;
    float *turns = (float *)scratch;                                       // (T, m)
    char *x_in = scratch + aligned256((size_t)T * m * sizeof(float));      // (T, d) in the input format
    char *omega_in = x_in + aligned256((size_t)T * d * input_bytes);       // (m, d) in the input format
    cudaStream_t stream = cuda_stream(dev);

    feature_events events;
    if (timing) {
        CUDA_TRY(dev, op, cudaEventCreate(&events.start));
        CUDA_TRY(dev, op, cudaEventCreate(&events.product));
        CUDA_TRY(dev, op, cudaEventCreate(&events.end));
        CUDA_TRY(dev, op, cudaEventRecord(events.start, stream));
    }
    const void *a = x_hat, *b = omega;
    const size_t x_n = (size_t)T * d, omega_n = (size_t)m * d;
    if (input == CUDA_GEMM_BF16) {
        int rc = cuda_round_to_bf16(dev, op, (uint16_t *)x_in, x_hat, x_n);
        if (!rc) rc = cuda_round_to_bf16(dev, op, (uint16_t *)omega_in, omega, omega_n);
        if (rc) return rc;
        a = x_in, b = omega_in;
    } else if (input == CUDA_GEMM_FP8_E4M3) {
        to_e4m3_kernel<<<cuda_blocks(x_n, 256), 256, 0, stream>>>((__nv_fp8_storage_t *)x_in, x_hat, x_n);
        CUDA_LAUNCHED(dev, op);
        to_e4m3_kernel<<<cuda_blocks(omega_n, 256), 256, 0, stream>>>((__nv_fp8_storage_t *)omega_in, omega, omega_n);
        CUDA_LAUNCHED(dev, op);
        a = x_in, b = omega_in;
    }
    // turns = x_hat Ωᵀ / 2π, accumulated in fp32: the phases in turns, for the exact reduction below.
    const float inverse_two_pi = 0.15915494309189535f;
    const int rc = cuda_gemm(dev, op, turns, a, b, nullptr, T, m, d, inverse_two_pi * omega_scale, input); /* a power of two: exact */
    if (rc) return rc;
    if (timing) CUDA_TRY(dev, op, cudaEventRecord(events.product, stream));
    const size_t total = (size_t)T * m;
    features_kernel<<<cuda_blocks(total, 256), 256, 0, stream>>>(targets, turns, total, m);
    CUDA_LAUNCHED(dev, op);
    if (timing) {
        CUDA_TRY(dev, op, cudaEventRecord(events.end, stream));
        CUDA_TRY(dev, op, cudaEventSynchronize(events.end));
        float gemm_ms = 0, epilogue_ms = 0;
        CUDA_TRY(dev, op, cudaEventElapsedTime(&gemm_ms, events.start, events.product));
        CUDA_TRY(dev, op, cudaEventElapsedTime(&epilogue_ms, events.product, events.end));
        timing->gemm_seconds += gemm_ms * 1e-3;
        timing->epilogue_seconds += epilogue_ms * 1e-3;
        timing->gemm_flops += 2.0 * T * (double)d * m;
    }
    return 0;
}
