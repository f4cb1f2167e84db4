//! Shared by the GPU tests: find the device or say why not.
#![allow(dead_code)]

use tram_kernels::cuda::CudaBackend;

/// The CUDA backend on device 0, or `None` with a printed reason. With
/// `TRAM_REQUIRE_GPU=1` a missing GPU fails the test instead of skipping it.
pub fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            if std::env::var("TRAM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("TRAM_REQUIRE_GPU=1 but no GPU backend: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// Skips the calling test (returning early) when there is no GPU.
#[macro_export]
macro_rules! gpu_or_skip {
    () => {
        match common::gpu() {
            Some(b) => b,
            None => return,
        }
    };
}
