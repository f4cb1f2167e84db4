//! The build embeds, for every `kernels/*.cu`, a fat binary with machine code
//! (SASS) for Ampere, Hopper and Blackwell and plain `compute_80` PTX. Without
//! nvcc the crate still builds and the backend says why it cannot start.

use std::path::Path;

use tram_kernels::cuda::ptx::{self, ImageKind};
use tram_kernels::cuda::CudaBackend;
use tram_kernels::Error;

/// The default SASS set: sm_80 runs 8.0-8.9 (A100, A10, RTX 30/40, Orin),
/// sm_90 H100/H200, sm_100 B200/B300 (10.0, 10.3), sm_110 Thor, sm_120 the
/// RTX 50 and RTX PRO Blackwell cards and GB10 (12.0, 12.1).
const DEFAULT_SASS: [u32; 5] = [80, 90, 100, 110, 120];

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

fn require_nvcc() -> bool {
    std::env::var("TRAM_REQUIRE_NVCC").is_ok_and(|v| v == "1")
}

/// False (after saying why) when the build found no nvcc, which is only
/// allowed without TRAM_REQUIRE_NVCC=1.
fn kernels_built() -> bool {
    if ptx::NVCC.is_some() {
        return true;
    }
    assert!(ptx::MODULES.is_empty());
    assert!(
        !require_nvcc(),
        "TRAM_REQUIRE_NVCC=1 but the build found no nvcc"
    );
    eprintln!("no nvcc at build time: {}", ptx::MISSING_REASON);
    false
}

#[test]
fn every_kernel_file_is_a_fatbin_with_the_built_sass_and_plain_ptx() {
    if !kernels_built() {
        return;
    }
    let embedded: Vec<&str> = ptx::MODULES.iter().map(|(name, _)| *name).collect();
    assert_eq!(embedded, kernel_stems());
    assert_eq!(ptx::PTX_ARCH, 80);
    for (name, fatbin) in ptx::MODULES {
        let images = ptx::images(fatbin).unwrap();
        let listed: Vec<String> = images.iter().map(|i| i.arch_name()).collect();
        eprintln!("{name}: {}", listed.join(", "));
        let sass: Vec<u32> = images
            .iter()
            .filter(|i| i.kind == ImageKind::Sass)
            .map(|i| i.arch)
            .collect();
        assert_eq!(sass, ptx::SASS_ARCHS, "{name}.cu: SASS images");
        let ptx_images: Vec<_> = images.iter().filter(|i| i.kind == ImageKind::Ptx).collect();
        assert_eq!(ptx_images.len(), 1, "{name}.cu: one PTX image");
        assert_eq!(ptx_images[0].arch, 80, "{name}.cu: compute_80 PTX");
        // The emulated device reads signatures from the PTX: it must be plain.
        assert!(!ptx_images[0].compressed, "{name}.cu: compressed PTX");
        let text = ptx::ptx_text(fatbin).unwrap();
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
fn default_build_runs_ampere_hopper_and_blackwell_without_jit() {
    if !kernels_built() {
        return;
    }
    if let Some(archs) = ptx::ARCHS_FROM_ENV {
        eprintln!(
            "TRAM_CUDA_ARCHS={archs} chose the architectures; the default set is not checked"
        );
        return;
    }
    // CI's nvcc (13.0) builds all of them; an older one may skip some.
    if require_nvcc() {
        assert!(
            ptx::SKIPPED_ARCHS.is_empty(),
            "skipped {:?}",
            ptx::SKIPPED_ARCHS
        );
    }
    let expected: Vec<u32> = DEFAULT_SASS
        .into_iter()
        .filter(|a| !ptx::SKIPPED_ARCHS.contains(a))
        .collect();
    for (name, fatbin) in ptx::MODULES {
        let sass: Vec<u32> = ptx::images(fatbin)
            .unwrap()
            .iter()
            .filter(|i| i.kind == ImageKind::Sass)
            .map(|i| i.arch)
            .collect();
        assert_eq!(sass, expected, "{name}.cu");
    }
    // Every Ampere, Hopper and Blackwell compute capability finds machine code.
    let devices = [80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121];
    for cc in devices {
        let want = DEFAULT_SASS
            .iter()
            .copied()
            .filter(|a| a / 10 == cc / 10)
            .max();
        if want.is_some_and(|a| ptx::SKIPPED_ARCHS.contains(&a)) {
            continue;
        }
        assert_eq!(ptx::sass_for(cc), want, "compute capability {cc}");
        assert!(
            ptx::sass_for(cc).is_some(),
            "compute capability {cc} would JIT"
        );
    }
    // Older GPUs have none; newer ones JIT the PTX.
    assert_eq!(ptx::sass_for(75), None);
    assert_eq!(ptx::sass_for(130), None);
}

#[test]
fn backend_without_kernels_names_the_missing_nvcc() {
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
