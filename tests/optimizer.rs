//! The fused restore + base-optimizer update: the CPU reference against an f64
//! transcription of torch.optim.AdamW / torch.optim.SGD's documented algorithms,
//! and the CUDA kernel against the CPU reference (bit for bit: both evaluate the
//! same f64 operations in the same order).

// The oracles index several arrays in step, as the formulas are written.
#![allow(clippy::needless_range_loop)]

#[macro_use]
mod common;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::optimizer::{FusedOptimizer, UpdateTensor, Weights};
use tram_kernels::{bf16, BaseOptimizer, Error};

// ---------------------------------------------------------------------------
// The oracle: torch's algorithms in f64, written from the torch documentation
// (AdamW: decay, lerp, addcmul, bias corrections with powf; SGD: clone on the
// first step). Deliberately not sharing code with the crate.

#[derive(Clone, Debug)]
struct OracleTensor {
    theta: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    decays: bool,
    /// Magnitude trajectories for the free-running bound: β1·|m| + (1−β1)·|g|
    /// and |θ|·decay + |update| summed over the steps (empty: not tracked).
    m_abs: Vec<f64>,
    th_abs: Vec<f64>,
}

fn oracle_adamw(t: &mut OracleTensor, g: &[f64], lr: f64, opt: (f64, f64, f64, f64), step: i32) {
    let (beta1, beta2, eps, wd) = opt;
    let bc1 = 1.0 - beta1.powi(step);
    let bc2 = 1.0 - beta2.powi(step);
    let step_size = lr / bc1;
    let bc2_sqrt = bc2.sqrt();
    for i in 0..g.len() {
        if t.decays {
            t.theta[i] *= 1.0 - lr * wd;
        }
        t.m[i] += (g[i] - t.m[i]) * (1.0 - beta1);
        t.v[i] = t.v[i] * beta2 + g[i] * g[i] * (1.0 - beta2);
        let denom = t.v[i].sqrt() / bc2_sqrt + eps;
        t.theta[i] += -step_size * (t.m[i] / denom);
        if !t.m_abs.is_empty() {
            t.m_abs[i] = beta1 * t.m_abs[i] + (1.0 - beta1) * g[i].abs();
            let decay = if t.decays { 1.0 - lr * wd } else { 1.0 };
            t.th_abs[i] = t.th_abs[i] * decay + step_size * t.m_abs[i] / denom;
        }
    }
}

fn oracle_sgd(t: &mut OracleTensor, g: &[f64], lr: f64, opt: (f64, f64, f64, bool), step: i32) {
    let (mu, damp, wd, nesterov) = opt;
    for i in 0..g.len() {
        let mut d = g[i];
        if t.decays {
            d += wd * t.theta[i];
        }
        if mu != 0.0 {
            if step == 1 {
                t.m[i] = d;
            } else {
                t.m[i] = mu * t.m[i] + (1.0 - damp) * d;
            }
            d = if nesterov { d + mu * t.m[i] } else { t.m[i] };
        }
        t.theta[i] += -lr * d;
    }
}

// ---------------------------------------------------------------------------

const SIZES: [usize; 5] = [1, 3, 1000, 40_000, 70_001];

fn randn(rng: &mut SmallRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            // Box–Muller, enough for test data.
            let u1: f64 = rng.random_range(1e-12..1.0);
            let u2: f64 = rng.random();
            scale * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect()
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&x| x as f32).collect()
}

fn up(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&x| x as f64).collect()
}

fn assert_rel(what: &str, got: &[f32], want: &[f64], scale: Option<&[f64]>, tol: f64) {
    assert_eq!(got.len(), want.len());
    for i in 0..got.len() {
        let s = scale.map_or(want[i].abs(), |s| s[i]);
        let err = (got[i] as f64 - want[i]).abs();
        assert!(
            err <= tol * s,
            "{what}[{i}]: got {} want {} (error {err:e} > {tol:e} × {s:e})",
            got[i],
            want[i]
        );
    }
}

struct Host {
    backup: Vec<f32>,
    param: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    decays: bool,
}

fn make_group(rng: &mut SmallRng, with_v: bool) -> Vec<Host> {
    SIZES
        .iter()
        .enumerate()
        .map(|(k, &n)| Host {
            backup: to_f32(&randn(rng, n, 1.0)),
            param: vec![f32::NAN; n],
            m: vec![0.0; n],
            v: if with_v { vec![0.0; n] } else { Vec::new() },
            decays: k % 2 == 0,
        })
        .collect()
}

fn cpu_step(opt: &mut FusedOptimizer, hosts: &mut [Host], grads: &[Vec<f32>]) {
    let mut ts: Vec<UpdateTensor<f32, f32>> = hosts
        .iter_mut()
        .zip(grads)
        .map(|(h, g)| UpdateTensor {
            weights: Weights::Restore {
                backup: &h.backup,
                param: &mut h.param,
            },
            grad: Some(g),
            m: &mut h.m,
            v: &mut h.v,
            weight_decay: h.decays,
        })
        .collect();
    opt.step(&mut ts).unwrap();
}

/// The learning rate of single-lr tests (an f32: the oracle uses its exact value).
const LR: f32 = 1e-2;

const ADAMW: (f32, f32, f32, f32) = (0.9, 0.999, 1e-8, 0.05);

fn adamw_cfg() -> BaseOptimizer {
    let (beta1, beta2, eps, weight_decay) = ADAMW;
    BaseOptimizer::AdamW {
        beta1,
        beta2,
        eps,
        weight_decay,
    }
}

fn adamw_f64() -> (f64, f64, f64, f64) {
    (
        ADAMW.0 as f64,
        ADAMW.1 as f64,
        ADAMW.2 as f64,
        ADAMW.3 as f64,
    )
}

#[test]
fn adamw_each_step_within_1e6_of_f64_torch() {
    let mut rng = SmallRng::seed_from_u64(11);
    let mut hosts = make_group(&mut rng, true);
    let mut opt = FusedOptimizer::new(adamw_cfg(), 1e-3).unwrap();
    for step in 1..=6 {
        let lr = [1e-3f32, 3e-3, 2e-2, 1e-4, 5e-3, 1e-2][step - 1];
        opt.set_lr(lr).unwrap();
        let grads: Vec<Vec<f32>> = SIZES
            .iter()
            .map(|&n| to_f32(&randn(&mut rng, n, 0.1)))
            .collect();
        // The oracle starts from the CPU's own f32 state before this step.
        let mut want: Vec<OracleTensor> = hosts
            .iter()
            .map(|h| OracleTensor {
                theta: up(&h.backup),
                m: up(&h.m),
                v: up(&h.v),
                decays: h.decays,
                m_abs: vec![],
                th_abs: vec![],
            })
            .collect();
        for (w, g) in want.iter_mut().zip(&grads) {
            oracle_adamw(w, &up(g), lr as f64, adamw_f64(), step as i32);
        }
        cpu_step(&mut opt, &mut hosts, &grads);
        assert_eq!(opt.step_count(), step as u64);
        for (h, w) in hosts.iter_mut().zip(&want) {
            assert_rel("theta", &h.param, &w.theta, None, 1e-6);
            assert_rel("m", &h.m, &w.m, None, 1e-6);
            assert_rel("v", &h.v, &w.v, None, 1e-6);
            // Next step restores from this step's result.
            h.backup.copy_from_slice(&h.param);
            h.param.fill(f32::NAN);
        }
    }
}

#[test]
fn adamw_free_running_f64_trajectory() {
    // The oracle keeps its own f64 state for 5 steps while the crate stores f32
    // state. Each stored rounding (2^-24 relative) propagates: after t steps
    // |m − m64| ≤ t·2^-24·M_t and |θ − θ64| ≤ 2.5·t·2^-24·A_t, with M_t, A_t the
    // magnitude trajectories (sums of absolute terms). For t ≤ 5 both are
    // below 1e-6 of that magnitude; v has no cancellation (≤ t·2^-24 relative).
    let mut rng = SmallRng::seed_from_u64(12);
    let mut hosts = make_group(&mut rng, true);
    let mut want: Vec<OracleTensor> = hosts
        .iter()
        .map(|h| OracleTensor {
            theta: up(&h.backup),
            m: vec![0.0; h.m.len()],
            v: vec![0.0; h.v.len()],
            decays: h.decays,
            m_abs: vec![0.0; h.m.len()],
            th_abs: h.backup.iter().map(|x| x.abs() as f64).collect(),
        })
        .collect();
    let lr = 2e-3f32;
    let mut opt = FusedOptimizer::new(adamw_cfg(), lr).unwrap();
    for step in 1..=5 {
        let grads: Vec<Vec<f32>> = SIZES
            .iter()
            .map(|&n| to_f32(&randn(&mut rng, n, 1.0)))
            .collect();
        for (w, g) in want.iter_mut().zip(&grads) {
            oracle_adamw(w, &up(g), lr as f64, adamw_f64(), step);
        }
        cpu_step(&mut opt, &mut hosts, &grads);
        for (h, w) in hosts.iter_mut().zip(&want) {
            assert_rel("theta", &h.param, &w.theta, Some(&w.th_abs), 1e-6);
            assert_rel("m", &h.m, &w.m, Some(&w.m_abs), 1e-6);
            assert_rel("v", &h.v, &w.v, None, 1e-6);
            h.backup.copy_from_slice(&h.param);
        }
    }
}

#[test]
fn sgd_each_step_within_1e6_of_f64_torch() {
    for (mu, damp, wd, nesterov) in [
        (0.9f32, 0.0f32, 1e-2f32, false),
        (0.9, 0.1, 1e-2, false),
        (0.8, 0.0, 5e-3, true),
        (0.0, 0.0, 1e-2, false),
    ] {
        let cfg = BaseOptimizer::Sgd {
            momentum: mu,
            dampening: damp,
            weight_decay: wd,
            nesterov,
        };
        let mut rng = SmallRng::seed_from_u64(13);
        let mut hosts = make_group(&mut rng, false);
        if mu == 0.0 {
            for h in &mut hosts {
                h.m.clear();
            }
        }
        let mut opt = FusedOptimizer::new(cfg, 0.1).unwrap();
        for step in 1..=5 {
            let lr = [0.1f32, 0.05, 0.2, 0.01, 0.1][step - 1];
            opt.set_lr(lr).unwrap();
            let grads: Vec<Vec<f32>> = SIZES
                .iter()
                .map(|&n| to_f32(&randn(&mut rng, n, 1.0)))
                .collect();
            let mut want: Vec<OracleTensor> = hosts
                .iter()
                .map(|h| OracleTensor {
                    theta: up(&h.backup),
                    m: if mu == 0.0 {
                        vec![f64::NAN; h.backup.len()]
                    } else {
                        up(&h.m)
                    },
                    v: Vec::new(),
                    decays: h.decays,
                    m_abs: vec![],
                    th_abs: vec![],
                })
                .collect();
            for (w, g) in want.iter_mut().zip(&grads) {
                oracle_sgd(
                    w,
                    &up(g),
                    lr as f64,
                    (mu as f64, damp as f64, wd as f64, nesterov),
                    step as i32,
                );
            }
            cpu_step(&mut opt, &mut hosts, &grads);
            for (h, w) in hosts.iter_mut().zip(&want) {
                assert_rel("theta", &h.param, &w.theta, None, 1e-6);
                if mu != 0.0 {
                    assert_rel("buf", &h.m, &w.m, None, 1e-6);
                }
                h.backup.copy_from_slice(&h.param);
                h.param.fill(f32::NAN);
            }
        }
    }
}

#[test]
fn adamw_master_weights_bf16_working_copy() {
    let mut rng = SmallRng::seed_from_u64(14);
    let n = 50_003;
    let mut master = to_f32(&randn(&mut rng, n, 1.0));
    let mut param = vec![bf16::from_bits(0x7fc1); n];
    let mut m = vec![0.0f32; n];
    let mut v = vec![0.0f32; n];
    let mut want = OracleTensor {
        theta: vec![],
        m: vec![],
        v: vec![],
        decays: true,
        m_abs: vec![],
        th_abs: vec![],
    };
    let mut opt = FusedOptimizer::new(adamw_cfg(), LR).unwrap();
    for step in 1..=4 {
        // bf16 gradients, as a bf16 model produces them.
        let g: Vec<bf16> = randn(&mut rng, n, 0.5)
            .iter()
            .map(|&x| bf16::from_f64(x))
            .collect();
        want.theta = up(&master);
        want.m = up(&m);
        want.v = up(&v);
        let g64: Vec<f64> = g.iter().map(|x| x.to_f64()).collect();
        oracle_adamw(&mut want, &g64, LR as f64, adamw_f64(), step);
        let mut ts = [UpdateTensor {
            weights: Weights::Master {
                master: &mut master,
                param: &mut param,
            },
            grad: Some(&g[..]),
            m: &mut m,
            v: &mut v,
            weight_decay: true,
        }];
        opt.step(&mut ts).unwrap();
        assert_rel("master", &master, &want.theta, None, 1e-6);
        assert_rel("m", &m, &want.m, None, 1e-6);
        assert_rel("v", &v, &want.v, None, 1e-6);
        for i in 0..n {
            assert_eq!(
                param[i].to_bits(),
                bf16::from_f32(master[i]).to_bits(),
                "working copy [{i}]"
            );
        }
    }
}

#[test]
fn adamw_bf16_params_restored_from_bf16_backup() {
    let mut rng = SmallRng::seed_from_u64(15);
    let n = 33_333;
    let backup: Vec<bf16> = randn(&mut rng, n, 1.0)
        .iter()
        .map(|&x| bf16::from_f64(x))
        .collect();
    // The perturbed θ in `param` must not matter: poison it.
    let mut param = vec![bf16::from_bits(0x7fc1); n];
    let g = to_f32(&randn(&mut rng, n, 0.1));
    let mut m = to_f32(&randn(&mut rng, n, 0.01));
    let mut v: Vec<f32> = randn(&mut rng, n, 0.01)
        .iter()
        .map(|x| (x * x) as f32)
        .collect();
    let mut want = OracleTensor {
        theta: backup.iter().map(|x| x.to_f64()).collect(),
        m: up(&m),
        v: up(&v),
        decays: false,
        m_abs: vec![],
        th_abs: vec![],
    };
    let mut opt = FusedOptimizer::new(adamw_cfg(), LR).unwrap();
    opt.set_step_count(9);
    oracle_adamw(&mut want, &up(&g), LR as f64, adamw_f64(), 10);
    let mut ts = [UpdateTensor {
        weights: Weights::Restore {
            backup: &backup,
            param: &mut param,
        },
        grad: Some(&g[..]),
        m: &mut m,
        v: &mut v,
        weight_decay: false,
    }];
    opt.step(&mut ts).unwrap();
    assert_eq!(opt.step_count(), 10);
    assert_rel("m", &m, &want.m, None, 1e-6);
    assert_rel("v", &v, &want.v, None, 1e-6);
    // bf16 keeps 8 significant bits: half an ulp is 2^-8 relative at most.
    let p: Vec<f32> = param.iter().map(|x| x.to_f32()).collect();
    assert_rel("theta", &p, &want.theta, None, 2f64.powi(-8) + 1e-6);
}

#[test]
fn missing_gradient_restores_and_keeps_state() {
    let mut rng = SmallRng::seed_from_u64(16);
    let n = 40_001;
    let backup = to_f32(&randn(&mut rng, n, 1.0));
    let mut param = to_f32(&randn(&mut rng, n, 1.0));
    let m0 = to_f32(&randn(&mut rng, n, 0.1));
    let v0: Vec<f32> = m0.iter().map(|x| x * x).collect();
    let (mut m, mut v) = (m0.clone(), v0.clone());
    let mut opt = FusedOptimizer::new(adamw_cfg(), LR).unwrap();
    let mut ts = [UpdateTensor::<f32, f32> {
        weights: Weights::Restore {
            backup: &backup,
            param: &mut param,
        },
        grad: None,
        m: &mut m,
        v: &mut v,
        weight_decay: true,
    }];
    opt.step(&mut ts).unwrap();
    assert!(param
        .iter()
        .zip(&backup)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!(m, m0);
    assert_eq!(v, v0);
}

#[test]
fn step_count_resume_matches_advancing() {
    let cfg = adamw_cfg();
    let mut c = tram_kernels::StepCounter::at(&cfg, 0);
    for _ in 0..1000 {
        c.advance(&cfg);
    }
    let d = tram_kernels::StepCounter::at(&cfg, 1000);
    assert_eq!(c, d);
    assert_eq!(d.t, 1000);
    let want = (ADAMW.1 as f64).powi(1000);
    assert!((d.beta2_pow - want).abs() <= 1e-12 * want);
}

#[test]
fn bad_input_is_an_error() {
    let bad_cfgs = [
        BaseOptimizer::AdamW {
            beta1: 1.0,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        BaseOptimizer::AdamW {
            beta1: -0.1,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        BaseOptimizer::AdamW {
            beta1: 0.9,
            beta2: f32::NAN,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        BaseOptimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: -1.0,
            weight_decay: 0.0,
        },
        BaseOptimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: -1.0,
        },
        BaseOptimizer::Sgd {
            momentum: -0.5,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        },
        BaseOptimizer::Sgd {
            momentum: 0.9,
            dampening: 0.1,
            weight_decay: 0.0,
            nesterov: true,
        },
        BaseOptimizer::Sgd {
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: true,
        },
    ];
    for cfg in bad_cfgs {
        assert!(
            matches!(
                FusedOptimizer::new(cfg, 1e-3),
                Err(Error::InvalidArgument(_))
            ),
            "{cfg:?}"
        );
    }
    for lr in [-1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            FusedOptimizer::new(adamw_cfg(), lr),
            Err(Error::InvalidArgument(_))
        ));
    }
    let mut opt = FusedOptimizer::new(adamw_cfg(), 1e-3).unwrap();
    assert!(matches!(opt.set_lr(-1.0), Err(Error::InvalidArgument(_))));
    assert!(matches!(
        opt.step::<f32, f32>(&mut []),
        Err(Error::InvalidArgument(_))
    ));

    let backup = vec![1.0f32; 8];
    let g = [1.0f32; 8];
    let short = vec![1.0f32; 7];
    for which in 0..4 {
        let mut param = vec![0.0f32; 8];
        let mut m = vec![0.0f32; if which == 1 { 7 } else { 8 }];
        let mut v = vec![0.0f32; if which == 2 { 7 } else { 8 }];
        let mut ts = [UpdateTensor {
            weights: Weights::Restore {
                backup: if which == 3 { &short } else { &backup },
                param: &mut param,
            },
            grad: Some(if which == 0 { &short[..] } else { &g[..] }),
            m: &mut m,
            v: &mut v,
            weight_decay: true,
        }];
        assert!(
            matches!(opt.step(&mut ts), Err(Error::InvalidArgument(_))),
            "case {which}"
        );
        // Nothing was touched and the step count did not move.
        assert_eq!(opt.step_count(), 0);
        assert!(param.iter().all(|&x| x == 0.0));
    }
}

// ---------------------------------------------------------------------------
// CUDA against the CPU reference: same f64 operations, so the same bits.

mod gpu {
    use super::*;
    use cudarc::driver::{CudaSlice, DeviceRepr};
    use tram_kernels::cuda::optimizer::{
        DeviceUpdateTensor, DeviceWeights, FusedOptimizer as GpuOptimizer, UpdateGroup,
    };
    use tram_kernels::cuda::CudaBackend;
    use tram_kernels::{f16, Element};

    /// Sizes, with the element offset each view starts at inside its buffer
    /// (odd offsets: views that start off any vector alignment).
    const TENSORS: [(usize, usize); 6] = [
        (1, 0),
        (3, 1),
        (1000, 3),
        (65_543, 0),
        (200_003, 5),
        (70_001, 1),
    ];
    /// This tensor gets no gradient in step 2 (restore only).
    const NO_GRAD: (usize, usize) = (2, 2);

    struct Tensor<P, G> {
        src_p: Vec<P>,
        src_m: Vec<f32>,
        param: Vec<P>,
        grad: Vec<G>,
        m: Vec<f32>,
        v: Vec<f32>,
        decays: bool,
    }

    fn poison<P: Element>(n: usize) -> Vec<P> {
        vec![P::from_f32(f32::from_bits(0x7fc0_dead)); n]
    }

    fn upload<T: DeviceRepr + Copy>(
        gpu: &CudaBackend,
        x: &[T],
        off: usize,
        fill: T,
    ) -> CudaSlice<T> {
        let mut h = vec![fill; off];
        h.extend_from_slice(x);
        gpu.stream().clone_htod(&h).unwrap()
    }

    fn download<T: DeviceRepr + Copy + Default>(
        gpu: &CudaBackend,
        d: &CudaSlice<T>,
        off: usize,
    ) -> Vec<T> {
        gpu.stream().clone_dtoh(d).unwrap()[off..].to_vec()
    }

    fn bits<T: Element>(x: &[T]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits_u32()).collect()
    }

    fn run<P: Element + DeviceRepr, G: Element + DeviceRepr>(
        gpu: &CudaBackend,
        opt: BaseOptimizer,
        master: bool,
    ) {
        let mut rng = SmallRng::seed_from_u64(99);
        let mut ts: Vec<Tensor<P, G>> = TENSORS
            .iter()
            .enumerate()
            .map(|(k, &(n, _))| {
                let w = randn(&mut rng, n, 1.0);
                Tensor {
                    src_p: w.iter().map(|&x| P::from_f64(x)).collect(),
                    src_m: to_f32(&w),
                    param: poison(n),
                    grad: vec![],
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    decays: k % 2 == 1,
                }
            })
            .collect();
        let mut cpu = FusedOptimizer::new(opt, 1e-2).unwrap();
        let mut dev = GpuOptimizer::new(gpu, opt, 1e-2).unwrap();
        for step in 1..=3usize {
            let lr = [1e-2f32, 3e-2, 5e-3][step - 1];
            cpu.set_lr(lr).unwrap();
            dev.set_lr(gpu, lr).unwrap();
            for t in &mut ts {
                let n = t.param.len();
                t.grad = randn(&mut rng, n, 0.3)
                    .iter()
                    .map(|&x| G::from_f64(x))
                    .collect();
                t.param = poison(n);
            }
            // Device copies of the inputs.
            let mut d: Vec<_> = ts
                .iter()
                .zip(TENSORS)
                .map(|(t, (_, off))| {
                    (
                        upload(gpu, &t.src_p, off, P::default()),
                        upload(gpu, &t.src_m, off, 0.0f32),
                        upload(gpu, &t.param, off, P::default()),
                        upload(gpu, &t.grad, off, G::default()),
                        upload(gpu, &t.m, off, 0.0f32),
                        upload(gpu, &t.v, off, 0.0f32),
                    )
                })
                .collect();
            {
                let views: Vec<DeviceUpdateTensor<P, G>> = d
                    .iter_mut()
                    .zip(TENSORS)
                    .enumerate()
                    .map(|(k, ((sp, sm, p, g, m, v), (n, off)))| DeviceUpdateTensor {
                        weights: if master {
                            DeviceWeights::Master {
                                master: sm.slice_mut(off..off + n),
                                param: p.slice_mut(off..off + n),
                            }
                        } else {
                            DeviceWeights::Restore {
                                backup: sp.slice(off..off + n),
                                param: p.slice_mut(off..off + n),
                            }
                        },
                        grad: if (k, step) == NO_GRAD {
                            None
                        } else {
                            Some(g.slice(off..off + n))
                        },
                        m: opt.uses_m().then(|| m.slice_mut(off..off + n)),
                        v: opt.uses_v().then(|| v.slice_mut(off..off + n)),
                        weight_decay: ts[k].decays,
                    })
                    .collect();
                let group = UpdateGroup::new(gpu, views).unwrap();
                dev.step(gpu, &group).unwrap();
            }
            // The CPU reference on the same inputs.
            {
                let mut ups: Vec<UpdateTensor<P, G>> = ts
                    .iter_mut()
                    .enumerate()
                    .map(|(k, t)| UpdateTensor {
                        weights: if master {
                            Weights::Master {
                                master: &mut t.src_m,
                                param: &mut t.param,
                            }
                        } else {
                            Weights::Restore {
                                backup: &t.src_p,
                                param: &mut t.param,
                            }
                        },
                        grad: if (k, step) == NO_GRAD {
                            None
                        } else {
                            Some(&t.grad[..])
                        },
                        m: &mut t.m,
                        v: &mut t.v,
                        weight_decay: t.decays,
                    })
                    .collect();
                cpu.step(&mut ups).unwrap();
            }
            assert_eq!(
                dev.counter(gpu).unwrap(),
                cpu.counter(),
                "step counter after step {step}"
            );
            for (k, (t, (dsp, dsm, dp, _, dm, dv))) in ts.iter_mut().zip(&d).enumerate() {
                let off = TENSORS[k].1;
                let ctx = format!("{opt:?} master={master} step {step} tensor {k}");
                assert_eq!(
                    bits(&download(gpu, dp, off)),
                    bits(&t.param),
                    "param: {ctx}"
                );
                if master {
                    assert_eq!(
                        bits(&download(gpu, dsm, off)),
                        bits(&t.src_m),
                        "master: {ctx}"
                    );
                } else {
                    // The backup is read only.
                    assert_eq!(
                        bits(&download(gpu, dsp, off)),
                        bits(&t.src_p),
                        "backup: {ctx}"
                    );
                }
                if opt.uses_m() {
                    assert_eq!(bits(&download(gpu, dm, off)), bits(&t.m), "m: {ctx}");
                }
                if opt.uses_v() {
                    assert_eq!(bits(&download(gpu, dv, off)), bits(&t.v), "v: {ctx}");
                }
                // The next step restores from this one's result.
                if !master {
                    t.src_p = t.param.clone();
                }
            }
        }
    }

    fn all_optimizers() -> [BaseOptimizer; 4] {
        [
            adamw_cfg(),
            BaseOptimizer::Sgd {
                momentum: 0.9,
                dampening: 0.1,
                weight_decay: 1e-2,
                nesterov: false,
            },
            BaseOptimizer::Sgd {
                momentum: 0.9,
                dampening: 0.0,
                weight_decay: 1e-2,
                nesterov: true,
            },
            BaseOptimizer::Sgd {
                momentum: 0.0,
                dampening: 0.0,
                weight_decay: 1e-2,
                nesterov: false,
            },
        ]
    }

    #[test]
    fn gpu_update_matches_cpu_bit_for_bit() {
        let gpu = gpu_or_skip!();
        for opt in all_optimizers() {
            run::<f32, f32>(&gpu, opt, false);
            run::<bf16, bf16>(&gpu, opt, false);
            run::<bf16, f32>(&gpu, opt, true);
            run::<f16, f16>(&gpu, opt, true);
            run::<f16, f32>(&gpu, opt, false);
        }
    }

    #[test]
    fn gpu_step_count_and_bad_groups() {
        let gpu = gpu_or_skip!();
        let mut dev = GpuOptimizer::new(&gpu, adamw_cfg(), 1e-3).unwrap();
        dev.set_step_count(&gpu, 41).unwrap();
        assert_eq!(
            dev.counter(&gpu).unwrap(),
            tram_kernels::StepCounter::at(&adamw_cfg(), 41)
        );
        assert!(matches!(
            dev.set_lr(&gpu, f32::NAN),
            Err(Error::InvalidArgument(_))
        ));
        let s = gpu.stream();
        let backup = s.clone_htod(&[1.0f32; 8]).unwrap();
        let mut param = s.clone_htod(&[0.0f32; 8]).unwrap();
        let g = s.clone_htod(&[1.0f32; 7]).unwrap();
        let bad = UpdateGroup::new(
            &gpu,
            vec![DeviceUpdateTensor::<f32, f32> {
                weights: DeviceWeights::Restore {
                    backup: backup.slice(..),
                    param: param.slice_mut(..),
                },
                grad: Some(g.slice(..)),
                m: None,
                v: None,
                weight_decay: false,
            }],
        );
        assert!(matches!(bad, Err(Error::InvalidArgument(_))));
        assert!(matches!(
            UpdateGroup::new::<f32, f32>(&gpu, vec![]),
            Err(Error::InvalidArgument(_))
        ));
        // AdamW needs m and v.
        let group = UpdateGroup::new(
            &gpu,
            vec![DeviceUpdateTensor::<f32, f32> {
                weights: DeviceWeights::Restore {
                    backup: backup.slice(..),
                    param: param.slice_mut(..),
                },
                grad: Some(g.slice(..7)),
                m: None,
                v: None,
                weight_decay: false,
            }],
        );
        assert!(group.is_err(), "grad shorter than param");
        let full_g = s.clone_htod(&[1.0f32; 8]).unwrap();
        let group = UpdateGroup::new(
            &gpu,
            vec![DeviceUpdateTensor::<f32, f32> {
                weights: DeviceWeights::Restore {
                    backup: backup.slice(..),
                    param: param.slice_mut(..),
                },
                grad: Some(full_g.slice(..)),
                m: None,
                v: None,
                weight_decay: false,
            }],
        )
        .unwrap();
        assert!(matches!(
            dev.step(&gpu, &group),
            Err(Error::InvalidArgument(_))
        ));
    }
}
