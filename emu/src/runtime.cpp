// The execution engine. Each CUDA thread is a fiber (Boost.Context's fcontext
// switch: a few registers, no system call); a scheduler resumes them one at a
// time and decides, at every point the kernel header makes visible (barrier,
// shuffle, atomic, fence, .cg load/store), who runs next:
//
//   in-order    blocks in index order, one at a time; the lowest-numbered
//               runnable thread first (so warp 0 runs ahead of the others);
//   reverse     blocks and threads from the highest index down;
//   random:S    a seeded interleaving: up to 8 blocks resident at once, the
//               one of highest priority running a random runnable thread at
//               every visible point; blocks stall (demoted) at atomics and
//               fences, a few per launch until every other block has finished;
//   threads:N   blocks on N OS threads at once, for real cross-block races.
//
// It checks what a GPU would fault on or what CUDA leaves undefined: a barrier
// reached after part of the block exited, threads of a block waiting at
// different barriers, a deadlock, lanes that disagree at a shuffle or read a
// lane outside the mask, a misaligned atomic or vector access. Any of these,
// and a memory fault, stop the process with the kernel, block and thread.
#include "runtime.hpp"

#include <boost/context/detail/fcontext.hpp>
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cerrno>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#if defined(TRAM_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#endif
#include <sanitizer/common_interface_defs.h>

namespace bc = boost::context::detail;

extern "C" {
__attribute__((visibility("default"))) int tram_emu_watch_hinted = 0;
}

namespace emu {

// ---------------------------------------------------------------------------
// Settings

static uint64_t parse_u64(const char* name, const char* s) {
    char* end = nullptr;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) die("%s=%s: not a number", name, s);
    return v;
}

static Settings read_settings() {
    Settings s;
    if (const char* v = getenv("TRAM_EMU_SCHEDULE"); v && *v) {
        std::string x = v;
        if (x == "in-order") {
            s.order = Order::InOrder;
        } else if (x == "reverse") {
            s.order = Order::Reverse;
        } else if (x.rfind("random:", 0) == 0) {
            s.order = Order::Random;
            s.seed = parse_u64("TRAM_EMU_SCHEDULE", x.c_str() + 7);
        } else if (x.rfind("threads:", 0) == 0) {
            s.order = Order::Threads;
            s.os_threads = (unsigned)parse_u64("TRAM_EMU_SCHEDULE", x.c_str() + 8);
            if (s.os_threads < 1 || s.os_threads > 256) die("TRAM_EMU_SCHEDULE=%s: 1 to 256 threads", v);
        } else {
            die("TRAM_EMU_SCHEDULE=%s: expected in-order, reverse, random:SEED or threads:N", v);
        }
    }
    if (const char* v = getenv("TRAM_EMU_DEFERRED"); v && *v) s.deferred = strcmp(v, "0") != 0;
    if (const char* v = getenv("TRAM_EMU_MEMORY_MIB"); v && *v)
        s.memory_bytes = parse_u64("TRAM_EMU_MEMORY_MIB", v) << 20;
    if (const char* v = getenv("TRAM_EMU_LOG"); v && *v) s.log = strcmp(v, "0") != 0;
    if (const char* v = getenv("TRAM_EMU_STACK_KIB"); v && *v)
        s.stack_bytes = (size_t)parse_u64("TRAM_EMU_STACK_KIB", v) << 10;
#if defined(TRAM_EMU_ASAN)
    // Instrumented frames are several times larger.
    if (!getenv("TRAM_EMU_STACK_KIB")) s.stack_bytes = 1 << 20;
#endif
    return s;
}

std::string Settings::describe() const {
    char buf[160];
    const char* o = order == Order::InOrder ? "in-order" : order == Order::Reverse ? "reverse"
                  : order == Order::Random ? "random" : "threads";
    if (order == Order::Random)
        snprintf(buf, sizeof buf, "schedule random:%" PRIu64, seed);
    else if (order == Order::Threads)
        snprintf(buf, sizeof buf, "schedule threads:%u", os_threads);
    else
        snprintf(buf, sizeof buf, "schedule %s", o);
    std::string r = buf;
    if (deferred) r += ", deferred streams";
    return r;
}

const Settings& settings() {
    static const Settings s = [] {
        Settings r = read_settings();
        tram_emu_watch_hinted = r.order == Order::Random;
        return r;
    }();
    return s;
}

static void vnote(const char* fmt, va_list ap) {
    fputs("tram-emu: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    fflush(stderr);
}

void note(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vnote(fmt, ap);
    va_end(ap);
}

void die(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vnote(fmt, ap);
    va_end(ap);
    abort();
}

// ---------------------------------------------------------------------------
// Kernel libraries: each one's thread-local block is its kernels' shared memory.

struct Library {
    const tram_emu_library* info;
    std::string path;
};
static std::mutex g_lib_mutex;
static std::vector<Library> g_libs;

unsigned register_library(const tram_emu_library* lib, const void* any_symbol) {
    Dl_info di{};
    if (!dladdr(any_symbol, &di) || !di.dli_fname) die("cannot locate a kernel library");
    std::lock_guard<std::mutex> g(g_lib_mutex);
    g_libs.push_back(Library{lib, di.dli_fname});
    return (unsigned)g_libs.size() - 1;
}

struct Region {
    unsigned char* base = nullptr;
    size_t size = 0;
};

// The calling thread's copy of a library's thread-local block.
static Region shared_region(unsigned lib) {
    thread_local std::vector<Region> cache;
    if (lib < cache.size() && cache[lib].base) return cache[lib];
    Library L;
    {
        std::lock_guard<std::mutex> g(g_lib_mutex);
        L = g_libs.at(lib);
    }
    L.info->touch_shared();  // the block exists on this thread from now on
    struct Find {
        const char* path;
        Region r;
        bool found;
    } f{L.path.c_str(), {}, false};
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* data) -> int {
            Find* f = static_cast<Find*>(data);
            if (!info->dlpi_name || strcmp(info->dlpi_name, f->path) != 0) return 0;
            for (int i = 0; i < info->dlpi_phnum; i++) {
                if (info->dlpi_phdr[i].p_type == PT_TLS) {
                    f->r.base = static_cast<unsigned char*>(info->dlpi_tls_data);
                    f->r.size = info->dlpi_phdr[i].p_memsz;
                }
            }
            f->found = true;
            return 1;
        },
        &f);
    if (!f.found) die("kernel library %s is not loaded", L.path.c_str());
    if (f.r.size && !f.r.base) die("kernel library %s: no thread-local block on this thread", L.path.c_str());
    if (cache.size() <= lib) cache.resize(lib + 1);
    cache[lib] = f.r;
    return f.r;
}

// ---------------------------------------------------------------------------
// Fiber stacks: mmap'd with a guard page below, reused from block to block.

class StackPool {
public:
    explicit StackPool(size_t bytes) : size_(bytes) {}
    ~StackPool() {
        for (void* p : free_) {
            clean(p);
            munmap(p, size_ + guard());
        }
    }
    void* get() {
        if (!free_.empty()) {
            void* p = free_.back();
            free_.pop_back();
            return p;
        }
        void* p = mmap(nullptr, size_ + guard(), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) die("cannot map a %zu-byte fiber stack", size_);
        mprotect(p, guard(), PROT_NONE);  // overflow faults instead of corrupting
        return p;
    }
    void put(void* p) { free_.push_back(p); }
    // A finished fiber leaves AddressSanitizer's redzones of its last frames
    // behind (the next fiber's instrumented frames rewrite their own): clear
    // them before the addresses are unmapped and perhaps mapped again.
    void clean(void* p) {
#if defined(TRAM_EMU_ASAN)
        __asan_unpoison_memory_region(bottom(p), size_);
#else
        (void)p;
#endif
    }
    size_t size() const { return size_; }
    static size_t guard() { return 4096; }
    // Lowest usable address and the top (stacks grow down).
    unsigned char* bottom(void* p) const { return static_cast<unsigned char*>(p) + guard(); }
    unsigned char* top(void* p) const { return bottom(p) + size_; }

private:
    size_t size_;
    std::vector<void*> free_;
};

// ---------------------------------------------------------------------------
// Blocks, warps, threads.

struct Block;

enum class State : uint8_t { Ready, Barrier, Shuffle, Done };

struct Thread {
    tram_emu_ids ids;  // first: tram_emu_self() returns its address
    Block* block = nullptr;
    unsigned linear = 0, warp = 0, lane = 0;
    State state = State::Ready;
    bool started = false;
    const char* site = nullptr;  // where it waits
    uint64_t wait_gen = 0;       // the barrier generation it waits for
    uint64_t shfl_round = 0;     // shuffles done by this lane
    void* stack = nullptr;
    bc::fcontext_t ctx = nullptr;    // where this thread is suspended
    bc::fcontext_t sched = nullptr;  // the scheduler, while this thread runs
    void* fake_stack = nullptr;      // ASan's bookkeeping across switches
};

struct ShuffleRound {
    unsigned arrived = 0;
    unsigned mask = 0, size = 0;
    int kind = 0, width = 0;
    uint64_t round = 0;
    const char* site = nullptr;
    uint64_t value[32];
};

struct Warp {
    ShuffleRound rounds[2];  // round r uses rounds[r & 1]
};

struct Block {
    const Launch* launch = nullptr;
    tram_emu_dim idx{};
    uint64_t linear = 0;
    unsigned n = 0;  // threads
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    std::vector<uint64_t> ready;  // bit per thread
    unsigned n_ready = 0;
    unsigned live = 0, exited = 0;
    uint64_t bar_gen = 0;
    unsigned bar_arrived = 0, bar_count = 0;
    unsigned bar_result[2] = {0, 0};
    const char* bar_site = nullptr;
    uint64_t priority = 0;              // random schedule: highest runs
    bool parked = false;                // random schedule: set aside to the end
    std::vector<unsigned char> shared;  // saved shared memory while not loaded

    void set_ready(Thread& t) {
        if (t.state != State::Ready) {
            t.state = State::Ready;
        }
        uint64_t& w = ready[t.linear >> 6];
        const uint64_t bit = 1ull << (t.linear & 63);
        if (!(w & bit)) {
            w |= bit;
            n_ready++;
        }
    }
    void clear_ready(Thread& t) {
        uint64_t& w = ready[t.linear >> 6];
        const uint64_t bit = 1ull << (t.linear & 63);
        if (w & bit) {
            w &= ~bit;
            n_ready--;
        }
    }
};

// ---------------------------------------------------------------------------
// The running thread, and diagnostics that name it.

static thread_local Thread* tl_current = nullptr;

static void describe_current(FILE* f) {
    Thread* t = tl_current;
    if (!t) return;
    const Block* b = t->block;
    const Launch& L = *b->launch;
    fprintf(f,
            "tram-emu:   in kernel %s (kernels/%s.cu), block (%u,%u,%u) of (%u,%u,%u), "
            "thread (%u,%u,%u) of (%u,%u,%u); %s\n",
            L.kernel->host->name, L.kernel->module.c_str(), b->idx.x, b->idx.y, b->idx.z, L.grid.x,
            L.grid.y, L.grid.z, t->ids.thread_idx.x, t->ids.thread_idx.y, t->ids.thread_idx.z,
            L.block.x, L.block.y, L.block.z, settings().describe().c_str());
}

[[noreturn]] static void fail_here(const char* site, const char* fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void fail_here(const char* site, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("tram-emu: error in a kernel: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (site) fprintf(stderr, " (at %s)", site);
    fputc('\n', stderr);
    describe_current(stderr);
    fflush(stderr);
    abort();
}

// A sanitizer stopping the process (UBSan's alignment check, ASan) says where
// in the grid it happened too.
static void death_callback() {
    if (tl_current) {
        fputs("tram-emu: the sanitizer report above comes from a kernel:\n", stderr);
        describe_current(stderr);
        fflush(stderr);
    }
}

#if !defined(TRAM_EMU_ASAN)
// A memory fault inside a kernel is a GPU's "illegal address": name the thread,
// then let the default action end the process. Faults elsewhere go to whoever
// handled them before (Rust's stack-overflow handler, for one).
static struct sigaction g_old_segv, g_old_bus;

static void on_fault(int sig, siginfo_t* info, void* uc) {
    if (tl_current) {
        char buf[160];
        int n = snprintf(buf, sizeof buf,
                         "tram-emu: error in a kernel: memory fault (%s) at address %p\n",
                         sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", info->si_addr);
        if (write(2, buf, (size_t)n) < 0) {
        }
        describe_current(stderr);
        fflush(stderr);
        signal(SIGABRT, SIG_DFL);
        abort();
    }
    struct sigaction* old = sig == SIGSEGV ? &g_old_segv : &g_old_bus;
    if (old->sa_flags & SA_SIGINFO) {
        old->sa_sigaction(sig, info, uc);
    } else if (old->sa_handler == SIG_DFL || old->sa_handler == SIG_IGN) {
        signal(sig, SIG_DFL);
        raise(sig);
    } else {
        old->sa_handler(sig);
    }
}

// Every OS thread that runs fibers gets an alternate signal stack, so a fiber
// that overflows its stack still gets its diagnostic.
static void ensure_altstack() {
    thread_local bool done = false;
    if (done) return;
    done = true;
    stack_t cur{};
    if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE)) return;
    const size_t size = 64 << 10;
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;
    stack_t ss{};
    ss.ss_sp = p;
    ss.ss_size = size;
    sigaltstack(&ss, nullptr);
}
#endif

// Every sanitizer runtime in the process gets the callback: with ASan and
// UBSan both linked there are two (libasan, libubsan), each with its own.
static void set_death_callbacks() {
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void*) -> int {
            const char* name = info->dlpi_name;
            if (!name || !strstr(name, "san.so")) return 0;
            void* h = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
            if (!h) return 0;
            using Set = void (*)(void (*)(void));
            if (auto set = reinterpret_cast<Set>(dlsym(h, "__sanitizer_set_death_callback")))
                set(death_callback);
            dlclose(h);
            return 0;
        },
        nullptr);
}

static void install_handlers() {
    static std::once_flag once;
    std::call_once(once, [] {
        __sanitizer_set_death_callback(death_callback);
        set_death_callbacks();
#if !defined(TRAM_EMU_ASAN)
        struct sigaction sa{};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
        sigaction(SIGBUS, &sa, &g_old_bus);
#endif
    });
}

// ---------------------------------------------------------------------------
// Randomness for the adversarial schedule (splitmix64: seeded, reproducible).

struct Rng {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    uint64_t below(uint64_t n) { return n ? next() % n : 0; }
    bool chance(unsigned one_in) { return below(one_in) == 0; }
};

// ---------------------------------------------------------------------------
// One OS thread's scheduler.

class Runner {
public:
    Runner(const Launch& L, Order order, uint64_t seed)
        : L_(L), order_(order), rng_{seed}, pool_(thread_pool()) {
        region_ = shared_region(L.kernel->library);
#if !defined(TRAM_EMU_ASAN)
        ensure_altstack();
#endif
    }

    // Runs the blocks `next` hands out until it has none left.
    template <typename Next>
    void run(Next next) {
        const unsigned max_resident = order_ == Order::Random ? 8 : 1;
        if (order_ == Order::Random)
            park_one_in_ = std::max<uint64_t>(4, L_.grid.count() / kMaxParked);
        for (;;) {
            while (resident_.size() < max_resident) {
                uint64_t b;
                if (!next(&b)) break;
                resident_.push_back(make_block(b));
            }
            if (resident_.empty()) {
                if (parked_.empty()) return;
                // Every other block has finished: the parked ones resume, in a
                // random order of their own.
                for (auto& p : parked_) {
                    p->priority = rng_.next();
                    resident_.push_back(std::move(p));
                }
                parked_.clear();
            }
            Block* B = pick_block();
            Thread* t = pick_thread(*B);
            load_shared(*B);
            resume(*t);
            if (B->live == 0) {
                retire(B);
            } else if (B->parked) {
                park(B);
            }
        }
    }

    void yield_current() {
        Thread* t = tl_current;
#if defined(TRAM_EMU_ASAN)
        __sanitizer_start_switch_fiber(&t->fake_stack, sched_bottom_, sched_size_);
#endif
        bc::transfer_t r = bc::jump_fcontext(t->sched, nullptr);
#if defined(TRAM_EMU_ASAN)
        __sanitizer_finish_switch_fiber(t->fake_stack, nullptr, nullptr);
#endif
        t->sched = r.fctx;
        tl_current = t;
    }

    bool adversarial() const { return order_ == Order::Random; }
    Rng& rng() { return rng_; }

    // Called at a visible point of the running thread. Just after an atomic
    // (a ticket or flag taken, the work it orders not yet done) its block may
    // be parked: set aside until every other block of the launch has
    // finished, as a GPU may leave a resident block unscheduled that long (a
    // few times a launch). At that and at other atomics and fences it may
    // instead drop below every other resident block for a while. The thread
    // then yields, so the block stalls right there.
    bool maybe_demote(int kind) {
        Block* B = tl_current->block;
        if (kind == TRAM_EMU_ATOMIC_DONE && !B->parked && parked_.size() < kMaxParked &&
            rng_.below(park_one_in_) == 0) {
            B->parked = true;
            B->priority = --low_water_;
            return true;
        }
        if (kind == TRAM_EMU_LOAD_CG || kind == TRAM_EMU_STORE_CG || !rng_.chance(4)) return false;
        B->priority = --low_water_;
        return true;
    }

private:
    std::unique_ptr<Block> make_block(uint64_t linear) {
        auto B = std::make_unique<Block>();
        B->launch = &L_;
        B->linear = linear;
        B->idx.x = (unsigned)(linear % L_.grid.x);
        B->idx.y = (unsigned)((linear / L_.grid.x) % L_.grid.y);
        B->idx.z = (unsigned)(linear / ((uint64_t)L_.grid.x * L_.grid.y));
        B->n = (unsigned)L_.block.count();
        B->priority = (1ull << 62) + rng_.below(1ull << 62);
        B->threads.resize(B->n);
        B->warps.resize((B->n + 31) / 32);
        B->ready.assign((B->n + 63) / 64, 0);
        B->live = B->n;
        for (unsigned i = 0; i < B->n; i++) {
            Thread& t = B->threads[i];
            t.block = B.get();
            t.linear = i;
            t.warp = i / 32;
            t.lane = i % 32;
            t.ids.thread_idx = {i % L_.block.x, (i / L_.block.x) % L_.block.y,
                                i / (L_.block.x * L_.block.y)};
            t.ids.block_idx = B->idx;
            t.ids.block_dim = {L_.block.x, L_.block.y, L_.block.z};
            t.ids.grid_dim = {L_.grid.x, L_.grid.y, L_.grid.z};
            B->set_ready(t);
        }
        // Shared memory starts as garbage, as on a GPU.
        B->shared.assign(region_.size, kPoison);
        return B;
    }

    // The random schedule runs the resident block of highest priority (a
    // random one when it arrives) and demotes the running block below every
    // other at some atomics and fences: a block can then stall anywhere such a
    // point can be, for as long as the others take, as a GPU may stall it.
    Block* pick_block() {
        if (resident_.size() == 1 || order_ != Order::Random) {
            Block* B = resident_.front().get();
            if (B->n_ready == 0) deadlock(*B);
            return B;
        }
        Block* best = nullptr;
        for (auto& b : resident_)
            if (b->n_ready && (!best || b->priority > best->priority)) best = b.get();
        if (!best) deadlock(*resident_.front());
        return best;
    }

    Thread* pick_thread(Block& B) {
        const size_t words = B.ready.size();
        if (order_ == Order::Reverse) {
            for (size_t w = words; w-- > 0;)
                if (B.ready[w]) return &B.threads[w * 64 + 63 - __builtin_clzll(B.ready[w])];
        } else if (order_ == Order::Random) {
            uint64_t k = rng_.below(B.n_ready);
            for (size_t w = 0; w < words; w++) {
                uint64_t bits = B.ready[w];
                unsigned c = (unsigned)__builtin_popcountll(bits);
                if (k >= c) {
                    k -= c;
                    continue;
                }
                while (k--) bits &= bits - 1;
                return &B.threads[w * 64 + __builtin_ctzll(bits)];
            }
        } else {
            for (size_t w = 0; w < words; w++)
                if (B.ready[w]) return &B.threads[w * 64 + __builtin_ctzll(B.ready[w])];
        }
        deadlock(B);
    }

    void load_shared(Block& B) {
        if (loaded_ == &B) return;
        if (region_.size) {
            if (loaded_) memcpy(loaded_->shared.data(), region_.base, region_.size);
            memcpy(region_.base, B.shared.data(), region_.size);
        }
        loaded_ = &B;
    }

    static void thread_main(bc::transfer_t from) {
        Thread* t = static_cast<Thread*>(from.data);
        t->sched = from.fctx;
        Runner* R = tl_runner;
#if defined(TRAM_EMU_ASAN)
        const void* bottom = nullptr;
        size_t size = 0;
        __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
        R->sched_bottom_ = bottom;
        R->sched_size_ = size;
#endif
        tl_current = t;
        const Launch& L = R->L_;
        void* params[64];
        for (size_t i = 0; i < L.offsets.size(); i++)
            params[i] = const_cast<unsigned char*>(L.blob.data()) + L.offsets[i];
        L.kernel->host->entry(params);
        R->exit_thread(*t);
#if defined(TRAM_EMU_ASAN)
        __sanitizer_start_switch_fiber(nullptr, R->sched_bottom_, R->sched_size_);
#endif
        bc::jump_fcontext(t->sched, nullptr);
        __builtin_unreachable();
    }

    void resume(Thread& t) {
        if (!t.started) {
            t.started = true;
            t.stack = pool_.get();
            t.ctx = bc::make_fcontext(pool_.top(t.stack), pool_.size(), thread_main);
        }
        tl_current = &t;
        current_ = t.block;
#if defined(TRAM_EMU_ASAN)
        void* fake = nullptr;
        __sanitizer_start_switch_fiber(&fake, pool_.bottom(t.stack), pool_.size());
#endif
        bc::transfer_t r = bc::jump_fcontext(t.ctx, &t);
#if defined(TRAM_EMU_ASAN)
        __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
        tl_current = nullptr;
        t.ctx = r.fctx;
        if (t.state == State::Done && t.stack) {
            pool_.put(t.stack);
            t.stack = nullptr;
        }
    }

    void exit_thread(Thread& t) {
        Block& B = *t.block;
        if (B.bar_arrived)
            fail_here(B.bar_site,
                      "thread %u exits while %u threads of its block wait at __syncthreads() "
                      "(a barrier the whole block does not reach: undefined in CUDA)",
                      t.linear, B.bar_arrived);
        const ShuffleRound& pending = B.warps[t.warp].rounds[t.shfl_round & 1];
        if (pending.arrived && pending.round == t.shfl_round && (pending.mask >> t.lane & 1))
            fail_here(pending.site,
                      "lane %u exits while %u lanes of its warp wait for it at a shuffle", t.lane,
                      pending.arrived);
        B.clear_ready(t);
        t.state = State::Done;
        B.exited++;
        B.live--;
    }

    void park(Block* B) {
        if (current_ == B) current_ = nullptr;
        for (size_t i = 0; i < resident_.size(); i++) {
            if (resident_[i].get() == B) {
                parked_.push_back(std::move(resident_[i]));
                resident_.erase(resident_.begin() + (ptrdiff_t)i);
                return;
            }
        }
    }

    void retire(Block* B) {
        if (loaded_ == B) loaded_ = nullptr;
        if (current_ == B) current_ = nullptr;
        for (size_t i = 0; i < resident_.size(); i++) {
            if (resident_[i].get() == B) {
                resident_.erase(resident_.begin() + (ptrdiff_t)i);
                return;
            }
        }
    }

    [[noreturn]] void deadlock(Block& B) {
        const Launch& L = L_;
        fprintf(stderr,
                "tram-emu: error in a kernel: deadlock in kernel %s (kernels/%s.cu), block "
                "(%u,%u,%u): no thread of the block can proceed; %s\n",
                L.kernel->host->name, L.kernel->module.c_str(), B.idx.x, B.idx.y, B.idx.z,
                settings().describe().c_str());
        // Runs of consecutive threads in the same state at the same place.
        unsigned i = 0;
        while (i < B.n) {
            const Thread& a = B.threads[i];
            unsigned j = i + 1;
            while (j < B.n && B.threads[j].state == a.state && B.threads[j].site == a.site) j++;
            const char* what = a.state == State::Barrier ? "wait at __syncthreads()"
                             : a.state == State::Shuffle ? "wait at a shuffle"
                             : a.state == State::Done    ? "have exited"
                                                         : "are runnable";
            fprintf(stderr, "tram-emu:   threads %u-%u %s%s%s\n", i, j - 1, what,
                    a.site ? " at " : "", a.site ? a.site : "");
            i = j;
        }
        fflush(stderr);
        abort();
    }

    // Stacks outlive launches: one pool per OS thread.
    static StackPool& thread_pool() {
        thread_local StackPool pool(settings().stack_bytes);
        return pool;
    }

    const Launch& L_;
    Order order_;
    Rng rng_;
    StackPool& pool_;
    Region region_;
    std::vector<std::unique_ptr<Block>> resident_;
    std::vector<std::unique_ptr<Block>> parked_;  // random schedule: run last
    static constexpr size_t kMaxParked = 16;
    uint64_t park_one_in_ = 0;
    Block* loaded_ = nullptr;
    Block* current_ = nullptr;
    uint64_t low_water_ = 1ull << 62;  // demoted blocks sit below every new one
    const void* sched_bottom_ = nullptr;
    size_t sched_size_ = 0;

public:
    static thread_local Runner* tl_runner;
};

thread_local Runner* Runner::tl_runner = nullptr;

// ---------------------------------------------------------------------------
// Launch execution.

static void run_on_this_thread(const Launch& L, Order order, uint64_t seed,
                               const std::function<bool(uint64_t*)>& next) {
    Runner R(L, order, seed);
    Runner* saved = Runner::tl_runner;
    Runner::tl_runner = &R;
    R.run(next);
    Runner::tl_runner = saved;
}

// A random permutation of [0, n) without storing it for huge grids: an affine
// map with a multiplier coprime to n.
struct Permutation {
    uint64_t n, a, b;
    std::vector<uint64_t> table;
    Permutation(uint64_t n_, Rng& rng) : n(n_), a(1), b(0) {
        if (n <= (1u << 22)) {
            table.resize(n);
            for (uint64_t i = 0; i < n; i++) table[i] = i;
            for (uint64_t i = n; i > 1; i--) std::swap(table[i - 1], table[rng.below(i)]);
        } else {
            b = rng.below(n);
            do a = rng.below(n - 1) + 1;
            while (std::__gcd(a, n) != 1);
        }
    }
    uint64_t operator[](uint64_t i) const {
        return table.empty() ? (uint64_t)(((unsigned __int128)a * i + b) % n) : table[i];
    }
};

void execute(const Launch& L) {
    install_handlers();
    const Settings& s = settings();
    const uint64_t n = L.grid.count();
    if (s.log)
        fprintf(stderr, "tram-emu: launch %s grid (%u,%u,%u) block (%u,%u,%u)\n",
                L.kernel->host->name, L.grid.x, L.grid.y, L.grid.z, L.block.x, L.block.y,
                L.block.z);
    if (s.order == Order::Threads && s.os_threads > 1 && n > 1) {
        std::atomic<uint64_t> counter{0};
        auto next = [&](uint64_t* b) {
            uint64_t i = counter.fetch_add(1);
            if (i >= n) return false;
            *b = i;
            return true;
        };
        std::vector<std::thread> workers;
        unsigned extra = (unsigned)std::min<uint64_t>(s.os_threads - 1, n - 1);
        for (unsigned k = 0; k < extra; k++)
            workers.emplace_back([&] { run_on_this_thread(L, Order::InOrder, 0, next); });
        run_on_this_thread(L, Order::InOrder, 0, next);
        for (auto& w : workers) w.join();
        return;
    }
    if (s.order == Order::Random) {
        // Each launch gets its own stream of choices, derived from the seed and
        // a launch counter, so one launch's choices do not shift another's.
        static std::atomic<uint64_t> launches{0};
        Rng rng{s.seed ^ (0x5851F42D4C957F2Dull * (launches.fetch_add(1) + 1))};
        Permutation perm(n, rng);
        uint64_t i = 0;
        run_on_this_thread(L, Order::Random, rng.next(), [&](uint64_t* b) {
            if (i >= n) return false;
            *b = perm[i++];
            return true;
        });
        return;
    }
    uint64_t i = 0;
    const bool rev = s.order == Order::Reverse;
    run_on_this_thread(L, s.order == Order::Reverse ? Order::Reverse : Order::InOrder, 0,
                       [&](uint64_t* b) {
                           if (i >= n) return false;
                           *b = rev ? n - 1 - i : i;
                           i++;
                           return true;
                       });
}

}  // namespace emu

// ---------------------------------------------------------------------------
// What the kernels call (abi.h).

using emu::Block;
using emu::Runner;
using emu::ShuffleRound;
using emu::State;
using emu::Thread;

// Sites are string literals: one address per place in one kernel's code.
static inline bool same_site(const char* a, const char* b) { return a == b || strcmp(a, b) == 0; }

static Thread& self_or_die(const char* what) {
    Thread* t = emu::tl_current;
    if (!t) emu::die("%s called outside a kernel", what);
    return *t;
}

extern "C" __attribute__((visibility("default"))) const tram_emu_ids* tram_emu_self(void) {
    return &self_or_die("threadIdx/blockIdx").ids;
}

extern "C" __attribute__((visibility("default"))) unsigned tram_emu_barrier(int predicate, const char* site) {
    Thread& t = self_or_die("__syncthreads");
    Block& B = *t.block;
    if (B.exited)
        emu::fail_here(site,
                       "__syncthreads() reached after %u threads of the block exited "
                       "(a barrier the whole block does not reach: undefined in CUDA)",
                       B.exited);
    if (B.bar_arrived == 0) {
        B.bar_site = site;
        B.bar_count = 0;
    } else if (!same_site(B.bar_site, site)) {
        emu::fail_here(site,
                       "threads of one block wait at different __syncthreads(): this one here, "
                       "%u others at %s",
                       B.bar_arrived, B.bar_site);
    }
    const uint64_t gen = B.bar_gen;
    B.bar_arrived++;
    B.bar_count += predicate ? 1 : 0;
    t.state = State::Barrier;
    t.site = site;
    t.wait_gen = gen;
    B.clear_ready(t);
    if (B.bar_arrived == B.live) {
        B.bar_result[gen & 1] = B.bar_count;
        B.bar_gen++;
        B.bar_arrived = 0;
        for (Thread& o : B.threads)
            if (o.state == State::Barrier && o.wait_gen == gen) B.set_ready(o);
    }
    Runner::tl_runner->yield_current();
    t.site = nullptr;
    return B.bar_result[gen & 1];
}

extern "C" __attribute__((visibility("default"))) void tram_emu_shuffle(unsigned mask, void* value, unsigned size, int kind,
                                 int lane_arg, int width, const char* site) {
    Thread& t = self_or_die("__shfl_*_sync");
    Block& B = *t.block;
    if (!(mask >> t.lane & 1))
        emu::fail_here(site, "lane %u calls a shuffle whose mask %#010x excludes it", t.lane, mask);
    if (width < 1 || width > 32 || (width & (width - 1)))
        emu::fail_here(site, "shuffle width %d is not a power of two in [1, 32]", width);
    const unsigned first = t.warp * 32;
    const uint64_t r = t.shfl_round;
    ShuffleRound& R = B.warps[t.warp].rounds[r & 1];
    if (R.arrived == 0) {
        // Every lane the mask names must exist and still run (a lane that
        // exits later, while this round waits for it, is caught at its exit).
        for (unsigned l = 0; l < 32; l++) {
            if (!(mask >> l & 1)) continue;
            if (first + l >= B.n)
                emu::fail_here(site,
                               "shuffle mask %#010x names lane %u, which does not exist (block of "
                               "%u threads)",
                               mask, l, B.n);
            if (B.threads[first + l].state == State::Done)
                emu::fail_here(site, "shuffle mask %#010x names lane %u, which has exited", mask, l);
        }
        R.mask = mask;
        R.size = size;
        R.kind = kind;
        R.width = width;
        R.round = r;
        R.site = site;
    } else if (R.round != r || R.mask != mask || R.size != size || R.kind != kind ||
               R.width != width || !same_site(R.site, site)) {
        emu::fail_here(site,
                       "lanes of warp %u disagree at a shuffle: lane %u (mask %#010x, %u bytes) "
                       "meets %u lanes at %s (mask %#010x, %u bytes)",
                       t.warp, t.lane, mask, size, R.arrived, R.site, R.mask, R.size);
    }
    memcpy(&R.value[t.lane], value, size);
    R.arrived++;
    t.state = State::Shuffle;
    t.site = site;
    B.clear_ready(t);
    if (R.arrived == (unsigned)__builtin_popcount(mask)) {
        R.arrived = 0;  // the slot is next used by round r + 2
        for (unsigned l = 0; l < 32; l++)
            if (mask >> l & 1) B.set_ready(B.threads[first + l]);
    }
    Runner::tl_runner->yield_current();
    t.site = nullptr;
    const unsigned base = t.lane & ~(unsigned)(width - 1);
    int src;
    switch (kind) {
        case TRAM_EMU_SHFL_UP:
            src = (int)t.lane - lane_arg;
            if (src < (int)base) src = (int)t.lane;
            break;
        case TRAM_EMU_SHFL_DOWN:
            src = (int)t.lane + lane_arg;
            if (src >= (int)(base + (unsigned)width)) src = (int)t.lane;
            break;
        case TRAM_EMU_SHFL_XOR:
            src = (int)(t.lane ^ (unsigned)lane_arg);
            if (src < (int)base || src >= (int)(base + (unsigned)width)) src = (int)t.lane;
            break;
        default:
            src = (int)(base + ((unsigned)lane_arg & (unsigned)(width - 1)));
            break;
    }
    if (!(mask >> src & 1))
        emu::fail_here(site, "lane %u reads lane %d, which is not in the shuffle mask %#010x",
                       t.lane, src, mask);
    memcpy(value, &R.value[src], size);
    t.shfl_round++;
}

extern "C" __attribute__((visibility("default"))) void tram_emu_point(int kind, const volatile void* addr, unsigned size,
                               const char* site) {
    Thread& t = self_or_die("an atomic, fence or cache-hinted access");
    (void)t;
    if (kind != TRAM_EMU_FENCE) {
        if (!addr) emu::fail_here(site, "%u-byte access through a null pointer", size);
        if ((uintptr_t)addr % size)
            emu::fail_here(site, "misaligned %u-byte %s at %p", size,
                           kind == TRAM_EMU_LOAD_CG || kind == TRAM_EMU_STORE_CG ? "access" : "atomic",
                           (const void*)addr);
    } else {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    Runner* R = Runner::tl_runner;
    // Under the adversarial schedule, let someone else run here: at half the
    // atomics and fences (where cross-thread orders are decided), at one in
    // 32 of the far more numerous cache-hinted loads and stores.
    if (R->adversarial()) {
        const bool stall = R->maybe_demote(kind);
        if (stall || R->rng().chance(kind == TRAM_EMU_LOAD_CG || kind == TRAM_EMU_STORE_CG ? 32 : 2))
            R->yield_current();
    }
}

extern "C" __attribute__((visibility("default"))) void tram_emu_fail(const char* what, const char* site) {
    emu::fail_here(site, "%s", what);
}
