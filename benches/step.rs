//! The step-level figure (GPU only): the device time TRAM adds to one training
//! step of GPT-2 medium (292 tensors, 355M parameters: bf16 working weights,
//! f32 master weights, f32 gradients, AdamW moments) with bf16 logits of
//! 8 × 512 tokens × 50,257 (the target's and the model's), against the base
//! AdamW step on the same parameters.
//!
//! TRAM's stages, each timed alone as `TramStep` launches it (SAM geometry,
//! ρ = δ·d):
//!   kl       KL(target ‖ model) forward, `KlOptions::default()` (MeanRows):
//!            d, a device scalar (4 B/logit)
//!   norm     the global gradient norm (4 B/param)
//!   perturb  bf16 θ + ε from the f32 master and gradient (10 B/param)
//!   restore  none on the master path: the update rewrites bf16 θ from the
//!            master (the crate docs' memory-traffic table). What `TramStep::second_step` (TRAM-x)
//!            launches beyond the base update is the one-thread noise-step
//!            counter; that launch is timed as this stage.
//! and their sum; then, as cross-checks, `first_step` and both variants'
//! `second_step` as single calls, our fused AdamW alone (the base step), and
//! TRAM-x's embedding noise. PyTorch's fused AdamW on the same shapes comes
//! from scripts/baselines_torch.py (its `step` section).
//!
//! Timing: per stage, 5 warm-up calls, then the median over 7 repeats of the
//! mean CUDA-event time of 10 back-to-back calls. Output, one line per number,
//! read by scripts/results.py:
//!
//!     stepfig <key> ms=<ms per call> [gbps=<byte floor / time>] # <what>
//!
//! Before timing, one whole first step is checked against the CPU reference
//! (d to 1e-4, the norm to 1e-6 relative, the perturbation applied). Without a
//! GPU (or with TRAM_BENCH=cpu) it prints why and exits 0; with
//! TRAM_REQUIRE_GPU=1 a missing GPU is a panic.
//!
//! First, the host cost of describing the model's 292 tensors to a step at
//! every call (`stepfig-info describe`; `TRAM_BENCH_STEP=describe` stops
//! there, small enough for the emulated device).
//!
//! A plain program, not criterion: it ignores the arguments `cargo bench`
//! passes (a filter too) and always measures everything above.
//!
//! `cargo bench --bench step`

mod common;

use cudarc::driver::DevicePtr;
use tram_kernels::cpu::grad_norm::grad_norm as cpu_grad_norm;
use tram_kernels::cpu::kl_div::{kl_div as cpu_kl_div, Logits};
use tram_kernels::cuda::buffer::{DevMut, DevRef};
use tram_kernels::cuda::grad_norm::{grad_norm, NormOptions};
use tram_kernels::cuda::kl_div::{kl_div, DeviceLogits, KlWorkspace};
use tram_kernels::cuda::noise::NoiseStep;
use tram_kernels::cuda::optimizer::{FusedOptimizer, RawUpdateTensor, UpdateGroup};
use tram_kernels::cuda::perturb::{perturb_device, DeviceRadius, PerturbMode, PerturbOptions};
use tram_kernels::cuda::step::{Perturbation, Tensor, TramStep};
use tram_kernels::cuda::CudaBackend;
use tram_kernels::{
    bf16, BaseOptimizer, DType, Geometry, KlOptions, NoiseConfig, NoiseDistribution, Radius, Tram,
    TramConfig, TramVariant,
};

/// 8 sequences × 512 tokens.
const ROWS: usize = 8 * 512;
/// GPT-2's vocabulary.
const VOCAB: usize = 50_257;
/// TRAM-x's noised embeddings: the tokens × GPT-2 medium's width.
const EMBED: usize = ROWS * 1024;
const DELTA: f32 = 0.5;
/// Small, so that many repeated updates keep the weights tame.
const LR: f32 = 1e-6;
const LAMBDA: f32 = 0.99;
/// Logits a ~ σ·U(-1, 1) and b = a + gap·U(-1, 1), as the KL bench.
const SIGMA: f32 = 3.0;
const GAP: f32 = 0.1;

const WARMUP: usize = 5;
const ITERS: u64 = 10;
const REPS: usize = 7;

fn config(variant: TramVariant) -> TramConfig {
    TramConfig {
        delta: DELTA,
        geometry: Geometry::Sam,
        kl: KlOptions::default(),
        variant,
        optimizer: BaseOptimizer::adamw(0.01),
        lr: LR,
    }
}

/// Device milliseconds per call of `f`: the median over `REPS` repeats of the
/// mean over `ITERS` back-to-back calls, after `WARMUP` calls.
fn time_ms(gpu: &CudaBackend, mut f: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        f();
    }
    gpu.synchronize().expect("synchronize");
    let mut t: Vec<f64> = (0..REPS)
        .map(|_| common::gpu_time(gpu, ITERS, &mut f).as_secs_f64() * 1e3 / ITERS as f64)
        .collect();
    t.sort_by(f64::total_cmp);
    t[REPS / 2]
}

/// One machine-readable line; `bytes` is the stage's floor (the crate docs' memory-traffic table).
fn report(key: &str, ms: f64, bytes: Option<usize>, what: &str) {
    let gbps = bytes.map_or(String::new(), |b| {
        format!(" gbps={:.0}", b as f64 / (ms * 1e-3) / 1e9)
    });
    println!("stepfig {key} ms={ms:.4}{gbps} # {what}");
}

/// Host microseconds per call of `f`: the median of 9 repeats of 20 calls.
fn host_us(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..9)
        .map(|_| {
            let t0 = std::time::Instant::now();
            for _ in 0..20 {
                f();
            }
            t0.elapsed().as_secs_f64() * 1e6 / 20.0
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[4]
}

/// The host cost of describing GPT-2 medium's 292 tensors to a step every
/// call, as a framework that allocates new gradients every backward does:
/// building the description (from raw addresses: no driver call; from cudarc
/// slices: one event recorded per buffer, and a wait when it was written),
/// and the step's check of it, unchanged and with every gradient moved (a
/// table upload). Small tensors: the cost depends on their count alone.
fn describe_cost(gpu: &CudaBackend) {
    let sizes = common::gpt2_medium();
    let stream = gpu.stream();
    let alloc = |v: f32| -> Vec<cudarc::driver::CudaSlice<f32>> {
        sizes
            .iter()
            .map(|_| stream.clone_htod(&[v; 4]).expect("alloc"))
            .collect()
    };
    let (mut p, mut b, mut m, mut v) = (alloc(0.5), alloc(0.0), alloc(0.0), alloc(0.0));
    let grads = [alloc(0.1), alloc(0.2)];
    let cfg = config(TramVariant::X {
        noise: NoiseConfig {
            distribution: NoiseDistribution::Uniform,
            sigma: 0.01,
            seed: 1,
        },
    });
    // The addresses, taken once (what a framework holding raw pointers has).
    let addrs = |x: &[cudarc::driver::CudaSlice<f32>]| -> Vec<u64> {
        x.iter().map(|s| s.device_ptr(stream).0).collect()
    };
    let (pa, ba, ma, va) = (addrs(&p), addrs(&b), addrs(&m), addrs(&v));
    let ga = [addrs(&grads[0]), addrs(&grads[1])];
    let raw = |g: &[u64]| -> Vec<Tensor<'static, f32>> {
        (0..sizes.len())
            .map(|k| {
                // SAFETY: live 4-element f32 allocations (only 4 of each are
                // described), distinct, kept until the end of this function;
                // one stream.
                unsafe {
                    Tensor {
                        param: DevMut::from_raw(pa[k], 4),
                        grad: Some(DevRef::from_raw(g[k], 4)),
                        perturbation: Perturbation::Backup(DevMut::from_raw(ba[k], 4)),
                        m: Some(DevMut::from_raw(ma[k], 4)),
                        v: Some(DevMut::from_raw(va[k], 4)),
                        target: None,
                        weight_decay: true,
                    }
                }
            })
            .collect()
    };
    let mut step = TramStep::new(gpu, cfg, &raw(&ga[0]), 1).expect("step");
    let build_raw = host_us(|| drop(std::hint::black_box(raw(&ga[0]))));
    let build_slices = host_us(|| {
        let t: Vec<Tensor<'_, f32>> = p
            .iter_mut()
            .zip(&grads[0])
            .zip(b.iter_mut())
            .zip(m.iter_mut().zip(v.iter_mut()))
            .map(|(((p, g), b), (m, v))| Tensor {
                param: DevMut::new(p),
                grad: Some(DevRef::new(g)),
                perturbation: Perturbation::Backup(DevMut::new(b)),
                m: Some(DevMut::new(m)),
                v: Some(DevMut::new(v)),
                target: None,
                weight_decay: true,
            })
            .collect();
        drop(std::hint::black_box(t));
    });
    let mut same = raw(&ga[0]);
    let unchanged = host_us(|| step.prepare(&mut same).expect("prepare"));
    let mut flip = 0;
    let moved = host_us(|| {
        flip ^= 1;
        let mut t = raw(&ga[flip]);
        step.prepare(&mut t).expect("prepare");
    });
    gpu.synchronize().expect("synchronize");
    println!(
        "stepfig-info describe tensors={} host_us: build from raw addresses {build_raw:.1}, \
         from cudarc slices {build_slices:.1}; prepare unchanged {unchanged:.1}, \
         every gradient moved (build + validate + upload) {moved:.1}",
        sizes.len()
    );
}

fn main() {
    let Some(gpu) = common::gpu("step") else {
        return;
    };
    let gpu = &gpu;
    describe_cost(gpu);
    if std::env::var("TRAM_BENCH_STEP").is_ok_and(|v| v == "describe") {
        return;
    }
    let stream = gpu.stream();
    let sizes = common::gpt2_medium();
    let n: usize = sizes.iter().sum();
    println!(
        "stepfig-info model=gpt2-medium tensors={} params={n} logits={ROWS}x{VOCAB} bf16, \
         params bf16 + f32 master, grads f32, AdamW; warm-up {WARMUP}, median of {REPS} x {ITERS} calls",
        sizes.len()
    );

    // Parameters: bf16 θ, f32 g and master (random), f32 moments (a first
    // step's zeros), and TRAM-θ's bf16 target θ̄.
    let bufs = common::DeviceGroup::<bf16, f32>::new(gpu, &sizes, false, true, false);
    let master = bufs.master.as_ref().expect("master");
    let m = stream.alloc_zeros::<f32>(n).expect("alloc");
    let v = stream.alloc_zeros::<f32>(n).expect("alloc");
    let target = stream
        .clone_htod(&common::random::<bf16>(n, 26, 0.05))
        .expect("upload");

    // Logits, and the CPU reference KL while the host still has them.
    let (a, b) = common::logit_pair::<bf16>(ROWS, VOCAB, SIGMA, GAP);
    let want_kl = cpu_kl_div(
        &Logits::dense(&a, ROWS, VOCAB).expect("logits"),
        &Logits::dense(&b, ROWS, VOCAB).expect("logits"),
        None,
        &KlOptions::default(),
    )
    .expect("cpu kl")
    .value;
    let da = stream.clone_htod(&a).expect("upload");
    let db = stream.clone_htod(&b).expect("upload");
    drop((a, b));
    let ta = DeviceLogits::dense(da.as_view(), ROWS, VOCAB).expect("logits");
    let tb = DeviceLogits::dense(db.as_view(), ROWS, VOCAB).expect("logits");

    // The step's description over raw addresses: tensor k at element offset
    // off[k] of each role's one allocation.
    let addr = |p: u64, elem: usize, off: usize| p + (off * elem) as u64;
    let (p_base, g_base, w_base) = (
        bufs.param.device_ptr(stream).0,
        bufs.grad.device_ptr(stream).0,
        master.device_ptr(stream).0,
    );
    let (m_base, v_base, t_base) = (
        m.device_ptr(stream).0,
        v.device_ptr(stream).0,
        target.device_ptr(stream).0,
    );
    let describe = |with_target: bool| -> Vec<Tensor<'static, bf16, f32, bf16>> {
        let mut off = 0;
        sizes
            .iter()
            .map(|&len| {
                // SAFETY: every address lies inside an allocation of `bufs`,
                // `m`, `v` or `target` (tensor k at its offset, `len`
                // elements of the role's type: bf16 θ and θ̄, f32 g, master,
                // m, v), all of which outlive every step object and launch
                // below (`main` synchronises before it returns); no two
                // roles or tensors share memory; all work runs on the
                // backend's one stream.
                let t = unsafe {
                    Tensor {
                        param: DevMut::from_raw(addr(p_base, 2, off), len),
                        grad: Some(DevRef::from_raw(addr(g_base, 4, off), len)),
                        perturbation: Perturbation::Master(DevMut::from_raw(
                            addr(w_base, 4, off),
                            len,
                        )),
                        m: Some(DevMut::from_raw(addr(m_base, 4, off), len)),
                        v: Some(DevMut::from_raw(addr(v_base, 4, off), len)),
                        target: with_target.then(|| DevMut::from_raw(addr(t_base, 2, off), len)),
                        weight_decay: true,
                    }
                };
                off += len;
                t
            })
            .collect()
    };
    let update_rows: Vec<RawUpdateTensor> = {
        let mut off = 0;
        sizes
            .iter()
            .map(|&len| {
                let r = RawUpdateTensor {
                    param: addr(p_base, 2, off),
                    grad: addr(g_base, 4, off),
                    source: addr(w_base, 4, off),
                    m: addr(m_base, 4, off),
                    v: addr(v_base, 4, off),
                    len: len as u64,
                    weight_decay: true,
                };
                off += len;
                r
            })
            .collect()
    };

    let noise = NoiseConfig {
        distribution: NoiseDistribution::Gaussian,
        sigma: 0.01,
        seed: 17,
    };
    let mut x_tensors = describe(false);
    let mut theta_tensors = describe(true);
    let mut tram_x = TramStep::new(gpu, config(TramVariant::X { noise }), &x_tensors, ROWS)
        .expect("TRAM-x step");
    let mut tram_theta = TramStep::new(
        gpu,
        config(TramVariant::Theta { lambda: LAMBDA }),
        &theta_tensors,
        ROWS,
    )
    .expect("TRAM-θ step");
    // SAFETY: as `describe`'s addresses.
    let base_group =
        unsafe { UpdateGroup::from_raw(gpu, &update_rows, DType::BF16, DType::F32, true) }
            .expect("update group");
    let mut base = FusedOptimizer::new(gpu, BaseOptimizer::adamw(0.01), LR).expect("optimizer");

    // One whole first step against the CPU reference.
    tram_x
        .first_step(&mut x_tensors, &ta, &tb, None)
        .expect("first step");
    tram_x.second_step(&mut x_tensors).expect("second step");
    let got_kl = tram_x.kl_workspace().read(gpu, ROWS).expect("read").value;
    let state = tram_x.param_group().read_state().expect("state");
    let grad = stream.clone_dtoh(&bufs.grad).expect("download");
    let theta = stream.clone_dtoh(master).expect("download");
    let want_norm = cpu_grad_norm(&[&theta[..]], &[Some(&grad[..])], Geometry::Sam, 1.0)
        .expect("cpu norm")
        .norm;
    drop((grad, theta));
    let kl_err = ((got_kl - want_kl) / want_kl).abs();
    let norm_err = ((state.norm - want_norm) / want_norm).abs();
    println!(
        "check: first step d {got_kl:.6e} (cpu {want_kl:.6e}, relative error {kl_err:.1e}), \
         norm {:.6e} (cpu {want_norm:.6e}, {norm_err:.1e}), ρ {:.3e}, status {:?}",
        state.norm,
        state.rho,
        state.perturb_status()
    );
    assert!(
        kl_err <= 1e-4,
        "d {got_kl} differs from the CPU reference {want_kl}"
    );
    assert!(
        norm_err <= 1e-6,
        "the norm {} differs from the CPU reference {want_norm}",
        state.norm
    );
    assert!(
        state.perturb_status().applied(),
        "the perturbation did not apply: {state:?}"
    );

    // The stages alone, as TramStep launches them.
    let kl_opts = tram_x.config().kl;
    let mut ws = KlWorkspace::new(gpu, ROWS).expect("workspace");
    let kl_ms = time_ms(gpu, || {
        kl_div(gpu, &ta, &tb, None, &kl_opts, &mut ws, None).expect("kl");
    });
    let group = tram_x.param_group();
    let norm_opts = NormOptions {
        geometry: Geometry::Sam,
        inv_scale: 1.0,
    };
    let norm_ms = time_ms(gpu, || grad_norm(gpu, group, norm_opts).expect("norm"));
    let radius = DeviceRadius::new(gpu, Radius::TrustRegion { delta: DELTA }).expect("radius");
    let popts = PerturbOptions {
        geometry: Geometry::Sam,
        radius: radius.radius(),
        inv_scale: 1.0,
        mode: PerturbMode::Master,
    };
    let d = ws.value().as_view();
    let perturb_ms = time_ms(gpu, || {
        perturb_device(gpu, group, popts, &radius, Some(&d)).expect("perturb")
    });
    let state = group.read_state().expect("state");
    assert!(
        state.perturb_status().applied(),
        "the timed perturbation did not apply: {state:?}"
    );
    let mut counter = NoiseStep::new(gpu, 0).expect("noise step");
    let restore_ms = time_ms(gpu, || counter.advance(gpu).expect("advance"));

    // Whole calls, the base step, TRAM-x's noise. A second step needs a
    // first before it: an iteration is timed whole, and the second step's
    // launches (check, gate, update, noise step) as `base_step`, which
    // launches the same kernels with θ read from the master as well.
    let iteration_ms = time_ms(gpu, || {
        tram_x
            .first_step(&mut x_tensors, &ta, &tb, None)
            .expect("first step");
        tram_x.second_step(&mut x_tensors).expect("second step");
    });
    let second_x_ms = time_ms(gpu, || tram_x.base_step(&mut x_tensors).expect("base step"));
    let second_theta_ms = time_ms(gpu, || {
        tram_theta.base_step(&mut theta_tensors).expect("base step")
    });
    let first_ms = iteration_ms - second_x_ms;
    let base_ms = time_ms(gpu, || base.step(gpu, &base_group).expect("adamw"));
    let emb = stream
        .clone_htod(&common::random::<bf16>(EMBED, 27, 1.0))
        .expect("upload");
    // SAFETY: the noise kernel writes every element before anything reads it.
    let mut noised = unsafe { stream.alloc::<bf16>(EMBED) }.expect("alloc");
    let emb_ref = DevRef::new(&emb);
    let mut noised_mut = DevMut::new(&mut noised);
    let noise_ms = time_ms(gpu, || {
        tram_x.noise(&emb_ref, &mut noised_mut).expect("noise")
    });
    gpu.synchronize().expect("synchronize");

    let logits = ROWS * VOCAB;
    report(
        "stage=kl",
        kl_ms,
        Some(4 * logits),
        "KL(target||model) forward, MeanRows, bf16 4096x50257 (first_step's d; 4 B/logit)",
    );
    report(
        "stage=norm",
        norm_ms,
        Some(4 * n),
        "global gradient norm, SAM, 292 f32 gradients (4 B/param)",
    );
    report(
        "stage=perturb",
        perturb_ms,
        Some(10 * n),
        "bf16 theta+eps from the f32 master and gradient, rho = delta*d on the device (10 B/param)",
    );
    report(
        "stage=restore",
        restore_ms,
        None,
        "no restore on the master path (the update rewrites bf16 theta from the master); \
         the one launch TRAM-x's second_step adds to the base update (noise-step counter)",
    );
    let total = kl_ms + norm_ms + perturb_ms + restore_ms;
    report("total", total, None, "kl + norm + perturb + restore");
    report(
        "first_step",
        first_ms,
        None,
        "TramStep::first_step: a whole iteration (first_step + second_step) less the second \
         step's launches (phase gate + kl + norm + perturb)",
    );
    report(
        "second_step_x",
        second_x_ms,
        Some(34 * n),
        "TramStep::second_step's launches, TRAM-x, timed as base_step: the AMP check over the \
         gradients (+4 B/param), the gate with the step counter, fused AdamW, the noise-step counter",
    );
    report(
        "second_step_theta",
        second_theta_ms,
        Some(40 * n),
        "TramStep::second_step's launches, TRAM-theta, timed as base_step: check, gate, fused AdamW \
         with the bf16 EMA target of the master fused in (+4 B/param check, +4 B/param target)",
    );
    report(
        "ours_fused_adamw",
        base_ms,
        Some(30 * n),
        "the base step alone: FusedOptimizer::step, master mode (master, g, m, v in; master, m, v, bf16 theta out: 30 B/param)",
    );
    report(
        "noise_embed",
        noise_ms,
        Some(4 * EMBED),
        "TRAM-x embedding noise, Gaussian, bf16 8x512x1024 (16 MiB: L2-resident)",
    );
    println!(
        "stepfig-info TRAM extra {total:.3} ms = {:.2} of our fused AdamW step ({base_ms:.3} ms)",
        total / base_ms
    );
}
