//! A whole TRAM step on the CUDA backend, the twin of `cpu::step`: the same
//! [`Tram`] interface, semantics and dtypes (see [`crate::step`] for the
//! description of the tensors, the order of the calls, AMP and resume).
//!
//! From one description of the model's tensors the step builds every launch
//! table it needs: a parameter group for the norm and the perturbation
//! (`group.rs`), an update table for the optimizer with the TRAM-θ targets
//! fused in (`optimizer.rs`), and it owns the KL workspace, the learning
//! rate, δ, the inverse loss scale, the step count, the noise step and the
//! phase, all in device memory. Launches per call:
//!
//! - `first_step`: the phase gate (1 thread), the KL (2), the norm (1), the
//!   perturbation (1), which reads d and δ from device memory;
//!   `first_step_fixed` the same without the KL, ρ read from device memory;
//! - `second_step`: AMP's check over the gradients (1), the gate that decides
//!   and advances the step count (1 thread), restore + update + target (1),
//!   and TRAM-x's noise step (1 thread);
//! - `base_step`: the same as `second_step`, with θ read where it is.
//!
//! Nothing allocates or synchronises in a step, and no cudarc event is
//! recorded or waited on: a step can be captured into a CUDA graph with the
//! backend as [`CudaBackend::new`] or [`CudaBackend::from_stream`] give it,
//! and replays follow the values set from the host between them (lr, δ, the
//! scale, which tensors have a gradient, the buffers' addresses when their
//! lengths are unchanged), since every kernel reads them from device memory.
//! What a graph cannot follow: the configuration's fixed values (η, λ, σ, the
//! KL options), launch grids, and a description with other lengths.
//!
//! # What the caller keeps
//!
//! Launches read and write the buffers of the description through the
//! addresses it held when the call was made ([`DevRef`], [`DevMut`]), and
//! the step's own device state. So:
//!
//! - all work on those buffers from other streams is ordered with the
//!   backend's stream by the caller ([`CudaBackend::wait_for_stream`] before
//!   a step, [`CudaBackend::make_stream_wait`] before another stream reuses
//!   or frees a buffer after it);
//! - a CUDA graph that captured a step uses the buffers of the description
//!   of the capture and the step object: keep both alive, where they are,
//!   while the graph may be replayed, and build descriptions, set values and
//!   toggle gradients outside the capture (they are host-to-device copies);
//! - while a stream captures, no thread synchronises the context (see
//!   [`CudaBackend`]).
//!
//! # Host cost of a description
//!
//! Each call checks its description in one host pass over the tensors and
//! compares the tables it implies with those on the device; only when an
//! address or the gradient toggles changed does it validate the addresses
//! (a sort, for overlaps) and upload the changed tables (one asynchronous
//! copy each, up to 56 bytes per tensor). For GPT-2 medium's 292 tensors,
//! measured on the project's machine (`benches/step.rs`, `describe`): about
//! 6 µs per call when nothing moved, 38 µs when every gradient moved.
//! Building the description from cudarc slices ([`DevRef::new`],
//! [`DevMut::new`]) adds cudarc's bookkeeping per buffer: with event tracking
//! on, an event recorded (and a wait when the buffer was written on another
//! stream); from raw addresses it costs nothing.

use std::marker::PhantomData;

/// The step's element types, held without owning any.
type Types<P, G, T> = PhantomData<fn() -> (P, G, T)>;

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};

use super::buffer::{DevMut, DevRef};
use super::grad_norm::{grad_norm_device_scale, NormOptions};
use super::group::{MtTensor, NormState, ParamGroup, Roles, Slot, MT_SLOTS};
use super::kl_div::{kl_div_step, DeviceLogits, KlWorkspace};
use super::noise::{add_noise_to, NoiseStep};
use super::optimizer::{FusedOptimizer, FusedTarget, Gate, RawUpdateTensor, UpdateGroup};
use super::perturb::{perturb_step, DeviceRadius, PerturbOptions};
use super::CudaBackend;
use crate::config::{validate_delta, Radius, TramConfig, TramVariant};
use crate::dtype::Element;
use crate::error::{ensure, Error, Result};
use crate::step::{
    active, check_fixed_radius, check_has_grad, check_same, check_second_grads, check_shapes,
    check_types, noise_config, validate_state, PerturbMode, Phase, Shape, StepReport, StepStatus,
    Tram, TramState,
};
use crate::PerturbStatus;

/// Where the first step puts θ + ε, with the buffer that kind needs (see
/// `cpu::step::Perturbation`).
#[derive(Debug)]
pub enum Perturbation<'a, P> {
    /// θ ← θ + ε in place; θ is saved here first (and restored from here).
    Backup(DevMut<'a, P>),
    /// f32 master weights: the working copy ← master + ε.
    Master(DevMut<'a, f32>),
    /// θ + ε written here; θ is only read.
    Out(DevMut<'a, P>),
}

impl<P> Perturbation<'_, P> {
    fn mode(&self) -> PerturbMode {
        match self {
            Perturbation::Backup(_) => PerturbMode::InPlace,
            Perturbation::Master(_) => PerturbMode::Master,
            Perturbation::Out(_) => PerturbMode::OutOfPlace,
        }
    }

    fn buf(&self) -> (u64, usize) {
        match self {
            Perturbation::Backup(b) | Perturbation::Out(b) => (b.ptr(), b.len()),
            Perturbation::Master(m) => (m.ptr(), m.len()),
        }
    }
}

/// One tensor of the model with every role it plays, as device buffers (see
/// [`crate::step`]; the fields are those of `cpu::step::Tensor`).
#[derive(Debug)]
pub struct Tensor<'a, P, G = P, T = f32> {
    /// θ (or the working copy beside f32 masters).
    pub param: DevMut<'a, P>,
    /// The gradient of this call's step; `None`: none.
    pub grad: Option<DevRef<'a, G>>,
    /// The buffer of the perturbation's kind.
    pub perturbation: Perturbation<'a, P>,
    /// AdamW's first moment or SGD's momentum (f32), when the optimizer keeps it.
    pub m: Option<DevMut<'a, f32>>,
    /// AdamW's second moment (f32).
    pub v: Option<DevMut<'a, f32>>,
    /// TRAM-θ's target θ̄.
    pub target: Option<DevMut<'a, T>>,
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
            perturbation_len: t.perturbation.buf().1 as u64,
            grad_len: t.grad.map_or(0, |g| g.len() as u64),
            m: t.m.as_ref().map(|b| b.len() as u64),
            v: t.v.as_ref().map(|b| b.len() as u64),
            target: t.target.as_ref().map(|b| b.len() as u64),
        })
        .collect()
}

/// The step's state in device memory (mirrors `StepState` in
/// `kernels/step.cuh`): the phase, the iteration's status and the update's
/// gate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepState {
    /// 0 idle, 1 perturbed.
    pub phase: u32,
    /// [`StepStatus`] bits of the current (or last) iteration.
    pub status: u32,
    /// Raised by the second step's check, cleared by its gate.
    pub found_inf: u32,
    /// The gate's decision: 1 = restore only.
    pub skip: u32,
    /// 1: θ comes from the backup.
    pub restore: u32,
    /// Padding to the kernel's 32-byte layout; zero.
    pub _pad: [u32; 3],
}

// SAFETY: `repr(C)` plain old data with the kernel's layout; any bits are valid.
unsafe impl DeviceRepr for StepState {}
unsafe impl ValidAsZeroBits for StepState {}

/// The launch tables of one description (host copies).
#[derive(Clone, Debug, PartialEq)]
struct Tables {
    params: Vec<MtTensor>,
    update: Vec<MtTensor>,
    targets: Vec<u64>,
    active: Vec<bool>,
}

/// TRAM's calls per training step, on the device, for parameters `P`,
/// gradients `G` and TRAM-θ targets `T` (see [`crate::step::STEP_DTYPES`]).
pub struct TramStep<P, G = P, T = f32> {
    backend: CudaBackend,
    cfg: TramConfig,
    mode: PerturbMode,
    built: Vec<Shape>,
    has_grad: Vec<bool>,
    phase: Phase,
    /// The tables as last uploaded.
    tables: Tables,
    /// The tensors the last first step perturbed.
    perturbed: Vec<bool>,
    params: ParamGroup<'static>,
    update: UpdateGroup<'static>,
    target: Option<FusedTarget<'static>>,
    optimizer: FusedOptimizer,
    kl: KlWorkspace,
    noise_step: NoiseStep,
    delta: DeviceRadius,
    /// ρ of [`Tram::first_step_fixed`].
    fixed: DeviceRadius,
    state: CudaSlice<StepState>,
    state_ptr: u64,
    _types: Types<P, G, T>,
}

impl<P, G, T> std::fmt::Debug for TramStep<P, G, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TramStep")
            .field("cfg", &self.cfg)
            .field("mode", &self.mode)
            .field("tensors", &self.built.len())
            .field("phase", &self.phase)
            .finish()
    }
}

impl<P: Element, G: Element, T: Element> TramStep<P, G, T> {
    /// Validates `cfg`, the dtypes and the description (see [`crate::step`]),
    /// builds the launch tables and allocates the device state (a KL
    /// workspace for up to `max_rows` logit rows). Every tensor starts with a
    /// gradient, the step count at 0. The step keeps a clone of `backend`
    /// and launches on its stream.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] as [`cpu::step::TramStep::new`](crate::cpu::step::TramStep::new),
    /// and for null, misaligned or overlapping buffer addresses or
    /// `max_rows` = 0; [`Error::Driver`] when an allocation or upload fails.
    pub fn new(
        backend: &CudaBackend,
        cfg: TramConfig,
        tensors: &[Tensor<'_, P, G, T>],
        max_rows: usize,
    ) -> Result<Self> {
        let theta = matches!(cfg.variant, TramVariant::Theta { .. });
        cfg.validate(theta)?;
        check_types::<P, G, T>()?;
        let built = shapes(tensors);
        let mode = check_shapes(&cfg, &built)?;
        let has_grad = vec![true; built.len()];
        let act = active(&has_grad, &built);
        let tables = tables(tensors, mode, &act, &act)?;
        validate_addresses::<P, G, T>(tensors)?;
        let roles = Roles {
            backup: mode == PerturbMode::InPlace,
            master: mode == PerturbMode::Master,
            out: mode == PerturbMode::OutOfPlace,
        };
        let mut params =
            ParamGroup::from_table(backend, P::DTYPE, G::DTYPE, roles, tables.params.clone())?;
        params.set_has_grad(&act)?;
        let raw: Vec<RawUpdateTensor> = tables
            .update
            .iter()
            .map(|r| RawUpdateTensor {
                param: r.ptr[0],
                grad: r.ptr[1],
                source: r.ptr[2],
                m: r.ptr[3],
                v: r.ptr[4],
                len: r.len,
                weight_decay: r.ptr[5] != 0,
            })
            .collect();
        // SAFETY: nothing is launched here; every launch happens in a call
        // that passes a description of live buffers, whose addresses the
        // tables are rewritten with first (`refresh`).
        let update = unsafe {
            UpdateGroup::from_raw(
                backend,
                &raw,
                P::DTYPE,
                G::DTYPE,
                mode == PerturbMode::Master,
            )?
        };
        let target = if theta {
            Some(FusedTarget::from_list(
                backend,
                &tables.targets,
                T::DTYPE,
                mode == PerturbMode::Master,
            )?)
        } else {
            None
        };
        let state = backend.stream().alloc_zeros::<StepState>(1)?;
        let state_ptr = DevRef::new(&state).ptr();
        Ok(Self {
            backend: backend.clone(),
            cfg,
            mode,
            perturbed: act,
            has_grad,
            phase: Phase::Idle,
            tables,
            params,
            update,
            target,
            optimizer: FusedOptimizer::new(backend, cfg.optimizer, cfg.lr)?,
            kl: KlWorkspace::new(backend, max_rows)?,
            noise_step: NoiseStep::new(backend, 0)?,
            delta: DeviceRadius::new(backend, Radius::TrustRegion { delta: cfg.delta })?,
            fixed: DeviceRadius::new(backend, Radius::Fixed(0.0))?,
            state,
            state_ptr,
            built,
            _types: PhantomData,
        })
    }

    /// The backend the step launches on.
    pub fn backend(&self) -> &CudaBackend {
        &self.backend
    }

    /// The perturbation's kind, from the description.
    pub fn mode(&self) -> PerturbMode {
        self.mode
    }

    /// The parameter group of the norm and the perturbation (its
    /// [`NormState`] holds the last norm, ρ and perturbation status).
    pub fn param_group(&self) -> &ParamGroup<'static> {
        &self.params
    }

    /// The base optimizer's device state.
    pub fn optimizer(&self) -> &FusedOptimizer {
        &self.optimizer
    }

    /// The KL workspace; [`KlWorkspace::value`] is the last d.
    pub fn kl_workspace(&self) -> &KlWorkspace {
        &self.kl
    }

    /// Which tensors have a gradient (as set; a tensor also needs `grad`).
    pub fn has_grad(&self) -> &[bool] {
        &self.has_grad
    }

    /// The step's device state, read back (waits for the stream).
    ///
    /// # Errors
    /// [`Error::Driver`] when the copy fails.
    pub fn device_state(&self) -> Result<StepState> {
        Ok(self.backend.stream().clone_dtoh(&self.state)?[0])
    }

    /// Checks a call's description and brings the device tables to it:
    /// `first`, the tensors taking part in the norm and perturbation (chunk
    /// list); `update`, those the update gives a gradient. Uploads only what
    /// changed (async copies: outside a capture when anything did).
    fn refresh(
        &mut self,
        tensors: &[Tensor<'_, P, G, T>],
        first: &[bool],
        update: &[bool],
    ) -> Result<()> {
        let now = shapes(tensors);
        check_shapes(&self.cfg, &now)?;
        check_same(&self.built, &now)?;
        check_second_grads(update, now.iter().map(|s| s.grad))?;
        let t = tables(tensors, self.mode, first, update)?;
        if t == self.tables {
            return Ok(());
        }
        if t.params != self.tables.params
            || t.update != self.tables.update
            || t.targets != self.tables.targets
        {
            validate_addresses::<P, G, T>(tensors)?;
        }
        if t.params != self.tables.params {
            self.params.rewrite_table(&t.params)?;
        }
        if t.active != self.tables.active {
            self.params.set_has_grad(&t.active)?;
        }
        if t.update != self.tables.update {
            self.update.rewrite_rows(&self.backend, t.update.clone())?;
        }
        if let Some(target) = self.target.as_mut() {
            if t.targets != self.tables.targets {
                target.rewrite(&self.backend, &t.targets)?;
            }
        }
        self.tables = t;
        Ok(())
    }

    /// Brings the device tables to `tensors` and the has-gradient flags for
    /// the next iteration, launching nothing: before replaying a CUDA graph
    /// that captured whole iterations, after toggling gradients or moving
    /// buffers (of the same lengths). Host-to-device copies of what changed
    /// (nothing when nothing did). Not between a first and a second step.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] between a first and a second step, or when `tensors` is not the
    /// step's description; [`Error::Driver`] when a copy fails.
    pub fn prepare(&mut self, tensors: &mut [Tensor<'_, P, G, T>]) -> Result<()> {
        ensure!(
            self.phase == Phase::Idle,
            "prepare between a first and a second step: call it between iterations"
        );
        let act = active(&self.has_grad, &shapes(tensors));
        self.refresh(tensors, &act, &act)
    }

    fn gate(&self, expect_perturbed: bool) -> Gate {
        Gate {
            state: self.state_ptr,
            first: self.params.state_ptr(),
            expect_perturbed,
        }
    }

    /// Check, gate, update (+ target), noise step.
    fn launch_update(&mut self, expect_perturbed: bool) -> Result<()> {
        let ema = match (self.cfg.variant, self.target.as_ref()) {
            (TramVariant::Theta { lambda }, Some(t)) => Some((t, lambda)),
            _ => None,
        };
        let gate = self.gate(expect_perturbed);
        self.optimizer
            .step_gated(&self.backend, &self.update, ema, gate)?;
        self.noise_step.advance(&self.backend)
    }

    /// The first step's phase gate (before anything else: it decides what
    /// the norm and the perturbation see).
    fn launch_first_gate(&self) -> Result<()> {
        let begin = self.backend.function("step_first_begin")?;
        let counts = self.params.n_chunks_ptr();
        let mut b = self.backend.stream().launch_builder(begin);
        b.arg(&self.state_ptr).arg(&counts);
        // SAFETY: step_first_begin(StepState*, uint32_t*): the step's own
        // StepState and its parameter group's four chunk counts, both owned
        // by `self`.
        unsafe { b.launch(LaunchConfig::for_num_elems(1)) }?;
        Ok(())
    }

    /// The norm and the perturbation, with the radius scale read from
    /// `radius_ptr` (one of the step's [`DeviceRadius`] slots).
    ///
    /// # Safety
    /// `divergence` is 0 for a fixed radius, else the address of an f32 of
    /// the backend's context that stays allocated while the launch (or a
    /// graph of it) may run, written on the backend's stream.
    unsafe fn launch_perturb(
        &self,
        radius: Radius,
        radius_ptr: u64,
        divergence: u64,
    ) -> Result<()> {
        let geometry = self.cfg.geometry;
        let inv_scale = self.optimizer.inv_scale();
        let scale_dev = self.optimizer.inv_scale_ptr();
        grad_norm_device_scale(
            &self.backend,
            &self.params,
            NormOptions {
                geometry,
                inv_scale,
            },
            scale_dev,
        )?;
        let opts = PerturbOptions {
            geometry,
            radius,
            inv_scale,
            mode: self.mode,
        };
        // SAFETY: the radius slot and the scale (the optimizer's
        // hyperparameter block) are owned by `self`, which the caller keeps
        // while any launch or graph of this call may run; they are written
        // only by the setters' copies on this stream; the divergence as the
        // caller guarantees.
        unsafe {
            perturb_step(
                &self.backend,
                &self.params,
                opts,
                radius_ptr,
                divergence,
                scale_dev,
            )
        }
    }
}

/// The tables of a description: the parameter group's rows (slots of
/// `group::Slot`), the update's rows (slots of `OPT_SLOT_*`), the targets.
fn tables<P, G, T>(
    tensors: &[Tensor<'_, P, G, T>],
    mode: PerturbMode,
    first: &[bool],
    update: &[bool],
) -> Result<Tables> {
    let mut params = Vec::with_capacity(tensors.len());
    let mut upd = Vec::with_capacity(tensors.len());
    let mut targets = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let len = t.param.len() as u64;
        let (p, g) = (t.param.ptr(), t.grad.map_or(0, |g| g.ptr()));
        let (copy, _) = t.perturbation.buf();
        let mut row = MtTensor {
            len,
            ..Default::default()
        };
        row.ptr[Slot::Param as usize] = p;
        row.ptr[Slot::Grad as usize] = g;
        let slot = match mode {
            PerturbMode::InPlace => Slot::Backup,
            PerturbMode::Master => Slot::Master,
            PerturbMode::OutOfPlace => Slot::Out,
        };
        row.ptr[slot as usize] = copy;
        params.push(row);
        let src = if mode == PerturbMode::OutOfPlace {
            p
        } else {
            copy
        };
        let grad = if update[i] { g } else { 0 };
        let m = t.m.as_ref().map_or(0, |b| b.ptr());
        let v = t.v.as_ref().map_or(0, |b| b.ptr());
        let mut urow = MtTensor {
            len,
            ..Default::default()
        };
        urow.ptr = [p, grad, src, m, v, t.weight_decay as u64];
        debug_assert_eq!(urow.ptr.len(), MT_SLOTS);
        upd.push(urow);
        if let Some(x) = t.target.as_ref() {
            targets.push(x.ptr());
        }
    }
    Ok(Tables {
        params,
        update: upd,
        targets,
        active: first.to_vec(),
    })
}

/// Null, alignment and overlap checks of every buffer of a description.
fn validate_addresses<P, G, T>(tensors: &[Tensor<'_, P, G, T>]) -> Result<()> {
    let (p, g, t) = (
        std::mem::size_of::<P>() as u64,
        std::mem::size_of::<G>() as u64,
        std::mem::size_of::<T>() as u64,
    );
    let mut ranges: Vec<(u64, u64, usize, &'static str)> = Vec::new();
    for (i, x) in tensors.iter().enumerate() {
        let n = x.param.len() as u64;
        if n == 0 {
            continue;
        }
        let (copy, _) = x.perturbation.buf();
        let copy_name = match x.perturbation {
            Perturbation::Backup(_) => "backup",
            Perturbation::Master(_) => "master",
            Perturbation::Out(_) => "out",
        };
        let copy_size = if matches!(x.perturbation, Perturbation::Master(_)) {
            4
        } else {
            p
        };
        let bufs = [
            ("param", Some(x.param.ptr()), p),
            ("grad", x.grad.map(|b| b.ptr()), g),
            (copy_name, Some(copy), copy_size),
            ("m", x.m.as_ref().map(|b| b.ptr()), 4),
            ("v", x.v.as_ref().map(|b| b.ptr()), 4),
            ("target", x.target.as_ref().map(|b| b.ptr()), t),
        ];
        for (name, ptr, size) in bufs {
            let Some(ptr) = ptr else { continue };
            ensure!(ptr != 0, "tensor {i}: {name} is a null device pointer");
            ensure!(
                ptr % size == 0,
                "tensor {i}: {name} address {ptr:#x} is not aligned to its {size}-byte elements"
            );
            let end = n.checked_mul(size).and_then(|b| ptr.checked_add(b));
            let Some(end) = end else {
                return Err(Error::InvalidArgument(format!(
                    "tensor {i}: {name} extends past the address space"
                )));
            };
            ranges.push((ptr, end, i, name));
        }
    }
    // Every role is written or read by the same launches: none may overlap.
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        ensure!(
            w[1].0 >= w[0].1,
            "tensor {} {} and tensor {} {} overlap (at {:#x}): every role of every tensor \
             needs a buffer of its own",
            w[0].2,
            w[0].3,
            w[1].2,
            w[1].3,
            w[1].0
        );
    }
    Ok(())
}

impl<P: Element, G: Element, T: Element> Tram for TramStep<P, G, T> {
    type Tensors<'t> = [Tensor<'t, P, G, T>];
    type Logits<'l, L: Element> = DeviceLogits<'l, L>;
    type Mask<'m> = DevRef<'m, u8>;
    type Input<'i, L: Element> = DevRef<'i, L>;
    type Output<'o, L: Element> = DevMut<'o, L>;

    fn config(&self) -> &TramConfig {
        &self.cfg
    }

    fn first_step<L: Element>(
        &mut self,
        tensors: &mut [Tensor<'_, P, G, T>],
        target: &DeviceLogits<'_, L>,
        model: &DeviceLogits<'_, L>,
        mask: Option<&DevRef<'_, u8>>,
    ) -> Result<()> {
        self.phase.begin_first()?;
        let act = active(&self.has_grad, &shapes(tensors));
        self.refresh(tensors, &act, &act)?;
        self.launch_first_gate()?;
        kl_div_step(
            &self.backend,
            target,
            model,
            mask,
            &self.cfg.kl,
            &mut self.kl,
        )?;
        let (radius, radius_ptr) = (self.delta.radius(), self.delta.ptr());
        // SAFETY: the divergence is the workspace's f32 value, owned by
        // `self`, written on this stream by the KL just enqueued.
        unsafe { self.launch_perturb(radius, radius_ptr, self.kl.value_ptr())? };
        self.perturbed = act;
        self.phase = Phase::Perturbed;
        Ok(())
    }

    fn first_step_fixed(&mut self, tensors: &mut [Tensor<'_, P, G, T>], rho: f32) -> Result<()> {
        self.phase.begin_first()?;
        check_fixed_radius(rho)?;
        let act = active(&self.has_grad, &shapes(tensors));
        self.refresh(tensors, &act, &act)?;
        if self.fixed.radius() != Radius::Fixed(rho) {
            self.fixed.set_value(&self.backend, rho)?;
        }
        self.launch_first_gate()?;
        let (radius, radius_ptr) = (self.fixed.radius(), self.fixed.ptr());
        // SAFETY: a fixed radius reads no divergence (address 0).
        unsafe { self.launch_perturb(radius, radius_ptr, 0)? };
        self.perturbed = act;
        self.phase = Phase::Perturbed;
        Ok(())
    }

    fn second_step(&mut self, tensors: &mut [Tensor<'_, P, G, T>]) -> Result<()> {
        self.phase.begin_second()?;
        let first = self.tables.active.clone();
        let upd = self.perturbed.clone();
        self.refresh(tensors, &first, &upd)?;
        self.launch_update(true)?;
        self.phase = Phase::Idle;
        Ok(())
    }

    fn base_step(&mut self, tensors: &mut [Tensor<'_, P, G, T>]) -> Result<()> {
        self.phase.begin_base()?;
        let act = active(&self.has_grad, &shapes(tensors));
        let first = self.tables.active.clone();
        self.refresh(tensors, &first, &act)?;
        self.launch_update(false)
    }

    fn noise<L: Element>(&mut self, input: &DevRef<'_, L>, out: &mut DevMut<'_, L>) -> Result<()> {
        let noise = noise_config(&self.cfg)?;
        add_noise_to(&self.backend, input, out, &noise, &self.noise_step)
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
        self.optimizer.set_lr(&self.backend, lr)?;
        self.cfg.lr = lr;
        Ok(())
    }

    fn delta(&self) -> f32 {
        self.cfg.delta
    }

    fn set_delta(&mut self, delta: f32) -> Result<()> {
        validate_delta(delta)?;
        self.delta.set_value(&self.backend, delta)?;
        self.cfg.delta = delta;
        Ok(())
    }

    fn inv_scale(&self) -> f32 {
        self.optimizer.inv_scale()
    }

    fn set_inv_scale(&mut self, inv_scale: f32) -> Result<()> {
        self.optimizer.set_inv_scale(&self.backend, inv_scale)
    }

    fn step_count(&self) -> Result<u64> {
        self.optimizer.step_count(&self.backend)
    }

    fn set_step_count(&mut self, t: u64) -> Result<()> {
        self.optimizer.set_step_count(&self.backend, t)
    }

    fn noise_step(&self) -> Result<u64> {
        self.noise_step.get(&self.backend)
    }

    fn set_noise_step(&mut self, step: u64) -> Result<()> {
        self.noise_step.set(&self.backend, step)
    }

    fn state(&self) -> Result<TramState> {
        Ok(TramState {
            counter: self.optimizer.counter(&self.backend)?,
            noise_step: self.noise_step.get(&self.backend)?,
            lr: self.optimizer.lr(),
            delta: self.cfg.delta,
            inv_scale: self.optimizer.inv_scale(),
        })
    }

    fn set_state(&mut self, state: &TramState) -> Result<()> {
        self.phase.between_iterations("set_state")?;
        validate_state(state)?;
        self.optimizer.set_counter(&self.backend, state.counter)?;
        self.set_lr(state.lr)?;
        self.set_delta(state.delta)?;
        self.set_inv_scale(state.inv_scale)?;
        self.noise_step.set(&self.backend, state.noise_step)
    }

    fn report(&self) -> Result<StepReport> {
        let s = self.device_state()?;
        let n: NormState = self.params.read_state()?;
        let d = self.backend.stream().clone_dtoh(self.kl.value())?[0];
        Ok(StepReport {
            status: StepStatus(s.status),
            perturb: PerturbStatus(n.status),
            divergence: d,
            norm: n.norm,
            rho: n.rho,
        })
    }
}
