// Global L2 norm over every tensor of a parameter group, in one launch, for
// the three geometries of src/config.rs (SAM, adaptive, Fisher), with
// g' = inv_scale * g.
//
// Grid: a fixed number of blocks (a multiple of the SM count), each walking
// the chunk list with a grid stride and writing one f64 partial; the block
// that finishes last sums the partials in index order. Every sum has a fixed
// order, so a group gives the same bits on every run on the same device.
//
// Accuracy: each thread forms the terms of one 16-byte vector (V <= 8
// elements) in f32 and sums that short run in f32, then adds the run to an f64
// sum; block sums and the combine are f64. A term carries at most 5 f32
// roundings (adaptive: s*g, |θ|+η, the product, the square; Fisher similar)
// and a run V - 1 more; the terms are non-negative, so the relative error of
// sum_sq is at most (V + 5) * 2^-24 <= 7.8e-7 plus n * 2^-53 <= 3e-8 for
// n <= 2^28 (the f64 sums), i.e. the norm is within 4.1e-7 relative of the
// exact norm of the stored inputs (documented and tested as 1e-6).
// Huge gradients: a term formed in f32 overflows once |g'| exceeds ~1.8e19
// (its square leaves f32's range), and the sum is then not finite. When that
// happens with no inf/NaN gradient (found_inf 0), the last block sums the whole
// group again with every term in f64, where finite inputs cannot overflow (the
// CPU reference's terms): the norm is finite again, within ~1e-10 relative,
// or not finite only for a non-finite θ (adaptive). The common case pays one
// test in the last block; the slow pass (one block) runs only on overflow.
// Tiny ones: terms below f32's normal range (|g'| below ~1e-19) are summed as
// f32 subnormals or zeros, so a group whose every |g'| is that small has a less
// accurate norm than stated (the CPU reference's has no such limit).
#include "multi_tensor.cuh"

#define NORM_THREADS 256

template <int GEOM>
__device__ __forceinline__ float norm_term(float theta, float g, float s, float eta) {
    const float x = s * g;
    if (GEOM == TRAM_GEOMETRY_ADAPTIVE) {
        const float y = (fabsf(theta) + eta) * x;
        return y * y;
    } else if (GEOM == TRAM_GEOMETRY_FISHER) {
        const float q = x * x;
        return q / fmaf(eta, q, 1.0f);
    } else {
        return x * x;
    }
}

// Adds this thread's share of one chunk's terms to acc, and sets bad when a
// gradient element is inf/NaN. Only a non-finite term can come from one, so the
// elements are looked at only then (a non-finite θ or an f32 overflow also
// makes a term non-finite, with finite gradients: not bad).
template <typename T, typename G, int GEOM>
__device__ __forceinline__ void norm_chunk(const T* th, const G* g, MtSpan span, float s,
                                           float eta, double& acc, bool& bad) {
    constexpr int V = MtWidth<T, G>::V;
    constexpr bool READS_THETA = GEOM == TRAM_GEOMETRY_ADAPTIVE;
    const int head = READS_THETA ? mt_vector_head<V>((uint64_t)g, sizeof(G), (uint64_t)th, sizeof(T))
                                 : mt_vector_head<V>((uint64_t)g, sizeof(G));
    const MtSplit split = mt_split<V>(span, head);

    auto scalar = [&](uint64_t i) {
        const float t = READS_THETA ? to_f32(th[i]) : 0.0f;
        const float gv = to_f32(g[i]);
        const float term = norm_term<GEOM>(t, gv, s, eta);
        if (!isfinite(term)) bad |= !isfinite(gv);
        acc += (double)term;
    };
    for (uint64_t i = span.begin + threadIdx.x; i < split.vbegin; i += blockDim.x) scalar(i);
    for (uint64_t i = split.vend + threadIdx.x; i < span.end; i += blockDim.x) scalar(i);

    auto run = [&](const MtVec<T, V>& tv, const MtVec<G, V>& gv) {
        float r = 0.0f;
#pragma unroll
        for (int j = 0; j < V; ++j)
            r += norm_term<GEOM>(READS_THETA ? to_f32(tv.v[j]) : 0.0f, to_f32(gv.v[j]), s, eta);
        if (!isfinite(r)) {
#pragma unroll
            for (int j = 0; j < V; ++j) bad |= !isfinite(to_f32(gv.v[j]));
        }
        acc += (double)r;
    };
    const G* gb = g + split.vbegin;
    const T* tb = th + split.vbegin;
    uint32_t k = threadIdx.x;
    // Two vectors in flight per thread.
    for (; k + blockDim.x < split.nvec; k += 2 * blockDim.x) {
        const uint64_t o0 = (uint64_t)k * V, o1 = (uint64_t)(k + blockDim.x) * V;
        MtVec<T, V> t0, t1;
        if (READS_THETA) {
            t0 = mt_load<T, V>(tb + o0);
            t1 = mt_load<T, V>(tb + o1);
        }
        const MtVec<G, V> g0 = mt_load<G, V>(gb + o0);
        const MtVec<G, V> g1 = mt_load<G, V>(gb + o1);
        run(t0, g0);
        run(t1, g1);
    }
    if (k < split.nvec) {
        const uint64_t o0 = (uint64_t)k * V;
        MtVec<T, V> t0;
        if (READS_THETA) t0 = mt_load<T, V>(tb + o0);
        run(t0, mt_load<G, V>(gb + o0));
    }
}

// The term of one element in f64 (the CPU reference's terms).
template <int GEOM>
__device__ __forceinline__ double norm_term_f64(float theta, float g, float s, float eta) {
    const double x = (double)s * (double)g;
    if (GEOM == TRAM_GEOMETRY_ADAPTIVE) {
        const double y = (fabs((double)theta) + (double)eta) * x;
        return y * y;
    }
    const double q = x * x;
    return GEOM == TRAM_GEOMETRY_FISHER ? q / (1.0 + (double)eta * q) : q;
}

// The slow pass: the sum of every term of the group in f64, by one block in a
// fixed order, written to the state by thread 0. Out of line and not
// unrolled, and the kernel's last act, with its inputs re-read from shared
// memory and parameters: little of the common path is live across the call.
// (ptxas still spills 4 bytes around it in grad_norm_bf16_bf16 on sm_90.)
template <typename T, typename G, int GEOM>
__device__ __noinline__ void grad_norm_f64(const MtTensor* tensors, const MtChunk* chunks, uint32_t n,
                                           uint32_t theta_slot, float eta, float s, double* scratch,
                                           NormState* state) {
    double acc = 0.0;
#pragma unroll 1
    for (uint32_t c = 0; c < n; ++c) {
        const MtTensor& t = tensors[chunks[c].tensor];
        const MtSpan span = mt_span(t, chunks[c]);
        const G* g = reinterpret_cast<const G*>(t.ptr[MT_SLOT_GRAD]);
        const T* th = reinterpret_cast<const T*>(t.ptr[theta_slot]);
#pragma unroll 1
        for (uint64_t i = span.begin + threadIdx.x; i < span.end; i += blockDim.x) {
            const float theta = GEOM == TRAM_GEOMETRY_ADAPTIVE ? to_f32(th[i]) : 0.0f;
            acc += norm_term_f64<GEOM>(theta, to_f32(g[i]), s, eta);
        }
    }
    acc = mt_block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        state->sum_sq = acc;
        state->norm = sqrt(acc);
    }
}

// theta_slot: where θ is read for the adaptive geometry (the params, or the
// f32 master weights). partials: 2 * gridDim.x doubles (the block sums, then
// the blocks' found-inf flags as 0/1); counter: zero on entry, left zero.
// inv_scale_dev: null, or the inverse scale in device memory, read instead of
// `inv_scale` (a replayed graph then follows the host's loss scaler).
template <typename T, typename G>
__device__ void grad_norm(const MtTensor* tensors, const MtChunk* chunks, const uint32_t* n_chunks,
                          uint32_t theta_slot, uint32_t geometry, float eta, float inv_scale_arg,
                          double* partials, uint32_t* counter, NormState* state,
                          const float* inv_scale_dev) {
    __shared__ double scratch[32];
    __shared__ bool last;
    double acc = 0.0;
    bool bad = false;
    const uint32_t n = *n_chunks;
    const float inv_scale = inv_scale_dev != nullptr ? *inv_scale_dev : inv_scale_arg;
    for (uint32_t c = blockIdx.x; c < n; c += gridDim.x) {
        const MtChunk ch = chunks[c];
        const MtTensor& t = tensors[ch.tensor];
        const MtSpan span = mt_span(t, ch);
        const G* g = reinterpret_cast<const G*>(t.ptr[MT_SLOT_GRAD]);
        if (geometry == TRAM_GEOMETRY_ADAPTIVE) {
            const T* th = reinterpret_cast<const T*>(t.ptr[theta_slot]);
            norm_chunk<T, G, TRAM_GEOMETRY_ADAPTIVE>(th, g, span, inv_scale, eta, acc, bad);
        } else if (geometry == TRAM_GEOMETRY_FISHER) {
            norm_chunk<T, G, TRAM_GEOMETRY_FISHER>(nullptr, g, span, inv_scale, eta, acc, bad);
        } else {
            norm_chunk<T, G, TRAM_GEOMETRY_SAM>(nullptr, g, span, inv_scale, eta, acc, bad);
        }
    }

    const bool block_bad = __syncthreads_or(bad);
    const double block = mt_block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = block;
        partials[gridDim.x + blockIdx.x] = block_bad ? 1.0 : 0.0;
        __threadfence();  // the partial is visible device-wide before the ticket is taken
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
        if (last) __threadfence();  // ...and every other block's partial is seen after it
    }
    __syncthreads();
    if (!last) return;

    double total = 0.0, flags = 0.0;
    for (uint32_t i = threadIdx.x; i < gridDim.x; i += blockDim.x) {
        total += __ldcg(partials + i);
        flags += __ldcg(partials + gridDim.x + i);
    }
    total = mt_block_sum(total, scratch);
    flags = mt_block_sum(flags, scratch);
    // An f32 term overflowed while every gradient is finite: sum again in f64.
    // (Through shared memory, so nothing is kept in registers across the call.)
    __shared__ double s_total;
    __shared__ bool slow;
    __shared__ float s_scale;
    if (threadIdx.x == 0) {
        s_total = total;
        s_scale = inv_scale;
        slow = !isfinite(total) && flags == 0.0;
        state->found_inf = flags > 0.0 ? 1u : 0u;
        *counter = 0u;  // ready for the next launch
    }
    __syncthreads();
    if (slow) {
        if (geometry == TRAM_GEOMETRY_ADAPTIVE)
            grad_norm_f64<T, G, TRAM_GEOMETRY_ADAPTIVE>(tensors, chunks, *n_chunks, theta_slot, eta, s_scale, scratch, state);
        else if (geometry == TRAM_GEOMETRY_FISHER)
            grad_norm_f64<T, G, TRAM_GEOMETRY_FISHER>(tensors, chunks, *n_chunks, theta_slot, eta, s_scale, scratch, state);
        else
            grad_norm_f64<T, G, TRAM_GEOMETRY_SAM>(tensors, chunks, *n_chunks, theta_slot, eta, s_scale, scratch, state);
    } else if (threadIdx.x == 0) {
        state->sum_sq = s_total;
        state->norm = sqrt(s_total);
    }
}

#define GRAD_NORM(TN, GN, T, G)                                                                  \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) grad_norm_##TN##_##GN(           \
        const MtTensor* tensors, const MtChunk* chunks, const uint32_t* n_chunks,               \
        uint32_t theta_slot, uint32_t geometry, float eta, float inv_scale, double* partials,   \
        uint32_t* counter, NormState* state, const float* inv_scale_dev) {                      \
        grad_norm<T, G>(tensors, chunks, n_chunks, theta_slot, geometry, eta, inv_scale,        \
                        partials, counter, state, inv_scale_dev);                               \
    }

// θ type (params, or f32 master) x gradient type.
GRAD_NORM(f32, f32, float, float)
GRAD_NORM(f16, f16, f16, f16)
GRAD_NORM(bf16, bf16, bf16, bf16)
GRAD_NORM(bf16, f32, bf16, float)
GRAD_NORM(f32, f16, float, f16)
GRAD_NORM(f32, bf16, float, bf16)

// The norm from sum_sq alone: for a sharded group, after sum_sq has been
// all-reduced across ranks. A non-finite sum means some rank saw a non-finite
// term, most likely an inf/NaN gradient: found_inf is raised then (ranks don't
// share their flags otherwise). The perturbation derives its norm from sum_sq
// itself, so it needs no call to this.
extern "C" __global__ void grad_norm_finish(NormState* state) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        const double s = state->sum_sq;
        state->norm = sqrt(s);
        if (!isfinite(s)) state->found_inf = 1u;
    }
}
