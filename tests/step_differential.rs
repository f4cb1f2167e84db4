//! A seeded differential test of whole TRAM steps, CPU reference against the
//! CUDA backend (on the emulated device in CI), through the one step API.
//!
//! Every combination of variant (TRAM-θ, TRAM-x), perturbation mode (in
//! place, f32 master, out of place), supported dtype pair (f32/f32,
//! f16/f16, bf16/bf16, bf16/f32; the target f32 or the parameter type in
//! turn), geometry (SAM, adaptive, Fisher) and capture (direct calls, or
//! CUDA graphs captured once and replayed) is one case; the base optimizer
//! alternates between AdamW and SGD with Nesterov momentum. Each case runs
//! several iterations with, drawn from its seed: the tensors that have a
//! gradient, lr, δ, the loss scale (gradients scaled by its inverse), a row
//! mask, fresh logits and gradients, some steps without perturbation, and
//! faults (an inf/NaN gradient in either step, a gradient of at least 2⁶⁴
//! after unscaling).
//!
//! After every step it compares, at the documented bounds: the perturbation
//! status, d (1e-4 relative, the KL's bound), the norm (1e-6), ρ; θ + ε
//! (two ulps of the parameter type plus 2e-4 of ε: the GPU's ρ and norm
//! differ from the CPU's within those bounds, and each side rounds once);
//! the backups, the masters and every tensor without a gradient bit for bit;
//! and after every second or base step θ, the masters, m, v and the targets
//! bit for bit, the step status, the step count with its β powers and the
//! noise step. TRAM-x's noise is compared too (uniform bit for bit).
//!
//! `TRAM_DIFF_REPS=n` runs every combination n times with other seeds
//! (default 1); `TRAM_DIFF_SEED` moves the seeds. The case count is printed.

#[macro_use]
mod common;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, DeviceRepr};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::kl_div::Logits;
use tram_kernels::cpu::step::{Perturbation, Tensor, TramStep};
use tram_kernels::cuda::buffer::{DevMut, DevRef};
use tram_kernels::cuda::kl_div::DeviceLogits;
use tram_kernels::cuda::step::{
    Perturbation as DevPerturbation, Tensor as DevTensor, TramStep as DevStep,
};
use tram_kernels::cuda::CudaBackend;
use tram_kernels::step::PerturbMode;
use tram_kernels::{
    bf16, f16, BaseOptimizer, Element, Geometry, KlDirection, KlOptions, NoiseConfig,
    NoiseDistribution, Reduction, StepReport, Tram, TramConfig, TramVariant,
};

/// Tensor lengths: one crossing a 65,536-element chunk, one empty.
const SIZES: [usize; 4] = [7, 1500, 0, 66_000];
const ROWS: usize = 4;
const VOCAB: usize = 37;
const EMBED: usize = 301;
const ITERS: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Case {
    theta: bool,
    mode: PerturbMode,
    geometry: Geometry,
    captured: bool,
    sgd: bool,
    masked: bool,
    seed: u64,
}

fn config(c: &Case) -> TramConfig {
    TramConfig {
        delta: 1.0,
        geometry: c.geometry,
        kl: KlOptions {
            direction: if c.seed % 3 == 0 {
                KlDirection::Symmetric
            } else {
                KlDirection::Forward
            },
            reduction: Reduction::MeanRows,
            temperature: 1.0,
        },
        variant: if c.theta {
            TramVariant::Theta {
                lambda: if c.seed % 4 == 1 { 0.0 } else { 0.9 },
            }
        } else {
            TramVariant::X {
                noise: NoiseConfig {
                    distribution: NoiseDistribution::Uniform,
                    sigma: 0.1,
                    seed: c.seed,
                },
            }
        },
        optimizer: if c.sgd {
            BaseOptimizer::Sgd {
                momentum: 0.9,
                dampening: 0.0,
                weight_decay: 0.01,
                nesterov: true,
            }
        } else {
            BaseOptimizer::adamw(0.01)
        },
        lr: 1e-2,
    }
}

/// Every buffer of one model, on the host.
#[derive(Clone)]
struct Host<P, G, T> {
    params: Vec<Vec<P>>,
    grads: Vec<Vec<G>>,
    /// The backups or outputs (P), or nothing in master mode.
    copies: Vec<Vec<P>>,
    masters: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    targets: Vec<Vec<T>>,
}

fn rand_el<E: Element>(rng: &mut SmallRng, s: f32) -> E {
    E::from_f32(rng.random_range(-s..s))
}

fn rand_vec<E: Element>(rng: &mut SmallRng, n: usize, s: f32) -> Vec<E> {
    (0..n).map(|_| rand_el(rng, s)).collect()
}

impl<P: Element, G: Element, T: Element> Host<P, G, T> {
    fn new(c: &Case, rng: &mut SmallRng) -> Self {
        let set = |rng: &mut SmallRng, s: f32| -> Vec<Vec<f32>> {
            SIZES.iter().map(|&n| rand_vec(rng, n, s)).collect()
        };
        let params: Vec<Vec<P>> = SIZES.iter().map(|&n| rand_vec(rng, n, 1.0)).collect();
        // Masters hold θ exactly; poison elsewhere so nothing reads them.
        let masters = if c.mode == PerturbMode::Master {
            params
                .iter()
                .map(|p| p.iter().map(|x| x.to_f32()).collect())
                .collect()
        } else {
            vec![]
        };
        let copies = if c.mode == PerturbMode::Master {
            vec![]
        } else {
            SIZES
                .iter()
                .map(|&n| vec![P::from_f32(f32::NAN); n])
                .collect()
        };
        let m = set(rng, 0.01);
        let v = if c.sgd {
            vec![]
        } else {
            set(rng, 0.1)
                .into_iter()
                .map(|x| x.iter().map(|y| y * y).collect())
                .collect()
        };
        let targets = if c.theta {
            SIZES.iter().map(|&n| rand_vec(rng, n, 1.0)).collect()
        } else {
            vec![]
        };
        Self {
            params,
            grads: SIZES.iter().map(|&n| vec![G::from_f32(0.0); n]).collect(),
            copies,
            masters,
            m,
            v,
            targets,
        }
    }

    fn tensors(&mut self, c: &Case) -> Vec<Tensor<'_, P, G, T>> {
        let mut copies = self.copies.iter_mut();
        let mut masters = self.masters.iter_mut();
        let mut vs = self.v.iter_mut();
        let mut targets = self.targets.iter_mut();
        let mut out = Vec::new();
        for (i, ((p, g), m)) in self
            .params
            .iter_mut()
            .zip(&self.grads)
            .zip(self.m.iter_mut())
            .enumerate()
        {
            let perturbation = match c.mode {
                PerturbMode::InPlace => Perturbation::Backup(&mut copies.next().unwrap()[..]),
                PerturbMode::OutOfPlace => Perturbation::Out(&mut copies.next().unwrap()[..]),
                PerturbMode::Master => Perturbation::Master(&mut masters.next().unwrap()[..]),
            };
            out.push(Tensor {
                param: &mut p[..],
                grad: Some(&g[..]),
                perturbation,
                m: Some(&mut m[..]),
                v: vs.next().map(|v| &mut v[..]),
                target: targets.next().map(|t| &mut t[..]),
                weight_decay: i % 2 == 1,
            });
        }
        out
    }
}

/// The device twin: one allocation per buffer (empty tensors get one
/// element and are described as empty).
struct Dev<P, G, T> {
    params: Vec<CudaSlice<P>>,
    grads: Vec<CudaSlice<G>>,
    copies: Vec<CudaSlice<P>>,
    masters: Vec<CudaSlice<f32>>,
    m: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    targets: Vec<CudaSlice<T>>,
}

fn up<E: Element + DeviceRepr>(gpu: &CudaBackend, x: &[Vec<E>]) -> Vec<CudaSlice<E>> {
    x.iter()
        .map(|v| {
            if v.is_empty() {
                gpu.stream().clone_htod(&[E::from_f32(f32::NAN)]).unwrap()
            } else {
                gpu.stream().clone_htod(v).unwrap()
            }
        })
        .collect()
}

fn down<E: Element + DeviceRepr>(gpu: &CudaBackend, x: &[CudaSlice<E>]) -> Vec<Vec<E>> {
    x.iter()
        .zip(SIZES)
        .map(|(d, n)| {
            let mut v = gpu.stream().clone_dtoh(d).unwrap();
            v.truncate(n);
            v
        })
        .collect()
}

fn write<E: Element + DeviceRepr>(gpu: &CudaBackend, d: &mut [CudaSlice<E>], h: &[Vec<E>]) {
    for (d, h) in d.iter_mut().zip(h) {
        if !h.is_empty() {
            gpu.stream().memcpy_htod(h, d).unwrap();
        }
    }
}

fn sub<E>(x: &mut CudaSlice<E>, n: usize) -> DevMut<'_, E> {
    DevMut::from_view(x.slice_mut(..n))
}

impl<P, G, T> Dev<P, G, T>
where
    P: Element + DeviceRepr,
    G: Element + DeviceRepr,
    T: Element + DeviceRepr,
{
    fn new(gpu: &CudaBackend, h: &Host<P, G, T>) -> Self {
        Self {
            params: up(gpu, &h.params),
            grads: up(gpu, &h.grads),
            copies: up(gpu, &h.copies),
            masters: up(gpu, &h.masters),
            m: up(gpu, &h.m),
            v: up(gpu, &h.v),
            targets: up(gpu, &h.targets),
        }
    }

    fn tensors(&mut self, c: &Case) -> Vec<DevTensor<'_, P, G, T>> {
        let mut copies = self.copies.iter_mut();
        let mut masters = self.masters.iter_mut();
        let mut vs = self.v.iter_mut();
        let mut targets = self.targets.iter_mut();
        let mut out = Vec::new();
        for (i, ((p, g), m)) in self
            .params
            .iter_mut()
            .zip(&self.grads)
            .zip(self.m.iter_mut())
            .enumerate()
        {
            let n = SIZES[i];
            let perturbation = match c.mode {
                PerturbMode::InPlace => DevPerturbation::Backup(sub(copies.next().unwrap(), n)),
                PerturbMode::OutOfPlace => DevPerturbation::Out(sub(copies.next().unwrap(), n)),
                PerturbMode::Master => DevPerturbation::Master(sub(masters.next().unwrap(), n)),
            };
            out.push(DevTensor {
                param: sub(p, n),
                grad: Some(DevRef::from_view(g.slice(..n))),
                perturbation,
                m: Some(sub(m, n)),
                v: vs.next().map(|v| sub(v, n)),
                target: targets.next().map(|t| sub(t, n)),
                weight_decay: i % 2 == 1,
            });
        }
        out
    }

    fn host(&self, gpu: &CudaBackend) -> Host<P, G, T> {
        Host {
            params: down(gpu, &self.params),
            grads: down(gpu, &self.grads),
            copies: down(gpu, &self.copies),
            masters: down(gpu, &self.masters),
            m: down(gpu, &self.m),
            v: down(gpu, &self.v),
            targets: down(gpu, &self.targets),
        }
    }
}

fn bits<E: Element>(x: &[Vec<E>]) -> Vec<Vec<u32>> {
    x.iter()
        .map(|v| v.iter().map(|e| e.to_bits_u32()).collect())
        .collect()
}

/// The relative spacing of E's values (an ulp at 1).
fn eps<E: Element>() -> f64 {
    match E::DTYPE {
        tram_kernels::DType::F32 => f32::EPSILON as f64,
        tram_kernels::DType::F16 => 2f64.powi(-10),
        tram_kernels::DType::BF16 => 2f64.powi(-7),
    }
}

/// θ + ε at the bound: two ulps of the type at the value, plus 2e-4 of the
/// CPU's ε (the GPU's ρ and norm are within 1e-4 and 1e-6 of the CPU's),
/// NaN where the CPU has NaN.
fn close_perturbed<E: Element>(what: &str, got: &[E], want: &[E], theta: &[f32]) {
    for (i, ((a, b), t)) in got.iter().zip(want).zip(theta).enumerate() {
        let (a, b) = (a.to_f64(), b.to_f64());
        if b.is_nan() {
            assert!(a.is_nan(), "{what}[{i}]: {a} where the CPU has NaN");
            continue;
        }
        let e = (b - *t as f64).abs();
        let tol = 2.0 * eps::<E>() * b.abs() + 2e-4 * e + 1e-30;
        assert!(
            (a - b).abs() <= tol || a == b,
            "{what}[{i}]: GPU {a} vs CPU {b} (θ {t}, tolerance {tol:e})"
        );
    }
}

fn same_f64(a: f64, b: f64, rel: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= rel * b.abs()
}

fn compare_reports(what: &str, cpu: &StepReport, gpu: &StepReport) {
    assert_eq!(cpu.perturb, gpu.perturb, "{what}: perturbation status");
    assert!(
        same_f64(gpu.divergence as f64, cpu.divergence as f64, 1e-4),
        "{what}: d {} vs {}",
        gpu.divergence,
        cpu.divergence
    );
    assert!(
        same_f64(gpu.norm, cpu.norm, 1e-6),
        "{what}: norm {} vs {}",
        gpu.norm,
        cpu.norm
    );
    assert!(
        same_f64(gpu.rho, cpu.rho, 1.1e-4),
        "{what}: ρ {} vs {}",
        gpu.rho,
        cpu.rho
    );
}

/// What one iteration does, drawn from the case's seed.
#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// An inf gradient in the first step (its norm is not finite).
    First,
    /// A NaN gradient in the second step.
    SecondNan,
    /// A gradient of 2⁶⁵ after unscaling in the second step.
    SecondHuge,
}

struct Iteration {
    base: bool,
    has_grad: Vec<bool>,
    lr: f32,
    delta: f32,
    inv_scale: f32,
    fault: Fault,
}

fn draw(rng: &mut SmallRng, it: usize) -> Iteration {
    let base = it > 0 && rng.random_range(0..4) == 0;
    let has_grad = if it == 0 {
        vec![true; SIZES.len()]
    } else {
        (0..SIZES.len())
            .map(|_| rng.random_range(0..4) != 0)
            .collect()
    };
    let fault = if it == 0 {
        Fault::None
    } else {
        match rng.random_range(0..6) {
            0 => Fault::First,
            1 => Fault::SecondNan,
            2 => Fault::SecondHuge,
            _ => Fault::None,
        }
    };
    Iteration {
        base,
        has_grad,
        lr: [1e-3f32, 1e-2, 3e-2][rng.random_range(0..3)],
        delta: [0.1f32, 1.0, 5.0][rng.random_range(0..3)],
        inv_scale: [1.0f32, 0.0625, 8.0][rng.random_range(0..3)],
        fault,
    }
}

/// Gradients of the unscaled size 0.1 times 1/s, with `bad` written into
/// a gradient element of a tensor that takes part (if one does).
fn grads<G: Element>(rng: &mut SmallRng, s: f32, has: &[bool], bad: Option<f32>) -> Vec<Vec<G>> {
    let mut g: Vec<Vec<G>> = SIZES
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| G::from_f32(rng.random_range(-0.1f32..0.1) / s))
                .collect()
        })
        .collect();
    if let Some(b) = bad {
        if let Some(k) = (0..SIZES.len()).find(|&k| has[k] && SIZES[k] > 0) {
            let i = rng.random_range(0..SIZES[k]);
            g[k][i] = G::from_f32(b);
        }
    }
    g
}

/// The graphs of a captured case.
struct Graphs {
    first: CudaGraph,
    second: CudaGraph,
    base: CudaGraph,
}

fn capture(gpu: &CudaBackend, f: impl FnOnce()) -> CudaGraph {
    let s = gpu.stream();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    f();
    s.end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph")
}

/// What the iterations exercised, summed over the cases.
#[derive(Default, Debug)]
struct Seen {
    iterations: u64,
    base_steps: u64,
    skipped: u64,
    applied: u64,
    toggled: u64,
    scaled: u64,
}

fn run_case<P, G, T>(gpu: &CudaBackend, c: &Case, seen: &mut Seen)
where
    P: Element + DeviceRepr,
    G: Element + DeviceRepr,
    T: Element + DeviceRepr,
{
    let name = format!(
        "{}{}/{:?}/{}-{}-{}/{:?}/{}{}",
        if c.theta { "θ" } else { "x" },
        if c.sgd { "-sgd" } else { "-adamw" },
        c.mode,
        P::DTYPE.name(),
        G::DTYPE.name(),
        T::DTYPE.name(),
        c.geometry,
        if c.captured { "captured" } else { "direct" },
        if c.masked { "/masked" } else { "" },
    );
    let mut rng = SmallRng::seed_from_u64(c.seed);
    let cfg = config(c);
    let mut host: Host<P, G, T> = Host::new(c, &mut rng);
    let mut dev = Dev::new(gpu, &host);
    let mut cs = TramStep::<P, G, T>::new(cfg, &host.tensors(c)).unwrap();
    let mut ds = DevStep::<P, G, T>::new(gpu, cfg, &dev.tensors(c), ROWS).unwrap();
    // Logits (of the parameter type), the row mask, TRAM-x's embeddings:
    // fixed device buffers, new contents every iteration.
    let s = gpu.stream();
    let zeros = |n: usize| s.clone_htod(&vec![P::from_f32(0.0); n]).unwrap();
    let mut la = zeros(ROWS * VOCAB);
    let mut lb = zeros(ROWS * VOCAB);
    let mut mask = s.alloc_zeros::<u8>(ROWS).unwrap();
    let mut emb = zeros(EMBED);
    let mut noised = zeros(EMBED);
    let graphs = c.captured.then(|| {
        let ta = DeviceLogits::dense(la.slice(..), ROWS, VOCAB).unwrap();
        let tb = DeviceLogits::dense(lb.slice(..), ROWS, VOCAB).unwrap();
        let m = DevRef::new(&mask);
        let e = DevRef::new(&emb);
        let mut o = DevMut::new(&mut noised);
        let mut t = dev.tensors(c);
        let first = capture(gpu, || {
            if !c.theta {
                ds.noise(&e, &mut o).unwrap();
            }
            let m = c.masked.then_some(&m);
            ds.first_step(&mut t, &ta, &tb, m).unwrap();
        });
        let second = capture(gpu, || ds.second_step(&mut t).unwrap());
        let base = capture(gpu, || ds.base_step(&mut t).unwrap());
        Graphs {
            first,
            second,
            base,
        }
    });
    for it in 0..ITERS {
        let what = format!("{name} seed {} iteration {it}", c.seed);
        let d = draw(&mut rng, it);
        for step in [&mut cs as &mut dyn Settable, &mut ds] {
            step.set(&d);
        }
        let bad1 = match d.fault {
            Fault::First => Some(f32::INFINITY),
            _ => None,
        };
        host.grads = grads(&mut rng, d.inv_scale, &d.has_grad, bad1);
        write(gpu, &mut dev.grads, &host.grads);
        // TRAM-x: this iteration's noised embeddings.
        let e: Vec<P> = rand_vec(&mut rng, EMBED, 1.0);
        s.memcpy_htod(&e, &mut emb).unwrap();
        let mut want_noise = vec![P::from_f32(0.0); EMBED];
        if !c.theta && !d.base {
            cs.noise(&e, &mut want_noise).unwrap();
        }
        if d.base {
            match &graphs {
                Some(g) => {
                    ds.prepare(&mut dev.tensors(c)).unwrap();
                    g.base.launch().unwrap();
                }
                None => ds.base_step(&mut dev.tensors(c)).unwrap(),
            }
            cs.base_step(&mut host.tensors(c)).unwrap();
        } else {
            let a: Vec<P> = rand_vec(&mut rng, ROWS * VOCAB, 3.0);
            let b: Vec<P> = a
                .iter()
                .map(|x| P::from_f32(x.to_f32() + rng.random_range(-0.3f32..0.3)))
                .collect();
            let rows: Vec<u8> = (0..ROWS).map(|_| rng.random_range(0..3u8)).collect();
            s.memcpy_htod(&a, &mut la).unwrap();
            s.memcpy_htod(&b, &mut lb).unwrap();
            s.memcpy_htod(&rows, &mut mask).unwrap();
            let (ta, tb) = (
                Logits::dense(&a, ROWS, VOCAB).unwrap(),
                Logits::dense(&b, ROWS, VOCAB).unwrap(),
            );
            let m = c.masked.then_some(&rows[..]);
            let before = host.clone();
            cs.first_step(&mut host.tensors(c), &ta, &tb, m).unwrap();
            match &graphs {
                Some(g) => {
                    ds.prepare(&mut dev.tensors(c)).unwrap();
                    g.first.launch().unwrap();
                }
                None => {
                    if !c.theta {
                        ds.noise(&DevRef::new(&emb), &mut DevMut::new(&mut noised))
                            .unwrap();
                    }
                    let da = DeviceLogits::dense(la.slice(..), ROWS, VOCAB).unwrap();
                    let db = DeviceLogits::dense(lb.slice(..), ROWS, VOCAB).unwrap();
                    let dm = DevRef::new(&mask);
                    let dm = c.masked.then_some(&dm);
                    ds.first_step(&mut dev.tensors(c), &da, &db, dm).unwrap();
                }
            }
            compare_reports(&what, &cs.report().unwrap(), &ds.report().unwrap());
            compare_first(&what, c, &d, &before, &host, &dev.host(gpu));
            let bad2 = match d.fault {
                Fault::SecondNan => Some(f32::NAN),
                Fault::SecondHuge => Some(2f32.powi(65) / d.inv_scale),
                _ => None,
            };
            host.grads = grads(&mut rng, d.inv_scale, &d.has_grad, bad2);
            write(gpu, &mut dev.grads, &host.grads);
            cs.second_step(&mut host.tensors(c)).unwrap();
            match &graphs {
                Some(g) => g.second.launch().unwrap(),
                None => ds.second_step(&mut dev.tensors(c)).unwrap(),
            }
        }
        if !c.theta && !d.base {
            let got = s.clone_dtoh(&noised).unwrap();
            assert_eq!(bits(&[got]), bits(&[want_noise]), "{what}: noise");
        }
        // After the update: every buffer bit for bit, the status and state.
        let got = dev.host(gpu);
        assert_eq!(bits(&got.params), bits(&host.params), "{what}: θ");
        assert_eq!(bits(&got.masters), bits(&host.masters), "{what}: masters");
        assert_eq!(bits(&got.m), bits(&host.m), "{what}: m");
        assert_eq!(bits(&got.v), bits(&host.v), "{what}: v");
        assert_eq!(bits(&got.targets), bits(&host.targets), "{what}: θ̄");
        if c.mode == PerturbMode::InPlace {
            assert_eq!(bits(&got.copies), bits(&host.copies), "{what}: backups");
        }
        let (rc, rg) = (cs.report().unwrap(), ds.report().unwrap());
        assert_eq!(rc.status, rg.status, "{what}: step status");
        let want_skip =
            !d.base && !matches!(d.fault, Fault::None) || d.base && matches!(d.fault, Fault::First);
        let any = d.has_grad.iter().zip(SIZES).any(|(&h, n)| h && n > 0);
        assert_eq!(rc.status.skipped(), want_skip && any, "{what}: {rc:?}");
        seen.iterations += 1;
        seen.base_steps += d.base as u64;
        seen.skipped += rc.status.skipped() as u64;
        seen.applied += (!d.base && rc.perturb.applied()) as u64;
        seen.toggled += d.has_grad.contains(&false) as u64;
        seen.scaled += (d.inv_scale != 1.0) as u64;
        assert_eq!(cs.state().unwrap(), ds.state().unwrap(), "{what}: state");
    }
}

/// The first step's buffers: θ + ε (or the working copy, or the outputs) at
/// the bound, everything it must not touch bit for bit.
fn compare_first<P: Element, G: Element, T: Element>(
    what: &str,
    c: &Case,
    d: &Iteration,
    before: &Host<P, G, T>,
    cpu: &Host<P, G, T>,
    gpu: &Host<P, G, T>,
) {
    for k in 0..SIZES.len() {
        let theta: Vec<f32> = match c.mode {
            PerturbMode::Master => before.masters[k].clone(),
            _ => before.params[k].iter().map(|x| x.to_f32()).collect(),
        };
        let w = format!("{what} tensor {k}");
        match c.mode {
            PerturbMode::InPlace => {
                assert_eq!(
                    bits(&gpu.copies[k..=k]),
                    bits(&cpu.copies[k..=k]),
                    "{w}: backup"
                );
                if d.has_grad[k] {
                    close_perturbed(&w, &gpu.params[k], &cpu.params[k], &theta);
                } else {
                    assert_eq!(
                        bits(&gpu.params[k..=k]),
                        bits(&before.params[k..=k]),
                        "{w}: θ"
                    );
                }
            }
            PerturbMode::Master => {
                assert_eq!(
                    bits(&gpu.masters[k..=k]),
                    bits(&before.masters[k..=k]),
                    "{w}"
                );
                close_perturbed(&w, &gpu.params[k], &cpu.params[k], &theta);
            }
            PerturbMode::OutOfPlace => {
                assert_eq!(
                    bits(&gpu.params[k..=k]),
                    bits(&before.params[k..=k]),
                    "{w}: θ"
                );
                close_perturbed(&w, &gpu.copies[k], &cpu.copies[k], &theta);
            }
        }
    }
}

/// The per-iteration settings, on either step.
trait Settable {
    fn set(&mut self, d: &Iteration);
}

impl<S: Tram> Settable for S {
    fn set(&mut self, d: &Iteration) {
        self.set_has_grad(&d.has_grad).unwrap();
        self.set_lr(d.lr).unwrap();
        self.set_delta(d.delta).unwrap();
        self.set_inv_scale(d.inv_scale).unwrap();
    }
}

#[test]
fn cpu_and_cuda_steps_agree_in_every_combination() {
    let _serial = common::serial();
    let gpu = gpu_or_skip!();
    let reps: u64 = std::env::var("TRAM_DIFF_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let seed0: u64 = std::env::var("TRAM_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2027);
    let t0 = std::time::Instant::now();
    let mut n = 0u64;
    let mut seen = Seen::default();
    for rep in 0..reps {
        for theta in [true, false] {
            for mode in [
                PerturbMode::InPlace,
                PerturbMode::Master,
                PerturbMode::OutOfPlace,
            ] {
                for dtypes in 0..4 {
                    for geometry in [
                        Geometry::Sam,
                        Geometry::Adaptive { eta: 0.01 },
                        Geometry::Fisher { eta: 0.5 },
                    ] {
                        for captured in [false, true] {
                            let seed = seed0 + 1000 * rep + n % 1000;
                            let c = Case {
                                theta,
                                mode,
                                geometry,
                                captured,
                                sgd: n % 2 == 1,
                                masked: n % 3 == 2,
                                seed,
                            };
                            // The target is f32 or the parameter type in turn.
                            let own = (n / 2) % 2 == 1;
                            match (dtypes, own) {
                                (0, _) => run_case::<f32, f32, f32>(&gpu, &c, &mut seen),
                                (1, false) => run_case::<f16, f16, f32>(&gpu, &c, &mut seen),
                                (1, true) => run_case::<f16, f16, f16>(&gpu, &c, &mut seen),
                                (2, false) => run_case::<bf16, bf16, f32>(&gpu, &c, &mut seen),
                                (2, true) => run_case::<bf16, bf16, bf16>(&gpu, &c, &mut seen),
                                (3, false) => run_case::<bf16, f32, f32>(&gpu, &c, &mut seen),
                                _ => run_case::<bf16, f32, bf16>(&gpu, &c, &mut seen),
                            }
                            n += 1;
                        }
                    }
                }
            }
        }
    }
    common::log(format_args!(
        "step differential: {n} cases (2 variants x 3 modes x 4 dtype pairs x 3 geometries x \
         captured/direct, x{reps} with TRAM_DIFF_REPS), {ITERS} iterations each, all agreed, \
         in {:.1} s; {seen:?}",
        t0.elapsed().as_secs_f64()
    ));
    // The draws reached every kind of iteration.
    assert!(seen.base_steps > 0 && seen.skipped > 0 && seen.applied > 0);
    assert!(seen.toggled > 0 && seen.scaled > 0);
    gpu.context().check_err().expect("no deferred cudarc error");
}
