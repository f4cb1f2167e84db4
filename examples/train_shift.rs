//! Training under a domain shift with the crate's optimizer steps: AdamW, SAM
//! and TRAM-θ on a small classifier.
//!
//! A two-layer MLP (forward and backward written here in plain f32 Rust)
//! learns Gaussian class clusters; it is then scored on held-out points of the
//! same distribution (in-domain) and on points from a shifted domain: the same
//! clusters under a fixed rotation, scaling and translation of the features,
//! never seen in training. Three optimizers are driven through this crate:
//!
//! - AdamW: the crate's fused update alone (no perturbation);
//! - SAM: gradient norm, perturbation by a fixed radius ρ, then the fused
//!   restore-and-update with the gradient taken at θ + ε;
//! - TRAM-θ: `TramStep`, where ρ = δ·d and d is the KL divergence between the
//!   logits of an EMA of past weights (the target, kept by the crate) and the
//!   current logits on the batch.
//!
//! The weights are kept as the crate's master-weight layout: f32 master θ
//! (also the backup while perturbed) and a working copy the model reads.
//! Every method sees the same initial weights and batches for a given seed.
//! The table gives accuracy as mean ± std over the seeds, the mean radius the
//! perturbation used, and the wall time spent inside the crate's calls against
//! the whole run. The data and hyperparameters are fixed below; they were not
//! searched to favour any method, and the numbers are whatever comes out. SAM's
//! ρ is the common default 0.05; TRAM's δ was set once so that its mean radius
//! is of the same order as SAM's (the table prints both), not for accuracy.
//!
//! ```text
//! cargo run --release --example train_shift            # crate on the CPU backend
//! cargo run --release --example train_shift -- --cuda  # crate on the CUDA backend
//! cargo run --release --example train_shift -- --check # 20 steps, CPU vs CUDA
//! ```
//!
//! With `--cuda` the model still runs on the CPU; parameters, gradients and
//! logits are copied to and from the device around each crate call (the copy
//! time is reported separately). `--check` checks the hand-written backward
//! against finite differences, that 20 CPU steps of each method repeat bit for
//! bit, and that the per-step losses of the two backends agree to 1e-4
//! relative over those 20 steps and their final accuracies within one point;
//! it exits with status 1 on a failure. The comparison needs a GPU: without
//! one, `--check` runs the CPU checks, says the comparison was not made, and
//! exits with status 3 (it has not checked what it is for).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, DevicePtr};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::kl_div::Logits;
use tram_kernels::cpu::optimizer::{FusedOptimizer, UpdateTensor, Weights};
use tram_kernels::cpu::perturb::perturb_master;
use tram_kernels::cpu::step::{Perturbation, Tensor, TramStep};
use tram_kernels::cuda::buffer::{DevMut, DevRef};
use tram_kernels::cuda::grad_norm::{grad_norm, NormOptions};
use tram_kernels::cuda::group::{DeviceBuf, ParamGroup, RawTensor};
use tram_kernels::cuda::kl_div::DeviceLogits;
use tram_kernels::cuda::optimizer::{FusedOptimizer as GpuOptimizer, RawUpdateTensor, UpdateGroup};
use tram_kernels::cuda::perturb::{perturb, PerturbMode, PerturbOptions};
use tram_kernels::cuda::step::{
    Perturbation as GpuPerturbation, Tensor as GpuTensor, TramStep as GpuTramStep,
};
use tram_kernels::cuda::CudaBackend;
use tram_kernels::{
    BaseOptimizer, DType, Geometry, KlOptions, Radius, Result, Tram, TramConfig, TramVariant,
};

// ---- the problem -----------------------------------------------------------

const DIM: usize = 32;
const HIDDEN: usize = 64;
const CLASSES: usize = 8;
const TRAIN: usize = 2048;
const TEST: usize = 2048;
/// Class means are N(0, CENTER²·I); points are mean + N(0, I).
const CENTER: f32 = 0.45;
/// The shifted domain: x ↦ SCALE·R·x + t, R rotating every coordinate pair
/// (0,1), (2,3), ... by ANGLE, and t a fixed random direction of length SHIFT.
const ANGLE: f32 = 0.6;
const SCALE: f32 = 1.5;
const SHIFT: f32 = 2.0;
const DATA_SEED: u64 = 2024;

// ---- training ------------------------------------------------------------

const BATCH: usize = 64;
const STEPS: usize = 400;
const SEEDS: u64 = 3;
const CHECK_STEPS: usize = 20;
const LR: f32 = 5e-3;
const WEIGHT_DECAY: f32 = 1e-2;
/// SAM's fixed radius (the usual default of SAM implementations).
const SAM_RHO: f32 = 0.05;
/// TRAM-θ: ρ = δ·d, target θ̄ ← λ·θ̄ + (1−λ)·θ after every update.
const TRAM_DELTA: f32 = 4.0;
const TRAM_LAMBDA: f32 = 0.9;

/// Parameter tensors: W1 (HIDDEN×DIM), b1, W2 (CLASSES×HIDDEN), b2.
const SIZES: [usize; 4] = [HIDDEN * DIM, HIDDEN, CLASSES * HIDDEN, CLASSES];
/// Weight decay on the matrices only, as frameworks exempt biases.
const DECAYS: [bool; 4] = [true, false, true, false];

type Params = Vec<Vec<f32>>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Method {
    AdamW,
    Sam,
    Tram,
}

impl Method {
    const ALL: [Method; 3] = [Method::AdamW, Method::Sam, Method::Tram];

    fn name(self) -> &'static str {
        match self {
            Method::AdamW => "AdamW",
            Method::Sam => "SAM",
            Method::Tram => "TRAM-θ",
        }
    }
}

fn base_optimizer() -> BaseOptimizer {
    BaseOptimizer::adamw(WEIGHT_DECAY)
}

fn tram_config() -> TramConfig {
    TramConfig {
        delta: TRAM_DELTA,
        geometry: Geometry::Sam,
        kl: KlOptions::default(), // forward KL(target ‖ model), mean over rows
        variant: TramVariant::Theta {
            lambda: TRAM_LAMBDA,
        },
        optimizer: base_optimizer(),
        lr: LR,
    }
}

// ---- data ------------------------------------------------------------------

struct Dataset {
    x: Vec<f32>,
    y: Vec<usize>,
}

impl Dataset {
    fn len(&self) -> usize {
        self.y.len()
    }
}

fn normal(rng: &mut SmallRng) -> f32 {
    // Box–Muller; 1 − u keeps the logarithm finite.
    let u: f64 = 1.0 - rng.random::<f64>();
    let v: f64 = rng.random::<f64>();
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

fn sample(rng: &mut SmallRng, means: &[f32], n: usize) -> Dataset {
    let mut x = Vec::with_capacity(n * DIM);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % CLASSES;
        for d in 0..DIM {
            x.push(means[c * DIM + d] + normal(rng));
        }
        y.push(c);
    }
    Dataset { x, y }
}

fn shift(data: &mut Dataset, t: &[f32]) {
    let (s, c) = ANGLE.sin_cos();
    for p in data.x.chunks_mut(DIM) {
        for k in (0..DIM).step_by(2) {
            let (a, b) = (p[k], p[k + 1]);
            p[k] = SCALE * (c * a - s * b) + t[k];
            p[k + 1] = SCALE * (s * a + c * b) + t[k + 1];
        }
    }
}

/// (train, in-domain test, shifted test).
fn make_data() -> (Dataset, Dataset, Dataset) {
    let mut rng = SmallRng::seed_from_u64(DATA_SEED);
    let means: Vec<f32> = (0..CLASSES * DIM)
        .map(|_| CENTER * normal(&mut rng))
        .collect();
    let train = sample(&mut rng, &means, TRAIN);
    let test = sample(&mut rng, &means, TEST);
    let mut shifted = sample(&mut rng, &means, TEST);
    let dir: Vec<f32> = (0..DIM).map(|_| normal(&mut rng)).collect();
    let len = dir.iter().map(|v| v * v).sum::<f32>().sqrt();
    let t: Vec<f32> = dir.iter().map(|v| SHIFT * v / len).collect();
    shift(&mut shifted, &t);
    (train, test, shifted)
}

// ---- the model: forward and backward ---------------------------------------

fn init_params(seed: u64) -> Params {
    let mut rng = SmallRng::seed_from_u64(seed);
    let fan_in = [DIM, DIM, HIDDEN, HIDDEN];
    SIZES
        .iter()
        .zip(fan_in)
        .map(|(&n, f)| {
            let b = 1.0 / (f as f32).sqrt();
            (0..n).map(|_| rng.random_range(-b..b)).collect()
        })
        .collect()
}

/// Logits (rows × CLASSES) of the rows of `x`; also the hidden activations.
fn forward(p: &[Vec<f32>], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / DIM;
    let (w1, b1, w2, b2) = (&p[0], &p[1], &p[2], &p[3]);
    let mut h = vec![0.0f32; rows * HIDDEN];
    let mut z = vec![0.0f32; rows * CLASSES];
    for r in 0..rows {
        let xr = &x[r * DIM..(r + 1) * DIM];
        let hr = &mut h[r * HIDDEN..(r + 1) * HIDDEN];
        for (j, hj) in hr.iter_mut().enumerate() {
            let w = &w1[j * DIM..(j + 1) * DIM];
            let s: f32 = w.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>() + b1[j];
            *hj = s.max(0.0);
        }
        for k in 0..CLASSES {
            let w = &w2[k * HIDDEN..(k + 1) * HIDDEN];
            z[r * CLASSES + k] = w.iter().zip(hr.iter()).map(|(a, b)| a * b).sum::<f32>() + b2[k];
        }
    }
    (z, h)
}

/// Mean cross-entropy over the rows, the logits, and the gradients.
fn loss_and_grad(p: &[Vec<f32>], x: &[f32], y: &[usize]) -> (f32, Vec<f32>, Params) {
    let rows = y.len();
    let (z, h) = forward(p, x);
    let mut g: Params = SIZES.iter().map(|&n| vec![0.0f32; n]).collect();
    let mut loss = 0.0f64;
    let inv = 1.0 / rows as f32;
    let mut dh = vec![0.0f32; HIDDEN];
    for r in 0..rows {
        let zr = &z[r * CLASSES..(r + 1) * CLASSES];
        let max = zr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f32> = zr.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        loss += (sum.ln() - (zr[y[r]] - max)) as f64;
        let hr = &h[r * HIDDEN..(r + 1) * HIDDEN];
        let xr = &x[r * DIM..(r + 1) * DIM];
        dh.fill(0.0);
        for k in 0..CLASSES {
            let dz = (e[k] / sum - if k == y[r] { 1.0 } else { 0.0 }) * inv;
            g[3][k] += dz;
            let w = &p[2][k * HIDDEN..(k + 1) * HIDDEN];
            let gw = &mut g[2][k * HIDDEN..(k + 1) * HIDDEN];
            for j in 0..HIDDEN {
                gw[j] += dz * hr[j];
                dh[j] += dz * w[j];
            }
        }
        for j in 0..HIDDEN {
            if hr[j] > 0.0 {
                g[1][j] += dh[j];
                let gw = &mut g[0][j * DIM..(j + 1) * DIM];
                for (gi, xi) in gw.iter_mut().zip(xr) {
                    *gi += dh[j] * xi;
                }
            }
        }
    }
    ((loss / rows as f64) as f32, z, g)
}

/// Percentage of rows of `data` classified correctly.
fn accuracy(p: &[Vec<f32>], data: &Dataset) -> f64 {
    let (z, _) = forward(p, &data.x);
    let correct = z
        .chunks(CLASSES)
        .zip(&data.y)
        .filter(|(zr, &y)| {
            let best = (0..CLASSES)
                .max_by(|&a, &b| zr[a].total_cmp(&zr[b]))
                .unwrap_or(0);
            best == y
        })
        .count();
    100.0 * correct as f64 / data.len() as f64
}

// ---- the crate's side, behind one interface for both backends ---------------

/// What a training step asks of the crate. The model reads the working copy;
/// the f32 master weights are θ (and the backup while θ is perturbed).
trait Engine {
    /// The weights the model evaluates now (θ, or θ + ε after a perturbation).
    fn working(&mut self) -> Result<&Params>;
    /// TRAM-θ's target weights θ̄.
    fn target(&mut self) -> Result<&Params>;
    /// SAM: working ← θ + ρ·g/‖g‖ with the fixed radius. Returns ρ.
    fn perturb_fixed(&mut self, grads: &Params) -> Result<f64>;
    /// TRAM-θ: d = KL(target ‖ model) on the batch, working ← θ + δ·d·g/‖g‖.
    /// Returns ρ.
    fn perturb_tram(&mut self, target: &[f32], model: &[f32], grads: &Params) -> Result<f64>;
    /// Restore + AdamW update from `grads` (then the EMA target for TRAM-θ).
    fn update(&mut self, grads: &Params) -> Result<()>;
    /// Time inside the crate's calls and in host↔device copies.
    fn times(&self) -> (Duration, Duration);
}

fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t0 = Instant::now();
    let r = f();
    *acc += t0.elapsed();
    r
}

enum CpuOpt {
    Plain(FusedOptimizer),
    Tram(TramStep<f32>),
}

struct CpuEngine {
    opt: CpuOpt,
    master: Params,
    working: Params,
    target: Params,
    m: Params,
    v: Params,
    crate_time: Duration,
}

fn zeros() -> Params {
    SIZES.iter().map(|&n| vec![0.0f32; n]).collect()
}

/// TRAM's description of the model: f32 masters beside the working copy,
/// AdamW's state and the target, with this step's gradients.
#[allow(clippy::too_many_arguments)]
fn cpu_tensors<'a>(
    master: &'a mut Params,
    working: &'a mut Params,
    target: &'a mut Params,
    m: &'a mut Params,
    v: &'a mut Params,
    grads: &'a Params,
) -> Vec<Tensor<'a, f32>> {
    master
        .iter_mut()
        .zip(working.iter_mut())
        .zip(target.iter_mut())
        .zip(m.iter_mut().zip(v.iter_mut()))
        .zip(grads)
        .zip(DECAYS)
        .map(|(((((master, param), target), (m, v)), g), wd)| Tensor {
            param,
            grad: Some(g),
            perturbation: Perturbation::Master(master),
            m: Some(m),
            v: Some(v),
            target: Some(target),
            weight_decay: wd,
        })
        .collect()
}

impl CpuEngine {
    fn new(method: Method, init: &Params) -> Result<Self> {
        let (mut master, mut working, mut target) = (init.clone(), init.clone(), init.clone());
        let (mut m, mut v) = (zeros(), zeros());
        let opt = match method {
            Method::Tram => {
                let z = zeros();
                let t = cpu_tensors(&mut master, &mut working, &mut target, &mut m, &mut v, &z);
                CpuOpt::Tram(TramStep::new(tram_config(), &t)?)
            }
            _ => CpuOpt::Plain(FusedOptimizer::new(base_optimizer(), LR)?),
        };
        Ok(Self {
            opt,
            master,
            working,
            target,
            m,
            v,
            crate_time: Duration::ZERO,
        })
    }
}

fn grad_refs(grads: &Params) -> Vec<Option<&[f32]>> {
    grads.iter().map(|g| Some(&g[..])).collect()
}

impl Engine for CpuEngine {
    fn working(&mut self) -> Result<&Params> {
        Ok(&self.working)
    }

    fn target(&mut self) -> Result<&Params> {
        Ok(&self.target)
    }

    fn perturb_fixed(&mut self, grads: &Params) -> Result<f64> {
        let master: Vec<&[f32]> = self.master.iter().map(|p| &p[..]).collect();
        let mut working: Vec<&mut [f32]> = self.working.iter_mut().map(|p| &mut p[..]).collect();
        let g = grad_refs(grads);
        let rep = timed(&mut self.crate_time, || {
            perturb_master(
                &master,
                &g,
                &mut working,
                Geometry::Sam,
                Radius::Fixed(SAM_RHO),
                0.0,
                1.0,
            )
        })?;
        Ok(rep.rho)
    }

    fn perturb_tram(&mut self, target: &[f32], model: &[f32], grads: &Params) -> Result<f64> {
        let CpuOpt::Tram(step) = &mut self.opt else {
            unreachable!("perturb_tram on a non-TRAM engine");
        };
        let rows = model.len() / CLASSES;
        let a = Logits::dense(target, rows, CLASSES)?;
        let b = Logits::dense(model, rows, CLASSES)?;
        let mut t = cpu_tensors(
            &mut self.master,
            &mut self.working,
            &mut self.target,
            &mut self.m,
            &mut self.v,
            grads,
        );
        timed(&mut self.crate_time, || {
            step.first_step(&mut t, &a, &b, None)
        })?;
        Ok(step.report()?.rho)
    }

    fn update(&mut self, grads: &Params) -> Result<()> {
        if let CpuOpt::Tram(step) = &mut self.opt {
            // Restore + AdamW + the EMA target from the masters, one pass.
            let mut t = cpu_tensors(
                &mut self.master,
                &mut self.working,
                &mut self.target,
                &mut self.m,
                &mut self.v,
                grads,
            );
            return timed(&mut self.crate_time, || step.second_step(&mut t));
        }
        let mut tensors: Vec<UpdateTensor<f32, f32>> = self
            .master
            .iter_mut()
            .zip(self.working.iter_mut())
            .zip(grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .zip(DECAYS)
            .map(|((((master, param), g), (m, v)), wd)| UpdateTensor {
                weights: Weights::Master { master, param },
                grad: Some(g),
                m,
                v,
                weight_decay: wd,
            })
            .collect();
        let t0 = Instant::now();
        if let CpuOpt::Plain(opt) = &mut self.opt {
            opt.step(&mut tensors)?;
        }
        self.crate_time += t0.elapsed();
        Ok(())
    }

    fn times(&self) -> (Duration, Duration) {
        (self.crate_time, Duration::ZERO)
    }
}

/// AdamW and SAM: the fused update, and the group SAM's norm and
/// perturbation run over.
struct GpuPlain {
    opt: GpuOptimizer,
    params: ParamGroup<'static>,
    update: UpdateGroup<'static>,
}

enum GpuOpt {
    Plain(Box<GpuPlain>),
    Tram(Box<GpuTramStep<f32>>),
}

/// The crate on the CUDA backend. The groups hold raw addresses of the
/// buffers below; `opt` is declared first so it is dropped before them.
struct CudaEngine<'g> {
    opt: GpuOpt,
    gpu: &'g CudaBackend,
    master: Vec<CudaSlice<f32>>,
    working: Vec<CudaSlice<f32>>,
    grads: Vec<CudaSlice<f32>>,
    target: Vec<CudaSlice<f32>>,
    m: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    logits_target: CudaSlice<f32>,
    logits_model: CudaSlice<f32>,
    host_working: Params,
    host_target: Params,
    crate_time: Duration,
    copy_time: Duration,
}

/// The CUDA twin of `cpu_tensors`, over the engine's device buffers.
fn gpu_tensors<'a>(
    master: &'a mut [CudaSlice<f32>],
    working: &'a mut [CudaSlice<f32>],
    target: &'a mut [CudaSlice<f32>],
    m: &'a mut [CudaSlice<f32>],
    v: &'a mut [CudaSlice<f32>],
    grads: &'a [CudaSlice<f32>],
) -> Vec<GpuTensor<'a, f32>> {
    master
        .iter_mut()
        .zip(working.iter_mut())
        .zip(target.iter_mut())
        .zip(m.iter_mut().zip(v.iter_mut()))
        .zip(grads)
        .zip(DECAYS)
        .map(|(((((master, param), target), (m, v)), g), wd)| GpuTensor {
            param: DevMut::new(param),
            grad: Some(DevRef::new(g)),
            perturbation: GpuPerturbation::Master(DevMut::new(master)),
            m: Some(DevMut::new(m)),
            v: Some(DevMut::new(v)),
            target: Some(DevMut::new(target)),
            weight_decay: wd,
        })
        .collect()
}

impl<'g> CudaEngine<'g> {
    fn new(gpu: &'g CudaBackend, method: Method, init: &Params) -> Result<Self> {
        let s = gpu.stream();
        let up = |p: &Params| -> Result<Vec<CudaSlice<f32>>> {
            Ok(p.iter()
                .map(|t| s.clone_htod(t))
                .collect::<std::result::Result<_, _>>()?)
        };
        let mut master = up(init)?;
        let mut working = up(init)?;
        let grads = up(&zeros())?;
        let mut target = up(init)?;
        let mut m = up(&zeros())?;
        let mut v = up(&zeros())?;
        let logits_target = s.alloc_zeros::<f32>(BATCH * CLASSES)?;
        let logits_model = s.alloc_zeros::<f32>(BATCH * CLASSES)?;
        let ptr = |x: &CudaSlice<f32>| x.device_ptr(s).0;
        let buf = |x: &CudaSlice<f32>| DeviceBuf {
            ptr: ptr(x),
            len: x.len() as u64,
        };
        let raw: Vec<RawTensor> = (0..SIZES.len())
            .map(|i| RawTensor {
                param: buf(&working[i]),
                grad: buf(&grads[i]),
                backup: None,
                master: Some(buf(&master[i])),
                out: None,
            })
            .collect();
        let upd: Vec<RawUpdateTensor> = (0..SIZES.len())
            .map(|i| RawUpdateTensor {
                param: ptr(&working[i]),
                grad: ptr(&grads[i]),
                source: ptr(&master[i]),
                m: ptr(&m[i]),
                v: ptr(&v[i]),
                len: SIZES[i] as u64,
                weight_decay: DECAYS[i],
            })
            .collect();
        let opt = match method {
            Method::Tram => {
                // The step builds its tables from the description; every call
                // describes the same buffers again (cheap: nothing changes).
                let t = gpu_tensors(
                    &mut master,
                    &mut working,
                    &mut target,
                    &mut m,
                    &mut v,
                    &grads,
                );
                GpuOpt::Tram(Box::new(GpuTramStep::new(gpu, tram_config(), &t, BATCH)?))
            }
            _ => {
                // SAFETY: every address is a live f32 allocation of this
                // backend's context with the stated length, owned by the
                // engine built below, which drops the groups (in `opt`) before
                // the buffers and frees nothing while a step can still run; the
                // buffers are distinct allocations, so no written buffer
                // overlaps another; every copy and launch touching them goes on
                // the backend's one stream.
                let (params, update) = unsafe {
                    (
                        ParamGroup::from_raw(gpu, DType::F32, DType::F32, &raw)?,
                        UpdateGroup::from_raw(gpu, &upd, DType::F32, DType::F32, true)?,
                    )
                };
                GpuOpt::Plain(Box::new(GpuPlain {
                    opt: GpuOptimizer::new(gpu, base_optimizer(), LR)?,
                    params,
                    update,
                }))
            }
        };
        gpu.synchronize()?;
        Ok(Self {
            opt,
            gpu,
            master,
            working,
            grads,
            target,
            m,
            v,
            logits_target,
            logits_model,
            host_working: init.clone(),
            host_target: init.clone(),
            crate_time: Duration::ZERO,
            copy_time: Duration::ZERO,
        })
    }

    fn upload_grads(&mut self, grads: &Params) -> Result<()> {
        let s = self.gpu.stream();
        let t0 = Instant::now();
        for (d, h) in self.grads.iter_mut().zip(grads) {
            s.memcpy_htod(h, d)?;
        }
        self.copy_time += t0.elapsed();
        Ok(())
    }

    /// Enqueues `f`'s launches and waits for them, so the time is the device's.
    fn crate_call(
        &mut self,
        f: impl FnOnce(&CudaBackend, &mut GpuOpt) -> Result<()>,
    ) -> Result<()> {
        let t0 = Instant::now();
        f(self.gpu, &mut self.opt)?;
        self.gpu.synchronize()?;
        self.crate_time += t0.elapsed();
        Ok(())
    }

    fn rho(&self) -> Result<f64> {
        match &self.opt {
            GpuOpt::Plain(plain) => Ok(plain.params.read_state()?.rho),
            GpuOpt::Tram(step) => Ok(step.report()?.rho),
        }
    }

    fn master_host(&self) -> Result<Params> {
        let s = self.gpu.stream();
        Ok(self
            .master
            .iter()
            .map(|d| s.clone_dtoh(d))
            .collect::<std::result::Result<_, _>>()?)
    }
}

impl Engine for CudaEngine<'_> {
    fn working(&mut self) -> Result<&Params> {
        let s = self.gpu.stream();
        let t0 = Instant::now();
        for (h, d) in self.host_working.iter_mut().zip(&self.working) {
            s.memcpy_dtoh(d, h)?;
        }
        self.gpu.synchronize()?;
        self.copy_time += t0.elapsed();
        Ok(&self.host_working)
    }

    fn target(&mut self) -> Result<&Params> {
        let s = self.gpu.stream();
        let t0 = Instant::now();
        for (h, d) in self.host_target.iter_mut().zip(&self.target) {
            s.memcpy_dtoh(d, h)?;
        }
        self.gpu.synchronize()?;
        self.copy_time += t0.elapsed();
        Ok(&self.host_target)
    }

    fn perturb_fixed(&mut self, grads: &Params) -> Result<f64> {
        self.upload_grads(grads)?;
        self.crate_call(|gpu, opt| {
            let GpuOpt::Plain(plain) = opt else {
                unreachable!("perturb_fixed on the TRAM engine");
            };
            let params = &plain.params;
            grad_norm(
                gpu,
                params,
                NormOptions {
                    geometry: Geometry::Sam,
                    inv_scale: 1.0,
                },
            )?;
            let opts = PerturbOptions {
                geometry: Geometry::Sam,
                radius: Radius::Fixed(SAM_RHO),
                inv_scale: 1.0,
                mode: PerturbMode::Master,
            };
            perturb(gpu, params, opts, None)
        })?;
        self.rho()
    }

    fn perturb_tram(&mut self, target: &[f32], model: &[f32], grads: &Params) -> Result<f64> {
        self.upload_grads(grads)?;
        let rows = model.len() / CLASSES;
        let s = self.gpu.stream();
        let t0 = Instant::now();
        s.memcpy_htod(target, &mut self.logits_target)?;
        s.memcpy_htod(model, &mut self.logits_model)?;
        self.copy_time += t0.elapsed();
        let a = DeviceLogits::dense(self.logits_target.slice(..), rows, CLASSES)?;
        let b = DeviceLogits::dense(self.logits_model.slice(..), rows, CLASSES)?;
        let t0 = Instant::now();
        let GpuOpt::Tram(step) = &mut self.opt else {
            unreachable!("perturb_tram on a non-TRAM engine");
        };
        let mut t = gpu_tensors(
            &mut self.master,
            &mut self.working,
            &mut self.target,
            &mut self.m,
            &mut self.v,
            &self.grads,
        );
        step.first_step(&mut t, &a, &b, None)?;
        self.gpu.synchronize()?;
        self.crate_time += t0.elapsed();
        self.rho()
    }

    fn update(&mut self, grads: &Params) -> Result<()> {
        self.upload_grads(grads)?;
        if let GpuOpt::Tram(step) = &mut self.opt {
            let t0 = Instant::now();
            let mut t = gpu_tensors(
                &mut self.master,
                &mut self.working,
                &mut self.target,
                &mut self.m,
                &mut self.v,
                &self.grads,
            );
            step.second_step(&mut t)?;
            self.gpu.synchronize()?;
            self.crate_time += t0.elapsed();
            return Ok(());
        }
        self.crate_call(|gpu, opt| match opt {
            GpuOpt::Plain(plain) => plain.opt.step(gpu, &plain.update),
            GpuOpt::Tram(_) => unreachable!("handled above"),
        })
    }

    fn times(&self) -> (Duration, Duration) {
        (self.crate_time, self.copy_time)
    }
}

// ---- the training loop -------------------------------------------------------

struct RunResult {
    losses: Vec<f32>,
    acc_in: f64,
    acc_shift: f64,
    mean_rho: f64,
    crate_time: Duration,
    copy_time: Duration,
    total: Duration,
}

struct Data {
    train: Dataset,
    test: Dataset,
    shifted: Dataset,
}

/// Trains from `init` for `steps` batches drawn by `seed`, then scores the
/// final weights. `final_params` reads them back from the engine.
fn train<E: Engine>(
    engine: &mut E,
    method: Method,
    data: &Data,
    seed: u64,
    steps: usize,
    final_params: impl FnOnce(&mut E) -> Result<Params>,
) -> Result<RunResult> {
    let start = Instant::now();
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_0ba7c4);
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    let mut pos = order.len();
    let mut xb = vec![0.0f32; BATCH * DIM];
    let mut yb = vec![0usize; BATCH];
    let mut losses = Vec::with_capacity(steps);
    let mut rho_sum = 0.0f64;
    for _ in 0..steps {
        for i in 0..BATCH {
            if pos == order.len() {
                for k in (1..order.len()).rev() {
                    order.swap(k, rng.random_range(0..=k));
                }
                pos = 0;
            }
            let r = order[pos];
            pos += 1;
            xb[i * DIM..(i + 1) * DIM].copy_from_slice(&data.train.x[r * DIM..(r + 1) * DIM]);
            yb[i] = data.train.y[r];
        }
        let (loss, logits, g) = loss_and_grad(engine.working()?, &xb, &yb);
        losses.push(loss);
        let g = match method {
            Method::AdamW => g,
            Method::Sam | Method::Tram => {
                rho_sum += if method == Method::Sam {
                    engine.perturb_fixed(&g)?
                } else {
                    let (target_logits, _) = forward(engine.target()?, &xb);
                    engine.perturb_tram(&target_logits, &logits, &g)?
                };
                loss_and_grad(engine.working()?, &xb, &yb).2
            }
        };
        engine.update(&g)?;
    }
    let p = final_params(engine)?;
    let (crate_time, copy_time) = engine.times();
    Ok(RunResult {
        losses,
        acc_in: accuracy(&p, &data.test),
        acc_shift: accuracy(&p, &data.shifted),
        mean_rho: rho_sum / steps as f64,
        crate_time,
        copy_time,
        total: start.elapsed(),
    })
}

fn run(
    gpu: Option<&CudaBackend>,
    method: Method,
    data: &Data,
    seed: u64,
    steps: usize,
) -> Result<RunResult> {
    let init = init_params(seed);
    match gpu {
        None => {
            let mut e = CpuEngine::new(method, &init)?;
            train(&mut e, method, data, seed, steps, |e| Ok(e.master.clone()))
        }
        Some(gpu) => {
            let mut e = CudaEngine::new(gpu, method, &init)?;
            train(&mut e, method, data, seed, steps, |e| e.master_host())
        }
    }
}

// ---- reporting ---------------------------------------------------------------

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn describe(backend: &str) {
    println!(
        "train_shift: {CLASSES} Gaussian classes in {DIM}-d, {TRAIN} training points; \
         MLP {DIM}-{HIDDEN}-{CLASSES} (ReLU), f32"
    );
    println!(
        "  shifted domain: rotate coordinate pairs by {ANGLE} rad, scale {SCALE}, \
         translate by {SHIFT}; {TEST} test points per domain"
    );
    println!(
        "  AdamW lr {LR}, wd {WEIGHT_DECAY} (matrices), batch {BATCH}; \
         SAM rho = {SAM_RHO}; TRAM-θ rho = {TRAM_DELTA}·KL(EMA λ={TRAM_LAMBDA} ‖ model)"
    );
    println!("  crate backend: {backend}");
}

fn full_run(gpu: Option<&CudaBackend>, backend: &str) -> Result<()> {
    let (train, test, shifted) = make_data();
    let data = Data {
        train,
        test,
        shifted,
    };
    describe(backend);
    println!("  {STEPS} steps x {SEEDS} seeds per method; mean ± std over seeds\n");
    let wall = Instant::now();
    println!(
        "{:<8} {:>16} {:>16} {:>9} {:>9} {:>7} {:>9} {:>8}",
        "method",
        "in-domain %",
        "shifted %",
        "mean rho",
        "crate s",
        "crate%",
        "copies s",
        "total s"
    );
    for method in Method::ALL {
        let mut acc_in = Vec::new();
        let mut acc_shift = Vec::new();
        let (mut rho, mut t_crate, mut t_copy, mut t_total) = (0.0, 0.0, 0.0, 0.0);
        for seed in 0..SEEDS {
            let r = run(gpu, method, &data, seed, STEPS)?;
            acc_in.push(r.acc_in);
            acc_shift.push(r.acc_shift);
            rho += r.mean_rho / SEEDS as f64;
            t_crate += secs(r.crate_time);
            t_copy += secs(r.copy_time);
            t_total += secs(r.total);
        }
        let (mi, si) = mean_std(&acc_in);
        let (ms, ss) = mean_std(&acc_shift);
        let rho = if method == Method::AdamW {
            "-".to_string()
        } else {
            format!("{rho:.4}")
        };
        let copies = if gpu.is_some() {
            format!("{t_copy:.3}")
        } else {
            "-".to_string()
        };
        println!(
            "{:<8} {:>16} {:>16} {:>9} {:>9.3} {:>6.1}% {:>9} {:>8.3}",
            method.name(),
            format!("{mi:.2} ± {si:.2}"),
            format!("{ms:.2} ± {ss:.2}"),
            rho,
            t_crate,
            100.0 * t_crate / t_total,
            copies,
            t_total
        );
    }
    println!(
        "\ncrate s: wall time inside the crate's calls{}; total s: whole training runs \
         (model forward/backward included). Whole program: {:.2} s.",
        if gpu.is_some() {
            " (each followed by a stream sync)"
        } else {
            ""
        },
        secs(wall.elapsed())
    );
    Ok(())
}

/// The hand-written backward against central differences of the loss on a
/// few coordinates of every tensor (f32 model, so the tolerance is loose:
/// 2e-3 absolute plus 2% relative). Returns the worst |error| / tolerance.
fn gradient_check(data: &Data) -> f64 {
    let p = init_params(7);
    let (x, y) = (&data.train.x[..BATCH * DIM], &data.train.y[..BATCH]);
    let (_, _, g) = loss_and_grad(&p, x, y);
    let mut rng = SmallRng::seed_from_u64(11);
    let h = 1e-2f32;
    let mut worst = 0.0f64;
    for (t, &n) in SIZES.iter().enumerate() {
        for _ in 0..8 {
            let i = rng.random_range(0..n);
            let mut q = p.clone();
            q[t][i] = p[t][i] + h;
            let up = loss_and_grad(&q, x, y).0 as f64;
            q[t][i] = p[t][i] - h;
            let down = loss_and_grad(&q, x, y).0 as f64;
            let fd = (up - down) / (2.0 * h as f64);
            let an = g[t][i] as f64;
            let tol = 2e-3 + 2e-2 * an.abs();
            worst = worst.max((fd - an).abs() / tol);
        }
    }
    worst
}

/// What `--check` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Every check ran and passed, the CPU-vs-CUDA comparison included.
    Passed,
    /// A check failed.
    Failed,
    /// The CPU checks passed but the backends were not compared (no GPU).
    NotCompared,
}

impl Verdict {
    fn exit_status(self) -> u8 {
        match self {
            Verdict::Passed => 0,
            Verdict::Failed => 1,
            Verdict::NotCompared => 3,
        }
    }
}

/// `--check`: 20 steps per method on the CPU backend (twice: it must be
/// deterministic) and, with a GPU, on the CUDA backend; the losses must agree
/// step by step to 1e-4 relative and the final accuracies within one point.
fn check(gpu: std::result::Result<CudaBackend, tram_kernels::Error>) -> Result<Verdict> {
    let (train, test, shifted) = make_data();
    let data = Data {
        train,
        test,
        shifted,
    };
    let worst = gradient_check(&data);
    let mut ok = worst <= 1.0;
    println!(
        "{} backward vs central differences: worst error {worst:.2} of the tolerance",
        if ok { "ok  " } else { "FAIL" }
    );
    let seed = 0;
    for method in Method::ALL {
        let a = run(None, method, &data, seed, CHECK_STEPS)?;
        let b = run(None, method, &data, seed, CHECK_STEPS)?;
        let finite = a.losses.iter().all(|l| l.is_finite());
        let same = a
            .losses
            .iter()
            .zip(&b.losses)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        let pass = finite && same && a.acc_in == b.acc_in && a.acc_shift == b.acc_shift;
        ok &= pass;
        println!(
            "{} {:<7} CPU: {} steps, loss {:.4} -> {:.4}, acc {:.2} / {:.2}; rerun bit-identical: {}",
            if pass { "ok  " } else { "FAIL" },
            method.name(),
            CHECK_STEPS,
            a.losses[0],
            a.losses[CHECK_STEPS - 1],
            a.acc_in,
            a.acc_shift,
            same
        );
        if let Ok(gpu) = &gpu {
            let c = run(Some(gpu), method, &data, seed, CHECK_STEPS)?;
            let max_rel = a
                .losses
                .iter()
                .zip(&c.losses)
                .map(|(x, y)| ((x - y).abs() / x.abs().max(f32::MIN_POSITIVE)) as f64)
                .fold(
                    0.0f64,
                    |m, r| if r.is_nan() { f64::INFINITY } else { m.max(r) },
                );
            let d_in = (a.acc_in - c.acc_in).abs();
            let d_shift = (a.acc_shift - c.acc_shift).abs();
            let pass = max_rel <= 1e-4 && d_in <= 1.0 && d_shift <= 1.0;
            ok &= pass;
            println!(
                "{} {:<7} CUDA vs CPU: max loss rel. diff {max_rel:.2e} (<= 1e-4), \
                 acc diff {d_in:.2} / {d_shift:.2} points (<= 1)",
                if pass { "ok  " } else { "FAIL" },
                method.name(),
            );
        }
    }
    Ok(match (&gpu, ok) {
        (_, false) => Verdict::Failed,
        (Ok(_), true) => Verdict::Passed,
        (Err(e), true) => {
            println!("CUDA comparison NOT made: {e}");
            Verdict::NotCompared
        }
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cuda = false;
    let mut check_mode = false;
    for a in &args {
        match a.as_str() {
            "--cuda" => cuda = true,
            "--check" => check_mode = true,
            "-h" | "--help" => {
                println!(
                    "usage: train_shift [--cuda | --check]\n  \
                     (default) train with AdamW, SAM and TRAM-θ, the crate on the CPU backend\n  \
                     --cuda    the same with the crate on the CUDA backend (device 0)\n  \
                     --check   20 steps on both backends: losses within 1e-4, accuracies within 1 point\n            \
                     (needs a GPU; without one: exit status 3 after the CPU checks)"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("train_shift: unknown argument {other:?} (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    let result = if check_mode {
        match check(CudaBackend::new(0)) {
            Ok(v) => {
                println!(
                    "{}",
                    match v {
                        Verdict::Passed => "check passed",
                        Verdict::Failed => "check FAILED",
                        Verdict::NotCompared =>
                            "check INCOMPLETE: the CPU checks passed, but without a usable GPU \
                             the two backends were not compared",
                    }
                );
                return ExitCode::from(v.exit_status());
            }
            Err(e) => Err(e),
        }
    } else if cuda {
        match CudaBackend::new(0) {
            Ok(gpu) => full_run(Some(&gpu), "CUDA (device 0)"),
            Err(e) => {
                eprintln!("train_shift: --cuda needs a usable GPU, and none is: {e}");
                return ExitCode::from(3);
            }
        }
    } else {
        full_run(None, "CPU (rayon reference)")
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train_shift: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU, `--check` has not compared the backends: it must not
    /// report success.
    #[test]
    fn check_without_a_gpu_is_not_a_pass() {
        let no_gpu = Err(tram_kernels::Error::CudaUnavailable(
            "no GPU in this test".into(),
        ));
        let v = check(no_gpu).unwrap();
        assert_eq!(v, Verdict::NotCompared);
        assert_ne!(v.exit_status(), 0);
    }
}
