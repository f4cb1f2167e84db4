// θ + ε over every tensor of a parameter group in one launch, with
// ε = ρ·w/(‖·‖ + 1e-12) (w per geometry, src/config.rs) and ρ a fixed radius
// or δ·d with the divergence d read from device memory. The norm comes from
// the NormState that grad_norm left on the device: no host round trip.
//
// Modes (one kernel each):
// - in place: reads θ and g, writes θ + ε over θ and θ into the backup
//   (16 B/param for f32). The backup is written whatever the status.
// - master: reads the f32 master weights and g, writes only the P working
//   copy round_P(master + ε) (10 B/param for bf16 + f32 grads); nothing is
//   written when the perturbation is not applied.
// - out of place: reads θ and g, writes θ + ε to a second buffer (θ itself
//   when not applied).
// Tensors without a gradient this step have θ + ε = θ: the in-place and
// master paths skip them (no backup is written for them; restore skips them
// too), the out-of-place path copies θ to their output.
//
// Every block derives the same status and coefficient from the same device
// scalars; block 0 records them (and the norm and ρ it used) in the state. An
// applied step also looks for overflow: a finite θ (or master value) written as
// ±inf. Each block ORs its threads' findings (__syncthreads_or) and counts a
// finding in scratch[1]; the block that takes the last ticket of scratch[0]
// writes the status, APPLIED with or without OVERFLOW, and zeroes both words.
// So the status is written once, after every block has contributed, and does
// not depend on the order the blocks ran in.
//
// Arithmetic: SAM is one f32 fma per element with c·s rounded once to f32, so
// ε carries one rounding (2^-24 relative) before the final rounding of θ + ε.
// Adaptive and Fisher form w in f64 when θ is f32 (ε then carries ~2^-53) and in
// f32 for f16/bf16 outputs (~6·2^-24, far below their ulp). Huge numbers: SAM
// and adaptive work in f64 for the whole launch when c·s is not a normal f32
// (e.g. a norm near 1e21 with ρ below ~1e-17) or the norm passes 2^60 (then
// some (|θ|+η)·s·g may too, and its square overflow an f32); Fisher in f32
// takes w = 1/(1/x + η x) for |x| = |s·g| >= 2^32, where the square in
// x/(1 + η x²) would overflow. So |result − (θ + ε)| <= 1 ulp(θ + ε) +
// 2 ulp(ε), ε exact from the norm and ρ used, except for f16/bf16 parameters
// where (|θ|+η)²·g passes ~3.4e38 with a norm below 2^60 (|θ| beyond ~1e19·s;
// θ + ε then comes out infinite, reported as OVERFLOW), or where Fisher's c, or
// the adaptive c·s, is below ~1e-38 (fewer digits in ε).
#include "multi_tensor.cuh"

#define PERTURB_THREADS 256
#define PERTURB_IN_PLACE 0
#define PERTURB_MASTER 1
#define PERTURB_OUT_OF_PLACE 2
#define RADIUS_FIXED 0u

// Arithmetic type of w for outputs of type P: f64 for f32, f32 otherwise.
template <typename P> struct PerturbAcc { typedef float type; };
template <> struct PerturbAcc<float> { typedef double type; };

// f64 to P, to nearest even (f16/bf16 through f32: within the stated bound).
template <typename P> __device__ __forceinline__ P round_to(float x) { return from_f32<P>(x); }
template <typename P> __device__ __forceinline__ P round_to(double x) {
    return from_f32<P>(__double2float_rn(x));
}
template <> __device__ __forceinline__ float round_to<float>(double x) { return __double2float_rn(x); }

struct PerturbCoef {
    double c;    // ρ/(norm + 1e-12)
    double cs;   // c·s
    float cs32;  // the same, rounded once to f32 (SAM)
    float s;     // inverse loss scale
    float eta;
};

// A finite θ written as ±inf (or NaN): an overflow of θ + ε.
template <typename P> __device__ __forceinline__ bool overflowed(float theta, P out) {
    return isfinite(theta) && !isfinite(to_f32(out));
}

// θ + ε of one element, with w formed in A (f32 or f64). SAM in f32 is one fma
// with cs32; in f64 (A = double) c·s is used unrounded. With finite inputs only
// an f32 intermediate can overflow; the element is then computed again in f64.
template <typename P, int GEOM, typename A>
__device__ __forceinline__ P perturb_one(float theta, float g, const PerturbCoef& k) {
    if constexpr (GEOM == TRAM_GEOMETRY_SAM) {
        if constexpr (sizeof(A) == 4) return from_f32<P>(fmaf(k.cs32, g, theta));
        else return round_to<P>((double)theta + k.cs * (double)g);
    } else {
        const A th = (A)theta;
        A e;
        if constexpr (GEOM == TRAM_GEOMETRY_ADAPTIVE) {
            const A a = (th < 0 ? -th : th) + (A)k.eta;  // (|θ| + η)² · s·g, s folded into cs
            e = (A)k.cs * (a * a * (A)g);
        } else {
            const A x = (A)k.s * (A)g;  // s·g / (1 + η (s·g)²)
            if constexpr (sizeof(A) == 4) {
                // Past |x| = 2^32 the f32 square would overflow (to w = 0):
                // there w = 1/(1/x + η x), the same number, with no overflow.
                A w;
                if (fabsf(x) < 4294967296.0f) w = x / ((A)1 + (A)k.eta * x * x);
                else w = (A)1 / ((A)1 / x + (A)k.eta * x);
                e = (A)k.c * w;
            } else {
                e = (A)k.c * (x / ((A)1 + (A)k.eta * x * x));
            }
        }
        return round_to<P>(th + e);
    }
}

// One chunk: out = θ + ε (and save = θ when SAVE), θ of type TH; sets ovf when
// a finite θ of this thread was written as ±inf.
template <typename TH, typename G, typename P, int GEOM, typename A, bool SAVE>
__device__ __forceinline__ void perturb_chunk(const TH* th, const G* g, P* out, P* save,
                                              MtSpan span, const PerturbCoef& k, bool& ovf) {
    constexpr int V = MtWidth<TH, typename MtWidth<G, P>::Narrow>::V;
    const int head = mt_vector_head<V>((uint64_t)th, sizeof(TH), (uint64_t)g, sizeof(G),
                                       (uint64_t)out, sizeof(P), (uint64_t)save, sizeof(P));
    const MtSplit split = mt_split<V>(span, head);

    auto scalar = [&](uint64_t i) {
        const TH t = th[i];
        if constexpr (SAVE) save[i] = t;
        const P r = perturb_one<P, GEOM, A>(to_f32(t), to_f32(g[i]), k);
        ovf |= overflowed(to_f32(t), r);
        out[i] = r;
    };
    for (uint64_t i = span.begin + threadIdx.x; i < split.vbegin; i += blockDim.x) scalar(i);
    for (uint64_t i = split.vend + threadIdx.x; i < span.end; i += blockDim.x) scalar(i);

    auto apply = [&](uint64_t o, const MtVec<TH, V>& tv, const MtVec<G, V>& gv) {
        if constexpr (SAVE) mt_store<P, V>(save + split.vbegin + o, tv);
        MtVec<P, V> r;
#pragma unroll
        for (int j = 0; j < V; ++j) {
            r.v[j] = perturb_one<P, GEOM, A>(to_f32(tv.v[j]), to_f32(gv.v[j]), k);
            ovf |= overflowed(to_f32(tv.v[j]), r.v[j]);
        }
        mt_store<P, V>(out + split.vbegin + o, r);
    };
    const TH* tb = th + split.vbegin;
    const G* gb = g + split.vbegin;
    // One vector per thread per step: with ~1000 threads per SM that already keeps
    // 32-48 KB of loads in flight, and a second vector costs spills on f64 paths.
    for (uint32_t i = threadIdx.x; i < split.nvec; i += blockDim.x) {
        const uint64_t o = (uint64_t)i * V;
        apply(o, mt_load<TH, V>(tb + o), mt_load<G, V>(gb + o));
    }
}

// wide: SAM in f64 for the whole launch (c·s is not a normal f32).
template <typename TH, typename G, typename P, bool SAVE>
__device__ __forceinline__ void perturb_dispatch(uint32_t geometry, bool wide, const TH* th,
                                                 const G* g, P* out, P* save, MtSpan span,
                                                 const PerturbCoef& k, bool& ovf) {
    typedef typename PerturbAcc<P>::type A;
    if (geometry == TRAM_GEOMETRY_ADAPTIVE) {
        if (wide)
            perturb_chunk<TH, G, P, TRAM_GEOMETRY_ADAPTIVE, double, SAVE>(th, g, out, save, span, k, ovf);
        else
            perturb_chunk<TH, G, P, TRAM_GEOMETRY_ADAPTIVE, A, SAVE>(th, g, out, save, span, k, ovf);
    } else if (geometry == TRAM_GEOMETRY_FISHER) {
        perturb_chunk<TH, G, P, TRAM_GEOMETRY_FISHER, A, SAVE>(th, g, out, save, span, k, ovf);
    } else if (wide) {
        perturb_chunk<TH, G, P, TRAM_GEOMETRY_SAM, double, SAVE>(th, g, out, save, span, k, ovf);
    } else {
        perturb_chunk<TH, G, P, TRAM_GEOMETRY_SAM, float, SAVE>(th, g, out, save, span, k, ovf);
    }
}

// A coefficient f32 can carry: 0, or a normal number (a subnormal one would
// lose digits, an infinite one overflow every product).
__device__ __forceinline__ bool f32_coef_ok(double c) {
    const float f = fabsf((float)c);
    return f == 0.0f || (f >= 1.17549435e-38f && f <= 3.40282347e38f);
}

// radius_kind: RADIUS_FIXED (ρ = r) or trust region (ρ = r·*divergence), where r is
// *radius_dev when given (device memory, so a replayed graph sees the value the
// host last wrote there) and the by-value `radius` otherwise (frozen into a graph).
// The inverse scale likewise: *inv_scale_dev when given, else `inv_scale_arg`.
// scratch: two words, zero on entry and left zero (a ticket and an overflow count).
template <typename P, typename G, int MODE>
__device__ void perturb(const MtTensor* tensors, const MtChunk* chunks, const uint32_t* n_chunks,
                        uint32_t geometry, float eta, float inv_scale_arg, uint32_t radius_kind,
                        float radius, const float* radius_dev, const float* divergence,
                        NormState* state, uint32_t* scratch, const float* inv_scale_dev) {
    const float inv_scale = inv_scale_dev != nullptr ? *inv_scale_dev : inv_scale_arg;
    __shared__ double s_c, s_norm;
    __shared__ uint32_t s_status;
    if (threadIdx.x == 0) {
        // sum_sq, not norm: a sharded caller all-reduces sum_sq alone.
        const double sum_sq = state->sum_sq;
        const double norm = sqrt(sum_sq);
        const double r = radius_dev != nullptr ? (double)*radius_dev : (double)radius;
        const double rho = radius_kind == RADIUS_FIXED ? r : r * (double)*divergence;
        uint32_t status = 0;
        if (!isfinite(norm)) status |= TRAM_STATUS_NONFINITE_GRAD;
        if (!isfinite(rho)) status |= TRAM_STATUS_NONFINITE_RADIUS;
        else if (rho < 0.0) status |= TRAM_STATUS_NEGATIVE_RADIUS;
        if (status == 0) status = norm == 0.0 ? TRAM_STATUS_ZERO_NORM : TRAM_STATUS_APPLIED;
        const double coef = status == TRAM_STATUS_APPLIED ? rho / (norm + TRAM_NORM_EPS) : 0.0;
        s_c = coef;
        s_norm = norm;
        s_status = status;
        if (blockIdx.x == 0) {
            // Other blocks read only sum_sq, which nobody writes here.
            state->norm = norm;
            state->rho = rho;
            state->coef = coef;
            // An applied step's status is written after every block's overflow check.
            if (status != TRAM_STATUS_APPLIED) state->status = status;
        }
    }
    __syncthreads();
    const bool applied = s_status == TRAM_STATUS_APPLIED;
    if (MODE == PERTURB_MASTER && !applied) return;  // the working copy stays as it is
    PerturbCoef k;
    k.c = s_c;
    k.cs = s_c * (double)inv_scale;
    k.cs32 = (float)k.cs;
    k.s = inv_scale;
    k.eta = eta;
    // SAM's f32 path multiplies by cs32.
    // f64 for the whole launch where f32 may not hold the numbers: SAM's cs32
    // is not a normal f32, or (adaptive, f16/bf16) the norm is past 2^60, so
    // that some (|θ|+η)·s·g may be too and (|θ|+η)²·g overflow an f32.
    const bool wide = !f32_coef_ok(k.cs) || !(s_norm < 1.152921504606846976e18);  // 2^60
    bool ovf = false;

    // Chunks of tensors with a gradient come first; out of place also walks
    // the others, whose output is θ itself.
    const uint32_t n = n_chunks[0];
    const uint32_t total = MODE == PERTURB_OUT_OF_PLACE ? n_chunks[1] : n;
    for (uint32_t c = blockIdx.x; c < total; c += gridDim.x) {
        const MtChunk ch = chunks[c];
        const MtTensor& t = tensors[ch.tensor];
        const MtSpan span = mt_span(t, ch);
        if (MODE == PERTURB_OUT_OF_PLACE && c >= n) {
            mt_copy_chunk<P>(reinterpret_cast<const P*>(t.ptr[MT_SLOT_PARAM]),
                             reinterpret_cast<P*>(t.ptr[MT_SLOT_OUT]), span);
            continue;
        }
        const G* g = reinterpret_cast<const G*>(t.ptr[MT_SLOT_GRAD]);
        if (MODE == PERTURB_MASTER) {
            const float* m = reinterpret_cast<const float*>(t.ptr[MT_SLOT_MASTER]);
            P* w = reinterpret_cast<P*>(t.ptr[MT_SLOT_PARAM]);
            perturb_dispatch<float, G, P, false>(geometry, wide, m, g, w, nullptr, span, k, ovf);
        } else {
            P* th = reinterpret_cast<P*>(t.ptr[MT_SLOT_PARAM]);
            P* dst = reinterpret_cast<P*>(t.ptr[MODE == PERTURB_IN_PLACE ? MT_SLOT_BACKUP : MT_SLOT_OUT]);
            if (!applied) {
                mt_copy_chunk<P>(th, dst, span);  // backup (in place) or θ itself (out of place)
            } else if (MODE == PERTURB_IN_PLACE) {
                perturb_dispatch<P, G, P, true>(geometry, wide, th, g, th, dst, span, k, ovf);
            } else {
                perturb_dispatch<P, G, P, false>(geometry, wide, th, g, dst, nullptr, span, k, ovf);
            }
        }
    }
    if (!applied) return;  // block 0 wrote the status; nothing can have overflowed

    // Every block, once: OR of its threads, counted; the last ticket writes the status.
    __shared__ bool last;
    const bool block_ovf = __syncthreads_or(ovf);
    if (threadIdx.x == 0) {
        if (block_ovf) atomicAdd(scratch + 1, 1u);
        __threadfence();  // the count is visible device-wide before the ticket is taken
        last = atomicAdd(scratch, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {
        __threadfence();  // ...and every other block's count is seen after it
        const uint32_t found = atomicAdd(scratch + 1, 0u);
        state->status = TRAM_STATUS_APPLIED | (found != 0u ? TRAM_STATUS_OVERFLOW : 0u);
        scratch[0] = 0u;  // ready for the next launch
        scratch[1] = 0u;
    }
}

#define PERTURB(MN, MODE, PN, GN, P, G)                                                          \
    extern "C" __global__ void __launch_bounds__(PERTURB_THREADS, 4) perturb_##MN##_##PN##_##GN(    \
        const MtTensor* tensors, const MtChunk* chunks, const uint32_t* n_chunks,               \
        uint32_t geometry, float eta, float inv_scale, uint32_t radius_kind, float radius,      \
        const float* radius_dev, const float* divergence, NormState* state, uint32_t* scratch,  \
        const float* inv_scale_dev) {                                                           \
        perturb<P, G, MODE>(tensors, chunks, n_chunks, geometry, eta, inv_scale, radius_kind,   \
                            radius, radius_dev, divergence, state, scratch, inv_scale_dev);     \
    }
#define PERTURB_MODES(PN, GN, P, G)                                \
    PERTURB(in_place, PERTURB_IN_PLACE, PN, GN, P, G)              \
    PERTURB(master, PERTURB_MASTER, PN, GN, P, G)                  \
    PERTURB(out_of_place, PERTURB_OUT_OF_PLACE, PN, GN, P, G)

PERTURB_MODES(f32, f32, float, float)
PERTURB_MODES(f16, f16, f16, f16)
PERTURB_MODES(bf16, bf16, bf16, bf16)
PERTURB_MODES(bf16, f32, bf16, float)
