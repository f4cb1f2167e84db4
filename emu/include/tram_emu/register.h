// Registers host-compiled kernels with the runtime: each entry unpacks
// cuLaunchKernel's parameter array by the kernel's own C++ parameter types, so a
// launcher that passes the wrong argument sees wrong values, as on a GPU.
// emu-build.sh generates one file per kernels/<module>.cu that includes the
// module and lists its entries (taken from the PTX's .entry lines).
#pragma once
#include <tram_emu/abi.h>

#include <string.h>

#include <utility>

namespace tram_emu {

template <typename Sig, Sig F>
struct Entry;

template <typename... A, void (*F)(A...)>
struct Entry<void (*)(A...), F> {
    static constexpr unsigned n = sizeof...(A);
    static constexpr unsigned sizes[n + 1] = {(unsigned)sizeof(A)..., 0u};

    template <typename T>
    static T take(void* p) {
        T v;
        memcpy(&v, p, sizeof(T));
        return v;
    }
    template <size_t... I>
    static void call(void* const* params, std::index_sequence<I...>) {
        F(take<A>(params[I])...);
    }
    static void run(void* const* params) { call(params, std::index_sequence_for<A...>{}); }
};

}  // namespace tram_emu

#define TRAM_EMU_KERNEL(module, fn)                                                       \
    tram_emu_kernel {                                                                     \
        #module, #fn, &tram_emu::Entry<decltype(&fn), &fn>::run,                          \
            tram_emu::Entry<decltype(&fn), &fn>::n, tram_emu::Entry<decltype(&fn), &fn>::sizes \
    }
