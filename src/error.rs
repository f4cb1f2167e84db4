//! The crate's one error type.

use std::fmt;

/// Everything that can go wrong in this crate. Bad input is an `Err`, never a panic.
#[derive(Debug)]
pub enum Error {
    /// The caller passed something inconsistent: mismatched lengths, an empty
    /// group, a non-positive temperature, a stride shorter than the vocabulary...
    InvalidArgument(String),
    /// The CUDA backend cannot be created here: no PTX was built (nvcc missing
    /// at build time), no driver could be loaded, or no device exists.
    CudaUnavailable(String),
    /// A CUDA driver call failed.
    Driver(cudarc::driver::DriverError),
}

/// `std::result::Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::CudaUnavailable(m) => write!(f, "CUDA backend unavailable: {m}"),
            Error::Driver(e) => write!(f, "CUDA driver error: {e:?}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(e)
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
