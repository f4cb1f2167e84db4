//! # tram-kernels
//!
//! CUDA kernels for one step of TRAM (Trust Region Aware Minimization;
//! Sherborne et al., ICLR 2024) over a framework's own device buffers, and a
//! rayon CPU reference with the same semantics that the GPU tests check against.
//!
//! Each operation has three files with one stem: the kernel in `kernels/<op>.cu`,
//! its launcher in `src/cuda/<op>.rs`, and its reference in `src/cpu/<op>.rs`.

#[cfg(feature = "candle")]
pub mod candle;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod error;

pub use config::{
    BaseOptimizer, Geometry, KlDirection, KlOptions, NoiseConfig, NoiseDistribution, PerturbStatus,
    Radius, Reduction, StepCounter, TramConfig, TramVariant,
};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};
