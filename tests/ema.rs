//! TRAM-θ target upkeep θ̄ ← λ·θ̄ + (1−λ)·θ: the CPU reference against f64,
//! the λ = 0 / λ = 1 edge cases bit for bit, and the CUDA kernel against the CPU.

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
