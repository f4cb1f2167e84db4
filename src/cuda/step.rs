//! A whole TRAM step on the CUDA backend, the twin of `cpu::step`: the first
//! step (KL → d on the device, norm, perturbation reading d from device
//! memory: 3 launches) and the second step (restore + base update, with the
//! TRAM-θ EMA fused in when the target group follows the update's weights,
//! else after it, or the TRAM-x noise counter: 2 or 3 launches). No allocation and no
//! host sync in either, so both can be captured in one CUDA graph; the
//! learning rate, δ, the step count and the noise step live in device memory
//! and replays see their current values ([`TramStep::set_lr`],
//! [`TramStep::set_delta`]).
//!
//! η, λ and σ are fixed configuration (kernel arguments, frozen into a
//! captured graph); to change them, build a new step object (and re-capture).

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DeviceRepr};

use super::ema::{ema_update, EmaGroup};
use super::grad_norm::{grad_norm, NormOptions};
use super::group::ParamGroup;
use super::kl_div::{kl_div, DeviceLogits, KlWorkspace};
use super::noise::{add_noise, NoiseStep};
use super::optimizer::{FusedOptimizer, FusedTarget, UpdateGroup};
use super::perturb::{perturb_raw_device, DeviceRadius, PerturbMode, PerturbOptions};
use super::CudaBackend;
use crate::config::{validate_delta, Radius, TramConfig, TramVariant};
use crate::dtype::Element;
use crate::error::{ensure, Error, Result};

/// TRAM's two calls per training step, on the device.
///
/// The groups describe the same tensors: `params` (norm and perturbation:
/// parameters, gradients, and backups or f32 masters), `update` (the same
/// parameters, gradients and backups/masters plus the optimizer state) and,
/// for TRAM-θ, `target` (θ̄ and the updated weights θ or master).
pub struct TramStep<'a> {
    cfg: TramConfig,
    params: ParamGroup<'a>,
    update: UpdateGroup<'a>,
    target: Option<EmaGroup<'a>>,
    /// The target upkeep fused into the update, when `target` allows it.
    fused: Option<FusedTarget<'a>>,
    optimizer: FusedOptimizer,
    kl: KlWorkspace,
    noise_step: NoiseStep,
    /// δ in device memory.
    delta: DeviceRadius,
    mode: PerturbMode,
}

impl<'a> TramStep<'a> {
    /// Validates `cfg` (TRAM-θ needs `target`) and that the groups agree on
    /// the mode (backups or master weights); allocates the KL workspace for up
    /// to `max_rows` logit rows and the device step counters.
    pub fn new(
        backend: &CudaBackend,
        cfg: TramConfig,
        params: ParamGroup<'a>,
        update: UpdateGroup<'a>,
        target: Option<EmaGroup<'a>>,
        max_rows: usize,
    ) -> Result<Self> {
        cfg.validate(target.is_some())?;
        let roles = params.roles();
        let mode = if roles.master {
            PerturbMode::Master
        } else {
            ensure!(
                roles.backup,
                "the parameter group needs backups (or master weights) for TRAM"
            );
            PerturbMode::InPlace
        };
        ensure!(
            update.is_master() == roles.master,
            "the update group and the parameter group disagree on master weights"
        );
        // Fused when the target group follows the update's own weights
        // (FusedTarget::new's conditions), else a separate EMA launch.
        let fused = match (&cfg.variant, &target) {
            (TramVariant::Theta { .. }, Some(t)) => FusedTarget::new(backend, &update, t).ok(),
            _ => None,
        };
        Ok(Self {
            cfg,
            params,
            update,
            target,
            fused,
            optimizer: FusedOptimizer::new(backend, cfg.optimizer, cfg.lr)?,
            kl: KlWorkspace::new(backend, max_rows)?,
            noise_step: NoiseStep::new(backend, 0)?,
            delta: DeviceRadius::new(backend, Radius::TrustRegion { delta: cfg.delta })?,
            mode,
        })
    }

    pub fn config(&self) -> &TramConfig {
        &self.cfg
    }

    pub fn param_group(&self) -> &ParamGroup<'a> {
        &self.params
    }

    pub fn optimizer(&self) -> &FusedOptimizer {
        &self.optimizer
    }

    /// Whether the TRAM-θ target upkeep runs inside the update kernel (one
    /// pass) rather than as a separate EMA launch after it.
    pub fn target_fused(&self) -> bool {
        self.fused.is_some()
    }

    pub fn kl_workspace(&self) -> &KlWorkspace {
        &self.kl
    }

    /// Sets the learning rate of the updates enqueued (or replayed) after this
    /// call: an async copy, not to be called while capturing.
    pub fn set_lr(&mut self, backend: &CudaBackend, lr: f32) -> Result<()> {
        self.optimizer.set_lr(backend, lr)
    }

    /// Sets δ (ρ = δ·d) of the perturbations enqueued (or replayed) after
    /// this call: an async copy, not to be called while capturing. δ must be
    /// finite and >= 0, as at construction.
    pub fn set_delta(&mut self, backend: &CudaBackend, delta: f32) -> Result<()> {
        validate_delta(delta)?;
        self.delta.set_value(backend, delta)?;
        self.cfg.delta = delta;
        Ok(())
    }

    /// TRAM-x: out = e + z, with the noise step on the device (it equals the
    /// number of second steps run so far, replays included).
    pub fn noise<T: Element + DeviceRepr>(
        &self,
        backend: &CudaBackend,
        input: &CudaView<'_, T>,
        out: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        let TramVariant::X { noise } = self.cfg.variant else {
            return Err(Error::InvalidArgument(
                "noise is TRAM-x's; this step is TRAM-θ".into(),
            ));
        };
        add_noise(backend, input, out, &noise, &self.noise_step)
    }

    /// KL(target, model) → d (a device scalar), the norm, and θ + ε with
    /// ρ = δ·d, d and δ both read from device memory. Three launches.
    pub fn first_step<T: Element>(
        &mut self,
        backend: &CudaBackend,
        target: &DeviceLogits<'_, T>,
        model: &DeviceLogits<'_, T>,
        mask: Option<&CudaView<'_, u8>>,
    ) -> Result<()> {
        kl_div(
            backend,
            target,
            model,
            mask,
            &self.cfg.kl,
            &mut self.kl,
            None,
        )?;
        let geometry = self.cfg.geometry;
        grad_norm(
            backend,
            &self.params,
            NormOptions {
                geometry,
                inv_scale: 1.0,
            },
        )?;
        let opts = PerturbOptions {
            geometry,
            radius: self.delta.radius(),
            inv_scale: 1.0,
            mode: self.mode,
        };
        let (d, _guard) = self.kl.value().device_ptr(backend.stream());
        // SAFETY: `d` addresses the workspace's f32 value and the radius slot
        // is δ's, both owned by `self` for as long as any launch (or graph)
        // built from this call may run; `d` is written only on this stream
        // (by the KL just enqueued), δ only by `set_delta`'s copy on it.
        unsafe { perturb_raw_device(backend, &self.params, opts, self.delta.ptr(), d) }
    }

    /// Restore + base update (advancing the device step count), then the
    /// TRAM-θ target upkeep or the TRAM-x noise step. Two launches (the step
    /// count, then restore + update + target EMA in one pass) when the target
    /// is fused ([`TramStep::target_fused`]), else three.
    pub fn second_step(&mut self, backend: &CudaBackend) -> Result<()> {
        if let (TramVariant::Theta { lambda }, Some(f)) = (self.cfg.variant, &self.fused) {
            return self
                .optimizer
                .step_with_target(backend, &self.update, f, lambda);
        }
        self.optimizer.step(backend, &self.update)?;
        match self.cfg.variant {
            TramVariant::Theta { lambda } => {
                let target = self.target.as_ref().ok_or_else(|| {
                    Error::InvalidArgument("TRAM-θ without a target group".into())
                })?;
                ema_update(backend, target, lambda)
            }
            TramVariant::X { .. } => self.noise_step.advance(backend),
        }
    }
}
