//! The perturbation θ ← θ + ε over a group of tensors (CPU reference), three ways:
//! in place with a bit-exact backup ([`perturb`]), from f32 master weights into
//! the working copy ([`perturb_master`]), and out of place ([`perturb_out_of_place`]).
//!
//! With `g' = s·g` (`s` the inverse loss scale), the norm `N` of
//! [`grad_norm`] and the radius ρ ([`radius_value`]):
//! `ε = c·w`, `c = ρ/(N + NORM_EPS)`, `w` = `g'`, `(|θ|+η)²·g'` or `g'/(1+η·g'²)`
//! (SAM, adaptive, Fisher). With `s` = 1/scale, ε does not depend on the loss
//! scale in any geometry (bit for bit when the scale is a power of two). SAM and
//! adaptive ε are also invariant to a scale left in `g` (degree 0 in `g`, up to
//! rounding); Fisher's `w` is not, so it needs the unscaled `g'`.
//!
//! What happens is decided once per group ([`plan`]), in this order:
//! a non-finite `N` sets `NONFINITE_GRAD`, a non-finite ρ `NONFINITE_RADIUS`, a
//! negative ρ `NEGATIVE_RADIUS`; any of these leaves θ unchanged. Otherwise
//! `N == 0` sets `ZERO_NORM` (ε = 0, θ unchanged), else `APPLIED`. An applied
//! step that rounds some finite θ (or master value) to ±inf in the parameter
//! type also sets `OVERFLOW`: found while writing, so the values are written
//! all the same (the backup keeps θ for [`restore`](super::restore::restore)).
//!
//! Each new value is computed in f64 ([`perturbed_value`], from the report's
//! `coef`) and rounded once to the parameter type, to nearest even
//! ([`Element::from_f64`]). So the stored value is the correctly rounded value of
//! a number within `8·2^-53·|ε| + 2^-53·|θ+ε|` of the exact `θ + c·w` (a few f64
//! roundings in `w`, `c·w` and the sum): at most half an ulp of `θ + ε` in
//! f32/f16/bf16, plus one ulp in the rare case that the f64 error crosses a tie.
//!
//! The `*_with` variants take the norm and radius explicitly, so a GPU test can
//! replay exactly the values the device used.

use multiversion::multiversion;
use rayon::prelude::*;

use super::convert::{narrow_into, widen_into};
use super::grad_norm::{check_settings, grad_norm, BLOCK, CHUNK};
use crate::config::{Geometry, PerturbStatus, Radius, NORM_EPS};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Result};

/// What a perturbation decided and with which values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerturbReport {
    /// What happened (see [`PerturbStatus`]).
    pub status: PerturbStatus,
    /// The norm `N` used.
    pub norm: f64,
    /// The radius ρ used.
    pub rho: f64,
    /// `ρ/(N + NORM_EPS)` when applied, else 0.
    pub coef: f64,
}

/// ρ from a [`Radius`]: `r` for `Fixed(r)`, `δ·d` (in f64, exact) for
/// `TrustRegion { delta }` with `d = divergence`.
pub fn radius_value(radius: Radius, divergence: f32) -> f64 {
    match radius {
        Radius::Fixed(r) => r as f64,
        Radius::TrustRegion { delta } => delta as f64 * divergence as f64,
    }
}

/// Decides the status and coefficient from a norm and a radius (module docs).
pub fn plan(norm: f64, rho: f64) -> PerturbReport {
    let mut bits = 0;
    if !norm.is_finite() {
        bits |= PerturbStatus::NONFINITE_GRAD;
    }
    if !rho.is_finite() {
        bits |= PerturbStatus::NONFINITE_RADIUS;
    } else if rho < 0.0 {
        bits |= PerturbStatus::NEGATIVE_RADIUS;
    }
    let mut coef = 0.0;
    if bits == 0 {
        if norm == 0.0 {
            bits = PerturbStatus::ZERO_NORM;
        } else {
            bits = PerturbStatus::APPLIED;
            coef = rho / (norm + NORM_EPS);
        }
    }
    PerturbReport {
        status: PerturbStatus(bits),
        norm,
        rho,
        coef,
    }
}

/// The direction `w` of one element, from θ and `g_scaled = s·g` (f64).
#[inline(always)]
pub fn direction(theta: f64, g_scaled: f64, geometry: Geometry) -> f64 {
    match geometry {
        Geometry::Sam => g_scaled,
        Geometry::Adaptive { eta } => adaptive_w(theta, g_scaled, eta as f64),
        Geometry::Fisher { eta } => fisher_w(g_scaled, eta as f64),
    }
}

#[inline(always)]
fn adaptive_w(theta: f64, x: f64, eta: f64) -> f64 {
    let a = theta.abs() + eta;
    (a * a) * x
}

#[inline(always)]
fn fisher_w(x: f64, eta: f64) -> f64 {
    x / (1.0 + eta * (x * x))
}

/// The exact f64 value `θ + coef·w(θ, s·g)` before rounding to the parameter type:
/// what every path stores (rounded once) for an element with a gradient when the
/// status is `APPLIED`. `theta` is the master value on the master-weight path.
#[inline(always)]
pub fn perturbed_value(theta: f64, g: f64, geometry: Geometry, inv_scale: f32, coef: f64) -> f64 {
    theta + coef * direction(theta, inv_scale as f64 * g, geometry)
}

/// Per-task buffers of one block: widened θ and g, the f64 results, and the
/// narrowing scratch.
struct Scratch {
    t: [f32; BLOCK],
    g: [f32; BLOCK],
    v: [f64; BLOCK],
    n: [f32; BLOCK],
}

impl Scratch {
    fn new() -> Self {
        Self {
            t: [0.0; BLOCK],
            g: [0.0; BLOCK],
            v: [0.0; BLOCK],
            n: [0.0; BLOCK],
        }
    }
}

/// `out[k] ← round(f(θ[k], g[k]))` over one block (≤ [`BLOCK`] elements, equal
/// lengths). Widening is exact and the narrowing rounds once, as `from_f64`.
/// Returns whether a finite θ gave a non-finite output (an overflow: f is
/// finite in f64 for finite inputs, so only the rounding to `P` can do it).
#[inline(always)]
fn update_block<T: Element, G: Element, P: Element>(
    theta: &[T],
    grad: &[G],
    out: &mut [P],
    f: &impl Fn(f64, f64) -> f64,
    sc: &mut Scratch,
) -> bool {
    let t = widen_into(theta, &mut sc.t);
    let g = widen_into(grad, &mut sc.g);
    let v = &mut sc.v[..theta.len()];
    for ((v, &t), &g) in v.iter_mut().zip(t).zip(g) {
        *v = f(t as f64, g as f64);
    }
    narrow_into(v, out, &mut sc.n);
    // On the bits: all-ones exponent is ±inf or NaN, in every format.
    let e = match P::DTYPE {
        DType::F32 => 0x7f80_0000,
        DType::BF16 => 0x7f80,
        DType::F16 => 0x7c00,
    };
    // Any non-finite output first (one integer test per element, in lanes);
    // only then which inputs were finite (θ already inf/NaN is no overflow).
    let any = out
        .iter()
        .fold(0u32, |a, o| a | ((o.to_bits_u32() & e) == e) as u32);
    if any == 0 {
        return false;
    }
    t.iter()
        .zip(out.iter())
        .any(|(&t, o)| t.is_finite() && o.to_bits_u32() & e == e)
}

/// `out[k] ← round(f(θ[k], g[k]))` over one chunk, block by block. Cloned for
/// AVX2 and picked at run time where the CPU has it (lane-wise IEEE operations:
/// the same bits either way).
#[multiversion(targets("x86_64+avx2"))]
fn update_chunk<T: Element, G: Element, P: Element, F: Fn(f64, f64) -> f64>(
    theta: &[T],
    grad: &[G],
    out: &mut [P],
    f: &F,
) -> bool {
    let mut sc = Scratch::new();
    let mut overflow = false;
    let blocks = theta.chunks(BLOCK).zip(grad.chunks(BLOCK));
    for ((tb, gb), ob) in blocks.zip(out.chunks_mut(BLOCK)) {
        overflow |= update_block(tb, gb, ob, f, &mut sc);
    }
    overflow
}

/// In place over one chunk, block by block: back θ up, then write θ + ε
/// computed from the backup (still in L1). Cloned for AVX2 like [`update_chunk`].
#[multiversion(targets("x86_64+avx2"))]
fn update_chunk_in_place<P: Element, G: Element, F: Fn(f64, f64) -> f64>(
    theta: &mut [P],
    grad: &[G],
    backup: &mut [P],
    f: &F,
) -> bool {
    let mut sc = Scratch::new();
    let mut overflow = false;
    let blocks = theta.chunks_mut(BLOCK).zip(grad.chunks(BLOCK));
    for ((tb, gb), bb) in blocks.zip(backup.chunks_mut(BLOCK)) {
        bb.copy_from_slice(tb);
        overflow |= update_block(bb, gb, tb, f, &mut sc);
    }
    overflow
}

/// Runs `body` with a per-element update function specialised to the geometry,
/// so the inner loops have no branch: `f(θ, g) = θ + c·w(θ, s·g)`.
macro_rules! with_update {
    ($geometry:expr, $s:expr, $c:expr, |$f:ident| $body:expr) => {{
        let (s, c) = ($s, $c);
        match $geometry {
            Geometry::Sam => {
                let $f = move |t: f64, g: f64| t + c * (s * g);
                $body
            }
            Geometry::Adaptive { eta } => {
                let eta = eta as f64;
                let $f = move |t: f64, g: f64| t + c * adaptive_w(t, s * g, eta);
                $body
            }
            Geometry::Fisher { eta } => {
                let eta = eta as f64;
                let $f = move |t: f64, g: f64| t + c * fisher_w(s * g, eta);
                $body
            }
        }
    }};
}

/// The report with `OVERFLOW` added when the writes overflowed.
fn with_overflow(mut report: PerturbReport, overflow: bool) -> PerturbReport {
    if overflow {
        report.status.0 |= PerturbStatus::OVERFLOW;
    }
    report
}

/// A norm passed in must be ≥ 0 or not finite (a non-finite one is a status).
fn check_norm(norm: f64) -> Result<()> {
    ensure!(
        norm >= 0.0 || !norm.is_finite(),
        "norm must not be negative, got {norm}"
    );
    Ok(())
}

/// Work items: a chunk of the tensor read, its gradient (None: copy only), and
/// a chunk of the tensor written.
type InPlaceItem<'a, P, G> = (&'a mut [P], Option<&'a [G]>, &'a mut [P]);
type OutItem<'a, P, G> = (&'a [P], Option<&'a [G]>, &'a mut [P]);

/// Tensor lengths equal pairwise, one gradient slot per tensor, non-empty group.
fn check_shapes<G>(
    what: &str,
    lens: &[usize],
    other: &[usize],
    grads: &[Option<&[G]>],
) -> Result<()> {
    ensure!(!lens.is_empty(), "empty group: no tensors");
    ensure!(
        grads.len() == lens.len(),
        "{} gradients for {} tensors",
        grads.len(),
        lens.len()
    );
    ensure!(
        other.len() == lens.len(),
        "{} {what} buffers for {} tensors",
        other.len(),
        lens.len()
    );
    for (i, ((&n, &m), g)) in lens.iter().zip(other).zip(grads).enumerate() {
        ensure!(m == n, "tensor {i}: {n} elements but {what} has {m}");
        if let Some(g) = g {
            ensure!(
                g.len() == n,
                "tensor {i}: {n} elements but {} gradient elements",
                g.len()
            );
        }
    }
    Ok(())
}

/// The checks every `*_with` path makes (settings, shapes against the second
/// buffer set `what`, the norm), then the plan for `norm` and `rho`.
#[allow(clippy::too_many_arguments)]
fn checked_plan<G>(
    what: &str,
    lens: &[usize],
    other: &[usize],
    grads: &[Option<&[G]>],
    geometry: Geometry,
    inv_scale: f32,
    norm: f64,
    rho: f64,
) -> Result<PerturbReport> {
    check_settings(geometry, inv_scale)?;
    check_shapes(what, lens, other, grads)?;
    check_norm(norm)?;
    Ok(plan(norm, rho))
}

/// In place with a backup: `backups[i] ← θ_i` bit-exact for every tensor (with or
/// without a gradient, applied or not), then `θ_i ← round(θ_i + ε_i)` for tensors
/// with a gradient when the status is `APPLIED`.
///
/// ρ comes from `radius` and `divergence` ([`radius_value`]); the norm is
/// [`grad_norm`] of the same group. Moves 16 bytes per f32 element (θ and g
/// read, θ + ε and the backup written).
///
/// A bad radius, a zero or non-finite norm, or θ + ε overflowing is not an
/// error: the returned status says so ([`PerturbStatus`]).
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): empty group; `grads` or `backups` count differs from `params`; a
/// gradient or backup whose length differs from its tensor's; `inv_scale` not
/// finite or ≤ 0; η not finite or < 0. Nothing is written on error.
pub fn perturb<P: Element, G: Element>(
    params: &mut [&mut [P]],
    grads: &[Option<&[G]>],
    backups: &mut [&mut [P]],
    geometry: Geometry,
    radius: Radius,
    divergence: f32,
    inv_scale: f32,
) -> Result<PerturbReport> {
    let view: Vec<&[P]> = params.iter().map(|p| &**p).collect();
    let norm = grad_norm(&view, grads, geometry, inv_scale)?;
    drop(view);
    let rho = radius_value(radius, divergence);
    perturb_with(params, grads, backups, geometry, inv_scale, norm.norm, rho)
}

/// [`perturb`] with the norm and ρ given (e.g. the values a GPU used).
/// `norm` must be ≥ 0 or not finite (a negative finite norm is an error).
///
/// # Errors
/// As [`perturb`], and a negative finite `norm`.
pub fn perturb_with<P: Element, G: Element>(
    params: &mut [&mut [P]],
    grads: &[Option<&[G]>],
    backups: &mut [&mut [P]],
    geometry: Geometry,
    inv_scale: f32,
    norm: f64,
    rho: f64,
) -> Result<PerturbReport> {
    let lens: Vec<usize> = params.iter().map(|p| p.len()).collect();
    let blens: Vec<usize> = backups.iter().map(|b| b.len()).collect();
    let report = checked_plan(
        "backup", &lens, &blens, grads, geometry, inv_scale, norm, rho,
    )?;
    let applied = report.status.applied();

    let mut work: Vec<InPlaceItem<P, G>> = Vec::new();
    for ((p, g), b) in params.iter_mut().zip(grads).zip(backups.iter_mut()) {
        let g = g.filter(|_| applied);
        let pc = p.chunks_mut(CHUNK);
        let bc = b.chunks_mut(CHUNK);
        match g {
            Some(g) => work.extend(
                pc.zip(g.chunks(CHUNK))
                    .zip(bc)
                    .map(|((p, g), b)| (p, Some(g), b)),
            ),
            None => work.extend(pc.zip(bc).map(|(p, b)| (p, None, b))),
        }
    }
    let overflow = with_update!(geometry, inv_scale as f64, report.coef, |f| {
        work.into_par_iter()
            .map(|(p, g, b)| match g {
                // One pass: read θ once, write the backup and θ + ε.
                Some(g) => update_chunk_in_place(p, g, b, &f),
                None => {
                    b.copy_from_slice(p);
                    false
                }
            })
            .reduce(|| false, |a, b| a | b)
    });
    Ok(with_overflow(report, overflow))
}

/// Master weights: reads the f32 master `master[i]` and the gradient, writes only
/// the working copy `working[i] ← round_P(m_i + ε_i)` for tensors with a gradient
/// when the status is `APPLIED` (the adaptive geometry uses `|m_i|`). Tensors
/// without a gradient, and every tensor when not applied, leave the working copy
/// untouched. No backup: the master is the backup.
///
/// # Errors
/// As [`perturb`], with `working` in the place of the backups.
pub fn perturb_master<P: Element, G: Element>(
    master: &[&[f32]],
    grads: &[Option<&[G]>],
    working: &mut [&mut [P]],
    geometry: Geometry,
    radius: Radius,
    divergence: f32,
    inv_scale: f32,
) -> Result<PerturbReport> {
    let norm = grad_norm(master, grads, geometry, inv_scale)?;
    let rho = radius_value(radius, divergence);
    perturb_master_with(master, grads, working, geometry, inv_scale, norm.norm, rho)
}

/// [`perturb_master`] with the norm and ρ given.
///
/// # Errors
/// As [`perturb_master`], and a negative finite `norm`.
pub fn perturb_master_with<P: Element, G: Element>(
    master: &[&[f32]],
    grads: &[Option<&[G]>],
    working: &mut [&mut [P]],
    geometry: Geometry,
    inv_scale: f32,
    norm: f64,
    rho: f64,
) -> Result<PerturbReport> {
    let lens: Vec<usize> = master.iter().map(|p| p.len()).collect();
    let wlens: Vec<usize> = working.iter().map(|w| w.len()).collect();
    let report = checked_plan(
        "working copy",
        &lens,
        &wlens,
        grads,
        geometry,
        inv_scale,
        norm,
        rho,
    )?;
    if !report.status.applied() {
        return Ok(report);
    }

    let mut work: Vec<(&[f32], &[G], &mut [P])> = Vec::new();
    for ((m, g), w) in master.iter().zip(grads).zip(working.iter_mut()) {
        if let Some(g) = g {
            work.extend(
                m.chunks(CHUNK)
                    .zip(g.chunks(CHUNK))
                    .zip(w.chunks_mut(CHUNK))
                    .map(|((m, g), w)| (m, g, w)),
            );
        }
    }
    let overflow = with_update!(geometry, inv_scale as f64, report.coef, |f| {
        work.into_par_iter()
            .map(|(m, g, w)| update_chunk(m, g, w, &f))
            .reduce(|| false, |a, b| a | b)
    });
    Ok(with_overflow(report, overflow))
}

/// Out of place: `out[i] ← round_P(θ_i + ε_i)` for tensors with a gradient when
/// the status is `APPLIED`, else `out[i] ← θ_i` bit-exact. θ is only read.
///
/// # Errors
/// As [`perturb`], with `out` in the place of the backups.
pub fn perturb_out_of_place<P: Element, G: Element>(
    params: &[&[P]],
    grads: &[Option<&[G]>],
    out: &mut [&mut [P]],
    geometry: Geometry,
    radius: Radius,
    divergence: f32,
    inv_scale: f32,
) -> Result<PerturbReport> {
    let norm = grad_norm(params, grads, geometry, inv_scale)?;
    let rho = radius_value(radius, divergence);
    perturb_out_of_place_with(params, grads, out, geometry, inv_scale, norm.norm, rho)
}

/// [`perturb_out_of_place`] with the norm and ρ given.
///
/// # Errors
/// As [`perturb_out_of_place`], and a negative finite `norm`.
pub fn perturb_out_of_place_with<P: Element, G: Element>(
    params: &[&[P]],
    grads: &[Option<&[G]>],
    out: &mut [&mut [P]],
    geometry: Geometry,
    inv_scale: f32,
    norm: f64,
    rho: f64,
) -> Result<PerturbReport> {
    let lens: Vec<usize> = params.iter().map(|p| p.len()).collect();
    let olens: Vec<usize> = out.iter().map(|o| o.len()).collect();
    let report = checked_plan(
        "output", &lens, &olens, grads, geometry, inv_scale, norm, rho,
    )?;
    let applied = report.status.applied();

    let mut work: Vec<OutItem<P, G>> = Vec::new();
    for ((p, g), o) in params.iter().zip(grads).zip(out.iter_mut()) {
        let pc = p.chunks(CHUNK);
        let oc = o.chunks_mut(CHUNK);
        match g.filter(|_| applied) {
            Some(g) => work.extend(
                pc.zip(g.chunks(CHUNK))
                    .zip(oc)
                    .map(|((p, g), o)| (p, Some(g), o)),
            ),
            None => work.extend(pc.zip(oc).map(|(p, o)| (p, None, o))),
        }
    }
    let overflow = with_update!(geometry, inv_scale as f64, report.coef, |f| {
        work.into_par_iter()
            .map(|(p, g, o)| match g {
                Some(g) => update_chunk(p, g, o, &f),
                None => {
                    o.copy_from_slice(p);
                    false
                }
            })
            .reduce(|| false, |a, b| a | b)
    });
    Ok(with_overflow(report, overflow))
}
