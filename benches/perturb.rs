//! Perturbation θ ← θ + ε (in place with a backup, from master weights, out of
//! place) and restore. CPU reference on 64 Mi elements; with a GPU the kernels
//! on an XLM-R base-like group of 199 tensors (~1 GiB of f32 parameters).
//! Bytes per element, as in the crate docs' memory-traffic table: in place 16 (θ, g read; θ + ε,
//! backup written), with the norm first 20, master weights 10 (f32 master and
//! grad read, bf16 θ + ε written), out of place 12, restore 8 (f32) or 4 (bf16).

mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use tram_kernels::cpu::perturb::{
    perturb, perturb_master_with, perturb_out_of_place_with, perturb_with,
};
use tram_kernels::cpu::restore::restore;
use tram_kernels::cuda::grad_norm::{grad_norm as cuda_grad_norm, NormOptions};
use tram_kernels::cuda::group::ParamGroup;
use tram_kernels::cuda::perturb::{perturb as cuda_perturb, PerturbMode, PerturbOptions};
use tram_kernels::cuda::restore::restore as cuda_restore;
use tram_kernels::cuda::CudaBackend;
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
    let mut theta = common::host_random::<f32>(n, 1, 0.05);
    let grad = common::host_random::<f32>(n, 2, 1e-3);
    let mut backup = common::HostBuf::<f32>::zeroed(n);
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
    let mut working = common::HostBuf::<bf16>::zeroed(n);
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
    let saved = common::host_random::<bf16>(n, 3, 0.05);
    g.throughput(common::bytes(4 * n));
    g.bench_function(format!("cpu/bf16/{size}"), |b| {
        b.iter(|| restore(&mut [&mut working[..]], &[&saved[..]]).expect("restore"))
    });
    g.finish();
    assert!(
        theta[..] == backup[..] && working[..] == saved[..],
        "restore is not bit-exact"
    );
}

const DELTA: f32 = 0.5;

fn opts(geometry: Geometry, mode: PerturbMode) -> PerturbOptions {
    PerturbOptions {
        geometry,
        radius: Radius::TrustRegion { delta: DELTA },
        inv_scale: 1.0,
        mode,
    }
}

fn norm(gpu: &CudaBackend, group: &ParamGroup<'_>, geometry: Geometry) {
    let o = NormOptions {
        geometry,
        inv_scale: 1.0,
    };
    cuda_grad_norm(gpu, group, o).expect("norm");
}

fn cuda(c: &mut Criterion) {
    let Some(gpu) = common::gpu("perturb") else {
        return;
    };
    let stream = gpu.stream().clone();
    // d: the KL value the radius scales with, read by the kernel on the device.
    let d = stream.clone_htod(&[0.1f32]).expect("upload");
    let d = d.as_view();
    let gpu = &gpu;
    let sam = Geometry::Sam;

    let xlmr = common::xlmr_base();
    let tag = common::group_tag("xlmr", &xlmr);
    {
        let bufs = common::DeviceGroup::<f32, f32>::new(gpu, &xlmr, true, false, true);
        let group = ParamGroup::new(gpu, &bufs.views()).expect("group");
        let n = bufs.elements();
        let mut g = c.benchmark_group("perturb");
        for (name, geometry) in [("sam", sam), ("adaptive", Geometry::Adaptive { eta: 0.01 })] {
            norm(gpu, &group, geometry);
            g.throughput(common::bytes(16 * n));
            g.bench_function(format!("cuda/{name}/f32/{tag}"), |b| {
                b.iter_custom(|iters| {
                    common::gpu_time(gpu, iters, || {
                        cuda_perturb(gpu, &group, opts(geometry, PerturbMode::InPlace), Some(&d))
                            .expect("perturb");
                    })
                })
            });
        }
        norm(gpu, &group, sam);
        g.throughput(common::bytes(12 * n));
        g.bench_function(format!("cuda/out-of-place-sam/f32/{tag}"), |b| {
            b.iter_custom(|iters| {
                common::gpu_time(gpu, iters, || {
                    cuda_perturb(gpu, &group, opts(sam, PerturbMode::OutOfPlace), Some(&d))
                        .expect("perturb");
                })
            })
        });
        g.finish();

        let mut g = c.benchmark_group("restore");
        g.throughput(common::bytes(8 * n));
        g.bench_function(format!("cuda/f32/{tag}"), |b| {
            b.iter_custom(|iters| {
                common::gpu_time(gpu, iters, || cuda_restore(gpu, &group).expect("restore"))
            })
        });
        g.finish();

        // The whole in-place first step and its undo, as a framework runs them.
        let mut g = c.benchmark_group("tram_step");
        g.throughput(common::bytes(28 * n));
        g.bench_function(format!("cuda/in-place-sam/f32/{tag}"), |b| {
            b.iter_custom(|iters| {
                common::gpu_time(gpu, iters, || {
                    norm(gpu, &group, sam);
                    cuda_perturb(gpu, &group, opts(sam, PerturbMode::InPlace), Some(&d))
                        .expect("perturb");
                    cuda_restore(gpu, &group).expect("restore");
                })
            })
        });
        g.finish();
        check_round_trip(gpu, &bufs, &group, &d);
    }
    {
        // bf16 working copy, f32 master weights and gradients.
        let bufs = common::DeviceGroup::<bf16, f32>::new(gpu, &xlmr, false, true, false);
        let group = ParamGroup::new(gpu, &bufs.views()).expect("group");
        master_case(c, gpu, &group, bufs.elements(), &tag, &d);
    }
    {
        let bufs = common::DeviceGroup::<bf16, bf16>::new(gpu, &xlmr, true, false, false);
        let group = ParamGroup::new(gpu, &bufs.views()).expect("group");
        let mut g = c.benchmark_group("restore");
        g.throughput(common::bytes(4 * bufs.elements()));
        g.bench_function(format!("cuda/bf16/{tag}"), |b| {
            b.iter_custom(|iters| {
                common::gpu_time(gpu, iters, || cuda_restore(gpu, &group).expect("restore"))
            })
        });
        g.finish();
    }
    {
        // The step-level figure's model: 350M parameters.
        let big = common::group_of(350_000_000);
        let bufs = common::DeviceGroup::<bf16, f32>::new(gpu, &big, false, true, false);
        let group = ParamGroup::new(gpu, &bufs.views()).expect("group");
        master_case(
            c,
            gpu,
            &group,
            bufs.elements(),
            &common::group_tag("g", &big),
            &d,
        );
    }
}

fn master_case(
    c: &mut Criterion,
    gpu: &CudaBackend,
    group: &ParamGroup<'_>,
    n: usize,
    tag: &str,
    d: &cudarc::driver::CudaView<'_, f32>,
) {
    norm(gpu, group, Geometry::Sam);
    let mut g = c.benchmark_group("perturb");
    g.throughput(common::bytes(10 * n));
    g.bench_function(format!("cuda/master-sam/bf16-f32/{tag}"), |b| {
        b.iter_custom(|iters| {
            common::gpu_time(gpu, iters, || {
                cuda_perturb(
                    gpu,
                    group,
                    opts(Geometry::Sam, PerturbMode::Master),
                    Some(d),
                )
                .expect("perturb");
            })
        })
    });
    g.finish();
    let state = group.read_state().expect("state");
    assert!(
        state.perturb_status().applied(),
        "the master perturbation did not apply: {state:?}"
    );
}

/// A perturbation applies, its backup is θ bit for bit, and restore brings θ
/// back bit for bit: a bench of a broken kernel would be worthless.
fn check_round_trip(
    gpu: &CudaBackend,
    bufs: &common::DeviceGroup<f32, f32>,
    group: &ParamGroup<'_>,
    d: &cudarc::driver::CudaView<'_, f32>,
) {
    let stream = gpu.stream();
    let before = stream.clone_dtoh(&bufs.param).expect("download");
    norm(gpu, group, Geometry::Sam);
    cuda_perturb(
        gpu,
        group,
        opts(Geometry::Sam, PerturbMode::InPlace),
        Some(d),
    )
    .expect("perturb");
    let state = group.read_state().expect("state");
    assert!(
        state.perturb_status().applied(),
        "the perturbation did not apply: {state:?}"
    );
    let moved = stream.clone_dtoh(&bufs.param).expect("download");
    let backup = stream
        .clone_dtoh(bufs.backup.as_ref().expect("backup"))
        .expect("download");
    assert!(backup == before, "the backup is not θ bit for bit");
    assert!(moved != before, "θ did not move");
    cuda_restore(gpu, group).expect("restore");
    let after = stream.clone_dtoh(&bufs.param).expect("download");
    assert!(after == before, "restore is not bit-exact");
    println!(
        "check: in-place perturb moved θ (ρ {:.3e}, norm {:.6e}), backup and restore bit-exact",
        state.rho, state.norm
    );
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = cpu, cuda
}
criterion_main!(benches);
