// TRAM-θ's target upkeep: θ̄ ← λ·θ̄ + (1−λ)·θ over every tensor of a group in
// one launch (12 bytes per f32 parameter: θ̄ and θ in, θ̄ out).
//
// f64 with explicitly rounded intrinsics, in the order of `ema_element` in
// src/cpu/ema.rs, so both backends store the same bits for finite values
// (NaN: the GPU's canonical one, the CPU's keeps the payload). λ = 0 copies (the
// launcher skips λ = 1 entirely: θ̄ stays bit for bit).
#include "multi_tensor.cuh"

// The group is a multi_tensor.cuh table (mirrors `build` in src/cuda/ema.rs).
#define EMA_SLOT_TARGET 0  // θ̄, written
#define EMA_SLOT_THETA 1   // θ

template <typename T, typename P>
__device__ __forceinline__ void ema_update(const MtTensor* __restrict__ tensors,
                                           const MtChunk* __restrict__ chunks, uint32_t n_chunks,
                                           float lambda) {
    const double l = (double)lambda, oml = __dsub_rn(1.0, l);
    for (uint32_t k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        const MtChunk ch = chunks[k];
        const MtTensor t = tensors[ch.tensor];
        const MtSpan span = mt_span(t, ch);
        const uint64_t begin = span.begin, end = span.end;
        T* target = reinterpret_cast<T*>(t.ptr[EMA_SLOT_TARGET]);
        const P* theta = reinterpret_cast<const P*>(t.ptr[EMA_SLOT_THETA]);
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
        ema_##t##_##p(const MtTensor* tensors, const MtChunk* chunks, uint32_t n_chunks,    \
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
