//! TRAM-θ's target upkeep on the CPU: θ̄ ← λ·θ̄ + (1−λ)·θ over a group.
//!
//! λ = 1 leaves θ̄ untouched (bit for bit: nothing is written), λ = 0 copies θ
//! (rounded to the target's type). Otherwise each element is evaluated in f64
//! as `λ·θ̄ + (1−λ)·θ` (two products and a sum, no fused multiply-add), rounded
//! to f32 and then to the target type; `kernels/ema.cu` performs the same
//! operations, so both backends store identical bits for finite values. A NaN
//! result is NaN on both, but a GPU writes the canonical NaN where the CPU
//! keeps an input's payload (`tests/nan_inputs.rs`).
//!
//! Error bound against the exact value: half an ulp of f32 plus 2⁻⁵² relative
//! to the terms (f32 targets); a bf16/f16 target adds half an ulp of its type.

use rayon::prelude::*;

use crate::dtype::Element;
use crate::error::{ensure, Result};

const CHUNK: usize = 1 << 15;

/// One tensor of the EMA: the target θ̄ (updated) and the current weights θ.
#[derive(Debug)]
pub struct EmaTensor<'a, T, P> {
    /// θ̄, read and written: f32 or the parameter type.
    pub target: &'a mut [T],
    /// θ, read; as long as `target`.
    pub theta: &'a [P],
}

/// Checks λ ∈ [0, 1].
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for λ outside
/// [0, 1] or NaN.
pub fn validate_lambda(lambda: f32) -> Result<()> {
    ensure!(
        (0.0..=1.0).contains(&lambda),
        "EMA λ {lambda} is outside [0, 1]"
    );
    Ok(())
}

/// One element, as the kernel computes it.
#[inline]
pub(crate) fn ema_element(lambda: f32, target: f64, theta: f64) -> f32 {
    let l = lambda as f64;
    (l * target + (1.0 - l) * theta) as f32
}

/// θ̄ ← λ·θ̄ + (1−λ)·θ for every tensor. Validates everything before writing.
/// Moves 12 bytes per element for f32 θ̄ and θ (θ̄ read and written, θ read),
/// 6 for bf16 or f16 both.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument), with nothing
/// written, for λ outside [0, 1], an empty group, or a tensor whose target and
/// θ lengths differ.
pub fn ema_update<T: Element, P: Element>(
    tensors: &mut [EmaTensor<'_, T, P>],
    lambda: f32,
) -> Result<()> {
    validate_lambda(lambda)?;
    ensure!(!tensors.is_empty(), "the EMA group is empty");
    for (i, t) in tensors.iter().enumerate() {
        ensure!(
            t.target.len() == t.theta.len(),
            "tensor {i}: target has {} elements, θ {}",
            t.target.len(),
            t.theta.len()
        );
    }
    if lambda == 1.0 {
        return Ok(());
    }
    for t in tensors.iter_mut() {
        t.target
            .par_chunks_mut(CHUNK)
            .zip(t.theta.par_chunks(CHUNK))
            .for_each(|(dst, src)| {
                if lambda == 0.0 {
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = T::from_f32(s.to_f32());
                    }
                } else {
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = T::from_f32(ema_element(lambda, d.to_f64(), s.to_f64()));
                    }
                }
            });
    }
    Ok(())
}
