// The element-wise ops on CUDA (kernels/ops.h): SwiGLU, add, scale and the sum of squares.
// Each element's arithmetic is the CPU's (kernels/cpu/ops.c, kernels/cpu/optimizer.c). The CPU
// build never fuses a product with a sum (C11, no FMA target), while nvcc does by default, so
// sums next to products are written with the _rn intrinsics, which nvcc never fuses.
#include "cuda_internal.h"

namespace {

constexpr unsigned THREADS = 256;

/* How n elements split between float4 accesses and single ones: [0, head) and
 * [head + 4·vecs, n) one at a time, the rest four at a time. Vectors only when every pointer
 * sits at the same offset within 16 bytes (pointers into an arena may be 4-byte aligned only);
 * an element's result does not depend on which way it went. */
struct vector_split {
    size_t head, vecs;
};

vector_split split_for(size_t n, const void *p0, const void *p1, const void *p2) {
    const uintptr_t offset = (uintptr_t)p0 & 15;
    if (((uintptr_t)p1 & 15) != offset || ((uintptr_t)p2 & 15) != offset || offset % 4) return {n, 0};
    const size_t head = ((16 - offset) & 15) / 4 < n ? ((16 - offset) & 15) / 4 : n;
    return {head, (n - head) / 4};
}

/* A grid-stride loop over the vectors, then over the (at most six, or all n) single elements. */
template <class Op> __global__ void map_kernel(Op op, size_t n, vector_split split) {
    const size_t stride = (size_t)gridDim.x * blockDim.x, first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (size_t v = first; v < split.vecs; v += stride) op.four(split.head + 4 * v);
    const size_t tail = split.head + 4 * split.vecs, singles = n - 4 * split.vecs;
    for (size_t s = first; s < singles; s += stride) op.one(s < split.head ? s : tail + (s - split.head));
}

template <class Op> int launch_map(es_device *dev, const char *name, const Op &op, size_t n, vector_split split) {
    if (n == 0) return 0;
    const size_t singles = n - 4 * split.vecs, work = split.vecs > singles ? split.vecs : singles;
    map_kernel<<<cuda_blocks(work, THREADS), THREADS, 0, cuda_stream(dev)>>>(op, n, split);
    CUDA_LAUNCHED(dev, name);
    return 0;
}

__device__ __forceinline__ float4 load4(const float *p) { return *reinterpret_cast<const float4 *>(p); }
__device__ __forceinline__ void store4(float *p, float4 v) { *reinterpret_cast<float4 *>(p) = v; }

/* No __restrict__ anywhere: out may be gate, up, a or b (each element is read before it is written). */
struct swiglu_op {
    float *out;              // (n)
    const float *gate, *up;  // (n)
    /* g / (1 + expf(-g)) * u, left to right as the CPU writes it; expf is CUDA's precise one
     * (within 2 ulp, where glibc's is within 1), the only place the two may differ. */
    static __device__ __forceinline__ float apply(float g, float u) {
        return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
    }
    __device__ void one(size_t i) const { out[i] = apply(gate[i], up[i]); }
    __device__ void four(size_t i) const {
        const float4 g = load4(gate + i), u = load4(up + i);
        store4(out + i, make_float4(apply(g.x, u.x), apply(g.y, u.y), apply(g.z, u.z), apply(g.w, u.w)));
    }
};

struct add_op {
    float *out;          // (n)
    const float *a, *b;  // (n)
    __device__ void one(size_t i) const { out[i] = a[i] + b[i]; }
    __device__ void four(size_t i) const {
        const float4 x = load4(a + i), y = load4(b + i);
        store4(out + i, make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w));
    }
};

struct scale_op {
    float *x;  // (n)
    float scale;
    __device__ void one(size_t i) const { x[i] *= scale; }
    __device__ void four(size_t i) const {
        const float4 v = load4(x + i);
        store4(x + i, make_float4(v.x * scale, v.y * scale, v.z * scale, v.w * scale));
    }
};

/* fp32 to bf16 bits, to nearest even (NaN stays NaN): the tensor cores' copy of an activation. */
struct round_bf16_op {
    uint16_t *out;    // (n)
    const float *in;  // (n)
    static __device__ __forceinline__ uint32_t bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
    __device__ void one(size_t i) const { out[i] = (uint16_t)bits(in[i]); }
    __device__ void four(size_t i) const { /* one 16-byte load, one 8-byte store */
        const float4 x = load4(in + i);
        *reinterpret_cast<uint2 *>(out + i) = make_uint2(bits(x.x) | bits(x.y) << 16, bits(x.z) | bits(x.w) << 16);
    }
};

/* The split for round_bf16_op: vectors where `in` is 16-byte aligned at the same element where
 * `out` is 8-byte aligned (both start so in the arenas and the scratch), else one at a time. */
vector_split split_for_rounding(size_t n, const float *in, const uint16_t *out) {
    const uintptr_t in_offset = (uintptr_t)in & 15, out_offset = (uintptr_t)out & 7;
    if (in_offset % 4 || out_offset % 2 || in_offset / 4 != out_offset / 2) return {n, 0};
    const size_t head = ((16 - in_offset) & 15) / 4 < n ? ((16 - in_offset) & 15) / 4 : n;
    return {head, (n - head) / 4};
}

/* bf16 bits of silu(gate) · up, computed as swiglu_op computes it: the down projection's input,
 * never stored in fp32. */
struct swiglu_bf16_op {
    uint16_t *out;           // (n)
    const float *gate, *up;  // (n)
    __device__ void one(size_t i) const { out[i] = (uint16_t)round_bf16_op::bits(swiglu_op::apply(gate[i], up[i])); }
    __device__ void four(size_t i) const {
        const float4 g = load4(gate + i), u = load4(up + i);
        const uint32_t b0 = round_bf16_op::bits(swiglu_op::apply(g.x, u.x)), b1 = round_bf16_op::bits(swiglu_op::apply(g.y, u.y));
        const uint32_t b2 = round_bf16_op::bits(swiglu_op::apply(g.z, u.z)), b3 = round_bf16_op::bits(swiglu_op::apply(g.w, u.w));
        *reinterpret_cast<uint2 *>(out + i) = make_uint2(b0 | b1 << 16, b2 | b3 << 16);
    }
};

/* ---- the sum of squares ---------------------------------------------------------------------- */

/* Elements per partial sum (one block each): the CPU's block, so the scratch is the CPU's too,
 * (ceil(n / SQUARES_BLOCK) + 1) doubles. */
constexpr size_t SQUARES_BLOCK = 1 << 16;
constexpr unsigned SQUARES_THREADS = 256, FINAL_THREADS = 1024;

/* x² of a float is exact in double, so whether nvcc fuses it into the sum changes nothing. */
__device__ __forceinline__ double squares4(double sum, float4 v) {
    sum += (double)v.x * v.x;
    sum += (double)v.y * v.y;
    sum += (double)v.z * v.z;
    return sum + (double)v.w * v.w;
}

/* partial[b] = Σ x² over block b. A thread visits the same elements in the same order whether
 * the loads are vectors (x 16-byte aligned) or not, so the bits do not depend on where x lies. */
__global__ void squares_kernel(double *partial /* (gridDim.x) */, const float *x /* (n) */, size_t n, bool aligned) {
    __shared__ double shared[SQUARES_THREADS];
    const size_t begin = blockIdx.x * SQUARES_BLOCK, len = n - begin < SQUARES_BLOCK ? n - begin : SQUARES_BLOCK;
    const float *chunk = x + begin; // (len)
    const size_t groups = len / 4, rest = len % 4;
    double sum = 0;
    for (size_t g = threadIdx.x; g < groups; g += SQUARES_THREADS) {
        const float *p = chunk + 4 * g;
        sum = squares4(sum, aligned ? load4(p) : make_float4(p[0], p[1], p[2], p[3]));
    }
    if (threadIdx.x < rest) sum += (double)chunk[4 * groups + threadIdx.x] * chunk[4 * groups + threadIdx.x];
    sum = cuda_block_sum(sum, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

/* *total = Σ partial, each thread adding a fixed stride of them in index order, then a fixed tree. */
__global__ void total_kernel(double *total, const double *partial /* (blocks) */, size_t blocks) {
    __shared__ double shared[FINAL_THREADS];
    double sum = 0;
    for (size_t b = threadIdx.x; b < blocks; b += FINAL_THREADS) sum += partial[b];
    sum = cuda_block_sum(sum, shared);
    if (threadIdx.x == 0) *total = sum;
}

} // namespace

int cuda_swiglu_forward(es_device *dev, float *out, const float *gate, const float *up, size_t n) {
    return launch_map(dev, "swiglu_forward", swiglu_op{out, gate, up}, n, split_for(n, out, gate, up));
}

int cuda_add(es_device *dev, float *out, const float *a, const float *b, size_t n) {
    return launch_map(dev, "add", add_op{out, a, b}, n, split_for(n, out, a, b));
}

int cuda_round_to_bf16(es_device *dev, const char *op, uint16_t *out, const float *in, size_t n) {
    return launch_map(dev, op, round_bf16_op{out, in}, n, split_for_rounding(n, in, out));
}

int cuda_swiglu_to_bf16(es_device *dev, const char *op, uint16_t *out, const float *gate, const float *up, size_t n) {
    vector_split split = split_for_rounding(n, gate, out);
    if (split.vecs && ((uintptr_t)up & 15) != ((uintptr_t)gate & 15)) split = {n, 0};
    return launch_map(dev, op, swiglu_bf16_op{out, gate, up}, n, split);
}

int cuda_scale(es_device *dev, float *x, size_t n, float scale) {
    if (n == 0) return 0;
    /* as the CPU's memset: +0 everywhere, NaN and inf too (-0.0f compares equal as well) */
    if (scale == 0.0f) {
        CUDA_TRY(dev, "scale", cudaMemsetAsync(x, 0, n * sizeof *x, cuda_stream(dev)));
        return 0;
    }
    return launch_map(dev, "scale", scale_op{x, scale}, n, split_for(n, x, x, x));
}

int cuda_sum_squares(es_device *dev, double *out, const float *x, size_t n) {
    *out = 0;
    if (n == 0) return 0;
    const size_t blocks = (n + SQUARES_BLOCK - 1) / SQUARES_BLOCK;
    if (blocks > 0x7fffffff)
        return es_device_fail(dev, ES_ERR_RUNTIME, "%s: sum_squares: %zu elements are more than a grid holds", dev->name, n);
    double *partial = (double *)es_device_scratch(dev, (blocks + 1) * sizeof(double)); // (blocks), then the total
    if (!partial) return ES_ERR_RUNTIME;
    cudaStream_t stream = cuda_stream(dev);
    squares_kernel<<<(unsigned)blocks, SQUARES_THREADS, 0, stream>>>(partial, x, n, ((uintptr_t)x & 15) == 0);
    CUDA_LAUNCHED(dev, "sum_squares");
    total_kernel<<<1, FINAL_THREADS, 0, stream>>>(partial + blocks, partial, blocks);
    CUDA_LAUNCHED(dev, "sum_squares");
    double *host = (double *)cuda_of(dev)->pinned; // host, one value
    CUDA_TRY(dev, "sum_squares", cudaMemcpyAsync(host, partial + blocks, sizeof *host, cudaMemcpyDeviceToHost, stream));
    CUDA_TRY(dev, "sum_squares", cudaStreamSynchronize(stream));
    *out = *host;
    return 0;
}
