//! The kernels build.rs compiled from `kernels/*.cu`: one fat binary per file,
//! holding machine code (SASS) for each architecture in [`SASS_ARCHS`] and
//! `compute_80` PTX, which the driver compiles for any newer GPU. The PTX is
//! stored uncompressed; the kernel names are read from it.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

pub use super::fatbin::{Image, ImageKind};
use crate::error::{Error, Result};

/// Every image of a fat binary (such as a module of [`MODULES`]), in order:
/// its kind, architecture and whether it is compressed.
///
/// # Errors
/// [`Error::InvalidArgument`] when `fatbin` is not a well-formed fat binary.
pub fn images(fatbin: &[u8]) -> Result<Vec<Image>> {
    super::fatbin::images(fatbin).map_err(Error::InvalidArgument)
}

/// The `compute_80` PTX text of a fat binary built by build.rs.
///
/// # Errors
/// As [`images`], and a fat binary without that PTX image.
pub fn ptx_text(fatbin: &[u8]) -> Result<&str> {
    super::fatbin::ptx_text(fatbin, PTX_ARCH).map_err(Error::InvalidArgument)
}

/// The SASS architecture of [`SASS_ARCHS`] the driver runs on a GPU of compute
/// capability `cc` (86 for 8.6): a cubin for X.y runs on X.z for z ≥ y, so the
/// newest one with the same major version and no higher minor. `None` means
/// the driver JIT-compiles the `compute_80` PTX on first load (once per
/// process, cached on disk by the driver), or for a GPU older than 8.0 cannot
/// run the kernels at all.
pub fn sass_for(cc: u32) -> Option<u32> {
    SASS_ARCHS
        .iter()
        .copied()
        .filter(|&a| a / 10 == cc / 10 && a % 10 <= cc % 10)
        .max()
}

/// The `.entry` names declared in a PTX module, in order.
pub fn entry_points(ptx: &str) -> impl Iterator<Item = &str> {
    ptx.lines().filter_map(|line| {
        let rest = line.trim_start().strip_prefix(".visible .entry ")?;
        let end = rest.find('(').unwrap_or(rest.len());
        Some(rest[..end].trim())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn entry_points_are_parsed() {
        let ptx = ".visible .entry foo(\n .param .u64 a\n)\n{\n}\n.visible .entry bar_f32(\n)";
        let names: Vec<_> = super::entry_points(ptx).collect();
        assert_eq!(names, ["foo", "bar_f32"]);
    }
}
