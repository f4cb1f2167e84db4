//! The CPU reference: rayon-parallel, f64 accumulation. It is the oracle of
//! every GPU test, so accuracy comes before speed here.
