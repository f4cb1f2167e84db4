//! The candle optimizer on candle's CUDA device (feature `candle-cuda`)
//! against the same optimizer on candle's CPU device.
//!
//! Both sides get the same gradients and logits (computed on the CPU, the
//! CUDA side's copied to the device into the `GradStore` of a CUDA
//! backward), so what differs is the crate's kernels against its CPU
//! reference, at the step API's bounds: θ + ε after the first step within
//! the KL's (1e-4 relative) and the norm's bound on ε; θ, m, v and the
//! TRAM-θ targets after the second step bit for bit (the restore, the update
//! and the EMA do not depend on ε). Iterations then start from the same θ.
//!
//! Where it runs: only on a machine with a GPU (the binary links candle's
//! CUDA libraries); it skips, saying why, without a usable GPU, and fails
//! under `TRAM_REQUIRE_GPU=1`. CI compile-checks it (`cargo clippy
//! --all-targets --features candle-cuda`).

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::candle::{Method, TramOptimizer};
use tram_kernels::{BaseOptimizer, Geometry, KlOptions, TramConfig, TramVariant};

fn gpu() -> Option<Device> {
    common::gpu()?;
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("TRAM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("TRAM_REQUIRE_GPU=1 but candle has no CUDA device: {e}");
            }
            common::skip(format_args!("candle has no CUDA device: {e}"));
            None
        }
    }
}

const N: usize = 32;
const D_IN: usize = 8;
const H: usize = 16;
const C: usize = 5;
const SHAPES: [&[usize]; 4] = [&[D_IN, H], &[H], &[H, C], &[D_IN, C]];

fn random(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect()
}

fn logits(w: &[Tensor], x: &Tensor, it: usize) -> Tensor {
    let h = x
        .matmul(&w[0])
        .unwrap()
        .broadcast_add(&w[1])
        .unwrap()
        .relu()
        .unwrap();
    let z = h.matmul(&w[2]).unwrap();
    if it % 2 == 0 {
        (z + x.matmul(&w[3]).unwrap()).unwrap()
    } else {
        z
    }
}

fn loss(z: &Tensor, y: &Tensor) -> Tensor {
    let lse = z.log_sum_exp(D::Minus1).unwrap().unsqueeze(1).unwrap();
    let logp = z.broadcast_sub(&lse).unwrap();
    ((logp * y).unwrap().sum_all().unwrap().neg().unwrap() / N as f64).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The CPU gradients `g` as a CUDA `GradStore` of the vars `dv`.
fn to_device(g: &GradStore, cv: &[Var], dv: &[Var], dev: &Device) -> GradStore {
    let mut out = dv[0].as_tensor().sum_all().unwrap().backward().unwrap();
    out.remove(dv[0].as_tensor());
    for (c, d) in cv.iter().zip(dv) {
        if let Some(t) = g.get(c.as_tensor()) {
            out.insert(d.as_tensor(), t.to_device(dev).unwrap());
        }
    }
    out
}

fn compare(dev: &Device, method: Method, iters: usize) {
    let mut rng = SmallRng::seed_from_u64(11);
    let x = Tensor::from_vec(random(&mut rng, N * D_IN), (N, D_IN), &Device::Cpu).unwrap();
    let mut y = vec![0f32; N * C];
    for i in 0..N {
        y[i * C + rng.random_range(0..C)] = 1.0;
    }
    let y = Tensor::from_vec(y, (N, C), &Device::Cpu).unwrap();
    let init: Vec<Vec<f32>> = SHAPES
        .iter()
        .map(|s| random(&mut rng, s.iter().product()))
        .collect();
    let make = |d: &Device| -> Vec<Var> {
        init.iter()
            .zip(SHAPES)
            .map(|(v, s)| Var::from_slice(v, s, d).unwrap())
            .collect()
    };
    let (cv, dv) = (make(&Device::Cpu), make(dev));
    let mut cpu = TramOptimizer::new(cv.clone(), method).unwrap();
    let mut gpu = TramOptimizer::new(dv.clone(), method).unwrap();
    cpu.set_inv_scale(0.5).unwrap();
    gpu.set_inv_scale(0.5).unwrap();
    let w: Vec<Tensor> = cv.iter().map(|v| v.as_tensor().clone()).collect();
    let scaled = |l: Tensor| (l * 2.0).unwrap();
    for it in 0..iters {
        let theta: Vec<Vec<f32>> = cv.iter().map(|v| flat(v.as_tensor())).collect();
        let g1 = scaled(loss(&logits(&w, &x, it), &y)).backward().unwrap();
        let pair = match method {
            Method::Tram(_) => {
                let t: Vec<Tensor> = cpu.targets().unwrap();
                Some((logits(&t, &x, it).detach(), logits(&w, &x, it).detach()))
            }
            Method::Sam { .. } => None,
        };
        let dpair = pair
            .as_ref()
            .map(|(a, b)| (a.to_device(dev).unwrap(), b.to_device(dev).unwrap()));
        cpu.first_step(&g1, pair.as_ref().map(|(a, b)| (a, b)))
            .unwrap();
        gpu.first_step(
            &to_device(&g1, &cv, &dv, dev),
            dpair.as_ref().map(|(a, b)| (a, b)),
        )
        .unwrap();
        for (i, ((c, d), t)) in cv.iter().zip(&dv).zip(&theta).enumerate() {
            let (c, d) = (flat(c.as_tensor()), flat(d.as_tensor()));
            for (j, ((a, b), t0)) in d.iter().zip(&c).zip(t).enumerate() {
                let bound = 2e-4 * (b - t0).abs() + 2.0 * f32::EPSILON * b.abs();
                assert!(
                    (a - b).abs() <= bound,
                    "{method:?} it {it}: var {i}[{j}] θ + ε {a} (CUDA) vs {b} (CPU), θ {t0}"
                );
            }
        }
        let (rc, rd) = (cpu.report().unwrap(), gpu.report().unwrap());
        assert_eq!(rc.perturb, rd.perturb);
        assert!(
            (rc.rho - rd.rho).abs() <= 1e-4 * rc.rho.abs(),
            "ρ {} vs {}",
            rd.rho,
            rc.rho
        );

        let g2 = scaled(loss(&logits(&w, &x, it), &y)).backward().unwrap();
        cpu.second_step(&g2).unwrap();
        gpu.second_step(&to_device(&g2, &cv, &dv, dev)).unwrap();
        for (i, (c, d)) in cv.iter().zip(&dv).enumerate() {
            assert_eq!(
                bits(&flat(d.as_tensor())),
                bits(&flat(c.as_tensor())),
                "{method:?} it {it}: var {i} after the second step"
            );
        }
        let (kc, kd) = (cpu.checkpoint().unwrap(), gpu.checkpoint().unwrap());
        for (name, a, b) in [
            ("m", &kc.m, &kd.m),
            ("v", &kc.v, &kd.v),
            ("target", &kc.targets, &kd.targets),
        ] {
            for (i, (a, b)) in a.iter().zip(b).enumerate() {
                assert_eq!(
                    bits(&flat(b)),
                    bits(&flat(a)),
                    "{method:?} it {it}: {name} {i}"
                );
            }
        }
        assert_eq!(kc.state.counter, kd.state.counter);
    }
    assert_eq!(gpu.step_count().unwrap(), iters as u64);
}

#[test]
fn cuda_optimizer_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let theta = Method::Tram(TramConfig {
        delta: 0.5,
        geometry: Geometry::Sam,
        kl: KlOptions::default(),
        variant: TramVariant::Theta { lambda: 0.9 },
        optimizer: BaseOptimizer::adamw(0.01),
        lr: 0.01,
    });
    compare(&dev, theta, 4);
    let asam = Method::Sam {
        rho: 0.1,
        geometry: Geometry::Adaptive { eta: 0.01 },
        optimizer: BaseOptimizer::Sgd {
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 1e-3,
            nesterov: false,
        },
        lr: 0.05,
    };
    compare(&dev, asam, 3);
}

#[test]
fn cuda_bad_input_is_an_error() {
    let Some(dev) = gpu() else { return };
    let a = Var::ones(4, DType::F32, &dev).unwrap();
    let b = Var::ones(4, DType::F32, &Device::Cpu).unwrap();
    let sam = Method::Sam {
        rho: 0.05,
        geometry: Geometry::Sam,
        optimizer: BaseOptimizer::adamw(0.0),
        lr: 0.01,
    };
    let e = TramOptimizer::new(vec![a.clone(), b.clone()], sam).unwrap_err();
    assert!(e.to_string().contains("one device"), "{e}");
    // A gradient on the CPU for a CUDA var.
    let mut opt = TramOptimizer::new(vec![a.clone()], sam).unwrap();
    let mut g = a.as_tensor().sum_all().unwrap().backward().unwrap();
    g.insert(
        a.as_tensor(),
        Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = opt.first_step(&g, None).unwrap_err();
    assert!(e.to_string().contains("gradient is on"), "{e}");
    assert_eq!(flat(a.as_tensor()), vec![1.0; 4]);
}
