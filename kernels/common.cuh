// Shared by every kernel: element loads/stores and the status bits.
// Arithmetic is f32 (or f64 where a bound needs it); f16/bf16 only load and store.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16 x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

// Round to nearest even, as the CPU reference's `Element::from_f32` does.
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Mirrors `PerturbStatus` in src/config.rs.
#define TRAM_STATUS_APPLIED 1u
#define TRAM_STATUS_ZERO_NORM 2u
#define TRAM_STATUS_NONFINITE_GRAD 4u
#define TRAM_STATUS_NONFINITE_RADIUS 8u
#define TRAM_STATUS_NEGATIVE_RADIUS 16u
#define TRAM_STATUS_OVERFLOW 32u

// Mirrors `Geometry::code` in src/config.rs.
#define TRAM_GEOMETRY_SAM 0u
#define TRAM_GEOMETRY_ADAPTIVE 1u
#define TRAM_GEOMETRY_FISHER 2u

#define TRAM_NORM_EPS 1e-12
