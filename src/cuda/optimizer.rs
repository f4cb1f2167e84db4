//! Launcher of `kernels/optimizer.cu`: TRAM's second step (restore θ from the
//! backup or master, then AdamW or SGD) over a whole group in one launch, plus a
//! one-thread launch that advances the step count on the device.
//!
//! Same semantics and same bits as `cpu::optimizer` for finite values (both
//! evaluate the same f64 operations in the same order); see there for the
//! error bound and for NaNs.
//!
//! Per-step values live in device memory: the learning rate and the other
//! hyperparameters in an 8-float block the host rewrites with an async copy
//! ([`FusedOptimizer::set_lr`]), the step count and the bias-correction powers in
//! a [`StepCounter`] advanced by a kernel inside [`FusedOptimizer::step`]. A CUDA
//! graph that captured `step` therefore replays with the current learning rate
//! and the right bias correction. Nothing here allocates or synchronises in
//! `step`.

use std::marker::PhantomData;

use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};

use super::buffer::DevRef;
use super::ema::EmaGroup;
use super::group::{chunk_map, MtChunk, MtTensor, BLOCK_THREADS};
use super::CudaBackend;
use crate::config::{validate_lr, BaseOptimizer, StepCounter};
use crate::cpu::ema::validate_lambda;
use crate::dtype::{DType, Element};
use crate::error::{ensure, Error, Result};

// SAFETY: `StepCounter` is `#[repr(C)]` plain data (u64, f64, f64), laid out
// as `OptCounter` in kernels/optimizer.cu; any bit pattern is valid.
unsafe impl DeviceRepr for StepCounter {}

const THREADS: u32 = BLOCK_THREADS;

/// One tensor of the update over raw device addresses (for framework backends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawUpdateTensor {
    /// The working parameters (holding the perturbed θ); written.
    pub param: u64,
    /// The gradient; 0 when the tensor has no gradient this step (restore only).
    pub grad: u64,
    /// The backup (restore mode, element type of `param`) or the f32 master
    /// weights (master mode; read and written).
    pub source: u64,
    /// f32 first moment / momentum buffer; 0 when the optimizer keeps none.
    pub m: u64,
    /// f32 second moment; 0 when the optimizer keeps none.
    pub v: u64,
    /// Elements (all buffers).
    pub len: u64,
    /// Whether weight decay applies.
    pub weight_decay: bool,
}

/// Where the update reads θ from, over cudarc views.
#[derive(Debug)]
pub enum DeviceWeights<'a, P> {
    /// θ from `backup`, the result into `param`.
    Restore {
        /// θ as it was before the perturbation; read.
        backup: CudaView<'a, P>,
        /// The perturbed θ; overwritten with the updated θ.
        param: CudaViewMut<'a, P>,
    },
    /// θ from the f32 `master` (updated in place); `param` gets the rounded copy.
    Master {
        /// The f32 master weights; read and updated in place.
        master: CudaViewMut<'a, f32>,
        /// The working copy; overwritten with the updated master, rounded to
        /// nearest even.
        param: CudaViewMut<'a, P>,
    },
}

/// One tensor of the update over cudarc views (see `cpu::optimizer::UpdateTensor`).
#[derive(Debug)]
pub struct DeviceUpdateTensor<'a, P, G> {
    /// Where θ comes from and where the result goes.
    pub weights: DeviceWeights<'a, P>,
    /// The gradient (the parameter type or f32); `None`: no gradient this
    /// step, θ is restored and neither θ nor the state is updated.
    pub grad: Option<CudaView<'a, G>>,
    /// AdamW's first moment or SGD's momentum buffer, f32; `None` only when
    /// the optimizer keeps none (SGD without momentum).
    pub m: Option<CudaViewMut<'a, f32>>,
    /// AdamW's second moment, f32; `None` for SGD.
    pub v: Option<CudaViewMut<'a, f32>>,
    /// Whether weight decay applies to this tensor.
    pub weight_decay: bool,
}

/// The tensors of one update, described once on the device as a
/// `multi_tensor.cuh` table ([`MtTensor`] rows with the slots param, grad,
/// backup-or-master, m, v and a weight-decay flag) and a chunk list
/// ([`MtChunk`]), and reused every step. `'a` is the borrow
/// of the buffers it points into (`'static` for the raw constructor, whose
/// caller vouches for them).
#[derive(Debug)]
pub struct UpdateGroup<'a> {
    /// The table as uploaded (for matching a fused EMA target against it).
    rows: Vec<MtTensor>,
    table: CudaSlice<MtTensor>,
    _chunks: CudaSlice<MtChunk>,
    /// Addresses of `table` and `chunks`, taken once (launches pass them as
    /// plain arguments: no event bookkeeping, capturable).
    table_ptr: u64,
    chunks_ptr: u64,
    n_chunks: u32,
    param: DType,
    grad: DType,
    master: bool,
    all_m: bool,
    all_v: bool,
    _borrow: PhantomData<&'a mut ()>,
}

fn check_dtypes(param: DType, grad: DType) -> Result<()> {
    ensure!(
        grad == param || grad == DType::F32,
        "gradients of {} with parameters of {}: supported are the parameter type or f32",
        grad.name(),
        param.name()
    );
    Ok(())
}

impl UpdateGroup<'static> {
    /// A group over raw device addresses.
    ///
    /// # Safety
    /// Whenever a step is launched with this group, every non-zero address must
    /// point to `len` elements of device memory in the stream's context: `param`
    /// and (restore mode) `source` of `param_dtype`, `grad` of `grad_dtype`,
    /// `source` (master mode), `m` and `v` of f32; `param`, `m`, `v` and a master
    /// `source` writable; no written buffer may overlap another buffer of the
    /// group; and all prior work on them must be ordered before the launch on
    /// the backend's stream.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`]: no tensors, a gradient type other than the parameter type or
    /// f32, a null param or source address or a misaligned one; [`Error::Driver`] when an
    /// upload fails.
    pub unsafe fn from_raw(
        backend: &CudaBackend,
        tensors: &[RawUpdateTensor],
        param_dtype: DType,
        grad_dtype: DType,
        master: bool,
    ) -> Result<Self> {
        build(backend, tensors, param_dtype, grad_dtype, master)
    }
}

impl<'a> UpdateGroup<'a> {
    /// A group over cudarc views; all tensors in the same mode (all restore
    /// or all master), lengths checked.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`]: no tensors, mixed modes, lengths that differ within a tensor, or
    /// a gradient type other than the parameter type or f32; [`Error::Driver`] when an
    /// upload fails.
    pub fn new<P: Element + DeviceRepr, G: Element + DeviceRepr>(
        backend: &CudaBackend,
        tensors: Vec<DeviceUpdateTensor<'a, P, G>>,
    ) -> Result<Self> {
        ensure!(!tensors.is_empty(), "the update group is empty");
        let stream = backend.stream();
        let master = matches!(tensors[0].weights, DeviceWeights::Master { .. });
        let mut raw = Vec::with_capacity(tensors.len());
        for (i, mut t) in tensors.into_iter().enumerate() {
            let (param, source, n, is_master) = match &mut t.weights {
                DeviceWeights::Restore { backup, param } => {
                    ensure!(
                        backup.len() == param.len(),
                        "tensor {i}: backup has {} elements, param {}",
                        backup.len(),
                        param.len()
                    );
                    let n = param.len();
                    let s = backup.device_ptr(stream).0;
                    (param.device_ptr_mut(stream).0, s, n, false)
                }
                DeviceWeights::Master { master, param } => {
                    ensure!(
                        master.len() == param.len(),
                        "tensor {i}: master has {} elements, param {}",
                        master.len(),
                        param.len()
                    );
                    let n = param.len();
                    let s = master.device_ptr_mut(stream).0;
                    (param.device_ptr_mut(stream).0, s, n, true)
                }
            };
            if is_master != master {
                return Err(Error::InvalidArgument(format!(
                    "tensor {i}: restore and master tensors are mixed"
                )));
            }
            let addr = |what: &str, len: usize, ptr: u64| -> Result<u64> {
                ensure!(len == n, "tensor {i}: {what} has {len} elements, param {n}");
                Ok(ptr)
            };
            let grad = match &t.grad {
                Some(g) => addr("grad", g.len(), g.device_ptr(stream).0)?,
                None => 0,
            };
            let m = match &mut t.m {
                Some(m) => addr("m", m.len(), m.device_ptr_mut(stream).0)?,
                None => 0,
            };
            let v = match &mut t.v {
                Some(v) => addr("v", v.len(), v.device_ptr_mut(stream).0)?,
                None => 0,
            };
            raw.push(RawUpdateTensor {
                param,
                grad,
                source,
                m,
                v,
                len: n as u64,
                weight_decay: t.weight_decay,
            });
        }
        build(backend, &raw, P::DTYPE, G::DTYPE, master)
    }

    /// Whether θ is read from f32 master weights (else from backups).
    pub fn is_master(&self) -> bool {
        self.master
    }

    /// Chunks of `MT_CHUNK` elements the launch walks.
    pub fn n_chunks(&self) -> u32 {
        self.n_chunks
    }

    /// Replaces the table's rows with `rows` of the same tensor lengths (new
    /// addresses, gradients toggled): an async copy into the same device
    /// table, so launches enqueued (or graphs replayed) after it use them.
    /// The caller has validated the rows as `build` does.
    pub(crate) fn rewrite_rows(
        &mut self,
        backend: &CudaBackend,
        rows: Vec<MtTensor>,
    ) -> Result<()> {
        ensure!(
            rows.len() == self.rows.len()
                && rows.iter().zip(&self.rows).all(|(a, b)| a.len == b.len),
            "the update table can only be rewritten with tensors of the same lengths"
        );
        backend.stream().memcpy_htod(&rows, &mut self.table)?;
        self.all_m = rows.iter().all(|t| t.ptr[3] != 0 || t.len == 0);
        self.all_v = rows.iter().all(|t| t.ptr[4] != 0 || t.len == 0);
        self.rows = rows;
        Ok(())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Never true: a group has at least one tensor.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// TRAM-θ's EMA target fused into the update ([`FusedOptimizer::step_with_target`]):
/// tensor i of the update also does θ̄ᵢ ← λ·θ̄ᵢ + (1−λ)·θᵢ with the θ it just
/// wrote, in the same pass. Built from an [`EmaGroup`] over the same tensors
/// (same order and lengths) whose θ is the update's working parameters, or
/// (master mode) its f32 master weights; the results are those of
/// [`ema_update`](super::ema::ema_update) on that group run after the update,
/// bit for bit. Targets are f32 or the parameter type.
#[derive(Debug)]
pub struct FusedTarget<'a> {
    targets: CudaSlice<u64>,
    /// The address of `targets`, taken once.
    targets_ptr: u64,
    dtype: DType,
    from_master: bool,
    len: usize,
    _borrow: PhantomData<&'a mut ()>,
}

impl<'a> FusedTarget<'a> {
    /// Matches `ema` against `update`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when it cannot be fused: other tensor counts or lengths, an EMA θ
    /// that is neither the update's parameters nor (master mode) its masters
    /// (or a mix), a θ dtype that is not theirs, a target dtype other than f32
    /// or the parameter type, or a target overlapping a buffer of the update;
    /// [`Error::Driver`] when an upload fails.
    pub fn new(
        backend: &CudaBackend,
        update: &UpdateGroup<'a>,
        ema: &EmaGroup<'a>,
    ) -> Result<Self> {
        let rows = ema.rows();
        ensure!(
            rows.len() == update.rows.len(),
            "the EMA group has {} tensors, the update {}",
            rows.len(),
            update.rows.len()
        );
        let (target_dtype, theta_dtype) = ema.dtypes();
        ensure!(
            target_dtype == DType::F32 || target_dtype == update.param,
            "fused EMA targets are f32 or the parameter type ({}), not {}",
            update.param.name(),
            target_dtype.name()
        );
        let mut from_master = None;
        for (i, (e, u)) in rows.iter().zip(&update.rows).enumerate() {
            ensure!(
                e.len == u.len,
                "tensor {i}: the EMA has {} elements, the update {}",
                e.len,
                u.len
            );
            if e.len == 0 {
                continue;
            }
            let theta = e.ptr[1];
            let m = if theta == u.ptr[0] {
                false
            } else if update.master && theta == u.ptr[2] {
                true
            } else {
                return Err(Error::InvalidArgument(format!(
                    "tensor {i}: the EMA's θ is neither the update's parameters nor its masters"
                )));
            };
            ensure!(
                *from_master.get_or_insert(m) == m,
                "tensor {i}: the EMA reads masters for some tensors and parameters for others"
            );
        }
        let from_master = from_master.unwrap_or(false);
        let want = if from_master {
            DType::F32
        } else {
            update.param
        };
        ensure!(
            theta_dtype == want,
            "the EMA's θ is {}, the buffers it points at are {}",
            theta_dtype.name(),
            want.name()
        );
        // The targets are written in the same pass: none may touch a buffer
        // the update reads or writes.
        let mut ranges: Vec<(u64, u64, bool)> = Vec::new();
        let sizes = [
            update.param.size() as u64,
            update.grad.size() as u64,
            if update.master {
                4
            } else {
                update.param.size() as u64
            },
            4,
            4,
        ];
        for (e, u) in rows.iter().zip(&update.rows) {
            if u.len == 0 {
                continue;
            }
            for (slot, &size) in sizes.iter().enumerate() {
                let p = u.ptr[slot];
                if p != 0 {
                    ranges.push((p, p.saturating_add(u.len.saturating_mul(size)), false));
                }
            }
            let t = e.ptr[0];
            let bytes = e.len.saturating_mul(target_dtype.size() as u64);
            ranges.push((t, t.saturating_add(bytes), true));
        }
        ranges.sort_unstable();
        // Sorted by start: a range overlaps an earlier one iff it starts
        // before the furthest end seen so far (kept apart for targets).
        let (mut end_update, mut end_target) = (0u64, 0u64);
        for &(start, end, is_target) in &ranges {
            let limit = if is_target {
                end_update.max(end_target)
            } else {
                end_target
            };
            ensure!(
                start >= limit,
                "an EMA target overlaps a buffer of the update (at {start:#x})"
            );
            if is_target {
                end_target = end_target.max(end);
            } else {
                end_update = end_update.max(end);
            }
        }
        let targets: Vec<u64> = rows.iter().map(|e| e.ptr[0]).collect();
        Self::from_list(backend, &targets, target_dtype, from_master)
    }

    /// From a list of target addresses already matched to an update group
    /// (one per row, `dtype` f32 or the parameter type, disjoint from the
    /// group's buffers): the step's constructor, which checks all of that.
    pub(crate) fn from_list(
        backend: &CudaBackend,
        targets: &[u64],
        dtype: DType,
        from_master: bool,
    ) -> Result<Self> {
        let list = backend.stream().clone_htod(targets)?;
        let targets_ptr = DevRef::new(&list).ptr();
        Ok(Self {
            targets: list,
            targets_ptr,
            dtype,
            from_master,
            len: targets.len(),
            _borrow: PhantomData,
        })
    }

    /// Rewrites the target addresses (same count): an async copy.
    pub(crate) fn rewrite(&mut self, backend: &CudaBackend, targets: &[u64]) -> Result<()> {
        ensure!(
            targets.len() == self.len,
            "the target list cannot change its length"
        );
        backend.stream().memcpy_htod(targets, &mut self.targets)?;
        Ok(())
    }

    /// Whether θ̄ follows the f32 master weights (else the working parameters).
    pub fn from_master(&self) -> bool {
        self.from_master
    }
}

fn build(
    backend: &CudaBackend,
    tensors: &[RawUpdateTensor],
    param: DType,
    grad: DType,
    master: bool,
) -> Result<UpdateGroup<'static>> {
    ensure!(!tensors.is_empty(), "the update group is empty");
    check_dtypes(param, grad)?;
    ensure!(
        tensors.len() <= u32::MAX as usize,
        "too many tensors in one group"
    );
    let src_size = if master { 4 } else { param.size() as u64 };
    let mut table = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        // An empty tensor is skipped by every kernel: any address will do,
        // null included (as in a parameter group).
        ensure!(
            t.len == 0 || (t.param != 0 && t.source != 0),
            "tensor {i}: null param or source address"
        );
        let aligned = t.param % param.size() as u64 == 0
            && t.grad % grad.size() as u64 == 0
            && t.source % src_size == 0
            && t.m % 4 == 0
            && t.v % 4 == 0;
        ensure!(
            aligned,
            "tensor {i}: an address is not aligned to its element size"
        );
        let extents = [
            ("param", t.param, param.size()),
            ("grad", t.grad, grad.size()),
            ("source", t.source, src_size as usize),
            ("m", t.m, 4),
            ("v", t.v, 4),
        ];
        for (what, ptr, size) in extents {
            if ptr != 0 {
                super::buffer_end(&format!("tensor {i}: {what}"), ptr, t.len, size)?;
            }
        }
        // Slot order mirrors OPT_SLOT_* in kernels/optimizer.cu.
        table.push(MtTensor {
            ptr: [t.param, t.grad, t.source, t.m, t.v, t.weight_decay as u64],
            len: t.len,
        });
    }
    let (chunks, n_chunks) = chunks_of(&table)?;
    let stream = backend.stream();
    let table_dev = stream.clone_htod(&table)?;
    let chunks_dev = stream.clone_htod(&chunks)?;
    Ok(UpdateGroup {
        table_ptr: DevRef::new(&table_dev).ptr(),
        chunks_ptr: DevRef::new(&chunks_dev).ptr(),
        table: table_dev,
        rows: table,
        _chunks: chunks_dev,
        n_chunks,
        param,
        grad,
        master,
        all_m: tensors.iter().all(|t| t.m != 0 || t.len == 0),
        all_v: tensors.iter().all(|t| t.v != 0 || t.len == 0),
        _borrow: PhantomData,
    })
}

/// Every chunk of every tensor (tensors without a gradient still need their
/// restore), and the count; never an empty allocation (a dummy chunk, never
/// read, when every tensor is empty).
pub(crate) fn chunks_of(table: &[MtTensor]) -> Result<(Vec<MtChunk>, u32)> {
    let lens: Vec<u64> = table.iter().map(|t| t.len).collect();
    let mut chunks = chunk_map(&lens, &vec![true; lens.len()])?.chunks;
    let n = chunks.len() as u32;
    if chunks.is_empty() {
        chunks.push(MtChunk::default());
    }
    Ok((chunks, n))
}

/// The 8-float hyperparameter block (mirrors `OptHyper`): lr, weight decay,
/// β1, β2, eps, momentum, dampening, inverse loss scale.
fn hyper_block(opt: &BaseOptimizer, lr: f32, inv_scale: f32) -> [f32; 8] {
    match *opt {
        BaseOptimizer::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } => [lr, weight_decay, beta1, beta2, eps, 0.0, 0.0, inv_scale],
        BaseOptimizer::Sgd {
            momentum,
            dampening,
            weight_decay,
            ..
        } => [
            lr,
            weight_decay,
            0.0,
            0.0,
            0.0,
            momentum,
            dampening,
            inv_scale,
        ],
    }
}

/// Byte offset of the inverse loss scale in the hyperparameter block.
const INV_SCALE_OFFSET: u64 = 7 * 4;

/// What decides, on the device, whether an update runs (a TRAM step's gate).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gate {
    /// The step's `StepState`.
    pub state: u64,
    /// The parameter group's `NormState` (the first step's status), or 0.
    pub first: u64,
    /// TRAM's second step (1) or a step without perturbation (0).
    pub expect_perturbed: bool,
}

/// The base optimizer on the device: hyperparameters and step count in device
/// memory (the CUDA twin of `cpu::optimizer::FusedOptimizer`).
///
/// The gradient is unscaled as s·g in the update, with s the inverse loss
/// scale ([`FusedOptimizer::set_inv_scale`], 1 by default), also read from
/// device memory. This low-level update has no found-inf check: a TRAM step
/// ([`TramStep`](super::step::TramStep)) adds one.
#[derive(Debug)]
pub struct FusedOptimizer {
    opt: BaseOptimizer,
    lr: f32,
    inv_scale: f32,
    hyper: CudaSlice<f32>,
    counter: CudaSlice<StepCounter>,
    /// Addresses of `hyper` and `counter`, taken once (capturable launches).
    hyper_ptr: u64,
    counter_ptr: u64,
}

impl FusedOptimizer {
    /// Validates `opt` and `lr` and allocates the two small device blocks.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] from [`BaseOptimizer::validate`] or for a negative or non-finite
    /// lr; [`Error::Driver`] when an allocation or copy fails.
    pub fn new(backend: &CudaBackend, opt: BaseOptimizer, lr: f32) -> Result<Self> {
        opt.validate()?;
        validate_lr(lr)?;
        let stream = backend.stream();
        let hyper = stream.clone_htod(&hyper_block(&opt, lr, 1.0))?;
        let counter = stream.clone_htod(&[StepCounter::at(&opt, 0)])?;
        Ok(Self {
            opt,
            lr,
            inv_scale: 1.0,
            hyper_ptr: DevRef::new(&hyper).ptr(),
            counter_ptr: DevRef::new(&counter).ptr(),
            hyper,
            counter,
        })
    }

    /// The base optimizer and its hyperparameters.
    pub fn config(&self) -> &BaseOptimizer {
        &self.opt
    }

    /// The learning rate last set from the host.
    pub fn lr(&self) -> f32 {
        self.lr
    }

    /// Sets the learning rate of the steps enqueued after this call (an async
    /// copy on the stream; also seen by a graph replayed afterwards). Do not
    /// call it while the stream is being captured.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a negative or non-finite lr (nothing changed); [`Error::Driver`] when
    /// the copy fails.
    pub fn set_lr(&mut self, backend: &CudaBackend, lr: f32) -> Result<()> {
        validate_lr(lr)?;
        let block = hyper_block(&self.opt, lr, self.inv_scale);
        backend.stream().memcpy_htod(&block, &mut self.hyper)?;
        self.lr = lr;
        Ok(())
    }

    /// The inverse loss scale last set from the host.
    pub fn inv_scale(&self) -> f32 {
        self.inv_scale
    }

    /// Sets the inverse loss scale s (gradients are unscaled as s·g) of the
    /// steps enqueued or replayed after this call; finite and > 0. An async
    /// copy: not while the stream is being captured.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] otherwise (nothing changed); [`Error::Driver`] when the copy fails.
    pub fn set_inv_scale(&mut self, backend: &CudaBackend, inv_scale: f32) -> Result<()> {
        crate::config::validate_inv_scale(inv_scale)?;
        let block = hyper_block(&self.opt, self.lr, inv_scale);
        backend.stream().memcpy_htod(&block, &mut self.hyper)?;
        self.inv_scale = inv_scale;
        Ok(())
    }

    /// The device address of the inverse loss scale (one f32 of the
    /// hyperparameter block), for launches that read it at run time.
    pub(crate) fn inv_scale_ptr(&self) -> u64 {
        self.hyper_ptr + INV_SCALE_OFFSET
    }

    /// Sets the step count (resuming from a checkpoint) with the β powers of
    /// [`StepCounter::at`]; an async copy. For a bit-identical resume, save
    /// and restore the whole counter ([`FusedOptimizer::set_counter`]).
    ///
    /// # Errors
    /// [`Error::Driver`] when the copy fails.
    pub fn set_step_count(&mut self, backend: &CudaBackend, t: u64) -> Result<()> {
        self.set_counter(backend, StepCounter::at(&self.opt, t))
    }

    /// Sets the step count and β powers as saved by [`FusedOptimizer::counter`]
    /// (an async copy; not while capturing).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for β powers outside [0, 1] (nothing changed); [`Error::Driver`] when the
    /// copy fails.
    pub fn set_counter(&mut self, backend: &CudaBackend, counter: StepCounter) -> Result<()> {
        counter.validate()?;
        backend
            .stream()
            .memcpy_htod(&[counter], &mut self.counter)?;
        Ok(())
    }

    /// Reads the device counter back (synchronises the stream: not for the hot path).
    ///
    /// # Errors
    /// [`Error::Driver`] when the copy fails.
    pub fn counter(&self, backend: &CudaBackend) -> Result<StepCounter> {
        Ok(backend.stream().clone_dtoh(&self.counter)?[0])
    }

    /// The device step count (synchronises the stream).
    ///
    /// # Errors
    /// [`Error::Driver`] when the copy fails.
    pub fn step_count(&self, backend: &CudaBackend) -> Result<u64> {
        Ok(self.counter(backend)?.t)
    }

    /// Advances the step count on the device, then restores and updates every
    /// tensor of `group`: two launches, no allocation, no host sync. Moves 28
    /// bytes per f32 parameter with AdamW (backup, g, m, v read; θ, m, v
    /// written), 30 for bf16 working weights beside f32 masters.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the optimizer keeps m or v and a tensor of the group has no
    /// such buffer; [`Error::Driver`] when a launch fails.
    pub fn step(&mut self, backend: &CudaBackend, group: &UpdateGroup<'_>) -> Result<()> {
        self.launch(backend, group, None, None)
    }

    /// [`FusedOptimizer::step`] with TRAM-θ's target θ̄ ← λ·θ̄ + (1−λ)·θ
    /// updated in the same pass (`target` built for `group`): still two
    /// launches. λ ∈ [0, 1] is a launch argument (fixed configuration, kept by
    /// a captured graph); λ = 1 leaves θ̄ untouched and runs the plain update.
    ///
    /// # Errors
    /// As [`FusedOptimizer::step`], and λ outside [0, 1] or a `target` built
    /// for another group.
    pub fn step_with_target(
        &mut self,
        backend: &CudaBackend,
        group: &UpdateGroup<'_>,
        target: &FusedTarget<'_>,
        lambda: f32,
    ) -> Result<()> {
        validate_lambda(lambda)?;
        ensure!(
            target.len == group.rows.len(),
            "the fused target has {} tensors, the update group {}",
            target.len,
            group.rows.len()
        );
        if lambda == 1.0 {
            return self.launch(backend, group, None, None);
        }
        self.launch(backend, group, Some((target, lambda)), None)
    }

    /// A TRAM step's update: the found-inf check over the group's gradients,
    /// the gate (which also advances the step count unless it skips), then
    /// the update that follows the gate's decision. Three launches.
    pub(crate) fn step_gated(
        &mut self,
        backend: &CudaBackend,
        group: &UpdateGroup<'_>,
        ema: Option<(&FusedTarget<'_>, f32)>,
        gate: Gate,
    ) -> Result<()> {
        let ema = ema.filter(|&(_, lambda)| lambda != 1.0);
        self.launch(backend, group, ema, Some(gate))
    }

    fn launch(
        &mut self,
        backend: &CudaBackend,
        group: &UpdateGroup<'_>,
        ema: Option<(&FusedTarget<'_>, f32)>,
        gate: Option<Gate>,
    ) -> Result<()> {
        let (name, nesterov) = match self.opt {
            BaseOptimizer::AdamW { .. } => ("adamw", false),
            BaseOptimizer::Sgd { nesterov, .. } => ("sgd", nesterov),
        };
        ensure!(
            !self.opt.uses_m() || group.all_m,
            "the optimizer keeps a first moment but a tensor has no m buffer"
        );
        ensure!(
            !self.opt.uses_v() || group.all_v,
            "the optimizer keeps a second moment but a tensor has no v buffer"
        );
        let (ema_sep, ema_dtype) = match ema {
            Some((t, _)) => ("_ema_", t.dtype.name()),
            None => ("", ""),
        };
        let update = backend.function_named(format_args!(
            "optimizer_{name}_{}_{}_{}{ema_sep}{ema_dtype}",
            if group.master { "master" } else { "restore" },
            group.param.name(),
            group.grad.name()
        ))?;
        let stream = backend.stream();
        let (hyper, counter) = (self.hyper_ptr, self.counter_ptr);
        let adamw = matches!(self.opt, BaseOptimizer::AdamW { .. }) as u32;
        let blocks = group.n_chunks.min(backend.sm_count() * 8).max(1);
        let grid = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (table, chunks, n_chunks) = (group.table_ptr, group.chunks_ptr, group.n_chunks);
        match gate {
            None => {
                let advance = backend.function("optimizer_advance")?;
                let mut b = stream.launch_builder(advance);
                b.arg(&counter).arg(&hyper).arg(&adamw);
                // SAFETY: optimizer_advance(OptCounter*, const OptHyper*,
                // uint32_t): the counter is one StepCounter (24 bytes, the
                // kernel's layout), the hyper block 8 floats; both owned by
                // `self`, which outlives the launch (and any graph of it, by
                // the step's contract).
                unsafe { b.launch(one) }?;
            }
            Some(g) => {
                if n_chunks > 0 {
                    let check = backend
                        .function_named(format_args!("optimizer_check_{}", group.grad.name()))?;
                    let mut b = stream.launch_builder(check);
                    b.arg(&table)
                        .arg(&chunks)
                        .arg(&n_chunks)
                        .arg(&hyper)
                        .arg(&g.state);
                    // SAFETY: optimizer_check_<g>(MtTensor*, MtChunk*, u32,
                    // OptHyper*, StepState*): the group's table and chunk list
                    // (layouts of multi_tensor.cuh, chunks inside their
                    // tensors, gradient slots of the group's gradient type or
                    // 0), the hyper block, and the step's live StepState.
                    unsafe { b.launch(grid) }?;
                }
                let begin = backend.function("optimizer_begin")?;
                let expect = g.expect_perturbed as u32;
                let mut b = stream.launch_builder(begin);
                b.arg(&counter)
                    .arg(&hyper)
                    .arg(&adamw)
                    .arg(&g.state)
                    .arg(&g.first)
                    .arg(&expect);
                // SAFETY: optimizer_begin(OptCounter*, const OptHyper*, u32,
                // StepState*, const NormState*, u32): our counter and hyper
                // block, the step's StepState and its group's NormState (or 0,
                // which the kernel checks), all alive while the step is.
                unsafe { b.launch(one) }?;
            }
        }

        if n_chunks == 0 {
            return Ok(());
        }
        let nesterov = nesterov as u32;
        let gate_ptr = gate.map_or(0u64, |g| g.state);
        let mut b = stream.launch_builder(update);
        b.arg(&table)
            .arg(&chunks)
            .arg(&n_chunks)
            .arg(&hyper)
            .arg(&counter)
            .arg(&nesterov);
        let from_master;
        let targets;
        if let Some((t, lambda)) = &ema {
            from_master = t.from_master as u32;
            targets = t.targets_ptr;
            b.arg(&targets).arg(lambda).arg(&from_master);
        }
        b.arg(&gate_ptr);
        // SAFETY: the table rows and chunk list were built by `build` with the
        // kernel's layouts (MtTensor, MtChunk of multi_tensor.cuh) and every chunk
        // index lies inside its tensor; the addresses in the rows are valid by
        // the group's construction (borrowed views, or the `from_raw` contract);
        // the kernel name matches the group's dtypes and mode. With an EMA, the
        // target list has one address per table row, each of `len` elements of
        // the target type that overlap no buffer of the group (checked by
        // `FusedTarget::new` or the step). The gate is 0 or the step's StepState.
        unsafe { b.launch(grid) }?;
        Ok(())
    }
}
