//! A whole TRAM step on the CPU, the reference of `cuda::step`: the first step
//! (KL → d, ρ = δ·d, norm, perturbation) and the second step (restore and base
//! update, then the TRAM-θ target upkeep), configured once by a validated
//! [`TramConfig`].

use crate::config::{validate_delta, Radius, TramConfig, TramVariant};
use crate::cpu::ema::{ema_update, EmaTensor};
use crate::cpu::kl_div::{kl_div, KlOutput, Logits};
use crate::cpu::noise::add_noise;
use crate::cpu::optimizer::{EmaSource, FusedOptimizer, UpdateTensor};
use crate::cpu::perturb::{perturb, perturb_master, PerturbReport};
use crate::dtype::Element;
use crate::error::{ensure, Result};

/// The weights the first step perturbs.
#[derive(Debug)]
pub enum FirstStepWeights<'a, 'b, P> {
    /// θ ← θ + ε in place, θ saved to the backups first.
    InPlace {
        params: &'a mut [&'b mut [P]],
        backups: &'a mut [&'b mut [P]],
    },
    /// The working copy ← master + ε; the f32 master is the backup.
    Master {
        master: &'a [&'b [f32]],
        working: &'a mut [&'b mut [P]],
    },
}

/// What the first step computed.
#[derive(Clone, Debug, PartialEq)]
pub struct FirstStepReport {
    /// The divergence as the perturbation read it (rounded to f32, as the
    /// CUDA backend stores it).
    pub divergence: f32,
    pub kl: KlOutput,
    pub perturb: PerturbReport,
}

/// TRAM's two calls per training step, on the CPU.
#[derive(Clone, Debug)]
pub struct TramStep {
    cfg: TramConfig,
    optimizer: FusedOptimizer,
}

impl TramStep {
    /// Validates `cfg` ([`TramConfig::validate`]); `has_target` says whether
    /// target parameters exist (TRAM-θ requires them).
    pub fn new(cfg: TramConfig, has_target: bool) -> Result<Self> {
        cfg.validate(has_target)?;
        Ok(Self {
            cfg,
            optimizer: FusedOptimizer::new(cfg.optimizer, cfg.lr)?,
        })
    }

    pub fn config(&self) -> &TramConfig {
        &self.cfg
    }

    pub fn optimizer(&self) -> &FusedOptimizer {
        &self.optimizer
    }

    /// Sets the learning rate from the next update on.
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        self.optimizer.set_lr(lr)
    }

    /// Sets δ (ρ = δ·d) from the next first step on; finite and >= 0.
    pub fn set_delta(&mut self, delta: f32) -> Result<()> {
        validate_delta(delta)?;
        self.cfg.delta = delta;
        Ok(())
    }

    /// Updates applied so far (also the TRAM-x noise counter's step).
    pub fn step_count(&self) -> u64 {
        self.optimizer.step_count()
    }

    /// TRAM-x: out = e + z for this step (noise step = [`TramStep::step_count`]).
    pub fn noise<T: Element>(&self, input: &[T], out: &mut [T]) -> Result<()> {
        let TramVariant::X { noise } = self.cfg.variant else {
            return Err(crate::Error::InvalidArgument(
                "noise is TRAM-x's; this step is TRAM-θ".into(),
            ));
        };
        add_noise(input, out, &noise, self.step_count())
    }

    /// KL(target, model) → d, ρ = δ·d, the gradient norm and the perturbation.
    pub fn first_step<T: Element, P: Element, G: Element>(
        &mut self,
        target: &Logits<'_, T>,
        model: &Logits<'_, T>,
        mask: Option<&[u8]>,
        weights: FirstStepWeights<'_, '_, P>,
        grads: &[Option<&[G]>],
    ) -> Result<FirstStepReport> {
        let kl = kl_div(target, model, mask, &self.cfg.kl)?;
        let d = kl.value as f32;
        let radius = Radius::TrustRegion {
            delta: self.cfg.delta,
        };
        let g = self.cfg.geometry;
        let report = match weights {
            FirstStepWeights::InPlace { params, backups } => {
                perturb(params, grads, backups, g, radius, d, 1.0)?
            }
            FirstStepWeights::Master { master, working } => {
                perturb_master(master, grads, working, g, radius, d, 1.0)?
            }
        };
        Ok(FirstStepReport {
            divergence: d,
            kl,
            perturb: report,
        })
    }

    /// Restore + base update of every tensor (advances the step count).
    pub fn second_step<P: Element, G: Element>(
        &mut self,
        tensors: &mut [UpdateTensor<'_, P, G>],
    ) -> Result<()> {
        self.optimizer.step(tensors)
    }

    /// TRAM-θ's whole second step in one pass: restore + base update, and
    /// θ̄ ← λ·θ̄ + (1−λ)·θ from the new weights (`source`: the parameters or,
    /// with master weights, the masters), `targets[i]` for tensor i. The same
    /// bits as [`TramStep::second_step`] then [`TramStep::update_target`],
    /// and as the CUDA step's fused kernel.
    pub fn second_step_with_target<P: Element, G: Element, T: Element>(
        &mut self,
        tensors: &mut [UpdateTensor<'_, P, G>],
        targets: &mut [&mut [T]],
        source: EmaSource,
    ) -> Result<()> {
        let TramVariant::Theta { lambda } = self.cfg.variant else {
            return Err(crate::Error::InvalidArgument(
                "the target upkeep is TRAM-θ's; this step is TRAM-x".into(),
            ));
        };
        self.optimizer
            .step_with_target(tensors, targets, lambda, source)
    }

    /// TRAM-θ: θ̄ ← λ·θ̄ + (1−λ)·θ from the updated weights (after
    /// [`TramStep::second_step`]; [`TramStep::second_step_with_target`]
    /// does both in one pass).
    pub fn update_target<T: Element, P: Element>(
        &mut self,
        tensors: &mut [EmaTensor<'_, T, P>],
    ) -> Result<()> {
        let TramVariant::Theta { lambda } = self.cfg.variant else {
            return Err(crate::Error::InvalidArgument(
                "the target upkeep is TRAM-θ's; this step is TRAM-x".into(),
            ));
        };
        ensure!(!tensors.is_empty(), "the target group is empty");
        ema_update(tensors, lambda)
    }
}
