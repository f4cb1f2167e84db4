//! A parameter group: the many tensors of a model, described once on the
//! device and reused every step by the multi-tensor kernels
//! (`kernels/multi_tensor.cuh`; after apex's multi_tensor_apply).
//!
//! The group holds a device table with one [`MtTensor`] per tensor (its
//! parameter, gradient, backup, master and output addresses, see [`Slot`],
//! and its 64-bit length) and a device list of [`MtChunk`]s: the tensors that
//! have a gradient this step, cut into chunks of [`MT_CHUNK`] elements, then
//! those of the other tensors (see [`ChunkMap`]). Both are built on the host
//! by plain functions ([`describe`], [`chunk_map`]) and uploaded when the
//! group is built; [`ParamGroup::set_has_grad`] rebuilds only the chunk list,
//! into the same device buffer. The group also owns the workspace of the norm
//! (an f64 partial and a found-inf flag per block, and a counter) and the
//! device [`NormState`] that the norm, the perturbation and the host read.
//!
//! Everything a step launches goes on the stream the group was built on; no
//! launch allocates or synchronises.
//!
//! One TRAM first step and its restore (two launches, then one):
//!
//! ```no_run
//! use tram_kernels::cuda::grad_norm::{grad_norm, NormOptions};
//! use tram_kernels::cuda::group::{ParamGroup, TensorViews};
//! use tram_kernels::cuda::perturb::{perturb, PerturbMode, PerturbOptions};
//! use tram_kernels::cuda::{restore::restore, CudaBackend};
//! use tram_kernels::{Geometry, Radius};
//! # fn main() -> tram_kernels::Result<()> {
//! let gpu = CudaBackend::new(0)?;
//! let s = gpu.stream();
//! let (theta, grad) = (s.clone_htod(&[0.5f32; 1000])?, s.clone_htod(&[0.1f32; 1000])?);
//! let backup = s.alloc_zeros::<f32>(1000)?;
//! let d = s.clone_htod(&[0.3f32])?; // the divergence, e.g. from the KL kernel
//! let tensors = [TensorViews {
//!     param: theta.as_view(),
//!     grad: grad.as_view(),
//!     backup: Some(backup.as_view()),
//!     master: None,
//!     out: None,
//! }];
//! let group = ParamGroup::new(&gpu, &tensors)?; // once
//! // Every step:
//! let (geometry, inv_scale) = (Geometry::Sam, 1.0);
//! grad_norm(&gpu, &group, NormOptions { geometry, inv_scale })?;
//! let radius = Radius::TrustRegion { delta: 0.5 };
//! let mode = PerturbMode::InPlace;
//! perturb(&gpu, &group, PerturbOptions { geometry, radius, inv_scale, mode }, Some(&d.as_view()))?;
//! // ... forward and backward at θ + ε ...
//! restore(&gpu, &group)?;
//! // Later, outside the step:
//! let status = group.read_state()?.perturb_status();
//! # let _ = status;
//! # Ok(())
//! # }
//! ```

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, DeviceSlice, ValidAsZeroBits,
};

use super::perturb::PerturbMode;
use super::CudaBackend;
use crate::config::PerturbStatus;
use crate::dtype::{DType, Element};
use crate::error::{ensure, Result};

/// Pointer slots per tensor in the device table (mirrors `MT_SLOTS`).
pub const MT_SLOTS: usize = 6;
/// Elements per chunk (mirrors `MT_CHUNK`): a multiple of every vector width,
/// so every chunk of a tensor starts at the tensor's own 16-byte alignment.
pub const MT_CHUNK: u64 = 65536;
/// Threads per block of every multi-tensor kernel here.
pub(crate) const BLOCK_THREADS: u32 = 256;

/// What each pointer slot of a parameter group's table holds (mirrors
/// `MT_SLOT_*` in `kernels/multi_tensor.cuh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Slot {
    /// θ: the parameters, or the working copy beside f32 master weights.
    Param = 0,
    /// g, the gradient.
    Grad = 1,
    /// θ saved by the in-place perturbation, restored by `restore`.
    Backup = 2,
    /// f32 master weights.
    Master = 3,
    /// θ + ε of the out-of-place perturbation.
    Out = 4,
}

/// One tensor in the device table: up to [`MT_SLOTS`] device addresses (0 when
/// unused) and a 64-bit element count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MtTensor {
    /// Device addresses, 0 where a slot is unused. A parameter group indexes
    /// them by [`Slot`]; the optimizer's and the EMA's tables use the same row
    /// type with their own slot order (see their modules).
    pub ptr: [u64; MT_SLOTS],
    /// Elements of every buffer of the tensor.
    pub len: u64,
}

/// One chunk of work: elements `[index * MT_CHUNK, min((index + 1) * MT_CHUNK, len))`
/// of table entry `tensor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MtChunk {
    /// The tensor's row in the device table.
    pub tensor: u32,
    /// Which chunk of that tensor (its first element is `index * MT_CHUNK`).
    pub index: u32,
}

/// The device-side result of the norm and of the perturbation after it
/// (mirrors `NormState` in `kernels/multi_tensor.cuh`).
///
/// `sum_sq` is the value a sharded (ZeRO/FSDP) caller all-reduces (f64 sum)
/// across ranks between the norm and the perturbation: it sits at offset 0 of
/// [`ParamGroup::state_ptr`]. The perturbation derives its norm from `sum_sq`
/// alone, and writes back the `norm`, `rho`, `coef` and `status` it used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NormState {
    /// Σ of the geometry's squared terms (with g' = inv_scale·g).
    pub sum_sq: f64,
    /// sqrt(sum_sq), as the norm or `finish` computed it, or as the last
    /// perturbation used it.
    pub norm: f64,
    /// The radius ρ the last perturbation used.
    pub rho: f64,
    /// ρ/(norm + 1e-12) of the last perturbation (0 when it did not apply).
    pub coef: f64,
    /// [`PerturbStatus`] bits of the last perturbation.
    pub status: u32,
    /// 1 when a gradient element (of a tensor with a gradient) is inf or NaN:
    /// PyTorch GradScaler's `found_inf`, set by the norm. Like the CPU
    /// reference's it looks at gradients only: a non-finite θ under the
    /// adaptive geometry makes `sum_sq` non-finite (and the perturbation
    /// reports `NONFINITE_GRAD`) with `found_inf` 0.
    /// [`finish`](super::grad_norm::finish) raises it for a non-finite
    /// all-reduced `sum_sq`.
    pub found_inf: u32,
    /// Padding to the kernel's 48-byte layout; zero.
    pub _pad: [u32; 2],
}

impl NormState {
    /// The status of the last perturbation.
    pub fn perturb_status(&self) -> PerturbStatus {
        PerturbStatus(self.status)
    }
}

// SAFETY: the three are `repr(C)` plain old data (Pod) with the exact layout
// the kernels declare; any bit pattern, zeros included, is a valid value.
unsafe impl DeviceRepr for MtTensor {}
unsafe impl DeviceRepr for MtChunk {}
unsafe impl DeviceRepr for NormState {}
unsafe impl ValidAsZeroBits for MtTensor {}
unsafe impl ValidAsZeroBits for MtChunk {}
unsafe impl ValidAsZeroBits for NormState {}

/// A device buffer by address and element count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceBuf {
    /// Device address of the first element (may be 0 when `len` is 0).
    pub ptr: u64,
    /// Number of elements (not bytes).
    pub len: u64,
}

/// One tensor of a group given by raw device addresses (see
/// [`ParamGroup::from_raw`]). `param`, `backup` and `out` hold the parameter
/// type, `grad` the gradient type, `master` f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawTensor {
    /// θ (or the working copy beside f32 master weights); the perturbation
    /// writes it in place, the restore writes it back.
    pub param: DeviceBuf,
    /// The gradient, read.
    pub grad: DeviceBuf,
    /// Where the in-place perturbation saves θ (needed by `PerturbMode::InPlace`
    /// and `restore`).
    pub backup: Option<DeviceBuf>,
    /// f32 master weights (needed by `PerturbMode::Master`; the adaptive norm
    /// then reads θ from here).
    pub master: Option<DeviceBuf>,
    /// The output of `PerturbMode::OutOfPlace`.
    pub out: Option<DeviceBuf>,
}

/// One tensor of a group as cudarc views (see [`ParamGroup::new`]); a
/// `CudaSlice` gives one with `as_view()`, a sub-slice with `slice(a..b)`.
#[derive(Debug)]
///
/// The views are shared borrows, yet the kernels write through `param`,
/// `backup` and `out` (by address): hold no other reference to those buffers
/// while the group is used.
pub struct TensorViews<'a, P, G> {
    /// θ, as in [`RawTensor::param`].
    pub param: CudaView<'a, P>,
    /// The gradient, read.
    pub grad: CudaView<'a, G>,
    /// As [`RawTensor::backup`].
    pub backup: Option<CudaView<'a, P>>,
    /// As [`RawTensor::master`].
    pub master: Option<CudaView<'a, f32>>,
    /// As [`RawTensor::out`].
    pub out: Option<CudaView<'a, P>>,
}

/// Which optional slots every tensor of a group fills.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    /// Every tensor has a backup (in-place perturbation and restore).
    pub backup: bool,
    /// Every tensor has f32 master weights (master-mode perturbation).
    pub master: bool,
    /// Every tensor has an output (out-of-place perturbation).
    pub out: bool,
}

/// The (parameter, gradient) type pairs the kernels are built for.
pub const DTYPE_COMBOS: [(DType, DType); 4] = [
    (DType::F32, DType::F32),
    (DType::F16, DType::F16),
    (DType::BF16, DType::BF16),
    (DType::BF16, DType::F32),
];

/// Validates a group's tensors and builds its device table, on the host.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): no tensors; an unsupported dtype pair; lengths of a tensor's
/// buffers that differ; a null or misaligned (not a multiple of the element
/// size) address of a non-empty buffer; an optional slot filled for some
/// tensors and not others; buffers that overlap; a tensor too long for the
/// chunk index (2^48 elements).
pub fn describe(
    param: DType,
    grad: DType,
    tensors: &[RawTensor],
) -> Result<(Vec<MtTensor>, Roles)> {
    ensure!(
        !tensors.is_empty(),
        "a parameter group needs at least one tensor"
    );
    ensure!(
        tensors.len() <= u32::MAX as usize,
        "too many tensors in one group ({})",
        tensors.len()
    );
    ensure!(
        DTYPE_COMBOS.contains(&(param, grad)),
        "unsupported (param, grad) dtypes ({param:?}, {grad:?}); supported: {DTYPE_COMBOS:?}"
    );
    let first = &tensors[0];
    let roles = Roles {
        backup: first.backup.is_some(),
        master: first.master.is_some(),
        out: first.out.is_some(),
    };
    let mut table = Vec::with_capacity(tensors.len());
    let mut ranges: Vec<(u64, u64, usize)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        ensure!(
            t.backup.is_some() == roles.backup
                && t.master.is_some() == roles.master
                && t.out.is_some() == roles.out,
            "tensor {i}: every tensor of a group must have the same optional buffers \
             (backup/master/out) as tensor 0"
        );
        let len = t.param.len;
        ensure!(
            len.div_ceil(MT_CHUNK) <= u32::MAX as u64,
            "tensor {i}: {len} elements is more than a group can index"
        );
        let mut e = MtTensor {
            len,
            ..Default::default()
        };
        let bufs = [
            (Slot::Param, Some(t.param), param.size(), "param"),
            (Slot::Grad, Some(t.grad), grad.size(), "grad"),
            (Slot::Backup, t.backup, param.size(), "backup"),
            (Slot::Master, t.master, 4, "master"),
            (Slot::Out, t.out, param.size(), "out"),
        ];
        for (slot, buf, size, name) in bufs {
            let Some(b) = buf else { continue };
            ensure!(
                b.len == len,
                "tensor {i}: {name} has {} elements but param has {len}",
                b.len
            );
            if len == 0 {
                continue;
            }
            ensure!(b.ptr != 0, "tensor {i}: {name} is a null device pointer");
            ensure!(
                b.ptr % size as u64 == 0,
                "tensor {i}: {name} address {:#x} is not aligned to its {size}-byte elements",
                b.ptr
            );
            let end = super::buffer_end(&format!("tensor {i}: {name}"), b.ptr, len, size)?;
            e.ptr[slot as usize] = b.ptr;
            ranges.push((b.ptr, end, i));
        }
        table.push(e);
    }
    // Every buffer is read or written by one kernel at once: none may overlap.
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        ensure!(
            w[1].0 >= w[0].1,
            "buffers of tensors {} and {} overlap (at {:#x})",
            w[0].2,
            w[1].2,
            w[1].0
        );
    }
    Ok((table, roles))
}

/// The chunk list of a group: every chunk of the tensors with `active[i]` set
/// (in table order, chunks `0..ceil(len / MT_CHUNK)` each), then those of the
/// others. Kernels that skip tensors without a gradient read the first
/// `active` entries; the out-of-place perturbation also walks the rest (it
/// copies θ there). Empty tensors have no chunks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkMap {
    /// Every chunk: those of tensors with a gradient first.
    pub chunks: Vec<MtChunk>,
    /// How many leading entries of `chunks` belong to tensors with a gradient.
    pub active: usize,
}

/// Builds the [`ChunkMap`] of tensors of lengths `lens`.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): a flag count other than the tensor count, or more chunks in all
/// than one launch can index (2³² − 1), sizes checked without overflow.
pub fn chunk_map(lens: &[u64], active: &[bool]) -> Result<ChunkMap> {
    ensure!(
        lens.len() == active.len(),
        "{} has-gradient flags for {} tensors",
        active.len(),
        lens.len()
    );
    let total = lens
        .iter()
        .try_fold(0u64, |n, &l| n.checked_add(l.div_ceil(MT_CHUNK)))
        .filter(|&n| n <= u32::MAX as u64);
    let Some(total) = total else {
        return Err(crate::Error::InvalidArgument(format!(
            "{} tensors of {} elements in all are more chunks than one launch can index (2^32 - 1)",
            lens.len(),
            lens.iter().map(|&l| l as u128).sum::<u128>()
        )));
    };
    let mut chunks = Vec::with_capacity(total as usize);
    let mut n_active = 0;
    for pass in [true, false] {
        for (t, &len) in lens.iter().enumerate() {
            if active[t] != pass {
                continue;
            }
            for index in 0..len.div_ceil(MT_CHUNK) as u32 {
                chunks.push(MtChunk {
                    tensor: t as u32,
                    index,
                });
            }
        }
        if pass {
            n_active = chunks.len();
        }
    }
    Ok(ChunkMap {
        chunks,
        active: n_active,
    })
}

/// The tensors of a model (or a shard of it), described once and reused by
/// [`grad_norm`](super::grad_norm), [`perturb`](super::perturb) and
/// [`restore`](super::restore) every step.
///
/// The lifetime ties a group built from cudarc views to them; a group built
/// from raw pointers is `'static` and relies on its caller (see
/// [`ParamGroup::from_raw`]). The kernels write the parameters, backups and
/// outputs through the addresses recorded here, on the group's stream: work
/// on other streams that touches those buffers must be ordered by the caller.
pub struct ParamGroup<'a> {
    param_dtype: DType,
    grad_dtype: DType,
    roles: Roles,
    lens: Vec<u64>,
    has_grad: Vec<bool>,
    chunks: ChunkMap,
    stream: Arc<CudaStream>,
    // Owned device buffers, used through `addrs`.
    table_dev: CudaSlice<MtTensor>,
    chunks_dev: CudaSlice<MtChunk>,
    n_chunks_dev: CudaSlice<u32>,
    _partials: CudaSlice<f64>,
    _counter: CudaSlice<u32>,
    state: CudaSlice<NormState>,
    /// Addresses of the buffers above, taken once: launches pass them as
    /// plain arguments (no event bookkeeping per launch, capturable in a
    /// CUDA graph). Order: table, chunks, n_chunks, partials, counter, state.
    addrs: [u64; 6],
    norm_grid: u32,
    perturb_grid: [u32; 3],
    restore_grid: u32,
    _views: PhantomData<&'a ()>,
}

impl std::fmt::Debug for ParamGroup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamGroup")
            .field("param_dtype", &self.param_dtype)
            .field("grad_dtype", &self.grad_dtype)
            .field("tensors", &self.lens.len())
            .field("elements", &self.num_elements())
            .field("active_chunks", &self.chunks.active)
            .field("roles", &self.roles)
            .finish()
    }
}

impl<'a> ParamGroup<'a> {
    /// A group over cudarc views of the parameters `P` and gradients `G`
    /// (and, optionally, backups, f32 master weights, outputs), all with the
    /// backend's context. Every tensor starts with a gradient.
    ///
    /// # Errors
    /// As [`describe`]: lengths that differ, no tensors, an unsupported
    /// `(P, G)` pair, overlapping views; and a view of another context than
    /// the backend's. [`Error::Driver`](crate::Error::Driver) when an upload or allocation fails.
    pub fn new<P: Element, G: Element>(
        backend: &CudaBackend,
        tensors: &[TensorViews<'a, P, G>],
    ) -> Result<Self> {
        let stream = backend.stream();
        let ctx = backend.context();
        for (i, t) in tensors.iter().enumerate() {
            let same = t.param.stream().context() == ctx
                && t.grad.stream().context() == ctx
                && t.backup
                    .as_ref()
                    .is_none_or(|v| v.stream().context() == ctx)
                && t.master
                    .as_ref()
                    .is_none_or(|v| v.stream().context() == ctx)
                && t.out.as_ref().is_none_or(|v| v.stream().context() == ctx);
            ensure!(same, "tensor {i}: a buffer belongs to another CUDA context");
        }
        let raw: Vec<RawTensor> = tensors
            .iter()
            .map(|t| RawTensor {
                param: view_buf(&t.param, stream),
                grad: view_buf(&t.grad, stream),
                backup: t.backup.as_ref().map(|v| view_buf(v, stream)),
                master: t.master.as_ref().map(|v| view_buf(v, stream)),
                out: t.out.as_ref().map(|v| view_buf(v, stream)),
            })
            .collect();
        Self::build(backend, P::DTYPE, G::DTYPE, &raw)
    }
}

fn view_buf<T>(v: &CudaView<'_, T>, stream: &CudaStream) -> DeviceBuf {
    // The address alone is kept; the guard only records a read event.
    let (ptr, _guard) = v.device_ptr(stream);
    DeviceBuf {
        ptr,
        len: v.len() as u64,
    }
}

impl ParamGroup<'static> {
    /// A group over raw device addresses, for framework backends (PyTorch
    /// `data_ptr()`, candle storage...).
    ///
    /// # Safety
    /// For as long as the group is used, every non-empty buffer must be a live
    /// allocation of the backend's context holding `len` elements of its type
    /// (`param`, `backup`, `out`: `param_dtype`; `grad`: `grad_dtype`;
    /// `master`: f32), and nothing else may write those buffers (or read the
    /// ones a launch writes) while a launch on the group's stream is pending,
    /// unless ordered with that stream. The checks of [`describe`] (lengths,
    /// alignment, null, overlap) still apply and return `Err`.
    ///
    /// # Errors
    /// As [`describe`]; [`Error::Driver`](crate::Error::Driver) when an upload or allocation fails.
    pub unsafe fn from_raw(
        backend: &CudaBackend,
        param_dtype: DType,
        grad_dtype: DType,
        tensors: &[RawTensor],
    ) -> Result<Self> {
        Self::build(backend, param_dtype, grad_dtype, tensors)
    }
}

impl<'a> ParamGroup<'a> {
    fn build(
        backend: &CudaBackend,
        param_dtype: DType,
        grad_dtype: DType,
        tensors: &[RawTensor],
    ) -> Result<Self> {
        let (table, roles) = describe(param_dtype, grad_dtype, tensors)?;
        Self::from_table(backend, param_dtype, grad_dtype, roles, table)
    }

    /// A group over table rows its caller validated as [`describe`] does
    /// (the TRAM step, which checks its one description of every role): a
    /// gradient slot may be 0 for a tensor that never has a gradient, which
    /// the caller keeps out of the active chunks.
    pub(crate) fn from_table(
        backend: &CudaBackend,
        param_dtype: DType,
        grad_dtype: DType,
        roles: Roles,
        table: Vec<MtTensor>,
    ) -> Result<Self> {
        ensure!(
            !table.is_empty(),
            "a parameter group needs at least one tensor"
        );
        let lens: Vec<u64> = table.iter().map(|t| t.len).collect();
        let has_grad = vec![true; lens.len()];
        let chunks = chunk_map(&lens, &has_grad)?;
        let stream = backend.stream().clone();

        // Fill the GPU: as many blocks as fit on every SM at once. (The
        // occupancy queries need the context current on this thread.)
        backend.context().bind_to_thread()?;
        let sm = backend.sm_count();
        let theta = if roles.master {
            DType::F32
        } else {
            param_dtype
        };
        let grid_of = |name: String| -> Result<u32> {
            let per_sm = backend
                .function(&name)?
                .occupancy_max_active_blocks_per_multiprocessor(BLOCK_THREADS, 0, None)?;
            Ok(sm * per_sm.clamp(1, 8))
        };
        let (p, g) = (param_dtype.name(), grad_dtype.name());
        // No more blocks than chunks: the others would find no work (every
        // grid still walks the list with a stride, and the norm's sum order
        // depends only on the group).
        let n_chunks = (chunks.chunks.len() as u32).max(1);
        let norm_grid = grid_of(format!("grad_norm_{}_{g}", theta.name()))?.min(n_chunks);
        let mut perturb_grid = [0; 3];
        for (grid, mode) in perturb_grid.iter_mut().zip(PerturbMode::ALL) {
            *grid = grid_of(format!("perturb_{}_{p}_{g}", mode.kernel_name()))?.min(n_chunks);
        }
        let restore_grid = grid_of(format!("restore_b{}", 8 * param_dtype.size()))?.min(n_chunks);

        let table_dev = stream.clone_htod(&table)?;
        // Every chunk is in the list, so toggling gradients only reorders it.
        let mut chunks_dev = stream.alloc_zeros::<MtChunk>(chunks.chunks.len().max(1))?;
        if !chunks.chunks.is_empty() {
            stream.memcpy_htod(&chunks.chunks, &mut chunks_dev)?;
        }
        // [chunks with a gradient, all chunks] as the kernels read them, then
        // the same pair again: a TRAM step's gate zeroes the first pair for
        // a first step it refuses and copies the second back for the next.
        let counts = [chunks.active as u32, chunks.chunks.len() as u32];
        let n_chunks_dev = stream.clone_htod(&[counts[0], counts[1], counts[0], counts[1]])?;
        // One sum and one found-inf flag per block.
        let partials = stream.alloc_zeros::<f64>(2 * norm_grid as usize)?;
        // [norm ticket, perturbation ticket, perturbation overflow count]:
        // each kernel leaves its words zero.
        let counter = stream.alloc_zeros::<u32>(3)?;
        let state = stream.alloc_zeros::<NormState>(1)?;
        let addrs = [
            addr(&table_dev, &stream),
            addr(&chunks_dev, &stream),
            addr(&n_chunks_dev, &stream),
            addr(&partials, &stream),
            addr(&counter, &stream),
            addr(&state, &stream),
        ];
        Ok(Self {
            param_dtype,
            grad_dtype,
            roles,
            lens,
            has_grad,
            chunks,
            stream,
            table_dev,
            chunks_dev,
            n_chunks_dev,
            _partials: partials,
            _counter: counter,
            state,
            addrs,
            norm_grid,
            perturb_grid,
            restore_grid,
            _views: PhantomData,
        })
    }

    /// Marks which tensors have a gradient this step (PyTorch skips
    /// `p.grad is None`); the others are left out of every launch until set
    /// again. Rebuilds only the chunk list, into its existing device buffer,
    /// with an asynchronous copy on the group's stream: call it between steps
    /// (a copy from pageable memory may wait for the stream), never between a
    /// perturbation and its restore.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a flag count other than the tensor count; [`Error::Driver`](crate::Error::Driver) when the
    /// copy fails.
    pub fn set_has_grad(&mut self, has_grad: &[bool]) -> Result<()> {
        let chunks = chunk_map(&self.lens, has_grad)?;
        if !chunks.chunks.is_empty() {
            self.stream
                .memcpy_htod(&chunks.chunks, &mut self.chunks_dev)?;
        }
        let (a, n) = (chunks.active as u32, chunks.chunks.len() as u32);
        self.stream
            .memcpy_htod(&[a, n, a, n], &mut self.n_chunks_dev)?;
        self.chunks = chunks;
        self.has_grad.copy_from_slice(has_grad);
        Ok(())
    }

    /// Replaces the table's rows with rows of the same lengths (new
    /// addresses; validated by the caller): an async copy into the same
    /// device table, which launches enqueued (or replayed) after it read.
    pub(crate) fn rewrite_table(&mut self, rows: &[MtTensor]) -> Result<()> {
        ensure!(
            rows.len() == self.lens.len() && rows.iter().zip(&self.lens).all(|(r, &l)| r.len == l),
            "a group's table can only be rewritten with tensors of the same lengths"
        );
        self.stream.memcpy_htod(rows, &mut self.table_dev)?;
        Ok(())
    }

    /// Which tensors have a gradient this step.
    pub fn has_grad(&self) -> &[bool] {
        &self.has_grad
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Never true: a group has at least one tensor.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Elements of every tensor, with or without a gradient.
    pub fn num_elements(&self) -> u64 {
        self.lens.iter().sum()
    }

    /// Elements of the tensors with a gradient this step.
    pub fn active_elements(&self) -> u64 {
        self.lens
            .iter()
            .zip(&self.has_grad)
            .filter(|(_, &a)| a)
            .map(|(&l, _)| l)
            .sum()
    }

    /// The chunk list (those of tensors with a gradient first).
    pub fn chunk_map(&self) -> &ChunkMap {
        &self.chunks
    }

    /// The parameters' element type (also that of the backups and outputs).
    pub fn param_dtype(&self) -> DType {
        self.param_dtype
    }

    /// The gradients' element type.
    pub fn grad_dtype(&self) -> DType {
        self.grad_dtype
    }

    /// Which optional buffers the tensors have.
    pub fn roles(&self) -> Roles {
        self.roles
    }

    /// The stream every launch on this group goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device [`NormState`] (one element).
    pub fn state(&self) -> &CudaSlice<NormState> {
        &self.state
    }

    /// The device [`NormState`], writable: e.g. for an all-reduce of `sum_sq`
    /// in place, or to reset it.
    pub fn state_mut(&mut self) -> &mut CudaSlice<NormState> {
        &mut self.state
    }

    /// The device address of the [`NormState`]; its `sum_sq` (f64) is at
    /// offset 0, for an all-reduce across ranks.
    pub fn state_ptr(&self) -> u64 {
        self.addrs[5]
    }

    /// Copies the [`NormState`] to the host. This waits for the stream: call
    /// it outside the step (e.g. to log the status of the previous one).
    ///
    /// # Errors
    /// [`Error::Driver`](crate::Error::Driver) when the copy fails.
    pub fn read_state(&self) -> Result<NormState> {
        let v = self.stream.clone_dtoh(&self.state)?;
        Ok(v[0])
    }

    /// Blocks of the norm launch (a multiple of the SM count); one f64
    /// partial (and one flag) each.
    pub fn norm_grid(&self) -> u32 {
        self.norm_grid
    }

    /// Blocks of a perturbation launch: as many as fit at once, on every SM.
    pub fn perturb_grid(&self, mode: PerturbMode) -> u32 {
        self.perturb_grid[mode as usize]
    }

    /// Blocks of a restore launch: as many as fit at once, on every SM.
    pub fn restore_grid(&self) -> u32 {
        self.restore_grid
    }

    pub(crate) fn check_backend(&self, backend: &CudaBackend) -> Result<()> {
        ensure!(
            **backend.stream() == *self.stream,
            "the backend's stream is not the one this group was built on"
        );
        Ok(())
    }

    pub(crate) fn table_ptr(&self) -> u64 {
        self.addrs[0]
    }

    pub(crate) fn chunks_ptr(&self) -> u64 {
        self.addrs[1]
    }

    pub(crate) fn n_chunks_ptr(&self) -> u64 {
        self.addrs[2]
    }

    pub(crate) fn partials_ptr(&self) -> u64 {
        self.addrs[3]
    }

    pub(crate) fn counter_ptr(&self) -> u64 {
        self.addrs[4]
    }

    /// The perturbation's two scratch words (after the norm's counter).
    pub(crate) fn perturb_scratch_ptr(&self) -> u64 {
        self.addrs[4] + 4
    }
}

fn addr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    // The guard only records a read event; the address stays valid while `s` lives.
    let (p, _guard) = s.device_ptr(stream);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(ptr: u64, len: u64) -> DeviceBuf {
        DeviceBuf { ptr, len }
    }

    fn tensor(param: u64, grad: u64, len: u64) -> RawTensor {
        RawTensor {
            param: buf(param, len),
            grad: buf(grad, len),
            ..Default::default()
        }
    }

    fn pairs(chunks: &[MtChunk]) -> Vec<(u32, u32)> {
        chunks.iter().map(|c| (c.tensor, c.index)).collect()
    }

    #[test]
    fn chunks_cover_each_tensor_in_order() {
        let lens = [1, MT_CHUNK, MT_CHUNK + 1, 0, 3 * MT_CHUNK - 1];
        let map = chunk_map(&lens, &[true; 5]).unwrap();
        let expect = vec![(0, 0), (1, 0), (2, 0), (2, 1), (4, 0), (4, 1), (4, 2)];
        assert_eq!(pairs(&map.chunks), expect);
        assert_eq!(map.active, 7);
        // Every element of every tensor is in exactly one chunk.
        for (t, &len) in lens.iter().enumerate() {
            let covered: u64 = map
                .chunks
                .iter()
                .filter(|c| c.tensor as usize == t)
                .map(|c| {
                    let begin = c.index as u64 * MT_CHUNK;
                    (begin + MT_CHUNK).min(len) - begin
                })
                .sum();
            assert_eq!(covered, len, "tensor {t}");
        }
    }

    #[test]
    fn inactive_tensors_come_last_and_empty_ones_nowhere() {
        let lens = [10, 0, 2 * MT_CHUNK, 5];
        let map = chunk_map(&lens, &[false, true, true, false]).unwrap();
        assert_eq!(map.active, 2);
        assert_eq!(pairs(&map.chunks), vec![(2, 0), (2, 1), (0, 0), (3, 0)]);
        let none = chunk_map(&lens, &[false; 4]).unwrap();
        assert_eq!(none.active, 0);
        assert_eq!(pairs(&none.chunks), vec![(0, 0), (2, 0), (2, 1), (3, 0)]);
        assert!(chunk_map(&lens, &[true; 3]).is_err());
    }

    #[test]
    fn chunks_index_tensors_beyond_2_pow_32_elements() {
        let len = (1u64 << 33) + 5;
        let map = chunk_map(&[7, len], &[true, true]).unwrap();
        let last = map.chunks.last().unwrap();
        assert_eq!(last.tensor, 1);
        assert_eq!(last.index as u64, len.div_ceil(MT_CHUNK) - 1);
        assert_eq!(map.chunks.len() as u64, 1 + len.div_ceil(MT_CHUNK));
        // The last chunk's 64-bit offset is past 2^32 and it holds the tail.
        let begin = last.index as u64 * MT_CHUNK;
        assert!(begin > u32::MAX as u64);
        assert_eq!(len - begin, 5);
    }

    #[test]
    fn chunk_counts_that_overflow_are_errors() {
        // 65,536 × 2^48 chunks: the u64 count wraps to 0.
        let lens = vec![u64::MAX; 1 << 16];
        assert!(chunk_map(&lens, &vec![true; 1 << 16]).is_err());
        assert!(chunk_map(&[u64::MAX, u64::MAX], &[true, false]).is_err());
        // Just within one launch's index: 2^32 − 1 chunks (not built here).
        let within = [(u32::MAX as u64 - 1) * MT_CHUNK, 0];
        let total: u64 = within.iter().map(|l| l.div_ceil(MT_CHUNK)).sum();
        assert_eq!(total, u32::MAX as u64 - 1);
    }

    #[test]
    fn describe_builds_the_table() {
        let t0 = RawTensor {
            param: buf(0x1000, 3),
            grad: buf(0x2000, 3),
            backup: Some(buf(0x3000, 3)),
            master: None,
            out: None,
        };
        let t1 = RawTensor {
            param: buf(0x3_0000_0000_0000, 1 << 40),
            grad: buf(0x1_0000_0000_0000, 1 << 40),
            backup: Some(buf(0x3002, 0)), // wrong length
            master: None,
            out: None,
        };
        assert!(describe(DType::BF16, DType::F32, &[t0, t1]).is_err());
        let t1 = RawTensor {
            backup: Some(buf(0x2_0000_0000_0000, 1 << 40)),
            ..t1
        };
        let (table, roles) = describe(DType::BF16, DType::F32, &[t0, t1]).unwrap();
        assert_eq!(
            roles,
            Roles {
                backup: true,
                master: false,
                out: false
            }
        );
        assert_eq!(table[0].ptr, [0x1000, 0x2000, 0x3000, 0, 0, 0]);
        assert_eq!(table[1].len, 1 << 40);
        assert_eq!(table[1].ptr[Slot::Backup as usize], 0x2_0000_0000_0000);
    }

    #[test]
    fn describe_rejects_bad_groups() {
        let ok = tensor(0x1000, 0x2000, 4);
        assert!(describe(DType::F32, DType::F32, &[ok]).is_ok());
        // Empty group, dtype pairs without kernels.
        assert!(describe(DType::F32, DType::F32, &[]).is_err());
        assert!(describe(DType::F32, DType::BF16, &[ok]).is_err());
        assert!(describe(DType::F16, DType::F32, &[ok]).is_err());
        // Length mismatch between param and grad.
        let mut t = ok;
        t.grad.len = 5;
        assert!(describe(DType::F32, DType::F32, &[t]).is_err());
        // Null and misaligned addresses.
        assert!(describe(DType::F32, DType::F32, &[tensor(0, 0x2000, 4)]).is_err());
        assert!(describe(DType::F32, DType::F32, &[tensor(0x1002, 0x2000, 4)]).is_err());
        assert!(describe(DType::BF16, DType::BF16, &[tensor(0x1002, 0x2000, 4)]).is_ok());
        // Overlap: grad inside param, or two tensors sharing memory.
        assert!(describe(DType::F32, DType::F32, &[tensor(0x1000, 0x1008, 4)]).is_err());
        let other = tensor(0x100c, 0x3000, 4);
        assert!(describe(DType::F32, DType::F32, &[ok, other]).is_err());
        let adjacent = tensor(0x1010, 0x3000, 4);
        assert!(describe(DType::F32, DType::F32, &[ok, adjacent]).is_ok());
        // Optional buffers on some tensors only.
        let mut with_out = adjacent;
        with_out.out = Some(buf(0x4000, 4));
        assert!(describe(DType::F32, DType::F32, &[ok, with_out]).is_err());
        // Empty tensors are fine and may have null addresses.
        assert!(describe(DType::F32, DType::F32, &[ok, tensor(0, 0, 0)]).is_ok());
    }
}
