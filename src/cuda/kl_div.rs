//! Fused KL divergence over logits on the GPU (kernel: `kernels/kl_div.cu`).
//!
//! Target logits `a` give P, model logits `b` give Q, both `rows × vocab` with
//! their own row strides; the semantics (direction, temperature τ, row mask,
//! reductions, edge cases) are those of [`crate::cpu::kl_div`], the oracle of
//! the GPU tests.
//!
//! # Launches
//! The loss is two launches, the gradient one more, all on the backend's
//! stream, with no allocation and no host sync (the [`KlWorkspace`] is
//! allocated once):
//! 1. `kl_div_partials_*`: one block per (row, chunk). Each thread keeps the
//!    mergeable centred partials of [`crate::cpu::kl_div`]'s numerics in f32 (the
//!    logit difference formed exactly: in f64 for f32 inputs); warp, block and
//!    multi-block merges run in f64. Long rows are split over several blocks
//!    so that few rows still fill the GPU ([`kl_geometry`]).
//! 2. `kl_div_finish`: one block merges the chunks of each row in a fixed
//!    order, finalises the rows, writes the optional per-row values and
//!    reduces them in a fixed f64 tree to the device scalar
//!    ([`KlWorkspace::value`]). Results are bit-identical from run to run on
//!    one device (no atomics; the geometry depends only on the shape and the
//!    SM count).
//! 3. `kl_div_grad_*` (with the gradient): re-reads `a` and `b` once with the
//!    per-row statistics and writes dL/d(model) and optionally dL/d(target).
//!
//! # Outputs
//! * The reduced value, an f32 device scalar in the workspace, which the
//!   perturbation kernel reads directly; [`KlWorkspace::read`] syncs and
//!   returns it in f64 with the per-row values.
//! * Optional per-row values, f32, one per row (0 for masked rows).
//! * Gradients in the logits' dtype, rounded to nearest even, into separate
//!   buffers with their own row stride, or in place over the inputs through
//!   [`kl_div_raw`]. They are the gradient of the reduced value (the sum for
//!   [`Reduction::None`]) times `upstream` (a host f32) times an optional
//!   device f32 factor; 1/τ is included. Masked rows get zeros; a row whose
//!   divergence is NaN or +∞ gets NaN. Elements between `vocab` and the row
//!   stride are never touched.
//!
//! # Error bound (against the f64 centred oracle on the same upcast inputs)
//! * Per row, relative error ≤ 1e-4 of the row's KL, for every direction,
//!   temperature and dtype, at logit gaps from 1 down to 1e-5 (KL from ~0.4
//!   down to ~1e-10 at σ = 3; f32 inputs also at σ = 30, KL ~1e-17). Why: each
//!   thread sums a few hundred f32 terms with the logit difference exact, and
//!   every merge is f64; rows whose centred KL exceeds 1 (or whose centred
//!   sums overflow) use the classical `Σ p d − lse_a + lse_b`, whose error
//!   ε·|lse| is negligible there. The reduced value inherits the bound (f64
//!   sum), then one f32 rounding for the device scalar.
//! * Outside the bound: rows whose divergence is carried only by elements
//!   whose weight e^((a − max a)/τ) is below f32's normal range (~1e-38), e.g.
//!   f16/bf16 rows at σ = 30 whose KL is ~1e-70; their relative error can
//!   reach ~1e-3 (f32 subnormals).
//! * Also outside it: logits far apart in magnitude. The difference a − b is
//!   formed in f64 for f32 inputs and in f32 for f16/bf16, exact only while a
//!   and b lie within ~29 binades of each other (f32; ~13 for f16, ~16 for
//!   bf16); beyond, its rounding (about 1e-16·|a − b| for f32) enters every x.
//!   Measured with the kernel's numerics compiled for the host, f32, one
//!   side constant at an offset and the other ~ N(0, 9), V = 1,000: relative
//!   error 7e-9 at 1e6 and 8e-9 at 1e8 (tests/gpu_kl_div.rs checks offsets up
//!   to 1e8 within the bound, gradients included), 4e-7 at 1e10, 0.5 at 1e16,
//!   1.0 at 3e38; f16 at 65,504 against the same spread misses the gradient
//!   bound. The CPU reference has no such limit (it carries the difference
//!   exactly).
//! * Gradients: each entry within 1e-4·|g| + 1e-5·max_row|g| of the oracle
//!   before the final rounding to the output dtype (½ ulp of that dtype more).
//!   `q − p` is formed as `p·expm1(log q − log p)` with the reference kept at
//!   the row's argmax (x = 0 there exactly), never from two rounded softmaxes.
//!
//! These are what tests/gpu_kl_div.rs checks on a GPU, against the CPU
//! reference on fresh random inputs with poisoned outputs.

use bytemuck::{Pod, Zeroable};
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::buffer::{DevMut, DevRef};
use super::CudaBackend;
use crate::config::{KlDirection, KlOptions, Reduction};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Result};

/// Threads per block of the partial and gradient kernels (`KL_THREADS`).
pub const THREADS: u32 = 256;
/// Threads of the one-block finish kernel (`KL_FINISH_THREADS`).
const FINISH_THREADS: u32 = 256;
/// Resident 256-thread blocks per SM the partial kernel is sized for
/// (`KL_PARTIAL_BLOCKS_PER_SM`: at most 85 registers per thread, so three
/// blocks fit the 64K-register file).
pub const BLOCKS_PER_SM: usize = 3;
/// A block's chunk of a row is at least this many elements (32 per thread),
/// so that the merge cost stays small against the streaming.
pub const MIN_CHUNK: usize = 8192;
/// Chunks start on multiples of this many elements, so a chunk keeps its
/// row's 16-byte alignment for every dtype (8 × 2 bytes, 4 × 4 bytes).
pub const CHUNK_ALIGN: usize = 8;

/// `KlPartial` in the kernel.
const PARTIAL_BYTES: usize = 104;

/// The per-row statistics the kernels keep in the workspace (`KlRowStats`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct RowStats {
    c_f: f64,
    c_r: f64,
    kl: f64,
    ma: f32,
    log_sa: f32,
    mb: f32,
    log_sb: f32,
    alpha_f: f32,
    l_f: f32,
    alpha_r: f32,
    l_r: f32,
    flags: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<RowStats>() == 64);

/// How a `rows × vocab` problem is split over blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KlGeometry {
    /// Blocks per row (1: the block finalises its row itself).
    pub blocks_per_row: usize,
    /// Elements per block's chunk (a multiple of [`CHUNK_ALIGN`] unless one
    /// chunk covers the row); the last chunk may be shorter.
    pub chunk: usize,
}

impl KlGeometry {
    /// Blocks in the grid of the partial and gradient kernels.
    pub fn blocks(&self, rows: usize) -> usize {
        rows * self.blocks_per_row
    }
}

/// Splits rows over blocks: one block per row when there are enough rows to
/// fill `sm_count` SMs; otherwise up to `BLOCKS_PER_SM · sm_count / rows`
/// blocks per row (one wave, no tail), each with at least [`MIN_CHUNK`]
/// elements. Every chunk is non-empty.
pub fn kl_geometry(rows: usize, vocab: usize, sm_count: u32) -> KlGeometry {
    let slots = BLOCKS_PER_SM * (sm_count.max(1) as usize);
    let want = (slots / rows.max(1)).max(1);
    let by_len = (vocab / MIN_CHUNK).max(1);
    let split = want.min(by_len);
    if split <= 1 {
        return KlGeometry {
            blocks_per_row: 1,
            chunk: vocab.max(1),
        };
    }
    let chunk = vocab.div_ceil(split).next_multiple_of(CHUNK_ALIGN);
    KlGeometry {
        blocks_per_row: vocab.div_ceil(chunk),
        chunk,
    }
}

/// Partials the workspace needs for any number of rows on `sm_count` SMs:
/// a split row never uses more than one wave of blocks.
pub fn partials_capacity(sm_count: u32) -> usize {
    BLOCKS_PER_SM * (sm_count.max(1) as usize)
}

/// Device memory reused by every call: per-row statistics for up to
/// `max_rows` rows, the multi-block partials, and the output scalars.
/// Allocate once per maximum shape; calls then allocate nothing.
pub struct KlWorkspace {
    max_rows: usize,
    partial_cap: usize,
    stats: CudaSlice<u8>,
    partials: CudaSlice<u8>,
    /// [value (f64), unmasked rows, the reduction's scale, 0].
    scalars: CudaSlice<f64>,
    value: CudaSlice<f32>,
    /// Addresses of the four buffers above, taken once: launches pass them
    /// as plain arguments (no event bookkeeping, capturable).
    addrs: WsAddrs,
}

#[derive(Clone, Copy)]
struct WsAddrs {
    stats: u64,
    partials: u64,
    scalars: u64,
    value: u64,
}

impl std::fmt::Debug for KlWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KlWorkspace")
            .field("max_rows", &self.max_rows)
            .field("partial_cap", &self.partial_cap)
            .finish()
    }
}

/// The results of the last call, read back to the host.
#[derive(Clone, Debug, PartialEq)]
pub struct KlReadback {
    /// The reduced value, f64 (the device scalar is this rounded to f32).
    pub value: f64,
    /// Per-row divergences, f64; 0 for masked rows.
    pub per_row: Vec<f64>,
    /// Rows whose mask byte is non-zero (all rows without a mask).
    pub unmasked_rows: usize,
    /// Every row was masked (the means are then 0).
    pub all_masked: bool,
}

impl KlWorkspace {
    /// Bytes of device memory a workspace for `max_rows` rows takes on a
    /// device with `sm_count` SMs; `Err` when that does not fit in a `usize`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) when the size overflows `usize`.
    pub fn bytes(max_rows: usize, sm_count: u32) -> Result<usize> {
        partials_capacity(sm_count)
            .checked_mul(PARTIAL_BYTES)
            .and_then(|p| p.checked_add(Self::stats_bytes(max_rows).ok()?))
            .and_then(|b| b.checked_add(4 * 8 + 4))
            .ok_or_else(|| too_many_rows(max_rows))
    }

    fn stats_bytes(max_rows: usize) -> Result<usize> {
        max_rows
            .checked_mul(std::mem::size_of::<RowStats>())
            .ok_or_else(|| too_many_rows(max_rows))
    }

    /// A workspace for problems of up to `max_rows` rows (any vocabulary).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for `max_rows` = 0 or a size that overflows ([`KlWorkspace::bytes`]);
    /// [`Error::Driver`](crate::Error::Driver) when the allocation fails.
    pub fn new(backend: &CudaBackend, max_rows: usize) -> Result<Self> {
        ensure!(max_rows > 0, "KlWorkspace needs max_rows > 0");
        Self::bytes(max_rows, backend.sm_count())?;
        let stream = backend.stream();
        let partial_cap = partials_capacity(backend.sm_count());
        let stats = stream.alloc_zeros::<u8>(Self::stats_bytes(max_rows)?)?;
        let partials = stream.alloc_zeros::<u8>(partial_cap * PARTIAL_BYTES)?;
        let scalars = stream.alloc_zeros::<f64>(4)?;
        let value = stream.alloc_zeros::<f32>(1)?;
        let addrs = WsAddrs {
            stats: DevRef::new(&stats).ptr(),
            partials: DevRef::new(&partials).ptr(),
            scalars: DevRef::new(&scalars).ptr(),
            value: DevRef::new(&value).ptr(),
        };
        Ok(Self {
            max_rows,
            partial_cap,
            stats,
            partials,
            scalars,
            value,
            addrs,
        })
    }

    /// The device address of [`KlWorkspace::value`] (one f32), for launches
    /// that read the divergence (the perturbation).
    pub fn value_ptr(&self) -> u64 {
        self.addrs.value
    }

    /// The largest row count this workspace serves.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// The reduced value of the last call, an f32 device scalar (written on
    /// the backend's stream; readers on that stream need no sync).
    pub fn value(&self) -> &CudaSlice<f32> {
        &self.value
    }

    /// Overwrites every result the workspace holds (the device scalar, the
    /// per-row values and statistics) with NaN, asynchronously, so that a
    /// result a later call failed to write cannot pass for a fresh one.
    ///
    /// # Errors
    /// [`Error::Driver`](crate::Error::Driver) when a copy fails.
    pub fn poison(&mut self, backend: &CudaBackend) -> Result<()> {
        let stream = backend.stream();
        stream.memcpy_htod(&[f32::NAN], &mut self.value)?;
        stream.memcpy_htod(&[f64::NAN; 4], &mut self.scalars)?;
        stream.memcpy_htod(&vec![0xffu8; self.stats.len()], &mut self.stats)?;
        stream.memcpy_htod(&vec![0xffu8; self.partials.len()], &mut self.partials)?;
        Ok(())
    }

    /// Waits for the stream and reads the last call's results for its `rows`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for more rows than the workspace holds; [`Error::Driver`](crate::Error::Driver) when a copy fails.
    pub fn read(&self, backend: &CudaBackend, rows: usize) -> Result<KlReadback> {
        ensure!(
            rows <= self.max_rows,
            "read of {rows} rows from a workspace of {}",
            self.max_rows
        );
        let stream = backend.stream();
        let scalars = stream.clone_dtoh(&self.scalars)?;
        let bytes = if rows == 0 {
            Vec::new()
        } else {
            stream.clone_dtoh(&self.stats.slice(..rows * std::mem::size_of::<RowStats>()))?
        };
        stream.synchronize()?;
        let per_row = bytes
            .chunks_exact(std::mem::size_of::<RowStats>())
            .map(|c| bytemuck::pod_read_unaligned::<RowStats>(c).kl)
            .collect();
        let unmasked_rows = scalars[1] as usize;
        Ok(KlReadback {
            value: scalars[0],
            per_row,
            unmasked_rows,
            all_masked: unmasked_rows == 0,
        })
    }
}

fn too_many_rows(max_rows: usize) -> crate::Error {
    crate::Error::InvalidArgument(format!(
        "a KL workspace for {max_rows} rows needs more bytes than a usize holds"
    ))
}

/// A row-major logit matrix on the device: `rows × vocab`, row `r` starting at
/// element `r · row_stride` of `data`.
///
/// The address is taken when the view is built (see [`DevRef`]): build it
/// before a CUDA graph capture begins.
#[derive(Clone, Copy)]
pub struct DeviceLogits<'a, T> {
    data: DevRef<'a, T>,
    rows: usize,
    vocab: usize,
    row_stride: usize,
}

/// Elements a `rows × vocab` matrix with this stride spans.
fn span(rows: usize, vocab: usize, row_stride: usize) -> Option<usize> {
    if rows == 0 {
        return Some(0);
    }
    (rows - 1).checked_mul(row_stride)?.checked_add(vocab)
}

fn check_shape(what: &str, rows: usize, vocab: usize, row_stride: usize, len: usize) -> Result<()> {
    ensure!(vocab > 0, "{what}: vocab must be > 0");
    ensure!(
        row_stride >= vocab,
        "{what}: row stride {row_stride} is shorter than the vocabulary {vocab}"
    );
    let need = span(rows, vocab, row_stride);
    ensure!(
        need.is_some_and(|n| n <= len),
        "{what}: {rows} rows of {vocab} with stride {row_stride} need {need:?} elements, the buffer has {len}"
    );
    ensure!(
        row_stride <= i64::MAX as usize / 4,
        "{what}: row stride {row_stride} is too large"
    );
    Ok(())
}

impl<'a, T> DeviceLogits<'a, T> {
    /// A strided view; `Err` when the shape does not fit in `data`.
    ///
    /// # Errors
    /// As [`DeviceLogits::from_ref`].
    pub fn new(
        data: CudaView<'a, T>,
        rows: usize,
        vocab: usize,
        row_stride: usize,
    ) -> Result<Self> {
        Self::from_ref(DevRef::from_view(data), rows, vocab, row_stride)
    }

    /// A dense view (`row_stride = vocab`).
    ///
    /// # Errors
    /// As [`DeviceLogits::from_ref`].
    pub fn dense(data: CudaView<'a, T>, rows: usize, vocab: usize) -> Result<Self> {
        Self::new(data, rows, vocab, vocab)
    }

    /// A strided matrix over a buffer by address ([`DevRef::from_raw`] for a
    /// framework's storage); `Err` when the shape does not fit in it or the
    /// address is null or misaligned.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument): vocab 0, a row stride shorter than vocab, rows that do not fit
    /// in the buffer, or (rows > 0) a null or misaligned address.
    pub fn from_ref(
        data: DevRef<'a, T>,
        rows: usize,
        vocab: usize,
        row_stride: usize,
    ) -> Result<Self> {
        check_shape("logits", rows, vocab, row_stride, data.len())?;
        let size = std::mem::size_of::<T>() as u64;
        ensure!(
            rows == 0 || (data.ptr() != 0 && data.ptr() % size == 0),
            "logits: address {:#x} is null or not aligned to its {size}-byte elements",
            data.ptr()
        );
        Ok(Self {
            data,
            rows,
            vocab,
            row_stride,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Logits per row.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// Elements from one row's start to the next (≥ vocab).
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }
}

/// A gradient output: `rows × vocab` elements with their own row stride.
pub struct GradOut<'a, T> {
    data: DevMut<'a, T>,
    row_stride: usize,
}

impl<'a, T> GradOut<'a, T> {
    /// Row `r` is written at elements `r · row_stride ..` of `data` (`row_stride`
    /// must be at least the vocabulary; checked at the call). The address is
    /// taken here (see [`DevMut`]).
    pub fn new(data: CudaViewMut<'a, T>, row_stride: usize) -> Self {
        Self {
            data: DevMut::from_view(data),
            row_stride,
        }
    }
}

/// What the gradient pass writes, and the factor it multiplies by.
pub struct KlGrads<'a, 'b, T> {
    /// dL/d(model logits).
    pub model: GradOut<'a, T>,
    /// dL/d(target logits), when wanted.
    pub target: Option<GradOut<'a, T>>,
    /// Host factor (the upstream gradient of the reduced value).
    pub upstream: f32,
    /// An optional device f32 scalar the host factor is multiplied by.
    pub upstream_device: Option<&'b CudaView<'b, f32>>,
}

/// Raw device logits for framework backends: see [`kl_div_raw`].
#[derive(Clone, Copy, Debug)]
pub struct RawLogits {
    /// Device address of element (0, 0).
    pub ptr: u64,
    /// Number of rows (0 is allowed).
    pub rows: usize,
    /// Logits per row; > 0.
    pub vocab: usize,
    /// Elements from one row's start to the next; ≥ `vocab`.
    pub row_stride: usize,
    /// The element type (f32, f16 or bf16); both matrices of a call share it.
    pub dtype: DType,
}

/// Raw gradient outputs for framework backends: see [`kl_div_raw`].
#[derive(Clone, Copy, Debug)]
pub struct RawGrads {
    /// dL/d(model logits): (device address, row stride), in the logits' dtype.
    pub model: (u64, usize),
    /// dL/d(target logits), when wanted.
    pub target: Option<(u64, usize)>,
    /// Host factor (the upstream gradient of the reduced value).
    pub upstream: f32,
    /// Device address of an f32 factor, or `None`.
    pub upstream_device: Option<u64>,
}

/// The loss: the reduced value into [`KlWorkspace::value`] and, when given,
/// per-row values (f32, `rows` long) into `per_row`. Asynchronous on the
/// backend's stream.
///
/// The logits' addresses were taken when they were described; the mask and
/// `per_row` are cudarc views whose addresses cudarc hands out at this call
/// (recording events with tracking on): without them the call can be
/// captured into a CUDA graph; with them, outside a capture only (or use
/// [`kl_div_raw`], or a TRAM step, whose mask is described by address).
///
/// Reads each logit once: 4 bytes per logit pair for bf16/f16, 8 for f32.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument), nothing launched: the two matrices differ in shape, more rows than
/// the workspace was made for, a mask or `per_row` whose length is not the
/// row count, or a temperature that is not finite and > 0 (or whose inverse
/// is not a finite, non-zero f32); [`Error::Driver`](crate::Error::Driver) when a launch fails.
#[allow(clippy::too_many_arguments)]
pub fn kl_div<T: Element>(
    backend: &CudaBackend,
    target: &DeviceLogits<'_, T>,
    model: &DeviceLogits<'_, T>,
    mask: Option<&CudaView<'_, u8>>,
    opts: &KlOptions,
    ws: &mut KlWorkspace,
    per_row: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    run_safe(backend, target, model, mask, opts, ws, per_row, None)
}

/// The loss as [`kl_div`], then the gradients (one more read of each input):
/// 10 bytes per logit pair for bf16/f16 with the model's gradient, 20 for f32.
///
/// # Errors
/// As [`kl_div`], and a gradient output too short for its row stride or an
/// empty `upstream_device`.
#[allow(clippy::too_many_arguments)]
pub fn kl_div_with_grad<T: Element>(
    backend: &CudaBackend,
    target: &DeviceLogits<'_, T>,
    model: &DeviceLogits<'_, T>,
    mask: Option<&CudaView<'_, u8>>,
    opts: &KlOptions,
    ws: &mut KlWorkspace,
    per_row: Option<&mut CudaViewMut<'_, f32>>,
    grads: KlGrads<'_, '_, T>,
) -> Result<()> {
    run_safe(backend, target, model, mask, opts, ws, per_row, Some(grads))
}

#[allow(clippy::too_many_arguments)]
fn run_safe<T: Element>(
    backend: &CudaBackend,
    target: &DeviceLogits<'_, T>,
    model: &DeviceLogits<'_, T>,
    mask: Option<&CudaView<'_, u8>>,
    opts: &KlOptions,
    ws: &mut KlWorkspace,
    per_row: Option<&mut CudaViewMut<'_, f32>>,
    grads: Option<KlGrads<'_, '_, T>>,
) -> Result<()> {
    let rows = target.rows;
    if let Some(m) = mask {
        ensure!(
            m.len() == rows,
            "mask has {} bytes for {rows} rows",
            m.len()
        );
    }
    if let Some(p) = per_row.as_ref() {
        ensure!(
            p.len() >= rows,
            "per-row output has {} elements for {rows} rows",
            p.len()
        );
    }
    let stream = backend.stream();
    // The logits' addresses were taken when they were described. The mask
    // and per-row views are cudarc's at this call: their guards order them
    // against the launches and must live until the launches are enqueued.
    let (pa, pb) = (target.data.ptr(), model.data.ptr());
    let (pm, _gm) = match mask {
        Some(m) => {
            let (p, g) = m.device_ptr(stream);
            (Some(p), Some(g))
        }
        None => (None, None),
    };
    let (pr, _gr) = match per_row {
        Some(p) => {
            let (q, g) = p.device_ptr_mut(stream);
            (Some(q), Some(g))
        }
        None => (None, None),
    };
    let raw = |l: &DeviceLogits<'_, T>, ptr: u64| RawLogits {
        ptr,
        rows: l.rows,
        vocab: l.vocab,
        row_stride: l.row_stride,
        dtype: T::DTYPE,
    };
    let target_raw = raw(target, pa);
    let model_raw = raw(model, pb);
    match grads {
        None => {
            // SAFETY: the logits' addresses come from `DevRef`s that borrow
            // live buffers (or whose `from_raw` caller vouched for them), with
            // lengths `DeviceLogits::from_ref` and the checks above matched to
            // the shape; the mask and per-row guards keep cudarc's ordering
            // until the launches are enqueued; no output aliases an input.
            unsafe { launch(backend, target_raw, model_raw, pm, opts, ws, pr, None) }
        }
        Some(g) => {
            let check_out = |what: &str, o: &GradOut<'_, T>| {
                check_shape(what, rows, target.vocab, o.row_stride, o.data.len())
            };
            check_out("model gradient", &g.model)?;
            if let Some(t) = g.target.as_ref() {
                check_out("target gradient", t)?;
            }
            let gm_ptr = g.model.data.ptr();
            let gt_ptr = g.target.as_ref().map(|t| (t.data.ptr(), t.row_stride));
            let (pu, _gu) = match g.upstream_device {
                Some(u) => {
                    ensure!(!u.is_empty(), "upstream device scalar is empty");
                    let (p, guard) = u.device_ptr(stream);
                    (Some(p), Some(guard))
                }
                None => (None, None),
            };
            let rg = RawGrads {
                model: (gm_ptr, g.model.row_stride),
                target: gt_ptr,
                upstream: g.upstream,
                upstream_device: pu,
            };
            // SAFETY: as above; the gradient outputs are `DevMut`s, whose
            // mutable borrows (or `from_raw` contracts) rule out any overlap
            // with the inputs or each other, and their lengths were checked
            // against the shape.
            unsafe { launch(backend, target_raw, model_raw, pm, opts, ws, pr, Some(rg)) }
        }
    }
}

/// The loss of a TRAM step's first step: the reduced value into the
/// workspace, over logits and a mask described by address (no cudarc access:
/// capturable).
pub(crate) fn kl_div_step<T: Element>(
    backend: &CudaBackend,
    target: &DeviceLogits<'_, T>,
    model: &DeviceLogits<'_, T>,
    mask: Option<&DevRef<'_, u8>>,
    opts: &KlOptions,
    ws: &mut KlWorkspace,
) -> Result<()> {
    let rows = target.rows;
    if let Some(m) = mask {
        ensure!(
            m.len() == rows,
            "mask has {} bytes for {rows} rows",
            m.len()
        );
        ensure!(rows == 0 || m.ptr() != 0, "mask: null pointer");
    }
    let raw = |l: &DeviceLogits<'_, T>| RawLogits {
        ptr: l.data.ptr(),
        rows: l.rows,
        vocab: l.vocab,
        row_stride: l.row_stride,
        dtype: T::DTYPE,
    };
    // SAFETY: the logits' and the mask's addresses come from `DevRef`s that
    // borrow live buffers for this call (or whose `from_raw` callers vouched
    // for them), with extents `DeviceLogits::from_ref` and the check above
    // matched to the shape; nothing is written but the workspace.
    unsafe {
        launch(
            backend,
            raw(target),
            raw(model),
            mask.map(|m| m.ptr()),
            opts,
            ws,
            None,
            None,
        )
    }
}

/// The loss (and, with `grads`, the gradients) over raw device pointers, for
/// framework backends that own their buffers.
///
/// # Safety
/// On the backend's context, and ordered by the backend's stream alone (this
/// function does not synchronise with other streams):
/// * `target.ptr` and `model.ptr` point to at least
///   `(rows − 1) · row_stride + vocab` readable elements of `dtype`, aligned
///   to the element size;
/// * `mask`, when given, points to `rows` readable bytes;
/// * `per_row`, when given, points to `rows` writable f32 with no overlap
///   with anything else here;
/// * each gradient output points to `(rows − 1) · stride + vocab` writable
///   elements of `dtype`. It may be exactly the matching input (same address
///   and same row stride: the gradient is then written in place, each
///   element read before it is overwritten), otherwise it must not overlap
///   either input, the other output, the mask or `per_row`;
/// * `upstream_device`, when given, points to one readable f32;
/// * all of it stays valid until the stream has run the launches.
///
/// # Errors
/// As [`kl_div_with_grad`], and a null logit or gradient address, or a
/// buffer that would run past the end of the address space.
#[allow(clippy::too_many_arguments)]
pub unsafe fn kl_div_raw(
    backend: &CudaBackend,
    target: RawLogits,
    model: RawLogits,
    mask: Option<u64>,
    opts: &KlOptions,
    ws: &mut KlWorkspace,
    per_row: Option<u64>,
    grads: Option<RawGrads>,
) -> Result<()> {
    // Shapes, and that each matrix fits below the top of the address space.
    let raw_extent = |what: &str, ptr: u64, l: &RawLogits, stride: usize| {
        check_shape(what, l.rows, l.vocab, stride, usize::MAX)?;
        ensure!(ptr != 0, "{what}: null pointer");
        let n = span(l.rows, l.vocab, stride).unwrap_or(usize::MAX);
        super::buffer_end(what, ptr, n as u64, l.dtype.size()).map(|_| ())
    };
    for (what, l) in [("target", &target), ("model", &model)] {
        raw_extent(what, l.ptr, l, l.row_stride)?;
    }
    if let Some(g) = grads.as_ref() {
        raw_extent("model gradient", g.model.0, &model, g.model.1)?;
        if let Some(t) = g.target {
            raw_extent("target gradient", t.0, &model, t.1)?;
        }
    }
    if let Some(p) = per_row {
        super::buffer_end("per-row output", p, model.rows as u64, 4)?;
    }
    if let Some(m) = mask {
        super::buffer_end("mask", m, model.rows as u64, 1)?;
    }
    // SAFETY: the caller upholds this function's contract, which is launch's.
    unsafe { launch(backend, target, model, mask, opts, ws, per_row, grads) }
}

/// Validates everything that does not need buffer lengths, then launches.
///
/// # Safety
/// The contract of [`kl_div_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn launch(
    backend: &CudaBackend,
    target: RawLogits,
    model: RawLogits,
    mask: Option<u64>,
    opts: &KlOptions,
    ws: &mut KlWorkspace,
    per_row: Option<u64>,
    grads: Option<RawGrads>,
) -> Result<()> {
    ensure!(
        target.rows == model.rows && target.vocab == model.vocab,
        "target is {}×{} but model is {}×{}",
        target.rows,
        target.vocab,
        model.rows,
        model.vocab
    );
    ensure!(
        target.dtype == model.dtype,
        "target is {:?} but model is {:?}",
        target.dtype,
        model.dtype
    );
    let tau = opts.temperature;
    ensure!(
        tau.is_finite() && tau > 0.0,
        "temperature must be finite and > 0, got {tau}"
    );
    let inv_tau = (1.0 / tau as f64) as f32;
    ensure!(
        inv_tau.is_finite() && inv_tau > 0.0,
        "temperature {tau} is out of range (1/τ must be a finite, non-zero f32)"
    );
    let rows = target.rows;
    let vocab = target.vocab;
    ensure!(
        rows <= ws.max_rows,
        "{rows} rows but the workspace was allocated for {}",
        ws.max_rows
    );
    let geo = kl_geometry(rows, vocab, backend.sm_count());
    ensure!(
        geo.blocks_per_row == 1 || geo.blocks(rows) <= ws.partial_cap,
        "workspace partials too small ({} < {}): was it made for another device?",
        ws.partial_cap,
        geo.blocks(rows)
    );
    let blocks = geo.blocks(rows);
    ensure!(
        blocks <= i32::MAX as usize,
        "{rows} rows are too many for one launch"
    );

    // Reverse KL(Q‖P) is forward with the roles swapped.
    let (a, b) = match opts.direction {
        KlDirection::Reverse => (model, target),
        _ => (target, model),
    };
    let sym = opts.direction == KlDirection::Symmetric;
    let dir = if sym { "sym" } else { "fwd" };
    let dt = a.dtype.name();
    let reduction: i32 = match opts.reduction {
        Reduction::None => 0,
        Reduction::Sum => 1,
        Reduction::MeanRows => 2,
        Reduction::MeanElements => 3,
    };

    let stream = backend.stream();
    let WsAddrs {
        stats: ws_stats,
        partials: ws_partials,
        scalars: ws_scalars,
        value: ws_value,
    } = ws.addrs;

    let mask_ptr = mask.unwrap_or(0);
    let a_stride = a.row_stride as i64;
    let b_stride = b.row_stride as i64;
    let vocab_i = vocab as i64;
    let rows_i = rows as i64;
    let bpr = geo.blocks_per_row as i32;
    let chunk = geo.chunk as i64;
    let grid = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };

    let f = backend.function_named(format_args!("kl_div_partials_{dir}_{dt}"))?;
    let finish = backend.function("kl_div_finish")?;
    let grad = backend.function_named(format_args!("kl_div_grad_{dir}_{dt}"))?;
    let mut l = stream.launch_builder(f);
    l.arg(&a.ptr)
        .arg(&a_stride)
        .arg(&b.ptr)
        .arg(&b_stride)
        .arg(&mask_ptr)
        .arg(&vocab_i)
        .arg(&bpr)
        .arg(&chunk)
        .arg(&inv_tau)
        .arg(&ws_partials)
        .arg(&ws_stats);
    if rows > 0 {
        // SAFETY: the argument list matches `kl_div_partials_*` in
        // kernels/kl_div.cu; the caller guarantees the input extents, and the
        // workspace holds `rows` stats and `blocks` partials (checked above).
        unsafe { l.launch(grid) }?;
    }

    let sym_i = sym as i32;
    let per_row_ptr = per_row.unwrap_or(0);
    let mut l = stream.launch_builder(finish);
    l.arg(&ws_partials)
        .arg(&ws_stats)
        .arg(&mask_ptr)
        .arg(&rows_i)
        .arg(&vocab_i)
        .arg(&bpr)
        .arg(&sym_i)
        .arg(&inv_tau)
        .arg(&reduction)
        .arg(&ws_scalars)
        .arg(&ws_value)
        .arg(&per_row_ptr);
    // SAFETY: the argument list matches `kl_div_finish`; it reads what the
    // launch above wrote (same stream) and writes `rows` f32 to `per_row`
    // (caller's contract) and the workspace scalars.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (FINISH_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;

    let Some(g) = grads else {
        return Ok(());
    };
    if rows == 0 {
        return Ok(());
    }
    // Which output is the gradient w.r.t. the kernel's a and b.
    let target_out = g.target.unwrap_or((0, 0));
    let (ga, gb) = match opts.direction {
        KlDirection::Reverse => (g.model, target_out),
        _ => (target_out, g.model),
    };
    let ga_stride = ga.1 as i64;
    let gb_stride = gb.1 as i64;
    let upstream_ptr = g.upstream_device.unwrap_or(0);
    let mut l = stream.launch_builder(grad);
    l.arg(&a.ptr)
        .arg(&a_stride)
        .arg(&b.ptr)
        .arg(&b_stride)
        .arg(&mask_ptr)
        .arg(&vocab_i)
        .arg(&bpr)
        .arg(&chunk)
        .arg(&inv_tau)
        .arg(&ws_stats)
        .arg(&ws_scalars)
        .arg(&g.upstream)
        .arg(&upstream_ptr)
        .arg(&ga.0)
        .arg(&ga_stride)
        .arg(&gb.0)
        .arg(&gb_stride);
    // SAFETY: the argument list matches `kl_div_grad_*`; outputs are the
    // caller's (contract of `kl_div_raw`: in place or disjoint), and it reads
    // the stats the finish kernel wrote on this stream.
    unsafe { l.launch(grid) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_rows_get_one_block_each() {
        let g = kl_geometry(16_384, 32_000, 132);
        assert_eq!(
            g,
            KlGeometry {
                blocks_per_row: 1,
                chunk: 32_000
            }
        );
        assert_eq!(g.blocks(16_384), 16_384);
    }

    #[test]
    fn few_long_rows_fill_one_wave() {
        let sms = 132;
        let g = kl_geometry(64, 1 << 20, sms);
        assert_eq!(g.blocks_per_row, 6);
        assert!(g.blocks(64) <= partials_capacity(sms));
        assert_eq!(g.chunk % CHUNK_ALIGN, 0);
        assert!(g.chunk * g.blocks_per_row >= 1 << 20);
        assert!(g.chunk * (g.blocks_per_row - 1) < 1 << 20);

        let g = kl_geometry(16, 250_002, sms);
        assert_eq!(g.blocks_per_row, 24);
        assert!(g.chunk >= MIN_CHUNK);
        assert!(g.chunk * (g.blocks_per_row - 1) < 250_002);
    }

    #[test]
    fn every_chunk_is_non_empty_and_within_capacity() {
        for sms in [1u32, 7, 108, 132] {
            for rows in [1usize, 2, 3, 5, 16, 63, 64, 100, 527, 528, 529, 10_000] {
                for vocab in [
                    1usize,
                    7,
                    8,
                    8191,
                    8192,
                    8193,
                    50_257,
                    250_002,
                    1 << 20,
                    3 << 20,
                ] {
                    let g = kl_geometry(rows, vocab, sms);
                    assert!(g.blocks_per_row >= 1);
                    assert!(g.chunk >= 1);
                    // The last chunk starts inside the row and the chunks cover it.
                    assert!(
                        (g.blocks_per_row - 1) * g.chunk < vocab,
                        "{rows} {vocab} {sms}: {g:?}"
                    );
                    assert!(g.blocks_per_row * g.chunk >= vocab);
                    if g.blocks_per_row > 1 {
                        assert_eq!(g.chunk % CHUNK_ALIGN, 0);
                        assert!(g.blocks(rows) <= partials_capacity(sms));
                        assert!(g.chunk >= MIN_CHUNK);
                    }
                }
            }
        }
    }

    #[test]
    fn workspace_size_does_not_depend_on_vocab() {
        assert_eq!(
            KlWorkspace::bytes(16_384, 132).unwrap(),
            16_384 * 64 + 396 * 104 + 36
        );
    }

    #[test]
    fn workspace_sizes_that_overflow_are_errors() {
        // max_rows × 64 bytes wraps around usize.
        assert!(KlWorkspace::bytes(usize::MAX / 64 + 2, 132).is_err());
        assert!(KlWorkspace::bytes(usize::MAX / 64, u32::MAX).is_err());
        assert!(KlWorkspace::bytes(usize::MAX, 1).is_err());
    }

    #[test]
    fn shapes_are_checked() {
        assert!(check_shape("x", 2, 4, 4, 8).is_ok());
        assert!(check_shape("x", 2, 4, 5, 9).is_ok());
        assert!(check_shape("x", 2, 4, 5, 8).is_err()); // buffer too small
        assert!(check_shape("x", 2, 4, 3, 100).is_err()); // stride < vocab
        assert!(check_shape("x", 2, 0, 4, 100).is_err()); // zero vocab
        assert!(check_shape("x", 0, 4, 4, 0).is_ok()); // no rows: value 0
        assert!(check_shape("x", usize::MAX, 4, 4, usize::MAX).is_err()); // overflow
    }
}
