// Included first (g++ -include) when kernels/*.cu are compiled for the host,
// so that the crate's own kernels, unchanged, run on the emulated device.
//
// What it maps, and why each choice is the strict one:
// - qualifiers vanish; __shared__ becomes a function-local thread_local: the
//   runtime runs one block at a time per OS thread (and swaps the kernel
//   library's thread-local block when it interleaves blocks on one thread), so
//   that storage is the block's shared memory, poisoned before each block;
// - threadIdx & co. read the running CUDA thread's ids from the runtime;
// - __syncthreads*, __shfl_*_sync, atomics, fences and the .cg/.cs loads and
//   stores go through the runtime, which checks them (deadlock, a barrier after
//   part of the block exited, lanes that disagree at a shuffle, alignment) and
//   may switch threads there under an adversarial schedule;
// - the explicitly rounded intrinsics (__dadd_rn...) are single IEEE operations
//   behind an optimisation barrier, so no build (the fma variant included)
//   contracts them into a fused multiply-add, as nvcc never does.
// Plain loads and stores are ordinary host accesses: a misaligned vector access
// is caught by UBSan's alignment check, which every variant enables.
#pragma once

#include <tram_emu/abi.h>

#define __host__
#define __device__
#define __global__
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __noinline__ __attribute__((noinline))
// Not modelled: a kernel that uses them does not compile for the emulator.
#define __constant__ tram_emu_unsupported___constant__
#define __managed__ tram_emu_unsupported___managed__

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#define TRAM_EMU_STR2(x) #x
#define TRAM_EMU_STR(x) TRAM_EMU_STR2(x)
#define TRAM_EMU_SITE __FILE__ ":" TRAM_EMU_STR(__LINE__)

// Within one CUDA thread (one fiber) the ids never change, so the compiler may
// keep what it read.
extern "C" const tram_emu_ids* tram_emu_self(void) __attribute__((const));

#define threadIdx (reinterpret_cast<const uint3&>(tram_emu_self()->thread_idx))
#define blockIdx (reinterpret_cast<const uint3&>(tram_emu_self()->block_idx))
#define blockDim (reinterpret_cast<const uint3&>(tram_emu_self()->block_dim))
#define gridDim (reinterpret_cast<const uint3&>(tram_emu_self()->grid_dim))
#define warpSize 32

namespace tram_emu {

static_assert(sizeof(uint3) == sizeof(tram_emu_dim), "uint3 layout");

inline unsigned block_threads() {
    const tram_emu_ids* s = tram_emu_self();
    return s->block_dim.x * s->block_dim.y * s->block_dim.z;
}

template <typename T>
inline T shuffle(const char* site, unsigned mask, T v, int kind, int arg, int width) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "a shuffle moves at most 8 bytes of plain data");
    tram_emu_shuffle(mask, &v, sizeof(T), kind, arg, width, site);
    return v;
}
template <typename T>
inline T shfl_idx(const char* site, unsigned mask, T v, int lane, int width = 32) {
    return shuffle(site, mask, v, TRAM_EMU_SHFL_IDX, lane, width);
}
template <typename T>
inline T shfl_up(const char* site, unsigned mask, T v, unsigned delta, int width = 32) {
    return shuffle(site, mask, v, TRAM_EMU_SHFL_UP, (int)delta, width);
}
template <typename T>
inline T shfl_down(const char* site, unsigned mask, T v, unsigned delta, int width = 32) {
    return shuffle(site, mask, v, TRAM_EMU_SHFL_DOWN, (int)delta, width);
}
template <typename T>
inline T shfl_xor(const char* site, unsigned mask, T v, int lane_mask, int width = 32) {
    return shuffle(site, mask, v, TRAM_EMU_SHFL_XOR, lane_mask, width);
}

// Device atomics: device-scope, sequentially consistent on the host.
template <typename T, typename F>
inline T atomic_rmw(const char* site, T* p, F f) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4- or 8-byte words");
    tram_emu_point(TRAM_EMU_ATOMIC, p, sizeof(T), site);
    T old;
    __atomic_load(p, &old, __ATOMIC_SEQ_CST);
    T next = f(old);
    while (!__atomic_compare_exchange(p, &old, &next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        next = f(old);
    // The thread may stall right after its atomic too (a ticket taken, the
    // work it orders not yet done).
    tram_emu_point(TRAM_EMU_ATOMIC_DONE, p, sizeof(T), site);
    return old;
}
template <typename T, typename U>
inline T atomic_add(const char* site, T* p, U v) {
    return atomic_rmw(site, p, [v](T x) { return (T)(x + (T)v); });
}
template <typename T, typename U>
inline T atomic_sub(const char* site, T* p, U v) {
    return atomic_rmw(site, p, [v](T x) { return (T)(x - (T)v); });
}
template <typename T, typename U>
inline T atomic_or(const char* site, T* p, U v) {
    return atomic_rmw(site, p, [v](T x) { return (T)(x | (T)v); });
}
template <typename T, typename U>
inline T atomic_and(const char* site, T* p, U v) {
    return atomic_rmw(site, p, [v](T x) { return (T)(x & (T)v); });
}
template <typename T, typename U>
inline T atomic_max(const char* site, T* p, U v) {
    return atomic_rmw(site, p, [v](T x) { return x < (T)v ? (T)v : x; });
}
template <typename T, typename U>
inline T atomic_min(const char* site, T* p, U v) {
    return atomic_rmw(site, p, [v](T x) { return (T)v < x ? (T)v : x; });
}
template <typename T, typename U>
inline T atomic_exch(const char* site, T* p, U v) {
    return atomic_rmw(site, p, [v](T) { return (T)v; });
}
template <typename T, typename U, typename W>
inline T atomic_cas(const char* site, T* p, U compare, W v) {
    return atomic_rmw(site, p, [compare, v](T x) { return x == (T)compare ? (T)v : x; });
}

// Loads and stores with a cache hint: plain accesses, alignment-checked, and
// visible to a schedule that wants them.
template <typename T>
inline void hinted(int kind, const T* p, const char* site) {
    if (tram_emu_watch_hinted || (uintptr_t)p % sizeof(T) != 0 || !p)
        tram_emu_point(kind, p, sizeof(T), site);
}
template <typename T>
inline T load_hint(const char* site, const T* p) {
    hinted(TRAM_EMU_LOAD_CG, p, site);
    return *p;
}
template <typename T, typename U>
inline void store_hint(const char* site, T* p, U v) {
    hinted(TRAM_EMU_STORE_CG, p, site);
    *p = v;
}

// The value as an opaque register: the compiler can neither fuse the operation
// that produced it with the one that consumes it nor reassociate across it.
template <typename T>
inline T opaque(T v) {
    __asm__("" : "+x"(v));
    return v;
}

}  // namespace tram_emu

#define __syncthreads() ((void)tram_emu_barrier(1, TRAM_EMU_SITE))
#define __syncthreads_or(p) (tram_emu_barrier((p) ? 1 : 0, TRAM_EMU_SITE) != 0)
#define __syncthreads_and(p) \
    (tram_emu_barrier((p) ? 1 : 0, TRAM_EMU_SITE) == tram_emu::block_threads())
#define __syncthreads_count(p) ((int)tram_emu_barrier((p) ? 1 : 0, TRAM_EMU_SITE))

#define __shfl_sync(...) tram_emu::shfl_idx(TRAM_EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) tram_emu::shfl_up(TRAM_EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) tram_emu::shfl_down(TRAM_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) tram_emu::shfl_xor(TRAM_EMU_SITE, __VA_ARGS__)

#define atomicAdd(...) tram_emu::atomic_add(TRAM_EMU_SITE, __VA_ARGS__)
#define atomicSub(...) tram_emu::atomic_sub(TRAM_EMU_SITE, __VA_ARGS__)
#define atomicOr(...) tram_emu::atomic_or(TRAM_EMU_SITE, __VA_ARGS__)
#define atomicAnd(...) tram_emu::atomic_and(TRAM_EMU_SITE, __VA_ARGS__)
#define atomicMax(...) tram_emu::atomic_max(TRAM_EMU_SITE, __VA_ARGS__)
#define atomicMin(...) tram_emu::atomic_min(TRAM_EMU_SITE, __VA_ARGS__)
#define atomicExch(...) tram_emu::atomic_exch(TRAM_EMU_SITE, __VA_ARGS__)
#define atomicCAS(...) tram_emu::atomic_cas(TRAM_EMU_SITE, __VA_ARGS__)

#define __threadfence() tram_emu_point(TRAM_EMU_FENCE, nullptr, 0, TRAM_EMU_SITE)
#define __threadfence_block() tram_emu_point(TRAM_EMU_FENCE, nullptr, 0, TRAM_EMU_SITE)
#define __threadfence_system() tram_emu_point(TRAM_EMU_FENCE, nullptr, 0, TRAM_EMU_SITE)

#define __ldg(p) tram_emu::load_hint(TRAM_EMU_SITE, p)
#define __ldcg(p) tram_emu::load_hint(TRAM_EMU_SITE, p)
#define __ldca(p) tram_emu::load_hint(TRAM_EMU_SITE, p)
#define __ldcs(p) tram_emu::load_hint(TRAM_EMU_SITE, p)
#define __ldlu(p) tram_emu::load_hint(TRAM_EMU_SITE, p)
#define __ldcv(p) tram_emu::load_hint(TRAM_EMU_SITE, p)
#define __stcg(p, v) tram_emu::store_hint(TRAM_EMU_SITE, p, v)
#define __stcs(p, v) tram_emu::store_hint(TRAM_EMU_SITE, p, v)
#define __stwb(p, v) tram_emu::store_hint(TRAM_EMU_SITE, p, v)
#define __stwt(p, v) tram_emu::store_hint(TRAM_EMU_SITE, p, v)

// Explicitly rounded arithmetic: one IEEE operation, never contracted.
inline float __fadd_rn(float a, float b) { return tram_emu::opaque(tram_emu::opaque(a) + tram_emu::opaque(b)); }
inline float __fsub_rn(float a, float b) { return tram_emu::opaque(tram_emu::opaque(a) - tram_emu::opaque(b)); }
inline float __fmul_rn(float a, float b) { return tram_emu::opaque(tram_emu::opaque(a) * tram_emu::opaque(b)); }
inline float __fdiv_rn(float a, float b) { return tram_emu::opaque(tram_emu::opaque(a) / tram_emu::opaque(b)); }
inline float __fsqrt_rn(float a) { return tram_emu::opaque(sqrtf(tram_emu::opaque(a))); }
inline float __frcp_rn(float a) { return tram_emu::opaque(1.0f / tram_emu::opaque(a)); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return tram_emu::opaque(tram_emu::opaque(a) + tram_emu::opaque(b)); }
inline double __dsub_rn(double a, double b) { return tram_emu::opaque(tram_emu::opaque(a) - tram_emu::opaque(b)); }
inline double __dmul_rn(double a, double b) { return tram_emu::opaque(tram_emu::opaque(a) * tram_emu::opaque(b)); }
inline double __ddiv_rn(double a, double b) { return tram_emu::opaque(tram_emu::opaque(a) / tram_emu::opaque(b)); }
inline double __dsqrt_rn(double a) { return tram_emu::opaque(sqrt(tram_emu::opaque(a))); }
inline double __drcp_rn(double a) { return tram_emu::opaque(1.0 / tram_emu::opaque(a)); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __double2float_rn(double a) { return tram_emu::opaque((float)tram_emu::opaque(a)); }

inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __clzll(unsigned long long x) { return x ? __builtin_clzll(x) : 64; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int u; memcpy(&u, &x, 4); return u; }
inline float __int_as_float(int u) { float x; memcpy(&x, &u, 4); return x; }
inline long long __double_as_longlong(double x) { long long u; memcpy(&u, &x, 8); return u; }
inline double __longlong_as_double(long long u) { double x; memcpy(&x, &u, 8); return x; }
