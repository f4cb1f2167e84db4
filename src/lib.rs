//! # tram-kernels
//!
//! CUDA kernels for one step of TRAM (Trust Region Aware Minimization;
//! Sherborne et al., ICLR 2024) over a framework's own device buffers, and a
//! rayon CPU reference with the same semantics that the GPU tests check against.
//!
//! Each operation has three files with one stem: the kernel in `kernels/<op>.cu`,
//! its launcher in `src/cuda/<op>.rs`, and its reference in `src/cpu/<op>.rs`.
//! [`step`] puts them together as one step API, the same on both backends:
//! [`cpu::step::TramStep`] and [`cuda::step::TramStep`] implement [`Tram`].
//!
//! # A TRAM-θ training loop
//!
//! TRAM perturbs the weights by ε = ρ·g/‖g‖ with a radius ρ = δ·d set by the
//! divergence d = KL(target ‖ model) between the logits of a target model
//! and the model's own, takes the gradient there, and updates the weights
//! from where they were with it. TRAM-θ's target is an exponential moving
//! average of past weights, which the step keeps up to date. Per iteration:
//!
//! 1. forward and backward at θ: the gradient g₁, the model's logits, and
//!    the target's logits (a forward of the target weights θ̄);
//! 2. [`Tram::first_step`]: d, ρ = δ·d, ‖g₁‖, and θ ← θ + ε (θ backed up);
//! 3. forward and backward at θ + ε: the gradient g₂;
//! 4. [`Tram::second_step`]: θ restored, the base optimizer (AdamW or SGD)
//!    applied with g₂, and θ̄ ← λ·θ̄ + (1−λ)·θ.
//!
//! The model's tensors are described to the step with every role they play
//! (see [`step`]): here one weight matrix, with its gradient, backup, AdamW's
//! moments and the target. A softmax regression trained on the CPU backend:
//!
//! ```
//! use tram_kernels::cpu::kl_div::Logits;
//! use tram_kernels::cpu::step::{Perturbation, Tensor, TramStep};
//! use tram_kernels::{BaseOptimizer, Geometry, KlOptions, Tram, TramConfig, TramVariant};
//!
//! const D: usize = 4; // features
//! const C: usize = 3; // classes
//! const N: usize = 12; // samples
//!
//! // Fixed data: features x (N×D) and labels y.
//! let x: Vec<f32> = (0..N * D).map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0).collect();
//! let y: Vec<usize> = (0..N).map(|i| i % C).collect();
//!
//! // Logits z = x·W (N×C) for the weights w (D×C).
//! let logits = |w: &[f32]| -> Vec<f32> {
//!     let mut z = vec![0.0f32; N * C];
//!     for i in 0..N {
//!         for c in 0..C {
//!             z[i * C + c] = (0..D).map(|k| x[i * D + k] * w[k * C + c]).sum();
//!         }
//!     }
//!     z
//! };
//! // Mean cross-entropy and its gradient: what a framework's backward gives.
//! let backward = |w: &[f32], g: &mut [f32]| -> f32 {
//!     let z = logits(w);
//!     g.fill(0.0);
//!     let mut loss = 0.0;
//!     for i in 0..N {
//!         let row = &z[i * C..(i + 1) * C];
//!         let max = row.iter().cloned().fold(f32::MIN, f32::max);
//!         let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
//!         loss -= row[y[i]] - max - sum.ln();
//!         for c in 0..C {
//!             let p = (row[c] - max).exp() / sum - (c == y[i]) as u8 as f32;
//!             for k in 0..D {
//!                 g[k * C + c] += p * x[i * D + k] / N as f32;
//!             }
//!         }
//!     }
//!     loss / N as f32
//! };
//!
//! // The buffers of every role, and their description.
//! let mut w = vec![0.01f32; D * C];
//! let mut g = vec![0.0f32; D * C];
//! let mut backup = vec![0.0f32; D * C];
//! let (mut m, mut v) = (vec![0.0f32; D * C], vec![0.0f32; D * C]);
//! let mut target = w.clone();
//! fn describe<'a>(
//!     w: &'a mut [f32],
//!     g: &'a [f32],
//!     backup: &'a mut [f32],
//!     m: &'a mut [f32],
//!     v: &'a mut [f32],
//!     target: &'a mut [f32],
//! ) -> [Tensor<'a, f32>; 1] {
//!     [Tensor {
//!         param: w,
//!         grad: Some(g),
//!         perturbation: Perturbation::Backup(backup),
//!         m: Some(m),
//!         v: Some(v),
//!         target: Some(target),
//!         weight_decay: true,
//!     }]
//! }
//!
//! let cfg = TramConfig {
//!     delta: 0.5, // ρ = δ·d
//!     geometry: Geometry::Sam,
//!     kl: KlOptions::default(),
//!     variant: TramVariant::Theta { lambda: 0.9 },
//!     optimizer: BaseOptimizer::adamw(0.01),
//!     lr: 0.05,
//! };
//! let mut step = TramStep::<f32>::new(cfg, &describe(&mut w, &g, &mut backup, &mut m, &mut v, &mut target))?;
//!
//! let first_loss = backward(&w, &mut g);
//! let mut loss = first_loss;
//! for _ in 0..60 {
//!     // 1. Forward and backward at θ (g₁), the model's and the target's logits.
//!     loss = backward(&w, &mut g);
//!     let (zm, zt) = (logits(&w), logits(&target));
//!     // 2. The first step: θ ← θ + ε, ρ = δ·KL(target ‖ model).
//!     step.first_step(
//!         &mut describe(&mut w, &g, &mut backup, &mut m, &mut v, &mut target),
//!         &Logits::dense(&zt, N, C)?,
//!         &Logits::dense(&zm, N, C)?,
//!         None,
//!     )?;
//!     // 3. Backward at θ + ε (w holds it now): g₂.
//!     backward(&w, &mut g);
//!     // 4. Restore, AdamW with g₂, the target's EMA.
//!     step.second_step(&mut describe(&mut w, &g, &mut backup, &mut m, &mut v, &mut target))?;
//! }
//! assert!(loss < 0.8 * first_loss, "{first_loss} -> {loss}");
//! assert_eq!(step.step_count()?, 60);
//! # Ok::<(), tram_kernels::Error>(())
//! ```
//!
//! Calls out of order are refused: a second step without a first, or a first
//! step while θ is perturbed, is an `Err` that says what to call, and nothing
//! is written. [`Tram::base_step`] is an iteration without perturbation (for
//! SAM every k steps: the base optimizer at θ, the target upkeep included).
//!
//! # The same loop on CUDA
//!
//! Only the types change: the buffers are device memory, described by
//! address ([`cuda::buffer::DevRef`], [`cuda::buffer::DevMut`], from cudarc
//! slices or a framework's raw pointers), and the step launches on the
//! backend's stream. A loop written against [`Tram`] runs on either backend;
//! the crate's tests run one generic loop on both.
//!
//! ```no_run
//! use cudarc::driver::CudaSlice;
//! use tram_kernels::cuda::buffer::{DevMut, DevRef};
//! use tram_kernels::cuda::kl_div::DeviceLogits;
//! use tram_kernels::cuda::step::{Perturbation, Tensor, TramStep};
//! use tram_kernels::cuda::CudaBackend;
//! use tram_kernels::{BaseOptimizer, Geometry, KlOptions, Tram, TramConfig, TramVariant};
//!
//! # fn forward_backward(_w: &CudaSlice<f32>, _g: &mut CudaSlice<f32>, _z: &mut CudaSlice<f32>) {}
//! # fn forward(_w: &CudaSlice<f32>, _z: &mut CudaSlice<f32>) {}
//! # fn main() -> tram_kernels::Result<()> {
//! let (n, rows, vocab) = (4096, 8, 1000);
//! let gpu = CudaBackend::new(0)?;
//! let s = gpu.stream();
//! let mut w = s.clone_htod(&vec![0.01f32; n])?;
//! let mut g = s.alloc_zeros::<f32>(n)?;
//! let mut backup = s.alloc_zeros::<f32>(n)?;
//! let (mut m, mut v) = (s.alloc_zeros::<f32>(n)?, s.alloc_zeros::<f32>(n)?);
//! let mut target = s.clone_htod(&vec![0.01f32; n])?;
//! let (mut zm, mut zt) = (s.alloc_zeros::<f32>(rows * vocab)?, s.alloc_zeros::<f32>(rows * vocab)?);
//! fn describe<'a>(
//!     w: &'a mut CudaSlice<f32>,
//!     g: &'a CudaSlice<f32>,
//!     backup: &'a mut CudaSlice<f32>,
//!     m: &'a mut CudaSlice<f32>,
//!     v: &'a mut CudaSlice<f32>,
//!     target: &'a mut CudaSlice<f32>,
//! ) -> [Tensor<'a, f32>; 1] {
//!     [Tensor {
//!         param: DevMut::new(w),
//!         grad: Some(DevRef::new(g)),
//!         perturbation: Perturbation::Backup(DevMut::new(backup)),
//!         m: Some(DevMut::new(m)),
//!         v: Some(DevMut::new(v)),
//!         target: Some(DevMut::new(target)),
//!         weight_decay: true,
//!     }]
//! }
//! let cfg = TramConfig {
//!     delta: 0.5,
//!     geometry: Geometry::Sam,
//!     kl: KlOptions::default(),
//!     variant: TramVariant::Theta { lambda: 0.9 },
//!     optimizer: BaseOptimizer::adamw(0.01),
//!     lr: 0.05,
//! };
//! let t = describe(&mut w, &g, &mut backup, &mut m, &mut v, &mut target);
//! let mut step = TramStep::<f32>::new(&gpu, cfg, &t, rows)?;
//! drop(t); // a description borrows the buffers: one per call
//! for _ in 0..1000 {
//!     forward_backward(&w, &mut g, &mut zm); // your framework, on gpu.stream()
//!     forward(&target, &mut zt);
//!     let (a, b) = (
//!         DeviceLogits::dense(zt.as_view(), rows, vocab)?,
//!         DeviceLogits::dense(zm.as_view(), rows, vocab)?,
//!     );
//!     step.first_step(&mut describe(&mut w, &g, &mut backup, &mut m, &mut v, &mut target), &a, &b, None)?;
//!     forward_backward(&w, &mut g, &mut zm);
//!     step.second_step(&mut describe(&mut w, &g, &mut backup, &mut m, &mut v, &mut target))?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Nothing in a step allocates, synchronises or records a cudarc event, so
//! an iteration can be captured into a CUDA graph and replayed; the values
//! set between replays (lr, δ, the loss scale, which tensors have a
//! gradient) live in device memory and the replays follow them. Build the
//! descriptions and set values outside the capture, and keep the step and
//! the buffers alive while the graph may run. Buffers written or freed on
//! another stream are ordered by the caller: see [`cuda::CudaBackend`].
//!
//! # Gradient accumulation
//!
//! Each step needs its whole gradient. Run every micro-batch's backward at θ
//! into the same gradient buffers (summed, scaled as your loss is), then one
//! [`Tram::first_step`]; then every micro-batch's backward again at θ + ε,
//! summed into the gradient buffers, then one [`Tram::second_step`]. The KL
//! of the first step takes one pair of logit matrices: pass the rows of all
//! micro-batches together (a strided [`cpu::kl_div::Logits`] or
//! [`cuda::kl_div::DeviceLogits`] over a buffer holding them), and with
//! [`Reduction::MeanRows`] d is the mean over the whole batch. Do not call
//! the first step per micro-batch: each call perturbs θ again (and a second
//! call in a row is refused).
//!
//! # Data parallelism
//!
//! SAM-family methods usually perturb each replica with its own gradient
//! ("m-sharpness"): the first backward is **not** all-reduced, each rank's
//! [`Tram::first_step`] takes its local g₁, local d and local norm, which
//! saves one all-reduce per iteration and is what the SAM papers' results
//! use. The second gradient **is** all-reduced (averaged) before
//! [`Tram::second_step`], as for any optimizer: every rank restores the same
//! θ and applies the same update, so the replicas stay identical.
//!
//! For one global perturbation instead, every rank needs the global norm: the
//! step API would need the whole g₁ all-reduced before the first step. The
//! cheaper way is the lower-level operations, which expose the sum of
//! squares: [`cuda::grad_norm::grad_norm`] over the rank's
//! [`cuda::group::ParamGroup`], an all-reduce (sum, f64) of
//! `NormState::sum_sq` at [`cuda::group::ParamGroup::state_ptr`], then
//! [`cuda::perturb::perturb_device`], which derives the norm from the reduced
//! sum. That is also how sharded (ZeRO/FSDP) parameters get a correct norm:
//! each rank holds a shard, and the shard's sum of squares is only a part.
//!
//! With AMP, ranks must agree on skipping. The second step's check sees the
//! all-reduced g₂, so it agrees; a non-finite local g₁ makes only its own
//! rank skip. To keep the replicas identical, a rank whose first step found
//! one ([`StepReport::perturb`] `.found_inf()`) writes a NaN into its g₂
//! before the all-reduce: every rank then skips.
//!
//! # A GradScaler-style loss scaler
//!
//! The scaler is the caller's; the step unscales and skips. With the loss
//! multiplied by `scale` before each backward:
//!
//! ```
//! # use tram_kernels::{StepStatus, Tram};
//! /// PyTorch GradScaler's defaults: start at 2^16, halve on an overflow,
//! /// double after 2000 clean iterations.
//! struct Scaler {
//!     scale: f32,
//!     clean: u32,
//! }
//!
//! impl Scaler {
//!     /// Before the iteration: the step unscales both gradients by 1/scale.
//!     fn before<S: Tram>(&self, step: &mut S) -> tram_kernels::Result<()> {
//!         step.set_inv_scale(1.0 / self.scale)
//!     }
//!
//!     /// After the second step: the step skipped the update if a gradient
//!     /// overflowed; the scale follows.
//!     fn after(&mut self, status: StepStatus) {
//!         if status.found_inf() {
//!             self.scale *= 0.5;
//!             self.clean = 0;
//!         } else {
//!             self.clean += 1;
//!             if self.clean == 2000 {
//!                 self.scale *= 2.0;
//!                 self.clean = 0;
//!             }
//!         }
//!     }
//! }
//! # let mut s = Scaler { scale: 65536.0, clean: 0 };
//! # s.after(StepStatus(StepStatus::SKIPPED | StepStatus::FOUND_INF_SECOND));
//! # assert_eq!(s.scale, 32768.0);
//! // In the loop: scaler.before(&mut step)?; ... first_step, second_step ...;
//! //              scaler.after(step.report()?.status);
//! ```
//!
//! A skipped iteration restores θ and leaves m, v, the step count and the
//! target as they were ([`StepStatus::SKIPPED`]); it costs the check, one
//! more read of the second gradient (4 bytes per f32 element, 2 per
//! f16/bf16). On CUDA, [`Tram::report`] waits for the stream: read it after
//! enqueuing the next iteration's forward to keep the GPU busy, or every few
//! iterations (a scale that is a power of two changes no bit of ε).
//!
//! # Resume
//!
//! [`Tram::state`] returns everything a checkpoint needs besides the
//! tensors (θ, the backups or masters, m, v, the targets): the step count
//! with its bias-correction powers, the noise step, lr, δ and the scale.
//! [`Tram::set_state`] on a new step continues the run bit for bit.
//! [`Tram::set_step_count`] sets an arbitrary count quickly (see
//! [`StepCounter::at`] for its bits).
//!
//! # The operations: accuracy and cost
//!
//! Beneath the step, each operation can be called on its own, on either
//! backend; the module of each states its bound and how it is tested. The CPU
//! reference computes in f64 with fixed summation orders (its results do not
//! depend on the rayon thread count) and is the oracle of every GPU test.
//!
//! | operation | CPU | CUDA | bound against an f64 reference |
//! |---|---|---|---|
//! | KL over logits | [`cpu::kl_div`] | [`cuda::kl_div`] | CPU ≤ 1e-12 relative per row; GPU ≤ 1e-4 relative per row at logit gaps down to 1e-5 |
//! | gradient norm | [`cpu::grad_norm`] | [`cuda::grad_norm`] | CPU ≤ 2⁻⁴⁵ relative; GPU < 4.1e-7 relative up to 2²⁸ elements (tested at 1e-6) |
//! | perturbation | [`cpu::perturb`] | [`cuda::perturb`] | CPU correctly rounded from f64; GPU ≤ 1 ulp(θ+ε) + 2 ulp(ε) |
//! | restore | [`cpu::restore`] | [`cuda::restore`] | bit-exact |
//! | restore + AdamW/SGD | [`cpu::optimizer`] | [`cuda::optimizer`] | CPU ≤ 2⁻²⁴ relative per f32 output (tested at 1e-6); GPU the same bits for finite values |
//! | EMA target | [`cpu::ema`] | [`cuda::ema`] | ½ ulp of f32; GPU the same bits for finite values |
//! | TRAM-x noise | [`cpu::noise`] | [`cuda::noise`] | uniform bit-identical; Gaussian within 1 f32 ulp |
//!
//! # Memory traffic
//!
//! Every kernel is bound by memory bandwidth, so its floor is the bytes it
//! must move: each input read once and each output written once, counted per
//! parameter (or per logit) and divided by the device's copy bandwidth. The
//! crate's benches report their throughput against these counts.
//!
//! | stage | reads | writes | bytes, f32 θ and g | bytes, bf16 θ, f32 master and g |
//! |---|---|---|---|---|
//! | norm, SAM or Fisher | g | — | 4 | 4 |
//! | norm, adaptive | θ, g | — | 8 | 8 (θ from the master) |
//! | perturbation, in place | θ, g | θ + ε, backup | 16 | — |
//! | perturbation, master | master, g | bf16 θ + ε | — | 10 (the master is the backup) |
//! | perturbation, out of place | θ, g | out | 12 | — |
//! | restore | backup | θ | 8 | none: the update rewrites θ from the master |
//! | restore + AdamW, fused | backup (or master), g, m, v | θ, m, v (and master) | 28 | 30 |
//! | AMP's found-inf check | g | — | +4 | +4 |
//! | EMA target, alone | θ̄, θ | θ̄ | 12 | 8 (bf16 θ̄ of the master), 6 (of bf16 θ) |
//!
//! So TRAM's optimizer-side cost beyond the base AdamW update is the norm and
//! the perturbation: 4 + 10 = 14 bytes per parameter with f32 master weights,
//! under half of AdamW's 30; with plain f32 parameters 4 + 16 = 20, the
//! restore being free inside the fused update (an unfused restore and AdamW
//! move 8 + 28 = 36). The KL over `rows × vocab` logits reads both matrices
//! once for the value, 4 bytes per logit pair in bf16 and 8 in f32; with the
//! gradient of the model's logits it reads them again and writes one
//! gradient, 10 (bf16) or 20 (f32). TRAM-x's noise reads e and writes e + z:
//! 8 bytes per f32 element, 4 per bf16.

#![deny(missing_docs)]

#[cfg(feature = "candle")]
pub mod candle;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod step;

pub use config::{
    BaseOptimizer, Geometry, KlDirection, KlOptions, NoiseConfig, NoiseDistribution, PerturbStatus,
    Radius, Reduction, StepCounter, TramConfig, TramVariant,
};
pub use dtype::{DType, Element};
pub use error::{DriverError, Error, Result};
pub use half::{bf16, f16};
pub use step::{StepReport, StepStatus, Tram, TramState};
