//! Shared by the GPU tests: find the device or say why not, and gate the big
//! cases on what they need.
#![allow(dead_code)]

use std::fmt::Display;
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
            skip(e);
            None
        }
    }
}

/// Says that (part of) the calling test is skipped, and why, where the test
/// log shows it: written to the stderr handle, not with eprintln!, so that the
/// harness does not capture it.
pub fn skip(why: impl Display) {
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let _ = writeln!(std::io::stderr(), "skipping GPU test {test}: {why}");
}

/// Whether the device has `need` bytes of memory free for `what`; if not, says
/// so (see [`skip`]).
pub fn device_has(gpu: &CudaBackend, need: usize, what: &str) -> bool {
    let free = gpu
        .context()
        .mem_get_info()
        .map(|(free, _)| free)
        .unwrap_or(0);
    if free >= need {
        return true;
    }
    skip(format_args!(
        "{what} needs {:.1} GiB of device memory, {:.1} GiB are free",
        need as f64 / (1u64 << 30) as f64,
        free as f64 / (1u64 << 30) as f64
    ));
    false
}

/// Whether the device is the emulated one of `emu/` (it names itself so).
pub fn emulated(gpu: &CudaBackend) -> bool {
    gpu.context()
        .name()
        .is_ok_and(|n| n.starts_with("tram-emu"))
}

/// Cases kept for real GPUs: on the emulated device they would take many
/// minutes and more host memory than its machines have. Says so when skipped.
pub fn real_gpu_case(gpu: &CudaBackend, what: &str, why: &str) -> bool {
    if !emulated(gpu) {
        return true;
    }
    skip(format_args!("{what} is kept for real GPUs ({why})"));
    false
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

/// A lock every GPU test of a binary that captures CUDA graphs holds for its
/// whole run: creating a backend synchronises the context (cudarc does when a
/// `CudaContext` creates its first stream), which invalidates a capture open
/// on another test thread. One lock per test binary (each compiles this
/// module), released on panic too.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints a line to the test log even when the harness captures output
/// (see [`skip`]).
pub fn log(line: impl Display) {
    let _ = writeln!(std::io::stderr(), "{line}");
}
