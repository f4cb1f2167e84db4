// The emulated device's execution engine: runs one kernel launch, block by
// block, each CUDA thread a fiber, under the schedule chosen by the environment.
#pragma once

#include <tram_emu/abi.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace emu {

enum class Order { InOrder, Reverse, Random, Threads };

struct Settings {
    Order order = Order::InOrder;
    uint64_t seed = 0;        // random:SEED
    unsigned os_threads = 1;  // threads:N
    bool deferred = false;    // TRAM_EMU_DEFERRED=1
    uint64_t memory_bytes = 4096ull << 20;  // TRAM_EMU_MEMORY_MIB
    bool log = false;                       // TRAM_EMU_LOG=1
    size_t stack_bytes = 256 << 10;         // TRAM_EMU_STACK_KIB
    std::string describe() const;
};

// Read once, at cuInit; a malformed value stops the process with a message.
const Settings& settings();

// A kernel as the runtime knows it: the host entry and what the driver checked.
struct Kernel {
    const tram_emu_kernel* host = nullptr;
    unsigned library = 0;  // index of the kernel library it lives in
    std::string module;
    unsigned max_threads = 1024;  // .maxntid, or 1024
    int registers = -1;           // from ptxas for sm_90 (-1: unknown)
    int static_smem = 0;
    std::vector<unsigned> param_sizes;  // from the PTX
};

struct Dim {
    unsigned x = 1, y = 1, z = 1;
    uint64_t count() const { return (uint64_t)x * y * z; }
};

// One launch, its parameters already copied (at launch or capture time).
struct Launch {
    const Kernel* kernel = nullptr;
    Dim grid, block;
    unsigned dynamic_smem = 0;
    std::vector<unsigned char> blob;   // parameter values, each at its offset
    std::vector<size_t> offsets;
};

// Runs every block of the launch to completion on the calling thread (and, for
// threads:N, on N-1 more). An error inside a kernel stops the process with a
// diagnostic naming the kernel, block and thread; it does not return.
void execute(const Launch& launch);

// Registers a kernel library's thread-local (shared-memory) block, by the
// address of one of its functions; returns its index.
unsigned register_library(const tram_emu_library* lib, const void* any_symbol);

// A line on stderr, "tram-emu: " first.
void note(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// The same, then stops the process (no CUDA thread context).
[[noreturn]] void die(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// A byte pattern that reads as NaN in f16, bf16, f32 and f64, and as a huge
// count in any unsigned integer: what fresh and freed device memory holds.
constexpr unsigned char kPoison = 0xFF;

}  // namespace emu
