// Fused KL divergence between two logit matrices: target a (giving P) and model
// b (giving Q), rows x vocab, any row strides. Forward KL(P||Q); reverse is the
// same kernels with a and b swapped by the launcher; symmetric keeps both sides.
//
// The loss is one pass over each input with the mergeable centred partials of
// src/cpu/kl_div.rs's module docs: per side (a, and b when symmetric) a running max
// M, a reference c (the logit difference at the argmax, in raw logit units),
// and S = sum w, A = sum w x, B = sum w phi(x) with w = e^(s - M), x = d - c
// (scaled by 1/tau) and phi(x) = expm1(-x) + x. Threads accumulate in f32 (the
// difference d in f64 for f32 inputs: exact while a and b lie within ~29
// binades of each other, see the error bound in src/cuda/kl_div.rs); warp,
// block and multi-block merges run in f64 in a fixed order, so results are
// bit-identical run to run.
//
// Launches: (1) kl_div_partials_*: one block per (row, chunk); with one chunk
// per row the block finalises its row, else it writes a partial. (2)
// kl_div_finish: one block merges partials per row (fixed order), writes the
// per-row stats and reduces the rows in a fixed tree in f64 to the device
// scalar. (3) kl_div_grad_*, optional: re-reads a and b once with the per-row
// stats and writes the gradients.
#include "common.cuh"

#define KL_THREADS 256
#define KL_FINISH_THREADS 256
// Resident partial blocks per SM the register budget is set for (85 registers
// at most). Mirrored by BLOCKS_PER_SM in src/cuda/kl_div.rs.
#define KL_PARTIAL_BLOCKS_PER_SM 3

// Row flags. Mirrored in src/cuda/kl_div.rs.
#define KL_NAN 1u     // NaN or +inf logit in the row
#define KL_INF_F 2u   // a finite where b = -inf: KL(P||Q) = +inf
#define KL_INF_R 4u   // b finite where a = -inf: KL(Q||P) = +inf
#define KL_MASKED 8u

// Mirrors `Reduction` in src/config.rs.
#define KL_RED_NONE 0
#define KL_RED_SUM 1
#define KL_RED_MEAN_ROWS 2
#define KL_RED_MEAN_ELEMENTS 3

// One side's merge state, in f64. c is in raw (unscaled) logit units.
// Orphans (a = -inf, b finite: no P mass but Q mass) are kept apart as an
// online sum O at max Mo of b/tau: each adds w e^-x = e^(b/tau - M + c/tau) to
// B, which only a reference can express, so they join B at the end.
struct KlSide {
    double S, A, B, c, O;
    float M, Mo;
};

// A block's partial of one row (multi-block rows only).
struct KlPartial {
    KlSide a, b;
    unsigned flags;
    unsigned pad;
};

// What the gradient pass needs of a row, and the row's value. Mirrored in
// src/cuda/kl_div.rs (`RowStats`), 64 bytes.
struct KlRowStats {
    double c_f, c_r;  // references of x = (d - c_f)/tau and y = (-d - c_r)/tau
    double kl;        // the row's divergence; 0 when masked
    float Ma, logSa, Mb, logSb;
    float alpha_f, L_f, alpha_r, L_r;  // log(p/q) = x + L_f; alpha_f = P-mean of x
    unsigned flags;
    unsigned pad;
};

static_assert(sizeof(KlSide) == 48, "KlSide layout");
static_assert(sizeof(KlPartial) == 104, "KlPartial layout");
static_assert(sizeof(KlRowStats) == 64, "KlRowStats layout");

// The logit difference is formed in this type: exact for f32 inputs in f64;
// for f16/bf16 the f32 difference is already exact.
template <typename T> struct Wide { typedef float type; };
template <> struct Wide<float> { typedef double type; };

// phi(x) = expm1(-x) + x for |x| < 0.5, where the library form cancels.
// Truncation after x^9: below 3e-9 relative.
__device__ __forceinline__ float phi_series(float x) {
    float p = -1.f / 362880.f;
    p = fmaf(p, x, 1.f / 40320.f);
    p = fmaf(p, x, -1.f / 5040.f);
    p = fmaf(p, x, 1.f / 720.f);
    p = fmaf(p, x, -1.f / 120.f);
    p = fmaf(p, x, 1.f / 24.f);
    p = fmaf(p, x, -1.f / 6.f);
    p = fmaf(p, x, 0.5f);
    return x * x * p;
}

__device__ __forceinline__ double phi_d(double x) {
    if (fabs(x) < 0.125) {
        // Truncation after x^10: below 1e-16 relative.
        double p = 1.0 / 3628800.0;
        p = fma(p, x, -1.0 / 362880.0);
        p = fma(p, x, 1.0 / 40320.0);
        p = fma(p, x, -1.0 / 5040.0);
        p = fma(p, x, 1.0 / 720.0);
        p = fma(p, x, -1.0 / 120.0);
        p = fma(p, x, 1.0 / 24.0);
        p = fma(p, x, -1.0 / 6.0);
        p = fma(p, x, 0.5);
        return x * x * p;
    }
    return expm1(-x) + x;
}

// w * phi(x) with w = e^la. Away from 0 as one exponent, e^(la - x) - w + w x,
// so a negligible weight times a huge e^-x is never 0 * inf.
__device__ __forceinline__ float wphi(float w, float la, float x) {
    if (fabsf(x) < 0.5f) return w * phi_series(x);
    return expf(la - x) - w + w * x;
}

// Per-thread side, f32 sums.
template <typename D> struct TSide {
    float M, S, A, B;
    float Mo, O;  // orphans (forward only)
    D c;
};

template <typename D> __device__ __forceinline__ void tside_init(TSide<D>& s) {
    s.M = -INFINITY;
    s.S = 0.f;
    s.A = 0.f;
    s.B = 0.f;
    s.Mo = -INFINITY;
    s.O = 0.f;
    s.c = (D)0;
}

// Raise the running max to newM and move the reference to newc.
template <typename D>
__device__ __forceinline__ void tside_rebase(TSide<D>& s, float newM, D newc, float inv_tau) {
    if (s.S == 0.f) {  // nothing accumulated yet (then A = B = 0 too)
        s.M = newM;
        s.c = newc;
        return;
    }
    float r = expf(s.M - newM);
    s.S *= r;
    s.A *= r;
    s.B *= r;
    s.M = newM;
    float sh = (float)(newc - s.c) * inv_tau;
    s.c = newc;
    if (sh != 0.f) {
        // x -> x - sh: A' = A - sh S, B' = e^sh B - expm1(sh) A + S phi(-sh).
        float em = expm1f(sh);
        float ph = fabsf(sh) < 0.5f ? phi_series(-sh) : em - sh;
        s.B = (em + 1.f) * s.B - em * s.A + s.S * ph;
        s.A = fmaf(-sh, s.S, s.A);
    }
}

template <typename T> struct ThreadAcc {
    typedef typename Wide<T>::type D;
    TSide<D> a, b;  // b: only M, S unless symmetric
    unsigned flags;
};

// Accumulate N elements (raw logits, already converted to f32).
template <typename T, bool SYM, int N>
__device__ __forceinline__ void accumulate(ThreadAcc<T>& t, const float (&ra)[N], const float (&rb)[N],
                                           float inv_tau) {
    typedef typename Wide<T>::type D;
    float sa[N], sb[N];
    float ma = -INFINITY, mb = -INFINITY;
#pragma unroll
    for (int i = 0; i < N; i++) {
        sa[i] = ra[i] * inv_tau;
        sb[i] = rb[i] * inv_tau;
        ma = fmaxf(ma, sa[i]);  // fmaxf skips NaN; NaN is flagged below
        mb = fmaxf(mb, sb[i]);
        if (!(ra[i] < INFINITY) || !(rb[i] < INFINITY)) t.flags |= KL_NAN;
    }
    if (ma > t.a.M) {
        // The reference moves to the new argmax (first one in the batch).
        D ck = (D)0;
        bool found = false;
#pragma unroll
        for (int i = 0; i < N; i++) {
            if (!found && sa[i] == ma) {
                found = true;
                ck = rb[i] > -INFINITY ? (D)ra[i] - (D)rb[i] : (D)0;
            }
        }
        tside_rebase(t.a, ma, ck, inv_tau);
    }
    if (mb > t.b.M) {
        if (SYM) {
            D ck = (D)0;
            bool found = false;
#pragma unroll
            for (int i = 0; i < N; i++) {
                if (!found && sb[i] == mb) {
                    found = true;
                    ck = ra[i] > -INFINITY ? (D)rb[i] - (D)ra[i] : (D)0;
                }
            }
            tside_rebase(t.b, mb, ck, inv_tau);
        } else {
            t.b.S *= expf(t.b.M - mb);
            t.b.M = mb;
        }
    }
#pragma unroll
    for (int i = 0; i < N; i++) {
        bool fa = sa[i] > -INFINITY, fb = sb[i] > -INFINITY;
        float la = sa[i] - t.a.M, lb = sb[i] - t.b.M;
        float wa = fa ? expf(la) : 0.f;
        float wb = fb ? expf(lb) : 0.f;
        t.a.S += wa;
        t.b.S += wb;
        if (fa && fb) {
            D d = (D)ra[i] - (D)rb[i];
            float x = (float)(d - t.a.c) * inv_tau;
            t.a.A = fmaf(wa, x, t.a.A);
            t.a.B += wphi(wa, la, x);
            if (SYM) {
                float y = (float)(-d - t.b.c) * inv_tau;
                t.b.A = fmaf(wb, y, t.b.A);
                t.b.B += wphi(wb, lb, y);
            }
        } else {
            if (fa) t.flags |= KL_INF_F;
            if (fb) {
                // Symmetric: KL(Q||P) is infinite. Forward: an orphan.
                t.flags |= KL_INF_R;
                if (!SYM) {
                    if (sb[i] > t.a.Mo) {
                        t.a.O *= expf(t.a.Mo - sb[i]);
                        t.a.Mo = sb[i];
                    }
                    t.a.O += expf(sb[i] - t.a.Mo);
                }
            }
        }
    }
}

// x <- x merged with y (x first in the fixed order). The partial with the larger
// max keeps its reference (ties: x); the other is rescaled and re-referenced.
__device__ __forceinline__ void side_merge(KlSide& x, const KlSide& y, double inv_tau) {
    if (y.O > 0.0) {
        if (!(x.O > 0.0)) {
            x.O = y.O;
            x.Mo = y.Mo;
        } else {
            const float m = fmaxf(x.Mo, y.Mo);
            x.O = x.O * exp((double)x.Mo - (double)m) + y.O * exp((double)y.Mo - (double)m);
            x.Mo = m;
        }
    }
    if (!(y.S > 0.0)) return;
    if (!(x.S > 0.0)) {
        x.S = y.S;
        x.A = y.A;
        x.B = y.B;
        x.c = y.c;
        x.M = y.M;
        return;
    }
    // Field-wise selects: a conditional reference would put both in local memory.
    const bool swap = y.M > x.M;
    const float hM = swap ? y.M : x.M, lM = swap ? x.M : y.M;
    const double hS = swap ? y.S : x.S, hA = swap ? y.A : x.A, hB = swap ? y.B : x.B, hc = swap ? y.c : x.c;
    const double lS = swap ? x.S : y.S, lA = swap ? x.A : y.A, lB = swap ? x.B : y.B, lc = swap ? x.c : y.c;
    double r = exp((double)lM - (double)hM);
    double S = lS * r, A = lA * r, B = lB * r;
    double sh = (hc - lc) * inv_tau;
    if (sh != 0.0 && S > 0.0) {
        B = exp(sh) * B - expm1(sh) * A + S * phi_d(-sh);
        A = A - sh * S;
    }
    x.S = hS + S;
    x.A = hA + A;
    x.B = hB + B;
    x.c = hc;
    x.M = hM;
}

__device__ __forceinline__ KlSide shfl_side(const KlSide& s, int off) {
    KlSide o;
    o.S = __shfl_down_sync(0xffffffffu, s.S, off);
    o.A = __shfl_down_sync(0xffffffffu, s.A, off);
    o.B = __shfl_down_sync(0xffffffffu, s.B, off);
    o.c = __shfl_down_sync(0xffffffffu, s.c, off);
    o.O = __shfl_down_sync(0xffffffffu, s.O, off);
    o.M = __shfl_down_sync(0xffffffffu, s.M, off);
    o.Mo = __shfl_down_sync(0xffffffffu, s.Mo, off);
    return o;
}

// One direction's divergence from the target side p (weights) and the other
// side's max and sum q. Also what the gradient needs: with x = (d - cref)/tau
// relative to the reference (an exact d at the argmax, so x = 0 there exactly),
// alpha = P-mean of x and L = KL - alpha, log(p/q) = x - alpha + KL = x + L.
__device__ __forceinline__ double finalize_dir(const KlSide& p, const KlSide& q, bool nan, bool inf, double inv_tau,
                          double& cref, float& alpha, float& L) {
    cref = p.c;
    alpha = 0.f;
    L = 0.f;
    if (nan || !(p.S > 0.0)) return (double)NAN;
    if (inf) return (double)INFINITY;
    double B0 = p.B;
    if (p.O > 0.0) B0 += p.O * exp((double)p.Mo - (double)p.M + p.c * inv_tau);
    // Move the reference onto the P-mean of x so that alpha ~ 0.
    double a0 = p.A / p.S;
    alpha = (float)a0;
    double A = p.A - a0 * p.S;
    double B = exp(a0) * B0 - expm1(a0) * p.A + p.S * phi_d(-a0);
    double al = A / p.S, be = B / p.S;
    double lc = log1p(be - al);
    double kl = al + lc;
    if (isfinite(B) && kl <= 1.0) {
        L = (float)((al - a0) + lc);
        return kl < 0.0 ? 0.0 : kl;  // a rounding-level negative is 0
    }
    // Wildly different rows: the classical sum p d - lse_p + lse_q, whose
    // error (eps |lse|) is negligible against a divergence this large.
    double lse_p = (double)p.M + log(p.S), lse_q = (double)q.M + log(q.S);
    double l = p.c * inv_tau - lse_p + lse_q;
    L = (float)l;
    kl = a0 + l;
    return kl < 0.0 ? 0.0 : kl;
}

__device__ __forceinline__ void finalize_row(const KlSide& a, const KlSide& b, unsigned flags, bool sym, double inv_tau,
                             KlRowStats& st) {
    bool nan = (flags & KL_NAN) != 0;
    double kl = finalize_dir(a, b, nan, (flags & KL_INF_F) != 0, inv_tau, st.c_f, st.alpha_f, st.L_f);
    st.c_r = 0.0;
    st.alpha_r = 0.f;
    st.L_r = 0.f;
    if (sym) {
        double kr = finalize_dir(b, a, nan, (flags & KL_INF_R) != 0, inv_tau, st.c_r, st.alpha_r, st.L_r);
        kl = kl + kr;
    }
    st.kl = kl;
    st.Ma = a.M;
    st.logSa = (float)log(a.S);
    st.Mb = b.M;
    st.logSb = (float)log(b.S);
    st.flags = flags;
    st.pad = 0u;
}

__device__ __forceinline__ KlRowStats masked_stats() {
    KlRowStats st;
    st.c_f = st.c_r = 0.0;
    st.kl = 0.0;
    st.Ma = st.logSa = st.Mb = st.logSb = 0.f;
    st.alpha_f = st.L_f = st.alpha_r = st.L_r = 0.f;
    st.flags = KL_MASKED;
    st.pad = 0u;
    return st;
}

// 16-byte vectors of T, unpacked to f32.
template <typename T> struct Vec {
    static constexpr int N = 16 / sizeof(T);
};

template <typename T> __device__ __forceinline__ uint4 load_raw(const T* p) {
    return *reinterpret_cast<const uint4*>(p);
}

template <typename T> __device__ __forceinline__ void unpack(const uint4& u, float (&out)[Vec<T>::N]) {
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; i++) out[i] = to_f32(e[i]);
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[Vec<T>::N]) {
    unpack<T>(load_raw(p), out);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[Vec<T>::N]) {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; i++) e[i] = from_f32<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = u;
}

// Elements of [0, len) before the first 16-byte boundary of p, or -1 when
// the other pointers do not share p's offset within 16 bytes (scalar path).
__device__ __forceinline__ long long vec_head(const void* p, const void* q, const void* r, const void* s,
                                             long long len, int elem) {
    unsigned mp = (unsigned)((uintptr_t)p & 15u);
    if (((uintptr_t)q & 15u) != mp) return -1;
    if (r && ((uintptr_t)r & 15u) != mp) return -1;
    if (s && ((uintptr_t)s & 15u) != mp) return -1;
    if (mp % elem != 0) return -1;
    long long h = (long long)(((16u - mp) & 15u) / elem);
    return h < len ? h : len;
}

// ---------------------------------------------------------------------------
// Pass 1: per (row, chunk) block.
template <typename T, bool SYM>
__device__ void kl_partials(const T* __restrict__ a, long long a_stride, const T* __restrict__ b,
                            long long b_stride, const unsigned char* __restrict__ mask, long long vocab,
                            int bpr, long long chunk, float inv_tau, KlPartial* __restrict__ partials,
                            KlRowStats* __restrict__ stats) {
    typedef typename Wide<T>::type D;
    constexpr int N = Vec<T>::N;
    const long long row = (long long)blockIdx.x / bpr;
    const int part = (int)((long long)blockIdx.x % bpr);
    if (mask && mask[row] == 0) {
        if (bpr == 1 && threadIdx.x == 0) stats[row] = masked_stats();
        return;  // the finish kernel skips masked rows' partials
    }
    const long long start = (long long)part * chunk;
    long long end = start + chunk;
    if (end > vocab) end = vocab;
    const long long len = end > start ? end - start : 0;
    const T* pa = a + row * a_stride + start;
    const T* pb = b + row * b_stride + start;

    ThreadAcc<T> t;
    tside_init(t.a);
    tside_init(t.b);
    t.flags = 0u;

    const int tid = threadIdx.x;
    long long head = vec_head(pa, pb, nullptr, nullptr, len, (int)sizeof(T));
    long long nvec = 0;
    if (head < 0) {
        head = len;  // all scalar
    } else {
        nvec = (len - head) / N;
    }
    // Head (and the whole chunk on the scalar path), then vectors, then tail:
    // a fixed assignment of elements to threads.
    for (long long i = tid; i < head; i += KL_THREADS) {
        float ra[1] = {to_f32(pa[i])}, rb[1] = {to_f32(pb[i])};
        accumulate<T, SYM, 1>(t, ra, rb, inv_tau);
    }
    const T* va = pa + head;
    const T* vb = pb + head;
    // The next vector's loads are in flight while this one is accumulated.
    uint4 ua = {0u, 0u, 0u, 0u}, ub = ua;
    if (tid < nvec) {
        ua = load_raw(va + (long long)tid * N);
        ub = load_raw(vb + (long long)tid * N);
    }
    for (long long v = tid; v < nvec; v += KL_THREADS) {
        float ra[N], rb[N];
        unpack<T>(ua, ra);
        unpack<T>(ub, rb);
        if (v + KL_THREADS < nvec) {
            ua = load_raw(va + (v + KL_THREADS) * N);
            ub = load_raw(vb + (v + KL_THREADS) * N);
        }
        accumulate<T, SYM, N>(t, ra, rb, inv_tau);
    }
    for (long long i = head + nvec * N + tid; i < len; i += KL_THREADS) {
        float ra[1] = {to_f32(pa[i])}, rb[1] = {to_f32(pb[i])};
        accumulate<T, SYM, 1>(t, ra, rb, inv_tau);
    }

    // Thread -> warp -> block, in f64, fixed order.
    const double inv_tau_d = (double)inv_tau;
    KlSide sa, sb;
    sa.S = t.a.S; sa.A = t.a.A; sa.B = t.a.B; sa.c = (double)t.a.c; sa.O = t.a.O;
    sa.M = t.a.M; sa.Mo = t.a.Mo;
    sb.S = t.b.S; sb.A = t.b.A; sb.B = t.b.B; sb.c = (double)t.b.c; sb.O = 0.0;
    sb.M = t.b.M; sb.Mo = -INFINITY;
    unsigned flags = t.flags;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        KlSide oa = shfl_side(sa, off);
        side_merge(sa, oa, inv_tau_d);
        KlSide ob = shfl_side(sb, off);
        side_merge(sb, ob, inv_tau_d);
        flags |= __shfl_down_sync(0xffffffffu, flags, off);
    }
    constexpr int WARPS = KL_THREADS / 32;
    __shared__ KlSide sh_a[WARPS], sh_b[WARPS];
    __shared__ unsigned sh_f[WARPS];
    const int warp = tid / 32, lane = tid % 32;
    if (lane == 0) {
        sh_a[warp] = sa;
        sh_b[warp] = sb;
        sh_f[warp] = flags;
    }
    __syncthreads();
    if (warp != 0) return;
    KlSide empty;
    empty.S = empty.A = empty.B = empty.c = empty.O = 0.0;
    empty.M = empty.Mo = -INFINITY;
    sa = lane < WARPS ? sh_a[lane] : empty;
    sb = lane < WARPS ? sh_b[lane] : empty;
    flags = lane < WARPS ? sh_f[lane] : 0u;
#pragma unroll
    for (int off = WARPS / 2; off > 0; off >>= 1) {
        KlSide oa = shfl_side(sa, off);
        side_merge(sa, oa, inv_tau_d);
        KlSide ob = shfl_side(sb, off);
        side_merge(sb, ob, inv_tau_d);
        flags |= __shfl_down_sync(0xffffffffu, flags, off);
    }
    if (lane != 0) return;
    if (bpr == 1) {
        KlRowStats st;
        finalize_row(sa, sb, flags, SYM, inv_tau_d, st);
        stats[row] = st;
    } else {
        KlPartial p;
        p.a = sa;
        p.b = sb;
        p.flags = flags;
        p.pad = 0u;
        partials[row * bpr + part] = p;
    }
}

// ---------------------------------------------------------------------------
// Pass 1b: one block. Merges multi-block rows, writes per-row values, reduces.
// scalars: [0] value (f64), [1] unmasked rows, [2] the reduction's scale.
extern "C" __global__ void __launch_bounds__(KL_FINISH_THREADS, 1)
    kl_div_finish(const KlPartial* __restrict__ partials, KlRowStats* __restrict__ stats,
                  const unsigned char* __restrict__ mask, long long rows, long long vocab, int bpr, int sym,
                  float inv_tau, int reduction, double* __restrict__ scalars, float* __restrict__ value_out,
                  float* __restrict__ per_row_out) {
    const double inv_tau_d = (double)inv_tau;
    double sum = 0.0;
    unsigned long long n = 0;
    for (long long r = threadIdx.x; r < rows; r += KL_FINISH_THREADS) {
        double kl = 0.0;
        if (mask && mask[r] == 0) {
            if (bpr > 1) stats[r] = masked_stats();
        } else {
            if (bpr > 1) {
                const KlPartial* p = partials + r * bpr;
                KlSide sa = p[0].a, sb = p[0].b;
                unsigned flags = p[0].flags;
                for (int k = 1; k < bpr; k++) {
                    side_merge(sa, p[k].a, inv_tau_d);
                    side_merge(sb, p[k].b, inv_tau_d);
                    flags |= p[k].flags;
                }
                KlRowStats st;
                finalize_row(sa, sb, flags, sym != 0, inv_tau_d, st);
                stats[r] = st;
                kl = st.kl;
            } else {
                kl = stats[r].kl;
            }
            n++;
        }
        if (per_row_out) per_row_out[r] = (float)kl;
        sum += kl;
    }
    __shared__ double sh_sum[KL_FINISH_THREADS];
    __shared__ unsigned long long sh_n[KL_FINISH_THREADS];
    sh_sum[threadIdx.x] = sum;
    sh_n[threadIdx.x] = n;
    __syncthreads();
    for (int s = KL_FINISH_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) {
            sh_sum[threadIdx.x] += sh_sum[threadIdx.x + s];
            sh_n[threadIdx.x] += sh_n[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    double total = sh_sum[0];
    double nu = (double)sh_n[0];
    double scale = 1.0;
    if (reduction == KL_RED_MEAN_ROWS) scale = nu > 0.0 ? 1.0 / nu : 0.0;
    if (reduction == KL_RED_MEAN_ELEMENTS) scale = nu > 0.0 ? 1.0 / (nu * (double)vocab) : 0.0;
    double value;
    if (reduction == KL_RED_MEAN_ROWS) {
        value = nu > 0.0 ? total / nu : 0.0;
    } else if (reduction == KL_RED_MEAN_ELEMENTS) {
        value = nu > 0.0 ? total / (nu * (double)vocab) : 0.0;
    } else {
        value = total;
    }
    scalars[0] = value;
    scalars[1] = nu;
    scalars[2] = scale;
    scalars[3] = 0.0;
    if (value_out) value_out[0] = (float)value;
}

// ---------------------------------------------------------------------------
// Pass 2: gradients. ga = dL/da, gb = dL/db (either may be null), dtype T.
// An output may be its own input (in place): each element is read, then
// written, by one thread, so a and b carry no __restrict__ here.
template <typename T> struct GradRow {
    typedef typename Wide<T>::type D;
    D c_f, c_r;
    float Ma, logSa, Mb, logSb, alpha_f, L_f, alpha_r, L_r;
    float inv_tau, scale;
};

template <typename T, bool SYM>
__device__ __forceinline__ void grad_elem(const GradRow<T>& g, float ra, float rb, float& ga, float& gb) {
    typedef typename Wide<T>::type D;
    float sa = ra * g.inv_tau, sb = rb * g.inv_tau;
    bool fa = sa > -INFINITY, fb = sb > -INFINITY;
    if (fa && fb) {
        D d = (D)ra - (D)rb;
        float x = (float)(d - g.c_f) * g.inv_tau;
        float lp = sa - g.Ma - g.logSa;  // log p
        float p = expf(lp);
        float t = -x - g.L_f;            // log q - log p
        // q - p without two separately rounded softmaxes.
        float qmp = t > 0.5f ? expf(lp + t) - p : p * expm1f(t);
        float a_ = p * (x - g.alpha_f);
        float b_ = qmp;
        if (SYM) {
            float y = (float)(-d - g.c_r) * g.inv_tau;
            float q = expf(sb - g.Mb - g.logSb);
            a_ -= qmp;
            b_ = fmaf(q, y - g.alpha_r, qmp);
        }
        ga = a_ * g.scale;
        gb = b_ * g.scale;
    } else if (fb) {
        // p = 0 (only reachable forward: symmetric rows with it are infinite).
        ga = 0.f;
        gb = expf(sb - g.Mb - g.logSb) * g.scale;
    } else {
        ga = 0.f;
        gb = 0.f;
    }
}

template <typename T, bool SYM>
__device__ void kl_grad(const T* a, long long a_stride, const T* b, long long b_stride,
                        const unsigned char* __restrict__ mask, long long vocab, int bpr, long long chunk,
                        float inv_tau, const KlRowStats* __restrict__ stats, const double* __restrict__ scalars,
                        float upstream, const float* __restrict__ upstream_dev, T* ga, long long ga_stride, T* gb,
                        long long gb_stride) {
    constexpr int N = Vec<T>::N;
    const long long row = (long long)blockIdx.x / bpr;
    const int part = (int)((long long)blockIdx.x % bpr);
    const long long start = (long long)part * chunk;
    long long end = start + chunk;
    if (end > vocab) end = vocab;
    const long long len = end > start ? end - start : 0;
    const T* pa = a + row * a_stride + start;
    const T* pb = b + row * b_stride + start;
    T* qa = ga ? ga + row * ga_stride + start : nullptr;
    T* qb = gb ? gb + row * gb_stride + start : nullptr;
    const int tid = threadIdx.x;

    const KlRowStats st = stats[row];
    // Masked rows get zeros; rows with an infinite or NaN divergence get NaN.
    const bool masked = (mask && mask[row] == 0) || (st.flags & KL_MASKED);
    const bool bad = !masked && !isfinite(st.kl);
    if (masked || bad) {
        const T fill = from_f32<T>(masked ? 0.f : NAN);
        for (long long i = tid; i < len; i += KL_THREADS) {
            if (qa) qa[i] = fill;
            if (qb) qb[i] = fill;
        }
        return;
    }
    GradRow<T> g;
    g.c_f = (typename Wide<T>::type)st.c_f;
    g.c_r = (typename Wide<T>::type)st.c_r;
    g.Ma = st.Ma; g.logSa = st.logSa; g.Mb = st.Mb; g.logSb = st.logSb;
    g.alpha_f = st.alpha_f; g.L_f = st.L_f; g.alpha_r = st.alpha_r; g.L_r = st.L_r;
    g.inv_tau = inv_tau;
    double up = (double)upstream * (upstream_dev ? (double)upstream_dev[0] : 1.0);
    g.scale = (float)(scalars[2] * up * (double)inv_tau);

    long long head = vec_head(pa, pb, qa, qb, len, (int)sizeof(T));
    long long nvec = 0;
    if (head < 0) {
        head = len;
    } else {
        nvec = (len - head) / N;
    }
    for (long long i = tid; i < head; i += KL_THREADS) {
        float x, y;
        grad_elem<T, SYM>(g, to_f32(pa[i]), to_f32(pb[i]), x, y);
        if (qa) qa[i] = from_f32<T>(x);
        if (qb) qb[i] = from_f32<T>(y);
    }
    for (long long v = tid; v < nvec; v += KL_THREADS) {
        const long long o = head + v * N;
        float ra[N], rb[N], xa[N], xb[N];
        load_vec<T>(pa + o, ra);
        load_vec<T>(pb + o, rb);
#pragma unroll
        for (int i = 0; i < N; i++) grad_elem<T, SYM>(g, ra[i], rb[i], xa[i], xb[i]);
        if (qa) store_vec<T>(qa + o, xa);
        if (qb) store_vec<T>(qb + o, xb);
    }
    for (long long i = head + nvec * N + tid; i < len; i += KL_THREADS) {
        float x, y;
        grad_elem<T, SYM>(g, to_f32(pa[i]), to_f32(pb[i]), x, y);
        if (qa) qa[i] = from_f32<T>(x);
        if (qb) qb[i] = from_f32<T>(y);
    }
}

#define KL_INSTANTIATE(T, NAME, SYM, DIR)                                                                      \
    extern "C" __global__ void __launch_bounds__(KL_THREADS, KL_PARTIAL_BLOCKS_PER_SM)                          \
        kl_div_partials_##DIR##_##NAME(const T* a, long long a_stride, const T* b, long long b_stride,          \
                                       const unsigned char* mask, long long vocab, int bpr, long long chunk,   \
                                       float inv_tau, KlPartial* partials, KlRowStats* stats) {                \
        kl_partials<T, SYM>(a, a_stride, b, b_stride, mask, vocab, bpr, chunk, inv_tau, partials, stats);      \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(KL_THREADS) kl_div_grad_##DIR##_##NAME(                        \
        const T* a, long long a_stride, const T* b, long long b_stride, const unsigned char* mask,              \
        long long vocab, int bpr, long long chunk, float inv_tau, const KlRowStats* stats,                     \
        const double* scalars, float upstream, const float* upstream_dev, T* ga, long long ga_stride, T* gb,   \
        long long gb_stride) {                                                                                 \
        kl_grad<T, SYM>(a, a_stride, b, b_stride, mask, vocab, bpr, chunk, inv_tau, stats, scalars, upstream,  \
                        upstream_dev, ga, ga_stride, gb, gb_stride);                                           \
    }

KL_INSTANTIATE(float, f32, false, fwd)
KL_INSTANTIATE(float, f32, true, sym)
KL_INSTANTIATE(f16, f16, false, fwd)
KL_INSTANTIATE(f16, f16, true, sym)
KL_INSTANTIATE(bf16, bf16, false, fwd)
KL_INSTANTIATE(bf16, bf16, true, sym)
