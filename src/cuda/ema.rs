//! Launcher of `kernels/ema.cu`: TRAM-θ's target θ̄ ← λ·θ̄ + (1−λ)·θ over a
//! group in one launch (a `multi_tensor.cuh` table and chunk list). Same bits as
//! `cpu::ema` for finite values (see there for the bound and for NaNs).
//! λ = 1 launches nothing (θ̄ unchanged bit for bit); λ is fixed configuration,
//! passed by value (a captured graph keeps it, as it should).

use std::marker::PhantomData;

use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};

use super::buffer::DevRef;
use super::group::{MtChunk, MtTensor, BLOCK_THREADS};
use super::optimizer::chunks_of;
use super::CudaBackend;
use crate::cpu::ema::validate_lambda;
use crate::dtype::{DType, Element};
use crate::error::{ensure, Result};

const THREADS: u32 = BLOCK_THREADS;

/// One tensor over raw device addresses: `len` elements of the target θ̄
/// (written) and of θ (read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEmaTensor {
    /// Device address of θ̄ (f32 or the parameter type; see [`EmaGroup::from_raw`]).
    pub target: u64,
    /// Device address of θ.
    pub theta: u64,
    /// Elements of both.
    pub len: u64,
}

/// One tensor over cudarc views.
#[derive(Debug)]
pub struct DeviceEmaTensor<'a, T, P> {
    /// θ̄, read and written.
    pub target: CudaViewMut<'a, T>,
    /// θ, read; as long as `target`.
    pub theta: CudaView<'a, P>,
}

/// The tensors of the EMA, described once on the device and reused.
#[derive(Debug)]
pub struct EmaGroup<'a> {
    rows: Vec<MtTensor>,
    _table: CudaSlice<MtTensor>,
    _chunks: CudaSlice<MtChunk>,
    /// Addresses of the two buffers above, taken once (capturable launches).
    table_ptr: u64,
    chunks_ptr: u64,
    n_chunks: u32,
    target: DType,
    theta: DType,
    _borrow: PhantomData<&'a mut ()>,
}

impl EmaGroup<'static> {
    /// A group over raw device addresses.
    ///
    /// # Safety
    /// Whenever [`ema_update`] runs with this group, `target` must point to
    /// `len` writable elements of `target_dtype` and `theta` to `len` elements of
    /// `theta_dtype` in the stream's context, the targets must not overlap any
    /// other buffer of the group, and prior work on them must be ordered
    /// before the launch on the backend's stream.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument): no tensors, a null or misaligned address of a non-empty tensor,
    /// or an unsupported target type; [`Error::Driver`](crate::Error::Driver) when the upload fails.
    pub unsafe fn from_raw(
        backend: &CudaBackend,
        tensors: &[RawEmaTensor],
        target_dtype: DType,
        theta_dtype: DType,
    ) -> Result<Self> {
        build(backend, tensors, target_dtype, theta_dtype)
    }
}

impl<'a> EmaGroup<'a> {
    /// A group over cudarc views (lengths checked).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument): no tensors, or a target and θ of different lengths; [`Error::Driver`](crate::Error::Driver) when
    /// the upload fails.
    pub fn new<T: Element + DeviceRepr, P: Element + DeviceRepr>(
        backend: &CudaBackend,
        tensors: Vec<DeviceEmaTensor<'a, T, P>>,
    ) -> Result<Self> {
        let stream = backend.stream();
        let mut raw = Vec::with_capacity(tensors.len());
        for (i, mut t) in tensors.into_iter().enumerate() {
            let n = t.target.len();
            ensure!(
                t.theta.len() == n,
                "tensor {i}: target has {n} elements, θ {}",
                t.theta.len()
            );
            let theta = t.theta.device_ptr(stream).0;
            raw.push(RawEmaTensor {
                target: t.target.device_ptr_mut(stream).0,
                theta,
                len: n as u64,
            });
        }
        build(backend, &raw, T::DTYPE, P::DTYPE)
    }
}

impl EmaGroup<'_> {
    /// The table as uploaded: slot 0 θ̄, slot 1 θ.
    pub(crate) fn rows(&self) -> &[MtTensor] {
        &self.rows
    }

    /// (target, θ) element types.
    pub(crate) fn dtypes(&self) -> (DType, DType) {
        (self.target, self.theta)
    }
}

fn build(
    backend: &CudaBackend,
    tensors: &[RawEmaTensor],
    target: DType,
    theta: DType,
) -> Result<EmaGroup<'static>> {
    ensure!(!tensors.is_empty(), "the EMA group is empty");
    let mut table = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        // An empty tensor is skipped: any address will do, null included.
        ensure!(
            t.len == 0 || (t.target != 0 && t.theta != 0),
            "tensor {i}: null address"
        );
        ensure!(
            t.target % target.size() as u64 == 0 && t.theta % theta.size() as u64 == 0,
            "tensor {i}: an address is not aligned to its element size"
        );
        super::buffer_end(
            &format!("tensor {i}: target"),
            t.target,
            t.len,
            target.size(),
        )?;
        super::buffer_end(&format!("tensor {i}: θ"), t.theta, t.len, theta.size())?;
        // Slots mirror EMA_SLOT_* in kernels/ema.cu.
        table.push(MtTensor {
            ptr: [t.target, t.theta, 0, 0, 0, 0],
            len: t.len,
        });
    }
    let (chunks, n_chunks) = chunks_of(&table)?;
    let stream = backend.stream();
    let table_dev = stream.clone_htod(&table)?;
    let chunks_dev = stream.clone_htod(&chunks)?;
    Ok(EmaGroup {
        table_ptr: DevRef::new(&table_dev).ptr(),
        chunks_ptr: DevRef::new(&chunks_dev).ptr(),
        _table: table_dev,
        rows: table,
        _chunks: chunks_dev,
        n_chunks,
        target,
        theta,
        _borrow: PhantomData,
    })
}

/// θ̄ ← λ·θ̄ + (1−λ)·θ for every tensor of `group`: one launch (none for λ = 1),
/// no allocation, no sync. λ outside [0, 1] is an error. Moves 12 bytes per
/// f32 element (θ̄ read and written, θ read), 6 for bf16 θ̄ and θ.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for λ outside [0, 1]; [`Error::Driver`](crate::Error::Driver) when the launch fails.
pub fn ema_update(backend: &CudaBackend, group: &EmaGroup<'_>, lambda: f32) -> Result<()> {
    validate_lambda(lambda)?;
    if lambda == 1.0 || group.n_chunks == 0 {
        return Ok(());
    }
    let f = backend.function_named(format_args!(
        "ema_{}_{}",
        group.target.name(),
        group.theta.name()
    ))?;
    let cfg = LaunchConfig {
        grid_dim: (group.n_chunks.min(backend.sm_count() * 8), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = backend.stream().launch_builder(f);
    b.arg(&group.table_ptr)
        .arg(&group.chunks_ptr)
        .arg(&group.n_chunks)
        .arg(&lambda);
    // SAFETY: the table (MtTensor rows) and chunk list (MtChunk)
    // were built by `build`, every chunk lies inside its tensor, the addresses
    // are valid by construction (borrowed views or the `from_raw` contract), and
    // the kernel name matches the group's dtypes.
    unsafe { b.launch(cfg) }?;
    Ok(())
}
