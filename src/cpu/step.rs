//! A whole TRAM step on the CPU, the reference of `cuda::step`: the same
//! [`Tram`] interface, the same semantics and the same dtypes (see
//! [`crate::step`] for the description of the tensors, the order of the
//! calls, AMP and resume).
//!
//! The first step is the KL (`cpu::kl_div`), ρ = δ·d and the perturbation
//! (`cpu::perturb`, which takes the norm) over the tensors with a gradient;
//! the second is AMP's check (`cpu::optimizer::grads_overflow`), then the
//! restore and the base update with the TRAM-θ target in the same pass
//! (`cpu::optimizer`). Where the CUDA step's results are the same bits (the
//! update, the target, the restore, the backups, the step count) the two are
//! compared bit for bit; the KL, the norm and θ + ε meet the bounds of those
//! operations.

use std::marker::PhantomData;

/// The step's element types, held without owning any.
type Types<P, G, T> = PhantomData<fn() -> (P, G, T)>;

use crate::config::{validate_delta, Radius, TramConfig, TramVariant};
use crate::cpu::kl_div::{kl_div, Logits};
use crate::cpu::noise::add_noise;
use crate::cpu::optimizer::{grads_overflow, FusedOptimizer, UpdateTensor, Weights};
use crate::cpu::perturb::{
    perturb, perturb_master, perturb_out_of_place, plan, radius_value, PerturbReport,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::step::{
    active, check_fixed_radius, check_has_grad, check_same, check_second_grads, check_shapes,
    check_types, noise_config, validate_state, PerturbMode, Phase, Shape, StepReport, StepStatus,
    Tram, TramState,
};

/// Where the first step puts θ + ε, with the buffer that kind needs.
#[derive(Debug)]
pub enum Perturbation<'a, P> {
    /// θ ← θ + ε in place; θ is saved here first (and restored from here).
    Backup(&'a mut [P]),
    /// f32 master weights: the working copy `param` ← master + ε; the master
    /// is the backup and holds the updated weights.
    Master(&'a mut [f32]),
    /// θ + ε written here; θ is only read (then updated in place).
    Out(&'a mut [P]),
}

impl<P> Perturbation<'_, P> {
    fn mode(&self) -> PerturbMode {
        match self {
            Perturbation::Backup(_) => PerturbMode::InPlace,
            Perturbation::Master(_) => PerturbMode::Master,
            Perturbation::Out(_) => PerturbMode::OutOfPlace,
        }
    }

    fn len(&self) -> usize {
        match self {
            Perturbation::Backup(b) | Perturbation::Out(b) => b.len(),
            Perturbation::Master(m) => m.len(),
        }
    }
}

/// One tensor of the model with every role it plays (see [`crate::step`]).
#[derive(Debug)]
pub struct Tensor<'a, P, G = P, T = f32> {
    /// θ (or the working copy beside f32 masters).
    pub param: &'a mut [P],
    /// The gradient of this call's step; `None`: none (the tensor sits the
    /// step out).
    pub grad: Option<&'a [G]>,
    /// The buffer of the perturbation's kind.
    pub perturbation: Perturbation<'a, P>,
    /// AdamW's first moment or SGD's momentum (f32), when the optimizer keeps it.
    pub m: Option<&'a mut [f32]>,
    /// AdamW's second moment (f32).
    pub v: Option<&'a mut [f32]>,
    /// TRAM-θ's target θ̄.
    pub target: Option<&'a mut [T]>,
    /// Whether weight decay applies.
    pub weight_decay: bool,
}

fn shapes<P, G, T>(tensors: &[Tensor<'_, P, G, T>]) -> Vec<Shape> {
    tensors
        .iter()
        .map(|t| Shape {
            len: t.param.len() as u64,
            grad: t.grad.is_some(),
            mode: t.perturbation.mode(),
            perturbation_len: t.perturbation.len() as u64,
            grad_len: t.grad.map_or(0, |g| g.len() as u64),
            m: t.m.as_ref().map(|b| b.len() as u64),
            v: t.v.as_ref().map(|b| b.len() as u64),
            target: t.target.as_ref().map(|b| b.len() as u64),
        })
        .collect()
}

/// TRAM's calls per training step, on the CPU, for parameters `P`,
/// gradients `G` and TRAM-θ targets `T` (see [`crate::step::STEP_DTYPES`]).
#[derive(Clone, Debug)]
pub struct TramStep<P, G = P, T = f32> {
    cfg: TramConfig,
    optimizer: FusedOptimizer,
    noise_step: u64,
    phase: Phase,
    /// The description the step was built for.
    built: Vec<Shape>,
    has_grad: Vec<bool>,
    /// The tensors the last first step perturbed.
    perturbed: Vec<bool>,
    /// The last first step's norm was not finite.
    first_found_inf: bool,
    report: StepReport,
    _types: Types<P, G, T>,
}

impl<P: Element, G: Element, T: Element> TramStep<P, G, T> {
    /// Validates `cfg`, the dtypes and the description (see [`crate::step`]);
    /// every tensor starts with a gradient, the step count at 0.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming what
    /// to change: a configuration value out of range
    /// ([`TramConfig::validate`](crate::TramConfig::validate)), an unsupported
    /// dtype ([`check_dtypes`](crate::step::check_dtypes)), or a description
    /// with no tensors, mixed perturbation kinds, buffer lengths that differ
    /// from the parameter's, or optimizer state or targets missing where the
    /// configuration needs them (or given where it keeps none).
    pub fn new(cfg: TramConfig, tensors: &[Tensor<'_, P, G, T>]) -> Result<Self> {
        let theta = matches!(cfg.variant, TramVariant::Theta { .. });
        cfg.validate(theta)?;
        check_types::<P, G, T>()?;
        let built = shapes(tensors);
        check_shapes(&cfg, &built)?;
        let n = built.len();
        Ok(Self {
            cfg,
            optimizer: FusedOptimizer::new(cfg.optimizer, cfg.lr)?,
            noise_step: 0,
            phase: Phase::Idle,
            built,
            has_grad: vec![true; n],
            perturbed: vec![false; n],
            first_found_inf: false,
            report: StepReport::default(),
            _types: PhantomData,
        })
    }

    /// The base optimizer with its learning rate, scale and step count.
    pub fn optimizer(&self) -> &FusedOptimizer {
        &self.optimizer
    }

    /// Which tensors have a gradient (as set; a tensor also needs `grad`).
    pub fn has_grad(&self) -> &[bool] {
        &self.has_grad
    }

    /// Checks a call's description against the step's.
    fn check(&self, tensors: &[Tensor<'_, P, G, T>]) -> Result<Vec<Shape>> {
        let now = shapes(tensors);
        check_shapes(&self.cfg, &now)?;
        check_same(&self.built, &now)?;
        Ok(now)
    }

    /// The second or base step: AMP's check over the gradients of `active`,
    /// then restore + update + target, or restore only.
    fn update(
        &mut self,
        tensors: &mut [Tensor<'_, P, G, T>],
        active: &[bool],
        restore: bool,
        mut status: u32,
    ) -> Result<()> {
        check_second_grads(active, tensors.iter().map(|t| t.grad.is_some()))?;
        let grads: Vec<Option<&[G]>> = tensors
            .iter()
            .zip(active)
            .map(|(t, &a)| t.grad.filter(|_| a))
            .collect();
        if grads_overflow(&grads, self.optimizer.inv_scale()) {
            status |= StepStatus::FOUND_INF_SECOND;
        }
        let skip = status & (StepStatus::FOUND_INF_FIRST | StepStatus::FOUND_INF_SECOND) != 0;
        if skip {
            status |= StepStatus::SKIPPED;
        }
        let (lambda, theta) = match self.cfg.variant {
            TramVariant::Theta { lambda } => (lambda, true),
            TramVariant::X { .. } => (1.0, false),
        };
        let mut ups = Vec::with_capacity(tensors.len());
        let mut targets: Vec<&mut [T]> = Vec::with_capacity(tensors.len());
        let mut from_master = false;
        for (t, &a) in tensors.iter_mut().zip(active) {
            let weights = match &mut t.perturbation {
                Perturbation::Backup(b) if restore && a => Weights::Restore {
                    backup: b,
                    param: &mut *t.param,
                },
                Perturbation::Master(m) => {
                    from_master = true;
                    Weights::Master {
                        master: m,
                        param: &mut *t.param,
                    }
                }
                _ => Weights::InPlace {
                    param: &mut *t.param,
                },
            };
            ups.push(UpdateTensor {
                weights,
                grad: t.grad.filter(|_| a),
                m: t.m.as_deref_mut().unwrap_or_default(),
                v: t.v.as_deref_mut().unwrap_or_default(),
                weight_decay: t.weight_decay,
            });
            if let Some(x) = t.target.as_deref_mut() {
                targets.push(x);
            }
        }
        let targets = theta.then_some(&mut targets[..]);
        self.optimizer
            .step_unchecked(&mut ups, targets, lambda, from_master, skip);
        self.noise_step = self.noise_step.wrapping_add(1);
        self.report.status = StepStatus(status);
        self.phase = Phase::Idle;
        Ok(())
    }

    /// The norm and the perturbation with `radius` over the tensors with a
    /// gradient (`d`: the divergence the report shows).
    fn perturb_with(
        &mut self,
        tensors: &mut [Tensor<'_, P, G, T>],
        now: &[Shape],
        radius: Radius,
        d: f32,
    ) -> Result<()> {
        let active = active(&self.has_grad, now);
        let (g, s) = (self.cfg.geometry, self.optimizer.inv_scale());
        let mode = now[0].mode;
        // Tensors without a gradient are left out (θ, and their backup, as
        // they are), as the CUDA step's chunk list leaves them out; out of
        // place they still get θ copied to their output.
        let rep: PerturbReport = match mode {
            PerturbMode::InPlace => {
                let (mut params, mut backups, mut grads) = (Vec::new(), Vec::new(), Vec::new());
                for (t, &a) in tensors.iter_mut().zip(&active) {
                    if let (true, Perturbation::Backup(b)) = (a, &mut t.perturbation) {
                        params.push(&mut *t.param);
                        backups.push(&mut **b);
                        grads.push(t.grad);
                    }
                }
                if params.is_empty() {
                    plan(0.0, radius_value(radius, d))
                } else {
                    perturb(&mut params, &grads, &mut backups, g, radius, d, s)?
                }
            }
            PerturbMode::Master => {
                let (mut masters, mut working, mut grads) = (Vec::new(), Vec::new(), Vec::new());
                for (t, &a) in tensors.iter_mut().zip(&active) {
                    if let (true, Perturbation::Master(m)) = (a, &mut t.perturbation) {
                        masters.push(&**m);
                        working.push(&mut *t.param);
                        grads.push(t.grad);
                    }
                }
                if masters.is_empty() {
                    plan(0.0, radius_value(radius, d))
                } else {
                    perturb_master(&masters, &grads, &mut working, g, radius, d, s)?
                }
            }
            PerturbMode::OutOfPlace => {
                let (mut params, mut outs, mut grads) = (Vec::new(), Vec::new(), Vec::new());
                for (t, &a) in tensors.iter_mut().zip(&active) {
                    if let Perturbation::Out(o) = &mut t.perturbation {
                        params.push(&*t.param);
                        outs.push(&mut **o);
                        grads.push(t.grad.filter(|_| a));
                    }
                }
                perturb_out_of_place(&params, &grads, &mut outs, g, radius, d, s)?
            }
        };
        self.first_found_inf = rep.status.found_inf();
        self.perturbed = active;
        self.report = StepReport {
            status: StepStatus(0),
            perturb: rep.status,
            divergence: d,
            norm: rep.norm,
            rho: rep.rho,
        };
        self.phase = Phase::Perturbed;
        Ok(())
    }
}

impl<P: Element, G: Element, T: Element> Tram for TramStep<P, G, T> {
    type Tensors<'t> = [Tensor<'t, P, G, T>];
    type Logits<'l, L: Element> = Logits<'l, L>;
    type Mask<'m> = [u8];
    type Input<'i, L: Element> = [L];
    type Output<'o, L: Element> = [L];

    fn config(&self) -> &TramConfig {
        &self.cfg
    }

    fn first_step<L: Element>(
        &mut self,
        tensors: &mut [Tensor<'_, P, G, T>],
        target: &Logits<'_, L>,
        model: &Logits<'_, L>,
        mask: Option<&[u8]>,
    ) -> Result<()> {
        self.phase.begin_first()?;
        let now = self.check(tensors)?;
        let kl = kl_div(target, model, mask, &self.cfg.kl)?;
        let d = kl.value as f32;
        let radius = Radius::TrustRegion {
            delta: self.cfg.delta,
        };
        self.perturb_with(tensors, &now, radius, d)
    }

    fn first_step_fixed(&mut self, tensors: &mut [Tensor<'_, P, G, T>], rho: f32) -> Result<()> {
        self.phase.begin_first()?;
        check_fixed_radius(rho)?;
        let now = self.check(tensors)?;
        // No divergence: the report keeps the last one.
        let d = self.report.divergence;
        self.perturb_with(tensors, &now, Radius::Fixed(rho), d)
    }

    fn second_step(&mut self, tensors: &mut [Tensor<'_, P, G, T>]) -> Result<()> {
        self.phase.begin_second()?;
        self.check(tensors)?;
        let status = if self.first_found_inf {
            StepStatus::FOUND_INF_FIRST
        } else {
            0
        };
        let active = self.perturbed.clone();
        self.update(tensors, &active, true, status)
    }

    fn base_step(&mut self, tensors: &mut [Tensor<'_, P, G, T>]) -> Result<()> {
        self.phase.begin_base()?;
        let now = self.check(tensors)?;
        let active = active(&self.has_grad, &now);
        self.update(tensors, &active, false, StepStatus::UNPERTURBED)
    }

    fn noise<L: Element>(&mut self, input: &[L], out: &mut [L]) -> Result<()> {
        add_noise(input, out, &noise_config(&self.cfg)?, self.noise_step)
    }

    fn set_has_grad(&mut self, has_grad: &[bool]) -> Result<()> {
        check_has_grad(has_grad, self.built.len())?;
        self.phase.between_iterations("set_has_grad")?;
        self.has_grad.copy_from_slice(has_grad);
        Ok(())
    }

    fn lr(&self) -> f32 {
        self.optimizer.lr()
    }

    fn set_lr(&mut self, lr: f32) -> Result<()> {
        self.optimizer.set_lr(lr)?;
        self.cfg.lr = lr;
        Ok(())
    }

    fn delta(&self) -> f32 {
        self.cfg.delta
    }

    fn set_delta(&mut self, delta: f32) -> Result<()> {
        validate_delta(delta)?;
        self.cfg.delta = delta;
        Ok(())
    }

    fn inv_scale(&self) -> f32 {
        self.optimizer.inv_scale()
    }

    fn set_inv_scale(&mut self, inv_scale: f32) -> Result<()> {
        self.optimizer.set_inv_scale(inv_scale)
    }

    fn step_count(&self) -> Result<u64> {
        Ok(self.optimizer.step_count())
    }

    fn set_step_count(&mut self, t: u64) -> Result<()> {
        self.optimizer.set_step_count(t);
        Ok(())
    }

    fn noise_step(&self) -> Result<u64> {
        Ok(self.noise_step)
    }

    fn set_noise_step(&mut self, step: u64) -> Result<()> {
        self.noise_step = step;
        Ok(())
    }

    fn state(&self) -> Result<TramState> {
        Ok(TramState {
            counter: self.optimizer.counter(),
            noise_step: self.noise_step,
            lr: self.optimizer.lr(),
            delta: self.cfg.delta,
            inv_scale: self.optimizer.inv_scale(),
        })
    }

    fn set_state(&mut self, state: &TramState) -> Result<()> {
        self.phase.between_iterations("set_state")?;
        validate_state(state)?;
        let mut opt = self.optimizer.clone();
        opt.set_counter(state.counter)?;
        opt.set_lr(state.lr)?;
        opt.set_inv_scale(state.inv_scale)?;
        self.optimizer = opt;
        self.cfg.lr = state.lr;
        self.cfg.delta = state.delta;
        self.noise_step = state.noise_step;
        Ok(())
    }

    fn report(&self) -> Result<StepReport> {
        Ok(self.report)
    }
}
