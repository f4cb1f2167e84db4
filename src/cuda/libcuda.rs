//! Is the CUDA driver library there? Asked before any cudarc call, because
//! cudarc, when it loads the library at run time, panics without it (and a
//! panic is an abort under `panic = "abort"`).
//!
//! The probe is ours, not cudarc's `is_culib_present`: that function exists
//! only when cudarc loads the library at run time, and the crate must build
//! under every loading mode a framework picks for the one cudarc in the build
//! (candle turns on `dynamic-linking`, burn's cubecl `fallback-dynamic-loading`).
//! - Loaded at run time (`dynamic-loading`, or `fallback-dynamic-loading`
//!   alone): we try the usual names among those cudarc tries (a subset, so
//!   a yes here is a yes for cudarc).
//! - Linked (`dynamic-linking`, `static-linking`): a process without the
//!   library does not start, and one that runs has it mapped, so opening it
//!   by its soname succeeds and the probe says yes.

use std::sync::OnceLock;

/// Library names for the driver ("cuda" on Linux, "nvcuda" on Windows), all
/// among those cudarc 0.19 tries, with the bindings' CUDA major version.
fn candidates() -> Vec<String> {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    let major = cudarc::driver::sys::CUDA_VERSION / 1000;
    let mut names = Vec::new();
    for lib in ["cuda", "nvcuda"] {
        let base = format!("{DLL_PREFIX}{lib}{DLL_SUFFIX}");
        names.push(base.clone());
        names.push(format!("{DLL_PREFIX}{lib}64{DLL_SUFFIX}"));
        names.push(format!("{DLL_PREFIX}{lib}64_{major}{DLL_SUFFIX}"));
        // The soname a linked process has mapped (libcuda.so.1), and the
        // major-versioned names some distributions ship.
        for suffix in ["1", &major.to_string(), "12", "11"] {
            names.push(format!("{base}.{suffix}"));
        }
    }
    names
}

/// Whether the CUDA driver library can be opened; asked once per process.
pub(crate) fn present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        candidates().iter().any(|name| {
            // SAFETY: opening a shared library runs its initialisers; the
            // names are the NVIDIA driver's, whose initialisers cudarc runs
            // anyway on its first call. The handle is dropped at once (the
            // library stays mapped while cudarc or the linker holds it).
            unsafe { libloading::Library::new(name) }.is_ok()
        })
    })
}

/// The driver library, opened by the first candidate name that opens, for
/// looking a symbol up without calling it through cudarc (which panics on a
/// missing symbol); `None` without the library.
pub(crate) fn open() -> Option<libloading::Library> {
    if !present() {
        return None;
    }
    candidates().iter().find_map(|name| {
        // SAFETY: as in `present`: the NVIDIA driver's own initialisers,
        // which cudarc runs anyway.
        unsafe { libloading::Library::new(name) }.ok()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn candidates_include_the_linux_soname_and_the_windows_dll() {
        let names = super::candidates();
        if cfg!(target_os = "linux") {
            assert!(names.iter().any(|n| n == "libcuda.so"));
            assert!(names.iter().any(|n| n == "libcuda.so.1"));
        }
        if cfg!(windows) {
            assert!(names.iter().any(|n| n == "nvcuda.dll"));
        }
    }
}
