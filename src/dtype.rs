//! Element types of parameters, gradients and logits: f32, f16 and bf16.
//! Arithmetic is always f32 or wider; these only load and store.

use half::{bf16, f16};

/// A runtime tag for an element type, as the kernels see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
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
/// and `__float2bfloat16_rn` do, so both sides store identical bits.
pub trait Element:
    Copy + Send + Sync + PartialEq + std::fmt::Debug + bytemuck::Pod + Default + 'static
{
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    fn from_f32(x: f32) -> Self;
    /// Rounds once, directly from f64 (no double rounding through f32).
    fn from_f64(x: f64) -> Self;
    /// The bit pattern, widened, for bit-exact comparisons.
    fn to_bits_u32(self) -> u32;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn from_f64(x: f64) -> Self {
        f16::from_f32(f32_round_to_odd(x))
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn from_f64(x: f64) -> Self {
        bf16::from_f32(f32_round_to_odd(x))
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
}

/// f64 → f32 rounded to odd: truncate toward zero, then set the last bit if
/// anything was lost. Rounding that result to nearest-even in a format with at
/// least two fewer significand bits (f16, bf16) equals rounding `x` directly,
/// with no double-rounding error. (`half`'s own `from_f64` drops the low 32
/// bits before rounding, which misrounds some ties.)
fn f32_round_to_odd(x: f64) -> f32 {
    let r = x as f32;
    if !r.is_finite() && x.is_finite() {
        // Beyond f32's range: the largest finite f32, marked inexact, rounds on to ±∞.
        return f32::from_bits(f32::MAX.to_bits() | (r.to_bits() & 0x8000_0000));
    }
    if r as f64 == x || x.is_nan() {
        return r;
    }
    // Step toward zero if round-to-nearest went away from it.
    let toward_zero = if (r as f64).abs() > x.abs() {
        f32::from_bits(r.to_bits() - 1)
    } else {
        r
    };
    f32::from_bits(toward_zero.to_bits() | 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_f64_rounds_once() {
        // 1 + 2^-8 is a bf16 tie (rounds to even: 1.0); a hair above it must round up.
        let tie = 1.0 + 2f64.powi(-8);
        assert_eq!(bf16::from_f64(tie).to_bits(), 0x3f80);
        let above = tie + 2f64.powi(-40);
        assert_eq!(<bf16 as Element>::from_f64(above).to_bits(), 0x3f81);
        // Same for f16: 1 + 2^-11 is a tie; a hair above rounds up.
        let tie16 = 1.0 + 2f64.powi(-11);
        assert_eq!(<f16 as Element>::from_f64(tie16).to_bits(), 0x3c00);
        assert_eq!(
            <f16 as Element>::from_f64(tie16 + 2f64.powi(-45)).to_bits(),
            0x3c01
        );
        // Negative values, overflow and NaN.
        assert_eq!(<bf16 as Element>::from_f64(-above).to_bits(), 0xbf81);
        assert!(<bf16 as Element>::from_f64(1e300).to_f32().is_infinite());
        assert!(<f16 as Element>::from_f64(-1e300).to_f32() == f32::NEG_INFINITY);
        assert!(<bf16 as Element>::from_f64(f64::NAN).to_f32().is_nan());
        assert_eq!(<f32 as Element>::from_f64(0.1), 0.1f32);
    }

    #[test]
    fn from_f64_matches_exact_rounding_on_random_values() {
        // Compare with rounding decided on the exact f64 value: the two
        // neighbouring representable values and the midpoint between them.
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..200_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = f64::from_bits((state >> 2) | 0x3f00_0000_0000_0000) * 3.0;
            let b = <bf16 as Element>::from_f64(x);
            let (lo, hi) = if b.to_f64() <= x {
                (b, bf16::from_bits(b.to_bits() + 1))
            } else {
                (bf16::from_bits(b.to_bits() - 1), b)
            };
            let mid = (lo.to_f64() + hi.to_f64()) / 2.0;
            let want = if x < mid || (x == mid && lo.to_bits() % 2 == 0) {
                lo
            } else {
                hi
            };
            assert_eq!(b.to_bits(), want.to_bits(), "x = {x:e}");
        }
    }
}
