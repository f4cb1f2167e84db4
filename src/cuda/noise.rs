//! Launcher of `kernels/noise.cu`: TRAM-x's out = e + z with z from Philox
//! keyed by (seed, step) and counted by element index — the same function as
//! `cpu::noise` (uniform: identical bits; Gaussian: see there).
//!
//! The step lives in device memory ([`NoiseStep`]) and is advanced by a kernel,
//! so a captured CUDA graph draws fresh noise on every replay.

use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};

use super::buffer::{DevMut, DevRef};
use super::CudaBackend;
use crate::config::{NoiseConfig, NoiseDistribution};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Result};

const THREADS: u32 = 256;

/// The noise counter's step, in device memory.
#[derive(Debug)]
pub struct NoiseStep {
    step: CudaSlice<u64>,
    /// The address of `step`, taken once (capturable launches).
    ptr: u64,
}

impl NoiseStep {
    /// A device counter starting at `step`.
    ///
    /// # Errors
    /// [`Error::Driver`](crate::Error::Driver) when the allocation or copy fails.
    pub fn new(backend: &CudaBackend, step: u64) -> Result<Self> {
        let step = backend.stream().clone_htod(&[step])?;
        Ok(Self {
            ptr: DevRef::new(&step).ptr(),
            step,
        })
    }

    /// Sets the step (an async copy; not while the stream is being captured).
    ///
    /// # Errors
    /// [`Error::Driver`](crate::Error::Driver) when the copy fails.
    pub fn set(&mut self, backend: &CudaBackend, step: u64) -> Result<()> {
        backend.stream().memcpy_htod(&[step], &mut self.step)?;
        Ok(())
    }

    /// step += 1 on the device (one tiny launch; capturable).
    ///
    /// # Errors
    /// [`Error::Driver`](crate::Error::Driver) when the launch fails.
    pub fn advance(&mut self, backend: &CudaBackend) -> Result<()> {
        let f = backend.function("noise_step_advance")?;
        let mut b = backend.stream().launch_builder(f);
        b.arg(&self.ptr);
        // SAFETY: noise_step_advance(unsigned long long*) increments the one u64
        // of `self.step`, which outlives the launch.
        unsafe { b.launch(LaunchConfig::for_num_elems(1)) }?;
        Ok(())
    }

    /// Reads the step back (synchronises the stream).
    ///
    /// # Errors
    /// [`Error::Driver`](crate::Error::Driver) when the copy fails.
    pub fn get(&self, backend: &CudaBackend) -> Result<u64> {
        Ok(backend.stream().clone_dtoh(&self.step)?[0])
    }
}

fn launch(
    backend: &CudaBackend,
    input: u64,
    out: u64,
    n: u64,
    dtype: DType,
    cfg: &NoiseConfig,
    step: &NoiseStep,
) -> Result<()> {
    cfg.validate()?;
    if n == 0 {
        return Ok(());
    }
    let kind = match cfg.distribution {
        NoiseDistribution::Uniform => "uniform",
        NoiseDistribution::Gaussian => "gaussian",
    };
    let f = backend.function_named(format_args!("noise_{kind}_{}", dtype.name()))?;
    let blocks = n.div_ceil(4).div_ceil(THREADS as u64);
    let blocks = blocks.min(backend.sm_count() as u64 * 16) as u32;
    let lc = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = backend.stream().launch_builder(f);
    b.arg(&input)
        .arg(&out)
        .arg(&n)
        .arg(&cfg.seed)
        .arg(&step.ptr)
        .arg(&cfg.sigma);
    // SAFETY: the callers guarantee that `input` and `out` address `n` elements
    // of `dtype` (equal addresses for in place) valid on this stream; the step is
    // one u64 owned by `step`; the kernel touches elements [0, n) only.
    unsafe { b.launch(lc) }?;
    Ok(())
}

/// out = e + z over buffers by address (see [`DevRef`]): capturable. Lengths
/// must match; σ < 0 is an error. Moves 8 bytes per f32 element (e read,
/// out written), 4 per bf16 element.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): lengths that differ, σ negative or not finite; [`Error::Driver`](crate::Error::Driver) when the
/// launch fails.
pub fn add_noise_to<T: Element>(
    backend: &CudaBackend,
    input: &DevRef<'_, T>,
    out: &mut DevMut<'_, T>,
    cfg: &NoiseConfig,
    step: &NoiseStep,
) -> Result<()> {
    ensure!(
        input.len() == out.len(),
        "noise input has {} elements, output {}",
        input.len(),
        out.len()
    );
    let n = input.len() as u64;
    let size = T::DTYPE.size() as u64;
    ensure!(
        n == 0
            || (input.ptr() % size == 0
                && out.ptr() % size == 0
                && input.ptr() != 0
                && out.ptr() != 0),
        "null or misaligned noise buffer"
    );
    launch(backend, input.ptr(), out.ptr(), n, T::DTYPE, cfg, step)
}

/// out = e + z (no allocation, no sync). Lengths must match; σ < 0 is an error.
/// The views' addresses are taken through cudarc at this call (events with
/// tracking on): to capture it into a CUDA graph, use [`add_noise_to`].
///
/// # Errors
/// As [`add_noise_to`].
pub fn add_noise<T: Element + DeviceRepr>(
    backend: &CudaBackend,
    input: &CudaView<'_, T>,
    out: &mut CudaViewMut<'_, T>,
    cfg: &NoiseConfig,
    step: &NoiseStep,
) -> Result<()> {
    ensure!(
        input.len() == out.len(),
        "noise input has {} elements, output {}",
        input.len(),
        out.len()
    );
    let stream = backend.stream();
    let (i, _gi) = input.device_ptr(stream);
    let (o, _go) = out.device_ptr_mut(stream);
    launch(backend, i, o, input.len() as u64, T::DTYPE, cfg, step)
}

/// e ← e + z in place.
///
/// # Errors
/// As [`add_noise_to`].
pub fn add_noise_inplace<T: Element + DeviceRepr>(
    backend: &CudaBackend,
    x: &mut CudaViewMut<'_, T>,
    cfg: &NoiseConfig,
    step: &NoiseStep,
) -> Result<()> {
    let n = x.len() as u64;
    let (p, _g) = x.device_ptr_mut(backend.stream());
    launch(backend, p, p, n, T::DTYPE, cfg, step)
}

/// out = e + z over raw device addresses (`input == out` for in place).
///
/// # Safety
/// `input` and `out` must address `n` elements of `dtype` in the stream's
/// context (`out` writable), either equal or not overlapping, with prior work
/// on them ordered before this launch on the backend's stream.
///
/// # Errors
/// As [`add_noise_to`], and a null or misaligned address of a non-empty buffer.
pub unsafe fn add_noise_raw(
    backend: &CudaBackend,
    input: u64,
    out: u64,
    n: u64,
    dtype: DType,
    cfg: &NoiseConfig,
    step: &NoiseStep,
) -> Result<()> {
    ensure!(
        input != 0
            && out != 0
            && input % dtype.size() as u64 == 0
            && out % dtype.size() as u64 == 0,
        "null or misaligned noise buffer"
    );
    super::buffer_end("noise input", input, n, dtype.size())?;
    super::buffer_end("noise output", out, n, dtype.size())?;
    launch(backend, input, out, n, dtype, cfg, step)
}
