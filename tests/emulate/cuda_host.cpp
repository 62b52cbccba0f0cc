// The CUDA backend on the host: the runtime, the block's fibers and the warp instructions, the
// number formats and cuBLASLt of include/cuda_host.h (which says what this is for and what it
// leaves out). x86-64 only: the fibers switch stacks with a few instructions of their own.
#include "cuda_host.h"

#ifndef __x86_64__
#error "the fibers' stack switch (emu_switch) is written for x86-64"
#endif

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#include <map>
#include <mutex>
#include <vector>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// ---- fibers ----------------------------------------------------------------------------------------

// emu_switch(save, load): saves the callee-saved registers on the current stack, its stack
// pointer in *save, and resumes the stack `load` (one saved by emu_switch or made by new_stack).
asm(R"(
.pushsection .text
.globl emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
.popsection
)");
extern "C" void emu_switch(void **save, void *load);

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;

// What the lanes post for a warp instruction. Two sets, by the parity of the warp's barrier
// generation: a lane can be at most one instruction ahead of the slowest one (the next meeting
// waits for it), so the next instruction's posts never overwrite what a slow lane still reads.
struct posted {
    uint32_t words[32][8];
    float values[32];
};
struct warp_state {
    unsigned arrived = 0, generation = 0, alive = 0;
    posted slots[2];
};

struct block_state {
    void *scheduler_sp = nullptr;
    std::vector<void *> sp;           // each fiber's saved stack pointer
    std::vector<unsigned char> done;  // each fiber's
    std::vector<const unsigned *> wait_on; // each fiber's barrier generation it waits to change, or null
    std::vector<unsigned> wait_generation;
    std::vector<warp_state> warps;
    unsigned current = 0, alive = 0, arrived = 0, generation = 0;
    const std::function<void()> *body = nullptr;
    std::vector<unsigned char> smem;
};

std::mutex launch_lock;             // one launch at a time, whichever host thread makes it
block_state *running;               // the block being run
std::vector<char *> stack_pool;     // kMaxThreads stacks, made on first use
thread_local cudaError_t last_error = cudaSuccess;

void set_thread_index(unsigned i) { threadIdx = {i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)}; }

// Passes the core to the next fiber after the current one that can run (not done, its barrier, if
// any, met), straight from stack to stack; back to the launch once every fiber is done. A block
// whose live fibers all wait at barriers that nothing can meet any more is a bug in the kernel.
void run_next() {
    block_state *b = running;
    const unsigned me = b->current, n = (unsigned)b->sp.size();
    void *unused;
    for (unsigned step = 1; step <= n; step++) {
        const unsigned i = (me + step) % n;
        if (b->done[i]) continue;
        if (b->wait_on[i]) {
            if (*b->wait_on[i] == b->wait_generation[i]) continue;
            b->wait_on[i] = nullptr;
        }
        if (i == me) return;
        b->current = i;
        set_thread_index(i);
        emu_switch(b->done[me] ? &unused : &b->sp[me], b->sp[i]);
        return; // resumed by another fiber, which made this one current
    }
    if (b->alive) {
        fprintf(stderr, "emulated kernel: the threads of block (%u, %u, %u) wait at barriers that can never be met\n", blockIdx.x,
                blockIdx.y, blockIdx.z);
        abort();
    }
    emu_switch(&unused, b->scheduler_sp);
}

void release_block_if_met(block_state *b) {
    if (b->arrived && b->arrived >= b->alive) b->arrived = 0, b->generation++;
}
void release_warp_if_met(warp_state &w) {
    if (w.arrived && w.arrived >= w.alive) w.arrived = 0, w.generation++;
}

extern "C" [[noreturn]] void emu_fiber_main() {
    block_state *b = running;
    (*b->body)();
    b = running;
    b->done[b->current] = 1, b->alive--;
    warp_state &w = b->warps[b->current / 32];
    w.alive--;
    release_block_if_met(b);
    release_warp_if_met(w);
    run_next();
    abort(); // never resumed
}

// A stack whose first emu_switch "returns" into emu_fiber_main with the ABI's alignment.
void *new_stack(char *base) {
    uintptr_t top = ((uintptr_t)base + kStackBytes) & ~(uintptr_t)15;
    void **slot = (void **)(top - 16); // 16-byte aligned: after `ret` the stack is as after a call
    slot[0] = (void *)&emu_fiber_main;
    slot[1] = nullptr;
    void **sp = slot - 6;
    for (int i = 0; i < 6; i++) sp[i] = nullptr;
    return sp;
}

warp_state &my_warp() { return running->warps[running->current / 32]; }
int my_lane() { return (int)(running->current % 32); }

void warp_sync() {
    block_state *b = running;
    warp_state &w = b->warps[b->current / 32];
    const unsigned generation = w.generation;
    if (++w.arrived >= w.alive) {
        w.arrived = 0, w.generation++;
        return;
    }
    b->wait_on[b->current] = &w.generation, b->wait_generation[b->current] = generation;
    while (w.generation == generation) run_next();
}

std::mutex kernels_lock;
std::map<const void *, int> &dynamic_smem_limits() { // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
    static std::map<const void *, int> limits;
    return limits;
}

} // namespace

void __syncthreads() {
    block_state *b = running;
    const unsigned generation = b->generation;
    if (++b->arrived >= b->alive) {
        b->arrived = 0, b->generation++;
        return;
    }
    b->wait_on[b->current] = &b->generation, b->wait_generation[b->current] = generation;
    while (b->generation == generation) run_next();
}

unsigned char *emu_dynamic_smem() { return running->smem.data(); }

float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    warp_state &w = my_warp();
    const int lane = my_lane();
    posted &p = w.slots[w.generation & 1];
    p.values[lane] = value;
    warp_sync();
    return p.values[lane ^ lane_mask];
}

bool __any_sync(unsigned, bool predicate) {
    warp_state &w = my_warp();
    posted &p = w.slots[w.generation & 1];
    p.words[my_lane()][0] = predicate;
    warp_sync();
    bool any = false;
    for (unsigned l = 0; l < 32; l++) any = any || p.words[l][0];
    return any;
}

// ldmatrix .x4: lane l names row l % 8 of matrix l / 8; lane l receives, of each matrix i, row
// l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (low half first), or transposed, rows 2 (l % 4) and
// 2 (l % 4) + 1 of column l / 4.
void emu_ldmatrix_x4(uint32_t (&r)[4], uint32_t address, bool transposed) {
    warp_state &w = my_warp();
    const int lane = my_lane();
    if (address % 16 || address + 16 > running->smem.size()) {
        fprintf(stderr, "emulated ldmatrix: row address %u unaligned or outside the %zu bytes of shared memory\n", address,
                running->smem.size());
        abort();
    }
    posted &p = w.slots[w.generation & 1];
    p.words[lane][0] = address;
    warp_sync();
    const unsigned char *smem = running->smem.data();
    auto half_at = [&](uint32_t at) {
        uint16_t h;
        memcpy(&h, smem + at, sizeof h);
        return (uint32_t)h;
    };
    for (int i = 0; i < 4; i++) {
        if (!transposed) {
            const uint32_t row = p.words[i * 8 + lane / 4][0];
            r[i] = half_at(row + (lane % 4) * 4) | half_at(row + (lane % 4) * 4 + 2) << 16;
        } else {
            r[i] = half_at(p.words[i * 8 + (lane % 4) * 2][0] + (lane / 4) * 2) |
                   half_at(p.words[i * 8 + (lane % 4) * 2 + 1][0] + (lane / 4) * 2) << 16;
        }
    }
}

// mma.sync m16n8k16 bf16 -> fp32: lane l (g = l / 4, t = l % 4) holds A rows g, g + 8 at columns
// 2t, 2t + 1 (a0 a1) and 2t + 8, 2t + 9 (a2 a3), B column g at rows 2t, 2t + 1 (b0) and 2t + 8,
// 2t + 9 (b1), and D rows g, g + 8 at columns 2t, 2t + 1. The k-sum in fp32, in k order.
void emu_mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    warp_state &w = my_warp();
    const int lane = my_lane();
    posted &p = w.slots[w.generation & 1];
    for (int i = 0; i < 4; i++) p.words[lane][i] = a[i];
    p.words[lane][4] = b0, p.words[lane][5] = b1;
    warp_sync();
    auto value = [](uint32_t bits, int high) { return __uint_as_float((high ? bits >> 16 : bits & 0xffff) << 16); };
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; e++) { // d is this lane's own: the others read only what was posted
        const int row = g + (e / 2) * 8, col = 2 * t + e % 2;
        float sum = d[e];
        for (int kk = 0; kk < 16; kk++) {
            // A[row][kk]: held by lane (row % 8) * 4 + (kk % 8) / 2, register (row / 8) + 2 (kk / 8)
            const uint32_t a_bits = p.words[(row % 8) * 4 + (kk % 8) / 2][(row / 8) + 2 * (kk / 8)];
            // B[kk][col]: held by lane col * 4 + (kk % 8) / 2, register b0 (kk < 8) or b1
            const uint32_t b_bits = p.words[col * 4 + (kk % 8) / 2][4 + kk / 8];
            sum = fmaf(value(a_bits, kk % 2), value(b_bits, kk % 2), sum);
        }
        d[e] = sum;
    }
}

// ---- launches --------------------------------------------------------------------------------------

void emu_launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, const void *kernel, const std::function<void()> &body) {
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (!threads || threads > kMaxThreads || block.z > 64 || !grid.x || !grid.y || !grid.z || grid.x > 0x7fffffffu ||
        grid.y > 65535 || grid.z > 65535) {
        last_error = cudaErrorInvalidConfiguration;
        return;
    }
    int allowed = 48 * 1024;
    {
        std::lock_guard<std::mutex> hold(kernels_lock);
        auto it = dynamic_smem_limits().find(kernel);
        if (it != dynamic_smem_limits().end()) allowed = it->second;
    }
    if (smem_bytes > (size_t)allowed) {
        last_error = cudaErrorInvalidValue; // as CUDA: too much dynamic shared memory for the kernel
        return;
    }
    std::lock_guard<std::mutex> turn(launch_lock);
    if (stack_pool.empty())
        for (unsigned i = 0; i < kMaxThreads; i++) {
            void *p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED) abort();
            stack_pool.push_back((char *)p);
        }
    block_state b;
    b.body = &body;
    b.sp.resize(threads);
    b.done.resize(threads);
    b.wait_on.resize(threads);
    b.wait_generation.resize(threads);
    b.warps.resize((threads + 31) / 32);
    b.smem.resize(smem_bytes + 16);
    blockDim = block, gridDim = grid;
    running = &b;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = {x, y, z};
                // shared memory starts as garbage (NaN as floats), as a GPU's does not start as zeros
                memset(b.smem.data(), 0xff, b.smem.size());
                for (unsigned i = 0; i < threads; i++) b.sp[i] = new_stack(stack_pool[i]), b.done[i] = 0, b.wait_on[i] = nullptr;
                for (size_t w = 0; w < b.warps.size(); w++)
                    b.warps[w] = warp_state(), b.warps[w].alive = (unsigned)std::min<unsigned long long>(32, threads - w * 32);
                b.alive = (unsigned)threads, b.arrived = 0, b.generation = 0;
                b.current = 0;
                set_thread_index(0);
                emu_switch(&b.scheduler_sp, b.sp[0]); // back when every fiber is done
            }
    running = nullptr;
}

// ---- the runtime -----------------------------------------------------------------------------------

namespace {

std::mutex memory_lock;
std::map<uintptr_t, size_t> device_allocations, host_allocations; // start -> bytes
size_t device_bytes_in_use = 0;
constexpr size_t kDeviceMemory = 16ull << 30;

bool within(const std::map<uintptr_t, size_t> &allocations, const void *ptr) {
    const uintptr_t p = (uintptr_t)ptr;
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p < it->first + std::max<size_t>(it->second, 1);
}

} // namespace

struct emu_stream {
    unsigned flags;
};
struct emu_event {
    double seconds;
};

const char *cudaGetErrorString(cudaError_t error) {
    switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    }
    return "unknown error";
}

cudaError_t cudaGetLastError() {
    const cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}
cudaError_t cudaGetDeviceCount(int *count) {
    *count = 1;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device) {
    if (device != 0) return cudaErrorInvalidDevice;
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "host emulation of sm_90 (tests/emulate)");
    prop->major = 9, prop->minor = 0;
    prop->sharedMemPerBlockOptin = 227 * 1024, prop->sharedMemPerBlock = 48 * 1024, prop->totalGlobalMem = kDeviceMemory;
    prop->multiProcessorCount = 132, prop->maxThreadsPerBlock = 1024, prop->warpSize = 32;
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
    std::lock_guard<std::mutex> hold(memory_lock);
    *total_bytes = kDeviceMemory, *free_bytes = kDeviceMemory - std::min(kDeviceMemory, device_bytes_in_use);
    return cudaSuccess;
}
cudaError_t cudaMalloc(void **ptr, size_t bytes) {
    *ptr = nullptr;
    std::lock_guard<std::mutex> hold(memory_lock);
    if (device_bytes_in_use + bytes > kDeviceMemory) return cudaErrorMemoryAllocation;
    void *p = aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
    if (!p) return cudaErrorMemoryAllocation;
    memset(p, 0xff, bytes); // device memory starts as garbage, not zeros
    device_allocations[(uintptr_t)p] = bytes, device_bytes_in_use += bytes;
    *ptr = p;
    return cudaSuccess;
}
cudaError_t cudaFree(void *ptr) {
    if (!ptr) return cudaSuccess;
    std::lock_guard<std::mutex> hold(memory_lock);
    auto it = device_allocations.find((uintptr_t)ptr);
    if (it == device_allocations.end()) return cudaErrorInvalidValue;
    device_bytes_in_use -= it->second;
    device_allocations.erase(it);
    free(ptr);
    return cudaSuccess;
}
cudaError_t cudaHostAlloc(void **ptr, size_t bytes, unsigned) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    if (!p) return cudaErrorMemoryAllocation;
    std::lock_guard<std::mutex> hold(memory_lock);
    host_allocations[(uintptr_t)p] = bytes;
    *ptr = p;
    return cudaSuccess;
}
cudaError_t cudaFreeHost(void *ptr) {
    if (!ptr) return cudaSuccess;
    std::lock_guard<std::mutex> hold(memory_lock);
    if (!host_allocations.erase((uintptr_t)ptr)) return cudaErrorInvalidValue;
    free(ptr);
    return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *attributes, const void *ptr) {
    std::lock_guard<std::mutex> hold(memory_lock);
    memset(attributes, 0, sizeof *attributes);
    if (within(device_allocations, ptr)) attributes->type = cudaMemoryTypeDevice, attributes->devicePointer = (void *)ptr;
    else if (within(host_allocations, ptr)) attributes->type = cudaMemoryTypeHost, attributes->hostPointer = (void *)ptr;
    else attributes->type = cudaMemoryTypeUnregistered;
    return cudaSuccess;
}
// Copies check what they can: a device side must lie in device memory.
static cudaError_t copy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    if (!bytes) return cudaSuccess;
    {
        std::lock_guard<std::mutex> hold(memory_lock);
        const bool dst_device = within(device_allocations, dst) && within(device_allocations, (char *)dst + bytes - 1);
        const bool src_device = within(device_allocations, src) && within(device_allocations, (const char *)src + bytes - 1);
        if ((kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice) && !dst_device) return cudaErrorInvalidValue;
        if ((kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice) && !src_device) return cudaErrorInvalidValue;
    }
    memmove(dst, src, bytes);
    return cudaSuccess;
}
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) { return copy(dst, src, bytes, kind); }
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
    return copy(dst, src, bytes, kind);
}
cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t) {
    if (!bytes) return cudaSuccess;
    {
        std::lock_guard<std::mutex> hold(memory_lock);
        if (!within(device_allocations, dst) || !within(device_allocations, (char *)dst + bytes - 1)) return cudaErrorInvalidValue;
    }
    memset(dst, value, bytes);
    return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned flags) {
    *stream = new emu_stream{flags};
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    delete stream;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t event, unsigned) { return event ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaEventCreate(cudaEvent_t *event) {
    *event = new emu_event{0};
    return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned) { return cudaEventCreate(event); }
cudaError_t cudaEventDestroy(cudaEvent_t event) {
    delete event;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) { // the work before it is done: now is its time
    if (!event) return cudaErrorInvalidValue;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    event->seconds = (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) { return event ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    *ms = (float)(1e3 * (end->seconds - start->seconds));
    return cudaSuccess;
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attributes, const void *) {
    memset(attributes, 0, sizeof *attributes);
    attributes->binaryVersion = 90, attributes->ptxVersion = 90, attributes->maxThreadsPerBlock = (int)kMaxThreads;
    return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void *kernel, cudaFuncAttribute attribute, int value) {
    if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
        std::lock_guard<std::mutex> hold(kernels_lock);
        dynamic_smem_limits()[kernel] = value;
    }
    return cudaSuccess;
}

// ---- fp8 -------------------------------------------------------------------------------------------

float emu_fp8_e4m3_value(unsigned char bits) { // 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7f/0xff NaN
    const int exponent = (bits >> 3) & 15, mantissa = bits & 7;
    float magnitude;
    if ((bits & 0x7f) == 0x7f) magnitude = NAN;
    else if (exponent == 0) magnitude = ldexpf((float)mantissa, -9);
    else magnitude = ldexpf((float)(8 + mantissa), exponent - 10);
    return bits & 0x80 ? -magnitude : magnitude;
}

__nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t saturate, __nv_fp8_interpretation_t) {
    if (isnan(x)) return 0x7f;
    const unsigned char sign = signbit(x) ? 0x80 : 0;
    const float a = fabsf(x);
    if (a >= 464.0f) return (unsigned char)(sign | (saturate == __NV_SATFINITE ? 0x7e : 0x7f)); // past 448's half step
    if (a >= 448.0f) return (unsigned char)(sign | 0x7e);
    // codes 0 .. 0x7e increase with their value: the nearest, ties to the even code
    int low = 0, high = 0x7e;
    while (high - low > 1) {
        const int mid = (low + high) / 2;
        if (emu_fp8_e4m3_value((unsigned char)mid) <= a) low = mid;
        else high = mid;
    }
    const float below = emu_fp8_e4m3_value((unsigned char)low), above = emu_fp8_e4m3_value((unsigned char)high);
    const int code = a - below < above - a ? low : a - below > above - a ? high : (low % 2 == 0 ? low : high);
    return (unsigned char)(sign | code);
}

// ---- cuBLASLt ----------------------------------------------------------------------------------------
//
// The product itself in fp32, k in order, from operands decoded to float (tf32: rounded to 10
// mantissa bits first). The heuristic offers one algorithm where every operand is aligned to its
// element (the alignment the caller says, and each column's); the algorithm remembers the
// alignment it was chosen for (up to 16 bytes) and a product on less aligned pointers fails, as
// on a GPU.

struct emu_lt {
    int unused;
};
struct emu_lt_desc {
    cublasComputeType_t compute;
    cublasOperation_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void *bias = nullptr;
    int bias_type = CUDA_R_32F;
};
struct emu_lt_layout {
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
};
struct emu_lt_preference {
    uint32_t alignment[4] = {256, 256, 256, 256};
};

static size_t element_bytes(cudaDataType_t type) { return type == CUDA_R_32F ? 4 : type == CUDA_R_16BF ? 2 : 1; }

cublasStatus_t cublasLtCreate(cublasLtHandle_t *handle) {
    *handle = new emu_lt{0};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *desc, cublasComputeType_t compute, cudaDataType_t scale) {
    if (scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    *desc = new emu_lt_desc;
    (*desc)->compute = compute;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
    delete desc;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const void *value,
                                              size_t bytes) {
    switch (attribute) {
    case CUBLASLT_MATMUL_DESC_TRANSA: memcpy(&desc->transa, value, std::min(bytes, sizeof desc->transa)); break;
    case CUBLASLT_MATMUL_DESC_TRANSB: memcpy(&desc->transb, value, std::min(bytes, sizeof desc->transb)); break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE: memcpy(&desc->epilogue, value, std::min(bytes, sizeof desc->epilogue)); break;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: memcpy(&desc->bias, value, std::min(bytes, sizeof desc->bias)); break;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: memcpy(&desc->bias_type, value, std::min(bytes, sizeof desc->bias_type)); break;
    case CUBLASLT_MATMUL_DESC_FAST_ACCUM: break; // fp8's fast accumulation: the sums here are fp32 anyway
    }
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *layout, cudaDataType_t type, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
    if (ld < (int64_t)rows) return CUBLAS_STATUS_INVALID_VALUE;
    *layout = new emu_lt_layout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
    delete layout;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref) {
    *pref = new emu_lt_preference;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
    delete pref;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attribute,
                                                    const void *value, size_t bytes) {
    uint32_t v = 0;
    memcpy(&v, value, std::min(bytes, sizeof v));
    switch (attribute) {
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: pref->alignment[0] = v; break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: pref->alignment[1] = v; break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: pref->alignment[2] = v; break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: pref->alignment[3] = v; break;
    default: break;
    }
    return CUBLAS_STATUS_SUCCESS;
}

static bool shapes_agree(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                         cublasLtMatrixLayout_t d) {
    const uint64_t m = d->rows, n = d->cols;
    const uint64_t a_rows = desc->transa == CUBLAS_OP_N ? a->rows : a->cols, k = desc->transa == CUBLAS_OP_N ? a->cols : a->rows;
    const uint64_t b_rows = desc->transb == CUBLAS_OP_N ? b->rows : b->cols, b_cols = desc->transb == CUBLAS_OP_N ? b->cols : b->rows;
    return a_rows == m && b_rows == k && b_cols == n && c->rows == m && c->cols == n && a->type == b->type && d->type == CUDA_R_32F;
}

static uint32_t algorithm_alignment(cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t d,
                                    const uint32_t *preferred) {
    uint32_t alignment = 16;
    for (int i = 0; i < 4; i++) alignment = std::min(alignment, preferred[i]);
    const cublasLtMatrixLayout_t layouts[3] = {a, b, d};
    for (auto l : layouts) {
        const uint64_t column = (uint64_t)l->ld * element_bytes(l->type);
        while (alignment > 1 && column % alignment) alignment /= 2;
    }
    return alignment;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                              cublasLtMatmulPreference_t pref, int requested, cublasLtMatmulHeuristicResult_t *results,
                                              int *returned) {
    *returned = 0;
    if (!shapes_agree(desc, a, b, c, d)) return CUBLAS_STATUS_INVALID_VALUE;
    const uint32_t alignment = algorithm_alignment(a, b, d, pref->alignment);
    if (alignment < element_bytes(a->type) || requested < 1) return CUBLAS_STATUS_NOT_SUPPORTED;
    memset(&results[0], 0, sizeof results[0]);
    results[0].algo.data[0] = alignment;
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulAlgoCheck(cublasLtHandle_t, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                       cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d, const cublasLtMatmulAlgo_t *algo,
                                       cublasLtMatmulHeuristicResult_t *result) {
    if (!shapes_agree(desc, a, b, c, d)) return CUBLAS_STATUS_INVALID_VALUE;
    const uint32_t unlimited[4] = {256, 256, 256, 256};
    if (algorithm_alignment(a, b, d, unlimited) < algo->data[0]) return CUBLAS_STATUS_NOT_SUPPORTED;
    memset(result, 0, sizeof *result);
    result->algo = *algo, result->state = CUBLAS_STATUS_SUCCESS;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulAlgoConfigGetAttribute(const cublasLtMatmulAlgo_t *, cublasLtMatmulAlgoConfigAttributes_t attribute,
                                                    void *value, size_t bytes, size_t *written) {
    const uint32_t v = attribute == CUBLASLT_ALGO_CONFIG_SPLITK_NUM ? 1 : CUBLASLT_REDUCTION_SCHEME_NONE;
    memset(value, 0, bytes);
    memcpy(value, &v, std::min(bytes, sizeof v));
    if (written) *written = std::min(bytes, sizeof v);
    return CUBLAS_STATUS_SUCCESS;
}

static float tf32(float x) { // 10 mantissa bits, to nearest (even)
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;
    u += 0xfffu + ((u >> 13) & 1);
    return __uint_as_float(u & 0xffffe000u);
}

static float element(const void *base, cudaDataType_t type, size_t at, bool round_tf32) {
    switch (type) {
    case CUDA_R_32F: {
        const float x = ((const float *)base)[at];
        return round_tf32 ? tf32(x) : x;
    }
    case CUDA_R_16BF: return __bfloat162float(((const __nv_bfloat16 *)base)[at]);
    case CUDA_R_8F_E4M3: return emu_fp8_e4m3_value(((const unsigned char *)base)[at]);
    }
    return NAN;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void *alpha_ptr, const void *A,
                              cublasLtMatrixLayout_t a, const void *B, cublasLtMatrixLayout_t b, const void *beta_ptr, const void *C,
                              cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t d, const cublasLtMatmulAlgo_t *algo, void *,
                              size_t, cudaStream_t) {
    if (!shapes_agree(desc, a, b, c, d)) return CUBLAS_STATUS_INVALID_VALUE;
    const uintptr_t need = algo ? algo->data[0] : 16;
    if (need && (((uintptr_t)A | (uintptr_t)B | (uintptr_t)D | (uintptr_t)C) % need)) return CUBLAS_STATUS_INVALID_VALUE;
    const float alpha = *(const float *)alpha_ptr, beta = *(const float *)beta_ptr;
    const bool round_tf32 = desc->compute == CUBLAS_COMPUTE_32F_FAST_TF32;
    const uint64_t m = d->rows, n = d->cols, k = desc->transa == CUBLAS_OP_N ? a->cols : a->rows;
    std::vector<float> op_a(m * k), op_b(n * k); // op(A) row i and op(B) column j, each k contiguous
    for (uint64_t i = 0; i < m; i++)
        for (uint64_t kk = 0; kk < k; kk++)
            op_a[i * k + kk] = element(A, a->type, desc->transa == CUBLAS_OP_N ? i + kk * a->ld : kk + i * a->ld, round_tf32);
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t kk = 0; kk < k; kk++)
            op_b[j * k + kk] = element(B, b->type, desc->transb == CUBLAS_OP_N ? kk + j * b->ld : j + kk * b->ld, round_tf32);
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t i = 0; i < m; i++) {
            float sum = 0.0f;
            for (uint64_t kk = 0; kk < k; kk++) sum = fmaf(op_a[i * k + kk], op_b[j * k + kk], sum);
            float out = alpha * sum;
            if (beta != 0.0f) out += beta * ((const float *)C)[i + j * c->ld];
            if (desc->epilogue == CUBLASLT_EPILOGUE_BIAS && desc->bias)
                out += desc->bias_type == CUDA_R_16BF ? __bfloat162float(((const __nv_bfloat16 *)desc->bias)[i])
                                                      : ((const float *)desc->bias)[i];
            ((float *)D)[i + j * d->ld] = out;
        }
    return CUBLAS_STATUS_SUCCESS;
}
