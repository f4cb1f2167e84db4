//! The TRAM step API shared by both backends: the [`Tram`] trait that
//! [`cpu::step::TramStep`](crate::cpu::step::TramStep) and
//! [`cuda::step::TramStep`](crate::cuda::step::TramStep) implement, the
//! status and checkpoint types, and the rules a description of the model's
//! tensors must follow.
//!
//! # The description of the tensors
//!
//! Each tensor of the model is described once per call, with every role it
//! plays (`cpu::step::Tensor` over slices, `cuda::step::Tensor` over device
//! buffers; the fields have the same names):
//!
//! | role | type | when |
//! |---|---|---|
//! | `param` θ (written) | `P` | always |
//! | `grad` g | `G` | `None`: no gradient buffer (this step, or ever) |
//! | `perturbation` | `Backup(P)`, `Master(f32)` or `Out(P)` | always, the same kind for every tensor ([`PerturbMode`]) |
//! | `m` | f32 | exactly when the optimizer keeps a first moment (AdamW, SGD with momentum) |
//! | `v` | f32 | exactly when it keeps a second (AdamW) |
//! | `target` θ̄ | `T` | exactly for TRAM-θ |
//! | `weight_decay` | bool | whether decay applies (not to norms and biases, usually) |
//!
//! Supported `(P, G)` pairs, the same on both backends: [`STEP_DTYPES`];
//! targets are f32 or `P`. A bad description is an `Err` before anything is
//! written: no tensors, a length that differs from θ's, a role missing or one
//! the configuration has no use for, mixed perturbation kinds, an unsupported
//! dtype pair; on CUDA also a null or misaligned address of a non-empty
//! buffer and buffers that overlap (on the CPU the borrow checker rules that
//! out). Empty tensors are allowed everywhere, with any address, and skipped.
//! Every call must describe the same tensors as the step was built with
//! (count, lengths, kinds); the buffers may move between calls (a framework
//! that allocates new gradients every backward rebuilds the description each
//! step: on CUDA that costs a host pass over the tensors, and a table upload
//! only when an address changed).
//!
//! Which tensors have a gradient is also toggled per step with
//! [`Tram::set_has_grad`]; a tensor takes part in a step when it is marked
//! and its `grad` is `Some`. The others keep θ as it is (not perturbed, not
//! updated; the TRAM-θ target still follows θ), on both backends alike.
//!
//! # One iteration
//!
//! ```text
//! forward + backward at θ          → g₁ (loss-scaled under AMP)
//! first_step(tensors, target, model logits)   KL → d, ρ = δ·d, ‖g₁‖, θ ← θ + ε (backup kept)
//! forward + backward at θ + ε      → g₂
//! second_step(tensors)             check g₂, restore θ, AdamW/SGD with g₂, target EMA
//! ```
//!
//! [`Tram::first_step_fixed`] replaces the first step for a fixed radius ρ
//! (plain SAM or ASAM, no logits); the second step is the same.
//! [`Tram::base_step`] is an iteration without the perturbation (SAM every k
//! steps): the base optimizer with the gradient at θ, then the target upkeep.
//! Calls out of this order are refused with an `Err` that says what to call;
//! on CUDA the phase also lives in device memory, so a replayed CUDA graph is
//! checked too (see [`StepStatus::PHASE_ERROR`]).
//!
//! # AMP
//!
//! Set the inverse loss scale s = 1/scale with [`Tram::set_inv_scale`]
//! before each iteration (on CUDA it lives in device memory: a captured
//! graph follows it). Both steps use the unscaled s·g. When the first step's
//! norm is not finite (an inf/NaN g₁) or a second-step gradient s·g₂ is inf,
//! NaN or at least 2⁶⁴ in magnitude (its square, AdamW's v, would overflow
//! f32), the iteration's update is skipped: θ is restored, and m, v, the step
//! count and the target are left untouched, as PyTorch's GradScaler skips
//! `optimizer.step()`; [`StepStatus::SKIPPED`] says so. The check reads every
//! second-step gradient once more: 4 bytes per f32 gradient element (2 per
//! f16/bf16), about 14 % on top of AdamW's 28 bytes per f32 parameter.

use crate::config::{BaseOptimizer, PerturbStatus, StepCounter, TramConfig, TramVariant};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Result};

pub use crate::cuda::perturb::PerturbMode;

/// The (parameter, gradient) dtype pairs a TRAM step supports, on both
/// backends: f32/f32, f16/f16, bf16/bf16 and bf16 with f32 gradients.
pub const STEP_DTYPES: [(DType, DType); 4] = [
    (DType::F32, DType::F32),
    (DType::F16, DType::F16),
    (DType::BF16, DType::BF16),
    (DType::BF16, DType::F32),
];

/// Checks a step's dtypes: `(P, G)` in [`STEP_DTYPES`], targets f32 or `P`.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming the unsupported pair or target type.
pub fn check_dtypes(param: DType, grad: DType, target: DType) -> Result<()> {
    ensure!(
        STEP_DTYPES.contains(&(param, grad)),
        "a TRAM step does not support parameters of {} with gradients of {}; supported \
         (param, grad) pairs: f32/f32, f16/f16, bf16/bf16, bf16/f32",
        param.name(),
        grad.name()
    );
    ensure!(
        target == DType::F32 || target == param,
        "TRAM-θ targets are f32 or the parameter type ({}), not {}",
        param.name(),
        target.name()
    );
    Ok(())
}

/// What the last iteration did, as a bit set (a device word on CUDA).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StepStatus(pub u32);

impl StepStatus {
    /// The update was skipped (found inf): θ restored, m, v, the step count
    /// and the target untouched.
    pub const SKIPPED: u32 = 1;
    /// The first step's norm was not finite (an inf/NaN gradient; the
    /// perturbation reported `NONFINITE_GRAD` and left θ unperturbed).
    pub const FOUND_INF_FIRST: u32 = 1 << 1;
    /// A second-step gradient s·g was inf, NaN or at least 2⁶⁴ in magnitude.
    pub const FOUND_INF_SECOND: u32 = 1 << 2;
    /// The device saw the steps out of order, which only a replayed CUDA
    /// graph can do (the host methods refuse it): a first step while θ was
    /// perturbed (ignored: θ and its backup kept, so the second step still
    /// restores the right θ), or a second step while θ was not perturbed
    /// (run as [`Tram::base_step`]). Never set on the CPU.
    pub const PHASE_ERROR: u32 = 1 << 3;
    /// The update ran at θ without a perturbation before it
    /// ([`Tram::base_step`]).
    pub const UNPERTURBED: u32 = 1 << 4;

    /// The update was skipped.
    pub const fn skipped(self) -> bool {
        self.0 & Self::SKIPPED != 0
    }
    /// A gradient of either step was found not finite.
    pub const fn found_inf(self) -> bool {
        self.0 & (Self::FOUND_INF_FIRST | Self::FOUND_INF_SECOND) != 0
    }
    /// Steps ran out of order on the device.
    pub const fn phase_error(self) -> bool {
        self.0 & Self::PHASE_ERROR != 0
    }
}

/// The last iteration, read back: the step's status, and what the last first
/// step computed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepReport {
    /// The last iteration (after its second or base step).
    pub status: StepStatus,
    /// The last first step's perturbation status.
    pub perturb: PerturbStatus,
    /// The last first step's divergence d (f32, as the perturbation read it).
    pub divergence: f32,
    /// The gradient norm the last perturbation used.
    pub norm: f64,
    /// The radius ρ = δ·d it used.
    pub rho: f64,
}

/// Everything a step carries from one iteration to the next besides the
/// tensors: what a checkpoint saves (with θ, m, v and the targets) so that a
/// resumed run is bit for bit the uninterrupted one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TramState {
    /// The step count and the bias-correction powers (carried whole: see
    /// [`StepCounter`]).
    pub counter: StepCounter,
    /// TRAM-x's noise step: the number of iterations run (skipped ones
    /// included, so every iteration draws fresh noise).
    pub noise_step: u64,
    /// The learning rate.
    pub lr: f32,
    /// δ of ρ = δ·d.
    pub delta: f32,
    /// The inverse loss scale.
    pub inv_scale: f32,
}

/// Where an iteration stands, on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Idle,
    Perturbed,
}

impl Phase {
    pub(crate) fn begin_first(&mut self) -> Result<()> {
        ensure!(
            *self == Phase::Idle,
            "first_step called twice: θ is already perturbed; call second_step (with the \
             gradient at the perturbed θ) before the next first_step"
        );
        Ok(())
    }

    pub(crate) fn begin_second(&self) -> Result<()> {
        ensure!(
            *self == Phase::Perturbed,
            "second_step without a first_step: call first_step first, or base_step for an \
             update without perturbation"
        );
        Ok(())
    }

    pub(crate) fn begin_base(&self) -> Result<()> {
        ensure!(
            *self == Phase::Idle,
            "base_step while θ is perturbed: call second_step to finish the iteration first"
        );
        Ok(())
    }

    /// `set_has_grad` and `set_state` happen between iterations only.
    pub(crate) fn between_iterations(&self, call: &str) -> Result<()> {
        ensure!(
            *self == Phase::Idle,
            "{call} between a first and a second step: call it before first_step or after              second_step"
        );
        Ok(())
    }
}

/// Checks the radius of [`Tram::first_step_fixed`].
pub(crate) fn check_fixed_radius(rho: f32) -> Result<()> {
    ensure!(
        rho.is_finite() && rho >= 0.0,
        "the fixed radius ρ {rho} must be finite and >= 0"
    );
    Ok(())
}

/// TRAM-x's noise configuration, or the error [`Tram::noise`] gives for TRAM-θ.
pub(crate) fn noise_config(cfg: &TramConfig) -> Result<crate::config::NoiseConfig> {
    match cfg.variant {
        TramVariant::X { noise } => Ok(noise),
        _ => Err(crate::Error::InvalidArgument(
            "noise is TRAM-x's; this step is TRAM-θ".into(),
        )),
    }
}

/// The second step needs a gradient for every tensor the first one perturbed.
pub(crate) fn check_second_grads(
    perturbed: &[bool],
    has_grad: impl IntoIterator<Item = bool>,
) -> Result<()> {
    for (i, (&p, g)) in perturbed.iter().zip(has_grad).enumerate() {
        ensure!(
            !p || g,
            "tensor {i} had a gradient in the first step; the second step needs its gradient too"
        );
    }
    Ok(())
}

/// Checks the values of a saved state before any of it is applied.
pub(crate) fn validate_state(state: &TramState) -> Result<()> {
    crate::config::validate_delta(state.delta)?;
    crate::config::validate_lr(state.lr)?;
    crate::config::validate_inv_scale(state.inv_scale)?;
    state.counter.validate()
}

/// One TRAM step on a backend: the same methods, semantics and dtypes on the
/// CPU reference and on CUDA, so a training loop is written once (see the
/// crate-level guide).
///
/// Values that live on the device on CUDA (the step count, the noise step,
/// the status) are read with methods that wait for the stream there.
pub trait Tram {
    /// The description of the model's tensors for one call (a slice of the
    /// backend's `Tensor`; see the [module docs](self)).
    type Tensors<'t>: ?Sized;
    /// Row-major logits of element type `L`.
    type Logits<'l, L: Element>;
    /// A row mask, one byte per row (0 leaves the row out).
    type Mask<'m>: ?Sized;
    /// TRAM-x's embeddings, read.
    type Input<'i, L: Element>: ?Sized;
    /// TRAM-x's noised embeddings, written.
    type Output<'o, L: Element>: ?Sized;

    /// The configuration (δ as last set).
    fn config(&self) -> &TramConfig;

    /// KL(target ‖ model) → d, ρ = δ·d, the gradient norm, and θ + ε with its
    /// backup (or into the working copy, or the outputs). `Err` when θ is
    /// already perturbed.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument), with nothing written, when θ is already perturbed (call
    /// [`Tram::second_step`] first); when `tensors` is not the description
    /// the step was built with (tensor count, lengths, roles; on CUDA also
    /// null, misaligned or overlapping addresses); when the two logit
    /// matrices differ in shape, the mask's length is not their row count, or
    /// (CUDA) they have more rows than the step was sized for. On CUDA,
    /// [`Error::Driver`](crate::Error::Driver) when a launch or copy fails.
    fn first_step<L: Element>(
        &mut self,
        tensors: &mut Self::Tensors<'_>,
        target: &Self::Logits<'_, L>,
        model: &Self::Logits<'_, L>,
        mask: Option<&Self::Mask<'_>>,
    ) -> Result<()>;

    /// The first step with a fixed radius ρ instead of δ·d: plain SAM, or
    /// ASAM with [`Geometry::Adaptive`](crate::Geometry::Adaptive). No
    /// divergence is computed (no logits; the report keeps the last one);
    /// the norm, θ + ε and its backup, the phase and AMP are those of
    /// [`Tram::first_step`]. `Err` when θ is already perturbed or ρ is not
    /// finite and >= 0. On CUDA ρ is written to device memory (an async copy
    /// on the stream, so not inside a capture), which replays read.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument), with
    /// nothing written, when θ is already perturbed, when ρ is negative or
    /// not finite, or when `tensors` is not the description the step was
    /// built with (as for [`Tram::first_step`]). On CUDA,
    /// [`Error::Driver`](crate::Error::Driver) when a launch or copy fails.
    fn first_step_fixed(&mut self, tensors: &mut Self::Tensors<'_>, rho: f32) -> Result<()>;

    /// Checks the gradients at θ + ε, restores θ and applies the base
    /// optimizer with them (or only restores, when a gradient of either step
    /// was not finite), then the TRAM-θ target upkeep; advances the noise
    /// step. `Err` without a first step before it.
    ///
    /// A non-finite gradient is not an error: the iteration is skipped and
    /// [`Tram::report`] says so ([`StepStatus::SKIPPED`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument), with nothing written, without a first step before it (call
    /// [`Tram::first_step`], or [`Tram::base_step`] for an update without
    /// perturbation), when `tensors` is not the step's description, or when a
    /// tensor that had a gradient in the first step has none now. On CUDA,
    /// [`Error::Driver`](crate::Error::Driver) when a launch or copy fails.
    fn second_step(&mut self, tensors: &mut Self::Tensors<'_>) -> Result<()>;

    /// An iteration without the perturbation: the base optimizer with the
    /// gradient at θ (checked as the second step's), the target upkeep and
    /// the noise step. `Err` while θ is perturbed.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument), with nothing written, while θ is perturbed or when `tensors` is
    /// not the step's description; on CUDA,
    /// [`Error::Driver`](crate::Error::Driver) when a launch or copy fails.
    fn base_step(&mut self, tensors: &mut Self::Tensors<'_>) -> Result<()>;

    /// TRAM-x: out = e + z with this iteration's noise. `Err` for TRAM-θ.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a TRAM-θ step or when `input` and `out` differ in length
    /// (on CUDA also a null or misaligned address); on CUDA,
    /// [`Error::Driver`](crate::Error::Driver) when the launch fails.
    fn noise<L: Element>(
        &mut self,
        input: &Self::Input<'_, L>,
        out: &mut Self::Output<'_, L>,
    ) -> Result<()>;

    /// Which tensors have a gradient from the next call on (one flag per
    /// tensor; all do at first). Not between a first and a second step.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a flag count other than the tensor count, or between a first
    /// and a second step.
    fn set_has_grad(&mut self, has_grad: &[bool]) -> Result<()>;

    /// The learning rate.
    fn lr(&self) -> f32;
    /// Sets the learning rate from the next update on (finite, >= 0).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a negative or non-finite lr, nothing changed; on CUDA,
    /// [`Error::Driver`](crate::Error::Driver) when the copy to the device fails.
    fn set_lr(&mut self, lr: f32) -> Result<()>;
    /// δ of ρ = δ·d.
    fn delta(&self) -> f32;
    /// Sets δ from the next first step on (finite, >= 0).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a negative or non-finite δ, nothing changed; on CUDA,
    /// [`Error::Driver`](crate::Error::Driver) when the copy to the device fails.
    fn set_delta(&mut self, delta: f32) -> Result<()>;
    /// The inverse loss scale s.
    fn inv_scale(&self) -> f32;
    /// Sets s = 1/scale for the next steps (finite, > 0).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for s ≤ 0 or non-finite, nothing changed; on CUDA,
    /// [`Error::Driver`](crate::Error::Driver) when the copy to the device fails.
    fn set_inv_scale(&mut self, inv_scale: f32) -> Result<()>;

    /// Updates applied so far (skipped iterations do not count).
    ///
    /// # Errors
    /// Never on the CPU. On CUDA the count lives in device memory: this waits
    /// for the stream, and a failed copy is [`Error::Driver`](crate::Error::Driver).
    fn step_count(&self) -> Result<u64>;
    /// Sets the step count, with the β powers of [`StepCounter::at`] (fast
    /// for any count). For a bit-identical resume use [`Tram::set_state`].
    ///
    /// # Errors
    /// Never on the CPU; on CUDA, [`Error::Driver`](crate::Error::Driver)
    /// when the copy to the device fails.
    fn set_step_count(&mut self, t: u64) -> Result<()>;
    /// TRAM-x's noise step (iterations run so far).
    ///
    /// # Errors
    /// As [`Tram::step_count`].
    fn noise_step(&self) -> Result<u64>;
    /// Sets the noise step.
    ///
    /// # Errors
    /// As [`Tram::set_step_count`].
    fn set_noise_step(&mut self, step: u64) -> Result<()>;
    /// Everything a checkpoint needs besides the tensors.
    ///
    /// # Errors
    /// As [`Tram::step_count`] (the counters are read from the device).
    fn state(&self) -> Result<TramState>;
    /// Resumes from a saved state. `Err` while θ is perturbed.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument), nothing changed, while θ is perturbed or when a value of the
    /// state fails its check (lr, δ, the scale, β powers outside [0, 1]);
    /// on CUDA, [`Error::Driver`](crate::Error::Driver) when a copy fails.
    fn set_state(&mut self, state: &TramState) -> Result<()>;
    /// The status of the last iteration and what its first step computed.
    ///
    /// # Errors
    /// As [`Tram::step_count`]: on CUDA this waits for the stream.
    fn report(&self) -> Result<StepReport>;
}

/// The shape of one tensor of a description, backend-independent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub len: u64,
    pub grad: bool,
    pub mode: PerturbMode,
    pub perturbation_len: u64,
    pub grad_len: u64,
    pub m: Option<u64>,
    pub v: Option<u64>,
    pub target: Option<u64>,
}

/// Validates a description's shapes against the configuration; returns the
/// perturbation mode. Errors say which tensor and what to change.
pub(crate) fn check_shapes(cfg: &TramConfig, shapes: &[Shape]) -> Result<PerturbMode> {
    ensure!(!shapes.is_empty(), "a TRAM step needs at least one tensor");
    ensure!(
        shapes.len() <= u32::MAX as usize,
        "too many tensors in one step ({})",
        shapes.len()
    );
    let mode = shapes[0].mode;
    let theta = matches!(cfg.variant, TramVariant::Theta { .. });
    let (uses_m, uses_v) = (cfg.optimizer.uses_m(), cfg.optimizer.uses_v());
    let opt_name = match cfg.optimizer {
        BaseOptimizer::AdamW { .. } => "AdamW",
        BaseOptimizer::Sgd { .. } => "SGD",
    };
    for (i, s) in shapes.iter().enumerate() {
        let n = s.len;
        ensure!(
            s.mode == mode,
            "tensor {i}: its perturbation is {:?} but tensor 0's is {mode:?}; every tensor \
             needs the same kind (backups, f32 masters or outputs)",
            s.mode
        );
        ensure!(
            s.perturbation_len == n,
            "tensor {i}: the {:?} buffer has {} elements, param {n}",
            s.mode,
            s.perturbation_len
        );
        if s.grad {
            ensure!(
                s.grad_len == n,
                "tensor {i}: grad has {} elements, param {n}",
                s.grad_len
            );
        }
        for (name, buf, used) in [("m", s.m, uses_m), ("v", s.v, uses_v)] {
            match (buf, used) {
                (Some(l), true) => {
                    ensure!(l == n, "tensor {i}: {name} has {l} elements, param {n}")
                }
                (None, true) => {
                    return Err(crate::Error::InvalidArgument(format!(
                        "tensor {i}: {opt_name} keeps a state buffer {name}, none was given"
                    )))
                }
                (Some(_), false) => {
                    return Err(crate::Error::InvalidArgument(format!(
                        "tensor {i}: {name} was given but {opt_name} with this configuration \
                         keeps none; remove it"
                    )))
                }
                (None, false) => {}
            }
        }
        match (s.target, theta) {
            (Some(l), true) => ensure!(l == n, "tensor {i}: target has {l} elements, param {n}"),
            (None, true) => {
                return Err(crate::Error::InvalidArgument(format!(
                    "tensor {i}: TRAM-θ needs a target θ̄, none was given"
                )))
            }
            (Some(_), false) => {
                return Err(crate::Error::InvalidArgument(format!(
                    "tensor {i}: a target was given but TRAM-x keeps none; remove it"
                )))
            }
            (None, false) => {}
        }
    }
    Ok(mode)
}

/// Checks that a call describes the tensors the step was built with.
pub(crate) fn check_same(built: &[Shape], now: &[Shape]) -> Result<()> {
    ensure!(
        built.len() == now.len(),
        "the step was built for {} tensors, this call describes {}",
        built.len(),
        now.len()
    );
    for (i, (a, b)) in built.iter().zip(now).enumerate() {
        ensure!(
            a.len == b.len && a.mode == b.mode,
            "tensor {i}: the step was built for {} elements ({:?}), this call describes {} ({:?})",
            a.len,
            a.mode,
            b.len,
            b.mode
        );
    }
    Ok(())
}

/// Which tensors take part this step: marked and with a gradient buffer.
pub(crate) fn active(has_grad: &[bool], shapes: &[Shape]) -> Vec<bool> {
    has_grad
        .iter()
        .zip(shapes)
        .map(|(&h, s)| h && s.grad)
        .collect()
}

/// Checks a has-gradient mask's length.
pub(crate) fn check_has_grad(has_grad: &[bool], n: usize) -> Result<()> {
    ensure!(
        has_grad.len() == n,
        "{} has-gradient flags for {n} tensors",
        has_grad.len()
    );
    Ok(())
}

/// Checks a (P, G, T) step against [`check_dtypes`].
pub(crate) fn check_types<P: Element, G: Element, T: Element>() -> Result<()> {
    check_dtypes(P::DTYPE, G::DTYPE, T::DTYPE)
}
