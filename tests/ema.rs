//! TRAM-θ target upkeep θ̄ ← λ·θ̄ + (1−λ)·θ: the CPU reference against f64,
//! the λ = 0 / λ = 1 edge cases bit for bit, and the CUDA kernel against the CPU.

#[macro_use]
mod common;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::ema::{ema_update, EmaTensor};
use tram_kernels::{bf16, Error};

const SIZES: [usize; 4] = [1, 5, 40_000, 70_001];

fn rand_vec(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect()
}

#[test]
fn ema_matches_f64_within_half_an_ulp() {
    let mut rng = SmallRng::seed_from_u64(21);
    for lambda in [0.5f32, 0.9, 0.999, 0.1, 1e-3] {
        let mut targets: Vec<Vec<f32>> = SIZES.iter().map(|&n| rand_vec(&mut rng, n)).collect();
        let thetas: Vec<Vec<f32>> = SIZES.iter().map(|&n| rand_vec(&mut rng, n)).collect();
        let want: Vec<Vec<f64>> = targets
            .iter()
            .zip(&thetas)
            .map(|(t, th)| {
                let l = lambda as f64;
                t.iter()
                    .zip(th)
                    .map(|(&a, &b)| l * a as f64 + (1.0 - l) * b as f64)
                    .collect()
            })
            .collect();
        let mut ts: Vec<EmaTensor<f32, f32>> = targets
            .iter_mut()
            .zip(&thetas)
            .map(|(t, th)| EmaTensor {
                target: t,
                theta: th,
            })
            .collect();
        ema_update(&mut ts, lambda).unwrap();
        for (t, w) in targets.iter().zip(&want) {
            for (&a, &b) in t.iter().zip(w) {
                // Half an ulp of f32 (2^-24 relative) plus f64 noise on the terms (≤ 6 in magnitude).
                assert!(
                    (a as f64 - b).abs() <= 2f64.powi(-24) * b.abs() + 1e-14,
                    "{a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn lambda_one_keeps_and_lambda_zero_copies_bit_for_bit() {
    let mut rng = SmallRng::seed_from_u64(22);
    let n = 50_001;
    let mut target: Vec<f32> = rand_vec(&mut rng, n);
    target[0] = -0.0;
    target[1] = f32::from_bits(0x7fc0_1234); // a NaN payload survives λ = 1
    let theta = rand_vec(&mut rng, n);
    let before = target.clone();
    ema_update(
        &mut [EmaTensor {
            target: &mut target,
            theta: &theta,
        }],
        1.0,
    )
    .unwrap();
    assert!(target
        .iter()
        .zip(&before)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let mut theta2 = theta.clone();
    theta2[2] = -0.0;
    ema_update(
        &mut [EmaTensor {
            target: &mut target,
            theta: &theta2,
        }],
        0.0,
    )
    .unwrap();
    assert!(target
        .iter()
        .zip(&theta2)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn bf16_target_from_f32_master() {
    let mut rng = SmallRng::seed_from_u64(23);
    let n = 9_999;
    let mut target: Vec<bf16> = rand_vec(&mut rng, n)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let theta = rand_vec(&mut rng, n);
    let before = target.clone();
    let lambda = 0.75f32;
    ema_update(
        &mut [EmaTensor {
            target: &mut target,
            theta: &theta,
        }],
        lambda,
    )
    .unwrap();
    for i in 0..n {
        let exact = 0.75 * before[i].to_f64() + 0.25 * theta[i] as f64;
        // bf16 keeps 8 significant bits: half an ulp is ≤ 2^-8 relative (+ the f32 step).
        assert!(
            (target[i].to_f64() - exact).abs() <= (2f64.powi(-8) + 2f64.powi(-24)) * exact.abs()
        );
    }
}

#[test]
fn bad_input_is_an_error() {
    let theta = vec![1.0f32; 8];
    for lambda in [-0.1f32, 1.5, f32::NAN] {
        let mut t = vec![0.0f32; 8];
        let r = ema_update(
            &mut [EmaTensor {
                target: &mut t,
                theta: &theta,
            }],
            lambda,
        );
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "λ = {lambda}");
        assert!(t.iter().all(|&x| x == 0.0));
    }
    let mut t = vec![0.0f32; 7];
    let r = ema_update(
        &mut [EmaTensor {
            target: &mut t,
            theta: &theta,
        }],
        0.5,
    );
    assert!(matches!(r, Err(Error::InvalidArgument(_))));
    assert!(matches!(
        ema_update::<f32, f32>(&mut [], 0.5),
        Err(Error::InvalidArgument(_))
    ));
}

mod gpu {
    use super::*;
    use cudarc::driver::DeviceRepr;
    use tram_kernels::cuda::ema::{ema_update as gpu_ema, DeviceEmaTensor, EmaGroup};
    use tram_kernels::cuda::CudaBackend;
    use tram_kernels::{f16, Element};

    /// (elements, offset of the view inside its buffer).
    const TENSORS: [(usize, usize); 5] = [(1, 0), (7, 1), (65_537, 3), (200_003, 0), (1000, 5)];

    fn run<T: Element + DeviceRepr, P: Element + DeviceRepr>(gpu: &CudaBackend, lambda: f32) {
        let mut rng = SmallRng::seed_from_u64(24);
        let s = gpu.stream();
        let mut targets: Vec<Vec<T>> = TENSORS
            .iter()
            .map(|&(n, _)| rand_vec(&mut rng, n).into_iter().map(T::from_f32).collect())
            .collect();
        let thetas: Vec<Vec<P>> = TENSORS
            .iter()
            .map(|&(n, _)| rand_vec(&mut rng, n).into_iter().map(P::from_f32).collect())
            .collect();
        let mut d_t: Vec<_> = targets
            .iter()
            .zip(TENSORS)
            .map(|(t, (_, off))| {
                let mut h = vec![T::from_f32(f32::NAN); off];
                h.extend_from_slice(t);
                s.clone_htod(&h).unwrap()
            })
            .collect();
        let d_th: Vec<_> = thetas
            .iter()
            .zip(TENSORS)
            .map(|(t, (_, off))| {
                let mut h = vec![P::from_f32(f32::NAN); off];
                h.extend_from_slice(t);
                s.clone_htod(&h).unwrap()
            })
            .collect();
        {
            let views = d_t
                .iter_mut()
                .zip(&d_th)
                .zip(TENSORS)
                .map(|((t, th), (n, off))| DeviceEmaTensor {
                    target: t.slice_mut(off..off + n),
                    theta: th.slice(off..off + n),
                })
                .collect();
            let group = EmaGroup::new(gpu, views).unwrap();
            gpu_ema(gpu, &group, lambda).unwrap();
        }
        let mut ts: Vec<EmaTensor<T, P>> = targets
            .iter_mut()
            .zip(&thetas)
            .map(|(t, th)| EmaTensor {
                target: t,
                theta: th,
            })
            .collect();
        ema_update(&mut ts, lambda).unwrap();
        for (k, (d, want)) in d_t.iter().zip(&targets).enumerate() {
            let off = TENSORS[k].1;
            let got = s.clone_dtoh(d).unwrap();
            for i in 0..want.len() {
                assert_eq!(
                    got[off + i].to_bits_u32(),
                    want[i].to_bits_u32(),
                    "λ {lambda} tensor {k} element {i}"
                );
            }
            // The padding before the view is untouched.
            assert!(got[..off].iter().all(|x| x.to_f32().is_nan()));
        }
    }

    #[test]
    fn gpu_ema_matches_cpu_bit_for_bit() {
        let gpu = gpu_or_skip!();
        for lambda in [0.5f32, 0.9, 0.999, 1e-3, 0.0, 1.0] {
            run::<f32, f32>(&gpu, lambda);
            run::<bf16, f32>(&gpu, lambda);
            run::<bf16, bf16>(&gpu, lambda);
            run::<f16, f16>(&gpu, lambda);
            run::<f32, bf16>(&gpu, lambda);
        }
    }

    #[test]
    fn gpu_bad_input_is_an_error() {
        let gpu = gpu_or_skip!();
        let s = gpu.stream();
        let mut t = s.clone_htod(&[0.0f32; 8]).unwrap();
        let th = s.clone_htod(&[1.0f32; 8]).unwrap();
        let bad = EmaGroup::new(
            &gpu,
            vec![DeviceEmaTensor {
                target: t.slice_mut(..7),
                theta: th.slice(..),
            }],
        );
        assert!(matches!(bad, Err(Error::InvalidArgument(_))));
        let group = EmaGroup::new(
            &gpu,
            vec![DeviceEmaTensor {
                target: t.slice_mut(..),
                theta: th.slice(..),
            }],
        )
        .unwrap();
        for lambda in [-0.5f32, 1.01, f32::NAN] {
            assert!(matches!(
                gpu_ema(&gpu, &group, lambda),
                Err(Error::InvalidArgument(_))
            ));
        }
        assert!(matches!(
            EmaGroup::new::<f32, f32>(&gpu, vec![]),
            Err(Error::InvalidArgument(_))
        ));
    }
}
