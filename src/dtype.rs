//! Element types of parameters, gradients and logits: f32, f16 and bf16.
//! Arithmetic is always f32 or wider; these only load and store.

use half::{bf16, f16};

/// A runtime tag for an element type, as the kernels see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32, 4 bytes (`f32`).
    F32,
    /// IEEE binary16, 2 bytes ([`f16`](struct@f16)): 11 significand bits, largest finite
    /// value 65,504.
    F16,
    /// bfloat16, 2 bytes ([`bf16`](struct@bf16)): f32's exponent range with 8 significand
    /// bits (the top half of an f32).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name used in kernel symbols (`..._f32`, `..._bf16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// An element type the kernels and the CPU reference accept.
///
/// Conversions from f32/f64 round to nearest even, as the GPU's `__float2half_rn`
/// and `__float2bfloat16_rn` do, so both sides store identical bits for every
/// non-NaN value (a NaN stays NaN; a GPU gives the canonical one, `half` keeps
/// the payload's top bits).
pub trait Element:
    Copy + Send + Sync + PartialEq + std::fmt::Debug + bytemuck::Pod + Default + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widens exactly (f16 and bf16 values are all f32 values).
    fn to_f32(self) -> f32;
    /// Widens exactly.
    fn to_f64(self) -> f64;
    /// Rounds to nearest even (the identity for f32), overflowing to ±inf as
    /// IEEE rounding does.
    fn from_f32(x: f32) -> Self;
    /// Rounds once, directly from f64 (no double rounding through f32).
    fn from_f64(x: f64) -> Self;
    /// The bit pattern, widened, for bit-exact comparisons.
    fn to_bits_u32(self) -> u32;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
}

/// `x` rounded to f32 with round-to-odd (`x` not NaN): the truncation toward
/// zero, with the last bit set when inexact. Rounding that to nearest even in a
/// format of at most 22 significand bits (f16: 11, bf16: 8) gives the same result
/// as rounding `x` directly: 24 ≥ p + 2 bits make double rounding harmless when the
/// first one is to odd (Boldo and Melquiond, "When double rounding is odd", 2005).
/// Beyond f32's range it gives ±f32::MAX (odd), which rounds to ±inf in both half
/// formats, as `x` itself does.
#[inline(always)]
pub(crate) fn round_to_odd_f32(x: f64) -> f32 {
    let t = x as f32;
    let td = t as f64;
    // Branch-free so block loops vectorise: when t was rounded away from zero,
    // step back toward zero (same sign); when inexact, set the last bit.
    let away = (td.abs() > x.abs()) as u32;
    let inexact = (td != x) as u32;
    f32::from_bits((t.to_bits() - away) | inexact)
}

// `half`'s own f64 → f16/bf16 conversions drop the low 32 bits of the f64
// significand before rounding, so values just above a tie round the wrong way
// (~1e-4 of random inputs). Going through round-to-odd f32 rounds correctly.

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        if x.is_nan() {
            f16::from_f64(x)
        } else {
            f16::from_f32(round_to_odd_f32(x))
        }
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    // bf16 is the top half of an f32: a shift, exact for every value, NaN
    // payloads included (half's own conversion branches per element).
    #[inline]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline]
    fn to_f64(self) -> f64 {
        f32::from_bits((self.to_bits() as u32) << 16) as f64
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        if x.is_nan() {
            bf16::from_f64(x)
        } else {
            bf16::from_f32(round_to_odd_f32(x))
        }
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
}
