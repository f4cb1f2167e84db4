//! The CPU reference: rayon-parallel, f64 accumulation. It is the oracle of
//! every GPU test, so accuracy comes before speed here.

pub mod convert;
pub mod ema;
pub mod grad_norm;
pub mod kl_div;
pub mod math;
pub mod noise;
pub mod optimizer;
pub mod perturb;
pub mod restore;
pub mod step;
