//! Training under a domain shift with candle: the model, its loss and every
//! gradient come from candle's autograd; the optimizers are interchangeable
//! behind one interface.
//!
//! The task is `train_shift`'s: a two-layer MLP (32-64-8, ReLU, f32) learns
//! Gaussian class clusters, and is scored on held-out points of the same
//! distribution (in-domain) and on points of a shifted domain (the same
//! clusters under a fixed rotation, scaling and translation of the features,
//! never seen in training). Same data, same initial weights and the same
//! batches for a given seed as `train_shift`, whose forward and backward are
//! written by hand; here they are candle ops on candle `Var`s.
//!
//! Optimizers implement [`Optimizer`]: one step, given the gradients at the
//! current weights and a [`Closure`] through which a two-pass method asks for
//! the loss and gradients at other weights, or for logits (TRAM's divergence):
//!
//! - `AdamW`: `torch.optim.AdamW`'s algorithm (decoupled weight decay, on the
//!   matrices only) written in candle ops, the baseline a candle user has;
//! - `SAM`, `TRAM-θ`, `TRAM-x`: the crate's candle optimizer
//!   (`tram_kernels::candle::TramOptimizer`) over the same vars, with the same
//!   AdamW as its base update. SAM perturbs by a fixed ρ = 0.05; TRAM-θ by
//!   ρ = δ·KL(EMA target ‖ model) on the batch, the target logits from the
//!   optimizer's target weights; TRAM-x by ρ = δ·KL(model on x ‖ model on
//!   x + z), z the optimizer's Gaussian noise on the input features (this
//!   MLP's "embeddings").
//!
//! ```text
//! cargo run --release --features candle --example candle_shift
//! cargo run --release --features candle --example candle_shift -- --steps 20 --seeds 1
//! cargo run --release --features candle-cuda --example candle_shift -- --cuda
//! ```
//!
//! The table gives accuracy as mean ± std over the seeds and the mean radius
//! ρ of the perturbation. The data and hyperparameters are `train_shift`'s,
//! not searched to favour any method; TRAM-x's σ and δ were set once so that
//! its mean radius is of the order of SAM's (as `train_shift` set TRAM-θ's δ),
//! not for accuracy. The numbers are whatever comes out.

use std::process::ExitCode;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::candle::TramOptimizer;
use tram_kernels::{
    BaseOptimizer, Geometry, KlOptions, NoiseConfig, NoiseDistribution, TramConfig, TramVariant,
};

// ---- the problem (as in train_shift) ----------------------------------------

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

// ---- training ----------------------------------------------------------------

const BATCH: usize = 64;
const STEPS: usize = 400;
const SEEDS: u64 = 3;
const LR: f64 = 5e-3;
const WEIGHT_DECAY: f64 = 1e-2;
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
/// SAM's fixed radius (the usual default of SAM implementations).
const SAM_RHO: f64 = 0.05;
/// TRAM-θ (train_shift's): ρ = δ·d, target θ̄ ← λ·θ̄ + (1−λ)·θ.
const TRAM_DELTA: f32 = 4.0;
const TRAM_LAMBDA: f32 = 0.9;
/// TRAM-x: ρ = δ·KL(f(x) ‖ f(x + z)), z ~ N(0, σ²) on the features.
const TRAMX_DELTA: f32 = 0.5;
const TRAMX_SIGMA: f32 = 0.5;

/// Parameter tensors: W1 (HIDDEN×DIM), b1, W2 (CLASSES×HIDDEN), b2.
const SHAPES: [&[usize]; 4] = [&[HIDDEN, DIM], &[HIDDEN], &[CLASSES, HIDDEN], &[CLASSES]];
/// Weight decay on the matrices only, as frameworks exempt biases.
const DECAYS: [bool; 4] = [true, false, true, false];

// ---- data ----------------------------------------------------------------------

struct Dataset {
    x: Vec<f32>,
    y: Vec<u32>,
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
        y.push(c as u32);
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

/// (train, in-domain test, shifted test), the points of `train_shift`.
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

/// A dataset on the device: x (n × DIM, f32) and labels (n, u32).
struct DeviceData {
    x: Tensor,
    y: Tensor,
}

impl DeviceData {
    fn new(d: &Dataset, dev: &Device) -> Result<Self> {
        Ok(Self {
            x: Tensor::from_slice(&d.x, (d.y.len(), DIM), dev)?,
            y: Tensor::from_slice(&d.y, d.y.len(), dev)?,
        })
    }
}

// ---- the model: candle ops, candle autograd -------------------------------------

/// The MLP's parameters as candle vars.
struct Mlp {
    vars: Vec<Var>,
}

impl Mlp {
    /// `train_shift`'s initial weights for `seed`: U(±1/√fan_in).
    fn new(seed: u64, dev: &Device) -> Result<Self> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let fan_in = [DIM, DIM, HIDDEN, HIDDEN];
        let vars = SHAPES
            .iter()
            .zip(fan_in)
            .map(|(&shape, f)| {
                let b = 1.0 / (f as f32).sqrt();
                let n = shape.iter().product::<usize>();
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-b..b)).collect();
                Var::from_vec(v, shape, dev)
            })
            .collect::<Result<_>>()?;
        Ok(Self { vars })
    }

    /// Logits of the rows of `x` from `w` (the vars, or any tensors of their shapes).
    fn forward(w: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let h = x.matmul(&w[0].t()?)?.broadcast_add(&w[1])?.relu()?;
        h.matmul(&w[2].t()?)?.broadcast_add(&w[3])
    }

    fn tensors(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_tensor().clone()).collect()
    }
}

/// Mean cross-entropy of `logits` against the labels `y`.
fn cross_entropy(logits: &Tensor, y: &Tensor) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let z = logits.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_p = z.broadcast_sub(&lse)?;
    let picked = log_p.gather(&y.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// Percentage of the rows of `data` classified correctly.
fn accuracy(model: &Mlp, data: &DeviceData) -> Result<f64> {
    let pred = Mlp::forward(&model.tensors(), &data.x)?.argmax(D::Minus1)?;
    let correct = pred.eq(&data.y)?.to_dtype(DType::F32)?.sum_all()?;
    Ok(100.0 * correct.to_scalar::<f32>()? as f64 / data.y.dim(0)? as f64)
}

// ---- optimizers ------------------------------------------------------------------

/// What an optimizer step may ask of the training loop, for the current batch.
trait Closure {
    /// The loss and every var's gradient at the vars' current values (one
    /// forward and one backward).
    fn loss_and_grads(&mut self) -> Result<(f32, GradStore)>;
    /// The batch's logits, without a graph, from `weights` (the vars' current
    /// values when `None`) on `inputs` (the batch's when `None`): TRAM-θ
    /// compares its EMA target's logits with the model's, TRAM-x the logits
    /// of noised inputs with the clean ones.
    fn logits(&mut self, weights: Option<&[Tensor]>, inputs: Option<&Tensor>) -> Result<Tensor>;
    /// The batch's inputs.
    fn inputs(&self) -> &Tensor;
}

/// One optimizer step over the model's vars.
trait Optimizer {
    /// Updates `vars` from `grads`, their gradients at the current values. A
    /// two-pass method evaluates the closure at the weights it perturbs to
    /// and leaves the vars updated from that second gradient.
    fn step(
        &mut self,
        vars: &[Var],
        grads: &GradStore,
        closure: &mut dyn Closure,
    ) -> Result<StepInfo>;
}

/// What a step reports.
#[derive(Clone, Copy, Debug, Default)]
struct StepInfo {
    /// The perturbation radius ρ, for the SAM family.
    rho: Option<f64>,
}

fn grad_of<'a>(grads: &'a GradStore, v: &Var) -> Result<&'a Tensor> {
    grads
        .get(v.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("a var has no gradient this step".into()))
}

/// `torch.optim.AdamW` (as candle-nn's `AdamW`), in candle ops.
struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
}

impl AdamW {
    fn new(vars: &[Var]) -> Result<Self> {
        let zeros = || {
            vars.iter()
                .map(|v| v.zeros_like())
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            m: zeros()?,
            v: zeros()?,
            t: 0,
        })
    }

    fn update(&mut self, vars: &[Var], grads: &GradStore) -> Result<()> {
        self.t += 1;
        let (c1, c2) = (1.0 - BETA1.powi(self.t), 1.0 - BETA2.powi(self.t));
        for (i, var) in vars.iter().enumerate() {
            let g = grad_of(grads, var)?;
            let m = ((&self.m[i] * BETA1)? + (g * (1.0 - BETA1))?)?;
            let v = ((&self.v[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + EPS)?)?;
            let theta = var.as_tensor();
            let theta = if DECAYS[i] {
                (theta * (1.0 - LR * WEIGHT_DECAY))?
            } else {
                theta.clone()
            };
            var.set(&(theta - (step * LR)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, vars: &[Var], grads: &GradStore, _: &mut dyn Closure) -> Result<StepInfo> {
        self.update(vars, grads)?;
        Ok(StepInfo::default())
    }
}

/// SAM, TRAM-θ or TRAM-x: the crate's candle optimizer, AdamW as its base.
struct Crate {
    opt: TramOptimizer,
    method: Method,
}

impl Crate {
    fn new(vars: &[Var], method: Method) -> Result<Self> {
        let base = BaseOptimizer::AdamW {
            beta1: BETA1 as f32,
            beta2: BETA2 as f32,
            eps: EPS as f32,
            weight_decay: WEIGHT_DECAY as f32,
        };
        let tram = |variant, delta| {
            tram_kernels::candle::Method::Tram(TramConfig {
                delta,
                geometry: Geometry::Sam,
                kl: KlOptions::default(),
                variant,
                optimizer: base,
                lr: LR as f32,
            })
        };
        let m = match method {
            Method::Sam => tram_kernels::candle::Method::Sam {
                rho: SAM_RHO as f32,
                geometry: Geometry::Sam,
                optimizer: base,
                lr: LR as f32,
            },
            Method::TramTheta => tram(
                TramVariant::Theta {
                    lambda: TRAM_LAMBDA,
                },
                TRAM_DELTA,
            ),
            Method::TramX => tram(
                TramVariant::X {
                    noise: NoiseConfig {
                        distribution: NoiseDistribution::Gaussian,
                        sigma: TRAMX_SIGMA,
                        seed: 7,
                    },
                },
                TRAMX_DELTA,
            ),
            Method::AdamW => unreachable!("AdamW is written in candle ops"),
        };
        let mut opt = TramOptimizer::new(vars.to_vec(), m)?;
        for (v, &decay) in vars.iter().zip(&DECAYS) {
            opt.set_weight_decay(v, decay)?;
        }
        Ok(Self { opt, method })
    }
}

impl Optimizer for Crate {
    fn step(
        &mut self,
        _vars: &[Var],
        grads: &GradStore,
        closure: &mut dyn Closure,
    ) -> Result<StepInfo> {
        let logits = match self.method {
            Method::TramTheta => {
                let target = self.opt.targets()?;
                Some((
                    closure.logits(Some(&target), None)?,
                    closure.logits(None, None)?,
                ))
            }
            Method::TramX => {
                let noised = self.opt.noise(closure.inputs())?;
                Some((
                    closure.logits(None, None)?,
                    closure.logits(None, Some(&noised))?,
                ))
            }
            _ => None,
        };
        self.opt
            .first_step(grads, logits.as_ref().map(|(a, b)| (a, b)))?;
        let (_, grads_at_eps) = closure.loss_and_grads()?;
        self.opt.second_step(&grads_at_eps)?;
        Ok(StepInfo {
            rho: Some(self.opt.report()?.rho),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Method {
    AdamW,
    Sam,
    TramTheta,
    TramX,
}

impl Method {
    const ALL: [Method; 4] = [Method::AdamW, Method::Sam, Method::TramTheta, Method::TramX];

    fn name(self) -> &'static str {
        match self {
            Method::AdamW => "AdamW",
            Method::Sam => "SAM",
            Method::TramTheta => "TRAM-θ",
            Method::TramX => "TRAM-x",
        }
    }

    fn optimizer(self, vars: &[Var]) -> Result<Box<dyn Optimizer>> {
        Ok(match self {
            Method::AdamW => Box::new(AdamW::new(vars)?),
            _ => Box::new(Crate::new(vars, self)?),
        })
    }
}

// ---- training ---------------------------------------------------------------------

/// The loss of one batch under the model's current vars.
struct Batch<'a> {
    model: &'a Mlp,
    x: Tensor,
    y: Tensor,
}

impl Closure for Batch<'_> {
    fn loss_and_grads(&mut self) -> Result<(f32, GradStore)> {
        let logits = Mlp::forward(&self.model.tensors(), &self.x)?;
        let loss = cross_entropy(&logits, &self.y)?;
        let grads = loss.backward()?;
        Ok((loss.to_scalar::<f32>()?, grads))
    }

    fn logits(&mut self, weights: Option<&[Tensor]>, inputs: Option<&Tensor>) -> Result<Tensor> {
        let own;
        let w = match weights {
            Some(w) => w,
            None => {
                own = self.model.tensors();
                &own
            }
        };
        Ok(Mlp::forward(w, inputs.unwrap_or(&self.x))?.detach())
    }

    fn inputs(&self) -> &Tensor {
        &self.x
    }
}

struct RunResult {
    first_loss: f32,
    last_loss: f32,
    acc_in: f64,
    acc_shift: f64,
    mean_rho: Option<f64>,
    seconds: f64,
}

struct Data {
    train: Dataset,
    test: DeviceData,
    shifted: DeviceData,
}

fn run(method: Method, data: &Data, seed: u64, steps: usize, dev: &Device) -> Result<RunResult> {
    let start = Instant::now();
    let model = Mlp::new(seed, dev)?;
    let mut opt = method.optimizer(&model.vars)?;
    // train_shift's batches: a reshuffle of the training set per epoch.
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_0ba7c4);
    let n = data.train.y.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut pos = n;
    let mut xb = vec![0.0f32; BATCH * DIM];
    let mut yb = vec![0u32; BATCH];
    let (mut first_loss, mut last_loss) = (f32::NAN, f32::NAN);
    let (mut rho_sum, mut rho_steps) = (0.0f64, 0usize);
    for step in 0..steps {
        for i in 0..BATCH {
            if pos == n {
                for k in (1..n).rev() {
                    order.swap(k, rng.random_range(0..=k));
                }
                pos = 0;
            }
            let r = order[pos];
            pos += 1;
            xb[i * DIM..(i + 1) * DIM].copy_from_slice(&data.train.x[r * DIM..(r + 1) * DIM]);
            yb[i] = data.train.y[r];
        }
        let mut batch = Batch {
            model: &model,
            x: Tensor::from_slice(&xb, (BATCH, DIM), dev)?,
            y: Tensor::from_slice(&yb, BATCH, dev)?,
        };
        let (loss, grads) = batch.loss_and_grads()?;
        if step == 0 {
            first_loss = loss;
        }
        last_loss = loss;
        let info = opt.step(&model.vars, &grads, &mut batch)?;
        if let Some(rho) = info.rho {
            rho_sum += rho;
            rho_steps += 1;
        }
    }
    Ok(RunResult {
        first_loss,
        last_loss,
        acc_in: accuracy(&model, &data.test)?,
        acc_shift: accuracy(&model, &data.shifted)?,
        mean_rho: (rho_steps > 0).then(|| rho_sum / rho_steps as f64),
        seconds: start.elapsed().as_secs_f64(),
    })
}

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

fn full_run(dev: &Device, steps: usize, seeds: u64) -> Result<bool> {
    let (train, test, shifted) = make_data();
    let data = Data {
        test: DeviceData::new(&test, dev)?,
        shifted: DeviceData::new(&shifted, dev)?,
        train,
    };
    println!(
        "candle_shift: {CLASSES} Gaussian classes in {DIM}-d, {TRAIN} training points; \
         MLP {DIM}-{HIDDEN}-{CLASSES} (ReLU), f32, candle autograd on {dev:?}"
    );
    println!(
        "  shifted domain: rotate coordinate pairs by {ANGLE} rad, scale {SCALE}, \
         translate by {SHIFT}; {TEST} test points per domain"
    );
    println!("  AdamW lr {LR}, wd {WEIGHT_DECAY} (matrices), batch {BATCH}; SAM rho = {SAM_RHO}");
    println!(
        "  TRAM-θ rho = {TRAM_DELTA}·KL(EMA λ={TRAM_LAMBDA} ‖ model); \
         TRAM-x rho = {TRAMX_DELTA}·KL(model(x) ‖ model(x + z)), z ~ N(0, {TRAMX_SIGMA}²)"
    );
    println!("  SAM, TRAM-θ, TRAM-x: tram_kernels::candle::TramOptimizer (AdamW base)");
    println!("  {steps} steps x {seeds} seeds per method; mean ± std over seeds\n");
    println!(
        "{:<8} {:>16} {:>16} {:>9} {:>17} {:>8}",
        "method", "in-domain %", "shifted %", "mean rho", "loss first->last", "total s"
    );
    let mut ok = true;
    for method in Method::ALL {
        let (mut acc_in, mut acc_shift) = (Vec::new(), Vec::new());
        let (mut first, mut last, mut secs, mut rho) = (0.0, 0.0, 0.0, None);
        for seed in 0..seeds {
            let r = run(method, &data, seed, steps, dev)?;
            acc_in.push(r.acc_in);
            acc_shift.push(r.acc_shift);
            first += r.first_loss as f64 / seeds as f64;
            last += r.last_loss as f64 / seeds as f64;
            secs += r.seconds;
            rho = r.mean_rho.map(|x| rho.unwrap_or(0.0) + x / seeds as f64);
            // Training must have trained: a finite loss that went down.
            ok &= r.last_loss.is_finite() && r.last_loss < r.first_loss;
        }
        let (mi, si) = mean_std(&acc_in);
        let (ms, ss) = mean_std(&acc_shift);
        println!(
            "{:<8} {:>16} {:>16} {:>9} {:>17} {:>8.2}",
            method.name(),
            format!("{mi:.2} ± {si:.2}"),
            format!("{ms:.2} ± {ss:.2}"),
            rho.map_or("-".to_string(), |r| format!("{r:.4}")),
            format!("{first:.3} -> {last:.3}"),
            secs
        );
    }
    println!("\nloss: batch cross-entropy of the first and last step, mean over seeds");
    Ok(ok)
}

fn device(cuda: bool) -> std::result::Result<Device, String> {
    if !cuda {
        return Ok(Device::Cpu);
    }
    if cfg!(feature = "candle-cuda") {
        Device::new_cuda(0).map_err(|e| format!("--cuda needs a usable GPU, and none is: {e}"))
    } else {
        Err("--cuda needs the candle-cuda feature: \
             cargo run --release --features candle-cuda --example candle_shift -- --cuda"
            .into())
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut cuda, mut steps, mut seeds) = (false, STEPS, SEEDS);
    while let Some(a) = args.next() {
        let mut number = |what: &str| -> Option<u64> {
            let v = args
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|&v| v > 0);
            if v.is_none() {
                eprintln!("candle_shift: {what} needs a positive integer");
            }
            v
        };
        match a.as_str() {
            "--cuda" => cuda = true,
            "--steps" => match number("--steps") {
                Some(v) => steps = v as usize,
                None => return ExitCode::from(2),
            },
            "--seeds" => match number("--seeds") {
                Some(v) => seeds = v,
                None => return ExitCode::from(2),
            },
            "-h" | "--help" => {
                println!(
                    "usage: candle_shift [--cuda] [--steps N] [--seeds N]\n  \
                     trains with AdamW and SAM through candle's autograd (CPU by default)\n  \
                     --cuda     on CUDA device 0 (needs the candle-cuda feature)\n  \
                     --steps N  steps per run (default {STEPS})\n  \
                     --seeds N  seeds per method (default {SEEDS})"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("candle_shift: unknown argument {other:?} (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    let dev = match device(cuda) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("candle_shift: {e}");
            return ExitCode::from(3);
        }
    };
    match full_run(&dev, steps, seeds) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("candle_shift: a run did not lower its loss");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("candle_shift: {e}");
            ExitCode::FAILURE
        }
    }
}
