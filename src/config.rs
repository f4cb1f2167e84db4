//! Settings shared by the CPU reference and the CUDA launchers, so both sides
//! of every test are configured by the same values.

/// How the perturbation is weighted (the "geometry" of the neighbourhood).
///
/// With `s` the inverse loss scale (1 without AMP) and `g' = s·g`:
///
/// | geometry | norm `N` | direction `w` |
/// |---|---|---|
/// | `Sam` | `sqrt(Σ g'²)` | `g'` |
/// | `Adaptive { eta }` (ASAM) | `sqrt(Σ ((|θ|+η)·g')²)` | `(|θ|+η)²·g'` |
/// | `Fisher { eta }` | `sqrt(Σ g'²/(1+η·g'²))` | `g'/(1+η·g'²)` |
///
/// and the perturbation is `ε = ρ·w/(N + 1e-12)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Geometry {
    /// SAM: the plain gradient direction, normalised by its L2 norm.
    Sam,
    /// ASAM: the gradient scaled element-wise by (|θ|+η), which makes the
    /// neighbourhood invariant to rescaling the weights.
    Adaptive {
        /// η > 0 keeps weights near zero in the neighbourhood; finite and ≥ 0.
        eta: f32,
    },
    /// A diagonal-Fisher weighting: each gradient term damped by 1/(1+η·g'²).
    Fisher {
        /// The damping η; finite and ≥ 0 (η = 0 is SAM's norm and direction).
        eta: f32,
    },
}

impl Geometry {
    /// A stable small integer for kernel arguments (0 SAM, 1 adaptive, 2 Fisher).
    pub const fn code(self) -> u32 {
        match self {
            Geometry::Sam => 0,
            Geometry::Adaptive { .. } => 1,
            Geometry::Fisher { .. } => 2,
        }
    }

    /// η (0 for SAM).
    pub const fn eta(self) -> f32 {
        match self {
            Geometry::Sam => 0.0,
            Geometry::Adaptive { eta } | Geometry::Fisher { eta } => eta,
        }
    }
}

/// Added to the norm before dividing, as SAM implementations do.
pub const NORM_EPS: f64 = 1e-12;

/// Where the neighbourhood radius ρ comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Radius {
    /// A fixed ρ (plain SAM).
    Fixed(f32),
    /// ρ = δ·d, with d the trust-region divergence (a device scalar on the GPU).
    TrustRegion {
        /// The scale δ; finite and ≥ 0.
        delta: f32,
    },
}

/// What a perturbation did, as a bit set. The GPU writes it to a device word
/// that the host may read later without forcing a sync inside the step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PerturbStatus(pub u32);

impl PerturbStatus {
    /// ε = ρ·w/(N + 1e-12) was added to θ (norm finite and > 0, ρ finite and
    /// ≥ 0; ε is zero everywhere when ρ = 0). `OVERFLOW` may come with it.
    pub const APPLIED: u32 = 1;
    /// The norm was zero: ε = 0, θ unchanged (not an error).
    pub const ZERO_NORM: u32 = 1 << 1;
    /// A gradient was inf/NaN (the norm is not finite): θ unchanged.
    /// This is what PyTorch's GradScaler calls `found_inf`.
    pub const NONFINITE_GRAD: u32 = 1 << 2;
    /// The radius (or the divergence it came from) was inf/NaN: θ unchanged.
    pub const NONFINITE_RADIUS: u32 = 1 << 3;
    /// The radius was negative: θ unchanged.
    pub const NEGATIVE_RADIUS: u32 = 1 << 4;
    /// Set together with `APPLIED`: θ + ε overflowed the parameter type, so
    /// some element whose θ (or master value) was finite was written as ±inf.
    /// θ was written all the same; the in-place backup still holds θ bit for
    /// bit (restore it, as after a `found_inf` step), the master weights are
    /// untouched, and an out-of-place θ is only read. Elements already
    /// infinite in θ do not set it.
    pub const OVERFLOW: u32 = 1 << 5;

    /// ε was added to θ ([`PerturbStatus::APPLIED`]).
    pub const fn applied(self) -> bool {
        self.0 & Self::APPLIED != 0
    }
    /// The norm was zero, so θ was left as it was ([`PerturbStatus::ZERO_NORM`]).
    pub const fn zero_norm(self) -> bool {
        self.0 & Self::ZERO_NORM != 0
    }
    /// A gradient was inf or NaN and θ was left as it was
    /// ([`PerturbStatus::NONFINITE_GRAD`]; GradScaler's `found_inf`).
    pub const fn found_inf(self) -> bool {
        self.0 & Self::NONFINITE_GRAD != 0
    }
    /// θ + ε overflowed to ±inf somewhere (see [`PerturbStatus::OVERFLOW`]).
    pub const fn overflow(self) -> bool {
        self.0 & Self::OVERFLOW != 0
    }
    /// The radius was inf, NaN or negative and θ was left as it was
    /// ([`PerturbStatus::NONFINITE_RADIUS`] or [`PerturbStatus::NEGATIVE_RADIUS`]).
    pub const fn bad_radius(self) -> bool {
        self.0 & (Self::NONFINITE_RADIUS | Self::NEGATIVE_RADIUS) != 0
    }
}

/// Which divergence between target logits `a` (giving P) and model logits `b`
/// (giving Q) measures the trust region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KlDirection {
    /// KL(P‖Q): the public TRAM code's default.
    Forward,
    /// KL(Q‖P).
    Reverse,
    /// KL(P‖Q) + KL(Q‖P).
    Symmetric,
}

/// How per-row divergences become one value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// No reduction: the per-row values only (the scalar is their sum).
    None,
    /// Σ over unmasked rows.
    Sum,
    /// Σ over unmasked rows / their count (0 when every row is masked).
    MeanRows,
    /// Σ over unmasked rows / (their count × vocab): PyTorch's `reduction='mean'`.
    MeanElements,
}

/// Options of the KL divergence over logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KlOptions {
    /// Which divergence: KL(P‖Q), KL(Q‖P) or their sum. Default: forward.
    pub direction: KlDirection,
    /// How per-row values become the scalar d. Default: [`Reduction::MeanRows`].
    pub reduction: Reduction,
    /// Both logit sets are divided by τ before the softmax; must be > 0 and finite.
    pub temperature: f32,
}

impl Default for KlOptions {
    fn default() -> Self {
        Self {
            direction: KlDirection::Forward,
            reduction: Reduction::MeanRows,
            temperature: 1.0,
        }
    }
}

/// The base optimizer of TRAM's second step (restore, then update).
///
/// Follows `torch.optim.AdamW` and `torch.optim.SGD` (maximize = false,
/// AMSGrad not supported). The learning rate is not here: it changes per step
/// and lives beside the step count (on the device for the CUDA backend).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BaseOptimizer {
    /// θ ← θ·(1 − lr·λ); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
    /// θ ← θ − lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps).
    AdamW {
        /// β1, the first moment's decay; in [0, 1) (torch: 0.9).
        beta1: f32,
        /// β2, the second moment's decay; in [0, 1) (torch: 0.999).
        beta2: f32,
        /// Added to the bias-corrected sqrt(v); finite and ≥ 0 (torch: 1e-8).
        eps: f32,
        /// Decoupled weight decay λ, applied as θ·(1 − lr·λ) to the tensors
        /// that opt in; finite and ≥ 0.
        weight_decay: f32,
    },
    /// g ← g + λ·θ; buf ← g on the first step, else μ·buf + (1−dampening)·g;
    /// g ← g + μ·buf (Nesterov) or buf; θ ← θ − lr·g. Momentum 0 keeps no buffer.
    Sgd {
        /// μ; finite and ≥ 0. 0 keeps no momentum buffer.
        momentum: f32,
        /// Scales the new gradient in the buffer by (1 − dampening); finite.
        dampening: f32,
        /// L2 weight decay λ, added to the gradient as λ·θ (torch's coupled
        /// form) for the tensors that opt in; finite and ≥ 0.
        weight_decay: f32,
        /// Nesterov momentum; needs momentum > 0 and dampening = 0.
        nesterov: bool,
    },
}

impl BaseOptimizer {
    /// AdamW with PyTorch's defaults (β = (0.9, 0.999), eps = 1e-8) and the given decay.
    pub const fn adamw(weight_decay: f32) -> Self {
        BaseOptimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    /// Checks the ranges PyTorch checks, and β in [0, 1).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming the
    /// field: β outside [0, 1), eps or a weight decay negative or not finite,
    /// a momentum negative or not finite, a dampening not finite, or Nesterov
    /// without momentum > 0 and dampening = 0.
    pub fn validate(&self) -> crate::Result<()> {
        use crate::error::ensure;
        match *self {
            BaseOptimizer::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                ensure!(
                    (0.0..1.0).contains(&beta1),
                    "AdamW beta1 {beta1} is outside [0, 1)"
                );
                ensure!(
                    (0.0..1.0).contains(&beta2),
                    "AdamW beta2 {beta2} is outside [0, 1)"
                );
                ensure!(
                    eps.is_finite() && eps >= 0.0,
                    "AdamW eps {eps} must be finite and >= 0"
                );
                ensure!(
                    weight_decay.is_finite() && weight_decay >= 0.0,
                    "AdamW weight_decay {weight_decay} must be finite and >= 0"
                );
            }
            BaseOptimizer::Sgd {
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => {
                ensure!(
                    momentum.is_finite() && momentum >= 0.0,
                    "SGD momentum {momentum} must be finite and >= 0"
                );
                ensure!(
                    dampening.is_finite(),
                    "SGD dampening {dampening} must be finite"
                );
                ensure!(
                    weight_decay.is_finite() && weight_decay >= 0.0,
                    "SGD weight_decay {weight_decay} must be finite and >= 0"
                );
                ensure!(
                    !nesterov || (momentum > 0.0 && dampening == 0.0),
                    "Nesterov momentum requires momentum > 0 and dampening = 0"
                );
            }
        }
        Ok(())
    }

    /// Whether the optimizer keeps a first state buffer (AdamW's m, SGD's momentum).
    pub fn uses_m(&self) -> bool {
        match *self {
            BaseOptimizer::AdamW { .. } => true,
            BaseOptimizer::Sgd { momentum, .. } => momentum != 0.0,
        }
    }

    /// Whether the optimizer keeps a second state buffer (AdamW's v).
    pub fn uses_v(&self) -> bool {
        matches!(self, BaseOptimizer::AdamW { .. })
    }
}

/// Checks a learning rate: finite and >= 0, as PyTorch requires.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) otherwise.
pub fn validate_lr(lr: f32) -> crate::Result<()> {
    crate::error::ensure!(
        lr.is_finite() && lr >= 0.0,
        "learning rate {lr} must be finite and >= 0"
    );
    Ok(())
}

/// Checks a trust-region scale δ: finite and >= 0.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) otherwise.
pub fn validate_delta(delta: f32) -> crate::Result<()> {
    crate::error::ensure!(
        delta.is_finite() && delta >= 0.0,
        "δ {delta} must be finite and >= 0"
    );
    Ok(())
}

/// Checks an inverse loss scale s (gradients are unscaled as s·g): finite
/// and > 0.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) otherwise.
pub fn validate_inv_scale(inv_scale: f32) -> crate::Result<()> {
    crate::error::ensure!(
        inv_scale.is_finite() && inv_scale > 0.0,
        "inverse loss scale {inv_scale} must be finite and > 0"
    );
    Ok(())
}

/// The optimizer's step count and the bias-correction powers βᵗ, kept in f64
/// and advanced by one multiplication per step on both backends, so the CPU and
/// the GPU hold identical bits (the CUDA backend keeps it in device memory and
/// advances it with a kernel, which a replayed CUDA graph repeats).
///
/// To resume a run bit for bit, save the whole counter and set it back (the
/// steps' `state` / `set_state`): the powers carry the rounding of every
/// multiplication so far. [`StepCounter::at`] rebuilds a counter from `t`
/// alone.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct StepCounter {
    /// Updates applied so far (t of the bias corrections once advanced);
    /// saturates at `u64::MAX`.
    pub t: u64,
    /// β1ᵗ (1 for SGD).
    pub beta1_pow: f64,
    /// β2ᵗ (1 for SGD).
    pub beta2_pow: f64,
}

/// Up to this many steps, [`StepCounter::at`] multiplies as advancing does.
pub const STEP_COUNTER_EXACT_UP_TO: u64 = 1 << 20;

impl StepCounter {
    /// The counter after `t` steps of `opt`, fast for any `t`: for
    /// t ≤ [`STEP_COUNTER_EXACT_UP_TO`] (2²⁰) βᵗ is the product of t factors
    /// β taken in order, the very bits that advancing t times gives (at most
    /// 2²⁰ multiplications, about a millisecond); beyond, binary powering (at
    /// most 128 multiplications, within 2⁻⁴⁵ relative of the exact power,
    /// where the in-order product has drifted further). βᵗ underflows to 0
    /// for large t, as it does when advancing.
    pub fn at(opt: &BaseOptimizer, t: u64) -> Self {
        let (b1, b2) = match *opt {
            BaseOptimizer::AdamW { beta1, beta2, .. } => (beta1 as f64, beta2 as f64),
            BaseOptimizer::Sgd { .. } => (1.0, 1.0),
        };
        let pow = |b: f64| {
            if t <= STEP_COUNTER_EXACT_UP_TO {
                let mut p = 1.0f64;
                for _ in 0..t {
                    p *= b;
                }
                p
            } else {
                let (mut acc, mut base, mut e) = (1.0f64, b, t);
                while e > 0 {
                    if e & 1 == 1 {
                        acc *= base;
                    }
                    base *= base;
                    e >>= 1;
                }
                acc
            }
        };
        StepCounter {
            t,
            beta1_pow: pow(b1),
            beta2_pow: pow(b2),
        }
    }

    /// One more step: t += 1 (saturating) and βᵗ ← βᵗ·β.
    pub fn advance(&mut self, opt: &BaseOptimizer) {
        self.t = self.t.saturating_add(1);
        if let BaseOptimizer::AdamW { beta1, beta2, .. } = *opt {
            self.beta1_pow *= beta1 as f64;
            self.beta2_pow *= beta2 as f64;
        }
    }

    /// Checks a counter set from outside (a checkpoint): the powers finite
    /// and in [0, 1].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a power
    /// outside [0, 1] or NaN.
    pub fn validate(&self) -> crate::Result<()> {
        crate::error::ensure!(
            (0.0..=1.0).contains(&self.beta1_pow) && (0.0..=1.0).contains(&self.beta2_pow),
            "step counter powers ({}, {}) must lie in [0, 1]",
            self.beta1_pow,
            self.beta2_pow
        );
        Ok(())
    }
}

/// The distribution of TRAM-x's embedding noise z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoiseDistribution {
    /// z ~ U(−σ, σ) (open interval; 2²⁴ equally spaced values).
    Uniform,
    /// z ~ N(0, σ²) by Box–Muller (|z| ≤ 6.67σ: 32-bit uniforms).
    Gaussian,
}

/// TRAM-x noise: distribution, scale σ and the generator's seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseConfig {
    /// Uniform or Gaussian.
    pub distribution: NoiseDistribution,
    /// Must be finite and >= 0.
    pub sigma: f32,
    /// The Philox key; the step and the element index form the counter.
    pub seed: u64,
}

impl NoiseConfig {
    /// Checks σ: finite and >= 0.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) otherwise.
    pub fn validate(&self) -> crate::Result<()> {
        let s = self.sigma;
        crate::error::ensure!(
            s.is_finite() && s >= 0.0,
            "noise σ {s} must be finite and >= 0"
        );
        Ok(())
    }
}

/// Where TRAM's target logits come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TramVariant {
    /// TRAM-θ: a target model whose weights θ̄ follow θ̄ ← λ·θ̄ + (1−λ)·θ after
    /// every update (λ = 0: the previous step's weights; λ = 1: frozen, e.g.
    /// the pre-trained weights). Needs target buffers.
    Theta {
        /// The EMA's decay λ, in [0, 1].
        lambda: f32,
    },
    /// TRAM-x: the same model on noised embeddings e + z.
    X {
        /// The noise added to the embeddings for the target's forward.
        noise: NoiseConfig,
    },
}

/// Everything a TRAM step is configured with; validated by [`TramConfig::validate`]
/// when a step object is built, so bad values are an `Err` there, not a NaN later.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TramConfig {
    /// ρ = δ·d: finite and >= 0.
    pub delta: f32,
    /// The neighbourhood's geometry (SAM, adaptive or Fisher).
    pub geometry: Geometry,
    /// How d is measured: direction, reduction and temperature.
    pub kl: KlOptions,
    /// TRAM-θ (an EMA target model) or TRAM-x (noised embeddings).
    pub variant: TramVariant,
    /// The update of the second step: AdamW or SGD.
    pub optimizer: BaseOptimizer,
    /// The initial learning rate (changeable per step).
    pub lr: f32,
}

impl TramConfig {
    /// Checks every field; `has_target` says whether target buffers were given
    /// (required by TRAM-θ).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming the
    /// first bad value: δ, η or lr negative or not finite, a temperature not
    /// finite and > 0, the optimizer's own checks
    /// ([`BaseOptimizer::validate`]), λ outside [0, 1], TRAM-θ without target
    /// buffers, or a noise σ negative or not finite.
    pub fn validate(&self, has_target: bool) -> crate::Result<()> {
        use crate::error::ensure;
        validate_delta(self.delta)?;
        let eta = self.geometry.eta();
        ensure!(
            eta.is_finite() && eta >= 0.0,
            "η {eta} must be finite and >= 0"
        );
        let t = self.kl.temperature;
        ensure!(
            t.is_finite() && t > 0.0,
            "KL temperature {t} must be finite and > 0"
        );
        self.optimizer.validate()?;
        validate_lr(self.lr)?;
        match self.variant {
            TramVariant::Theta { lambda } => {
                ensure!(
                    (0.0..=1.0).contains(&lambda),
                    "EMA λ {lambda} is outside [0, 1]"
                );
                ensure!(
                    has_target,
                    "TRAM-θ needs target parameters, none were given"
                );
            }
            TramVariant::X { noise } => noise.validate()?,
        }
        Ok(())
    }
}
