// TRAM-x: out = e + z, z ~ U(−σ, σ) or N(0, σ²), from Philox4x32-10 keyed by
// the seed with counter (element/4, step): any (seed, step, index) gives the
// same noise as src/cpu/noise.rs, whatever the grid.
//
// Uniform: integer-exact v = (2k+1−2^24)·2^-24, then σ·v and e + z as single
// rounded f32 operations (__fmul_rn/__fadd_rn: no contraction into FMA), so the
// bits match the CPU. Gaussian: Box–Muller in f64 (log, sin, cos may differ
// from the CPU's libm by an f64 ulp or two; see src/cpu/noise.rs).
//
// The step is read from device memory, so a replayed CUDA graph draws fresh
// noise after `noise_step_advance` (captured with it) bumps the counter.
#include "common.cuh"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k.x += PHILOX_W0;
            k.y += PHILOX_W1;
        }
        const uint32_t hi0 = __umulhi(PHILOX_M0, c.x), lo0 = PHILOX_M0 * c.x;
        const uint32_t hi1 = __umulhi(PHILOX_M1, c.z), lo1 = PHILOX_M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

__device__ __forceinline__ float uniform_pm1(uint32_t x) {
    const int n = 2 * (int)(x >> 8) + 1 - (1 << 24);
    return (float)n * (1.0f / 16777216.0f);
}

// (r·cos a, r·sin a) in f64, in the order of `box_muller` on the CPU.
__device__ __forceinline__ void box_muller(uint32_t x0, uint32_t x1, double& c, double& s) {
    const double two_m32 = 2.3283064365386963e-10;  // 2^-32
    const double u1 = __dmul_rn(__dadd_rn((double)x0, 1.0), two_m32);
    const double u2 = __dmul_rn((double)x1, two_m32);
    const double r = __dsqrt_rn(__dmul_rn(-2.0, log(u1)));
    const double a = __dmul_rn(0x1.921fb54442d18p+2, u2);  // 2π·u2
    c = __dmul_rn(r, cos(a));
    s = __dmul_rn(r, sin(a));
}

extern "C" __global__ void noise_step_advance(unsigned long long* step) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *step += 1;
}

template <typename T, bool GAUSS>
__device__ __forceinline__ void add_noise(const T* in, T* out, uint64_t n, uint64_t seed,
                                          const unsigned long long* step_ptr, float sigma) {
    const uint64_t step = *step_ptr;
    const uint2 key = make_uint2((uint32_t)seed, (uint32_t)(seed >> 32));
    const uint64_t blocks = (n + 3) / 4;
    for (uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; j < blocks;
         j += (uint64_t)gridDim.x * blockDim.x) {
        const uint4 x = philox4x32_10(
            make_uint4((uint32_t)j, (uint32_t)(j >> 32), (uint32_t)step, (uint32_t)(step >> 32)),
            key);
        float z[4];
        if (GAUSS) {
            double a, b, c, d;
            box_muller(x.x, x.y, a, b);
            box_muller(x.z, x.w, c, d);
            const double s = (double)sigma;
            z[0] = __double2float_rn(__dmul_rn(s, a));
            z[1] = __double2float_rn(__dmul_rn(s, b));
            z[2] = __double2float_rn(__dmul_rn(s, c));
            z[3] = __double2float_rn(__dmul_rn(s, d));
        } else {
            z[0] = __fmul_rn(sigma, uniform_pm1(x.x));
            z[1] = __fmul_rn(sigma, uniform_pm1(x.y));
            z[2] = __fmul_rn(sigma, uniform_pm1(x.z));
            z[3] = __fmul_rn(sigma, uniform_pm1(x.w));
        }
        const uint64_t base = 4 * j;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (base + i < n) out[base + i] = from_f32<T>(__fadd_rn(to_f32(in[base + i]), z[i]));
        }
    }
}

#define NOISE_KERNEL(name, T, GAUSS)                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                      \
        name(const T* in, T* out, uint64_t n, uint64_t seed,                               \
             const unsigned long long* step, float sigma) {                                \
        add_noise<T, GAUSS>(in, out, n, seed, step, sigma);                                \
    }

NOISE_KERNEL(noise_uniform_f32, float, false)
NOISE_KERNEL(noise_uniform_bf16, bf16, false)
NOISE_KERNEL(noise_uniform_f16, f16, false)
NOISE_KERNEL(noise_gaussian_f32, float, true)
NOISE_KERNEL(noise_gaussian_bf16, bf16, true)
NOISE_KERNEL(noise_gaussian_f16, f16, true)
