// The CUDA backend on the host: the runtime, the block's fibers and the warp instructions, the
// number formats and cuBLASLt of include/cuda_host.h (which says what this is for and what it
// leaves out). x86-64 only: the fibers switch stacks with a few instructions of their own.
#include "emulation.h"

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
    double values[32];
    int site[32]; // the line of the kernel each lane called the instruction from
};
struct warp_state {
    unsigned arrived = 0, generation = 0, alive = 0, lanes = 0; // lanes: launched
    posted slots[2];
};

// A cp.async not landed yet, and the group it belongs to (the fiber's commits before it).
struct async_copy {
    uint32_t address;
    const void *global;
    unsigned src_bytes, group;
};

struct block_state {
    void *scheduler_sp = nullptr;
    std::vector<void *> sp;           // each fiber's saved stack pointer
    std::vector<unsigned char> done;  // each fiber's
    std::vector<const unsigned *> wait_on; // each fiber's barrier generation it waits to change, or null
    std::vector<unsigned> wait_generation;
    std::vector<int> barrier_line;    // each fiber's __syncthreads, the line of the kernel it is at
    std::vector<uint3> thread_index;  // each fiber's threadIdx, worked out once a launch
    std::vector<warp_state> warps;
    std::vector<std::vector<async_copy>> copies; // each fiber's cp.async copies not landed yet
    std::vector<unsigned> groups;                // each fiber's cp.async groups committed so far
    unsigned current = 0, alive = 0, arrived = 0, generation = 0;
    bool reverse = false; // the fibers, and the blocks, from the last (reverse_order())
    unsigned long long serial = 0; // which block of all the launches' this is (emu_fresh_shared)
    const std::function<void()> *body = nullptr;
    std::vector<unsigned char> smem;
};

// Which thread of a block runs first, and which block of a grid: $ESSENCE_EMU_THREADS, `forward`
// (the default: thread 0 first, each to its next barrier or warp instruction, then thread 1, ...;
// block 0 first) or `reverse` (the last thread and the last block first). CUDA promises neither, so
// a kernel that reads shared memory another thread writes without a barrier between them (or
// another lane without __syncwarp), or one block's output from another block of the same launch,
// reads it before it is written under one of the two.
bool reverse_order() {
    static const bool reverse = [] {
        const char *name = getenv("ESSENCE_EMU_THREADS");
        if (!name || !*name || !strcmp(name, "forward")) return false;
        if (!strcmp(name, "reverse")) return true;
        fprintf(stderr, "tests/emulate: $ESSENCE_EMU_THREADS=%s: forward or reverse\n", name);
        exit(2);
    }();
    return reverse;
}

unsigned long long blocks_run; // by every launch so far (block serials start at 1)
std::mutex launch_lock;             // one launch at a time, whichever host thread makes it
block_state *running;               // the block being run
std::vector<char *> stack_pool;     // kMaxThreads stacks, made on first use

// Passes the core to the next fiber after the current one that can run (not done, its barrier, if
// any, met), straight from stack to stack; back to the launch once every fiber is done. A block
// whose live fibers all wait at barriers that nothing can meet any more is a bug in the kernel.
void run_next() {
    block_state *b = running;
    const unsigned me = b->current, n = (unsigned)b->sp.size();
    const bool reverse = b->reverse;
    void *unused;
    for (unsigned step = 1, i = me; step <= n; step++) {
        if (reverse) i = (i ? i : n) - 1; // (no division: this runs at every switch)
        else if (++i == n) i = 0;
        if (b->done[i]) continue;
        if (b->wait_on[i]) {
            if (*b->wait_on[i] == b->wait_generation[i]) continue;
            b->wait_on[i] = nullptr;
        }
        if (i == me) return;
        b->current = i;
        threadIdx = b->thread_index[i];
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

// Every live thread of the block at the barrier: they must be at the same one (a __syncthreads in a
// branch that only some threads take is undefined on a GPU); then it opens.
void release_block(block_state *b) {
    int line = -1;
    for (size_t i = 0; i < b->sp.size(); i++) {
        if (b->done[i]) continue;
        if (line < 0) line = b->barrier_line[i];
        if (b->barrier_line[i] != line) {
            fprintf(stderr, "emulated kernel: block (%u, %u, %u): its threads met at __syncthreads on different lines (%d, %d)\n",
                    blockIdx.x, blockIdx.y, blockIdx.z, line, b->barrier_line[i]);
            abort();
        }
    }
    b->arrived = 0, b->generation++;
}
void release_block_if_met(block_state *b) {
    if (b->arrived && b->arrived >= b->alive) release_block(b);
}

[[noreturn]] void warp_fault(const char *what) {
    fprintf(stderr, "emulated kernel: warp %u of block (%u, %u, %u): %s\n", running->current / 32, blockIdx.x, blockIdx.y,
            blockIdx.z, what);
    abort();
}

extern "C" [[noreturn]] void emu_fiber_main() {
    block_state *b = running;
    (*b->body)();
    b = running;
    b->done[b->current] = 1, b->alive--;
    warp_state &w = b->warps[b->current / 32];
    if (w.arrived) warp_fault("a lane exited while others of its warp wait at a warp instruction");
    w.alive--;
    release_block_if_met(b);
    run_next();
    abort(); // never resumed
}

// A stack whose first emu_switch "returns" into emu_fiber_main with the ABI's alignment. The
// stacks are kStackBytes apart, so their tops would share the caches' sets and every switch
// would miss: fiber i starts i kilobytes (and a line) lower, modulo kStackStagger.
constexpr size_t kStackStagger = 64 * 1024;
void *new_stack(char *base, unsigned fiber) {
    const size_t stagger = (size_t)fiber * (1024 + 64) % kStackStagger;
    uintptr_t top = ((uintptr_t)base + kStackBytes - stagger) & ~(uintptr_t)15;
    void **slot = (void **)(top - 16); // 16-byte aligned: after `ret` the stack is as after a call
    slot[0] = (void *)&emu_fiber_main;
    slot[1] = nullptr;
    void **sp = slot - 6;
    for (int i = 0; i < 6; i++) sp[i] = nullptr;
    return sp;
}

warp_state &my_warp() { return running->warps[running->current / 32]; }
int my_lane() { return (int)(running->current % 32); }

// The lanes of the warp meet at a warp instruction (every one: the kernels' masks are all full, and
// the .aligned instructions want every lane), each having posted its operands, and where it called
// from (a source line: a return address would not do, as the compiler may copy one call into both
// arms of a branch), in the slot of this generation. A lane that exited, or lanes that meet from
// different lines (a diverged warp), are a kernel's bug that a GPU need not show: here they stop it.
void warp_sync(int site) {
    block_state *b = running;
    warp_state &w = b->warps[b->current / 32];
    if (w.alive < w.lanes) warp_fault("a warp instruction after a lane of the warp exited");
    const unsigned generation = w.generation;
    posted &p = w.slots[generation & 1];
    p.site[b->current % 32] = site;
    if (++w.arrived >= w.alive) { // the last to arrive goes on in its turn, not first (see reverse_order())
        for (unsigned l = 1; l < w.lanes; l++)
            if (p.site[l] != p.site[0]) warp_fault("its lanes met at different warp instructions (a diverged warp)");
        w.arrived = 0, w.generation++;
        run_next();
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

void __syncthreads(int line) {
    block_state *b = running;
    const unsigned generation = b->generation;
    b->barrier_line[b->current] = line;
    if (++b->arrived >= b->alive) { // the last to arrive goes on in its turn, not first (see reverse_order())
        release_block(b);
        run_next();
        return;
    }
    b->wait_on[b->current] = &b->generation, b->wait_generation[b->current] = generation;
    while (b->generation == generation) run_next();
}

unsigned char *emu_dynamic_smem() { return running->smem.data(); }

void emu_misaligned(const void *p, size_t alignment) {
    fprintf(stderr, "emulated kernel: block (%u, %u, %u), thread (%u, %u, %u): a vector access at %p, not aligned to %zu bytes\n",
            blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, p, alignment);
    abort();
}

void emu_fresh_shared(void *array, size_t bytes) {
    static std::map<void *, unsigned long long> poisoned_in; // array -> the block that last made it NaN
    unsigned long long &block = poisoned_in[array];
    if (block == running->serial) return;
    block = running->serial;
    memset(array, 0xff, bytes);
}

static void full_mask(unsigned mask) {
    if (mask != 0xffffffffu) warp_fault("a warp instruction with a partial mask (not emulated)");
}

static double shuffle_xor(unsigned mask, double value, int lane_mask, int site) {
    full_mask(mask);
    warp_state &w = my_warp();
    const int lane = my_lane();
    if (lane_mask < 0 || lane_mask > 31 || (unsigned)(lane ^ lane_mask) >= w.lanes) warp_fault("a shuffle from a lane the warp lacks");
    posted &p = w.slots[w.generation & 1];
    p.values[lane] = value;
    warp_sync(site);
    return p.values[lane ^ lane_mask];
}
float __shfl_xor_sync(unsigned mask, float value, int lane_mask, int line) {
    return (float)shuffle_xor(mask, value, lane_mask, line);
}
double __shfl_xor_sync(unsigned mask, double value, int lane_mask, int line) { return shuffle_xor(mask, value, lane_mask, line); }

bool __any_sync(unsigned mask, bool predicate, int line) {
    full_mask(mask);
    warp_state &w = my_warp();
    posted &p = w.slots[w.generation & 1];
    p.words[my_lane()][0] = predicate;
    warp_sync(line);
    bool any = false;
    for (unsigned l = 0; l < w.lanes; l++) any = any || p.words[l][0];
    return any;
}

// ldmatrix .x4: lane l names row l % 8 of matrix l / 8; lane l receives, of each matrix i, row
// l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (low half first), or transposed, rows 2 (l % 4) and
// 2 (l % 4) + 1 of column l / 4.
void emu_ldmatrix_x4(uint32_t (&r)[4], uint32_t address, bool transposed, int line) {
    warp_state &w = my_warp();
    const int lane = my_lane();
    if (address % 16 || address + 16 > running->smem.size()) {
        fprintf(stderr, "emulated ldmatrix: row address %u unaligned or outside the %zu bytes of shared memory\n", address,
                running->smem.size());
        abort();
    }
    posted &p = w.slots[w.generation & 1];
    p.words[lane][0] = address;
    warp_sync(line);
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
void emu_mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, int line) {
    warp_state &w = my_warp();
    const int lane = my_lane();
    posted &p = w.slots[w.generation & 1];
    for (int i = 0; i < 4; i++) p.words[lane][i] = a[i];
    p.words[lane][4] = b0, p.words[lane][5] = b1;
    warp_sync(line);
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

// cp.async: the copy reads global memory when it lands, as the GPU's may read it at any moment
// until the wait; a kernel must not change the source in between.
static void land(const async_copy &c) {
    unsigned char *to = running->smem.data() + c.address;
    if (c.src_bytes) memcpy(to, c.global, c.src_bytes);
    memset(to + c.src_bytes, 0, 16 - c.src_bytes);
}

void emu_cp_async_16(uint32_t address, const void *global, unsigned src_bytes) {
    if (address % 16 || address + 16 > running->smem.size() || src_bytes > 16 || (src_bytes && (uintptr_t)global % 16)) {
        fprintf(stderr,
                "emulated cp.async: block (%u, %u, %u), thread (%u, %u, %u): shared address %u, global %p, %u bytes (16-byte "
                "aligned addresses within the %zu bytes of shared memory, at most 16 bytes)\n",
                blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, address, global, src_bytes,
                running->smem.size());
        abort();
    }
    const async_copy copy = {address, global, src_bytes, running->groups[running->current]};
    if (emu_async_copies_late()) running->copies[running->current].push_back(copy);
    else land(copy);
}

void emu_cp_async_commit() { running->groups[running->current]++; }

void emu_cp_async_wait(int newest) {
    std::vector<async_copy> &copies = running->copies[running->current];
    const unsigned committed = running->groups[running->current];
    size_t kept = 0;
    for (const async_copy &c : copies) // (copies not committed yet are in no group a wait covers)
        if (c.group + (unsigned)newest < committed) land(c);
        else copies[kept++] = c;
    copies.resize(kept);
}

// ---- launches --------------------------------------------------------------------------------------

// The blocks one after another, each block's fibers from the first (or the last) until all are done.
static void run_grid(dim3 grid, dim3 block, size_t smem_bytes, unsigned long long threads, const std::function<void()> &body) {
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
    b.barrier_line.resize(threads);
    b.thread_index.resize(threads);
    b.copies.resize(threads);
    b.groups.resize(threads);
    for (unsigned i = 0; i < threads; i++) b.thread_index[i] = {i % block.x, i / block.x % block.y, i / (block.x * block.y)};
    b.warps.resize((threads + 31) / 32);
    b.smem.resize(smem_bytes + 16);
    blockDim = block, gridDim = grid;
    b.reverse = reverse_order();
    running = &b;
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    for (unsigned long long k = 0; k < blocks; k++) {
        const unsigned long long at = b.reverse ? blocks - 1 - k : k;
        blockIdx = {(unsigned)(at % grid.x), (unsigned)(at / grid.x % grid.y), (unsigned)(at / ((unsigned long long)grid.x * grid.y))};
        // shared memory starts as garbage (NaN as floats), as a GPU's does not start as zeros
        memset(b.smem.data(), 0xff, b.smem.size());
        b.serial = ++blocks_run;
        for (unsigned i = 0; i < threads; i++) b.sp[i] = new_stack(stack_pool[i], i), b.done[i] = 0, b.wait_on[i] = nullptr;
        for (unsigned i = 0; i < threads; i++) b.copies[i].clear(), b.groups[i] = 0;
        for (size_t w = 0; w < b.warps.size(); w++)
            b.warps[w] = warp_state(), b.warps[w].alive = b.warps[w].lanes = (unsigned)std::min<unsigned long long>(32, threads - w * 32);
        b.alive = (unsigned)threads, b.arrived = 0, b.generation = 0;
        const unsigned first = b.reverse ? (unsigned)threads - 1 : 0;
        b.current = first;
        threadIdx = b.thread_index[first];
        emu_switch(&b.scheduler_sp, b.sp[first]); // back when every fiber is done
    }
    running = nullptr;
}

void emu_launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, const void *kernel, const std::function<void()> &body) {
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (!threads || threads > kMaxThreads || block.z > 64 || !grid.x || !grid.y || !grid.z || grid.x > 0x7fffffffu ||
        grid.y > 65535 || grid.z > 65535) {
        emu_set_last_error(cudaErrorInvalidConfiguration);
        return;
    }
    int allowed = 48 * 1024;
    {
        std::lock_guard<std::mutex> hold(kernels_lock);
        auto it = dynamic_smem_limits().find(kernel);
        if (it != dynamic_smem_limits().end()) allowed = it->second;
    }
    if (smem_bytes > (size_t)allowed) {
        emu_set_last_error(cudaErrorInvalidValue); // as CUDA: too much dynamic shared memory for the kernel
        return;
    }
    // the grid runs in the stream's turn, from its own copy of the arguments
    if (emu_dry()) return; // checked, not run
    emu_enqueue(stream, [grid, block, smem_bytes, threads, body] { run_grid(grid, block, smem_bytes, threads, body); });
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

