// libcuda.so.1 for the emulated device: the CUDA driver API entry points that
// cudarc and this crate call, behaving as the real driver does wherever a test
// could tell the difference. Capture rules are written down, with their
// sources, in emu/README.md ("Stream capture"); each check below names its rule.
#define __CUDA_API_VERSION_INTERNAL 1
#include <cuda.h>

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#if defined(TRAM_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#endif

#include "image.hpp"
#include "runtime.hpp"

#define API extern "C" __attribute__((visibility("default")))

namespace emu {
namespace {

// ---------------------------------------------------------------------------
// The device: an H100 SXM as the crate and cudarc see it.

const int kSms = 132;
const int kMaxThreadsPerBlock = 1024;
const int kMaxThreadsPerSm = 2048;
const int kMaxBlocksPerSm = 32;
const int kRegsPerSm = 65536;
const int kRegsPerBlock = 65536;
const int kRegAllocUnit = 256;  // registers are given to warps in units of 256
const int kSmemPerBlock = 48 << 10;
const int kSmemPerSm = 228 << 10;
const int kSmemReservedPerBlock = 1 << 10;

int attribute(CUdevice_attribute a, bool* known) {
    *known = true;
    switch (a) {
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: return kMaxThreadsPerBlock;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: return 1024;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: return 1024;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: return 64;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: return 2147483647;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: return 65535;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: return 65535;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: return kSmemPerBlock;
        case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: return 65536;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: return 32;
        case CU_DEVICE_ATTRIBUTE_MAX_PITCH: return 2147483647;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: return kRegsPerBlock;
        case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: return 1980000;
        case CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT: return 512;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: return kSms;
        case CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT: return 0;
        case CU_DEVICE_ATTRIBUTE_INTEGRATED: return 0;
        case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: return 1;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_MODE: return 0;
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: return 1;
        case CU_DEVICE_ATTRIBUTE_ECC_ENABLED: return 1;
        case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: return 0x18;
        case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: return 0;
        case CU_DEVICE_ATTRIBUTE_TCC_DRIVER: return 0;
        case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: return 2619000;
        case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: return 5120;
        case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: return 50 << 20;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: return kMaxThreadsPerSm;
        case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: return 3;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: return 1;
        case CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID: return 0;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: return 9;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: return 0;
        case CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED: return 1;
        case CU_DEVICE_ATTRIBUTE_GLOBAL_L1_CACHE_SUPPORTED: return 1;
        case CU_DEVICE_ATTRIBUTE_LOCAL_L1_CACHE_SUPPORTED: return 1;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: return kSmemPerSm;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: return kRegsPerSm;
        case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: return 1;
        case CU_DEVICE_ATTRIBUTE_MULTI_GPU_BOARD: return 0;
        case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: return 1;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: return 227 << 10;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR: return kMaxBlocksPerSm;
        case CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK: return kSmemReservedPerBlock;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: return 1;
        case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: return 1;
        default: *known = false; return 0;
    }
}

// ---------------------------------------------------------------------------
// Objects. Handles are the objects' addresses; every handle is checked against
// the live set of its kind before use.

struct Ctx;
struct Stream;
struct Event;
struct Capture;

struct Func {
    Kernel k;
    std::string name;
    Ctx* ctx = nullptr;
};

struct Module {
    Ctx* ctx = nullptr;
    std::vector<std::unique_ptr<Func>> funcs;
};

// One unit of stream work. Kernel parameters, staged host data and memset
// values are copied when the call is made, as the driver does.
struct Op {
    enum Kind { Kernel, Memset, HtoD, DtoH, DtoD, AllocPoison, Free, Record, Wait, Graph } kind;
    Launch launch;
    CUdeviceptr dst = 0, src = 0;
    size_t bytes = 0;
    unsigned char value = 0;
    std::vector<unsigned char> staged;
    void* host = nullptr;
    Event* event = nullptr;
    Stream* other = nullptr;  // Wait: the stream waited on
    uint64_t other_seq = 0;   // Wait: up to this op of `other`
    struct Exec* exec = nullptr;
};

struct Node {
    Op op;
};

struct Capture {
    Stream* origin = nullptr;
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
    std::thread::id thread;
    bool invalid = false;
    std::vector<Node> nodes;
    std::set<Stream*> members;
    // For the unjoined-work check: which node sets each member's next node
    // would depend on, and which nodes each node depends on.
    std::map<Stream*, std::set<size_t>> frontier;
    std::vector<std::set<size_t>> deps;
    std::shared_ptr<struct GraphMemory> memory;  // made by its allocation nodes
    std::set<CUdeviceptr> unfreed;                // ...and not freed by a node yet
};

struct Stream {
    Ctx* ctx = nullptr;
    unsigned flags = 0;
    bool legacy = false;  // the NULL stream of its context
    std::recursive_mutex m;
    std::deque<Op> queue;
    uint64_t enqueued = 0, done = 0;
    Capture* capture = nullptr;
    bool being_flushed = false;
};

struct Event {
    Ctx* ctx = nullptr;
    unsigned flags = 0;
    Stream* stream = nullptr;  // of the last (non-captured) record
    uint64_t seq = 0;          // that record's position in its stream
    bool recorded = false;
    bool captured = false;     // last recorded in a capturing stream
    Capture* capture = nullptr;
    std::set<size_t> nodes;
    double time_ms = 0.0;      // when the record executed
    bool completed = false;
};

// Memory a graph's allocation nodes own: it stays reserved while the graph or
// an instance of it exists (replays poison it at the node's point), and is
// released with the last of them.
struct GraphMemory {
    std::vector<CUdeviceptr> ptrs;
    ~GraphMemory();
};

struct Graph {
    std::vector<Node> nodes;
    std::shared_ptr<GraphMemory> memory;
};

struct Exec {
    std::vector<Node> nodes;
    std::shared_ptr<GraphMemory> memory;
};

struct Ctx {
    int refs = 0;
    std::unique_ptr<Stream> legacy;
    std::set<Stream*> streams;
    std::set<Module*> modules;
    std::set<Event*> events;
};

struct Alloc {
    size_t size = 0;
    bool lazy = false;  // mmap'd, read as zero until written
};

// All metadata under one lock; the work itself (kernels, copies) runs outside it.
std::recursive_mutex g_mu;
bool g_init = false;
Ctx* g_primary = nullptr;
std::unordered_set<Ctx*> g_ctxs;
std::unordered_set<Stream*> g_streams;  // created by cuStreamCreate
std::unordered_set<Stream*> g_alive;    // every stream object that exists
std::unordered_set<Event*> g_events;
std::unordered_set<Module*> g_modules;
std::unordered_set<Func*> g_funcs;
std::unordered_set<Graph*> g_graphs;
std::unordered_set<Exec*> g_execs;
std::unordered_set<Capture*> g_captures;
std::map<CUdeviceptr, Alloc> g_allocs;
uint64_t g_used = 0;
#if !defined(TRAM_EMU_ASAN)
std::deque<std::pair<void*, size_t>> g_quarantine;
size_t g_quarantine_bytes = 0;
#endif
// Destroyed streams and contexts are kept, emptied: another thread may still
// be flushing a stream it looked up before the destruction.
std::vector<std::unique_ptr<Stream>> g_dead_streams;
std::vector<std::unique_ptr<Ctx>> g_dead_ctxs;
thread_local Ctx* tl_ctx = nullptr;
thread_local Stream* tl_per_thread = nullptr;  // never freed: events may name it

// Allocations at least this large are mapped lazily: untouched pages cost
// nothing, and they read as zero rather than poison until written.
const size_t kLazyBytes = size_t(1) << 30;
// Freed memory keeps its poison this long before it is reused.
const size_t kQuarantineBytes = size_t(256) << 20;

struct KernelLibs {
    std::vector<const tram_emu_library*> libs;
    std::unordered_map<std::string, std::pair<const tram_emu_kernel*, unsigned>> by_name;
    std::unordered_map<std::string, const tram_emu_resources*> resources;
};
KernelLibs* g_kernels = nullptr;

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------------------
// Kernel libraries: libtram_emu_kernels.so beside this library, and any listed
// in TRAM_EMU_KERNEL_LIBS (colon-separated paths; the emulator's own tests).

void load_library(const std::string& path) {
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) die("cannot load kernel library %s: %s", path.c_str(), dlerror());
    auto info = reinterpret_cast<const tram_emu_library* (*)()>(dlsym(h, "tram_emu_library_info"));
    if (!info) die("%s is not a kernel library (no tram_emu_library_info)", path.c_str());
    const tram_emu_library* lib = info();
    if (lib->abi_version != TRAM_EMU_ABI_VERSION)
        die("%s was built for emulator ABI %u, this is %u: rebuild it", path.c_str(),
            lib->abi_version, TRAM_EMU_ABI_VERSION);
    unsigned index = register_library(lib, reinterpret_cast<const void*>(lib->touch_shared));
    g_kernels->libs.push_back(lib);
    for (size_t i = 0; i < lib->n_kernels; i++) {
        const tram_emu_kernel* k = &lib->kernels[i];
        if (!g_kernels->by_name.emplace(k->name, std::make_pair(k, index)).second)
            die("kernel %s is defined by two kernel libraries", k->name);
    }
    for (size_t i = 0; i < lib->n_resources; i++)
        g_kernels->resources[lib->resources[i].name] = &lib->resources[i];
}

void load_kernel_libraries() {
    g_kernels = new KernelLibs;
    Dl_info di{};
    dladdr(reinterpret_cast<const void*>(&load_kernel_libraries), &di);
    std::string dir = di.dli_fname ? di.dli_fname : "";
    dir = dir.substr(0, dir.rfind('/') + 1);
    load_library(dir + "libtram_emu_kernels.so");
    if (const char* extra = getenv("TRAM_EMU_KERNEL_LIBS")) {
        std::string s = extra;
        size_t a = 0;
        while (a <= s.size()) {
            size_t b = s.find(':', a);
            if (b == std::string::npos) b = s.size();
            if (b > a) load_library(s.substr(a, b - a));
            a = b + 1;
        }
    }
}

// ---------------------------------------------------------------------------
// Device memory.

const Alloc* find_alloc(CUdeviceptr p, size_t bytes, CUdeviceptr* base = nullptr) {
    auto it = g_allocs.upper_bound(p);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    if (p - it->first + bytes > it->second.size) return nullptr;
    if (base) *base = it->first;
    return &it->second;
}

CUresult device_alloc(size_t bytes, CUdeviceptr* out) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    if (bytes == 0) {
        *out = 0;
        return CUDA_SUCCESS;
    }
    if (bytes > settings().memory_bytes - g_used) return CUDA_ERROR_OUT_OF_MEMORY;
    Alloc a;
    a.size = bytes;
    void* p = nullptr;
    if (bytes >= kLazyBytes) {
        p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
#if defined(TRAM_EMU_ASAN)
        __asan_unpoison_memory_region(p, bytes);  // stale shadow from earlier mappings
#endif
        a.lazy = true;
    } else {
        // Exactly the size asked, so a sanitizer sees a read one past the end.
        if (posix_memalign(&p, 256, bytes) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    }
    g_allocs[(CUdeviceptr)(uintptr_t)p] = a;
    g_used += bytes;
    *out = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

void poison(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    auto it = g_allocs.find(p);
    if (it != g_allocs.end() && !it->second.lazy) memset((void*)(uintptr_t)p, kPoison, it->second.size);
}

// Releases an allocation at its stream-ordered point: poisoned first, so a
// kernel that still reads it sees garbage; kept poisoned for a while before
// the host allocator may hand it out again.
void device_free_now(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(g_mu);
    auto it = g_allocs.find(p);
    if (it == g_allocs.end()) return;
    Alloc a = it->second;
    g_allocs.erase(it);
    g_used -= a.size;
    void* host = (void*)(uintptr_t)p;
    if (a.lazy) {
        munmap(host, a.size);  // a later access faults
        return;
    }
    memset(host, kPoison, a.size);
#if defined(TRAM_EMU_ASAN)
    free(host);  // AddressSanitizer quarantines it and reports any later use
#else
    g_quarantine.emplace_back(host, a.size);
    g_quarantine_bytes += a.size;
    while (g_quarantine_bytes > kQuarantineBytes) {
        free(g_quarantine.front().first);
        g_quarantine_bytes -= g_quarantine.front().second;
        g_quarantine.pop_front();
    }
#endif
}

GraphMemory::~GraphMemory() {
    for (CUdeviceptr p : ptrs) device_free_now(p);
}

// A memset; zeros over whole pages of a lazy allocation give the pages back
// instead (they read as zero again), so clearing a huge buffer costs nothing.
void device_memset(CUdeviceptr p, unsigned char v, size_t n) {
    bool lazy = false;
    {
        std::lock_guard<std::recursive_mutex> g(g_mu);
        const Alloc* a = find_alloc(p, n);
        lazy = a && a->lazy;
    }
    unsigned char* b = (unsigned char*)(uintptr_t)p;
    if (v != 0 || !lazy) {
        memset(b, v, n);
        return;
    }
    const uintptr_t page = 4096;
    uintptr_t lo = ((uintptr_t)b + page - 1) & ~(page - 1), hi = ((uintptr_t)b + n) & ~(page - 1);
    if (hi <= lo) {
        memset(b, 0, n);
        return;
    }
    memset(b, 0, lo - (uintptr_t)b);
    madvise((void*)lo, hi - lo, MADV_DONTNEED);
    memset((void*)hi, 0, (uintptr_t)b + n - hi);
}

// ---------------------------------------------------------------------------
// Checks shared by the entry points.

Ctx* current_ctx() { return tl_ctx && g_ctxs.count(tl_ctx) ? tl_ctx : nullptr; }

// The stream a handle names: NULL and CU_STREAM_LEGACY are the current
// context's legacy stream, CU_STREAM_PER_THREAD this thread's own.
CUresult resolve(CUstream h, Stream** out) {
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (h == nullptr || h == CU_STREAM_LEGACY) {
        Ctx* c = current_ctx();
        if (!c) return CUDA_ERROR_INVALID_CONTEXT;
        *out = c->legacy.get();
        return CUDA_SUCCESS;
    }
    if (h == CU_STREAM_PER_THREAD) {
        Ctx* c = current_ctx();
        if (!c) return CUDA_ERROR_INVALID_CONTEXT;
        if (!tl_per_thread || tl_per_thread->ctx != c) {
            tl_per_thread = new Stream;
            tl_per_thread->ctx = c;
            tl_per_thread->flags = CU_STREAM_NON_BLOCKING;
            g_alive.insert(tl_per_thread);
        }
        *out = tl_per_thread;
        return CUDA_SUCCESS;
    }
    Stream* s = reinterpret_cast<Stream*>(h);
    if (!g_streams.count(s)) return CUDA_ERROR_INVALID_HANDLE;
    *out = s;
    return CUDA_SUCCESS;
}

// Rule C9: an invalid operation invalidates the capture it touches; the
// capture then fails at its end.
void invalidate(Capture* c) {
    if (c) c->invalid = true;
}

// Rule C4: with a blocking stream of the context capturing, any use of the
// legacy stream would depend on captured work.
bool legacy_conflict(Stream* s) {
    if (!s->legacy) return false;
    bool conflict = false;
    for (Stream* o : s->ctx->streams) {
        if (o->capture && !(o->flags & CU_STREAM_NON_BLOCKING)) {
            invalidate(o->capture);
            conflict = true;
        }
    }
    return conflict;
}

// Rule C6: "potentially unsafe" calls (synchronous allocation and copies) are
// prohibited while this thread captures (unless in relaxed mode), or while any
// thread captures in global mode.
CUresult check_unsafe_call() {
    CUresult r = CUDA_SUCCESS;
    const auto me = std::this_thread::get_id();
    for (Capture* c : g_captures) {
        const bool mine = c->thread == me;
        if ((mine && c->mode != CU_STREAM_CAPTURE_MODE_RELAXED) ||
            (!mine && c->mode == CU_STREAM_CAPTURE_MODE_GLOBAL)) {
            invalidate(c);
            r = CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
        }
    }
    return r;
}

// ---------------------------------------------------------------------------
// Executing stream work.

void flush(Stream* s, uint64_t upto);

void run_op(Stream* s, Op& op) {
    switch (op.kind) {
        case Op::Kernel:
            execute(op.launch);
            break;
        case Op::Memset:
            device_memset(op.dst, op.value, op.bytes);
            break;
        case Op::HtoD:
            memcpy((void*)(uintptr_t)op.dst, op.staged.data(), op.bytes);
            break;
        case Op::DtoH:
            memcpy(op.host, (const void*)(uintptr_t)op.src, op.bytes);
            break;
        case Op::DtoD:
            memmove((void*)(uintptr_t)op.dst, (const void*)(uintptr_t)op.src, op.bytes);
            break;
        case Op::AllocPoison:
            poison(op.dst);
            break;
        case Op::Free:
            device_free_now(op.dst);
            break;
        case Op::Record: {
            std::lock_guard<std::recursive_mutex> g(g_mu);
            if (g_events.count(op.event) && op.event->stream == s && op.event->seq == s->done + 1) {
                op.event->time_ms = now_ms();
                op.event->completed = true;
            }
            break;
        }
        case Op::Wait: {
            bool alive;
            {
                std::lock_guard<std::recursive_mutex> g(g_mu);
                alive = g_alive.count(op.other) != 0;
            }
            if (alive) flush(op.other, op.other_seq);  // a destroyed stream ran all its work
            break;
        }
        case Op::Graph:
            for (Node& n : op.exec->nodes) run_op(s, n.op);
            break;
    }
}

// Deferred mode: runs s's queued work up to op number `upto` on this thread.
void flush(Stream* s, uint64_t upto) {
    std::lock_guard<std::recursive_mutex> g(s->m);
    if (s->being_flushed) return;  // a wait chain came back here: already ordered
    s->being_flushed = true;
    while (s->done < upto && !s->queue.empty()) {
        Op op = std::move(s->queue.front());
        s->queue.pop_front();
        run_op(s, op);
        s->done++;
    }
    s->being_flushed = false;
}

void flush_all(Stream* s) { flush(s, UINT64_MAX); }

// Rule C4 for work: the legacy stream waits for every blocking stream, and a
// blocking stream for the legacy stream.
void legacy_order(Stream* s) {
    if (!settings().deferred) return;
    std::vector<Stream*> before;
    {
        std::lock_guard<std::recursive_mutex> g(g_mu);
        if (s->legacy) {
            for (Stream* o : s->ctx->streams)
                if (!(o->flags & CU_STREAM_NON_BLOCKING)) before.push_back(o);
        } else if (!(s->flags & CU_STREAM_NON_BLOCKING)) {
            before.push_back(s->ctx->legacy.get());
        }
    }
    for (Stream* o : before) flush_all(o);
}

// Puts work on a stream: into its capture when it captures, else runs it now
// (or, deferred, when the host or another stream waits for it).
CUresult submit(Stream* s, Op op) {
    if (s->capture) {
        Capture* c = s->capture;
        if (c->invalid) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        size_t id = c->nodes.size();
        c->nodes.push_back(Node{std::move(op)});
        c->deps.push_back(c->frontier[s]);
        c->frontier[s] = {id};
        return CUDA_SUCCESS;
    }
    if (!settings().deferred) {
        std::lock_guard<std::recursive_mutex> g(s->m);
        legacy_order(s);
        s->enqueued++;
        run_op(s, op);
        s->done++;
        return CUDA_SUCCESS;
    }
    std::lock_guard<std::recursive_mutex> g(s->m);
    legacy_order(s);
    s->queue.push_back(std::move(op));
    s->enqueued++;
    return CUDA_SUCCESS;
}

// Validates a device range for a copy or memset.
bool valid_range(CUdeviceptr p, size_t bytes) {
    if (bytes == 0) return true;
    std::lock_guard<std::recursive_mutex> g(g_mu);
    return find_alloc(p, bytes) != nullptr;
}

void destroy_ctx(Ctx* c) {
    // Work still queued runs first; then everything the context owns goes.
    for (Stream* s : c->streams) flush_all(s);
    flush_all(c->legacy.get());
    for (Stream* s : c->streams) {
        g_streams.erase(s);
        g_alive.erase(s);
        g_dead_streams.emplace_back(s);
    }
    g_alive.erase(c->legacy.get());
    for (Module* m : c->modules) {
        for (auto& f : m->funcs) g_funcs.erase(f.get());
        g_modules.erase(m);
        delete m;
    }
    for (Event* e : c->events) {
        g_events.erase(e);
        delete e;
    }
    std::vector<CUdeviceptr> live;
    for (auto& a : g_allocs) live.push_back(a.first);
    for (CUdeviceptr p : live) device_free_now(p);
    c->streams.clear();
    g_ctxs.erase(c);
    g_dead_ctxs.emplace_back(c);
}

}  // namespace
}  // namespace emu

using namespace emu;

#define LOCK std::lock_guard<std::recursive_mutex> lock_(g_mu)
#define CHECK_INIT \
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED

// ---------------------------------------------------------------------------
// Errors.

struct ErrorText {
    CUresult code;
    const char* name;
    const char* text;
};
static const ErrorText kErrors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_DEINITIALIZED, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_NO_BINARY_FOR_GPU, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"},
    {CUDA_ERROR_INVALID_PTX, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {CUDA_ERROR_MISALIGNED_ADDRESS, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"},
    {CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED", "operation failed due to a previous error during capture"},
    {CUDA_ERROR_STREAM_CAPTURE_MERGE, "CUDA_ERROR_STREAM_CAPTURE_MERGE", "operation would result in a merge of separate capture sequences"},
    {CUDA_ERROR_STREAM_CAPTURE_UNMATCHED, "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED", "capture was not ended in the same stream as it began"},
    {CUDA_ERROR_STREAM_CAPTURE_UNJOINED, "CUDA_ERROR_STREAM_CAPTURE_UNJOINED", "capturing stream has unjoined work"},
    {CUDA_ERROR_STREAM_CAPTURE_ISOLATION, "CUDA_ERROR_STREAM_CAPTURE_ISOLATION", "dependency created on uncaptured work in another stream"},
    {CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT", "operation would make the legacy stream depend on a capturing blocking stream"},
    {CUDA_ERROR_CAPTURED_EVENT, "CUDA_ERROR_CAPTURED_EVENT", "operation not permitted on an event last recorded in a capturing stream"},
    {CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD", "attempt to terminate a thread-local capture sequence from another thread"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

API CUresult cuGetErrorName(CUresult error, const char** pStr) {
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    for (const ErrorText& e : kErrors)
        if (e.code == error) return *pStr = e.name, CUDA_SUCCESS;
    *pStr = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
}

API CUresult cuGetErrorString(CUresult error, const char** pStr) {
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    for (const ErrorText& e : kErrors)
        if (e.code == error) return *pStr = e.text, CUDA_SUCCESS;
    *pStr = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
}

// ---------------------------------------------------------------------------
// Initialisation, device, context.

API CUresult cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    if (!g_init) {
        settings();
        load_kernel_libraries();
        g_init = true;
        if (settings().log) note("emulated device ready: %s", settings().describe().c_str());
    }
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = CUDA_VERSION;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetCount(int* n) {
    CHECK_INIT;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = 1;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    CHECK_INIT;
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    CHECK_INIT;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "tram-emu (emulated H100-like device)");
    return CUDA_SUCCESS;
}

API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    CHECK_INIT;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = settings().memory_bytes;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice d) {
    CHECK_INIT;
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    bool known;
    *v = attribute(a, &known);
    if (!known) {
        note("device attribute %d is not modelled", (int)a);
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice d) {
    CHECK_INIT;
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    LOCK;
    if (!g_primary) {
        g_primary = new Ctx;
        g_primary->legacy = std::make_unique<Stream>();
        g_primary->legacy->ctx = g_primary;
        g_primary->legacy->legacy = true;
        g_alive.insert(g_primary->legacy.get());
        g_ctxs.insert(g_primary);
    }
    g_primary->refs++;
    *pctx = reinterpret_cast<CUcontext>(g_primary);
    return CUDA_SUCCESS;
}

// The last release destroys the primary context and everything in it, as the
// driver does; a later retain makes a new one.
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    CHECK_INIT;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    LOCK;
    if (!g_primary || g_primary->refs == 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (--g_primary->refs == 0) {
        destroy_ctx(g_primary);
        g_primary = nullptr;
    }
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetCurrent(CUcontext* pctx) {
    CHECK_INIT;
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    *pctx = reinterpret_cast<CUcontext>(current_ctx());
    return CUDA_SUCCESS;
}

API CUresult cuCtxSetCurrent(CUcontext ctx) {
    CHECK_INIT;
    LOCK;
    Ctx* c = reinterpret_cast<Ctx*>(ctx);
    if (c && !g_ctxs.count(c)) return CUDA_ERROR_INVALID_CONTEXT;
    tl_ctx = c;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetDevice(CUdevice* d) {
    CHECK_INIT;
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    if (!current_ctx()) return CUDA_ERROR_INVALID_CONTEXT;
    *d = 0;
    return CUDA_SUCCESS;
}

// Rule C3: synchronizing a context while any of its streams captures is
// refused and invalidates those captures, whichever thread asks.
API CUresult cuCtxSynchronize(void) {
    CHECK_INIT;
    std::vector<Stream*> streams;
    {
        LOCK;
        Ctx* c = current_ctx();
        if (!c) return CUDA_ERROR_INVALID_CONTEXT;
        bool capturing = false;
        for (Stream* s : c->streams)
            if (s->capture) {
                invalidate(s->capture);
                capturing = true;
            }
        if (capturing) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
        streams.assign(c->streams.begin(), c->streams.end());
        streams.push_back(c->legacy.get());
    }
    for (Stream* s : streams) flush_all(s);
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------
// Streams.

API CUresult cuStreamCreate(CUstream* ps, unsigned int flags) {
    CHECK_INIT;
    if (!ps || (flags & ~CU_STREAM_NON_BLOCKING)) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    Ctx* c = current_ctx();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    Stream* s = new Stream;
    s->ctx = c;
    s->flags = flags;
    c->streams.insert(s);
    g_streams.insert(s);
    g_alive.insert(s);
    *ps = reinterpret_cast<CUstream>(s);
    return CUDA_SUCCESS;
}

API CUresult cuStreamCreateWithPriority(CUstream* ps, unsigned int flags, int) {
    return cuStreamCreate(ps, flags);
}

API CUresult cuStreamDestroy_v2(CUstream h) {
    CHECK_INIT;
    Stream* s;
    {
        LOCK;
        CUresult r = resolve(h, &s);
        if (r) return r;
        if (s->legacy || s == tl_per_thread) return CUDA_ERROR_INVALID_HANDLE;
        if (s->capture) invalidate(s->capture);
    }
    // Work still queued completes; the stream's resources go after it.
    flush_all(s);
    LOCK;
    if (s->capture) {
        s->capture->members.erase(s);
        s->capture = nullptr;
    }
    for (Event* e : s->ctx->events)
        if (e->stream == s) {
            e->stream = nullptr;  // its work has run
            e->completed = true;
        }
    s->ctx->streams.erase(s);
    g_streams.erase(s);
    g_alive.erase(s);
    g_dead_streams.emplace_back(s);
    return CUDA_SUCCESS;
}

// Rules C2 and C4: a capturing stream, or the legacy stream while a blocking
// stream captures, cannot be synchronized; the capture is invalidated.
API CUresult cuStreamSynchronize(CUstream h) {
    CHECK_INIT;
    Stream* s;
    {
        LOCK;
        CUresult r = resolve(h, &s);
        if (r) return r;
        if (s->capture) {
            invalidate(s->capture);
            return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
        }
        if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    }
    legacy_order(s);
    flush_all(s);
    return CUDA_SUCCESS;
}

API CUresult cuStreamQuery(CUstream h) {
    CHECK_INIT;
    LOCK;
    Stream* s;
    CUresult r = resolve(h, &s);
    if (r) return r;
    if (s->capture) {
        invalidate(s->capture);
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    std::lock_guard<std::recursive_mutex> g(s->m);
    return s->queue.empty() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

API CUresult cuStreamIsCapturing(CUstream h, CUstreamCaptureStatus* status) {
    CHECK_INIT;
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    Stream* s;
    CUresult r = resolve(h, &s);
    if (r) return r;
    if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    *status = !s->capture ? CU_STREAM_CAPTURE_STATUS_NONE
            : s->capture->invalid ? CU_STREAM_CAPTURE_STATUS_INVALIDATED
                                  : CU_STREAM_CAPTURE_STATUS_ACTIVE;
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------
// Events.

API CUresult cuEventCreate(CUevent* pe, unsigned int flags) {
    CHECK_INIT;
    if (!pe) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    Ctx* c = current_ctx();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    Event* e = new Event;
    e->ctx = c;
    e->flags = flags;
    c->events.insert(e);
    g_events.insert(e);
    *pe = reinterpret_cast<CUevent>(e);
    return CUDA_SUCCESS;
}

API CUresult cuEventDestroy_v2(CUevent h) {
    CHECK_INIT;
    LOCK;
    Event* e = reinterpret_cast<Event*>(h);
    if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    e->ctx->events.erase(e);
    g_events.erase(e);
    delete e;
    return CUDA_SUCCESS;
}

// Rule C5: recorded in a capturing stream, the event stands for the captured
// work before it (a "captured event").
API CUresult cuEventRecord(CUevent h, CUstream hs) {
    CHECK_INIT;
    LOCK;
    Event* e = reinterpret_cast<Event*>(h);
    if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s;
    CUresult r = resolve(hs, &s);
    if (r) return r;
    if (s->ctx != e->ctx) return CUDA_ERROR_INVALID_CONTEXT;
    if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    if (s->capture) {
        if (s->capture->invalid) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        e->captured = true;
        e->capture = s->capture;
        e->nodes = s->capture->frontier[s];
        e->recorded = true;
        return CUDA_SUCCESS;
    }
    e->captured = false;
    e->capture = nullptr;
    e->recorded = true;
    e->completed = false;
    e->stream = s;
    {
        std::lock_guard<std::recursive_mutex> g(s->m);
        e->seq = s->enqueued + 1;
    }
    Op op{};
    op.kind = Op::Record;
    op.event = e;
    return submit(s, std::move(op));
}

API CUresult cuEventRecordWithFlags(CUevent h, CUstream hs, unsigned int flags) {
    if (flags) return CUDA_ERROR_NOT_SUPPORTED;
    return cuEventRecord(h, hs);
}

// Rule C7: querying or synchronizing a captured event is refused.
API CUresult cuEventQuery(CUevent h) {
    CHECK_INIT;
    LOCK;
    Event* e = reinterpret_cast<Event*>(h);
    if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    if (e->captured) {
        if (g_captures.count(e->capture)) invalidate(e->capture);
        return CUDA_ERROR_CAPTURED_EVENT;
    }
    if (!e->recorded || !e->stream) return CUDA_SUCCESS;
    std::lock_guard<std::recursive_mutex> g(e->stream->m);
    return e->stream->done >= e->seq ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

API CUresult cuEventSynchronize(CUevent h) {
    CHECK_INIT;
    Stream* s;
    uint64_t seq;
    {
        LOCK;
        Event* e = reinterpret_cast<Event*>(h);
        if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
        if (e->captured) {
            if (g_captures.count(e->capture)) invalidate(e->capture);
            return CUDA_ERROR_CAPTURED_EVENT;
        }
        if (!e->recorded || !e->stream) return CUDA_SUCCESS;
        s = e->stream;
        seq = e->seq;
    }
    flush(s, seq);
    return CUDA_SUCCESS;
}

API CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
    CHECK_INIT;
    if (!ms) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    Event* x = reinterpret_cast<Event*>(a);
    Event* y = reinterpret_cast<Event*>(b);
    if (!g_events.count(x) || !g_events.count(y)) return CUDA_ERROR_INVALID_HANDLE;
    if ((x->flags | y->flags) & CU_EVENT_DISABLE_TIMING) return CUDA_ERROR_INVALID_HANDLE;
    if (x->captured || y->captured) return CUDA_ERROR_CAPTURED_EVENT;
    if (!x->recorded || !y->recorded) return CUDA_ERROR_INVALID_HANDLE;
    if (!x->completed || !y->completed) return CUDA_ERROR_NOT_READY;
    // Host time between the two records' execution: not a GPU timing.
    *ms = (float)(y->time_ms - x->time_ms);
    return CUDA_SUCCESS;
}

// Rule C5 and C8: a capturing stream may wait only on an event captured into
// the same capture (an event recorded outside it needs CU_EVENT_WAIT_EXTERNAL);
// a stream that waits on a captured event joins that capture; two captures
// cannot be merged.
API CUresult cuStreamWaitEvent(CUstream hs, CUevent h, unsigned int flags) {
    CHECK_INIT;
    LOCK;
    Stream* s;
    CUresult r = resolve(hs, &s);
    if (r) return r;
    Event* e = reinterpret_cast<Event*>(h);
    if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    if (e->captured) {
        Capture* c = e->capture;
        if (!g_captures.count(c)) return CUDA_ERROR_CAPTURED_EVENT;  // its capture has ended
        if (c->invalid) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        if (s->capture && s->capture != c) {
            invalidate(s->capture);
            invalidate(c);
            return CUDA_ERROR_STREAM_CAPTURE_MERGE;
        }
        if (!s->capture) {
            s->capture = c;
            c->members.insert(s);
            c->frontier[s] = e->nodes;
        } else {
            c->frontier[s].insert(e->nodes.begin(), e->nodes.end());
        }
        return CUDA_SUCCESS;
    }
    if (s->capture) {
        if (s->capture->invalid) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        if (!e->recorded || (flags & CU_EVENT_WAIT_EXTERNAL)) return CUDA_SUCCESS;
        invalidate(s->capture);
        return CUDA_ERROR_STREAM_CAPTURE_ISOLATION;
    }
    if (!e->recorded || !e->stream || e->stream == s) return CUDA_SUCCESS;
    Op op{};
    op.kind = Op::Wait;
    op.other = e->stream;
    op.other_seq = e->seq;
    return submit(s, std::move(op));
}

// ---------------------------------------------------------------------------
// Memory.

API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    CHECK_INIT;
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    if (!current_ctx()) return CUDA_ERROR_INVALID_CONTEXT;
    *total = settings().memory_bytes;
    *free_bytes = settings().memory_bytes - g_used;
    return CUDA_SUCCESS;
}

// Rule C10: stream-ordered allocation is capturable (an allocation node); the
// memory is poisoned at its stream-ordered point.
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream hs) {
    CHECK_INIT;
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    Stream* s;
    CUresult r = resolve(hs, &s);
    if (r) return r;
    if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    if (s->capture && s->capture->invalid) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    r = device_alloc(bytes, p);
    if (r || *p == 0) return r;
    poison(*p);
    if (s->capture) {
        s->capture->memory->ptrs.push_back(*p);
        s->capture->unfreed.insert(*p);
    } else if (!settings().deferred) {
        return CUDA_SUCCESS;  // its stream-ordered point is now
    }
    // Poisoned again where the stream reaches it (and at every replay).
    Op op{};
    op.kind = Op::AllocPoison;
    op.dst = *p;
    return submit(s, std::move(op));
}

// Rule C10: in a capture, only memory allocated by the same graph can be
// freed (cuGraphAddMemFreeNode's rule).
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream hs) {
    CHECK_INIT;
    LOCK;
    Stream* s;
    CUresult r = resolve(hs, &s);
    if (r) return r;
    if (p == 0) return CUDA_SUCCESS;
    if (!g_allocs.count(p)) return CUDA_ERROR_INVALID_VALUE;
    if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    if (s->capture) {
        if (s->capture->invalid) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        if (!s->capture->unfreed.count(p)) {
            invalidate(s->capture);
            return CUDA_ERROR_INVALID_VALUE;
        }
        s->capture->unfreed.erase(p);
        // The graph owns it: a replay's free node only poisons it.
        Op op{};
        op.kind = Op::AllocPoison;
        op.dst = p;
        return submit(s, std::move(op));
    }
    Op op{};
    op.kind = Op::Free;
    op.dst = p;
    return submit(s, std::move(op));
}

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    CHECK_INIT;
    if (!p || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    if (!current_ctx()) return CUDA_ERROR_INVALID_CONTEXT;
    if (CUresult r = check_unsafe_call()) return r;
    CUresult r = device_alloc(bytes, p);
    if (!r) poison(*p);
    return r;
}

API CUresult cuMemFree_v2(CUdeviceptr p) {
    CHECK_INIT;
    Ctx* c;
    {
        LOCK;
        c = current_ctx();
        if (!c) return CUDA_ERROR_INVALID_CONTEXT;
        if (CUresult r = check_unsafe_call()) return r;
        if (p && !g_allocs.count(p)) return CUDA_ERROR_INVALID_VALUE;
    }
    // cuMemFree synchronizes the device.
    for (Stream* s : std::vector<Stream*>(c->streams.begin(), c->streams.end())) flush_all(s);
    flush_all(c->legacy.get());
    if (p) device_free_now(p);
    return CUDA_SUCCESS;
}

API CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream hs) {
    CHECK_INIT;
    LOCK;
    Stream* s;
    CUresult r = resolve(hs, &s);
    if (r) return r;
    if (!valid_range(p, n)) return CUDA_ERROR_INVALID_VALUE;
    if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    if (n == 0) return CUDA_SUCCESS;
    Op op{};
    op.kind = Op::Memset;
    op.dst = p;
    op.value = v;
    op.bytes = n;
    return submit(s, std::move(op));
}

// The checks of a copy between host and device memory, under the lock.
// Rule C11: it cannot be captured (the driver stages a pageable copy at the
// call); every host pointer here is pageable.
static CUresult host_copy_checks(CUstream hs, Stream** s, const void* host, CUdeviceptr dev, size_t n) {
    CUresult r = resolve(hs, s);
    if (r) return r;
    if (n && !host) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_range(dev, n)) return CUDA_ERROR_INVALID_VALUE;
    if (legacy_conflict(*s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    if ((*s)->capture) {
        invalidate((*s)->capture);
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream hs) {
    CHECK_INIT;
    LOCK;
    Stream* s;
    if (CUresult r = host_copy_checks(hs, &s, src, dst, n)) return r;
    if (n == 0) return CUDA_SUCCESS;
    // Pageable source: staged now, so the caller may reuse it at once.
    Op op{};
    op.kind = Op::HtoD;
    op.dst = dst;
    op.bytes = n;
    op.staged.assign(static_cast<const unsigned char*>(src), static_cast<const unsigned char*>(src) + n);
    return submit(s, std::move(op));
}

API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream hs) {
    CHECK_INIT;
    Stream* s;
    {
        LOCK;
        if (CUresult r = host_copy_checks(hs, &s, dst, src, n)) return r;
        if (n == 0) return CUDA_SUCCESS;
        Op op{};
        op.kind = Op::DtoH;
        op.src = src;
        op.bytes = n;
        op.host = dst;
        if (CUresult r = submit(s, std::move(op))) return r;
    }
    // Pageable destination: the copy has completed when the call returns.
    flush_all(s);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream hs) {
    CHECK_INIT;
    LOCK;
    Stream* s;
    CUresult r = resolve(hs, &s);
    if (r) return r;
    if (!valid_range(dst, n) || !valid_range(src, n)) return CUDA_ERROR_INVALID_VALUE;
    if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    if (n == 0) return CUDA_SUCCESS;
    Op op{};
    op.kind = Op::DtoD;
    op.dst = dst;
    op.src = src;
    op.bytes = n;
    return submit(s, std::move(op));
}

// Synchronous copies and memset: on the legacy stream, waited for (rule C6:
// prohibited during a capture that forbids unsafe calls).
static CUresult sync_prologue() {
    LOCK;
    if (!current_ctx()) return CUDA_ERROR_INVALID_CONTEXT;
    return check_unsafe_call();
}

static CUresult sync_epilogue(CUresult r) {
    if (r) return r;
    Stream* s;
    {
        LOCK;
        if ((r = resolve(nullptr, &s))) return r;
    }
    legacy_order(s);
    flush_all(s);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    CHECK_INIT;
    if (CUresult r = sync_prologue()) return r;
    return sync_epilogue(cuMemcpyHtoDAsync_v2(dst, src, n, nullptr));
}

API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    CHECK_INIT;
    if (CUresult r = sync_prologue()) return r;
    return sync_epilogue(cuMemcpyDtoHAsync_v2(dst, src, n, nullptr));
}

API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CHECK_INIT;
    if (CUresult r = sync_prologue()) return r;
    return sync_epilogue(cuMemcpyDtoDAsync_v2(dst, src, n, nullptr));
}

API CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    CHECK_INIT;
    if (CUresult r = sync_prologue()) return r;
    return sync_epilogue(cuMemsetD8Async(p, v, n, nullptr));
}

// ---------------------------------------------------------------------------
// Modules and kernels.

// Loads an image: the PTX says which kernels exist, with what parameters and
// launch bounds; each must have a host-compiled twin with the same parameter
// sizes, or the image is refused (a stale emulator build, or a host/device ABI
// difference). Resource usage comes from the image's sm_90 ELF when it has
// one, else from what ptxas reported when the emulator was built.
API CUresult cuModuleLoadData(CUmodule* pm, const void* data) {
    CHECK_INIT;
    if (!pm || !data) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    Ctx* c = current_ctx();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    Image img;
    std::string why;
    if (!parse_image(data, img, why)) {
        note("cuModuleLoadData refused an image: %s", why.c_str());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    // A compute capability 9.0 device runs SASS for 9.0, or JIT-compiles PTX
    // for an architecture no newer than 9.0.
    const bool sass = std::find(img.elf_archs.begin(), img.elf_archs.end(), 90u) != img.elf_archs.end();
    if (!sass && (img.ptx_arch == 0 || img.ptx_arch > 90)) {
        note("cuModuleLoadData: no SASS for sm_90 and no PTX it can JIT (compute_%u)", img.ptx_arch);
        return CUDA_ERROR_NO_BINARY_FOR_GPU;
    }
    auto m = std::make_unique<Module>();
    m->ctx = c;
    for (const PtxEntry& e : img.entries) {
        auto it = g_kernels->by_name.find(e.name);
        if (it == g_kernels->by_name.end()) {
            note("kernel %s is in the image but has no host-compiled twin: rebuild the emulator "
                 "(scripts/emu-build.sh)", e.name.c_str());
            return CUDA_ERROR_INVALID_IMAGE;
        }
        const tram_emu_kernel* hk = it->second.first;
        bool same = hk->n_params == e.param_sizes.size();
        for (size_t i = 0; same && i < e.param_sizes.size(); i++) same = hk->param_sizes[i] == e.param_sizes[i];
        if (!same) {
            std::string ptx, host;
            for (unsigned v : e.param_sizes) ptx += " " + std::to_string(v);
            for (unsigned i = 0; i < hk->n_params; i++) host += " " + std::to_string(hk->param_sizes[i]);
            note("kernel %s: the PTX declares parameters of%s bytes, the host build%s bytes: "
                 "refusing the image", e.name.c_str(), ptx.c_str(), host.c_str());
            return CUDA_ERROR_INVALID_IMAGE;
        }
        auto f = std::make_unique<Func>();
        f->name = e.name;
        f->ctx = c;
        f->k.host = hk;
        f->k.library = it->second.second;
        f->k.module = hk->module;
        f->k.max_threads = e.max_threads ? std::min<unsigned>(e.max_threads, kMaxThreadsPerBlock) : kMaxThreadsPerBlock;
        f->k.param_sizes = e.param_sizes;
        auto elf = img.sm90.find(e.name);
        auto res = g_kernels->resources.find(e.name);
        if (elf != img.sm90.end() && elf->second.registers >= 0) {
            f->k.registers = elf->second.registers;
            f->k.static_smem = elf->second.static_smem;
        } else if (res != g_kernels->resources.end()) {
            f->k.registers = res->second->registers;
            f->k.static_smem = res->second->static_smem;
        } else {
            note("kernel %s: no sm_90 resource usage (rebuild the emulator)", e.name.c_str());
            return CUDA_ERROR_INVALID_IMAGE;
        }
        g_funcs.insert(f.get());
        m->funcs.push_back(std::move(f));
    }
    if (settings().log)
        note("loaded a module of %zu kernels (%s)", m->funcs.size(),
             sass ? "SASS for sm_90" : "PTX only: a GPU would JIT-compile it");
    Module* raw = m.release();
    c->modules.insert(raw);
    g_modules.insert(raw);
    *pm = reinterpret_cast<CUmodule>(raw);
    return CUDA_SUCCESS;
}

API CUresult cuModuleUnload(CUmodule h) {
    CHECK_INIT;
    LOCK;
    Module* m = reinterpret_cast<Module*>(h);
    if (!g_modules.count(m)) return CUDA_ERROR_INVALID_HANDLE;
    // Deferred launches of its kernels run first.
    if (settings().deferred) {
        for (Stream* s : m->ctx->streams) flush_all(s);
        flush_all(m->ctx->legacy.get());
    }
    for (auto& f : m->funcs) g_funcs.erase(f.get());
    m->ctx->modules.erase(m);
    g_modules.erase(m);
    delete m;
    return CUDA_SUCCESS;
}

API CUresult cuModuleGetFunction(CUfunction* pf, CUmodule h, const char* name) {
    CHECK_INIT;
    if (!pf || !name) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    Module* m = reinterpret_cast<Module*>(h);
    if (!g_modules.count(m)) return CUDA_ERROR_INVALID_HANDLE;
    for (auto& f : m->funcs)
        if (f->name == name) return *pf = reinterpret_cast<CUfunction>(f.get()), CUDA_SUCCESS;
    return CUDA_ERROR_NOT_FOUND;
}

static int regs_per_warp(int regs) {
    return (regs * 32 + kRegAllocUnit - 1) / kRegAllocUnit * kRegAllocUnit;
}

// Blocks of `threads` threads resident on one SM, from the occupancy rules of
// compute capability 9.0: threads, warps' registers, shared memory, blocks.
static int occupancy(const Kernel& k, int threads, size_t dyn_smem) {
    if (threads <= 0 || threads > (int)k.max_threads) return 0;
    const int warps = (threads + 31) / 32;
    int by_threads = kMaxThreadsPerSm / (warps * 32);
    int by_regs = k.registers > 0 ? (kRegsPerSm / regs_per_warp(k.registers)) / warps : kMaxBlocksPerSm;
    const size_t smem = (size_t)k.static_smem + dyn_smem + kSmemReservedPerBlock;
    int by_smem = (int)(kSmemPerSm / smem);
    return std::max(0, std::min({by_threads, by_regs, by_smem, kMaxBlocksPerSm}));
}

API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, CUfunction h, int threads,
                                                                  size_t dyn_smem, unsigned int) {
    CHECK_INIT;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    Func* f = reinterpret_cast<Func*>(h);
    if (!g_funcs.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    *n = occupancy(f->k, threads, dyn_smem);
    return CUDA_SUCCESS;
}

API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, CUfunction h, int threads, size_t dyn_smem) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(n, h, threads, dyn_smem, 0);
}

API CUresult cuFuncGetAttribute(int* v, CUfunction_attribute a, CUfunction h) {
    CHECK_INIT;
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    Func* f = reinterpret_cast<Func*>(h);
    if (!g_funcs.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    switch (a) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: {
            int by_regs = f->k.registers > 0 ? kRegsPerBlock / regs_per_warp(f->k.registers) * 32 : 1024;
            *v = std::min<int>((int)f->k.max_threads, by_regs);
            return CUDA_SUCCESS;
        }
        case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *v = f->k.static_smem; return CUDA_SUCCESS;
        case CU_FUNC_ATTRIBUTE_NUM_REGS: *v = f->k.registers; return CUDA_SUCCESS;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *v = kSmemPerBlock - f->k.static_smem; return CUDA_SUCCESS;
        case CU_FUNC_ATTRIBUTE_PTX_VERSION: *v = 80; return CUDA_SUCCESS;
        case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *v = 90; return CUDA_SUCCESS;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
}

// Checks a launch as the driver does, then copies its parameters by the sizes
// the PTX declares.
static CUresult prepare_launch(Func* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned smem, void** params, void** extra, Launch& l) {
    if (extra) return CUDA_ERROR_NOT_SUPPORTED;
    if (!gx || !gy || !gz || gx > 2147483647u || gy > 65535 || gz > 65535) return CUDA_ERROR_INVALID_VALUE;
    if (!bx || !by || !bz || bx > 1024 || by > 1024 || bz > 64) return CUDA_ERROR_INVALID_VALUE;
    const uint64_t threads = (uint64_t)bx * by * bz;
    if (threads > kMaxThreadsPerBlock) return CUDA_ERROR_INVALID_VALUE;
    const Kernel& k = f->k;
    // More threads than the kernel's launch bounds, or than its registers allow.
    if (threads > k.max_threads) return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    if (k.registers > 0 && (uint64_t)regs_per_warp(k.registers) * ((threads + 31) / 32) > (uint64_t)kRegsPerBlock)
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    // Static plus dynamic shared memory within the 48 KiB a block gets unless
    // the kernel opted in to more (not modelled: no kernel here does).
    if ((uint64_t)k.static_smem + smem > (uint64_t)kSmemPerBlock) return CUDA_ERROR_INVALID_VALUE;
    if (!k.param_sizes.empty() && !params) return CUDA_ERROR_INVALID_VALUE;
    if (k.param_sizes.size() > 64) return CUDA_ERROR_NOT_SUPPORTED;
    l.kernel = &f->k;
    l.grid = {gx, gy, gz};
    l.block = {bx, by, bz};
    l.dynamic_smem = smem;
    size_t off = 0;
    for (unsigned size : k.param_sizes) {
        const size_t align = size >= 8 ? 8 : size >= 4 ? 4 : size >= 2 ? 2 : 1;
        off = (off + align - 1) / align * align;
        l.offsets.push_back(off);
        off += size;
    }
    l.blob.assign(off + 8, 0);
    for (size_t i = 0; i < k.param_sizes.size(); i++)
        memcpy(l.blob.data() + l.offsets[i], params[i], k.param_sizes[i]);
    return CUDA_SUCCESS;
}

API CUresult cuLaunchKernel(CUfunction h, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned smem, CUstream hs, void** params, void** extra) {
    CHECK_INIT;
    Op op{};
    Stream* s;
    {
        LOCK;
        Func* f = reinterpret_cast<Func*>(h);
        if (!g_funcs.count(f)) return CUDA_ERROR_INVALID_HANDLE;
        CUresult r = resolve(hs, &s);
        if (r) return r;
        if (s->ctx != f->ctx) return CUDA_ERROR_INVALID_CONTEXT;
        if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
        op.kind = Op::Kernel;
        if ((r = prepare_launch(f, gx, gy, gz, bx, by, bz, smem, params, extra, op.launch))) return r;
        if (s->capture || settings().deferred) return submit(s, std::move(op));
    }
    // Eager: run now, outside the metadata lock, so other threads' work goes on.
    return submit(s, std::move(op));
}

// ---------------------------------------------------------------------------
// Capture and graphs.

API CUresult cuStreamBeginCapture_v2(CUstream hs, CUstreamCaptureMode mode) {
    CHECK_INIT;
    LOCK;
    Stream* s;
    CUresult r = resolve(hs, &s);
    if (r) return r;
    // Rule C1: the legacy stream cannot be captured.
    if (s->legacy) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (s->capture) return CUDA_ERROR_ILLEGAL_STATE;
    if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
        mode != CU_STREAM_CAPTURE_MODE_RELAXED)
        return CUDA_ERROR_INVALID_VALUE;
    Capture* c = new Capture;
    c->origin = s;
    c->mode = mode;
    c->thread = std::this_thread::get_id();
    c->members.insert(s);
    c->frontier[s] = {};
    c->memory = std::make_shared<GraphMemory>();
    g_captures.insert(c);
    s->capture = c;
    // Capture severs the stream's order with what came before it (the work
    // already enqueued stays enqueued, and replays do not wait for it).
    return CUDA_SUCCESS;
}

API CUresult cuStreamEndCapture(CUstream hs, CUgraph* pg) {
    CHECK_INIT;
    if (!pg) return CUDA_ERROR_INVALID_VALUE;
    LOCK;
    Stream* s;
    CUresult r = resolve(hs, &s);
    if (r) return r;
    Capture* c = s->capture;
    if (!c) return CUDA_ERROR_ILLEGAL_STATE;
    // Rule C8: only the origin stream ends a capture.
    if (c->origin != s) {
        invalidate(c);
        return CUDA_ERROR_STREAM_CAPTURE_UNMATCHED;
    }
    // Rule C12: a global or thread-local capture ends on the thread that began it.
    if (c->mode != CU_STREAM_CAPTURE_MODE_RELAXED && c->thread != std::this_thread::get_id())
        return CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD;
    // Rule C8: every stream that joined must have been joined back.
    std::set<size_t> reach;
    std::vector<size_t> todo(c->frontier[s].begin(), c->frontier[s].end());
    while (!todo.empty()) {
        size_t n = todo.back();
        todo.pop_back();
        if (!reach.insert(n).second) continue;
        todo.insert(todo.end(), c->deps[n].begin(), c->deps[n].end());
    }
    bool unjoined = false;
    for (auto& [member, front] : c->frontier)
        for (size_t n : front)
            if (!reach.count(n)) unjoined = true;
    for (Stream* m : c->members) m->capture = nullptr;
    g_captures.erase(c);
    *pg = nullptr;
    const bool invalid = c->invalid;
    if (invalid || unjoined) {
        delete c;  // its allocations are released with its GraphMemory
        return invalid ? CUDA_ERROR_STREAM_CAPTURE_INVALIDATED : CUDA_ERROR_STREAM_CAPTURE_UNJOINED;
    }
    Graph* g = new Graph;
    g->nodes = std::move(c->nodes);
    g->memory = c->memory;
    delete c;
    g_graphs.insert(g);
    *pg = reinterpret_cast<CUgraph>(g);
    return CUDA_SUCCESS;
}

API CUresult cuGraphInstantiateWithFlags(CUgraphExec* pe, CUgraph hg, unsigned long long flags) {
    CHECK_INIT;
    if (!pe) return CUDA_ERROR_INVALID_VALUE;
    if (flags) return CUDA_ERROR_NOT_SUPPORTED;
    LOCK;
    Graph* g = reinterpret_cast<Graph*>(hg);
    if (!g_graphs.count(g)) return CUDA_ERROR_INVALID_HANDLE;
    Exec* e = new Exec;
    e->nodes = g->nodes;
    e->memory = g->memory;
    g_execs.insert(e);
    *pe = reinterpret_cast<CUgraphExec>(e);
    return CUDA_SUCCESS;
}

API CUresult cuGraphLaunch(CUgraphExec he, CUstream hs) {
    CHECK_INIT;
    Stream* s;
    Op op{};
    {
        LOCK;
        Exec* e = reinterpret_cast<Exec*>(he);
        if (!g_execs.count(e)) return CUDA_ERROR_INVALID_HANDLE;
        CUresult r = resolve(hs, &s);
        if (r) return r;
        if (legacy_conflict(s)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
        op.kind = Op::Graph;
        op.exec = e;
        if (s->capture || settings().deferred) return submit(s, std::move(op));
    }
    return submit(s, std::move(op));
}

API CUresult cuGraphUpload(CUgraphExec he, CUstream hs) {
    CHECK_INIT;
    LOCK;
    if (!g_execs.count(reinterpret_cast<Exec*>(he))) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s;
    return resolve(hs, &s);
}

API CUresult cuGraphExecDestroy(CUgraphExec he) {
    CHECK_INIT;
    LOCK;
    Exec* e = reinterpret_cast<Exec*>(he);
    if (!g_execs.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    g_execs.erase(e);
    delete e;
    return CUDA_SUCCESS;
}

API CUresult cuGraphDestroy(CUgraph hg) {
    CHECK_INIT;
    LOCK;
    Graph* g = reinterpret_cast<Graph*>(hg);
    if (!g_graphs.count(g)) return CUDA_ERROR_INVALID_HANDLE;
    g_graphs.erase(g);
    delete g;
    return CUDA_SUCCESS;
}
