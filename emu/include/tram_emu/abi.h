// The C interface between kernels compiled for the host (cuda_emu.h, register.h)
// and the emulated device's runtime inside libcuda.so.1 (src/runtime.cpp).
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Bumped whenever anything below changes; a kernel library built against another
// version is refused at load.
#define TRAM_EMU_ABI_VERSION 1

typedef struct {
    unsigned x, y, z;
} tram_emu_dim;

// The running CUDA thread's built-in variables.
typedef struct {
    tram_emu_dim thread_idx, block_idx, block_dim, grid_dim;
} tram_emu_ids;

// Kinds of the memory operations a kernel makes visible to the runtime.
enum tram_emu_point_kind {
    TRAM_EMU_ATOMIC = 1,
    TRAM_EMU_FENCE = 2,
    TRAM_EMU_LOAD_CG = 3,
    TRAM_EMU_STORE_CG = 4,
    TRAM_EMU_ATOMIC_DONE = 5,  // just after an atomic took effect
};

// Kinds of warp shuffle.
enum tram_emu_shfl_kind {
    TRAM_EMU_SHFL_IDX = 0,
    TRAM_EMU_SHFL_UP = 1,
    TRAM_EMU_SHFL_DOWN = 2,
    TRAM_EMU_SHFL_XOR = 3,
};

const tram_emu_ids* tram_emu_self(void);
// __syncthreads() and its predicate forms: returns how many threads passed a
// non-zero predicate.
unsigned tram_emu_barrier(int predicate, const char* site);
// One shuffle: *value (size bytes, at most 8) is replaced by the source lane's.
void tram_emu_shuffle(unsigned mask, void* value, unsigned size, int kind, int lane_arg,
                      int width, const char* site);
// A memory operation other threads may observe (atomic, fence, .cg load/store):
// checked for alignment, and a point where an adversarial schedule may switch.
void tram_emu_point(int kind, const volatile void* addr, unsigned size, const char* site);
// Nonzero when the schedule wants to see the cache-hinted loads and stores
// (there are many: otherwise the header only checks their alignment).
extern int tram_emu_watch_hinted;
// Stops the process with a diagnostic naming the kernel, block and thread.
void tram_emu_fail(const char* what, const char* site) __attribute__((noreturn));

// What a kernel library exports: every kernel, by its extern "C" name, with an
// entry that unpacks cuLaunchKernel's parameter array by the kernel's own C++
// parameter types.
typedef void (*tram_emu_entry)(void* const* params);
typedef struct {
    const char* module;  // kernels/<module>.cu
    const char* name;
    tram_emu_entry entry;
    unsigned n_params;
    const unsigned* param_sizes;
} tram_emu_kernel;

// What ptxas reported for the kernel on sm_90 (emu-build.sh generates this).
typedef struct {
    const char* name;
    int registers;
    int static_smem;
    int stack_frame;
} tram_emu_resources;

typedef struct {
    unsigned abi_version;
    const tram_emu_kernel* kernels;
    size_t n_kernels;
    const tram_emu_resources* resources;
    size_t n_resources;
    // The library's thread-local block holds nothing but the kernels'
    // __shared__ variables: touching it makes the block exist on this thread.
    void (*touch_shared)(void);
} tram_emu_library;

// Every kernel library defines this.
const tram_emu_library* tram_emu_library_info(void);

#ifdef __cplusplus
}
#endif
