//! Perturbation θ ← θ + ε (in place with a backup, from master weights, out of
//! place) and restore. CPU reference on 64 Mi elements; with a GPU the kernels
//! on an XLM-R base-like group of 199 tensors (~1 GiB of f32 parameters).
//! Bytes as in byte-budgets.md, per element: in place 16 (θ, g read; θ + ε,
//! backup written), with the norm first 20, master weights 10 (f32 master and
//! grad read, bf16 θ + ε written), out of place 12, restore 8 (f32) or 4 (bf16).

mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use tram_kernels::cpu::perturb::{
    perturb, perturb_master_with, perturb_out_of_place_with, perturb_with,
};
use tram_kernels::cpu::restore::restore;
use tram_kernels::{bf16, Geometry, Radius};

const CPU_LEN: usize = 64 << 20;
/// ρ and a norm of the order of the random gradients' (so ε is realistic).
const RHO: f64 = 0.05;
const NORM: f64 = 4.7;

fn cpu(c: &mut Criterion) {
    if !common::cpu_enabled() {
        return;
    }
    let n = CPU_LEN;
    let size = common::count(n);
    let mut theta: Vec<f32> = common::random(n, 1, 0.05);
    let grad: Vec<f32> = common::random(n, 2, 1e-3);
    let mut backup = vec![0.0f32; n];
    let grads = [Some(&grad[..])];

    let mut g = c.benchmark_group("perturb");
    g.sampling_mode(SamplingMode::Flat);
    for (name, geometry) in [
        ("sam", Geometry::Sam),
        ("adaptive", Geometry::Adaptive { eta: 0.01 }),
    ] {
        g.throughput(common::bytes(16 * n));
        g.bench_function(format!("cpu/{name}/f32/{size}"), |b| {
            b.iter(|| {
                perturb_with(
                    &mut [&mut theta[..]],
                    &grads,
                    &mut [&mut backup[..]],
                    geometry,
                    1.0,
                    NORM,
                    RHO,
                )
                .expect("perturb")
            })
        });
    }
    g.throughput(common::bytes(20 * n));
    g.bench_function(format!("cpu/norm+sam/f32/{size}"), |b| {
        b.iter(|| {
            perturb(
                &mut [&mut theta[..]],
                &grads,
                &mut [&mut backup[..]],
                Geometry::Sam,
                Radius::TrustRegion { delta: 0.5 },
                0.1,
                1.0,
            )
            .expect("perturb")
        })
    });
    g.throughput(common::bytes(12 * n));
    g.bench_function(format!("cpu/out-of-place-sam/f32/{size}"), |b| {
        b.iter(|| {
            perturb_out_of_place_with(
                &[&theta[..]],
                &grads,
                &mut [&mut backup[..]],
                Geometry::Sam,
                1.0,
                NORM,
                RHO,
            )
            .expect("perturb")
        })
    });
    let mut working = vec![bf16::ZERO; n];
    g.throughput(common::bytes(10 * n));
    g.bench_function(format!("cpu/master-sam/bf16-f32/{size}"), |b| {
        b.iter(|| {
            perturb_master_with(
                &[&theta[..]],
                &grads,
                &mut [&mut working[..]],
                Geometry::Sam,
                1.0,
                NORM,
                RHO,
            )
            .expect("perturb")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("restore");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(common::bytes(8 * n));
    g.bench_function(format!("cpu/f32/{size}"), |b| {
        b.iter(|| restore(&mut [&mut theta[..]], &[&backup[..]]).expect("restore"))
    });
    let saved: Vec<bf16> = common::random(n, 3, 0.05);
    g.throughput(common::bytes(4 * n));
    g.bench_function(format!("cpu/bf16/{size}"), |b| {
        b.iter(|| restore(&mut [&mut working[..]], &[&saved[..]]).expect("restore"))
    });
    g.finish();
    assert!(
        theta == backup && working == saved,
        "restore is not bit-exact"
    );
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = cpu
}
criterion_main!(benches);
