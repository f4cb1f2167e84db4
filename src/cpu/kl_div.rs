//! KL divergence between two sets of logits, the CPU reference.
//!
//! Target logits `a` give P = softmax(a/τ), model logits `b` give Q = softmax(b/τ).
//! Forward is KL(P‖Q), reverse KL(Q‖P), symmetric their sum, per row.
//!
//! # Numerics
//! TRAM's divergence is taken between logits that nearly agree (a model and
//! its own EMA, or the same model on slightly noised inputs), where the KL is
//! tiny. The textbook `Σ p·(log p − log q)` is useless there: `log p` and
//! `log q` each carry a rounding error of about ε·|logsumexp|, far above a KL
//! of 1e-10, so in f32 (and, for peaked rows, even in f64) it returns rounding
//! noise, sometimes negative. Writing d = a − b and p = softmax(a) instead,
//!
//! ```text
//! KL(P‖Q) = Σ p·d + log Σ p·e^(−d)
//! ```
//!
//! and centring d on a reference c turns both terms into sums of small,
//! mostly non-negative quantities that one pass over the row can accumulate
//! and that merge like an online softmax. Here, with d = (a − b)/τ, a
//! reference c and x = d − c, φ(x) = expm1(−x) + x ≥ 0 (≈ x²/2 for small x),
//! and weights w = exp((a − max a)/τ):
//!
//! ```text
//! S = Σ w,  A = Σ w·x,  B = Σ w·φ(x),  α = A/S,  β = B/S,  KL = α + log1p(β − α)
//! ```
//!
//! Moving a partial's reference from c to c + s gives A' = A − s·S and
//! B' = e^s·B − expm1(s)·A + S·φ(−s); a new running max rescales S, A and B
//! by e^(M − M'). Those two rules merge partials of any split of a row, in a
//! fixed order, so the result is deterministic. The CUDA kernel
//! ([`crate::cuda::kl_div`]) uses the same formulation with f32 per-thread
//! sums and f64 merges.
//!
//! all in f64. A row is cut into chunks of [`CHUNK`] elements; each chunk is a
//! partial (S, A, B) centred on its own P-mean of d (one refinement step). The
//! difference `a − b` is carried exactly, as an unevaluated pair (its f64
//! rounding and that rounding's error, by two-sum: a single f64 is exact only
//! while the two logits' exponents are within ~29 of each other for f32), and so
//! is the reference c; x = d − c is then formed to within an ulp of x, so an
//! offset between the logit sets costs nothing at any magnitude. φ comes from its
//! series for |x| ≤ 0.5 and from `exp(la − x) − w + w·x` beyond (one exponent: a
//! negligible w facing a huge e^{−x} is never 0·∞). Partials merge like an online
//! softmax, moving to the combined P-mean; since A ≈ 0 in every partial, a move only
//! adds non-negative terms to B. The merge tree depends on the chunk count alone, so
//! results are bit-identical for any number of threads and any batch around a row.
//! A final re-centre on α makes KL = α + log1p(β − α) ≈ log1p(β) to full relative
//! precision. Rows whose centred sums overflow (logit sets disagreeing by more than
//! the exponent range, so KL ≳ 700) fall back to the classical
//! `α + (c − max a + max b)/τ + ln S_b − ln S` (the first sum compensated),
//! exact enough at that size.
//!
//! An element with a = −∞ but finite b has no P mass but does carry Q mass: it adds
//! exp((b − max a)/τ + c/τ) to B rather than being skipped (a = [0, −∞] against
//! b = [0, 0] is ln 2, not 0).
//!
//! # Error bound
//! Against the exact value on the upcast inputs, for a finite row:
//! **relative ≤ 1e-12** (and KL ≥ 0: a rounding-level negative result is clamped
//! to 0). Sources: x_i ≤ 2ε; each B term ≤ 27ε (series 2ε, the one-exponent form
//! 27ε at |x| = 0.5 and less beyond); weights 2ε·(1 + |log w|) (the element
//! loops take e^x from [`math::exp`], within 1 ulp, so they vectorise); chunk sums of
//! non-negative terms over 8 interleaved accumulators ≤ (CHUNK/8 + 3)ε; each merge
//! level a few ε (≤ 9 levels at V = 250,002); A enters only at second order
//! (∂KL/∂α = β − α ≈ 0 once centred). That is ≲ 150ε ≈ 3e-14, stated as 1e-12.
//! The bound holds for all finite inputs, whatever their magnitudes (logits 1e16
//! or 3e38 against logits near 0 included): the differences and references are
//! exact pairs, and every sum of raw logits is compensated.
//! Overflow-fallback rows (KL ≳ 700) err by a few ε relative.
//! Gradients: |g_i − g*_i| ≤ 1e-12·(max_row |g*| + |g*_i|).
//! `tests/cpu_kl_div.rs` checks both against an independent compensated two-pass
//! oracle (σ = 1, 3, 30; gaps 1 … 1e-5; offsets; f32/f16/bf16; V = 1 … 250,002;
//! worst seen 2e-14 for the value and for the gradient ratio), against the
//! textbook formula evaluated in double-double (V ≤ 300; worst 1.2e-15), and on
//! rows 35 or more binades apart (offsets 1e10 to 3e38, f32, bf16 and f16)
//! against the oracle on the exactly shifted rows.
//!
//! # Edge cases (per row, per direction; for reverse swap the roles of a and b)
//! - a_i = −∞: no P mass; b_i still counts in Q's normaliser.
//! - a_i finite and b_i = −∞: KL = +∞.
//! - every a_i = −∞: no distribution, KL = NaN.
//! - NaN or +∞ anywhere in either row: KL = NaN (never a silent zero).
//! - vocab 1 with finite entries: KL = 0 exactly.
//!
//! Gradient entries of an unmasked row whose KL is not finite are NaN (both
//! matrices, every entry of the row); masked rows always get exact zeros.
//!
//! # Gradients
//! In the same centred terms, with m the P-mean of d, u = d − m and
//! L = log1p(β − α) after re-centring on m: ∂KL(P‖Q)/∂b_i = q_i − p_i =
//! p_i·expm1(−u_i − L) and ∂KL(P‖Q)/∂a_i = p_i·(u_i + L − KL) (divided by τ).
//! Both stay accurate when P ≈ Q, where `q − p` from two separately rounded
//! softmaxes would not; tests compare them with a mixed bound, relative where
//! an entry is large and absolute near zero (the bound above).

use super::convert::widen_into;
use super::math;
use crate::config::{KlDirection, KlOptions, Reduction};
use crate::dtype::Element;
use crate::error::{ensure, Result};
use multiversion::multiversion;
use rayon::prelude::*;

/// Elements per partial. Also the granularity of splitting one row over threads.
pub const CHUNK: usize = 512;

/// Gradient entries per parallel task when a row is split.
const GRAD_BLOCK: usize = 8192;

/// A row-major matrix of logits: `rows` rows of `vocab` values, `row_stride` apart.
#[derive(Clone, Copy, Debug)]
///
/// The fields are public for convenience; every entry point checks them again
/// as [`Logits::new`] does.
pub struct Logits<'a, T> {
    /// The elements; row `r` is `data[r * row_stride..r * row_stride + vocab]`.
    pub data: &'a [T],
    /// Number of rows (0 is allowed).
    pub rows: usize,
    /// Logits per row (the vocabulary); > 0.
    pub vocab: usize,
    /// Elements from the start of one row to the next; ≥ `vocab`. Elements
    /// between `vocab` and the stride are never read.
    pub row_stride: usize,
}

impl<'a, T: Element> Logits<'a, T> {
    /// Checks vocab > 0, stride ≥ vocab and that `data` holds every row.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) when one of
    /// those fails (including a size that overflows `usize`).
    pub fn new(data: &'a [T], rows: usize, vocab: usize, row_stride: usize) -> Result<Self> {
        let l = Self {
            data,
            rows,
            vocab,
            row_stride,
        };
        l.validate()?;
        Ok(l)
    }

    /// Rows stored back to back (stride = vocab).
    ///
    /// # Errors
    /// As [`Logits::new`].
    pub fn dense(data: &'a [T], rows: usize, vocab: usize) -> Result<Self> {
        Self::new(data, rows, vocab, vocab)
    }

    /// The fields are public, so every entry point re-checks them.
    fn validate(&self) -> Result<()> {
        ensure!(self.vocab > 0, "logits: vocab must be > 0");
        ensure!(
            self.row_stride >= self.vocab,
            "logits: row stride {} < vocab {}",
            self.row_stride,
            self.vocab
        );
        if self.rows > 0 {
            let need = (self.rows - 1)
                .checked_mul(self.row_stride)
                .and_then(|n| n.checked_add(self.vocab));
            ensure!(
                need.is_some_and(|n| n <= self.data.len()),
                "logits: {} rows × stride {} (vocab {}) need more than the {} elements given",
                self.rows,
                self.row_stride,
                self.vocab,
                self.data.len()
            );
        }
        Ok(())
    }

    fn row(&self, r: usize) -> &'a [T] {
        let start = r * self.row_stride;
        &self.data[start..start + self.vocab]
    }
}

/// Per-row divergences and their reduction.
#[derive(Clone, Debug, PartialEq)]
pub struct KlOutput {
    /// One value per row; masked rows are 0.
    pub per_row: Vec<f64>,
    /// The reduced value. For `Reduction::None` it is the sum of `per_row`.
    pub value: f64,
    /// Rows the mask lets through (all rows without a mask).
    pub unmasked_rows: usize,
    /// Every row was masked (or there are no rows): `value` is 0.
    pub all_masked: bool,
}

/// Gradients of `upstream × value`, dense `rows × vocab`, w.r.t. the original
/// (unscaled) logits.
#[derive(Clone, Debug, PartialEq)]
pub struct KlGrad {
    /// d/d(model logits b).
    pub model: Vec<f64>,
    /// d/d(target logits a), when asked for.
    pub target: Option<Vec<f64>>,
}

/// The KL divergence between `target` (P) and `model` (Q) logits.
/// See the module docs for the formulation, edge cases and error bound.
///
/// `mask`: one byte per row, nonzero = the row counts.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): invalid logits (see [`Logits::new`]), different rows or vocab
/// (strides may differ), a mask of the wrong length, a temperature that is not
/// finite and > 0.
pub fn kl_div<T: Element>(
    target: &Logits<T>,
    model: &Logits<T>,
    mask: Option<&[u8]>,
    opts: &KlOptions,
) -> Result<KlOutput> {
    let scale = check(target, model, mask, opts)?;
    let frames = row_frames(target, model, mask, opts.direction, scale);
    Ok(reduce(&frames, opts.reduction, target.vocab))
}

/// The divergence and the gradient of `upstream × value` w.r.t. the original
/// (unscaled: the 1/τ is included) model logits and, with `with_target_grad`, the
/// target logits, both dense `rows × vocab`. With `Reduction::None` the value is
/// the sum of the rows, so each row's gradient has weight 1, as with `Sum`;
/// `MeanRows` weighs 1/unmasked, `MeanElements` 1/(unmasked·vocab). Masked rows,
/// and every row when all are masked, get exact zeros; unmasked rows whose KL is
/// not finite get NaN. `upstream` is used as given (a NaN upstream gives NaN).
///
/// # Errors
/// As [`kl_div`].
pub fn kl_div_grad<T: Element>(
    target: &Logits<T>,
    model: &Logits<T>,
    mask: Option<&[u8]>,
    opts: &KlOptions,
    upstream: f64,
    with_target_grad: bool,
) -> Result<(KlOutput, KlGrad)> {
    let scale = check(target, model, mask, opts)?;
    let frames = row_frames(target, model, mask, opts.direction, scale);
    let out = reduce(&frames, opts.reduction, target.vocab);

    let (rows, vocab) = (target.rows, target.vocab);
    let n = rows.checked_mul(vocab).ok_or_else(|| {
        crate::Error::InvalidArgument("kl_div_grad: rows × vocab overflows".into())
    })?;
    let mut gm = vec![0.0f64; n];
    let mut gt = with_target_grad.then(|| vec![0.0f64; n]);
    let nu = out.unmasked_rows as f64;
    let per_row_factor = match opts.reduction {
        Reduction::None | Reduction::Sum => 1.0,
        Reduction::MeanRows => 1.0 / nu,
        Reduction::MeanElements => 1.0 / (nu * vocab as f64),
    };
    if out.unmasked_rows > 0 {
        let k = upstream * per_row_factor * scale;
        let split = rows < 2 * rayon::current_num_threads();
        let ctx = GradCtx {
            target,
            model,
            frames: &frames,
            scale,
            k,
        };
        match gt.as_mut() {
            Some(gt) => gm
                .par_chunks_mut(vocab)
                .zip(gt.par_chunks_mut(vocab))
                .enumerate()
                .for_each(|(r, (m, t))| {
                    if split {
                        m.par_chunks_mut(GRAD_BLOCK)
                            .zip(t.par_chunks_mut(GRAD_BLOCK))
                            .enumerate()
                            .for_each(|(j, (m, t))| ctx.block(r, j * GRAD_BLOCK, m, Some(t)));
                    } else {
                        ctx.block(r, 0, m, Some(t));
                    }
                }),
            None => gm.par_chunks_mut(vocab).enumerate().for_each(|(r, m)| {
                if split {
                    m.par_chunks_mut(GRAD_BLOCK)
                        .enumerate()
                        .for_each(|(j, m)| ctx.block(r, j * GRAD_BLOCK, m, None));
                } else {
                    ctx.block(r, 0, m, None);
                }
            }),
        }
    }
    Ok((
        out,
        KlGrad {
            model: gm,
            target: gt,
        },
    ))
}

/// Validates the call and returns the logit scale 1/τ.
fn check<T: Element>(
    target: &Logits<T>,
    model: &Logits<T>,
    mask: Option<&[u8]>,
    opts: &KlOptions,
) -> Result<f64> {
    target.validate()?;
    model.validate()?;
    ensure!(
        target.rows == model.rows && target.vocab == model.vocab,
        "kl_div: target is {}×{} but model is {}×{}",
        target.rows,
        target.vocab,
        model.rows,
        model.vocab
    );
    if let Some(m) = mask {
        ensure!(
            m.len() == target.rows,
            "kl_div: mask has {} entries for {} rows",
            m.len(),
            target.rows
        );
    }
    let t = opts.temperature;
    ensure!(
        t.is_finite() && t > 0.0,
        "kl_div: temperature must be finite and > 0, got {t}"
    );
    let scale = 1.0 / t as f64;
    ensure!(scale.is_finite(), "kl_div: 1/temperature overflows");
    Ok(scale)
}

/// φ(x) = expm1(−x) + x by its Taylor series, for |x| ≤ 0.5: relative error ≲ 2ε
/// (the first omitted term is < 1e-17 of x²/2).
#[inline(always)]
fn phi_series(x: f64) -> f64 {
    // 1/(j+2)! for j = 0..=15, in powers of y = −x.
    const C: [f64; 16] = [
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
        1.0 / 40320.0,
        1.0 / 362880.0,
        1.0 / 3628800.0,
        1.0 / 39916800.0,
        1.0 / 479001600.0,
        1.0 / 6227020800.0,
        1.0 / 87178291200.0,
        1.0 / 1307674368000.0,
        1.0 / 20922789888000.0,
        1.0 / 355687428096000.0,
    ];
    // Estrin's scheme: a dependency chain of 4 steps instead of Horner's 15, which
    // was the hot spot of the whole reduction. The terms fall by ≥ 6× per power of
    // y, so the regrouping costs no accuracy.
    let y = -x;
    let y2 = y * y;
    let y4 = y2 * y2;
    let y8 = y4 * y4;
    let e = |k: usize| C[2 * k] + C[2 * k + 1] * y;
    let f0 = e(0) + e(1) * y2;
    let f1 = e(2) + e(3) * y2;
    let f2 = e(4) + e(5) * y2;
    let f3 = e(6) + e(7) * y2;
    let p = (f0 + f1 * y4) + (f2 + f3 * y4) * y8;
    x * x * p
}

/// φ(x) for moderate |x| (used on reference shifts, |x| ≤ 1 there).
fn phi(x: f64) -> f64 {
    if x.abs() <= 0.5 {
        phi_series(x)
    } else {
        (-x).exp_m1() + x
    }
}

/// w·φ(x) with w = exp(la). Near 0 by the series; elsewhere with one exponent,
/// exp(la − x) − w + w·x, so a negligible w facing a huge e^{−x} is never 0·∞.
/// Both are computed and one selected: no branch, so the loop vectorises.
#[inline(always)]
fn w_phi(w: f64, la: f64, x: f64) -> f64 {
    let near = w * phi_series(x);
    let far = math::exp(la - x) - w + w * x;
    if x.abs() <= PHI_SERIES_MAX {
        near
    } else {
        far
    }
}

/// |x| up to which φ is taken from its series.
const PHI_SERIES_MAX: f64 = 0.5;

/// `a + b` as an unevaluated pair `(s, e)`: `s = fl(a + b)` and `s + e = a + b`
/// exactly (Knuth's two-sum; no branch, for any finite a and b).
#[inline(always)]
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

/// `(dh + dl) − (ch + cl)` to within about an ulp of the result, for a
/// difference d and a reference c held as two-sum pairs: `dh − ch` is exact
/// where they are close (Sterbenz) and the result's size otherwise, and the
/// low parts are subtracted exactly.
#[inline(always)]
fn centred(dh: f64, dl: f64, ch: f64, cl: f64) -> f64 {
    let t = dh - ch;
    let (u, ue) = two_sum(dl, -cl);
    (t + u) + ue
}

/// `a + b + c + d`, compensated: about one rounding of the result, however
/// large the terms that cancel (raw logits, references).
#[inline(always)]
fn sum4(a: f64, b: f64, c: f64, d: f64) -> f64 {
    let (s1, e1) = two_sum(a, b);
    let (s2, e2) = two_sum(s1, c);
    s2 + ((e1 + e2) + d)
}

/// Mergeable sums of one chunk (or a merged run of chunks) of one direction:
/// `x` plays P's logits, `y` Q's.
#[derive(Clone, Copy, Debug)]
struct Partial {
    /// max of the finite x (raw units); −∞ when there is none.
    m: f64,
    /// Reference for d = x − y, raw units, as the pair c + cl.
    c: f64,
    cl: f64,
    s: f64,
    a: f64,
    b: f64,
    /// Q mass where x = −∞ (no P mass): max raw y and Σ exp((y − rm)/τ).
    rm: f64,
    r: f64,
    /// some x finite where y = −∞.
    inf: bool,
    /// NaN or +∞ seen.
    nan: bool,
}

impl Partial {
    const EMPTY: Partial = Partial {
        m: f64::NEG_INFINITY,
        c: 0.0,
        cl: 0.0,
        s: 0.0,
        a: 0.0,
        b: 0.0,
        rm: f64::NEG_INFINITY,
        r: 0.0,
        inf: false,
        nan: false,
    };

    fn has_mass(&self) -> bool {
        self.m > f64::NEG_INFINITY
    }

    fn add_orphan(&mut self, y: f64, scale: f64) {
        if y > self.rm {
            self.r = self.r * ((self.rm - y) * scale).exp() + 1.0;
            self.rm = y;
        } else {
            self.r += ((y - self.rm) * scale).exp();
        }
    }
}

/// (rm, r) pairs combine as an online softmax.
fn merge_orphans(p: (f64, f64), q: (f64, f64), scale: f64) -> (f64, f64) {
    if q.0 == f64::NEG_INFINITY {
        return p;
    }
    if p.0 == f64::NEG_INFINITY {
        return q;
    }
    let m = p.0.max(q.0);
    (
        m,
        p.1 * ((p.0 - m) * scale).exp() + q.1 * ((q.0 - m) * scale).exp(),
    )
}

/// Moves a partial (S, A, B) whose weights get the factor f = exp(ln_f) onto a
/// reference `sh` (scaled units) further: x → x − sh.
fn moved(p: &Partial, ln_f: f64, sh: f64) -> (f64, f64, f64) {
    let f = ln_f.exp();
    let s = f * p.s;
    let a = f * (p.a - sh * p.s);
    let b = if sh == 0.0 {
        f * p.b
    } else if sh.abs() <= 1.0 {
        // e^{sh}·B − expm1(sh)·A + S·φ(−sh); A ≈ 0, so no cancellation.
        (ln_f + sh).exp() * p.b - f * sh.exp_m1() * p.a + f * p.s * phi(-sh)
    } else {
        // Same sum regrouped around Σ w·e^{−x} = B − A + S, with e^{ln f + sh}
        // formed in one exponent (f may underflow while the product does not).
        (ln_f + sh).exp() * (p.b - p.a + p.s) + f * (p.a - (1.0 + sh) * p.s)
    };
    (s, a, b)
}

/// Combines two partials of adjacent chunks (`p` left of `q`).
fn merge(p: Partial, q: Partial, scale: f64) -> Partial {
    let (rm, r) = merge_orphans((p.rm, p.r), (q.rm, q.r), scale);
    let (inf, nan) = (p.inf | q.inf, p.nan | q.nan);
    let mut out = if !q.has_mass() {
        p
    } else if !p.has_mass() {
        q
    } else {
        let (hi, lo) = if q.m > p.m { (q, p) } else { (p, q) };
        let ln_f = (lo.m - hi.m) * scale;
        let s_lo = ln_f.exp() * lo.s;
        let total = hi.s + s_lo;
        // The combined P-mean of d keeps A ≈ 0 after the merge.
        let (c, cl) = if total > 0.0 {
            let diff = (lo.c - hi.c) + (lo.cl - hi.cl);
            two_sum(hi.c, hi.cl + (s_lo / total) * diff)
        } else {
            (hi.c, hi.cl)
        };
        let shift = |p: &Partial| ((c - p.c) + (cl - p.cl)) * scale;
        let (s1, a1, b1) = moved(&hi, 0.0, shift(&hi));
        let (s2, a2, b2) = moved(&lo, ln_f, shift(&lo));
        Partial {
            m: hi.m,
            c,
            cl,
            s: s1 + s2,
            a: a1 + a2,
            b: b1 + b2,
            ..Partial::EMPTY
        }
    };
    out.rm = rm;
    out.r = r;
    out.inf = inf;
    out.nan = nan;
    out
}

/// Working arrays of [`chunk_partial`], made once per row (or per task) rather
/// than zeroed for every chunk.
struct Scratch {
    xf: [f32; CHUNK],
    yf: [f32; CHUNK],
    xv: [f64; CHUNK],
    /// d = x − y as the pair dv + lv.
    dv: [f64; CHUNK],
    lv: [f64; CHUNK],
    wv: [f64; CHUNK],
    tv: [f64; CHUNK],
}

impl Scratch {
    fn new() -> Box<Self> {
        Box::new(Self {
            xf: [0.0; CHUNK],
            yf: [0.0; CHUNK],
            xv: [0.0; CHUNK],
            dv: [0.0; CHUNK],
            lv: [0.0; CHUNK],
            wv: [0.0; CHUNK],
            tv: [0.0; CHUNK],
        })
    }
}

/// The partial of one chunk (≤ CHUNK elements) with x as P's logits.
///
/// Every loop is a plain pass over short arrays, with no calls and no branches
/// (exp is [`math::exp`], reductions keep eight lanes), so each one vectorises;
/// an AVX2 clone is picked at run time where the CPU has it (lane-wise IEEE
/// operations and the same summation order: the same bits either way).
#[multiversion(targets("x86_64+avx2"))]
fn chunk_partial<T: Element>(xs: &[T], ys: &[T], scale: f64, sc: &mut Scratch) -> Partial {
    let n = xs.len();
    debug_assert!(n <= CHUNK && ys.len() == n);
    let xf = widen_into(xs, &mut sc.xf);
    let yf = widen_into(ys, &mut sc.yf);
    let (xv, dv, lv, wv, tv) = (
        &mut sc.xv[..n],
        &mut sc.dv[..n],
        &mut sc.lv[..n],
        &mut sc.wv[..n],
        &mut sc.tv[..n],
    );
    let (finite, exact) = differences(xf, yf, xv, dv);
    if !exact || !finite {
        low_parts(xv, yf, lv);
    }
    if !finite {
        return chunk_partial_special(xv, dv, lv, ys, scale);
    }
    let m = max_of(xv);
    for i in 0..n {
        wv[i] = math::exp((xv[i] - m) * scale);
    }
    let s = sum(wv);
    // The reference: first d's rounding at the heaviest element (so dv − c0 is
    // exact, and 0 wherever d rounds alike), then the P-mean of d − c0; kept
    // as the pair c + cl, it lands on the mean of d to within a rounding of
    // the spread of d, whatever |d|, and a constant d gives x = 0.
    let c0 = dv[xv.iter().position(|&x| x == m).unwrap_or(0)];
    let (c, cl);
    if exact {
        // Every d exact in one f64 (the common case): dv − c is exact near c,
        // so one more subtraction gives x to within an ulp.
        for i in 0..n {
            tv[i] = wv[i] * (dv[i] - c0);
        }
        (c, cl) = two_sum(c0, sum(tv) / s);
        for i in 0..n {
            let x = ((dv[i] - c) - cl) * scale;
            dv[i] = x;
            tv[i] = wv[i] * x;
        }
    } else {
        for i in 0..n {
            tv[i] = wv[i] * ((dv[i] - c0) + lv[i]);
        }
        (c, cl) = two_sum(c0, sum(tv) / s);
        for i in 0..n {
            let x = centred(dv[i], lv[i], c, cl) * scale;
            dv[i] = x;
            tv[i] = wv[i] * x;
        }
    }
    let a = sum(tv);
    if max_abs_of(dv) <= PHI_SERIES_MAX {
        for i in 0..n {
            tv[i] = wv[i] * phi_series(dv[i]);
        }
    } else {
        for i in 0..n {
            tv[i] = w_phi(wv[i], (xv[i] - m) * scale, dv[i]);
        }
    }
    let b = sum(tv);
    Partial {
        m,
        c,
        cl,
        s,
        a,
        b,
        ..Partial::EMPTY
    }
}

/// `xv ← x`, `dv ← fl(x − y)` (in f64), and whether every d is finite (then x
/// and y are: d·0 is 0 exactly for finite d, NaN otherwise) and exact in one
/// f64 (true unless the exponents of some x and y lie more than ~29 binades
/// apart, for f32); eight lanes, one pass.
#[inline(always)]
fn differences(xf: &[f32], yf: &[f32], xv: &mut [f64], dv: &mut [f64]) -> (bool, bool) {
    for (((xo, d), &x), &y) in xv.iter_mut().zip(dv.iter_mut()).zip(xf).zip(yf) {
        *xo = x as f64;
        *d = x as f64 - y as f64;
    }
    // d·0 + |e| per element, with e the rounding error of d (two-sum's second
    // half): NaN where d is not finite, else 0 exactly when d is exact.
    let mut acc = [0.0f64; 8];
    let lane = |x: f64, y: f32, d: f64| {
        let bb = d - x;
        d * 0.0 + ((x - (d - bb)) + (-(y as f64) - bb)).abs()
    };
    let mut xi = xv.chunks_exact(8);
    let mut yi = yf.chunks_exact(8);
    let mut di = dv.chunks_exact(8);
    for ((x8, y8), d8) in (&mut xi).zip(&mut yi).zip(&mut di) {
        for j in 0..8 {
            acc[j] += lane(x8[j], y8[j], d8[j]);
        }
    }
    let tail = xi
        .remainder()
        .iter()
        .zip(yi.remainder())
        .zip(di.remainder());
    for (j, ((&x, &y), &d)) in tail.enumerate() {
        acc[j] += lane(x, y, d);
    }
    let total = acc.iter().sum::<f64>();
    (total.is_finite(), total == 0.0)
}

/// `lv ← x − y − fl(x − y)`, the exact low parts of the differences (where
/// [`differences`] found some non-zero).
fn low_parts(xv: &[f64], yf: &[f32], lv: &mut [f64]) {
    for ((l, &x), &y) in lv.iter_mut().zip(xv).zip(yf) {
        *l = two_sum(x, -(y as f64)).1;
    }
}

/// max over v (NaN-free here), in eight lanes; −∞ for an empty slice.
#[inline(always)]
fn max_of(v: &[f64]) -> f64 {
    lane_max(v, |x| x)
}

/// max |v|, in eight lanes.
#[inline(always)]
fn max_abs_of(v: &[f64]) -> f64 {
    lane_max(v, f64::abs)
}

#[inline(always)]
fn lane_max(v: &[f64], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [f64::NEG_INFINITY; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            let x = f(c[j]);
            acc[j] = if x > acc[j] { x } else { acc[j] };
        }
    }
    for (j, &x) in it.remainder().iter().enumerate() {
        let x = f(x);
        acc[j] = if x > acc[j] { x } else { acc[j] };
    }
    acc.iter()
        .fold(f64::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Σ v with eight interleaved accumulators (fixed order: deterministic, and the
/// error grows with n/8 rather than n).
#[inline(always)]
fn sum(v: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            acc[j] += c[j];
        }
    }
    for (j, &x) in it.remainder().iter().enumerate() {
        acc[j] += x;
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// The slow path of a chunk holding some non-finite value.
fn chunk_partial_special<T: Element>(
    xv: &[f64],
    dv: &[f64],
    lv: &[f64],
    ys: &[T],
    scale: f64,
) -> Partial {
    let mut p = Partial::EMPTY;
    // Elements with x and y finite take part in S, A, B.
    let normal = |i: usize| xv[i].is_finite() && ys[i].to_f64().is_finite();
    for (i, (&x, y)) in xv.iter().zip(ys).enumerate() {
        let y = y.to_f64();
        if x.is_nan() || y.is_nan() || x == f64::INFINITY || y == f64::INFINITY {
            p.nan = true;
        } else if x == f64::NEG_INFINITY {
            if y > f64::NEG_INFINITY {
                p.add_orphan(y, scale);
            }
        } else {
            p.m = p.m.max(x);
            if y == f64::NEG_INFINITY {
                p.inf = true;
            }
        }
        debug_assert!(!normal(i) || dv[i].is_finite());
    }
    if !p.has_mass() {
        return p;
    }
    let mut s = 0.0;
    for i in (0..xv.len()).filter(|&i| normal(i)) {
        s += math::exp((xv[i] - p.m) * scale);
    }
    if s > 0.0 {
        // As in `chunk_partial`: d at the heaviest element, then the P-mean.
        let top = (0..xv.len())
            .filter(|&i| normal(i))
            .max_by(|&i, &j| xv[i].total_cmp(&xv[j]).then(j.cmp(&i)));
        let c0 = top.map_or(0.0, |i| dv[i]);
        let r: f64 = (0..xv.len())
            .filter(|&i| normal(i))
            .map(|i| math::exp((xv[i] - p.m) * scale) * ((dv[i] - c0) + lv[i]))
            .sum();
        let (c, cl) = two_sum(c0, r / s);
        let (mut a, mut b) = (0.0, 0.0);
        for i in (0..xv.len()).filter(|&i| normal(i)) {
            let la = (xv[i] - p.m) * scale;
            let w = math::exp(la);
            let x = centred(dv[i], lv[i], c, cl) * scale;
            a += w * x;
            b += w_phi(w, la, x);
        }
        p.c = c;
        p.cl = cl;
        p.s = s;
        p.a = a;
        p.b = b;
    }
    p
}

/// Merges partials pushed left to right as a binary counter: the tree depends on
/// the count alone, so any producer order of the same list gives the same bits.
struct Tree {
    stack: [(Partial, u32); 64],
    len: usize,
    scale: f64,
}

impl Tree {
    fn new(scale: f64) -> Self {
        Self {
            stack: [(Partial::EMPTY, 0); 64],
            len: 0,
            scale,
        }
    }

    fn push(&mut self, p: Partial) {
        let (mut cur, mut level) = (p, 0u32);
        while self.len > 0 && self.stack[self.len - 1].1 == level {
            self.len -= 1;
            cur = merge(self.stack[self.len].0, cur, self.scale);
            level += 1;
        }
        self.stack[self.len] = (cur, level);
        self.len += 1;
    }

    fn finish(self) -> Partial {
        let mut acc = match self.len {
            0 => return Partial::EMPTY,
            n => self.stack[n - 1].0,
        };
        for i in (0..self.len - 1).rev() {
            acc = merge(self.stack[i].0, acc, self.scale);
        }
        acc
    }
}

/// One direction of one row, reduced to what the value and the gradient need.
#[derive(Clone, Copy, Debug)]
struct Frame {
    kl: f64,
    /// max of x (raw) and ln S: log p_i = (x_i − m)/τ − ln_s.
    m: f64,
    ln_s: f64,
    /// Reference (raw, the pair c + cl) and α = Σ p·x in that frame
    /// (x = (d − c)/τ), so that log p_i − log q_i = (x_i − α) + KL.
    c: f64,
    cl: f64,
    alpha: f64,
    /// KL before clamping at 0.
    kl_raw: f64,
}

impl Frame {
    const NAN: Frame = Frame {
        kl: f64::NAN,
        m: f64::NAN,
        ln_s: f64::NAN,
        c: f64::NAN,
        cl: f64::NAN,
        alpha: f64::NAN,
        kl_raw: f64::NAN,
    };
}

/// KL(softmax(x/τ) ‖ softmax(y/τ)) of one row.
fn side_row<T: Element>(xs: &[T], ys: &[T], scale: f64, split: bool) -> Frame {
    let n = xs.len();
    let mut tree = Tree::new(scale);
    if split && n > CHUNK {
        let parts: Vec<Partial> = xs
            .par_chunks(CHUNK)
            .zip(ys.par_chunks(CHUNK))
            .map_init(Scratch::new, |sc, (x, y)| chunk_partial(x, y, scale, sc))
            .collect();
        parts.into_iter().for_each(|p| tree.push(p));
    } else {
        let mut sc = Scratch::new();
        xs.chunks(CHUNK)
            .zip(ys.chunks(CHUNK))
            .for_each(|(x, y)| tree.push(chunk_partial(x, y, scale, &mut sc)));
    }
    finalize(tree.finish(), ys, scale)
}

fn finalize<T: Element>(p: Partial, ys: &[T], scale: f64) -> Frame {
    if p.nan || !p.has_mass() {
        return Frame::NAN;
    }
    if p.inf {
        return Frame {
            kl: f64::INFINITY,
            ..Frame::NAN
        };
    }
    let mut b = p.b;
    if p.r > 0.0 {
        // Each orphan adds w·e^{−x} = exp((y − m + c)/τ) to B and nothing else.
        b += p.r * (sum4(p.rm, -p.m, p.c, p.cl) * scale).exp();
    }
    let alpha = p.a / p.s;
    let beta = b / p.s;
    let ln_s = p.s.ln();
    // Re-centre on the P-mean (α is a rounding residue here, so this is tiny).
    let a2 = (-alpha).mul_add(p.s, p.a);
    let b2 = alpha.exp() * b - alpha.exp_m1() * p.a + p.s * phi(-alpha);
    let (alpha2, beta2) = (a2 / p.s, b2 / p.s);
    let kl = alpha2 + (beta2 - alpha2).ln_1p();
    if kl.is_finite() && beta.is_finite() {
        return Frame {
            kl: kl.max(0.0),
            m: p.m,
            ln_s,
            c: p.c,
            cl: p.cl,
            alpha,
            kl_raw: kl,
        };
    }
    // B overflowed: the logit sets disagree beyond the exponent range and KL is
    // large, so the classical form's eps·|lse| error is negligible.
    let mb = ys
        .iter()
        .map(|v| v.to_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    let sb: f64 = ys
        .iter()
        .map(|v| math::exp((v.to_f64() - mb) * scale))
        .sum();
    let l = sum4(p.c, -p.m, mb, p.cl) * scale + sb.ln() - ln_s;
    let kl = alpha + l;
    Frame {
        kl: if kl.is_nan() { kl } else { kl.max(0.0) },
        m: p.m,
        ln_s,
        c: p.c,
        cl: p.cl,
        alpha,
        kl_raw: kl,
    }
}

/// Both directions of one row (an unused direction is `None`).
#[derive(Clone, Copy, Debug)]
struct RowFrames {
    masked: bool,
    fwd: Option<Frame>,
    rev: Option<Frame>,
}

impl RowFrames {
    fn kl(&self) -> f64 {
        if self.masked {
            return 0.0;
        }
        self.fwd.map_or(0.0, |f| f.kl) + self.rev.map_or(0.0, |f| f.kl)
    }
}

fn row_frames<T: Element>(
    target: &Logits<T>,
    model: &Logits<T>,
    mask: Option<&[u8]>,
    dir: KlDirection,
    scale: f64,
) -> Vec<RowFrames> {
    // Few rows: split each row over threads as well. The merge tree is the same
    // either way, so this only changes the speed.
    let split = target.rows < 2 * rayon::current_num_threads();
    (0..target.rows)
        .into_par_iter()
        .map(|r| {
            if mask.is_some_and(|m| m[r] == 0) {
                return RowFrames {
                    masked: true,
                    fwd: None,
                    rev: None,
                };
            }
            let (a, b) = (target.row(r), model.row(r));
            let (f, rv) = match dir {
                KlDirection::Forward => (true, false),
                KlDirection::Reverse => (false, true),
                KlDirection::Symmetric => (true, true),
            };
            RowFrames {
                masked: false,
                fwd: f.then(|| side_row(a, b, scale, split)),
                rev: rv.then(|| side_row(b, a, scale, split)),
            }
        })
        .collect()
}

fn reduce(frames: &[RowFrames], reduction: Reduction, vocab: usize) -> KlOutput {
    let per_row: Vec<f64> = frames.iter().map(|f| f.kl()).collect();
    let unmasked_rows = frames.iter().filter(|f| !f.masked).count();
    // Neumaier-compensated, sequential: deterministic and accurate.
    let (mut sum, mut comp) = (0.0f64, 0.0f64);
    for &v in &per_row {
        let t = sum + v;
        comp += if sum.abs() >= v.abs() {
            (sum - t) + v
        } else {
            (v - t) + sum
        };
        sum = t;
    }
    // An infinite or NaN row makes `comp` NaN; keep the plain sum then.
    let total = if sum.is_finite() { sum + comp } else { sum };
    let n = unmasked_rows as f64;
    let value = if unmasked_rows == 0 {
        0.0
    } else {
        match reduction {
            Reduction::None | Reduction::Sum => total,
            Reduction::MeanRows => total / n,
            Reduction::MeanElements => total / (n * vocab as f64),
        }
    };
    KlOutput {
        per_row,
        value,
        unmasked_rows,
        all_masked: unmasked_rows == 0,
    }
}

struct GradCtx<'a, 'b, T> {
    target: &'b Logits<'a, T>,
    model: &'b Logits<'a, T>,
    frames: &'b [RowFrames],
    scale: f64,
    /// upstream × d(value)/d(row KL) × 1/τ.
    k: f64,
}

impl<T: Element> GradCtx<'_, '_, T> {
    /// Gradient entries [off, off + gm.len()) of row r (zeros on entry).
    fn block(&self, r: usize, off: usize, gm: &mut [f64], mut gt: Option<&mut [f64]>) {
        let f = &self.frames[r];
        if f.masked {
            return;
        }
        if !f.kl().is_finite() {
            gm.fill(f64::NAN);
            if let Some(gt) = gt {
                gt.fill(f64::NAN);
            }
            return;
        }
        let end = off + gm.len();
        let a = &self.target.row(r)[off..end];
        let b = &self.model.row(r)[off..end];
        if let Some(fr) = &f.fwd {
            // P from a: a is the x role, b the y role.
            side_grad(fr, a, b, self.scale, self.k, gt.as_deref_mut(), Some(gm));
        }
        if let Some(fr) = &f.rev {
            side_grad(fr, b, a, self.scale, self.k, Some(gm), gt);
        }
    }
}

/// Adds k·∂KL/∂(scaled x) to gx and k·∂KL/∂(scaled y) to gy, where
/// ∂KL/∂x_i = p_i·(u_i − α) and ∂KL/∂y_i = q_i − p_i = p_i·expm1(−v_i) with
/// v_i = log p_i − log q_i = (u_i − α) + KL, u_i = (d_i − c)/τ.
/// Cloned for AVX2 like [`chunk_partial`].
#[multiversion(targets("x86_64+avx2"))]
fn side_grad<T: Element>(
    fr: &Frame,
    xs: &[T],
    ys: &[T],
    scale: f64,
    k: f64,
    mut gx: Option<&mut [f64]>,
    mut gy: Option<&mut [f64]>,
) {
    let mut sc = Scratch::new();
    for start in (0..xs.len()).step_by(CHUNK) {
        let n = CHUNK.min(xs.len() - start);
        let (xb, yb) = (&xs[start..start + n], &ys[start..start + n]);
        let xf = widen_into(xb, &mut sc.xf);
        let yf = widen_into(yb, &mut sc.yf);
        let (xv, dv, lv) = (&mut sc.xv[..n], &mut sc.dv[..n], &mut sc.lv[..n]);
        let (finite, exact) = differences(xf, yf, xv, dv);
        let gxb = gx.as_deref_mut().map(|g| &mut g[start..start + n]);
        let gyb = gy.as_deref_mut().map(|g| &mut g[start..start + n]);
        if !finite {
            side_grad_special(fr, xb, yb, scale, k, gxb, gyb);
            continue;
        }
        if !exact {
            low_parts(xv, yf, lv);
        }
        // lp = log p, then d becomes u = (d − c)/τ (as in `chunk_partial`).
        for x in xv.iter_mut() {
            *x = (*x - fr.m) * scale - fr.ln_s;
        }
        if exact {
            for d in dv.iter_mut() {
                *d = ((*d - fr.c) - fr.cl) * scale;
            }
        } else {
            for i in 0..n {
                dv[i] = centred(dv[i], lv[i], fr.c, fr.cl) * scale;
            }
        }
        if let Some(g) = gxb {
            for i in 0..n {
                g[i] += k * (math::exp(xv[i]) * (dv[i] - fr.alpha));
            }
        }
        if let Some(g) = gyb {
            for i in 0..n {
                // Relative to the true P-mean, so a reference c rounded at ε·|c|
                // cancels out of v exactly.
                let v = (dv[i] - fr.alpha) + fr.kl_raw;
                let p = math::exp(xv[i]);
                // Near 0: expm1(−v) = φ(v) − v. Elsewhere q − p with q in one
                // exponent (≤ 4ε relative for |v| > 0.5, and no 0·∞ when p is
                // negligible but q is not). Both formed, one selected: no branch.
                let near = p * (phi_series(v) - v);
                let far = math::exp(xv[i] - v) - p;
                g[i] += k * if v.abs() <= PHI_SERIES_MAX { near } else { far };
            }
        }
    }
}

/// The scalar path for a block holding some −∞ (a row with NaN or +∞ never gets here).
fn side_grad_special<T: Element>(
    fr: &Frame,
    xs: &[T],
    ys: &[T],
    scale: f64,
    k: f64,
    mut gx: Option<&mut [f64]>,
    mut gy: Option<&mut [f64]>,
) {
    for i in 0..xs.len() {
        let x = xs[i].to_f64();
        let y = ys[i].to_f64();
        if x == f64::NEG_INFINITY {
            // p = 0: only Q mass, which y carries.
            if let Some(gy) = gy.as_deref_mut() {
                if y > f64::NEG_INFINITY {
                    let l = fr.kl_raw - fr.alpha;
                    let e = sum4(y, -fr.m, fr.c, fr.cl) * scale;
                    gy[i] += k * math::exp(e - fr.ln_s - l);
                }
            }
            continue;
        }
        let lp = (x - fr.m) * scale - fr.ln_s;
        let p = math::exp(lp);
        let (dh, dl) = two_sum(x, -y);
        let u = centred(dh, dl, fr.c, fr.cl) * scale;
        if let Some(gx) = gx.as_deref_mut() {
            gx[i] += k * (p * (u - fr.alpha));
        }
        if let Some(gy) = gy.as_deref_mut() {
            let v = (u - fr.alpha) + fr.kl_raw;
            let g = if v >= -30.0 {
                p * (-v).exp_m1()
            } else {
                math::exp(lp - v) - p
            };
            gy[i] += k * g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_series_is_accurate() {
        for i in 1..=1000 {
            let x0 = 0.5 * i as f64 / 1000.0;
            for x in [x0, -x0, x0 * 1e-3, -x0 * 1e-6] {
                let got = phi_series(x);
                // Reference: expm1 where its cancellation is mild (|x| ≥ 0.1,
                // ≤ 20ε), else the series summed term by term to 40 terms.
                let want = if x.abs() >= 0.1 {
                    (-x).exp_m1() + x
                } else {
                    let (mut t, mut s) = (x * x / 2.0, 0.0f64);
                    for k in 3..43 {
                        s += t;
                        t *= -x / k as f64;
                    }
                    s
                };
                let tol = if x.abs() >= 0.1 { 32.0 } else { 4.0 } * f64::EPSILON;
                assert!((got - want).abs() <= tol * want, "{x}: {got:e} {want:e}");
            }
        }
    }
}
