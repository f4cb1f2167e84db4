// Kernels for the emulator's own tests (emu/tests/driver_test.cpp): each one
// either exercises a check of the driver or carries a bug it must catch.
#include <stdint.h>

// Launch bounds of 128 threads: a launch of 256 is refused.
extern "C" __global__ void __launch_bounds__(128) emutest_bounded(float* out) {
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// 40 KiB of static shared memory: with 16 KiB dynamic on top, over 48 KiB.
extern "C" __global__ void emutest_big_smem(float* out) {
    __shared__ float big[10240];
    big[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = big[(threadIdx.x + 1) % blockDim.x];
}

// Keeps 64 independent values live: well over 64 registers, so 1024 threads
// need more than the 65,536 registers of a block.
extern "C" __global__ void emutest_many_regs(const float* in, float* out, int n) {
    float a[64];
#pragma unroll
    for (int i = 0; i < 64; i++) a[i] = in[(threadIdx.x + 7 * i) % n];
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < 8; r++) {
#pragma unroll
        for (int i = 0; i < 64; i++) a[i] = a[i] * a[(i + r + 1) % 64] + 1.0f;
    }
#pragma unroll
    for (int i = 0; i < 64; i++) s += a[i];
    out[threadIdx.x] = s;
}

// x[i] += v for every i: what the capture tests record and replay.
extern "C" __global__ void emutest_add(float* x, float v, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += v;
}

// out[0] = sum of in[0..n), one partial per block, the last block combining:
// the ticket is taken only after the block's partial is written and fenced.
extern "C" __global__ void emutest_sum(const float* in, int n, float* partials, unsigned* counter,
                                       float* out) {
    __shared__ float warp_sums[32];
    __shared__ bool last;
    float v = 0.f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += in[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float b = 0.f;
        for (unsigned w = 0; w < blockDim.x / 32; w++) b += warp_sums[w];
        partials[blockIdx.x] = b;
        __threadfence();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {
        __threadfence();
        float t = 0.f;
        for (unsigned b = 0; b < gridDim.x; b++) t += __ldcg(partials + b);
        *out = t;
        *counter = 0;
    }
}

// The same with the bug: the ticket is taken before the partial is written, so
// the last block can read partials other blocks have not written yet.
extern "C" __global__ void emutest_sum_racy(const float* in, int n, float* partials,
                                            unsigned* counter, float* out) {
    __shared__ float warp_sums[32];
    __shared__ bool last;
    float v = 0.f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += in[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (threadIdx.x == 0) {
        float b = 0.f;
        for (unsigned w = 0; w < blockDim.x / 32; w++) b += warp_sums[w];
        __stcg(partials + blockIdx.x, b);
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {
        float t = 0.f;
        for (unsigned b = 0; b < gridDim.x; b++) t += __ldcg(partials + b);
        *out = t;
        *counter = 0;
    }
}

// A block sum with the barrier between the shared-memory write and the read
// of other threads' slots missing.
extern "C" __global__ void emutest_missing_barrier(const float* in, float* out) {
    __shared__ float slot[1024];
    slot[threadIdx.x] = in[threadIdx.x];
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (unsigned i = 0; i < blockDim.x; i++) t += slot[i];
        *out = t;
    }
}

// Thread 0 leaves; the others then wait at a barrier it never reaches.
extern "C" __global__ void emutest_barrier_after_exit(float* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Half the block waits at one barrier, half at another.
extern "C" __global__ void emutest_divergent_barrier(float* out) {
    if (threadIdx.x < 64) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// Half of each warp waits at a shuffle for the other half, which waits at a
// barrier for the first: nobody can proceed.
extern "C" __global__ void emutest_deadlock(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) {
        v = __shfl_down_sync(0xffffffffu, v, 1);
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = v;
}

// Lane 5 has left when its warp shuffles with a full mask.
extern "C" __global__ void emutest_shuffle_exited(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x == 5) return;
    v = __shfl_down_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// A 16-byte vector load from an address 4 bytes off its alignment.
extern "C" __global__ void emutest_misaligned(const float* in, float* out) {
    const uint4 u = *reinterpret_cast<const uint4*>(in + 1);
    out[threadIdx.x] = __uint_as_float(u.x);
}

// A cache-hinted 16-byte load, misaligned.
extern "C" __global__ void emutest_misaligned_cg(const float* in, float* out) {
    const int4 u = __ldcg(reinterpret_cast<const int4*>(in + 2));
    out[threadIdx.x] = __int_as_float(u.x);
}

// Reads one element past the end of `in` (n elements).
extern "C" __global__ void emutest_past_end(const float* in, int n, float* out) {
    out[threadIdx.x] = in[n];
}

// Dereferences an address no allocation covers.
extern "C" __global__ void emutest_wild(float* out) {
    volatile uintptr_t wild = 16;
    *reinterpret_cast<volatile float*>(wild) = 1.0f;
    out[0] = 0.f;
}
