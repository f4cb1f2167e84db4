//! Only compiled (CI runs `cargo check`): tram-kernels with cudarc as
//! candle-core 0.11.1 enables it, used on a stream the framework owns.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use tram_kernels::cuda::CudaBackend;

/// The crate's backend on the framework's stream: one cudarc, one set of types.
pub fn backend_on(stream: Arc<CudaStream>) -> tram_kernels::Result<CudaBackend> {
    CudaBackend::from_stream(stream)
}
