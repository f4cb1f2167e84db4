//! TRAM's second step on the CPU: restore θ from the pre-perturbation copy and
//! apply the base optimizer (AdamW or SGD with momentum) in the same pass.
//!
//! The weights the update starts from are read from the backup (or the f32
//! master weights), never from the perturbed θ, so the restore costs nothing
//! extra. Arithmetic is f64 with every operation in a fixed order and no fused
//! multiply-add; the CUDA kernel (`kernels/optimizer.cu`) performs the very same
//! f64 operations with explicitly rounded intrinsics, so both backends store
//! identical bits for finite values. NaN inputs (θ, g, m or v) give NaN in the
//! same elements on both, but a GPU writes the canonical NaN where the CPU
//! keeps an input's payload (`tests/nan_inputs.rs`); a TRAM step skips the
//! update of an iteration with a non-finite gradient. Results are rounded once
//! to the f32 state / master, and the working copy is rounded from that f32
//! value.
//!
//! Error bound against torch's algorithm evaluated in exact (f64) arithmetic on
//! the same inputs: every f32 output of one step is within 2⁻²⁴ relative
//! (half an ulp from the final rounding, plus a few f64 ulps); a bf16/f16
//! working copy adds half an ulp of its type. Over several steps the stored f32
//! state feeds the next step, as in torch; `tests/optimizer.rs` checks 1e-6
//! relative per step and a term-magnitude-relative 1e-6 over free-running steps.
//!
//! Gradients may be loss-scaled (AMP): the update uses s·g with s the inverse
//! scale ([`FusedOptimizer::set_inv_scale`]), formed in f64, where the product
//! of two f32 is exact, so s = 1 changes no bit. [`grads_overflow`] is AMP's
//! found-inf check, which a TRAM step runs before its update.
//!
//! Differences from torch: the step count is per group (torch keeps one per
//! tensor; they differ only for tensors that skip steps), AMSGrad and
//! `maximize` are not supported.

use rayon::prelude::*;

use crate::config::{validate_lr, BaseOptimizer, StepCounter};
use crate::cpu::ema::{ema_element, validate_lambda};
use crate::dtype::Element;
use crate::error::{ensure, Result};

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

/// Where the update reads θ from and where it writes the result.
#[derive(Debug)]
pub enum Weights<'a, P> {
    /// θ is read from `backup` (the copy taken before the perturbation) and
    /// the updated θ written to `param` (which holds the perturbed θ).
    Restore {
        /// θ as it was before the perturbation; read.
        backup: &'a [P],
        /// The perturbed θ; overwritten with the updated θ.
        param: &'a mut [P],
    },
    /// f32 master weights are both the backup and the updated weights; the
    /// working copy `param` receives the updated master rounded to `P`.
    Master {
        /// The f32 master weights; read and updated in place.
        master: &'a mut [f32],
        /// The working copy (e.g. bf16); overwritten with the updated master,
        /// rounded to nearest even.
        param: &'a mut [P],
    },
    /// θ is read from `param` and the updated θ written there: no restore (a
    /// step without perturbation, or after an out-of-place one).
    InPlace {
        /// θ; read and updated in place.
        param: &'a mut [P],
    },
}

/// One tensor of the update: weights, gradient, optimizer state.
#[derive(Debug)]
pub struct UpdateTensor<'a, P, G> {
    /// Where θ comes from and where the result goes.
    pub weights: Weights<'a, P>,
    /// `None`: no gradient this step (torch's `p.grad is None`): θ is restored
    /// and neither θ nor the state is updated.
    pub grad: Option<&'a [G]>,
    /// AdamW's first moment, or SGD's momentum buffer (may be empty for SGD
    /// without momentum).
    pub m: &'a mut [f32],
    /// AdamW's second moment (may be empty for SGD).
    pub v: &'a mut [f32],
    /// Whether weight decay applies to this tensor (frameworks exempt
    /// LayerNorm weights and biases).
    pub weight_decay: bool,
}

impl<P: Element, G: Element> UpdateTensor<'_, P, G> {
    fn len(&self) -> usize {
        match &self.weights {
            Weights::Restore { param, .. }
            | Weights::Master { param, .. }
            | Weights::InPlace { param } => param.len(),
        }
    }

    fn validate(&self, i: usize, opt: &BaseOptimizer) -> Result<()> {
        let n = self.len();
        match &self.weights {
            Weights::Restore { backup, .. } => ensure!(
                backup.len() == n,
                "tensor {i}: backup has {} elements, param {n}",
                backup.len()
            ),
            Weights::Master { master, .. } => ensure!(
                master.len() == n,
                "tensor {i}: master has {} elements, param {n}",
                master.len()
            ),
            Weights::InPlace { .. } => {}
        }
        if let Some(g) = self.grad {
            ensure!(
                g.len() == n,
                "tensor {i}: grad has {} elements, param {n}",
                g.len()
            );
        }
        if opt.uses_m() {
            ensure!(
                self.m.len() == n,
                "tensor {i}: m has {} elements, param {n}",
                self.m.len()
            );
        }
        if opt.uses_v() {
            ensure!(
                self.v.len() == n,
                "tensor {i}: v has {} elements, param {n}",
                self.v.len()
            );
        }
        Ok(())
    }
}

/// The per-step constants of one tensor's update, in f64. The CUDA kernel
/// derives the same values by the same operations in every thread.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Scalars {
    AdamW {
        /// 1 − lr·λ, or exactly 1 when the tensor has no weight decay.
        decay: f64,
        b1: f64,
        omb1: f64,
        b2: f64,
        omb2: f64,
        /// lr / (1 − β1ᵗ)
        step_size: f64,
        /// 1 / sqrt(1 − β2ᵗ)
        inv_sqrt_bc2: f64,
        eps: f64,
        decays: bool,
    },
    Sgd {
        lr: f64,
        /// λ, or 0 when the tensor has no weight decay.
        wd: f64,
        mu: f64,
        /// 1 − dampening
        omd: f64,
        first: bool,
        nesterov: bool,
    },
}

impl Scalars {
    pub(crate) fn new(opt: &BaseOptimizer, lr: f32, c: &StepCounter, decays: bool) -> Self {
        let lr = lr as f64;
        match *opt {
            BaseOptimizer::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let b1 = beta1 as f64;
                let b2 = beta2 as f64;
                Scalars::AdamW {
                    decay: 1.0 - lr * weight_decay as f64,
                    b1,
                    omb1: 1.0 - b1,
                    b2,
                    omb2: 1.0 - b2,
                    step_size: lr / (1.0 - c.beta1_pow),
                    inv_sqrt_bc2: 1.0 / (1.0 - c.beta2_pow).sqrt(),
                    eps: eps as f64,
                    decays,
                }
            }
            BaseOptimizer::Sgd {
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => Scalars::Sgd {
                lr,
                wd: if decays { weight_decay as f64 } else { 0.0 },
                mu: momentum as f64,
                omd: 1.0 - dampening as f64,
                first: c.t == 1,
                nesterov,
            },
        }
    }

    /// One element: θ (already restored), g, and the state; returns the new θ.
    /// `m` and `v` are updated in place (rounded to f32); θ uses the unrounded
    /// f64 moments.
    #[inline]
    pub(crate) fn apply(&self, theta: f64, g: f64, m: &mut f32, v: &mut f32) -> f64 {
        match *self {
            Scalars::AdamW {
                decay,
                b1,
                omb1,
                b2,
                omb2,
                step_size,
                inv_sqrt_bc2,
                eps,
                decays,
            } => {
                let theta = if decays { theta * decay } else { theta };
                let m64 = b1 * (*m as f64) + omb1 * g;
                let v64 = b2 * (*v as f64) + omb2 * (g * g);
                let denom = v64.sqrt() * inv_sqrt_bc2 + eps;
                *m = m64 as f32;
                *v = v64 as f32;
                theta - step_size * (m64 / denom)
            }
            Scalars::Sgd {
                lr,
                wd,
                mu,
                omd,
                first,
                nesterov,
            } => {
                let g = if wd != 0.0 { g + wd * theta } else { g };
                let d = if mu != 0.0 {
                    let buf = if first { g } else { mu * (*m as f64) + omd * g };
                    *m = buf as f32;
                    if nesterov {
                        g + mu * buf
                    } else {
                        buf
                    }
                } else {
                    g
                };
                theta - lr * d
            }
        }
    }
}

/// The base optimizer with its learning rate and step count: the CPU twin of
/// `cuda::optimizer::FusedOptimizer`.
#[derive(Clone, Debug)]
pub struct FusedOptimizer {
    opt: BaseOptimizer,
    lr: f32,
    inv_scale: f32,
    counter: StepCounter,
}

impl FusedOptimizer {
    /// Validates `opt` and `lr`; the step count starts at 0, the inverse
    /// loss scale at 1.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) from [`BaseOptimizer::validate`] or for a negative or non-finite lr.
    pub fn new(opt: BaseOptimizer, lr: f32) -> Result<Self> {
        opt.validate()?;
        validate_lr(lr)?;
        Ok(Self {
            opt,
            lr,
            inv_scale: 1.0,
            counter: StepCounter::at(&opt, 0),
        })
    }

    /// The inverse loss scale s (the update uses s·g).
    pub fn inv_scale(&self) -> f32 {
        self.inv_scale
    }

    /// Sets s from the next step on; finite and > 0.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) otherwise, nothing changed.
    pub fn set_inv_scale(&mut self, inv_scale: f32) -> Result<()> {
        crate::config::validate_inv_scale(inv_scale)?;
        self.inv_scale = inv_scale;
        Ok(())
    }

    /// Sets the step count and β powers as saved by [`FusedOptimizer::counter`]
    /// (a bit-identical resume).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for β powers outside [0, 1], nothing changed.
    pub fn set_counter(&mut self, counter: StepCounter) -> Result<()> {
        counter.validate()?;
        self.counter = counter;
        Ok(())
    }

    /// The base optimizer and its hyperparameters.
    pub fn config(&self) -> &BaseOptimizer {
        &self.opt
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f32 {
        self.lr
    }

    /// Changes the learning rate from the next step on.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a negative or non-finite lr, nothing changed.
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        validate_lr(lr)?;
        self.lr = lr;
        Ok(())
    }

    /// Steps applied so far.
    pub fn step_count(&self) -> u64 {
        self.counter.t
    }

    /// The full counter (t and the bias-correction powers).
    pub fn counter(&self) -> StepCounter {
        self.counter
    }

    /// Sets the step count (resuming from a checkpoint) with the β powers of
    /// [`StepCounter::at`] (fast for any t; see there for the bits).
    pub fn set_step_count(&mut self, t: u64) {
        self.counter = StepCounter::at(&self.opt, t);
    }

    /// Advances the step count and, for every tensor, restores θ from its
    /// backup (or master) and applies the update. Validates every tensor
    /// before touching any. Moves 28 bytes per f32 parameter with AdamW
    /// (backup, g, m and v read; θ, m and v written).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument), nothing written: an empty group, or a tensor whose backup,
    /// master, gradient, m or v length differs from its parameter's (m and v
    /// are checked only where the optimizer keeps them).
    pub fn step<P: Element, G: Element>(
        &mut self,
        tensors: &mut [UpdateTensor<'_, P, G>],
    ) -> Result<()> {
        ensure!(!tensors.is_empty(), "the update group is empty");
        for (i, t) in tensors.iter().enumerate() {
            t.validate(i, &self.opt)?;
        }
        self.counter.advance(&self.opt);
        for t in tensors.iter_mut() {
            let s = Scalars::new(&self.opt, self.lr, &self.counter, t.weight_decay);
            update_tensor::<P, G, f32>(&s, &self.opt, self.inv_scale, t, None);
        }
        Ok(())
    }

    /// [`FusedOptimizer::step`] with TRAM-θ's target θ̄ ← λ·θ̄ + (1−λ)·θ
    /// updated in the same pass: `targets[i]` follows tensor i's new θ, read
    /// as `source` says. Bit for bit the results of `step` followed by
    /// [`ema_update`](crate::cpu::ema::ema_update) over (θ̄, the parameters or
    /// the masters), as `cuda::optimizer::FusedOptimizer::step_with_target`.
    /// λ = 1 leaves θ̄ untouched. Validates everything before writing.
    ///
    /// # Errors
    /// As [`FusedOptimizer::step`], and λ outside [0, 1], a target count
    /// other than the tensor count, or a target whose length differs from its
    /// tensor's.
    pub fn step_with_target<P: Element, G: Element, T: Element>(
        &mut self,
        tensors: &mut [UpdateTensor<'_, P, G>],
        targets: &mut [&mut [T]],
        lambda: f32,
        source: EmaSource,
    ) -> Result<()> {
        validate_lambda(lambda)?;
        ensure!(!tensors.is_empty(), "the update group is empty");
        ensure!(
            targets.len() == tensors.len(),
            "{} targets for {} tensors",
            targets.len(),
            tensors.len()
        );
        for (i, (t, x)) in tensors.iter().zip(targets.iter()).enumerate() {
            t.validate(i, &self.opt)?;
            ensure!(
                x.len() == t.len(),
                "tensor {i}: target has {} elements, param {}",
                x.len(),
                t.len()
            );
            ensure!(
                source == EmaSource::Param || matches!(t.weights, Weights::Master { .. }),
                "tensor {i}: the EMA reads master weights but the tensor has none"
            );
        }
        self.counter.advance(&self.opt);
        let from_master = source == EmaSource::Master;
        for (t, x) in tensors.iter_mut().zip(targets.iter_mut()) {
            let s = Scalars::new(&self.opt, self.lr, &self.counter, t.weight_decay);
            let ema = (lambda != 1.0).then_some(Ema {
                target: x,
                lambda,
                from_master,
            });
            update_tensor(&s, &self.opt, self.inv_scale, t, ema);
        }
        Ok(())
    }

    /// A TRAM step's update, validated by the caller: when `skip`, only the
    /// restore (θ from the backup, the working copy from the master; nothing
    /// else written, the count not advanced), else the update with the
    /// targets following the new θ (`lambda` 1: untouched).
    pub(crate) fn step_unchecked<P: Element, G: Element, T: Element>(
        &mut self,
        tensors: &mut [UpdateTensor<'_, P, G>],
        targets: Option<&mut [&mut [T]]>,
        lambda: f32,
        from_master: bool,
        skip: bool,
    ) {
        if skip {
            for t in tensors.iter_mut() {
                restore_only(t);
            }
            return;
        }
        self.counter.advance(&self.opt);
        match targets {
            Some(targets) => {
                for (t, x) in tensors.iter_mut().zip(targets.iter_mut()) {
                    let s = Scalars::new(&self.opt, self.lr, &self.counter, t.weight_decay);
                    let ema = (lambda != 1.0).then_some(Ema {
                        target: x,
                        lambda,
                        from_master,
                    });
                    update_tensor(&s, &self.opt, self.inv_scale, t, ema);
                }
            }
            None => {
                for t in tensors.iter_mut() {
                    let s = Scalars::new(&self.opt, self.lr, &self.counter, t.weight_decay);
                    update_tensor::<P, G, f32>(&s, &self.opt, self.inv_scale, t, None);
                }
            }
        }
    }
}

/// θ back from the backup, or the working copy from the master; nothing else.
fn restore_only<P: Element, G: Element>(t: &mut UpdateTensor<'_, P, G>) {
    match &mut t.weights {
        Weights::Restore { backup, param } => param
            .par_chunks_mut(CHUNK)
            .zip(backup.par_chunks(CHUNK))
            .for_each(|(p, b)| p.copy_from_slice(b)),
        Weights::Master { master, param } => param
            .par_chunks_mut(CHUNK)
            .zip(master.par_chunks(CHUNK))
            .for_each(|(p, w)| {
                for (p, w) in p.iter_mut().zip(w) {
                    *p = P::from_f32(*w);
                }
            }),
        Weights::InPlace { .. } => {}
    }
}

/// AMP's found-inf check over the gradients present: whether some s·g
/// (formed in f64, where it is exact) is inf, NaN or at least 2⁶⁴ in
/// magnitude, beyond which its square, AdamW's second moment, overflows f32.
/// It reads every gradient once (4 bytes per f32 element, 2 per f16/bf16);
/// a TRAM step runs it before the update and skips the update when it finds
/// one, as PyTorch's GradScaler skips `optimizer.step()`.
pub fn grads_overflow<G: Element>(grads: &[Option<&[G]>], inv_scale: f32) -> bool {
    let s = inv_scale as f64;
    grads.iter().flatten().any(|g| {
        g.par_chunks(CHUNK)
            .any(|c| c.iter().any(|x| overflows(s * x.to_f64())))
    })
}

/// |s·g| at or above this counts as an overflow (`TRAM_GRAD_LIMIT`).
pub const GRAD_LIMIT: f64 = 18446744073709551616.0; // 2^64

/// Inf, NaN, or |x| at or above [`GRAD_LIMIT`].
#[inline]
fn overflows(x: f64) -> bool {
    x.abs().partial_cmp(&GRAD_LIMIT) != Some(std::cmp::Ordering::Less)
}

/// Which new θ a fused EMA target follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EmaSource {
    /// The working parameters as stored (rounded to their type).
    Param,
    /// The f32 master weights (master mode only).
    Master,
}

/// A fused EMA target for one tensor.
struct Ema<'a, T> {
    target: &'a mut [T],
    lambda: f32,
    from_master: bool,
}

/// θ̄ ← λ·θ̄ + (1−λ)·x for one element, as `ema_update` (and the kernels).
#[inline]
fn ema_one<T: Element>(t: &mut T, x: f32, lambda: f32) {
    *t = if lambda == 0.0 {
        T::from_f32(x)
    } else {
        T::from_f32(ema_element(lambda, t.to_f64(), x as f64))
    };
}

/// Splits `s` into `n_chunks` pieces of `CHUNK`, or `n_chunks` empty slices
/// when `s` is empty (an unused state buffer).
fn chunks_or_empty<T>(s: &mut [T], n_chunks: usize) -> Vec<&mut [T]> {
    if s.is_empty() {
        (0..n_chunks).map(|_| <&mut [T]>::default()).collect()
    } else {
        s.chunks_mut(CHUNK).collect()
    }
}

fn update_tensor<P: Element, G: Element, T: Element>(
    s: &Scalars,
    opt: &BaseOptimizer,
    scale: f32,
    t: &mut UpdateTensor<'_, P, G>,
    ema: Option<Ema<'_, T>>,
) {
    let scale = scale as f64;
    let n = t.len();
    if n == 0 {
        return;
    }
    let n_chunks = n.div_ceil(CHUNK);
    let ms = chunks_or_empty(if opt.uses_m() { &mut *t.m } else { &mut [] }, n_chunks);
    let vs = chunks_or_empty(if opt.uses_v() { &mut *t.v } else { &mut [] }, n_chunks);
    let (lambda, from_master) = ema
        .as_ref()
        .map_or((1.0, false), |e| (e.lambda, e.from_master));
    let xs = chunks_or_empty(ema.map_or(&mut [][..], |e| e.target), n_chunks);
    let grad = t.grad;
    match &mut t.weights {
        Weights::Restore { backup, param } => {
            param
                .par_chunks_mut(CHUNK)
                .zip(backup.par_chunks(CHUNK))
                .zip(ms.into_par_iter().zip(vs))
                .zip(xs)
                .enumerate()
                .for_each(|(c, (((p, b), (m, v)), x))| {
                    let Some(grad) = grad else {
                        p.copy_from_slice(b);
                        for (x, b) in x.iter_mut().zip(b.iter()) {
                            ema_one(x, b.to_f32(), lambda);
                        }
                        return;
                    };
                    let g = &grad[c * CHUNK..c * CHUNK + p.len()];
                    for i in 0..p.len() {
                        let (mi, vi) = (m.get_mut(i), v.get_mut(i));
                        let th = element(s, b[i].to_f64(), scale * g[i].to_f64(), mi, vi);
                        p[i] = P::from_f32(th);
                    }
                    // The chunk is still in cache: one pass over memory.
                    for (x, p) in x.iter_mut().zip(p.iter()) {
                        ema_one(x, p.to_f32(), lambda);
                    }
                });
        }
        Weights::Master { master, param } => {
            param
                .par_chunks_mut(CHUNK)
                .zip(master.par_chunks_mut(CHUNK))
                .zip(ms.into_par_iter().zip(vs))
                .zip(xs)
                .enumerate()
                .for_each(|(c, (((p, w), (m, v)), x))| {
                    let Some(grad) = grad else {
                        for (p, w) in p.iter_mut().zip(w.iter()) {
                            *p = P::from_f32(*w);
                        }
                        for ((x, p), w) in x.iter_mut().zip(p.iter()).zip(w.iter()) {
                            ema_one(x, if from_master { *w } else { p.to_f32() }, lambda);
                        }
                        return;
                    };
                    let g = &grad[c * CHUNK..c * CHUNK + p.len()];
                    for i in 0..p.len() {
                        let (mi, vi) = (m.get_mut(i), v.get_mut(i));
                        let th = element(s, w[i] as f64, scale * g[i].to_f64(), mi, vi);
                        w[i] = th;
                        p[i] = P::from_f32(th);
                    }
                    for ((x, p), w) in x.iter_mut().zip(p.iter()).zip(w.iter()) {
                        ema_one(x, if from_master { *w } else { p.to_f32() }, lambda);
                    }
                });
        }
        Weights::InPlace { param } => {
            param
                .par_chunks_mut(CHUNK)
                .zip(ms.into_par_iter().zip(vs))
                .zip(xs)
                .enumerate()
                .for_each(|(c, ((p, (m, v)), x))| {
                    if let Some(grad) = grad {
                        let g = &grad[c * CHUNK..c * CHUNK + p.len()];
                        for i in 0..p.len() {
                            let (mi, vi) = (m.get_mut(i), v.get_mut(i));
                            let th = element(s, p[i].to_f64(), scale * g[i].to_f64(), mi, vi);
                            p[i] = P::from_f32(th);
                        }
                    }
                    for (x, p) in x.iter_mut().zip(p.iter()) {
                        ema_one(x, p.to_f32(), lambda);
                    }
                });
        }
    }
}

/// One element, with possibly absent state (SGD without momentum): returns
/// the new θ rounded to f32.
#[inline]
fn element(s: &Scalars, theta: f64, g: f64, m: Option<&mut f32>, v: Option<&mut f32>) -> f32 {
    let mut m0 = 0.0f32;
    let mut v0 = 0.0f32;
    let m = m.unwrap_or(&mut m0);
    let v = v.unwrap_or(&mut v0);
    s.apply(theta, g, m, v) as f32
}
