//! TRAM-x noise: Philox4x32-10 against the Random123 known answers, the
//! distributions' moments, and the CUDA kernel against the CPU reference.

#[macro_use]
mod common;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::noise::{add_noise, add_noise_inplace, noise_value, philox4x32_10};
use tram_kernels::{bf16, Error, NoiseConfig, NoiseDistribution};

/// Known answers of Philox4x32-10 from the Random123 distribution's
/// `kat_vectors` (as reproduced in D. E. Shaw Research's fs123 repository,
/// core123/ut/ut_philox.cpp): counter (4 words), key (2 words) → output.
#[test]
fn philox4x32_10_known_answers() {
    let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0; 4],
            [0; 2],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [0xffffffff; 4],
            [0xffffffff; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (ctr, key, want) in kat {
        assert_eq!(
            philox4x32_10(ctr, key),
            want,
            "ctr {ctr:08x?} key {key:08x?}"
        );
    }
}

fn cfg(distribution: NoiseDistribution, sigma: f32) -> NoiseConfig {
    NoiseConfig {
        distribution,
        sigma,
        seed: 0x0123_4567_89ab_cdef,
    }
}

#[test]
fn uniform_noise_is_in_range_with_the_right_moments() {
    let c = cfg(NoiseDistribution::Uniform, 0.25);
    let n = 1 << 20;
    let z: Vec<f64> = (0..n).map(|i| noise_value(&c, 7, i) as f64).collect();
    assert!(z.iter().all(|&x| x.abs() < 0.25));
    let mean = z.iter().sum::<f64>() / n as f64;
    let var = z.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
    // Var U(−σ,σ) = σ²/3; with 2^20 samples the sampling error is ~0.1%.
    assert!(
        mean.abs() < 5.0 * 0.25 / (3.0 * n as f64).sqrt(),
        "mean {mean}"
    );
    assert!((var / (0.0625 / 3.0) - 1.0).abs() < 0.01, "var {var}");
}

#[test]
fn gaussian_noise_has_the_right_moments() {
    let c = cfg(NoiseDistribution::Gaussian, 0.5);
    let n = 1 << 20;
    let z: Vec<f64> = (0..n).map(|i| noise_value(&c, 3, i) as f64).collect();
    let mean = z.iter().sum::<f64>() / n as f64;
    let var = z.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
    let kurt = z
        .iter()
        .map(|x| ((x - mean) / var.sqrt()).powi(4))
        .sum::<f64>()
        / n as f64;
    assert!(mean.abs() < 5.0 * 0.5 / (n as f64).sqrt(), "mean {mean}");
    assert!((var / 0.25 - 1.0).abs() < 0.01, "var {var}");
    assert!((kurt - 3.0).abs() < 0.05, "kurtosis {kurt}");
    // Neighbouring elements (the cos/sin pair) are uncorrelated.
    let corr = (0..n / 2)
        .map(|k| z[2 * k as usize] * z[2 * k as usize + 1])
        .sum::<f64>()
        / (n / 2) as f64;
    assert!(corr.abs() / 0.25 < 0.01, "pair correlation {corr}");
}

#[test]
fn noise_depends_on_seed_step_and_index_only() {
    let c = cfg(NoiseDistribution::Uniform, 1.0);
    let mut rng = SmallRng::seed_from_u64(3);
    let e: Vec<f32> = (0..10_007).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut a = vec![f32::NAN; e.len()];
    add_noise(&e, &mut a, &c, 5).unwrap();
    for (i, (&x, &y)) in a.iter().zip(&e).enumerate() {
        assert_eq!(x.to_bits(), (y + noise_value(&c, 5, i as u64)).to_bits());
    }
    let mut b = e.clone();
    add_noise_inplace(&mut b, &c, 5).unwrap();
    assert_eq!(a, b);
    let mut other_step = vec![0.0; e.len()];
    add_noise(&e, &mut other_step, &c, 6).unwrap();
    let same = a.iter().zip(&other_step).filter(|(x, y)| x == y).count();
    assert!(same < 10, "{same} elements equal across steps");
    let c2 = NoiseConfig {
        seed: c.seed + 1,
        ..c
    };
    let mut other_seed = vec![0.0; e.len()];
    add_noise(&e, &mut other_seed, &c2, 5).unwrap();
    let same = a.iter().zip(&other_seed).filter(|(x, y)| x == y).count();
    assert!(same < 10, "{same} elements equal across seeds");
}

#[test]
fn bf16_embeddings_round_once() {
    let c = cfg(NoiseDistribution::Gaussian, 0.1);
    let mut rng = SmallRng::seed_from_u64(4);
    let e: Vec<bf16> = (0..4099)
        .map(|_| bf16::from_f32(rng.random_range(-2.0..2.0)))
        .collect();
    let mut out = vec![bf16::from_bits(0x7fc1); e.len()];
    add_noise(&e, &mut out, &c, 1).unwrap();
    for i in 0..e.len() {
        let want = bf16::from_f32(e[i].to_f32() + noise_value(&c, 1, i as u64));
        assert_eq!(out[i].to_bits(), want.to_bits());
    }
}

#[test]
fn bad_input_is_an_error() {
    let e = vec![1.0f32; 8];
    let mut out = vec![0.0f32; 8];
    for sigma in [-0.1, f32::NAN, f32::INFINITY] {
        let c = cfg(NoiseDistribution::Uniform, sigma);
        assert!(matches!(
            add_noise(&e, &mut out, &c, 0),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            add_noise_inplace(&mut out, &c, 0),
            Err(Error::InvalidArgument(_))
        ));
    }
    let c = cfg(NoiseDistribution::Uniform, 0.1);
    assert!(matches!(
        add_noise(&e, &mut out[..7], &c, 0),
        Err(Error::InvalidArgument(_))
    ));
    // σ = 0 is no noise.
    add_noise(&e, &mut out, &cfg(NoiseDistribution::Gaussian, 0.0), 0).unwrap();
    assert_eq!(out, e);
}

mod gpu {
    use super::*;
    use cudarc::driver::DeviceRepr;
    use tram_kernels::cpu::noise::noise_value;
    use tram_kernels::cuda::noise::{
        add_noise as gpu_noise, add_noise_inplace as gpu_noise_inplace, NoiseStep,
    };
    use tram_kernels::cuda::CudaBackend;
    use tram_kernels::{f16, Element};

    fn run<T: Element + DeviceRepr>(
        gpu: &CudaBackend,
        dist: NoiseDistribution,
        n: usize,
        off: usize,
    ) {
        let c = cfg(dist, 0.3);
        let mut rng = SmallRng::seed_from_u64(n as u64);
        let e: Vec<T> = (0..n)
            .map(|_| T::from_f32(rng.random_range(-2.0..2.0)))
            .collect();
        let s = gpu.stream();
        let mut h = vec![T::from_f32(f32::NAN); off];
        h.extend_from_slice(&e);
        let d_in = s.clone_htod(&h).unwrap();
        let poison = vec![T::from_f32(f32::from_bits(0x7fc0_beef)); off + n + 3];
        let mut d_out = s.clone_htod(&poison).unwrap();
        let mut step = NoiseStep::new(gpu, 41).unwrap();
        step.advance(gpu).unwrap(); // step 42 on the device
        assert_eq!(step.get(gpu).unwrap(), 42);
        gpu_noise(
            gpu,
            &d_in.slice(off..off + n),
            &mut d_out.slice_mut(off..off + n),
            &c,
            &step,
        )
        .unwrap();
        let got = s.clone_dtoh(&d_out).unwrap();
        let mut want = vec![T::default(); n];
        add_noise(&e, &mut want, &c, 42).unwrap();
        for i in 0..n {
            let (g, w) = (got[off + i], want[i]);
            match dist {
                NoiseDistribution::Uniform => {
                    assert_eq!(
                        g.to_bits_u32(),
                        w.to_bits_u32(),
                        "uniform element {i} of {n}"
                    )
                }
                NoiseDistribution::Gaussian => {
                    // z within 1 ulp of f32 (libm vs CUDA f64 log/sin/cos), then
                    // one rounding of e + z to T (which that last bit may move by
                    // one ulp of T): compare at the z level.
                    let z = noise_value(&c, 42, i as u64) as f64;
                    let tol = 1e-6 * z.abs()
                        + 1e-12
                        + if T::DTYPE == tram_kernels::DType::F32 {
                            0.0
                        } else {
                            2f64.powi(-7) * w.to_f64().abs()
                        };
                    assert!(
                        (g.to_f64() - w.to_f64()).abs() <= tol,
                        "gaussian element {i}: {g:?} vs {w:?}"
                    );
                }
            }
        }
        // Nothing outside the view was written.
        assert!(got[..off]
            .iter()
            .chain(&got[off + n..])
            .all(|x| x.to_bits_u32() == poison[0].to_bits_u32()));
        // In place gives the same as out of place.
        let mut d_x = s.clone_htod(&e).unwrap();
        gpu_noise_inplace(gpu, &mut d_x.slice_mut(..), &c, &step).unwrap();
        let inplace = s.clone_dtoh(&d_x).unwrap();
        assert!(inplace
            .iter()
            .zip(&got[off..off + n])
            .all(|(a, b)| a.to_bits_u32() == b.to_bits_u32()));
    }

    #[test]
    fn gpu_noise_matches_cpu() {
        let gpu = gpu_or_skip!();
        for dist in [NoiseDistribution::Uniform, NoiseDistribution::Gaussian] {
            for (n, off) in [(1, 0), (7, 1), (4096, 0), (1_000_003, 3)] {
                run::<f32>(&gpu, dist, n, off);
                run::<bf16>(&gpu, dist, n, off);
                run::<f16>(&gpu, dist, n, off);
            }
        }
    }

    #[test]
    fn gpu_bad_input_is_an_error() {
        let gpu = gpu_or_skip!();
        let s = gpu.stream();
        let d = s.clone_htod(&[1.0f32; 8]).unwrap();
        let mut o = s.clone_htod(&[0.0f32; 8]).unwrap();
        let step = NoiseStep::new(&gpu, 0).unwrap();
        let bad = cfg(NoiseDistribution::Uniform, -1.0);
        assert!(matches!(
            gpu_noise(&gpu, &d.slice(..), &mut o.slice_mut(..), &bad, &step),
            Err(Error::InvalidArgument(_))
        ));
        let good = cfg(NoiseDistribution::Uniform, 1.0);
        assert!(matches!(
            gpu_noise(&gpu, &d.slice(..7), &mut o.slice_mut(..), &good, &step),
            Err(Error::InvalidArgument(_))
        ));
    }
}
