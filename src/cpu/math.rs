//! Elementary functions for the CPU reference's inner loops.
//!
//! libm's `exp` is a call per element that blocks vectorisation; it was 40% of
//! the KL reference's time. [`exp`] here is branch-free (selects only), so a loop
//! over a slice vectorises, and it is as accurate as the KL bound needs:
//! **≤ 1 ulp** from the exact value over the whole f64 range, subnormal results
//! included (one rounding there), with exp(−∞) = 0, exp(+∞) = +∞ and NaN in,
//! NaN out. `tests/cpu_math.rs` checks it against a double-double reference.

/// log2(e), rounded.
const LOG2_E: f64 = std::f64::consts::LOG2_E;
/// ln 2 split so that `k·LN2_HI` is exact for |k| < 2^20 (its low 21
/// significand bits are zero) and `LN2_HI + LN2_LO` is ln 2 to ~2^-90.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// 1.5·2^52: adding it rounds a |v| < 2^51 to an integer held in the low bits.
const SHIFT: f64 = 6_755_399_441_055_744.0;
/// Below this e^x rounds to 0 (e^-745.2 is half the least subnormal), and from
/// this up it overflows; clamping there keeps k within the scale split below.
const X_MIN: f64 = -746.0;
const X_MAX: f64 = 710.0;

/// 1/j! for j = 2..=13: the Taylor series of e^r past 1 + r. On |r| ≤ 0.35 the
/// first omitted term is < 4.2e-18, 0.04 ulp of e^r.
const C: [f64; 12] = [
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5_040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
    1.0 / 479_001_600.0,
    1.0 / 6_227_020_800.0,
];

/// 2^k for an integer k in [−1022, 1023] held as `k + SHIFT`.
#[inline(always)]
fn pow2(k_shifted: f64) -> f64 {
    let k = k_shifted.to_bits().wrapping_sub(SHIFT.to_bits());
    f64::from_bits(k.wrapping_add(1023) << 52)
}

/// e^x, branch-free, ≤ 1 ulp (see the module docs).
///
/// x = k·ln 2 + r with |r| ≤ ln 2 / 2 (Cody–Waite: `k·LN2_HI` is exact, so r
/// carries one rounding), e^r from its degree-13 series by Estrin's scheme, and
/// 2^k applied as two exact power-of-two factors 2^k1·2^k2 (k1 = k/2 rounded),
/// each a normal number, so only the last multiply rounds, into the subnormals
/// if the result lies there.
#[inline(always)]
pub fn exp(x: f64) -> f64 {
    // Comparisons are false for NaN, which therefore passes through.
    let x = if x < X_MIN { X_MIN } else { x };
    let x = if x > X_MAX { X_MAX } else { x };
    let k_shifted = x * LOG2_E + SHIFT;
    let k = k_shifted - SHIFT;
    // r = r_hi + r_lo exactly as the pair (r, dr); x − k·LN2_HI is exact.
    let r_hi = x - k * LN2_HI;
    let r_lo = -(k * LN2_LO);
    let r = r_hi + r_lo;
    let t = r - r_hi;
    let dr = (r_hi - (r - t)) + (r_lo - t);
    let r2 = r * r;
    let r4 = r2 * r2;
    let r8 = r4 * r4;
    let e = |j: usize| C[j] + C[j + 1] * r;
    let q = (e(0) + e(2) * r2) + (e(4) + e(6) * r2) * r4 + (e(8) + e(10) * r2) * r8;
    // 1 + r split exactly into s + ds (|r| < 1), so the only large rounding
    // is the last addition.
    let s = 1.0 + r;
    let ds = (1.0 - s) + r;
    let p = s + ((ds + dr) + r2 * q);
    let k1_shifted = k * 0.5 + SHIFT;
    let k2_shifted = (k - (k1_shifted - SHIFT)) + SHIFT;
    p * pow2(k1_shifted) * pow2(k2_shifted)
}
