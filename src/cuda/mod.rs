//! The CUDA backend: the embedded kernels loaded once into a context, launches on the
//! caller's stream. Each operation has a launcher here beside its kernel file
//! in `kernels/` and its CPU reference in `src/cpu/` (same file stem).
//!
//! # What a user of cudarc 0.19 needs to know
//!
//! The crate speaks cudarc 0.19: streams are `Arc<CudaStream>`, buffers
//! `CudaSlice`s and their views. A few of cudarc's behaviours decide how to
//! set things up:
//!
//! - **A missing driver panics in cudarc.** `CudaContext::new` panics (it
//!   does not return an error) where the driver library cannot be loaded,
//!   and so does a call into a driver that lacks the function. Build
//!   contexts with [`context`] and backends with [`CudaBackend::new`]: both
//!   check for the library first and turn such panics into
//!   [`Error::CudaUnavailable`].
//! - **Streams.** [`CudaBackend::from_stream`] takes a framework's
//!   `Arc<CudaStream>`; for a raw `CUstream` from elsewhere, wrap it with
//!   `ctx.wrap_borrowed_stream(raw)` (`unsafe`: the stream must be live and
//!   belong to that context) on the device's [`context`]; a borrowed stream
//!   is not destroyed on drop. The legacy default stream cannot be
//!   captured into a CUDA graph: capture on a stream made by `new_stream()`.
//! - **Raw pointers.** A framework's buffers are passed by address
//!   ([`buffer::DevRef::from_raw`], [`group::ParamGroup::from_raw`],
//!   [`kl_div::kl_div_raw`]), never through cudarc's `upgrade_device_ptr`,
//!   which takes ownership and frees the memory on drop. Nothing then tracks
//!   those buffers' synchronisation: the stream order is the contract (below).
//! - **Events.** cudarc records an event on a slice's stream each time its
//!   address is handed out, with event tracking on (the default). The crate
//!   takes addresses once, when a buffer is described, so launches record
//!   nothing and can be captured; build descriptions before a capture begins.
//!   To time kernels, create events with timing enabled:
//!   `ctx.new_event(None)` gives one with timing *disabled*; pass
//!   `Some(CUevent_flags::CU_EVENT_DEFAULT)`.
//! - **Copies are asynchronous** on their stream (`clone_htod`, `memcpy_htod`,
//!   `memcpy_dtoh`, `alloc_zeros`...); results read back with `clone_dtoh`
//!   wait for the stream. The crate's own read-backs
//!   ([`group::ParamGroup::read_state`], [`crate::Tram::report`]) say so.
//! - **One cudarc per build.** Sharing a process with candle or burn means
//!   sharing their cudarc: the crate selects no CUDA version feature and
//!   loads the driver with cudarc's `fallback-dynamic-loading`, which
//!   coexists with candle's `dynamic-linking` (cudarc's build script rejects
//!   `dynamic-loading` and `dynamic-linking` together, and two `cuda-XXXXX`
//!   features clash). Set `CUDARC_CUDA_VERSION` to the driver's CUDA version
//!   when the bindings would otherwise be newer than the driver.

pub mod buffer;
pub mod ema;
mod fatbin;
pub mod grad_norm;
pub mod group;
pub mod kl_div;
pub(crate) mod libcuda;
pub mod noise;
pub mod optimizer;
pub mod perturb;
pub mod ptx;
pub mod restore;
pub mod step;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::error::{DriverError, Error, Result};

/// Kernels loaded into one CUDA context, launching on one stream.
///
/// Create it from a device ordinal ([`CudaBackend::new`]) or around a stream a
/// framework already owns ([`CudaBackend::from_stream`]). Every launch goes on
/// [`CudaBackend::stream`]; nothing here synchronises unless a method says so.
/// Cloning is cheap (the loaded kernels are shared) and the clone launches on
/// the same stream.
///
/// # Streams, events and CUDA graphs
///
/// Launches pass device addresses that were taken when a buffer was described
/// (a [`buffer::DevRef`], a [`group::ParamGroup`], a [`step::TramStep`]'s
/// tables...), never cudarc slices: a launch records and waits on no cudarc
/// event, so it can be captured into a CUDA graph with event tracking on, as
/// [`CudaBackend::new`] and [`CudaBackend::from_stream`] leave it. The price
/// is that cudarc does not order buffers of **other** streams against these
/// launches. The contract: every buffer a launch reads or writes is ordered
/// with the backend's stream by the caller. Work on the backend's stream is
/// ordered by the stream itself; for a buffer written on another stream, call
/// [`CudaBackend::wait_for_stream`] after that write and before the launch,
/// and before the other stream reuses or frees a buffer the launches touched
/// (cudarc frees a `CudaSlice` on the stream it was allocated on), call
/// [`CudaBackend::make_stream_wait`].
///
/// While a stream of the context is being captured, no thread may
/// synchronise the context: `CudaContext::synchronize`, a synchronous copy or
/// allocation in a global-mode capture, and the first `new_stream` of a
/// `CudaContext` object (cudarc synchronises the context then, so
/// [`CudaBackend::new`] on another thread invalidates the capture).
#[derive(Clone)]
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    functions: Arc<HashMap<String, CudaFunction>>,
    sm_count: u32,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.stream.context().ordinal())
            .field("sm_count", &self.sm_count)
            .field("kernels", &self.functions.len())
            .finish()
    }
}

impl CudaBackend {
    /// A backend on device `ordinal`'s primary context and a new stream.
    ///
    /// # Errors
    /// [`Error::CudaUnavailable`] when no kernels were embedded (nvcc missing
    /// at build time), when the driver library cannot be loaded or lacks a
    /// function, when the device does not exist, or when the driver rejects
    /// the kernels (a driver older than the nvcc that built them);
    /// [`Error::Driver`] when creating the stream fails.
    pub fn new(ordinal: usize) -> Result<Self> {
        check_ptx_built()?;
        let ctx = context(ordinal)?;
        let stream = guarded("creating a stream", || ctx.new_stream())??;
        Self::from_stream(stream)
    }

    /// A backend that launches on `stream`, which a framework already owns.
    /// Work is ordered with the framework's by that stream alone.
    ///
    /// # Errors
    /// As [`CudaBackend::new`], except that the context already exists.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        check_ptx_built()?;
        let ctx = stream.context().clone();
        let sm_count = guarded("querying the device", || {
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        })??;
        let mut functions = HashMap::new();
        for (module_name, bytes) in ptx::MODULES {
            // The names come from the PTX image; every SASS image holds the same kernels.
            let ptx_text = fatbin::ptx_text(bytes, ptx::PTX_ARCH).map_err(|e| {
                Error::CudaUnavailable(format!("the embedded {module_name}.cu: {e}"))
            })?;
            // The driver takes the SASS that fits the device, else JIT-compiles the PTX.
            let image = Ptx::from_binary(bytes.to_vec());
            let module = guarded("loading kernels", || ctx.load_module(image))?.map_err(|e| {
                let e = DriverError::from_cudarc(e);
                Error::CudaUnavailable(format!(
                    "the driver rejected the kernels of {module_name}.cu ({e}); they were built \
                     by {}, whose machine code needs a driver of its CUDA major version or newer \
                     and whose PTX a driver of its CUDA version or newer",
                    ptx::NVCC.unwrap_or("unknown nvcc")
                ))
            })?;
            for entry in ptx::entry_points(ptx_text) {
                let f = guarded("loading a kernel", || module.load_function(entry))??;
                functions.insert(entry.to_string(), f);
            }
        }
        Ok(Self {
            stream,
            functions: Arc::new(functions),
            sm_count: sm_count.max(1) as u32,
        })
    }

    /// The stream every launch goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context the kernels are loaded into.
    pub fn context(&self) -> &Arc<CudaContext> {
        self.stream.context()
    }

    /// Streaming multiprocessors on the device; grids are sized from it.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Waits for all work on the stream.
    ///
    /// # Errors
    /// [`Error::Driver`] when the stream reports a failure (of this or an
    /// earlier asynchronous operation).
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Makes the backend's stream wait for the work enqueued on `other` so
    /// far (an event recorded on `other`, waited on here; the host does not
    /// wait). Call it after writing a buffer on `other` (a gradient from
    /// another stream) and before a launch that reads it. Not while the
    /// backend's stream is being captured unless `other` captures too.
    ///
    /// # Errors
    /// [`Error::Driver`] when recording or waiting on the event fails.
    pub fn wait_for_stream(&self, other: &CudaStream) -> Result<()> {
        if *other != *self.stream {
            self.stream.join(other)?;
        }
        Ok(())
    }

    /// Makes `other` wait for the work enqueued on the backend's stream so
    /// far. Call it before `other` reuses or frees a buffer that launches on
    /// the backend's stream read or wrote: dropping a `CudaSlice` allocated
    /// on `other` frees it on `other`, which does not wait for this stream.
    ///
    /// # Errors
    /// [`Error::Driver`] when recording or waiting on the event fails.
    pub fn make_stream_wait(&self, other: &CudaStream) -> Result<()> {
        if *other != *self.stream {
            other.join(&self.stream)?;
        }
        Ok(())
    }

    /// A loaded kernel by its `extern "C"` name.
    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| {
            Error::CudaUnavailable(format!("kernel {name} is not in the embedded PTX"))
        })
    }

    /// [`function`](Self::function) by a name assembled from parts (dtype,
    /// mode...), formatted into a stack buffer: launchers call this every
    /// step, and a step does no heap allocation.
    pub(crate) fn function_named(&self, name: std::fmt::Arguments<'_>) -> Result<&CudaFunction> {
        let mut buf = NameBuf::default();
        match std::fmt::write(&mut buf, name) {
            Ok(()) => self.function(buf.as_str()),
            // Longer than any kernel name: cannot be one of ours.
            Err(_) => Err(Error::CudaUnavailable(format!(
                "kernel {name} is not in the embedded PTX"
            ))),
        }
    }
}

/// The primary context of device `ordinal`, for building the stream a
/// [`CudaBackend::from_stream`] runs on (`ctx.new_stream()`, or
/// `ctx.wrap_borrowed_stream(raw)` around a framework's `CUstream`).
///
/// Unlike cudarc's `CudaContext::new`, which panics where no driver library
/// can be loaded, this returns [`Error::CudaUnavailable`] when there is no
/// driver library, the driver lacks a function it needs, or the device does
/// not exist.
///
/// # Errors
/// [`Error::CudaUnavailable`] in those three cases.
///
/// ```no_run
/// # fn main() -> tram_kernels::Result<()> {
/// let ctx = tram_kernels::cuda::context(0)?;
/// let gpu = tram_kernels::cuda::CudaBackend::from_stream(ctx.new_stream()?)?;
/// # let _ = gpu;
/// # Ok(())
/// # }
/// ```
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    guarded("creating a CUDA context", || CudaContext::new(ordinal))?.map_err(|e| {
        let e = DriverError::from_cudarc(e);
        Error::CudaUnavailable(format!("no CUDA device {ordinal}: {e}"))
    })
}

/// The end address of `len` elements of `size` bytes at device address
/// `ptr`; `Err` naming `what` when the buffer would run past the end of the
/// 64-bit address space (a length no allocation can have).
pub(crate) fn buffer_end(what: &str, ptr: u64, len: u64, size: usize) -> Result<u64> {
    len.checked_mul(size as u64)
        .and_then(|n| ptr.checked_add(n))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what}: {len} elements of {size} bytes at {ptr:#x} extend past the address space"
            ))
        })
}

/// A kernel name being assembled, on the stack.
struct NameBuf {
    bytes: [u8; 96],
    len: usize,
}

impl Default for NameBuf {
    fn default() -> Self {
        Self {
            bytes: [0; 96],
            len: 0,
        }
    }
}

impl NameBuf {
    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever appended, so the prefix is valid UTF-8.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

impl std::fmt::Write for NameBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.bytes.len() {
            return Err(std::fmt::Error);
        }
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn check_ptx_built() -> Result<()> {
    if ptx::MODULES.is_empty() {
        return Err(Error::CudaUnavailable(if ptx::MISSING_REASON.is_empty() {
            "no kernels were embedded at build time".to_string()
        } else {
            ptx::MISSING_REASON.to_string()
        }));
    }
    Ok(())
}

/// cudarc panics (rather than returning an error) when libcuda cannot be
/// loaded or lacks a symbol; turn that into our error.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    if !libcuda::present() {
        return Err(Error::CudaUnavailable(
            "the CUDA driver library (libcuda) could not be loaded: is there an NVIDIA driver?"
                .into(),
        ));
    }
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Error::CudaUnavailable(format!("{what}: the CUDA driver library failed: {msg}"))
    })
}

#[cfg(test)]
mod tests {
    use super::{buffer_end, NameBuf};
    use std::fmt::Write;

    #[test]
    fn buffers_past_the_address_space_are_errors() {
        assert_eq!(buffer_end("x", 0x1000, 4, 4).unwrap(), 0x1010);
        assert_eq!(buffer_end("x", u64::MAX - 4, 1, 4).unwrap(), u64::MAX);
        assert!(buffer_end("x", u64::MAX - 3, 1, 4).is_err());
        assert!(buffer_end("x", 0x1000, u64::MAX / 2, 4).is_err());
        assert!(buffer_end("x", 0x1000, u64::MAX, 2).is_err());
    }

    #[test]
    fn kernel_names_are_assembled_on_the_stack() {
        let mut b = NameBuf::default();
        let (mode, p, g) = ("in_place", "bf16", "f32");
        write!(b, "perturb_{mode}_{p}_{g}").unwrap();
        assert_eq!(b.as_str(), "perturb_in_place_bf16_f32");
        // Too long for any kernel name: an error, not a truncated match.
        let mut b = NameBuf::default();
        assert!(write!(b, "{}", "x".repeat(97)).is_err());
    }
}
