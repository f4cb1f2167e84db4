//! Global gradient norm over a group: the CPU reference on 64 Mi elements (the
//! size of the numpy `np.linalg.norm` baseline), and with a GPU the multi-tensor
//! kernel on an XLM-R base-like group of 199 tensors (~1 GiB of f32 gradients).
//! Bytes as in the crate docs' memory-traffic table: the gradient read once (SAM, Fisher), plus θ
//! for the adaptive geometry.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use cudarc::driver::DeviceRepr;
use tram_kernels::cpu::grad_norm::grad_norm;
use tram_kernels::cuda::grad_norm::{grad_norm as cuda_grad_norm, NormOptions};
use tram_kernels::cuda::group::ParamGroup;
use tram_kernels::cuda::CudaBackend;
use tram_kernels::{bf16, Element, Geometry};

const CPU_LEN: usize = 64 << 20;

const GEOMETRIES: [(&str, Geometry); 3] = [
    ("sam", Geometry::Sam),
    ("adaptive", Geometry::Adaptive { eta: 0.01 }),
    ("fisher", Geometry::Fisher { eta: 1.0 }),
];

/// Bytes one norm reads per element: the gradient, and θ (`theta` bytes) for
/// the adaptive geometry only.
fn bytes_per(geometry: Geometry, theta: usize, grad: usize) -> usize {
    match geometry {
        Geometry::Adaptive { .. } => theta + grad,
        Geometry::Sam | Geometry::Fisher { .. } => grad,
    }
}

fn cpu_case<P: Element, G: Element>(
    c: &mut Criterion,
    dtype: &str,
    geometries: &[(&str, Geometry)],
) {
    let theta = common::host_random::<P>(CPU_LEN, 1, 0.05);
    let grad = common::host_random::<G>(CPU_LEN, 2, 1e-3);
    let params = [&theta[..]];
    let grads = [Some(&grad[..])];
    let mut g = c.benchmark_group("grad_norm");
    g.sampling_mode(SamplingMode::Flat);
    for &(name, geometry) in geometries {
        let per = bytes_per(geometry, P::DTYPE.size(), G::DTYPE.size());
        g.throughput(common::bytes(per * CPU_LEN));
        let id = format!("cpu/{name}/{dtype}/{}", common::count(CPU_LEN));
        g.bench_function(id, |b| {
            b.iter(|| grad_norm(&params, &grads, geometry, 1.0).expect("norm"))
        });
    }
    g.finish();
}

fn cpu(c: &mut Criterion) {
    if !common::cpu_enabled() {
        return;
    }
    cpu_case::<f32, f32>(c, "f32", &GEOMETRIES);
    cpu_case::<bf16, bf16>(c, "bf16", &GEOMETRIES[..1]);
    cpu_case::<bf16, f32>(c, "bf16-f32", &GEOMETRIES[1..2]);
}

/// The multi-tensor kernel over one group, each geometry given, one launch per
/// iteration; the result is checked against the CPU reference once.
fn cuda_case<P: Element + DeviceRepr, G: Element + DeviceRepr>(
    c: &mut Criterion,
    gpu: &CudaBackend,
    dtype: &str,
    sizes: &[usize],
    tag: &str,
    master: bool,
    geometries: &[(&str, Geometry)],
) {
    let bufs = common::DeviceGroup::<P, G>::new(gpu, sizes, false, master, false);
    let group = ParamGroup::new(gpu, &bufs.views()).expect("group");
    let n = bufs.elements();
    let mut g = c.benchmark_group("grad_norm");
    for &(name, geometry) in geometries {
        let opts = NormOptions {
            geometry,
            inv_scale: 1.0,
        };
        // With master weights the adaptive norm reads θ from the f32 master.
        let theta = if master { 4 } else { P::DTYPE.size() };
        let per = bytes_per(geometry, theta, G::DTYPE.size());
        g.throughput(common::bytes(per * n));
        g.bench_function(format!("cuda/{name}/{dtype}/{tag}"), |b| {
            b.iter_custom(|iters| {
                common::gpu_time(gpu, iters, || {
                    cuda_grad_norm(gpu, &group, opts).expect("norm");
                })
            })
        });
        check(gpu, &bufs, &group, geometry, master);
    }
    g.finish();
}

/// The device norm against the CPU reference (1e-6 relative, the kernel's
/// documented bound): a bench that measured a wrong kernel would be worthless.
fn check<P: Element + DeviceRepr, G: Element + DeviceRepr>(
    gpu: &CudaBackend,
    bufs: &common::DeviceGroup<P, G>,
    group: &ParamGroup<'_>,
    geometry: Geometry,
    master: bool,
) {
    let stream = gpu.stream();
    let opts = NormOptions {
        geometry,
        inv_scale: 1.0,
    };
    cuda_grad_norm(gpu, group, opts).expect("norm");
    let got = group.read_state().expect("state").norm;
    let grad = stream.clone_dtoh(&bufs.grad).expect("download");
    let grads: Vec<Option<&[G]>> = split(&grad, &bufs.sizes).into_iter().map(Some).collect();
    let want = if master {
        let m = stream
            .clone_dtoh(bufs.master.as_ref().expect("master"))
            .expect("download");
        grad_norm(&split(&m, &bufs.sizes), &grads, geometry, 1.0)
            .expect("cpu norm")
            .norm
    } else {
        let p = stream.clone_dtoh(&bufs.param).expect("download");
        grad_norm(&split(&p, &bufs.sizes), &grads, geometry, 1.0)
            .expect("cpu norm")
            .norm
    };
    let rel = ((got - want) / want).abs();
    println!("check: cuda {geometry:?} norm {got:.9e}, cpu {want:.9e}, relative error {rel:.2e}");
    assert!(
        rel <= 1e-6,
        "CUDA norm {got} differs from the CPU reference {want}"
    );
}

fn split<'a, T>(v: &'a [T], sizes: &[usize]) -> Vec<&'a [T]> {
    let mut rest = v;
    sizes
        .iter()
        .map(|&n| {
            let (a, b) = rest.split_at(n);
            rest = b;
            a
        })
        .collect()
}

fn cuda(c: &mut Criterion) {
    let Some(gpu) = common::gpu("grad_norm") else {
        return;
    };
    let xlmr = common::xlmr_base();
    let tag = common::group_tag("xlmr", &xlmr);
    cuda_case::<f32, f32>(c, &gpu, "f32", &xlmr, &tag, false, &GEOMETRIES);
    cuda_case::<bf16, bf16>(c, &gpu, "bf16", &xlmr, &tag, false, &GEOMETRIES[..1]);
    cuda_case::<bf16, f32>(c, &gpu, "bf16-f32", &xlmr, &tag, false, &GEOMETRIES[..2]);
    // One 64 Mi-element tensor: the same bytes without the group's many tails.
    let one = [CPU_LEN];
    cuda_case::<f32, f32>(c, &gpu, "f32", &one, "1x64Mi", false, &GEOMETRIES[..1]);
    // The step-level figure's model: 350M parameters, f32 master weights and
    // gradients beside a bf16 working copy.
    let big = common::group_of(350_000_000);
    let tag = common::group_tag("g", &big);
    cuda_case::<bf16, f32>(c, &gpu, "f32", &big, &tag, true, &GEOMETRIES[..1]);
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = cpu, cuda
}
criterion_main!(benches);
