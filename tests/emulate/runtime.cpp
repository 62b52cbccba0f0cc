// The emulated CUDA runtime: the device, its memory, copies, streams and events.
//
// Streams are queues. Work put on one (a launch, a copy, a memset, a product, an event's record)
// runs when the host waits for it (cudaStreamSynchronize, cudaEventSynchronize, a copy to
// pageable memory, cudaDeviceSynchronize, cudaFree), in an order that respects only what CUDA
// promises: each stream's own order and the events streams wait for. Which of the orders CUDA
// allows is $ESSENCE_EMU_STREAMS:
//   lazy   (default) only the work waited for, and what it waits for: work that should have waited
//          for another stream and did not, or a host that reads (or refills) a buffer before the
//          copy from (or to) it is done, sees the data of before
//   eager  before each piece of work waited for, every other stream's work that is free to run:
//          a stream that overwrites what another still has to read, without waiting for it, does
//          so first
//   now    everything at once, in the order the host queued it (the emulation before streams)
// A GPU runs streams concurrently, so a backend whose results depend on the schedule is wrong on
// one; tests run under lazy and eager.
#include "emulation.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

bool emu_dry() {
    static const bool dry = [] {
        const char *value = getenv("ESSENCE_EMU_DRY");
        return value && *value && strcmp(value, "0") != 0;
    }();
    return dry;
}

thread_local cudaError_t last_error = cudaSuccess;
void emu_set_last_error(cudaError_t error) { last_error = error; }

// ---- memory ----------------------------------------------------------------------------------------

namespace {

std::mutex memory_lock;
std::map<uintptr_t, size_t> device_allocations, host_allocations; // start -> bytes
size_t device_bytes_in_use = 0;
constexpr size_t kDeviceMemory = 16ull << 30, kDryDeviceMemory = 80ull << 30;
size_t device_memory() { return emu_dry() ? kDryDeviceMemory : kDeviceMemory; }

bool within(const std::map<uintptr_t, size_t> &allocations, const void *ptr) {
    const uintptr_t p = (uintptr_t)ptr;
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p < it->first + std::max<size_t>(it->second, 1);
}

bool device_range(const void *ptr, size_t bytes) {
    return within(device_allocations, ptr) && within(device_allocations, (const char *)ptr + bytes - 1);
}

// Device memory between guard pages: an allocation ends (rounded up to 256 bytes, as cudaMalloc's
// alignment keeps it) where an inaccessible page begins, and another lies before its first page, so
// a kernel reading or writing past an allocation by more than that rounding faults at once, where
// a GPU may read another buffer's values or fault later ("an illegal memory access").
struct guarded {
    char *base;
    size_t span;
};
std::map<uintptr_t, guarded> guarded_mappings; // start -> its mapping
struct sigaction earlier_segv;

void on_segv(int sig, siginfo_t *info, void *context) {
    const uintptr_t at = (uintptr_t)info->si_addr;
    for (const auto &m : guarded_mappings) // (the process is ending: this need not be async-signal-safe)
        if (at >= (uintptr_t)m.second.base && at < (uintptr_t)m.second.base + m.second.span) {
            fprintf(stderr,
                    "emulated CUDA: an access at %p, %lld bytes from the device allocation at %p, outside it (in block "
                    "(%u, %u, %u), thread (%u, %u, %u) if a kernel was running)\n",
                    info->si_addr, (long long)(at - m.first), (void *)m.first, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
                    threadIdx.y, threadIdx.z);
            break;
        }
    sigaction(SIGSEGV, &earlier_segv, nullptr); // the fault happens again, as it would have
    (void)sig, (void)context;
}

void *guarded_alloc(size_t bytes) {
    static const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    static const bool handler = [] {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = on_segv;
        action.sa_flags = SA_SIGINFO;
        sigemptyset(&action.sa_mask);
        return sigaction(SIGSEGV, &action, &earlier_segv) == 0;
    }();
    (void)handler;
    const size_t body = (std::max<size_t>(bytes, 1) + 255) / 256 * 256, pages = (body + page - 1) / page * page;
    const size_t span = pages + 2 * page;
    char *base = (char *)mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    if (mprotect(base + page, pages, PROT_READ | PROT_WRITE)) {
        munmap(base, span);
        return nullptr;
    }
    char *p = base + page + pages - body;
    guarded_mappings[(uintptr_t)p] = {base, span};
    return p;
}
void guarded_free(void *p) {
    auto it = guarded_mappings.find((uintptr_t)p);
    if (it == guarded_mappings.end()) return;
    munmap(it->second.base, it->second.span);
    guarded_mappings.erase(it);
}

} // namespace

// ---- streams and events ----------------------------------------------------------------------------

struct emu_work {
    std::function<void()> run;        // empty for a wait
    struct emu_stream *after = nullptr; // a wait: that stream's work up to `until` first
    uint64_t until = 0;
};
struct emu_stream {
    std::deque<emu_work> queue;
    uint64_t queued = 0, done = 0; // work numbers: done <= queued, the next to run is done + 1
};
struct emu_record { // one cudaEventRecord: the work number it follows, and when it ran
    emu_stream *stream;
    uint64_t number;
    double seconds = -1;
};
struct emu_event {
    std::shared_ptr<emu_record> last; // (a wait holds the record it waits for, not the event)
};

namespace {

enum class schedule { lazy, eager, now };

schedule chosen_schedule() {
    static const schedule chosen = [] {
        const char *name = getenv("ESSENCE_EMU_STREAMS");
        if (!name || !*name || !strcmp(name, "lazy")) return schedule::lazy;
        if (!strcmp(name, "eager")) return schedule::eager;
        if (!strcmp(name, "now")) return schedule::now;
        fprintf(stderr, "tests/emulate: $ESSENCE_EMU_STREAMS=%s: lazy, eager or now\n", name);
        exit(2);
    }();
    return chosen;
}

} // namespace

// cp.async (cuda_host.cpp) lands as late as CUDA allows under the lazy schedule, at once otherwise.
bool emu_async_copies_late() { return chosen_schedule() == schedule::lazy; }

namespace {

std::recursive_mutex streams_lock; // queueing and running, whichever host thread does it
emu_stream legacy_stream;           // the stream named nullptr
// Streams are never freed (cudaStreamDestroy runs what is left): a wait may still name one.
std::vector<emu_stream *> &all_streams() {
    static std::vector<emu_stream *> streams{&legacy_stream};
    return streams;
}

emu_stream *named(cudaStream_t stream) { return stream ? stream : &legacy_stream; }

bool free_to_run(const emu_stream *s) {
    if (s->queue.empty()) return false;
    const emu_work &head = s->queue.front();
    return !head.after || head.after->done >= head.until;
}

void run_head(emu_stream *s) {
    emu_work work = std::move(s->queue.front());
    s->queue.pop_front();
    if (work.run) work.run();
    s->done++;
}

void run_others(const emu_stream *except) { // eager: whatever else is free to run, until nothing is
    for (bool ran = true; ran;) {
        ran = false;
        for (emu_stream *s : all_streams())
            while (s != except && free_to_run(s)) run_head(s), ran = true;
    }
}

// Runs s's work up to number `until` and, first, the work each of its waits names (numbers only
// grow, and a wait names work queued before it, so this ends).
void run_until(emu_stream *s, uint64_t until) {
    std::lock_guard<std::recursive_mutex> hold(streams_lock);
    while (s->done < until) {
        if (chosen_schedule() == schedule::eager) run_others(s);
        if (s->done >= until) break;
        const emu_work &head = s->queue.front();
        if (head.after && head.after->done < head.until) {
            run_until(head.after, head.until);
            continue;
        }
        run_head(s);
    }
}

void run_all_of(emu_stream *s) {
    std::lock_guard<std::recursive_mutex> hold(streams_lock);
    run_until(s, s->queued);
}

void run_everything() {
    std::lock_guard<std::recursive_mutex> hold(streams_lock);
    for (emu_stream *s : all_streams()) run_until(s, s->queued);
}

uint64_t enqueue(emu_stream *s, emu_work work) {
    std::lock_guard<std::recursive_mutex> hold(streams_lock);
    s->queue.push_back(std::move(work));
    const uint64_t number = ++s->queued;
    if (chosen_schedule() == schedule::now) run_until(s, number);
    return number;
}

double now_seconds() {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

} // namespace

void emu_enqueue(cudaStream_t stream, std::function<void()> work) { enqueue(named(stream), emu_work{std::move(work)}); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned) {
    std::lock_guard<std::recursive_mutex> hold(streams_lock);
    *stream = new emu_stream;
    all_streams().push_back(*stream);
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) { // its work still runs, as CUDA's does
    if (!stream) return cudaErrorInvalidValue;
    run_all_of(stream);
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    run_all_of(named(stream));
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
    run_everything();
    return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t *event) {
    *event = new emu_event;
    return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned) { return cudaEventCreate(event); }
cudaError_t cudaEventDestroy(cudaEvent_t event) { // a wait already queued keeps its record
    if (!event) return cudaErrorInvalidValue;
    delete event;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    if (!event) return cudaErrorInvalidValue;
    std::lock_guard<std::recursive_mutex> hold(streams_lock);
    emu_stream *s = named(stream);
    auto record = std::make_shared<emu_record>(emu_record{s, s->queued + 1});
    event->last = record;
    enqueue(s, emu_work{[record] { record->seconds = now_seconds(); }});
    return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned) {
    if (!event) return cudaErrorInvalidValue;
    std::lock_guard<std::recursive_mutex> hold(streams_lock);
    if (event->last) enqueue(named(stream), emu_work{{}, event->last->stream, event->last->number}); // (never recorded: nothing to wait for)
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
    if (!event) return cudaErrorInvalidValue;
    std::lock_guard<std::recursive_mutex> hold(streams_lock);
    if (event->last) run_until(event->last->stream, event->last->number);
    return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    std::lock_guard<std::recursive_mutex> hold(streams_lock);
    if (!start || !end || !start->last || !end->last) return cudaErrorInvalidResourceHandle;
    if (start->last->seconds < 0 || end->last->seconds < 0) return cudaErrorNotReady;
    *ms = (float)(1e3 * (end->last->seconds - start->last->seconds));
    return cudaSuccess;
}

// ---- the device ------------------------------------------------------------------------------------

const char *cudaGetErrorString(cudaError_t error) {
    switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
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
    prop->sharedMemPerBlockOptin = 227 * 1024, prop->sharedMemPerBlock = 48 * 1024, prop->totalGlobalMem = device_memory();
    prop->multiProcessorCount = 132, prop->maxThreadsPerBlock = 1024, prop->warpSize = 32;
    return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
    std::lock_guard<std::mutex> hold(memory_lock);
    *total_bytes = device_memory(), *free_bytes = device_memory() - std::min(device_memory(), device_bytes_in_use);
    return cudaSuccess;
}

// ---- allocations -------------------------------------------------------------------------------------

cudaError_t cudaMalloc(void **ptr, size_t bytes) {
    *ptr = nullptr;
    std::lock_guard<std::mutex> hold(memory_lock);
    if (device_bytes_in_use + bytes > device_memory()) return cudaErrorMemoryAllocation;
    void *p = guarded_alloc(bytes);
    if (!p) return cudaErrorMemoryAllocation;
    if (!emu_dry()) memset(p, 0xff, bytes); // device memory starts as garbage, not zeros
    device_allocations[(uintptr_t)p] = bytes, device_bytes_in_use += bytes;
    *ptr = p;
    return cudaSuccess;
}
cudaError_t cudaFree(void *ptr) { // waits for the device first, as CUDA's does
    if (!ptr) return cudaSuccess;
    run_everything();
    std::lock_guard<std::mutex> hold(memory_lock);
    auto it = device_allocations.find((uintptr_t)ptr);
    if (it == device_allocations.end()) return cudaErrorInvalidValue;
    device_bytes_in_use -= it->second;
    device_allocations.erase(it);
    guarded_free(ptr);
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
cudaError_t cudaFreeHost(void *ptr) { // waits for the device first, as CUDA's does
    if (!ptr) return cudaSuccess;
    run_everything();
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

bool emu_device_range(const void *ptr, size_t bytes) {
    std::lock_guard<std::mutex> hold(memory_lock);
    return device_range(ptr, bytes);
}

// ---- copies ----------------------------------------------------------------------------------------
//
// A device side must lie in device memory. As CUDA's: a copy from pageable host memory has read
// it when the call returns (the device side is written in the stream's turn); a copy to pageable
// memory returns once it is done; copies to and from pinned memory are the stream's like any work.

static cudaError_t copy_async(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, emu_stream *s) {
    if (!bytes) return cudaSuccess;
    bool pinned_host;
    {
        std::lock_guard<std::mutex> hold(memory_lock);
        const bool dst_device = device_range(dst, bytes), src_device = device_range(src, bytes);
        if ((kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice) && !dst_device) return cudaErrorInvalidValue;
        if ((kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice) && !src_device) return cudaErrorInvalidValue;
        const void *host = kind == cudaMemcpyHostToDevice ? src : dst;
        pinned_host = within(host_allocations, host) && within(host_allocations, (const char *)host + bytes - 1);
    }
    if (kind == cudaMemcpyHostToDevice && !pinned_host) {
        auto staged = std::make_shared<std::vector<char>>((const char *)src, (const char *)src + bytes);
        enqueue(s, emu_work{[dst, staged] { memcpy(dst, staged->data(), staged->size()); }});
        return cudaSuccess;
    }
    const uint64_t number = enqueue(s, emu_work{[dst, src, bytes] { memmove(dst, src, bytes); }});
    if (kind == cudaMemcpyDeviceToHost && !pinned_host) run_until(s, number);
    return cudaSuccess;
}
constexpr size_t kDrySkipBytes = 1 << 20;
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
    if (emu_dry() && kind == cudaMemcpyDeviceToDevice && bytes > kDrySkipBytes)
        return emu_device_range(dst, bytes) && emu_device_range(src, bytes) ? cudaSuccess : cudaErrorInvalidValue;
    return copy_async(dst, src, bytes, kind, named(stream));
}
// On the stream named nullptr, done when it returns; the non-blocking streams the backend makes
// are not waited for.
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    const cudaError_t rc = copy_async(dst, src, bytes, kind, &legacy_stream);
    cudaStreamSynchronize(nullptr);
    return rc;
}
cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t stream) {
    if (!bytes) return cudaSuccess;
    if (!emu_device_range(dst, bytes)) return cudaErrorInvalidValue;
    if (emu_dry() && bytes > kDrySkipBytes) return cudaSuccess;
    enqueue(named(stream), emu_work{[dst, value, bytes] { memset(dst, value, bytes); }});
    return cudaSuccess;
}
