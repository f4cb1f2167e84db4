// Many tensors in one launch, after apex's multi_tensor_apply.
//
// The host describes every tensor of a group once, in a device table of
// MtTensor (up to MT_SLOTS pointers each: parameter, gradient, backup, master,
// ...; what a slot means is up to the group, see src/cuda/group.rs), and cuts
// the tensors into fixed-size chunks: a device list of MtChunk built on the
// host (`chunk_map` in src/cuda/group.rs), the chunks of the tensors taking
// part in a step first, then the others, with both counts in device memory
// (n_chunks[0], n_chunks[1]). Kernels walk that list with a grid stride, so any
// number of tensors costs one launch and the work per chunk is bounded.
//
// Offsets are 64-bit throughout: a tensor may hold more than 2^31 elements.
#pragma once
#include "common.cuh"
#include <cuda/std/type_traits>

// Mirrors `MT_SLOTS` and `MT_CHUNK` in src/cuda/group.rs.
#define MT_SLOTS 6
// Elements per chunk. A multiple of every vector width (at most 8 elements),
// and CHUNK * sizeof(element) is a multiple of 16 bytes, so every chunk of a
// tensor has the same alignment as the tensor's first element.
#define MT_CHUNK 65536ull

struct MtTensor {
    uint64_t ptr[MT_SLOTS];  // device addresses; 0 where a slot is unused
    uint64_t len;            // elements
};

struct MtChunk {
    uint32_t tensor;  // index into the MtTensor table
    uint32_t index;   // chunk number inside that tensor: elements [index*MT_CHUNK, ...)
};

// The elements [begin, end) of one chunk, in its tensor's element indices.
struct MtSpan {
    uint64_t begin, end;
};

__device__ __forceinline__ MtSpan mt_span(const MtTensor& t, const MtChunk& c) {
    uint64_t begin = (uint64_t)c.index * MT_CHUNK;
    uint64_t end = begin + MT_CHUNK;
    return MtSpan{begin, end < t.len ? end : t.len};
}

// The smallest h in [0, V) such that element h of every listed array is
// 16-byte aligned, or -1 when there is none (sub-slices at different
// misalignments, or an address not a multiple of its element size). An
// address of 0 (unused) never constrains. V elements of every array then
// span a whole number of 16-byte words, so from element h on each array can
// be read and written in 16-byte vectors.
template <int V>
__device__ __forceinline__ int mt_vector_head(uint64_t a0, int s0, uint64_t a1 = 0, int s1 = 1,
                                              uint64_t a2 = 0, int s2 = 1, uint64_t a3 = 0,
                                              int s3 = 1) {
#pragma unroll
    for (int h = 0; h < V; ++h) {
        uint64_t m = (a0 + (uint64_t)h * s0) | (a1 ? a1 + (uint64_t)h * s1 : 0) |
                     (a2 ? a2 + (uint64_t)h * s2 : 0) | (a3 ? a3 + (uint64_t)h * s3 : 0);
        if ((m & 15) == 0) return h;
    }
    return -1;
}

// How one block splits a chunk [begin, end) of a tensor whose arrays share the
// vector head `head`: scalars before vbegin and from vend on (fewer than V
// each), nvec vectors of V elements in between. With head < 0, all scalar.
struct MtSplit {
    uint64_t vbegin, vend;
    uint32_t nvec;
};

template <int V>
__device__ __forceinline__ MtSplit mt_split(MtSpan s, int head) {
    if (head < 0) return MtSplit{s.end, s.end, 0};
    // s.begin is a multiple of MT_CHUNK, hence of V: the head repeats per chunk.
    uint64_t vb = s.begin + (uint64_t)head;
    if (vb > s.end) vb = s.end;
    uint32_t nvec = (uint32_t)((s.end - vb) / V);
    return MtSplit{vb, vb + (uint64_t)nvec * V, nvec};
}

// V elements of T in registers, moved as 16-byte words. The table holds
// generic addresses; the .cg intrinsics make the accesses global (LDG/STG,
// cached in L2 only: every element is touched once per launch).
template <typename T, int V>
struct alignas(16) MtVec {
    static_assert((sizeof(T) * V) % 16 == 0, "a vector must span whole 16-byte words");
    T v[V];
};

template <typename T, int V>
__device__ __forceinline__ MtVec<T, V> mt_load(const T* p) {
    MtVec<T, V> r;
    const int4* src = reinterpret_cast<const int4*>(p);
    int4* dst = reinterpret_cast<int4*>(&r);
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) * V / 16); ++i) dst[i] = __ldcg(src + i);
    return r;
}

template <typename T, int V>
__device__ __forceinline__ void mt_store(T* p, const MtVec<T, V>& x) {
    int4* dst = reinterpret_cast<int4*>(p);
    const int4* src = reinterpret_cast<const int4*>(&x);
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) * V / 16); ++i) __stcg(dst + i, src[i]);
}

// Elements per 16-byte vector of the narrowest type involved.
template <typename A, typename B>
struct MtWidth {
    typedef typename cuda::std::conditional<(sizeof(A) < sizeof(B)), A, B>::type Narrow;
    static constexpr int V = 16 / sizeof(Narrow);
};

// dst = src over one chunk, bit for bit (two 16-byte vectors in flight).
template <typename T>
__device__ __forceinline__ void mt_copy_chunk(const T* src, T* dst, MtSpan span) {
    constexpr int V = 16 / sizeof(T);
    const int head = mt_vector_head<V>((uint64_t)src, sizeof(T), (uint64_t)dst, sizeof(T));
    const MtSplit split = mt_split<V>(span, head);
    for (uint64_t i = span.begin + threadIdx.x; i < split.vbegin; i += blockDim.x) dst[i] = src[i];
    for (uint64_t i = split.vend + threadIdx.x; i < span.end; i += blockDim.x) dst[i] = src[i];
    const T* sb = src + split.vbegin;
    T* db = dst + split.vbegin;
    uint32_t i = threadIdx.x;
    for (; i + blockDim.x < split.nvec; i += 2 * blockDim.x) {
        const uint64_t o0 = (uint64_t)i * V, o1 = (uint64_t)(i + blockDim.x) * V;
        const MtVec<T, V> a = mt_load<T, V>(sb + o0), b = mt_load<T, V>(sb + o1);
        mt_store<T, V>(db + o0, a);
        mt_store<T, V>(db + o1, b);
    }
    if (i < split.nvec) mt_store<T, V>(db + (uint64_t)i * V, mt_load<T, V>(sb + (uint64_t)i * V));
}

// Sum over a block in a fixed order (warp trees, then warp 0 over the warps):
// the same inputs give the same bits on every run. Result valid in thread 0.
// `scratch` holds at least 32 doubles; blockDim.x is a multiple of 32.
__device__ __forceinline__ double mt_block_sum(double v, double* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    }
    return v;
}

// The slots of a TRAM parameter group (mirrors `Slot` in src/cuda/group.rs).
// Other multi-tensor kernels may give the slots their own meanings.
#define MT_SLOT_PARAM 0   // θ, the parameters (or the working copy beside a master)
#define MT_SLOT_GRAD 1    // g
#define MT_SLOT_BACKUP 2  // θ saved by the in-place perturbation
#define MT_SLOT_MASTER 3  // f32 master weights
#define MT_SLOT_OUT 4     // θ + ε of the out-of-place perturbation

// The device-side result of a norm and of the perturbation that follows it
// (mirrors `NormState` in src/cuda/group.rs).
struct NormState {
    double sum_sq;       // Σ of the geometry's squared terms: all-reduce this when sharded
    double norm;         // sqrt(sum_sq) (the perturbation rewrites it with the one it used)
    double rho;          // radius the last perturbation used
    double coef;         // ρ/(norm + 1e-12) of the last perturbation (0 when not applied)
    uint32_t status;     // TRAM_STATUS_* bits of the last perturbation
    uint32_t found_inf;  // 1 when a gradient element is inf/NaN (set by the norm)
    uint32_t pad[2];
};
