// TRAM-θ's target upkeep: θ̄ ← λ·θ̄ + (1−λ)·θ over every tensor of a group in
// one launch (12 bytes per f32 parameter: θ̄ and θ in, θ̄ out).
//
// f64 with explicitly rounded intrinsics, in the order of `ema_element` in
// src/cpu/ema.rs, so both backends store the same bits. λ = 0 copies (the
// launcher skips λ = 1 entirely: θ̄ stays bit for bit).
#include "common.cuh"

// Mirrors the table row built in src/cuda/ema.rs.
struct EmaTensor {
    uint64_t target, theta, len;
};
struct EmaChunk {
    uint32_t tensor, index;
};
#define EMA_CHUNK 65536ull

template <typename T, typename P>
__device__ __forceinline__ void ema_update(const EmaTensor* __restrict__ tensors,
                                           const EmaChunk* __restrict__ chunks, uint32_t n_chunks,
                                           float lambda) {
    const double l = (double)lambda, oml = __dsub_rn(1.0, l);
    for (uint32_t k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        const EmaChunk ch = chunks[k];
        const EmaTensor t = tensors[ch.tensor];
        const uint64_t begin = (uint64_t)ch.index * EMA_CHUNK;
        const uint64_t end = begin + EMA_CHUNK < t.len ? begin + EMA_CHUNK : t.len;
        T* target = reinterpret_cast<T*>(t.target);
        const P* theta = reinterpret_cast<const P*>(t.theta);
        for (uint64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
            if (lambda == 0.0f) {
                target[i] = from_f32<T>(to_f32(theta[i]));
            } else {
                const double x = __dadd_rn(__dmul_rn(l, (double)to_f32(target[i])),
                                           __dmul_rn(oml, (double)to_f32(theta[i])));
                target[i] = from_f32<T>(__double2float_rn(x));
            }
        }
    }
}

#define EMA_KERNEL(t, p, T, P)                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                       \
        ema_##t##_##p(const EmaTensor* tensors, const EmaChunk* chunks, uint32_t n_chunks,  \
                      float lambda) {                                                       \
        ema_update<T, P>(tensors, chunks, n_chunks, lambda);                                \
    }

EMA_KERNEL(f32, f32, float, float)
EMA_KERNEL(f32, bf16, float, bf16)
EMA_KERNEL(f32, f16, float, f16)
EMA_KERNEL(bf16, f32, bf16, float)
EMA_KERNEL(bf16, bf16, bf16, bf16)
EMA_KERNEL(bf16, f16, bf16, f16)
EMA_KERNEL(f16, f32, f16, float)
EMA_KERNEL(f16, bf16, f16, bf16)
EMA_KERNEL(f16, f16, f16, f16)
