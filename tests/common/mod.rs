//! Shared by the GPU tests: find the device or say why not.
#![allow(dead_code)]

use std::io::Write;

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
            // Written to the stderr handle, not with eprintln!, so that the
            // test harness does not capture it: a skip is visible in the log.
            let test = std::thread::current().name().unwrap_or("?").to_string();
            let _ = writeln!(std::io::stderr(), "skipping GPU test {test}: {e}");
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
