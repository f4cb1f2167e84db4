//! Global gradient norm over a group of tensors, three geometries (CPU reference).
//!
//! With `s` the inverse loss scale and `g' = s·g` (see [`Geometry`]):
//! SAM `Σ g'²`, adaptive `Σ ((|θ|+η)·g')²`, Fisher `Σ g'²/(1+η·g'²)`, and the norm is
//! the square root. Tensors without a gradient are skipped, as PyTorch skips
//! `p.grad is None`.
//!
//! # Order and determinism
//! Each tensor is cut into chunks of [`CHUNK`] elements (the unit of rayon work).
//! Inside a chunk, blocks of [`BLOCK`] elements are summed by [`LANES`] interleaved
//! f64 accumulators combined as a fixed tree; the block sums are added in order to
//! the chunk's partial. Chunk partials (tensor order, then chunk order) are combined
//! sequentially with Neumaier's compensated sum. Nothing depends on the thread
//! count, so the result is bit-identical from run to run and across pools.
//!
//! # Error bound (finite inputs)
//! In f64 no term can overflow or underflow for f32/f16/bf16 inputs and a finite
//! `s`: `2^-298 ≤ |g'| ≤ 2^256` for `g ≠ 0`, so every non-zero term lies in
//! `[2^-900, 2^780]`, well inside f64's normal range (and so is any sum of fewer
//! than 2^64 of them). Widening to f32 and then f64 is exact, and so is `s·g`
//! (24 + 24 significand bits ≤ 53). Each term carries at most 6 roundings, the
//! summation depth is 64 (lane) + 4 (lane tree and tail) + 128 (blocks of a chunk)
//! + 2 (compensated chunk combine), and all terms are ≥ 0, so
//!
//! `|sum_sq − exact| ≤ 2^-45 · exact` (≈ 2.8e-14) and the same relative bound holds
//! for `norm` (the square root halves the relative error and adds half an ulp).
//! The bound does not grow with the number of elements.
//!
//! The tests check it against a double-double oracle (exact SAM terms) on groups
//! of up to 2^20+3 elements per tensor.

use multiversion::multiversion;
use rayon::prelude::*;

use super::convert::widen_into;
use crate::config::Geometry;
use crate::dtype::Element;
use crate::error::{ensure, Result};

/// Elements per unit of parallel work.
pub const CHUNK: usize = 1 << 16;
/// Elements per block (summed with [`LANES`] accumulators, then added to the chunk).
pub const BLOCK: usize = 512;
/// Interleaved accumulators inside a block (lets the loop vectorise).
pub const LANES: usize = 8;

/// Relative error bound of [`NormOutput::sum_sq`] and [`NormOutput::norm`] against
/// the exact value, for finite inputs (see the module docs).
pub const REL_ERROR_BOUND: f64 = 2.842170943040401e-14; // 2^-45

/// The result of [`grad_norm`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormOutput {
    /// The sum of squares before the square root (what a sharded user all-reduces).
    pub sum_sq: f64,
    /// `sqrt(sum_sq)`.
    pub norm: f64,
    /// Some gradient element was inf or NaN (PyTorch GradScaler's `found_inf`);
    /// `norm` is then not finite either. It looks at gradients only: a non-finite
    /// θ under the adaptive geometry makes `norm` non-finite with `found_inf`
    /// false (the perturbation still reports `NONFINITE_GRAD`, from the norm).
    pub found_inf: bool,
}

/// Checks the settings shared by the norm and the perturbation: `inv_scale`
/// finite and > 0, `η` finite and ≥ 0.
pub(crate) fn check_settings(geometry: Geometry, inv_scale: f32) -> Result<()> {
    ensure!(
        inv_scale.is_finite() && inv_scale > 0.0,
        "inv_scale must be finite and > 0, got {inv_scale}"
    );
    let eta = geometry.eta();
    ensure!(
        eta.is_finite() && eta >= 0.0,
        "geometry eta must be finite and >= 0, got {eta}"
    );
    Ok(())
}

/// Checks a group's shape: non-empty, one gradient slot per tensor, and each
/// present gradient as long as its tensor.
pub(crate) fn check_group<P, G>(params: &[&[P]], grads: &[Option<&[G]>]) -> Result<()> {
    ensure!(!params.is_empty(), "empty group: no tensors");
    ensure!(
        grads.len() == params.len(),
        "{} gradients for {} tensors",
        grads.len(),
        params.len()
    );
    for (i, (p, g)) in params.iter().zip(grads).enumerate() {
        if let Some(g) = g {
            ensure!(
                g.len() == p.len(),
                "tensor {i}: {} parameters but {} gradient elements",
                p.len(),
                g.len()
            );
        }
    }
    Ok(())
}

/// The norm term of one element: `g'²`, `((|θ|+η)·g')²` or `g'²/(1+η·g'²)`,
/// with `g_scaled = s·g`. All arithmetic in f64, exactly as [`grad_norm`] does it.
#[inline(always)]
pub fn norm_term(theta: f64, g_scaled: f64, geometry: Geometry) -> f64 {
    match geometry {
        Geometry::Sam => sam_term(g_scaled),
        Geometry::Adaptive { eta } => adaptive_term(theta, g_scaled, eta as f64),
        Geometry::Fisher { eta } => fisher_term(g_scaled, eta as f64),
    }
}

#[inline(always)]
fn sam_term(x: f64) -> f64 {
    x * x
}

#[inline(always)]
fn adaptive_term(theta: f64, x: f64, eta: f64) -> f64 {
    let a = (theta.abs() + eta) * x;
    a * a
}

#[inline(always)]
fn fisher_term(x: f64, eta: f64) -> f64 {
    let x2 = x * x;
    x2 / (1.0 + eta * x2)
}

/// Sums `term(a[k], b[k])` over one block (≤ [`BLOCK`] elements) in the fixed
/// order of the module docs: [`LANES`] interleaved accumulators, a fixed tree, the
/// tail last.
#[inline(always)]
fn block_sum(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f64) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f64; LANES];
    let mut ai = a.chunks_exact(LANES);
    let mut bi = b.chunks_exact(LANES);
    for (x, y) in (&mut ai).zip(&mut bi) {
        for l in 0..LANES {
            acc[l] += term(x[l], y[l]);
        }
    }
    let mut tail = 0.0f64;
    for (x, y) in ai.remainder().iter().zip(bi.remainder()) {
        tail += term(*x, *y);
    }
    let lanes = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    lanes + tail
}

/// The sum of norm terms of one chunk (`theta` and `grad` of equal lengths):
/// block sums added in order. Cloned for AVX2, picked at run time where the CPU
/// has it: lane-wise IEEE operations in the same order, so the same bits.
#[multiversion(targets("x86_64+avx2"))]
fn chunk_partial<P: Element, G: Element>(
    theta: &[P],
    grad: &[G],
    geometry: Geometry,
    s: f64,
) -> f64 {
    // Widening to f32 is exact, so the terms are those of the f64 formulas.
    let mut tbuf = [0.0f32; BLOCK];
    let mut gbuf = [0.0f32; BLOCK];
    let mut total = 0.0f64;
    // One loop per geometry, so the inner loop has no branch. θ is not read by
    // SAM and Fisher: their norm costs one read of g.
    match geometry {
        Geometry::Sam => {
            for gb in grad.chunks(BLOCK) {
                let g = widen_into(gb, &mut gbuf);
                total += block_sum(g, g, |g, _| sam_term(s * g as f64));
            }
        }
        Geometry::Fisher { eta } => {
            let eta = eta as f64;
            for gb in grad.chunks(BLOCK) {
                let g = widen_into(gb, &mut gbuf);
                total += block_sum(g, g, |g, _| fisher_term(s * g as f64, eta));
            }
        }
        Geometry::Adaptive { eta } => {
            let eta = eta as f64;
            for (tb, gb) in theta.chunks(BLOCK).zip(grad.chunks(BLOCK)) {
                let (t, g) = (widen_into(tb, &mut tbuf), widen_into(gb, &mut gbuf));
                total += block_sum(t, g, |t, g| adaptive_term(t as f64, s * g as f64, eta));
            }
        }
    }
    total
}

/// Neumaier's compensated sum, in the order given.
pub(crate) fn compensated_sum(xs: impl IntoIterator<Item = f64>) -> f64 {
    let mut sum = 0.0f64;
    let mut comp = 0.0f64;
    for x in xs {
        let t = sum + x;
        if sum.abs() >= x.abs() {
            comp += (sum - t) + x;
        } else {
            comp += (x - t) + sum;
        }
        sum = t;
    }
    // A non-finite sum makes the compensation NaN; keep the sum's own value.
    if sum.is_finite() {
        sum + comp
    } else {
        sum
    }
}

/// The global gradient norm of a group, per `geometry`, of the gradients scaled
/// by `inv_scale` (the inverse AMP loss scale; 1.0 without AMP).
///
/// `params[i]` is tensor i's θ (read only by the adaptive geometry), `grads[i]` its
/// gradient or `None` (skipped).
///
/// Accuracy: relative error ≤ [`REL_ERROR_BOUND`] (2^-45) for finite inputs;
/// deterministic and independent of the rayon thread count. Reads 4 bytes per
/// f32 gradient element (2 for f16/bf16), plus θ for the adaptive geometry.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): no tensors; `grads.len() != params.len()`; a gradient whose length
/// differs from its tensor's; `inv_scale` not finite or ≤ 0; `η` not finite or
/// < 0. Tensors of length 0 are fine.
pub fn grad_norm<P: Element, G: Element>(
    params: &[&[P]],
    grads: &[Option<&[G]>],
    geometry: Geometry,
    inv_scale: f32,
) -> Result<NormOutput> {
    check_settings(geometry, inv_scale)?;
    check_group(params, grads)?;
    let s = inv_scale as f64;

    let mut work: Vec<(&[P], &[G])> = Vec::new();
    for (p, g) in params.iter().zip(grads) {
        if let Some(g) = g {
            work.extend(p.chunks(CHUNK).zip(g.chunks(CHUNK)));
        }
    }
    // collect() keeps the index order, so the combine below is in a fixed order.
    let partials: Vec<(f64, bool)> = work
        .par_iter()
        .map(|&(p, g)| {
            let sum = chunk_partial(p, g, geometry, s);
            // Only a non-finite partial can hide an inf/NaN gradient: scan it then.
            let inf = !sum.is_finite() && g.iter().any(|x| !x.to_f64().is_finite());
            (sum, inf)
        })
        .collect();
    let sum_sq = compensated_sum(partials.iter().map(|p| p.0));
    let found_inf = partials.iter().any(|p| p.1);
    Ok(NormOutput {
        sum_sq,
        norm: sum_sq.sqrt(),
        found_inf,
    })
}
