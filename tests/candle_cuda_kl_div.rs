//! The KL op on candle's CUDA tensors (feature `candle-cuda`) against the same
//! op on candle's CPU tensors (the crate's CPU reference), on fresh random
//! logits, at the GPU kernels' stated bounds.
//!
//! Where it runs: only on a machine with a GPU. The binary links candle's CUDA
//! libraries (runtime, cuBLAS, cuRAND), so it builds only where the CUDA
//! toolkit's libraries are installed and starts only where a driver is. With
//! a driver but no usable GPU (or no kernels embedded) it skips, saying why,
//! and fails under `TRAM_REQUIRE_GPU=1`. It is not part of the emulated runs:
//! those build the crate without `candle-cuda`, and candle's own CUDA side
//! (its kernels, cuBLAS, cuRAND) has no stand-in on the emulated device; CI
//! only compile-checks this file.

mod common;

use candle_core::{DType, Device, Tensor, Var, WithDType};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::candle::kl_div;
use tram_kernels::{bf16, f16, Element, KlDirection, KlOptions, Reduction};

/// candle's CUDA device 0 and the crate's kernels on it, or `None` with the
/// reason printed (a panic under `TRAM_REQUIRE_GPU=1`).
fn gpu() -> Option<Device> {
    // The crate's own probe first: it says why when the kernels or the GPU are missing.
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

fn normal(rng: &mut SmallRng) -> f32 {
    let u: f64 = 1.0 - rng.random::<f64>();
    let v: f64 = rng.random::<f64>();
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

/// Significand bits of the dtype (the rounding of a gradient is ½ ulp, 2^−p relative).
fn precision(dt: DType) -> i32 {
    match dt {
        DType::F32 => 24,
        DType::F16 => 11,
        _ => 8,
    }
}

/// Value: ≤ 1e-4 relative (the GPU bound per row, inherited by the reductions)
/// plus one f32 rounding on each side. Gradient entry i of row r: ≤ 1e-4·|g| +
/// 1e-5·max_r|g| (the GPU bound) + one rounding to the dtype on each side
/// (2^−p·|g| each), + the dtype's smallest subnormal for f16.
fn compare<T: Element + WithDType>(gpu: &Device, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (rows, vocab) = (24usize, 3000usize);
    let n = rows * vocab;
    let model: Vec<f32> = (0..n).map(|_| 3.0 * normal(&mut rng)).collect();
    let target: Vec<T> = model
        .iter()
        .map(|&m| T::from_f32(m + 0.1 * normal(&mut rng)))
        .collect();
    let model: Vec<T> = model.into_iter().map(T::from_f32).collect();
    let weights: Vec<f32> = (0..rows).map(|_| 0.5 + rng.random::<f32>()).collect();
    let p = precision(<T as WithDType>::DTYPE);
    let sub = if <T as WithDType>::DTYPE == DType::F16 {
        2f64.powi(-24)
    } else {
        0.0
    };
    for direction in [
        KlDirection::Forward,
        KlDirection::Reverse,
        KlDirection::Symmetric,
    ] {
        for reduction in [
            Reduction::None,
            Reduction::Sum,
            Reduction::MeanRows,
            Reduction::MeanElements,
        ] {
            let o = KlOptions {
                direction,
                reduction,
                temperature: 1.5,
            };
            let what = format!("{:?} {direction:?} {reduction:?}", <T as WithDType>::DTYPE);
            let run = |dev: &Device| {
                let t = Var::from_vec(target.clone(), (rows, vocab), dev).unwrap();
                let m = Var::from_vec(model.clone(), (rows, vocab), dev).unwrap();
                let v = kl_div(t.as_tensor(), m.as_tensor(), &o).unwrap();
                let loss = match reduction {
                    Reduction::None => {
                        let w = Tensor::from_vec(weights.clone(), rows, dev).unwrap();
                        (&v * &w).unwrap().sum_all().unwrap()
                    }
                    _ => v.affine(0.37, 0.0).unwrap(),
                };
                let g = loss.backward().unwrap();
                let host = |x: &Tensor| {
                    x.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                };
                (host(&v), host(g.get(&m).unwrap()), host(g.get(&t).unwrap()))
            };
            let (gv, gm, gt) = run(gpu);
            let (cv, cm, ct) = run(&Device::Cpu);
            for (x, y) in gv.iter().zip(&cv) {
                assert!(
                    (x - y).abs() <= (1e-4 + 2.0 * 2f64.powi(-24)) * y.abs(),
                    "value {x} vs CPU {y}, {what}"
                );
            }
            for (name, g, c) in [("model", &gm, &cm), ("target", &gt, &ct)] {
                for (r, (gr, cr)) in g.chunks(vocab).zip(c.chunks(vocab)).enumerate() {
                    let max = cr.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    for (x, y) in gr.iter().zip(cr) {
                        let tol = (1e-4 + 2.0 * 2f64.powi(-p)) * y.abs() + 1e-5 * max + sub;
                        assert!(
                            (x - y).abs() <= tol,
                            "{name} gradient row {r}: {x} vs CPU {y}, {what}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn cuda_op_matches_the_cpu_op() {
    let Some(dev) = gpu() else { return };
    compare::<f32>(&dev, 1);
    compare::<f16>(&dev, 2);
    compare::<bf16>(&dev, 3);
}

/// Views with offsets and a row stride read in place on the device; inputs on
/// two devices are an error.
#[test]
fn cuda_views_and_mixed_devices() {
    let Some(dev) = gpu() else { return };
    let a = Tensor::randn(0f32, 2.0, (6, 40), &dev).unwrap();
    let b = Tensor::randn(0f32, 2.0, (6, 40), &dev).unwrap();
    let o = KlOptions::default();
    let (va, vb) = (
        a.narrow(0, 1, 4).unwrap().narrow(1, 7, 29).unwrap(),
        b.narrow(0, 1, 4).unwrap().narrow(1, 7, 29).unwrap(),
    );
    let v = kl_div(&va, &vb, &o).unwrap().to_scalar::<f32>().unwrap();
    let w = kl_div(&va.contiguous().unwrap(), &vb.contiguous().unwrap(), &o)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(v.to_bits(), w.to_bits(), "the same rows give the same bits");
    assert!(v > 0.0);
    let cpu = b.to_device(&Device::Cpu).unwrap();
    assert!(kl_div(&a, &cpu, &o).is_err());
    assert!(kl_div(&cpu, &a, &o).is_err());
}
