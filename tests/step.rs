//! The TRAM step API: configuration and description checks, misuse refused,
//! AMP's skip, resume, gradient toggles and the base step on the CPU; the
//! same on the CUDA backend against the CPU; one generic training loop run
//! on both; and a whole step captured into a CUDA graph with the backend as
//! `CudaBackend::new` gives it, replayed against uncaptured steps.
//!
//! Every GPU test holds `common::serial()`: this binary captures graphs.

#[macro_use]
mod common;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::kl_div::Logits;
use tram_kernels::cpu::step::{Perturbation, Tensor, TramStep};
use tram_kernels::step::STEP_DTYPES;
use tram_kernels::{
    bf16, f16, BaseOptimizer, Error, Geometry, KlOptions, NoiseConfig, NoiseDistribution,
    StepCounter, StepStatus, Tram, TramConfig, TramVariant,
};

fn theta_cfg() -> TramConfig {
    TramConfig {
        delta: 0.5,
        geometry: Geometry::Adaptive { eta: 0.01 },
        kl: KlOptions::default(),
        variant: TramVariant::Theta { lambda: 0.9 },
        optimizer: BaseOptimizer::adamw(0.01),
        lr: 1e-2,
    }
}

fn noise() -> NoiseConfig {
    NoiseConfig {
        distribution: NoiseDistribution::Gaussian,
        sigma: 0.1,
        seed: 5,
    }
}

fn rand_vec(rng: &mut SmallRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-s..s)).collect()
}

fn bits(x: &[Vec<f32>]) -> Vec<Vec<u32>> {
    x.iter()
        .map(|v| v.iter().map(|f| f.to_bits()).collect())
        .collect()
}

/// A report as bits (a NaN norm equals itself).
fn report_bits(r: &tram_kernels::StepReport) -> (u32, u32, u32, u64, u64) {
    (
        r.status.0,
        r.perturb.0,
        r.divergence.to_bits(),
        r.norm.to_bits(),
        r.rho.to_bits(),
    )
}

fn invalid<T: std::fmt::Debug>(r: tram_kernels::Result<T>, says: &str) {
    match r {
        Err(Error::InvalidArgument(m)) => assert!(m.contains(says), "{m:?} should say {says:?}"),
        other => panic!("expected InvalidArgument saying {says:?}, got {other:?}"),
    }
}

const SIZES: [usize; 3] = [5, 1000, 0];
const ROWS: usize = 4;
const VOCAB: usize = 97;

/// The host buffers of a small model, every role of in-place TRAM-θ + AdamW.
#[derive(Clone, Debug)]
struct Host {
    theta: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    backups: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    targets: Vec<Vec<f32>>,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Host {
    fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut set =
            |s: f32| -> Vec<Vec<f32>> { SIZES.iter().map(|&n| rand_vec(&mut rng, n, s)).collect() };
        let theta = set(1.0);
        let grads = set(0.1);
        let targets = set(1.0);
        let m = set(0.01);
        let v: Vec<Vec<f32>> = set(0.01)
            .into_iter()
            .map(|x| x.iter().map(|y| y * y).collect())
            .collect();
        let backups = SIZES.iter().map(|&n| vec![f32::NAN; n]).collect();
        let a = rand_vec(&mut rng, ROWS * VOCAB, 3.0);
        let b = a
            .iter()
            .map(|x| x + rng.random_range(-0.2f32..0.2))
            .collect();
        Self {
            theta,
            grads,
            backups,
            m,
            v,
            targets,
            a,
            b,
        }
    }

    fn tensors(&mut self) -> Vec<Tensor<'_, f32>> {
        let mut out = Vec::new();
        let it = self
            .theta
            .iter_mut()
            .zip(&self.grads)
            .zip(self.backups.iter_mut())
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .zip(self.targets.iter_mut());
        for (i, ((((p, g), b), (m, v)), t)) in it.enumerate() {
            out.push(Tensor {
                param: p,
                grad: Some(g),
                perturbation: Perturbation::Backup(b),
                m: Some(m),
                v: Some(v),
                target: Some(t),
                weight_decay: i != 0,
            });
        }
        out
    }

    fn first(&mut self, step: &mut TramStep<f32>) -> tram_kernels::Result<()> {
        let (a, b) = (self.a.clone(), self.b.clone());
        let ta = Logits::dense(&a, ROWS, VOCAB)?;
        let tb = Logits::dense(&b, ROWS, VOCAB)?;
        step.first_step(&mut self.tensors(), &ta, &tb, None)
    }

    fn second(&mut self, step: &mut TramStep<f32>) -> tram_kernels::Result<()> {
        step.second_step(&mut self.tensors())
    }

    /// Every buffer, as bits (NaN backups compare equal to themselves).
    fn all_bits(&self) -> Vec<Vec<u32>> {
        let mut all = self.state_bits();
        all.extend(bits(&self.grads));
        all.extend(bits(&self.backups));
        all.push(self.a.iter().map(|x| x.to_bits()).collect());
        all.push(self.b.iter().map(|x| x.to_bits()).collect());
        all
    }

    fn state_bits(&self) -> Vec<Vec<u32>> {
        let mut all = bits(&self.theta);
        all.extend(bits(&self.m));
        all.extend(bits(&self.v));
        all.extend(bits(&self.targets));
        all
    }
}

fn cpu_step(host: &mut Host, cfg: TramConfig) -> TramStep<f32> {
    TramStep::new(cfg, &host.tensors()).unwrap()
}

#[test]
fn bad_configuration_is_an_error_at_construction() {
    let mut host = Host::new(1);
    let ok = theta_cfg();
    let bad = [
        TramConfig { delta: -0.1, ..ok },
        TramConfig {
            delta: f32::NAN,
            ..ok
        },
        TramConfig {
            variant: TramVariant::Theta { lambda: 1.5 },
            ..ok
        },
        TramConfig {
            optimizer: BaseOptimizer::AdamW {
                beta1: 1.0,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            ..ok
        },
        TramConfig { lr: -1.0, ..ok },
        TramConfig {
            geometry: Geometry::Fisher { eta: -1.0 },
            ..ok
        },
        TramConfig {
            kl: KlOptions {
                temperature: 0.0,
                ..KlOptions::default()
            },
            ..ok
        },
    ];
    for cfg in bad {
        assert!(
            matches!(
                TramStep::<f32>::new(cfg, &host.tensors()),
                Err(Error::InvalidArgument(_))
            ),
            "{cfg:?}"
        );
    }
}

#[test]
fn bad_descriptions_are_errors_that_say_what_to_change() {
    let mut host = Host::new(2);
    let cfg = theta_cfg();
    // A length that differs from θ's.
    let mut short = host.clone();
    short.m[1].pop();
    invalid(TramStep::<f32>::new(cfg, &short.tensors()), "m has 999");
    let mut short = host.clone();
    short.grads[0].push(0.0);
    invalid(TramStep::<f32>::new(cfg, &short.tensors()), "grad has 6");
    // Roles the configuration needs, and roles it has no use for.
    {
        let mut t = host.tensors();
        t[1].v = None;
        invalid(TramStep::<f32>::new(cfg, &t), "keeps a state buffer v");
    }
    {
        let mut t = host.tensors();
        t[0].target = None;
        invalid(TramStep::<f32>::new(cfg, &t), "TRAM-θ needs a target");
    }
    let x = TramConfig {
        variant: TramVariant::X { noise: noise() },
        ..cfg
    };
    invalid(
        TramStep::<f32>::new(x, &host.tensors()),
        "TRAM-x keeps none",
    );
    let sgd = TramConfig {
        optimizer: BaseOptimizer::Sgd {
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        },
        ..cfg
    };
    invalid(TramStep::<f32>::new(sgd, &host.tensors()), "remove it");
    // Mixed perturbation kinds.
    let mut spare = vec![0.0f32; SIZES[1]];
    {
        let mut t = host.tensors();
        t[1].perturbation = Perturbation::Out(&mut spare);
        invalid(TramStep::<f32>::new(cfg, &t), "same kind");
    }
    // No tensors.
    invalid(TramStep::<f32>::new(cfg, &[]), "at least one tensor");
    // A dtype pair the CUDA step has no kernels for: refused on the CPU too.
    let mut p16 = vec![f16::ZERO; 4];
    let mut b16 = p16.clone();
    let g32 = vec![0.0f32; 4];
    let (mut m, mut v, mut tg) = (vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; 4]);
    let t = [Tensor::<f16, f32> {
        param: &mut p16,
        grad: Some(&g32),
        perturbation: Perturbation::Backup(&mut b16),
        m: Some(&mut m),
        v: Some(&mut v),
        target: Some(&mut tg),
        weight_decay: false,
    }];
    invalid(TramStep::<f16, f32>::new(cfg, &t), "f16/f16, bf16/bf16");
    assert!(!STEP_DTYPES.contains(&(tram_kernels::DType::F16, tram_kernels::DType::F32)));
    // A call must describe the tensors the step was built with.
    let mut step = cpu_step(&mut host, cfg);
    let mut other = Host::new(3);
    other.theta[1].push(0.0);
    other.grads[1].push(0.0);
    other.backups[1].push(0.0);
    other.m[1].push(0.0);
    other.v[1].push(0.0);
    other.targets[1].push(0.0);
    invalid(other.first(&mut step), "built for 1000 elements");
    // Nothing was written by the refused calls.
    assert_eq!(host.all_bits(), Host::new(2).all_bits());
}

#[test]
fn misuse_is_refused_with_what_to_call() {
    let mut host = Host::new(4);
    let mut step = cpu_step(&mut host, theta_cfg());
    let before = host.clone();
    // Second step without a first: θ would come from a backup never written.
    invalid(host.second(&mut step), "call first_step first");
    assert_eq!(host.all_bits(), before.all_bits(), "nothing written");
    host.first(&mut step).unwrap();
    let perturbed = host.clone();
    assert_eq!(bits(&host.backups), bits(&before.theta), "the backup is θ");
    // Two first steps in a row: the second would back up θ + ε.
    invalid(host.first(&mut step), "call second_step");
    invalid(step.base_step(&mut host.tensors()), "call second_step");
    invalid(
        step.set_has_grad(&[true; 3]),
        "between a first and a second step",
    );
    assert_eq!(host.all_bits(), perturbed.all_bits(), "nothing written");
    host.second(&mut step).unwrap();
    assert_eq!(step.step_count().unwrap(), 1);
    invalid(host.second(&mut step), "base_step");
}

#[test]
fn second_step_restores_updates_and_moves_the_target() {
    // The CPU step does what the CUDA step does: restore, AdamW with g₂, and
    // the TRAM-θ target from the new θ (which the old CPU step left out).
    let mut host = Host::new(5);
    let theta0 = host.theta.clone();
    let mut step = cpu_step(&mut host, theta_cfg());
    host.first(&mut step).unwrap();
    let r = step.report().unwrap();
    assert!(r.perturb.applied() && r.divergence > 0.0);
    assert_eq!(r.rho, 0.5 * r.divergence as f64);
    assert_ne!(host.theta, theta0, "θ was perturbed");
    let g2: Vec<Vec<f32>> = host
        .grads
        .iter()
        .map(|g| g.iter().map(|x| -0.5 * x).collect())
        .collect();
    host.grads = g2.clone();
    host.second(&mut step).unwrap();
    // The same with the lower-level operations, from θ0.
    let mut want = Host::new(5);
    let mut opt =
        tram_kernels::cpu::optimizer::FusedOptimizer::new(theta_cfg().optimizer, 1e-2).unwrap();
    let theta_src = theta0.clone();
    {
        let mut ups: Vec<_> = want
            .theta
            .iter_mut()
            .zip(&theta_src)
            .zip(&g2)
            .zip(want.m.iter_mut().zip(want.v.iter_mut()))
            .enumerate()
            .map(
                |(i, (((p, b), g), (m, v)))| tram_kernels::cpu::optimizer::UpdateTensor {
                    weights: tram_kernels::cpu::optimizer::Weights::Restore {
                        backup: b,
                        param: p,
                    },
                    grad: Some(&g[..]),
                    m,
                    v,
                    weight_decay: i != 0,
                },
            )
            .collect();
        let mut ts: Vec<&mut [f32]> = want.targets.iter_mut().map(|t| &mut t[..]).collect();
        opt.step_with_target(
            &mut ups,
            &mut ts,
            0.9,
            tram_kernels::cpu::optimizer::EmaSource::Param,
        )
        .unwrap();
    }
    assert_eq!(host.state_bits(), want.state_bits());
    assert_ne!(host.targets, Host::new(5).targets, "the target moved");
    assert_eq!(step.report().unwrap().status, StepStatus(0));
}

#[test]
fn amp_non_finite_gradients_skip_the_update() {
    for (case, first_bad) in [
        ("NaN in g₂", false),
        ("1e20 in g₂", false),
        ("inf in g₁", true),
    ] {
        let mut host = Host::new(6);
        let mut step = cpu_step(&mut host, theta_cfg());
        // One clean iteration first, so the state is not trivial.
        host.first(&mut step).unwrap();
        host.second(&mut step).unwrap();
        let before = host.clone();
        if first_bad {
            host.grads[1][7] = f32::INFINITY;
        }
        host.first(&mut step).unwrap();
        if first_bad {
            assert!(step.report().unwrap().perturb.found_inf(), "{case}");
            host.grads[1][7] = 0.5;
        } else {
            host.grads[1][3] = if case.starts_with("NaN") {
                f32::NAN
            } else {
                1e20
            };
        }
        host.second(&mut step).unwrap();
        let r = step.report().unwrap();
        assert!(r.status.skipped() && r.status.found_inf(), "{case}: {r:?}");
        let want = if first_bad {
            StepStatus::FOUND_INF_FIRST
        } else {
            StepStatus::FOUND_INF_SECOND
        };
        assert_ne!(r.status.0 & want, 0, "{case}: {r:?}");
        assert_eq!(bits(&host.theta), bits(&before.theta), "{case}: θ restored");
        assert_eq!(host.m, before.m, "{case}: m untouched");
        assert_eq!(host.v, before.v, "{case}: v untouched");
        assert_eq!(host.targets, before.targets, "{case}: target untouched");
        assert_eq!(step.step_count().unwrap(), 1, "{case}: count untouched");
        assert_eq!(
            step.noise_step().unwrap(),
            2,
            "{case}: the iteration counts"
        );
        // The next clean iteration updates again.
        host.grads = Host::new(6).grads;
        host.first(&mut step).unwrap();
        host.second(&mut step).unwrap();
        assert_eq!(step.report().unwrap().status, StepStatus(0), "{case}");
        assert_eq!(step.step_count().unwrap(), 2);
    }
}

#[test]
fn amp_unscales_both_steps() {
    // Gradients scaled by 2^12 with s = 2^-12 give the bits of unscaled ones:
    // s·g is exact in both steps, and ε does not depend on the scale.
    let run = |scale: f32| {
        let mut host = Host::new(7);
        for g in host.grads.iter_mut().flatten() {
            *g *= scale;
        }
        let mut step = cpu_step(&mut host, theta_cfg());
        step.set_inv_scale(1.0 / scale).unwrap();
        host.first(&mut step).unwrap();
        let perturbed = bits(&host.theta);
        host.second(&mut step).unwrap();
        (perturbed, host.state_bits(), step.report().unwrap())
    };
    let (p1, s1, r1) = run(1.0);
    let (p2, s2, r2) = run(4096.0);
    assert_eq!(p1, p2, "θ + ε");
    assert_eq!(s1, s2, "θ, m, v, θ̄");
    assert_eq!(r1.norm, r2.norm);
    invalid(
        cpu_step(&mut Host::new(7), theta_cfg()).set_inv_scale(0.0),
        "finite and > 0",
    );
}

#[test]
fn resume_from_state_is_bit_identical() {
    let cfg = theta_cfg();
    let lrs = [1e-2f32, 2e-2, 5e-3, 1e-2, 3e-3, 1e-3];
    // Uninterrupted.
    let mut a = Host::new(8);
    let mut sa = cpu_step(&mut a, cfg);
    for &lr in &lrs {
        sa.set_lr(lr).unwrap();
        a.first(&mut sa).unwrap();
        a.second(&mut sa).unwrap();
    }
    // Interrupted after three iterations: a checkpoint of the tensors and
    // the state, a new step object, and the rest.
    let mut b = Host::new(8);
    let mut sb = cpu_step(&mut b, cfg);
    for &lr in &lrs[..3] {
        sb.set_lr(lr).unwrap();
        b.first(&mut sb).unwrap();
        b.second(&mut sb).unwrap();
    }
    let (saved, state) = (b.clone(), sb.state().unwrap());
    drop(sb);
    let mut c = saved;
    let mut sc = cpu_step(&mut c, cfg);
    sc.set_state(&state).unwrap();
    assert_eq!(sc.state().unwrap(), state);
    for &lr in &lrs[3..] {
        sc.set_lr(lr).unwrap();
        c.first(&mut sc).unwrap();
        c.second(&mut sc).unwrap();
    }
    assert_eq!(c.state_bits(), a.state_bits());
    assert_eq!(sc.state().unwrap(), sa.state().unwrap());
}

#[test]
fn step_count_is_fast_for_any_count() {
    let mut host = Host::new(9);
    let mut step = cpu_step(&mut host, theta_cfg());
    let t0 = std::time::Instant::now();
    step.set_step_count(u64::MAX).unwrap();
    step.set_step_count(1_000_000_007).unwrap();
    assert!(t0.elapsed().as_secs_f64() < 0.5, "{:?}", t0.elapsed());
    let opt = theta_cfg().optimizer;
    let c = StepCounter::at(&opt, u64::MAX);
    assert_eq!((c.t, c.beta1_pow, c.beta2_pow), (u64::MAX, 0.0, 0.0));
    // Up to 2^20 the powers are those of advancing one step at a time.
    let mut adv = StepCounter::at(&opt, 0);
    for _ in 0..5000 {
        adv.advance(&opt);
    }
    assert_eq!(StepCounter::at(&opt, 5000), adv);
    // Beyond, binary powering: close to the exact power.
    let t = (1u64 << 20) + 3;
    let c = StepCounter::at(&opt, t);
    let want = (0.9f64.ln() * t as f64).exp();
    assert!(c.beta1_pow >= 0.0 && c.beta1_pow <= want * 1.01 + 1e-300);
    let c = StepCounter::at(&opt, 1 << 21);
    let want = (0.999f64.ln() * (1u64 << 21) as f64).exp();
    assert!(
        (c.beta2_pow - want).abs() <= 1e-9 * want,
        "{} {want}",
        c.beta2_pow
    );
    // The count saturates.
    let mut sat = StepCounter::at(&opt, u64::MAX);
    sat.advance(&opt);
    assert_eq!(sat.t, u64::MAX);
}

#[test]
fn base_step_and_gradient_toggles() {
    let mut host = Host::new(10);
    let mut step = cpu_step(&mut host, theta_cfg());
    // Tensor 1 sits out: not perturbed, no backup written, θ not updated,
    // its target still follows θ.
    step.set_has_grad(&[true, false, true]).unwrap();
    let before = host.clone();
    host.first(&mut step).unwrap();
    assert_eq!(bits(&host.theta[1..2]), bits(&before.theta[1..2]));
    assert!(
        host.backups[1].iter().all(|x| x.is_nan()),
        "no backup written"
    );
    assert_ne!(host.theta[0], before.theta[0]);
    host.second(&mut step).unwrap();
    assert_eq!(bits(&host.theta[1..2]), bits(&before.theta[1..2]));
    assert_eq!(host.m[1], before.m[1]);
    assert_ne!(host.targets[1], before.targets[1], "the target follows θ");
    assert_ne!(host.m[0], before.m[0]);
    // A description without a gradient is the same as a toggle.
    step.set_has_grad(&[true; 3]).unwrap();
    let before = host.clone();
    {
        let (a, b) = (host.a.clone(), host.b.clone());
        let mut t = host.tensors();
        t[0].grad = None;
        let (ta, tb) = (
            Logits::dense(&a, ROWS, VOCAB).unwrap(),
            Logits::dense(&b, ROWS, VOCAB).unwrap(),
        );
        step.first_step(&mut t, &ta, &tb, None).unwrap();
    }
    assert_eq!(bits(&host.theta[0..1]), bits(&before.theta[0..1]));
    // The second step needs the gradients of the tensors the first one took.
    {
        let mut t = host.tensors();
        t[1].grad = None;
        invalid(step.second_step(&mut t), "needs its gradient too");
    }
    host.second(&mut step).unwrap();
    // A step without perturbation: the base optimizer at θ.
    let before = host.clone();
    step.base_step(&mut host.tensors()).unwrap();
    let r = step.report().unwrap();
    assert_eq!(r.status, StepStatus(StepStatus::UNPERTURBED));
    assert_eq!(
        bits(&host.backups),
        bits(&before.backups),
        "no perturbation, no backup"
    );
    assert_ne!(host.theta, before.theta);
    assert_eq!(step.step_count().unwrap(), 3);
    invalid(step.set_has_grad(&[true; 2]), "2 has-gradient flags for 3");
}

#[test]
fn noise_follows_the_iterations_and_belongs_to_tram_x() {
    let cfg = TramConfig {
        variant: TramVariant::X { noise: noise() },
        ..theta_cfg()
    };
    let mut host = Host::new(11);
    let mut t = host.tensors();
    for x in t.iter_mut() {
        x.target = None;
    }
    let mut step = TramStep::<f32>::new(cfg, &t).unwrap();
    drop(t);
    let e: Vec<f32> = (0..1001).map(|i| i as f32 * 1e-3).collect();
    let mut got = vec![0.0f32; e.len()];
    let mut want = got.clone();
    for it in 0..3u64 {
        step.noise(&e, &mut got).unwrap();
        tram_kernels::cpu::noise::add_noise(&e, &mut want, &noise(), it).unwrap();
        assert_eq!(got, want, "iteration {it}");
        let mut t = host.tensors();
        for x in t.iter_mut() {
            x.target = None;
        }
        step.base_step(&mut t).unwrap();
    }
    step.set_noise_step(17).unwrap();
    step.noise(&e, &mut got).unwrap();
    tram_kernels::cpu::noise::add_noise(&e, &mut want, &noise(), 17).unwrap();
    assert_eq!(got, want);
    let mut theta = cpu_step(&mut host, theta_cfg());
    invalid(theta.noise(&e, &mut got), "TRAM-x");
}

#[test]
fn every_supported_dtype_pair_builds_on_the_cpu() {
    fn build<P: tram_kernels::Element, G: tram_kernels::Element>() {
        let mut p = vec![P::from_f32(1.0); 8];
        let mut b = p.clone();
        let g = vec![G::from_f32(0.5); 8];
        let (mut m, mut v) = (vec![0.0f32; 8], vec![0.0f32; 8]);
        let mut tg = vec![0.0f32; 8];
        let t = [Tensor::<P, G> {
            param: &mut p,
            grad: Some(&g),
            perturbation: Perturbation::Backup(&mut b),
            m: Some(&mut m),
            v: Some(&mut v),
            target: Some(&mut tg),
            weight_decay: false,
        }];
        TramStep::<P, G>::new(theta_cfg(), &t).unwrap();
    }
    build::<f32, f32>();
    build::<f16, f16>();
    build::<bf16, bf16>();
    build::<bf16, f32>();
}

/// A user's TRAM-θ loop, written once for any backend: softmax regression
/// on fixed data, gradients computed by the caller's "framework" (here the
/// host) and handed to the step through the backend's buffers.
mod generic {
    use super::*;

    pub const D: usize = 6;
    pub const C: usize = 5;
    pub const N: usize = 16;

    /// What a framework gives the loop: its buffers, described for the step.
    pub trait Model<S: Tram> {
        /// θ (W then b), as f32, as the buffers hold it now.
        fn theta(&self) -> Vec<Vec<f32>>;
        /// θ̄ as f32.
        fn targets(&self) -> Vec<Vec<f32>>;
        /// Writes the gradient buffers.
        fn set_grads(&mut self, g: &[Vec<f32>]);
        /// Runs `f` with this model's description.
        fn with<R>(&mut self, f: impl FnOnce(&mut S::Tensors<'_>) -> R) -> R;
        /// Runs `f` with the description and the two logit sets on the backend.
        fn with_logits<R>(
            &mut self,
            target: &[f32],
            model: &[f32],
            f: impl FnOnce(&mut S::Tensors<'_>, &S::Logits<'_, f32>, &S::Logits<'_, f32>) -> R,
        ) -> R;
    }

    pub fn data() -> (Vec<f32>, Vec<usize>) {
        let mut rng = SmallRng::seed_from_u64(99);
        let x = rand_vec(&mut rng, N * D, 1.0);
        let y = (0..N).map(|i| (i * 7 + i / 3) % C).collect();
        (x, y)
    }

    pub fn logits(theta: &[Vec<f32>], x: &[f32]) -> Vec<f32> {
        let (w, b) = (&theta[0], &theta[1]);
        let mut out = vec![0.0f32; N * C];
        for i in 0..N {
            for c in 0..C {
                let mut z = b[c] as f64;
                for k in 0..D {
                    z += x[i * D + k] as f64 * w[k * C + c] as f64;
                }
                out[i * C + c] = z as f32;
            }
        }
        out
    }

    /// Cross-entropy and its gradient.
    pub fn loss_grad(theta: &[Vec<f32>], x: &[f32], y: &[usize]) -> (f64, Vec<Vec<f32>>) {
        let z = logits(theta, x);
        let (mut gw, mut gb) = (vec![0.0f64; D * C], vec![0.0f64; C]);
        let mut loss = 0.0;
        for i in 0..N {
            let row = &z[i * C..(i + 1) * C];
            let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            loss += -(row[y[i]] as f64 - m - s.ln());
            for c in 0..C {
                let p = (row[c] as f64 - m).exp() / s - (c == y[i]) as u8 as f64;
                gb[c] += p / N as f64;
                for k in 0..D {
                    gw[k * C + c] += p * x[i * D + k] as f64 / N as f64;
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|g| g as f32).collect();
        (loss / N as f64, vec![f(gw), f(gb)])
    }

    /// The loop: returns the loss before each iteration.
    pub fn train<S: Tram, M: Model<S>>(
        step: &mut S,
        model: &mut M,
        iters: usize,
    ) -> tram_kernels::Result<Vec<f64>> {
        let (x, y) = data();
        let mut losses = Vec::new();
        for _ in 0..iters {
            let theta = model.theta();
            let (loss, g1) = loss_grad(&theta, &x, &y);
            losses.push(loss);
            model.set_grads(&g1);
            let (zt, zm) = (logits(&model.targets(), &x), logits(&theta, &x));
            model.with_logits(&zt, &zm, |t, a, b| step.first_step(t, a, b, None))?;
            let (_, g2) = loss_grad(&model.theta(), &x, &y);
            model.set_grads(&g2);
            model.with(|t| step.second_step(t))?;
        }
        Ok(losses)
    }

    pub fn cfg() -> TramConfig {
        TramConfig {
            delta: 0.5,
            geometry: Geometry::Sam,
            kl: KlOptions::default(),
            variant: TramVariant::Theta { lambda: 0.5 },
            optimizer: BaseOptimizer::adamw(0.0),
            lr: 5e-2,
        }
    }

    pub fn init() -> Vec<Vec<f32>> {
        let mut rng = SmallRng::seed_from_u64(5);
        vec![rand_vec(&mut rng, D * C, 0.1), rand_vec(&mut rng, C, 0.1)]
    }

    /// The CPU framework: plain vectors.
    pub struct CpuModel {
        pub bufs: [Vec<Vec<f32>>; 6],
    }

    impl CpuModel {
        pub fn new() -> Self {
            let th = init();
            let z: Vec<Vec<f32>> = th.iter().map(|t| vec![0.0; t.len()]).collect();
            Self {
                bufs: [th.clone(), z.clone(), z.clone(), z.clone(), z, th],
            }
        }
    }

    impl Model<TramStep<f32>> for CpuModel {
        fn theta(&self) -> Vec<Vec<f32>> {
            self.bufs[0].clone()
        }
        fn targets(&self) -> Vec<Vec<f32>> {
            self.bufs[5].clone()
        }
        fn set_grads(&mut self, g: &[Vec<f32>]) {
            self.bufs[1] = g.to_vec();
        }
        fn with<R>(&mut self, f: impl FnOnce(&mut [Tensor<'_, f32>]) -> R) -> R {
            let [th, g, bk, m, v, tg] = &mut self.bufs;
            let mut t: Vec<Tensor<'_, f32>> = th
                .iter_mut()
                .zip(g.iter())
                .zip(bk.iter_mut())
                .zip(m.iter_mut().zip(v.iter_mut()))
                .zip(tg.iter_mut())
                .map(|((((p, g), b), (m, v)), x)| Tensor {
                    param: p,
                    grad: Some(g),
                    perturbation: Perturbation::Backup(b),
                    m: Some(m),
                    v: Some(v),
                    target: Some(x),
                    weight_decay: false,
                })
                .collect();
            f(&mut t)
        }
        fn with_logits<R>(
            &mut self,
            target: &[f32],
            model: &[f32],
            f: impl FnOnce(&mut [Tensor<'_, f32>], &Logits<'_, f32>, &Logits<'_, f32>) -> R,
        ) -> R {
            let a = Logits::dense(target, N, C).unwrap();
            let b = Logits::dense(model, N, C).unwrap();
            self.with(|t| f(t, &a, &b))
        }
    }
}

#[test]
fn generic_loop_trains_on_the_cpu() {
    let mut model = generic::CpuModel::new();
    let mut step = model
        .with(|t| TramStep::<f32>::new(generic::cfg(), t))
        .unwrap();
    let losses = generic::train(&mut step, &mut model, 30).unwrap();
    assert!(
        losses[29] < 0.8 * losses[0],
        "the loss fell from {} to {}",
        losses[0],
        losses[29]
    );
}

use generic::Model;

mod gpu {
    use super::generic::{self, Model};
    use super::*;
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use cudarc::driver::CudaSlice;
    use tram_kernels::cuda::buffer::{DevMut, DevRef};
    use tram_kernels::cuda::kl_div::DeviceLogits;
    use tram_kernels::cuda::step::{
        Perturbation as DevPerturbation, Tensor as DevTensor, TramStep as GpuStep,
    };
    use tram_kernels::cuda::CudaBackend;

    /// The device twin of `Host`.
    struct Dev {
        theta: Vec<CudaSlice<f32>>,
        grads: Vec<CudaSlice<f32>>,
        backups: Vec<CudaSlice<f32>>,
        m: Vec<CudaSlice<f32>>,
        v: Vec<CudaSlice<f32>>,
        targets: Vec<CudaSlice<f32>>,
        a: CudaSlice<f32>,
        b: CudaSlice<f32>,
    }

    fn up(gpu: &CudaBackend, x: &[Vec<f32>]) -> Vec<CudaSlice<f32>> {
        // Empty tensors get a one-element allocation (cudarc refuses zero).
        x.iter()
            .map(|v| {
                if v.is_empty() {
                    gpu.stream().alloc_zeros(1).unwrap()
                } else {
                    gpu.stream().clone_htod(v).unwrap()
                }
            })
            .collect()
    }

    fn down(gpu: &CudaBackend, x: &[CudaSlice<f32>], like: &[Vec<f32>]) -> Vec<Vec<f32>> {
        x.iter()
            .zip(like)
            .map(|(d, l)| {
                let mut v = gpu.stream().clone_dtoh(d).unwrap();
                v.truncate(l.len());
                v
            })
            .collect()
    }

    impl Dev {
        fn new(gpu: &CudaBackend, h: &Host) -> Self {
            Self {
                theta: up(gpu, &h.theta),
                grads: up(gpu, &h.grads),
                backups: up(gpu, &h.backups),
                m: up(gpu, &h.m),
                v: up(gpu, &h.v),
                targets: up(gpu, &h.targets),
                a: gpu.stream().clone_htod(&h.a).unwrap(),
                b: gpu.stream().clone_htod(&h.b).unwrap(),
            }
        }

        fn tensors(&mut self) -> Vec<DevTensor<'_, f32>> {
            let mut out = Vec::new();
            let it = self
                .theta
                .iter_mut()
                .zip(&self.grads)
                .zip(self.backups.iter_mut())
                .zip(self.m.iter_mut().zip(self.v.iter_mut()))
                .zip(self.targets.iter_mut());
            for (i, ((((p, g), b), (m, v)), t)) in it.enumerate() {
                let n = SIZES[i];
                fn sub(x: &mut CudaSlice<f32>, n: usize) -> DevMut<'_, f32> {
                    DevMut::from_view(x.slice_mut(..n))
                }
                let sub = |x| sub(x, n);
                out.push(DevTensor {
                    param: sub(p),
                    grad: Some(DevRef::from_view(g.slice(..n))),
                    perturbation: DevPerturbation::Backup(sub(b)),
                    m: Some(sub(m)),
                    v: Some(sub(v)),
                    target: Some(sub(t)),
                    weight_decay: i != 0,
                });
            }
            out
        }

        fn host(&self, gpu: &CudaBackend, like: &Host) -> Host {
            Host {
                theta: down(gpu, &self.theta, &like.theta),
                grads: down(gpu, &self.grads, &like.grads),
                backups: down(gpu, &self.backups, &like.backups),
                m: down(gpu, &self.m, &like.m),
                v: down(gpu, &self.v, &like.v),
                targets: down(gpu, &self.targets, &like.targets),
                a: gpu.stream().clone_dtoh(&self.a).unwrap(),
                b: gpu.stream().clone_dtoh(&self.b).unwrap(),
            }
        }

        fn first(&mut self, step: &mut GpuStep<f32>) -> tram_kernels::Result<()> {
            let (a, b) = (self.a.clone(), self.b.clone());
            let ta = DeviceLogits::dense(a.slice(..), ROWS, VOCAB)?;
            let tb = DeviceLogits::dense(b.slice(..), ROWS, VOCAB)?;
            step.first_step(&mut self.tensors(), &ta, &tb, None)
        }

        fn set_grads(&mut self, gpu: &CudaBackend, g: &[Vec<f32>]) {
            for (d, h) in self.grads.iter_mut().zip(g) {
                if !h.is_empty() {
                    gpu.stream().memcpy_htod(h, d).unwrap();
                }
            }
        }
    }

    fn gpu_step(gpu: &CudaBackend, dev: &mut Dev, cfg: TramConfig) -> GpuStep<f32> {
        GpuStep::new(gpu, cfg, &dev.tensors(), ROWS).unwrap()
    }

    /// The whole-state bits the CPU and CUDA steps must agree on after an
    /// iteration (θ, m, v, θ̄; the backups too).
    fn agree(gpu: &CudaBackend, dev: &Dev, host: &Host, what: &str) {
        let d = dev.host(gpu, host);
        assert_eq!(d.state_bits(), host.state_bits(), "{what}: θ, m, v, θ̄");
        assert_eq!(bits(&d.backups), bits(&host.backups), "{what}: backups");
    }

    #[test]
    fn gpu_step_matches_cpu_step_through_misuse_amp_and_toggles() {
        let _serial = common::serial();
        let gpu = gpu_or_skip!();
        let mut host = Host::new(21);
        let mut dev = Dev::new(&gpu, &host);
        let mut cs = cpu_step(&mut host, theta_cfg());
        let mut gs = gpu_step(&gpu, &mut dev, theta_cfg());
        // Misuse is refused the same way, before anything is enqueued.
        invalid(gs.second_step(&mut dev.tensors()), "call first_step first");
        let iters: [(&str, [bool; 3], f32, Option<f32>); 5] = [
            ("plain", [true; 3], 1.0, None),
            ("toggled", [false, true, true], 1.0, None),
            ("scaled", [true; 3], 0.25, None),
            ("NaN in g2", [true; 3], 1.0, Some(f32::NAN)),
            ("huge g2", [true, true, false], 0.5, Some(4e19)),
        ];
        let mut rng = SmallRng::seed_from_u64(23);
        for (i, (what, has, s, bad)) in iters.into_iter().enumerate() {
            // A fresh g₁ (the same on both).
            let g1: Vec<Vec<f32>> = SIZES.iter().map(|&n| rand_vec(&mut rng, n, 0.1)).collect();
            host.grads = g1.clone();
            dev.set_grads(&gpu, &g1);
            cs.set_has_grad(&has).unwrap();
            gs.set_has_grad(&has).unwrap();
            cs.set_inv_scale(s).unwrap();
            gs.set_inv_scale(s).unwrap();
            cs.set_lr(1e-2 * (i + 1) as f32).unwrap();
            gs.set_lr(1e-2 * (i + 1) as f32).unwrap();
            host.first(&mut cs).unwrap();
            dev.first(&mut gs).unwrap();
            invalid(dev.first(&mut gs), "call second_step");
            let (rc, rg) = (cs.report().unwrap(), gs.report().unwrap());
            assert_eq!(rc.perturb, rg.perturb, "{what}");
            assert!(
                (rc.divergence - rg.divergence).abs() <= 1e-4 * rc.divergence,
                "{what}: d {} vs {}",
                rc.divergence,
                rg.divergence
            );
            assert!((rc.norm - rg.norm).abs() <= 1e-6 * rc.norm, "{what}: norm");
            assert_eq!(
                bits(&dev.host(&gpu, &host).backups),
                bits(&host.backups),
                "{what}: backups"
            );
            // g₂ (the same on both), poisoned where the case says.
            let mut g2: Vec<Vec<f32>> = host
                .grads
                .iter()
                .map(|g| g.iter().map(|x| x * -0.7 + 0.01).collect())
                .collect();
            if let Some(b) = bad {
                g2[1][10] = b;
            }
            host.grads = g2.clone();
            dev.set_grads(&gpu, &g2);
            host.second(&mut cs).unwrap();
            gs.second_step(&mut dev.tensors()).unwrap();
            agree(&gpu, &dev, &host, what);
            let (rc, rg) = (cs.report().unwrap(), gs.report().unwrap());
            assert_eq!(rc.status, rg.status, "{what}");
            assert_eq!(rc.status.skipped(), bad.is_some(), "{what}: {rc:?}");
            assert_eq!(cs.state().unwrap(), gs.state().unwrap(), "{what}");
        }
        // A base step.
        cs.base_step(&mut host.tensors()).unwrap();
        gs.base_step(&mut dev.tensors()).unwrap();
        agree(&gpu, &dev, &host, "base step");
        assert_eq!(cs.report().unwrap().status, gs.report().unwrap().status);
        // Resume: a new CUDA step from the CPU step's state continues in step.
        let state = cs.state().unwrap();
        let mut gs2 = gpu_step(&gpu, &mut dev, theta_cfg());
        gs2.set_state(&state).unwrap();
        assert_eq!(gs2.state().unwrap(), state);
        gs2.set_step_count(u64::MAX).unwrap();
        assert_eq!(gs2.step_count().unwrap(), u64::MAX);
        gs2.set_state(&state).unwrap();
        host.first(&mut cs).unwrap();
        dev.first(&mut gs2).unwrap();
        host.second(&mut cs).unwrap();
        gs2.second_step(&mut dev.tensors()).unwrap();
        agree(&gpu, &dev, &host, "resumed");
        assert_eq!(cs.state().unwrap(), gs2.state().unwrap());
    }

    #[test]
    fn gpu_descriptions_are_checked_like_the_cpu_ones_and_for_addresses() {
        let _serial = common::serial();
        let gpu = gpu_or_skip!();
        let host = Host::new(22);
        let mut dev = Dev::new(&gpu, &host);
        let cfg = theta_cfg();
        {
            let mut t = dev.tensors();
            t[1].v = None;
            invalid(
                GpuStep::<f32>::new(&gpu, cfg, &t, ROWS),
                "keeps a state buffer v",
            );
        }
        // Two roles sharing memory: m is also v.
        {
            let mut t = dev.tensors();
            // SAFETY: nothing is launched: the description is refused.
            t[1].v = Some(unsafe { DevMut::from_raw(t[1].m.as_ref().unwrap().ptr(), SIZES[1]) });
            invalid(GpuStep::<f32>::new(&gpu, cfg, &t, ROWS), "overlap");
        }
        // A null or misaligned address of a non-empty buffer; an empty
        // tensor may have any address (as on the CPU).
        {
            let mut t = dev.tensors();
            // SAFETY: as above.
            t[1].m = Some(unsafe { DevMut::from_raw(0, SIZES[1]) });
            invalid(
                GpuStep::<f32>::new(&gpu, cfg, &t, ROWS),
                "null device pointer",
            );
            let mut t = dev.tensors();
            let p = t[1].m.as_ref().unwrap().ptr();
            // SAFETY: as above.
            t[1].m = Some(unsafe { DevMut::from_raw(p + 2, SIZES[1]) });
            invalid(GpuStep::<f32>::new(&gpu, cfg, &t, ROWS), "not aligned");
            let mut t = dev.tensors();
            // SAFETY: an empty tensor is never read or written.
            unsafe {
                t[2].param = DevMut::from_raw(0, 0);
                t[2].m = Some(DevMut::from_raw(0, 0));
            }
            assert!(GpuStep::<f32>::new(&gpu, cfg, &t, ROWS).is_ok());
        }
    }

    /// The device model of the generic loop.
    struct GpuModel {
        gpu: CudaBackend,
        bufs: Vec<Vec<CudaSlice<f32>>>,
    }

    impl GpuModel {
        fn new(gpu: &CudaBackend) -> Self {
            let cpu = generic::CpuModel::new();
            Self {
                gpu: gpu.clone(),
                bufs: cpu.bufs.iter().map(|b| up(gpu, b)).collect(),
            }
        }
        fn read(&self, k: usize) -> Vec<Vec<f32>> {
            self.bufs[k]
                .iter()
                .map(|d| self.gpu.stream().clone_dtoh(d).unwrap())
                .collect()
        }
    }

    impl Model<GpuStep<f32>> for GpuModel {
        fn theta(&self) -> Vec<Vec<f32>> {
            self.read(0)
        }
        fn targets(&self) -> Vec<Vec<f32>> {
            self.read(5)
        }
        fn set_grads(&mut self, g: &[Vec<f32>]) {
            for (d, h) in self.bufs[1].iter_mut().zip(g) {
                self.gpu.stream().memcpy_htod(h, d).unwrap();
            }
        }
        fn with<R>(&mut self, f: impl FnOnce(&mut [DevTensor<'_, f32>]) -> R) -> R {
            let [th, g, bk, m, v, tg] = &mut self.bufs[..] else {
                unreachable!()
            };
            let mut t: Vec<DevTensor<'_, f32>> = th
                .iter_mut()
                .zip(g.iter())
                .zip(bk.iter_mut())
                .zip(m.iter_mut().zip(v.iter_mut()))
                .zip(tg.iter_mut())
                .map(|((((p, g), b), (m, v)), x)| DevTensor {
                    param: DevMut::new(p),
                    grad: Some(DevRef::new(g)),
                    perturbation: DevPerturbation::Backup(DevMut::new(b)),
                    m: Some(DevMut::new(m)),
                    v: Some(DevMut::new(v)),
                    target: Some(DevMut::new(x)),
                    weight_decay: false,
                })
                .collect();
            f(&mut t)
        }
        fn with_logits<R>(
            &mut self,
            target: &[f32],
            model: &[f32],
            f: impl FnOnce(
                &mut [DevTensor<'_, f32>],
                &DeviceLogits<'_, f32>,
                &DeviceLogits<'_, f32>,
            ) -> R,
        ) -> R {
            let s = self.gpu.stream().clone();
            let (a, b) = (s.clone_htod(target).unwrap(), s.clone_htod(model).unwrap());
            let la = DeviceLogits::dense(a.slice(..), generic::N, generic::C).unwrap();
            let lb = DeviceLogits::dense(b.slice(..), generic::N, generic::C).unwrap();
            self.with(|t| f(t, &la, &lb))
        }
    }

    #[test]
    fn generic_loop_trains_on_both_backends_alike() {
        let _serial = common::serial();
        let gpu = gpu_or_skip!();
        let mut cm = generic::CpuModel::new();
        let mut cs = cm
            .with(|t| TramStep::<f32>::new(generic::cfg(), t))
            .unwrap();
        let mut gm = GpuModel::new(&gpu);
        let mut gs = gm
            .with(|t| GpuStep::<f32>::new(&gpu, generic::cfg(), t, generic::N))
            .unwrap();
        let lc = generic::train(&mut cs, &mut cm, 12).unwrap();
        let lg = generic::train(&mut gs, &mut gm, 12).unwrap();
        assert!(
            lc[11] < 0.9 * lc[0] && lg[11] < 0.9 * lg[0],
            "{lc:?} {lg:?}"
        );
        // The perturbations differ by rounding (norm, KL), so the runs
        // differ at that level only.
        for (a, b) in lc.iter().zip(&lg) {
            assert!((a - b).abs() <= 1e-4 * a.abs(), "{lc:?} vs {lg:?}");
        }
        assert_eq!(cs.step_count().unwrap(), gs.step_count().unwrap());
    }

    fn capture<F: FnOnce()>(gpu: &CudaBackend, f: F) -> cudarc::driver::CudaGraph {
        let s = gpu.stream();
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        f();
        s.end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a graph")
    }

    /// A whole step captured with the backend exactly as `CudaBackend::new`
    /// gives it (its own stream, cudarc's event tracking on), replayed with
    /// lr, δ, the loss scale, gradient toggles and new gradients changed
    /// between replays, against the same iterations run uncaptured.
    #[test]
    fn captured_step_replays_like_uncaptured_steps() {
        let _serial = common::serial();
        let gpu = gpu_or_skip!();
        assert!(gpu.context().is_event_tracking());
        let host = Host::new(31);
        let mut direct = Dev::new(&gpu, &host);
        let mut graphed = Dev::new(&gpu, &host);
        let mut sd = gpu_step(&gpu, &mut direct, theta_cfg());
        let mut sg = gpu_step(&gpu, &mut graphed, theta_cfg());
        gpu.synchronize().unwrap();
        // The description is built before the capture (taking the addresses
        // touches cudarc's events), used inside it, dropped after it.
        let (a, b) = (graphed.a.clone(), graphed.b.clone());
        let graph = {
            let ta = DeviceLogits::dense(a.slice(..), ROWS, VOCAB).unwrap();
            let tb = DeviceLogits::dense(b.slice(..), ROWS, VOCAB).unwrap();
            let mut t = graphed.tensors();
            capture(&gpu, || {
                sg.first_step(&mut t, &ta, &tb, None).unwrap();
                sg.second_step(&mut t).unwrap();
            })
        };
        assert_eq!(sg.step_count().unwrap(), 0, "capturing ran nothing");
        let mut rng = SmallRng::seed_from_u64(32);
        let schedule: [(f32, f32, f32, [bool; 3], bool); 5] = [
            (1e-2, 0.5, 1.0, [true; 3], false),
            (3e-2, 0.05, 0.5, [true; 3], false),
            (2e-3, 2.0, 1.0, [true, false, true], false),
            (2e-3, 0.3, 0.25, [true; 3], true),
            (5e-3, 0.3, 1.0, [false, true, true], false),
        ];
        for (i, (lr, delta, s, has, poison)) in schedule.into_iter().enumerate() {
            let mut g: Vec<Vec<f32>> = SIZES.iter().map(|&n| rand_vec(&mut rng, n, 0.1)).collect();
            if poison {
                g[1][5] = f32::NAN;
            }
            for (dev, step) in [(&mut direct, &mut sd), (&mut graphed, &mut sg)] {
                step.set_lr(lr).unwrap();
                step.set_delta(delta).unwrap();
                step.set_inv_scale(s).unwrap();
                dev.set_grads(&gpu, &g);
            }
            sd.set_has_grad(&has).unwrap();
            sg.set_has_grad(&has).unwrap();
            // The toggles reach the graph's tables through an uncaptured
            // refresh (a host-to-device copy), as a framework would do
            // before replaying.
            direct.first(&mut sd).unwrap();
            sd.second_step(&mut direct.tensors()).unwrap();
            sg.prepare(&mut graphed.tensors()).unwrap();
            graph.launch().unwrap();
            gpu.synchronize().unwrap();
            let (d, r) = (direct.host(&gpu, &host), graphed.host(&gpu, &host));
            assert_eq!(d.state_bits(), r.state_bits(), "replay {i}: θ, m, v, θ̄");
            assert_eq!(bits(&d.backups), bits(&r.backups), "replay {i}: backups");
            let (rd, rg) = (sd.report().unwrap(), sg.report().unwrap());
            assert_eq!(
                report_bits(&rd),
                report_bits(&rg),
                "replay {i}: {rd:?} {rg:?}"
            );
            assert_eq!(
                rg.rho,
                delta as f64 * rg.divergence as f64,
                "replay {i}: ρ = δ·d"
            );
            assert_eq!(rg.status.skipped(), poison, "replay {i}: {rg:?}");
            assert_eq!(sd.state().unwrap(), sg.state().unwrap(), "replay {i}");
        }
        assert_eq!(sg.step_count().unwrap(), 4);
        gpu.context().check_err().expect("no deferred cudarc error");
    }

    /// Buffers on another stream (§3 of issue 11): the launches record no
    /// events, so the caller orders that stream with the backend's. With
    /// `wait_for_stream` after writing a gradient there and
    /// `make_stream_wait` before that stream overwrites or frees it, the
    /// step equals the CPU's; under the emulator's deferred streams
    /// (`TRAM_EMU_DEFERRED=1`, where a missing order shows as stale or
    /// poisoned data) the same steps without them are shown to go wrong.
    #[test]
    fn buffers_on_other_streams_are_ordered_by_the_caller() {
        let _serial = common::serial();
        let gpu = gpu_or_skip!();
        let host = Host::new(51);
        let mut rng = SmallRng::seed_from_u64(52);
        let g1: Vec<Vec<f32>> = SIZES.iter().map(|&n| rand_vec(&mut rng, n, 0.1)).collect();
        let g2: Vec<Vec<f32>> = SIZES.iter().map(|&n| rand_vec(&mut rng, n, 0.1)).collect();
        // The CPU reference of one iteration.
        let mut want = host.clone();
        let mut cs = cpu_step(&mut want, theta_cfg());
        want.grads = g1.clone();
        want.first(&mut cs).unwrap();
        want.grads = g2.clone();
        want.second(&mut cs).unwrap();

        // `before`: the backend waits for the other stream's writes;
        // `after`: the other stream waits for the step before it overwrites
        // or frees the gradients.
        let run = |before: bool, after: bool| -> (Host, StepStatus) {
            let other = gpu.context().new_stream().unwrap();
            let mut dev = Dev::new(&gpu, &host);
            // The gradients live on the other stream, written there.
            dev.grads = g1
                .iter()
                .map(|g| {
                    if g.is_empty() {
                        other.alloc_zeros(1).unwrap()
                    } else {
                        other.clone_htod(g).unwrap()
                    }
                })
                .collect();
            let mut step = gpu_step(&gpu, &mut dev, theta_cfg());
            if before {
                gpu.wait_for_stream(&other).unwrap();
            }
            dev.first(&mut step).unwrap();
            if after {
                gpu.make_stream_wait(&other).unwrap();
            }
            for (d, h) in dev.grads.iter_mut().zip(&g2) {
                if !h.is_empty() {
                    other.memcpy_htod(h, d).unwrap();
                }
            }
            if before {
                gpu.wait_for_stream(&other).unwrap();
            }
            step.second_step(&mut dev.tensors()).unwrap();
            if after {
                gpu.make_stream_wait(&other).unwrap();
            }
            // Freed on the other stream (cudarc frees a slice on its own).
            dev.grads.clear();
            // The host waits for one stream, then the other: under deferred
            // streams each order runs the other stream's work only as far
            // as the events let it, which is what shows a missing one.
            if before {
                other.synchronize().unwrap();
                gpu.synchronize().unwrap();
            } else {
                gpu.synchronize().unwrap();
                other.synchronize().unwrap();
            }
            let status = step.report().unwrap().status;
            let mut got = dev.host(&gpu, &host);
            got.grads = want.grads.clone();
            (got, status)
        };
        let (got, status) = run(true, true);
        assert_eq!(status, StepStatus(0));
        assert_eq!(got.state_bits(), want.state_bits(), "ordered: θ, m, v, θ̄");
        assert_eq!(bits(&got.backups), bits(&want.backups), "ordered: backups");
        let deferred = std::env::var("TRAM_EMU_DEFERRED").is_ok_and(|v| v == "1");
        if common::emulated(&gpu) && deferred {
            for (before, after) in [(false, true), (true, false)] {
                let (bad, status) = run(before, after);
                assert!(
                    bad.state_bits() != want.state_bits() || status != StepStatus(0),
                    "without the ordering (before {before}, after {after}) the deferred \
                     device should have shown stale or poisoned gradients"
                );
                common::log(format_args!(
                    "deferred streams, ordering before {before} and after {after}: the step \
                     saw {status:?} and θ, m, v or θ̄ differ from the CPU's"
                ));
            }
        }
    }

    /// The device keeps the phase: graphs replayed out of order are caught
    /// (PHASE_ERROR) and do no harm.
    #[test]
    fn replayed_graphs_out_of_order_are_caught_on_the_device() {
        let _serial = common::serial();
        let gpu = gpu_or_skip!();
        let host = Host::new(41);
        let mut dev = Dev::new(&gpu, &host);
        let mut step = gpu_step(&gpu, &mut dev, theta_cfg());
        let (a, b) = (dev.a.clone(), dev.b.clone());
        let (first, second) = {
            let ta = DeviceLogits::dense(a.slice(..), ROWS, VOCAB).unwrap();
            let tb = DeviceLogits::dense(b.slice(..), ROWS, VOCAB).unwrap();
            let mut t = dev.tensors();
            let first = capture(&gpu, || step.first_step(&mut t, &ta, &tb, None).unwrap());
            let second = capture(&gpu, || step.second_step(&mut t).unwrap());
            (first, second)
        };
        // First twice, then second: the second first step is ignored, so θ
        // is restored from the backup of the first one and updated.
        first.launch().unwrap();
        first.launch().unwrap();
        second.launch().unwrap();
        gpu.synchronize().unwrap();
        let r = step.report().unwrap();
        assert!(r.status.phase_error(), "{r:?}");
        assert!(!r.status.skipped());
        let got = dev.host(&gpu, &host);
        // The CPU's one iteration with the same gradients.
        let mut want = host.clone();
        let mut cs = cpu_step(&mut want, theta_cfg());
        want.first(&mut cs).unwrap();
        want.second(&mut cs).unwrap();
        assert_eq!(got.state_bits(), want.state_bits());
        assert_eq!(bits(&got.backups), bits(&want.backups));
        // Second without first: run as a step without perturbation.
        second.launch().unwrap();
        gpu.synchronize().unwrap();
        let r = step.report().unwrap();
        assert_eq!(
            r.status.0,
            StepStatus::PHASE_ERROR | StepStatus::UNPERTURBED,
            "{r:?}"
        );
        cs.base_step(&mut want.tensors()).unwrap();
        assert_eq!(dev.host(&gpu, &host).state_bits(), want.state_bits());
        // In order again: clean.
        first.launch().unwrap();
        second.launch().unwrap();
        gpu.synchronize().unwrap();
        assert_eq!(step.report().unwrap().status, StepStatus(0));
    }
}
