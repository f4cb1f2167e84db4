//! TRAM-x's embedding noise on the CPU: out = e + z, z ~ U(−σ, σ) or N(0, σ²).
//!
//! z comes from Philox4x32-10 (Salmon et al., SC'11), a counter-based
//! generator: the 64-bit seed is the key and the counter is
//! (j mod 2³², j div 2³², step mod 2³², step div 2³²) for the four elements
//! 4j..4j+3, one 32-bit word each. `kernels/noise.cu` implements the same
//! function, so every element's noise depends only on (seed, step, index).
//!
//! Uniform: the word's top 24 bits k give v = (2k + 1 − 2²⁴)·2⁻²⁴, exact in
//! f32 and symmetric in (−1, 1); z = σ·v and e + z are single f32 operations on
//! both backends, so uniform noise is **bit-identical** on the CPU and the GPU
//! for finite embeddings (a NaN embedding gives NaN on both, with the payload
//! each device gives it: canonical on a GPU).
//!
//! Gaussian (Box–Muller over the word pairs (0,1) and (2,3)): with
//! u1 = (x₀ + 1)·2⁻³² ∈ (0, 1] and u2 = x₁·2⁻³², z = σ·(r·cos a) and σ·(r·sin a),
//! r = sqrt(−2 ln u1), a = 2π·u2, evaluated in f64 and rounded once to f32.
//! The CPU's libm and CUDA's `log`/`sin`/`cos` (f64) may differ by an f64 ulp or
//! two, which flips the f32 rounding only rarely: z agrees to 1 ulp of f32
//! (≤ 1.2e-7 relative), plus at most ~1e-15·σ absolute near the zeros of
//! cos/sin. e + z is then one f32 addition rounded to the element type.

use rayon::prelude::*;

use crate::config::{NoiseConfig, NoiseDistribution};
use crate::dtype::Element;
use crate::error::{ensure, Result};

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: the 128-bit block `ctr` under the 64-bit `key`.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The four random words of elements 4j..4j+3.
#[inline]
pub fn noise_words(seed: u64, step: u64, j: u64) -> [u32; 4] {
    philox4x32_10(
        [j as u32, (j >> 32) as u32, step as u32, (step >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// A word to a uniform in (−1, 1), exactly as the kernel does it.
#[inline]
pub fn uniform_pm1(x: u32) -> f32 {
    let n = 2 * (x >> 8) as i32 + 1 - (1 << 24);
    n as f32 * (1.0 / 16_777_216.0)
}

/// Box–Muller on one word pair: (r·cos a, r·sin a) in f64.
#[inline]
fn box_muller(x0: u32, x1: u32) -> (f64, f64) {
    const TWO_M32: f64 = 1.0 / 4_294_967_296.0;
    let u1 = (x0 as f64 + 1.0) * TWO_M32;
    let u2 = x1 as f64 * TWO_M32;
    let r = (-2.0 * u1.ln()).sqrt();
    let a = std::f64::consts::TAU * u2;
    (r * a.cos(), r * a.sin())
}

/// The noise z of all four elements of block j (σ applied, rounded to f32).
#[inline]
pub fn noise_block(cfg: &NoiseConfig, step: u64, j: u64) -> [f32; 4] {
    let x = noise_words(cfg.seed, step, j);
    match cfg.distribution {
        NoiseDistribution::Uniform => x.map(|w| cfg.sigma * uniform_pm1(w)),
        NoiseDistribution::Gaussian => {
            let s = cfg.sigma as f64;
            let (a, b) = box_muller(x[0], x[1]);
            let (c, d) = box_muller(x[2], x[3]);
            [
                (s * a) as f32,
                (s * b) as f32,
                (s * c) as f32,
                (s * d) as f32,
            ]
        }
    }
}

/// The noise z of element `index` at `step`.
pub fn noise_value(cfg: &NoiseConfig, step: u64, index: u64) -> f32 {
    noise_block(cfg, step, index / 4)[(index % 4) as usize]
}

/// out = e + z, element by element (z of element i from counter i).
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument), nothing written: σ negative or not finite, or `input` and `out` of
/// different lengths.
pub fn add_noise<T: Element>(
    input: &[T],
    out: &mut [T],
    cfg: &NoiseConfig,
    step: u64,
) -> Result<()> {
    cfg.validate()?;
    ensure!(
        input.len() == out.len(),
        "noise input has {} elements, output {}",
        input.len(),
        out.len()
    );
    const CHUNK: usize = 1 << 14; // a multiple of 4: blocks never straddle chunks
    out.par_chunks_mut(CHUNK)
        .zip(input.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, e))| {
            let base = (c * CHUNK) as u64;
            for (q, (o4, e4)) in o.chunks_mut(4).zip(e.chunks(4)).enumerate() {
                let z = noise_block(cfg, step, base / 4 + q as u64);
                for i in 0..o4.len() {
                    o4[i] = T::from_f32(e4[i].to_f32() + z[i]);
                }
            }
        });
    Ok(())
}

/// e ← e + z in place.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument), nothing written: σ negative or not finite.
pub fn add_noise_inplace<T: Element>(x: &mut [T], cfg: &NoiseConfig, step: u64) -> Result<()> {
    cfg.validate()?;
    const CHUNK: usize = 1 << 14;
    x.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let base = (c * CHUNK) as u64;
        for (q, o4) in o.chunks_mut(4).enumerate() {
            let z = noise_block(cfg, step, base / 4 + q as u64);
            for (i, v) in o4.iter_mut().enumerate() {
                *v = T::from_f32(v.to_f32() + z[i]);
            }
        }
    });
    Ok(())
}
