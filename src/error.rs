//! The crate's one error type.

use std::fmt;

/// Everything that can go wrong in this crate. Bad input is an `Err`, never a panic.
///
/// Its shape does not depend on cudarc: a driver failure is carried as this
/// crate's own [`DriverError`], so a cudarc upgrade does not change it. More
/// variants may come, hence `#[non_exhaustive]`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed something inconsistent: mismatched lengths, an empty
    /// group, a non-positive temperature, a stride shorter than the vocabulary...
    InvalidArgument(String),
    /// The CUDA backend cannot be created here: no PTX was built (nvcc missing
    /// at build time), no driver could be loaded, or no device exists.
    CudaUnavailable(String),
    /// A CUDA driver call failed.
    Driver(DriverError),
}

/// A failed CUDA driver call: its `CUresult` code, the code's name, and the
/// driver's description of it, all captured when the error was converted.
///
/// The name comes from the code alone. The description is asked of the driver
/// library only where that library is present and exports
/// `cuGetErrorString`; otherwise it is `None`. Formatting never calls the
/// driver, so it cannot fail or panic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverError {
    code: u32,
    name: String,
    message: Option<String>,
}

impl DriverError {
    /// The raw `CUresult` value (e.g. 100 for `CUDA_ERROR_NO_DEVICE`).
    pub fn code(&self) -> u32 {
        self.code
    }

    /// The `CUresult` name, e.g. `CUDA_ERROR_INVALID_PTX`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver's description of the code, when it could be obtained.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    pub(crate) fn from_cudarc(e: cudarc::driver::DriverError) -> Self {
        let code = e.0;
        Self {
            code: code as u32,
            // The enum's variant name: no driver call.
            name: format!("{code:?}"),
            message: driver_message(code),
        }
    }
}

/// `cuGetErrorString` of `code`, looked up by hand so that a driver library
/// without it (or no library at all) gives `None` instead of cudarc's panic.
fn driver_message(code: cudarc::driver::sys::CUresult) -> Option<String> {
    use cudarc::driver::sys::CUresult;
    use std::ffi::{c_char, CStr};
    type GetErrorString = unsafe extern "C" fn(CUresult, *mut *const c_char) -> CUresult;
    let lib = crate::cuda::libcuda::open()?;
    // SAFETY: `get` looks the symbol up without calling it; the declared type
    // is the driver API's `CUresult cuGetErrorString(CUresult, const char**)`.
    let f = unsafe { lib.get::<GetErrorString>(b"cuGetErrorString\0") }.ok()?;
    let mut text: *const c_char = std::ptr::null();
    // SAFETY: a plain driver call with a valid out-pointer; it needs no
    // context and accepts any code (an unknown one is an error result).
    let r = unsafe { f(code, &mut text) };
    if r != CUresult::CUDA_SUCCESS || text.is_null() {
        return None;
    }
    // SAFETY: on success the driver points `text` at a static NUL-terminated
    // string; it is copied while `lib` (and so the driver) is still loaded.
    Some(
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned(),
    )
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.code)?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        Ok(())
    }
}

/// `std::result::Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::CudaUnavailable(m) => write!(f, "CUDA backend unavailable: {m}"),
            Error::Driver(e) => write!(f, "CUDA driver error {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Lets `?` turn cudarc's driver errors (of the cudarc version this crate's
/// `cuda` module is built on) into this crate's error.
impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(DriverError::from_cudarc(e))
    }
}

/// Returns `Err(InvalidArgument)` with the formatted message when `cond` is false.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Error::InvalidArgument(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::CUresult;

    /// Formatting a driver error must not call into the driver: here there is
    /// no driver library at all (on a GPU machine the name still comes from
    /// the code alone).
    #[test]
    fn a_driver_error_formats_without_the_driver() {
        let e: Error = cudarc::driver::DriverError(CUresult::CUDA_ERROR_NO_DEVICE).into();
        let shown = e.to_string();
        assert!(shown.contains("CUDA_ERROR_NO_DEVICE"), "{shown}");
        assert!(shown.contains("100"), "{shown}");
        let debug = format!("{e:?}");
        assert!(debug.contains("CUDA_ERROR_NO_DEVICE"), "{debug}");
        let Error::Driver(d) = e else {
            panic!("not a driver error: {e:?}")
        };
        assert_eq!((d.code(), d.name()), (100, "CUDA_ERROR_NO_DEVICE"));
    }
}
