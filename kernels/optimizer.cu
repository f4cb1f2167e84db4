// TRAM's second step: restore θ and apply the base optimizer (AdamW or SGD with
// momentum) in one pass over every tensor of a group, one launch.
//
// θ is read from the backup (or the f32 master), never from the perturbed
// parameters, so the restore is free: AdamW moves backup, g, m, v in and θ, m, v
// out (28 bytes per f32 parameter, the cost of a plain AdamW step).
//
// Arithmetic is f64 with explicitly rounded intrinsics (no contraction into
// FMA), in the order of `Scalars::apply` in src/cpu/optimizer.rs: both backends
// store the same bits. The kernel stays memory-bound on H100/H200-class FP64.
//
// Per-step values live in device memory so a captured CUDA graph replays
// correctly: the host rewrites `OptHyper` (learning rate...) with an async copy,
// and `optimizer_advance` bumps the step count and β powers on the device.
#include "multi_tensor.cuh"

// Mirrors `HYPER_*` in src/cuda/optimizer.rs (8 floats).
struct OptHyper {
    float lr, weight_decay, beta1, beta2, eps, momentum, dampening, pad;
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

extern "C" __global__ void optimizer_advance(OptCounter* c, const OptHyper* h, uint32_t adamw) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        c->t += 1;
        if (adamw) {
            c->beta1_pow = __dmul_rn(c->beta1_pow, (double)h->beta1);
            c->beta2_pow = __dmul_rn(c->beta2_pow, (double)h->beta2);
        }
    }
}

template <typename P, typename G, int OPT, bool MASTER>
__device__ __forceinline__ void optimizer_update(const MtTensor* __restrict__ tensors,
                                                 const MtChunk* __restrict__ chunks,
                                                 uint32_t n_chunks, const OptHyper* __restrict__ hp,
                                                 const OptCounter* __restrict__ cp,
                                                 uint32_t nesterov) {
    const OptHyper h = *hp;
    const OptCounter c = *cp;
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

    for (uint32_t k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        const MtChunk ch = chunks[k];
        const MtTensor t = tensors[ch.tensor];
        const MtSpan span = mt_span(t, ch);
        const uint64_t begin = span.begin, end = span.end;
        P* param = reinterpret_cast<P*>(t.ptr[OPT_SLOT_PARAM]);
        const G* grad = reinterpret_cast<const G*>(t.ptr[OPT_SLOT_GRAD]);
        const uint64_t src = t.ptr[OPT_SLOT_SRC];
        const bool decays = t.ptr[OPT_SLOT_DECAY] != 0;
        float* m = reinterpret_cast<float*>(t.ptr[OPT_SLOT_M]);
        float* v = reinterpret_cast<float*>(t.ptr[OPT_SLOT_V]);
        if (grad == nullptr) {
            // No gradient: only the restore (the working copy from the master).
            for (uint64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
                if (MASTER) param[i] = from_f32<P>(reinterpret_cast<const float*>(src)[i]);
                else param[i] = reinterpret_cast<const P*>(src)[i];
            }
            continue;
        }
        const double wd = decays ? (double)h.weight_decay : 0.0;
        for (uint64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
            double theta = MASTER ? (double)reinterpret_cast<const float*>(src)[i]
                                  : (double)to_f32(reinterpret_cast<const P*>(src)[i]);
            const double g = (double)to_f32(grad[i]);
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
            param[i] = from_f32<P>(th);
        }
    }
}

#define OPT_KERNEL(name, P, G, OPT, MASTER)                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        name(const MtTensor* tensors, const MtChunk* chunks, uint32_t n_chunks,                 \
             const OptHyper* h, const OptCounter* c, uint32_t nesterov) {                       \
        optimizer_update<P, G, OPT, MASTER>(tensors, chunks, n_chunks, h, c, nesterov);         \
    }

#define OPT_KERNELS(p, g, P, G)                                                            \
    OPT_KERNEL(optimizer_adamw_restore_##p##_##g, P, G, OPT_ADAMW, false)                  \
    OPT_KERNEL(optimizer_adamw_master_##p##_##g, P, G, OPT_ADAMW, true)                    \
    OPT_KERNEL(optimizer_sgd_restore_##p##_##g, P, G, OPT_SGD, false)                      \
    OPT_KERNEL(optimizer_sgd_master_##p##_##g, P, G, OPT_SGD, true)

OPT_KERNELS(f32, f32, float, float)
OPT_KERNELS(bf16, bf16, bf16, bf16)
OPT_KERNELS(bf16, f32, bf16, float)
OPT_KERNELS(f16, f16, f16, f16)
OPT_KERNELS(f16, f32, f16, float)
