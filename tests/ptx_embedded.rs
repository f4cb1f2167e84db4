//! The build embeds PTX for every `kernels/*.cu`. Without nvcc the crate
//! still builds and the backend says why it cannot start.

use std::path::Path;

use tram_kernels::cuda::{ptx, CudaBackend};
use tram_kernels::Error;

fn kernel_stems() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut stems: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    stems.sort();
    stems
}

#[test]
fn every_kernel_file_is_embedded_when_nvcc_was_found() {
    let embedded: Vec<&str> = ptx::MODULES.iter().map(|(name, _)| *name).collect();
    if ptx::NVCC.is_none() {
        assert!(embedded.is_empty());
        assert!(
            std::env::var("TRAM_REQUIRE_NVCC").map_or(true, |v| v != "1"),
            "TRAM_REQUIRE_NVCC=1 but the build found no nvcc"
        );
        eprintln!("no nvcc at build time: {}", ptx::MISSING_REASON);
        return;
    }
    assert_eq!(embedded, kernel_stems());
    for (name, text) in ptx::MODULES {
        assert!(
            text.contains(".target sm_80"),
            "{name}.cu: not compute_80 PTX"
        );
        assert!(
            ptx::entry_points(text).next().is_some(),
            "{name}.cu: no kernel entry point"
        );
    }
}

#[test]
fn backend_without_ptx_names_the_missing_nvcc() {
    if ptx::NVCC.is_some() {
        return; // covered on machines built without nvcc
    }
    match CudaBackend::new(0) {
        Err(Error::CudaUnavailable(msg)) => assert!(msg.contains("nvcc"), "{msg}"),
        other => panic!("expected CudaUnavailable naming nvcc, got {other:?}"),
    }
}

#[test]
fn backend_creation_never_panics() {
    // Whatever this machine has (no driver, no device, a GPU), creating a
    // backend on a device that cannot exist is an error, not a panic.
    match CudaBackend::new(1 << 20) {
        Err(Error::CudaUnavailable(_)) | Err(Error::Driver(_)) => {}
        other => panic!("expected an error for device 2^20, got {other:?}"),
    }
}
