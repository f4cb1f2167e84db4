//! TRAM, SAM and ASAM as a candle optimizer over `Var`s and a `GradStore`.
//!
//! [`TramOptimizer`] is built from the vars it trains and a [`Method`], owns
//! the optimizer state (AdamW's m and v or SGD's momentum, the backups of θ,
//! TRAM-θ's target weights) and runs the crate's step API ([`crate::Tram`])
//! on the vars' own storage: [`cpu::step::TramStep`](crate::cpu::step::TramStep)
//! on candle's CPU device, and with `candle-cuda`
//! [`cuda::step::TramStep`](crate::cuda::step::TramStep) on candle's CUDA
//! stream. The maths, the order of the calls, AMP and resume are the step
//! API's (see [`crate::step`]); this module adapts candle's tensors to it.
//!
//! ```
//! use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
//! use tram_kernels::candle::{Method, TramOptimizer};
//! use tram_kernels::BaseOptimizer;
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let x = Tensor::randn(0f32, 1.0, (16, 4), &dev)?;
//! let y = Tensor::randn(0f32, 1.0, (16, 1), &dev)?;
//! let w = Var::zeros((4, 1), DType::F32, &dev)?;
//! let loss = |w: &Var| -> candle_core::Result<Tensor> { x.matmul(w)?.sub(&y)?.sqr()?.mean_all() };
//! // SAM with ρ = 0.05 on AdamW, in place of candle-nn's AdamW.
//! let method = Method::Sam { rho: 0.05, geometry: tram_kernels::Geometry::Sam,
//!                            optimizer: BaseOptimizer::adamw(0.0), lr: 0.05 };
//! let mut opt = TramOptimizer::new(vec![w.clone()], method)?;
//! let first = loss(&w)?.to_scalar::<f32>()?;
//! for _ in 0..50 {
//!     let grads = loss(&w)?.backward()?; // at θ
//!     opt.first_step(&grads, None)?;     // θ ← θ + ε
//!     let grads = loss(&w)?.backward()?; // at θ + ε
//!     opt.second_step(&grads)?;          // restore θ, AdamW with these gradients
//! }
//! assert!(loss(&w)?.to_scalar::<f32>()? < first);
//! # let _: Option<GradStore> = None;
//! # Ok(())
//! # }
//! ```
//!
//! # A TRAM iteration
//! 1. `loss.backward()` at θ, with the model's logits `z` (and, for TRAM-θ,
//!    the target's logits `z̄` from a forward of [`TramOptimizer::targets`];
//!    for TRAM-x, the model's logits on [`TramOptimizer::noise`]d inputs);
//! 2. [`TramOptimizer::first_step`]`(&grads, Some((&z̄, &z)))`: d =
//!    KL(z̄ ‖ z), ρ = δ·d, θ ← θ + ε, backups kept;
//! 3. `loss.backward()` at θ + ε (the vars hold it now);
//! 4. [`TramOptimizer::second_step`]`(&grads)`: θ restored, the base
//!    optimizer with the new gradients, TRAM-θ's target EMA.
//!
//! SAM and ASAM ([`Method::Sam`]) take `None` for the logits (a fixed ρ).
//! [`TramOptimizer::step`] is an update without perturbation (candle-nn's
//! `Optimizer::step`; SAM every k iterations). Calls out of order are an
//! `Err` that says what to call.
//!
//! # Gradients
//! Each step reads the gradient of every var from the `GradStore` it is
//! given. A var without one (not reached by this loss) sits the iteration
//! out: neither perturbed nor updated, as the step API's `set_has_grad` says
//! (TRAM-θ's target still follows it). A var that had a gradient in the
//! first step needs one in the second (`Err` otherwise). A gradient on
//! another device, of another dtype or shape than its var is an `Err`; a
//! gradient that is not contiguous (candle's backward gives contiguous ones)
//! is copied into a contiguous tensor first.
//!
//! # The vars
//! All vars on one device (CPU, or one CUDA device with `candle-cuda`), of
//! one dtype: f32, f16 or bf16 (the step API's `(P, P)` pairs; candle's
//! gradients have their var's dtype), contiguous (as `Var`s are made), each
//! var once. Anything else is an `Err` from [`TramOptimizer::new`]. Weight
//! decay applies to every var unless [`TramOptimizer::set_weight_decay`]
//! turns it off (biases, norms). Optimizer state is f32: m, v and the
//! TRAM-θ targets, whatever the vars' dtype (a bf16 model's target logits
//! come from f32 weights: cast them, or the logits, to one dtype).
//!
//! # Writing into a var's storage
//! candle hands out storage read-only (`Tensor::storage_and_layout`); the
//! optimizer writes updates into each var's own storage, so every clone and
//! view of the var sees them, as after `Var::set`:
//!
//! * **CPU**: each step copies θ out of every var into buffers the optimizer
//!   owns (under candle's read lock), runs the crate's CPU step on those
//!   buffers and the gradients' storage (read in place, under read locks),
//!   and copies the result back into the vars that changed through
//!   `Tensor::inplace_op1`, which holds candle's write lock on the storage
//!   while it copies. Host cost per step call, beyond the step itself: one
//!   read of every var and one write of every var that took part,
//!   `2 · size_of(P)` bytes per element moved; the element buffers are
//!   allocated once, when the optimizer is built (each call allocates only a
//!   few vectors of one entry per var). No `unsafe`.
//! * **CUDA** (`candle-cuda`): no copy. The step's kernels read and write
//!   the vars' and gradients' device memory at the addresses of candle's
//!   buffers (`CudaStorage::as_cuda_slice` plus the layout's offset), on
//!   candle's own stream (the crate's backend is made from
//!   `CudaDevice::cuda_stream`). This is sound under the contract of the
//!   [module docs](super): the optimizer writes only the elements of each
//!   var's layout; the launches are queued on the stream candle orders its
//!   own work on, so candle's earlier work (the backward) and later work
//!   (the next forward) see the writes in order without a synchronisation;
//!   and the caller does not use the vars from another thread or stream
//!   while a step call runs (as with any optimizer). The vars' storage keeps
//!   its address, but candle allocates new gradient tensors at every
//!   `backward()`: each step call rebuilds the description from the
//!   `GradStore` — per var and call a `GradStore` lookup, candle's read
//!   lock, and cudarc's `device_ptr` for the var and its gradient (an event
//!   recorded when event tracking is on), no allocation beyond the call's
//!   few vectors; then the step's own check and a table upload of up to 56
//!   bytes per var when an address changed, which with fresh gradients is
//!   every call (the step's part measured in [`crate::cuda::step`]: 38 µs
//!   for 292 tensors when every gradient moved; the adapter's part is not
//!   measured). A captured CUDA graph cannot
//!   follow those new addresses: with candle's allocating backward, do not
//!   capture the optimizer's steps (the crate's step API can be captured
//!   with persistent gradient buffers; see [`crate::cuda::step`]). The
//!   optimizer's own state (backups, m, v: `CudaSlice`s; the targets: f32
//!   candle tensors) lives on the vars' device; the KL workspace grows to the
//!   largest logit batch seen (the step is rebuilt then, its state carried).
//!
//! # Errors
//! `candle_core::Result`, the crate's [`Error`] wrapped (see
//! the [module docs](super)). A refused call writes nothing.

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType as CandleDType, Device, InplaceOp1, Layout, Tensor, Var};

use crate::error::{ensure, Error, Result};
use crate::{
    bf16, f16, BaseOptimizer, Element, Geometry, KlOptions, NoiseConfig, NoiseDistribution,
    StepReport, Tram, TramConfig, TramState, TramVariant,
};

use super::kl_div::RowLayout;

/// What the optimizer runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// TRAM (θ or x, as `variant` says): ρ = δ·KL(target ‖ model) each
    /// iteration, with the step API's geometries and base optimizers.
    Tram(TramConfig),
    /// SAM (`Geometry::Sam`) or ASAM (`Geometry::Adaptive { eta }`; Fisher
    /// also works) with a fixed radius ρ on a base optimizer.
    Sam {
        /// The radius ρ: finite and >= 0.
        rho: f32,
        /// The perturbation's geometry.
        geometry: Geometry,
        /// The base update of the second step.
        optimizer: BaseOptimizer,
        /// The initial learning rate.
        lr: f32,
    },
}

impl Method {
    /// The step API's configuration. SAM is a TRAM-x step whose noise is never
    /// drawn and whose first step takes a fixed ρ.
    fn config(&self) -> TramConfig {
        match *self {
            Method::Tram(cfg) => cfg,
            Method::Sam {
                geometry,
                optimizer,
                lr,
                ..
            } => TramConfig {
                delta: 0.0,
                geometry,
                kl: KlOptions::default(),
                variant: TramVariant::X {
                    noise: NoiseConfig {
                        distribution: NoiseDistribution::Gaussian,
                        sigma: 0.0,
                        seed: 0,
                    },
                },
                optimizer,
                lr,
            },
        }
    }
}

/// The optimizer state besides the vars, for a checkpoint: the step API's
/// [`TramState`] and the state tensors (f32, one per var in the order of
/// [`TramOptimizer::vars`]; empty where the method keeps none).
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The step count with its β powers, the noise step, lr, δ and the scale.
    pub state: TramState,
    /// AdamW's first moment or SGD's momentum.
    pub m: Vec<Tensor>,
    /// AdamW's second moment.
    pub v: Vec<Tensor>,
    /// TRAM-θ's targets.
    pub targets: Vec<Tensor>,
}

/// TRAM, SAM or ASAM over candle vars (see the [module docs](self)).
pub struct TramOptimizer {
    vars: Vec<Var>,
    decay: Vec<bool>,
    method: Method,
    engine: Box<dyn Engine>,
}

impl std::fmt::Debug for TramOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TramOptimizer")
            .field("vars", &self.vars.len())
            .field("method", &self.method)
            .finish()
    }
}

/// One step call's gradients: per var, a contiguous gradient or none.
type Grads = Vec<Option<Tensor>>;

/// The backend- and dtype-specific half (object safe; `Tram` is not).
trait Engine: Send {
    fn first(
        &mut self,
        vars: &[Var],
        decay: &[bool],
        grads: &Grads,
        logits: Option<(&Tensor, &Tensor)>,
        rho: Option<f32>,
    ) -> Result<()>;
    fn second(&mut self, vars: &[Var], decay: &[bool], grads: &Grads) -> Result<()>;
    fn base(&mut self, vars: &[Var], decay: &[bool], grads: &Grads) -> Result<()>;
    fn noise(&mut self, x: &Tensor) -> Result<Tensor>;
    fn targets(&self, vars: &[Var]) -> Result<Vec<Tensor>>;
    fn checkpoint(&self, vars: &[Var]) -> Result<Checkpoint>;
    fn resume(&mut self, c: &Checkpoint) -> Result<()>;
    fn tram(&mut self) -> &mut dyn TramValues;
    fn tram_ref(&self) -> &dyn TramValues;
}

/// The step API's scalar methods, object safe.
trait TramValues {
    fn lr(&self) -> f32;
    fn set_lr(&mut self, lr: f32) -> Result<()>;
    fn delta(&self) -> f32;
    fn set_delta(&mut self, d: f32) -> Result<()>;
    fn inv_scale(&self) -> f32;
    fn set_inv_scale(&mut self, s: f32) -> Result<()>;
    fn step_count(&self) -> Result<u64>;
    fn report(&self) -> Result<StepReport>;
}

impl<S: Tram> TramValues for S {
    fn lr(&self) -> f32 {
        Tram::lr(self)
    }
    fn set_lr(&mut self, lr: f32) -> Result<()> {
        Tram::set_lr(self, lr)
    }
    fn delta(&self) -> f32 {
        Tram::delta(self)
    }
    fn set_delta(&mut self, d: f32) -> Result<()> {
        Tram::set_delta(self, d)
    }
    fn inv_scale(&self) -> f32 {
        Tram::inv_scale(self)
    }
    fn set_inv_scale(&mut self, s: f32) -> Result<()> {
        Tram::set_inv_scale(self, s)
    }
    fn step_count(&self) -> Result<u64> {
        Tram::step_count(self)
    }
    fn report(&self) -> Result<StepReport> {
        Tram::report(self)
    }
}

impl TramOptimizer {
    /// An optimizer over `vars` (see the [module docs](self) for what they
    /// must be). The state starts at zero, TRAM-θ's targets at the vars'
    /// values (in f32), the step count at 0.
    ///
    /// # Errors
    /// The crate's error (wrapped) for no vars, vars of several devices or
    /// dtypes, a dtype other than f32, f16 or bf16, a device other than the
    /// CPU (or CUDA with `candle-cuda`), a var listed twice or not
    /// contiguous, a bad configuration or ρ; on CUDA a failed allocation.
    pub fn new(vars: Vec<Var>, method: Method) -> candle_core::Result<Self> {
        Ok(Self::build(vars, method)?)
    }

    fn build(vars: Vec<Var>, method: Method) -> Result<Self> {
        let cfg = method.config();
        if let Method::Sam { rho, .. } = method {
            ensure!(
                rho.is_finite() && rho >= 0.0,
                "SAM's radius ρ {rho} must be finite and >= 0"
            );
        }
        ensure!(!vars.is_empty(), "TramOptimizer needs at least one var");
        let (dev, dtype) = (vars[0].device().clone(), vars[0].dtype());
        let mut ids = std::collections::HashSet::with_capacity(vars.len());
        for (i, v) in vars.iter().enumerate() {
            ensure!(
                v.device().same_device(&dev),
                "var {i} is on {:?}, var 0 on {:?}: one optimizer takes vars of one device",
                v.device().location(),
                dev.location()
            );
            ensure!(
                v.dtype() == dtype,
                "var {i} is {:?}, var 0 {dtype:?}: one optimizer takes vars of one dtype",
                v.dtype()
            );
            ensure!(
                v.is_contiguous(),
                "var {i} is not contiguous; make it from a contiguous tensor"
            );
            ensure!(
                ids.insert(v.id()),
                "var {i} is listed twice; list each var once"
            );
        }
        let engine: Box<dyn Engine> = match (&dev, dtype) {
            (Device::Cpu, CandleDType::F32) => Box::new(CpuEngine::<f32>::new(&vars, cfg)?),
            (Device::Cpu, CandleDType::F16) => Box::new(CpuEngine::<f16>::new(&vars, cfg)?),
            (Device::Cpu, CandleDType::BF16) => Box::new(CpuEngine::<bf16>::new(&vars, cfg)?),
            #[cfg(feature = "candle-cuda")]
            (Device::Cuda(d), dt) => cuda::engine(d, &vars, cfg, dt)?,
            (Device::Cpu, dt) => {
                return Err(Error::InvalidArgument(format!(
                    "vars of dtype {dt:?}: the TRAM optimizer takes f32, f16 or bf16"
                )))
            }
            (d, _) => {
                return Err(Error::InvalidArgument(format!(
                    "vars on {:?}: the TRAM optimizer runs on the CPU{}",
                    d.location(),
                    if cfg!(feature = "candle-cuda") {
                        " and CUDA"
                    } else {
                        " (CUDA with the candle-cuda feature)"
                    }
                )))
            }
        };
        Ok(Self {
            decay: vec![true; vars.len()],
            vars,
            method,
            engine,
        })
    }

    /// The vars, in the order of every per-var list.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// What the optimizer runs (δ, ρ and lr as last set).
    pub fn method(&self) -> Method {
        self.method
    }

    /// Turns weight decay on or off for `var` (on for every var at first).
    ///
    /// # Errors
    /// When `var` is not one of the optimizer's.
    pub fn set_weight_decay(&mut self, var: &Var, decay: bool) -> candle_core::Result<()> {
        let i = self.index(var)?;
        self.decay[i] = decay;
        Ok(())
    }

    fn index(&self, var: &Var) -> Result<usize> {
        self.vars
            .iter()
            .position(|v| v.id() == var.id())
            .ok_or_else(|| Error::InvalidArgument("the var is not one of the optimizer's".into()))
    }

    /// Each var's gradient from `grads`, checked; non-contiguous ones copied.
    fn grads(&self, grads: &GradStore) -> Result<Grads> {
        self.vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let Some(g) = grads.get(v.as_tensor()) else {
                    return Ok(None);
                };
                ensure!(
                    g.device().same_device(v.device()),
                    "var {i}: its gradient is on {:?}, the var on {:?}",
                    g.device().location(),
                    v.device().location()
                );
                ensure!(
                    g.dtype() == v.dtype(),
                    "var {i}: its gradient is {:?}, the var {:?}",
                    g.dtype(),
                    v.dtype()
                );
                ensure!(
                    g.dims() == v.dims(),
                    "var {i}: its gradient has shape {:?}, the var {:?}",
                    g.dims(),
                    v.dims()
                );
                Ok(Some(if g.is_contiguous() {
                    g.clone()
                } else {
                    g.contiguous().map_err(candle_err)?
                }))
            })
            .collect()
    }

    /// The first step at the gradients `grads` (at θ): for TRAM `logits` is
    /// `Some((target, model))`, two tensors of logits `(..., vocab)` of one
    /// shape and dtype (f32, f16 or bf16; rows a fixed stride apart, as
    /// [`kl_div`](super::kl_div::kl_div) reads them) on the vars' device,
    /// and ρ = δ·KL(target ‖ model); for SAM and ASAM `None` (ρ fixed).
    /// θ ← θ + ε in the vars.
    ///
    /// # Errors
    /// When the logits are missing for TRAM or given for SAM, are on
    /// another device or differ in shape or dtype; when a gradient is on
    /// another device or of another dtype or shape than its var; and the
    /// step API's errors (θ already perturbed: call `second_step`). Nothing
    /// is written then.
    pub fn first_step(
        &mut self,
        grads: &GradStore,
        logits: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<()> {
        Ok(self.first(grads, logits)?)
    }

    fn first(&mut self, grads: &GradStore, logits: Option<(&Tensor, &Tensor)>) -> Result<()> {
        let rho = match (self.method, logits) {
            (Method::Tram(_), Some(_)) => None,
            (Method::Sam { rho, .. }, None) => Some(rho),
            (Method::Tram(_), None) => {
                return Err(Error::InvalidArgument(
                    "TRAM's first step needs the target and model logits: first_step(&grads, \
                     Some((&target, &model)))"
                        .into(),
                ))
            }
            (Method::Sam { .. }, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "SAM's radius is fixed: first_step(&grads, None)".into(),
                ))
            }
        };
        if let Some((a, b)) = logits {
            for (what, t) in [("target", a), ("model", b)] {
                ensure!(
                    t.device().same_device(self.vars[0].device()),
                    "the {what} logits are on {:?}, the vars on {:?}",
                    t.device().location(),
                    self.vars[0].device().location()
                );
            }
        }
        let g = self.grads(grads)?;
        self.engine.first(&self.vars, &self.decay, &g, logits, rho)
    }

    /// The second step at the gradients `grads` (at θ + ε): θ restored, the
    /// base optimizer, TRAM-θ's target EMA.
    ///
    /// # Errors
    /// Without a first step before it; when a var that had a gradient in the
    /// first step has none; for bad gradients as in [`Self::first_step`].
    pub fn second_step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let g = self.grads(grads)?;
        Ok(self.engine.second(&self.vars, &self.decay, &g)?)
    }

    /// An update without perturbation at the gradients `grads` (at θ), as
    /// candle-nn's `Optimizer::step`: SAM or TRAM every k iterations.
    ///
    /// # Errors
    /// While θ is perturbed (call `second_step`); for bad gradients as in
    /// [`Self::first_step`].
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let g = self.grads(grads)?;
        Ok(self.engine.base(&self.vars, &self.decay, &g)?)
    }

    /// TRAM-x: `x` + this iteration's noise (the step API's `noise`), a new
    /// tensor of `x`'s shape and dtype (f32, f16 or bf16), not tracked.
    ///
    /// # Errors
    /// For SAM and TRAM-θ, an input on another device or of a dtype other
    /// than f32, f16 or bf16.
    pub fn noise(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.noise_(x)?)
    }

    fn noise_(&mut self, x: &Tensor) -> Result<Tensor> {
        ensure!(
            matches!(self.method, Method::Tram(_)),
            "SAM draws no noise: noise is TRAM-x's"
        );
        ensure!(
            x.device().same_device(self.vars[0].device()),
            "noise input on {:?}, the vars on {:?}",
            x.device().location(),
            self.vars[0].device().location()
        );
        let x = x.contiguous().map_err(candle_err)?;
        self.engine.noise(&x)
    }

    /// TRAM-θ's target weights θ̄ (f32, the vars' shapes), as of this call:
    /// on the CPU copies; on CUDA tensors over the optimizer's own storage,
    /// which the next second step or step overwrites. Empty for TRAM-x and
    /// SAM.
    ///
    /// # Errors
    /// When candle fails to make the tensors (allocation).
    pub fn targets(&self) -> candle_core::Result<Vec<Tensor>> {
        Ok(self.engine.targets(&self.vars)?)
    }

    /// The learning rate.
    pub fn learning_rate(&self) -> f64 {
        self.engine.tram_ref().lr() as f64
    }

    /// Sets the learning rate from the next update on (finite, >= 0).
    ///
    /// # Errors
    /// For a negative or non-finite value.
    pub fn set_learning_rate(&mut self, lr: f64) -> candle_core::Result<()> {
        self.engine.tram().set_lr(lr as f32)?;
        match &mut self.method {
            Method::Tram(c) => c.lr = lr as f32,
            Method::Sam { lr: l, .. } => *l = lr as f32,
        }
        Ok(())
    }

    /// TRAM's δ, or SAM's ρ.
    pub fn radius_scale(&self) -> f32 {
        match self.method {
            Method::Tram(_) => self.engine.tram_ref().delta(),
            Method::Sam { rho, .. } => rho,
        }
    }

    /// Sets TRAM's δ, or SAM's ρ, from the next first step on (finite, >= 0).
    ///
    /// # Errors
    /// For a negative or non-finite value.
    pub fn set_radius_scale(&mut self, value: f32) -> candle_core::Result<()> {
        Ok(self.set_radius_scale_(value)?)
    }

    fn set_radius_scale_(&mut self, value: f32) -> Result<()> {
        match &mut self.method {
            Method::Tram(c) => {
                self.engine.tram().set_delta(value)?;
                c.delta = value;
            }
            Method::Sam { rho, .. } => {
                ensure!(
                    value.is_finite() && value >= 0.0,
                    "SAM's radius ρ {value} must be finite and >= 0"
                );
                *rho = value;
            }
        }
        Ok(())
    }

    /// The inverse loss scale s: gradients are read as s·g. Under AMP,
    /// multiply the loss by `scale` before each backward and set s =
    /// 1/scale; an iteration whose gradients are not finite is skipped
    /// ([`crate::StepStatus::SKIPPED`] in [`Self::report`]).
    ///
    /// # Errors
    /// For a value that is not finite and > 0.
    pub fn set_inv_scale(&mut self, inv_scale: f32) -> candle_core::Result<()> {
        Ok(self.engine.tram().set_inv_scale(inv_scale)?)
    }

    /// The inverse loss scale.
    pub fn inv_scale(&self) -> f32 {
        self.engine.tram_ref().inv_scale()
    }

    /// Updates applied so far (skipped iterations do not count).
    ///
    /// # Errors
    /// On CUDA, when reading the device state fails.
    pub fn step_count(&self) -> candle_core::Result<u64> {
        Ok(self.engine.tram_ref().step_count()?)
    }

    /// The last iteration's status and its first step's d, ρ and norm.
    ///
    /// # Errors
    /// On CUDA, when reading the device state fails.
    pub fn report(&self) -> candle_core::Result<StepReport> {
        Ok(self.engine.tram_ref().report()?)
    }

    /// Everything besides the vars that a resumed run needs (save the vars
    /// yourself, e.g. with a `VarMap`): between iterations only.
    ///
    /// # Errors
    /// When candle fails to make the tensors; on CUDA, a failed copy.
    pub fn checkpoint(&self) -> candle_core::Result<Checkpoint> {
        Ok(self.engine.checkpoint(&self.vars)?)
    }

    /// Resumes from a checkpoint of an optimizer over vars of the same shapes
    /// and the same method: the run continues bit for bit. Between
    /// iterations only.
    ///
    /// # Errors
    /// While θ is perturbed, or when the checkpoint's tensors differ in
    /// count, length or dtype (f32) from this optimizer's; nothing is
    /// changed then.
    pub fn resume(&mut self, c: &Checkpoint) -> candle_core::Result<()> {
        Ok(self.engine.resume(c)?)
    }
}

fn candle_err(e: candle_core::Error) -> Error {
    Error::InvalidArgument(e.to_string())
}

/// An element type of both the step API and candle's CPU storage.
trait CpuElem: Element + candle_core::WithDType {
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! cpu_elem {
    ($t:ty, $v:ident) => {
        impl CpuElem for $t {
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$v(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
cpu_elem!(f32, F32);
cpu_elem!(f16, F16);
cpu_elem!(bf16, BF16);

/// The elements of a contiguous CPU tensor of type `T`, while `guard` lives.
fn cpu_slice<'g, T: CpuElem>(
    storage: &'g candle_core::Storage,
    layout: &Layout,
    what: impl std::fmt::Display,
) -> Result<&'g [T]> {
    let candle_core::Storage::Cpu(c) = storage else {
        return Err(Error::InvalidArgument(format!("{what} is not on the CPU")));
    };
    let s = T::cpu_storage_as_slice(c).map_err(candle_err)?;
    ensure!(layout.is_contiguous(), "{what} is not contiguous");
    let (a, n) = (layout.start_offset(), layout.shape().elem_count());
    s.get(a..a + n)
        .ok_or_else(|| Error::InvalidArgument(format!("{what} lies past its storage")))
}

/// A var's (or its gradient's) name in an error, formatted only then.
struct Named(&'static str, usize);

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

/// Copies `src` into a var's storage, under candle's write lock.
struct WriteBack<'a, T>(&'a [T]);

impl<T: CpuElem> InplaceOp1 for WriteBack<'_, T> {
    fn name(&self) -> &'static str {
        "tram-write-back"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (a, n) = (l.start_offset(), l.shape().elem_count());
        let dst = T::slice_mut(s)
            .and_then(|d| d.get_mut(a..a + n))
            .filter(|_| l.is_contiguous() && n == self.0.len())
            .ok_or_else(|| {
                Error::InvalidArgument("the var's storage changed dtype or layout".into())
            })?;
        dst.copy_from_slice(self.0);
        Ok(())
    }
}

/// The CPU half: the crate's CPU step over buffers the optimizer owns.
struct CpuEngine<P: CpuElem> {
    step: crate::cpu::step::TramStep<P, P, f32>,
    params: Vec<Vec<P>>,
    backups: Vec<Vec<P>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    targets: Vec<Vec<f32>>,
    /// The vars the last first step perturbed.
    perturbed: Vec<bool>,
}

/// One call's description of the owned buffers and the gradients.
fn describe<'a, P: CpuElem>(
    params: &'a mut [Vec<P>],
    backups: &'a mut [Vec<P>],
    m: &'a mut [Vec<f32>],
    v: &'a mut [Vec<f32>],
    targets: &'a mut [Vec<f32>],
    grads: &[Option<&'a [P]>],
    decay: &[bool],
) -> Vec<crate::cpu::step::Tensor<'a, P>> {
    use crate::cpu::step::{Perturbation, Tensor as T};
    let mut m = m.iter_mut();
    let mut v = v.iter_mut();
    let mut x = targets.iter_mut();
    params
        .iter_mut()
        .zip(backups.iter_mut())
        .zip(grads.iter().zip(decay))
        .map(|((p, b), (g, &d))| T {
            param: p,
            grad: *g,
            perturbation: Perturbation::Backup(b),
            m: m.next().map(|b| &mut b[..]),
            v: v.next().map(|b| &mut b[..]),
            target: x.next().map(|b| &mut b[..]),
            weight_decay: d,
        })
        .collect()
}

impl<P: CpuElem> CpuEngine<P> {
    fn new(vars: &[Var], cfg: TramConfig) -> Result<Self> {
        let zeros = |on: bool| -> Vec<Vec<f32>> {
            if on {
                vars.iter().map(|v| vec![0.0; v.elem_count()]).collect()
            } else {
                Vec::new()
            }
        };
        let mut params: Vec<Vec<P>> = vars
            .iter()
            .map(|v| vec![P::from_f32(0.0); v.elem_count()])
            .collect();
        load(vars, &mut params)?;
        let mut backups = params.clone();
        let (mut m, mut v) = (zeros(cfg.optimizer.uses_m()), zeros(cfg.optimizer.uses_v()));
        let mut targets: Vec<Vec<f32>> = match cfg.variant {
            TramVariant::Theta { .. } => params
                .iter()
                .map(|p| p.iter().map(|x| x.to_f32()).collect())
                .collect(),
            TramVariant::X { .. } => Vec::new(),
        };
        let none = vec![None; vars.len()];
        let decay = vec![true; vars.len()];
        let t = describe(
            &mut params,
            &mut backups,
            &mut m,
            &mut v,
            &mut targets,
            &none,
            &decay,
        );
        let step = crate::cpu::step::TramStep::new(cfg, &t)?;
        drop(t);
        Ok(Self {
            step,
            params,
            backups,
            m,
            v,
            targets,
            perturbed: vec![false; vars.len()],
        })
    }

    /// Runs `f` on the step and this call's description, with θ copied in
    /// from the vars first and copied back afterwards into those `write`
    /// says (`None`: the tensors taking part, from the gradients).
    fn call(
        &mut self,
        vars: &[Var],
        decay: &[bool],
        grads: &Grads,
        write: Option<Vec<bool>>,
        f: impl FnOnce(
            &mut crate::cpu::step::TramStep<P, P, f32>,
            &mut [crate::cpu::step::Tensor<'_, P>],
        ) -> Result<()>,
    ) -> Result<Vec<bool>> {
        load(vars, &mut self.params)?;
        let has: Vec<bool> = grads.iter().map(Option::is_some).collect();
        {
            // Read locks on the gradients' storage while the step reads them.
            let guards: Vec<_> = grads
                .iter()
                .map(|g| g.as_ref().map(|g| g.storage_and_layout()))
                .collect();
            let slices = guards
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    g.as_ref()
                        .map(|(s, l)| cpu_slice::<P>(s, l, Named("the gradient of var", i)))
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?;
            let mut t = describe(
                &mut self.params,
                &mut self.backups,
                &mut self.m,
                &mut self.v,
                &mut self.targets,
                &slices,
                decay,
            );
            f(&mut self.step, &mut t)?;
        }
        let write = write.unwrap_or_else(|| has.clone());
        for ((var, p), &w) in vars.iter().zip(&self.params).zip(&write) {
            if w {
                var.inplace_op1(&WriteBack(&p[..])).map_err(candle_err)?;
            }
        }
        Ok(write)
    }
}

/// Copies every var's elements into `params`, under candle's read lock.
fn load<P: CpuElem>(vars: &[Var], params: &mut [Vec<P>]) -> Result<()> {
    for (i, (var, p)) in vars.iter().zip(params).enumerate() {
        let (s, l) = var.storage_and_layout();
        p.copy_from_slice(cpu_slice::<P>(&s, l, Named("var", i))?);
    }
    Ok(())
}

/// The first step with logits of element type `L`.
fn kl_first<P: CpuElem, L: CpuElem>(
    step: &mut crate::cpu::step::TramStep<P, P, f32>,
    t: &mut [crate::cpu::step::Tensor<'_, P>],
    a: &Tensor,
    b: &Tensor,
) -> Result<()> {
    ensure!(
        a.dims() == b.dims(),
        "target logits are {:?} but model logits are {:?}",
        a.dims(),
        b.dims()
    );
    let (ta, tb) = (
        RowLayout::of(a.layout(), "target")?,
        RowLayout::of(b.layout(), "model")?,
    );
    let (ga, gb) = (a.storage_and_layout().0, b.storage_and_layout().0);
    let (sa, sb) = (
        storage_of::<L>(&ga, "target logits")?,
        storage_of::<L>(&gb, "model logits")?,
    );
    step.first_step(t, &ta.logits(sa, "target")?, &tb.logits(sb, "model")?, None)
}

/// The whole CPU storage of element type `T`.
fn storage_of<'g, T: CpuElem>(s: &'g candle_core::Storage, what: &str) -> Result<&'g [T]> {
    match s {
        candle_core::Storage::Cpu(c) => T::cpu_storage_as_slice(c).map_err(|_| {
            Error::InvalidArgument(format!(
                "{what} are {:?}; the logits' dtype must be f32, f16 or bf16, the same for both",
                c.dtype()
            ))
        }),
        _ => Err(Error::InvalidArgument(format!("{what} are not on the CPU"))),
    }
}

impl<P: CpuElem> Engine for CpuEngine<P> {
    fn first(
        &mut self,
        vars: &[Var],
        decay: &[bool],
        grads: &Grads,
        logits: Option<(&Tensor, &Tensor)>,
        rho: Option<f32>,
    ) -> Result<()> {
        let has: Vec<bool> = grads.iter().map(Option::is_some).collect();
        self.step.set_has_grad(&has)?;
        let written = self.call(vars, decay, grads, None, |step, t| match (logits, rho) {
            (_, Some(rho)) => step.first_step_fixed(t, rho),
            (Some((a, b)), None) => {
                ensure!(
                    a.dtype() == b.dtype(),
                    "target logits are {:?} but model logits are {:?}",
                    a.dtype(),
                    b.dtype()
                );
                match a.dtype() {
                    CandleDType::F32 => kl_first::<P, f32>(step, t, a, b),
                    CandleDType::F16 => kl_first::<P, f16>(step, t, a, b),
                    CandleDType::BF16 => kl_first::<P, bf16>(step, t, a, b),
                    d => Err(Error::InvalidArgument(format!(
                        "logits of dtype {d:?}; the KL takes f32, f16 or bf16"
                    ))),
                }
            }
            (None, None) => Err(Error::InvalidArgument("no logits".into())),
        })?;
        self.perturbed = written;
        Ok(())
    }

    fn second(&mut self, vars: &[Var], decay: &[bool], grads: &Grads) -> Result<()> {
        let write = Some(self.perturbed.clone());
        self.call(vars, decay, grads, write, |step, t| step.second_step(t))?;
        Ok(())
    }

    fn base(&mut self, vars: &[Var], decay: &[bool], grads: &Grads) -> Result<()> {
        let has: Vec<bool> = grads.iter().map(Option::is_some).collect();
        self.step.set_has_grad(&has)?;
        self.call(vars, decay, grads, None, |step, t| step.base_step(t))?;
        Ok(())
    }

    fn noise(&mut self, x: &Tensor) -> Result<Tensor> {
        fn run<L: CpuElem>(
            step: &mut crate::cpu::step::TramStep<impl CpuElem, impl CpuElem, f32>,
            x: &Tensor,
        ) -> Result<Tensor> {
            let (s, l) = x.storage_and_layout();
            let input = cpu_slice::<L>(&s, l, "the noise input")?;
            let mut out = vec![L::from_f32(0.0); input.len()];
            step.noise(input, &mut out)?;
            Tensor::from_vec(out, x.shape(), &Device::Cpu).map_err(candle_err)
        }
        match x.dtype() {
            CandleDType::F32 => run::<f32>(&mut self.step, x),
            CandleDType::F16 => run::<f16>(&mut self.step, x),
            CandleDType::BF16 => run::<bf16>(&mut self.step, x),
            d => Err(Error::InvalidArgument(format!(
                "noise input of dtype {d:?}; it takes f32, f16 or bf16"
            ))),
        }
    }

    fn targets(&self, vars: &[Var]) -> Result<Vec<Tensor>> {
        to_tensors(&self.targets, vars)
    }

    fn checkpoint(&self, vars: &[Var]) -> Result<Checkpoint> {
        Ok(Checkpoint {
            state: Tram::state(&self.step)?,
            m: to_tensors(&self.m, vars)?,
            v: to_tensors(&self.v, vars)?,
            targets: to_tensors(&self.targets, vars)?,
        })
    }

    fn resume(&mut self, c: &Checkpoint) -> Result<()> {
        // Everything checked before anything is written.
        let mut staged = Vec::new();
        for (name, mine, theirs) in [
            ("m", &self.m, &c.m),
            ("v", &self.v, &c.v),
            ("targets", &self.targets, &c.targets),
        ] {
            ensure!(
                mine.len() == theirs.len(),
                "the checkpoint has {} {name} tensors, this optimizer {}",
                theirs.len(),
                mine.len()
            );
            let mut bufs = Vec::with_capacity(mine.len());
            for (i, (a, t)) in mine.iter().zip(theirs).enumerate() {
                ensure!(
                    t.dtype() == CandleDType::F32 && t.elem_count() == a.len(),
                    "checkpoint {name} {i}: {:?} of {} elements, expected f32 of {}",
                    t.dtype(),
                    t.elem_count(),
                    a.len()
                );
                bufs.push(
                    t.flatten_all()
                        .and_then(|t| t.to_device(&Device::Cpu))
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(candle_err)?,
                );
            }
            staged.push(bufs);
        }
        Tram::set_state(&mut self.step, &c.state)?;
        let mut it = staged.into_iter();
        self.m = it.next().unwrap_or_default();
        self.v = it.next().unwrap_or_default();
        self.targets = it.next().unwrap_or_default();
        Ok(())
    }

    fn tram(&mut self) -> &mut dyn TramValues {
        &mut self.step
    }

    fn tram_ref(&self) -> &dyn TramValues {
        &self.step
    }
}

/// f32 buffers as CPU tensors of the vars' shapes.
fn to_tensors(bufs: &[Vec<f32>], vars: &[Var]) -> Result<Vec<Tensor>> {
    bufs.iter()
        .zip(vars)
        .map(|(b, v)| Tensor::from_slice(b, v.shape(), &Device::Cpu).map_err(candle_err))
        .collect()
}

/// The CUDA half (`candle-cuda`): the crate's CUDA step on candle's stream,
/// over the vars' and gradients' device memory.
#[cfg(feature = "candle-cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, Storage};
    use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};

    use super::*;
    use crate::cuda::buffer::{DevMut, DevRef};
    use crate::cuda::kl_div::DeviceLogits;
    use crate::cuda::step::{Perturbation, Tensor as DevTensor, TramStep};
    use crate::cuda::CudaBackend;

    /// An element type of the step API, candle's CUDA storage and cudarc.
    pub(super) trait Elem: Element + CudaDType + DeviceRepr + ValidAsZeroBits {}
    impl Elem for f32 {}
    impl Elem for f16 {}
    impl Elem for bf16 {}

    pub(super) fn engine(
        dev: &CudaDevice,
        vars: &[Var],
        cfg: TramConfig,
        dtype: CandleDType,
    ) -> Result<Box<dyn Engine>> {
        Ok(match dtype {
            CandleDType::F32 => Box::new(CudaEngine::<f32>::new(dev, vars, cfg)?),
            CandleDType::F16 => Box::new(CudaEngine::<f16>::new(dev, vars, cfg)?),
            CandleDType::BF16 => Box::new(CudaEngine::<bf16>::new(dev, vars, cfg)?),
            d => {
                return Err(Error::InvalidArgument(format!(
                    "vars of dtype {d:?}: the TRAM optimizer takes f32, f16 or bf16"
                )))
            }
        })
    }

    /// The device address and length of a contiguous CUDA tensor's elements
    /// of type `T`. The address stays valid while the tensor's storage lives.
    fn address<T: Elem>(
        t: &Tensor,
        stream: &cudarc::driver::CudaStream,
        what: impl std::fmt::Display,
    ) -> Result<(u64, usize)> {
        let (s, l) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*s else {
            return Err(Error::InvalidArgument(format!(
                "{what} is not on a CUDA device"
            )));
        };
        ensure!(l.is_contiguous(), "{what} is not contiguous");
        let slice = cs.as_cuda_slice::<T>().map_err(|_| {
            Error::InvalidArgument(format!(
                "{what} is {:?}, not {}",
                t.dtype(),
                T::DTYPE.name()
            ))
        })?;
        let (a, n) = (l.start_offset(), l.shape().elem_count());
        ensure!(a + n <= slice.len(), "{what} lies past its storage");
        let (base, _sync) = slice.device_ptr(stream);
        Ok((base + (a * std::mem::size_of::<T>()) as u64, n))
    }

    struct CudaEngine<P: Elem> {
        dev: CudaDevice,
        backend: Arc<CudaBackend>,
        step: TramStep<P, P, f32>,
        /// Logit rows the step's KL workspace holds.
        rows: usize,
        backups: Vec<CudaSlice<P>>,
        m: Vec<CudaSlice<f32>>,
        v: Vec<CudaSlice<f32>>,
        /// TRAM-θ's targets: f32 candle tensors of storage of their own.
        targets: Vec<Tensor>,
    }

    /// A description over raw addresses (vars, gradients, targets) and the
    /// engine's own buffers.
    ///
    /// # Safety
    /// Every address is that of live device memory of the backend's context
    /// holding the given number of elements, which stays allocated until the
    /// launches that use it have run (candle frees in stream order, or after
    /// synchronising the stream the launches go on), and which nothing else
    /// writes while they run (the module's contract).
    unsafe fn describe<'a, P: Elem>(
        params: &[(u64, usize)],
        grads: &[Option<(u64, usize)>],
        backups: &'a mut [CudaSlice<P>],
        m: &'a mut [CudaSlice<f32>],
        v: &'a mut [CudaSlice<f32>],
        targets: &[(u64, usize)],
        decay: &[bool],
    ) -> Vec<DevTensor<'a, P>> {
        let mut m = m.iter_mut();
        let mut v = v.iter_mut();
        let mut x = targets.iter();
        params
            .iter()
            .zip(backups.iter_mut())
            .zip(grads.iter().zip(decay))
            .map(|((&(p, n), b), (g, &d))| DevTensor {
                // SAFETY: the caller's contract.
                param: unsafe { DevMut::from_raw(p, n) },
                // SAFETY: as above; read only.
                grad: g.map(|(g, n)| unsafe { DevRef::from_raw(g, n) }),
                perturbation: Perturbation::Backup(DevMut::new(b)),
                m: m.next().map(DevMut::new),
                v: v.next().map(DevMut::new),
                // SAFETY: as above.
                target: x.next().map(|&(t, n)| unsafe { DevMut::from_raw(t, n) }),
                weight_decay: d,
            })
            .collect()
    }

    impl<P: Elem> CudaEngine<P> {
        fn new(dev: &CudaDevice, vars: &[Var], cfg: TramConfig) -> Result<Self> {
            let backend = crate::candle::kl_div::cuda::backend(dev)?;
            let zeros = |on: bool| -> Result<Vec<CudaSlice<f32>>> {
                if !on {
                    return Ok(Vec::new());
                }
                vars.iter()
                    .map(|v| dev.alloc_zeros::<f32>(v.elem_count()).map_err(candle_err))
                    .collect()
            };
            let backups = vars
                .iter()
                .map(|v| dev.alloc_zeros::<P>(v.elem_count()).map_err(candle_err))
                .collect::<Result<Vec<_>>>()?;
            let targets = match cfg.variant {
                TramVariant::Theta { .. } => vars
                    .iter()
                    .map(|v| {
                        v.to_dtype(CandleDType::F32)
                            .and_then(|t| t.copy())
                            .map(|t| t.detach())
                            .map_err(candle_err)
                    })
                    .collect::<Result<Vec<_>>>()?,
                TramVariant::X { .. } => Vec::new(),
            };
            // The step is built over scratch state buffers; the real ones
            // are described at every call.
            Ok(Self {
                dev: dev.clone(),
                step: Self::build(&backend, cfg, vars, &targets, 1, None)?,
                backend,
                rows: 1,
                backups,
                m: zeros(cfg.optimizer.uses_m())?,
                v: zeros(cfg.optimizer.uses_v())?,
                targets,
            })
        }

        /// A step for `rows` logit rows, carrying `from`'s state.
        fn build(
            backend: &CudaBackend,
            cfg: TramConfig,
            vars: &[Var],
            targets: &[Tensor],
            rows: usize,
            from: Option<(&TramStep<P, P, f32>, TramState)>,
        ) -> Result<TramStep<P, P, f32>> {
            let s = backend.stream();
            let params = vars
                .iter()
                .enumerate()
                .map(|(i, v)| address::<P>(v.as_tensor(), s, Named("var", i)))
                .collect::<Result<Vec<_>>>()?;
            let tg = targets
                .iter()
                .map(|t| address::<f32>(t, s, "a target"))
                .collect::<Result<Vec<_>>>()?;
            let n = |on: bool| if on { vars.len() } else { 0 };
            // Building launches nothing: scratch state buffers of the right
            // lengths serve the description.
            let alloc = |k: usize| -> Result<Vec<CudaSlice<f32>>> {
                vars.iter()
                    .take(k)
                    .map(|v| s.alloc_zeros::<f32>(v.elem_count()).map_err(Error::from))
                    .collect()
            };
            let mut b = vars
                .iter()
                .map(|v| s.alloc_zeros::<P>(v.elem_count()).map_err(Error::from))
                .collect::<Result<Vec<_>>>()?;
            let (mut m, mut v) = (
                alloc(n(cfg.optimizer.uses_m()))?,
                alloc(n(cfg.optimizer.uses_v()))?,
            );
            let none = vec![None; vars.len()];
            let decay = vec![true; vars.len()];
            // SAFETY: nothing is launched while building; the addresses are
            // those of live storage (vars, targets) and of the buffers above.
            let t = unsafe { describe(&params, &none, &mut b, &mut m, &mut v, &tg, &decay) };
            let cfg = match from {
                Some((_, st)) => TramConfig {
                    lr: st.lr,
                    delta: st.delta,
                    ..cfg
                },
                None => cfg,
            };
            let mut step = TramStep::new(backend, cfg, &t, rows)?;
            if let Some((old, st)) = from {
                step.set_state(&st)?;
                step.set_has_grad(old.has_grad())?;
            }
            Ok(step)
        }

        /// Runs `f` with this call's description.
        fn call(
            &mut self,
            vars: &[Var],
            decay: &[bool],
            grads: &Grads,
            f: impl FnOnce(&mut TramStep<P, P, f32>, &mut [DevTensor<'_, P>]) -> Result<()>,
        ) -> Result<()> {
            let s = self.backend.stream();
            let params = vars
                .iter()
                .enumerate()
                .map(|(i, v)| address::<P>(v.as_tensor(), s, Named("var", i)))
                .collect::<Result<Vec<_>>>()?;
            let gs = grads
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    g.as_ref()
                        .map(|g| address::<P>(g, s, Named("the gradient of var", i)))
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?;
            let tg = self
                .targets
                .iter()
                .map(|t| address::<f32>(t, s, "a target"))
                .collect::<Result<Vec<_>>>()?;
            // SAFETY: the vars, the gradients (held by `grads`) and the
            // targets are live candle storage on this backend's stream, kept
            // for the call; their launches are queued on that stream, before
            // anything candle does with them later.
            let mut t = unsafe {
                describe(
                    &params,
                    &gs,
                    &mut self.backups,
                    &mut self.m,
                    &mut self.v,
                    &tg,
                    decay,
                )
            };
            f(&mut self.step, &mut t)
        }

        fn first_kl<L: Elem>(
            &mut self,
            vars: &[Var],
            decay: &[bool],
            grads: &Grads,
            a: &Tensor,
            b: &Tensor,
        ) -> Result<()> {
            ensure!(
                a.dims() == b.dims(),
                "target logits are {:?} but model logits are {:?}",
                a.dims(),
                b.dims()
            );
            let (ta, tb) = (
                RowLayout::of(a.layout(), "target")?,
                RowLayout::of(b.layout(), "model")?,
            );
            if ta.rows > self.rows {
                let st = Tram::state(&self.step)?;
                let cfg = *Tram::config(&self.step);
                self.step = Self::build(
                    &self.backend,
                    cfg,
                    vars,
                    &self.targets,
                    ta.rows,
                    Some((&self.step, st)),
                )?;
                self.rows = ta.rows;
            }
            let (ga, gb) = (a.storage_and_layout().0, b.storage_and_layout().0);
            let sa = cuda_slice::<L>(&ga, "target logits")?;
            let sb = cuda_slice::<L>(&gb, "model logits")?;
            let (la, lb) = (view(sa, &ta, "target")?, view(sb, &tb, "model")?);
            self.call(vars, decay, grads, |step, t| {
                step.first_step(t, &la, &lb, None)
            })
        }
    }

    /// The crate's device view of the rows `l` of the logits in `s`.
    fn view<'a, L: Elem>(
        s: &'a CudaSlice<L>,
        l: &RowLayout,
        what: &str,
    ) -> Result<DeviceLogits<'a, L>> {
        let v = s.try_slice(l.offset..).ok_or_else(|| {
            Error::InvalidArgument(format!("{what} logits lie past their storage"))
        })?;
        DeviceLogits::new(v, l.rows, l.vocab, l.row_stride)
    }

    fn cuda_slice<'g, T: Elem>(s: &'g Storage, what: &str) -> Result<&'g CudaSlice<T>> {
        let Storage::Cuda(cs) = s else {
            return Err(Error::InvalidArgument(format!(
                "{what} are not on a CUDA device"
            )));
        };
        cs.as_cuda_slice::<T>().map_err(|_| {
            Error::InvalidArgument(format!(
                "{what} are {:?}; the logits' dtype must be f32, f16 or bf16, the same for both",
                cs.dtype()
            ))
        })
    }

    impl<P: Elem> Engine for CudaEngine<P> {
        fn first(
            &mut self,
            vars: &[Var],
            decay: &[bool],
            grads: &Grads,
            logits: Option<(&Tensor, &Tensor)>,
            rho: Option<f32>,
        ) -> Result<()> {
            let has: Vec<bool> = grads.iter().map(Option::is_some).collect();
            self.step.set_has_grad(&has)?;
            match (logits, rho) {
                (_, Some(rho)) => {
                    self.call(vars, decay, grads, |step, t| step.first_step_fixed(t, rho))?
                }
                (Some((a, b)), None) => {
                    ensure!(
                        a.dtype() == b.dtype(),
                        "target logits are {:?} but model logits are {:?}",
                        a.dtype(),
                        b.dtype()
                    );
                    match a.dtype() {
                        CandleDType::F32 => self.first_kl::<f32>(vars, decay, grads, a, b)?,
                        CandleDType::F16 => self.first_kl::<f16>(vars, decay, grads, a, b)?,
                        CandleDType::BF16 => self.first_kl::<bf16>(vars, decay, grads, a, b)?,
                        d => {
                            return Err(Error::InvalidArgument(format!(
                                "logits of dtype {d:?}; the KL takes f32, f16 or bf16"
                            )))
                        }
                    }
                }
                (None, None) => return Err(Error::InvalidArgument("no logits".into())),
            }
            Ok(())
        }

        fn second(&mut self, vars: &[Var], decay: &[bool], grads: &Grads) -> Result<()> {
            self.call(vars, decay, grads, |step, t| step.second_step(t))
        }

        fn base(&mut self, vars: &[Var], decay: &[bool], grads: &Grads) -> Result<()> {
            let has: Vec<bool> = grads.iter().map(Option::is_some).collect();
            self.step.set_has_grad(&has)?;
            self.call(vars, decay, grads, |step, t| step.base_step(t))
        }

        fn noise(&mut self, x: &Tensor) -> Result<Tensor> {
            fn run<L: Elem>(
                step: &mut TramStep<impl Elem, impl Elem, f32>,
                dev: &CudaDevice,
                x: &Tensor,
            ) -> Result<Tensor> {
                let s = step.backend().stream().clone();
                let (p, n) = address::<L>(x, &s, "the noise input")?;
                let mut out = dev.alloc_zeros::<L>(n).map_err(candle_err)?;
                // SAFETY: x's storage is live device memory of n elements on
                // this stream, read by a launch queued before anything else.
                let input = unsafe { DevRef::from_raw(p, n) };
                step.noise(&input, &mut DevMut::new(&mut out))?;
                let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
                Ok(Tensor::from_storage(
                    storage,
                    x.shape().clone(),
                    BackpropOp::none(),
                    false,
                ))
            }
            match x.dtype() {
                CandleDType::F32 => run::<f32>(&mut self.step, &self.dev, x),
                CandleDType::F16 => run::<f16>(&mut self.step, &self.dev, x),
                CandleDType::BF16 => run::<bf16>(&mut self.step, &self.dev, x),
                d => Err(Error::InvalidArgument(format!(
                    "noise input of dtype {d:?}; it takes f32, f16 or bf16"
                ))),
            }
        }

        fn targets(&self, _vars: &[Var]) -> Result<Vec<Tensor>> {
            Ok(self.targets.clone())
        }

        fn checkpoint(&self, vars: &[Var]) -> Result<Checkpoint> {
            let s = self.backend.stream();
            let copy = |bufs: &[CudaSlice<f32>]| -> Result<Vec<Tensor>> {
                bufs.iter()
                    .zip(vars)
                    .map(|(b, v)| {
                        let mut out = self.dev.alloc_zeros::<f32>(b.len()).map_err(candle_err)?;
                        s.memcpy_dtod(b, &mut out)?;
                        let st = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.dev.clone()));
                        Ok(Tensor::from_storage(
                            st,
                            v.shape().clone(),
                            BackpropOp::none(),
                            false,
                        ))
                    })
                    .collect()
            };
            Ok(Checkpoint {
                state: Tram::state(&self.step)?,
                m: copy(&self.m)?,
                v: copy(&self.v)?,
                targets: self
                    .targets
                    .iter()
                    .map(|t| t.copy().map(|t| t.detach()).map_err(candle_err))
                    .collect::<Result<_>>()?,
            })
        }

        fn resume(&mut self, c: &Checkpoint) -> Result<()> {
            let lens = |b: &[CudaSlice<f32>]| b.iter().map(|b| b.len()).collect::<Vec<_>>();
            let tl: Vec<usize> = self.targets.iter().map(|t| t.elem_count()).collect();
            let mut staged = Vec::new();
            for (name, mine, theirs) in [
                ("m", lens(&self.m), &c.m),
                ("v", lens(&self.v), &c.v),
                ("targets", tl, &c.targets),
            ] {
                ensure!(
                    mine.len() == theirs.len(),
                    "the checkpoint has {} {name} tensors, this optimizer {}",
                    theirs.len(),
                    mine.len()
                );
                let mut host = Vec::with_capacity(mine.len());
                for (i, (&n, t)) in mine.iter().zip(theirs).enumerate() {
                    ensure!(
                        t.dtype() == CandleDType::F32 && t.elem_count() == n,
                        "checkpoint {name} {i}: {:?} of {} elements, expected f32 of {n}",
                        t.dtype(),
                        t.elem_count()
                    );
                    host.push(
                        t.flatten_all()
                            .and_then(|t| t.to_vec1::<f32>())
                            .map_err(candle_err)?,
                    );
                }
                staged.push(host);
            }
            Tram::set_state(&mut self.step, &c.state)?;
            let s = self.backend.stream();
            for (dst, src) in self.m.iter_mut().zip(&staged[0]) {
                s.memcpy_htod(src, dst)?;
            }
            for (dst, src) in self.v.iter_mut().zip(&staged[1]) {
                s.memcpy_htod(src, dst)?;
            }
            let dev = Device::Cuda(self.dev.clone());
            for (dst, src) in self.targets.iter_mut().zip(&staged[2]) {
                *dst = Tensor::from_slice(src, dst.shape(), &dev).map_err(candle_err)?;
            }
            Ok(())
        }

        fn tram(&mut self) -> &mut dyn TramValues {
            &mut self.step
        }

        fn tram_ref(&self) -> &dyn TramValues {
            &self.step
        }
    }
}
