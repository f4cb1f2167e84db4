//! candle integration (feature `candle`; `candle-cuda` for CUDA tensors).
//!
//! The crate's operations over [candle](https://docs.rs/candle-core) tensors,
//! in candle's idiom: functions on `Tensor`s that return `candle_core::Result`,
//! and custom ops that take part in candle's autograd.
//!
//! * [`TramOptimizer`]: TRAM-θ, TRAM-x, SAM and ASAM as a candle optimizer
//!   over `Var`s and a `GradStore`, running the crate's step API on the vars'
//!   own storage ([`optimizer`]).
//! * [`kl_div`](kl_div::kl_div): the KL divergence between two sets of logits
//!   (TRAM's trust-region measure) as a candle op with its backward, so it
//!   also serves as a distillation loss.
//!
//! # Backends
//! On candle's CPU device the ops run the crate's CPU reference
//! ([`crate::cpu`]) on candle's own buffers (no copy of the inputs). With the
//! `candle-cuda` feature, on a CUDA device they launch the crate's kernels
//! ([`crate::cuda`]) on candle's own stream (`CudaDevice::cuda_stream`), over
//! candle's device buffers (`CudaStorage::as_cuda_slice` and the layout's
//! offset): no copy, no synchronisation. (Two candle `CudaDevice`s on one
//! GPU count as one device for candle; the ops then launch on the first
//! input's stream, and cudarc's event tracking orders the other input's
//! buffer.) Each candle CUDA device gets one
//! [`CudaBackend`](crate::cuda::CudaBackend) (the crate's kernels loaded into
//! candle's context) on first use, kept for the life of the process.
//!
//! # Writing into candle's memory
//! candle hands out its device buffers read-only (`as_cuda_slice` gives
//! `&CudaSlice`), and a tensor's storage may be shared by other tensors (views,
//! clones). The ops here never write into a tensor they were given: every
//! result goes into fresh storage that candle allocates (`CudaDevice::alloc_zeros`
//! on candle's stream, or a `Vec` on the CPU) and then owns.
//!
//! Updating a `Var` in place (what an optimizer step does) is sound under this
//! contract, which the crate's candle optimizer ([`optimizer`]) follows on CUDA
//! (on the CPU it writes through `Tensor::inplace_op1`, which holds the lock):
//! 1. the write happens while candle's write lock on the var's storage is
//!    held, as `Var::set` and candle's in-place ops (`Tensor::inplace_op1`,
//!    which hands out `&mut CudaStorage`) hold it; a launch that writes
//!    several vars at once through raw addresses holds none of them, so the
//!    caller must guarantee that nothing else uses those vars until the step
//!    returns (no other thread, no backward in flight);
//! 2. only the elements of the var's layout are written (a var is contiguous:
//!    `start_offset .. start_offset + elem_count`);
//! 3. the launch goes on the storage's own stream (candle's), so candle's
//!    earlier and later work on it is ordered without a synchronisation;
//!    work on other streams is ordered by cudarc's events only while candle's
//!    event tracking is on;
//! 4. every view and clone of the var sees the update, as with `Var::set`;
//! 5. raw addresses stay valid only while the storage lives: a var's storage
//!    keeps its address (`Var::set` copies into it), but `backward()`
//!    allocates new gradient tensors every call, so gradient addresses (and
//!    any launch table holding them) must be refreshed every step, and a
//!    captured CUDA graph cannot follow them.
//!
//! # Errors
//! Functions here return `candle_core::Result`, as candle's own ops do. Bad
//! input found by this crate (mismatched shapes, dtypes the crate does not
//! take, layouts it cannot read) is this crate's [`Error`](crate::Error)
//! wrapped in `candle_core::Error::Wrapped`, its message kept (the `From`
//! conversion below lets `?` carry the crate's errors into candle code).
//! Inputs on different devices are refused by candle itself. Nothing panics on
//! bad input.
//!
//! # Requirements
//! candle-core 0.11.1's dependencies need Rust 1.89 or newer. `candle` needs
//! nothing else: no CUDA toolkit, no CUDA library. `candle-cuda` turns on
//! candle-core's `cuda` feature, which compiles candle's own kernels with
//! `nvcc` at build time, for the compute capability in `CUDA_COMPUTE_CAP`
//! (e.g. `90`) or, where that is unset, the one `nvidia-smi` reports; and it
//! links the CUDA runtime, cuBLAS and cuRAND, so a binary built with it needs
//! the CUDA toolkit's libraries to link and a driver to start.

pub mod kl_div;
pub mod optimizer;

pub use kl_div::{kl_div, KlDiv};
pub use optimizer::{Checkpoint, Method, TramOptimizer};

impl From<crate::Error> for candle_core::Error {
    fn from(e: crate::Error) -> Self {
        candle_core::Error::wrap(e)
    }
}
