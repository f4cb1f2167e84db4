// TRAM's second step: restore θ and apply the base optimizer (AdamW or SGD with
// momentum) in one pass over every tensor of a group, one launch.
//
// θ is read from the backup (or the f32 master), never from the perturbed
// parameters, so the restore is free: AdamW moves backup, g, m, v in and θ, m, v
// out (28 bytes per f32 parameter, the cost of a plain AdamW step).
//
// Arithmetic is f64 with explicitly rounded intrinsics (no contraction into
// FMA), in the order of `Scalars::apply` in src/cpu/optimizer.rs: both backends
// store the same bits for finite values (a NaN comes out as the GPU's canonical
// NaN, where the CPU keeps the input's payload). The kernel stays memory-bound
// on H100/H200-class FP64.
//
// TRAM-θ's target upkeep can ride along (the `_ema_<t>` kernels): with the new
// θ in registers, θ̄ ← λ·θ̄ + (1−λ)·θ costs only θ̄'s read and write (8 more
// bytes per f32 parameter instead of a 12-byte second pass), with the
// operations of kernels/ema.cu so the bits match the separate launch. λ is a
// launch argument (fixed configuration); λ = 1 launches the plain kernel.
//
// Per-step values live in device memory so a captured CUDA graph replays
// correctly: the host rewrites `OptHyper` (learning rate, inverse loss
// scale...) with an async copy, and `optimizer_advance` (or, in a TRAM step,
// `optimizer_begin`) bumps the step count and β powers on the device.
//
// Gradients are unscaled as s·g with s = OptHyper::inv_scale (1/loss scale
// under AMP, else 1), formed in f64, where the product of two f32 is exact.
//
// AMP in a TRAM step (src/cuda/step.rs): `optimizer_check` looks at every
// gradient first (one more read of g: 4 B/param for f32 gradients, 2 for
// f16/bf16) and raises StepState::found_inf where s·g is inf, NaN or at least
// 2^64; `optimizer_begin` decides from it, from the first step's status and
// from the phase whether the update runs; the update kernel then either
// restores θ only (skip: m, v, the step count and the target untouched, as
// GradScaler skips optimizer.step()) or restores and updates.
#include "multi_tensor.cuh"
#include "step.cuh"

// Mirrors `hyper_block` in src/cuda/optimizer.rs (8 floats).
struct OptHyper {
    float lr, weight_decay, beta1, beta2, eps, momentum, dampening, inv_scale;
};

// Mirrors `StepCounter` in src/config.rs.
struct OptCounter {
    unsigned long long t;
    double beta1_pow, beta2_pow;
};

// The group is a multi_tensor.cuh table: one MtTensor per tensor with these
// slots (mirrors `build` in src/cuda/optimizer.rs), and an MtChunk list.
#define OPT_SLOT_PARAM 0  // working parameters, written
#define OPT_SLOT_GRAD 1   // 0: no gradient this step (restore only)
#define OPT_SLOT_SRC 2    // backup (restore mode) or f32 master (master mode, also written)
#define OPT_SLOT_M 3      // f32 state; 0 where unused
#define OPT_SLOT_V 4
#define OPT_SLOT_DECAY 5  // not an address: 1 when weight decay applies

#define OPT_ADAMW 0
#define OPT_SGD 1

// t += 1 (saturating at 2^64 − 1, as StepCounter::advance) and βᵗ ← βᵗ·β.
__device__ __forceinline__ void advance(OptCounter* c, const OptHyper* h, uint32_t adamw) {
    if (c->t != ~0ull) c->t += 1;
    if (adamw) {
        c->beta1_pow = __dmul_rn(c->beta1_pow, (double)h->beta1);
        c->beta2_pow = __dmul_rn(c->beta2_pow, (double)h->beta2);
    }
}

extern "C" __global__ void optimizer_advance(OptCounter* c, const OptHyper* h, uint32_t adamw) {
    if (blockIdx.x == 0 && threadIdx.x == 0) advance(c, h, adamw);
}

// AMP's found-inf over the gradients of an update group (tensors whose
// gradient slot is 0 have none this step): s·g in f64 is exact, and an
// element counts when it is inf, NaN or |s·g| >= 2^64.
template <typename G>
__device__ __forceinline__ void optimizer_check(const MtTensor* __restrict__ tensors,
                                                const MtChunk* __restrict__ chunks,
                                                uint32_t n_chunks, const OptHyper* __restrict__ h,
                                                StepState* s) {
    const double scale = (double)h->inv_scale;
    bool bad = false;
    for (uint32_t k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        const MtChunk ch = chunks[k];
        const MtTensor t = tensors[ch.tensor];
        const G* grad = reinterpret_cast<const G*>(t.ptr[OPT_SLOT_GRAD]);
        if (grad == nullptr) continue;
        const MtSpan span = mt_span(t, ch);
        for (uint64_t i = span.begin + threadIdx.x; i < span.end; i += blockDim.x) {
            const double x = __dmul_rn(scale, (double)to_f32(grad[i]));
            bad |= !(fabs(x) < TRAM_GRAD_LIMIT);
        }
    }
    // Every block that found one raises the flag (an OR: the order of the
    // blocks does not matter); optimizer_begin clears it after reading it.
    if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(&s->found_inf, 1u);
}

#define OPT_CHECK(gn, G)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) optimizer_check_##gn(                  \
        const MtTensor* tensors, const MtChunk* chunks, uint32_t n_chunks, const OptHyper* h, \
        StepState* s) {                                                                      \
        optimizer_check<G>(tensors, chunks, n_chunks, h, s);                                 \
    }
OPT_CHECK(f32, float)
OPT_CHECK(bf16, bf16)
OPT_CHECK(f16, f16)

// The second step's gate (one thread), after optimizer_check: decides whether
// the update runs and where θ comes from, records it in the status, advances
// the step count unless skipped, and leaves the phase idle.
// expect_perturbed: 1 for TRAM's second step, 0 for a step without
// perturbation (which starts its iteration). θ comes from the backup exactly
// when the device phase says a first step perturbed it; a mismatch with what
// the host expected (only a replayed graph can make one) is PHASE_ERROR.
// The update is skipped when the first step's norm was not finite (its status
// in `first`, the parameter group's NormState) or a gradient of this step is.
extern "C" __global__ void optimizer_begin(OptCounter* c, const OptHyper* h, uint32_t adamw,
                                           StepState* s, const NormState* first,
                                           uint32_t expect_perturbed) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const bool perturbed = s->phase == TRAM_PHASE_PERTURBED;
    // The first step began the iteration (and its status) only if it ran.
    uint32_t status = expect_perturbed && perturbed ? s->status : 0u;
    if (perturbed != (expect_perturbed != 0u)) status |= TRAM_STEP_PHASE_ERROR;
    if (!perturbed) status |= TRAM_STEP_UNPERTURBED;
    if (perturbed && first != nullptr && (first->status & TRAM_STATUS_NONFINITE_GRAD) != 0u)
        status |= TRAM_STEP_FOUND_INF_FIRST;
    if (s->found_inf != 0u) status |= TRAM_STEP_FOUND_INF_SECOND;
    const bool skip = (status & (TRAM_STEP_FOUND_INF_FIRST | TRAM_STEP_FOUND_INF_SECOND)) != 0u;
    if (skip) status |= TRAM_STEP_SKIPPED;
    s->status = status;
    s->skip = skip ? 1u : 0u;
    s->restore = perturbed ? 1u : 0u;
    s->found_inf = 0u;
    s->phase = TRAM_PHASE_IDLE;
    if (!skip) advance(c, h, adamw);
}

// θ̄ ← λ·θ̄ + (1−λ)·x, as ema_update in kernels/ema.cu (x: the new θ as the
// separate EMA would read it back).
template <typename T>
__device__ __forceinline__ void ema_one(T* target, uint64_t i, float x, double l, double oml,
                                        bool copy) {
    if (copy) {
        target[i] = from_f32<T>(x);
    } else {
        const double y =
            __dadd_rn(__dmul_rn(l, (double)to_f32(target[i])), __dmul_rn(oml, (double)x));
        target[i] = from_f32<T>(__double2float_rn(y));
    }
}

// EMA: update θ̄ (type T) of tensor k at targets[k] from the new θ: the f32
// master when from_master (master mode), else the stored working copy.
// gate: a TRAM step's StepState (optimizer_begin's decision), or null: update,
// with θ from the backup slot (restore mode).
// The restore alone over one chunk: θ from `src` (the backup, or θ itself),
// or the working copy from the f32 master; with EMA the target follows it.
template <typename P, bool MASTER, bool EMA, typename T>
__device__ __forceinline__ void restore_chunk(P* param, uint64_t src, T* target, MtSpan span,
                                              bool ema_master, double l, double oml, bool copy) {
    if (!MASTER && !EMA && src == (uint64_t)param) return;  // θ is in place
    for (uint64_t i = span.begin + threadIdx.x; i < span.end; i += blockDim.x) {
        P p;
        float x;
        if (MASTER) {
            const float w = reinterpret_cast<const float*>(src)[i];
            p = from_f32<P>(w);
            x = ema_master ? w : to_f32(p);
        } else {
            p = reinterpret_cast<const P*>(src)[i];
            x = to_f32(p);
        }
        param[i] = p;
        if (EMA) ema_one<T>(target, i, x, l, oml, copy);
    }
}

// EMA: update θ̄ (type T) of tensor k at targets[k] from the new θ: the f32
// master when from_master (master mode), else the stored working copy.
// gate: a TRAM step's StepState (optimizer_begin's decision), or null: update,
// with θ from the backup slot (restore mode).
template <typename P, typename G, int OPT, bool MASTER, bool EMA, typename T>
__device__ __forceinline__ void optimizer_update(const MtTensor* __restrict__ tensors,
                                                 const MtChunk* __restrict__ chunks,
                                                 uint32_t n_chunks, const OptHyper* __restrict__ hp,
                                                 const OptCounter* __restrict__ cp,
                                                 uint32_t nesterov,
                                                 const uint64_t* __restrict__ targets,
                                                 float lambda, uint32_t from_master,
                                                 const StepState* __restrict__ gate) {
    // Restore mode: θ from the backup when perturbed in place, else from θ
    // itself. In a step (gate given) a tensor without a gradient was not
    // perturbed, and the perturbation wrote no backup for it.
    const bool from_backup = gate == nullptr || gate->restore != 0u;
    if (gate != nullptr && gate->skip != 0u) {
        // Skipped (found inf): the restore only; m, v and the targets untouched.
        for (uint32_t k = blockIdx.x; k < n_chunks; k += gridDim.x) {
            const MtChunk ch = chunks[k];
            const MtTensor t = tensors[ch.tensor];
            const bool restores = from_backup && t.ptr[OPT_SLOT_GRAD] != 0;
            const uint64_t src = MASTER || restores ? t.ptr[OPT_SLOT_SRC] : t.ptr[OPT_SLOT_PARAM];
            restore_chunk<P, MASTER, false, T>(reinterpret_cast<P*>(t.ptr[OPT_SLOT_PARAM]), src,
                                               nullptr, mt_span(t, ch), false, 0.0, 0.0, false);
        }
        return;
    }
    const OptHyper h = *hp;
    const OptCounter c = *cp;
    const float scale = h.inv_scale;  // widened per element: one register, not two
    const double lr = (double)h.lr;
    // AdamW's per-step constants (as Scalars::new).
    const double decay = __dsub_rn(1.0, __dmul_rn(lr, (double)h.weight_decay));
    const double b1 = (double)h.beta1, omb1 = __dsub_rn(1.0, b1);
    const double b2 = (double)h.beta2, omb2 = __dsub_rn(1.0, b2);
    const double step_size = __ddiv_rn(lr, __dsub_rn(1.0, c.beta1_pow));
    const double inv_sqrt_bc2 = __ddiv_rn(1.0, __dsqrt_rn(__dsub_rn(1.0, c.beta2_pow)));
    const double eps = (double)h.eps;
    // SGD's.
    const double mu = (double)h.momentum, omd = __dsub_rn(1.0, (double)h.dampening);
    const bool first = c.t == 1;
    // The EMA's constants (as ema.cu).
    const double l = (double)lambda, oml = __dsub_rn(1.0, l);
    const bool copy = lambda == 0.0f;
    const bool ema_master = MASTER && from_master != 0;

    for (uint32_t k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        const MtChunk ch = chunks[k];
        const MtTensor t = tensors[ch.tensor];
        const MtSpan span = mt_span(t, ch);
        const uint64_t begin = span.begin, end = span.end;
        P* param = reinterpret_cast<P*>(t.ptr[OPT_SLOT_PARAM]);
        const G* grad = reinterpret_cast<const G*>(t.ptr[OPT_SLOT_GRAD]);
        const bool restores = from_backup && (grad != nullptr || gate == nullptr);
        const uint64_t src = MASTER || restores ? t.ptr[OPT_SLOT_SRC] : t.ptr[OPT_SLOT_PARAM];
        T* target = EMA ? reinterpret_cast<T*>(targets[ch.tensor]) : nullptr;
        if (grad == nullptr) {
            // No gradient: only the restore; the target follows θ.
            restore_chunk<P, MASTER, EMA, T>(param, src, target, span, ema_master, l, oml, copy);
            continue;
        }
        const bool decays = t.ptr[OPT_SLOT_DECAY] != 0;
        float* m = reinterpret_cast<float*>(t.ptr[OPT_SLOT_M]);
        float* v = reinterpret_cast<float*>(t.ptr[OPT_SLOT_V]);
        const double wd = decays ? (double)h.weight_decay : 0.0;
        for (uint64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
            double theta = MASTER ? (double)reinterpret_cast<const float*>(src)[i]
                                  : (double)to_f32(reinterpret_cast<const P*>(src)[i]);
            const double g = __dmul_rn((double)scale, (double)to_f32(grad[i]));  // exact
            if (OPT == OPT_ADAMW) {
                if (decays) theta = __dmul_rn(theta, decay);
                const double m64 = __dadd_rn(__dmul_rn(b1, (double)m[i]), __dmul_rn(omb1, g));
                const double v64 =
                    __dadd_rn(__dmul_rn(b2, (double)v[i]), __dmul_rn(omb2, __dmul_rn(g, g)));
                const double denom = __dadd_rn(__dmul_rn(__dsqrt_rn(v64), inv_sqrt_bc2), eps);
                m[i] = __double2float_rn(m64);
                v[i] = __double2float_rn(v64);
                theta = __dsub_rn(theta, __dmul_rn(step_size, __ddiv_rn(m64, denom)));
            } else {
                const double gd = wd != 0.0 ? __dadd_rn(g, __dmul_rn(wd, theta)) : g;
                double d = gd;
                if (mu != 0.0) {
                    const double buf =
                        first ? gd : __dadd_rn(__dmul_rn(mu, (double)m[i]), __dmul_rn(omd, gd));
                    m[i] = __double2float_rn(buf);
                    d = nesterov ? __dadd_rn(gd, __dmul_rn(mu, buf)) : buf;
                }
                theta = __dsub_rn(theta, __dmul_rn(lr, d));
            }
            const float th = __double2float_rn(theta);
            if (MASTER) reinterpret_cast<float*>(src)[i] = th;
            const P p = from_f32<P>(th);
            param[i] = p;
            if (EMA) ema_one<T>(target, i, ema_master ? th : to_f32(p), l, oml, copy);
        }
    }
}

// __launch_bounds__(256, 4): at most 64 registers, met without spills; with
// the block size alone ptxas spilled in two SGD + EMA kernels.
#define OPT_KERNEL(name, P, G, OPT, MASTER)                                                      \
    extern "C" __global__ void __launch_bounds__(256, 4)                                        \
        name(const MtTensor* tensors, const MtChunk* chunks, uint32_t n_chunks,                 \
             const OptHyper* h, const OptCounter* c, uint32_t nesterov, const StepState* gate) { \
        optimizer_update<P, G, OPT, MASTER, false, float>(tensors, chunks, n_chunks, h, c,      \
                                                          nesterov, nullptr, 0.0f, 0, gate);    \
    }

#define OPT_EMA_KERNEL(name, P, G, OPT, MASTER, T)                                               \
    extern "C" __global__ void __launch_bounds__(256, 4)                                        \
        name(const MtTensor* tensors, const MtChunk* chunks, uint32_t n_chunks,                 \
             const OptHyper* h, const OptCounter* c, uint32_t nesterov,                         \
             const uint64_t* targets, float lambda, uint32_t from_master,                       \
             const StepState* gate) {                                                           \
        optimizer_update<P, G, OPT, MASTER, true, T>(tensors, chunks, n_chunks, h, c, nesterov, \
                                                     targets, lambda, from_master, gate);       \
    }

#define OPT_EMA_KERNELS(p, g, t, P, G, T)                                                      \
    OPT_EMA_KERNEL(optimizer_adamw_restore_##p##_##g##_ema_##t, P, G, OPT_ADAMW, false, T)     \
    OPT_EMA_KERNEL(optimizer_adamw_master_##p##_##g##_ema_##t, P, G, OPT_ADAMW, true, T)       \
    OPT_EMA_KERNEL(optimizer_sgd_restore_##p##_##g##_ema_##t, P, G, OPT_SGD, false, T)         \
    OPT_EMA_KERNEL(optimizer_sgd_master_##p##_##g##_ema_##t, P, G, OPT_SGD, true, T)

// Targets in f32 or in the parameter type.
#define OPT_KERNELS(p, g, P, G)                                                            \
    OPT_KERNEL(optimizer_adamw_restore_##p##_##g, P, G, OPT_ADAMW, false)                  \
    OPT_KERNEL(optimizer_adamw_master_##p##_##g, P, G, OPT_ADAMW, true)                    \
    OPT_KERNEL(optimizer_sgd_restore_##p##_##g, P, G, OPT_SGD, false)                      \
    OPT_KERNEL(optimizer_sgd_master_##p##_##g, P, G, OPT_SGD, true)                        \
    OPT_EMA_KERNELS(p, g, f32, P, G, float)
#define OPT_KERNELS_LOW(p, g, P, G) OPT_KERNELS(p, g, P, G) OPT_EMA_KERNELS(p, g, p, P, G, P)

OPT_KERNELS(f32, f32, float, float)
OPT_KERNELS_LOW(bf16, bf16, bf16, bf16)
OPT_KERNELS_LOW(bf16, f32, bf16, float)
OPT_KERNELS_LOW(f16, f16, f16, f16)
OPT_KERNELS_LOW(f16, f32, f16, float)
