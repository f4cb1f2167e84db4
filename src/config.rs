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
    Sam,
    Adaptive { eta: f32 },
    Fisher { eta: f32 },
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
    TrustRegion { delta: f32 },
}

/// What a perturbation did, as a bit set. The GPU writes it to a device word
/// that the host may read later without forcing a sync inside the step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PerturbStatus(pub u32);

impl PerturbStatus {
    /// ε = ρ·w/(N + 1e-12) was added to θ (norm finite and > 0, ρ finite and
    /// ≥ 0; ε is zero everywhere when ρ = 0).
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

    pub const fn applied(self) -> bool {
        self.0 & Self::APPLIED != 0
    }
    pub const fn zero_norm(self) -> bool {
        self.0 & Self::ZERO_NORM != 0
    }
    pub const fn found_inf(self) -> bool {
        self.0 & Self::NONFINITE_GRAD != 0
    }
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
    pub direction: KlDirection,
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
